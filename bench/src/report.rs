//! Results shared by every scenario: latency histograms, error tallies, CPU
//! time per process, and the report printed as a table and written as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use herald_client::ClientError;
use serde_json::{Map, Value, json};

use crate::procfs::{CpuSample, CpuUsed, cpu_sample, rss_bytes};
use crate::target::{CpuProbe, NatsStats, Role, Target};

/// Latencies in microseconds, 1 µs to 10 minutes, 3 significant digits.
#[derive(Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency(Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"))
    }
}

impl Latency {
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        self.0.saturating_record(us);
    }

    pub fn merge(&mut self, other: &Latency) {
        self.0
            .add(&other.0)
            .expect("histograms with the same bounds merge");
    }

    fn ms(us: u64) -> f64 {
        us as f64 / 1000.0
    }

    /// `{count, mean, p50, p90, p99, p999, max}`, in milliseconds; `null`s when empty.
    pub fn summary(&self) -> Value {
        if self.0.is_empty() {
            return json!({"count": 0, "mean": null, "p50": null, "p90": null, "p99": null, "p999": null, "max": null});
        }
        let q = |q: f64| Self::ms(self.0.value_at_quantile(q));
        json!({
            "count": self.0.len(),
            "mean": round3(self.0.mean() / 1000.0),
            "p50": q(0.50),
            "p90": q(0.90),
            "p99": q(0.99),
            "p999": q(0.999),
            "max": Self::ms(self.0.max()),
        })
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Six decimals: CPU seconds to the microsecond.
pub fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// Errors by kind ("connect: timed out", "join: unavailable", ...), each
/// with the first full message seen.
#[derive(Default, Clone)]
pub struct Errors {
    by_kind: BTreeMap<String, (u64, String)>,
}

impl Errors {
    pub fn add(&mut self, stage: &str, e: &ClientError) {
        let kind = match e {
            ClientError::Connect(_) => "cannot open WebSocket".to_owned(),
            ClientError::Rejected { status } => format!("HTTP {status}"),
            ClientError::Closed { code: Some(c), .. } => format!("closed {c}"),
            ClientError::Closed { code: None, .. } => "connection lost".to_owned(),
            ClientError::Timeout(_) => "timed out".to_owned(),
            ClientError::Protocol(m) => {
                // "code: message" for refusals; keep the code only.
                m.split(':').next().unwrap_or("protocol").to_owned()
            }
            ClientError::Io(io) => format!("io {:?}", io.kind()),
        };
        self.add_kind(&format!("{stage}: {kind}"), &e.to_string());
    }

    /// An `error` frame answering a request.
    pub fn add_reply(&mut self, stage: &str, reply: &Value) {
        let code = reply["code"].as_str().unwrap_or("unexpected reply");
        self.add_kind(&format!("{stage}: {code}"), &reply.to_string());
    }

    pub fn add_kind(&mut self, kind: &str, example: &str) {
        let entry = self
            .by_kind
            .entry(kind.to_owned())
            .or_insert_with(|| (0, example.chars().take(300).collect()));
        entry.0 += 1;
    }

    pub fn merge(&mut self, other: &Errors) {
        for (kind, (n, example)) in &other.by_kind {
            let entry = self
                .by_kind
                .entry(kind.clone())
                .or_insert_with(|| (0, example.clone()));
            entry.0 += n;
        }
    }

    pub fn total(&self) -> u64 {
        self.by_kind.values().map(|(n, _)| n).sum()
    }

    /// `{kind: {count, example}}`.
    pub fn to_json(&self) -> Value {
        let map: Map<String, Value> = self
            .by_kind
            .iter()
            .map(|(k, (n, ex))| (k.clone(), json!({"count": n, "example": ex})))
            .collect();
        Value::Object(map)
    }
}

/// CPU time of every process over one phase of a scenario (nanoseconds on
/// a CPU, see [`crate::procfs`]), and the NATS traffic of the phase.
pub struct CpuMeter {
    probes: Vec<CpuProbe>,
    start: Vec<Option<CpuSample>>,
    rss_start: Vec<Option<u64>>,
    nats: Option<NatsStats>,
    labels: Labels,
    started: Instant,
}

/// How the table names the sums of the server processes (`Role::Herald`)
/// and of them with the broker (`Role::Nats`).
#[derive(Clone, Copy)]
pub struct Labels {
    pub servers: &'static str,
    pub with_broker: &'static str,
}

impl Labels {
    pub const HERALD: Labels = Labels {
        servers: "all Herald processes",
        with_broker: "Herald + nats-server",
    };
    /// The Socket.IO peer: its servers count as `Role::Herald` (the system
    /// under test), Redis as `Role::Nats` (the broker).
    pub const SOCKETIO: Labels = Labels {
        servers: "all Socket.IO servers",
        with_broker: "Socket.IO servers + Redis",
    };
}

impl CpuMeter {
    pub fn start(target: &Target) -> CpuMeter {
        Self::with_probes(target.cpu_probes(), target.nats_stats(), Labels::HERALD)
    }

    /// Measures `probes` (with `Role::Herald` for the system's servers and
    /// `Role::Nats` for its broker), without a Herald target.
    pub fn with_probes(probes: Vec<CpuProbe>, nats: Option<NatsStats>, labels: Labels) -> CpuMeter {
        let start = probes.iter().map(|p| cpu_sample(p.pid)).collect();
        let rss_start = probes.iter().map(|p| rss_bytes(p.pid)).collect();
        CpuMeter {
            probes,
            start,
            rss_start,
            nats,
            labels,
            started: Instant::now(),
        }
    }

    pub fn stop(self, target: &Target) -> CpuPhase {
        let end = target.nats_stats();
        self.stop_with(end)
    }

    /// Ends the phase; `nats_end` are the broker counters now, if any.
    pub fn stop_with(self, nats_end: Option<NatsStats>) -> CpuPhase {
        let nats = match (self.nats, nats_end) {
            (Some(start), Some(end)) => Some(end.since(&start)),
            _ => None,
        };
        let labels = self.labels;
        let wall = self.started.elapsed().as_secs_f64();
        let processes = self
            .probes
            .iter()
            .zip(self.start.iter().zip(&self.rss_start))
            .filter_map(|(probe, (start, rss_start))| {
                let used = cpu_sample(probe.pid)?.since(start.as_ref()?);
                let rss = (rss_start.unwrap_or(0), rss_bytes(probe.pid).unwrap_or(0));
                Some((probe.clone(), used, rss))
            })
            .collect();
        CpuPhase {
            wall,
            processes,
            nats,
            labels,
        }
    }
}

/// CPU time each process used during a phase of `wall` seconds.
pub struct CpuPhase {
    wall: f64,
    /// CPU time, and RSS in bytes at the start and at the end.
    processes: Vec<(CpuProbe, CpuUsed, (u64, u64))>,
    /// What went through nats-server meanwhile (cluster only).
    pub nats: Option<NatsStats>,
    labels: Labels,
}

impl CpuPhase {
    /// CPU seconds of all Herald processes.
    pub fn herald_s(&self) -> f64 {
        self.sum(Some(Role::Herald))
    }

    /// CPU seconds of nats-server, if one runs.
    pub fn nats_s(&self) -> Option<f64> {
        let nats = Some(Role::Nats);
        self.processes
            .iter()
            .any(|(p, ..)| p.role == nats)
            .then(|| self.sum(nats))
    }

    /// Each server process's CPU (Herald's and the broker's, not the
    /// bench's) in µs per one of `n` events, by name.
    pub fn per_process_us(&self, n: u64) -> Value {
        let map: Map<String, Value> = self
            .processes
            .iter()
            .filter(|(p, ..)| p.role.is_some())
            .map(|(p, t, _)| {
                (
                    p.name.clone(),
                    json!(round3(t.secs() * 1e6 / n.max(1) as f64)),
                )
            })
            .collect();
        Value::Object(map)
    }

    /// CPU seconds of the bench itself (the load generator and receivers).
    pub fn load_s(&self) -> f64 {
        self.sum(None)
    }

    fn sum(&self, role: Option<Role>) -> f64 {
        self.processes
            .iter()
            .filter(|(p, ..)| p.role == role)
            .map(|(_, t, _)| t.secs())
            .sum()
    }

    /// `{wall_s, processes: {name: cpu_s}, processes_ns: {name: ns on a
    /// CPU}, processes_system: {name: cpu_s in the kernel}, rss_mb: {name:
    /// [start, end]}, herald_s, nats_s, load_s, nats_traffic}`, and
    /// `threads_exited: {name: n}` for processes with threads that ended
    /// during the phase (their time is missing). `processes`, `herald_s`,
    /// `nats_s` and `load_s` are schedstat's nanoseconds as seconds;
    /// `processes_system` is stime (clock ticks).
    fn to_json(&self) -> Value {
        let by_name = |f: &dyn Fn(&CpuUsed, (u64, u64)) -> Value| -> Map<String, Value> {
            self.processes
                .iter()
                .map(|(p, t, rss)| (p.name.clone(), f(t, *rss)))
                .collect()
        };
        let mb = |b: u64| round3(b as f64 / (1 << 20) as f64);
        let exited: Map<String, Value> = self
            .processes
            .iter()
            .filter(|(_, t, _)| t.threads_exited > 0)
            .map(|(p, t, _)| (p.name.clone(), json!(t.threads_exited)))
            .collect();
        json!({
            "wall_s": round3(self.wall),
            "processes": by_name(&|t, _| json!(round6(t.secs()))),
            "processes_ns": by_name(&|t, _| json!(t.on_cpu_ns)),
            "processes_system": by_name(&|t, _| json!(round3(t.ticks.system))),
            "rss_mb": by_name(&|_, (a, b)| json!([mb(a), mb(b)])),
            "herald_s": round6(self.sum(Some(Role::Herald))),
            "nats_s": round6(self.sum(Some(Role::Nats))),
            "load_s": round6(self.sum(None)),
            "threads_exited": exited,
            "nats_traffic": self.nats.map(|n| json!({
                "in_msgs": n.in_msgs,
                "out_msgs": n.out_msgs,
                "in_bytes": n.in_bytes,
                "out_bytes": n.out_bytes,
                "sub_inserts": n.sub_inserts,
                "sub_removes": n.sub_removes,
                "js_api_calls": n.js_api_calls,
                "js_api_errors": n.js_api_errors,
                "subscriptions_at_start": n.subscriptions_at_start,
                "subscriptions_at_end": n.subscriptions,
            })),
        })
    }

    fn table(&self, phase: &str, out: &mut String) {
        let wall = self.wall;
        let _ = writeln!(out, "\ncpu during {phase} ({wall:.1} s wall)");
        let _ = writeln!(
            out,
            "  {:<W$} {:>8}  {:>6}  {:>8}  {:>17}",
            "", "cpu s", "% core", "kernel %", "RSS MiB start→end"
        );
        let herald = self.sum(Some(Role::Herald));
        let nats = self.sum(Some(Role::Nats));
        let rows = self
            .processes
            .iter()
            .map(|(p, t, rss)| (p.name.as_str(), t.secs(), Some((t.kernel_share(), *rss))))
            .chain([
                (self.labels.servers, herald, None),
                (self.labels.with_broker, herald + nats, None),
            ]);
        for (name, s, detail) in rows {
            let (kernel, rss) = match detail {
                Some((k, (a, b))) => (
                    if s > 0.0 {
                        format!("{:>7.0}%", 100.0 * k)
                    } else {
                        String::new()
                    },
                    format!(
                        "{:>7.1} → {:>7.1}",
                        a as f64 / (1 << 20) as f64,
                        b as f64 / (1 << 20) as f64
                    ),
                ),
                None => (String::new(), String::new()),
            };
            let _ = writeln!(
                out,
                "  {name:<W$} {s:>8.2}  {:>5.0}%  {kernel:>8}  {rss:>17}",
                pct(s, wall)
            );
        }
        if let Some(n) = self.nats {
            let _ = writeln!(
                out,
                "  nats-server traffic: {} msgs in, {} out, {:.1} MB in, {:.1} MB out, \
                 {} subscriptions made, {} removed, {} → {} alive",
                n.in_msgs,
                n.out_msgs,
                n.in_bytes as f64 / 1e6,
                n.out_bytes as f64 / 1e6,
                n.sub_inserts,
                n.sub_removes,
                n.subscriptions_at_start,
                n.subscriptions
            );
        }
    }
}

/// Named values in the order they are shown in the table (the JSON object
/// made of them is sorted by key).
#[derive(Default, Clone)]
pub struct Section(Vec<(String, Value)>);

impl Section {
    pub fn new() -> Section {
        Section::default()
    }

    pub fn put(mut self, key: &str, value: impl Into<Value>) -> Section {
        self.0.push((key.to_owned(), value.into()));
        self
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn to_json(&self) -> Value {
        Value::Object(self.0.iter().cloned().collect())
    }
}

/// One scenario's results. `results` holds sections (numbers, latency
/// summaries, error tallies), `cpu` a CPU measurement per phase.
pub struct Report {
    pub scenario: String,
    pub target: String,
    pub description: String,
    pub params: Map<String, Value>,
    pub results: Vec<(String, Section)>,
    pub cpu: Vec<(String, CpuPhase)>,
    /// Versions of what ran: the kernel, nats-server, node, redis-server, ...
    pub versions: Map<String, Value>,
    pub notes: Vec<String>,
    pub failures: Vec<String>,
}

impl Report {
    pub fn new(scenario: &str, target: &str, description: String, params: Value) -> Report {
        Report {
            scenario: scenario.to_owned(),
            target: target.to_owned(),
            description,
            params: params.as_object().cloned().unwrap_or_default(),
            results: Vec::new(),
            cpu: Vec::new(),
            versions: Map::new(),
            notes: Vec::new(),
            failures: Vec::new(),
        }
    }

    pub fn section(&mut self, name: &str, values: Section) {
        self.results.push((name.to_owned(), values));
    }

    pub fn to_json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "target": self.target,
            "description": self.description,
            "unix_time": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            "params": self.params,
            "results": self
                .results
                .iter()
                .map(|(name, section)| (name.clone(), section.to_json()))
                .collect::<Map<String, Value>>(),
            "cpu": self
                .cpu
                .iter()
                .map(|(phase, cpu)| (phase.clone(), cpu.to_json()))
                .collect::<Map<String, Value>>(),
            "versions": self.versions,
            "notes": self.notes,
            "failures": self.failures,
        })
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={}", plain(v)))
            .collect();
        let _ = writeln!(
            out,
            "herald-bench {} on {}",
            self.scenario, self.description
        );
        let _ = writeln!(out, "  {}", params.join("  "));
        if !self.versions.is_empty() {
            let versions: Vec<String> = self
                .versions
                .iter()
                .map(|(k, v)| format!("{k} {}", plain(v)))
                .collect();
            let _ = writeln!(out, "  versions: {}", versions.join(", "));
        }
        for (name, section) in &self.results {
            let _ = writeln!(out, "\n{name}");
            for (key, value) in &section.0 {
                if is_latency(value) {
                    let _ = writeln!(out, "  {key:<W$} {}", latency_line(value));
                } else if let Some(map) = value.as_object() {
                    if map.is_empty() {
                        let _ = writeln!(out, "  {key:<W$} none");
                    }
                    for (k, v) in map {
                        let shown = match v.get("count") {
                            Some(n) => format!(
                                "{}  e.g. {}",
                                plain(n),
                                v["example"].as_str().unwrap_or("")
                            ),
                            None => plain(v),
                        };
                        let _ = writeln!(out, "  {key:<W$} {k}: {shown}");
                    }
                } else {
                    let _ = writeln!(out, "  {key:<W$} {}", plain(value));
                }
            }
        }
        for (phase, cpu) in &self.cpu {
            cpu.table(phase, &mut out);
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\nnotes");
            for n in &self.notes {
                let _ = writeln!(out, "  - {n}");
            }
        }
        if !self.failures.is_empty() {
            let _ = writeln!(out, "\nFAILED");
            for f in &self.failures {
                let _ = writeln!(out, "  - {f}");
            }
        }
        out
    }

    /// Prints the table, and writes the JSON where `json` says (`-` is one
    /// line on stdout, and the table then goes to stderr).
    pub fn emit(&self, json: Option<&Path>) -> Result<()> {
        emit(&self.table(), &self.to_json(), json)
    }
}

/// Prints `table`, and writes `value` as one JSON line to `json` (`-`:
/// stdout, the table then going to stderr).
pub fn emit(table: &str, value: &Value, json: Option<&Path>) -> Result<()> {
    let line = value.to_string();
    match json {
        Some(p) if p == Path::new("-") => {
            eprint!("{table}");
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{line}")?;
            stdout.flush()?;
        }
        Some(p) => {
            print!("{table}");
            std::fs::write(p, format!("{line}\n"))
                .with_context(|| format!("writing {}", p.display()))?;
        }
        None => print!("{table}"),
    }
    Ok(())
}

/// Width of the name column of the table.
const W: usize = 38;

fn pct(cpu: f64, wall: f64) -> f64 {
    if wall > 0.0 { 100.0 * cpu / wall } else { 0.0 }
}

fn is_latency(v: &Value) -> bool {
    v.get("p99").is_some() && v.get("count").is_some()
}

fn latency_line(v: &Value) -> String {
    let f = |k: &str| match v[k].as_f64() {
        Some(x) => format!("{x:.3}"),
        None => "-".into(),
    };
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {} ms  (n={})",
        f("p50"),
        f("p90"),
        f("p99"),
        f("p999"),
        f("max"),
        f("mean"),
        v["count"]
    )
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() => format!("{x:.2}"),
            _ => n.to_string(),
        },
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_summary_is_in_milliseconds() {
        let mut l = Latency::default();
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        let s = l.summary();
        assert_eq!(s["count"], 100);
        let p50 = s["p50"].as_f64().unwrap();
        assert!((49.9..=50.1).contains(&p50), "{s}");
        assert!((99.9..=100.1).contains(&s["max"].as_f64().unwrap()), "{s}");
        assert!(Latency::default().summary()["p99"].is_null());
    }

    #[test]
    fn errors_are_counted_by_stage_and_kind() {
        let mut e = Errors::default();
        e.add("connect", &ClientError::Timeout("slow".into()));
        e.add("connect", &ClientError::Timeout("slower".into()));
        e.add_reply("join", &json!({"op": "error", "code": "unavailable"}));
        let mut total = Errors::default();
        total.merge(&e);
        total.merge(&e);
        assert_eq!(total.total(), 6);
        let j = total.to_json();
        assert_eq!(j["connect: timed out"]["count"], 4);
        assert_eq!(j["connect: timed out"]["example"], "timed out: slow");
        assert_eq!(j["join: unavailable"]["count"], 2);
    }

    #[test]
    fn report_json_keeps_sections_and_table_shows_them() {
        let mut r = Report::new("churn", "dev", "herald dev".into(), json!({"workers": 2}));
        r.section(
            "churn",
            Section::new()
                .put("connects_per_sec", 12.5)
                .put("join_ms", Latency::default().summary()),
        );
        let j = r.to_json();
        assert_eq!(j["results"]["churn"]["connects_per_sec"], 12.5);
        assert_eq!(j["params"]["workers"], 2);
        let table = r.table();
        assert!(table.contains("connects_per_sec"), "{table}");
        assert!(table.contains("12.50"), "{table}");
    }
}
