//! The presence service end to end, on a real `nats-server` and on the
//! in-memory broker: fake edges publish reports and answer sync requests as
//! real edges do; queries go over the broker (prost-encoded, as edges send
//! them) and over gRPC on a real TCP listener.

mod common;

use std::time::Duration;

use bytes::Bytes;
use herald_presence::{Config, Presence, RoomMembersRequest, UserStatusRequest};
use herald_proto::v1::WatchRequest;
use herald_proto::v1::presence_client::PresenceClient;
use herald_test_support::{NatsServer, eventually};
use herald_wire::presence::{Change, EdgeReport};
use herald_wire::subjects;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use common::*;

/// The standalone process: edges on two nodes, queries over the broker and
/// over gRPC, read-your-writes, health and metrics.
async fn serves_edges_and_grpc(connect: Connect) {
    let e1 = FakeEdge::start("e1", connect("edge-1").await).await;
    let e2 = FakeEdge::start("e2", connect("edge-2").await).await;
    let asker = connect("asker").await;

    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let (gone_tx, gone_rx) = tokio::sync::mpsc::channel(4);
    let server = tokio::spawn(herald_presence::run(
        config(),
        connect("presence").await,
        grpc,
        http,
        Some(gone_rx),
        shutdown.clone(),
    ));
    eventually(WAIT, "the presence process is ready", || async {
        (get(http_addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;

    // ada on both edges, bob on e2; all three in the lobby.
    e1.connect("c1", "ada").await;
    e1.join("c1", ROOM, Some(json!({"typing": true}))).await;
    e2.connect("d1", "ada").await;
    e2.join("d1", ROOM, None).await;
    e2.connect("d2", "bob").await;
    let seq = e2.join("d2", ROOM, None).await;

    // Read-your-writes: asked right after its own join, e2 sees it.
    let reply = members_by_broker(
        &asker,
        RoomMembersRequest {
            room: ROOM.into(),
            after_node: "e2".into(),
            after_seq: seq,
        },
    )
    .await;
    assert!(
        shape(&reply).iter().any(|m| m.contains("d2@e2")),
        "read-your-writes: {reply:?}"
    );

    members_become(&asker, ROOM, &["ada: c1@e1 d1@e2", "bob: d2@e2"]).await;
    let reply = members_by_broker(&asker, room(ROOM)).await;
    assert_eq!(reply.room, ROOM);
    let c1 = &reply.members[0].conns[0];
    assert_eq!(
        (c1.user.as_str(), c1.since_ms, c1.meta.as_str()),
        ("ada", 1_700_000_000_500, r#"{"typing":true}"#)
    );
    assert_eq!(reply.members[0].conns[1].meta, "");

    // A position the edge never reaches: answered after `query_wait`.
    let started = tokio::time::Instant::now();
    let late = members_by_broker(
        &asker,
        RoomMembersRequest {
            room: ROOM.into(),
            after_node: "e2".into(),
            after_seq: seq + 100,
        },
    )
    .await;
    assert!(started.elapsed() >= config().query_wait);
    assert_eq!(late.members.len(), 2);

    let status = status_by_broker(&asker, &["ada", "carol"]).await;
    assert_eq!(status.users.len(), 2);
    let ada = &status.users[0];
    assert!(ada.online);
    let devices: Vec<_> = ada
        .conns
        .iter()
        .map(|c| (c.conn.as_str(), c.node.as_str(), c.meta.as_str()))
        .collect();
    assert_eq!(devices, [("c1", "e1", ""), ("d1", "e2", "")]);
    assert_eq!(
        (status.users[1].user.as_str(), status.users[1].online),
        ("carol", false)
    );

    // Unreadable requests get no answer.
    let garbage = asker
        .request(
            subjects::PRESENCE_QUERY_ROOM_MEMBERS.into(),
            Bytes::from_static(&[0xff, 0xff, 0xff]),
            Duration::from_millis(300),
        )
        .await;
    assert!(garbage.is_err(), "{garbage:?}");

    // gRPC gives the same answers from the same view.
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = PresenceClient::new(channel.clone());
    let by_grpc = client.room_members(room(ROOM)).await.unwrap().into_inner();
    assert_eq!(by_grpc, members_by_broker(&asker, room(ROOM)).await);
    let by_grpc = client
        .user_status(UserStatusRequest {
            users: vec!["ada".into(), "carol".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_grpc, status);
    let err = client.room_members(room("")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let err = client
        .user_status(UserStatusRequest { users: vec![] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let err = client.watch(WatchRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let err = client
        .watch(WatchRequest {
            rooms: vec!["no namespace".into()],
            users: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // The standard gRPC health service reports Presence.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "herald.v1.Presence".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Leaving and disconnecting show, and metrics follow.
    e2.change(Change::Disconnect { conn: "d2".into() }).await;
    members_become(&asker, ROOM, &["ada: c1@e1 d1@e2"]).await;
    let (status, metrics) = get(http_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("herald_presence_connections 2"),
        "{metrics}"
    );

    // A pod the Kubernetes watch reports gone is reaped at once, long before
    // the edge timeout (10 s here).
    let reaping = tokio::time::Instant::now();
    gone_tx.send("e1".into()).await.unwrap();
    members_become(&asker, ROOM, &["ada: d1@e2"]).await;
    assert!(reaping.elapsed() < config().edge_timeout / 2);
    e1.kill();

    shutdown.cancel();
    tokio::time::timeout(WAIT, server)
        .await
        .expect("run returns after shutdown")
        .unwrap()
        .unwrap();
    drop((e1, e2));
}

/// A replica started after the edges' deltas rebuilds its view from their
/// snapshots, and a lost delta is repaired by a snapshot of that edge.
async fn rebuilds_from_snapshots(connect: Connect) {
    let e1 = FakeEdge::start("e1", connect("edge-1").await).await;
    let e2 = FakeEdge::start("e2", connect("edge-2").await).await;
    // Nobody listens yet: these reports reach no presence replica.
    e1.connect("c1", "ada").await;
    e1.join("c1", ROOM, None).await;
    e2.connect("d1", "bob").await;
    e2.join("d1", ROOM, Some(json!({"x": 1}))).await;

    let shutdown = CancellationToken::new();
    let config = Config {
        query_wait: WAIT,
        ..config()
    };
    let presence = Presence::start(config, connect("presence").await, shutdown.clone())
        .await
        .unwrap();
    let metrics = herald_ops::new_metrics();
    presence.register_metrics(&metrics);
    let asker = connect("asker").await;
    eventually(WAIT, "the new replica rebuilt the lobby", || async {
        let reply = presence.room_members(room(ROOM)).await;
        (shape(&reply) == ["ada: c1@e1", "bob: d1@e2"]).then_some(())
    })
    .await;
    let reply = presence.room_members(room(ROOM)).await;
    assert_eq!(reply.members[1].conns[0].meta, r#"{"x":1}"#);

    // Deltas after the snapshot apply in order (read-your-writes again).
    let seq = e1.connect("c2", "cy").await;
    let seq_join = e1.join("c2", ROOM, None).await;
    assert_eq!(seq_join, seq + 1);
    let reply = presence
        .room_members(RoomMembersRequest {
            room: ROOM.into(),
            after_node: "e1".into(),
            after_seq: seq_join,
        })
        .await;
    assert_eq!(shape(&reply), ["ada: c1@e1", "bob: d1@e2", "cy: c2@e1"]);

    // A query for a report not sent yet waits for it, and is answered as
    // soon as it is applied (well before `query_wait`).
    let query = tokio::spawn({
        let presence = presence.clone();
        async move {
            presence
                .room_members(RoomMembersRequest {
                    room: ROOM.into(),
                    after_node: "e1".into(),
                    after_seq: seq_join + 1,
                })
                .await
        }
    });
    eventually(WAIT, "the query is parked", || async {
        metrics_text(&metrics)
            .contains("herald_presence_parked_queries 1")
            .then_some(())
    })
    .await;
    let asked = tokio::time::Instant::now();
    e1.change(Change::Leave {
        conn: "c2".into(),
        room: ROOM.into(),
    })
    .await;
    let reply = query.await.unwrap();
    assert!(
        asked.elapsed() < WAIT / 2,
        "answered only after {:?}",
        asked.elapsed()
    );
    assert_eq!(shape(&reply), ["ada: c1@e1", "bob: d1@e2"]);
    assert!(metrics_text(&metrics).contains("herald_presence_parked_queries 0"));

    // A lost delta: the next one reveals the gap, the edge is asked for a
    // snapshot on its own subject, and the view ends up right.
    e2.change_lost(Change::Disconnect { conn: "d1".into() })
        .await;
    e2.connect("d2", "dee").await;
    e2.join("d2", ROOM, None).await;
    members_become(&asker, ROOM, &["ada: c1@e1", "dee: d2@e2"]).await;
    let status = presence
        .user_status(UserStatusRequest {
            users: vec!["bob".into(), "dee".into()],
        })
        .await;
    // bob has no connection left; he is within his grace period.
    assert!(status.users[0].conns.is_empty());
    assert!(status.users[1].online);

    // An edge saying goodbye takes its connections with it.
    let seq = e1.inner.state.lock().await.seq;
    e1.inner
        .publish(EdgeReport::Goodbye {
            node: "e1".into(),
            seq,
        })
        .await;
    members_become(&asker, ROOM, &["dee: d2@e2"]).await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_serves_edges_and_grpc() {
    serves_edges_and_grpc(memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_rebuilds_from_snapshots() {
    rebuilds_from_snapshots(memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_serves_edges_and_grpc() {
    let server = NatsServer::start().unwrap();
    serves_edges_and_grpc(nats(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_rebuilds_from_snapshots() {
    let server = NatsServer::start().unwrap();
    rebuilds_from_snapshots(nats(&server)).await;
}
