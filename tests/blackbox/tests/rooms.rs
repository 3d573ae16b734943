//! Rooms across edges: a message published on one edge reaches members on
//! another exactly once, and presence lists members from every edge. The same
//! scenario runs against `herald dev`.

mod common;

use common::*;
use herald_test_support::eventually;
use serde_json::json;

/// alice and bob join `chat:lobby` (on `url_a` and `url_b`), bob publishes,
/// alice gets it once; presence on either connection lists both.
async fn lobby_scenario(url_a: &str, url_b: &str) {
    let alice = connect(url_a, "alice").await;
    let bob = connect(url_b, "bob").await;
    ok(&alice, json!({"op":"join","room":"chat:lobby"})).await;
    ok(&bob, json!({"op":"join","room":"chat:lobby"})).await;

    let reply = ok(
        &bob,
        json!({"op":"publish","room":"chat:lobby","data":{"text":"hi alice"}}),
    )
    .await;
    assert!(reply["id"].is_u64(), "ok echoes the request id: {reply}");

    let msg = alice.recv_op("message", WAIT).await.unwrap();
    assert_eq!(msg["room"], "chat:lobby");
    assert_eq!(msg["from"], "bob");
    assert_eq!(msg["data"], json!({"text":"hi alice"}));
    assert!(msg["ts"].as_u64().unwrap() > 1_600_000_000_000);
    no_more_messages(&alice).await;

    // Each edge sees its own client's join at once (read-your-writes); the
    // other edge's join is reported through the broker, so wait for it.
    for client in [&alice, &bob] {
        let members = eventually(WAIT, "presence lists alice and bob", || async {
            let reply = ok(client, json!({"op":"presence","room":"chat:lobby"})).await;
            (member_users(&reply) == ["alice", "bob"]).then_some(reply)
        })
        .await;
        for m in members["members"].as_array().unwrap() {
            assert_eq!(m["conns"], 1, "{m}");
        }
    }
}

#[tokio::test]
async fn a_room_spans_two_edges() {
    let cluster = Cluster::start(2);
    lobby_scenario(&cluster.ws(0), &cluster.ws(1)).await;
}

#[tokio::test]
async fn a_room_works_in_the_all_in_one_mode() {
    let dev = Dev::start();
    lobby_scenario(&dev.ws(), &dev.ws()).await;
}

#[tokio::test]
async fn router_publish_reaches_members_on_every_edge() {
    let cluster = Cluster::start(2);
    let a = connect(&cluster.ws(0), "alice").await;
    let b = connect(&cluster.ws(1), "bob").await;
    let outsider = connect(&cluster.ws(1), "carol").await;
    ok(&a, json!({"op":"join","room":"chat:news"})).await;
    ok(&b, json!({"op":"join","room":"chat:news"})).await;
    let mut router = cluster.router().await;
    router
        .publish(herald_proto::v1::PublishRequest {
            room: "chat:news".into(),
            data: r#"{"headline":"Herald ships"}"#.into(),
            key: String::new(),
        })
        .await
        .unwrap();
    for c in [&a, &b] {
        let m = c.recv_op("message", WAIT).await.unwrap();
        assert_eq!(m["from"], "server");
        assert_eq!(m["data"]["headline"], "Herald ships");
        no_more_messages(c).await;
    }
    no_more_messages(&outsider).await;

    // After leaving, nothing more arrives; the other member still gets messages.
    ok(&a, json!({"op":"leave","room":"chat:news"})).await;
    router
        .publish(herald_proto::v1::PublishRequest {
            room: "chat:news".into(),
            data: "2".into(),
            key: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(b.recv_op("message", WAIT).await.unwrap()["data"], 2);
    no_more_messages(&a).await;
}

#[tokio::test]
async fn services_can_reach_presence_over_grpc_with_presence_url() {
    let mut cluster = Cluster::start(0);
    let presence_url = format!("http://{}", cluster.presence_grpcs[0]);
    cluster.add_edge_with("edge-0", &["--presence".into(), presence_url]);
    let alice = connect(&cluster.ws(0), "alice").await;
    ok(&alice, json!({"op":"join","room":"chat:grpc"})).await;
    // Read-your-writes holds over gRPC too: the edge's own join is listed at once.
    let r = ok(&alice, json!({"op":"presence","room":"chat:grpc"})).await;
    assert_eq!(member_users(&r), ["alice"]);
}

/// `--write-delay` holds room messages for a shared write: they still arrive
/// all, once and in order, and replies to a client's own requests do not wait
/// for the delay.
#[tokio::test]
async fn a_write_delay_keeps_every_message_in_order() {
    let mut cluster = Cluster::start(0);
    cluster.add_edge_with("edge-0", &["--write-delay".into(), "30ms".into()]);
    cluster.add_edge("edge-1");
    let alice = connect(&cluster.ws(0), "alice").await;
    let bob = connect(&cluster.ws(1), "bob").await;
    ok(&alice, json!({"op":"join","room":"chat:burst"})).await;
    ok(&bob, json!({"op":"join","room":"chat:burst"})).await;
    let mut router = cluster.router().await;
    for i in 0..50 {
        router
            .publish(herald_proto::v1::PublishRequest {
                room: "chat:burst".into(),
                data: i.to_string(),
                key: String::new(),
            })
            .await
            .unwrap();
    }
    // A ping answered while room messages are held: replies go out at once,
    // after whatever was held for this connection.
    let pong = alice.request(json!({"op":"ping"})).await.unwrap();
    assert_eq!(pong["op"], "pong", "{pong}");
    for c in [&alice, &bob] {
        for i in 0..50 {
            let m = c.recv_op("message", WAIT).await.unwrap();
            assert_eq!(m["data"], i, "{m}");
        }
        no_more_messages(c).await;
    }
}
