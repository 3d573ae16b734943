//! `reconnect-storm`: one server of many clients dies, and they all come
//! back elsewhere at once.
//!
//! 1. Setup: `--clients` clients connect to server `--victim` (a cluster's
//!    edge, or a Socket.IO server) from source addresses in turn; client `i`
//!    is user `storm-<i>` with a token, and joins chat room
//!    `chat:storm-<i % chat_rooms>` (ephemeral) and durable room
//!    `doc:storm-<i % durable_rooms>`.
//! 2. A publisher sends `--publish-rate` messages a second to the durable
//!    rooms in turn, from `--before` the kill until `--after` the last
//!    rejoin: Herald through `Router.Publish` (each stored, with its offset),
//!    Socket.IO through the Redis emitter (`publisher.js`, a `seq` per room).
//! 3. The victim is killed with SIGKILL. Each client notices its socket
//!    drop, waits as a real client does (full jitter: attempt `k` waits a
//!    random time below `min(cap, base · 2^k)`, the first attempt too),
//!    connects to one of the other servers (attempt `k` of client `i` takes
//!    survivor `(i + k) % survivors`) and joins its two rooms again, both
//!    joins sent at once as the SDKs rejoin (the setup's first joins too); in
//!    Herald the durable room with `since` = the last offset it received, so
//!    that what it missed is replayed. The draws of the jitter depend only on
//!    `i` and `k`: both systems wait the same.
//! 4. Once the publisher stopped, each client waits (at most
//!    `--drain-timeout`) for its room's last message, and its durable room's
//!    log is checked against what was published to that room: every message
//!    exactly once and in order (Herald: offsets; Socket.IO: seqs).
//!
//! Reported: per client the time from the kill until it noticed and until
//! it had rejoined both rooms (p50/p99/max), the time until every client
//! had, clients lost (not rejoined within `--reconnect-timeout`), attempts,
//! errors, the server CPU from the kill to the last rejoin per reconnect
//! (every server process left: Herald's edges, presence, router and
//! nats-server; the Node servers and Redis), and the durable rooms' missing,
//! duplicated and out-of-order messages. Socket.IO with the Redis adapter
//! has no recovery: its gaps are counted, not failed.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use futures::StreamExt as _;
use herald_client::Client;
use herald_proto::v1::PublishRequest;
use herald_proto::v1::router_client::RouterClient;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, watch};

use crate::load::{Dialer, Failed, Why, request_ok, sio_ack};
use crate::peer::Peer;
use crate::report::{CpuMeter, CpuPhase, Errors, Labels, Latency, Report, Section, round3};
use crate::socketio::{self, SioClient, SioEvent};
use crate::target::{CommonArgs, CpuProbe, Target, TargetKind};

#[derive(Args, Debug, Clone)]
pub struct StormArgs {
    /// Clients, all on the victim until it is killed.
    #[arg(long, default_value_t = 15_000)]
    pub clients: usize,
    /// The edge (or Socket.IO server) that is killed.
    #[arg(long, default_value_t = 0)]
    pub victim: usize,
    /// Chat rooms (`chat:storm-<k>`, ephemeral); client `i` joins room `i % chat-rooms`.
    #[arg(long, default_value_t = 100)]
    pub chat_rooms: usize,
    /// Durable rooms (`doc:storm-<d>`); client `i` joins room `i % durable-rooms`.
    #[arg(long, default_value_t = 50)]
    pub durable_rooms: usize,
    /// Messages a second published to the durable rooms, in turn.
    #[arg(long, default_value_t = 50.0)]
    pub publish_rate: f64,
    /// How long the publisher runs before the kill.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub before: Duration,
    /// How long the publisher goes on after the last client rejoined.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub after: Duration,
    /// Reconnect backoff: attempt k waits a random time below min(cap, base · 2^k).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub backoff_base: Duration,
    /// The longest reconnect backoff.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub backoff_cap: Duration,
    /// A client that has not rejoined this long after the kill is lost.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub reconnect_timeout: Duration,
    /// How long the clients may take to receive their room's last message
    /// once the publisher stopped.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Connections opened at the same time during the setup.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Herald: send presence join/leave events to the chat rooms' members
    /// (off by default: Socket.IO sends none).
    #[arg(long)]
    pub presence_events: bool,
    /// With `--vs-socketio`: this many rounds, each on freshly started
    /// servers, Herald first in odd rounds and Socket.IO first in even ones
    /// (a drift in the machine's speed then weighs on both); the summary
    /// gives every round's ratio of the time until all rejoined and their
    /// median.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
}

impl StormArgs {
    /// The namespaces of the storm's rooms, for every Herald process.
    pub fn herald_config(&self) -> String {
        format!(
            "# herald-bench reconnect-storm\n\
             [namespaces.chat]\n\
             presence = true\n\
             presence_events = {}\n\
             publish = true\n\
             join = [\"chat:*\"]\n\
             \n\
             [namespaces.doc]\n\
             presence = false\n\
             publish = true\n\
             join = [\"doc:*\"]\n\
             durable = {{ history_size = 100000, history_ttl = \"1h\" }}\n",
            self.presence_events
        )
    }

    fn check(&self, servers: usize) -> Result<()> {
        if servers < 2 {
            bail!(
                "a reconnect storm needs at least 2 servers (--edges): one to kill, one to move to"
            );
        }
        if self.victim >= servers {
            bail!(
                "--victim {} is not one of the {servers} servers",
                self.victim
            );
        }
        if self.clients == 0 || self.chat_rooms == 0 || self.durable_rooms == 0 {
            bail!("--clients, --chat-rooms and --durable-rooms must be at least 1");
        }
        if self.publish_rate.is_nan() || self.publish_rate <= 0.0 {
            bail!("--publish-rate must be above 0");
        }
        // The victim (a process on the bench's limits) holds every client.
        let limit = crate::idle::raise_fd_limit();
        if self.clients as u64 + 200 > limit {
            bail!(
                "--clients {} needs as many open files in this process and in the victim, \
                 and the limit is {limit} (ulimit -n)",
                self.clients
            );
        }
        Ok(())
    }

    fn params(&self, common: &CommonArgs, servers: usize) -> Value {
        json!({
            "edges": servers,
            "clients": self.clients,
            "victim": self.victim,
            "chat_rooms": self.chat_rooms,
            "durable_rooms": self.durable_rooms,
            "publish_rate": self.publish_rate,
            "before_s": self.before.as_secs_f64(),
            "after_s": self.after.as_secs_f64(),
            "backoff_base_ms": self.backoff_base.as_secs_f64() * 1e3,
            "backoff_cap_ms": self.backoff_cap.as_secs_f64() * 1e3,
            "reconnect_timeout_s": self.reconnect_timeout.as_secs_f64(),
            "drain_timeout_s": self.drain_timeout.as_secs_f64(),
            "presence_events": self.presence_events,
            "source_addrs": common.source_addrs,
        })
    }
}

fn chat_room(args: &StormArgs, i: usize) -> String {
    format!("chat:storm-{}", i % args.chat_rooms)
}

fn durable_room(d: usize) -> String {
    format!("doc:storm-{d}")
}

/// `reconnect-storm --target cluster`.
pub async fn run(args: &StormArgs, common: &CommonArgs, target: &mut Target) -> Result<Report> {
    if target.kind != TargetKind::Cluster {
        bail!("reconnect-storm kills an edge of a cluster: use --target cluster (or socketio)");
    }
    let servers = target.edge_urls.len();
    args.check(servers)?;
    let grpc = target
        .router_grpc
        .context("the target serves no Router API")?;
    let mut report = Report::new(
        "reconnect-storm",
        target.kind.as_str(),
        target.describe(),
        args.params(common, servers),
    );
    let system = Arc::new(HeraldStorm {
        dialer: Dialer::new(target.edge_urls.clone(), common.source_ips()),
        tokens: (0..args.clients)
            .map(|i| target.token(&format!("storm-{i}")))
            .collect(),
        args: args.clone(),
    });
    let storm = Storm::setup(args, system, servers, &mut report).await?;
    let router = RouterClient::connect(format!("http://{grpc}"))
        .await
        .with_context(|| format!("gRPC connect to the router at {grpc}"))?;
    let publisher = HeraldPublisher::start(router, args.durable_rooms, args.publish_rate);
    tokio::time::sleep(args.before).await;

    let victim = target
        .edge_pid(args.victim)
        .context("the victim edge is not running")?;
    let meter = CpuMeter::with_probes(
        without(target.cpu_probes(), victim),
        target.nats_stats(),
        Labels::HERALD,
    );
    let kill = storm.kill();
    target.kill_edge(args.victim)?;
    let storm = kill.rejoined().await;
    let cpu = meter.stop(target);

    tokio::time::sleep(args.after).await;
    let published = publisher.stop().await;
    storm.finish(args, published, cpu, &mut report).await;
    Ok(report)
}

/// `reconnect-storm --target socketio`.
pub async fn run_socketio(
    args: &StormArgs,
    common: &CommonArgs,
    peer: &mut Peer,
) -> Result<Report> {
    let urls = peer.sio.urls();
    let servers = urls.len();
    args.check(servers)?;
    let mut report = Report::new(
        "reconnect-storm",
        "socketio",
        peer.describe(),
        args.params(common, servers),
    );
    report
        .params
        .insert("redis_url".into(), json!(peer.sio.redis_url()));
    report
        .params
        .insert("own_redis".into(), json!(peer.owns_redis()));
    report.params.insert(
        "publisher".into(),
        json!("publisher.js (@socket.io/redis-emitter), the rooms in turn"),
    );
    if peer.redis_pid().is_none() {
        report
            .notes
            .push("Redis's pid is unknown: its CPU is not counted".into());
    }
    report.notes.push(
        "Socket.IO with the Redis adapter keeps no history: a client misses what was \
         published while it was away, and the durable figures count those gaps"
            .into(),
    );
    let system = Arc::new(SioStorm {
        dialer: Dialer::new(urls, common.source_ips()),
        tokens: (0..args.clients)
            .map(|i| peer.sio.token(&format!("storm-{i}")))
            .collect(),
        args: args.clone(),
    });
    let storm = Storm::setup(args, system, servers, &mut report).await?;
    let rooms: Vec<String> = (0..args.durable_rooms).map(durable_room).collect();
    let publisher = peer.sio.start_publisher(&rooms, args.publish_rate).await?;
    tokio::time::sleep(args.before).await;

    let victim = peer.sio.pids()[args.victim].1;
    let meter = CpuMeter::with_probes(without(peer.cpu_probes(), victim), None, Labels::SOCKETIO);
    let kill = storm.kill();
    peer.sio.kill_server(args.victim)?;
    let storm = kill.rejoined().await;
    let cpu = meter.stop_with(None);

    tokio::time::sleep(args.after).await;
    let published = match publisher.stop().await {
        Ok(sent) => {
            report
                .notes
                .push(format!("publisher.js used {:.3} s of CPU", sent.cpu_s));
            Published {
                expected: rooms
                    .iter()
                    .map(|r| (0..sent.sent.get(r).copied().unwrap_or(0)).collect())
                    .collect(),
                errors: Errors::default(),
            }
        }
        Err(e) => {
            let mut errors = Errors::default();
            errors.add_kind("publisher.js", &format!("{e:#}"));
            Published {
                expected: vec![Vec::new(); rooms.len()],
                errors,
            }
        }
    };
    storm.finish(args, published, cpu, &mut report).await;
    Ok(report)
}

/// `probes` without the process `pid`: a killed process's pid may be
/// taken by another before the phase ends.
fn without(probes: Vec<CpuProbe>, pid: u32) -> Vec<CpuProbe> {
    probes.into_iter().filter(|p| p.pid != pid).collect()
}

/// What a client received in its durable room, in arrival order, across
/// its connections; written by the connection's reader, read by the
/// client's task.
#[derive(Default)]
struct Log {
    /// Herald: the messages' offsets; Socket.IO: the publisher's seqs.
    got: Mutex<Vec<u64>>,
    /// Herald: the room's epoch and offset at the first join, the `since`
    /// of a rejoin before any message arrived.
    joined_at: Mutex<Option<(String, u64)>>,
    changed: Notify,
}

impl Log {
    fn push(&self, n: u64) {
        self.got
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(n);
        // One waiter (the client's task); a permit is kept if it is not
        // waiting yet.
        self.changed.notify_one();
    }

    fn has(&self, n: u64) -> bool {
        // The awaited message is the room's last: search from the end.
        let got = self.got.lock().unwrap_or_else(PoisonError::into_inner);
        got.iter().rev().any(|&x| x == n)
    }

    fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.got.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// What a join of the durable room said about recovery (Herald only).
#[derive(Default)]
struct Rejoin {
    recovered: Option<bool>,
    missed: u64,
}

/// One system's way of connecting a storm client and joining its rooms.
trait System: Send + Sync + 'static {
    type Conn: Send + Sync + 'static;

    /// Connects client `i` to server `server` and joins its chat room and
    /// its durable room (from where `log` ends, where the system can), the
    /// durable room's messages going to `log`.
    fn join(
        &self,
        i: usize,
        server: usize,
        log: &Arc<Log>,
    ) -> impl Future<Output = Result<(Self::Conn, Rejoin), Failed>> + Send;

    /// Returns once the connection has ended.
    fn closed(conn: &Self::Conn) -> impl Future<Output = ()> + Send;
}

struct HeraldStorm {
    dialer: Dialer,
    tokens: Vec<String>,
    args: StormArgs,
}

/// The `{"op":"message"...}` frames of the durable room go to `log`
/// unparsed by the client (presence events are dropped): the storm's
/// receivers cost the same per frame as Socket.IO's, which parse each event once.
fn herald_tap(log: Arc<Log>, room: String) -> herald_client::Tap {
    Arc::new(move |frame: &[u8]| {
        if frame.starts_with(br#"{"op":"presence""#) {
            return true;
        }
        if !frame.starts_with(br#"{"op":"message""#) {
            return false;
        }
        match serde_json::from_slice::<Value>(frame) {
            Ok(m) if m["room"] == room.as_str() => match m["offset"].as_u64() {
                Some(offset) => {
                    log.push(offset);
                    true
                }
                None => false,
            },
            _ => false,
        }
    })
}

impl System for HeraldStorm {
    type Conn = Client;

    async fn join(
        &self,
        i: usize,
        server: usize,
        log: &Arc<Log>,
    ) -> Result<(Client, Rejoin), Failed> {
        let room = durable_room(i % self.args.durable_rooms);
        let tap = herald_tap(log.clone(), room.clone());
        let (client, _connected) = self
            .dialer
            .connect_tapped(server, &self.tokens[i], tap)
            .await
            .map_err(Failed::client("connect"))?;
        let chat = chat_room(&self.args, i);
        // From the last message received, else from where the first join
        // found the room.
        let joined_at = log
            .joined_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let since = joined_at.as_ref().map(|(epoch, at)| {
            let last = log
                .got
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .last()
                .copied();
            json!({"epoch": epoch, "offset": last.unwrap_or(*at)})
        });
        let mut req = json!({"op": "join", "room": room});
        if let Some(since) = since {
            req["since"] = since;
        }
        // Both joins at once, as the SDKs rejoin after `connected`: the
        // edge answers requests in order.
        let (chat, durable) = tokio::join!(
            request_ok(&client, "join chat", json!({"op": "join", "room": chat})),
            client.request(req)
        );
        chat?;
        let reply = durable.map_err(Failed::client("join durable"))?;
        if reply["op"] != "ok" {
            return Err(Failed {
                stage: "join durable",
                why: Why::Reply(reply),
            });
        }
        if joined_at.is_none() {
            let epoch = reply["epoch"].as_str().unwrap_or_default().to_owned();
            let offset = reply["offset"].as_u64().unwrap_or(0);
            *log.joined_at.lock().unwrap_or_else(PoisonError::into_inner) = Some((epoch, offset));
            return Ok((client, Rejoin::default()));
        }
        Ok((
            client,
            Rejoin {
                recovered: reply["recovered"].as_bool(),
                missed: reply["missed"].as_u64().unwrap_or(0),
            },
        ))
    }

    async fn closed(conn: &Client) {
        // Far longer than any run.
        let _ = conn.closed(Duration::from_secs(86_400 * 365)).await;
    }
}

struct SioStorm {
    dialer: Dialer,
    tokens: Vec<String>,
    args: StormArgs,
}

impl System for SioStorm {
    type Conn = SioClient;

    async fn join(
        &self,
        i: usize,
        server: usize,
        log: &Arc<Log>,
    ) -> Result<(SioClient, Rejoin), Failed> {
        let room = durable_room(i % self.args.durable_rooms);
        let on_event: socketio::OnEvent = {
            let (log, room) = (log.clone(), room.clone());
            Arc::new(move |event: SioEvent| {
                let data = event.data();
                if event.name == "msg"
                    && data["room"] == room.as_str()
                    && let Some(seq) = data["seq"].as_u64()
                {
                    log.push(seq);
                }
            })
        };
        let (url, source) = self.dialer.endpoint(server);
        let auth = json!({ "token": self.tokens[i] });
        let client = SioClient::connect(url, &auth, Some(source), on_event)
            .await
            .map_err(Failed::client("connect"))?;
        // Both joins at once, as an application rejoins on `connect`.
        let chat = chat_room(&self.args, i);
        tokio::try_join!(
            sio_ack(&client, "join", &chat),
            sio_ack(&client, "join", &room)
        )?;
        Ok((client, Rejoin::default()))
    }

    async fn closed(conn: &SioClient) {
        conn.closed().await;
    }
}

/// What was published to each durable room, in order: Herald's offsets,
/// Socket.IO's seqs.
struct Published {
    expected: Vec<Vec<u64>>,
    errors: Errors,
}

/// `Router.Publish` to the durable rooms in turn at a fixed rate, one call
/// at a time, each message due at start + n / rate.
struct HeraldPublisher {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Published>,
}

impl HeraldPublisher {
    fn start(
        mut router: RouterClient<tonic::transport::Channel>,
        rooms: usize,
        rate: f64,
    ) -> HeraldPublisher {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            let mut out = Published {
                expected: vec![Vec::new(); rooms],
                errors: Errors::default(),
            };
            let start = tokio::time::Instant::now();
            let mut n = 0u64;
            while !stopping.load(Ordering::Relaxed) {
                tokio::time::sleep_until(start + Duration::from_secs_f64(n as f64 / rate)).await;
                let r = (n % rooms as u64) as usize;
                let req = PublishRequest {
                    room: durable_room(r),
                    data: json!({"n": n, "t": crate::delivery::now_ns()}).to_string(),
                    key: String::new(),
                };
                match router.publish(req).await {
                    Ok(reply) => out.expected[r].push(reply.into_inner().offset),
                    Err(status) => out
                        .errors
                        .add_kind(&format!("publish: {:?}", status.code()), status.message()),
                }
                n += 1;
            }
            out
        });
        HeraldPublisher { stop, task }
    }

    async fn stop(self) -> Published {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the publisher panicked")
    }
}

/// What was published to each durable room, and until when the clients
/// may wait for the last of it.
type Finals = (Arc<Vec<Vec<u64>>>, Instant);

/// Shared by the client tasks and the storm's driver.
struct Ctx {
    args: StormArgs,
    survivors: Vec<usize>,
    /// When the victim was killed: set just before the signal.
    killed_at: watch::Sender<Option<Instant>>,
    /// What was published, and until when the clients may wait for it.
    finals: watch::Sender<Option<Finals>>,
    /// One event per client: its rejoin (time since the kill), or `None`
    /// when it gave up.
    rejoins: mpsc::UnboundedSender<Option<Duration>>,
}

impl Ctx {
    /// Attempt `attempt`'s wait for client `i`: "full jitter", a draw in
    /// [0, min(cap, base · 2^attempt)) that depends only on `i` and
    /// `attempt`, so that both systems' clients wait alike.
    fn backoff(&self, i: usize, attempt: u32) -> Duration {
        let ceiling = self
            .args
            .backoff_cap
            .min(self.args.backoff_base.saturating_mul(1 << attempt.min(20)));
        let draw = splitmix64(((i as u64) << 32) | u64::from(attempt));
        ceiling.mul_f64((draw >> 11) as f64 / (1u64 << 53) as f64)
    }
}

/// A well-mixed 64-bit value of `x` (splitmix64's finaliser).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How one client went through the storm.
#[derive(Default)]
struct Outcome {
    noticed: Option<Duration>,
    rejoined: Option<Duration>,
    attempts: u32,
    errors: Errors,
    /// Its connection ended before the kill.
    closed_early: bool,
    rejoin: Rejoin,
    /// Its durable room's log against what was published there.
    check: Check,
    /// Its room's last message arrived before the drain timeout.
    drained: bool,
}

/// One client's durable log against what was published to its room.
#[derive(Default, Clone, Copy)]
struct Check {
    expected: u64,
    received: u64,
    missing: u64,
    duplicates: u64,
    out_of_order: u64,
    unexpected: u64,
}

impl Check {
    fn of(got: &[u64], expected: &[u64]) -> Check {
        let want: HashSet<u64> = expected.iter().copied().collect();
        let mut seen = HashSet::with_capacity(got.len());
        let mut c = Check {
            expected: expected.len() as u64,
            received: got.len() as u64,
            ..Check::default()
        };
        for (k, &n) in got.iter().enumerate() {
            if !seen.insert(n) {
                c.duplicates += 1;
            } else if !want.contains(&n) {
                c.unexpected += 1;
            }
            if k > 0 && n < got[k - 1] {
                c.out_of_order += 1;
            }
        }
        c.missing = want.iter().filter(|n| !seen.contains(n)).count() as u64;
        c
    }

    fn exact(&self) -> bool {
        self.missing == 0 && self.duplicates == 0 && self.out_of_order == 0 && self.unexpected == 0
    }

    fn add(&mut self, o: &Check) {
        self.expected += o.expected;
        self.received += o.received;
        self.missing += o.missing;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.unexpected += o.unexpected;
    }
}

/// One client, from its first connection to the check of its log.
async fn client_task<S: System>(
    system: Arc<S>,
    ctx: Arc<Ctx>,
    i: usize,
    conn: S::Conn,
    log: Arc<Log>,
) -> Outcome {
    let mut out = Outcome::default();
    let mut killed = ctx.killed_at.subscribe();
    // A socket the kill did not end (it should) must not hang the run: the
    // client is lost once the reconnect timeout has passed.
    let unnoticed = async {
        let at = *ctx.killed_at.subscribe().wait_for(Option::is_some).await?;
        let at = at.expect("waited for it");
        tokio::time::sleep_until((at + ctx.args.reconnect_timeout).into()).await;
        Ok::<_, watch::error::RecvError>(())
    };
    tokio::select! {
        () = S::closed(&conn) => {}
        _ = unnoticed => {
            let _ = ctx.rejoins.send(None);
            return out;
        }
    }
    drop(conn);
    out.closed_early = killed.borrow().is_none();
    let killed_at = match killed.wait_for(Option::is_some).await {
        Ok(at) => at.expect("waited for it"),
        Err(_) => return out,
    };
    out.noticed = Some(killed_at.elapsed());
    let deadline = killed_at + ctx.args.reconnect_timeout;
    let mut conn = None;
    loop {
        let wait = ctx.backoff(i, out.attempts);
        if Instant::now() + wait >= deadline {
            break;
        }
        tokio::time::sleep(wait).await;
        let server = ctx.survivors[(i + out.attempts as usize) % ctx.survivors.len()];
        out.attempts += 1;
        let attempt = system.join(i, server, &log);
        match tokio::time::timeout_at(deadline.into(), attempt).await {
            Ok(Ok((c, rejoin))) => {
                out.rejoined = Some(killed_at.elapsed());
                out.rejoin = rejoin;
                conn = Some(c);
                break;
            }
            Ok(Err(failed)) => failed.count(&mut out.errors),
            Err(_) => break,
        }
    }
    let _ = ctx.rejoins.send(out.rejoined);
    let Some(conn) = conn else {
        return out;
    };

    let mut finals = ctx.finals.subscribe();
    let Ok((expected, drain_until)) = finals
        .wait_for(Option::is_some)
        .await
        .map(|f| f.clone().expect("waited for it"))
    else {
        return out;
    };
    let expected = &expected[i % ctx.args.durable_rooms];
    out.drained = match expected.last() {
        None => true,
        Some(&last) => {
            let arrived = async {
                while !log.has(last) {
                    log.changed.notified().await;
                }
            };
            tokio::time::timeout_at(drain_until.into(), arrived)
                .await
                .is_ok()
        }
    };
    drop(conn);
    out.check = Check::of(&log.take(), expected);
    out
}

/// A client's first connection, and its log.
type Joined<S> = (<S as System>::Conn, Arc<Log>);

/// The clients, connected to the victim, each waiting for its connection
/// to end.
struct Storm {
    ctx: Arc<Ctx>,
    tasks: Vec<tokio::task::JoinHandle<Outcome>>,
    rejoins: mpsc::UnboundedReceiver<Option<Duration>>,
    /// Set by [`Killed::rejoined`].
    rejoined: Vec<Duration>,
    lost: u64,
    all_rejoined: Option<Duration>,
}

/// The storm once the victim is being killed.
struct Killed(Storm);

impl Storm {
    /// Connects every client to the victim and joins its rooms; those that
    /// fail are counted in a `setup` section and left out.
    async fn setup<S: System>(
        args: &StormArgs,
        system: Arc<S>,
        servers: usize,
        report: &mut Report,
    ) -> Result<Storm> {
        let started = Instant::now();
        let opened: Vec<(usize, Result<Joined<S>, Failed>)> =
            futures::stream::iter(0..args.clients)
                .map(|i| {
                    let system = system.clone();
                    async move {
                        let log = Arc::new(Log::default());
                        let joined = system.join(i, args.victim, &log).await;
                        (i, joined.map(|(conn, _)| (conn, log)))
                    }
                })
                .buffer_unordered(args.concurrency.max(1))
                .collect()
                .await;
        let connect_s = started.elapsed().as_secs_f64();
        let (rejoins_tx, rejoins) = mpsc::unbounded_channel();
        let ctx = Arc::new(Ctx {
            args: args.clone(),
            survivors: (0..servers).filter(|&s| s != args.victim).collect(),
            killed_at: watch::Sender::new(None),
            finals: watch::Sender::new(None),
            rejoins: rejoins_tx,
        });
        let mut errors = Errors::default();
        let mut tasks = Vec::with_capacity(opened.len());
        for (i, joined) in opened {
            match joined {
                Ok((conn, log)) => tasks.push(tokio::spawn(client_task(
                    system.clone(),
                    ctx.clone(),
                    i,
                    conn,
                    log,
                ))),
                Err(failed) => failed.count(&mut errors),
            }
        }
        if tasks.is_empty() {
            bail!(
                "no client could connect to server {}: {}",
                args.victim,
                errors.to_json()
            );
        }
        if errors.total() > 0 {
            report.failures.push(format!(
                "{} of {} clients could not connect to the victim and join their rooms",
                errors.total(),
                args.clients
            ));
        }
        report.section(
            "setup",
            Section::new()
                .put("clients", args.clients)
                .put("connected", tasks.len())
                .put("connect_s", round3(connect_s))
                .put("connects_per_sec", round3(tasks.len() as f64 / connect_s))
                .put("errors", errors.total())
                .put("error_kinds", errors.to_json()),
        );
        Ok(Storm {
            ctx,
            tasks,
            rejoins,
            rejoined: Vec::new(),
            lost: 0,
            all_rejoined: None,
        })
    }

    /// Marks the moment of the kill; the caller kills the victim next.
    fn kill(self) -> Killed {
        self.ctx.killed_at.send_replace(Some(Instant::now()));
        Killed(self)
    }

    /// Tells the clients what was published, waits for their checks, and
    /// reports.
    async fn finish(
        self,
        args: &StormArgs,
        published: Published,
        cpu: CpuPhase,
        report: &mut Report,
    ) {
        let published_n: usize = published.expected.iter().map(Vec::len).sum();
        self.ctx.finals.send_replace(Some((
            Arc::new(published.expected),
            Instant::now() + args.drain_timeout,
        )));
        let mut outcomes = Vec::with_capacity(self.tasks.len());
        for task in self.tasks {
            outcomes.push(task.await.expect("a storm client panicked"));
        }
        let clients = outcomes.len() as u64;
        let reconnects = self.rejoined.len() as u64;

        let (mut noticed, mut rejoin) = (Latency::default(), Latency::default());
        let mut errors = Errors::default();
        let (mut attempts, mut max_attempts, mut early, mut undrained) = (0u64, 0u32, 0u64, 0u64);
        let (mut not_recovered, mut replayed) = (0u64, 0u64);
        let (mut total, mut gaps, mut exact) = (Check::default(), 0u64, 0u64);
        for o in &outcomes {
            if let Some(d) = o.noticed {
                noticed.record(d);
            }
            if let Some(d) = o.rejoined {
                rejoin.record(d);
            }
            errors.merge(&o.errors);
            attempts += u64::from(o.attempts);
            max_attempts = max_attempts.max(o.attempts);
            early += u64::from(o.closed_early);
            if o.rejoined.is_none() {
                continue;
            }
            undrained += u64::from(!o.drained);
            not_recovered += u64::from(o.rejoin.recovered == Some(false));
            replayed += o.rejoin.missed;
            total.add(&o.check);
            if o.check.exact() {
                exact += 1;
            } else {
                gaps += 1;
            }
        }
        let per = |secs: f64| round3(secs * 1e6 / reconnects.max(1) as f64);
        let ms = |d: Option<Duration>| json!(d.map(|d| round3(d.as_secs_f64() * 1e3)));
        let nats_s = cpu.nats_s();
        report.section(
            "storm",
            Section::new()
                .put("clients", clients)
                .put("rejoined", reconnects)
                .put("lost", self.lost)
                .put("all_rejoined_ms", ms(self.all_rejoined))
                .put(
                    "reconnects_per_sec",
                    json!(
                        self.all_rejoined
                            .map(|d| round3(reconnects as f64 / d.as_secs_f64()))
                    ),
                )
                .put("noticed_ms", noticed.summary())
                .put("rejoin_ms", rejoin.summary())
                .put(
                    "attempts_mean",
                    round3(attempts as f64 / clients.max(1) as f64),
                )
                .put("attempts_max", max_attempts)
                .put("closed_before_kill", early)
                .put("errors", errors.total())
                .put("error_kinds", errors.to_json())
                .put(
                    "server_cpu_us_per_reconnect",
                    per(cpu.herald_s() + nats_s.unwrap_or(0.0)),
                )
                .put("herald_cpu_us_per_reconnect", per(cpu.herald_s()))
                .put("nats_cpu_us_per_reconnect", json!(nats_s.map(per)))
                .put(
                    "processes_cpu_us_per_reconnect",
                    cpu.per_process_us(reconnects),
                )
                .put(
                    "nats_msgs_in_per_reconnect",
                    json!(
                        cpu.nats
                            .map(|n| round3(n.in_msgs as f64 / reconnects.max(1) as f64))
                    ),
                ),
        );
        report.cpu.push(("kill to last rejoin".into(), cpu));

        let herald = report.target != "socketio";
        let mut durable = Section::new()
            .put("published", published_n)
            .put("publish_errors", published.errors.total())
            .put("publish_error_kinds", published.errors.to_json())
            .put("messages_expected", total.expected)
            .put("messages_received", total.received)
            .put("missing", total.missing)
            .put("duplicates", total.duplicates)
            .put("out_of_order", total.out_of_order)
            .put("unexpected", total.unexpected)
            .put("clients_exact", exact)
            .put("clients_with_gaps", gaps)
            .put("clients_without_last_message", undrained);
        if herald {
            durable = durable
                .put("rejoins_not_recovered", not_recovered)
                .put("messages_replayed", replayed);
        }
        report.section("durable", durable);

        if self.lost > 0 {
            report.failures.push(format!(
                "{} of {clients} clients did not rejoin within {}",
                self.lost,
                humantime::format_duration(args.reconnect_timeout)
            ));
        }
        if published_n == 0 {
            report
                .failures
                .push("nothing was published to the durable rooms".into());
        }
        if herald {
            if published.errors.total() > 0 {
                report.failures.push(format!(
                    "{} publishes failed: {}",
                    published.errors.total(),
                    published.errors.to_json()
                ));
            }
            if gaps > 0 || not_recovered > 0 {
                report.failures.push(format!(
                    "durable rooms not recovered exactly: {gaps} clients with missing, \
                     duplicated or out-of-order messages ({} missing, {} duplicated, {} out of \
                     order, {} unexpected); {not_recovered} rejoins answered recovered: false",
                    total.missing, total.duplicates, total.out_of_order, total.unexpected
                ));
            }
        }
    }
}

impl Killed {
    /// Waits until every client has rejoined or given up.
    async fn rejoined(self) -> Storm {
        let mut storm = self.0;
        let killed_at = storm.ctx.killed_at.borrow().expect("killed");
        for _ in 0..storm.tasks.len() {
            match storm.rejoins.recv().await {
                Some(Some(d)) => storm.rejoined.push(d),
                Some(None) => storm.lost += 1,
                // Every task holds a sender through `ctx`, and so does the storm.
                None => unreachable!("the storm holds a sender"),
            }
        }
        storm.all_rejoined = (storm.lost == 0).then(|| killed_at.elapsed());
        storm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_is_exact_only_with_every_message_once_in_order() {
        let expected = [3, 5, 9, 12];
        assert!(Check::of(&[3, 5, 9, 12], &expected).exact());
        let gap = Check::of(&[3, 9, 12], &expected);
        assert_eq!((gap.missing, gap.duplicates, gap.out_of_order), (1, 0, 0));
        let dup = Check::of(&[3, 5, 5, 9, 12], &expected);
        assert_eq!((dup.missing, dup.duplicates, dup.out_of_order), (0, 1, 0));
        let swapped = Check::of(&[3, 9, 5, 12], &expected);
        assert_eq!((swapped.missing, swapped.out_of_order), (0, 1));
        let extra = Check::of(&[1, 3, 5, 9, 12], &expected);
        assert_eq!((extra.unexpected, extra.exact()), (1, false));
        assert!(Check::of(&[], &[]).exact());
    }

    #[test]
    fn backoff_is_full_jitter_below_the_capped_ceiling() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let ctx = Ctx {
            args: StormArgs {
                clients: 1,
                victim: 0,
                chat_rooms: 1,
                durable_rooms: 1,
                publish_rate: 1.0,
                before: Duration::ZERO,
                after: Duration::ZERO,
                backoff_base: Duration::from_millis(100),
                backoff_cap: Duration::from_secs(1),
                reconnect_timeout: Duration::from_secs(1),
                drain_timeout: Duration::from_secs(1),
                concurrency: 1,
                presence_events: false,
                repeat: 1,
            },
            survivors: vec![1],
            killed_at: watch::Sender::new(None),
            finals: watch::Sender::new(None),
            rejoins: tx,
        };
        for attempt in 0..40 {
            let ceiling = Duration::from_millis(100 << attempt.min(4)).min(Duration::from_secs(1));
            let waits: Vec<Duration> = (0..500).map(|i| ctx.backoff(i, attempt)).collect();
            assert!(waits.iter().all(|w| *w < ceiling), "attempt {attempt}");
            // Spread over the whole window, not bunched at one end.
            assert!(waits.iter().any(|w| *w < ceiling / 10), "attempt {attempt}");
            assert!(
                waits.iter().any(|w| *w > ceiling * 9 / 10),
                "attempt {attempt}"
            );
        }
        assert_eq!(
            ctx.backoff(7, 2),
            ctx.backoff(7, 2),
            "the same draw for both systems"
        );
    }
}
