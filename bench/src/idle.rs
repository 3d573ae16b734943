//! `idle`: memory of one edge per idle authenticated connection.
//!
//! `--conns` clients (each its own user `idle-<i>`) connect to edge 0 (the
//! `herald dev` process with `--target dev`), from source addresses
//! 127.0.0.2, 127.0.0.3, ... in turn, authenticate (`connect` →
//! `connected`) and do one `ping` → `pong`. The edge's RSS
//! (`/proc/<pid>/status` VmRSS) is read before the first connection, after
//! half of them (so the per-connection cost can also be taken between two
//! loaded points, without the allocator's one-off growth), and after all of
//! them, each time after `--settle` of quiet. Then every client closes and
//! the RSS is read once more (what the edge keeps after they left).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use futures::StreamExt as _;
use herald_client::{Client, ClientError};
use serde_json::{Value, json};

use crate::delivery::{Connection, close_all};
use crate::load::Dialer;
use crate::peer::Peer;
use crate::procfs::rss_bytes;
use crate::report::{CpuMeter, Errors, Report, Section, round3};
use crate::socketio::{self, SioClient, ignore_events};
use crate::target::{CommonArgs, Target};

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
    let pid = target.edge_pid(0).context("no edge process")?;
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
        }),
    );
    // Edge 0 only.
    let dialer = Dialer::new(vec![target.edge_urls[0].clone()], common.source_ips());
    let rss = || rss_bytes(pid).context("edge RSS from /proc");

    tokio::time::sleep(args.settle).await;
    let open = async |range, errors: &mut Errors| {
        open(&dialer, target, range, args.concurrency, errors).await
    };
    let measured = measure(
        args,
        open,
        rss,
        || CpuMeter::start(target),
        |meter| meter.stop(target),
    )
    .await?;
    finish(&mut report, measured, false);
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
/// cheapest acked event; Herald's clients do one `ping`). Node grows and
/// collects its heap lazily, so 100 connections are opened and closed
/// first (JIT, buffers) before the first reading, and every reading comes
/// after `--settle` of quiet. Same keys as Herald's report.
pub async fn run_socketio(args: &IdleArgs, common: &CommonArgs, peer: &Peer) -> Result<Report> {
    check_conns(args.conns, false)?;
    let (_, pid) = peer.sio.pids()[0].clone();
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
            "warmup_conns": SIO_WARMUP,
        }),
    );
    let sources = common.source_ips();
    let rss = || rss_bytes(pid).context("Socket.IO server RSS from /proc");

    let open = async |range, errors: &mut Errors| {
        open_sio(&url, &sources, range, args.concurrency, errors).await
    };
    // Warm-up.
    let warm = open(0..SIO_WARMUP, &mut Errors::default()).await;
    close_all(warm, args.concurrency).await;
    tokio::time::sleep(args.settle).await;

    let measured = measure(
        args,
        open,
        rss,
        || peer.meter(),
        |meter| meter.stop_with(None),
    )
    .await?;
    finish(&mut report, measured, true);
    Ok(report)
}

/// Connections opened and closed before the first RSS reading of the peer.
const SIO_WARMUP: usize = 100;

/// Opens Socket.IO connections `range` (user `idle-<i>`) to `url`, each from
/// the next source address, `concurrency` at a time, each with one acked
/// round trip.
async fn open_sio(
    url: &str,
    sources: &[std::net::IpAddr],
    range: std::ops::Range<usize>,
    concurrency: usize,
    errors: &mut Errors,
) -> Vec<SioClient> {
    let connect = |i| {
        let auth = json!({ "user": format!("idle-{i}") });
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

/// The readings of one idle run, after the target's own warm-up: the
/// server's RSS (`rss`) before, after half of `--conns`, after all of them
/// and after they closed, each after `--settle` of quiet, and the server CPU
/// the connects cost (between `start_meter` and `stop_meter`). `open` opens
/// a range of connections, counting the ones that failed.
async fn measure<C: Connection>(
    args: &IdleArgs,
    open: impl AsyncFn(std::ops::Range<usize>, &mut Errors) -> Vec<C>,
    rss: impl Fn() -> Result<u64>,
    start_meter: impl FnOnce() -> CpuMeter,
    stop_meter: impl FnOnce(CpuMeter) -> crate::report::CpuPhase,
) -> Result<Measured> {
    let rss_before = rss()?;
    let meter = start_meter();
    let started = Instant::now();
    let half = args.conns / 2;
    let mut errors = Errors::default();
    let mut conns = open(0..half, &mut errors).await;
    tokio::time::sleep(args.settle).await;
    let rss_half = rss()?;
    let opened_half = conns.len();
    conns.extend(open(half..args.conns, &mut errors).await);
    let connect_s = started.elapsed().as_secs_f64() - args.settle.as_secs_f64();
    tokio::time::sleep(args.settle).await;
    let rss_all = rss()?;
    let cpu = stop_meter(meter);
    let opened = conns.len();
    // Still open? (A server that dropped them would make the figure meaningless.)
    let still_open = conns.iter().filter(|c| !c.is_closed()).count();

    let client_rss = rss_bytes(std::process::id()).unwrap_or(0);
    close_all(conns, args.concurrency).await;
    tokio::time::sleep(args.settle).await;
    let rss_after_close = rss()?;
    Ok(Measured {
        wanted: args.conns,
        opened,
        opened_half,
        still_open,
        rss_before,
        rss_half,
        rss_all,
        rss_after_close,
        connect_s,
        client_rss,
        errors,
        cpu,
    })
}

/// What an idle run measured, for [`finish`].
struct Measured {
    wanted: usize,
    opened: usize,
    opened_half: usize,
    still_open: usize,
    rss_before: u64,
    rss_half: u64,
    rss_all: u64,
    rss_after_close: u64,
    connect_s: f64,
    client_rss: u64,
    errors: Errors,
    cpu: crate::report::CpuPhase,
}

/// The `idle` section and failures, the same for every target; `name_errors`
/// adds the error kinds to the failure line.
fn finish(report: &mut Report, m: Measured, name_errors: bool) {
    let kib = |b: f64| round3(b / 1024.0);
    let per_conn = (m.rss_all as f64 - m.rss_before as f64) / m.opened.max(1) as f64;
    let marginal =
        (m.rss_all as f64 - m.rss_half as f64) / (m.opened - m.opened_half).max(1) as f64;
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
    let mib = |b: u64| round3(b as f64 / (1 << 20) as f64);
    report.section(
        "idle",
        Section::new()
            .put("conns", m.opened)
            .put("open_at_end", m.still_open)
            .put("rss_kib_per_conn", kib(per_conn))
            .put("rss_kib_per_conn_second_half", kib(marginal))
            .put("bar_kib_per_conn", 4.0)
            .put("edge_rss_mib_before", mib(m.rss_before))
            .put("edge_rss_mib_half", mib(m.rss_half))
            .put("edge_rss_mib_all", mib(m.rss_all))
            .put("edge_rss_mib_after_close", mib(m.rss_after_close))
            .put(
                "connects_per_sec",
                round3(m.opened as f64 / m.connect_s.max(1e-3)),
            )
            .put(
                "edge_cpu_us_per_connect",
                round3(m.cpu.herald_s() * 1e6 / m.opened.max(1) as f64),
            )
            .put(
                "bench_rss_kib_per_conn",
                Value::from(kib(m.client_rss as f64 / m.opened.max(1) as f64)),
            )
            .put("errors", m.errors.total())
            .put("error_kinds", m.errors.to_json()),
    );
    report.cpu.push(("connect and ping".into(), m.cpu));
}
