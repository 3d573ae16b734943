//! Acting on connections from the server API: `Router.Join`, `Router.Leave`
//! and `Router.Disconnect` arrive as control messages on a user's subject
//! (every edge holding that user listens) or on this edge's own subject (one
//! connection by id). Each targeted session acts in its own task, in order
//! with its client's requests; the edge then acknowledges how many acted, so
//! the router can answer only once the change is in effect.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_broker::{Message, SharedBroker};
use herald_wire::presence::{Control, ControlAck};

use crate::delivery::{ControlCmd, Outbox};
use crate::interest::{Entry, Handler};

/// How long an acknowledgement waits for sessions to act.
const ACT_TIMEOUT: Duration = Duration::from_secs(3);

/// The handler for control subjects: dispatches to the members that the
/// message targets.
pub fn handler(broker: SharedBroker, node: Arc<str>) -> Handler<()> {
    Arc::new(move |msg: Message, entry: &Arc<Entry<()>>| {
        let targets: Vec<Outbox> = entry
            .members
            .read()
            .expect("members")
            .values()
            .map(|slot| slot.outbox.clone())
            .collect();
        tokio::spawn(dispatch(broker.clone(), node.clone(), msg, targets));
    })
}

async fn dispatch(broker: SharedBroker, node: Arc<str>, msg: Message, targets: Vec<Outbox>) {
    let control: Control = match serde_json::from_slice(&msg.payload) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(subject = %msg.subject, error = %e, "unreadable control message ignored");
            return;
        }
    };
    let conn_target = match &control {
        Control::Disconnect { conn: Some(c), .. } => Some(c.clone()),
        _ => None,
    };
    let mut pending = Vec::new();
    for t in targets {
        if let Some(c) = &conn_target
            && *c != format!("{node}-{}", t.id)
        {
            continue;
        }
        let (done, rx) = tokio::sync::oneshot::channel();
        let cmd = ControlCmd {
            control: control.clone(),
            done,
        };
        if t.control.push(cmd) {
            pending.push(rx);
        }
    }
    let mut acted = 0;
    for rx in pending {
        if let Ok(Ok(())) = tokio::time::timeout(ACT_TIMEOUT, rx).await {
            acted += 1;
        }
    }
    if let Some(reply) = msg.reply {
        let ack = ControlAck {
            node: node.to_string(),
            conns: acted,
        };
        let payload = Bytes::from(serde_json::to_vec(&ack).expect("ack serializes"));
        if let Err(e) = broker.publish(reply, payload).await {
            tracing::warn!(error = %e, "could not acknowledge a control message");
        }
    }
}
