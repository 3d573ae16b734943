//! What the edge checks about every open connection once a second: token
//! expiry, the heartbeat ping, and the idle timeout that closes a connection
//! whose client went silent without closing (a frozen process, a phone in a
//! tunnel, a NAT that dropped its state: the kernel still holds the TCP
//! connection, so only silence tells). One sweep for the edge rather than a
//! timer in every session's task, because whatever an idle connection's task
//! waits on is memory held by every idle connection.
//!
//! A connection is heard whenever bytes arrive from it (a frame, a pong);
//! the reader stamps it with the edge's clock, which the sweep advances, so
//! the stamp costs no system call. The sweep also ends the subscriptions of
//! rooms left without members for `interest::LINGER`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use herald_wire::CloseCode;

use crate::{Edge, delivery, session};

/// Seconds since the Unix epoch, as of the last sweep.
static CLOCK: AtomicU32 = AtomicU32::new(0);

/// The edge's clock, in whole seconds.
pub fn now() -> u32 {
    CLOCK.load(Ordering::Relaxed)
}

fn advance() -> u64 {
    let now = herald_auth::now_secs();
    CLOCK.store(now as u32, Ordering::Relaxed);
    now
}

/// Runs until the edge shuts down. Each connection is pinged once per
/// `--heartbeat`, the connections spread over the seconds of it so that the
/// pings do not all go out at once; a connection not heard from for
/// `--idle-timeout` is closed with 4010 and leaves its rooms like any other.
pub async fn sweep(edge: Arc<Edge>) {
    let heartbeat = edge.config.heartbeat.as_secs().max(1);
    let idle = edge.config.idle_timeout.as_secs() as u32;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut second: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = edge.shutdown.cancelled() => return,
        }
        let now_secs = advance();
        let now = now_secs as u32;
        let slot = second % heartbeat;
        second += 1;
        let mut queues = crate::metrics::QueueSample::default();
        // One write per connection for whatever this sweep sends it.
        delivery::batch(|| {
            edge.each_session(|outbox| {
                let (frames, bytes) = outbox.queued();
                queues.add(frames, bytes);
                if outbox.close_reason().is_some() {
                    return;
                }
                if outbox.expired(now_secs) {
                    session::expire(outbox);
                    return;
                }
                let silent = now.saturating_sub(outbox.heard());
                if silent >= idle {
                    outbox.close(
                        CloseCode::IdleTimeout,
                        format!("nothing arrived from this connection for {silent} s; reconnect"),
                    );
                    return;
                }
                if outbox.id % heartbeat == slot {
                    outbox.ping();
                }
            })
        });
        queues.publish();
        edge.rooms.expire_lingering();
        edge.watches.table.expire_lingering();
    }
}

/// Starts the clock before the first connection can be stamped.
pub fn start_clock() {
    advance();
}
