//! The local room table: which of this edge's connections are in which room.
//! The edge subscribes to a room's broker subject only while it has a local
//! member, and hands every message that arrives there, as the same bytes, to
//! each member's queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use herald_broker::{BrokerError, SharedBroker};
use herald_wire::{RoomName, subjects};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;

use crate::delivery::Outbox;

type Members = Arc<RwLock<HashMap<u64, Outbox>>>;

struct LocalRoom {
    members: Members,
    /// Set once the broker subscription is live; the pump task it names is
    /// stopped when the room is dropped (its last member left).
    live: OnceCell<Pump>,
}

struct Pump(JoinHandle<()>);

impl Drop for Pump {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Clone, Default)]
pub struct RoomMetrics {
    pub rooms: Gauge,
    pub delivered: Counter,
}

pub struct Rooms {
    broker: SharedBroker,
    /// Held only for map updates, never across an await: joins of different
    /// rooms do not wait on each other's broker round trips.
    table: Mutex<HashMap<RoomName, Arc<LocalRoom>>>,
    metrics: RoomMetrics,
}

impl Rooms {
    pub fn new(broker: SharedBroker, metrics: RoomMetrics) -> Rooms {
        Rooms {
            broker,
            table: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Adds `member` to `room`. When this returns `Ok`, every message
    /// published to the room from then on reaches the member's queue.
    pub async fn join(&self, room: &RoomName, member: &Outbox) -> Result<(), BrokerError> {
        let local = {
            let mut table = self.table.lock().expect("room table");
            let local = table
                .entry(room.clone())
                .or_insert_with(|| {
                    self.metrics.rooms.inc();
                    Arc::new(LocalRoom {
                        members: Members::default(),
                        live: OnceCell::new(),
                    })
                })
                .clone();
            local
                .members
                .write()
                .expect("room members")
                .insert(member.id, member.clone());
            local
        };
        let subscribed = local
            .live
            .get_or_try_init(|| async {
                let sub = self.broker.subscribe(subjects::room(room)).await?;
                Ok::<_, BrokerError>(Pump(tokio::spawn(pump(
                    sub,
                    local.members.clone(),
                    self.metrics.delivered.clone(),
                ))))
            })
            .await;
        if let Err(e) = subscribed {
            self.leave(room, member.id);
            return Err(e);
        }
        Ok(())
    }

    /// Removes a member; the room's subscription ends with its last local member.
    pub fn leave(&self, room: &RoomName, member: u64) {
        let mut table = self.table.lock().expect("room table");
        let Some(local) = table.get(room) else { return };
        let empty = {
            let mut members = local.members.write().expect("room members");
            members.remove(&member);
            members.is_empty()
        };
        if empty {
            table.remove(room);
            self.metrics.rooms.dec();
        }
    }
}

async fn pump(mut sub: herald_broker::Subscription, members: Members, delivered: Counter) {
    while let Some(msg) = sub.next().await {
        let members = members.read().expect("room members");
        for m in members.values() {
            // A full queue disconnects that member alone; the others go on.
            m.send(msg.payload.clone());
        }
        delivered.inc_by(members.len() as u64);
    }
}
