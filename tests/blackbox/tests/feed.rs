//! The event feed for backends (docs/protocol.md section 6): a backend's
//! consumer group reads client publishes at least once and in order per
//! room across its own restart; API publishes, joins, leaves, connections
//! and user transitions appear; a namespace without `feed` puts nothing there; and
//! `notify_after` produces one `user.unread` for a user who is away, none
//! for one who read in time.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, consumer::pull};
use common::*;
use futures::StreamExt;
use herald_proto::v1::SendToUserRequest;
use serde_json::{Value, json};

const CONFIG: &str = r#"
[feed]
max_age = "1h"
connections = true
users = true

[namespaces.chat]
feed = ["publish", "presence"]

[namespaces.quiet]
"#;

/// A backend's consumer group on the feed: a durable pull consumer, read
/// one message at a time and acknowledged at once, as a careful backend
/// that must not hold more than it has handled would read it.
struct Group {
    consumer: PullConsumer,
}

impl Group {
    /// Binds to (creating if needed) the durable consumer `name` on
    /// `filter`. Binding again after dropping resumes where it left off.
    async fn bind(nats: &str, name: &str, filter: &str) -> Group {
        let client = async_nats::connect(nats).await.expect("connect to NATS");
        let js = jetstream::new(client);
        let stream = js.get_stream("HERALD_FEED").await.expect("the feed stream");
        let consumer = stream
            .get_or_create_consumer(
                name,
                pull::Config {
                    durable_name: Some(name.into()),
                    filter_subject: filter.into(),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ..Default::default()
                },
            )
            .await
            .expect("the consumer");
        Group { consumer }
    }

    /// The next event (acknowledged), or `None` when none comes within `wait`.
    async fn next(&self, wait: Duration) -> Option<(String, Value)> {
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            let mut batch = self
                .consumer
                .fetch()
                .max_messages(1)
                .expires(Duration::from_millis(250))
                .messages()
                .await
                .expect("fetch");
            if let Some(m) = batch.next().await {
                let m = m.expect("a message");
                m.ack().await.expect("ack");
                let v: Value = serde_json::from_slice(&m.payload).expect("JSON event");
                return Some((m.subject.to_string(), v));
            }
        }
        None
    }

    /// Events until one satisfies `stop` (included), failing after `wait`.
    async fn until(&self, wait: Duration, stop: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some((_, v)) = self.next(left).await else {
                panic!("the awaited event did not come within {wait:?}; got {seen:?}");
            };
            let done = stop(&v);
            seen.push(v);
            if done {
                return seen;
            }
        }
    }
}

fn cluster(edges: usize, extra: &[String]) -> Cluster {
    Cluster::start_spec(Spec {
        edges,
        common: extra.to_vec(),
        presence_args: vec!["--presence-grace".into(), "200ms".into()],
        ..Spec::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_group_gets_every_publish_in_order_per_room_across_its_restart() {
    let (_f, args) = config_file(CONFIG);
    let c = cluster(2, &args);
    let alice = connect(&c.ws(0), "alice").await;
    let bob = connect(&c.ws(1), "bob").await;

    // A namespace without `feed` is answered as usual and appends nothing.
    ok(
        &alice,
        json!({"op":"publish","id":1,"room":"quiet:x","data":{"n":0}}),
    )
    .await;

    let group = Group::bind(&c.nats.url(), "backend", "herald.feed.publish.>").await;
    let publish = |n: u64| {
        let (alice, bob) = (&alice, &bob);
        async move {
            ok(
                alice,
                json!({"op":"publish","id":n,"room":"chat:a","data":{"n":n}}),
            )
            .await;
            ok(
                bob,
                json!({"op":"publish","id":n,"room":"chat:b","data":{"n":n}}),
            )
            .await;
        }
    };
    for n in 1..=5 {
        publish(n).await;
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(group.next(WAIT).await.expect("an event").1);
    }
    // The backend stops; clients go on publishing.
    drop(group);
    for n in 6..=10 {
        publish(n).await;
    }
    let group = Group::bind(&c.nats.url(), "backend", "herald.feed.publish.>").await;
    while let Some((subject, v)) = group.next(Duration::from_secs(1)).await {
        assert_eq!(subject, "herald.feed.publish.chat", "{v}");
        got.push(v);
    }

    let mut ids = HashSet::new();
    let mut per_room: HashMap<String, Vec<u64>> = HashMap::new();
    for v in &got {
        assert_eq!(v["type"], "publish", "{v}");
        assert!(v["ts_ms"].as_u64().is_some_and(|t| t > 0), "{v}");
        let room = v["room"].as_str().unwrap().to_string();
        let who = if room == "chat:a" { "alice" } else { "bob" };
        assert_eq!(v["user"], who, "{v}");
        assert!(
            v["conn"].as_str().is_some() && v["node"].as_str().is_some(),
            "{v}"
        );
        // At least once: a repeat (same id) may come, and is dropped here.
        if ids.insert(v["id"].as_str().unwrap().to_string()) {
            per_room
                .entry(room)
                .or_default()
                .push(v["data"]["n"].as_u64().unwrap());
        }
    }
    let all: Vec<u64> = (1..=10).collect();
    assert_eq!(per_room.get("chat:a"), Some(&all), "{got:?}");
    assert_eq!(per_room.get("chat:b"), Some(&all), "{got:?}");

    let quiet = Group::bind(&c.nats.url(), "quiet-check", "herald.feed.*.quiet").await;
    assert_eq!(
        quiet.consumer.clone().info().await.unwrap().num_pending,
        0,
        "namespace quiet has no `feed` and must put nothing in the feed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_publishes_joins_leaves_connections_and_user_transitions_appear() {
    let (_f, args) = config_file(CONFIG);
    let c = cluster(1, &args);
    let group = Group::bind(&c.nats.url(), "ops", "herald.feed.>").await;
    let carol = connect(&c.ws(0), "carol").await;
    ok(
        &carol,
        json!({"op":"join","id":1,"room":"chat:x","meta":{"mood":"ok"}}),
    )
    .await;
    ok(&carol, json!({"op":"join","id":2,"room":"quiet:x"})).await;
    let mut router = c.router().await;
    router
        .publish(publish_request("chat:x", r#"{"from":"backend"}"#))
        .await
        .unwrap();
    ok(&carol, json!({"op":"leave","id":3,"room":"chat:x"})).await;
    carol.close().await.unwrap();

    let seen = group
        .until(WAIT, |v| {
            v["type"] == "user.offline" && v["user"] == "carol"
        })
        .await;
    let of = |kind: &str| -> Vec<&Value> { seen.iter().filter(|v| v["type"] == kind).collect() };
    let connect = of("connect");
    assert_eq!(connect.len(), 1, "{seen:?}");
    let conn = connect[0]["conn"].as_str().unwrap();
    assert_eq!(connect[0]["user"], "carol");
    assert_eq!(connect[0]["node"], "edge-0");
    let join = of("join");
    assert_eq!(join.len(), 1, "only chat sends presence: {seen:?}");
    assert_eq!(join[0]["room"], "chat:x");
    assert_eq!(join[0]["conn"], conn);
    assert_eq!(join[0]["meta"], json!({"mood":"ok"}));
    let leave = of("leave");
    assert_eq!(leave.len(), 1, "{seen:?}");
    assert_eq!(leave[0]["room"], "chat:x");
    let disconnect = of("disconnect");
    assert_eq!(disconnect.len(), 1, "{seen:?}");
    assert_eq!(disconnect[0]["conn"], conn);
    let api = of("publish");
    assert_eq!(api.len(), 1, "{seen:?}");
    assert_eq!(api[0]["user"], "server");
    assert_eq!(api[0]["data"], json!({"from":"backend"}));
    let online = of("user.online");
    assert_eq!(online.len(), 1, "{seen:?}");
    assert_eq!(online[0]["user"], "carol");
    let ids: HashSet<&str> = seen.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), seen.len(), "every event has an id of its own");
}

fn send(user: &str, n: u64, notify_after_ms: u32) -> SendToUserRequest {
    SendToUserRequest {
        user: user.into(),
        data: json!({"n": n}).to_string(),
        key: String::new(),
        notify_after_ms,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_after_tells_of_an_unread_message_once_and_not_of_a_read_one() {
    let (_f, args) = config_file(CONFIG);
    let c = cluster(1, &args);
    let mut router = c.router().await;
    let group = Group::bind(&c.nats.url(), "push", "herald.feed.unread").await;

    // Away, never reads: one event.
    let sent = router
        .send_to_user(send("dave", 1, 300))
        .await
        .unwrap()
        .into_inner();
    let seen = group.until(WAIT, |v| v["user"] == "dave").await;
    let ev = seen.last().unwrap();
    assert_eq!(ev["type"], "user.unread");
    assert_eq!(ev["room"], "user:dave");
    assert_eq!(ev["offset"], sent.offset);
    assert_eq!(ev["epoch"], sent.epoch.as_str());

    // Reads in time: none. Erin's message falls due 1.5 s after it was sent;
    // she connects, reads it and leaves before that.
    let sent = router
        .send_to_user(send("erin", 2, 1500))
        .await
        .unwrap()
        .into_inner();
    let erin = connect(&c.ws(0), "erin").await;
    let m = erin.recv_op("message", WAIT).await.unwrap();
    assert_eq!(m["offset"], sent.offset);
    ok(
        &erin,
        json!({"op":"read","id":1,"room":"user:erin","offset":sent.offset}),
    )
    .await;
    erin.close().await.unwrap();
    // A later reminder, due after Erin's: when its event is here, Erin's
    // reminder was settled before it.
    router.send_to_user(send("frank", 3, 1500)).await.unwrap();
    let seen = group
        .until(Duration::from_secs(10), |v| v["user"] == "frank")
        .await;
    assert!(
        seen.iter()
            .all(|v| v["user"] != "erin" && v["user"] != "dave"),
        "erin read in time and dave was told once: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_after_without_a_feed_is_refused_in_plain_words() {
    let c = Cluster::start(1);
    let mut router = c.router().await;
    let e = router.send_to_user(send("gina", 1, 300)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("[feed]"), "{}", e.message());
}

/// `herald dev` has no JetStream: its feed stays in the process, and its
/// reminders are timers, whose outcomes its metrics count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_dev_settles_notify_after_in_memory() {
    let (_f, args) = config_file(CONFIG);
    let dev = Dev::start_with(&args);
    let mut router = dev.router().await;
    router.send_to_user(send("hal", 1, 300)).await.unwrap();
    let addr = dev.ws_addr;
    herald_test_support::eventually(WAIT, "hal's reminder settled as unread", || async move {
        let (_, body) = herald_test_support::http_get(addr, "/metrics").ok()?;
        body.contains(r#"herald_router_unread_reminders_total{outcome="unread"} 1"#)
            .then_some(())
    })
    .await;
}

/// The reminder is in JetStream, not in the router that took the call: a
/// router killed before the deadline loses nothing, and another one
/// settles it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reminder_outlives_the_router_that_stored_it() {
    let (_f, args) = config_file(CONFIG);
    let mut c = cluster(1, &args);
    let group = Group::bind(&c.nats.url(), "push", "herald.feed.unread").await;
    let mut router = c.router().await;
    let sent = router
        .send_to_user(send("ivan", 1, 1000))
        .await
        .unwrap()
        .into_inner();
    c.router.kill();
    let (grpc, http) = (
        herald_test_support::free_addr(),
        herald_test_support::free_addr(),
    );
    let mut argv = vec![
        "router".to_string(),
        "--grpc-listen".into(),
        grpc.to_string(),
        "--http-listen".into(),
        http.to_string(),
        "--nats".into(),
        c.nats_urls.clone(),
    ];
    argv.extend(args.iter().cloned());
    let _second = herald_test_support::Herald::start("router-2", &argv, http).unwrap();
    let seen = group
        .until(Duration::from_secs(10), |v| v["user"] == "ivan")
        .await;
    assert_eq!(seen.last().unwrap()["offset"], sent.offset, "{seen:?}");
}

/// A connection's edge dies: the edge cannot append its leaves, so the
/// presence service, which announces them to the rooms, appends them to the
/// feed too (in namespaces that send presence there), once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaves_of_a_dead_edges_connections_are_in_the_feed() {
    let (_f, args) = config_file(CONFIG);
    let mut c = Cluster::start_spec(Spec {
        edges: 2,
        common: args,
        edge_args: vec!["--presence-interval".into(), "500ms".into()],
        presence_args: vec!["--edge-timeout".into(), "2s".into()],
        ..Spec::default()
    });
    let group = Group::bind(&c.nats.url(), "members", "herald.feed.>").await;
    let dave = connect(&c.ws(1), "dave").await;
    ok(&dave, json!({"op":"join","id":1,"room":"chat:x"})).await;
    ok(&dave, json!({"op":"join","id":2,"room":"quiet:x"})).await;
    let joined = group.until(WAIT, |v| v["type"] == "join").await;
    let conn = joined.last().unwrap()["conn"].as_str().unwrap().to_string();
    // Dave online in the feed: the presence service leads (after its
    // warm-up), and so announces what it finds.
    group
        .until(WAIT, |v| v["type"] == "user.online" && v["user"] == "dave")
        .await;
    c.edges[1].kill();

    let seen = group
        .until(WAIT, |v| v["type"] == "leave" && v["conn"] == conn.as_str())
        .await;
    let leave = seen.last().unwrap();
    assert_eq!(leave["room"], "chat:x");
    assert_eq!(leave["user"], "dave");
    assert_eq!(leave["node"], "edge-1");
    assert_eq!(leave["edge_gone"], true);
    // Once, and nothing of the namespace without `feed`: only dave's
    // offline comes after it.
    let rest = group
        .until(WAIT * 2, |v| {
            v["type"] == "user.offline" && v["user"] == "dave"
        })
        .await;
    assert!(
        rest.iter().all(|v| v["type"] != "leave"),
        "a leave appended twice or of another namespace: {rest:?}"
    );
    assert_eq!(group.next(QUIET).await, None);
}
