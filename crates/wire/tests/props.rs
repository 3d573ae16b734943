//! Property tests of what clients send: the frame parser answers every
//! input with a frame or a `bad_request` (never a panic), keeps the id of a
//! frame it can read, and reads back every frame the protocol defines; the
//! depth check agrees with a parser's idea of nesting; room names parse,
//! encode into one subject token and decode back.

use herald_wire::frames::{self, MAX_JSON_DEPTH, Request};
use herald_wire::{ErrorCode, RoomName, subjects};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn op() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "connect",
        "join",
        "leave",
        "publish",
        "presence",
        "presence_set",
        "history",
        "read",
        "refresh",
        "ping",
        "fly",
    ])
}

/// Frames shaped like client frames, with fields of any JSON type.
fn frame_like() -> impl Strategy<Value = Value> {
    (
        op(),
        prop::option::of(any::<u64>()),
        prop::collection::btree_map(
            prop::sample::select(vec![
                "room", "data", "meta", "token", "since", "key", "limit", "offset", "client",
            ]),
            json_value(),
            0..5,
        ),
    )
        .prop_map(|(op, id, fields)| {
            let mut frame = json!({"op": op});
            if let Some(id) = id {
                frame["id"] = json!(id);
            }
            for (k, v) in fields {
                frame[k] = v;
            }
            frame
        })
}

fn room_name() -> impl Strategy<Value = String> {
    ("[a-z][a-z0-9_-]{0,8}", "[!-~]{1,40}").prop_map(|(ns, name)| format!("{ns}:{name}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_get_a_frame_or_bad_request(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = frames::parse(&bytes) {
            prop_assert_eq!(e.code, ErrorCode::BadRequest);
            prop_assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn frame_shaped_json_is_answered_and_keeps_its_id(frame in frame_like()) {
        let text = serde_json::to_vec(&frame).unwrap();
        match frames::parse(&text) {
            Ok(parsed) => prop_assert_eq!(parsed.id, frame.get("id").and_then(Value::as_u64)),
            Err(e) => {
                prop_assert_eq!(e.code, ErrorCode::BadRequest);
                // A readable id comes back with the error, so the client
                // can match it to its request.
                if let Some(id) = frame.get("id").and_then(Value::as_u64) {
                    prop_assert_eq!(e.id, Some(id));
                }
            }
        }
    }

    #[test]
    fn every_publish_the_protocol_defines_reads_back(
        room in room_name(),
        data in json_value(),
        id in any::<u64>(),
    ) {
        prop_assume!(RoomName::parse(&room).is_ok());
        let text = json!({"op":"publish","id":id,"room":room,"data":data}).to_string();
        let parsed = frames::parse(text.as_bytes()).unwrap();
        prop_assert_eq!(parsed.id, Some(id));
        match parsed.request {
            Request::Publish { room: r, data: d, .. } => {
                prop_assert_eq!(r.as_str(), room.as_str());
                let back: Value = serde_json::from_str(d.get()).unwrap();
                prop_assert_eq!(back, data);
            }
            other => prop_assert!(false, "parsed as {:?}", other.op()),
        }
    }

    #[test]
    fn the_depth_check_counts_nesting_as_json_does(value in json_value(), extra in 0usize..80) {
        // Wrap the value `extra` more levels deep, alternating arrays and objects.
        let mut v = value;
        for i in 0..extra {
            v = if i % 2 == 0 { json!([v]) } else { json!({"k": v}) };
        }
        let text = v.to_string();
        let depth = depth_of(&v);
        let checked = frames::check_depth("data", &text);
        prop_assert_eq!(checked.is_ok(), depth <= MAX_JSON_DEPTH, "depth {}", depth);
    }

    #[test]
    fn room_names_round_trip_through_their_subject(name in room_name()) {
        if let Ok(room) = RoomName::parse(&name) {
            let subject = subjects::room(&room);
            prop_assert!(!subject.contains(' '));
            let back = subjects::room_from_subject(&subject).unwrap();
            prop_assert_eq!(back, room);
        }
    }
}

fn depth_of(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(depth_of).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth_of).max().unwrap_or(0),
        _ => 0,
    }
}
