//! What an edge sends a client in answer to its requests: the `ok` reply of
//! each op, `pong`, `connected` after a successful `connect`, and the `read`
//! event that tells a user's other devices about a new read marker. Each is a
//! typed value, so the fields of every reply are written down once, here,
//! and pinned by the tests below.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::frames::to_bytes;

/// The answer to a request that succeeded.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `{"op":"ok"}` and nothing else: `leave`, `presence_set`, a publish to
    /// an ephemeral room.
    Done,
    /// `ping`'s answer, `{"op":"pong"}`.
    Pong,
    Joined(Joined),
    /// A publish to a durable room: where the message was stored.
    Published(Position),
    Members(Members),
    History(HistoryPage),
    /// A `read`: the marker as stored and what is still unread after it.
    Read(ReadState),
    Refreshed(Refreshed),
    /// `watch`: whether each watched user is online now.
    Watching(Watching),
}

/// `join`'s answer. In an ephemeral room `epoch` is empty and the rest zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Joined {
    pub epoch: String,
    /// The room's last offset when the member joined.
    pub offset: u64,
    /// Every message after `since` was replayed.
    pub recovered: bool,
    /// How many messages were replayed.
    pub missed: u64,
}

/// A place in a durable room's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

/// `presence`'s answer: who is in the room.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Members {
    pub room: String,
    pub members: Vec<Member>,
}

/// One user in a room, with every connection of theirs in it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Member {
    pub user: String,
    /// How many connections the user has in the room.
    pub conns: usize,
    /// The meta of the user's first connection that set one, or `null`.
    pub meta: Value,
    pub connections: Vec<MemberConn>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemberConn {
    pub conn: String,
    pub node: String,
    pub meta: Value,
}

impl Member {
    /// A user's entry from their connections in the room.
    pub fn new(user: String, connections: Vec<MemberConn>) -> Member {
        let meta = connections
            .iter()
            .map(|c| &c.meta)
            .find(|m| !m.is_null())
            .cloned()
            .unwrap_or(Value::Null);
        Member {
            user,
            conns: connections.len(),
            meta,
            connections,
        }
    }
}

/// `history`'s answer: stored messages, each a `message` frame with its
/// position.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryPage {
    pub epoch: String,
    pub messages: Vec<Box<RawValue>>,
}

impl PartialEq for HistoryPage {
    fn eq(&self, other: &HistoryPage) -> bool {
        self.epoch == other.epoch
            && self.messages.len() == other.messages.len()
            && self
                .messages
                .iter()
                .zip(&other.messages)
                .all(|(a, b)| a.get() == b.get())
    }
}

/// A read marker and how many messages follow it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReadState {
    pub offset: u64,
    pub unread: u64,
}

/// `refresh`'s answer: when the new token expires (seconds since the epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refreshed {
    pub expires_at: u64,
}

/// `watch`'s answer: user → online, for every user of the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Watching {
    pub status: BTreeMap<String, bool>,
}

/// `status`: a watched user came online or went offline (after the
/// presence service's grace period), sent once per transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusEvent<'a> {
    pub user: &'a str,
    pub online: bool,
}

impl StatusEvent<'_> {
    pub fn to_frame(&self) -> Bytes {
        frame("status", None, self)
    }
}

/// `{"op":..., "id":N, ...fields of body}`.
#[derive(Serialize)]
struct Frame<'a, T> {
    op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Serialize)]
struct Empty {}

fn frame<T: Serialize>(op: &'static str, id: Option<u64>, body: &T) -> Bytes {
    to_bytes(&Frame { op, id, body })
}

impl Reply {
    /// The frame answering request `id`.
    pub fn to_frame(&self, id: Option<u64>) -> Bytes {
        match self {
            Reply::Done => frame("ok", id, &Empty {}),
            Reply::Pong => frame("pong", id, &Empty {}),
            Reply::Joined(b) => frame("ok", id, b),
            Reply::Published(b) => frame("ok", id, b),
            Reply::Members(b) => frame("ok", id, b),
            Reply::History(b) => frame("ok", id, b),
            Reply::Read(b) => frame("ok", id, b),
            Reply::Refreshed(b) => frame("ok", id, b),
            Reply::Watching(b) => frame("ok", id, b),
        }
    }
}

/// `connected`: the answer to a valid `connect` (or `?token=`), sent before
/// anything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Connected {
    /// This connection's id in the cluster.
    pub conn: String,
    pub user: String,
    /// The edge holding the connection.
    pub node: String,
    pub heartbeat_ms: u64,
    /// When the session ends unless the client sends `refresh` first, in
    /// seconds since the epoch: the token's `exp`, or sooner when the
    /// server caps session lifetimes.
    pub expires_at: u64,
    /// Unread messages per durable room with a read marker, and always the
    /// personal room.
    pub unread: BTreeMap<String, u64>,
}

impl Connected {
    /// The frame answering the `connect` request `id`.
    pub fn to_frame(&self, id: Option<u64>) -> Bytes {
        frame("connected", id, self)
    }
}

/// `read`: a user's read marker moved (sent to every device of the user
/// through the personal room).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ReadEvent {
    pub room: String,
    pub offset: u64,
    pub unread: u64,
}

impl ReadEvent {
    pub fn to_frame(&self) -> Bytes {
        frame("read", None, self)
    }

    /// The event in `frame`, if it is a `read` frame (edges keep what the
    /// events of their users' personal rooms say).
    pub fn parse(frame: &[u8]) -> Option<ReadEvent> {
        #[derive(serde::Deserialize)]
        struct Tagged {
            op: String,
            #[serde(flatten)]
            event: ReadEvent,
        }
        let tagged: Tagged = serde_json::from_slice(frame).ok()?;
        (tagged.op == "read").then_some(tagged.event)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_read_event_reads_back_from_its_frame() {
        let event = ReadEvent {
            room: "chat:a".into(),
            offset: 7,
            unread: 2,
        };
        assert_eq!(ReadEvent::parse(&event.to_frame()), Some(event));
        let message = br#"{"op":"message","room":"chat:a","offset":7,"unread":2}"#;
        assert_eq!(ReadEvent::parse(message), None, "not a read frame");
        assert_eq!(ReadEvent::parse(b"{not json"), None);
    }

    fn json_of(frame: Bytes) -> Value {
        serde_json::from_slice(&frame).expect("a frame is JSON")
    }

    #[test]
    fn each_reply_encodes_as_the_contract_says() {
        assert_eq!(
            json_of(Reply::Done.to_frame(Some(1))),
            json!({"op":"ok","id":1})
        );
        assert_eq!(json_of(Reply::Done.to_frame(None)), json!({"op":"ok"}));
        assert_eq!(
            json_of(Reply::Pong.to_frame(Some(2))),
            json!({"op":"pong","id":2})
        );
        let joined = Reply::Joined(Joined {
            epoch: "e1".into(),
            offset: 41,
            recovered: true,
            missed: 3,
        });
        assert_eq!(
            json_of(joined.to_frame(Some(3))),
            json!({"op":"ok","id":3,"epoch":"e1","offset":41,"recovered":true,"missed":3})
        );
        let published = Reply::Published(Position {
            epoch: "e1".into(),
            offset: 42,
        });
        assert_eq!(
            json_of(published.to_frame(Some(4))),
            json!({"op":"ok","id":4,"epoch":"e1","offset":42})
        );
        let members = Reply::Members(Members {
            room: "chat:x".into(),
            members: vec![Member::new(
                "bob".into(),
                vec![
                    MemberConn {
                        conn: "e0-1".into(),
                        node: "e0".into(),
                        meta: Value::Null,
                    },
                    MemberConn {
                        conn: "e1-7".into(),
                        node: "e1".into(),
                        meta: json!({"status":"away"}),
                    },
                ],
            )],
        });
        assert_eq!(
            json_of(members.to_frame(Some(5))),
            json!({"op":"ok","id":5,"room":"chat:x","members":[{
                "user":"bob","conns":2,"meta":{"status":"away"},
                "connections":[
                    {"conn":"e0-1","node":"e0","meta":null},
                    {"conn":"e1-7","node":"e1","meta":{"status":"away"}}
                ]
            }]})
        );
        let page = Reply::History(HistoryPage {
            epoch: "e1".into(),
            messages: vec![RawValue::from_string(r#"{"op":"message","offset":7}"#.into()).unwrap()],
        });
        assert_eq!(
            json_of(page.to_frame(Some(6))),
            json!({"op":"ok","id":6,"epoch":"e1","messages":[{"op":"message","offset":7}]})
        );
        let read = Reply::Read(ReadState {
            offset: 9,
            unread: 2,
        });
        assert_eq!(
            json_of(read.to_frame(Some(7))),
            json!({"op":"ok","id":7,"offset":9,"unread":2})
        );
        let refreshed = Reply::Refreshed(Refreshed {
            expires_at: 1_900_000_000,
        });
        assert_eq!(
            json_of(refreshed.to_frame(Some(8))),
            json!({"op":"ok","id":8,"expires_at":1_900_000_000u64})
        );
        let watching = Reply::Watching(Watching {
            status: BTreeMap::from([("bob".to_string(), true), ("carol".to_string(), false)]),
        });
        assert_eq!(
            json_of(watching.to_frame(Some(9))),
            json!({"op":"ok","id":9,"status":{"bob":true,"carol":false}})
        );
        let status = StatusEvent {
            user: "bob",
            online: false,
        };
        assert_eq!(
            json_of(status.to_frame()),
            json!({"op":"status","user":"bob","online":false})
        );
    }

    #[test]
    fn connected_and_read_events_encode_as_the_contract_says() {
        let connected = Connected {
            conn: "e0-1".into(),
            user: "alice".into(),
            node: "e0".into(),
            heartbeat_ms: 25_000,
            expires_at: 1_900_000_000,
            unread: BTreeMap::from([("user:alice".to_string(), 3)]),
        };
        assert_eq!(
            json_of(connected.to_frame(Some(1))),
            json!({"op":"connected","id":1,"conn":"e0-1","user":"alice","node":"e0",
                   "heartbeat_ms":25000,"expires_at":1_900_000_000u64,"unread":{"user:alice":3}})
        );
        assert_eq!(
            json_of(connected.to_frame(None)).get("id"),
            None,
            "a connection authenticated by ?token= had no connect request"
        );
        let read = ReadEvent {
            room: "doc:a".into(),
            offset: 5,
            unread: 0,
        };
        assert_eq!(
            json_of(read.to_frame()),
            json!({"op":"read","room":"doc:a","offset":5,"unread":0})
        );
    }
}
