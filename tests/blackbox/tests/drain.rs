//! SIGTERM starts a graceful stop: every process reports not ready at once
//! (`/readyz` 503, gRPC health NOT_SERVING, the overall "" service too) and
//! keeps serving for `--drain-delay` while load balancers notice; then an
//! edge tells its clients to reconnect elsewhere, spread over
//! `--drain-window`, and every process exits.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use herald_proto::v1::RoomMembersRequest;
use herald_test_support::{eventually, http_get};
use serde_json::json;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const DELAY: Duration = Duration::from_secs(3);

fn spec() -> Spec {
    Spec {
        edges: 1,
        common: vec!["--drain-delay".into(), format!("{}ms", DELAY.as_millis())],
        edge_args: vec!["--drain-window".into(), "1s".into()],
        ..Spec::default()
    }
}

fn not_ready(http: SocketAddr) -> bool {
    matches!(http_get(http, "/readyz"), Ok((503, _)))
}

async fn status(grpc: SocketAddr, service: &str) -> ServingStatus {
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let reply = health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(reply.status).unwrap()
}

async fn wait_exit(process: &mut herald_test_support::Herald, within: Duration) {
    let status = eventually(within, "the process exits", || {
        let exited = process.exited();
        async move { exited }
    })
    .await;
    assert!(status.success(), "exited with {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_draining_edge_is_not_ready_yet_accepts_then_moves_its_clients() {
    let mut cluster = Cluster::start_spec(spec());
    let early = connect(&cluster.ws(0), "early").await;
    ok(&early, json!({"op":"join","room":"chat:d"})).await;
    let edge = cluster.edge_addrs[0];

    cluster.edges[0].signal("-TERM");
    eventually(WAIT, "/readyz 503", || async {
        not_ready(edge).then_some(())
    })
    .await;
    // Load balancers have not noticed yet: a client that comes now is served.
    let late = connect(&cluster.ws(0), "late").await;
    ok(&late, json!({"op":"join","room":"chat:d"})).await;

    for client in [&early, &late] {
        let d = client
            .recv_op("disconnect", DELAY + Duration::from_secs(5))
            .await
            .expect("told to reconnect");
        assert_eq!(d["code"], 1012, "{d}");
        assert_eq!(d["reconnect"], true, "{d}");
        assert!(d["reconnect_after_ms"].as_u64().unwrap() <= 1000, "{d}");
    }
    wait_exit(&mut cluster.edges[0], Duration::from_secs(10)).await;
    let log = cluster.edges[0].output();
    assert!(
        log.contains("still accepting for 3s while load balancers notice"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_draining_router_says_not_serving_yet_serves_then_exits() {
    let mut cluster = Cluster::start_spec(spec());
    let grpc = cluster.router_grpc;
    assert_eq!(status(grpc, "").await, ServingStatus::Serving);

    cluster.router.signal("-TERM");
    eventually(WAIT, "gRPC health NOT_SERVING", || async {
        (status(grpc, "").await == ServingStatus::NotServing).then_some(())
    })
    .await;
    assert_eq!(
        status(grpc, "herald.v1.Router").await,
        ServingStatus::NotServing
    );
    assert!(not_ready(cluster.router.http));
    // Still serving the calls that come meanwhile.
    let mut router = cluster.router().await;
    router
        .publish(publish_request("chat:d", "\"still here\""))
        .await
        .expect("a publish during the drain delay");
    wait_exit(&mut cluster.router, DELAY + Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_draining_presence_replica_says_not_serving_yet_serves_then_exits() {
    let mut cluster = Cluster::start_spec(spec());
    let grpc = cluster.presence_grpcs[0];

    cluster.presences[0].signal("-TERM");
    eventually(WAIT, "gRPC health NOT_SERVING", || async {
        (status(grpc, "").await == ServingStatus::NotServing).then_some(())
    })
    .await;
    assert_eq!(
        status(grpc, "herald.v1.Presence").await,
        ServingStatus::NotServing
    );
    assert!(not_ready(cluster.presences[0].http));
    let mut presence = cluster.presence().await;
    presence
        .room_members(RoomMembersRequest {
            room: "chat:d".into(),
            ..Default::default()
        })
        .await
        .expect("a query during the drain delay");
    wait_exit(&mut cluster.presences[0], DELAY + Duration::from_secs(5)).await;
}
