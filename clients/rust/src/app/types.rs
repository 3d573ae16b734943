//! What the application client hands to applications: the answers to its
//! requests, the events of rooms and of the connection, and its one error
//! type, read from the protocol's JSON frames.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where a durable room's history stands: offsets mean something only
/// within their `epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

/// The answer to [`Room::join`](super::Room::join).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct JoinOk {
    /// `""` in an ephemeral room.
    #[serde(default)]
    pub epoch: String,
    /// The room's latest offset (0 in an ephemeral room).
    #[serde(default)]
    pub offset: u64,
    /// With `since`: whether the history still reached back to it.
    #[serde(default)]
    pub recovered: bool,
    /// With `since`: how many messages are replayed.
    #[serde(default)]
    pub missed: u64,
}

/// The answer to a publish: where a durable room stored the message
/// (`""` and 0 in an ephemeral room).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Published {
    #[serde(default)]
    pub epoch: String,
    #[serde(default)]
    pub offset: u64,
}

/// The answer to [`Room::mark_read`](super::Room::mark_read), and the
/// `read` event: the user's read marker in a room moved.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ReadMarker {
    /// The marker now in effect (markers only move forward).
    pub offset: u64,
    /// Messages after the marker.
    pub unread: u64,
}

/// A message published to a room.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Message {
    pub room: String,
    pub data: Value,
    /// The publishing user, or `"server"` for the server API.
    pub from: String,
    /// Milliseconds since the epoch.
    #[serde(default)]
    pub ts: u64,
    /// Durable rooms only.
    #[serde(default)]
    pub epoch: Option<String>,
    #[serde(default)]
    pub offset: Option<u64>,
    /// The room's previous offset (durable rooms only).
    #[serde(default)]
    pub prev: Option<u64>,
}

impl Message {
    /// The message's place in a durable room's history.
    pub fn position(&self) -> Option<Position> {
        match (&self.epoch, self.offset) {
            (Some(epoch), Some(offset)) if !epoch.is_empty() => Some(Position {
                epoch: epoch.clone(),
                offset,
            }),
            _ => None,
        }
    }
}

/// What a `presence` event says happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceChange {
    Join,
    Leave,
    Update,
}

/// A member's connection joined, left or changed its metadata.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct PresenceEvent {
    pub event: PresenceChange,
    pub user: String,
    pub conn: String,
    #[serde(default)]
    pub meta: Option<Value>,
}

/// One user in a room, from [`Room::presence`](super::Room::presence).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Member {
    pub user: String,
    /// How many of the user's connections are in the room.
    pub conns: u64,
    /// The first of their connections' metadata that is set.
    #[serde(default)]
    pub meta: Option<Value>,
    #[serde(default)]
    pub connections: Vec<MemberConnection>,
}

/// One connection of a [`Member`].
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct MemberConnection {
    pub conn: String,
    /// The edge it is on.
    pub node: String,
    #[serde(default)]
    pub meta: Option<Value>,
}

/// The answer to [`Room::history`](super::Room::history).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct History {
    pub epoch: String,
    /// Oldest first.
    pub messages: Vec<Message>,
}

/// What happens in a room, in the order the server sent it.
#[derive(Clone, Debug, PartialEq)]
pub enum RoomEvent {
    Message(Message),
    Presence(PresenceEvent),
    Read(ReadMarker),
}

/// The `connected` frame: who the connection is.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Connected {
    /// The connection id, unique in the cluster; new on every reconnect.
    pub conn: String,
    pub user: String,
    /// The edge.
    pub node: String,
    /// How often the edge pings; the client pings after this much silence.
    #[serde(default)]
    pub heartbeat_ms: u64,
    /// Seconds since the epoch: when the session ends unless refreshed.
    #[serde(default)]
    pub expires_at: u64,
    /// Unread counts by room: the personal room, and every durable room
    /// with a read marker.
    #[serde(default)]
    pub unread: std::collections::HashMap<String, u64>,
}

/// How a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disconnected {
    /// The close code (the server's `disconnect` frame's, or the close
    /// frame's); `None` when the connection was lost without one.
    pub code: Option<u16>,
    pub reason: String,
    /// Whether the client will connect again by itself.
    pub will_reconnect: bool,
}

/// What happens to the connection as a whole.
#[derive(Clone, Debug, PartialEq)]
pub enum ConnectionEvent {
    /// Each (re)connect, once the rooms' rejoins and the queued requests
    /// have been sent.
    Connected(Connected),
    Disconnected(Disconnected),
    /// Something went wrong that no request is waiting to hear about: an
    /// `error` frame without an id, a rejoin, re-watch or token refresh
    /// refused.
    Error(Error),
    /// A watched user went online or offline ([`Herald::watch`](super::Herald::watch)):
    /// once per transition, including those that happened while the
    /// client was reconnecting (found by watching again).
    Status {
        user: String,
        online: bool,
    },
}

/// Where the client is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// [`Herald::connect`](super::Herald::connect) not called yet.
    Idle,
    /// Connecting for the first time.
    Connecting,
    Connected,
    /// The connection was lost; connecting again.
    Reconnecting,
    /// Closed by the application or by a server that said not to come
    /// back; nothing more happens.
    Closed,
}

/// What kind of failure an [`Error`] is: a protocol error code, or one of
/// the client's own.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    BadRequest,
    Unauthorized,
    TokenExpired,
    Forbidden,
    NotFound,
    RateLimited,
    TooLarge,
    Unavailable,
    /// A publish was sent but never confirmed: retry with the same key.
    OutcomeUnknown,
    Internal,
    /// A code this client does not know (a newer server's).
    Other(String),
    /// No answer within the request timeout.
    Timeout,
    /// The client is closed (by the application, or the server said not to
    /// reconnect), or the server never let it connect.
    Closed,
    /// The offline queue is full: too many requests wait for a connection.
    QueueFull,
}

impl Code {
    /// The protocol's code strings, and the client's own as the JavaScript
    /// SDK spells them.
    pub fn as_str(&self) -> &str {
        match self {
            Code::BadRequest => "bad_request",
            Code::Unauthorized => "unauthorized",
            Code::TokenExpired => "token_expired",
            Code::Forbidden => "forbidden",
            Code::NotFound => "not_found",
            Code::RateLimited => "rate_limited",
            Code::TooLarge => "too_large",
            Code::Unavailable => "unavailable",
            Code::OutcomeUnknown => "outcome_unknown",
            Code::Internal => "internal",
            Code::Other(code) => code,
            Code::Timeout => "timeout",
            Code::Closed => "closed",
            Code::QueueFull => "queue_full",
        }
    }

    pub fn parse(code: &str) -> Code {
        match code {
            "bad_request" => Code::BadRequest,
            "unauthorized" => Code::Unauthorized,
            "token_expired" => Code::TokenExpired,
            "forbidden" => Code::Forbidden,
            "not_found" => Code::NotFound,
            "rate_limited" => Code::RateLimited,
            "too_large" => Code::TooLarge,
            "unavailable" => Code::Unavailable,
            "outcome_unknown" => Code::OutcomeUnknown,
            "internal" => Code::Internal,
            "timeout" => Code::Timeout,
            "closed" => Code::Closed,
            "queue_full" => Code::QueueFull,
            other => Code::Other(other.to_owned()),
        }
    }

    /// Whether the same request may succeed later (after
    /// [`Error::retry_after`] for `rate_limited`).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Code::RateLimited
                | Code::Unavailable
                | Code::OutcomeUnknown
                | Code::Internal
                | Code::Timeout
        )
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request refused by the server, or one the client could not complete.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Error {
    pub code: Code,
    /// In plain words.
    pub message: String,
    /// For `rate_limited`: when the request would pass.
    pub retry_after_ms: Option<u64>,
}

impl Error {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    pub(crate) fn closed(message: impl Into<String>) -> Error {
        Error::new(Code::Closed, message)
    }

    /// The error an `error` frame carries.
    pub(crate) fn from_frame(frame: &Value) -> Error {
        Error {
            code: Code::parse(frame["code"].as_str().unwrap_or("internal")),
            message: frame["message"].as_str().unwrap_or_default().to_owned(),
            retry_after_ms: frame["retry_after_ms"].as_u64(),
        }
    }

    /// [`Error::retry_after_ms`] as a duration.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after_ms.map(Duration::from_millis)
    }
}

/// Reads an answer into its type; a server that answers in another shape
/// broke the protocol.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(what: &str, frame: Value) -> Result<T, Error> {
    serde_json::from_value(frame).map_err(|e| {
        Error::new(
            Code::Internal,
            format!("the server's answer to {what} could not be read: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The client's codes are the server's catalogue, spelled the same.
    #[test]
    fn codes_match_the_wire_catalogue() {
        for code in herald_wire::ErrorCode::ALL {
            let parsed = Code::parse(code.as_str());
            assert!(!matches!(parsed, Code::Other(_)), "{code} is not known");
            assert_eq!(parsed.as_str(), code.as_str());
            assert_eq!(parsed.retryable(), code.retryable(), "{code}");
        }
        assert_eq!(Code::parse("new_code"), Code::Other("new_code".into()));
        assert_eq!(Code::parse("queue_full"), Code::QueueFull);
    }

    #[test]
    fn error_frames() {
        let e = Error::from_frame(
            &json!({"op":"error","id":3,"code":"rate_limited","message":"slow down","retry_after_ms":250}),
        );
        assert_eq!(e.code, Code::RateLimited);
        assert_eq!(e.retry_after(), Some(Duration::from_millis(250)));
        assert_eq!(e.to_string(), "rate_limited: slow down");
    }

    #[test]
    fn messages_know_their_position() {
        let m: Message = serde_json::from_value(json!({
            "op":"message","room":"doc:1","data":{"a":1},"from":"ann","ts":5,
            "epoch":"e1","offset":7,"prev":4
        }))
        .unwrap();
        assert_eq!(
            m.position(),
            Some(Position {
                epoch: "e1".into(),
                offset: 7
            })
        );
        let m: Message = serde_json::from_value(
            json!({"op":"message","room":"chat:1","data":1,"from":"ann","ts":5}),
        )
        .unwrap();
        assert_eq!(m.position(), None);
    }
}
