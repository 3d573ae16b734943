//! Test support: starts the real dependencies of a Herald test as separate
//! processes (a `nats-server` with JetStream, Herald's own binaries) on free
//! ports with temporary directories, so a test can kill and restart them.
//! Everything is cleaned up on drop; the process's output is printed when a
//! test fails, so a failure shows what the servers said.
//!
//! [`ChildProcess`] is the one way Herald's tests and its bench run a child
//! process.

mod process;
mod proxy;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

pub use process::{ChildProcess, die_with_parent};
pub use proxy::Proxy;

/// A port that was free a moment ago on 127.0.0.1, below the kernel's
/// ephemeral range: a port that `bind(0)` hands out is one any outgoing
/// connection may take before the process it was meant for binds it (a
/// bench smoke test once failed so, with "Address already in use"). Ports
/// are tried in a sequence that differs per process and goes on within it,
/// so that parallel tests rarely pick the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_start: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    if ephemeral_start > 12_000 {
        let (low, span) = (10_000, ephemeral_start - 10_000);
        let start = std::process::id().wrapping_mul(7919);
        for _ in 0..span.min(2000) {
            let k = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = low + start.wrapping_add(k.wrapping_mul(104_729)) % span;
            if let Ok(port) = u16::try_from(port)
                && TcpListener::bind(("127.0.0.1", port)).is_ok()
            {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}

/// A free `127.0.0.1:port` address.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A plain HTTP/1.1 GET; returns the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status line")?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    Ok((status, body.unwrap_or_default()))
}

/// Waits until `check` returns `Some`, polling; fails with `what` after
/// `timeout`. For conditions that have no event to await.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("not true within {timeout:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The path of `nats-server`: `$NATS_SERVER`, else the one on PATH, else
/// Debian's location.
pub fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return p.into();
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join("nats-server");
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from("/usr/sbin/nats-server")
}

/// A nats-server of 2.11 or later (read markers beside the inbox, batched
/// direct gets): `$NATS_SERVER_NEWER`, else the one `scripts/install-nats.sh`
/// puts under the workspace's `target/`. Panics, saying how to get one, when
/// there is neither: a test that asks for it must not pass on an older one.
pub fn newer_nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER_NEWER") {
        return p.into();
    }
    let installed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/nats-venv/bin/nats-server");
    if installed.is_file() {
        return installed;
    }
    panic!(
        "this test needs nats-server 2.11 or later: run scripts/install-nats.sh \
         (scripts/test.sh does), or set NATS_SERVER_NEWER to one"
    );
}

/// A real `nats-server` with JetStream on a free port and a temp store;
/// alone, or one node of a cluster ([`NatsServer::start_cluster`]).
pub struct NatsServer {
    port: u16,
    bin: PathBuf,
    /// Arguments besides the port and the store: a cluster node's name and routes.
    extra: Vec<String>,
    // Before `dir`, which holds its log: fields drop in order.
    proc: ChildProcess,
    dir: TempDir,
}

impl NatsServer {
    pub fn start() -> Result<NatsServer> {
        Self::start_with(nats_server_bin())
    }

    /// One of 2.11 or later ([`newer_nats_server_bin`]).
    pub fn start_newer() -> Result<NatsServer> {
        Self::start_with(newer_nats_server_bin())
    }

    fn start_with(bin: PathBuf) -> Result<NatsServer> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let proc = Self::spawn(&bin, port, &[], &dir)?;
        Ok(NatsServer {
            port,
            bin,
            extra: Vec::new(),
            proc,
            dir,
        })
    }

    /// A cluster of `n` nodes with JetStream, joined by routes on loopback;
    /// returns once every node knows JetStream's meta leader (a stream with
    /// 3 replicas can be created). nats-server 2.9 sometimes starts a
    /// cluster whose meta group never elects a leader (its routes raced
    /// into duplicates); such a cluster is stopped and started afresh, up to
    /// three times.
    pub fn start_cluster(n: usize) -> Result<Vec<NatsServer>> {
        let mut failure = None;
        for attempt in 1..=3 {
            match Self::try_cluster(n) {
                Ok(nodes) => return Ok(nodes),
                Err(e) => {
                    eprintln!(
                        "a NATS cluster of {n} did not elect a JetStream leader (attempt {attempt} of 3): {e:#}"
                    );
                    failure = Some(e);
                }
            }
        }
        Err(failure.expect("three attempts"))
    }

    fn try_cluster(n: usize) -> Result<Vec<NatsServer>> {
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let all_routes = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        let mut monitors = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let dir = tempfile::tempdir()?;
            let port = free_port();
            let monitor = free_port();
            let extra = vec![
                "--server_name".to_string(),
                format!("n{i}"),
                "--cluster_name".to_string(),
                "herald-test".to_string(),
                "--cluster".to_string(),
                format!("nats://127.0.0.1:{route}"),
                "--routes".to_string(),
                all_routes.clone(),
                // Where the test asks each node whom it knows as the leader.
                "-m".to_string(),
                monitor.to_string(),
            ];
            let bin = nats_server_bin();
            let proc = Self::spawn(&bin, port, &extra, &dir)?;
            nodes.push(NatsServer {
                port,
                bin,
                extra,
                proc,
                dir,
            });
            monitors.push(SocketAddr::from(([127, 0, 0, 1], monitor)));
        }
        for (node, monitor) in nodes.iter_mut().zip(monitors) {
            node.proc.wait_until(
                "its JetStream cluster had a leader",
                Duration::from_secs(20),
                || meta_leader(monitor).is_some(),
            )?;
        }
        Ok(nodes)
    }

    /// Starts nats-server on `port` and waits until it listens.
    fn spawn(
        bin: &std::path::Path,
        port: u16,
        extra: &[String],
        dir: &TempDir,
    ) -> Result<ChildProcess> {
        let mut cmd = Command::new(bin);
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path().join("store"))
            .args(extra);
        let mut proc = ChildProcess::spawn("nats-server", cmd, dir.path().join("nats.log"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        proc.wait_listening(addr, Duration::from_secs(10))?;
        Ok(proc)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `kill -9`: no goodbye to clients.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Its process id, for a test that stops it (`SIGSTOP`) as a stalled
    /// server would be.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.proc = Self::spawn(&self.bin, self.port, &self.extra, &self.dir)?;
        Ok(())
    }
}

/// The JetStream meta leader that the nats-server monitoring at `monitor`
/// names in `/jsz`, if it knows one.
fn meta_leader(monitor: SocketAddr) -> Option<String> {
    let (status, body) = http_get(monitor, "/jsz").ok()?;
    if status != 200 {
        return None;
    }
    let cluster = &body[body.find("\"meta_cluster\"")?..];
    let after = &cluster[cluster.find("\"leader\"")? + "\"leader\"".len()..];
    let value = after.trim_start().strip_prefix(':')?.trim_start();
    let name = value.strip_prefix('"')?.split('"').next()?;
    (!name.is_empty()).then(|| name.to_string())
}

/// The `herald` binary under test: `$HERALD_BIN`, else `herald` next to the
/// test executable's `deps/` folder (where `cargo test --workspace` builds it).
pub fn herald_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HERALD_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let bin = dir.join("herald");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --bin herald` or the whole `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// One running `herald <subcommand>` process.
pub struct Herald {
    proc: ChildProcess,
    _dir: TempDir,
    /// The HTTP address with `/healthz`, `/readyz` and `/metrics`.
    pub http: SocketAddr,
}

impl Herald {
    /// Runs `herald <args>` and waits until its `/readyz` (at `http`) says ready.
    pub fn start(name: &str, args: &[String], http: SocketAddr) -> Result<Herald> {
        Herald::start_until(name, args, http, || {
            matches!(http_get(http, "/readyz"), Ok((200, _)))
        })
    }

    /// Runs `herald <args>` and waits until `ready` holds (for a process
    /// whose `/readyz` plain HTTP cannot ask, as behind TLS).
    pub fn start_until(
        name: &str,
        args: &[String],
        http: SocketAddr,
        ready: impl FnMut() -> bool,
    ) -> Result<Herald> {
        let dir = tempfile::tempdir()?;
        let mut cmd = Command::new(herald_bin());
        cmd.args(args)
            .env("RUST_LOG", "info,herald=debug")
            .env_remove("HERALD_CONFIG");
        let mut proc = ChildProcess::spawn(name, cmd, dir.path().join("herald.log"))?;
        proc.wait_until("it was ready", Duration::from_secs(20), ready)?;
        Ok(Herald {
            proc,
            _dir: dir,
            http,
        })
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM, then `kill -9` after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        self.proc.terminate(grace);
    }

    /// Sends `sig` (`-TERM`, `-STOP`, ...) and returns at once.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.proc.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {}", self.proc.pid());
    }

    /// How it ended, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.exited()
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        self.proc.output()
    }

    /// The process id (to read its memory from /proc).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}
