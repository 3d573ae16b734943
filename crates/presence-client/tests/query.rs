//! Queries against a real presence service, through the in-process broker
//! and over gRPC: both ways give the same answer.

use std::sync::Arc;
use std::time::Duration;

use herald_broker::{MemoryBroker, SharedBroker};
use herald_presence::Presence;
use herald_presence_client::{PresenceQuery, QueryError, Source};
use herald_proto::v1::{RoomMembersRequest, UserStatusRequest};
use tokio_util::sync::CancellationToken;

const TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::test]
async fn broker_and_grpc_give_the_same_answer() {
    let broker: SharedBroker = Arc::new(MemoryBroker::new());
    let shutdown = CancellationToken::new();
    let presence = Presence::start(Default::default(), broker.clone(), shutdown.clone())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(presence.grpc_service())
            .serve_with_incoming_shutdown(
                herald_ops::grpc_incoming(listener, None),
                shutdown.clone().cancelled_owned(),
            ),
    );
    let through_broker = PresenceQuery::new(broker.clone(), Source::Broker, TIMEOUT);
    let grpc = Source::from_url(Some(&url), None, None).unwrap();
    let direct = PresenceQuery::new(broker, grpc, TIMEOUT);
    assert!(through_broker.grpc().is_none() && direct.grpc().is_some());

    let users = UserStatusRequest {
        users: vec!["alice".into()],
    };
    let a = through_broker.user_status(users.clone()).await.unwrap();
    let b = direct.user_status(users).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(a.users.len(), 1);
    assert!(!a.users[0].online, "nobody connected: {a:?}");

    let room = RoomMembersRequest {
        room: "chat:lobby".into(),
        ..Default::default()
    };
    let a = through_broker.room_members(room.clone()).await.unwrap();
    let b = direct.room_members(room).await.unwrap();
    assert_eq!(a, b);
    shutdown.cancel();
}

#[tokio::test]
async fn without_a_replica_nobody_answers() {
    let broker: SharedBroker = Arc::new(MemoryBroker::new());
    let query = PresenceQuery::new(broker, Source::Broker, Duration::from_millis(200));
    let e = query
        .user_status(UserStatusRequest {
            users: vec!["alice".into()],
        })
        .await
        .unwrap_err();
    assert!(matches!(e, QueryError::NoAnswer(_)), "{e:?}");
    assert_eq!(e.to_string(), "no presence replica answered");
}

#[tokio::test]
async fn a_presence_url_is_checked_up_front() {
    assert!(matches!(
        Source::from_url(None, None, None),
        Ok(Source::Broker)
    ));
    assert!(Source::from_url(Some("not a url"), None, None).is_err());
    assert!(Source::from_url(Some("http://127.0.0.1:1"), Some("bad\ntoken"), None).is_err());
}
