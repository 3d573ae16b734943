//! The SSE transport: a stream on one edge, requests posted to another,
//! and everything a WebSocket client gets (replies, room messages, presence
//! events, being online) arriving on the stream; posts that are refused,
//! and the stream's connection gone once the stream is closed.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use herald_proto::v1::UserStatusRequest;
use herald_test_support::eventually;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What an SSE stream carried: an event's data (a frame), or a comment.
#[derive(Debug)]
enum Item {
    Frame(Value),
    Comment(String),
}

/// An SSE client over a plain HTTP/1.1 connection, as an `EventSource`
/// would hold it. Dropping it closes the connection.
struct SseClient {
    items: mpsc::UnboundedReceiver<Item>,
    /// Frames read while waiting for another.
    backlog: VecDeque<Value>,
    comments: Vec<String>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for SseClient {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl SseClient {
    async fn open(addr: SocketAddr, token: &str) -> SseClient {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        let conn_task = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::get(format!("/sse?token={token}"))
            .header("host", addr.to_string())
            .header("accept", "text/event-stream")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let header = |name: &str| response.headers()[name].to_str().unwrap().to_string();
        assert_eq!(header("content-type"), "text/event-stream");
        assert_eq!(header("cache-control"), "no-cache");
        assert_eq!(header("x-accel-buffering"), "no");
        let (tx, items) = mpsc::unbounded_channel();
        let mut body = response.into_body();
        let reader = tokio::spawn(async move {
            let _sender = sender;
            let mut text = String::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                text.push_str(std::str::from_utf8(&data).unwrap());
                while let Some(end) = text.find("\n\n") {
                    let event: String = text.drain(..end + 2).collect();
                    let mut data = Vec::new();
                    for line in event.lines() {
                        if let Some(d) = line.strip_prefix("data: ") {
                            data.push(d);
                        } else if let Some(c) = line.strip_prefix(": ") {
                            let _ = tx.send(Item::Comment(c.to_string()));
                        }
                    }
                    if !data.is_empty() {
                        let frame = serde_json::from_str(&data.join("\n")).unwrap();
                        let _ = tx.send(Item::Frame(frame));
                    }
                }
            }
        });
        SseClient {
            items,
            backlog: VecDeque::new(),
            comments: Vec::new(),
            tasks: vec![conn_task, reader],
        }
    }

    /// The next item from the stream; `None` once it ended.
    async fn read(&mut self, timeout: Duration) -> Option<Item> {
        tokio::time::timeout(timeout, self.items.recv())
            .await
            .unwrap_or_else(|_| panic!("nothing arrived on the stream within {timeout:?}"))
    }

    /// The first frame (earlier ones kept for later) that `pred` accepts.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i).unwrap();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let item = tokio::time::timeout(left, self.items.recv())
                .await
                .unwrap_or_else(|_| panic!("no {what} on the stream; got {:?}", self.backlog));
            match item {
                Some(Item::Frame(f)) if pred(&f) => return f,
                Some(Item::Frame(f)) => self.backlog.push_back(f),
                Some(Item::Comment(c)) => self.comments.push(c),
                None => panic!("the stream ended before {what}; got {:?}", self.backlog),
            }
        }
    }

    /// The answer to request `id`.
    async fn reply(&mut self, id: u64) -> Value {
        self.wait_for(&format!("answer to request {id}"), |f| f["id"] == id)
            .await
    }
}

/// `POST /sse/send?conn=CONN` with `body`; the status and the body of the answer.
async fn post(
    addr: SocketAddr,
    token: Option<&str>,
    query: &str,
    body: impl Into<Bytes>,
) -> (StatusCode, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let conn_task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::post(format!("/sse/send?{query}"))
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let response = sender
        .send_request(req.body(Full::new(body.into())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    conn_task.abort();
    (status, String::from_utf8_lossy(&text).into_owned())
}

async fn post_to(addr: SocketAddr, token: &str, conn: &str, frames: Value) -> StatusCode {
    let (status, text) = post(
        addr,
        Some(token),
        &format!("conn={conn}"),
        frames.to_string(),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "post {frames} to {conn}: {text}"
    );
    status
}

async fn user_status(cluster: &Cluster, user: &str) -> herald_proto::v1::UserStatus {
    let reply = cluster
        .presence()
        .await
        .user_status(UserStatusRequest {
            users: vec![user.to_string()],
        })
        .await
        .unwrap()
        .into_inner();
    reply.users.into_iter().next().unwrap()
}

#[tokio::test]
async fn an_sse_stream_on_one_edge_is_served_through_posts_to_another() {
    let cluster = Cluster::start_spec(Spec {
        edges: 2,
        // Heartbeats within the test, and an idle timeout the stream outlives.
        edge_args: vec![
            "--heartbeat".into(),
            "1s".into(),
            "--idle-timeout".into(),
            "2s".into(),
        ],
        presence_args: vec!["--presence-grace".into(), "500ms".into()],
        ..Spec::default()
    });
    let (a, b) = (cluster.edge_addrs[0], cluster.edge_addrs[1]);
    let alice = token("alice");
    let mut sse = SseClient::open(a, &alice).await;
    let Some(Item::Frame(connected)) = sse.read(WAIT).await else {
        panic!("the stream does not open with a frame");
    };
    assert_eq!(connected["op"], "connected", "{connected}");
    assert_eq!(connected["user"], "alice");
    assert_eq!(connected["node"], "edge-0");
    let conn = connected["conn"].as_str().unwrap().to_string();
    assert!(conn.starts_with("edge-0-"), "{conn}");

    // Posted to the other edge, which forwards to the stream's.
    post_to(
        b,
        &alice,
        &conn,
        json!({"op":"join","id":1,"room":"chat:sse"}),
    )
    .await;
    assert_eq!(sse.reply(1).await["op"], "ok");

    let bob = connect(&cluster.ws(1), "bob").await;
    ok(&bob, json!({"op":"join","room":"chat:sse"})).await;
    let joined = sse
        .wait_for("bob's join", |f| {
            f["op"] == "presence" && f["user"] == "bob"
        })
        .await;
    assert_eq!(
        (&joined["event"], &joined["user"], &joined["room"]),
        (&json!("join"), &json!("bob"), &json!("chat:sse"))
    );

    // An array of frames: taken in order, each answered on the stream.
    post_to(
        b,
        &alice,
        &conn,
        json!([
            {"op":"publish","id":2,"room":"chat:sse","data":{"text":"from sse"}},
            {"op":"ping","id":3},
            {"op":"fly","id":4},
        ]),
    )
    .await;
    assert_eq!(sse.reply(2).await["op"], "ok");
    assert_eq!(sse.reply(3).await["op"], "pong");
    let refused = sse.reply(4).await;
    assert_eq!(
        (&refused["op"], &refused["code"]),
        (&json!("error"), &json!("bad_request"))
    );
    let m = bob.recv_op("message", WAIT).await.unwrap();
    assert_eq!(
        (&m["from"], &m["data"]["text"]),
        (&json!("alice"), &json!("from sse"))
    );

    ok(
        &bob,
        json!({"op":"publish","room":"chat:sse","data":{"text":"from ws"}}),
    )
    .await;
    let m = sse
        .wait_for("bob's message", |f| {
            f["op"] == "message" && f["from"] == "bob"
        })
        .await;
    assert_eq!(m["data"]["text"], "from ws");

    // Posted to the stream's own edge, too.
    post_to(
        a,
        &alice,
        &conn,
        json!({"op":"presence","id":5,"room":"chat:sse"}),
    )
    .await;
    assert_eq!(member_users(&sse.reply(5).await), ["alice", "bob"]);

    let s = eventually(WAIT, "alice is online", || async {
        let s = user_status(&cluster, "alice").await;
        (s.online && !s.conns.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(
        (s.conns[0].conn.as_str(), s.conns[0].node.as_str()),
        (conn.as_str(), "edge-0")
    );

    // Refusals, from either edge.
    let query = format!("conn={conn}");
    let ping = json!({"op":"ping"}).to_string();
    let bobs = token("bob");
    for edge in [a, b] {
        let (status, text) = post(edge, Some(&bobs), &query, ping.clone()).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "another user's stream: {text}"
        );
        let (status, _) = post(edge, None, &query, ping.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "no token");
        let (status, _) = post(edge, Some("not-a-jwt"), &query, ping.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "a bad token");
        for unknown in ["edge-0-999999", "edge-1-999999", "edge-9-1", "nonsense"] {
            let (status, text) =
                post(edge, Some(&alice), &format!("conn={unknown}"), ping.clone()).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{unknown}: {text}");
            assert!(!text.trim().is_empty());
        }
        for body in ["{not json", "[1]", "[]", "\"ping\""] {
            let (status, text) = post(edge, Some(&alice), &query, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {text}");
        }
        let big = json!({"op":"publish","room":"chat:sse","data":"x".repeat(70_000)});
        let (status, _) = post(edge, Some(&alice), &query, big.to_string()).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        let (status, _) = post(edge, Some(&alice), "", ping.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "no conn");
    }

    // Past the idle timeout, the stream is alive: heartbeats came, and
    // the relay answered them for the client.
    tokio::time::sleep(Duration::from_secs(3)).await;
    post_to(b, &alice, &conn, json!({"op":"ping","id":6})).await;
    assert_eq!(sse.reply(6).await["op"], "pong");
    assert!(
        sse.comments.iter().any(|c| c == "ping"),
        "no `: ping` heartbeat on the stream: {:?}",
        sse.comments
    );

    // Closing the stream ends the connection: members see alice leave,
    // she goes offline, and her conn is no more.
    drop(sse);
    loop {
        let p = bob.recv_op("presence", WAIT).await.unwrap();
        if p["event"] == "leave" {
            assert_eq!((&p["user"], &p["conn"]), (&json!("alice"), &json!(conn)));
            break;
        }
    }
    eventually(WAIT, "alice is offline", || async {
        let s = user_status(&cluster, "alice").await;
        (!s.online && s.conns.is_empty()).then_some(())
    })
    .await;
    for edge in [a, b] {
        let (status, text) = post(edge, Some(&alice), &query, ping.clone()).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "a closed stream: {text}");
    }
}

#[tokio::test]
async fn a_refused_token_gets_401_and_no_stream() {
    let cluster = Cluster::start(1);
    let addr = cluster.edge_addrs[0];
    for query in ["", "?token=not-a-jwt"] {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get(format!("/sse{query}"))
            .header("host", addr.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{query}");
    }
    let expired = token_with(json!({"sub": "alice", "exp": now() - 60}));
    let (status, text) = post(addr, Some(&expired), "conn=edge-0-1", "{}").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(text.contains("expired"), "{text}");
}
