//! User presence in a cluster of three edges and two presence replicas:
//! online/offline exactly once per transition after the grace period, dead
//! edges reaped, replicas that restart without false events, and Watch.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use herald_broker::{Broker, NatsBroker};
use herald_proto::v1::{RoomMembersRequest, UserStatusRequest};
use herald_test_support::eventually;
use herald_wire::presence::{UserEvent, UserTransition};
use serde_json::json;

const GRACE: Duration = Duration::from_millis(1500);
const EDGE_TIMEOUT: Duration = Duration::from_secs(3);

fn spec(edges: usize, presences: usize) -> Spec {
    spec_with_edge_timeout(edges, presences, EDGE_TIMEOUT)
}

fn spec_with_edge_timeout(edges: usize, presences: usize, edge_timeout: Duration) -> Spec {
    Spec {
        edges,
        presences,
        edge_args: vec!["--presence-interval".into(), "500ms".into()],
        presence_args: vec![
            "--presence-grace".into(),
            format!("{}ms", GRACE.as_millis()),
            "--edge-timeout".into(),
            format!("{}ms", edge_timeout.as_millis()),
        ],
        ..Spec::default()
    }
}

/// Every user event published on NATS, with when it arrived.
#[derive(Clone, Default)]
struct UserEvents(Arc<Mutex<Vec<(Instant, UserEvent)>>>);

impl UserEvents {
    async fn record(cluster: &Cluster) -> UserEvents {
        let broker = NatsBroker::connect(&cluster.nats.url(), "test-observer")
            .await
            .unwrap();
        let mut sub = broker
            .subscribe("herald.presence.user.>".into())
            .await
            .unwrap();
        let events = UserEvents::default();
        let sink = events.clone();
        tokio::spawn(async move {
            let _broker = broker;
            while let Some(m) = sub.next().await {
                let e: UserEvent = serde_json::from_slice(&m.payload).expect("a UserEvent");
                sink.0.lock().unwrap().push((Instant::now(), e));
            }
        });
        events
    }

    fn of(&self, user: &str) -> Vec<(Instant, UserTransition)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| e.user == user)
            .map(|(t, e)| (*t, e.event))
            .collect()
    }

    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

#[tokio::test]
async fn three_devices_make_one_online_and_one_offline_after_the_grace_period() {
    let cluster = Cluster::start_spec(spec(3, 2));
    let nats_events = UserEvents::record(&cluster).await;
    let watch0 = watch(cluster.presence_at(0).await, &[], &["alice"]);
    let watch1 = watch(cluster.presence_at(1).await, &[], &["alice"]);

    let mut devices = Vec::new();
    for edge in 0..3 {
        devices.push(connect(&cluster.ws(edge), "alice").await);
    }
    eventually(WAIT, "alice online", || async {
        (nats_events.of("alice").len() == 1).then_some(())
    })
    .await;
    let mut closed_at = Instant::now();
    for d in devices {
        closed_at = Instant::now();
        d.close().await.unwrap();
    }
    eventually(GRACE + WAIT, "alice offline", || async {
        (nats_events.of("alice").len() == 2).then_some(())
    })
    .await;
    let events = nats_events.of("alice");
    assert_eq!(
        events.iter().map(|(_, e)| *e).collect::<Vec<_>>(),
        [UserTransition::Online, UserTransition::Offline]
    );
    assert!(
        events[1].0 - closed_at >= GRACE,
        "offline came {:?} after the last close, before the grace period",
        events[1].0 - closed_at
    );
    for w in [&watch0, &watch1] {
        eventually(WAIT, "Watch saw online then offline", || async {
            (transitions(w, "alice") == ["online", "offline"]).then_some(())
        })
        .await;
    }

    // Reconnecting within the grace period: no offline event at all.
    let phone = connect(&cluster.ws(0), "alice").await;
    eventually(WAIT, "alice online again", || async {
        (nats_events.of("alice").len() == 3).then_some(())
    })
    .await;
    phone.close().await.unwrap();
    let back = connect(&cluster.ws(2), "alice").await;
    // Watch for longer than the grace period: nothing happens.
    tokio::time::sleep(GRACE * 2).await;
    assert_eq!(
        nats_events.of("alice").len(),
        3,
        "{:?}",
        nats_events.of("alice")
    );
    assert_eq!(transitions(&watch0, "alice").len(), 3);
    drop(back);
}

#[tokio::test]
async fn a_killed_edge_is_reaped_with_leaves_and_one_offline_per_user() {
    let mut cluster = Cluster::start_spec(spec(3, 1));
    let nats_events = UserEvents::record(&cluster).await;
    let rooms: Vec<String> = (0..5).map(|i| format!("chat:r{i}")).collect();
    let observer = connect(&cluster.ws(0), "observer").await;
    for r in &rooms {
        ok(&observer, json!({"op":"join","room":r})).await;
    }
    // 50 clients on edge-2; users u0..u9 also hold a connection on edge-1.
    let mut doomed = Vec::new();
    let mut doomed_conns: HashMap<String, String> = HashMap::new();
    for i in 0..50 {
        let user = format!("u{i}");
        let (c, connected) = herald_client::Client::connect(&cluster.ws(2), &token(&user))
            .await
            .unwrap();
        ok(&c, json!({"op":"join","room": rooms[i % 5]})).await;
        doomed_conns.insert(
            connected["conn"].as_str().unwrap().to_string(),
            rooms[i % 5].clone(),
        );
        doomed.push(c);
    }
    let mut survivors = Vec::new();
    for i in 0..10 {
        survivors.push(connect(&cluster.ws(1), &format!("u{i}")).await);
    }
    let mut presence = cluster.presence().await;
    eventually(WAIT, "every member is listed", || {
        let mut presence = presence.clone();
        let rooms = rooms.clone();
        async move {
            let mut n = 0;
            for r in &rooms {
                let m = presence
                    .room_members(RoomMembersRequest {
                        room: r.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                n += m.members.iter().map(|m| m.conns.len()).sum::<usize>();
            }
            (n == 50 + 5).then_some(())
        }
    })
    .await;
    eventually(WAIT, "51 users online", || async {
        (nats_events.count() == 51).then_some(())
    })
    .await;
    // Drain the observer's join events.
    while observer.next_frame(QUIET).await.unwrap().is_some() {}

    cluster.edges[2].kill();
    let killed_at = Instant::now();

    // Within the edge timeout + 1 s: the room lists no longer name them.
    eventually(
        EDGE_TIMEOUT + Duration::from_secs(1),
        "killed clients leave the member lists",
        || {
            let mut presence = presence.clone();
            let rooms = rooms.clone();
            async move {
                for r in &rooms {
                    let m = presence
                        .room_members(RoomMembersRequest {
                            room: r.clone(),
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    if m.members
                        .iter()
                        .any(|m| m.conns.iter().any(|c| c.node == "edge-2"))
                    {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
    assert!(killed_at.elapsed() <= EDGE_TIMEOUT + Duration::from_secs(1));
    let _ = &mut presence;

    // Their rooms got one leave event per killed connection.
    let mut leaves: BTreeMap<String, String> = BTreeMap::new();
    while leaves.len() < 50 {
        let e = observer.recv_op("presence", WAIT).await.unwrap();
        assert_eq!(e["event"], "leave", "{e}");
        let conn = e["conn"].as_str().unwrap().to_string();
        assert_eq!(
            doomed_conns.get(&conn),
            Some(&e["room"].as_str().unwrap().to_string())
        );
        assert!(
            leaves
                .insert(conn, e["room"].as_str().unwrap().into())
                .is_none(),
            "a leave twice"
        );
    }

    // One offline per user without another connection (after the grace period), none for the others.
    eventually(GRACE + WAIT, "40 users offline", || async {
        let offline = (10..50)
            .filter(|i| nats_events.of(&format!("u{i}")).len() == 2)
            .count();
        (offline == 40).then_some(())
    })
    .await;
    tokio::time::sleep(QUIET).await;
    for i in 0..50 {
        let expected = if i < 10 { 1 } else { 2 };
        assert_eq!(
            nats_events.of(&format!("u{i}")).len(),
            expected,
            "events of u{i}"
        );
    }
    let s = presence
        .user_status(UserStatusRequest {
            users: vec!["u3".into(), "u30".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(s.users[0].online && s.users[0].conns.len() == 1);
    assert!(!s.users[1].online);
    drop(doomed);
}

/// A replica's answers: the members of `chat:all` and the status of `users`.
async fn view_at(
    addr: std::net::SocketAddr,
    users: Vec<String>,
) -> Option<(
    herald_proto::v1::RoomMembersReply,
    herald_proto::v1::UserStatusReply,
)> {
    let mut p = PresenceClient::connect(format!("http://{addr}"))
        .await
        .ok()?;
    let members = p
        .room_members(RoomMembersRequest {
            room: "chat:all".into(),
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner();
    let status = p
        .user_status(UserStatusRequest { users })
        .await
        .ok()?
        .into_inner();
    Some((members, status))
}

#[tokio::test]
async fn a_restarted_replica_rebuilds_its_view_without_events() {
    let mut cluster = Cluster::start_spec(spec(3, 2));
    let nats_events = UserEvents::record(&cluster).await;
    let mut clients = Vec::new();
    for i in 0..9 {
        let c = connect(&cluster.ws(i % 3), &format!("user{}", i % 4)).await;
        ok(&c, json!({"op":"join","room":"chat:all","meta":{"n":i}})).await;
        clients.push(c);
    }
    eventually(WAIT, "4 users online", || async {
        (nats_events.count() == 4).then_some(())
    })
    .await;
    let users: Vec<String> = (0..4).map(|i| format!("user{i}")).collect();
    let addrs = cluster.presence_grpcs.clone();
    let view = |i: usize| view_at(addrs[i], users.clone());
    let before = eventually(WAIT, "replica 0 lists all nine", || async {
        let v = view(0).await?;
        (v.0.members.iter().map(|m| m.conns.len()).sum::<usize>() == 9).then_some(v)
    })
    .await;

    for replica in [1, 0] {
        cluster.restart_presence(replica);
        let restarted = Instant::now();
        let other = 1 - replica;
        eventually(
            Duration::from_secs(3),
            "the restarted replica agrees with the other",
            || async {
                let mine = view(replica).await?;
                let theirs = view(other).await?;
                (mine == theirs && mine == before).then_some(())
            },
        )
        .await;
        assert!(restarted.elapsed() <= Duration::from_secs(3));
    }
    // Wait out a grace period: still no online/offline beyond the first four.
    tokio::time::sleep(GRACE + QUIET).await;
    assert_eq!(
        nats_events.count(),
        4,
        "{:?}",
        nats_events.0.lock().unwrap()
    );
    drop(clients);
}

#[tokio::test]
async fn watch_delivers_a_rooms_events_in_order() {
    let cluster = Cluster::start_spec(spec(2, 1));
    let events = watch(cluster.presence().await, &["doc:w"], &[]);
    let (c, connected) = herald_client::Client::connect(&cluster.ws(1), &token("wendy"))
        .await
        .unwrap();
    let conn = connected["conn"].as_str().unwrap().to_string();
    ok(&c, json!({"op":"join","room":"doc:w","meta":{"v":0}})).await;
    for v in 1..=5 {
        ok(
            &c,
            json!({"op":"presence_set","room":"doc:w","meta":{"v":v}}),
        )
        .await;
    }
    ok(&c, json!({"op":"leave","room":"doc:w"})).await;
    let got = eventually(WAIT, "seven room events", || async {
        let e = events.lock().unwrap().clone();
        (e.len() >= 7).then_some(e)
    })
    .await;
    let kinds: Vec<_> = got.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "join", "update", "update", "update", "update", "update", "leave"
        ]
    );
    for (i, e) in got.iter().enumerate().take(6) {
        assert_eq!(e.room, "doc:w");
        assert_eq!(e.conn, conn);
        assert_eq!(e.node, "edge-1");
        let meta: serde_json::Value = serde_json::from_str(&e.meta).unwrap();
        assert_eq!(meta["v"], i, "events out of order: {got:?}");
    }
}

/// SIGTERM of an edge whose clients do not come back: the edge tells them
/// to reconnect elsewhere (1012, with a `reconnect_after_ms` hint) at moments
/// spread over its drain window, and announces every connection's end
/// before it exits, so each user goes offline one grace period after its own
/// disconnect, not when the presence service would have reaped the silent
/// edge.
#[tokio::test(flavor = "multi_thread")]
async fn a_drained_edges_users_go_offline_one_grace_period_later() {
    const WINDOW: Duration = Duration::from_secs(3);
    let mut cluster = Cluster::start_spec(spec_with_edge_timeout(1, 1, Duration::from_secs(20)));
    cluster.add_edge_with(
        "edge-drained",
        &["--drain-window".into(), format!("{}ms", WINDOW.as_millis())],
    );
    let nats_events = UserEvents::record(&cluster).await;
    let users: Vec<String> = (0..200).map(|i| format!("drained-{i}")).collect();
    let mut told = Vec::new();
    for user in &users {
        let client = connect(&cluster.ws(1), user).await;
        ok(&client, json!({"op":"join","room":"chat:drain"})).await;
        told.push(tokio::spawn(async move {
            let frame = client
                .recv_op("disconnect", Duration::from_secs(30))
                .await
                .expect("a disconnect frame");
            (Instant::now(), frame, client)
        }));
    }
    eventually(WAIT, "every user online", || async {
        users
            .iter()
            .all(|u| nats_events.of(u).len() == 1)
            .then_some(())
    })
    .await;

    let terminated_at = Instant::now();
    cluster.edges[1].stop(WINDOW + Duration::from_secs(10));
    let log = cluster.edges[1].output();
    for said in [
        "telling 200 connections to reconnect elsewhere (1012), spread over 3s",
        "told 200 connections to reconnect elsewhere",
        "every connection closed",
        "presence reports and goodbye confirmed by the broker",
    ] {
        assert!(log.contains(said), "the drain log lacks {said:?}:\n{log}");
    }
    let mut disconnected = Vec::new();
    for t in told {
        let (at, frame, _client) = t.await.unwrap();
        assert_eq!(frame["code"], 1012, "{frame}");
        assert_eq!(frame["reconnect"], true, "{frame}");
        assert!(frame["reconnect_after_ms"].as_u64().is_some(), "{frame}");
        disconnected.push(at);
    }
    let first = *disconnected.iter().min().unwrap() - terminated_at;
    let last = *disconnected.iter().max().unwrap() - terminated_at;
    eprintln!("disconnects from {first:?} to {last:?} after SIGTERM; window {WINDOW:?}");
    assert!(
        last - first >= WINDOW / 2 && last <= WINDOW + Duration::from_secs(1),
        "disconnects not spread over the window: from {first:?} to {last:?}"
    );
    eventually(GRACE + WAIT, "every user offline", || async {
        users
            .iter()
            .all(|u| nats_events.of(u).len() == 2)
            .then_some(())
    })
    .await;
    for (user, told_at) in users.iter().zip(&disconnected) {
        let events = nats_events.of(user);
        assert_eq!(events[1].1, UserTransition::Offline, "{user}");
        let after = events[1].0 - *told_at;
        assert!(
            after >= GRACE - Duration::from_millis(100) && after <= GRACE + Duration::from_secs(1),
            "{user} went offline {after:?} after its disconnect; the grace period is {GRACE:?}"
        );
    }
}

/// How many users are in `room` as `client` sees it; `None` while presence
/// cannot answer (right after a stall, the replica may still be reconnecting).
async fn members(client: &herald_client::Client, room: &str) -> Option<usize> {
    let r = client
        .request(json!({"op":"presence","room":room}))
        .await
        .ok()?;
    (r["op"] == "ok").then(|| member_users(&r).len())
}

/// nats-server stalls (SIGSTOP) for 30 s, six edge timeouts, while 50
/// clients sit in a room on two edges: the edges report not ready, and the
/// presence service, cut off too, freezes its view instead of reaping the
/// silent edges. Nobody hears a false `leave`, `offline` or `Watch` event,
/// during the stall or after it, and the member list is whole again within
/// 2 s of the server resuming.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_broker_makes_presence_wait_not_lie() {
    const CLIENTS: usize = 50;
    const STALL: Duration = Duration::from_secs(30);
    /// What the issue promises after the server resumes.
    const WHOLE_WITHIN: Duration = Duration::from_secs(2);
    let edge_timeout = Duration::from_secs(5);
    let cluster = Cluster::start_spec(spec_with_edge_timeout(2, 1, edge_timeout));
    let nats_events = UserEvents::record(&cluster).await;
    let names: Vec<String> = (0..CLIENTS).map(|i| format!("sitter-{i}")).collect();
    let mut clients = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let client = connect(&cluster.ws(i % 2), name).await;
        ok(&client, json!({"op":"join","room":"chat:stall"})).await;
        clients.push(client);
    }
    eventually(WAIT, "all 50 in the member list", || async {
        (members(&clients[0], "chat:stall").await? == CLIENTS).then_some(())
    })
    .await;
    eventually(WAIT, "all 50 online", || async {
        (nats_events.count() == CLIENTS).then_some(())
    })
    .await;
    let users: Vec<&str> = names.iter().map(String::as_str).collect();
    let watched = watch(cluster.presence().await, &["chat:stall"], &users);
    // Drain the joins each client saw, to watch for leaves from here on.
    for c in &clients {
        while c.recv_op("presence", QUIET).await.is_ok() {}
    }

    let pid = cluster.nats.pid().to_string();
    let signal = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        )
    };
    let ready = |edge| matches!(herald_test_support::http_get(edge, "/readyz"), Ok((200, _)));
    signal("-STOP");
    let stopped = Instant::now();
    for &edge in &cluster.edge_addrs {
        eventually(WAIT, "the edge reports not ready", || async {
            (!ready(edge)).then_some(())
        })
        .await;
    }
    tokio::time::sleep(STALL.saturating_sub(stopped.elapsed())).await;
    for &edge in &cluster.edge_addrs {
        assert!(!ready(edge), "an edge ready while NATS is stalled");
    }
    signal("-CONT");
    let resumed = Instant::now();

    for c in &clients[..2] {
        eventually(
            WHOLE_WITHIN,
            "the member list whole after the stall",
            || async { (members(c, "chat:stall").await? == CLIENTS).then_some(()) },
        )
        .await;
    }
    eprintln!("member lists whole {:?} after SIGCONT", resumed.elapsed());
    // Longer than a grace period and an edge timeout: nothing false comes.
    tokio::time::sleep(GRACE + edge_timeout).await;
    assert_eq!(
        nats_events.count(),
        CLIENTS,
        "online/offline after the stall"
    );
    let seen = watched.lock().unwrap().clone();
    assert!(seen.is_empty(), "Watch reported changes: {seen:?}");
    for c in &clients {
        if let Ok(e) = c.recv_op("presence", QUIET).await {
            panic!("a presence event after the stall: {e}");
        }
    }
}
