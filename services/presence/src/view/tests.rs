use herald_wire::presence::RoomState;
use serde_json::json;

use super::*;
use herald_wire::presence::UserTransition;

const RETRY: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(10);

const GRACE: Duration = Duration::from_secs(5);
const WARMUP: Duration = Duration::from_secs(3);

fn config() -> Config {
    Config {
        edge_timeout: TIMEOUT,
        sync_retry: RETRY,
        grace: GRACE,
        warmup: Duration::ZERO,
        ..Config::default()
    }
}

/// A view past its warm-up: every change shows.
fn view() -> View {
    View::new(&config(), Instant::now())
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn delta(node: &str, seq: u64, change: Change) -> EdgeReport {
    EdgeReport::Delta {
        node: node.into(),
        seq,
        change,
    }
}

fn connect(conn: &str, user: &str) -> Change {
    Change::Connect {
        conn: conn.into(),
        user: user.into(),
        since_ms: 1000,
    }
}

fn join(conn: &str, room: &str, meta: Option<Value>) -> Change {
    Change::Join {
        conn: conn.into(),
        room: room.into(),
        meta,
        quiet: false,
    }
}

fn heartbeat(node: &str, seq: u64, started_ms: u64, conns: u64) -> EdgeReport {
    EdgeReport::Heartbeat {
        node: node.into(),
        seq,
        started_ms,
        conns,
    }
}

fn conn_state(conn: &str, user: &str, rooms: &[&str]) -> ConnState {
    ConnState {
        conn: conn.into(),
        user: user.into(),
        since_ms: 2000,
        rooms: rooms
            .iter()
            .map(|r| RoomState {
                room: (*r).into(),
                meta: None,
                quiet: false,
            })
            .collect(),
    }
}

fn snapshot(node: &str, seq: u64, started_ms: u64, conns: Vec<ConnState>) -> EdgeReport {
    EdgeReport::Snapshot {
        node: node.into(),
        seq,
        started_ms,
        conns,
    }
}

fn ask(node: &str) -> Vec<String> {
    vec![node.to_string()]
}

/// The edges a sync request goes to.
fn asks(fx: Vec<Effect>) -> Vec<String> {
    fx.into_iter()
        .filter_map(|e| match e {
            Effect::AskSync { node } => Some(node),
            _ => None,
        })
        .collect()
}

/// The events, compactly: `join chat:a c1`, `leave chat:a c1 inferred` (not
/// announced by the edge), `online ada c1` (with the connection that caused
/// it).
fn events(fx: Vec<Effect>) -> Vec<String> {
    fx.into_iter()
        .filter_map(|e| match e {
            Effect::AskSync { .. } => None,
            Effect::Room(r) => Some(format!(
                "{} {} {}{}",
                r.event.as_str(),
                r.room,
                r.conn,
                if r.announced { "" } else { " inferred" }
            )),
            Effect::User(u) => {
                let event = match u.event {
                    UserTransition::Online => "online",
                    UserTransition::Offline => "offline",
                };
                Some(format!("{event} {} {}", u.user, u.conn))
            }
        })
        .collect()
}

/// Applies reports that must not ask for a sync; returns their events.
fn feed(v: &mut View, now: Instant, reports: impl IntoIterator<Item = EdgeReport>) -> Vec<String> {
    let mut out = Vec::new();
    for r in reports {
        let shown = format!("{r:?}");
        let fx = v.apply(r, now);
        assert!(
            !fx.iter().any(|e| matches!(e, Effect::AskSync { .. })),
            "{shown} asked for a sync"
        );
        out.extend(events(fx));
    }
    v.assert_consistent();
    out
}

/// Connection ids of a room's members, in reply order.
fn members(v: &View, room: &str) -> Vec<String> {
    v.room_members(room)
        .members
        .iter()
        .flat_map(|m| m.conns.iter().map(|c| c.conn.clone()))
        .collect()
}

#[test]
fn deltas_in_order_build_the_view() {
    let now = Instant::now();
    let mut v = view();
    feed(
        &mut v,
        now,
        [
            delta("e1", 1, connect("c1", "ada")),
            delta(
                "e1",
                2,
                join("c1", "chat:a", Some(json!({"typing": false}))),
            ),
            delta("e1", 3, connect("c2", "bob")),
            delta("e1", 4, join("c2", "chat:a", None)),
            delta(
                "e1",
                5,
                Change::Meta {
                    conn: "c1".into(),
                    room: "chat:a".into(),
                    meta: json!({"typing": true}),
                },
            ),
        ],
    );
    assert_eq!(members(&v, "chat:a"), ["c1", "c2"]);
    let reply = v.room_members("chat:a");
    assert_eq!(reply.members[0].conns[0].meta, r#"{"typing":true}"#);
    assert_eq!(&*v.conn("c1").unwrap().node, "e1");
    assert_eq!(
        v.stats(),
        Stats {
            nodes: 1,
            conns: 2,
            users: 2,
            rooms: 1
        }
    );
    assert!(v.has_applied("e1", 5));
    assert!(!v.has_applied("e1", 6));

    feed(
        &mut v,
        now,
        [
            delta(
                "e1",
                6,
                Change::Leave {
                    conn: "c1".into(),
                    room: "chat:a".into(),
                },
            ),
            delta("e1", 7, Change::Disconnect { conn: "c2".into() }),
        ],
    );
    assert!(members(&v, "chat:a").is_empty());
    // bob counts as online until his grace period ends.
    assert_eq!(
        v.stats(),
        Stats {
            nodes: 1,
            conns: 1,
            users: 2,
            rooms: 0
        }
    );
    assert_eq!(events(v.expire(now + GRACE)), ["offline bob c2"]);
    assert_eq!(v.stats().users, 1);
    // Old reports change nothing.
    feed(&mut v, now, [delta("e1", 4, join("c1", "chat:a", None))]);
    assert!(members(&v, "chat:a").is_empty());
}

/// A batch is the deltas it stands for: the same view, the same events, and
/// its numbers continue the edge's sequence (a gap inside or before it asks
/// for a snapshot, a repeat is ignored).
#[test]
fn a_batch_of_deltas_is_its_deltas_in_order() {
    let now = Instant::now();
    let changes = || {
        vec![
            connect("c1", "ada"),
            join("c1", "chat:a", None),
            connect("c2", "bob"),
            join("c2", "chat:a", None),
        ]
    };
    let mut one_by_one = view();
    let singles = feed(
        &mut one_by_one,
        now,
        (1..).zip(changes()).map(|(seq, c)| delta("e1", seq, c)),
    );
    let mut batched = view();
    let batch = |seq: u64, changes: Vec<Change>| EdgeReport::Deltas {
        node: "e1".into(),
        seq,
        changes,
    };
    assert_eq!(feed(&mut batched, now, [batch(4, changes())]), singles);
    assert_eq!(members(&batched, "chat:a"), ["c1", "c2"]);
    assert!(batched.has_applied("e1", 4));
    assert_eq!(batched.stats(), one_by_one.stats());

    // Numbers already applied change nothing (a first number of 1 would
    // mean a restarted edge, so this replays from 2).
    assert!(feed(&mut batched, now, [batch(4, changes().split_off(1))]).is_empty());
    assert_eq!(batched.stats(), one_by_one.stats());
    // A batch that starts past the next number reveals a gap.
    let fx = batched.apply(batch(7, vec![disconnect("c1"), disconnect("c2")]), now);
    assert_eq!(asks(fx), ask("e1"));
    assert_eq!(members(&batched, "chat:a"), ["c1", "c2"]);
}

#[test]
fn an_edge_cannot_change_another_edges_connections() {
    let now = Instant::now();
    let mut v = view();
    feed(
        &mut v,
        now,
        [
            delta("e1", 1, connect("c1", "ada")),
            delta("e2", 1, Change::Disconnect { conn: "c1".into() }),
            delta("e2", 2, join("c1", "chat:a", None)),
        ],
    );
    assert!(v.conn("c1").is_some());
    assert!(members(&v, "chat:a").is_empty());
}

#[test]
fn a_gap_asks_for_a_snapshot_and_deltas_wait_for_it() {
    let now = Instant::now();
    let mut v = view();
    feed(
        &mut v,
        now,
        [
            delta("e1", 1, connect("c1", "ada")),
            delta("e1", 2, join("c1", "chat:a", None)),
        ],
    );
    // Report 3 was lost.
    assert_eq!(
        asks(v.apply(delta("e1", 4, connect("c2", "bob")), now)),
        ask("e1")
    );
    assert!(v.is_syncing("e1"));
    // Following deltas are ignored, and the request is not repeated at once.
    assert_eq!(
        asks(v.apply(delta("e1", 5, join("c2", "chat:a", None)), now)),
        Vec::<String>::new()
    );
    assert!(v.conn("c2").is_none());
    assert_eq!(members(&v, "chat:a"), ["c1"]);
    assert!(!v.has_applied("e1", 5));

    // The snapshot is the truth as of 5: c1 left the room, c2 and c3 joined.
    feed(
        &mut v,
        now,
        [snapshot(
            "e1",
            5,
            7,
            vec![
                conn_state("c1", "ada", &[]),
                conn_state("c2", "bob", &["chat:a"]),
                conn_state("c3", "cy", &["chat:a", "chat:b"]),
            ],
        )],
    );
    assert!(!v.is_syncing("e1"));
    assert!(v.has_applied("e1", 5));
    assert_eq!(members(&v, "chat:a"), ["c2", "c3"]);
    // And deltas apply again from the snapshot on.
    feed(
        &mut v,
        now,
        [delta("e1", 6, Change::Disconnect { conn: "c3".into() })],
    );
    assert_eq!(members(&v, "chat:a"), ["c2"]);
    assert!(members(&v, "chat:b").is_empty());
    assert_eq!(v.stats().rooms, 1);
}

#[test]
fn sync_requests_are_rate_limited_per_edge_and_retried() {
    let t0 = Instant::now();
    let mut v = view();
    feed(&mut v, t0, [delta("e1", 1, connect("c1", "ada"))]);
    assert_eq!(
        asks(v.apply(delta("e1", 3, connect("c2", "bob")), t0)),
        ask("e1")
    );
    assert_eq!(
        asks(v.apply(heartbeat("e1", 3, 7, 2), t0 + secs(1) / 2)),
        Vec::<String>::new()
    );
    // Another edge is asked on its own account.
    assert_eq!(
        asks(v.apply(delta("e2", 2, connect("c9", "zed")), t0)),
        ask("e2")
    );
    // Unanswered after `sync_retry`: the next report asks again…
    assert_eq!(
        asks(v.apply(heartbeat("e1", 3, 7, 2), t0 + RETRY)),
        ask("e1")
    );
    // …and so does the periodic tick when the edge stays quiet.
    let (fx, reaped) = v.tick(t0 + RETRY * 2);
    assert!(reaped.is_empty());
    let mut asked = asks(fx);
    asked.sort();
    assert_eq!(asked, ["e1", "e2"]);
}

#[test]
fn unknown_edges_are_asked_unless_nothing_was_missed() {
    let t0 = Instant::now();
    let mut v = view();
    // A first delta (seq 1) of a new edge misses nothing.
    feed(&mut v, t0, [delta("new", 1, connect("c1", "ada"))]);
    // An empty edge's heartbeat neither.
    feed(&mut v, t0, [heartbeat("empty", 0, 5, 0)]);
    assert_eq!(v.applied_seq("empty"), Some(0));
    // Anything later from an edge the view never heard of does.
    assert_eq!(
        asks(v.apply(delta("e1", 9, connect("c2", "bob")), t0)),
        ask("e1")
    );
    assert_eq!(asks(v.apply(heartbeat("e2", 4, 5, 1), t0)), ask("e2"));
    assert!(v.conn("c2").is_none());
}

#[test]
fn the_start_up_sync_covers_edges_heard_of_soon_after() {
    let t0 = Instant::now();
    let mut v = view();
    v.asked_all(t0);
    assert_eq!(
        asks(v.apply(heartbeat("e1", 4, 5, 1), t0 + RETRY / 2)),
        Vec::<String>::new()
    );
    assert!(v.is_syncing("e1"));
    // Still no snapshot after the retry interval: ask that edge itself.
    assert_eq!(
        asks(v.apply(heartbeat("e1", 4, 5, 1), t0 + RETRY)),
        ask("e1")
    );
    // An edge first heard of later is asked at once.
    assert_eq!(
        asks(v.apply(heartbeat("e2", 4, 5, 1), t0 + RETRY * 2)),
        ask("e2")
    );
}

#[test]
fn heartbeats_reveal_missed_deltas_and_disagreeing_counts() {
    let t0 = Instant::now();
    let mut v = view();
    feed(
        &mut v,
        t0,
        [
            heartbeat("e1", 0, 7, 0),
            delta("e1", 1, connect("c1", "ada")),
            heartbeat("e1", 1, 7, 1),
        ],
    );
    // Delta 2 was lost; no delta follows, only the heartbeat says so.
    assert_eq!(asks(v.apply(heartbeat("e1", 2, 7, 2), t0)), ask("e1"));

    let mut v = view();
    feed(&mut v, t0, [delta("e1", 1, connect("c1", "ada"))]);
    // Same position, different connection count: the views disagree.
    assert_eq!(asks(v.apply(heartbeat("e1", 1, 7, 2), t0)), ask("e1"));
}

#[test]
fn a_snapshot_replaces_the_edge_and_keeps_indexes_consistent() {
    let now = Instant::now();
    let mut v = view();
    feed(
        &mut v,
        now,
        [
            delta("e1", 1, connect("c1", "ada")),
            delta("e1", 2, join("c1", "chat:a", None)),
            delta("e1", 3, connect("c2", "bob")),
            delta("e1", 4, join("c2", "chat:gone", None)),
            delta("e2", 1, connect("d1", "ada")),
            delta("e2", 2, join("d1", "chat:a", None)),
        ],
    );
    // e1 lost bob entirely, and ada moved rooms.
    feed(
        &mut v,
        now,
        [snapshot(
            "e1",
            10,
            7,
            vec![conn_state("c1", "ada", &["chat:b"])],
        )],
    );
    assert_eq!(members(&v, "chat:a"), ["d1"]);
    assert_eq!(members(&v, "chat:b"), ["c1"]);
    assert!(members(&v, "chat:gone").is_empty());
    let bob = &v.user_status(&["bob".into()]).users[0];
    assert!(
        bob.online && bob.conns.is_empty(),
        "bob is in his grace period"
    );
    assert_eq!(events(v.expire(now + GRACE)), ["offline bob c2"]);
    assert!(!v.user_status(&["bob".into()]).users[0].online);
    assert_eq!(
        v.stats(),
        Stats {
            nodes: 2,
            conns: 2,
            users: 1,
            rooms: 2
        }
    );
    // A snapshot older than what the view applied is ignored.
    feed(&mut v, now, [snapshot("e1", 3, 7, vec![])]);
    assert!(v.conn("c1").is_some());
    // An empty snapshot empties the edge.
    feed(&mut v, now, [snapshot("e1", 11, 7, vec![])]);
    assert_eq!(members(&v, "chat:b"), Vec::<String>::new());
    assert_eq!(v.stats().conns, 1);
}

#[test]
fn a_new_started_ms_means_the_edge_restarted() {
    let now = Instant::now();
    let mut v = view();
    feed(
        &mut v,
        now,
        [
            heartbeat("e1", 0, 100, 0),
            delta("e1", 1, connect("c1", "ada")),
            delta("e1", 2, join("c1", "chat:a", None)),
            heartbeat("e1", 2, 100, 1),
        ],
    );
    // The new process has had one connection since: the old ones are gone.
    assert_eq!(asks(v.apply(heartbeat("e1", 2, 200, 1), now)), ask("e1"));
    assert!(v.conn("c1").is_none());
    assert!(members(&v, "chat:a").is_empty());
    v.assert_consistent();
    feed(
        &mut v,
        now,
        [snapshot(
            "e1",
            2,
            200,
            vec![conn_state("n1", "ada", &["chat:a"])],
        )],
    );
    assert_eq!(members(&v, "chat:a"), ["n1"]);
}

#[test]
fn a_delta_numbered_one_starts_a_new_incarnation() {
    let now = Instant::now();
    let mut v = view();
    feed(
        &mut v,
        now,
        [
            heartbeat("e1", 0, 100, 0),
            delta("e1", 1, connect("c1", "ada")),
            delta("e1", 2, join("c1", "chat:a", None)),
            // The edge restarted: its numbering starts again.
            delta("e1", 1, connect("n1", "bob")),
        ],
    );
    assert!(v.conn("c1").is_none());
    assert!(v.conn("n1").is_some());
    assert_eq!(v.applied_seq("e1"), Some(1));
    // Its heartbeat names the new incarnation; it agrees with the view.
    feed(&mut v, now, [heartbeat("e1", 1, 300, 1)]);
    assert!(v.conn("n1").is_some());
}

#[test]
fn edges_silent_while_the_replica_could_not_hear_are_asked_not_reaped() {
    let t0 = Instant::now();
    let mut v = view();
    feed(
        &mut v,
        t0,
        [
            delta("e1", 1, connect("c1", "ada")),
            delta("e1", 2, join("c1", "chat:a", None)),
            delta("e2", 1, connect("d1", "bo")),
        ],
    );
    // The broker was gone for longer than the edge timeout.
    let back = t0 + TIMEOUT + secs(5);
    assert_eq!(asks(v.heard_again(back)), ["e1", "e2"]);
    let (fx, reaped) = v.tick(back + secs(1));
    assert!(reaped.is_empty(), "{reaped:?}");
    assert!(events(fx).is_empty());
    assert_eq!(members(&v, "chat:a"), ["c1"]);
    v.assert_consistent();
    // Edges that stay silent after that are reaped as ever.
    let (_, mut reaped) = v.tick(back + TIMEOUT);
    reaped.sort();
    assert_eq!(reaped, [("e1".to_string(), 1), ("e2".to_string(), 1)]);
}

#[test]
fn silent_edges_are_reaped_and_goodbye_removes_at_once() {
    let t0 = Instant::now();
    let mut v = view();
    feed(
        &mut v,
        t0,
        [
            delta("e1", 1, connect("c1", "ada")),
            delta("e1", 2, join("c1", "chat:a", None)),
            delta("e2", 1, connect("d1", "ada")),
            delta("e2", 2, join("d1", "chat:a", None)),
            delta("e3", 1, connect("f1", "cy")),
        ],
    );
    feed(&mut v, t0 + secs(5), [heartbeat("e2", 2, 7, 1)]);
    let (_, reaped) = v.tick(t0 + secs(9));
    assert!(reaped.is_empty());
    let (_, mut reaped) = v.tick(t0 + TIMEOUT);
    reaped.sort();
    assert_eq!(reaped, [("e1".to_string(), 1), ("e3".to_string(), 1)]);
    assert_eq!(members(&v, "chat:a"), ["d1"]);
    v.assert_consistent();

    feed(
        &mut v,
        t0 + secs(11),
        [EdgeReport::Goodbye {
            node: "e2".into(),
            seq: 2,
        }],
    );
    assert_eq!(v.stats().conns, 0);
    assert_eq!(v.applied_seq("e2"), None);
    v.expire(t0 + secs(11) + GRACE);
    assert_eq!(v.stats(), Stats::default());
}

#[test]
fn room_members_are_grouped_by_user_in_a_stable_order() {
    let now = Instant::now();
    let mut v = view();
    feed(
        &mut v,
        now,
        [
            delta("e2", 1, connect("z-9", "bob")),
            delta("e2", 2, join("z-9", "chat:a", Some(json!({"x": 1})))),
            delta("e1", 1, connect("b-2", "ada")),
            delta("e1", 2, join("b-2", "chat:a", None)),
            delta("e2", 3, connect("a-1", "bob")),
            delta("e2", 4, join("a-1", "chat:a", None)),
            delta("e1", 3, connect("a-7", "ada")),
            delta("e1", 4, join("a-7", "chat:a", None)),
            delta("e1", 5, connect("q", "ada")),
        ],
    );
    let reply = v.room_members("chat:a");
    assert_eq!(reply.room, "chat:a");
    let shape: Vec<(String, Vec<String>)> = reply
        .members
        .iter()
        .map(|m| {
            (
                m.user.clone(),
                m.conns.iter().map(|c| c.conn.clone()).collect(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            (
                "ada".to_string(),
                vec!["a-7".to_string(), "b-2".to_string()]
            ),
            (
                "bob".to_string(),
                vec!["a-1".to_string(), "z-9".to_string()]
            ),
        ]
    );
    let z9 = &reply.members[1].conns[1];
    assert_eq!(
        (
            z9.user.as_str(),
            z9.node.as_str(),
            z9.since_ms,
            z9.meta.as_str()
        ),
        ("bob", "e2", 1000, r#"{"x":1}"#)
    );
    assert_eq!(reply.members[1].conns[0].meta, "");
    assert!(v.room_members("chat:nobody").members.is_empty());
}

#[test]
fn user_status_lists_every_device_of_a_user() {
    let now = Instant::now();
    let mut v = view();
    feed(
        &mut v,
        now,
        [
            delta("e1", 1, connect("p", "ada")),
            delta("e1", 2, join("p", "chat:a", Some(json!({"x": 1})))),
            delta("e2", 1, connect("l", "ada")),
        ],
    );
    let reply = v.user_status(&["bob".into(), "ada".into()]);
    assert_eq!(reply.users.len(), 2);
    assert_eq!(
        (reply.users[0].user.as_str(), reply.users[0].online),
        ("bob", false)
    );
    assert!(reply.users[0].conns.is_empty());
    let ada = &reply.users[1];
    assert!(ada.online);
    let devices: Vec<(&str, &str, &str)> = ada
        .conns
        .iter()
        .map(|c| (c.conn.as_str(), c.node.as_str(), c.meta.as_str()))
        .collect();
    assert_eq!(devices, [("l", "e2", ""), ("p", "e1", "")]);

    // The last device going away takes the user offline.
    feed(
        &mut v,
        now,
        [delta("e1", 3, Change::Disconnect { conn: "p".into() })],
    );
    assert!(v.user_status(&["ada".into()]).users[0].online);
    feed(
        &mut v,
        now,
        [delta("e2", 2, Change::Disconnect { conn: "l".into() })],
    );
    // Still online (with no device) through the grace period.
    assert!(v.user_status(&["ada".into()]).users[0].online);
    v.expire(now + GRACE);
    assert!(!v.user_status(&["ada".into()]).users[0].online);
    assert_eq!(v.stats().users, 0);
}

fn disconnect(conn: &str) -> Change {
    Change::Disconnect { conn: conn.into() }
}

fn leave(conn: &str, room: &str) -> Change {
    Change::Leave {
        conn: conn.into(),
        room: room.into(),
    }
}

#[test]
fn deltas_emit_room_events_and_quiet_rooms_none() {
    let now = Instant::now();
    let mut v = view();
    let fx = feed(
        &mut v,
        now,
        [
            delta("e1", 1, connect("c1", "ada")),
            delta(
                "e1",
                2,
                join("c1", "chat:a", Some(json!({"typing": false}))),
            ),
            delta(
                "e1",
                3,
                Change::Meta {
                    conn: "c1".into(),
                    room: "chat:a".into(),
                    meta: json!({"typing": true}),
                },
            ),
            // A repeat join with the same meta changes nothing; with another
            // it is an update.
            delta("e1", 4, join("c1", "chat:a", Some(json!({"typing": true})))),
            delta("e1", 5, join("c1", "chat:a", None)),
            delta("e1", 6, leave("c1", "chat:a")),
            delta("e1", 7, join("c1", "chat:b", None)),
            delta(
                "e1",
                8,
                Change::Join {
                    conn: "c1".into(),
                    room: "audit:q".into(),
                    meta: None,
                    quiet: true,
                },
            ),
            delta(
                "e1",
                9,
                Change::Meta {
                    conn: "c1".into(),
                    room: "audit:q".into(),
                    meta: json!({"x": 1}),
                },
            ),
            delta("e1", 10, disconnect("c1")),
        ],
    );
    assert_eq!(
        fx,
        [
            "online ada c1",
            "join chat:a c1",
            "update chat:a c1",
            "update chat:a c1",
            "leave chat:a c1",
            "join chat:b c1",
            // The edge closed the connection: it announces the leave itself.
            "leave chat:b c1",
        ]
    );
    // The quiet room still lists its members while they are in it.
    let mut v = view();
    feed(
        &mut v,
        now,
        [
            delta("e1", 1, connect("c1", "ada")),
            delta(
                "e1",
                2,
                Change::Join {
                    conn: "c1".into(),
                    room: "audit:q".into(),
                    meta: None,
                    quiet: true,
                },
            ),
        ],
    );
    assert_eq!(members(&v, "audit:q"), ["c1"]);
    let (fx, _) = v.reap("e1", now);
    assert_eq!(events(fx), Vec::<String>::new());
}

#[test]
fn room_events_carry_who_where_and_the_meta() {
    let now = Instant::now();
    let mut v = view();
    feed(&mut v, now, [delta("e1", 1, connect("c1", "ada"))]);
    let fx = v.apply(
        delta("e1", 2, join("c1", "chat:a", Some(json!({"x": 1})))),
        now,
    );
    assert_eq!(
        fx,
        [Effect::Room(RoomEvent {
            event: PresenceEvent::Join,
            room: "chat:a".into(),
            user: "ada".into(),
            conn: "c1".into(),
            node: "e1".into(),
            meta: Some(json!({"x": 1})),
            announced: true,
        })]
    );
    let fx = v.apply(delta("e1", 3, disconnect("c1")), now);
    let Effect::Room(left) = &fx[0] else {
        panic!("{fx:?}")
    };
    assert_eq!(
        (left.event, left.meta.clone()),
        (PresenceEvent::Leave, Some(json!({"x": 1})))
    );
    let change = UserChange {
        user: "ada".into(),
        event: UserTransition::Offline,
        conn: "c1".into(),
        node: "e1".into(),
    };
    assert_eq!(v.expire(now + GRACE), [Effect::User(change.clone())]);
    assert_eq!(change.id(), "ada:offline:c1");
}

/// A user with more devices than a short list holds is tracked the same
/// way: online once, every device listed, offline once after the last.
#[test]
fn a_user_with_many_devices_goes_online_once_and_offline_once() {
    let t0 = Instant::now();
    let mut v = view();
    let devices: Vec<String> = (0..20).map(|i| format!("d{i:02}")).collect();
    let fx = feed(
        &mut v,
        t0,
        (1..)
            .zip(&devices)
            .map(|(seq, d)| delta("e1", seq, connect(d, "ada"))),
    );
    assert_eq!(fx, ["online ada d00"]);
    let listed: Vec<String> = v.user_status(&["ada".into()]).users[0]
        .conns
        .iter()
        .map(|c| c.conn.clone())
        .collect();
    assert_eq!(listed, devices);
    // Leaving in another order than they came, down to none.
    let order = devices
        .iter()
        .rev()
        .step_by(2)
        .chain(devices.iter().step_by(2));
    let fx = feed(
        &mut v,
        t0,
        (21..)
            .zip(order)
            .map(|(seq, d)| delta("e1", seq, disconnect(d))),
    );
    assert!(fx.is_empty());
    // The offline event names the last device to go.
    assert_eq!(events(v.expire(t0 + GRACE)), ["offline ada d18"]);
    assert_eq!(v.stats().users, 0);
}

#[test]
fn three_devices_on_three_edges_go_online_once_and_offline_once_after_the_grace() {
    let t0 = Instant::now();
    let mut v = view();
    let fx = feed(
        &mut v,
        t0,
        [
            delta("e1", 1, connect("p", "ada")),
            delta("e2", 1, connect("l", "ada")),
            delta("e3", 1, connect("t", "ada")),
        ],
    );
    assert_eq!(fx, ["online ada p"]);

    assert!(feed(&mut v, t0 + secs(1), [delta("e1", 2, disconnect("p"))]).is_empty());
    assert!(feed(&mut v, t0 + secs(2), [delta("e3", 2, disconnect("t"))]).is_empty());
    // Not even the grace period of a device that closed earlier ends it.
    assert!(events(v.expire(t0 + secs(1) + GRACE)).is_empty());
    let last = t0 + secs(3);
    assert!(feed(&mut v, last, [delta("e2", 2, disconnect("l"))]).is_empty());
    let ada = &v.user_status(&["ada".into()]).users[0];
    assert!(ada.online && ada.conns.is_empty());

    assert_eq!(v.next_deadline(), Some(last + GRACE));
    assert!(events(v.expire(last + GRACE - Duration::from_millis(1))).is_empty());
    assert_eq!(events(v.expire(last + GRACE)), ["offline ada l"]);
    assert!(!v.user_status(&["ada".into()]).users[0].online);
    // Once: nothing more is due.
    assert!(events(v.expire(last + GRACE * 10)).is_empty());
    assert_eq!(v.next_deadline(), None);
    v.assert_consistent();
}

#[test]
fn reconnecting_within_the_grace_period_emits_nothing() {
    let t0 = Instant::now();
    let mut v = view();
    feed(&mut v, t0, [delta("e1", 1, connect("c1", "ada"))]);
    assert!(feed(&mut v, t0 + secs(1), [delta("e1", 2, disconnect("c1"))]).is_empty());
    // Back on another edge just before the deadline: no event at all.
    let back = t0 + secs(1) + GRACE - Duration::from_millis(1);
    assert!(feed(&mut v, back, [delta("e2", 1, connect("c2", "ada"))]).is_empty());
    assert!(events(v.expire(t0 + secs(1) + GRACE)).is_empty());
    assert!(v.user_status(&["ada".into()]).users[0].online);

    // Gone again: offline at the new deadline, named after the new device.
    let gone = t0 + secs(20);
    assert!(feed(&mut v, gone, [delta("e2", 2, disconnect("c2"))]).is_empty());
    assert_eq!(events(v.expire(gone + GRACE)), ["offline ada c2"]);
    // And a later connection is a new online.
    let fx = feed(&mut v, gone + GRACE, [delta("e1", 3, connect("c3", "ada"))]);
    assert_eq!(fx, ["online ada c3"]);
}

#[test]
fn a_grace_period_over_before_a_report_ends_first() {
    let t0 = Instant::now();
    let mut v = view();
    feed(
        &mut v,
        t0,
        [
            delta("e1", 1, connect("c1", "ada")),
            delta("e1", 2, disconnect("c1")),
        ],
    );
    // The timer fired late; the report after the deadline comes second.
    let fx = feed(&mut v, t0 + GRACE, [delta("e1", 3, connect("c2", "ada"))]);
    assert_eq!(fx, ["offline ada c1", "online ada c2"]);
}

#[test]
fn a_dead_edge_is_reaped_its_rooms_hear_leaves_and_its_users_go_offline_after_the_grace() {
    let t0 = Instant::now();
    let mut v = view();
    feed(
        &mut v,
        t0,
        [
            delta("e1", 1, connect("c1", "ada")),
            delta("e1", 2, join("c1", "chat:b", None)),
            delta("e1", 3, join("c1", "chat:a", None)),
            delta("e1", 4, connect("c2", "bob")),
            delta("e1", 5, join("c2", "chat:a", None)),
            delta("e2", 1, connect("d1", "ada")),
            delta("e2", 2, join("d1", "chat:a", None)),
        ],
    );
    // e2 keeps reporting; e1 falls silent.
    feed(&mut v, t0 + secs(6), [heartbeat("e2", 2, 7, 1)]);
    let (fx, reaped) = v.tick(t0 + TIMEOUT);
    assert_eq!(reaped, [("e1".to_string(), 2)]);
    assert_eq!(
        events(fx),
        [
            "leave chat:a c1 inferred",
            "leave chat:b c1 inferred",
            "leave chat:a c2 inferred",
        ]
    );
    assert_eq!(members(&v, "chat:a"), ["d1"]);
    v.assert_consistent();
    // Only bob has no other connection; he goes offline after the grace.
    assert!(events(v.expire(t0 + TIMEOUT + GRACE - secs(1))).is_empty());
    assert_eq!(events(v.expire(t0 + TIMEOUT + GRACE)), ["offline bob c2"]);
    assert!(v.user_status(&["ada".into()]).users[0].online);

    // The pod watch reaps at once, with the same consequences.
    let t1 = t0 + secs(30);
    let (fx, gone) = v.reap("e2", t1);
    assert_eq!(gone, 1);
    assert_eq!(events(fx), ["leave chat:a d1 inferred"]);
    assert_eq!(events(v.expire(t1 + GRACE)), ["offline ada d1"]);
    assert_eq!(v.stats(), Stats::default());
    let (fx, gone) = v.reap("e2", t1);
    assert_eq!((fx, gone), (vec![], 0));
}

#[test]
fn goodbye_and_restarts_leave_what_the_edge_did_not_announce() {
    let now = Instant::now();
    let mut v = view();
    feed(
        &mut v,
        now,
        [
            heartbeat("e1", 0, 100, 0),
            delta("e1", 1, connect("c1", "ada")),
            delta("e1", 2, join("c1", "chat:a", None)),
            delta("e2", 1, connect("d1", "bob")),
            delta("e2", 2, join("d1", "chat:a", None)),
            delta("e2", 3, connect("d2", "cy")),
            delta("e2", 4, join("d2", "chat:a", None)),
        ],
    );
    // e2 closes d2 properly (announced), then says goodbye with d1 still open.
    let fx = feed(
        &mut v,
        now,
        [
            delta("e2", 5, leave("d2", "chat:a")),
            delta("e2", 6, disconnect("d2")),
            EdgeReport::Goodbye {
                node: "e2".into(),
                seq: 6,
            },
        ],
    );
    assert_eq!(fx, ["leave chat:a d2", "leave chat:a d1 inferred"]);

    // e1 restarted: its old process's connections left unannounced, and
    // ada, back on the new process within the grace period, never went
    // offline.
    assert_eq!(asks(v.apply(heartbeat("e1", 2, 200, 1), now)), ask("e1"));
    let fx = feed(
        &mut v,
        now + secs(1),
        [snapshot(
            "e1",
            2,
            200,
            vec![conn_state("n1", "ada", &["chat:a"])],
        )],
    );
    assert_eq!(fx, ["join chat:a n1 inferred"]);
    let fx = events(v.expire(now + GRACE * 2));
    // In the order their last connections went.
    assert_eq!(fx, ["offline cy d2", "offline bob d1"]);
}

#[test]
fn a_snapshot_after_a_gap_emits_the_changes_it_reveals() {
    let t0 = Instant::now();
    let mut v = view();
    feed(
        &mut v,
        t0,
        [
            delta("e1", 1, connect("c1", "ada")),
            delta("e1", 2, join("c1", "chat:a", None)),
            delta("e1", 3, connect("c2", "bob")),
            delta("e1", 4, join("c2", "chat:a", Some(json!({"x": 1})))),
            delta("e1", 5, connect("c4", "dee")),
            delta("e1", 6, join("c4", "chat:a", None)),
        ],
    );
    // Reports 7.. were lost; the view asks, and the snapshot shows: ada
    // moved rooms, bob's meta changed, cy arrived, dee left.
    assert_eq!(asks(v.apply(heartbeat("e1", 12, 7, 3), t0)), ask("e1"));
    let now = t0 + secs(1);
    let fx = feed(
        &mut v,
        now,
        [snapshot(
            "e1",
            12,
            7,
            vec![
                conn_state("c1", "ada", &["chat:b"]),
                ConnState {
                    rooms: vec![RoomState {
                        room: "chat:a".into(),
                        meta: Some(json!({"x": 2})),
                        quiet: false,
                    }],
                    ..conn_state("c2", "bob", &[])
                },
                conn_state("c3", "cy", &["chat:a"]),
            ],
        )],
    );
    assert_eq!(
        fx,
        [
            "leave chat:a c4 inferred",
            "leave chat:a c1 inferred",
            "join chat:b c1 inferred",
            "update chat:a c2 inferred",
            "online cy c3",
            "join chat:a c3 inferred",
        ]
    );
    assert_eq!(members(&v, "chat:a"), ["c2", "c3"]);
    assert_eq!(events(v.expire(now + GRACE)), ["offline dee c4"]);

    // The same state again (another replica asked) reveals nothing.
    let fx = feed(
        &mut v,
        now + GRACE,
        [snapshot(
            "e1",
            12,
            7,
            vec![
                conn_state("c1", "ada", &["chat:b"]),
                ConnState {
                    rooms: vec![RoomState {
                        room: "chat:a".into(),
                        meta: Some(json!({"x": 2})),
                        quiet: false,
                    }],
                    ..conn_state("c2", "bob", &[])
                },
                conn_state("c3", "cy", &["chat:a"]),
            ],
        )],
    );
    assert!(fx.is_empty(), "{fx:?}");
}

#[test]
fn during_the_warm_up_discovering_an_edge_emits_nothing() {
    let t0 = Instant::now();
    let config = Config {
        warmup: WARMUP,
        ..config()
    };
    let mut v = View::new(&config, t0);
    v.asked_all(t0);
    assert!(!v.is_warm(t0));
    // The edges answer the start-up sync request: discovery, not change.
    let fx = feed(
        &mut v,
        t0 + RETRY / 2,
        [
            heartbeat("e1", 4, 7, 2),
            snapshot(
                "e1",
                4,
                7,
                vec![
                    conn_state("c1", "ada", &["chat:a"]),
                    conn_state("c2", "bob", &["chat:a"]),
                ],
            ),
            snapshot("e2", 2, 7, vec![conn_state("d1", "ada", &["chat:a"])]),
        ],
    );
    assert!(fx.is_empty(), "{fx:?}");
    assert_eq!(members(&v, "chat:a"), ["c1", "d1", "c2"]);
    assert!(v.user_status(&["bob".into()]).users[0].online);

    // Changes after discovery show, even within the warm-up.
    let fx = feed(&mut v, t0 + secs(2), [delta("e1", 5, disconnect("c2"))]);
    assert_eq!(fx, ["leave chat:a c2"]);
    assert_eq!(events(v.expire(t0 + secs(2) + GRACE)), ["offline bob c2"]);

    // An edge first discovered after the warm-up: its state is news.
    assert!(v.is_warm(t0 + WARMUP));
    let late = t0 + WARMUP + secs(1);
    assert_eq!(asks(v.apply(heartbeat("e3", 1, 7, 1), late)), ask("e3"));
    let fx = feed(
        &mut v,
        late,
        [snapshot(
            "e3",
            1,
            7,
            vec![conn_state("f1", "cy", &["chat:a"])],
        )],
    );
    assert_eq!(fx, ["online cy f1", "join chat:a f1 inferred"]);
    // And one discovered in the warm-up shows its changes afterwards.
    let fx = feed(
        &mut v,
        late,
        [snapshot("e2", 9, 7, vec![conn_state("d1", "ada", &[])])],
    );
    assert_eq!(fx, ["leave chat:a d1 inferred"]);
}
