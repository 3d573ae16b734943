//! What `/proc` tells about a process the bench started: its resident
//! memory, and its CPU time in nanoseconds.
//!
//! CPU time comes from each thread's `/proc/<pid>/task/<tid>/schedstat`,
//! whose first field is the nanoseconds the thread has spent on a CPU (the
//! scheduler's own account, as `perf` and `top`'s sources use), summed over
//! the threads. utime and stime in `/proc/<pid>/stat` are in clock ticks
//! (10 ms here), too coarse for a cost of a few microseconds per event
//! over a phase of a few seconds; they are kept only for the kernel's share
//! of the time. A thread that exits during a phase takes its time since the
//! phase began with it: [`CpuUsed::threads_exited`] counts such threads, so
//! that a reader knows when a figure may be short.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

/// Resident set size of a process in bytes, from `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time of a process in user space and in the kernel, in seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTimes {
    pub user: f64,
    pub system: f64,
}

/// utime and stime of a process, from `/proc/<pid>/stat` (clock ticks).
pub fn cpu_times(pid: u32) -> Option<CpuTimes> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let hz = clock_ticks();
    Some(CpuTimes {
        user: utime as f64 / hz,
        system: stime as f64 / hz,
    })
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Nanoseconds on a CPU of each thread of a process, by thread id, from
/// `/proc/<pid>/task/*/schedstat`.
pub fn on_cpu_ns_by_thread(pid: u32) -> Option<HashMap<u32, u64>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut out = HashMap::new();
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread may end between the listing and the read.
        if let Some(ns) = schedstat_ns(&task.path().join("schedstat")) {
            out.insert(tid, ns);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The first field of a `schedstat` file: nanoseconds on a CPU.
fn schedstat_ns(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// One reading of a process's CPU time: per thread in ns, and its ticks.
#[derive(Debug, Clone, Default)]
pub struct CpuSample {
    threads: HashMap<u32, u64>,
    ticks: CpuTimes,
}

/// Reads `pid`'s CPU time now; `None` if the process is gone.
pub fn cpu_sample(pid: u32) -> Option<CpuSample> {
    Some(CpuSample {
        threads: on_cpu_ns_by_thread(pid)?,
        ticks: cpu_times(pid)?,
    })
}

impl CpuSample {
    /// What the process used between `start` and this reading: each thread
    /// alive now counts from its reading at `start` (from 0 if it started
    /// since).
    pub fn since(&self, start: &CpuSample) -> CpuUsed {
        let on_cpu_ns = self
            .threads
            .iter()
            .map(|(tid, ns)| ns.saturating_sub(start.threads.get(tid).copied().unwrap_or(0)))
            .sum();
        let threads_exited = start
            .threads
            .keys()
            .filter(|tid| !self.threads.contains_key(tid))
            .count();
        CpuUsed {
            on_cpu_ns,
            ticks: CpuTimes {
                user: (self.ticks.user - start.ticks.user).max(0.0),
                system: (self.ticks.system - start.ticks.system).max(0.0),
            },
            threads_exited,
        }
    }
}

/// A process's CPU time over a phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUsed {
    /// Nanoseconds on a CPU, summed over its threads (schedstat).
    pub on_cpu_ns: u64,
    /// utime and stime over the phase (clock ticks, as seconds): only for
    /// the kernel's share.
    pub ticks: CpuTimes,
    /// Threads that were alive at the start and had exited at the end:
    /// their time in the phase is not counted.
    pub threads_exited: usize,
}

impl CpuUsed {
    /// Seconds on a CPU.
    pub fn secs(&self) -> f64 {
        self.on_cpu_ns as f64 / 1e9
    }

    /// The kernel's share of the time (stime / (utime + stime)), 0 when no
    /// tick was counted.
    pub fn kernel_share(&self) -> f64 {
        let total = self.ticks.user + self.ticks.system;
        if total > 0.0 {
            self.ticks.system / total
        } else {
            0.0
        }
    }
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The first line `program --version` prints, e.g. `v20.20.2`; `None` if
/// it cannot run.
pub fn version_of(program: impl AsRef<std::ffi::OsStr>) -> Option<String> {
    let out = Command::new(program).arg("--version").output().ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    let line = String::from_utf8_lossy(&text)
        .lines()
        .next()?
        .trim()
        .to_owned();
    (!line.is_empty()).then_some(line)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn spin(d: Duration) {
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < d {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
    }

    #[test]
    fn cpu_seconds_of_this_process_grows() {
        let total = |t: CpuTimes| t.user + t.system;
        let before = total(cpu_times(std::process::id()).expect("own /proc/<pid>/stat"));
        spin(Duration::from_millis(300));
        let after = total(cpu_times(std::process::id()).unwrap());
        assert!(after > before, "{before} -> {after}");
    }

    /// The calling thread's CPU time as the kernel's clock has it.
    fn thread_cpu_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime only writes `ts`.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0);
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    #[test]
    fn schedstat_counts_a_thread_to_the_nanosecond() {
        let pid = std::process::id();
        // A thread of its own that spins for 200 ms of CPU (not of wall
        // time: the machine is shared), then waits, descheduled, so that
        // its account is up to date, while it is read.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() } as u32;
            let start = thread_cpu_ns();
            while thread_cpu_ns() - start < 200_000_000 {
                spin(Duration::from_micros(100));
            }
            done_tx.send((tid, thread_cpu_ns())).unwrap();
            let _ = go_rx.recv();
        });
        let (tid, clock_ns) = done_rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let sample = cpu_sample(pid).expect("own schedstat");
        go_tx.send(()).unwrap();
        worker.join().unwrap();
        let ns = sample.threads[&tid];
        // The same account as the thread's own clock, give or take what it
        // ran after reading the clock (sending, going to sleep).
        assert!(
            ns >= clock_ns && ns - clock_ns < 5_000_000,
            "schedstat {ns} ns, clock {clock_ns} ns"
        );
        let used = sample.since(&CpuSample::default());
        assert!(used.on_cpu_ns >= ns, "{used:?}");
        assert!((0.0..=1.0).contains(&used.kernel_share()));
    }

    #[test]
    fn a_thread_that_exits_is_counted_as_such() {
        let pid = std::process::id();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            ready_tx.send(()).unwrap();
            let _ = go_rx.recv();
        });
        ready_rx.recv().unwrap();
        let start = cpu_sample(pid).unwrap();
        go_tx.send(()).unwrap();
        worker.join().unwrap();
        let used = cpu_sample(pid).unwrap().since(&start);
        assert!(used.threads_exited >= 1, "{used:?}");
    }

    #[test]
    fn nothing_for_a_missing_process() {
        assert!(cpu_times(u32::MAX).is_none());
        assert!(cpu_sample(u32::MAX).is_none());
        assert!(rss_bytes(u32::MAX).is_none());
    }

    #[test]
    fn rss_of_this_process_is_plausible() {
        let rss = rss_bytes(std::process::id()).expect("own /proc/<pid>/status");
        assert!(rss > 100 * 1024 && rss < 64 << 30, "{rss}");
    }

    #[test]
    fn kernel_release_is_known() {
        let release = kernel_release().expect("/proc/sys/kernel/osrelease");
        assert!(release.chars().next().is_some_and(|c| c.is_ascii_digit()));
    }
}
