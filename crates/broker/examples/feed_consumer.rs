//! A backend's consumer group on Herald's event feed (docs/protocol.md
//! section 6): every process started with the same group name shares the
//! work, each event is handled at least once, and a restarted process
//! resumes where the group left off.
//!
//! `cargo run -p herald-broker --example feed_consumer -- nats://127.0.0.1:4222 billing`

use async_nats::jetstream::{self, consumer::AckPolicy, consumer::pull};
use futures::StreamExt;

#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let group = args.next().unwrap_or_else(|| "billing".into());

    let js = jetstream::new(async_nats::connect(url).await?);
    let consumer = js
        .get_stream("HERALD_FEED")
        .await?
        .get_or_create_consumer(
            &group,
            pull::Config {
                durable_name: Some(group.clone()),
                filter_subject: "herald.feed.publish.chat".into(),
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?;
    let mut events = consumer.messages().await?;
    while let Some(msg) = events.next().await {
        let msg = msg?;
        let event: serde_json::Value = serde_json::from_slice(&msg.payload)?;
        // Handle it (idempotently: `id` repeats when an event comes twice),
        // then acknowledge; unacknowledged events come back after 30 s.
        println!("{} {}", msg.info()?.stream_sequence, event);
        msg.ack().await?;
    }
    Ok(())
}
