//! Acknowledgements that stay true across a nats-server that hangs
//! (`SIGSTOP`), is killed with `kill -9` and started again, under steady traffic from a client and from
//! `Router.Publish`, to an ephemeral and a durable room: every `ok` was
//! delivered to every member connected throughout, no `unavailable` one
//! was, and a durable publish retried with its key until `ok` is delivered
//! and stored exactly once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use herald_client::Client;
use herald_proto::v1::{HistoryRequest, PublishRequest, router_client::RouterClient};
use herald_test_support::{eventually, http_get};
use serde_json::{Value, json};
use tonic::transport::Channel;

// No rate limits: the publishers catch up in bursts after each outage.
const CONFIG: &str = r#"
[limits]
publish_per_second = 0
user_publish_per_second = 0

[namespaces.log]
durable = { history_size = 100000, history_ttl = "1h" }

[namespaces.chat]
"#;

const EPHEMERAL: &str = "chat:acks";
const DURABLE: &str = "log:acks";

/// How long a publisher waits for any one answer: longer than the store's
/// acknowledgement timeout, so that every answer is the server's own.
const ANSWER_WAIT: Duration = Duration::from_secs(15);

/// Time between two publishes of one publisher.
const PACE: Duration = Duration::from_millis(25);

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// What the publishers were told, by message id.
#[derive(Default)]
struct Told {
    /// Ephemeral messages answered `ok`.
    ok: BTreeSet<String>,
    /// Ephemeral messages answered `unavailable` (nothing was sent).
    unavailable: BTreeSet<String>,
    /// Ephemeral messages whose outcome the answer said was unknown.
    unknown: BTreeSet<String>,
    /// Durable messages, each retried with its key until `ok`: their offset.
    stored: BTreeMap<String, u64>,
    /// Every answer that was not `ok`, by kind ("ws unavailable", ...).
    refusals: BTreeMap<String, usize>,
    /// Ephemeral `ok`s since the server came back.
    ok_after_restart: usize,
}

/// One answer, as the test classifies it.
enum Answer {
    Ok(u64),
    Unavailable,
    Unknown,
}

impl Told {
    fn refused(&mut self, kind: String) {
        *self.refusals.entry(kind).or_default() += 1;
    }
}

/// Publishes through `publish` until `stop`, an ephemeral and a durable
/// message each round; a durable one not answered `ok` is sent again with
/// its key in the next rounds until it is (and before stopping).
async fn publish_steadily<F, Fut>(
    name: &'static str,
    told: Arc<Mutex<Told>>,
    restarted: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    mut publish: F,
) where
    F: FnMut(&'static str, String) -> Fut,
    Fut: Future<Output = Answer>,
{
    let mut tick = tokio::time::interval(PACE);
    let mut i = 0u64;
    let mut pending: Option<String> = None;
    while !stop.load(Ordering::SeqCst) || pending.is_some() {
        tick.tick().await;
        i += 1;
        let id = format!("{name}-e-{i}");
        match publish(EPHEMERAL, id.clone()).await {
            Answer::Ok(_) => {
                let mut t = told.lock().unwrap();
                t.ok.insert(id);
                if restarted.load(Ordering::SeqCst) {
                    t.ok_after_restart += 1;
                }
            }
            Answer::Unavailable => {
                let mut t = told.lock().unwrap();
                t.unavailable.insert(id);
                t.refused(format!("{name} ephemeral unavailable"));
            }
            Answer::Unknown => {
                let mut t = told.lock().unwrap();
                t.unknown.insert(id);
                t.refused(format!("{name} ephemeral outcome unknown"));
            }
        }
        // The durable message of this round, or the last one again with its
        // key until it is stored.
        let id = pending.take().unwrap_or_else(|| format!("{name}-d-{i}"));
        match publish(DURABLE, id.clone()).await {
            Answer::Ok(offset) => {
                told.lock().unwrap().stored.insert(id, offset);
            }
            Answer::Unavailable => {
                told.lock()
                    .unwrap()
                    .refused(format!("{name} durable unavailable"));
                pending = Some(id);
            }
            Answer::Unknown => {
                told.lock()
                    .unwrap()
                    .refused(format!("{name} durable outcome unknown"));
                pending = Some(id);
            }
        }
    }
}

async fn through_client(client: &Client, room: &'static str, id: String) -> Answer {
    let req = json!({"op":"publish","room":room,"data":id,"key":id});
    let reply = client
        .request_timeout(req, ANSWER_WAIT)
        .await
        .expect("the publishing client stays connected and is answered");
    match (reply["op"].as_str(), reply["code"].as_str()) {
        (Some("ok"), _) => Answer::Ok(reply["offset"].as_u64().unwrap_or(0)),
        (_, Some("unavailable")) => Answer::Unavailable,
        (_, Some("outcome_unknown")) => Answer::Unknown,
        _ => panic!("unexpected answer to publish {id}: {reply}"),
    }
}

async fn through_router(
    mut router: RouterClient<Channel>,
    room: &'static str,
    id: String,
) -> Answer {
    let mut req = tonic::Request::new(PublishRequest {
        room: room.into(),
        data: json!(id).to_string(),
        key: id.clone(),
    });
    req.set_timeout(ANSWER_WAIT);
    match router.publish(req).await {
        Ok(r) => Answer::Ok(r.into_inner().offset),
        Err(s) if s.code() == tonic::Code::Unavailable => Answer::Unavailable,
        Err(s) if s.code() == tonic::Code::DeadlineExceeded => Answer::Unknown,
        Err(s) => panic!("unexpected answer to Router.Publish {id}: {s:?}"),
    }
}

/// What one member received: ids by room, durable offsets in arrival order.
#[derive(Default, Debug)]
struct Received {
    ephemeral: BTreeSet<String>,
    durable: Vec<(u64, String)>,
}

/// Reads `member`'s frames until every id in `ends` arrived and nothing
/// more comes; fails on a `disconnect` (the member was to stay connected).
async fn receive_until(member: &Client, ends: &[&str]) -> Received {
    let mut got = Received::default();
    let mut missing: BTreeSet<&str> = ends.iter().copied().collect();
    loop {
        let wait = if missing.is_empty() {
            QUIET
        } else {
            Duration::from_secs(20)
        };
        let Some(frame) = member.next_frame(wait).await.expect("member connected") else {
            assert!(missing.is_empty(), "never received {missing:?}");
            return got;
        };
        assert_ne!(
            frame["op"], "disconnect",
            "a member was disconnected: {frame}"
        );
        if frame["op"] != "message" {
            continue;
        }
        let id = frame["data"].as_str().unwrap().to_string();
        missing.remove(id.as_str());
        match frame["room"].as_str() {
            Some(EPHEMERAL) => {
                got.ephemeral.insert(id);
            }
            Some(DURABLE) => got.durable.push((frame["offset"].as_u64().unwrap(), id)),
            other => panic!("message from {other:?}"),
        }
    }
}

/// Every stored message of `room`, page by page.
async fn history(router: &mut RouterClient<Channel>, room: &str) -> Vec<(u64, String)> {
    let mut all = Vec::new();
    let mut since = None;
    loop {
        let page = router
            .history(HistoryRequest {
                room: room.into(),
                since,
                limit: 500,
            })
            .await
            .unwrap()
            .into_inner();
        if page.messages.is_empty() {
            return all;
        }
        for m in &page.messages {
            let id: Value = serde_json::from_str(&m.data).unwrap();
            all.push((m.offset, id.as_str().unwrap().to_string()));
        }
        since = Some(herald_proto::v1::StreamPosition {
            epoch: page.epoch.clone(),
            offset: all.last().unwrap().0,
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_hold_across_a_nats_kill_and_restart() {
    let (_f, config) = config_file(CONFIG);
    let mut cluster = Cluster::start_with(2, &config);
    let mut members = Vec::new();
    for (i, name) in ["mia", "max"].iter().enumerate() {
        let m = connect(&cluster.ws(i), name).await;
        ok(&m, json!({"op":"join","room":EPHEMERAL})).await;
        ok(&m, json!({"op":"join","room":DURABLE})).await;
        members.push(m);
    }
    let writer = Arc::new(connect(&cluster.ws(0), "wes").await);
    let router = cluster.router().await;

    let told = Arc::new(Mutex::new(Told::default()));
    let restarted = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let ws = tokio::spawn({
        let writer = writer.clone();
        publish_steadily(
            "ws",
            told.clone(),
            restarted.clone(),
            stop.clone(),
            move |room, id| {
                let writer = writer.clone();
                async move { through_client(&writer, room, id).await }
            },
        )
    });
    let api = tokio::spawn({
        let router = router.clone();
        publish_steadily(
            "api",
            told.clone(),
            restarted.clone(),
            stop.clone(),
            move |room, id| through_router(router.clone(), room, id),
        )
    });

    eventually(WAIT, "traffic flows", || async {
        (told.lock().unwrap().ok.len() >= 40).then_some(())
    })
    .await;
    // The server hangs first, then dies: what was sent to it meanwhile is
    // lost, and whoever was told `ok` for it was lied to.
    signal(cluster.nats.pid(), "-STOP");
    for &edge in &cluster.edge_addrs {
        eventually(WAIT, "the edge notices the hang", || async {
            (!matches!(http_get(edge, "/readyz"), Ok((200, _)))).then_some(())
        })
        .await;
    }
    cluster.nats.kill();
    eventually(Duration::from_secs(10), "publishes are refused", || async {
        (told.lock().unwrap().unavailable.len() >= 4).then_some(())
    })
    .await;
    cluster.nats.restart().unwrap();
    restarted.store(true, Ordering::SeqCst);
    eventually(Duration::from_secs(30), "traffic flows again", || async {
        (told.lock().unwrap().ok_after_restart >= 40).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    ws.await.unwrap();
    api.await.unwrap();

    // Last words from each publisher: once they arrive, everything each
    // publisher sent before them has had its chance.
    let mut r = router.clone();
    for room in [EPHEMERAL, DURABLE] {
        r.publish(PublishRequest {
            room: room.into(),
            data: json!(format!("api-end-{room}")).to_string(),
            key: String::new(),
        })
        .await
        .unwrap();
        ok(
            &writer,
            json!({"op":"publish","room":room,"data":format!("ws-end-{room}")}),
        )
        .await;
    }
    let ends = [
        format!("api-end-{EPHEMERAL}"),
        format!("api-end-{DURABLE}"),
        format!("ws-end-{EPHEMERAL}"),
        format!("ws-end-{DURABLE}"),
    ];
    let ends: Vec<&str> = ends.iter().map(String::as_str).collect();

    let told = std::mem::take(&mut *told.lock().unwrap());
    eprintln!(
        "nats kill -9 and restart: {} ephemeral ok, {} unavailable, {} unknown; {} durable stored; refusals {:?}",
        told.ok.len(),
        told.unavailable.len(),
        told.unknown.len(),
        told.stored.len(),
        told.refusals
    );
    for (m, name) in members.iter().zip(["mia", "max"]) {
        let got = receive_until(m, &ends).await;
        for id in &told.ok {
            assert!(
                got.ephemeral.contains(id),
                "{name} never got acknowledged {id}"
            );
        }
        for id in &told.unavailable {
            assert!(
                !got.ephemeral.contains(id),
                "{name} got {id}, which was refused"
            );
        }
        let offsets: Vec<u64> = got.durable.iter().map(|(o, _)| *o).collect();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "{name}: durable offsets not rising: {offsets:?}"
        );
        let durable: BTreeMap<&str, u64> = got
            .durable
            .iter()
            .map(|(o, id)| (id.as_str(), *o))
            .collect();
        assert_eq!(
            durable.len(),
            got.durable.len(),
            "{name} got a durable message twice"
        );
        for (id, offset) in &told.stored {
            assert_eq!(
                durable.get(id.as_str()),
                Some(offset),
                "{name}: durable {id}"
            );
        }
        assert_eq!(
            durable.len(),
            told.stored.len() + 2,
            "{name} got durable messages nobody was told were stored"
        );
    }
    let mut r = router.clone();
    let stored = history(&mut r, DURABLE).await;
    let ids: BTreeSet<&str> = stored.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(
        ids.len(),
        stored.len(),
        "a durable message was stored twice"
    );
    for (id, offset) in &told.stored {
        assert!(
            stored.contains(&(*offset, id.clone())),
            "{id} not in the history"
        );
    }
    assert!(!told.unavailable.is_empty() && !told.ok.is_empty());
}
