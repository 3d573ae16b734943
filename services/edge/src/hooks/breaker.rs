//! The circuit breaker of one hook endpoint, without I/O: it is told the
//! time and the outcome of each call, and says whether the next call may
//! go out. After [`FAILURES`] failures in a row it opens: calls fail at
//! once (the namespace's `on_failure` applies) instead of each waiting out
//! its timeout against a service that is down. After [`OPEN_FOR`] one trial
//! call goes out; its success closes the breaker, its failure opens it again.

use std::time::Duration;

use tokio::time::Instant;

/// Failures in a row that open the breaker.
pub(crate) const FAILURES: u32 = 5;
/// How long an open breaker refuses calls before it lets a trial through.
pub(crate) const OPEN_FOR: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A trial call is out. Should its outcome never be reported (the
    /// client went away mid-call), another trial goes out after `until`.
    Trial {
        until: Instant,
    },
}

#[derive(Debug)]
pub(crate) struct Breaker {
    state: State,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: State::Closed { failures: 0 },
        }
    }
}

impl Breaker {
    /// Whether a call may go out now; `false` while open (or while another
    /// trial call is out).
    pub(crate) fn admit(&mut self, now: Instant) -> bool {
        match self.state {
            State::Closed { .. } => true,
            State::Open { until } | State::Trial { until } if now >= until => {
                self.state = State::Trial {
                    until: now + OPEN_FOR,
                };
                true
            }
            State::Open { .. } | State::Trial { .. } => false,
        }
    }

    /// The service answered (allowing or denying: both are answers).
    pub(crate) fn success(&mut self) {
        self.state = State::Closed { failures: 0 };
    }

    /// The call timed out, failed, or its answer was unusable.
    pub(crate) fn failure(&mut self, now: Instant) {
        self.state = match self.state {
            State::Closed { failures } if failures + 1 < FAILURES => State::Closed {
                failures: failures + 1,
            },
            _ => State::Open {
                until: now + OPEN_FOR,
            },
        };
    }

    pub(crate) fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_in_a_row_and_not_before() {
        let now = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..FAILURES - 1 {
            assert!(b.admit(now));
            b.failure(now);
        }
        assert!(!b.is_open());
        // A success in between starts the count again.
        b.success();
        for _ in 0..FAILURES - 1 {
            b.failure(now);
        }
        assert!(b.admit(now), "four failures after a success keep it closed");
        b.failure(now);
        assert!(b.is_open());
        assert!(!b.admit(now));
        assert!(!b.admit(now + OPEN_FOR - Duration::from_millis(1)));
    }

    #[test]
    fn one_trial_after_the_open_time_closes_or_reopens_it() {
        let now = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..FAILURES {
            b.failure(now);
        }
        let later = now + OPEN_FOR;
        assert!(b.admit(later), "the trial call");
        assert!(!b.admit(later), "only one trial at a time");
        b.failure(later);
        assert!(!b.admit(later + Duration::from_secs(1)), "open again");
        let again = later + OPEN_FOR;
        assert!(b.admit(again));
        b.success();
        assert!(!b.is_open());
        assert!(
            b.admit(again) && b.admit(again),
            "closed: every call goes out"
        );
    }

    #[test]
    fn a_trial_whose_outcome_never_comes_is_followed_by_another() {
        let now = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..FAILURES {
            b.failure(now);
        }
        assert!(b.admit(now + OPEN_FOR));
        assert!(!b.admit(now + OPEN_FOR + Duration::from_secs(1)));
        assert!(b.admit(now + OPEN_FOR * 2));
    }
}
