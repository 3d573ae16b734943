//! The behaviour every history store must have, run against the in-memory
//! store and against JetStream on a real nats-server; then what only
//! JetStream can show (restarts, a recreated stream, the server gone).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_broker::NatsBroker;
use herald_broker::history::{
    HistoryError, JetStreamHistory, Limits, MemoryHistory, SharedHistory, Stored,
};
use herald_test_support::{NatsServer, Proxy, eventually};
use herald_wire::room::RoomName;

fn room(name: &str) -> RoomName {
    RoomName::parse(name).unwrap()
}

fn limits(max_messages_per_room: u64, max_age_secs: u64) -> Limits {
    Limits {
        max_messages_per_room,
        max_age: Duration::from_secs(max_age_secs),
    }
}

const HOUR: u64 = 3600;

/// One store, and a way to open more handles onto it.
struct Env {
    memory: Option<Arc<MemoryHistory>>,
    nats: Option<NatsServer>,
    /// nats-server 2.11 or later, every handle with the personal namespace
    /// ensured: read markers live beside the inbox.
    newer: bool,
}

impl Env {
    fn memory() -> Env {
        Env {
            memory: Some(Arc::new(MemoryHistory::new())),
            nats: None,
            newer: false,
        }
    }

    fn jetstream() -> Env {
        Env {
            memory: None,
            nats: Some(NatsServer::start().unwrap()),
            newer: false,
        }
    }

    fn newer() -> Env {
        Env {
            memory: None,
            nats: Some(NatsServer::start_newer().unwrap()),
            newer: true,
        }
    }

    async fn client(&self) -> async_nats::Client {
        let nats = self.nats.as_ref().expect("a nats-server");
        let broker = NatsBroker::connect(&nats.url(), "history-test")
            .await
            .unwrap();
        broker.client().clone()
    }

    /// Another handle onto the same store. For JetStream that is a separate
    /// connection and history, as another process would have.
    async fn handle(&self) -> SharedHistory {
        match &self.memory {
            Some(m) => m.clone(),
            None => {
                let h: SharedHistory = Arc::new(JetStreamHistory::new(self.client().await));
                if self.newer {
                    h.ensure_namespace("user", limits(1000, HOUR))
                        .await
                        .unwrap();
                }
                h
            }
        }
    }
}

async fn append(
    h: &SharedHistory,
    r: &RoomName,
    payload: &str,
) -> herald_broker::history::Appended {
    h.append(r, Bytes::from(payload.to_string()), None)
        .await
        .unwrap()
}

fn payloads(stored: &[Stored]) -> Vec<String> {
    stored
        .iter()
        .map(|s| String::from_utf8(s.payload.to_vec()).unwrap())
        .collect()
}

/// Offsets rise, `prev` chains each room's messages, and reads, counts and
/// `latest` agree.
async fn offsets_prev_read_latest_count(env: Env) {
    let h = env.handle().await;
    h.ensure_namespace("chat", limits(100, HOUR)).await.unwrap();
    let (a, b) = (room("chat:a"), room("chat:b.with*odd>chars%"));
    assert_eq!(h.latest(&a).await.unwrap(), 0);
    assert_eq!(h.count_after(&a, 0).await.unwrap(), 0);
    assert!(h.read(&a, 0, 10).await.unwrap().is_empty());

    let epoch = h.epoch("chat").await.unwrap();
    let mut offsets_a = Vec::new();
    let mut offsets_b = Vec::new();
    let mut last = 0;
    for i in 0..5 {
        let x = append(&h, &a, &format!("a{i}")).await;
        let y = append(&h, &b, &format!("b{i}")).await;
        assert!(!x.duplicate && !y.duplicate);
        assert_eq!(
            (x.epoch.as_str(), y.epoch.as_str()),
            (epoch.as_str(), epoch.as_str())
        );
        // One sequence per namespace: the rooms' offsets interleave.
        assert!(last < x.offset && x.offset < y.offset, "{last} {x:?} {y:?}");
        last = y.offset;
        assert_eq!(x.prev, offsets_a.last().copied().unwrap_or(0));
        assert_eq!(y.prev, offsets_b.last().copied().unwrap_or(0));
        offsets_a.push(x.offset);
        offsets_b.push(y.offset);
    }

    let all = h.read(&a, 0, 100).await.unwrap();
    assert_eq!(payloads(&all), ["a0", "a1", "a2", "a3", "a4"]);
    assert_eq!(all.iter().map(|s| s.offset).collect::<Vec<_>>(), offsets_a);
    assert_eq!(all[0].prev, 0);
    for w in all.windows(2) {
        assert_eq!(w[1].prev, w[0].offset, "prev chains the room's messages");
    }
    let page = h.read(&a, offsets_a[1], 2).await.unwrap();
    assert_eq!(payloads(&page), ["a2", "a3"]);
    assert_eq!(
        page[0].prev, offsets_a[1],
        "nothing missing after offsets_a[1]"
    );
    // An offset between two of the room's messages (another room's).
    let page = h.read(&a, offsets_b[2], 10).await.unwrap();
    assert_eq!(payloads(&page), ["a3", "a4"]);
    assert!(h.read(&a, offsets_a[4], 10).await.unwrap().is_empty());
    assert!(h.read(&a, 0, 0).await.unwrap().is_empty());
    assert_eq!(payloads(&h.read(&b, 0, 1).await.unwrap()), ["b0"]);

    assert_eq!(h.latest(&a).await.unwrap(), offsets_a[4]);
    assert_eq!(h.latest(&b).await.unwrap(), offsets_b[4]);
    assert_eq!(h.count_after(&a, 0).await.unwrap(), 5);
    assert_eq!(h.count_after(&a, offsets_a[2]).await.unwrap(), 2);
    assert_eq!(h.count_after(&a, offsets_b[2]).await.unwrap(), 2);
    assert_eq!(h.count_after(&a, offsets_a[4]).await.unwrap(), 0);

    // Personal rooms are durable rooms of the `user` namespace.
    h.ensure_namespace("user", limits(100, HOUR)).await.unwrap();
    let inbox = RoomName::user("alice").unwrap();
    let x = append(&h, &inbox, "hi alice").await;
    assert_eq!(x.prev, 0);
    assert_eq!(h.latest(&inbox).await.unwrap(), x.offset);
    assert_eq!(x.epoch, h.epoch("user").await.unwrap());
}

/// Four publishers (four processes, for JetStream) appending to one room at
/// once still produce an exact `prev` chain.
async fn concurrent_appends_chain_exactly(env: Env) {
    const WRITERS: usize = 4;
    const EACH: usize = 25;
    let r = room("chat:hot");
    let mut handles = Vec::new();
    for _ in 0..WRITERS {
        let h = env.handle().await;
        h.ensure_namespace("chat", limits(1000, HOUR))
            .await
            .unwrap();
        handles.push(h);
    }
    let tasks: Vec<_> = handles
        .iter()
        .enumerate()
        .map(|(w, h)| {
            let (h, r) = (h.clone(), r.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..EACH {
                    let a = h
                        .append(&r, Bytes::from(format!("w{w}-{i}")), None)
                        .await
                        .unwrap();
                    out.push((a.offset, a.prev));
                }
                out
            })
        })
        .collect();
    let mut appended = Vec::new();
    for t in tasks {
        let mine = t.await.unwrap();
        assert!(
            mine.windows(2).all(|w| w[0].0 < w[1].0),
            "a writer's offsets rise"
        );
        appended.extend(mine);
    }

    let stored = handles[0].read(&r, 0, 1000).await.unwrap();
    assert_eq!(stored.len(), WRITERS * EACH);
    assert_eq!(stored[0].prev, 0);
    for w in stored.windows(2) {
        assert!(w[0].offset < w[1].offset);
        assert_eq!(
            w[1].prev, w[0].offset,
            "prev chain broken at {}",
            w[1].offset
        );
    }
    let from_read: HashSet<(u64, u64)> = stored.iter().map(|s| (s.offset, s.prev)).collect();
    let from_append: HashSet<(u64, u64)> = appended.into_iter().collect();
    assert_eq!(from_read, from_append, "append reported what was stored");
    let got: HashSet<String> = payloads(&stored).into_iter().collect();
    assert_eq!(got.len(), WRITERS * EACH, "every message once");
}

/// A repeated key stores nothing and answers with the original offset; keys
/// are scoped to their room.
async fn idempotency_keys(env: Env) {
    let h = env.handle().await;
    h.ensure_namespace("chat", limits(100, HOUR)).await.unwrap();
    let (a, b) = (room("chat:a"), room("chat:b"));
    let before = append(&h, &a, "before").await;
    let first = h.append(&a, "one".into(), Some("k 1\n")).await.unwrap();
    assert!(!first.duplicate);
    assert_eq!(first.prev, before.offset);
    append(&h, &a, "between").await;
    let again = h
        .append(&a, "one, resent".into(), Some("k 1\n"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.offset, first.offset);
    assert!(again.prev == first.prev || again.prev == 0, "{again:?}");
    assert_eq!(again.epoch, first.epoch);

    let other_room = h.append(&b, "one".into(), Some("k 1\n")).await.unwrap();
    assert!(!other_room.duplicate, "keys are per room");
    let other_key = h.append(&a, "two".into(), Some("k 2")).await.unwrap();
    assert!(!other_key.duplicate);

    let stored = h.read(&a, 0, 100).await.unwrap();
    assert_eq!(payloads(&stored), ["before", "one", "between", "two"]);
    assert_eq!(h.count_after(&a, 0).await.unwrap(), 4);
}

/// Only the newest `max_messages_per_room` are kept; a reader from an older
/// offset sees the tail, and the tail's first `prev` shows what is missing.
async fn history_is_limited_per_room(env: Env) {
    let h = env.handle().await;
    h.ensure_namespace("chat", limits(5, HOUR)).await.unwrap();
    let (r, quiet) = (room("chat:busy"), room("chat:quiet"));
    let q = append(&h, &quiet, "q").await;
    let mut offsets = Vec::new();
    for i in 0..12 {
        offsets.push(append(&h, &r, &format!("m{i}")).await.offset);
    }
    let tail = h.read(&r, 0, 100).await.unwrap();
    assert_eq!(payloads(&tail), ["m7", "m8", "m9", "m10", "m11"]);
    assert_eq!(tail[0].prev, offsets[6]);
    assert!(tail[0].prev > 0, "history no longer reaches back to 0");
    let from_old = h.read(&r, offsets[2], 100).await.unwrap();
    assert_eq!(from_old, tail);
    assert!(from_old[0].prev > offsets[2], "the gap is visible");
    let recent = h.read(&r, offsets[8], 100).await.unwrap();
    assert_eq!(payloads(&recent), ["m9", "m10", "m11"]);
    assert_eq!(recent[0].prev, offsets[8], "no gap after a retained offset");
    assert_eq!(h.count_after(&r, 0).await.unwrap(), 5);
    assert_eq!(h.latest(&r).await.unwrap(), offsets[11]);
    assert_eq!(h.read(&quiet, 0, 10).await.unwrap()[0].offset, q.offset);
}

/// Messages older than `max_age` are gone; the next one starts a new chain.
async fn history_is_limited_by_age(env: Env) {
    let h = env.handle().await;
    h.ensure_namespace("flash", limits(100, 1)).await.unwrap();
    let r = room("flash:x");
    let first = append(&h, &r, "soon gone").await;
    append(&h, &r, "also gone").await;
    eventually(Duration::from_secs(10), "messages expired", || async {
        (h.latest(&r).await.unwrap() == 0).then_some(())
    })
    .await;
    assert!(h.read(&r, 0, 10).await.unwrap().is_empty());
    assert_eq!(h.count_after(&r, 0).await.unwrap(), 0);
    let next = append(&h, &r, "fresh").await;
    assert!(next.offset > first.offset);
    assert_eq!(next.prev, 0);
}

/// `ensure_namespace` again applies new limits and keeps the history and
/// its epoch.
async fn ensure_again_updates_limits(env: Env) {
    let h = env.handle().await;
    h.ensure_namespace("chat", limits(100, HOUR)).await.unwrap();
    let r = room("chat:a");
    let epoch = h.epoch("chat").await.unwrap();
    let mut last = None;
    for i in 0..10 {
        last = Some(append(&h, &r, &format!("m{i}")).await);
    }
    h.ensure_namespace("chat", limits(3, HOUR)).await.unwrap();
    h.ensure_namespace("chat", limits(3, HOUR)).await.unwrap();
    assert_eq!(h.epoch("chat").await.unwrap(), epoch);
    assert_eq!(h.count_after(&r, 0).await.unwrap(), 3);
    assert_eq!(
        payloads(&h.read(&r, 0, 10).await.unwrap()),
        ["m7", "m8", "m9"]
    );
    let next = append(&h, &r, "m10").await;
    assert_eq!(next.prev, last.unwrap().offset);
    assert_eq!(next.epoch, epoch);
    assert_eq!(h.count_after(&r, 0).await.unwrap(), 3);
}

/// The epoch names the history: the same on every call and every handle.
async fn epoch_is_stable(env: Env) {
    let h = env.handle().await;
    h.ensure_namespace("chat", limits(100, HOUR)).await.unwrap();
    h.ensure_namespace("doc", limits(100, HOUR)).await.unwrap();
    let e = h.epoch("chat").await.unwrap();
    assert!(!e.is_empty());
    assert_eq!(h.epoch("chat").await.unwrap(), e);
    assert_eq!(append(&h, &room("chat:a"), "x").await.epoch, e);
    assert_eq!(
        append(&h, &room("doc:1"), "x").await.epoch,
        h.epoch("doc").await.unwrap()
    );
    let other = env.handle().await;
    other
        .ensure_namespace("chat", limits(100, HOUR))
        .await
        .unwrap();
    assert_eq!(other.epoch("chat").await.unwrap(), e);
}

/// Read markers move forward only and list per user.
async fn read_markers(env: Env) {
    let h = env.handle().await;
    // As every Herald process does first (on nats-server 2.11 and later the
    // markers live in this namespace's stream).
    h.ensure_namespace("user", limits(100, HOUR)).await.unwrap();
    let (a, odd, inbox) = (
        room("chat:a"),
        room("chat:x.y*>%=/"),
        RoomName::user("alice").unwrap(),
    );
    let (alice, bob) = ("alice", "bob.smith/é x=1");
    assert_eq!(h.marker(alice, &a).await.unwrap(), None);
    assert!(h.markers(alice).await.unwrap().is_empty());
    assert_eq!(h.set_marker(alice, &a, 5).await.unwrap(), 5);
    assert_eq!(h.set_marker(alice, &a, 3).await.unwrap(), 5, "forward only");
    assert_eq!(h.marker(alice, &a).await.unwrap(), Some(5));
    assert_eq!(h.set_marker(alice, &a, 9).await.unwrap(), 9);
    assert_eq!(h.set_marker(alice, &a, 9).await.unwrap(), 9);
    assert_eq!(h.set_marker(alice, &odd, 2).await.unwrap(), 2);
    assert_eq!(h.set_marker(alice, &inbox, 7).await.unwrap(), 7);
    assert_eq!(h.set_marker(bob, &a, 1).await.unwrap(), 1);
    assert_eq!(h.marker(alice, &a).await.unwrap(), Some(9));
    assert_eq!(h.marker(bob, &a).await.unwrap(), Some(1));
    assert_eq!(h.marker(bob, &odd).await.unwrap(), None);
    let mut want = vec![(a.clone(), 9), (odd.clone(), 2), (inbox.clone(), 7)];
    want.sort();
    assert_eq!(h.markers(alice).await.unwrap(), want);
    assert_eq!(h.markers(bob).await.unwrap(), vec![(a.clone(), 1)]);
    assert!(
        h.markers("bob").await.unwrap().is_empty(),
        "no prefix confusion"
    );

    // Concurrent setters: the largest offset wins.
    let tasks: Vec<_> = (1..=8u64)
        .map(|i| {
            let (h, r) = (h.clone(), inbox.clone());
            tokio::spawn(async move { h.set_marker("carol", &r, i * 10).await.unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(h.marker("carol", &inbox).await.unwrap(), Some(80));

    // What a connect reads: the inbox's last offset with all the markers.
    h.ensure_namespace("user", limits(100, HOUR)).await.unwrap();
    let sent = append(&h, &inbox, "to alice").await;
    let got = h.inbox(alice).await.unwrap();
    assert_eq!(got.latest, sent.offset);
    assert_eq!(got.markers.unwrap(), want);
    let nobody = h.inbox("nobody").await.unwrap();
    assert_eq!((nobody.latest, nobody.markers.unwrap()), (0, vec![]));
    let carol = h.inbox("carol").await.unwrap();
    assert_eq!(
        (carol.latest, carol.markers.unwrap()),
        (0, vec![(inbox, 80)])
    );
}

/// Rooms of namespaces never set up as durable are refused.
async fn undeclared_namespaces_are_not_durable(env: Env) {
    let h = env.handle().await;
    h.ensure_namespace("chat", limits(100, HOUR)).await.unwrap();
    let r = room("live:x");
    let not_durable = |e: HistoryError| assert!(matches!(e, HistoryError::NotDurable(_)), "{e:?}");
    not_durable(h.append(&r, "x".into(), None).await.unwrap_err());
    not_durable(h.append(&r, "x".into(), Some("k")).await.unwrap_err());
    not_durable(h.read(&r, 0, 10).await.unwrap_err());
    not_durable(h.latest(&r).await.unwrap_err());
    not_durable(h.count_after(&r, 0).await.unwrap_err());
    not_durable(h.epoch("live").await.unwrap_err());
    assert!(matches!(
        h.ensure_namespace("bad.ns", limits(1, 1)).await,
        Err(HistoryError::Failed(_))
    ));
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Env::memory()).await;
                }
            )*
        }
        mod jetstream {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Env::jetstream()).await;
                }
            )*
        }
        mod jetstream_2_11 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Env::newer()).await;
                }
            )*
        }
    };
}

/// Reads of any length give the room's messages after the offset, in
/// order with their `prev`, only the room's, and at most `limit`: short
/// reads (what a reconnecting client missed) and long ones alike.
async fn reads_short_and_long(env: Env) {
    let h = env.handle().await;
    h.ensure_namespace("chat", limits(1000, HOUR))
        .await
        .unwrap();
    let (r, other) = (room("chat:a"), room("chat:b"));
    let mut stored = Vec::new();
    for i in 0..40 {
        stored.push(append(&h, &r, &format!("m{i}")).await);
        append(&h, &other, "elsewhere").await;
    }
    for after_index in [None, Some(0), Some(20), Some(38), Some(39)] {
        let after = after_index.map_or(0, |i: usize| stored[i].offset);
        let rest = &stored[after_index.map_or(0, |i| i + 1)..];
        for limit in [1, 5, 16, 17, 33, 40, 100] {
            let read = h.read(&r, after, limit).await.unwrap();
            let want = &rest[..rest.len().min(limit)];
            let got: Vec<(u64, u64)> = read.iter().map(|s| (s.offset, s.prev)).collect();
            let expected: Vec<(u64, u64)> = want.iter().map(|a| (a.offset, a.prev)).collect();
            assert_eq!(got, expected, "after {after}, limit {limit}");
            let first = 40 - rest.len();
            let names: Vec<String> = (first..first + want.len())
                .map(|i| format!("m{i}"))
                .collect();
            assert_eq!(payloads(&read), names, "after {after}, limit {limit}");
        }
    }
}

/// A read longer than one batch (256 messages, 1 MiB) comes whole, and a
/// count after any offset is exact.
async fn long_reads_and_counts(env: Env) {
    let h = env.handle().await;
    h.ensure_namespace("chat", limits(1000, HOUR))
        .await
        .unwrap();
    let r = room("chat:long");
    let big = "x".repeat(8 * 1024);
    let mut offsets = Vec::new();
    for i in 0..600 {
        // Every 10th message is large, so that some batches end on bytes.
        let payload = if i % 10 == 0 {
            big.clone()
        } else {
            format!("m{i}")
        };
        offsets.push(append(&h, &r, &payload).await.offset);
    }
    let all = h.read(&r, 0, 1000).await.unwrap();
    assert_eq!(all.iter().map(|s| s.offset).collect::<Vec<_>>(), offsets);
    let tail = h.read(&r, offsets[299], 1000).await.unwrap();
    assert_eq!(tail.len(), 300);
    assert_eq!(tail[0].prev, offsets[299]);
    assert_eq!(h.read(&r, 0, 257).await.unwrap().len(), 257);
    for (i, after) in [
        (0, 0),
        (1, offsets[0]),
        (300, offsets[299]),
        (600, offsets[599]),
    ] {
        assert_eq!(
            h.count_after(&r, after).await.unwrap(),
            600 - i,
            "after {after}"
        );
    }
}

contract!(
    long_reads_and_counts,
    offsets_prev_read_latest_count,
    reads_short_and_long,
    concurrent_appends_chain_exactly,
    idempotency_keys,
    history_is_limited_per_room,
    history_is_limited_by_age,
    ensure_again_updates_limits,
    epoch_is_stable,
    read_markers,
    undeclared_namespaces_are_not_durable,
);

/// Waits until `h` appends again (the client reconnected and JetStream
/// recovered its streams).
async fn append_when_back(
    h: &SharedHistory,
    r: &RoomName,
    payload: &str,
) -> herald_broker::history::Appended {
    eventually(Duration::from_secs(20), "append works again", || async {
        h.append(r, Bytes::from(payload.to_string()), None)
            .await
            .ok()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_epoch_survives_restarts_and_changes_with_the_stream() {
    let mut env = Env::jetstream();
    let h = env.handle().await;
    h.ensure_namespace("chat", limits(100, HOUR)).await.unwrap();
    let r = room("chat:a");
    let epoch = h.epoch("chat").await.unwrap();
    let before = append(&h, &r, "before restart").await;

    env.nats.as_mut().unwrap().restart().unwrap();
    let after = append_when_back(&h, &r, "after restart").await;
    assert_eq!(after.epoch, epoch, "same store, same epoch");
    assert_eq!(after.prev, before.offset, "the chain continues");
    assert_eq!(h.epoch("chat").await.unwrap(), epoch);
    let fresh = env.handle().await;
    fresh
        .ensure_namespace("chat", limits(100, HOUR))
        .await
        .unwrap();
    assert_eq!(fresh.epoch("chat").await.unwrap(), epoch);

    // Someone deletes the stream: the next append recreates it, in a new epoch.
    let js = async_nats::jetstream::new(env.client().await);
    js.delete_stream("HERALD_CHAT").await.unwrap();
    let recreated = append(&h, &r, "after delete").await;
    assert_ne!(recreated.epoch, epoch);
    assert_eq!(recreated.prev, 0);
    assert_eq!(h.epoch("chat").await.unwrap(), recreated.epoch);
    // Another process learns of it within the epoch's cache time.
    let deadline = std::time::Instant::now() + herald_broker::history::EPOCH_TTL * 2;
    while fresh.epoch("chat").await.unwrap() != recreated.epoch {
        assert!(
            std::time::Instant::now() < deadline,
            "another handle still reads the old epoch after {:?}",
            herald_broker::history::EPOCH_TTL * 2
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        payloads(&h.read(&r, 0, 10).await.unwrap()),
        ["after delete"]
    );

    // Deleted again, then ensured at start-up: again a new epoch.
    js.delete_stream("HERALD_CHAT").await.unwrap();
    h.ensure_namespace("chat", limits(100, HOUR)).await.unwrap();
    let third = h.epoch("chat").await.unwrap();
    assert!(third != recreated.epoch && third != epoch);
}

/// A stream made before reads were direct gets (no `allow_direct`) is
/// switched over by `ensure_namespace`, keeping its history, and `latest`
/// and counts read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_streams_of_earlier_versions_get_direct_reads() {
    let env = Env::jetstream();
    let js = async_nats::jetstream::new(env.client().await);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "HERALD_CHAT".into(),
        subjects: vec!["herald.durable.chat.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let r = room("chat:a");
    let old = js
        .publish(
            herald_broker::history::room_subject(&r),
            "stored before numbers".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let h = env.handle().await;
    h.ensure_namespace("chat", limits(100, HOUR)).await.unwrap();
    let info = js.get_stream("HERALD_CHAT").await.unwrap();
    assert!(info.cached_info().config.allow_direct);
    assert_eq!(h.latest(&r).await.unwrap(), old.sequence);
    let next = append(&h, &r, "numbered").await;
    assert_eq!(
        next.prev, old.sequence,
        "the chain goes on from the old message"
    );
    assert_eq!(h.latest(&r).await.unwrap(), next.offset);
    assert_eq!(h.count_after(&r, 0).await.unwrap(), 2);
    assert_eq!(h.count_after(&r, old.sequence).await.unwrap(), 1);
    assert_eq!(h.count_after(&r, next.offset).await.unwrap(), 0);
}

/// On nats-server 2.11 and later a user's markers are one entry in the
/// personal namespace's stream, beside their inbox, read with the inbox's
/// last message by one request; they outlive the inbox's age limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_2_11_keeps_markers_beside_the_inbox_past_its_age_limit() {
    let env = Env::newer();
    let h: SharedHistory = Arc::new(JetStreamHistory::new(env.client().await));
    h.ensure_namespace("user", limits(100, 1)).await.unwrap();
    h.ensure_namespace("chat", limits(100, HOUR)).await.unwrap();
    let inbox = RoomName::user("ann").unwrap();
    // The markers are written before the inbox's message, so that they
    // would expire first if the age limit took them.
    assert_eq!(h.set_marker("ann", &room("chat:a"), 4).await.unwrap(), 4);
    assert_eq!(h.set_marker("ann", &inbox, 1).await.unwrap(), 1);
    let sent = append(&h, &inbox, "to ann").await;
    assert!(sent.offset > 1);

    // The entry is in the stream, not in a bucket: no bucket was made.
    let js = async_nats::jetstream::new(env.client().await);
    let stream = js.get_stream("HERALD_USER").await.unwrap();
    let config = &stream.cached_info().config;
    assert!(
        config.allow_message_ttl && config.allow_rollup,
        "{config:?}"
    );
    let entry = stream
        .get_last_raw_message_by_subject(&herald_broker::history::markers_subject("ann"))
        .await
        .unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&entry.payload).unwrap();
    assert_eq!(stored, serde_json::json!({"chat:a": 4, "user:ann": 1}));
    assert!(
        js.get_stream("KV_herald_markers").await.is_err(),
        "no marker bucket"
    );

    // The inbox's message expires after a second; the markers stay.
    eventually(
        Duration::from_secs(20),
        "the inbox message expired",
        || async { (h.inbox("ann").await.unwrap().latest == 0).then_some(()) },
    )
    .await;
    let got = h.inbox("ann").await.unwrap();
    assert_eq!(
        got.markers.unwrap(),
        vec![(room("chat:a"), 4), (inbox.clone(), 1)]
    );
    assert_eq!(h.marker("ann", &inbox).await.unwrap(), Some(1));
}

/// Markers written to the bucket before the server was upgraded are read
/// for users without markers in the stream, and moving one carries them all
/// into the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_2_11_reads_the_markers_of_the_bucket_after_an_upgrade() {
    let env = Env::newer();
    let (a, b) = (room("chat:a"), room("chat:b"));
    // The bucket as an older server had it: one JSON entry per user.
    let js = async_nats::jetstream::new(env.client().await);
    let bucket = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "herald_markers".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    bucket
        .put("ann", r#"{"chat:a":3,"chat:b":5}"#.into())
        .await
        .unwrap();
    bucket.put("bob", r#"{"chat:a":7}"#.into()).await.unwrap();

    let h = env.handle().await;
    assert_eq!(
        h.markers("ann").await.unwrap(),
        vec![(a.clone(), 3), (b.clone(), 5)]
    );
    assert_eq!(
        h.inbox("bob").await.unwrap().markers.unwrap(),
        vec![(a.clone(), 7)]
    );
    assert_eq!(h.set_marker("ann", &a, 4).await.unwrap(), 4);
    assert_eq!(
        h.markers("ann").await.unwrap(),
        vec![(a.clone(), 4), (b.clone(), 5)]
    );
    assert_eq!(h.set_marker("ann", &b, 1).await.unwrap(), 5, "forward only");
    // The bucket is left as it was.
    let old = bucket.get("ann").await.unwrap().unwrap();
    assert_eq!(&old[..], br#"{"chat:a":3,"chat:b":5}"#);
    let stream = js.get_stream("HERALD_USER").await.unwrap();
    let entry = stream
        .get_last_raw_message_by_subject(&herald_broker::history::markers_subject("ann"))
        .await
        .unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&entry.payload).unwrap();
    assert_eq!(stored, serde_json::json!({"chat:a": 4, "chat:b": 5}));

    // A process of an earlier version, still writing to the bucket while
    // the cluster is upgraded, is not lost: the larger marker wins.
    bucket
        .put("ann", r#"{"chat:a":9,"chat:b":2}"#.into())
        .await
        .unwrap();
    let merged = vec![(a.clone(), 9), (b.clone(), 5)];
    assert_eq!(h.markers("ann").await.unwrap(), merged);
    assert_eq!(h.inbox("ann").await.unwrap().markers.unwrap(), merged);
    assert_eq!(h.set_marker("ann", &a, 8).await.unwrap(), 9, "forward only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_down_is_unavailable_then_recovers() {
    let mut env = Env::jetstream();
    let h = env.handle().await;
    h.ensure_namespace("chat", limits(100, HOUR)).await.unwrap();
    let r = room("chat:a");
    append(&h, &r, "before").await;

    env.nats.as_mut().unwrap().kill();
    // Either the client already saw the connection drop (2 s connect wait:
    // nothing sent), or the publish went out and its acknowledgement never
    // came (maybe stored).
    let started = tokio::time::Instant::now();
    let err = h
        .append(&r, "while down".into(), Some("k"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            HistoryError::Unavailable(_) | HistoryError::Unconfirmed(_)
        ),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    for (i, op) in [
        h.read(&r, 0, 10),
        Box::pin(async { h.latest(&r).await.map(|_| Vec::new()) }),
        Box::pin(async { h.count_after(&r, 0).await.map(|_| Vec::new()) }),
        Box::pin(async { h.epoch("chat").await.map(|_| Vec::new()) }),
        Box::pin(async { h.set_marker("alice", &r, 1).await.map(|_| Vec::new()) }),
    ]
    .into_iter()
    .enumerate()
    {
        let started = tokio::time::Instant::now();
        let e = op.await.unwrap_err();
        assert!(matches!(e, HistoryError::Unavailable(_)), "op {i}: {e:?}");
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "op {i}: {:?}",
            started.elapsed()
        );
    }

    env.nats.as_mut().unwrap().restart().unwrap();
    let back = append_when_back(&h, &r, "after").await;
    assert!(!back.duplicate);
    let stored = h.read(&r, 0, 10).await.unwrap();
    assert_eq!(stored.last().unwrap().offset, back.offset);
    assert_eq!(stored[0].prev, 0);
    for w in stored.windows(2) {
        assert_eq!(w[1].prev, w[0].offset);
    }
}

/// An append the store received but whose acknowledgement was lost is
/// neither "stored" nor "not stored": it is answered `Unconfirmed`, and the
/// retry with the same key that the error asks for returns the stored
/// offset, with one copy kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_append_is_unconfirmed_and_its_retry_keeps_one_copy() {
    let nats = NatsServer::start().unwrap();
    let proxy = Proxy::start(nats.addr(), Duration::ZERO).await;
    let broker = NatsBroker::connect(&proxy.nats_url(), "lost-ack-test")
        .await
        .unwrap();
    let h: SharedHistory = Arc::new(JetStreamHistory::new(broker.client().clone()));
    h.ensure_namespace("chat", limits(100, HOUR)).await.unwrap();
    let r = room("chat:a");
    h.append(&r, "first".into(), Some("k0")).await.unwrap();

    proxy.mute(true);
    let err = h.append(&r, "maybe".into(), Some("k1")).await.unwrap_err();
    assert!(matches!(err, HistoryError::Unconfirmed(_)), "{err:?}");
    assert!(err.to_string().contains("same key"), "{err}");
    proxy.mute(false);

    let retried = eventually(Duration::from_secs(20), "the retried append", || async {
        h.append(&r, "maybe".into(), Some("k1")).await.ok()
    })
    .await;
    assert!(
        retried.duplicate,
        "the first attempt was stored: {retried:?}"
    );
    let stored = h.read(&r, 0, 10).await.unwrap();
    assert_eq!(payloads(&stored), ["first", "maybe"]);
    assert_eq!(stored[1].offset, retried.offset);
}
