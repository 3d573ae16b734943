//! The event feed on a real nats-server: an event appended twice under one
//! id is stored once, and a reminder comes back once it is due, once.

use std::time::Duration;

use herald_broker::feed::{
    Event, FEED_STREAM, Feed, FeedLimits, JetStreamFeed, Reminder, UNREAD_SUBJECT, now_ms,
};
use herald_test_support::NatsServer;

async fn feed(nats: &NatsServer) -> JetStreamFeed {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let limits = FeedLimits {
        max_age: Duration::from_secs(3600),
        max_bytes: 0,
    };
    let feed = JetStreamFeed::new(client, limits, 1);
    feed.ensure().await.unwrap();
    feed
}

fn reminder(user: &str, due_in_ms: u64) -> Reminder {
    let now = now_ms();
    Reminder {
        user: user.into(),
        room: format!("user:{user}"),
        epoch: "e1".into(),
        offset: 7,
        sent_ms: now,
        due_ms: now + due_in_ms,
        delivered: false,
    }
}

#[tokio::test]
async fn an_event_appended_twice_is_stored_once() {
    let nats = NatsServer::start().unwrap();
    let feed = feed(&nats).await;
    let e = Event::new(
        UNREAD_SUBJECT.into(),
        "x-1".into(),
        "user.unread",
        1,
        Default::default(),
    );
    feed.append(e.clone()).await.unwrap();
    feed.append(e).await.unwrap();
    // Another process appending the same event (a second presence leader).
    let other = self::feed(&nats).await;
    other
        .append(Event::new(
            UNREAD_SUBJECT.into(),
            "x-1".into(),
            "user.unread",
            2,
            Default::default(),
        ))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut stream = js.get_stream(FEED_STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
}

#[tokio::test]
async fn a_reminder_comes_back_once_due_and_once_only() {
    let nats = NatsServer::start().unwrap();
    let feed = feed(&nats).await;
    let mut due = feed.reminders().await.unwrap();
    let r = reminder("ann", 400);
    feed.remind(r.clone()).await.unwrap();
    // The same reminder stored twice (a retried send) is one reminder.
    feed.remind(r.clone()).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), due.recv())
        .await
        .expect("due within 5 s")
        .unwrap();
    assert!(now_ms() >= r.due_ms, "handed out before it was due");
    assert_eq!(first.reminder, r);
    first.done().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), due.recv())
            .await
            .is_err(),
        "finished, and stored once: nothing more"
    );
}
