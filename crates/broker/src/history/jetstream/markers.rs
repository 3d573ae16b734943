//! Read markers in JetStream: each user's markers are one JSON object
//! room → offset, so that one get reads all of them.
//!
//! Where they live depends on the server:
//! - **nats-server 2.11 and later**: in the personal namespace's stream, on
//!   the subject `herald.durable.user.<inbox token>.markers`, next to the
//!   user's inbox. A connect then reads the inbox's last message and the
//!   markers with one batched direct get ([`super::batch`]). Each write
//!   replaces the last (`Nats-Rollup: sub`), only if it still is the last
//!   (`Nats-Expected-Last-Subject-Sequence`), and never expires whatever the
//!   inbox's age limit (`Nats-TTL: never`). The stream says which layout is
//!   in use: these need `allow_msg_ttl` and `allow_rollup_hdrs`, which are
//!   turned on (for good) by the first process that ensures the personal
//!   namespace on such a server.
//! - **Older servers**: in the KV bucket [`MARKER_BUCKET`], one key per
//!   user. A connect reads the inbox's last message and the markers with a
//!   direct get each.
//!
//! Where the bucket existed when the personal namespace was set up (a
//! deployment that ran on an older server, or an earlier Herald), its
//! markers are still read and merged in, the larger offset per room: a user
//! without markers in the stream has the bucket's, the first marker they
//! move copies the rest into the stream, and a process of an earlier
//! version still writing to the bucket during the upgrade is not lost. A
//! cold connect then costs a second get, as on an older server.

use std::collections::BTreeMap;

use async_nats::HeaderValue;
use async_nats::header::{NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_TTL};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::stream::{
    self, DirectGetErrorKind, DiscardPolicy, LastRawMessageErrorKind, StorageType,
};
use bytes::Bytes;
use herald_wire::room::{RoomName, USER_NAMESPACE};
use herald_wire::subjects::encode_token;

use super::{
    Apart, JetStreamHistory, MARKER_BUCKET, MAX_MARKER_ATTEMPTS, MAX_MARKERS_ENTRY, Namespace,
    patiently, room_subject,
};
use crate::history::{HistoryError, Inbox, MAX_MARKERS_PER_USER, check_user, kv_encode};

/// The subject of `user`'s markers in the personal namespace's stream.
pub fn markers_subject(user: &str) -> String {
    format!(
        "herald.durable.{USER_NAMESPACE}.{}.markers",
        encode_token(&format!("{USER_NAMESPACE}:{user}"))
    )
}

/// A user's markers as stored, with what a compare-and-set needs: the
/// stream sequence of the stream's entry, or the bucket entry's revision.
struct Stored {
    markers: BTreeMap<String, u64>,
    /// In the stream: the entry's sequence (0: none there yet).
    /// In the bucket: its revision (`None`: no entry yet).
    version: Option<u64>,
}

/// Where this process reads and writes markers.
enum Place<'a> {
    Stream {
        ns: std::sync::Arc<Namespace>,
        /// The bucket, when it held markers before the upgrade.
        legacy: Option<&'a kv::Store>,
    },
    Bucket(&'a kv::Store),
}

fn parse(user: &str, value: &[u8]) -> Result<BTreeMap<String, u64>, HistoryError> {
    serde_json::from_slice(value)
        .map_err(|e| HistoryError::refused(format!("the read markers of {user} do not parse: {e}")))
}

/// Sorted by room name already; a room that no longer parses (a rule
/// changed) is left out.
fn listed(markers: BTreeMap<String, u64>) -> Vec<(RoomName, u64)> {
    markers
        .into_iter()
        .filter_map(|(room, offset)| Some((RoomName::parse(&room).ok()?, offset)))
        .collect()
}

impl JetStreamHistory {
    /// Whether the personal namespace's stream, as the server has it, can
    /// hold markers; called when it is ensured. Also opens the bucket of an
    /// older layout, if there is one, to read markers written before.
    pub(super) async fn markers_in_stream(
        &self,
        config: &stream::Config,
    ) -> Result<bool, HistoryError> {
        let here = config.allow_message_ttl && config.allow_rollup;
        if here
            && self
                .fetch_epoch(&format!("KV_{MARKER_BUCKET}"))
                .await?
                .is_some()
        {
            let bucket = self.marker_bucket().await?;
            let _ = self.legacy.set(bucket.clone());
        }
        Ok(here)
    }

    /// The marker bucket, created on first use.
    ///
    /// Created as its stream directly, with the configuration async-nats
    /// would give it: `create_key_value` first asks for the account info,
    /// which async-nats 0.51 cannot parse from a 2.9 server.
    async fn marker_bucket(&self) -> Result<&kv::Store, HistoryError> {
        self.markers
            .get_or_try_init(|| async {
                self.connected().await?;
                if let Ok(store) = self.js.get_key_value(MARKER_BUCKET).await {
                    return Ok(store);
                }
                self.js
                    .get_or_create_stream(stream::Config {
                        name: format!("KV_{MARKER_BUCKET}"),
                        description: Some("Herald read markers: <user> → {room: offset}".into()),
                        subjects: vec![format!("$KV.{MARKER_BUCKET}.>")],
                        max_messages_per_subject: 1,
                        // Counts headers too (2.9): the JSON plus the CAS header.
                        max_message_size: (MAX_MARKERS_ENTRY + 1024) as i32,
                        storage: StorageType::File,
                        num_replicas: self.replicas,
                        allow_rollup: true,
                        deny_delete: true,
                        allow_direct: true,
                        discard: DiscardPolicy::New,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| self.fail("create the read marker bucket", e))?;
                self.js
                    .get_key_value(MARKER_BUCKET)
                    .await
                    .map_err(|e| self.fail("open the read marker bucket", e))
            })
            .await
    }

    /// Where markers are: in the personal namespace's stream once it has
    /// been ensured on a server that can hold them there, else the bucket.
    /// On such a server, nothing until then: a bucket made meanwhile would
    /// cost every later connect a second read.
    async fn place(&self) -> Result<Place<'_>, HistoryError> {
        match self.namespace(USER_NAMESPACE) {
            Ok(ns) if ns.markers_here => Ok(Place::Stream {
                ns,
                legacy: self.legacy.get(),
            }),
            Ok(_) => Ok(Place::Bucket(self.marker_bucket().await?)),
            Err(_) if self.batching() => Err(HistoryError::unreachable(
                "read markers: the personal namespace's stream is not set up yet",
            )),
            Err(_) => Ok(Place::Bucket(self.marker_bucket().await?)),
        }
    }

    /// All of `user`'s markers. `exact`: read from the stream's leader, as a
    /// compare-and-set must (a direct get may be answered by a replica that
    /// lags a moment behind).
    async fn stored(&self, user: &str, exact: bool) -> Result<Stored, HistoryError> {
        check_user(user)?;
        match self.place().await? {
            Place::Stream { ns, legacy } => {
                self.connected().await?;
                let subject = markers_subject(user);
                let found = if exact {
                    match ns.stream.get_last_raw_message_by_subject(&subject).await {
                        Ok(m) => Some((m.sequence, m.payload)),
                        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => None,
                        Err(e) => return Err(self.fail("read markers", e)),
                    }
                } else {
                    match patiently(|| ns.stream.direct_get_last_for_subject(&subject)).await {
                        Ok(m) => Some((m.sequence, m.payload)),
                        Err(e) if e.kind() == DirectGetErrorKind::NotFound => None,
                        Err(e) => return Err(self.fail("read markers", e)),
                    }
                };
                let (in_stream, seq) = match found {
                    Some((seq, value)) => (parse(user, &value)?, seq),
                    None => (BTreeMap::new(), 0),
                };
                Ok(Stored {
                    markers: self.with_legacy(legacy, user, in_stream).await?,
                    version: Some(seq),
                })
            }
            Place::Bucket(kv) => {
                let (markers, revision) = self.bucket_markers(kv, user).await?;
                Ok(Stored {
                    markers,
                    version: revision,
                })
            }
        }
    }

    async fn bucket_markers(
        &self,
        kv: &kv::Store,
        user: &str,
    ) -> Result<(BTreeMap<String, u64>, Option<u64>), HistoryError> {
        let key = kv_encode(user);
        let entry = patiently(|| kv.entry(key.as_str()))
            .await
            .map_err(|e| self.fail("read markers", e))?;
        match entry.filter(|e| e.operation == kv::Operation::Put) {
            Some(entry) => Ok((parse(user, &entry.value)?, Some(entry.revision))),
            None => Ok((BTreeMap::new(), None)),
        }
    }

    /// `markers` with, where the bucket of before the upgrade exists, its
    /// markers for `user`: the larger of the two per room. Processes of
    /// an earlier version may still be writing there while the cluster is
    /// upgraded, and a marker only moves forward, so the larger is right.
    async fn with_legacy(
        &self,
        legacy: Option<&kv::Store>,
        user: &str,
        mut markers: BTreeMap<String, u64>,
    ) -> Result<BTreeMap<String, u64>, HistoryError> {
        let Some(kv) = legacy else {
            return Ok(markers);
        };
        for (room, offset) in self.bucket_markers(kv, user).await?.0 {
            let marker = markers.entry(room).or_default();
            *marker = (*marker).max(offset);
        }
        Ok(markers)
    }

    pub(super) async fn marker_inner(
        &self,
        user: &str,
        room: &RoomName,
    ) -> Result<Option<u64>, HistoryError> {
        Ok(self
            .stored(user, false)
            .await?
            .markers
            .get(room.as_str())
            .copied())
    }

    pub(super) async fn markers_inner(
        &self,
        user: &str,
    ) -> Result<Vec<(RoomName, u64)>, HistoryError> {
        Ok(listed(self.stored(user, false).await?.markers))
    }

    /// The inbox's last offset and the user's markers: one batched direct
    /// get where the stream holds the markers, else a direct get each.
    pub(super) async fn inbox_inner(&self, user: &str) -> Result<Inbox, HistoryError> {
        check_user(user)?;
        let ns = self.namespace(USER_NAMESPACE)?;
        let inbox =
            room_subject(&RoomName::user(user).map_err(|e| HistoryError::refused(e.to_string()))?);
        self.connected().await?;
        let apart = || async {
            let latest = self.last_offset(&ns, &inbox).await?;
            let markers = self.markers_inner(user).await;
            Ok(Inbox { latest, markers })
        };
        if !ns.markers_here {
            return apart().await;
        }
        let markers = markers_subject(user);
        let subjects = [inbox.as_str(), markers.as_str()];
        let what = "the inbox's last message and the read markers";
        let found = self.batched(what, || self.batch.last_of(&ns.config.name, &subjects));
        let found = match found.await {
            Ok(found) => found,
            // A replica on an older server (a cluster being upgraded)
            // answers a batch with an error: read the two apart.
            Err(Apart::Refused) => return apart().await,
            Err(Apart::No(e)) => return Err(e),
        };
        let latest = found
            .iter()
            .find(|m| m.subject.as_str() == inbox)
            .map_or(0, |m| m.sequence);
        let in_stream = match found.iter().find(|m| m.subject.as_str() == markers) {
            Some(m) => parse(user, &m.payload),
            None => Ok(BTreeMap::new()),
        };
        let markers = match in_stream {
            Ok(in_stream) => self
                .with_legacy(self.legacy.get(), user, in_stream)
                .await
                .map(listed),
            Err(e) => Err(e),
        };
        Ok(Inbox { latest, markers })
    }

    pub(super) async fn set_marker_inner(
        &self,
        user: &str,
        room: &RoomName,
        offset: u64,
    ) -> Result<u64, HistoryError> {
        let place = self.place().await?;
        // Compare-and-set on the entry: concurrent setters (other devices,
        // other rooms) retry, and the larger offset wins.
        for _ in 0..MAX_MARKER_ATTEMPTS {
            let Stored {
                mut markers,
                version,
            } = self.stored(user, true).await?;
            match markers.get(room.as_str()) {
                Some(&old) if old >= offset => return Ok(old),
                Some(_) => {}
                None if markers.len() >= MAX_MARKERS_PER_USER => {
                    return Err(HistoryError::refused(format!(
                        "{user} has read markers in {MAX_MARKERS_PER_USER} rooms, the most kept"
                    )));
                }
                None => {}
            }
            markers.insert(room.to_string(), offset);
            let value = Bytes::from(serde_json::to_vec(&markers).expect("a map of numbers"));
            if value.len() > MAX_MARKERS_ENTRY {
                return Err(HistoryError::refused(format!(
                    "the read markers of {user} would take {} bytes, more than the {MAX_MARKERS_ENTRY} kept",
                    value.len()
                )));
            }
            let written = match &place {
                Place::Stream { .. } => {
                    self.write_to_stream(user, value, version.unwrap_or(0))
                        .await?
                }
                Place::Bucket(kv) => self.write_to_bucket(kv, user, value, version).await?,
            };
            if written {
                return Ok(offset);
            }
        }
        Err(HistoryError::refused(format!(
            "marker of {user} in {room}: too many concurrent updates"
        )))
    }

    /// Replaces the user's markers entry in the stream if its sequence is
    /// still `last` (0: none yet); `false` when another write came first.
    async fn write_to_stream(
        &self,
        user: &str,
        value: Bytes,
        last: u64,
    ) -> Result<bool, HistoryError> {
        let subject = markers_subject(user);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, HeaderValue::from(last));
        headers.insert("Nats-Rollup", "sub");
        // The inbox's age limit is for messages, not for where a user is.
        headers.insert(NATS_MESSAGE_TTL, "never");
        let sent = self
            .js
            .publish_with_headers(subject.clone(), headers, value)
            .await
            .map_err(|e| self.fail("set marker", e))?;
        match sent.await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
            Err(e) => Err(self.unacknowledged(&format!("set marker on {subject}"), e)),
        }
    }

    async fn write_to_bucket(
        &self,
        kv: &kv::Store,
        user: &str,
        value: Bytes,
        revision: Option<u64>,
    ) -> Result<bool, HistoryError> {
        let key = kv_encode(user);
        match revision {
            Some(revision) => match kv.update(&key, value, revision).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(false),
                Err(e) => Err(self.fail("set marker", e)),
            },
            None => match kv.create(&key, value).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(self.fail("set marker", e)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_markers_sit_next_to_their_inbox() {
        let inbox = room_subject(&RoomName::user("a.b*c").unwrap());
        assert_eq!(markers_subject("a.b*c"), format!("{inbox}.markers"));
        assert_eq!(inbox, "herald.durable.user.user:a%2Eb%2Ac");
    }
}
