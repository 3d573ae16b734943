//! What the leading replica appends to the event feed: users going online
//! and offline (`[feed] users`), and the leaves it announces itself, of
//! connections whose edge died (namespaces whose `feed` has `presence`;
//! an edge appends the leaves of its live connections). The feed event of
//! a transition keeps the transition's id, the same on every replica, so a
//! new leader re-publishing what came after the old one's last heartbeat
//! stores nothing twice.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use herald_broker::chain;
use herald_broker::feed::{Event, SharedFeed, presence_subject, user_subject};
use herald_wire::presence::{UserEvent, UserTransition};
use tokio::sync::mpsc;

/// The presence service's part of the event feed.
#[derive(Clone, Debug)]
pub struct PresenceFeed {
    pub feed: SharedFeed,
    /// Users' transitions go to the feed (`[feed] users`).
    pub users: bool,
    /// Namespaces whose joins and leaves go to the feed (`feed =
    /// ["presence"]`): the leaves this service announces are appended.
    pub rooms: Arc<HashSet<String>>,
}

/// The feed event of a leave the presence service announced: the
/// connection's edge died, so the edge could not append it. The id names
/// the connection and room: a dead connection leaves each room once.
pub(crate) fn inferred_leave(
    room: &str,
    (user, conn, node): (&str, &str, &str),
    ts_ms: u64,
) -> Event {
    let namespace = room.split_once(':').map_or(room, |(ns, _)| ns);
    let mut fields = serde_json::Map::new();
    fields.insert("room".into(), room.into());
    fields.insert("user".into(), user.into());
    fields.insert("conn".into(), conn.into());
    fields.insert("node".into(), node.into());
    fields.insert("edge_gone".into(), true.into());
    Event::new(
        presence_subject(namespace),
        format!("leave:{conn}:{room}"),
        "leave",
        ts_ms,
        fields,
    )
}

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

/// Starts the task that appends events in the order they are sent to it.
pub(crate) fn start(feed: SharedFeed) -> mpsc::Sender<Event> {
    let (tx, mut rx) = mpsc::channel::<Event>(QUEUE);
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            let mut wait = Duration::from_millis(100);
            for attempt in 1..=ATTEMPTS {
                match feed.append(event.clone()).await {
                    Ok(()) => break,
                    Err(e) if attempt == ATTEMPTS => {
                        tracing::warn!(id = %event.id, error = %chain(&e), "an event could not be appended to the feed");
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

    #[test]
    fn a_leave_of_a_dead_edge_is_named_by_connection_and_room() {
        let e = super::inferred_leave("chat:a", ("al", "edge-1-4", "edge-1"), 9);
        assert_eq!(e.subject, "herald.feed.presence.chat");
        assert_eq!(e.id, "leave:edge-1-4:chat:a");
        let v: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id":"leave:edge-1-4:chat:a","type":"leave","ts_ms":9,"room":"chat:a","user":"al","conn":"edge-1-4","node":"edge-1","edge_gone":true})
        );
    }
}
