//! The edge's HTTP/1.1 server and its WebSocket route, `GET /ws`. It speaks
//! HTTP/1.1 only (WebSocket upgrades need nothing else), so an upgraded
//! connection gives back its plain socket (the `TcpStream`, or with TLS the
//! socket pair's end that `tls` relays), which the session reads (through
//! `framing`) and the delivery path writes without a task of its own.
//! fastwebsockets does the handshake.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use fastwebsockets::upgrade::IncomingUpgrade;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::AllowedOrigins;
use crate::socket::Socket;
use crate::tls::Terminator;
use crate::{Edge, session};

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `router` over HTTP/1.1 on `listener` until `stop`, with TCP
/// keepalive probes after `keepalive` of quiet, then lets each
/// connection finish its request. Upgraded connections live on in their own
/// tasks and are not waited for here. With `tls`, every connection is a
/// TLS connection, served through its relay.
///
/// Data a peer leaves unacknowledged for `unacked` aborts its connection
/// (TCP_USER_TIMEOUT): a client whose network vanished is noticed by the
/// kernel within the idle timeout, even where nothing else asks it for an
/// answer (an SSE stream, whose heartbeats the edge itself answers).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    keepalive: std::time::Duration,
    unacked: std::time::Duration,
    tls: Option<Terminator>,
    stop: CancellationToken,
) {
    let conns = TaskTracker::new();
    // Set once on the listener, whose connections inherit them (Linux
    // copies them as each handshake completes): four system calls fewer per
    // connection, which a reconnect storm pays thousands of times a second.
    // `prepare_listener` has done so already where the edge binds its port;
    // again here for listeners bound elsewhere.
    client_socket_options(&listener, keepalive, unacked);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, mostly: wait a little, keep serving.
                    tracing::warn!(error = %e, "could not accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let router = router.clone();
        let stop = stop.clone();
        match &tls {
            None => conns.spawn(serve_http(stream, peer, router, stop)),
            Some(tls) => {
                let tls = tls.clone();
                conns.spawn(async move {
                    if let Some(relayed) = tls.accept(stream, peer).await {
                        serve_http(relayed, peer, router, stop).await;
                    }
                })
            }
        };
    }
    conns.close();
    conns.wait().await;
}

/// The options of every client socket, set on `listener` for the
/// connections it queues to inherit:
/// - TCP_NODELAY: replies and small frames go out at once; without it,
///   Nagle's algorithm and delayed ACKs hold some of them back ~40 ms.
/// - keepalive after `keepalive` of quiet: keeps NAT mappings alive and ends
///   sockets whose peer vanished before it ever authenticated (the pings
///   cover sessions).
/// - TCP_USER_TIMEOUT of `unacked` (see [`serve`]).
pub(crate) fn client_socket_options(
    listener: &TcpListener,
    keepalive: std::time::Duration,
    unacked: std::time::Duration,
) {
    let socket = socket2::SockRef::from(listener);
    if let Err(e) = socket.set_tcp_nodelay(true) {
        tracing::warn!(error = %e, "TCP_NODELAY not set: small frames may wait ~40 ms for the peer's ACK");
    }
    if let Err(e) = socket.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(keepalive)) {
        tracing::warn!(error = %e, "TCP keepalive not set: a client that vanishes before authenticating holds its socket");
    }
    if let Err(e) = socket.set_tcp_user_timeout(Some(unacked)) {
        tracing::debug!(error = %e, "TCP_USER_TIMEOUT not set; a vanished client is noticed by keepalive only");
    }
}

/// One connection's HTTP, until it ends or is upgraded (the upgraded
/// socket then belongs to its session).
async fn serve_http<S>(stream: S, peer: SocketAddr, router: Router, stop: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let router = router.clone();
        async move {
            Ok::<_, Infallible>(
                router
                    .oneshot(req.map(axum::body::Body::new))
                    .await
                    .unwrap_or_else(|e| match e {}),
            )
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        // A client that never finishes its request headers does not
        // keep a socket (and a file descriptor) for long.
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            // A request half sent is not waited for past this.
            let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, conn).await;
        }
    }
}

/// The socket under an upgraded connection, with the bytes the HTTP
/// server had already read past the request (a client may send its first
/// frame right behind the handshake).
pub fn into_socket(upgraded: Upgraded) -> Result<(Socket, bytes::Bytes), Upgraded> {
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => return Ok((parts.io.into_inner().into(), parts.read_buf)),
        Err(upgraded) => upgraded,
    };
    upgraded
        .downcast::<TokioIo<UnixStream>>()
        .map(|parts| (parts.io.into_inner().into(), parts.read_buf))
}

#[derive(Deserialize)]
pub(crate) struct WsParams {
    token: Option<String>,
}

pub(crate) async fn ws_handler(
    State(edge): State<Arc<Edge>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<WsParams>,
    headers: HeaderMap,
    upgrade: IncomingUpgrade,
) -> Response {
    if edge.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this edge is shutting down; connect to another one\n",
        )
            .into_response();
    }
    if let Some(refused) = origin_refused(edge.config.allowed_origins.as_ref(), &headers) {
        return refused;
    }
    let ticket = match edge
        .admission
        .admit(edge.sessions.len(), peer, &headers, false)
    {
        Ok(ticket) => ticket,
        Err(refused) => return busy(refused),
    };
    let offers_v1 = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "herald.v1");
    let (mut response, upgraded) = match upgrade.upgrade() {
        Ok(u) => u,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("WebSocket upgrade failed: {e}\n"),
            )
                .into_response();
        }
    };
    if offers_v1 {
        response.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("herald.v1"),
        );
    }
    let tracker = edge.sessions.clone();
    let fut = session::serve(Box::new(session::Start {
        edge,
        upgrade: upgraded,
        url_token: params.token,
        peer,
        pending: ticket.pending,
        held: ticket.address.map(|a| Box::new(a) as crate::delivery::Held),
    }));
    tracker.spawn(fut);
    response.into_response()
}

/// A 503 with `Retry-After` for a connection over a cap, saying which.
pub(crate) fn busy(refused: crate::admission::Refused) -> Response {
    tracing::debug!(why = %refused.0, "connection refused over a cap");
    let mut response =
        (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", refused.0)).into_response();
    response.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        HeaderValue::from(crate::admission::RETRY_AFTER_SECS),
    );
    response
}

/// A 403 for an upgrade whose `Origin` is not on the allow-list. Requests
/// without `Origin` come from programs, not browsers, and pass: the check
/// keeps other sites' pages out, it does not authenticate.
fn origin_refused(allowed: Option<&AllowedOrigins>, headers: &HeaderMap) -> Option<Response> {
    let allowed = allowed?;
    let mut origins = headers.get_all(axum::http::header::ORIGIN).iter();
    let origin = origins.next()?;
    let text = origin.to_str().unwrap_or("(unreadable)");
    if origins.next().is_none() && allowed.allows(text) {
        return None;
    }
    tracing::debug!(
        origin = text,
        "WebSocket upgrade refused: origin not allowed"
    );
    Some(
        (
            StatusCode::FORBIDDEN,
            format!("WebSocket connections from origin {text} are not allowed on this server\n"),
        )
            .into_response(),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A connected loopback pair: (server side, client side).
    pub(crate) async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (accepted.unwrap().0, client.unwrap())
    }

    /// The options are set on the listener only; every connection must
    /// have them all the same, those that completed their handshake and
    /// waited in the queue before being accepted included.
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_options() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let keepalive = std::time::Duration::from_secs(37);
        let unacked = std::time::Duration::from_millis(41_000);
        let fresh = socket2::SockRef::from(&listener);
        assert!(!fresh.tcp_nodelay().unwrap() && !fresh.keepalive().unwrap());
        client_socket_options(&listener, keepalive, unacked);
        let mut clients = Vec::new();
        for _ in 0..2 {
            clients.push(
                TcpStream::connect(listener.local_addr().unwrap())
                    .await
                    .unwrap(),
            );
        }
        for _ in 0..2 {
            let (accepted, _) = listener.accept().await.unwrap();
            let socket = socket2::SockRef::from(&accepted);
            assert!(socket.tcp_nodelay().unwrap(), "TCP_NODELAY");
            assert!(socket.keepalive().unwrap(), "SO_KEEPALIVE");
            assert_eq!(socket.tcp_keepalive_time().unwrap(), keepalive);
            assert_eq!(socket.tcp_user_timeout().unwrap(), Some(unacked));
        }
    }
}
