//! What a connect asks of NATS: no JetStream consumer, and only the
//! requests that read the inbox's last message and the user's read markers
//! (plus, at most every couple of seconds, the inbox stream's info): one
//! batched direct get on nats-server 2.11 and later, two direct gets before;
//! nothing at all when the edge already holds the user's personal room. Seen
//! from a plain NATS subscriber on the JetStream API subjects, which gets a
//! copy of every request the edge makes.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use herald_client::Client;
use serde_json::json;

/// The JetStream API requests seen since the last call, by kind (the
/// subject without the stream and the key).
async fn requests(
    client: &async_nats::Client,
    sub: &mut async_nats::Subscriber,
) -> BTreeMap<String, usize> {
    requests_to(client, sub, 2).await
}

/// The same, by the first `tokens` tokens after `$JS.API` (3: with the
/// stream).
async fn requests_to(
    client: &async_nats::Client,
    sub: &mut async_nats::Subscriber,
    tokens: usize,
) -> BTreeMap<String, usize> {
    // Every request made before this flush's PONG has been delivered.
    client.flush().await.unwrap();
    let mut seen = BTreeMap::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(50), sub.next()).await {
        let kind: Vec<&str> = m.subject.as_str().split('.').skip(2).take(tokens).collect();
        *seen.entry(kind.join(".")).or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connect_creates_no_consumer_and_makes_two_requests_before_nats_2_11() {
    let cluster = Cluster::start_spec(Spec {
        edges: 1,
        ..Spec::default()
    });
    let nats = async_nats::connect(cluster.nats.url()).await.unwrap();
    // `$NATS_SERVER` may name a newer server: the test of 2.11 and later
    // is the next one.
    let version = nats.server_info().version;
    let older = ["2.9.", "2.10."].iter().any(|v| version.starts_with(v));
    let requests_per_connect = if older { 2 } else { 1 };
    let mut api = nats.subscribe("$JS.API.>").await.unwrap();
    // The first connect creates the marker bucket and loads the stream.
    let first = connect(&cluster.ws(0), "warm-up").await;
    first.request(json!({"op":"ping"})).await.unwrap();
    requests(&nats, &mut api).await;

    // The inbox's last message and the user's read markers, direct gets:
    // no request through the JetStream API's queue.
    let direct = ("DIRECT.GET", requests_per_connect);
    cold_connects(&cluster, &nats, &mut api, 2, direct, "STREAM.INFO").await;
}

/// Connects three users new to edge 0 in turn, and checks what each connect
/// asked of the JetStream API (by kind, `tokens` deep): `direct` and, at
/// most once, `info` (the inbox stream's epoch, read again at most every
/// 2 s).
async fn cold_connects(
    cluster: &Cluster,
    nats: &async_nats::Client,
    api: &mut async_nats::Subscriber,
    tokens: usize,
    direct: (&str, usize),
    info: &str,
) {
    for user in ["ann", "bob", "cy"] {
        let client = connect(&cluster.ws(0), user).await;
        let seen = requests_to(nats, api, tokens).await;
        let mut expected = BTreeMap::from([(direct.0.to_string(), direct.1)]);
        if seen.contains_key(info) {
            expected.insert(info.into(), 1);
        }
        assert_eq!(seen, expected, "the connect of {user}");
        drop(client);
    }
}

/// On nats-server 2.11 and later a cold connect reads the inbox's last
/// message and the read markers with one request; a room with a marker
/// adds what counting its unread messages takes, and nothing else.
#[tokio::test(flavor = "multi_thread")]
async fn on_nats_2_11_a_cold_connect_makes_one_request() {
    let (_f, config) = config_file(DOCS);
    let cluster = Cluster::start_spec(Spec {
        edges: 2,
        common: config,
        newer_nats: true,
        ..Spec::default()
    });
    let nats = async_nats::connect(cluster.nats.url()).await.unwrap();
    let mut api = nats.subscribe("$JS.API.>").await.unwrap();
    let first = connect(&cluster.ws(0), "warm-up").await;
    first.request(json!({"op":"ping"})).await.unwrap();
    requests(&nats, &mut api).await;

    let direct = ("DIRECT.GET.HERALD_USER", 1);
    cold_connects(
        &cluster,
        &nats,
        &mut api,
        3,
        direct,
        "STREAM.INFO.HERALD_USER",
    )
    .await;

    // dan reads the first of three messages of a durable room on edge 1,
    // then connects to edge 0, which has never seen him: one request for
    // the inbox and markers, and one to count the two unread messages (the
    // server says how many follow the first after the marker).
    let writer = connect(&cluster.ws(1), "writer").await;
    let mut offsets = Vec::new();
    let mut epoch = json!(null);
    for n in 0..3 {
        let ok = writer
            .request(json!({"op":"publish","room":"doc:x","data":n}))
            .await
            .unwrap();
        offsets.push(ok["offset"].as_u64().unwrap());
        epoch = ok["epoch"].clone();
    }
    let phone = connect(&cluster.ws(1), "dan").await;
    phone
        .request(json!({"op":"read","room":"doc:x","offset":offsets[0]}))
        .await
        .unwrap();
    requests(&nats, &mut api).await;
    let (laptop, connected) = Client::connect(&cluster.ws(0), &token("dan"))
        .await
        .unwrap();
    let mut seen = requests_to(&nats, &mut api, 3).await;
    seen.remove("STREAM.INFO.HERALD_USER");
    seen.remove("STREAM.INFO.HERALD_DOC");
    assert_eq!(connected["unread"], json!({"doc:x": 2, "user:dan": 0}));
    assert_eq!(
        seen,
        BTreeMap::from([
            ("DIRECT.GET.HERALD_USER".to_string(), 1),
            ("DIRECT.GET.HERALD_DOC".to_string(), 1),
        ]),
        "dan's connect"
    );

    // The two messages dan missed come in one request too (and the room's
    // position on edge 0, which had no member there yet).
    let since = json!({"epoch": epoch, "offset": offsets[0]});
    let ok = laptop
        .request(json!({"op":"join","room":"doc:x","since":since}))
        .await
        .unwrap();
    assert_eq!(ok["recovered"], true, "{ok}");
    for want in &offsets[1..] {
        let m = laptop
            .recv_op("message", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(m["offset"], *want, "{m}");
    }
    let mut seen = requests_to(&nats, &mut api, 3).await;
    seen.remove("STREAM.INFO.HERALD_DOC");
    assert_eq!(
        seen,
        BTreeMap::from([("DIRECT.GET.HERALD_DOC".to_string(), 2)]),
        "dan's join with `since`"
    );
}

const DOCS: &str = r#"
[namespaces.doc]
durable = { history_size = 100, history_ttl = "1h" }
"#;

/// An edge that holds a user's personal room (a device of theirs is
/// connected there, or was within the linger) knows the inbox's position
/// and, from the `read` events that pass through it, the read markers: the
/// next connect of that user there asks NATS nothing, and its unread counts
/// are still exact when a marker moved on another edge.
#[tokio::test(flavor = "multi_thread")]
async fn a_connect_to_an_edge_that_holds_the_user_asks_nothing() {
    let (_f, config) = config_file(DOCS);
    let cluster = Cluster::start_with(2, &config);
    let nats = async_nats::connect(cluster.nats.url()).await.unwrap();
    let mut api = nats.subscribe("$JS.API.>").await.unwrap();
    let first = connect(&cluster.ws(0), "warm-up").await;
    first.request(json!({"op":"ping"})).await.unwrap();

    // Three messages in a durable room; dan reads up to the first on edge 0.
    let writer = connect(&cluster.ws(1), "writer").await;
    let mut offsets = Vec::new();
    for n in 0..3 {
        let ok = writer
            .request(json!({"op":"publish","room":"doc:x","data":n}))
            .await
            .unwrap();
        offsets.push(ok["offset"].as_u64().unwrap());
    }
    let dan = connect(&cluster.ws(0), "dan").await;
    let read = dan
        .request(json!({"op":"read","room":"doc:x","offset":offsets[0]}))
        .await
        .unwrap();
    assert_eq!(read["unread"], 2, "offsets {offsets:?}, read {read}");
    requests(&nats, &mut api).await;

    // Another device of dan's reads further on edge 1; edge 0 learns it
    // from the `read` event that reaches dan's device there.
    let phone = connect(&cluster.ws(1), "dan").await;
    phone
        .request(json!({"op":"read","room":"doc:x","offset":offsets[1]}))
        .await
        .unwrap();
    // (dan's own read comes back to it first.)
    loop {
        let event = dan.recv_op("read", Duration::from_secs(10)).await.unwrap();
        if event["offset"] == offsets[1] {
            break;
        }
        assert_eq!(event["offset"], offsets[0], "an unexpected read event");
    }
    requests(&nats, &mut api).await;

    // A new device on edge 0: no read of the markers or the inbox, and the
    // counts are those of the marker set on edge 1.
    let (laptop, connected) = Client::connect(&cluster.ws(0), &token("dan"))
        .await
        .unwrap();
    let seen = requests_to(&nats, &mut api, 3).await;
    assert_eq!(
        connected["unread"],
        json!({"doc:x": 1, "user:dan": 0}),
        "unread counts with the marker moved on another edge"
    );
    assert!(
        seen.keys()
            .all(|kind| !kind.contains("KV_") && !kind.contains("HERALD_USER")),
        "a connect read the markers or the inbox although the edge holds them: {seen:?}"
    );

    // Every device of dan's on edge 0 goes, and the phone reads to the end;
    // a reconnect within the linger still reads neither the markers nor
    // the inbox (only the durable room's position, to count).
    drop(laptop);
    drop(dan);
    phone
        .request(json!({"op":"read","room":"doc:x","offset":offsets[2]}))
        .await
        .unwrap();
    requests(&nats, &mut api).await;
    let (_back, connected) = Client::connect(&cluster.ws(0), &token("dan"))
        .await
        .unwrap();
    let seen = requests_to(&nats, &mut api, 3).await;
    assert_eq!(connected["unread"], json!({"doc:x": 0, "user:dan": 0}));
    assert!(
        seen.keys()
            .all(|kind| !kind.contains("KV_") && !kind.contains("HERALD_USER")),
        "a reconnect within the linger read the markers or the inbox: {seen:?}"
    );
}
