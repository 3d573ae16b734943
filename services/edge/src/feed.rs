//! What this edge appends to the event feed: client publishes, connections
//! joining and leaving rooms (for namespaces whose `feed` names them), and
//! connects and disconnects (`[feed] connections`). Builds each event with
//! an id that a retry repeats, so the feed stores it once.

use herald_auth::FeedKind;
use herald_broker::feed::{self, Event, FeedError};
use herald_wire::RoomName;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::Edge;

impl Edge {
    /// Whether `room`'s namespace sends `kind` to the feed (and there is one).
    pub(crate) fn feeds(&self, room: &RoomName, kind: FeedKind) -> bool {
        self.config.feed.is_some() && self.config.policy.feeds(room.namespace(), kind)
    }

    /// Appends `event`; `Ok` when there is no feed.
    pub(crate) async fn append(&self, event: Event) -> Result<(), FeedError> {
        match &self.config.feed {
            Some(feed) => {
                let result = feed.append(event).await;
                crate::metrics::feed_appended(result.is_ok());
                result
            }
            None => Ok(()),
        }
    }

    /// Appends `event`, logging a failure: for events no client waits on.
    pub(crate) async fn append_logged(&self, event: Event) {
        if let Err(e) = self.append(event).await {
            tracing::warn!(error = %herald_broker::chain(&e), "an event could not be appended to the feed");
        }
    }
}

/// The fields every event about a connection carries.
fn about(user: &str, conn: &str, node: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("user".into(), user.into());
    m.insert("conn".into(), conn.into());
    m.insert("node".into(), node.into());
    m
}

/// A client publish. `position` is the durable room's epoch and offset:
/// then the id is the message's place in its room, so a retry with the same
/// `key` (which stores the message once) appends the event once too.
pub(crate) fn publish(
    room: &RoomName,
    data: &RawValue,
    (user, conn, node): (&str, &str, &str),
    seq: u64,
    position: Option<(&str, u64)>,
    ts_ms: u64,
) -> Event {
    let mut fields = about(user, conn, node);
    fields.insert("room".into(), room.as_str().into());
    let data: Value = serde_json::from_str(data.get()).unwrap_or(Value::Null);
    fields.insert("data".into(), data);
    let id = match position {
        Some((epoch, offset)) => {
            fields.insert("epoch".into(), epoch.into());
            fields.insert("offset".into(), offset.into());
            format!("publish:{room}:{epoch}:{offset}")
        }
        None => format!("publish:{conn}:{seq}"),
    };
    Event::new(
        feed::publish_subject(room.namespace()),
        id,
        "publish",
        ts_ms,
        fields,
    )
}

/// A connection joined (`join`) or left (`leave`) a room; `seq` numbers
/// the connection's events, so each gets an id of its own.
pub(crate) fn membership(
    room: &RoomName,
    kind: &str,
    (user, conn, node): (&str, &str, &str),
    seq: u64,
    meta: Option<&Value>,
    ts_ms: u64,
) -> Event {
    let mut fields = about(user, conn, node);
    fields.insert("room".into(), room.as_str().into());
    if let Some(meta) = meta {
        fields.insert("meta".into(), meta.clone());
    }
    Event::new(
        feed::presence_subject(room.namespace()),
        format!("{kind}:{conn}:{seq}"),
        kind,
        ts_ms,
        fields,
    )
}

/// A connection authenticated (`connect`) or ended (`disconnect`, with the
/// close code the server sent, absent when the client closed or vanished).
pub(crate) fn connection(
    kind: &str,
    (user, conn, node): (&str, &str, &str),
    code: Option<u16>,
    ts_ms: u64,
) -> Event {
    let mut fields = about(user, conn, node);
    if let Some(code) = code {
        fields.insert("code".into(), code.into());
    }
    Event::new(
        feed::CONNECTION_SUBJECT.into(),
        format!("{kind}:{conn}"),
        kind,
        ts_ms,
        fields,
    )
}
