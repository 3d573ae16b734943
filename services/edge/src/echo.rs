//! A WebSocket echo server built from the edge's own parts: its HTTP/1.1
//! server and upgrade (`transport`), its frame reader and size limit
//! (`framing`) and its writer (`delivery`). It exists for the conformance
//! suite (`scripts/autobahn.sh`, the Autobahn cases, run by the `echo`
//! example), so that what passes there is what Herald's clients meet, not a
//! separate implementation. Unlike the edge it echoes binary messages, which
//! Herald's protocol refuses. It is no part of a running Herald.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fastwebsockets::upgrade::{IncomingUpgrade, UpgradeFut};
use tokio::io::Interest;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::delivery::{Out, Outbox};
use crate::framing::{Incoming, Reader};
use crate::transport;

/// Frames that may wait for one connection (the edge's default). The echo
/// reads no further while its socket is full, so at most one read's worth
/// of messages waits.
const QUEUE: usize = 1024;

/// How long a closing connection may take to accept the last frames, as in
/// the edge.
const FLUSH: Duration = Duration::from_secs(5);

/// Serves a WebSocket echo on every path of `listener`, forever: each text
/// or binary message comes back as it came (a message over
/// `max_message_bytes` closes with 1009, as the edge does), pings are
/// answered and closes echoed.
pub async fn serve(listener: TcpListener, max_message_bytes: usize) {
    let app = Router::new()
        .fallback(upgrade)
        .with_state(max_message_bytes);
    // The keepalive and unacknowledged-data limit are the edge's defaults
    // (heartbeat, idle timeout); no TLS.
    transport::serve(
        listener,
        app,
        Duration::from_secs(25),
        Duration::from_secs(60),
        None,
        CancellationToken::new(),
    )
    .await;
}

async fn upgrade(State(max_message_bytes): State<usize>, upgrade: IncomingUpgrade) -> Response {
    match upgrade.upgrade() {
        Ok((response, upgraded)) => {
            tokio::spawn(echo(upgraded, max_message_bytes));
            response.into_response()
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            format!("WebSocket upgrade failed: {e}\n"),
        )
            .into_response(),
    }
}

/// One connection, read and written exactly as the edge's sessions are.
async fn echo(upgraded: UpgradeFut, max_message_bytes: usize) {
    let Ok(ws) = upgraded.await else { return };
    let Ok((socket, already_read)) = transport::into_socket(ws.into_inner().into_inner()) else {
        tracing::error!("an upgraded connection is not a socket; closed");
        return;
    };
    // Connection ids name sessions in the edge's tables; the echo has none.
    let outbox = Outbox::new(0, socket, QUEUE);
    let mut reader = Reader::new(max_message_bytes, &already_read, &outbox);
    'serving: loop {
        while let Some(incoming) = reader.take_ready() {
            let out = match incoming {
                Incoming::Text(text) => Out::Text(text.into()),
                Incoming::Binary(data) => Out::Binary(data.into()),
                Incoming::Closed => break 'serving,
                Incoming::Violation(code, reason) => {
                    outbox.push(Out::close(code, reason));
                    break 'serving;
                }
            };
            outbox.push(out);
        }
        // While the socket is full, finish the write before reading more: a
        // client that sends faster than it reads waits for its echoes,
        // rather than growing the queue.
        let stalled = outbox.is_stalled();
        let interest = if stalled {
            Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let Ok(ready) = outbox.stream().ready(interest).await else {
            break;
        };
        if stalled {
            outbox.resume();
        } else if ready.is_readable() || ready.is_read_closed() || ready.is_error() {
            reader.read_once(outbox.stream(), &outbox);
        }
    }
    outbox.finish(FLUSH).await;
}
