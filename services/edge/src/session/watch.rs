//! A session's watched users (`watch`, `unwatch`): which users the token
//! lets it watch, how many, and the order that makes the answer and the
//! `status` frames agree: subscribe first, then ask presence, and hold the
//! transitions that come meanwhile until the answer is queued. Watched users
//! belong to the connection: a client that reconnects watches again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use herald_wire::frames::FrameError;
use herald_wire::reply::Watching as WatchingReply;
use herald_wire::{ErrorCode, Reply};

use super::{Session, unavailable};
use crate::interest;
use crate::watch::{self, MAX_WATCHED, WatchEntry};

/// The users one connection watches, with their entries in the edge's
/// table. Boxed in the session and made on the first `watch`, so that a
/// connection that watches nobody carries nothing.
#[derive(Default)]
pub(super) struct Watching {
    users: HashMap<String, Arc<WatchEntry>>,
    /// Entries joined held by the last `watch`, released once its answer is
    /// queued: a transition after the answer comes after it.
    release: Vec<Arc<WatchEntry>>,
}

impl Session {
    /// `watch`: the users' status now, then each of their transitions.
    pub(super) async fn watch(
        &mut self,
        id: Option<u64>,
        users: Vec<String>,
    ) -> Result<Reply, FrameError> {
        for user in &users {
            self.claims
                .may_watch(user)
                .map_err(|m| FrameError::new(id, ErrorCode::Forbidden, m))?;
        }
        let edge = self.edge.clone();
        let watching = self
            .rare
            .get_or_insert_with(Default::default)
            .watching
            .get_or_insert_with(Default::default);
        let new: Vec<String> = users
            .iter()
            .filter(|u| !watching.users.contains_key(*u))
            .cloned()
            .collect();
        if watching.users.len() + new.len() > MAX_WATCHED {
            return Err(FrameError::new(
                id,
                ErrorCode::TooLarge,
                format!(
                    "this connection watches {} users and asked for {} more; at most {MAX_WATCHED} are allowed",
                    watching.users.len(),
                    new.len()
                ),
            ));
        }
        let table = &edge.watches.table;
        let member = self.outbox.id;
        // Subscribed before presence is asked: a transition after the
        // answer's moment cannot fall between the two.
        let joined =
            futures::future::join_all(new.iter().map(|u| table.join(u, &self.outbox, true))).await;
        let mut entries = Vec::with_capacity(new.len());
        let mut failed = None;
        for (user, result) in new.iter().zip(joined) {
            match result {
                Ok(entry) => entries.push((user, entry)),
                Err(e) => failed = Some(e),
            }
        }
        let undo = |entries: &[(&String, Arc<WatchEntry>)]| {
            for (user, entry) in entries {
                table.leave(user, member);
                watch::forget(entry, member);
            }
        };
        if let Some(e) = failed {
            undo(&entries);
            return Err(unavailable(&self.conn, id, &e));
        }
        let queried = if new.is_empty() {
            HashMap::new()
        } else {
            match edge.watches.online(new.clone()).await {
                Ok(online) => online,
                Err(e) => {
                    undo(&entries);
                    return Err(unavailable(&self.conn, id, &e));
                }
            }
        };
        let mut status = BTreeMap::new();
        for user in &users {
            if let Some(entry) = watching.users.get(user) {
                status.insert(user.clone(), watch::told(entry, member));
            }
        }
        for (user, entry) in entries {
            let queried = queried.get(user).copied().unwrap_or(false);
            status.insert(user.clone(), watch::answer(&entry, member, queried));
            watching.release.push(entry.clone());
            watching.users.insert(user.clone(), entry);
        }
        Ok(Reply::Watching(WatchingReply { status }))
    }

    /// `unwatch`: no more `status` for these users (watched or not).
    pub(super) fn unwatch(&mut self, users: Vec<String>) -> Result<Reply, FrameError> {
        for user in users {
            self.stop_watching(&user);
        }
        Ok(Reply::Done)
    }

    /// Sends the transitions held while a `watch` was answered, after it.
    pub(super) fn release_watched(&mut self) {
        if let Some(watching) = self.rare.as_mut().and_then(|r| r.watching.as_mut()) {
            for entry in watching.release.drain(..) {
                interest::release(&entry, self.outbox.id);
            }
        }
    }

    /// Stops watching everyone (the connection is closing).
    pub(super) fn unwatch_all(&mut self) {
        let users: Vec<String> = match self.rare.as_ref().and_then(|r| r.watching.as_ref()) {
            Some(watching) => watching.users.keys().cloned().collect(),
            None => return,
        };
        for user in users {
            self.stop_watching(&user);
        }
    }

    fn stop_watching(&mut self, user: &str) {
        let Some(entry) = self
            .rare
            .as_mut()
            .and_then(|r| r.watching.as_mut())
            .and_then(|w| w.users.remove(user))
        else {
            return;
        };
        // Out of the members first, so no transition is noted for it after
        // it is forgotten.
        self.edge
            .watches
            .table
            .leave(&user.to_string(), self.outbox.id);
        watch::forget(&entry, self.outbox.id);
    }
}
