//! The in-memory broker of the all-in-one mode: NATS core semantics inside
//! one process, with nothing to install.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream_shim::ReceiverStream;

use crate::{
    BoxFuture, Broker, BrokerError, Headers, Mark, Message, Subscription, subject_matches,
};

/// Messages a subscriber may have waiting. One that falls further behind
/// is a slow consumer: its subscription is closed (it gets what was already
/// queued, then the end), as a NATS server closes a slow consumer, rather
/// than losing messages one by one for as long as the flood lasts.
const SUBSCRIBER_CAPACITY: usize = 65_536;

/// Slow consumers are logged at most this often, with a count.
const LOG_EVERY: Duration = Duration::from_secs(1);

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

impl Table {
    /// Ends subscription `id`: its subscriber gets what is queued, then the end.
    fn close(&mut self, id: u64) {
        for list in self.exact.values_mut().chain(self.prefix.values_mut()) {
            list.retain(|s| s.id != id);
        }
        self.wildcard.retain(|s| s.id != id);
        self.exact.retain(|_, l| !l.is_empty());
        self.prefix.retain(|_, l| !l.is_empty());
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
    slow: Arc<SlowConsumers>,
}

/// Subscriptions closed for falling behind: a count, and when the log last
/// said so.
#[derive(Default)]
struct SlowConsumers {
    closed: AtomicU64,
    logged: Mutex<Option<(std::time::Instant, u64)>>,
}

impl SlowConsumers {
    fn closed(&self, pattern: &str) {
        let total = self.closed.fetch_add(1, Ordering::Relaxed) + 1;
        let mut logged = self.logged.lock().expect("slow consumer log");
        let now = std::time::Instant::now();
        let since = match *logged {
            Some((at, _)) if now.duration_since(at) < LOG_EVERY => return,
            Some((_, count)) => total - count,
            None => total,
        };
        *logged = Some((now, total));
        tracing::warn!(
            pattern,
            closed_since_last_report = since,
            closed_in_all = total,
            "an in-memory subscriber fell {SUBSCRIBER_CAPACITY} messages behind; its subscription is closed, as NATS closes a slow consumer"
        );
    }
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
        let mut slow = Vec::new();
        for s in plain {
            if let Err(mpsc::error::TrySendError::Full(_)) = s.tx.try_send(msg.clone()) {
                slow.push((s.id, s.pattern.clone()));
            }
        }
        for (id, pattern) in slow {
            t.close(id);
            self.slow.closed(&pattern);
        }
    }

    /// How many subscriptions were closed as slow consumers.
    pub fn slow_consumers(&self) -> u64 {
        self.slow.closed.load(Ordering::Relaxed)
    }

    fn has_subscriber(&self, subject: &str) -> bool {
        let mut t = self.table.lock().expect("broker table");
        t.candidates(subject).next().is_some()
    }
}

impl MemoryBroker {
    /// Every kind of publish: delivered before this returns.
    fn post(
        &self,
        subject: String,
        reply: Option<String>,
        headers: Option<Headers>,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.deliver(Message {
            subject,
            payload,
            reply,
            headers,
        });
        Box::pin(async { Ok(()) })
    }

    /// A request: the reply comes on an inbox of its own.
    async fn ask(
        &self,
        subject: String,
        headers: Option<Headers>,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, BrokerError> {
        if !self.has_subscriber(&subject) {
            return Err(BrokerError::NoResponders(subject));
        }
        let inbox = format!("_INBOX.{}", self.ids.fetch_add(1, Ordering::Relaxed));
        let mut sub = self.add(inbox.clone(), None);
        self.deliver(Message {
            subject,
            payload,
            reply: Some(inbox),
            headers,
        });
        match tokio::time::timeout(timeout, sub.next()).await {
            Ok(Some(m)) => Ok(m.payload),
            Ok(None) => Err(BrokerError::Failed(crate::error::said(
                "the reply inbox closed",
            ))),
            Err(_) => Err(BrokerError::Timeout(timeout)),
        }
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, subject: String, payload: Bytes) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.post(subject, None, None, payload)
    }

    fn publish_with_headers(
        &self,
        subject: String,
        headers: Headers,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.post(subject, None, Some(headers), payload)
    }

    fn publish_with_reply(
        &self,
        subject: String,
        reply: String,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.post(subject, Some(reply), None, payload)
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

    fn publish_with_reply_and_headers(
        &self,
        subject: String,
        reply: String,
        headers: Headers,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.post(subject, Some(reply), Some(headers), payload)
    }

    fn request_with_headers(
        &self,
        subject: String,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Bytes, BrokerError>> {
        Box::pin(self.ask(subject, Some(headers), payload, timeout))
    }

    fn request(
        &self,
        subject: String,
        payload: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Bytes, BrokerError>> {
        Box::pin(self.ask(subject, None, payload, timeout))
    }

    fn mark(&self) -> Mark {
        Mark(0)
    }

    fn publishable(&self) -> Result<Mark, BrokerError> {
        Ok(Mark(0))
    }

    fn confirm(&self, _since: Mark) -> BoxFuture<'_, Result<(), BrokerError>> {
        // A publish is delivered before it returns.
        Box::pin(async { Ok(()) })
    }

    fn continuity(&self) -> u64 {
        // Delivery is a function call: nothing is ever missed.
        0
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A subscriber that stops reading gets what was queued, then the end of
    /// its subscription; one that reads misses nothing.
    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_closed_and_others_are_not() {
        let broker = MemoryBroker::new();
        let mut stalled = broker.subscribe("t.flood".into()).await.unwrap();
        let mut reading = broker.subscribe("t.>".into()).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut got = 0u64;
            while let Some(m) = reading.next().await {
                got += 1;
                if m.payload == "last" {
                    return got;
                }
            }
            got
        });
        for i in 0..SUBSCRIBER_CAPACITY + 10 {
            broker
                .publish("t.flood".into(), Bytes::from(i.to_string()))
                .await
                .unwrap();
            // Let the reader keep up, as a subscriber that is not slow does.
            if i % 1024 == 0 {
                tokio::task::yield_now().await;
            }
        }
        broker
            .publish("t.flood".into(), "last".into())
            .await
            .unwrap();
        assert_eq!(broker.slow_consumers(), 1);
        let mut queued = 0;
        while let Some(m) = stalled.next().await {
            assert_eq!(m.payload, Bytes::from(queued.to_string()), "in order");
            queued += 1;
        }
        assert_eq!(queued, SUBSCRIBER_CAPACITY, "the queue, then the end");
        assert_eq!(reader.await.unwrap(), SUBSCRIBER_CAPACITY as u64 + 11);
    }
}
