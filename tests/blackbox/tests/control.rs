//! Acting on a user everywhere: `Router.Join`, `Router.Leave` and
//! `Router.Disconnect` reach every connection of the user on every edge;
//! a disconnect may carry a backend's own close code and reconnect rule.

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
            reconnect: None,
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
            reconnect: None,
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
            reconnect: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = router
        .disconnect(DisconnectRequest {
            target: Some(disconnect_request::Target::User("carol".into())),
            code: 1234,
            reason: String::new(),
            reconnect: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

/// A backend closes with a code of its own (4000–4999, outside the
/// catalogue), in its own words, and chooses whether the client reconnects.
#[tokio::test]
async fn router_disconnect_carries_a_backends_own_code_and_reconnect_rule() {
    let dev = Dev::start();
    let mut router = dev.router().await;
    let open = |user: &'static str| {
        let url = dev.ws();
        async move {
            let (client, connected) = herald_client::Client::connect(&url, &token(user))
                .await
                .unwrap();
            let conn = connected["conn"].as_str().unwrap().to_string();
            (client, conn)
        }
    };

    for (user, reconnect, expected) in [
        ("mallory", None, false),
        ("dan", Some(true), true),
        ("erin", Some(false), false),
    ] {
        let (client, conn) = open(user).await;
        router
            .disconnect(DisconnectRequest {
                target: Some(disconnect_request::Target::Conn(conn)),
                code: 4403,
                reason: format!("banned, {user}: spam"),
                reconnect,
            })
            .await
            .unwrap();
        let (disconnect, code, reason) = client.closed(WAIT).await.unwrap();
        let disconnect = disconnect.expect("a disconnect frame before the close");
        assert_eq!(code, Some(4403), "{user}");
        assert_eq!(reason, format!("banned, {user}: spam"));
        assert_eq!(disconnect["code"], 4403);
        assert_eq!(disconnect["reason"], format!("banned, {user}: spam"));
        assert_eq!(disconnect["reconnect"], expected, "{user}: {disconnect}");
    }

    // Neither the catalogue nor the private-use range, or a catalogue
    // code with another rule than its own: refused, nothing is closed.
    let (bystander, conn) = open("bea").await;
    for (code, reconnect, says) in [
        (5000, None, "4000-4999"),
        (1004, None, "catalogue"),
        (3000, None, "4000-4999"),
        (1002, None, "only the edge"),
        (4003, Some(true), "reconnect false"),
    ] {
        let e = router
            .disconnect(DisconnectRequest {
                target: Some(disconnect_request::Target::Conn(conn.clone())),
                code,
                reason: "no".into(),
                reconnect,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{code}");
        assert!(e.message().contains(says), "{code}: {}", e.message());
    }
    assert_eq!(
        bystander.request(json!({"op":"ping"})).await.unwrap()["op"],
        "pong"
    );
}
