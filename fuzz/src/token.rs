//! `token`: JWT verification (`herald_auth::Verifier::verify`) of any text a
//! client may present at `connect` or `refresh`.
//!
//! Two verifiers read every input: one with an HS256 secret and a JWKS of an
//! RSA, an EC P-256 and an Ed25519 key (chosen by `kid`), one with the
//! secret, an Ed25519 PEM key (any `kid`) and an audience, an issuer and a
//! one-hour session lifetime to check. The keys are the test keys of
//! `crates/auth/tests/fixtures`.
//!
//! Checked, beyond "no panic":
//! - a token verifies only if its header and payload are exactly those of
//!   a token signed here with one of those keys ([`signed`], whose tokens
//!   are the seeds): a change to either (an `alg: none`, another `alg`,
//!   another `kid`, another claim) must break the signature;
//! - verified claims name a user, and expire within the session lifetime.

use std::collections::HashSet;
use std::time::Duration;

use herald_auth::{ClaimChecks, Verifier, now_secs};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub const SECRET: &[u8] = b"herald-fuzz-secret";
pub const AUDIENCE: &str = "herald";
pub const ISSUER: &str = "https://id.example.com";

/// 2100-01-01: the signed tokens verify until then.
const EXP: u64 = 4_102_444_800;
/// 2023-11-14: issued and valid since then.
const PAST: u64 = 1_700_000_000;

/// Inputs longer than this are cut: a token is a header line.
const MAX_LEN: usize = 16 * 1024;

const RSA_PRIVATE: &[u8] = include_bytes!("../../crates/auth/tests/fixtures/rsa_private.pem");
const EC_PRIVATE: &[u8] = include_bytes!("../../crates/auth/tests/fixtures/ec_private.pem");
const ED_PRIVATE: &[u8] = include_bytes!("../../crates/auth/tests/fixtures/ed_private.pem");
const ED_PUBLIC: &[u8] = include_bytes!("../../crates/auth/tests/fixtures/ed_public.pem");

pub struct Target {
    open: Verifier,
    strict: Verifier,
    strict_lifetime: u64,
    /// `header.payload` of every token in [`signed`].
    signed: HashSet<String>,
}

impl Default for Target {
    fn default() -> Target {
        Target::new()
    }
}

impl Target {
    pub fn new() -> Target {
        let jwks = JwkSet {
            keys: vec![
                jwk(Algorithm::RS256, "rsa"),
                jwk(Algorithm::ES256, "ec"),
                jwk(Algorithm::EdDSA, "ed"),
            ],
        };
        let jwks = serde_json::to_vec(&jwks).expect("a JWKS serializes");
        let open = Verifier::new(Some(SECRET), Some(&jwks)).expect("the open verifier");
        let strict_lifetime = 3600;
        let strict = Verifier::new(Some(SECRET), Some(ED_PUBLIC))
            .expect("the strict verifier")
            .with_checks(ClaimChecks {
                audience: Some(AUDIENCE.into()),
                issuer: Some(ISSUER.into()),
                max_lifetime: Duration::from_secs(strict_lifetime),
            });
        let signed = signed()
            .into_iter()
            .map(|(_, token)| signing_input(&token).to_string())
            .collect();
        Target {
            open,
            strict,
            strict_lifetime,
            signed,
        }
    }

    /// Checks one input; returns whether the open and the strict verifier
    /// accepted it.
    pub fn check(&self, data: &[u8]) -> [bool; 2] {
        let data = &data[..data.len().min(MAX_LEN)];
        let token = String::from_utf8_lossy(data);
        let lifetime = ClaimChecks::default().max_lifetime.as_secs();
        let mut accepted = [false; 2];
        for (i, (verifier, lifetime)) in
            [(&self.open, lifetime), (&self.strict, self.strict_lifetime)]
                .into_iter()
                .enumerate()
        {
            let Ok(claims) = verifier.verify(&token) else {
                continue;
            };
            accepted[i] = true;
            assert!(
                self.signed.contains(signing_input(&token)),
                "a token signed by none of the keys verified: {token}"
            );
            assert!(!claims.sub.is_empty(), "verified without a user");
            assert!(
                claims.exp <= now_secs() + lifetime,
                "expires past the session lifetime: {}",
                claims.exp
            );
        }
        accepted
    }
}

/// What a JWT's signature covers: everything before its last dot.
fn signing_input(token: &str) -> &str {
    token.rsplit_once('.').map_or(token, |(input, _)| input)
}

fn private_key(alg: Algorithm) -> EncodingKey {
    match alg {
        Algorithm::HS256 => Ok(EncodingKey::from_secret(SECRET)),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(RSA_PRIVATE),
        Algorithm::ES256 => EncodingKey::from_ec_pem(EC_PRIVATE),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(ED_PRIVATE),
        other => panic!("no test key for {other:?}"),
    }
    .expect("a test key")
}

fn jwk(alg: Algorithm, kid: &str) -> Jwk {
    let mut jwk = Jwk::from_encoding_key(&private_key(alg), alg).expect("a JWK");
    jwk.common.key_id = Some(kid.into());
    jwk
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(String::from);
    jsonwebtoken::encode(&header, claims, &private_key(alg)).expect("signing")
}

/// Tokens signed with the target's keys, by name: those that verify, and
/// those whose signature is right but whose claims are refused.
pub fn signed() -> Vec<(&'static str, String)> {
    let alice = json!({ "sub": "alice", "exp": EXP });
    let full = json!({
        "sub": "alice",
        "exp": EXP,
        "iat": PAST,
        "nbf": PAST,
        "aud": AUDIENCE,
        "iss": ISSUER,
        "rooms": ["chat:*", "doc:team-*"],
        "publish": ["chat:lobby"],
        "device": "phone",
    });
    let with = |patch: Value| {
        let mut claims = full.clone();
        for (k, v) in patch.as_object().expect("an object") {
            if v.is_null() {
                claims.as_object_mut().expect("an object").remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        claims
    };
    let hs = |claims: &Value| sign(Algorithm::HS256, None, claims);
    vec![
        ("hs256-minimal", hs(&alice)),
        ("hs256-full", hs(&full)),
        (
            "hs256-aud-list",
            hs(&with(json!({ "aud": ["other", AUDIENCE] }))),
        ),
        (
            "hs256-exp-fraction",
            hs(&with(json!({ "exp": 4_102_444_800.75 }))),
        ),
        ("hs256-exp-max", hs(&with(json!({ "exp": u64::MAX })))),
        ("hs256-expired", hs(&with(json!({ "exp": PAST })))),
        ("hs256-nbf-future", hs(&with(json!({ "nbf": EXP - 1 })))),
        ("hs256-iat-future", hs(&with(json!({ "iat": EXP - 1 })))),
        ("hs256-iat-text", hs(&with(json!({ "iat": "yesterday" })))),
        ("hs256-sub-empty", hs(&with(json!({ "sub": "" })))),
        ("hs256-no-sub", hs(&with(json!({ "sub": null })))),
        ("hs256-no-exp", hs(&with(json!({ "exp": null })))),
        ("hs256-rooms-text", hs(&with(json!({ "rooms": "chat:*" })))),
        ("hs256-other-aud", hs(&with(json!({ "aud": "billing" })))),
        (
            "hs256-other-iss",
            hs(&with(json!({ "iss": "https://evil.example.com" }))),
        ),
        ("rs256-kid", sign(Algorithm::RS256, Some("rsa"), &full)),
        ("es256-kid", sign(Algorithm::ES256, Some("ec"), &full)),
        ("eddsa-kid", sign(Algorithm::EdDSA, Some("ed"), &full)),
        ("eddsa-no-kid", sign(Algorithm::EdDSA, None, &full)),
        (
            "eddsa-unknown-kid",
            sign(Algorithm::EdDSA, Some("ed-z"), &full),
        ),
        ("rs256-no-kid", sign(Algorithm::RS256, None, &alice)),
    ]
}
