//! Every bad input gets the contract's error or close code, and the clients
//! around it keep being served.

mod common;

use std::io::Write;

use base64::Engine;
use common::*;
use herald_client::Client;
use herald_proto::v1::PublishRequest;
use serde_json::{Value, json};

const CONFIG: &str = r#"
[namespaces.chat]

[namespaces.news]
publish = false
"#;

struct Fixture {
    cluster: Cluster,
    _config: tempfile::NamedTempFile,
    bystander: Client,
    router: RouterClient,
    sent: u64,
}

impl Fixture {
    async fn start() -> Fixture {
        let mut config = tempfile::NamedTempFile::new().unwrap();
        config.write_all(CONFIG.as_bytes()).unwrap();
        let path = config.path().display().to_string();
        let cluster = Cluster::start_with(1, &["--config".into(), path]);
        let bystander = connect(&cluster.ws(0), "carol").await;
        ok(&bystander, json!({"op":"join","room":"chat:lobby"})).await;
        let router = cluster.router().await;
        Fixture {
            cluster,
            _config: config,
            bystander,
            router,
            sent: 0,
        }
    }

    /// The bystander still gets the room's messages, in order.
    async fn bystander_still_served(&mut self) {
        self.sent += 1;
        self.router
            .publish(PublishRequest {
                room: "chat:lobby".into(),
                data: self.sent.to_string(),
                key: String::new(),
            })
            .await
            .unwrap();
        let m = self.bystander.recv_op("message", WAIT).await.unwrap();
        assert_eq!(m["data"], self.sent);
    }
}

/// Opens a connection and sends `connect` with `token`; returns the error reply
/// and the close code that followed.
async fn connect_refused(url: &str, token: &str) -> (Value, Option<u16>) {
    let client = Client::open(url).await.unwrap();
    let reply = client
        .request(json!({"op":"connect","token":token}))
        .await
        .unwrap();
    assert_eq!(reply["op"], "error", "{reply}");
    let (disconnect, code, _reason) = client.closed(WAIT).await.unwrap();
    let disconnect = disconnect.expect("a disconnect frame before the close");
    assert_eq!(disconnect["code"].as_u64().map(|c| c as u16), code);
    assert_eq!(disconnect["reconnect"], false);
    (reply, code)
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn malformed_frames_are_answered_and_the_connection_survives() {
    let mut f = Fixture::start().await;
    let mallory = connect(&f.cluster.ws(0), "mallory").await;

    mallory.send_text("{not json").await.unwrap();
    let e = mallory.recv_op("error", WAIT).await.unwrap();
    assert_eq!(e["code"], "bad_request");
    assert!(
        e["message"].as_str().unwrap().contains("not valid JSON"),
        "{e}"
    );
    f.bystander_still_served().await;

    let e = refused(&mallory, json!({"op":"teleport"}), "bad_request").await;
    assert!(e["message"].as_str().unwrap().contains("unknown op"), "{e}");
    let e = refused(&mallory, json!({"op":"join"}), "bad_request").await;
    assert!(e["message"].as_str().unwrap().contains("room"), "{e}");
    refused(
        &mallory,
        json!({"op":"publish","room":"chat:lobby"}),
        "bad_request",
    )
    .await;
    refused(
        &mallory,
        json!({"op":"join","room":"no-namespace"}),
        "bad_request",
    )
    .await;
    f.bystander_still_served().await;

    // JSON nested too deeply for members' parsers is not relayed.
    let deep = format!("{}{}", "[".repeat(32_000), "]".repeat(32_000));
    mallory
        .send_text(&format!(
            r#"{{"op":"publish","id":77,"room":"chat:lobby","data":{deep}}}"#
        ))
        .await
        .unwrap();
    let e = mallory.recv_op("error", WAIT).await.unwrap();
    assert_eq!(
        (e["code"].as_str(), e["id"].as_u64()),
        (Some("bad_request"), Some(77))
    );
    assert!(
        e["message"].as_str().unwrap().contains("levels deep"),
        "{e}"
    );
    f.bystander_still_served().await;

    mallory.send_binary(b"\x00\x01").await.unwrap();
    let e = mallory.recv_op("error", WAIT).await.unwrap();
    assert_eq!(e["code"], "bad_request");

    // Still connected and served after all of that.
    let pong = mallory.request(json!({"op":"ping"})).await.unwrap();
    assert_eq!(pong["op"], "pong");
    f.bystander_still_served().await;

    // A message over the size limit closes with 1009.
    let huge = format!(
        r#"{{"op":"publish","room":"chat:lobby","data":"{}"}}"#,
        "x".repeat(70_000)
    );
    mallory.send_text(&huge).await.unwrap();
    let (disconnect, code, _) = mallory.closed(WAIT).await.unwrap();
    assert_eq!(code, Some(1009));
    assert_eq!(disconnect.unwrap()["code"], 1009);
    f.bystander_still_served().await;
}

#[tokio::test]
async fn bad_tokens_are_refused_with_4001() {
    let mut f = Fixture::start().await;
    let url = f.cluster.ws(0);

    // A frame before connect is refused, and connect still works afterwards.
    let early = Client::open(&url).await.unwrap();
    let e = early
        .request(json!({"op":"join","room":"chat:lobby"}))
        .await
        .unwrap();
    assert_eq!(e["code"], "unauthorized", "{e}");
    let connected = early
        .request(json!({"op":"connect","token":token("dave")}))
        .await
        .unwrap();
    assert_eq!(connected["op"], "connected");

    // Signed with another secret.
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub":"mallory","exp": now() + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret"),
    )
    .unwrap();
    let (e, code) = connect_refused(&url, &forged).await;
    assert_eq!(
        (e["code"].as_str(), code),
        (Some("unauthorized"), Some(4001))
    );
    f.bystander_still_served().await;

    // Unsigned (`alg: none`).
    let unsigned = format!(
        "{}.{}.",
        b64(&json!({"alg":"none","typ":"JWT"})),
        b64(&json!({"sub":"mallory","exp": now() + 3600}))
    );
    let (e, code) = connect_refused(&url, &unsigned).await;
    assert_eq!(
        (e["code"].as_str(), code),
        (Some("unauthorized"), Some(4001))
    );

    // Expired.
    let expired = token_with(json!({"sub":"mallory","exp": now() - 60}));
    let (e, code) = connect_refused(&url, &expired).await;
    assert_eq!(
        (e["code"].as_str(), code),
        (Some("token_expired"), Some(4001))
    );

    // Valid at connect, expiring during the session: `token_expired`, then 4001.
    let (short, _) = Client::connect(&url, &token_with(json!({"sub":"dave","exp": now() + 2})))
        .await
        .unwrap();
    let e = short.recv_op("error", WAIT).await.unwrap();
    assert_eq!(e["code"], "token_expired", "{e}");
    let (disconnect, code, _) = short.closed(WAIT).await.unwrap();
    assert_eq!(code, Some(4001));
    assert_eq!(disconnect.unwrap()["code"], 4001);

    // Garbage in the URL's ?token=.
    let client = Client::open(&format!("{url}?token=garbage")).await.unwrap();
    let (_, code, _) = client.closed(WAIT).await.unwrap();
    assert_eq!(code, Some(4001));
    f.bystander_still_served().await;
}

#[tokio::test]
async fn claims_and_namespace_policy_are_enforced() {
    let mut f = Fixture::start().await;
    let url = f.cluster.ws(0);
    let (limited, _) = Client::connect(
        &url,
        &token_with(json!({"sub":"erin","rooms":["chat:lobby"]})),
    )
    .await
    .unwrap();
    ok(&limited, json!({"op":"join","room":"chat:lobby"})).await;
    let e = refused(
        &limited,
        json!({"op":"join","room":"chat:secret"}),
        "forbidden",
    )
    .await;
    assert!(
        e["message"].as_str().unwrap().contains("chat:secret"),
        "{e}"
    );
    refused(
        &limited,
        json!({"op":"join","room":"user:bob"}),
        "forbidden",
    )
    .await;
    refused(
        &limited,
        json!({"op":"join","room":"games:chess"}),
        "not_found",
    )
    .await;

    // `news` forbids client publishes; the server API may still publish there.
    let reader = connect(&url, "frank").await;
    ok(&reader, json!({"op":"join","room":"news:today"})).await;
    let e = refused(
        &reader,
        json!({"op":"publish","room":"news:today","data":"spam"}),
        "forbidden",
    )
    .await;
    assert!(e["message"].as_str().unwrap().contains("news"), "{e}");
    refused(
        &reader,
        json!({"op":"publish","room":"user:erin","data":"hi"}),
        "forbidden",
    )
    .await;
    f.router
        .publish(PublishRequest {
            room: "news:today".into(),
            data: r#""from the newsroom""#.into(),
            key: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        reader.recv_op("message", WAIT).await.unwrap()["data"],
        "from the newsroom"
    );
    no_more_messages(&reader).await;
    f.bystander_still_served().await;
}

#[tokio::test]
async fn the_router_refuses_bad_arguments() {
    let mut f = Fixture::start().await;
    let e = f
        .router
        .publish(PublishRequest {
            room: "chat:lobby".into(),
            data: "{not json".into(),
            key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("not valid JSON"), "{}", e.message());
    let e = f
        .router
        .publish(PublishRequest {
            room: "chat:lobby".into(),
            data: format!("{}1{}", "{\"a\":".repeat(100), "}".repeat(100)),
            key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("levels deep"), "{}", e.message());
    let e = f
        .router
        .publish(PublishRequest {
            room: "lobby".into(),
            data: "1".into(),
            key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    no_more_messages(&f.bystander).await;
    f.bystander_still_served().await;
}
