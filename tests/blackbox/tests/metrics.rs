//! `/metrics` after a scripted scenario: a cluster (two edges, a router, a
//! presence service) serves clients that join and publish, the API publishes
//! (one call fails), one client goes silent and one reads too slowly; each
//! process's `/metrics` is scraped, parsed, and its counters, gauges and
//! histogram counts checked against what the scenario did. And every query
//! of the Grafana dashboards names only metrics a running cluster exports.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use herald_proto::v1::UserStatusRequest;
use herald_test_support::{eventually, http_get};
use serde_json::{Value, json};

const CONFIG: &str = r#"
[namespaces.doc]
durable = { history_size = 1000, history_ttl = "1h" }

[namespaces.chat]
"#;

/// A sample's labels.
type Labels = BTreeMap<String, String>;

/// One scrape: samples by name, each with its labels and value, and the
/// declared type of every family (`# TYPE`).
#[derive(Debug, Default)]
struct Scrape {
    samples: BTreeMap<String, Vec<(Labels, f64)>>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn of(addr: SocketAddr) -> Scrape {
        let (status, text) = http_get(addr, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "{text}");
        Scrape::parse(&text)
    }

    /// The Prometheus / OpenMetrics text format, as far as Herald writes it.
    fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape::default();
        for line in text.lines() {
            if let Some(decl) = line.strip_prefix("# TYPE ") {
                let (name, kind) = decl.split_once(' ').expect("# TYPE name kind");
                scrape.types.insert(name.into(), kind.into());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            // An exemplar (a trace id) follows ` # `.
            let line = line.split(" # ").next().unwrap();
            let (series, value) = line.rsplit_once(' ').expect("series value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            scrape
                .samples
                .entry(name.into())
                .or_default()
                .push((labels, value));
        }
        scrape
    }

    /// The sum of `name`'s samples that carry every label of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .get(name)
            .into_iter()
            .flatten()
            .filter(|(l, _)| {
                labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.samples.contains_key(name)
    }

    /// Every sample name this process exports, including those of families
    /// with no sample yet (a counter's `_total`, a histogram's `_bucket`,
    /// `_sum` and `_count`).
    fn names(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self.samples.keys().cloned().collect();
        for (name, kind) in &self.types {
            let suffixes: &[&str] = match kind.as_str() {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
        names
    }
}

fn parse_labels(text: &str) -> Labels {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, next)) = chars.next() {
                        value.push(next);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_string(), value);
        rest = &after[end..];
    }
    labels
}

/// A WebSocket client that does nothing after joining (no reads, no
/// pongs), on a plain socket: what the edge sees of a frozen or slow app.
struct RawClient {
    stream: TcpStream,
}

impl RawClient {
    fn connect(addr: SocketAddr, user: &str) -> RawClient {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            stream,
            "GET /ws?token={} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: herald.v1\r\n\r\n",
            token(user)
        )
        .unwrap();
        let mut client = RawClient { stream };
        client.read_until("\"connected\"");
        client
    }

    /// Reads until what arrived contains `what`.
    fn read_until(&mut self, what: &str) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains(what) {
            let n = self.stream.read(&mut buf).expect("read");
            assert!(
                n > 0,
                "closed before {what}: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
    }

    /// Sends a text frame (masked with a zero key, as a client must mask).
    fn send(&mut self, text: &str) {
        assert!(text.len() < 126);
        let mut frame = vec![0x81, 0x80 | text.len() as u8, 0, 0, 0, 0];
        frame.extend_from_slice(text.as_bytes());
        self.stream.write_all(&frame).unwrap();
    }

    /// Reads and drops everything until the edge closes the connection.
    fn wait_closed(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 65536];
        loop {
            assert!(Instant::now() < deadline, "not closed within {within:?}");
            match self.stream.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("read: {e}"),
            }
        }
    }
}

/// `n` messages of `room` arrive at `client`.
async fn receive(client: &herald_client::Client, room: &str, n: usize) {
    for i in 0..n {
        let m = client
            .recv_op("message", WAIT)
            .await
            .unwrap_or_else(|e| panic!("message {i} of {n} in {room}: {e}"));
        assert_eq!(m["room"], room, "{m}");
    }
}

fn start_cluster() -> (Cluster, tempfile::NamedTempFile) {
    let (file, config) = config_file(CONFIG);
    let mut cluster = Cluster::start_spec(Spec {
        edges: 0,
        common: config,
        ..Spec::default()
    });
    // edge-0 closes slow consumers early; edge-1 closes silent clients early.
    cluster.add_edge_with("edge-0", &["--outbound-queue".into(), "16".into()]);
    cluster.add_edge_with(
        "edge-1",
        &[
            "--heartbeat".into(),
            "1s".into(),
            "--idle-timeout".into(),
            "2s".into(),
        ],
    );
    (cluster, file)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_a_scripted_scenario_did() {
    let (cluster, _config) = start_cluster();
    let alice = connect(&cluster.ws(0), "alice").await;
    let bob = connect(&cluster.ws(1), "bob").await;
    let carol = connect(&cluster.ws(1), "carol").await;
    for c in [&alice, &bob, &carol] {
        ok(c, json!({"op":"join","room":"chat:lobby"})).await;
    }
    for c in [&alice, &bob] {
        ok(c, json!({"op":"join","room":"doc:notes"})).await;
    }

    // 5 client publishes and 3 API publishes to chat:lobby, 2 API publishes
    // to doc:notes, one API publish refused.
    for i in 0..5 {
        ok(&alice, json!({"op":"publish","room":"chat:lobby","data":i})).await;
    }
    let mut router = cluster.router().await;
    for i in 0..3 {
        router
            .publish(publish_request("chat:lobby", i.to_string()))
            .await
            .expect("publish");
    }
    let refused = router
        .publish(publish_request("no namespace", "1"))
        .await
        .expect_err("a room without a namespace is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    for i in 0..2 {
        router
            .publish(publish_request("doc:notes", i.to_string()))
            .await
            .expect("durable publish");
    }
    for c in [&alice, &bob, &carol] {
        receive(c, "chat:lobby", 8).await;
    }
    for c in [&alice, &bob] {
        receive(c, "doc:notes", 2).await;
    }
    let members = ok(&alice, json!({"op":"presence","room":"chat:lobby"})).await;
    assert_eq!(member_users(&members), ["alice", "bob", "carol"]);
    let status = cluster
        .presence()
        .await
        .user_status(UserStatusRequest {
            users: vec!["alice".into()],
        })
        .await
        .expect("UserStatus")
        .into_inner();
    assert!(status.users[0].online);

    // Each edge wrote 10 messages (8 + 2), observed once each whatever the
    // member count; deliveries count members.
    let edges: Vec<Scrape> = cluster.edge_addrs.iter().map(|a| Scrape::of(*a)).collect();
    for (i, edge) in edges.iter().enumerate() {
        assert_eq!(
            edge.sum("herald_edge_publish_to_write_seconds_count", &[]),
            10.0,
            "edge-{i}: {edge:?}"
        );
        assert_eq!(
            edge.sum(
                "herald_edge_publish_to_write_seconds_bucket",
                &[("le", "+Inf")]
            ),
            10.0
        );
        assert_eq!(edge.sum("herald_broker_connected", &[]), 1.0);
        assert!(edge.sum("herald_process_resident_memory_bytes", &[]) > 1e6);
        assert!(edge.has("herald_edge_outbound_queued_frames"));
        assert!(edge.has("herald_edge_outbound_queue_max_frames"));
        assert!(edge.has("herald_edge_outbound_queued_bytes"));
    }
    let [edge0, edge1] = &edges[..] else {
        unreachable!()
    };
    // alice's member list was one NATS request to presence.
    assert!(edge0.sum("herald_broker_request_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(
        edge0.sum("herald_edge_messages_out_total", &[("namespace", "chat")]),
        8.0
    );
    assert_eq!(
        edge1.sum("herald_edge_messages_out_total", &[("namespace", "chat")]),
        16.0
    );
    assert_eq!(
        edge0.sum("herald_edge_messages_out_total", &[("namespace", "doc")]),
        2.0
    );
    assert_eq!(
        edge1.sum("herald_edge_messages_out_total", &[("namespace", "doc")]),
        2.0
    );
    assert_eq!(
        edge0.sum("herald_edge_messages_in_total", &[("namespace", "chat")]),
        5.0
    );
    assert_eq!(edge1.sum("herald_edge_messages_in_total", &[]), 0.0);
    assert_eq!(edge0.sum("herald_edge_connections", &[]), 1.0);
    assert_eq!(edge1.sum("herald_edge_connections", &[]), 2.0);

    let router_metrics = Scrape::of(cluster.router.http);
    let publishes = |code| {
        router_metrics.sum(
            "herald_grpc_server_handling_seconds_count",
            &[
                ("grpc_service", "herald.v1.Router"),
                ("grpc_method", "Publish"),
                ("grpc_code", code),
            ],
        )
    };
    assert_eq!(publishes("OK"), 5.0, "{router_metrics:?}");
    assert_eq!(publishes("InvalidArgument"), 1.0);
    assert_eq!(
        router_metrics.sum("herald_router_messages_in_total", &[("namespace", "chat")]),
        3.0
    );
    assert_eq!(
        router_metrics.sum("herald_router_messages_in_total", &[("namespace", "doc")]),
        2.0
    );
    assert_eq!(
        router_metrics.sum("herald_durable_append_duration_seconds_count", &[]),
        2.0
    );
    assert_eq!(router_metrics.sum("herald_broker_connected", &[]), 1.0);

    let presence = Scrape::of(cluster.presences[0].http);
    assert_eq!(
        presence.sum(
            "herald_grpc_server_handling_seconds_count",
            &[
                ("grpc_service", "herald.v1.Presence"),
                ("grpc_method", "UserStatus"),
                ("grpc_code", "OK"),
            ]
        ),
        1.0,
        "{presence:?}"
    );
    assert_eq!(presence.sum("herald_presence_connections", &[]), 3.0);
    assert_eq!(presence.sum("herald_presence_users", &[]), 3.0);
    assert_eq!(presence.sum("herald_presence_rooms", &[]), 2.0);
    assert_eq!(presence.sum("herald_broker_connected", &[]), 1.0);

    // A client that sends nothing is closed by edge-1 with 4010.
    let mut silent = RawClient::connect(cluster.edge_addrs[1], "dan");
    silent.wait_closed(WAIT);
    eventually(WAIT, "the idle close counted", || async {
        let edge1 = Scrape::of(cluster.edge_addrs[1]);
        (edge1.sum("herald_edge_disconnects_total", &[("code", "4010")]) == 1.0).then_some(())
    })
    .await;

    // A client that stops reading is closed by edge-0 with 4009 once 16
    // frames wait for it (after the kernel's buffers filled).
    let mut slow = RawClient::connect(cluster.edge_addrs[0], "erin");
    slow.send(r#"{"op":"join","id":1,"room":"chat:slow"}"#);
    slow.read_until("\"ok\"");
    let big = format!("\"{}\"", "x".repeat(200_000));
    let mut closed = false;
    for _ in 0..200 {
        router
            .publish(publish_request("chat:slow", big.clone()))
            .await
            .expect("publish to the slow room");
        let edge0 = Scrape::of(cluster.edge_addrs[0]);
        if edge0.sum("herald_edge_disconnects_total", &[("code", "4009")]) == 1.0 {
            closed = true;
            break;
        }
    }
    assert!(closed, "the slow consumer was not closed with 4009");
    drop(slow);
    drop(silent);
}

#[tokio::test(flavor = "multi_thread")]
async fn herald_dev_declares_each_metric_once() {
    // The edge, the router's API and the broker share one registry there: a
    // name registered twice would make Prometheus refuse the whole scrape.
    let dev = Dev::start();
    let (status, text) = http_get(dev.ws_addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{text}");
    let mut seen = BTreeSet::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = line.split(' ').next().unwrap();
        assert!(
            seen.insert(name.to_string()),
            "{name} declared twice:\n{text}"
        );
    }
    assert!(
        seen.contains("herald_edge_publish_to_write_seconds"),
        "{text}"
    );
    assert!(seen.contains("herald_router_published"), "{text}");
}

/// The metric names a PromQL query mentions: every `herald_` identifier
/// (Herald's dashboards query nothing else).
fn metric_names(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = query;
    while let Some(at) = rest.find("herald_") {
        let before = rest[..at].chars().last();
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        // Not inside another identifier or a quoted label value.
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '"') {
            names.push(tail[..len].to_string());
        }
        rest = &tail[len..];
    }
    names
}

/// Every query string of a dashboard: panel targets' `expr`, and template
/// variables' `query` (a string, or `{ "query": ... }`).
fn queries(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query", Value::String(q)) => out.push(q.clone()),
                    _ => queries(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_dashboards_query_is_exported() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/herald/dashboards");
    let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("charts/herald/dashboards") {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        files += 1;
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("dashboard JSON");
        let mut found = Vec::new();
        queries(&dashboard, &mut found);
        assert!(!found.is_empty(), "{} has no queries", path.display());
        for q in found {
            for name in metric_names(&q) {
                wanted
                    .entry(name)
                    .or_default()
                    .push(format!("{}: {q}", path.file_name().unwrap().display()));
            }
        }
    }
    assert!(files >= 2, "the overview and the per-edge dashboard");
    assert!(wanted.len() > 10, "too few metrics found: {wanted:?}");

    // A cluster that served a message: families with labels (by namespace,
    // by gRPC method) have no series before their first event.
    let (cluster, _config) = start_cluster();
    let alice = connect(&cluster.ws(0), "alice").await;
    ok(&alice, json!({"op":"join","room":"chat:a"})).await;
    ok(&alice, json!({"op":"publish","room":"chat:a","data":1})).await;
    cluster
        .router()
        .await
        .publish(publish_request("chat:a", "2"))
        .await
        .expect("publish");
    receive(&alice, "chat:a", 2).await;
    let mut exported = BTreeSet::new();
    for addr in cluster
        .edge_addrs
        .iter()
        .chain([&cluster.router.http, &cluster.presences[0].http])
    {
        exported.extend(Scrape::of(*addr).names());
    }
    let missing: Vec<_> = wanted
        .iter()
        .filter(|(name, _)| !exported.contains(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "dashboards query metrics no process exports:\n{missing:#?}\nexported: {exported:#?}"
    );
}
