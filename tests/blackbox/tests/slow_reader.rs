//! A client that reads nothing while 100 MB are published to its rooms
//! (messages of 1 KB and of 60 KB) is disconnected as a slow consumer
//! (4009), and the edge's memory stays bounded: the outbound queue is
//! limited in bytes as well as in frames.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use herald_proto::v1::{PublishBatchRequest, PublishRequest};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A WebSocket client written by hand, so that it can stop reading.
struct RawClient {
    stream: TcpStream,
}

impl RawClient {
    /// Upgrades with `?token=`, reads `connected`, joins `room` and reads
    /// its `ok`; from then on reads nothing.
    async fn joined(addr: SocketAddr, user: &str, room: &str) -> RawClient {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET /ws?token={} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n",
            token(user)
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut client = RawClient { stream };
        let head = client.read_until(b"\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        client.read_until(b"\"connected\"").await;
        let join = json!({"op":"join","id":1,"room":room}).to_string();
        client.send_masked(join.as_bytes()).await;
        client.read_until(b"\"op\":\"ok\"").await;
        client
    }

    /// Reads until `marker` has arrived; returns what was read, as text.
    async fn read_until(&mut self, marker: &[u8]) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(marker.len()).any(|w| w == marker) {
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut buf))
                .await
                .expect("the edge answers")
                .unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    async fn send_masked(&mut self, payload: &[u8]) {
        assert!(payload.len() < 126);
        let mask = [7u8, 1, 9, 3];
        let mut frame = vec![0x81, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.unwrap();
    }

    /// Reads everything left, to the end; returns the close frame's code,
    /// or `None` when the edge cut the connection off instead.
    async fn close_code(mut self) -> Option<u16> {
        let mut all = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(60), self.stream.read_to_end(&mut all))
            .await
            .expect("the edge ends the connection");
        if read.is_err() {
            return None;
        }
        last_close_code(&all)
    }
}

/// The code of the last close frame in a stream of server frames.
fn last_close_code(mut bytes: &[u8]) -> Option<u16> {
    let mut code = None;
    while bytes.len() >= 2 {
        let (len, header) = match bytes[1] & 0x7f {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        if bytes.len() < header + len {
            break;
        }
        if bytes[0] & 0x0f == 0x8 && len >= 2 {
            code = Some(u16::from_be_bytes([bytes[header], bytes[header + 1]]));
        }
        bytes = &bytes[header + len..];
    }
    code
}

/// Publishes `total` bytes to `room` in messages of `size` bytes.
async fn flood(router: &mut RouterClient, room: &str, size: usize, total: usize) {
    let data = format!("\"{}\"", "m".repeat(size - 2));
    let per_batch = (900 * 1024 / size).clamp(1, 1000);
    let mut sent = 0;
    while sent < total {
        let messages = (0..per_batch)
            .map(|_| PublishRequest {
                room: room.into(),
                data: data.clone(),
                key: String::new(),
            })
            .collect();
        router
            .publish_batch(PublishBatchRequest { messages })
            .await
            .expect("the router takes the batch");
        sent += per_batch * size;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_reads_nothing_is_cut_off_and_the_edge_stays_bounded() {
    // Default limits: 1024 frames, 4 MiB. (Counted in frames alone, the
    // 60 KB reader held 60 MB here.)
    let cluster = Cluster::start(1);
    let edge = cluster.edge_addrs[0];
    let small = RawClient::joined(edge, "sid", "chat:small").await;
    let large = RawClient::joined(edge, "lars", "chat:large").await;
    let before = resident_bytes(cluster.edges[0].http);

    let mut router = cluster.router().await;
    flood(&mut router, "chat:small", 1024, 50 << 20).await;
    flood(&mut router, "chat:large", 60 * 1024, 50 << 20).await;

    let grown = resident_bytes(cluster.edges[0].http) - before;
    assert!(
        grown < 16.0 * 1024.0 * 1024.0,
        "the edge grew by {:.1} MB while 100 MB went to clients that read nothing",
        grown / 1048576.0
    );
    for (who, client) in [("1 KB", small), ("60 KB", large)] {
        let code = client.close_code().await;
        assert!(
            code == Some(4009) || code.is_none(),
            "the {who} reader ended with {code:?}, not 4009"
        );
    }
}
