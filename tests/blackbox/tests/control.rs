//! Acting on a user everywhere: `Router.Join`, `Router.Leave` and
//! `Router.Disconnect` reach every connection of the user on every edge.

mod common;

use common::*;
use herald_proto::v1::{DisconnectRequest, JoinRequest, LeaveRequest, disconnect_request};
use herald_test_support::eventually;
use serde_json::json;

#[tokio::test]
async fn router_join_leave_and_disconnect_act_on_every_device() {
    let cluster = Cluster::start(2);
    let phone = connect(&cluster.ws(0), "alice").await;
    let laptop = connect(&cluster.ws(1), "alice").await;
    let bob = connect(&cluster.ws(1), "bob").await;
    let mut router = cluster.router().await;

    // The router finds alice's devices through presence: wait until both are known.
    let mut presence = cluster.presence().await;
    eventually(WAIT, "alice's two connections are known", || {
        let mut presence = presence.clone();
        async move {
            let s = presence
                .user_status(herald_proto::v1::UserStatusRequest {
                    users: vec!["alice".into()],
                })
                .await
                .unwrap()
                .into_inner();
            (s.users[0].conns.len() == 2).then_some(())
        }
    })
    .await;
    let _ = &mut presence;

    router
        .join(JoinRequest {
            user: "alice".into(),
            room: "chat:news".into(),
        })
        .await
        .unwrap();
    // Join has returned: the very next message reaches both devices.
    router
        .publish(publish_request("chat:news", r#""first""#))
        .await
        .unwrap();
    for device in [&phone, &laptop] {
        let m = device.recv_op("message", WAIT).await.unwrap();
        assert_eq!(
            (m["room"].as_str(), m["data"].as_str()),
            (Some("chat:news"), Some("first"))
        );
        no_more_messages(device).await;
    }
    no_more_messages(&bob).await;

    router
        .leave(LeaveRequest {
            user: "alice".into(),
            room: "chat:news".into(),
        })
        .await
        .unwrap();
    router
        .publish(publish_request("chat:news", r#""second""#))
        .await
        .unwrap();
    no_more_messages(&phone).await;
    no_more_messages(&laptop).await;

    router
        .disconnect(DisconnectRequest {
            target: Some(disconnect_request::Target::User("alice".into())),
            code: 4003,
            reason: "account suspended".into(),
        })
        .await
        .unwrap();
    for device in [&phone, &laptop] {
        let (disconnect, code, reason) = device.closed(WAIT).await.unwrap();
        assert_eq!(code, Some(4003));
        assert_eq!(reason, "account suspended");
        assert_eq!(disconnect.unwrap()["reconnect"], false);
    }
    // bob is untouched.
    assert_eq!(
        bob.request(json!({"op":"ping"})).await.unwrap()["op"],
        "pong"
    );
}

#[tokio::test]
async fn router_disconnects_one_connection_by_id() {
    let cluster = Cluster::start(1);
    let (tab1, connected) = herald_client::Client::connect(&cluster.ws(0), &token("carol"))
        .await
        .unwrap();
    let tab2 = connect(&cluster.ws(0), "carol").await;
    let conn = connected["conn"].as_str().unwrap().to_string();
    let mut router = cluster.router().await;
    router
        .disconnect(DisconnectRequest {
            target: Some(disconnect_request::Target::Conn(conn.clone())),
            code: 1012,
            reason: "moving you".into(),
        })
        .await
        .unwrap();
    let (d, code, _) = tab1.closed(WAIT).await.unwrap();
    assert_eq!(code, Some(1012));
    assert_eq!(d.unwrap()["reconnect"], true);
    assert_eq!(
        tab2.request(json!({"op":"ping"})).await.unwrap()["op"],
        "pong"
    );

    // The same connection again: it is gone.
    let e = router
        .disconnect(DisconnectRequest {
            target: Some(disconnect_request::Target::Conn(conn)),
            code: 1000,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = router
        .disconnect(DisconnectRequest {
            target: Some(disconnect_request::Target::User("carol".into())),
            code: 1234,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}
