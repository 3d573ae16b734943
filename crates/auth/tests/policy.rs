//! Join and publish decisions from namespace policy and token claims.

use std::collections::HashMap;

use herald_auth::{Claims, Denied, NamespacePolicy, Policy, pattern_matches};

fn user(sub: &str) -> Claims {
    Claims {
        sub: sub.into(),
        exp: u64::MAX,
        rooms: None,
        publish: None,
        device: None,
        watch: None,
    }
}

fn forbidden<T: std::fmt::Debug>(result: Result<T, Denied>) -> String {
    match result {
        Err(Denied::Forbidden(why)) => why,
        other => panic!("expected Forbidden, got {other:?}"),
    }
}

#[derive(serde::Deserialize)]
struct Config {
    namespaces: HashMap<String, NamespacePolicy>,
}

fn config(text: &str) -> Policy {
    Policy::from_namespaces(toml::from_str::<Config>(text).unwrap().namespaces).unwrap()
}

const CONFIG: &str = r#"
[namespaces.chat]
join = ["chat:public-*", "chat:lobby"]

[namespaces.news]
publish = false
presence_events = false

[namespaces.doc]
durable = { history_size = 100, history_ttl = "24h" }
"#;

#[test]
fn open_policy_allows_everything_but_other_users_rooms() {
    let policy = Policy::open();
    let alice = user("alice");
    for room in ["chat:lobby", "anything:at-all", "doc:42"] {
        assert_eq!(
            policy.check_join(&alice, room).unwrap(),
            &NamespacePolicy::default()
        );
        policy.check_publish(&alice, room).unwrap();
    }
    let own = policy.check_join(&alice, "user:alice").unwrap();
    assert!(own.presence && !own.presence_events && !own.publish && own.join.is_empty());
    let why = forbidden(policy.check_join(&alice, "user:bob"));
    assert!(why.contains("user:bob"), "{why}");
    let why = forbidden(policy.check_publish(&alice, "user:alice"));
    assert!(
        why.contains("only the server API") && why.contains("user:alice"),
        "{why}"
    );
    // A `rooms` claim does not lock the owner out of their own inbox.
    let narrow = Claims {
        rooms: Some(vec!["chat:*".into()].into()),
        ..user("alice")
    };
    policy.check_join(&narrow, "user:alice").unwrap();
}

#[test]
fn config_file_defaults_and_fields() {
    let policy = config(CONFIG);
    let chat = policy.namespace("chat").unwrap();
    assert!(chat.presence && chat.presence_events && chat.publish && chat.durable.is_none());
    let news = policy.namespace("news").unwrap();
    assert!(!news.publish && !news.presence_events && news.join == ["*"]);
    let doc = policy.namespace("doc").unwrap().durable.clone().unwrap();
    assert_eq!((doc.history_size, doc.history_ttl.as_str()), (100, "24h"));
    assert!(!policy.namespace("user").unwrap().publish);
    assert!(policy.namespace("game").is_none());
    assert!(toml::from_str::<NamespacePolicy>("presense = true").is_err());
}

#[test]
fn unknown_namespace_is_refused_when_configured() {
    let policy = config(CONFIG);
    let denied = policy.check_join(&user("alice"), "game:1").unwrap_err();
    assert_eq!(denied, Denied::UnknownNamespace("game".into()));
    assert!(denied.message().contains("game"));
    assert!(matches!(
        policy.check_publish(&user("alice"), "game:1"),
        Err(Denied::UnknownNamespace(_))
    ));
}

#[test]
fn namespace_join_patterns() {
    let policy = config(CONFIG);
    let alice = user("alice");
    policy.check_join(&alice, "chat:lobby").unwrap();
    policy.check_join(&alice, "chat:public-rust").unwrap();
    let why = forbidden(policy.check_join(&alice, "chat:secret"));
    assert_eq!(why, "namespace chat does not allow joining chat:secret");
}

#[test]
fn token_rooms_narrow_joins() {
    let policy = config(CONFIG);
    let claims = Claims {
        rooms: Some(vec!["chat:lobby".into(), "doc:team-*".into()].into()),
        ..user("alice")
    };
    policy.check_join(&claims, "chat:lobby").unwrap();
    policy.check_join(&claims, "doc:team-7").unwrap();
    let why = forbidden(policy.check_join(&claims, "doc:other"));
    assert_eq!(why, "your token does not allow joining doc:other");
    // The token cannot widen what the namespace allows.
    let wide = Claims {
        rooms: Some(vec!["*".into()].into()),
        ..user("alice")
    };
    forbidden(policy.check_join(&wide, "chat:secret"));
}

#[test]
fn namespace_can_forbid_client_publish() {
    let policy = config(CONFIG);
    let why = forbidden(policy.check_publish(&user("alice"), "news:today"));
    assert!(
        why.contains("news:today") && why.contains("read-only"),
        "{why}"
    );
    policy.check_join(&user("alice"), "news:today").unwrap();
}

#[test]
fn token_publish_patterns_narrow_publishing() {
    let policy = Policy::open();
    let claims = Claims {
        publish: Some(vec!["chat:*".into()].into()),
        ..user("alice")
    };
    policy.check_publish(&claims, "chat:lobby").unwrap();
    let why = forbidden(policy.check_publish(&claims, "doc:1"));
    assert_eq!(why, "your token does not allow publishing to doc:1");
    let none = Claims {
        publish: Some(vec![].into()),
        ..user("alice")
    };
    forbidden(policy.check_publish(&none, "chat:lobby"));
}

#[test]
fn bad_namespace_configs_are_refused() {
    let with = |name: &str, join: &[&str]| {
        let policy = NamespacePolicy {
            join: join.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        Policy::from_namespaces(HashMap::from([(name.to_string(), policy)])).unwrap_err()
    };
    assert!(with("user", &["*"]).contains("reserved"));
    assert!(with("chat", &[""]).contains("namespace chat: a join pattern is empty"));
    assert!(with("chat", &["lobby"]).contains("\"lobby\" can never match"));
    assert!(with("chat", &["chat:"]).contains("can never match"));
    assert!(with("a:b", &["*"]).contains("no ':'"));
    for ok in [&["*"][..], &["c*"], &["chat:*"], &["chat:x-*"], &["chat:x"]] {
        let policy = NamespacePolicy {
            join: ok.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        Policy::from_namespaces(HashMap::from([("chat".to_string(), policy)])).unwrap();
    }
}

#[test]
fn pattern_matching() {
    assert!(pattern_matches("*", "chat:lobby"));
    assert!(pattern_matches("chat:*", "chat:lobby"));
    assert!(!pattern_matches("chat:*", "chatter:lobby"));
    assert!(pattern_matches("doc:team-*", "doc:team-42"));
    assert!(!pattern_matches("doc:team-*", "doc:tea"));
    assert!(pattern_matches("chat:lobby", "chat:lobby"));
    assert!(!pattern_matches("chat:lobby", "chat:lobby2"));
    assert!(!pattern_matches("chat:lob", "chat:lobby"));
    // Only a trailing `*` is a wildcard.
    assert!(!pattern_matches("chat:*:x", "chat:a:x"));
    assert!(pattern_matches("chat:*:x", "chat:*:x"));
}
