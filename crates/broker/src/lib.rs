//! The broker: how Herald processes reach each other. A cluster uses NATS
//! ([`NatsBroker`]); the all-in-one mode uses [`MemoryBroker`] inside one
//! process. Both sit behind [`Broker`] and pass the same behavioural tests
//! (`tests/contract.rs`), so services never know which one they run on.
//!
//! Semantics are NATS core semantics: subjects of `.`-separated tokens, `*`
//! and `>` wildcards in subscriptions, queue groups that deliver each message
//! to one member, request/reply through a reply subject, at-most-once
//! delivery, and per-publisher ordering.
//!
//! Durable room history (JetStream streams and KV, or memory) is the
//! [`history`] module, behind its own trait.
#![forbid(unsafe_code)]

pub mod coalesce;
mod error;
pub mod feed;
pub mod history;
mod memory;
mod metrics;
mod nats;
pub mod rooms;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;

pub use error::{Cause, Chain, cause, chain};
pub use memory::MemoryBroker;
pub use metrics::register_metrics;
pub use nats::RESUME_SETTLE;
pub use nats::{NatsBroker, NatsSecurity};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A shared handle to whichever broker the process runs on.
pub type SharedBroker = Arc<dyn Broker>;

/// Message headers (NATS headers): the trace context, when tracing is on.
pub type Headers = async_nats::HeaderMap;

/// The trace context of `span` as message headers, for the subscriber's
/// span to join the trace; `None`, at no cost, when traces are not exported.
pub fn trace_headers(span: &tracing::Span) -> Option<Headers> {
    let mut headers: Option<Headers> = None;
    herald_telemetry::inject(span, |key, value| {
        headers
            .get_or_insert_with(Headers::new)
            .insert(key, value.as_str());
    });
    headers
}

/// A message as a subscriber receives it.
#[derive(Debug, Clone)]
pub struct Message {
    pub subject: String,
    pub payload: Bytes,
    /// Where to send the answer, for requests.
    pub reply: Option<String>,
    pub headers: Option<Headers>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("the message broker is not reachable")]
    Unavailable(#[source] Cause),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("nobody is listening on `{0}`")]
    NoResponders(String),
    #[error("the message broker refused the operation")]
    Failed(#[source] Cause),
    /// Permanent: larger than the broker takes (NATS's `max_payload`).
    /// Retrying the same message cannot succeed.
    #[error("the message is {size} bytes; the broker takes at most {limit}")]
    TooLarge { size: usize, limit: usize },
    /// Sent, but the broker's receipt was not confirmed (the connection was
    /// lost, or the server did not answer in time): the message may or may
    /// not have been published. Unlike [`BrokerError::Unavailable`], which
    /// means nothing was sent.
    #[error(
        "the message broker did not confirm the message: it may or may not have been published"
    )]
    Unconfirmed(#[source] Cause),
}

impl BrokerError {
    /// Unreachable, because of `e`.
    pub fn unavailable(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BrokerError {
        BrokerError::Unavailable(cause(e))
    }
}

pub trait Broker: Send + Sync + 'static {
    /// Publishes `payload` on `subject`. Messages from one publisher reach each
    /// subscriber in the order they were published.
    fn publish(&self, subject: String, payload: Bytes) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// [`Broker::publish`] with headers, which subscribers receive with the
    /// message.
    fn publish_with_headers(
        &self,
        subject: String,
        headers: Headers,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// [`Broker::publish_with_headers`] when there are headers (a trace
    /// context), [`Broker::publish`] otherwise.
    fn publish_maybe_headers(
        &self,
        subject: String,
        headers: Option<Headers>,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        match headers {
            Some(headers) => self.publish_with_headers(subject, headers, payload),
            None => self.publish(subject, payload),
        }
    }

    /// Publishes with a reply subject (the request half of request/reply).
    fn publish_with_reply(
        &self,
        subject: String,
        reply: String,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Where this client's connection to the broker stands: take it before
    /// publishing, then [`Broker::confirm`] it.
    fn mark(&self) -> Mark;

    /// Like [`Broker::mark`], but refuses (`Unavailable`) when a publish now
    /// could not be confirmed truthfully: the broker is unreachable, or it
    /// came back less than [`RESUME_SETTLE`] ago, before every other process
    /// could be listening again. Nothing is to be sent then.
    fn publishable(&self) -> Result<Mark, BrokerError>;

    /// Returns once the broker has received everything this client
    /// published since `since` was taken, on the same connection. Concurrent
    /// calls share one round trip. `Unconfirmed` when the connection was
    /// lost in between (what was sent may or may not have arrived) or the
    /// broker did not answer in time.
    fn confirm(&self, since: Mark) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Subscribes to `subject` (wildcards allowed). When this returns, the
    /// subscription is live: every message published afterwards, by anyone,
    /// reaches it. Dropping the subscription unsubscribes.
    fn subscribe(&self, subject: String) -> BoxFuture<'_, Result<Subscription, BrokerError>>;

    /// Like [`Broker::subscribe`], but each message goes to one member of
    /// `group`.
    fn queue_subscribe(
        &self,
        subject: String,
        group: String,
    ) -> BoxFuture<'_, Result<Subscription, BrokerError>>;

    /// [`Broker::publish_with_reply`] with headers.
    fn publish_with_reply_and_headers(
        &self,
        subject: String,
        reply: String,
        headers: Headers,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// [`Broker::request`] with headers, which the responder receives.
    fn request_with_headers(
        &self,
        subject: String,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Bytes, BrokerError>>;

    /// Sends a request and waits for the first reply.
    fn request(
        &self,
        subject: String,
        payload: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Bytes, BrokerError>>;

    /// Whether the broker is reachable right now (readiness).
    fn is_connected(&self) -> bool;

    /// A number that moves whenever this client's subscriptions may have
    /// missed messages: the connection dropped or came back, or a
    /// subscription fell so far behind that the client dropped some (a slow
    /// consumer). What was learned from a subscription's messages while it
    /// stayed the same is complete; across a change it may not be.
    fn continuity(&self) -> u64;

    /// A human-readable name for logs: "nats://..." or "in-memory".
    fn describe(&self) -> String;
}

/// A point in the life of a client's broker connection ([`Broker::mark`]):
/// which connection (the n-th since the process started) carried what was
/// published after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark(pub(crate) u64);

/// A live subscription: a stream of messages. Unsubscribes when dropped.
pub struct Subscription {
    inner: Pin<Box<dyn Stream<Item = Message> + Send>>,
}

impl Subscription {
    fn new(inner: impl Stream<Item = Message> + Send + 'static) -> Subscription {
        Subscription {
            inner: Box::pin(inner),
        }
    }

    /// The next message, or `None` once the broker closed the subscription.
    pub async fn next(&mut self) -> Option<Message> {
        futures::StreamExt::next(self).await
    }
}

impl Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// A readiness check for the broker: `Err` while it is unreachable.
pub fn readiness(broker: &SharedBroker) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
    let broker = broker.clone();
    move || {
        if broker.is_connected() {
            Ok(())
        } else {
            Err(format!("{} is not connected", broker.describe()))
        }
    }
}

/// Whether `subject` matches the subscription `pattern` (NATS rules: `*`
/// matches one token, a final `>` one or more).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::subject_matches;

    #[test]
    fn wildcards_follow_nats_rules() {
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
        assert!(subject_matches("a.*", "a.b"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(subject_matches("*.b.>", "x.b.c"));
        assert!(!subject_matches("a.b", "a"));
    }
}
