//! Authorisation: whether a verified user may join or publish to a room, decided from the token's
//! claims and the namespace policy of the configuration file.
//!
//! Both must agree: the namespace says what anyone may do, the token can only narrow it.

use std::collections::HashMap;
use std::time::Duration;

use crate::limits::{RateLimits, RateOverrides};
use crate::token::Claims;

/// The namespace of personal rooms, `user:<id>`; its rules are built in, not configurable.
const USER: &str = "user";

/// A namespace's policy, as written in the config file under `[namespaces.<name>]`.
///
/// ```
/// # use herald_auth::NamespacePolicy;
/// let p: NamespacePolicy = toml::from_str("publish = false\njoin = [\"news:*\"]").unwrap();
/// assert!(p.presence && !p.publish);
/// ```
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NamespacePolicy {
    /// The room keeps presence (member lists).
    #[serde(default = "yes")]
    pub presence: bool,
    /// Join, leave and update events are sent to members.
    #[serde(default = "yes")]
    pub presence_events: bool,
    /// Clients may publish (the server API always may).
    #[serde(default = "yes")]
    pub publish: bool,
    /// Full room patterns in this namespace that anyone authenticated may join.
    #[serde(default = "any")]
    pub join: Vec<String>,
    /// History kept for the namespace's rooms; reserved for durable rooms.
    #[serde(default)]
    pub durable: Option<DurablePolicy>,
    /// Live `message` frames carry the W3C `traceparent` of their publish
    /// (when it is in a sampled trace), so a client's own telemetry can
    /// join the trace.
    #[serde(default)]
    pub traceparent: bool,
    /// Request rates that replace `[limits]`'s for this namespace's rooms.
    #[serde(default)]
    pub limits: RateOverrides,
    /// The application's hook service, asked before joins and publishes.
    #[serde(default)]
    pub hooks: Option<NamespaceHooks>,
    /// Which events of this namespace's rooms go to the event feed (none by
    /// default). Connections belong to no namespace: `[feed] connections`.
    #[serde(default)]
    pub feed: Vec<FeedKind>,
}

/// A client request of a namespace that its hook service may decide on.
#[derive(Debug, Clone, Copy, serde::Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum HookName {
    Join,
    Publish,
}

/// What a request gets when its hook does not answer in time, fails, or
/// its circuit breaker is open.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Refused with `unavailable` (a connect: closed with 1013, reconnect).
    #[default]
    Deny,
    /// Served as if the hook had allowed it.
    Allow,
}

/// Where a hook is called, how long it may take, and what a failure means;
/// `[connect_hook]` as written in the config file.
///
/// ```
/// # use herald_auth::{HookTarget, OnFailure};
/// let t: HookTarget = toml::from_str("endpoint = \"http://127.0.0.1:7000\"").unwrap();
/// assert_eq!(t.timeout, std::time::Duration::from_millis(500));
/// assert_eq!(t.on_failure, OnFailure::Deny);
/// ```
#[derive(Debug, Clone, serde::Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct HookTarget {
    /// `http://host:port` of the application's `herald.v1.Hooks` service.
    #[serde(deserialize_with = "hook_endpoint")]
    pub endpoint: String,
    /// A humane duration such as `"500ms"`; 500 ms when not given.
    #[serde(default = "hook_timeout", deserialize_with = "hook_duration")]
    pub timeout: Duration,
    #[serde(default)]
    pub on_failure: OnFailure,
}

/// A namespace's `hooks = { endpoint, on, timeout, on_failure }`.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceHooks {
    #[serde(deserialize_with = "hook_endpoint")]
    pub endpoint: String,
    /// Which requests are asked about: `"join"`, `"publish"`.
    pub on: Vec<HookName>,
    #[serde(default = "hook_timeout", deserialize_with = "hook_duration")]
    pub timeout: Duration,
    #[serde(default)]
    pub on_failure: OnFailure,
}

impl NamespaceHooks {
    pub fn target(&self) -> HookTarget {
        HookTarget {
            endpoint: self.endpoint.clone(),
            timeout: self.timeout,
            on_failure: self.on_failure,
        }
    }
}

fn hook_timeout() -> Duration {
    Duration::from_millis(500)
}

/// The longest hook timeout: a hook holds its client's requests (they are
/// answered in order) for as long as it may take.
const MAX_HOOK_TIMEOUT: Duration = Duration::from_secs(60);

fn hook_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    use serde::de::Error;
    let text = <String as serde::Deserialize>::deserialize(d)?;
    let t = humantime::parse_duration(&text).map_err(|e| {
        D::Error::custom(format!(
            "hook timeout {text:?} is not a duration ({e}); write e.g. \"500ms\" or \"2s\""
        ))
    })?;
    if t.is_zero() || t > MAX_HOOK_TIMEOUT {
        return Err(D::Error::custom(format!(
            "hook timeout {text:?} must be more than 0 and at most 60s"
        )));
    }
    Ok(t)
}

fn hook_endpoint<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(d)?;
    check_endpoint(&text).map_err(serde::de::Error::custom)?;
    Ok(text)
}

/// A hook endpoint is `http://host:port` (a trailing `/` allowed): the
/// edge calls it as a gRPC server, so no path, query or credentials.
fn check_endpoint(url: &str) -> Result<(), String> {
    let example = "write it as \"http://host:port\", e.g. \"http://127.0.0.1:7000\"";
    let Some(rest) = url.strip_prefix("http://") else {
        let why = if url.starts_with("https://") {
            "https:// is not supported for hooks; reach the hook service over a private network"
        } else {
            "it must start with http://"
        };
        return Err(format!("hook endpoint {url:?}: {why}; {example}"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let bad = |why: &str| Err(format!("hook endpoint {url:?}: {why}; {example}"));
    if authority.is_empty() {
        return bad("it names no host");
    }
    if authority.contains(['/', '?', '#', '@', ' ']) {
        return bad("it may hold only a host and a port, no path, query or user");
    }
    // `[::1]:7000`: the port follows the bracket, the host's colons are its own.
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, port)) => match port.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return bad("an IPv6 address in brackets is followed by :port or nothing"),
            },
            None => return bad("an IPv6 address opened with [ is not closed with ]"),
        },
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return bad(&format!("port {port:?} is not a number from 0 to 65535"));
    }
    if host.is_empty() {
        return bad("it names no host");
    }
    Ok(())
}

/// An event kind a namespace sends to the event feed.
#[derive(Debug, Clone, Copy, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FeedKind {
    /// Client publishes (and the server API's).
    Publish,
    /// Connections joining and leaving rooms.
    Presence,
}

/// How much history a durable namespace keeps.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DurablePolicy {
    pub history_size: u64,
    /// A humane duration such as `"24h"`, parsed where durations are configured.
    pub history_ttl: String,
}

fn yes() -> bool {
    true
}

fn any() -> Vec<String> {
    vec!["*".into()]
}

impl Default for NamespacePolicy {
    /// Open: presence, events and publishing on, anyone may join, nothing kept.
    fn default() -> Self {
        NamespacePolicy {
            presence: true,
            presence_events: true,
            publish: true,
            join: any(),
            durable: None,
            traceparent: false,
            limits: RateOverrides::default(),
            hooks: None,
            feed: Vec::new(),
        }
    }
}

/// Why a join or publish was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Denied {
    /// A config file is loaded and names no such namespace.
    UnknownNamespace(String),
    /// A plain-words reason that names the room.
    Forbidden(String),
}

impl Denied {
    /// Text for the client's `error` frame.
    pub fn message(&self) -> String {
        match self {
            Denied::UnknownNamespace(ns) => format!("there is no namespace {ns} on this server"),
            Denied::Forbidden(why) => why.clone(),
        }
    }
}

/// Every namespace's policy, fixed at start-up.
///
/// ```
/// # use herald_auth::{Claims, Policy};
/// let alice = Claims { sub: "alice".into(), exp: 0, rooms: None, publish: None, device: None, watch: None };
/// let policy = Policy::open();
/// assert!(policy.check_join(&alice, "chat:lobby").is_ok());
/// assert!(policy.check_join(&alice, "user:bob").is_err());
/// ```
#[derive(Debug, Clone)]
pub struct Policy {
    /// `None` without a config file: every namespace then gets `open`.
    namespaces: Option<HashMap<String, NamespacePolicy>>,
    open: NamespacePolicy,
    user: NamespacePolicy,
    /// `[limits]`: request rates where a namespace does not override them.
    limits: RateLimits,
    /// Namespaces missing from `namespaces` get `open` instead of being unknown.
    rest_open: bool,
}

impl Policy {
    /// No config file: every namespace allows join, client publish and presence.
    pub fn open() -> Policy {
        Policy {
            namespaces: None,
            open: NamespacePolicy::default(),
            user: user_policy(),
            limits: RateLimits::default(),
            rest_open: true,
        }
    }

    /// No config file, yet a few namespaces with a policy of their own
    /// (`herald dev`'s durable demo namespace): those as given, every other
    /// namespace open. Checked as [`Policy::from_namespaces`] checks them.
    ///
    /// ```
    /// # use herald_auth::{DurablePolicy, NamespacePolicy, Policy};
    /// let doc = NamespacePolicy {
    ///     durable: Some(DurablePolicy { history_size: 10, history_ttl: "1h".into() }),
    ///     ..NamespacePolicy::default()
    /// };
    /// let policy = Policy::open_with([("doc".to_string(), doc)].into()).unwrap();
    /// assert!(policy.is_durable("doc") && !policy.is_durable("chat"));
    /// assert!(policy.namespace("chat").is_some());
    /// ```
    pub fn open_with(named: HashMap<String, NamespacePolicy>) -> Result<Policy, String> {
        Ok(Policy {
            rest_open: true,
            ..Policy::from_namespaces(named)?
        })
    }

    /// From a config file's namespaces. Errors (in plain words naming the namespace) when a
    /// namespace is called `user` (reserved), or a join pattern is empty or can never match a
    /// room of its namespace.
    pub fn from_namespaces(ns: HashMap<String, NamespacePolicy>) -> Result<Policy, String> {
        // Sorted, so that the same bad file always gets the same message.
        let mut names: Vec<&String> = ns.keys().collect();
        names.sort();
        for name in names {
            if name == USER {
                return Err(
                    "namespace user is reserved for personal rooms (user:<id>); \
                            remove [namespaces.user] from the config"
                        .into(),
                );
            }
            if name.is_empty() || name.contains(':') {
                return Err(format!(
                    "namespace name {name:?} must be non-empty and contain no ':'"
                ));
            }
            for pattern in &ns[name].join {
                if pattern.is_empty() {
                    return Err(format!("namespace {name}: a join pattern is empty"));
                }
                if !can_match_in(pattern, name) {
                    return Err(format!(
                        "namespace {name}: join pattern {pattern:?} can never match one of its rooms; \
                         patterns are full room names such as \"{name}:lobby\", \"{name}:*\" or \"*\""
                    ));
                }
            }
        }
        for (name, hooks) in ns.iter().filter_map(|(n, p)| Some((n, p.hooks.as_ref()?))) {
            if hooks.on.is_empty() {
                return Err(format!(
                    "namespace {name}: hooks.on names no hook; write on = [\"join\"], [\"publish\"] or [\"join\", \"publish\"]"
                ));
            }
        }
        Ok(Policy {
            namespaces: Some(ns),
            rest_open: false,
            ..Policy::open()
        })
    }

    /// The policy for `namespace`, or `None` when a config file is loaded and does not name it.
    /// `user` always has its built-in policy: presence without events, no client publish, no join
    /// patterns (its owner is let in by [`Policy::check_join`]).
    pub fn namespace(&self, namespace: &str) -> Option<&NamespacePolicy> {
        if namespace == USER {
            return Some(&self.user);
        }
        match &self.namespaces {
            None => Some(&self.open),
            Some(map) => map.get(namespace).or(self.rest_open.then_some(&self.open)),
        }
    }

    /// Whether rooms of `namespace` keep history: configured `durable`, or the
    /// personal namespace (every user's offline inbox).
    pub fn is_durable(&self, namespace: &str) -> bool {
        namespace == USER
            || self
                .namespace(namespace)
                .is_some_and(|p| p.durable.is_some())
    }

    /// `[limits]` from the config file (over the defaults); checked.
    pub fn with_limits(mut self, over: &RateOverrides) -> Result<Policy, String> {
        self.limits = RateLimits::default().with(over);
        self.limits.check("[limits]")?;
        if let Some(map) = &self.namespaces {
            let mut names: Vec<&String> = map.keys().collect();
            names.sort();
            for name in names {
                self.limits
                    .with(&map[name].limits)
                    .check(&format!("[namespaces.{name}.limits]"))?;
            }
        }
        Ok(self)
    }

    /// The request rates for rooms of `namespace`.
    pub fn rates(&self, namespace: &str) -> RateLimits {
        match self.namespace(namespace) {
            Some(p) => self.limits.with(&p.limits),
            None => self.limits,
        }
    }

    /// Whether live `message` frames of `namespace` carry their `traceparent`.
    pub fn sends_traceparent(&self, namespace: &str) -> bool {
        self.namespace(namespace).is_some_and(|p| p.traceparent)
    }

    /// Where `hook` of `namespace` is called, when that namespace has it.
    pub fn hook(&self, namespace: &str, hook: HookName) -> Option<HookTarget> {
        self.namespace(namespace)?
            .hooks
            .as_ref()
            .filter(|h| h.on.contains(&hook))
            .map(NamespaceHooks::target)
    }

    /// Every hook endpoint the namespaces name, each once.
    pub fn hook_endpoints(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .namespaces
            .iter()
            .flat_map(|map| map.values())
            .filter_map(|p| Some(p.hooks.as_ref()?.endpoint.clone()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Whether `namespace` sends events of `kind` to the event feed.
    pub fn feeds(&self, namespace: &str, kind: FeedKind) -> bool {
        self.namespace(namespace)
            .is_some_and(|p| p.feed.contains(&kind))
    }

    /// The namespaces that send events of `kind` to the event feed.
    pub fn feed_namespaces(&self, kind: FeedKind) -> Vec<String> {
        self.namespaces
            .iter()
            .flat_map(|map| map.iter())
            .filter(|(_, p)| p.feed.contains(&kind))
            .map(|(ns, _)| ns.clone())
            .collect()
    }

    /// Whether any namespace sends anything to the event feed.
    pub fn any_feed(&self) -> bool {
        self.namespaces
            .as_ref()
            .is_some_and(|m| m.values().any(|p| !p.feed.is_empty()))
            || !self.open.feed.is_empty()
    }

    /// Every durable namespace and how much it keeps, the personal namespace
    /// (the inbox: `inbox` limits) included.
    pub fn durable_namespaces(&self, inbox: &DurablePolicy) -> Vec<(String, DurablePolicy)> {
        let mut out = vec![(USER.to_string(), inbox.clone())];
        if let Some(map) = &self.namespaces {
            let mut named: Vec<_> = map
                .iter()
                .filter_map(|(ns, p)| p.durable.clone().map(|d| (ns.clone(), d)))
                .collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            out.extend(named);
        }
        out
    }

    /// May `claims` join `room`, a full room name `namespace:name` already validated by the caller?
    pub fn check_join(&self, claims: &Claims, room: &str) -> Result<&NamespacePolicy, Denied> {
        let (ns, name) = room.split_once(':').unwrap_or((room, ""));
        if ns == USER {
            // The owner rejoins to recover the inbox; token room patterns do not apply to it.
            return if name == claims.sub {
                Ok(&self.user)
            } else {
                Err(Denied::Forbidden(format!(
                    "{room} is another user's personal room; only its owner may join it"
                )))
            };
        }
        let policy = self
            .namespace(ns)
            .ok_or_else(|| Denied::UnknownNamespace(ns.into()))?;
        if !policy.join.iter().any(|p| pattern_matches(p, room)) {
            return Err(Denied::Forbidden(format!(
                "namespace {ns} does not allow joining {room}"
            )));
        }
        if let Some(allowed) = &claims.rooms
            && !allowed.iter().any(|p| pattern_matches(p, room))
        {
            return Err(Denied::Forbidden(format!(
                "your token does not allow joining {room}"
            )));
        }
        Ok(policy)
    }

    /// May `claims` publish to `room`, as a client? The server API bypasses this check.
    pub fn check_publish(&self, claims: &Claims, room: &str) -> Result<&NamespacePolicy, Denied> {
        let ns = room.split_once(':').map_or(room, |(ns, _)| ns);
        if ns == USER {
            return Err(Denied::Forbidden(format!(
                "only the server API can send to a user's personal room ({room})"
            )));
        }
        let policy = self
            .namespace(ns)
            .ok_or_else(|| Denied::UnknownNamespace(ns.into()))?;
        if !policy.publish {
            return Err(Denied::Forbidden(format!(
                "clients may not publish to {room}: namespace {ns} is read-only for clients"
            )));
        }
        if let Some(allowed) = &claims.publish
            && !allowed.iter().any(|p| pattern_matches(p, room))
        {
            return Err(Denied::Forbidden(format!(
                "your token does not allow publishing to {room}"
            )));
        }
        Ok(policy)
    }
}

/// `*` as a suffix wildcard (`"chat:*"`, `"doc:team-*"`, `"*"`); otherwise an exact match.
///
/// ```
/// # use herald_auth::pattern_matches;
/// assert!(pattern_matches("doc:team-*", "doc:team-42"));
/// assert!(!pattern_matches("chat:lobby", "chat:lobby2"));
/// ```
pub fn pattern_matches(pattern: &str, room: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => pattern == room,
    }
}

fn user_policy() -> NamespacePolicy {
    NamespacePolicy {
        presence: true,
        presence_events: false,
        publish: false,
        join: Vec::new(),
        durable: None,
        traceparent: false,
        limits: RateOverrides::default(),
        hooks: None,
        feed: Vec::new(),
    }
}

/// Could `pattern` match some room `ns:<name>`? Catches relative patterns such as `"lobby"`
/// written under `[namespaces.chat]`, which would otherwise silently refuse every join.
fn can_match_in(pattern: &str, ns: &str) -> bool {
    let prefix = format!("{ns}:");
    match pattern.strip_suffix('*') {
        Some(stem) => prefix.starts_with(stem) || stem.starts_with(&prefix),
        None => pattern.len() > prefix.len() && pattern.starts_with(&prefix),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NamespacePolicy, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn hooks_are_read_with_their_defaults() {
        let p =
            parse(r#"hooks = { endpoint = "http://127.0.0.1:7000", on = ["join", "publish"] }"#)
                .unwrap();
        let hooks = p.hooks.unwrap();
        assert_eq!(hooks.on, [HookName::Join, HookName::Publish]);
        assert_eq!(hooks.timeout, Duration::from_millis(500));
        assert_eq!(hooks.on_failure, OnFailure::Deny);
        let p = parse(
            r#"hooks = { endpoint = "http://[::1]:7000/", on = ["publish"], timeout = "2s", on_failure = "allow" }"#,
        )
        .unwrap();
        let target = p.hooks.unwrap().target();
        assert_eq!(target.timeout, Duration::from_secs(2));
        assert_eq!(target.on_failure, OnFailure::Allow);
    }

    #[test]
    fn bad_hooks_are_refused_in_plain_words() {
        let cases = [
            (
                r#"hooks = { endpoint = "http://h:1", on = ["jion"] }"#,
                "jion",
            ),
            (
                r#"hooks = { endpoint = "http://h:1", on = ["join"], timeout = "soon" }"#,
                "not a duration",
            ),
            (
                r#"hooks = { endpoint = "http://h:1", on = ["join"], timeout = "0s" }"#,
                "more than 0",
            ),
            (
                r#"hooks = { endpoint = "http://h:1", on = ["join"], timeout = "5m" }"#,
                "at most 60s",
            ),
            (
                r#"hooks = { endpoint = "h:7000", on = ["join"] }"#,
                "must start with http://",
            ),
            (
                r#"hooks = { endpoint = "https://h:7000", on = ["join"] }"#,
                "https:// is not supported",
            ),
            (
                r#"hooks = { endpoint = "http://h:7000/hooks", on = ["join"] }"#,
                "no path",
            ),
            (
                r#"hooks = { endpoint = "http://h:x", on = ["join"] }"#,
                "port \"x\"",
            ),
            (
                r#"hooks = { endpoint = "http://", on = ["join"] }"#,
                "no host",
            ),
            (
                r#"hooks = { endpoint = "http://h:1", on = ["join"], on_failure = "maybe" }"#,
                "maybe",
            ),
            (
                r#"hooks = { endpoint = "http://h:1", on = ["join"], retries = 3 }"#,
                "retries",
            ),
        ];
        for (text, needle) in cases {
            let e = parse(text).expect_err(text);
            assert!(e.contains(needle), "{text}: {e}");
        }
        let empty = parse(r#"hooks = { endpoint = "http://h:1", on = [] }"#).unwrap();
        let e = Policy::from_namespaces([("chat".to_string(), empty)].into()).unwrap_err();
        assert!(e.contains("namespace chat: hooks.on names no hook"), "{e}");
    }

    #[test]
    fn a_namespace_hook_is_found_only_for_the_requests_it_names() {
        let chat = parse(r#"hooks = { endpoint = "http://h:1", on = ["publish"] }"#).unwrap();
        let also = parse(r#"hooks = { endpoint = "http://h:1", on = ["join"] }"#).unwrap();
        let policy = Policy::from_namespaces(
            [
                ("chat".to_string(), chat),
                ("game".to_string(), also),
                ("news".to_string(), NamespacePolicy::default()),
            ]
            .into(),
        )
        .unwrap();
        assert!(policy.hook("chat", HookName::Publish).is_some());
        assert!(policy.hook("chat", HookName::Join).is_none());
        assert!(policy.hook("game", HookName::Join).is_some());
        assert!(policy.hook("news", HookName::Join).is_none());
        assert!(policy.hook("user", HookName::Join).is_none());
        assert_eq!(policy.hook_endpoints(), ["http://h:1"]);
    }
}
