//! `publish` with `echo: false`: the publishing connection does not receive
//! its own message live; the user's other connections (on its edge and on
//! others) and every other member do, in ephemeral and durable rooms. The
//! default still echoes.

mod common;

use common::*;
use herald_client::Client;
use serde_json::{Value, json};

const CONFIG: &str = r#"
[namespaces.chat]

[namespaces.doc]
durable = { history_size = 100, history_ttl = "1h" }
"#;

/// The `data` of the next `message` frame.
async fn next_data(client: &Client) -> Value {
    let m = client.recv_op("message", WAIT).await.expect("a message");
    m["data"].clone()
}

async fn check_room(cluster: &Cluster, room: &str) {
    // The publisher and another device of its user on edge 0, a third on
    // edge 1, another user on edge 1.
    let publisher = connect(&cluster.ws(0), "alice").await;
    let same_edge = connect(&cluster.ws(0), "alice").await;
    let other_edge = connect(&cluster.ws(1), "alice").await;
    let bob = connect(&cluster.ws(1), "bob").await;
    for c in [&publisher, &same_edge, &other_edge, &bob] {
        ok(c, json!({"op":"join","room":room})).await;
    }
    ok(
        &publisher,
        json!({"op":"publish","room":room,"data":"quiet","echo":false}),
    )
    .await;
    for c in [&same_edge, &other_edge, &bob] {
        assert_eq!(next_data(c).await, "quiet", "in {room}");
    }
    ok(
        &publisher,
        json!({"op":"publish","room":room,"data":"loud"}),
    )
    .await;
    // The first message the publisher gets is its echoed one: the quiet
    // one never came.
    assert_eq!(next_data(&publisher).await, "loud", "in {room}");
    for c in [&same_edge, &other_edge, &bob] {
        assert_eq!(next_data(c).await, "loud", "in {room}");
    }
    no_more_messages(&publisher).await;
}

#[tokio::test]
async fn echo_false_skips_the_publishing_connection_alone() {
    let (_f, config) = config_file(CONFIG);
    let cluster = Cluster::start_with(2, &config);
    check_room(&cluster, "chat:echo").await;
    check_room(&cluster, "doc:echo").await;

    // History is everyone's: it holds the quiet message too.
    let reader = connect(&cluster.ws(0), "alice").await;
    let page = ok(&reader, json!({"op":"history","room":"doc:echo"})).await;
    let data: Vec<Value> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].clone())
        .collect();
    assert_eq!(data, [json!("quiet"), json!("loud")]);
}
