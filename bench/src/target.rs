//! The system under test: a cluster (nats-server with JetStream, a presence
//! service, a router, N edges) or one `herald dev` process, started here as
//! child processes so that their CPU time can be read from `/proc`.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use herald_test_support::{ChildProcess, free_addr, nats_server_bin};
use serde_json::json;
use tempfile::TempDir;

/// How long a process may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// nats-server (JetStream), one presence service, one router, `--edges` edges.
    Cluster,
    /// One `herald dev` process (in-memory broker).
    Dev,
    /// The comparison peer: `--edges` Socket.IO 4 servers (Node) joined by
    /// the Redis adapter (`idle`, `fanout`, `churn`, `reconnect-storm`).
    Socketio,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Cluster => "cluster",
            TargetKind::Dev => "dev",
            TargetKind::Socketio => "socketio",
        }
    }
}

/// Options shared by every scenario: what to run against, and where the
/// results go.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// What to benchmark; the bench starts it on free ports and stops it at the end.
    #[arg(long, value_enum, default_value = "cluster")]
    pub target: TargetKind,
    /// Number of edges of the cluster, or of Socket.IO servers with
    /// `--target socketio` (ignored with `--target dev`).
    #[arg(long, default_value_t = 3)]
    pub edges: usize,
    /// A running Redis for the Socket.IO servers' adapter and emitter
    /// (`--target socketio`) [default: a redis-server the run starts on a
    /// free port, so that its memory and CPU are the run's own].
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// The `redis-server` binary the run starts without `--redis-url`
    /// [default: $REDIS_SERVER, else from PATH].
    #[arg(long, value_name = "PATH")]
    pub redis_server: Option<PathBuf>,
    /// The `herald` binary [default: $HERALD_BIN, else `herald` next to this
    /// executable, else target/release/herald, else target/debug/herald].
    #[arg(long, value_name = "PATH")]
    pub herald: Option<PathBuf>,
    /// The `nats-server` binary [default: $NATS_SERVER, else from PATH, else /usr/sbin/nats-server].
    #[arg(long, value_name = "PATH")]
    pub nats_server: Option<PathBuf>,
    /// GOMAXPROCS of the nats-server the bench starts: how many threads
    /// run its Go code at once [default: Go's own, one per CPU]. On a
    /// machine whose cores the edges and the load also use, 1 spares the
    /// Go runtime's idle spinning between small messages.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub nats_gomaxprocs: Option<u16>,
    /// Client connections are spread over this many source addresses,
    /// 127.0.0.2, 127.0.0.3, ... (each has only ~28k ephemeral ports).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..=250))]
    pub source_addrs: u8,
    /// Write the results as JSON to FILE; `-` prints one JSON line on stdout
    /// (the table then goes to stderr).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Keep the processes' logs (their folder is printed) instead of deleting them.
    #[arg(long)]
    pub keep_logs: bool,
    /// `idle`, `fanout`, `churn`, `reconnect-storm`: run the same scenario
    /// against Herald (`--target`) and then against Socket.IO (same clients,
    /// same options; `fanout` alternates the two round by round, both
    /// connected throughout), and print both with the ratios Herald /
    /// Socket.IO. `--json` then holds `{herald, socketio, compare}`.
    #[arg(long)]
    pub vs_socketio: bool,
    /// An extra argument for every `herald edge` of the cluster, e.g.
    /// `--edge-arg=--write-delay=2ms` (repeatable).
    #[arg(long = "edge-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub edge_args: Vec<String>,
    /// An extra argument for every Herald process (edges, router, presence,
    /// or `herald dev`), e.g. `--herald-arg=--traces-sampler=always_on`.
    #[arg(long = "herald-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub herald_args: Vec<String>,
    /// Export traces from every Herald process to an OTLP sink in the bench
    /// (counted, then dropped), to measure what tracing costs.
    #[arg(long)]
    pub otlp_sink: bool,
}

impl CommonArgs {
    pub fn source_ips(&self) -> Vec<IpAddr> {
        (0..self.source_addrs)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i)))
            .collect()
    }
}

/// What a process is, for grouping CPU time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Herald,
    Nats,
}

/// A started process and what it is.
struct Proc {
    role: Role,
    process: ChildProcess,
}

impl Proc {
    /// Starts `cmd` as `name`, its output in `<dir>/<name>.log`.
    fn spawn(name: &str, role: Role, cmd: Command, dir: &Path) -> Result<Proc> {
        let process = ChildProcess::spawn(name, cmd, dir.join(format!("{name}.log")))?;
        Ok(Proc { role, process })
    }
}

/// A running system under test.
pub struct Target {
    pub kind: TargetKind,
    /// `ws://.../ws` of each edge (one for `dev`).
    pub edge_urls: Vec<String>,
    /// The HS256 secret the edges verify tokens with.
    secret: String,
    /// Stopped in reverse order of start: edges first, nats-server last.
    procs: Vec<Proc>,
    dir: Option<TempDir>,
    keep_logs: bool,
    pub herald_bin: PathBuf,
    /// nats-server's monitoring port (cluster only).
    nats_monitor: Option<SocketAddr>,
    /// nats-server's Go profiling port (`--profile`, cluster only): its
    /// heap's own account, to tell live memory from memory kept.
    nats_profile: Option<SocketAddr>,
    /// The nats-server binary (cluster only).
    nats_bin: Option<PathBuf>,
    nats_gomaxprocs: Option<u16>,
    /// Where `herald.v1.Router` is served: the router's gRPC port, or
    /// `herald dev`'s.
    pub router_grpc: Option<SocketAddr>,
    /// Arguments for every Herald process (`--herald-arg`, and the sink's endpoint).
    herald_args: Vec<String>,
    /// Where the processes export traces (`--otlp-sink`).
    pub otlp_sink: Option<crate::otlp::OtlpSink>,
}

impl Target {
    /// Starts what `args` asks for; `config` (TOML: namespace policies) is
    /// given to every Herald process as `--config`, for scenarios that need
    /// namespaces of their own (durable rooms); without it every namespace
    /// is open and ephemeral.
    pub fn start_with(args: &CommonArgs, config: Option<&str>) -> Result<Target> {
        let herald_bin = match &args.herald {
            Some(p) => p.clone(),
            None => find_herald()?,
        };
        if !herald_bin.is_file() {
            bail!("{} is not a file", herald_bin.display());
        }
        let dir = tempfile::Builder::new().prefix("herald-bench-").tempdir()?;
        let secret = format!("herald-bench-{}-{}", std::process::id(), now_secs());
        let otlp_sink = match args.otlp_sink {
            true => Some(crate::otlp::OtlpSink::start()?),
            false => None,
        };
        let mut herald_args = args.herald_args.clone();
        if let Some(sink) = &otlp_sink {
            herald_args.push(format!("--otlp-endpoint=http://{}", sink.addr));
        }
        if let Some(config) = config {
            let path = dir.path().join("herald.toml");
            std::fs::write(&path, config)
                .with_context(|| format!("could not write {}", path.display()))?;
            herald_args.push(format!("--config={}", path.display()));
        }
        let mut target = Target {
            kind: args.target,
            edge_urls: Vec::new(),
            secret,
            procs: Vec::new(),
            dir: Some(dir),
            keep_logs: args.keep_logs,
            herald_bin,
            nats_monitor: None,
            nats_profile: None,
            nats_bin: None,
            nats_gomaxprocs: args.nats_gomaxprocs,
            router_grpc: None,
            herald_args,
            otlp_sink,
        };
        match args.target {
            TargetKind::Dev => target.start_dev()?,
            TargetKind::Socketio => bail!("the Socket.IO peer is not a Herald target"),
            TargetKind::Cluster => {
                if args.edges == 0 {
                    bail!("--edges must be at least 1");
                }
                target.start_cluster(args.edges, args.nats_server.clone(), &args.edge_args)?;
            }
        }
        Ok(target)
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("log dir").path()
    }

    fn herald(&self, args: &[String]) -> Command {
        let mut cmd = Command::new(&self.herald_bin);
        cmd.args(args);
        // Herald's defaults (log level info, no config file), not whatever
        // the shell that runs the bench has set.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HERALD_") || key == "RUST_LOG" {
                cmd.env_remove(key);
            }
        }
        cmd
    }

    fn start_herald(&mut self, name: &str, mut args: Vec<String>, http: SocketAddr) -> Result<()> {
        args.extend(self.herald_args.iter().cloned());
        let cmd = self.herald(&args);
        let mut proc = Proc::spawn(name, Role::Herald, cmd, self.dir())?;
        let ready = proc.process.wait_ready(http, READY_TIMEOUT);
        self.procs.push(proc);
        ready
    }

    fn start_dev(&mut self) -> Result<()> {
        let listen = free_addr();
        let grpc = free_addr();
        let args = vec![
            "dev".into(),
            "--listen".into(),
            listen.to_string(),
            "--grpc-listen".into(),
            grpc.to_string(),
            "--jwt-secret".into(),
            self.secret.clone(),
        ];
        self.start_herald("herald-dev", args, listen)?;
        self.edge_urls.push(format!("ws://{listen}/ws"));
        self.router_grpc = Some(grpc);
        Ok(())
    }

    fn start_cluster(
        &mut self,
        edges: usize,
        nats_bin: Option<PathBuf>,
        edge_args: &[String],
    ) -> Result<()> {
        let nats_addr = free_addr();
        let monitor = free_addr();
        let store = self.dir().join("jetstream");
        let nats_bin = nats_bin.unwrap_or_else(nats_server_bin);
        let mut cmd = Command::new(&nats_bin);
        self.nats_bin = Some(nats_bin);
        // Go's default, unless asked: not whatever the bench's shell has set.
        cmd.env_remove("GOMAXPROCS");
        if let Some(n) = self.nats_gomaxprocs {
            cmd.env("GOMAXPROCS", n.to_string());
        }
        cmd.args(["-a", "127.0.0.1", "-p", &nats_addr.port().to_string()])
            .args(["-m", &monitor.port().to_string(), "-js", "-sd"])
            .arg(&store);
        let profile = free_addr();
        cmd.args(["--profile", &profile.port().to_string()]);
        self.nats_monitor = Some(monitor);
        self.nats_profile = Some(profile);
        let mut nats = Proc::spawn("nats-server", Role::Nats, cmd, self.dir())?;
        let up = nats.process.wait_listening(nats_addr, READY_TIMEOUT);
        self.procs.push(nats);
        up?;
        let nats_url = format!("nats://{nats_addr}");

        self.start_backend("presence", &nats_url)?;
        self.router_grpc = Some(self.start_backend("router", &nats_url)?);

        for i in 0..edges {
            let listen = free_addr();
            let name = format!("edge-{i}");
            let mut args = vec![
                "edge".into(),
                "--listen".into(),
                listen.to_string(),
                "--nats".into(),
                nats_url.clone(),
                "--node-id".into(),
                name.clone(),
                "--jwt-secret".into(),
                self.secret.clone(),
            ];
            args.extend(edge_args.iter().cloned());
            self.start_herald(&name, args, listen)?;
            self.edge_urls.push(format!("ws://{listen}/ws"));
        }
        Ok(())
    }

    /// Starts `herald <service>` (presence or router) on a free gRPC and a
    /// free HTTP port; returns the gRPC address.
    fn start_backend(&mut self, service: &str, nats_url: &str) -> Result<SocketAddr> {
        let (grpc, http) = (free_addr(), free_addr());
        let args = vec![
            service.into(),
            "--grpc-listen".into(),
            grpc.to_string(),
            "--http-listen".into(),
            http.to_string(),
            "--nats".into(),
            nats_url.into(),
        ];
        self.start_herald(service, args, http)?;
        Ok(grpc)
    }

    /// One line saying what runs.
    pub fn describe(&self) -> String {
        match self.kind {
            TargetKind::Dev => "herald dev (one process, in-memory broker)".into(),
            TargetKind::Socketio => "Socket.IO peer".into(),
            TargetKind::Cluster => format!(
                "cluster: {} edge(s), 1 presence, 1 router, nats-server (JetStream)",
                self.edge_urls.len()
            ),
        }
    }

    /// An HS256 token for `sub`, valid for a day.
    pub fn token(&self, sub: &str) -> String {
        let claims = json!({ "sub": sub, "exp": now_secs() + 86_400 });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(self.secret.as_bytes()),
        )
        .expect("HS256 signing cannot fail")
    }

    /// Versions of the kernel, nats-server (cluster) and Herald.
    pub fn versions(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut v = serde_json::Map::new();
        v.insert("kernel".into(), json!(crate::procfs::kernel_release()));
        if let Some(bin) = &self.nats_bin {
            let version = crate::procfs::version_of(bin);
            // "nats-server: v2.9.10"
            let version = version.map(|l| l.rsplit(' ').next().unwrap_or(&l).to_owned());
            v.insert("nats-server".into(), json!(version));
            let procs = self.nats_gomaxprocs.map_or_else(
                || "Go's default (one per CPU)".to_owned(),
                |n| n.to_string(),
            );
            v.insert("nats-server GOMAXPROCS".into(), json!(procs));
        }
        v.insert(
            "herald".into(),
            json!(crate::procfs::version_of(&self.herald_bin)),
        );
        v
    }

    /// Every process that serves the clients (edges, presence, router,
    /// nats-server; or `herald dev`), in the order they were started.
    pub fn servers(&self) -> Vec<CpuProbe> {
        self.cpu_probes()
            .into_iter()
            .filter(|p| p.role.is_some())
            .collect()
    }

    /// The bench's own process first, then every started process.
    pub fn cpu_probes(&self) -> Vec<CpuProbe> {
        let mut probes = vec![CpuProbe {
            name: "herald-bench (load)".into(),
            role: None,
            pid: std::process::id(),
        }];
        probes.extend(self.procs.iter().map(|p| CpuProbe {
            name: p.process.name().to_owned(),
            role: Some(p.role),
            pid: p.process.pid(),
        }));
        probes
    }

    /// The process that holds the WebSocket connections of edge `i`: `edge-<i>`
    /// of a cluster, or the `herald dev` process.
    pub fn edge_pid(&self, i: usize) -> Option<u32> {
        let name = match self.kind {
            TargetKind::Dev => "herald-dev".to_owned(),
            TargetKind::Cluster | TargetKind::Socketio => format!("edge-{i}"),
        };
        self.procs
            .iter()
            .find(|p| p.process.name() == name)
            .map(|p| p.process.pid())
    }

    /// `kill -9` of edge `i` of a cluster: its clients see their sockets
    /// drop with no goodbye, as when a machine dies. Returns its pid; it no
    /// longer counts as exited in [`Target::exited`].
    pub fn kill_edge(&mut self, i: usize) -> Result<u32> {
        if self.kind != TargetKind::Cluster {
            bail!("only an edge of a cluster can be killed (--target cluster)");
        }
        let name = format!("edge-{i}");
        let proc = self
            .procs
            .iter_mut()
            .find(|p| p.process.name() == name)
            .with_context(|| format!("the cluster has no {name}"))?;
        let pid = proc.process.pid();
        proc.process.kill();
        Ok(pid)
    }

    /// nats-server's monitoring answer to `path` (e.g. `/varz`), parsed;
    /// `None` without a cluster or when it does not answer.
    pub fn nats_get(&self, path: &str) -> Option<serde_json::Value> {
        let body = http10_get(self.nats_monitor?, path)?;
        serde_json::from_str(&body).ok()
    }

    /// nats-server's message and subscription counters (cluster only).
    pub fn nats_stats(&self) -> Option<NatsStats> {
        let varz = self.nats_get("/varz")?;
        let subsz = self.nats_get("/subsz")?;
        let jsz = self.nats_get("/jsz").unwrap_or_default();
        let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
        Some(NatsStats {
            js_api_calls: n(&jsz["api"], "total"),
            js_api_errors: n(&jsz["api"], "errors"),
            in_msgs: n(&varz, "in_msgs"),
            out_msgs: n(&varz, "out_msgs"),
            in_bytes: n(&varz, "in_bytes"),
            out_bytes: n(&varz, "out_bytes"),
            sub_inserts: n(&subsz, "num_inserts"),
            sub_removes: n(&subsz, "num_removes"),
            subscriptions: n(&subsz, "num_subscriptions"),
            subscriptions_at_start: n(&subsz, "num_subscriptions"),
        })
    }

    /// What nats-server holds now, by its own account (cluster only):
    /// `/varz` (its RSS as it sees it, connections), `/subsz` (live
    /// subscriptions), `/jsz` (JetStream streams, consumers, messages,
    /// bytes, and what is kept in memory), and `/connz` (each client
    /// connection's name, subscriptions and pending bytes), to tell where
    /// its memory goes.
    pub fn nats_state(&self) -> Option<serde_json::Value> {
        let varz = self.nats_get("/varz")?;
        let subsz = self.nats_get("/subsz")?;
        let jsz = self.nats_get("/jsz").unwrap_or_default();
        let connz = self.nats_get("/connz?limit=1024").unwrap_or_default();
        let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
        let clients: serde_json::Map<String, serde_json::Value> = connz["connections"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|c| {
                let name = c["name"].as_str().filter(|s| !s.is_empty());
                let key = format!("{} (cid {})", name.unwrap_or("unnamed"), n(c, "cid"));
                (
                    key,
                    json!({"subscriptions": n(c, "subscriptions"), "pending_bytes": n(c, "pending_bytes")}),
                )
            })
            .collect();
        let go = self.nats_go_runtime().unwrap_or_default();
        Some(json!({
            "go": go,
            "rss_mib": (n(&varz, "mem") as f64 / (1 << 20) as f64 * 1000.0).round() / 1000.0,
            "connections": n(&varz, "connections"),
            "subscriptions": n(&subsz, "num_subscriptions"),
            "sublist_cache": n(&subsz, "num_cache"),
            "js_streams": n(&jsz, "streams"),
            "js_consumers": n(&jsz, "consumers"),
            "js_messages": n(&jsz, "messages"),
            "js_bytes": n(&jsz, "bytes"),
            "js_memory_bytes": n(&jsz, "memory"),
            "js_storage_bytes": n(&jsz, "storage"),
            "js_api_total": n(&jsz["api"], "total"),
            "js_api_errors": n(&jsz["api"], "errors"),
            "clients": clients,
        }))
    }

    /// nats-server's Go runtime by its own account (`/debug/pprof/heap`'s
    /// `runtime.MemStats`, and the goroutine count), without forcing a
    /// collection: `heap_alloc_mib` is what is live or not yet collected,
    /// `heap_idle_mib - heap_released_mib` what the runtime keeps from the
    /// system unused.
    fn nats_go_runtime(&self) -> Option<serde_json::Value> {
        let heap = http10_get(self.nats_profile?, "/debug/pprof/heap?debug=1")?;
        let goroutines = http10_get(self.nats_profile?, "/debug/pprof/goroutine?debug=1")?;
        let stat = |name: &str| -> Option<u64> {
            heap.lines()
                .find_map(|l| {
                    l.strip_prefix("# ")?
                        .strip_prefix(name)?
                        .strip_prefix(" = ")
                })
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        };
        let mib =
            |b: Option<u64>| b.map(|b| (b as f64 / (1 << 20) as f64 * 1000.0).round() / 1000.0);
        let total: Option<u64> = goroutines
            .lines()
            .next()
            .and_then(|l| l.rsplit(' ').next()?.parse().ok());
        Some(json!({
            "top_inuse_sites": top_inuse_sites(&heap, 6),
            "heap_alloc_mib": mib(stat("HeapAlloc")),
            "heap_inuse_mib": mib(stat("HeapInuse")),
            "heap_idle_mib": mib(stat("HeapIdle")),
            "heap_released_mib": mib(stat("HeapReleased")),
            "stack_mib": mib(stat("Stack")),
            "sys_mib": mib(stat("Sys")),
            "next_gc_mib": mib(stat("NextGC")),
            "num_gc": stat("NumGC"),
            "goroutines": total,
        }))
    }

    /// Processes that have exited (they should all still run), with the end
    /// of their output.
    pub fn exited(&mut self) -> Vec<String> {
        self.procs
            .iter_mut()
            .filter_map(|p| p.process.died())
            .collect()
    }

    /// The WARN and ERROR lines the processes logged, a few per process,
    /// with counts.
    pub fn log_problems(&self) -> Vec<String> {
        let mut notes = Vec::new();
        for p in &self.procs {
            let out = p.process.output();
            let bad: Vec<&str> = out
                .lines()
                .filter(|l| {
                    l.contains(" WARN ")
                        || l.contains(" ERROR ")
                        || l.contains("\"level\":\"WARN\"")
                        || l.contains("\"level\":\"ERROR\"")
                        || (p.role == Role::Nats && (l.contains("[ERR]") || l.contains("[WRN]")))
                })
                .collect();
            if bad.is_empty() {
                continue;
            }
            let mut note = format!(
                "{} logged {} warning/error line(s)",
                p.process.name(),
                bad.len()
            );
            for line in bad.iter().take(3) {
                let line: String = line.chars().take(300).collect();
                let _ = write!(note, "\n    {line}");
            }
            notes.push(note);
        }
        notes
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
        if self.keep_logs
            && let Some(dir) = self.dir.take()
        {
            eprintln!("logs kept in {}", dir.keep().display());
        }
    }
}

/// The allocation sites of a Go heap profile (`/debug/pprof/heap?debug=1`)
/// that hold the most live bytes, by the first nats-server function on
/// their stack (`server.(*client).processSub`), at most `n` of them, as
/// `{site: KiB}`. The profile is sampled (one sample per ~512 KiB
/// allocated), and its bytes are the samples' own, not scaled up: a ranking
/// of where live memory was allocated, not a measure of it.
fn top_inuse_sites(profile: &str, n: usize) -> serde_json::Value {
    let mut by_site: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut bytes = 0u64;
    let mut site: Option<String> = None;
    let mut flush = |bytes: u64, site: &mut Option<String>| {
        if let Some(name) = site.take() {
            *by_site.entry(name).or_default() += bytes;
        }
    };
    for line in profile.lines() {
        if let Some((_, rest)) = line
            .split_once(": ")
            .filter(|(n, _)| n.parse::<u64>().is_ok())
        {
            // "objects: bytes [objects: bytes] @ addresses"
            flush(bytes, &mut site);
            bytes = rest
                .split_whitespace()
                .next()
                .and_then(|b| b.parse().ok())
                .unwrap_or(0);
            site = Some("(runtime)".into());
        } else if let Some(frame) = line.strip_prefix("#\t") {
            let func = frame.split('\t').nth(1).unwrap_or("");
            let func = func.split('+').next().unwrap_or(func);
            if site.as_deref() == Some("(runtime)") && func.contains("nats-server") {
                let short = func.rsplit('/').next().unwrap_or(func);
                site = Some(short.to_owned());
            }
        } else if line.starts_with("# runtime.MemStats") {
            break;
        }
    }
    flush(bytes, &mut site);
    let mut sites: Vec<(String, u64)> = by_site.into_iter().filter(|(_, b)| *b > 0).collect();
    sites.sort_by_key(|s| std::cmp::Reverse(s.1));
    let map: serde_json::Map<String, serde_json::Value> = sites
        .into_iter()
        .take(n)
        .map(|(name, b)| (name, json!(b / 1024)))
        .collect();
    serde_json::Value::Object(map)
}

/// The body of a 200 answer to a plain HTTP/1.0 GET: nats-server answers
/// HTTP/1.1 requests for larger pages (`/connz`) in chunks.
fn http10_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_owned())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `$HERALD_BIN`, else `herald` next to this executable (cargo puts both
/// binaries of one profile in the same folder), else the workspace's
/// target/release or target/debug.
fn find_herald() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("HERALD_BIN") {
        return Ok(p.into());
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()?.parent() {
        candidates.push(dir.join("herald"));
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    candidates.push(target.join("release/herald"));
    candidates.push(target.join("debug/herald"));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no herald binary in {candidates:?}: run `cargo build --release --bin herald`, \
                 or give --herald PATH or $HERALD_BIN"
            )
        })
}

/// Counters of nats-server (`/varz`, `/subsz`), or their growth over a phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct NatsStats {
    pub in_msgs: u64,
    pub out_msgs: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
    /// Subscriptions made (SUB).
    pub sub_inserts: u64,
    /// Subscriptions removed (UNSUB, or with a closed connection).
    pub sub_removes: u64,
    /// JetStream API requests served (`/jsz`), and those that failed.
    pub js_api_calls: u64,
    pub js_api_errors: u64,
    /// Subscriptions alive (a level, not a counter: at the end of a phase).
    pub subscriptions: u64,
    /// Subscriptions alive at the start of a phase ([`NatsStats::since`]).
    pub subscriptions_at_start: u64,
}

impl NatsStats {
    pub fn since(&self, start: &NatsStats) -> NatsStats {
        NatsStats {
            in_msgs: self.in_msgs.saturating_sub(start.in_msgs),
            out_msgs: self.out_msgs.saturating_sub(start.out_msgs),
            in_bytes: self.in_bytes.saturating_sub(start.in_bytes),
            out_bytes: self.out_bytes.saturating_sub(start.out_bytes),
            sub_inserts: self.sub_inserts.saturating_sub(start.sub_inserts),
            sub_removes: self.sub_removes.saturating_sub(start.sub_removes),
            js_api_calls: self.js_api_calls.saturating_sub(start.js_api_calls),
            js_api_errors: self.js_api_errors.saturating_sub(start.js_api_errors),
            subscriptions: self.subscriptions,
            subscriptions_at_start: start.subscriptions,
        }
    }
}

/// A process whose CPU time is measured.
#[derive(Debug, Clone)]
pub struct CpuProbe {
    pub name: String,
    /// `None` for the bench itself.
    pub role: Option<Role>,
    pub pid: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_start_at_127_0_0_2() {
        let args = CommonArgs {
            target: TargetKind::Dev,
            edges: 1,
            redis_url: None,
            redis_server: None,
            herald: None,
            nats_server: None,
            nats_gomaxprocs: None,
            source_addrs: 3,
            json: None,
            keep_logs: false,
            vs_socketio: false,
            edge_args: Vec::new(),
            herald_args: Vec::new(),
            otlp_sink: false,
        };
        let ips: Vec<String> = args.source_ips().iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
    }
}
