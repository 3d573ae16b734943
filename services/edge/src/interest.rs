//! Local interest: which of this edge's connections care about which broker
//! subject. Rooms (`herald.room.<room>`) and users (`herald.ctl.user.<user>`,
//! for acting on every connection of a user) both work this way: the edge
//! subscribes to a subject only while it has a local member for it, and each
//! message that arrives goes to the members through a handler.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, RwLock};

use herald_broker::{BrokerError, Message, SharedBroker};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;

use crate::delivery::Outbox;

/// Members of one key, by local connection id.
pub type Members = Arc<RwLock<HashMap<u64, Outbox>>>;

/// What to do with a message that arrives for a key's members.
pub type Handler = Arc<dyn Fn(Message, &Members) + Send + Sync>;

struct Entry {
    members: Members,
    /// Set once the broker subscription is live; the pump task it names is
    /// stopped when the entry is dropped (its last member left).
    live: OnceCell<Pump>,
}

struct Pump(JoinHandle<()>);

impl Drop for Pump {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub struct Interest<K> {
    broker: SharedBroker,
    subject: fn(&K) -> String,
    handler: Handler,
    /// Held only for map updates, never across an await: joins of different
    /// keys do not wait on each other's broker round trips.
    table: Mutex<HashMap<K, Arc<Entry>>>,
    count: Gauge,
}

impl<K: Clone + Eq + Hash> Interest<K> {
    pub fn new(
        broker: SharedBroker,
        subject: fn(&K) -> String,
        handler: Handler,
        count: Gauge,
    ) -> Interest<K> {
        Interest {
            broker,
            subject,
            handler,
            table: Mutex::new(HashMap::new()),
            count,
        }
    }

    /// Adds `member` under `key`. When this returns `Ok`, every message
    /// published on the key's subject from then on reaches the handler with
    /// the member among the members.
    pub async fn join(&self, key: &K, member: &Outbox) -> Result<(), BrokerError> {
        let entry = {
            let mut table = self.table.lock().expect("interest table");
            let entry = table
                .entry(key.clone())
                .or_insert_with(|| {
                    self.count.inc();
                    Arc::new(Entry {
                        members: Members::default(),
                        live: OnceCell::new(),
                    })
                })
                .clone();
            entry
                .members
                .write()
                .expect("members")
                .insert(member.id, member.clone());
            entry
        };
        let subscribed = entry
            .live
            .get_or_try_init(|| async {
                let mut sub = self.broker.subscribe((self.subject)(key)).await?;
                let members = entry.members.clone();
                let handler = self.handler.clone();
                Ok::<_, BrokerError>(Pump(tokio::spawn(async move {
                    while let Some(msg) = sub.next().await {
                        handler(msg, &members);
                    }
                })))
            })
            .await;
        if let Err(e) = subscribed {
            self.leave(key, member.id);
            return Err(e);
        }
        Ok(())
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
