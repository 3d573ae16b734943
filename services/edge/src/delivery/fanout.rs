//! One room message to many members: the frame is encoded once and handed to
//! the kernel for a whole run of members in one io_uring submission, instead
//! of one `send(2)` per member.
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
use std::os::fd::AsRawFd as _;
use std::sync::MutexGuard;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use io_uring::{IoUring, opcode, types};
use smallvec::SmallVec;

use super::{Claim, OP_TEXT, Outbox, Queue, encode_frame};

/// Members sent to by one submission. Their queues stay locked until it
/// returns (about a millisecond for 128 sends here), so that nothing else is
/// written to those sockets in between.
const RUN: usize = 128;

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
        let mut q = match outbox.claim(self.frame) {
            Claim::Done(_) => return,
            Claim::Now(q) => q,
        };
        let Some(ring) = &mut self.ring else {
            outbox.offer_encoded(&mut q, |_, buf| encode_frame(buf, OP_TEXT, self.frame));
            return;
        };
        if self.wire.is_empty() {
            encode_frame(&mut self.wire, OP_TEXT, self.frame);
        }
        let fd = types::Fd(outbox.conn.stream.as_raw_fd());
        let entry = opcode::Send::new(fd, self.wire.as_ptr(), self.wire.len() as u32)
            // Never parked in the kernel: a full socket answers EAGAIN
            // at once, and the member goes on through `offer`.
            .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            .build()
            .user_data(self.run.len() as u64);
        // SAFETY: the send reads `wire`, which is neither changed nor
        // dropped until `flush` has reaped this send's completion.
        #[allow(unsafe_code)]
        let pushed = unsafe { ring.submission().push(&entry) };
        if pushed.is_err() {
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
        let mut sent = [i32::MIN; RUN];
        let mut reaped = 0;
        let ring = self
            .ring
            .as_mut()
            .expect("a run is only filled with a ring");
        while reaped < self.run.len() {
            match ring.submit_and_wait(self.run.len() - reaped) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.abandon(&e);
                    return;
                }
            }
            for cqe in ring.completion() {
                if let Some(slot) = sent.get_mut(cqe.user_data() as usize) {
                    *slot = cqe.result();
                    reaped += 1;
                }
            }
        }
        let whole = self.wire.len() as i32;
        for (i, (mut q, outbox)) in self.run.drain(..).enumerate() {
            match sent[i] {
                n if n == whole => {}
                // Taken in part: the rest the plain way, which stalls the
                // connection if the socket is full.
                n if n > 0 => {
                    outbox.offer(&mut q, &self.wire[n as usize..]);
                }
                // Nothing taken (a full socket, or an error that the plain
                // write meets again and marks the connection broken with).
                _ => {
                    outbox.offer(&mut q, &self.wire);
                }
            }
        }
    }

    /// The ring failed in a way it should not: whether the run's frames
    /// went out is unknown, so their connections are closed (a client that
    /// reconnects recovers from its last position) and io_uring is off.
    fn abandon(&mut self, e: &io::Error) {
        tracing::error!(error = %e, members = self.run.len(), "io_uring submission failed; closing the connections it may have left half-sent and turning io_uring off");
        ENABLED.store(false, Ordering::Relaxed);
        self.ring = None;
        for (q, outbox) in self.run.drain(..) {
            drop(q);
            outbox.close(
                herald_wire::CloseCode::Internal,
                "a delivery to this connection may have been cut short; reconnect to resume",
            );
        }
    }
}

impl Drop for Sends<'_> {
    fn drop(&mut self) {
        self.flush();
        if let Some(ring) = self.ring.take() {
            RING.with(|r| *r.borrow_mut() = Some(ring));
        }
        let mut wire = std::mem::take(&mut self.wire);
        if wire.capacity() <= 64 * 1024 {
            wire.clear();
            WIRE.with(|w| *w.borrow_mut() = wire);
        }
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

    /// A socket that is full (or takes part of the frame) leaves the rest
    /// queued: the connection stalls, and once the client reads it gets the
    /// frame whole, once, after what was on the wire before.
    #[tokio::test]
    async fn a_full_socket_gets_the_rest_of_the_frame_once_its_client_reads() {
        enable(true).expect("io_uring is not available on this machine");
        let (outboxes, mut clients) = members(2).await;
        // Fill the first member's socket behind the outbox's back.
        let filler = vec![b'.'; 16 * 1024];
        let mut filled = 0;
        let sock = socket2::SockRef::from(&outboxes[0].conn.stream);
        loop {
            match sock.send_with_flags(&filler, libc::MSG_DONTWAIT) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling the socket: {e}"),
            }
        }
        let frame = Bytes::from(vec![b'm'; 60_000]);
        fan_out(&frame, &outboxes, true);
        assert!(outboxes[0].is_stalled(), "the full socket stalls");
        assert!(!outboxes[1].is_stalled(), "the other member got it whole");

        // The session's part: write on whenever the socket drains.
        let stalled = outboxes[0].clone();
        let resuming = tokio::spawn(async move {
            while stalled.is_stalled() {
                stalled.conn.stream.writable().await.unwrap();
                stalled.resume();
            }
        });
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
