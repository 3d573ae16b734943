//! How long to wait before connecting again: exponential backoff with full
//! jitter (a random delay between zero and the exponential ceiling), so that
//! thousands of clients cut off by one edge's death do not all come back at
//! the same moment; and the small random source it and the idempotency keys
//! draw from.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// The reconnect schedule: attempt `n` (from 0) waits a random time in
/// `[0, min(max, initial * 2^n)]`.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The ceiling of attempt `attempt`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay, `unit` in `[0, 1)` choosing where under the ceiling.
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }

    pub fn next(&mut self, rng: &mut Rng) -> Duration {
        self.next_with(rng.unit())
    }

    /// After a connection that worked, the next loss starts from the
    /// shortest delay again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// SplitMix64 seeded from the standard library's per-process random keys:
/// enough for jitter and for keys that only need to be unique, without a
/// dependency for it.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        Rng(h.finish())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceilings_double_up_to_the_maximum() {
        let b = Backoff::new(500 * MS, 15_000 * MS);
        let ceilings: Vec<u128> = (0..8).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(
            ceilings,
            [500, 1000, 2000, 4000, 8000, 15_000, 15_000, 15_000]
        );
        // No overflow however long the outage.
        assert_eq!(b.ceiling(u32::MAX), 15_000 * MS);
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        assert_eq!(b.next_with(0.0), Duration::ZERO);
        assert_eq!(b.next_with(0.5), 100 * MS);
        assert_eq!(b.next_with(0.999_999).as_millis(), 399);
        b.reset();
        assert_eq!(b.next_with(1.0), 100 * MS);
    }

    #[test]
    fn random_delays_stay_under_the_ceiling_and_spread() {
        let mut rng = Rng::new();
        let mut b = Backoff::new(500 * MS, 15_000 * MS);
        let mut seen = Vec::new();
        for _ in 0..200 {
            b.reset();
            let d = b.next(&mut rng);
            assert!(d <= 500 * MS, "{d:?}");
            seen.push(d);
        }
        // Full jitter: both halves of the range are used.
        assert!(seen.iter().any(|d| *d < 250 * MS));
        assert!(seen.iter().any(|d| *d >= 250 * MS));
    }

    #[test]
    fn generators_differ() {
        let (mut a, mut b) = (Rng::new(), Rng::new());
        assert_ne!(a.next_u64(), b.next_u64());
        for _ in 0..1000 {
            let u = a.unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
