//! Users going online and offline, appended to the event feed by the
//! leading replica (`[feed] users`). The feed event keeps the transition's
//! id, the same on every replica, so a new leader re-publishing what came
//! after the old one's last heartbeat stores nothing twice.

use std::time::Duration;

use bytes::Bytes;
use herald_broker::chain;
use herald_broker::feed::{Event, SharedFeed, user_subject};
use herald_wire::presence::{UserEvent, UserTransition};
use tokio::sync::mpsc;

/// Transitions waiting for the feed; beyond this they are dropped (and
/// logged): the feed has been unreachable for a long while.
const QUEUE: usize = 4096;
/// Attempts per event before it is given up.
const ATTEMPTS: u32 = 5;

/// The feed event of a `herald.presence.user.<user>` payload.
pub(crate) fn event(payload: &[u8]) -> Option<Event> {
    let ev: UserEvent = serde_json::from_slice(payload).ok()?;
    let name = match ev.event {
        UserTransition::Online => "online",
        UserTransition::Offline => "offline",
    };
    let mut fields = serde_json::Map::new();
    fields.insert("user".into(), ev.user.into());
    Some(Event::new(
        user_subject(name),
        ev.id,
        &format!("user.{name}"),
        ev.ts_ms,
        fields,
    ))
}

/// Starts the task that appends transitions in order; send it the payloads
/// of user events as they are published.
pub(crate) fn start(feed: SharedFeed) -> mpsc::Sender<Bytes> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
    tokio::spawn(async move {
        while let Some(payload) = rx.recv().await {
            let Some(event) = event(&payload) else {
                continue;
            };
            let mut wait = Duration::from_millis(100);
            for attempt in 1..=ATTEMPTS {
                match feed.append(event.clone()).await {
                    Ok(()) => break,
                    Err(e) if attempt == ATTEMPTS => {
                        tracing::warn!(id = %event.id, error = %chain(&e), "a user transition could not be appended to the feed");
                    }
                    Err(_) => {
                        tokio::time::sleep(wait).await;
                        wait *= 2;
                    }
                }
            }
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    #[test]
    fn user_events_become_feed_events_with_their_id() {
        let e = super::event(br#"{"id":"al:online:c1","user":"al","event":"online","ts_ms":5}"#)
            .unwrap();
        assert_eq!(e.subject, "herald.feed.user.online");
        assert_eq!(e.id, "al:online:c1");
        let v: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id":"al:online:c1","type":"user.online","ts_ms":5,"user":"al"})
        );
        assert!(super::event(b"nonsense").is_none());
    }
}
