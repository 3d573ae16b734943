//! The routes only `herald dev` serves: the demo page, the SDK it imports,
//! and the shortcuts `/dev/token` and `/dev/notify`, which answer only on
//! the built-in development secret; and a cluster edge that serves none of
//! them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use herald_test_support::{Herald, NatsServer, free_addr};

/// One HTTP/1.1 request; the status, the headers (lower-case names) and the body.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the answer");
    let (head, body) = out.split_once("\r\n\r\n").expect("a complete answer");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn dev(extra: &[&str]) -> (Herald, SocketAddr) {
    let addr = free_addr();
    let mut args: Vec<String> = vec![
        "dev".into(),
        "--listen".into(),
        addr.to_string(),
        "--grpc-listen".into(),
        free_addr().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    (
        Herald::start("herald dev", &args, addr).expect("start herald dev"),
        addr,
    )
}

/// The claims of a token signed with the built-in development secret
/// (the one `herald token` signs with when given none).
fn dev_claims(token: &str) -> herald_auth::Claims {
    herald_auth::Verifier::new(Some(b"herald-dev-secret-do-not-use-in-production"), None)
        .unwrap()
        .verify(token)
        .expect("a token signed with the development secret")
}

#[test]
fn dev_serves_the_demo_the_sdk_and_its_shortcuts() {
    let (herald, addr) = dev(&[]);
    let out = herald.output();
    assert!(out.contains(&format!("http://{addr}/")), "{out}");
    assert!(out.contains("Dev shortcuts      on"), "{out}");
    assert!(out.contains("doc:* rooms durable"), "{out}");

    let (status, head, body) = http(addr, "GET", "/", "");
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(body.contains("/demo/app.js"), "{body}");
    for path in [
        "/demo/app.js",
        "/demo/chat.js",
        "/demo/doc.js",
        "/demo/inbox.js",
        "/sdk/herald.js",
    ] {
        let (status, head, body) = http(addr, "GET", path, "");
        assert_eq!(status, 200, "{path}");
        assert!(
            head.contains("content-type: text/javascript"),
            "{path}: {head}"
        );
        assert!(
            body.contains("import ") || body.contains("export "),
            "{path} is not an ES module"
        );
    }
    let (status, head, _) = http(addr, "GET", "/demo/style.css", "");
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/css"), "{head}");

    let (status, _, body) = http(addr, "GET", "/dev/token?sub=alice", "");
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    let claims = dev_claims(reply["token"].as_str().unwrap());
    assert_eq!(claims.sub, "alice");
    let ttl = claims.exp - herald_auth::now_secs();
    assert!((60..=15 * 60).contains(&ttl), "a token for {ttl} s");
    let (status, _, body) = http(addr, "GET", "/dev/token", "");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("sub"), "{body}");

    // Into alice's inbox, the durable personal room: stored with an offset.
    let (status, _, body) = http(addr, "POST", "/dev/notify?user=alice", r#"{"text":"hi"}"#);
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(reply["offset"].as_u64().unwrap() >= 1, "{reply}");
    let (status, _, body) = http(addr, "POST", "/dev/notify?user=alice", "not json");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("JSON"), "{body}");

    // Cluster routes are still there.
    let (status, _, _) = http(addr, "GET", "/readyz", "");
    assert_eq!(status, 200);
}

#[test]
fn dev_with_its_own_secret_mints_nothing() {
    let (herald, addr) = dev(&[
        "--jwt-secret",
        "a-real-secret",
        "--config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/herald.toml"),
    ]);
    let out = herald.output();
    assert!(out.contains("Dev shortcuts      off"), "{out}");
    assert!(out.contains("as --config"), "{out}");
    let (status, _, body) = http(addr, "GET", "/dev/token?sub=alice", "");
    assert_eq!(status, 404);
    assert!(body.contains("--jwt-secret"), "{body}");
    let (status, _, body) = http(addr, "POST", "/dev/notify?user=alice", "{}");
    assert_eq!(status, 404);
    assert!(body.contains("Router.SendToUser"), "{body}");
    // The demo itself is still served: it says why it cannot get a token.
    let (status, _, _) = http(addr, "GET", "/", "");
    assert_eq!(status, 200);
}

#[test]
fn cluster_edges_serve_no_demo_and_no_shortcuts() {
    let nats = NatsServer::start().expect("start nats-server");
    let addr = free_addr();
    let args: Vec<String> = [
        "edge",
        "--listen",
        &addr.to_string(),
        "--nats",
        &nats.url(),
        "--node-id",
        "edge-0",
        "--jwt-secret",
        "a-real-secret",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _edge = Herald::start("edge-0", &args, addr).expect("start an edge");
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/demo/app.js"),
        ("GET", "/sdk/herald.js"),
        ("GET", "/dev/token?sub=alice"),
        ("POST", "/dev/notify?user=alice"),
    ] {
        let (status, _, body) = http(addr, method, path, "{}");
        assert_eq!(status, 404, "{method} {path} answered {status}: {body}");
    }
    let (status, _, _) = http(addr, "GET", "/readyz", "");
    assert_eq!(status, 200);
}

#[test]
fn dev_with_api_tokens_sends_nothing_around_them() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("api-tokens");
    std::fs::write(&tokens, "secret-api-token publish\n").unwrap();
    let (herald, addr) = dev(&["--api-tokens", tokens.to_str().unwrap()]);
    assert!(
        herald.output().contains("POST /dev/notify off"),
        "{}",
        herald.output()
    );
    let (status, _, body) = http(addr, "GET", "/dev/token?sub=alice", "");
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = http(addr, "POST", "/dev/notify?user=alice", "{}");
    assert_eq!(status, 404);
    assert!(body.contains("--api-tokens"), "{body}");
}
