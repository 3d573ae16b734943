//! The floor writer's batched sends: one round's bytes to every connection
//! through io_uring, `batch` sends per `io_uring_enter`, the way the edge
//! hands a room's fan-out to the kernel (`services/edge/src/delivery/uring.rs`):
//! non-blocking sends that complete inside the submission, and a plain
//! blocking `write` for the rest of any send that could not finish.
//!
//! Soundness rests on one rule: the kernel may read the round's buffer from
//! the moment a batch is submitted until each of its completions is reaped.
//! [`Batcher::send_to_all`] takes the buffer by value and gives it back only
//! once every completion of every batch is in; if a submission or a wait
//! fails, whether the kernel still holds the buffer is unknown, so it is
//! leaked (never freed, never reused), and no caller can touch it, because no
//! caller has it. The sockets are borrowed for the whole call, so each stays
//! open until its send is submitted (the kernel then holds its own reference
//! to the file).
//!
//! Elsewhere than on Linux a stand-in always says io_uring is unavailable.

#[cfg(target_os = "linux")]
pub use linux::Batcher;
#[cfg(not(target_os = "linux"))]
pub use other::Batcher;

/// What a round's sends gave back.
pub struct Sent {
    /// The round's bytes, the kernel done with them.
    pub buf: Vec<u8>,
    /// `io_uring_enter` calls, plus a `write` for each send io_uring could
    /// not finish.
    pub syscalls: u64,
}

/// The most sends one submission may carry.
pub const MAX_BATCH: usize = 4096;

#[cfg(target_os = "linux")]
mod linux {
    use std::io::{self, Write as _};
    use std::net::TcpStream;
    use std::os::fd::AsRawFd as _;

    use io_uring::{IoUring, opcode, types};

    use super::{MAX_BATCH, Sent};

    /// A ring with room for one batch of sends.
    pub struct Batcher {
        ring: IoUring,
        batch: usize,
        /// What send `k` of the current batch returned.
        results: Vec<i32>,
    }

    impl Batcher {
        /// A ring for `batch` sends per submission (1 to [`MAX_BATCH`]);
        /// fails where the kernel refuses io_uring.
        pub fn new(batch: usize) -> io::Result<Batcher> {
            if !(1..=MAX_BATCH).contains(&batch) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("an io_uring batch is 1 to {MAX_BATCH} sends, not {batch}"),
                ));
            }
            Ok(Batcher {
                ring: IoUring::new(batch as u32)?,
                batch,
                results: vec![0; batch],
            })
        }

        pub fn batch(&self) -> usize {
            self.batch
        }

        /// Writes all of `buf` to every socket of `socks`: `batch` sends per
        /// submission, each submission waiting for its own completions in
        /// the same `io_uring_enter`; what a send could not take (a full
        /// socket) goes with a blocking `write`. On error `buf` is leaked
        /// (see the module's doc).
        pub fn send_to_all(&mut self, buf: Vec<u8>, socks: &mut [TcpStream]) -> io::Result<Sent> {
            let mut syscalls = 0;
            for chunk in socks.chunks_mut(self.batch) {
                let mut pushed = 0;
                for (k, sock) in chunk.iter().enumerate() {
                    let entry = opcode::Send::new(
                        types::Fd(sock.as_raw_fd()),
                        buf.as_ptr(),
                        buf.len() as u32,
                    )
                    // As the edge: never parked in the kernel, a full socket
                    // answers EAGAIN at once and takes the plain path.
                    .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(k as u64);
                    // SAFETY: `buf` is owned by this call and neither changed
                    // nor dropped until every completion of this batch is
                    // reaped below; if reaping fails it is leaked, so the
                    // kernel never reads freed memory. Each socket is
                    // borrowed for this whole call, so its fd is open when
                    // the batch is submitted.
                    #[allow(unsafe_code)]
                    let queued = unsafe { self.ring.submission().push(&entry) }.is_ok();
                    if !queued {
                        break;
                    }
                    pushed += 1;
                }
                if let Err(e) = self.reap(pushed, &mut syscalls) {
                    leak(buf);
                    return Err(e);
                }
                if pushed < chunk.len() {
                    // Cannot happen: the ring holds a batch and every batch
                    // is reaped whole before the next. All that was queued is
                    // in, so `buf` may be dropped.
                    return Err(io::Error::other("io_uring submission queue full"));
                }
                for (k, sock) in chunk.iter_mut().enumerate() {
                    let sent = match self.results[k] {
                        n if n >= 0 => n as usize,
                        e if e == -libc::EAGAIN => 0,
                        e => return Err(io::Error::from_raw_os_error(-e)),
                    };
                    if sent < buf.len() {
                        sock.write_all(&buf[sent..])?;
                        syscalls += 1;
                    }
                }
            }
            Ok(Sent { buf, syscalls })
        }

        /// Submits the `n` sends queued and waits for their completions in
        /// the same call (more calls only if one is interrupted or the
        /// kernel finishes a send later); `self.results[k]` is what send `k`
        /// returned.
        fn reap(&mut self, n: usize, syscalls: &mut u64) -> io::Result<()> {
            let mut reaped = 0;
            while reaped < n {
                *syscalls += 1;
                match self.ring.submit_and_wait(n - reaped) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                for cqe in self.ring.completion() {
                    if let Some(slot) = self.results.get_mut(cqe.user_data() as usize) {
                        *slot = cqe.result();
                        reaped += 1;
                    }
                }
            }
            Ok(())
        }
    }

    /// Gives up a buffer that the kernel may still read: it is never freed.
    fn leak(buf: Vec<u8>) {
        std::mem::forget(buf);
    }
}

#[cfg(not(target_os = "linux"))]
mod other {
    use std::io;
    use std::net::TcpStream;

    use super::Sent;

    pub struct Batcher(());

    impl Batcher {
        pub fn new(_batch: usize) -> io::Result<Batcher> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring is Linux's",
            ))
        }

        pub fn batch(&self) -> usize {
            0
        }

        pub fn send_to_all(&mut self, _buf: Vec<u8>, _socks: &mut [TcpStream]) -> io::Result<Sent> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring is Linux's",
            ))
        }
    }
}
