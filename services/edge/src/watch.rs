//! Contacts' status for clients: a connection `watch`es users, is answered
//! whether each is online, and is then sent a `status` frame per
//! transition, as the leading presence replica announces them on
//! `herald.presence.user.<user>` (after the grace period, so a reconnect
//! within it announces nothing). The edge subscribes once per watched user
//! for all its local watchers (the keyed subscriptions of `interest`) and
//! remembers what it last told each watcher: a transition reaches a watcher
//! once, whether it races the initial answer or is announced again by a new
//! presence leader.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_broker::{Message, SharedBroker};
use herald_presence_client::{PresenceQuery, QueryError, Source};
use herald_proto::v1::UserStatusRequest;
use herald_wire::presence::{UserEvent, UserTransition};
use herald_wire::reply::StatusEvent;
use herald_wire::subjects;
use prometheus_client::metrics::gauge::Gauge;

use crate::interest::{self, Entry, Interest};

/// Users one connection may watch at once (`too_large` beyond): each is a
/// subscription on the edge while any local connection watches it.
pub const MAX_WATCHED: usize = 1000;

/// Transition ids remembered per watched user. A new presence leader
/// re-publishes only what came after the old one's last heartbeat, a few
/// transitions at most.
const SEEN: usize = 64;

/// A watched user's entry on this edge: its local watchers and what each
/// was told.
pub type WatchEntry = Entry<Watched>;

/// What the edge told the watchers of one user.
#[derive(Default)]
pub struct Watched(Mutex<Told>);

#[derive(Default)]
struct Told {
    /// Ids of the transitions handled lately, to drop a repeat.
    seen: VecDeque<String>,
    /// The status each answered watcher was last told.
    told: HashMap<u64, bool>,
    /// Watchers subscribed but not answered yet: the latest transition that
    /// came meanwhile, which is newer than what the presence query may say.
    pending: HashMap<u64, bool>,
}

/// The edge's watched users and where their status is asked.
pub struct Watches {
    pub table: Interest<String, Watched>,
    query: PresenceQuery,
}

impl Watches {
    /// `count` gauges the users watched from this edge.
    pub fn new(broker: SharedBroker, source: Source, timeout: Duration, count: Gauge) -> Watches {
        let handler: interest::Handler<Watched> = Arc::new(on_event);
        Watches {
            table: Interest::new(broker.clone(), subject, handler, None, count),
            query: PresenceQuery::new(broker, source, timeout),
        }
    }

    /// Whether each of `users` is online now, as a presence replica sees it
    /// (a user in the grace period is still online).
    pub async fn online(&self, users: Vec<String>) -> Result<HashMap<String, bool>, QueryError> {
        let reply = self.query.user_status(UserStatusRequest { users }).await?;
        Ok(reply
            .users
            .into_iter()
            .map(|u| (u.user, u.online))
            .collect())
    }
}

#[expect(clippy::ptr_arg, reason = "the interest table's keys are Strings")]
fn subject(user: &String) -> String {
    subjects::presence_user_event(user)
}

/// A transition of the entry's user: to each answered watcher told
/// otherwise, once; noted for the ones not answered yet.
fn on_event(msg: Message, entry: &Arc<WatchEntry>) {
    let event: UserEvent = match serde_json::from_slice(&msg.payload) {
        Ok(event) => event,
        Err(e) => {
            tracing::warn!(subject = %msg.subject, error = %e, "an unreadable user transition was ignored");
            return;
        }
    };
    let online = event.event == UserTransition::Online;
    let mut guard = entry.state.0.lock().expect("watch state");
    let state = &mut *guard;
    if state.seen.contains(&event.id) {
        return;
    }
    if state.seen.len() == SEEN {
        state.seen.pop_front();
    }
    state.seen.push_back(event.id);
    let frame = StatusEvent {
        user: &event.user,
        online,
    }
    .to_frame();
    let mut members = entry.members.write().expect("members");
    for (id, slot) in members.iter_mut() {
        match state.told.get_mut(id) {
            Some(told) if *told == online => {}
            Some(told) => {
                *told = online;
                slot.deliver(&frame);
            }
            None => {
                state.pending.insert(*id, online);
            }
        }
    }
}

/// The status to answer watcher `member` with: a transition that came since
/// it subscribed, else what presence said (`queried`). From then on the
/// watcher is told only what differs from it.
pub fn answer(entry: &WatchEntry, member: u64, queried: bool) -> bool {
    let mut state = entry.state.0.lock().expect("watch state");
    let online = state.pending.remove(&member).unwrap_or(queried);
    state.told.insert(member, online);
    online
}

/// What watcher `member` was last told (`false` if it never was).
pub fn told(entry: &WatchEntry, member: u64) -> bool {
    let state = entry.state.0.lock().expect("watch state");
    state.told.get(&member).copied().unwrap_or(false)
}

/// Forgets watcher `member`, once it has left the entry's members.
pub fn forget(entry: &WatchEntry, member: u64) {
    let mut state = entry.state.0.lock().expect("watch state");
    state.told.remove(&member);
    state.pending.remove(&member);
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::{Value, json};

    use super::*;
    use crate::interest::Slot;
    use crate::interest::tests::{member, received, receives_nothing};

    fn event(id: &str, online: bool) -> Message {
        let event = UserEvent {
            id: id.into(),
            user: "bob".into(),
            event: if online {
                UserTransition::Online
            } else {
                UserTransition::Offline
            },
            ts_ms: 1,
        };
        Message {
            subject: "herald.presence.user.bob".into(),
            payload: Bytes::from(serde_json::to_vec(&event).unwrap()),
            headers: None,
            reply: None,
        }
    }

    fn frames(got: Vec<String>) -> Vec<Value> {
        got.iter()
            .map(|f| serde_json::from_str(f).unwrap())
            .collect()
    }

    /// A transition that races the answer decides it and is not sent
    /// again; repeats (a new leader's) and transitions to what the watcher
    /// was told are dropped; the others go out once each.
    #[tokio::test]
    async fn each_watcher_is_told_each_transition_once() {
        let entry = WatchEntry::new();
        let (outbox, mut client) = member(1).await;
        entry
            .members
            .write()
            .unwrap()
            .insert(1, Slot { outbox, held: None });
        // Subscribed, not answered: noted, not sent.
        on_event(event("bob:online:c1", true), &entry);
        receives_nothing(&mut client).await;
        assert!(
            answer(&entry, 1, false),
            "the transition is newer than the query"
        );
        on_event(event("bob:online:c1", true), &entry);
        on_event(event("bob:online:c2", true), &entry);
        receives_nothing(&mut client).await;
        on_event(event("bob:offline:c2", false), &entry);
        on_event(event("bob:offline:c2", false), &entry);
        on_event(event("bob:online:c3", true), &entry);
        assert_eq!(
            frames(received(&mut client, 2).await),
            [
                json!({"op":"status","user":"bob","online":false}),
                json!({"op":"status","user":"bob","online":true})
            ]
        );
        receives_nothing(&mut client).await;
        assert!(told(&entry, 1));
        entry.members.write().unwrap().remove(&1);
        forget(&entry, 1);
        assert!(!told(&entry, 1));
    }
}
