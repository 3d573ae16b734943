//! Multi-device users: every connection of a user is in `user:<id>` on
//! whichever edge it landed, and the presence service tracks each one.

mod common;

use common::*;
use herald_proto::v1::{SendToUserRequest, UserStatusRequest};
use herald_test_support::eventually;

async fn status(cluster: &Cluster, user: &str) -> herald_proto::v1::UserStatus {
    let mut presence = cluster.presence().await;
    let reply = presence
        .user_status(UserStatusRequest {
            users: vec![user.to_string()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.users.len(), 1);
    reply.users.into_iter().next().unwrap()
}

#[tokio::test]
async fn a_user_on_two_edges_gets_each_message_once_per_device() {
    // A short grace period: offline follows the last close within the wait.
    let cluster = Cluster::start_spec(Spec {
        edges: 2,
        presence_args: vec!["--presence-grace".into(), "500ms".into()],
        ..Spec::default()
    });
    let phone = connect(&cluster.ws(0), "alice").await;
    let laptop = connect(&cluster.ws(1), "alice").await;
    let bob = connect(&cluster.ws(0), "bob").await;

    let mut router = cluster.router().await;
    router
        .send_to_user(SendToUserRequest {
            user: "alice".into(),
            data: r#"{"note":"for alice"}"#.into(),
            key: String::new(),
            notify_after_ms: 0,
        })
        .await
        .unwrap();
    for device in [&phone, &laptop] {
        let m = device.recv_op("message", WAIT).await.unwrap();
        assert_eq!(m["room"], "user:alice");
        assert_eq!(m["from"], "server");
        assert_eq!(m["data"]["note"], "for alice");
        no_more_messages(device).await;
    }
    no_more_messages(&bob).await;

    let s = eventually(WAIT, "alice has two connections", || async {
        let s = status(&cluster, "alice").await;
        (s.conns.len() == 2).then_some(s)
    })
    .await;
    assert!(s.online);
    let mut nodes: Vec<_> = s.conns.iter().map(|c| c.node.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["edge-0", "edge-1"]);
    assert!(s.conns.iter().all(|c| c.since_ms > 0 && c.user == "alice"));

    phone.close().await.unwrap();
    let s = eventually(WAIT, "alice has one connection left", || async {
        let s = status(&cluster, "alice").await;
        (s.conns.len() == 1).then_some(s)
    })
    .await;
    assert!(s.online, "one device still open: alice stays online");
    assert_eq!(s.conns[0].node, "edge-1");

    laptop.close().await.unwrap();
    let s = eventually(WAIT, "alice is offline", || async {
        let s = status(&cluster, "alice").await;
        (!s.online).then_some(s)
    })
    .await;
    assert!(s.conns.is_empty());
    assert!(status(&cluster, "bob").await.online);
}
