//! Local interest: which of this edge's connections are in which room. The
//! edge subscribes to a room's subject (`herald.room.<room>`) only while it
//! has a local member, and each message that arrives goes to the members
//! through a handler. Keys whose subject belongs to a shard (personal rooms,
//! `herald.user.<shard>.<room>`) share one subscription per shard instead,
//! held while any local key of the shard has members: a subscription per
//! key would cost every idle connection its client-side buffers.
//!
//! A key stays for [`LINGER`] after its last local member left, with its
//! subscription, or in its shard's: a room that empties and fills again
//! within that (a user reconnecting, a room whose few members come and go)
//! costs the broker no unsubscribe and subscribe, and its next join no init;
//! what its handler learned meanwhile (a durable room's position, a user's
//! read markers) is still there.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::collections::hash_map::Entry as MapEntry;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use herald_broker::{BoxFuture, BrokerError, Message, SharedBroker, Subscription};
use herald_wire::CloseCode;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;

use crate::delivery::{Flusher, Outbox, Sends};

/// How long a key's own subscription outlives its last local member.
pub const LINGER: Duration = Duration::from_secs(10);
/// Keys without members kept subscribed at most; beyond it the oldest go
/// at once, so that rooms joined once each do not pile up subscriptions.
const MAX_LINGERING: usize = 4096;

/// Messages a pump hands over in one delivery batch, at most: enough to
/// coalesce a burst into one write per connection, few enough that one
/// busy subscription does not hold its worker thread for long.
const PUMP_BATCH: usize = 64;

/// One member of a key.
pub struct Slot {
    pub outbox: Outbox,
    /// While the member replays history, live frames wait here so that it
    /// sees every message once and in order; `None` once it is live.
    pub held: Option<Vec<Bytes>>,
}

/// Whether holding `frame` too would pass what the member's queue may hold.
/// Sums the held frames: they are held only while the member recovers, and
/// the frame limit keeps them few.
fn over(held: &[Bytes], frame: &Bytes, limits: crate::delivery::QueueLimits) -> bool {
    held.len() >= limits.frames
        || held
            .iter()
            .map(Bytes::len)
            .sum::<usize>()
            .saturating_add(frame.len())
            > limits.bytes
}

impl Slot {
    /// Sends now, or holds the frame while the member recovers.
    pub fn deliver(&mut self, frame: &Bytes) {
        match &mut self.held {
            // As bounded as the queue: a member that replays slower than
            // the room goes on is a slow consumer too.
            Some(held) if over(held, frame, self.outbox.limits()) => {
                self.outbox.close(
                    CloseCode::SlowConsumer,
                    "too many messages arrived while this connection caught up; it reads too slowly",
                );
            }
            Some(held) => held.push(frame.clone()),
            None => {
                // A full queue disconnects this member alone; the others go on.
                self.outbox.deliver(frame);
            }
        }
    }

    /// [`Slot::deliver`] as one of a fan-out's run of sends.
    pub fn deliver_in<'a>(&'a mut self, frame: &Bytes, sends: &mut Sends<'a>) {
        if self.held.is_some() {
            self.deliver(frame);
        } else {
            sends.send(&self.outbox);
        }
    }
}

/// Members of one key, by local connection id.
pub type Members = RwLock<HashMap<u64, Slot>>;

/// The local state of one key: its members and whatever the handler keeps.
pub struct Entry<S> {
    pub members: Members,
    pub state: S,
    /// Set once the key is fed and initialised: the pump of the key's own
    /// subscription, stopped when the entry is dropped (its last member
    /// left), or `None` when its shard's pump feeds it.
    live: OnceCell<Option<Pump>>,
    /// How many times its last member left: a lingering key is removed only
    /// if no member came and went since the removal was scheduled.
    emptied: AtomicU64,
}

impl<S: Default> Entry<S> {
    /// A new entry, not yet fed by a subscription.
    pub(crate) fn new() -> Arc<Entry<S>> {
        Arc::new(Entry {
            members: Members::default(),
            state: S::default(),
            live: OnceCell::new(),
            emptied: AtomicU64::new(0),
        })
    }
}

struct Pump(JoinHandle<()>);

impl Drop for Pump {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What to do with a message that arrives for a key.
pub type Handler<S> = Arc<dyn Fn(Message, &Arc<Entry<S>>) + Send + Sync>;

/// Runs once the subscription is live, before `join` returns. A key's own
/// subscription delivers nothing before it finished; a shard's may, so the
/// handler's state must hold such messages until init marks it started.
pub type Init<K, S> =
    Arc<dyn Fn(K, Arc<Entry<S>>) -> BoxFuture<'static, Result<(), BrokerError>> + Send + Sync>;

/// Which keys share a subscription, and how to tell them apart again.
struct Sharding<K> {
    /// The wildcard subject of the key's shard; `None` for a key with a
    /// subscription of its own.
    wildcard: fn(&K) -> Option<String>,
    /// The key a message on a shard's wildcard belongs to.
    key: fn(&str) -> Option<K>,
    /// A wildcard matching every shard, and how many shards with keys make
    /// the edge take it instead of a subscription per shard.
    wide: Option<(String, usize)>,
}

/// The one subscription to every shard, once taken ([`Sharding::wide`]).
#[derive(Default)]
struct Wide {
    pump: OnceCell<Pump>,
    /// Set once the subscription is live: shard pumps deliver nothing more
    /// (and their subscriptions go), the wide pump feeds every shard's keys.
    on: Arc<AtomicBool>,
    /// The broker ended it: shards have their own subscriptions again.
    broken: Arc<AtomicBool>,
}

/// One subscription shared by the keys of a shard; dropping it stops the pump.
struct Shard {
    live: OnceCell<Pump>,
    /// How many times its last key left (see [`Entry::emptied`]).
    emptied: AtomicU64,
}

/// A key left without members: when it may go, the entry's `emptied` count
/// then, and its shard's wildcard (`None`: a subscription of its own).
type Lingering<K> = (tokio::time::Instant, K, u64, Option<String>);

struct Table<K, S> {
    keys: HashMap<K, Arc<Entry<S>>>,
    /// Shards with at least one key in `keys`, by wildcard, with that count.
    shards: HashMap<String, (usize, Arc<Shard>)>,
    /// Keys left without members, in the order they emptied: when each may
    /// go, and the entry's `emptied` count then.
    lingering: VecDeque<Lingering<K>>,
    /// Shards left without keys, likewise (at most one per shard).
    lingering_shards: VecDeque<(tokio::time::Instant, String, u64)>,
}

pub struct Interest<K, S> {
    broker: SharedBroker,
    subject: fn(&K) -> String,
    sharding: Option<Sharding<K>>,
    handler: Handler<S>,
    init: Option<Init<K, S>>,
    /// Held only for map updates, never across an await: joins of different
    /// keys do not wait on each other's broker round trips. Shard pumps hold
    /// it weakly to find the entry of each message's key.
    table: Arc<Mutex<Table<K, S>>>,
    count: Gauge,
    /// Set with `--write-delay`: pumps' deliveries wait for its tick.
    flusher: Option<Arc<Flusher>>,
    wide: Wide,
}

impl<K, S> Interest<K, S>
where
    K: Clone + Eq + Hash + Send + 'static,
    S: Default + Send + Sync + 'static,
{
    pub fn new(
        broker: SharedBroker,
        subject: fn(&K) -> String,
        handler: Handler<S>,
        init: Option<Init<K, S>>,
        count: Gauge,
    ) -> Interest<K, S> {
        Interest {
            broker,
            subject,
            sharding: None,
            handler,
            init,
            table: Arc::new(Mutex::new(Table {
                keys: HashMap::new(),
                shards: HashMap::new(),
                lingering: VecDeque::new(),
                lingering_shards: VecDeque::new(),
            })),
            count,
            flusher: None,
            wide: Wide::default(),
        }
    }

    /// Pumps' deliveries are written at `flusher`'s ticks rather than at once.
    pub fn write_delay(mut self, flusher: Arc<Flusher>) -> Interest<K, S> {
        self.flusher = Some(flusher);
        self
    }

    /// Feeds keys for which `wildcard` names a shard from one subscription
    /// to that wildcard; `key` maps a message's subject back to its key.
    pub fn sharded(
        mut self,
        wildcard: fn(&K) -> Option<String>,
        key: fn(&str) -> Option<K>,
    ) -> Interest<K, S> {
        self.sharding = Some(Sharding {
            wildcard,
            key,
            wide: None,
        });
        self
    }

    /// Once `at` shards have keys, feeds every shard from one subscription
    /// to `subject` (a wildcard matching all of them) instead. An edge with
    /// thousands of users holds nearly every shard anyway, so it receives
    /// little more, and each subscription costs the NATS client a channel
    /// of about 6 KiB: 1024 of them were 6 MiB per edge.
    pub fn wide(mut self, subject: String, at: usize) -> Interest<K, S> {
        if let Some(sharding) = &mut self.sharding {
            sharding.wide = Some((subject, at));
        }
        self
    }

    fn shard_of(&self, key: &K) -> Option<String> {
        self.sharding.as_ref().and_then(|s| (s.wildcard)(key))
    }

    /// Adds `member` under `key` (held back when `hold` is set, until
    /// [`release`]). When this returns `Ok`, every message published on the
    /// key's subject from then on reaches the member.
    pub async fn join(
        &self,
        key: &K,
        member: &Outbox,
        hold: bool,
    ) -> Result<Arc<Entry<S>>, BrokerError> {
        let shard_subject = self.shard_of(key);
        let (entry, shard) = {
            let mut table = self.table.lock().expect("interest table");
            let table = &mut *table;
            let entry = match table.keys.entry(key.clone()) {
                MapEntry::Occupied(e) => {
                    if e.get().members.read().expect("members").is_empty() {
                        // A lingering key has members again.
                        self.count.inc();
                    }
                    e.get().clone()
                }
                MapEntry::Vacant(e) => {
                    self.count.inc();
                    if let Some(subject) = &shard_subject {
                        let (keys, _) = table.shards.entry(subject.clone()).or_insert_with(|| {
                            let shard = Shard {
                                live: OnceCell::new(),
                                emptied: AtomicU64::new(0),
                            };
                            (0, Arc::new(shard))
                        });
                        *keys += 1;
                    }
                    e.insert(Entry::new()).clone()
                }
            };
            // The key is in the table, so its shard is too.
            let shard = shard_subject.map(|subject| (table.shards[&subject].1.clone(), subject));
            entry.members.write().expect("members").insert(
                member.id,
                Slot {
                    outbox: member.clone(),
                    held: hold.then(Vec::new),
                },
            );
            (entry, shard)
        };
        let fed = entry
            .live
            .get_or_try_init(|| self.feed(key, &entry, shard))
            .await;
        if let Err(e) = fed {
            self.leave(key, member.id);
            return Err(e);
        }
        Ok(entry)
    }

    /// Makes messages on the key's subject reach `entry`, then initialises it.
    async fn feed(
        &self,
        key: &K,
        entry: &Arc<Entry<S>>,
        shard: Option<(Arc<Shard>, String)>,
    ) -> Result<Option<Pump>, BrokerError> {
        let own = match shard {
            Some((shard, subject)) => {
                if !self.fed_wide().await? {
                    let weak = Arc::downgrade(&shard);
                    shard
                        .live
                        .get_or_try_init(|| self.shard_pump(subject, weak))
                        .await?;
                }
                None
            }
            None => Some(self.broker.subscribe((self.subject)(key)).await?),
        };
        if let Some(init) = &self.init {
            init(key.clone(), entry.clone()).await?;
        }
        Ok(own.map(|mut sub| {
            let handler = self.handler.clone();
            // The pump keeps only a weak hold: the entry (and with it the
            // pump) goes when its last member leaves.
            let weak = Arc::downgrade(entry);
            let flusher = self.flusher.clone();
            let table = Arc::downgrade(&self.table);
            let count = self.count.clone();
            let key = key.clone();
            Pump(tokio::spawn(async move {
                while pump_batch(&mut sub, flusher.as_ref(), |msg| {
                    if let Some(entry) = weak.upgrade() {
                        handler(msg, &entry);
                    }
                })
                .await
                {}
                // The broker ended a subscription the key still needs.
                if let (Some(table), Some(entry)) = (table.upgrade(), weak.upgrade()) {
                    cut_off(&table, &count, |k, e| *k == key && Arc::ptr_eq(e, &entry));
                }
            }))
        }))
    }

    /// Whether the one subscription to every shard feeds the sharded keys;
    /// takes it when enough shards have keys. Once it is live the shards'
    /// own subscriptions go; a message that came through both meanwhile is
    /// delivered twice, which durable rooms drop by offset (personal rooms
    /// are durable) and a `read` event repeats harmlessly.
    async fn fed_wide(&self) -> Result<bool, BrokerError> {
        let Some((subject, at)) = self.sharding.as_ref().and_then(|s| s.wide.clone()) else {
            return Ok(false);
        };
        if self.wide.broken.load(Ordering::Acquire) {
            return Ok(false);
        }
        if !self.wide.pump.initialized()
            && self.table.lock().expect("interest table").shards.len() < at
        {
            return Ok(false);
        }
        self.wide
            .pump
            .get_or_try_init(|| async {
                let pump = self.wide_pump(subject.clone()).await?;
                self.wide.on.store(true, Ordering::Release);
                let table = self.table.lock().expect("interest table");
                for (_, shard) in table.shards.values() {
                    if let Some(own) = shard.live.get() {
                        own.0.abort();
                    }
                }
                tracing::info!(
                    shards = table.shards.len(),
                    "one subscription to {subject} now feeds the users of every shard"
                );
                Ok::<_, BrokerError>(pump)
            })
            .await?;
        Ok(!self.wide.broken.load(Ordering::Acquire))
    }

    async fn wide_pump(&self, subject: String) -> Result<Pump, BrokerError> {
        let mut sub = self.broker.subscribe(subject).await?;
        let handler = self.handler.clone();
        let table = Arc::downgrade(&self.table);
        let sharding = self.sharding.as_ref().expect("a sharded interest");
        let (key_of, wildcard) = (sharding.key, sharding.wildcard);
        let flusher = self.flusher.clone();
        let count = self.count.clone();
        let on = self.wide.on.clone();
        let broken = self.wide.broken.clone();
        Ok(Pump(tokio::spawn(async move {
            while pump_batch(&mut sub, flusher.as_ref(), |msg| {
                to_key(&table, key_of, &handler, msg);
            })
            .await
            {}
            // The broker ended it: every sharded key is cut off, and the
            // shards start over with subscriptions of their own.
            broken.store(true, Ordering::Release);
            on.store(false, Ordering::Release);
            if let Some(table) = table.upgrade() {
                table.lock().expect("interest table").shards.clear();
                cut_off(&table, &count, |k, _| wildcard(k).is_some());
            }
        })))
    }

    async fn shard_pump(&self, subject: String, shard: Weak<Shard>) -> Result<Pump, BrokerError> {
        let mut sub = self.broker.subscribe(subject.clone()).await?;
        let handler = self.handler.clone();
        let table = Arc::downgrade(&self.table);
        let key_of = self.sharding.as_ref().expect("a sharded interest").key;
        let flusher = self.flusher.clone();
        let wildcard = self.sharding.as_ref().expect("a sharded interest").wildcard;
        let count = self.count.clone();
        let wide = self.wide.on.clone();
        Ok(Pump(tokio::spawn(async move {
            while pump_batch(&mut sub, flusher.as_ref(), |msg| {
                // A shard dropped while its last batch runs must not feed
                // keys that a new subscription to it now feeds too; nor
                // may one that the wide subscription has replaced.
                if shard.strong_count() == 0 || wide.load(Ordering::Acquire) {
                    return;
                }
                to_key(&table, key_of, &handler, msg);
            })
            .await
                && !wide.load(Ordering::Acquire)
            {}
            if wide.load(Ordering::Acquire) {
                // Replaced by the wide subscription: it feeds the keys.
                return;
            }
            // The broker ended a subscription that the shard's keys still
            // need: every one of them is cut off.
            if let (Some(table), Some(shard)) = (table.upgrade(), shard.upgrade()) {
                let of_shard = |k: &K| wildcard(k).as_deref() == Some(subject.as_str());
                table
                    .lock()
                    .expect("interest table")
                    .shards
                    .retain(|_, (_, s)| !Arc::ptr_eq(s, &shard));
                cut_off(&table, &count, |k, _| of_shard(k));
            }
        })))
    }

    /// Removes a member; the subscription ends with the key's last local
    /// member, a shard's with the last key of the shard that has one.
    pub fn leave(&self, key: &K, member: u64) {
        let mut table = self.table.lock().expect("interest table");
        let Some(entry) = table.keys.get(key).cloned() else {
            return;
        };
        let empty = {
            let mut members = entry.members.write().expect("members");
            // Not a member (any more): nothing changes, and a lingering key
            // is not counted out twice.
            if members.remove(&member).is_none() {
                return;
            }
            members.is_empty()
        };
        if !empty {
            return;
        }
        self.count.dec();
        let shard = self.shard_of(key);
        if entry.live.initialized() {
            // A sharded key keeps its place in the shard's count meanwhile.
            let emptied = entry.emptied.fetch_add(1, Ordering::Relaxed) + 1;
            let now = tokio::time::Instant::now();
            table
                .lingering
                .push_back((now + LINGER, key.clone(), emptied, shard));
            expire(&mut table, now);
            return;
        }
        table.keys.remove(key);
        leave_shard(&mut table, shard, true);
    }
}

/// Hands a message that came through a shared subscription (a shard's, or
/// the wide one) to its key's entry; no entry: no local member of that key.
fn to_key<K: Eq + Hash, S>(
    table: &Weak<Mutex<Table<K, S>>>,
    key_of: fn(&str) -> Option<K>,
    handler: &Handler<S>,
    msg: Message,
) {
    let Some(key) = key_of(&msg.subject) else {
        return;
    };
    let entry = table
        .upgrade()
        .and_then(|t| t.lock().expect("interest table").keys.get(&key).cloned());
    if let Some(entry) = entry {
        handler(msg, &entry);
    }
}

/// One key fewer in the shard `subject` (`None`: the key has a
/// subscription of its own). A shard left without keys lingers if `linger`;
/// one whose last key lingered already goes at once.
fn leave_shard<K, S>(table: &mut Table<K, S>, subject: Option<String>, linger: bool) {
    let Some(subject) = subject else { return };
    let MapEntry::Occupied(mut shard) = table.shards.entry(subject.clone()) else {
        return;
    };
    shard.get_mut().0 -= 1;
    if shard.get().0 > 0 {
        return;
    }
    // A shard's subscription lingers like a room's: under reconnects its
    // users' personal rooms come back soon.
    if linger && shard.get().1.live.initialized() {
        let emptied = shard.get().1.emptied.fetch_add(1, Ordering::Relaxed) + 1;
        let now = tokio::time::Instant::now();
        table
            .lingering_shards
            .push_back((now + LINGER, subject, emptied));
        expire_shards(table, now);
    } else {
        shard.remove();
    }
}

impl<K: Eq + Hash, S> Interest<K, S> {
    /// Every key's entry, lingering ones included, as of now.
    pub fn entries(&self) -> Vec<Arc<Entry<S>>> {
        let table = self.table.lock().expect("interest table");
        table.keys.values().cloned().collect()
    }

    /// Unsubscribes the keys that have been without members for [`LINGER`]
    /// (the edge's once-a-second sweep calls this).
    pub fn expire_lingering(&self) {
        expire(
            &mut self.table.lock().expect("interest table"),
            tokio::time::Instant::now(),
        );
    }
}

/// Removes the lingering keys whose time is up as of `now`, and the oldest
/// beyond [`MAX_LINGERING`], unless a member joined since; and the
/// lingering shards whose time is up, unless a key joined since.
fn expire<K: Eq + Hash, S>(table: &mut Table<K, S>, now: tokio::time::Instant) {
    while let Some((until, ..)) = table.lingering.front() {
        if *until > now && table.lingering.len() <= MAX_LINGERING {
            break;
        }
        let (_, key, emptied, shard) = table.lingering.pop_front().expect("a front");
        let idle = table.keys.get(&key).is_some_and(|e| {
            e.emptied.load(Ordering::Relaxed) == emptied
                && e.members.read().expect("members").is_empty()
        });
        if idle {
            // Dropping the entry stops its pump, which ends the subscription.
            table.keys.remove(&key);
            leave_shard(table, shard, false);
        }
    }
    expire_shards(table, now);
}

/// Removes the lingering shards whose time is up as of `now`, unless a key
/// joined since.
fn expire_shards<K, S>(table: &mut Table<K, S>, now: tokio::time::Instant) {
    while let Some((until, _, _)) = table.lingering_shards.front() {
        if *until > now {
            break;
        }
        let (_, subject, emptied) = table.lingering_shards.pop_front().expect("a front");
        let idle = table.shards.get(&subject).is_some_and(|(keys, shard)| {
            *keys == 0 && shard.emptied.load(Ordering::Relaxed) == emptied
        });
        if idle {
            table.shards.remove(&subject);
        }
    }
}

/// Takes the keys that `which` picks out of the table and closes their
/// members with 4009, after the broker ended the subscription that fed them
/// (the in-memory broker closes a subscriber that falls too far behind, as
/// NATS closes a slow consumer). The members reconnect and join again, and
/// the first join subscribes anew.
fn cut_off<K, S>(
    table: &Mutex<Table<K, S>>,
    count: &Gauge,
    which: impl Fn(&K, &Arc<Entry<S>>) -> bool,
) where
    K: Eq + Hash,
{
    let cut: Vec<Arc<Entry<S>>> = {
        let mut table = table.lock().expect("interest table");
        let mut cut = Vec::new();
        table.keys.retain(|k, e| {
            let hit = which(k, e);
            if hit {
                cut.push(e.clone());
            }
            !hit
        });
        cut
    };
    let mut members = 0;
    for entry in &cut {
        let members_of = entry.members.read().expect("members");
        if !members_of.is_empty() {
            // Lingering keys were no longer counted.
            count.dec();
        }
        for slot in members_of.values() {
            members += 1;
            slot.outbox.close(
                CloseCode::SlowConsumer,
                "messages arrived faster than this edge could take them; reconnect to resume",
            );
        }
    }
    if !cut.is_empty() {
        tracing::warn!(
            keys = cut.len(),
            members,
            "the broker ended a subscription that local members needed; they are closed with 4009 and will reconnect"
        );
    }
}

/// Waits for a message, then hands it and the ones already waiting behind it
/// (up to [`PUMP_BATCH`]) to `handle` in one delivery batch, so that a burst
/// costs each connection one write. `false` once the subscription ended.
async fn pump_batch(
    sub: &mut Subscription,
    flusher: Option<&Arc<Flusher>>,
    mut handle: impl FnMut(Message),
) -> bool {
    let Some(first) = sub.next().await else {
        return false;
    };
    let mut next = sub.next().now_or_never();
    if next.is_none() && flusher.is_none() {
        // Alone: nothing to coalesce, so each member's frame goes straight
        // to its socket instead of being queued and written after the pass.
        handle(first);
        return true;
    }
    crate::delivery::batch_via(flusher, || {
        handle(first);
        for _ in 1..PUMP_BATCH {
            match next.take().or_else(|| sub.next().now_or_never()) {
                Some(Some(msg)) => handle(msg),
                Some(None) => return false,
                None => break,
            }
        }
        true
    })
}

/// Ends a member's hold: sends what was held back, in order, and makes it live.
pub fn release<S>(entry: &Entry<S>, member: u64) {
    let mut members = entry.members.write().expect("members");
    if let Some(slot) = members.get_mut(&member)
        && let Some(held) = slot.held.take()
    {
        crate::delivery::batch(|| {
            for frame in held {
                slot.outbox.send(frame);
            }
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use herald_broker::MemoryBroker;
    use herald_broker::history::{MemoryHistory, SharedHistory};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;
    use tokio::sync::Notify;

    use super::*;
    use crate::room::{self, RoomOrder};

    /// A member whose deliveries the test reads from the returned socket.
    #[tokio::test]
    async fn a_member_held_longer_than_its_queue_is_a_slow_consumer() {
        let (outbox, _client) = member(1).await;
        let mut slot = Slot {
            held: Some(Vec::new()),
            outbox: outbox.clone(),
        };
        let frame = Bytes::from_static(b"m");
        for _ in 0..outbox.limits().frames {
            slot.deliver(&frame);
        }
        assert!(outbox.close_reason().is_none());
        slot.deliver(&frame);
        assert_eq!(outbox.close_reason().unwrap().code, CloseCode::SlowConsumer);
        assert_eq!(slot.held.as_ref().unwrap().len(), outbox.limits().frames);
    }

    pub(crate) async fn member(id: u64) -> (Outbox, TcpStream) {
        let (server, client) = crate::transport::tests::pair().await;
        (Outbox::new(id, server, 64), client)
    }

    /// The next `n` text frames `client` receives.
    pub(crate) async fn received(client: &mut TcpStream, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            let mut header = [0u8; 2];
            tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut header))
                .await
                .expect("a frame within 5 s")
                .unwrap();
            let len = match header[1] {
                126 => client.read_u16().await.unwrap() as usize,
                n => usize::from(n),
            };
            let mut payload = vec![0; len];
            client.read_exact(&mut payload).await.unwrap();
            out.push(String::from_utf8(payload).unwrap());
        }
        out
    }

    /// Asserts that `client` receives nothing for a while.
    pub(crate) async fn receives_nothing(client: &mut TcpStream) {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(100), client.read(&mut byte)).await;
        assert!(read.is_err(), "unexpected bytes: {read:?}");
    }

    /// Keys `<shard>:<name>` live on `t.shard.<shard>.<name>`; others on
    /// a subject of their own.
    fn subject(key: &String) -> String {
        match key.split_once(':') {
            Some((shard, name)) => format!("t.shard.{shard}.{name}"),
            None => format!("t.own.{key}"),
        }
    }

    #[expect(clippy::ptr_arg, reason = "the keys are Strings")]
    fn wildcard(key: &String) -> Option<String> {
        key.split_once(':')
            .map(|(shard, _)| format!("t.shard.{shard}.*"))
    }

    fn key_of(subject: &str) -> Option<String> {
        let (shard, name) = subject.strip_prefix("t.shard.")?.split_once('.')?;
        Some(format!("{shard}:{name}"))
    }

    fn rooms(
        broker: &SharedBroker,
        init: Option<Init<String, RoomOrder>>,
    ) -> Interest<String, RoomOrder> {
        let history: SharedHistory = Arc::new(MemoryHistory::new());
        let handler: Handler<RoomOrder> = Arc::new(move |msg, entry| {
            room::on_frame(entry, &history, msg.payload);
        });
        let init = init.or_else(|| {
            let history: SharedHistory = Arc::new(MemoryHistory::new());
            Some(Arc::new(move |_, entry: Arc<Entry<RoomOrder>>| {
                room::init_ephemeral(&entry, &history);
                Box::pin(async { Ok(()) }) as BoxFuture<'static, _>
            }))
        });
        Interest::new(broker.clone(), subject, handler, init, Gauge::default())
            .sharded(wildcard, key_of)
    }

    /// Joins `member` to `key` and checks that a message published on
    /// `subject` then reaches its client: the key is fed (again).
    async fn fed_after_join(
        rooms: &Interest<String, RoomOrder>,
        broker: &SharedBroker,
        key: &String,
        (member, client): (&Outbox, &mut TcpStream),
        subject: &str,
    ) {
        rooms.join(key, member, false).await.unwrap();
        publish(broker, subject, "again").await;
        assert_eq!(received(client, 1).await, ["again"]);
    }

    async fn publish(broker: &SharedBroker, subject: &str, payload: &'static str) {
        broker
            .publish(subject.into(), Bytes::from_static(payload.as_bytes()))
            .await
            .unwrap();
    }

    /// When the broker ends a subscription that members still need (the
    /// in-memory broker closes a subscriber that fell too far behind, as NATS
    /// closes a slow consumer), those members are closed with 4009, their
    /// keys leave the table, and the next join subscribes anew.
    #[tokio::test]
    async fn members_of_a_subscription_the_broker_ended_are_closed_and_may_rejoin() {
        let broker: SharedBroker = Arc::new(MemoryBroker::new());
        let rooms = rooms(&broker, None);
        let (own, sharded) = ("own".to_string(), "2:a".to_string());
        // Queues deep enough that only the broker's bound is met.
        let (server, _c1) = crate::transport::tests::pair().await;
        let m1 = Outbox::new(1, server, 1 << 20);
        let (server, _c2) = crate::transport::tests::pair().await;
        let m2 = Outbox::new(2, server, 1 << 20);
        rooms.join(&own, &m1, false).await.unwrap();
        rooms.join(&sharded, &m2, false).await.unwrap();
        // Faster than the pumps can take them: this task does not yield.
        for _ in 0..70_000 {
            publish(&broker, "t.own.own", "x").await;
            publish(&broker, "t.shard.2.a", "x").await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while m1.close_reason().is_none() || m2.close_reason().is_none() {
            assert!(tokio::time::Instant::now() < deadline, "members not closed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for m in [&m1, &m2] {
            assert_eq!(m.close_reason().unwrap().code, CloseCode::SlowConsumer);
        }
        assert!(rooms.table.lock().unwrap().keys.is_empty());
        assert!(rooms.table.lock().unwrap().shards.is_empty());

        let (m3, mut c3) = member(3).await;
        fed_after_join(&rooms, &broker, &own, (&m3, &mut c3), "t.own.own").await;
    }

    #[tokio::test]
    async fn keys_of_a_shard_share_one_subscription_while_one_has_members() {
        let broker: SharedBroker = Arc::new(MemoryBroker::new());
        let rooms = rooms(&broker, None);
        let (a, b, own) = ("1:a".to_string(), "1:b".to_string(), "own".to_string());
        let ((m1, mut c1), (m2, mut c2), (m3, mut c3)) =
            (member(1).await, member(2).await, member(3).await);
        rooms.join(&a, &m1, false).await.unwrap();
        rooms.join(&b, &m2, false).await.unwrap();
        rooms.join(&own, &m3, false).await.unwrap();
        {
            let table = rooms.table.lock().unwrap();
            assert_eq!(table.shards.len(), 1);
            assert_eq!(table.shards["t.shard.1.*"].0, 2);
        }
        publish(&broker, "t.shard.1.a", "for a").await;
        publish(&broker, "t.shard.1.c", "nobody here").await;
        publish(&broker, "t.shard.1.b", "for b").await;
        publish(&broker, "t.own.own", "for own").await;
        assert_eq!(received(&mut c1, 1).await, ["for a"]);
        assert_eq!(received(&mut c2, 1).await, ["for b"]);
        assert_eq!(received(&mut c3, 1).await, ["for own"]);
        receives_nothing(&mut c1).await;

        rooms.leave(&a, 1);
        publish(&broker, "t.shard.1.b", "still b").await;
        assert_eq!(received(&mut c2, 1).await, ["still b"]);
        rooms.leave(&b, 2);
        // The keys linger without members, and the shard with them: a key
        // of it joins at once, and nothing reaches a member of a key that
        // left.
        assert_eq!(rooms.table.lock().unwrap().shards["t.shard.1.*"].0, 2);
        assert!(!unsubscribed(&broker, "t.shard.1.b").await);
        rooms.join(&b, &m2, false).await.unwrap();
        publish(&broker, "t.shard.1.a", "a left").await;
        publish(&broker, "t.shard.1.b", "b is back").await;
        assert_eq!(received(&mut c2, 1).await, ["b is back"]);
        receives_nothing(&mut c1).await;
        rooms.leave(&b, 2);
        rooms.expire_lingering();
        assert_eq!(rooms.table.lock().unwrap().shards.len(), 1);
        // Once the keys' time is up they go, and the shard with them: the
        // pump is aborted, which drops the subscription.
        expire(
            &mut rooms.table.lock().unwrap(),
            tokio::time::Instant::now() + LINGER,
        );
        assert!(rooms.table.lock().unwrap().shards.is_empty());
        assert!(
            unsubscribed(&broker, "t.shard.1.b").await,
            "the shard subscription outlived its linger"
        );

        fed_after_join(&rooms, &broker, &a, (&m1, &mut c1), "t.shard.1.a").await;
    }

    /// Once enough shards have keys, one subscription to every shard feeds
    /// them all: each message reaches its key's member once (the shards'
    /// own subscriptions are gone), keys of shards joined later need no
    /// subscription of their own, and a shard left without keys is still
    /// fed through it when a key comes back.
    #[tokio::test]
    async fn many_shards_are_fed_by_one_wide_subscription() {
        let broker: SharedBroker = Arc::new(MemoryBroker::new());
        let rooms = rooms(&broker, None).wide("t.shard.*.*".into(), 2);
        let keys = ["1:a", "2:b", "3:c"].map(String::from);
        let mut clients = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let (m, c) = member(i as u64 + 1).await;
            rooms.join(key, &m, false).await.unwrap();
            clients.push((m, c));
        }
        assert!(
            rooms.wide.on.load(Ordering::Acquire),
            "three shards, two make it wide"
        );
        for (key, (_, client)) in keys.iter().zip(clients.iter_mut()) {
            let (shard, name) = key.split_once(':').unwrap();
            let text: &'static str = Box::leak(format!("for {key}").into_boxed_str());
            publish(&broker, &format!("t.shard.{shard}.{name}"), text).await;
            assert_eq!(received(client, 1).await, [text]);
        }
        // Once each: a shard's own subscription no longer delivers too.
        for (_, client) in clients.iter_mut() {
            receives_nothing(client).await;
        }
        // A fourth shard's key is fed at once.
        let (m4, mut c4) = member(4).await;
        fed_after_join(
            &rooms,
            &broker,
            &"4:d".to_string(),
            (&m4, &mut c4),
            "t.shard.4.d",
        )
        .await;
        receives_nothing(&mut c4).await;
    }

    /// Whether `subject` has no subscriber any more (the in-memory broker
    /// answers a request with no responders), waiting for a pump's abort.
    async fn unsubscribed(broker: &SharedBroker, subject: &str) -> bool {
        for _ in 0..100 {
            let asked = broker
                .request(subject.into(), Bytes::new(), Duration::from_millis(10))
                .await;
            if matches!(asked, Err(BrokerError::NoResponders(_))) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// A key's own subscription outlives its last member: a join within
    /// [`LINGER`] needs no new subscription and no init, and the key counts
    /// as a room again; once the time is up the key and its subscription go.
    #[tokio::test]
    async fn an_emptied_key_keeps_its_subscription_for_a_while() {
        let broker: SharedBroker = Arc::new(MemoryBroker::new());
        let inits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let init: Init<String, RoomOrder> = {
            let inits = inits.clone();
            let history: SharedHistory = Arc::new(MemoryHistory::new());
            Arc::new(move |_, entry| {
                inits.fetch_add(1, Ordering::Relaxed);
                room::init_ephemeral(&entry, &history);
                Box::pin(async { Ok(()) })
            })
        };
        let rooms = rooms(&broker, Some(init));
        let own = "own".to_string();
        let ((m1, mut c1), (m2, mut c2)) = (member(1).await, member(2).await);
        rooms.join(&own, &m1, false).await.unwrap();
        assert_eq!(rooms.count.get(), 1);
        rooms.leave(&own, 1);
        rooms.leave(&own, 1);
        assert_eq!(
            rooms.count.get(),
            0,
            "a lingering key is not a room with members"
        );
        rooms.expire_lingering();
        assert!(!unsubscribed(&broker, "t.own.own").await);

        rooms.join(&own, &m2, false).await.unwrap();
        assert_eq!(
            inits.load(Ordering::Relaxed),
            1,
            "joined again without init"
        );
        assert_eq!(rooms.count.get(), 1);
        publish(&broker, "t.own.own", "back").await;
        assert_eq!(received(&mut c2, 1).await, ["back"]);
        receives_nothing(&mut c1).await;
        // Its time is up, but it has a member again: it stays.
        expire(
            &mut rooms.table.lock().unwrap(),
            tokio::time::Instant::now() + LINGER,
        );
        assert!(rooms.table.lock().unwrap().keys.contains_key(&own));

        rooms.leave(&own, 2);
        expire(
            &mut rooms.table.lock().unwrap(),
            tokio::time::Instant::now() + LINGER,
        );
        assert!(rooms.table.lock().unwrap().keys.is_empty());
        assert!(unsubscribed(&broker, "t.own.own").await);
        assert_eq!(rooms.count.get(), 0);
        fed_after_join(&rooms, &broker, &own, (&m1, &mut c1), "t.own.own").await;
        assert_eq!(inits.load(Ordering::Relaxed), 2);
    }

    /// Keys joined once each do not pile up: beyond [`MAX_LINGERING`] the
    /// oldest lingering key goes at once.
    #[tokio::test]
    async fn at_most_so_many_keys_linger() {
        let broker: SharedBroker = Arc::new(MemoryBroker::new());
        let rooms = rooms(&broker, None);
        let (m1, _c1) = member(1).await;
        for i in 0..=MAX_LINGERING {
            let key = format!("k{i}");
            rooms.join(&key, &m1, false).await.unwrap();
            rooms.leave(&key, 1);
        }
        let table = rooms.table.lock().unwrap();
        assert_eq!(table.keys.len(), MAX_LINGERING);
        assert!(!table.keys.contains_key("k0"), "the oldest went first");
        assert_eq!(table.lingering.len(), MAX_LINGERING);
    }

    #[tokio::test]
    async fn a_shard_message_that_beats_init_waits_for_it() {
        let broker: SharedBroker = Arc::new(MemoryBroker::new());
        let (init_started, init_may_end) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let init: Init<String, RoomOrder> = {
            let (started, may_end) = (init_started.clone(), init_may_end.clone());
            let history: SharedHistory = Arc::new(MemoryHistory::new());
            Arc::new(move |key, entry| {
                let (started, may_end, history) =
                    (started.clone(), may_end.clone(), history.clone());
                Box::pin(async move {
                    if key == "1:b" {
                        started.notify_one();
                        may_end.notified().await;
                    }
                    room::init_ephemeral(&entry, &history);
                    Ok(())
                })
            })
        };
        let rooms = rooms(&broker, Some(init));
        let ((m1, _c1), (m2, mut c2)) = (member(1).await, member(2).await);
        rooms.join(&"1:a".to_string(), &m1, false).await.unwrap();
        let b = "1:b".to_string();
        let publisher = async {
            init_started.notified().await;
            publish(&broker, "t.shard.1.b", "early").await;
            receives_nothing(&mut c2).await;
            init_may_end.notify_one();
        };
        let (joined, ()) = tokio::join!(rooms.join(&b, &m2, false), publisher);
        joined.unwrap();
        publish(&broker, "t.shard.1.b", "later").await;
        assert_eq!(received(&mut c2, 2).await, ["early", "later"]);
    }
}
