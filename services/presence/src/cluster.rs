//! The presence replicas among themselves. Every replica computes every event
//! from the same edge reports; one of them, the leader, publishes the
//! cluster-wide ones (user online/offline, and room leaves nobody else
//! announces). Replicas heartbeat on [`subjects::PRESENCE_REPLICAS`]; the
//! leader is the smallest `replica_id` among the warmed-up replicas heard
//! within `replica_timeout`, itself included. No consensus: during a change
//! of leader two replicas may both publish for a moment, and the new leader
//! re-publishes what it computed since it last heard the old one, so user
//! events are at least once across a failover and carry ids that let
//! consumers drop repeats.
//!
//! [`subjects::PRESENCE_REPLICAS`]: herald_wire::subjects::PRESENCE_REPLICAS

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// User events kept for re-publishing after a change of leader.
pub(crate) const RECENT_USER_EVENTS: usize = 4096;

/// What a replica says about itself every `replica_heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ReplicaHeartbeat {
    pub replica_id: String,
    /// The replica process's start, ms since the Unix epoch (two processes
    /// claiming one id show up as two values).
    pub started_ms: u64,
    /// Its warm-up is over: it may lead.
    #[serde(default)]
    pub warm: bool,
    /// It is shutting down: forget it now rather than after the timeout.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
}

#[derive(Debug)]
struct Peer {
    last: Instant,
    warm: bool,
    started_ms: u64,
}

/// A change of this replica's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Became the leader: re-publish the user events computed at or after
    /// `since` (everything kept when `None`: no leader was heard before).
    Lead { since: Option<Instant> },
    /// Another replica leads now.
    Follow,
}

/// Who leads, as this replica sees it.
#[derive(Debug)]
pub(crate) struct Election {
    me: String,
    timeout: Duration,
    peers: HashMap<String, Peer>,
    leading: bool,
    /// When the replica that led (as this one saw it) was last heard.
    leader_heard: Option<Instant>,
}

impl Election {
    pub(crate) fn new(me: String, timeout: Duration) -> Election {
        Election {
            me,
            timeout,
            peers: HashMap::new(),
            leading: false,
            leader_heard: None,
        }
    }

    pub(crate) fn is_leading(&self) -> bool {
        self.leading
    }

    /// Records another replica's heartbeat (our own echo is ignored).
    pub(crate) fn heard(&mut self, hb: ReplicaHeartbeat, now: Instant) {
        if hb.replica_id == self.me {
            return;
        }
        if hb.leaving {
            self.peers.remove(&hb.replica_id);
            return;
        }
        if let Some(p) = self.peers.get(&hb.replica_id)
            && p.started_ms != hb.started_ms
            && now.saturating_duration_since(p.last) < self.timeout
        {
            tracing::warn!(replica = %hb.replica_id, "two presence replicas use the same replica id; give each its own");
        }
        self.peers.insert(
            hb.replica_id,
            Peer {
                last: now,
                warm: hb.warm,
                started_ms: hb.started_ms,
            },
        );
    }

    /// Re-evaluates who leads; `warm` says whether this replica may.
    pub(crate) fn decide(&mut self, warm: bool, now: Instant) -> Option<Role> {
        let timeout = self.timeout;
        self.peers
            .retain(|_, p| now.saturating_duration_since(p.last) < timeout);
        let best_peer = self
            .peers
            .iter()
            .filter(|(_, p)| p.warm)
            .min_by(|a, b| a.0.cmp(b.0));
        let peer_leads = match best_peer {
            Some((id, p)) if !warm || *id < self.me => {
                self.leader_heard = Some(p.last);
                true
            }
            _ => false,
        };
        let lead = warm && !peer_leads;
        match (self.leading, lead) {
            (false, true) => {
                self.leading = true;
                Some(Role::Lead {
                    since: self.leader_heard,
                })
            }
            (true, false) => {
                self.leading = false;
                Some(Role::Follow)
            }
            _ => None,
        }
    }
}

/// A user event as published, kept for a while.
#[derive(Debug, Clone)]
pub(crate) struct Published {
    pub at: Instant,
    pub subject: String,
    pub payload: Bytes,
}

/// The most recent user events this replica computed, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Recent {
    events: VecDeque<Published>,
}

impl Recent {
    pub(crate) fn push(&mut self, p: Published) {
        if self.events.len() == RECENT_USER_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(p);
    }

    /// Those computed at or after `since` (all when `None`), oldest first.
    pub(crate) fn since(&self, since: Option<Instant>) -> impl Iterator<Item = &Published> {
        let start = match since {
            Some(t) => self.events.partition_point(|p| p.at < t),
            None => 0,
        };
        self.events.range(start..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(id: &str, warm: bool) -> ReplicaHeartbeat {
        ReplicaHeartbeat {
            replica_id: id.into(),
            started_ms: 1,
            warm,
            leaving: false,
        }
    }

    const T: Duration = Duration::from_secs(3);

    #[test]
    fn the_smallest_warm_replica_leads() {
        let t0 = Instant::now();
        let mut b = Election::new("b".into(), T);
        // Alone and warming up: nobody leads.
        assert_eq!(b.decide(false, t0), None);
        // Warm, and a smaller replica that is still warming up: b leads.
        b.heard(hb("a", false), t0);
        assert_eq!(b.decide(true, t0), Some(Role::Lead { since: None }));
        // The smaller one is warm now: b follows.
        let t1 = t0 + Duration::from_secs(1);
        b.heard(hb("a", true), t1);
        assert_eq!(b.decide(true, t1), Some(Role::Follow));
        assert!(!b.is_leading());
        // A larger one changes nothing; its own echo neither.
        b.heard(hb("c", true), t1);
        b.heard(hb("b", true), t1);
        assert_eq!(b.decide(true, t1), None);
        // a falls silent: after the timeout b leads, re-publishing what it
        // computed since it last heard a.
        assert_eq!(b.decide(true, t1 + T - Duration::from_millis(1)), None);
        assert_eq!(b.decide(true, t1 + T), Some(Role::Lead { since: Some(t1) }));
    }

    #[test]
    fn a_leaving_replica_is_forgotten_at_once() {
        let t0 = Instant::now();
        let mut b = Election::new("b".into(), T);
        b.heard(hb("a", true), t0);
        assert_eq!(b.decide(true, t0), None);
        b.heard(
            ReplicaHeartbeat {
                leaving: true,
                ..hb("a", true)
            },
            t0,
        );
        assert_eq!(b.decide(true, t0), Some(Role::Lead { since: Some(t0) }));
    }

    #[test]
    fn recent_events_are_bounded_and_found_by_time() {
        let t0 = Instant::now();
        let mut r = Recent::default();
        for i in 0..RECENT_USER_EVENTS as u64 + 2 {
            r.push(Published {
                at: t0 + Duration::from_millis(i),
                subject: i.to_string(),
                payload: Bytes::new(),
            });
        }
        assert_eq!(r.since(None).count(), RECENT_USER_EVENTS);
        assert_eq!(r.since(None).next().unwrap().subject, "2");
        let late: Vec<_> = r
            .since(Some(t0 + Duration::from_millis(RECENT_USER_EVENTS as u64)))
            .map(|p| p.subject.clone())
            .collect();
        assert_eq!(
            late,
            [
                RECENT_USER_EVENTS.to_string(),
                (RECENT_USER_EVENTS + 1).to_string()
            ]
        );
    }
}
