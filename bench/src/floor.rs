//! `floor`: what the kernel charges a server for one small write on this
//! machine, measured with the same receivers as the Herald scenarios.
//!
//! A writer child process (`herald-bench floor-writer`, hidden) listens on
//! loopback, accepts `--conns` connections of `herald-client` clients,
//! completes their WebSocket upgrade and answers their `connect` with a
//! `connected` frame, like an edge would. Then, per phase, it writes a
//! `message` frame shaped like a fan-out's (`{"op":"message","room":..,
//! "data":{"s":<phase>,"t":<ns>,"i":<n>},"from":"server","ts":..}`, ~120
//! bytes) to each connection per round, from one thread, `--rounds` rounds
//! paced at `--round-rate` rounds a second; a phase with K frames per write
//! writes K such frames (numbered apart) in one write. The writer's CPU time
//! over the phase (nanoseconds on a CPU, [`crate::procfs`]) divided by the
//! writes is the floor per write; divided by the frames, per message.
//!
//! Two ways to write: one blocking `write(2)` per connection (what a server
//! that writes each socket on its own pays), and io_uring (`uring`
//! phases): a round's writes to all connections submitted `--uring-batch` at
//! a time, one `io_uring_enter` per batch, as Herald's edge submits a
//! room's fan-out (`services/edge/src/delivery/uring.rs`): the floor a
//! batching server could reach. Where the kernel refuses io_uring (old
//! kernel, seccomp), the writer says so and the `uring` phases are left
//! out, with a note.
//!
//! The receivers are the fan-out's own: `herald-client` clients whose reader
//! task reads each frame through the tap of [`crate::delivery::Steps`], so a
//! floor delivery costs the bench what a fan-out delivery does, and each
//! receiver's arrivals are checked the same way (every frame, once, in
//! order).

mod uring;

use std::io::{BufRead, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::Args;
use futures::StreamExt as _;
use herald_client::Client;
use serde_json::{Value, json};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::arrivals::{Due, Loss};
use crate::delivery::{Steps, now_ns};
use crate::procfs::{CpuUsed, cpu_sample};
use crate::report::{Errors, Latency, Report, Section, round3};

/// How many clients open their connection at the same time.
const CONNECT_CONCURRENCY: usize = 64;

/// io_uring sends per submission by default: the edge's run
/// (`RUN` in `services/edge/src/delivery/fanout.rs`).
pub const URING_BATCH: usize = 128;

/// The most io_uring sends per submission.
pub const MAX_URING_BATCH: usize = uring::MAX_BATCH;

/// Set in the environment of `herald-bench`, the writer behaves as if the
/// kernel refused io_uring (to check that a run without it still reports).
const NO_URING_ENV: &str = "HERALD_BENCH_NO_IO_URING";

/// Set in the environment of `herald-bench`, the writer's plain writes
/// misbehave on purpose, to check that the receivers notice (tests only):
/// comma-separated `drop=C:R` (connection C misses round R), `dup=C:R`
/// (gets it twice) and `swap=C:R` (gets round R after round R + 1).
const FAULTS_ENV: &str = "HERALD_BENCH_FLOOR_FAULTS";

/// Frame `i` of phase `step`, shaped like the frames of `fanout`.
fn frame_payload(step: usize, i: u64) -> Vec<u8> {
    let t = now_ns();
    format!(
        r#"{{"op":"message","room":"floor:bench","data":{{"s":{step},"t":{t},"i":{i}}},"from":"server","ts":{}}}"#,
        t / 1_000_000
    )
    .into_bytes()
}

/// What one round writes to each connection, into `out`: frames `round *
/// k .. round * k + k` of phase `step`, one after the other.
fn round_bytes(out: &mut Vec<u8>, step: usize, round: u64, k: usize) {
    out.clear();
    for j in 0..k as u64 {
        out.extend_from_slice(&text_frame(&frame_payload(step, round * k as u64 + j)));
    }
}

/// An unmasked, final text frame carrying `payload` (< 64 KiB).
fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x81];
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

/// What `floor` measures; shared with `fanout --floor`.
#[derive(Args, Debug, Clone)]
pub struct FloorArgs {
    /// Connections the writer writes to.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Writes per connection in the phase with 1 frame per write.
    #[arg(long, default_value_t = 200)]
    pub rounds: u64,
    /// Writes per connection in the phases with more than 1 frame per write
    /// [default: rounds / 4].
    #[arg(long)]
    pub coalesced_rounds: Option<u64>,
    /// Rounds per second (each round writes once to every connection); 0
    /// writes as fast as the writer can.
    #[arg(long, default_value_t = 20.0)]
    pub round_rate: f64,
    /// The phases: frames per write, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub frames_per_write: Vec<usize>,
    /// Each phase again through io_uring, this many sends per submission
    /// (`uring_frames_per_write_<k>`); 0 leaves those phases out.
    #[arg(long, default_value_t = URING_BATCH)]
    pub uring_batch: usize,
}

/// The `floor` command: [`FloorArgs`] plus where the results go.
#[derive(Args, Debug, Clone)]
pub struct FloorCmd {
    #[command(flatten)]
    pub floor: FloorArgs,
    /// Client connections are spread over this many source addresses, 127.0.0.2, ...
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..=250))]
    pub source_addrs: u8,
    /// Write the results as JSON to FILE; `-` prints one JSON line on stdout.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// How the writer hands a round's writes to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Send {
    /// One blocking `write(2)` per connection.
    Write,
    /// io_uring, `batch` sends per submission.
    Uring { batch: usize },
}

impl Send {
    /// How the writer child is told (`write`, `uring:<batch>`).
    fn word(self) -> String {
        match self {
            Send::Write => "write".into(),
            Send::Uring { batch } => format!("uring:{batch}"),
        }
    }

    fn parse(word: &str) -> Result<Send> {
        match word.strip_prefix("uring:") {
            Some(batch) => Ok(Send::Uring {
                batch: batch.parse()?,
            }),
            None if word == "write" => Ok(Send::Write),
            None => bail!("unknown way to write: {word}"),
        }
    }
}

/// One phase of the writer.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub frames_per_write: usize,
    pub rounds: u64,
    pub round_rate: f64,
    pub send: Send,
}

/// What one phase cost.
#[derive(Clone)]
pub struct FloorResult {
    pub phase: Phase,
    pub conns: usize,
    pub writes: u64,
    /// System calls that handed the writes to the kernel: one per write,
    /// or one `io_uring_enter` per batch (and a `write` for each send that
    /// io_uring could not finish).
    pub syscalls: u64,
    pub frames: u64,
    pub writer: CpuUsed,
    pub wall_s: f64,
    /// CPU of the bench process (the receivers) over the phase.
    pub receivers_s: f64,
    /// Frames the receivers got in this phase.
    pub received: u64,
    /// Each receiver's frames: missing, duplicated, out of order.
    pub loss: Loss,
    /// Round begun → frame read by the receiver.
    pub latency: Latency,
}

impl FloorResult {
    pub fn cpu_s(&self) -> f64 {
        self.writer.secs()
    }

    pub fn us_per_write(&self) -> f64 {
        self.cpu_s() * 1e6 / self.writes.max(1) as f64
    }

    pub fn us_per_frame(&self) -> f64 {
        self.cpu_s() * 1e6 / self.frames.max(1) as f64
    }

    pub fn section(&self) -> Section {
        let cpu = self.cpu_s();
        let (send, batch) = match self.phase.send {
            Send::Write => ("write", None),
            Send::Uring { batch } => ("io_uring", Some(batch)),
        };
        let section = Section::new()
            .put("send", send)
            .put("uring_batch", batch)
            .put("frames_per_write", self.phase.frames_per_write)
            .put("conns", self.conns)
            .put("rounds", self.phase.rounds)
            .put("round_rate", self.phase.round_rate)
            .put("writes", self.writes)
            .put("syscalls", self.syscalls)
            .put("frames", self.frames)
            .put("received", self.received);
        self.loss
            .put_into(section)
            .put("wall_s", round3(self.wall_s))
            .put("writes_per_sec", round3(self.writes as f64 / self.wall_s))
            .put("writer_cpu_s", round3(cpu))
            .put("writer_kernel_share", round3(self.writer.kernel_share()))
            .put("us_per_write", round3(self.us_per_write()))
            .put("us_per_frame", round3(self.us_per_frame()))
            .put("receivers_cpu_s", round3(self.receivers_s))
            .put(
                "receivers_us_per_frame",
                round3(self.receivers_s * 1e6 / self.received.max(1) as f64),
            )
            .put("latency_ms", self.latency.summary())
    }

    /// The phase's section name: `frames_per_write_<k>`, or
    /// `uring_frames_per_write_<k>`.
    fn name(&self) -> String {
        let k = self.phase.frames_per_write;
        match self.phase.send {
            Send::Write => format!("frames_per_write_{k}"),
            Send::Uring { .. } => format!("uring_frames_per_write_{k}"),
        }
    }

    /// Frames that did not arrive once and in order: a bare writer on
    /// loopback loses nothing, so any of these is the bench's own fault.
    fn failure(&self) -> Option<String> {
        let missing = self.frames.saturating_sub(self.received);
        if missing == 0 && self.loss.clean() {
            return None;
        }
        Some(format!(
            "{}: {} of {} frames arrived; {}",
            self.name(),
            self.received,
            self.frames,
            self.loss.describe()
        ))
    }
}

/// The `floor` command.
pub async fn run(cmd: &FloorCmd) -> Result<Report> {
    let args = &cmd.floor;
    if args.uring_batch > MAX_URING_BATCH {
        bail!("--uring-batch is at most {MAX_URING_BATCH}");
    }
    let rounds = |k: usize| {
        if k > 1 {
            args.coalesced_rounds.unwrap_or((args.rounds / 4).max(1))
        } else {
            args.rounds
        }
    };
    let mut sends = vec![Send::Write];
    if args.uring_batch > 0 {
        sends.push(Send::Uring {
            batch: args.uring_batch,
        });
    }
    let phases: Vec<Phase> = sends
        .iter()
        .flat_map(|&send| {
            args.frames_per_write.iter().map(move |&k| Phase {
                frames_per_write: k,
                rounds: rounds(k),
                round_rate: args.round_rate,
                send,
            })
        })
        .collect();
    let sources = source_ips(cmd.source_addrs);
    let mut report = Report::new(
        "floor",
        "none",
        "a bare writer (herald-bench floor-writer, one thread: blocking writes, \
         then io_uring submissions) on loopback"
            .into(),
        json!({
            "conns": args.conns,
            "rounds": args.rounds,
            "round_rate": args.round_rate,
            "frames_per_write": args.frames_per_write,
            "uring_batch": args.uring_batch,
            "frame_bytes": text_frame(&frame_payload(0, 0)).len(),
            "source_addrs": cmd.source_addrs,
        }),
    );
    let mut writer = Writer::start(args.conns, &sources, phases.len()).await?;
    for &phase in &phases {
        let Some(r) = writer.phase(phase).await? else {
            continue;
        };
        report.failures.extend(r.failure());
        report.section(&r.name(), r.section());
    }
    if args.uring_batch > 0 {
        report
            .notes
            .extend(writer.uring_unavailable().map(uring_note));
    }
    let errors = writer.finish().await;
    if errors.total() > 0 {
        report.section(
            "errors",
            Section::new()
                .put("errors", errors.total())
                .put("error_kinds", errors.to_json()),
        );
    }
    Ok(report)
}

/// The note of a report whose io_uring floor is missing, and why.
pub fn uring_note(why: &str) -> String {
    format!("the io_uring floor was not measured: the floor writer cannot use io_uring ({why})")
}

pub fn source_ips(n: u8) -> Vec<IpAddr> {
    (0..n)
        .map(|i| IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2 + i)))
        .collect()
}

/// A writer child and its receivers, kept between phases so that a
/// scenario can measure the floor right before each of its own steps.
pub struct Writer {
    child: tokio::process::Child,
    pid: u32,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    conns: usize,
    /// Each phase is a step of the receivers' taps, in order.
    steps: Steps,
    phases: usize,
    next_phase: usize,
    receivers: Vec<(usize, usize)>,
    clients: Vec<Client>,
    /// Why the writer cannot use io_uring, if it cannot.
    uring_unavailable: Option<String>,
    errors: Errors,
}

impl Writer {
    /// Starts the writer child and connects `conns` receivers to it, for up
    /// to `phases` phases.
    pub async fn start(conns: usize, sources: &[IpAddr], phases: usize) -> Result<Writer> {
        if conns == 0 {
            bail!("--conns must be at least 1");
        }
        let exe = std::env::current_exe()?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["floor-writer", "--conns", &conns.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        herald_test_support::die_with_parent(&mut cmd);
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let mut child = cmd.spawn().context("could not start floor-writer")?;
        let pid = child.id().context("floor-writer has no pid")?;
        let stdin = child.stdin.take().context("floor-writer stdin")?;
        let lines = BufReader::new(child.stdout.take().context("floor-writer stdout")?).lines();
        let mut writer = Writer {
            child,
            pid,
            stdin,
            lines,
            conns,
            steps: Steps::new(phases, conns),
            phases,
            next_phase: 0,
            receivers: (0..conns).map(|g| (g, 0)).collect(),
            clients: Vec::with_capacity(conns),
            uring_unavailable: None,
            errors: Errors::default(),
        };
        let line = writer.next_line().await?;
        let addr: SocketAddr = line
            .strip_prefix("listening ")
            .context("floor-writer did not say where it listens")?
            .parse()?;
        let line = writer.next_line().await?;
        match line.strip_prefix("uring ") {
            Some("ok") => {}
            Some(why) => writer.uring_unavailable = Some(why.to_owned()),
            None => bail!("floor-writer did not say whether it has io_uring: {line}"),
        }
        let url = format!("ws://{addr}/ws");

        // Connect the receivers, receiver `g` reading through its own tap.
        let steps = writer.steps.clone();
        let opened: Vec<_> = futures::stream::iter(0..conns)
            .map(|g| {
                let url = url.clone();
                let source = sources[g % sources.len()];
                let tap = steps.herald_tap(g, 1);
                async move { Client::connect_tapped(&url, "floor", Some(source), tap).await }
            })
            .buffer_unordered(CONNECT_CONCURRENCY)
            .collect()
            .await;
        for c in opened {
            match c {
                Ok((client, _)) => writer.clients.push(client),
                Err(e) => writer.errors.add("connect", &e),
            }
        }
        if writer.clients.len() < conns {
            bail!(
                "only {} of {conns} receivers could connect to the floor writer: {}",
                writer.clients.len(),
                writer.errors.to_json()
            );
        }
        let ready = writer.next_line().await?;
        if ready != "ready" {
            bail!("floor-writer: {ready}");
        }
        Ok(writer)
    }

    async fn next_line(&mut self) -> Result<String> {
        match tokio::time::timeout(Duration::from_secs(600), self.lines.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => bail!("floor-writer ended early"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!("floor-writer silent for 10 minutes"),
        }
    }

    /// Why the writer cannot use io_uring, if it cannot.
    pub fn uring_unavailable(&self) -> Option<&str> {
        self.uring_unavailable.as_deref()
    }

    /// Runs one phase and returns what it cost; `None` for an io_uring
    /// phase where the writer has no io_uring ([`Writer::uring_unavailable`]).
    pub async fn phase(&mut self, phase: Phase) -> Result<Option<FloorResult>> {
        if phase.send != Send::Write && self.uring_unavailable.is_some() {
            return Ok(None);
        }
        let step = self.next_phase;
        if step >= self.phases {
            bail!("the floor writer was started for {} phases", self.phases);
        }
        self.next_phase += 1;
        let writer_start = cpu_sample(self.pid).context("floor-writer's /proc/<pid>/task")?;
        let bench_start = cpu_sample(std::process::id()).unwrap_or_default();
        let started = Instant::now();
        self.stdin
            .write_all(
                format!(
                    "go {} {} {} {step} {}\n",
                    phase.frames_per_write,
                    phase.rounds,
                    phase.round_rate,
                    phase.send.word()
                )
                .as_bytes(),
            )
            .await?;
        self.stdin.flush().await?;
        let done = self.next_line().await?;
        let writer_end = cpu_sample(self.pid).context("floor-writer's /proc/<pid>/task")?;
        let wall_s = started.elapsed().as_secs_f64();
        let (writes, syscalls): (u64, u64) = done
            .strip_prefix("done ")
            .and_then(|rest| {
                let (w, s) = rest.split_once(' ')?;
                Some((w.parse().ok()?, s.parse().ok()?))
            })
            .with_context(|| format!("floor-writer: {done}"))?;
        let frames = writes * phase.frames_per_write as u64;
        // Wait for the receivers to read what was written.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.steps.delivered(step) < frames && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let bench_end = cpu_sample(std::process::id()).unwrap_or_default();
        let (received, latency) = self.steps.snapshot(step);
        let per_receiver = phase.rounds * phase.frames_per_write as u64;
        let loss = self
            .steps
            .loss(step, &self.receivers, &Due::sequential(per_receiver));
        Ok(Some(FloorResult {
            phase,
            conns: self.conns,
            writes,
            syscalls,
            frames,
            writer: writer_end.since(&writer_start),
            wall_s,
            receivers_s: bench_end.since(&bench_start).secs(),
            received,
            loss,
            latency,
        }))
    }

    /// Stops the writer; returns the receivers' errors.
    pub async fn finish(mut self) -> Errors {
        // A receiver whose connection ended before the writer did lost it.
        let lost = self.clients.iter().filter(|c| c.is_closed()).count();
        for _ in 0..lost {
            self.errors.add_kind(
                "receiver: connection lost",
                "a floor receiver's connection ended before the writer stopped",
            );
        }
        let _ = self.stdin.write_all(b"quit\n").await;
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        self.errors
    }
}

/// The hidden `floor-writer` command (the writer child).
#[derive(Args, Debug, Clone)]
pub struct WriterArgs {
    /// Connections to accept before saying `ready`.
    #[arg(long)]
    pub conns: usize,
}

/// The writer child: prints `listening ADDR` and `uring ok` (or `uring
/// <why not>`), accepts and upgrades `conns` connections, prints `ready`,
/// then obeys lines on stdin: `go K ROUNDS RATE STEP write|uring:<batch>`
/// (prints `done WRITES SYSCALLS`) and `quit`.
pub fn writer_main(args: &WriterArgs) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening {}", listener.local_addr()?)?;
    let uring = if std::env::var_os(NO_URING_ENV).is_some() {
        Err(format!("{NO_URING_ENV} is set"))
    } else {
        uring::Batcher::new(URING_BATCH)
            .map(drop)
            .map_err(|e| e.to_string())
    };
    match &uring {
        Ok(()) => writeln!(out, "uring ok")?,
        Err(why) => writeln!(out, "uring {why}")?,
    }
    out.flush()?;
    let faults = Faults::from_env()?;
    let mut rings = Rings::default();
    let mut socks = Vec::with_capacity(args.conns);
    while socks.len() < args.conns {
        let (mut sock, _) = listener.accept()?;
        sock.set_nodelay(true)?;
        let i = socks.len();
        handshake(&mut sock, i).with_context(|| format!("handshake of connection {i}"))?;
        socks.push(sock);
    }
    drop(listener);
    writeln!(out, "ready")?;
    out.flush()?;

    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["go", k, rounds, rate, step, send] => {
                let go = Go {
                    k: k.parse::<usize>()?.max(1),
                    rounds: rounds.parse()?,
                    rate: rate.parse()?,
                    step: step.parse()?,
                    send: Send::parse(send)?,
                };
                let (writes, syscalls) = go.run(&mut socks, &mut rings, &faults)?;
                writeln!(out, "done {writes} {syscalls}")?;
                out.flush()?;
            }
            ["quit"] => break,
            _ => bail!("floor-writer: unknown command {line:?}"),
        }
    }
    Ok(())
}

/// One phase of the writer child: `rounds` rounds at `rate` a second (0:
/// at once), each writing frames `round * k ..` of phase `step` to every
/// connection.
struct Go {
    k: usize,
    rounds: u64,
    rate: f64,
    step: usize,
    send: Send,
}

impl Go {
    /// Writes the phase; returns the writes and the system calls made.
    fn run(
        &self,
        socks: &mut [TcpStream],
        rings: &mut Rings,
        faults: &Faults,
    ) -> Result<(u64, u64)> {
        let mut batcher = match self.send {
            Send::Write => None,
            // Made on the first phase with this batch (a few µs of its
            // CPU), then reused.
            Send::Uring { batch } => Some(rings.get(batch)?),
        };
        let start = Instant::now();
        let (mut writes, mut syscalls) = (0u64, 0u64);
        let mut held: Option<(usize, Vec<u8>)> = None;
        let mut buf = Vec::new();
        for r in 0..self.rounds {
            if self.rate > 0.0 {
                let at = start + Duration::from_secs_f64(r as f64 / self.rate);
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
            }
            round_bytes(&mut buf, self.step, r, self.k);
            match &mut batcher {
                Some(b) => {
                    let sent = b.send_to_all(std::mem::take(&mut buf), socks)?;
                    buf = sent.buf;
                    writes += socks.len() as u64;
                    syscalls += sent.syscalls;
                }
                None if faults.is_empty() => {
                    for s in socks.iter_mut() {
                        s.write_all(&buf)?;
                    }
                    writes += socks.len() as u64;
                    syscalls += socks.len() as u64;
                }
                None => {
                    let n = faults.write_round(socks, r, &buf, &mut held)?;
                    writes += n;
                    syscalls += n;
                }
            }
        }
        if let Some((c, late)) = held.take() {
            socks[c].write_all(&late)?;
            writes += 1;
            syscalls += 1;
        }
        Ok((writes, syscalls))
    }
}

/// The writer's io_uring rings, one per batch size asked for, kept from
/// one phase to the next.
#[derive(Default)]
struct Rings(Vec<uring::Batcher>);

impl Rings {
    fn get(&mut self, batch: usize) -> Result<&mut uring::Batcher> {
        let at = match self.0.iter().position(|b| b.batch() == batch) {
            Some(at) => at,
            None => {
                self.0.push(uring::Batcher::new(batch)?);
                self.0.len() - 1
            }
        };
        Ok(&mut self.0[at])
    }
}

/// The misbehaviour [`FAULTS_ENV`] asks of the plain writes, by
/// (connection, round).
#[derive(Default)]
struct Faults {
    drop: Vec<(usize, u64)>,
    dup: Vec<(usize, u64)>,
    swap: Vec<(usize, u64)>,
}

impl Faults {
    fn from_env() -> Result<Faults> {
        let mut faults = Faults::default();
        let Ok(spec) = std::env::var(FAULTS_ENV) else {
            return Ok(faults);
        };
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            let (kind, at) = item
                .split_once('=')
                .with_context(|| format!("{FAULTS_ENV}: {item:?} is not KIND=C:R"))?;
            let (c, r) = at
                .split_once(':')
                .with_context(|| format!("{FAULTS_ENV}: {item:?} is not KIND=C:R"))?;
            let at = (c.parse()?, r.parse()?);
            match kind {
                "drop" => faults.drop.push(at),
                "dup" => faults.dup.push(at),
                "swap" => faults.swap.push(at),
                _ => bail!("{FAULTS_ENV}: unknown fault {kind:?}"),
            }
        }
        Ok(faults)
    }

    fn is_empty(&self) -> bool {
        self.drop.is_empty() && self.dup.is_empty() && self.swap.is_empty()
    }

    /// Writes round `r` to every connection but as the faults say; a
    /// swapped round waits in `held` until the next is written. Returns
    /// the writes made.
    fn write_round(
        &self,
        socks: &mut [TcpStream],
        r: u64,
        buf: &[u8],
        held: &mut Option<(usize, Vec<u8>)>,
    ) -> Result<u64> {
        let mut writes = 0;
        for (c, s) in socks.iter_mut().enumerate() {
            if self.drop.contains(&(c, r)) {
                continue;
            }
            if self.swap.contains(&(c, r)) {
                *held = Some((c, buf.to_vec()));
                continue;
            }
            let times = if self.dup.contains(&(c, r)) { 2 } else { 1 };
            for _ in 0..times {
                s.write_all(buf)?;
                writes += 1;
            }
            if let Some((_, late)) = held.take_if(|(held_c, _)| *held_c == c) {
                s.write_all(&late)?;
                writes += 1;
            }
        }
        Ok(writes)
    }
}

/// Server side of the upgrade and of `connect`, just enough for
/// `herald-client`.
fn handshake(sock: &mut TcpStream, i: usize) -> Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut tmp = [0u8; 1024];
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = sock.read(&mut tmp)?;
        if n == 0 {
            bail!("closed during the upgrade");
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let key = header("sec-websocket-key").context("no Sec-WebSocket-Key")?;
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    let protocol = match header("sec-websocket-protocol") {
        Some(p) if p.split(',').any(|p| p.trim() == "herald.v1") => {
            "Sec-WebSocket-Protocol: herald.v1\r\n"
        }
        _ => "",
    };
    sock.write_all(
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n{protocol}\r\n"
        )
        .as_bytes(),
    )?;

    // The client's `connect` frame (masked).
    let mut rest = buf[end..].to_vec();
    let mut need = |n: usize, rest: &mut Vec<u8>| -> Result<Vec<u8>> {
        while rest.len() < n {
            let got = sock.read(&mut tmp)?;
            if got == 0 {
                bail!("closed before connect");
            }
            rest.extend_from_slice(&tmp[..got]);
        }
        Ok(rest.drain(..n).collect())
    };
    let h = need(2, &mut rest)?;
    let masked = h[1] & 0x80 != 0;
    let len = match h[1] & 0x7f {
        126 => u16::from_be_bytes(need(2, &mut rest)?.try_into().unwrap()) as usize,
        127 => u64::from_be_bytes(need(8, &mut rest)?.try_into().unwrap()) as usize,
        n => n as usize,
    };
    let mask = if masked {
        need(4, &mut rest)?
    } else {
        vec![0; 4]
    };
    let mut payload = need(len, &mut rest)?;
    for (j, b) in payload.iter_mut().enumerate() {
        *b ^= mask[j % 4];
    }
    let req: Value = serde_json::from_slice(&payload).context("connect frame is not JSON")?;
    let reply = json!({
        "op": "connected",
        "id": req["id"],
        "conn": format!("floor-{i}"),
        "user": "floor",
        "node": "floor-writer",
        "heartbeat_ms": 0,
        "unread": {},
    });
    sock.write_all(&text_frame(reply.to_string().as_bytes()))?;
    Ok(())
}
