//! Deploys users never notice, on a 3-node NATS cluster with 3-replica
//! durable streams: every edge in turn is stopped (SIGTERM) and replaced
//! while 300 clients sit in a durable and an ephemeral room and a backend
//! publishes steadily; and one NATS node killed with `kill -9` while a
//! durable room is being published to.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use herald_client::{Client, ClientError};
use herald_proto::v1::{PublishRequest, router_client::RouterClient};
use herald_test_support::eventually;
use serde_json::{Value, json};
use tonic::transport::Channel;

const CONFIG: &str = r#"
[namespaces.doc]
durable = { history_size = 100000, history_ttl = "1h" }

[namespaces.chat]
"#;

const DURABLE: &str = "doc:roll";
const EPHEMERAL: &str = "chat:roll";
const CLIENTS: usize = 300;
const WINDOW: Duration = Duration::from_secs(2);

/// The two tests here each run a 3-node NATS cluster, edges and hundreds of
/// clients; side by side on a 2-core machine they starve each other's
/// clients, and the timings this file checks (clients told to move spread
/// over the drain window) would measure the starvation instead. One at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn spec(config: &[String], edges: usize) -> Spec {
    Spec {
        edges,
        presences: 2,
        nats_nodes: 3,
        common: [config, &["--drain-delay".to_string(), "500ms".to_string()]].concat(),
        edge_args: vec![
            "--drain-window".into(),
            format!("{}ms", WINDOW.as_millis()),
            "--stream-replicas".into(),
            "3".into(),
        ],
        router_args: vec!["--stream-replicas".into(), "3".into()],
        ..Spec::default()
    }
}

/// What one client lived through.
#[derive(Default)]
struct Lived {
    /// Durable messages in arrival order: (offset, data).
    durable: Vec<(u64, Value)>,
    /// When each `disconnect` arrived, and from which edge.
    told: Vec<(Instant, usize)>,
    /// Connections that ended without a close frame.
    abrupt: usize,
    /// Connects that failed (an edge between its old and new process, or
    /// too slow on a loaded machine), and why.
    refused: Vec<String>,
}

/// A client as the protocol asks it to behave: on `disconnect` with
/// `reconnect`, wait `reconnect_after_ms`, connect to another edge and join
/// again with `since` (durable) until `end` arrives in the durable room.
async fn device(
    urls: Vec<String>,
    mut edge: usize,
    user: String,
    joined: Arc<AtomicUsize>,
    lived: Arc<Mutex<Lived>>,
) {
    let mut since: Option<(String, u64)> = None;
    loop {
        let client = match Client::connect(&urls[edge], &token(&user)).await {
            Ok((client, _)) => client,
            Err(e) => {
                lived
                    .lock()
                    .unwrap()
                    .refused
                    .push(format!("edge {edge}: {e}"));
                edge = (edge + 1) % urls.len();
                continue;
            }
        };
        let mut join = json!({"op":"join","room":DURABLE});
        if let Some((epoch, offset)) = &since {
            join["since"] = json!({"epoch": epoch, "offset": offset});
        }
        let reply = client.request(join).await.expect("join answered");
        assert_eq!(reply["op"], "ok", "{user}: join {reply}");
        let epoch = reply["epoch"].as_str().unwrap().to_string();
        if since.is_none() {
            since = Some((epoch.clone(), reply["offset"].as_u64().unwrap()));
        }
        ok(&client, json!({"op":"join","room":EPHEMERAL})).await;
        joined.fetch_add(1, Ordering::SeqCst);
        let mut wait_before_reconnect = Duration::ZERO;
        loop {
            match client.next_frame(Duration::from_secs(60)).await {
                Ok(Some(f)) if f["op"] == "message" && f["room"] == DURABLE => {
                    let offset = f["offset"].as_u64().unwrap();
                    since = Some((epoch.clone(), offset));
                    lived
                        .lock()
                        .unwrap()
                        .durable
                        .push((offset, f["data"].clone()));
                    if f["data"] == "end" {
                        joined.fetch_sub(1, Ordering::SeqCst);
                        return;
                    }
                }
                Ok(Some(f)) if f["op"] == "disconnect" => {
                    assert_eq!(f["code"], 1012, "{user}: {f}");
                    assert_eq!(f["reconnect"], true, "{user}: {f}");
                    lived.lock().unwrap().told.push((Instant::now(), edge));
                    wait_before_reconnect =
                        Duration::from_millis(f["reconnect_after_ms"].as_u64().unwrap_or(0));
                }
                Ok(Some(_)) => {}
                Ok(None) => panic!("{user}: nothing for 60 s"),
                Err(ClientError::Closed { code, .. }) => {
                    if code.is_none() {
                        lived.lock().unwrap().abrupt += 1;
                    }
                    break;
                }
                Err(e) => panic!("{user}: {e}"),
            }
        }
        joined.fetch_sub(1, Ordering::SeqCst);
        // The protocol's hint, not a test's guess.
        tokio::time::sleep(wait_before_reconnect).await;
        edge = (edge + 1) % urls.len();
    }
}

/// Publishes `data` to the durable room with `key`, again with the same key
/// until the answer is OK; returns the offset.
async fn publish_surely(router: &mut RouterClient<Channel>, data: Value, key: &str) -> u64 {
    loop {
        let mut req = tonic::Request::new(PublishRequest {
            room: DURABLE.into(),
            data: data.to_string(),
            key: key.into(),
        });
        req.set_timeout(Duration::from_secs(15));
        match router.publish(req).await {
            Ok(r) => return r.into_inner().offset,
            Err(s) => {
                assert!(
                    matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ),
                    "publish {key}: {s:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_edge_loses_nothing_and_shows_nobody_offline() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (_f, config) = config_file(CONFIG);
    let mut cluster = Cluster::start_spec(spec(&config, 3));
    let urls: Vec<String> = (0..3).map(|i| cluster.ws(i)).collect();
    let users: Vec<String> = (0..CLIENTS).map(|i| format!("roller-{i}")).collect();
    let watched = watch(
        cluster.presence().await,
        &[EPHEMERAL],
        &users.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let joined = Arc::new(AtomicUsize::new(0));
    let mut devices = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let lived = Arc::new(Mutex::new(Lived::default()));
        devices.push((
            lived.clone(),
            tokio::spawn(device(
                urls.clone(),
                i % 3,
                user.clone(),
                joined.clone(),
                lived,
            )),
        ));
    }
    let all_joined = || async { (joined.load(Ordering::SeqCst) == CLIENTS).then_some(()) };
    eventually(Duration::from_secs(60), "every client joined", all_joined).await;
    // Online events of the first connects are over before counting starts.
    eventually(WAIT, "every user online", || async {
        let n = watched
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.event == "online")
            .count();
        (n == CLIENTS).then_some(())
    })
    .await;

    // A backend publishing steadily, each message retried with its key until OK.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<BTreeMap<u64, u64>>> = Arc::default();
    let publisher = {
        let (stop, acked, mut router) = (stop.clone(), acked.clone(), cluster.router().await);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                i += 1;
                let offset = publish_surely(&mut router, json!(i), &format!("m{i}")).await;
                acked.lock().unwrap().insert(i, offset);
                let _ = router
                    .publish(publish_request(EPHEMERAL, i.to_string()))
                    .await;
            }
        })
    };

    let mut restarts = Vec::new();
    for i in 0..3 {
        eventually(WAIT, "messages flow", || async {
            (acked.lock().unwrap().len() >= 20 * (i + 1)).then_some(())
        })
        .await;
        let started = Instant::now();
        cluster.replace_edge(
            i,
            &format!("edge-{i}-new"),
            WINDOW + Duration::from_secs(15),
        );
        restarts.push((i, started));
        eventually(Duration::from_secs(30), "every client back", all_joined).await;
    }
    stop.store(true, Ordering::SeqCst);
    publisher.await.unwrap();
    let mut router = cluster.router().await;
    let end = publish_surely(&mut router, json!("end"), "end").await;

    let acked = acked.lock().unwrap().clone();
    let mut expected: Vec<(u64, Value)> = acked.iter().map(|(i, o)| (*o, json!(i))).collect();
    expected.push((end, json!("end")));
    let mut abrupt = 0;
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    let mut told: Vec<(Instant, usize)> = Vec::new();
    for (user, (lived, task)) in users.iter().zip(devices) {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .unwrap_or_else(|_| panic!("{user} never received the end"))
            .unwrap();
        let lived = lived.lock().unwrap();
        assert_eq!(
            lived.durable, expected,
            "{user}: durable messages lost, repeated or out of order"
        );
        abrupt += lived.abrupt;
        for why in &lived.refused {
            *refused.entry(why.clone()).or_default() += 1;
        }
        told.extend(&lived.told);
    }
    for (edge, started) in &restarts {
        let times: Vec<Duration> = told
            .iter()
            .filter(|(at, e)| e == edge && at > started)
            .map(|(at, _)| *at - *started)
            .collect();
        let (first, last) = (
            times.iter().min().copied().unwrap_or_default(),
            times.iter().max().copied().unwrap_or_default(),
        );
        eprintln!(
            "edge {edge}: {} clients told to move, from {first:?} to {last:?} after SIGTERM (delay 500ms, window {WINDOW:?})",
            times.len()
        );
        assert!(
            last - first >= WINDOW / 2,
            "edge {edge}'s clients were not spread over the window: {first:?} to {last:?}"
        );
    }
    let offline: Vec<_> = watched
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.event == "offline")
        .cloned()
        .collect();
    eprintln!(
        "rolling restart: {} durable messages, {} moves; connects that failed on the way: {refused:?}",
        expected.len(),
        told.len()
    );
    assert!(offline.is_empty(), "offline events: {offline:?}");
    assert_eq!(abrupt, 0, "connections closed without a close frame");
}

/// One NATS node of three is killed with `kill -9` while a backend publishes
/// to a durable room with 3 replicas: every acknowledged message is kept and
/// delivered once, and the services carry on without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_killed_loses_no_acknowledged_durable_message() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (_f, config) = config_file(CONFIG);
    let mut cluster = Cluster::start_spec(spec(&config, 2));
    let members = [
        connect(&cluster.ws(0), "kim").await,
        connect(&cluster.ws(1), "kai").await,
    ];
    for m in &members {
        ok(m, json!({"op":"join","room":DURABLE})).await;
    }
    let mut router = cluster.router().await;
    let mut acked = Vec::new();
    for i in 0..40u64 {
        acked.push((
            publish_surely(&mut router, json!(i), &format!("k{i}")).await,
            json!(i),
        ));
    }
    cluster.nats.kill();
    for i in 40..120u64 {
        acked.push((
            publish_surely(&mut router, json!(i), &format!("k{i}")).await,
            json!(i),
        ));
    }
    for m in &members {
        let mut got = Vec::new();
        while got.len() < acked.len() {
            let f = m
                .recv_op("message", Duration::from_secs(20))
                .await
                .expect("every acknowledged message arrives");
            got.push((f["offset"].as_u64().unwrap(), f["data"].clone()));
        }
        assert_eq!(got, acked, "lost, repeated or out of order");
        no_more_messages(m).await;
    }
    assert!(cluster.router.exited().is_none(), "the router exited");
    for e in &mut cluster.edges {
        assert!(e.exited().is_none(), "an edge exited");
    }
}
