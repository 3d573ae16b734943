//! Input limits set by flags, each refused with its clear error and nothing
//! else lost: JSON nesting (`--max-json-depth`), rooms per connection,
//! presence meta size, and PublishBatch size.

mod common;

use common::*;
use herald_proto::v1::PublishBatchRequest;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn configured_input_limits_are_enforced_with_their_errors() {
    let cluster = Cluster::start_spec(Spec {
        edges: 1,
        common: vec!["--max-json-depth".into(), "4".into()],
        edge_args: vec![
            "--max-rooms-per-connection".into(),
            "2".into(),
            "--max-meta-bytes".into(),
            "16".into(),
        ],
        router_args: vec!["--max-publish-batch".into(), "2".into()],
        ..Spec::default()
    });
    let ada = connect(&cluster.ws(0), "ada").await;

    ok(&ada, json!({"op":"join","room":"chat:a"})).await;
    ok(
        &ada,
        json!({"op":"publish","room":"chat:a","data":[[[["four"]]]]}),
    )
    .await;
    let e = refused(
        &ada,
        json!({"op":"publish","room":"chat:a","data":[[[[["five"]]]]]}),
        "bad_request",
    )
    .await;
    assert!(e["message"].as_str().unwrap().contains("at most 4"), "{e}");

    let e = refused(
        &ada,
        json!({"op":"presence_set","room":"chat:a","meta":{"status":"a long status line"}}),
        "too_large",
    )
    .await;
    assert!(e["message"].as_str().unwrap().contains("16"), "{e}");

    ok(&ada, json!({"op":"join","room":"chat:b"})).await;
    let e = refused(&ada, json!({"op":"join","room":"chat:c"}), "too_large").await;
    assert!(e["message"].as_str().unwrap().contains('2'), "{e}");

    let mut router = cluster.router().await;
    let batch = |n| PublishBatchRequest {
        messages: vec![publish_request("chat:a", "1"); n],
    };
    router.publish_batch(batch(2)).await.expect("two fit");
    let e = router.publish_batch(batch(3)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("at most 2"), "{}", e.message());
    let e = router
        .publish(publish_request("chat:a", "[[[[[1]]]]]"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // Still served after all of that.
    ok(&ada, json!({"op":"publish","room":"chat:a","data":"fine"})).await;
}
