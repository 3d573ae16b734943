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

use super::{Session, unavailable};

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
        if let Err(e) = self
            .edge
            .broker
            .publish(subjects::room(&self.user_room), event.to_frame())
            .await
        {
            tracing::warn!(user = %self.claims.sub, error = %chain(&e), "read marker not shown to other devices");
        }
        Ok(Reply::Read(ReadState {
            offset: marker,
            unread,
        }))
    }

    /// Unread counts for `connected`: per durable room with a read marker,
    /// and always the personal room; also the personal room's marker.
    /// `inbox_last` is the inbox's latest offset, known from joining it: an
    /// inbox read up to there needs no count from the store.
    pub(super) async fn unread(&self, inbox_last: u64) -> (BTreeMap<String, u64>, u64) {
        let history = &self.edge.history;
        let mut unread = BTreeMap::new();
        let mut inbox_marker = 0;
        let mut rooms = match history.markers(&self.claims.sub).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(user = %self.claims.sub, error = %chain(&e), "read markers unavailable");
                return (unread, 0);
            }
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
