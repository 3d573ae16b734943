//! JWT verification: turns the token a client presents at `connect` (or `refresh`) into [`Claims`].
//!
//! Only the algorithms the operator configured are accepted, whatever the token's header asks
//! for, so a token can never choose how it is checked (`alg: none`, or HS256 signed with a
//! public key, are the classic ways in).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

/// What a verified token says about its holder. Every connection keeps
/// one, so the optional lists are boxed slices (two words, not three).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Claims {
    /// The user id; never empty once verified.
    pub sub: String,
    /// Expiry, in seconds since the Unix epoch (a fractional `exp` is
    /// rounded down; a verified token's is capped by the session lifetime).
    #[serde(deserialize_with = "whole_seconds")]
    pub exp: u64,
    /// Room patterns the user may join; `None` leaves it to the namespace policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Box<[String]>>,
    /// Room patterns the user may publish to; `None` leaves it to the namespace policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Box<[String]>>,
    /// A free-form device label, for presence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<Box<str>>,
    /// User-id patterns whose online status the holder may `watch`; `None`
    /// allows watching nobody.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<Box<[String]>>,
}

impl Claims {
    /// Whether the holder may watch `user`'s online status; the refusal in
    /// plain words otherwise.
    pub fn may_watch(&self, user: &str) -> Result<(), String> {
        let Some(patterns) = &self.watch else {
            return Err(
                "your token has no `watch` claim: it allows watching no user's status".into(),
            );
        };
        if patterns
            .iter()
            .any(|p| crate::policy::pattern_matches(p, user))
        {
            Ok(())
        } else {
            Err(format!(
                "your token's `watch` claim does not allow watching user {user}"
            ))
        }
    }
}

/// Why a token was refused. Callers map `Expired` to `token_expired` and `Invalid` to
/// `unauthorized`; the text is safe to show to the client.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Bad key material at start-up; the message names the problem.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(pub String);

/// Checks tokens against the keys configured at start-up. Cheap to clone: the keys are shared.
///
/// ```
/// use herald_auth::{Claims, Verifier, mint_hs256, now_secs};
/// let claims = Claims { sub: "alice".into(), exp: now_secs() + 60, rooms: None, publish: None, device: None, watch: None };
/// let verifier = Verifier::new(Some(b"secret"), None).unwrap();
/// assert_eq!(verifier.verify(&mint_hs256(b"secret", &claims)).unwrap(), claims);
/// ```
#[derive(Clone)]
pub struct Verifier {
    /// Replaced whole when the public keys are reloaded.
    keys: Arc<RwLock<Arc<Keys>>>,
    checks: Arc<ClaimChecks>,
    /// Where fresh public keys come from when a token names a `kid` not
    /// known yet (a JWKS endpoint).
    source: Option<Arc<dyn KeySource>>,
}

/// Fetches the current public keys (a JWKS document), for a token whose
/// `kid` is not among the keys held: the identity provider may have rotated.
pub trait KeySource: Send + Sync + 'static {
    /// The keys as a JWKS or PEM document; `None` when they could not be
    /// fetched, or were fetched too recently to ask again.
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Option<Vec<u8>>> + Send + '_>>;
}

/// What is checked of a token beyond its signature, `exp` and `sub`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimChecks {
    /// `aud` must name this (a token without `aud` is refused), when set.
    pub audience: Option<String>,
    /// `iss` must be exactly this, when set.
    pub issuer: Option<String>,
    /// A session lasts at most this long from verification, whatever the
    /// token's `exp` says (an `exp` years away would otherwise let a stolen
    /// token hold a connection for years).
    pub max_lifetime: Duration,
}

impl Default for ClaimChecks {
    /// No audience or issuer; sessions of at most a day.
    fn default() -> ClaimChecks {
        ClaimChecks {
            audience: None,
            issuer: None,
            max_lifetime: Duration::from_secs(24 * 3600),
        }
    }
}

struct Keys {
    hs256: Option<DecodingKey>,
    public: Vec<PublicKey>,
}

struct PublicKey {
    /// `None` for a PEM key, which then serves tokens whatever their `kid`.
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

impl fmt::Debug for Verifier {
    // Key material stays out of logs; which algorithms and kids are configured is what helps.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = self.keys();
        let public: Vec<_> = keys
            .public
            .iter()
            .map(|k| (k.alg, k.kid.as_deref()))
            .collect();
        f.debug_struct("Verifier")
            .field("hs256", &keys.hs256.is_some())
            .field("public", &public)
            .field("checks", &self.checks)
            .finish()
    }
}

impl Verifier {
    /// At least one of the two must be given. `public_key` is the *content* of a file: a PEM
    /// public key (RSA -> RS256, EC P-256 -> ES256, Ed25519 -> EdDSA, detected from the PEM) or a
    /// JWKS JSON document (`{"keys":[...]}`), whose keys are selected by the token header's `kid`;
    /// a token without `kid` is tried against every key of its algorithm.
    pub fn new(
        hs256_secret: Option<&[u8]>,
        public_key: Option<&[u8]>,
    ) -> Result<Verifier, KeyError> {
        let hs256 = match hs256_secret {
            Some([]) => return Err(KeyError("the HS256 secret is empty".into())),
            Some(secret) => Some(DecodingKey::from_secret(secret)),
            None => None,
        };
        let public = match public_key {
            Some(content) => parse_public(content)?,
            None if hs256.is_none() => {
                return Err(KeyError(
                    "no JWT key configured: give an HS256 secret, a public key, or both".into(),
                ));
            }
            None => Vec::new(),
        };
        Ok(Verifier {
            keys: Arc::new(RwLock::new(Arc::new(Keys { hs256, public }))),
            checks: Arc::new(ClaimChecks::default()),
            source: None,
        })
    }

    /// The same keys, checking `checks`.
    pub fn with_checks(self, checks: ClaimChecks) -> Verifier {
        Verifier {
            checks: Arc::new(checks),
            ..self
        }
    }

    /// The same keys, asking `source` for fresh ones when a token names an
    /// unknown `kid` (see [`Verifier::verify_fresh`]).
    pub fn with_source(self, source: Arc<dyn KeySource>) -> Verifier {
        Verifier {
            source: Some(source),
            ..self
        }
    }

    fn keys(&self) -> Arc<Keys> {
        self.keys.read().expect("verifier keys").clone()
    }

    /// Replaces the public keys with those of `content` (PEM or JWKS, as
    /// [`Verifier::new`] takes); the HS256 secret stays. On an error the
    /// keys in use stay. Every clone of this verifier sees the new keys.
    /// Returns how many public keys are now in use.
    pub fn set_public(&self, content: &[u8]) -> Result<usize, KeyError> {
        let public = parse_public(content)?;
        let n = public.len();
        let mut keys = self.keys.write().expect("verifier keys");
        *keys = Arc::new(Keys {
            hs256: keys.hs256.clone(),
            public,
        });
        Ok(n)
    }

    /// [`Verifier::verify`]; when the token names a `kid` no held key has
    /// and a [`KeySource`] is set, fetches the keys once and tries again.
    pub async fn verify_fresh(&self, token: &str) -> Result<Claims, AuthError> {
        match self.verify_inner(token) {
            Err(Refused::UnknownKid(e)) => {
                let Some(source) = &self.source else {
                    return Err(e);
                };
                match source.fetch().await {
                    Some(content) => {
                        if let Err(why) = self.set_public(&content) {
                            tracing::warn!(error = %why, "fetched JWT keys are not usable; keeping the keys in use");
                        }
                        self.verify(token)
                    }
                    None => Err(e),
                }
            }
            other => other.map_err(Refused::into_error),
        }
    }

    /// Verifies the signature with a configured algorithm (`none` is always rejected), `exp`,
    /// `nbf` and `iat` with no leeway (a token not valid yet, or issued in the future, is
    /// refused), `aud` and `iss` when configured, and that `sub` is present and non-empty. The
    /// claims' `exp` comes back capped at the maximum session lifetime from now.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        self.verify_inner(token).map_err(Refused::into_error)
    }

    fn verify_inner(&self, token: &str) -> Result<Claims, Refused> {
        let keys = self.keys();
        let header = peek_header(token)?;
        if header.alg.eq_ignore_ascii_case("none") {
            return Err(invalid("unsigned tokens (alg none) are never accepted").into());
        }
        let alg: Algorithm = header
            .alg
            .parse()
            .map_err(|_| invalid(format!("unknown algorithm {}", header.alg)))?;

        let candidates: Vec<&DecodingKey> = if alg == Algorithm::HS256 {
            keys.hs256.iter().collect()
        } else {
            let kid_fits =
                |k: &PublicKey| k.kid.is_none() || header.kid.is_none() || k.kid == header.kid;
            keys.public
                .iter()
                .filter(|k| k.alg == alg && kid_fits(k))
                .map(|k| &k.key)
                .collect()
        };
        if candidates.is_empty() {
            return Err(match &header.kid {
                Some(kid) if alg != Algorithm::HS256 => Refused::UnknownKid(invalid(format!(
                    "no {alg:?} key with kid {kid} is configured"
                ))),
                _ => invalid(format!(
                    "algorithm {alg:?} is not configured on this server"
                ))
                .into(),
            });
        }

        let mut validation = Validation::new(alg);
        validation.leeway = 0;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &self.checks.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            // No audience is configured, so an `aud` from the identity provider is not ours to judge.
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.checks.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        for key in candidates {
            // Several keys may fit a token without kid: only a signature mismatch means "try the
            // next one"; anything else was found after the signature checked out.
            match jsonwebtoken::decode::<serde_json::Value>(token, key, &validation) {
                Ok(data) => return Ok(self.claims_from(data.claims)?),
                Err(e) if *e.kind() == ErrorKind::InvalidSignature => continue,
                Err(e) => return Err(from_jwt_error(e).into()),
            }
        }
        Err(invalid("bad signature").into())
    }
}

/// Mints an HS256 token (used by `herald token` and by tests).
pub fn mint_hs256(secret: &[u8], claims: &Claims) -> String {
    let key = EncodingKey::from_secret(secret);
    // HMAC takes keys of any length and Claims always serialises, so failure would be a bug.
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key)
        .expect("HS256 signing cannot fail")
}

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> u64 {
    // A clock before 1970 is broken; 0 makes every token look expired rather than panicking.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn invalid(why: impl Into<String>) -> AuthError {
    AuthError::Invalid(why.into())
}

/// A refusal, telling apart the one fresh keys might cure.
enum Refused {
    /// The token names a `kid` (of a public-key algorithm) no held key has.
    UnknownKid(AuthError),
    Other(AuthError),
}

impl From<AuthError> for Refused {
    fn from(e: AuthError) -> Refused {
        Refused::Other(e)
    }
}

impl Refused {
    fn into_error(self) -> AuthError {
        match self {
            Refused::UnknownKid(e) | Refused::Other(e) => e,
        }
    }
}

/// The header fields we decide on, read before jsonwebtoken does, because its `Algorithm` type
/// cannot represent `none` or unknown names and would only say "JSON error".
#[derive(serde::Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

fn peek_header(token: &str) -> Result<RawHeader, AuthError> {
    let malformed = || invalid("not a well-formed JWT (header.payload.signature)");
    let (head, _) = token.split_once('.').ok_or_else(malformed)?;
    let json = URL_SAFE_NO_PAD.decode(head).map_err(|_| malformed())?;
    serde_json::from_slice(&json).map_err(|_| malformed())
}

impl Verifier {
    /// The claims of a token whose signature and standard claims checked out.
    fn claims_from(&self, value: serde_json::Value) -> Result<Claims, AuthError> {
        let now = now_secs();
        // jsonwebtoken does not look at `iat`; a token issued in the future comes from a
        // broken clock or a forger, and is no more valid than one whose `nbf` is ahead.
        match value.get("iat") {
            None => {}
            Some(iat) => match iat.as_f64() {
                Some(iat) if iat <= now as f64 => {}
                Some(_) => return Err(invalid("the token was issued in the future (iat)")),
                None => return Err(invalid("the iat claim is malformed")),
            },
        }
        let mut claims: Claims =
            serde_json::from_value(value).map_err(|e| invalid(format!("malformed claims: {e}")))?;
        if claims.sub.is_empty() {
            return Err(invalid("the sub claim (user id) is empty"));
        }
        claims.exp = claims
            .exp
            .min(now.saturating_add(self.checks.max_lifetime.as_secs()));
        Ok(claims)
    }
}

/// `exp` as whole seconds: RFC 7519 allows a fractional NumericDate.
fn whole_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = <f64 as serde::Deserialize>::deserialize(d)?;
    if v.is_finite() && v >= 0.0 {
        // Saturates at u64::MAX for values beyond it.
        Ok(v.floor() as u64)
    } else {
        Err(serde::de::Error::custom(
            "not a time in seconds since the epoch",
        ))
    }
}

fn from_jwt_error(e: jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => invalid("the token is not valid yet (nbf)"),
        ErrorKind::InvalidAudience => invalid("the token is for another audience (aud)"),
        ErrorKind::InvalidIssuer => invalid("the token is from another issuer (iss)"),
        ErrorKind::InvalidSignature => invalid("bad signature"),
        ErrorKind::MissingRequiredClaim(c) => invalid(format!("the {c} claim is missing")),
        ErrorKind::InvalidClaimFormat(c) => invalid(format!("the {c} claim is malformed")),
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => invalid("not a well-formed JWT"),
        _ => invalid(e.to_string()),
    }
}

fn parse_public(content: &[u8]) -> Result<Vec<PublicKey>, KeyError> {
    let text = std::str::from_utf8(content).unwrap_or("").trim();
    if text.starts_with('{') {
        parse_jwks(text)
    } else if text.starts_with("-----BEGIN") {
        parse_pem(text).map(|key| vec![key])
    } else {
        Err(KeyError(
            "the public key is neither a PEM public key nor a JWKS JSON document".into(),
        ))
    }
}

fn parse_pem(pem: &str) -> Result<PublicKey, KeyError> {
    // jsonwebtoken would take a private key here too; that is a deployment mistake worth naming.
    if pem.contains("PRIVATE KEY-----") {
        return Err(KeyError(
            "the public key file holds a private key; give its public half".into(),
        ));
    }
    let bytes = pem.as_bytes();
    let (alg, key) = if let Ok(key) = DecodingKey::from_rsa_pem(bytes) {
        (Algorithm::RS256, key)
    } else if let Ok(key) = DecodingKey::from_ec_pem(bytes) {
        // An uncompressed P-256 point is 65 bytes; other curves would need other algorithms.
        if key.try_get_as_bytes().map(<[u8]>::len) != Ok(65) {
            return Err(KeyError(
                "the EC public key is not on curve P-256 (ES256)".into(),
            ));
        }
        (Algorithm::ES256, key)
    } else if let Ok(key) = DecodingKey::from_ed_pem(bytes) {
        (Algorithm::EdDSA, key)
    } else {
        return Err(KeyError(
            "the PEM is not an RSA, EC P-256 or Ed25519 public key".into(),
        ));
    };
    Ok(PublicKey {
        kid: None,
        alg,
        key,
    })
}

fn parse_jwks(json: &str) -> Result<Vec<PublicKey>, KeyError> {
    let set: JwkSet = serde_json::from_str(json)
        .map_err(|e| KeyError(format!("the JWKS document is invalid: {e}")))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        // Identity providers publish encryption keys in the same set; they verify nothing.
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            continue;
        }
        let kid = jwk.common.key_id.clone();
        let name = kid.clone().unwrap_or_else(|| format!("#{i} (no kid)"));
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                Algorithm::EdDSA
            }
            AlgorithmParameters::OctetKey(_) => {
                return Err(KeyError(format!(
                    "JWKS key {name} is a shared secret; configure the HS256 secret instead"
                )));
            }
            _ => {
                return Err(KeyError(format!(
                    "JWKS key {name} is not an RSA, EC P-256 or Ed25519 key"
                )));
            }
        };
        if let Some(declared) = jwk.common.key_algorithm
            && Algorithm::try_from(declared).ok() != Some(alg)
        {
            return Err(KeyError(format!(
                "JWKS key {name} declares alg {declared}; only {alg:?} is supported for this key"
            )));
        }
        let key =
            DecodingKey::from_jwk(jwk).map_err(|e| KeyError(format!("JWKS key {name}: {e}")))?;
        keys.push(PublicKey { kid, alg, key });
    }
    if keys.is_empty() {
        return Err(KeyError("the JWKS document has no signing keys".into()));
    }
    Ok(keys)
}
