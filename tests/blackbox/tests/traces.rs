//! One OpenTelemetry trace from a backend's publish to every edge: a
//! collector in this test process (OTLP/gRPC, the collector's own
//! `TraceService`) receives the spans of a router, a presence replica and
//! two edges, and each room message's spans share the publisher's trace id
//! and hang off the right parents; the call's latency histogram keeps the
//! trace id as an exemplar.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use herald_test_support::{eventually, http_get};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::json;
use tonic::{Request, Response, Status};

/// A span as the collector received it, with the process that sent it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    instance: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: Vec<(String, String)>,
}

impl Got {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Got>>>);

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut got = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource: Vec<(String, String)> = rs
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default()
                .iter()
                .map(|kv| (kv.key.clone(), text(&kv.value)))
                .collect();
            let find = |key: &str| {
                resource
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push(Got {
                        service: find("service.name"),
                        instance: find("service.instance.id"),
                        name: span.name.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(&kv.value)))
                            .collect(),
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn start_collector() -> (SocketAddr, Collector) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let collector = Collector::default();
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (addr, collector)
}

/// The spans of `trace_id` received so far.
fn of_trace(collector: &Collector, trace_id: &str) -> Vec<Got> {
    collector
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .cloned()
        .collect()
}

const WAIT_SPANS: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_is_one_trace_from_the_backend_to_every_edge() {
    let (addr, collector) = start_collector().await;
    // `chat` messages tell clients their trace, for the browser's own telemetry.
    let (_file, mut common) = config_file(
        "[namespaces.chat]\ntraceparent = true\n\n\
         [namespaces.doc]\ndurable = { history_size = 10, history_ttl = \"1h\" }\n",
    );
    common.extend(["--otlp-endpoint".into(), format!("http://{addr}")]);
    let cluster = Cluster::start_spec(Spec {
        edges: 2,
        common,
        ..Spec::default()
    });
    let members = [
        connect(&cluster.ws(0), "tia").await,
        connect(&cluster.ws(1), "tom").await,
    ];
    for m in &members {
        ok(m, json!({"op":"join","room":"chat:traced"})).await;
    }

    // A backend's call, in a trace of its own.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut router = cluster.router().await;
    let mut req = tonic::Request::new(publish_request("chat:traced", "\"traced\""));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    router.publish(req).await.unwrap();
    let mut frames = Vec::new();
    for m in &members {
        let frame = m.recv_op("message", WAIT).await.unwrap();
        assert_eq!(frame["data"], "traced");
        frames.push(frame);
    }

    let spans = eventually(WAIT_SPANS, "both edges' fan-out spans", || async {
        let spans = of_trace(&collector, trace_id);
        let fanouts = spans.iter().filter(|s| s.service == "herald-edge").count();
        (fanouts >= 2).then_some(spans)
    })
    .await;
    let server = spans
        .iter()
        .find(|s| s.service == "herald-router" && s.name == "herald.v1.Router/Publish")
        .unwrap_or_else(|| panic!("no router server span: {spans:#?}"));
    assert_eq!(
        server.parent, caller_span,
        "the router's span hangs off the caller's"
    );
    let publish = spans
        .iter()
        .find(|s| s.service == "herald-router" && s.name.starts_with("publish "))
        .unwrap_or_else(|| panic!("no NATS publish span: {spans:#?}"));
    assert_eq!(
        publish.parent, server.span_id,
        "the NATS publish is the call's child"
    );
    let mut edges: Vec<&str> = Vec::new();
    for fanout in spans.iter().filter(|s| s.service == "herald-edge") {
        assert!(fanout.name.starts_with("fanout "), "{fanout:?}");
        assert_eq!(
            fanout.parent, publish.span_id,
            "a fan-out hangs off the publish: {fanout:?}"
        );
        assert_eq!(fanout.attr("members"), Some("1"), "{fanout:?}");
        edges.push(&fanout.instance);
    }
    for frame in &frames {
        assert_eq!(
            frame["traceparent"],
            format!("00-{trace_id}-{}-01", publish.span_id),
            "the client's message continues the trace from the publish"
        );
    }
    edges.sort();
    assert_eq!(edges, ["edge-0", "edge-1"], "one fan-out span on each edge");

    // A client's history read is a span of its command's trace.
    ok(&members[0], json!({"op":"history","room":"doc:notes"})).await;
    let (command, read) = eventually(WAIT_SPANS, "the history read's span", || async {
        let all = collector.0.lock().unwrap().clone();
        let command = all.iter().find(|s| s.name == "history")?;
        let read = all.iter().find(|s| s.name == "history.read")?;
        Some((command.clone(), read.clone()))
    })
    .await;
    assert_eq!(read.parent, command.span_id, "{read:?}");
    assert_eq!(read.trace_id, command.trace_id, "{read:?}");
    assert_eq!(read.attr("room"), Some("doc:notes"), "{read:?}");
    assert_eq!(read.attr("messages"), Some("0"), "{read:?}");

    // The call's latency bucket links to its trace (an OpenMetrics exemplar).
    let (status, text) = http_get(cluster.router.http, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{text}");
    let exemplar = format!("# {{trace_id=\"{trace_id}\"}}");
    assert!(
        text.lines().any(
            |l| l.starts_with("herald_grpc_server_handling_seconds_bucket")
                && l.contains("grpc_method=\"Publish\"")
                && l.contains(&exemplar)
        ),
        "no Publish latency bucket with the trace as exemplar:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_publish_is_one_trace_reaching_the_other_edge() {
    let (addr, collector) = start_collector().await;
    let cluster = Cluster::start_spec(Spec {
        edges: 2,
        common: vec!["--otlp-endpoint".into(), format!("http://{addr}")],
        ..Spec::default()
    });
    let writer = connect(&cluster.ws(0), "wil").await;
    let reader = connect(&cluster.ws(1), "rae").await;
    ok(&reader, json!({"op":"join","room":"chat:client-traced"})).await;
    ok(
        &writer,
        json!({"op":"publish","room":"chat:client-traced","data":"hi"}),
    )
    .await;
    let frame = reader.recv_op("message", WAIT).await.unwrap();
    assert_eq!(frame["data"], "hi");
    assert_eq!(
        frame.get("traceparent"),
        None,
        "namespaces tell clients their traces only when configured to"
    );

    let (command, fanout) = eventually(WAIT_SPANS, "the command's trace on edge-1", || async {
        let all = collector.0.lock().unwrap().clone();
        let command = all.iter().find(|s| {
            s.instance == "edge-0"
                && s.name == "publish"
                && s.attr("room") == Some("chat:client-traced")
        })?;
        let fanout = all
            .iter()
            .find(|s| s.instance == "edge-1" && s.trace_id == command.trace_id)?;
        Some((command.clone(), fanout.clone()))
    })
    .await;
    let spans = of_trace(&collector, &command.trace_id);
    let publish = spans
        .iter()
        .find(|s| s.name.starts_with("publish ") && s.instance == "edge-0")
        .unwrap_or_else(|| panic!("no NATS publish span: {spans:#?}"));
    assert_eq!(publish.parent, command.span_id);
    assert_eq!(fanout.parent, publish.span_id);
    assert_eq!(fanout.attr("members"), Some("1"));

    // The reader's join changed the presence view: the replica's update is
    // in the join command's trace.
    let (join, update) = eventually(WAIT_SPANS, "the view update of rae's join", || async {
        let all = collector.0.lock().unwrap().clone();
        let join = all.iter().find(|s| {
            s.instance == "edge-1"
                && s.name == "join"
                && s.attr("room") == Some("chat:client-traced")
        })?;
        let update = all
            .iter()
            .find(|s| s.service == "herald-presence" && s.trace_id == join.trace_id)?;
        Some((join.clone(), update.clone()))
    })
    .await;
    assert_eq!(update.name, "presence.update join", "{update:?}");
    assert_eq!(update.parent, join.span_id, "{update:?}");
    assert_eq!(update.attr("node"), Some("edge-1"), "{update:?}");
}

/// Control actions and presence queries cross NATS in the caller's trace
/// too: a `Router.Join` reaches the edge holding the user as a `control`
/// span (and the join it makes, the presence replica as a view update), a
/// `RoomMembers` through the router reaches a presence replica as a
/// `presence.query` span, each the child of the router's server span.
#[tokio::test(flavor = "multi_thread")]
async fn control_actions_and_presence_queries_join_the_callers_trace() {
    let (addr, collector) = start_collector().await;
    let cluster = Cluster::start_spec(Spec {
        edges: 2,
        common: vec!["--otlp-endpoint".into(), format!("http://{addr}")],
        ..Spec::default()
    });
    let uma = connect(&cluster.ws(1), "uma").await;
    let mut router = cluster.router().await;

    let join_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut req = tonic::Request::new(herald_proto::v1::JoinRequest {
        user: "uma".into(),
        room: "chat:moved".into(),
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{join_trace}-b7ad6b7169203331-01")
            .parse()
            .unwrap(),
    );
    router.join(req).await.unwrap();

    let query_trace = "5b8efff798038103d269b633813fc60c";
    let presence = herald_proto::v1::presence_client::PresenceClient::connect(format!(
        "http://{}",
        cluster.router_grpc
    ))
    .await
    .unwrap();
    // The presence replica learns of the join from the edge's report, a
    // moment after the router's `Join` returned: ask until it has.
    eventually(WAIT_SPANS, "uma in the room's members", || {
        let mut presence = presence.clone();
        async move {
            let mut req = tonic::Request::new(herald_proto::v1::RoomMembersRequest {
                room: "chat:moved".into(),
                ..Default::default()
            });
            req.metadata_mut().insert(
                "traceparent",
                format!("00-{query_trace}-eee19b7ec3c1b174-01")
                    .parse()
                    .unwrap(),
            );
            let members = presence.room_members(req).await.unwrap().into_inner();
            (members.members.len() == 1).then_some(())
        }
    })
    .await;
    drop(uma);

    let (control, join) = eventually(WAIT_SPANS, "the edge's control span", || async {
        let spans = of_trace(&collector, join_trace);
        let control = spans.iter().find(|s| s.name == "control")?.clone();
        let join = spans
            .iter()
            .find(|s| s.name == "herald.v1.Router/Join")?
            .clone();
        Some((control, join))
    })
    .await;
    assert_eq!(control.instance, "edge-1", "{control:?}");
    assert_eq!(control.parent, join.span_id);
    // The session's join, acted on in its own task, changed the presence
    // view in the same trace.
    let update = eventually(WAIT_SPANS, "the replica's view update", || async {
        of_trace(&collector, join_trace)
            .into_iter()
            .find(|s| s.service == "herald-presence" && s.name.starts_with("presence.update"))
    })
    .await;
    assert_eq!(update.name, "presence.update join", "{update:?}");
    assert_eq!(update.parent, control.span_id, "{update:?}");

    let (query, call) = eventually(WAIT_SPANS, "the replica's query span", || async {
        let spans = of_trace(&collector, query_trace);
        let query = spans
            .iter()
            .find(|s| s.service == "herald-presence")?
            .clone();
        let call = spans
            .iter()
            .find(|s| s.name == "herald.v1.Presence/RoomMembers")?
            .clone();
        Some((query, call))
    })
    .await;
    assert_eq!(
        query.name, "herald.presence.query.room_members",
        "{query:?}"
    );
    assert_eq!(query.parent, call.span_id);
}
