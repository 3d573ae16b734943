//! `churn`: presence churn.
//!
//! 1. Churn: `workers` loops, each connect (with a token) → join
//!    `chat:churn-<k>` → wait for `ok` → leave it → wait for `ok` → close,
//!    for `duration`; edges, rooms and source addresses are taken in turn.
//!    Reports completed cycles per second, the latency of each stage, errors,
//!    and the server CPU per cycle.
//! 2. Presence settle: right after the churn, the member lists of the churn
//!    rooms are read until they are empty, which shows presence entries that
//!    lag behind or leak.
//! 3. Visibility: observers on every edge join `chat:watch`; a joiner on a
//!    rotating edge joins it, and each observer's wait for the
//!    `{"op":"presence","event":"join","conn":<joiner>}` frame is timed from
//!    the moment the join was sent; then the joiner closes and the wait for
//!    the `leave` event is timed from the moment the close was sent.
//!
//! With `--under-load` part 3 runs while part 1 does (the churn then lasts
//! until the samples are taken, at least `duration`).
//!
//! `--target socketio` ([`run_socketio`]) runs part 1 against the Socket.IO
//! peer: the same workers, rooms and source addresses, each cycle a CONNECT
//! whose `auth.token` is an HS256 JWT the server verifies (as Herald's edges
//! verify theirs), the `join` event and its ack, the `leave` event and its
//! ack, and the close. Parts 2 and 3 are about Herald's presence, which
//! Socket.IO does not have: they are not run.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use futures::future::join_all;
use herald_client::{Client, ClientError};
use serde_json::{Value, json};

use crate::load::{Dialer, ERROR_BACKOFF, Failed, request_ok, sio_ack};
use crate::peer::Peer;
use crate::report::{CpuMeter, CpuPhase, Errors, Latency, Report, Section, round3};
use crate::socketio::{self, SioClient};
use crate::target::{CommonArgs, Target};

/// The room the visibility part watches.
const WATCH_ROOM: &str = "chat:watch";

#[derive(Args, Debug, Clone)]
pub struct ChurnArgs {
    /// Concurrent connect → join → close loops.
    #[arg(long, default_value_t = 50)]
    pub workers: usize,
    /// Number of rooms (chat:churn-0, chat:churn-1, ...) the loops join in turn.
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// How long the churn runs, e.g. 10s, 1m.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Join-to-visible samples (0 skips that part).
    #[arg(long, default_value_t = 500)]
    pub samples: usize,
    /// Observers of chat:watch on each edge.
    #[arg(long, default_value_t = 1)]
    pub observers_per_edge: usize,
    /// How long an observer waits for a presence event before it counts as lost.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub visible_timeout: Duration,
    /// Take the join-to-visible samples during the churn instead of after it.
    #[arg(long)]
    pub under_load: bool,
    /// How long the member lists of the churn rooms may take to empty after the churn.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub settle_timeout: Duration,
}

impl ChurnArgs {
    fn params(&self, common: &CommonArgs, target: &Target) -> Value {
        json!({
            "edges": target.edge_urls.len(),
            "workers": self.workers,
            "rooms": self.rooms,
            "duration_s": self.duration.as_secs_f64(),
            "samples": self.samples,
            "observers_per_edge": self.observers_per_edge,
            "visible_timeout_s": self.visible_timeout.as_secs_f64(),
            "under_load": self.under_load,
            "source_addrs": common.source_addrs,
        })
    }
}

pub async fn run(args: &ChurnArgs, common: &CommonArgs, target: &Target) -> Result<Report> {
    if args.workers == 0 || args.rooms == 0 {
        bail!("--workers and --rooms must be at least 1");
    }
    let mut report = Report::new(
        "churn",
        target.kind.as_str(),
        target.describe(),
        args.params(common, target),
    );
    let dialer = Arc::new(Dialer::new(target.edge_urls.clone(), common.source_ips()));

    let meter = CpuMeter::start(target);
    let cycle = HeraldCycle {
        dialer: dialer.clone(),
        tokens: (0..args.workers)
            .map(|w| target.token(&format!("churn-{w}")))
            .collect(),
        rooms: args.rooms as u64,
    };
    let churn = Churn::start(args, Arc::new(cycle));
    let visibility = if args.under_load {
        let pace = tokio::time::sleep(args.duration);
        let (vis, ()) = tokio::join!(visibility(args, &dialer, target), pace);
        let out = churn.finish().await;
        let cpu = meter.stop(target);
        report.section("churn", out.section(&cpu));
        report.cpu.push(("churn and visibility".into(), cpu));
        report.section("presence_settle", settle(args, &dialer, target).await);
        vis
    } else {
        tokio::time::sleep(args.duration).await;
        let out = churn.finish().await;
        let cpu = meter.stop(target);
        report.section("churn", out.section(&cpu));
        report.cpu.push(("churn".into(), cpu));
        report.section("presence_settle", settle(args, &dialer, target).await);
        let meter = CpuMeter::start(target);
        let vis = visibility(args, &dialer, target).await;
        if args.samples > 0 {
            report.cpu.push(("visibility".into(), meter.stop(target)));
        }
        vis
    };
    match visibility {
        Ok(Some(v)) => {
            if let Some(failure) = &v.failure {
                report.failures.push(failure.clone());
            }
            report.section("visibility", v.section());
        }
        Ok(None) => {}
        Err(e) => report.failures.push(format!("visibility: {e:#}")),
    }
    Ok(report)
}

/// `churn --target socketio`: part 1 only, against the peer's servers.
pub async fn run_socketio(args: &ChurnArgs, common: &CommonArgs, peer: &Peer) -> Result<Report> {
    if args.workers == 0 || args.rooms == 0 {
        bail!("--workers and --rooms must be at least 1");
    }
    let urls = peer.sio.urls();
    let mut report = Report::new(
        "churn",
        "socketio",
        peer.describe(),
        json!({
            "edges": urls.len(),
            "workers": args.workers,
            "rooms": args.rooms,
            "duration_s": args.duration.as_secs_f64(),
            "source_addrs": common.source_addrs,
            "redis_url": peer.sio.redis_url(),
            "own_redis": peer.owns_redis(),
        }),
    );
    if peer.redis_pid().is_none() {
        report
            .notes
            .push("Redis's pid is unknown: its CPU is not counted".into());
    }
    let cycle = SioCycle {
        dialer: Dialer::new(urls, common.source_ips()),
        tokens: (0..args.workers)
            .map(|w| peer.sio.token(&format!("churn-{w}")))
            .collect(),
        rooms: args.rooms as u64,
    };
    let meter = peer.meter();
    let churn = Churn::start(args, Arc::new(cycle));
    tokio::time::sleep(args.duration).await;
    let out = churn.finish().await;
    let cpu = meter.stop_with(None);
    report.section("churn", out.section(&cpu));
    report.cpu.push(("churn".into(), cpu));
    report.notes.push(
        "presence settle and join-to-visible are not run: they measure Herald's presence, \
         which Socket.IO does not have"
            .into(),
    );
    Ok(report)
}

/// How long each stage of a complete cycle took.
struct Times {
    connect: Duration,
    join: Duration,
    leave: Duration,
    close: Duration,
}

/// One connect → join → leave → close cycle against one system; worker `w`
/// authenticates as user `churn-<w>`, cycle `n` takes server `n % servers`
/// and room `n % rooms`.
trait Cycle: Send + Sync + 'static {
    fn run(&self, n: u64, w: usize) -> impl Future<Output = Result<Times, Failed>> + Send;
}

struct HeraldCycle {
    dialer: Arc<Dialer>,
    tokens: Vec<String>,
    rooms: u64,
}

impl Cycle for HeraldCycle {
    async fn run(&self, n: u64, w: usize) -> Result<Times, Failed> {
        let room = format!("chat:churn-{}", n % self.rooms);
        let t0 = Instant::now();
        let (client, _connected) = self
            .dialer
            .connect(n as usize, &self.tokens[w])
            .await
            .map_err(Failed::client("connect"))?;
        let t1 = Instant::now();
        let joined = request_ok(&client, "join", json!({"op": "join", "room": room})).await;
        let t2 = Instant::now();
        let left = match joined {
            Ok(()) => request_ok(&client, "leave", json!({"op": "leave", "room": room})).await,
            Err(failed) => Err(failed),
        };
        let t3 = Instant::now();
        let closed = client.close().await.map_err(Failed::client("close"));
        left?;
        closed?;
        Ok(Times {
            connect: t1 - t0,
            join: t2 - t1,
            leave: t3 - t2,
            close: t3.elapsed(),
        })
    }
}

struct SioCycle {
    dialer: Dialer,
    tokens: Vec<String>,
    rooms: u64,
}

impl Cycle for SioCycle {
    async fn run(&self, n: u64, w: usize) -> Result<Times, Failed> {
        let room = format!("chat:churn-{}", n % self.rooms);
        let (url, source) = self.dialer.endpoint(n as usize);
        let auth = json!({ "token": self.tokens[w] });
        let t0 = Instant::now();
        let client = SioClient::connect(url, &auth, Some(source), socketio::ignore_events())
            .await
            .map_err(Failed::client("connect"))?;
        let t1 = Instant::now();
        let joined = sio_ack(&client, "join", &room).await;
        let t2 = Instant::now();
        let left = match joined {
            Ok(()) => sio_ack(&client, "leave", &room).await,
            Err(failed) => Err(failed),
        };
        let t3 = Instant::now();
        let closed = client.close().await.map_err(Failed::client("close"));
        left?;
        closed?;
        Ok(Times {
            connect: t1 - t0,
            join: t2 - t1,
            leave: t3 - t2,
            close: t3.elapsed(),
        })
    }
}

/// The churn loops, running.
struct Churn {
    stop: Arc<AtomicBool>,
    start: Instant,
    workers: Vec<tokio::task::JoinHandle<WorkerOut>>,
}

#[derive(Default)]
struct WorkerOut {
    /// Complete cycles (connect, join ok, leave ok, close).
    cycles: u64,
    /// Cycles completed before the stop.
    in_window: u64,
    /// Cycles completed in each second since the start.
    per_second: Vec<u64>,
    connect: Latency,
    join: Latency,
    leave: Latency,
    close: Latency,
    cycle: Latency,
    errors: Errors,
}

struct ChurnOut {
    window: Duration,
    total: WorkerOut,
}

impl Churn {
    fn start<C: Cycle>(args: &ChurnArgs, cycle: Arc<C>) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let seq = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let workers = (0..args.workers)
            .map(|w| {
                tokio::spawn(churn_worker(
                    cycle.clone(),
                    w,
                    seq.clone(),
                    stop.clone(),
                    start,
                ))
            })
            .collect();
        Churn {
            stop,
            start,
            workers,
        }
    }

    /// Stops the loops and waits for their cycles in flight to end.
    async fn finish(self) -> ChurnOut {
        self.stop.store(true, Ordering::Relaxed);
        let window = self.start.elapsed();
        let mut total = WorkerOut::default();
        for w in self.workers {
            let out = w.await.expect("churn worker panicked");
            total.cycles += out.cycles;
            total.in_window += out.in_window;
            if total.per_second.len() < out.per_second.len() {
                total.per_second.resize(out.per_second.len(), 0);
            }
            for (t, n) in total.per_second.iter_mut().zip(&out.per_second) {
                *t += n;
            }
            total.connect.merge(&out.connect);
            total.join.merge(&out.join);
            total.leave.merge(&out.leave);
            total.close.merge(&out.close);
            total.cycle.merge(&out.cycle);
            total.errors.merge(&out.errors);
        }
        ChurnOut { window, total }
    }
}

impl ChurnOut {
    fn section(&self, cpu: &CpuPhase) -> Section {
        let t = &self.total;
        let per_cycle = |secs: f64| round3(secs * 1e6 / t.cycles.max(1) as f64);
        let ratio = |n: u64| round3(n as f64 / t.cycles.max(1) as f64);
        let secs = self.window.as_secs_f64();
        // Whole seconds only: the last one is cut short by the stop.
        let full = &t.per_second[..t.per_second.len().min(self.window.as_secs() as usize)];
        Section::new()
            .put("connects_per_sec", round3(t.in_window as f64 / secs))
            .put("cycles", t.cycles)
            .put("window_s", round3(secs))
            .put("errors", t.errors.total())
            .put("error_kinds", t.errors.to_json())
            .put("herald_cpu_us_per_cycle", per_cycle(cpu.herald_s()))
            .put("processes_cpu_us_per_cycle", cpu.per_process_us(t.cycles))
            .put("nats_cpu_us_per_cycle", json!(cpu.nats_s().map(per_cycle)))
            .put(
                "server_cpu_us_per_cycle",
                per_cycle(cpu.herald_s() + cpu.nats_s().unwrap_or(0.0)),
            )
            .put("bar_nats_cpu_us_per_cycle", 50.0)
            .put(
                "nats_msgs_in_per_cycle",
                json!(cpu.nats.map(|n| ratio(n.in_msgs))),
            )
            .put(
                "nats_msgs_out_per_cycle",
                json!(cpu.nats.map(|n| ratio(n.out_msgs))),
            )
            .put(
                "nats_bytes_in_per_cycle",
                json!(cpu.nats.map(|n| ratio(n.in_bytes))),
            )
            .put(
                "nats_js_api_calls_per_cycle",
                json!(cpu.nats.map(|n| ratio(n.js_api_calls))),
            )
            .put(
                "nats_js_api_errors_per_cycle",
                json!(cpu.nats.map(|n| ratio(n.js_api_errors))),
            )
            .put(
                "nats_subs_made_per_cycle",
                json!(cpu.nats.map(|n| ratio(n.sub_inserts))),
            )
            .put(
                "nats_subs_removed_per_cycle",
                json!(cpu.nats.map(|n| ratio(n.sub_removes))),
            )
            .put(
                "nats_subscriptions_at_start",
                json!(cpu.nats.map(|n| n.subscriptions_at_start)),
            )
            .put(
                "nats_subscriptions_at_end",
                json!(cpu.nats.map(|n| n.subscriptions)),
            )
            .put("per_second_min", json!(full.iter().min()))
            .put("per_second_max", json!(full.iter().max()))
            .put("per_second", json!(full))
            .put("connect_ms", t.connect.summary())
            .put("join_ms", t.join.summary())
            .put("leave_ms", t.leave.summary())
            .put("close_ms", t.close.summary())
            .put("cycle_ms", t.cycle.summary())
    }
}

async fn churn_worker<C: Cycle>(
    cycle: Arc<C>,
    w: usize,
    seq: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    start: Instant,
) -> WorkerOut {
    let mut out = WorkerOut::default();
    while !stop.load(Ordering::Relaxed) {
        // One counter for all workers, so that servers and rooms are used evenly.
        let n = seq.fetch_add(1, Ordering::Relaxed);
        let times = match cycle.run(n, w).await {
            Ok(times) => times,
            Err(failed) => {
                failed.count(&mut out.errors);
                if failed.stage == "connect" {
                    tokio::time::sleep(ERROR_BACKOFF).await;
                }
                continue;
            }
        };
        out.connect.record(times.connect);
        out.join.record(times.join);
        out.leave.record(times.leave);
        out.close.record(times.close);
        out.cycle
            .record(times.connect + times.join + times.leave + times.close);
        out.cycles += 1;
        if !stop.load(Ordering::Relaxed) {
            out.in_window += 1;
        }
        let second = start.elapsed().as_secs() as usize;
        if out.per_second.len() <= second {
            out.per_second.resize(second + 1, 0);
        }
        out.per_second[second] += 1;
    }
    out
}

/// Reads the member lists of the churn rooms over and over (no pause: each
/// round is `rooms` round trips) until they are all empty.
async fn settle(args: &ChurnArgs, dialer: &Dialer, target: &Target) -> Section {
    let (client, _) = match dialer.connect(0, &target.token("inspector")).await {
        Ok(c) => c,
        Err(e) => return Section::new().put("error", format!("cannot connect: {e}")),
    };
    let started = Instant::now();
    let mut first: Option<(u64, u64)> = None;
    let mut errors = Errors::default();
    let mut rounds = 0u64;
    let (settled, left) = loop {
        rounds += 1;
        let (mut conns, mut rooms) = (0u64, 0u64);
        let mut clean = true;
        for k in 0..args.rooms {
            let req = json!({"op": "presence", "room": format!("chat:churn-{k}")});
            match client.request(req).await {
                Ok(reply) if reply["op"] == "ok" => {
                    let n: u64 = reply["members"]
                        .as_array()
                        .map_or(0, |m| m.iter().filter_map(|u| u["conns"].as_u64()).sum());
                    conns += n;
                    rooms += u64::from(n > 0);
                }
                Ok(reply) => {
                    errors.add_reply("presence", &reply);
                    clean = false;
                }
                Err(e) => {
                    errors.add("presence", &e);
                    clean = false;
                }
            }
        }
        first.get_or_insert((conns, rooms));
        if clean && conns == 0 {
            break (Some(started.elapsed()), 0);
        }
        if started.elapsed() > args.settle_timeout {
            break (None, conns);
        }
    };
    let _ = client.close().await;
    let (first_conns, first_rooms) = first.unwrap_or_default();
    Section::new()
        .put("stale_conns_right_after", first_conns)
        .put("rooms_with_stale_right_after", first_rooms)
        .put(
            "empty_after_ms",
            json!(settled.map(|d| round3(d.as_secs_f64() * 1000.0))),
        )
        .put("stale_conns_at_end", left)
        .put("query_rounds", rounds)
        .put("errors", errors.total())
        .put("error_kinds", errors.to_json())
}

struct VisibilityOut {
    samples: u64,
    observers: usize,
    join_all: Latency,
    join_same: Latency,
    join_other: Latency,
    join_everywhere: Latency,
    leave_all: Latency,
    leave_everywhere: Latency,
    lost_join: u64,
    lost_leave: u64,
    errors: Errors,
    failure: Option<String>,
}

impl VisibilityOut {
    fn section(&self) -> Section {
        Section::new()
            .put("samples", self.samples)
            .put("observers", self.observers)
            .put("join_to_visible_ms", self.join_all.summary())
            .put("join_to_visible_same_edge_ms", self.join_same.summary())
            .put("join_to_visible_other_edge_ms", self.join_other.summary())
            .put(
                "join_to_visible_all_edges_ms",
                self.join_everywhere.summary(),
            )
            .put("close_to_leave_visible_ms", self.leave_all.summary())
            .put(
                "close_to_leave_visible_all_edges_ms",
                self.leave_everywhere.summary(),
            )
            .put("lost_join_events", self.lost_join)
            .put("lost_leave_events", self.lost_leave)
            .put("errors", self.errors.total())
            .put("error_kinds", self.errors.to_json())
    }
}

/// Waits for observer `client` to receive the presence `event` of `conn`;
/// the time since `t0`, or `None` when `deadline` passes first.
async fn seen(
    client: &Client,
    event: &str,
    conn: &str,
    t0: Instant,
    deadline: Instant,
) -> Result<Option<Duration>, ClientError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.recv_op("presence", left).await {
            Ok(frame) if frame["event"] == event && frame["conn"] == conn => {
                return Ok(Some(t0.elapsed()));
            }
            // Other connections' events (earlier joiners, other observers).
            Ok(_) => {}
            Err(ClientError::Timeout(_)) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// Every observer's wait for `event` of `conn`, as (observer's edge, latency).
async fn all_seen(
    observers: &[(usize, Client)],
    event: &str,
    conn: &str,
    t0: Instant,
    timeout: Duration,
) -> Result<Vec<(usize, Option<Duration>)>> {
    let deadline = t0 + timeout;
    let waits = observers.iter().map(|(edge, c)| async move {
        seen(c, event, conn, t0, deadline)
            .await
            .map(|d| (*edge, d))
            .map_err(|e| anyhow::anyhow!("observer on edge {edge} lost its connection: {e}"))
    });
    join_all(waits).await.into_iter().collect()
}

async fn visibility(
    args: &ChurnArgs,
    dialer: &Dialer,
    target: &Target,
) -> Result<Option<VisibilityOut>> {
    if args.samples == 0 {
        return Ok(None);
    }
    let edges = dialer.edges();
    let mut observers = Vec::new();
    for edge in 0..edges {
        for j in 0..args.observers_per_edge {
            let token = target.token(&format!("observer-{edge}-{j}"));
            let (client, _) = dialer.connect(edge, &token).await?;
            let reply = client
                .request(json!({"op": "join", "room": WATCH_ROOM}))
                .await?;
            if reply["op"] != "ok" {
                bail!("observer on edge {edge} could not join {WATCH_ROOM}: {reply}");
            }
            observers.push((edge, client));
        }
    }
    let joiner_token = target.token("joiner");
    let timeout = args.visible_timeout;
    let mut out = VisibilityOut {
        samples: 0,
        observers: observers.len(),
        join_all: Latency::default(),
        join_same: Latency::default(),
        join_other: Latency::default(),
        join_everywhere: Latency::default(),
        leave_all: Latency::default(),
        leave_everywhere: Latency::default(),
        lost_join: 0,
        lost_leave: 0,
        errors: Errors::default(),
        failure: None,
    };
    for s in 0..args.samples {
        let edge = s % edges;
        let (joiner, connected) = match dialer.connect(edge, &joiner_token).await {
            Ok(c) => c,
            Err(e) => {
                out.errors.add("joiner connect", &e);
                continue;
            }
        };
        let conn = connected["conn"].as_str().unwrap_or_default().to_owned();

        let t0 = Instant::now();
        let join = joiner.request(json!({"op": "join", "room": WATCH_ROOM}));
        let (reply, seen_join) =
            tokio::join!(join, all_seen(&observers, "join", &conn, t0, timeout));
        let seen_join = seen_join?;
        match reply {
            Ok(r) if r["op"] == "ok" => {}
            Ok(r) => out.errors.add_reply("joiner join", &r),
            Err(e) => out.errors.add("joiner join", &e),
        }
        let seen_any = seen_join.iter().any(|(_, d)| d.is_some());
        record(
            &seen_join,
            edge,
            &mut out.join_all,
            Some((&mut out.join_same, &mut out.join_other)),
            &mut out.join_everywhere,
            &mut out.lost_join,
        );
        if s == 0 && !seen_any {
            let _ = joiner.close().await;
            out.failure = Some(format!(
                "no presence event within {}: does this Herald send presence events?",
                humantime::format_duration(timeout)
            ));
            return Ok(Some(out));
        }

        let t0 = Instant::now();
        let (closed, seen_leave) = tokio::join!(
            joiner.close(),
            all_seen(&observers, "leave", &conn, t0, timeout)
        );
        let seen_leave = seen_leave?;
        if let Err(e) = closed {
            out.errors.add("joiner close", &e);
        }
        if s == 0 && seen_leave.iter().all(|(_, d)| d.is_none()) {
            out.failure = Some(format!(
                "no presence leave event within {} of a member's close \
                 (join events did arrive)",
                humantime::format_duration(timeout)
            ));
            return Ok(Some(out));
        }
        record(
            &seen_leave,
            edge,
            &mut out.leave_all,
            None,
            &mut out.leave_everywhere,
            &mut out.lost_leave,
        );
        out.samples += 1;
    }
    for (_, c) in observers {
        let _ = c.close().await;
    }
    Ok(Some(out))
}

fn record(
    seen: &[(usize, Option<Duration>)],
    joiner_edge: usize,
    all: &mut Latency,
    by_edge: Option<(&mut Latency, &mut Latency)>,
    everywhere: &mut Latency,
    lost: &mut u64,
) {
    let mut slowest = Some(Duration::ZERO);
    let mut by_edge = by_edge;
    for (edge, d) in seen {
        match d {
            Some(d) => {
                all.record(*d);
                if let Some((same, other)) = by_edge.as_mut() {
                    if *edge == joiner_edge {
                        same.record(*d);
                    } else {
                        other.record(*d);
                    }
                }
                slowest = slowest.map(|s| s.max(*d));
            }
            None => {
                *lost += 1;
                slowest = None;
            }
        }
    }
    if let Some(s) = slowest {
        everywhere.record(s);
    }
}
