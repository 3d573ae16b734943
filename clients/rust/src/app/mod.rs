//! The client for applications: one [`Herald`] per user session, which
//! keeps a connection to one of several edges, and one [`Room`] per room.
//!
//! Unlike [`Client`](crate::Client), which shows the protocol frame by frame
//! for tests, this client hides the connection's life: it reconnects with
//! exponential backoff and full jitter (honouring the server's
//! `disconnect.reconnect` and `reconnect_after_ms`, trying the next URL),
//! rejoins every room with `since` in durable rooms and drops what the
//! server sends twice, so the application sees every durable message
//! exactly once and in order; it queues requests while offline (bounded)
//! and sends them after the rejoin, publishes with an idempotency key so a
//! publish in flight when the socket died is sent again without being
//! stored twice; it refreshes the token before it expires and pings when
//! the connection has been silent for a heartbeat.
//!
//! Every request is answered in typed form or with an [`Error`] carrying
//! the protocol's `code` and `retry_after_ms`. Events come through
//! [`Events`]: per room ([`Room::events`]: messages, presence, read
//! markers) and for the connection ([`Herald::events`]: connected,
//! disconnected, errors). Subscribe before joining, or the first messages
//! may pass before anyone listens.
//!
//! One task owns the socket and all state that changes with it; the
//! handles talk to it over a channel and read a shared snapshot
//! ([`State`], positions, unread counts), as async-nats does.

mod backoff;
mod order;
mod session;
mod types;

pub use backoff::Backoff;
pub use order::Track;
pub use types::{
    Code, Connected, ConnectionEvent, Disconnected, Error, History, JoinOk, Member,
    MemberConnection, Message, Position, PresenceChange, PresenceEvent, Published, ReadMarker,
    RoomEvent, State,
};

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::rustls;
use session::{Command, Kind, Pending};

/// What a token provider may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a token provider returns.
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>>;

type Provider = Arc<dyn Fn() -> TokenFuture + Send + Sync>;

#[derive(Clone)]
enum TokenSource {
    None,
    Static(String),
    Provider(Provider),
}

/// How [`Room::publish_with`] publishes.
#[derive(Clone, Debug)]
pub struct PublishOptions {
    /// The idempotency key; a new one when `None`.
    pub key: Option<String>,
    /// Whether this connection receives its own message (true by default).
    pub echo: bool,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            key: None,
            echo: true,
        }
    }
}

/// How a [`Herald`] connects. Built with [`Options::new`] and the methods
/// that follow it; a token (or a token provider) is required.
#[derive(Clone)]
pub struct Options {
    urls: Vec<String>,
    token: TokenSource,
    client: Option<Value>,
    request_timeout: Duration,
    reconnect: Option<(Duration, Duration)>,
    offline_queue: usize,
    transport: crate::transport::Options,
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token itself.
        let token = match self.token {
            TokenSource::None => "none",
            TokenSource::Static(_) => "fixed",
            TokenSource::Provider(_) => "provider",
        };
        f.debug_struct("Options")
            .field("urls", &self.urls)
            .field("token", &token)
            .field("request_timeout", &self.request_timeout)
            .field("reconnect", &self.reconnect)
            .field("offline_queue", &self.offline_queue)
            .finish_non_exhaustive()
    }
}

impl Options {
    /// The edges to connect to (`ws://host:port/ws` or `wss://...`), tried
    /// in turn: each reconnect starts with the URL after the one that
    /// failed or dropped.
    pub fn new<I, S>(urls: I) -> Options
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Options {
            urls: urls.into_iter().map(Into::into).collect(),
            token: TokenSource::None,
            client: None,
            request_timeout: Duration::from_secs(10),
            reconnect: Some((Duration::from_millis(500), Duration::from_secs(15))),
            offline_queue: 100,
            transport: crate::transport::Options::default(),
        }
    }

    /// One token (JWT) for every connection. The session ends when it
    /// expires; use [`Options::token_provider`] to keep it going.
    pub fn token(mut self, token: impl Into<String>) -> Options {
        self.token = TokenSource::Static(token.into());
        self
    }

    /// Asked for a token on every (re)connect and again before the
    /// session expires (`refresh`). A provider that fails makes that
    /// connect attempt fail (and be retried with backoff), or that refresh.
    pub fn token_provider<F, Fut>(mut self, provider: F) -> Options
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, BoxError>> + Send + 'static,
    {
        self.token = TokenSource::Provider(Arc::new(move || Box::pin(provider())));
        self
    }

    /// Sent as `connect.client` (a name and version, say).
    pub fn client_info(mut self, client: Value) -> Options {
        self.client = Some(client);
        self
    }

    /// How long a request may take from the call to its answer, waiting
    /// for a connection included (default 10 s); then it fails with
    /// [`Code::Timeout`] and, if it was not sent yet, is never sent.
    pub fn request_timeout(mut self, timeout: Duration) -> Options {
        self.request_timeout = timeout;
        self
    }

    /// The reconnect delays: attempt `n` waits a random time up to
    /// `min(max, initial * 2^n)` (default 500 ms and 15 s).
    pub fn reconnect(mut self, initial: Duration, max: Duration) -> Options {
        self.reconnect = Some((initial, max));
        self
    }

    /// No reconnecting: the first lost connection closes the client.
    pub fn no_reconnect(mut self) -> Options {
        self.reconnect = None;
        self
    }

    /// How many requests may wait for a connection (default 100); beyond
    /// that they fail at once with [`Code::QueueFull`].
    pub fn offline_queue(mut self, size: usize) -> Options {
        self.offline_queue = size;
        self
    }

    /// For `wss://` URLs: the certificates to trust.
    pub fn tls(mut self, config: Arc<rustls::ClientConfig>) -> Options {
        self.transport.tls = Some(config);
        self
    }

    /// The upgrade request's `Origin` header, for edges that check it.
    pub fn origin(mut self, origin: impl Into<String>) -> Options {
        self.transport.origin = Some(origin.into());
        self
    }
}

/// Options of [`Room::join`].
#[derive(Clone, Debug, Default)]
pub struct JoinOptions {
    /// Presence data for this connection in the room; remembered and sent
    /// again on every rejoin.
    pub meta: Option<Value>,
    /// In a durable room: replay what came after this position first.
    pub since: Option<Position>,
}

/// Options of [`Room::history`].
#[derive(Clone, Debug, Default)]
pub struct HistoryOptions {
    pub since: Option<Position>,
    /// Default 100, at most 500.
    pub limit: Option<u32>,
}

/// A stream of events; `None` once the client is closed (or the room's
/// events can no longer come). Unbounded: an application that subscribes
/// must read, or drop the subscription.
#[derive(Debug)]
pub struct Events<T> {
    rx: mpsc::UnboundedReceiver<T>,
}

impl<T> Events<T> {
    pub async fn next(&mut self) -> Option<T> {
        self.rx.recv().await
    }

    /// The next event if one is waiting.
    pub fn try_next(&mut self) -> Option<T> {
        self.rx.try_recv().ok()
    }
}

/// What the handles and the session task share.
#[derive(Default)]
struct Core {
    state: Mutex<Shared>,
}

impl Core {
    /// Nothing under this lock can panic half-way, so a poisoned lock still
    /// holds consistent data.
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The client's state as the handles see it; written by the session task.
struct Shared {
    state: State,
    connected: Option<Connected>,
    unread: HashMap<String, u64>,
    rooms: HashMap<String, RoomState>,
    listeners: Vec<mpsc::UnboundedSender<ConnectionEvent>>,
    /// Why the client closed, for [`Herald::connect`].
    ended: Option<Error>,
    /// Watched users and whether each was last known online: watched again
    /// after every reconnect.
    watched: HashMap<String, bool>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            state: State::Idle,
            connected: None,
            unread: HashMap::new(),
            rooms: HashMap::new(),
            listeners: Vec::new(),
            ended: None,
            watched: HashMap::new(),
        }
    }
}

impl Shared {
    fn emit(&mut self, event: ConnectionEvent) {
        self.listeners.retain(|l| l.send(event.clone()).is_ok());
    }

    /// A watched user's status as the server told it: kept, and a
    /// [`ConnectionEvent::Status`] when it changed.
    fn status(&mut self, user: &str, online: bool) {
        let Some(known) = self.watched.get_mut(user) else {
            return;
        };
        if *known != online {
            *known = online;
            self.emit(ConnectionEvent::Status {
                user: user.to_owned(),
                online,
            });
        }
    }
}

/// One room as the session keeps it.
#[derive(Default)]
struct RoomState {
    /// Joined by the application and not left: rejoined after a reconnect.
    joined: bool,
    meta: Option<Value>,
    track: Track,
    listeners: Vec<mpsc::UnboundedSender<RoomEvent>>,
}

impl RoomState {
    fn emit(&mut self, event: RoomEvent) {
        self.listeners.retain(|l| l.send(event.clone()).is_ok());
    }
}

struct Inner {
    commands: mpsc::UnboundedSender<Command>,
    core: Arc<Core>,
    options: Arc<Options>,
    /// The session task's end of the channel, until `connect` starts it.
    start: Mutex<Option<mpsc::UnboundedReceiver<Command>>>,
    /// Idempotency keys: a random prefix per client and a counter.
    key_prefix: u64,
    keys: AtomicU64,
}

/// A Herald session: connects, reconnects, and hands out [`Room`]s.
/// Cheap to clone; the connection closes when [`Herald::close`] is called
/// or every handle (rooms included) is dropped.
#[derive(Clone)]
pub struct Herald {
    inner: Arc<Inner>,
}

impl fmt::Debug for Herald {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Herald")
            .field("state", &self.state())
            .field("conn", &self.conn())
            .finish_non_exhaustive()
    }
}

impl Herald {
    /// A client that does nothing until [`Herald::connect`]. Fails with
    /// [`Code::BadRequest`] without a URL or a token.
    pub fn new(options: Options) -> Result<Herald, Error> {
        if options.urls.is_empty() {
            return Err(Error::new(Code::BadRequest, "no URL to connect to"));
        }
        if matches!(options.token, TokenSource::None) {
            return Err(Error::new(
                Code::BadRequest,
                "no token: set Options::token or Options::token_provider",
            ));
        }
        let (commands, rx) = mpsc::unbounded_channel();
        Ok(Herald {
            inner: Arc::new(Inner {
                commands,
                core: Arc::default(),
                options: Arc::new(options),
                start: Mutex::new(Some(rx)),
                key_prefix: backoff::Rng::new().next_u64(),
                keys: AtomicU64::new(0),
            }),
        })
    }

    /// Starts connecting (the first call; later ones only wait) and waits
    /// for the first `connected`. Connection failures are retried with
    /// backoff meanwhile, so wrap this in a timeout to bound the wait; it
    /// fails when the client closes first: a refused token, a server that
    /// says not to reconnect, [`Options::no_reconnect`] and a failed
    /// attempt, or [`Herald::close`].
    pub async fn connect(&self) -> Result<Connected, Error> {
        let mut events = self.events();
        let rx = self
            .inner
            .start
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(rx) = rx {
            let task = session::Session::new(
                self.inner.core.clone(),
                self.inner.options.clone(),
                rx,
                self.inner.commands.downgrade(),
            );
            tokio::spawn(task.run());
        }
        {
            let shared = self.inner.core.lock();
            match shared.state {
                State::Connected => {
                    if let Some(c) = &shared.connected {
                        return Ok(c.clone());
                    }
                }
                State::Closed => return Err(ended(&shared)),
                _ => {}
            }
        }
        while let Some(event) = events.next().await {
            if let ConnectionEvent::Connected(c) = event {
                return Ok(c);
            }
        }
        Err(ended(&self.inner.core.lock()))
    }

    /// Closes the connection (close code 1000) and stops for good: waiting
    /// requests fail with [`Code::Closed`], event streams end.
    pub async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.inner.commands.send(Command::Close(ack)).is_ok() {
            let _ = done.await;
        }
    }

    /// The connection's events, from now on.
    pub fn events(&self) -> Events<ConnectionEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.core.lock().listeners.push(tx);
        Events { rx }
    }

    pub fn state(&self) -> State {
        self.inner.core.lock().state
    }

    /// The current (or last) connection's `connected` frame.
    pub fn connected(&self) -> Option<Connected> {
        self.inner.core.lock().connected.clone()
    }

    pub fn user(&self) -> Option<String> {
        self.connected().map(|c| c.user)
    }

    pub fn conn(&self) -> Option<String> {
        self.connected().map(|c| c.conn)
    }

    pub fn node(&self) -> Option<String> {
        self.connected().map(|c| c.node)
    }

    /// The room `name` (the same state for every handle of one name).
    /// Nothing is sent until it is joined.
    pub fn room(&self, name: &str) -> Room {
        self.inner
            .core
            .lock()
            .rooms
            .entry(name.to_owned())
            .or_default();
        Room {
            name: name.into(),
            herald: self.clone(),
        }
    }

    /// The user's personal room `user:<sub>` (once connected): the offline
    /// inbox, its unread count and `read` events. It cannot be left.
    pub fn personal(&self) -> Option<Room> {
        let user = self.user()?;
        Some(self.room(&format!("user:{user}")))
    }

    /// Unread messages in `room`, if the server counts them (the personal
    /// room, and durable rooms with a read marker): from `connected`, kept
    /// up to date by `read` events and new messages.
    pub fn unread(&self, room: &str) -> Option<u64> {
        self.inner.core.lock().unread.get(room).copied()
    }

    /// A round trip to the edge (`ping`); returns how long it took.
    pub async fn ping(&self) -> Result<Duration, Error> {
        let started = Instant::now();
        self.request(json!({"op": "ping"}), Kind::Plain).await?;
        Ok(started.elapsed())
    }

    /// Watches `users`' online status (the token's `watch` claim must allow
    /// each): returns whether each is online now, then every transition
    /// comes as a [`ConnectionEvent::Status`]. Watched users are watched
    /// again after every reconnect, and what changed meanwhile is told as
    /// `Status` events too, until [`Herald::unwatch`].
    pub async fn watch(&self, users: &[&str]) -> Result<HashMap<String, bool>, Error> {
        let frame = json!({"op": "watch", "users": users});
        let kind = Kind::Watch {
            users: users.iter().map(|u| u.to_string()).collect(),
            rewatch: false,
        };
        let ok = self.request(frame, kind).await?;
        types::parse("watch", ok["status"].clone())
    }

    /// Stops watching `users`.
    pub async fn unwatch(&self, users: &[&str]) -> Result<(), Error> {
        let frame = json!({"op": "unwatch", "users": users});
        let kind = Kind::Unwatch {
            users: users.iter().map(|u| u.to_string()).collect(),
        };
        self.request(frame, kind).await.map(drop)
    }

    /// Replaces the session's token now (`refresh`) with `token`, a newer
    /// one for the same user; returns the new `expires_at`. With a token
    /// provider this happens by itself before the session expires.
    pub async fn refresh(&self, token: &str) -> Result<u64, Error> {
        let ok = self
            .request(json!({"op": "refresh", "token": token}), Kind::Refresh)
            .await?;
        Ok(ok["expires_at"].as_u64().unwrap_or_default())
    }

    /// Sends `frame` through the session task and waits for its answer:
    /// the `ok` (or `pong`) frame, or the `error` as an [`Error`].
    async fn request(&self, frame: Value, kind: Kind) -> Result<Value, Error> {
        let timeout = self.inner.options.request_timeout;
        let (reply, answer) = oneshot::channel();
        let op = frame["op"].as_str().unwrap_or_default().to_owned();
        let pending = Pending {
            frame,
            kind,
            reply: Some(reply),
        };
        if self.inner.commands.send(Command::Request(pending)).is_err() {
            return Err(ended(&self.inner.core.lock()));
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ended(&self.inner.core.lock())),
            Err(_) => Err(Error::new(
                Code::Timeout,
                format!("no answer to {op} within {timeout:?}"),
            )),
        }
    }

    fn new_key(&self) -> String {
        let n = self.inner.keys.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}-{n:x}", self.inner.key_prefix)
    }
}

/// Why the client is closed, as the error a request gets.
fn ended(shared: &Shared) -> Error {
    shared
        .ended
        .clone()
        .unwrap_or_else(|| Error::closed("the client is closed"))
}

/// A room: joining and leaving it, publishing to it, its presence and
/// history, and its events.
#[derive(Clone)]
pub struct Room {
    name: Arc<str>,
    herald: Herald,
}

impl fmt::Debug for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Room")
            .field("name", &self.name)
            .field("joined", &self.joined())
            .field("position", &self.position())
            .finish()
    }
}

impl Room {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The room's events from now on: messages (durable ones exactly once
    /// and in order, across reconnects), presence changes, read markers.
    pub fn events(&self) -> Events<RoomEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.with_state(|room| room.listeners.push(tx));
        Events { rx }
    }

    /// Whether the application joined the room and has not left it (it
    /// stays joined while the client reconnects).
    pub fn joined(&self) -> bool {
        self.with_state(|room| room.joined)
    }

    /// In a durable room, the last message given to the application (or
    /// where the room stood at the join): the `since` of a rejoin, and
    /// what an application stores to resume from after a restart.
    pub fn position(&self) -> Option<Position> {
        self.with_state(|room| room.track.position().cloned())
    }

    /// Joins the room; with `since` in a durable room, what followed it is
    /// delivered first. The room is rejoined after every reconnect (with
    /// `since` = [`Room::position`] and the latest meta) until
    /// [`Room::leave`].
    pub async fn join(&self, options: JoinOptions) -> Result<JoinOk, Error> {
        let mut frame = json!({"op": "join", "room": &*self.name});
        if let Some(meta) = &options.meta {
            frame["meta"] = meta.clone();
        }
        if let Some(since) = &options.since {
            frame["since"] = json!(since);
        }
        let kind = Kind::Join {
            room: self.name.to_string(),
            since: options.since,
            meta: options.meta,
            rejoin: false,
        };
        let ok = self.herald.request(frame, kind).await?;
        types::parse("join", ok)
    }

    /// Leaves the room: no more events, no rejoin.
    pub async fn leave(&self) -> Result<(), Error> {
        let frame = json!({"op": "leave", "room": &*self.name});
        let kind = Kind::Leave {
            room: self.name.to_string(),
        };
        self.herald.request(frame, kind).await.map(drop)
    }

    /// Publishes `data` with a fresh idempotency key. While offline it
    /// waits in the queue; a publish whose connection died before the
    /// answer is sent again with the same key, so a durable room stores it
    /// once. (Ephemeral rooms ignore keys: there a resent publish may be
    /// delivered twice.)
    pub async fn publish(&self, data: Value) -> Result<Published, Error> {
        let key = self.herald.new_key();
        self.publish_with_key(data, &key).await
    }

    /// [`Room::publish`] with the application's own key: to retry an
    /// `outcome_unknown` (or a timeout) safely, publish again with the
    /// same key.
    pub async fn publish_with_key(&self, data: Value, key: &str) -> Result<Published, Error> {
        let frame = json!({"op": "publish", "room": &*self.name, "data": data, "key": key});
        let ok = self.herald.request(frame, Kind::Publish).await?;
        types::parse("publish", ok)
    }

    /// [`Room::publish`] with options: the application's own key, and
    /// `echo: false` to leave this connection out of the message's
    /// delivery (the user's other devices and everyone else get it).
    pub async fn publish_with(
        &self,
        data: Value,
        options: PublishOptions,
    ) -> Result<Published, Error> {
        let key = options.key.unwrap_or_else(|| self.herald.new_key());
        let mut frame = json!({"op": "publish", "room": &*self.name, "data": data, "key": key});
        if !options.echo {
            frame["echo"] = json!(false);
        }
        let ok = self.herald.request(frame, Kind::Publish).await?;
        types::parse("publish", ok)
    }

    /// Who is in the room.
    pub async fn presence(&self) -> Result<Vec<Member>, Error> {
        let frame = json!({"op": "presence", "room": &*self.name});
        let ok = self.herald.request(frame, Kind::Plain).await?;
        types::parse("presence", ok["members"].clone())
    }

    /// Sets this connection's presence data in the room (`presence_set`);
    /// remembered and sent again on every rejoin.
    pub async fn set_meta(&self, meta: Value) -> Result<(), Error> {
        let frame = json!({"op": "presence_set", "room": &*self.name, "meta": meta});
        let kind = Kind::PresenceSet {
            room: self.name.to_string(),
            meta,
        };
        self.herald.request(frame, kind).await.map(drop)
    }

    /// Stored messages of a durable room, oldest first.
    pub async fn history(&self, options: HistoryOptions) -> Result<History, Error> {
        let mut frame = json!({"op": "history", "room": &*self.name});
        if let Some(since) = &options.since {
            frame["since"] = json!(since);
        }
        if let Some(limit) = options.limit {
            frame["limit"] = json!(limit);
        }
        let ok = self.herald.request(frame, Kind::Plain).await?;
        types::parse("history", ok)
    }

    /// Moves the user's read marker up to `offset` (`read`).
    pub async fn mark_read(&self, offset: u64) -> Result<ReadMarker, Error> {
        let frame = json!({"op": "read", "room": &*self.name, "offset": offset});
        let ok = self.herald.request(frame, Kind::Plain).await?;
        types::parse("read", ok)
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut RoomState) -> T) -> T {
        let mut shared = self.herald.inner.core.lock();
        f(shared.rooms.entry(self.name.to_string()).or_default())
    }
}
