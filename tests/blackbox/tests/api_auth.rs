//! The gRPC API with `--api-tokens`: a call without a token, with an
//! unknown one, or with one lacking the method's scope is refused with its
//! status; health checks stay open; an edge reads member lists from the
//! presence service with its own token; and tokens are rotated by editing
//! the file, without a restart.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use herald_proto::v1::{JoinRequest, RoomMembersRequest};
use herald_test_support::eventually;
use serde_json::json;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const PUBLISHER: &str = "pub-4f1c9a7e2b8d6035";
const ADMIN: &str = "adm-9e3b7c1d5a2f8046";
const PRESENCE: &str = "prs-2a6d8f0b4c1e9735";
const ROTATED: &str = "pub-rotated-7d3e9a1c5b";

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// The status of a call that must have been refused.
fn refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> tonic::Status {
    result.expect_err("the call was let through")
}

fn write_tokens(file: &tempfile::NamedTempFile, text: &str) {
    // Replaced whole, the way a Secret's file is.
    let tmp = file.path().with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, file.path()).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_need_a_token_with_the_methods_scope_and_tokens_rotate() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        file,
        "# backends\n{PUBLISHER} publish\n{ADMIN} admin,publish\n{PRESENCE} presence"
    )
    .unwrap();
    let path = file.path().display().to_string();
    let tokens = vec!["--api-tokens".to_string(), path];
    let mut cluster = Cluster::start_spec(Spec {
        edges: 0,
        router_args: tokens.clone(),
        presence_args: tokens,
        ..Spec::default()
    });
    // This edge asks the presence service over gRPC, with its own token.
    let presence_url = format!("http://{}", cluster.presence_grpcs[0]);
    cluster.add_edge_with(
        "edge-0",
        &[
            "--presence".into(),
            presence_url.clone(),
            "--presence-api-token".into(),
            PRESENCE.into(),
        ],
    );
    let ann = connect(&cluster.ws(0), "ann").await;
    ok(&ann, json!({"op":"join","room":"chat:api"})).await;
    let members = ok(&ann, json!({"op":"presence","room":"chat:api"})).await;
    assert_eq!(member_users(&members), ["ann"], "{members}");

    let mut router = cluster.router().await;

    let e = refused(router.publish(publish_request("chat:api", "1")).await);
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = refused(
        router
            .publish(with_token(
                publish_request("chat:api", "1"),
                "not-a-known-token-at-all",
            ))
            .await,
    );
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let join = || JoinRequest {
        user: "ann".into(),
        room: "chat:other".into(),
    };
    let e = refused(router.join(with_token(join(), PUBLISHER)).await);
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("admin"), "{e:?}");

    router
        .publish(with_token(
            publish_request("chat:api", "\"hello\""),
            PUBLISHER,
        ))
        .await
        .expect("a publish token publishes");
    assert_eq!(ann.recv_op("message", WAIT).await.unwrap()["data"], "hello");
    router
        .join(with_token(join(), ADMIN))
        .await
        .expect("an admin token joins");

    // The Presence service, on the presence process and fronted by the router.
    let mut presence = cluster.presence().await;
    let room = || RoomMembersRequest {
        room: "chat:api".into(),
        ..Default::default()
    };
    let e = refused(presence.room_members(room()).await);
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = refused(presence.room_members(with_token(room(), PUBLISHER)).await);
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    presence
        .room_members(with_token(room(), PRESENCE))
        .await
        .expect("a presence token reads member lists");

    // Probes need no token.
    for grpc in [cluster.router_grpc, cluster.presence_grpcs[0]] {
        let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .expect("health is open")
            .into_inner();
        assert_eq!(reply.status, ServingStatus::Serving as i32);
    }

    // Rotation: the publisher's token is replaced; no restart.
    write_tokens(
        &file,
        &format!("{ROTATED} publish\n{ADMIN} admin\n{PRESENCE} presence\n"),
    );
    eventually(
        Duration::from_secs(15),
        "the new token to be accepted",
        || {
            let mut router = router.clone();
            async move {
                router
                    .publish(with_token(publish_request("chat:api", "2"), ROTATED))
                    .await
                    .ok()
            }
        },
    )
    .await;
    let e = refused(
        router
            .publish(with_token(publish_request("chat:api", "3"), PUBLISHER))
            .await,
    );
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "the old token is gone: {e:?}"
    );

    // A broken edit keeps the tokens in force.
    write_tokens(&file, "garbage\n");
    eventually(
        Duration::from_secs(15),
        "the router to read the bad file",
        || {
            let read = cluster
                .router
                .output()
                .contains("keeping the tokens read before");
            async move { read.then_some(()) }
        },
    )
    .await;
    router
        .publish(with_token(publish_request("chat:api", "4"), ROTATED))
        .await
        .expect("a bad file keeps the tokens read before");
}
