use herald_wire::presence::RoomState;
use serde_json::json;

use super::*;

const RETRY: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(10);

fn view() -> View {
    View::new(TIMEOUT, RETRY)
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

fn ask(node: &str) -> Vec<Effect> {
    vec![Effect::AskSync { node: node.into() }]
}

/// Applies reports that must not ask for a sync.
fn feed(v: &mut View, now: Instant, reports: impl IntoIterator<Item = EdgeReport>) {
    for r in reports {
        let shown = format!("{r:?}");
        assert_eq!(v.apply(r, now), vec![], "{shown} asked for a sync");
    }
    v.assert_consistent();
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
    assert_eq!(v.conn("c1").unwrap().node, "e1");
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
    assert_eq!(
        v.stats(),
        Stats {
            nodes: 1,
            conns: 1,
            users: 1,
            rooms: 0
        }
    );
    // Old reports change nothing.
    feed(&mut v, now, [delta("e1", 4, join("c1", "chat:a", None))]);
    assert!(members(&v, "chat:a").is_empty());
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
        v.apply(delta("e1", 4, connect("c2", "bob")), now),
        ask("e1")
    );
    assert!(v.is_syncing("e1"));
    // Following deltas are ignored, and the request is not repeated at once.
    assert_eq!(
        v.apply(delta("e1", 5, join("c2", "chat:a", None)), now),
        vec![]
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
    assert_eq!(v.apply(delta("e1", 3, connect("c2", "bob")), t0), ask("e1"));
    assert_eq!(v.apply(heartbeat("e1", 3, 7, 2), t0 + secs(1) / 2), vec![]);
    // Another edge is asked on its own account.
    assert_eq!(v.apply(delta("e2", 2, connect("c9", "zed")), t0), ask("e2"));
    // Unanswered after `sync_retry`: the next report asks again…
    assert_eq!(v.apply(heartbeat("e1", 3, 7, 2), t0 + RETRY), ask("e1"));
    // …and so does the periodic tick when the edge stays quiet.
    let (fx, reaped) = v.tick(t0 + RETRY * 2);
    assert!(reaped.is_empty());
    let mut asked: Vec<String> = fx
        .into_iter()
        .map(|Effect::AskSync { node }| node)
        .collect();
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
    assert_eq!(v.apply(delta("e1", 9, connect("c2", "bob")), t0), ask("e1"));
    assert_eq!(v.apply(heartbeat("e2", 4, 5, 1), t0), ask("e2"));
    assert!(v.conn("c2").is_none());
}

#[test]
fn the_start_up_sync_covers_edges_heard_of_soon_after() {
    let t0 = Instant::now();
    let mut v = view();
    v.asked_all(t0);
    assert_eq!(v.apply(heartbeat("e1", 4, 5, 1), t0 + RETRY / 2), vec![]);
    assert!(v.is_syncing("e1"));
    // Still no snapshot after the retry interval: ask that edge itself.
    assert_eq!(v.apply(heartbeat("e1", 4, 5, 1), t0 + RETRY), ask("e1"));
    // An edge first heard of later is asked at once.
    assert_eq!(v.apply(heartbeat("e2", 4, 5, 1), t0 + RETRY * 2), ask("e2"));
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
    assert_eq!(v.apply(heartbeat("e1", 2, 7, 2), t0), ask("e1"));

    let mut v = view();
    feed(&mut v, t0, [delta("e1", 1, connect("c1", "ada"))]);
    // Same position, different connection count: the views disagree.
    assert_eq!(v.apply(heartbeat("e1", 1, 7, 2), t0), ask("e1"));
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
    assert_eq!(v.apply(heartbeat("e1", 2, 200, 1), now), ask("e1"));
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
    assert_eq!(v.stats(), Stats::default());
    assert_eq!(v.applied_seq("e2"), None);
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
    assert!(!v.user_status(&["ada".into()]).users[0].online);
    assert_eq!(v.stats().users, 0);
}
