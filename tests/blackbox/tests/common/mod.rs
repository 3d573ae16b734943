//! Shared set-up for the black-box tests: a cluster (nats-server, edges, a
//! router, a presence service) or `herald dev`, all as real processes, and
//! tokens signed the way a customer's auth service would sign them.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_client::Client;
use herald_proto::v1::WatchRequest;
use herald_test_support::{Herald, NatsServer, free_addr};
use serde_json::{Value, json};

pub const SECRET: &str = "blackbox-test-secret";
pub const WAIT: Duration = Duration::from_secs(5);
/// How long "nothing more arrives" is watched for.
pub const QUIET: Duration = Duration::from_millis(300);

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token with these claims (`exp` defaults to an hour from now).
pub fn token_with(mut claims: Value) -> String {
    if claims.get("exp").is_none() {
        claims["exp"] = json!(now() + 3600);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub fn token(sub: &str) -> String {
    token_with(json!({ "sub": sub }))
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

/// What to start.
#[derive(Default, Clone)]
pub struct Spec {
    pub edges: usize,
    /// Presence replicas; at least one is started.
    pub presences: usize,
    /// Arguments for every process (e.g. `--config FILE`).
    pub common: Vec<String>,
    pub edge_args: Vec<String>,
    pub router_args: Vec<String>,
    pub presence_args: Vec<String>,
    /// NATS nodes: 0 or 1 for one server, 3 for a cluster.
    pub nats_nodes: usize,
    /// One server of 2.11 or later instead of the machine's.
    pub newer_nats: bool,
}

/// A cluster of real processes joined by a real nats-server.
pub struct Cluster {
    /// The (first) NATS node.
    pub nats: NatsServer,
    /// The other nodes of a NATS cluster.
    pub more_nats: Vec<NatsServer>,
    pub edges: Vec<Herald>,
    pub edge_addrs: Vec<SocketAddr>,
    pub router: Herald,
    pub router_grpc: SocketAddr,
    pub presences: Vec<Herald>,
    pub presence_grpcs: Vec<SocketAddr>,
    presence_argv: Vec<(Vec<String>, SocketAddr)>,
    /// `--nats` for every process: each node's URL, comma-separated.
    pub nats_urls: String,
    spec: Spec,
}

impl Cluster {
    pub fn start(edges: usize) -> Cluster {
        Cluster::start_spec(Spec {
            edges,
            ..Spec::default()
        })
    }

    /// `extra` is appended to every process's arguments (e.g. `--config FILE`).
    pub fn start_with(edges: usize, extra: &[String]) -> Cluster {
        Cluster::start_spec(Spec {
            edges,
            common: extra.to_vec(),
            ..Spec::default()
        })
    }

    pub fn start_spec(spec: Spec) -> Cluster {
        let (nats, more_nats) = if spec.nats_nodes > 1 {
            let mut nodes =
                NatsServer::start_cluster(spec.nats_nodes).expect("start a NATS cluster");
            let first = nodes.remove(0);
            (first, nodes)
        } else if spec.newer_nats {
            (
                NatsServer::start_newer().expect("start a newer nats-server"),
                Vec::new(),
            )
        } else {
            (NatsServer::start().expect("start nats-server"), Vec::new())
        };
        let urls = std::iter::once(&nats)
            .chain(&more_nats)
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",");
        let router_grpc = free_addr();
        let router_http = free_addr();
        let mut args = vec![
            s("router"),
            s("--grpc-listen"),
            s(router_grpc),
            s("--http-listen"),
            s(router_http),
            s("--nats"),
            urls.clone(),
        ];
        args.extend_from_slice(&spec.common);
        args.extend_from_slice(&spec.router_args);
        let router = Herald::start("router", &args, router_http).expect("start router");
        let mut cluster = Cluster {
            nats,
            more_nats,
            nats_urls: urls,
            edges: Vec::new(),
            edge_addrs: Vec::new(),
            router,
            router_grpc,
            presences: Vec::new(),
            presence_grpcs: Vec::new(),
            presence_argv: Vec::new(),
            spec: spec.clone(),
        };
        for i in 0..spec.presences.max(1) {
            let grpc = free_addr();
            let http = free_addr();
            let mut args = vec![
                s("presence"),
                s("--grpc-listen"),
                s(grpc),
                s("--http-listen"),
                s(http),
                s("--nats"),
                cluster.nats_urls.clone(),
                s("--replica-id"),
                format!("presence-{i}"),
            ];
            args.extend_from_slice(&spec.common);
            args.extend_from_slice(&spec.presence_args);
            let p = Herald::start(&format!("presence-{i}"), &args, http).expect("start presence");
            cluster.presences.push(p);
            cluster.presence_grpcs.push(grpc);
            cluster.presence_argv.push((args, http));
        }
        for i in 0..spec.edges {
            cluster.add_edge(&format!("edge-{i}"));
        }
        cluster
    }

    pub fn add_edge(&mut self, node: &str) {
        self.add_edge_with(node, &[]);
    }

    /// An edge with `extra` arguments besides the cluster's.
    pub fn add_edge_with(&mut self, node: &str, extra: &[String]) {
        let addr = free_addr();
        let edge = self.edge_process(node, addr, extra);
        self.edges.push(edge);
        self.edge_addrs.push(addr);
    }

    /// Stops edge `i` (SIGTERM, waiting up to `grace` for it to drain and
    /// exit) and starts a new one on the same address as `node`, as a
    /// Deployment's new pod replaces an old one.
    pub fn replace_edge(&mut self, i: usize, node: &str, grace: Duration) {
        self.edges[i].stop(grace);
        self.edges[i] = self.edge_process(node, self.edge_addrs[i], &[]);
    }

    /// An edge that reaches NATS at `nats_url` (a proxy, say) instead of
    /// the cluster's URLs.
    pub fn add_edge_via(&mut self, node: &str, nats_url: &str) {
        let addr = free_addr();
        let edge = self.edge_process_on(node, addr, nats_url, &[]);
        self.edges.push(edge);
        self.edge_addrs.push(addr);
    }

    fn edge_process(&self, node: &str, addr: SocketAddr, extra: &[String]) -> Herald {
        self.edge_process_on(node, addr, &self.nats_urls, extra)
    }

    fn edge_process_on(
        &self,
        node: &str,
        addr: SocketAddr,
        nats_urls: &str,
        extra: &[String],
    ) -> Herald {
        let mut args = vec![
            s("edge"),
            s("--listen"),
            s(addr),
            s("--nats"),
            s(nats_urls),
            s("--node-id"),
            s(node),
            s("--jwt-secret"),
            s(SECRET),
        ];
        args.extend_from_slice(&self.spec.common);
        args.extend_from_slice(&self.spec.edge_args);
        args.extend_from_slice(extra);
        Herald::start(node, &args, addr).expect("start edge")
    }

    /// Stops presence replica `i` (SIGTERM) and starts it again on the same ports.
    pub fn restart_presence(&mut self, i: usize) {
        self.presences[i].stop(Duration::from_secs(5));
        let (args, http) = self.presence_argv[i].clone();
        self.presences[i] =
            Herald::start(&format!("presence-{i}"), &args, http).expect("restart presence");
    }

    pub fn ws(&self, edge: usize) -> String {
        format!("ws://{}/ws", self.edge_addrs[edge])
    }

    pub async fn router(&self) -> RouterClient {
        RouterClient::connect(format!("http://{}", self.router_grpc))
            .await
            .expect("connect to the router")
    }

    /// The first presence replica.
    pub async fn presence(&self) -> PresenceClient {
        self.presence_at(0).await
    }

    pub async fn presence_at(&self, i: usize) -> PresenceClient {
        PresenceClient::connect(format!("http://{}", self.presence_grpcs[i]))
            .await
            .expect("connect to the presence service")
    }
}

/// `herald dev`: everything in one process.
pub struct Dev {
    pub herald: Herald,
    pub ws_addr: SocketAddr,
    pub grpc: SocketAddr,
}

impl Dev {
    pub fn start() -> Dev {
        Dev::start_with(&[])
    }

    /// `extra` is appended to the arguments (e.g. `--config FILE`).
    pub fn start_with(extra: &[String]) -> Dev {
        let ws_addr = free_addr();
        let grpc = free_addr();
        let args = vec![
            s("dev"),
            s("--listen"),
            s(ws_addr),
            s("--grpc-listen"),
            s(grpc),
            s("--jwt-secret"),
            s(SECRET),
        ];
        let args: Vec<String> = args.into_iter().chain(extra.iter().cloned()).collect();
        let herald = Herald::start("herald dev", &args, ws_addr).expect("start herald dev");
        Dev {
            herald,
            ws_addr,
            grpc,
        }
    }

    pub fn ws(&self) -> String {
        format!("ws://{}/ws", self.ws_addr)
    }

    pub async fn router(&self) -> RouterClient {
        RouterClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connect to the router")
    }
}

pub type RouterClient = herald_proto::v1::router_client::RouterClient<tonic::transport::Channel>;
pub type PresenceClient =
    herald_proto::v1::presence_client::PresenceClient<tonic::transport::Channel>;

pub async fn connect(url: &str, user: &str) -> Client {
    let (client, connected) = Client::connect(url, &token(user)).await.expect("connect");
    assert_eq!(connected["op"], "connected");
    assert_eq!(connected["user"], user);
    client
}

/// Sends a request and asserts it was answered `ok`.
pub async fn ok(client: &Client, req: Value) -> Value {
    let reply = client.request(req.clone()).await.expect("reply");
    assert_eq!(reply["op"], "ok", "request {req} was answered {reply}");
    reply
}

/// Sends a request and asserts it was refused with `code`.
pub async fn refused(client: &Client, req: Value, code: &str) -> Value {
    let reply = client.request(req.clone()).await.expect("reply");
    assert_eq!(reply["op"], "error", "request {req} was answered {reply}");
    assert_eq!(reply["code"], code, "request {req} was answered {reply}");
    assert!(
        reply["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without a message: {reply}"
    );
    reply
}

/// Asserts that no further `message` frame arrives within [`QUIET`].
pub async fn no_more_messages(client: &Client) {
    while let Some(f) = client.next_frame(QUIET).await.expect("connection open") {
        assert_ne!(f["op"], "message", "unexpected extra message {f}");
    }
}

/// A configuration file that lives as long as the test.
pub fn config_file(text: &str) -> (tempfile::NamedTempFile, Vec<String>) {
    use std::io::Write;
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    let args = vec!["--config".to_string(), f.path().display().to_string()];
    (f, args)
}

/// A `Router.Publish` of `data` (JSON text) to `room`, without a key.
pub fn publish_request(room: &str, data: impl Into<String>) -> herald_proto::v1::PublishRequest {
    herald_proto::v1::PublishRequest {
        room: room.into(),
        data: data.into(),
        key: String::new(),
    }
}

/// Users listed by a `presence` reply.
pub fn member_users(reply: &Value) -> Vec<String> {
    let mut users: Vec<String> = reply["members"]
        .as_array()
        .expect("members array")
        .iter()
        .map(|m| m["user"].as_str().unwrap().to_string())
        .collect();
    users.sort();
    users
}

/// Collects a Watch stream's events in the background.
pub fn watch(
    mut client: PresenceClient,
    rooms: &[&str],
    users: &[&str],
) -> Arc<Mutex<Vec<herald_proto::v1::PresenceEvent>>> {
    let req = WatchRequest {
        rooms: rooms.iter().map(|r| r.to_string()).collect(),
        users: users.iter().map(|u| u.to_string()).collect(),
    };
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    tokio::spawn(async move {
        let mut stream = client.watch(req).await.expect("watch").into_inner();
        let _ = ready_tx.send(());
        while let Ok(Some(e)) = stream.message().await {
            sink.lock().unwrap().push(e);
        }
    });
    let _ = ready_rx.recv_timeout(WAIT);
    events
}

pub fn transitions(
    events: &Mutex<Vec<herald_proto::v1::PresenceEvent>>,
    user: &str,
) -> Vec<String> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.user == user && e.room.is_empty())
        .map(|e| e.event.clone())
        .collect()
}

/// A process's resident memory, as its `/metrics` says
/// (`herald_process_resident_memory_bytes`).
#[allow(dead_code)]
pub fn resident_bytes(http: SocketAddr) -> f64 {
    let (status, text) = herald_test_support::http_get(http, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix("herald_process_resident_memory_bytes "))
        .expect("the process exports its resident memory")
        .trim()
        .parse()
        .unwrap()
}
