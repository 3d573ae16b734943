//! Token claims checked fully by a real edge (`herald dev`): a token for
//! another audience or from another issuer, or not valid yet, is refused
//! with 4001; an `exp` years away is capped by the session lifetime, which
//! `connected.expires_at` tells the client.

mod common;

use common::*;
use herald_client::Client;
use serde_json::{Value, json};

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
