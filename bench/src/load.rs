//! Opening client connections for load: edges and source addresses in turn;
//! requests whose answer must be `ok`, and how they failed.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use herald_client::{Client, ClientError, Frame, Tap};
use serde_json::{Value, json};

use crate::report::Errors;
use crate::socketio::{self, SioClient};

/// How long a worker pauses after a failed connect before it tries again,
/// so that a refusing server is not hammered in a tight loop.
pub const ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Opens connections to the edges of the target, each from the next of the
/// source addresses (127.0.0.2, 127.0.0.3, ...): one source address has
/// only ~28k ephemeral ports, and churn leaves sockets in TIME_WAIT.
pub struct Dialer {
    urls: Vec<String>,
    sources: Vec<IpAddr>,
    next_source: AtomicUsize,
}

impl Dialer {
    pub fn new(urls: Vec<String>, sources: Vec<IpAddr>) -> Dialer {
        assert!(!urls.is_empty() && !sources.is_empty());
        Dialer {
            urls,
            sources,
            next_source: AtomicUsize::new(0),
        }
    }

    pub fn edges(&self) -> usize {
        self.urls.len()
    }

    /// Connects to edge `edge % edges` and authenticates with `token`;
    /// returns the client and its `connected` frame.
    pub async fn connect(&self, edge: usize, token: &str) -> Result<(Client, Frame), ClientError> {
        Client::connect_from(self.url(edge), token, Some(self.source())).await
    }

    /// [`Dialer::connect`] with `tap` seeing every frame first.
    pub async fn connect_tapped(
        &self,
        edge: usize,
        token: &str,
        tap: Tap,
    ) -> Result<(Client, Frame), ClientError> {
        Client::connect_tapped(self.url(edge), token, Some(self.source()), tap).await
    }

    /// The URL of edge `edge % edges` and the next source address: for
    /// clients of other protocols (the Socket.IO peer's), dialled the same way.
    pub fn endpoint(&self, edge: usize) -> (&str, IpAddr) {
        (self.url(edge), self.source())
    }

    fn url(&self, edge: usize) -> &str {
        &self.urls[edge % self.urls.len()]
    }

    /// The next source address, in turn.
    fn source(&self) -> IpAddr {
        let i = self.next_source.fetch_add(1, Ordering::Relaxed);
        self.sources[i % self.sources.len()]
    }
}

/// Where a sequence of requests (connect, join, ...) failed, and why.
pub struct Failed {
    pub stage: &'static str,
    pub why: Why,
}

pub enum Why {
    Client(ClientError),
    /// An answer other than `ok` (Herald's `error` frame, a Socket.IO ack
    /// without `ok: true`).
    Reply(Value),
}

impl Failed {
    pub fn client(stage: &'static str) -> impl FnOnce(ClientError) -> Failed {
        move |e| Failed {
            stage,
            why: Why::Client(e),
        }
    }

    pub fn count(&self, errors: &mut Errors) {
        match &self.why {
            Why::Client(e) => errors.add(self.stage, e),
            Why::Reply(reply) => errors.add_reply(self.stage, reply),
        }
    }
}

/// `req`'s reply, unless it is not `ok`.
pub async fn request_ok(client: &Client, stage: &'static str, req: Value) -> Result<(), Failed> {
    match client.request(req).await {
        Ok(reply) if reply["op"] == "ok" => Ok(()),
        Ok(reply) => Err(Failed {
            stage,
            why: Why::Reply(reply),
        }),
        Err(e) => Err(Failed::client(stage)(e)),
    }
}

/// Emits `event` (`join` or `leave`) for `room` and checks the peer's ack.
pub async fn sio_ack(client: &SioClient, event: &'static str, room: &str) -> Result<(), Failed> {
    let ack = client
        .emit_with_ack(event, &[json!(room)], socketio::DEFAULT_TIMEOUT)
        .await
        .map_err(Failed::client(event))?;
    match ack.first() {
        Some(reply) if reply["ok"] == true => Ok(()),
        _ => Err(Failed {
            stage: event,
            why: Why::Reply(json!({ "code": "unexpected ack", "ack": ack })),
        }),
    }
}
