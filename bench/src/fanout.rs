//! `fanout`: publish through the gRPC API, delivered to many members.
//!
//! `--rooms` rooms (`fan:room-<r>`) of `--members` members each; member `j`
//! of room `r` is user `fan-<g>` (`g = r * members + j`) connected to edge
//! `g % edges`, so every room spans every edge. One publisher calls
//! `herald.v1.Router/Publish` at a fixed rate (`--rates`, messages a
//! second, one step per rate), rooms in turn, for `--duration` per step, each
//! call a task of its own (at most `--max-in-flight` at once). The payload
//! is `{"s":<step>,"t":<ns since the epoch when the call was made>,"i":<n>}`;
//! every receiver takes its clock when the frame is parsed, so the latency
//! is publish call → delivered to the client, across gRPC, the router,
//! NATS (or the in-memory broker) and the edge.
//!
//! Per step: deliveries expected (successful publishes × members) and
//! received, latency p50/p99/p99.9, and the CPU of the Herald processes and
//! nats-server over the step (publishing plus the drain afterwards) per
//! delivered message. With `--floor`, the bare-write floor (see `floor`) is
//! measured first at the same number of connections and the same
//! deliveries per second, and each step reports its ratio to it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Args;
use futures::StreamExt as _;
use herald_client::Client;
use herald_proto::v1::PublishRequest;
use herald_proto::v1::router_client::RouterClient;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::floor::{self, FloorResult, Phase};
use crate::load::Dialer;
use crate::peer::Peer;
use crate::report::{CpuMeter, Errors, Latency, Report, Section, round3};
use crate::socketio::{Emit, OnEvent, SioClient, SioEvent};
use crate::target::{CommonArgs, Target};

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Rooms; the publisher takes them in turn.
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// Members of each room (each its own connection and user).
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Publishes per second; a comma-separated list runs one step per rate
    /// (`--rate` is the same option).
    #[arg(
        long = "rates",
        alias = "rate",
        value_delimiter = ',',
        default_value = "200"
    )]
    pub rates: Vec<f64>,
    /// How long each step publishes, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Publish calls in flight at most; the rate drops when they are all busy.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// After a step, how long to wait for the last deliveries once they stop
    /// coming.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Also measure the bare-write floor at the same connections and
    /// deliveries per second, and report each step's ratio to it.
    #[arg(long)]
    pub floor: bool,
    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
}

/// Deliveries of one step.
#[derive(Default)]
struct StepStats {
    delivered: u64,
    latency: Latency,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

pub async fn run(args: &FanoutArgs, common: &CommonArgs, target: &Target) -> Result<Report> {
    if args.rooms == 0 || args.members == 0 || args.rates.is_empty() {
        bail!("--rooms, --members and --rates must not be empty");
    }
    if args.rates.iter().any(|r| r.is_nan() || *r <= 0.0) {
        bail!("every rate must be above 0");
    }
    let conns = args.rooms * args.members;
    let limit = crate::idle::raise_fd_limit();
    if conns as u64 * if args.floor { 2 } else { 1 } + 200 > limit {
        bail!("{conns} connections need more open files than this process may have ({limit})");
    }
    let grpc = target
        .router_grpc
        .context("the target serves no Router API")?;
    let mut report = Report::new(
        "fanout",
        target.kind.as_str(),
        target.describe(),
        json!({
            "edges": target.edge_urls.len(),
            "rooms": args.rooms,
            "members": args.members,
            "conns": conns,
            "rates": args.rates,
            "duration_s": args.duration.as_secs_f64(),
            "max_in_flight": args.max_in_flight,
            "floor": args.floor,
            "source_addrs": common.source_addrs,
        }),
    );

    // The floor first, while Herald is idle.
    let floors = measure_floors(args, conns, common, &mut report).await?;

    // Members.
    let dialer = Dialer::new(target.edge_urls.clone(), common.source_ips());
    let edges = dialer.edges();
    let started = Instant::now();
    let opened: Vec<_> = futures::stream::iter(0..conns)
        .map(|g| {
            let token = target.token(&format!("fan-{g}"));
            let room = format!("fan:room-{}", g / args.members);
            let dialer = &dialer;
            async move {
                let (client, _) = dialer
                    .connect(g % edges, &token)
                    .await
                    .map_err(|e| ("connect", e.to_string()))?;
                match client.request(json!({"op": "join", "room": room})).await {
                    Ok(r) if r["op"] == "ok" => Ok((g, client)),
                    Ok(r) => Err(("join", r.to_string())),
                    Err(e) => Err(("join", e.to_string())),
                }
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let mut errors = Errors::default();
    let mut members_of = vec![0u64; args.rooms];
    let mut clients = Vec::with_capacity(conns);
    for r in opened {
        match r {
            Ok((g, c)) => {
                members_of[g / args.members] += 1;
                clients.push(c);
            }
            Err((stage, e)) => errors.add_kind(&format!("{stage}: failed"), &e),
        }
    }
    let setup_s = started.elapsed().as_secs_f64();
    if clients.len() < conns {
        report.failures.push(format!(
            "{} of {conns} members could not connect and join: {}",
            conns - clients.len(),
            errors.to_json()
        ));
    }

    // Receivers: one task per member, all steps (the last slot is the warm-up).
    let warm = args.rates.len();
    let stats: Arc<Vec<Mutex<StepStats>>> =
        Arc::new((0..=warm).map(|_| Mutex::default()).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let receivers: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(receive(c, stats.clone(), stop.clone())))
        .collect();
    let delivered = |step: usize| stats[step].lock().expect("stats lock").delivered;

    let mut router = RouterClient::connect(format!("http://{grpc}"))
        .await
        .with_context(|| format!("gRPC connect to the router at {grpc}"))?;

    // Warm-up: one message per room, until every member has it.
    let expected_warm: u64 = members_of.iter().sum();
    for r in 0..args.rooms {
        let req = PublishRequest {
            room: format!("fan:room-{r}"),
            data: json!({"s": warm, "t": now_ns(), "i": r}).to_string(),
            key: String::new(),
        };
        router
            .publish(req)
            .await
            .context("warm-up Router.Publish")?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while delivered(warm) < expected_warm && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if delivered(warm) < expected_warm {
        report.failures.push(format!(
            "warm-up: {} of {expected_warm} deliveries within 10 s",
            delivered(warm)
        ));
    }
    report.section(
        "setup",
        Section::new()
            .put("members", expected_warm)
            .put("setup_s", round3(setup_s))
            .put("warmup_delivered", delivered(warm))
            .put("errors", errors.total())
            .put("error_kinds", errors.to_json()),
    );

    for (step, &rate) in args.rates.iter().enumerate() {
        let meter = CpuMeter::start(target);
        let pubs = publish(args, &router, step, rate).await;
        let window = pubs.window_s;
        let expected: u64 = pubs
            .ok_by_room
            .iter()
            .zip(&members_of)
            .map(|(ok, m)| ok * m)
            .sum();
        // Drain: until everything arrived, or nothing came for drain_timeout.
        let mut last = delivered(step);
        let mut last_change = Instant::now();
        while last < expected && last_change.elapsed() < args.drain_timeout {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = delivered(step);
            if now != last {
                last = now;
                last_change = Instant::now();
            }
        }
        let cpu = meter.stop(target);
        let (got, latency) = {
            let s = stats[step].lock().expect("stats lock");
            (s.delivered, s.latency.clone())
        };
        let herald_s = cpu.herald_s();
        let nats_s = cpu.nats_s().unwrap_or(0.0);
        let per = |s: f64| round3(s * 1e6 / got.max(1) as f64);
        let server_us = per(herald_s + nats_s);
        let mut section = Section::new()
            .put("rate", rate)
            .put("publishes", pubs.sent)
            .put("publishes_ok", pubs.ok_by_room.iter().sum::<u64>())
            .put("publish_rate", round3(pubs.sent as f64 / window))
            .put("publish_errors", pubs.errors.total())
            .put("publish_error_kinds", pubs.errors.to_json())
            .put("expected", expected)
            .put("delivered", got)
            .put("lost", expected.saturating_sub(got))
            .put("extra", got.saturating_sub(expected))
            .put("delivered_per_sec", round3(got as f64 / window))
            .put("latency_ms", latency.summary())
            .put("publish_call_ms", pubs.call.summary())
            .put("herald_cpu_s", round3(herald_s))
            .put("nats_cpu_s", round3(nats_s))
            .put("herald_us_per_delivery", per(herald_s))
            .put("nats_us_per_delivery", per(nats_s))
            .put("server_us_per_delivery", server_us)
            .put("bench_cpu_s", round3(cpu.load_s()));
        if let Some(f) = &floors[step] {
            section = section
                .put("floor_us_per_write", round3(f.us_per_write()))
                .put(
                    "ratio_to_floor",
                    json!((f.cpu_s() > 0.0).then(|| round3(server_us / f.us_per_write()))),
                );
        }
        if got < expected {
            report.notes.push(format!(
                "rate {rate}/s: {} of {expected} deliveries missing",
                expected - got
            ));
        }
        report.section(&format!("rate_{}", fmt_rate(rate)), section);
        report.cpu.push((format!("rate {rate}/s"), cpu));
    }

    stop.store(true, Ordering::Relaxed);
    for r in receivers {
        if let Ok(client) = r.await {
            let _ = client.close().await;
        }
    }
    Ok(report)
}

/// With `--floor`, the bare-write floor at the same connections and
/// deliveries per second as each step (a section `floor_<rate>` each).
async fn measure_floors(
    args: &FanoutArgs,
    conns: usize,
    common: &CommonArgs,
    report: &mut Report,
) -> Result<Vec<Option<FloorResult>>> {
    let mut floors: Vec<Option<FloorResult>> = vec![None; args.rates.len()];
    if !args.floor {
        return Ok(floors);
    }
    let phases: Vec<Phase> = args
        .rates
        .iter()
        .map(|rate| {
            // Each round writes once to every connection: as many
            // deliveries a second as the step.
            let round_rate = rate * args.members as f64 / conns as f64;
            Phase {
                frames_per_write: 1,
                rounds: ((round_rate * args.duration.as_secs_f64()).ceil() as u64).max(1),
                round_rate,
            }
        })
        .collect();
    let (results, errors) = floor::measure(conns, &phases, &common.source_ips()).await?;
    if errors.total() > 0 {
        report
            .notes
            .push(format!("floor receivers: {}", errors.to_json()));
    }
    for (i, r) in results.into_iter().enumerate() {
        report.section(&format!("floor_{}", fmt_rate(args.rates[i])), r.section());
        floors[i] = Some(r);
    }
    Ok(floors)
}

fn fmt_rate(rate: f64) -> String {
    if rate.fract() == 0.0 {
        format!("{rate:.0}")
    } else {
        rate.to_string().replace('.', "_")
    }
}

struct Published {
    sent: u64,
    ok_by_room: Vec<u64>,
    errors: Errors,
    call: Latency,
    /// From the first call to the end of the last.
    window_s: f64,
}

/// Publishes at `rate` for `args.duration`, rooms in turn.
async fn publish(
    args: &FanoutArgs,
    router: &RouterClient<tonic::transport::Channel>,
    step: usize,
    rate: f64,
) -> Published {
    let total = ((rate * args.duration.as_secs_f64()).round() as u64).max(1);
    let permits = Arc::new(Semaphore::new(args.max_in_flight.max(1)));
    let start = tokio::time::Instant::now();
    let mut calls = Vec::with_capacity(total as usize);
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        let mut router = router.clone();
        let room = (i % args.rooms as u64) as usize;
        calls.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let req = PublishRequest {
                room: format!("fan:room-{room}"),
                data: format!(r#"{{"s":{step},"t":{},"i":{i}}}"#, now_ns()),
                key: String::new(),
            };
            let res = router.publish(req).await;
            drop(permit);
            (room, res.map(|_| ()), t0.elapsed())
        }));
    }
    let mut out = Published {
        sent: total,
        ok_by_room: vec![0; args.rooms],
        errors: Errors::default(),
        call: Latency::default(),
        window_s: 0.0,
    };
    for c in calls {
        match c.await {
            Ok((room, Ok(()), d)) => {
                out.ok_by_room[room] += 1;
                out.call.record(d);
            }
            Ok((_, Err(status), _)) => out
                .errors
                .add_kind(&format!("{:?}", status.code()), status.message()),
            Err(e) => out.errors.add_kind("task", &e.to_string()),
        }
    }
    out.window_s = start.elapsed().as_secs_f64();
    out
}

/// Reads one member's frames until `stop`; records each `message`'s
/// latency in its step. Returns the client for a clean close.
async fn receive(
    client: Client,
    stats: Arc<Vec<Mutex<StepStats>>>,
    stop: Arc<AtomicBool>,
) -> Client {
    loop {
        match client.next_frame(Duration::from_millis(200)).await {
            Ok(Some(frame)) if frame["op"] == "message" => {
                let now = now_ns();
                let data = &frame["data"];
                let (Some(step), Some(t)) = (data["s"].as_u64(), data["t"].as_u64()) else {
                    continue;
                };
                if let Some(s) = stats.get(step as usize) {
                    let mut s = s.lock().expect("stats lock");
                    s.delivered += 1;
                    s.latency
                        .record(Duration::from_nanos(now.saturating_sub(t)));
                }
            }
            Ok(Some(_)) => {}
            Ok(None) if stop.load(Ordering::Relaxed) => return client,
            Ok(None) => {}
            Err(_) => return client,
        }
    }
}

/// `fanout --target socketio`: the same rooms and members as Herald's
/// (member `g` of room `r` is user `fan-<g>` on server `g % servers`; it
/// joins `fan:room-<r>` through its CONNECT's `auth.rooms`), published to by
/// the Redis emitter (`emitter.js`, one Redis PUBLISH per message, the way
/// a backend publishes through Herald's gRPC API). Each step runs one
/// emitter per room at `rate / rooms` for `--duration`, all at once; the
/// event's name is `s<step>`, so every delivery counts in its step. The
/// latency is the emitter's send time (`ts_us`) → parsed by the receiver.
/// CPU per delivery: the Socket.IO servers (`herald_*` keys, so that the
/// reports compare key for key) and Redis (`nats_*`, the broker), over the
/// step and its drain; the emitters' own CPU is `publisher_cpu_s`.
pub async fn run_socketio(args: &FanoutArgs, common: &CommonArgs, peer: &Peer) -> Result<Report> {
    if args.rooms == 0 || args.members == 0 || args.rates.is_empty() {
        bail!("--rooms, --members and --rates must not be empty");
    }
    if args.rates.iter().any(|r| r.is_nan() || *r <= 0.0) {
        bail!("every rate must be above 0");
    }
    let conns = args.rooms * args.members;
    let limit = crate::idle::raise_fd_limit();
    if conns as u64 * if args.floor { 2 } else { 1 } + 200 > limit {
        bail!("{conns} connections need more open files than this process may have ({limit})");
    }
    let urls = peer.sio.urls();
    let mut report = Report::new(
        "fanout",
        "socketio",
        peer.describe(),
        json!({
            "edges": urls.len(),
            "rooms": args.rooms,
            "members": args.members,
            "conns": conns,
            "rates": args.rates,
            "duration_s": args.duration.as_secs_f64(),
            "floor": args.floor,
            "source_addrs": common.source_addrs,
            "redis_url": peer.sio.redis_url(),
            "publisher": "emitter.js (@socket.io/redis-emitter), one per room",
        }),
    );
    if peer.sio.redis_pid().is_none() {
        report
            .notes
            .push("Redis's pid is unknown: its CPU is not counted".into());
    }

    // The floor first, while the peer is idle.
    let floors = measure_floors(args, conns, common, &mut report).await?;

    // Receivers: the reader task of each connection counts into the step
    // named by the event (the last slot is the warm-up).
    let warm = args.rates.len();
    let stats: Arc<Vec<Mutex<StepStats>>> =
        Arc::new((0..=warm).map(|_| Mutex::default()).collect());
    let on_event: OnEvent = {
        let stats = stats.clone();
        Arc::new(move |event: SioEvent| {
            let Some(step) = event
                .name
                .strip_prefix('s')
                .and_then(|s| s.parse::<usize>().ok())
            else {
                return;
            };
            let latency = event.latency();
            if let (Some(s), Some(latency)) = (stats.get(step), latency) {
                let mut s = s.lock().expect("stats lock");
                s.delivered += 1;
                s.latency.record(latency);
            }
        })
    };
    let delivered = |step: usize| stats[step].lock().expect("stats lock").delivered;

    // Members.
    let sources = common.source_ips();
    let started = Instant::now();
    let opened: Vec<_> = futures::stream::iter(0..conns)
        .map(|g| {
            let url = urls[g % urls.len()].clone();
            let auth = json!({
                "user": format!("fan-{g}"),
                "rooms": format!("fan:room-{}", g / args.members),
            });
            let source = sources[g % sources.len()];
            let on_event = on_event.clone();
            async move {
                SioClient::connect(&url, &auth, Some(source), on_event)
                    .await
                    .map(|c| (g, c))
                    .map_err(|e| ("connect", e.to_string()))
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let mut errors = Errors::default();
    let mut members_of = vec![0u64; args.rooms];
    let mut clients = Vec::with_capacity(conns);
    for r in opened {
        match r {
            Ok((g, c)) => {
                members_of[g / args.members] += 1;
                clients.push(c);
            }
            Err((stage, e)) => errors.add_kind(&format!("{stage}: failed"), &e),
        }
    }
    let setup_s = started.elapsed().as_secs_f64();
    if clients.len() < conns {
        report.failures.push(format!(
            "{} of {conns} members could not connect and join: {}",
            conns - clients.len(),
            errors.to_json()
        ));
    }

    // Warm-up: one message per room, until every member has it.
    let expected_warm: u64 = members_of.iter().sum();
    let warm_emits = (0..args.rooms).map(|r| {
        let emit = Emit {
            event: format!("s{warm}"),
            ..Emit::new(&format!("fan:room-{r}"), 10.0, Duration::from_millis(100))
        };
        async move { peer.sio.emit_with(&emit).await }
    });
    for r in futures::future::join_all(warm_emits).await {
        r.context("warm-up emit")?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while delivered(warm) < expected_warm && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if delivered(warm) < expected_warm {
        report.failures.push(format!(
            "warm-up: {} of {expected_warm} deliveries within 10 s",
            delivered(warm)
        ));
    }
    report.section(
        "setup",
        Section::new()
            .put("members", expected_warm)
            .put("setup_s", round3(setup_s))
            .put("warmup_delivered", delivered(warm))
            .put("errors", errors.total())
            .put("error_kinds", errors.to_json()),
    );

    for (step, &rate) in args.rates.iter().enumerate() {
        let meter = peer.meter();
        let per_room = rate / args.rooms as f64;
        let emits = (0..args.rooms).map(|r| {
            let emit = Emit {
                event: format!("s{step}"),
                ..Emit::new(&format!("fan:room-{r}"), per_room, args.duration)
            };
            async move { peer.sio.emit_with(&emit).await }
        });
        let mut sent_by_room = vec![0u64; args.rooms];
        let mut pub_errors = Errors::default();
        let mut window = 0f64;
        let mut publisher_cpu = 0f64;
        for (r, res) in futures::future::join_all(emits)
            .await
            .into_iter()
            .enumerate()
        {
            match res {
                Ok(e) => {
                    sent_by_room[r] = e.sent;
                    window = window.max(e.elapsed.as_secs_f64());
                    publisher_cpu += e.cpu_user_s + e.cpu_system_s;
                }
                Err(e) => pub_errors.add_kind("emitter", &format!("{e:#}")),
            }
        }
        let window = window.max(1e-3);
        let sent: u64 = sent_by_room.iter().sum();
        let expected: u64 = sent_by_room
            .iter()
            .zip(&members_of)
            .map(|(ok, m)| ok * m)
            .sum();
        // Drain: until everything arrived, or nothing came for drain_timeout.
        let mut last = delivered(step);
        let mut last_change = Instant::now();
        while last < expected && last_change.elapsed() < args.drain_timeout {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = delivered(step);
            if now != last {
                last = now;
                last_change = Instant::now();
            }
        }
        let cpu = meter.stop_with(None);
        let (got, latency) = {
            let s = stats[step].lock().expect("stats lock");
            (s.delivered, s.latency.clone())
        };
        let servers_s = cpu.herald_s();
        let redis_s = cpu.nats_s().unwrap_or(0.0);
        let per = |s: f64| round3(s * 1e6 / got.max(1) as f64);
        let server_us = per(servers_s + redis_s);
        let mut section = Section::new()
            .put("rate", rate)
            .put("publishes", sent)
            .put("publishes_ok", sent)
            .put("publish_rate", round3(sent as f64 / window))
            .put("publish_errors", pub_errors.total())
            .put("publish_error_kinds", pub_errors.to_json())
            .put("expected", expected)
            .put("delivered", got)
            .put("lost", expected.saturating_sub(got))
            .put("extra", got.saturating_sub(expected))
            .put("delivered_per_sec", round3(got as f64 / window))
            .put("latency_ms", latency.summary())
            .put("herald_cpu_s", round3(servers_s))
            .put("nats_cpu_s", round3(redis_s))
            .put("herald_us_per_delivery", per(servers_s))
            .put("nats_us_per_delivery", per(redis_s))
            .put("server_us_per_delivery", server_us)
            .put("bench_cpu_s", round3(cpu.load_s()))
            .put("publisher_cpu_s", round3(publisher_cpu));
        if let Some(f) = &floors[step] {
            section = section
                .put("floor_us_per_write", round3(f.us_per_write()))
                .put(
                    "ratio_to_floor",
                    json!((f.cpu_s() > 0.0).then(|| round3(server_us / f.us_per_write()))),
                );
        }
        if pub_errors.total() > 0 {
            report.failures.push(format!(
                "rate {rate}/s: emitter failed: {}",
                pub_errors.to_json()
            ));
        }
        if got < expected {
            report.notes.push(format!(
                "rate {rate}/s: {} of {expected} deliveries missing",
                expected - got
            ));
        }
        report.section(&format!("rate_{}", fmt_rate(rate)), section);
        report.cpu.push((format!("rate {rate}/s"), cpu));
    }

    futures::stream::iter(clients)
        .for_each_concurrent(args.concurrency.max(1), |c| async move {
            let _ = c.close().await;
        })
        .await;
    Ok(report)
}
