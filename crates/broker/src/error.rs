//! What the broker's errors carry under their plain message, and how a log
//! line shows all of it.
//!
//! Every Herald error says in plain words what went wrong (that is what a
//! client or a backend sees) and keeps what caused it as its
//! [`source`](std::error::Error::source), so that an operator reading the
//! log gets the whole story: `error = %chain(&e)`. A message never repeats
//! its source's text; [`chain`] adds it.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// The cause under an error: what the NATS client (or the store, or the
/// decoder) reported. Shared, so the errors that hold it stay `Clone`.
pub type Cause = Arc<dyn Error + Send + Sync>;

/// `e` as a [`Cause`]: any error, boxed or not.
pub fn cause(e: impl Into<Box<dyn Error + Send + Sync>>) -> Cause {
    Arc::from(e.into())
}

/// A cause that is only a sentence: a condition Herald detected itself.
pub(crate) fn said(message: impl Into<String>) -> Cause {
    cause(message.into())
}

/// What was under way when `source` happened ("publish to <subject>"): one
/// link of a chain, so the log says where as well as what.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub(crate) struct During {
    pub what: String,
    #[source]
    pub source: Cause,
}

/// A JetStream client error of `client` while doing `what`, as a cause
/// saying where, and whether it means the store could not be reached (the
/// client is disconnected, or the request timed out: async-nats reports
/// timeouts as a `TimedOut` kind in a dozen error types, all of which print
/// "timed out") rather than that the server refused.
pub(crate) fn jetstream_failure(
    client: &async_nats::Client,
    what: &str,
    e: impl Into<Box<dyn Error + Send + Sync>>,
) -> (Cause, bool) {
    let e = e.into();
    let timed_out = e.to_string().contains("timed out");
    let during = cause(During {
        what: what.to_string(),
        source: cause(e),
    });
    let connected = client.connection_state() == async_nats::connection::State::Connected;
    (during, !connected || timed_out)
}

/// Formats an error with every cause under it, outermost first:
/// `message: cause: cause of the cause`.
pub fn chain<'a>(error: &'a (dyn Error + 'static)) -> Chain<'a> {
    Chain(error)
}

/// See [`chain`].
#[derive(Clone, Copy)]
pub struct Chain<'a>(&'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Cause);

    #[test]
    fn a_chain_shows_every_cause_once_outermost_first() {
        let inner = During {
            what: "publish to a.b".into(),
            source: said("connection closed"),
        };
        let e = Outer(cause(inner));
        assert_eq!(
            chain(&e).to_string(),
            "outer: publish to a.b: connection closed"
        );
        assert_eq!(e.to_string(), "outer", "the message alone stays plain");
    }
}
