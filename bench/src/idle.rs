//! `idle`: memory per idle authenticated connection, of every process that
//! serves the connections.
//!
//! `--conns` clients (each its own user `idle-<i>`) connect to edge 0 (the
//! `herald dev` process with `--target dev`; server 0 of the Socket.IO
//! peer), from source addresses 127.0.0.2, 127.0.0.3, ... in turn,
//! authenticate (`connect` → `connected`) and do one round trip (`ping` →
//! `pong`; the peer's acked `leave`). Both systems are warmed up alike: 100
//! connections opened and closed, `--settle` of quiet, then a wait until
//! no server's RSS has moved for `--stable-for`.
//!
//! The RSS (`/proc/<pid>/status` VmRSS) of every server process (Herald:
//! each edge, presence, router, nats-server; the peer: each Node server and
//! its redis-server) is read before the first connection, after half of
//! them (so the per-connection cost can also be taken between two loaded
//! points, without the allocator's one-off growth), after all of them, and
//! after every client closed, each time after `--settle` of quiet. Then
//! (unless `--no-reopen`) as many connections are opened again and closed
//! again, with a reading after each: memory kept after the first close that
//! the second round reuses (no new growth) is a cache, memory that grows
//! again by the same amount is a leak. The broker's own account (nats-server's
//! `/varz`, `/subsz`, `/jsz`, `/connz`; Redis's `INFO`) is read at the same
//! points.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use futures::StreamExt as _;
use herald_client::{Client, ClientError};
use serde_json::{Map, Value, json};

use crate::delivery::{Connection, close_all};
use crate::load::Dialer;
use crate::peer::Peer;
use crate::procfs::rss_bytes;
use crate::report::{CpuMeter, CpuPhase, Errors, Report, Section, round3};
use crate::socketio::{self, SioClient, ignore_events};
use crate::target::{CommonArgs, CpuProbe, Target};

#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    /// Idle connections to open to the one edge.
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
    /// Quiet time before each RSS reading.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Skip the second round (open `--conns` again after the close, close
    /// again) that tells memory kept as a cache from memory leaked.
    #[arg(long)]
    pub no_reopen: bool,
    /// Before the first reading, after the warm-up, wait until no server's
    /// RSS has moved by more than 1 % for this long (at most a minute): a
    /// Node server's heap shrinks by ~30 MB some seconds after it started,
    /// which would count against the connections.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub stable_for: Duration,
}

/// The longest wait for the servers' RSS to hold still before the first
/// reading; after it the run goes on, with a note.
const STABLE_LIMIT: Duration = Duration::from_secs(60);

/// Waits until no server's RSS has moved by more than 1 % (or 256 KiB,
/// whichever is more) over the last `window`, polling twice a second;
/// returns how long it waited and whether it got there within
/// [`STABLE_LIMIT`].
async fn wait_stable(servers: &Servers, window: Duration) -> (Duration, bool) {
    const POLL: Duration = Duration::from_millis(500);
    let started = Instant::now();
    // Since when every reading stayed in its process's band, and the bands
    // (lowest, highest).
    let mut since = Instant::now();
    let mut bands: Vec<Option<(u64, u64)>> =
        servers.rss().iter().map(|r| r.map(|b| (b, b))).collect();
    loop {
        tokio::time::sleep(POLL).await;
        let now = Instant::now();
        let mut moved = false;
        for (band, reading) in bands.iter_mut().zip(servers.rss()) {
            let (Some((lo, hi)), Some(b)) = (*band, reading) else {
                continue;
            };
            let (lo, hi) = (lo.min(b), hi.max(b));
            if hi - lo > (hi / 100).max(256 * 1024) {
                moved = true;
            }
            *band = Some((lo, hi));
        }
        if moved {
            since = now;
            bands = servers.rss().iter().map(|r| r.map(|b| (b, b))).collect();
        } else if now.duration_since(since) >= window {
            return (started.elapsed(), true);
        }
        if started.elapsed() >= STABLE_LIMIT {
            return (started.elapsed(), false);
        }
    }
}

/// Fds the bench keeps for itself besides the client sockets.
const FD_MARGIN: u64 = 200;

/// Raises the soft limit on open files to the hard one; the soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `lim`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

/// Refuses a `--conns` below two (there is no second half to measure) or
/// beyond the open files this process may have; `edge_limited` adds that
/// Herald's edge, a process on the same limits, needs as many.
fn check_conns(conns: usize, edge_limited: bool) -> Result<()> {
    if conns < 2 {
        bail!("--conns must be at least 2");
    }
    let limit = raise_fd_limit();
    if conns as u64 + FD_MARGIN > limit {
        if edge_limited {
            bail!(
                "--conns {conns} needs more open files than this process may have ({limit}); \
                 the edge needs as many: stay below {}",
                limit.saturating_sub(FD_MARGIN)
            );
        }
        bail!("--conns {conns} needs more open files than this process may have ({limit})");
    }
    Ok(())
}

pub async fn run(args: &IdleArgs, common: &CommonArgs, target: &Target) -> Result<Report> {
    check_conns(args.conns, true)?;
    let servers = target.servers();
    let primary = target.edge_pid(0).context("no edge process")?;
    let mut report = Report::new(
        "idle",
        target.kind.as_str(),
        target.describe(),
        json!({
            "conns": args.conns,
            "concurrency": args.concurrency,
            "settle_s": args.settle.as_secs_f64(),
            "source_addrs": common.source_addrs,
            "edge": target.edge_urls[0],
            "warmup_conns": WARMUP,
            "reopen": !args.no_reopen,
            "stable_for_s": args.stable_for.as_secs_f64(),
        }),
    );
    // Edge 0 only.
    let dialer = Dialer::new(vec![target.edge_urls[0].clone()], common.source_ips());
    let open = async |range, errors: &mut Errors| {
        open(&dialer, target, range, args.concurrency, errors).await
    };
    let measured = measure(
        args,
        open,
        Servers::new(&servers, primary)?,
        || target.nats_state(),
        || CpuMeter::start(target),
        |meter| meter.stop(target),
    )
    .await?;
    if target.kind == crate::target::TargetKind::Cluster {
        report.section("nats_per_conn", nats_per_conn(&measured));
    }
    finish(&mut report, measured, false, "nats");
    Ok(report)
}

/// Opens connections `range` (user `idle-<i>`) with `concurrency` at a time,
/// each authenticated and pinged once.
async fn open(
    dialer: &Dialer,
    target: &Target,
    range: std::ops::Range<usize>,
    concurrency: usize,
    errors: &mut Errors,
) -> Vec<Client> {
    let connect = |i| {
        let token = target.token(&format!("idle-{i}"));
        async move {
            let (client, _) = dialer
                .connect(0, &token)
                .await
                .map_err(|e| ("connect", e))?;
            let pong = client
                .request(json!({"op": "ping"}))
                .await
                .map_err(|e| ("ping", e))?;
            Ok((client, pong))
        }
    };
    let check = |pong: &Value, errors: &mut Errors| {
        if pong["op"] != "pong" {
            errors.add_reply("ping", pong);
        }
    };
    open_each(range, concurrency, errors, connect, check).await
}

/// `idle --target socketio`: `--conns` Socket.IO clients (auth `{user:
/// "idle-<i>"}`, no rooms) connect to server 0 and each does one
/// acknowledged round trip (`leave` of a room it is not in, the peer's
/// cheapest acked event; Herald's clients do one `ping`). Same warm-up,
/// readings and keys as Herald's; the servers are every Node server and
/// the redis-server.
pub async fn run_socketio(args: &IdleArgs, common: &CommonArgs, peer: &Peer) -> Result<Report> {
    check_conns(args.conns, false)?;
    let servers = peer.servers();
    let (_, primary) = peer.sio.pids()[0];
    let url = peer.sio.urls()[0].clone();
    let mut report = Report::new(
        "idle",
        "socketio",
        peer.describe(),
        json!({
            "conns": args.conns,
            "concurrency": args.concurrency,
            "settle_s": args.settle.as_secs_f64(),
            "source_addrs": common.source_addrs,
            "edge": url,
            "warmup_conns": WARMUP,
            "reopen": !args.no_reopen,
            "stable_for_s": args.stable_for.as_secs_f64(),
            "redis_url": peer.sio.redis_url(),
            "own_redis": peer.owns_redis(),
        }),
    );
    if !peer.owns_redis() {
        report.notes.push(
            "Redis is not the run's own (--redis-url): its memory counts only if nothing \
             else uses it"
                .into(),
        );
    }
    let sources = common.source_ips();
    let open = async |range, errors: &mut Errors| {
        open_sio(&peer.sio, &url, &sources, range, args.concurrency, errors).await
    };
    let measured = measure(
        args,
        open,
        Servers::new(&servers, primary)?,
        || peer.redis_state(),
        || peer.meter(),
        |meter| meter.stop_with(None),
    )
    .await?;
    finish(&mut report, measured, true, "redis");
    Ok(report)
}

/// Connections opened and closed before the first reading, the same for
/// every target: the first connections of a process pay one-off costs (the
/// allocator's arenas, Node's JIT and buffers, nats-server's first
/// subscriptions of a kind) that are no connection's.
const WARMUP: usize = 100;

/// Opens Socket.IO connections `range` (user `idle-<i>`, with a token of
/// `sio`'s) to `url`, each from the next source address, `concurrency` at a
/// time, each with one acked round trip.
async fn open_sio(
    sio: &crate::socketio::SocketIoPeer,
    url: &str,
    sources: &[std::net::IpAddr],
    range: std::ops::Range<usize>,
    concurrency: usize,
    errors: &mut Errors,
) -> Vec<SioClient> {
    let connect = |i| {
        let auth = json!({ "token": sio.token(&format!("idle-{i}")) });
        let source = sources[i % sources.len()];
        async move {
            let client = SioClient::connect(url, &auth, Some(source), ignore_events())
                .await
                .map_err(|e| ("connect", e))?;
            let ack = client
                .emit_with_ack("leave", &[json!("none")], socketio::DEFAULT_TIMEOUT)
                .await
                .map_err(|e| ("ping", e))?;
            Ok((client, ack))
        }
    };
    let check = |ack: &Vec<Value>, errors: &mut Errors| {
        if ack.first().map(|a| &a["ok"]) != Some(&Value::Bool(true)) {
            errors.add_kind("ping: unexpected ack", &format!("{ack:?}"));
        }
    };
    open_each(range, concurrency, errors, connect, check).await
}

/// Connects `range` with `connect`, `concurrency` at a time. A connection
/// that failed counts in `errors` under the stage that failed; one whose
/// round trip got the wrong answer is kept, and `check` counts the answer.
async fn open_each<C, A, F>(
    range: std::ops::Range<usize>,
    concurrency: usize,
    errors: &mut Errors,
    connect: impl Fn(usize) -> F,
    check: impl Fn(&A, &mut Errors),
) -> Vec<C>
where
    F: Future<Output = Result<(C, A), (&'static str, ClientError)>>,
{
    let results: Vec<_> = futures::stream::iter(range)
        .map(connect)
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut conns = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok((conn, answer)) => {
                check(&answer, errors);
                conns.push(conn);
            }
            Err((stage, e)) => errors.add(stage, &e),
        }
    }
    conns
}

/// The processes whose RSS is read, and which of them holds the
/// connections (the figures of the keys named `edge_*`).
struct Servers {
    names: Vec<String>,
    pids: Vec<u32>,
    primary: usize,
}

impl Servers {
    /// `probes`, of which the process `primary` holds the connections.
    fn new(probes: &[CpuProbe], primary: u32) -> Result<Servers> {
        let Some(primary) = probes.iter().position(|p| p.pid == primary) else {
            bail!("no process {primary} among {probes:?}");
        };
        Ok(Servers {
            names: probes.iter().map(|p| p.name.clone()).collect(),
            pids: probes.iter().map(|p| p.pid).collect(),
            primary,
        })
    }

    /// Each server's RSS now, in bytes (`None` for one that is gone).
    fn rss(&self) -> Vec<Option<u64>> {
        self.pids.iter().map(|&pid| rss_bytes(pid)).collect()
    }
}

/// One reading: every server's RSS and the broker's own account.
struct Reading {
    rss: Vec<Option<u64>>,
    broker: Option<Value>,
}

/// The readings of one idle run, after the warm-up: before, after half of
/// `--conns`, after all of them, after they closed, and (unless
/// `--no-reopen`) after as many opened again and after those closed, each
/// after `--settle` of quiet; and the server CPU the connects cost (between
/// `start_meter` and `stop_meter`). `open` opens a range of connections,
/// counting the ones that failed; `broker` reads the broker's own account.
async fn measure<C: Connection>(
    args: &IdleArgs,
    open: impl AsyncFn(std::ops::Range<usize>, &mut Errors) -> Vec<C>,
    servers: Servers,
    broker: impl Fn() -> Option<Value>,
    start_meter: impl FnOnce() -> CpuMeter,
    stop_meter: impl FnOnce(CpuMeter) -> CpuPhase,
) -> Result<Measured> {
    let read = || Reading {
        rss: servers.rss(),
        broker: broker(),
    };
    // Warm-up.
    let warm = open(0..WARMUP.min(args.conns), &mut Errors::default()).await;
    close_all(warm, args.concurrency).await;
    tokio::time::sleep(args.settle).await;
    let (stable_wait, stable) = wait_stable(&servers, args.stable_for).await;

    let before = read();
    let meter = start_meter();
    let started = Instant::now();
    let half = args.conns / 2;
    let mut errors = Errors::default();
    let mut conns = open(0..half, &mut errors).await;
    tokio::time::sleep(args.settle).await;
    let at_half = read();
    let opened_half = conns.len();
    conns.extend(open(half..args.conns, &mut errors).await);
    let connect_s = started.elapsed().as_secs_f64() - args.settle.as_secs_f64();
    tokio::time::sleep(args.settle).await;
    let all = read();
    let cpu = stop_meter(meter);
    let opened = conns.len();
    // Still open? (A server that dropped them would make the figure meaningless.)
    let still_open = conns.iter().filter(|c| !c.is_closed()).count();

    let client_rss = rss_bytes(std::process::id()).unwrap_or(0);
    close_all(conns, args.concurrency).await;
    tokio::time::sleep(args.settle).await;
    let after_close = read();

    let reopened = if args.no_reopen {
        None
    } else {
        let mut errors_again = Errors::default();
        let conns = open(0..args.conns, &mut errors_again).await;
        tokio::time::sleep(args.settle).await;
        let again = read();
        let opened_again = conns.len();
        close_all(conns, args.concurrency).await;
        tokio::time::sleep(args.settle).await;
        Some(Reopened {
            opened: opened_again,
            again,
            after_close: read(),
            errors: errors_again,
        })
    };
    Ok(Measured {
        servers,
        stable_wait,
        stable,
        wanted: args.conns,
        opened,
        opened_half,
        still_open,
        before,
        half: at_half,
        all,
        after_close,
        reopened,
        connect_s,
        client_rss,
        errors,
        cpu,
    })
}

/// The second round: as many connections opened again after the close.
struct Reopened {
    opened: usize,
    /// With them open.
    again: Reading,
    /// After they closed too.
    after_close: Reading,
    errors: Errors,
}

/// What an idle run measured, for [`finish`].
struct Measured {
    servers: Servers,
    /// How long the servers' RSS took to hold still before the first
    /// reading, and whether it did.
    stable_wait: Duration,
    stable: bool,
    wanted: usize,
    opened: usize,
    opened_half: usize,
    still_open: usize,
    before: Reading,
    half: Reading,
    all: Reading,
    after_close: Reading,
    reopened: Option<Reopened>,
    connect_s: f64,
    client_rss: u64,
    errors: Errors,
    cpu: CpuPhase,
}

/// KiB per connection: (`to` − `from`) / `n`, by server name, and their sum
/// (`null` for a server that was gone at either reading).
fn per_conn(m: &Measured, from: &Reading, to: &Reading, n: usize) -> (Map<String, Value>, f64) {
    let mut total = 0.0;
    let by_name = m
        .servers
        .names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let kib = match (from.rss[i], to.rss[i]) {
                (Some(a), Some(b)) => {
                    let kib = (b as f64 - a as f64) / 1024.0 / n.max(1) as f64;
                    total += kib;
                    json!(round3(kib))
                }
                _ => Value::Null,
            };
            (name.clone(), kib)
        })
        .collect();
    (by_name, round3(total))
}

/// The growth of nats-server's own counts per connection (cluster only):
/// subscriptions, JetStream messages and bytes, between the readings
/// before and with every connection open.
fn nats_per_conn(m: &Measured) -> Section {
    let n = m.opened.max(1) as f64;
    // `key` may be a path: `go/heap_alloc_mib`.
    let get = |r: &Reading, key: &str| -> Option<f64> {
        key.split('/')
            .try_fold(r.broker.as_ref()?, |v, k| v.get(k))?
            .as_f64()
    };
    let delta = |key: &str| -> Option<f64> { Some(get(&m.all, key)? - get(&m.before, key)?) };
    let per = |key: &str, scale: f64| json!(delta(key).map(|d| round3(d / scale / n)));
    let left = |key: &str| -> Value {
        let a = m.before.broker.as_ref().and_then(|b| b[key].as_f64());
        let c = m.after_close.broker.as_ref().and_then(|b| b[key].as_f64());
        json!(a.zip(c).map(|(a, c)| c - a))
    };
    Section::new()
        .put("subscriptions_per_conn", per("subscriptions", 1.0))
        .put("js_messages_per_conn", per("js_messages", 1.0))
        .put("js_kib_per_conn", per("js_bytes", 1024.0))
        .put("js_memory_kib_per_conn", per("js_memory_bytes", 1024.0))
        .put("js_api_calls_per_conn", per("js_api_total", 1.0))
        .put("varz_rss_kib_per_conn", per("rss_mib", 1.0 / 1024.0))
        .put(
            "go_heap_alloc_kib_per_conn",
            per("go/heap_alloc_mib", 1.0 / 1024.0),
        )
        .put(
            "go_heap_inuse_kib_per_conn",
            per("go/heap_inuse_mib", 1.0 / 1024.0),
        )
        .put("go_stack_kib_per_conn", per("go/stack_mib", 1.0 / 1024.0))
        .put("goroutines_per_conn", per("go/goroutines", 1.0))
        .put("subscriptions_left_after_close", left("subscriptions"))
        .put("js_messages_left_after_close", left("js_messages"))
}

/// The `idle` section, the broker's readings (section `broker_name`) and
/// failures, the same for every target; `name_errors` adds the error kinds
/// to the failure line.
fn finish(report: &mut Report, m: Measured, name_errors: bool, broker_name: &str) {
    let kib = |b: f64| round3(b / 1024.0);
    let p = m.servers.primary;
    let rss = |r: &Reading| r.rss[p].unwrap_or(0);
    let per_conn_primary = (rss(&m.all) as f64 - rss(&m.before) as f64) / m.opened.max(1) as f64;
    let marginal =
        (rss(&m.all) as f64 - rss(&m.half) as f64) / (m.opened - m.opened_half).max(1) as f64;
    if m.opened < m.wanted {
        let mut line = format!("{} of {} connections failed", m.wanted - m.opened, m.wanted);
        if name_errors {
            line.push_str(&format!(": {}", m.errors.to_json()));
        }
        report.failures.push(line);
    }
    if m.still_open < m.opened {
        report.failures.push(format!(
            "{} connections were closed by the server while idle",
            m.opened - m.still_open
        ));
    }
    if !m.stable {
        report.notes.push(format!(
            "the servers' RSS still moved by more than 1 % after {} s: the first reading may be off",
            STABLE_LIMIT.as_secs()
        ));
    }
    let mib = |b: u64| round3(b as f64 / (1 << 20) as f64);
    let mib_opt = |b: Option<u64>| json!(b.map(mib));

    let (servers_all, total_all) = per_conn(&m, &m.before, &m.all, m.opened);
    let (servers_half, total_half) = per_conn(&m, &m.half, &m.all, m.opened - m.opened_half);
    let (servers_left, total_left) = per_conn(&m, &m.before, &m.after_close, m.opened);
    let mut readings = vec![
        ("before", &m.before),
        ("half", &m.half),
        ("all", &m.all),
        ("after_close", &m.after_close),
    ];
    if let Some(r) = &m.reopened {
        readings.push(("again", &r.again));
        readings.push(("after_second_close", &r.after_close));
    }
    let servers_mib: Map<String, Value> = m
        .servers
        .names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let points: Map<String, Value> = readings
                .iter()
                .map(|(k, r)| ((*k).to_owned(), mib_opt(r.rss[i])))
                .collect();
            (name.clone(), Value::Object(points))
        })
        .collect();

    let mut section = Section::new()
        .put("conns", m.opened)
        .put("open_at_end", m.still_open)
        .put("total_rss_kib_per_conn", total_all)
        .put("total_rss_kib_per_conn_second_half", total_half)
        .put("total_rss_kib_left_per_conn_after_close", total_left)
        .put("bar_kib_per_conn", 4.0)
        .put("total_within_bar", total_all <= 4.0)
        .put("servers_rss_kib_per_conn", servers_all)
        .put("servers_rss_kib_per_conn_second_half", servers_half)
        .put("servers_rss_kib_left_per_conn_after_close", servers_left);
    if let Some(r) = &m.reopened {
        // Growth of the second round over the first's peak: ≈ 0 where the
        // memory kept after the first close was reused (a cache), ≈ the
        // first round's per-connection figure where it was not (a leak).
        let (servers_regrowth, total_regrowth) = per_conn(&m, &m.all, &r.again, r.opened);
        let (servers_left2, total_left2) = per_conn(&m, &m.before, &r.after_close, m.opened);
        section = section
            .put("reopened", r.opened)
            .put("total_rss_kib_regrowth_per_conn", total_regrowth)
            .put(
                "total_rss_kib_left_per_conn_after_second_close",
                total_left2,
            )
            .put("servers_rss_kib_regrowth_per_conn", servers_regrowth)
            .put(
                "servers_rss_kib_left_per_conn_after_second_close",
                servers_left2,
            )
            .put("reopen_errors", r.errors.total());
        if r.opened < m.wanted {
            report.failures.push(format!(
                "{} of {} connections failed when opened again",
                m.wanted - r.opened,
                m.wanted
            ));
        }
    }
    let section = section
        .put("servers_rss_mib", servers_mib)
        .put("stable_wait_s", round3(m.stable_wait.as_secs_f64()))
        .put("edge", m.servers.names[p].clone())
        .put("rss_kib_per_conn", kib(per_conn_primary))
        .put("rss_kib_per_conn_second_half", kib(marginal))
        .put("edge_rss_mib_before", mib(rss(&m.before)))
        .put("edge_rss_mib_half", mib(rss(&m.half)))
        .put("edge_rss_mib_all", mib(rss(&m.all)))
        .put("edge_rss_mib_after_close", mib(rss(&m.after_close)))
        .put(
            "connects_per_sec",
            round3(m.opened as f64 / m.connect_s.max(1e-3)),
        )
        .put(
            "edge_cpu_us_per_connect",
            round3(m.cpu.herald_s() * 1e6 / m.opened.max(1) as f64),
        )
        .put(
            "nats_cpu_us_per_connect",
            json!(
                m.cpu
                    .nats_s()
                    .map(|s| round3(s * 1e6 / m.opened.max(1) as f64))
            ),
        )
        .put(
            "bench_rss_kib_per_conn",
            Value::from(kib(m.client_rss as f64 / m.opened.max(1) as f64)),
        )
        .put("errors", m.errors.total())
        .put("error_kinds", m.errors.to_json());
    report.section("idle", section);
    if readings.iter().any(|(_, r)| r.broker.is_some()) {
        let mut broker = Section::new();
        for (k, r) in &readings {
            broker = broker.put(k, json!(r.broker));
        }
        report.section(broker_name, broker);
    }
    report.cpu.push(("connect and ping".into(), m.cpu));
}
