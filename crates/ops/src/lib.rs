//! What every Herald service serves to operators and orchestrators:
//! `/healthz` (alive), `/readyz` (ready for traffic; false while draining or
//! while the broker is unreachable), `/metrics` (Prometheus text), and for
//! gRPC services the standard health service and server reflection.
#![forbid(unsafe_code)]

pub mod api_auth;
mod grpc_metrics;
pub mod metrics;
pub mod tls;
mod watch;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use api_auth::{ApiAuth, ApiAuthLayer};
pub use grpc_metrics::GrpcMetricsLayer;
pub use prometheus_client;
pub use watch::watch_file;

/// Why a router or presence process stopped serving. Each variant is its
/// cause itself.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Grpc(#[from] tonic::transport::Error),
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

/// Readiness of one process. Ready when started, not draining, and every
/// dependency check passes.
#[derive(Clone)]
pub struct Health {
    inner: Arc<HealthInner>,
}

type Check = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

struct HealthInner {
    started: AtomicBool,
    draining: AtomicBool,
    checks: Mutex<Vec<(String, Check)>>,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    pub fn new() -> Health {
        Health {
            inner: Arc::new(HealthInner {
                started: AtomicBool::new(false),
                draining: AtomicBool::new(false),
                checks: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Adds a dependency check; `Err` carries a plain-words reason.
    pub fn add_check(
        &self,
        name: &str,
        check: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) {
        self.inner
            .checks
            .lock()
            .expect("health checks")
            .push((name.to_string(), Box::new(check)));
    }

    pub fn set_started(&self) {
        self.inner.started.store(true, Ordering::SeqCst);
    }

    /// From now on the process reports not ready, so load balancers stop
    /// sending it new traffic while it drains.
    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// `Ok` when ready, else every reason it is not.
    pub fn readiness(&self) -> Result<(), String> {
        if self.is_draining() {
            return Err("draining: shutting down".into());
        }
        if !self.inner.started.load(Ordering::SeqCst) {
            return Err("starting".into());
        }
        let failures: Vec<String> = self
            .inner
            .checks
            .lock()
            .expect("health checks")
            .iter()
            .filter_map(|(name, check)| check().err().map(|e| format!("{name}: {e}")))
            .collect();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("; "))
        }
    }
}

/// A condition some other task makes true once (e.g. "durable storage is
/// set up"); until then the process reports not ready.
#[derive(Clone, Debug)]
pub struct Gate {
    open: Arc<AtomicBool>,
    what: &'static str,
}

impl Gate {
    /// A gate that is open from the start.
    pub fn open(what: &'static str) -> Gate {
        Gate {
            open: Arc::new(AtomicBool::new(true)),
            what,
        }
    }

    /// A gate that stays closed until [`Gate::set_open`].
    pub fn closed(what: &'static str) -> Gate {
        Gate {
            open: Arc::new(AtomicBool::new(false)),
            what,
        }
    }

    pub fn set_open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// Adds this gate to `health` as a readiness check.
    pub fn add_to(&self, health: &Health) {
        let gate = self.clone();
        health.add_check(self.what, move || {
            if gate.open.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("not set up yet".into())
            }
        });
    }
}

/// The Prometheus registry a service registers its metrics in.
pub type Metrics = Arc<Mutex<Registry>>;

pub fn new_metrics() -> Metrics {
    let mut registry = Registry::with_prefix("herald");
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let workers = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        workers.set(i64::try_from(runtime.metrics().num_workers()).unwrap_or(i64::MAX));
        registry.register(
            "runtime_worker_threads",
            "Threads running this process's async work (--worker-threads)",
            workers,
        );
    }
    Arc::new(Mutex::new(registry))
}

/// Routes the binary adds to every service's HTTP port (`/debug/pprof/heap`
/// with `--heap-profile`), set once before the services build their routes.
static DEBUG_ROUTES: std::sync::OnceLock<Router> = std::sync::OnceLock::new();

/// Adds `routes` to what [`ops_routes`] serves from now on; `false` if
/// routes were set before (they stay).
pub fn set_debug_routes(routes: Router) -> bool {
    DEBUG_ROUTES.set(routes).is_ok()
}

#[derive(Clone)]
struct OpsState {
    health: Health,
    metrics: Metrics,
}

/// `/healthz`, `/readyz` and `/metrics`, to merge into a service's HTTP router
/// or serve on their own.
pub fn ops_routes<S: Clone + Send + Sync + 'static>(health: Health, metrics: Metrics) -> Router<S> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(OpsState { health, metrics })
        .merge(
            DEBUG_ROUTES
                .get()
                .cloned()
                .unwrap_or_default()
                .with_state(()),
        )
}

async fn readyz(State(s): State<OpsState>) -> impl IntoResponse {
    match s.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics_text(State(s): State<OpsState>) -> impl IntoResponse {
    let mut out = String::new();
    let registry = s.metrics.lock().expect("metrics registry");
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("could not encode metrics: {e}"),
        );
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
}

/// Serves `router` on `listener` until `shutdown` fires.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Replies and small frames go out at once: without TCP_NODELAY, Nagle's
    // algorithm and delayed ACKs hold some of them back ~40 ms.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

/// How many connections the kernel may hold for a listener before it is
/// asked for them; the kernel lowers it to `net.core.somaxconn` (4096 by
/// default since Linux 5.4). In a reconnect storm a full queue drops
/// SYNs, and each client whose SYN was dropped waits a second or more for
/// its retry, so the queue is as deep as the system allows rather than
/// the 128 of `TcpListener::bind` (tokio's, through mio, as std's).
pub const ACCEPT_BACKLOG: u32 = 65_535;

/// Binds `addr` with an accept queue of [`ACCEPT_BACKLOG`], with an error
/// that names what could not be bound (and keeps the system's reason as its
/// cause).
pub async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As std's TcpListener::bind: a restarted server can bind the port
        // its predecessor's connections still linger on.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(ACCEPT_BACKLOG)
    };
    listen().map_err(|source| {
        std::io::Error::new(
            source.kind(),
            BindError {
                what: what.to_string(),
                addr,
                source,
            },
        )
    })
}

/// See [`bind`].
#[derive(Debug, thiserror::Error)]
#[error("could not listen for {what} on {addr}")]
struct BindError {
    what: String,
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// The connections a gRPC server accepts on `listener`, with Nagle's
/// algorithm off (a reply must not wait for the peer's delayed ACK), over
/// TLS once their handshake is done when `tls` is given.
pub fn grpc_incoming(
    listener: tokio::net::TcpListener,
    tls: Option<tls::ServerTls>,
) -> tls::GrpcIncoming {
    tls::GrpcIncoming::new(listener, tls)
}

/// The gRPC health service (reporting `names` serving) and server reflection
/// for the herald.v1 API.
pub async fn grpc_extras(
    names: &[&str],
) -> (
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    tonic_health::server::HealthReporter,
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
) {
    let (reporter, service) = tonic_health::server::health_reporter();
    for name in names {
        reporter
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(herald_proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the built-in descriptor set is valid");
    (service, reporter, reflection)
}

/// The first step of a graceful stop, for the gRPC services: once
/// `shutdown` fires, `/readyz` and every gRPC health status (`services` and
/// the overall `""`) turn not serving at once, and the returned token is
/// cancelled `delay` later, when the servers are to stop. Meanwhile they
/// serve as before, so that load balancers and gRPC clients move away
/// before anything is refused.
pub fn drain_after(
    shutdown: &CancellationToken,
    health: Health,
    reporter: tonic_health::server::HealthReporter,
    services: &'static [&'static str],
    delay: std::time::Duration,
    who: &'static str,
) -> CancellationToken {
    let stop = CancellationToken::new();
    let stopping = stop.clone();
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        health.set_draining();
        for name in services.iter().chain(&[""]) {
            reporter
                .set_service_status(*name, tonic_health::ServingStatus::NotServing)
                .await;
        }
        if !delay.is_zero() {
            tracing::info!(
                "{who} draining: not ready and gRPC health NOT_SERVING; still serving for {delay:?} while clients move away"
            );
            tokio::time::sleep(delay).await;
        }
        stopping.cancel();
    });
    stop
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Far more connections than `TcpListener::bind`'s queue (128) wait,
    /// connected, for a listener that has not accepted any: none of their
    /// SYNs is dropped, which would keep its connect waiting for the
    /// listener to make room.
    #[tokio::test]
    async fn the_accept_queue_holds_more_than_the_default_128() {
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if somaxconn < 2048 {
            eprintln!(
                "skipped: net.core.somaxconn is {somaxconn}, below this test's 1,500 connections"
            );
            return;
        }
        // The client ends take a file each (the queued ones none, yet).
        let files: u64 = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| {
                let line = l
                    .lines()
                    .find(|l| l.starts_with("Max open files"))?
                    .to_owned();
                line.split_whitespace().nth(3)?.parse().ok()
            })
            .unwrap_or(0);
        if files < 2000 {
            eprintln!(
                "skipped: this process may open {files} files, below the test's 1,500 connections"
            );
            return;
        }
        let listener = bind("127.0.0.1:0".parse().unwrap(), "the test")
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let mut connected = Vec::new();
        let connects = async {
            for _ in 0..1500 {
                connected.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), connects)
            .await
            .expect("a connect waited: the accept queue was full");
        assert_eq!(connected.len(), 1500);
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), addr.ip());
    }

    #[tokio::test]
    async fn a_port_in_use_is_named() {
        let first = bind("127.0.0.1:0".parse().unwrap(), "the first")
            .await
            .unwrap();
        let addr = first.local_addr().unwrap();
        let err = bind(addr, "WebSocket clients (--listen)")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        assert_eq!(
            err.to_string(),
            format!("could not listen for WebSocket clients (--listen) on {addr}")
        );
    }
}
