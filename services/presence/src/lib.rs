//! Herald's presence service: the cluster's view of who is online, on which
//! edge, and in which rooms. Each edge owns the presence of its own
//! connections and reports it (deltas, heartbeats, snapshots) over the broker;
//! presence replicas fold those reports into a [`view::View`] and answer
//! `RoomMembers` and `UserStatus` queries, from edges over the broker and from
//! backend services over gRPC, with one implementation.
//!
//! [`Presence`] is the service inside any process (the all-in-one `herald
//! dev` starts it next to the others); [`run`] is the standalone `herald
//! presence` process around it.
#![forbid(unsafe_code)]

mod grpc;
mod service;
pub mod view;

use std::error::Error;
use std::time::Duration;

use herald_broker::SharedBroker;
use herald_ops::{Health, ops_routes, serve_http};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

pub use grpc::MAX_USERS_PER_CALL;
pub use herald_proto::v1::{
    RoomMembersReply, RoomMembersRequest, UserStatusReply, UserStatusRequest,
};
pub use service::Presence;

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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            edge_timeout: Duration::from_secs(10),
            query_wait: Duration::from_secs(1),
            sync_retry: Duration::from_secs(1),
        }
    }
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
pub async fn run(
    config: Config,
    broker: SharedBroker,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    let grpc_addr = grpc.local_addr()?;
    let http_addr = http.local_addr()?;
    // Stops everything here on shutdown, or when one server fails.
    let stop = shutdown.child_token();
    let health = Health::new();
    let metrics = herald_ops::new_metrics();
    {
        let broker = broker.clone();
        health.add_check("broker", move || {
            if broker.is_connected() {
                Ok(())
            } else {
                Err(format!("{} is not reachable", broker.describe()))
            }
        });
    }
    let http_server = tokio::spawn(serve_http(
        http,
        ops_routes(health.clone(), metrics.clone()),
        stop.clone(),
    ));

    let presence = loop {
        match Presence::start(config.clone(), broker.clone(), stop.clone()).await {
            Ok(p) => break p,
            Err(e) => {
                tracing::warn!(error = %e, broker = %broker.describe(), "presence could not start; retrying");
                tokio::select! {
                    _ = stop.cancelled() => {
                        http_server.await??;
                        return Ok(());
                    }
                    _ = tokio::time::sleep(START_RETRY) => {}
                }
            }
        }
    };
    presence.register_metrics(&metrics);
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

    let (health_service, reporter, reflection) =
        herald_ops::grpc_extras(&["herald.v1.Presence"]).await;
    let grpc_server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(presence.grpc_service())
        .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), stop.clone().cancelled_owned());
    let draining = async {
        stop.cancelled().await;
        health.set_draining();
        reporter
            .set_service_status(
                "herald.v1.Presence",
                tonic_health::ServingStatus::NotServing,
            )
            .await;
    };
    health.set_started();
    tracing::info!(
        grpc = %grpc_addr,
        http = %http_addr,
        broker = %broker.describe(),
        "presence serving gRPC on {grpc_addr} and /healthz /readyz /metrics on {http_addr}"
    );
    let (grpc_result, ()) = tokio::join!(
        async {
            let r = grpc_server.await;
            stop.cancel();
            r
        },
        draining
    );
    let http_result = http_server.await;
    grpc_result?;
    http_result??;
    tracing::info!("presence stopped");
    Ok(())
}
