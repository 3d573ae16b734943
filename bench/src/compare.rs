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
