//! The broker subject layout shared by every Herald process. Room names may
//! hold `.`, `*` and `>`, which NATS reads as separators and wildcards, so
//! they are percent-encoded into a single subject token.

use crate::room::RoomName;

/// Prefix of every subject Herald uses.
pub const PREFIX: &str = "herald";

/// Shard subjects personal rooms are spread over. Every connection sits in
/// its user's personal room, so a subject (and on the edge, a subscription
/// with its buffers) per user would cost every idle connection kilobytes;
/// an edge instead subscribes to at most this many shard wildcards. Changing
/// it moves rooms between subjects: every process must agree on it.
pub const USER_SHARDS: u32 = 1024;

/// Every edge's per-user publish counts ([`crate::quota::UserUsage`]), so
/// that a user's publish limit holds across edges.
pub const USER_USAGE: &str = "herald.limits.usage";

/// Live messages of a room, as ready-to-send client frames: personal rooms
/// on `herald.user.<shard>.<room>` ([`user_shard`]), others on
/// `herald.room.<room>`.
pub fn room(room: &RoomName) -> String {
    let token = encode_token(room.as_str());
    match user_shard(room) {
        Some(shard) => format!("{PREFIX}.user.{shard}.{token}"),
        None => format!("{PREFIX}.room.{token}"),
    }
}

/// The wildcard carrying every personal room of `room`'s shard, `None` for
/// a room that has a subject of its own.
pub fn room_shard(room: &RoomName) -> Option<String> {
    user_shard(room).map(|shard| format!("{PREFIX}.user.{shard}.*"))
}

/// The wildcard carrying every personal room of every shard.
pub fn all_personal_rooms() -> String {
    format!("{PREFIX}.user.*.*")
}

/// The room whose live messages `subject` carries (the inverse of [`room`]).
pub fn room_from_subject(subject: &str) -> Option<RoomName> {
    let rest = subject.strip_prefix(PREFIX)?.strip_prefix('.')?;
    let token = match rest.strip_prefix("room.") {
        Some(token) => token,
        None => rest.strip_prefix("user.")?.split_once('.')?.1,
    };
    RoomName::parse(&decode_token(token)?).ok()
}

/// The shard of a personal room: FNV-1a (32-bit) of the room name's bytes
/// (`user:<id>`), modulo [`USER_SHARDS`]. Written out here rather than taken
/// from a hasher because publishers and subscribers in different processes
/// and versions must agree on it forever.
pub fn user_shard(room: &RoomName) -> Option<u32> {
    room.is_personal()
        .then(|| fnv1a32(room.as_str().as_bytes()) % USER_SHARDS)
}

fn fnv1a32(bytes: &[u8]) -> u32 {
    const OFFSET_BASIS: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    bytes.iter().fold(OFFSET_BASIS, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(PRIME)
    })
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

/// The string [`encode_token`] encoded; `None` for a malformed escape or
/// bytes that are not UTF-8.
pub fn decode_token(token: &str) -> Option<String> {
    if !token.contains('%') {
        return Some(token.to_string());
    }
    let mut out = Vec::with_capacity(token.len());
    let mut bytes = token.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            let hex = std::str::from_utf8(&hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
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
        assert_eq!(room_shard(&r), None);
        assert_eq!(room_from_subject(&room(&r)), Some(r));
    }

    #[test]
    fn tokens_round_trip() {
        for raw in ["plain", "a.b*c>d%e", "%", "a b\tc\u{7f}", "é.ü", "%2E", ""] {
            assert_eq!(
                decode_token(&encode_token(raw)).as_deref(),
                Some(raw),
                "{raw:?}"
            );
        }
        assert_eq!(decode_token("a%2"), None);
        assert_eq!(decode_token("a%zz"), None);
        assert_eq!(decode_token("%FF"), None);
    }

    #[test]
    fn personal_rooms_share_stable_shards() {
        // Known FNV-1a values: the hash must never change between versions.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
        let alice = RoomName::user("alice").unwrap();
        let shard = fnv1a32(b"user:alice") % USER_SHARDS;
        assert_eq!(user_shard(&alice), Some(shard));
        assert_eq!(room(&alice), format!("herald.user.{shard}.user:alice"));
        assert_eq!(room_shard(&alice), Some(format!("herald.user.{shard}.*")));
        // Four tokens, as the wildcard of every shard has.
        assert_eq!(all_personal_rooms(), "herald.user.*.*");
        assert_eq!(room(&alice).split('.').count(), 4);
        assert_eq!(room_from_subject(&room(&alice)), Some(alice));
        let odd = RoomName::user("a.b>%").unwrap();
        assert_eq!(room_from_subject(&room(&odd)), Some(odd));
        assert_eq!(room_from_subject("herald.user.3"), None);
        assert_eq!(room_from_subject("herald.ctl.node.x"), None);
        assert_eq!(room_from_subject("herald.room.nonamespace"), None);
        let spread: std::collections::HashSet<_> = (0..10_000)
            .filter_map(|i| user_shard(&RoomName::user(&format!("u{i}")).unwrap()))
            .collect();
        assert!(spread.len() > 1000, "{}", spread.len());
    }
}
