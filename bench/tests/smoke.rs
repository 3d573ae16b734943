//! Runs the built `herald-bench` with tiny numbers against `herald dev` and
//! checks the shape of its output. Speed is not asserted: this only shows
//! that the scenario runs end to end and reports what it should.
//!
//! Needs the `herald` binary next to `herald-bench` (as `cargo test
//! --workspace` builds it), or `$HERALD_BIN`.

use std::process::Command;

use serde_json::Value;

fn number(v: &Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

fn assert_latency(v: &Value, what: &str, count: u64) {
    assert_eq!(v["count"].as_u64(), Some(count), "{what}: {v}");
    for key in ["p50", "p90", "p99", "p999", "max", "mean"] {
        assert!(number(&v[key], &format!("{what}.{key}")) >= 0.0);
    }
    assert!(v["p50"].as_f64() <= v["p99"].as_f64() && v["p99"].as_f64() <= v["max"].as_f64());
}

#[test]
fn churn_against_herald_dev_reports_table_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("churn.json");
    let out = Command::new(env!("CARGO_BIN_EXE_herald-bench"))
        .args([
            "churn",
            "--target",
            "dev",
            "--workers",
            "2",
            "--rooms",
            "4",
            "--duration",
            "1s",
            "--samples",
            "5",
            "--json",
        ])
        .arg(&json_path)
        .output()
        .expect("run herald-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "herald-bench failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("connects_per_sec"), "no table:\n{stdout}");

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(report["scenario"], "churn");
    assert_eq!(report["target"], "dev");
    assert_eq!(report["failures"], Value::Array(vec![]), "{report}");
    assert_eq!(report["params"]["workers"], 2);

    let churn = &report["results"]["churn"];
    assert!(
        number(&churn["connects_per_sec"], "connects_per_sec") > 0.0,
        "{churn}"
    );
    let cycles = churn["cycles"].as_u64().expect("cycles");
    assert!(cycles > 0);
    assert!(churn["errors"].as_u64().is_some());
    assert!(churn["error_kinds"].is_object());
    assert!(churn["per_second"].is_array());
    for key in ["connect_ms", "join_ms", "close_ms", "cycle_ms"] {
        assert!(
            churn[key]["count"].as_u64() >= Some(cycles),
            "{key}: {churn}"
        );
    }

    let settle = &report["results"]["presence_settle"];
    assert!(settle["stale_conns_at_end"].as_u64().is_some(), "{settle}");

    let vis = &report["results"]["visibility"];
    assert_eq!(vis["samples"], 5, "{vis}");
    assert_eq!(vis["observers"], 1, "{vis}");
    // One edge: every observer is on the joiner's edge.
    assert_latency(&vis["join_to_visible_ms"], "join_to_visible_ms", 5);
    assert_latency(&vis["join_to_visible_all_edges_ms"], "all edges", 5);
    assert_latency(&vis["join_to_visible_same_edge_ms"], "same edge", 5);
    assert_eq!(vis["join_to_visible_other_edge_ms"]["count"], 0);
    assert_latency(&vis["close_to_leave_visible_ms"], "close_to_leave", 5);
    assert_eq!(vis["lost_join_events"], 0);

    let cpu = &report["cpu"]["churn"];
    assert!(number(&cpu["wall_s"], "wall_s") > 0.0);
    assert!(number(&cpu["processes"]["herald-dev"], "herald-dev cpu") >= 0.0);
    assert!(number(&cpu["herald_s"], "herald_s") >= 0.0);
}

#[test]
fn json_dash_prints_one_json_line_on_stdout() {
    let out = Command::new(env!("CARGO_BIN_EXE_herald-bench"))
        .args([
            "churn",
            "--target",
            "dev",
            "--workers",
            "1",
            "--rooms",
            "1",
            "--duration",
            "200ms",
            "--samples",
            "0",
            "--json",
            "-",
        ])
        .output()
        .expect("run herald-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout should be one JSON line:\n{stdout}");
    let report: Value = serde_json::from_str(lines[0]).unwrap();
    assert!(
        number(
            &report["results"]["churn"]["connects_per_sec"],
            "connects_per_sec"
        ) > 0.0
    );
    assert!(
        report["results"].get("visibility").is_none(),
        "--samples 0 skips it"
    );
    assert!(
        stderr.contains("connects_per_sec"),
        "the table goes to stderr:\n{stderr}"
    );
}
