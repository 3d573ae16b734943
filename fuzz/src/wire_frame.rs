//! `wire_frame`: the client frame parser (`herald_wire::frames::parse`) and
//! the body parser of `POST /sse/send` (`frames::posted`), on any bytes.
//!
//! Checked, beyond "no panic" (the properties of `crates/wire/tests/props.rs`):
//! - a refused frame gets `bad_request`, a message in words, and an error
//!   frame that is JSON;
//! - the `id` of a JSON object is kept, in the frame or in the error;
//! - a parsed frame, written back as JSON, parses to the same request;
//! - its room parses again and goes through its subject and back;
//! - its `data`, `meta` and `client` nest no deeper than allowed, and the
//!   depth check agrees with a JSON parser on any JSON;
//! - a posted body gives frames (JSON objects), each checked as above, or
//!   an error in words.

use herald_wire::frames::{self, ClientFrame, MAX_JSON_DEPTH, Request};
use herald_wire::{ErrorCode, RoomName, subjects};
use serde_json::Value;
use serde_json::value::RawValue;

pub fn check(data: &[u8]) {
    check_frame(data);
    check_depth_agrees(data);
    match frames::posted(data) {
        Ok(items) => {
            assert!(!items.is_empty(), "a posted body gave no frames");
            for item in items {
                assert!(
                    item.starts_with('{'),
                    "a posted frame is not an object: {item}"
                );
                check_frame(item.as_bytes());
            }
        }
        Err(why) => assert!(!why.is_empty(), "a posted body refused without a word"),
    }
}

fn check_frame(data: &[u8]) {
    let parsed = frames::parse(data);
    match &parsed {
        Ok(frame) => check_parsed(frame),
        Err(e) => {
            assert_eq!(e.code, ErrorCode::BadRequest, "{e}");
            assert!(!e.message.is_empty(), "an error without a message");
            let v: Value = serde_json::from_slice(&e.to_frame()).expect("the error frame is JSON");
            assert_eq!(v["op"], "error");
            assert_eq!(v["code"], "bad_request");
            assert_eq!(v.get("id").and_then(Value::as_u64), e.id);
        }
    }
    // The id of a JSON object comes back, with the frame or its error. Read
    // from the object written out again by serde_json: a duplicated key is
    // refused before any id can be read, and is no frame a client library
    // writes.
    if let Ok(value @ Value::Object(_)) = serde_json::from_slice::<Value>(data) {
        let id = value.get("id").and_then(Value::as_u64);
        let text = serde_json::to_vec(&value).expect("a Value serializes");
        match frames::parse(&text) {
            Ok(frame) => assert_eq!(frame.id, id, "the id of {value}"),
            Err(e) => {
                if id.is_some() {
                    assert_eq!(e.id, id, "the id of {value} in {e}");
                }
            }
        }
    }
}

fn check_parsed(frame: &ClientFrame) {
    // Written back as JSON, it reads as the same request.
    let text = write(frame);
    let again = frames::parse(text.as_bytes())
        .unwrap_or_else(|e| panic!("{text} was parsed, written back and refused: {e}"));
    assert_eq!(format!("{frame:?}"), format!("{again:?}"), "{text}");

    let request = &frame.request;
    if let Some(room) = room_of(request) {
        assert_eq!(RoomName::parse(room.as_str()).as_ref(), Ok(room));
        let subject = subjects::room(room);
        assert!(!subject.contains(' '), "{subject}");
        assert_eq!(
            subjects::room_from_subject(&subject).as_ref(),
            Some(room),
            "{subject}"
        );
    }
    for json in raw_fields(request) {
        match serde_json::from_str::<Value>(json.get()) {
            Ok(v) => {
                let depth = depth_of(&v);
                assert!(depth <= MAX_JSON_DEPTH, "accepted {depth} levels deep");
            }
            // Deeper than serde_json reads (128 levels): far too deep.
            Err(e) if e.to_string().contains("recursion limit") => {
                panic!("accepted JSON nested past serde_json's limit: {e}")
            }
            // A number out of an f64's range (`1e400`), which a raw value
            // keeps as written: nothing to count.
            Err(_) => {}
        }
    }
}

/// The depth check agrees with a JSON parser's nesting, on any JSON that
/// parser reads (it stops at 128 levels).
fn check_depth_agrees(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let depth = depth_of(&value);
    assert_eq!(
        frames::check_depth("data", text).is_ok(),
        depth <= MAX_JSON_DEPTH,
        "depth {depth}"
    );
}

fn room_of(request: &Request) -> Option<&RoomName> {
    match request {
        Request::Join { room, .. }
        | Request::Leave { room }
        | Request::Publish { room, .. }
        | Request::Presence { room }
        | Request::PresenceSet { room, .. }
        | Request::History { room, .. }
        | Request::Read { room, .. } => Some(room),
        Request::Connect { .. }
        | Request::Refresh { .. }
        | Request::Watch { .. }
        | Request::Unwatch { .. }
        | Request::Ping => None,
    }
}

fn raw_fields(request: &Request) -> Vec<&RawValue> {
    match request {
        Request::Connect { client, .. } => client.iter().map(|v| &**v).collect(),
        Request::Join { meta, .. } => meta.iter().map(|v| &**v).collect(),
        Request::Publish { data, .. } => vec![&**data],
        Request::PresenceSet { meta, .. } => vec![&**meta],
        _ => Vec::new(),
    }
}

/// The frame as a client would write it.
fn write(frame: &ClientFrame) -> String {
    let mut fields: Vec<(&str, String)> = vec![("op", quoted(frame.request.op()))];
    if let Some(id) = frame.id {
        fields.push(("id", id.to_string()));
    }
    let room = |r: &RoomName| quoted(r.as_str());
    let since = |s: &frames::Since| serde_json::to_string(s).expect("serializes");
    match &frame.request {
        Request::Connect { token, client } => {
            fields.push(("token", quoted(token)));
            if let Some(client) = client {
                fields.push(("client", client.get().to_string()));
            }
        }
        Request::Join {
            room: r,
            since: s,
            meta,
        } => {
            fields.push(("room", room(r)));
            if let Some(s) = s {
                fields.push(("since", since(s)));
            }
            if let Some(meta) = meta {
                fields.push(("meta", meta.get().to_string()));
            }
        }
        Request::Leave { room: r } | Request::Presence { room: r } => {
            fields.push(("room", room(r)));
        }
        Request::Publish {
            room: r,
            data,
            key,
            echo,
        } => {
            fields.push(("room", room(r)));
            fields.push(("data", data.get().to_string()));
            if let Some(key) = key {
                fields.push(("key", quoted(key)));
            }
            if !echo {
                fields.push(("echo", "false".to_string()));
            }
        }
        Request::PresenceSet { room: r, meta } => {
            fields.push(("room", room(r)));
            fields.push(("meta", meta.get().to_string()));
        }
        Request::History {
            room: r,
            since: s,
            limit,
        } => {
            fields.push(("room", room(r)));
            if let Some(s) = s {
                fields.push(("since", since(s)));
            }
            if let Some(limit) = limit {
                fields.push(("limit", limit.to_string()));
            }
        }
        Request::Read { room: r, offset } => {
            fields.push(("room", room(r)));
            fields.push(("offset", offset.to_string()));
        }
        Request::Refresh { token } => fields.push(("token", quoted(token))),
        Request::Watch { users } | Request::Unwatch { users } => {
            fields.push(("users", serde_json::to_string(users).expect("serializes")));
        }
        Request::Ping => {}
    }
    let body: Vec<String> = fields
        .into_iter()
        .map(|(k, v)| format!("{}:{v}", quoted(k)))
        .collect();
    format!("{{{}}}", body.join(","))
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

fn depth_of(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(depth_of).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth_of).max().unwrap_or(0),
        _ => 0,
    }
}
