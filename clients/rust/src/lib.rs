//! Rust clients for Herald's client protocol (JSON over WebSocket,
//! subprotocol `herald.v1`, `ws://` or `wss://`).
//!
//! - [`app`] is the client for applications: a [`Herald`](app::Herald)
//!   session over a list of edges that reconnects with backoff, rejoins
//!   its rooms and recovers durable rooms' messages exactly once and in
//!   order, queues publishes while offline with idempotency keys, refreshes
//!   its token, and answers every request in typed form.
//! - [`Client`] is the protocol frame by frame, for Herald's own black-box
//!   tests and benchmarks (below).
//!
//! ```no_run
//! # async fn demo() -> Result<(), herald_client::app::Error> {
//! use herald_client::app::{Herald, JoinOptions, Options, RoomEvent};
//! use serde_json::json;
//!
//! let herald = Herald::new(
//!     Options::new(["wss://edge-a.example.com/ws", "wss://edge-b.example.com/ws"])
//!         // Asked on every connect and before the session expires.
//!         .token_provider(|| async { Ok::<_, herald_client::app::BoxError>(fetch_token().await) }),
//! )?;
//! let room = herald.room("chat:lobby");
//! let mut events = room.events(); // before joining: nothing is missed
//! herald.connect().await?;
//! room.join(JoinOptions::default()).await?;
//! room.publish(json!({"text": "hello"})).await?;
//! while let Some(event) = events.next().await {
//!     if let RoomEvent::Message(m) = event {
//!         println!("{}: {}", m.from, m.data);
//!     }
//! }
//! # Ok(()) }
//! # async fn fetch_token() -> String { String::new() }
//! ```
//!
//! ## The test client
//!
//! [`Client`] favours observability over convenience: every frame the
//! server sends is kept until the test asks for it, close codes and reasons
//! are reported exactly, and the raw socket can be abused on purpose
//! ([`Client::send_text`] with garbage, [`Client::send_binary`]). Load
//! generators that only count messages see frames unparsed instead, through
//! a [`Tap`].
//!
//! Each [`Client`] runs two background tasks. The reader owns the read half
//! of the socket, answers pings and close frames, hands replies to the
//! request waiting for their `id`, and queues everything else. The writer owns
//! the write half and sends frames in the order they were submitted, so the
//! reader never waits on a slow write and concurrent callers never interleave
//! partial frames.
//!
//! ```no_run
//! # async fn demo() -> Result<(), herald_client::ClientError> {
//! use std::time::Duration;
//! use herald_client::Client;
//! use serde_json::json;
//!
//! let (client, connected) = Client::connect("ws://127.0.0.1:8080/ws", "<jwt>").await?;
//! println!("connection {}", connected["conn"]);
//! let ok = client.request(json!({"op": "join", "room": "chat:lobby"})).await?;
//! assert_eq!(ok["op"], "ok");
//! let message = client.recv_op("message", Duration::from_secs(5)).await?;
//! println!("{message}");
//! client.close().await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod app;
pub mod transport;

/// The rustls of [`Options::tls`].
pub use tokio_rustls::rustls;
pub use transport::Options;

use std::collections::VecDeque;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use fastwebsockets::{Frame as WsFrame, Payload};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::transport::{CloseInfo, Driver, Message, Reader, Waiters, Waiting, WriteCmd};

/// The WebSocket subprotocol the client offers.
pub const SUBPROTOCOL: &str = "herald.v1";

/// How long [`Client::request`] and [`Client::connect`] wait for a reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long opening a socket (TCP connect plus HTTP upgrade) may take. Longer
/// than [`DEFAULT_TIMEOUT`] because benchmarks open thousands of sockets at
/// once and the accept queue can lag.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A frame from the server, parsed.
pub type Frame = Value;

/// Everything that can go wrong talking to a Herald edge.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is unusable, or the HTTP upgrade failed below the status level
    /// (bad headers, wrong subprotocol, broken HTTP).
    #[error("cannot open WebSocket: {0}")]
    Connect(String),
    /// The server answered the upgrade request with something other than
    /// `101 Switching Protocols`; kept apart from [`ClientError::Connect`]
    /// because tests assert on the status (401, 403, 429, ...).
    #[error("upgrade rejected with HTTP status {status}")]
    Rejected { status: u16 },
    /// The connection is closed. `code` and `reason` come from the server's
    /// close frame, or from its `disconnect` frame when [`Client::connect`]
    /// was refused. `code` is `None` when the close frame carried no code or
    /// when the connection ended without a close frame (then `reason` says
    /// why).
    #[error("connection closed (code {code:?}): {reason}")]
    Closed { code: Option<u16>, reason: String },
    /// Nothing arrived in time; the message says what was awaited.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The server broke the protocol (non-JSON text, a binary frame, an
    /// unexpected reply), refused `connect` with an `error` frame
    /// (`"code: message"`), or the caller passed a request that is not a JSON
    /// object with an `op`.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// TCP-level failure (resolve, bind, connect, write); the kind is kept so
    /// tests can tell "connection refused" from the rest.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Sees every text frame from the server on the reader task, before it is
/// parsed, and returns `true` to take it: a taken frame is neither parsed nor
/// queued nor handed to a request. For load generators counting room
/// messages, where parsing and queueing each of 100k frames a second would
/// cost the machine more CPU than the server spends sending them. It runs on
/// the reader task, so it must be quick.
pub type Tap = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// An unsolicited frame, or the description of a protocol violation, kept in
/// arrival order so that errors surface where they happened.
type Incoming = Result<Frame, String>;

/// State shared between the client handle and its reader task.
struct Shared {
    /// Requests waiting for a reply, by id. `None` once the reader stopped,
    /// so that a request registered after that fails at once instead of
    /// waiting out its timeout.
    pending: Waiters<Frame>,
    /// Set by the reader when it stops, before `pending` is cleared, so a
    /// woken request always finds the reason.
    close: Mutex<Option<CloseInfo>>,
}

impl Shared {
    fn closed_error(&self) -> ClientError {
        transport::closed_error(&self.close)
    }
}

/// Nothing under these locks can panic half-way, so a poisoned lock still
/// holds consistent data.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Unsolicited frames: the channel from the reader, plus the frames that a
/// selective receive ([`Client::recv_op`]) pulled out of it but did not want.
/// `held` always precedes the channel, so together they keep arrival order.
struct Inbox {
    rx: mpsc::UnboundedReceiver<Incoming>,
    held: VecDeque<Incoming>,
}

impl Inbox {
    fn take_held(&mut self, wanted: impl Fn(&Incoming) -> bool) -> Option<Incoming> {
        let at = self.held.iter().position(wanted)?;
        self.held.remove(at)
    }

    /// The first item matching `wanted`, or `None` once the connection ended
    /// and nothing matching is left. Cancel-safe: the only await is the
    /// channel receive, and items move to `held` synchronously, so a timeout
    /// around this never loses a frame.
    async fn recv_where(&mut self, wanted: impl Fn(&Incoming) -> bool) -> Option<Incoming> {
        if let Some(item) = self.take_held(&wanted) {
            return Some(item);
        }
        loop {
            let item = self.rx.recv().await?;
            if wanted(&item) {
                return Some(item);
            }
            self.held.push_back(item);
        }
    }
}

fn op_of(frame: &Frame) -> Option<&str> {
    frame.get("op").and_then(Value::as_str)
}

/// A connection to a Herald edge. `Send + Sync` (`&Client` is enough for
/// every operation but [`Client::close`]); dropping it aborts the connection
/// without a close frame.
pub struct Client {
    shared: Arc<Shared>,
    driver: Driver,
    inbox: tokio::sync::Mutex<Inbox>,
    next_id: AtomicU64,
    protocol: Option<String>,
    local_addr: SocketAddr,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("local_addr", &self.local_addr)
            .field("protocol", &self.protocol)
            .field("closed", &lock(&self.shared.close).as_ref())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Opens a WebSocket to `url` (e.g. `ws://127.0.0.1:8080/ws`, or with
    /// `?token=...`), offering subprotocol `herald.v1`. No `connect` op is
    /// sent.
    pub async fn open(url: &str) -> Result<Client, ClientError> {
        Self::open_from(url, None).await
    }

    /// Like [`Client::open`], with the socket's source address bound to
    /// `local_ip` (port chosen by the OS). Benchmarks spread connections over
    /// 127.0.0.2, 127.0.0.3, ... because one source address runs out of
    /// ephemeral ports long before the server runs out of capacity.
    pub async fn open_from(url: &str, local_ip: Option<IpAddr>) -> Result<Client, ClientError> {
        let opened = transport::open_websocket(url, local_ip, Some(SUBPROTOCOL)).await?;
        Ok(Self::start(opened, None))
    }

    /// [`Client::open`] with [`Options`]: an `Origin` header, TLS for
    /// `wss://` URLs.
    pub async fn open_with(url: &str, options: &Options) -> Result<Client, ClientError> {
        let opened = transport::open_websocket_with(url, None, Some(SUBPROTOCOL), options).await?;
        Ok(Self::start(opened, None))
    }

    /// [`Client::connect`] with [`Options`].
    pub async fn connect_with(
        url: &str,
        token: &str,
        options: &Options,
    ) -> Result<(Client, Frame), ClientError> {
        let client = Self::open_with(url, options).await?;
        let connected = client.authenticate(token, DEFAULT_TIMEOUT).await?;
        Ok((client, connected))
    }

    /// [`Client::open`], then `{"op":"connect","id":N,"token":token}`; returns
    /// the `connected` frame. An `error` reply becomes
    /// [`ClientError::Protocol`] (`"code: message"`), a `disconnect` frame or
    /// a close becomes [`ClientError::Closed`].
    pub async fn connect(url: &str, token: &str) -> Result<(Client, Frame), ClientError> {
        Self::connect_from(url, token, None).await
    }

    /// [`Client::connect`] from a given source address, see
    /// [`Client::open_from`].
    pub async fn connect_from(
        url: &str,
        token: &str,
        local_ip: Option<IpAddr>,
    ) -> Result<(Client, Frame), ClientError> {
        let client = Self::open_from(url, local_ip).await?;
        let connected = client.authenticate(token, DEFAULT_TIMEOUT).await?;
        Ok((client, connected))
    }

    /// [`Client::connect_from`] with `tap` looking at every frame first,
    /// from the `connected` reply on: it must leave alone the replies the
    /// caller awaits.
    pub async fn connect_tapped(
        url: &str,
        token: &str,
        local_ip: Option<IpAddr>,
        tap: Tap,
    ) -> Result<(Client, Frame), ClientError> {
        let opened = transport::open_websocket(url, local_ip, Some(SUBPROTOCOL)).await?;
        let client = Self::start(opened, Some(tap));
        let connected = client.authenticate(token, DEFAULT_TIMEOUT).await?;
        Ok((client, connected))
    }

    /// The subprotocol the server selected, `None` if it selected none.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// The socket's local address (shows which source address was used).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether the connection has ended (close frame or lost socket). Frames
    /// received before that can still be read.
    pub fn is_closed(&self) -> bool {
        lock(&self.shared.close).is_some()
    }

    /// Sends a raw text frame: any string, even invalid JSON.
    pub async fn send_text(&self, text: &str) -> Result<(), ClientError> {
        self.write(WsFrame::text(Payload::Owned(text.as_bytes().to_vec())))
            .await
    }

    /// Sends a binary frame, which the protocol does not allow: tests use it
    /// to check the server rejects it.
    pub async fn send_binary(&self, data: &[u8]) -> Result<(), ClientError> {
        self.write(WsFrame::binary(Payload::Owned(data.to_vec())))
            .await
    }

    /// Sends `req` (a JSON object with an `op`) under the next id, replacing
    /// any `id` it has, and waits up to [`DEFAULT_TIMEOUT`] for the frame that
    /// carries that id (`ok`, `pong`, `connected` or `error`), which is
    /// returned as is: checking its `op` is the caller's business. Other
    /// frames arriving meanwhile stay queued for [`Client::next_frame`] and
    /// [`Client::recv_op`].
    pub async fn request(&self, req: Value) -> Result<Frame, ClientError> {
        self.request_timeout(req, DEFAULT_TIMEOUT).await
    }

    /// [`Client::request`] with an explicit timeout. A reply arriving after
    /// the timeout is queued as an unsolicited frame.
    pub async fn request_timeout(
        &self,
        mut req: Value,
        timeout: Duration,
    ) -> Result<Frame, ClientError> {
        let (guard, reply) = self.register(&mut req)?;
        self.write(WsFrame::text(Payload::Owned(req.to_string().into_bytes())))
            .await?;
        match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(_)) => Err(self.shared.closed_error()),
            Err(_) => Err(ClientError::Timeout(format!(
                "no reply to {} (id {}) within {timeout:?}",
                req["op"],
                guard.id()
            ))),
        }
    }

    /// The next unsolicited frame, waiting up to `timeout`; `Ok(None)` if none
    /// came. Once the connection has ended and every frame received before
    /// has been read, returns [`ClientError::Closed`].
    pub async fn next_frame(&self, timeout: Duration) -> Result<Option<Frame>, ClientError> {
        let next = tokio::time::timeout(timeout, async {
            self.inbox.lock().await.recv_where(|_| true).await
        });
        match next.await {
            Err(_) => Ok(None),
            Ok(Some(Ok(frame))) => Ok(Some(frame)),
            Ok(Some(Err(violation))) => Err(ClientError::Protocol(violation)),
            Ok(None) => Err(self.shared.closed_error()),
        }
    }

    /// The next unsolicited frame whose `op` is `op`, waiting up to `timeout`
    /// ([`ClientError::Timeout`] if none came). Frames of other ops are not
    /// dropped: later calls of `next_frame` or `recv_op` still return them,
    /// in arrival order. A protocol violation by the server met on the way is
    /// returned as an error.
    pub async fn recv_op(&self, op: &str, timeout: Duration) -> Result<Frame, ClientError> {
        let wanted = |item: &Incoming| match item {
            Ok(frame) => op_of(frame) == Some(op),
            Err(_) => true,
        };
        let next = tokio::time::timeout(timeout, async {
            self.inbox.lock().await.recv_where(wanted).await
        });
        match next.await {
            Err(_) => Err(ClientError::Timeout(format!(
                "no `{op}` frame within {timeout:?}"
            ))),
            Ok(Some(Ok(frame))) => Ok(frame),
            Ok(Some(Err(violation))) => Err(ClientError::Protocol(violation)),
            Ok(None) => Err(self.shared.closed_error()),
        }
    }

    /// Waits up to `timeout` for the connection to end, and returns the
    /// `disconnect` frame that announced it (if any, and not read already),
    /// and the code and reason of the close frame. `code` is `None` if the
    /// close frame had none or the socket ended without one (the reason then
    /// says what happened). Other frames received meanwhile stay readable.
    pub async fn closed(
        &self,
        timeout: Duration,
    ) -> Result<(Option<Frame>, Option<u16>, String), ClientError> {
        let mut inbox = tokio::time::timeout(timeout, async {
            let mut inbox = self.inbox.lock().await;
            // Moving everything to `held` keeps this cancel-safe and keeps
            // the frames for later reads.
            while let Some(item) = inbox.rx.recv().await {
                inbox.held.push_back(item);
            }
            inbox
        })
        .await
        .map_err(|_| ClientError::Timeout(format!("connection still open after {timeout:?}")))?;
        let disconnect = inbox
            .take_held(|item| matches!(item, Ok(frame) if op_of(frame) == Some("disconnect")))
            .and_then(Result::ok);
        drop(inbox);
        // The reader records how the connection ended before it lets go of
        // the channel, so this is only empty if the reader panicked.
        let info = lock(&self.shared.close).clone().unwrap_or(CloseInfo {
            code: None,
            reason: "the reader stopped unexpectedly".into(),
        });
        Ok((disconnect, info.code, info.reason))
    }

    /// Sends a close frame (1000) and waits up to [`DEFAULT_TIMEOUT`] for the
    /// server to answer it. Closing a connection the server already closed
    /// is not an error.
    pub async fn close(mut self) -> Result<(), ClientError> {
        let frames = [WsFrame::close(1000, b"")];
        self.driver
            .close(&self.shared.close, frames, DEFAULT_TIMEOUT)
            .await
    }

    /// Starts the reader and writer tasks on a socket just opened.
    fn start(opened: transport::Opened, tap: Option<Tap>) -> Client {
        let transport::Opened {
            reader,
            writer: write,
            protocol,
            local_addr,
        } = opened;
        let shared = Arc::new(Shared {
            pending: Waiters::default(),
            close: Mutex::new(None),
        });
        let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
        let reading = shared.clone();
        let driver = Driver::spawn(write, |writer| {
            read_loop(reader, reading, writer, inbox_tx, tap)
        });
        Client {
            shared,
            driver,
            inbox: tokio::sync::Mutex::new(Inbox {
                rx: inbox_rx,
                held: VecDeque::new(),
            }),
            next_id: AtomicU64::new(1),
            protocol,
            local_addr,
        }
    }

    /// Gives `req` the next id and registers a waiter for its reply. The
    /// waiter exists before the request is sent, so the reply cannot overtake
    /// it.
    fn register(
        &self,
        req: &mut Value,
    ) -> Result<(Waiting<'_, Frame>, oneshot::Receiver<Frame>), ClientError> {
        let object = req
            .as_object_mut()
            .filter(|o| o.get("op").is_some_and(Value::is_string))
            .ok_or_else(|| {
                ClientError::Protocol("a request must be a JSON object with a string \"op\"".into())
            })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        object.insert("id".into(), id.into());
        self.shared
            .pending
            .wait(id)
            .ok_or_else(|| self.shared.closed_error())
    }

    async fn authenticate(&self, token: &str, timeout: Duration) -> Result<Frame, ClientError> {
        let mut req = json!({"op": "connect", "token": token});
        let (_guard, mut reply) = self.register(&mut req)?;
        self.write(WsFrame::text(Payload::Owned(req.to_string().into_bytes())))
            .await?;

        // A refusal may come as a reply (`error` with our id) or unsolicited
        // (`disconnect`, or `error` without id), so watch both.
        let refusal = |item: &Incoming| match item {
            Ok(frame) => match op_of(frame) {
                Some("disconnect") => true,
                Some("error") => frame.get("id").is_none(),
                _ => false,
            },
            Err(_) => true,
        };
        let mut inbox = self.inbox.lock().await;
        let outcome = tokio::time::timeout(timeout, async {
            tokio::select! {
                // A disconnect frame is queued before the reader stops and
                // drops `reply`, so polling the inbox first reports the
                // server's reason rather than a bare close.
                biased;
                item = inbox.recv_where(refusal) => item,
                frame = &mut reply => frame.ok().map(Ok),
            }
        })
        .await;
        drop(inbox);
        let frame = match outcome {
            Err(_) => {
                return Err(ClientError::Timeout(format!(
                    "no answer to connect within {timeout:?}"
                )));
            }
            Ok(None) => return Err(self.shared.closed_error()),
            Ok(Some(Err(violation))) => return Err(ClientError::Protocol(violation)),
            Ok(Some(Ok(frame))) => frame,
        };
        match op_of(&frame) {
            Some("connected") => Ok(frame),
            Some("error") => Err(ClientError::Protocol(format!(
                "{}: {}",
                frame["code"].as_str().unwrap_or("?"),
                frame["message"].as_str().unwrap_or("")
            ))),
            Some("disconnect") => Err(ClientError::Closed {
                code: frame["code"].as_u64().and_then(|c| u16::try_from(c).ok()),
                reason: frame["reason"].as_str().unwrap_or("").to_owned(),
            }),
            _ => Err(ClientError::Protocol(format!(
                "unexpected answer to connect: {frame}"
            ))),
        }
    }

    async fn write(&self, frame: WsFrame<'static>) -> Result<(), ClientError> {
        self.driver.write(&self.shared.close, frame).await
    }
}

async fn read_loop(
    mut ws: Reader,
    shared: Arc<Shared>,
    writer: mpsc::UnboundedSender<WriteCmd>,
    inbox: mpsc::UnboundedSender<Incoming>,
    tap: Option<Tap>,
) {
    let info = transport::read_messages(&mut ws, &writer, tap.as_ref(), |message| {
        let violation = match message {
            Message::Text(text) => match serde_json::from_slice::<Frame>(text) {
                Ok(value) => {
                    deliver(&shared, &inbox, value);
                    return ControlFlow::Continue(());
                }
                Err(e) => {
                    let text = String::from_utf8_lossy(text);
                    let shown: String = text.chars().take(200).collect();
                    format!("server sent a text frame that is not JSON ({e}): {shown:?}")
                }
            },
            Message::Binary(data) => {
                format!("server sent a binary frame ({} bytes)", data.len())
            }
        };
        let _ = inbox.send(Err(violation));
        ControlFlow::Continue(())
    })
    .await;
    *lock(&shared.close) = Some(info);
    // Dropping the waiters wakes every pending request; they find the close
    // info recorded just above.
    shared.pending.close();
}

/// Hands a frame to the request waiting for its id, else queues it.
fn deliver(shared: &Shared, inbox: &mpsc::UnboundedSender<Incoming>, frame: Frame) {
    let waiter = frame
        .get("id")
        .and_then(Value::as_u64)
        .and_then(|id| shared.pending.take(id));
    let frame = match waiter {
        // The waiter may have timed out since; then the late reply is kept
        // like any other frame.
        Some(waiter) => match waiter.send(frame) {
            Ok(()) => return,
            Err(frame) => frame,
        },
        None => frame,
    };
    let _ = inbox.send(Ok(frame));
}
