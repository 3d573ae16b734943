//! `watch_edge_pods` against a scripted Kubernetes API server (kube's tower-test mock
//! service pattern): each test answers the list and watch requests the watcher makes.
//!
//! Synchronisation: the watcher handles a watch response's events before it asks for the
//! next watch, so once the next request reaches the mock every event before it has been
//! passed to `on_event`. Events are awaited through a channel with a timeout.

use std::time::Duration;

use herald_kube::{PodEvent, PodWatchConfig, watch_edge_pods};
use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tower_test::mock::{self, Handle, SendResponse};

/// Generous: a retry after an error waits for kube's backoff (0.8 s, jittered, then more).
const WAIT: Duration = Duration::from_secs(15);
const SELECTOR: &str = "app.kubernetes.io/component=edge";

type Responder = SendResponse<Response<Body>>;

/// The mock API server's side of the client, plus the watch under test.
struct Harness {
    handle: Handle<Request<Body>, Response<Body>>,
    events: mpsc::UnboundedReceiver<PodEvent>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

fn start(default_namespace: &str, config: PodWatchConfig) -> Harness {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, default_namespace);
    let (tx, events) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(watch_edge_pods(
        client,
        config,
        move |event| {
            let _ = tx.send(event);
        },
        shutdown.clone(),
    ));
    Harness {
        handle,
        events,
        shutdown,
        task,
    }
}

fn edge_config() -> PodWatchConfig {
    PodWatchConfig {
        namespace: None,
        label_selector: SELECTOR.to_owned(),
    }
}

impl Harness {
    async fn next_request(&mut self) -> (Request<Body>, Responder) {
        timeout(WAIT, self.handle.next_request())
            .await
            .expect("timed out waiting for the watcher's next request")
            .expect("the client is gone")
    }

    /// The next request, which must be a list; returns its query parameters too.
    async fn expect_list(&mut self) -> (Request<Body>, Vec<(String, String)>, Responder) {
        let (request, respond) = self.next_request().await;
        let query = query_pairs(&request);
        assert_eq!(request.method(), http::Method::GET);
        assert!(
            param(&query, "watch").is_none(),
            "expected a list request, got {}",
            request.uri()
        );
        (request, query, respond)
    }

    /// The next request, which must be a watch from `resource_version`.
    async fn expect_watch(&mut self, resource_version: &str) -> (Request<Body>, Responder) {
        let (request, respond) = self.next_request().await;
        let query = query_pairs(&request);
        assert_eq!(
            param(&query, "watch"),
            Some("true"),
            "expected a watch request, got {}",
            request.uri()
        );
        assert_eq!(
            param(&query, "resourceVersion"),
            Some(resource_version),
            "watch from the wrong resource version: {}",
            request.uri()
        );
        (request, respond)
    }

    /// The next reported event.
    async fn next_event(&mut self) -> PodEvent {
        timeout(WAIT, self.events.recv())
            .await
            .expect("timed out waiting for a pod event")
            .expect("the watch ended")
    }

    /// Serves the usual start: a list of `pods` at resource version 10, then a watch from 10.
    async fn serve_start(&mut self, pods: Vec<Value>) -> Responder {
        let (_, _, respond) = self.expect_list().await;
        respond.send_response(list(10, pods));
        let (_, respond) = self.expect_watch("10").await;
        respond
    }

    /// Cancels the watch, checks that it stops, and returns the events not yet received.
    async fn stop(mut self) -> Vec<PodEvent> {
        self.shutdown.cancel();
        timeout(WAIT, self.task)
            .await
            .expect("the watch did not stop when cancelled")
            .expect("the watch panicked");
        let mut rest = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            rest.push(event);
        }
        rest
    }
}

fn query_pairs(request: &Request<Body>) -> Vec<(String, String)> {
    request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn param<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("ascii");
                out.push(u8::from_str_radix(hex, 16).expect("percent escape"));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("utf-8")
}

fn pod(name: &str, resource_version: u32, phase: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": format!("uid-{name}"),
            "resourceVersion": resource_version.to_string(),
            "labels": { "app.kubernetes.io/component": "edge" },
        },
        "spec": { "containers": [{ "name": "edge", "image": "herald" }] },
        "status": { "phase": phase },
    })
}

fn terminating(mut pod: Value) -> Value {
    pod["metadata"]["deletionTimestamp"] = json!("2026-11-02T10:00:00Z");
    pod["metadata"]["deletionGracePeriodSeconds"] = json!(30);
    pod
}

fn list(resource_version: u32, pods: Vec<Value>) -> Response<Body> {
    let body = json!({
        "apiVersion": "v1",
        "kind": "PodList",
        "metadata": { "resourceVersion": resource_version.to_string() },
        "items": pods,
    });
    Response::new(Body::from(serde_json::to_vec(&body).expect("json")))
}

fn watch_event(kind: &str, object: Value) -> Value {
    json!({ "type": kind, "object": object })
}

/// What the API server sends on a watch whose resource version has been compacted away.
fn expired() -> Value {
    watch_event(
        "ERROR",
        json!({
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "message": "too old resource version: 10 (25)",
            "reason": "Expired",
            "code": 410,
        }),
    )
}

/// A watch response: the events, one JSON document a line, then the end of the stream.
fn watch(events: Vec<Value>) -> Response<Body> {
    let mut body = Vec::new();
    for event in events {
        serde_json::to_writer(&mut body, &event).expect("json");
        body.push(b'\n');
    }
    Response::new(Body::from(body))
}

fn failure(status: StatusCode, reason: &str) -> Response<Body> {
    let body = json!({
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": format!("scripted failure: {reason}"),
        "reason": reason,
        "code": status.as_u16(),
    });
    let mut response = Response::new(Body::from(serde_json::to_vec(&body).expect("json")));
    *response.status_mut() = status;
    response
}

fn gone(name: &str) -> PodEvent {
    PodEvent::Gone(name.to_owned())
}

#[tokio::test]
async fn a_deleted_pod_is_reported_exactly_once() {
    let mut h = start("default", edge_config());
    let respond = h
        .serve_start(vec![
            pod("edge-0", 5, "Running"),
            pod("edge-1", 6, "Running"),
        ])
        .await;
    respond.send_response(watch(vec![
        watch_event("DELETED", pod("edge-1", 11, "Running")),
        // The same incarnation's delete again (a replayed event): not reported twice.
        watch_event("DELETED", pod("edge-1", 11, "Running")),
    ]));
    assert_eq!(h.next_event().await, gone("edge-1"));
    // The stream ended: the watcher resumes from the last resource version it saw.
    let _parked = h.expect_watch("11").await;
    assert_eq!(h.stop().await, vec![]);
}

#[tokio::test]
async fn a_pod_whose_phase_becomes_failed_is_reported_once() {
    let mut h = start("default", edge_config());
    let respond = h
        .serve_start(vec![
            pod("edge-0", 5, "Running"),
            pod("edge-1", 6, "Running"),
        ])
        .await;
    respond.send_response(watch(vec![
        watch_event("MODIFIED", pod("edge-0", 11, "Failed")),
        // Later changes to the failed pod, and its eventual deletion, are the same incarnation.
        watch_event("MODIFIED", pod("edge-0", 12, "Failed")),
        watch_event("DELETED", pod("edge-0", 13, "Failed")),
    ]));
    assert_eq!(h.next_event().await, gone("edge-0"));
    let _parked = h.expect_watch("13").await;
    assert_eq!(h.stop().await, vec![]);
}

#[tokio::test]
async fn a_pod_that_exits_succeeded_is_reported() {
    let mut h = start("default", edge_config());
    let respond = h.serve_start(vec![pod("edge-0", 5, "Running")]).await;
    respond.send_response(watch(vec![watch_event(
        "MODIFIED",
        pod("edge-0", 11, "Succeeded"),
    )]));
    assert_eq!(h.next_event().await, gone("edge-0"));
    let _parked = h.expect_watch("11").await;
    assert_eq!(h.stop().await, vec![]);
}

#[tokio::test]
async fn a_terminating_pod_is_not_gone_until_it_is_deleted() {
    let mut h = start("default", edge_config());
    let respond = h
        .serve_start(vec![
            pod("edge-0", 5, "Running"),
            pod("edge-1", 6, "Running"),
        ])
        .await;
    respond.send_response(watch(vec![watch_event(
        "MODIFIED",
        terminating(pod("edge-0", 11, "Running")),
    )]));
    // The watcher asks for more only after handling that event: nothing was reported.
    let (_, respond) = h.expect_watch("11").await;
    assert_eq!(h.events.try_recv().ok(), None);

    // Once the draining pod is finally deleted, it is gone.
    respond.send_response(watch(vec![watch_event(
        "DELETED",
        terminating(pod("edge-0", 12, "Running")),
    )]));
    assert_eq!(h.next_event().await, gone("edge-0"));
    let _parked = h.expect_watch("12").await;
    assert_eq!(h.stop().await, vec![]);
}

#[tokio::test]
async fn the_label_selector_and_namespace_reach_the_api_server() {
    let selector = "app.kubernetes.io/component=edge,app.kubernetes.io/part-of=herald";
    let config = PodWatchConfig {
        namespace: Some("herald-prod".to_owned()),
        label_selector: selector.to_owned(),
    };
    let mut h = start("default", config);
    let (request, query, respond) = h.expect_list().await;
    assert_eq!(request.uri().path(), "/api/v1/namespaces/herald-prod/pods");
    assert_eq!(
        param(&query, "labelSelector"),
        Some(selector),
        "{}",
        request.uri()
    );
    respond.send_response(list(10, vec![pod("edge-0", 5, "Running")]));

    let (request, _parked) = h.expect_watch("10").await;
    assert_eq!(request.uri().path(), "/api/v1/namespaces/herald-prod/pods");
    assert_eq!(
        param(&query_pairs(&request), "labelSelector"),
        Some(selector),
        "{}",
        request.uri()
    );
    assert_eq!(h.stop().await, vec![]);
}

#[tokio::test]
async fn without_a_namespace_the_clients_default_namespace_is_watched() {
    let mut h = start("team-a", edge_config());
    let (request, query, _parked) = h.expect_list().await;
    assert_eq!(request.uri().path(), "/api/v1/namespaces/team-a/pods");
    assert_eq!(param(&query, "labelSelector"), Some(SELECTOR));
    assert_eq!(h.stop().await, vec![]);
}

#[tokio::test]
async fn a_pod_missing_after_a_relist_is_reported() {
    let mut h = start("default", edge_config());
    let respond = h
        .serve_start(vec![
            pod("edge-0", 5, "Running"),
            pod("edge-1", 6, "Running"),
        ])
        .await;
    // The watch's resource version has expired: the watcher must list again.
    respond.send_response(watch(vec![expired()]));
    let (_, query, respond) = h.expect_list().await;
    assert_eq!(param(&query, "labelSelector"), Some(SELECTOR));
    respond.send_response(list(25, vec![pod("edge-0", 5, "Running")]));

    assert_eq!(h.next_event().await, gone("edge-1"));
    let _parked = h.expect_watch("25").await;
    assert_eq!(h.stop().await, vec![]);
}

#[tokio::test]
async fn a_relist_after_the_stream_ends_and_expires_reports_missing_pods() {
    let mut h = start("default", edge_config());
    let respond = h
        .serve_start(vec![
            pod("edge-0", 5, "Running"),
            pod("edge-1", 6, "Running"),
            pod("edge-2", 7, "Running"),
        ])
        .await;
    // The server closes the watch (its timeout); the watcher re-watches from 10, and that
    // resource version has expired meanwhile, so the watcher re-lists.
    respond.send_response(watch(vec![]));
    let (_, respond) = h.expect_watch("10").await;
    respond.send_response(watch(vec![expired()]));
    let (_, _, respond) = h.expect_list().await;
    respond.send_response(list(
        30,
        vec![
            pod("edge-1", 6, "Running"),
            // edge-2 failed while the watch was down.
            pod("edge-2", 20, "Failed"),
        ],
    ));

    let mut reported = vec![h.next_event().await, h.next_event().await];
    reported.sort_by_key(|PodEvent::Gone(name)| name.clone());
    assert_eq!(reported, vec![gone("edge-0"), gone("edge-2")]);
    let _parked = h.expect_watch("30").await;
    assert_eq!(h.stop().await, vec![]);
}

#[tokio::test]
async fn watch_errors_are_retried_not_fatal() {
    let mut h = start("default", edge_config());
    // The first list fails (API server trouble); the watcher tries again after a backoff.
    let (_, _, respond) = h.expect_list().await;
    respond.send_response(failure(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
    ));
    let (_, _, respond) = h.expect_list().await;
    respond.send_response(list(10, vec![pod("edge-0", 5, "Running")]));
    // Starting the watch is forbidden once (RBAC being fixed), then works.
    let (_, respond) = h.expect_watch("10").await;
    respond.send_response(failure(StatusCode::FORBIDDEN, "Forbidden"));
    let (_, respond) = h.expect_watch("10").await;
    respond.send_response(watch(vec![watch_event(
        "DELETED",
        pod("edge-0", 11, "Running"),
    )]));
    assert_eq!(h.next_event().await, gone("edge-0"));
    let _parked = h.expect_watch("11").await;
    assert_eq!(h.stop().await, vec![]);
}

#[tokio::test]
async fn shutdown_stops_a_watch_that_has_no_answer_yet() {
    let mut h = start("default", edge_config());
    let (_request, _query, _unanswered) = h.expect_list().await;
    assert_eq!(h.stop().await, vec![]);
}
