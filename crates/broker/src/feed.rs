//! The event feed for backends: what happened in the cluster (client
//! publishes, joins and leaves, connections, users going online and
//! offline, messages left unread), appended to a JetStream stream that any
//! number of backend consumer groups read at least once, with offsets and
//! replay. Also the reminders behind `user.unread`: a pending record per
//! message sent with `notify_after`, handed back to one worker once due.
//!
//! A cluster keeps both in JetStream ([`JetStreamFeed`]): the stream
//! [`FEED_STREAM`] captures `herald.feed.>`, and the work-queue stream
//! [`WORK_STREAM`] holds reminders, read by the durable pull consumer
//! [`UNREAD_CONSUMER`] that every router shares. A reminder read before it
//! is due is NAKed with the delay left (nats-server 2.7.1 and later), so it
//! survives router restarts and reaches one router at a time.
//!
//! Every append carries `Nats-Msg-Id` = the event's id, so a retry, or two
//! processes appending the same event, store it once within the stream's
//! duplicate window.
//!
//! `herald dev` has no JetStream: [`MemoryFeed`] keeps the last events in
//! memory (nothing outside the process can read them; they are logged at
//! debug level) and its reminders are timers, lost with the process.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, AckKind, Context};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::BoxFuture;
use crate::error::{Cause, During, cause, jetstream_failure, said};

/// The stream of feed events.
pub const FEED_STREAM: &str = "HERALD_FEED";
/// The work-queue stream of pending `notify_after` reminders.
pub const WORK_STREAM: &str = "HERALD_WORK";
/// The subject reminders are stored under.
pub const UNREAD_WORK_SUBJECT: &str = "herald.work.unread";
/// The durable pull consumer the routers share to take due reminders.
pub const UNREAD_CONSUMER: &str = "herald-unread";
/// How long a repeated event id is recognised, unless `max_age` is shorter.
pub const FEED_DEDUP_WINDOW: Duration = Duration::from_secs(120);

/// Bounds every JetStream API request and publish acknowledgement.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// A reminder handed to a worker and not finished within this is handed
/// out again.
const REMINDER_ACK_WAIT: Duration = Duration::from_secs(30);
/// Events [`MemoryFeed`] keeps.
const MEMORY_EVENTS: usize = 10_000;

/// Subject of client (and API) publishes in namespace `ns`.
pub fn publish_subject(ns: &str) -> String {
    format!("herald.feed.publish.{ns}")
}

/// Subject of joins and leaves of connections in namespace `ns`.
pub fn presence_subject(ns: &str) -> String {
    format!("herald.feed.presence.{ns}")
}

/// Subject of connects and disconnects.
pub const CONNECTION_SUBJECT: &str = "herald.feed.connection";
/// Subject of `user.unread` events.
pub const UNREAD_SUBJECT: &str = "herald.feed.unread";

/// Subject of a user's transitions, `online` or `offline`.
pub fn user_subject(event: &str) -> String {
    format!("herald.feed.user.{event}")
}

/// What the feed keeps, from `[feed]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedLimits {
    /// Events older than this are dropped; zero: no limit.
    pub max_age: Duration,
    /// The stream keeps at most this many bytes (oldest dropped); zero: no limit.
    pub max_bytes: u64,
}

/// One event, ready to append: its subject, its id (the dedupe key) and its
/// JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub subject: String,
    pub id: String,
    pub payload: Bytes,
}

impl Event {
    /// An event whose JSON object is `fields` with `id`, `type` and `ts_ms`.
    pub fn new(
        subject: String,
        id: String,
        kind: &str,
        ts_ms: u64,
        fields: serde_json::Map<String, serde_json::Value>,
    ) -> Event {
        let mut object = serde_json::Map::new();
        object.insert("id".into(), id.clone().into());
        object.insert("type".into(), kind.into());
        object.insert("ts_ms".into(), ts_ms.into());
        object.extend(fields);
        Event {
            subject,
            id,
            payload: serde_json::to_vec(&object)
                .expect("a JSON map serializes")
                .into(),
        }
    }
}

/// A message sent with `notify_after`, waiting for its deadline.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reminder {
    pub user: String,
    /// The personal room, `user:<id>`.
    pub room: String,
    pub epoch: String,
    pub offset: u64,
    /// When it was sent, ms since the epoch.
    pub sent_ms: u64,
    /// When it falls due, ms since the epoch.
    pub due_ms: u64,
    /// A device of the user was connected when it was sent (so it got it live).
    pub delivered: bool,
}

impl Reminder {
    /// The id of the reminder and of the `user.unread` event it may become:
    /// the same message always gets the same one.
    pub fn id(&self) -> String {
        format!("unread:{}:{}:{}", self.user, self.epoch, self.offset)
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FeedError {
    /// Not reachable: nothing was appended.
    #[error("the event feed is not reachable")]
    Unavailable(#[source] Cause),
    /// Sent, but never acknowledged: it may or may not be stored.
    #[error("the event feed did not acknowledge the event: it may or may not be stored")]
    Unconfirmed(#[source] Cause),
    /// The store answered with a refusal.
    #[error("the event feed refused the operation")]
    Failed(#[source] Cause),
}

/// The feed, in JetStream or in memory. See the module documentation.
pub trait Feed: Send + Sync + 'static {
    /// Creates or updates the streams (idempotent; at start-up).
    fn ensure(&self) -> BoxFuture<'_, Result<(), FeedError>>;

    /// Appends `event`, returning once it is stored (or known stored
    /// already under its id).
    fn append(&self, event: Event) -> BoxFuture<'_, Result<(), FeedError>>;

    /// Stores `reminder` until it is due.
    fn remind(&self, reminder: Reminder) -> BoxFuture<'_, Result<(), FeedError>>;

    /// Reminders as they fall due, for this process's worker (the only
    /// taker in this process). Each must be finished with [`Due::done`], or
    /// it is handed out again.
    fn reminders(&self) -> BoxFuture<'_, Result<mpsc::Receiver<Due>, FeedError>>;

    /// For logs: "JetStream" or "in memory".
    fn describe(&self) -> &'static str;
}

/// A shared handle to the feed.
#[derive(Clone)]
pub struct SharedFeed(pub Arc<dyn Feed>);

impl std::ops::Deref for SharedFeed {
    type Target = dyn Feed;
    fn deref(&self) -> &(dyn Feed + 'static) {
        &*self.0
    }
}

impl fmt::Debug for SharedFeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedFeed({})", self.0.describe())
    }
}

/// A reminder that fell due.
pub struct Due {
    pub reminder: Reminder,
    message: Option<jetstream::Message>,
}

impl Due {
    /// Finished: it will not be handed out again.
    pub async fn done(self) -> Result<(), FeedError> {
        match self.message {
            None => Ok(()),
            Some(m) => m.ack().await.map_err(|e| {
                FeedError::Unavailable(cause(During {
                    what: "acknowledge a reminder".into(),
                    source: cause(e),
                }))
            }),
        }
    }
}

/// The feed in JetStream. See the module documentation.
pub struct JetStreamFeed {
    client: async_nats::Client,
    js: Context,
    limits: FeedLimits,
    replicas: usize,
}

impl JetStreamFeed {
    pub fn new(client: async_nats::Client, limits: FeedLimits, replicas: usize) -> JetStreamFeed {
        let js = jetstream::context::ContextBuilder::new()
            .timeout(API_TIMEOUT)
            .build(client.clone());
        JetStreamFeed {
            client,
            js,
            limits,
            replicas: replicas.max(1),
        }
    }

    fn feed_config(&self) -> stream::Config {
        let dedup = if self.limits.max_age.is_zero() {
            FEED_DEDUP_WINDOW
        } else {
            FEED_DEDUP_WINDOW.min(self.limits.max_age)
        };
        stream::Config {
            name: FEED_STREAM.into(),
            subjects: vec!["herald.feed.>".into()],
            max_age: self.limits.max_age,
            max_bytes: if self.limits.max_bytes == 0 {
                -1
            } else {
                self.limits.max_bytes.min(i64::MAX as u64) as i64
            },
            duplicate_window: dedup,
            storage: StorageType::File,
            discard: DiscardPolicy::Old,
            num_replicas: self.replicas,
            description: Some("Herald event feed for backends".into()),
            ..Default::default()
        }
    }

    fn work_config(&self) -> stream::Config {
        stream::Config {
            name: WORK_STREAM.into(),
            subjects: vec!["herald.work.>".into()],
            retention: RetentionPolicy::WorkQueue,
            duplicate_window: FEED_DEDUP_WINDOW,
            storage: StorageType::File,
            num_replicas: self.replicas,
            description: Some("Herald pending notify_after reminders".into()),
            ..Default::default()
        }
    }

    async fn create_or_update(&self, wanted: stream::Config) -> Result<(), FeedError> {
        let name = wanted.name.clone();
        let stream = self
            .js
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|e| self.fail(&format!("stream {name}"), e))?;
        let current = stream.cached_info().config.clone();
        let mut merged = current.clone();
        merged.max_age = wanted.max_age;
        merged.max_bytes = wanted.max_bytes;
        merged.duplicate_window = wanted.duplicate_window;
        if merged != current {
            self.js
                .update_stream(merged)
                .await
                .map_err(|e| self.fail(&format!("update stream {name}"), e))?;
        }
        Ok(())
    }

    fn fail(
        &self,
        what: &str,
        e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> FeedError {
        match jetstream_failure(&self.client, what, e) {
            (during, true) => FeedError::Unavailable(during),
            (during, false) => FeedError::Failed(during),
        }
    }

    /// Publishes `payload` with `id` as `Nats-Msg-Id` and waits for the
    /// stream's acknowledgement.
    async fn store(&self, subject: String, id: &str, payload: Bytes) -> Result<(), FeedError> {
        if self.client.connection_state() != State::Connected {
            return Err(FeedError::Unavailable(said("not connected to NATS")));
        }
        let what = format!("append to {subject}");
        let publish = PublishMessage::build().payload(payload).message_id(id);
        let ack = self
            .js
            .send_publish(subject, publish)
            .await
            .map_err(|e| self.fail(&what, e))?;
        match ack.await {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
                ) =>
            {
                Err(FeedError::Unconfirmed(cause(During {
                    what,
                    source: cause(e),
                })))
            }
            Err(e) => Err(self.fail(&what, e)),
        }
    }

    async fn consumer(&self) -> Result<PullConsumer, FeedError> {
        let stream = self
            .js
            .get_stream(WORK_STREAM)
            .await
            .map_err(|e| self.fail(&format!("stream {WORK_STREAM}"), e))?;
        stream
            .get_or_create_consumer(
                UNREAD_CONSUMER,
                pull::Config {
                    durable_name: Some(UNREAD_CONSUMER.into()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: REMINDER_ACK_WAIT,
                    filter_subject: UNREAD_WORK_SUBJECT.into(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| self.fail(&format!("consumer {UNREAD_CONSUMER}"), e))
    }
}

/// Hands due reminders of `consumer` to `tx`; NAKs those not due yet with
/// the delay left. Returns when the consumer's message stream ends or fails.
async fn take_due(consumer: PullConsumer, tx: &mpsc::Sender<Due>) -> Result<(), FeedError> {
    let mut messages = consumer.messages().await.map_err(|e| {
        FeedError::Unavailable(cause(During {
            what: format!("read consumer {UNREAD_CONSUMER}"),
            source: cause(e),
        }))
    })?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| {
            FeedError::Unavailable(cause(During {
                what: format!("read consumer {UNREAD_CONSUMER}"),
                source: cause(e),
            }))
        })?;
        let reminder: Reminder = match serde_json::from_slice(&message.payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "a reminder that cannot be read was dropped");
                let _ = message.ack_with(AckKind::Term).await;
                continue;
            }
        };
        let now = now_ms();
        if reminder.due_ms > now {
            let left = Duration::from_millis(reminder.due_ms - now);
            let _ = message.ack_with(AckKind::Nak(Some(left))).await;
            continue;
        }
        let due = Due {
            reminder,
            message: Some(message),
        };
        if tx.send(due).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

impl Feed for JetStreamFeed {
    fn ensure(&self) -> BoxFuture<'_, Result<(), FeedError>> {
        Box::pin(async move {
            self.create_or_update(self.feed_config()).await?;
            self.create_or_update(self.work_config()).await
        })
    }

    fn append(&self, event: Event) -> BoxFuture<'_, Result<(), FeedError>> {
        Box::pin(async move { self.store(event.subject, &event.id, event.payload).await })
    }

    fn remind(&self, reminder: Reminder) -> BoxFuture<'_, Result<(), FeedError>> {
        Box::pin(async move {
            let payload = serde_json::to_vec(&reminder).expect("a reminder serializes");
            self.store(UNREAD_WORK_SUBJECT.into(), &reminder.id(), payload.into())
                .await
        })
    }

    fn reminders(&self) -> BoxFuture<'_, Result<mpsc::Receiver<Due>, FeedError>> {
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(64);
            let feed = JetStreamFeed {
                client: self.client.clone(),
                js: self.js.clone(),
                limits: self.limits.clone(),
                replicas: self.replicas,
            };
            tokio::spawn(async move {
                let mut warned = false;
                while !tx.is_closed() {
                    let outcome = match feed.consumer().await {
                        Ok(consumer) => take_due(consumer, &tx).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = outcome
                        && !warned
                    {
                        tracing::warn!(error = %crate::chain(&e), "reminders cannot be read now; retrying");
                        warned = true;
                    }
                    // Whatever ended the consumer's stream, it is not
                    // bound again in a tight loop.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
            Ok(rx)
        })
    }

    fn describe(&self) -> &'static str {
        "JetStream"
    }
}

/// The feed of `herald dev`. See the module documentation.
pub struct MemoryFeed {
    events: Mutex<VecDeque<Event>>,
    due_tx: mpsc::Sender<Due>,
    due_rx: Mutex<Option<mpsc::Receiver<Due>>>,
}

impl Default for MemoryFeed {
    fn default() -> Self {
        let (due_tx, due_rx) = mpsc::channel(1024);
        MemoryFeed {
            events: Mutex::new(VecDeque::new()),
            due_tx,
            due_rx: Mutex::new(Some(due_rx)),
        }
    }
}

impl MemoryFeed {
    /// The events kept (the last [`MEMORY_EVENTS`]), oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .expect("events")
            .iter()
            .cloned()
            .collect()
    }
}

impl Feed for MemoryFeed {
    fn ensure(&self) -> BoxFuture<'_, Result<(), FeedError>> {
        Box::pin(async { Ok(()) })
    }

    fn append(&self, event: Event) -> BoxFuture<'_, Result<(), FeedError>> {
        Box::pin(async move {
            tracing::debug!(target: "herald::feed", subject = %event.subject, "{}", String::from_utf8_lossy(&event.payload));
            let mut events = self.events.lock().expect("events");
            if events.iter().any(|e| e.id == event.id) {
                return Ok(());
            }
            if events.len() == MEMORY_EVENTS {
                events.pop_front();
            }
            events.push_back(event);
            Ok(())
        })
    }

    fn remind(&self, reminder: Reminder) -> BoxFuture<'_, Result<(), FeedError>> {
        Box::pin(async move {
            let tx = self.due_tx.clone();
            let wait = Duration::from_millis(reminder.due_ms.saturating_sub(now_ms()));
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let _ = tx
                    .send(Due {
                        reminder,
                        message: None,
                    })
                    .await;
            });
            Ok(())
        })
    }

    fn reminders(&self) -> BoxFuture<'_, Result<mpsc::Receiver<Due>, FeedError>> {
        Box::pin(async move {
            self.due_rx
                .lock()
                .expect("reminders")
                .take()
                .ok_or_else(|| {
                    FeedError::Failed(said("the reminders of this feed are taken already"))
                })
        })
    }

    fn describe(&self) -> &'static str {
        "in memory"
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_id_type_and_time() {
        let mut fields = serde_json::Map::new();
        fields.insert("room".into(), "chat:a".into());
        let e = Event::new(publish_subject("chat"), "x:1".into(), "publish", 7, fields);
        let v: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id":"x:1","type":"publish","ts_ms":7,"room":"chat:a"})
        );
        assert_eq!(e.subject, "herald.feed.publish.chat");
    }

    #[tokio::test]
    async fn memory_reminders_come_back_once_due_and_events_dedupe() {
        let feed = MemoryFeed::default();
        let mut due = feed.reminders().await.unwrap();
        assert!(feed.reminders().await.is_err(), "one taker");
        let r = Reminder {
            user: "a".into(),
            room: "user:a".into(),
            epoch: "e".into(),
            offset: 3,
            sent_ms: now_ms(),
            due_ms: now_ms() + 20,
            delivered: false,
        };
        feed.remind(r.clone()).await.unwrap();
        let got = due.recv().await.unwrap();
        assert!(now_ms() >= r.due_ms);
        assert_eq!(got.reminder, r);
        got.done().await.unwrap();
        let e = Event::new(
            UNREAD_SUBJECT.into(),
            r.id(),
            "user.unread",
            1,
            Default::default(),
        );
        feed.append(e.clone()).await.unwrap();
        feed.append(e).await.unwrap();
        assert_eq!(feed.events().len(), 1);
    }
}
