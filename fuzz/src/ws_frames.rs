//! `ws_frames`: the edge's WebSocket frame reader (`services/edge/src/framing.rs`)
//! on any bytes from a client, fed whole and in pieces.
//!
//! An input is a small header, then the client's bytes:
//!
//! | byte | meaning |
//! | --- | --- |
//! | 0 | bits 0-2: how many cuts follow (0-7); bit 3: the first piece is what the HTTP server read past the upgrade request; bit 4: also feed the bytes one at a time |
//! | 1 | the largest message accepted: (byte + 1) × 32 bytes |
//! | 2.. | the cuts, 2 bytes each (big-endian positions in the client's bytes) |
//! | rest | the client's bytes, at most [`MAX_BYTES`] of them |
//!
//! Checked, beyond "no panic":
//! - the reader hands out and sends back the same (messages, pongs, the
//!   echo of a close, what it still holds) however the bytes are cut;
//! - text messages are UTF-8, and no message is over the limit;
//! - a close or a violation is the last thing handed out, and nothing is
//!   held after it;
//! - a violation has a code RFC 6455 names for it and a reason that fits a
//!   close frame;
//! - what is sent back is whole server frames: pongs, then at most one
//!   close, sent exactly when the client's close was accepted;
//! - no buffer is kept allocated while nothing is held.

use herald_edge::fuzzing::{Decoded, Harness, Incoming};
use herald_wire::CloseCode;

/// Client bytes beyond this are ignored: longer inputs only slow the fuzzer.
pub const MAX_BYTES: usize = 64 * 1024;

/// Bytes fed one at a time at most, when the input asks for it.
const MAX_BYTEWISE: usize = 4096;

pub struct Target {
    harness: Harness,
}

/// An input split into its parts (see the module docs).
pub struct Input<'a> {
    pub max_message: usize,
    pub cuts: Vec<usize>,
    pub first_already_read: bool,
    pub bytewise: bool,
    pub bytes: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn read(data: &'a [u8]) -> Option<Input<'a>> {
        let (&flags, rest) = data.split_first()?;
        let (&max, rest) = rest.split_first()?;
        let n = usize::from(flags & 7);
        if rest.len() < 2 * n {
            return None;
        }
        let (cuts, bytes) = rest.split_at(2 * n);
        Some(Input {
            max_message: (usize::from(max) + 1) * 32,
            cuts: cuts
                .chunks(2)
                .map(|c| usize::from(u16::from_be_bytes([c[0], c[1]])))
                .collect(),
            first_already_read: flags & 8 != 0,
            bytewise: flags & 16 != 0,
            bytes: &bytes[..bytes.len().min(MAX_BYTES)],
        })
    }

    /// The input as [`Input::read`] reads it.
    pub fn write(&self) -> Vec<u8> {
        assert!(
            self.cuts.len() <= 7
                && self.max_message.is_multiple_of(32)
                && self.max_message <= 256 * 32
        );
        let mut flags = self.cuts.len() as u8;
        if self.first_already_read {
            flags |= 8;
        }
        if self.bytewise {
            flags |= 16;
        }
        let mut out = vec![flags, (self.max_message / 32 - 1) as u8];
        for cut in &self.cuts {
            out.extend_from_slice(&(*cut as u16).to_be_bytes());
        }
        out.extend_from_slice(self.bytes);
        out
    }
}

impl Default for Target {
    fn default() -> Target {
        Target::new()
    }
}

impl Target {
    pub fn new() -> Target {
        Target {
            harness: Harness::new(),
        }
    }

    /// Checks one input; returns what the reader made of it, fed whole
    /// (`None` for an input too short to hold its header).
    pub fn check(&self, data: &[u8]) -> Option<Decoded> {
        let input = Input::read(data)?;
        let max = input.max_message;
        let whole = self.harness.decode(max, input.bytes, &[], false);
        check_decoded(&whole, max);
        let split = self
            .harness
            .decode(max, input.bytes, &input.cuts, input.first_already_read);
        assert_eq!(
            whole, split,
            "fed whole, then cut at {:?} (first piece already read: {})",
            input.cuts, input.first_already_read
        );
        if input.bytewise && input.bytes.len() <= MAX_BYTEWISE {
            let every: Vec<usize> = (1..input.bytes.len()).collect();
            let bytewise = self.harness.decode(max, input.bytes, &every, false);
            assert_eq!(whole, bytewise, "fed whole, then one byte at a time");
        }
        Some(whole)
    }
}

fn check_decoded(d: &Decoded, max_message: usize) {
    assert!(!d.idle_buffer, "a buffer is kept while nothing is held");
    let last = d.incoming.len().saturating_sub(1);
    for (i, incoming) in d.incoming.iter().enumerate() {
        match incoming {
            Incoming::Text(text) => {
                assert!(std::str::from_utf8(text).is_ok(), "text that is not UTF-8");
                assert!(text.len() <= max_message, "{} bytes of text", text.len());
            }
            Incoming::Binary(data) => {
                assert!(data.len() <= max_message, "{} bytes of binary", data.len());
            }
            Incoming::Closed | Incoming::Violation(..) => {
                assert_eq!(i, last, "{incoming:?} is not the last: {:?}", d.incoming);
                assert_eq!(d.held, 0, "{} bytes held after {incoming:?}", d.held);
            }
        }
        if let Incoming::Violation(code, reason) = incoming {
            assert!(
                matches!(
                    code,
                    CloseCode::ProtocolError | CloseCode::InvalidData | CloseCode::TooBig
                ),
                "{code:?}"
            );
            assert!(!reason.is_empty(), "a violation without a reason");
            assert!(reason.len() <= 123, "a reason too long for a close frame");
        }
    }
    let closed = matches!(d.incoming.last(), Some(Incoming::Closed));
    let frames = server_frames(&d.sent);
    for (i, (opcode, payload)) in frames.iter().enumerate() {
        match opcode {
            0xA => assert!(payload.len() <= 125, "a pong of {} bytes", payload.len()),
            0x8 => {
                assert_eq!(i + 1, frames.len(), "frames sent after a close");
                assert!(
                    payload.is_empty() || payload.len() == 2,
                    "a close echo of {} bytes",
                    payload.len()
                );
            }
            other => panic!("the reader sent a frame with opcode {other:#x}"),
        }
    }
    let close_sent = matches!(frames.last(), Some((0x8, _)));
    assert_eq!(
        closed, close_sent,
        "closed: {closed}, a close sent: {close_sent}"
    );
}

/// The server frames in `sent`: final, unmasked, whole.
fn server_frames(sent: &[u8]) -> Vec<(u8, &[u8])> {
    let mut frames = Vec::new();
    let mut rest = sent;
    while !rest.is_empty() {
        assert!(rest.len() >= 2, "a cut server frame: {rest:?}");
        let (b0, b1) = (rest[0], rest[1]);
        assert_eq!(
            b0 & 0xf0,
            0x80,
            "a server frame not final, or with RSV bits"
        );
        assert_eq!(b1 & 0x80, 0, "a masked server frame");
        let len = usize::from(b1 & 0x7f);
        assert!(len < 126, "a control frame with an extended length");
        assert!(rest.len() >= 2 + len, "a cut server frame");
        frames.push((b0 & 0x0f, &rest[2..2 + len]));
        rest = &rest[2 + len..];
    }
    frames
}
