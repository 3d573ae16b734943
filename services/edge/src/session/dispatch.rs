//! Which code serves which request: one arm per op of protocol v1, each
//! handing the request to the part of the session that owns it (rooms,
//! presence, history), and the server API's control actions.

use herald_auth::NamespacePolicy;
use herald_wire::frames::{ClientFrame, FrameError, Request};
use herald_wire::presence::Control;
use herald_wire::{CloseCode, ErrorCode, Reply, RoomName};

use tracing::Instrument;

use super::Session;
use super::handshake::auth_error;
use crate::delivery::Closing;
use crate::interest;

impl Session {
    /// Serves one request.
    pub(super) async fn handle(&mut self, frame: ClientFrame) -> Result<Reply, FrameError> {
        let id = frame.id;
        match frame.request {
            Request::Connect { .. } => Err(FrameError::new(
                id,
                ErrorCode::BadRequest,
                "already connected; open a new connection to change user",
            )),
            Request::Ping => Ok(Reply::Pong),
            Request::Join { room, since, meta } => {
                let span = self.span("join", &room);
                self.join(id, room, since, meta).instrument(span).await
            }
            Request::Leave { room } => self.leave(id, room).await,
            Request::Publish {
                room,
                data,
                key,
                echo,
            } => {
                let span = self.span("publish", &room);
                self.publish(id, room, data, key, echo)
                    .instrument(span)
                    .await
            }
            Request::Presence { room } => {
                let span = self.span("presence", &room);
                self.presence(id, room).instrument(span).await
            }
            Request::PresenceSet { room, meta } => {
                let span = self.span("presence_set", &room);
                self.presence_set(id, room, meta).instrument(span).await
            }
            Request::History { room, since, limit } => {
                let span = self.span("history", &room);
                self.history(id, room, since, limit).instrument(span).await
            }
            Request::Read { room, offset } => self.read(id, room, offset).await,
            Request::Refresh { token } => self.refresh(id, &token).await,
            Request::Watch { users } => self.watch(id, users).await,
            Request::Unwatch { users } => self.unwatch(users),
        }
    }

    /// The exported span of client command `op` (a disabled span, at the
    /// cost of a branch, when traces are not exported).
    fn span(&self, op: &'static str, room: &RoomName) -> tracing::Span {
        tracing::info_span!(
            target: herald_telemetry::TARGET,
            "client.command",
            otel.name = op,
            otel.kind = "server",
            room = %room,
            conn = %self.conn,
            user = %self.claims.sub,
        )
    }

    /// A new token for the same user pushes the connection's expiry back.
    async fn refresh(&mut self, id: Option<u64>, token: &str) -> Result<Reply, FrameError> {
        match Box::pin(self.edge.config.verifier.verify_fresh(token)).await {
            Ok(claims) if claims.sub == self.claims.sub => {
                self.outbox.set_expiry(claims.exp);
                let expires_at = claims.exp;
                self.claims = claims;
                Ok(Reply::Refreshed(herald_wire::reply::Refreshed {
                    expires_at,
                }))
            }
            Ok(claims) => Err(FrameError::new(
                id,
                ErrorCode::Forbidden,
                format!(
                    "the new token is for user {}, this connection is {}",
                    claims.sub, self.claims.sub
                ),
            )),
            Err(e) => Err(auth_error(id, &e)),
        }
    }

    /// The policy of a join the server decided (`Router.Join`, a room the
    /// connect hook granted): the claims do not apply, the namespace's
    /// presence settings do.
    pub(super) fn server_join_policy(&self, room: &RoomName) -> NamespacePolicy {
        self.edge
            .config
            .policy
            .namespace(room.namespace())
            .cloned()
            .unwrap_or_default()
    }

    /// Acts on a control message from the server API; `true` ends the session.
    pub(super) async fn act(&mut self, control: Control) -> bool {
        match control {
            Control::Join { room, .. } => match RoomName::parse(&room) {
                Ok(room) if !room.is_personal() => {
                    let policy = self.server_join_policy(&room);
                    if let Err(e) = self.join_room(None, &room, &policy, None, None).await {
                        tracing::warn!(conn = %self.conn, %room, error = %e, "server-side join failed");
                    }
                    if let Some(entry) = self.after_reply.take() {
                        interest::release(&entry, self.outbox.id);
                    }
                }
                _ => {
                    tracing::warn!(conn = %self.conn, %room, "server-side join of an invalid room ignored")
                }
            },
            Control::Leave { room, .. } => {
                if let Ok(room) = RoomName::parse(&room) {
                    self.leave_room(&room).await;
                }
            }
            Control::Disconnect {
                code,
                reason,
                reconnect,
                ..
            } => {
                let code = CloseCode::from_code(code)
                    .or_else(|| CloseCode::application(code))
                    .unwrap_or(CloseCode::Normal);
                let mut closing = Closing::new(code, reason);
                if let Some(reconnect) = reconnect {
                    closing.reconnect = reconnect;
                }
                self.outbox.close_as(closing);
                return true;
            }
            // The edge hands these to its SSE relays (`sse`), never to a session.
            Control::Frames { .. } => {}
        }
        false
    }
}
