//! Local interest: which of this edge's connections are in which room. The
//! edge subscribes to a room's subject (`herald.room.<room>`) only while it
//! has a local member, and each message that arrives goes to the members
//! through a handler.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use herald_broker::{BoxFuture, BrokerError, Message, SharedBroker};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;

use crate::delivery::Outbox;

/// One member of a key.
pub struct Slot {
    pub outbox: Outbox,
    /// While the member replays history, live frames wait here so that it
    /// sees every message once and in order; `None` once it is live.
    pub held: Option<Vec<Bytes>>,
}

impl Slot {
    /// Sends now, or holds the frame while the member recovers.
    pub fn deliver(&mut self, frame: &Bytes) {
        match &mut self.held {
            Some(held) => held.push(frame.clone()),
            None => {
                // A full queue disconnects this member alone; the others go on.
                self.outbox.send(frame.clone());
            }
        }
    }
}

/// Members of one key, by local connection id.
pub type Members = RwLock<HashMap<u64, Slot>>;

/// The local state of one key: its members and whatever the handler keeps.
pub struct Entry<S> {
    pub members: Members,
    pub state: S,
    /// Set once the broker subscription is live; the pump task it names is
    /// stopped when the entry is dropped (its last member left).
    live: OnceCell<Pump>,
}

impl<S: Default> Entry<S> {
    /// A new entry, not yet fed by a subscription.
    fn new() -> Arc<Entry<S>> {
        Arc::new(Entry {
            members: Members::default(),
            state: S::default(),
            live: OnceCell::new(),
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

/// Runs once the subscription is live and before the first message is
/// handled (durable rooms read where their history stands).
pub type Init<K, S> =
    Arc<dyn Fn(K, Arc<Entry<S>>) -> BoxFuture<'static, Result<(), BrokerError>> + Send + Sync>;

pub struct Interest<K, S> {
    broker: SharedBroker,
    subject: fn(&K) -> String,
    handler: Handler<S>,
    init: Option<Init<K, S>>,
    /// Held only for map updates, never across an await: joins of different
    /// keys do not wait on each other's broker round trips.
    table: Mutex<HashMap<K, Arc<Entry<S>>>>,
    count: Gauge,
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
            handler,
            init,
            table: Mutex::new(HashMap::new()),
            count,
        }
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
        let entry = {
            let mut table = self.table.lock().expect("interest table");
            let entry = table
                .entry(key.clone())
                .or_insert_with(|| {
                    self.count.inc();
                    Entry::new()
                })
                .clone();
            entry.members.write().expect("members").insert(
                member.id,
                Slot {
                    outbox: member.clone(),
                    held: hold.then(Vec::new),
                },
            );
            entry
        };
        let subscribed = entry
            .live
            .get_or_try_init(|| async {
                let mut sub = self.broker.subscribe((self.subject)(key)).await?;
                if let Some(init) = &self.init {
                    init(key.clone(), entry.clone()).await?;
                }
                let handler = self.handler.clone();
                // The pump keeps only a weak hold: the entry (and with it the
                // pump) goes when its last member leaves.
                let weak = Arc::downgrade(&entry);
                Ok::<_, BrokerError>(Pump(tokio::spawn(async move {
                    while let Some(msg) = sub.next().await {
                        let Some(entry) = weak.upgrade() else { break };
                        handler(msg, &entry);
                    }
                })))
            })
            .await;
        if let Err(e) = subscribed {
            self.leave(key, member.id);
            return Err(e);
        }
        Ok(entry)
    }

    /// Removes a member; the subscription ends with the key's last local member.
    pub fn leave(&self, key: &K, member: u64) {
        let mut table = self.table.lock().expect("interest table");
        let Some(entry) = table.get(key) else { return };
        let empty = {
            let mut members = entry.members.write().expect("members");
            members.remove(&member);
            members.is_empty()
        };
        if empty {
            table.remove(key);
            self.count.dec();
        }
    }
}

/// Ends a member's hold: sends what was held back, in order, and makes it live.
pub fn release<S>(entry: &Entry<S>, member: u64) {
    let mut members = entry.members.write().expect("members");
    if let Some(slot) = members.get_mut(&member)
        && let Some(held) = slot.held.take()
    {
        for frame in held {
            slot.outbox.send(frame);
        }
    }
}
