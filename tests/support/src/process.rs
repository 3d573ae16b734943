//! Child processes for tests and the bench: spawned so that they die with
//! whoever started them, their output in a log file, waited for until they
//! are ready, and killed on drop.

use std::io;
use std::net::{SocketAddr, TcpStream};
#[cfg(target_os = "linux")]
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::http_get;

/// How many of the last lines of a process's output an error shows: enough
/// for a start-up that failed, not a whole run's log.
const TAIL_LINES: usize = 60;

/// Makes the kernel kill the process `cmd` starts (SIGKILL) when the thread
/// that starts it ends, so that a test or bench that dies without cleaning
/// up (a timeout, Ctrl-C, `kill -9`) leaves no servers behind. Spawn from a
/// thread that outlives the child: a test's own thread, the bench's main
/// thread. Linux only; elsewhere children are only killed on drop.
#[cfg(target_os = "linux")]
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
    // and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub fn die_with_parent(_cmd: &mut Command) {}

/// A child process whose output (stdout and stderr) goes to a log file;
/// killed on drop, when its output is printed if the thread is panicking
/// (a failing test shows what the process said).
pub struct ChildProcess {
    name: String,
    pid: u32,
    /// `None` once killed.
    child: Option<Child>,
    log: PathBuf,
}

impl ChildProcess {
    /// Starts `cmd` with no stdin and its output appended to `log`, see
    /// [`die_with_parent`].
    pub fn spawn(name: &str, mut cmd: Command, log: impl Into<PathBuf>) -> Result<ChildProcess> {
        let log = log.into();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("could not open {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start {name} ({cmd:?})"))?;
        Ok(ChildProcess {
            name: name.to_owned(),
            pid: child.id(),
            child: Some(child),
            log,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id it was started with (for `/proc/<pid>`).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines the process printed.
    pub fn tail(&self, lines: usize) -> String {
        let out = self.output();
        let all: Vec<&str> = out.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// How it ended, if it has (`None` while it runs, and once killed).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// If the process has exited although it should still run: its name,
    /// how it ended and the end of its output.
    pub fn died(&mut self) -> Option<String> {
        let status = self.exited()?;
        Some(format!(
            "{} exited with {status} during the run:\n{}",
            self.name,
            self.tail(30)
        ))
    }

    /// Polls `ready` until it holds; fails, with the end of the output, if
    /// the process exits first or `timeout` passes. `what` completes
    /// "before ...", e.g. "it was ready".
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                bail!(
                    "{} exited with {status} before {what}:\n{}",
                    self.name,
                    self.tail(TAIL_LINES)
                );
            }
            if ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: {timeout:?} passed before {what}:\n{}",
                    self.name,
                    self.tail(TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until something accepts TCP connections on `addr`.
    pub fn wait_listening(&mut self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        self.wait_until(&format!("it listened on {addr}"), timeout, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
    }

    /// Waits until `GET /readyz` on `http` answers 200.
    pub fn wait_ready(&mut self, http: SocketAddr, timeout: Duration) -> Result<()> {
        self.wait_until("it was ready", timeout, || {
            matches!(http_get(http, "/readyz"), Ok((200, _)))
        })
    }

    /// Waits until the process has printed `line` (a whole line).
    pub fn wait_for_line(&mut self, line: &str, timeout: Duration) -> Result<()> {
        let log = self.log.clone();
        self.wait_until(&format!("it printed {line:?}"), timeout, || {
            std::fs::read_to_string(&log).is_ok_and(|out| out.lines().any(|l| l == line))
        })
    }

    /// `kill -9`, and reaps it: no goodbye to its clients.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then `kill -9` after `grace`.
    pub fn terminate(&mut self, grace: Duration) {
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
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- output of {} -----\n{}", self.name, self.output());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sh -c script` as "sh", its log in the returned temp dir (which
    /// must outlive the process).
    fn sh(script: &str) -> (ChildProcess, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        let p = ChildProcess::spawn("sh", cmd, dir.path().join("log")).unwrap();
        (p, dir)
    }

    #[test]
    fn waits_for_a_printed_line() {
        let (mut p, _dir) = sh("echo one; echo ready; exec sleep 30");
        p.wait_for_line("ready", Duration::from_secs(10)).unwrap();
        assert_eq!(p.output(), "one\nready\n");
        assert_eq!(p.tail(1), "ready");
        assert!(p.died().is_none());
    }

    #[test]
    fn an_early_exit_fails_the_wait_with_the_output() {
        let (mut p, _dir) = sh("echo bad config >&2; exit 3");
        let err = p
            .wait_for_line("ready", Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sh exited with exit status: 3 before it printed \"ready\""),
            "{err}"
        );
        assert!(err.contains("bad config"), "{err}");
        assert!(p.died().unwrap().contains("bad config"));
    }

    /// The state letter of `/proc/<pid>/stat`: `Z` once killed and not reaped.
    fn state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat[stat.rfind(')')? + 2..].chars().next()
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_child_dies_with_the_thread_that_started_it() {
        let pid = std::thread::spawn(|| {
            let (p, dir) = sh("exec sleep 30");
            let pid = p.pid();
            // Neither killed nor reaped by us: only the kernel can end it.
            std::mem::forget(p);
            drop(dir);
            pid
        })
        .join()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while state(pid).is_some_and(|s| s != 'Z') {
            assert!(Instant::now() < deadline, "{pid} still runs");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
