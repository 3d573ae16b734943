//! History in JetStream (nats-server 2.9 or later).
//!
//! Layout: one stream per durable namespace, `HERALD_<NS>` (upper-cased,
//! `-` → `_`), capturing `herald.durable.<ns>.>`; a room's messages go to
//! `herald.durable.<ns>.<encode_token(room)>`. The stream sequence is the
//! offset, the stream's creation time the epoch. Per-room history size is
//! `max_msgs_per_subject`; age is `max_age`.
//!
//! Appends to one room are linearised: each publish carries the room's last
//! offset in `Nats-Expected-Last-Subject-Sequence` (and stores it in the
//! `Herald-Prev` header), so it only lands when that really was the room's
//! last message, and `prev` is exact whatever other processes do. On
//! "wrong last sequence" the append learns the room's real last offset (from
//! the error, else by reading it) and tries again. Within one process,
//! appends to a room also queue on a local lock, so they do not race each
//! other through that retry loop.
//!
//! Every message also carries its number within the room (`Herald-N`: the
//! room's first message is 1, each append adds one), so that the count of a
//! room's messages after an offset is two message gets (the room's last
//! message, and its first after the offset), not a consumer: connecting
//! reads unread counts this way, and a connect creates no consumer at all.
//! Those reads are direct gets (`allow_direct` streams), which nats-server
//! answers from the store without the JetStream API's queue, and so are the
//! first [`DIRECT_READS`] messages of a read (what a reconnecting client
//! missed); appends read the room's last message from the stream's leader.
//! On nats-server 2.11 and later, counts and reads are batched direct gets
//! ([`batch`]): a count is one request (the server sends the first message
//! after the offset, then the number of the room's messages after it), a
//! read one request per [`FETCH_CHUNK`] messages, and no read makes a
//! consumer.
//!
//! Read markers are one JSON entry per user (room → offset), so that all of
//! a user's markers are one get: in the personal namespace's stream on
//! nats-server 2.11 and later, where one batched direct get reads them with
//! the inbox's last message, else in the KV bucket `herald_markers`
//! ([`markers`]). The epoch of a namespace is cached and read again
//! at most every [`EPOCH_TTL`], and at once when an append sees signs of
//! the stream having been recreated.
//!
//! Checked against nats-server 2.9.10: an expected last subject sequence of
//! 0 is enforced (a room's first message is linearised too); a repeated
//! `Nats-Msg-Id` is answered as a duplicate before the expected sequence is
//! checked, and a publish refused for its sequence does not record its id;
//! `duplicate_window` may not exceed `max_age`; `max_msg_size` counts
//! headers; async-nats 0.51's `create_key_value` cannot parse 2.9's account
//! info, so the marker bucket's stream is created directly.

mod batch;
mod markers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_nats::HeaderValue;
use async_nats::connection::State;
use async_nats::header::{NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::{
    self, DirectGetErrorKind, DiscardPolicy, LastRawMessageErrorKind, StorageType,
};
use async_nats::jetstream::{self, Context};
use bytes::Bytes;
use futures::StreamExt;
use herald_wire::room::{RoomName, USER_NAMESPACE};
use herald_wire::subjects::encode_token;

use self::batch::BatchGets;
pub use self::markers::markers_subject;
use super::{Appended, History, HistoryError, Inbox, Limits, Stored, check_namespace};
use crate::BoxFuture;
use crate::error::{During, cause, jetstream_failure};

/// Bounds every JetStream API request and publish acknowledgement.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an operation waits for a connection being (re)established.
const CONNECT_WAIT: Duration = Duration::from_secs(2);
/// Bounds a whole read, count or marker listing (pull fetches have no
/// timeout of their own).
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an append waits for this process's earlier appends to the same
/// room before giving up.
const ROOM_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// Compare-and-set attempts on a read marker before giving up.
const MAX_MARKER_ATTEMPTS: usize = 32;

/// How long an append keeps retrying after losing races to other
/// processes' appends to the same room before reporting contention.
const APPEND_CONTENTION_LIMIT: Duration = Duration::from_secs(10);
/// Rooms whose last offset this process remembers; idle entries are dropped
/// when there are more.
const MAX_CACHED_ROOMS: usize = 65_536;
/// How long a direct get may go unanswered before it is sent again.
const DIRECT_GET_PATIENCE: Duration = Duration::from_secs(1);
/// Direct gets sent before waiting for an unanswered one to time out.
const DIRECT_GET_ATTEMPTS: u32 = 3;

/// Messages a read takes by direct gets, one request each, before it reads
/// the rest through a consumer.
const DIRECT_READS: usize = 16;
/// Messages per pull request when reading.
const FETCH_CHUNK: usize = 256;
/// The server removes a scan consumer this long after its last use, should
/// the explicit delete not arrive.
const SCAN_CONSUMER_IDLE: Duration = Duration::from_secs(30);
/// How long a namespace's epoch is taken as known without asking the
/// server: a stream deleted and recreated by hand is noticed within this
/// (at once by appends).
pub const EPOCH_TTL: Duration = Duration::from_secs(2);
/// Largest value of a user's markers entry (all of a user's markers).
const MAX_MARKERS_ENTRY: usize = 512 * 1024;

/// The header holding a message's `prev`.
pub const PREV_HEADER: &str = "Herald-Prev";
/// The header holding a message's number within its room (1, 2, …).
pub const N_HEADER: &str = "Herald-N";
/// The KV bucket of read markers.
pub const MARKER_BUCKET: &str = "herald_markers";

/// The stream of durable namespace `ns`.
pub fn stream_name(ns: &str) -> String {
    format!("HERALD_{}", ns.to_ascii_uppercase().replace('-', "_"))
}

/// The subject a durable room's messages are stored under.
pub fn room_subject(room: &RoomName) -> String {
    format!(
        "herald.durable.{}.{}",
        room.namespace(),
        encode_token(room.as_str())
    )
}

struct Namespace {
    stream: jetstream::stream::Stream,
    /// The configuration this process wants, to recreate the stream with.
    config: stream::Config,
    /// Cached for [`Appended::epoch`], with when it was read; refreshed by
    /// `epoch()` once older than [`EPOCH_TTL`], by `ensure_namespace` and
    /// whenever an append sees signs of the stream having been recreated.
    epoch: Mutex<(String, tokio::time::Instant)>,
    /// The personal namespace only: its stream holds the read markers
    /// ([`markers`]).
    markers_here: bool,
}

impl Namespace {
    fn epoch(&self) -> String {
        self.epoch.lock().expect("epoch").0.clone()
    }

    /// The cached epoch while it is younger than [`EPOCH_TTL`].
    fn fresh_epoch(&self) -> Option<String> {
        let (epoch, read) = &*self.epoch.lock().expect("epoch");
        (read.elapsed() < EPOCH_TTL && !epoch.is_empty()).then(|| epoch.clone())
    }

    fn set_epoch(&self, epoch: String) {
        *self.epoch.lock().expect("epoch") = (epoch, tokio::time::Instant::now());
    }
}

/// The room's last message as this process last saw it; `None` when
/// unknown. Held locked for the whole of an append, which serialises this
/// process's appends to the room.
type RoomSlot = Arc<tokio::sync::Mutex<Option<Last>>>;

/// A room's last message: its offset, and its number in the room (`None`
/// for a message stored before numbers were, or for no message).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Last {
    offset: u64,
    n: Option<u64>,
}

/// Durable room history in JetStream. See the module documentation.
pub struct JetStreamHistory {
    client: async_nats::Client,
    js: Context,
    /// Replicas of the streams and bucket it creates (existing ones keep
    /// theirs).
    replicas: usize,
    namespaces: RwLock<HashMap<String, Arc<Namespace>>>,
    rooms: Mutex<HashMap<String, RoomSlot>>,
    /// The marker bucket, where the stream cannot hold markers.
    markers: tokio::sync::OnceCell<kv::Store>,
    /// The marker bucket of before an upgrade, read for users whose markers
    /// are not in the stream yet.
    legacy: std::sync::OnceLock<kv::Store>,
    batch: BatchGets,
}

impl JetStreamHistory {
    /// History on the JetStream of `client` (e.g. `NatsBroker::client()`).
    pub fn new(client: async_nats::Client) -> JetStreamHistory {
        let js = jetstream::context::ContextBuilder::new()
            .timeout(API_TIMEOUT)
            .build(client.clone());
        JetStreamHistory {
            batch: BatchGets::new(client.clone()),
            client,
            js,
            replicas: 1,
            namespaces: RwLock::new(HashMap::new()),
            rooms: Mutex::new(HashMap::new()),
            markers: tokio::sync::OnceCell::new(),
            legacy: std::sync::OnceLock::new(),
        }
    }

    /// Creates streams and the marker bucket with `replicas` replicas (3 in a
    /// production cluster; default 1).
    pub fn with_replicas(mut self, replicas: usize) -> JetStreamHistory {
        self.replicas = replicas.max(1);
        self
    }

    /// Fails fast while NATS is unreachable, so that nothing is sent into a
    /// connection that may replay it later. While (re)connecting, waits up to
    /// [`CONNECT_WAIT`] for the connection (a flush completes once it is up).
    async fn connected(&self) -> Result<(), HistoryError> {
        if self.client.connection_state() == State::Connected {
            return Ok(());
        }
        match tokio::time::timeout(CONNECT_WAIT, self.client.flush()).await {
            Ok(Ok(())) if self.client.connection_state() == State::Connected => Ok(()),
            _ => Err(HistoryError::unreachable(format!(
                "not connected to NATS (waited {CONNECT_WAIT:?})"
            ))),
        }
    }

    /// Classifies a client error: while disconnected, or after a timeout, the
    /// store is unavailable; anything else the server refused.
    fn fail(
        &self,
        what: &str,
        e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> HistoryError {
        match jetstream_failure(&self.client, what, e) {
            (during, true) => HistoryError::Unavailable(during),
            (during, false) => HistoryError::Failed(during),
        }
    }

    /// Classifies the failure of an append that was sent: a refusal from
    /// the stream (it answered: nothing stored) or no answer at all (a
    /// timeout, a lost connection: maybe stored).
    fn unacknowledged(&self, what: &str, e: jetstream::context::PublishError) -> HistoryError {
        // Every other kind is an answer from the server (or a refusal before
        // sending): the stream did not store it.
        let answered = !matches!(
            e.kind(),
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
        );
        if answered {
            return self.fail(what, e);
        }
        HistoryError::Unconfirmed(cause(During {
            what: what.to_string(),
            source: cause(e),
        }))
    }

    fn namespace(&self, ns: &str) -> Result<Arc<Namespace>, HistoryError> {
        self.namespaces
            .read()
            .expect("namespaces")
            .get(ns)
            .cloned()
            .ok_or_else(|| HistoryError::NotDurable(ns.to_string()))
    }

    fn wanted_config(&self, ns: &str, limits: &Limits) -> stream::Config {
        let unlimited = |v: u64| {
            if v == 0 {
                -1
            } else {
                v.min(i64::MAX as u64) as i64
            }
        };
        let personal = ns == USER_NAMESPACE;
        let newer = self.batching();
        stream::Config {
            name: stream_name(ns),
            subjects: vec![format!("herald.durable.{ns}.>")],
            max_messages_per_subject: unlimited(limits.max_messages_per_room),
            max_age: limits.max_age,
            duplicate_window: limits.dedup_window(),
            storage: StorageType::File,
            discard: DiscardPolicy::Old,
            num_replicas: self.replicas,
            // Reads on the connect path (a room's last message, unread
            // counts) are direct gets: answered by the stream's store
            // without the JetStream API's queue and JSON envelope.
            allow_direct: true,
            // The personal namespace's stream holds the read markers where
            // the server can keep them past the inbox's age limit.
            allow_message_ttl: personal && newer,
            allow_rollup: personal && newer,
            description: Some(format!("Herald history of durable namespace `{ns}`")),
            ..Default::default()
        }
    }

    /// Gets or creates the stream, then brings its limits to `wanted`;
    /// returns it with its configuration as the server now has it.
    async fn create_or_update(
        &self,
        wanted: &stream::Config,
    ) -> Result<(jetstream::stream::Stream, stream::Config), HistoryError> {
        let stream = self
            .js
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|e| self.fail(&format!("stream {}", wanted.name), e))?;
        let current = stream.cached_info().config.clone();
        if current.subjects != wanted.subjects {
            return Err(HistoryError::refused(format!(
                "stream {} captures {:?}, not {:?}: namespaces that differ only in case or in \
                 `-`/`_` cannot both be durable",
                wanted.name, current.subjects, wanted.subjects
            )));
        }
        let mut merged = current.clone();
        merged.max_messages_per_subject = wanted.max_messages_per_subject;
        merged.max_age = wanted.max_age;
        merged.duplicate_window = wanted.duplicate_window;
        merged.discard = wanted.discard;
        merged.allow_direct = wanted.allow_direct;
        // Never turned off again: markers written with them need them.
        merged.allow_message_ttl |= wanted.allow_message_ttl;
        merged.allow_rollup |= wanted.allow_rollup;
        if merged == current {
            return Ok((stream, current));
        }
        let info = self
            .js
            .update_stream(merged)
            .await
            .map_err(|e| self.fail(&format!("update stream {}", wanted.name), e))?;
        Ok((stream, info.config))
    }

    /// The epoch of stream `name`, `None` if it does not exist.
    ///
    /// Read from the raw `STREAM.INFO` answer: the epoch is the creation time
    /// exactly as the server states it (stable across restarts), which does
    /// not depend on which date-time type async-nats was built with.
    async fn fetch_epoch(&self, name: &str) -> Result<Option<String>, HistoryError> {
        let info: serde_json::Value = self
            .js
            .request(format!("STREAM.INFO.{name}"), &serde_json::json!({}))
            .await
            .map_err(|e| self.fail(&format!("stream info {name}"), e))?;
        if let Some(err) = info.get("error") {
            if err.get("code").and_then(|c| c.as_u64()) == Some(404) {
                return Ok(None);
            }
            return Err(HistoryError::refused(format!("stream info {name}: {err}")));
        }
        let created = info
            .get("created")
            .and_then(|c| c.as_str())
            .ok_or_else(|| {
                HistoryError::refused(format!("stream info {name} has no creation time"))
            })?;
        // "2026-11-25T21:47:55.447147089Z" → "20261125T214755447147089Z".
        Ok(Some(
            created
                .chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .collect(),
        ))
    }

    /// Refreshes the namespace's epoch, recreating its stream when it is gone
    /// (deleted by hand, or lost): the namespace is configured durable, and
    /// the new epoch tells readers the old history is gone.
    async fn refresh_epoch(&self, ns: &Namespace) -> Result<String, HistoryError> {
        let name = &ns.config.name;
        let epoch = match self.fetch_epoch(name).await? {
            Some(epoch) => epoch,
            None => {
                tracing::warn!(stream = %name, "history stream is missing; recreating it");
                let (_, config) = self.create_or_update(&ns.config).await?;
                if ns.markers_here && !(config.allow_message_ttl && config.allow_rollup) {
                    return Err(HistoryError::refused(format!(
                        "stream {name} was recreated by a server that cannot hold read markers"
                    )));
                }
                self.fetch_epoch(name).await?.ok_or_else(|| {
                    HistoryError::refused(format!("stream {name} vanished again after creation"))
                })?
            }
        };
        ns.set_epoch(epoch.clone());
        Ok(epoch)
    }

    async fn ensure(&self, ns: &str, limits: Limits) -> Result<(), HistoryError> {
        check_namespace(ns)?;
        self.connected().await?;
        let wanted = self.wanted_config(ns, &limits);
        if let Some(other) = self
            .namespaces
            .read()
            .expect("namespaces")
            .iter()
            .find(|(other, n)| other.as_str() != ns && n.config.name == wanted.name)
            .map(|(other, _)| other.clone())
        {
            return Err(HistoryError::refused(format!(
                "namespaces `{ns}` and `{other}` would share stream {}",
                wanted.name
            )));
        }
        let (stream, config) = self.create_or_update(&wanted).await?;
        let markers_here = ns == USER_NAMESPACE && self.markers_in_stream(&config).await?;
        let namespace = Arc::new(Namespace {
            stream,
            config: wanted,
            epoch: Mutex::new((String::new(), tokio::time::Instant::now())),
            markers_here,
        });
        self.refresh_epoch(&namespace).await?;
        self.namespaces
            .write()
            .expect("namespaces")
            .insert(ns.to_string(), namespace);
        Ok(())
    }

    fn room_slot(&self, subject: &str) -> RoomSlot {
        let mut rooms = self.rooms.lock().expect("room slots");
        if let Some(slot) = rooms.get(subject) {
            return slot.clone();
        }
        if rooms.len() >= MAX_CACHED_ROOMS {
            // Forget the rooms nobody is appending to right now.
            rooms.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        rooms.entry(subject.to_string()).or_default().clone()
    }

    /// The room's last offset on the server, 0 when it has no message, by
    /// a direct get (see [`Self::last_direct`]).
    async fn last_offset(&self, ns: &Namespace, subject: &str) -> Result<u64, HistoryError> {
        Ok(self.last_direct(ns, subject).await?.offset)
    }

    /// The room's last message like [`Self::last`], by a direct get: the
    /// cheapest read JetStream has (no API queue, no JSON envelope), which
    /// is what a connect and an unread count need. With more than one
    /// replica any replica may answer, so a message acknowledged a moment
    /// ago may not be seen yet (as with any KV get); appends, which must
    /// see the room's true last message, use [`Self::last`].
    async fn last_direct(&self, ns: &Namespace, subject: &str) -> Result<Last, HistoryError> {
        match patiently(|| ns.stream.direct_get_last_for_subject(subject)).await {
            Ok(m) => Ok(Last {
                offset: m.sequence,
                n: number(&m.headers),
            }),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(Last {
                offset: 0,
                n: Some(0),
            }),
            Err(e) => Err(self.fail(&format!("last message of {subject}"), e)),
        }
    }

    /// The room's last message on the server; offset 0 (number 0) when it
    /// has none.
    async fn last(&self, ns: &Namespace, subject: &str) -> Result<Last, HistoryError> {
        match ns.stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(Last {
                offset: m.sequence,
                n: number(&m.headers),
            }),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(Last {
                offset: 0,
                n: Some(0),
            }),
            Err(e) => Err(self.fail(&format!("last message of {subject}"), e)),
        }
    }

    /// The room's first message with offset > `after`, `None` when there
    /// is none.
    async fn next_after(
        &self,
        ns: &Namespace,
        subject: &str,
        after: u64,
    ) -> Result<Option<Last>, HistoryError> {
        let got = ns
            .stream
            .direct_get_next_for_subject(subject, Some(after.saturating_add(1)))
            .await;
        match got {
            Ok(m) => Ok(Some(Last {
                offset: m.sequence,
                n: number(&m.headers),
            })),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.fail(&format!("next message of {subject}"), e)),
        }
    }

    async fn append_inner(
        &self,
        room: &RoomName,
        payload: Bytes,
        key: Option<&str>,
    ) -> Result<Appended, HistoryError> {
        let ns = self.namespace(room.namespace())?;
        self.connected().await?;
        let subject = room_subject(room);
        let slot = self.room_slot(&subject);
        let mut last = tokio::time::timeout(ROOM_LOCK_TIMEOUT, slot.lock())
            .await
            .map_err(|_| {
                HistoryError::unreachable(format!(
                    "earlier appends to {room} did not finish within {ROOM_LOCK_TIMEOUT:?}"
                ))
            })?;
        // Room names hold no space, and `encode_token` escapes whitespace:
        // "<room> <key>" is unambiguous, and scopes keys to their room.
        let msg_id = key.map(|k| format!("{room} {}", encode_token(k)));
        let mut recreated = false;
        let give_up = tokio::time::Instant::now() + APPEND_CONTENTION_LIMIT;
        let mut attempts = 0u32;
        while tokio::time::Instant::now() < give_up {
            attempts += 1;
            self.connected().await?;
            let before = match *last {
                Some(before) => before,
                None => self.last(&ns, &subject).await?,
            };
            let expected = before.offset;
            // After a message stored without a number, numbering starts
            // again at 1: counts then fall back to a scan until it expires.
            let n = before.n.unwrap_or(0) + 1;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                HeaderValue::from(expected),
            );
            headers.insert(PREV_HEADER, HeaderValue::from(expected));
            headers.insert(N_HEADER, HeaderValue::from(n));
            if let Some(id) = &msg_id {
                headers.insert(NATS_MESSAGE_ID, id.as_str());
            }
            let sent = self
                .js
                .publish_with_headers(subject.clone(), headers, payload.clone())
                .await;
            let acked = match sent {
                Ok(ack) => ack.await,
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    *last = None;
                    return Err(HistoryError::TooLarge {
                        size: payload.len(),
                        limit: self.client.max_payload(),
                    });
                }
                Err(e) => {
                    *last = None;
                    return Err(self.fail(&format!("publish to {subject}"), e));
                }
            };
            match acked {
                Ok(ack) if ack.duplicate => {
                    return Ok(Appended {
                        epoch: ns.epoch(),
                        offset: ack.sequence,
                        prev: self.stored_prev(&ns, &subject, ack.sequence).await,
                        duplicate: true,
                    });
                }
                Ok(ack) => {
                    *last = Some(Last {
                        offset: ack.sequence,
                        n: Some(n),
                    });
                    return Ok(Appended {
                        epoch: ns.epoch(),
                        offset: ack.sequence,
                        prev: expected,
                        duplicate: false,
                    });
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    let actual = wrong_last_sequence(&e.to_string());
                    tracing::debug!(%room, expected, ?actual, "append raced another; retrying");
                    // Its number is not in the error: read the last message.
                    *last = None;
                    // Writers that keep colliding step aside for a moment, at random,
                    // so that one of them wins the next round.
                    if attempts > 2 {
                        let pause = rand::random::<u64>() % (1 + u64::from(attempts.min(20)));
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                    if actual.is_none_or(|actual| actual < expected) {
                        // The room's sequence went backwards: its messages
                        // expired, or the stream was recreated. Check which.
                        self.refresh_epoch(&ns).await?;
                    }
                }
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound && !recreated => {
                    recreated = true;
                    *last = None;
                    self.refresh_epoch(&ns).await?;
                }
                Err(e) => {
                    *last = None;
                    return Err(self.unacknowledged(&format!("append to {subject}"), e));
                }
            }
        }
        *last = None;
        Err(HistoryError::unreachable(format!(
            "{attempts} attempts in {APPEND_CONTENTION_LIMIT:?} to append to {room} all lost to concurrent appends"
        )))
    }

    /// The `prev` stored with message `seq`, 0 if it cannot be read.
    async fn stored_prev(&self, ns: &Namespace, subject: &str, seq: u64) -> u64 {
        match ns.stream.get_raw_message(seq).await {
            Ok(m) if m.subject.as_str() == subject => header_u64(&m.headers, PREV_HEADER),
            _ => 0,
        }
    }

    /// Creates a throw-away consumer on `stream` filtered to `filter`, and
    /// pulls up to `limit` of its messages (none for `limit` 0). Returns the
    /// consumer's initial pending count and the messages.
    async fn scan(
        &self,
        stream: &jetstream::stream::Stream,
        filter: String,
        deliver_policy: DeliverPolicy,
        limit: usize,
    ) -> Result<(u64, Vec<jetstream::Message>), HistoryError> {
        self.connected().await?;
        let what = format!("read {filter}");
        let consumer: PullConsumer = stream
            .create_consumer(pull::Config {
                filter_subject: filter,
                deliver_policy,
                ack_policy: AckPolicy::None,
                inactive_threshold: SCAN_CONSUMER_IDLE,
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(|e| self.fail(&what, e))?;
        let pending = consumer.cached_info().num_pending;
        let want = limit.min(usize::try_from(pending).unwrap_or(usize::MAX));
        let pulled = self.pull(&consumer, want, &what).await;
        // Best effort, in the background: the idle threshold removes it anyway.
        let (js, name, stream_name) = (
            self.js.clone(),
            consumer.cached_info().name.clone(),
            consumer.cached_info().stream_name.clone(),
        );
        tokio::spawn(async move {
            let _ = js.delete_consumer_from_stream(name, stream_name).await;
        });
        Ok((pending, pulled?))
    }

    async fn pull(
        &self,
        consumer: &PullConsumer,
        want: usize,
        what: &str,
    ) -> Result<Vec<jetstream::Message>, HistoryError> {
        let mut out = Vec::with_capacity(want);
        while out.len() < want {
            let mut batch = consumer
                .fetch()
                .max_messages((want - out.len()).min(FETCH_CHUNK))
                .messages()
                .await
                .map_err(|e| self.fail(what, e))?;
            let before = out.len();
            let mut caught_up = false;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| self.fail(what, e))?;
                caught_up = m.info().is_ok_and(|i| i.pending == 0);
                out.push(m);
            }
            // Fewer than asked for: expired or removed meanwhile.
            if caught_up || out.len() == before {
                break;
            }
        }
        Ok(out)
    }

    async fn read_inner(
        &self,
        room: &RoomName,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Stored>, HistoryError> {
        let ns = self.namespace(room.namespace())?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.connected().await?;
        let subject = room_subject(room);
        if self.batching() {
            match self.read_batched(&ns, &subject, after, limit).await {
                Err(Apart::No(e)) => return Err(e),
                Ok(out) => return Ok(out),
                Err(Apart::Refused) => {}
            }
        }
        // What a client that was away a moment missed is a few messages:
        // a direct get each costs the server far less than a consumer.
        let mut out = Vec::new();
        let mut last = after;
        while out.len() < limit.min(DIRECT_READS) {
            let got = ns
                .stream
                .direct_get_next_for_subject(subject.as_str(), Some(last.saturating_add(1)))
                .await;
            match got {
                Ok(m) => {
                    last = m.sequence;
                    out.push(Stored {
                        offset: m.sequence,
                        prev: header_u64(&m.headers, PREV_HEADER),
                        payload: m.payload,
                    });
                }
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(self.fail(&format!("read {subject}"), e)),
            }
        }
        if out.len() == limit {
            return Ok(out);
        }
        let start = DeliverPolicy::ByStartSequence {
            start_sequence: last.saturating_add(1),
        };
        let (_, messages) = self
            .scan(&ns.stream, subject, start, limit - out.len())
            .await?;
        let rest: Result<Vec<Stored>, HistoryError> = messages
            .into_iter()
            .map(|m| {
                let info = m.info().map_err(|e| {
                    HistoryError::Failed(cause(During {
                        what: "read message metadata".into(),
                        source: cause(e),
                    }))
                })?;
                Ok(Stored {
                    offset: info.stream_sequence,
                    prev: m.headers.as_ref().map_or(0, |h| header_u64(h, PREV_HEADER)),
                    payload: m.message.payload.clone(),
                })
            })
            .collect();
        out.extend(rest?);
        Ok(out)
    }

    /// Whether the server this process is connected to answers batched
    /// direct gets (2.11 and later).
    fn batching(&self) -> bool {
        batch::supported(&self.client.server_info().version)
    }

    /// [`Self::read_inner`] by batched direct gets: no consumer, one request
    /// per [`FETCH_CHUNK`] messages.
    async fn read_batched(
        &self,
        ns: &Namespace,
        subject: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Stored>, Apart> {
        let mut out = Vec::new();
        let mut last = after;
        while out.len() < limit {
            let n = (limit - out.len()).min(FETCH_CHUNK);
            let from = last.saturating_add(1);
            let what = format!("read {subject}");
            let batch = self.batched(&what, || self.batch.next(&ns.config.name, subject, from, n));
            let batch = batch.await?;
            let got = batch.messages.len();
            for m in batch.messages {
                last = m.sequence;
                out.push(Stored {
                    offset: m.sequence,
                    prev: header_u64(&m.headers, PREV_HEADER),
                    payload: m.payload,
                });
            }
            if got == 0 || batch.left == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// A batched direct get, asked again like any direct get
    /// ([`patiently`]); [`Apart::Refused`] when a server of an older
    /// version answered (a NATS cluster being upgraded).
    async fn batched<T, F, Fut>(&self, what: &str, get: F) -> Result<T, Apart>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, batch::BatchError>>,
    {
        match patiently(get).await {
            Ok(got) => Ok(got),
            Err(e @ batch::BatchError::Refused { .. }) => {
                tracing::debug!(error = %e, "{what}: a batched direct get was refused; reading apart");
                Err(Apart::Refused)
            }
            Err(e) => Err(Apart::No(self.fail(what, e))),
        }
    }

    /// From a batch of the room's first message after `after`, which the
    /// server ends with how many follow it (2.11 and later); else from the numbers of the
    /// room's last message and of its first after `after`; by a scan when
    /// either has no number (stored before numbers were, or by a process
    /// that does not write them).
    async fn count_inner(&self, room: &RoomName, after: u64) -> Result<u64, HistoryError> {
        let ns = self.namespace(room.namespace())?;
        self.connected().await?;
        let subject = room_subject(room);
        if self.batching() {
            let what = format!("count {subject}");
            let first = self.batched(&what, || {
                self.batch
                    .next(&ns.config.name, &subject, after.saturating_add(1), 1)
            });
            match first.await {
                Ok(b) => return Ok(b.messages.len() as u64 + b.left),
                Err(Apart::No(e)) => return Err(e),
                Err(Apart::Refused) => {}
            }
        }
        let last = self.last_direct(&ns, &subject).await?;
        if last.offset <= after {
            return Ok(0);
        }
        if let Some(next) = self.next_after(&ns, &subject, after).await?
            && let (Some(last_n), Some(next_n)) = (last.n, next.n)
            && next_n <= last_n
            && next.offset <= last.offset
        {
            return Ok(last_n - next_n + 1);
        }
        let start = DeliverPolicy::ByStartSequence {
            start_sequence: after.saturating_add(1),
        };
        let (pending, _) = self.scan(&ns.stream, subject, start, 0).await?;
        Ok(pending)
    }

    async fn bounded<T>(
        &self,
        what: &str,
        op: impl Future<Output = Result<T, HistoryError>>,
    ) -> Result<T, HistoryError> {
        tokio::time::timeout(OP_TIMEOUT, op)
            .await
            .unwrap_or_else(|_| {
                Err(HistoryError::unreachable(format!(
                    "{what}: no answer within {OP_TIMEOUT:?}"
                )))
            })
    }
}

/// Why a batched read did not answer: refused by a server that cannot
/// batch (read apart instead), or failed.
enum Apart {
    Refused,
    No(HistoryError),
}

/// Sends a read made of one direct get again when no answer came within
/// [`DIRECT_GET_PATIENCE`]. In a NATS cluster, direct gets sent in the
/// moments after their stream was created went unanswered until the API
/// timeout (5 s), and every connect of an edge waited that long for its
/// read markers; a read is idempotent, so asking again costs nothing.
async fn patiently<T, E, F, Fut>(mut read: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    for _ in 1..DIRECT_GET_ATTEMPTS {
        if let Ok(answered) = tokio::time::timeout(DIRECT_GET_PATIENCE, read()).await {
            return answered;
        }
        tracing::debug!("a direct get went unanswered for {DIRECT_GET_PATIENCE:?}; asking again");
    }
    read().await
}

fn number(headers: &async_nats::HeaderMap) -> Option<u64> {
    headers.get(N_HEADER)?.as_str().parse().ok()
}

fn header_u64(headers: &async_nats::HeaderMap, name: &str) -> u64 {
    headers
        .get(name)
        .and_then(|v| v.as_str().trim().parse().ok())
        .unwrap_or(0)
}

/// The room's real last sequence from a "wrong last sequence: N" error (the
/// server states it, which saves a round trip).
fn wrong_last_sequence(error: &str) -> Option<u64> {
    const TEXT: &str = "wrong last sequence: ";
    let at = error.rfind(TEXT)? + TEXT.len();
    let digits: String = error[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

impl History for JetStreamHistory {
    fn ensure_namespace(
        &self,
        ns: &str,
        limits: Limits,
    ) -> BoxFuture<'_, Result<(), HistoryError>> {
        let ns = ns.to_string();
        Box::pin(async move {
            self.bounded("ensure namespace", self.ensure(&ns, limits))
                .await
        })
    }

    fn epoch(&self, ns: &str) -> BoxFuture<'_, Result<String, HistoryError>> {
        let ns = ns.to_string();
        Box::pin(async move {
            let namespace = self.namespace(&ns)?;
            if let Some(epoch) = namespace.fresh_epoch() {
                return Ok(epoch);
            }
            self.connected().await?;
            self.bounded("epoch", self.refresh_epoch(&namespace)).await
        })
    }

    fn append(
        &self,
        room: &RoomName,
        payload: Bytes,
        key: Option<&str>,
    ) -> BoxFuture<'_, Result<Appended, HistoryError>> {
        let room = room.clone();
        let key = key.map(str::to_string);
        // Not bounded by OP_TIMEOUT: every wait inside has its own bound, and
        // cutting an append short midway would leave its outcome unknown.
        Box::pin(async move { self.append_inner(&room, payload, key.as_deref()).await })
    }

    fn read(
        &self,
        room: &RoomName,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Stored>, HistoryError>> {
        let room = room.clone();
        Box::pin(async move {
            self.bounded("read", self.read_inner(&room, after, limit))
                .await
        })
    }

    fn latest(&self, room: &RoomName) -> BoxFuture<'_, Result<u64, HistoryError>> {
        let room = room.clone();
        Box::pin(async move {
            let ns = self.namespace(room.namespace())?;
            self.connected().await?;
            self.bounded("latest", self.last_offset(&ns, &room_subject(&room)))
                .await
        })
    }

    fn count_after(&self, room: &RoomName, after: u64) -> BoxFuture<'_, Result<u64, HistoryError>> {
        let room = room.clone();
        Box::pin(async move { self.bounded("count", self.count_inner(&room, after)).await })
    }

    fn marker(
        &self,
        user: &str,
        room: &RoomName,
    ) -> BoxFuture<'_, Result<Option<u64>, HistoryError>> {
        let (user, room) = (user.to_string(), room.clone());
        Box::pin(async move {
            self.bounded("marker", self.marker_inner(&user, &room))
                .await
        })
    }

    fn set_marker(
        &self,
        user: &str,
        room: &RoomName,
        offset: u64,
    ) -> BoxFuture<'_, Result<u64, HistoryError>> {
        let (user, room) = (user.to_string(), room.clone());
        Box::pin(async move {
            self.bounded("set marker", self.set_marker_inner(&user, &room, offset))
                .await
        })
    }

    fn markers(&self, user: &str) -> BoxFuture<'_, Result<Vec<(RoomName, u64)>, HistoryError>> {
        let user = user.to_string();
        Box::pin(async move { self.bounded("markers", self.markers_inner(&user)).await })
    }

    fn inbox(&self, user: &str) -> BoxFuture<'_, Result<Inbox, HistoryError>> {
        let user = user.to_string();
        Box::pin(async move { self.bounded("inbox", self.inbox_inner(&user)).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_names() {
        assert_eq!(stream_name("chat-x_y"), "HERALD_CHAT_X_Y");
        let room = RoomName::parse("chat:a.b*c").unwrap();
        assert_eq!(room_subject(&room), "herald.durable.chat.chat:a%2Eb%2Ac");
        assert_eq!(
            crate::history::kv_encode("a.b"),
            "a=2Eb",
            "a user is one KV key token"
        );
    }

    #[test]
    fn reads_the_real_last_sequence_from_the_error() {
        let e = "wrong last sequence: wrong last sequence: 42 (code 400, error code 10071)";
        assert_eq!(wrong_last_sequence(e), Some(42));
        assert_eq!(wrong_last_sequence("wrong last sequence"), None);
    }
}
