//! `--allowed-origins`: a browser page of another site cannot open a
//! WebSocket (403, in plain words), a page of an allowed origin can, and so
//! can a program that sends no `Origin` at all. Without the flag every
//! origin is let in, and the edge says so when it starts.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use herald_client::{Client, ClientError, Options};
use serde_json::json;

fn from(origin: &str) -> Options {
    Options {
        origin: Some(origin.to_string()),
        ..Options::default()
    }
}

/// The raw answer to an upgrade request with `Origin: origin`.
fn raw_upgrade(addr: SocketAddr, origin: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Origin: {origin}\r\n\r\n"
    )
    .unwrap();
    let mut answer = vec![0; 4096];
    let n = s.read(&mut answer).unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

#[tokio::test]
async fn only_allowed_origins_and_clients_without_one_connect() {
    let dev = Dev::start_with(&[
        "--allowed-origins".into(),
        "https://app.example.com, https://*.example.org".into(),
    ]);
    assert!(
        dev.herald.output().contains(
            "WebSocket upgrades are accepted from origins https://app.example.com, https://*.example.org"
        ),
        "{}",
        dev.herald.output()
    );
    for refused in [
        "https://evil.example.net",
        "http://app.example.com",
        "https://app.example.com:8443",
        "https://example.org",
        "https://app.example.com.evil.net",
        "null",
    ] {
        match Client::open_with(&dev.ws(), &from(refused)).await {
            Err(ClientError::Rejected { status: 403 }) => {}
            other => panic!("Origin {refused}: {other:?}"),
        }
    }
    let answer = raw_upgrade(dev.ws_addr, "https://evil.example.net");
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    assert!(
        answer
            .contains("WebSocket connections from origin https://evil.example.net are not allowed"),
        "{answer}"
    );

    let (alice, _) =
        Client::connect_with(&dev.ws(), &token("alice"), &from("https://app.example.com"))
            .await
            .expect("an allowed origin connects");
    let (bob, _) = Client::connect_with(
        &dev.ws(),
        &token("bob"),
        &from("HTTPS://EU.Shop.Example.ORG"),
    )
    .await
    .expect("a subdomain of a wildcard connects, whatever its case");
    let carol = connect(&dev.ws(), "carol").await;
    for c in [&alice, &bob, &carol] {
        ok(c, json!({"op":"join","room":"chat:origin"})).await;
    }
    ok(
        &carol,
        json!({"op":"publish","room":"chat:origin","data":"from a program"}),
    )
    .await;
    for c in [&alice, &bob] {
        let m = c.recv_op("message", WAIT).await.unwrap();
        assert_eq!(m["data"], "from a program");
    }
}

#[tokio::test]
async fn without_the_flag_every_origin_connects() {
    let dev = Dev::start();
    assert!(
        dev.herald.output().contains(
            "no --allowed-origins: WebSocket upgrades are accepted from pages of every site"
        ),
        "{}",
        dev.herald.output()
    );
    let (c, _) = Client::connect_with(&dev.ws(), &token("dave"), &from("https://anywhere.example"))
        .await
        .expect("any origin connects");
    let pong = c.request(json!({"op":"ping"})).await.unwrap();
    assert_eq!(pong["op"], "pong");
}

#[test]
fn a_malformed_entry_stops_the_start() {
    let out = std::process::Command::new(herald_test_support::herald_bin())
        .args([
            "dev",
            "--allowed-origins",
            "https://ok.example.com,app.example.com",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--allowed-origins: \"app.example.com\" is not an origin: no scheme"),
        "{stderr}"
    );
}
