//! WebSocket framing (RFC 6455) of client connections once upgraded: the
//! decoding of what clients send and the encoding of what the edge sends.
//!
//! An idle connection must cost next to nothing (`docs/benchmarks.md`,
//! `idle`), so the reader holds no buffer while nothing arrives: it waits
//! for the socket to be readable, reads into a buffer on the stack, decodes
//! every whole frame there, and keeps only the bytes of a frame that arrived
//! in pieces, freeing them once the frame is whole. (fastwebsockets' reader
//! keeps an 8 KiB buffer per connection for life.) Server frames are written
//! unmasked straight into the caller's buffer.
//!
//! A client that breaks the protocol gets the close code RFC 6455 names for
//! it: 1002 for a malformed frame or sequence of frames, 1007 for text that
//! is not UTF-8 (checked fragment by fragment, so that a bad message fails
//! at its first bad fragment rather than once it is whole), 1009 for a
//! message over the size limit (refused from its header alone).

use std::collections::VecDeque;
use std::io;

use herald_wire::CloseCode;
use herald_wire::frames::disconnect_frame;

use crate::delivery::{Closing, Out, Outbox};
use crate::socket::Socket;

/// The reader driven from outside the crate, for the fuzz targets (`fuzz/`).
#[cfg(feature = "fuzzing")]
pub mod fuzzing;

/// Bytes read from the socket at a time, on the stack of the reading task.
const READ_CHUNK: usize = 16 * 1024;

const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// What the reader produced.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    Text(Vec<u8>),
    /// Herald's protocol refuses these; the echo server sends them back.
    Binary(Vec<u8>),
    /// The client closed, or the socket is gone.
    Closed,
    /// The client broke the WebSocket protocol or a size limit.
    Violation(CloseCode, String),
}

/// A message sent in several frames, being put together.
struct Fragments {
    text: bool,
    data: Vec<u8>,
    /// How much of a text message's `data` is known to be UTF-8; what
    /// follows is at most the start of a character that the end of a
    /// fragment cut.
    checked: usize,
}

/// Decodes a client's frames. Empty (nothing allocated) between frames.
pub struct Reader {
    max_message: usize,
    /// The start of a frame that has not fully arrived yet.
    partial: Vec<u8>,
    message: Option<Box<Fragments>>,
    /// Decoded and not yet handed out: one read may hold several frames.
    ready: VecDeque<Incoming>,
    /// A close or a violation was decoded: nothing after it counts.
    done: bool,
}

impl Reader {
    /// A reader for one connection; `already_read` is what the HTTP server
    /// read past the upgrade request.
    pub fn new(max_message: usize, already_read: &[u8], outbox: &Outbox) -> Reader {
        let mut reader = Reader {
            max_message,
            partial: Vec::new(),
            message: None,
            ready: VecDeque::new(),
            done: false,
        };
        if !already_read.is_empty() {
            reader.partial = already_read.to_vec();
            reader.decode_partial(outbox);
        }
        reader
    }

    /// A frame decoded earlier and not yet handed out.
    pub fn take_ready(&mut self) -> Option<Incoming> {
        let incoming = self.ready.pop_front();
        if self.ready.is_empty() && self.ready.capacity() > 0 {
            self.ready = VecDeque::new();
        }
        incoming
    }

    /// The next frame of interest. Pings are answered and pongs dropped on
    /// the way; a close is answered before `Closed` is returned. Cancel-safe:
    /// the only wait is for readability, and every byte read is kept in `self`.
    pub async fn next(&mut self, stream: &Socket, outbox: &Outbox) -> Incoming {
        loop {
            if let Some(incoming) = self.take_ready() {
                return incoming;
            }
            if self.done {
                return Incoming::Closed;
            }
            if stream.readable().await.is_err() {
                return Incoming::Closed;
            }
            self.read_once(stream, outbox);
        }
    }

    /// One non-blocking read into a stack buffer, decoded at once.
    pub fn read_once(&mut self, stream: &Socket, outbox: &Outbox) {
        let mut buf = [0u8; READ_CHUNK];
        match stream.try_read(&mut buf) {
            Ok(0) => self.finish(Incoming::Closed),
            Ok(n) => {
                outbox.heard_now();
                self.take_in(&mut buf[..n], outbox);
            }
            // Readiness was stale; the caller waits again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.finish(Incoming::Closed),
        }
    }

    /// Decodes freshly read bytes after whatever partial frame is held.
    fn take_in(&mut self, bytes: &mut [u8], outbox: &Outbox) {
        if self.partial.is_empty() {
            let used = self.decode(bytes, outbox);
            if used < bytes.len() && !self.done {
                self.partial = bytes[used..].to_vec();
            }
        } else {
            self.partial.extend_from_slice(bytes);
            self.decode_partial(outbox);
        }
    }

    fn decode_partial(&mut self, outbox: &Outbox) {
        let mut data = std::mem::take(&mut self.partial);
        let used = self.decode(&mut data, outbox);
        if used < data.len() && !self.done {
            data.drain(..used);
            self.partial = data;
        }
        // Otherwise `data` is dropped: a connection between frames holds nothing.
    }

    fn finish(&mut self, last: Incoming) {
        self.ready.push_back(last);
        self.done = true;
        self.partial = Vec::new();
        self.message = None;
    }

    fn violation(&mut self, code: CloseCode, why: impl Into<String>) {
        self.finish(Incoming::Violation(code, why.into()));
    }

    /// Decodes whole frames from the front of `buf` (unmasking in place);
    /// returns how many bytes they took.
    fn decode(&mut self, buf: &mut [u8], outbox: &Outbox) -> usize {
        let mut pos = 0;
        while !self.done {
            let rest = &mut buf[pos..];
            if rest.len() < 2 {
                break;
            }
            let (b0, b1) = (rest[0], rest[1]);
            let fin = b0 & 0x80 != 0;
            let opcode = b0 & 0x0f;
            if b0 & 0x70 != 0 {
                self.violation(
                    CloseCode::ProtocolError,
                    "reserved bits set: no extension was agreed",
                );
                break;
            }
            if b1 & 0x80 == 0 {
                self.violation(CloseCode::ProtocolError, "client frames must be masked");
                break;
            }
            let control = opcode >= 0x8;
            if !matches!(opcode, 0x0..=0x2 | 0x8..=0xA) {
                self.violation(
                    CloseCode::ProtocolError,
                    format!("reserved opcode {opcode:#x}"),
                );
                break;
            }
            // Known from the header: no need to wait for the payload.
            if let Some(why) = self.out_of_sequence(opcode) {
                self.violation(CloseCode::ProtocolError, why);
                break;
            }
            let (len, header) = match b1 & 0x7f {
                126 if rest.len() >= 4 => (u16::from_be_bytes([rest[2], rest[3]]) as u64, 4),
                127 if rest.len() >= 10 => {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&rest[2..10]);
                    (u64::from_be_bytes(n), 10)
                }
                126 | 127 => break,
                n => (n as u64, 2),
            };
            if control && (!fin || len > 125) {
                self.violation(
                    CloseCode::ProtocolError,
                    "control frames must be whole and at most 125 bytes",
                );
                break;
            }
            let so_far = self.message.as_ref().map_or(0, |m| m.data.len()) as u64;
            if !control && so_far.saturating_add(len) > self.max_message as u64 {
                self.violation(CloseCode::TooBig, "message larger than this server accepts");
                break;
            }
            let len = len as usize;
            let total = header + 4 + len;
            if rest.len() < total {
                break;
            }
            let mask = [
                rest[header],
                rest[header + 1],
                rest[header + 2],
                rest[header + 3],
            ];
            let payload = &mut rest[header + 4..total];
            fastwebsockets::unmask(payload, mask);
            self.frame(fin, opcode, payload, outbox);
            pos += total;
        }
        pos
    }

    /// Why a data frame with `opcode` cannot come now, if it cannot: a
    /// continuation needs a message to continue, and a new message must wait
    /// for the fragmented one to end.
    fn out_of_sequence(&self, opcode: u8) -> Option<&'static str> {
        match (opcode, self.message.is_some()) {
            (OP_CONTINUATION, false) => Some("continuation frame without a message to continue"),
            (OP_TEXT | OP_BINARY, true) => {
                Some("a new message began before the fragmented one ended")
            }
            _ => None,
        }
    }

    /// One whole frame, in sequence (see [`Reader::out_of_sequence`]).
    fn frame(&mut self, fin: bool, opcode: u8, payload: &[u8], outbox: &Outbox) {
        match opcode {
            OP_PING => {
                outbox.push(Out::Control {
                    opcode: OP_PONG,
                    payload: payload.to_vec(),
                });
            }
            OP_CLOSE => self.close(payload, outbox),
            OP_TEXT | OP_BINARY if fin => self.message_done(opcode == OP_TEXT, payload.to_vec()),
            OP_TEXT | OP_BINARY => {
                self.message = Some(Box::new(Fragments {
                    text: opcode == OP_TEXT,
                    data: Vec::new(),
                    checked: 0,
                }));
                self.fragment(payload, false);
            }
            OP_CONTINUATION => self.fragment(payload, fin),
            // Pongs answer pings the server never sends: nothing to do.
            _ => {}
        }
    }

    /// Adds a fragment to the message begun; a text message's new bytes are
    /// checked at once, so that invalid UTF-8 fails the connection now.
    fn fragment(&mut self, payload: &[u8], fin: bool) {
        let m = self.message.as_mut().expect("checked by out_of_sequence");
        m.data.extend_from_slice(payload);
        if m.text {
            match utf8_up_to(&m.data, m.checked, fin) {
                Some(valid) => m.checked = valid,
                None => {
                    self.violation(CloseCode::InvalidData, "text message is not valid UTF-8");
                    return;
                }
            }
        }
        if fin {
            let m = self.message.take().expect("present");
            self.ready.push_back(if m.text {
                Incoming::Text(m.data)
            } else {
                Incoming::Binary(m.data)
            });
        }
    }

    fn message_done(&mut self, text: bool, data: Vec<u8>) {
        if !text {
            self.ready.push_back(Incoming::Binary(data));
        } else if std::str::from_utf8(&data).is_err() {
            self.violation(CloseCode::InvalidData, "text message is not valid UTF-8");
        } else {
            self.ready.push_back(Incoming::Text(data));
        }
    }

    /// Answers a close with the same code (RFC 6455 §5.5.1) and ends reading.
    fn close(&mut self, payload: &[u8], outbox: &Outbox) {
        if payload.len() == 1 {
            self.violation(
                CloseCode::ProtocolError,
                "a close frame holds nothing, or a 2-byte code and a reason: not 1 byte",
            );
            return;
        }
        if let [hi, lo, reason @ ..] = payload {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !sendable_close_code(code) {
                self.violation(
                    CloseCode::ProtocolError,
                    format!("close code {code} may not be sent in a close frame"),
                );
                return;
            }
            if std::str::from_utf8(reason).is_err() {
                self.violation(
                    CloseCode::InvalidData,
                    "the close frame's reason is not valid UTF-8",
                );
                return;
            }
        }
        outbox.push(Out::Control {
            opcode: OP_CLOSE,
            payload: payload.get(..2).unwrap_or_default().to_vec(),
        });
        self.finish(Incoming::Closed);
    }
}

/// How far `data` is valid UTF-8, checking from `from` (valid before it);
/// `None` when it cannot become valid. Unless `whole`, a character cut at
/// the very end may still be completed by what follows.
fn utf8_up_to(data: &[u8], from: usize, whole: bool) -> Option<usize> {
    match std::str::from_utf8(&data[from..]) {
        Ok(_) => Some(data.len()),
        Err(e) if e.error_len().is_none() && !whole => Some(from + e.valid_up_to()),
        Err(_) => None,
    }
}

/// The codes a close frame may carry: those RFC 6455 defines for it
/// (1004–1006 and 1015 are reserved for reporting, never sent), those IANA
/// registered since (1012–1014), and the ranges of libraries and frameworks
/// (3000–3999) and of applications (4000–4999).
fn sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Appends one unmasked server frame to `buf`.
pub fn encode_frame(buf: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    buf.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        buf.push(len as u8);
    } else if len <= u16::MAX as usize {
        buf.push(126);
        buf.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        buf.push(127);
        buf.extend_from_slice(&(len as u64).to_be_bytes());
    }
    buf.extend_from_slice(payload);
}

/// Appends a close of the server's: the `disconnect` frame (unless the code
/// is one a client is not told of that way, see `CloseCode::announced`),
/// then the close frame.
pub fn encode_close(buf: &mut Vec<u8>, close: &Closing) {
    let (code, reason) = (close.code, close.reason.as_str());
    if code.announced() {
        encode_frame(
            buf,
            OP_TEXT,
            &disconnect_frame(
                code,
                reason,
                close.reconnect,
                close.reconnect_after_ms.map(u64::from),
            ),
        );
    }
    // A close frame's reason may hold at most 123 bytes.
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = code.code().to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode_frame(buf, OP_CLOSE, &payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tests::pair;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    #[test]
    fn frames_get_the_rfc6455_length_forms() {
        let mut b = Vec::new();
        encode_frame(&mut b, OP_TEXT, b"hi");
        assert_eq!(b, [0x81, 2, b'h', b'i']);
        let mut b = Vec::new();
        encode_frame(&mut b, OP_TEXT, &[0; 300]);
        assert_eq!(&b[..4], &[0x81, 126, 1, 44]);
        let mut b = Vec::new();
        encode_frame(&mut b, OP_TEXT, &vec![0; 70_000]);
        assert_eq!(&b[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    /// A client frame: masked, as RFC 6455 requires.
    fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut plain = Vec::new();
        encode_frame(&mut plain, opcode, payload);
        let header = plain.len() - payload.len();
        let mut out = plain[..header].to_vec();
        if !fin {
            out[0] &= 0x7f;
        }
        out[1] |= 0x80;
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn drain(reader: &mut Reader) -> Vec<Incoming> {
        reader.ready.drain(..).collect()
    }

    async fn reader() -> (Reader, Outbox, TcpStream) {
        let (server, client) = pair().await;
        let outbox = Outbox::new(1, server, 16);
        (Reader::new(1000, &[], &outbox), outbox, client)
    }

    #[tokio::test]
    async fn frames_split_anywhere_decode_the_same_and_leave_nothing_held() {
        let mut bytes = masked(true, OP_TEXT, &[b'a'; 300]);
        bytes.extend(masked(true, OP_TEXT, br#"{"op":"ping"}"#));
        let whole = {
            let (mut r, ob, _c) = reader().await;
            r.take_in(&mut bytes.clone(), &ob);
            drain(&mut r)
        };
        assert_eq!(whole.len(), 2);
        for cut in 1..bytes.len() {
            let (mut r, ob, _c) = reader().await;
            r.take_in(&mut bytes[..cut].to_vec(), &ob);
            r.take_in(&mut bytes[cut..].to_vec(), &ob);
            assert_eq!(drain(&mut r), whole, "split at {cut}");
            assert_eq!(r.partial.capacity(), 0, "buffer kept after split at {cut}");
        }
    }

    #[tokio::test]
    async fn fragments_join_around_a_ping_which_is_answered() {
        let (mut r, ob, mut client) = reader().await;
        let mut bytes = masked(false, OP_TEXT, b"hel");
        bytes.extend(masked(true, OP_PING, b"p"));
        bytes.extend(masked(true, OP_CONTINUATION, b"lo"));
        r.take_in(&mut bytes, &ob);
        assert_eq!(drain(&mut r), [Incoming::Text(b"hello".to_vec())]);
        let mut pong = [0u8; 3];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong, [0x80 | OP_PONG, 1, b'p']);
    }

    /// Client frames with their header bits changed: `or` into the first byte.
    fn with_bits(mut frame: Vec<u8>, or: u8) -> Vec<u8> {
        frame[0] |= or;
        frame
    }

    fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason);
        p
    }

    /// Every violation of RFC 6455 gets its code, named in plain words.
    #[tokio::test]
    async fn each_violation_gets_its_rfc6455_close_code() {
        use CloseCode::{InvalidData, ProtocolError, TooBig};
        let cases: Vec<(&str, Vec<u8>, CloseCode, &str)> = vec![
            (
                "unmasked",
                {
                    let mut f = masked(true, OP_TEXT, b"x");
                    f[1] &= 0x7f;
                    f
                },
                ProtocolError,
                "masked",
            ),
            (
                "RSV1",
                with_bits(masked(true, OP_TEXT, b"x"), 0x40),
                ProtocolError,
                "reserved bits",
            ),
            (
                "RSV3 on a ping",
                with_bits(masked(true, OP_PING, b""), 0x10),
                ProtocolError,
                "reserved bits",
            ),
            (
                "data opcode 3",
                masked(true, 0x3, b"x"),
                ProtocolError,
                "opcode",
            ),
            (
                "control opcode 0xB",
                masked(true, 0xB, b""),
                ProtocolError,
                "opcode",
            ),
            (
                "fragmented ping",
                masked(false, OP_PING, b"x"),
                ProtocolError,
                "control",
            ),
            (
                "126-byte ping",
                masked(true, OP_PING, &[0; 126]),
                ProtocolError,
                "control",
            ),
            (
                "continuation first",
                masked(true, OP_CONTINUATION, b"x"),
                ProtocolError,
                "continuation",
            ),
            (
                "a message inside a message",
                [masked(false, OP_TEXT, b"a"), masked(true, OP_TEXT, b"b")].concat(),
                ProtocolError,
                "new message",
            ),
            (
                "1-byte close",
                masked(true, OP_CLOSE, &[0x03]),
                ProtocolError,
                "1 byte",
            ),
            (
                "close code 999",
                masked(true, OP_CLOSE, &close_payload(999, b"")),
                ProtocolError,
                "999",
            ),
            (
                "close code 1005",
                masked(true, OP_CLOSE, &close_payload(1005, b"")),
                ProtocolError,
                "1005",
            ),
            (
                "close code 1015",
                masked(true, OP_CLOSE, &close_payload(1015, b"")),
                ProtocolError,
                "1015",
            ),
            (
                "close code 2999",
                masked(true, OP_CLOSE, &close_payload(2999, b"")),
                ProtocolError,
                "2999",
            ),
            (
                "close code 5000",
                masked(true, OP_CLOSE, &close_payload(5000, b"")),
                ProtocolError,
                "5000",
            ),
            (
                "close reason not UTF-8",
                masked(true, OP_CLOSE, &close_payload(1000, &[0xce, 0xba, 0xff])),
                InvalidData,
                "reason",
            ),
            (
                "text not UTF-8",
                masked(true, OP_TEXT, &[0xff, 0xfe]),
                InvalidData,
                "UTF-8",
            ),
            (
                "text ending inside a character",
                masked(true, OP_TEXT, &[b'a', 0xce]),
                InvalidData,
                "UTF-8",
            ),
            (
                "fragmented text ending inside a character",
                [
                    masked(false, OP_TEXT, b"a"),
                    masked(true, OP_CONTINUATION, &[0xce]),
                ]
                .concat(),
                InvalidData,
                "UTF-8",
            ),
            // A 64-bit length at its largest: refused, no overflow.
            (
                "2^64-1 bytes",
                vec![0x81, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                TooBig,
                "larger",
            ),
            // Refused from the header alone, before the payload arrives.
            (
                "2000 bytes",
                masked(true, OP_TEXT, &[b'a'; 2000])[..8].to_vec(),
                TooBig,
                "larger",
            ),
            (
                "600 + 600 bytes in fragments",
                [
                    masked(false, OP_BINARY, &[0; 600]),
                    masked(true, OP_CONTINUATION, &[0; 600])[..8].to_vec(),
                ]
                .concat(),
                TooBig,
                "larger",
            ),
        ];
        for (name, mut bytes, code, why) in cases {
            let (mut r, ob, _c) = reader().await;
            r.take_in(&mut bytes, &ob);
            match drain(&mut r).as_slice() {
                [Incoming::Violation(c, reason)] => {
                    assert_eq!(*c, code, "{name}");
                    assert!(reason.contains(why), "{name}: {reason}");
                    assert!(reason.len() <= 123, "{name}: fits a close frame");
                }
                other => panic!("{name}: {other:?}"),
            }
            assert!(r.done, "{name}: nothing is read after a violation");
        }
    }

    /// Invalid UTF-8 fails the message at the fragment that makes it
    /// invalid, not when the message ends; a character cut between two
    /// fragments is fine.
    #[tokio::test]
    async fn utf8_is_checked_fragment_by_fragment() {
        let (mut r, ob, _c) = reader().await;
        // "κό" with the ό (cf 8c) cut between the fragments.
        r.take_in(&mut masked(false, OP_TEXT, &[0xce, 0xba, 0xcf]), &ob);
        r.take_in(&mut masked(false, OP_CONTINUATION, &[0x8c]), &ob);
        r.take_in(&mut masked(true, OP_CONTINUATION, b"!"), &ob);
        assert_eq!(drain(&mut r), [Incoming::Text("κό!".as_bytes().to_vec())]);

        let (mut r, ob, _c) = reader().await;
        r.take_in(&mut masked(false, OP_TEXT, b"ok so far "), &ob);
        assert!(drain(&mut r).is_empty());
        // U+110000, beyond Unicode: invalid from its second byte on.
        r.take_in(&mut masked(false, OP_CONTINUATION, &[0xf4, 0x90]), &ob);
        assert!(
            matches!(
                drain(&mut r).as_slice(),
                [Incoming::Violation(CloseCode::InvalidData, _)]
            ),
            "fails before the message's last fragment"
        );
    }

    /// Binary messages are handed out whole, fragmented or not, and every
    /// valid close code is answered.
    #[tokio::test]
    async fn binary_messages_and_valid_close_codes_pass() {
        let (mut r, ob, _c) = reader().await;
        let mut bytes = masked(true, OP_BINARY, &[0xff, 0]);
        bytes.extend(masked(false, OP_BINARY, &[1]));
        bytes.extend(masked(true, OP_CONTINUATION, &[2]));
        r.take_in(&mut bytes, &ob);
        assert_eq!(
            drain(&mut r),
            [
                Incoming::Binary(vec![0xff, 0]),
                Incoming::Binary(vec![1, 2])
            ]
        );
        for code in [1000, 1001, 1002, 1003, 1007, 1011, 1012, 1014, 3000, 4999] {
            let (mut r, ob, _c) = reader().await;
            r.take_in(
                &mut masked(true, OP_CLOSE, &close_payload(code, "κ".as_bytes())),
                &ob,
            );
            assert_eq!(drain(&mut r), [Incoming::Closed], "{code}");
        }
    }

    /// A violation closes with the close frame alone (no `disconnect`
    /// frame), whose reason says what was wrong.
    #[tokio::test]
    async fn a_protocol_failure_is_closed_with_the_close_frame_alone() {
        let (server, mut client) = pair().await;
        let ob = Outbox::new(1, server, 16);
        ob.push(Out::close(
            CloseCode::ProtocolError,
            "client frames must be masked",
        ));
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let mut expected = vec![0x80 | OP_CLOSE, 30, 0x03, 0xea];
        expected.extend_from_slice(b"client frames must be masked");
        assert_eq!(got, expected);
    }

    /// A frame's header arriving in separate TCP segments (the base header,
    /// the extended length, the mask key, each read on its own) is held
    /// until the frame is whole, for both extended lengths.
    #[tokio::test]
    async fn a_header_split_across_segments_is_put_back_together() {
        use tokio::io::AsyncWriteExt;
        for (len, ext) in [(300usize, 2usize), (70_000, 8)] {
            let (server, mut client) = pair().await;
            client.set_nodelay(true).unwrap();
            let ob = Outbox::new(1, server, 16);
            let mut r = Reader::new(100_000, &[], &ob);
            let frame = masked(true, OP_TEXT, &vec![b'a'; len]);
            let cuts = [0, 2, 2 + ext, 2 + ext + 4, frame.len()];
            for (i, piece) in cuts.windows(2).enumerate() {
                client.write_all(&frame[piece[0]..piece[1]]).await.unwrap();
                client.flush().await.unwrap();
                if piece[1] == frame.len() {
                    break;
                }
                // The reader takes this segment before the next is sent.
                while r.partial.len() < piece[1] {
                    ob.stream().readable().await.unwrap();
                    r.read_once(ob.stream(), &ob);
                }
                assert_eq!(r.partial.len(), piece[1], "{len}: segment {i}");
                assert!(
                    r.ready.is_empty(),
                    "{len}: nothing whole before segment {i}"
                );
            }
            assert_eq!(
                r.next(ob.stream(), &ob).await,
                Incoming::Text(vec![b'a'; len])
            );
            assert_eq!(r.partial.capacity(), 0, "{len}: nothing held after");
        }
    }

    #[tokio::test]
    async fn a_close_is_echoed_and_ends_reading() {
        let (mut r, ob, mut client) = reader().await;
        let mut bytes = masked(true, OP_CLOSE, &[0x03, 0xe8, b'b', b'y', b'e']);
        bytes.extend(masked(true, OP_TEXT, b"after"));
        r.take_in(&mut bytes, &ob);
        assert_eq!(drain(&mut r), [Incoming::Closed]);
        let mut echo = [0u8; 4];
        client.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, [0x80 | OP_CLOSE, 2, 0x03, 0xe8]);
    }

    #[tokio::test]
    async fn next_reads_from_the_socket_and_sees_the_end() {
        use tokio::io::AsyncWriteExt;
        let (mut r, ob, mut client) = reader().await;
        client
            .write_all(&masked(true, OP_TEXT, b"{}"))
            .await
            .unwrap();
        assert_eq!(
            r.next(ob.stream(), &ob).await,
            Incoming::Text(b"{}".to_vec())
        );
        drop(client);
        assert_eq!(r.next(ob.stream(), &ob).await, Incoming::Closed);
    }

    /// A relayed connection (one end of a socket pair) reads, answers pings
    /// and ends like a TCP one.
    #[tokio::test]
    async fn a_relayed_socket_reads_answers_and_ends_the_same() {
        use tokio::io::AsyncWriteExt;
        let (server, mut client) = tokio::net::UnixStream::pair().unwrap();
        let ob = Outbox::new(1, server, 16);
        let mut r = Reader::new(1000, &[], &ob);
        let mut bytes = masked(true, OP_PING, b"hb");
        bytes.extend(masked(true, OP_TEXT, b"{}"));
        client.write_all(&bytes).await.unwrap();
        assert_eq!(
            r.next(ob.stream(), &ob).await,
            Incoming::Text(b"{}".to_vec())
        );
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong, [0x8A, 2, b'h', b'b'], "the ping is answered");
        drop(client);
        assert_eq!(r.next(ob.stream(), &ob).await, Incoming::Closed);
    }

    /// Property tests: whatever a client sends, in whatever pieces, the
    /// reader neither panics nor depends on where reads split the bytes,
    /// and every well-formed message (fragmented, with pings between
    /// fragments) comes out whole.
    mod props {
        use super::*;
        use proptest::prelude::*;

        fn with_reader<T>(f: impl FnOnce(&mut Reader, &Outbox) -> T) -> T {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _in = rt.enter();
            let (server, _client) = tokio::net::UnixStream::pair().unwrap();
            let ob = Outbox::new(1, server, 1 << 16);
            let mut r = Reader::new(4096, &[], &ob);
            f(&mut r, &ob)
        }

        /// Feeds `bytes` in pieces cut at `cuts` (positions, any order).
        fn decode(bytes: &[u8], cuts: &[usize]) -> Vec<Incoming> {
            with_reader(|r, ob| {
                let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
                at.push(0);
                at.push(bytes.len());
                at.sort_unstable();
                at.dedup();
                for w in at.windows(2) {
                    if !r.done {
                        r.take_in(&mut bytes[w[0]..w[1]].to_vec(), ob);
                    }
                }
                drain(r)
            })
        }

        /// A message, sent as text or binary in `parts` fragments, with a
        /// ping after each fragment but the last.
        fn message() -> impl Strategy<Value = (bool, Vec<u8>, usize)> {
            prop_oneof![
                ".{0,40}".prop_map(|t: String| (true, t.into_bytes())),
                prop::collection::vec(any::<u8>(), 0..60).prop_map(|b| (false, b)),
            ]
            .prop_flat_map(|(text, body)| (Just(text), Just(body), 1usize..4))
        }

        fn encode_message((text, body, parts): &(bool, Vec<u8>, usize)) -> Vec<u8> {
            let chunk = body.len().div_ceil(*parts).max(1);
            let pieces: Vec<&[u8]> = if body.is_empty() {
                vec![&[][..]]
            } else {
                body.chunks(chunk).collect()
            };
            let mut out = Vec::new();
            for (i, piece) in pieces.iter().enumerate() {
                let last = i + 1 == pieces.len();
                let op = match (i, *text) {
                    (0, true) => OP_TEXT,
                    (0, false) => OP_BINARY,
                    _ => OP_CONTINUATION,
                };
                out.extend(masked(last, op, piece));
                if !last {
                    out.extend(masked(true, OP_PING, b"p"));
                }
            }
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn any_bytes_decode_the_same_however_they_are_split(
                bytes in prop::collection::vec(any::<u8>(), 0..300),
                cuts in prop::collection::vec(any::<usize>(), 0..8),
            ) {
                let whole = decode(&bytes, &[]);
                let split = decode(&bytes, &cuts);
                prop_assert_eq!(whole, split);
            }

            #[test]
            fn well_formed_messages_come_out_whole(
                messages in prop::collection::vec(message(), 1..6),
                cuts in prop::collection::vec(any::<usize>(), 0..10),
            ) {
                let bytes: Vec<u8> = messages.iter().flat_map(encode_message).collect();
                let got = decode(&bytes, &cuts);
                let want: Vec<Incoming> = messages
                    .iter()
                    .map(|(text, body, _)| {
                        if *text {
                            Incoming::Text(body.clone())
                        } else {
                            Incoming::Binary(body.clone())
                        }
                    })
                    .collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}
