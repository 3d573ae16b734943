//! The broker subject layout shared by every Herald process. Room names may
//! hold `.`, `*` and `>`, which NATS reads as separators and wildcards, so
//! they are percent-encoded into a single subject token.

use crate::room::RoomName;

/// Prefix of every subject Herald uses.
pub const PREFIX: &str = "herald";

/// Live messages of a room, as ready-to-send client frames.
pub fn room(room: &RoomName) -> String {
    format!("{PREFIX}.room.{}", encode_token(room.as_str()))
}

/// Control messages for one edge: server-side join, leave and disconnect of
/// a user's connections there, or of one connection by id.
pub fn node_control(node: &str) -> String {
    format!("{PREFIX}.ctl.node.{}", encode_token(node))
}

/// Presence replicas announce themselves here (leader election: the replica
/// with the smallest id among those heard recently publishes cluster-wide
/// events).
pub const PRESENCE_REPLICAS: &str = "herald.presence.replica";

/// Everything an edge tells the presence service about its own connections:
/// deltas, heartbeats and snapshots share one subject per edge so that one
/// subscription sees them in the order the edge sent them.
pub fn presence_from_edge(node: &str) -> String {
    format!("{PREFIX}.presence.edge.{}", encode_token(node))
}

/// Wildcard the presence service subscribes to for every edge's reports.
pub const PRESENCE_FROM_EDGES: &str = "herald.presence.edge.>";

/// Asks every edge for a snapshot of its connections.
pub const PRESENCE_SYNC_ALL: &str = "herald.presence.sync.all";

/// Asks one edge for a snapshot of its connections.
pub fn presence_sync_node(node: &str) -> String {
    format!("{PREFIX}.presence.sync.node.{}", encode_token(node))
}

/// Requests answered by any presence replica (queue group [`PRESENCE_QUEUE`]).
/// The payloads are the protobuf messages of the gRPC `Presence` service, so
/// both paths share one schema and one implementation.
pub const PRESENCE_QUERY_ROOM_MEMBERS: &str = "herald.presence.query.room_members";
pub const PRESENCE_QUERY_USER_STATUS: &str = "herald.presence.query.user_status";
pub const PRESENCE_QUEUE: &str = "herald-presence";

/// User online/offline transitions ([`crate::presence::UserEvent`], JSON),
/// one message per transition, published by the leading presence replica.
pub fn presence_user_event(user: &str) -> String {
    format!("{PREFIX}.presence.user.{}", encode_token(user))
}

/// Percent-encodes the bytes NATS gives meaning to (and `%` itself) so any
/// printable string becomes one subject token.
pub fn encode_token(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        match c {
            '.' | '*' | '>' | '%' => out.push_str(&format!("%{:02X}", c as u32)),
            c if c.is_whitespace() || c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_subjects_are_one_token() {
        let r = RoomName::parse("chat:a.b*c>d%e").unwrap();
        assert_eq!(room(&r), "herald.room.chat:a%2Eb%2Ac%3Ed%25e");
        assert_eq!(encode_token("a b"), "a%20b");
        assert_eq!(presence_from_edge("edge-1"), "herald.presence.edge.edge-1");
    }
}
