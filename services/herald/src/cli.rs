//! The command line. Every flag can also be given as a `HERALD_*`
//! environment variable (the Helm chart sets those).

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "herald",
    version,
    about = "Herald: realtime presence and messaging over WebSockets",
    long_about = "Herald: realtime presence and messaging over WebSockets.\n\n\
        Run `herald dev` for everything in one process (no other software needed),\n\
        or `herald edge`, `herald router` and `herald presence` joined by NATS for a cluster."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start; boxing the larger variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Everything in one process with an in-memory broker: WebSocket edge, gRPC router and presence.
    Dev(DevArgs),
    /// A WebSocket edge of a cluster: holds client connections.
    Edge(EdgeArgs),
    /// The gRPC send API of a cluster (herald.v1.Router, and herald.v1.Presence for convenience).
    Router(RouterArgs),
    /// The presence service of a cluster: who is online, where, in which room.
    Presence(PresenceArgs),
    /// Mint a token signed with the configured HS256 secret (for development and tests).
    Token(TokenArgs),
}

/// The keys client tokens are verified with: for the commands that hold
/// client connections (`dev`, `edge`).
#[derive(Args, Debug, Clone)]
pub struct Keys {
    /// HS256 secret that client tokens are signed with.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key (RS256, ES256 or EdDSA) or JWKS file that client tokens are verified
    /// with; read again when it changes.
    #[arg(long, env = "HERALD_JWT_PUBLIC_KEY", value_name = "FILE")]
    pub jwt_public_key: Option<PathBuf>,
    /// URL of the identity provider's JWKS (its public keys), fetched at start,
    /// every --jwks-refresh, and when a token names a key id not known yet.
    #[arg(long, env = "HERALD_JWKS_URL", value_name = "URL")]
    pub jwks_url: Option<String>,
    /// How often the JWKS is fetched again.
    #[arg(long, env = "HERALD_JWKS_REFRESH", value_parser = humantime::parse_duration, default_value = "5m")]
    pub jwks_refresh: std::time::Duration,
    /// Tokens must name this audience in `aud`; without it `aud` is not checked.
    #[arg(long, env = "HERALD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Tokens must come from this issuer (`iss`, compared exactly); without it `iss` is not checked.
    #[arg(long, env = "HERALD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// A connection's session ends at its token's `exp` or this long after it was verified,
    /// whichever comes first (the client sends `refresh` with a new token to go on).
    #[arg(long, env = "HERALD_MAX_SESSION_LIFETIME", value_parser = humantime::parse_duration, default_value = "24h")]
    pub max_session_lifetime: std::time::Duration,
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Configuration file (TOML) with namespace policies; without it every namespace is open.
    #[arg(long, env = "HERALD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "HERALD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// How deeply the JSON of a message (`data`) or a presence `meta` may
    /// nest; deeper is refused (bad_request, INVALID_ARGUMENT).
    #[arg(long, env = "HERALD_MAX_JSON_DEPTH", default_value_t = 64)]
    pub max_json_depth: usize,
    /// Threads that run the service's work; default: one per CPU the process
    /// may use. Fewer threads wake each other less, which can save CPU on a
    /// small machine (docs/benchmarks.md measures a router both ways).
    #[arg(long, env = "HERALD_WORKER_THREADS")]
    pub worker_threads: Option<NonZeroUsize>,
    /// Sample the heap and serve `GET /debug/pprof/heap` (pprof) on the HTTP
    /// port; needs a herald built with `--features heap-profile`.
    #[arg(long, env = "HERALD_HEAP_PROFILE")]
    pub heap_profile: bool,
    #[command(flatten)]
    pub traces: TraceArgs,
}

/// Who may call the gRPC API.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// File of API tokens, one `TOKEN SCOPES` per line (scopes: publish,
    /// presence, admin); calls then need `authorization: Bearer TOKEN`. Read
    /// again when it changes. Without it the gRPC API is open to anyone who
    /// can reach it.
    #[arg(long, env = "HERALD_API_TOKENS", value_name = "FILE")]
    pub api_tokens: Option<PathBuf>,
    /// Serve the gRPC API over TLS with this certificate chain, PEM (the
    /// server's own first; with --grpc-tls-key). Re-read when it changes.
    #[arg(
        long,
        env = "HERALD_GRPC_TLS_CERT",
        value_name = "FILE",
        requires = "grpc_tls_key"
    )]
    pub grpc_tls_cert: Option<PathBuf>,
    /// The private key of --grpc-tls-cert, PEM.
    #[arg(
        long,
        env = "HERALD_GRPC_TLS_KEY",
        value_name = "FILE",
        requires = "grpc_tls_cert"
    )]
    pub grpc_tls_key: Option<PathBuf>,
    /// Take only gRPC clients that present a certificate signed by a CA in
    /// this file, PEM (mutual TLS; needs --grpc-tls-cert). Re-read when it
    /// changes.
    #[arg(
        long,
        env = "HERALD_GRPC_CLIENT_CA",
        value_name = "FILE",
        requires = "grpc_tls_cert"
    )]
    pub grpc_client_ca: Option<PathBuf>,
}

/// How an edge or a router calls the presence service at `--presence`
/// over TLS (an `https://` URL).
#[derive(Args, Debug, Clone)]
pub struct PresenceTlsArgs {
    /// CA certificates, PEM, that signed the presence service's
    /// certificate; needed for an https:// --presence. Re-read when it changes.
    #[arg(long, env = "HERALD_PRESENCE_TLS_CA", value_name = "FILE")]
    pub presence_tls_ca: Option<PathBuf>,
    /// Client certificate, PEM, for a presence service that takes only
    /// clients with one (its --grpc-client-ca); with --presence-tls-key.
    #[arg(
        long,
        env = "HERALD_PRESENCE_TLS_CERT",
        value_name = "FILE",
        requires = "presence_tls_key"
    )]
    pub presence_tls_cert: Option<PathBuf>,
    /// The private key of --presence-tls-cert, PEM.
    #[arg(
        long,
        env = "HERALD_PRESENCE_TLS_KEY",
        value_name = "FILE",
        requires = "presence_tls_cert"
    )]
    pub presence_tls_key: Option<PathBuf>,
}

/// Trace export (OpenTelemetry, OTLP over gRPC): the standard `OTEL_*`
/// variables, or these flags. Without an endpoint nothing is exported.
#[derive(Args, Debug, Clone)]
pub struct TraceArgs {
    /// OTLP/gRPC endpoint that spans are exported to, e.g. http://otel-collector:4317.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans; default herald-edge, herald-router,
    /// herald-presence or herald-dev.
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,
    /// Sampler: always_on, always_off, traceidratio, parentbased_always_on
    /// (the default), parentbased_always_off, parentbased_traceidratio.
    #[arg(long, env = "OTEL_TRACES_SAMPLER")]
    pub traces_sampler: Option<String>,
    /// The sampler's ratio, for the *traceidratio samplers (0 to 1).
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG")]
    pub traces_sampler_arg: Option<String>,
    /// More resource attributes: key=value,key=value.
    #[arg(long, env = "OTEL_RESOURCE_ATTRIBUTES")]
    pub otel_resource_attributes: Option<String>,
    /// Export nothing, even with an endpoint.
    #[arg(long, env = "OTEL_SDK_DISABLED", default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub otel_sdk_disabled: bool,
}

/// How a cluster process reaches NATS.
#[derive(Args, Debug, Clone)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated: the client moves to another when
    /// one goes away.
    #[arg(long = "nats", env = "HERALD_NATS", value_name = "URLS")]
    pub urls: String,
    /// NATS credentials file (user JWT and NKey seed, as `nsc` writes it).
    #[arg(long, env = "HERALD_NATS_CREDS", value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
    /// CA certificate(s), PEM, that the NATS server's certificate is checked
    /// against; makes TLS required.
    #[arg(long, env = "HERALD_NATS_TLS_CA", value_name = "FILE")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate, PEM, for NATS servers that verify clients (with --nats-tls-key).
    #[arg(
        long,
        env = "HERALD_NATS_TLS_CERT",
        value_name = "FILE",
        requires = "nats_tls_key"
    )]
    pub nats_tls_cert: Option<PathBuf>,
    /// The client certificate's private key, PEM (with --nats-tls-cert).
    #[arg(
        long,
        env = "HERALD_NATS_TLS_KEY",
        value_name = "FILE",
        requires = "nats_tls_cert"
    )]
    pub nats_tls_key: Option<PathBuf>,
}

/// What happens between SIGTERM and exit.
#[derive(Args, Debug, Clone)]
pub struct DrainArgs {
    /// After SIGTERM, keep serving this long while reporting not ready
    /// (/readyz 503, gRPC health NOT_SERVING), so that load balancers stop
    /// sending new work before anything closes.
    #[arg(long, env = "HERALD_DRAIN_DELAY", value_parser = humantime::parse_duration, default_value = "0s")]
    pub drain_delay: Duration,
}

/// How durable namespaces are stored (processes that create the storage).
#[derive(Args, Debug, Clone)]
pub struct StorageArgs {
    /// JetStream replicas of each durable namespace's stream and of the read
    /// markers' bucket: 3 on a NATS cluster, 1 on a single server.
    #[arg(long, env = "HERALD_STREAM_REPLICAS", default_value = "1")]
    pub stream_replicas: NonZeroUsize,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// What the commands that hold client connections (`dev`, `edge`) take
/// about those clients: the keys their tokens are verified with, and how
/// clients gone without closing are noticed.
#[derive(Args, Debug)]
pub struct ClientArgs {
    #[command(flatten)]
    pub keys: Keys,
    #[command(flatten)]
    pub liveness: LivenessArgs,
    /// Rooms one connection may be in at once (its personal room aside).
    #[arg(long, env = "HERALD_MAX_ROOMS_PER_CONNECTION", default_value_t = 256)]
    pub max_rooms_per_connection: usize,
    /// Largest presence `meta`, in bytes of JSON.
    #[arg(long, env = "HERALD_MAX_META_BYTES", default_value_t = 2048)]
    pub max_meta_bytes: usize,
    #[command(flatten)]
    pub access: AccessArgs,
}

/// Which browser pages may connect, and TLS for edges that no ingress
/// or load balancer terminates TLS for.
#[derive(Args, Debug)]
pub struct AccessArgs {
    /// Browser origins allowed to open WebSockets, comma-separated: exact
    /// (https://app.example.com) or with a wildcard for one or more subdomain
    /// labels (https://*.example.com). Upgrades from other origins get 403;
    /// clients that send no Origin (not browsers) are let through. Default:
    /// every origin.
    #[arg(long, env = "HERALD_ALLOWED_ORIGINS", value_name = "ORIGINS")]
    pub allowed_origins: Option<String>,
    /// Most connections this edge holds; more get HTTP 503 with Retry-After.
    /// 0: no cap.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,
    /// Most connections from one client address; more get HTTP 503. 0: no cap.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,
    /// Most connections upgraded but not yet authenticated (no valid
    /// `connect` yet); more get HTTP 503. 0: no cap.
    #[arg(long, env = "HERALD_MAX_PENDING_CONNECTIONS", default_value_t = 4096)]
    pub max_pending_connections: usize,
    /// Proxies (addresses or CIDR ranges, comma-separated) whose
    /// X-Forwarded-For names the client's address for --max-connections-per-ip.
    #[arg(
        long,
        env = "HERALD_TRUSTED_PROXIES",
        value_name = "RANGES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<String>,
    /// Serve TLS (wss://, and https:// for /healthz, /readyz, /metrics) with
    /// this certificate chain, PEM (with --tls-key). Reloaded when the file
    /// changes.
    #[arg(
        long,
        env = "HERALD_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key, PEM: PKCS#8, PKCS#1 (RSA) or SEC1 (EC)
    /// (with --tls-cert). Reloaded when the file changes.
    #[arg(
        long,
        env = "HERALD_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
}

/// How an edge notices clients that are gone without closing.
#[derive(Args, Debug)]
pub struct LivenessArgs {
    /// How often the edge pings each client (a WebSocket ping), announced to
    /// clients as `heartbeat_ms`; whole seconds, at least 1s.
    #[arg(long, env = "HERALD_HEARTBEAT", value_parser = humantime::parse_duration, default_value = "25s")]
    pub heartbeat: Duration,
    /// Close a connection from which nothing (no frame, no pong) has arrived
    /// for this long; whole seconds, longer than --heartbeat. Default: twice
    /// the heartbeat plus 10s.
    #[arg(long, env = "HERALD_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<Duration>,
}

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Address for WebSocket clients (/ws) and /healthz, /readyz, /metrics.
    #[arg(long, env = "HERALD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Address for the gRPC API (Router and Presence).
    #[arg(long, env = "HERALD_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    pub grpc_listen: SocketAddr,
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub clients: ClientArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct EdgeArgs {
    /// Address for WebSocket clients (/ws) and /healthz, /readyz, /metrics.
    #[arg(long, env = "HERALD_LISTEN")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub nats: NatsArgs,
    /// This edge's id in the cluster (unique per running edge; the pod name in Kubernetes).
    #[arg(long, env = "HERALD_NODE_ID")]
    pub node_id: Option<String>,
    /// gRPC address of the presence service, to read member lists from it directly
    /// instead of through NATS.
    #[arg(long, env = "HERALD_PRESENCE")]
    pub presence: Option<String>,
    /// API token sent to the presence service at --presence (one with the
    /// `presence` scope in its --api-tokens file).
    #[arg(long, env = "HERALD_PRESENCE_API_TOKEN", hide_env_values = true)]
    pub presence_api_token: Option<String>,
    #[command(flatten)]
    pub presence_tls: PresenceTlsArgs,
    /// How long a new connection may take to send a valid `connect`.
    #[arg(long, env = "HERALD_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub handshake_timeout: Duration,
    /// Largest client message accepted, in bytes.
    #[arg(long, env = "HERALD_MAX_MESSAGE_BYTES", default_value_t = 65536)]
    pub max_message_bytes: usize,
    /// Frames queued for one connection before it is closed as a slow consumer.
    #[arg(long, env = "HERALD_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,
    /// Bytes queued for one connection before it is closed as a slow
    /// consumer, so that large messages to a client that reads nothing
    /// cannot fill the edge's memory (default 4 MiB).
    #[arg(long, env = "HERALD_OUTBOUND_QUEUE_BYTES", default_value_t = 4 << 20)]
    pub outbound_queue_bytes: usize,
    /// Hold room messages for up to this long so that a connection receiving
    /// many a second gets several per write: less CPU per message, that much
    /// more latency. 0 writes each at once.
    #[arg(long, env = "HERALD_WRITE_DELAY", value_parser = humantime::parse_duration, default_value = "0s")]
    pub write_delay: Duration,
    /// Hand room messages' sends to the kernel in runs through io_uring
    /// (each member still gets its own write); false: one send(2) per member.
    /// Falls back by itself where the kernel or a seccomp profile refuses it.
    #[arg(long, env = "HERALD_IO_URING", default_value_t = true, action = clap::ArgAction::Set)]
    pub io_uring: bool,
    /// How often this edge's presence heartbeat goes out (keep it well under the
    /// presence service's --edge-timeout).
    #[arg(long, env = "HERALD_PRESENCE_INTERVAL", value_parser = humantime::parse_duration, default_value = "2s")]
    pub presence_interval: Duration,
    /// Under load, presence events (join, leave, update) and reports to the
    /// presence service wait up to this long to go to NATS together with
    /// others: one write and one wake-up of the server for many, at up to
    /// this much more latency. One after a quiet spell goes at once. 0 sends
    /// each at once.
    #[arg(long, env = "HERALD_PRESENCE_WINDOW", value_parser = presence_window, default_value = "2ms")]
    pub presence_window: Duration,
    /// After SIGTERM and --drain-delay, clients are told to reconnect
    /// elsewhere (1012) at random moments spread over this window, not all
    /// at once; the edge exits once they are gone.
    #[arg(long, env = "HERALD_DRAIN_WINDOW", value_parser = humantime::parse_duration, default_value = "10s")]
    pub drain_window: Duration,
    #[command(flatten)]
    pub drain: DrainArgs,
    #[command(flatten)]
    pub storage: StorageArgs,
    #[command(flatten)]
    pub clients: ClientArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct RouterArgs {
    /// Address for the gRPC API.
    #[arg(long, env = "HERALD_GRPC_LISTEN")]
    pub grpc_listen: SocketAddr,
    /// Most messages one PublishBatch call may carry.
    #[arg(long, env = "HERALD_MAX_PUBLISH_BATCH", default_value_t = 1000)]
    pub max_publish_batch: usize,
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Address for /healthz, /readyz, /metrics.
    #[arg(long, env = "HERALD_HTTP_LISTEN", default_value = "0.0.0.0:8081")]
    pub http_listen: SocketAddr,
    /// gRPC address of the presence service, to forward Presence calls to it
    /// directly instead of through NATS.
    #[arg(long, env = "HERALD_PRESENCE")]
    pub presence: Option<String>,
    /// API token sent to the presence service at --presence (one with the
    /// `presence` scope in its --api-tokens file).
    #[arg(long, env = "HERALD_PRESENCE_API_TOKEN", hide_env_values = true)]
    pub presence_api_token: Option<String>,
    #[command(flatten)]
    pub presence_tls: PresenceTlsArgs,
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub drain: DrainArgs,
    #[command(flatten)]
    pub storage: StorageArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct PresenceArgs {
    /// Address for the gRPC Presence API.
    #[arg(long, env = "HERALD_GRPC_LISTEN")]
    pub grpc_listen: SocketAddr,
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Address for /healthz, /readyz, /metrics.
    #[arg(long, env = "HERALD_HTTP_LISTEN", default_value = "0.0.0.0:8082")]
    pub http_listen: SocketAddr,
    /// An edge that sends no heartbeat for this long is considered dead and its connections gone.
    #[arg(long, env = "HERALD_EDGE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub edge_timeout: Duration,
    /// A user whose last connection closed goes offline only after this long
    /// without a new connection.
    #[arg(long, env = "HERALD_PRESENCE_GRACE", value_parser = humantime::parse_duration, default_value = "5s")]
    pub presence_grace: Duration,
    /// This replica's name among the presence replicas (the pod name in
    /// Kubernetes); the smallest live name publishes cluster-wide events. Random when not given.
    #[arg(long, env = "HERALD_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Watch the edge pods through the Kubernetes API and reap a pod's
    /// connections as soon as it is deleted or fails.
    #[arg(long, env = "HERALD_KUBE")]
    pub kube: bool,
    /// Namespace of the edge pods (default: the service account's namespace).
    #[arg(long, env = "HERALD_KUBE_NAMESPACE", requires = "kube")]
    pub kube_namespace: Option<String>,
    /// Label selector of the edge pods.
    #[arg(
        long,
        env = "HERALD_KUBE_SELECTOR",
        default_value = "app.kubernetes.io/component=edge"
    )]
    pub kube_selector: String,
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub drain: DrainArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// The user id (`sub` claim).
    #[arg(long)]
    pub sub: String,
    /// How long the token is valid, e.g. 30m, 1h, 7d.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    pub ttl: Duration,
    /// Room patterns the user may join (`rooms` claim), e.g. chat:*; repeatable.
    #[arg(long = "room")]
    pub rooms: Vec<String>,
    /// Room patterns the user may publish to (`publish` claim); repeatable.
    #[arg(long = "publish")]
    pub publish: Vec<String>,
    /// User-id patterns whose online status the user may watch (`watch`
    /// claim), e.g. team-*; repeatable.
    #[arg(long = "watch")]
    pub watch: Vec<String>,
    /// HS256 secret; defaults to the built-in development secret that `herald dev` uses.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
}

/// The longest `--presence-window`: past it, presence would lag behind
/// what users do for no gain (a window of a few milliseconds already
/// gathers a busy edge's traffic).
const MAX_PRESENCE_WINDOW: Duration = Duration::from_secs(1);

fn presence_window(s: &str) -> Result<Duration, String> {
    let window = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if window > MAX_PRESENCE_WINDOW {
        return Err(format!(
            "{s} is longer than the most allowed, {}",
            humantime::format_duration(MAX_PRESENCE_WINDOW)
        ));
    }
    Ok(window)
}
