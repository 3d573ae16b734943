//! Acting on connections from the server API: `Router.Join`, `Router.Leave`
//! and `Router.Disconnect` arrive as control messages on this edge's own
//! subject (the router asks presence which edges hold the user and addresses
//! each of them), naming a user (all of its connections here) or one
//! connection. Each targeted session acts in its own task, in order with its
//! client's requests; the edge then acknowledges how many acted, so the router
//! can answer only once the change is in effect. Addressing edges rather than
//! users keeps connecting cheap: no subscription per user.
//!
//! Another edge sends `frames` here: an SSE client's requests, posted to
//! that edge, for a stream that lives on this one (see `sse`).

use std::time::Duration;

use bytes::Bytes;
use herald_broker::{Message, SharedBroker};
use herald_wire::presence::{Control, ControlAck};
use tracing::Instrument;

use crate::Edge;
use crate::delivery::{ControlCmd, Outbox};

/// How long an acknowledgement waits for sessions to act.
const ACT_TIMEOUT: Duration = Duration::from_secs(3);

/// Handles a control message addressed to this edge.
pub fn on_control(edge: &Edge, msg: Message) {
    let span = tracing::info_span!(
        target: herald_telemetry::TARGET,
        "control",
        otel.kind = "consumer",
        messaging.destination.name = %msg.subject,
    );
    if let Some(headers) = &msg.headers {
        herald_telemetry::extract(&span, |key| headers.get(key).map(|v| v.as_str()));
    }
    span.in_scope(|| act_on(edge, msg));
}

/// Hands one control message to the sessions it names.
fn act_on(edge: &Edge, msg: Message) {
    let control: Control = match serde_json::from_slice(&msg.payload) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(subject = %msg.subject, error = %e, "unreadable control message ignored");
            return;
        }
    };
    if let Control::Frames { conn, user, frames } = control {
        let ack = crate::sse::take_frames(edge, &conn, &user, frames);
        if let Some(reply) = msg.reply {
            let broker = edge.broker.clone();
            let payload = Bytes::from(serde_json::to_vec(&ack).expect("ack serializes"));
            tokio::spawn(
                async move {
                    if let Err(e) = broker.publish(reply, payload).await {
                        tracing::warn!(error = %herald_broker::chain(&e), "could not answer forwarded SSE frames");
                    }
                }
                .in_current_span(),
            );
        }
        return;
    }
    let ids: Vec<u64> = match &control {
        Control::Disconnect {
            conn: Some(conn), ..
        } => conn
            .strip_prefix(edge.config.node_id.as_str())
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|n| n.parse().ok())
            .into_iter()
            .collect(),
        Control::Join { user, .. }
        | Control::Leave { user, .. }
        | Control::Disconnect {
            user: Some(user), ..
        } => edge
            .users
            .lock()
            .expect("users")
            .get(user)
            .cloned()
            .unwrap_or_default(),
        Control::Disconnect { .. } | Control::Frames { .. } => Vec::new(),
    };
    let targets: Vec<Outbox> = {
        let sessions = edge.sessions_by_id.read().expect("sessions");
        ids.iter()
            .filter_map(|id| sessions.get(id).cloned())
            .collect()
    };
    tokio::spawn(
        dispatch(
            edge.broker.clone(),
            edge.config.node_id.clone(),
            msg,
            control,
            targets,
        )
        .in_current_span(),
    );
}

async fn dispatch(
    broker: SharedBroker,
    node: String,
    msg: Message,
    control: Control,
    targets: Vec<Outbox>,
) {
    let mut pending = Vec::new();
    for t in targets {
        let (done, rx) = tokio::sync::oneshot::channel();
        let cmd = ControlCmd {
            control: control.clone(),
            done,
            span: tracing::Span::current(),
        };
        if t.push_control(cmd) {
            pending.push(rx);
        }
    }
    let (mut acted, mut late) = (0, 0);
    let deadline = tokio::time::Instant::now() + ACT_TIMEOUT;
    for rx in pending {
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(())) => acted += 1,
            // The session ended before acting: it is gone, nothing to report.
            Ok(Err(_)) => {}
            Err(_) => late += 1,
        }
    }
    if let Some(reply) = msg.reply {
        let ack = ControlAck {
            node,
            conns: acted,
            late,
        };
        let payload = Bytes::from(serde_json::to_vec(&ack).expect("ack serializes"));
        if let Err(e) = broker.publish(reply, payload).await {
            tracing::warn!(error = %herald_broker::chain(&e), "could not acknowledge a control message");
        }
    }
}
