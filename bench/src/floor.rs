//! `floor`: what the kernel charges a server for one small write on this
//! machine, measured with the same receivers as the Herald scenarios.
//!
//! A writer child process (`herald-bench floor-writer`, hidden) listens on
//! loopback, accepts `--conns` connections of `herald-client` clients,
//! completes their WebSocket upgrade and answers their `connect` with a
//! `connected` frame, like an edge would. Then, per phase, it writes one
//! pre-built ~100-byte text frame (`{"op":"message",...}`) to each
//! connection per round, from one thread with blocking `write`s, `--rounds`
//! rounds paced at `--round-rate` rounds a second; a phase with K frames per
//! write writes K copies of the frame in one `write`. The writer's CPU time
//! (utime + stime from `/proc/<pid>/stat`) over the phase divided by the
//! writes is the floor per write; divided by the frames, per message.
//!
//! The receivers are the same `herald-client` clients (a reader task per
//! connection parsing every frame as JSON) as in `fanout`, so a receiver
//! wakes per write the same way.

use std::io::{BufRead, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::Args;
use futures::StreamExt as _;
use herald_client::Client;
use serde_json::{Value, json};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::procfs::{CpuUsed, cpu_sample};
use crate::report::{Errors, Report, Section, round3};

/// How many clients open their connection at the same time.
const CONNECT_CONCURRENCY: usize = 64;

/// The frame every write carries: a `message` frame the size of a small
/// chat message (100 bytes of payload).
fn frame_payload() -> Vec<u8> {
    let mut text = json!({
        "op": "message",
        "room": "floor:bench",
        "data": {"seq": 0, "pad": ""},
        "from": "server",
        "ts": 1_764_000_000_000u64,
    })
    .to_string();
    let pad = 100usize.saturating_sub(text.len());
    text = text.replace("\"pad\":\"\"", &format!("\"pad\":\"{}\"", "x".repeat(pad)));
    text.into_bytes()
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

/// One phase of the writer.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub frames_per_write: usize,
    pub rounds: u64,
    pub round_rate: f64,
}

/// What one phase cost.
#[derive(Debug, Clone)]
pub struct FloorResult {
    pub phase: Phase,
    pub conns: usize,
    pub writes: u64,
    pub frames: u64,
    pub writer: CpuUsed,
    pub wall_s: f64,
    /// CPU of the bench process (the receivers) over the phase.
    pub receivers_s: f64,
    /// Frames the receivers got in this phase.
    pub received: u64,
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
        Section::new()
            .put("frames_per_write", self.phase.frames_per_write)
            .put("conns", self.conns)
            .put("rounds", self.phase.rounds)
            .put("round_rate", self.phase.round_rate)
            .put("writes", self.writes)
            .put("frames", self.frames)
            .put("received", self.received)
            .put("missing", self.frames.saturating_sub(self.received))
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
    }
}

/// The `floor` command.
pub async fn run(cmd: &FloorCmd) -> Result<Report> {
    let args = &cmd.floor;
    let phases: Vec<Phase> = args
        .frames_per_write
        .iter()
        .map(|&k| Phase {
            frames_per_write: k,
            rounds: if k > 1 {
                args.coalesced_rounds.unwrap_or((args.rounds / 4).max(1))
            } else {
                args.rounds
            },
            round_rate: args.round_rate,
        })
        .collect();
    let sources = source_ips(cmd.source_addrs);
    let mut report = Report::new(
        "floor",
        "none",
        "a bare writer (herald-bench floor-writer, one thread, blocking writes) on loopback".into(),
        json!({
            "conns": args.conns,
            "rounds": args.rounds,
            "round_rate": args.round_rate,
            "frames_per_write": args.frames_per_write,
            "frame_bytes": text_frame(&frame_payload()).len(),
            "source_addrs": cmd.source_addrs,
        }),
    );
    let (results, errors) = measure(args.conns, &phases, &sources).await?;
    for r in &results {
        if r.received < r.frames {
            report.failures.push(format!(
                "{} frames per write: {} of {} frames did not arrive",
                r.phase.frames_per_write,
                r.frames - r.received,
                r.frames
            ));
        }
        report.section(
            &format!("frames_per_write_{}", r.phase.frames_per_write),
            r.section(),
        );
    }
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

pub fn source_ips(n: u8) -> Vec<IpAddr> {
    (0..n)
        .map(|i| IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2 + i)))
        .collect()
}

/// Starts a writer child with `conns` connections of `herald-client`
/// clients, runs `phases` one after the other, and returns their costs.
pub async fn measure(
    conns: usize,
    phases: &[Phase],
    sources: &[IpAddr],
) -> Result<(Vec<FloorResult>, Errors)> {
    let mut writer = Writer::start(conns, sources).await?;
    let mut results = Vec::with_capacity(phases.len());
    for &phase in phases {
        results.push(writer.phase(phase).await?);
    }
    Ok((results, writer.finish().await))
}

/// A writer child and its receivers, kept between phases so that a
/// scenario can measure the floor right before each of its own steps.
pub struct Writer {
    child: tokio::process::Child,
    pid: u32,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    conns: usize,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    readers: Vec<tokio::task::JoinHandle<Option<String>>>,
    errors: Errors,
}

impl Writer {
    /// Starts the writer child and connects `conns` receivers to it.
    pub async fn start(conns: usize, sources: &[IpAddr]) -> Result<Writer> {
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
            received: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            readers: Vec::new(),
            errors: Errors::default(),
        };
        let line = writer.next_line().await?;
        let addr: SocketAddr = line
            .strip_prefix("listening ")
            .context("floor-writer did not say where it listens")?
            .parse()?;
        let url = format!("ws://{addr}/ws");

        // Connect the receivers.
        let opened: Vec<_> = futures::stream::iter(0..conns)
            .map(|i| {
                let url = url.clone();
                let source = sources[i % sources.len()];
                async move { Client::connect_from(&url, "floor", Some(source)).await }
            })
            .buffer_unordered(CONNECT_CONCURRENCY)
            .collect()
            .await;
        let mut clients = Vec::with_capacity(conns);
        for c in opened {
            match c {
                Ok((client, _)) => clients.push(client),
                Err(e) => writer.errors.add("connect", &e),
            }
        }
        if clients.len() < conns {
            bail!(
                "only {} of {conns} receivers could connect to the floor writer: {}",
                clients.len(),
                writer.errors.to_json()
            );
        }
        let ready = writer.next_line().await?;
        if ready != "ready" {
            bail!("floor-writer: {ready}");
        }
        writer.readers = clients
            .into_iter()
            .map(|c| {
                tokio::spawn(count_messages(
                    c,
                    writer.received.clone(),
                    writer.stop.clone(),
                ))
            })
            .collect();
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

    /// Runs one phase and returns what it cost.
    pub async fn phase(&mut self, phase: Phase) -> Result<FloorResult> {
        let before = self.received.load(Ordering::Relaxed);
        let writer_start = cpu_sample(self.pid).context("floor-writer's /proc/<pid>/task")?;
        let bench_start = cpu_sample(std::process::id()).unwrap_or_default();
        let started = Instant::now();
        self.stdin
            .write_all(
                format!(
                    "go {} {} {}\n",
                    phase.frames_per_write, phase.rounds, phase.round_rate
                )
                .as_bytes(),
            )
            .await?;
        self.stdin.flush().await?;
        let done = self.next_line().await?;
        let writer_end = cpu_sample(self.pid).context("floor-writer's /proc/<pid>/task")?;
        let wall_s = started.elapsed().as_secs_f64();
        let writes: u64 = done
            .strip_prefix("done ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("floor-writer: {done}"))?;
        let frames = writes * phase.frames_per_write as u64;
        // Wait for the receivers to read what was written.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.received.load(Ordering::Relaxed) - before < frames && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let bench_end = cpu_sample(std::process::id()).unwrap_or_default();
        Ok(FloorResult {
            phase,
            conns: self.conns,
            writes,
            frames,
            writer: writer_end.since(&writer_start),
            wall_s,
            receivers_s: bench_end.since(&bench_start).secs(),
            received: self.received.load(Ordering::Relaxed) - before,
        })
    }

    /// Stops the writer; returns the receivers' errors.
    pub async fn finish(mut self) -> Errors {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.stdin.write_all(b"quit\n").await;
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        for r in self.readers {
            if let Ok(Some(e)) = r.await {
                self.errors.add_kind("receiver", &e);
            }
        }
        self.errors
    }
}

/// Reads frames until the connection ends; counts `message` frames. Returns
/// an error description if the connection ended before `stop`.
async fn count_messages(
    client: Client,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Option<String> {
    loop {
        match client.next_frame(Duration::from_millis(500)).await {
            Ok(Some(frame)) => {
                if frame["op"] == "message" {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(None) => {}
            Err(e) => {
                return (!stop.load(Ordering::Relaxed)).then(|| e.to_string());
            }
        }
    }
}

/// The hidden `floor-writer` command (the writer child).
#[derive(Args, Debug, Clone)]
pub struct WriterArgs {
    /// Connections to accept before saying `ready`.
    #[arg(long)]
    pub conns: usize,
}

/// The writer child: prints `listening ADDR`, accepts and upgrades
/// `conns` connections, prints `ready`, then obeys lines on stdin:
/// `go K ROUNDS RATE` (prints `done WRITES`) and `quit`.
pub fn writer_main(args: &WriterArgs) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening {}", listener.local_addr()?)?;
    out.flush()?;
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

    let frame = text_frame(&frame_payload());
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["go", k, rounds, rate] => {
                let (k, rounds, rate): (usize, u64, f64) =
                    (k.parse()?, rounds.parse()?, rate.parse()?);
                let buf = frame.repeat(k.max(1));
                let start = Instant::now();
                let mut writes = 0u64;
                for r in 0..rounds {
                    if rate > 0.0 {
                        let at = start + Duration::from_secs_f64(r as f64 / rate);
                        let now = Instant::now();
                        if at > now {
                            std::thread::sleep(at - now);
                        }
                    }
                    for s in &mut socks {
                        s.write_all(&buf)?;
                        writes += 1;
                    }
                }
                writeln!(out, "done {writes}")?;
                out.flush()?;
            }
            ["quit"] => break,
            _ => bail!("floor-writer: unknown command {line:?}"),
        }
    }
    Ok(())
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
