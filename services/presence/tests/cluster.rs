//! Presence replicas together, in real time, on a real `nats-server` and on
//! the in-memory broker: both replicas hold the same view, exactly one
//! publishes the cluster-wide events and the other takes over when it stops,
//! `Presence.Watch` streams events in order over a real gRPC connection, a
//! replica started late announces nothing it merely finds, and an edge
//! killed without a word is reaped on time.

mod common;

use std::time::Duration;

use futures::StreamExt;
use herald_presence::{Presence, UserStatusRequest};
use herald_proto::v1::WatchRequest;
use herald_proto::v1::presence_client::PresenceClient;
use herald_test_support::{NatsServer, eventually};
use herald_wire::presence::Change;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use common::*;

async fn replica(connect: &Connect, id: &str, shutdown: &CancellationToken) -> Presence {
    Presence::start(fast_config(id), connect(id).await, shutdown.clone())
        .await
        .unwrap()
}

async fn leads(p: &Presence) {
    eventually(WAIT, &format!("{} leads", p.replica_id()), || async {
        p.is_leader().then_some(())
    })
    .await
}

async fn status(p: &Presence, users: &[&str]) -> Vec<(String, bool, Vec<String>)> {
    p.user_status(UserStatusRequest {
        users: users.iter().map(|u| u.to_string()).collect(),
    })
    .await
    .users
    .into_iter()
    .map(|u| {
        let conns = u
            .conns
            .iter()
            .map(|c| format!("{}@{}", c.conn, c.node))
            .collect();
        (u.user, u.online, conns)
    })
    .collect()
}

/// Both replicas fold the same reports into the same view.
async fn two_replicas_hold_the_same_view(connect: Connect) {
    let e1 = FakeEdge::start("e1", connect("edge-1").await).await;
    let e2 = FakeEdge::start("e2", connect("edge-2").await).await;
    let shutdown = CancellationToken::new();
    let a = replica(&connect, "p-a", &shutdown).await;
    e1.connect("c1", "ada").await;
    e1.join("c1", ROOM, Some(json!({"typing": true}))).await;
    let b = replica(&connect, "p-b", &shutdown).await;
    e2.connect("d1", "ada").await;
    e2.join("d1", ROOM, None).await;
    e2.connect("d2", "bob").await;
    e2.join("d2", ROOM, None).await;

    let want = ["ada: c1@e1 d1@e2", "bob: d2@e2"];
    for p in [&a, &b] {
        eventually(
            WAIT,
            &format!("{} has the lobby", p.replica_id()),
            || async { (shape(&p.room_members(room(ROOM)).await) == want).then_some(()) },
        )
        .await;
    }
    assert_eq!(
        a.room_members(room(ROOM)).await,
        b.room_members(room(ROOM)).await
    );
    let users = ["ada", "bob", "cy"];
    assert_eq!(status(&a, &users).await, status(&b, &users).await);
    assert_eq!(
        status(&a, &["ada"]).await,
        [("ada".into(), true, vec!["c1@e1".into(), "d1@e2".into()])]
    );

    // And the same change reaches both.
    e1.change(Change::Disconnect { conn: "c1".into() }).await;
    for p in [&a, &b] {
        eventually(WAIT, &format!("{} saw c1 go", p.replica_id()), || async {
            (shape(&p.room_members(room(ROOM)).await) == ["ada: d1@e2", "bob: d2@e2"]).then_some(())
        })
        .await;
    }
    assert_eq!(status(&a, &users).await, status(&b, &users).await);
    shutdown.cancel();
}

/// Exactly one replica publishes user events; when it stops, the other
/// takes over.
async fn one_leader_publishes_and_the_other_takes_over(connect: Connect) {
    let listener = connect("listener").await;
    let mut published = UserEvents::subscribe(&listener).await;
    let e1 = FakeEdge::start("e1", connect("edge-1").await).await;
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let a = replica(&connect, "p-a", &stop_a).await;
    let b = replica(&connect, "p-b", &stop_b).await;
    leads(&a).await;
    eventually(WAIT, "b follows", || async {
        (!b.is_leader()).then_some(())
    })
    .await;

    // Both compute ada's online; one message reaches the broker. (A repeat
    // would arrive before the marker: one task publishes, in order.)
    e1.connect("c1", "ada").await;
    e1.connect("z1", "zed").await;
    assert_eq!(
        published.until(|e| e.contains("zed")).await,
        ["online ada c1", "online zed z1"]
    );
    assert!(a.is_leader() && !b.is_leader());

    // The leader stops; the other takes over and publishes from then on.
    stop_a.cancel();
    leads(&b).await;
    e1.connect("c2", "bob").await;
    let seen = published.until(|e| e.contains("bob")).await;
    // A takeover may re-publish events of the last moments (same ids).
    let (last, repeats) = seen.split_last().unwrap();
    assert_eq!(last, "online bob c2");
    for r in repeats {
        assert!(
            ["online ada c1", "online zed z1"].contains(&r.as_str()),
            "{r}"
        );
    }
    e1.close("c1").await;
    assert_eq!(published.next().await, "offline ada c1");
    stop_b.cancel();
}

/// `Presence.Watch` over a real gRPC connection: a room's events and its
/// users' transitions, in the order they happened (one edge's reports keep
/// their order on the broker); other rooms' and other users' not.
async fn watch_streams_events_in_order(connect: Connect) {
    let e1 = FakeEdge::start("e1", connect("edge-1").await).await;
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(herald_presence::run(
        fast_config("p-a"),
        connect("presence").await,
        grpc,
        http,
        None,
        shutdown.clone(),
    ));
    let mut client = eventually(WAIT, "the gRPC server listens", || async {
        PresenceClient::connect(format!("http://{grpc_addr}"))
            .await
            .ok()
    })
    .await;
    let mut events = client
        .watch(WatchRequest {
            rooms: vec![ROOM.into()],
            users: vec!["ada".into()],
        })
        .await
        .unwrap()
        .into_inner();

    e1.connect("c1", "ada").await;
    e1.join("c1", ROOM, Some(json!({"typing": false}))).await;
    e1.join("c1", "chat:other", None).await;
    e1.connect("d1", "bob").await;
    e1.join("d1", ROOM, None).await;
    e1.change(Change::Meta {
        conn: "c1".into(),
        room: ROOM.into(),
        meta: json!({"typing": true}),
    })
    .await;
    e1.leave("d1", ROOM).await;
    e1.close("c1").await;

    let mut seen = Vec::new();
    while seen.len() < 7 {
        let ev = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on")
            .unwrap();
        assert!(ev.ts_ms > 1_700_000_000_000, "{ev:?}");
        let about = if ev.room.is_empty() {
            &ev.user
        } else {
            &ev.room
        };
        seen.push(format!(
            "{} {about} {}@{} {}",
            ev.event, ev.conn, ev.node, ev.meta
        ));
    }
    assert_eq!(
        seen.iter().map(|s| s.trim_end()).collect::<Vec<_>>(),
        [
            "online ada c1@e1",
            r#"join chat:lobby c1@e1 {"typing":false}"#,
            "join chat:lobby d1@e1",
            r#"update chat:lobby c1@e1 {"typing":true}"#,
            "leave chat:lobby d1@e1",
            r#"leave chat:lobby c1@e1 {"typing":true}"#,
            "offline ada c1@e1",
        ]
    );

    // Stopping the server ends the stream.
    shutdown.cancel();
    let end = tokio::time::timeout(WAIT, events.next()).await.unwrap();
    assert!(
        matches!(&end, None | Some(Err(_))),
        "the stream ends: {end:?}"
    );
    tokio::time::timeout(WAIT, server)
        .await
        .expect("run returns after shutdown")
        .unwrap()
        .unwrap();
}

/// A replica started while the edges hold connections finds them and says
/// nothing about them, on the broker or in its watchers' streams.
async fn a_late_replica_announces_nothing_it_finds(connect: Connect) {
    let listener = connect("listener").await;
    let mut published = UserEvents::subscribe(&listener).await;
    let e1 = FakeEdge::start("e1", connect("edge-1").await).await;
    let e2 = FakeEdge::start("e2", connect("edge-2").await).await;
    e1.connect("c1", "ada").await;
    e1.join("c1", ROOM, None).await;
    e2.connect("d1", "ada").await;
    e2.connect("d2", "bob").await;
    e2.join("d2", ROOM, None).await;

    let shutdown = CancellationToken::new();
    let p = replica(&connect, "p-late", &shutdown).await;
    let mut watch = p
        .watch(
            vec![ROOM.into()],
            vec!["ada".into(), "bob".into(), "zed".into()],
        )
        .await
        .unwrap();
    leads(&p).await;
    assert_eq!(
        shape(&p.room_members(room(ROOM)).await),
        ["ada: c1@e1", "bob: d2@e2"]
    );
    e1.connect("z", "zed").await;
    assert_eq!(
        published.until(|e| e.contains("zed")).await,
        ["online zed z"]
    );
    let first = tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.event.as_str(), first.user.as_str()),
        ("online", "zed")
    );
    shutdown.cancel();
}

/// kill -9 of an edge: within the edge timeout (+1 s) its clients are gone
/// from the member list, the room heard their leaves, and each user with no
/// other connection went offline once, after the grace period.
async fn a_killed_edge_is_reaped(connect: Connect) {
    let listener = connect("listener").await;
    let mut published = UserEvents::subscribe(&listener).await;
    let mut frames = RoomFrames::subscribe(&listener, ROOM).await;
    let e1 = FakeEdge::start("e1", connect("edge-1").await).await;
    let e2 = FakeEdge::start("e2", connect("edge-2").await).await;
    let beat = Duration::from_millis(300);
    e1.heartbeat_every(beat);
    e2.heartbeat_every(beat);
    let shutdown = CancellationToken::new();
    let config = fast_config("p-a");
    let p = Presence::start(config.clone(), connect("p-a").await, shutdown.clone())
        .await
        .unwrap();
    leads(&p).await;

    e1.connect("c1", "ada").await;
    e1.join("c1", ROOM, None).await;
    e1.connect("c2", "bob").await;
    e1.join("c2", ROOM, None).await;
    // ada's first connection is c1 (reports of two edges may overtake).
    members_become(&listener, ROOM, &["ada: c1@e1", "bob: c2@e1"]).await;
    e2.connect("d1", "ada").await;
    e2.join("d1", ROOM, None).await;
    members_become(&listener, ROOM, &["ada: c1@e1 d1@e2", "bob: c2@e1"]).await;
    assert_eq!(
        published.until(|e| e.contains("bob")).await,
        ["online ada c1", "online bob c2"]
    );

    let killed = Instant::now();
    e1.kill();
    members_become(&listener, ROOM, &["ada: d1@e2"]).await;
    let gone = killed.elapsed();
    assert!(
        gone <= config.edge_timeout + Duration::from_secs(1),
        "reaped {gone:?} after the kill"
    );
    let mut left = vec![frames.next().await, frames.next().await];
    left.sort();
    assert_eq!(left, ["leave ada c1", "leave bob c2"]);

    assert_eq!(published.next().await, "offline bob c2");
    assert!(killed.elapsed() >= config.grace);
    // Once, and nothing for ada, who is still on e2.
    e2.connect("z", "zed").await;
    assert_eq!(
        published.until(|e| e.contains("zed")).await,
        ["online zed z"]
    );
    let status = status(&p, &["ada", "bob"]).await;
    assert_eq!(
        status,
        [
            ("ada".into(), true, vec!["d1@e2".into()]),
            ("bob".into(), false, vec![])
        ]
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_two_replicas_hold_the_same_view() {
    two_replicas_hold_the_same_view(memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_two_replicas_hold_the_same_view() {
    let server = NatsServer::start().unwrap();
    two_replicas_hold_the_same_view(nats(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_one_leader_publishes_and_the_other_takes_over() {
    one_leader_publishes_and_the_other_takes_over(memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_one_leader_publishes_and_the_other_takes_over() {
    let server = NatsServer::start().unwrap();
    one_leader_publishes_and_the_other_takes_over(nats(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_watch_streams_events_in_order() {
    watch_streams_events_in_order(memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_watch_streams_events_in_order() {
    let server = NatsServer::start().unwrap();
    watch_streams_events_in_order(nats(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_a_late_replica_announces_nothing_it_finds() {
    a_late_replica_announces_nothing_it_finds(memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_late_replica_announces_nothing_it_finds() {
    let server = NatsServer::start().unwrap();
    a_late_replica_announces_nothing_it_finds(nats(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_a_killed_edge_is_reaped() {
    a_killed_edge_is_reaped(memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_killed_edge_is_reaped() {
    let server = NatsServer::start().unwrap();
    a_killed_edge_is_reaped(nats(&server)).await;
}
