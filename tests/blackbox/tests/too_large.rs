//! A message larger than NATS takes (its `max_payload`, 1 MiB by default) is
//! a permanent error on every path, not a retryable one: `INVALID_ARGUMENT`
//! from the router and `too_large` for a client, naming the limit. Nothing
//! of it is delivered, and the room goes on.

mod common;

use common::*;
use herald_proto::v1::{PublishBatchRequest, SendToUserRequest};
use serde_json::json;
use tonic::Code;

const CONFIG: &str = r#"
[namespaces.chat]

[namespaces.doc]
durable = { history_size = 100, history_ttl = "1h" }
"#;

/// nats-server's default `max_payload`.
const LIMIT: &str = "1048576";

#[tokio::test]
async fn a_message_over_the_brokers_max_payload_is_refused_as_too_large_on_every_path() {
    let (_f, config) = config_file(CONFIG);
    let cluster = Cluster::start_spec(Spec {
        edges: 1,
        common: config,
        // The edge's own limit above the broker's, so the broker's is met.
        edge_args: vec!["--max-message-bytes".into(), "4000000".into()],
        ..Spec::default()
    });
    let big = format!("\"{}\"", "x".repeat(2_000_000));
    let bystander = connect(&cluster.ws(0), "bea").await;
    for room in ["chat:big", "doc:big"] {
        ok(&bystander, json!({"op":"join","room":room})).await;
    }
    let mut router = cluster.router().await;

    for room in ["chat:big", "doc:big"] {
        let e = router
            .publish(publish_request(room, big.as_str()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{room}: {e:?}");
        assert!(e.message().contains(LIMIT), "{room}: {e:?}");
    }
    let e = router
        .send_to_user(SendToUserRequest {
            user: "bea".into(),
            data: big.clone(),
            key: String::new(),
            notify_after_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains(LIMIT), "{e:?}");

    let batch = router
        .publish_batch(PublishBatchRequest {
            messages: vec![
                publish_request("chat:big", "\"small\""),
                publish_request("chat:big", big.as_str()),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.results[0].code, Code::Ok as u32);
    assert_eq!(batch.results[1].code, Code::InvalidArgument as u32);
    assert!(batch.results[1].error.contains(LIMIT), "{batch:?}");

    let client = connect(&cluster.ws(0), "cal").await;
    for room in ["chat:big", "doc:big"] {
        let data: serde_json::Value = serde_json::from_str(&big).unwrap();
        let e = refused(
            &client,
            json!({"op":"publish","room":room,"data":data}),
            "too_large",
        )
        .await;
        assert!(e["message"].as_str().unwrap().contains(LIMIT), "{e}");
    }

    // The small message of the batch, then one after all this: nothing of
    // the refused ones came through.
    let m = bystander.recv_op("message", WAIT).await.unwrap();
    assert_eq!(m["data"], "small");
    router
        .publish(publish_request("doc:big", "\"after\""))
        .await
        .unwrap();
    let m = bystander.recv_op("message", WAIT).await.unwrap();
    assert_eq!(
        (m["room"].as_str(), m["data"].as_str()),
        (Some("doc:big"), Some("after"))
    );
    no_more_messages(&bystander).await;
}
