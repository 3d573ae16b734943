//! The presence view: a pure state machine that folds the edges' reports into
//! "which connections exist, on which edge, for which user, in which rooms",
//! and answers queries from it. No I/O and no clock: the caller passes `now`
//! in and carries out the [`Effect`]s it returns, so every rule here is tested
//! without a broker or a timer.
//!
//! Each edge numbers its deltas 1, 2, 3, … per process; the view applies them
//! strictly in order. When a report shows that one was missed (a gap, an
//! unknown edge, a heartbeat ahead of the view, a count that disagrees) the
//! view asks that edge for a snapshot and ignores its deltas until the
//! snapshot arrives. Updates cost O(1) in the number of connections and rooms;
//! snapshots and removing an edge cost O(that edge's connections).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use herald_proto::v1::{Connection, Member, RoomMembersReply, UserStatus, UserStatusReply};
use herald_wire::presence::{Change, ConnState, EdgeReport};
use serde_json::Value;
use tokio::time::Instant;

/// Something the owner of the view must do after an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Publish a sync request to this edge: the view missed some of its
    /// reports and waits for a snapshot.
    AskSync { node: String },
}

/// One connection as the view knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Conn {
    pub user: String,
    /// The edge holding the connection.
    pub node: String,
    pub since_ms: u64,
    /// Rooms with presence the connection is in, with its metadata there.
    pub rooms: HashMap<String, Option<Value>>,
}

/// Sizes of the view, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub nodes: usize,
    pub conns: usize,
    pub users: usize,
    pub rooms: usize,
}

#[derive(Debug)]
struct Node {
    /// The edge process incarnation; `None` until a heartbeat or snapshot
    /// names it (a brand-new edge's first deltas do not carry it).
    started_ms: Option<u64>,
    /// The last delta applied (or the snapshot's position).
    seq: u64,
    last_seen: Instant,
    sync: SyncState,
    conns: HashSet<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncState {
    Current,
    /// Reports were missed; deltas are ignored until a snapshot arrives.
    Awaiting {
        asked_at: Instant,
    },
}

impl Node {
    fn new(started_ms: Option<u64>, now: Instant) -> Node {
        Node {
            started_ms,
            seq: 0,
            last_seen: now,
            sync: SyncState::Current,
            conns: HashSet::new(),
        }
    }
}

/// The cluster's presence state, owned by one task.
#[derive(Debug)]
pub struct View {
    edge_timeout: Duration,
    sync_retry: Duration,
    /// When every edge was last asked for a snapshot at once (start-up): an
    /// edge first heard of soon after need not be asked again.
    sync_all_at: Option<Instant>,
    nodes: HashMap<String, Node>,
    conns: HashMap<String, Conn>,
    /// room → connections in it.
    rooms: HashMap<String, HashSet<String>>,
    /// user → connections. A user is online while this holds an entry; the
    /// place that removes the entry is where the offline grace period starts.
    users: HashMap<String, HashSet<String>>,
}

impl View {
    /// `edge_timeout`: an edge silent this long is removed. `sync_retry`: at
    /// most one sync request per edge this often.
    pub fn new(edge_timeout: Duration, sync_retry: Duration) -> View {
        View {
            edge_timeout,
            sync_retry,
            sync_all_at: None,
            nodes: HashMap::new(),
            conns: HashMap::new(),
            rooms: HashMap::new(),
            users: HashMap::new(),
        }
    }

    /// Records that every edge was just asked for a snapshot.
    pub fn asked_all(&mut self, now: Instant) {
        self.sync_all_at = Some(now);
    }

    /// Folds one report into the view.
    pub fn apply(&mut self, report: EdgeReport, now: Instant) -> Vec<Effect> {
        let mut fx = Vec::new();
        match report {
            EdgeReport::Delta { node, seq, change } => self.delta(node, seq, change, now, &mut fx),
            EdgeReport::Heartbeat {
                node,
                seq,
                started_ms,
                conns,
            } => self.heartbeat(node, seq, started_ms, conns, now, &mut fx),
            EdgeReport::Snapshot {
                node,
                seq,
                started_ms,
                conns,
            } => self.snapshot(node, seq, started_ms, conns, now),
            EdgeReport::Goodbye { node, .. } => {
                self.remove_node(&node);
            }
        }
        fx
    }

    /// Periodic work: removes edges silent for `edge_timeout` (returned with
    /// how many connections each held) and repeats sync requests that went
    /// unanswered for `sync_retry`.
    pub fn tick(&mut self, now: Instant) -> (Vec<Effect>, Vec<(String, usize)>) {
        let timeout = self.edge_timeout;
        let dead: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| now.saturating_duration_since(n.last_seen) >= timeout)
            .map(|(id, _)| id.clone())
            .collect();
        let reaped = dead
            .into_iter()
            .map(|id| {
                let gone = self.remove_node(&id);
                (id, gone)
            })
            .collect();
        let mut fx = Vec::new();
        let retry = self.sync_retry;
        for (id, node) in &mut self.nodes {
            if let SyncState::Awaiting { asked_at } = node.sync
                && now.saturating_duration_since(asked_at) >= retry
            {
                node.sync = SyncState::Awaiting { asked_at: now };
                fx.push(Effect::AskSync { node: id.clone() });
            }
        }
        (fx, reaped)
    }

    fn delta(
        &mut self,
        node_id: String,
        seq: u64,
        change: Change,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        if seq == 1 {
            // An edge numbers its deltas from 1 in every process, and the
            // broker never delivers a report twice: seq 1 means the edge's
            // state was empty just before it, whatever the view held (a
            // restarted edge, or one first heard of now). Nothing was missed.
            let same_incarnation = self.nodes.get(&node_id).is_some_and(|n| n.seq == 0);
            let started_ms = self
                .nodes
                .get(&node_id)
                .filter(|_| same_incarnation)
                .and_then(|n| n.started_ms);
            self.remove_node(&node_id);
            let mut node = Node::new(started_ms, now);
            node.seq = 1;
            self.nodes.insert(node_id.clone(), node);
            self.change(&node_id, change);
            return;
        }
        let retry = self.sync_retry;
        let Some(node) = self.nodes.get_mut(&node_id) else {
            self.insert_awaiting(node_id, None, now, fx);
            return;
        };
        node.last_seen = now;
        match node.sync {
            SyncState::Awaiting { .. } => ask(node, &node_id, retry, now, fx),
            SyncState::Current if seq <= node.seq => {}
            SyncState::Current if seq > node.seq + 1 => ask(node, &node_id, retry, now, fx),
            SyncState::Current => {
                node.seq = seq;
                self.change(&node_id, change);
            }
        }
    }

    fn heartbeat(
        &mut self,
        node_id: String,
        seq: u64,
        started_ms: u64,
        conns: u64,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        let restarted = self
            .nodes
            .get(&node_id)
            .is_some_and(|n| n.started_ms.is_some_and(|s| s != started_ms));
        if restarted {
            // Its old connections went with the old process.
            self.remove_node(&node_id);
        }
        let retry = self.sync_retry;
        let Some(node) = self.nodes.get_mut(&node_id) else {
            if seq == 0 && conns == 0 {
                // An edge that never had a connection: nothing to fetch.
                self.nodes.insert(node_id, Node::new(Some(started_ms), now));
            } else {
                self.insert_awaiting(node_id, Some(started_ms), now, fx);
            }
            return;
        };
        node.last_seen = now;
        node.started_ms = Some(started_ms);
        let behind = match node.sync {
            SyncState::Awaiting { .. } => true,
            // The connection count is a digest: equal positions must agree.
            SyncState::Current => {
                seq > node.seq || (seq == node.seq && conns != node.conns.len() as u64)
            }
        };
        if behind {
            ask(node, &node_id, retry, now, fx);
        }
    }

    fn snapshot(
        &mut self,
        node_id: String,
        seq: u64,
        started_ms: u64,
        conns: Vec<ConnState>,
        now: Instant,
    ) {
        if let Some(node) = self.nodes.get_mut(&node_id) {
            let stale = node.sync == SyncState::Current
                && node.started_ms == Some(started_ms)
                && seq < node.seq;
            if stale {
                node.last_seen = now;
                return;
            }
        }
        self.remove_node(&node_id);
        let mut node = Node::new(Some(started_ms), now);
        node.seq = seq;
        self.nodes.insert(node_id.clone(), node);
        for c in conns {
            self.change(
                &node_id,
                Change::Connect {
                    conn: c.conn.clone(),
                    user: c.user,
                    since_ms: c.since_ms,
                },
            );
            for r in c.rooms {
                self.change(
                    &node_id,
                    Change::Join {
                        conn: c.conn.clone(),
                        room: r.room,
                        meta: r.meta,
                    },
                );
            }
        }
    }

    /// Starts tracking an edge whose earlier reports the view has not seen,
    /// and asks it for a snapshot unless the start-up request covers it.
    fn insert_awaiting(
        &mut self,
        node_id: String,
        started_ms: Option<u64>,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        let mut node = Node::new(started_ms, now);
        match self.sync_all_at {
            Some(at) if now.saturating_duration_since(at) < self.sync_retry => {
                node.sync = SyncState::Awaiting { asked_at: at };
            }
            _ => {
                node.sync = SyncState::Awaiting { asked_at: now };
                fx.push(Effect::AskSync {
                    node: node_id.clone(),
                });
            }
        }
        self.nodes.insert(node_id, node);
    }

    /// Applies one change reported by `node_id`, which must be tracked.
    fn change(&mut self, node_id: &str, change: Change) {
        match change {
            Change::Connect {
                conn,
                user,
                since_ms,
            } => {
                // Connection ids are unique in the cluster; a repeat replaces.
                self.remove_conn(&conn);
                self.users
                    .entry(user.clone())
                    .or_default()
                    .insert(conn.clone());
                if let Some(node) = self.nodes.get_mut(node_id) {
                    node.conns.insert(conn.clone());
                }
                self.conns.insert(
                    conn,
                    Conn {
                        user,
                        node: node_id.to_string(),
                        since_ms,
                        rooms: HashMap::new(),
                    },
                );
            }
            Change::Disconnect { conn } => {
                if self.conns.get(&conn).is_some_and(|c| c.node == node_id) {
                    self.remove_conn(&conn);
                }
            }
            Change::Join { conn, room, meta } => {
                if let Some(c) = self.conns.get_mut(&conn)
                    && c.node == node_id
                {
                    c.rooms.insert(room.clone(), meta);
                    self.rooms.entry(room).or_default().insert(conn);
                }
            }
            Change::Leave { conn, room } => {
                if let Some(c) = self.conns.get_mut(&conn)
                    && c.node == node_id
                    && c.rooms.remove(&room).is_some()
                {
                    unindex(&mut self.rooms, &room, &conn);
                }
            }
            Change::Meta { conn, room, meta } => {
                if let Some(c) = self.conns.get_mut(&conn)
                    && c.node == node_id
                    && let Some(m) = c.rooms.get_mut(&room)
                {
                    *m = Some(meta);
                }
            }
        }
    }

    /// Removes a connection from every index; the single place a connection
    /// goes away (disconnect, snapshot, restart, goodbye, reaping).
    fn remove_conn(&mut self, conn_id: &str) -> Option<Conn> {
        let conn = self.conns.remove(conn_id)?;
        for room in conn.rooms.keys() {
            unindex(&mut self.rooms, room, conn_id);
        }
        // When this empties the user's set, the user's last connection is
        // gone: the offline grace timer (presence events) starts here.
        unindex(&mut self.users, &conn.user, conn_id);
        if let Some(node) = self.nodes.get_mut(&conn.node) {
            node.conns.remove(conn_id);
        }
        Some(conn)
    }

    /// Forgets an edge and all its connections; returns how many it held.
    fn remove_node(&mut self, node_id: &str) -> usize {
        let Some(node) = self.nodes.remove(node_id) else {
            return 0;
        };
        let n = node.conns.len();
        for conn in &node.conns {
            self.remove_conn(conn);
        }
        n
    }

    /// Whether the view has applied report `seq` of `node` (read-your-writes).
    pub fn has_applied(&self, node: &str, seq: u64) -> bool {
        self.nodes.get(node).is_some_and(|n| n.seq >= seq)
    }

    /// The last report position applied for `node`, if the view tracks it.
    pub fn applied_seq(&self, node: &str) -> Option<u64> {
        self.nodes.get(node).map(|n| n.seq)
    }

    /// Whether the view waits for a snapshot from `node`.
    pub fn is_syncing(&self, node: &str) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|n| matches!(n.sync, SyncState::Awaiting { .. }))
    }

    pub fn conn(&self, conn: &str) -> Option<&Conn> {
        self.conns.get(conn)
    }

    pub fn stats(&self) -> Stats {
        Stats {
            nodes: self.nodes.len(),
            conns: self.conns.len(),
            users: self.users.len(),
            rooms: self.rooms.len(),
        }
    }

    /// The members of `room`, grouped by user, sorted by user then connection.
    pub fn room_members(&self, room: &str) -> RoomMembersReply {
        let mut conns: Vec<(&str, &Conn)> = self
            .rooms
            .get(room)
            .into_iter()
            .flatten()
            .filter_map(|id| self.conns.get(id).map(|c| (id.as_str(), c)))
            .collect();
        conns.sort_unstable_by(|a, b| (&a.1.user, a.0).cmp(&(&b.1.user, b.0)));
        let mut members: Vec<Member> = Vec::new();
        for (id, c) in conns {
            let meta = c
                .rooms
                .get(room)
                .and_then(|m| m.as_ref())
                .map(Value::to_string)
                .unwrap_or_default();
            let entry = connection(id, c, meta);
            match members.last_mut() {
                Some(m) if m.user == c.user => m.conns.push(entry),
                _ => members.push(Member {
                    user: c.user.clone(),
                    conns: vec![entry],
                }),
            }
        }
        RoomMembersReply {
            room: room.to_string(),
            members,
        }
    }

    /// Whether each user is online (has a connection), with its connections
    /// sorted by id, in the order asked.
    pub fn user_status(&self, users: &[String]) -> UserStatusReply {
        let users = users
            .iter()
            .map(|user| {
                let mut conns: Vec<Connection> = self
                    .users
                    .get(user)
                    .into_iter()
                    .flatten()
                    .filter_map(|id| self.conns.get(id).map(|c| connection(id, c, String::new())))
                    .collect();
                conns.sort_unstable_by(|a, b| a.conn.cmp(&b.conn));
                UserStatus {
                    user: user.clone(),
                    online: !conns.is_empty(),
                    conns,
                }
            })
            .collect();
        UserStatusReply { users }
    }

    /// Checks that every index agrees with the connections (tests).
    #[cfg(test)]
    fn assert_consistent(&self) {
        for (id, c) in &self.conns {
            assert!(self.users[&c.user].contains(id), "user index misses {id}");
            assert!(self.nodes[&c.node].conns.contains(id), "node misses {id}");
            for room in c.rooms.keys() {
                assert!(self.rooms[room].contains(id), "room {room} misses {id}");
            }
        }
        for (room, set) in &self.rooms {
            assert!(!set.is_empty(), "empty room entry {room}");
            for id in set {
                assert!(
                    self.conns[id].rooms.contains_key(room),
                    "{room} holds gone {id}"
                );
            }
        }
        for (user, set) in &self.users {
            assert!(!set.is_empty(), "empty user entry {user}");
            for id in set {
                assert_eq!(&self.conns[id].user, user, "{user} holds gone {id}");
            }
        }
        for (node_id, n) in &self.nodes {
            for id in &n.conns {
                assert_eq!(&self.conns[id].node, node_id, "{node_id} holds gone {id}");
            }
        }
    }
}

/// Marks `node` as behind and asks it for a snapshot, at most once per
/// `retry`.
fn ask(node: &mut Node, node_id: &str, retry: Duration, now: Instant, fx: &mut Vec<Effect>) {
    if let SyncState::Awaiting { asked_at } = node.sync
        && now.saturating_duration_since(asked_at) < retry
    {
        return;
    }
    node.sync = SyncState::Awaiting { asked_at: now };
    fx.push(Effect::AskSync {
        node: node_id.to_string(),
    });
}

/// Removes `conn` from `key`'s set, dropping the set when it empties.
fn unindex(index: &mut HashMap<String, HashSet<String>>, key: &str, conn: &str) {
    if let Some(set) = index.get_mut(key) {
        set.remove(conn);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

fn connection(id: &str, c: &Conn, meta: String) -> Connection {
    Connection {
        conn: id.to_string(),
        user: c.user.clone(),
        node: c.node.clone(),
        since_ms: c.since_ms,
        meta,
    }
}

#[cfg(test)]
mod tests;
