//! The SSE transport, for networks that block WebSockets: `GET /sse` opens
//! a Server-Sent Events stream carrying the frames `/ws` would carry, and
//! the client sends its requests with `POST /sse/send?conn=...` to any edge.
//!
//! An SSE connection is an ordinary session on one end of a socket pair: the
//! session, its reader and the delivery path keep working on one descriptor
//! of WebSocket frames. A relay task holds the other end. It turns the
//! session's frames into events of the HTTP stream (text frames into `data:`
//! events, pings into `: ping` comments, answered with a pong so the session
//! knows the relay is there), and writes the posted frames into the pair as
//! the masked text frames a client would send.
//!
//! The relay reads the pair only as fast as the HTTP body is taken, so a
//! client that reads slowly fills the session's queue like any slow
//! WebSocket client (4009). A client that vanished without closing leaves
//! heartbeats unacknowledged on its socket: TCP_USER_TIMEOUT (the idle
//! timeout, set on every client socket by `transport::serve`) aborts it, the stream's next write fails, and the relay, seeing
//! the body dropped, ends the session.
//!
//! A post that lands on another edge than its stream's is forwarded to that
//! edge over the broker (`Control::Frames` on its control subject), whose
//! answer decides the HTTP status.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes, BytesMut};
use herald_broker::BrokerError;
use herald_wire::frames::{self, disconnect_frame};
use herald_wire::presence::{Control, FramesAck};
use herald_wire::{CloseCode, subjects};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::framing::{OP_CLOSE, OP_PING, OP_PONG, OP_TEXT};
use crate::{Edge, session};

/// Events waiting for one stream's HTTP body. Small: the session's own
/// queue is where a slow client's backlog is counted and bounded.
const EVENTS_QUEUE: usize = 16;

/// Posts (each a run of frames) waiting to go into one session; a post
/// beyond that is refused with 429.
const POSTS_QUEUE: usize = 8;

/// How long a post forwarded to another edge waits for its answer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);

/// Bytes the relay asks for per read of the pair.
const READ_CHUNK: usize = 8 * 1024;

/// A read buffer larger than this is freed once empty: one large frame
/// must not cost a stream that much for the rest of its life.
const KEEP_BUFFER: usize = 64 * 1024;

/// After its session ended, how long the relay still reads the pair for
/// the last frames (the `disconnect`) before it ends the stream.
const LAST_FRAMES_GRACE: Duration = Duration::from_secs(1);

/// This edge's SSE streams by connection number, for the frames their
/// clients post.
#[derive(Default)]
pub(crate) struct Streams {
    by_id: Mutex<HashMap<u64, Stream>>,
}

struct Stream {
    user: String,
    posts: mpsc::Sender<Vec<String>>,
}

/// Hands posted `frames` to this edge's SSE connection `conn`, if it is
/// `user`'s.
pub(crate) fn take_frames(edge: &Edge, conn: &str, user: &str, frames: Vec<String>) -> FramesAck {
    let id = match split_conn(conn) {
        Some((node, id)) if node == edge.config.node_id => id,
        _ => return FramesAck::UnknownConn,
    };
    let streams = edge.sse.by_id.lock().expect("sse streams");
    let Some(stream) = streams.get(&id) else {
        return FramesAck::UnknownConn;
    };
    if stream.user != user {
        return FramesAck::WrongUser;
    }
    match stream.posts.try_send(frames) {
        Ok(()) => FramesAck::Accepted,
        Err(mpsc::error::TrySendError::Full(_)) => FramesAck::Busy,
        Err(mpsc::error::TrySendError::Closed(_)) => FramesAck::UnknownConn,
    }
}

/// A connection id's edge and number (`{node}-{n}`; node ids may hold `-`).
fn split_conn(conn: &str) -> Option<(&str, u64)> {
    let (node, n) = conn.rsplit_once('-')?;
    Some((node, n.parse().ok()?))
}

/// The token of an `Authorization: Bearer` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

fn plain(status: StatusCode, message: impl Into<String>) -> Response {
    let mut message = message.into();
    message.push('\n');
    (status, message).into_response()
}

fn unauthorized(message: impl Into<String>) -> Response {
    let mut response = plain(StatusCode::UNAUTHORIZED, message);
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

#[derive(Deserialize)]
pub(crate) struct StreamParams {
    token: Option<String>,
}

/// `GET /sse?token=JWT`: the token is checked here, so that a refused
/// client gets a plain 401 (an `EventSource` then stops retrying) rather
/// than a stream that ends at once.
pub(crate) async fn stream_handler(
    State(edge): State<Arc<Edge>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<StreamParams>,
    headers: HeaderMap,
) -> Response {
    if edge.shutdown.is_cancelled() {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "this edge is shutting down; connect to another one",
        );
    }
    let Some(token) = params.token.as_deref().or_else(|| bearer(&headers)) else {
        return unauthorized("give a token: GET /sse?token=<jwt>");
    };
    let claims = match edge.config.verifier.verify_fresh(token).await {
        Ok(claims) => claims,
        Err(e) => return unauthorized(format!("token refused: {e}")),
    };
    let ticket = match edge
        .admission
        .admit(edge.sessions.len(), peer, &headers, true)
    {
        Ok(ticket) => ticket,
        Err(refused) => return crate::transport::busy(refused),
    };
    let (session_end, relay_end) = match UnixStream::pair() {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(error = %e, "could not open a socket pair for an SSE stream");
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("this edge cannot open a stream now ({e}); retry"),
            );
        }
    };
    let id = edge.next_conn.fetch_add(1, Ordering::Relaxed);
    let (posts_tx, posts_rx) = mpsc::channel(POSTS_QUEUE);
    let (events_tx, mut events_rx) = mpsc::channel(EVENTS_QUEUE);
    // Registered before the session can announce its id: a post may follow
    // the `connected` event at once.
    edge.sse.by_id.lock().expect("sse streams").insert(
        id,
        Stream {
            user: claims.sub.clone(),
            posts: posts_tx,
        },
    );
    let session_over = CancellationToken::new();
    let over_when_done = session_over.clone().drop_guard();
    let relayed = Box::new(session::Relayed {
        edge: edge.clone(),
        socket: session_end,
        id,
        claims,
        peer,
        held: ticket.address.map(|a| Box::new(a) as crate::delivery::Held),
    });
    // The session's future is made inside the task, not moved into it: a
    // moved-in future would be kept twice in the task's memory.
    edge.sessions.spawn(async move {
        let _over_when_done = over_when_done;
        session::serve_relayed(relayed).await;
    });
    let relay = Relay::new(relay_end, events_tx, session_over);
    tokio::spawn({
        let edge = edge.clone();
        async move {
            relay.run(posts_rx).await;
            edge.sse.by_id.lock().expect("sse streams").remove(&id);
        }
    });
    let events = futures::stream::poll_fn(move |cx| {
        events_rx
            .poll_recv(cx)
            .map(|event| event.map(Ok::<_, Infallible>))
    });
    let mut response = Sse::new(events).into_response();
    // Proxies that buffer responses (nginx) would hold events back.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The relay between a session's end of the pair and the HTTP stream.
struct Relay {
    pair: UnixStream,
    /// What was read from the pair and is not a whole frame yet.
    buf: BytesMut,
    /// Client frames (posted, pongs) the pair has not taken yet. Written
    /// as the pair takes them, never waited for: a session replaying
    /// history waits for the relay to read, and must not find it waiting
    /// for the session to read.
    out: Vec<u8>,
    events: mpsc::Sender<Event>,
    session_over: CancellationToken,
    /// The last text frame was a `disconnect`.
    said_goodbye: bool,
}

impl Relay {
    fn new(
        pair: UnixStream,
        events: mpsc::Sender<Event>,
        session_over: CancellationToken,
    ) -> Relay {
        Relay {
            pair,
            buf: BytesMut::new(),
            out: Vec::new(),
            events,
            session_over,
            said_goodbye: false,
        }
    }

    /// Runs until the session or the HTTP stream ends; ending, it drops the
    /// pair, which ends the other.
    async fn run(mut self, mut posts: mpsc::Receiver<Vec<String>>) {
        let mut grace_until = None;
        loop {
            while let Some((opcode, payload)) = next_frame(&mut self.buf) {
                if !self.relay_frame(opcode, payload).await {
                    return;
                }
            }
            if self.buf.is_empty() && self.buf.capacity() > KEEP_BUFFER {
                self.buf = BytesMut::new();
            }
            self.buf.reserve(READ_CHUNK);
            let grace = async move {
                match grace_until {
                    Some(until) => tokio::time::sleep_until(until).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ready = self.pair.readable() => {
                    if ready.is_err() {
                        return;
                    }
                    match self.pair.try_read_buf(&mut self.buf) {
                        Ok(0) => return,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
                ready = self.pair.writable(), if !self.out.is_empty() => {
                    if ready.is_err() || !self.write_some() {
                        return;
                    }
                }
                // One post at a time: what waits beyond it waits in the
                // bounded queue of posts, not here.
                Some(frames) = posts.recv(), if self.out.is_empty() => {
                    for frame in &frames {
                        encode_client_frame(&mut self.out, OP_TEXT, frame.as_bytes());
                    }
                    if !self.write_some() {
                        return;
                    }
                }
                _ = self.events.closed() => {
                    // The client closed the stream (or its socket failed):
                    // a close from "the client" ends the session as a
                    // WebSocket client's would. Dropping the pair would
                    // too; the close is a courtesy, not waited for.
                    let mut close = 1000u16.to_be_bytes().to_vec();
                    close.extend_from_slice(b"the event stream was closed");
                    encode_client_frame(&mut self.out, OP_CLOSE, &close);
                    let _ = self.write_some();
                    return;
                }
                _ = self.session_over.cancelled(), if grace_until.is_none() => {
                    // The session's last frames may not have been read yet.
                    grace_until = Some(tokio::time::Instant::now() + LAST_FRAMES_GRACE);
                }
                _ = grace => return,
            }
        }
    }

    /// Passes one of the session's frames on; `false` ends the relay.
    async fn relay_frame(&mut self, opcode: u8, payload: Bytes) -> bool {
        match opcode {
            OP_TEXT => {
                let Ok(text) = std::str::from_utf8(&payload) else {
                    tracing::warn!("a session wrote a text frame that is not UTF-8; dropped");
                    return true;
                };
                self.said_goodbye = text.starts_with(r#"{"op":"disconnect""#);
                self.emit(Event::default().data(text)).await
            }
            OP_PING => {
                encode_client_frame(&mut self.out, OP_PONG, &payload);
                self.write_some() && self.emit(Event::default().comment("ping")).await
            }
            OP_CLOSE => {
                // Every close the session starts follows a `disconnect`; a
                // close without one still tells the client why.
                if !self.said_goodbye && payload.len() >= 2 {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    let code = CloseCode::from_code(code)
                        .or_else(|| CloseCode::application(code))
                        .unwrap_or(CloseCode::Normal);
                    let reason = String::from_utf8_lossy(&payload[2..]);
                    let goodbye = disconnect_frame(code, &reason, code.reconnect(), None);
                    let text = std::str::from_utf8(&goodbye).expect("JSON is UTF-8");
                    self.emit(Event::default().data(text)).await;
                }
                false
            }
            _ => true,
        }
    }

    /// Queues an event for the HTTP body; `false` when the stream is gone,
    /// or the session ended while the client was not taking events.
    async fn emit(&self, event: Event) -> bool {
        tokio::select! {
            biased;
            sent = self.events.send(event) => sent.is_ok(),
            _ = self.session_over.cancelled() => false,
        }
    }

    /// Writes what of `out` the pair takes now; `false` when the session's
    /// end is gone.
    fn write_some(&mut self) -> bool {
        while !self.out.is_empty() {
            match self.pair.try_write(&self.out) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return false,
            }
        }
        if self.out.is_empty() && self.out.capacity() > KEEP_BUFFER {
            self.out = Vec::new();
        }
        true
    }
}

/// The next whole frame at the front of `buf`, taken off it. The session
/// writes unmasked, unfragmented frames (`framing::encode_frame`).
fn next_frame(buf: &mut BytesMut) -> Option<(u8, Bytes)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let (len, header) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n) as usize, 10)
        }
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if buf.len() < header + len {
        buf.reserve(header + len - buf.len());
        return None;
    }
    buf.advance(header);
    Some((opcode, buf.split_to(len).freeze()))
}

/// Appends a frame as a client sends it: masked, as the session's reader
/// requires. The mask is all zeros: it guards against cache poisoning by
/// proxies on the way, and there are none inside a socket pair.
fn encode_client_frame(buf: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    buf.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        buf.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        buf.push(0x80 | 126);
        buf.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        buf.push(0x80 | 127);
        buf.extend_from_slice(&(len as u64).to_be_bytes());
    }
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(payload);
}

#[derive(Deserialize)]
pub(crate) struct SendParams {
    conn: Option<String>,
}

/// `POST /sse/send?conn=CONN`, `Authorization: Bearer JWT`: one frame or an
/// array of frames for SSE connection `conn`, on whichever edge it lives.
/// The answers to the frames arrive on the stream; the status only says
/// whether they were taken.
pub(crate) async fn send_handler(
    State(edge): State<Arc<Edge>>,
    Query(params): Query<SendParams>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(token) = bearer(&headers) else {
        return unauthorized("give the stream's token: Authorization: Bearer <jwt>");
    };
    let claims = match edge.config.verifier.verify_fresh(token).await {
        Ok(claims) => claims,
        Err(e) => return unauthorized(format!("token refused: {e}")),
    };
    let Some(conn) = params.conn else {
        return plain(
            StatusCode::BAD_REQUEST,
            "name the stream: POST /sse/send?conn=<conn from its connected event>",
        );
    };
    let max = edge.config.max_message_bytes;
    let body = match Limited::new(body, max).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than this server accepts ({max} bytes)"),
            );
        }
        Err(e) => {
            return plain(
                StatusCode::BAD_REQUEST,
                format!("the body could not be read: {e}"),
            );
        }
    };
    let frames = match frames::posted(&body) {
        Ok(frames) => frames,
        Err(why) => return plain(StatusCode::BAD_REQUEST, why),
    };
    let ack = match split_conn(&conn) {
        None => FramesAck::UnknownConn,
        Some((node, _)) if node == edge.config.node_id => {
            take_frames(&edge, &conn, &claims.sub, frames)
        }
        Some((node, _)) => match forward(&edge, node, &conn, claims.sub, frames).await {
            Ok(ack) => ack,
            Err(response) => return response,
        },
    };
    match ack {
        FramesAck::Accepted => StatusCode::ACCEPTED.into_response(),
        FramesAck::UnknownConn => plain(
            StatusCode::NOT_FOUND,
            format!("no open SSE stream {conn}; open a new one"),
        ),
        FramesAck::WrongUser => plain(
            StatusCode::FORBIDDEN,
            format!("stream {conn} belongs to another user"),
        ),
        FramesAck::Busy => {
            let mut response = plain(
                StatusCode::TOO_MANY_REQUESTS,
                format!("too many posts wait for stream {conn}; retry shortly"),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

/// Sends posted frames to the edge holding the stream; an edge that does
/// not answer holds no stream (any more).
async fn forward(
    edge: &Edge,
    node: &str,
    conn: &str,
    user: String,
    frames: Vec<String>,
) -> Result<FramesAck, Response> {
    let control = Control::Frames {
        conn: conn.to_string(),
        user,
        frames,
    };
    let payload = Bytes::from(serde_json::to_vec(&control).expect("control serializes"));
    let subject = subjects::node_control(node);
    let answer = match herald_broker::trace_headers(&tracing::Span::current()) {
        Some(headers) => {
            edge.broker
                .request_with_headers(subject, headers, payload, FORWARD_TIMEOUT)
                .await
        }
        None => edge.broker.request(subject, payload, FORWARD_TIMEOUT).await,
    };
    match answer {
        Ok(answer) => serde_json::from_slice(&answer).map_err(|e| {
            tracing::warn!(node, error = %e, "an edge answered forwarded SSE frames unreadably");
            plain(
                StatusCode::BAD_GATEWAY,
                format!("edge {node} gave an answer this edge cannot read"),
            )
        }),
        Err(BrokerError::NoResponders(_) | BrokerError::Timeout(_)) => Err(plain(
            StatusCode::NOT_FOUND,
            format!("no open SSE stream {conn}: its edge {node} does not answer; open a new one"),
        )),
        Err(e) => {
            tracing::warn!(node, error = %herald_broker::chain(&e), "could not forward SSE frames");
            Err(plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the frames could not be forwarded to edge {node} now ({e}); retry"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::encode_frame;

    #[test]
    fn connection_ids_split_at_the_last_dash() {
        assert_eq!(split_conn("edge-0-17"), Some(("edge-0", 17)));
        assert_eq!(split_conn("e1-3"), Some(("e1", 3)));
        assert_eq!(split_conn("e1-x"), None);
        assert_eq!(split_conn("e1"), None);
    }

    #[test]
    fn server_frames_are_taken_whole_however_they_arrive() {
        let mut wire = Vec::new();
        encode_frame(&mut wire, OP_TEXT, br#"{"op":"ok","id":1}"#);
        encode_frame(&mut wire, OP_PING, b"");
        encode_frame(&mut wire, OP_TEXT, &[b'a'; 300]);
        encode_frame(&mut wire, OP_TEXT, &vec![b'b'; 70_000]);
        let expected = [
            (OP_TEXT, 18),
            (OP_PING, 0),
            (OP_TEXT, 300),
            (OP_TEXT, 70_000),
        ];
        for step in [1, 3, 1000, wire.len()] {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(step) {
                buf.extend_from_slice(chunk);
                while let Some((op, payload)) = next_frame(&mut buf) {
                    got.push((op, payload.len()));
                }
            }
            assert_eq!(got, expected, "in chunks of {step}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn client_frames_carry_the_mask_bit_and_every_length_form() {
        for len in [0usize, 125, 126, 65_535, 65_536] {
            let payload = vec![b'x'; len];
            let mut masked = Vec::new();
            encode_client_frame(&mut masked, OP_TEXT, &payload);
            let mut plain = Vec::new();
            encode_frame(&mut plain, OP_TEXT, &payload);
            let header = plain.len() - len;
            assert_eq!(masked[0], plain[0]);
            assert_eq!(masked[1], plain[1] | 0x80, "length {len}");
            assert_eq!(masked[2..header], plain[2..header]);
            assert_eq!(masked[header..header + 4], [0; 4]);
            assert_eq!(masked[header + 4..], payload[..]);
        }
    }

    /// The relay between a fake session (this test, on its end of the
    /// pair) and the HTTP body of the stream.
    #[tokio::test]
    async fn the_relay_turns_frames_into_events_and_posts_into_client_frames() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut session, relay_end) = UnixStream::pair().unwrap();
        let (posts_tx, posts_rx) = mpsc::channel(POSTS_QUEUE);
        let (events_tx, mut events_rx) = mpsc::channel(EVENTS_QUEUE);
        let relay = Relay::new(relay_end, events_tx, CancellationToken::new());
        let relay = tokio::spawn(relay.run(posts_rx));

        // Several frames in one write, as a batch of deliveries leaves them.
        let mut wire = Vec::new();
        encode_frame(&mut wire, OP_TEXT, br#"{"op":"connected"}"#);
        encode_frame(&mut wire, OP_PING, b"hb");
        encode_frame(
            &mut wire,
            OP_TEXT,
            b"{\"op\":\"message\",\"data\":{\n\"a\":1}}",
        );
        session.write_all(&wire).await.unwrap();
        let mut pong = [0u8; 8];
        session.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong, [0x80 | OP_PONG, 0x80 | 2, 0, 0, 0, 0, b'h', b'b']);

        posts_tx
            .send(vec![r#"{"op":"ping","id":1}"#.into(), "{}".into()])
            .await
            .unwrap();
        let mut posted = Vec::new();
        encode_client_frame(&mut posted, OP_TEXT, br#"{"op":"ping","id":1}"#);
        encode_client_frame(&mut posted, OP_TEXT, b"{}");
        let mut got = vec![0u8; posted.len()];
        session.read_exact(&mut got).await.unwrap();
        assert_eq!(got, posted);

        // A close the session did not announce still ends with a `disconnect`.
        let mut close = Vec::new();
        encode_frame(&mut close, OP_CLOSE, &[0x0f, 0xa9, b'b', b'y', b'e']);
        session.write_all(&close).await.unwrap();
        relay.await.unwrap();

        let mut text = String::new();
        while let Some(event) = events_rx.recv().await {
            let body = Sse::new(futures::stream::iter([Ok::<_, Infallible>(event)]))
                .into_response()
                .into_body();
            let bytes = body.collect().await.unwrap().to_bytes();
            text.push_str(std::str::from_utf8(&bytes).unwrap());
        }
        assert_eq!(
            text,
            concat!(
                "data: {\"op\":\"connected\"}\n\n",
                ": ping\n\n",
                "data: {\"op\":\"message\",\"data\":{\n",
                "data: \"a\":1}}\n\n",
                "data: {\"op\":\"disconnect\",\"code\":4009,\"reason\":\"bye\",\"reconnect\":true}\n\n",
            )
        );
        // Ending, the relay let go of the pair: the session sees the end.
        assert_eq!(session.read(&mut [0u8; 8]).await.unwrap(), 0);
    }

    /// Posts the session does not read yet never stop the session's frames
    /// from reaching the stream (a session replaying history waits for them
    /// to be read before it reads again).
    #[tokio::test]
    async fn posts_waiting_for_the_session_do_not_hold_its_frames_back() {
        use tokio::io::AsyncWriteExt;
        let (mut session, relay_end) = UnixStream::pair().unwrap();
        let (posts_tx, posts_rx) = mpsc::channel(POSTS_QUEUE);
        let (events_tx, mut events_rx) = mpsc::channel(EVENTS_QUEUE);
        let relay = Relay::new(relay_end, events_tx, CancellationToken::new());
        tokio::spawn(relay.run(posts_rx));
        // More than a socket pair holds, none of it read by the session.
        let big = format!(r#"{{"op":"ping","pad":"{}"}}"#, "x".repeat(60_000));
        for _ in 0..POSTS_QUEUE {
            posts_tx.send(vec![big.clone(); 4]).await.unwrap();
        }
        let mut wire = Vec::new();
        encode_frame(&mut wire, OP_TEXT, br#"{"op":"message"}"#);
        let wire = wire.repeat(200);
        let writer = tokio::spawn(async move {
            session.write_all(&wire).await.unwrap();
            session
        });
        for _ in 0..200 {
            let event = tokio::time::timeout(Duration::from_secs(5), events_rx.recv()).await;
            assert!(
                event.expect("the session's frames keep flowing").is_some(),
                "the stream ended"
            );
        }
        drop(writer.await.unwrap());
    }

    /// A stream whose client went away ends its session as a client's close would.
    #[tokio::test]
    async fn a_closed_stream_closes_the_session() {
        use tokio::io::AsyncReadExt;
        let (mut session, relay_end) = UnixStream::pair().unwrap();
        let (_posts_tx, posts_rx) = mpsc::channel(POSTS_QUEUE);
        let (events_tx, events_rx) = mpsc::channel(EVENTS_QUEUE);
        let relay = Relay::new(relay_end, events_tx, CancellationToken::new());
        let relay = tokio::spawn(relay.run(posts_rx));
        drop(events_rx);
        relay.await.unwrap();
        let mut got = Vec::new();
        session.read_to_end(&mut got).await.unwrap();
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"the event stream was closed");
        let mut expected = Vec::new();
        encode_client_frame(&mut expected, OP_CLOSE, &close);
        assert_eq!(got, expected);
    }

    #[test]
    fn bearer_tokens_are_read_whatever_the_scheme_case() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }
}
