//! Rooms on this edge: each room's delivery order and the fan-out of its
//! messages to the local members. Frames arrive on the room's subject
//! (`interest` keeps the subscriptions and the member lists); an ephemeral
//! room passes them on as they come, a durable one puts them back in offset
//! order first (`durable`). Every room, durable or not, is fanned out here.

mod durable;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use herald_auth::Policy;
use herald_broker::history::{HistoryError, SharedHistory};
use herald_broker::rooms::NO_ECHO;
use herald_broker::{BrokerError, SharedBroker};
use herald_wire::{RoomName, subjects};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

pub use durable::{Recovery, recover};

use crate::delivery;
use crate::interest::{self, Entry, Interest};

/// A room's entry in the edge's table: its members and its order.
pub type RoomEntry = Entry<RoomOrder>;

/// The edge's room table: a subscription per room with local members (one
/// per shard for personal rooms), each message put in order and fanned out
/// to them. `delivered` counts deliveries, `count` the rooms.
pub fn table(
    broker: SharedBroker,
    history: SharedHistory,
    policy: Policy,
    node: &str,
    delivered: Counter,
    count: Gauge,
) -> Interest<RoomName, RoomOrder> {
    let on_room_frame: interest::Handler<RoomOrder> = {
        let (history, delivered) = (history.clone(), delivered.clone());
        let node: Arc<str> = node.into();
        Arc::new(move |msg, entry| {
            let span = fanout_span(&msg);
            let bytes = msg.payload.len();
            let skip = no_echo(&msg, &node);
            let n = span.in_scope(|| on_live(entry, &history, msg.payload, skip));
            span.record("members", n);
            span.record("bytes", n * bytes);
            delivered.inc_by(n as u64);
        })
    };
    // Every room, durable or not, is started here: frames that its shard's
    // subscription brought before this ran were held and go out now.
    let link = broker.clone();
    let init_room: interest::Init<RoomName, RoomOrder> = Arc::new(move |room: RoomName, entry| {
        let (history, delivered) = (history.clone(), delivered.clone());
        let durable = policy.is_durable(room.namespace());
        // Before the store is read: a personal room's markers are complete
        // while the broker's connection has not broken since.
        let continuity = link.continuity();
        Box::pin(async move {
            let n = if durable {
                init(&history, room, &entry, continuity)
                    .await
                    .map_err(BrokerError::unavailable)?
            } else {
                init_ephemeral(&entry, &history)
            };
            delivered.inc_by(n as u64);
            Ok(())
        })
    });
    Interest::new(
        broker,
        subjects::room,
        on_room_frame,
        Some(init_room),
        count,
    )
    .sharded(subjects::room_shard, subjects::room_from_subject)
    .wide(subjects::all_personal_rooms(), WIDE_AT)
}

/// Shards of personal rooms with local users at which the edge takes one
/// subscription to all of them instead (of 1024): by then it receives half
/// of all personal rooms' traffic anyway, at most twice that after.
const WIDE_AT: usize = 512;

/// The local connection a message published with `echo: false` must not
/// reach: named by its [`NO_ECHO`] header, when that connection is on this
/// edge (`<node>-<n>`). One header lookup per message, none when the
/// message has no headers.
fn no_echo(msg: &herald_broker::Message, node: &str) -> Option<u64> {
    let conn = msg.headers.as_ref()?.get(NO_ECHO)?.as_str();
    conn.strip_prefix(node)?.strip_prefix('-')?.parse().ok()
}

/// The exported span of one room message's fan-out on this edge: one per
/// message, not per member, child of the publisher's span when the message
/// carries a trace context. Disabled (a branch) when traces are not
/// exported.
fn fanout_span(msg: &herald_broker::Message) -> tracing::Span {
    let span = tracing::info_span!(
        target: herald_telemetry::TARGET,
        "room.fanout",
        otel.name = %format_args!("fanout {}", msg.subject),
        otel.kind = "consumer",
        messaging.system = "nats",
        messaging.destination.name = %msg.subject,
        members = tracing::field::Empty,
        bytes = tracing::field::Empty,
    );
    if let Some(headers) = &msg.headers {
        herald_telemetry::extract(&span, |key| headers.get(key).map(|v| v.as_str()));
    }
    span
}

/// The delivery order of one room on this edge. Every room starts awaiting
/// its init ([`init`] or [`init_ephemeral`]), which must run for frames to
/// flow.
#[derive(Default)]
pub struct RoomOrder(Mutex<Order>);

enum Order {
    /// Frames wait here, in arrival order, until the room's init says how to
    /// order them. A subscription shared by many rooms (a shard of personal
    /// rooms) is live before a newly joined room's init has read where its
    /// history stands, so its messages may come first.
    AwaitingInit(Vec<(Bytes, Option<u64>)>),
    /// Frames go out as they arrive.
    Ephemeral,
    Durable(durable::Durable),
}

impl Default for Order {
    fn default() -> Order {
        Order::AwaitingInit(Vec::new())
    }
}

impl Order {
    fn durable(&self) -> Option<&durable::Durable> {
        match self {
            Order::Durable(d) => Some(d),
            _ => None,
        }
    }

    fn durable_mut(&mut self) -> Option<&mut durable::Durable> {
        match self {
            Order::Durable(d) => Some(d),
            _ => None,
        }
    }
}

/// Reads where a durable room's history stands, once the subscription is
/// live, then delivers in order what arrived meanwhile. Returns how many
/// deliveries that made.
pub async fn init(
    history: &SharedHistory,
    room: RoomName,
    entry: &Arc<RoomEntry>,
    continuity: u64,
) -> Result<usize, HistoryError> {
    let durable = durable::Durable::load(history, room, continuity).await?;
    Ok(start(entry, history, Order::Durable(durable)))
}

/// Starts an ephemeral room: what arrived before goes out now, in order.
pub fn init_ephemeral(entry: &Arc<RoomEntry>, history: &SharedHistory) -> usize {
    start(entry, history, Order::Ephemeral)
}

fn start(entry: &Arc<RoomEntry>, history: &SharedHistory, started: Order) -> usize {
    let mut order = entry.state.0.lock().expect("room order");
    let held = match std::mem::replace(&mut *order, started) {
        Order::AwaitingInit(held) => held,
        // Started before: keep its position rather than rewind it.
        previous => {
            *order = previous;
            return 0;
        }
    };
    delivery::batch(|| {
        held.into_iter()
            .map(|(frame, skip)| order_frame(entry, &mut order, history, frame, skip))
            .sum()
    })
}

/// Delivers a frame that arrived on the room's subject; returns how many
/// members it went to.
#[cfg(test)]
pub fn on_frame(entry: &Arc<RoomEntry>, history: &SharedHistory, frame: Bytes) -> usize {
    on_live(entry, history, frame, None)
}

/// [`on_frame`], leaving out local member `skip` (its publisher, which
/// asked for no echo).
pub fn on_live(
    entry: &Arc<RoomEntry>,
    history: &SharedHistory,
    frame: Bytes,
    skip: Option<u64>,
) -> usize {
    let mut order = entry.state.0.lock().expect("room order");
    order_frame(entry, &mut order, history, frame, skip)
}

fn order_frame(
    entry: &Arc<RoomEntry>,
    order: &mut Order,
    history: &SharedHistory,
    frame: Bytes,
    skip: Option<u64>,
) -> usize {
    match order {
        Order::AwaitingInit(held) => {
            held.push((frame, skip));
            0
        }
        Order::Ephemeral => fan_out(entry, &frame, skip),
        Order::Durable(d) => d.order(entry, history, frame, skip),
    }
}

/// Sends `frame` to every member of the room but `skip`; returns how many
/// it went to.
fn fan_out(entry: &RoomEntry, frame: &Bytes, skip: Option<u64>) -> usize {
    let mut members = entry.members.write().expect("members");
    // Out of the map for this one pass, so the loop below stays the same
    // for every message; only `echo: false` messages pay for it.
    let skipped = skip.and_then(|id| members.remove(&id).map(|slot| (id, slot)));
    let count = members.len();
    let mut sends = delivery::Sends::new(frame);
    // Two members ahead, the slot (which holds the pointer to the member's
    // state); one ahead, the state itself: both misses then overlap a send.
    let mut slots = members.values_mut();
    let mut current = slots.next();
    let mut next = slots.next();
    while let Some(member) = current {
        let after = slots.next();
        if let Some(after) = &after {
            delivery::prefetch(&**after);
        }
        if let Some(next) = &next {
            next.outbox.prefetch();
        }
        member.deliver_in(frame, &mut sends);
        (current, next) = (next, after);
    }
    drop(sends);
    if let Some((id, slot)) = skipped {
        members.insert(id, slot);
    }
    crate::metrics::fanned_out(frame, count, delivery::in_batch());
    count
}

/// How often the edge looks whether its broker connection broke.
const BREAK_CHECK: Duration = Duration::from_millis(100);

/// Durable rooms reading their history at once after a break.
const CATCH_UP_AT_ONCE: usize = 16;

/// After each break of the broker connection (or messages dropped for a slow
/// consumer), once connected again, every durable room on this edge reads
/// from history what was stored beyond its last delivered offset: the
/// messages published meanwhile never came, and without this a member would
/// see them only when the room's next message revealed the gap.
///
/// Twice: at once, and again [`herald_broker::RESUME_SETTLE`] later. A
/// message whose live copy passed before the edge subscribed again may not
/// have been stored yet when the first read was answered; publishers that
/// reconnected themselves refuse to publish for that long, and a stored
/// message is acknowledged well within it.
pub async fn catch_up_after_breaks(edge: Arc<crate::Edge>) {
    let mut seen = edge.broker.continuity();
    let mut tick = tokio::time::interval(BREAK_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = edge.shutdown.cancelled() => return,
        }
        let now = edge.broker.continuity();
        if now == seen || !edge.broker.is_connected() {
            continue;
        }
        seen = now;
        for wait in [Duration::ZERO, herald_broker::RESUME_SETTLE] {
            tokio::time::sleep(wait).await;
            let entries = edge.rooms.entries();
            tracing::debug!(
                rooms = entries.len(),
                "the broker connection broke; durable rooms read what they missed from history"
            );
            futures::stream::iter(entries)
                .for_each_concurrent(CATCH_UP_AT_ONCE, |entry| {
                    let history = &edge.history;
                    async move { durable::catch_up(&entry, history).await }
                })
                .await;
        }
    }
}

/// The epoch of a durable room (`None` for an ephemeral one).
pub fn epoch(entry: &RoomEntry) -> Option<String> {
    let order = entry.state.0.lock().expect("room order");
    order.durable().map(|d| d.epoch.clone())
}

/// The user's read markers, from the entry of their personal room, if this
/// edge has known every one of them since the broker's continuity was
/// `now` ([`herald_broker::Broker::continuity`]).
pub fn known_markers(entry: &RoomEntry, now: u64) -> Option<Vec<(RoomName, u64)>> {
    let order = entry.state.0.lock().expect("room order");
    order.durable()?.known_markers(now)
}

/// Keeps the user's read markers, read from the store when the broker's
/// continuity was `at`, in the entry of their personal room, together with
/// what `read` events said meanwhile; returns them all.
pub fn learn_markers(
    entry: &RoomEntry,
    stored: &[(RoomName, u64)],
    at: u64,
) -> Vec<(RoomName, u64)> {
    let mut order = entry.state.0.lock().expect("room order");
    match order.durable_mut() {
        Some(d) => d.learn_markers(stored, at),
        None => stored.to_vec(),
    }
}

/// The last offset delivered in a durable room (`None` for an ephemeral one).
pub fn last(entry: &RoomEntry) -> Option<u64> {
    let order = entry.state.0.lock().expect("room order");
    order.durable().map(|d| d.last)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use herald_broker::history::{Limits, MemoryHistory};

    use super::*;
    use crate::interest::Slot;
    use crate::interest::tests::{member, received, receives_nothing};
    use herald_wire::frames::with_position;

    fn frame(n: u32) -> Bytes {
        Bytes::from(format!(r#"{{"op":"message","n":{n}}}"#))
    }

    async fn entry_with_member() -> (Arc<RoomEntry>, tokio::net::TcpStream) {
        let entry = RoomEntry::new();
        let (outbox, client) = member(1).await;
        let slot = Slot { outbox, held: None };
        entry.members.write().unwrap().insert(1, slot);
        (entry, client)
    }

    #[tokio::test]
    async fn an_ephemeral_room_holds_frames_until_init_then_passes_them() {
        let history: SharedHistory = Arc::new(MemoryHistory::new());
        let (entry, mut client) = entry_with_member().await;
        assert_eq!(on_frame(&entry, &history, frame(1)), 0);
        assert_eq!(on_frame(&entry, &history, frame(2)), 0);
        receives_nothing(&mut client).await;
        assert_eq!(init_ephemeral(&entry, &history), 2);
        assert_eq!(on_frame(&entry, &history, frame(3)), 1);
        assert_eq!(
            received(&mut client, 3).await,
            [
                r#"{"op":"message","n":1}"#,
                r#"{"op":"message","n":2}"#,
                r#"{"op":"message","n":3}"#
            ]
        );
        // A second start changes nothing.
        assert_eq!(init_ephemeral(&entry, &history), 0);
        assert_eq!(epoch(&entry), None);
    }

    /// `echo: false`: the publisher (named by the header, when it is on
    /// this edge) is left out of that message alone; early durable
    /// messages keep whom to leave out until they go.
    #[tokio::test]
    async fn a_message_without_echo_skips_its_publisher_only() {
        let history: SharedHistory = Arc::new(MemoryHistory::new());
        let (entry, mut publisher) = entry_with_member().await;
        let (outbox, mut other) = member(2).await;
        entry
            .members
            .write()
            .unwrap()
            .insert(2, Slot { outbox, held: None });
        init_ephemeral(&entry, &history);
        assert_eq!(on_live(&entry, &history, frame(1), Some(1)), 1);
        assert_eq!(on_live(&entry, &history, frame(2), None), 2);
        assert_eq!(received(&mut other, 2).await.len(), 2);
        assert_eq!(
            received(&mut publisher, 1).await,
            [r#"{"op":"message","n":2}"#]
        );
        receives_nothing(&mut publisher).await;

        let limits = Limits {
            max_messages_per_room: 100,
            max_age: Duration::from_secs(3600),
        };
        history.ensure_namespace("doc", limits).await.unwrap();
        let room = RoomName::parse("doc:a").unwrap();
        let (entry, mut publisher) = entry_with_member().await;
        init(&history, room, &entry, 0).await.unwrap();
        let at = |n, offset, prev| with_position(&frame(n), "e", offset, prev);
        assert_eq!(on_live(&entry, &history, at(2, 2, 1), Some(1)), 0, "early");
        assert_eq!(on_live(&entry, &history, at(1, 1, 0), None), 1);
        assert_eq!(received(&mut publisher, 1).await.len(), 1);
        receives_nothing(&mut publisher).await;
    }

    #[test]
    fn the_no_echo_header_names_a_connection_of_this_edge() {
        let msg = |conn: Option<&str>| herald_broker::Message {
            subject: "herald.room.chat:a".into(),
            payload: Bytes::new(),
            reply: None,
            headers: conn.map(|c| {
                let mut h = herald_broker::Headers::new();
                h.insert(NO_ECHO, c);
                h
            }),
        };
        assert_eq!(no_echo(&msg(Some("e1-4")), "e1"), Some(4));
        assert_eq!(no_echo(&msg(Some("e1-4")), "e1-"), None);
        assert_eq!(no_echo(&msg(Some("e10-4")), "e1"), None, "another edge's");
        assert_eq!(no_echo(&msg(Some("e1-x")), "e1"), None);
        assert_eq!(no_echo(&msg(None), "e1"), None);
    }

    #[tokio::test]
    async fn a_durable_room_orders_frames_held_before_init() {
        let history: SharedHistory = Arc::new(MemoryHistory::new());
        let limits = Limits {
            max_messages_per_room: 100,
            max_age: Duration::from_secs(3600),
        };
        history.ensure_namespace("doc", limits).await.unwrap();
        let room = RoomName::parse("doc:a").unwrap();
        let stored = history.append(&room, frame(1), None).await.unwrap();
        let (epoch, o1) = (stored.epoch, stored.offset);
        let at = |n, offset, prev| with_position(&frame(n), &epoch, offset, prev);
        let (entry, mut client) = entry_with_member().await;
        // Held in arrival order: one the store already had when init read
        // it, one early, a presence event (not ordered), its predecessor.
        let event = Bytes::from_static(br#"{"op":"presence"}"#);
        for f in [
            at(1, o1, 0),
            at(3, o1 + 2, o1 + 1),
            event.clone(),
            at(2, o1 + 1, o1),
        ] {
            assert_eq!(on_frame(&entry, &history, f), 0);
        }
        receives_nothing(&mut client).await;
        assert_eq!(init(&history, room, &entry, 0).await.unwrap(), 3);
        assert_eq!(last(&entry), Some(o1 + 2));
        // A repeat of a delivered offset is dropped.
        assert_eq!(on_frame(&entry, &history, at(3, o1 + 2, o1 + 1)), 0);
        let got = received(&mut client, 3).await;
        let expected = [event, at(2, o1 + 1, o1), at(3, o1 + 2, o1 + 1)];
        assert_eq!(
            got,
            expected.map(|f| String::from_utf8(f.to_vec()).unwrap())
        );
        receives_nothing(&mut client).await;
    }

    /// A personal room reads the user's markers when it starts, with the
    /// continuity taken before; `read` events held while it started are
    /// kept too, the larger marker winning.
    #[tokio::test]
    async fn a_personal_room_reads_its_markers_when_it_starts() {
        let history: SharedHistory = Arc::new(MemoryHistory::new());
        let limits = Limits {
            max_messages_per_room: 100,
            max_age: Duration::from_secs(3600),
        };
        history.ensure_namespace("user", limits).await.unwrap();
        let (a, b) = (
            RoomName::parse("doc:a").unwrap(),
            RoomName::parse("doc:b").unwrap(),
        );
        history.set_marker("alice", &a, 3).await.unwrap();
        history.set_marker("alice", &b, 8).await.unwrap();
        let (entry, _client) = entry_with_member().await;
        let held = herald_wire::reply::ReadEvent {
            room: "doc:a".into(),
            offset: 5,
            unread: 0,
        };
        on_frame(&entry, &history, held.to_frame());
        let inbox = RoomName::user("alice").unwrap();
        init(&history, inbox, &entry, 4).await.unwrap();
        assert_eq!(known_markers(&entry, 4), Some(vec![(a, 5), (b, 8)]));
        assert_eq!(
            known_markers(&entry, 5),
            None,
            "the broker connection broke"
        );
    }

    /// A personal room's entry keeps the user's read markers: what the
    /// store said, moved forward by the `read` events that pass through,
    /// and trusted only while the broker's continuity stays as it was.
    #[tokio::test]
    async fn a_personal_room_keeps_the_markers_its_read_events_carry() {
        let history: SharedHistory = Arc::new(MemoryHistory::new());
        let limits = Limits {
            max_messages_per_room: 100,
            max_age: Duration::from_secs(3600),
        };
        history.ensure_namespace("user", limits).await.unwrap();
        let inbox = RoomName::user("alice").unwrap();
        let (entry, mut client) = entry_with_member().await;
        init(&history, inbox, &entry, 0).await.unwrap();
        let read = |room: &str, offset| {
            herald_wire::reply::ReadEvent {
                room: room.into(),
                offset,
                unread: 0,
            }
            .to_frame()
        };
        let (a, b) = (
            RoomName::parse("doc:a").unwrap(),
            RoomName::parse("doc:b").unwrap(),
        );
        assert_eq!(known_markers(&entry, 0), Some(vec![]), "read at the start");
        assert_eq!(known_markers(&entry, 7), None, "not read at continuity 7");
        // An event that comes before the store's answer is kept, and the
        // larger marker wins.
        assert_eq!(on_frame(&entry, &history, read("doc:a", 5)), 1);
        let stored = [(a.clone(), 3), (b.clone(), 2)];
        let all = learn_markers(&entry, &stored, 7);
        assert_eq!(all, [(a.clone(), 5), (b.clone(), 2)]);
        assert_eq!(known_markers(&entry, 7), Some(all));
        assert_eq!(
            known_markers(&entry, 8),
            None,
            "the broker connection broke"
        );
        // Later events move markers forward only.
        on_frame(&entry, &history, read("doc:b", 9));
        on_frame(&entry, &history, read("doc:b", 4));
        assert_eq!(known_markers(&entry, 7), Some(vec![(a, 5), (b, 9)]));
        // The events still reach the user's connections.
        assert_eq!(received(&mut client, 3).await.len(), 3);
    }
}
