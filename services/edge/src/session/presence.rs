//! A session's presence: the member list a client asks for, the meta it
//! sets (checked for size and shape, and rate-limited per connection), and
//! the join/leave/update events sent to the other members of its rooms.

use herald_wire::frames::{self, FrameError, PresenceEvent};
use herald_wire::presence::Change;
use herald_wire::reply::{Member, MemberConn, Members};
use herald_wire::{ErrorCode, Reply, RoomName, subjects};
use serde_json::Value;
use serde_json::value::RawValue;

use super::limits::Kind;
use super::{Joined, Session, unavailable};

impl Session {
    /// `presence`: the room's members across the cluster.
    pub(super) async fn presence(
        &mut self,
        id: Option<u64>,
        room: RoomName,
    ) -> Result<Reply, FrameError> {
        let policy = self.may_join(id, &room)?;
        if !policy.presence || room.is_personal() {
            return Err(no_presence(id, &room));
        }
        let reply = self
            .edge
            .reporter
            .room_members(room.as_str())
            .await
            .map_err(|e| unavailable(&self.conn, id, &e))?;
        Ok(Reply::Members(Members {
            room: room.to_string(),
            members: reply.members.into_iter().map(member).collect(),
        }))
    }

    /// `presence_set`: a new meta for this connection in a room it is in.
    pub(super) async fn presence_set(
        &mut self,
        id: Option<u64>,
        room: RoomName,
        meta: Box<RawValue>,
    ) -> Result<Reply, FrameError> {
        let meta = self.meta(id, &room, Some(&meta))?.unwrap_or(Value::Null);
        match self.rooms.get(&room).copied() {
            None => Err(FrameError::new(
                id,
                ErrorCode::BadRequest,
                format!("join {room} before setting presence in it"),
            )),
            Some(Joined {
                presence: false, ..
            }) => Err(no_presence(id, &room)),
            Some(joined) => {
                self.update_meta(&room, joined, meta).await;
                Ok(Reply::Done)
            }
        }
    }

    pub(super) async fn update_meta(&mut self, room: &RoomName, joined: Joined, meta: Value) {
        self.edge.reporter.report(Change::Meta {
            conn: self.conn.clone(),
            room: room.to_string(),
            meta: meta.clone(),
        });
        self.announce(room, joined, PresenceEvent::Update, Some(&meta))
            .await;
    }

    /// Tells every member of the room, on every edge, about this connection.
    pub(super) async fn announce(
        &self,
        room: &RoomName,
        joined: Joined,
        event: PresenceEvent,
        meta: Option<&Value>,
    ) {
        if !joined.events {
            return;
        }
        let frame =
            frames::presence_frame(room.as_str(), event, &self.claims.sub, &self.conn, meta);
        if let Err(e) = self
            .edge
            .events
            .publish(subjects::room(room), None, frame)
            .await
        {
            tracing::warn!(conn = %self.conn, %room, error = %herald_broker::chain(&e), "presence event not sent");
        }
    }

    /// Checks a presence `meta`: size, shape, and the connection's update rate.
    pub(super) fn meta(
        &mut self,
        id: Option<u64>,
        room: &RoomName,
        meta: Option<&RawValue>,
    ) -> Result<Option<Value>, FrameError> {
        let Some(meta) = meta else { return Ok(None) };
        if meta.get().len() > self.edge.config.max_meta_bytes {
            return Err(FrameError::new(
                id,
                ErrorCode::TooLarge,
                format!(
                    "meta is {} bytes; the limit is {}",
                    meta.get().len(),
                    self.edge.config.max_meta_bytes
                ),
            ));
        }
        self.check_rate(id, Kind::Presence, room)?;
        match serde_json::from_str::<Value>(meta.get()) {
            Ok(v @ Value::Object(_)) => Ok(Some(v)),
            _ => Err(FrameError::new(
                id,
                ErrorCode::BadRequest,
                "meta must be a JSON object",
            )),
        }
    }
}

fn no_presence(id: Option<u64>, room: &RoomName) -> FrameError {
    FrameError::new(
        id,
        ErrorCode::Forbidden,
        format!("namespace {} keeps no presence", room.namespace()),
    )
}

/// A member as the presence service lists it, as the client is told.
fn member(m: herald_proto::v1::Member) -> Member {
    let connections = m
        .conns
        .into_iter()
        .map(|c| MemberConn {
            meta: parse_meta(&c.meta),
            conn: c.conn,
            node: c.node,
        })
        .collect();
    Member::new(m.user, connections)
}

/// A meta as the presence service keeps it (JSON text, empty for none).
fn parse_meta(meta: &str) -> Value {
    if meta.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(meta).unwrap_or(Value::Null)
    }
}
