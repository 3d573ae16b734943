//! `fanout`: publish through the gRPC API, delivered to many members.
//!
//! `--rooms` rooms (`fan:room-<r>`) of `--members` members each; member `j`
//! of room `r` is user `fan-<g>` (`g = r * members + j`) connected to edge
//! `g % edges`, so every room spans every edge. One publisher calls
//! `herald.v1.Router/Publish` at a fixed rate (`--rates`, messages a
//! second, one step per rate), rooms in turn, for `--duration` per step, each
//! call a task of its own (at most `--max-in-flight` at once). The payload
//! is `{"s":<step>,"t":<ns since the epoch when the call was made>,"i":<n>}`;
//! every receiver takes its clock when the frame is read, so the latency
//! is publish call → delivered to the client, across gRPC, the router,
//! NATS (or the in-memory broker) and the edge; `i` (publish `i` goes to
//! room `i % rooms`) tells each receiver which of its room's messages it
//! got, so a step reports missing, duplicated and out-of-order deliveries
//! per receiver ([`crate::arrivals`]).
//!
//! Per step: deliveries expected (successful publishes × members) and
//! received, latency p50/p99/p99.9, and the CPU of the Herald processes and
//! nats-server over the step (publishing plus the drain afterwards) per
//! delivered message. With `--floor`, the bare-write floor (see `floor`) is
//! measured first at the same number of connections and the same
//! deliveries per second, once with a `write` per delivery and once through
//! io_uring, and each step reports its ratio to both.
//!
//! `--vs-socketio` runs the same steps against the Socket.IO peer, round by
//! round with Herald's ([`run_alternating`]).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use futures::StreamExt as _;
use herald_client::Client;
use herald_proto::v1::router_client::RouterClient;
use herald_proto::v1::{PublishBatchRequest, PublishRequest};
use serde_json::json;

use crate::arrivals::Due;
use crate::compare::median;
use crate::delivery::{self, Members, Pacing, Published, StepOutcome, Steps, fmt_rate, now_ns};
use crate::floor::{self, FloorResult, Phase};
use crate::load::Dialer;
use crate::peer::Peer;
use crate::procfs::cpu_sample;
use crate::report::{Errors, Report, Section, round3};
use crate::socketio::{Emit, SioClient};
use crate::target::{CommonArgs, CpuProbe, Target};

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
    #[command(flatten)]
    pub pacing: Pacing,
    /// Also measure the bare-write floor at the same connections and
    /// deliveries per second, and report each step's ratio to it.
    #[arg(long)]
    pub floor: bool,
    /// With `--floor`, also the batched-send floor: io_uring, this many
    /// sends per submission (`floor_uring_<r>`, `ratio_to_floor_uring`); 0
    /// leaves it out.
    #[arg(long, default_value_t = floor::URING_BATCH)]
    pub floor_uring_batch: usize,
    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
    /// Messages per `Router.PublishBatch` call (the rate stays messages per
    /// second); 1 calls `Router.Publish` for each message. Herald only.
    #[arg(long, default_value_t = 1)]
    pub publish_batch: u64,
    /// Runs the list of rates this many times and adds each rate's median
    /// over the runs (`median_<r>`). The machine's speed drifts from one
    /// minute to the next; repeated steps, each right after its own floor,
    /// keep a figure from resting on one sample.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub repeat: u32,
}

/// One step of a run: a rate, in round `run` (from 1) of `--repeat`.
#[derive(Debug, Clone, Copy)]
struct Step {
    index: usize,
    rate: f64,
    run: u32,
}

impl Step {
    /// `<r>`, or `<r>_run<k>` after the first round.
    fn name(&self) -> String {
        if self.run > 1 {
            format!("{}_run{}", fmt_rate(self.rate), self.run)
        } else {
            fmt_rate(self.rate)
        }
    }
}

impl FanoutArgs {
    /// The members of one system, once the shape is checked for `systems`
    /// systems connected at once (with `--floor` the floor's receivers need
    /// a socket each as well).
    fn conns(&self, systems: u64) -> Result<usize> {
        let sockets = systems + u64::from(self.floor);
        delivery::check_shape(self.rooms, self.members, &self.rates, sockets)
    }

    /// Every step in order: the rates, `--repeat` times over.
    fn schedule(&self) -> Vec<Step> {
        (1..=self.repeat)
            .flat_map(|run| self.rates.iter().map(move |&rate| (run, rate)))
            .enumerate()
            .map(|(index, (run, rate))| Step { index, rate, run })
            .collect()
    }
}

/// `fanout` against Herald.
pub async fn run(args: &FanoutArgs, common: &CommonArgs, target: &Target) -> Result<Report> {
    let conns = args.conns(1)?;
    // The floor's receivers connect first, while Herald is idle.
    let mut floors = Floors::start(args, conns, common, 1).await?;
    let mut herald = HeraldSide::open(args, common, target, conns).await?;
    for step in args.schedule() {
        herald.step(step, &mut floors).await?;
    }
    floors.finish([&mut herald.report]).await;
    Ok(herald.close().await)
}

/// `fanout --target socketio`: the same steps against the Socket.IO peer
/// (see [`SocketioSide`]).
pub async fn run_socketio(args: &FanoutArgs, common: &CommonArgs, peer: &Peer) -> Result<Report> {
    let conns = args.conns(1)?;
    // The floor's receivers connect first, while the peer is idle.
    let mut floors = Floors::start(args, conns, common, 1).await?;
    let mut socketio = SocketioSide::open(args, common, peer, conns).await?;
    for step in args.schedule() {
        socketio.step(step, &mut floors).await?;
    }
    floors.finish([&mut socketio.report]).await;
    Ok(socketio.close().await)
}

/// `fanout --vs-socketio`: Herald and Socket.IO round by round: round 1 of
/// the rates against Herald, round 1 against Socket.IO, round 2 against
/// Herald, ..., each step right after a floor of its own; returns both
/// reports.
///
/// Both systems are started once and keep their members connected
/// throughout; only the one whose round it is publishes. Restarting each
/// system for every round would not be fairer: a fresh Node process runs
/// its first round with V8's code not yet optimised (Herald's is compiled
/// ahead of time), and every round would pay a cluster start and two sets
/// of connects, minutes at full size. What an idle system costs the other
/// is small and charged to neither: its connections' heartbeats (a ping per
/// connection every 25 s for Socket.IO, every heartbeat interval for
/// Herald), whose CPU counts against the idle system's processes, not the
/// measured one's. Nor does holding both fit badly on the machine: at the
/// full size (1 room × 1,000 members, with the floor's 1,000 receivers) the
/// bench holds 3,000 sockets and each system 1,000, far from the 20,000
/// open files a process may have, and a few tens of MiB of memory each.
///
/// Before each round the bench waits until the other system's servers are
/// idle again ([`settle`]), so that the backlog of an overloaded step does
/// not run during the other system's next one.
///
/// Alternating keeps a drift of the machine's speed (other work, thermal
/// state, the page cache) from landing on one system's whole schedule: each
/// system's round is minutes from the other's, not a whole run apart, and
/// the floor before each step, divided into that step's CPU per delivery,
/// takes out what drift remains (the compare report's `floor_normalised`).
pub async fn run_alternating(
    args: &FanoutArgs,
    common: &CommonArgs,
    target: &Target,
    peer: &Peer,
) -> Result<(Report, Report)> {
    let conns = args.conns(2)?;
    let mut floors = Floors::start(args, conns, common, 2).await?;
    let mut herald = HeraldSide::open(args, common, target, conns).await?;
    let mut socketio = SocketioSide::open(args, common, peer, conns).await?;
    let schedule = args.schedule();
    let herald_servers = servers(target.cpu_probes());
    let socketio_servers = servers(peer.servers());
    for run in 1..=args.repeat {
        let round: Vec<Step> = schedule.iter().copied().filter(|s| s.run == run).collect();
        settle(&socketio_servers, "Socket.IO's", run, &mut herald.report).await;
        for &step in &round {
            herald.step(step, &mut floors).await?;
        }
        settle(&herald_servers, "Herald's", run, &mut socketio.report).await;
        for &step in &round {
            socketio.step(step, &mut floors).await?;
        }
    }
    for report in [&mut herald.report, &mut socketio.report] {
        report.params.insert(
            "alternated".into(),
            "round by round with the other system, both connected throughout".into(),
        );
    }
    floors
        .finish([&mut herald.report, &mut socketio.report])
        .await;
    Ok((herald.close().await, socketio.close().await))
}

/// The pids of a system's server processes (its broker's included), not
/// the bench's.
fn servers(probes: Vec<CpuProbe>) -> Vec<u32> {
    probes
        .into_iter()
        .filter(|p| p.role.is_some())
        .map(|p| p.pid)
        .collect()
}

/// Below this share of a core the other system counts as idle.
const QUIET_SHARE: f64 = 0.05;
/// How long the other system may take to become idle.
const QUIET_TIMEOUT: Duration = Duration::from_secs(10);

/// Before a round, waits until the other system's servers (`pids`, `whose`)
/// have finished what its own round left them (a step that overloaded it
/// leaves a backlog that would otherwise run during this one): until they
/// use less than [`QUIET_SHARE`] of a core over 200 ms, at most
/// [`QUIET_TIMEOUT`]; if they never do, round `run` of `report` says so.
async fn settle(pids: &[u32], whose: &str, run: u32, report: &mut Report) {
    let window = Duration::from_millis(200);
    let started = Instant::now();
    loop {
        let before: Vec<_> = pids.iter().map(|&p| cpu_sample(p)).collect();
        tokio::time::sleep(window).await;
        let used: f64 = pids
            .iter()
            .zip(&before)
            .filter_map(|(&p, b)| Some(cpu_sample(p)?.since(b.as_ref()?).secs()))
            .sum();
        let share = used / window.as_secs_f64();
        if share < QUIET_SHARE {
            return;
        }
        if started.elapsed() >= QUIET_TIMEOUT {
            report.notes.push(format!(
                "round {run} began with {whose} servers still busy ({:.0} % of a core) \
                 {} s after their own round",
                share * 100.0,
                QUIET_TIMEOUT.as_secs()
            ));
            return;
        }
    }
}

/// Herald's side of a run: the members connected and warmed up, and the
/// router to publish through.
struct HeraldSide<'a> {
    args: &'a FanoutArgs,
    target: &'a Target,
    router: RouterClient<tonic::transport::Channel>,
    steps: Steps,
    members: Members<Client>,
    report: Report,
}

impl<'a> HeraldSide<'a> {
    /// Connects the members and warms them up.
    async fn open(
        args: &'a FanoutArgs,
        common: &CommonArgs,
        target: &'a Target,
        conns: usize,
    ) -> Result<HeraldSide<'a>> {
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
                "duration_s": args.pacing.duration.as_secs_f64(),
                "max_in_flight": args.pacing.max_in_flight,
                "publish_batch": args.publish_batch,
                "repeat": args.repeat,
                "floor": args.floor,
                "floor_uring_batch": args.floor_uring_batch,
                "source_addrs": common.source_addrs,
            }),
        );

        // Members, counting each step's deliveries (the last slot is the
        // warm-up).
        let warm = args.schedule().len();
        let steps = Steps::new(warm + 1, conns);
        let dialer = Dialer::new(target.edge_urls.clone(), common.source_ips());
        let members = delivery::open_members(
            target,
            &dialer,
            ("fan", "fan:room"),
            (args.rooms, args.members),
            (args.concurrency, &steps),
            &mut report,
        )
        .await;

        let mut router = RouterClient::connect(format!("http://{grpc}"))
            .await
            .with_context(|| format!("gRPC connect to the router at {grpc}"))?;

        // Warm-up: one message per room, until every member has it.
        let expected_warm: u64 = members.members_of.iter().sum();
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
        steps
            .warm_up(warm, expected_warm, &members, &mut report)
            .await;
        Ok(HeraldSide {
            args,
            target,
            router,
            steps,
            members,
            report,
        })
    }

    /// Runs `step`, after its floor.
    async fn step(&mut self, step: Step, floors: &mut Floors) -> Result<()> {
        let floor = floors.before(step, &mut self.report).await?;
        let outcome = StepOutcome::measure(
            self.target,
            &self.steps,
            (step.index, step.rate),
            &self.members,
            self.args.pacing.drain_timeout,
            publish(self.args, &self.router, step.index, step.rate),
        )
        .await;
        let section = with_floor(outcome.section(), &outcome, &floor);
        outcome.push_run(&mut self.report, section, step.run);
        Ok(())
    }

    /// Adds the medians and closes the members.
    async fn close(mut self) -> Report {
        add_medians(&mut self.report, self.args);
        let clients = std::mem::take(&mut self.members.clients).into_iter();
        delivery::close_all(clients.map(|(_, c)| c), self.args.concurrency).await;
        self.report
    }
}

/// With `--floor`, the bare-write floor at the same connections and
/// deliveries per second as each step, measured right before it (a
/// section `floor_<r>` each, and `floor_uring_<r>` for io_uring), so that
/// both see the machine as it is then.
struct Floors {
    writer: Option<floor::Writer>,
    uring_batch: usize,
    members: usize,
    conns: usize,
    duration_s: f64,
}

/// The floors measured before one step.
#[derive(Default)]
struct StepFloors {
    write: Option<FloorResult>,
    uring: Option<FloorResult>,
}

impl Floors {
    /// Connects the floor's receivers (nothing without `--floor`), for the
    /// steps of `systems` systems.
    async fn start(
        args: &FanoutArgs,
        conns: usize,
        common: &CommonArgs,
        systems: usize,
    ) -> Result<Floors> {
        if args.floor_uring_batch > floor::MAX_URING_BATCH {
            anyhow::bail!("--floor-uring-batch is at most {}", floor::MAX_URING_BATCH);
        }
        let writer = if args.floor {
            let per_step = 1 + usize::from(args.floor_uring_batch > 0);
            let phases = systems * args.schedule().len() * per_step;
            Some(floor::Writer::start(conns, &common.source_ips(), phases).await?)
        } else {
            None
        };
        Ok(Floors {
            writer,
            uring_batch: args.floor_uring_batch,
            members: args.members,
            conns,
            duration_s: args.pacing.duration.as_secs_f64(),
        })
    }

    /// The floors at `step`'s deliveries per second.
    async fn before(&mut self, step: Step, report: &mut Report) -> Result<StepFloors> {
        let Some(writer) = &mut self.writer else {
            return Ok(StepFloors::default());
        };
        // Each round writes once to every connection: as many deliveries
        // a second as the step.
        let round_rate = step.rate * self.members as f64 / self.conns as f64;
        let phase = |send| Phase {
            frames_per_write: 1,
            rounds: ((round_rate * self.duration_s).ceil() as u64).max(1),
            round_rate,
            send,
        };
        let mut floors = StepFloors::default();
        if let Some(r) = writer.phase(phase(floor::Send::Write)).await? {
            report.section(&format!("floor_{}", step.name()), r.section());
            floors.write = Some(r);
        }
        if self.uring_batch > 0 {
            let send = floor::Send::Uring {
                batch: self.uring_batch,
            };
            if let Some(r) = writer.phase(phase(send)).await? {
                report.section(&format!("floor_uring_{}", step.name()), r.section());
                floors.uring = Some(r);
            }
        }
        Ok(floors)
    }

    /// Stops the writer; its receivers' errors, and why the io_uring floor
    /// is missing if it is, go to the notes of `reports`.
    async fn finish<'r>(self, reports: impl IntoIterator<Item = &'r mut Report>) {
        let Some(writer) = self.writer else {
            return;
        };
        let uring = (self.uring_batch > 0)
            .then(|| writer.uring_unavailable().map(floor::uring_note))
            .flatten();
        let errors = writer.finish().await;
        for report in reports {
            if errors.total() > 0 {
                report
                    .notes
                    .push(format!("floor receivers: {}", errors.to_json()));
            }
            report.notes.extend(uring.clone());
        }
    }
}

/// Figures of a step that `median_<r>` takes the median of, as (key,
/// optional field).
const MEDIAN_OF: &[(&str, Option<&str>)] = &[
    ("delivered_per_sec", None),
    ("lost", None),
    ("herald_us_per_delivery", None),
    ("nats_us_per_delivery", None),
    ("server_us_per_delivery", None),
    ("missing", None),
    ("duplicates", None),
    ("out_of_order", None),
    ("floor_us_per_write", None),
    ("ratio_to_floor", None),
    ("floor_uring_us_per_write", None),
    ("ratio_to_floor_uring", None),
    ("latency_ms", Some("p50")),
    ("latency_ms", Some("p99")),
];

/// With `--repeat` above 1, a `median_<r>` section per rate: the median of
/// each figure over the runs, and the range of the ratios to the floors.
fn add_medians(report: &mut Report, args: &FanoutArgs) {
    if args.repeat < 2 {
        return;
    }
    let mut rates = args.rates.clone();
    rates.dedup();
    for rate in rates {
        let first = format!("rate_{}", fmt_rate(rate));
        let runs: Vec<&Section> = report
            .results
            .iter()
            .filter(|(name, _)| {
                *name == first
                    || name
                        .strip_prefix(&first)
                        .is_some_and(|rest| rest.starts_with("_run"))
            })
            .map(|(_, section)| section)
            .collect();
        let mut section = Section::new().put("rate", rate).put("runs", runs.len());
        let mut latency = serde_json::Map::new();
        for &(key, field) in MEDIAN_OF {
            let values: Vec<f64> = runs
                .iter()
                .filter_map(|s| crate::compare::figure(s, key, field))
                .collect();
            let Some(m) = median(&values) else {
                continue;
            };
            match field {
                Some(f) => {
                    latency.insert(f.to_owned(), json!(round3(m)));
                }
                None => section = section.put(key, round3(m)),
            }
            if key.starts_with("ratio_to_floor") {
                let (lo, hi) = values
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                section = section.put(&format!("{key}_range"), json!([round3(lo), round3(hi)]));
            }
        }
        if !latency.is_empty() {
            section = section.put("latency_ms", latency);
        }
        report.section(&format!("median_{}", fmt_rate(rate)), section);
    }
}

/// A step's section with, under `--floor`, the floors of the step and the
/// ratios to them.
fn with_floor(section: Section, outcome: &StepOutcome, floors: &StepFloors) -> Section {
    let server_us = outcome.server_us_per_delivery();
    let ratio =
        |f: &FloorResult| json!((f.cpu_s() > 0.0).then(|| round3(server_us / f.us_per_write())));
    let mut section = section;
    if let Some(f) = &floors.write {
        section = section
            .put("floor_us_per_write", round3(f.us_per_write()))
            .put("ratio_to_floor", ratio(f));
    }
    if let Some(f) = &floors.uring {
        section = section
            .put("floor_uring_us_per_write", round3(f.us_per_write()))
            .put("ratio_to_floor_uring", ratio(f));
    }
    section
}

/// Publishes at `rate` for `args.pacing.duration`, rooms in turn, one
/// `Publish` call per message or `--publish-batch` messages per `PublishBatch`.
async fn publish(
    args: &FanoutArgs,
    router: &RouterClient<tonic::transport::Channel>,
    step: usize,
    rate: f64,
) -> Published {
    let rooms = args.rooms as u64;
    let batch = args.publish_batch;
    delivery::paced_batches(rate, batch, &args.pacing, args.rooms, |first, n| {
        let mut router = router.clone();
        let messages: Vec<(usize, PublishRequest)> = (first..first + n)
            .map(|i| {
                let room = (i % rooms) as usize;
                let req = PublishRequest {
                    room: format!("fan:room-{room}"),
                    data: format!(r#"{{"s":{step},"t":{},"i":{i}}}"#, now_ns()),
                    key: String::new(),
                };
                (room, req)
            })
            .collect();
        async move {
            let refused = |status: tonic::Status| {
                let mut e = Errors::default();
                e.add_kind(&format!("{:?}", status.code()), status.message());
                e
            };
            if batch <= 1 {
                let (room, req) = messages.into_iter().next().expect("one message");
                return vec![(room, router.publish(req).await.map(drop).map_err(refused))];
            }
            let rooms: Vec<usize> = messages.iter().map(|(room, _)| *room).collect();
            let request = PublishBatchRequest {
                messages: messages.into_iter().map(|(_, req)| req).collect(),
            };
            match router.publish_batch(request).await {
                Ok(reply) => rooms
                    .into_iter()
                    .zip(reply.into_inner().results)
                    .map(|(room, outcome)| {
                        let res = match outcome.published {
                            Some(_) => Ok(()),
                            None => Err(refused(tonic::Status::new(
                                tonic::Code::from(outcome.code as i32),
                                outcome.error,
                            ))),
                        };
                        (room, res)
                    })
                    .collect(),
                Err(status) => {
                    let e = refused(status);
                    rooms
                        .into_iter()
                        .map(|room| (room, Err(e.clone())))
                        .collect()
                }
            }
        }
    })
    .await
}

/// Socket.IO's side of a run: the same rooms and members as Herald's
/// (member `g` of room `r` is user `fan-<g>` on server `g % servers`; it
/// joins `fan:room-<r>` through its CONNECT's `auth.rooms`), published to by
/// the Redis emitter (`emitter.js`, one Redis PUBLISH per message, the way
/// a backend publishes through Herald's gRPC API). Each step runs one
/// emitter per room at `rate / rooms` for `--duration`, all at once; the
/// event's name is `s<step>`, so every delivery counts in its step, and its
/// `seq` numbers the room's messages. The latency is the emitter's send
/// time (`ts_us`) → read by the receiver. CPU per delivery: the Socket.IO
/// servers (`herald_*` keys, so that the reports compare key for key) and
/// Redis (`nats_*`, the broker), over the step and its drain; the emitters'
/// own CPU is `publisher_cpu_s`.
struct SocketioSide<'a> {
    args: &'a FanoutArgs,
    peer: &'a Peer,
    steps: Steps,
    members: Members<SioClient>,
    report: Report,
}

impl<'a> SocketioSide<'a> {
    /// Connects the members and warms them up.
    async fn open(
        args: &'a FanoutArgs,
        common: &CommonArgs,
        peer: &'a Peer,
        conns: usize,
    ) -> Result<SocketioSide<'a>> {
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
                "duration_s": args.pacing.duration.as_secs_f64(),
                "repeat": args.repeat,
                "floor": args.floor,
                "floor_uring_batch": args.floor_uring_batch,
                "source_addrs": common.source_addrs,
                "redis_url": peer.sio.redis_url(),
                "own_redis": peer.owns_redis(),
                "publisher": "emitter.js (@socket.io/redis-emitter), one per room",
            }),
        );
        if peer.redis_pid().is_none() {
            report
                .notes
                .push("Redis's pid is unknown: its CPU is not counted".into());
        }

        // Receivers: the reader task of each connection counts into the
        // step named by the event (the last slot is the warm-up).
        let warm = args.schedule().len();
        let steps = Steps::new(warm + 1, conns);

        // Members.
        let sources = common.source_ips();
        let started = Instant::now();
        let opened: Vec<_> = futures::stream::iter(0..conns)
            .map(|g| {
                let url = urls[g % urls.len()].clone();
                let auth = json!({
                    "token": peer.sio.token(&format!("fan-{g}")),
                    "rooms": format!("fan:room-{}", g / args.members),
                });
                let source = sources[g % sources.len()];
                let tap = steps.socketio_tap(g);
                async move {
                    SioClient::connect_tapped(&url, &auth, Some(source), tap)
                        .await
                        .map(|c| (g, c))
                        .map_err(|e| ("connect", e.to_string()))
                }
            })
            .buffer_unordered(args.concurrency.max(1))
            .collect()
            .await;
        let members = Members::tally(opened, args.rooms, args.members, started, &mut report);

        // Warm-up: one message per room, until every member has it.
        let expected_warm: u64 = members.members_of.iter().sum();
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
        steps
            .warm_up(warm, expected_warm, &members, &mut report)
            .await;
        Ok(SocketioSide {
            args,
            peer,
            steps,
            members,
            report,
        })
    }

    /// Runs `step`, after its floor.
    async fn step(&mut self, step: Step, floors: &mut Floors) -> Result<()> {
        let Step { index, rate, run } = step;
        let args = self.args;
        let peer = self.peer;
        let floor = floors.before(step, &mut self.report).await?;
        let meter = peer.meter();
        let per_room = rate / args.rooms as f64;
        let emits = (0..args.rooms).map(|r| {
            let emit = Emit {
                event: format!("s{index}"),
                ..Emit::new(&format!("fan:room-{r}"), per_room, args.pacing.duration)
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
        let expected = delivery::expected(&sent_by_room, &self.members.members_of);
        self.steps
            .drain(index, expected, args.pacing.drain_timeout)
            .await;
        let cpu = meter.stop_with(None);
        let (delivered, latency) = self.steps.snapshot(index);
        // The emitter numbers each room's messages (`seq`) but confirms
        // none: which pairs Redis and the adapter had to keep in order is
        // not known, so late arrivals are counted, not judged.
        let loss = self.steps.loss(
            index,
            &self.members.receivers,
            &Due::unordered(sent_by_room),
        );
        if pub_errors.total() > 0 {
            self.report.failures.push(format!(
                "rate {rate}/s: emitter failed: {}",
                pub_errors.to_json()
            ));
        }
        let outcome = StepOutcome {
            rate,
            sent,
            ok: sent,
            window_s: window,
            errors: pub_errors,
            expected,
            delivered,
            latency,
            call: None,
            cpu,
            loss,
            promised: false,
        };
        let section = outcome
            .section()
            .put("publisher_cpu_s", round3(publisher_cpu));
        let section = with_floor(section, &outcome, &floor);
        outcome.push_run(&mut self.report, section, run);
        Ok(())
    }

    /// Adds the medians and closes the members.
    async fn close(mut self) -> Report {
        add_medians(&mut self.report, self.args);
        let clients = std::mem::take(&mut self.members.clients).into_iter();
        delivery::close_all(clients.map(|(_, c)| c), self.args.concurrency).await;
        self.report
    }
}
