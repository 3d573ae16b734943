//! Measuring published messages as they reach the members of their rooms,
//! shared by `fanout` and `chat` so that both open members, pace publishes,
//! count deliveries and report a step with the same keys, the same way.
//!
//! Every payload carries `{"s":<step>,"t":<ns since the epoch when it was
//! sent>,"i":<publish number>}`: the receiver counts the delivery in its
//! step and takes its clock when the frame arrives, so a delivery that
//! arrives after its step ended still counts where it belongs; and it
//! records which of its room's messages it got ([`crate::arrivals`]), so a
//! step reports what each receiver missed, got twice or got out of order.
//!
//! Receivers read each frame through a [`Tap`] on the connection's reader
//! task, which picks the three numbers out of the unparsed frame: at 100k
//! deliveries a second, parsing every frame and passing it to another task
//! cost the machine more CPU than Herald spent sending it, and that CPU
//! came out of the same two cores. The Socket.IO side does the same, and so
//! do the floor's receivers (`floor`), with this same tap, so that a floor
//! delivery costs the bench what a fan-out delivery does.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use clap::Args;
use futures::StreamExt as _;
use herald_client::{Client, Tap};
use memchr::memmem;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::arrivals::{Arrivals, Call, Due, Loss};
use crate::load::Dialer;
use crate::report::{CpuMeter, CpuPhase, Errors, Latency, Report, Section, round3};
use crate::target::Target;

/// How long the warm-up's deliveries may take.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// How each step publishes and ends.
#[derive(Args, Debug, Clone)]
pub struct Pacing {
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
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Deliveries of one step.
#[derive(Default)]
struct StepStats {
    delivered: u64,
    latency: Latency,
}

/// Deliveries and their latency, per step, and each receiver's
/// [`Arrivals`] in each step; clones share them.
#[derive(Clone)]
pub struct Steps {
    stats: Arc<Vec<Mutex<StepStats>>>,
    /// By receiver, then by step. Only that receiver's reader task records
    /// into its entry, so its lock is not contended until the report reads
    /// it after the step.
    receivers: Arc<Vec<Mutex<Vec<Arrivals>>>>,
}

impl Steps {
    /// `steps` steps received by receivers `0..receivers`.
    pub fn new(steps: usize, receivers: usize) -> Steps {
        Steps {
            stats: Arc::new((0..steps).map(|_| Mutex::default()).collect()),
            receivers: Arc::new(
                (0..receivers)
                    .map(|_| Mutex::new(vec![Arrivals::default(); steps]))
                    .collect(),
            ),
        }
    }

    /// Counts message `n` of `step` at `receiver`; a step or receiver out
    /// of range is not ours.
    pub fn record(&self, receiver: usize, step: usize, n: u64, latency: Duration) {
        let Some(s) = self.stats.get(step) else {
            return;
        };
        {
            let mut s = s.lock().expect("stats lock");
            s.delivered += 1;
            s.latency.record(latency);
        }
        if let Some(r) = self.receivers.get(receiver) {
            r.lock().expect("arrivals lock")[step].record(n);
        }
    }

    pub fn delivered(&self, step: usize) -> u64 {
        self.stats[step].lock().expect("stats lock").delivered
    }

    /// The deliveries of `step` so far, and their latency.
    pub fn snapshot(&self, step: usize) -> (u64, Latency) {
        let s = self.stats[step].lock().expect("stats lock");
        (s.delivered, s.latency.clone())
    }

    /// What `receivers` (each `(receiver, room)`) missed, got twice or out
    /// of order in `step`, against what was `due`.
    pub fn loss(&self, step: usize, receivers: &[(usize, usize)], due: &Due) -> Loss {
        let held: Vec<(usize, Arrivals)> = receivers
            .iter()
            .filter_map(|&(g, room)| {
                let r = self.receivers.get(g)?.lock().expect("arrivals lock");
                Some((room, r.get(step)?.clone()))
            })
            .collect();
        Loss::of(held.iter().map(|(room, a)| (*room, a)), due)
    }

    /// Waits until `step` has `expected` deliveries, or none came for
    /// `quiet`: the tail is waited for as long as it is still arriving.
    pub async fn drain(&self, step: usize, expected: u64, quiet: Duration) {
        let mut last = self.delivered(step);
        let mut last_change = Instant::now();
        while last < expected && last_change.elapsed() < quiet {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.delivered(step);
            if now != last {
                last = now;
                last_change = Instant::now();
            }
        }
    }

    /// Waits up to 10 s for the warm-up's `expected` deliveries (counted in
    /// step `warm`), then reports the setup; missing ones fail the run.
    pub async fn warm_up<C>(
        &self,
        warm: usize,
        expected: u64,
        members: &Members<C>,
        report: &mut Report,
    ) {
        let deadline = Instant::now() + WARM_UP_TIMEOUT;
        while self.delivered(warm) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let got = self.delivered(warm);
        if got < expected {
            report.failures.push(format!(
                "warm-up: {got} of {expected} deliveries within {} s",
                WARM_UP_TIMEOUT.as_secs()
            ));
        }
        report.section(
            "setup",
            Section::new()
                .put("members", members.members_of.iter().sum::<u64>())
                .put("setup_s", round3(members.setup_s))
                .put("warmup_delivered", got)
                .put("errors", members.errors.total())
                .put("error_kinds", members.errors.to_json()),
        );
    }
}

/// The unsigned integer `frame` has right after the first `key`
/// (`"s":`-style, quotes and colon included), if any.
fn number_after(frame: &[u8], key: &[u8]) -> Option<u64> {
    let at = memmem::find(frame, key)? + key.len();
    leading_number(&frame[at..])
}

/// The unsigned integer `bytes` starts with, if any.
fn leading_number(bytes: &[u8]) -> Option<u64> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&bytes[..digits]).ok()?.parse().ok()
}

impl Steps {
    /// The tap of Herald member `receiver`, or of a floor receiver: counts
    /// each `message` frame in the step its data names (`"s"`), as message
    /// `i / rooms` of its room (publish `i` goes to room `i % rooms`), timed
    /// from `"t"`; takes presence events too (the bench asks nothing of
    /// them). Replies go on to the requests awaiting them.
    pub fn herald_tap(&self, receiver: usize, rooms: usize) -> Tap {
        let steps = self.clone();
        let rooms = rooms.max(1) as u64;
        Arc::new(move |frame: &[u8]| {
            if !frame.starts_with(br#"{"op":"message","#) {
                return frame.starts_with(br#"{"op":"presence","#);
            }
            let now = now_ns();
            let data = memmem::find(frame, br#","data":"#).map(|at| &frame[at..]);
            if let Some((step, sent, i)) = data.and_then(|d| {
                Some((
                    number_after(d, br#""s":"#)?,
                    number_after(d, br#""t":"#)?,
                    number_after(d, br#""i":"#)?,
                ))
            }) {
                steps.record(
                    receiver,
                    step as usize,
                    i / rooms,
                    Duration::from_nanos(now.saturating_sub(sent)),
                );
            }
            true
        })
    }

    /// The tap of Socket.IO member `receiver`: counts each event `s<step>`
    /// (`42["s3",{"seq":7,"ts_us":...}]`, `seq` numbering the emitter's
    /// messages to the room) in its step; everything else goes on to the
    /// client.
    pub fn socketio_tap(&self, receiver: usize) -> Tap {
        let steps = self.clone();
        Arc::new(move |frame: &[u8]| {
            let Some(event) = frame.strip_prefix(br#"42["s"#) else {
                return false;
            };
            let now = crate::socketio::unix_us();
            if let (Some(step), Some(seq), Some(sent)) = (
                leading_number(event),
                number_after(event, br#""seq":"#),
                number_after(event, br#""ts_us":"#),
            ) {
                steps.record(
                    receiver,
                    step as usize,
                    seq,
                    Duration::from_micros(now.saturating_sub(sent)),
                );
            }
            true
        })
    }
}

/// A connection a run holds, whichever system it talks to.
pub trait Connection: Send {
    /// Whether the server (or the network) ended it.
    fn is_closed(&self) -> bool;
    /// Ends the connection properly; a failure to do so is no result's
    /// business, the run is over.
    fn close(self) -> impl Future<Output = ()> + Send;
}

impl Connection for Client {
    fn is_closed(&self) -> bool {
        Client::is_closed(self)
    }

    async fn close(self) {
        let _ = Client::close(self).await;
    }
}

impl Connection for crate::socketio::SioClient {
    fn is_closed(&self) -> bool {
        crate::socketio::SioClient::is_closed(self)
    }

    async fn close(self) {
        let _ = crate::socketio::SioClient::close(self).await;
    }
}

/// Closes `conns`, `concurrency` at a time, so that a run's end does not
/// open thousands of close handshakes at once.
pub async fn close_all<C: Connection>(conns: impl IntoIterator<Item = C>, concurrency: usize) {
    futures::stream::iter(conns)
        .for_each_concurrent(concurrency.max(1), Connection::close)
        .await;
}

/// Member `g` connected and joined, or the stage that failed and why.
pub type Opened<C> = Result<(usize, C), (&'static str, String)>;

/// The members of `rooms` rooms of `per_room` members each, connected.
pub struct Members<C> {
    /// `(g, client)`: member `g % per_room` of room `g / per_room`.
    pub clients: Vec<(usize, C)>,
    /// Members connected, per room: what each message to it should reach.
    pub members_of: Vec<u64>,
    /// `(g, room)` of each member connected: whose arrivals a step checks.
    pub receivers: Vec<(usize, usize)>,
    pub errors: Errors,
    pub setup_s: f64,
}

impl<C> Members<C> {
    /// Tallies what opening the members gave; a member that could not
    /// connect fails the run (the others are still measured).
    pub fn tally(
        opened: Vec<Opened<C>>,
        rooms: usize,
        per_room: usize,
        started: Instant,
        report: &mut Report,
    ) -> Members<C> {
        let conns = rooms * per_room;
        let mut errors = Errors::default();
        let mut members_of = vec![0u64; rooms];
        let mut clients = Vec::with_capacity(conns);
        let mut receivers = Vec::with_capacity(conns);
        for r in opened {
            match r {
                Ok((g, c)) => {
                    members_of[g / per_room] += 1;
                    clients.push((g, c));
                    receivers.push((g, g / per_room));
                }
                Err((stage, e)) => errors.add_kind(&format!("{stage}: failed"), &e),
            }
        }
        if clients.len() < conns {
            report.failures.push(format!(
                "{} of {conns} members could not connect and join: {}",
                conns - clients.len(),
                errors.to_json()
            ));
        }
        receivers.sort_unstable();
        Members {
            clients,
            members_of,
            receivers,
            errors,
            setup_s: started.elapsed().as_secs_f64(),
        }
    }
}

/// Connects the members to Herald: member `g` is user `<user>-<g>` on edge
/// `g % edges` (so a room spans as many edges as it has members, up to all
/// of them), joined to `<room_prefix>-<g / per_room>`; `concurrency` at a
/// time. Their messages are counted in `steps`, member `g` as receiver `g`.
pub async fn open_members(
    target: &Target,
    dialer: &Dialer,
    (user, room_prefix): (&str, &str),
    (rooms, per_room): (usize, usize),
    (concurrency, steps): (usize, &Steps),
    report: &mut Report,
) -> Members<Client> {
    let edges = dialer.edges();
    let started = Instant::now();
    let opened: Vec<_> = futures::stream::iter(0..rooms * per_room)
        .map(|g| {
            let token = target.token(&format!("{user}-{g}"));
            let room = format!("{room_prefix}-{}", g / per_room);
            let tap = steps.herald_tap(g, rooms);
            async move {
                let (client, _) = dialer
                    .connect_tapped(g % edges, &token, tap)
                    .await
                    .map_err(|e| ("connect", e.to_string()))?;
                match client.request(json!({"op": "join", "room": room})).await {
                    Ok(r) if r["op"] == "ok" => Ok((g, client)),
                    Ok(r) => Err(("join", r.to_string())),
                    Err(e) => Err(("join", e.to_string())),
                }
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    Members::tally(opened, rooms, per_room, started, report)
}

/// The publishes of one step.
pub struct Published {
    pub sent: u64,
    pub ok_by_room: Vec<u64>,
    /// Publish `i`: its outcome, its call, and when it was made and
    /// confirmed, for the order each receiver is owed.
    pub calls: Vec<Call>,
    pub errors: Errors,
    pub call: Latency,
    /// From the first call to the end of the last.
    pub window_s: f64,
}

impl Published {
    /// Successful publishes × the members of their rooms.
    pub fn expected(&self, members_of: &[u64]) -> u64 {
        expected(&self.ok_by_room, members_of)
    }
}

/// Deliveries due for `sent_by_room` messages: each reaches every member of
/// its room.
pub fn expected(sent_by_room: &[u64], members_of: &[u64]) -> u64 {
    sent_by_room
        .iter()
        .zip(members_of)
        .map(|(n, m)| n * m)
        .sum()
}

/// Makes `rate × duration` publishes at `rate` a second: `publish(i)` gives
/// the room of publish `i` and the call, which runs as a task of its own,
/// at most `max_in_flight` at once (the rate drops when all are busy). The
/// call's errors come back as an [`Errors`] of their own.
pub async fn paced<F, Fut>(rate: f64, pacing: &Pacing, rooms: usize, mut publish: F) -> Published
where
    F: FnMut(u64) -> (usize, Fut),
    Fut: Future<Output = Result<(), Errors>> + Send + 'static,
{
    paced_batches(rate, 1, pacing, rooms, move |i, _| {
        let (room, call) = publish(i);
        async move { vec![(room, call.await)] }
    })
    .await
}

/// [`paced`] with `per_call` publishes in each call: `publish(first, n)`
/// makes publishes `first..first + n` in one call, made every
/// `per_call / rate` seconds, and gives each one's room and outcome.
pub async fn paced_batches<F, Fut>(
    rate: f64,
    per_call: u64,
    pacing: &Pacing,
    rooms: usize,
    mut publish: F,
) -> Published
where
    F: FnMut(u64, u64) -> Fut,
    Fut: Future<Output = Vec<(usize, Result<(), Errors>)>> + Send + 'static,
{
    let total = ((rate * pacing.duration.as_secs_f64()).round() as u64).max(1);
    let per_call = per_call.max(1);
    let permits = Arc::new(Semaphore::new(pacing.max_in_flight.max(1)));
    let start = tokio::time::Instant::now();
    let origin = Instant::now();
    let mut calls = Vec::with_capacity(total.div_ceil(per_call) as usize);
    for first in (0..total).step_by(per_call as usize) {
        tokio::time::sleep_until(start + Duration::from_secs_f64(first as f64 / rate)).await;
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        // Taken before the call is made, and its end after the answer is in,
        // so that "confirmed before the next was sent" errs on no side.
        let sent = origin.elapsed();
        let call = publish(first, per_call.min(total - first));
        calls.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let outcomes = call.await;
            let confirmed = origin.elapsed();
            drop(permit);
            (first, sent, confirmed, outcomes, t0.elapsed())
        }));
    }
    // A publish whose task failed stays unconfirmed, in a call of its own.
    let unknown = |i| Call {
        ok: false,
        call: i,
        sent: Duration::ZERO,
        confirmed: None,
    };
    let mut out = Published {
        sent: total,
        ok_by_room: vec![0; rooms],
        calls: (0..total).map(unknown).collect(),
        errors: Errors::default(),
        call: Latency::default(),
        window_s: 0.0,
    };
    for c in calls {
        match c.await {
            Ok((first, sent, confirmed, outcomes, d)) => {
                out.call.record(d);
                for (k, (room, res)) in outcomes.into_iter().enumerate() {
                    let ok = res.is_ok();
                    match res {
                        Ok(()) => out.ok_by_room[room] += 1,
                        Err(e) => out.errors.merge(&e),
                    }
                    if let Some(slot) = out.calls.get_mut(first as usize + k) {
                        *slot = Call {
                            ok,
                            call: first,
                            sent,
                            confirmed: ok.then_some(confirmed),
                        };
                    }
                }
            }
            Err(e) => out.errors.add_kind("task", &e.to_string()),
        }
    }
    out.window_s = start.elapsed().as_secs_f64();
    out
}

/// One step's results.
pub struct StepOutcome {
    pub rate: f64,
    pub sent: u64,
    pub ok: u64,
    pub window_s: f64,
    pub errors: Errors,
    pub expected: u64,
    pub delivered: u64,
    pub latency: Latency,
    /// The publish call's latency, when the bench makes the call itself.
    pub call: Option<Latency>,
    /// Over the step: publishing plus the drain.
    pub cpu: CpuPhase,
    /// What each receiver missed, got twice or out of order.
    pub loss: Loss,
    /// Whether a duplicate or a break of the publisher's order fails the
    /// run: Herald promises neither (docs/protocol.md); for the peer they
    /// are reported.
    pub promised: bool,
}

impl StepOutcome {
    /// Runs step `step` of a Herald target: `publishing`, then the drain of
    /// its deliveries to `members`, with the CPU of both.
    pub async fn measure<C>(
        target: &Target,
        steps: &Steps,
        (step, rate): (usize, f64),
        members: &Members<C>,
        drain_timeout: Duration,
        publishing: impl Future<Output = Published>,
    ) -> StepOutcome {
        let meter = CpuMeter::start(target);
        let pubs = publishing.await;
        let expected = pubs.expected(&members.members_of);
        steps.drain(step, expected, drain_timeout).await;
        let cpu = meter.stop(target);
        let (delivered, latency) = steps.snapshot(step);
        let due = Due::from_calls(members.members_of.len(), pubs.calls);
        let loss = steps.loss(step, &members.receivers, &due);
        StepOutcome {
            rate,
            sent: pubs.sent,
            ok: pubs.ok_by_room.iter().sum(),
            window_s: pubs.window_s,
            errors: pubs.errors,
            expected,
            delivered,
            latency,
            call: Some(pubs.call),
            cpu,
            loss,
            promised: true,
        }
    }

    /// CPU µs per delivered message of `cpu_s` seconds.
    fn per_delivery(&self, cpu_s: f64) -> f64 {
        round3(cpu_s * 1e6 / self.delivered.max(1) as f64)
    }

    /// CPU seconds of the servers and the broker.
    pub fn server_s(&self) -> f64 {
        self.cpu.herald_s() + self.cpu.nats_s().unwrap_or(0.0)
    }

    pub fn server_us_per_delivery(&self) -> f64 {
        self.per_delivery(self.server_s())
    }

    /// The `rate_<r>` section.
    pub fn section(&self) -> Section {
        let herald_s = self.cpu.herald_s();
        let nats_s = self.cpu.nats_s().unwrap_or(0.0);
        let mut section = Section::new()
            .put("rate", self.rate)
            .put("publishes", self.sent)
            .put("publishes_ok", self.ok)
            .put("publish_rate", round3(self.sent as f64 / self.window_s))
            .put("publish_errors", self.errors.total())
            .put("publish_error_kinds", self.errors.to_json())
            .put("expected", self.expected)
            .put("delivered", self.delivered)
            .put("lost", self.expected.saturating_sub(self.delivered))
            .put("extra", self.delivered.saturating_sub(self.expected));
        section = self
            .loss
            .put_into(section)
            .put(
                "delivered_per_sec",
                round3(self.delivered as f64 / self.window_s),
            )
            .put("latency_ms", self.latency.summary());
        if let Some(call) = &self.call {
            section = section.put("publish_call_ms", call.summary());
        }
        section
            .put("herald_cpu_s", round3(herald_s))
            .put("nats_cpu_s", round3(nats_s))
            .put("herald_us_per_delivery", self.per_delivery(herald_s))
            .put("nats_us_per_delivery", self.per_delivery(nats_s))
            .put("server_us_per_delivery", self.server_us_per_delivery())
            .put("bench_cpu_s", round3(self.cpu.load_s()))
    }

    /// Adds `section` (this step's, maybe with more keys) and the CPU to the
    /// report, with a note if deliveries are missing.
    pub fn push(self, report: &mut Report, section: Section) {
        self.push_run(report, section, 1);
    }

    /// [`push`](Self::push) for run `run` of a repeated step: runs after
    /// the first are `rate_<r>_run<k>` and `rate <r>/s run <k>`.
    pub fn push_run(self, report: &mut Report, section: Section, run: u32) {
        let (rate, expected, delivered) = (self.rate, self.expected, self.delivered);
        let (name, label) = if run > 1 {
            (
                format!("{}_run{run}", fmt_rate(rate)),
                format!("rate {rate}/s run {run}"),
            )
        } else {
            (fmt_rate(rate), format!("rate {rate}/s"))
        };
        if delivered < expected {
            report.notes.push(format!(
                "{label}: {} of {expected} deliveries missing",
                expected - delivered
            ));
        }
        // Loss under overload is reported; a duplicate or a broken order is
        // a broken promise.
        if !self.loss.clean() {
            let line = format!("{label}: {}", self.loss.describe());
            let broken = self.loss.duplicates > 0 || self.loss.order_broken.unwrap_or(0) > 0;
            if self.promised && broken {
                report.failures.push(line);
            } else {
                report.notes.push(line);
            }
        }
        report.section(&format!("rate_{name}"), section);
        report.cpu.push((label, self.cpu));
    }
}

pub fn fmt_rate(rate: f64) -> String {
    if rate.fract() == 0.0 {
        format!("{rate:.0}")
    } else {
        rate.to_string().replace('.', "_")
    }
}

/// Refuses rooms, members or rates that cannot run, and connections the
/// bench cannot hold (`sockets_per_member` open files each); returns the
/// number of members.
pub fn check_shape(
    rooms: usize,
    members: usize,
    rates: &[f64],
    sockets_per_member: u64,
) -> Result<usize> {
    if rooms == 0 || members == 0 || rates.is_empty() {
        bail!("--rooms, --members and --rates must not be empty");
    }
    if rates.iter().any(|r| r.is_nan() || *r <= 0.0) {
        bail!("every rate must be above 0");
    }
    let conns = rooms * members;
    let limit = crate::idle::raise_fd_limit();
    if conns as u64 * sockets_per_member + 200 > limit {
        bail!("{conns} connections need more open files than this process may have ({limit})");
    }
    Ok(conns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_wire::RoomName;
    use herald_wire::frames::message_frame;
    use serde_json::value::RawValue;

    #[test]
    fn the_herald_tap_counts_messages_and_leaves_replies() {
        let steps = Steps::new(3, 1);
        let tap = steps.herald_tap(0, 1);
        let sent = now_ns();
        let room = RoomName::parse("fan:room-0").expect("valid room");
        let data = RawValue::from_string(format!(r#"{{"s":2,"t":{sent},"i":7}}"#)).unwrap();
        assert!(tap(&message_frame(&room, &data, "u-1", 5)));
        // A message that is not the bench's is taken and not counted.
        let other = RawValue::from_string(r#"{"text":"hi"}"#.into()).unwrap();
        assert!(tap(&message_frame(&room, &other, "u-1", 5)));
        assert!(tap(
            br#"{"op":"presence","room":"fan:room-0","event":"join"}"#
        ));
        assert!(!tap(br#"{"op":"ok","id":3}"#));
        assert!(!tap(br#"{"op":"error","id":4,"code":"x","message":"y"}"#));
        assert_eq!(
            (steps.delivered(0), steps.delivered(1), steps.delivered(2)),
            (0, 0, 1)
        );
        let (_, latency) = steps.snapshot(2);
        assert!(latency.summary()["count"] == 1);
    }

    #[test]
    fn the_socketio_tap_counts_step_events_and_leaves_the_rest() {
        let steps = Steps::new(2, 1);
        let tap = steps.socketio_tap(0);
        let sent = crate::socketio::unix_us();
        let event = format!(r#"42["s1",{{"seq":0,"ts_us":{sent},"pad":"xx"}}]"#);
        assert!(tap(event.as_bytes()));
        assert!(tap(event.as_bytes()));
        for other in ["2", "3", r#"40{"sid":"a"}"#, r#"42["hello",{}]"#, "431[]"] {
            assert!(!tap(other.as_bytes()), "{other}");
        }
        assert_eq!((steps.delivered(0), steps.delivered(1)), (0, 2));
        let loss = steps.loss(1, &[(0, 0)], &Due::unordered(vec![2]));
        assert_eq!((loss.missing, loss.duplicates), (1, 1), "{loss:?}");
        assert_eq!(loss.order_broken, None);
    }

    /// Two rooms, two members each; publish `i` goes to room `i % 2`. The
    /// taps see what a Herald edge would send, with one message lost at
    /// one member, one duplicated at another, and one overtaken.
    #[test]
    fn the_herald_tap_tells_each_receiver_what_it_missed() {
        let steps = Steps::new(1, 4);
        let taps: Vec<Tap> = (0..4).map(|g| steps.herald_tap(g, 2)).collect();
        let frame = |i: u64| {
            let room = RoomName::parse(&format!("fan:room-{}", i % 2)).expect("valid room");
            let data = format!(r#"{{"s":0,"t":{},"i":{i}}}"#, now_ns());
            message_frame(&room, &RawValue::from_string(data).unwrap(), "server", 5)
        };
        // Members 0 and 1 are in room 0 (publishes 0, 2, 4, 6), 2 and 3 in
        // room 1 (1, 3, 5, 7).
        let got: [&[u64]; 4] = [&[0, 2, 4, 6], &[0, 4, 6], &[1, 3, 3, 5, 7], &[1, 5, 3, 7]];
        for (g, seq) in got.iter().enumerate() {
            for &i in *seq {
                assert!(taps[g](&frame(i)));
            }
        }
        let calls: Vec<Call> = (0..8)
            .map(|i| Call {
                ok: true,
                call: i,
                sent: Duration::from_millis(10 * i),
                // Publish 3 was confirmed before 5 was sent: 5 before 3
                // breaks the order Herald owes.
                confirmed: Some(Duration::from_millis(10 * i + 5)),
            })
            .collect();
        let receivers = [(0, 0), (1, 0), (2, 1), (3, 1)];
        let loss = steps.loss(0, &receivers, &Due::from_calls(2, calls));
        assert_eq!(loss.receivers, 4);
        assert_eq!((loss.missing, loss.receivers_missing), (1, 1));
        assert_eq!((loss.duplicates, loss.receivers_duplicated), (1, 1));
        assert_eq!((loss.out_of_order, loss.receivers_out_of_order), (1, 1));
        assert_eq!(loss.order_broken, Some(1));
        assert_eq!(steps.delivered(0), 16, "every frame counts in the totals");
    }

    #[test]
    fn numbers_are_read_after_their_key() {
        assert_eq!(number_after(br#"{"s":12,"t":345}"#, br#""t":"#), Some(345));
        assert_eq!(number_after(br#"{"s":12}"#, br#""t":"#), None);
        assert_eq!(number_after(br#"{"t":"x"}"#, br#""t":"#), None);
        assert_eq!(leading_number(b"3\",{"), Some(3));
    }
}
