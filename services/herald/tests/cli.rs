//! The command line as a user meets it: help, dev tokens, and configuration
//! errors that name the flag and exit non-zero before anything binds.

use std::process::{Command, Output};

fn herald(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env_remove("HERALD_JWT_SECRET")
        .env_remove("HERALD_CONFIG")
        .output()
        .expect("run herald")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_every_subcommand() {
    let o = herald(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for sub in ["dev", "edge", "router", "presence", "token"] {
        assert!(text.contains(sub), "--help does not mention {sub}:\n{text}");
    }
    let o = herald(&["edge", "--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("--nats") && text.contains("HERALD_NATS"),
        "{text}"
    );
}

#[test]
fn only_the_commands_that_hold_clients_take_token_keys() {
    for sub in ["dev", "edge"] {
        let o = herald(&[sub, "--help"]);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.contains("--jwt-secret") && text.contains("--jwt-public-key"),
            "{sub}: {text}"
        );
    }
    for sub in ["router", "presence"] {
        let o = herald(&[sub, "--help"]);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{sub}: {}", stderr(&o));
        assert!(
            !text.contains("--jwt"),
            "{sub} lists a key it never reads: {text}"
        );
    }
    let o = herald(&["router", "--jwt-secret", "s"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--jwt-secret"), "{}", stderr(&o));
}

#[test]
fn token_mints_a_jwt_for_the_given_user() {
    let o = herald(&["token", "--sub", "alice", "--ttl", "2h", "--room", "chat:*"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let token = String::from_utf8(o.stdout).unwrap();
    let token = token.trim();
    assert_eq!(token.split('.').count(), 3, "{token}");
    let payload = token.split('.').nth(1).unwrap();
    let claims = base64_decode(payload);
    assert!(claims.contains(r#""sub":"alice""#), "{claims}");
    assert!(claims.contains(r#""rooms":["chat:*"]"#), "{claims}");
}

fn base64_decode(s: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn an_edge_without_a_key_names_the_flag() {
    let addr = herald_test_support::free_addr().to_string();
    let o = herald(&["edge", "--listen", &addr, "--nats", "nats://127.0.0.1:1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--jwt-secret"), "{}", stderr(&o));
}

#[test]
fn a_missing_required_flag_is_named() {
    let o = herald(&["edge", "--jwt-secret", "s"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--listen"), "{}", stderr(&o));
}

#[test]
fn a_bad_config_file_names_the_flag_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("herald.toml");
    std::fs::write(&path, "[namespaces.chat]\npublsh = false\n").unwrap();
    let addr = herald_test_support::free_addr().to_string();
    let grpc = herald_test_support::free_addr().to_string();
    let o = herald(&[
        "dev",
        "--listen",
        &addr,
        "--grpc-listen",
        &grpc,
        "--config",
        path.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("--config") && e.contains("publsh"), "{e}");

    let o = herald(&[
        "dev",
        "--listen",
        &addr,
        "--grpc-listen",
        &grpc,
        "--config",
        "/nonexistent/herald.toml",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("/nonexistent/herald.toml"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_bad_listen_address_is_named() {
    let o = herald(&["dev", "--listen", "not-an-address"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--listen"), "{}", stderr(&o));
}

#[test]
fn the_example_configuration_is_accepted() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/herald.toml");
    let ws = herald_test_support::free_addr();
    let grpc = herald_test_support::free_addr().to_string();
    let args: Vec<String> = [
        "dev",
        "--listen",
        &ws.to_string(),
        "--grpc-listen",
        &grpc,
        "--config",
        example,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Ready means the configuration was read and every durable namespace set up.
    let mut dev = herald_test_support::Herald::start("herald dev", &args, ws).unwrap();
    dev.stop(std::time::Duration::from_secs(5));
}

#[test]
fn worker_threads_sets_the_runtimes_threads_and_refuses_zero() {
    let o = herald(&["dev", "--worker-threads", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--worker-threads"), "{}", stderr(&o));

    let ws = herald_test_support::free_addr();
    let grpc = herald_test_support::free_addr();
    let args: Vec<String> = ["dev", "--worker-threads", "1", "--listen"]
        .iter()
        .map(|s| s.to_string())
        .chain([ws.to_string(), "--grpc-listen".into(), grpc.to_string()])
        .collect();
    let mut dev = herald_test_support::Herald::start("herald dev", &args, ws).unwrap();
    let (status, metrics) = herald_test_support::http_get(ws, "/metrics").unwrap();
    dev.stop(std::time::Duration::from_secs(5));
    assert_eq!(status, 200);
    assert!(
        metrics.contains("herald_runtime_worker_threads 1\n"),
        "{metrics}"
    );
}

#[test]
fn heartbeat_and_idle_timeout_are_checked_and_named() {
    for (args, named) in [
        (&["--heartbeat", "500ms"][..], "--heartbeat 500ms"),
        (
            &["--heartbeat", "10s", "--idle-timeout", "10s"][..],
            "--idle-timeout 10s",
        ),
        (
            &["--idle-timeout", "90500ms"][..],
            "--idle-timeout 1m 30s 500ms",
        ),
    ] {
        let mut argv = vec![
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
        ];
        argv.extend_from_slice(args);
        let o = herald(&argv);
        assert_eq!(o.status.code(), Some(2), "{argv:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(named), "{argv:?}: {}", stderr(&o));
    }
}

/// The default build has no heap profiler: asking for one is a
/// configuration error, before anything binds.
#[cfg(not(feature = "heap-profile"))]
#[test]
fn heap_profile_needs_the_feature() {
    let o = herald(&["dev", "--heap-profile", "--listen", "127.0.0.1:1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("--heap-profile") && err.contains("heap-profile feature"),
        "{err}"
    );
}

#[test]
fn a_presence_window_over_a_second_is_refused_naming_the_flag() {
    let o = herald(&["edge", "--jwt-secret", "s", "--presence-window", "5s"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("--presence-window"), "{e}");
    assert!(e.contains("5s is longer than the most allowed, 1s"), "{e}");
}
