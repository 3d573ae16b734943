//! Test support: starts the real dependencies of a Herald test as separate
//! processes (a `nats-server` with JetStream, Herald's own binaries) on free
//! ports with temporary directories, so a test can kill and restart them.
//! Everything is cleaned up on drop; the process's output is printed when a
//! test fails, so a failure shows what the servers said.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}

/// A free `127.0.0.1:port` address.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn wait_for_tcp(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listened on {addr} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A plain HTTP/1.1 GET; returns the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status line")?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    Ok((status, body.unwrap_or_default()))
}

/// Waits until `check` returns `Some`, polling; fails with `what` after
/// `timeout`. For conditions that have no event to await.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("not true within {timeout:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The path of `nats-server`: `$NATS_SERVER`, else the one on PATH, else
/// Debian's location.
pub fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return p.into();
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join("nats-server");
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from("/usr/sbin/nats-server")
}

/// A child process whose output goes to a temp file, killed on drop.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start {name} ({cmd:?})"))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        })
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn terminate(&mut self, grace: Duration) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("----- output of {} -----\n{}", self.name, self.output());
        }
    }
}

/// A real `nats-server` with JetStream on a free port and a temp store.
pub struct NatsServer {
    port: u16,
    dir: TempDir,
    proc: Proc,
}

impl NatsServer {
    pub fn start() -> Result<NatsServer> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let proc = Self::spawn(port, &dir)?;
        let server = NatsServer { port, dir, proc };
        wait_for_tcp(server.addr(), Duration::from_secs(10))?;
        Ok(server)
    }

    fn spawn(port: u16, dir: &TempDir) -> Result<Proc> {
        let mut cmd = Command::new(nats_server_bin());
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path().join("store"));
        Proc::spawn("nats-server", cmd, dir.path().join("nats.log"))
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `kill -9`: no goodbye to clients.
    pub fn kill(&mut self) {
        self.proc.kill9();
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill9();
        self.proc = Self::spawn(self.port, &self.dir)?;
        wait_for_tcp(self.addr(), Duration::from_secs(10))
    }
}

/// The `herald` binary under test: `$HERALD_BIN`, else `herald` next to the
/// test executable's `deps/` folder (where `cargo test --workspace` builds it).
pub fn herald_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HERALD_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let bin = dir.join("herald");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --bin herald` or the whole `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// One running `herald <subcommand>` process.
pub struct Herald {
    proc: Proc,
    _dir: TempDir,
    /// The HTTP address with `/healthz`, `/readyz` and `/metrics`.
    pub http: SocketAddr,
}

impl Herald {
    /// Runs `herald <args>` and waits until its `/readyz` (at `http`) says ready.
    pub fn start(name: &str, args: &[String], http: SocketAddr) -> Result<Herald> {
        let dir = tempfile::tempdir()?;
        let mut cmd = Command::new(herald_bin());
        cmd.args(args)
            .env("RUST_LOG", "info,herald=debug")
            .env_remove("HERALD_CONFIG");
        let proc = Proc::spawn(name, cmd, dir.path().join("herald.log"))?;
        let mut h = Herald {
            proc,
            _dir: dir,
            http,
        };
        h.wait_ready(Duration::from_secs(20))?;
        Ok(h)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.proc.exited() {
                bail!(
                    "{} exited with {status} before it was ready:\n{}",
                    self.proc.name,
                    self.proc.output()
                );
            }
            if let Ok((200, _)) = http_get(self.http, "/readyz") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} was not ready within {timeout:?}:\n{}",
                    self.proc.name,
                    self.proc.output()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        self.proc.kill9();
    }

    /// SIGTERM, then `kill -9` after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        self.proc.terminate(grace);
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        self.proc.output()
    }
}
