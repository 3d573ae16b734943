//! Durable rooms: offsets, recovery on any edge with nothing lost or
//! repeated (also across kill -9 of an edge and a NATS restart), the offline
//! inbox with unread counts, idempotent publishes.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use herald_client::Client;
use herald_proto::v1::{PublishRequest, SendToUserRequest};
use herald_test_support::eventually;
use serde_json::{Value, json};

const CONFIG: &str = r#"
[namespaces.doc]
durable = { history_size = 1000, history_ttl = "1h" }

[namespaces.tiny]
durable = { history_size = 5, history_ttl = "1h" }

[namespaces.chat]
"#;

fn publish(room: &str, data: Value, key: &str) -> PublishRequest {
    PublishRequest {
        room: room.into(),
        data: data.to_string(),
        key: key.into(),
    }
}

/// Receives `n` messages of `room`; returns (offset, data) in arrival order.
async fn receive(client: &Client, n: usize) -> Vec<(u64, Value)> {
    let mut got = Vec::new();
    while got.len() < n {
        let m = client
            .recv_op("message", WAIT)
            .await
            .unwrap_or_else(|e| panic!("message {} of {n} did not arrive: {e}", got.len() + 1));
        got.push((m["offset"].as_u64().expect("an offset"), m["data"].clone()));
    }
    got
}

fn assert_rising(offsets: &[(u64, Value)]) {
    for w in offsets.windows(2) {
        assert!(w[0].0 < w[1].0, "offsets out of order: {offsets:?}");
    }
}

/// Recovery across edges: `first` sees 50 messages, goes away (killed edge or
/// closed connection), 50 more are published, and a new connection to
/// `second` recovers exactly those, in order, then the live ones.
async fn recovery_scenario(
    router: &mut RouterClient,
    first: &str,
    second: &str,
    lose_first: impl FnOnce(Client),
) {
    let c = connect(first, "rita").await;
    let joined = ok(&c, json!({"op":"join","room":"doc:1"})).await;
    let epoch = joined["epoch"].as_str().unwrap().to_string();
    assert!(!epoch.is_empty());
    for i in 0..50 {
        router
            .publish(publish("doc:1", json!(i), ""))
            .await
            .unwrap();
    }
    let seen = receive(&c, 50).await;
    assert_rising(&seen);
    assert_eq!(
        seen.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>(),
        (0..50).map(|i| json!(i)).collect::<Vec<_>>()
    );
    let last = seen.last().unwrap().0;
    lose_first(c);

    let mut missed_offsets = Vec::new();
    for i in 50..100 {
        let r = router
            .publish(publish("doc:1", json!(i), ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.epoch, epoch);
        missed_offsets.push(r.offset);
    }
    let back = connect(second, "rita").await;
    let rejoined = ok(
        &back,
        json!({"op":"join","room":"doc:1","since":{"epoch": epoch, "offset": last}}),
    )
    .await;
    assert_eq!(rejoined["recovered"], true, "{rejoined}");
    assert_eq!(rejoined["missed"], 50, "{rejoined}");
    let replayed = receive(&back, 50).await;
    assert_eq!(
        replayed.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
        missed_offsets
    );
    assert_eq!(
        replayed.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>(),
        (50..100).map(|i| json!(i)).collect::<Vec<_>>()
    );
    for i in 100..105 {
        router
            .publish(publish("doc:1", json!(i), ""))
            .await
            .unwrap();
    }
    let live = receive(&back, 5).await;
    assert!(live[0].0 > *missed_offsets.last().unwrap());
    assert_rising(&live);
    assert_eq!(
        live.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>(),
        (100..105).map(|i| json!(i)).collect::<Vec<_>>()
    );
    no_more_messages(&back).await;
}

#[tokio::test]
async fn a_client_recovers_on_another_edge_after_kill_9() {
    let (_f, config) = config_file(CONFIG);
    let mut cluster = Cluster::start_with(2, &config);
    let mut router = cluster.router().await;
    let (a, b) = (cluster.ws(0), cluster.ws(1));
    let edges = &mut cluster.edges;
    recovery_scenario(&mut router, &a, &b, |c| {
        edges[0].kill();
        drop(c);
    })
    .await;
}

#[tokio::test]
async fn recovery_works_in_the_all_in_one_mode() {
    let (_f, config) = config_file(CONFIG);
    let dev = Dev::start_with(&config);
    let mut router = dev.router().await;
    recovery_scenario(&mut router, &dev.ws(), &dev.ws(), drop).await;
}

#[tokio::test]
async fn recovery_from_before_the_retained_history_says_so() {
    let (_f, config) = config_file(CONFIG);
    let cluster = Cluster::start_with(1, &config);
    let mut router = cluster.router().await;
    let mut offsets = Vec::new();
    for i in 0..10 {
        offsets.push(
            router
                .publish(publish("tiny:t", json!(i), ""))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let c = connect(&cluster.ws(0), "tom").await;
    let r = ok(
        &c,
        json!({"op":"join","room":"tiny:t","since":{"epoch": offsets[0].epoch, "offset": offsets[0].offset}}),
    )
    .await;
    assert_eq!(r["recovered"], false, "{r}");
    // What is still kept (the last five) is delivered.
    let kept = receive(&c, 5).await;
    assert_eq!(
        kept.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
        offsets[5..].iter().map(|o| o.offset).collect::<Vec<_>>()
    );
    // Another epoch: nothing to recover from.
    let r = ok(
        &c,
        json!({"op":"join","room":"tiny:t","since":{"epoch": "not-this-one", "offset": 3}}),
    )
    .await;
    assert_eq!(
        (r["recovered"].as_bool(), r["missed"].as_u64()),
        (Some(false), Some(0))
    );
}

#[tokio::test]
async fn history_is_readable_by_clients_and_the_api() {
    let (_f, config) = config_file(CONFIG);
    let cluster = Cluster::start_with(1, &config);
    let mut router = cluster.router().await;
    let mut offsets = Vec::new();
    for i in 0..7 {
        offsets.push(
            router
                .publish(publish("doc:h", json!({"n": i}), ""))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let epoch = offsets[0].epoch.clone();
    let c = connect(&cluster.ws(0), "hal").await;
    let h = ok(&c, json!({"op":"history","room":"doc:h","since":{"epoch": epoch, "offset": offsets[2].offset},"limit":3})).await;
    assert_eq!(h["epoch"], epoch.as_str());
    let got: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(
        got,
        offsets[3..6].iter().map(|o| o.offset).collect::<Vec<_>>()
    );
    assert_eq!(h["messages"][0]["data"], json!({"n": 3}));
    assert_eq!(h["messages"][0]["from"], "server");
    refused(&c, json!({"op":"history","room":"chat:x"}), "not_found").await;

    let all = router
        .history(herald_proto::v1::HistoryRequest {
            room: "doc:h".into(),
            since: None,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.epoch, epoch);
    assert_eq!(all.messages.len(), 7);
    assert_eq!(all.messages[6].offset, offsets[6].offset);
    assert_eq!(all.messages[6].data, r#"{"n":6}"#);
    let e = router
        .history(herald_proto::v1::HistoryRequest {
            room: "chat:x".into(),
            since: None,
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn the_same_key_publishes_once() {
    let (_f, config) = config_file(CONFIG);
    let cluster = Cluster::start_with(1, &config);
    let mut router = cluster.router().await;
    let member = connect(&cluster.ws(0), "kim").await;
    ok(&member, json!({"op":"join","room":"doc:k"})).await;
    let first = router
        .publish(publish("doc:k", json!("once"), "order-17"))
        .await
        .unwrap()
        .into_inner();
    let again = router
        .publish(publish("doc:k", json!("once"), "order-17"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, again);
    let a = ok(
        &member,
        json!({"op":"publish","room":"doc:k","data":"mine","key":"k-2"}),
    )
    .await;
    let b = ok(
        &member,
        json!({"op":"publish","room":"doc:k","data":"mine","key":"k-2"}),
    )
    .await;
    assert_eq!(a["offset"], b["offset"]);
    assert!(a["offset"].as_u64().unwrap() > first.offset);
    let got = receive(&member, 2).await;
    assert_eq!(got[0], (first.offset, json!("once")));
    assert_eq!(got[1].0, a["offset"].as_u64().unwrap());
    no_more_messages(&member).await;
}

#[tokio::test]
async fn the_offline_inbox_is_delivered_with_unread_counts_and_read_markers() {
    let (_f, config) = config_file(CONFIG);
    let cluster = Cluster::start_with(2, &config);
    let mut router = cluster.router().await;
    let mut sent = Vec::new();
    for i in 0..3 {
        let r = router
            .send_to_user(SendToUserRequest {
                user: "dana".into(),
                data: json!({"note": i}).to_string(),
                key: String::new(),
                notify_after_ms: 0,
            })
            .await
            .unwrap()
            .into_inner();
        sent.push(r.offset);
    }
    let (phone, connected) = Client::connect(&cluster.ws(0), &token("dana"))
        .await
        .unwrap();
    assert_eq!(connected["unread"]["user:dana"], 3, "{connected}");
    let inbox = receive(&phone, 3).await;
    assert_eq!(inbox.iter().map(|(o, _)| *o).collect::<Vec<_>>(), sent);
    assert_eq!(inbox[2].1, json!({"note": 2}));

    let (laptop, connected) = Client::connect(&cluster.ws(1), &token("dana"))
        .await
        .unwrap();
    assert_eq!(connected["unread"]["user:dana"], 3);
    receive(&laptop, 3).await;

    let r = ok(
        &phone,
        json!({"op":"read","room":"user:dana","offset": sent[1]}),
    )
    .await;
    assert_eq!(r["unread"], 1);
    let seen = laptop.recv_op("read", WAIT).await.unwrap();
    assert_eq!(
        (seen["room"].as_str(), seen["unread"].as_u64()),
        (Some("user:dana"), Some(1))
    );

    // A new device starts from the marker: one unread, one delivered.
    phone.close().await.unwrap();
    let (tablet, connected) = Client::connect(&cluster.ws(0), &token("dana"))
        .await
        .unwrap();
    assert_eq!(connected["unread"]["user:dana"], 1);
    let rest = receive(&tablet, 1).await;
    assert_eq!(rest[0].0, sent[2]);
    no_more_messages(&tablet).await;

    // Markers only move forward.
    let r = ok(
        &tablet,
        json!({"op":"read","room":"user:dana","offset": sent[0]}),
    )
    .await;
    assert_eq!(
        (r["offset"].as_u64(), r["unread"].as_u64()),
        (Some(sent[1]), Some(1))
    );
    refused(
        &tablet,
        json!({"op":"read","room":"chat:x","offset": 1}),
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn a_nats_restart_loses_no_acknowledged_message() {
    let (_f, config) = config_file(CONFIG);
    let mut cluster = Cluster::start_with(2, &config);
    let member = connect(&cluster.ws(1), "mona").await;
    ok(&member, json!({"op":"join","room":"doc:steady"})).await;
    let router = cluster.router().await;

    // Publish steadily from a task; record which publishes were acknowledged.
    let acked: Arc<Mutex<BTreeMap<u64, u64>>> = Arc::default();
    let failed: Arc<Mutex<Vec<u64>>> = Arc::default();
    let publisher = {
        let (acked, failed, mut router) = (acked.clone(), failed.clone(), router.clone());
        tokio::spawn(async move {
            for i in 0..300u64 {
                let mut req = tonic::Request::new(publish("doc:steady", json!(i), ""));
                req.set_timeout(Duration::from_secs(3));
                match router.publish(req).await {
                    Ok(r) => {
                        acked.lock().unwrap().insert(i, r.into_inner().offset);
                    }
                    Err(_) => failed.lock().unwrap().push(i),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    eventually(WAIT, "publishing has started", || async {
        (acked.lock().unwrap().len() >= 50).then_some(())
    })
    .await;
    // Down long enough for publishes to fail, then back with the same store.
    cluster.nats.kill();
    eventually(
        Duration::from_secs(15),
        "a publish fails while NATS is down",
        || async { (!failed.lock().unwrap().is_empty()).then_some(()) },
    )
    .await;
    cluster.nats.restart().unwrap();
    publisher.await.unwrap();
    // One more after everything, so any gap behind it is noticed and filled.
    let mut router = router;
    let last = eventually(
        Duration::from_secs(20),
        "the router publishes again",
        || {
            let mut router = router.clone();
            async move {
                router
                    .publish(publish("doc:steady", json!("end"), ""))
                    .await
                    .ok()
            }
        },
    )
    .await
    .into_inner();
    let _ = &mut router;

    let acked = acked.lock().unwrap().clone();
    let failed = failed.lock().unwrap().clone();
    eprintln!(
        "NATS restart: {} publishes acknowledged, {} refused",
        acked.len(),
        failed.len()
    );
    assert!(acked.len() >= 50, "acknowledged: {}", acked.len());
    // Every acknowledged publish arrives exactly once, in order, before "end".
    let mut received: Vec<(u64, Value)> = Vec::new();
    loop {
        let m = member
            .recv_op("message", Duration::from_secs(15))
            .await
            .expect("messages keep arriving");
        let offset = m["offset"].as_u64().unwrap();
        received.push((offset, m["data"].clone()));
        if offset == last.offset {
            break;
        }
    }
    assert_rising(&received);
    let got: BTreeMap<u64, u64> = received
        .iter()
        .filter_map(|(o, d)| d.as_u64().map(|i| (i, *o)))
        .collect();
    for (i, offset) in &acked {
        assert_eq!(
            got.get(i),
            Some(offset),
            "acknowledged publish {i} was not delivered"
        );
    }
    // Whatever arrived was either acknowledged or reported as failed to its publisher.
    for i in got.keys() {
        assert!(
            acked.contains_key(i) || failed.contains(i),
            "publish {i} arrived but its publisher was told neither"
        );
    }
}

#[tokio::test]
async fn a_batch_publishes_in_order_with_an_outcome_per_message() {
    let (_f, config) = config_file(CONFIG);
    let cluster = Cluster::start_with(2, &config);
    let mut router = cluster.router().await;
    let durable = connect(&cluster.ws(0), "bea").await;
    ok(&durable, json!({"op":"join","room":"doc:b"})).await;
    let live = connect(&cluster.ws(1), "bo").await;
    ok(&live, json!({"op":"join","room":"chat:b"})).await;

    let batch = |messages| herald_proto::v1::PublishBatchRequest { messages };
    let results = router
        .publish_batch(batch(vec![
            publish("doc:b", json!(1), "b-1"),
            publish("chat:b", json!("a"), ""),
            publish("doc:b", json!(2), ""),
            PublishRequest {
                room: "doc:b".into(),
                data: "{not json".into(),
                key: String::new(),
            },
            publish("chat:b", json!("b"), ""),
            publish("doc:b", json!(3), ""),
            publish("doc:b", json!(1), "b-1"),
        ]))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 7);
    let offset = |i: usize| {
        let r = &results[i];
        assert_eq!((r.code, r.error.as_str()), (0, ""), "message {i}");
        r.published.as_ref().expect("published").offset
    };
    let (first, second, third) = (offset(0), offset(2), offset(5));
    assert!(first < second && second < third, "{results:?}");
    assert_eq!(offset(6), first, "a repeated key gives the first offset");
    assert!(results[3].published.is_none());
    assert_eq!(results[3].code, tonic::Code::InvalidArgument as u32);
    assert!(
        results[3].error.contains("not valid JSON"),
        "{}",
        results[3].error
    );

    let got = receive(&durable, 3).await;
    assert_eq!(
        got,
        vec![(first, json!(1)), (second, json!(2)), (third, json!(3))]
    );
    for data in ["a", "b"] {
        assert_eq!(live.recv_op("message", WAIT).await.unwrap()["data"], data);
    }

    let e = router
        .publish_batch(batch(vec![publish("chat:b", json!(0), ""); 1001]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("at most 1000"), "{}", e.message());
    let empty = router.publish_batch(batch(Vec::new())).await.unwrap();
    assert!(empty.into_inner().results.is_empty());
    // Nothing of the refused batch arrived: the next message is the next one.
    router
        .publish(publish("chat:b", json!("c"), ""))
        .await
        .unwrap();
    assert_eq!(live.recv_op("message", WAIT).await.unwrap()["data"], "c");
}
