//! One client connection from upgrade to close: authentication (`connect`
//! within the handshake timeout), then the requests of protocol v1, then the
//! cleanup that takes the connection out of every room and reports it gone.
//! Requests of one connection are served in order; every reply and message
//! goes through the connection's bounded queue (see `delivery`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::upgrade::UpgradeFut;
use herald_auth::{AuthError, Claims, Denied, NamespacePolicy};
use herald_broker::rooms;
use herald_wire::frames::{self, ClientFrame, FrameError, PresenceEvent, Request, Since};
use herald_wire::presence::{Change, Control};
use herald_wire::{CloseCode, ErrorCode, RoomName, subjects};
use serde_json::{Value, json};
use tokio::io::Interest;
use tokio::time::Instant;

use crate::Edge;
use crate::delivery::{self, Out, Outbox};
use crate::framing::{Incoming, Reader};
use crate::interest;
use crate::room::{self, RoomEntry};
use crate::transport;

/// The close reason of every connection when the edge shuts down.
pub(crate) const SHUTTING_DOWN: &str = "server shutting down; reconnect to another edge";

/// How long cleanup waits for the socket to take the last frames.
const WRITER_FLUSH: Duration = Duration::from_secs(5);

/// What a new connection starts from, boxed so that the task of an idle
/// connection does not keep room for it.
pub(crate) struct Start {
    pub edge: Arc<Edge>,
    pub upgrade: UpgradeFut,
    pub url_token: Option<String>,
    pub peer: SocketAddr,
}

/// A connection's task. Connecting (upgrade, authentication, the session's
/// opening) runs in a boxed future freed once done: an idle connection's
/// task holds only the session, its reader and what `run` waits on.
pub(crate) async fn serve(start: Box<Start>) {
    let Some((outbox, mut reader, session)) = Box::pin(connect(*start)).await else {
        return;
    };
    if let Some(mut session) = session {
        session.run(&mut reader).await;
        Box::pin(session.close()).await;
    }
    drop(reader);
    Box::pin(outbox.finish(WRITER_FLUSH)).await;
}

async fn connect(start: Start) -> Option<(Outbox, Reader, Option<Session>)> {
    let Start {
        edge,
        upgrade,
        url_token,
        peer,
    } = start;
    let upgraded = match upgrade.await {
        Ok(ws) => ws.into_inner().into_inner(),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "WebSocket upgrade did not complete");
            return None;
        }
    };
    let Ok((stream, already_read)) = transport::into_tcp(upgraded) else {
        tracing::error!(%peer, "upgraded connection is not a TCP stream; closed");
        return None;
    };
    let id = edge.next_conn.fetch_add(1, Ordering::Relaxed);
    let outbox = Outbox::new(id, stream, edge.config.outbound_queue);
    let mut reader = Reader::new(edge.config.max_message_bytes, &already_read, &outbox);
    drop(already_read);
    let session = match authenticate(&edge, &outbox, &mut reader, url_token).await {
        Some((claims, connect_id)) => {
            let conn = format!("{}-{id}", edge.config.node_id);
            Session::open(edge.clone(), outbox.clone(), conn, claims, connect_id).await
        }
        None => None,
    };
    if let Some(session) = &session {
        tracing::debug!(%peer, conn = %session.conn, user = %session.claims.sub, "connected");
    }
    Some((outbox, reader, session))
}

fn reject(outbox: &Outbox, err: &FrameError) {
    outbox.send(err.to_frame());
}

fn auth_error(id: Option<u64>, e: &AuthError) -> FrameError {
    match e {
        AuthError::Expired => FrameError::new(
            id,
            ErrorCode::TokenExpired,
            "the token has expired; get a new one and connect again",
        ),
        AuthError::Invalid(why) => FrameError::new(
            id,
            ErrorCode::Unauthorized,
            format!("token rejected: {why}"),
        ),
    }
}

/// Waits for a valid `connect` (or checks the `?token=`); answers everything
/// else with `unauthorized`. Returns the claims and the `connect` request id.
async fn authenticate(
    edge: &Edge,
    outbox: &Outbox,
    reader: &mut Reader,
    url_token: Option<String>,
) -> Option<(Claims, Option<u64>)> {
    let refuse = |err: FrameError| {
        reject(outbox, &err);
        outbox.push(Out::Close {
            code: CloseCode::Unauthorized,
            reason: err.message.clone(),
        });
        None
    };
    if let Some(token) = url_token {
        return match edge.config.verifier.verify(&token) {
            Ok(claims) => Some((claims, None)),
            Err(e) => refuse(auth_error(None, &e)),
        };
    }
    let deadline = Instant::now() + edge.config.handshake_timeout;
    loop {
        let incoming = tokio::select! {
            i = reader.next(outbox.stream(), outbox) => i,
            _ = tokio::time::sleep_until(deadline) => {
                outbox.push(Out::Close {
                    code: CloseCode::Unauthorized,
                    reason: format!("no valid connect within {:?}", edge.config.handshake_timeout),
                });
                return None;
            }
            _ = edge.shutdown.cancelled() => {
                outbox.close(CloseCode::ServiceRestart, SHUTTING_DOWN);
                return None;
            }
        };
        match incoming {
            Incoming::Text(text) => match frames::parse(&text) {
                Ok(ClientFrame {
                    id,
                    request: Request::Connect { token, .. },
                }) => {
                    return match edge.config.verifier.verify(&token) {
                        Ok(claims) => Some((claims, id)),
                        Err(e) => refuse(auth_error(id, &e)),
                    };
                }
                Ok(other) => reject(
                    outbox,
                    &FrameError::new(
                        other.id,
                        ErrorCode::Unauthorized,
                        format!(
                            "`{}` before `connect`: send {{\"op\":\"connect\",\"token\":...}} first",
                            other.request.op()
                        ),
                    ),
                ),
                Err(e) => reject(outbox, &e),
            },
            Incoming::Binary => reject(outbox, &binary_refused()),
            Incoming::Closed => return None,
            Incoming::Violation(code, reason) => {
                outbox.push(Out::Close { code, reason });
                return None;
            }
        }
    }
}

fn binary_refused() -> FrameError {
    FrameError::new(
        None,
        ErrorCode::BadRequest,
        "binary frames are not accepted; send JSON in text frames",
    )
}

/// Per-room state of a session.
#[derive(Clone, Copy)]
struct Joined {
    /// The namespace keeps presence: the membership is reported.
    presence: bool,
    /// The namespace sends join/leave/update events to members.
    events: bool,
}

type MetaLimiter = governor::DefaultDirectRateLimiter;

/// An authenticated connection.
struct Session {
    edge: Arc<Edge>,
    outbox: Outbox,
    conn: String,
    claims: Claims,
    user_room: RoomName,
    rooms: HashMap<RoomName, Joined>,
    /// Created on the first presence update, so idle connections carry none.
    meta_limiter: Option<Box<MetaLimiter>>,
    /// A recovering join's live messages, released once its `ok` is queued.
    after_reply: Option<Arc<RoomEntry>>,
}

/// Closes a connection whose token expired: `token_expired`, then 4001.
/// Expiry is checked by the edge's once-a-second sweep (see `run` in
/// lib.rs) rather than a timer in every session's task.
pub(crate) fn expire(outbox: &Outbox) {
    reject(outbox, &auth_error(None, &AuthError::Expired));
    outbox.close(CloseCode::Unauthorized, "token expired");
}

impl Session {
    async fn open(
        edge: Arc<Edge>,
        outbox: Outbox,
        conn: String,
        claims: Claims,
        connect_id: Option<u64>,
    ) -> Option<Session> {
        let refuse = |outbox: &Outbox, code, message: String, close, reason: &str| {
            reject(outbox, &FrameError::new(connect_id, code, message));
            outbox.push(Out::Close {
                code: close,
                reason: reason.into(),
            });
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
        let session = Session {
            edge,
            outbox,
            conn,
            claims,
            user_room,
            rooms: HashMap::new(),
            meta_limiter: None,
            after_reply: None,
        };
        // The inbox is held until `connected` and the unread messages are out.
        let joined = session
            .edge
            .rooms
            .join(&session.user_room, &session.outbox, true);
        let inbox = match joined.await {
            Ok(inbox) => inbox,
            Err(e) => {
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
        let inbox_last = room::last(&inbox).unwrap_or(0);
        let (unread, inbox_marker) = session.unread(inbox_last).await;
        let mut connected = json!({
            "conn": session.conn,
            "user": session.claims.sub,
            "node": session.edge.config.node_id,
            "heartbeat_ms": session.edge.config.heartbeat.as_millis() as u64,
            "unread": unread,
        });
        if let Some(id) = connect_id {
            connected["id"] = id.into();
        }
        session
            .outbox
            .send(frames::event_frame("connected", connected));
        // Right after `connected`: everything in the inbox after the read marker.
        let epoch = room::epoch(&inbox);
        let since = epoch.as_deref().map(|e| (e, inbox_marker));
        if let Err(e) = room::recover(&inbox, &session.edge.history, session.outbox.id, since).await
        {
            session.outbox.send(frames::error_frame(
                None,
                ErrorCode::Unavailable,
                &format!("the inbox could not be read now ({e}); reconnect to get it"),
                None,
            ));
        }
        interest::release(&inbox, session.outbox.id);
        Some(session)
    }

    /// Unread counts for `connected`: per durable room with a read marker,
    /// and always the personal room; also the personal room's marker.
    /// `inbox_last` is the inbox's latest offset, known from joining it: an
    /// inbox read up to there needs no count from the store.
    async fn unread(&self, inbox_last: u64) -> (Value, u64) {
        let history = &self.edge.history;
        let mut unread = serde_json::Map::new();
        let mut inbox_marker = 0;
        let markers = match history.markers(&self.claims.sub).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(user = %self.claims.sub, error = %e, "read markers unavailable");
                return (Value::Object(unread), 0);
            }
        };
        let mut rooms: Vec<(RoomName, u64)> = markers;
        if let Some((_, m)) = rooms.iter().find(|(r, _)| *r == self.user_room) {
            inbox_marker = *m;
        } else {
            rooms.push((self.user_room.clone(), 0));
        }
        for (room, marker) in rooms {
            if room == self.user_room && inbox_last <= marker {
                unread.insert(room.to_string(), 0.into());
                continue;
            }
            if let Ok(n) = history.count_after(&room, marker).await {
                unread.insert(room.to_string(), n.into());
            }
        }
        (Value::Object(unread), inbox_marker)
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
                        let stop = Box::pin(self.act(cmd.control)).await;
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
                    Ok(frame) => Box::pin(self.handle(frame)).await,
                    Err(e) => Err(e),
                },
                Incoming::Binary => Err(binary_refused()),
                Incoming::Closed => return,
                Incoming::Violation(code, reason) => {
                    self.outbox.push(Out::Close { code, reason });
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
        }
    }

    /// Acts on a control message from the server API; `true` ends the session.
    async fn act(&mut self, control: Control) -> bool {
        match control {
            Control::Join { room, .. } => match RoomName::parse(&room) {
                Ok(room) if !room.is_personal() => {
                    // The server decides: claims do not apply, the namespace's presence settings do.
                    let policy = self
                        .edge
                        .config
                        .policy
                        .namespace(room.namespace())
                        .cloned()
                        .unwrap_or_default();
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
            Control::Disconnect { code, reason, .. } => {
                let code = CloseCode::from_code(code).unwrap_or(CloseCode::Normal);
                self.outbox.close(code, reason);
                return true;
            }
        }
        false
    }

    /// Serves one request; the `Ok` value is the reply frame.
    async fn handle(&mut self, frame: ClientFrame) -> Result<Bytes, FrameError> {
        let id = frame.id;
        let err = |code, message: String| FrameError::new(id, code, message);
        match frame.request {
            Request::Connect { .. } => Err(err(
                ErrorCode::BadRequest,
                "already connected; open a new connection to change user".into(),
            )),
            Request::Ping => Ok(frames::pong_frame(id)),
            Request::Join { room, since, meta } => {
                let policy = self.may_join(id, &room)?.clone();
                let meta = self.meta(id, meta.as_deref())?;
                let r = self.join_room(id, &room, &policy, meta, since).await?;
                Ok(frames::ok_frame(
                    id,
                    json!({"epoch": r.epoch, "offset": r.offset, "recovered": r.recovered, "missed": r.missed}),
                ))
            }
            Request::Leave { room } => {
                if room == self.user_room {
                    return Err(err(
                        ErrorCode::Forbidden,
                        "the personal room is kept for the whole connection".into(),
                    ));
                }
                self.leave_room(&room).await;
                Ok(frames::ok_frame(id, json!({})))
            }
            Request::Publish { room, data, key } => {
                self.allowed(
                    id,
                    self.edge
                        .config
                        .policy
                        .check_publish(&self.claims, room.as_str()),
                )?;
                let frame = frames::message_frame(&room, &data, &self.claims.sub, crate::now_ms());
                let durable = self.edge.config.policy.is_durable(room.namespace());
                let published = rooms::publish(
                    &self.edge.broker,
                    &self.edge.history,
                    &room,
                    durable,
                    frame,
                    key.as_deref(),
                )
                .await
                .map_err(|e| err(ErrorCode::Unavailable, e.to_string()))?;
                self.edge.metrics.published.inc();
                if durable {
                    Ok(frames::ok_frame(
                        id,
                        json!({"epoch": published.epoch, "offset": published.offset}),
                    ))
                } else {
                    Ok(frames::ok_frame(id, json!({})))
                }
            }
            Request::Presence { room } => {
                let policy = self.may_join(id, &room)?;
                if !policy.presence || room.is_personal() {
                    return Err(err(
                        ErrorCode::Forbidden,
                        format!("namespace {} keeps no presence", room.namespace()),
                    ));
                }
                let reply = self
                    .edge
                    .reporter
                    .room_members(room.as_str())
                    .await
                    .map_err(|e| err(ErrorCode::Unavailable, e.to_string()))?;
                Ok(frames::ok_frame(
                    id,
                    json!({"room": room.as_str(), "members": members_json(reply)}),
                ))
            }
            Request::PresenceSet { room, meta } => {
                let meta = self.meta(id, Some(&meta))?.unwrap_or(Value::Null);
                match self.rooms.get(&room).copied() {
                    None => Err(err(
                        ErrorCode::BadRequest,
                        format!("join {room} before setting presence in it"),
                    )),
                    Some(Joined {
                        presence: false, ..
                    }) => Err(err(
                        ErrorCode::Forbidden,
                        format!("namespace {} keeps no presence", room.namespace()),
                    )),
                    Some(joined) => {
                        self.update_meta(&room, joined, meta).await;
                        Ok(frames::ok_frame(id, json!({})))
                    }
                }
            }
            Request::History { room, since, limit } => {
                self.may_join(id, &room)?;
                self.durable_only(id, &room)?;
                let since = since.as_ref().map(|s| (s.epoch.as_str(), s.offset));
                let (epoch, stored) = rooms::history_page(&self.edge.history, &room, since, limit)
                    .await
                    .map_err(|e| err(ErrorCode::Unavailable, e.to_string()))?;
                let messages: Vec<Value> = stored
                    .iter()
                    .filter_map(|m| {
                        serde_json::from_slice(&frames::with_position(
                            &m.payload, &epoch, m.offset, m.prev,
                        ))
                        .ok()
                    })
                    .collect();
                Ok(frames::ok_frame(
                    id,
                    json!({"epoch": epoch, "messages": messages}),
                ))
            }
            Request::Read { room, offset } => {
                self.may_join(id, &room)?;
                self.durable_only(id, &room)?;
                let history = &self.edge.history;
                let unavailable = |e: herald_broker::history::HistoryError| {
                    err(ErrorCode::Unavailable, e.to_string())
                };
                let marker = history
                    .set_marker(&self.claims.sub, &room, offset)
                    .await
                    .map_err(unavailable)?;
                let unread = history
                    .count_after(&room, marker)
                    .await
                    .map_err(unavailable)?;
                // Every device of the user learns the new marker through the personal room.
                let event = frames::event_frame(
                    "read",
                    json!({"room": room.as_str(), "offset": marker, "unread": unread}),
                );
                if let Err(e) = self
                    .edge
                    .broker
                    .publish(subjects::room(&self.user_room), event)
                    .await
                {
                    tracing::warn!(user = %self.claims.sub, error = %e, "read marker not shown to other devices");
                }
                Ok(frames::ok_frame(
                    id,
                    json!({"offset": marker, "unread": unread}),
                ))
            }
            Request::Refresh { token } => match self.edge.config.verifier.verify(&token) {
                Ok(claims) if claims.sub == self.claims.sub => {
                    self.outbox.set_expiry(claims.exp);
                    let expires_at = claims.exp;
                    self.claims = claims;
                    Ok(frames::ok_frame(id, json!({"expires_at": expires_at})))
                }
                Ok(claims) => Err(err(
                    ErrorCode::Forbidden,
                    format!(
                        "the new token is for user {}, this connection is {}",
                        claims.sub, self.claims.sub
                    ),
                )),
                Err(e) => Err(auth_error(id, &e)),
            },
        }
    }

    /// Joins `room` (idempotent; a repeat with `meta` updates it). The
    /// subscription is live and the join announced before this returns. In a
    /// durable room, `since` replays the messages after it; what arrives live
    /// meanwhile is held in `after_reply`, released once the reply is queued.
    async fn join_room(
        &mut self,
        id: Option<u64>,
        room: &RoomName,
        policy: &NamespacePolicy,
        meta: Option<Value>,
        since: Option<Since>,
    ) -> Result<room::Recovery, FrameError> {
        let unavailable = |e: String| FrameError::new(id, ErrorCode::Unavailable, e);
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
        let hold = durable && since.is_some();
        // A member already in the room is held again while it catches up.
        let entry = self
            .edge
            .rooms
            .join(room, &self.outbox, hold)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
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
        }
        if !durable {
            // Ephemeral rooms keep no history: nothing to recover from.
            return Ok(room::Recovery {
                epoch: String::new(),
                offset: 0,
                recovered: false,
                missed: 0,
            });
        }
        let since = since.as_ref().map(|s| (s.epoch.as_str(), s.offset));
        let recovery = room::recover(&entry, &self.edge.history, self.outbox.id, since).await;
        if hold {
            self.after_reply = Some(entry);
        }
        recovery.map_err(|e| unavailable(e.to_string()))
    }

    /// Reading a room (presence, history, markers) takes the right to join it.
    fn may_join(&self, id: Option<u64>, room: &RoomName) -> Result<&NamespacePolicy, FrameError> {
        self.allowed(
            id,
            self.edge
                .config
                .policy
                .check_join(&self.claims, room.as_str()),
        )
    }

    fn durable_only(&self, id: Option<u64>, room: &RoomName) -> Result<(), FrameError> {
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

    async fn update_meta(&mut self, room: &RoomName, joined: Joined, meta: Value) {
        self.edge.reporter.report(Change::Meta {
            conn: self.conn.clone(),
            room: room.to_string(),
            meta: meta.clone(),
        });
        self.announce(room, joined, PresenceEvent::Update, Some(&meta))
            .await;
    }

    /// Tells every member of the room, on every edge, about this connection.
    async fn announce(
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
        if let Err(e) = self.edge.broker.publish(subjects::room(room), frame).await {
            tracing::warn!(conn = %self.conn, %room, error = %e, "presence event not sent");
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

    /// Checks a presence `meta`: size, shape, and the connection's update rate.
    fn meta(
        &mut self,
        id: Option<u64>,
        meta: Option<&serde_json::value::RawValue>,
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
        let (per_second, burst) = self.edge.config.meta_rate;
        let limiter = self.meta_limiter.get_or_insert_with(|| {
            let quota =
                governor::Quota::per_second(NonZeroU32::new(per_second.max(1)).expect("nonzero"))
                    .allow_burst(NonZeroU32::new(burst.max(1)).expect("nonzero"));
            Box::new(governor::RateLimiter::direct(quota))
        });
        if let Err(not_until) = limiter.check() {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            let mut e = FrameError::new(
                id,
                ErrorCode::RateLimited,
                format!("more than {per_second} presence updates a second"),
            );
            e.retry_after_ms = Some(wait.as_millis() as u64 + 1);
            return Err(e);
        }
        match serde_json::from_str::<Value>(meta.get()) {
            Ok(v @ Value::Object(_)) => Ok(Some(v)),
            _ => Err(FrameError::new(
                id,
                ErrorCode::BadRequest,
                "meta must be a JSON object",
            )),
        }
    }

    /// Leaves a room: the leave is announced to its members, then the
    /// membership dropped. Leaving a room the connection is not in does nothing.
    async fn leave_room(&mut self, room: &RoomName) {
        let Some(joined) = self.rooms.remove(room) else {
            return;
        };
        self.announce(room, joined, PresenceEvent::Leave, None)
            .await;
        if joined.presence {
            self.edge.reporter.report(Change::Leave {
                conn: self.conn.clone(),
                room: room.to_string(),
            });
        }
        self.edge.rooms.leave(room, self.outbox.id);
    }

    /// Leaves every room (announcing each leave) before the connection's state
    /// is dropped.
    async fn close(mut self) {
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
        self.edge.reporter.report(Change::Disconnect {
            conn: self.conn.clone(),
        });
        self.edge.metrics.connections.dec();
        tracing::debug!(conn = %self.conn, "disconnected");
    }
}

/// The `members` of a `presence` reply: one entry per user, with the number of
/// connections, the first connection's meta, and each connection.
fn members_json(reply: herald_proto::v1::RoomMembersReply) -> Value {
    let parse = |m: &str| -> Value {
        if m.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(m).unwrap_or(Value::Null)
        }
    };
    Value::Array(
        reply
            .members
            .into_iter()
            .map(|m| {
                let meta = m
                    .conns
                    .iter()
                    .map(|c| parse(&c.meta))
                    .find(|v| !v.is_null())
                    .unwrap_or(Value::Null);
                let connections: Vec<Value> = m
                    .conns
                    .iter()
                    .map(|c| json!({"conn": c.conn, "node": c.node, "meta": parse(&c.meta)}))
                    .collect();
                json!({"user": m.user, "conns": m.conns.len(), "meta": meta, "connections": connections})
            })
            .collect(),
    )
}
