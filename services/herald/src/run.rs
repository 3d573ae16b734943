//! Wiring: logging, signals, and each subcommand's services.

use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use herald_auth::FeedKind;
use herald_broker::feed::{JetStreamFeed, MemoryFeed, SharedFeed};
use herald_broker::history::{JetStreamHistory, Limits, MemoryHistory, SharedHistory};
use herald_broker::{MemoryBroker, NatsBroker, SharedBroker, chain};
use herald_presence::feed::PresenceFeed;
use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, ClientArgs, Command, Common, LogFormat, NatsArgs, TokenArgs};
use crate::config::{self, ConfigError};
use crate::dev_routes::Shortcuts;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a command stopped. Configuration problems are told apart from
/// failures while serving by their type, so that each gets its exit status.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("configuration error")]
    Config(#[source] ConfigError),
    #[error(transparent)]
    Failed(BoxError),
}

impl From<ConfigError> for RunError {
    fn from(e: ConfigError) -> RunError {
        RunError::Config(e)
    }
}

/// The errors a service stops with, once serving: each a failure, never a
/// configuration problem.
macro_rules! failures {
    ($($t:ty),*) => {$(
        impl From<$t> for RunError {
            fn from(e: $t) -> RunError {
                RunError::Failed(e.into())
            }
        }
    )*};
}
failures!(
    std::io::Error,
    tonic::transport::Error,
    herald_broker::BrokerError,
    herald_broker::history::HistoryError,
    herald_edge::EdgeError,
    herald_ops::ServeError
);

/// Exit code for bad configuration (the same as clap's usage errors).
const EXIT_CONFIG: u8 = 2;

pub fn main(mut cli: Cli) -> ExitCode {
    if let Command::Token(args) = &cli.command {
        return token(args);
    }
    // The process's name in the cluster is settled first: logs and traces
    // carry it from the first line.
    let (service, instance) = match &mut cli.command {
        Command::Dev(_) => ("herald-dev", "dev".to_string()),
        Command::Edge(a) => (
            "herald-edge",
            a.node_id
                .get_or_insert_with(|| format!("edge-{:08x}", rand::random::<u32>()))
                .clone(),
        ),
        Command::Router(_) => (
            "herald-router",
            format!("router-{:08x}", rand::random::<u32>()),
        ),
        Command::Presence(a) => (
            "herald-presence",
            a.replica_id
                .get_or_insert_with(herald_presence::random_replica_id)
                .clone(),
        ),
        Command::Token(_) => unreachable!("handled above"),
    };
    let common = match &cli.command {
        Command::Dev(a) => &a.common,
        Command::Edge(a) => &a.common,
        Command::Router(a) => &a.common,
        Command::Presence(a) => &a.common,
        Command::Token(_) => unreachable!("handled above"),
    };
    let traces = &common.traces;
    let settings = herald_telemetry::Settings {
        endpoint: traces.otlp_endpoint.clone(),
        disabled: traces.otel_sdk_disabled,
        service_name: traces
            .otel_service_name
            .clone()
            .unwrap_or_else(|| service.to_string()),
        instance_id: instance,
        sampler: traces.traces_sampler.clone(),
        sampler_arg: traces.traces_sampler_arg.clone(),
        resource_attributes: traces.otel_resource_attributes.clone(),
    };
    let telemetry = match init_logging(common.log_format, &settings) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("herald: {}", chain(&e));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if common.heap_profile
        && let Err(e) = crate::heap::enable()
    {
        eprintln!("herald: {}", chain(&e));
        return ExitCode::from(EXIT_CONFIG);
    }
    if common.max_json_depth == 0 {
        eprintln!("herald: --max-json-depth must be at least 1");
        return ExitCode::from(EXIT_CONFIG);
    }
    herald_wire::frames::set_max_json_depth(common.max_json_depth);
    let threads = common.worker_threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        NonZeroUsize::get,
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herald: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!("running on {threads} worker thread(s)");
    let outcome = runtime.block_on(serve(cli.command));
    if let Some(t) = telemetry {
        t.shutdown();
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {}", chain(&e));
            match e {
                RunError::Config(_) => ExitCode::from(EXIT_CONFIG),
                RunError::Failed(_) => ExitCode::FAILURE,
            }
        }
    }
}

/// Logs to stderr (`RUST_LOG` filters them) and, when an OTLP endpoint is
/// configured, exports Herald's spans. The log filter never enables the
/// spans' target: without an exporter no layer wants them, and they cost
/// nothing where they are written.
fn init_logging(
    format: LogFormat,
    settings: &herald_telemetry::Settings,
) -> Result<Option<herald_telemetry::Telemetry>, herald_telemetry::TelemetryError> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    type Boxed = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        .add_directive(
            format!("{}=off", herald_telemetry::TARGET)
                .parse()
                .expect("a valid directive"),
        );
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let mut layers: Vec<Boxed> = vec![match format {
        // Inside an exported span a JSON line names its trace and span.
        LogFormat::Json => fmt
            .event_format(herald_telemetry::WithTraceIds(
                tracing_subscriber::fmt::format().json(),
            ))
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => fmt.with_filter(filter).boxed(),
    }];
    let telemetry = match herald_telemetry::init(settings)? {
        Some((telemetry, layer)) => {
            layers.push(layer);
            Some(telemetry)
        }
        None => None,
    };
    tracing_subscriber::registry().with(layers).init();
    herald_telemetry::remember_dispatch();
    if let Some(endpoint) = settings.endpoint.as_deref().filter(|_| telemetry.is_some()) {
        tracing::info!(
            service = %settings.service_name,
            "exporting traces to {endpoint} (OTLP/gRPC) as {}",
            settings.service_name
        );
    }
    Ok(telemetry)
}

fn token(args: &TokenArgs) -> ExitCode {
    let secret = args
        .jwt_secret
        .clone()
        .unwrap_or_else(|| config::DEV_SECRET.to_string());
    let claims = herald_auth::Claims {
        sub: args.sub.clone(),
        exp: herald_auth::now_secs() + args.ttl.as_secs(),
        rooms: (!args.rooms.is_empty()).then(|| args.rooms.clone().into()),
        publish: (!args.publish.is_empty()).then(|| args.publish.clone().into()),
        device: None,
        watch: (!args.watch.is_empty()).then(|| args.watch.clone().into()),
    };
    if claims.sub.is_empty() {
        eprintln!("herald: --sub must not be empty");
        return ExitCode::from(EXIT_CONFIG);
    }
    println!("{}", herald_auth::mint_hs256(secret.as_bytes(), &claims));
    ExitCode::SUCCESS
}

/// Cancels the returned token on SIGTERM or Ctrl-C; a second signal exits at once.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
            if n == 0 {
                tracing::info!("shutdown requested: draining (signal again to exit at once)");
                t.cancel();
            } else {
                tracing::warn!("second signal: exiting now");
                std::process::exit(130);
            }
        }
    });
    token
}

/// The broker and the durable store of a cluster process, on NATS;
/// `replicas` for the streams it creates.
async fn nats(
    args: &NatsArgs,
    name: &str,
    replicas: usize,
    feed: Option<&config::FeedSettings>,
) -> Result<(SharedBroker, SharedHistory, Option<SharedFeed>), ConfigError> {
    let security = herald_broker::NatsSecurity {
        creds: args.nats_creds.clone(),
        tls_ca: args.nats_tls_ca.clone(),
        tls_cert: args.nats_tls_cert.clone().zip(args.nats_tls_key.clone()),
    };
    let broker = NatsBroker::connect_with(&args.urls, name, &security)
        .await
        .map_err(|e| ConfigError::caused(format!("--nats {}", args.urls), e))?;
    let history: SharedHistory =
        Arc::new(JetStreamHistory::new(broker.client().clone()).with_replicas(replicas));
    let feed = feed.map(|f| {
        SharedFeed(Arc::new(JetStreamFeed::new(
            broker.client().clone(),
            f.limits.clone(),
            replicas,
        )))
    });
    Ok((Arc::new(broker), history, feed))
}

/// Creates or updates the storage of every durable namespace. At start-up
/// NATS may not be reachable yet: keep trying in the background (durable
/// publishes answer `unavailable` meanwhile).
/// The event feed's streams, when there is a feed, are set up the same way.
fn ensure_durable(
    history: SharedHistory,
    durable: Vec<(String, Limits)>,
    feed: Option<SharedFeed>,
) -> herald_ops::Gate {
    let gate = herald_ops::Gate::closed("durable storage");
    let ready = gate.clone();
    tokio::spawn(async move {
        if let Some(feed) = feed {
            let mut warned = false;
            while let Err(e) = feed.ensure().await {
                if !warned {
                    tracing::warn!(error = %chain(&e), "the event feed's streams are not ready; retrying");
                    warned = true;
                }
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            tracing::info!(
                "event feed ready (stream {})",
                herald_broker::feed::FEED_STREAM
            );
        }
        for (ns, limits) in durable {
            let mut warned = false;
            loop {
                match history.ensure_namespace(&ns, limits.clone()).await {
                    Ok(()) => {
                        tracing::info!(namespace = %ns, keep = limits.max_messages_per_room, max_age = ?limits.max_age, "durable namespace ready");
                        break;
                    }
                    Err(e) => {
                        if !warned {
                            tracing::warn!(namespace = %ns, error = %chain(&e), "durable namespace storage not ready; retrying");
                            warned = true;
                        }
                        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    }
                }
            }
        }
        ready.set_open();
    });
    gate
}

async fn serve(command: Command) -> Result<(), RunError> {
    let shutdown = shutdown_on_signal();
    let metrics = herald_ops::new_metrics();
    match command {
        Command::Dev(args) => dev(args, metrics, shutdown).await,
        Command::Edge(args) => {
            let namespaces = config::namespaces(&args.common)?;
            let config = edge_config(
                &args.common,
                &args.clients,
                config::node_id(args.node_id)?,
                false,
                &shutdown,
            )
            .await?;
            if args.outbound_queue == 0 || args.outbound_queue_bytes == 0 {
                return Err(ConfigError::new(
                    "--outbound-queue and --outbound-queue-bytes must be at least 1",
                )
                .into());
            }
            let config = herald_edge::Config {
                handshake_timeout: args.handshake_timeout,
                max_message_bytes: args.max_message_bytes,
                outbound_queue: herald_edge::QueueLimits {
                    frames: args.outbound_queue,
                    bytes: args.outbound_queue_bytes,
                },
                write_delay: args.write_delay,
                io_uring: args.io_uring,
                presence_interval: args.presence_interval,
                presence_window: args.presence_window,
                presence_source: presence_source(
                    args.presence.as_deref(),
                    args.presence_api_token.as_deref(),
                    &args.presence_tls,
                    &shutdown,
                )?,
                drain_delay: args.drain.drain_delay,
                drain_window: args.drain_window,
                ..config
            };
            let listener = herald_ops::bind(args.listen, "WebSocket clients (--listen)").await?;
            herald_edge::prepare_listener(&listener, &config);
            let (broker, history, feed) = nats(
                &args.nats,
                &format!("herald-edge {}", config.node_id),
                args.storage.stream_replicas.get(),
                namespaces.feed.as_ref(),
            )
            .await?;
            let config = herald_edge::Config {
                storage: ensure_durable(history.clone(), namespaces.durable, feed.clone()),
                feed_connections: namespaces.feed.as_ref().is_some_and(|f| f.connections),
                feed,
                ..config
            };
            herald_edge::run(config, broker, history, listener, metrics, shutdown).await?;
            Ok(())
        }
        Command::Router(args) => {
            let namespaces = config::namespaces(&args.common)?;
            let grpc = herald_ops::bind(args.grpc_listen, "gRPC (--grpc-listen)").await?;
            let http =
                herald_ops::bind(args.http_listen, "health and metrics (--http-listen)").await?;
            let (broker, history, feed) = nats(
                &args.nats,
                "herald-router",
                args.storage.stream_replicas.get(),
                namespaces.feed.as_ref(),
            )
            .await?;
            let config = herald_router::Config {
                storage: ensure_durable(history.clone(), namespaces.durable, feed.clone()),
                feed,
                policy: namespaces.policy,
                presence: presence_source(
                    args.presence.as_deref(),
                    args.presence_api_token.as_deref(),
                    &args.presence_tls,
                    &shutdown,
                )?,
                drain_delay: args.drain.drain_delay,
                api_auth: api_auth(&args.api, "the router", &shutdown)?,
                grpc_tls: grpc_tls(&args.api, "the router", &shutdown)?,
                max_publish_batch: match args.max_publish_batch {
                    0 => {
                        return Err(
                            ConfigError::new("--max-publish-batch must be at least 1").into()
                        );
                    }
                    n => n,
                },
                ..Default::default()
            };
            herald_router::run(config, broker, history, grpc, http, metrics, shutdown).await?;
            Ok(())
        }
        Command::Presence(args) => {
            let namespaces = config::namespaces(&args.common)?;
            let grpc = herald_ops::bind(args.grpc_listen, "gRPC (--grpc-listen)").await?;
            let http =
                herald_ops::bind(args.http_listen, "health and metrics (--http-listen)").await?;
            let config = herald_presence::Config {
                edge_timeout: args.edge_timeout,
                grace: args.presence_grace,
                replica_id: args
                    .replica_id
                    .unwrap_or_else(herald_presence::random_replica_id),
                drain_delay: args.drain.drain_delay,
                api_auth: api_auth(&args.api, "the presence service", &shutdown)?,
                grpc_tls: grpc_tls(&args.api, "the presence service", &shutdown)?,
                ..Default::default()
            };
            let gone = if args.kube {
                let client = herald_kube::client()
                    .await
                    .map_err(|e| ConfigError::caused("--kube", e))?;
                let (tx, rx) = tokio::sync::mpsc::channel(256);
                let watch = herald_kube::PodWatchConfig {
                    namespace: args.kube_namespace,
                    label_selector: args.kube_selector,
                };
                tracing::info!(selector = %watch.label_selector, "watching edge pods through the Kubernetes API");
                tokio::spawn(herald_kube::watch_edge_pods(
                    client,
                    watch,
                    move |herald_kube::PodEvent::Gone(pod)| {
                        if tx.try_send(pod).is_err() {
                            tracing::warn!(
                                "pod events are arriving faster than they are reaped; the edge timeout will catch the rest"
                            );
                        }
                    },
                    shutdown.clone(),
                ));
                Some(rx)
            } else {
                None
            };
            // Users' transitions and the leaves of dead edges' connections:
            // the streams are the edges' and routers' to create.
            let rooms = namespaces.policy.feed_namespaces(FeedKind::Presence);
            let users = namespaces.feed.as_ref().is_some_and(|f| f.users);
            let wanted = namespaces.feed.filter(|_| users || !rooms.is_empty());
            let (broker, _, feed) = nats(
                &args.nats,
                &format!("herald-presence {}", config.replica_id),
                1,
                wanted.as_ref(),
            )
            .await?;
            let config = herald_presence::Config {
                feed: feed.map(|feed| PresenceFeed {
                    feed,
                    users,
                    rooms: Arc::new(rooms.into_iter().collect()),
                }),
                ..config
            };
            herald_presence::run(config, broker, grpc, http, gone, shutdown).await?;
            Ok(())
        }
        Command::Token(_) => unreachable!("handled before the runtime starts"),
    }
}

async fn edge_config(
    common: &Common,
    clients: &ClientArgs,
    node_id: String,
    dev: bool,
    shutdown: &CancellationToken,
) -> Result<herald_edge::Config, ConfigError> {
    let (heartbeat, idle_timeout) = config::liveness(&clients.liveness)?;
    let namespaces = config::namespaces(common)?;
    Ok(herald_edge::Config {
        connect_hook: namespaces.connect_hook,
        heartbeat,
        idle_timeout,
        max_rooms_per_conn: clients.max_rooms_per_connection,
        max_meta_bytes: clients.max_meta_bytes,
        allowed_origins: config::allowed_origins(&clients.access)?,
        tls: config::tls(&clients.access)?,
        caps: config::caps(&clients.access)?,
        ..herald_edge::Config::new(
            node_id,
            crate::keys::verifier(&clients.keys, dev, shutdown).await?,
            namespaces.policy,
        )
    })
}

/// Where `--presence` sends presence queries: the edge's member lists and
/// the router's `Presence` API read it the same way.
fn presence_source(
    url: Option<&str>,
    token: Option<&str>,
    tls: &crate::cli::PresenceTlsArgs,
    shutdown: &CancellationToken,
) -> Result<herald_presence_client::Source, ConfigError> {
    let tls = match &tls.presence_tls_ca {
        None if tls.presence_tls_cert.is_some() => {
            return Err(ConfigError::new(
                "--presence-tls-cert needs --presence-tls-ca, the CA that signed the presence service's certificate",
            ));
        }
        None => None,
        Some(ca) => {
            let identity = tls
                .presence_tls_cert
                .as_deref()
                .zip(tls.presence_tls_key.as_deref());
            let tls = herald_ops::tls::client(ca, identity, herald_ops::tls::ALPN_H2)
                .map_err(|e| ConfigError::caused("--presence-tls-*", e))?;
            tls.watch(shutdown.clone());
            Some(tls)
        }
    };
    herald_presence_client::Source::from_url(url, token, tls).map_err(|e| match e {
        herald_presence_client::InvalidUrl::Token => ConfigError::caused("--presence-api-token", e),
        _ => ConfigError::caused(format!("--presence {}", url.unwrap_or_default()), e),
    })
}

/// The TLS of the gRPC API (`--grpc-tls-cert`, `--grpc-tls-key`,
/// `--grpc-client-ca`), watched for changes until `shutdown`; `None`,
/// said at start-up, for plain TCP.
fn grpc_tls(
    args: &crate::cli::ApiArgs,
    service: &str,
    shutdown: &CancellationToken,
) -> Result<Option<herald_ops::tls::ServerTls>, ConfigError> {
    let (Some(cert), Some(key)) = (&args.grpc_tls_cert, &args.grpc_tls_key) else {
        return Ok(None);
    };
    let ca = args.grpc_client_ca.as_deref();
    let tls = herald_ops::tls::server(cert, key, herald_ops::tls::ALPN_H2, ca)
        .map_err(|e| ConfigError::caused("--grpc-tls-cert/--grpc-tls-key/--grpc-client-ca", e))?;
    tls.watch(shutdown.clone());
    match ca {
        Some(ca) => tracing::info!(
            "the gRPC API of {service} is served over TLS (certificate {}) and takes only clients whose certificate a CA in {} signed",
            cert.display(),
            ca.display()
        ),
        None => tracing::info!(
            "the gRPC API of {service} is served over TLS (certificate {}); clients need no certificate",
            cert.display()
        ),
    }
    Ok(Some(tls))
}

/// The API tokens of `--api-tokens`, watched for changes until `shutdown`;
/// `None`, said at start-up, when the API is open.
fn api_auth(
    args: &crate::cli::ApiArgs,
    service: &str,
    shutdown: &CancellationToken,
) -> Result<Option<herald_ops::ApiAuth>, ConfigError> {
    let Some(path) = &args.api_tokens else {
        match &args.grpc_client_ca {
            Some(ca) => tracing::info!(
                "no --api-tokens: any client with a certificate from {} may call every method of the gRPC API of {service}",
                ca.display()
            ),
            None => tracing::warn!(
                "no --api-tokens: the gRPC API of {service} is open to anyone who can reach it"
            ),
        }
        return Ok(None);
    };
    let auth = herald_ops::ApiAuth::watch(path.clone(), shutdown.clone())
        .map_err(|e| ConfigError::caused(format!("--api-tokens {}", path.display()), e))?;
    tracing::info!(path = %path.display(), "the gRPC API of {service} takes only calls with a token from {}", path.display());
    Ok(Some(auth))
}

async fn dev(
    args: crate::cli::DevArgs,
    metrics: herald_ops::Metrics,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let namespaces = config::dev_namespaces(&args.common)?;
    let config = edge_config(&args.common, &args.clients, "dev".into(), true, &shutdown).await?;
    let keys = &args.clients.keys;
    let using_dev_secret =
        keys.jwt_secret.is_none() && keys.jwt_public_key.is_none() && keys.jwks_url.is_none();
    let listener = herald_ops::bind(args.listen, "WebSocket clients (--listen)").await?;
    herald_edge::prepare_listener(&listener, &config);
    let grpc = herald_ops::bind(args.grpc_listen, "gRPC (--grpc-listen)").await?;
    let broker: SharedBroker = Arc::new(MemoryBroker::new());
    let history: SharedHistory = Arc::new(MemoryHistory::new());
    for (ns, limits) in namespaces.durable {
        history.ensure_namespace(&ns, limits).await?;
    }

    // The edge runs in this process: it cannot die alone, so presence never
    // reaps it, however late its heartbeats are under load.
    let feed = namespaces
        .feed
        .as_ref()
        .map(|_| SharedFeed(Arc::new(MemoryFeed::default())));
    // Its edge never dies alone, so only the users' transitions.
    let presence_config = herald_presence::Config {
        edge_timeout: Duration::MAX,
        feed: feed
            .clone()
            .filter(|_| namespaces.feed.as_ref().is_some_and(|f| f.users))
            .map(|feed| PresenceFeed {
                feed,
                users: true,
                rooms: Default::default(),
            }),
        ..Default::default()
    };
    let presence =
        herald_presence::Presence::start(presence_config, broker.clone(), shutdown.clone()).await?;
    let front = herald_router::PresenceFront::new(broker.clone(), &Default::default());
    let router = herald_router::RouterApi::new(
        broker.clone(),
        history.clone(),
        namespaces.policy.clone(),
        front.clone(),
        &metrics,
    )
    .with_feed(feed.clone());
    if let Some(feed) = feed.clone() {
        tokio::spawn(herald_router::unread::run(
            feed,
            history.clone(),
            front,
            herald_router::unread::UnreadMetrics::register(&metrics),
            shutdown.clone(),
        ));
    }
    let shortcuts = Shortcuts::new(using_dev_secret, args.api.api_tokens.is_some());
    let shortcuts_line = shortcuts.summary();
    let routes = crate::dev_routes::routes(shortcuts, router.clone());
    let config = herald_edge::Config {
        policy: namespaces.policy,
        extra_routes: Some(routes),
        feed_connections: namespaces.feed.as_ref().is_some_and(|f| f.connections),
        feed,
        ..config
    };
    let (health, _reporter, reflection) =
        herald_ops::grpc_extras(&["herald.v1.Router", "herald.v1.Presence"]).await;
    let grpc_addr = grpc.local_addr()?;
    let grpc_server = tonic::transport::Server::builder()
        .layer(herald_telemetry::GrpcServerSpans)
        .layer(herald_ops::GrpcMetricsLayer::new(&metrics))
        .layer(herald_ops::ApiAuthLayer(api_auth(
            &args.api,
            "herald dev",
            &shutdown,
        )?))
        .add_service(health)
        .add_service(reflection)
        .add_service(router.into_server())
        .add_service(presence.grpc_service())
        .serve_with_incoming_shutdown(
            herald_ops::grpc_incoming(grpc, grpc_tls(&args.api, "herald dev", &shutdown)?),
            shutdown.clone().cancelled_owned(),
        );
    let ws_addr = listener.local_addr()?;
    let (ws, http) = match &config.tls {
        Some(_) => ("wss", "https"),
        None => ("ws", "http"),
    };
    let edge = herald_edge::run(config, broker, history, listener, metrics, shutdown);

    let namespaces_line = match &args.common.config {
        Some(path) => format!("as --config {} says", path.display()),
        None => {
            let doc = config::dev_durable();
            format!(
                "no --config: every namespace open; {}:* rooms durable (last {} messages, {}) for the demo",
                config::DEV_DURABLE_NAMESPACE,
                doc.history_size,
                doc.history_ttl
            )
        }
    };
    let token_hint = if using_dev_secret {
        "herald token --sub alice            (signed with the built-in development secret)"
    } else {
        "herald token --sub alice --jwt-secret <your secret>"
    };
    println!(
        "Herald dev: edge, router and presence in one process, with an in-memory broker.\n\
         \x20 WebSocket clients  {ws}://{ws_addr}/ws\n\
         \x20 gRPC API           {grpc_addr}  (herald.v1.Router, herald.v1.Presence; reflection on)\n\
         \x20 Health, metrics    {http}://{ws_addr}/healthz  /readyz  /metrics\n\
         \x20 Demo               {http}://{ws_addr}/  (chat, presence, a shared document, notifications)\n\
         \x20 Dev shortcuts      {shortcuts_line}\n\
         \x20 Namespaces         {namespaces_line}\n\
         Get a token:          {token_hint}\n\
         Then connect:         websocat '{ws}://{ws_addr}/ws?token=<token>'\n\
         Stop with Ctrl-C."
    );
    if using_dev_secret {
        tracing::warn!(
            "no --jwt-secret or --jwt-public-key: using the built-in development secret; never expose this server"
        );
    }
    let (e, g) = tokio::join!(edge, grpc_server);
    e?;
    g?;
    Ok(())
}
