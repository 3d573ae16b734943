//! The edge: holds client WebSocket connections (`GET /ws`) and SSE streams
//! for networks without WebSockets (`GET /sse`, `POST /sse/send`),
//! authenticates them, keeps the local room table, and delivers room
//! messages that arrive through the broker. Edges hold no state that another
//! edge cannot rebuild: a client may land on any edge and reconnect to any other.
#![deny(unsafe_code)]

mod admission;
mod control;
mod delivery;
mod drain;
pub mod echo;
mod feed;
mod framing;
mod hooks;
mod interest;
mod liveness;
mod metrics;
mod origin;
mod presence;
mod quota;
mod room;
mod session;
mod socket;
mod sse;
mod tls;
mod transport;
mod watch;

/// The WebSocket frame reader, driven as the fuzz targets in `fuzz/` drive it
/// (`docs/fuzzing.md`). Only with the `fuzzing` feature, off by default.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use framing::fuzzing;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use herald_auth::{HookTarget, Policy, Verifier};
use herald_broker::SharedBroker;
use herald_broker::history::SharedHistory;
use herald_ops::{Health, Metrics};
use herald_wire::{RoomName, subjects};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use admission::Caps;
pub use delivery::QueueLimits;
pub use hooks::HookEndpointError;
pub use origin::{AllowedOrigins, OriginError};
pub use presence::PresenceSource;
pub use tls::{TlsCert, TlsError, load_cert};

/// The edge's settings. Every bound has a name here.
#[derive(Clone)]
pub struct Config {
    /// This edge's id in the cluster; part of every connection id.
    pub node_id: String,
    pub verifier: Verifier,
    pub policy: Policy,
    /// How long a new connection may take to send a valid `connect`.
    pub handshake_timeout: Duration,
    /// How often each connection is pinged; announced to clients in
    /// `connected` as `heartbeat_ms`. Whole seconds.
    pub heartbeat: Duration,
    /// A connection from which nothing has arrived for this long is closed
    /// (4010). Whole seconds, longer than `heartbeat`.
    pub idle_timeout: Duration,
    /// Largest client message accepted; a larger one closes with 1009.
    pub max_message_bytes: usize,
    /// Frames and bytes queued for one connection before it is closed as a
    /// slow consumer (4009).
    pub outbound_queue: QueueLimits,
    /// Rooms one connection may be in at once.
    pub max_rooms_per_conn: usize,
    /// Largest presence `meta` accepted, in bytes of JSON.
    pub max_meta_bytes: usize,
    /// How often presence heartbeats go out.
    pub presence_interval: Duration,
    /// Under load, presence events and reports wait up to this long for
    /// others to go to NATS with them (one write, one wake-up of the server
    /// for many); a lone one goes at once. Zero sends each at once.
    pub presence_window: Duration,
    /// How long a member-list query may take.
    pub presence_timeout: Duration,
    /// Where member lists are read from.
    pub presence_source: PresenceSource,
    /// After the shutdown signal, how long the edge keeps accepting while
    /// it reports not ready, so that load balancers stop sending clients.
    pub drain_delay: Duration,
    /// Clients are told to reconnect elsewhere at random moments over this
    /// window, not all at once.
    pub drain_window: Duration,
    /// How long, after the last client was told, shutdown waits for
    /// connections to close.
    pub drain_timeout: Duration,
    /// Room deliveries wait up to this long so that a busy connection's
    /// frames share a write; zero writes at once.
    pub write_delay: Duration,
    /// Send room messages to their members (lone messages and batch ends)
    /// through io_uring, many sends per submission, where the kernel allows
    /// it; off: one send(2) each.
    pub io_uring: bool,
    /// Open once durable rooms' storage is set up; the edge is not ready before.
    pub storage: herald_ops::Gate,
    /// Browser origins allowed to open WebSockets; `None`: every origin.
    pub allowed_origins: Option<AllowedOrigins>,
    /// Serve TLS with this certificate; `None`: plain TCP.
    pub tls: Option<TlsCert>,
    /// How many connections this edge, one client address, and the
    /// connections still authenticating may hold.
    pub caps: Caps,
    /// More routes served on the edge's port (`herald dev`'s demo); `None`
    /// on cluster edges.
    pub extra_routes: Option<Router>,
    /// `[connect_hook]`: the application's `OnConnect`, asked before each
    /// authenticated client is told `connected`.
    pub connect_hook: Option<HookTarget>,
    /// The event feed; `None`: no feed.
    pub feed: Option<herald_broker::feed::SharedFeed>,
    /// Connects and disconnects go to the feed (`[feed] connections`).
    pub feed_connections: bool,
}

impl Config {
    pub fn new(node_id: String, verifier: Verifier, policy: Policy) -> Config {
        Config {
            node_id,
            verifier,
            policy,
            handshake_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            max_message_bytes: 64 * 1024,
            outbound_queue: QueueLimits {
                frames: 1024,
                bytes: 4 << 20,
            },
            max_rooms_per_conn: 256,
            max_meta_bytes: 2048,
            presence_interval: Duration::from_secs(2),
            presence_window: Duration::ZERO,
            presence_timeout: Duration::from_secs(3),
            presence_source: PresenceSource::Broker,
            drain_delay: Duration::ZERO,
            drain_window: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            write_delay: Duration::ZERO,
            io_uring: true,
            storage: herald_ops::Gate::open("durable storage"),
            allowed_origins: None,
            tls: None,
            caps: Caps {
                max_pending: 4096,
                ..Caps::default()
            },
            extra_routes: None,
            connect_hook: None,
            feed: None,
            feed_connections: false,
        }
    }
}

/// After the drain, how long TLS relays may take to hand the clients
/// their last frames and close.
const TLS_FLUSH: Duration = Duration::from_secs(3);

#[derive(Clone, Default)]
struct EdgeMetrics {
    rooms: Gauge,
    users: Gauge,
    delivered: Counter,
    connections: Gauge,
    connects: Counter,
    frames_in: Counter,
    published: Counter,
    rejected: Counter,
    watched: Gauge,
}

/// State shared by every session of this edge.
struct Edge {
    config: Config,
    broker: SharedBroker,
    history: SharedHistory,
    rooms: interest::Interest<RoomName, room::RoomOrder>,
    /// Users watched by local connections (`watch`).
    watches: watch::Watches,
    /// Local connections by user, for control messages naming a user.
    users: std::sync::Mutex<std::collections::HashMap<String, Vec<u64>>>,
    /// Every open session, for control messages naming one connection.
    sessions_by_id: std::sync::RwLock<std::collections::HashMap<u64, delivery::Outbox>>,
    reporter: presence::Reporter,
    /// Presence events, handed to the broker together under load.
    events: herald_broker::coalesce::Coalescer,
    /// Users' publishes, counted with the other edges.
    quota: Arc<quota::UserQuota>,
    /// The connection caps and what they count.
    admission: Arc<admission::Admission>,
    /// This edge's SSE streams, for the frames their clients post.
    sse: sse::Streams,
    /// The application's hook services, shared by every session.
    hooks: hooks::Hooks,
    next_conn: AtomicU64,
    metrics: EdgeMetrics,
    /// Cancelled when connections start closing: after the shutdown signal
    /// and the drain delay.
    shutdown: CancellationToken,
    sessions: TaskTracker,
}

impl Edge {
    /// Runs `f` on every open session. `f` must not wait or register
    /// sessions: the table stays read-locked meanwhile.
    fn each_session(&self, f: impl FnMut(&delivery::Outbox)) {
        self.sessions_by_id
            .read()
            .expect("sessions")
            .values()
            .for_each(f);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error(transparent)]
    Broker(#[from] herald_broker::BrokerError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Hook(#[from] HookEndpointError),
}

/// Gives `listener` the options every client socket needs (TCP_NODELAY,
/// keepalive after `config.heartbeat`, TCP_USER_TIMEOUT of
/// `config.idle_timeout`), which Linux copies into each connection as its
/// handshake completes, before it is even accepted. Call it right after
/// binding: connections that queue while the edge is still starting (NATS,
/// presence) get them too. [`run`] sets them again for listeners made
/// elsewhere.
pub fn prepare_listener(listener: &TcpListener, config: &Config) {
    transport::client_socket_options(listener, config.heartbeat, config.idle_timeout);
}

/// Serves `/ws`, `/sse`, `/healthz`, `/readyz`, `/metrics` and the config's
/// `extra_routes` on `listener` until `shutdown`; then stops accepting,
/// tells every client to reconnect elsewhere (1012) and waits up to the
/// drain timeout for them to go.
pub async fn run(
    config: Config,
    broker: SharedBroker,
    history: SharedHistory,
    listener: TcpListener,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), EdgeError> {
    let health = Health::new();
    health.add_check("broker", herald_broker::readiness(&broker));
    config.storage.add_to(&health);
    let reporter_stop = CancellationToken::new();
    // Presence events and reports share batches: one write per window.
    let events = herald_broker::coalesce::Coalescer::start(broker.clone(), config.presence_window);
    let (reporter, reporter_task) = presence::Reporter::start(
        &config.node_id,
        broker.clone(),
        events.clone(),
        config.presence_source.clone(),
        config.presence_interval,
        config.presence_timeout,
        reporter_stop.clone(),
    )
    .await?;
    let edge_metrics = EdgeMetrics::default();
    register_metrics(&metrics, &edge_metrics);
    metrics::register(&metrics);
    hooks::register(&metrics);
    let hooks = hooks::Hooks::new(&config.policy, config.connect_hook.as_ref())?;
    herald_broker::register_metrics(&mut metrics.lock().expect("metrics registry"), &broker);
    let mut node_control = broker
        .subscribe(subjects::node_control(&config.node_id))
        .await?;
    let mut rooms = room::table(
        broker.clone(),
        history.clone(),
        config.policy.clone(),
        &config.node_id,
        edge_metrics.delivered.clone(),
        edge_metrics.rooms.clone(),
    );
    match delivery::enable_io_uring(config.io_uring) {
        Ok(true) => tracing::info!("room messages go to their members in io_uring runs of sends"),
        Ok(false) => tracing::info!("io_uring is off (--io-uring=false): one send(2) per member"),
        Err(e) => tracing::warn!(
            error = %e,
            "io_uring is not available here; room messages go out with one send(2) per member"
        ),
    }
    match &config.allowed_origins {
        None => tracing::info!(
            "no --allowed-origins: WebSocket upgrades are accepted from pages of every site"
        ),
        Some(origins) => tracing::info!(
            "WebSocket upgrades are accepted from origins {origins} and from clients that send no Origin"
        ),
    }
    // What the edge's parts see as the shutdown: the moment the drain delay
    // is over and connections start closing.
    let closing = CancellationToken::new();
    if !config.write_delay.is_zero() {
        rooms = rooms.write_delay(delivery::Flusher::start(
            config.write_delay,
            closing.clone(),
        ));
    }
    let watches = watch::Watches::new(
        broker.clone(),
        config.presence_source.clone(),
        config.presence_timeout,
        edge_metrics.watched.clone(),
    );
    let edge = Arc::new(Edge {
        events,
        rooms,
        watches,
        users: Default::default(),
        sessions_by_id: Default::default(),
        broker,
        history,
        reporter,
        quota: quota::UserQuota::new(&config.node_id),
        admission: admission::Admission::new(config.caps.clone()),
        sse: sse::Streams::default(),
        hooks,
        next_conn: AtomicU64::new(1),
        metrics: edge_metrics,
        shutdown: closing.clone(),
        sessions: TaskTracker::new(),
        config,
    });
    {
        let edge = edge.clone();
        tokio::spawn(async move {
            while let Some(msg) = node_control.next().await {
                control::on_control(&edge, msg);
            }
        });
    }
    {
        let local = edge.clone();
        tokio::spawn(edge.quota.clone().run(
            edge.broker.clone(),
            move |user| local.users.lock().expect("users").contains_key(user),
            closing.clone(),
        ));
    }
    liveness::start_clock();
    tokio::spawn(liveness::sweep(edge.clone()));
    tokio::spawn(room::catch_up_after_breaks(edge.clone()));
    let app = Router::new()
        .route("/ws", get(transport::ws_handler))
        .route("/sse", get(sse::stream_handler))
        .route("/sse/send", post(sse::send_handler))
        .with_state(edge.clone())
        .merge(herald_ops::ops_routes(health.clone(), metrics))
        .merge(edge.config.extra_routes.clone().unwrap_or_default());
    let addr = listener.local_addr()?;
    health.set_started();
    let (ws, http) = match &edge.config.tls {
        Some(_) => ("wss", "https"),
        None => ("ws", "http"),
    };
    tracing::info!(
        node = %edge.config.node_id,
        "edge {} serving WebSocket clients on {ws}://{addr}/ws (health on {http}://{addr}/healthz), broker: {}",
        edge.config.node_id,
        edge.broker.describe()
    );
    // Ends the certificate watcher and, once the sessions are gone, the
    // TLS relays still running.
    let tls_stop = CancellationToken::new();
    let tls = edge.config.tls.as_ref().map(|cert| {
        tracing::info!(
            "TLS on: certificate {}, re-read when it changes",
            cert.path().display()
        );
        tls::Terminator::new(cert, tls_stop.clone())
    });
    let http_stop = CancellationToken::new();
    let server = tokio::spawn(transport::serve(
        listener,
        app,
        edge.config.heartbeat,
        edge.config.idle_timeout,
        tls.clone(),
        http_stop.clone(),
    ));

    shutdown.cancelled().await;
    health.set_draining();
    if !edge.config.drain_delay.is_zero() {
        tracing::info!(
            "edge {} draining: not ready; still accepting for {:?} while load balancers notice",
            edge.config.node_id,
            edge.config.drain_delay
        );
        tokio::time::sleep(edge.config.drain_delay).await;
    }
    closing.cancel();
    http_stop.cancel();
    edge.sessions.close();
    drain::spread(&edge).await;
    let drain_started = tokio::time::Instant::now();
    if tokio::time::timeout(edge.config.drain_timeout, edge.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "drain timeout ({:?}) passed with {} connections still open; closing anyway",
            edge.config.drain_timeout,
            edge.sessions.len()
        );
    } else {
        tracing::info!(
            "edge {} drained: every connection closed {:?} after the last was told",
            edge.config.node_id,
            drain_started.elapsed()
        );
    }
    if let Some(tls) = &tls {
        // The last sessions' closing words still pass through their relays.
        tls.relays().close();
        let _ = tokio::time::timeout(TLS_FLUSH, tls.relays().wait()).await;
    }
    tls_stop.cancel();
    reporter_stop.cancel();
    let _ = reporter_task.await;
    let _ = server.await;
    tracing::info!("edge {} stopped", edge.config.node_id);
    Ok(())
}

fn register_metrics(metrics: &Metrics, m: &EdgeMetrics) {
    let mut reg = metrics.lock().expect("metrics registry");
    reg.register(
        "edge_connections",
        "Open client connections",
        m.connections.clone(),
    );
    reg.register(
        "edge_connects",
        "Client connections authenticated",
        m.connects.clone(),
    );
    reg.register(
        "edge_frames_received",
        "Client frames received",
        m.frames_in.clone(),
    );
    reg.register(
        "edge_published",
        "Messages published by clients",
        m.published.clone(),
    );
    reg.register(
        "edge_requests_rejected",
        "Client requests answered with an error",
        m.rejected.clone(),
    );
    reg.register(
        "edge_rooms",
        "Rooms with at least one local member",
        m.rooms.clone(),
    );
    reg.register(
        "edge_users",
        "Users with at least one local connection",
        m.users.clone(),
    );
    reg.register(
        "edge_watched_users",
        "Users whose status at least one local connection watches",
        m.watched.clone(),
    );
    reg.register(
        "edge_deliveries",
        "Messages queued to local members",
        m.delivered.clone(),
    );
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
