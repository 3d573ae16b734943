//! A session's rooms: joining (with recovery in durable rooms), leaving,
//! publishing, and the namespace policy that decides who may do which.

use herald_auth::{Denied, FeedKind, NamespacePolicy};
use herald_broker::feed::FeedError;
use herald_broker::{chain, rooms};
use herald_wire::frames::{self, FrameError, PresenceEvent, Since};
use herald_wire::presence::Change;
use herald_wire::reply::{Joined as JoinedReply, Position};
use herald_wire::{ErrorCode, Reply, RoomName};
use serde_json::Value;
use serde_json::value::RawValue;

use super::limits::Kind;
use super::{Joined, Session, unavailable};
use crate::room::{self, Recovery};

impl Session {
    /// `join`: checks the policy and the meta, joins, and answers with where
    /// the room stands (and what was recovered).
    pub(super) async fn join(
        &mut self,
        id: Option<u64>,
        room: RoomName,
        since: Option<Since>,
        meta: Option<Box<RawValue>>,
    ) -> Result<Reply, FrameError> {
        let policy = self.may_join(id, &room)?.clone();
        self.check_rate(id, Kind::Join, &room)?;
        let meta = self.meta(id, &room, meta.as_deref())?;
        self.join_hook(id, &room, meta.as_ref()).await?;
        let r = self.join_room(id, &room, &policy, meta, since).await?;
        Ok(Reply::Joined(JoinedReply {
            epoch: r.epoch,
            offset: r.offset,
            recovered: r.recovered,
            missed: r.missed,
        }))
    }

    /// `leave`: any room but the personal one.
    pub(super) async fn leave(
        &mut self,
        id: Option<u64>,
        room: RoomName,
    ) -> Result<Reply, FrameError> {
        if room == self.user_room {
            return Err(FrameError::new(
                id,
                ErrorCode::Forbidden,
                "the personal room is kept for the whole connection",
            ));
        }
        self.leave_room(&room).await;
        Ok(Reply::Done)
    }

    /// `publish`: to every member on every edge (but this connection, with
    /// `echo: false`); a durable room stores the message first and the
    /// reply says where.
    pub(super) async fn publish(
        &mut self,
        id: Option<u64>,
        room: RoomName,
        data: Box<RawValue>,
        key: Option<String>,
        echo: bool,
    ) -> Result<Reply, FrameError> {
        let policy = &self.edge.config.policy;
        self.allowed(id, policy.check_publish(&self.claims, room.as_str()))?;
        self.check_rate(id, Kind::Publish, &room)?;
        let user_limit = self
            .edge
            .config
            .policy
            .rates(room.namespace())
            .user_publish_per_second;
        if let Err(wait) = self.edge.quota.take(&self.claims.sub, user_limit) {
            return Err(self.limited(
                id,
                format!(
                    "user {} published more than {user_limit} messages a second across its connections",
                    self.claims.sub
                ),
                wait,
            ));
        }
        let data = self.publish_hook(id, &room, data).await?;
        let policy = &self.edge.config.policy;
        let now = crate::now_ms();
        let frame = frames::message_frame(&room, &data, &self.claims.sub, now);
        let durable = policy.is_durable(room.namespace());
        let delivery = rooms::Delivery {
            durable,
            traceparent: policy.sends_traceparent(room.namespace()),
        };
        let published = rooms::publish_from(
            &self.edge.broker,
            &self.edge.history,
            &room,
            delivery,
            frame,
            key.as_deref(),
            (!echo).then_some(self.conn.as_str()),
        )
        .await
        .map_err(|e| {
            if e.is_too_large() {
                FrameError::new(id, ErrorCode::TooLarge, e.to_string())
            } else if e.is_unconfirmed() {
                tracing::warn!(conn = %self.conn, error = %chain(&e), "a publish's outcome is unknown");
                FrameError::new(id, ErrorCode::OutcomeUnknown, e.to_string())
            } else {
                unavailable(&self.conn, id, &e)
            }
        })?;
        if self.edge.feeds(&room, FeedKind::Publish) {
            // The answer waits for the event to be stored: an `ok` means the
            // feed has it.
            let seq = self.next_feed_seq();
            let position = durable.then_some((published.epoch.as_str(), published.offset));
            let event = crate::feed::publish(&room, &data, self.who(), seq, position, now);
            self.edge.append(event).await.map_err(|e| match e {
                FeedError::Unconfirmed(_) => {
                    tracing::warn!(conn = %self.conn, error = %chain(&e), "a publish's feed event is unconfirmed");
                    FrameError::new(id, ErrorCode::OutcomeUnknown, e.to_string())
                }
                _ => unavailable(&self.conn, id, &e),
            })?;
        }
        self.edge.metrics.published.inc();
        crate::metrics::published(room.namespace());
        if durable {
            Ok(Reply::Published(Position {
                epoch: published.epoch,
                offset: published.offset,
            }))
        } else {
            Ok(Reply::Done)
        }
    }

    /// Joins `room` (idempotent; a repeat with `meta` updates it). The
    /// subscription is live and the join announced before this returns. In a
    /// durable room, `since` replays the messages after it; what arrives live
    /// meanwhile is held in `after_reply`, released once the reply is queued.
    pub(super) async fn join_room(
        &mut self,
        id: Option<u64>,
        room: &RoomName,
        policy: &NamespacePolicy,
        meta: Option<Value>,
        since: Option<Since>,
    ) -> Result<Recovery, FrameError> {
        let durable = self.edge.config.policy.is_durable(room.namespace());
        let presence = policy.presence && !room.is_personal();
        let joined = Joined {
            presence,
            events: presence && policy.presence_events,
        };
        let existing = if *room == self.user_room {
            Some(joined)
        } else {
            self.rooms.get(room).copied()
        };
        if let Some(existing) = existing {
            if let (true, Some(meta)) = (existing.presence, meta.clone()) {
                self.update_meta(room, existing, meta).await;
            }
        } else if self.rooms.len() >= self.edge.config.max_rooms_per_conn {
            return Err(FrameError::new(
                id,
                ErrorCode::TooLarge,
                format!(
                    "this connection is already in {} rooms, the most allowed",
                    self.rooms.len()
                ),
            ));
        }
        // Rooms granted at connect are held too, until `connected` is out.
        let hold = (durable && since.is_some())
            || self.rare.as_ref().is_some_and(|r| r.granting.is_some());
        // A member already in the room is held again while it catches up.
        let entry = self
            .edge
            .rooms
            .join(room, &self.outbox, hold)
            .await
            .map_err(|e| unavailable(&self.conn, id, &e))?;
        if let Some(granted) = self.rare.as_mut().and_then(|r| r.granting.as_mut()) {
            granted.push(entry.clone());
        }
        if existing.is_none() {
            self.rooms.insert(room.clone(), joined);
            if presence {
                self.edge.reporter.report(Change::Join {
                    conn: self.conn.clone(),
                    room: room.to_string(),
                    meta: meta.clone(),
                    quiet: !joined.events,
                });
            }
            self.announce(room, joined, PresenceEvent::Join, meta.as_ref())
                .await;
            self.feed_membership(room, "join", meta.as_ref()).await;
        }
        if !durable {
            // Ephemeral rooms keep no history: nothing to recover from.
            return Ok(Recovery {
                epoch: String::new(),
                offset: 0,
                recovered: false,
                missed: 0,
            });
        }
        let since = since.as_ref().map(|s| (s.epoch.as_str(), s.offset));
        let recovery = room::recover(&entry, &self.edge.history, self.outbox.id, since).await;
        if since.is_some() {
            self.after_reply = Some(entry);
        }
        recovery.map_err(|e| unavailable(&self.conn, id, &e))
    }

    /// Leaves a room: the leave is announced to its members, then the
    /// membership dropped. Leaving a room the connection is not in does nothing.
    pub(super) async fn leave_room(&mut self, room: &RoomName) {
        let Some(joined) = self.rooms.remove(room) else {
            return;
        };
        self.announce(room, joined, PresenceEvent::Leave, None)
            .await;
        self.feed_membership(room, "leave", None).await;
        if joined.presence {
            self.edge.reporter.report(Change::Leave {
                conn: self.conn.clone(),
                room: room.to_string(),
            });
        }
        self.edge.rooms.leave(room, self.outbox.id);
    }

    /// Appends this connection's `join` or `leave` of `room` to the feed,
    /// when its namespace sends presence there.
    async fn feed_membership(&mut self, room: &RoomName, kind: &str, meta: Option<&Value>) {
        if room.is_personal() || !self.edge.feeds(room, FeedKind::Presence) {
            return;
        }
        let seq = self.next_feed_seq();
        let event = crate::feed::membership(room, kind, self.who(), seq, meta, crate::now_ms());
        self.edge.append_logged(event).await;
    }

    /// Reading a room (presence, history, markers) takes the right to join it.
    pub(super) fn may_join(
        &self,
        id: Option<u64>,
        room: &RoomName,
    ) -> Result<&NamespacePolicy, FrameError> {
        self.allowed(
            id,
            self.edge
                .config
                .policy
                .check_join(&self.claims, room.as_str()),
        )
    }

    /// History and read markers belong to durable rooms.
    pub(super) fn durable_only(&self, id: Option<u64>, room: &RoomName) -> Result<(), FrameError> {
        if self.edge.config.policy.is_durable(room.namespace()) {
            Ok(())
        } else {
            Err(FrameError::new(
                id,
                ErrorCode::NotFound,
                format!(
                    "{room} keeps no history: history and read markers belong to durable rooms"
                ),
            ))
        }
    }

    fn allowed<'p>(
        &self,
        id: Option<u64>,
        decision: Result<&'p NamespacePolicy, Denied>,
    ) -> Result<&'p NamespacePolicy, FrameError> {
        decision.map_err(|d| {
            let code = match d {
                Denied::UnknownNamespace(_) => ErrorCode::NotFound,
                Denied::Forbidden(_) => ErrorCode::Forbidden,
            };
            FrameError::new(id, code, d.message())
        })
    }
}
