//! Durable rooms on this edge: live messages put back in offset order, gaps
//! filled from history, and recovery of a joining member from its last
//! offset, so a client sees every message exactly once and in order
//! whichever edge it lands on.
//!
//! Each stored message names the room's previous offset (`prev`), so the
//! edge knows the next one it must deliver: a message whose `prev` is the
//! last delivered offset goes out at once; one that arrives early waits
//! until its predecessor arrives or, after a short wait, is read from history.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_broker::history::{HistoryError, SharedHistory};
use herald_wire::RoomName;
use herald_wire::frames::{position, with_position};
use herald_wire::reply::ReadEvent;

use super::{RoomEntry, fan_out};

/// How long an early message waits for its predecessor before the edge reads
/// the gap from history.
const GAP_WAIT: Duration = Duration::from_millis(200);
/// Messages read from history per request.
const PAGE: usize = 500;

/// Where a durable room's delivery stands on this edge.
pub(super) struct Durable {
    room: RoomName,
    pub(super) epoch: String,
    /// The last offset delivered to the room's members.
    pub(super) last: u64,
    /// Early messages by the offset they follow, with the local member
    /// each must not reach (its publisher, when it asked for no echo).
    early: BTreeMap<u64, (u64, Bytes, Option<u64>)>,
    filling: bool,
    /// Personal rooms only: the user's read markers, as far as this edge
    /// has learned them (inline: an empty map allocates nothing, and most
    /// users have no marker).
    markers: Markers,
}

/// A user's read markers as this edge learned them: read from the store
/// once, then moved by the `read` events that come through the user's
/// personal room. A marker only moves forward, so the larger of two values
/// is right whatever order the store's answer and the events arrive in.
struct Markers {
    rooms: BTreeMap<RoomName, u64>,
    /// The broker's continuity ([`herald_broker::Broker::continuity`]) as it
    /// was before the store was read: the markers are complete while it
    /// stays so. [`NOT_READ`]: the store has not been read.
    complete_at: u64,
}

/// [`Markers::complete_at`] before the store was read.
const NOT_READ: u64 = u64::MAX;

impl Default for Markers {
    fn default() -> Markers {
        Markers {
            rooms: BTreeMap::new(),
            complete_at: NOT_READ,
        }
    }
}

impl Markers {
    fn advance(&mut self, room: RoomName, offset: u64) {
        let marker = self.rooms.entry(room).or_default();
        *marker = (*marker).max(offset);
    }

    fn all(&self) -> Vec<(RoomName, u64)> {
        self.rooms.iter().map(|(r, o)| (r.clone(), *o)).collect()
    }
}

impl Durable {
    /// Reads where the room's history stands. For a personal room, also
    /// the user's read markers, in the same read where the store can
    /// (`continuity`: the broker's, taken before; see [`Markers`]).
    pub(super) async fn load(
        history: &SharedHistory,
        room: RoomName,
        continuity: u64,
    ) -> Result<Durable, HistoryError> {
        let epoch = history.epoch(room.namespace()).await?;
        let mut markers = Markers::default();
        let last = if room.is_personal() {
            let inbox = history.inbox(room.name()).await?;
            match inbox.markers {
                Ok(stored) => {
                    markers.rooms = stored.into_iter().collect();
                    markers.complete_at = continuity;
                }
                // Read again by the connect, which goes on without them.
                Err(e) => {
                    tracing::debug!(%room, error = %herald_broker::chain(&e), "read markers unavailable")
                }
            }
            inbox.latest
        } else {
            history.latest(&room).await?
        };
        Ok(Durable {
            room,
            epoch,
            last,
            early: BTreeMap::new(),
            filling: false,
            markers,
        })
    }

    /// The user's read markers (of a personal room), if this edge has
    /// known all of them since the broker's continuity was `now`.
    pub(super) fn known_markers(&self, now: u64) -> Option<Vec<(RoomName, u64)>> {
        let markers = &self.markers;
        (now != NOT_READ && markers.complete_at == now).then(|| markers.all())
    }

    /// Takes in the markers read from the store when the broker's
    /// continuity was `at`, with what the events said meanwhile; returns
    /// them all.
    pub(super) fn learn_markers(
        &mut self,
        stored: &[(RoomName, u64)],
        at: u64,
    ) -> Vec<(RoomName, u64)> {
        let markers = &mut self.markers;
        for (room, offset) in stored {
            markers.advance(room.clone(), *offset);
        }
        markers.complete_at = at;
        markers.all()
    }

    /// Delivers `frame` if it is the next in order (with the early ones
    /// that follow it), holds it if it is early, drops it if it was
    /// delivered; returns how many deliveries that made.
    pub(super) fn order(
        &mut self,
        entry: &Arc<RoomEntry>,
        history: &SharedHistory,
        frame: Bytes,
        skip: Option<u64>,
    ) -> usize {
        let Some((offset, prev)) = position(&frame) else {
            // Presence events and read markers are not part of the order;
            // a personal room's read events keep its markers up to date.
            // (A room that no longer parses, a rule having changed, is
            // left out, as the store's reader leaves it out.)
            if self.room.is_personal()
                && let Some(read) = ReadEvent::parse(&frame)
                && let Ok(room) = RoomName::parse(&read.room)
            {
                self.markers.advance(room, read.offset);
            }
            return fan_out(entry, &frame, skip);
        };
        if offset <= self.last {
            return 0;
        }
        if prev > self.last {
            self.early.insert(prev, (offset, frame, skip));
            if !self.filling {
                self.filling = true;
                tokio::spawn(fill_gap(entry.clone(), history.clone()));
            }
            return 0;
        }
        let mut sent = fan_out(entry, &frame, skip);
        self.last = offset;
        sent += drain_early(entry, self);
        sent
    }
}

/// Delivers early messages that now follow the last delivered one.
fn drain_early(entry: &RoomEntry, d: &mut Durable) -> usize {
    let mut sent = 0;
    loop {
        // Drop what was delivered meanwhile (read from history).
        while let Some((&prev, &(offset, ..))) = d.early.first_key_value() {
            if offset <= d.last {
                d.early.remove(&prev);
            } else {
                break;
            }
        }
        match d.early.first_key_value() {
            Some((&prev, _)) if prev <= d.last => {
                let (offset, frame, skip) = d.early.remove(&prev).expect("present");
                sent += fan_out(entry, &frame, skip);
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
        match herald_broker::rooms::read(&history, &room, last, PAGE).await {
            Ok(stored) => {
                deliver_stored(&entry, stored);
            }
            Err(e) => {
                tracing::warn!(%room, error = %herald_broker::chain(&e), "could not read a gap from history; retrying")
            }
        }
    }
}

/// Delivers, in order, the messages read from history that the room has not
/// delivered yet, then the early ones that now follow; returns how many
/// messages were new.
fn deliver_stored(entry: &Arc<RoomEntry>, stored: Vec<herald_broker::history::Stored>) -> usize {
    let mut order = entry.state.0.lock().expect("room order");
    let Some(d) = order.durable_mut() else {
        return 0;
    };
    let mut new = 0;
    for m in stored {
        if m.offset > d.last {
            // Read from history, which does not say who published it: it
            // reaches every member.
            let frame = with_position(&m.payload, &d.epoch, m.offset, m.prev);
            fan_out(entry, &frame, None);
            d.last = m.offset;
            new += 1;
        }
    }
    drain_early(entry, d);
    new
}

/// Delivers what the room's history holds beyond the last delivered offset.
///
/// Called after the broker's connection broke (or dropped messages for a
/// slow consumer): the messages published meanwhile never came, and a gap
/// is otherwise noticed only when a later message arrives, which may be
/// never. One `latest` request when nothing was missed.
pub(super) async fn catch_up(entry: &Arc<RoomEntry>, history: &SharedHistory) {
    for attempt in 1.. {
        let Some((room, last)) = ({
            let order = entry.state.0.lock().expect("room order");
            order.durable().map(|d| (d.room.clone(), d.last))
        }) else {
            return;
        };
        let read = async {
            if history.latest(&room).await? <= last {
                return Ok(None);
            }
            herald_broker::rooms::read(history, &room, last, PAGE)
                .await
                .map(Some)
        };
        match read.await {
            Ok(None) => return,
            Ok(Some(stored)) => {
                let n = deliver_stored(entry, stored);
                tracing::debug!(%room, messages = n, "caught up from history after a broken broker connection");
            }
            Err(e) if attempt < CATCH_UP_ATTEMPTS => {
                tracing::debug!(%room, error = %herald_broker::chain(&e), "could not read history to catch up; retrying");
                tokio::time::sleep(GAP_WAIT).await;
            }
            Err(e) => {
                // The next break of the connection starts another catch-up,
                // and the next message published to the room fills the gap.
                tracing::warn!(%room, error = %herald_broker::chain(&e), "could not read history to catch up after a broken broker connection; the room's next message will fill the gap");
                return;
            }
        }
    }
}

/// Reads a catch-up tries before leaving the gap to the room's next message.
const CATCH_UP_ATTEMPTS: u32 = 25;

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
        let page = herald_broker::rooms::read(history, &room, after, PAGE).await?;
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
