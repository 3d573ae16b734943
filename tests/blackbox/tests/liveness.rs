//! Liveness: a client that goes silent without closing (frozen with SIGSTOP:
//! its kernel keeps the TCP connection, as with a phone in a tunnel) is
//! closed within `--idle-timeout`, the members of its room see it leave, and
//! it goes offline one grace period later; a client that sends nothing but
//! answers the edge's pings is kept.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use herald_test_support::{ChildProcess, eventually};
use serde_json::{Value, json};

const HEARTBEAT: Duration = Duration::from_secs(1);
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
const GRACE: Duration = Duration::from_millis(1500);
const ROOM: &str = "chat:live";

/// `ws-hold`: a client in a process of its own, joined to `ROOM`.
struct Held {
    process: ChildProcess,
    conn: String,
    _dir: tempfile::TempDir,
}

fn hold(url: &str, user: &str) -> Held {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ws-hold"));
    cmd.args([url, &token(user), ROOM]);
    let mut process = ChildProcess::spawn(user, cmd, dir.path().join("ws-hold.log")).unwrap();
    let ready = |out: String| {
        out.lines()
            .find_map(|l| l.strip_prefix("ready ").map(str::to_owned))
    };
    let log = dir.path().join("ws-hold.log");
    process
        .wait_until("it was ready", WAIT, || {
            std::fs::read_to_string(&log).is_ok_and(|out| ready(out).is_some())
        })
        .unwrap();
    let conn = ready(process.output()).expect("ws-hold names its connection");
    Held {
        process,
        conn,
        _dir: dir,
    }
}

fn signal(held: &Held, sig: &str) {
    let pid = held.process.pid().to_string();
    let status = Command::new("kill").args([sig, &pid]).status().unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// The next `presence` event in `ROOM` about `conn`, skipping others.
async fn event_about(observer: &herald_client::Client, conn: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = observer
            .recv_op("presence", left)
            .await
            .unwrap_or_else(|e| panic!("no presence event about {conn} in {within:?}: {e}"));
        if e["conn"] == conn {
            return e;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_client_is_closed_and_goes_offline_and_a_quiet_one_is_kept() {
    let cluster = Cluster::start_spec(Spec {
        edges: 1,
        presences: 1,
        edge_args: vec![
            "--heartbeat".into(),
            "1s".into(),
            "--idle-timeout".into(),
            "3s".into(),
            "--presence-interval".into(),
            "500ms".into(),
        ],
        presence_args: vec!["--presence-grace".into(), "1500ms".into()],
        ..Spec::default()
    });
    let watched = watch(cluster.presence().await, &[], &["frank", "quinn"]);
    let observer = connect(&cluster.ws(0), "olga").await;
    ok(&observer, json!({"op":"join","room":ROOM})).await;

    let frank = hold(&cluster.ws(0), "frank");
    let quinn = hold(&cluster.ws(0), "quinn");
    for held in [&frank, &quinn] {
        let e = event_about(&observer, &held.conn, WAIT).await;
        assert_eq!(e["event"], "join", "{e}");
    }
    eventually(WAIT, "both online", || async {
        (transitions(&watched, "frank") == ["online"]
            && transitions(&watched, "quinn") == ["online"])
        .then_some(())
    })
    .await;

    signal(&frank, "-STOP");
    let frozen_at = Instant::now();
    // Within the idle timeout, give or take the once-a-second sweep.
    let e = event_about(&observer, &frank.conn, IDLE_TIMEOUT + WAIT).await;
    let closed_after = frozen_at.elapsed();
    assert_eq!(e["event"], "leave", "{e}");
    assert!(
        closed_after >= IDLE_TIMEOUT - HEARTBEAT,
        "frank was closed {closed_after:?} after freezing, before the idle timeout"
    );
    eventually(GRACE + WAIT, "frank offline", || async {
        (transitions(&watched, "frank") == ["online", "offline"]).then_some(())
    })
    .await;

    // quinn has sent nothing since joining, longer than the idle timeout by
    // now, but answers the pings: still a member, still online, for another
    // idle timeout and more.
    let quiet_until = Instant::now() + IDLE_TIMEOUT + HEARTBEAT;
    while Instant::now() < quiet_until {
        let left = quiet_until.saturating_duration_since(Instant::now());
        if let Ok(e) = observer.recv_op("presence", left).await {
            panic!("no presence event was due, got {e}");
        }
    }
    assert_eq!(transitions(&watched, "quinn"), ["online"]);
    let members = ok(&observer, json!({"op":"presence","room":ROOM})).await;
    assert_eq!(member_users(&members), ["olga", "quinn"]);
    signal(&frank, "-CONT");
}
