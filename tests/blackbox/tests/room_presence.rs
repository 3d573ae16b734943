//! Room presence across edges: join, update and leave events reach members on
//! every edge; a closing connection announces its leaves; `meta` is bounded.

mod common;

use common::*;
use herald_test_support::eventually;
use serde_json::json;

#[tokio::test]
async fn presence_events_and_meta_cross_edges() {
    let cluster = Cluster::start(2);
    let alice = connect(&cluster.ws(0), "alice").await;
    ok(&alice, json!({"op":"join","room":"doc:plan"})).await;
    let alice_join = alice.recv_op("presence", WAIT).await.unwrap();
    assert_eq!(
        (alice_join["event"].as_str(), alice_join["user"].as_str()),
        (Some("join"), Some("alice"))
    );

    let (bob, connected) = herald_client::Client::connect(&cluster.ws(1), &token("bob"))
        .await
        .unwrap();
    let bob_conn = connected["conn"].as_str().unwrap().to_string();
    ok(
        &bob,
        json!({"op":"join","room":"doc:plan","meta":{"cursor":1}}),
    )
    .await;
    let e = alice.recv_op("presence", WAIT).await.unwrap();
    assert_eq!(
        e,
        json!({"op":"presence","room":"doc:plan","event":"join","user":"bob","conn":bob_conn,"meta":{"cursor":1}})
    );

    ok(
        &bob,
        json!({"op":"presence_set","room":"doc:plan","meta":{"cursor":42,"typing":true}}),
    )
    .await;
    let e = alice.recv_op("presence", WAIT).await.unwrap();
    assert_eq!(e["event"], "update");
    assert_eq!(e["meta"], json!({"cursor":42,"typing":true}));

    // The member list carries each connection's latest meta.
    let members = eventually(WAIT, "bob's meta is in the member list", || async {
        let r = ok(&alice, json!({"op":"presence","room":"doc:plan"})).await;
        let bob = r["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["user"] == "bob")
            .cloned()?;
        (bob["meta"]["cursor"] == 42).then_some(r)
    })
    .await;
    assert_eq!(member_users(&members), ["alice", "bob"]);

    // Oversize meta is refused and nothing is announced.
    let big = "x".repeat(4096);
    refused(
        &bob,
        json!({"op":"presence_set","room":"doc:plan","meta":{"blob":big}}),
        "too_large",
    )
    .await;
    refused(
        &bob,
        json!({"op":"presence_set","room":"doc:plan","meta":"not an object"}),
        "bad_request",
    )
    .await;

    // Closing announces the leave to the room before the state is dropped.
    bob.close().await.unwrap();
    let e = alice.recv_op("presence", WAIT).await.unwrap();
    assert_eq!(
        (e["event"].as_str(), e["conn"].as_str()),
        (Some("leave"), Some(bob_conn.as_str()))
    );
    eventually(WAIT, "bob is gone from the member list", || async {
        let r = ok(&alice, json!({"op":"presence","room":"doc:plan"})).await;
        (member_users(&r) == ["alice"]).then_some(())
    })
    .await;
}

#[tokio::test]
async fn presence_updates_are_rate_limited_with_retry_after() {
    let dev = Dev::start();
    let c = connect(&dev.ws(), "zoe").await;
    ok(&c, json!({"op":"join","room":"doc:x"})).await;
    let mut limited = None;
    for i in 0..100 {
        let r = c
            .request(json!({"op":"presence_set","room":"doc:x","meta":{"i":i}}))
            .await
            .unwrap();
        if r["op"] == "error" {
            limited = Some(r);
            break;
        }
    }
    let e = limited.expect("100 updates in a burst are not all accepted");
    assert_eq!(e["code"], "rate_limited");
    assert!(e["retry_after_ms"].as_u64().unwrap() > 0, "{e}");
}

/// Under load an edge holds presence events for up to `--presence-window`
/// to send them together. The `ok` of a join waits with its event, so a
/// message the joiner publishes after that `ok` still reaches the other
/// members after the join.
#[tokio::test]
async fn a_join_held_by_the_presence_window_still_comes_before_the_joiners_message() {
    let cluster = Cluster::start_spec(Spec {
        edges: 2,
        // Long enough that a message sent without waiting for the held
        // event would overtake it.
        edge_args: vec!["--presence-window=500ms".into()],
        ..Spec::default()
    });
    let room = "chat:held";
    let bob = connect(&cluster.ws(1), "bob").await;
    ok(&bob, json!({"op":"join","room":room})).await;
    // Carol's join goes out at once and opens a window on edge 0, in which
    // alice's join then waits.
    let carol = connect(&cluster.ws(0), "carol").await;
    let alice = connect(&cluster.ws(0), "alice").await;
    ok(&carol, json!({"op":"join","room":room})).await;
    ok(&alice, json!({"op":"join","room":room})).await;
    ok(&alice, json!({"op":"publish","room":room,"data":"hello"})).await;

    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("message alice") {
        let frame = bob
            .next_frame(WAIT)
            .await
            .expect("bob's connection stays up")
            .expect("frames keep coming");
        let who = frame["user"].as_str().or(frame["from"].as_str());
        match (frame["op"].as_str(), who) {
            (Some("presence"), Some(user)) if user != "bob" => {
                seen.push(format!("{} {user}", frame["event"].as_str().unwrap()))
            }
            (Some("message"), Some(user)) => seen.push(format!("message {user}")),
            _ => {}
        }
    }
    assert_eq!(seen, ["join carol", "join alice", "message alice"]);
}
