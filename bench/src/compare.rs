//! `--vs-socketio`: the ratios Herald / Socket.IO of one `idle` or `fanout`
//! run against each, step by step, for the figures the mission's bars are
//! stated in (memory per idle connection, CPU per delivery, latency,
//! delivered rate, and each system's ratio to the bare-write floor).
//!
//! For `fanout`, Herald's CPU per delivery over Socket.IO's is given twice
//! per step: raw, and floor-normalised (each system's CPU per delivery
//! divided by the floor measured right before its own step, then one over
//! the other), which takes out what the machine's speed did between the two
//! steps; and per rate, the median of each over the rounds
//! (`cpu_per_delivery`).

use serde_json::{Value, json};

use crate::report::{Report, Section};

/// Figures compared, as (key in a step's section, optional field of it).
const FIGURES: &[(&str, Option<&str>)] = &[
    ("total_rss_kib_per_conn", None),
    ("total_rss_kib_per_conn_second_half", None),
    ("total_rss_kib_left_per_conn_after_close", None),
    ("total_rss_kib_regrowth_per_conn", None),
    ("rss_kib_per_conn", None),
    ("rss_kib_per_conn_second_half", None),
    ("edge_cpu_us_per_connect", None),
    ("nats_cpu_us_per_connect", None),
    ("delivered_per_sec", None),
    ("lost", None),
    ("missing", None),
    ("duplicates", None),
    ("out_of_order", None),
    ("server_us_per_delivery", None),
    ("floor_us_per_write", None),
    ("ratio_to_floor", None),
    ("floor_uring_us_per_write", None),
    ("ratio_to_floor_uring", None),
    ("latency_ms", Some("p50")),
    ("latency_ms", Some("p99")),
];

/// One figure of a step: `section[key]`, or `section[key][field]`.
pub fn figure(section: &Section, key: &str, field: Option<&str>) -> Option<f64> {
    let v = section.get(key)?;
    match field {
        Some(f) => v.get(f)?.as_f64(),
        None => v.as_f64(),
    }
}

/// Each of `figures` that both sections have: Herald's, Socket.IO's and
/// Herald / Socket.IO (`null` over a zero); with how many there were.
fn side_by_side(h: &Section, s: &Section, figures: &[(&str, Option<&str>)]) -> (Section, usize) {
    let mut section = Section::new();
    let mut compared = 0;
    for (key, field) in figures {
        let (Some(hv), Some(sv)) = (figure(h, key, *field), figure(s, key, *field)) else {
            continue;
        };
        let name = match field {
            Some(f) => format!("{key}.{f}"),
            None => (*key).to_owned(),
        };
        let ratio = if sv != 0.0 {
            Value::from(crate::report::round3(hv / sv))
        } else {
            Value::Null
        };
        section = section.put(
            &name,
            json!({"herald": hv, "socketio": sv, "herald_over_socketio": ratio}),
        );
        compared += 1;
    }
    (section, compared)
}

/// The median of `values`; `None` if there are none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// `[lowest, highest]` of `values`, rounded as the reports are; `null` if
/// there are none.
fn range(values: &[f64]) -> Value {
    if values.is_empty() {
        return Value::Null;
    }
    let lo = values.iter().copied().fold(f64::MAX, f64::min);
    let hi = values.iter().copied().fold(f64::MIN, f64::max);
    json!([crate::report::round3(lo), crate::report::round3(hi)])
}

/// One section per step found in both reports: each figure for Herald,
/// for Socket.IO, and Herald / Socket.IO.
pub fn ratios(herald: &Report, socketio: &Report) -> Report {
    if let Some(figures) = figures_of(&herald.scenario) {
        return ratios_of(herald, socketio, figures);
    }
    let mut out = Report::new(
        &herald.scenario,
        "herald vs socketio",
        format!(
            "Herald ({}) and Socket.IO ({}), same clients and options, {}",
            herald.target,
            socketio.target,
            if herald.params.contains_key("alternated") {
                "alternated round by round"
            } else {
                "one after the other"
            }
        ),
        json!({}),
    );
    for (step, h) in &herald.results {
        let Some((_, s)) = socketio.results.iter().find(|(name, _)| name == step) else {
            continue;
        };
        let (mut section, compared) = side_by_side(h, s, FIGURES);
        if let Some(cpu) = cpu_ratios(h, s) {
            section = section.put("cpu_per_delivery", cpu.to_json());
        }
        if compared > 0 {
            out.section(step, section);
        }
    }
    add_cpu_per_delivery(&mut out, herald, socketio);
    if out.results.is_empty() {
        out.notes
            .push("no step is in both reports: nothing to compare".into());
    }
    out
}

/// Herald's CPU per delivery over Socket.IO's in one step.
#[derive(Debug, Clone, Copy)]
struct CpuRatios {
    raw: f64,
    /// Each system's CPU per delivery over its own floor (`write` per
    /// delivery), then Herald's over Socket.IO's.
    floor_normalised: Option<f64>,
    /// The same with the io_uring floor.
    uring_floor_normalised: Option<f64>,
}

impl CpuRatios {
    fn to_json(self) -> Value {
        let r = |x: Option<f64>| x.map(crate::report::round3);
        json!({
            "raw": r(Some(self.raw)),
            "floor_normalised": r(self.floor_normalised),
            "uring_floor_normalised": r(self.uring_floor_normalised),
        })
    }
}

/// The CPU ratios of a step both reports have (`rate_<r>[_run<k>]`).
fn cpu_ratios(h: &Section, s: &Section) -> Option<CpuRatios> {
    let cpu = |x: &Section| figure(x, "server_us_per_delivery", None);
    let (hc, sc) = (cpu(h)?, cpu(s)?);
    if sc <= 0.0 {
        return None;
    }
    let normalised = |floor: &str| {
        let (hf, sf) = (figure(h, floor, None)?, figure(s, floor, None)?);
        (hf > 0.0 && sf > 0.0).then(|| (hc / hf) / (sc / sf))
    };
    Some(CpuRatios {
        raw: hc / sc,
        floor_normalised: normalised("floor_us_per_write"),
        uring_floor_normalised: normalised("floor_uring_us_per_write"),
    })
}

/// The rate of a step's section name: `20` of `rate_20` and
/// `rate_20_run3`; `None` for other sections.
fn step_rate(name: &str) -> Option<&str> {
    let rate = name.strip_prefix("rate_")?;
    Some(match rate.rsplit_once("_run") {
        Some((rate, run)) if run.parse::<u32>().is_ok() => rate,
        _ => rate,
    })
}

/// A `cpu_per_delivery` section: per rate, the median over its rounds of
/// Herald's CPU per delivery over Socket.IO's, raw and floor-normalised,
/// with the range of each (`[lowest, highest]`).
fn add_cpu_per_delivery(out: &mut Report, herald: &Report, socketio: &Report) {
    let mut by_rate: Vec<(&str, Vec<CpuRatios>)> = Vec::new();
    for (name, h) in &herald.results {
        let Some(rate) = step_rate(name) else {
            continue;
        };
        let Some((_, s)) = socketio.results.iter().find(|(n, _)| n == name) else {
            continue;
        };
        let Some(ratios) = cpu_ratios(h, s) else {
            continue;
        };
        match by_rate.iter_mut().find(|(r, _)| *r == rate) {
            Some((_, all)) => all.push(ratios),
            None => by_rate.push((rate, vec![ratios])),
        }
    }
    if by_rate.is_empty() {
        return;
    }
    let mut section = Section::new();
    for (rate, rounds) in by_rate {
        let summary = |pick: &dyn Fn(&CpuRatios) -> Option<f64>| {
            let values: Vec<f64> = rounds.iter().filter_map(pick).collect();
            let round = crate::report::round3;
            match median(&values) {
                Some(m) => json!({"median": round(m), "range": range(&values)}),
                None => Value::Null,
            }
        };
        section = section.put(
            &format!("rate_{rate}"),
            json!({
                "rounds": rounds.len(),
                "raw": summary(&|c| Some(c.raw)),
                "floor_normalised": summary(&|c| c.floor_normalised),
                "uring_floor_normalised": summary(&|c| c.uring_floor_normalised),
            }),
        );
    }
    out.section("cpu_per_delivery", section);
}

/// `churn`: cycles per second (the bar: Herald ≥ 3× Socket.IO) and the
/// server CPU per cycle, system and broker together (the bar: ≤ 0.3×).
const CHURN: &[(&str, Option<&str>)] = &[
    ("connects_per_sec", None),
    ("server_cpu_us_per_cycle", None),
    ("herald_cpu_us_per_cycle", None),
    ("nats_cpu_us_per_cycle", None),
    ("connect_ms", Some("p50")),
    ("connect_ms", Some("p99")),
    ("cycle_ms", Some("p50")),
    ("cycle_ms", Some("p99")),
    ("errors", None),
];

/// `reconnect-storm`: the time until every client has rejoined (the bar:
/// Herald ≤ 0.3× Socket.IO), per client, clients lost, server CPU per
/// reconnect, and messages the durable rooms' members missed.
const STORM: &[(&str, Option<&str>)] = &[
    ("all_rejoined_ms", None),
    ("rejoin_ms", Some("p50")),
    ("rejoin_ms", Some("p99")),
    ("rejoin_ms", Some("max")),
    ("lost", None),
    ("reconnects_per_sec", None),
    ("server_cpu_us_per_reconnect", None),
    ("herald_cpu_us_per_reconnect", None),
    ("nats_cpu_us_per_reconnect", None),
    ("missing", None),
    ("duplicates", None),
    ("clients_with_gaps", None),
];

/// The figures compared for scenarios whose sections are not `idle`'s or
/// `fanout`'s steps.
fn figures_of(scenario: &str) -> Option<&'static [(&'static str, Option<&'static str>)]> {
    match scenario {
        "churn" => Some(CHURN),
        "reconnect-storm" => Some(STORM),
        _ => None,
    }
}

/// The storm's bar: Herald's time until every client rejoined at most this
/// share of Socket.IO's.
pub const STORM_BAR: f64 = 0.3;

/// The summary of `reconnect-storm --vs-socketio --repeat N`: per round,
/// each system's time until every client rejoined and Herald's over
/// Socket.IO's; the median and range of those ratios, the ratio of the
/// medians (over the rounds where both have a time), and how many rounds
/// met [`STORM_BAR`] (the unrounded ratio) and how many missed it. A
/// system that lost clients has no time in that round; the round counts
/// as missed when Herald lost them.
pub fn storm_rounds(rounds: &[(Report, Report)]) -> Report {
    let mut out = Report::new(
        "reconnect-storm",
        "herald vs socketio",
        format!(
            "{} rounds, each system on fresh servers, Herald first in odd rounds and Socket.IO first in even ones",
            rounds.len()
        ),
        json!({"bar": STORM_BAR}),
    );
    let time = |r: &Report| {
        let storm = r.results.iter().find(|(n, _)| n == "storm")?;
        let lost = figure(&storm.1, "lost", None)?;
        (lost == 0.0).then(|| figure(&storm.1, "all_rejoined_ms", None))?
    };
    let (mut herald, mut socketio, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    // The times of the rounds where both systems have one.
    let (mut herald_paired, mut socketio_paired) = (Vec::new(), Vec::new());
    let (mut met, mut missed) = (0, 0);
    let mut per_round = Vec::new();
    for (h, s) in rounds {
        let (ht, st) = (time(h), time(s));
        let ratio = match (ht, st) {
            (Some(ht), Some(st)) if st > 0.0 => Some(ht / st),
            _ => None,
        };
        match ratio {
            Some(r) if r <= STORM_BAR => met += 1,
            Some(_) => missed += 1,
            // Herald lost clients: a miss. Socket.IO did: no ratio.
            None if ht.is_none() => missed += 1,
            None => {}
        }
        herald.extend(ht);
        socketio.extend(st);
        if let (Some(h), Some(s)) = (ht, st) {
            herald_paired.push(h);
            socketio_paired.push(s);
        }
        ratios.extend(ratio);
        per_round.push(json!({
            "herald_ms": ht,
            "socketio_ms": st,
            "herald_over_socketio": ratio.map(crate::report::round3),
        }));
    }
    let r3 = |x: Option<f64>| x.map(crate::report::round3);
    let ratio_of_medians = match (median(&herald_paired), median(&socketio_paired)) {
        (Some(h), Some(s)) if s > 0.0 => Some(h / s),
        _ => None,
    };
    out.section(
        "all_rejoined",
        Section::new()
            .put("rounds", per_round)
            .put("herald_ms_median", r3(median(&herald)))
            .put("socketio_ms_median", r3(median(&socketio)))
            .put("herald_over_socketio_median", r3(median(&ratios)))
            .put("herald_over_socketio_range", range(&ratios))
            .put("ratio_of_medians", r3(ratio_of_medians))
            .put("rounds_meeting_bar", met)
            .put("rounds_missing_bar", missed),
    );
    out
}

/// [`ratios`] over `figures`: one section per section name found in both
/// reports, with each figure that both have.
fn ratios_of(herald: &Report, socketio: &Report, figures: &[(&str, Option<&str>)]) -> Report {
    let mut out = Report::new(
        &herald.scenario,
        "herald vs socketio",
        format!(
            "Herald ({}) and Socket.IO ({}), same clients and options, one after the other",
            herald.target, socketio.target
        ),
        json!({}),
    );
    for (name, h) in &herald.results {
        let Some((_, s)) = socketio.results.iter().find(|(n, _)| n == name) else {
            continue;
        };
        let (section, compared) = side_by_side(h, s, figures);
        if compared > 0 {
            out.section(name, section);
        }
    }
    if out.results.is_empty() {
        out.notes
            .push("no section is in both reports: nothing to compare".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storm(target: &str, all_rejoined_ms: f64, lost: u64) -> Report {
        let mut r = Report::new("reconnect-storm", target, String::new(), json!({}));
        r.section(
            "storm",
            Section::new()
                .put("all_rejoined_ms", all_rejoined_ms)
                .put("lost", lost),
        );
        r
    }

    #[test]
    fn storm_rounds_count_every_round_against_the_bar() {
        let rounds = [
            (storm("h", 3000.0, 0), storm("s", 12_000.0, 0)),
            (storm("h", 3300.0, 0), storm("s", 10_000.0, 0)),
            (storm("h", 2600.0, 0), storm("s", 9_000.0, 0)),
            // Herald lost a client: a miss, whatever its time.
            (storm("h", 1000.0, 1), storm("s", 20_000.0, 0)),
            // Socket.IO lost one: no ratio, neither met nor missed.
            (storm("h", 3000.0, 0), storm("s", 10_000.0, 2)),
        ];
        let summary = storm_rounds(&rounds);
        let (_, s) = &summary.results[0];
        let v = |k: &str| s.get(k).cloned().unwrap();
        assert_eq!(v("rounds_meeting_bar"), 2);
        assert_eq!(v("rounds_missing_bar"), 2);
        // 0.25, 0.33, 0.289: the median is the middle one.
        assert_eq!(v("herald_over_socketio_median"), 0.289);
        assert_eq!(v("herald_over_socketio_range"), json!([0.25, 0.33]));
        assert_eq!(v("herald_ms_median"), 3000.0);
        assert_eq!(v("socketio_ms_median"), 11_000.0);
        // Over the three rounds both timed: 3000 / 10000.
        assert_eq!(v("ratio_of_medians"), 0.3);
        let per_round = v("rounds");
        assert_eq!(per_round[3]["herald_ms"], Value::Null);
        assert_eq!(per_round[4]["herald_over_socketio"], Value::Null);
    }

    fn report(target: &str, cpu: f64, p99: f64) -> Report {
        let mut r = Report::new("fanout", target, String::new(), json!({}));
        r.section(
            "rate_10",
            Section::new()
                .put("server_us_per_delivery", cpu)
                .put("latency_ms", json!({"p50": 1.0, "p99": p99})),
        );
        r.section("setup", Section::new().put("members", 10));
        r
    }

    /// A fanout report of rounds at 20/s: (CPU per delivery, floor) each.
    fn rounds(target: &str, rounds: &[(f64, f64)]) -> Report {
        let mut r = Report::new("fanout", target, String::new(), json!({}));
        for (k, &(cpu, floor)) in rounds.iter().enumerate() {
            let name = match k {
                0 => "rate_20".to_owned(),
                k => format!("rate_20_run{}", k + 1),
            };
            r.section(
                &name,
                Section::new()
                    .put("server_us_per_delivery", cpu)
                    .put("floor_us_per_write", floor),
            );
        }
        r
    }

    #[test]
    fn each_system_is_divided_by_its_own_floor_before_the_ratio() {
        // Round 2 ran on a machine twice as slow for Socket.IO: raw, Herald
        // looks twice as good as in round 1; against each one's own floor,
        // the same.
        let herald = rounds("cluster", &[(6.0, 3.0), (6.0, 3.0), (7.0, 3.5)]);
        let socketio = rounds("socketio", &[(12.0, 3.0), (24.0, 6.0), (14.0, 3.5)]);
        let c = ratios(&herald, &socketio);
        let step = |name: &str| {
            let (_, s) = c.results.iter().find(|(n, _)| n == name).unwrap();
            s.get("cpu_per_delivery").unwrap().clone()
        };
        assert_eq!(step("rate_20_run2")["raw"], 0.25);
        assert_eq!(step("rate_20_run2")["floor_normalised"], 0.5);
        assert!(step("rate_20")["uring_floor_normalised"].is_null());
        let (_, all) = c
            .results
            .iter()
            .find(|(n, _)| n == "cpu_per_delivery")
            .unwrap();
        let r = all.get("rate_20").unwrap();
        assert_eq!(r["rounds"], 3);
        assert_eq!(r["raw"]["median"], 0.5);
        assert_eq!(r["raw"]["range"], json!([0.25, 0.5]));
        assert_eq!(r["floor_normalised"]["median"], 0.5);
        assert_eq!(r["floor_normalised"]["range"], json!([0.5, 0.5]));
    }

    #[test]
    fn step_names_give_their_rate() {
        assert_eq!(step_rate("rate_20"), Some("20"));
        assert_eq!(step_rate("rate_20_run3"), Some("20"));
        assert_eq!(step_rate("rate_2_5_run2"), Some("2_5"));
        assert_eq!(step_rate("median_20"), None);
    }

    #[test]
    fn churn_compares_cycles_per_second_and_cpu_per_cycle() {
        let churn = |target: &str, rate: f64, cpu: f64| {
            let mut r = Report::new("churn", target, String::new(), json!({}));
            r.section(
                "churn",
                Section::new()
                    .put("connects_per_sec", rate)
                    .put("server_cpu_us_per_cycle", cpu)
                    .put("nats_cpu_us_per_cycle", Value::Null),
            );
            r
        };
        let c = ratios(
            &churn("cluster", 3000.0, 300.0),
            &churn("socketio", 1000.0, 600.0),
        );
        let section = &c.results[0].1;
        assert_eq!(c.results[0].0, "churn");
        assert_eq!(
            section.get("connects_per_sec").unwrap()["herald_over_socketio"],
            3.0
        );
        assert_eq!(
            section.get("server_cpu_us_per_cycle").unwrap()["herald_over_socketio"],
            0.5
        );
        assert!(
            section.get("nats_cpu_us_per_cycle").is_none(),
            "a figure one side lacks is left out"
        );
    }

    #[test]
    fn steps_in_both_get_the_ratio_of_each_figure() {
        let c = ratios(
            &report("cluster", 6.0, 10.0),
            &report("socketio", 12.0, 40.0),
        );
        let names: Vec<&str> = c.results.iter().map(|(n, _)| n.as_str()).collect();
        // `setup` has no compared figure; the CPU summary comes last.
        assert_eq!(names, ["rate_10", "cpu_per_delivery"]);
        let step = &c.results[0].1;
        assert_eq!(
            step.get("server_us_per_delivery").unwrap()["herald_over_socketio"],
            0.5
        );
        assert_eq!(
            step.get("latency_ms.p99").unwrap()["herald_over_socketio"],
            0.25
        );
    }
}
