//! Configuration that is not a flag: the TOML file (namespace policies) and
//! the JWT keys. Read once, before anything binds; every error names the
//! flag or the file it came from.

use std::collections::HashMap;

use std::time::Duration;

use herald_auth::{DurablePolicy, HookTarget, NamespacePolicy, Policy};
use herald_broker::history::Limits;
use serde::Deserialize;

use crate::cli::{AccessArgs, Common, LivenessArgs};

/// The secret `herald dev` and `herald token` use when none is given. It is
/// public: fine on a laptop, never for anything reachable by others.
pub const DEV_SECRET: &str = "herald-dev-secret-do-not-use-in-production";

/// The configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Namespace policies, `[namespaces.<name>]`.
    #[serde(default)]
    pub namespaces: HashMap<String, NamespacePolicy>,
    /// How much of every user's offline inbox (`user:<id>`) is kept, `[inbox]`.
    #[serde(default)]
    pub inbox: Option<DurablePolicy>,
    /// Client request rates, `[limits]`.
    #[serde(default)]
    pub limits: herald_auth::RateOverrides,
    /// The application's `OnConnect` hook, `[connect_hook]`.
    #[serde(default)]
    pub connect_hook: Option<HookTarget>,
    /// The event feed for backends, `[feed]`.
    #[serde(default)]
    pub feed: Option<FeedFile>,
}

/// `[feed]`: what the event feed keeps, and the events that belong to no
/// namespace.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedFile {
    /// Events older than this are dropped (`"7d"`; `"0s"`: kept until
    /// `max_bytes`).
    #[serde(default = "feed_max_age")]
    pub max_age: String,
    /// The feed keeps at most this many bytes, the oldest dropped first (0:
    /// no limit).
    #[serde(default = "feed_max_bytes")]
    pub max_bytes: u64,
    /// Connects and disconnects of every connection go to the feed.
    #[serde(default)]
    pub connections: bool,
    /// Users going online and offline go to the feed.
    #[serde(default)]
    pub users: bool,
}

fn feed_max_age() -> String {
    "7d".into()
}

fn feed_max_bytes() -> u64 {
    1 << 30
}

/// The event feed as configured: on when `[feed]` is given or a namespace
/// sends events to it.
#[derive(Debug, Clone)]
pub struct FeedSettings {
    pub limits: herald_broker::feed::FeedLimits,
    pub connections: bool,
    pub users: bool,
}

/// What the inbox keeps when the configuration does not say.
pub fn default_inbox() -> DurablePolicy {
    DurablePolicy {
        history_size: 1000,
        history_ttl: "30d".into(),
    }
}

/// Namespace policies and the storage limits of every durable namespace.
pub struct Namespaces {
    pub policy: Policy,
    pub durable: Vec<(String, Limits)>,
    /// `[connect_hook]`, for the edges.
    pub connect_hook: Option<HookTarget>,
    /// `None`: no event feed.
    pub feed: Option<FeedSettings>,
}

/// A configuration problem, reported before the process starts serving:
/// which flag or file, what is wrong with it, and the cause underneath.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct ConfigError {
    what: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ConfigError {
    /// A problem Herald found itself, said in full by `what`.
    pub fn new(what: impl Into<String>) -> ConfigError {
        ConfigError {
            what: what.into(),
            source: None,
        }
    }

    /// `what` is wrong because of `source`.
    pub fn caused(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> ConfigError {
        ConfigError {
            what: what.into(),
            source: Some(source.into()),
        }
    }
}

/// The edge's heartbeat and idle timeout (`--heartbeat`, `--idle-timeout`):
/// whole seconds, since the edge checks its connections once a second, and
/// a timeout longer than the heartbeat, or every quiet client would be
/// closed before its first ping.
pub fn liveness(args: &LivenessArgs) -> Result<(Duration, Duration), ConfigError> {
    let heartbeat = args.heartbeat;
    if heartbeat < Duration::from_secs(1) || heartbeat.subsec_nanos() != 0 {
        return Err(ConfigError::new(format!(
            "--heartbeat {}: give whole seconds, at least 1s",
            humantime::format_duration(heartbeat)
        )));
    }
    let idle = args
        .idle_timeout
        .unwrap_or(2 * heartbeat + Duration::from_secs(10));
    if idle <= heartbeat || idle.subsec_nanos() != 0 {
        return Err(ConfigError::new(format!(
            "--idle-timeout {}: give whole seconds, longer than --heartbeat ({})",
            humantime::format_duration(idle),
            humantime::format_duration(heartbeat)
        )));
    }
    Ok((heartbeat, idle))
}

pub fn namespaces(common: &Common) -> Result<Namespaces, ConfigError> {
    namespaces_or(common, Policy::open)
}

/// The namespace `herald dev` makes durable when no `--config` is given, so
/// that its demo's shared document replays to late joiners as in a cluster
/// configured like `examples/herald.toml`.
pub const DEV_DURABLE_NAMESPACE: &str = "doc";

/// What [`DEV_DURABLE_NAMESPACE`] keeps without a configuration file: as
/// `examples/herald.toml`'s `doc`.
pub fn dev_durable() -> DurablePolicy {
    DurablePolicy {
        history_size: 1000,
        history_ttl: "24h".into(),
    }
}

/// `herald dev`'s namespaces: the configuration file's when one is given;
/// without one, every namespace open and [`DEV_DURABLE_NAMESPACE`] durable.
pub fn dev_namespaces(common: &Common) -> Result<Namespaces, ConfigError> {
    namespaces_or(common, || {
        let doc = NamespacePolicy {
            durable: Some(dev_durable()),
            ..NamespacePolicy::default()
        };
        Policy::open_with([(DEV_DURABLE_NAMESPACE.to_string(), doc)].into())
            .expect("the built-in namespace policy is valid")
    })
}

/// The namespaces of `--config`, or of `unconfigured()` without one.
fn namespaces_or(
    common: &Common,
    unconfigured: impl FnOnce() -> Policy,
) -> Result<Namespaces, ConfigError> {
    let file = match &common.config {
        None => FileConfig::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::caused(format!("--config {}: cannot read it", path.display()), e)
            })?;
            toml::from_str(&text)
                .map_err(|e| ConfigError::caused(format!("--config {}", path.display()), e))?
        }
    };
    let at = || {
        common
            .config
            .as_ref()
            .map(|p| format!("--config {}", p.display()))
            .unwrap_or_else(|| "built-in defaults".into())
    };
    let inbox = file.inbox.clone().unwrap_or_else(default_inbox);
    let policy = if common.config.is_some() {
        Policy::from_namespaces(file.namespaces).map_err(|e| ConfigError::caused(at(), e))?
    } else {
        unconfigured()
    };
    let policy = policy
        .with_limits(&file.limits)
        .map_err(|e| ConfigError::caused(at(), e))?;
    let mut durable = Vec::new();
    for (ns, d) in policy.durable_namespaces(&inbox) {
        let max_age: Duration = humantime::parse_duration(&d.history_ttl).map_err(|e| {
            ConfigError::caused(
                format!(
                    "{}: history_ttl {:?} of namespace {ns} is not a duration (write e.g. \"24h\" or \"30d\")",
                    at(),
                    d.history_ttl
                ),
                e,
            )
        })?;
        if d.history_size == 0 {
            return Err(ConfigError::new(format!(
                "{}: history_size of namespace {ns} must be at least 1",
                at()
            )));
        }
        durable.push((
            ns,
            Limits {
                max_messages_per_room: d.history_size,
                max_age,
            },
        ));
    }
    let feed = match (&file.feed, policy.any_feed()) {
        (None, false) => None,
        (given, _) => {
            let given = given.clone().unwrap_or(FeedFile {
                max_age: feed_max_age(),
                max_bytes: feed_max_bytes(),
                connections: false,
                users: false,
            });
            let max_age = humantime::parse_duration(&given.max_age).map_err(|e| {
                ConfigError::caused(
                    format!(
                        "{}: [feed] max_age {:?} is not a duration (write e.g. \"7d\" or \"12h\")",
                        at(),
                        given.max_age
                    ),
                    e,
                )
            })?;
            Some(FeedSettings {
                limits: herald_broker::feed::FeedLimits {
                    max_age,
                    max_bytes: given.max_bytes,
                },
                connections: given.connections,
                users: given.users,
            })
        }
    };
    Ok(Namespaces {
        policy,
        durable,
        connect_hook: file.connect_hook,
        feed,
    })
}

/// `--allowed-origins`, checked entry by entry; `None` allows every origin.
pub fn allowed_origins(
    args: &AccessArgs,
) -> Result<Option<herald_edge::AllowedOrigins>, ConfigError> {
    args.allowed_origins
        .as_deref()
        .map(|list| {
            herald_edge::AllowedOrigins::parse(list)
                .map_err(|e| ConfigError::caused("--allowed-origins", e))
        })
        .transpose()
}

/// The connection caps, with `--trusted-proxies` read as addresses or
/// CIDR ranges.
pub fn caps(args: &AccessArgs) -> Result<herald_edge::Caps, ConfigError> {
    let mut trusted_proxies = Vec::new();
    for entry in args
        .trusted_proxies
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
    {
        let net = match entry.parse::<ipnet::IpNet>() {
            Ok(net) => net,
            Err(_) => entry
                .parse::<std::net::IpAddr>()
                .map(ipnet::IpNet::from)
                .map_err(|e| {
                    ConfigError::caused(
                        format!("--trusted-proxies: `{entry}` is not an address or a CIDR range"),
                        e,
                    )
                })?,
        };
        trusted_proxies.push(net);
    }
    Ok(herald_edge::Caps {
        max_connections: args.max_connections,
        max_per_ip: args.max_connections_per_ip,
        max_pending: args.max_pending_connections,
        trusted_proxies,
    })
}

/// `--tls-cert` and `--tls-key` (clap makes sure both or neither are
/// given), loaded now so that a bad file stops the start.
pub fn tls(args: &AccessArgs) -> Result<Option<herald_edge::TlsCert>, ConfigError> {
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => herald_edge::load_cert(cert, key)
            .map(Some)
            .map_err(|e| ConfigError::caused("--tls-cert/--tls-key", e)),
        (None, None) => Ok(None),
        _ => Err(ConfigError::new(
            "give both --tls-cert and --tls-key, or neither",
        )),
    }
}

/// Node ids are part of connection ids and NATS subjects.
pub fn node_id(given: Option<String>) -> Result<String, ConfigError> {
    match given {
        Some(id) => {
            if id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                Err(ConfigError::new(format!(
                    "--node-id {id:?}: use 1 to 64 letters, digits, `-` or `_`"
                )))
            } else {
                Ok(id)
            }
        }
        None => Ok(format!("edge-{:08x}", rand::random::<u32>())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_checked() {
        assert!(node_id(Some("edge-0".into())).is_ok());
        assert!(
            node_id(Some("a.b".into()))
                .unwrap_err()
                .to_string()
                .contains("--node-id")
        );
        assert!(node_id(None).unwrap().starts_with("edge-"));
    }

    #[test]
    fn dev_without_a_config_keeps_doc_durable_and_every_namespace_open() {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from(["herald", "dev"]).unwrap();
        let crate::cli::Command::Dev(args) = cli.command else {
            panic!("not dev")
        };
        let dev = dev_namespaces(&args.common).unwrap();
        assert!(dev.policy.is_durable("doc") && !dev.policy.is_durable("chat"));
        assert!(dev.policy.namespace("anything").is_some());
        assert!(
            dev.durable
                .iter()
                .any(|(ns, _)| ns == DEV_DURABLE_NAMESPACE)
        );
        // Cluster processes without a file keep every namespace ephemeral.
        assert!(!namespaces(&args.common).unwrap().policy.is_durable("doc"));
    }

    #[test]
    fn feed_kinds_and_the_feed_section_are_checked() {
        let e = toml::from_str::<FileConfig>("[namespaces.chat]\nfeed = [\"connection\"]\n")
            .unwrap_err();
        assert!(e.to_string().contains("`publish` or `presence`"), "{e}");
        let e = toml::from_str::<FileConfig>("[feed]\nmax_agee = \"1d\"\n").unwrap_err();
        assert!(e.to_string().contains("max_agee"), "{e}");
        let f = toml::from_str::<FileConfig>("[feed]\nusers = true\n").unwrap();
        let f = f.feed.unwrap();
        assert!(f.users && !f.connections);
        assert_eq!((f.max_age.as_str(), f.max_bytes), ("7d", 1 << 30));
    }

    #[test]
    fn config_file_names_unknown_keys() {
        let e = toml::from_str::<FileConfig>("[namespaces.chat]\npublsh = true\n").unwrap_err();
        assert!(e.to_string().contains("publsh"), "{e}");
    }

    #[test]
    fn the_connect_hook_is_read_and_checked() {
        let file: FileConfig = toml::from_str(
            "[connect_hook]\nendpoint = \"http://127.0.0.1:7000\"\ntimeout = \"1s\"\non_failure = \"allow\"\n",
        )
        .unwrap();
        let hook = file.connect_hook.unwrap();
        assert_eq!(hook.timeout, Duration::from_secs(1));
        assert_eq!(hook.on_failure, herald_auth::OnFailure::Allow);
        for (bad, needle) in [
            ("endpoint = \"127.0.0.1:7000\"", "http://"),
            (
                "endpoint = \"http://h:1\"\ntimeout = \"later\"",
                "not a duration",
            ),
            (
                "endpoint = \"http://h:1\"\non = [\"join\"]",
                "unknown field `on`",
            ),
        ] {
            let e = toml::from_str::<FileConfig>(&format!("[connect_hook]\n{bad}\n")).unwrap_err();
            assert!(e.to_string().contains(needle), "{bad}: {e}");
        }
    }
}
