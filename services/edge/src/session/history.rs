//! A session's reading of durable rooms: pages of history, read markers
//! (shown to every device of the user), and the unread counts that
//! `connected` carries.

use std::collections::BTreeMap;

use herald_broker::chain;
use herald_broker::rooms;
use herald_wire::frames::{self, FrameError, Since};
use herald_wire::reply::{HistoryPage, ReadEvent, ReadState};
use herald_wire::{Reply, RoomName, subjects};
use serde_json::value::RawValue;

use std::sync::Arc;
use std::time::Duration;

use herald_broker::BrokerError;

use super::{Session, unavailable};
use crate::Edge;
use crate::room::{self, RoomEntry};

/// How long a `read` event the broker did not confirm is retried.
const ANNOUNCE_PATIENCE: Duration = Duration::from_secs(30);
/// How often it is retried meanwhile.
const ANNOUNCE_RETRY: Duration = Duration::from_millis(500);

impl Session {
    /// `history`: a page of a durable room's stored messages, each with its
    /// position.
    pub(super) async fn history(
        &mut self,
        id: Option<u64>,
        room: RoomName,
        since: Option<Since>,
        limit: Option<u32>,
    ) -> Result<Reply, FrameError> {
        self.may_join(id, &room)?;
        self.durable_only(id, &room)?;
        let since = since.as_ref().map(|s| (s.epoch.as_str(), s.offset));
        let (epoch, stored) = rooms::history_page(&self.edge.history, &room, since, limit)
            .await
            .map_err(|e| unavailable(&self.conn, id, &e))?;
        let messages = stored
            .iter()
            .filter_map(|m| {
                let frame = frames::with_position(&m.payload, &epoch, m.offset, m.prev);
                let text = String::from_utf8(frame.to_vec()).ok()?;
                RawValue::from_string(text).ok()
            })
            .collect();
        Ok(Reply::History(HistoryPage { epoch, messages }))
    }

    /// `read`: moves the user's read marker in a durable room; every device
    /// of the user learns of it through the personal room.
    pub(super) async fn read(
        &mut self,
        id: Option<u64>,
        room: RoomName,
        offset: u64,
    ) -> Result<Reply, FrameError> {
        self.may_join(id, &room)?;
        self.durable_only(id, &room)?;
        let history = &self.edge.history;
        let marker = history
            .set_marker(&self.claims.sub, &room, offset)
            .await
            .map_err(|e| unavailable(&self.conn, id, &e))?;
        let unread = history
            .count_after(&room, marker)
            .await
            .map_err(|e| unavailable(&self.conn, id, &e))?;
        let event = ReadEvent {
            room: room.to_string(),
            offset: marker,
            unread,
        };
        if let Err(e) = announce(&self.edge, &self.user_room, &event).await {
            tracing::warn!(
                user = %self.claims.sub, error = %chain(&e),
                "the read marker may not have reached the user's other devices; it is sent again once the broker is back"
            );
            tokio::spawn(announce_again(
                self.edge.clone(),
                self.claims.sub.clone(),
                self.user_room.clone(),
                room,
            ));
        }
        Ok(Reply::Read(ReadState {
            offset: marker,
            unread,
        }))
    }

    /// Unread counts for `connected`: per durable room with a read marker,
    /// and always the personal room; also the personal room's marker.
    /// `inbox` is the personal room's entry: it holds the inbox's latest
    /// offset (an inbox read up to there needs no count from the store) and,
    /// when this edge has followed the user's `read` events since it last
    /// read them, the markers themselves.
    pub(super) async fn unread(&self, inbox: &RoomEntry) -> (BTreeMap<String, u64>, u64) {
        let history = &self.edge.history;
        let inbox_last = room::last(inbox).unwrap_or(0);
        let mut unread = BTreeMap::new();
        let mut inbox_marker = 0;
        // Taken before the store is read: a break in the broker connection
        // after this leaves the markers unknown for the next connect.
        let continuity = self.edge.broker.continuity();
        let mut rooms = match room::known_markers(inbox, continuity) {
            Some(known) => known,
            None => match history.markers(&self.claims.sub).await {
                Ok(stored) => room::learn_markers(inbox, &stored, continuity),
                Err(e) => {
                    tracing::warn!(user = %self.claims.sub, error = %chain(&e), "read markers unavailable");
                    return (unread, 0);
                }
            },
        };
        if let Some((_, m)) = rooms.iter().find(|(r, _)| *r == self.user_room) {
            inbox_marker = *m;
        } else {
            rooms.push((self.user_room.clone(), 0));
        }
        for (room, marker) in rooms {
            if room == self.user_room && inbox_last <= marker {
                unread.insert(room.to_string(), 0);
                continue;
            }
            if let Ok(n) = history.count_after(&room, marker).await {
                unread.insert(room.to_string(), n);
            }
        }
        (unread, inbox_marker)
    }
}

/// Publishes a `read` event in the user's personal room and waits until the
/// broker has it: edges keep the markers they learn from these events
/// (`connected` counts unread messages with them), so one that is lost on
/// the way to the broker must be sent again.
async fn announce(edge: &Edge, user_room: &RoomName, event: &ReadEvent) -> Result<(), BrokerError> {
    let mark = edge.broker.mark();
    edge.broker
        .publish(subjects::room(user_room), event.to_frame())
        .await?;
    edge.broker.confirm(mark).await
}

/// Sends the user's marker in `room` again, as the store now has it, once
/// the broker takes publishes again; gives up after [`ANNOUNCE_PATIENCE`]
/// (by then the edges that held the user's markers without a member have
/// let them go, and those with a member have lost their connection too, or
/// would have received the event).
async fn announce_again(edge: Arc<Edge>, user: String, user_room: RoomName, room: RoomName) {
    let deadline = tokio::time::Instant::now() + ANNOUNCE_PATIENCE;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(ANNOUNCE_RETRY).await;
        if edge.broker.publishable().is_err() {
            continue;
        }
        let history = &edge.history;
        let Ok(Some(offset)) = history.marker(&user, &room).await else {
            continue;
        };
        let Ok(unread) = history.count_after(&room, offset).await else {
            continue;
        };
        let event = ReadEvent {
            room: room.to_string(),
            offset,
            unread,
        };
        if announce(&edge, &user_room, &event).await.is_ok() {
            tracing::info!(%user, %room, "the read marker was sent again to the user's other devices");
            return;
        }
    }
    tracing::warn!(%user, %room, "the read marker could not be sent again to the user's other devices");
}
