//! The router: the gRPC front for backend services. `Router.Publish` and
//! `Router.SendToUser` encode the client `message` frame once and publish it
//! on the room's subject, where every edge with members picks it up. The
//! router also answers the `Presence` API (from the presence replicas through
//! the broker, or from `--presence URL`) so a backend needs one address.
//! It holds no state of its own: run as many as you like.
#![forbid(unsafe_code)]

mod api;
mod presence_front;
pub mod unread;

use std::time::Duration;

use herald_broker::SharedBroker;
use herald_ops::{Health, Metrics};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use api::RouterApi;
pub use presence_front::PresenceFront;

#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace policies: which rooms are durable.
    pub policy: herald_auth::Policy,
    /// Where presence queries go: any presence replica through the broker,
    /// or a presence service's gRPC address (`--presence`).
    pub presence: herald_presence_client::Source,
    /// How long a presence query may take.
    pub presence_timeout: Duration,
    /// Open once durable rooms' storage is set up; the router is not ready before.
    pub storage: herald_ops::Gate,
    /// After the shutdown signal, how long the router keeps serving while it
    /// reports not ready.
    pub drain_delay: Duration,
    /// The API tokens calls must carry; `None`: the API is open.
    pub api_auth: Option<herald_ops::ApiAuth>,
    /// TLS of the gRPC API, with client certificates checked when it has
    /// a client CA; `None`: plain TCP.
    pub grpc_tls: Option<herald_ops::tls::ServerTls>,
    /// Most messages one `PublishBatch` may carry.
    pub max_publish_batch: usize,
    /// The event feed: API publishes of namespaces that send them, and
    /// `notify_after` reminders (this router takes its share of the due
    /// ones); `None`: no feed.
    pub feed: Option<herald_broker::feed::SharedFeed>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: herald_auth::Policy::open(),
            presence: herald_presence_client::Source::Broker,
            presence_timeout: Duration::from_secs(3),
            storage: herald_ops::Gate::open("durable storage"),
            drain_delay: Duration::ZERO,
            api_auth: None,
            grpc_tls: None,
            max_publish_batch: api::MAX_PUBLISH_BATCH,
            feed: None,
        }
    }
}

/// Serves `herald.v1.Router` and `herald.v1.Presence` (plus gRPC health and
/// reflection) on `grpc`, and `/healthz`, `/readyz`, `/metrics` on `http`,
/// until `shutdown`.
pub async fn run(
    config: Config,
    broker: SharedBroker,
    history: herald_broker::history::SharedHistory,
    grpc: TcpListener,
    http: TcpListener,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), herald_ops::ServeError> {
    let health = Health::new();
    health.add_check("broker", herald_broker::readiness(&broker));
    herald_broker::register_metrics(&mut metrics.lock().expect("metrics registry"), &broker);
    config.storage.add_to(&health);
    let presence = PresenceFront::new(broker.clone(), &config);
    let api = RouterApi::new(
        broker.clone(),
        history.clone(),
        config.policy.clone(),
        presence.clone(),
        &metrics,
    )
    .with_max_batch(config.max_publish_batch)
    .with_feed(config.feed.clone());
    if let Some(feed) = config.feed.clone() {
        tokio::spawn(unread::run(
            feed,
            history,
            presence.clone(),
            unread::UnreadMetrics::register(&metrics),
            shutdown.clone(),
        ));
    }
    const SERVICES: &[&str] = &["herald.v1.Router", "herald.v1.Presence"];
    let (health_svc, reporter, reflection) = herald_ops::grpc_extras(SERVICES).await;
    let stop = herald_ops::drain_after(
        &shutdown,
        health.clone(),
        reporter,
        SERVICES,
        config.drain_delay,
        "router",
    );
    let grpc_addr = grpc.local_addr()?;
    let http_addr = http.local_addr()?;
    let grpc_server = tonic::transport::Server::builder()
        .layer(herald_telemetry::GrpcServerSpans)
        .layer(herald_ops::GrpcMetricsLayer::new(&metrics))
        .layer(herald_ops::ApiAuthLayer(config.api_auth.clone()))
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(api.into_server())
        .add_service(presence.into_server())
        .serve_with_incoming_shutdown(
            herald_ops::grpc_incoming(grpc, config.grpc_tls.clone()),
            stop.clone().cancelled_owned(),
        );
    let http_server =
        herald_ops::serve_http(http, herald_ops::ops_routes(health.clone(), metrics), stop);
    health.set_started();
    tracing::info!(
        "router serving gRPC (herald.v1.Router, herald.v1.Presence) on {grpc_addr}, health on http://{http_addr}/healthz, broker: {}",
        broker.describe()
    );
    let (g, h) = tokio::join!(grpc_server, http_server);
    g?;
    h?;
    tracing::info!("router stopped");
    Ok(())
}
