//! How fast a client may ask: the `[limits]` of the configuration file,
//! which a namespace may override in `[namespaces.<name>.limits]`.
//! Per connection for `publish`, `join` and presence updates, and per user
//! (across every edge and device) for `publish`. Zero means no limit; a
//! rate given without its burst gets a burst of twice the rate.

use serde::Deserialize;

/// The rates in force for one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// `publish` requests a second, per connection, with bursts of
    /// `publish_burst`.
    pub publish_per_second: u32,
    pub publish_burst: u32,
    /// `publish` requests a second, per user, across every edge and device.
    pub user_publish_per_second: u32,
    /// `join` requests a second, per connection.
    pub join_per_second: u32,
    pub join_burst: u32,
    /// Presence updates (`presence_set`, `join` with `meta`) a second, per
    /// connection.
    pub presence_per_second: u32,
    pub presence_burst: u32,
}

impl Default for RateLimits {
    /// Far above what people type, low enough that one client cannot
    /// drown its rooms.
    fn default() -> RateLimits {
        RateLimits {
            publish_per_second: 50,
            publish_burst: 100,
            user_publish_per_second: 200,
            join_per_second: 20,
            join_burst: 40,
            presence_per_second: 10,
            presence_burst: 20,
        }
    }
}

/// A namespace's overrides: the fields it names replace `[limits]`'s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateOverrides {
    pub publish_per_second: Option<u32>,
    pub publish_burst: Option<u32>,
    pub user_publish_per_second: Option<u32>,
    pub join_per_second: Option<u32>,
    pub join_burst: Option<u32>,
    pub presence_per_second: Option<u32>,
    pub presence_burst: Option<u32>,
}

impl RateLimits {
    /// These limits with `over`'s fields in place of theirs.
    pub fn with(self, over: &RateOverrides) -> RateLimits {
        // A rate given alone brings its own burst: twice the rate.
        let pair = |rate: Option<u32>, burst: Option<u32>, base: (u32, u32)| match (rate, burst) {
            (Some(r), Some(b)) => (r, b),
            (Some(r), None) => (r, r.saturating_mul(2)),
            (None, Some(b)) => (base.0, b),
            (None, None) => base,
        };
        let (publish_per_second, publish_burst) = pair(
            over.publish_per_second,
            over.publish_burst,
            (self.publish_per_second, self.publish_burst),
        );
        let (join_per_second, join_burst) = pair(
            over.join_per_second,
            over.join_burst,
            (self.join_per_second, self.join_burst),
        );
        let (presence_per_second, presence_burst) = pair(
            over.presence_per_second,
            over.presence_burst,
            (self.presence_per_second, self.presence_burst),
        );
        RateLimits {
            publish_per_second,
            publish_burst,
            user_publish_per_second: over
                .user_publish_per_second
                .unwrap_or(self.user_publish_per_second),
            join_per_second,
            join_burst,
            presence_per_second,
            presence_burst,
        }
    }

    /// A limit whose burst is below its rate would refuse requests the rate
    /// allows: said in plain words, naming the fields.
    pub fn check(&self, at: &str) -> Result<(), String> {
        for (rate, burst, name) in [
            (self.publish_per_second, self.publish_burst, "publish"),
            (self.join_per_second, self.join_burst, "join"),
            (self.presence_per_second, self.presence_burst, "presence"),
        ] {
            if rate > 0 && burst < rate {
                return Err(format!(
                    "{at}: {name}_burst ({burst}) is below {name}_per_second ({rate}); \
                     the burst must be at least the rate"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_override_the_fields_they_name() {
        let base = RateLimits::default();
        let over: RateOverrides = toml::from_str("publish_per_second = 5").unwrap();
        let merged = base.with(&over);
        assert_eq!((merged.publish_per_second, merged.publish_burst), (5, 10));
        assert_eq!(merged.join_per_second, base.join_per_second);
        assert_eq!(merged.user_publish_per_second, base.user_publish_per_second);
        let over: RateOverrides = toml::from_str("join_burst = 70").unwrap();
        let merged = base.with(&over);
        assert_eq!((merged.join_per_second, merged.join_burst), (20, 70));
    }

    #[test]
    fn a_burst_below_its_rate_is_refused_and_unknown_fields_too() {
        let over: RateOverrides = toml::from_str("join_per_second = 30\njoin_burst = 10").unwrap();
        let e = RateLimits::default()
            .with(&over)
            .check("[limits]")
            .unwrap_err();
        assert!(e.contains("join_burst (10)"), "{e}");
        assert!(toml::from_str::<RateOverrides>("publish_per_minute = 3").is_err());
    }
}
