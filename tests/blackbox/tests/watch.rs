//! Contacts' status (`watch`): a client is answered whether each watched
//! user is online, then sees one `status` per transition of theirs, from
//! whichever edges they connect to, nothing while one reconnects within
//! the grace period, and nothing after `unwatch`. The token's `watch`
//! claim says whom a client may watch.

mod common;

use std::time::Duration;

use common::*;
use herald_broker::{Broker, NatsBroker};
use herald_client::Client;
use herald_wire::presence::UserEvent;
use serde_json::{Value, json};

const GRACE: Duration = Duration::from_millis(1500);

fn spec(edges: usize) -> Spec {
    Spec {
        edges,
        edge_args: vec!["--presence-interval".into(), "500ms".into()],
        presence_args: vec![
            "--presence-grace".into(),
            format!("{}ms", GRACE.as_millis()),
        ],
        ..Spec::default()
    }
}

/// A client of `user` whose token lets it watch users matching `patterns`.
async fn watcher(url: &str, user: &str, patterns: &[&str]) -> Client {
    let token = token_with(json!({ "sub": user, "watch": patterns }));
    let (client, connected) = Client::connect(url, &token).await.expect("connect");
    assert_eq!(connected["op"], "connected", "{connected}");
    client
}

/// The next `status` frame, as (user, online).
async fn next_status(client: &Client) -> (String, bool) {
    let f = client
        .recv_op("status", GRACE + WAIT)
        .await
        .expect("a status frame");
    (
        f["user"].as_str().expect("user").to_string(),
        f["online"].as_bool().expect("online"),
    )
}

/// `n` status frames, sorted (transitions of different users may come in
/// any order).
async fn statuses(client: &Client, n: usize) -> Vec<(String, bool)> {
    let mut got = Vec::new();
    for _ in 0..n {
        got.push(next_status(client).await);
    }
    got.sort();
    got
}

/// Status frames that arrive within [`QUIET`]; none is expected.
async fn no_more_status(client: &Client) {
    while let Some(f) = client.next_frame(QUIET).await.expect("connection open") {
        assert_ne!(f["op"], "status", "unexpected status {f}");
    }
}

fn pairs(list: &[(&str, bool)]) -> Vec<(String, bool)> {
    list.iter().map(|(u, o)| (u.to_string(), *o)).collect()
}

#[tokio::test]
async fn a_watcher_sees_one_online_and_one_offline_per_transition_across_edges() {
    let cluster = Cluster::start_spec(spec(3));
    let alice = watcher(&cluster.ws(0), "alice", &["team-*"]).await;
    let reply = ok(
        &alice,
        json!({"op":"watch","users":["team-a","team-b","team-c"]}),
    )
    .await;
    assert_eq!(
        reply["status"],
        json!({"team-a":false,"team-b":false,"team-c":false})
    );

    // Users on other edges, one of them with two devices on two edges.
    let a = connect(&cluster.ws(1), "team-a").await;
    let b = connect(&cluster.ws(2), "team-b").await;
    let c1 = connect(&cluster.ws(1), "team-c").await;
    let c2 = connect(&cluster.ws(2), "team-c").await;
    assert_eq!(
        statuses(&alice, 3).await,
        pairs(&[("team-a", true), ("team-b", true), ("team-c", true)])
    );

    // A watcher that comes later is answered with the status now.
    let late = watcher(&cluster.ws(1), "dave", &["team-a"]).await;
    let reply = ok(&late, json!({"op":"watch","users":["team-a"]})).await;
    assert_eq!(reply["status"], json!({"team-a":true}));
    // Watching again changes nothing and answers the same.
    let reply = ok(&late, json!({"op":"watch","users":["team-a"]})).await;
    assert_eq!(reply["status"], json!({"team-a":true}));

    // team-a reconnects within the grace period, to another edge: no
    // transition. team-b's departure, after it, shows when any would have
    // come: a wrong offline of team-a would arrive first.
    a.close().await.unwrap();
    let a = connect(&cluster.ws(2), "team-a").await;
    b.close().await.unwrap();
    assert_eq!(next_status(&alice).await, ("team-b".to_string(), false));
    // One of team-c's two devices leaving is no transition either.
    c1.close().await.unwrap();
    a.close().await.unwrap();
    c2.close().await.unwrap();
    assert_eq!(
        statuses(&alice, 2).await,
        pairs(&[("team-a", false), ("team-c", false)])
    );
    assert_eq!(next_status(&late).await, ("team-a".to_string(), false));
    no_more_status(&alice).await;
    no_more_status(&late).await;
}

#[tokio::test]
async fn unwatch_stops_the_status_frames() {
    let cluster = Cluster::start_spec(spec(2));
    let alice = watcher(&cluster.ws(0), "alice", &["*"]).await;
    ok(&alice, json!({"op":"watch","users":["x","y"]})).await;
    let x = connect(&cluster.ws(1), "x").await;
    assert_eq!(next_status(&alice).await, ("x".to_string(), true));
    let y = connect(&cluster.ws(1), "y").await;
    assert_eq!(next_status(&alice).await, ("y".to_string(), true));

    ok(&alice, json!({"op":"unwatch","users":["x","nobody"]})).await;
    x.close().await.unwrap();
    y.close().await.unwrap();
    // y went offline after x: x's offline would have come first.
    assert_eq!(next_status(&alice).await, ("y".to_string(), false));
    no_more_status(&alice).await;
}

/// A new presence leader announces again what came after the old one's
/// last heartbeat: a transition told already (by its id) is not told
/// again, even when it differs from the user's status now.
#[tokio::test]
async fn a_transition_announced_again_is_not_told_twice() {
    let cluster = Cluster::start_spec(spec(2));
    let nats = NatsBroker::connect(&cluster.nats.url(), "test-leader")
        .await
        .unwrap();
    let mut announced = nats
        .subscribe("herald.presence.user.x".into())
        .await
        .unwrap();
    let alice = watcher(&cluster.ws(0), "alice", &["x", "y"]).await;
    ok(&alice, json!({"op":"watch","users":["x","y"]})).await;
    let x = connect(&cluster.ws(1), "x").await;
    assert_eq!(next_status(&alice).await, ("x".to_string(), true));
    let online = tokio::time::timeout(WAIT, announced.next())
        .await
        .expect("x's online announced")
        .unwrap();
    let event: UserEvent = serde_json::from_slice(&online.payload).unwrap();
    assert_eq!(event.user, "x");
    x.close().await.unwrap();
    assert_eq!(next_status(&alice).await, ("x".to_string(), false));

    // x's online, announced again: x is offline, yet nothing is told.
    nats.publish("herald.presence.user.x".into(), online.payload.clone())
        .await
        .unwrap();
    // y's transition, after it, shows when a wrong status would have come.
    let y = connect(&cluster.ws(1), "y").await;
    assert_eq!(next_status(&alice).await, ("y".to_string(), true));
    no_more_status(&alice).await;
    drop(y);
}

#[tokio::test]
async fn watching_takes_the_claim_and_valid_user_ids() {
    let dev = Dev::start();
    let plain = connect(&dev.ws(), "alice").await;
    let e = refused(&plain, json!({"op":"watch","users":["bob"]}), "forbidden").await;
    assert!(
        e["message"].as_str().unwrap().contains("no `watch` claim"),
        "{e}"
    );

    let alice = watcher(&dev.ws(), "alice", &["team-*", "bob"]).await;
    let e = refused(
        &alice,
        json!({"op":"watch","users":["bob","mallory"]}),
        "forbidden",
    )
    .await;
    assert!(e["message"].as_str().unwrap().contains("mallory"), "{e}");
    let reply = ok(&alice, json!({"op":"watch","users":["bob","team-1"]})).await;
    assert_eq!(reply["status"], json!({"bob":false,"team-1":false}));

    for bad in [json!([]), json!(["a b"]), json!([""]), json!("bob")] {
        refused(&alice, json!({"op":"watch","users":bad}), "bad_request").await;
    }
    refused(&alice, json!({"op":"watch"}), "bad_request").await;

    let many: Vec<Value> = (0..1000).map(|i| json!(format!("team-{i}"))).collect();
    // bob and team-1 are watched already: 999 more make 1001.
    let e = refused(&alice, json!({"op":"watch","users":many}), "too_large").await;
    assert!(e["message"].as_str().unwrap().contains("1000"), "{e}");
    // 997 more make 999.
    let fewer: Vec<Value> = (0..998).map(|i| json!(format!("team-{i}"))).collect();
    ok(&alice, json!({"op":"watch","users":fewer})).await;
    // The connection still serves.
    let pong = alice.request(json!({"op":"ping"})).await.unwrap();
    assert_eq!(pong["op"], "pong");
}
