//! Writes the seed corpora of the fuzz targets, `fuzz/corpus/<target>/`:
//! small valid and nearly valid inputs, one file each, named for what they
//! hold. The files are committed; run this again after changing it:
//!
//!     cargo run --example seeds        (in fuzz/)
//!
//! It rewrites only the seeds it makes; other files in those directories
//! (crash reproducers kept as regression seeds) stay.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_fuzz::token;
use herald_fuzz::ws_frames::Input;

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    write(&corpus.join("wire_frame"), wire_frame());
    write(&corpus.join("ws_frames"), ws_frames());
    write(&corpus.join("token"), tokens());
}

fn write(dir: &Path, seeds: Vec<(String, Vec<u8>)>) {
    std::fs::create_dir_all(dir).expect("the corpus directory");
    let mut names = std::collections::HashSet::new();
    for (name, bytes) in &seeds {
        assert!(names.insert(name), "two seeds named {name}");
        std::fs::write(dir.join(name), bytes).expect("a seed");
    }
    println!("{}: {} seeds", dir.display(), seeds.len());
}

fn text(seeds: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    seeds
        .iter()
        .map(|(name, s)| (name.to_string(), s.as_bytes().to_vec()))
        .collect()
}

/// Every op of docs/protocol.md, section 1, then frames that are nearly right.
fn wire_frame() -> Vec<(String, Vec<u8>)> {
    let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let deep_ok = format!(
        r#"{{"op":"publish","id":20,"room":"chat:x","data":{}}}"#,
        nested(64)
    );
    let deep_bad = format!(
        r#"{{"op":"publish","id":21,"room":"chat:x","data":{}}}"#,
        nested(65)
    );
    let long_room = format!(
        r#"{{"op":"join","id":22,"room":"chat:{}"}}"#,
        "a".repeat(196)
    );
    let mut seeds = text(&[
        (
            "connect",
            r#"{"op":"connect","id":1,"token":"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln","client":{"name":"herald-js","version":"1.2.0"}}"#,
        ),
        ("join", r#"{"op":"join","id":2,"room":"chat:lobby"}"#),
        (
            "join-since-meta",
            r#"{"op":"join","id":3,"room":"chat:lobby","since":{"epoch":"e1","offset":5},"meta":{"status":"away","n":1.5}}"#,
        ),
        ("leave", r#"{"op":"leave","id":4,"room":"chat:lobby"}"#),
        (
            "publish",
            r#"{"op":"publish","id":5,"room":"chat:lobby","data":{"text":"hi","at":[1,2.5,-3e2,true,null]},"key":"k-1"}"#,
        ),
        (
            "publish-null",
            r#"{"op":"publish","room":"chat:x","data":null}"#,
        ),
        (
            "presence",
            r#"{"op":"presence","id":6,"room":"chat:lobby"}"#,
        ),
        (
            "presence-set",
            r#"{"op":"presence_set","id":7,"room":"chat:lobby","meta":{"typing":true}}"#,
        ),
        (
            "history",
            r#"{"op":"history","id":8,"room":"chat:lobby","since":{"epoch":"e1","offset":0},"limit":100}"#,
        ),
        (
            "read",
            r#"{"op":"read","id":9,"room":"chat:lobby","offset":42}"#,
        ),
        (
            "refresh",
            r#"{"op":"refresh","id":10,"token":"eyJhbGciOiJIUzI1NiJ9.e30.c2ln"}"#,
        ),
        ("ping", r#"{"op":"ping","id":11}"#),
        ("ping-no-id", r#"{"op":"ping"}"#),
        (
            "watch",
            r#"{"op":"watch","id":30,"users":["bob","team-a","bob"]}"#,
        ),
        ("unwatch", r#"{"op":"unwatch","id":31,"users":["bob"]}"#),
        (
            "publish-no-echo",
            r#"{"op":"publish","id":32,"room":"chat:x","data":1,"echo":false}"#,
        ),
        (
            "personal-room",
            r#"{"op":"join","id":12,"room":"user:alice"}"#,
        ),
        (
            "room-subject-chars",
            r#"{"op":"publish","id":13,"room":"chat:a.b*c>d%e","data":"x"}"#,
        ),
        (
            "unknown-fields",
            r#"{"op":"ping","id":14,"future":{"a":[1]}}"#,
        ),
        (
            "whitespace",
            " \n{ \"op\" : \"leave\" ,\t\"room\" : \"a:b\" }\r\n",
        ),
        ("unknown-op", r#"{"op":"fly","id":15}"#),
        ("no-op", r#"{"id":16}"#),
        ("join-no-room", r#"{"op":"join","id":17}"#),
        (
            "publish-no-data",
            r#"{"op":"publish","id":18,"room":"chat:x"}"#,
        ),
        ("read-no-offset", r#"{"op":"read","id":19,"room":"a:b"}"#),
        ("room-no-namespace", r#"{"op":"join","room":"nocolon"}"#),
        ("room-empty-name", r#"{"op":"join","room":"chat:"}"#),
        ("room-bad-namespace", r#"{"op":"join","room":"ch at:x"}"#),
        (
            "room-not-ascii",
            r#"{"op":"join","room":"chat:\u00e9t\u00e9"}"#,
        ),
        ("room-wrong-type", r#"{"op":"join","id":23,"room":42}"#),
        ("id-wrong-type", r#"{"op":"ping","id":"1"}"#),
        ("id-max", r#"{"op":"ping","id":18446744073709551615}"#),
        ("id-negative", r#"{"op":"ping","id":-1}"#),
        ("id-float", r#"{"op":"ping","id":1.0}"#),
        (
            "limit-too-big",
            r#"{"op":"history","id":24,"room":"a:b","limit":4294967296}"#,
        ),
        (
            "since-wrong",
            r#"{"op":"join","id":25,"room":"a:b","since":{"epoch":1}}"#,
        ),
        (
            "data-huge-number",
            r#"{"op":"publish","id":26,"room":"a:b","data":1e400}"#,
        ),
        (
            "brackets-in-strings",
            r#"{"op":"publish","id":27,"room":"a:b","data":"[[[{{{\"]]]"}"#,
        ),
        ("duplicate-key", r#"{"op":"ping","id":1,"id":2}"#),
        ("not-json", "{not json"),
        ("cut", r#"{"op":"publish","room":"a:b","data":{"#),
        ("empty", ""),
        ("array", "[1,2]"),
        (
            "posted-array",
            r#"[{"op":"ping","id":1}, {"op":"publish","room":"a:b","data":1.50}]"#,
        ),
        ("posted-bad-item", r#"[{"op":"ping"}, 3]"#),
        ("posted-empty-array", "[]"),
        ("string", r#""ping""#),
    ]);
    seeds.push(("data-depth-64".into(), deep_ok.into_bytes()));
    seeds.push(("data-depth-65".into(), deep_bad.into_bytes()));
    seeds.push(("room-too-long".into(), long_room.into_bytes()));
    seeds.push((
        "not-utf8".into(),
        b"{\"op\":\"ping\",\"x\":\"\xff\xfe\"}".to_vec(),
    ));
    seeds
}

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A client frame: masked, as RFC 6455 requires.
fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn close(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    masked(true, OP_CLOSE, &p)
}

/// A seed: the client's bytes, read with messages of at most 4 KiB.
fn ws(bytes: Vec<u8>) -> WsSeed {
    WsSeed {
        max_message: 4096,
        cuts: Vec::new(),
        first_already_read: false,
        bytewise: false,
        bytes,
    }
}

struct WsSeed {
    max_message: usize,
    cuts: Vec<usize>,
    first_already_read: bool,
    bytewise: bool,
    bytes: Vec<u8>,
}

impl WsSeed {
    fn cut(mut self, cuts: &[usize]) -> WsSeed {
        self.cuts = cuts.to_vec();
        self
    }
    fn already_read(mut self) -> WsSeed {
        self.first_already_read = true;
        self
    }
    fn bytewise(mut self) -> WsSeed {
        self.bytewise = true;
        self
    }
    fn max(mut self, max_message: usize) -> WsSeed {
        self.max_message = max_message;
        self
    }
    fn encode(&self) -> Vec<u8> {
        Input {
            max_message: self.max_message,
            cuts: self.cuts.clone(),
            first_already_read: self.first_already_read,
            bytewise: self.bytewise,
            bytes: &self.bytes,
        }
        .write()
    }
}

fn ws_frames() -> Vec<(String, Vec<u8>)> {
    let ping_op = br#"{"op":"ping","id":1}"#;
    let text = masked(true, OP_TEXT, ping_op);
    let fragmented = [
        masked(false, OP_TEXT, b"{\"op\":"),
        masked(true, OP_PING, b"p"),
        masked(false, OP_CONTINUATION, b"\"ping\""),
        masked(true, OP_CONTINUATION, b"}"),
    ]
    .concat();
    // "κό!" with the ό (cf 8c) cut between two fragments.
    let utf8_cut = [
        masked(false, OP_TEXT, &[0xce, 0xba, 0xcf]),
        masked(false, OP_CONTINUATION, &[0x8c]),
        masked(true, OP_CONTINUATION, b"!"),
    ]
    .concat();
    let mut unmasked = text.clone();
    unmasked[1] &= 0x7f;
    let mut rsv1 = text.clone();
    rsv1[0] |= 0x40;
    let two_and_a_header = [
        text.clone(),
        masked(true, OP_BINARY, &[0, 1, 2]),
        vec![0x81, 0xfe, 0x01],
    ]
    .concat();
    let seeds = vec![
        ("text", ws(text.clone())),
        ("text-cut", ws(text.clone()).cut(&[1, 2, 6, 9])),
        (
            "text-already-read",
            ws(text.clone()).cut(&[3]).already_read(),
        ),
        ("text-bytewise", ws(text.clone()).bytewise()),
        ("binary", ws(masked(true, OP_BINARY, &[0xff, 0, 0x80]))),
        (
            "fragmented-with-ping",
            ws(fragmented.clone()).cut(&[5, 11, 20]),
        ),
        ("fragmented-bytewise", ws(fragmented).bytewise()),
        ("utf8-cut-between-fragments", ws(utf8_cut).cut(&[4, 9])),
        (
            "text-not-utf8",
            ws(masked(true, OP_TEXT, &[b'a', 0xff, 0xfe])),
        ),
        (
            "text-ends-inside-char",
            ws(masked(true, OP_TEXT, &[b'a', 0xce])),
        ),
        ("unmasked", ws(unmasked)),
        ("rsv1", ws(rsv1)),
        ("opcode-3", ws(masked(true, 0x3, b"x"))),
        ("opcode-b", ws(masked(true, 0xB, b""))),
        (
            "continuation-first",
            ws(masked(true, OP_CONTINUATION, b"x")),
        ),
        (
            "message-inside-message",
            ws([masked(false, OP_TEXT, b"a"), masked(true, OP_TEXT, b"b")].concat()),
        ),
        (
            "ping-pong-text",
            ws([
                masked(true, OP_PING, b"hb"),
                masked(true, OP_PONG, b"x"),
                text.clone(),
            ]
            .concat()),
        ),
        ("ping-125", ws(masked(true, OP_PING, &[7; 125]))),
        ("ping-126", ws(masked(true, OP_PING, &[7; 126]))),
        ("ping-fragmented", ws(masked(false, OP_PING, b"x"))),
        (
            "close-1000-bye",
            ws([close(1000, b"bye"), text.clone()].concat()),
        ),
        ("close-empty", ws(masked(true, OP_CLOSE, b""))),
        ("close-1-byte", ws(masked(true, OP_CLOSE, &[0x03]))),
        ("close-1005", ws(close(1005, b""))),
        ("close-4999-utf8", ws(close(4999, "κ".as_bytes()))),
        (
            "close-reason-not-utf8",
            ws(close(1000, &[0xce, 0xba, 0xff])),
        ),
        (
            "text-300-16bit-length",
            ws(masked(true, OP_TEXT, &[b'a'; 300])).cut(&[2, 4, 8]),
        ),
        (
            "binary-70000-64bit-length",
            ws(masked(true, OP_BINARY, &[0; 70_000])[..64].to_vec()),
        ),
        (
            "length-2-64-minus-1",
            ws(vec![
                0x81, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ]),
        ),
        (
            "over-limit-fragments",
            ws([
                masked(false, OP_BINARY, &[0; 20]),
                masked(true, OP_CONTINUATION, &[0; 20]),
            ]
            .concat())
            .max(32),
        ),
        (
            "two-frames-and-a-header",
            ws(two_and_a_header).cut(&[30, 31]),
        ),
    ];
    seeds
        .into_iter()
        .map(|(name, seed)| (name.to_string(), seed.encode()))
        .collect()
}

fn tokens() -> Vec<(String, Vec<u8>)> {
    let b64 = |s: &[u8]| URL_SAFE_NO_PAD.encode(s);
    let payload = b64(br#"{"sub":"alice","exp":4102444800}"#);
    let unsigned = |header: &str| format!("{}.{payload}.", b64(header.as_bytes()));
    let valid = token::signed()
        .into_iter()
        .find(|(name, _)| *name == "hs256-minimal")
        .expect("a valid HS256 token")
        .1;
    let (head, rest) = valid.split_once('.').expect("a JWT");
    let (_, sig) = rest.rsplit_once('.').expect("a JWT");
    let forged = format!(
        "{head}.{}.{sig}",
        b64(br#"{"sub":"mallory","exp":4102444800}"#)
    );
    let rsa_public = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/auth/tests/fixtures/rsa_public.pem"),
    )
    .expect("the RSA public key");
    let sign_hs = |secret: &[u8]| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({ "sub": "alice", "exp": 4_102_444_800u64 }),
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .expect("signing")
    };
    let mut seeds: Vec<(String, Vec<u8>)> = token::signed()
        .into_iter()
        .map(|(name, t)| (name.to_string(), t.into_bytes()))
        .collect();
    for (name, t) in [
        ("alg-none", unsigned(r#"{"alg":"none","typ":"JWT"}"#)),
        ("alg-none-upper", unsigned(r#"{"alg":"NONE"}"#)),
        ("alg-unknown", unsigned(r#"{"alg":"XX256"}"#)),
        ("alg-hs512", unsigned(r#"{"alg":"HS512"}"#)),
        ("alg-ps256-kid", unsigned(r#"{"alg":"PS256","kid":"rsa"}"#)),
        ("alg-es384", unsigned(r#"{"alg":"ES384"}"#)),
        ("no-alg", unsigned(r#"{"typ":"JWT"}"#)),
        ("header-not-object", unsigned("[]")),
        (
            "kid-path",
            unsigned(r#"{"alg":"RS256","kid":"../../etc/passwd"}"#),
        ),
        ("crit", unsigned(r#"{"alg":"HS256","crit":["exp"]}"#)),
        ("payload-swapped", forged),
        ("wrong-secret", sign_hs(b"another-secret")),
        ("hs256-keyed-with-rsa-public-key", sign_hs(&rsa_public)),
        ("two-parts", format!("{head}.{payload}")),
        ("four-parts", format!("{valid}.x")),
        ("padded", format!("{head}=.{payload}.{sig}")),
        ("bearer-prefix", format!("Bearer {valid}")),
        ("garbage-dots", "a.b.c".to_string()),
        ("garbage", "abc".to_string()),
        ("payload-not-base64", format!("{head}.!!.x")),
        ("empty", String::new()),
    ] {
        seeds.push((name.to_string(), t.into_bytes()));
    }
    seeds
}
