//! What a connect asks of NATS: no JetStream consumer, and only the
//! requests that read the inbox's last message and the user's read markers
//! (plus, at most every couple of seconds, the inbox stream's info). Seen
//! from a plain NATS subscriber on the JetStream API subjects, which gets
//! a copy of every request the edge makes.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::json;

/// The JetStream API requests seen since the last call, by kind (the
/// subject without the stream and the key).
async fn requests(
    client: &async_nats::Client,
    sub: &mut async_nats::Subscriber,
) -> BTreeMap<String, usize> {
    // Every request made before this flush's PONG has been delivered.
    client.flush().await.unwrap();
    let mut seen = BTreeMap::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(50), sub.next()).await {
        let kind: Vec<&str> = m.subject.as_str().split('.').skip(2).take(2).collect();
        *seen.entry(kind.join(".")).or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connect_creates_no_consumer_and_makes_two_requests() {
    let cluster = Cluster::start_spec(Spec {
        edges: 1,
        ..Spec::default()
    });
    let nats = async_nats::connect(cluster.nats.url()).await.unwrap();
    let mut api = nats.subscribe("$JS.API.>").await.unwrap();
    // The first connect creates the marker bucket and loads the stream.
    let first = connect(&cluster.ws(0), "warm-up").await;
    first.request(json!({"op":"ping"})).await.unwrap();
    requests(&nats, &mut api).await;

    for user in ["ann", "bob", "cy"] {
        let client = connect(&cluster.ws(0), user).await;
        let seen = requests(&nats, &mut api).await;
        let mut expected = BTreeMap::from([
            // The inbox's last message and the user's read markers, both
            // direct gets: no request through the JetStream API's queue.
            ("DIRECT.GET".to_string(), 2),
        ]);
        if seen.contains_key("STREAM.INFO") {
            // The inbox stream's epoch, read again at most every 2 s.
            expected.insert("STREAM.INFO".into(), 1);
        }
        assert_eq!(seen, expected, "the connect of {user}");
        drop(client);
    }
}
