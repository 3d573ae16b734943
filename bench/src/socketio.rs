//! The comparison peer: a Socket.IO 4 cluster (Node, `@socket.io/redis-adapter`)
//! started from `bench/peers/socketio/`, and a minimal Socket.IO v4 /
//! Engine.IO v4 client that drives it.
//!
//! The client speaks only what the bench needs: the WebSocket transport (no
//! long-polling, so no sticky sessions), the root namespace, text packets
//! (no binary attachments). It opens and writes its socket with
//! `herald-client`'s own transport ([`herald_client::transport`]: TCP from a
//! chosen source address, `TCP_NODELAY`, hyper's HTTP/1 upgrade,
//! fastwebsockets 0.10 with a reader task and a writer task) and parses every
//! text frame as JSON, like `herald-client`, so that Herald and Socket.IO are
//! driven with the same client costs. Errors are
//! [`herald_client::ClientError`]s, so the bench tallies them the same way.
//!
//! Wire format (Engine.IO v4 packet type, then for a message the Socket.IO
//! packet type, optional ack id, JSON):
//!
//! ```text
//! server: 0{"sid":..,"pingInterval":..}    Engine.IO open
//! client: 40{"token":"<jwt>","rooms":"a,b"} Socket.IO CONNECT with auth
//! server: 40{"sid":".."}                   connected (44{"message":..}: refused)
//! server: 2            client: 3           heartbeat (the server pings)
//! server: 42["msg",{..}]                   event → the client's callback
//! client: 421["join","room"]               event with ack id 1
//! server: 431[{"ok":true,"rooms":[..]}]    its ack
//! client: 41, then a close frame           disconnect
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream as StdTcpStream, ToSocketAddrs};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use fastwebsockets::{Frame as WsFrame, Payload};
use herald_client::transport::{
    self, CloseInfo, Driver, Message, Reader, Waiters, WriteCmd, open_websocket,
};
use herald_client::{ClientError, Tap};
use herald_test_support::{ChildProcess, die_with_parent};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

/// How long the Socket.IO handshake (Engine.IO open, then CONNECT) and an
/// ack may take; the same as `herald_client::DEFAULT_TIMEOUT`.
pub const DEFAULT_TIMEOUT: Duration = herald_client::DEFAULT_TIMEOUT;

/// How long opening a socket (TCP connect plus HTTP upgrade) may take; the
/// same as `herald_client::OPEN_TIMEOUT`.
pub const OPEN_TIMEOUT: Duration = herald_client::OPEN_TIMEOUT;

/// How long a peer process may take to print that it listens.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The Engine.IO URL of a Socket.IO server on `addr`, WebSocket transport.
pub fn engine_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/socket.io/?EIO=4&transport=websocket")
}

/// Microseconds since the Unix epoch, the unit of the emitter's `ts_us`.
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// An event the server sent (`42["name", args...]`), with when it arrived.
#[derive(Debug, Clone)]
pub struct SioEvent {
    pub name: String,
    /// The arguments after the name (for the emitter's `msg`: one object
    /// `{"seq", "ts_us", "pad"}`).
    pub args: Vec<Value>,
    /// When the reader parsed the frame.
    pub received: Instant,
    /// The same moment as wall-clock µs since the Unix epoch, to compare with
    /// the emitter's `ts_us` (same machine, same clock).
    pub received_unix_us: u64,
}

impl SioEvent {
    /// The first argument, `Null` if there is none.
    pub fn data(&self) -> &Value {
        self.args.first().unwrap_or(&Value::Null)
    }

    /// Emitter send time → receive time, from the payload's `ts_us`.
    pub fn latency(&self) -> Option<Duration> {
        let sent = self.data().get("ts_us")?.as_u64()?;
        Some(Duration::from_micros(
            self.received_unix_us.saturating_sub(sent),
        ))
    }
}

/// Called by a connection's reader task for every event, in arrival order;
/// it runs on the reader task, so it must be quick (count, record, or send
/// into a channel).
pub type OnEvent = Arc<dyn Fn(SioEvent) + Send + Sync>;

/// A callback that drops every event.
pub fn ignore_events() -> OnEvent {
    Arc::new(|_| {})
}

/// A callback that sends every event into a channel, and its receiver.
pub fn event_channel() -> (OnEvent, mpsc::UnboundedReceiver<SioEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Arc::new(move |event| {
            let _ = tx.send(event);
        }),
        rx,
    )
}

/// What the reader reports while the handshake waits.
enum Control {
    /// Engine.IO open packet (`0{...}`).
    Open(Value),
    /// Socket.IO CONNECT answered (`40{"sid":..}`).
    Connected(Value),
    /// Socket.IO CONNECT refused (`44{"message":..}`).
    ConnectError(Value),
}

struct Shared {
    /// Acks awaited, by id; `None` once the reader stopped.
    acks: Waiters<Vec<Value>>,
    close: Mutex<Option<CloseInfo>>,
    /// The first thing the server sent that this client does not understand.
    violation: Mutex<Option<String>>,
    /// Set by the reader when it stops, after `close`: what
    /// [`SioClient::closed`] waits for.
    ended: watch::Sender<bool>,
}

impl Shared {
    fn closed_error(&self) -> ClientError {
        transport::closed_error(&self.close)
    }

    fn violate(&self, what: String) {
        lock(&self.violation).get_or_insert(what);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A Socket.IO connection (root namespace, WebSocket transport). Dropping it
/// aborts the connection without a close frame; [`SioClient::close`] ends it
/// properly.
pub struct SioClient {
    shared: Arc<Shared>,
    driver: Driver,
    next_ack: AtomicU64,
    engine_sid: String,
    sid: String,
    local_addr: SocketAddr,
}

impl std::fmt::Debug for SioClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SioClient")
            .field("sid", &self.sid)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl SioClient {
    /// Opens `url` (see [`engine_url`]) from `local_ip` (port chosen by the
    /// OS), waits for the Engine.IO open packet, sends the Socket.IO CONNECT
    /// packet with `auth` as its payload (e.g. `{"token":"<jwt>","rooms":"a,b"}`,
    /// the token from [`SocketIoPeer::token`]; the peer's server joins the
    /// connection to `rooms` before it answers)
    /// and waits for the answer. Every event the server sends from then on
    /// goes to `on_event`.
    pub async fn connect(
        url: &str,
        auth: &Value,
        local_ip: Option<IpAddr>,
        on_event: OnEvent,
    ) -> Result<SioClient, ClientError> {
        Self::connect_with(url, auth, local_ip, on_event, None).await
    }

    /// [`SioClient::connect`] with `tap` seeing each Engine.IO message
    /// (`42["name",...]`) unparsed first, as [`herald_client::Client`]'s tap
    /// does for Herald, so that both clients cost the same per frame. Events
    /// it takes do not reach `on_event`.
    pub async fn connect_tapped(
        url: &str,
        auth: &Value,
        local_ip: Option<IpAddr>,
        tap: Tap,
    ) -> Result<SioClient, ClientError> {
        Self::connect_with(url, auth, local_ip, ignore_events(), Some(tap)).await
    }

    async fn connect_with(
        url: &str,
        auth: &Value,
        local_ip: Option<IpAddr>,
        on_event: OnEvent,
        tap: Option<Tap>,
    ) -> Result<SioClient, ClientError> {
        // `open_websocket` gives up after `OPEN_TIMEOUT`.
        let opened = open_websocket(url, local_ip, None).await?;
        let (mut client, mut control) = Self::start(opened, on_event, tap);
        let handshake = async {
            let open = match control.recv().await {
                Some(Control::Open(open)) => open,
                Some(_) => {
                    return Err(ClientError::Protocol(
                        "Socket.IO packet before the Engine.IO open packet".into(),
                    ));
                }
                None => return Err(client.failure()),
            };
            client.engine_sid = open["sid"].as_str().unwrap_or_default().to_owned();
            client.send_text(format!("40{auth}")).await?;
            match control.recv().await {
                Some(Control::Connected(reply)) => {
                    client.sid = reply["sid"].as_str().unwrap_or_default().to_owned();
                    Ok(())
                }
                Some(Control::ConnectError(reply)) => Err(ClientError::Protocol(format!(
                    "connect refused: {}",
                    reply["message"].as_str().unwrap_or(&reply.to_string())
                ))),
                Some(Control::Open(_)) => Err(ClientError::Protocol(
                    "a second Engine.IO open packet".into(),
                )),
                None => Err(client.failure()),
            }
        };
        tokio::time::timeout(DEFAULT_TIMEOUT, handshake)
            .await
            .map_err(|_| {
                ClientError::Timeout(format!("no Socket.IO handshake within {DEFAULT_TIMEOUT:?}"))
            })??;
        Ok(client)
    }

    /// The Socket.IO session id (from `40{"sid":..}`).
    pub fn sid(&self) -> &str {
        &self.sid
    }

    /// The Engine.IO session id (from the open packet).
    pub fn engine_sid(&self) -> &str {
        &self.engine_sid
    }

    /// The socket's local address (shows which source address was used).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        lock(&self.shared.close).is_some()
    }

    /// Waits until the connection has ended (the server closed it, or the
    /// socket was lost), and returns how.
    pub async fn closed(&self) -> CloseInfo {
        let mut ended = self.shared.ended.subscribe();
        // The sender lives in `shared`, which `self` holds: never dropped here.
        let _ = ended.wait_for(|ended| *ended).await;
        lock(&self.shared.close).clone().unwrap_or(CloseInfo {
            code: None,
            reason: "the reader stopped unexpectedly".into(),
        })
    }

    /// The first packet the server sent that this client could not handle
    /// (binary packets, other namespaces, broken JSON), if any. Such packets
    /// are skipped, not fatal.
    pub fn violation(&self) -> Option<String> {
        lock(&self.shared.violation).clone()
    }

    /// Emits `event` with `args` (`42["event",...args]`), waiting until the
    /// frame is written.
    pub async fn emit(&self, event: &str, args: &[Value]) -> Result<(), ClientError> {
        self.send_text(format!("42{}", event_array(event, args)))
            .await
    }

    /// Emits `event` with `args` and an ack id (`42<id>["event",...]`), and
    /// waits up to `timeout` for the server's ack (`43<id>[...]`); returns
    /// the ack's arguments.
    pub async fn emit_with_ack(
        &self,
        event: &str,
        args: &[Value],
        timeout: Duration,
    ) -> Result<Vec<Value>, ClientError> {
        let id = self.next_ack.fetch_add(1, Ordering::Relaxed);
        let Some((_waiting, rx)) = self.shared.acks.wait(id) else {
            return Err(self.failure());
        };
        self.send_text(format!("42{id}{}", event_array(event, args)))
            .await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(args)) => Ok(args),
            Ok(Err(_)) => Err(self.failure()),
            Err(_) => Err(ClientError::Timeout(format!(
                "no ack for {event:?} (id {id}) within {timeout:?}"
            ))),
        }
    }

    /// Joins `room` through the peer server's `join` event, waiting for its
    /// ack `{"ok":true,...}`.
    pub async fn join(&self, room: &str) -> Result<(), ClientError> {
        let ack = self
            .emit_with_ack("join", &[json!(room)], DEFAULT_TIMEOUT)
            .await?;
        match ack.first() {
            Some(reply) if reply["ok"] == true => Ok(()),
            _ => Err(ClientError::Protocol(format!(
                "unexpected ack to join {room:?}: {ack:?}"
            ))),
        }
    }

    /// Sends the Socket.IO DISCONNECT packet and a close frame (1000), and
    /// waits up to [`DEFAULT_TIMEOUT`] for the server's close. Closing a
    /// connection the server already closed is not an error.
    pub async fn close(mut self) -> Result<(), ClientError> {
        let frames = [
            WsFrame::text(Payload::Owned(b"41".to_vec())),
            WsFrame::close(1000, b""),
        ];
        self.driver
            .close(&self.shared.close, frames, DEFAULT_TIMEOUT)
            .await
    }

    /// Sends a raw Engine.IO packet (any text).
    pub async fn send_text(&self, text: String) -> Result<(), ClientError> {
        self.write(WsFrame::text(Payload::Owned(text.into_bytes())))
            .await
    }

    /// Why the connection is unusable: the close, or the first violation.
    fn failure(&self) -> ClientError {
        match self.violation() {
            Some(v) if !self.is_closed() => ClientError::Protocol(v),
            _ => self.shared.closed_error(),
        }
    }

    async fn write(&self, frame: WsFrame<'static>) -> Result<(), ClientError> {
        self.driver.write(&self.shared.close, frame).await
    }

    /// Starts the reader and writer tasks on a socket just opened (no
    /// subprotocol).
    fn start(
        opened: transport::Opened,
        on_event: OnEvent,
        tap: Option<Tap>,
    ) -> (SioClient, mpsc::UnboundedReceiver<Control>) {
        let transport::Opened {
            reader,
            writer: write,
            local_addr,
            ..
        } = opened;
        let shared = Arc::new(Shared {
            acks: Waiters::default(),
            close: Mutex::new(None),
            violation: Mutex::new(None),
            ended: watch::Sender::new(false),
        });
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let reading = shared.clone();
        let driver = Driver::spawn(write, |writer| {
            read_loop(reader, reading, writer, control_tx, on_event, tap)
        });
        (
            SioClient {
                shared,
                driver,
                next_ack: AtomicU64::new(1),
                engine_sid: String::new(),
                sid: String::new(),
                local_addr,
            },
            control_rx,
        )
    }
}

/// `["event",arg1,...]`.
fn event_array(event: &str, args: &[Value]) -> String {
    let mut array = Vec::with_capacity(args.len() + 1);
    array.push(Value::from(event));
    array.extend_from_slice(args);
    Value::Array(array).to_string()
}

async fn read_loop(
    mut ws: Reader,
    shared: Arc<Shared>,
    writer: mpsc::UnboundedSender<WriteCmd>,
    control: mpsc::UnboundedSender<Control>,
    on_event: OnEvent,
    tap: Option<Tap>,
) {
    let info = transport::read_messages(&mut ws, &writer, tap.as_ref(), |message| {
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(data) => {
                shared.violate(format!(
                    "binary frame ({} bytes): binary packets are not supported",
                    data.len()
                ));
                return ControlFlow::Continue(());
            }
        };
        match text.first() {
            // Engine.IO open.
            Some(b'0') => match serde_json::from_slice(&text[1..]) {
                Ok(open) => {
                    let _ = control.send(Control::Open(open));
                }
                Err(e) => shared.violate(format!("bad open packet ({e}): {}", shown(text))),
            },
            // Engine.IO close.
            Some(b'1') => {
                return ControlFlow::Break(CloseInfo {
                    code: None,
                    reason: "the server sent an Engine.IO close packet".into(),
                });
            }
            // Ping ("2", or "2probe" during an upgrade): answer pong with the
            // same data.
            Some(b'2') => {
                let mut pong = text.to_vec();
                pong[0] = b'3';
                let _ = writer.send(WriteCmd {
                    frame: WsFrame::text(Payload::Owned(pong)),
                    ack: None,
                });
            }
            Some(b'4') => socketio_packet(&text[1..], &shared, &control, &on_event),
            // Pong, noop.
            Some(b'3' | b'6') => {}
            _ => shared.violate(format!("unknown Engine.IO packet: {}", shown(text))),
        }
        ControlFlow::Continue(())
    })
    .await;
    *lock(&shared.close) = Some(info);
    shared.acks.close();
    shared.ended.send_replace(true);
}

/// One Socket.IO packet (the Engine.IO message's data): type digit, optional
/// `/namespace,`, optional ack id, JSON.
fn socketio_packet(
    packet: &[u8],
    shared: &Shared,
    control: &mpsc::UnboundedSender<Control>,
    on_event: &OnEvent,
) {
    let Some((&kind, mut rest)) = packet.split_first() else {
        shared.violate("empty Socket.IO packet".into());
        return;
    };
    if rest.first() == Some(&b'/') {
        shared.violate(format!("packet for another namespace: {}", shown(packet)));
        return;
    }
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let id: Option<u64> = std::str::from_utf8(&rest[..digits])
        .ok()
        .and_then(|d| d.parse().ok());
    rest = &rest[digits..];
    match kind {
        // EVENT: ["name", args...]. An ack the server asks for is not sent.
        b'2' => {
            let received = Instant::now();
            let received_unix_us = unix_us();
            match serde_json::from_slice::<Vec<Value>>(rest) {
                Ok(mut array) if array.first().is_some_and(Value::is_string) => {
                    let Value::String(name) = array.remove(0) else {
                        unreachable!("checked above")
                    };
                    on_event(SioEvent {
                        name,
                        args: array,
                        received,
                        received_unix_us,
                    });
                }
                _ => shared.violate(format!("bad event packet: {}", shown(packet))),
            }
        }
        // ACK: [args...] for the emit with that id.
        b'3' => match (id, serde_json::from_slice::<Vec<Value>>(rest)) {
            (Some(id), Ok(args)) => {
                if let Some(waiter) = shared.acks.take(id) {
                    let _ = waiter.send(args);
                }
            }
            _ => shared.violate(format!("bad ack packet: {}", shown(packet))),
        },
        b'0' | b'4' => match serde_json::from_slice::<Value>(rest) {
            Ok(data) => {
                let _ = control.send(if kind == b'0' {
                    Control::Connected(data)
                } else {
                    Control::ConnectError(data)
                });
            }
            Err(e) => shared.violate(format!("bad connect reply ({e}): {}", shown(packet))),
        },
        // DISCONNECT: the server closes the socket next.
        b'1' => {}
        _ => shared.violate(format!("unsupported Socket.IO packet: {}", shown(packet))),
    }
}

fn shown(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).chars().take(200).collect()
}

// ---------------------------------------------------------------------------
// The peer's processes.

/// `bench/peers/socketio`, the Node project.
pub fn peer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/socketio")
}

/// `$NODE`, else `node` from PATH.
pub fn node_bin() -> PathBuf {
    std::env::var_os("NODE").map_or_else(|| "node".into(), PathBuf::from)
}

/// Why the peer cannot run here (no Node 20+, Redis not answering at
/// `redis_url`), or `None` if it can.
pub fn unavailable(redis_url: &str) -> Option<String> {
    let node = node_bin();
    match Command::new(&node).arg("--version").output() {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let major: u32 = version
                .trim_start_matches('v')
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
            if major < 20 {
                return Some(format!(
                    "{} is {version}, Node 20+ is needed",
                    node.display()
                ));
            }
        }
        Ok(out) => {
            return Some(format!(
                "{} --version failed: {}",
                node.display(),
                out.status
            ));
        }
        Err(e) => return Some(format!("cannot run {}: {e}", node.display())),
    }
    match redis_command(redis_url, "PING") {
        Ok(reply) if reply.starts_with("+PONG") => None,
        Ok(reply) => Some(format!("Redis at {redis_url} answered PING with {reply:?}")),
        Err(e) => Some(format!("no Redis at {redis_url}: {e:#}")),
    }
}

/// `host:port` of a `redis://[user:pass@]host[:port][/db]` URL.
fn redis_addr(url: &str) -> Result<String> {
    let rest = url
        .strip_prefix("redis://")
        .with_context(|| format!("{url:?} is not a redis:// URL"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let hostport = hostport.rsplit('@').next().unwrap_or(hostport);
    Ok(if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:6379")
    })
}

/// Sends one inline command to Redis and returns its reply (a status line,
/// or a bulk string's content).
fn redis_command(url: &str, command: &str) -> Result<String> {
    let addr = redis_addr(url)?
        .to_socket_addrs()?
        .next()
        .context("no address")?;
    let mut stream = StdTcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(format!("{command}\r\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if let Some(len) = line.strip_prefix('$') {
        let len: usize = len.trim().parse().context("bad bulk length")?;
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        return Ok(String::from_utf8_lossy(&body).into_owned());
    }
    Ok(line)
}

/// The pid of the Redis server at `url` (`INFO server`'s `process_id`), for
/// its CPU time; meaningful only when that Redis runs on this machine and
/// serves nothing else meanwhile.
pub fn redis_pid(url: &str) -> Option<u32> {
    let info = redis_command(url, "INFO server").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
}

/// `$REDIS_SERVER`, else `redis-server` from PATH.
pub fn redis_server_bin() -> PathBuf {
    std::env::var_os("REDIS_SERVER").map_or_else(|| "redis-server".into(), PathBuf::from)
}

/// A redis-server of the run's own on a free loopback port, with no
/// persistence (no RDB snapshots, no AOF), so that its memory and CPU are
/// the run's and nothing else's; killed on drop.
pub struct RedisServer {
    process: ChildProcess,
    addr: SocketAddr,
    bin: PathBuf,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts `bin` and waits until it answers PING.
    pub fn start(bin: &Path) -> Result<RedisServer> {
        let dir = tempfile::Builder::new()
            .prefix("herald-bench-redis-")
            .tempdir()?;
        let addr = herald_test_support::free_addr();
        let mut cmd = Command::new(bin);
        cmd.args(["--port", &addr.port().to_string()])
            .args(["--bind", &addr.ip().to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--logfile", ""])
            .arg("--dir")
            .arg(dir.path())
            .current_dir(dir.path());
        let mut process = ChildProcess::spawn("redis-server", cmd, dir.path().join("redis.log"))?;
        process.wait_listening(addr, READY_TIMEOUT)?;
        let redis = RedisServer {
            process,
            addr,
            bin: bin.to_owned(),
            _dir: dir,
        };
        let reply = redis_command(&redis.url(), "PING")?;
        if !reply.starts_with("+PONG") {
            bail!("redis-server on {addr} answered PING with {reply:?}");
        }
        Ok(redis)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The binary's version (`7.0.15` out of `Redis server v=7.0.15 ...`).
    pub fn version(&self) -> Option<String> {
        redis_version_line(&crate::procfs::version_of(&self.bin)?)
    }

    /// Whether it has exited, with the end of its output.
    pub fn died(&mut self) -> Option<String> {
        self.process.died()
    }
}

/// `7.0.15` out of `Redis server v=7.0.15 sha=...`.
fn redis_version_line(line: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .map(str::to_owned)
}

/// The version the Redis at `url` reports (`INFO server`'s `redis_version`).
pub fn redis_version(url: &str) -> Option<String> {
    let info = redis_command(url, "INFO server").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(|v| v.trim().to_owned())
}

/// What the Redis at `url` holds by its own account (`INFO`): memory,
/// clients, pub/sub channels and patterns; `None` if it does not answer.
pub fn redis_state(url: &str) -> Option<Value> {
    let info = redis_command(url, "INFO").ok()?;
    let field = |key: &str| -> Option<u64> {
        info.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    let mib = |b: Option<u64>| b.map(|b| (b as f64 / (1 << 20) as f64 * 1000.0).round() / 1000.0);
    Some(json!({
        "used_memory_mib": mib(field("used_memory")),
        "rss_mib": mib(field("used_memory_rss")),
        "connected_clients": field("connected_clients"),
        "pubsub_channels": field("pubsub_channels"),
        "pubsub_patterns": field("pubsub_patterns"),
    }))
}

/// The version of a package installed in the peer's `node_modules`
/// (`socket.io`, `@socket.io/redis-adapter`, ...).
pub fn package_version(package: &str) -> Option<String> {
    let path = peer_dir()
        .join("node_modules")
        .join(package)
        .join("package.json");
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    manifest["version"].as_str().map(str::to_owned)
}

/// What one run of `emitter.js` did.
#[derive(Debug, Clone)]
pub struct EmitReport {
    /// Messages published (each is one Redis PUBLISH).
    pub sent: u64,
    /// How long the emitter ran, from its first message (≈ the duration asked).
    pub elapsed: Duration,
    /// The emitter's own CPU time over the run, user and system seconds.
    pub cpu_user_s: f64,
    pub cpu_system_s: f64,
}

/// A run of `emitter.js`: `rate` messages per second to `room` for
/// `duration`, each with `size` bytes of padding.
#[derive(Debug, Clone)]
pub struct Emit {
    pub room: String,
    pub rate: f64,
    pub duration: Duration,
    pub size: usize,
    pub event: String,
}

impl Emit {
    pub fn new(room: &str, rate: f64, duration: Duration) -> Emit {
        Emit {
            room: room.to_owned(),
            rate,
            duration,
            size: 0,
            event: "msg".into(),
        }
    }
}

/// Socket.IO server processes (`node server.js`) on free loopback ports,
/// joined by the Redis adapter; killed on drop.
pub struct SocketIoPeer {
    servers: Vec<ChildProcess>,
    addrs: Vec<SocketAddr>,
    redis_url: String,
    /// The adapter's channel prefix, unique to this peer so that runs sharing
    /// a Redis do not receive each other's messages.
    key: String,
    /// The HS256 secret the servers verify connect tokens with
    /// ([`SocketIoPeer::token`]), as Herald's edges do.
    secret: String,
    dir: tempfile::TempDir,
}

impl SocketIoPeer {
    /// Starts `servers` server processes against the Redis at `redis_url`,
    /// running `npm install` in [`peer_dir`] first if its `node_modules` is
    /// missing, and waits until each prints `listening on PORT`.
    pub fn start(servers: usize, redis_url: &str) -> Result<SocketIoPeer> {
        Self::start_with_env(servers, redis_url, &[])
    }

    /// [`SocketIoPeer::start`] with extra environment variables for the
    /// servers (e.g. `PING_INTERVAL_MS`, `PING_TIMEOUT_MS`; see server.js).
    pub fn start_with_env(
        servers: usize,
        redis_url: &str,
        env: &[(&str, &str)],
    ) -> Result<SocketIoPeer> {
        if servers == 0 {
            bail!("a Socket.IO peer needs at least one server");
        }
        if let Some(why) = unavailable(redis_url) {
            bail!("the Socket.IO peer cannot run: {why}");
        }
        npm_install()?;
        let dir = tempfile::Builder::new()
            .prefix("herald-bench-socketio-")
            .tempdir()?;
        static PEERS: AtomicU64 = AtomicU64::new(0);
        let key = format!(
            "herald-bench-{}-{}-{}",
            std::process::id(),
            PEERS.fetch_add(1, Ordering::Relaxed),
            unix_us()
        );
        let secret = format!("{key}-secret");
        let mut peer = SocketIoPeer {
            servers: Vec::new(),
            addrs: Vec::new(),
            redis_url: redis_url.to_owned(),
            key,
            secret,
            dir,
        };
        for i in 0..servers {
            let addr = herald_test_support::free_addr();
            let mut cmd = Command::new(node_bin());
            cmd.arg(peer_dir().join("server.js"))
                .current_dir(peer_dir())
                .env("PORT", addr.port().to_string())
                .env("HOST", addr.ip().to_string())
                .env("REDIS_URL", redis_url)
                .env("SIO_KEY", &peer.key)
                .env("JWT_SECRET", &peer.secret)
                .env_remove("NODE_OPTIONS")
                .env_remove("DEBUG")
                .envs(env.iter().copied());
            let name = format!("socketio-{i}");
            let log = peer.dir.path().join(format!("{name}.log"));
            let mut proc = ChildProcess::spawn(&name, cmd, log)?;
            let ready = proc.wait_for_line(&format!("listening on {}", addr.port()), READY_TIMEOUT);
            peer.servers.push(proc);
            ready?;
            peer.addrs.push(addr);
        }
        Ok(peer)
    }

    /// The servers' listening addresses.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// An HS256 token for user `sub`, valid for a day, for a CONNECT's
    /// `auth.token`: minted as Herald's bench mints its tokens.
    pub fn token(&self, sub: &str) -> String {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 86_400;
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &json!({ "sub": sub, "exp": exp }),
            &jsonwebtoken::EncodingKey::from_secret(self.secret.as_bytes()),
        )
        .expect("HS256 signing cannot fail")
    }

    /// `kill -9` of server `i`: its clients see their sockets drop, with no
    /// goodbye. It no longer counts as exited in [`SocketIoPeer::exited`].
    pub fn kill_server(&mut self, i: usize) -> Result<()> {
        let server = self
            .servers
            .get_mut(i)
            .with_context(|| format!("there is no Socket.IO server {i}"))?;
        server.kill();
        Ok(())
    }

    /// Starts `publisher.js`: `rate` messages a second to `rooms` in turn
    /// through the Redis emitter, until [`Publisher::stop`]; returns once it
    /// is connected to Redis.
    pub async fn start_publisher(&self, rooms: &[String], rate: f64) -> Result<Publisher> {
        use tokio::io::AsyncBufReadExt as _;
        let mut cmd = Command::new(node_bin());
        cmd.arg(peer_dir().join("publisher.js"))
            .args(["--rooms", &rooms.join(",")])
            .args(["--rate", &rate.to_string()])
            .current_dir(peer_dir())
            .env("REDIS_URL", &self.redis_url)
            .env("SIO_KEY", &self.key)
            .env_remove("NODE_OPTIONS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        die_with_parent(&mut cmd);
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .context("could not run publisher.js")?;
        let stdout = child.stdout.take().context("publisher.js has no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = tokio::time::timeout(READY_TIMEOUT, lines.next_line())
            .await
            .context("publisher.js did not start publishing in time")??;
        if first.as_deref() != Some("publishing") {
            bail!("publisher.js did not start: it printed {first:?}");
        }
        Ok(Publisher { child, lines })
    }

    /// The servers' Engine.IO WebSocket URLs, for [`SioClient::connect`].
    pub fn urls(&self) -> Vec<String> {
        self.addrs.iter().copied().map(engine_url).collect()
    }

    /// Name (`socketio-0`, ...) and pid of each server, for CPU time
    /// (`/proc/<pid>/stat`) and RSS (`/proc/<pid>/status`).
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.servers
            .iter()
            .map(|p| (p.name().to_owned(), p.pid()))
            .collect()
    }

    pub fn redis_url(&self) -> &str {
        &self.redis_url
    }

    /// The Redis server's pid, see [`redis_pid`].
    pub fn redis_pid(&self) -> Option<u32> {
        redis_pid(&self.redis_url)
    }

    /// Runs `emitter.js` ([`Emit::new`]`(room, rate, duration)`) and waits for it.
    pub async fn emit(&self, room: &str, rate: f64, duration: Duration) -> Result<EmitReport> {
        self.emit_with(&Emit::new(room, rate, duration)).await
    }

    /// Runs `emitter.js` as described by `emit` and waits for it to finish
    /// (its start-up, ~0.2 s, comes before the first message).
    pub async fn emit_with(&self, emit: &Emit) -> Result<EmitReport> {
        let mut cmd = Command::new(node_bin());
        cmd.arg(peer_dir().join("emitter.js"))
            .args(["--room", &emit.room])
            .args(["--rate", &emit.rate.to_string()])
            .args(["--duration", &emit.duration.as_secs_f64().to_string()])
            .args(["--size", &emit.size.to_string()])
            .args(["--event", &emit.event])
            .current_dir(peer_dir())
            .env("REDIS_URL", &self.redis_url)
            .env("SIO_KEY", &self.key)
            .env_remove("NODE_OPTIONS")
            .stdin(Stdio::null());
        die_with_parent(&mut cmd);
        let out = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .output()
            .await
            .context("could not run emitter.js")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("emitter.js failed ({}):\n{stdout}\n{stderr}", out.status);
        }
        let summary: Value = stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .with_context(|| format!("emitter.js printed no summary:\n{stdout}\n{stderr}"))?;
        let f = |k: &str| summary[k].as_f64().unwrap_or(0.0);
        Ok(EmitReport {
            sent: summary["sent"]
                .as_u64()
                .context("no `sent` in the summary")?,
            elapsed: Duration::from_secs_f64(f("elapsed_s").max(0.0)),
            cpu_user_s: f("cpu_user_s"),
            cpu_system_s: f("cpu_system_s"),
        })
    }

    /// Servers that have exited (they should all still run), with the end of
    /// their output.
    pub fn exited(&mut self) -> Vec<String> {
        self.servers
            .iter_mut()
            .filter_map(ChildProcess::died)
            .collect()
    }

    /// Lines the servers printed besides `listening on ...` (Node prints
    /// errors and warnings only), a few per server, with counts.
    pub fn log_problems(&self) -> Vec<String> {
        let mut notes = Vec::new();
        for p in &self.servers {
            let out = p.output();
            let other: Vec<&str> = out
                .lines()
                .filter(|l| !l.starts_with("listening on ") && !l.starts_with("stats "))
                .collect();
            if other.is_empty() {
                continue;
            }
            let mut note = format!("{} printed {} other line(s)", p.name(), other.len());
            for line in other.iter().take(3) {
                let line: String = line.chars().take(300).collect();
                note.push_str("\n    ");
                note.push_str(&line);
            }
            notes.push(note);
        }
        notes
    }
}

/// A running `publisher.js` ([`SocketIoPeer::start_publisher`]).
pub struct Publisher {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

/// What a `publisher.js` run sent.
#[derive(Debug, Clone)]
pub struct PublisherReport {
    /// Messages sent to each room: seq `0..n` of that room.
    pub sent: std::collections::BTreeMap<String, u64>,
    pub elapsed: Duration,
    /// The publisher's own CPU time, user and system seconds.
    pub cpu_s: f64,
}

impl Publisher {
    /// Closes its stdin (it stops after the message in progress), waits for
    /// it to write out every message and exit, and returns what it sent.
    pub async fn stop(mut self) -> Result<PublisherReport> {
        drop(self.child.stdin.take());
        let mut summary = None;
        while let Some(line) = self.lines.next_line().await? {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                summary = Some(v);
            }
        }
        let status = self.child.wait().await?;
        if !status.success() {
            bail!("publisher.js failed ({status})");
        }
        let summary = summary.context("publisher.js printed no summary")?;
        let sent = summary["sent"]
            .as_object()
            .context("no `sent` in publisher.js's summary")?
            .iter()
            .map(|(room, n)| (room.clone(), n.as_u64().unwrap_or(0)))
            .collect();
        let f = |k: &str| summary[k].as_f64().unwrap_or(0.0);
        Ok(PublisherReport {
            sent,
            elapsed: Duration::from_secs_f64(f("elapsed_s").max(0.0)),
            cpu_s: f("cpu_user_s") + f("cpu_system_s"),
        })
    }
}

/// `npm install --no-audit --no-fund` in [`peer_dir`] unless an install of
/// the same package-lock.json (which pins every version) is marked there as
/// finished.
fn npm_install() -> Result<()> {
    // Benches started by concurrent tests are separate processes: a file
    // lock keeps them from installing at once, and the marker (written only
    // after npm succeeded) from starting Node on a half-installed tree.
    let dir = peer_dir();
    let lock_path = dir.join(".npm-install.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("could not open {}", lock_path.display()))?;
    lock_file
        .lock()
        .with_context(|| format!("could not lock {}", lock_path.display()))?;
    let marker = dir.join("node_modules/.herald-install-done");
    let lock = std::fs::read(dir.join("package-lock.json"))
        .with_context(|| format!("could not read {}/package-lock.json", dir.display()))?;
    // A tree installed from an older lock (before a package was added)
    // is installed again.
    let done = format!("npm install finished: package-lock.json {:x}\n", {
        use sha1::Digest as _;
        sha1::Sha1::digest(&lock)
    });
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == done) {
        return Ok(());
    }
    let npm = std::env::var_os("NPM").map_or_else(|| "npm".into(), PathBuf::from);
    let out = Command::new(&npm)
        .args(["install", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not run {} install", npm.display()))?;
    if !out.status.success() {
        bail!(
            "npm install in {} failed ({}):\n{}\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::write(&marker, done)
        .with_context(|| format!("could not write {}", marker.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls() {
        assert_eq!(
            redis_addr("redis://127.0.0.1:6379").unwrap(),
            "127.0.0.1:6379"
        );
        assert_eq!(redis_addr("redis://localhost").unwrap(), "localhost:6379");
        assert_eq!(redis_addr("redis://u:p@h:1/2").unwrap(), "h:1");
        assert!(redis_addr("http://h").is_err());
    }

    #[test]
    fn redis_versions() {
        assert_eq!(
            redis_version_line("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0")
                .as_deref(),
            Some("7.0.15")
        );
        assert_eq!(redis_version_line("something else"), None);
    }

    #[test]
    fn event_arrays() {
        assert_eq!(event_array("join", &[json!("r")]), r#"["join","r"]"#);
        assert_eq!(event_array("x", &[]), r#"["x"]"#);
    }

    #[test]
    fn packets_reach_the_callback_and_the_acks() {
        let shared = Shared {
            acks: Waiters::default(),
            close: Mutex::new(None),
            violation: Mutex::new(None),
            ended: watch::Sender::new(false),
        };
        let (control, mut control_rx) = mpsc::unbounded_channel();
        let (on_event, mut events) = event_channel();
        let (_waiting, mut ack) = shared.acks.wait(12).unwrap();

        socketio_packet(br#"0{"sid":"abc"}"#, &shared, &control, &on_event);
        socketio_packet(
            br#"2["msg",{"seq":3,"ts_us":1}]"#,
            &shared,
            &control,
            &on_event,
        );
        socketio_packet(br#"312[{"ok":true}]"#, &shared, &control, &on_event);
        assert!(lock(&shared.violation).is_none());
        socketio_packet(br#"2/chat,["msg"]"#, &shared, &control, &on_event);
        assert!(lock(&shared.violation).is_some());

        assert!(matches!(control_rx.try_recv(), Ok(Control::Connected(v)) if v["sid"] == "abc"));
        let event = events.try_recv().unwrap();
        assert_eq!(event.name, "msg");
        assert_eq!(event.data()["seq"], 3);
        assert!(event.latency().is_some());
        assert!(events.try_recv().is_err());
        assert_eq!(ack.try_recv().unwrap(), vec![json!({"ok": true})]);
    }
}
