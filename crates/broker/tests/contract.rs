//! The behaviour every broker must have, run against the in-memory broker and
//! against a real nats-server.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_broker::{Broker, BrokerError, MemoryBroker, NatsBroker, SharedBroker};
use herald_test_support::{NatsServer, Proxy, eventually};

const WAIT: Duration = Duration::from_secs(5);

async fn next_payload(sub: &mut herald_broker::Subscription) -> Bytes {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("a message within 5 s")
        .expect("subscription open")
        .payload
}

/// A broker on `url` whose connection is up (`connect` returns at once and
/// connects in the background).
async fn connected(url: &str, name: &str) -> NatsBroker {
    let b = NatsBroker::connect(url, name).await.unwrap();
    eventually(Duration::from_secs(10), "connected", || async {
        b.is_connected().then_some(())
    })
    .await;
    b
}

async fn contract(b: SharedBroker) {
    // A subscription is live when subscribe returns.
    let mut exact = b.subscribe("t.room.a".into()).await.unwrap();
    let mut wild = b.subscribe("t.room.*".into()).await.unwrap();
    let mut tail = b.subscribe("t.>".into()).await.unwrap();
    for i in 0..100u32 {
        b.publish("t.room.a".into(), Bytes::from(i.to_string()))
            .await
            .unwrap();
    }
    for sub in [&mut exact, &mut wild, &mut tail] {
        for i in 0..100u32 {
            assert_eq!(
                next_payload(sub).await,
                Bytes::from(i.to_string()),
                "in order"
            );
        }
    }
    b.publish("t.room.b.deep".into(), "deep".into())
        .await
        .unwrap();
    assert_eq!(next_payload(&mut tail).await, "deep");

    // Queue groups: each message reaches exactly one member.
    let mut q1 = b
        .queue_subscribe("t.work".into(), "g".into())
        .await
        .unwrap();
    let mut q2 = b
        .queue_subscribe("t.work".into(), "g".into())
        .await
        .unwrap();
    for i in 0..20u32 {
        b.publish("t.work".into(), Bytes::from(i.to_string()))
            .await
            .unwrap();
    }
    let mut got = 0;
    for q in [&mut q1, &mut q2] {
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), q.next()).await {
            got += 1;
        }
    }
    assert_eq!(got, 20);

    // Request/reply.
    let mut server = b.subscribe("t.echo".into()).await.unwrap();
    let responder = {
        let b = b.clone();
        tokio::spawn(async move {
            let m = server.next().await.unwrap();
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&m.payload);
            b.publish(m.reply.unwrap(), reply.into()).await.unwrap();
        })
    };
    let answer = b.request("t.echo".into(), "hi".into(), WAIT).await.unwrap();
    assert_eq!(answer, "echo:hi");
    responder.await.unwrap();
    let err = b
        .request("t.nobody".into(), "hi".into(), Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(
        matches!(err, BrokerError::NoResponders(_) | BrokerError::Timeout(_)),
        "{err:?}"
    );

    // Dropping a subscription unsubscribes; others keep receiving.
    drop(exact);
    b.publish("t.room.a".into(), "after".into()).await.unwrap();
    assert_eq!(next_payload(&mut wild).await, "after");
    assert!(b.is_connected());

    prefix_wildcards(&b).await;
}

/// `<prefix>.*` (how an edge subscribes to a shard of personal rooms)
/// matches exactly one more token after exactly that prefix.
async fn prefix_wildcards(b: &SharedBroker) {
    let mut shard = b.subscribe("t.shard.7.*".into()).await.unwrap();
    let mut other = b.subscribe("t.shard.7.*".into()).await.unwrap();
    for subject in [
        "t.shard.7.a",
        "t.shard.7",
        "t.shard.7.a.deep",
        "t.shard.70.a",
        "t.shard.8.a",
        "x.shard.7.a",
        "t.shard.7.b",
    ] {
        b.publish(subject.into(), subject.to_string().into())
            .await
            .unwrap();
    }
    // In order from one publisher, so `b` right after `a` means nothing
    // published in between matched.
    for sub in [&mut shard, &mut other] {
        assert_eq!(next_payload(sub).await, "t.shard.7.a");
        assert_eq!(next_payload(sub).await, "t.shard.7.b");
    }
    drop(other);
    b.publish("t.shard.7.c".into(), "c".into()).await.unwrap();
    assert_eq!(next_payload(&mut shard).await, "c");

    // A request reaches a responder subscribed through such a wildcard.
    let mut server = b.subscribe("t.svc.*".into()).await.unwrap();
    let responder = {
        let b = b.clone();
        tokio::spawn(async move {
            let m = server.next().await.unwrap();
            b.publish(m.reply.unwrap(), m.subject.into()).await.unwrap();
        })
    };
    let answer = b
        .request("t.svc.x".into(), "hi".into(), WAIT)
        .await
        .unwrap();
    assert_eq!(answer, "t.svc.x");
    responder.await.unwrap();
}

#[tokio::test]
async fn memory_broker_meets_the_contract() {
    contract(Arc::new(MemoryBroker::new())).await;
}

#[tokio::test]
async fn nats_broker_meets_the_contract() {
    let nats = NatsServer::start().unwrap();
    let b = NatsBroker::connect(&nats.url(), "contract-test")
        .await
        .unwrap();
    contract(Arc::new(b)).await;
}

#[tokio::test]
async fn nats_broker_resubscribes_after_a_server_restart() {
    let mut nats = NatsServer::start().unwrap();
    let b = NatsBroker::connect(&nats.url(), "restart-test")
        .await
        .unwrap();
    let mut sub = b.subscribe("t.x".into()).await.unwrap();
    nats.restart().unwrap();
    herald_test_support::eventually(Duration::from_secs(10), "client reconnected", || async {
        b.is_connected().then_some(())
    })
    .await;
    // The reconnect re-sends SUB before anything new; a confirmed subscribe
    // (a round trip) proves it landed.
    b.subscribe("t.probe".into()).await.unwrap();
    b.publish("t.x".into(), "back".into()).await.unwrap();
    assert_eq!(next_payload(&mut sub).await, "back");
}

/// When `subscribe` returns, the server has the subscription: a message
/// another client publishes right then is not missed, even when the server
/// reads the subscriber's connection late (a flush of the client's socket
/// alone would return 300 ms too early here).
#[tokio::test]
async fn nats_subscribe_returns_once_the_server_has_the_subscription() {
    let nats = NatsServer::start().unwrap();
    let proxy = Proxy::start(nats.addr(), Duration::from_millis(300)).await;
    let subscriber = NatsBroker::connect(&proxy.nats_url(), "slow-subscriber")
        .await
        .unwrap();
    let publisher = NatsBroker::connect(&nats.url(), "publisher").await.unwrap();
    // The publisher's connection is up before the subscription is made.
    publisher.subscribe("t.warm".into()).await.unwrap();
    for i in 0..3 {
        let subject = format!("t.live.{i}");
        let mut sub = subscriber.subscribe(subject.clone()).await.unwrap();
        publisher.publish(subject, "now".into()).await.unwrap();
        assert_eq!(next_payload(&mut sub).await, "now", "subscription {i}");
    }
}

/// When `confirm` returns, the server has everything published before it:
/// the publisher may go (its connection cut, as when its process exits)
/// and nothing is lost, even when the server reads it late.
#[tokio::test]
async fn nats_confirm_returns_once_the_server_has_what_was_published() {
    let nats = NatsServer::start().unwrap();
    let proxy = Proxy::start(nats.addr(), Duration::from_millis(300)).await;
    let subscriber = connected(&nats.url(), "subscriber").await;
    let mut sub = subscriber.subscribe("t.last".into()).await.unwrap();
    let publisher = connected(&proxy.nats_url(), "slow-publisher").await;
    let mark = publisher.publishable().unwrap();
    for i in 0..50u32 {
        publisher
            .publish("t.last".into(), Bytes::from(i.to_string()))
            .await
            .unwrap();
    }
    publisher.confirm(mark).await.unwrap();
    proxy.cut();
    drop(publisher);
    for i in 0..50u32 {
        assert_eq!(next_payload(&mut sub).await, Bytes::from(i.to_string()));
    }
}

/// Concurrent confirmations share round trips: a hundred publishers
/// confirming at once cost a handful of requests, not a hundred.
#[tokio::test]
async fn nats_confirmations_share_one_round_trip() {
    let nats = NatsServer::start().unwrap();
    let subscriber = connected(&nats.url(), "subscriber").await;
    let mut sub = subscriber.subscribe("t.many".into()).await.unwrap();
    let publisher = connected(&nats.url(), "publisher").await;
    let sent = |b: &NatsBroker| {
        b.client()
            .statistics()
            .out_messages
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = sent(&publisher);
    let publishes = (0..100u32).map(|i| {
        let publisher = &publisher;
        async move {
            let mark = publisher.publishable()?;
            publisher
                .publish("t.many".into(), Bytes::from(i.to_string()))
                .await?;
            publisher.confirm(mark).await
        }
    });
    for outcome in futures::future::join_all(publishes).await {
        outcome.unwrap();
    }
    let requests = sent(&publisher) - before - 100;
    assert!(
        (1..=5).contains(&requests),
        "{requests} confirmation requests for 100 publishes"
    );
    for _ in 0..100 {
        next_payload(&mut sub).await;
    }
}

/// A publish whose connection is lost before the server confirms it is
/// `Unconfirmed`, never `Ok` (it may or may not have arrived), and a
/// publish asked for while disconnected is refused before anything is sent.
#[tokio::test]
async fn nats_confirm_over_a_lost_connection_is_unconfirmed() {
    let nats = NatsServer::start().unwrap();
    let proxy = Proxy::start(nats.addr(), Duration::from_millis(300)).await;
    let publisher = connected(&proxy.nats_url(), "cut-publisher").await;
    let mark = publisher.publishable().unwrap();
    publisher
        .publish("t.lost".into(), "gone".into())
        .await
        .unwrap();
    proxy.cut();
    let err = publisher.confirm(mark).await.unwrap_err();
    assert!(matches!(err, BrokerError::Unconfirmed(_)), "{err:?}");
    eventually(Duration::from_secs(10), "the client notices", || async {
        (!publisher.is_connected()).then_some(())
    })
    .await;
    let refused = publisher.publishable().unwrap_err();
    assert!(
        matches!(refused, BrokerError::Unavailable(_)),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("not reachable"), "{refused}");
}

/// After a server restart, a process refuses to publish until every other
/// process has had time to reconnect and subscribe again: a message it
/// published earlier would be confirmed yet reach nobody. Once it accepts,
/// a subscriber that came back receives what it publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_publishing_resumes_only_once_others_can_listen_again() {
    let mut nats = NatsServer::start().unwrap();
    let subscriber = connected(&nats.url(), "subscriber").await;
    let mut sub = subscriber.subscribe("t.back".into()).await.unwrap();
    let publisher = connected(&nats.url(), "publisher").await;
    let first = publisher.publishable().expect("first connect: no wait");
    nats.restart().unwrap();
    eventually(
        Duration::from_secs(10),
        "the publisher reconnected",
        || async { (publisher.is_connected() && publisher.mark() != first).then_some(()) },
    )
    .await;
    let refused = publisher.publishable().unwrap_err();
    let why = herald_broker::chain(&refused).to_string();
    assert!(why.contains("reconnected"), "{why}");
    let mark = eventually(Duration::from_secs(5), "publishing resumes", || async {
        publisher.publishable().ok()
    })
    .await;
    publisher
        .publish("t.back".into(), "hello".into())
        .await
        .unwrap();
    publisher.confirm(mark).await.unwrap();
    assert_eq!(next_payload(&mut sub).await, "hello");
}
