//! Presence events from the running service, in paused tokio time on the
//! in-memory broker: every timer (grace period, edge timeout, replica
//! heartbeats, warm-up) runs out exactly, and a test can say "no event
//! happened" by letting time run far past the deadline and then seeing a
//! marker event arrive first. Fake edges report and heartbeat as real ones;
//! events are read from `Presence::watch` and from the subjects the leader
//! publishes on.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_broker::{MemoryBroker, SharedBroker};
use herald_presence::{Config, Presence, RoomMembersRequest, UserStatusRequest, Watch};
use herald_test_support::eventually;
use herald_wire::presence::Change;
use herald_wire::subjects;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use common::*;

const GRACE: Duration = Duration::from_secs(5);
const EDGE_TIMEOUT: Duration = Duration::from_secs(10);
const EDGE_HEARTBEAT: Duration = Duration::from_secs(2);

fn memory_broker() -> SharedBroker {
    Arc::new(MemoryBroker::new())
}

/// The defaults (grace 5 s, edge timeout 10 s, warm-up 3 s, …), named.
fn replica_config(id: &str) -> Config {
    Config {
        replica_id: id.into(),
        ..Config::default()
    }
}

async fn start(broker: &SharedBroker, id: &str, shutdown: &CancellationToken) -> Presence {
    Presence::start(replica_config(id), broker.clone(), shutdown.clone())
        .await
        .unwrap()
}

async fn leads(p: &Presence) {
    eventually(WAIT, &format!("{} leads", p.replica_id()), || async {
        p.is_leader().then_some(())
    })
    .await
}

async fn edge(broker: &SharedBroker, node: &str) -> FakeEdge {
    let e = FakeEdge::start(node, broker.clone()).await;
    e.heartbeat_every(EDGE_HEARTBEAT);
    e
}

/// The next watched event, as `online ada c1` or `join chat:lobby c1`.
async fn next(w: &mut Watch) -> String {
    let ev = tokio::time::timeout(WAIT * 3, w.next())
        .await
        .expect("a watched event in time")
        .expect("the watch goes on");
    let subject = if ev.room.is_empty() {
        &ev.user
    } else {
        &ev.room
    };
    format!("{} {subject} {}", ev.event, ev.conn)
}

fn metrics(p: &Presence) -> herald_ops::Metrics {
    let m = herald_ops::new_metrics();
    p.register_metrics(&m);
    m
}

fn user_events_computed(m: &herald_ops::Metrics) -> (u64, u64) {
    let text = metrics_text(m);
    let count = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    (
        count("herald_presence_online_events_total "),
        count("herald_presence_offline_events_total "),
    )
}

#[tokio::test(start_paused = true)]
async fn three_devices_on_three_edges_are_one_online_and_one_offline_after_the_last_and_the_grace()
{
    let broker = memory_broker();
    let shutdown = CancellationToken::new();
    let (e1, e2, e3) = (
        edge(&broker, "e1").await,
        edge(&broker, "e2").await,
        edge(&broker, "e3").await,
    );
    let p = start(&broker, "p1", &shutdown).await;
    leads(&p).await;
    let mut published = UserEvents::subscribe(&broker).await;
    let mut w = p
        .watch(vec![], vec!["ada".into(), "zed".into()])
        .await
        .unwrap();

    e1.connect("p", "ada").await;
    e2.connect("l", "ada").await;
    e3.connect("t", "ada").await;
    assert_eq!(next(&mut w).await, "online ada p");

    e1.close("p").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    e3.close("t").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let last = Instant::now();
    e2.close("l").await;
    let status = p
        .user_status(UserStatusRequest {
            users: vec!["ada".into()],
        })
        .await;
    assert!(status.users[0].online, "online through the grace period");
    assert_eq!(next(&mut w).await, "offline ada l");
    let after = last.elapsed();
    assert!(
        after >= GRACE && after < GRACE + Duration::from_millis(50),
        "offline {after:?} after the last device closed"
    );

    // Exactly once, on the watch and on the broker: a marker comes next.
    tokio::time::sleep(GRACE * 2).await;
    e1.connect("z", "zed").await;
    assert_eq!(next(&mut w).await, "online zed z");
    let seen = published.until(|e| e.contains("zed")).await;
    assert_eq!(seen, ["online ada p", "offline ada l", "online zed z"]);
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn reconnecting_within_the_grace_period_emits_nothing() {
    let broker = memory_broker();
    let shutdown = CancellationToken::new();
    let (e1, e2) = (edge(&broker, "e1").await, edge(&broker, "e2").await);
    let p = start(&broker, "p1", &shutdown).await;
    leads(&p).await;
    let mut published = UserEvents::subscribe(&broker).await;
    let mut w = p
        .watch(vec![ROOM.into()], vec!["ada".into(), "zed".into()])
        .await
        .unwrap();

    e1.connect("c1", "ada").await;
    assert_eq!(next(&mut w).await, "online ada c1");
    e1.close("c1").await;
    // A page reload that lands on another edge just before the deadline.
    tokio::time::sleep(GRACE - Duration::from_millis(100)).await;
    e2.connect("c2", "ada").await;
    tokio::time::sleep(GRACE * 3).await;

    e1.connect("z", "zed").await;
    assert_eq!(next(&mut w).await, "online zed z");
    let seen = published.until(|e| e.contains("zed")).await;
    assert_eq!(seen, ["online ada c1", "online zed z"]);
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_killed_edge_is_reaped_after_the_edge_timeout() {
    let broker = memory_broker();
    let shutdown = CancellationToken::new();
    let (e1, e2) = (edge(&broker, "e1").await, edge(&broker, "e2").await);
    let p = start(&broker, "p1", &shutdown).await;
    leads(&p).await;
    let mut published = UserEvents::subscribe(&broker).await;
    let mut frames = RoomFrames::subscribe(&broker, ROOM).await;
    let mut w = p
        .watch(
            vec![ROOM.into()],
            vec!["ada".into(), "bob".into(), "zed".into()],
        )
        .await
        .unwrap();

    // ada on both edges, bob only on e1; all in the lobby.
    e1.connect("c1", "ada").await;
    e1.join("c1", ROOM, None).await;
    e1.connect("c2", "bob").await;
    e1.join("c2", ROOM, None).await;
    e2.connect("d1", "ada").await;
    e2.join("d1", ROOM, None).await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(next(&mut w).await);
    }
    assert_eq!(
        seen,
        [
            "online ada c1",
            "join chat:lobby c1",
            "online bob c2",
            "join chat:lobby c2",
            "join chat:lobby d1",
        ]
    );

    let killed = Instant::now();
    e1.kill();
    assert_eq!(next(&mut w).await, "leave chat:lobby c1");
    assert_eq!(next(&mut w).await, "leave chat:lobby c2");
    let reaped = killed.elapsed();
    assert!(
        reaped <= EDGE_TIMEOUT + Duration::from_secs(1),
        "reaped {reaped:?} after the kill"
    );
    let members = p.room_members(room(ROOM)).await;
    assert_eq!(shape(&members), ["ada: d1@e2"]);
    // The edge is dead: the leader tells the room.
    assert_eq!(frames.next().await, "leave ada c1");
    assert_eq!(frames.next().await, "leave bob c2");

    // bob had no other connection: offline once, after the grace period.
    let at = Instant::now();
    assert_eq!(next(&mut w).await, "offline bob c2");
    assert!(at.elapsed() >= GRACE - Duration::from_millis(1));
    tokio::time::sleep(GRACE * 2).await;
    e2.connect("z", "zed").await;
    assert_eq!(next(&mut w).await, "online zed z");
    let seen = published.until(|e| e.contains("zed")).await;
    assert_eq!(
        seen,
        [
            "online ada c1",
            "online bob c2",
            "offline bob c2",
            "online zed z"
        ]
    );
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn the_pod_watch_reaps_an_edge_at_once() {
    let broker = memory_broker();
    let shutdown = CancellationToken::new();
    let e1 = edge(&broker, "e1").await;
    let p = start(&broker, "p1", &shutdown).await;
    leads(&p).await;
    let mut frames = RoomFrames::subscribe(&broker, ROOM).await;
    e1.connect("c1", "ada").await;
    let seq = e1.join("c1", ROOM, None).await;
    p.room_members(RoomMembersRequest {
        room: ROOM.into(),
        after_node: "e1".into(),
        after_seq: seq,
    })
    .await;
    let mut w = p
        .watch(vec![ROOM.into()], vec!["ada".into()])
        .await
        .unwrap();

    e1.kill();
    let at = Instant::now();
    assert_eq!(p.reap_node("e1").await, 1);
    assert_eq!(at.elapsed(), Duration::ZERO);
    assert_eq!(next(&mut w).await, "leave chat:lobby c1");
    assert_eq!(frames.next().await, "leave ada c1");
    assert!(p.room_members(room(ROOM)).await.members.is_empty());
    assert_eq!(next(&mut w).await, "offline ada c1");
    assert!(at.elapsed() >= GRACE);
    assert_eq!(p.reap_node("e1").await, 0);
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_resync_after_a_gap_emits_what_it_reveals() {
    let broker = memory_broker();
    let shutdown = CancellationToken::new();
    let e1 = edge(&broker, "e1").await;
    let p = start(&broker, "p1", &shutdown).await;
    leads(&p).await;
    let mut frames = RoomFrames::subscribe(&broker, ROOM).await;
    let mut w = p
        .watch(vec![ROOM.into()], vec!["ada".into(), "bob".into()])
        .await
        .unwrap();
    e1.connect("c1", "ada").await;
    e1.join("c1", ROOM, None).await;
    assert_eq!(next(&mut w).await, "online ada c1");
    assert_eq!(next(&mut w).await, "join chat:lobby c1");

    // Two reports are lost; the next one reveals the gap.
    e1.change_lost(Change::Leave {
        conn: "c1".into(),
        room: ROOM.into(),
    })
    .await;
    e1.change_lost(Change::Connect {
        conn: "c2".into(),
        user: "bob".into(),
        since_ms: 1,
    })
    .await;
    e1.join("c2", ROOM, None).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next(&mut w).await);
    }
    assert_eq!(
        seen,
        ["leave chat:lobby c1", "online bob c2", "join chat:lobby c2"]
    );
    // Nobody told the room that c1 left (in this test the fake edge does not
    // announce): the leader does.
    assert_eq!(frames.next().await, "leave ada c1");
    assert_eq!(shape(&p.room_members(room(ROOM)).await), ["bob: c2@e1"]);
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_replica_started_after_the_edges_emits_nothing_about_what_it_finds() {
    let broker = memory_broker();
    let shutdown = CancellationToken::new();
    let (e1, e2) = (edge(&broker, "e1").await, edge(&broker, "e2").await);
    e1.connect("c1", "ada").await;
    e1.join("c1", ROOM, None).await;
    e2.connect("d1", "bob").await;
    e2.join("d1", ROOM, None).await;
    let mut published = UserEvents::subscribe(&broker).await;

    let p = start(&broker, "p1", &shutdown).await;
    let m = metrics(&p);
    let mut w = p
        .watch(
            vec![ROOM.into()],
            vec!["ada".into(), "bob".into(), "zed".into()],
        )
        .await
        .unwrap();
    leads(&p).await;
    assert_eq!(
        shape(&p.room_members(room(ROOM)).await),
        ["ada: c1@e1", "bob: d1@e2"]
    );
    assert_eq!(user_events_computed(&m), (0, 0));

    // Later changes are events again.
    e1.connect("z", "zed").await;
    assert_eq!(next(&mut w).await, "online zed z");
    assert_eq!(
        published.until(|e| e.contains("zed")).await,
        ["online zed z"]
    );
    e2.close("d1").await;
    assert_eq!(next(&mut w).await, "leave chat:lobby d1");
    assert_eq!(next(&mut w).await, "offline bob d1");
    assert_eq!(user_events_computed(&m), (1, 1));
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn restarting_a_replica_emits_no_online_or_offline() {
    let broker = memory_broker();
    let (e1, e2) = (edge(&broker, "e1").await, edge(&broker, "e2").await);
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let a = start(&broker, "p-a", &stop_a).await;
    let b = start(&broker, "p-b", &stop_b).await;
    leads(&a).await;
    assert!(!b.is_leader());
    let mut published = UserEvents::subscribe(&broker).await;
    e1.connect("c1", "ada").await;
    e2.connect("d1", "ada").await;
    e2.connect("d2", "bob").await;
    assert_eq!(
        published.until(|e| e.contains("bob")).await,
        ["online ada c1", "online bob d2"]
    );

    // a restarts (after its heartbeats said it is alive past those events:
    // b, taking over, has nothing to re-publish); b leads meanwhile; the new
    // a leads again once warm.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_a.cancel();
    leads(&b).await;
    let stop_a = CancellationToken::new();
    let a = start(&broker, "p-a", &stop_a).await;
    let m = metrics(&a);
    leads(&a).await;
    eventually(WAIT, "b follows", || async {
        (!b.is_leader()).then_some(())
    })
    .await;
    assert_eq!(user_events_computed(&m), (0, 0));

    e1.connect("z", "zed").await;
    assert_eq!(
        published.until(|e| e.contains("zed")).await,
        ["online zed z"]
    );
    // And the restarted replica's view is whole: ada's last device closing
    // is an offline after the grace.
    e1.close("c1").await;
    e2.close("d1").await;
    assert_eq!(published.next().await, "offline ada d1");
    stop_a.cancel();
    stop_b.cancel();
}

/// Another replica leading, as its heartbeats say (it is never started here:
/// the test speaks for it, and falls silent as a crashed replica does).
struct FakeLeader {
    broker: SharedBroker,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl FakeLeader {
    fn start(broker: &SharedBroker) -> FakeLeader {
        let b = broker.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Config::default().replica_heartbeat);
            loop {
                tick.tick().await;
                Self::heartbeat(&b).await;
            }
        });
        FakeLeader {
            broker: broker.clone(),
            task: Some(task),
        }
    }

    async fn heartbeat(broker: &SharedBroker) {
        broker
            .publish(
                subjects::PRESENCE_REPLICAS.into(),
                Bytes::from_static(br#"{"replica_id":"a-fake","started_ms":1,"warm":true}"#),
            )
            .await
            .unwrap();
    }

    /// One last heartbeat, then silence.
    async fn crash(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        Self::heartbeat(&self.broker).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_follower_takes_over_from_a_silent_leader_and_republishes_what_it_may_have_missed() {
    let broker = memory_broker();
    let shutdown = CancellationToken::new();
    let e1 = edge(&broker, "e1").await;
    let mut other = FakeLeader::start(&broker);
    let p = start(&broker, "p-b", &shutdown).await;
    let m = metrics(&p);
    tokio::time::sleep(Config::default().warmup * 2).await;
    assert!(!p.is_leader());
    let mut published = UserEvents::subscribe(&broker).await;

    // bob's online was computed while the other replica led and was heard
    // after it: that one published it.
    e1.connect("c0", "bob").await;
    eventually(WAIT, "bob is online", || async {
        (user_events_computed(&m).0 == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    other.crash().await;
    let silent = Instant::now();
    // ada's, after its last heartbeat, it may not have published.
    tokio::time::sleep(Duration::from_millis(10)).await;
    e1.connect("c1", "ada").await;
    eventually(WAIT, "ada is online", || async {
        (user_events_computed(&m).0 == 2).then_some(())
    })
    .await;
    assert!(!p.is_leader());

    leads(&p).await;
    let took_over = silent.elapsed();
    let timeout = Config::default().replica_timeout;
    assert!(
        took_over >= timeout && took_over < timeout + Duration::from_millis(300),
        "took over after {took_over:?}"
    );
    e1.connect("z", "zed").await;
    assert_eq!(
        published.until(|e| e.contains("zed")).await,
        ["online ada c1", "online zed z"]
    );
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn watch_ends_when_the_replica_stops() {
    let broker = memory_broker();
    let shutdown = CancellationToken::new();
    let p = start(&broker, "p1", &shutdown).await;
    let mut w = p.watch(vec![ROOM.into()], vec![]).await.unwrap();
    shutdown.cancel();
    assert_eq!(w.next().await, Err(herald_presence::WatchEnd::Stopped));
    assert!(p.watch(vec![ROOM.into()], vec![]).await.is_err());
}
