//! The io_uring half of a run of sends: each worker thread's ring, and the
//! one operation that hands a buffer to the kernel, [`Ring::send_all`].
//!
//! Soundness rests on one rule: the kernel may read a run's buffer from the
//! moment the run is submitted until each send's completion is reaped. So
//! `send_all` takes the ring and the buffer by value and gives them back only
//! once every completion is in; if the submission or the wait fails, whether
//! the kernel still holds the buffer is unknown, so the buffer is leaked
//! (never reused, never freed) and the ring dropped. No caller can touch the
//! buffer on an error path, because no caller has it.
//!
//! Only built on Linux; elsewhere (and with `--cfg herald_no_io_uring`) a
//! stand-in with the same interface always answers "no ring", and every
//! write takes the plain `send(2)` path.

use std::cell::{Cell, RefCell};
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd as _, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::{IoUring, opcode, types};

use super::fanout::{RUN, Sent};

/// Whether runs use io_uring: set at start-up by [`enable`], cleared for
/// every thread by [`disable`] when a ring fails.
static ENABLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This worker thread's ring, made on its first run; `None` while a run
    /// holds it, or where it could not be made.
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
    /// Whether this thread has tried to make its ring.
    static TRIED: Cell<bool> = const { Cell::new(false) };
}

/// Turns io_uring runs on (if this kernel lets the process make a ring) or
/// off; returns whether they are on, or why not.
pub fn enable(on: bool) -> io::Result<bool> {
    if !on {
        ENABLED.store(false, Ordering::Relaxed);
        return Ok(false);
    }
    IoUring::new(RUN as u32)?;
    ENABLED.store(true, Ordering::Relaxed);
    Ok(true)
}

/// Turns io_uring off for every thread: each drops its ring the next time
/// it would take it.
pub fn disable() {
    ENABLED.store(false, Ordering::Relaxed);
}

/// One thread's ring, taken for a run. Give it back with [`Ring::put_back`];
/// a ring that is dropped instead is closed.
pub struct Ring(IoUring);

impl Ring {
    /// This thread's ring, if io_uring is on and the kernel let this thread
    /// make one.
    pub fn take() -> Option<Ring> {
        RING.with(|slot| {
            let mut slot = slot.borrow_mut();
            if !ENABLED.load(Ordering::Relaxed) {
                // Turned off since this thread last ran: its ring goes too.
                *slot = None;
                return None;
            }
            if !TRIED.replace(true) {
                match IoUring::new(RUN as u32) {
                    Ok(ring) => *slot = Some(ring),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "io_uring ring could not be made for this thread; its writes use one send(2) each"
                    ),
                }
            }
            slot.take().map(Ring)
        })
    }

    /// Gives the ring back to this thread for its next run.
    pub fn put_back(self) {
        RING.with(|slot| *slot.borrow_mut() = Some(self.0));
    }

    /// Sends `wire[range]` to each socket of `sends` (at most [`RUN`] of
    /// them) in one submission and waits until the kernel has completed
    /// every send. The sends do not block: a full socket answers `EAGAIN`.
    ///
    /// On error the ring is closed and `wire` is leaked: the kernel may still
    /// read it, so nothing may reuse or free it.
    pub fn send_all<'fd>(
        mut self,
        wire: Vec<u8>,
        sends: impl Iterator<Item = (BorrowedFd<'fd>, Range<usize>)>,
    ) -> io::Result<Sent> {
        let mut pushed = 0;
        for (i, (fd, range)) in sends.enumerate() {
            // SAFETY: `wire` is owned here and neither changed nor dropped
            // until `reap` has every completion: on success it is returned
            // after that, on error it is leaked below. Each `fd` is borrowed
            // for this whole call, so it stays open until the submission
            // (the kernel takes its own reference to the file then).
            #[allow(unsafe_code)]
            let ok = unsafe { push_send(&mut self.0, fd, &wire[range], i) };
            if !ok {
                break;
            }
            pushed += 1;
        }
        match reap(&mut self.0, pushed) {
            Ok(results) => Ok(Sent {
                ring: self,
                wire,
                results,
            }),
            Err(e) => {
                leak(wire);
                Err(e)
            }
        }
    }
}

/// Queues a send of `bytes` to `fd` as send `i` of a run; `false` if the
/// ring's queue is full.
///
/// # Safety
///
/// `bytes` must stay alive and unchanged until [`reap`] has reaped the send
/// (or be leaked if it fails): the kernel reads them after the submission.
/// `fd` must stay open until the send is submitted.
#[allow(unsafe_code)]
unsafe fn push_send(ring: &mut IoUring, fd: BorrowedFd<'_>, bytes: &[u8], i: usize) -> bool {
    let entry = opcode::Send::new(
        types::Fd(fd.as_raw_fd()),
        bytes.as_ptr(),
        bytes.len() as u32,
    )
    // Never parked in the kernel: a full socket answers EAGAIN at once,
    // and the member goes on through the plain path.
    .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    .build()
    .user_data(i as u64);
    // SAFETY: the caller keeps `bytes` as they are until the completion.
    unsafe { ring.submission().push(&entry) }.is_ok()
}

/// Submits the `n` sends pushed since the last call and collects their
/// completions: what send `i` returned is at `[i]`.
///
/// Non-blocking sends complete inside the submission, so the completions
/// are normally there when `submit` returns and nothing waits. If the kernel
/// handed one to its own workers instead, the wait for it runs outside the
/// async runtime's worker (`block_in_place`), so that the runtime's other
/// tasks move on while the run, which holds its members' queues, finishes.
fn reap(ring: &mut IoUring, n: usize) -> io::Result<[i32; RUN]> {
    let mut results = [i32::MIN; RUN];
    retry_interrupted(|| ring.submit())?;
    inject::after_submit()?;
    let mut reaped = 0;
    loop {
        for cqe in ring.completion() {
            if let Some(slot) = results.get_mut(cqe.user_data() as usize) {
                *slot = cqe.result();
                reaped += 1;
            }
        }
        if reaped >= n {
            return Ok(results);
        }
        let want = n - reaped;
        off_the_runtime(|| retry_interrupted(|| ring.submit_and_wait(want)))?;
    }
}

fn retry_interrupted(mut f: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Runs a blocking wait so that it does not hold up a multi-threaded
/// runtime's worker.
fn off_the_runtime<R>(wait: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

/// Gives up a buffer that the kernel may still read: it is never freed.
fn leak(wire: Vec<u8>) {
    inject::leaked(wire.as_ptr());
    tracing::warn!(
        bytes = wire.capacity(),
        "a failed io_uring run's buffer is set aside for good, since the kernel may still read it"
    );
    std::mem::forget(wire);
}

/// Test hooks: a failure right after the sends were submitted (the worst
/// case: the kernel has the buffer), and a record of leaked buffers.
#[cfg(test)]
pub(crate) mod inject {
    use std::cell::{Cell, RefCell};
    use std::io;

    thread_local! {
        static FAIL: Cell<bool> = const { Cell::new(false) };
        static LEAKED: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    }

    /// The next run on this thread fails once its sends are submitted.
    pub fn fail_next_run() {
        FAIL.set(true);
    }

    /// The buffers this thread leaked, by address.
    pub fn leaked_buffers() -> Vec<usize> {
        LEAKED.with(|l| l.borrow().clone())
    }

    pub(super) fn after_submit() -> io::Result<()> {
        if FAIL.replace(false) {
            return Err(io::Error::other("injected failure after submitting a run"));
        }
        Ok(())
    }

    pub(super) fn leaked(ptr: *const u8) {
        LEAKED.with(|l| l.borrow_mut().push(ptr as usize));
    }
}

#[cfg(not(test))]
mod inject {
    #[inline(always)]
    pub(super) fn after_submit() -> std::io::Result<()> {
        Ok(())
    }

    #[inline(always)]
    pub(super) fn leaked(_: *const u8) {}
}
