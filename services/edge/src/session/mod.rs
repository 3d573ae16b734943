//! One client connection from upgrade to close. The session is cut by
//! concern: `handshake` (upgrade and authentication), `dispatch` (which code
//! serves which op), `rooms` (join, leave, publish, policy), `presence`
//! (member lists, meta and its rate limit, presence events), `history`
//! (pages, read markers, unread counts) and `watch` (contacts' status). This
//! module holds the session's state, its opening, the loop that serves
//! requests in order, and the cleanup that takes the connection out of every
//! room and reports it gone. Every reply and message goes through the
//! connection's bounded queue (see `delivery`).

mod dispatch;
mod handshake;
mod history;
mod hooks;
mod limits;
mod presence;
mod rooms;
mod watch;

use std::collections::HashMap;
use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use herald_auth::{AuthError, Claims};
use herald_broker::chain;
use herald_wire::frames::{self, FrameError};
use herald_wire::presence::Change;
use herald_wire::reply::Connected;
use herald_wire::{CloseCode, ErrorCode, RoomName};
use tokio::io::Interest;
use tracing::Instrument;

pub(crate) use handshake::{Relayed, Start};
pub(crate) use hooks::Hello;

use crate::Edge;
use crate::delivery::{self, Out, Outbox};
use crate::framing::{Incoming, Reader};
use crate::interest;
use crate::room::{self, RoomEntry};

/// The close reason of every connection when the edge shuts down.
pub(crate) const SHUTTING_DOWN: &str = "server shutting down; reconnect to another edge";

/// How long cleanup waits for the socket to take the last frames.
const WRITER_FLUSH: Duration = Duration::from_secs(5);

/// The life of a connection once opened: the session runs, closes, and
/// the last frames go out. A macro, not an async fn taking the opened
/// parts: an async fn's arguments are kept beside the locals they move
/// into, and every idle connection's task would pay for the copy.
///
/// Each boxed future is made in a statement of its own, before the one
/// that awaits it: a temporary of an awaiting statement counts as alive
/// across the await, so the unboxed future it was made from would be kept
/// in every connection's task too.
macro_rules! serve_opened {
    ($outbox:ident, $reader:ident, $session:ident) => {{
        if let Some(session) = $session.as_mut() {
            session.run(&mut $reader).await;
        }
        if let Some(session) = $session.take() {
            let closing = Box::pin(session.close());
            closing.await;
        }
        drop($reader);
        let finishing = Box::pin($outbox.finish(WRITER_FLUSH));
        finishing.await;
    }};
}

/// A connection's task. Connecting (upgrade, authentication, the session's
/// opening) runs in a boxed future freed once done: an idle connection's
/// task holds only the session, its reader and what `run` waits on.
pub(crate) async fn serve(start: Box<Start>) {
    let connecting = Box::pin(handshake::connect(*start));
    let Some((outbox, mut reader, mut session)) = connecting.await else {
        return;
    };
    serve_opened!(outbox, reader, session)
}

/// [`serve`] for a relayed connection, authenticated already.
pub(crate) async fn serve_relayed(start: Box<Relayed>) {
    let opening = Box::pin(handshake::open_relayed(*start));
    let (outbox, mut reader, mut session) = opening.await;
    serve_opened!(outbox, reader, session)
}

fn reject(outbox: &Outbox, err: &FrameError) {
    outbox.send(err.to_frame());
}

/// `unavailable` for request `id` of connection `conn`: the client is told
/// the plain message, the log gets every cause under it.
fn unavailable(conn: &str, id: Option<u64>, e: &(dyn Error + 'static)) -> FrameError {
    tracing::warn!(conn, error = %chain(e), "a request could not be served now");
    FrameError::new(id, ErrorCode::Unavailable, e.to_string())
}

/// Closes a connection whose token expired: `token_expired`, then 4001.
/// Expiry is checked by the edge's once-a-second sweep (see `run` in
/// lib.rs) rather than a timer in every session's task.
pub(crate) fn expire(outbox: &Outbox) {
    reject(outbox, &handshake::auth_error(None, &AuthError::Expired));
    outbox.close(CloseCode::Unauthorized, "token expired");
}

/// Per-room state of a session.
#[derive(Clone, Copy)]
struct Joined {
    /// The namespace keeps presence: the membership is reported.
    presence: bool,
    /// The namespace sends join/leave/update events to members.
    events: bool,
}

/// An authenticated connection.
struct Session {
    edge: Arc<Edge>,
    outbox: Outbox,
    conn: String,
    claims: Claims,
    user_room: RoomName,
    rooms: HashMap<RoomName, Joined>,
    /// Request allowances, created on the first limited request, so idle
    /// connections carry none.
    limits: Option<Box<limits::Limiters>>,
    /// A recovering join's live messages, released once its `ok` is queued.
    after_reply: Option<Arc<RoomEntry>>,
    /// What few connections use, created on first use: every idle
    /// connection's task holds the session, and its size in 128-byte steps
    /// (tokio's task cell) is most of an idle connection's memory.
    rare: Option<Box<Rare>>,
}

/// The parts of a session that only some connections use.
#[derive(Default)]
struct Rare {
    /// While the rooms granted by the connect hook are joined: their
    /// entries, whose live messages are held until `connected` is out.
    granting: Option<Vec<Arc<RoomEntry>>>,
    /// The users this connection watches, from its first `watch` on.
    watching: Option<Box<watch::Watching>>,
    /// Numbers this connection's feed events, for their ids.
    feed_seq: u64,
}

impl Session {
    /// Registers an authenticated connection (presence, the user's other
    /// connections, the session table), joins its personal room and answers
    /// `connected`, then sends what the inbox holds after the read marker.
    /// `None` when the connection was refused instead.
    async fn open(
        edge: Arc<Edge>,
        outbox: Outbox,
        conn: String,
        claims: Claims,
        connect_id: Option<u64>,
        hello: Hello,
    ) -> Option<Session> {
        let refuse = |outbox: &Outbox, code, message: String, close, reason: &str| {
            reject(outbox, &FrameError::new(connect_id, code, message));
            outbox.push(Out::close(close, reason));
        };
        let user_room = match RoomName::user(&claims.sub) {
            Ok(r) => r,
            Err(e) => {
                refuse(
                    &outbox,
                    ErrorCode::Unauthorized,
                    format!("the token's sub cannot name a user: {e}"),
                    CloseCode::Unauthorized,
                    "bad sub claim",
                );
                return None;
            }
        };
        // Before the connection is registered: one the application refuses
        // is never seen online.
        let granted = hooks::on_connect(&edge, &outbox, &claims, &hello, &conn).await?;
        drop(hello);
        edge.reporter.report(Change::Connect {
            conn: conn.clone(),
            user: claims.sub.clone(),
            since_ms: crate::now_ms(),
        });
        edge.metrics.connections.inc();
        edge.metrics.connects.inc();
        {
            let mut users = edge.users.lock().expect("users");
            let ids = users.entry(claims.sub.clone()).or_insert_with(|| {
                edge.metrics.users.inc();
                Vec::new()
            });
            ids.push(outbox.id);
        }
        edge.sessions_by_id
            .write()
            .expect("sessions")
            .insert(outbox.id, outbox.clone());
        // Shutdown closes the sessions it finds registered; one registered
        // just after that sweep sees the shutdown here.
        if edge.shutdown.is_cancelled() {
            outbox.close(CloseCode::ServiceRestart, SHUTTING_DOWN);
        }
        outbox.set_expiry(claims.exp);
        let mut session = Session {
            edge,
            outbox,
            conn,
            claims,
            user_room,
            rooms: HashMap::new(),
            limits: None,
            after_reply: None,
            rare: None,
        };
        if session.edge.config.feed_connections {
            let event = crate::feed::connection("connect", session.who(), None, crate::now_ms());
            session.edge.append_logged(event).await;
        }
        // The inbox is held until `connected` and the unread messages are out.
        let joined = session
            .edge
            .rooms
            .join(&session.user_room, &session.outbox, true);
        let inbox = match joined.await {
            Ok(inbox) => inbox,
            Err(e) => {
                tracing::warn!(conn = %session.conn, error = %chain(&e), "the inbox could not be joined");
                refuse(
                    &session.outbox,
                    ErrorCode::Unavailable,
                    e.to_string(),
                    CloseCode::TryAgainLater,
                    "the message broker is unreachable",
                );
                session.close().await;
                return None;
            }
        };
        let (unread, inbox_marker) = session.unread(&inbox).await;
        // Last before `connected`, so that their messages follow it.
        session.join_granted(granted).await;
        let connected = Connected {
            conn: session.conn.clone(),
            user: session.claims.sub.clone(),
            node: session.edge.config.node_id.clone(),
            heartbeat_ms: session.edge.config.heartbeat.as_millis() as u64,
            expires_at: session.claims.exp,
            unread,
        };
        session.outbox.send(connected.to_frame(connect_id));
        // Right after `connected`: everything in the inbox after the read marker.
        let epoch = room::epoch(&inbox);
        let since = epoch.as_deref().map(|e| (e, inbox_marker));
        if let Err(e) = room::recover(&inbox, &session.edge.history, session.outbox.id, since).await
        {
            tracing::warn!(conn = %session.conn, error = %chain(&e), "the inbox could not be read");
            let message = format!("the inbox could not be read now ({e}); reconnect to get it");
            reject(
                &session.outbox,
                &FrameError::new(None, ErrorCode::Unavailable, message),
            );
        }
        interest::release(&inbox, session.outbox.id);
        let granted = session.rare.as_mut().and_then(|r| r.granting.take());
        for entry in granted.unwrap_or_default() {
            interest::release(&entry, session.outbox.id);
        }
        Some(session)
    }

    /// Serves requests until the connection ends. While idle it waits on its
    /// socket and its attention signal, nothing else: whatever it waits on is
    /// memory held by every idle connection's task. Token expiry and server
    /// shutdown close sessions from outside (see `run` in lib.rs).
    async fn run(&mut self, reader: &mut Reader) {
        let outbox = self.outbox.clone();
        loop {
            let incoming = match reader.take_ready() {
                Some(incoming) => incoming,
                None => {
                    let attention = outbox.attention();
                    tokio::pin!(attention);
                    attention.as_mut().enable();
                    if self.outbox.close_reason().is_some() {
                        return;
                    }
                    if let Some(cmd) = self.outbox.pop_control() {
                        let stop = Box::pin(self.act(cmd.control).instrument(cmd.span)).await;
                        let _ = cmd.done.send(());
                        if stop {
                            return;
                        }
                        continue;
                    }
                    let interest = if self.outbox.is_stalled() {
                        Interest::READABLE | Interest::WRITABLE
                    } else {
                        Interest::READABLE
                    };
                    tokio::select! {
                        ready = self.outbox.stream().ready(interest) => {
                            let Ok(ready) = ready else { return };
                            if ready.is_writable() {
                                self.outbox.resume();
                            }
                            if ready.is_readable() || ready.is_read_closed() || ready.is_error() {
                                // One write for all the pongs a read may owe.
                                delivery::batch(|| {
                                    reader.read_once(self.outbox.stream(), &self.outbox)
                                });
                            }
                            continue;
                        }
                        _ = attention => continue,
                    }
                }
            };
            self.edge.metrics.frames_in.inc();
            let result = match incoming {
                Incoming::Text(text) => match frames::parse(&text) {
                    Ok(frame) => {
                        let id = frame.id;
                        Box::pin(self.handle(frame))
                            .await
                            .map(|reply| reply.to_frame(id))
                    }
                    Err(e) => Err(e),
                },
                Incoming::Binary(_) => Err(handshake::binary_refused()),
                Incoming::Closed => return,
                Incoming::Violation(code, reason) => {
                    self.outbox.push(Out::close(code, reason));
                    return;
                }
            };
            match result {
                Ok(reply) => {
                    self.outbox.send(reply);
                }
                Err(e) => {
                    self.edge.metrics.rejected.inc();
                    reject(&self.outbox, &e);
                }
            }
            // After the reply, whatever it was: a failed recovery must not
            // leave the room's live messages held for good.
            if let Some(entry) = self.after_reply.take() {
                interest::release(&entry, self.outbox.id);
            }
            self.release_watched();
        }
    }

    /// User, connection and node, as feed events name them.
    fn who(&self) -> (&str, &str, &str) {
        (&self.claims.sub, &self.conn, &self.edge.config.node_id)
    }

    /// The number of this connection's next feed event.
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Default::default)
    }

    fn next_feed_seq(&mut self) -> u64 {
        let rare = self.rare();
        rare.feed_seq += 1;
        rare.feed_seq
    }

    /// Leaves every room (announcing each leave) before the connection's state
    /// is dropped.
    async fn close(mut self) {
        self.unwatch_all();
        let rooms: Vec<RoomName> = self.rooms.keys().cloned().collect();
        for room in rooms {
            self.leave_room(&room).await;
        }
        self.edge.rooms.leave(&self.user_room, self.outbox.id);
        {
            let mut users = self.edge.users.lock().expect("users");
            if let Some(ids) = users.get_mut(&self.claims.sub) {
                ids.retain(|id| *id != self.outbox.id);
                if ids.is_empty() {
                    users.remove(&self.claims.sub);
                    self.edge.metrics.users.dec();
                }
            }
        }
        self.edge
            .sessions_by_id
            .write()
            .expect("sessions")
            .remove(&self.outbox.id);
        if self.edge.config.feed_connections {
            let code = self.outbox.close_reason().map(|c| c.code.code());
            let event = crate::feed::connection("disconnect", self.who(), code, crate::now_ms());
            self.edge.append_logged(event).await;
        }
        self.edge.reporter.report(Change::Disconnect {
            conn: self.conn.clone(),
        });
        self.edge.metrics.connections.dec();
        tracing::debug!(conn = %self.conn, "disconnected");
    }
}

#[cfg(test)]
mod tests {
    fn future_size<A, F: std::future::Future>(_: fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    fn future_size2<A, B, F: std::future::Future>(_: fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every idle connection's task is `serve`'s future: it must hold the
    /// session, its reader and outbox, and what `run` waits on, and nothing
    /// more (a connecting future kept by mistake cost 560 bytes each).
    #[test]
    fn a_connection_task_holds_only_the_running_session() {
        let serve = future_size(super::serve);
        let parts = future_size2(super::Session::run)
            + std::mem::size_of::<Option<super::Session>>()
            + std::mem::size_of::<crate::framing::Reader>()
            + std::mem::size_of::<crate::delivery::Outbox>();
        assert!(
            serve <= parts + 64,
            "serve's future is {serve} bytes; its parts {parts}"
        );
    }
}
