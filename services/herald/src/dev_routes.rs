//! What `herald dev` serves beside the edge's own routes, on the same port:
//! the demo (`GET /` and its files under `/demo/`), the JavaScript SDK it
//! imports (`GET /sdk/herald.js`), and two shortcuts that a demo needs and
//! a real deployment must not have: `GET /dev/token?sub=NAME` mints a
//! short-lived token, `POST /dev/notify?user=NAME` sends the JSON body to a
//! user's inbox through `Router.SendToUser`. The shortcuts answer only while
//! dev verifies tokens with the built-in development secret, which anyone
//! can read in the source anyway. Cluster edges (`herald edge`) get none of
//! these routes: only `dev` hands them to its edge.

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use herald_proto::v1::SendToUserRequest;
use herald_proto::v1::router_server::Router as _;
use herald_router::RouterApi;
use herald_wire::RoomName;
use serde::Deserialize;

use crate::config::DEV_SECRET;

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The demo's files, embedded so that the binary needs nothing beside it:
/// (path, content type, text).
const FILES: &[(&str, &str, &str)] = &[
    (
        "/",
        HTML,
        include_str!("../../../clients/js/demo/index.html"),
    ),
    (
        "/demo/style.css",
        CSS,
        include_str!("../../../clients/js/demo/style.css"),
    ),
    (
        "/demo/app.js",
        JS,
        include_str!("../../../clients/js/demo/app.js"),
    ),
    (
        "/demo/chat.js",
        JS,
        include_str!("../../../clients/js/demo/chat.js"),
    ),
    (
        "/demo/doc.js",
        JS,
        include_str!("../../../clients/js/demo/doc.js"),
    ),
    (
        "/demo/inbox.js",
        JS,
        include_str!("../../../clients/js/demo/inbox.js"),
    ),
    (
        "/sdk/herald.js",
        JS,
        include_str!("../../../clients/js/dist/herald.js"),
    ),
];

/// How long a `/dev/token` token is valid: short, since the SDK asks for a
/// new one (its `getToken`) before it expires and for every reconnect.
pub const TOKEN_TTL: Duration = Duration::from_secs(15 * 60);

/// Whether each shortcut answers, and if not, why (said in its 404).
#[derive(Clone)]
pub struct Shortcuts {
    tokens: Result<(), &'static str>,
    notify: Result<(), &'static str>,
}

impl Shortcuts {
    /// `/dev/token` only on the development secret; `/dev/notify` also not
    /// when the gRPC API takes only calls with a token, which it would go
    /// around.
    pub fn new(dev_secret: bool, api_tokens: bool) -> Shortcuts {
        if !dev_secret {
            return Shortcuts {
                tokens: Err(
                    "herald dev verifies tokens with the key you gave (--jwt-secret, --jwt-public-key or --jwks-url), \
                     so it mints none; have your own service sign them",
                ),
                notify: Err(
                    "herald dev runs with your own token key, so its shortcuts are off; call Router.SendToUser on the gRPC API",
                ),
            };
        }
        Shortcuts {
            tokens: Ok(()),
            notify: if api_tokens {
                Err(
                    "the gRPC API takes only calls with a token (--api-tokens); call Router.SendToUser with one",
                )
            } else {
                Ok(())
            },
        }
    }

    /// For the start-up lines.
    pub fn summary(&self) -> &'static str {
        match (self.tokens, self.notify) {
            (Ok(()), Ok(())) => {
                "on: GET /dev/token?sub=NAME, POST /dev/notify?user=NAME (development secret; never expose this server)"
            }
            (Ok(()), Err(_)) => {
                "GET /dev/token on (development secret); POST /dev/notify off (--api-tokens)"
            }
            _ => {
                "off: tokens are verified with your own key (/dev/token and /dev/notify answer 404)"
            }
        }
    }
}

#[derive(Clone)]
struct Dev {
    shortcuts: Shortcuts,
    /// The in-process router: `/dev/notify` calls the very method the gRPC
    /// server calls for `Router.SendToUser`.
    router: RouterApi,
}

/// The routes that `herald dev` adds to its edge.
pub fn routes(shortcuts: Shortcuts, router: RouterApi) -> Router {
    let mut app = Router::new();
    for &(path, content_type, text) in FILES {
        app = app.route(
            path,
            get(move || async move {
                (
                    // A rebuilt herald serves the new files at once.
                    [
                        (header::CONTENT_TYPE, content_type),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    text,
                )
            }),
        );
    }
    app.route("/dev/token", get(token))
        .route("/dev/notify", post(notify_user))
        .with_state(Dev { shortcuts, router })
}

/// A plain-text answer, as every error of these routes is.
fn plain(status: StatusCode, text: impl Into<String>) -> Response {
    let mut text = text.into();
    text.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text,
    )
        .into_response()
}

fn json(value: serde_json::Value) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        value.to_string(),
    )
        .into_response()
}

#[derive(Deserialize)]
struct TokenQuery {
    sub: Option<String>,
}

async fn token(State(dev): State<Dev>, Query(q): Query<TokenQuery>) -> Response {
    if let Err(why) = dev.shortcuts.tokens {
        return plain(StatusCode::NOT_FOUND, format!("/dev/token is off: {why}"));
    }
    let sub = q.sub.unwrap_or_default();
    if let Err(e) = user_name(&sub) {
        return plain(StatusCode::BAD_REQUEST, format!("sub: {e}"));
    }
    let exp = herald_auth::now_secs() + TOKEN_TTL.as_secs();
    let claims = herald_auth::Claims {
        sub: sub.clone(),
        exp,
        rooms: None,
        publish: None,
        device: None,
        watch: None,
    };
    let token = herald_auth::mint_hs256(DEV_SECRET.as_bytes(), &claims);
    json(serde_json::json!({ "token": token, "user": sub, "expires_at": exp }))
}

#[derive(Deserialize)]
struct NotifyQuery {
    user: Option<String>,
}

async fn notify_user(
    State(dev): State<Dev>,
    Query(q): Query<NotifyQuery>,
    body: Bytes,
) -> Response {
    if let Err(why) = dev.shortcuts.notify {
        return plain(StatusCode::NOT_FOUND, format!("/dev/notify is off: {why}"));
    }
    let user = q.user.unwrap_or_default();
    if let Err(e) = user_name(&user) {
        return plain(StatusCode::BAD_REQUEST, format!("user: {e}"));
    }
    let data = match std::str::from_utf8(&body)
        .ok()
        .filter(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok())
    {
        Some(text) => text.to_string(),
        None => {
            return plain(
                StatusCode::BAD_REQUEST,
                "the body must be the notification as JSON, e.g. {\"text\":\"hello\"}",
            );
        }
    };
    let request = tonic::Request::new(SendToUserRequest {
        user,
        data,
        key: String::new(),
        notify_after_ms: 0,
    });
    match dev.router.send_to_user(request).await {
        Ok(reply) => {
            let reply = reply.into_inner();
            json(serde_json::json!({ "epoch": reply.epoch, "offset": reply.offset }))
        }
        Err(status) => {
            let code = match status.code() {
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            plain(
                code,
                format!("Router.SendToUser failed: {}", status.message()),
            )
        }
    }
}

/// A user id as tokens and personal rooms take it.
fn user_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("give a user name, e.g. ?sub=alice".into());
    }
    RoomName::user(name).map(|_| ()).map_err(|e| e.to_string())
}
