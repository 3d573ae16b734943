//! A client that breaks the WebSocket protocol or a size limit is closed
//! with the code RFC 6455 names for it: 1002 for an unmasked frame, 1007 for
//! text that is not UTF-8, 1009 for a message over `--max-message-bytes`.
//! The frames are written by hand over a plain TCP socket, because no
//! WebSocket library sends such frames.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;

/// A client frame: FIN set, masked unless `masked` is false.
fn frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x5a, 0x17, 0xc3, 0x81];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A connection to the edge, upgraded by hand.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn open(addr: std::net::SocketAddr) -> Raw {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Raw {
            stream,
            buf: Vec::new(),
        };
        let end = loop {
            if let Some(i) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(raw.fill().await, "the upgrade response never ended");
        };
        let head = String::from_utf8_lossy(&raw.buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        raw.buf.drain(..end);
        raw
    }

    /// Reads more; `false` at the end of the stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("the edge answers in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next server frame: (opcode, payload); `None` at the end of the stream.
    async fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let (len, header) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= header + len {
                    assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
                    let opcode = self.buf[0] & 0x0f;
                    let payload = self.buf[header..header + len].to_vec();
                    self.buf.drain(..header + len);
                    return Some((opcode, payload));
                }
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Sends `connect` and waits for `connected`.
    async fn connect(&mut self, user: &str) {
        let connect = json!({"op":"connect","id":1,"token":token(user)}).to_string();
        self.send(&frame(TEXT, connect.as_bytes(), true)).await;
        loop {
            let (opcode, payload) = self.next().await.expect("connected");
            let v: Value = serde_json::from_slice(&payload).unwrap();
            assert_eq!(opcode, TEXT);
            if v["op"] == "connected" {
                return;
            }
        }
    }

    /// Everything up to the close frame: the text frames before it, and the
    /// close's code and reason. The edge then ends the connection.
    async fn closed(&mut self) -> (Vec<Value>, u16, String) {
        let mut texts = Vec::new();
        loop {
            let (opcode, payload) = self.next().await.expect("a close frame");
            match opcode {
                TEXT => texts.push(serde_json::from_slice(&payload).unwrap()),
                CLOSE => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    let reason = String::from_utf8(payload[2..].to_vec()).unwrap();
                    let end = tokio::time::timeout(Duration::from_secs(10), self.next()).await;
                    assert!(
                        matches!(end, Ok(None)),
                        "nothing follows the close: {end:?}"
                    );
                    return (texts, code, reason);
                }
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }
}

/// Whether `texts` hold a `disconnect` frame.
fn announced(texts: &[Value]) -> Option<&Value> {
    texts.iter().find(|t| t["op"] == "disconnect")
}

#[tokio::test]
async fn each_broken_rule_closes_with_its_rfc6455_code() {
    let dev = Dev::start();
    let bystander = connect(&dev.ws(), "bea").await;

    // An unmasked frame, after `connect` and before it.
    for connected in [true, false] {
        let mut raw = Raw::open(dev.ws_addr).await;
        if connected {
            raw.connect("mallory").await;
        }
        raw.send(&frame(TEXT, br#"{"op":"ping"}"#, false)).await;
        let (texts, code, reason) = raw.closed().await;
        assert_eq!(code, 1002, "connected: {connected}");
        assert!(reason.contains("masked"), "{reason}");
        assert_eq!(
            announced(&texts),
            None,
            "a protocol failure is the close frame alone"
        );
    }

    // Text that is not UTF-8.
    let mut raw = Raw::open(dev.ws_addr).await;
    raw.connect("mallory").await;
    raw.send(&frame(TEXT, b"{\"op\":\"ping\",\"x\":\"\xc3\x28\"}", true))
        .await;
    let (texts, code, reason) = raw.closed().await;
    assert_eq!(code, 1007);
    assert!(reason.contains("UTF-8"), "{reason}");
    assert_eq!(announced(&texts), None);

    // A close frame with a code no one may send.
    let mut raw = Raw::open(dev.ws_addr).await;
    raw.connect("mallory").await;
    raw.send(&frame(CLOSE, &1005u16.to_be_bytes(), true)).await;
    let (_, code, _) = raw.closed().await;
    assert_eq!(code, 1002);

    // A message over the default 64 KiB: announced, then closed.
    let mut raw = Raw::open(dev.ws_addr).await;
    raw.connect("mallory").await;
    let huge = format!(r#"{{"op":"ping","x":"{}"}}"#, "x".repeat(70_000));
    raw.send(&frame(TEXT, huge.as_bytes(), true)).await;
    let (texts, code, _) = raw.closed().await;
    assert_eq!(code, 1009);
    let disconnect = announced(&texts).expect("a disconnect frame before the close");
    assert_eq!(disconnect["code"], 1009);
    assert_eq!(disconnect["reconnect"], false);

    // A client's own close is answered with its code.
    let mut raw = Raw::open(dev.ws_addr).await;
    raw.connect("mallory").await;
    raw.send(&frame(CLOSE, &[0x03, 0xe8, b'b', b'y', b'e'], true))
        .await;
    let (_, code, _) = raw.closed().await;
    assert_eq!(code, 1000);

    // The edge went on serving everyone else.
    assert_eq!(
        bystander.request(json!({"op":"ping"})).await.unwrap()["op"],
        "pong"
    );
}
