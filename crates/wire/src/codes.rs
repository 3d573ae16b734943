//! The error and close-code catalogue. These strings and numbers are API:
//! clients decide whether to retry, reconnect or give up from them, so each
//! carries its reconnect rule and `docs/protocol.md` mirrors this file.

use std::fmt;

/// Codes carried by `{"op":"error"}` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame was not valid JSON, named an unknown op, or lacked a field.
    BadRequest,
    /// No valid `connect` yet, or the token was rejected.
    Unauthorized,
    /// The token's `exp` has passed; refresh it or reconnect with a new one.
    TokenExpired,
    /// The claims or the namespace policy do not allow this.
    Forbidden,
    /// The namespace or resource does not exist.
    NotFound,
    /// Too many requests; `retry_after_ms` says when to try again.
    RateLimited,
    /// The frame or a field in it is over its size limit.
    TooLarge,
    /// A dependency (broker, store) cannot serve this right now; nothing
    /// was done; retry later.
    Unavailable,
    /// The message was sent but its receipt was never confirmed (the broker
    /// or the store went away at that moment): it may or may not have been
    /// published. Retrying with the same `key` publishes it at most once and
    /// answers with its offset (durable rooms).
    OutcomeUnknown,
    /// A bug or an unexpected failure on the server.
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::TokenExpired,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::RateLimited,
        ErrorCode::TooLarge,
        ErrorCode::Unavailable,
        ErrorCode::OutcomeUnknown,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::OutcomeUnknown => "outcome_unknown",
            ErrorCode::Internal => "internal",
        }
    }

    /// Whether repeating the same request later can succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimited
                | ErrorCode::Unavailable
                | ErrorCode::OutcomeUnknown
                | ErrorCode::Internal
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// WebSocket close codes, sent in a `disconnect` frame and then in the close
/// frame itself (except [`CloseCode::announced`]: the close frame alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    Normal,
    /// The client broke the WebSocket protocol (RFC 6455): an unmasked
    /// frame, reserved bits or opcodes, a control frame fragmented or over
    /// 125 bytes, a continuation with nothing to continue or a message begun
    /// inside another, a malformed close frame.
    ProtocolError,
    /// A text message, or the reason of a close frame, that is not valid UTF-8.
    InvalidData,
    /// A policy of the backend's, named by its `Router.Disconnect`; the edge
    /// itself does not send it.
    Policy,
    TooBig,
    Internal,
    ServiceRestart,
    TryAgainLater,
    Unauthorized,
    Forbidden,
    RateLimited,
    SlowConsumer,
    /// Nothing (no frame, no pong) arrived from the client for the edge's
    /// idle timeout: it is taken for gone.
    IdleTimeout,
    /// A backend's own code from the private-use range 4000–4999 (RFC 6455
    /// §7.4.2) outside this catalogue, given to `Router.Disconnect`: it means
    /// what the backend says it means, and the backend chooses its reconnect
    /// rule. Made by [`CloseCode::application`].
    Application(AppCode),
}

/// A code of [`CloseCode::Application`]: one of 4000–4999 that the catalogue
/// leaves free. Kept as two bytes rather than a `u16` so that a `CloseCode`
/// has no alignment and stays 3 bytes: the edge keeps one in every
/// connection's queue, where it fits in padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AppCode([u8; 2]);

impl AppCode {
    pub fn get(self) -> u16 {
        u16::from_be_bytes(self.0)
    }
}

impl CloseCode {
    /// The catalogue: every code with a meaning of Herald's.
    pub const ALL: [CloseCode; 13] = [
        CloseCode::Normal,
        CloseCode::ProtocolError,
        CloseCode::InvalidData,
        CloseCode::Policy,
        CloseCode::TooBig,
        CloseCode::Internal,
        CloseCode::ServiceRestart,
        CloseCode::TryAgainLater,
        CloseCode::Unauthorized,
        CloseCode::Forbidden,
        CloseCode::RateLimited,
        CloseCode::SlowConsumer,
        CloseCode::IdleTimeout,
    ];

    /// The private-use range that backends may fill with codes of their own.
    pub const APPLICATION: std::ops::RangeInclusive<u16> = 4000..=4999;

    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::ProtocolError => 1002,
            CloseCode::InvalidData => 1007,
            CloseCode::Policy => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::Internal => 1011,
            CloseCode::ServiceRestart => 1012,
            CloseCode::TryAgainLater => 1013,
            CloseCode::Unauthorized => 4001,
            CloseCode::Forbidden => 4003,
            CloseCode::RateLimited => 4008,
            CloseCode::SlowConsumer => 4009,
            CloseCode::IdleTimeout => 4010,
            CloseCode::Application(code) => code.get(),
        }
    }

    /// The catalogue's code with this number.
    pub fn from_code(code: u16) -> Option<CloseCode> {
        CloseCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// A backend's own code: one of 4000–4999 that the catalogue does not
    /// use (those keep the catalogue's meaning).
    pub fn application(code: u16) -> Option<CloseCode> {
        (CloseCode::APPLICATION.contains(&code) && CloseCode::from_code(code).is_none())
            .then_some(CloseCode::Application(AppCode(code.to_be_bytes())))
    }

    /// The reconnect rule a client follows after this close: `true` means
    /// reconnect (with backoff) and resume; `false` means a new token or a
    /// different request is needed first. An application code's rule is
    /// the backend's; `false` unless it says otherwise.
    pub fn reconnect(self) -> bool {
        match self {
            CloseCode::Normal | CloseCode::Policy | CloseCode::TooBig => false,
            CloseCode::ProtocolError | CloseCode::InvalidData => false,
            CloseCode::Unauthorized | CloseCode::Forbidden => false,
            CloseCode::Application(_) => false,
            CloseCode::Internal
            | CloseCode::ServiceRestart
            | CloseCode::TryAgainLater
            | CloseCode::RateLimited
            | CloseCode::SlowConsumer
            | CloseCode::IdleTimeout => true,
        }
    }

    /// Whether a `disconnect` frame precedes the close frame. Not when the
    /// client broke the WebSocket protocol: its side of the connection can no
    /// longer be trusted to read frames as meant, so the connection is failed
    /// at once with the close frame alone (RFC 6455 §7.1.7), whose code and
    /// reason every WebSocket library reports.
    pub fn announced(self) -> bool {
        !matches!(self, CloseCode::ProtocolError | CloseCode::InvalidData)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn error_codes_are_the_contracts_strings() {
        let names: Vec<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            names,
            [
                "bad_request",
                "unauthorized",
                "token_expired",
                "forbidden",
                "not_found",
                "rate_limited",
                "too_large",
                "unavailable",
                "outcome_unknown",
                "internal"
            ]
        );
        assert!(ErrorCode::Unavailable.retryable());
        assert!(!ErrorCode::Forbidden.retryable());
    }

    #[test]
    fn close_codes_are_the_contracts_numbers_and_round_trip() {
        let codes: Vec<_> = CloseCode::ALL.iter().map(|c| c.code()).collect();
        assert_eq!(
            codes,
            [
                1000, 1002, 1007, 1008, 1009, 1011, 1012, 1013, 4001, 4003, 4008, 4009, 4010
            ]
        );
        let unique: HashSet<_> = codes.iter().collect();
        assert_eq!(unique.len(), codes.len());
        for c in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(c.code()), Some(c));
        }
        assert_eq!(CloseCode::from_code(1001), None);
        assert!(CloseCode::ServiceRestart.reconnect());
        assert!(CloseCode::SlowConsumer.reconnect());
        assert!(!CloseCode::Unauthorized.reconnect());
        assert!(!CloseCode::ProtocolError.announced());
        assert!(!CloseCode::InvalidData.announced());
        assert!(CloseCode::TooBig.announced());
    }

    #[test]
    fn application_codes_are_the_private_use_range_the_catalogue_leaves() {
        let banned = CloseCode::application(4403).expect("free in the catalogue");
        assert_eq!(banned.code(), 4403);
        assert!(!banned.reconnect());
        assert!(banned.announced());
        assert_eq!(size_of::<Option<CloseCode>>(), 3);
        for taken in [4001, 4003, 4008, 4009, 4010] {
            assert_eq!(CloseCode::application(taken), None, "{taken}");
        }
        for outside in [0, 1000, 1001, 3999, 5000, u16::MAX] {
            assert_eq!(CloseCode::application(outside), None, "{outside}");
        }
        assert_eq!(CloseCode::from_code(4403), None);
    }
}
