//! What edges tell each other so that a user's publish limit holds across
//! edges: each edge's count of a user's publishes in one time window.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// One edge's publishes per user in window `window` (`ms since the epoch /
/// window length`), for the users who published in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserUsage {
    pub node: String,
    pub window: u64,
    pub users: HashMap<String, u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_round_trips() {
        let u = UserUsage {
            node: "edge-1".into(),
            window: 7_000_000_123,
            users: HashMap::from([("ann".to_string(), 12)]),
        };
        let text = serde_json::to_string(&u).unwrap();
        assert_eq!(
            text,
            r#"{"node":"edge-1","window":7000000123,"users":{"ann":12}}"#
        );
        assert_eq!(serde_json::from_str::<UserUsage>(&text).unwrap(), u);
    }
}
