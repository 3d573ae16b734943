//! The keys client tokens are verified with, kept current without a
//! restart: a `--jwt-public-key` file is read again when it changes, and a
//! `--jwks-url` is fetched at start, every `--jwks-refresh`, and when a
//! token names a `kid` not held yet (at most once every [`REFETCH_GAP`]).
//! A reload that fails keeps the keys in use and says why in the log.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_auth::{KeySource, Verifier};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use crate::cli::Keys;
use crate::config::{ConfigError, DEV_SECRET};

/// How often a key file is looked at.
const FILE_EVERY: Duration = Duration::from_secs(2);
/// The least time between two fetches of a JWKS for unknown `kid`s, so that
/// tokens with made-up `kid`s cannot make the edge hammer the endpoint.
pub const REFETCH_GAP: Duration = Duration::from_secs(5);
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest JWKS document taken.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// The token verifier of `--jwt-secret`, `--jwt-public-key` or
/// `--jwks-url`, with the audience, issuer and session-lifetime checks, and
/// its keys watched until `stop`. `dev_default` lets `herald dev` fall back
/// to the development secret; every other service needs a key.
pub async fn verifier(
    keys: &Keys,
    dev_default: bool,
    stop: &CancellationToken,
) -> Result<Verifier, ConfigError> {
    if keys.jwt_public_key.is_some() && keys.jwks_url.is_some() {
        return Err(ConfigError::new(
            "--jwt-public-key and --jwks-url both give the public keys; choose one",
        ));
    }
    let jwks = match &keys.jwks_url {
        Some(url) => Some(Jwks::new(url)?),
        None => None,
    };
    let public = match (&keys.jwt_public_key, &jwks) {
        (Some(path), _) => Some(std::fs::read(path).map_err(|e| {
            ConfigError::caused(
                format!("--jwt-public-key {}: cannot read it", path.display()),
                e,
            )
        })?),
        (None, Some(jwks)) => Some(jwks.get().await.map_err(|e| {
            ConfigError::caused(
                format!("--jwks-url {}: could not fetch the keys", jwks.url),
                e,
            )
        })?),
        (None, None) => None,
    };
    let secret = match (&keys.jwt_secret, &public) {
        (Some(s), _) => Some(s.clone()),
        (None, None) if dev_default => Some(DEV_SECRET.to_string()),
        (None, None) => {
            return Err(ConfigError::new(
                "no JWT key: give --jwt-secret (HS256), --jwt-public-key FILE (RS256, ES256, EdDSA or JWKS) or --jwks-url URL",
            ));
        }
        (None, Some(_)) => None,
    };
    if keys.max_session_lifetime.is_zero() {
        return Err(ConfigError::new(
            "--max-session-lifetime must be longer than zero",
        ));
    }
    let flag = match (&keys.jwt_public_key, &keys.jwks_url) {
        (Some(_), _) => "--jwt-public-key",
        (None, Some(_)) => "--jwks-url",
        _ => "--jwt-secret",
    };
    let mut verifier = Verifier::new(secret.as_deref().map(str::as_bytes), public.as_deref())
        .map_err(|e| ConfigError::caused(flag, e))?
        .with_checks(herald_auth::ClaimChecks {
            audience: keys.jwt_audience.clone().filter(|a| !a.is_empty()),
            issuer: keys.jwt_issuer.clone().filter(|i| !i.is_empty()),
            max_lifetime: keys.max_session_lifetime,
        });
    if let Some(path) = &keys.jwt_public_key {
        let (shown, keys) = (path.display().to_string(), verifier.clone());
        herald_ops::watch_file(
            path.clone(),
            public.unwrap_or_default(),
            FILE_EVERY,
            "JWT public key file",
            stop.clone(),
            move |now| match keys.set_public(now) {
                Ok(n) => tracing::info!(path = %shown, keys = n, "JWT public keys reloaded"),
                Err(e) => {
                    tracing::warn!(path = %shown, error = %e, "the changed JWT public key file is not usable; keeping the keys in use")
                }
            },
        );
    }
    if let Some(jwks) = jwks {
        let jwks = Arc::new(jwks);
        verifier = verifier.with_source(jwks.clone());
        tokio::spawn(refresh_jwks(
            jwks,
            keys.jwks_refresh,
            verifier.clone(),
            stop.clone(),
        ));
    }
    Ok(verifier)
}

/// Fetches the JWKS every `every` and puts its keys in use.
async fn refresh_jwks(
    jwks: Arc<Jwks>,
    every: Duration,
    verifier: Verifier,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match jwks.get().await {
            Ok(content) => match verifier.set_public(&content) {
                Ok(n) => tracing::debug!(url = %jwks.url, keys = n, "JWKS refreshed"),
                Err(e) => {
                    tracing::warn!(url = %jwks.url, error = %e, "the JWKS is not usable; keeping the keys in use")
                }
            },
            Err(e) => {
                tracing::warn!(url = %jwks.url, error = %e, "could not refresh the JWKS; keeping the keys in use")
            }
        }
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A JWKS endpoint.
struct Jwks {
    url: hyper::Uri,
    client: HttpsClient,
    /// When a fetch for an unknown `kid` last went out.
    last_asked: Mutex<Option<Instant>>,
}

/// Why a JWKS could not be fetched.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the request failed")]
    Request(#[source] hyper_util::client::legacy::Error),
    #[error("the server answered HTTP {0}")]
    Status(hyper::StatusCode),
    #[error("the answer could not be read, or is over {MAX_JWKS_BYTES} bytes")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Jwks {
    fn new(url: &str) -> Result<Jwks, ConfigError> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| ConfigError::caused(format!("--jwks-url {url}: not a URL"), e))?;
        if !matches!(uri.scheme_str(), Some("https" | "http")) {
            return Err(ConfigError::new(format!(
                "--jwks-url {url}: give an https:// (or http://) URL"
            )));
        }
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| {
                ConfigError::caused("--jwks-url: no CA certificates to check the server with", e)
            })?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Jwks {
            url: uri,
            client: Client::builder(TokioExecutor::new()).build(https),
            last_asked: Mutex::new(None),
        })
    }

    async fn get(&self) -> Result<Vec<u8>, FetchError> {
        let fetch = async {
            let response = self
                .client
                .get(self.url.clone())
                .await
                .map_err(FetchError::Request)?;
            if !response.status().is_success() {
                return Err(FetchError::Status(response.status()));
            }
            let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(FetchError::Body)?;
            Ok(body.to_bytes().to_vec())
        };
        tokio::time::timeout(FETCH_TIMEOUT, fetch)
            .await
            .map_err(|_| FetchError::Timeout(FETCH_TIMEOUT))?
    }
}

impl KeySource for Jwks {
    fn fetch(&self) -> std::pin::Pin<Box<dyn Future<Output = Option<Vec<u8>>> + Send + '_>> {
        Box::pin(async move {
            {
                let mut last = self.last_asked.lock().expect("jwks");
                if last.is_some_and(|t| t.elapsed() < REFETCH_GAP) {
                    return None;
                }
                *last = Some(Instant::now());
            }
            match self.get().await {
                Ok(content) => {
                    tracing::info!(url = %self.url, "fetched the JWKS for a token with an unknown kid");
                    Some(content)
                }
                Err(e) => {
                    tracing::warn!(url = %self.url, error = %e, "could not fetch the JWKS for a token with an unknown kid");
                    None
                }
            }
        })
    }
}
