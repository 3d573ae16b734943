//! Client frames: one JSON object per WebSocket text frame, each with an `op`;
//! and the server frames that are not replies (`message`, `presence`,
//! `error`, `disconnect`; replies are in [`crate::reply`]).
//! Parsing turns every malformed input into a [`FrameError`] with the
//! contract's code and a plain-words message, keeping the request `id` when
//! it can be read so the client can match the error to its request.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::codes::{CloseCode, ErrorCode};
use crate::room::RoomName;

/// A position in a durable room's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Since {
    pub epoch: String,
    pub offset: u64,
}

/// A parsed client request and its optional id.
#[derive(Debug)]
pub struct ClientFrame {
    pub id: Option<u64>,
    pub request: Request,
}

/// Every op a client may send (protocol v1, "Client to server").
#[derive(Debug)]
pub enum Request {
    Connect {
        token: String,
        client: Option<Box<RawValue>>,
    },
    Join {
        room: RoomName,
        since: Option<Since>,
        meta: Option<Box<RawValue>>,
    },
    Leave {
        room: RoomName,
    },
    Publish {
        room: RoomName,
        data: Box<RawValue>,
        key: Option<String>,
        /// `false`: the publishing connection does not receive the message
        /// live (the user's other connections do).
        echo: bool,
    },
    Presence {
        room: RoomName,
    },
    PresenceSet {
        room: RoomName,
        meta: Box<RawValue>,
    },
    History {
        room: RoomName,
        since: Option<Since>,
        limit: Option<u32>,
    },
    Read {
        room: RoomName,
        offset: u64,
    },
    Refresh {
        token: String,
    },
    /// Contacts' status: the users' online state now, then each transition.
    Watch {
        users: Vec<String>,
    },
    Unwatch {
        users: Vec<String>,
    },
    Ping,
}

impl Request {
    /// The op name, as written on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Connect { .. } => "connect",
            Request::Join { .. } => "join",
            Request::Leave { .. } => "leave",
            Request::Publish { .. } => "publish",
            Request::Presence { .. } => "presence",
            Request::PresenceSet { .. } => "presence_set",
            Request::History { .. } => "history",
            Request::Read { .. } => "read",
            Request::Refresh { .. } => "refresh",
            Request::Watch { .. } => "watch",
            Request::Unwatch { .. } => "unwatch",
            Request::Ping => "ping",
        }
    }
}

/// Why a frame could not be served, as the error frame will say it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct FrameError {
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
    /// For `rate_limited`: when the request may succeed again.
    pub retry_after_ms: Option<u64>,
}

impl FrameError {
    pub fn new(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> FrameError {
        FrameError {
            id,
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// The `{"op":"error"}` frame for this error.
    pub fn to_frame(&self) -> Bytes {
        error_frame(self.id, self.code, &self.message, self.retry_after_ms)
    }
}

/// The union of every field any op carries; which are required is decided
/// per op afterwards, so that a missing field gets a message naming it.
#[derive(Deserialize)]
struct RawFrame {
    op: Option<String>,
    id: Option<u64>,
    token: Option<String>,
    client: Option<Box<RawValue>>,
    room: Option<String>,
    since: Option<Since>,
    meta: Option<Box<RawValue>>,
    /// `null` is data like any other value, not a missing field.
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    key: Option<String>,
    limit: Option<u32>,
    offset: Option<u64>,
    users: Option<Vec<String>>,
    echo: Option<bool>,
}

/// A field that is there, whatever its value, `null` included (serde reads
/// a `null` into `None` otherwise).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct IdOnly {
    id: Option<u64>,
}

/// Parses one client text frame.
pub fn parse(text: &[u8]) -> Result<ClientFrame, FrameError> {
    let raw: RawFrame = serde_json::from_slice(text).map_err(|e| {
        // Keep the id when the frame is JSON but a field has the wrong type.
        let id = serde_json::from_slice::<IdOnly>(text)
            .ok()
            .and_then(|f| f.id);
        let message = if e.is_syntax() || e.is_eof() {
            format!("frame is not valid JSON: {e}")
        } else {
            format!("frame has a field of the wrong type: {e}")
        };
        FrameError::new(id, ErrorCode::BadRequest, message)
    })?;
    let id = raw.id;
    let bad = |message: String| FrameError::new(id, ErrorCode::BadRequest, message);
    for (field, value) in [
        ("data", &raw.data),
        ("meta", &raw.meta),
        ("client", &raw.client),
    ] {
        if let Some(value) = value {
            check_depth(field, value.get()).map_err(bad)?;
        }
    }
    let Some(op) = raw.op.as_deref() else {
        return Err(bad("frame has no `op` field".into()));
    };
    let need = |field: &str| bad(format!("`{op}` needs a `{field}` field"));
    let room = |r: Option<String>| -> Result<RoomName, FrameError> {
        let r = r.ok_or_else(|| need("room"))?;
        RoomName::parse(&r).map_err(|e| bad(e.to_string()))
    };
    let request = match op {
        "connect" => Request::Connect {
            token: raw.token.ok_or_else(|| need("token"))?,
            client: raw.client,
        },
        "join" => Request::Join {
            room: room(raw.room)?,
            since: raw.since,
            meta: raw.meta,
        },
        "leave" => Request::Leave {
            room: room(raw.room)?,
        },
        "publish" => Request::Publish {
            room: room(raw.room)?,
            data: raw.data.ok_or_else(|| need("data"))?,
            key: raw.key,
            echo: raw.echo.unwrap_or(true),
        },
        "presence" => Request::Presence {
            room: room(raw.room)?,
        },
        "presence_set" => Request::PresenceSet {
            room: room(raw.room)?,
            meta: raw.meta.ok_or_else(|| need("meta"))?,
        },
        "history" => Request::History {
            room: room(raw.room)?,
            since: raw.since,
            limit: raw.limit,
        },
        "read" => Request::Read {
            room: room(raw.room)?,
            offset: raw.offset.ok_or_else(|| need("offset"))?,
        },
        "refresh" => Request::Refresh {
            token: raw.token.ok_or_else(|| need("token"))?,
        },
        "watch" => Request::Watch {
            users: users(op, raw.users).map_err(bad)?,
        },
        "unwatch" => Request::Unwatch {
            users: users(op, raw.users).map_err(bad)?,
        },
        "ping" => Request::Ping,
        other => {
            return Err(bad(format!(
                "unknown op `{}`; see docs/protocol.md for the ops a client may send",
                other.escape_default()
            )));
        }
    };
    Ok(ClientFrame { id, request })
}

/// The `users` of `watch` and `unwatch`: at least one, each a user id that
/// can name a personal room (the ids tokens' `sub` may hold), repeats
/// dropped.
fn users(op: &str, users: Option<Vec<String>>) -> Result<Vec<String>, String> {
    let users = users.ok_or_else(|| format!("`{op}` needs a `users` field"))?;
    if users.is_empty() {
        return Err(format!("`{op}` needs at least one user in `users`"));
    }
    let mut out: Vec<String> = Vec::with_capacity(users.len());
    for user in users {
        if user.is_empty() {
            return Err(format!("`{op}` names an empty user id"));
        }
        // A user id is what can name a personal room; its rules in words
        // that speak of users, not rooms.
        if let Err(e) = RoomName::user(&user) {
            let why = match e {
                crate::RoomError::TooLong(_) => format!(
                    "is {} bytes long; at most {} are accepted",
                    user.len(),
                    crate::room::MAX_ROOM_LEN - "user:".len()
                ),
                _ => "may hold only printable ASCII without spaces".to_string(),
            };
            return Err(format!("user id `{}` {why}", user.escape_default()));
        }
        if !out.contains(&user) {
            out.push(user);
        }
    }
    Ok(out)
}

/// How deeply JSON a client or a backend sends (`data`, `meta`) may nest
/// unless the process says otherwise ([`set_max_json_depth`]): members'
/// parsers are not all as careful as ours, and a 32,000-deep array relayed
/// as it came crashed one.
pub const MAX_JSON_DEPTH: usize = 64;

static MAX_DEPTH: AtomicUsize = AtomicUsize::new(MAX_JSON_DEPTH);

/// Sets the nesting [`check_depth`] allows in this process
/// (`--max-json-depth`), once at start.
pub fn set_max_json_depth(depth: usize) {
    MAX_DEPTH.store(depth, Ordering::Relaxed);
}

/// Refuses `json` nested deeper than this process allows (by default
/// [`MAX_JSON_DEPTH`]), naming `field`. Counts brackets outside strings:
/// one pass, no allocation.
pub fn check_depth(field: &str, json: &str) -> Result<(), String> {
    let max = MAX_DEPTH.load(Ordering::Relaxed);
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if deepest > max {
        return Err(format!(
            "`{field}` nests {deepest} levels deep; at most {max} are accepted"
        ));
    }
    Ok(())
}

/// The frames of a body posted over HTTP (`POST /sse/send`): one frame (a
/// JSON object) or a JSON array of them, each as its JSON text, unparsed:
/// the session reads them as it reads WebSocket text frames, and answers a
/// bad one with an `error` like any other.
pub fn posted(body: &[u8]) -> Result<Vec<String>, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("the body is not UTF-8 text: {e}"))?;
    let raw: &RawValue =
        serde_json::from_str(text).map_err(|e| format!("the body is not valid JSON: {e}"))?;
    let json = raw.get();
    if json.starts_with('{') {
        return Ok(vec![json.to_string()]);
    }
    if !json.starts_with('[') {
        return Err("the body must be a JSON frame (an object) or an array of frames".into());
    }
    let items: Vec<&RawValue> = serde_json::from_str(json).expect("an array of valid JSON");
    if items.is_empty() {
        return Err("the array holds no frames".into());
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item.get() {
            frame if frame.starts_with('{') => Ok(frame.to_string()),
            _ => Err(format!(
                "item {i} of the array is not a frame (a JSON object)"
            )),
        })
        .collect()
}

pub(crate) fn to_bytes(value: &impl Serialize) -> Bytes {
    // Serializing these plain structs cannot fail: no maps with non-string
    // keys, no custom serializers that error.
    Bytes::from(serde_json::to_vec(value).expect("frame serializes"))
}

/// `{"op":"message",...}`: built once per published message and sent as the
/// same bytes to every recipient.
pub fn message_frame(room: &RoomName, data: &RawValue, from: &str, ts_ms: u64) -> Bytes {
    #[derive(Serialize)]
    struct Message<'a> {
        op: &'static str,
        room: &'a str,
        data: &'a RawValue,
        from: &'a str,
        ts: u64,
    }
    to_bytes(&Message {
        op: "message",
        room: room.as_str(),
        data,
        from,
        ts: ts_ms,
    })
}

/// A durable room's message frame with its position: `frame` (from
/// [`message_frame`]) with `epoch`, `offset` and `prev` (the room's previous
/// offset, which lets edges put messages from several publishers back in
/// order) appended. Stored messages keep the plain frame; the position is
/// added when the store has assigned it.
pub fn with_position(frame: &[u8], epoch: &str, offset: u64, prev: u64) -> Bytes {
    debug_assert_eq!(frame.last(), Some(&b'}'));
    let mut out = Vec::with_capacity(frame.len() + epoch.len() + 48);
    out.extend_from_slice(&frame[..frame.len() - 1]);
    out.extend_from_slice(b",\"epoch\":");
    out.extend_from_slice(&serde_json::to_vec(epoch).expect("a string serializes"));
    out.extend_from_slice(format!(",\"offset\":{offset},\"prev\":{prev}}}").as_bytes());
    Bytes::from(out)
}

/// A live `message` frame (from [`message_frame`] or [`with_position`])
/// with the W3C `traceparent` of its publish appended, for the client's own
/// telemetry to continue the trace.
pub fn with_traceparent(frame: &[u8], traceparent: &str) -> Bytes {
    debug_assert_eq!(frame.last(), Some(&b'}'));
    let mut out = Vec::with_capacity(frame.len() + traceparent.len() + 20);
    out.extend_from_slice(&frame[..frame.len() - 1]);
    out.extend_from_slice(b",\"traceparent\":");
    out.extend_from_slice(&serde_json::to_vec(traceparent).expect("a string serializes"));
    out.push(b'}');
    Bytes::from(out)
}

/// The position of a durable message frame, or `None` for any other frame.
pub fn position(frame: &[u8]) -> Option<(u64, u64)> {
    #[derive(Deserialize)]
    struct Position {
        offset: Option<u64>,
        prev: Option<u64>,
    }
    let p: Position = serde_json::from_slice(frame).ok()?;
    Some((p.offset?, p.prev?))
}

/// A room presence event, `{"op":"presence",...}`: published on the room's
/// subject by the edge that owns the connection (or, for connections of a
/// dead edge, by the presence service), so members on every edge receive it
/// in order with the room's messages.
pub fn presence_frame(
    room: &str,
    event: PresenceEvent,
    user: &str,
    conn: &str,
    meta: Option<&serde_json::Value>,
) -> Bytes {
    #[derive(Serialize)]
    struct Presence<'a> {
        op: &'static str,
        room: &'a str,
        event: &'static str,
        user: &'a str,
        conn: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        meta: Option<&'a serde_json::Value>,
    }
    to_bytes(&Presence {
        op: "presence",
        room,
        event: event.as_str(),
        user,
        conn,
        meta,
    })
}

/// The events of room presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceEvent {
    Join,
    Leave,
    Update,
}

impl PresenceEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceEvent::Join => "join",
            PresenceEvent::Leave => "leave",
            PresenceEvent::Update => "update",
        }
    }
}

/// `{"op":"error",...}`.
pub fn error_frame(
    id: Option<u64>,
    code: ErrorCode,
    message: &str,
    retry_after_ms: Option<u64>,
) -> Bytes {
    #[derive(Serialize)]
    struct Error<'a> {
        op: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        code: &'static str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    }
    to_bytes(&Error {
        op: "error",
        id,
        code: code.as_str(),
        message,
        retry_after_ms,
    })
}

/// `{"op":"disconnect",...}`, sent right before the close frame with the same
/// code. `reconnect` is the code's rule ([`CloseCode::reconnect`]) unless a
/// backend chose another for a code of its own. `reconnect_after_ms`, when
/// given, tells a client that reconnects how long to wait first (a draining
/// edge spreads its clients' returns).
pub fn disconnect_frame(
    code: CloseCode,
    reason: &str,
    reconnect: bool,
    reconnect_after_ms: Option<u64>,
) -> Bytes {
    #[derive(Serialize)]
    struct Disconnect<'a> {
        op: &'static str,
        code: u16,
        reason: &'a str,
        reconnect: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        reconnect_after_ms: Option<u64>,
    }
    to_bytes(&Disconnect {
        op: "disconnect",
        code: code.code(),
        reason,
        reconnect,
        reconnect_after_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn parse_str(s: &str) -> Result<ClientFrame, FrameError> {
        parse(s.as_bytes())
    }

    #[test]
    fn parses_each_op() {
        let f = parse_str(r#"{"op":"connect","id":1,"token":"t","client":{"name":"x"}}"#).unwrap();
        assert_eq!(f.id, Some(1));
        assert!(matches!(f.request, Request::Connect { ref token, .. } if token == "t"));

        let f = parse_str(
            r#"{"op":"join","id":2,"room":"chat:lobby","since":{"epoch":"e","offset":5},"meta":{"c":1}}"#,
        )
        .unwrap();
        match f.request {
            Request::Join { room, since, meta } => {
                assert_eq!(room.as_str(), "chat:lobby");
                assert_eq!(since.unwrap().offset, 5);
                assert_eq!(meta.unwrap().get(), r#"{"c":1}"#);
            }
            other => panic!("{other:?}"),
        }
        let f =
            parse_str(r#"{"op":"publish","room":"chat:x","data":[1,"two"],"key":"k"}"#).unwrap();
        match f.request {
            Request::Publish { data, key, .. } => {
                assert_eq!(data.get(), r#"[1,"two"]"#);
                assert_eq!(key.as_deref(), Some("k"));
            }
            other => panic!("{other:?}"),
        }
        for (text, op) in [
            (r#"{"op":"leave","room":"a:b"}"#, "leave"),
            (r#"{"op":"presence","room":"a:b"}"#, "presence"),
            (
                r#"{"op":"presence_set","room":"a:b","meta":{}}"#,
                "presence_set",
            ),
            (r#"{"op":"history","room":"a:b","limit":3}"#, "history"),
            (r#"{"op":"read","room":"a:b","offset":3}"#, "read"),
            (r#"{"op":"refresh","token":"x"}"#, "refresh"),
            (r#"{"op":"ping","id":9}"#, "ping"),
            (r#"{"op":"watch","users":["bob"]}"#, "watch"),
            (r#"{"op":"unwatch","users":["bob"]}"#, "unwatch"),
        ] {
            assert_eq!(parse_str(text).unwrap().request.op(), op);
        }
    }

    #[test]
    fn publish_echoes_unless_told_not_to() {
        let echo = |text: &str| match parse_str(text).unwrap().request {
            Request::Publish { echo, .. } => echo,
            other => panic!("{other:?}"),
        };
        assert!(echo(r#"{"op":"publish","room":"chat:x","data":1}"#));
        assert!(!echo(
            r#"{"op":"publish","room":"chat:x","data":1,"echo":false}"#
        ));
        let e = parse_str(r#"{"op":"publish","id":2,"room":"chat:x","data":1,"echo":"no"}"#)
            .unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(2)));
    }

    #[test]
    fn watch_takes_a_list_of_user_ids() {
        match parse_str(r#"{"op":"watch","id":1,"users":["bob","carol","bob"]}"#)
            .unwrap()
            .request
        {
            Request::Watch { users } => assert_eq!(users, ["bob", "carol"], "repeats dropped"),
            other => panic!("{other:?}"),
        }
        for (text, why) in [
            (r#"{"op":"watch","id":1}"#, "`watch` needs a `users` field"),
            (
                r#"{"op":"unwatch","id":1,"users":[]}"#,
                "`unwatch` needs at least one user in `users`",
            ),
            (r#"{"op":"watch","id":1,"users":[""]}"#, "empty user id"),
            (
                r#"{"op":"watch","id":1,"users":["a b"]}"#,
                "user id `a b` may hold only printable ASCII",
            ),
        ] {
            let e = parse_str(text).unwrap_err();
            assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(1)), "{text}");
            assert!(e.message.contains(why), "{text}: {}", e.message);
        }
        let long = "x".repeat(300);
        let e = parse_str(&format!(r#"{{"op":"watch","id":1,"users":["{long}"]}}"#)).unwrap_err();
        assert!(
            e.message.contains("300 bytes long; at most 195"),
            "{}",
            e.message
        );
        let e = parse_str(r#"{"op":"watch","id":3,"users":"bob"}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(3)));
    }

    #[test]
    fn deeply_nested_data_and_meta_are_refused() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let publish = |data: &str| {
            parse_str(&format!(
                r#"{{"op":"publish","id":3,"room":"chat:x","data":{data}}}"#
            ))
        };
        assert!(publish(&nested(MAX_JSON_DEPTH)).is_ok());
        let e = publish(&nested(MAX_JSON_DEPTH + 1)).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(3)));
        assert!(
            e.message.contains("`data` nests 65 levels"),
            "{}",
            e.message
        );
        // Deeper than serde's own limit: still our plain answer, with the id.
        let e = publish(&nested(32_000)).unwrap_err();
        assert_eq!(
            (e.code, e.id),
            (ErrorCode::BadRequest, Some(3)),
            "{}",
            e.message
        );
        // Brackets inside strings are text, not nesting.
        let text = format!("\"{}\\\"{}\"", "[".repeat(500), "{".repeat(500));
        assert!(publish(&text).is_ok());
        let meta = format!(
            r#"{{"op":"presence_set","room":"chat:x","meta":{{"a":{}}}}}"#,
            nested(MAX_JSON_DEPTH)
        );
        assert!(parse_str(&meta).unwrap_err().message.contains("`meta`"));
    }

    #[test]
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        assert!(parse_str(r#"{"op":"ping","future":true}"#).is_ok());
    }

    #[test]
    fn malformed_frames_get_bad_request_with_the_id_when_readable() {
        let e = parse_str("{not json").unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, None));
        assert!(e.message.contains("not valid JSON"));

        let e = parse_str(r#"{"op":"fly","id":4}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(4)));
        assert!(e.message.contains("unknown op `fly`"));

        let e = parse_str(r#"{"op":"join","id":5}"#).unwrap_err();
        assert_eq!(e.id, Some(5));
        assert_eq!(e.message, "`join` needs a `room` field");

        let e = parse_str(r#"{"op":"publish","id":6,"room":"chat:x"}"#).unwrap_err();
        assert_eq!(e.message, "`publish` needs a `data` field");
        // `null` is data, not a missing field.
        let f = parse_str(r#"{"op":"publish","id":6,"room":"chat:x","data":null}"#).unwrap();
        assert!(matches!(f.request, Request::Publish { data, .. } if data.get() == "null"));

        let e = parse_str(r#"{"id":7}"#).unwrap_err();
        assert_eq!(
            (e.id, e.message.as_str()),
            (Some(7), "frame has no `op` field")
        );

        let e = parse_str(r#"{"op":"join","id":8,"room":42}"#).unwrap_err();
        assert_eq!(e.id, Some(8));
        assert!(e.message.contains("wrong type"));

        let e = parse_str(r#"{"op":"join","id":9,"room":"nocolon"}"#).unwrap_err();
        assert!(e.message.contains("namespace:name"));

        assert_eq!(parse_str("[1,2]").unwrap_err().code, ErrorCode::BadRequest);
        assert_eq!(parse_str("").unwrap_err().code, ErrorCode::BadRequest);
    }

    #[test]
    fn posted_bodies_hold_one_frame_or_an_array_of_them_kept_as_sent() {
        assert_eq!(
            posted(br#" {"op":"ping","id":1} "#).unwrap(),
            [r#"{"op":"ping","id":1}"#]
        );
        assert_eq!(
            posted(br#"[{"op":"ping"}, {"op":"publish","room":"a:b","data":1.50}]"#).unwrap(),
            [
                r#"{"op":"ping"}"#,
                r#"{"op":"publish","room":"a:b","data":1.50}"#
            ]
        );
        for (body, why) in [
            (&b"{not json"[..], "not valid JSON"),
            (b"{\"op\":", "not valid JSON"),
            (&[0xff, 0xfe][..], "not UTF-8"),
            (b"42", "a JSON frame"),
            (b"\"ping\"", "a JSON frame"),
            (b"[]", "no frames"),
            (br#"[{"op":"ping"}, 3]"#, "item 1"),
            (b"", "not valid JSON"),
        ] {
            let e = posted(body).unwrap_err();
            assert!(e.contains(why), "{body:?}: {e}");
        }
    }

    #[test]
    fn server_frames_encode_as_the_contract_says() {
        let room = RoomName::parse("chat:lobby").unwrap();
        let data = RawValue::from_string(r#"{"text":"hi"}"#.into()).unwrap();
        let v: Value = serde_json::from_slice(&message_frame(&room, &data, "bob", 7)).unwrap();
        assert_eq!(
            v,
            json!({"op":"message","room":"chat:lobby","data":{"text":"hi"},"from":"bob","ts":7})
        );
        let v: Value = serde_json::from_slice(&error_frame(
            None,
            ErrorCode::RateLimited,
            "slow down",
            Some(50),
        ))
        .unwrap();
        assert_eq!(
            v,
            json!({"op":"error","code":"rate_limited","message":"slow down","retry_after_ms":50})
        );
        let v: Value = serde_json::from_slice(&disconnect_frame(
            CloseCode::ServiceRestart,
            "draining",
            true,
            Some(250),
        ))
        .unwrap();
        assert_eq!(
            v,
            json!({"op":"disconnect","code":1012,"reason":"draining","reconnect":true,"reconnect_after_ms":250})
        );
        let v: Value =
            serde_json::from_slice(&disconnect_frame(CloseCode::Forbidden, "no", false, None))
                .unwrap();
        assert_eq!(
            v,
            json!({"op":"disconnect","code":4003,"reason":"no","reconnect":false})
        );
        let v: Value = serde_json::from_slice(&disconnect_frame(
            CloseCode::application(4403).unwrap(),
            "banned",
            true,
            None,
        ))
        .unwrap();
        assert_eq!(
            v,
            json!({"op":"disconnect","code":4403,"reason":"banned","reconnect":true})
        );
        let v: Value = serde_json::from_slice(&presence_frame(
            "chat:x",
            PresenceEvent::Leave,
            "bob",
            "e1-4",
            None,
        ))
        .unwrap();
        assert_eq!(
            v,
            json!({"op":"presence","room":"chat:x","event":"leave","user":"bob","conn":"e1-4"})
        );
        let plain = message_frame(&room, &data, "bob", 7);
        assert_eq!(position(&plain), None);
        let placed = with_position(&plain, "e\"1", 42, 40);
        let v: Value = serde_json::from_slice(&placed).unwrap();
        assert_eq!(
            v,
            json!({"op":"message","room":"chat:lobby","data":{"text":"hi"},"from":"bob","ts":7,"epoch":"e\"1","offset":42,"prev":40})
        );
        assert_eq!(position(&placed), Some((42, 40)));

        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let traced = with_traceparent(&placed, tp);
        let v: Value = serde_json::from_slice(&traced).unwrap();
        assert_eq!(v["traceparent"], tp);
        assert_eq!(v["offset"], 42);
        assert_eq!(
            position(&traced),
            Some((42, 40)),
            "the position still reads"
        );
        let v: Value = serde_json::from_slice(&with_traceparent(&plain, tp)).unwrap();
        assert_eq!(
            v,
            json!({"op":"message","room":"chat:lobby","data":{"text":"hi"},"from":"bob","ts":7,"traceparent":tp})
        );
    }
}
