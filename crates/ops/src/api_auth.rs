//! Who may call the gRPC API. `--api-tokens FILE` lists bearer tokens, one
//! per line with the scopes it holds; a call must carry
//! `authorization: Bearer TOKEN` with the scope its method needs:
//! `publish` (Publish, PublishBatch, SendToUser, History), `presence` (the
//! Presence service), `admin` (Join, Leave, Disconnect, and any method
//! added later until it is given a scope). Health and reflection stay open
//! for probes and tools. The file is read again when it changes, so tokens
//! are rotated without a restart; a file that no longer parses keeps the
//! tokens read before, and says why in the log.
//!
//! Tokens are kept as SHA-256 digests and looked up by digest, so that
//! neither memory dumps nor the timing of a comparison give them away.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// How often the tokens file is read again to see whether it changed.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Publish,
    Presence,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Publish => "publish",
            Scope::Presence => "presence",
            Scope::Admin => "admin",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Scope::Publish => 1,
            Scope::Presence => 2,
            Scope::Admin => 4,
        }
    }

    fn parse(word: &str) -> Option<Scope> {
        match word {
            "publish" => Some(Scope::Publish),
            "presence" => Some(Scope::Presence),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// The scope a gRPC method (`/package.Service/Method`) needs; `None` for
/// the open services (health, reflection).
pub fn scope_of(path: &str) -> Option<Scope> {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    match service {
        "grpc.health.v1.Health" => None,
        s if s.starts_with("grpc.reflection.") => None,
        "herald.v1.Presence" => Some(Scope::Presence),
        "herald.v1.Router" => Some(match method {
            "Publish" | "PublishBatch" | "SendToUser" | "History" => Scope::Publish,
            _ => Scope::Admin,
        }),
        _ => Some(Scope::Admin),
    }
}

/// A tokens file that cannot be used, naming the line.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("{path}: cannot read it")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("line {line}: {why}")]
    Line { line: usize, why: String },
    #[error("no token in it; an empty file would refuse every call")]
    Empty,
}

/// The tokens of one version of the file.
#[derive(Debug, Default)]
pub struct ApiTokens {
    scopes: HashMap<[u8; 32], u8>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl ApiTokens {
    /// Reads `TOKEN SCOPE[,SCOPE...]` lines (scopes separated by commas or
    /// spaces); blank lines and lines starting with `#` are skipped.
    pub fn parse(text: &str) -> Result<ApiTokens, TokensError> {
        let mut scopes = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: String| TokensError::Line { line: i + 1, why };
            let mut words = line.split(|c: char| c.is_whitespace() || c == ',');
            let token = words.next().unwrap_or_default();
            if token.len() < 16 {
                return Err(bad(
                    "the token is shorter than 16 characters; use a long random one".into(),
                ));
            }
            let mut bits = 0u8;
            for word in words.filter(|w| !w.is_empty()) {
                let scope = Scope::parse(word).ok_or_else(|| {
                    bad(format!(
                        "unknown scope `{word}`; scopes are publish, presence and admin"
                    ))
                })?;
                bits |= scope.bit();
            }
            if bits == 0 {
                return Err(bad(
                    "no scope after the token; give publish, presence and/or admin".into(),
                ));
            }
            if scopes.insert(digest(token), bits).is_some() {
                return Err(bad("the same token is listed twice".into()));
            }
        }
        if scopes.is_empty() {
            return Err(TokensError::Empty);
        }
        Ok(ApiTokens { scopes })
    }

    pub fn load(path: &Path) -> Result<ApiTokens, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ApiTokens::parse(&text)
    }

    pub fn len(&self) -> usize {
        self.scopes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }

    /// Whether a call with `authorization` (the header's value, if any)
    /// may use a method needing `scope`.
    pub fn check(&self, authorization: Option<&str>, scope: Scope) -> Result<(), tonic::Status> {
        let Some(value) = authorization else {
            return Err(tonic::Status::unauthenticated(
                "this API needs `authorization: Bearer TOKEN` with a token from the server's --api-tokens file",
            ));
        };
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                tonic::Status::unauthenticated("the authorization header is not `Bearer TOKEN`")
            })?;
        match self.scopes.get(&digest(token)) {
            None => Err(tonic::Status::unauthenticated("unknown API token")),
            Some(bits) if bits & scope.bit() == 0 => Err(tonic::Status::permission_denied(
                format!("this API token lacks the `{}` scope", scope.as_str()),
            )),
            Some(_) => Ok(()),
        }
    }
}

/// The tokens in force, replaced when the file changes.
#[derive(Clone)]
pub struct ApiAuth {
    tokens: Arc<RwLock<Arc<ApiTokens>>>,
}

impl std::fmt::Debug for ApiAuth {
    // How many, never which.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiAuth")
            .field("tokens", &self.current().len())
            .finish()
    }
}

impl ApiAuth {
    /// Loads `path` (an error names what is wrong with it) and reads it
    /// again every [`RELOAD_EVERY`] until `stop`.
    pub fn watch(path: PathBuf, stop: CancellationToken) -> Result<ApiAuth, TokensError> {
        let first = std::fs::read(&path).map_err(|source| TokensError::Read {
            path: path.clone(),
            source,
        })?;
        let tokens = ApiTokens::parse(&String::from_utf8_lossy(&first))?;
        let auth = ApiAuth {
            tokens: Arc::new(RwLock::new(Arc::new(tokens))),
        };
        let shared = auth.clone();
        crate::watch::watch_file(
            path.clone(),
            first,
            RELOAD_EVERY,
            "API tokens file",
            stop,
            move |now| match ApiTokens::parse(&String::from_utf8_lossy(now)) {
                Ok(tokens) => {
                    tracing::info!(path = %path.display(), tokens = tokens.len(), "API tokens reloaded");
                    *shared.tokens.write().expect("api tokens") = Arc::new(tokens);
                }
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "the changed API tokens file is not valid; keeping the tokens read before"
                ),
            },
        );
        Ok(auth)
    }

    /// Fixed tokens, for tests.
    pub fn fixed(tokens: ApiTokens) -> ApiAuth {
        ApiAuth {
            tokens: Arc::new(RwLock::new(Arc::new(tokens))),
        }
    }

    fn current(&self) -> Arc<ApiTokens> {
        self.tokens.read().expect("api tokens").clone()
    }
}

/// The tower layer that checks every call against [`ApiAuth`]; `None`
/// lets every call through (no `--api-tokens`).
#[derive(Clone)]
pub struct ApiAuthLayer(pub Option<ApiAuth>);

impl<S> tower_layer::Layer<S> for ApiAuthLayer {
    type Service = ApiAuthService<S>;

    fn layer(&self, inner: S) -> ApiAuthService<S> {
        ApiAuthService {
            inner,
            auth: self.0.clone(),
        }
    }
}

/// See [`ApiAuthLayer`].
#[derive(Clone)]
pub struct ApiAuthService<S> {
    inner: S,
    auth: Option<ApiAuth>,
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for ApiAuthService<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        if let Some(auth) = &self.auth
            && let Some(scope) = scope_of(req.uri().path())
        {
            let authorization = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if let Err(status) = auth.current().check(authorization, scope) {
                tracing::debug!(method = %req.uri().path(), status = %status.message(), "gRPC call refused");
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUB: &str = "pub-0123456789abcdef";
    const ADMIN: &str = "adm-0123456789abcdef";

    fn tokens() -> ApiTokens {
        ApiTokens::parse(&format!(
            "# backends\n{PUB} publish\n\n{ADMIN} admin, presence publish\n"
        ))
        .unwrap()
    }

    #[test]
    fn methods_need_their_scope_and_probes_none() {
        assert_eq!(scope_of("/herald.v1.Router/Publish"), Some(Scope::Publish));
        assert_eq!(scope_of("/herald.v1.Router/History"), Some(Scope::Publish));
        assert_eq!(
            scope_of("/herald.v1.Router/SendToUser"),
            Some(Scope::Publish)
        );
        assert_eq!(scope_of("/herald.v1.Router/Join"), Some(Scope::Admin));
        assert_eq!(scope_of("/herald.v1.Router/Disconnect"), Some(Scope::Admin));
        assert_eq!(scope_of("/herald.v1.Router/Future"), Some(Scope::Admin));
        assert_eq!(scope_of("/herald.v1.Presence/Watch"), Some(Scope::Presence));
        assert_eq!(scope_of("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            scope_of("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            None
        );
        assert_eq!(scope_of("/other.Service/X"), Some(Scope::Admin));
    }

    #[test]
    fn tokens_are_checked_for_presence_and_scope() {
        let t = tokens();
        assert_eq!(t.len(), 2);
        let bearer = |tok: &str| format!("Bearer {tok}");
        assert!(t.check(Some(&bearer(PUB)), Scope::Publish).is_ok());
        let e = t.check(Some(&bearer(PUB)), Scope::Admin).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("admin"), "{e:?}");
        for scope in [Scope::Publish, Scope::Presence, Scope::Admin] {
            assert!(t.check(Some(&bearer(ADMIN)), scope).is_ok());
        }
        let e = t.check(None, Scope::Publish).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = t
            .check(Some("Bearer not-a-token-we-know"), Scope::Publish)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = t.check(Some(PUB), Scope::Publish).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "no Bearer prefix");
    }

    #[test]
    fn bad_files_name_the_line() {
        let e = ApiTokens::parse("short publish").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("16"), "{e}");
        let e = ApiTokens::parse(&format!("# x\n{PUB} publish write"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("`write`"), "{e}");
        let e = ApiTokens::parse(PUB).unwrap_err().to_string();
        assert!(e.contains("no scope"), "{e}");
        let e = ApiTokens::parse(&format!("{PUB} publish\n{PUB} admin"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("twice"), "{e}");
        let e = ApiTokens::parse("# nothing\n").unwrap_err().to_string();
        assert!(e.contains("no token"), "{e}");
    }
}
