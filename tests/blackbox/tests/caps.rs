//! Connection caps on a real edge: per edge, per client address (from
//! `X-Forwarded-For` only behind a trusted proxy), and for connections
//! still authenticating; each refusal is an HTTP 503 with `Retry-After`.
//! And a request whose headers never end (slow-loris) is cut off.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use herald_client::Client;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Opens a TCP connection from `from` and asks for a WebSocket upgrade,
/// with `headers` added; returns the status line and the open stream.
async fn upgrade(
    edge: SocketAddr,
    from: &str,
    token: Option<&str>,
    headers: &str,
) -> (String, TcpStream) {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    let mut stream = socket.connect(edge).await.unwrap();
    let path = token.map_or("/ws".to_string(), |t| format!("/ws?token={t}"));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {edge}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("the edge answers")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let mut head = String::from_utf8_lossy(&head).into_owned();
    // A refusal's plain-words body, after its headers.
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_string)
        })
        .and_then(|n| n.trim().parse::<usize>().ok());
    if let (false, Some(n)) = (head.starts_with("HTTP/1.1 101"), length) {
        let mut body = vec![0u8; n];
        stream.read_exact(&mut body).await.unwrap();
        head.push_str(&String::from_utf8_lossy(&body));
    }
    (head, stream)
}

/// A client text frame (masked, as clients must send them).
fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mask = [3u8, 1, 4, 1];
    let mut frame = vec![0x81];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

fn refused_with_retry(head: &str) {
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 5"),
        "{head}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_are_capped_per_edge_and_per_address() {
    let dev = Dev::start_with(&[
        "--max-connections".into(),
        "4".into(),
        "--max-connections-per-ip".into(),
        "2".into(),
    ]);
    let url = dev.ws();
    let from = |ip: &str| Some(ip.parse::<IpAddr>().unwrap());
    let mut held = Vec::new();
    for ip in ["127.0.0.2", "127.0.0.2"] {
        held.push(
            Client::connect_from(&url, &token("ivy"), from(ip))
                .await
                .unwrap(),
        );
    }
    let (head, _) = upgrade(dev.ws_addr, "127.0.0.2", Some(&token("ivy")), "").await;
    refused_with_retry(&head);
    assert!(
        head.contains("HTTP/1.1 503"),
        "a third from one address: {head}"
    );
    // Another address is still let in, up to the edge's cap.
    for ip in ["127.0.0.3", "127.0.0.3"] {
        held.push(
            Client::connect_from(&url, &token("ivy"), from(ip))
                .await
                .unwrap(),
        );
    }
    let (head, _) = upgrade(dev.ws_addr, "127.0.0.4", Some(&token("ivy")), "").await;
    refused_with_retry(&head);
    // A place comes back when a connection closes.
    let (gone, _) = held.remove(0);
    drop(gone);
    herald_test_support::eventually(WAIT, "the place to come back", || async {
        let (head, _) = upgrade(dev.ws_addr, "127.0.0.2", Some(&token("ivy")), "").await;
        head.starts_with("HTTP/1.1 101").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let dev = Dev::start_with(&[
        "--max-connections-per-ip".into(),
        "1".into(),
        "--trusted-proxies".into(),
        "127.0.0.5/32".into(),
    ]);
    let xff = |ip: &str| format!("X-Forwarded-For: {ip}\r\n");
    // Behind the trusted proxy, each forwarded address has its own place.
    let (a, _a) = upgrade(
        dev.ws_addr,
        "127.0.0.5",
        Some(&token("pat")),
        &xff("203.0.113.7"),
    )
    .await;
    assert!(a.starts_with("HTTP/1.1 101"), "{a}");
    let (b, _b) = upgrade(
        dev.ws_addr,
        "127.0.0.5",
        Some(&token("pat")),
        &xff("203.0.113.8"),
    )
    .await;
    assert!(b.starts_with("HTTP/1.1 101"), "{b}");
    let (c, _) = upgrade(
        dev.ws_addr,
        "127.0.0.5",
        Some(&token("pat")),
        &xff("203.0.113.7"),
    )
    .await;
    refused_with_retry(&c);
    assert!(c.contains("203.0.113.7"), "{c}");
    // From anyone else the header is ignored: the peer's address counts.
    let (d, _d) = upgrade(
        dev.ws_addr,
        "127.0.0.6",
        Some(&token("pat")),
        &xff("203.0.113.9"),
    )
    .await;
    assert!(d.starts_with("HTTP/1.1 101"), "{d}");
    let (e, _) = upgrade(
        dev.ws_addr,
        "127.0.0.6",
        Some(&token("pat")),
        &xff("203.0.113.10"),
    )
    .await;
    refused_with_retry(&e);
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_still_authenticating_are_capped_and_slow_headers_cut_off() {
    let dev = Dev::start_with(&["--max-pending-connections".into(), "2".into()]);
    // Two upgrades that never authenticate hold both places.
    let (a, _a) = upgrade(dev.ws_addr, "127.0.0.1", None, "").await;
    let (b, _b) = upgrade(dev.ws_addr, "127.0.0.1", None, "").await;
    assert!(a.starts_with("HTTP/1.1 101") && b.starts_with("HTTP/1.1 101"));
    let (c, _) = upgrade(dev.ws_addr, "127.0.0.1", None, "").await;
    refused_with_retry(&c);
    // Once one of them authenticates, its place is free for the next.
    let mut a = _a;
    let connect = json!({"op":"connect","token":token("una")}).to_string();
    a.write_all(&masked_text(connect.as_bytes())).await.unwrap();
    herald_test_support::eventually(WAIT, "a place among the pending", || async {
        let (head, _) = upgrade(dev.ws_addr, "127.0.0.1", None, "").await;
        head.starts_with("HTTP/1.1 101").then_some(())
    })
    .await;

    // A request that never finishes its headers is closed by the edge.
    let mut loris = TcpStream::connect(dev.ws_addr).await.unwrap();
    loris
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(30), loris.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "a slow-loris request was never cut off");
}
