//! TLS on the edge: `herald dev` with `--tls-cert`/`--tls-key` (self-signed
//! certificates made here) serves a real exchange over `wss://`; the
//! certificate is rotated the way a Kubernetes Secret volume rotates it (a
//! symlink swap), new handshakes get the new one without a restart while
//! open connections go on; a plain `ws://` request gets a plain refusal;
//! the drain closes relayed connections; and unusable files stop the start.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use herald_client::rustls::{self, pki_types::CertificateDer};
use herald_client::{Client, ClientError, Options};
use herald_test_support::{Herald, free_addr, herald_bin, http_get};
use serde_json::json;

/// A self-signed certificate for `localhost`: (cert PEM, key PEM, cert DER).
fn self_signed() -> (String, String, CertificateDer<'static>) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    (
        c.cert.pem(),
        c.signing_key.serialize_pem(),
        c.cert.der().clone(),
    )
}

fn trusting(certs: &[&CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add((*c).clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    // A resumed session presents no certificate: every handshake here is a
    // full one, so that each shows the certificate the server has now.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// A GET over TLS: the status, and the certificate the server presented.
fn https_get(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    path: &str,
) -> std::io::Result<(u16, CertificateDer<'static>)> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn =
        rustls::ClientConnection::new(config.clone(), name).map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer)?;
    let status = String::from_utf8_lossy(&answer)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let presented = tls.conn.peer_certificates().unwrap()[0].clone();
    Ok((status, presented))
}

/// The files as a Kubernetes Secret volume holds them: `tls.crt` and
/// `tls.key` are symlinks into `..data`, itself a symlink to a directory
/// of the current version, swapped by one rename.
struct SecretVolume {
    dir: tempfile::TempDir,
    version: u32,
}

impl SecretVolume {
    fn new(cert: &str, key: &str) -> SecretVolume {
        let mut v = SecretVolume {
            dir: tempfile::tempdir().unwrap(),
            version: 0,
        };
        v.update(cert, key);
        for f in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{f}"), v.dir.path().join(f)).unwrap();
        }
        v
    }

    fn update(&mut self, cert: &str, key: &str) {
        self.version += 1;
        let name = format!("..v{}", self.version);
        let data = self.dir.path().join(&name);
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("tls.crt"), cert).unwrap();
        std::fs::write(data.join("tls.key"), key).unwrap();
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }
}

fn tls_args(cert: &Path, key: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ]
}

/// `herald dev` serving TLS, ready when `/readyz` answers 200 over TLS.
fn start_dev(args: &[String], config: &Arc<rustls::ClientConfig>) -> (Herald, SocketAddr) {
    let ws = free_addr();
    let mut all: Vec<String> = vec![
        "dev".into(),
        "--listen".into(),
        ws.to_string(),
        "--grpc-listen".into(),
        free_addr().to_string(),
        "--jwt-secret".into(),
        SECRET.into(),
    ];
    all.extend_from_slice(args);
    let herald = Herald::start_until("herald dev (TLS)", &all, ws, || {
        matches!(https_get(ws, config, "/readyz"), Ok((200, _)))
    })
    .expect("start herald dev with TLS");
    (herald, ws)
}

async fn connect_tls(url: &str, user: &str, config: &Arc<rustls::ClientConfig>) -> Client {
    let options = Options {
        tls: Some(config.clone()),
        ..Options::default()
    };
    let (client, connected) = Client::connect_with(url, &token(user), &options)
        .await
        .expect("connect over wss://");
    assert_eq!(connected["user"], user);
    client
}

async fn exchange(from: &Client, to: &[&Client], room: &str, text: &str) {
    ok(from, json!({"op":"publish","room":room,"data":text})).await;
    for c in to {
        let m = c.recv_op("message", WAIT).await.unwrap();
        assert_eq!(m["data"], text);
    }
}

#[tokio::test]
async fn wss_works_and_a_rotated_certificate_reaches_new_handshakes_only() {
    let (cert_a, key_a, der_a) = self_signed();
    let (cert_b, key_b, der_b) = self_signed();
    let mut volume = SecretVolume::new(&cert_a, &key_a);
    let both = trusting(&[&der_a, &der_b]);
    let (dev, addr) = start_dev(&tls_args(&volume.cert(), &volume.key()), &both);
    let out = dev.output();
    assert!(out.contains(&format!("wss://{addr}/ws")), "{out}");
    assert!(out.contains(&format!("https://{addr}/healthz")), "{out}");
    let url = format!("wss://localhost:{}/ws", addr.port());

    let alice = connect_tls(&url, "alice", &both).await;
    let bob = connect_tls(&url, "bob", &both).await;
    for c in [&alice, &bob] {
        ok(c, json!({"op":"join","room":"chat:tls"})).await;
    }
    exchange(&bob, &[&alice, &bob], "chat:tls", "before the rotation").await;
    assert_eq!(https_get(addr, &both, "/healthz").unwrap().1, der_a);

    volume.update(&cert_b, &key_b);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if https_get(addr, &both, "/healthz").is_ok_and(|(_, c)| c == der_b) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not presented within 15s:\n{}",
            dev.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        dev.output().contains("TLS certificate reloaded"),
        "{}",
        dev.output()
    );

    // The open connections keep going on the old certificate's sessions.
    exchange(&alice, &[&alice, &bob], "chat:tls", "after the rotation").await;
    // A client that trusts only the new certificate gets in too.
    let carol = connect_tls(&url, "carol", &trusting(&[&der_b])).await;
    ok(&carol, json!({"op":"join","room":"chat:tls"})).await;
    exchange(
        &carol,
        &[&alice, &bob, &carol],
        "chat:tls",
        "a new connection",
    )
    .await;
    // And one that trusts only the old one no longer does.
    let old_only = Options {
        tls: Some(trusting(&[&der_a])),
        ..Options::default()
    };
    match Client::open_with(&url, &old_only).await {
        Err(ClientError::Connect(e)) => assert!(e.contains("TLS handshake"), "{e}"),
        other => panic!("a client trusting only the old certificate: {other:?}"),
    }

    // Plain ws:// on the TLS port: a plain-words 400, not TLS bytes.
    match Client::open(&format!("ws://{addr}/ws")).await {
        Err(ClientError::Rejected { status: 400 }) => {}
        other => panic!("ws:// to a TLS edge: {other:?}"),
    }
    let (status, body) = http_get(addr, "/readyz").unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("use wss://"), "{body}");

    // The clients close; the edge keeps serving.
    alice.close().await.unwrap();
    exchange(&carol, &[&bob, &carol], "chat:tls", "after a close").await;

    // The drain reaches relayed connections: each is told to reconnect
    // elsewhere and closed with 1012 through its relay, and the process
    // exits.
    let mut dev = dev;
    dev.signal("-TERM");
    for c in [&bob, &carol] {
        let (disconnect, code, reason) = c.closed(Duration::from_secs(20)).await.unwrap();
        assert_eq!(disconnect.expect("a disconnect frame")["code"], 1012);
        assert_eq!(code, Some(1012), "{reason}");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = dev.exited() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running:\n{}",
            dev.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exited with {status}:\n{}", dev.output());
}

#[test]
fn unusable_tls_files_stop_the_start() {
    let (cert, _, _) = self_signed();
    let (_, other_key, _) = self_signed();
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&c, &cert).unwrap();
    std::fs::write(&k, &other_key).unwrap();
    let start = |args: &[String]| {
        let out = std::process::Command::new(herald_bin())
            .arg("dev")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = start(&tls_args(&c, &k));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("tls.key is not the key of the certificate in"),
        "{stderr}"
    );
    let (code, stderr) = start(&tls_args(&c, &dir.path().join("missing.key")));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot read") && stderr.contains("missing.key"),
        "{stderr}"
    );
    let (code, stderr) = start(&["--tls-cert".into(), c.display().to_string()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--tls-key"), "{stderr}");
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// Opens `n` authenticated connections, each answering one ping.
async fn hold(url: &str, n: usize, from: usize, options: &Options) -> Vec<Client> {
    let mut held = Vec::with_capacity(n);
    for i in from..from + n {
        let (c, _) = Client::connect_with(url, &token(&format!("idle-{i}")), options)
            .await
            .expect("connect");
        let pong = c.request(json!({"op":"ping"})).await.unwrap();
        assert_eq!(pong["op"], "pong");
        held.push(c);
    }
    held
}

/// What an idle connection costs an edge (`herald edge`, NATS behind it)
/// in resident memory, plain and TLS: `n` connections (default 1000,
/// `HERALD_IDLE_CONNS`) are opened after 200 of warm-up, and the edge's
/// RSS growth is divided by `n`. A measurement, not a check: run with
/// `--ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn idle_memory_plain_and_tls() {
    let n: usize = std::env::var("HERALD_IDLE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let cluster = Cluster::start(0);
    let (cert, key, der) = self_signed();
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&c, &cert).unwrap();
    std::fs::write(&k, &key).unwrap();
    let trust = trusting(&[&der]);
    for tls in [false, true] {
        let addr = free_addr();
        let mut args: Vec<String> = vec![
            "edge".into(),
            "--listen".into(),
            addr.to_string(),
            "--nats".into(),
            cluster.nats_urls.clone(),
            "--node-id".into(),
            format!("edge-{}", if tls { "tls" } else { "plain" }),
            "--jwt-secret".into(),
            SECRET.into(),
        ];
        let (url, options) = if tls {
            args.extend(tls_args(&c, &k));
            let options = Options {
                tls: Some(trust.clone()),
                ..Options::default()
            };
            (format!("wss://localhost:{}/ws", addr.port()), options)
        } else {
            (format!("ws://{addr}/ws"), Options::default())
        };
        let edge = Herald::start_until("edge", &args, addr, || {
            if tls {
                matches!(https_get(addr, &trust, "/readyz"), Ok((200, _)))
            } else {
                matches!(http_get(addr, "/readyz"), Ok((200, _)))
            }
        })
        .unwrap();
        let settle = Duration::from_secs(3);
        let _warm = hold(&url, 200, 0, &options).await;
        tokio::time::sleep(settle).await;
        let before = rss_kib(edge.pid());
        let _held = hold(&url, n, 200, &options).await;
        tokio::time::sleep(settle).await;
        let after = rss_kib(edge.pid());
        println!(
            "{}: {n} idle connections: edge RSS {before} KiB -> {after} KiB, {:.2} KiB per connection",
            if tls { "TLS  " } else { "plain" },
            (after - before) as f64 / n as f64
        );
    }
}
