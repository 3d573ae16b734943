//! `herald dev` under a publish flood: the log stays small (the in-memory
//! broker closes a subscriber that falls too far behind, as NATS closes a
//! slow consumer, instead of dropping and logging messages one by one; see
//! its unit test), the in-process edge is never declared dead, and other
//! rooms are served throughout.

mod common;

use std::time::{Duration, Instant};

use common::*;
use herald_proto::v1::{PublishBatchRequest, UserStatusRequest};
use serde_json::json;

const FLOOD_FOR: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread")]
async fn herald_dev_holds_under_a_publish_flood() {
    let dev = Dev::start();
    let calm = connect(&dev.ws(), "calm").await;
    ok(&calm, json!({"op":"join","room":"chat:calm"})).await;
    let flooded = connect(&dev.ws(), "flooded").await;
    ok(&flooded, json!({"op":"join","room":"chat:flood"})).await;

    let stop_at = Instant::now() + FLOOD_FOR;
    let mut floods = Vec::new();
    for _ in 0..8 {
        let mut router = dev.router().await;
        floods.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while Instant::now() < stop_at {
                let messages = (0..1000)
                    .map(|i| publish_request("chat:flood", i.to_string()))
                    .collect();
                let batch = PublishBatchRequest { messages };
                if router.publish_batch(batch).await.is_ok() {
                    sent += 1000;
                }
            }
            sent
        }));
    }
    // The calm room is served all along: each message arrives.
    let mut router = dev.router().await;
    let mut n = 0u64;
    while Instant::now() < stop_at {
        router
            .publish(publish_request("chat:calm", n.to_string()))
            .await
            .expect("the calm room's publish is answered during the flood");
        let m = calm
            .recv_op("message", WAIT)
            .await
            .expect("the calm room's message arrives during the flood");
        assert_eq!(m["data"], n);
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut flooded_with = 0;
    for f in floods {
        flooded_with += f.await.unwrap();
    }

    // The in-process edge was never declared dead: its users are online.
    let mut presence =
        herald_proto::v1::presence_client::PresenceClient::connect(format!("http://{}", dev.grpc))
            .await
            .unwrap();
    let status = presence
        .user_status(UserStatusRequest {
            users: vec!["calm".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.users[0].online, "{status:?}");
    let log = dev.herald.output();
    assert!(
        !log.contains("sent no presence report in time"),
        "the in-process edge was declared dead:\n{log}"
    );
    assert!(
        log.len() < 256 * 1024,
        "{} bytes of log for a flood of {flooded_with} messages",
        log.len()
    );
    drop(flooded);
}
