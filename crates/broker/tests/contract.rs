//! The behaviour every broker must have, run against the in-memory broker and
//! against a real nats-server.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_broker::{Broker, BrokerError, MemoryBroker, NatsBroker, SharedBroker};
use herald_test_support::NatsServer;

const WAIT: Duration = Duration::from_secs(5);

async fn next_payload(sub: &mut herald_broker::Subscription) -> Bytes {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("a message within 5 s")
        .expect("subscription open")
        .payload
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

/// A proxy to `upstream` that holds what each client sends for `delay`
/// before passing it on (the server's answers pass at once): a server that
/// is slow to read one client, as a busy nats-server is. Setting the flag
/// it returns cuts every connection: what it still holds is lost, as with a
/// process that exits before its last bytes left.
async fn slow_proxy(
    upstream: std::net::SocketAddr,
    delay: Duration,
) -> (String, Arc<std::sync::atomic::AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("nats://{}", listener.local_addr().unwrap());
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cutting = cut.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let cut = cutting.clone();
            let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
            let (mut client_rd, mut client_wr) = client.into_split();
            let (mut server_rd, mut server_wr) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_rd, &mut client_wr).await;
            });
            let (tx, mut rx) =
                tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
            tokio::spawn(async move {
                while let Some((due, bytes)) = rx.recv().await {
                    tokio::time::sleep_until(due).await;
                    if cut.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    if server_wr.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = client_rd.read(&mut buf).await {
                    let due = tokio::time::Instant::now() + delay;
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, cut)
}

/// When `subscribe` returns, the server has the subscription: a message
/// another client publishes right then is not missed, even when the server
/// reads the subscriber's connection late (a flush of the client's socket
/// alone would return 300 ms too early here).
#[tokio::test]
async fn nats_subscribe_returns_once_the_server_has_the_subscription() {
    let nats = NatsServer::start().unwrap();
    let upstream = nats.url().trim_start_matches("nats://").parse().unwrap();
    let (slow_url, _cut) = slow_proxy(upstream, Duration::from_millis(300)).await;
    let subscriber = NatsBroker::connect(&slow_url, "slow-subscriber")
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
    let upstream = nats.url().trim_start_matches("nats://").parse().unwrap();
    let (slow_url, cut) = slow_proxy(upstream, Duration::from_millis(300)).await;
    let subscriber = NatsBroker::connect(&nats.url(), "subscriber")
        .await
        .unwrap();
    let mut sub = subscriber.subscribe("t.last".into()).await.unwrap();
    let publisher = NatsBroker::connect(&slow_url, "slow-publisher")
        .await
        .unwrap();
    for i in 0..50u32 {
        publisher
            .publish("t.last".into(), Bytes::from(i.to_string()))
            .await
            .unwrap();
    }
    publisher.confirm().await.unwrap();
    cut.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(publisher);
    for i in 0..50u32 {
        assert_eq!(next_payload(&mut sub).await, Bytes::from(i.to_string()));
    }
}
