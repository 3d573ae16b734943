//! One room message to many members: the frame is encoded once and handed to
//! the kernel for a whole run of members in one io_uring submission, instead
//! of one `send(2)` per member. The end of a batch (several messages taken
//! off the broker at once, coalesced into one write per connection) hands
//! its writes to the kernel the same way, in [`write_all`].
//!
//! Each member still gets its own write (the kernel's cost per write is the
//! floor of a delivery), but the run shares one entry into the kernel and one
//! return from it: on this class of machine that took about a quarter off
//! the cost of each write. The sends are non-blocking and complete inside
//! the submission; a member whose socket takes less than the whole frame goes
//! on through [`Outbox::offer`] like any short write. Where io_uring is not
//! available (an old kernel, a seccomp profile that forbids it), or turned
//! off with `--io-uring=false`, each member gets a plain `send(2)`.

use std::cell::RefCell;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd as _;
use std::sync::MutexGuard;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use io_uring::{IoUring, opcode, types};
use smallvec::SmallVec;

use super::{Claim, OP_TEXT, Outbox, Queue, encode_frame, encode_queued};

/// Members sent to by one submission. Their queues stay locked until it
/// returns (about a millisecond for 128 sends here), so that nothing else is
/// written to those sockets in between. A run never waits for a queue that
/// another thread holds (see [`lock_next`]).
const RUN: usize = 128;

/// The most bytes a run of batch-end writes encodes before it is submitted
/// (each connection's write is at most 64 KiB, the run up to [`RUN`] of them).
const RUN_BYTES: usize = 1024 * 1024;

/// Whether fan-outs use io_uring: set once at start-up by [`enable`].
static ENABLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Each worker thread's ring, made on its first fan-out; `None` inside
    /// a fan-out (which takes it) or where it could not be made.
    static RING: RefCell<Option<IoUring>> = RefCell::new(make_ring());
    /// Each worker thread's buffer for the encoded frame.
    static WIRE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn make_ring() -> Option<IoUring> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    match IoUring::new(RUN as u32) {
        Ok(ring) => Some(ring),
        Err(e) => {
            tracing::warn!(error = %e, "io_uring ring could not be made for this thread; its fan-outs use one send(2) per member");
            None
        }
    }
}

/// Turns io_uring fan-outs on (if this kernel lets the process make a
/// ring) or off; returns whether they are on, or why not.
pub fn enable(on: bool) -> Result<bool, io::Error> {
    if !on {
        ENABLED.store(false, Ordering::Relaxed);
        return Ok(false);
    }
    IoUring::new(RUN as u32)?;
    ENABLED.store(true, Ordering::Relaxed);
    Ok(true)
}

/// The members of one fan-out that can be written to now, in runs of
/// [`RUN`]. Hand each member to [`Sends::send`]; the last run goes out when
/// the `Sends` is dropped.
pub struct Sends<'a> {
    frame: &'a Bytes,
    ring: Option<IoUring>,
    /// `frame` as a WebSocket frame, encoded on the first send; unchanged
    /// until every send that points into it has completed.
    wire: Vec<u8>,
    /// The members of the run being filled, their queues locked.
    run: SmallVec<[(MutexGuard<'a, Queue>, &'a Outbox); RUN]>,
}

impl<'a> Sends<'a> {
    pub fn new(frame: &'a Bytes) -> Sends<'a> {
        Sends {
            frame,
            ring: RING.with(|r| r.borrow_mut().take()),
            wire: WIRE.with(|w| std::mem::take(&mut *w.borrow_mut())),
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
        let Some(ring) = &mut self.ring else {
            outbox.write_now(&mut q, self.frame);
            return;
        };
        if self.wire.is_empty() {
            encode_frame(&mut self.wire, OP_TEXT, self.frame);
        }
        // SAFETY: `wire` is neither changed nor dropped until `flush` has
        // reaped this send's completion.
        #[allow(unsafe_code)]
        let pushed = unsafe { push_send(ring, outbox, &self.wire, self.run.len()) };
        if !pushed {
            // The ring's queue is as long as a run, so this does not happen;
            // if it did, the plain write is still right.
            outbox.offer(&mut q, &self.wire);
            return;
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
        let ring = self
            .ring
            .as_mut()
            .expect("a run is only filled with a ring");
        match complete(ring, self.run.len()) {
            Ok(sent) => {
                for (i, (mut q, outbox)) in self.run.drain(..).enumerate() {
                    settle(outbox, &mut q, &self.wire, sent[i]);
                }
            }
            Err(e) => {
                self.ring = None;
                abandon(&e, self.run.drain(..));
            }
        }
    }
}

impl Drop for Sends<'_> {
    fn drop(&mut self) {
        self.flush();
        if let Some(ring) = self.ring.take() {
            RING.with(|r| *r.borrow_mut() = Some(ring));
        }
        keep_wire(std::mem::take(&mut self.wire));
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

/// Queues `bytes` to go to `outbox`'s socket as send `i` of a run; `false`
/// if the ring's queue is full.
///
/// # Safety
///
/// `bytes` must stay alive and unchanged until [`complete`] has reaped the
/// send: the kernel reads them while the submission runs.
#[allow(unsafe_code)]
unsafe fn push_send(ring: &mut IoUring, outbox: &Outbox, bytes: &[u8], i: usize) -> bool {
    let fd = types::Fd(outbox.conn.stream.as_raw_fd());
    let entry = opcode::Send::new(fd, bytes.as_ptr(), bytes.len() as u32)
        // Never parked in the kernel: a full socket answers EAGAIN at once,
        // and the member goes on through `offer`.
        .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        .build()
        .user_data(i as u64);
    // SAFETY: the caller keeps `bytes` as they are until the completion.
    unsafe { ring.submission().push(&entry) }.is_ok()
}

/// Submits the `n` sends pushed since the last call and waits for all of
/// them: what send `i` returned is at `[i]` (bytes taken, or `-errno`).
fn complete(ring: &mut IoUring, n: usize) -> io::Result<[i32; RUN]> {
    let mut sent = [i32::MIN; RUN];
    let mut reaped = 0;
    while reaped < n {
        match ring.submit_and_wait(n - reaped) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for cqe in ring.completion() {
            if let Some(slot) = sent.get_mut(cqe.user_data() as usize) {
                *slot = cqe.result();
                reaped += 1;
            }
        }
    }
    Ok(sent)
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
/// reconnects recovers from its last position) and io_uring is off.
fn abandon<'a>(
    e: &io::Error,
    run: impl ExactSizeIterator<Item = (MutexGuard<'a, Queue>, &'a Outbox)>,
) {
    tracing::error!(error = %e, members = run.len(), "io_uring submission failed; closing the connections it may have left half-sent and turning io_uring off");
    ENABLED.store(false, Ordering::Relaxed);
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
/// rest), and every connection where there is no ring, gets the plain write.
pub(super) fn write_all(dirty: &[Outbox]) {
    let Some(mut ring) = RING.with(|r| r.borrow_mut().take()) else {
        for outbox in dirty {
            let mut q = outbox.lock();
            q.batched = false;
            outbox.write(&mut q);
        }
        return;
    };
    let mut wire = WIRE.with(|w| std::mem::take(&mut *w.borrow_mut()));
    let mut next = 0;
    let mut run: SmallVec<[Write<'_>; RUN]> = SmallVec::new();
    let mut ring_ok = true;
    loop {
        wire.clear();
        while let Some(outbox) = dirty.get(next) {
            // A queue another thread holds: this run goes first.
            let Some(mut q) = lock_next(outbox, !run.is_empty()) else {
                break;
            };
            next += 1;
            q.batched = false;
            if !ring_ok || !q.head.is_empty() || q.broken || q.frames.is_empty() {
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
        // Every write of the run is encoded: `wire` does not move from here
        // until the sends are reaped.
        let mut pushed = 0;
        for (i, (_, outbox, range)) in run.iter().enumerate() {
            // SAFETY: `wire` is neither changed nor dropped before
            // `complete` below has reaped these sends.
            #[allow(unsafe_code)]
            let ok = unsafe { push_send(&mut ring, outbox, &wire[range.clone()], i) };
            if !ok {
                break;
            }
            pushed += 1;
        }
        match complete(&mut ring, pushed) {
            Ok(sent) => {
                for (i, (mut q, outbox, range)) in run.drain(..).enumerate() {
                    // A send never pushed is `i32::MIN`: all of it, plainly.
                    if settle(outbox, &mut q, &wire[range], sent[i]) {
                        // The frames past this write's 64 KiB, and the
                        // shutdown of a closing connection.
                        outbox.write(&mut q);
                    }
                }
            }
            Err(e) => {
                ring_ok = false;
                abandon(&e, run.drain(..).map(|(q, outbox, _)| (q, outbox)));
            }
        }
    }
    if ring_ok {
        RING.with(|r| *r.borrow_mut() = Some(ring));
    }
    keep_wire(wire);
}

/// Gives the encoding buffer back to this thread, unless it grew too big to
/// keep.
fn keep_wire(mut wire: Vec<u8>) {
    if wire.capacity() <= RUN_BYTES + 64 * 1024 {
        wire.clear();
        WIRE.with(|w| *w.borrow_mut() = wire);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    use super::*;
    use crate::transport::tests::pair;

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
        if ring {
            assert!(
                sends.ring.is_some(),
                "io_uring is not available on this machine"
            );
        } else {
            sends.ring = None;
        }
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
        enable(true).expect("io_uring is not available on this machine");
        // More members than one run holds.
        let (outboxes, mut clients) = members(RUN + 5).await;
        fan_out(&Bytes::from_static(b"first"), &outboxes, true);
        fan_out(&Bytes::from_static(b"second"), &outboxes, true);
        for client in &mut clients {
            let got = read_exactly(client, 7 + 8).await;
            assert_eq!(got, b"\x81\x05first\x81\x06second");
        }
        nothing_more(&mut clients[0]).await;
        nothing_more(&mut clients[RUN + 4]).await;
    }

    #[tokio::test]
    async fn without_a_ring_each_member_gets_a_plain_send() {
        let (outboxes, mut clients) = members(3).await;
        fan_out(&Bytes::from_static(b"hello"), &outboxes, false);
        for client in &mut clients {
            assert_eq!(read_exactly(client, 7).await, b"\x81\x05hello");
        }
        nothing_more(&mut clients[1]).await;
    }

    #[tokio::test]
    async fn a_batch_end_writes_each_members_frames_once_in_order_in_runs() {
        enable(true).expect("io_uring is not available on this machine");
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
        enable(true).expect("io_uring is not available on this machine");
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
            fan_out(frame, outboxes, true);
        })
        .await;
    }

    /// `deliver` sends one 60 KB frame to two members, the first with a
    /// socket filled behind its outbox's back.
    async fn a_full_socket_gets_the_rest_once_it_drains(deliver: impl FnOnce(&Bytes, &[Outbox])) {
        enable(true).expect("io_uring is not available on this machine");
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
}
