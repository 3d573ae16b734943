//! The client's side of the WebSocket opening handshake, against a server
//! written into each test as raw bytes on a TCP socket: how the response
//! head arrives (all at once, a byte at a time, with the first frame behind
//! it) and what the client refuses.

use std::ops::ControlFlow;
use std::time::Duration;

use herald_client::ClientError;
use herald_client::transport::{
    CloseInfo, Message, Options, open_websocket, open_websocket_with, read_messages,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(5);

/// Accepts one connection, reads the request's head, and returns it with the socket.
async fn accept_request(listener: &TcpListener) -> (TcpStream, String) {
    let (mut socket, _) = listener.accept().await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(
            socket.read(&mut byte).await.unwrap(),
            1,
            "request cut short"
        );
        head.push(byte[0]);
    }
    (socket, String::from_utf8(head).unwrap())
}

const SWITCHING: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\nSec-WebSocket-Protocol: herald.v1\r\n\r\n";

/// An unmasked text frame, as a server sends it.
fn text_frame(text: &str) -> Vec<u8> {
    assert!(text.len() < 126);
    let mut frame = vec![0x81, text.len() as u8];
    frame.extend_from_slice(text.as_bytes());
    frame
}

/// The first text message of an opened socket.
async fn first_text(url: &str, listener_side: impl Future<Output = ()>) -> String {
    let (opened, ()) = tokio::join!(open_websocket(url, None, Some("herald.v1")), listener_side);
    let mut opened = opened.unwrap();
    assert_eq!(opened.protocol.as_deref(), Some("herald.v1"));
    let (writer, _commands) = mpsc::unbounded_channel();
    let mut got = None;
    tokio::time::timeout(
        WAIT,
        read_messages(&mut opened.reader, &writer, None, |message| {
            if let Message::Text(text) = message {
                got = Some(String::from_utf8_lossy(text).into_owned());
            }
            ControlFlow::Break(CloseInfo {
                code: None,
                reason: String::new(),
            })
        }),
    )
    .await
    .expect("no message");
    got.expect("a text message")
}

async fn listen() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws?x=1", listener.local_addr().unwrap());
    (listener, url)
}

#[tokio::test]
async fn a_frame_in_the_same_write_as_the_head_is_read_as_the_first_message() {
    let (listener, url) = listen().await;
    let text = first_text(&url, async {
        let (mut socket, request) = accept_request(&listener).await;
        assert!(request.starts_with("GET /ws?x=1 HTTP/1.1\r\n"), "{request}");
        for header in [
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Protocol: herald.v1",
        ] {
            assert!(request.contains(header), "{header} missing from {request}");
        }
        let mut bytes = SWITCHING.to_vec();
        bytes.extend(text_frame("0{\"sid\":\"a\"}"));
        socket.write_all(&bytes).await.unwrap();
        // Keep the socket open until the client has read.
        tokio::spawn(async move {
            let mut rest = Vec::new();
            let _ = socket.read_to_end(&mut rest).await;
        });
    })
    .await;
    assert_eq!(text, "0{\"sid\":\"a\"}");
}

#[tokio::test]
async fn a_head_arriving_a_byte_at_a_time_is_put_together() {
    let (listener, url) = listen().await;
    let text = first_text(&url, async {
        let (mut socket, _) = accept_request(&listener).await;
        socket.set_nodelay(true).unwrap();
        let mut bytes = SWITCHING.to_vec();
        bytes.extend(text_frame("hello"));
        tokio::spawn(async move {
            for byte in bytes {
                socket.write_all(&[byte]).await.unwrap();
                tokio::task::yield_now().await;
            }
            let mut rest = Vec::new();
            let _ = socket.read_to_end(&mut rest).await;
        });
    })
    .await;
    assert_eq!(text, "hello");
}

/// Opens against a server answering `response`, and returns the error.
async fn refused(response: &'static [u8], options: Options) -> ClientError {
    let (listener, url) = listen().await;
    tokio::spawn(async move {
        let (mut socket, _) = accept_request(&listener).await;
        socket.write_all(response).await.unwrap();
        let mut rest = Vec::new();
        let _ = socket.read_to_end(&mut rest).await;
    });
    match tokio::time::timeout(WAIT, open_websocket_with(&url, None, None, &options))
        .await
        .expect("the opening hung")
    {
        Ok(_) => panic!("opened despite {:?}", String::from_utf8_lossy(response)),
        Err(e) => e,
    }
}

#[tokio::test]
async fn a_status_other_than_101_is_a_rejection_with_that_status() {
    let e = refused(
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nforbidden",
        Options::default(),
    )
    .await;
    assert!(matches!(e, ClientError::Rejected { status: 403 }), "{e:?}");
}

#[tokio::test]
async fn a_101_without_the_upgrade_headers_is_refused() {
    let e = refused(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n",
        Options::default(),
    )
    .await;
    assert!(
        matches!(&e, ClientError::Connect(m) if m.contains("Upgrade: websocket")),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_response_that_is_not_http_or_is_cut_short_is_refused() {
    let e = refused(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", Options::default()).await;
    assert!(
        matches!(&e, ClientError::Connect(m) if m.starts_with("upgrade response")),
        "{e:?}"
    );
    let (listener, url) = listen().await;
    tokio::spawn(async move {
        let (mut socket, _) = accept_request(&listener).await;
        socket.write_all(b"HTTP/1.1 101 Switch").await.unwrap();
    });
    let e = open_websocket(&url, None, None).await.err().unwrap();
    assert!(
        matches!(&e, ClientError::Connect(m) if m.contains("closed the connection")),
        "{e:?}"
    );
}

#[tokio::test]
async fn an_origin_with_a_line_break_is_not_sent() {
    let (listener, url) = listen().await;
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut received = Vec::new();
        socket.read_to_end(&mut received).await.unwrap();
        received
    });
    let options = Options {
        origin: Some("https://a.example\r\nX-Injected: 1".into()),
        ..Options::default()
    };
    let e = open_websocket_with(&url, None, None, &options)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&e, ClientError::Connect(m) if m.contains("line break")),
        "{e:?}"
    );
    let received = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    assert!(
        received.is_empty(),
        "the server got {:?}",
        String::from_utf8_lossy(&received)
    );
}
