//! From the upgrade to an authenticated session: the WebSocket upgrade
//! completes, the connection gets its outbox and reader, and the client
//! proves who it is with a `connect` (or `?token=`) within the handshake
//! timeout. Everything else before that is answered with `unauthorized`.
//! A relayed connection (the SSE transport) arrives authenticated already.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fastwebsockets::upgrade::UpgradeFut;
use herald_auth::{AuthError, Claims};
use herald_wire::frames::{self, ClientFrame, FrameError, Request};
use herald_wire::{CloseCode, ErrorCode};
use serde_json::value::RawValue;
use tokio::net::UnixStream;
use tokio::time::Instant;

use super::{Hello, SHUTTING_DOWN, Session, reject};
use crate::Edge;
use crate::delivery::{Out, Outbox};
use crate::framing::{Incoming, Reader};
use crate::transport;

/// What a new connection starts from, boxed so that the task of an idle
/// connection does not keep room for it.
pub(crate) struct Start {
    pub edge: Arc<Edge>,
    pub upgrade: UpgradeFut,
    pub url_token: Option<String>,
    pub peer: SocketAddr,
    /// A place among the connections still authenticating, given back once
    /// this one is (or gives up).
    pub pending: Option<crate::admission::Pending>,
    /// Held by the connection until it is gone (its address's place).
    pub held: Option<crate::delivery::Held>,
}

/// A connection whose client proved who it is on the request that opened
/// it, served through one end of a socket pair whose other end a task of
/// this edge relays (`sse`): the session reads and writes WebSocket frames
/// on it as on any client socket.
pub(crate) struct Relayed {
    pub edge: Arc<Edge>,
    pub socket: UnixStream,
    /// From `edge.next_conn`, taken by the relay, which must know the
    /// connection's id before the session announces it.
    pub id: u64,
    pub claims: Claims,
    pub peer: SocketAddr,
    /// Held by the connection until it is gone.
    pub held: Option<crate::delivery::Held>,
}

/// Opens the session of a relayed connection; as [`connect`], but there is
/// no upgrade to complete and no token left to check.
pub(super) async fn open_relayed(start: Relayed) -> (Outbox, Reader, Option<Session>) {
    let Relayed {
        edge,
        socket,
        id,
        claims,
        peer,
        held,
    } = start;
    let outbox = Outbox::holding(id, socket, edge.config.outbound_queue, held);
    let reader = Reader::new(edge.config.max_message_bytes, &[], &outbox);
    let conn = format!("{}-{id}", edge.config.node_id);
    let hello = Hello { peer, client: None };
    let session = Session::open(edge, outbox.clone(), conn, claims, None, hello).await;
    if let Some(session) = &session {
        tracing::debug!(%peer, conn = %session.conn, user = %session.claims.sub, "connected (relayed)");
    }
    (outbox, reader, session)
}

/// Completes the upgrade and authenticates; `None` if the connection is
/// gone before it has an outbox. The session is `None` when the client was
/// refused (its outbox then holds the refusal and the close).
pub(super) async fn connect(start: Start) -> Option<(Outbox, Reader, Option<Session>)> {
    let Start {
        edge,
        upgrade,
        url_token,
        peer,
        pending,
        held,
    } = start;
    let upgraded = match upgrade.await {
        Ok(ws) => ws.into_inner().into_inner(),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "WebSocket upgrade did not complete");
            return None;
        }
    };
    let Ok((stream, already_read)) = transport::into_socket(upgraded) else {
        tracing::error!(%peer, "upgraded connection is not a socket; closed");
        return None;
    };
    let id = edge.next_conn.fetch_add(1, Ordering::Relaxed);
    let outbox = Outbox::holding(id, stream, edge.config.outbound_queue, held);
    let mut reader = Reader::new(edge.config.max_message_bytes, &already_read, &outbox);
    drop(already_read);
    let authenticated = authenticate(&edge, &outbox, &mut reader, url_token).await;
    drop(pending);
    let session = match authenticated {
        Some((claims, connect_id, client)) => {
            let conn = format!("{}-{id}", edge.config.node_id);
            let hello = Hello { peer, client };
            Session::open(
                edge.clone(),
                outbox.clone(),
                conn,
                claims,
                connect_id,
                hello,
            )
            .await
        }
        None => None,
    };
    if let Some(session) = &session {
        tracing::debug!(%peer, conn = %session.conn, user = %session.claims.sub, "connected");
    }
    Some((outbox, reader, session))
}

/// The error frame for a token that was refused.
pub(super) fn auth_error(id: Option<u64>, e: &AuthError) -> FrameError {
    match e {
        AuthError::Expired => FrameError::new(
            id,
            ErrorCode::TokenExpired,
            "the token has expired; get a new one and connect again",
        ),
        AuthError::Invalid(why) => FrameError::new(
            id,
            ErrorCode::Unauthorized,
            format!("token rejected: {why}"),
        ),
    }
}

pub(super) fn binary_refused() -> FrameError {
    FrameError::new(
        None,
        ErrorCode::BadRequest,
        "binary frames are not accepted; send JSON in text frames",
    )
}

/// Waits for a valid `connect` (or checks the `?token=`); answers everything
/// else with `unauthorized`. Returns the claims, the `connect` request id
/// and the `connect` frame's `client` object.
async fn authenticate(
    edge: &Edge,
    outbox: &Outbox,
    reader: &mut Reader,
    url_token: Option<String>,
) -> Option<(Claims, Option<u64>, Option<Box<RawValue>>)> {
    let refuse = |err: FrameError| {
        reject(outbox, &err);
        outbox.push(Out::close(CloseCode::Unauthorized, err.message.clone()));
        None
    };
    if let Some(token) = url_token {
        // Boxed: a key fetch's state would otherwise widen every
        // connection's task for its whole life.
        return match Box::pin(edge.config.verifier.verify_fresh(&token)).await {
            Ok(claims) => Some((claims, None, None)),
            Err(e) => refuse(auth_error(None, &e)),
        };
    }
    let deadline = Instant::now() + edge.config.handshake_timeout;
    loop {
        let incoming = tokio::select! {
            i = reader.next(outbox.stream(), outbox) => i,
            _ = tokio::time::sleep_until(deadline) => {
                outbox.push(Out::close(CloseCode::Unauthorized, format!("no valid connect within {:?}", edge.config.handshake_timeout)));
                return None;
            }
            _ = edge.shutdown.cancelled() => {
                outbox.close(CloseCode::ServiceRestart, SHUTTING_DOWN);
                return None;
            }
        };
        match incoming {
            Incoming::Text(text) => match frames::parse(&text) {
                Ok(ClientFrame {
                    id,
                    request: Request::Connect { token, client },
                }) => {
                    return match Box::pin(edge.config.verifier.verify_fresh(&token)).await {
                        Ok(claims) => Some((claims, id, client)),
                        Err(e) => refuse(auth_error(id, &e)),
                    };
                }
                Ok(other) => reject(
                    outbox,
                    &FrameError::new(
                        other.id,
                        ErrorCode::Unauthorized,
                        format!(
                            "`{}` before `connect`: send {{\"op\":\"connect\",\"token\":...}} first",
                            other.request.op()
                        ),
                    ),
                ),
                Err(e) => reject(outbox, &e),
            },
            Incoming::Binary(_) => reject(outbox, &binary_refused()),
            Incoming::Closed => return None,
            Incoming::Violation(code, reason) => {
                outbox.push(Out::close(code, reason));
                return None;
            }
        }
    }
}
