//! One room message to many members: the frame is encoded once and handed to
//! the kernel for a whole run of members in one io_uring submission, instead
//! of one `send(2)` per member. The end of a batch (several messages taken
//! off the broker at once, coalesced into one write per connection) hands
//! its writes to the kernel the same way, in [`write_all`].
//!
//! Each member still gets its own write (the kernel's cost per write is the
//! floor of a delivery), but the run shares one entry into the kernel and one
//! return from it (measured in `docs/benchmarks.md`). The sends are
//! non-blocking and complete inside the submission; a member whose socket
//! takes less than the whole frame goes on through [`Outbox::offer`] like any
//! short write. Where io_uring is not available (another system than Linux,
//! an old kernel, a seccomp profile that forbids it), or turned off with
//! `--io-uring=false`, each member gets a plain `send(2)`.
//!
//! The ring and the buffer the kernel reads belong to [`super::uring`]
//! while a run is in the kernel; this module only decides who is in a run.

use std::cell::RefCell;
use std::io;
use std::ops::Range;
use std::os::fd::AsFd as _;
use std::sync::MutexGuard;

use bytes::Bytes;
use smallvec::SmallVec;

use super::uring::{self, Ring};
use super::{Claim, Outbox, Queue, encode_queued};
use crate::framing::{OP_TEXT, encode_frame};

/// Members sent to by one submission. Their queues stay locked until it
/// returns, so that nothing else is written to those sockets in between. A
/// run never waits for a queue that another thread holds (see
/// [`lock_next`]).
pub(super) const RUN: usize = 128;

/// A run that completed: the ring and the buffer, free to use again, and
/// what each send returned (bytes taken, `-errno`, or `i32::MIN` for a send
/// the ring had no room for).
pub(super) struct Sent {
    pub ring: Ring,
    pub wire: Vec<u8>,
    pub results: [i32; RUN],
}

/// The most bytes a run of batch-end writes encodes before it is submitted
/// (each connection's write is at most 64 KiB, the run up to [`RUN`] of them).
const RUN_BYTES: usize = 1024 * 1024;

thread_local! {
    /// Each worker thread's buffer for a run's bytes, between runs.
    static WIRE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn take_wire() -> Vec<u8> {
    WIRE.with(|w| std::mem::take(&mut *w.borrow_mut()))
}

/// Gives a run's buffer back to this thread once the kernel is done with it,
/// unless it grew too big to keep.
fn keep_wire(mut wire: Vec<u8>) {
    if wire.capacity() <= RUN_BYTES + 64 * 1024 {
        wire.clear();
        WIRE.with(|w| *w.borrow_mut() = wire);
    }
}

/// Turns io_uring runs on (if this kernel lets the process make a ring) or
/// off; returns whether they are on, or why not.
pub fn enable(on: bool) -> io::Result<bool> {
    uring::enable(on)
}

/// The members of one fan-out that can be written to now, in runs of
/// [`RUN`]. Hand each member to [`Sends::send`]; the last run goes out when
/// the `Sends` is dropped.
pub struct Sends<'a> {
    frame: &'a Bytes,
    /// `None` where there is no ring, and for good once a run failed.
    ring: Option<Ring>,
    /// `frame` as a WebSocket frame, encoded on the first send. While a run
    /// is in the kernel, [`Ring::send_all`] owns it.
    wire: Vec<u8>,
    /// The members of the run being filled, their queues locked.
    run: SmallVec<[(MutexGuard<'a, Queue>, &'a Outbox); RUN]>,
}

impl<'a> Sends<'a> {
    pub fn new(frame: &'a Bytes) -> Sends<'a> {
        let ring = Ring::take();
        let wire = if ring.is_some() {
            take_wire()
        } else {
            Vec::new()
        };
        Sends {
            frame,
            ring,
            wire,
            run: SmallVec::new(),
        }
    }

    /// Delivers the frame to `outbox`: queued if the connection has
    /// something waiting (or a batch is open), otherwise sent with the run.
    pub fn send(&mut self, outbox: &'a Outbox) {
        let q = match lock_next(outbox, !self.run.is_empty()) {
            Some(q) => q,
            None => {
                self.flush();
                outbox.lock()
            }
        };
        let mut q = match outbox.claim(q, self.frame) {
            Claim::Done(_) => return,
            Claim::Now(q) => q,
        };
        if self.ring.is_none() {
            outbox.write_now(&mut q, self.frame);
            return;
        }
        if self.wire.is_empty() {
            encode_frame(&mut self.wire, OP_TEXT, self.frame);
        }
        self.run.push((q, outbox));
        if self.run.len() == RUN {
            self.flush();
        }
    }

    /// Submits the run, waits for each send to complete, and finishes
    /// what a socket did not take whole through the plain path.
    fn flush(&mut self) {
        if self.run.is_empty() {
            return;
        }
        let ring = self.ring.take().expect("a run is only filled with a ring");
        let wire = std::mem::take(&mut self.wire);
        let whole = 0..wire.len();
        let sends = self
            .run
            .iter()
            .map(|(_, outbox)| (outbox.conn.stream.as_fd(), whole.clone()));
        match ring.send_all(wire, sends) {
            Ok(Sent {
                ring,
                wire,
                results,
            }) => {
                for (i, (mut q, outbox)) in self.run.drain(..).enumerate() {
                    settle(outbox, &mut q, &wire, results[i]);
                }
                self.ring = Some(ring);
                self.wire = wire;
            }
            // The ring and the buffer are gone: the members after this run
            // get plain sends.
            Err(e) => abandon(&e, self.run.drain(..)),
        }
    }
}

impl Drop for Sends<'_> {
    fn drop(&mut self) {
        self.flush();
        if let Some(ring) = self.ring.take() {
            ring.put_back();
            keep_wire(std::mem::take(&mut self.wire));
        }
    }
}

/// The queue of the next member of a run; `None` if the run `holding` locks
/// already and another thread holds this one: then the caller sends its run
/// (releasing them) before it waits, so that two threads' runs never wait
/// for each other.
fn lock_next(outbox: &Outbox, holding: bool) -> Option<MutexGuard<'_, Queue>> {
    if holding {
        outbox.try_lock()
    } else {
        Some(outbox.lock())
    }
}

/// Finishes a send that took `sent` of `bytes`: the rest goes the plain
/// way, which stalls the connection if the socket is full; nothing taken (a
/// full socket, or an error that the plain write meets again and marks the
/// connection broken with) means all of it. Whether the socket has it all.
fn settle(outbox: &Outbox, q: &mut Queue, bytes: &[u8], sent: i32) -> bool {
    match usize::try_from(sent) {
        Ok(n) if n == bytes.len() => true,
        Ok(n) if n > 0 => outbox.offer(q, &bytes[n..]),
        _ => outbox.offer(q, bytes),
    }
}

/// The ring failed in a way it should not: whether the run's frames went
/// out is unknown, so their connections are closed (a client that
/// reconnects recovers from its last position) and io_uring is turned off
/// for every thread.
fn abandon<'a>(
    e: &io::Error,
    run: impl ExactSizeIterator<Item = (MutexGuard<'a, Queue>, &'a Outbox)>,
) {
    tracing::error!(error = %e, members = run.len(), "io_uring submission failed; closing the connections it may have left half-sent and turning io_uring off");
    uring::disable();
    for (q, outbox) in run {
        drop(q);
        outbox.close(
            herald_wire::CloseCode::Internal,
            "a delivery to this connection may have been cut short; reconnect to resume",
        );
    }
}

/// One connection's write in a run: its queue (locked until the write is
/// settled) and where its bytes are in the run's buffer.
type Write<'a> = (MutexGuard<'a, Queue>, &'a Outbox, Range<usize>);

/// Writes what a batch queued for each of `dirty`: each connection's frames
/// in one write, as many connections as fit in a run per io_uring
/// submission. A connection with a write already under way (a stalled
/// rest), and every connection once there is no ring, gets the plain write.
pub(super) fn write_all(dirty: &[Outbox]) {
    let mut next = 0;
    if let Some(ring) = Ring::take() {
        next = write_runs(dirty, ring);
    }
    for outbox in &dirty[next..] {
        let mut q = outbox.lock();
        q.batched = false;
        outbox.write(&mut q);
    }
}

/// [`write_all`]'s io_uring part: writes `dirty` in runs until all are
/// written or a run fails; returns how many were written.
fn write_runs(dirty: &[Outbox], mut ring: Ring) -> usize {
    let mut wire = take_wire();
    let mut next = 0;
    let mut run: SmallVec<[Write<'_>; RUN]> = SmallVec::new();
    loop {
        wire.clear();
        while let Some(outbox) = dirty.get(next) {
            // A queue another thread holds: this run goes first.
            let Some(mut q) = lock_next(outbox, !run.is_empty()) else {
                break;
            };
            next += 1;
            q.batched = false;
            if !q.head.is_empty() || q.broken || q.frames.is_empty() {
                outbox.write(&mut q);
                continue;
            }
            let start = wire.len();
            encode_queued(&mut q, &mut wire);
            run.push((q, outbox, start..wire.len()));
            if run.len() == RUN || wire.len() >= RUN_BYTES {
                break;
            }
        }
        if run.is_empty() {
            break;
        }
        let sends = run
            .iter()
            .map(|(_, outbox, range)| (outbox.conn.stream.as_fd(), range.clone()));
        match ring.send_all(wire, sends) {
            Ok(sent) => {
                for (i, (mut q, outbox, range)) in run.drain(..).enumerate() {
                    // A send never pushed is `i32::MIN`: all of it, plainly.
                    if settle(outbox, &mut q, &sent.wire[range], sent.results[i]) {
                        // The frames past this write's 64 KiB, and the
                        // shutdown of a closing connection.
                        outbox.write(&mut q);
                    }
                }
                (ring, wire) = (sent.ring, sent.wire);
            }
            Err(e) => {
                abandon(&e, run.drain(..).map(|(q, outbox, _)| (q, outbox)));
                return next;
            }
        }
    }
    ring.put_back();
    keep_wire(wire);
    next
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    use super::*;
    use crate::transport::tests::pair;

    /// Tests that need io_uring on, or turn it off, take turns: it is one
    /// switch for the whole process.
    static RINGS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Turns io_uring on; `false` (and a note) where this machine refuses it
    /// (a seccomp profile, an old kernel, not Linux): the tests then check
    /// the plain path, which must give the same bytes.
    fn ring_here() -> bool {
        match enable(true) {
            Ok(on) => on,
            Err(e) => {
                eprintln!("io_uring is not available here ({e}); checking the plain path");
                false
            }
        }
    }

    async fn members(n: usize) -> (Vec<Outbox>, Vec<TcpStream>) {
        let mut outboxes = Vec::new();
        let mut clients = Vec::new();
        for id in 0..n {
            let (server, client) = pair().await;
            outboxes.push(Outbox::new(id as u64, server, 64));
            clients.push(client);
        }
        (outboxes, clients)
    }

    fn fan_out(frame: &Bytes, outboxes: &[Outbox], ring: bool) {
        let mut sends = Sends::new(frame);
        assert_eq!(sends.ring.is_some(), ring, "a ring where one was asked for");
        for ob in outboxes {
            sends.send(ob);
        }
    }

    async fn read_exactly(client: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("the bytes within 10 s")
            .unwrap();
        got
    }

    async fn nothing_more(client: &mut TcpStream) {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(100), client.read(&mut byte)).await;
        assert!(read.is_err(), "unexpected bytes: {read:?}");
    }

    #[tokio::test]
    async fn every_member_gets_each_frame_once_in_order_across_runs() {
        let _rings = RINGS.lock().await;
        let ring = ring_here();
        // More members than one run holds.
        let (outboxes, mut clients) = members(RUN + 5).await;
        fan_out(&Bytes::from_static(b"first"), &outboxes, ring);
        fan_out(&Bytes::from_static(b"second"), &outboxes, ring);
        for client in &mut clients {
            let got = read_exactly(client, 7 + 8).await;
            assert_eq!(got, b"\x81\x05first\x81\x06second");
        }
        nothing_more(&mut clients[0]).await;
        nothing_more(&mut clients[RUN + 4]).await;
    }

    #[tokio::test]
    async fn without_a_ring_each_member_gets_a_plain_send() {
        let _rings = RINGS.lock().await;
        enable(false).unwrap();
        let (outboxes, mut clients) = members(3).await;
        fan_out(&Bytes::from_static(b"hello"), &outboxes, false);
        for client in &mut clients {
            assert_eq!(read_exactly(client, 7).await, b"\x81\x05hello");
        }
        nothing_more(&mut clients[1]).await;
    }

    #[tokio::test]
    async fn a_batch_end_writes_each_members_frames_once_in_order_in_runs() {
        let _rings = RINGS.lock().await;
        ring_here();
        let (outboxes, mut clients) = members(RUN + 5).await;
        let big = Bytes::from(vec![b'b'; 40_000]);
        crate::delivery::batch(|| {
            for ob in &outboxes {
                ob.deliver(&Bytes::from_static(b"one"));
                ob.deliver(&Bytes::from_static(b"two"));
            }
            // Past one write's 64 KiB: the rest follows the plain way.
            outboxes[RUN].deliver(&big);
            outboxes[RUN].deliver(&big);
            outboxes[RUN].deliver(&Bytes::from_static(b"end"));
        });
        for (i, client) in clients.iter_mut().enumerate() {
            assert_eq!(read_exactly(client, 10).await, b"\x81\x03one\x81\x03two");
            if i == RUN {
                for _ in 0..2 {
                    let got = read_exactly(client, 4 + big.len()).await;
                    assert_eq!(&got[..4], &[0x81, 126, 0x9c, 0x40]);
                    assert!(got[4..].iter().all(|&b| b == b'b'));
                }
                assert_eq!(read_exactly(client, 5).await, b"\x81\x03end");
            }
        }
        for ob in &outboxes {
            assert!(!ob.is_stalled());
        }
        nothing_more(&mut clients[0]).await;
        nothing_more(&mut clients[RUN]).await;
    }

    #[tokio::test]
    async fn a_batch_end_leaves_a_full_socket_stalled_with_the_rest() {
        a_full_socket_gets_the_rest_once_it_drains(|frame, outboxes| {
            crate::delivery::batch(|| {
                for ob in outboxes {
                    ob.deliver(frame);
                }
            });
        })
        .await;
    }

    /// Two runs holding queues must never wait for each other: a run that
    /// meets a queue held elsewhere sends what it has (releasing those
    /// queues) before it waits. `deliver` runs on another thread with
    /// `(x, y)` and calls `hold` once it is about to deliver to `[y, x]`; from
    /// then on the test holds `x`, and `y` must get its frame and be let go
    /// of while the run waits for `x`.
    // Holding `x` while another thread's run waits for it is the point.
    #[allow(clippy::await_holding_lock)]
    async fn lets_go_of_y_while_it_waits_for_x(
        deliver: impl FnOnce(Outbox, Outbox, &dyn Fn()) + Send + 'static,
    ) {
        let _rings = RINGS.lock().await;
        ring_here();
        let (outboxes, mut clients) = members(2).await;
        let (x, y) = (outboxes[0].clone(), outboxes[1].clone());
        let (ready, go) = (std::sync::mpsc::channel(), std::sync::mpsc::channel());
        let (ready_tx, go_rx) = (ready.0, go.1);
        let delivering = std::thread::spawn(move || {
            deliver(x, y, &|| {
                ready_tx.send(()).unwrap();
                go_rx.recv().unwrap();
            });
        });
        ready.1.recv().unwrap();
        let held_x = outboxes[0].lock();
        go.0.send(()).unwrap();
        assert_eq!(read_exactly(&mut clients[1], 4).await, b"\x81\x02hi");
        free_soon(&outboxes[1]).await;
        drop(held_x);
        delivering.join().unwrap();
        assert_eq!(read_exactly(&mut clients[0], 4).await, b"\x81\x02hi");
    }

    #[tokio::test]
    async fn a_fan_out_lets_go_of_its_run_before_it_waits_for_a_queue() {
        lets_go_of_y_while_it_waits_for_x(|x, y, hold| {
            hold();
            let frame = Bytes::from_static(b"hi");
            let mut sends = Sends::new(&frame);
            sends.send(&y);
            sends.send(&x);
        })
        .await;
    }

    #[tokio::test]
    async fn a_batch_end_lets_go_of_its_run_before_it_waits_for_a_queue() {
        lets_go_of_y_while_it_waits_for_x(|x, y, hold| {
            crate::delivery::batch(|| {
                y.deliver(&Bytes::from_static(b"hi"));
                x.deliver(&Bytes::from_static(b"hi"));
                hold();
            });
        })
        .await;
    }

    /// Waits until `outbox`'s queue is free, failing after 10 s (the run
    /// that held it is still settling its sends right after they arrive).
    async fn free_soon(outbox: &Outbox) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while outbox.try_lock().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the queue stayed held: its run waited for another queue while holding it"
            );
            tokio::task::yield_now().await;
        }
    }

    /// Fills `outbox`'s socket behind its back; returns the bytes it took.
    fn fill(outbox: &Outbox) -> usize {
        let filler = vec![b'.'; 16 * 1024];
        let mut filled = 0;
        let sock = socket2::SockRef::from(&outbox.conn.stream);
        loop {
            match sock.send_with_flags(&filler, libc::MSG_DONTWAIT) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return filled,
                Err(e) => panic!("filling the socket: {e}"),
            }
        }
    }

    /// The session's part: write on whenever the socket drains.
    fn resume_while_stalled(outbox: &Outbox) -> tokio::task::JoinHandle<()> {
        let stalled = outbox.clone();
        tokio::spawn(async move {
            while stalled.is_stalled() {
                stalled.conn.stream.writable().await.unwrap();
                stalled.resume();
            }
        })
    }

    /// A socket that is full (or takes part of the frame) leaves the rest
    /// queued: the connection stalls, and once the client reads it gets the
    /// frame whole, once, after what was on the wire before.
    #[tokio::test]
    async fn a_full_socket_gets_the_rest_of_the_frame_once_its_client_reads() {
        a_full_socket_gets_the_rest_once_it_drains(|frame, outboxes| {
            let mut sends = Sends::new(frame);
            for ob in outboxes {
                sends.send(ob);
            }
        })
        .await;
    }

    /// `deliver` sends one 60 KB frame to two members, the first with a
    /// socket filled behind its outbox's back.
    async fn a_full_socket_gets_the_rest_once_it_drains(deliver: impl FnOnce(&Bytes, &[Outbox])) {
        let _rings = RINGS.lock().await;
        ring_here();
        let (outboxes, mut clients) = members(2).await;
        let filled = fill(&outboxes[0]);
        let frame = Bytes::from(vec![b'm'; 60_000]);
        deliver(&frame, &outboxes);
        assert!(outboxes[0].is_stalled(), "the full socket stalls");
        assert!(!outboxes[1].is_stalled(), "the other member got it whole");

        let resuming = resume_while_stalled(&outboxes[0]);
        let got = read_exactly(&mut clients[0], filled + 4 + frame.len()).await;
        assert!(got[..filled].iter().all(|&b| b == b'.'));
        assert_eq!(&got[filled..filled + 4], &[0x81, 126, 0xea, 0x60]);
        assert!(got[filled + 4..].iter().all(|&b| b == b'm'));
        resuming.await.unwrap();
        nothing_more(&mut clients[0]).await;
        let other = read_exactly(&mut clients[1], 4 + frame.len()).await;
        assert_eq!(&other[..4], &[0x81, 126, 0xea, 0x60]);
    }

    #[cfg(all(target_os = "linux", not(herald_no_io_uring)))]
    /// A run that fails once the kernel has its sends (the worst case: the
    /// kernel may still read the buffer) must never give that buffer back
    /// for reuse, must not reuse the ring, and turns io_uring off on every
    /// thread; the run's members are told to reconnect.
    async fn a_failed_run_sets_its_buffer_aside(deliver: impl FnOnce(&[Outbox])) {
        let _rings = RINGS.lock().await;
        if !ring_here() {
            return;
        }
        // Another thread that made its ring before the failure.
        let (made, check) = (std::sync::mpsc::channel(), std::sync::mpsc::channel());
        let (made_tx, check_rx) = (made.0, check.1);
        let other = std::thread::spawn(move || {
            Ring::take().expect("a ring on the other thread").put_back();
            made_tx.send(()).unwrap();
            check_rx.recv().unwrap();
            Ring::take().is_some()
        });
        made.1.recv().unwrap();

        let (outboxes, _clients) = members(3).await;
        // This thread's run buffer, at an address the test knows.
        WIRE.with(|w| *w.borrow_mut() = Vec::with_capacity(64 * 1024));
        let buffer = WIRE.with(|w| w.borrow().as_ptr() as usize);
        uring::inject::fail_next_run();
        deliver(&outboxes);

        assert_eq!(
            uring::inject::leaked_buffers(),
            [buffer],
            "the failed run's buffer is set aside"
        );
        let kept = WIRE.with(|w| (w.borrow().capacity(), w.borrow().as_ptr() as usize));
        assert!(
            kept.0 == 0 || kept.1 != buffer,
            "the failed run's buffer was handed back for the next run"
        );
        for ob in &outboxes {
            assert_eq!(
                ob.close_reason().map(|r| r.code),
                Some(herald_wire::CloseCode::Internal),
                "a member of the failed run is told to reconnect"
            );
        }
        assert!(Ring::take().is_none(), "this thread's ring is not reused");
        check.0.send(()).unwrap();
        assert!(
            !other.join().unwrap(),
            "io_uring is off on the other thread too"
        );
        ring_here();
    }

    #[cfg(all(target_os = "linux", not(herald_no_io_uring)))]
    #[tokio::test]
    async fn a_fan_out_whose_submission_fails_never_reuses_its_buffer() {
        a_failed_run_sets_its_buffer_aside(|outboxes| {
            fan_out(&Bytes::from_static(b"lost?"), outboxes, true);
        })
        .await;
    }

    #[cfg(all(target_os = "linux", not(herald_no_io_uring)))]
    #[tokio::test]
    async fn a_batch_end_whose_submission_fails_never_reuses_its_buffer() {
        a_failed_run_sets_its_buffer_aside(|outboxes| {
            crate::delivery::batch(|| {
                for ob in outboxes {
                    ob.deliver(&Bytes::from_static(b"lost?"));
                }
            });
        })
        .await;
    }
}
