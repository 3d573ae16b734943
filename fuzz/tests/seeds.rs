//! The seed corpora pass their targets' checks, and reach what they are
//! named for: a target whose seeds all stop at the first check would
//! fuzz little. Plain `cargo test` in fuzz/, no afl.

use std::path::{Path, PathBuf};

use herald_edge::fuzzing::Incoming;
use herald_fuzz::{token, wire_frame, ws_frames};
use herald_wire::CloseCode;
use herald_wire::frames;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

fn seed(target: &str, name: &str) -> Vec<u8> {
    std::fs::read(corpus(target).join(name)).unwrap_or_else(|e| panic!("{target}/{name}: {e}"))
}

fn every_seed(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut seeds: Vec<_> = std::fs::read_dir(corpus(target))
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 20, "{target}: {} seeds", seeds.len());
    seeds
}

#[test]
fn wire_frame_seeds_hold_every_op_and_pass() {
    for (_, bytes) in every_seed("wire_frame") {
        wire_frame::check(&bytes);
    }
    for op in [
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
    ] {
        let name = op.replace('_', "-");
        let frame = frames::parse(&seed("wire_frame", &name)).unwrap();
        assert_eq!(frame.request.op(), op);
    }
    for refused in [
        "unknown-op",
        "join-no-room",
        "data-depth-65",
        "room-too-long",
    ] {
        assert!(
            frames::parse(&seed("wire_frame", refused)).is_err(),
            "{refused}"
        );
    }
}

#[test]
fn ws_frames_seeds_decode_as_named() {
    let target = ws_frames::Target::new();
    for (name, bytes) in every_seed("ws_frames") {
        assert!(target.check(&bytes).is_some(), "{name}: too short");
    }
    let decode = |name: &str| target.check(&seed("ws_frames", name)).unwrap();
    for (name, text) in [
        ("text", &br#"{"op":"ping","id":1}"#[..]),
        ("text-cut", br#"{"op":"ping","id":1}"#),
        ("text-already-read", br#"{"op":"ping","id":1}"#),
        ("text-bytewise", br#"{"op":"ping","id":1}"#),
        ("fragmented-with-ping", br#"{"op":"ping"}"#),
        ("fragmented-bytewise", br#"{"op":"ping"}"#),
    ] {
        assert_eq!(
            decode(name).incoming,
            [Incoming::Text(text.to_vec())],
            "{name}"
        );
    }
    let d = decode("fragmented-with-ping");
    assert_eq!(
        d.sent,
        [0x8A, 1, b'p'],
        "the ping between fragments is answered"
    );
    let d = decode("close-1000-bye");
    assert_eq!(d.incoming, [Incoming::Closed]);
    assert_eq!(d.sent, [0x88, 2, 0x03, 0xe8]);
    for (name, code) in [
        ("unmasked", CloseCode::ProtocolError),
        ("rsv1", CloseCode::ProtocolError),
        ("ping-126", CloseCode::ProtocolError),
        ("close-1005", CloseCode::ProtocolError),
        ("text-not-utf8", CloseCode::InvalidData),
        ("length-2-64-minus-1", CloseCode::TooBig),
        ("over-limit-fragments", CloseCode::TooBig),
    ] {
        match decode(name).incoming.as_slice() {
            [Incoming::Violation(c, _)] => assert_eq!(*c, code, "{name}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    let d = decode("two-frames-and-a-header");
    assert_eq!(d.incoming.len(), 2);
    assert_eq!(d.held, 3, "the third frame's first bytes are held");
}

#[test]
fn token_seeds_verify_only_when_signed_and_valid() {
    let target = token::Target::new();
    for (_, bytes) in every_seed("token") {
        target.check(&bytes);
    }
    let accepted = |name: &str| target.check(&seed("token", name));
    // [the open verifier (no aud/iss checks, JWKS), the strict one (aud and iss, Ed25519 PEM)]
    for (name, want) in [
        ("hs256-minimal", [true, false]),
        ("hs256-full", [true, true]),
        ("hs256-aud-list", [true, true]),
        ("hs256-exp-fraction", [true, true]),
        ("hs256-exp-max", [true, true]),
        ("rs256-kid", [true, false]),
        ("es256-kid", [true, false]),
        ("eddsa-kid", [true, true]),
        ("eddsa-no-kid", [true, true]),
        ("eddsa-unknown-kid", [false, true]),
        ("hs256-other-aud", [true, false]),
        ("hs256-expired", [false, false]),
        ("hs256-nbf-future", [false, false]),
        ("hs256-iat-future", [false, false]),
        ("hs256-sub-empty", [false, false]),
        ("alg-none", [false, false]),
        ("payload-swapped", [false, false]),
        ("wrong-secret", [false, false]),
        ("hs256-keyed-with-rsa-public-key", [false, false]),
    ] {
        assert_eq!(accepted(name), want, "{name}");
    }
}
