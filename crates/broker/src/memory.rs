//! The in-memory broker of the all-in-one mode: NATS core semantics inside
//! one process, with nothing to install.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream_shim::ReceiverStream;

use crate::{BoxFuture, Broker, BrokerError, Message, Subscription, subject_matches};

/// Messages a subscriber may have waiting before new ones are dropped, as a
/// NATS server drops messages for a slow consumer.
const SUBSCRIBER_CAPACITY: usize = 65_536;

struct Sub {
    id: u64,
    pattern: String,
    group: Option<String>,
    tx: mpsc::Sender<Message>,
}

#[derive(Default)]
struct Table {
    /// Subscriptions without wildcards, by subject: the common case (rooms)
    /// costs one hash lookup per publish.
    exact: HashMap<String, Vec<Sub>>,
    /// Subscriptions to `<prefix>.*` with no other wildcard, by prefix: an
    /// edge holds up to 1024 of these (personal room shards), too many to
    /// match one by one on every publish.
    prefix: HashMap<String, Vec<Sub>>,
    wildcard: Vec<Sub>,
}

impl Table {
    /// The subscriptions whose pattern may match `subject`, after dropping
    /// those whose subscriber is gone.
    fn candidates<'a>(&'a mut self, subject: &'a str) -> impl Iterator<Item = &'a Sub> + 'a {
        let parent = subject.rsplit_once('.').map(|(parent, _)| parent);
        prune(&mut self.exact, subject);
        if let Some(parent) = parent {
            prune(&mut self.prefix, parent);
        }
        self.wildcard.retain(|s| !s.tx.is_closed());
        let Table {
            exact,
            prefix,
            wildcard,
        } = self;
        exact
            .get(subject)
            .into_iter()
            .chain(parent.and_then(|p| prefix.get(p)))
            .flatten()
            .chain(
                wildcard
                    .iter()
                    .filter(move |s| subject_matches(&s.pattern, subject)),
            )
    }
}

fn prune(subs: &mut HashMap<String, Vec<Sub>>, key: &str) {
    if let Some(list) = subs.get_mut(key) {
        list.retain(|s| !s.tx.is_closed());
        if list.is_empty() {
            subs.remove(key);
        }
    }
}

/// The `<prefix>` of a `<prefix>.*` pattern without other wildcards.
fn single_wildcard_prefix(pattern: &str) -> Option<&str> {
    let prefix = pattern.strip_suffix(".*")?;
    (!prefix.split('.').any(|tok| tok == "*" || tok == ">")).then_some(prefix)
}

#[derive(Clone, Default)]
pub struct MemoryBroker {
    table: Arc<Mutex<Table>>,
    ids: Arc<AtomicU64>,
}

impl MemoryBroker {
    pub fn new() -> MemoryBroker {
        MemoryBroker::default()
    }

    fn add(&self, pattern: String, group: Option<String>) -> Subscription {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_CAPACITY);
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let sub = Sub {
            id,
            pattern,
            group,
            tx,
        };
        let mut t = self.table.lock().expect("broker table");
        if let Some(prefix) = single_wildcard_prefix(&sub.pattern) {
            t.prefix.entry(prefix.to_string()).or_default().push(sub);
        } else if sub.pattern.split('.').any(|tok| tok == "*" || tok == ">") {
            t.wildcard.push(sub);
        } else {
            t.exact.entry(sub.pattern.clone()).or_default().push(sub);
        }
        Subscription::new(ReceiverStream::new(rx))
    }

    fn deliver(&self, msg: Message) {
        let mut t = self.table.lock().expect("broker table");
        let mut groups: HashMap<&str, Vec<&Sub>> = HashMap::new();
        let mut plain: Vec<&Sub> = Vec::new();
        for s in t.candidates(&msg.subject) {
            match &s.group {
                Some(g) => groups.entry(g.as_str()).or_default().push(s),
                None => plain.push(s),
            }
        }
        // One member per queue group; rotating by message id spreads load.
        let pick = self.ids.fetch_add(1, Ordering::Relaxed) as usize;
        for members in groups.values() {
            plain.push(members[pick % members.len()]);
        }
        for s in plain {
            if s.tx.try_send(msg.clone()).is_err() {
                tracing::warn!(subject = %msg.subject, sub = s.id, "in-memory subscriber is full; message dropped");
            }
        }
    }

    fn has_subscriber(&self, subject: &str) -> bool {
        let mut t = self.table.lock().expect("broker table");
        t.candidates(subject).next().is_some()
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, subject: String, payload: Bytes) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.deliver(Message {
            subject,
            payload,
            reply: None,
        });
        Box::pin(async { Ok(()) })
    }

    fn publish_with_reply(
        &self,
        subject: String,
        reply: String,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.deliver(Message {
            subject,
            payload,
            reply: Some(reply),
        });
        Box::pin(async { Ok(()) })
    }

    fn subscribe(&self, subject: String) -> BoxFuture<'_, Result<Subscription, BrokerError>> {
        let sub = self.add(subject, None);
        Box::pin(async { Ok(sub) })
    }

    fn queue_subscribe(
        &self,
        subject: String,
        group: String,
    ) -> BoxFuture<'_, Result<Subscription, BrokerError>> {
        let sub = self.add(subject, Some(group));
        Box::pin(async { Ok(sub) })
    }

    fn request(
        &self,
        subject: String,
        payload: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Bytes, BrokerError>> {
        Box::pin(async move {
            if !self.has_subscriber(&subject) {
                return Err(BrokerError::NoResponders(subject));
            }
            let inbox = format!("_INBOX.{}", self.ids.fetch_add(1, Ordering::Relaxed));
            let mut sub = self.add(inbox.clone(), None);
            self.deliver(Message {
                subject,
                payload,
                reply: Some(inbox),
            });
            match tokio::time::timeout(timeout, sub.next()).await {
                Ok(Some(m)) => Ok(m.payload),
                Ok(None) => Err(BrokerError::Failed(crate::error::said(
                    "the reply inbox closed",
                ))),
                Err(_) => Err(BrokerError::Timeout(timeout)),
            }
        })
    }

    fn confirm(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        // A publish is delivered before it returns.
        Box::pin(async { Ok(()) })
    }

    fn is_connected(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        "in-memory broker".into()
    }
}

/// `tokio_stream::wrappers::ReceiverStream`, without the extra dependency.
mod tokio_stream_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::sync::mpsc;

    pub struct ReceiverStream<T>(mpsc::Receiver<T>);

    impl<T> ReceiverStream<T> {
        pub fn new(rx: mpsc::Receiver<T>) -> Self {
            ReceiverStream(rx)
        }
    }

    impl<T> futures::Stream for ReceiverStream<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}
