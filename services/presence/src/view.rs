//! The presence view: a pure state machine that folds the edges' reports into
//! "which connections exist, on which edge, for which user, in which rooms",
//! derives the presence events those changes mean, and answers queries. No
//! I/O and no clock: the caller passes `now` in and carries out the
//! [`Effect`]s it returns, so every rule here is tested without a broker or a
//! timer.
//!
//! Each edge numbers its deltas 1, 2, 3, … per process; the view applies them
//! strictly in order. When a report shows that one was missed (a gap, an
//! unknown edge, a heartbeat ahead of the view, a count that disagrees) the
//! view asks that edge for a snapshot and ignores its deltas until the
//! snapshot arrives; the snapshot is then diffed against what the view held,
//! so it yields the changes it reveals and nothing else.
//!
//! Events. Rooms: `join`, `leave`, `update` per connection, except in quiet
//! rooms (namespaces without presence events). Users: `online` when the first
//! connection appears, `offline` only when the last one has been gone for the
//! grace period; a connection arriving within the grace period cancels it
//! without any event. For a `warmup` period after start, a snapshot of an
//! edge the view has never held state for is discovery, not change: it emits
//! nothing (this is what keeps a restarted replica from announcing the whole
//! cluster coming online).
//!
//! Updates cost O(1) in the number of connections and rooms (grace deadlines
//! sit in a queue ordered by construction, since every grace period is equally
//! long); snapshots and removing an edge cost O(that edge's connections).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use herald_proto::v1::{Connection, Member, RoomMembersReply, UserStatus, UserStatusReply};
use herald_wire::frames::PresenceEvent;
use herald_wire::presence::{Change, ConnState, EdgeReport, UserTransition};
use serde_json::Value;
use tokio::time::Instant;

use crate::Config;

/// Something the owner of the view must do after an update, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Publish a sync request to this edge: the view missed some of its
    /// reports and waits for a snapshot.
    AskSync { node: String },
    /// A connection joined, left or updated its metadata in a room.
    Room(RoomEvent),
    /// A user came online or went offline.
    User(UserChange),
}

/// A room presence event of one connection.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomEvent {
    pub event: PresenceEvent,
    pub room: String,
    pub user: String,
    pub conn: String,
    pub node: String,
    /// The connection's metadata in the room (for `leave`, what it was).
    pub meta: Option<Value>,
    /// The edge reported this change as it happened, and announces it to the
    /// room itself. `false` when the view inferred it: an edge reaped, gone,
    /// restarted, or a snapshot that revealed changes the view missed; the
    /// room has heard of such a `leave` from nobody.
    pub announced: bool,
}

/// A user's online/offline transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserChange {
    pub user: String,
    pub event: UserTransition,
    /// The connection that caused it: the first to appear, or the last to go.
    pub conn: String,
    /// That connection's edge.
    pub node: String,
}

impl UserChange {
    /// `<user>:<online|offline>:<conn>`: the same on every replica that
    /// computes the transition, so consumers can drop repeats.
    pub fn id(&self) -> String {
        let event = match self.event {
            UserTransition::Online => "online",
            UserTransition::Offline => "offline",
        };
        format!("{}:{event}:{}", self.user, self.conn)
    }
}

/// One connection as the view knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Conn {
    pub user: String,
    /// The edge holding the connection (its id, shared by all of them).
    pub node: Arc<str>,
    pub since_ms: u64,
    /// Rooms with presence the connection is in (few: the edge bounds them),
    /// in name order so that events about several rooms come out the same on
    /// every replica.
    pub rooms: BTreeMap<String, RoomEntry>,
}

/// A connection's membership in one room.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomEntry {
    pub meta: Option<Value>,
    /// The room announces no presence events.
    pub quiet: bool,
}

/// Sizes of the view, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub nodes: usize,
    pub conns: usize,
    /// Users online: with a connection, or within their grace period.
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
    /// The view has held this edge's state (a snapshot or its first delta):
    /// what a later snapshot shows is change. Until then it is discovery.
    discovered: bool,
    conns: HashSet<String>,
    /// The edge's id, which every connection of it shares.
    name: Arc<str>,
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
    fn new(name: &str, started_ms: Option<u64>, now: Instant, discovered: bool) -> Node {
        Node {
            name: name.into(),
            started_ms,
            seq: 0,
            last_seen: now,
            sync: SyncState::Current,
            discovered,
            conns: HashSet::new(),
        }
    }
}

/// A user the view counts as online. Kept small: there is one per online
/// user, in a map whose tables are up to twice the entries.
#[derive(Debug, Default)]
struct User {
    conns: Devices,
    /// Set while `conns` is empty: the user is still online until the grace
    /// period ends.
    grace: Option<Box<Grace>>,
}

/// A user's connections. Most users have one or two: a vector grown one at
/// a time holds one in 24 bytes, where a hash set's smallest table takes
/// over a hundred; a user with more than [`Devices::FEW`] gets a set.
#[derive(Debug)]
enum Devices {
    Few(Vec<String>),
    Many(HashSet<String>),
}

impl Default for Devices {
    fn default() -> Devices {
        Devices::Few(Vec::new())
    }
}

impl Devices {
    const FEW: usize = 8;

    fn insert(&mut self, conn: String) {
        match self {
            Devices::Few(few) if few.contains(&conn) => {}
            Devices::Few(few) if few.len() < Self::FEW => {
                few.reserve_exact(1);
                few.push(conn);
            }
            Devices::Few(few) => {
                let mut many: HashSet<String> = few.drain(..).collect();
                many.insert(conn);
                *self = Devices::Many(many);
            }
            Devices::Many(many) => {
                many.insert(conn);
            }
        }
    }

    fn remove(&mut self, conn: &str) {
        match self {
            Devices::Few(few) => {
                if let Some(i) = few.iter().position(|c| c == conn) {
                    few.swap_remove(i);
                    few.shrink_to_fit();
                }
            }
            Devices::Many(many) => {
                many.remove(conn);
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Devices::Few(few) => few.is_empty(),
            Devices::Many(many) => many.is_empty(),
        }
    }

    #[cfg(test)]
    fn contains(&self, conn: &str) -> bool {
        match self {
            Devices::Few(few) => few.iter().any(|c| c == conn),
            Devices::Many(many) => many.contains(conn),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &String> {
        let (few, many) = match self {
            Devices::Few(few) => (Some(few.iter()), None),
            Devices::Many(many) => (None, Some(many.iter())),
        };
        few.into_iter().flatten().chain(many.into_iter().flatten())
    }
}

#[derive(Debug)]
struct Grace {
    /// Matches the entry in `View::graces` that ends this period; an entry
    /// whose number no longer matches was cancelled.
    epoch: u64,
    /// The last connection to go, and its edge (the offline event names it).
    conn: String,
    node: Arc<str>,
}

/// The cluster's presence state, owned by one task.
#[derive(Debug)]
pub struct View {
    edge_timeout: Duration,
    sync_retry: Duration,
    grace: Duration,
    /// Before this, snapshots of undiscovered edges emit no events.
    warm_until: Instant,
    /// When every edge was last asked for a snapshot at once (start-up): an
    /// edge first heard of soon after need not be asked again.
    sync_all_at: Option<Instant>,
    nodes: HashMap<String, Node>,
    conns: HashMap<String, Conn>,
    /// room → connections in it.
    rooms: HashMap<String, HashSet<String>>,
    /// user → connections, for every online user.
    users: HashMap<String, User>,
    /// Grace periods in the order they end (all are equally long, so that is
    /// the order they started): (deadline, user, epoch).
    graces: VecDeque<(Instant, String, u64)>,
    next_epoch: u64,
    /// Set while a snapshot is discovery: nothing is emitted.
    silent: bool,
    /// Effects of the update in progress.
    out: Vec<Effect>,
}

impl View {
    /// A view started at `now`: `config` gives the edge timeout, the sync
    /// retry interval, the grace period and the warm-up.
    pub fn new(config: &Config, now: Instant) -> View {
        View {
            edge_timeout: config.edge_timeout,
            sync_retry: config.sync_retry,
            grace: config.grace,
            warm_until: now + config.warmup,
            sync_all_at: None,
            nodes: HashMap::new(),
            conns: HashMap::new(),
            rooms: HashMap::new(),
            users: HashMap::new(),
            graces: VecDeque::new(),
            next_epoch: 0,
            silent: false,
            out: Vec::new(),
        }
    }

    /// Records that every edge was just asked for a snapshot.
    pub fn asked_all(&mut self, now: Instant) {
        self.sync_all_at = Some(now);
    }

    /// The replica hears the broker again after losing it: nothing it did
    /// not hear meanwhile says an edge went silent, so every edge gets a
    /// whole `edge_timeout` again from now, and is asked for a snapshot, whose
    /// diff against the view turns into events only what really changed.
    pub fn heard_again(&mut self, now: Instant) -> Vec<Effect> {
        for node in self.nodes.values_mut() {
            node.last_seen = now;
        }
        self.sync_all_at = Some(now);
        let mut ids: Vec<&String> = self.nodes.keys().collect();
        ids.sort_unstable();
        ids.into_iter()
            .map(|node| Effect::AskSync { node: node.clone() })
            .collect()
    }

    /// Whether the warm-up is over.
    pub fn is_warm(&self, now: Instant) -> bool {
        now >= self.warm_until
    }

    pub fn warm_until(&self) -> Instant {
        self.warm_until
    }

    /// Folds one report into the view.
    pub fn apply(&mut self, report: EdgeReport, now: Instant) -> Vec<Effect> {
        self.expire_graces(now);
        match report {
            EdgeReport::Delta { node, seq, change } => self.delta(node, seq, change, now),
            EdgeReport::Deltas { node, seq, changes } => {
                // Numbered like the deltas they stand for; a batch claiming
                // more changes than numbers starts at 0, which the view
                // takes as already applied, and the next heartbeat resyncs.
                let first = (seq + 1).saturating_sub(changes.len() as u64);
                for (n, change) in (first..).zip(changes) {
                    self.delta(node.clone(), n, change, now);
                }
            }
            EdgeReport::Heartbeat {
                node,
                seq,
                started_ms,
                conns,
            } => self.heartbeat(node, seq, started_ms, conns, now),
            EdgeReport::Snapshot {
                node,
                seq,
                started_ms,
                conns,
            } => self.snapshot(node, seq, started_ms, conns, now),
            EdgeReport::Goodbye { node, .. } => {
                // Whatever the edge still held, it did not announce leaving.
                self.remove_node(&node, now);
            }
        }
        std::mem::take(&mut self.out)
    }

    /// Periodic work: ends grace periods that are over, removes edges silent
    /// for `edge_timeout` (returned with how many connections each held) and
    /// repeats sync requests that went unanswered for `sync_retry`.
    pub fn tick(&mut self, now: Instant) -> (Vec<Effect>, Vec<(String, usize)>) {
        self.expire_graces(now);
        let timeout = self.edge_timeout;
        let mut dead: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| now.saturating_duration_since(n.last_seen) >= timeout)
            .map(|(id, _)| id.clone())
            .collect();
        dead.sort_unstable();
        let reaped = dead
            .into_iter()
            .map(|id| {
                let gone = self.remove_node(&id, now);
                (id, gone)
            })
            .collect();
        let retry = self.sync_retry;
        for (id, node) in &mut self.nodes {
            if let SyncState::Awaiting { asked_at } = node.sync
                && now.saturating_duration_since(asked_at) >= retry
            {
                node.sync = SyncState::Awaiting { asked_at: now };
                self.out.push(Effect::AskSync { node: id.clone() });
            }
        }
        (std::mem::take(&mut self.out), reaped)
    }

    /// Removes an edge at once (its pod is gone): its connections leave their
    /// rooms and their users start the grace period. Returns the effects and
    /// how many connections it held.
    pub fn reap(&mut self, node: &str, now: Instant) -> (Vec<Effect>, usize) {
        self.expire_graces(now);
        let gone = self.remove_node(node, now);
        (std::mem::take(&mut self.out), gone)
    }

    /// Ends the grace periods due by `now`: the users still without a
    /// connection go offline.
    pub fn expire(&mut self, now: Instant) -> Vec<Effect> {
        self.expire_graces(now);
        std::mem::take(&mut self.out)
    }

    /// When the next grace period ends (possibly one since cancelled: calling
    /// [`View::expire`] then just discards it).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.graces.front().map(|(at, _, _)| *at)
    }

    fn expire_graces(&mut self, now: Instant) {
        while self.graces.front().is_some_and(|(at, _, _)| *at <= now) {
            let Some((_, user, epoch)) = self.graces.pop_front() else {
                break;
            };
            let due = self.users.get(&user).is_some_and(|u| {
                u.conns.is_empty() && u.grace.as_ref().is_some_and(|g| g.epoch == epoch)
            });
            if !due {
                continue;
            }
            let grace = self
                .users
                .remove(&user)
                .and_then(|u| u.grace)
                .expect("checked above");
            self.emit(Effect::User(UserChange {
                user,
                event: UserTransition::Offline,
                conn: grace.conn,
                node: grace.node.to_string(),
            }));
        }
    }

    fn delta(&mut self, node_id: String, seq: u64, change: Change, now: Instant) {
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
            self.remove_node(&node_id, now);
            let mut node = Node::new(&node_id, started_ms, now, true);
            node.seq = 1;
            self.nodes.insert(node_id.clone(), node);
            self.change(&node_id, change, now);
            return;
        }
        let retry = self.sync_retry;
        let Some(node) = self.nodes.get_mut(&node_id) else {
            self.insert_awaiting(node_id, None, false, now);
            return;
        };
        node.last_seen = now;
        match node.sync {
            SyncState::Awaiting { .. } => ask(node, &node_id, retry, now, &mut self.out),
            SyncState::Current if seq <= node.seq => {}
            SyncState::Current if seq > node.seq + 1 => {
                ask(node, &node_id, retry, now, &mut self.out)
            }
            SyncState::Current => {
                node.seq = seq;
                self.change(&node_id, change, now);
            }
        }
    }

    fn heartbeat(&mut self, node_id: String, seq: u64, started_ms: u64, conns: u64, now: Instant) {
        let restarted = self
            .nodes
            .get(&node_id)
            .filter(|n| n.started_ms.is_some_and(|s| s != started_ms))
            .map(|n| n.discovered);
        if let Some(discovered) = restarted {
            // Its old connections went with the old process, unannounced.
            self.remove_node(&node_id, now);
            if seq == 0 && conns == 0 {
                self.nodes.insert(
                    node_id.clone(),
                    Node::new(&node_id, Some(started_ms), now, true),
                );
            } else {
                // What the new process holds arrived since: change, if the
                // old one's state was known.
                self.insert_awaiting(node_id, Some(started_ms), discovered, now);
            }
            return;
        }
        let retry = self.sync_retry;
        let Some(node) = self.nodes.get_mut(&node_id) else {
            if seq == 0 && conns == 0 {
                // An edge that never had a connection: nothing to fetch.
                self.nodes.insert(
                    node_id.clone(),
                    Node::new(&node_id, Some(started_ms), now, true),
                );
            } else {
                self.insert_awaiting(node_id, Some(started_ms), false, now);
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
            ask(node, &node_id, retry, now, &mut self.out);
        }
    }

    /// Replaces what the view holds for the edge with its snapshot, emitting
    /// the difference (or nothing, for discovery during the warm-up).
    fn snapshot(
        &mut self,
        node_id: String,
        seq: u64,
        started_ms: u64,
        conns: Vec<ConnState>,
        now: Instant,
    ) {
        let discovered = match self.nodes.get_mut(&node_id) {
            Some(node) => {
                let stale = node.sync == SyncState::Current
                    && node.started_ms == Some(started_ms)
                    && seq < node.seq;
                if stale {
                    node.last_seen = now;
                    return;
                }
                if node.started_ms.is_some_and(|s| s != started_ms) {
                    // Another process: none of the old connections survive.
                    let d = node.discovered;
                    self.remove_node(&node_id, now);
                    self.nodes
                        .insert(node_id.clone(), Node::new(&node_id, None, now, d));
                }
                self.nodes[&node_id].discovered
            }
            None => {
                self.nodes
                    .insert(node_id.clone(), Node::new(&node_id, None, now, false));
                false
            }
        };
        {
            let node = self.nodes.get_mut(&node_id).expect("inserted above");
            node.started_ms = Some(started_ms);
            node.seq = seq;
            node.last_seen = now;
            node.sync = SyncState::Current;
            node.discovered = true;
        }

        // Connections the edge no longer has (or that changed hands) left
        // without the view hearing of it. Sorted: every replica names the
        // same last connection of a user.
        let present: HashMap<&str, &str> = conns
            .iter()
            .map(|c| (c.conn.as_str(), c.user.as_str()))
            .collect();
        let mut gone: Vec<String> = self.nodes[&node_id]
            .conns
            .iter()
            .filter(|id| {
                present
                    .get(id.as_str())
                    .is_none_or(|user| self.conns.get(id.as_str()).is_none_or(|c| c.user != *user))
            })
            .cloned()
            .collect();
        gone.sort_unstable();
        for id in gone {
            self.remove_conn(&id, false, now);
        }

        self.silent = !discovered && !self.is_warm(now);
        for c in conns {
            let held = self
                .conns
                .get(&c.conn)
                .is_some_and(|held| *held.node == *node_id);
            if !held {
                self.connect(&node_id, c.conn.clone(), c.user, c.since_ms, false, now);
                for r in c.rooms {
                    self.join(&node_id, &c.conn, r.room, r.meta, r.quiet, false);
                }
                continue;
            }
            let mut wanted: HashMap<String, (Option<Value>, bool)> = c
                .rooms
                .into_iter()
                .map(|r| (r.room, (r.meta, r.quiet)))
                .collect();
            let held = self.conns.get_mut(&c.conn).expect("checked above");
            held.since_ms = c.since_ms;
            let left: Vec<String> = held
                .rooms
                .keys()
                .filter(|room| !wanted.contains_key(room.as_str()))
                .cloned()
                .collect();
            for room in left {
                self.leave(&c.conn, &room, false);
            }
            let held = &self.conns[&c.conn];
            let mut updates = Vec::new();
            let mut joins = Vec::new();
            for (room, entry) in &held.rooms {
                if let Some((meta, quiet)) = wanted.remove(room)
                    && (entry.meta != meta || entry.quiet != quiet)
                {
                    updates.push((room.clone(), meta, quiet));
                }
            }
            joins.extend(wanted);
            joins.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (room, meta, quiet) in updates {
                self.update(&c.conn, &room, meta, Some(quiet), false);
            }
            for (room, (meta, quiet)) in joins {
                self.join(&node_id, &c.conn, room, meta, quiet, false);
            }
        }
        self.silent = false;
    }

    /// Starts tracking an edge whose earlier reports the view has not seen,
    /// and asks it for a snapshot unless the start-up request covers it.
    fn insert_awaiting(
        &mut self,
        node_id: String,
        started_ms: Option<u64>,
        discovered: bool,
        now: Instant,
    ) {
        let mut node = Node::new(&node_id, started_ms, now, discovered);
        match self.sync_all_at {
            Some(at) if now.saturating_duration_since(at) < self.sync_retry => {
                node.sync = SyncState::Awaiting { asked_at: at };
            }
            _ => {
                node.sync = SyncState::Awaiting { asked_at: now };
                self.out.push(Effect::AskSync {
                    node: node_id.clone(),
                });
            }
        }
        self.nodes.insert(node_id, node);
    }

    /// Applies one change reported by `node_id`, which must be tracked.
    fn change(&mut self, node_id: &str, change: Change, now: Instant) {
        match change {
            Change::Connect {
                conn,
                user,
                since_ms,
            } => self.connect(node_id, conn, user, since_ms, true, now),
            Change::Disconnect { conn } => {
                // The edge announces its live connections' leaves itself.
                if self.conns.get(&conn).is_some_and(|c| &*c.node == node_id) {
                    self.remove_conn(&conn, true, now);
                }
            }
            Change::Join {
                conn,
                room,
                meta,
                quiet,
            } => self.join(node_id, &conn, room, meta, quiet, true),
            Change::Leave { conn, room } => {
                if self.conns.get(&conn).is_some_and(|c| &*c.node == node_id) {
                    self.leave(&conn, &room, true);
                }
            }
            Change::Meta { conn, room, meta } => {
                if self.conns.get(&conn).is_some_and(|c| &*c.node == node_id) {
                    self.update(&conn, &room, Some(meta), None, true);
                }
            }
        }
    }

    fn connect(
        &mut self,
        node_id: &str,
        conn: String,
        user: String,
        since_ms: u64,
        announced: bool,
        now: Instant,
    ) {
        // Connection ids are unique in the cluster; a repeat replaces.
        self.remove_conn(&conn, announced, now);
        let entry = self.users.entry(user.clone()).or_default();
        let first = entry.conns.is_empty();
        entry.conns.insert(conn.clone());
        // Back within the grace period: as if never gone, no event at all.
        if first && entry.grace.take().is_none() {
            self.emit(Effect::User(UserChange {
                user: user.clone(),
                event: UserTransition::Online,
                conn: conn.clone(),
                node: node_id.to_string(),
            }));
        }
        let node = match self.nodes.get_mut(node_id) {
            Some(node) => {
                node.conns.insert(conn.clone());
                node.name.clone()
            }
            None => node_id.into(),
        };
        self.conns.insert(
            conn,
            Conn {
                user,
                node,
                since_ms,
                rooms: BTreeMap::new(),
            },
        );
    }

    /// Puts `conn` (of `node_id`) in `room`; a repeat join updates the meta.
    fn join(
        &mut self,
        node_id: &str,
        conn_id: &str,
        room: String,
        meta: Option<Value>,
        quiet: bool,
        announced: bool,
    ) {
        let Some(c) = self.conns.get_mut(conn_id).filter(|c| &*c.node == node_id) else {
            return;
        };
        if c.rooms.contains_key(&room) {
            self.update(conn_id, &room, meta, Some(quiet), announced);
            return;
        }
        c.rooms.insert(
            room.clone(),
            RoomEntry {
                meta: meta.clone(),
                quiet,
            },
        );
        self.rooms
            .entry(room.clone())
            .or_default()
            .insert(conn_id.to_string());
        if !quiet {
            let c = &self.conns[conn_id];
            let event = room_event(PresenceEvent::Join, room, conn_id, c, meta, announced);
            self.emit(Effect::Room(event));
        }
    }

    fn leave(&mut self, conn_id: &str, room: &str, announced: bool) {
        let Some(c) = self.conns.get_mut(conn_id) else {
            return;
        };
        let Some(entry) = c.rooms.remove(room) else {
            return;
        };
        unindex(&mut self.rooms, room, conn_id);
        if !entry.quiet {
            let c = &self.conns[conn_id];
            let event = room_event(
                PresenceEvent::Leave,
                room.to_string(),
                conn_id,
                c,
                entry.meta,
                announced,
            );
            self.emit(Effect::Room(event));
        }
    }

    /// Sets a member's meta (and quietness, when given); `update` unless the
    /// room is quiet or, for a repeat join, nothing changed.
    fn update(
        &mut self,
        conn_id: &str,
        room: &str,
        meta: Option<Value>,
        quiet: Option<bool>,
        announced: bool,
    ) {
        let Some(entry) = self
            .conns
            .get_mut(conn_id)
            .and_then(|c| c.rooms.get_mut(room))
        else {
            return;
        };
        let repeat_join = quiet.is_some();
        if let Some(q) = quiet {
            entry.quiet = q;
        }
        if repeat_join && entry.meta == meta {
            return;
        }
        entry.meta = meta.clone();
        if !entry.quiet {
            let c = &self.conns[conn_id];
            let event = room_event(
                PresenceEvent::Update,
                room.to_string(),
                conn_id,
                c,
                meta,
                announced,
            );
            self.emit(Effect::Room(event));
        }
    }

    /// Removes a connection from every index; the single place a connection
    /// goes away (disconnect, snapshot, restart, goodbye, reaping). Its rooms
    /// get `leave` events; its user's grace period starts when it was the
    /// user's last connection.
    fn remove_conn(&mut self, conn_id: &str, announced: bool, now: Instant) -> Option<Conn> {
        let conn = self.conns.remove(conn_id)?;
        for (room, entry) in &conn.rooms {
            unindex(&mut self.rooms, room, conn_id);
            if !entry.quiet {
                let event = room_event(
                    PresenceEvent::Leave,
                    room.clone(),
                    conn_id,
                    &conn,
                    entry.meta.clone(),
                    announced,
                );
                self.emit(Effect::Room(event));
            }
        }
        if let Some(user) = self.users.get_mut(&conn.user) {
            user.conns.remove(conn_id);
            if user.conns.is_empty() {
                let epoch = self.next_epoch;
                self.next_epoch += 1;
                user.grace = Some(Box::new(Grace {
                    epoch,
                    conn: conn_id.to_string(),
                    node: conn.node.clone(),
                }));
                self.graces
                    .push_back((now + self.grace, conn.user.clone(), epoch));
            }
        }
        if let Some(node) = self.nodes.get_mut(&*conn.node) {
            node.conns.remove(conn_id);
        }
        Some(conn)
    }

    /// Forgets an edge and all its connections, none of which announced
    /// leaving; returns how many it held.
    fn remove_node(&mut self, node_id: &str, now: Instant) -> usize {
        let Some(node) = self.nodes.remove(node_id) else {
            return 0;
        };
        let mut conns: Vec<String> = node.conns.into_iter().collect();
        // Every replica names the same last connection of a user.
        conns.sort_unstable();
        for conn in &conns {
            self.remove_conn(conn, false, now);
        }
        conns.len()
    }

    fn emit(&mut self, effect: Effect) {
        if !self.silent {
            self.out.push(effect);
        }
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
                .and_then(|e| e.meta.as_ref())
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

    /// Whether each user is online, with its connections sorted by id, in the
    /// order asked. A user within the grace period is online with none.
    pub fn user_status(&self, users: &[String]) -> UserStatusReply {
        let users = users
            .iter()
            .map(|user| {
                let entry = self.users.get(user);
                let mut conns: Vec<Connection> = entry
                    .into_iter()
                    .flat_map(|u| u.conns.iter())
                    .filter_map(|id| self.conns.get(id).map(|c| connection(id, c, String::new())))
                    .collect();
                conns.sort_unstable_by(|a, b| a.conn.cmp(&b.conn));
                UserStatus {
                    user: user.clone(),
                    online: entry.is_some(),
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
            assert!(
                self.users[&c.user].conns.contains(id),
                "user index misses {id}"
            );
            assert!(self.nodes[&*c.node].conns.contains(id), "node misses {id}");
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
        for (user, u) in &self.users {
            assert_eq!(
                u.conns.is_empty(),
                u.grace.is_some(),
                "{user}: a grace period exactly when no connection"
            );
            for id in u.conns.iter() {
                assert_eq!(&self.conns[id].user, user, "{user} holds gone {id}");
            }
        }
        for (node_id, n) in &self.nodes {
            for id in &n.conns {
                assert_eq!(
                    &*self.conns[id].node,
                    node_id.as_str(),
                    "{node_id} holds gone {id}"
                );
            }
        }
    }
}

/// Marks `node` as behind and asks it for a snapshot, at most once per
/// `retry`.
fn ask(node: &mut Node, node_id: &str, retry: Duration, now: Instant, out: &mut Vec<Effect>) {
    if let SyncState::Awaiting { asked_at } = node.sync
        && now.saturating_duration_since(asked_at) < retry
    {
        return;
    }
    node.sync = SyncState::Awaiting { asked_at: now };
    out.push(Effect::AskSync {
        node: node_id.to_string(),
    });
}

fn room_event(
    event: PresenceEvent,
    room: String,
    conn_id: &str,
    c: &Conn,
    meta: Option<Value>,
    announced: bool,
) -> RoomEvent {
    RoomEvent {
        event,
        room,
        user: c.user.clone(),
        conn: conn_id.to_string(),
        node: c.node.to_string(),
        meta,
        announced,
    }
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
        node: c.node.to_string(),
        since_ms: c.since_ms,
        meta,
    }
}

#[cfg(test)]
mod tests;
