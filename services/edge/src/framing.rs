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

use std::collections::VecDeque;
use std::io;

use herald_wire::CloseCode;
use herald_wire::frames::disconnect_frame;

use crate::delivery::{Closing, Out, Outbox};
use crate::socket::Socket;

/// Bytes read from the socket at a time, on the stack of the reading task.
const READ_CHUNK: usize = 16 * 1024;

const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// What the reader produced.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    Text(Vec<u8>),
    Binary,
    /// The client closed, or the socket is gone.
    Closed,
    /// The client broke the WebSocket protocol or a size limit.
    Violation(CloseCode, String),
}

/// A message sent in several frames, being put together.
struct Fragments {
    text: bool,
    data: Vec<u8>,
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
                    CloseCode::Policy,
                    "reserved bits set: no extension was agreed",
                );
                break;
            }
            if b1 & 0x80 == 0 {
                self.violation(CloseCode::Policy, "client frames must be masked");
                break;
            }
            let control = opcode >= 0x8;
            if !matches!(opcode, 0x0..=0x2 | 0x8..=0xA) {
                self.violation(CloseCode::Policy, format!("unknown opcode {opcode:#x}"));
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
                    CloseCode::Policy,
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

    fn frame(&mut self, fin: bool, opcode: u8, payload: &[u8], outbox: &Outbox) {
        match opcode {
            OP_PING => {
                outbox.push(Out::Control {
                    opcode: OP_PONG,
                    payload: payload.to_vec(),
                });
            }
            OP_CLOSE => self.close(payload, outbox),
            OP_TEXT | OP_BINARY => {
                if self.message.is_some() {
                    self.violation(
                        CloseCode::Policy,
                        "a new message began before the fragmented one ended",
                    );
                } else if fin {
                    self.message_done(opcode == OP_TEXT, payload.to_vec());
                } else {
                    self.message = Some(Box::new(Fragments {
                        text: opcode == OP_TEXT,
                        data: payload.to_vec(),
                    }));
                }
            }
            OP_CONTINUATION => match self.message.as_mut() {
                None => self.violation(
                    CloseCode::Policy,
                    "continuation frame without a message to continue",
                ),
                Some(m) => {
                    m.data.extend_from_slice(payload);
                    if fin {
                        let m = self.message.take().expect("present");
                        self.message_done(m.text, m.data);
                    }
                }
            },
            // Pongs answer pings the server never sends: nothing to do.
            _ => {}
        }
    }

    fn message_done(&mut self, text: bool, data: Vec<u8>) {
        if !text {
            self.ready.push_back(Incoming::Binary);
        } else if std::str::from_utf8(&data).is_err() {
            self.violation(CloseCode::Policy, "text frame is not valid UTF-8");
        } else {
            self.ready.push_back(Incoming::Text(data));
        }
    }

    /// Answers a close with the same code (RFC 6455 §5.5.1) and ends reading.
    fn close(&mut self, payload: &[u8], outbox: &Outbox) {
        let valid = match payload.len() {
            0 => true,
            1 => false,
            _ => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                let known = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
                known && std::str::from_utf8(&payload[2..]).is_ok()
            }
        };
        if !valid {
            self.violation(CloseCode::Policy, "malformed close frame");
            return;
        }
        outbox.push(Out::Control {
            opcode: OP_CLOSE,
            payload: payload.get(..2).unwrap_or_default().to_vec(),
        });
        self.finish(Incoming::Closed);
    }
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

pub fn encode_close(buf: &mut Vec<u8>, close: &Closing) {
    let (code, reason) = (close.code, close.reason.as_str());
    encode_frame(
        buf,
        OP_TEXT,
        &disconnect_frame(code, reason, close.reconnect_after_ms.map(u64::from)),
    );
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

    #[tokio::test]
    async fn protocol_violations_are_named() {
        let cases: Vec<(Vec<u8>, CloseCode, &str)> = vec![
            (
                {
                    let mut f = masked(true, OP_TEXT, b"x");
                    f[1] &= 0x7f;
                    f
                },
                CloseCode::Policy,
                "masked",
            ),
            (
                masked(true, OP_TEXT, &[0xff, 0xfe]),
                CloseCode::Policy,
                "UTF-8",
            ),
            (
                masked(true, OP_CONTINUATION, b"x"),
                CloseCode::Policy,
                "continuation",
            ),
            (masked(false, OP_PING, b"x"), CloseCode::Policy, "control"),
            (masked(true, 0x3, b"x"), CloseCode::Policy, "opcode"),
            // A 64-bit length at its largest: refused, no overflow.
            (
                vec![0x81, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                CloseCode::TooBig,
                "larger",
            ),
            // Refused from the header alone, before the payload arrives.
            (
                masked(true, OP_TEXT, &[b'a'; 2000])[..8].to_vec(),
                CloseCode::TooBig,
                "larger",
            ),
        ];
        for (mut bytes, code, why) in cases {
            let (mut r, ob, _c) = reader().await;
            r.take_in(&mut bytes, &ob);
            match drain(&mut r).as_slice() {
                [Incoming::Violation(c, reason)] => {
                    assert_eq!(*c, code);
                    assert!(reason.contains(why), "{reason}");
                }
                other => panic!("{why}: {other:?}"),
            }
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
}
