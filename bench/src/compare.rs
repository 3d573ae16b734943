//! `--vs-socketio`: the ratios Herald / Socket.IO of one `idle` or `fanout`
//! run against each, step by step, for the figures the mission's bars are
//! stated in (memory per idle connection, CPU per delivery, latency,
//! delivered rate, and each system's ratio to the bare-write floor).

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
    ("server_us_per_delivery", None),
    ("ratio_to_floor", None),
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
            "Herald ({}) and Socket.IO ({}), same clients and options, one after the other",
            herald.target, socketio.target
        ),
        json!({}),
    );
    for (step, h) in &herald.results {
        let Some((_, s)) = socketio.results.iter().find(|(name, _)| name == step) else {
            continue;
        };
        let mut section = Section::new();
        let mut compared = 0;
        for (key, field) in FIGURES {
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
        if compared > 0 {
            out.section(step, section);
        }
    }
    if out.results.is_empty() {
        out.notes
            .push("no step is in both reports: nothing to compare".into());
    }
    out
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
        let mut section = Section::new();
        let mut compared = 0;
        for (key, field) in figures {
            let (Some(hv), Some(sv)) = (figure(h, key, *field), figure(s, key, *field)) else {
                continue;
            };
            let label = match field {
                Some(f) => format!("{key}.{f}"),
                None => (*key).to_owned(),
            };
            let ratio = if sv != 0.0 {
                Value::from(crate::report::round3(hv / sv))
            } else {
                Value::Null
            };
            section = section.put(
                &label,
                json!({"herald": hv, "socketio": sv, "herald_over_socketio": ratio}),
            );
            compared += 1;
        }
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
        assert_eq!(c.results.len(), 1, "only rate_10 has compared figures");
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
