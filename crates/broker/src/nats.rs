//! The NATS broker of a cluster (async-nats, core NATS).

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use crate::error::{Cause, During, cause, said};
use crate::{BoxFuture, Broker, BrokerError, Message, Subscription};

/// How long a subscribe waits for the server to confirm it (a round trip)
/// before reporting the broker unavailable.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one confirmation round trip may take before it is sent again.
const CONFIRM_ATTEMPT: Duration = Duration::from_secs(1);

/// How often the client pings the server. A server that stops answering
/// (stalled, or behind a dead link that TCP has not noticed) is taken for
/// gone after two unanswered pings, so within 1.2 to 1.8 s the client
/// reports itself disconnected (readiness fails) and starts reconnecting.
const PING_INTERVAL: Duration = Duration::from_millis(600);

#[derive(Clone)]
pub struct NatsBroker {
    client: async_nats::Client,
    url: String,
    /// A subject nobody subscribes to: a request on it comes back as "no
    /// responders" once the server has read everything sent before it.
    confirm_subject: String,
}

impl NatsBroker {
    /// Connects to `url`. When the server is not reachable yet the client keeps
    /// trying in the background (the process reports not ready meanwhile),
    /// so that a pod can start before NATS does.
    pub async fn connect(url: &str, name: &str) -> Result<NatsBroker, BrokerError> {
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .ping_interval(PING_INTERVAL)
            .request_timeout(Some(Duration::from_secs(5)))
            .connect(url)
            .await
            .map_err(BrokerError::unavailable)?;
        let unique = client.new_inbox();
        let confirm_subject = format!(
            "_HERALD.confirm.{}",
            unique.rsplit('.').next().unwrap_or(&unique)
        );
        Ok(NatsBroker {
            client,
            url: url.to_string(),
            confirm_subject,
        })
    }

    /// The underlying client, for JetStream.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Returns once the server has processed everything this client sent
    /// before (a subscription, above all). `flush` is not enough: it only
    /// writes the socket, and a server short of CPU may read another
    /// client's publish first, which the new subscription would then miss.
    /// A server reads one client's commands in order, so the answer to a
    /// request sent after them (here "no responders") proves they are in.
    ///
    /// A request written into a connection that just died is lost (the
    /// client notices the death only later, then reconnects and sends its
    /// subscriptions again), so an unanswered one is sent again, every
    /// [`CONFIRM_ATTEMPT`], until [`CONFIRM_TIMEOUT`].
    async fn round_trip(&self) -> Result<(), BrokerError> {
        let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
        let mut last_error: Option<Cause> = None;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                let what = format!("{} did not confirm within {CONFIRM_TIMEOUT:?}", self.url);
                return Err(BrokerError::Unavailable(match last_error {
                    Some(source) => cause(During { what, source }),
                    None => said(what),
                }));
            }
            let request = self
                .client
                .request(self.confirm_subject.clone(), Bytes::new());
            match tokio::time::timeout(CONFIRM_ATTEMPT.min(left), request).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    return Ok(());
                }
                Ok(Err(e)) => {
                    last_error = Some(cause(e));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // Unanswered: lost with a dying connection, or slow.
                Err(_) => {}
            }
        }
    }

    /// A plain or queue subscription, handed out only once confirmed by a
    /// [`round_trip`], so that no message published after `subscribe`
    /// returns is missed.
    ///
    /// [`round_trip`]: NatsBroker::round_trip
    async fn confirmed(
        &self,
        subscribe: impl Future<Output = Result<async_nats::Subscriber, async_nats::SubscribeError>>,
    ) -> Result<Subscription, BrokerError> {
        let sub = subscribe.await.map_err(BrokerError::unavailable)?;
        self.round_trip().await?;
        Ok(convert(sub))
    }
}

fn convert(sub: async_nats::Subscriber) -> Subscription {
    Subscription::new(sub.map(|m| Message {
        subject: m.subject.to_string(),
        payload: m.payload,
        reply: m.reply.map(|r| r.to_string()),
    }))
}

impl Broker for NatsBroker {
    fn publish(&self, subject: String, payload: Bytes) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let size = payload.len();
            self.client
                .publish(subject, payload)
                .await
                .map_err(|e| match e.kind() {
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                        BrokerError::TooLarge {
                            size,
                            limit: self.client.max_payload(),
                        }
                    }
                    _ => BrokerError::unavailable(e),
                })
        })
    }

    fn publish_with_reply(
        &self,
        subject: String,
        reply: String,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            self.client
                .publish_with_reply(subject, reply, payload)
                .await
                .map_err(BrokerError::unavailable)
        })
    }

    fn confirm(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(self.round_trip())
    }

    fn subscribe(&self, subject: String) -> BoxFuture<'_, Result<Subscription, BrokerError>> {
        Box::pin(self.confirmed(self.client.subscribe(subject)))
    }

    fn queue_subscribe(
        &self,
        subject: String,
        group: String,
    ) -> BoxFuture<'_, Result<Subscription, BrokerError>> {
        Box::pin(self.confirmed(self.client.queue_subscribe(subject, group)))
    }

    fn request(
        &self,
        subject: String,
        payload: Bytes,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Bytes, BrokerError>> {
        Box::pin(async move {
            let req = async_nats::Request::new()
                .payload(payload)
                .timeout(Some(timeout));
            match self.client.send_request(subject.clone(), req).await {
                Ok(m) => Ok(m.payload),
                Err(e) => Err(match e.kind() {
                    async_nats::RequestErrorKind::TimedOut => BrokerError::Timeout(timeout),
                    async_nats::RequestErrorKind::NoResponders => {
                        BrokerError::NoResponders(subject)
                    }
                    async_nats::RequestErrorKind::InvalidSubject
                    | async_nats::RequestErrorKind::MaxPayloadExceeded => {
                        BrokerError::Failed(cause(e))
                    }
                    _ => BrokerError::unavailable(e),
                }),
            }
        })
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn describe(&self) -> String {
        format!("NATS at {}", self.url)
    }
}
