//! Room names: `namespace:name`. Names come from clients, so they are bounded
//! in length and character set here, once, before any map or subject sees them.

use std::fmt;
use std::sync::Arc;

/// Longest room name accepted, in bytes.
pub const MAX_ROOM_LEN: usize = 200;
/// Longest namespace accepted, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 32;

/// The namespace of personal rooms, `user:<id>`.
pub const USER_NAMESPACE: &str = "user";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("room name is empty")]
    Empty,
    #[error("room name is {0} bytes long; the limit is {MAX_ROOM_LEN}")]
    TooLong(usize),
    #[error("room name `{0}` has no namespace; write it as namespace:name, e.g. chat:lobby")]
    NoNamespace(String),
    #[error("room namespace in `{0}` must be 1 to {MAX_NAMESPACE_LEN} letters, digits, `_` or `-`")]
    BadNamespace(String),
    #[error("room name `{0}` has an empty name after the namespace")]
    EmptyName(String),
    #[error("room name may hold only printable ASCII without spaces; `{0}` does not")]
    BadCharacter(String),
}

/// A validated room name. Cheap to clone: rooms are map keys on every edge.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

impl RoomName {
    pub fn parse(raw: &str) -> Result<RoomName, RoomError> {
        if raw.is_empty() {
            return Err(RoomError::Empty);
        }
        if raw.len() > MAX_ROOM_LEN {
            return Err(RoomError::TooLong(raw.len()));
        }
        if !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(RoomError::BadCharacter(raw.escape_default().to_string()));
        }
        let Some((ns, name)) = raw.split_once(':') else {
            return Err(RoomError::NoNamespace(raw.to_string()));
        };
        if ns.is_empty()
            || ns.len() > MAX_NAMESPACE_LEN
            || !ns
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(RoomError::BadNamespace(raw.to_string()));
        }
        if name.is_empty() {
            return Err(RoomError::EmptyName(raw.to_string()));
        }
        Ok(RoomName(raw.into()))
    }

    /// The personal room of `user`.
    pub fn user(user: &str) -> Result<RoomName, RoomError> {
        RoomName::parse(&format!("{USER_NAMESPACE}:{user}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn namespace(&self) -> &str {
        self.0.split_once(':').map(|(ns, _)| ns).unwrap_or("")
    }

    pub fn name(&self) -> &str {
        self.0.split_once(':').map(|(_, n)| n).unwrap_or("")
    }

    pub fn is_personal(&self) -> bool {
        self.namespace() == USER_NAMESPACE
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoomName({})", &self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_namespaced_names() {
        let r = RoomName::parse("chat:lobby.main>*").unwrap();
        assert_eq!(r.namespace(), "chat");
        assert_eq!(r.name(), "lobby.main>*");
        assert!(!r.is_personal());
        assert!(RoomName::user("alice").unwrap().is_personal());
        assert_eq!(RoomName::parse("doc:a:b").unwrap().name(), "a:b");
    }

    #[test]
    fn rejects_bad_names_with_reasons() {
        assert_eq!(RoomName::parse(""), Err(RoomError::Empty));
        assert!(matches!(
            RoomName::parse("lobby"),
            Err(RoomError::NoNamespace(_))
        ));
        assert!(matches!(
            RoomName::parse(":x"),
            Err(RoomError::BadNamespace(_))
        ));
        assert!(matches!(
            RoomName::parse("c.h:x"),
            Err(RoomError::BadNamespace(_))
        ));
        assert!(matches!(
            RoomName::parse("chat:"),
            Err(RoomError::EmptyName(_))
        ));
        assert!(matches!(
            RoomName::parse("chat:a b"),
            Err(RoomError::BadCharacter(_))
        ));
        assert!(matches!(
            RoomName::parse("chat:é"),
            Err(RoomError::BadCharacter(_))
        ));
        let long = format!("chat:{}", "x".repeat(MAX_ROOM_LEN));
        assert!(matches!(RoomName::parse(&long), Err(RoomError::TooLong(_))));
        assert!(
            RoomName::parse("lobby")
                .unwrap_err()
                .to_string()
                .contains("namespace:name")
        );
    }
}
