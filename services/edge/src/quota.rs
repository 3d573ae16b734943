//! A user's publish limit, held across every edge without a round trip per
//! publish. Each edge admits a user's publishes at its share of the limit,
//! `limit / n` a second (GCRA: evenly spaced, with a burst of a second's
//! worth when the user publishes through this edge alone, of a quarter of
//! the share when through several), where `n` is the number of edges the
//! user published through in the last second, this one included. Edges learn of each other by
//! counting each user's publishes in windows of [`WINDOW`] and, as each
//! window ends, telling the others the counts of the users who published in
//! it ([`subjects::USER_USAGE`]); a user's first publish through an edge in
//! a second is told at once. Nothing is asked per publish.
//!
//! Precision: while a user floods through `n` edges, the total stays at the
//! limit. When it starts on several edges at once, each learns of the
//! others a NATS hop later: in that first second the total may pass the
//! limit by, for each other edge, about its burst and what it admitted
//! before hearing (together under half the limit per other edge). A user
//! who stops on one edge gives its share back to the others one second
//! later. Windows are read off each edge's clock: edges must agree on the
//! time to well under a window (NTP does). Only counts of users with a
//! connection on the receiving edge are kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_broker::{SharedBroker, chain};
use herald_wire::quota::UserUsage;
use herald_wire::subjects;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One window of counting.
pub const WINDOW: Duration = Duration::from_millis(250);
/// Windows in the second the limit is counted over.
const WINDOWS: u64 = 4;

fn window_ms() -> u64 {
    WINDOW.as_millis() as u64
}

/// This edge's view of every active user's publishes.
pub struct UserQuota {
    node: Arc<str>,
    users: Mutex<HashMap<String, Usage>>,
    /// Users who just started publishing here, for [`UserQuota::run`] to
    /// tell the other edges at once.
    started: mpsc::UnboundedSender<String>,
    started_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
}

#[derive(Default)]
struct Usage {
    /// This edge's counts, by window modulo [`WINDOWS`], with the window.
    local: [(u64, u32); WINDOWS as usize],
    /// Other edges' reported counts: (node, window, count).
    remote: Vec<(Arc<str>, u64, u32)>,
    /// The GCRA's theoretical arrival time: when the next publish would be
    /// on time at this edge's share of the rate. Kept when the share
    /// changes, so that a smaller share does not bring a fresh burst.
    tat: Option<Instant>,
}

impl Usage {
    /// Edges the user published through in the second before window `now`:
    /// the others that reported it, and this one.
    fn edges(&self, now: u64) -> u32 {
        let first = now.saturating_sub(WINDOWS);
        let mut nodes: Vec<&str> = self
            .remote
            .iter()
            .filter(|(_, w, n)| *w >= first && *n > 0)
            .map(|(node, _, _)| &**node)
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        1 + nodes.len() as u32
    }

    /// GCRA at `limit / edges` a second, with a burst of a second's worth
    /// through one edge, of a quarter of the share through several (what
    /// other edges admit before they hear of each other stays small).
    fn admit(&mut self, at: Instant, limit: u32, edges: u32) -> Result<(), Duration> {
        let share = f64::from(limit) / f64::from(edges);
        let period = Duration::from_secs_f64(1.0 / share);
        let burst = if edges == 1 { share } else { share / 4.0 };
        let tolerance = period.mul_f64(burst.max(1.0) - 1.0);
        let tat = self.tat.map_or(at, |t| t.max(at));
        let ahead = tat - at;
        if ahead > tolerance {
            return Err(ahead - tolerance);
        }
        self.tat = Some(tat + period);
        Ok(())
    }

    fn count(&mut self, now: u64) {
        let slot = &mut self.local[(now % WINDOWS) as usize];
        if slot.0 != now {
            *slot = (now, 0);
        }
        slot.1 += 1;
    }

    fn local_in(&self, window: u64) -> u32 {
        let (w, n) = self.local[(window % WINDOWS) as usize];
        if w == window { n } else { 0 }
    }

    /// Forgets windows older than the second before `now`; `true` when
    /// nothing is left to remember (the user's allowance is full again).
    fn prune(&mut self, now: u64, at: Instant) -> bool {
        let first = now.saturating_sub(WINDOWS);
        self.remote.retain(|(_, w, _)| *w >= first);
        self.remote.is_empty()
            && self.local.iter().all(|(w, _)| *w < first)
            && self.tat.is_none_or(|t| t <= at)
    }
}

impl UserQuota {
    pub fn new(node: &str) -> Arc<UserQuota> {
        let (started, started_rx) = mpsc::unbounded_channel();
        Arc::new(UserQuota {
            node: node.into(),
            users: Mutex::default(),
            started,
            started_rx: Mutex::new(Some(started_rx)),
        })
    }

    /// Counts one publish by `user` unless it would pass this edge's share
    /// of `limit` a second (0: no limit); refused, how long until it would
    /// not.
    pub fn take(&self, user: &str, limit: u32) -> Result<(), Duration> {
        self.take_at(user, limit, Instant::now(), crate::now_ms())
    }

    fn take_at(&self, user: &str, limit: u32, at: Instant, now_ms: u64) -> Result<(), Duration> {
        if limit == 0 {
            return Ok(());
        }
        let now = now_ms / window_ms();
        let mut users = self.users.lock().expect("user quota");
        let usage = match users.get_mut(user) {
            Some(u) => u,
            None => users.entry(user.to_string()).or_default(),
        };
        let edges = usage.edges(now);
        usage.admit(at, limit, edges)?;
        let first = usage.local.iter().all(|(w, _)| w + WINDOWS <= now);
        usage.count(now);
        if first {
            let _ = self.started.send(user.to_string());
        }
        Ok(())
    }

    /// Notes another edge's report, for the users `is_local` says have a
    /// connection here.
    fn heard(&self, report: UserUsage, is_local: impl Fn(&str) -> bool) {
        if *report.node == *self.node {
            return;
        }
        let node: Arc<str> = report.node.into();
        let mut users = self.users.lock().expect("user quota");
        for (user, count) in report.users {
            if !is_local(&user) {
                continue;
            }
            users
                .entry(user)
                .or_default()
                .remote
                .push((node.clone(), report.window, count));
        }
    }

    /// The counts of window `window` to report, forgetting what is too old.
    fn ended(&self, window: u64) -> HashMap<String, u32> {
        let mut users = self.users.lock().expect("user quota");
        let mut counts = HashMap::new();
        users.retain(|user, usage| {
            let n = usage.local_in(window);
            if n > 0 {
                counts.insert(user.clone(), n);
            }
            !usage.prune(window + 1, Instant::now())
        });
        counts
    }

    /// Reports this edge's counts as each window ends and takes the other
    /// edges' reports, until `stop`.
    pub async fn run(
        self: Arc<Self>,
        broker: SharedBroker,
        is_local: impl Fn(&str) -> bool + Send + 'static,
        stop: CancellationToken,
    ) {
        let Some(mut started) = self.started_rx.lock().expect("user quota").take() else {
            return;
        };
        let mut reports = match broker.subscribe(subjects::USER_USAGE.into()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %chain(&e), "cannot hear other edges' publish counts; each edge holds users to their publish limit alone");
                return;
            }
        };
        loop {
            let now_ms = crate::now_ms();
            let next = Duration::from_millis(window_ms() - now_ms % window_ms());
            tokio::select! {
                _ = stop.cancelled() => return,
                Some(msg) = reports.next() => match serde_json::from_slice::<UserUsage>(&msg.payload) {
                    Ok(report) => self.heard(report, &is_local),
                    Err(e) => tracing::warn!(error = %e, "ignoring an unreadable publish-count report"),
                },
                Some(user) = started.recv() => {
                    let window = crate::now_ms() / window_ms();
                    let report = UserUsage { node: self.node.to_string(), window, users: HashMap::from([(user, 1)]) };
                    self.send(&broker, &report).await;
                }
                _ = tokio::time::sleep(next) => {
                    let ended = crate::now_ms() / window_ms() - 1;
                    let users = self.ended(ended);
                    if users.is_empty() {
                        continue;
                    }
                    let report = UserUsage { node: self.node.to_string(), window: ended, users };
                    self.send(&broker, &report).await;
                }
            }
        }
    }

    async fn send(&self, broker: &SharedBroker, report: &UserUsage) {
        let payload = Bytes::from(serde_json::to_vec(report).expect("usage serializes"));
        if let Err(e) = broker.publish(subjects::USER_USAGE.into(), payload).await {
            tracing::debug!(error = %chain(&e), "publish counts not sent; other edges count without them");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, window: u64, user: &str, n: u32) -> UserUsage {
        UserUsage {
            node: node.into(),
            window,
            users: HashMap::from([(user.to_string(), n)]),
        }
    }

    /// Publishes admitted for `user` over `ms` milliseconds of attempts
    /// every millisecond, starting at `at`.
    fn admitted(q: &UserQuota, user: &str, limit: u32, at: Instant, now_ms: u64, ms: u64) -> u32 {
        (0..ms)
            .filter(|ms| {
                q.take_at(user, limit, at + Duration::from_millis(*ms), now_ms + ms)
                    .is_ok()
            })
            .count() as u32
    }

    #[test]
    fn alone_a_user_gets_the_limit_with_a_second_s_burst() {
        let q = UserQuota::new("a");
        let (at, now_ms) = (Instant::now(), 1_000_000 * window_ms());
        let mut burst = 0;
        while q.take_at("ann", 40, at, now_ms).is_ok() {
            burst += 1;
        }
        assert_eq!(burst, 40, "a second's worth at once");
        let wait = q.take_at("ann", 40, at, now_ms).unwrap_err();
        assert!(wait <= Duration::from_millis(25), "{wait:?}");
        let later = admitted(&q, "ann", 40, at, now_ms, 4000);
        assert!((158..=161).contains(&later), "{later} in 4 s at 40/s");
        assert!(q.take_at("bob", 40, at, now_ms).is_ok(), "users apart");
        assert!(q.take_at("ann", 0, at, now_ms).is_ok(), "0 is no limit");
    }

    #[test]
    fn other_edges_publishing_for_a_user_shrink_this_edges_share() {
        let q = UserQuota::new("a");
        let (at, now_ms) = (Instant::now(), 1_000_000 * window_ms());
        let now = now_ms / window_ms();
        // Two other edges published for ann in the last second; one for
        // zed, who has no connection here.
        q.heard(report("b", now - 1, "ann", 8), |_| true);
        q.heard(report("c", now - 2, "ann", 8), |_| true);
        q.heard(report("a", now - 1, "ann", 50), |_| true);
        q.heard(report("b", now - 1, "zed", 50), |u| u == "ann");
        assert!(!q.users.lock().unwrap().contains_key("zed"));
        // 60 a second shared by three edges: 20 here, a burst of 5 and 10
        // in half a second (while the reports are fresh).
        let got = admitted(&q, "ann", 60, at, now_ms, 500);
        assert!((14..=16).contains(&got), "{got} in 0.5 s at a third of 60");
    }

    #[test]
    fn what_is_remembered_ages_out() {
        let mut u = Usage::default();
        let at = Instant::now();
        u.remote.push(("b".into(), 100, 5));
        u.count(100);
        assert_eq!(u.edges(101), 2);
        assert_eq!(u.edges(110), 1, "b's report is over a second old");
        assert!(!u.prune(101, at));
        assert!(u.prune(200, at));
    }
}
