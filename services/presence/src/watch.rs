//! `Presence.Watch` inside the service: the actor hands every event it
//! applies to the watchers interested in its room or user, in order, through
//! one bounded queue per watcher. A watcher whose queue is full has fallen
//! behind: the actor drops it, and its stream ends with
//! [`WatchEnd::Lagged`] once it has read what was queued. A queue per watcher
//! (rather than one broadcast ring for all) bounds each watcher by its own
//! events: a burst elsewhere (an edge with thousands of connections reaped)
//! does not end every watcher's stream.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use herald_proto::v1::PresenceEvent;
use tokio::sync::mpsc;

/// Watchers one replica serves at once; more are refused.
pub const MAX_WATCHERS: usize = 10_000;

/// A stream of presence events for some rooms and users, from
/// [`crate::Presence::watch`].
pub struct Watch {
    rx: mpsc::Receiver<Arc<PresenceEvent>>,
    lagged: Arc<AtomicBool>,
}

/// Why a watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    /// The watcher read too slowly and events were dropped for it.
    Lagged,
    /// The presence service stopped.
    Stopped,
}

/// Why a watch could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    #[error("this presence replica already serves {MAX_WATCHERS} watchers")]
    TooManyWatchers,
    #[error("the presence service is shutting down")]
    Stopped,
}

impl Watch {
    /// The next event, in the order the replica applied them.
    pub async fn next(&mut self) -> Result<PresenceEvent, WatchEnd> {
        match self.rx.recv().await {
            Some(ev) => Ok(Arc::unwrap_or_clone(ev)),
            None if self.lagged.load(Ordering::Acquire) => Err(WatchEnd::Lagged),
            None => Err(WatchEnd::Stopped),
        }
    }
}

struct Watcher {
    tx: mpsc::Sender<Arc<PresenceEvent>>,
    lagged: Arc<AtomicBool>,
    rooms: Vec<String>,
    users: Vec<String>,
}

/// The actor's registry of watchers, indexed by room and by user so that an
/// event costs one lookup plus one send per interested watcher.
#[derive(Default)]
pub(crate) struct Watchers {
    next_id: u64,
    all: HashMap<u64, Watcher>,
    by_room: HashMap<String, HashSet<u64>>,
    by_user: HashMap<String, HashSet<u64>>,
}

impl Watchers {
    pub(crate) fn add(
        &mut self,
        rooms: Vec<String>,
        users: Vec<String>,
        queue: usize,
    ) -> Result<Watch, WatchError> {
        if self.all.len() >= MAX_WATCHERS {
            return Err(WatchError::TooManyWatchers);
        }
        let (tx, rx) = mpsc::channel(queue.max(1));
        let lagged = Arc::new(AtomicBool::new(false));
        let id = self.next_id;
        self.next_id += 1;
        let rooms: Vec<String> = dedup(rooms);
        let users: Vec<String> = dedup(users);
        for r in &rooms {
            self.by_room.entry(r.clone()).or_default().insert(id);
        }
        for u in &users {
            self.by_user.entry(u.clone()).or_default().insert(id);
        }
        self.all.insert(
            id,
            Watcher {
                tx,
                lagged: lagged.clone(),
                rooms,
                users,
            },
        );
        Ok(Watch { rx, lagged })
    }

    pub(crate) fn len(&self) -> usize {
        self.all.len()
    }

    /// Hands a room event to the watchers of its room.
    pub(crate) fn room_event(&mut self, room: &str, ev: &Arc<PresenceEvent>) {
        if let Some(ids) = self.by_room.get(room) {
            let dropped = send(&self.all, ids, ev);
            self.remove_all(dropped);
        }
    }

    /// Hands a user event to the watchers of its user.
    pub(crate) fn user_event(&mut self, user: &str, ev: &Arc<PresenceEvent>) {
        if let Some(ids) = self.by_user.get(user) {
            let dropped = send(&self.all, ids, ev);
            self.remove_all(dropped);
        }
    }

    /// Forgets watchers whose stream was dropped.
    pub(crate) fn sweep(&mut self) {
        let closed: Vec<u64> = self
            .all
            .iter()
            .filter(|(_, w)| w.tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        self.remove_all(closed);
    }

    fn remove_all(&mut self, ids: Vec<u64>) {
        for id in ids {
            let Some(w) = self.all.remove(&id) else {
                continue;
            };
            for r in &w.rooms {
                unindex(&mut self.by_room, r, id);
            }
            for u in &w.users {
                unindex(&mut self.by_user, u, id);
            }
        }
    }
}

/// Sends `ev` to each watcher in `ids`; returns those to drop (lagged or
/// gone).
fn send(all: &HashMap<u64, Watcher>, ids: &HashSet<u64>, ev: &Arc<PresenceEvent>) -> Vec<u64> {
    let mut dropped = Vec::new();
    for id in ids {
        let Some(w) = all.get(id) else { continue };
        match w.tx.try_send(ev.clone()) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                w.lagged.store(true, Ordering::Release);
                dropped.push(*id);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => dropped.push(*id),
        }
    }
    dropped
}

fn unindex(index: &mut HashMap<String, HashSet<u64>>, key: &str, id: u64) {
    if let Some(set) = index.get_mut(key) {
        set.remove(&id);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

fn dedup(mut v: Vec<String>) -> Vec<String> {
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(room: &str, user: &str, n: u64) -> Arc<PresenceEvent> {
        Arc::new(PresenceEvent {
            event: if room.is_empty() { "online" } else { "join" }.into(),
            room: room.into(),
            user: user.into(),
            ts_ms: n,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn watchers_get_their_events_in_order_and_are_dropped_when_behind() {
        let mut w = Watchers::default();
        let mut lobby = w.add(vec!["chat:a".into()], vec![], 2).unwrap();
        let mut ada = w.add(vec![], vec!["ada".into(), "ada".into()], 8).unwrap();
        w.room_event("chat:a", &event("chat:a", "bob", 1));
        w.room_event("chat:b", &event("chat:b", "bob", 2));
        w.user_event("ada", &event("", "ada", 3));
        w.room_event("chat:a", &event("chat:a", "cy", 4));
        assert_eq!(lobby.next().await.unwrap().ts_ms, 1);
        assert_eq!(lobby.next().await.unwrap().ts_ms, 4);
        assert_eq!(ada.next().await.unwrap().ts_ms, 3);

        // Three events for a queue of two: the watcher is dropped, reads what
        // was queued, then learns it fell behind.
        for n in 5..8 {
            w.room_event("chat:a", &event("chat:a", "bob", n));
        }
        assert_eq!(w.len(), 1);
        assert_eq!(lobby.next().await.unwrap().ts_ms, 5);
        assert_eq!(lobby.next().await.unwrap().ts_ms, 6);
        assert_eq!(lobby.next().await, Err(WatchEnd::Lagged));
        assert!(w.by_room.is_empty());

        // A dropped stream is swept; the registry is empty again.
        drop(ada);
        w.sweep();
        assert_eq!(w.len(), 0);
        assert!(w.by_user.is_empty());
    }

    #[tokio::test]
    async fn a_stopped_registry_ends_streams_as_stopped() {
        let mut w = Watchers::default();
        let mut s = w.add(vec!["chat:a".into()], vec![], 4).unwrap();
        drop(w);
        assert_eq!(s.next().await, Err(WatchEnd::Stopped));
    }
}
