//! The task that owns the connection: it connects (URL after URL, with
//! backoff), authenticates, rejoins, sends the requests the handles queue,
//! matches answers to them, hands events to the rooms, watches the
//! connection for silence and the token for expiry, and starts over when
//! the connection is lost, until the application or the server ends it.

use std::collections::{BTreeMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use fastwebsockets::{Frame as WsFrame, Payload};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::backoff::{Backoff, Rng};
use super::types::{
    Code, Connected, ConnectionEvent, Disconnected, Error, JoinOk, Message, Position,
    PresenceEvent, ReadMarker, RoomEvent, State,
};
use super::{Core, Options, TokenSource};
use crate::SUBPROTOCOL;
use crate::transport::{self, CloseInfo, WriteCmd};

/// What the handles ask of the session task.
pub(super) enum Command {
    Request(Pending),
    Close(oneshot::Sender<()>),
    /// The token provider's answer, for a refresh.
    Token(Result<String, String>),
}

/// A request on its way: queued, or sent and awaiting its answer.
pub(super) struct Pending {
    /// Without an `id`: each connection numbers what it sends.
    pub frame: Value,
    pub kind: Kind,
    /// `None` for the session's own requests (rejoins, pings, refreshes).
    pub reply: Option<oneshot::Sender<Result<Value, Error>>>,
}

impl Pending {
    fn internal(frame: Value, kind: Kind) -> Pending {
        Pending {
            frame,
            kind,
            reply: None,
        }
    }

    /// The caller stopped waiting (its timeout passed): not worth sending.
    fn abandoned(&self) -> bool {
        self.reply.as_ref().is_some_and(oneshot::Sender::is_closed)
    }

    fn answer(self, result: Result<Value, Error>) {
        if let Some(reply) = self.reply {
            let _ = reply.send(result);
        }
    }
}

/// What a request does to the session's state besides its answer.
#[derive(Clone)]
pub(super) enum Kind {
    Join {
        room: String,
        since: Option<Position>,
        meta: Option<Value>,
        /// The session's own join after a reconnect.
        rejoin: bool,
    },
    Leave {
        room: String,
    },
    Publish,
    PresenceSet {
        room: String,
        meta: Value,
    },
    Refresh,
    /// The session's own liveness check.
    Ping,
    Watch {
        users: Vec<String>,
        /// The session's own watch of every watched user after a reconnect.
        rewatch: bool,
    },
    Unwatch {
        users: Vec<String>,
    },
    Plain,
}

impl Kind {
    /// Whether the request is sent again on the next connection when the
    /// one it went out on died unanswered. The session's own are not: a
    /// reconnect rejoins from the rooms' state, and pings and refreshes
    /// belong to one connection.
    fn resend(&self) -> bool {
        !matches!(
            self,
            Kind::Join { rejoin: true, .. }
                | Kind::Watch { rewatch: true, .. }
                | Kind::Ping
                | Kind::Refresh
        )
    }
}

/// An open socket: the writer task fed by a channel, and the reader task
/// forwarding what arrives. Dropping it aborts both.
struct Conn {
    writer: mpsc::UnboundedSender<WriteCmd>,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    tasks: [JoinHandle<()>; 2],
}

enum Incoming {
    Frame(Value),
    /// A WebSocket ping from the edge: the connection is alive.
    Ping,
    /// Something that is not a JSON text frame.
    Garbage(String),
    Ended(CloseInfo),
}

impl Conn {
    fn start(opened: transport::Opened) -> Conn {
        let transport::Opened {
            mut reader, writer, ..
        } = opened;
        let (commands, rx) = mpsc::unbounded_channel();
        let (tx, incoming) = mpsc::unbounded_channel();
        let write_task = tokio::spawn(transport::write_loop(writer, rx));
        let obliged = commands.clone();
        let read_task = tokio::spawn(async move {
            let pings = tx.clone();
            let info = transport::read_messages_noting_pings(
                &mut reader,
                &obliged,
                None,
                || {
                    let _ = pings.send(Incoming::Ping);
                },
                |message| {
                    let item = match message {
                        transport::Message::Text(text) => match serde_json::from_slice(text) {
                            Ok(frame) => Incoming::Frame(frame),
                            Err(e) => Incoming::Garbage(format!(
                                "the server sent a text frame that is not JSON: {e}"
                            )),
                        },
                        transport::Message::Binary(_) => {
                            Incoming::Garbage("the server sent a binary frame".into())
                        }
                    };
                    let _ = tx.send(item);
                    ControlFlow::Continue(())
                },
            )
            .await;
            let _ = tx.send(Incoming::Ended(info));
        });
        Conn {
            writer: commands,
            incoming,
            tasks: [read_task, write_task],
        }
    }

    /// Queues `frame` for the writer. A failed write shows up as the
    /// reader's end, or as silence the pings notice.
    fn send(&self, frame: &Value) {
        let frame = WsFrame::text(Payload::Owned(frame.to_string().into_bytes()));
        let _ = self.writer.send(WriteCmd { frame, ack: None });
    }

    /// Sends a close frame and waits a little for the server's echo, so the
    /// edge sees a clean close rather than a reset.
    async fn close(mut self) {
        let _ = self.writer.send(WriteCmd {
            frame: WsFrame::close(1000, b""),
            ack: None,
        });
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(item) = self.incoming.recv().await {
                if matches!(item, Incoming::Ended(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Why a connect attempt failed.
struct Failure {
    error: Error,
    /// Connecting again will not help (a refused token).
    fatal: bool,
    /// The server's `reconnect_after_ms`.
    after: Option<Duration>,
    code: Option<u16>,
}

impl Failure {
    fn retry(message: String) -> Failure {
        Failure {
            error: Error::new(Code::Unavailable, message),
            fatal: false,
            after: None,
            code: None,
        }
    }
}

/// How a connection ended.
enum End {
    /// The application closed the client.
    Closed,
    Lost {
        disconnected: Disconnected,
        after: Option<Duration>,
    },
}

/// How long to wait for an answer to a ping sent after a silence.
fn pong_wait(heartbeat: Duration) -> Duration {
    (heartbeat / 2).max(Duration::from_secs(2))
}

/// When to refresh a session that expires at `expires_at` (seconds since
/// the epoch) seen at `now` (the same): a tenth of the time left before
/// expiry, at least 2 s and at most a minute.
pub(super) fn refresh_in(expires_at: u64, now: Duration) -> Duration {
    let left = Duration::from_secs(expires_at).saturating_sub(now);
    let margin = (left / 10).clamp(Duration::from_secs(2), Duration::from_secs(60));
    left.saturating_sub(margin)
}

fn unix_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// Whether a close without a `disconnect` frame should be followed by a
/// reconnect: not for the codes that say the client itself is at fault or
/// unwelcome (the protocol's catalogue), yes for a lost socket and the rest.
pub(super) fn reconnect_after_close(code: Option<u16>) -> bool {
    match code {
        None => true,
        Some(1000 | 1002 | 1003 | 1007 | 1008 | 1009) => false,
        // Rate limited, slow consumer, idle: the catalogue says come back.
        Some(4008..=4010) => true,
        // Unauthorized, forbidden, and the backends' own codes.
        Some(4000..=4999) => false,
        Some(_) => true,
    }
}

/// One connect attempt: a token, the socket, `connect`.
async fn establish(options: Arc<Options>, url_at: usize) -> Result<(Conn, Connected), Failure> {
    let url = &options.urls[url_at % options.urls.len()];
    let timeout = options.request_timeout;
    let token = match &options.token {
        TokenSource::Static(t) => t.clone(),
        TokenSource::Provider(provider) => match tokio::time::timeout(timeout, provider()).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                return Err(Failure::retry(format!("the token provider failed: {e}")));
            }
            Err(_) => {
                return Err(Failure::retry(format!(
                    "the token provider gave no token within {timeout:?}"
                )));
            }
        },
        TokenSource::None => unreachable!("Herald::new requires a token"),
    };
    let opened = transport::open_websocket_with(url, None, Some(SUBPROTOCOL), &options.transport)
        .await
        .map_err(|e| Failure::retry(format!("could not connect to {url}: {e}")))?;
    let mut conn = Conn::start(opened);
    let mut connect = json!({"op": "connect", "id": 0, "token": token});
    if let Some(client) = &options.client {
        connect["client"] = client.clone();
    }
    conn.send(&connect);
    let mut disconnect: Option<Value> = None;
    let answer = tokio::time::timeout(timeout, async {
        loop {
            match conn.incoming.recv().await {
                Some(Incoming::Frame(f)) => match f["op"].as_str() {
                    Some("connected") => return Ok(f),
                    Some("error") => return Err(Error::from_frame(&f)),
                    Some("disconnect") => disconnect = Some(f),
                    _ => {}
                },
                Some(Incoming::Ping | Incoming::Garbage(_)) => {}
                Some(Incoming::Ended(info)) => {
                    return Err(Error::new(
                        Code::Unavailable,
                        format!("{url} closed the connection: {info:?}"),
                    ));
                }
                None => return Err(Error::new(Code::Unavailable, "connection lost")),
            }
        }
    })
    .await;
    match answer {
        Ok(Ok(frame)) => {
            let connected: Connected =
                super::types::parse("connect", frame).map_err(|e| Failure::retry(e.message))?;
            Ok((conn, connected))
        }
        Ok(Err(error)) => {
            let refused = matches!(error.code, Code::Unauthorized | Code::TokenExpired);
            let d = disconnect.as_ref();
            Err(Failure {
                fatal: refused || d.is_some_and(|d| d["reconnect"] == false),
                after: d
                    .and_then(|d| d["reconnect_after_ms"].as_u64())
                    .map(Duration::from_millis),
                code: d
                    .and_then(|d| d["code"].as_u64())
                    .and_then(|c| u16::try_from(c).ok())
                    .or(refused.then_some(4001)),
                error,
            })
        }
        Err(_) => Err(Failure::retry(format!(
            "{url} did not answer connect within {timeout:?}"
        ))),
    }
}

pub(super) struct Session {
    core: Arc<Core>,
    options: Arc<Options>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// For the token provider's answer: weak, so that the session ends
    /// when the last handle is gone.
    loopback: mpsc::WeakUnboundedSender<Command>,
    /// Requests waiting for a connection, oldest first.
    queue: VecDeque<Pending>,
    /// Requests sent on the current connection, by id (the send order).
    inflight: BTreeMap<u64, Pending>,
    next_id: u64,
    /// Rejoins refused for now (rate limited, unavailable), to send again.
    retries: Vec<(Instant, Pending)>,
    backoff: Option<Backoff>,
    rng: Rng,
    /// The URL of the next attempt (modulo the list's length).
    url_at: usize,
    /// [`Herald::close`](super::Herald::close) waiting for the end.
    close_ack: Option<oneshot::Sender<()>>,
}

impl Session {
    pub(super) fn new(
        core: Arc<Core>,
        options: Arc<Options>,
        commands: mpsc::UnboundedReceiver<Command>,
        loopback: mpsc::WeakUnboundedSender<Command>,
    ) -> Session {
        let backoff = options.reconnect.map(|(i, m)| Backoff::new(i, m));
        Session {
            core,
            options,
            commands,
            loopback,
            queue: VecDeque::new(),
            inflight: BTreeMap::new(),
            next_id: 1,
            retries: Vec::new(),
            backoff,
            rng: Rng::new(),
            url_at: 0,
            close_ack: None,
        }
    }

    pub(super) async fn run(mut self) {
        let closed = || Error::closed("closed by the application");
        let mut first = true;
        loop {
            self.core.lock().state = if first {
                State::Connecting
            } else {
                State::Reconnecting
            };
            let attempt = establish(self.options.clone(), self.url_at);
            let Some(attempt) = self.offline(attempt).await else {
                return self.stop(closed(), None);
            };
            let after = match attempt {
                Ok((conn, connected)) => {
                    first = false;
                    if let Some(b) = &mut self.backoff {
                        b.reset();
                    }
                    match self.serve(conn, connected).await {
                        End::Closed => {
                            let event = Disconnected {
                                code: Some(1000),
                                reason: "closed by the application".into(),
                                will_reconnect: false,
                            };
                            return self.stop(closed(), Some(event));
                        }
                        End::Lost {
                            mut disconnected,
                            after,
                        } => {
                            disconnected.will_reconnect &= self.backoff.is_some();
                            if !disconnected.will_reconnect {
                                let error = Error::closed(format!(
                                    "the connection ended (code {:?}): {}",
                                    disconnected.code, disconnected.reason
                                ));
                                return self.stop(error, Some(disconnected));
                            }
                            let mut shared = self.core.lock();
                            shared.state = State::Reconnecting;
                            shared.emit(ConnectionEvent::Disconnected(disconnected));
                            drop(shared);
                            after
                        }
                    }
                }
                Err(failure) => {
                    if failure.fatal || self.backoff.is_none() {
                        let event = Disconnected {
                            code: failure.code,
                            reason: failure.error.message.clone(),
                            will_reconnect: false,
                        };
                        return self.stop(failure.error, Some(event));
                    }
                    failure.after
                }
            };
            self.url_at = self.url_at.wrapping_add(1);
            let jittered = match &mut self.backoff {
                Some(b) => b.next(&mut self.rng),
                None => Duration::ZERO,
            };
            let delay = after.map_or(jittered, |a| a.max(jittered));
            if self.offline(tokio::time::sleep(delay)).await.is_none() {
                return self.stop(closed(), None);
            }
        }
    }

    /// Runs `work` while queueing what the handles send; `None` if the
    /// application closed the client meanwhile.
    async fn offline<F: Future>(&mut self, work: F) -> Option<F::Output> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return Some(out),
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Request(p)) => self.enqueue(p),
                    // A refresh is for the connection that is gone; the
                    // next one connects with a new token anyway.
                    Some(Command::Token(_)) => {}
                    Some(Command::Close(ack)) => {
                        self.close_ack = Some(ack);
                        return None;
                    }
                    None => return None,
                },
            }
        }
    }

    fn enqueue(&mut self, p: Pending) {
        self.queue.retain(|q| !q.abandoned());
        if self.queue.len() >= self.options.offline_queue {
            let n = self.options.offline_queue;
            p.answer(Err(Error::new(
                Code::QueueFull,
                format!("{n} requests already wait for the connection"),
            )));
            return;
        }
        self.queue.push_back(p);
    }

    /// Serves one connection until it ends.
    async fn serve(&mut self, mut conn: Conn, connected: Connected) -> End {
        let heartbeat = match connected.heartbeat_ms {
            0 => Duration::from_secs(25),
            ms => Duration::from_millis(ms),
        };
        let mut refresh_at = self.refresh_deadline(connected.expires_at);
        self.welcome(&conn, &connected);

        let mut last_seen = Instant::now();
        let mut ping_sent: Option<Instant> = None;
        let mut disconnect: Option<Value> = None;
        loop {
            let silence = match ping_sent {
                Some(at) => at + pong_wait(heartbeat),
                // A little past the heartbeat, so that the edge's own ping,
                // due at about that moment, usually saves ours.
                None => last_seen + heartbeat + heartbeat / 10,
            };
            let retry_at = self.retries.iter().map(|(at, _)| *at).min();
            let wake = [Some(silence), refresh_at, retry_at]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(silence);
            tokio::select! {
                biased;
                item = conn.incoming.recv() => match item {
                    Some(Incoming::Frame(frame)) => {
                        last_seen = Instant::now();
                        ping_sent = None;
                        if frame["op"] == "disconnect" {
                            disconnect = Some(frame);
                        } else if let Some(at) = self.on_frame(frame) {
                            refresh_at = at;
                        }
                    }
                    Some(Incoming::Ping) => {
                        last_seen = Instant::now();
                        ping_sent = None;
                    }
                    Some(Incoming::Garbage(why)) => {
                        self.core.lock().emit(ConnectionEvent::Error(Error::new(Code::Internal, why)));
                    }
                    Some(Incoming::Ended(info)) => return self.lost(disconnect, info),
                    None => return self.lost(disconnect, CloseInfo { code: None, reason: "the reader stopped".into() }),
                },
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Request(p)) => self.send(&conn, p),
                    Some(Command::Token(Ok(token))) => {
                        self.send(&conn, Pending::internal(json!({"op": "refresh", "token": token}), Kind::Refresh));
                    }
                    Some(Command::Token(Err(why))) => {
                        self.core.lock().emit(ConnectionEvent::Error(Error::new(Code::Unauthorized, why)));
                        refresh_at = Some(Instant::now() + Duration::from_secs(5));
                    }
                    Some(Command::Close(ack)) => {
                        self.close_ack = Some(ack);
                        conn.close().await;
                        return End::Closed;
                    }
                    None => {
                        conn.close().await;
                        return End::Closed;
                    }
                },
                _ = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    if let Some(sent) = ping_sent {
                        if now >= sent + pong_wait(heartbeat) {
                            let waited = now - last_seen;
                            return self.lost(None, CloseInfo {
                                code: None,
                                reason: format!("nothing arrived from the server for {waited:?}, not even an answer to a ping"),
                            });
                        }
                    } else if now >= silence {
                        ping_sent = Some(now);
                        self.send(&conn, Pending::internal(json!({"op": "ping"}), Kind::Ping));
                    }
                    if refresh_at.is_some_and(|at| now >= at) {
                        refresh_at = None;
                        self.fetch_token();
                    }
                    let (due, later): (Vec<_>, Vec<_>) =
                        std::mem::take(&mut self.retries).into_iter().partition(|(at, _)| now >= *at);
                    self.retries = later;
                    for (_, p) in due {
                        self.send(&conn, p);
                    }
                }
            }
        }
    }

    /// A new connection: the shared state, the rejoins, the queued
    /// requests, then the `connected` event.
    fn welcome(&mut self, conn: &Conn, connected: &Connected) {
        let mut rejoins = Vec::new();
        {
            let mut shared = self.core.lock();
            shared.state = State::Connected;
            shared.connected = Some(connected.clone());
            shared.unread = connected.unread.clone();
            shared
                .rooms
                .entry(format!("user:{}", connected.user))
                .or_default();
            let mut names: Vec<&String> = shared.rooms.keys().collect();
            names.sort();
            for name in names {
                let room = &shared.rooms[name];
                if !room.joined {
                    continue;
                }
                let since = room.track.since();
                let mut frame = json!({"op": "join", "room": name});
                if let Some(s) = &since {
                    frame["since"] = json!(s);
                }
                if let Some(meta) = &room.meta {
                    frame["meta"] = meta.clone();
                }
                let kind = Kind::Join {
                    room: name.clone(),
                    since,
                    meta: room.meta.clone(),
                    rejoin: true,
                };
                rejoins.push(Pending::internal(frame, kind));
            }
            if !shared.watched.is_empty() {
                let mut users: Vec<String> = shared.watched.keys().cloned().collect();
                users.sort();
                let frame = json!({"op": "watch", "users": &users});
                let kind = Kind::Watch {
                    users,
                    rewatch: true,
                };
                rejoins.push(Pending::internal(frame, kind));
            }
        }
        for p in rejoins {
            self.send(conn, p);
        }
        for p in std::mem::take(&mut self.queue) {
            self.send(conn, p);
        }
        self.core
            .lock()
            .emit(ConnectionEvent::Connected(connected.clone()));
    }

    fn send(&mut self, conn: &Conn, mut p: Pending) {
        if p.abandoned() {
            return;
        }
        match &p.kind {
            Kind::Join {
                room,
                since: Some(since),
                rejoin: false,
                ..
            } => {
                let mut shared = self.core.lock();
                let state = shared.rooms.entry(room.clone()).or_default();
                state.track.start_from(since.clone());
            }
            // From now on the room is not rejoined, whatever the answer.
            Kind::Leave { room } => {
                if let Some(state) = self.core.lock().rooms.get_mut(room) {
                    state.joined = false;
                }
            }
            // Likewise, the users are not watched again.
            Kind::Unwatch { users } => {
                let mut shared = self.core.lock();
                for user in users {
                    shared.watched.remove(user);
                }
            }
            _ => {}
        }
        let id = self.next_id;
        self.next_id += 1;
        p.frame["id"] = json!(id);
        conn.send(&p.frame);
        self.inflight.insert(id, p);
    }

    /// Handles a frame; returns a new refresh deadline when a refresh was
    /// answered.
    fn on_frame(&mut self, frame: Value) -> Option<Option<Instant>> {
        if let Some(id) = frame.get("id").and_then(Value::as_u64) {
            let p = self.inflight.remove(&id)?;
            return self.answered(p, frame);
        }
        let op = frame["op"].as_str().unwrap_or_default();
        let mut shared = self.core.lock();
        match op {
            "message" => {
                let Ok(message) = serde_json::from_value::<Message>(frame) else {
                    return None;
                };
                let shared = &mut *shared;
                let room = shared.rooms.entry(message.room.clone()).or_default();
                if !room.track.accept(&message) {
                    return None;
                }
                if message.position().is_some()
                    && let Some(n) = shared.unread.get_mut(&message.room)
                {
                    *n += 1;
                }
                room.emit(RoomEvent::Message(message));
            }
            "presence" => {
                let name = frame["room"].as_str().unwrap_or_default().to_owned();
                if let Ok(event) = serde_json::from_value::<PresenceEvent>(frame) {
                    let room = shared.rooms.entry(name).or_default();
                    room.emit(RoomEvent::Presence(event));
                }
            }
            "read" => {
                let name = frame["room"].as_str().unwrap_or_default().to_owned();
                if let Ok(marker) = serde_json::from_value::<ReadMarker>(frame) {
                    shared.unread.insert(name.clone(), marker.unread);
                    let room = shared.rooms.entry(name).or_default();
                    room.emit(RoomEvent::Read(marker));
                }
            }
            "status" => {
                if let (Some(user), Some(online)) =
                    (frame["user"].as_str(), frame["online"].as_bool())
                {
                    shared.status(user, online);
                }
            }
            "error" => shared.emit(ConnectionEvent::Error(Error::from_frame(&frame))),
            _ => {}
        }
        None
    }

    /// The answer to a request: its effect on the session, then to the
    /// caller.
    fn answered(&mut self, p: Pending, frame: Value) -> Option<Option<Instant>> {
        let result = match frame["op"].as_str() {
            Some("error") => Err(Error::from_frame(&frame)),
            _ => Ok(frame),
        };
        let mut refresh = None;
        match (&p.kind, &result) {
            (
                Kind::Join {
                    room,
                    since,
                    meta,
                    rejoin,
                },
                Ok(ok),
            ) => {
                if let Ok(joined) = serde_json::from_value::<JoinOk>(ok.clone()) {
                    let mut shared = self.core.lock();
                    let state = shared.rooms.entry(room.clone()).or_default();
                    // Joining a room joined already moves nothing: a
                    // rejoin's replay may still be on its way.
                    if !state.joined || since.is_some() || *rejoin {
                        state.track.joined(since.as_ref(), &joined);
                    }
                    state.joined = true;
                    if meta.is_some() {
                        state.meta = meta.clone();
                    }
                }
            }
            (
                Kind::Join {
                    room, rejoin: true, ..
                },
                Err(e),
            ) => {
                if e.code.retryable() {
                    let wait = e.retry_after().unwrap_or(Duration::from_secs(1));
                    let retry = Pending::internal(p.frame.clone(), p.kind.clone());
                    self.retries.push((Instant::now() + wait, retry));
                    return None;
                }
                let mut shared = self.core.lock();
                if let Some(state) = shared.rooms.get_mut(room) {
                    state.joined = false;
                }
                shared.emit(ConnectionEvent::Error(Error {
                    message: format!("rejoining {room} was refused: {}", e.message),
                    ..e.clone()
                }));
            }
            (Kind::Watch { users, rewatch }, Ok(ok)) => {
                let mut shared = self.core.lock();
                for user in users {
                    let Some(online) = ok["status"][user.as_str()].as_bool() else {
                        continue;
                    };
                    if *rewatch {
                        // What changed while the client was away.
                        shared.status(user, online);
                    } else {
                        shared.watched.insert(user.clone(), online);
                    }
                }
            }
            (Kind::Watch { rewatch: true, .. }, Err(e)) => {
                if e.code.retryable() {
                    let wait = e.retry_after().unwrap_or(Duration::from_secs(1));
                    let retry = Pending::internal(p.frame.clone(), p.kind.clone());
                    self.retries.push((Instant::now() + wait, retry));
                    return None;
                }
                self.core.lock().emit(ConnectionEvent::Error(Error {
                    message: format!("watching again was refused: {}", e.message),
                    ..e.clone()
                }));
            }
            (Kind::PresenceSet { room, meta }, Ok(_)) => {
                if let Some(state) = self.core.lock().rooms.get_mut(room) {
                    state.meta = Some(meta.clone());
                }
            }
            (Kind::Refresh, Ok(ok)) => {
                let expires_at = ok["expires_at"].as_u64().unwrap_or_default();
                refresh = Some(self.refresh_deadline(expires_at));
            }
            (Kind::Refresh, Err(e)) if p.reply.is_none() => {
                self.core.lock().emit(ConnectionEvent::Error(Error {
                    message: format!("refreshing the token was refused: {}", e.message),
                    ..e.clone()
                }));
                refresh = Some(Some(Instant::now() + Duration::from_secs(5)));
            }
            _ => {}
        }
        p.answer(result);
        refresh
    }

    /// When to refresh: only with a token provider.
    fn refresh_deadline(&self, expires_at: u64) -> Option<Instant> {
        if !matches!(self.options.token, TokenSource::Provider(_)) || expires_at == 0 {
            return None;
        }
        Some(Instant::now() + refresh_in(expires_at, unix_now()))
    }

    /// Asks the provider for a token in a task of its own, so the
    /// connection is served meanwhile; the answer comes back as a command.
    fn fetch_token(&self) {
        let TokenSource::Provider(provider) = &self.options.token else {
            return;
        };
        let provider = provider.clone();
        let loopback = self.loopback.clone();
        let timeout = self.options.request_timeout;
        tokio::spawn(async move {
            let token = match tokio::time::timeout(timeout, provider()).await {
                Ok(Ok(t)) => Ok(t),
                Ok(Err(e)) => Err(format!("the token provider failed: {e}")),
                Err(_) => Err(format!(
                    "the token provider gave no token within {timeout:?}"
                )),
            };
            if let Some(tx) = loopback.upgrade() {
                let _ = tx.send(Command::Token(token));
            }
        });
    }

    /// The connection is gone: what was sent and not answered waits for
    /// the next one, first in line and in its order.
    fn lost(&mut self, disconnect: Option<Value>, info: CloseInfo) -> End {
        let unanswered: Vec<Pending> = std::mem::take(&mut self.inflight)
            .into_values()
            .filter(|p| p.kind.resend() && !p.abandoned())
            .collect();
        for p in unanswered.into_iter().rev() {
            self.queue.push_front(p);
        }
        self.retries.clear();
        let provider = matches!(self.options.token, TokenSource::Provider(_));
        let (code, reason, will, after) = match &disconnect {
            Some(d) => {
                let code = d["code"].as_u64().and_then(|c| u16::try_from(c).ok());
                (
                    code,
                    d["reason"].as_str().unwrap_or_default().to_owned(),
                    d["reconnect"].as_bool().unwrap_or(false),
                    d["reconnect_after_ms"].as_u64().map(Duration::from_millis),
                )
            }
            None => (
                info.code,
                info.reason.clone(),
                reconnect_after_close(info.code),
                None,
            ),
        };
        // An expired token is not the end when a new one can be had.
        let will = will || (provider && code == Some(4001));
        End::Lost {
            disconnected: Disconnected {
                code,
                reason,
                will_reconnect: will,
            },
            after,
        }
    }

    /// The end: every waiting request fails, every stream ends.
    fn stop(mut self, error: Error, event: Option<Disconnected>) {
        let waiting = std::mem::take(&mut self.inflight)
            .into_values()
            .chain(std::mem::take(&mut self.queue));
        for p in waiting {
            p.answer(Err(error.clone()));
        }
        let mut shared = self.core.lock();
        shared.state = State::Closed;
        shared.ended = Some(error);
        if let Some(event) = event {
            shared.emit(ConnectionEvent::Disconnected(event));
        }
        shared.listeners.clear();
        for room in shared.rooms.values_mut() {
            room.listeners.clear();
        }
        drop(shared);
        if let Some(ack) = self.close_ack.take() {
            let _ = ack.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_come_before_expiry() {
        let now = Duration::from_secs(1_000_000);
        // An hour left: a minute before.
        assert_eq!(refresh_in(1_003_600, now), Duration::from_secs(3540));
        // Ten minutes left: a tenth before.
        assert_eq!(refresh_in(1_000_600, now), Duration::from_secs(540));
        // Six seconds left: two before.
        assert_eq!(refresh_in(1_000_006, now), Duration::from_secs(4));
        // Expired or nearly: at once.
        assert_eq!(refresh_in(1_000_001, now), Duration::ZERO);
        assert_eq!(refresh_in(999_000, now), Duration::ZERO);
    }

    #[test]
    fn closes_without_a_disconnect_frame() {
        assert!(reconnect_after_close(None));
        assert!(reconnect_after_close(Some(1006)));
        assert!(reconnect_after_close(Some(1011)));
        assert!(reconnect_after_close(Some(1012)));
        assert!(reconnect_after_close(Some(4010)));
        assert!(!reconnect_after_close(Some(1000)));
        assert!(!reconnect_after_close(Some(1002)));
        assert!(!reconnect_after_close(Some(4001)));
        assert!(!reconnect_after_close(Some(4403)));
    }

    #[test]
    fn pong_waits_have_a_floor() {
        assert_eq!(
            pong_wait(Duration::from_secs(25)),
            Duration::from_millis(12_500)
        );
        assert_eq!(pong_wait(Duration::from_secs(1)), Duration::from_secs(2));
    }

    #[test]
    fn only_requests_of_the_application_are_sent_again() {
        assert!(Kind::Publish.resend());
        assert!(Kind::Plain.resend());
        assert!(
            Kind::Join {
                room: "a:b".into(),
                since: None,
                meta: None,
                rejoin: false
            }
            .resend()
        );
        assert!(
            !Kind::Join {
                room: "a:b".into(),
                since: None,
                meta: None,
                rejoin: true
            }
            .resend()
        );
        assert!(!Kind::Ping.resend());
        assert!(!Kind::Refresh.resend());
    }
}
