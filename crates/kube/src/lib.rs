//! Watches Herald's edge pods in Kubernetes and reports the ones that are gone.
//!
//! An edge's node id is its pod name. When an edge pod is deleted, or its phase becomes
//! `Failed` or `Succeeded` (its container exited), the WebSocket connections it held are
//! gone with it; the presence service uses [`watch_edge_pods`] to reap them at once instead
//! of waiting for the edge's heartbeats to time out.
//!
//! A pod that is merely terminating (`metadata.deletionTimestamp` set, still running) is not
//! gone: it is draining, and its edge reports its own leaves. It is reported when the pod
//! object is finally deleted.
//!
//! This crate depends on `k8s-openapi` without choosing a Kubernetes version: the binary that
//! links it must enable exactly one `v1_*` feature of `k8s-openapi` (Herald's binary enables
//! `v1_33`).
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet, VecDeque};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Where and what to watch.
#[derive(Clone, Debug)]
pub struct PodWatchConfig {
    /// Namespace to watch; None = the client's default namespace.
    pub namespace: Option<String>,
    /// Label selector of edge pods, e.g. "app.kubernetes.io/component=edge".
    /// An empty selector watches every pod of the namespace.
    pub label_selector: String,
}

/// What the watch reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodEvent {
    /// The pod is gone or has failed: its connections are gone. Carries the pod name.
    Gone(String),
}

/// Watches the edge pods chosen by `config` until `shutdown` is cancelled, calling `on_event`
/// for each pod that
///
/// - is deleted,
/// - whose phase becomes `Failed` or `Succeeded` (the container exited), or
/// - that disappeared while the watch was re-listing (known before a re-list, absent after it),
///
/// once per pod incarnation (pod uid). A pod that is only terminating (`deletionTimestamp` set)
/// is not reported until it is deleted. If a re-list finds a pod of a known name with a new
/// uid, the old incarnation is reported gone only while the new one is still `Pending` (it
/// cannot yet hold connections); a newer incarnation that is already running may hold
/// connections under the same node id, so the old one is then left to the heartbeat timeout.
///
/// Watch errors (API server unreachable, forbidden, expired resource version, ...) are logged
/// with `tracing::warn!` and retried with kube's default backoff; they never end the watch.
/// `on_event` is called from the watching task: it should return quickly (send to a channel).
pub async fn watch_edge_pods(
    client: kube::Client,
    config: PodWatchConfig,
    on_event: impl Fn(PodEvent) + Send + Sync + 'static,
    shutdown: CancellationToken,
) {
    let api: Api<Pod> = match &config.namespace {
        Some(namespace) => Api::namespaced(client, namespace),
        None => Api::default_namespaced(client),
    };
    let mut watcher_config = watcher::Config::default();
    let selector = config.label_selector.trim();
    if !selector.is_empty() {
        watcher_config = watcher_config.labels(selector);
    }
    let namespace = config.namespace.as_deref().unwrap_or("<client default>");
    info!(namespace, selector, "watching edge pods");

    let watch = || Box::pin(watcher(api.clone(), watcher_config.clone()).default_backoff());
    let mut events = watch();
    let mut tracker = Tracker::default();
    let mut gone = Vec::new();
    loop {
        let next = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            next = events.next() => next,
        };
        match next {
            Some(Ok(event)) => {
                tracker.handle(event, &mut gone);
                for (name, reason) in gone.drain(..) {
                    info!(pod = %name, reason, "edge pod is gone");
                    on_event(PodEvent::Gone(name));
                }
            }
            Some(Err(err)) => warn!(error = %err, "edge pod watch failed; retrying"),
            // kube's watcher does not end; should it ever, start over (with a fresh list).
            None => {
                warn!("edge pod watch ended; starting it again");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
                events = watch();
            }
        }
    }
    debug!("edge pod watch stopped");
}

/// Builds a client from the kubeconfig (`KUBECONFIG`, else `~/.kube/config`) or, failing that,
/// the in-cluster service account, as `kube::Client::try_default` does. The error says in
/// plain words what was tried.
pub async fn client() -> Result<kube::Client, String> {
    // kube uses rustls with the process-wide default crypto provider. Install ring's (the one
    // this crate enables) so that a second provider enabled elsewhere in the build cannot
    // leave the choice ambiguous; an already installed provider is kept.
    let _ = rustls::crypto::ring::default_provider().install_default();
    kube::Client::try_default().await.map_err(|err| {
        let tried = what_was_tried(
            std::env::var_os("KUBECONFIG").map(|v| v.to_string_lossy().into_owned()),
            std::env::var("KUBERNETES_SERVICE_HOST").ok(),
        );
        match err {
            kube::Error::InferConfig(_) => {
                format!("no usable Kubernetes configuration: tried {tried}; neither worked: {err}")
            }
            _ => format!(
                "could not build a Kubernetes client from the configuration found (tried \
                 {tried}): {err}"
            ),
        }
    })
}

/// Says in plain words where `kube::Client::try_default` looks for a configuration.
fn what_was_tried(kubeconfig: Option<String>, service_host: Option<String>) -> String {
    let kubeconfig = match kubeconfig {
        Some(path) => format!("the kubeconfig named by KUBECONFIG ({path})"),
        None => "the kubeconfig at ~/.kube/config (KUBECONFIG is not set)".to_owned(),
    };
    let in_cluster = match service_host {
        Some(host) => format!(
            "the in-cluster service account (KUBERNETES_SERVICE_HOST={host}, token and CA under \
             /var/run/secrets/kubernetes.io/serviceaccount)"
        ),
        None => "the in-cluster service account (KUBERNETES_SERVICE_HOST is not set: not \
                 running in a pod)"
            .to_owned(),
    };
    format!("{kubeconfig}, then {in_cluster}")
}

/// How many reported pod uids are remembered, so that no incarnation is reported twice.
/// Edge pods are few and replaced rarely; thousands of incarnations span a long time.
const REMEMBERED_UIDS: usize = 4096;

/// The uids already reported gone, the oldest forgotten first.
#[derive(Debug, Default)]
struct Reported {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl Reported {
    fn contains(&self, uid: &str) -> bool {
        self.set.contains(uid)
    }

    /// Records `uid`; false if it was already recorded.
    fn insert(&mut self, uid: String) -> bool {
        if !self.set.insert(uid.clone()) {
            return false;
        }
        self.order.push_back(uid);
        if self.order.len() > REMEMBERED_UIDS
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
        true
    }
}

/// The watch's memory: which pods are alive, which were already reported.
#[derive(Debug, Default)]
struct Tracker {
    /// Pods alive and not reported: name → uid.
    live: HashMap<String, String>,
    /// Incarnations already dealt with.
    reported: Reported,
    /// Between `Init` and `InitDone`: the uids listed so far.
    relisting: Option<HashSet<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Pending,
    Running,
    Ended,
}

fn phase(pod: &Pod) -> Phase {
    match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Failed" | "Succeeded") => Phase::Ended,
        None | Some("Pending") => Phase::Pending,
        // "Running", and "Unknown" (node unreachable: the pod may well be serving).
        Some(_) => Phase::Running,
    }
}

/// Name and uid of a pod; the name stands in for a missing uid.
fn identity(pod: &Pod) -> Option<(String, String)> {
    let name = pod.metadata.name.clone()?;
    let uid = pod.metadata.uid.clone().unwrap_or_else(|| name.clone());
    Some((name, uid))
}

type Gone = Vec<(String, &'static str)>;

impl Tracker {
    /// Applies one watcher event, appending `(pod name, reason)` for each pod found gone.
    fn handle(&mut self, event: watcher::Event<Pod>, gone: &mut Gone) {
        match event {
            watcher::Event::Init => self.relisting = Some(HashSet::new()),
            watcher::Event::InitApply(pod) => {
                if let Some((name, uid)) = identity(&pod) {
                    if let Some(seen) = &mut self.relisting {
                        seen.insert(uid.clone());
                    }
                    self.apply(name, uid, phase(&pod), gone);
                }
            }
            watcher::Event::Apply(pod) => {
                if let Some((name, uid)) = identity(&pod) {
                    self.apply(name, uid, phase(&pod), gone);
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some((name, uid)) = identity(&pod) {
                    self.delete(name, uid, gone);
                }
            }
            watcher::Event::InitDone => self.init_done(gone),
        }
    }

    fn apply(&mut self, name: String, uid: String, phase: Phase, gone: &mut Gone) {
        if self.reported.contains(&uid) {
            return;
        }
        if let Some(old_uid) = self.live.get(&name).filter(|old| **old != uid).cloned() {
            // A new incarnation under a known name: the old one's delete was missed.
            self.live.remove(&name);
            if self.reported.insert(old_uid.clone()) {
                if phase == Phase::Pending {
                    gone.push((name.clone(), "replaced by a new pod of the same name"));
                } else {
                    debug!(pod = %name, %old_uid, new_uid = %uid,
                        "edge pod replaced by a running pod of the same name; not reaping");
                }
            }
        }
        if phase == Phase::Ended {
            self.live.remove(&name);
            if self.reported.insert(uid) {
                gone.push((name, "phase Failed or Succeeded"));
            }
        } else {
            self.live.insert(name, uid);
        }
    }

    fn delete(&mut self, name: String, uid: String, gone: &mut Gone) {
        if !self.reported.insert(uid.clone()) {
            return;
        }
        match self.live.get(&name) {
            Some(live_uid) if *live_uid != uid => {
                // An older incarnation than the one alive under this name: the newer one
                // holds the node id now.
                debug!(pod = %name, %uid, "an older incarnation of a live edge pod was deleted");
            }
            _ => {
                self.live.remove(&name);
                gone.push((name, "deleted"));
            }
        }
    }

    fn init_done(&mut self, gone: &mut Gone) {
        let seen = self.relisting.take().unwrap_or_default();
        let mut missing: Vec<(String, String)> = self
            .live
            .iter()
            .filter(|(_, uid)| !seen.contains(*uid))
            .map(|(name, uid)| (name.clone(), uid.clone()))
            .collect();
        missing.sort();
        for (name, uid) in missing {
            self.live.remove(&name);
            if self.reported.insert(uid) {
                gone.push((name, "absent from a re-list"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(name: &str, uid: &str, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: Some(uid.into()),
                ..ObjectMeta::default()
            },
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    fn run(tracker: &mut Tracker, events: Vec<watcher::Event<Pod>>) -> Vec<String> {
        let mut gone = Vec::new();
        for event in events {
            tracker.handle(event, &mut gone);
        }
        gone.into_iter().map(|(name, _)| name).collect()
    }

    fn listed(pods: Vec<Pod>) -> Vec<watcher::Event<Pod>> {
        let mut events = vec![watcher::Event::Init];
        events.extend(pods.into_iter().map(watcher::Event::InitApply));
        events.push(watcher::Event::InitDone);
        events
    }

    use watcher::Event::{Apply, Delete};

    #[test]
    fn a_failed_pod_is_reported_once_even_when_later_deleted() {
        let mut t = Tracker::default();
        assert!(run(&mut t, listed(vec![pod("edge-0", "u0", "Running")])).is_empty());
        let failed = pod("edge-0", "u0", "Failed");
        assert_eq!(
            run(&mut t, vec![Apply(failed.clone()), Apply(failed.clone())]),
            ["edge-0"]
        );
        // Still listed as Failed in a re-list, then deleted: nothing more.
        assert!(run(&mut t, listed(vec![failed.clone()])).is_empty());
        assert!(run(&mut t, vec![Delete(failed)]).is_empty());
        assert!(t.live.is_empty());
    }

    #[test]
    fn succeeded_counts_as_gone_and_unknown_does_not() {
        let mut t = Tracker::default();
        run(
            &mut t,
            listed(vec![
                pod("edge-0", "u0", "Running"),
                pod("edge-1", "u1", "Running"),
            ]),
        );
        let events = vec![
            Apply(pod("edge-0", "u0", "Unknown")),
            Apply(pod("edge-1", "u1", "Succeeded")),
        ];
        assert_eq!(run(&mut t, events), ["edge-1"]);
    }

    #[test]
    fn a_pod_already_failed_at_the_first_list_is_reported() {
        let mut t = Tracker::default();
        let events = listed(vec![
            pod("edge-0", "u0", "Running"),
            pod("edge-1", "u1", "Failed"),
        ]);
        assert_eq!(run(&mut t, events), ["edge-1"]);
    }

    #[test]
    fn a_relist_reports_missing_pods_once() {
        let mut t = Tracker::default();
        run(
            &mut t,
            listed(vec![
                pod("edge-0", "u0", "Running"),
                pod("edge-1", "u1", "Running"),
                pod("edge-2", "u2", "Running"),
            ]),
        );
        let relist = listed(vec![pod("edge-1", "u1", "Running")]);
        assert_eq!(run(&mut t, relist.clone()), ["edge-0", "edge-2"]);
        assert!(run(&mut t, relist).is_empty());
        // A late delete of a pod already reported by the re-list is not reported again.
        assert!(run(&mut t, vec![Delete(pod("edge-0", "u0", "Running"))]).is_empty());
    }

    #[test]
    fn a_replacement_is_reported_only_while_it_is_pending() {
        let mut t = Tracker::default();
        run(
            &mut t,
            listed(vec![
                pod("edge-0", "u0", "Running"),
                pod("edge-1", "u1", "Running"),
            ]),
        );
        let relist = listed(vec![
            pod("edge-0", "u0-new", "Pending"),
            pod("edge-1", "u1-new", "Running"),
        ]);
        assert_eq!(run(&mut t, relist), ["edge-0"]);
        // The old incarnations' deletes, should they still come, report nothing.
        let late = vec![
            Delete(pod("edge-0", "u0", "Running")),
            Delete(pod("edge-1", "u1", "Running")),
        ];
        assert!(run(&mut t, late).is_empty());
        // The new incarnations are tracked.
        assert_eq!(
            run(&mut t, vec![Delete(pod("edge-1", "u1-new", "Running"))]),
            ["edge-1"]
        );
    }

    #[test]
    fn an_interrupted_relist_starts_over() {
        let mut t = Tracker::default();
        run(
            &mut t,
            listed(vec![
                pod("edge-0", "u0", "Running"),
                pod("edge-1", "u1", "Running"),
            ]),
        );
        // A re-list that saw edge-1 and then failed: a new Init starts an empty list again.
        let mut events = vec![
            watcher::Event::Init,
            watcher::Event::InitApply(pod("edge-1", "u1", "Running")),
        ];
        events.extend(listed(vec![pod("edge-0", "u0", "Running")]));
        assert_eq!(run(&mut t, events), ["edge-1"]);
    }

    #[test]
    fn the_error_message_names_what_was_tried() {
        let text = what_was_tried(Some("/nowhere/config".into()), None);
        assert!(text.contains("KUBECONFIG (/nowhere/config)"), "{text}");
        assert!(
            text.contains("KUBERNETES_SERVICE_HOST is not set"),
            "{text}"
        );
        let text = what_was_tried(None, Some("10.0.0.1".into()));
        assert!(
            text.contains("~/.kube/config (KUBECONFIG is not set)"),
            "{text}"
        );
        assert!(text.contains("KUBERNETES_SERVICE_HOST=10.0.0.1"), "{text}");
    }

    #[test]
    fn uids_are_remembered_up_to_the_bound() {
        let mut reported = Reported::default();
        assert!(reported.insert("first".into()));
        assert!(!reported.insert("first".into()));
        for i in 0..REMEMBERED_UIDS {
            assert!(reported.insert(format!("uid-{i}")));
        }
        assert!(!reported.contains("first"));
        assert!(reported.contains("uid-0"));
        assert_eq!(reported.set.len(), REMEMBERED_UIDS);
    }
}
