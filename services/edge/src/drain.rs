//! Draining an edge that is shutting down: every client is told to
//! reconnect to another edge (1012), each at its own random moment of the
//! drain window rather than all at once, so that a rolling deploy does not
//! turn into a reconnect storm on the edges that stay. Each `disconnect`
//! also carries a small random `reconnect_after_ms`, spreading the clients
//! told in the same instant.
//!
//! One task walks the plan in time order; no timer per connection.

use std::time::Duration;

use herald_wire::CloseCode;
use tokio::time::Instant;

use crate::Edge;
use crate::delivery::{Closing, Outbox};
use crate::session::SHUTTING_DOWN;

/// The largest `reconnect_after_ms` hint.
const MAX_RECONNECT_HINT_MS: u32 = 1000;

/// Closes that fall within this much of each other go out together.
const TICK: Duration = Duration::from_millis(10);

/// Tells every open connection to reconnect elsewhere, spread over the
/// configured drain window; returns once the last was told.
pub(crate) async fn spread(edge: &Edge) {
    let window = edge.config.drain_window;
    let mut plan: Vec<(Duration, Outbox)> = Vec::new();
    edge.each_session(|outbox| plan.push((window.mul_f64(rand::random()), outbox.clone())));
    plan.sort_by_key(|(at, _)| *at);
    tracing::info!(
        "edge {} draining: telling {} connections to reconnect elsewhere (1012), spread over {window:?}",
        edge.config.node_id,
        plan.len()
    );
    let start = Instant::now();
    let (mut told, mut closing_already) = (0usize, 0usize);
    let mut next_tick = start;
    for (at, outbox) in plan {
        let due = start + at;
        if due > next_tick {
            tokio::time::sleep_until(due).await;
            next_tick = due + TICK;
        }
        if outbox.close_reason().is_some() {
            closing_already += 1;
            continue;
        }
        outbox.close_as(Closing {
            reconnect_after_ms: Some(rand::random_range(0..=MAX_RECONNECT_HINT_MS)),
            ..Closing::new(CloseCode::ServiceRestart, SHUTTING_DOWN)
        });
        told += 1;
    }
    tracing::info!(
        "edge {} told {told} connections to reconnect elsewhere over {:?} ({closing_already} were closing already)",
        edge.config.node_id,
        start.elapsed()
    );
}
