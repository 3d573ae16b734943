//! Durable rooms on the edge: live messages put back in offset order, gaps
//! filled from history, and recovery of a joining member from its last
//! offset, so a client sees every message exactly once and in order
//! whichever edge it lands on.
//!
//! Each stored message names the room's previous offset (`prev`), so the
//! edge knows the next one it must deliver: a message whose `prev` is the
//! last delivered offset goes out at once; one that arrives early waits
//! until its predecessor arrives or, after a short wait, is read from history.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use herald_broker::history::{HistoryError, SharedHistory};
use herald_wire::RoomName;
use herald_wire::frames::{position, with_position};

use crate::delivery;
use crate::interest::Entry;

/// How long an early message waits for its predecessor before the edge reads
/// the gap from history.
const GAP_WAIT: Duration = Duration::from_millis(200);
/// Messages read from history per request.
const PAGE: usize = 500;

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
    AwaitingInit(Vec<Bytes>),
    /// Frames go out as they arrive.
    Ephemeral,
    Durable(Durable),
}

impl Default for Order {
    fn default() -> Order {
        Order::AwaitingInit(Vec::new())
    }
}

impl Order {
    fn durable(&self) -> Option<&Durable> {
        match self {
            Order::Durable(d) => Some(d),
            _ => None,
        }
    }

    fn durable_mut(&mut self) -> Option<&mut Durable> {
        match self {
            Order::Durable(d) => Some(d),
            _ => None,
        }
    }
}

struct Durable {
    room: RoomName,
    epoch: String,
    /// The last offset delivered to the room's members.
    last: u64,
    /// Early messages by the offset they follow.
    early: BTreeMap<u64, (u64, Bytes)>,
    filling: bool,
}

pub type RoomEntry = Entry<RoomOrder>;

/// Reads where a durable room's history stands, once the subscription is
/// live, then delivers in order what arrived meanwhile. Returns how many
/// deliveries that made.
pub async fn init(
    history: &SharedHistory,
    room: RoomName,
    entry: &Arc<RoomEntry>,
) -> Result<usize, HistoryError> {
    let epoch = history.epoch(room.namespace()).await?;
    let last = history.latest(&room).await?;
    let durable = Durable {
        room,
        epoch,
        last,
        early: BTreeMap::new(),
        filling: false,
    };
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
            .map(|frame| order_frame(entry, &mut order, history, frame))
            .sum()
    })
}

fn fan_out(entry: &RoomEntry, frame: &Bytes) -> usize {
    let mut members = entry.members.write().expect("members");
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
    count
}

/// Delivers a frame that arrived on the room's subject; returns how many
/// members it went to.
pub fn on_frame(entry: &Arc<RoomEntry>, history: &SharedHistory, frame: Bytes) -> usize {
    let mut order = entry.state.0.lock().expect("room order");
    order_frame(entry, &mut order, history, frame)
}

fn order_frame(
    entry: &Arc<RoomEntry>,
    order: &mut Order,
    history: &SharedHistory,
    frame: Bytes,
) -> usize {
    let d = match order {
        Order::AwaitingInit(held) => {
            held.push(frame);
            return 0;
        }
        Order::Ephemeral => return fan_out(entry, &frame),
        Order::Durable(d) => d,
    };
    let Some((offset, prev)) = position(&frame) else {
        // Presence events and read markers are not part of the order.
        return fan_out(entry, &frame);
    };
    if offset <= d.last {
        return 0;
    }
    if prev > d.last {
        d.early.insert(prev, (offset, frame));
        if !d.filling {
            d.filling = true;
            tokio::spawn(fill_gap(entry.clone(), history.clone()));
        }
        return 0;
    }
    let mut sent = fan_out(entry, &frame);
    d.last = offset;
    sent += drain_early(entry, d);
    sent
}

/// Delivers early messages that now follow the last delivered one.
fn drain_early(entry: &RoomEntry, d: &mut Durable) -> usize {
    let mut sent = 0;
    loop {
        // Drop what was delivered meanwhile (read from history).
        while let Some((&prev, &(offset, _))) = d.early.first_key_value() {
            if offset <= d.last {
                d.early.remove(&prev);
            } else {
                break;
            }
        }
        match d.early.first_key_value() {
            Some((&prev, _)) if prev <= d.last => {
                let (offset, frame) = d.early.remove(&prev).expect("present");
                sent += fan_out(entry, &frame);
                d.last = offset;
            }
            _ => return sent,
        }
    }
}

/// Reads from history what an early message skipped over.
async fn fill_gap(entry: Arc<RoomEntry>, history: SharedHistory) {
    loop {
        tokio::time::sleep(GAP_WAIT).await;
        let (room, last) = {
            let mut order = entry.state.0.lock().expect("room order");
            let Some(d) = order.durable_mut() else {
                return;
            };
            if d.early.is_empty() {
                d.filling = false;
                return;
            }
            (d.room.clone(), d.last)
        };
        match history.read(&room, last, PAGE).await {
            Ok(stored) => {
                let mut order = entry.state.0.lock().expect("room order");
                let Some(d) = order.durable_mut() else {
                    return;
                };
                for m in stored {
                    if m.offset > d.last {
                        let frame = with_position(&m.payload, &d.epoch, m.offset, m.prev);
                        fan_out(&entry, &frame);
                        d.last = m.offset;
                    }
                }
                drain_early(&entry, d);
            }
            Err(e) => {
                tracing::warn!(%room, error = %e, "could not read a gap from history; retrying")
            }
        }
    }
}

/// The epoch of a durable room (`None` for an ephemeral one).
pub fn epoch(entry: &RoomEntry) -> Option<String> {
    let order = entry.state.0.lock().expect("room order");
    order.durable().map(|d| d.epoch.clone())
}

/// The last offset delivered in a durable room (`None` for an ephemeral one).
pub fn last(entry: &RoomEntry) -> Option<u64> {
    let order = entry.state.0.lock().expect("room order");
    order.durable().map(|d| d.last)
}

/// What a recovering join found.
pub struct Recovery {
    pub epoch: String,
    /// The room's last offset when the member joined.
    pub offset: u64,
    pub recovered: bool,
    pub missed: u64,
}

/// For a member that joined held: sends it the stored messages after `since`
/// up to what the room had delivered when it joined, then (by the caller's
/// [`crate::interest::release`]) what arrived meanwhile. `since` is `None`
/// for a plain join (nothing is replayed).
pub async fn recover(
    entry: &RoomEntry,
    history: &SharedHistory,
    member: u64,
    since: Option<(&str, u64)>,
) -> Result<Recovery, HistoryError> {
    let (room, epoch, upto) = {
        let order = entry.state.0.lock().expect("room order");
        let d = order.durable().expect("a durable room");
        // Held frames up to `last` will come from history: drop them.
        let mut members = entry.members.write().expect("members");
        if let Some(held) = members.get_mut(&member).and_then(|s| s.held.as_mut()) {
            held.retain(|f| position(f).is_none_or(|(offset, _)| offset > d.last));
        }
        (d.room.clone(), d.epoch.clone(), d.last)
    };
    let Some((since_epoch, since)) = since else {
        return Ok(Recovery {
            epoch,
            offset: upto,
            recovered: false,
            missed: 0,
        });
    };
    if since_epoch != epoch {
        return Ok(Recovery {
            epoch,
            offset: upto,
            recovered: false,
            missed: 0,
        });
    }
    let outbox = entry
        .members
        .read()
        .expect("members")
        .get(&member)
        .map(|s| s.outbox.clone());
    let Some(outbox) = outbox else {
        return Ok(Recovery {
            epoch,
            offset: upto,
            recovered: false,
            missed: 0,
        });
    };
    let mut after = since;
    let mut recovered = true;
    let mut missed = 0;
    'pages: while after < upto {
        let page = history.read(&room, after, PAGE).await?;
        if page.is_empty() {
            // Messages up to `upto` existed but are no longer kept.
            recovered = false;
            break;
        }
        for m in page {
            if m.offset > upto {
                break 'pages;
            }
            if after == since && m.prev > since {
                // The history no longer reaches back to `since`.
                recovered = false;
            }
            if !outbox
                .send_waiting(with_position(&m.payload, &epoch, m.offset, m.prev))
                .await
            {
                break 'pages;
            }
            missed += 1;
            after = m.offset;
        }
    }
    Ok(Recovery {
        epoch,
        offset: upto,
        recovered,
        missed,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use herald_broker::history::{Limits, MemoryHistory};

    use super::*;
    use crate::interest::Slot;
    use crate::interest::tests::{member, received, receives_nothing};

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
        assert_eq!(init(&history, room, &entry).await.unwrap(), 3);
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
}
