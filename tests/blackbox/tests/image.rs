//! The container image: `herald dev` started inside the runtime image that
//! `scripts/build-image.sh` builds serves a real client (connect, join,
//! publish, its own message back) and a `Router.Publish` over gRPC, running
//! as the image's user 65532. buildah runs it with chroot isolation, which
//! shares the host's network, so the test reaches it on 127.0.0.1.
//!
//! Needs buildah and the image named by `HERALD_IMAGE` (and, if the image
//! was built there, the storage in `HERALD_BUILDAH_ROOT`):
//! `scripts/test-image.sh` builds the image and runs this.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use herald_client::Client;
use herald_test_support::{ChildProcess, free_addr, http_get};
use serde_json::json;

/// The image's user and group: distroless's `nonroot`.
const NONROOT: &str = "65532";

/// `buildah` on the storage `scripts/build-image.sh` used.
fn buildah() -> Command {
    let mut cmd = Command::new("buildah");
    cmd.args(["--storage-driver", "vfs"]);
    if let Some(root) = std::env::var_os("HERALD_BUILDAH_ROOT") {
        let root = PathBuf::from(root);
        cmd.arg("--root")
            .arg(root.join("storage"))
            .arg("--runroot")
            .arg(root.join("run"));
    }
    cmd
}

/// Runs `buildah args` to its end and returns what it printed, trimmed;
/// panics with its error output if it failed.
fn buildah_output(args: &[&str]) -> String {
    let out = buildah()
        .args(args)
        .output()
        .expect("could not run buildah (scripts/build-image.sh installs it)");
    assert!(
        out.status.success(),
        "buildah {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("buildah printed UTF-8")
        .trim()
        .to_string()
}

/// A working container made from the image; removed on drop, also when the
/// test fails.
struct Container {
    name: String,
}

impl Container {
    fn from_image(image: &str) -> Container {
        let name = format!("herald-image-test-{}", std::process::id());
        // Left by an earlier run that was killed, if any.
        let _ = buildah().args(["rm", &name]).output();
        let name = buildah_output(&["from", "--name", &name, image]);
        Container { name }
    }

    /// `buildah run` of `argv` in this container, as the image's user.
    fn run(&self, argv: &[String]) -> Command {
        let mut cmd = buildah();
        cmd.args(["run", "--isolation", "chroot", &self.name, "--"])
            .args(argv);
        cmd
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = buildah().args(["rm", &self.name]).output();
    }
}

/// A process started in the container with `buildah run`. Stopped on drop:
/// buildah ends it when told to (SIGTERM); should buildah be gone first, the
/// process itself is killed by its pid.
struct InContainer {
    buildah: ChildProcess,
    argv: Vec<String>,
    pid: Option<u32>,
    _dir: tempfile::TempDir,
}

impl InContainer {
    fn start(container: &Container, name: &str, argv: Vec<String>) -> InContainer {
        let dir = tempfile::tempdir().unwrap();
        let buildah = ChildProcess::spawn(name, container.run(&argv), dir.path().join("log"))
            .expect("start buildah run");
        InContainer {
            buildah,
            argv,
            pid: None,
            _dir: dir,
        }
    }

    /// The process's id on this host: the one whose command line is exactly
    /// `argv` (buildah starts it through helpers of its own).
    fn pid(&mut self) -> u32 {
        if self.pid.is_none() {
            self.pid = self.find();
        }
        self.pid
            .unwrap_or_else(|| panic!("no process runs {:?}", self.argv))
    }

    fn find(&self) -> Option<u32> {
        std::fs::read_dir("/proc")
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .find(|&pid| self.is(pid))
    }

    fn is(&self, pid: u32) -> bool {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
            let args: Vec<&[u8]> = cmdline
                .strip_suffix(b"\0")
                .unwrap_or(&cmdline)
                .split(|&b| b == 0)
                .collect();
            args.len() == self.argv.len()
                && args.iter().zip(&self.argv).all(|(a, b)| *a == b.as_bytes())
        })
    }

    /// The real, effective, saved and filesystem ids of `Uid:` or `Gid:`
    /// in `/proc/<pid>/status`.
    fn ids(&mut self, which: &str) -> Vec<String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read the process's status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(which))
            .unwrap_or_else(|| panic!("no {which} line in {status}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for InContainer {
    fn drop(&mut self) {
        self.buildah.terminate(Duration::from_secs(5));
        let left = match self.pid {
            Some(pid) => Some(pid).filter(|&pid| self.is(pid)),
            None => self.find(),
        };
        if let Some(pid) = left {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

#[tokio::test]
#[ignore = "needs the image: scripts/test-image.sh builds it and runs this"]
async fn herald_dev_serves_clients_from_the_image() {
    let image = std::env::var("HERALD_IMAGE")
        .expect("HERALD_IMAGE names the image to test (scripts/test-image.sh sets it)");

    // The image says how it runs: /herald, as nonroot.
    let config = buildah_output(&[
        "inspect",
        "--type",
        "image",
        "--format",
        "{{.OCIv1.Config.User}} {{.OCIv1.Config.Entrypoint}}",
        &image,
    ]);
    assert_eq!(
        config, "65532:65532 [/herald]",
        "user and entrypoint of {image}"
    );

    let container = Container::from_image(&image);

    // A token signed with the development secret `herald dev` uses when
    // given none, minted by the image's own `herald token`.
    let out = container
        .run(&[
            "/herald".into(),
            "token".into(),
            "--sub".into(),
            "alice".into(),
        ])
        .output()
        .expect("run buildah");
    assert!(
        out.status.success(),
        "herald token in the image failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();

    let ws: SocketAddr = free_addr();
    let grpc: SocketAddr = free_addr();
    let argv: Vec<String> = [
        "/herald",
        "dev",
        "--listen",
        &ws.to_string(),
        "--grpc-listen",
        &grpc.to_string(),
    ]
    .map(String::from)
    .to_vec();
    let mut herald = InContainer::start(&container, "herald dev in the image", argv);
    herald
        .buildah
        .wait_ready(ws, Duration::from_secs(60))
        .expect("herald dev in the image became ready");

    // The server runs as the image's user, not as root.
    assert_eq!(
        herald.ids("Uid:"),
        [NONROOT; 4],
        "uids of the herald process"
    );
    assert_eq!(
        herald.ids("Gid:"),
        [NONROOT; 4],
        "gids of the herald process"
    );

    let (status, metrics) = http_get(ws, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{metrics}");

    let (alice, connected) = Client::connect(&format!("ws://{ws}/ws"), &token)
        .await
        .expect("connect to herald dev in the image");
    assert_eq!(connected["op"], "connected", "{connected}");
    assert_eq!(connected["user"], "alice", "{connected}");
    ok(&alice, json!({"op":"join","room":"chat:lobby"})).await;
    ok(
        &alice,
        json!({"op":"publish","room":"chat:lobby","data":{"text":"hello from the image"}}),
    )
    .await;
    let msg = alice.recv_op("message", WAIT).await.expect("own message");
    assert_eq!(msg["room"], "chat:lobby", "{msg}");
    assert_eq!(msg["from"], "alice", "{msg}");
    assert_eq!(msg["data"], json!({"text":"hello from the image"}), "{msg}");

    let mut router = RouterClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect to the gRPC API in the image");
    router
        .publish(publish_request(
            "chat:lobby",
            r#"{"text":"from a backend"}"#,
        ))
        .await
        .expect("Router.Publish");
    let msg = alice
        .recv_op("message", WAIT)
        .await
        .expect("the router's message");
    assert_eq!(msg["from"], "server", "{msg}");
    assert_eq!(msg["data"], json!({"text":"from a backend"}), "{msg}");
    no_more_messages(&alice).await;

    if let Some(died) = herald.buildah.died() {
        panic!("{died}");
    }
}
