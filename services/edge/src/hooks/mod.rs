//! The application's hook service (`herald.v1.Hooks`) as the edge calls
//! it: one pool of lazily connected gRPC channels per endpoint, shared by
//! every session; a deadline on every call (the `grpc-timeout` header and
//! a timer of the edge's own, for a service that ignores it); the trace
//! context of the client's request in the call's metadata; a circuit
//! breaker per endpoint (`breaker`); and metrics of every outcome.
//!
//! A call's answer is turned here into a decision the session acts on, or
//! into a failure (timeout, error, unusable reply, breaker open) for which
//! the session applies the hook's `on_failure`. Calls hold only the
//! session that made them: each session waits for its own hook, so a slow
//! hook service holds its own namespace's requests and nothing else.

mod breaker;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use herald_auth::{Claims, HookTarget, Policy};
use herald_broker::chain;
use herald_ops::Metrics;
use herald_ops::metrics::latency_histogram;
use herald_proto::v1::hooks_client::HooksClient;
use herald_proto::v1::{
    HookConnectRequest, HookDeny, HookJoinRequest, HookPublishRequest, hook_connect_reply,
    hook_join_reply, hook_publish_reply,
};
use herald_wire::{CloseCode, ErrorCode, RoomName};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use breaker::Breaker;

/// Channels (HTTP/2 connections) per endpoint; calls take them in turn, so
/// that one connection's flow control or a stream limit does not bound
/// every session's calls.
const CHANNELS: usize = 2;

/// Which hook is called: the `hook` label of the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hook {
    Connect,
    Join,
    Publish,
}

impl Hook {
    const ALL: [Hook; 3] = [Hook::Connect, Hook::Join, Hook::Publish];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Hook::Connect => "connect",
            Hook::Join => "join",
            Hook::Publish => "publish",
        }
    }

    fn method(self) -> &'static str {
        match self {
            Hook::Connect => "OnConnect",
            Hook::Join => "OnJoin",
            Hook::Publish => "OnPublish",
        }
    }
}

/// What a hook that answered decided.
#[derive(Debug)]
pub(crate) enum Decision<A, D> {
    Allow(A),
    Deny(D),
}

/// Why a hook gave no usable answer, in plain words for the client; the
/// log has the cause underneath.
#[derive(Debug, Clone)]
pub(crate) struct Failure(pub String);

/// A connect hook's allow.
#[derive(Debug, Default)]
pub(crate) struct Granted {
    /// Rooms the connection joins before `connected`.
    pub rooms: Vec<RoomName>,
    /// Their presence meta.
    pub meta: Option<Value>,
}

/// A connect hook's deny: how the connection is closed.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub code: CloseCode,
    pub reason: String,
}

/// A publish hook's allow: `Some` when it rewrote the message's `data`.
pub(crate) type Rewrite = Option<Box<RawValue>>;

/// The endpoint named in the configuration cannot be called.
#[derive(Debug, thiserror::Error)]
#[error("hook endpoint {endpoint} is not a URL the edge can call")]
pub struct HookEndpointError {
    endpoint: String,
    #[source]
    source: tonic::transport::Error,
}

/// Every hook endpoint of the configuration, each with its channels and
/// its breaker.
#[derive(Default)]
pub(crate) struct Hooks {
    endpoints: HashMap<String, Pool>,
}

struct Pool {
    clients: Vec<HooksClient<Channel>>,
    next: AtomicUsize,
    breaker: Mutex<Breaker>,
}

impl Hooks {
    /// Channels for every endpoint of `policy` and `connect`. Nothing is
    /// connected yet: the first call connects, so the edge starts (and is
    /// ready) while the hook service is still starting.
    pub(crate) fn new(
        policy: &Policy,
        connect: Option<&HookTarget>,
    ) -> Result<Hooks, HookEndpointError> {
        let mut endpoints = HashMap::new();
        let named = policy
            .hook_endpoints()
            .into_iter()
            .chain(connect.map(|c| c.endpoint.clone()));
        for url in named {
            if endpoints.contains_key(&url) {
                continue;
            }
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|source| HookEndpointError {
                    endpoint: url.clone(),
                    source,
                })?
                .tcp_nodelay(true)
                // A hook service that died without closing its connections
                // is noticed without waiting for each call's timeout.
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5));
            let clients = (0..CHANNELS)
                .map(|_| HooksClient::new(endpoint.connect_lazy()))
                .collect();
            tracing::info!(endpoint = %url, "hooks are called at {url}");
            endpoints.insert(
                url,
                Pool {
                    clients,
                    next: AtomicUsize::new(0),
                    breaker: Mutex::new(Breaker::default()),
                },
            );
        }
        Ok(Hooks { endpoints })
    }

    /// `OnConnect` for a client that proved who it is. `policy` decides
    /// which of the rooms granted are rooms of this server.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn on_connect(
        &self,
        target: &HookTarget,
        policy: &Policy,
        claims: &Claims,
        client: Option<&RawValue>,
        peer: SocketAddr,
        conn: &str,
        node: &str,
    ) -> Result<Decision<Granted, Refusal>, Failure> {
        let request = HookConnectRequest {
            user: claims.sub.clone(),
            claims: serde_json::to_string(claims).unwrap_or_default(),
            client: client.map(|c| c.get().to_string()).unwrap_or_default(),
            remote_addr: peer.to_string(),
            conn: conn.to_string(),
            node: node.to_string(),
        };
        self.call(
            Hook::Connect,
            target,
            request,
            |mut c, r| async move { c.on_connect(r).await },
            |reply| match reply.outcome {
                Some(hook_connect_reply::Outcome::Allow(allow)) => {
                    let granted = granted(policy, allow.rooms, &allow.meta)?;
                    Ok((Decision::Allow(granted), "allowed"))
                }
                Some(hook_connect_reply::Outcome::Deny(deny)) => {
                    Ok((Decision::Deny(refusal(deny.code, deny.reason)), "denied"))
                }
                None => Err(neither(Hook::Connect)),
            },
        )
        .await
    }

    /// `OnJoin`; a deny is the join's `error` code and message.
    pub(crate) async fn on_join(
        &self,
        target: &HookTarget,
        user: &str,
        conn: &str,
        room: &RoomName,
        meta: Option<&Value>,
    ) -> Result<Decision<(), (ErrorCode, String)>, Failure> {
        let request = HookJoinRequest {
            user: user.to_string(),
            conn: conn.to_string(),
            room: room.to_string(),
            meta: meta.map(Value::to_string).unwrap_or_default(),
        };
        self.call(
            Hook::Join,
            target,
            request,
            |mut c, r| async move { c.on_join(r).await },
            |reply| match reply.outcome {
                Some(hook_join_reply::Outcome::Allow(_)) => Ok((Decision::Allow(()), "allowed")),
                Some(hook_join_reply::Outcome::Deny(deny)) => {
                    Ok((Decision::Deny(denial(Hook::Join, deny)), "denied"))
                }
                None => Err(neither(Hook::Join)),
            },
        )
        .await
    }

    /// `OnPublish`; an allow may carry the `data` published instead.
    pub(crate) async fn on_publish(
        &self,
        target: &HookTarget,
        user: &str,
        conn: &str,
        room: &RoomName,
        data: &RawValue,
    ) -> Result<Decision<Rewrite, (ErrorCode, String)>, Failure> {
        let request = HookPublishRequest {
            user: user.to_string(),
            conn: conn.to_string(),
            room: room.to_string(),
            data: data.get().to_string(),
        };
        self.call(
            Hook::Publish,
            target,
            request,
            |mut c, r| async move { c.on_publish(r).await },
            |reply| match reply.outcome {
                Some(hook_publish_reply::Outcome::Allow(allow)) => match allow.data {
                    None => Ok((Decision::Allow(None), "allowed")),
                    Some(data) => match RawValue::from_string(data) {
                        Ok(data) => Ok((Decision::Allow(Some(data)), "rewritten")),
                        Err(e) => Err(format!(
                            "the publish hook rewrote the message into text that is not JSON ({e})"
                        )),
                    },
                },
                Some(hook_publish_reply::Outcome::Deny(deny)) => {
                    Ok((Decision::Deny(denial(Hook::Publish, deny)), "denied"))
                }
                None => Err(neither(Hook::Publish)),
            },
        )
        .await
    }

    /// One call: the breaker's say, the deadline, the trace context, the
    /// metrics. `decode` turns the reply into the decision and its outcome
    /// label, or says why the reply cannot be used.
    async fn call<Req, Resp, Fut, T>(
        &self,
        hook: Hook,
        target: &HookTarget,
        message: Req,
        send: impl FnOnce(HooksClient<Channel>, tonic::Request<Req>) -> Fut,
        decode: impl FnOnce(Resp) -> Result<(T, &'static str), String>,
    ) -> Result<T, Failure>
    where
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let name = hook.name();
        let Some(pool) = self.endpoints.get(&target.endpoint) else {
            // Every configured endpoint has a pool; this is a bug.
            tracing::error!(endpoint = %target.endpoint, "a hook endpoint without channels");
            count(hook, "error");
            return Err(Failure(format!(
                "the {name} hook is not set up on this edge"
            )));
        };
        if !pool.breaker.lock().expect("breaker").admit(Instant::now()) {
            count(hook, "circuit_open");
            return Err(Failure(format!(
                "the {name} hook's service is failing and is left alone for a few seconds"
            )));
        }
        let span = tracing::info_span!(
            target: herald_telemetry::TARGET,
            "hook.call",
            otel.name = %format_args!("herald.v1.Hooks/{}", hook.method()),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = "herald.v1.Hooks",
            rpc.method = hook.method(),
        );
        let mut request = tonic::Request::new(message);
        request.set_timeout(target.timeout);
        herald_telemetry::inject(&span, |key, value| {
            if let (Ok(key), Ok(value)) = (
                tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
                value.parse(),
            ) {
                request.metadata_mut().insert(key, value);
            }
        });
        let at = pool.next.fetch_add(1, Ordering::Relaxed) % pool.clients.len();
        let client = pool.clients[at].clone();
        let started = Instant::now();
        let answer =
            tokio::time::timeout(target.timeout, send(client, request).instrument(span)).await;
        let took = started.elapsed();
        HOOKS
            .duration
            .get_or_create(&HookLabel { hook: name })
            .observe(took.as_secs_f64());
        let timed_out = || {
            Failure(format!(
                "the {name} hook did not answer within {}",
                humane(target.timeout)
            ))
        };
        let (result, outcome) = match answer {
            Err(_) => (Err(timed_out()), "timeout"),
            // The channel enforces the `grpc-timeout` it sends, and says
            // so as `Cancelled`.
            Ok(Err(status))
                if status.code() == tonic::Code::DeadlineExceeded
                    || (status.code() == tonic::Code::Cancelled && took >= target.timeout) =>
            {
                (Err(timed_out()), "timeout")
            }
            Ok(Err(status)) => {
                tracing::warn!(hook = name, endpoint = %target.endpoint, error = %chain(&status), "a hook call failed");
                let why = match status.code() {
                    tonic::Code::Unavailable | tonic::Code::Unknown => {
                        "its service cannot be reached".to_string()
                    }
                    _ => format!("its service answered {:?}", status.code()),
                };
                (
                    Err(Failure(format!("the {name} hook failed: {why}"))),
                    "error",
                )
            }
            Ok(Ok(reply)) => match decode(reply.into_inner()) {
                Ok((decision, outcome)) => (Ok(decision), outcome),
                Err(why) => {
                    tracing::warn!(hook = name, endpoint = %target.endpoint, "a hook's reply cannot be used: {why}");
                    (Err(Failure(why)), "error")
                }
            },
        };
        {
            let mut breaker = pool.breaker.lock().expect("breaker");
            let was_open = breaker.is_open();
            if result.is_ok() {
                breaker.success();
                if was_open {
                    tracing::info!(endpoint = %target.endpoint, "hook service answering again; its calls resume");
                }
            } else {
                breaker.failure(Instant::now());
                if breaker.is_open() && !was_open {
                    tracing::warn!(
                        endpoint = %target.endpoint,
                        "hook service failed {} calls in a row; its hooks fail at once for {}",
                        breaker::FAILURES,
                        humane(breaker::OPEN_FOR)
                    );
                }
            }
        }
        count(hook, outcome);
        result
    }
}

/// The rooms of a connect hook's allow, each a room of this server that a
/// connection may be put in, and their meta.
fn granted(policy: &Policy, rooms: Vec<String>, meta: &str) -> Result<Granted, String> {
    let mut out = Vec::with_capacity(rooms.len());
    for name in rooms {
        let room = RoomName::parse(&name).map_err(|e| {
            format!("the connect hook granted {name:?}, which is not a room name ({e})")
        })?;
        if room.is_personal() {
            return Err(format!(
                "the connect hook granted {room}, a personal room; every connection is in its own already"
            ));
        }
        if policy.namespace(room.namespace()).is_none() {
            return Err(format!(
                "the connect hook granted {room}, but this server has no namespace {}",
                room.namespace()
            ));
        }
        out.push(room);
    }
    let meta = match meta {
        "" => None,
        text => match serde_json::from_str::<Value>(text) {
            Ok(meta @ Value::Object(_)) => Some(meta),
            _ => {
                return Err(format!(
                    "the connect hook's meta is not a JSON object: {text:?}"
                ));
            }
        },
    };
    Ok(Granted { rooms: out, meta })
}

/// A connect deny's close: a catalogue code the client is told of with a
/// `disconnect` frame, or an application code; anything else is 4003.
fn refusal(code: u32, reason: String) -> Refusal {
    let code = u16::try_from(code)
        .ok()
        .and_then(|c| {
            CloseCode::from_code(c)
                .filter(|c| c.announced())
                .or_else(|| CloseCode::application(c))
        })
        .unwrap_or(CloseCode::Forbidden);
    let reason = if reason.is_empty() {
        "the application refused this connection".to_string()
    } else {
        reason
    };
    Refusal { code, reason }
}

/// A join or publish deny: an unknown or empty code is `forbidden`.
fn denial(hook: Hook, deny: HookDeny) -> (ErrorCode, String) {
    let code = ErrorCode::ALL
        .into_iter()
        .find(|c| c.as_str() == deny.code)
        .unwrap_or(ErrorCode::Forbidden);
    let message = if deny.message.is_empty() {
        format!("the application refused this {}", hook.name())
    } else {
        deny.message
    };
    (code, message)
}

fn neither(hook: Hook) -> String {
    format!("the {} hook answered neither allow nor deny", hook.name())
}

/// `500ms`, `2s`: as the configuration writes timeouts.
fn humane(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    hook: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabel {
    hook: &'static str,
}

struct HookMetrics {
    calls: Family<CallLabels, Counter>,
    duration: Family<HookLabel, Histogram, fn() -> Histogram>,
}

/// Process-wide, as the edge's other metrics registered by `metrics`.
static HOOKS: LazyLock<HookMetrics> = LazyLock::new(|| HookMetrics {
    calls: Family::default(),
    duration: Family::new_with_constructor(latency_histogram),
});

const OUTCOMES: [&str; 6] = [
    "allowed",
    "rewritten",
    "denied",
    "timeout",
    "error",
    "circuit_open",
];

fn count(hook: Hook, outcome: &'static str) {
    HOOKS
        .calls
        .get_or_create(&CallLabels {
            hook: hook.name(),
            outcome,
        })
        .inc();
}

/// Registers `herald_hook_calls_total` and `herald_hook_duration_seconds`.
pub(crate) fn register(metrics: &Metrics) {
    let hooks = &*HOOKS;
    // Every series from the start, so that a rate is 0 rather than absent.
    for hook in Hook::ALL {
        for outcome in OUTCOMES {
            drop(hooks.calls.get_or_create(&CallLabels {
                hook: hook.name(),
                outcome,
            }));
        }
    }
    let mut reg = metrics.lock().expect("metrics registry");
    reg.register(
        "hook_calls",
        "Calls of the application's hooks, by hook (connect, join, publish) and outcome (allowed, rewritten, denied, timeout, error, circuit_open)",
        hooks.calls.clone(),
    );
    reg.register(
        "hook_duration_seconds",
        "Time taken by calls of the application's hooks that went out (not those refused by an open circuit breaker), by hook",
        hooks.duration.clone(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_deny_closes_with_an_announced_code() {
        assert_eq!(refusal(4403, "banned".into()).code.code(), 4403);
        assert_eq!(refusal(4001, String::new()).code, CloseCode::Unauthorized);
        assert_eq!(refusal(1013, "x".into()).code, CloseCode::TryAgainLater);
        for odd in [0, 1002, 1007, 3000, 5000, 70_000] {
            assert_eq!(refusal(odd, "x".into()).code, CloseCode::Forbidden, "{odd}");
        }
        assert!(!refusal(4403, String::new()).reason.is_empty());
    }

    #[test]
    fn a_deny_code_is_one_of_the_catalogue() {
        let deny = |code: &str| HookDeny {
            code: code.into(),
            message: String::new(),
        };
        assert_eq!(
            denial(Hook::Join, deny("rate_limited")).0,
            ErrorCode::RateLimited
        );
        assert_eq!(denial(Hook::Join, deny("nope")).0, ErrorCode::Forbidden);
        let (code, message) = denial(Hook::Publish, deny(""));
        assert_eq!(code, ErrorCode::Forbidden);
        assert!(message.contains("publish"), "{message}");
    }

    #[test]
    fn granted_rooms_must_be_rooms_of_this_server() {
        let policy = Policy::open();
        let ok = granted(&policy, vec!["chat:vip".into()], r#"{"tier":"gold"}"#).unwrap();
        assert_eq!(ok.rooms[0].as_str(), "chat:vip");
        assert!(ok.meta.is_some());
        let e = granted(&policy, vec!["no room".into()], "").unwrap_err();
        assert!(e.contains("not a room name"), "{e}");
        let e = granted(&policy, vec!["user:bob".into()], "").unwrap_err();
        assert!(e.contains("personal"), "{e}");
        let e = granted(&policy, vec![], "[1]").unwrap_err();
        assert!(e.contains("not a JSON object"), "{e}");
    }
}
