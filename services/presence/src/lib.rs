//! Herald's presence service: the cluster's view of who is online, on which
//! edge, and in which rooms. Each edge owns the presence of its own
//! connections and reports it (deltas, heartbeats, snapshots) over the broker;
//! presence replicas fold those reports into a [`view::View`] and answer
//! `RoomMembers` and `UserStatus` queries, from edges over the broker and from
//! backend services over gRPC, with one implementation.
//!
//! From the changes the view derives presence events: room `join`, `leave`
//! and `update`, and user `online`/`offline` once per transition, offline
//! only after a grace period. Every replica computes them (and streams them
//! to its `Presence.Watch` callers); the leading replica (replica
//! heartbeats elect it) publishes the user transitions, and the room leaves
//! no edge announced (a dead edge's connections), on the broker.
//!
//! [`Presence`] is the service inside any process (the all-in-one `herald
//! dev` starts it next to the others); [`run`] is the standalone `herald
//! presence` process around it.
#![forbid(unsafe_code)]

mod cluster;
pub mod feed;
mod grpc;
mod service;
pub mod view;
mod watch;

use std::time::Duration;

use herald_broker::{SharedBroker, chain};
use herald_ops::{Health, ops_routes, serve_http};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use grpc::{MAX_USERS_PER_CALL, MAX_WATCHED};
pub use herald_proto::v1::{
    RoomMembersReply, RoomMembersRequest, UserStatusReply, UserStatusRequest,
};
pub use service::Presence;
pub use watch::{MAX_WATCHERS, Watch, WatchEnd, WatchError};

/// The presence service's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// An edge that sends no report (edges heartbeat every ~2 s) for this
    /// long is removed with all its connections.
    pub edge_timeout: Duration,
    /// How long a read-your-writes query waits for the view to apply the
    /// asking edge's report before it is answered with what the view has.
    pub query_wait: Duration,
    /// At most one sync request per edge this often.
    pub sync_retry: Duration,
    /// A user whose last connection closed stays online this long; a new
    /// connection within it cancels the offline event (`--presence-grace`).
    pub grace: Duration,
    /// This replica's name among the presence replicas; the smallest name
    /// among the live, warmed-up replicas leads (publishes cluster-wide
    /// events). Random by default.
    pub replica_id: String,
    /// How often this replica announces itself to the others.
    pub replica_heartbeat: Duration,
    /// A replica not heard of for this long no longer counts for leadership.
    pub replica_timeout: Duration,
    /// For this long after start, snapshots of edges the replica never held
    /// state for emit no events (rebuilding is discovery, not change), and
    /// the replica does not lead.
    pub warmup: Duration,
    /// Events a `Presence.Watch` stream may have queued; a watcher that falls
    /// further behind has its stream ended with `RESOURCE_EXHAUSTED`.
    pub watch_queue: usize,
    /// After the shutdown signal, how long the service keeps serving while
    /// it reports not ready.
    pub drain_delay: Duration,
    /// The API tokens calls must carry; `None`: the API is open.
    pub api_auth: Option<herald_ops::ApiAuth>,
    /// TLS of the gRPC API, with client certificates checked when it has
    /// a client CA; `None`: plain TCP.
    pub grpc_tls: Option<herald_ops::tls::ServerTls>,
    /// What the leading replica appends to the event feed; `None`:
    /// nothing.
    pub feed: Option<feed::PresenceFeed>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            edge_timeout: Duration::from_secs(10),
            query_wait: Duration::from_secs(1),
            sync_retry: Duration::from_secs(1),
            grace: Duration::from_secs(5),
            replica_id: random_replica_id(),
            replica_heartbeat: Duration::from_secs(1),
            replica_timeout: Duration::from_secs(3),
            warmup: Duration::from_secs(3),
            watch_queue: 1024,
            drain_delay: Duration::ZERO,
            api_auth: None,
            grpc_tls: None,
            feed: None,
        }
    }
}

/// `presence-<8 hex digits>`.
pub fn random_replica_id() -> String {
    format!("presence-{:08x}", rand::random::<u32>())
}

impl Presence {
    /// The tonic service, to add to a gRPC server (the all-in-one `herald
    /// dev` serves it next to the Router on one port).
    pub fn grpc_service(
        &self,
    ) -> herald_proto::v1::presence_server::PresenceServer<
        impl herald_proto::v1::presence_server::Presence,
    > {
        herald_proto::v1::presence_server::PresenceServer::new(grpc::PresenceApi::new(self.clone()))
    }
}

/// How long to wait before trying the broker again when start-up fails.
const START_RETRY: Duration = Duration::from_secs(1);

/// The standalone `herald presence` process: serves `/healthz`, `/readyz` and
/// `/metrics` on `http` at once (not ready until started), starts the service
/// (retrying while the broker is unreachable), then serves gRPC `Presence`
/// with health and reflection on `grpc` until `shutdown`.
///
/// `gone_nodes` (from the Kubernetes pod watch, `--kube`) names edges that are
/// gone for certain; each is reaped at once instead of after the edge timeout.
pub async fn run(
    config: Config,
    broker: SharedBroker,
    grpc: TcpListener,
    http: TcpListener,
    mut gone_nodes: Option<tokio::sync::mpsc::Receiver<String>>,
    shutdown: CancellationToken,
) -> Result<(), herald_ops::ServeError> {
    let grpc_addr = grpc.local_addr()?;
    let http_addr = http.local_addr()?;
    // Stops everything here after the drain delay, or when one server fails.
    let stop = CancellationToken::new();
    let health = Health::new();
    let metrics = herald_ops::new_metrics();
    health.add_check("broker", herald_broker::readiness(&broker));
    herald_broker::register_metrics(&mut metrics.lock().expect("metrics registry"), &broker);
    let http_server = tokio::spawn(serve_http(
        http,
        ops_routes(health.clone(), metrics.clone()),
        stop.clone(),
    ));

    let presence = loop {
        match Presence::start(config.clone(), broker.clone(), stop.clone()).await {
            Ok(p) => break p,
            Err(e) => {
                tracing::warn!(error = %chain(&e), broker = %broker.describe(), "presence could not start; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        stop.cancel();
                        http_server.await??;
                        return Ok(());
                    }
                    _ = tokio::time::sleep(START_RETRY) => {}
                }
            }
        }
    };
    presence.register_metrics(&metrics);
    if let Some(mut gone) = gone_nodes.take() {
        let presence = presence.clone();
        tokio::spawn(async move {
            while let Some(node) = gone.recv().await {
                let conns = presence.reap_node(&node).await;
                tracing::info!(%node, conns, "edge pod gone: its connections were reaped at once");
            }
        });
    }
    {
        let presence = presence.clone();
        health.add_check("presence view", move || {
            if presence.is_running() {
                Ok(())
            } else {
                Err("the presence view stopped".into())
            }
        });
    }

    const SERVICES: &[&str] = &["herald.v1.Presence"];
    let (health_service, reporter, reflection) = herald_ops::grpc_extras(SERVICES).await;
    {
        let drained = herald_ops::drain_after(
            &shutdown,
            health.clone(),
            reporter,
            SERVICES,
            config.drain_delay,
            "presence",
        );
        let stop = stop.clone();
        tokio::spawn(async move {
            drained.cancelled().await;
            stop.cancel();
        });
    }
    let grpc_server = tonic::transport::Server::builder()
        .layer(herald_telemetry::GrpcServerSpans)
        .layer(herald_ops::GrpcMetricsLayer::new(&metrics))
        .layer(herald_ops::ApiAuthLayer(config.api_auth.clone()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(presence.grpc_service())
        .serve_with_incoming_shutdown(
            herald_ops::grpc_incoming(grpc, config.grpc_tls.clone()),
            stop.clone().cancelled_owned(),
        );
    health.set_started();
    tracing::info!(
        grpc = %grpc_addr,
        http = %http_addr,
        broker = %broker.describe(),
        "presence serving gRPC on {grpc_addr} and /healthz /readyz /metrics on {http_addr}"
    );
    let grpc_result = grpc_server.await;
    stop.cancel();
    let http_result = http_server.await;
    grpc_result?;
    http_result??;
    tracing::info!("presence stopped");
    Ok(())
}
