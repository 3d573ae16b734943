//! "Still unread": a message sent with `Router.SendToUser` and
//! `notify_after_ms` that no device got live leaves a reminder in the feed's
//! work stream. Once due, one router takes it and checks, in this order:
//! the user's read marker in the personal room reached the message's offset
//! (read); a device of the user is connected (it got the message at connect,
//! or live); otherwise it appends one `user.unread` event to the feed, with
//! the reminder's id, so that a reminder handed out twice (a router died
//! between the append and the acknowledgement) is stored once. A reminder
//! whose check fails (the store or presence unreachable) is not
//! acknowledged and comes back.

use herald_broker::chain;
use herald_broker::feed::{self, Due, Event, Reminder, SharedFeed};
use herald_broker::history::SharedHistory;
use herald_proto::v1::UserStatusRequest;
use herald_proto::v1::presence_server::Presence as _;
use herald_wire::RoomName;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio_util::sync::CancellationToken;

use crate::PresenceFront;

/// What became of a due reminder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The read marker reached the message.
    Read,
    /// A device is connected.
    Delivered,
    /// A `user.unread` event was appended.
    Unread,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Read => "read",
            Outcome::Delivered => "delivered",
            Outcome::Unread => "unread",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Counts due reminders by outcome (`router_unread_reminders`).
#[derive(Clone, Default)]
pub struct UnreadMetrics(Family<OutcomeLabel, Counter>);

impl UnreadMetrics {
    pub fn register(metrics: &herald_ops::Metrics) -> UnreadMetrics {
        let m = UnreadMetrics::default();
        for outcome in [Outcome::Read, Outcome::Delivered, Outcome::Unread] {
            drop(m.0.get_or_create(&OutcomeLabel {
                outcome: outcome.label(),
            }));
        }
        metrics.lock().expect("metrics registry").register(
            "router_unread_reminders",
            "notify_after reminders that fell due, by outcome: read (the marker reached the message), delivered (a device was connected), unread (a user.unread event was appended)",
            m.0.clone(),
        );
        m
    }
}

/// The `user.unread` event of `reminder`.
pub(crate) fn event(reminder: &Reminder, ts_ms: u64) -> Event {
    let mut fields = serde_json::Map::new();
    fields.insert("user".into(), reminder.user.clone().into());
    fields.insert("room".into(), reminder.room.clone().into());
    fields.insert("epoch".into(), reminder.epoch.clone().into());
    fields.insert("offset".into(), reminder.offset.into());
    fields.insert("sent_ms".into(), reminder.sent_ms.into());
    Event::new(
        feed::UNREAD_SUBJECT.into(),
        reminder.id(),
        "user.unread",
        ts_ms,
        fields,
    )
}

/// Decides and acts on one due reminder.
async fn settle(
    reminder: &Reminder,
    feed: &SharedFeed,
    history: &SharedHistory,
    presence: &PresenceFront,
) -> Result<Outcome, Box<dyn std::error::Error + Send + Sync>> {
    let room = RoomName::parse(&reminder.room)?;
    if history
        .marker(&reminder.user, &room)
        .await?
        .is_some_and(|m| m >= reminder.offset)
    {
        return Ok(Outcome::Read);
    }
    let status = presence
        .user_status(tonic::Request::new(UserStatusRequest {
            users: vec![reminder.user.clone()],
        }))
        .await?
        .into_inner();
    if status.users.iter().any(|u| !u.conns.is_empty()) {
        return Ok(Outcome::Delivered);
    }
    feed.append(event(reminder, feed::now_ms())).await?;
    Ok(Outcome::Unread)
}

/// Takes this process's share of due reminders until `shutdown`.
pub async fn run(
    feed: SharedFeed,
    history: SharedHistory,
    presence: PresenceFront,
    metrics: UnreadMetrics,
    shutdown: CancellationToken,
) {
    let mut due = match feed.reminders().await {
        Ok(due) => due,
        Err(e) => {
            tracing::error!(error = %chain(&e), "notify_after reminders cannot be taken: no user.unread events from this process");
            return;
        }
    };
    loop {
        let next: Due = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = due.recv() => match next {
                Some(next) => next,
                None => return,
            },
        };
        match settle(&next.reminder, &feed, &history, &presence).await {
            Ok(outcome) => {
                metrics
                    .0
                    .get_or_create(&OutcomeLabel {
                        outcome: outcome.label(),
                    })
                    .inc();
                if let Err(e) = next.done().await {
                    tracing::warn!(error = %chain(&e), "a settled reminder was not acknowledged; it will be checked again");
                }
            }
            Err(e) => {
                tracing::warn!(id = %next.reminder.id(), error = %chain(&*e), "a due reminder could not be checked; it comes back later");
            }
        }
    }
}
