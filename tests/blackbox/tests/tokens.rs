//! Token claims checked fully by a real edge (`herald dev`): a token for
//! another audience or from another issuer, or not valid yet, is refused
//! with 4001; an `exp` years away is capped by the session lifetime, which
//! `connected.expires_at` tells the client. Keys rotate without a restart,
//! through a key file and through a JWKS endpoint.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use herald_client::Client;
use herald_test_support::eventually;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/../../crates/auth/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn ed_key(private: &str) -> EncodingKey {
    EncodingKey::from_ed_pem(&fixture(private)).unwrap()
}

/// A token for `sub` signed with an Ed25519 fixture key, naming `kid`.
fn ed_token(private: &str, kid: Option<&str>, sub: &str) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = kid.map(String::from);
    let claims = json!({"sub": sub, "exp": now() + 600});
    jsonwebtoken::encode(&header, &claims, &ed_key(private)).unwrap()
}

fn jwks(keys: &[(&str, &str)]) -> String {
    let keys = keys
        .iter()
        .map(|(private, kid)| {
            let mut jwk = Jwk::from_encoding_key(&ed_key(private), Algorithm::EdDSA).unwrap();
            jwk.common.key_id = Some(kid.to_string());
            jwk
        })
        .collect();
    serde_json::to_string(&JwkSet { keys }).unwrap()
}

async fn connects(url: &str, token: &str) -> bool {
    match Client::connect(url, token).await {
        Ok((_, connected)) => connected["op"] == "connected",
        Err(_) => false,
    }
}

/// Sends `connect` with `token`; returns the error reply, after checking
/// that 4001 followed.
async fn refused_token(url: &str, token: &str) -> Value {
    let client = Client::open(url).await.unwrap();
    let reply = client
        .request(json!({"op":"connect","token":token}))
        .await
        .unwrap();
    assert_eq!(reply["op"], "error", "{reply}");
    let (_, code, _) = client.closed(WAIT).await.unwrap();
    assert_eq!(code, Some(4001), "{reply}");
    reply
}

#[tokio::test]
async fn audience_issuer_and_times_are_checked_and_long_tokens_capped() {
    let dev = Dev::start_with(&[
        "--jwt-audience".into(),
        "herald".into(),
        "--jwt-issuer".into(),
        "https://id.example.com".into(),
        "--max-session-lifetime".into(),
        "1h".into(),
    ]);
    let url = dev.ws();
    let good = json!({"sub":"ann","aud":"herald","iss":"https://id.example.com"});
    let with = |key: &str, value: Value| {
        let mut claims = good.clone();
        match value {
            Value::Null => claims.as_object_mut().unwrap().remove(key),
            v => claims.as_object_mut().unwrap().insert(key.into(), v),
        };
        token_with(claims)
    };

    let e = refused_token(&url, &with("aud", json!("billing"))).await;
    assert_eq!(e["code"], "unauthorized");
    assert!(e["message"].as_str().unwrap().contains("aud"), "{e}");
    let e = refused_token(&url, &with("aud", Value::Null)).await;
    assert!(e["message"].as_str().unwrap().contains("aud"), "{e}");
    let e = refused_token(&url, &with("iss", json!("https://evil.example.com"))).await;
    assert!(e["message"].as_str().unwrap().contains("iss"), "{e}");
    let e = refused_token(&url, &with("nbf", json!(now() + 600))).await;
    assert!(e["message"].as_str().unwrap().contains("nbf"), "{e}");
    let e = refused_token(&url, &with("iat", json!(now() + 600))).await;
    assert!(e["message"].as_str().unwrap().contains("iat"), "{e}");

    // A token valid for ten years holds a session for an hour at most.
    let decade = with("exp", json!(now() + 10 * 365 * 24 * 3600));
    let (client, connected) = Client::connect(&url, &decade).await.unwrap();
    let expires = connected["expires_at"].as_u64().expect("expires_at");
    assert!(
        expires > now() + 3000 && expires <= now() + 3600,
        "{connected}"
    );
    // A refresh is capped the same way.
    let reply = client
        .request(json!({"op":"refresh","token":decade}))
        .await
        .unwrap();
    assert!(
        reply["expires_at"].as_u64().unwrap() <= now() + 3600,
        "{reply}"
    );
    // A fractional exp is a valid NumericDate.
    let frac = with("exp", json!(now() as f64 + 600.5));
    let (_, connected) = Client::connect(&url, &frac).await.unwrap();
    assert_eq!(connected["op"], "connected", "{connected}");
}

#[tokio::test]
async fn a_rotated_key_file_is_used_without_a_restart() {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), fixture("ed_public.pem")).unwrap();
    let dev = Dev::start_with(&["--jwt-public-key".into(), file.path().display().to_string()]);
    let url = dev.ws();
    assert!(connects(&url, &ed_token("ed_private.pem", None, "kim")).await);
    let next = ed_token("ed2_private.pem", None, "kim");
    let e = refused_token(&url, &next).await;
    assert_eq!(e["code"], "unauthorized", "{e}");

    // Replaced whole, the way a rotated Secret is.
    let tmp = file.path().with_extension("new");
    std::fs::write(&tmp, fixture("ed2_public.pem")).unwrap();
    std::fs::rename(&tmp, file.path()).unwrap();
    eventually(Duration::from_secs(15), "the new key to be in use", || {
        let (url, next) = (url.clone(), next.clone());
        async move { connects(&url, &next).await.then_some(()) }
    })
    .await;
    refused_token(&url, &ed_token("ed_private.pem", None, "kim")).await;
}

/// Serves `body` (replaceable) to every HTTP request; counts the requests.
async fn jwks_server(body: Arc<Mutex<String>>, fetches: Arc<AtomicUsize>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let body = body.lock().unwrap().clone();
            fetches.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/.well-known/jwks.json")
}

// Multi-threaded: the JWKS server must answer while `herald dev` starts.
#[tokio::test(flavor = "multi_thread")]
async fn a_jwks_is_fetched_again_for_a_new_kid_and_not_for_every_bad_one() {
    let body = Arc::new(Mutex::new(jwks(&[("ed_private.pem", "a")])));
    let fetches = Arc::new(AtomicUsize::new(0));
    let jwks_url = jwks_server(body.clone(), fetches.clone()).await;
    let dev = Dev::start_with(&["--jwks-url".into(), jwks_url]);
    let url = dev.ws();
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "fetched at start");
    assert!(connects(&url, &ed_token("ed_private.pem", Some("a"), "jo")).await);

    // The provider rotates to key b: the first token naming b is let in.
    *body.lock().unwrap() = jwks(&[("ed2_private.pem", "b")]);
    assert!(connects(&url, &ed_token("ed2_private.pem", Some("b"), "jo")).await);
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        2,
        "one fetch for the new kid"
    );
    let e = refused_token(&url, &ed_token("ed_private.pem", Some("a"), "jo")).await;
    assert!(e["message"].as_str().unwrap().contains("kid a"), "{e}");

    // Made-up kids do not make the edge hammer the provider.
    for kid in ["x1", "x2", "x3", "x4"] {
        refused_token(&url, &ed_token("ed2_private.pem", Some(kid), "jo")).await;
    }
    assert!(fetches.load(Ordering::SeqCst) <= 3, "{fetches:?}");
}
