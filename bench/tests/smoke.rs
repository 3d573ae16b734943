//! Runs the built `herald-bench` with tiny numbers against `herald dev` and
//! checks the shape of its output. Speed is not asserted: this only shows
//! that the scenario runs end to end and reports what it should.
//!
//! Needs the `herald` binary next to `herald-bench` (as `cargo test
//! --workspace` builds it), or `$HERALD_BIN`.

use std::process::Command;

use herald_bench::socketio;
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
    let (report, stdout) = run_json_printing(&[
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
    ]);
    assert!(stdout.contains("connects_per_sec"), "no table:\n{stdout}");
    assert_eq!(report["target"], "dev");
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
    for key in ["connect_ms", "join_ms", "leave_ms", "close_ms", "cycle_ms"] {
        assert!(
            churn[key]["count"].as_u64() >= Some(cycles),
            "{key}: {churn}"
        );
    }
    assert!(
        number(&churn["server_cpu_us_per_cycle"], "server_cpu_us_per_cycle") > 0.0,
        "{churn}"
    );

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
    // Nanoseconds on a CPU (schedstat): a process that served a second of
    // churn ran for more than one clock tick.
    let ns = cpu["processes_ns"]["herald-dev"]
        .as_u64()
        .expect("processes_ns");
    assert!(ns > 0, "{cpu}");
    let per_process = &churn["processes_cpu_us_per_cycle"];
    assert!(
        number(&per_process["herald-dev"], "herald-dev us/cycle") > 0.0,
        "{churn}"
    );
    assert!(report["versions"]["kernel"].is_string(), "{report}");
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

/// Runs `herald-bench args... --json FILE`, checks it succeeded without
/// failures, and returns the report.
fn run_json(args: &[&str]) -> Value {
    run_json_printing(args).0
}

/// [`run_json`], also returning what the bench printed on stdout.
fn run_json_printing(args: &[&str]) -> (Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_herald-bench"))
        .args(args)
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("run herald-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "herald-bench {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(report["scenario"], args[0], "{report}");
    assert_eq!(report["failures"], Value::Array(vec![]), "{report}");
    (report, stdout.into_owned())
}

fn positive(v: &Value, what: &str) -> f64 {
    let x = number(v, what);
    assert!(x > 0.0, "{what} is not positive: {v}");
    x
}

/// Checks that a `fanout` or `chat` report opened six members and that its
/// warm-up reached every one of them.
fn assert_six_members_warmed(report: &Value) {
    assert_eq!(report["params"]["conns"], 6);
    let setup = &report["results"]["setup"];
    assert_eq!(setup["warmup_delivered"], 6, "{setup}");
}

/// Checks step `rate_<rate>` of a `fanout` or `chat` report whose steps
/// published for 500 ms, each message due at `members` members: every
/// delivery arrived and was timed. Returns the step.
fn assert_step_delivered(report: &Value, rate: u64, members: u64) -> &Value {
    let step = &report["results"][format!("rate_{rate}")];
    assert_eq!(number(&step["rate"], "rate"), rate as f64, "{step}");
    let expected = step["expected"].as_u64().expect("expected");
    assert_eq!(expected, (rate / 2) * members, "{step}");
    assert_eq!(step["delivered"].as_u64(), Some(expected), "{step}");
    assert_eq!(step["lost"], 0, "{step}");
    assert_eq!(step["extra"], 0, "{step}");
    // Every receiver got every message once, in order.
    for key in [
        "missing",
        "receivers_missing",
        "duplicates",
        "receivers_duplicated",
        "out_of_order",
        "unexpected",
    ] {
        assert_eq!(step[key], 0, "{key}: {step}");
    }
    positive(&step["delivered_per_sec"], "delivered_per_sec");
    assert_latency(&step["latency_ms"], "latency_ms", expected);
    for n in ["server_us_per_delivery", "herald_us_per_delivery"] {
        assert!(number(&step[n], n) >= 0.0, "{step}");
    }
    assert!(
        report["cpu"][format!("rate {rate}/s")]["herald_s"].is_number(),
        "{report}"
    );
    step
}

#[test]
fn fanout_publishes_in_batches() {
    let report = run_json(&[
        "fanout",
        "--target",
        "dev",
        "--rooms",
        "2",
        "--members",
        "3",
        "--rates",
        "40",
        "--duration",
        "500ms",
        "--publish-batch",
        "6",
    ]);
    assert_eq!(report["params"]["publish_batch"], 6);
    let step = assert_step_delivered(&report, 40, 3);
    // 20 messages in calls of 6: four calls, the last one of 2.
    assert_eq!(step["publishes_ok"], 20, "{step}");
    assert_eq!(step["publish_call_ms"]["count"], 4, "{step}");
}

#[test]
fn idle_reports_rss_per_connection() {
    let report = run_json(&[
        "idle",
        "--target",
        "dev",
        "--conns",
        "40",
        "--settle",
        "200ms",
        "--stable-for",
        "500ms",
    ]);
    assert_idle_of_40(&report, "herald-dev");
}

/// The `idle` section of a run with `--conns 40`, the same keys for every
/// target; `server` is the process whose CPU the connects are charged to.
fn assert_idle_of_40(report: &Value, server: &str) {
    let idle = &report["results"]["idle"];
    assert_eq!(idle["conns"], 40, "{idle}");
    assert_eq!(idle["open_at_end"], 40, "{idle}");
    assert_eq!(idle["errors"], 0, "{idle}");
    // RSS may not grow measurably for 40 connections: a number, not a sign.
    number(&idle["rss_kib_per_conn"], "rss_kib_per_conn");
    number(&idle["rss_kib_per_conn_second_half"], "second half");
    positive(&idle["edge_rss_mib_before"], "edge_rss_mib_before");
    positive(&idle["edge_rss_mib_all"], "edge_rss_mib_all");
    positive(&idle["connects_per_sec"], "connects_per_sec");
    assert!(report["cpu"]["connect and ping"]["processes"][server].is_number());
    // Every server process, each and summed, before and after the close,
    // and after the second round.
    assert_eq!(idle["edge"], server, "{idle}");
    number(
        &idle["servers_rss_kib_per_conn"][server],
        "server's own figure",
    );
    number(&idle["total_rss_kib_per_conn"], "total_rss_kib_per_conn");
    number(
        &idle["servers_rss_kib_left_per_conn_after_close"][server],
        "left after close",
    );
    number(&idle["total_rss_kib_regrowth_per_conn"], "regrowth");
    assert_eq!(idle["reopened"], 40, "{idle}");
    for point in [
        "before",
        "half",
        "all",
        "after_close",
        "again",
        "after_second_close",
    ] {
        positive(&idle["servers_rss_mib"][server][point], point);
    }
    assert!(report["versions"]["kernel"].is_string(), "{report}");
}

/// Whether the floor writer could use io_uring in `report` (if not, its
/// notes say why, and the test says so).
fn floor_has_io_uring(report: &Value) -> bool {
    let notes = report["notes"].as_array().expect("notes");
    match notes
        .iter()
        .filter_map(Value::as_str)
        .find(|n| n.contains("io_uring floor was not measured"))
    {
        Some(why) => {
            eprintln!("SKIPPED the io_uring checks: {why}");
            false
        }
        None => true,
    }
}

#[test]
fn floor_reports_cpu_per_write_for_each_phase() {
    // Rounds enough that each phase lasts milliseconds: `wall_s` is
    // reported to the millisecond, and 20 rounds could take less than half.
    let report = run_json(&[
        "floor",
        "--conns",
        "20",
        "--rounds",
        "400",
        "--round-rate",
        "0",
        "--frames-per-write",
        "1,4",
        "--uring-batch",
        "8",
    ]);
    let mut phases = vec![("frames_per_write_1", 1), ("frames_per_write_4", 4)];
    let uring = floor_has_io_uring(&report);
    if uring {
        phases.extend([
            ("uring_frames_per_write_1", 1),
            ("uring_frames_per_write_4", 4),
        ]);
    }
    for (key, k) in phases {
        let phase = &report["results"][key];
        assert_eq!(phase["frames_per_write"], k, "{phase}");
        let writes = phase["writes"].as_u64().expect("writes");
        assert!(writes > 0, "{phase}");
        assert_eq!(phase["frames"].as_u64(), Some(writes * k), "{phase}");
        assert_eq!(phase["received"], phase["frames"], "{phase}");
        for n in ["missing", "duplicates", "out_of_order", "unexpected"] {
            assert_eq!(phase[n], 0, "{n}: {phase}");
        }
        positive(&phase["wall_s"], "wall_s");
        for n in ["writer_cpu_s", "us_per_write", "us_per_frame"] {
            assert!(number(&phase[n], n) >= 0.0, "{phase}");
        }
        // Read by the fan-out's receivers: each frame timed.
        assert_eq!(
            phase["latency_ms"]["count"].as_u64(),
            phase["received"].as_u64(),
            "{phase}"
        );
        let syscalls = phase["syscalls"].as_u64().expect("syscalls");
        if key.starts_with("uring") {
            // 20 connections in batches of 8: 3 submissions a round.
            assert_eq!(phase["send"], "io_uring", "{phase}");
            assert_eq!(phase["uring_batch"], 8, "{phase}");
            let rounds = phase["rounds"].as_u64().unwrap();
            assert!(syscalls >= 3 * rounds && syscalls < writes, "{phase}");
        } else {
            assert_eq!(phase["send"], "write", "{phase}");
            assert_eq!(syscalls, writes, "{phase}");
        }
    }
}

#[test]
fn floor_without_io_uring_says_so_and_measures_the_rest() {
    let out = Command::new(env!("CARGO_BIN_EXE_herald-bench"))
        .args([
            "floor",
            "--conns",
            "4",
            "--rounds",
            "20",
            "--round-rate",
            "0",
        ])
        .args(["--frames-per-write", "1", "--json", "-"])
        .env("HERALD_BENCH_NO_IO_URING", "1")
        .output()
        .expect("run herald-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(!floor_has_io_uring(&report), "{report}");
    assert!(
        report["results"]["frames_per_write_1"].is_object(),
        "{report}"
    );
    assert!(report["results"].get("uring_frames_per_write_1").is_none());
}

/// The floor writer skips a write to one receiver, writes one twice to
/// another and swaps two for a third (`HERALD_BENCH_FLOOR_FAULTS`): the
/// totals balance (as many frames arrived as were written), yet the
/// receivers' accounting finds each, and the run fails saying so.
#[test]
fn floor_receivers_find_a_missing_a_duplicated_and_a_swapped_frame() {
    let out = Command::new(env!("CARGO_BIN_EXE_herald-bench"))
        .args([
            "floor",
            "--conns",
            "6",
            "--rounds",
            "30",
            "--round-rate",
            "0",
        ])
        .args([
            "--frames-per-write",
            "1",
            "--uring-batch",
            "0",
            "--json",
            "-",
        ])
        .env("HERALD_BENCH_FLOOR_FAULTS", "drop=1:4,dup=3:7,swap=5:10")
        .output()
        .expect("run herald-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "the faults must fail the run:\n{stdout}"
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    let phase = &report["results"]["frames_per_write_1"];
    assert_eq!(phase["received"], phase["frames"], "{phase}");
    for (key, n) in [
        ("missing", 1),
        ("receivers_missing", 1),
        ("duplicates", 1),
        ("receivers_duplicated", 1),
        ("out_of_order", 1),
        ("receivers_out_of_order", 1),
        ("order_broken", 1),
    ] {
        assert_eq!(phase[key], n, "{key}: {phase}");
    }
    let failures = report["failures"].to_string();
    for what in ["1 missing", "1 duplicated", "1 out of order"] {
        assert!(failures.contains(what), "{what}: {failures}");
    }
}

#[test]
fn fanout_reports_deliveries_latency_and_floor_ratio() {
    let report = run_json(&[
        "fanout",
        "--target",
        "dev",
        "--rooms",
        "2",
        "--members",
        "3",
        "--rates",
        "20,40",
        "--duration",
        "500ms",
        "--floor",
        "--repeat",
        "2",
    ]);
    assert_six_members_warmed(&report);
    for rate in [20, 40] {
        // Each message to the 3 members of its room.
        let step = assert_step_delivered(&report, rate, 3);
        assert!(
            number(&step["floor_us_per_write"], "floor") >= 0.0,
            "{step}"
        );
        assert!(step.get("ratio_to_floor").is_some(), "{step}");
        if floor_has_io_uring(&report) {
            assert!(
                number(&step["floor_uring_us_per_write"], "uring floor") >= 0.0,
                "{step}"
            );
            assert!(step.get("ratio_to_floor_uring").is_some(), "{step}");
            let floor = &report["results"][format!("floor_uring_{rate}")];
            assert_eq!(floor["send"], "io_uring", "{floor}");
            assert_eq!(floor["missing"], 0, "{floor}");
        }
        // The second round of the same rate, each step after its own floor.
        let again = &report["results"][format!("rate_{rate}_run2")];
        assert_eq!(again["lost"], 0, "{again}");
        assert_eq!(again["delivered"], step["expected"], "{again}");
        for name in [format!("floor_{rate}"), format!("floor_{rate}_run2")] {
            let floor = &report["results"][&name];
            assert_eq!(floor["conns"], 6, "{name}: {floor}");
            assert_eq!(floor["missing"], 0, "{name}: {floor}");
        }
        let median = &report["results"][format!("median_{rate}")];
        assert_eq!(median["runs"], 2, "{median}");
        assert_eq!(median["lost"], 0.0, "{median}");
        assert!(
            number(&median["latency_ms"]["p99"], "median p99") > 0.0,
            "{median}"
        );
    }
    // Each round's step is judged against the floor of its own round.
    for name in ["20", "40", "20_run2", "40_run2"] {
        let step = &report["results"][format!("rate_{name}")];
        let floor = &report["results"][format!("floor_{name}")];
        assert_eq!(step["floor_us_per_write"], floor["us_per_write"], "{name}");
    }
}

#[test]
fn chat_counts_every_member_the_sender_included() {
    let report = run_json(&[
        "chat",
        "--target",
        "dev",
        "--rooms",
        "3",
        "--members",
        "2",
        "--rates",
        "20,40",
        "--duration",
        "500ms",
    ]);
    // One warm-up message per room reaches both members, its sender too.
    assert_six_members_warmed(&report);
    for rate in [20, 40] {
        // Each message to both members of its room, its sender included.
        let step = assert_step_delivered(&report, rate, 2);
        let publishes = rate / 2;
        assert_eq!(step["publishes_ok"].as_u64(), Some(publishes), "{step}");
        assert_eq!(step["publish_errors"], 0, "{step}");
        assert_latency(&step["publish_call_ms"], "publish_call_ms", publishes);
        for n in ["server_us_per_publish", "bench_cpu_s"] {
            assert!(number(&step[n], n) >= 0.0, "{step}");
        }
    }
}

#[test]
fn chat_refuses_the_socketio_target() {
    let out = Command::new(env!("CARGO_BIN_EXE_herald-bench"))
        .args([
            "chat",
            "--target",
            "socketio",
            "--rooms",
            "1",
            "--members",
            "1",
        ])
        .output()
        .expect("run herald-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("chat runs against Herald only"),
        "no clear refusal:\n{stderr}"
    );
}

/// The Redis of the Socket.IO peer: `$HERALD_BENCH_REDIS`, else the local one.
fn redis_url() -> String {
    std::env::var("HERALD_BENCH_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// `false` (with the reason printed) when this machine cannot run the peer.
fn socketio_available() -> bool {
    match socketio::unavailable(&redis_url()) {
        Some(why) => {
            eprintln!("SKIPPED: the Socket.IO peer cannot run here: {why}");
            false
        }
        None => true,
    }
}

#[test]
fn idle_against_socketio_reports_the_same_keys() {
    if !socketio_available() {
        return;
    }
    let url = redis_url();
    let report = run_json(&[
        "idle",
        "--target",
        "socketio",
        "--edges",
        "1",
        "--redis-url",
        &url,
        "--conns",
        "40",
        "--settle",
        "200ms",
        "--stable-for",
        "500ms",
    ]);
    assert_eq!(report["target"], "socketio");
    assert_idle_of_40(&report, "socketio-0");
}

/// Without `--redis-url` the peer runs against a redis-server of its own,
/// whose memory counts among the servers'.
#[test]
fn idle_against_socketio_starts_its_own_redis() {
    let redis_server = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    if Command::new(&redis_server)
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: no {redis_server}");
        return;
    }
    if !socketio_available() {
        return;
    }
    let report = run_json(&[
        "idle",
        "--target",
        "socketio",
        "--edges",
        "2",
        "--conns",
        "40",
        "--settle",
        "200ms",
        "--stable-for",
        "500ms",
    ]);
    assert_eq!(report["params"]["own_redis"], true, "{report}");
    assert_idle_of_40(&report, "socketio-0");
    let idle = &report["results"]["idle"];
    for server in ["socketio-1", "redis-server"] {
        number(&idle["servers_rss_kib_per_conn"][server], server);
    }
    assert!(report["cpu"]["connect and ping"]["processes"]["redis-server"].is_number());
    assert!(
        report["results"]["redis"]["all"]["connected_clients"].is_u64(),
        "{report}"
    );
    for what in ["node", "redis-server", "socket.io"] {
        assert!(report["versions"][what].is_string(), "{what}: {report}");
    }
}

#[test]
fn vs_socketio_runs_both_and_prints_the_ratios() {
    if !socketio_available() {
        return;
    }
    let url = redis_url();
    let report = run_json(&[
        "idle",
        "--vs-socketio",
        "--target",
        "dev",
        "--edges",
        "1",
        "--redis-url",
        &url,
        "--conns",
        "40",
        "--settle",
        "200ms",
        "--stable-for",
        "500ms",
    ]);
    assert_eq!(report["herald"]["target"], "dev");
    assert_eq!(report["socketio"]["target"], "socketio");
    for side in ["herald", "socketio"] {
        assert_eq!(report[side]["results"]["idle"]["open_at_end"], 40, "{side}");
    }
    let rss = &report["compare"]["results"]["idle"]["rss_kib_per_conn"];
    let (h, s) = (
        number(&rss["herald"], "herald"),
        number(&rss["socketio"], "socketio"),
    );
    if s != 0.0 {
        let ratio = number(&rss["herald_over_socketio"], "ratio");
        assert!((ratio - h / s).abs() < 0.01, "{rss}");
    }
}

#[test]
fn fanout_against_socketio_reports_the_same_keys() {
    if !socketio_available() {
        return;
    }
    let url = redis_url();
    let report = run_json(&[
        "fanout",
        "--target",
        "socketio",
        "--edges",
        "2",
        "--redis-url",
        &url,
        "--rooms",
        "2",
        "--members",
        "3",
        "--rates",
        "20,40",
        "--duration",
        "500ms",
    ]);
    assert_eq!(report["target"], "socketio");
    assert_eq!(report["params"]["edges"], 2);
    assert_six_members_warmed(&report);
    for rate in [20, 40] {
        // One emitter per room at rate / 2, each message to 3 members.
        let step = assert_step_delivered(&report, rate, 3);
        for n in ["nats_us_per_delivery", "publisher_cpu_s"] {
            assert!(number(&step[n], n) >= 0.0, "{step}");
        }
        let cpu = &report["cpu"][format!("rate {rate}/s")];
        assert!(cpu["processes"]["socketio-0"].is_number(), "{cpu}");
        assert!(cpu["processes"]["socketio-1"].is_number(), "{cpu}");
    }
}

/// Churn against Socket.IO: the same connect (with a token the servers
/// verify) → join → leave → close cycles, the same keys, and with
/// `--vs-socketio` the ratios of cycles per second and CPU per cycle.
#[test]
fn churn_against_socketio_runs_the_same_cycles_side_by_side() {
    if !socketio_available() {
        return;
    }
    let url = redis_url();
    let report = run_json(&[
        "churn",
        "--vs-socketio",
        "--target",
        "dev",
        "--edges",
        "2",
        "--redis-url",
        &url,
        "--workers",
        "2",
        "--rooms",
        "4",
        "--duration",
        "1s",
        "--samples",
        "0",
    ]);
    let side = &report["socketio"];
    assert_eq!(side["target"], "socketio");
    let churn = &side["results"]["churn"];
    let cycles = churn["cycles"].as_u64().expect("cycles");
    assert!(cycles > 0, "{churn}");
    assert_eq!(churn["errors"], 0, "{churn}");
    for key in ["connect_ms", "join_ms", "leave_ms", "close_ms", "cycle_ms"] {
        assert!(
            churn[key]["count"].as_u64() >= Some(cycles),
            "{key}: {churn}"
        );
    }
    // Both servers took cycles: each used CPU for them.
    for server in ["socketio-0", "socketio-1"] {
        positive(&churn["processes_cpu_us_per_cycle"][server], server);
    }
    let socketio_cpu = positive(&churn["server_cpu_us_per_cycle"], "server CPU per cycle");
    assert!(
        side["results"].get("presence_settle").is_none(),
        "Socket.IO has no presence to settle"
    );

    let compare = &report["compare"]["results"]["churn"];
    let rate = &compare["connects_per_sec"];
    let (h, s) = (
        positive(&rate["herald"], "herald cycles/s"),
        positive(&rate["socketio"], "socketio cycles/s"),
    );
    let ratio = number(&rate["herald_over_socketio"], "ratio");
    assert!((ratio - h / s).abs() < 0.01, "{rate}");
    let cpu = &compare["server_cpu_us_per_cycle"];
    assert_eq!(number(&cpu["socketio"], "socketio"), socketio_cpu, "{cpu}");
    positive(&cpu["herald_over_socketio"], "CPU ratio");
}

/// The `storm` and `durable` sections of a reconnect storm of `clients`
/// clients in which nobody was lost.
fn assert_everyone_rejoined(report: &Value, clients: u64) {
    let setup = &report["results"]["setup"];
    assert_eq!(setup["connected"], clients, "{setup}");
    let storm = &report["results"]["storm"];
    assert_eq!(storm["clients"], clients, "{storm}");
    assert_eq!(storm["rejoined"], clients, "{storm}");
    assert_eq!(storm["lost"], 0, "{storm}");
    assert_eq!(storm["closed_before_kill"], 0, "{storm}");
    assert_latency(&storm["noticed_ms"], "noticed_ms", clients);
    assert_latency(&storm["rejoin_ms"], "rejoin_ms", clients);
    // Every client rejoined by the time the last one did.
    let all = positive(&storm["all_rejoined_ms"], "all_rejoined_ms");
    assert!(
        all >= number(&storm["rejoin_ms"]["max"], "max") * 0.99,
        "{storm}"
    );
    positive(&storm["server_cpu_us_per_reconnect"], "CPU per reconnect");
    let durable = &report["results"]["durable"];
    assert!(positive(&durable["published"], "published") > 0.0);
    assert_eq!(durable["publish_errors"], 0, "{durable}");
    assert_eq!(durable["clients_without_last_message"], 0, "{durable}");
}

/// 200 clients on edge 0 of a 3-edge cluster, edge 0 killed: every client
/// rejoins on edge 1 or 2, and its durable room's log holds every message
/// published to the room, once and in order, those published while it was
/// away replayed from `since`.
#[test]
fn reconnect_storm_against_a_cluster_recovers_every_durable_room_exactly() {
    let report = run_json(&[
        "reconnect-storm",
        "--target",
        "cluster",
        "--edges",
        "3",
        "--clients",
        "200",
        "--chat-rooms",
        "10",
        "--durable-rooms",
        "4",
        "--publish-rate",
        "40",
        "--before",
        "500ms",
        "--after",
        "500ms",
        "--backoff-base",
        "1s",
    ]);
    assert_everyone_rejoined(&report, 200);
    let durable = &report["results"]["durable"];
    assert_eq!(durable["clients_exact"], 200, "{durable}");
    assert_eq!(durable["clients_with_gaps"], 0, "{durable}");
    for key in ["missing", "duplicates", "out_of_order", "unexpected"] {
        assert_eq!(durable[key], 0, "{key}: {durable}");
    }
    assert_eq!(durable["rejoins_not_recovered"], 0, "{durable}");
    // Every client gets each message of its room: 50 clients a room.
    let published = durable["published"].as_u64().unwrap();
    assert_eq!(durable["messages_expected"].as_u64(), Some(published * 50));
    assert_eq!(durable["messages_received"], durable["messages_expected"]);
    // Clients were away up to a second while 10 messages a second went to
    // each room: recovery was exercised, not just live delivery.
    assert!(
        durable["messages_replayed"].as_u64() > Some(0),
        "nothing was replayed: {durable}"
    );
    // The survivors and the backends did the work; the victim is gone.
    let cpu = &report["cpu"]["kill to last rejoin"]["processes"];
    for p in ["edge-1", "edge-2", "nats-server", "presence", "router"] {
        assert!(cpu[p].is_number(), "{p}: {cpu}");
    }
    assert!(cpu.get("edge-0").is_none(), "{cpu}");
}

/// The same storm against Socket.IO: everyone rejoins; what they missed is
/// counted (the Redis adapter keeps nothing), never duplicated.
#[test]
fn reconnect_storm_against_socketio_counts_what_clients_missed() {
    if !socketio_available() {
        return;
    }
    let url = redis_url();
    let report = run_json(&[
        "reconnect-storm",
        "--target",
        "socketio",
        "--edges",
        "2",
        "--redis-url",
        &url,
        "--clients",
        "100",
        "--chat-rooms",
        "5",
        "--durable-rooms",
        "2",
        "--publish-rate",
        "20",
        "--before",
        "500ms",
        "--after",
        "500ms",
    ]);
    assert_everyone_rejoined(&report, 100);
    let durable = &report["results"]["durable"];
    let expected = durable["messages_expected"].as_u64().unwrap();
    let received = durable["messages_received"].as_u64().unwrap();
    let missing = durable["missing"].as_u64().unwrap();
    assert_eq!(received + missing, expected, "{durable}");
    assert_eq!(durable["duplicates"], 0, "{durable}");
    assert_eq!(durable["out_of_order"], 0, "{durable}");
    let cpu = &report["cpu"]["kill to last rejoin"]["processes"];
    assert!(cpu["socketio-1"].is_number(), "{cpu}");
    assert!(cpu.get("socketio-0").is_none(), "{cpu}");
}

/// `--repeat 2`: two rounds of both systems on fresh servers, Herald first
/// in the first and Socket.IO first in the second, and a summary that
/// counts each round against the bar.
#[test]
fn vs_socketio_storm_rounds_alternate_which_system_goes_first() {
    if !socketio_available() {
        return;
    }
    let url = redis_url();
    let report = run_json(&[
        "reconnect-storm",
        "--vs-socketio",
        "--repeat",
        "2",
        "--target",
        "cluster",
        "--edges",
        "2",
        "--redis-url",
        &url,
        "--clients",
        "60",
        "--chat-rooms",
        "3",
        "--durable-rooms",
        "2",
        "--publish-rate",
        "20",
        "--before",
        "300ms",
        "--after",
        "300ms",
    ]);
    let rounds = report["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2, "{report}");
    assert_eq!(rounds[0]["order"], "herald first");
    assert_eq!(rounds[1]["order"], "socketio first");
    for round in rounds {
        assert_everyone_rejoined(&round["herald"], 60);
        assert_everyone_rejoined(&round["socketio"], 60);
        let ratio = &round["compare"]["results"]["storm"]["all_rejoined_ms"];
        positive(&ratio["herald_over_socketio"], "ratio");
    }
    let summary = &report["summary"]["results"]["all_rejoined"];
    let met = summary["rounds_meeting_bar"].as_u64().unwrap();
    let missed = summary["rounds_missing_bar"].as_u64().unwrap();
    assert_eq!(met + missed, 2, "{summary}");
    let per_round = summary["rounds"].as_array().unwrap();
    for (k, r) in per_round.iter().enumerate() {
        let h = &rounds[k]["herald"]["results"]["storm"]["all_rejoined_ms"];
        assert_eq!(&r["herald_ms"], h, "{summary}");
    }
    positive(&summary["herald_over_socketio_median"], "median");
}

#[test]
fn vs_socketio_fanout_alternates_rounds_and_normalises_by_each_floor() {
    if !socketio_available() {
        return;
    }
    let url = redis_url();
    let report = run_json(&[
        "fanout",
        "--vs-socketio",
        "--target",
        "dev",
        "--edges",
        "2",
        "--redis-url",
        &url,
        "--rooms",
        "2",
        "--members",
        "3",
        "--rates",
        "20",
        "--duration",
        "500ms",
        "--floor",
        "--floor-uring-batch",
        "0",
        "--repeat",
        "2",
    ]);
    for side in ["herald", "socketio"] {
        let r = &report[side];
        assert!(r["params"]["alternated"].is_string(), "{side}: {r}");
        assert_six_members_warmed(r);
        for name in ["rate_20", "rate_20_run2"] {
            let step = &r["results"][name];
            assert_eq!(step["missing"], 0, "{side} {name}: {step}");
            assert_eq!(step["duplicates"], 0, "{side} {name}: {step}");
            positive(&step["floor_us_per_write"], "floor_us_per_write");
        }
    }
    // Socket.IO's emitter confirms nothing: its order is not judged.
    assert!(report["socketio"]["results"]["rate_20"]["order_broken"].is_null());
    assert_eq!(report["herald"]["results"]["rate_20"]["order_broken"], 0);
    let compare = &report["compare"]["results"];
    for name in ["rate_20", "rate_20_run2"] {
        let h = &report["herald"]["results"][name];
        let s = &report["socketio"]["results"][name];
        let cpu = &compare[name]["cpu_per_delivery"];
        let (hc, sc) = (
            number(&h["server_us_per_delivery"], "herald"),
            number(&s["server_us_per_delivery"], "socketio"),
        );
        let (hf, sf) = (
            number(&h["floor_us_per_write"], "herald floor"),
            number(&s["floor_us_per_write"], "socketio floor"),
        );
        let raw = number(&cpu["raw"], "raw");
        assert!((raw - hc / sc).abs() < 0.002 * raw.max(1.0), "{cpu}");
        let normalised = number(&cpu["floor_normalised"], "floor_normalised");
        let want = (hc / hf) / (sc / sf);
        assert!(
            (normalised - want).abs() < 0.002 * want.max(1.0),
            "{cpu} vs {want}"
        );
    }
    let summary = &compare["cpu_per_delivery"]["rate_20"];
    assert_eq!(summary["rounds"], 2, "{summary}");
    positive(&summary["raw"]["median"], "median raw");
    positive(&summary["floor_normalised"]["median"], "median normalised");
}
