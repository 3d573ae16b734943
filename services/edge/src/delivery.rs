//! Delivery to one connection: a bounded queue of frames and the writes
//! that drain it. Frames arrive already encoded (one encoding per message per
//! edge, shared by every recipient as `Bytes`); the delivering task adds the
//! few bytes of WebSocket header and writes to the socket itself, without
//! waking a writer task, because the syscall and the wake-up, not the
//! encoding, are the cost of a delivery. Inside a [`batch`]
//! (a run of messages a room's pump took off the broker at once) frames are
//! only queued, and each connection gets one write for all of them.
//!
//! A write the socket cannot take whole leaves the rest queued and marks the
//! connection stalled: its session task waits for the socket to take more and
//! finishes the write. A queue that grows past its bound means the client
//! reads slower than its rooms produce, and it is disconnected with 4009.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError};
use std::time::Duration;

use crate::socket::Socket;
use bytes::Bytes;
use herald_wire::CloseCode;
use tokio::io::Interest;
use tokio::sync::Notify;

use crate::framing::{OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT, encode_close, encode_frame};

mod fanout;
#[cfg(all(target_os = "linux", not(herald_no_io_uring)))]
mod uring;
#[cfg(not(all(target_os = "linux", not(herald_no_io_uring))))]
#[path = "delivery/no_uring.rs"]
mod uring;

pub use fanout::{Sends, enable as enable_io_uring};

/// Flags of every plain send: a peer that is gone must not raise SIGPIPE.
/// (Rust programs ignore SIGPIPE from the start; the flag says so where the
/// kernel has it.)
#[cfg(any(target_os = "linux", target_os = "android"))]
const SEND_FLAGS: i32 = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SEND_FLAGS: i32 = 0;

/// The most bytes gathered into one write.
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// What a connection is sent, in queue order.
pub enum Out {
    /// A pre-encoded JSON text frame payload.
    Text(Bytes),
    /// A binary frame. Herald's protocol is JSON text: only the echo server
    /// (`echo`, for the conformance suite) sends these.
    Binary(Bytes),
    /// A control frame (pong, close echo) that the WebSocket reader owes the peer.
    Control { opcode: u8, payload: Vec<u8> },
    /// `disconnect` + close frame, after everything queued before it.
    /// Boxed: rare, and the queue holds many of the other kinds.
    Close(Box<Closing>),
}

impl Out {
    pub fn close(code: CloseCode, reason: impl Into<String>) -> Out {
        Out::Close(Box::new(Closing::new(code, reason)))
    }

    /// Payload bytes, as the queue's byte limit counts them.
    fn len(&self) -> usize {
        match self {
            Out::Text(b) | Out::Binary(b) => b.len(),
            Out::Control { payload, .. } => payload.len(),
            Out::Close(closing) => closing.reason.len(),
        }
    }
}

/// Why the server closes a connection: the code and reason of its
/// `disconnect` frame and close frame, whether the client should reconnect,
/// and if so how long to wait first.
#[derive(Debug, Clone)]
pub struct Closing {
    pub code: CloseCode,
    pub reason: String,
    /// The code's rule, unless a backend chose another for a code of its own.
    pub reconnect: bool,
    pub reconnect_after_ms: Option<u32>,
}

impl Closing {
    pub fn new(code: CloseCode, reason: impl Into<String>) -> Closing {
        Closing {
            code,
            reason: reason.into(),
            reconnect: code.reconnect(),
            reconnect_after_ms: None,
        }
    }
}

/// A cheap handle on one connection: its frame queue and socket, its
/// control actions (server-side join, leave, disconnect) and why it is being
/// closed from outside its session (slow consumer, server shutdown, an API
/// call; whoever closes first wins).
#[derive(Clone)]
pub struct Outbox {
    /// Unique within this edge; the wire connection id adds the node id.
    pub id: u64,
    conn: Arc<Conn>,
}

/// Everything of one connection that other tasks reach, in one allocation.
/// An idle session waits on `attention` alone (besides its socket), because
/// every future it waits on is part of its task's memory.
struct Conn {
    stream: Socket,
    limits: QueueLimits,
    queue: Mutex<Queue>,
    /// Rare, so a queue that allocates only when used (a channel's first
    /// block would cost every idle connection kilobytes).
    control: Mutex<VecDeque<ControlCmd>>,
    /// Boxed: an open connection pays one pointer for it.
    why: OnceLock<Box<Closing>>,
    /// When the connection's token expires, in seconds since the Unix epoch.
    expires: AtomicU64,
    /// When something last arrived from the client, on the edge's clock
    /// (`liveness::now`).
    heard: AtomicU32,
    /// Wakes the session: a close, a control action, a stalled write.
    attention: Notify,
    /// What the connection holds until it is gone (its client address's
    /// place under the caps, an SSE relay's signal). Here rather than in
    /// the session's task: a wrapper future around the session would copy it.
    _held: Option<Held>,
}

/// Something a connection holds until it is gone; dropped with it.
pub type Held = Box<dyn Send + Sync>;

#[derive(Default)]
struct Queue {
    /// Not yet encoded.
    frames: VecDeque<Out>,
    /// Encoded and not yet taken by the socket: the rest of one batch of whole
    /// frames. Empty, and unallocated, whenever the socket has taken everything.
    head: Box<[u8]>,
    /// No more frames are accepted: a close is queued, or the session ended.
    closing: bool,
    /// The write side is shut down (after the last queued byte).
    shut: bool,
    /// The socket took less than offered; the session task resumes writing
    /// once it is writable. Nobody else tries meanwhile.
    stalled: bool,
    /// The socket failed: nothing more is written.
    broken: bool,
    /// Registered with the current batch: written when it ends.
    batched: bool,
    /// The code of the close frame queued by [`Outbox::push`], if any (it
    /// fits in the padding after the flags: no cost per connection).
    sent_close: Option<CloseCode>,
    /// Payload bytes of `frames`.
    bytes: usize,
}

impl Queue {
    fn drained(&self) -> bool {
        self.head.is_empty() && self.frames.is_empty()
    }

    /// What the queue holds for the client, encoded or not.
    fn held_bytes(&self) -> usize {
        self.bytes + self.head.len()
    }

    fn push_back(&mut self, out: Out) {
        self.bytes += out.len();
        self.frames.push_back(out);
    }

    fn pop_front(&mut self) -> Option<Out> {
        let out = self.frames.pop_front()?;
        self.bytes -= out.len();
        Some(out)
    }

    /// Drops every frame not yet encoded.
    fn clear(&mut self) {
        self.frames = VecDeque::new();
        self.bytes = 0;
    }
}

/// How much may wait for one connection before it is closed as a slow
/// consumer (4009): frames, and bytes, so that large messages cannot fill
/// the edge's memory through a queue counted in frames alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub frames: usize,
    pub bytes: usize,
}

impl From<usize> for QueueLimits {
    /// `frames` frames, of any size.
    fn from(frames: usize) -> QueueLimits {
        QueueLimits {
            frames,
            bytes: usize::MAX,
        }
    }
}

/// Starts loading `value`'s memory into the cache without waiting for it.
///
/// A fan-out touches each member's state once, between two sends, and at
/// low rates that state is never in the cache: the miss was the largest
/// user-space cost of a delivery. A prefetch lets it overlap the previous
/// member's `send(2)`.
pub fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // Every cache line the value touches, wherever it starts.
        let start = (value as *const T).cast::<i8>();
        let first = start as usize & !63;
        let end = start as usize + size_of::<T>().max(1);
        for line in (first..end).step_by(64) {
            // SAFETY: a prefetch is a hint that never faults and reads
            // nothing into the program; the lines hold `value`.
            #[allow(unsafe_code)]
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(start.wrapping_offset(line as isize - start as isize));
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

thread_local! {
    /// Where a write's frames are encoded: one buffer per thread, not per
    /// write or per connection.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Connections with frames queued by the batch running on this thread.
    static BATCH: RefCell<Option<Vec<Outbox>>> = const { RefCell::new(None) };
}

/// Runs `f`, a run of deliveries from one task without an await in between;
/// frames queued meanwhile are written once `f` returns, coalesced into one
/// write per connection.
pub fn batch<R>(f: impl FnOnce() -> R) -> R {
    batch_via(None, f)
}

/// [`batch`], but with a flusher the frames are written at its next tick
/// instead of when `f` returns (see [`Flusher`]).
pub fn batch_via<R>(flusher: Option<&Arc<Flusher>>, f: impl FnOnce() -> R) -> R {
    let outer = BATCH.with(|b| {
        let mut b = b.borrow_mut();
        if b.is_some() {
            return true;
        }
        *b = Some(Vec::new());
        false
    });
    if outer {
        // Nested: the outermost batch writes.
        return f();
    }
    // Writes on drop, so that a panicking `f` does not leave this thread in
    // a batch that never ends (and frames queued that are never written).
    let _writes = BatchEnd(flusher.cloned());
    f()
}

/// Whether a batch runs on this thread: what is queued now is written when
/// it ends.
pub fn in_batch() -> bool {
    BATCH.with(|b| b.borrow().is_some())
}

struct BatchEnd(Option<Arc<Flusher>>);

impl Drop for BatchEnd {
    fn drop(&mut self) {
        let dirty = BATCH.with(|b| b.borrow_mut().take()).unwrap_or_default();
        match &self.0 {
            // Still marked batched: later deliveries join this write.
            Some(flusher) => {
                let mut waiting = flusher.dirty.lock().expect("flusher");
                match waiting.as_mut() {
                    Some(waiting) => {
                        waiting.extend(dirty);
                        // Under the `dirty` lock, so that the tick that
                        // writes these connections takes these stamps too.
                        let stamps = crate::metrics::take_pending();
                        flusher.stamps.lock().expect("flusher").extend(stamps);
                    }
                    None => {
                        drop(waiting);
                        fanout::write_all(&dirty);
                        crate::metrics::batch_written();
                    }
                }
            }
            None => {
                fanout::write_all(&dirty);
                crate::metrics::batch_written();
            }
        }
    }
}

/// Room deliveries held for up to `--write-delay`, so that a connection
/// receiving many messages a second gets several frames per write (the
/// syscall is most of a delivery's cost; `docs/benchmarks.md` has the
/// figures). A trade of latency for CPU, off by default; replies to a
/// client's own requests never wait.
pub struct Flusher {
    /// `None` once stopped: batches then write at once.
    dirty: Mutex<Option<Vec<Outbox>>>,
    /// Publish times of the messages those writes carry (see `metrics`).
    stamps: Mutex<Vec<u64>>,
}

impl Flusher {
    /// Writes what waits every `delay`, until `stop` (then once more).
    pub fn start(delay: Duration, stop: tokio_util::sync::CancellationToken) -> Arc<Flusher> {
        let flusher = Arc::new(Flusher {
            dirty: Mutex::new(Some(Vec::new())),
            stamps: Mutex::new(Vec::new()),
        });
        let ticking = flusher.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(delay);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let stopping = tokio::select! {
                    _ = tick.tick() => false,
                    _ = stop.cancelled() => true,
                };
                let (dirty, stamps) = {
                    let mut waiting = ticking.dirty.lock().expect("flusher");
                    let stamps = std::mem::take(&mut *ticking.stamps.lock().expect("flusher"));
                    if stopping {
                        (waiting.take(), stamps)
                    } else {
                        (waiting.as_mut().map(std::mem::take), stamps)
                    }
                };
                fanout::write_all(&dirty.unwrap_or_default());
                crate::metrics::written(&stamps);
                if stopping {
                    return;
                }
            }
        });
        flusher
    }
}

/// What [`Outbox::claim`] did with a frame.
enum Claim<'a> {
    /// Queued (`true`), or refused because the connection is closing.
    Done(bool),
    /// Nothing is queued: the frame may be written now, under this lock.
    Now(MutexGuard<'a, Queue>),
}

/// Whether a batch runs on this thread; registers `outbox` with it unless
/// it is `registered` already (one thread-local access per delivery).
fn join_batch(outbox: &Outbox, registered: bool) -> bool {
    BATCH.with(|b| match b.borrow_mut().as_mut() {
        Some(dirty) => {
            if !registered {
                dirty.push(outbox.clone());
            }
            true
        }
        None => false,
    })
}

impl Outbox {
    /// The handle of a new connection writing to `stream`; at most `limits`
    /// may wait for it.
    pub fn new(id: u64, stream: impl Into<Socket>, limits: impl Into<QueueLimits>) -> Outbox {
        Outbox::holding(id, stream, limits, None)
    }

    /// [`Outbox::new`] for a connection that holds `held` until it is gone.
    pub fn holding(
        id: u64,
        stream: impl Into<Socket>,
        limits: impl Into<QueueLimits>,
        held: Option<Held>,
    ) -> Outbox {
        Outbox {
            id,
            conn: Arc::new(Conn {
                stream: stream.into(),
                limits: limits.into(),
                queue: Mutex::default(),
                control: Mutex::default(),
                why: OnceLock::new(),
                expires: AtomicU64::new(u64::MAX),
                heard: AtomicU32::new(crate::liveness::now()),
                attention: Notify::new(),
                _held: held,
            }),
        }
    }

    /// What may wait for this connection.
    pub fn limits(&self) -> QueueLimits {
        self.conn.limits
    }

    pub fn stream(&self) -> &Socket {
        &self.conn.stream
    }

    pub fn set_expiry(&self, exp: u64) {
        self.conn.expires.store(exp, Ordering::Relaxed);
    }

    /// Something arrived from the client: it is alive.
    pub fn heard_now(&self) {
        self.conn
            .heard
            .store(crate::liveness::now(), Ordering::Relaxed);
    }

    /// When something last arrived from the client (`liveness::now`).
    pub fn heard(&self) -> u32 {
        self.conn.heard.load(Ordering::Relaxed)
    }

    /// Queues a WebSocket ping; the client's pong (or anything else it
    /// sends) shows it is alive.
    pub fn ping(&self) {
        self.push(Out::Control {
            opcode: OP_PING,
            payload: Vec::new(),
        });
    }

    /// Whether the token expired by `now` (seconds since the Unix epoch).
    pub fn expired(&self, now: u64) -> bool {
        self.conn.expires.load(Ordering::Relaxed) <= now
    }

    /// Closes the connection from outside its session; the first reason wins.
    pub fn close(&self, code: CloseCode, reason: impl Into<String>) {
        self.close_as(Closing::new(code, reason));
    }

    /// [`Outbox::close`], with every detail of the `disconnect` frame.
    pub fn close_as(&self, closing: Closing) {
        let _ = self.conn.why.set(Box::new(closing));
        self.conn.attention.notify_waiters();
    }

    pub fn close_reason(&self) -> Option<&Closing> {
        self.conn.why.get().map(|c| &**c)
    }

    /// Resolves once [`Outbox::close`] was called.
    pub async fn closed(&self) {
        loop {
            let attention = self.attention();
            tokio::pin!(attention);
            attention.as_mut().enable();
            if self.close_reason().is_some() {
                return;
            }
            attention.await;
        }
    }

    /// Notified on a close, a control action or a stalled write. Enable it
    /// before looking at the state, so no wake-up falls in between.
    pub fn attention(&self) -> tokio::sync::futures::Notified<'_> {
        self.conn.attention.notified()
    }

    /// Queues a control action; `false` when the session already has too many waiting.
    pub fn push_control(&self, cmd: ControlCmd) -> bool {
        let mut queue = self.conn.control.lock().expect("control queue");
        if queue.len() >= CONTROL_QUEUE {
            return false;
        }
        queue.push_back(cmd);
        drop(queue);
        self.conn.attention.notify_waiters();
        true
    }

    pub fn pop_control(&self) -> Option<ControlCmd> {
        let mut queue = self.conn.control.lock().expect("control queue");
        let cmd = queue.pop_front();
        if queue.is_empty() && queue.capacity() > 0 {
            *queue = VecDeque::new();
        }
        cmd
    }

    /// The socket took less than offered: wait for it to be writable, then [`Outbox::resume`].
    pub fn is_stalled(&self) -> bool {
        self.lock().stalled
    }

    /// Asks the CPU to fetch this connection's state, so that a fan-out can
    /// load the next member while the kernel sends to the current one.
    pub fn prefetch(&self) {
        prefetch(&*self.conn);
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.conn.queue.lock().expect("connection queue")
    }

    /// The queue, unless another thread holds it. A thread that holds other
    /// connections' queues (a run of sends) must not wait for one: two runs
    /// could each wait for a queue the other holds.
    fn try_lock(&self) -> Option<MutexGuard<'_, Queue>> {
        match self.conn.queue.try_lock() {
            Ok(q) => Some(q),
            Err(TryLockError::WouldBlock) => None,
            Err(TryLockError::Poisoned(_)) => panic!("connection queue poisoned"),
        }
    }

    /// Queues a frame. A full queue means the client reads slower than its
    /// rooms produce: it is disconnected with 4009 rather than letting the
    /// queue (and the edge's memory) grow without bound.
    pub fn send(&self, frame: Bytes) -> bool {
        self.push(Out::Text(frame))
    }

    /// [`Outbox::send`] for a frame that many connections share (a room's
    /// message). Outside a batch, with nothing waiting for this connection,
    /// the frame goes straight from `frame` to the socket: it is neither
    /// cloned nor queued, and the connection's state is touched once, which
    /// matters when each delivery is a cache miss between two syscalls.
    pub fn deliver(&self, frame: &Bytes) -> bool {
        match self.claim(self.lock(), frame) {
            Claim::Done(delivered) => delivered,
            Claim::Now(mut q) => {
                self.write_now(&mut q, frame);
                true
            }
        }
    }

    /// Writes `frame` alone to the socket, for a claim that came back
    /// [`Claim::Now`].
    fn write_now(&self, q: &mut Queue, frame: &Bytes) {
        self.offer_encoded(q, |_, buf| encode_frame(buf, OP_TEXT, frame));
    }

    /// Queues `frame` for this connection (`q` is its queue, locked),
    /// unless it can go to the socket right now: then the queue comes back
    /// locked, for the caller to send the frame before anything else can be
    /// written.
    fn claim<'q>(&self, q: MutexGuard<'q, Queue>, frame: &Bytes) -> Claim<'q> {
        let Some(mut q) = self.admit(q, frame.len()) else {
            return Claim::Done(false);
        };
        if join_batch(self, q.batched) {
            q.batched = true;
            q.push_back(Out::Text(frame.clone()));
            return Claim::Done(true);
        }
        if q.drained() {
            q.stalled = false;
            return Claim::Now(q);
        }
        q.push_back(Out::Text(frame.clone()));
        self.write(&mut q);
        Claim::Done(true)
    }

    /// The queue `q` back, if it takes another frame of `len` bytes; a
    /// full one closes the connection. A frame alone in an empty queue is
    /// always taken: it goes to the socket at once.
    fn admit<'q>(&self, q: MutexGuard<'q, Queue>, len: usize) -> Option<MutexGuard<'q, Queue>> {
        if q.closing || q.broken {
            return None;
        }
        let limits = self.conn.limits;
        let why = if q.frames.len() >= limits.frames {
            "too many messages queued for this connection; it reads too slowly"
        } else if !q.drained() && q.held_bytes().saturating_add(len) > limits.bytes {
            "too many bytes queued for this connection; it reads too slowly"
        } else {
            return Some(q);
        };
        drop(q);
        self.close(CloseCode::SlowConsumer, why);
        None
    }

    pub fn push(&self, out: Out) -> bool {
        let Some(mut q) = self.admit(self.lock(), out.len()) else {
            return false;
        };
        // A close (ours, or the echo of the client's) is the last frame.
        q.closing = matches!(
            out,
            Out::Close(_)
                | Out::Control {
                    opcode: OP_CLOSE,
                    ..
                }
        );
        if let Out::Close(closing) = &out {
            q.sent_close = Some(closing.code);
        }
        q.push_back(out);
        if join_batch(self, q.batched) {
            q.batched = true;
            return true;
        }
        // Outside a batch (a reply, a control frame): now, with whatever a
        // batch or the flusher still holds for this connection.
        self.write(&mut q);
        true
    }

    /// Queues a frame, waiting for room in the queue (replays of history,
    /// which may be longer than the queue, wait for the client instead of
    /// overflowing it). `false` when the connection is gone.
    pub async fn send_waiting(&self, frame: Bytes) -> bool {
        let mut frame = Some(frame);
        loop {
            {
                let mut q = self.lock();
                if q.closing || q.broken || self.close_reason().is_some() {
                    return false;
                }
                let len = frame.as_ref().map_or(0, Bytes::len);
                if q.frames.len() < self.conn.limits.frames
                    && (q.drained() || q.held_bytes().saturating_add(len) <= self.conn.limits.bytes)
                {
                    drop(q);
                    return self.push(Out::Text(frame.take().expect("not sent yet")));
                }
                if !q.stalled {
                    self.write(&mut q);
                    continue;
                }
            }
            tokio::select! {
                _ = self.conn.stream.writable() => self.resume(),
                _ = self.closed() => return false,
            }
        }
    }

    /// What waits in the queue: frames, and bytes (of those frames, and
    /// encoded but not yet taken by the socket). For the liveness sweep.
    pub fn queued(&self) -> (usize, usize) {
        let mut q = self.lock();
        // The once-a-second look is also when an emptied queue gives its
        // buffer back: an idle connection's last frame (its `connected`, a
        // ping) left room for four frames, 160 bytes held until the next.
        if q.frames.is_empty() && q.frames.capacity() > 0 {
            q.frames = VecDeque::new();
        }
        (q.frames.len(), q.held_bytes())
    }

    /// Goes on with a stalled write.
    pub fn resume(&self) {
        self.write(&mut self.lock());
    }

    /// Writes what is queued until the socket takes no more; shuts the write
    /// side down after the last byte of a closing connection. Frames are
    /// encoded into this thread's scratch buffer, so a write the socket takes
    /// whole allocates nothing; only what it leaves is kept in `head`.
    fn write(&self, q: &mut Queue) {
        // Even when stalled: the socket may take more by now, and if it does
        // not, tokio answers WouldBlock from its readiness without a syscall.
        q.stalled = false;
        while !q.broken && !q.drained() {
            if !q.head.is_empty() {
                let head = std::mem::take(&mut q.head);
                if !self.offer(q, &head) {
                    return;
                }
                continue;
            }
            let written = self.offer_encoded(q, encode_queued);
            if !written {
                return;
            }
        }
        if q.frames.is_empty() && q.frames.capacity() > 16 {
            // A burst is over: an idle connection keeps no queue memory.
            q.frames = VecDeque::new();
        }
        if q.closing && q.drained() && !q.shut && !q.broken {
            q.shut = true;
            let _ = socket2::SockRef::from(&self.conn.stream).shutdown(std::net::Shutdown::Write);
        }
    }

    /// Offers what `fill` encodes into this thread's scratch buffer.
    fn offer_encoded(&self, q: &mut Queue, fill: impl FnOnce(&mut Queue, &mut Vec<u8>)) -> bool {
        SCRATCH.with(|scratch| {
            let mut buf = scratch.borrow_mut();
            buf.clear();
            fill(q, &mut buf);
            let written = self.offer(q, &buf);
            if buf.capacity() > 2 * MAX_BATCH_BYTES {
                // One huge frame must not stay in every thread's scratch.
                *buf = Vec::new();
            }
            written
        })
    }

    /// Offers `bytes` to the socket; `false` when it did not take them all
    /// (the rest is kept in `head` and the connection stalls) or failed.
    ///
    /// The write is a plain `send(2)` on the socket, not tokio's `try_write`:
    /// tokio's readiness lives in a separate allocation, one more cache miss
    /// per delivery, which showed in an edge's CPU when fanning out.
    /// tokio is told of a full socket only when it is full, before stalling.
    fn offer(&self, q: &mut Queue, bytes: &[u8]) -> bool {
        let socket = socket2::SockRef::from(&self.conn.stream);
        let mut rest = bytes;
        let mut told = false;
        loop {
            match socket.send_with_flags(rest, SEND_FLAGS) {
                Ok(n) if n == rest.len() => return true,
                Ok(n) if n > 0 => rest = &rest[n..],
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !told {
                        // tokio may still take the socket for writable; clear
                        // that, then try once more, so that the socket
                        // draining in between cannot go unnoticed.
                        let _ = self.conn.stream.try_io(Interest::WRITABLE, || {
                            Err::<(), _>(io::ErrorKind::WouldBlock.into())
                        });
                        told = true;
                        continue;
                    }
                    q.head = rest.into();
                    self.stall(q);
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // Reset or gone: the reader sees it too and ends the session.
                    q.broken = true;
                    q.clear();
                    q.head = Box::default();
                    return false;
                }
            }
        }
    }

    fn stall(&self, q: &mut Queue) {
        q.stalled = true;
        self.conn.attention.notify_waiters();
    }

    /// Ends the connection's output once its session is over: the close the
    /// closer names goes out (after the batch being written, ahead of frames
    /// not yet started), then whatever is queued is written for up to
    /// `flush`, then the write side is shut down.
    pub async fn finish(&self, flush: Duration) {
        {
            let mut q = self.lock();
            crate::metrics::disconnected(match self.close_reason() {
                Some(closing) if !q.closing => Some(closing.code),
                _ => q.sent_close,
            });
            if let Some(closing) = self.close_reason().cloned()
                && !q.closing
            {
                q.clear();
                q.push_back(Out::Close(Box::new(closing)));
            }
            q.closing = true;
            self.write(&mut q);
        }
        let drained = async {
            loop {
                {
                    let q = self.lock();
                    if q.shut || q.broken {
                        return;
                    }
                }
                let _ = self.conn.stream.writable().await;
                self.resume();
            }
        };
        if tokio::time::timeout(flush, drained).await.is_err() {
            let mut q = self.lock();
            q.broken = true;
            q.clear();
            q.head = Box::default();
        }
    }
}

/// Moves queued frames into `buf`, encoded, up to one write's worth.
fn encode_queued(q: &mut Queue, buf: &mut Vec<u8>) {
    let start = buf.len();
    while buf.len() - start < MAX_BATCH_BYTES {
        let Some(out) = q.pop_front() else {
            break;
        };
        encode(buf, out);
    }
}

fn encode(buf: &mut Vec<u8>, out: Out) {
    match out {
        Out::Text(b) => encode_frame(buf, OP_TEXT, &b),
        Out::Binary(b) => encode_frame(buf, OP_BINARY, &b),
        Out::Control { opcode, payload } => encode_frame(buf, opcode, &payload),
        Out::Close(closing) => encode_close(buf, &closing),
    }
}

/// A control action for a session, and where to say it is done.
pub struct ControlCmd {
    pub control: herald_wire::presence::Control,
    pub done: tokio::sync::oneshot::Sender<()>,
    /// The control message's span, so the session's action (and the
    /// presence change it reports) stays in the caller's trace.
    pub span: tracing::Span,
}

/// Control actions that may wait for one session; more are refused (the
/// router's call then reports the connection as not confirmed).
const CONTROL_QUEUE: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tests::pair;
    use tokio::io::AsyncReadExt;

    #[test]
    fn the_close_code_costs_an_idle_connection_nothing() {
        // `sent_close` sits in the padding after the flags, and the byte
        // count in what `head` saves as a boxed slice: one cache line.
        assert_eq!(std::mem::size_of::<Queue>(), 64);
    }

    /// Splits what a client received into (opcode, payload) frames.
    fn frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (len, header) = match bytes[1] {
                126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            out.push((bytes[0] & 0x0f, bytes[header..header + len].to_vec()));
            bytes = &bytes[header + len..];
        }
        out
    }

    /// An idle connection holds no queue buffer: the liveness sweep's look
    /// at an emptied queue gives back what its last frames left.
    #[tokio::test]
    async fn an_emptied_queue_gives_its_buffer_back_when_the_sweep_looks() {
        let (server, mut client) = pair().await;
        let ob = Outbox::new(1, server, 16);
        ob.send(Bytes::from_static(b"connected"));
        let mut got = [0u8; 11];
        client.read_exact(&mut got).await.unwrap();
        assert!(
            ob.lock().frames.capacity() > 0,
            "the frame went through the queue"
        );
        assert_eq!(ob.queued(), (0, 0));
        assert_eq!(ob.lock().frames.capacity(), 0);
        // A frame waiting (inside a batch) keeps it.
        batch(|| {
            ob.send(Bytes::from_static(b"x"));
            assert_eq!(ob.queued().0, 1);
            assert!(ob.lock().frames.capacity() > 0);
        });
    }

    #[tokio::test]
    async fn a_batch_is_written_once_it_ends_in_queue_order() {
        let (server, mut client) = pair().await;
        let ob = Outbox::new(1, server, 16);
        batch(|| {
            ob.send(Bytes::from_static(b"a"));
            ob.send(Bytes::from_static(b"b"));
            // Nothing is written before the batch ends.
            assert!(ob.lock().batched);
            assert_eq!(ob.lock().frames.len(), 2);
        });
        ob.push(Out::close(CloseCode::Unauthorized, "bad token"));
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let got = frames(&got);
        assert_eq!(got[0], (OP_TEXT, b"a".to_vec()));
        assert_eq!(got[1], (OP_TEXT, b"b".to_vec()));
        assert!(String::from_utf8_lossy(&got[2].1).contains("\"code\":4001"));
        assert_eq!(got[3].0, OP_CLOSE);
        assert_eq!(&got[3].1[..2], &4001u16.to_be_bytes());
        assert!(
            !ob.send(Bytes::from_static(b"late")),
            "closed connections take nothing"
        );
    }

    #[tokio::test]
    async fn with_a_write_delay_frames_wait_for_the_tick_and_replies_do_not() {
        let stop = tokio_util::sync::CancellationToken::new();
        let (server, mut client) = pair().await;
        let ob = Outbox::new(1, server, 16);
        // A tick far away: only a reply can write the held frame.
        let slow = Flusher::start(Duration::from_secs(3600), stop.clone());
        tokio::task::yield_now().await;
        batch_via(Some(&slow), || ob.send(Bytes::from_static(b"a")));
        assert_eq!(ob.lock().frames.len(), 1, "held for the flusher");
        ob.send(Bytes::from_static(b"r"));
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [0x81, 1, b'a', 0x81, 1, b'r']);

        let fast = Flusher::start(Duration::from_millis(5), stop.clone());
        batch_via(Some(&fast), || {
            ob.send(Bytes::from_static(b"b"));
            ob.send(Bytes::from_static(b"c"));
        });
        batch_via(Some(&fast), || ob.send(Bytes::from_static(b"d")));
        let mut got = [0u8; 9];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [0x81, 1, b'b', 0x81, 1, b'c', 0x81, 1, b'd']);
        stop.cancel();
    }

    #[tokio::test]
    async fn a_stalled_connection_is_written_again_by_the_next_delivery() {
        let (server, mut client) = pair().await;
        let ob = Outbox::new(1, server, 1024);
        let big = Bytes::from(vec![b'x'; 256 * 1024]);
        let mut sent = 0;
        while !ob.is_stalled() {
            assert!(ob.send(big.clone()));
            sent += 1;
        }
        let reading = tokio::spawn(async move {
            let mut got = vec![0u8; sent * (big.len() + 10) + 3];
            client.read_exact(&mut got).await.unwrap();
            got
        });
        // Nobody calls `resume`: the client reads, and the next delivery
        // finds the socket writable again.
        let unstalled = async {
            loop {
                ob.send(Bytes::from_static(b"z"));
                if !ob.is_stalled() && ob.lock().drained() {
                    break;
                }
                ob.conn.stream.writable().await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(20), unstalled)
            .await
            .expect("deliveries write again once the client reads");
        let got = tokio::time::timeout(Duration::from_secs(20), reading)
            .await
            .expect("everything queued reaches the client")
            .unwrap();
        assert_eq!(&got[got.len() - 3..], &[0x81, 1, b'z']);
    }

    #[tokio::test]
    async fn nothing_follows_the_echo_of_a_clients_close() {
        let (server, _client) = pair().await;
        let ob = Outbox::new(1, server, 16);
        assert!(ob.push(Out::Control {
            opcode: OP_CLOSE,
            payload: vec![0x03, 0xe8],
        }));
        assert!(!ob.send(Bytes::from_static(b"late")));
    }

    #[tokio::test]
    async fn a_stopped_flusher_lets_batches_write_at_once() {
        let stop = tokio_util::sync::CancellationToken::new();
        let (server, mut client) = pair().await;
        let ob = Outbox::new(1, server, 16);
        let flusher = Flusher::start(Duration::from_secs(3600), stop.clone());
        stop.cancel();
        while flusher.dirty.lock().unwrap().is_some() {
            tokio::task::yield_now().await;
        }
        batch_via(Some(&flusher), || ob.send(Bytes::from_static(b"a")));
        let mut got = [0u8; 3];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [0x81, 1, b'a']);
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_closed_with_4009_after_whole_frames() {
        let (server, mut client) = pair().await;
        let ob = Outbox::new(1, server, 4);
        let big = Bytes::from(vec![b'x'; 256 * 1024]);
        let mut sent = 0;
        while ob.send(big.clone()) {
            sent += 1;
            assert!(sent < 10_000, "the queue never filled");
        }
        assert_eq!(ob.close_reason().unwrap().code, CloseCode::SlowConsumer);
        let reading = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        ob.finish(Duration::from_secs(30)).await;
        let got = frames(&reading.await.unwrap());
        let (close, rest) = got.split_last().unwrap();
        assert_eq!(close.0, OP_CLOSE);
        assert_eq!(&close.1[..2], &4009u16.to_be_bytes());
        let (notice, messages) = rest.split_last().unwrap();
        assert!(String::from_utf8_lossy(&notice.1).contains("\"code\":4009"));
        assert!(messages.iter().all(|m| m.1.len() == big.len()));
        assert!(messages.len() <= sent);
    }

    /// Counted in frames alone, a queue of 60 KB messages held 60 MB for a
    /// client that read nothing; the byte limit closes it first.
    #[tokio::test]
    async fn large_messages_to_a_client_that_reads_nothing_are_bounded_in_bytes() {
        let (server, _client) = pair().await;
        let limit = 1 << 20;
        let ob = Outbox::new(
            1,
            server,
            QueueLimits {
                frames: 1024,
                bytes: limit,
            },
        );
        let big = Bytes::from(vec![b'x'; 60 * 1024]);
        let mut sent = 0;
        while ob.send(big.clone()) {
            sent += 1;
            assert!(
                ob.queued().1 <= limit,
                "{} bytes queued after {sent} messages",
                ob.queued().1
            );
            assert!(sent < 1024, "the frame limit came first: {sent}");
        }
        let closing = ob.close_reason().unwrap();
        assert_eq!(closing.code, CloseCode::SlowConsumer);
        assert!(closing.reason.contains("bytes"), "{}", closing.reason);
        // The byte count follows the queue down as it is written out.
        let q = ob.lock();
        assert_eq!(
            q.bytes,
            q.frames.iter().map(Out::len).sum::<usize>(),
            "the count matches what is queued"
        );
    }

    #[tokio::test]
    async fn a_message_larger_than_the_byte_limit_still_goes_to_an_idle_connection() {
        let (server, mut client) = pair().await;
        let ob = Outbox::new(
            1,
            server,
            QueueLimits {
                frames: 16,
                bytes: 10,
            },
        );
        assert!(ob.send(Bytes::from(vec![b'y'; 100])));
        let mut got = vec![0u8; 102];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..2], &[0x81, 100]);
        assert!(ob.close_reason().is_none());
    }
}
