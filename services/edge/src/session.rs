//! One client connection from upgrade to close: authentication (`connect`
//! within the handshake timeout), then the requests of protocol v1, then the
//! cleanup that takes the connection out of every room and reports it gone.
//! Requests of one connection are served in order; every reply and message
//! goes through the connection's bounded queue (see `delivery`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{FragmentCollectorRead, Frame, OpCode, Role, WebSocket, WebSocketError};
use herald_auth::{AuthError, Claims, Denied, NamespacePolicy};
use herald_wire::frames::{self, ClientFrame, FrameError, Request};
use herald_wire::presence::Change;
use herald_wire::{CloseCode, ErrorCode, RoomName, subjects};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::Edge;
use crate::delivery::{self, Out, Outbox};

/// How long cleanup waits for the writer to flush the last frames.
const WRITER_FLUSH: Duration = Duration::from_secs(5);

type Reader = FragmentCollectorRead<tokio::io::ReadHalf<TokioIo<Upgraded>>>;

#[derive(Debug)]
struct Gone;

impl std::fmt::Display for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection queue closed")
    }
}

impl std::error::Error for Gone {}

/// What the reader produced.
enum Incoming {
    Text(Vec<u8>),
    Binary,
    /// The client closed, or the socket is gone.
    Closed,
    /// The client broke the WebSocket protocol or a size limit.
    Violation(CloseCode, String),
}

async fn read_next(
    reader: &mut Reader,
    send: &mut impl FnMut(Frame<'static>) -> std::future::Ready<Result<(), Gone>>,
) -> Incoming {
    match reader.read_frame(send).await {
        Ok(frame) => match frame.opcode {
            OpCode::Text => Incoming::Text(frame.payload.to_vec()),
            OpCode::Binary => Incoming::Binary,
            OpCode::Close => Incoming::Closed,
            _ => Incoming::Binary,
        },
        Err(WebSocketError::FrameTooLarge) => Incoming::Violation(
            CloseCode::TooBig,
            "message larger than this server accepts".into(),
        ),
        Err(WebSocketError::InvalidUTF8) => {
            Incoming::Violation(CloseCode::Policy, "text frame is not valid UTF-8".into())
        }
        Err(
            WebSocketError::ConnectionClosed
            | WebSocketError::UnexpectedEOF
            | WebSocketError::IoError(_)
            | WebSocketError::SendError(_),
        ) => Incoming::Closed,
        Err(e) => Incoming::Violation(CloseCode::Policy, format!("WebSocket protocol error: {e}")),
    }
}

pub(crate) async fn serve(
    edge: Arc<Edge>,
    ws: WebSocket<TokioIo<Upgraded>>,
    url_token: Option<String>,
    peer: SocketAddr,
) {
    let (r, w) = tokio::io::split(ws.into_inner());
    // The write half is ours (see `delivery`): fastwebsockets only reads.
    let (mut read, _) = fastwebsockets::after_handshake_split(r, tokio::io::sink(), Role::Server);
    read.set_max_message_size(edge.config.max_message_bytes);
    let mut reader = FragmentCollectorRead::new(read);
    let id = edge.next_conn.fetch_add(1, Ordering::Relaxed);
    let (outbox, rx) = delivery::outbox(id, edge.config.outbound_queue);
    let mut writer = tokio::spawn(delivery::run_writer(w, rx, outbox.closer.clone()));
    let control = outbox.clone();
    let mut send = move |f: Frame<'static>| {
        let queued = control.push(Out::Control {
            opcode: f.opcode as u8,
            payload: f.payload.to_vec(),
        });
        std::future::ready(if queued { Ok(()) } else { Err(Gone) })
    };

    if let Some((claims, connect_id)) =
        authenticate(&edge, &outbox, &mut reader, &mut send, url_token).await
    {
        let conn = format!("{}-{id}", edge.config.node_id);
        if let Some(mut session) =
            Session::open(edge.clone(), outbox.clone(), conn, claims, connect_id).await
        {
            tracing::debug!(%peer, conn = %session.conn, user = %session.claims.sub, "connected");
            session.run(&mut reader, &mut send).await;
            session.close().await;
        }
    }
    drop(send);
    drop(outbox);
    if tokio::time::timeout(WRITER_FLUSH, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
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
    send: &mut impl FnMut(Frame<'static>) -> std::future::Ready<Result<(), Gone>>,
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
            i = read_next(reader, send) => i,
            _ = tokio::time::sleep_until(deadline) => {
                outbox.push(Out::Close {
                    code: CloseCode::Unauthorized,
                    reason: format!("no valid connect within {:?}", edge.config.handshake_timeout),
                });
                return None;
            }
            _ = edge.shutdown.cancelled() => {
                outbox.closer.close(CloseCode::ServiceRestart, "server shutting down; reconnect to another edge");
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

/// An authenticated connection.
struct Session {
    edge: Arc<Edge>,
    outbox: Outbox,
    conn: String,
    claims: Claims,
    user_room: RoomName,
    /// Rooms joined, and whether each keeps presence.
    rooms: HashMap<RoomName, bool>,
    expires_at: Instant,
}

fn expiry_instant(exp: u64) -> Instant {
    let now = herald_auth::now_secs();
    Instant::now() + Duration::from_secs(exp.saturating_sub(now))
}

impl Session {
    async fn open(
        edge: Arc<Edge>,
        outbox: Outbox,
        conn: String,
        claims: Claims,
        connect_id: Option<u64>,
    ) -> Option<Session> {
        let user_room = match RoomName::user(&claims.sub) {
            Ok(r) => r,
            Err(e) => {
                reject(
                    &outbox,
                    &FrameError::new(
                        connect_id,
                        ErrorCode::Unauthorized,
                        format!("the token's sub cannot name a user: {e}"),
                    ),
                );
                outbox.push(Out::Close {
                    code: CloseCode::Unauthorized,
                    reason: "bad sub claim".into(),
                });
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
        let session = Session {
            expires_at: expiry_instant(claims.exp),
            edge,
            outbox,
            conn,
            claims,
            user_room,
            rooms: HashMap::new(),
        };
        if let Err(e) = session
            .edge
            .rooms
            .join(&session.user_room, &session.outbox)
            .await
        {
            reject(
                &session.outbox,
                &FrameError::new(connect_id, ErrorCode::Unavailable, e.to_string()),
            );
            session.outbox.push(Out::Close {
                code: CloseCode::TryAgainLater,
                reason: "the message broker is unreachable".into(),
            });
            session.close().await;
            return None;
        }
        let mut connected = json!({
            "conn": session.conn,
            "user": session.claims.sub,
            "node": session.edge.config.node_id,
            "heartbeat_ms": session.edge.config.heartbeat.as_millis() as u64,
            "unread": {},
        });
        if let Some(id) = connect_id {
            connected["id"] = id.into();
        }
        session
            .outbox
            .send(frames::event_frame("connected", connected));
        Some(session)
    }

    async fn run(
        &mut self,
        reader: &mut Reader,
        send: &mut impl FnMut(Frame<'static>) -> std::future::Ready<Result<(), Gone>>,
    ) {
        loop {
            let incoming = tokio::select! {
                i = read_next(reader, send) => i,
                _ = self.outbox.closer.closed() => return,
                _ = self.edge.shutdown.cancelled() => {
                    self.outbox.closer.close(
                        CloseCode::ServiceRestart,
                        "server shutting down; reconnect to another edge",
                    );
                    return;
                }
                _ = tokio::time::sleep_until(self.expires_at) => {
                    reject(&self.outbox, &auth_error(None, &AuthError::Expired));
                    self.outbox.push(Out::Close {
                        code: CloseCode::Unauthorized,
                        reason: "token expired".into(),
                    });
                    return;
                }
            };
            self.edge.metrics.frames_in.inc();
            let result = match incoming {
                Incoming::Text(text) => match frames::parse(&text) {
                    Ok(frame) => self.handle(frame).await,
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
        }
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
            Request::Join {
                room,
                since: _,
                meta,
            } => {
                let policy = self.allowed(
                    id,
                    self.edge
                        .config
                        .policy
                        .check_join(&self.claims, room.as_str()),
                )?;
                let presence = policy.presence && !room.is_personal();
                let meta = self.meta(id, meta.as_deref())?;
                if !self.rooms.contains_key(&room) && room != self.user_room {
                    if self.rooms.len() >= self.edge.config.max_rooms_per_conn {
                        return Err(err(
                            ErrorCode::TooLarge,
                            format!(
                                "this connection is already in {} rooms, the most allowed",
                                self.rooms.len()
                            ),
                        ));
                    }
                    self.edge
                        .rooms
                        .join(&room, &self.outbox)
                        .await
                        .map_err(|e| err(ErrorCode::Unavailable, e.to_string()))?;
                    self.rooms.insert(room.clone(), presence);
                    if presence {
                        self.edge.reporter.report(Change::Join {
                            conn: self.conn.clone(),
                            room: room.to_string(),
                            meta,
                        });
                    }
                } else if let (true, Some(meta)) = (presence, meta) {
                    self.edge.reporter.report(Change::Meta {
                        conn: self.conn.clone(),
                        room: room.to_string(),
                        meta,
                    });
                }
                // Ephemeral rooms keep no history: nothing to recover from.
                Ok(frames::ok_frame(
                    id,
                    json!({"epoch": "", "offset": 0, "recovered": false, "missed": 0}),
                ))
            }
            Request::Leave { room } => {
                if room == self.user_room {
                    return Err(err(
                        ErrorCode::Forbidden,
                        "the personal room is kept for the whole connection".into(),
                    ));
                }
                if let Some(presence) = self.rooms.remove(&room) {
                    self.leave_room(&room, presence);
                }
                Ok(frames::ok_frame(id, json!({})))
            }
            Request::Publish { room, data, key: _ } => {
                self.allowed(
                    id,
                    self.edge
                        .config
                        .policy
                        .check_publish(&self.claims, room.as_str()),
                )?;
                let frame = frames::message_frame(&room, &data, &self.claims.sub, crate::now_ms());
                self.edge
                    .broker
                    .publish(subjects::room(&room), frame)
                    .await
                    .map_err(|e| err(ErrorCode::Unavailable, format!("message not sent: {e}")))?;
                self.edge.metrics.published.inc();
                Ok(frames::ok_frame(id, json!({})))
            }
            Request::Presence { room } => {
                let policy = self.allowed(
                    id,
                    self.edge
                        .config
                        .policy
                        .check_join(&self.claims, room.as_str()),
                )?;
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
                match self.rooms.get(&room) {
                    None => Err(err(
                        ErrorCode::BadRequest,
                        format!("join {room} before setting presence in it"),
                    )),
                    Some(false) => Err(err(
                        ErrorCode::Forbidden,
                        format!("namespace {} keeps no presence", room.namespace()),
                    )),
                    Some(true) => {
                        self.edge.reporter.report(Change::Meta {
                            conn: self.conn.clone(),
                            room: room.to_string(),
                            meta,
                        });
                        Ok(frames::ok_frame(id, json!({})))
                    }
                }
            }
            Request::History { room, .. } | Request::Read { room, .. } => Err(err(
                ErrorCode::NotFound,
                format!(
                    "{room} keeps no history: history and read markers belong to durable rooms"
                ),
            )),
            Request::Refresh { token } => match self.edge.config.verifier.verify(&token) {
                Ok(claims) if claims.sub == self.claims.sub => {
                    self.expires_at = expiry_instant(claims.exp);
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

    fn meta(
        &self,
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
        match serde_json::from_str::<Value>(meta.get()) {
            Ok(v @ Value::Object(_)) => Ok(Some(v)),
            _ => Err(FrameError::new(
                id,
                ErrorCode::BadRequest,
                "meta must be a JSON object",
            )),
        }
    }

    fn leave_room(&self, room: &RoomName, presence: bool) {
        if presence {
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
        for (room, presence) in std::mem::take(&mut self.rooms) {
            self.leave_room(&room, presence);
        }
        self.edge.rooms.leave(&self.user_room, self.outbox.id);
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
