//! Delivery to one connection: a bounded outbound queue and the writer task
//! that drains it. Frames arrive already encoded (one encoding per message per
//! edge, shared by every recipient as `Bytes`); the writer adds the few bytes
//! of WebSocket header itself and coalesces everything queued into a single
//! write, because on this class of machine the syscall, not the encoding, is
//! the cost of a delivery.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use herald_wire::CloseCode;
use herald_wire::frames::disconnect_frame;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The most bytes gathered into one write.
const MAX_BATCH_BYTES: usize = 64 * 1024;

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;

/// What the writer sends, in queue order.
pub enum Out {
    /// A pre-encoded JSON text frame payload.
    Text(Bytes),
    /// A control frame (pong, close echo) that the WebSocket reader owes the peer.
    Control { opcode: u8, payload: Vec<u8> },
    /// `disconnect` + close frame, after everything queued before it.
    Close { code: CloseCode, reason: String },
}

/// Why a connection is being closed from outside its own session: slow
/// consumer, server shutdown, an API call. Whoever closes first wins.
pub struct Closer {
    token: CancellationToken,
    why: OnceLock<(CloseCode, String)>,
}

impl Closer {
    fn new() -> Closer {
        Closer {
            token: CancellationToken::new(),
            why: OnceLock::new(),
        }
    }

    pub fn close(&self, code: CloseCode, reason: impl Into<String>) {
        let _ = self.why.set((code, reason.into()));
        self.token.cancel();
    }

    pub async fn closed(&self) {
        self.token.cancelled().await
    }

    pub fn reason(&self) -> Option<&(CloseCode, String)> {
        self.why.get()
    }
}

/// A cheap handle on one connection: its frame queue, its control channel
/// (server-side join, leave, disconnect) and its closer.
#[derive(Clone)]
pub struct Outbox {
    /// Unique within this edge; the wire connection id adds the node id.
    pub id: u64,
    tx: mpsc::Sender<Out>,
    pub control: Arc<ControlInbox>,
    pub closer: Arc<Closer>,
}

/// A control action for a session, and where to say it is done.
pub struct ControlCmd {
    pub control: herald_wire::presence::Control,
    pub done: tokio::sync::oneshot::Sender<()>,
}

/// Control actions that may wait for one session; more are refused (the
/// router's call then reports the connection as not confirmed).
const CONTROL_QUEUE: usize = 16;

/// Control actions waiting for a session. They are rare, so this is a queue
/// that allocates only when used rather than a channel, whose first block
/// would cost every idle connection about 3 KiB.
#[derive(Default)]
pub struct ControlInbox {
    queue: std::sync::Mutex<std::collections::VecDeque<ControlCmd>>,
    notify: tokio::sync::Notify,
}

impl ControlInbox {
    /// Queues an action; `false` when the session already has too many waiting.
    pub fn push(&self, cmd: ControlCmd) -> bool {
        let mut queue = self.queue.lock().expect("control queue");
        if queue.len() >= CONTROL_QUEUE {
            return false;
        }
        queue.push_back(cmd);
        drop(queue);
        self.notify.notify_one();
        true
    }

    /// The next action. Cancel-safe: nothing is taken until it is returned.
    pub async fn recv(&self) -> ControlCmd {
        loop {
            if let Some(cmd) = self.queue.lock().expect("control queue").pop_front() {
                return cmd;
            }
            // A push between the check and this wait left a permit: no wake-up is lost.
            self.notify.notified().await;
        }
    }
}

impl Outbox {
    /// Queues a frame. A full queue means the client reads slower than its
    /// rooms produce: it is disconnected with 4009 rather than letting the
    /// queue (and the edge's memory) grow without bound.
    pub fn send(&self, frame: Bytes) -> bool {
        self.push(Out::Text(frame))
    }

    /// Queues a frame, waiting for room in the queue (replays of history,
    /// which may be longer than the queue, wait for the client instead of
    /// overflowing it). `false` when the connection is gone.
    pub async fn send_waiting(&self, frame: Bytes) -> bool {
        tokio::select! {
            sent = self.tx.send(Out::Text(frame)) => sent.is_ok(),
            _ = self.closer.closed() => false,
        }
    }

    pub fn push(&self, out: Out) -> bool {
        match self.tx.try_send(out) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.closer.close(
                    CloseCode::SlowConsumer,
                    "too many messages queued for this connection; it reads too slowly",
                );
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Creates the queues of a new connection; `capacity` frames at most.
pub fn outbox(id: u64, capacity: usize) -> (Outbox, mpsc::Receiver<Out>) {
    let (tx, rx) = mpsc::channel(capacity);
    (
        Outbox {
            id,
            tx,
            control: Arc::default(),
            closer: Arc::new(Closer::new()),
        },
        rx,
    )
}

/// Appends one unmasked server frame to `buf`.
pub fn encode_frame(buf: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    buf.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        buf.push(len as u8);
    } else if len <= u16::MAX as usize {
        buf.push(126);
        buf.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        buf.push(127);
        buf.extend_from_slice(&(len as u64).to_be_bytes());
    }
    buf.extend_from_slice(payload);
}

fn encode_close(buf: &mut Vec<u8>, code: CloseCode, reason: &str) {
    encode_frame(buf, OP_TEXT, &disconnect_frame(code, reason));
    // A close frame's reason may hold at most 123 bytes.
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = code.code().to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode_frame(buf, OP_CLOSE, &payload);
}

/// Drains the queue into `io` until a close is written, the queue closes, or
/// the closer fires (then the close it names is written at once, ahead of
/// whatever is still queued).
pub async fn run_writer<W: AsyncWrite + Unpin>(
    mut io: W,
    mut rx: mpsc::Receiver<Out>,
    closer: Arc<Closer>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = closer.closed() => {
                let (code, reason) = closer.reason().cloned().unwrap_or((CloseCode::Normal, String::new()));
                buf.clear();
                encode_close(&mut buf, code, &reason);
                io.write_all(&buf).await?;
                return io.shutdown().await;
            }
            out = rx.recv() => out,
        };
        let Some(first) = first else {
            return io.shutdown().await;
        };
        // Fresh buffer each batch: an idle connection holds no write buffer.
        buf = Vec::with_capacity(256);
        let mut closing = false;
        let mut next = Some(first);
        while let Some(out) = next.take() {
            match out {
                Out::Text(b) => encode_frame(&mut buf, OP_TEXT, &b),
                Out::Control { opcode, payload } => encode_frame(&mut buf, opcode, &payload),
                Out::Close { code, reason } => {
                    encode_close(&mut buf, code, &reason);
                    closing = true;
                    break;
                }
            }
            if buf.len() < MAX_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        io.write_all(&buf).await?;
        if closing {
            return io.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_get_the_rfc6455_length_forms() {
        let mut b = Vec::new();
        encode_frame(&mut b, OP_TEXT, b"hi");
        assert_eq!(b, [0x81, 2, b'h', b'i']);
        let mut b = Vec::new();
        encode_frame(&mut b, OP_TEXT, &[0; 300]);
        assert_eq!(&b[..4], &[0x81, 126, 1, 44]);
        let mut b = Vec::new();
        encode_frame(&mut b, OP_TEXT, &vec![0; 70_000]);
        assert_eq!(&b[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    #[tokio::test]
    async fn queued_frames_are_coalesced_and_a_full_queue_closes_with_4009() {
        let (ob, rx) = outbox(1, 4);
        for i in 0..4 {
            assert!(ob.send(Bytes::from(format!("m{i}"))));
        }
        assert!(!ob.send(Bytes::from_static(b"overflow")));
        assert_eq!(ob.closer.reason().unwrap().0, CloseCode::SlowConsumer);
        let mut sink = Vec::new();
        run_writer(&mut sink, rx, ob.closer.clone()).await.unwrap();
        // The closer fired before the writer ran: it writes the close first.
        assert_eq!(sink[0], 0x81);
        let text = String::from_utf8_lossy(&sink);
        assert!(text.contains("\"code\":4009"), "{text}");
    }

    #[tokio::test]
    async fn a_batch_is_one_buffer_in_queue_order() {
        let (ob, rx) = outbox(1, 16);
        ob.send(Bytes::from_static(b"a"));
        ob.send(Bytes::from_static(b"b"));
        ob.push(Out::Close {
            code: CloseCode::Unauthorized,
            reason: "bad token".into(),
        });
        let mut sink = Vec::new();
        run_writer(&mut sink, rx, ob.closer.clone()).await.unwrap();
        assert_eq!(&sink[..6], &[0x81, 1, b'a', 0x81, 1, b'b']);
        assert!(sink.ends_with(b"bad token"));
        let close_at = sink.len() - b"bad token".len() - 4;
        assert_eq!(sink[close_at], 0x88);
        assert_eq!(&sink[close_at + 2..close_at + 4], &4001u16.to_be_bytes());
    }
}
