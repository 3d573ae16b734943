//! Token verification against HS256 secrets, PEM public keys and JWKS documents.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_auth::{AuthError, Claims, Verifier, mint_hs256, now_secs};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const SECRET: &[u8] = b"test-secret";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn alice() -> Claims {
    Claims {
        sub: "alice".into(),
        exp: now_secs() + 600,
        rooms: None,
        publish: None,
        device: None,
        watch: None,
    }
}

fn private_key(alg: Algorithm, file: &str) -> EncodingKey {
    let pem = fixture(file);
    match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        _ => EncodingKey::from_ed_pem(&pem),
    }
    .unwrap()
}

fn sign(alg: Algorithm, file: &str, kid: Option<&str>, claims: &impl serde::Serialize) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(String::from);
    jsonwebtoken::encode(&header, claims, &private_key(alg, file)).unwrap()
}

fn hs256(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

fn invalid(result: Result<Claims, AuthError>) -> String {
    match result {
        Err(AuthError::Invalid(why)) => why,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn hs_verifier() -> Verifier {
    Verifier::new(Some(SECRET), None).unwrap()
}

#[test]
fn hs256_round_trip_keeps_every_claim() {
    let claims = Claims {
        rooms: Some(vec!["chat:*".into()].into()),
        publish: Some(vec!["chat:lobby".into()].into()),
        device: Some("phone".into()),
        ..alice()
    };
    assert_eq!(
        hs_verifier().verify(&mint_hs256(SECRET, &claims)).unwrap(),
        claims
    );
}

#[test]
fn bad_signature_is_rejected() {
    let token = mint_hs256(b"another-secret", &alice());
    assert_eq!(invalid(hs_verifier().verify(&token)), "bad signature");

    // Same signature, payload swapped for one naming somebody else.
    let good = mint_hs256(SECRET, &alice());
    let parts: Vec<&str> = good.split('.').collect();
    let forged = URL_SAFE_NO_PAD.encode(
        serde_json::to_vec(&Claims {
            sub: "mallory".into(),
            ..alice()
        })
        .unwrap(),
    );
    let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
    assert_eq!(invalid(hs_verifier().verify(&tampered)), "bad signature");
}

#[test]
fn alg_none_is_rejected() {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&alice()).unwrap());
    let token = format!("{header}.{payload}.");
    assert!(invalid(hs_verifier().verify(&token)).contains("alg none"));
}

#[test]
fn garbage_is_rejected() {
    for token in ["", "abc", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.!!.x"] {
        invalid(hs_verifier().verify(token));
    }
}

#[test]
fn expired_token_is_expired() {
    let token = mint_hs256(
        SECRET,
        &Claims {
            exp: now_secs() - 5,
            ..alice()
        },
    );
    assert!(matches!(
        hs_verifier().verify(&token),
        Err(AuthError::Expired)
    ));
}

#[test]
fn missing_or_empty_sub_and_missing_exp_are_rejected() {
    let exp = now_secs() + 600;
    let why = invalid(hs_verifier().verify(&hs256(json!({ "exp": exp }))));
    assert!(why.contains("sub"), "{why}");
    let why = invalid(hs_verifier().verify(&hs256(json!({ "sub": "", "exp": exp }))));
    assert!(why.contains("sub") && why.contains("empty"), "{why}");
    let why = invalid(hs_verifier().verify(&hs256(json!({ "sub": "alice" }))));
    assert!(why.contains("exp"), "{why}");
    let why = invalid(hs_verifier().verify(&hs256(
        json!({ "sub": "alice", "exp": exp, "rooms": "chat:*" }),
    )));
    assert!(why.contains("malformed"), "{why}");
}

#[test]
fn unconfigured_algorithms_are_rejected() {
    let rsa_only = Verifier::new(None, Some(&fixture("rsa_public.pem"))).unwrap();
    let why = invalid(rsa_only.verify(&mint_hs256(SECRET, &alice())));
    assert!(
        why.contains("HS256") && why.contains("not configured"),
        "{why}"
    );

    // The classic confusion: HS256 keyed with the public key the server is known to hold.
    let confused = mint_hs256(&fixture("rsa_public.pem"), &alice());
    invalid(rsa_only.verify(&confused));

    let rs256 = sign(Algorithm::RS256, "rsa_private.pem", None, &alice());
    let why = invalid(hs_verifier().verify(&rs256));
    assert!(
        why.contains("RS256") && why.contains("not configured"),
        "{why}"
    );

    let es256 = sign(Algorithm::ES256, "ec_private.pem", None, &alice());
    invalid(rsa_only.verify(&es256));
}

#[test]
fn pem_public_keys_verify_their_algorithm() {
    for (alg, private, public) in [
        (Algorithm::RS256, "rsa_private.pem", "rsa_public.pem"),
        (Algorithm::ES256, "ec_private.pem", "ec_public.pem"),
        (Algorithm::EdDSA, "ed_private.pem", "ed_public.pem"),
    ] {
        let verifier = Verifier::new(None, Some(&fixture(public))).unwrap();
        let claims = alice();
        // A kid means nothing to a single PEM key, so it must not get in the way.
        for kid in [None, Some("whatever")] {
            let token = sign(alg, private, kid, &claims);
            assert_eq!(verifier.verify(&token).unwrap(), claims, "{alg:?}");
        }
    }
    // Another Ed25519 key pair is not good enough.
    let verifier = Verifier::new(None, Some(&fixture("ed_public.pem"))).unwrap();
    let token = sign(Algorithm::EdDSA, "ed2_private.pem", None, &alice());
    assert_eq!(invalid(verifier.verify(&token)), "bad signature");
}

#[test]
fn secret_and_public_key_together_accept_both() {
    let both = Verifier::new(Some(SECRET), Some(&fixture("ec_public.pem"))).unwrap();
    both.verify(&mint_hs256(SECRET, &alice())).unwrap();
    both.verify(&sign(Algorithm::ES256, "ec_private.pem", None, &alice()))
        .unwrap();
    // Clone + Send + Sync, for sharing across connection tasks.
    fn shareable<T: Clone + Send + Sync>(_: &T) {}
    shareable(&both);
}

fn jwk(alg: Algorithm, private: &str, kid: &str) -> Jwk {
    let mut jwk = Jwk::from_encoding_key(&private_key(alg, private), alg).unwrap();
    jwk.common.key_id = Some(kid.into());
    jwk
}

#[test]
fn jwks_keys_are_selected_by_kid() {
    let set = JwkSet {
        keys: vec![
            jwk(Algorithm::EdDSA, "ed_private.pem", "ed-a"),
            jwk(Algorithm::EdDSA, "ed2_private.pem", "ed-b"),
            jwk(Algorithm::RS256, "rsa_private.pem", "rsa"),
        ],
    };
    let verifier =
        Verifier::new(None, Some(serde_json::to_string(&set).unwrap().as_bytes())).unwrap();

    for (private, kid) in [("ed_private.pem", "ed-a"), ("ed2_private.pem", "ed-b")] {
        let token = sign(Algorithm::EdDSA, private, Some(kid), &alice());
        assert_eq!(verifier.verify(&token).unwrap().sub, "alice");
    }
    let rs = sign(Algorithm::RS256, "rsa_private.pem", Some("rsa"), &alice());
    verifier.verify(&rs).unwrap();

    // Signed by b but claiming to be a: the kid picks a, whose signature check fails.
    let wrong_kid = sign(Algorithm::EdDSA, "ed2_private.pem", Some("ed-a"), &alice());
    assert_eq!(invalid(verifier.verify(&wrong_kid)), "bad signature");
    let unknown = sign(Algorithm::EdDSA, "ed_private.pem", Some("ed-z"), &alice());
    assert!(invalid(verifier.verify(&unknown)).contains("kid ed-z"));
    // Without a kid every key of the algorithm is tried.
    let no_kid = sign(Algorithm::EdDSA, "ed2_private.pem", None, &alice());
    verifier.verify(&no_kid).unwrap();
    // ES256 has no key in this set.
    let es = sign(Algorithm::ES256, "ec_private.pem", None, &alice());
    assert!(invalid(verifier.verify(&es)).contains("not configured"));
}

#[test]
fn bad_key_material_is_refused_at_start_up() {
    let err =
        |secret: Option<&[u8]>, public: Option<&[u8]>| Verifier::new(secret, public).unwrap_err().0;
    assert!(err(None, None).contains("no JWT key"));
    assert!(err(Some(b""), None).contains("empty"));
    assert!(err(None, Some(&fixture("rsa_private.pem"))).contains("private key"));
    assert!(err(None, Some(&fixture("ec384_public.pem"))).contains("P-256"));
    assert!(err(None, Some(b"hello")).contains("neither"));
    assert!(
        err(
            None,
            Some(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
        )
        .contains("PEM")
    );
    assert!(err(None, Some(br#"{"keys":[]}"#)).contains("no signing keys"));
    assert!(
        err(
            None,
            Some(br#"{"keys":[{"kty":"oct","kid":"s","k":"c2VjcmV0"}]}"#)
        )
        .contains("HS256 secret")
    );
    assert!(err(None, Some(b"{not json")).contains("JWKS"));
    let mut mismatched = jwk(Algorithm::RS256, "rsa_private.pem", "rsa");
    mismatched.common.key_algorithm = Some(jsonwebtoken::jwk::KeyAlgorithm::PS256);
    let json = serde_json::to_string(&JwkSet {
        keys: vec![mismatched],
    })
    .unwrap();
    assert!(err(None, Some(json.as_bytes())).contains("PS256"));
}

#[test]
fn tokens_not_valid_yet_or_issued_in_the_future_are_refused() {
    let now = now_secs();
    let exp = now + 600;
    let why = invalid(hs_verifier().verify(&hs256(
        json!({ "sub": "alice", "exp": exp, "nbf": now + 120 }),
    )));
    assert!(why.contains("nbf"), "{why}");
    let why = invalid(hs_verifier().verify(&hs256(
        json!({ "sub": "alice", "exp": exp, "iat": now + 120 }),
    )));
    assert!(why.contains("iat") && why.contains("future"), "{why}");
    let why = invalid(hs_verifier().verify(&hs256(
        json!({ "sub": "alice", "exp": exp, "iat": "yesterday" }),
    )));
    assert!(why.contains("iat"), "{why}");
    // Valid since a moment ago, issued a moment ago: fine.
    let claims = hs_verifier()
        .verify(&hs256(
            json!({ "sub": "alice", "exp": exp, "nbf": now - 1, "iat": now - 1 }),
        ))
        .unwrap();
    assert_eq!(claims.exp, exp);
}

#[test]
fn an_exp_far_away_is_capped_and_a_fractional_one_read() {
    let now = now_secs();
    let day = 24 * 3600;
    for far in [
        json!(u64::MAX),
        json!(1u64 << 63),
        json!(now + 10 * 365 * day),
    ] {
        let claims = hs_verifier()
            .verify(&hs256(json!({ "sub": "alice", "exp": far })))
            .unwrap();
        assert!(
            claims.exp >= now + day && claims.exp <= now_secs() + day,
            "exp {far} is capped at a day from now, got {}",
            claims.exp
        );
    }
    let hour = hs_verifier()
        .with_checks(herald_auth::ClaimChecks {
            max_lifetime: std::time::Duration::from_secs(3600),
            ..Default::default()
        })
        .verify(&hs256(json!({ "sub": "alice", "exp": now + day })))
        .unwrap();
    assert!(hour.exp <= now_secs() + 3600, "{}", hour.exp);
    let frac = hs_verifier()
        .verify(&hs256(
            json!({ "sub": "alice", "exp": (now + 600) as f64 + 0.75 }),
        ))
        .unwrap();
    assert_eq!(
        frac.exp,
        now + 600,
        "RFC 7519 allows a fractional NumericDate"
    );
}

#[test]
fn audience_and_issuer_are_checked_when_configured() {
    let exp = now_secs() + 600;
    let strict = hs_verifier().with_checks(herald_auth::ClaimChecks {
        audience: Some("herald".into()),
        issuer: Some("https://id.example.com".into()),
        ..Default::default()
    });
    let ok =
        json!({ "sub": "alice", "exp": exp, "aud": "herald", "iss": "https://id.example.com" });
    assert_eq!(strict.verify(&hs256(ok.clone())).unwrap().sub, "alice");
    let mut list = ok.clone();
    list["aud"] = json!(["other", "herald"]);
    assert!(
        strict.verify(&hs256(list)).is_ok(),
        "an aud list naming us is fine"
    );

    let mut other_aud = ok.clone();
    other_aud["aud"] = json!("billing");
    let why = invalid(strict.verify(&hs256(other_aud)));
    assert!(why.contains("aud"), "{why}");
    let mut other_iss = ok.clone();
    other_iss["iss"] = json!("https://evil.example.com");
    let why = invalid(strict.verify(&hs256(other_iss)));
    assert!(why.contains("iss"), "{why}");
    let why = invalid(strict.verify(&hs256(json!({ "sub": "alice", "exp": exp }))));
    assert!(why.contains("aud") || why.contains("iss"), "{why}");

    // Without checks configured, whatever aud the identity provider set is not ours to judge.
    assert!(hs_verifier().verify(&hs256(ok)).is_ok());
}

#[test]
fn public_keys_are_replaced_for_every_clone_and_the_secret_stays() {
    let verifier = Verifier::new(Some(SECRET), Some(&fixture("ed_public.pem"))).unwrap();
    let clone = verifier.clone();
    let old = sign(Algorithm::EdDSA, "ed_private.pem", None, &alice());
    let new = sign(Algorithm::EdDSA, "ed2_private.pem", None, &alice());
    clone.verify(&old).unwrap();
    assert_eq!(verifier.set_public(&fixture("ed2_public.pem")).unwrap(), 1);
    clone.verify(&new).unwrap();
    assert!(clone.verify(&old).is_err());
    clone.verify(&mint_hs256(SECRET, &alice())).unwrap();
    // Unusable content keeps the keys in use.
    assert!(verifier.set_public(b"not a key").is_err());
    clone.verify(&new).unwrap();
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Anything a client may present is refused in words, never a panic.
        #[test]
        fn any_text_is_refused_not_a_panic(token in ".{0,200}") {
            prop_assert!(hs_verifier().verify(&token).is_err());
        }

        /// Three dot-separated base64 parts of anything: refused too.
        #[test]
        fn jwt_shaped_garbage_is_refused(
            head in prop::collection::vec(any::<u8>(), 0..80),
            body in prop::collection::vec(any::<u8>(), 0..120),
            sig in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let token = format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(head),
                URL_SAFE_NO_PAD.encode(body),
                URL_SAFE_NO_PAD.encode(sig)
            );
            prop_assert!(hs_verifier().verify(&token).is_err());
        }

        /// Changing any one character of a valid token's payload or
        /// signature makes it invalid.
        #[test]
        fn a_tampered_token_is_refused(at in any::<usize>(), with in prop::sample::select(b"ABCxyz019-_".to_vec())) {
            let token = mint_hs256(SECRET, &alice());
            let first_dot = token.find('.').unwrap();
            let mut bytes = token.into_bytes();
            let i = first_dot + 1 + at % (bytes.len() - first_dot - 1);
            prop_assume!(bytes[i] != b'.' && bytes[i] != with);
            bytes[i] = with;
            let tampered = String::from_utf8(bytes).unwrap();
            prop_assert!(hs_verifier().verify(&tampered).is_err(), "{}", tampered);
        }
    }
}
