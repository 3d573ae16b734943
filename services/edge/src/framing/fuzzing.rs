//! The frame reader driven from outside the crate, for the fuzz target
//! `ws_frames` (`fuzz/`, `docs/fuzzing.md`): bytes from a client, fed to a
//! new [`Reader`] in pieces, and everything the reader made of them. Built
//! only with the `fuzzing` feature; the edge itself never uses it.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;

use super::Reader;
use crate::delivery::{Outbox, QueueLimits};

pub use super::Incoming;

/// What a reader made of some bytes.
#[derive(Debug, PartialEq)]
pub struct Decoded {
    /// What it handed out, in order.
    pub incoming: Vec<Incoming>,
    /// What it wrote back to the client: pongs, the echo of a close.
    pub sent: Vec<u8>,
    /// Bytes of a frame not yet whole, held for the next read.
    pub held: usize,
    /// A buffer allocated while it holds nothing (an idle connection must
    /// cost nothing: see the module docs of `framing`).
    pub idle_buffer: bool,
}

/// Drives readers; holds the runtime their sockets are registered with.
pub struct Harness {
    runtime: tokio::runtime::Runtime,
}

impl Default for Harness {
    fn default() -> Harness {
        Harness::new()
    }
}

impl Harness {
    pub fn new() -> Harness {
        Harness {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .expect("a current-thread runtime"),
        }
    }

    /// Feeds `bytes` to a new reader taking messages of at most
    /// `max_message` bytes, in pieces cut at `cuts` (positions in `bytes`,
    /// any order; those past the end are taken modulo its length + 1).
    /// With `first_already_read`, the first piece is what the HTTP server
    /// read past the upgrade request ([`Reader::new`]).
    pub fn decode(
        &self,
        max_message: usize,
        bytes: &[u8],
        cuts: &[usize],
        first_already_read: bool,
    ) -> Decoded {
        let _in = self.runtime.enter();
        let (server, mut client) = UnixStream::pair().expect("a socket pair");
        server.set_nonblocking(true).expect("non-blocking");
        client.set_nonblocking(true).expect("non-blocking");
        let server = tokio::net::UnixStream::from_std(server).expect("registered");
        // Room for every pong the bytes may ask for: nothing is dropped as
        // a slow consumer, so what is sent depends on the bytes alone.
        let outbox = Outbox::new(
            1,
            server,
            QueueLimits {
                frames: usize::MAX,
                bytes: usize::MAX,
            },
        );

        let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        at.push(0);
        at.push(bytes.len());
        at.sort_unstable();
        at.dedup();
        let mut pieces = at.windows(2).map(|w| &bytes[w[0]..w[1]]);
        let mut reader = match pieces.next() {
            Some(first) if first_already_read => Reader::new(max_message, first, &outbox),
            Some(first) => {
                let mut reader = Reader::new(max_message, &[], &outbox);
                reader.take_in(&mut first.to_vec(), &outbox);
                reader
            }
            None => Reader::new(max_message, &[], &outbox),
        };
        for piece in pieces {
            // As `Reader::next`: nothing is read once the reader is done.
            if reader.done {
                break;
            }
            reader.take_in(&mut piece.to_vec(), &outbox);
        }

        let mut incoming = Vec::new();
        while let Some(one) = reader.take_ready() {
            incoming.push(one);
        }
        let sent = drain(&mut client, &outbox);
        Decoded {
            incoming,
            sent,
            held: reader.partial.len(),
            idle_buffer: reader.partial.is_empty() && reader.partial.capacity() > 0,
        }
    }
}

/// Everything the outbox wrote, and still holds, for the client.
fn drain(client: &mut UnixStream, outbox: &Outbox) -> Vec<u8> {
    let mut sent = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let mut eof = false;
        loop {
            match client.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => sent.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("reading what the edge sent: {e}"),
            }
        }
        if eof || outbox.queued() == (0, 0) {
            return sent;
        }
        // The socket was full: what waits goes out now that it was read.
        outbox.resume();
    }
}
