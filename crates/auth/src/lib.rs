//! Authentication and authorisation for Herald.
//!
//! [`token`] turns the JWT a client presents into trusted [`Claims`]; [`policy`] decides, from
//! those claims and the namespace configuration, whether the user may join or publish to a room.
//! Both are synchronous so that every service (edge, router) can share them; the public keys
//! can be replaced while they are in use ([`Verifier::set_public`]), and fetched again for an
//! unknown `kid` ([`KeySource`]).
#![forbid(unsafe_code)]

pub mod limits;
pub mod policy;
pub mod token;

pub use limits::{RateLimits, RateOverrides};
pub use policy::{
    Denied, DurablePolicy, FeedKind, HookName, HookTarget, NamespaceHooks, NamespacePolicy,
    OnFailure, Policy, pattern_matches,
};
pub use token::{
    AuthError, ClaimChecks, Claims, KeyError, KeySource, Verifier, mint_hs256, now_secs,
};
