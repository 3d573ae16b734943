//! The WebSocket transport under [`Client`](crate::Client), public so that
//! other protocol clients (the benchmarks' Socket.IO client) open and drive
//! their sockets exactly the same way, with the same costs and the same
//! [`ClientError`]s.
//!
//! [`open_websocket`] does the TCP connect (optionally from a chosen source
//! address, always with `TCP_NODELAY`), TLS for `wss://` ([`open_websocket_with`])
//! and the HTTP/1 upgrade (httparse reads the response),
//! and splits the socket into a [`Reader`] and a [`Writer`]. The caller then
//! runs the writer under [`write_loop`], feeding it [`WriteCmd`]s (or
//! [`write_frame`] for one frame and its outcome), and reads the messages
//! with [`read_messages`] until the connection ends.
//! A [`Driver`] runs both tasks for a client handle, and [`Waiters`] hands
//! each answer the read loop sees to the caller waiting for its id.
//!
//! ```no_run
//! # async fn demo() -> Result<(), herald_client::ClientError> {
//! use herald_client::transport::{WriteCmd, open_websocket, write_loop};
//! use fastwebsockets::{Frame, Payload};
//! use tokio::sync::{mpsc, oneshot};
//!
//! let opened = open_websocket("ws://127.0.0.1:8080/ws", None, Some("herald.v1")).await?;
//! let (commands, rx) = mpsc::unbounded_channel();
//! tokio::spawn(write_loop(opened.writer, rx));
//! let (ack, acked) = oneshot::channel();
//! let frame = Frame::text(Payload::Owned(b"{}".to_vec()));
//! let _ = commands.send(WriteCmd { frame, ack: Some(ack) });
//! let _written = acked.await;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Cursor;
use std::net::{IpAddr, SocketAddr};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use fastwebsockets::{
    FragmentCollectorRead, Frame, OpCode, Role, WebSocket, WebSocketError, WebSocketWrite,
};
use hyper::Uri;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, Chain};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_rustls::rustls;

use crate::{ClientError, OPEN_TIMEOUT, Tap};

/// The upgraded connection both halves share, plain or TLS.
pub type Stream = Box<dyn Io>;

/// The read half of an open WebSocket; it reassembles fragmented messages.
/// What the upgrade read past the response's head comes first.
pub type Reader = FragmentCollectorRead<Chain<Cursor<Vec<u8>>, tokio::io::ReadHalf<Stream>>>;

/// The write half of an open WebSocket; drive it with [`write_loop`].
pub type Writer = WebSocketWrite<tokio::io::WriteHalf<Stream>>;

/// A WebSocket that completed its opening handshake.
pub struct Opened {
    pub reader: Reader,
    pub writer: Writer,
    /// The subprotocol the server selected, `None` if it selected none.
    pub protocol: Option<String>,
    /// The socket's local address (shows which source address was used).
    pub local_addr: SocketAddr,
}

/// What an opening may add to a plain `ws://` connection.
#[derive(Clone, Default)]
pub struct Options {
    /// The upgrade request's `Origin` header, as a browser showing a page
    /// of that origin would send it.
    pub origin: Option<String>,
    /// For `wss://` URLs: the TLS settings (which certificates to trust).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Opens a WebSocket to `url` (`ws://` or `http://`, host, optional port and
/// path with query), from `local_ip` if given (port chosen by the OS),
/// offering `subprotocol` if given. `wss://` needs
/// [`open_websocket_with`]. The whole opening (resolve, TCP connect,
/// HTTP upgrade) may take [`OPEN_TIMEOUT`], then fails with
/// [`ClientError::Timeout`].
///
/// A response other than `101 Switching Protocols` is
/// [`ClientError::Rejected`]; a 101 without `Upgrade: websocket` and
/// `Connection: upgrade`, or selecting a subprotocol other than the one
/// offered, is [`ClientError::Connect`]. TCP failures are
/// [`ClientError::Io`].
pub async fn open_websocket(
    url: &str,
    local_ip: Option<IpAddr>,
    subprotocol: Option<&str>,
) -> Result<Opened, ClientError> {
    open_websocket_with(url, local_ip, subprotocol, &Options::default()).await
}

/// [`open_websocket`] with [`Options`]: an `Origin` header, and TLS for
/// `wss://` (or `https://`) URLs.
pub async fn open_websocket_with(
    url: &str,
    local_ip: Option<IpAddr>,
    subprotocol: Option<&str>,
    options: &Options,
) -> Result<Opened, ClientError> {
    tokio::time::timeout(
        OPEN_TIMEOUT,
        open_inner(url, local_ip, subprotocol, options),
    )
    .await
    .map_err(|_| ClientError::Timeout(format!("opening {url} took over {OPEN_TIMEOUT:?}")))?
}

async fn open_inner(
    url: &str,
    local_ip: Option<IpAddr>,
    subprotocol: Option<&str>,
    options: &Options,
) -> Result<Opened, ClientError> {
    let target = Target::parse(url)?;
    let tls = match (&options.tls, target.tls) {
        (Some(config), true) => Some(config.clone()),
        (None, true) => {
            return Err(ClientError::Connect(format!(
                "{url}: wss:// needs TLS settings (Options::tls, the certificates to trust)"
            )));
        }
        (_, false) => None,
    };
    let tcp = dial(&target.host, target.port, local_ip).await?;
    let local_addr = tcp.local_addr()?;
    // Requests are small and latency is what tests and benchmarks measure.
    tcp.set_nodelay(true)?;
    let Some(config) = tls else {
        return upgrade(tcp, &target, local_addr, subprotocol, options).await;
    };
    // An IPv6 literal without its URL brackets.
    let host = target.host.trim_start_matches('[').trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| ClientError::Connect(format!("{url}: {e}")))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| ClientError::Connect(format!("TLS handshake with {url}: {e}")))?;
    upgrade(tls, &target, local_addr, subprotocol, options).await
}

/// The HTTP/1 upgrade on an open connection, plain or TLS: one request
/// written, the response's head read and checked. Done by hand (httparse
/// reads the head) rather than with hyper's client, whose connection task
/// and upgrade channels cost a task and several wakeups per connection: a
/// benchmark's load generator opens thousands a second, on the cores the
/// servers it measures run on. Bytes the server sent after the head (a
/// Socket.IO server's `open` packet) are the first the [`Reader`] reads.
async fn upgrade<S>(
    io: S,
    target: &Target,
    local_addr: SocketAddr,
    subprotocol: Option<&str>,
    options: &Options,
) -> Result<Opened, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut io: Stream = Box::new(io);
    let mut request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n",
        target.path,
        target.authority,
        fastwebsockets::handshake::generate_key(),
    );
    for (name, value) in [
        ("Sec-WebSocket-Protocol", subprotocol),
        ("Origin", options.origin.as_deref()),
    ] {
        if let Some(value) = value {
            if value.bytes().any(|b| b == b'\r' || b == b'\n') {
                return Err(ClientError::Connect(format!(
                    "the {name} header {value:?} holds a line break"
                )));
            }
            request.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    request.push_str("\r\n");
    io.write_all(request.as_bytes())
        .await
        .map_err(|e| ClientError::Connect(format!("upgrade request: {e}")))?;
    io.flush()
        .await
        .map_err(|e| ClientError::Connect(format!("upgrade request: {e}")))?;

    let (head, after_head) = read_head(&mut io).await?;
    if head.status != 101 {
        return Err(ClientError::Rejected {
            status: head.status,
        });
    }
    let header = |name: &str| {
        head.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let upgrade_ok = header("upgrade").is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    let connection_ok = header("connection").is_some_and(|v| {
        v.split(',')
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
    });
    if !upgrade_ok || !connection_ok {
        return Err(ClientError::Connect(
            "101 response without Upgrade: websocket / Connection: upgrade".into(),
        ));
    }
    let protocol = header("sec-websocket-protocol").map(str::to_owned);
    // A browser fails the connection when the server picks a subprotocol it
    // did not offer, so the tests should notice too. Without an offer the
    // header is only reported.
    if let (Some(offered), Some(p)) = (subprotocol, &protocol)
        && p != offered
    {
        return Err(ClientError::Connect(format!(
            "server selected subprotocol {p:?}, only {offered:?} was offered"
        )));
    }

    // Split here, so that the leftover can be put in front of the read half;
    // `join` only carries both halves to fastwebsockets' own split.
    let (read, write) = tokio::io::split(io);
    let read = Cursor::new(after_head).chain(read);
    let ws = WebSocket::after_handshake(tokio::io::join(read, write), Role::Client);
    let (read, writer) = ws.split(tokio::io::Join::into_inner);
    Ok(Opened {
        reader: FragmentCollectorRead::new(read),
        writer,
        protocol,
        local_addr,
    })
}

/// The longest response head accepted; longer is a broken server.
const MAX_HEAD: usize = 16 * 1024;

/// The status and headers of an HTTP response.
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

/// Reads a response's head; returns it and the bytes read past it.
async fn read_head(io: &mut Stream) -> Result<(Head, Vec<u8>), ClientError> {
    let broken = |why: String| ClientError::Connect(format!("upgrade response: {why}"));
    // A 101's head is a few hundred bytes: one read, as a rule.
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(1024);
        }
        let n = io
            .read_buf(&mut buf)
            .await
            .map_err(|e| broken(e.to_string()))?;
        if n == 0 {
            return Err(broken("the server closed the connection".into()));
        }
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut slots);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let head = Head {
                    status: response.code.unwrap_or_default(),
                    headers: response
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                };
                return Ok((head, buf.split_off(len)));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(broken(format!("its head is longer than {MAX_HEAD} bytes")));
            }
            Err(e) => return Err(broken(e.to_string())),
        }
    }
}

/// A connection's byte stream, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The parts of a `ws://` or `wss://` URL the handshake needs.
struct Target {
    tls: bool,
    host: String,
    port: u16,
    authority: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, ClientError> {
        let bad = |why: &str| ClientError::Connect(format!("bad URL {url:?}: {why}"));
        let uri: Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        let tls = match uri.scheme_str() {
            Some("ws" | "http") => false,
            Some("wss" | "https") => true,
            Some(other) => {
                return Err(bad(&format!(
                    "scheme {other:?} is not supported, use ws:// or wss://"
                )));
            }
            None => return Err(bad("no scheme, use ws://host:port/ws")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        Ok(Target {
            tls,
            host: authority.host().to_owned(),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            authority: authority.as_str().to_owned(),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        })
    }
}

async fn dial(host: &str, port: u16, local_ip: Option<IpAddr>) -> Result<TcpStream, ClientError> {
    // The string form, because it accepts bracketed IPv6 literals.
    let addrs = tokio::net::lookup_host(format!("{host}:{port}")).await?;
    let mut last_error = None;
    for addr in addrs {
        if local_ip.is_some_and(|ip| ip.is_ipv4() != addr.is_ipv4()) {
            continue;
        }
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = local_ip {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        match socket.connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.map_or_else(
        || ClientError::Connect(format!("{host} has no address usable from {local_ip:?}")),
        ClientError::Io,
    ))
}

/// A frame for [`write_loop`] to send.
pub struct WriteCmd {
    pub frame: Frame<'static>,
    /// Receives the outcome of the write (and flush); `None` for the pongs
    /// and close echoes a reader owes the server: nobody waits for those.
    pub ack: Option<oneshot::Sender<Result<(), WebSocketError>>>,
}

/// Writes the frames of `commands` in order, flushing after each, until every
/// sender is gone. Once a close frame was written nothing more is (RFC 6455
/// 5.5.1): later commands are answered with
/// [`WebSocketError::ConnectionClosed`].
pub async fn write_loop(mut ws: Writer, mut commands: mpsc::UnboundedReceiver<WriteCmd>) {
    let mut close_sent = false;
    while let Some(WriteCmd { frame, ack }) = commands.recv().await {
        // Nothing may follow a close frame, not even the echo the reader owes
        // when the server answers our close.
        let result = if close_sent {
            Err(WebSocketError::ConnectionClosed)
        } else {
            close_sent = frame.opcode == OpCode::Close;
            match ws.write_frame(frame).await {
                Ok(()) => ws.flush().await,
                Err(e) => Err(e),
            }
        };
        if let Some(ack) = ack {
            let _ = ack.send(result);
        }
    }
}

/// The two tasks that drive an open WebSocket, [`write_loop`] and the
/// client's own read loop, and the way to the first: what a protocol
/// client's handle holds. Dropping it aborts both, so a dropped handle leaves
/// nothing running (and sends no close frame).
pub struct Driver {
    writer: mpsc::UnboundedSender<WriteCmd>,
    reader_task: JoinHandle<()>,
    writer_task: JoinHandle<()>,
}

impl Driver {
    /// Runs `ws` under [`write_loop`], and the read loop that `read` makes of
    /// a sender of write commands (for the pongs and close echoes it owes).
    pub fn spawn<R>(ws: Writer, read: impl FnOnce(mpsc::UnboundedSender<WriteCmd>) -> R) -> Driver
    where
        R: Future<Output = ()> + Send + 'static,
    {
        let (writer, commands) = mpsc::unbounded_channel();
        let writer_task = tokio::spawn(write_loop(ws, commands));
        let reader_task = tokio::spawn(read(writer.clone()));
        Driver {
            writer,
            reader_task,
            writer_task,
        }
    }

    /// [`write_frame`] on this connection.
    pub async fn write(
        &self,
        close: &Mutex<Option<CloseInfo>>,
        frame: Frame<'static>,
    ) -> Result<(), ClientError> {
        write_frame(&self.writer, close, frame).await
    }

    /// Writes `frames` (a close frame last) and waits up to `timeout` for the
    /// read loop to end with the server's echo: that completes the closing
    /// handshake, where dropping right away would reset the socket under the
    /// server and make it log an abnormal closure. A connection the server
    /// already closed is not an error.
    pub async fn close(
        &mut self,
        close: &Mutex<Option<CloseInfo>>,
        frames: impl IntoIterator<Item = Frame<'static>>,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        for frame in frames {
            match self.write(close, frame).await {
                Ok(()) => {}
                Err(ClientError::Closed { .. }) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        tokio::time::timeout(timeout, &mut self.reader_task)
            .await
            .map(drop)
            .map_err(|_| {
                ClientError::Timeout(format!(
                    "server did not answer the close frame within {timeout:?}"
                ))
            })
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.reader_task.abort();
        self.writer_task.abort();
    }
}

/// Sends `frame` through `writer` (the commands of a [`write_loop`]) and
/// waits until it is written. `close` is where the read loop records how the
/// connection ended: a write failing because the server closed is reported
/// as that close, which is what the caller needs to know.
pub async fn write_frame(
    writer: &mpsc::UnboundedSender<WriteCmd>,
    close: &Mutex<Option<CloseInfo>>,
    frame: Frame<'static>,
) -> Result<(), ClientError> {
    let is_closed = || {
        close
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    };
    if is_closed() {
        return Err(closed_error(close));
    }
    let (ack, acked) = oneshot::channel();
    if writer
        .send(WriteCmd {
            frame,
            ack: Some(ack),
        })
        .is_err()
    {
        return Err(closed_error(close));
    }
    match acked.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) if is_closed() => Err(closed_error(close)),
        Ok(Err(WebSocketError::IoError(e))) => Err(ClientError::Io(e)),
        Ok(Err(WebSocketError::ConnectionClosed)) | Err(_) => Err(connection_closed()),
        Ok(Err(e)) => Err(ClientError::Protocol(e.to_string())),
    }
}

/// The close recorded in `close` as an error, or a bare "connection closed"
/// while none is.
pub fn closed_error(close: &Mutex<Option<CloseInfo>>) -> ClientError {
    close
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map_or_else(connection_closed, CloseInfo::to_error)
}

fn connection_closed() -> ClientError {
    ClientError::Closed {
        code: None,
        reason: "connection closed".into(),
    }
}

/// A whole data message from the server, for [`read_messages`].
pub enum Message<'a> {
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

/// Reads `ws` until the connection ends, and returns how it did: the
/// server's close frame, the socket lost without one, or what `on_message`
/// ended it with. Each text message goes to `tap` first (one it takes goes
/// no further), then, like each binary one, to `on_message`. The pongs and
/// close echoes the server is owed are queued on `writer`, not awaited: the
/// reader must keep draining the socket even while a large write is in
/// progress.
pub async fn read_messages(
    ws: &mut Reader,
    writer: &mpsc::UnboundedSender<WriteCmd>,
    tap: Option<&Tap>,
    on_message: impl FnMut(Message<'_>) -> ControlFlow<CloseInfo>,
) -> CloseInfo {
    read_messages_noting_pings(ws, writer, tap, || {}, on_message).await
}

/// [`read_messages`], calling `on_ping` for each ping from the server (once
/// its pong is queued). A client that watches its connection for silence
/// counts the server's pings as signs of life, which the messages alone
/// would not show on a quiet connection.
pub async fn read_messages_noting_pings(
    ws: &mut Reader,
    writer: &mpsc::UnboundedSender<WriteCmd>,
    tap: Option<&Tap>,
    mut on_ping: impl FnMut(),
    mut on_message: impl FnMut(Message<'_>) -> ControlFlow<CloseInfo>,
) -> CloseInfo {
    let mut obligated = |frame: Frame<'static>| {
        let pong = frame.opcode == OpCode::Pong;
        let _ = writer.send(WriteCmd { frame, ack: None });
        if pong {
            on_ping();
        }
        std::future::ready(Ok::<(), Infallible>(()))
    };
    loop {
        let frame = match ws.read_frame(&mut obligated).await {
            Ok(frame) => frame,
            Err(e) => {
                return CloseInfo {
                    code: None,
                    reason: format!("connection lost without a close frame: {e}"),
                };
            }
        };
        let flow = match frame.opcode {
            OpCode::Text if tap.is_some_and(|tap| tap(&frame.payload)) => ControlFlow::Continue(()),
            OpCode::Text => on_message(Message::Text(&frame.payload)),
            OpCode::Binary => on_message(Message::Binary(&frame.payload)),
            OpCode::Close => return parse_close(&frame.payload),
            // Pings are answered by fastwebsockets; pongs need nothing.
            _ => ControlFlow::Continue(()),
        };
        if let ControlFlow::Break(info) = flow {
            return info;
        }
    }
}

/// Callers waiting for the answer that carries their id (a Herald request's
/// reply, a Socket.IO ack), shared by a client handle and its read loop. The
/// read loop [`close`](Waiters::close)s it when it stops: every waiting
/// caller wakes, and one that comes later fails at once instead of waiting
/// out its timeout.
pub struct Waiters<T> {
    by_id: Mutex<Option<HashMap<u64, oneshot::Sender<T>>>>,
}

impl<T> Default for Waiters<T> {
    fn default() -> Self {
        Waiters {
            by_id: Mutex::new(Some(HashMap::new())),
        }
    }
}

impl<T> Waiters<T> {
    /// Nothing under the lock can panic half-way, so a poisoned lock still
    /// holds consistent data.
    fn by_id(&self) -> MutexGuard<'_, Option<HashMap<u64, oneshot::Sender<T>>>> {
        self.by_id.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for the answer `id`: registered before the question is sent, so
    /// the answer cannot overtake it, and unregistered however the wait ends
    /// (when the guard drops). `None` once closed.
    pub fn wait(&self, id: u64) -> Option<(Waiting<'_, T>, oneshot::Receiver<T>)> {
        let (tx, rx) = oneshot::channel();
        self.by_id().as_mut()?.insert(id, tx);
        Some((Waiting { waiters: self, id }, rx))
    }

    /// The caller waiting for `id`, if there is one.
    pub fn take(&self, id: u64) -> Option<oneshot::Sender<T>> {
        self.by_id().as_mut()?.remove(&id)
    }

    /// Wakes every waiting caller and refuses new ones.
    pub fn close(&self) {
        self.by_id().take();
    }
}

/// A caller's registration in [`Waiters`]; dropping it removes the entry.
pub struct Waiting<'a, T> {
    waiters: &'a Waiters<T>,
    id: u64,
}

impl<T> Waiting<'_, T> {
    /// The id whose answer is awaited.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl<T> Drop for Waiting<'_, T> {
    fn drop(&mut self) {
        self.waiters.take(self.id);
    }
}

/// How a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseInfo {
    /// The close frame's status code; `None` when the frame carried none or
    /// the connection ended without one.
    pub code: Option<u16>,
    /// The close frame's reason, or what happened instead.
    pub reason: String,
}

impl CloseInfo {
    /// The matching [`ClientError::Closed`].
    pub fn to_error(&self) -> ClientError {
        ClientError::Closed {
            code: self.code,
            reason: self.reason.clone(),
        }
    }
}

/// The code and reason of a close frame's payload (an empty or one-byte
/// payload has neither).
pub fn parse_close(payload: &[u8]) -> CloseInfo {
    match payload {
        [hi, lo, reason @ ..] => CloseInfo {
            code: Some(u16::from_be_bytes([*hi, *lo])),
            reason: String::from_utf8_lossy(reason).into_owned(),
        },
        _ => CloseInfo {
            code: None,
            reason: String::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_payloads() {
        let mut payload = 4001u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        assert_eq!(
            parse_close(&payload),
            CloseInfo {
                code: Some(4001),
                reason: "bye".into()
            }
        );
        assert_eq!(parse_close(&[3]).code, None);
        assert_eq!(parse_close(&[]).reason, "");
    }

    #[test]
    fn urls() {
        let t = Target::parse("ws://127.0.0.1:9/ws?token=x").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 9));
        assert_eq!(t.authority, "127.0.0.1:9");
        assert_eq!(t.path, "/ws?token=x");
        assert_eq!(Target::parse("http://h").unwrap().port, 80);
        let tls = Target::parse("wss://h/ws").unwrap();
        assert!(tls.tls);
        assert_eq!(tls.port, 443);
        assert!(!t.tls);
        assert!(matches!(
            Target::parse("ftp://h/ws"),
            Err(ClientError::Connect(m)) if m.contains("\"ftp\" is not supported")
        ));
        assert!(Target::parse("/ws").is_err());
    }
}
