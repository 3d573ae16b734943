//! A connection's request rates: `publish`, `join` and presence updates,
//! each within its namespace's limits (governor's GCRA, one allowance per
//! kind and per namespace that overrides the defaults), created on first
//! use so that an idle connection carries none. A refused request is
//! answered `rate_limited` with `retry_after_ms`; a client that goes on
//! being refused for [`PERSIST`] without backing off is closed with 4008.
//! `publish` is also counted per user across every edge (`crate::quota`).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use herald_wire::frames::FrameError;
use herald_wire::{CloseCode, ErrorCode, RoomName};

use super::Session;

/// How long a client may keep sending over its limit before it is closed.
pub(super) const PERSIST: Duration = Duration::from_secs(10);
/// A pause this long without a refusal counts as backing off.
const BACKED_OFF: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Kind {
    Publish,
    Join,
    Presence,
}

impl Kind {
    fn what(self) -> &'static str {
        match self {
            Kind::Publish => "publishes",
            Kind::Join => "joins",
            Kind::Presence => "presence updates",
        }
    }
}

type Limiter = governor::DefaultDirectRateLimiter;

/// The clock of every limiter: making one calibrates the TSC (CPUID and
/// a timing loop), which cost a few percent of the edge's CPU under
/// churn when every join made its own.
static CLOCK: LazyLock<DefaultClock> = LazyLock::new(DefaultClock::default);

/// The allowances of one connection.
#[derive(Default)]
pub(super) struct Limiters {
    /// By kind and by namespace.
    by: HashMap<(Kind, Box<str>), Limiter>,
    /// When the current run of refusals began, and the last of them.
    refused: Option<(Instant, Instant)>,
}

impl Limiters {
    /// Notes a refusal; `true` once the client has kept going for [`PERSIST`].
    fn refused_now(&mut self) -> bool {
        let now = Instant::now();
        let since = match self.refused {
            Some((since, last)) if now.duration_since(last) < BACKED_OFF => since,
            _ => now,
        };
        self.refused = Some((since, now));
        now.duration_since(since) >= PERSIST
    }
}

impl Session {
    /// Takes one `kind` request in `room`'s namespace from the connection's
    /// allowance, or refuses it.
    pub(super) fn check_rate(
        &mut self,
        id: Option<u64>,
        kind: Kind,
        room: &RoomName,
    ) -> Result<(), FrameError> {
        let rates = self.edge.config.policy.rates(room.namespace());
        let (per_second, burst) = match kind {
            Kind::Publish => (rates.publish_per_second, rates.publish_burst),
            Kind::Join => (rates.join_per_second, rates.join_burst),
            Kind::Presence => (rates.presence_per_second, rates.presence_burst),
        };
        let (Some(rate), Some(burst)) = (NonZeroU32::new(per_second), NonZeroU32::new(burst))
        else {
            return Ok(());
        };
        let limiters = self.limits.get_or_insert_with(Default::default);
        let limiter = limiters
            .by
            .entry((kind, room.namespace().into()))
            .or_insert_with(|| {
                let quota = governor::Quota::per_second(rate).allow_burst(burst);
                Limiter::direct_with_clock(quota, CLOCK.clone())
            });
        let wait = match limiter.check() {
            Ok(()) => return Ok(()),
            Err(not_until) => not_until.wait_time_from(CLOCK.now()),
        };
        Err(self.limited(
            id,
            format!(
                "more than {per_second} {} a second in {}",
                kind.what(),
                room.namespace()
            ),
            wait,
        ))
    }

    /// The `rate_limited` answer, after `wait`; a client that has kept
    /// going for [`PERSIST`] is also closed with 4008.
    pub(super) fn limited(&mut self, id: Option<u64>, why: String, wait: Duration) -> FrameError {
        if self
            .limits
            .get_or_insert_with(Default::default)
            .refused_now()
        {
            self.outbox.close(
                CloseCode::RateLimited,
                format!(
                    "kept sending over the rate limit for {} s after being told",
                    PERSIST.as_secs()
                ),
            );
        }
        let mut e = FrameError::new(id, ErrorCode::RateLimited, why);
        e.retry_after_ms = Some(wait.as_millis() as u64 + 1);
        e
    }
}
