//! The edge's metrics that are taken deep in the delivery path: how long a
//! message took from its publisher to this edge's write (once per message,
//! not per member), deliveries by namespace, disconnects by close code, and
//! the outbound queues as the liveness sweep samples them. They are
//! process-wide because the fan-out and the connection's queue hold no
//! handle to the edge; [`register`] puts them in the edge's registry, with
//! the process's memory, read when scraped.

use std::cell::RefCell;
use std::sync::LazyLock;

use bytes::Bytes;
use herald_ops::Metrics;
use herald_ops::metrics::{NamespaceCounters, ScrapeGauge, latency_histogram};
use herald_wire::CloseCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

struct Hot {
    written: Histogram,
    messages_in: NamespaceCounters,
    messages_out: NamespaceCounters,
    disconnects: Family<CodeLabel, Counter>,
    queued_frames: Gauge,
    queued_bytes: Gauge,
    queue_max: Gauge,
    feed: Family<OutcomeLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

static HOT: LazyLock<Hot> = LazyLock::new(|| Hot {
    written: latency_histogram(),
    messages_in: NamespaceCounters::default(),
    messages_out: NamespaceCounters::default(),
    disconnects: Family::default(),
    queued_frames: Gauge::default(),
    queued_bytes: Gauge::default(),
    queue_max: Gauge::default(),
    feed: Family::default(),
});

thread_local! {
    /// Publish times (ms) of the messages fanned out by the batch running on
    /// this thread: their writes are handed to the kernel when it ends.
    static PENDING: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// Registers the edge's delivery metrics and memory gauge in `metrics`.
pub fn register(metrics: &Metrics) {
    let hot = &*HOT;
    let mut reg = metrics.lock().expect("metrics registry");
    reg.register(
        "edge_publish_to_write_seconds",
        "Room messages written to this edge's members: from the publish time in the frame (ts, ms) to the hand-over of the writes to the kernel; one observation per message, whatever the member count",
        hot.written.clone(),
    );
    hot.messages_in.register(
        &mut reg,
        "edge_messages_in",
        "Messages published to rooms by clients of this edge, by namespace",
    );
    hot.messages_out.register(
        &mut reg,
        "edge_messages_out",
        "Room messages delivered to members on this edge (one per member), by namespace",
    );
    // Every code from the start, so that a rate is 0 rather than absent
    // until the first such close.
    for code in CODES.iter().chain(&["client"]) {
        drop(hot.disconnects.get_or_create(&CodeLabel { code }));
    }
    reg.register(
        "edge_disconnects",
        "Connections ended, by the close code the edge sent (\"client\": the client closed or went away)",
        hot.disconnects.clone(),
    );
    reg.register(
        "edge_outbound_queued_frames",
        "Frames waiting in every connection's outbound queue, as of the last liveness sweep (1 s)",
        hot.queued_frames.clone(),
    );
    reg.register(
        "edge_outbound_queue_max_frames",
        "Frames waiting in the fullest connection's outbound queue, as of the last liveness sweep; at --outbound-queue the connection is closed with 4009",
        hot.queue_max.clone(),
    );
    reg.register(
        "edge_outbound_queued_bytes",
        "Bytes waiting in every connection's outbound queue (frames and unwritten encoded bytes), as of the last liveness sweep",
        hot.queued_bytes.clone(),
    );
    for outcome in ["stored", "failed"] {
        drop(hot.feed.get_or_create(&OutcomeLabel { outcome }));
    }
    reg.register(
        "edge_feed_appends",
        "Events this edge appended to the event feed, by outcome (stored, failed)",
        hot.feed.clone(),
    );
    reg.register_collector(ScrapeGauge::new(
        "process_resident_memory_bytes",
        "Resident memory of this process (/proc/self/statm).",
        resident_bytes,
    ));
}

/// An event was appended to the feed (`stored`) or not.
pub fn feed_appended(stored: bool) {
    let outcome = if stored { "stored" } else { "failed" };
    HOT.feed.get_or_create(&OutcomeLabel { outcome }).inc();
}

/// A client published a message to a room of `namespace`.
pub fn published(namespace: &str) {
    HOT.messages_in.inc_by(namespace, 1);
}

/// `frame` went to `members` members: counts the deliveries and, for a
/// message frame, observes its latency once its writes are handed to the
/// kernel (now, or at the end of the batch running on this thread).
pub fn fanned_out(frame: &Bytes, members: usize, in_batch: bool) {
    if members == 0 {
        return;
    }
    let Some(rest) = frame.strip_prefix(br#"{"op":"message","room":""#) else {
        return;
    };
    let namespace = rest
        .iter()
        .position(|b| *b == b':' || *b == b'"')
        .and_then(|end| std::str::from_utf8(&rest[..end]).ok())
        .unwrap_or(herald_ops::metrics::OTHER_NAMESPACE);
    HOT.messages_out.inc_by(namespace, members as u64);
    let Some(ts) = message_ts(frame) else {
        return;
    };
    if in_batch {
        PENDING.with(|p| p.borrow_mut().push(ts));
    } else {
        HOT.written.observe(since_ms(ts));
    }
}

/// The batch on this thread wrote its connections: its messages are out.
pub fn batch_written() {
    PENDING.with(|p| {
        let mut pending = p.borrow_mut();
        if pending.is_empty() {
            return;
        }
        let now = crate::now_ms();
        for ts in pending.drain(..) {
            HOT.written.observe(now.saturating_sub(ts) as f64 / 1000.0);
        }
    });
}

/// The publish times of the batch on this thread, for a flusher that
/// writes later ([`written`] then).
pub fn take_pending() -> Vec<u64> {
    PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()))
}

/// Messages whose writes a flusher has just handed to the kernel.
pub fn written(stamps: &[u64]) {
    let now = crate::now_ms();
    for ts in stamps {
        HOT.written.observe(now.saturating_sub(*ts) as f64 / 1000.0);
    }
}

fn since_ms(ts: u64) -> f64 {
    crate::now_ms().saturating_sub(ts) as f64 / 1000.0
}

/// The `ts` of a `message` frame. It follows the data and precedes only a
/// durable message's position, so it is searched from the end.
fn message_ts(frame: &[u8]) -> Option<u64> {
    const KEY: &[u8] = br#","ts":"#;
    let at = frame.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    let digits = frame[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&frame[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// A connection ended; `code` is the close code the edge sent it, `None`
/// when the client closed or went away first.
pub fn disconnected(code: Option<CloseCode>) {
    let code = match code {
        None => "client",
        Some(code) => code_label(code),
    };
    HOT.disconnects.get_or_create(&CodeLabel { code }).inc();
}

/// The close codes the edge sends (`herald_wire::CloseCode`), as labels;
/// the backends' own codes share one, so that they cannot add a label each.
const CODES: [&str; 14] = [
    "1000",
    "1002",
    "1007",
    "1008",
    "1009",
    "1011",
    "1012",
    "1013",
    "4001",
    "4003",
    "4008",
    "4009",
    "4010",
    "application",
];

fn code_label(code: CloseCode) -> &'static str {
    if let CloseCode::Application(_) = code {
        return "application";
    }
    CODES
        .iter()
        .find(|c| c.parse() == Ok(code.code()))
        .copied()
        .unwrap_or("other")
}

/// What the liveness sweep found queued: the total and the largest count of
/// frames, and the total bytes.
#[derive(Default)]
pub struct QueueSample {
    frames: i64,
    bytes: i64,
    max: i64,
}

impl QueueSample {
    pub fn add(&mut self, frames: usize, bytes: usize) {
        let frames = i64::try_from(frames).unwrap_or(i64::MAX);
        self.frames = self.frames.saturating_add(frames);
        self.bytes = self
            .bytes
            .saturating_add(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.max = self.max.max(frames);
    }

    pub fn publish(self) {
        HOT.queued_frames.set(self.frames);
        HOT.queued_bytes.set(self.bytes);
        HOT.queue_max.set(self.max);
    }
}

/// Resident memory from `/proc/self/statm` (pages), 0 where there is none.
fn resident_bytes() -> i64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: i64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages.saturating_mul(page_size())
}

#[cfg(unix)]
fn page_size() -> i64 {
    // SAFETY: sysconf reads a constant of the system; it touches no memory
    // of ours.
    #[allow(unsafe_code)]
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    size.max(0) as i64
}

#[cfg(not(unix))]
fn page_size() -> i64 {
    4096
}

#[cfg(test)]
mod tests {
    use super::message_ts;

    #[test]
    fn the_publish_time_is_found_in_plain_and_durable_frames() {
        let room = herald_wire::RoomName::parse("chat:a").unwrap();
        let data =
            serde_json::value::RawValue::from_string(r#"{"ts":1,",\"ts\":":2}"#.into()).unwrap();
        let frame = herald_wire::frames::message_frame(&room, &data, "bob", 1234);
        assert_eq!(message_ts(&frame), Some(1234));
        let durable = herald_wire::frames::with_position(&frame, "e1", 7, 6);
        assert_eq!(message_ts(&durable), Some(1234));
        assert_eq!(message_ts(br#"{"op":"presence"}"#), None);
    }
}
