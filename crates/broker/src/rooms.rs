//! Publishing a message to a room, for every publisher (edges for clients,
//! the router for the API). An ephemeral room's frame goes straight to the
//! room's subject. A durable room's frame is stored first and goes out with
//! its position only once stored: nothing is acknowledged that was not kept.

use bytes::Bytes;
use herald_wire::frames::{with_position, with_traceparent};
use herald_wire::{RoomName, subjects};

use crate::history::{HistoryError, SharedHistory, Stored};
use crate::{BrokerError, SharedBroker, chain};
use tracing::Instrument;

/// Most messages one history page holds (`history` op, `Router.History`).
pub const MAX_HISTORY_PAGE: u32 = 500;
/// Messages in a history page when the caller does not say.
pub const DEFAULT_HISTORY_PAGE: u32 = 100;

/// Where a published message landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Empty for ephemeral rooms.
    pub epoch: String,
    /// 0 for ephemeral rooms.
    pub offset: u64,
    /// The idempotency key was seen before: nothing new was published.
    pub duplicate: bool,
}

/// How a namespace's messages go out (from its policy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Stored first, then sent with its position.
    pub durable: bool,
    /// The live frame carries the `traceparent` of its NATS publish, when
    /// that is in an exported, sampled trace.
    pub traceparent: bool,
}

/// Why a message was not published. Each variant is its cause itself: its
/// message already says what a publisher needs to know.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    History(#[from] HistoryError),
}

impl PublishError {
    /// Whether the message was sent but not confirmed: it may or may not
    /// have been published (a durable one retried with the same key tells).
    pub fn is_unconfirmed(&self) -> bool {
        matches!(
            self,
            PublishError::Broker(BrokerError::Unconfirmed(_))
                | PublishError::History(HistoryError::Unconfirmed(_))
        )
    }

    /// Whether the message is too large for the broker or the store: a
    /// permanent error, not a reason to retry.
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            PublishError::Broker(BrokerError::TooLarge { .. })
                | PublishError::History(HistoryError::TooLarge { .. })
        )
    }
}

/// The header naming the connection (its cluster-wide id, `<node>-<n>`)
/// that published a message with `echo: false`: the edge holding that
/// connection leaves it out of the live fan-out. Only the live message
/// carries it: history is the same for everyone.
pub const NO_ECHO: &str = "Herald-No-Echo";

/// Publishes `frame` (a `message` frame from `herald_wire::frames::message_frame`)
/// to `room`, and returns once the broker confirmed it. For a durable room,
/// `key` deduplicates: a repeat returns the first call's offset and
/// publishes nothing.
///
/// `Unavailable` means nothing was published; `Unconfirmed` (in either
/// error type) means the outcome is unknown, and a durable publish retried
/// with the same `key` finds out.
pub async fn publish(
    broker: &SharedBroker,
    history: &SharedHistory,
    room: &RoomName,
    delivery: Delivery,
    frame: Bytes,
    key: Option<&str>,
) -> Result<Published, PublishError> {
    publish_from(broker, history, room, delivery, frame, key, None).await
}

/// [`publish`], leaving connection `no_echo` (when given) out of the live
/// delivery: a client's `publish` with `echo: false`.
pub async fn publish_from(
    broker: &SharedBroker,
    history: &SharedHistory,
    room: &RoomName,
    delivery: Delivery,
    frame: Bytes,
    key: Option<&str>,
    no_echo: Option<&str>,
) -> Result<Published, PublishError> {
    let mark = broker.publishable()?;
    let published = send(broker, history, room, delivery, frame, key, no_echo).await?;
    if !delivery.durable {
        broker.confirm(mark).await?;
    }
    Ok(published)
}

/// Publishes one message after another, in order, each as [`publish`]
/// would, but confirms the ephemeral ones with one round trip at the end.
pub async fn publish_all(
    broker: &SharedBroker,
    history: &SharedHistory,
    messages: Vec<Outgoing<'_>>,
) -> Vec<Result<Published, PublishError>> {
    let mark = match broker.publishable() {
        Ok(mark) => mark,
        Err(e) => {
            return messages
                .into_iter()
                .map(|_| Err(e.clone().into()))
                .collect();
        }
    };
    let mut results = Vec::new();
    let mut ephemeral = Vec::new();
    for m in messages {
        let sent = send(broker, history, m.room, m.delivery, m.frame, m.key, None).await;
        if sent.is_ok() && !m.delivery.durable {
            ephemeral.push(results.len());
        }
        results.push(sent);
    }
    if !ephemeral.is_empty()
        && let Err(e) = broker.confirm(mark).await
    {
        for i in ephemeral {
            results[i] = Err(e.clone().into());
        }
    }
    results
}

/// One message of [`publish_all`], as [`publish`] takes it.
pub struct Outgoing<'a> {
    pub room: &'a RoomName,
    pub delivery: Delivery,
    pub frame: Bytes,
    pub key: Option<&'a str>,
}

/// Hands one message to the broker (ephemeral rooms: not yet confirmed) or
/// the store (durable rooms: stored when this returns).
async fn send(
    broker: &SharedBroker,
    history: &SharedHistory,
    room: &RoomName,
    delivery: Delivery,
    frame: Bytes,
    key: Option<&str>,
    no_echo: Option<&str>,
) -> Result<Published, PublishError> {
    let to_clients = delivery.traceparent;
    if !delivery.durable {
        publish_traced(broker, subjects::room(room), frame, to_clients, no_echo).await?;
        return Ok(Published {
            epoch: String::new(),
            offset: 0,
            duplicate: false,
        });
    }
    let key = key.filter(|k| !k.is_empty());
    let append = tracing::info_span!(
        target: herald_telemetry::TARGET,
        "history.append",
        otel.kind = "client",
        room = %room,
        offset = tracing::field::Empty,
    );
    let stored = crate::metrics::timed_append(history.append(room, frame.clone(), key))
        .instrument(append.clone())
        .await?;
    append.record("offset", stored.offset);
    if !stored.duplicate {
        let live = with_position(&frame, &stored.epoch, stored.offset, stored.prev);
        if let Err(e) =
            publish_traced(broker, subjects::room(room), live, to_clients, no_echo).await
        {
            // Stored, so acknowledged: edges read it from history when the
            // next message shows the gap, and recovering clients get it.
            tracing::warn!(%room, offset = stored.offset, error = %chain(&e), "stored message not sent live");
        }
    }
    Ok(Published {
        epoch: stored.epoch,
        offset: stored.offset,
        duplicate: stored.duplicate,
    })
}

/// Publishes `payload` to a room's `subject` in a producer span of its own
/// (a child of the current span), whose trace context travels in the
/// message's headers so that each edge's fan-out joins the trace (and, with
/// `to_clients`, in the frame, for the members' own telemetry). Without
/// tracing, a plain publish, with the [`NO_ECHO`] header when given.
async fn publish_traced(
    broker: &SharedBroker,
    subject: String,
    mut payload: Bytes,
    to_clients: bool,
    no_echo: Option<&str>,
) -> Result<(), BrokerError> {
    let span = tracing::info_span!(
        target: herald_telemetry::TARGET,
        "nats.publish",
        otel.name = %format_args!("publish {subject}"),
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.destination.name = %subject,
    );
    let with_no_echo = |headers: Option<crate::Headers>| match no_echo {
        Some(conn) => {
            let mut headers = headers.unwrap_or_default();
            headers.insert(NO_ECHO, conn);
            Some(headers)
        }
        None => headers,
    };
    if span.is_disabled() {
        return broker
            .publish_maybe_headers(subject, with_no_echo(None), payload)
            .await;
    }
    let headers = crate::trace_headers(&span);
    if to_clients
        && let Some(tp) = headers.as_ref().and_then(|h| h.get("traceparent"))
        && sampled(tp.as_str())
    {
        payload = with_traceparent(&payload, tp.as_str());
    }
    broker
        .publish_maybe_headers(subject, with_no_echo(headers), payload)
        .instrument(span)
        .await
}

/// Whether a `traceparent`'s flags say sampled: a trace nobody keeps is
/// not worth a client's continuing.
fn sampled(traceparent: &str) -> bool {
    traceparent
        .rsplit('-')
        .next()
        .and_then(|flags| u8::from_str_radix(flags, 16).ok())
        .is_some_and(|flags| flags & 1 == 1)
}

/// A page of `room`'s history after `since` (from the start when `since` is
/// absent or belongs to another epoch: its offsets mean nothing here), at most
/// `limit` messages (0 or absent: [`DEFAULT_HISTORY_PAGE`]; at most
/// [`MAX_HISTORY_PAGE`]). Returns the epoch with the messages.
pub async fn history_page(
    history: &SharedHistory,
    room: &RoomName,
    since: Option<(&str, u64)>,
    limit: Option<u32>,
) -> Result<(String, Vec<Stored>), HistoryError> {
    let epoch = history.epoch(room.namespace()).await?;
    let after = since
        .filter(|(e, _)| *e == epoch)
        .map(|(_, offset)| offset)
        .unwrap_or(0);
    let limit = match limit.unwrap_or(0) {
        0 => DEFAULT_HISTORY_PAGE,
        n => n.min(MAX_HISTORY_PAGE),
    };
    let stored = read(history, room, after, limit as usize).await?;
    Ok((epoch, stored))
}

/// Reads at most `limit` of `room`'s stored messages after offset `after`,
/// in a `history.read` span (a client's `history` or recovery, an edge
/// filling a gap).
pub async fn read(
    history: &SharedHistory,
    room: &RoomName,
    after: u64,
    limit: usize,
) -> Result<Vec<Stored>, HistoryError> {
    let span = tracing::info_span!(
        target: herald_telemetry::TARGET,
        "history.read",
        otel.kind = "client",
        room = %room,
        after,
        messages = tracing::field::Empty,
    );
    let stored = history
        .read(room, after, limit)
        .instrument(span.clone())
        .await?;
    span.record("messages", stored.len());
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::sampled;

    #[test]
    fn only_sampled_traces_go_to_clients() {
        let id = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7";
        assert!(sampled(&format!("{id}-01")));
        assert!(sampled(&format!("{id}-03")), "other flags do not matter");
        assert!(!sampled(&format!("{id}-00")));
        assert!(!sampled("garbage"));
    }
}
