//! Exercises the client against a scripted WebSocket server built into the
//! test, so the client's own behaviour (reply matching, queueing, close
//! reporting) is checked without a Herald edge.
//!
//! Script, per text frame received:
//! - not JSON: `error` bad_request without id;
//! - `connect`: token "bad" → `error` unauthorized with the id; token "kick" →
//!   `disconnect` 4001 then close 4001; otherwise `connected` (with the peer IP);
//! - `ping`: `pong`;
//! - `bye`: `disconnect` 4009 then close 4009;
//! - `two`: `presence`, `message`, then `ok`;
//! - `frag`: a `message` split over two WebSocket fragments, then `ok`;
//! - `pingme`: a WebSocket ping, and `ok` once the pong came back;
//! - `hold`: no reply until the next `release`, which gets the held reply first;
//! - anything else: an unsolicited `message`, then `ok`.
//!
//! A binary frame is answered with close 1003.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use fastwebsockets::upgrade::IncomingUpgrade;
use fastwebsockets::{FragmentCollector, Frame as WsFrame, OpCode, Payload, WebSocketError};
use herald_client::{Client, ClientError, Frame};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);
/// Only used to show that nothing more arrives.
const QUIET: Duration = Duration::from_millis(100);

/// Starts the scripted server; returns its base URL (`ws://127.0.0.1:port`).
async fn start() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/ws", get(upgrade))
        .route("/forbidden", get(|| async { StatusCode::FORBIDDEN }));
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    format!("ws://{addr}")
}

async fn upgrade(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: IncomingUpgrade,
) -> impl IntoResponse {
    let (mut response, socket) = upgrade.upgrade().unwrap();
    let offered = headers
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim() == "herald.v1"));
    if offered {
        response.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("herald.v1"),
        );
    }
    tokio::spawn(async move {
        let ws = FragmentCollector::new(socket.await.unwrap());
        let _ = serve(ws, peer).await;
    });
    response
}

type ServerWs = FragmentCollector<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

async fn send(ws: &mut ServerWs, frame: Value) -> Result<(), WebSocketError> {
    ws.write_frame(WsFrame::text(Payload::Owned(
        frame.to_string().into_bytes(),
    )))
    .await
}

/// Sends `disconnect` and the close frame with the same code, then waits for
/// the client's close echo.
async fn kick(ws: &mut ServerWs, code: u16, reason: &str) -> Result<(), WebSocketError> {
    send(
        ws,
        json!({"op": "disconnect", "code": code, "reason": reason, "reconnect": false}),
    )
    .await?;
    ws.write_frame(WsFrame::close(code, reason.as_bytes()))
        .await?;
    while ws.read_frame().await?.opcode != OpCode::Close {}
    Ok(())
}

async fn serve(mut ws: ServerWs, peer: SocketAddr) -> Result<(), WebSocketError> {
    let mut held = None;
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Text => {}
            OpCode::Binary => {
                ws.write_frame(WsFrame::close(1003, b"binary frames are not allowed"))
                    .await?;
                return Ok(());
            }
            // The close echo was sent by fastwebsockets.
            OpCode::Close => return Ok(()),
            _ => continue,
        }
        let Ok(req) = serde_json::from_slice::<Value>(&frame.payload) else {
            send(
                &mut ws,
                json!({"op": "error", "code": "bad_request", "message": "not JSON"}),
            )
            .await?;
            continue;
        };
        let id = req["id"].clone();
        let op = req["op"].as_str().unwrap_or_default();
        match op {
            "connect" => match req["token"].as_str() {
                Some("bad") => {
                    let refusal = json!({"op": "error", "id": id, "code": "unauthorized", "message": "bad token"});
                    send(&mut ws, refusal).await?;
                }
                Some("kick") => return kick(&mut ws, 4001, "unauthorized").await,
                _ => {
                    let connected = json!({"op": "connected", "id": id, "conn": "c1", "user": "u", "peer": peer.ip().to_string()});
                    send(&mut ws, connected).await?;
                }
            },
            "ping" => send(&mut ws, json!({"op": "pong", "id": id})).await?,
            "bye" => return kick(&mut ws, 4009, "slow consumer").await,
            "two" => {
                let presence = json!({"op": "presence", "room": "chat:lobby", "event": "join", "user": "v", "conn": "c2"});
                send(&mut ws, presence).await?;
                send(
                    &mut ws,
                    json!({"op": "message", "room": "chat:lobby", "data": 2}),
                )
                .await?;
                send(&mut ws, json!({"op": "ok", "id": id})).await?;
            }
            "frag" => {
                let text = json!({"op": "message", "room": "chat:lobby", "data": "x".repeat(3000)})
                    .to_string()
                    .into_bytes();
                let (head, tail) = text.split_at(1000);
                ws.write_frame(WsFrame::new(
                    false,
                    OpCode::Text,
                    None,
                    head.to_vec().into(),
                ))
                .await?;
                ws.write_frame(WsFrame::new(
                    true,
                    OpCode::Continuation,
                    None,
                    tail.to_vec().into(),
                ))
                .await?;
                send(&mut ws, json!({"op": "ok", "id": id})).await?;
            }
            "pingme" => {
                ws.write_frame(WsFrame::new(
                    true,
                    OpCode::Ping,
                    None,
                    b"hb".to_vec().into(),
                ))
                .await?;
                while ws.read_frame().await?.opcode != OpCode::Pong {}
                send(&mut ws, json!({"op": "ok", "id": id, "ponged": true})).await?;
            }
            "hold" => held = Some(id),
            "release" => {
                if let Some(held) = held.take() {
                    send(&mut ws, json!({"op": "ok", "id": held, "late": true})).await?;
                }
                send(&mut ws, json!({"op": "ok", "id": id})).await?;
            }
            _ => {
                let message =
                    json!({"op": "message", "room": "chat:lobby", "data": op, "from": "server"});
                send(&mut ws, message).await?;
                send(&mut ws, json!({"op": "ok", "id": id})).await?;
            }
        }
    }
}

async fn connected_client() -> (Client, Frame) {
    let base = start().await;
    Client::connect(&format!("{base}/ws"), "good")
        .await
        .unwrap()
}

#[tokio::test]
async fn connect_returns_the_connected_frame_and_the_subprotocol() {
    let (client, connected) = connected_client().await;
    assert_eq!(connected["op"], "connected");
    assert_eq!(connected["id"], 1);
    assert_eq!(connected["conn"], "c1");
    assert_eq!(client.protocol(), Some("herald.v1"));
    assert!(!client.is_closed());
    assert!(client.next_frame(QUIET).await.unwrap().is_none());
}

#[tokio::test]
async fn replies_are_matched_by_id_and_unsolicited_frames_are_kept() {
    let (client, _) = connected_client().await;
    let reply = client
        .request(json!({"op": "join", "room": "chat:lobby"}))
        .await
        .unwrap();
    assert_eq!(reply, json!({"op": "ok", "id": 2}));
    // The message was sent before the reply, while `request` was waiting.
    let message = client.recv_op("message", WAIT).await.unwrap();
    assert_eq!(message["data"], "join");

    let pong = client.request(json!({"op": "ping"})).await.unwrap();
    assert_eq!(pong, json!({"op": "pong", "id": 3}));
    assert!(client.next_frame(QUIET).await.unwrap().is_none());
}

#[tokio::test]
async fn recv_op_keeps_the_frames_it_skips_in_order() {
    let (client, _) = connected_client().await;
    client.request(json!({"op": "two"})).await.unwrap();
    client.request(json!({"op": "publish"})).await.unwrap();

    // Queue now: presence, message(2), message("publish").
    let message = client.recv_op("message", WAIT).await.unwrap();
    assert_eq!(message["data"], 2);
    let presence = client.next_frame(WAIT).await.unwrap().unwrap();
    assert_eq!(presence["op"], "presence");
    let message = client.recv_op("message", WAIT).await.unwrap();
    assert_eq!(message["data"], "publish");
    assert!(matches!(
        client.recv_op("message", QUIET).await,
        Err(ClientError::Timeout(_))
    ));
}

#[tokio::test]
async fn a_tap_takes_the_frames_it_wants_before_they_are_parsed() {
    let base = start().await;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let tap: herald_client::Tap = {
        let seen = seen.clone();
        Arc::new(move |frame: &[u8]| {
            // The script's frames are `json!` objects, keys sorted.
            let text = String::from_utf8_lossy(frame).into_owned();
            let take = text.contains(r#""op":"message""#);
            seen.lock().unwrap().push(text);
            take
        })
    };
    let (client, connected) = Client::connect_tapped(&format!("{base}/ws"), "good", None, tap)
        .await
        .unwrap();
    assert_eq!(connected["op"], "connected");
    client.request(json!({"op": "two"})).await.unwrap();
    client.request(json!({"op": "frag"})).await.unwrap();

    // The tap saw every frame, the reassembled fragments as one; the
    // messages it took are not queued, the presence event it left is.
    let seen: Vec<Value> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    let ops: Vec<&str> = seen.iter().map(|f| f["op"].as_str().unwrap()).collect();
    assert_eq!(
        ops,
        ["connected", "presence", "message", "ok", "message", "ok"]
    );
    assert_eq!(seen[4]["data"].as_str().map(str::len), Some(3000));
    let presence = client.next_frame(WAIT).await.unwrap().unwrap();
    assert_eq!(presence["op"], "presence");
    assert!(client.next_frame(QUIET).await.unwrap().is_none());
}

#[tokio::test]
async fn concurrent_requests_get_their_own_replies() {
    let (client, _) = connected_client().await;
    let client = Arc::new(client);
    let tasks: Vec<_> = (0..20)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move {
                let reply = client
                    .request(json!({"op": format!("op{n}")}))
                    .await
                    .unwrap();
                assert_eq!(reply["op"], "ok");
                reply["id"].as_u64().unwrap()
            })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap());
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 20);
    for _ in 0..20 {
        let message = client.recv_op("message", WAIT).await.unwrap();
        assert!(message["data"].as_str().unwrap().starts_with("op"));
    }
}

#[tokio::test]
async fn a_late_reply_is_queued_not_lost() {
    let (client, _) = connected_client().await;
    let err = client
        .request_timeout(json!({"op": "hold"}), QUIET)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Timeout(_)), "{err:?}");
    let release = client.request(json!({"op": "release"})).await.unwrap();
    assert_eq!(release, json!({"op": "ok", "id": 3}));
    let late = client.next_frame(WAIT).await.unwrap().unwrap();
    assert_eq!(late, json!({"op": "ok", "id": 2, "late": true}));
}

#[tokio::test]
async fn closed_reports_the_disconnect_frame_and_the_close_code() {
    let (client, _) = connected_client().await;
    client.request(json!({"op": "publish"})).await.unwrap();
    let err = client.request(json!({"op": "bye"})).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Closed { code: Some(4009), reason } if reason == "slow consumer"),
        "{err:?}"
    );

    let (disconnect, code, reason) = client.closed(WAIT).await.unwrap();
    let disconnect = disconnect.expect("disconnect frame");
    assert_eq!(disconnect["op"], "disconnect");
    assert_eq!(disconnect["code"], 4009);
    assert_eq!(code, Some(4009));
    assert_eq!(reason, "slow consumer");
    assert!(client.is_closed());

    // Frames received before the close are still there, then the close.
    let message = client.next_frame(WAIT).await.unwrap().unwrap();
    assert_eq!(message["data"], "publish");
    assert!(matches!(
        client.next_frame(WAIT).await,
        Err(ClientError::Closed {
            code: Some(4009),
            ..
        })
    ));
    assert!(matches!(
        client.send_text("{}").await,
        Err(ClientError::Closed {
            code: Some(4009),
            ..
        })
    ));
    // Closing an already closed connection is fine.
    client.close().await.unwrap();
}

#[tokio::test]
async fn closed_times_out_while_the_connection_is_open() {
    let (client, _) = connected_client().await;
    assert!(matches!(
        client.closed(QUIET).await,
        Err(ClientError::Timeout(_))
    ));
    // The wait consumed nothing.
    client.request(json!({"op": "two"})).await.unwrap();
    assert_eq!(
        client.next_frame(WAIT).await.unwrap().unwrap()["op"],
        "presence"
    );
}

#[tokio::test]
async fn garbage_text_can_be_sent() {
    let (client, _) = connected_client().await;
    client.send_text("this is {not json").await.unwrap();
    let error = client.recv_op("error", WAIT).await.unwrap();
    assert_eq!(error["code"], "bad_request");
    assert!(error.get("id").is_none());
    let pong = client.request(json!({"op": "ping"})).await.unwrap();
    assert_eq!(pong["op"], "pong");
}

#[tokio::test]
async fn binary_frames_reach_the_server() {
    let (client, _) = connected_client().await;
    client.send_binary(&[0, 1, 2]).await.unwrap();
    let (disconnect, code, reason) = client.closed(WAIT).await.unwrap();
    assert!(disconnect.is_none());
    assert_eq!(code, Some(1003));
    assert_eq!(reason, "binary frames are not allowed");
}

#[tokio::test]
async fn fragmented_messages_are_reassembled() {
    let (client, _) = connected_client().await;
    client.request(json!({"op": "frag"})).await.unwrap();
    let message = client.recv_op("message", WAIT).await.unwrap();
    assert_eq!(message["data"].as_str().unwrap().len(), 3000);
}

#[tokio::test]
async fn server_pings_are_answered() {
    let (client, _) = connected_client().await;
    let reply = client.request(json!({"op": "pingme"})).await.unwrap();
    assert_eq!(reply["ponged"], true);
}

#[tokio::test]
async fn close_completes_the_closing_handshake() {
    let (client, _) = connected_client().await;
    client.close().await.unwrap();
}

#[tokio::test]
async fn connect_refused_with_an_error_reply() {
    let base = start().await;
    let err = Client::connect(&format!("{base}/ws"), "bad")
        .await
        .unwrap_err();
    match err {
        ClientError::Protocol(message) => assert_eq!(message, "unauthorized: bad token"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn connect_refused_with_a_disconnect() {
    let base = start().await;
    let err = Client::connect(&format!("{base}/ws"), "kick")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Closed { code: Some(4001), reason } if reason == "unauthorized"),
        "{err:?}"
    );
}

#[tokio::test]
async fn open_sends_nothing_and_reports_http_rejections() {
    let base = start().await;
    let client = Client::open(&format!("{base}/ws?token=abc")).await.unwrap();
    assert!(client.next_frame(QUIET).await.unwrap().is_none());
    let connected = client
        .request(json!({"op": "connect", "token": "good"}))
        .await
        .unwrap();
    assert_eq!(connected["op"], "connected");

    let err = Client::open(&format!("{base}/forbidden"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Rejected { status: 403 }),
        "{err:?}"
    );
    // wss:// without TLS settings fails before any lookup or connect.
    let err = Client::open("wss://example.invalid/ws").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Connect(m) if m.contains("needs TLS settings")),
        "{err:?}"
    );
}

#[tokio::test]
async fn requests_must_be_objects_with_an_op() {
    let (client, _) = connected_client().await;
    for bad in [json!([1]), json!({"room": "chat:lobby"}), json!({"op": 1})] {
        assert!(matches!(
            client.request(bad).await,
            Err(ClientError::Protocol(_))
        ));
    }
}

// The whole of 127.0.0.0/8 is local only on Linux.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn connections_can_come_from_another_loopback_address() {
    let base = start().await;
    let from = "127.0.0.2".parse().unwrap();
    let (client, connected) = Client::connect_from(&format!("{base}/ws"), "good", Some(from))
        .await
        .unwrap();
    assert_eq!(client.local_addr().ip(), from);
    assert_eq!(connected["peer"], "127.0.0.2");
}
