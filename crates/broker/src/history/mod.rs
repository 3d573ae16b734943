//! Durable room history: the stored messages of durable rooms, numbered by
//! offset within an epoch, and each user's read markers.
//!
//! A cluster keeps history in JetStream ([`JetStreamHistory`]: one stream per
//! durable namespace, read markers beside each user's inbox or, on servers
//! before 2.11, in a KV bucket); the all-in-one mode keeps
//! it in memory ([`MemoryHistory`]). Both pass the same behavioural tests
//! (`tests/history.rs`).
//!
//! Every stored message carries `prev`, the offset of the room's message
//! before it at the moment it was stored. Offsets have gaps (a namespace
//! shares one sequence), so `prev` is what lets a reader tell "nothing was
//! lost" from "the history no longer reaches back": a replay after offset `a`
//! is complete exactly when its first message has `prev <= a`.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use herald_broker::history::{History, Limits, MemoryHistory};
//! use herald_wire::room::RoomName;
//! use std::time::Duration;
//!
//! let history = MemoryHistory::new();
//! let limits = Limits { max_messages_per_room: 1000, max_age: Duration::from_secs(3600) };
//! history.ensure_namespace("chat", limits).await.unwrap();
//! let room = RoomName::parse("chat:lobby").unwrap();
//! let first = history.append(&room, "hello".into(), None).await.unwrap();
//! let second = history.append(&room, "again".into(), Some("key-1")).await.unwrap();
//! assert_eq!(second.prev, first.offset);
//! let replay = history.read(&room, first.offset, 10).await.unwrap();
//! assert_eq!(replay.len(), 1);
//! assert!(replay[0].prev <= first.offset, "nothing missing after the first message");
//! # });
//! ```

mod jetstream;
mod memory;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_wire::room::{MAX_NAMESPACE_LEN, RoomName};

use crate::BoxFuture;
use crate::error::{Cause, said};

pub use jetstream::{
    EPOCH_TTL, JetStreamHistory, MARKER_BUCKET, N_HEADER, PREV_HEADER, markers_subject,
    room_subject, stream_name,
};
pub use memory::MemoryHistory;

/// How long a repeated idempotency key is recognised (and JetStream's
/// `duplicate_window`), unless the namespace's `max_age` is shorter.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(120);

/// Most read markers [`History::markers`] returns for one user.
pub const MAX_MARKERS_PER_USER: usize = 10_000;

/// How much history a durable namespace keeps. Zero means "no limit" for
/// either field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_messages_per_room: u64,
    pub max_age: Duration,
}

impl Limits {
    /// The deduplication window these limits allow: [`DEDUP_WINDOW`], or
    /// `max_age` when that is shorter (JetStream refuses a window longer than
    /// the age limit).
    pub fn dedup_window(&self) -> Duration {
        if self.max_age.is_zero() {
            DEDUP_WINDOW
        } else {
            DEDUP_WINDOW.min(self.max_age)
        }
    }
}

/// What [`History::append`] stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    /// The epoch the offset belongs to.
    pub epoch: String,
    pub offset: u64,
    /// The room's previous offset (0 if none) at the moment this was stored.
    pub prev: u64,
    /// The idempotency key was seen within the window: nothing new was
    /// stored; `offset` is the original message's (and `prev` may be 0).
    pub duplicate: bool,
}

/// A stored message, as [`History::read`] returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub offset: u64,
    /// The offset of the room's message before this one when it was stored
    /// (0 for the room's first). `prev` greater than the offset a reader
    /// asked to read after means messages in between are gone.
    pub prev: u64,
    pub payload: Bytes,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum HistoryError {
    /// The store is not reachable. Nothing was stored.
    #[error("the history store is not reachable")]
    Unavailable(#[source] Cause),
    /// An append was sent but its acknowledgement never came (a timeout, a
    /// lost connection): it may or may not be stored. Retrying with the same
    /// idempotency key within the dedup window stores it at most once and
    /// returns its offset.
    #[error(
        "the history store did not acknowledge the message: it may or may not be stored; retry with the same key to find out"
    )]
    Unconfirmed(#[source] Cause),
    /// The room's namespace was not set up as durable
    /// ([`History::ensure_namespace`]).
    #[error("namespace `{0}` is not durable")]
    NotDurable(String),
    #[error("the history store refused the operation")]
    Failed(#[source] Cause),
    /// Permanent: larger than the store takes (NATS's `max_payload`, with
    /// the headers that linearise the room). Nothing was stored.
    #[error("the message is {size} bytes; the history store takes at most {limit}")]
    TooLarge { size: usize, limit: usize },
}

impl HistoryError {
    /// Refused, for the reason `why` that Herald found itself.
    fn refused(why: impl Into<String>) -> HistoryError {
        HistoryError::Failed(said(why))
    }

    /// Not reachable, as `why` says.
    fn unreachable(why: impl Into<String>) -> HistoryError {
        HistoryError::Unavailable(said(why))
    }
}

/// A shared handle to whichever history store the process runs on.
pub type SharedHistory = Arc<dyn History>;

/// Durable room history and read markers. See the module documentation.
pub trait History: Send + Sync + 'static {
    /// Creates or updates (idempotently, at start-up) the storage of durable
    /// namespace `ns` with these limits. Rooms of namespaces never ensured by
    /// this handle are not durable ([`HistoryError::NotDurable`]).
    fn ensure_namespace(&self, ns: &str, limits: Limits)
    -> BoxFuture<'_, Result<(), HistoryError>>;

    /// The epoch of `ns`'s history: it names this history and changes when
    /// the history is recreated (JetStream: derived from the stream's creation
    /// time; memory: random per process). Offsets compare only within one
    /// epoch.
    fn epoch(&self, ns: &str) -> BoxFuture<'_, Result<String, HistoryError>>;

    /// Stores `payload` as the next message of `room`; returns only once it is
    /// stored (never `Ok` for something not stored).
    ///
    /// Offsets rise per room, with gaps (the namespace shares one sequence).
    /// `prev` is exact: appends to one room are linearised, from any number
    /// of processes. `key` makes the append idempotent per room: a repeat
    /// within the dedup window stores nothing and returns the original offset
    /// with `duplicate = true`.
    fn append(
        &self,
        room: &RoomName,
        payload: Bytes,
        key: Option<&str>,
    ) -> BoxFuture<'_, Result<Appended, HistoryError>>;

    /// Messages of `room` with offset > `after`, oldest first, at most
    /// `limit`. Only what is still retained: when the first message's `prev`
    /// is greater than `after`, the history no longer reaches back that far.
    fn read(
        &self,
        room: &RoomName,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Stored>, HistoryError>>;

    /// The room's latest offset, 0 when it has no message.
    fn latest(&self, room: &RoomName) -> BoxFuture<'_, Result<u64, HistoryError>>;

    /// How many stored messages of `room` have offset > `after`. Exact, in
    /// both implementations (JetStream: the pending count of a consumer
    /// filtered to the room, so one round trip whatever the count).
    fn count_after(&self, room: &RoomName, after: u64) -> BoxFuture<'_, Result<u64, HistoryError>>;

    /// `user`'s read marker in `room`: the offset read up to, if any.
    fn marker(
        &self,
        user: &str,
        room: &RoomName,
    ) -> BoxFuture<'_, Result<Option<u64>, HistoryError>>;

    /// Moves the marker forward only (the max of the old and new offsets);
    /// returns the marker now in effect.
    fn set_marker(
        &self,
        user: &str,
        room: &RoomName,
        offset: u64,
    ) -> BoxFuture<'_, Result<u64, HistoryError>>;

    /// All of `user`'s markers (at most [`MAX_MARKERS_PER_USER`]), ordered
    /// by room name.
    fn markers(&self, user: &str) -> BoxFuture<'_, Result<Vec<(RoomName, u64)>, HistoryError>>;

    /// What a connect reads: the latest offset of `user`'s personal room
    /// and all of their markers. JetStream on nats-server 2.11 or later
    /// reads both with one request; otherwise this is [`History::latest`]
    /// then [`History::markers`].
    fn inbox(&self, user: &str) -> BoxFuture<'_, Result<Inbox, HistoryError>> {
        let user = user.to_string();
        Box::pin(async move {
            let room = RoomName::user(&user).map_err(|e| HistoryError::refused(e.to_string()))?;
            let latest = self.latest(&room).await?;
            let markers = self.markers(&user).await;
            Ok(Inbox { latest, markers })
        })
    }
}

/// A user's personal room as a connect needs it ([`History::inbox`]).
#[derive(Debug)]
pub struct Inbox {
    /// The personal room's latest offset, 0 when it has no message.
    pub latest: u64,
    /// The user's read markers, ordered by room name. Apart: a connect goes
    /// on without them (and without unread counts) when they cannot be read.
    pub markers: Result<Vec<(RoomName, u64)>, HistoryError>,
}

/// Checks a namespace as [`RoomName`] does, so that it is one subject token
/// and part of a stream name.
fn check_namespace(ns: &str) -> Result<(), HistoryError> {
    let ok = !ns.is_empty()
        && ns.len() <= MAX_NAMESPACE_LEN
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(HistoryError::refused(format!(
            "`{ns}` is not a valid namespace (1 to {MAX_NAMESPACE_LEN} letters, digits, `_` or `-`)"
        )))
    }
}

fn check_user(user: &str) -> Result<(), HistoryError> {
    if user.is_empty() {
        Err(HistoryError::refused("empty user id"))
    } else {
        Ok(())
    }
}

/// Encodes `raw` into the characters a KV key token may hold: ASCII letters,
/// digits, `_` and `-` stay; every other byte becomes `=XX`. Injective, and
/// never produces `.`, so an encoded user is one KV key token.
fn kv_encode(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

/// The inverse of [`kv_encode`]; `None` for anything it cannot have produced.
#[cfg(test)]
fn kv_decode(encoded: &str) -> Option<String> {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let hex = encoded.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_encoding_round_trips_and_stays_in_the_key_alphabet() {
        for raw in ["chat:lobby", "a.b c/é=%>*", "user:x_y-z", "=41"] {
            let enc = kv_encode(raw);
            assert!(
                enc.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-=".contains(&b)),
                "{enc}"
            );
            assert_eq!(kv_decode(&enc).as_deref(), Some(raw));
        }
        assert_eq!(kv_encode("chat:lobby"), "chat=3Alobby");
        assert_eq!(kv_decode("=4"), None);
    }

    #[test]
    fn dedup_window_never_exceeds_max_age() {
        let l = |age| Limits {
            max_messages_per_room: 1,
            max_age: Duration::from_secs(age),
        };
        assert_eq!(l(0).dedup_window(), DEDUP_WINDOW);
        assert_eq!(l(3600).dedup_window(), DEDUP_WINDOW);
        assert_eq!(l(5).dedup_window(), Duration::from_secs(5));
    }

    #[test]
    fn namespaces_are_checked() {
        assert!(check_namespace("chat-2_x").is_ok());
        assert!(check_namespace("").is_err());
        assert!(check_namespace("a.b").is_err());
    }
}
