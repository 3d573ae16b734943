//! The NATS broker of a cluster (async-nats, core NATS).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::{Cause, During, cause, said};
use crate::{BoxFuture, Broker, BrokerError, Mark, Message, Subscription};

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

/// The longest pause between two attempts to reach a server that went away
/// (plus up to [`RECONNECT_JITTER`]). Short and flat, not the client's
/// default backoff of up to 4 s: every Herald process must be back within
/// [`RESUME_SETTLE`] of the server's return.
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(250);

/// Spreads the reconnects of many processes apart.
const RECONNECT_JITTER: Duration = Duration::from_millis(100);

/// How long after reconnecting a process refuses to publish
/// ([`Broker::publishable`]). A message published the moment this process
/// is back would reach no edge that is not back yet, and be acknowledged
/// all the same; every process retries every [`RECONNECT_MAX_DELAY`] +
/// [`RECONNECT_JITTER`] at most, so after this long the others listen again.
pub const RESUME_SETTLE: Duration = Duration::from_secs(1);

/// How often a pending confirmation checks that its connection still
/// stands, so that a lost connection is answered at once rather than after
/// [`CONFIRM_TIMEOUT`].
const CONFIRM_CHECK: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct NatsBroker {
    client: async_nats::Client,
    url: String,
    /// A subject nobody subscribes to: a request on it comes back as "no
    /// responders" once the server has read everything sent before it.
    confirm_subject: String,
    /// The callers of [`Broker::confirm`] waiting for the next shared round
    /// trip.
    confirmations: mpsc::UnboundedSender<oneshot::Sender<Result<u64, Cause>>>,
    /// The connect count and time of the latest connect the client reported
    /// (its events arrive a moment after the count moves).
    connected: Arc<Mutex<(u64, Instant)>>,
    /// Moves on every event after which a subscription may have missed
    /// messages ([`Broker::continuity`]).
    breaks: Arc<AtomicU64>,
}

impl NatsBroker {
    /// Connects to `url`. When the server is not reachable yet the client keeps
    /// trying in the background (the process reports not ready meanwhile),
    /// so that a pod can start before NATS does.
    pub async fn connect(url: &str, name: &str) -> Result<NatsBroker, BrokerError> {
        NatsBroker::connect_with(url, name, &NatsSecurity::default()).await
    }

    /// [`NatsBroker::connect`] with credentials and TLS. A file that cannot
    /// be read is an error at once (`Failed`, naming it), not a reconnect
    /// loop.
    pub async fn connect_with(
        url: &str,
        name: &str,
        security: &NatsSecurity,
    ) -> Result<NatsBroker, BrokerError> {
        let connected = Arc::new(Mutex::new((0u64, Instant::now())));
        let on_event = connected.clone();
        let breaks = Arc::new(AtomicU64::new(0));
        let on_break = breaks.clone();
        let servers = server_list(url)?;
        let options = security.apply(async_nats::ConnectOptions::new()).await?;
        let client = options
            .name(name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(reconnect_delay)
            .ping_interval(PING_INTERVAL)
            .request_timeout(Some(Duration::from_secs(5)))
            .event_callback(move |event| {
                if matches!(event, async_nats::Event::Connected) {
                    let mut connected = on_event.lock().expect("connect record");
                    *connected = (connected.0 + 1, Instant::now());
                }
                if matches!(
                    event,
                    async_nats::Event::Connected
                        | async_nats::Event::Disconnected
                        | async_nats::Event::SlowConsumer(_)
                ) {
                    on_break.fetch_add(1, Ordering::AcqRel);
                }
                async {}
            })
            .connect(servers)
            .await
            .map_err(BrokerError::unavailable)?;
        let unique = client.new_inbox();
        let confirm_subject = format!(
            "_HERALD.confirm.{}",
            unique.rsplit('.').next().unwrap_or(&unique)
        );
        let (confirmations, waiting) = mpsc::unbounded_channel();
        tokio::spawn(confirm_in_turn(
            client.clone(),
            confirm_subject.clone(),
            waiting,
        ));
        Ok(NatsBroker {
            client,
            url: url.to_string(),
            confirm_subject,
            confirmations,
            connected,
            breaks,
        })
    }

    /// A publish of `size` bytes that the client refused: too large for the
    /// server (permanent), or not sent at all.
    fn publish_error(&self, size: usize, e: async_nats::client::PublishError) -> BrokerError {
        match e.kind() {
            async_nats::client::PublishErrorKind::MaxPayloadExceeded => BrokerError::TooLarge {
                size,
                limit: self.client.max_payload(),
            },
            _ => BrokerError::unavailable(e),
        }
    }

    /// How many times the client has connected, the first time included.
    fn connects(&self) -> u64 {
        self.client.statistics().connects.load(Ordering::Acquire)
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

/// `urls`, comma-separated, as the client's server pool (it moves to
/// another server when one goes away). The client itself reads one URL
/// per string.
fn server_list(urls: &str) -> Result<Vec<async_nats::ServerAddr>, BrokerError> {
    let servers: Vec<async_nats::ServerAddr> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse().map_err(|e| {
                BrokerError::Failed(cause(During {
                    what: format!("reading the NATS server URL `{u}`"),
                    source: cause(e),
                }))
            })
        })
        .collect::<Result<_, _>>()?;
    if servers.is_empty() {
        return Err(BrokerError::Failed(said("no NATS server URL was given")));
    }
    Ok(servers)
}

/// How a process proves itself to NATS and checks the server: a
/// credentials file (JWT and NKey seed, as `nsc` writes it) and TLS. All
/// optional; any TLS file makes TLS required.
#[derive(Debug, Clone, Default)]
pub struct NatsSecurity {
    pub creds: Option<PathBuf>,
    /// CA certificate(s) (PEM) the server's certificate is checked against.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM), for servers that verify clients.
    pub tls_cert: Option<(PathBuf, PathBuf)>,
}

impl NatsSecurity {
    async fn apply(
        &self,
        mut options: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, BrokerError> {
        let unreadable = |what: &str, path: &Path, e: std::io::Error| {
            BrokerError::Failed(cause(During {
                what: format!("reading the NATS {what} {}", path.display()),
                source: cause(e),
            }))
        };
        if let Some(path) = &self.creds {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| unreadable("credentials file", path, e))?;
        }
        for path in self
            .tls_ca
            .iter()
            .chain(self.tls_cert.iter().flat_map(|(c, k)| [c, k]))
        {
            std::fs::metadata(path).map_err(|e| unreadable("TLS file", path, e))?;
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &self.tls_cert {
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        Ok(options)
    }
}

/// Pause before reconnect attempt `attempts` (1 for the first): at once, then
/// a growing but short pause with jitter, never over
/// [`RECONNECT_MAX_DELAY`] + [`RECONNECT_JITTER`].
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let step = Duration::from_millis(50).saturating_mul(attempts as u32);
    let jitter = RECONNECT_JITTER.mul_f64(rand::random::<f64>());
    step.min(RECONNECT_MAX_DELAY) + jitter
}

/// Serves [`Broker::confirm`]: one round trip at a time, shared by every
/// caller that was waiting when it started (their messages were all handed
/// to the client before they asked, so the round trip follows them). Each
/// caller learns the connect count at the answer, to compare with its mark.
async fn confirm_in_turn(
    client: async_nats::Client,
    subject: String,
    mut waiting: mpsc::UnboundedReceiver<oneshot::Sender<Result<u64, Cause>>>,
) {
    let mut batch = Vec::new();
    while let Some(first) = waiting.recv().await {
        batch.push(first);
        while let Ok(next) = waiting.try_recv() {
            batch.push(next);
        }
        let outcome = one_round_trip(&client, &subject).await;
        for caller in batch.drain(..) {
            let _ = caller.send(outcome.clone());
        }
    }
}

/// One request that the server answers "no responders" once it has read
/// everything the client sent before. Not sent again when unanswered: a
/// second request might travel on a new connection, which proves nothing
/// about the old one. Returns the connect count seen with the answer.
async fn one_round_trip(client: &async_nats::Client, subject: &str) -> Result<u64, Cause> {
    let connects = || client.statistics().connects.load(Ordering::Acquire);
    let before = connects();
    let request = client.request(subject.to_string(), Bytes::new());
    let lost = async {
        loop {
            tokio::time::sleep(CONFIRM_CHECK).await;
            if client.connection_state() != async_nats::connection::State::Connected
                || connects() != before
            {
                return;
            }
        }
    };
    tokio::select! {
        answer = tokio::time::timeout(CONFIRM_TIMEOUT, request) => match answer {
            Ok(Ok(_)) => Ok(connects()),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(connects()),
            Ok(Err(e)) => Err(cause(e)),
            Err(_) => Err(said(format!("no answer within {CONFIRM_TIMEOUT:?}"))),
        },
        () = lost => Err(said("the connection was lost before the server confirmed")),
    }
}

fn convert(sub: async_nats::Subscriber) -> Subscription {
    Subscription::new(sub.map(|m| Message {
        subject: m.subject.to_string(),
        payload: m.payload,
        reply: m.reply.map(|r| r.to_string()),
        headers: m.headers,
    }))
}

impl Broker for NatsBroker {
    fn publish(&self, subject: String, payload: Bytes) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let size = payload.len();
            self.client
                .publish(subject, payload)
                .await
                .map_err(|e| self.publish_error(size, e))
        })
    }

    fn publish_with_headers(
        &self,
        subject: String,
        headers: crate::Headers,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let size = payload.len();
            self.client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| self.publish_error(size, e))
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

    fn mark(&self) -> Mark {
        Mark(self.connects())
    }

    fn publishable(&self) -> Result<Mark, BrokerError> {
        // Read first: if the connection changes after this, `confirm` sees it.
        let mark = self.mark();
        let refuse = |why: String| Err(BrokerError::Unavailable(said(why)));
        if !self.is_connected() {
            return refuse(format!(
                "{} is not connected; nothing was published",
                self.url
            ));
        }
        if mark.0 > 1 {
            let (seen, at) = *self.connected.lock().expect("connect record");
            let since = at.elapsed();
            if seen < mark.0 || since < RESUME_SETTLE {
                return refuse(format!(
                    "{} reconnected {} ms ago; publishing resumes {} ms after a reconnect, once every edge listens again; nothing was published",
                    self.url,
                    if seen < mark.0 { 0 } else { since.as_millis() },
                    RESUME_SETTLE.as_millis()
                ));
            }
        }
        Ok(mark)
    }

    fn confirm(&self, since: Mark) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            let outcome = match self.confirmations.send(tx) {
                Ok(()) => rx
                    .await
                    .unwrap_or_else(|_| Err(said("the confirming task ended"))),
                Err(_) => Err(said("the confirming task ended")),
            };
            match outcome {
                Ok(connects) if connects == since.0 => Ok(()),
                Ok(_) => Err(BrokerError::Unconfirmed(said(format!(
                    "the connection to {} was lost and made again after the message was sent",
                    self.url
                )))),
                Err(e) => Err(BrokerError::Unconfirmed(cause(During {
                    what: format!("confirming with {}", self.url),
                    source: e,
                }))),
            }
        })
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

    fn publish_with_reply_and_headers(
        &self,
        subject: String,
        reply: String,
        headers: crate::Headers,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            self.client
                .publish_with_reply_and_headers(subject, reply, headers, payload)
                .await
                .map_err(BrokerError::unavailable)
        })
    }

    fn request_with_headers(
        &self,
        subject: String,
        headers: crate::Headers,
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

    fn continuity(&self) -> u64 {
        // A reconnect the event callback has not reported yet is counted
        // too.
        self.breaks.load(Ordering::Acquire) + self.connects()
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn describe(&self) -> String {
        format!("NATS at {}", self.url)
    }
}

impl NatsBroker {
    /// A request, timed for the metrics, its failure told apart by cause.
    async fn ask(
        &self,
        subject: String,
        headers: Option<crate::Headers>,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, BrokerError> {
        crate::metrics::timed_request(async move {
            let mut req = async_nats::Request::new()
                .payload(payload)
                .timeout(Some(timeout));
            if let Some(headers) = headers {
                req = req.headers(headers);
            }
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
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_list_is_comma_separated_and_every_url_is_checked() {
        let servers = server_list("nats://a:4222, nats://b:4223,").unwrap();
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[1].port(), 4223);
        let e = server_list("nats://a:4222,nats://b:nope").unwrap_err();
        assert!(
            crate::chain(&e).to_string().contains("`nats://b:nope`"),
            "{}",
            crate::chain(&e)
        );
        assert!(server_list(" , ").is_err());
    }
}
