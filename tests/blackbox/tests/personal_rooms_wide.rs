//! An edge whose users fill more than half of the 1024 shards of personal
//! rooms takes one subscription to all of them (`herald.user.*.*`) instead
//! of one per shard: each message still reaches each of a user's devices
//! once, through a real NATS server.

mod common;

use std::time::Duration;

use common::*;
use herald_proto::v1::SendToUserRequest;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn an_edge_with_most_shards_feeds_personal_rooms_from_one_subscription() {
    let cluster = Cluster::start(1);
    // 1,000 users land in about 640 of the 1024 shards.
    let mut clients = Vec::new();
    for i in 0..1000 {
        clients.push(connect(&cluster.ws(0), &format!("u{i}")).await);
    }
    let log = cluster.edges[0].output();
    assert!(
        log.contains("now feeds the users of every shard"),
        "the edge did not take the wide subscription:\n{log}"
    );
    // A second device of u7 comes after the switch.
    let second = connect(&cluster.ws(0), "u7").await;
    let mut router = cluster.router().await;
    for user in ["u0", "u7", "u500", "u999"] {
        router
            .send_to_user(SendToUserRequest {
                user: user.into(),
                data: json!({"to": user}).to_string(),
                key: String::new(),
                notify_after_ms: 0,
            })
            .await
            .unwrap();
    }
    for (who, client) in [
        ("u0", &clients[0]),
        ("u7", &clients[7]),
        ("u7", &second),
        ("u500", &clients[500]),
        ("u999", &clients[999]),
    ] {
        let m = client
            .recv_op("message", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(m["data"]["to"], who);
        // Once: nothing else arrives after a ping's answer.
        let pong = client.request(json!({"op":"ping"})).await.unwrap();
        assert_eq!(pong["op"], "pong");
        while let Some(frame) = client.next_frame(Duration::from_millis(50)).await.unwrap() {
            assert_ne!(frame["op"], "message", "{who} got a message twice: {frame}");
        }
    }
}
