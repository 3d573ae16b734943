//! What edges tell the presence service about their own connections. Each
//! edge owns the presence of its connections; the presence service's view is
//! derived from these reports. Reports carry a per-edge sequence number so a
//! replica that missed one notices the gap and asks that edge for a snapshot.
//!
//! All of an edge's reports travel on one subject
//! ([`crate::subjects::presence_from_edge`]), so a subscriber sees deltas,
//! heartbeats and snapshots in the order the edge sent them.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EdgeReport {
    /// One change; `seq` is one more than the previous report's.
    Delta {
        node: String,
        seq: u64,
        change: Change,
    },
    /// Changes that queued up while the previous report went out, in order:
    /// the last is numbered `seq`, the first `seq - changes.len() + 1`. A
    /// burst of connects and joins costs the broker one message, not one
    /// each; a lone change still goes as a [`EdgeReport::Delta`].
    Deltas {
        node: String,
        seq: u64,
        changes: Vec<Change>,
    },
    /// Sent every heartbeat interval; `seq` is the latest delta's, so a replica
    /// can tell it missed one even when no new delta follows.
    Heartbeat {
        node: String,
        seq: u64,
        started_ms: u64,
        conns: u64,
    },
    /// The edge's whole state as of `seq`, sent when a presence replica asks.
    Snapshot {
        node: String,
        seq: u64,
        started_ms: u64,
        conns: Vec<ConnState>,
    },
    /// The edge is shutting down and has closed all its connections.
    Goodbye { node: String, seq: u64 },
}

impl EdgeReport {
    pub fn node(&self) -> &str {
        match self {
            EdgeReport::Delta { node, .. }
            | EdgeReport::Deltas { node, .. }
            | EdgeReport::Heartbeat { node, .. }
            | EdgeReport::Snapshot { node, .. }
            | EdgeReport::Goodbye { node, .. } => node,
        }
    }

    pub fn seq(&self) -> u64 {
        match self {
            EdgeReport::Delta { seq, .. }
            | EdgeReport::Deltas { seq, .. }
            | EdgeReport::Heartbeat { seq, .. }
            | EdgeReport::Snapshot { seq, .. }
            | EdgeReport::Goodbye { seq, .. } => *seq,
        }
    }

    /// What the report says, in a word (`join`, `snapshot`, ...), for
    /// logs and traces.
    pub fn kind(&self) -> &'static str {
        match self {
            EdgeReport::Delta { change, .. } => change.kind(),
            EdgeReport::Deltas { .. } => "deltas",
            EdgeReport::Heartbeat { .. } => "heartbeat",
            EdgeReport::Snapshot { .. } => "snapshot",
            EdgeReport::Goodbye { .. } => "goodbye",
        }
    }
}

impl Change {
    /// The change's wire `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Connect { .. } => "connect",
            Change::Disconnect { .. } => "disconnect",
            Change::Join { .. } => "join",
            Change::Leave { .. } => "leave",
            Change::Meta { .. } => "meta",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Change {
    Connect {
        conn: String,
        user: String,
        since_ms: u64,
    },
    Disconnect {
        conn: String,
    },
    Join {
        conn: String,
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        meta: Option<Value>,
        /// The room's namespace sends no presence events (policy
        /// `presence_events = false`): members are listed, but no join, leave
        /// or update is announced for it anywhere.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        quiet: bool,
    },
    Leave {
        conn: String,
        room: String,
    },
    Meta {
        conn: String,
        room: String,
        meta: Value,
    },
}

/// One connection in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnState {
    pub conn: String,
    pub user: String,
    pub since_ms: u64,
    /// Rooms with presence that the connection is in.
    pub rooms: Vec<RoomState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomState {
    pub room: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Value>,
    /// As [`Change::Join`]'s `quiet`: the room announces no presence events.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quiet: bool,
}

/// What an edge has reported of its connections: the state that each
/// [`Change`] in turn leaves behind, so that a snapshot is exactly that
/// state as of the last change. A change naming a connection that is not
/// there changes nothing.
#[derive(Debug, Default, Clone)]
pub struct Reported {
    conns: HashMap<String, ReportedConn>,
}

#[derive(Debug, Clone)]
struct ReportedConn {
    user: String,
    since_ms: u64,
    rooms: Vec<RoomState>,
}

impl Reported {
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Connect {
                conn,
                user,
                since_ms,
            } => {
                let entry = ReportedConn {
                    user: user.clone(),
                    since_ms: *since_ms,
                    rooms: Vec::new(),
                };
                self.conns.insert(conn.clone(), entry);
            }
            Change::Disconnect { conn } => {
                self.conns.remove(conn);
            }
            Change::Join {
                conn,
                room,
                meta,
                quiet,
            } => {
                if let Some(c) = self.conns.get_mut(conn) {
                    c.rooms.retain(|r| r.room != *room);
                    c.rooms.push(RoomState {
                        room: room.clone(),
                        meta: meta.clone(),
                        quiet: *quiet,
                    });
                }
            }
            Change::Leave { conn, room } => {
                if let Some(c) = self.conns.get_mut(conn) {
                    c.rooms.retain(|r| r.room != *room);
                }
            }
            Change::Meta { conn, room, meta } => {
                let joined = self
                    .conns
                    .get_mut(conn)
                    .and_then(|c| c.rooms.iter_mut().find(|r| r.room == *room));
                if let Some(r) = joined {
                    r.meta = Some(meta.clone());
                }
            }
        }
    }

    /// How many connections there are.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The rooms `conn` is in.
    pub fn rooms(&self, conn: &str) -> impl Iterator<Item = &str> {
        self.conns
            .get(conn)
            .into_iter()
            .flat_map(|c| c.rooms.iter().map(|r| r.room.as_str()))
    }

    /// Every connection and its rooms, as a snapshot reports them, in the
    /// order of their ids (so that what a replica derives from it comes out
    /// in the same order every time).
    pub fn snapshot(&self) -> Vec<ConnState> {
        let mut conns: Vec<ConnState> = self
            .conns
            .iter()
            .map(|(conn, c)| ConnState {
                conn: conn.clone(),
                user: c.user.clone(),
                since_ms: c.since_ms,
                rooms: c.rooms.clone(),
            })
            .collect();
        conns.sort_unstable_by(|a, b| a.conn.cmp(&b.conn));
        conns
    }
}

/// A user's online/offline transition, as published on
/// [`crate::subjects::presence_user_event`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserEvent {
    /// Names the transition, the same on every replica that computes it
    /// (`<user>:<online|offline>:<conn that caused it>`), so a consumer can
    /// drop the rare repeat after a leader change.
    pub id: String,
    pub user: String,
    pub event: UserTransition,
    pub ts_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserTransition {
    Online,
    Offline,
}

/// Control messages to one edge, on [`crate::subjects::node_control`]: from
/// the router to each edge holding the user (or the connection), and from
/// another edge forwarding an SSE client's frames ([`Control::Frames`]).
/// For `join`, `leave` and `disconnect`, the edge acknowledges on the
/// message's reply subject once every targeted local connection has acted,
/// with a [`ControlAck`]; `frames` is answered with a [`FramesAck`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Control {
    Join {
        user: String,
        room: String,
    },
    Leave {
        user: String,
        room: String,
    },
    Disconnect {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conn: Option<String>,
        code: u16,
        reason: String,
        /// The backend's reconnect rule for a code of its own; without it,
        /// the code's (edges that predate it ignore it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reconnect: Option<bool>,
    },
    /// Client frames for an SSE connection of the addressed edge, posted to
    /// `POST /sse/send` on another edge: an SSE stream lives on one edge,
    /// while its client's requests may land on any.
    Frames {
        conn: String,
        /// The user the request's token names: only `conn`'s own user may
        /// send on it.
        user: String,
        /// Each frame's JSON text as the client sent it (text, not
        /// parsed JSON: a tagged enum cannot carry raw JSON through serde,
        /// and a frame must reach the session byte for byte).
        frames: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlAck {
    pub node: String,
    /// Connections that acted.
    pub conns: u32,
    /// Targeted connections that did not act in time (their session is stuck
    /// or closing): the call must not be reported done.
    #[serde(default)]
    pub late: u32,
}

/// What the edge holding an SSE connection did with [`Control::Frames`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum FramesAck {
    /// Queued for the connection's session, which answers on the stream.
    Accepted,
    /// No such SSE connection here (never was, or its stream has closed).
    UnknownConn,
    /// The connection belongs to another user.
    WrongUser,
    /// Too many frames already wait for the connection: retry shortly.
    Busy,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_round_trip_with_readable_tags() {
        let r = EdgeReport::Delta {
            node: "e1".into(),
            seq: 3,
            change: Change::Join {
                conn: "e1-1".into(),
                room: "chat:x".into(),
                meta: Some(json!({"typing": true})),
                quiet: false,
            },
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            json!({"kind":"delta","node":"e1","seq":3,"change":{"type":"join","conn":"e1-1","room":"chat:x","meta":{"typing":true}}})
        );
        assert_eq!(serde_json::from_value::<EdgeReport>(v).unwrap(), r);
        assert_eq!(r.node(), "e1");
        assert_eq!(r.seq(), 3);
        assert_eq!(r.kind(), "join");
    }

    #[test]
    fn a_batch_of_deltas_reads_plainly() {
        let r = EdgeReport::Deltas {
            node: "e1".into(),
            seq: 8,
            changes: vec![
                Change::Connect {
                    conn: "e1-7".into(),
                    user: "ann".into(),
                    since_ms: 5,
                },
                Change::Disconnect {
                    conn: "e1-6".into(),
                },
            ],
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            json!({"kind":"deltas","node":"e1","seq":8,"changes":[
                {"type":"connect","conn":"e1-7","user":"ann","since_ms":5},
                {"type":"disconnect","conn":"e1-6"}]})
        );
        assert_eq!(serde_json::from_value::<EdgeReport>(v).unwrap(), r);
        assert_eq!((r.node(), r.seq(), r.kind()), ("e1", 8, "deltas"));
    }

    #[test]
    fn a_changes_kind_is_its_wire_type() {
        let conn = || "e1-1".to_string();
        let room = || "chat:x".to_string();
        for change in [
            Change::Connect {
                conn: conn(),
                user: "u".into(),
                since_ms: 1,
            },
            Change::Disconnect { conn: conn() },
            Change::Join {
                conn: conn(),
                room: room(),
                meta: None,
                quiet: false,
            },
            Change::Leave {
                conn: conn(),
                room: room(),
            },
            Change::Meta {
                conn: conn(),
                room: room(),
                meta: json!(1),
            },
        ] {
            let v = serde_json::to_value(&change).unwrap();
            assert_eq!(v["type"], change.kind(), "{v}");
        }
    }

    #[test]
    fn forwarded_frames_keep_their_text_and_acks_read_plainly() {
        let frames = vec![
            r#"{"op":"ping","id":1}"#.to_string(),
            r#"{"op":"publish","room":"chat:x","data":1.50}"#.to_string(),
        ];
        let c = Control::Frames {
            conn: "edge-0-7".into(),
            user: "ann".into(),
            frames,
        };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(
            text,
            r#"{"action":"frames","conn":"edge-0-7","user":"ann","frames":["{\"op\":\"ping\",\"id\":1}","{\"op\":\"publish\",\"room\":\"chat:x\",\"data\":1.50}"]}"#
        );
        match serde_json::from_str::<Control>(&text).unwrap() {
            Control::Frames { conn, user, frames } => {
                assert_eq!((conn.as_str(), user.as_str()), ("edge-0-7", "ann"));
                // Byte for byte: `1.50` is not rewritten as `1.5`.
                assert_eq!(frames[1], r#"{"op":"publish","room":"chat:x","data":1.50}"#);
            }
            other => panic!("{other:?}"),
        }
        for (ack, json) in [
            (FramesAck::Accepted, json!({"result": "accepted"})),
            (FramesAck::UnknownConn, json!({"result": "unknown_conn"})),
            (FramesAck::WrongUser, json!({"result": "wrong_user"})),
            (FramesAck::Busy, json!({"result": "busy"})),
        ] {
            assert_eq!(serde_json::to_value(ack).unwrap(), json);
            assert_eq!(serde_json::from_value::<FramesAck>(json).unwrap(), ack);
        }
    }

    #[test]
    fn quiet_rooms_say_so_and_older_reports_read_as_loud() {
        let quiet = Change::Join {
            conn: "e1-1".into(),
            room: "audit:x".into(),
            meta: None,
            quiet: true,
        };
        let v = serde_json::to_value(&quiet).unwrap();
        assert_eq!(
            v,
            json!({"type":"join","conn":"e1-1","room":"audit:x","quiet":true})
        );
        assert_eq!(serde_json::from_value::<Change>(v).unwrap(), quiet);
        let old: RoomState = serde_json::from_value(json!({"room": "chat:x"})).unwrap();
        assert!(!old.quiet);
        let quiet_state = RoomState {
            room: "audit:x".into(),
            meta: None,
            quiet: true,
        };
        assert_eq!(
            serde_json::to_value(&quiet_state).unwrap(),
            json!({"room":"audit:x","quiet":true})
        );
    }

    #[test]
    fn a_disconnects_reconnect_rule_is_optional_both_ways() {
        // From a router that predates the field.
        let old: Control = serde_json::from_value(
            json!({"action":"disconnect","user":"bob","code":1000,"reason":"bye"}),
        )
        .unwrap();
        assert!(matches!(
            old,
            Control::Disconnect {
                reconnect: None,
                ..
            }
        ));
        let banned = Control::Disconnect {
            user: Some("bob".into()),
            conn: None,
            code: 4403,
            reason: "banned".into(),
            reconnect: Some(false),
        };
        assert_eq!(
            serde_json::to_value(&banned).unwrap(),
            json!({"action":"disconnect","user":"bob","code":4403,"reason":"banned","reconnect":false})
        );
    }

    #[test]
    fn reported_state_is_what_the_changes_leave() {
        let mut r = Reported::default();
        let join = |conn: &str, room: &str, meta| Change::Join {
            conn: conn.into(),
            room: room.into(),
            meta,
            quiet: false,
        };
        r.apply(&Change::Connect {
            conn: "e1-1".into(),
            user: "ann".into(),
            since_ms: 5,
        });
        r.apply(&join("e1-1", "chat:a", None));
        r.apply(&join("e1-1", "chat:b", None));
        r.apply(&Change::Meta {
            conn: "e1-1".into(),
            room: "chat:b".into(),
            meta: json!({"typing": true}),
        });
        r.apply(&Change::Leave {
            conn: "e1-1".into(),
            room: "chat:a".into(),
        });
        // Changes for a connection that is not there change nothing.
        r.apply(&join("e1-9", "chat:a", None));
        assert_eq!(r.len(), 1);
        assert_eq!(r.rooms("e1-1").collect::<Vec<_>>(), ["chat:b"]);
        assert_eq!(
            r.snapshot(),
            [ConnState {
                conn: "e1-1".into(),
                user: "ann".into(),
                since_ms: 5,
                rooms: vec![RoomState {
                    room: "chat:b".into(),
                    meta: Some(json!({"typing": true})),
                    quiet: false,
                }],
            }]
        );
        r.apply(&Change::Disconnect {
            conn: "e1-1".into(),
        });
        assert!(r.is_empty());
    }
}
