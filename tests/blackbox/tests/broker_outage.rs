//! A stalled NATS server (stopped with SIGSTOP: its sockets stay open, so
//! only silence tells) is noticed within seconds: the edges and the router
//! report not ready while it lasts, and ready again once it is back. An
//! edge whose link to NATS went silent delivers, once back, the durable
//! messages published meanwhile.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use herald_test_support::{Proxy, eventually, http_get};

/// The client pings every 600 ms and gives up after two unanswered pings.
const NOTICED_WITHIN: Duration = Duration::from_secs(2);

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

fn ready(addr: std::net::SocketAddr) -> bool {
    matches!(http_get(addr, "/readyz"), Ok((200, _)))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_nats_server_makes_the_edges_not_ready_until_it_is_back() {
    let cluster = Cluster::start(2);
    for &edge in &cluster.edge_addrs {
        assert!(ready(edge));
    }
    signal(cluster.nats.pid(), "-STOP");
    let stopped_at = Instant::now();
    for &edge in &cluster.edge_addrs {
        eventually(
            NOTICED_WITHIN + Duration::from_secs(1),
            "edge not ready",
            || async { (!ready(edge)).then_some(()) },
        )
        .await;
    }
    let noticed_after = stopped_at.elapsed();
    signal(cluster.nats.pid(), "-CONT");
    for &edge in &cluster.edge_addrs {
        eventually(WAIT, "edge ready again", || async {
            ready(edge).then_some(())
        })
        .await;
    }
    assert!(
        noticed_after <= NOTICED_WITHIN + Duration::from_secs(1),
        "the stall was noticed after {noticed_after:?}"
    );
    // The cluster works again: a message goes through (publishes resume a
    // moment after the reconnect, once every process listens again).
    let alice = connect(&cluster.ws(0), "alice").await;
    ok(&alice, serde_json::json!({"op":"join","room":"chat:back"})).await;
    let publish = serde_json::json!({"op":"publish","room":"chat:back","data":"hi"});
    eventually(WAIT, "a publish is accepted", || async {
        let reply = alice.request(publish.clone()).await.unwrap();
        (reply["op"] == "ok").then_some(())
    })
    .await;
    let m = alice.recv_op("message", WAIT).await.unwrap();
    assert_eq!(m["data"], "hi");
}

/// While NATS is down, a publish is refused at once with `UNAVAILABLE`
/// (nothing is sent), and a refused message is never delivered after the
/// server is back; one published after that is.
#[tokio::test(flavor = "multi_thread")]
async fn a_publish_while_nats_is_down_is_refused_and_never_delivered() {
    let mut cluster = Cluster::start(1);
    let member = connect(&cluster.ws(0), "mo").await;
    ok(
        &member,
        serde_json::json!({"op":"join","room":"chat:outage"}),
    )
    .await;
    let mut router = cluster.router().await;
    router
        .publish(publish_request("chat:outage", "\"before\""))
        .await
        .unwrap();
    let m = member.recv_op("message", WAIT).await.unwrap();
    assert_eq!(m["data"], "before");

    cluster.nats.kill();
    // The router too must have seen the broker go: a publish it sends in the
    // moment before is rightly answered "outcome unknown", not "unavailable".
    for addr in cluster.edge_addrs.iter().chain([&cluster.router.http]) {
        eventually(WAIT, "not ready", || async {
            (!ready(*addr)).then_some(())
        })
        .await;
    }
    let e = router
        .publish(publish_request("chat:outage", "\"during\""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("not reachable"), "{e:?}");

    cluster.nats.restart().unwrap();
    for &edge in &cluster.edge_addrs {
        eventually(WAIT, "edge ready again", || async {
            ready(edge).then_some(())
        })
        .await;
    }
    // The edge's room subscription is back once a publish reaches it.
    eventually(WAIT, "a message after the restart", || async {
        let mut router = cluster.router().await;
        router
            .publish(publish_request("chat:outage", "\"after\""))
            .await
            .ok()?;
        member
            .recv_op("message", Duration::from_millis(500))
            .await
            .ok()
    })
    .await;
    // Whatever arrived, "during" never did.
    while let Ok(m) = member.recv_op("message", QUIET).await {
        assert_ne!(m["data"], "during", "a refused message was delivered");
    }
}

/// An edge whose link to NATS stops answering misses what is published
/// meanwhile. Once it is connected again, a durable room's member gets those
/// messages in order, though nothing published afterwards reveals the gap.
#[tokio::test(flavor = "multi_thread")]
async fn an_edge_cut_off_from_nats_delivers_the_durable_messages_it_missed() {
    let (_f, config) = config_file(
        r#"
[namespaces.doc]
durable = { history_size = 1000, history_ttl = "1h" }
"#,
    );
    let mut cluster = Cluster::start_spec(Spec {
        edges: 0,
        common: config,
        ..Spec::default()
    });
    let proxy = Proxy::start(cluster.nats.addr(), Duration::ZERO).await;
    cluster.add_edge_via("edge-0", &proxy.nats_url());
    let member = connect(&cluster.ws(0), "kim").await;
    ok(&member, serde_json::json!({"op":"join","room":"doc:cut"})).await;
    let mut router = cluster.router().await;
    router
        .publish(publish_request("doc:cut", "\"before\""))
        .await
        .unwrap();
    let m = member.recv_op("message", WAIT).await.unwrap();
    assert_eq!(m["data"], "before");

    proxy.mute(true);
    let edge = cluster.edge_addrs[0];
    eventually(NOTICED_WITHIN + WAIT, "the edge notices", || async {
        (!ready(edge)).then_some(())
    })
    .await;
    let mut sent = Vec::new();
    for i in 0..5 {
        let r = router
            .publish(publish_request("doc:cut", format!("{i}")))
            .await
            .expect("the router still reaches NATS")
            .into_inner();
        sent.push((r.offset, serde_json::json!(i)));
    }
    proxy.mute(false);

    let mut got = Vec::new();
    while got.len() < sent.len() {
        let m = member
            .recv_op("message", Duration::from_secs(20))
            .await
            .expect("the missed messages arrive");
        got.push((m["offset"].as_u64().unwrap(), m["data"].clone()));
    }
    assert_eq!(got, sent, "lost, repeated or out of order");
    no_more_messages(&member).await;
}
