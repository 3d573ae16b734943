//! History in memory, for the all-in-one mode: the JetStream model (one
//! sequence per namespace, per-room message and age limits, a dedup window)
//! inside one process. Lost when the process ends, hence a random epoch.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use herald_wire::room::RoomName;
use tokio::time::Instant;

use super::{
    Appended, History, HistoryError, Limits, MAX_MARKERS_PER_USER, Stored, check_namespace,
    check_user,
};
use crate::BoxFuture;

/// How often an append sweeps every room of its namespace for expired
/// messages (rooms nobody touches would otherwise keep them).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

struct Entry {
    offset: u64,
    prev: u64,
    payload: Bytes,
    at: Instant,
}

struct Dedup {
    offset: u64,
    prev: u64,
    at: Instant,
}

struct Namespace {
    limits: Limits,
    epoch: String,
    /// The namespace's sequence, shared by its rooms, as a JetStream stream's.
    seq: u64,
    rooms: HashMap<RoomName, VecDeque<Entry>>,
    /// Idempotency keys seen within the window, by (room, key); `dedup_order`
    /// holds the same keys oldest first so expiry is cheap.
    dedup: HashMap<(RoomName, String), Dedup>,
    dedup_order: VecDeque<(Instant, (RoomName, String))>,
    last_sweep: Instant,
}

impl Namespace {
    /// Drops what the limits no longer allow from one room.
    fn trim(limits: &Limits, room: &mut VecDeque<Entry>, now: Instant) {
        if !limits.max_age.is_zero() {
            while room
                .front()
                .is_some_and(|e| now.duration_since(e.at) >= limits.max_age)
            {
                room.pop_front();
            }
        }
        if limits.max_messages_per_room > 0 {
            while room.len() as u64 > limits.max_messages_per_room {
                room.pop_front();
            }
        }
    }

    /// The room after trimming; `None` when it holds nothing.
    fn room(&mut self, room: &RoomName, now: Instant) -> Option<&VecDeque<Entry>> {
        let entries = self.rooms.get_mut(room)?;
        Self::trim(&self.limits, entries, now);
        if entries.is_empty() {
            self.rooms.remove(room);
            return None;
        }
        self.rooms.get(room)
    }

    fn sweep(&mut self, now: Instant) {
        let window = self.limits.dedup_window();
        while let Some((at, _)) = self.dedup_order.front() {
            if now.duration_since(*at) < window {
                break;
            }
            let (at, key) = self.dedup_order.pop_front().expect("front exists");
            if self.dedup.get(&key).is_some_and(|d| d.at == at) {
                self.dedup.remove(&key);
            }
        }
        if now.duration_since(self.last_sweep) >= SWEEP_EVERY {
            self.last_sweep = now;
            let limits = &self.limits;
            self.rooms.retain(|_, entries| {
                Self::trim(limits, entries, now);
                !entries.is_empty()
            });
        }
    }

    fn append(&mut self, room: &RoomName, payload: Bytes, key: Option<&str>) -> Appended {
        let now = Instant::now();
        self.sweep(now);
        let dedup_key = key.map(|k| (room.clone(), k.to_string()));
        if let Some(d) = dedup_key.as_ref().and_then(|k| self.dedup.get(k)) {
            return Appended {
                epoch: self.epoch.clone(),
                offset: d.offset,
                prev: d.prev,
                duplicate: true,
            };
        }
        let prev = self
            .room(room, now)
            .and_then(|r| r.back())
            .map_or(0, |e| e.offset);
        self.seq += 1;
        let offset = self.seq;
        let entries = self.rooms.entry(room.clone()).or_default();
        entries.push_back(Entry {
            offset,
            prev,
            payload,
            at: now,
        });
        Self::trim(&self.limits, entries, now);
        if let Some(k) = dedup_key {
            self.dedup.insert(
                k.clone(),
                Dedup {
                    offset,
                    prev,
                    at: now,
                },
            );
            self.dedup_order.push_back((now, k));
        }
        Appended {
            epoch: self.epoch.clone(),
            offset,
            prev,
            duplicate: false,
        }
    }
}

#[derive(Default)]
struct State {
    namespaces: HashMap<String, Namespace>,
    /// user → room → offset read up to.
    markers: HashMap<String, BTreeMap<RoomName, u64>>,
}

/// Durable room history held in this process's memory, bounded by each
/// namespace's [`Limits`]. Cheap to share behind an `Arc`.
#[derive(Default)]
pub struct MemoryHistory {
    state: Mutex<State>,
}

impl MemoryHistory {
    pub fn new() -> MemoryHistory {
        MemoryHistory::default()
    }

    /// Runs `f` on the room's namespace, or fails with `NotDurable`.
    fn with_ns<T>(
        &self,
        room: &RoomName,
        f: impl FnOnce(&mut Namespace) -> T,
    ) -> Result<T, HistoryError> {
        let mut state = self.state.lock().expect("history state");
        let ns = state
            .namespaces
            .get_mut(room.namespace())
            .ok_or_else(|| HistoryError::NotDurable(room.namespace().to_string()))?;
        Ok(f(ns))
    }
}

/// A fresh random epoch: `RandomState` is seeded randomly per process and
/// varies per instance, which is all an in-memory history needs.
fn random_epoch(ns: &str) -> String {
    let mut h = RandomState::new().build_hasher();
    h.write(ns.as_bytes());
    format!("mem-{:016x}", h.finish())
}

impl History for MemoryHistory {
    fn ensure_namespace(
        &self,
        ns: &str,
        limits: Limits,
    ) -> BoxFuture<'_, Result<(), HistoryError>> {
        let result = check_namespace(ns).map(|()| {
            let mut state = self.state.lock().expect("history state");
            let now = Instant::now();
            let entry = state
                .namespaces
                .entry(ns.to_string())
                .or_insert_with(|| Namespace {
                    limits: limits.clone(),
                    epoch: random_epoch(ns),
                    seq: 0,
                    rooms: HashMap::new(),
                    dedup: HashMap::new(),
                    dedup_order: VecDeque::new(),
                    last_sweep: now,
                });
            entry.rooms.retain(|_, entries| {
                Namespace::trim(&limits, entries, now);
                !entries.is_empty()
            });
            entry.limits = limits;
        });
        Box::pin(async move { result })
    }

    fn epoch(&self, ns: &str) -> BoxFuture<'_, Result<String, HistoryError>> {
        let state = self.state.lock().expect("history state");
        let result = state
            .namespaces
            .get(ns)
            .map(|n| n.epoch.clone())
            .ok_or_else(|| HistoryError::NotDurable(ns.to_string()));
        Box::pin(async move { result })
    }

    fn append(
        &self,
        room: &RoomName,
        payload: Bytes,
        key: Option<&str>,
    ) -> BoxFuture<'_, Result<Appended, HistoryError>> {
        let result = self.with_ns(room, |ns| ns.append(room, payload, key));
        Box::pin(async move { result })
    }

    fn read(
        &self,
        room: &RoomName,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Stored>, HistoryError>> {
        let result = self.with_ns(room, |ns| {
            let Some(entries) = ns.room(room, Instant::now()) else {
                return Vec::new();
            };
            let start = entries.partition_point(|e| e.offset <= after);
            entries
                .range(start..)
                .take(limit)
                .map(|e| Stored {
                    offset: e.offset,
                    prev: e.prev,
                    payload: e.payload.clone(),
                })
                .collect()
        });
        Box::pin(async move { result })
    }

    fn latest(&self, room: &RoomName) -> BoxFuture<'_, Result<u64, HistoryError>> {
        let result = self.with_ns(room, |ns| {
            ns.room(room, Instant::now())
                .and_then(|r| r.back())
                .map_or(0, |e| e.offset)
        });
        Box::pin(async move { result })
    }

    fn count_after(&self, room: &RoomName, after: u64) -> BoxFuture<'_, Result<u64, HistoryError>> {
        let result = self.with_ns(room, |ns| {
            ns.room(room, Instant::now()).map_or(0, |entries| {
                (entries.len() - entries.partition_point(|e| e.offset <= after)) as u64
            })
        });
        Box::pin(async move { result })
    }

    fn marker(
        &self,
        user: &str,
        room: &RoomName,
    ) -> BoxFuture<'_, Result<Option<u64>, HistoryError>> {
        let result = check_user(user).map(|()| {
            let state = self.state.lock().expect("history state");
            state.markers.get(user).and_then(|m| m.get(room).copied())
        });
        Box::pin(async move { result })
    }

    fn set_marker(
        &self,
        user: &str,
        room: &RoomName,
        offset: u64,
    ) -> BoxFuture<'_, Result<u64, HistoryError>> {
        let result = check_user(user).map(|()| {
            let mut state = self.state.lock().expect("history state");
            let marker = state
                .markers
                .entry(user.to_string())
                .or_default()
                .entry(room.clone())
                .or_insert(offset);
            *marker = (*marker).max(offset);
            *marker
        });
        Box::pin(async move { result })
    }

    fn markers(&self, user: &str) -> BoxFuture<'_, Result<Vec<(RoomName, u64)>, HistoryError>> {
        let result = check_user(user).map(|()| {
            let state = self.state.lock().expect("history state");
            state
                .markers
                .get(user)
                .map(|m| {
                    m.iter()
                        .take(MAX_MARKERS_PER_USER)
                        .map(|(r, o)| (r.clone(), *o))
                        .collect()
                })
                .unwrap_or_default()
        });
        Box::pin(async move { result })
    }
}
