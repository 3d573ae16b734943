//! The Socket.IO comparison peer (`bench/peers/socketio`, `src/socketio.rs`)
//! against the Redis on this machine: two server processes, Rust clients on
//! both, the Redis emitter publishing to a room. Speed is not asserted.
//!
//! Skips (and passes, saying why) when `node` or Redis is missing. Redis is
//! `$HERALD_BENCH_REDIS`, else redis://127.0.0.1:6379.
//!
//! Two ignored tests measure the peer (one run each, figures printed):
//!
//! ```sh
//! cargo test --release -p herald-bench --test socketio_peer -- --ignored --nocapture --test-threads 1
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use herald_bench::socketio::{self, SioClient, SioEvent, SocketIoPeer};
use serde_json::{Value, json};

fn redis_url() -> String {
    std::env::var("HERALD_BENCH_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The peer, or `None` (with a message) when this machine cannot run it.
fn start_peer(servers: usize) -> Option<SocketIoPeer> {
    let url = redis_url();
    if let Some(why) = socketio::unavailable(&url) {
        eprintln!("SKIPPED: the Socket.IO peer cannot run here: {why}");
        return None;
    }
    Some(SocketIoPeer::start(servers, &url).expect("start the Socket.IO peer"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn source(i: usize) -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 16) as u8)))
}

#[test]
fn two_servers_deliver_every_emitted_message_to_every_member() {
    let Some(mut peer) = start_peer(2) else {
        return;
    };
    let urls = peer.urls();
    assert_eq!(urls.len(), 2);
    runtime().block_on(async {
        // Per server: two members that join at connect (auth.rooms), two that
        // join with the `join` event, one that stays out of the room.
        let mut members = Vec::new();
        let mut outsider_events = Vec::new();
        let mut outsiders = Vec::new();
        for (s, url) in urls.iter().enumerate() {
            for k in 0..5 {
                let user = format!("u{s}-{k}");
                let (on_event, rx) = socketio::event_channel();
                let auth = if k < 2 {
                    json!({"token": peer.token(&user), "rooms": "other,bench-room"})
                } else {
                    json!({"token": peer.token(&user)})
                };
                let client = SioClient::connect(url, &auth, source(s * 5 + k), on_event)
                    .await
                    .unwrap_or_else(|e| panic!("{user} connect to {url}: {e}"));
                assert!(!client.sid().is_empty());
                assert!(!client.engine_sid().is_empty());
                assert_eq!(client.local_addr().ip(), source(s * 5 + k).unwrap());
                match k {
                    0 | 1 => members.push((user, client, rx)),
                    2 | 3 => {
                        client.join("bench-room").await.expect("join");
                        members.push((user, client, rx));
                    }
                    _ => {
                        outsiders.push(client);
                        outsider_events.push(rx);
                    }
                }
            }
        }
        let ack = members[0]
            .1
            .emit_with_ack("join", &[json!(["x", "y"])], Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(ack, vec![json!({"ok": true, "rooms": ["x", "y"]})]);

        let report = peer
            .emit("bench-room", 40.0, Duration::from_millis(500))
            .await
            .expect("emitter");
        assert_eq!(report.sent, 20, "{report:?}");
        assert!(report.elapsed >= Duration::from_millis(450), "{report:?}");

        for (user, client, rx) in &mut members {
            let mut seqs = Vec::new();
            while seqs.len() < report.sent as usize {
                let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                    .await
                    .unwrap_or_else(|_| panic!("{user} got only {seqs:?}"))
                    .expect("events");
                assert_eq!(event.name, "msg");
                assert!(event.latency().is_some(), "{event:?}");
                assert_eq!(event.data()["pad"], "");
                seqs.push(event.data()["seq"].as_u64().unwrap());
            }
            let expected: Vec<u64> = (0..report.sent).collect();
            assert_eq!(seqs, expected, "{user}: lost, duplicated or out of order");
            assert_eq!(client.violation(), None);
        }
        // Messages reach the members of the other server too: had the
        // adapter failed, half the members would have timed out above.
        for rx in &mut outsider_events {
            assert!(
                rx.try_recv().is_err(),
                "a client outside the room got a message"
            );
        }
        for (_, client, _) in members {
            client.close().await.expect("close");
        }
        for client in outsiders {
            client.close().await.expect("close");
        }
    });
    assert_eq!(peer.exited(), Vec::<String>::new());
    assert_eq!(peer.log_problems(), Vec::<String>::new());
    let pids = peer.pids();
    assert_eq!(pids.len(), 2);
    for (_, pid) in &pids {
        assert!(rss_bytes(*pid).is_some());
    }
    drop(peer);
    for (name, pid) in pids {
        assert!(
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.contains(") Z")),
            "{name} still runs after drop"
        );
    }
}

#[test]
fn a_refused_or_wrong_url_is_an_error() {
    let Some(peer) = start_peer(1) else {
        return;
    };
    runtime().block_on(async {
        let addr = peer.addrs()[0];
        let auth = json!({"token": peer.token("u")});
        let connect = |url: String| {
            let auth = auth.clone();
            async move { SioClient::connect(&url, &auth, None, socketio::ignore_events()).await }
        };
        // Nothing listens there.
        let closed = herald_test_support::free_addr();
        let err = connect(socketio::engine_url(closed)).await.unwrap_err();
        assert!(matches!(err, herald_client::ClientError::Io(_)), "{err}");
        // Other paths are not upgraded (Node drops the socket).
        let err = connect(format!("ws://{addr}/nope")).await.unwrap_err();
        assert!(
            matches!(
                err,
                herald_client::ClientError::Rejected { .. }
                    | herald_client::ClientError::Connect(_)
            ),
            "{err}"
        );
        // The right URL works.
        let client = connect(socketio::engine_url(addr)).await.unwrap();
        client.close().await.unwrap();
    });
}

/// An HS256 token for `sub` signed with `secret`, expiring at `exp`.
fn token_signed(secret: &str, sub: &str, exp: u64) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[test]
fn a_connect_needs_a_token_the_servers_verify() {
    let Some(peer) = start_peer(1) else {
        return;
    };
    let url = peer.urls()[0].clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    runtime().block_on(async {
        let refused = |auth: Value| {
            let url = url.clone();
            async move {
                match SioClient::connect(&url, &auth, None, socketio::ignore_events()).await {
                    Ok(_) => panic!("{auth} was let in"),
                    Err(herald_client::ClientError::Protocol(why)) => why,
                    Err(e) => panic!("{auth}: {e}"),
                }
            }
        };
        let why = refused(json!({"user": "u1"})).await;
        assert_eq!(why, "connect refused: unauthorized: no token in auth.token");
        let why = refused(json!({"token": token_signed("not the secret", "u1", now + 60)})).await;
        assert_eq!(why, "connect refused: unauthorized: invalid signature");
        let why = refused(json!({"token": "not.a.jwt"})).await;
        assert!(why.starts_with("connect refused: unauthorized: "), "{why}");
        let why = refused(json!({"token": token_signed("x", "", now + 60)})).await;
        assert!(why.starts_with("connect refused: unauthorized: "), "{why}");

        // The peer's own token is let in, and the server knows its user.
        let client = SioClient::connect(
            &url,
            &json!({"token": peer.token("u1")}),
            None,
            socketio::ignore_events(),
        )
        .await
        .expect("a valid token");
        client.join("r").await.unwrap();
        client.close().await.unwrap();
    });
}

#[test]
fn clients_see_a_killed_server_close_their_connection() {
    let Some(mut peer) = start_peer(2) else {
        return;
    };
    runtime().block_on(async {
        let urls = peer.urls();
        let mut clients = Vec::new();
        for (s, url) in urls.iter().enumerate() {
            let auth = json!({"token": peer.token(&format!("k{s}"))});
            clients.push(
                SioClient::connect(url, &auth, source(s), socketio::ignore_events())
                    .await
                    .unwrap(),
            );
        }
        peer.kill_server(0).unwrap();
        let close = tokio::time::timeout(Duration::from_secs(5), clients[0].closed())
            .await
            .expect("the client of the killed server noticed");
        assert_eq!(
            close.code, None,
            "no close frame from a killed process: {close:?}"
        );
        assert!(clients[0].is_closed());
        // The other server's client goes on.
        assert!(!clients[1].is_closed());
        clients[1].join("still").await.unwrap();
    });
    assert_eq!(
        peer.exited(),
        Vec::<String>::new(),
        "a killed server is not a crash"
    );
}

#[test]
fn heartbeats_are_answered() {
    let url = redis_url();
    if let Some(why) = socketio::unavailable(&url) {
        eprintln!("SKIPPED: the Socket.IO peer cannot run here: {why}");
        return;
    }
    // The server pings every 200 ms and drops a client that has not answered
    // within 200 ms more.
    let peer = SocketIoPeer::start_with_env(
        1,
        &url,
        &[("PING_INTERVAL_MS", "200"), ("PING_TIMEOUT_MS", "200")],
    )
    .expect("start the Socket.IO peer");
    runtime().block_on(async {
        let (on_event, mut rx) = socketio::event_channel();
        let auth = json!({"token": peer.token("hb")});
        let client = SioClient::connect(&peer.urls()[0], &auth, None, on_event)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!client.is_closed(), "dropped despite answering pings");
        client.join("hb").await.expect("join after 7 heartbeats");
        assert!(rx.try_recv().is_err());
        client.close().await.unwrap();
    });
}

// ---------------------------------------------------------------------------
// Measurements (ignored; run one at a time, in release mode).

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// utime + stime in seconds.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(at) = stat.rfind(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = stat[at + 2..].split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Opens `n` connections to `urls` in turn, `parallel` at a time, each
/// joining `room` at connect if given.
async fn connect_many(
    peer: &SocketIoPeer,
    urls: &[String],
    n: usize,
    room: Option<&str>,
    on_event: &socketio::OnEvent,
) -> Vec<SioClient> {
    use futures::StreamExt;
    let clients: Vec<SioClient> = futures::stream::iter(0..n)
        .map(|i| {
            let url = urls[i % urls.len()].clone();
            let auth = match room {
                Some(r) => json!({"token": peer.token(&format!("u{i}")), "rooms": r}),
                None => json!({"token": peer.token(&format!("u{i}"))}),
            };
            let on_event = on_event.clone();
            async move {
                SioClient::connect(&url, &auth, source(i), on_event)
                    .await
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"))
            }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    clients
}

#[test]
#[ignore = "measurement: RSS per idle connection of one Socket.IO server"]
fn measure_idle_rss_per_connection() {
    let Some(peer) = start_peer(1) else {
        return;
    };
    let n: usize = std::env::var("SIO_IDLE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let pid = peer.pids()[0].1;
    let urls = peer.urls();
    runtime().block_on(async {
        // Warm up (JIT, buffers), then let the heap settle.
        let warm = connect_many(&peer, &urls, 100, Some("idle"), &socketio::ignore_events()).await;
        for c in warm {
            c.close().await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before = rss_bytes(pid).unwrap();
        let start = Instant::now();
        let clients = connect_many(&peer, &urls, n, Some("idle"), &socketio::ignore_events()).await;
        let connect_s = start.elapsed().as_secs_f64();
        // A small echo on each: the join ack.
        for c in &clients {
            c.join("idle-2").await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let after = rss_bytes(pid).unwrap();
        println!(
            "socketio idle: {n} connections (each in 2 rooms, one join ack) in {connect_s:.1} s; \
             server RSS {:.1} MiB -> {:.1} MiB: {:.2} KiB per connection",
            mib(before),
            mib(after),
            (after - before) as f64 / 1024.0 / n as f64
        );
        for c in clients {
            drop(c);
        }
    });
}

#[test]
#[ignore = "measurement: deliveries per second, 2 Socket.IO servers"]
fn measure_fanout_deliveries() {
    let Some(peer) = start_peer(2) else {
        return;
    };
    let members: usize = std::env::var("SIO_MEMBERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let rates: Vec<f64> = std::env::var("SIO_RATES")
        .unwrap_or_else(|_| "10,25,50,100".into())
        .split(',')
        .map(|r| r.parse().unwrap())
        .collect();
    let secs: f64 = std::env::var("SIO_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5.0);
    let urls = peer.urls();
    let pids = peer.pids();
    let redis = peer.redis_pid();

    let received = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap(),
    ));
    let on_event: socketio::OnEvent = {
        let received = received.clone();
        let hist = hist.clone();
        Arc::new(move |event: SioEvent| {
            received.fetch_add(1, Ordering::Relaxed);
            if let Some(l) = event.latency() {
                hist.lock()
                    .unwrap()
                    .saturating_record(l.as_micros().max(1) as u64);
            }
        })
    };
    runtime().block_on(async {
        let clients = connect_many(&peer, &urls, members, Some("fan"), &on_event).await;
        let mut results = BTreeMap::new();
        for &rate in &rates {
            tokio::time::sleep(Duration::from_secs(1)).await;
            received.store(0, Ordering::Relaxed);
            hist.lock().unwrap().reset();
            let cpu0: Vec<f64> = pids.iter().map(|(_, p)| cpu_s(*p)).collect();
            let redis0 = redis.map(cpu_s);
            let bench0 = cpu_s(std::process::id());
            let start = Instant::now();
            let report = peer
                .emit("fan", rate, Duration::from_secs_f64(secs))
                .await
                .unwrap();
            // Wait for the stragglers (at most 10 s after the emitter ended).
            let expected = report.sent * members as u64;
            let deadline = Instant::now() + Duration::from_secs(10);
            while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let wall = start.elapsed().as_secs_f64();
            let got = received.load(Ordering::Relaxed);
            let server_cpu: f64 = pids
                .iter()
                .zip(&cpu0)
                .map(|((_, p), c0)| cpu_s(*p) - c0)
                .sum();
            let redis_cpu = redis.zip(redis0).map(|(p, c0)| cpu_s(p) - c0);
            let bench_cpu = cpu_s(std::process::id()) - bench0;
            let h = hist.lock().unwrap();
            let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            let line = format!(
                "rate {rate}/s x {members} members: sent {} in {:.2} s, delivered {got}/{expected} \
                 ({:.0}/s over the emit time); latency ms p50 {:.2} p99 {:.2} p999 {:.2} max {:.2}; \
                 servers CPU {server_cpu:.2} s = {:.1} us/delivery; redis CPU {}; bench CPU {bench_cpu:.2} s; \
                 emitter CPU {:.2} s; wall {wall:.1} s",
                report.sent,
                report.elapsed.as_secs_f64(),
                got as f64 / report.elapsed.as_secs_f64(),
                ms(0.5),
                ms(0.99),
                ms(0.999),
                h.max() as f64 / 1000.0,
                server_cpu * 1e6 / got.max(1) as f64,
                redis_cpu.map_or("?".into(), |c| format!("{c:.2} s")),
                report.cpu_user_s + report.cpu_system_s,
            );
            println!("socketio fanout (2 servers): {line}");
            results.insert(rate.to_string(), Value::from(line));
        }
        for (name, pid) in &pids {
            println!("{name}: RSS {:.1} MiB", mib(rss_bytes(*pid).unwrap_or(0)));
        }
        drop(clients);
    });
}
