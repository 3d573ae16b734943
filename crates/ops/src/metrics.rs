//! Building blocks for the metrics every service exports: the latency
//! buckets they share, gauges read at scrape time, and label values that
//! cannot grow without bound.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Buckets of every latency histogram, in seconds: 0.5 ms to about 16 s,
/// doubling. One set for every histogram, so that dashboards compare them
/// bucket for bucket.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16)
}

/// A histogram with [`latency_buckets`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// A histogram with [`latency_buckets`] that keeps exemplars (the trace
/// of a bucket's latest observation): for latencies observed per call.
pub fn traced_latency_histogram() -> herald_telemetry::TracedHistogram {
    herald_telemetry::TracedHistogram::new(latency_buckets())
}

/// A gauge whose value is read when `/metrics` is scraped, for figures that
/// already live elsewhere (a connection's state, the process's memory):
/// nothing is updated on any hot path.
pub struct ScrapeGauge {
    name: &'static str,
    help: &'static str,
    read: Box<dyn Fn() -> i64 + Send + Sync>,
}

impl ScrapeGauge {
    /// Registered with [`prometheus_client::registry::Registry::register_collector`],
    /// `name` gets the registry's prefix like any other metric.
    pub fn new(
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> i64 + Send + Sync + 'static,
    ) -> Box<ScrapeGauge> {
        Box::new(ScrapeGauge {
            name,
            help,
            read: Box::new(read),
        })
    }
}

impl std::fmt::Debug for ScrapeGauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScrapeGauge")
            .field("name", &self.name)
            .finish()
    }
}

impl Collector for ScrapeGauge {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new((self.read)());
        let metric = encoder.encode_descriptor(self.name, self.help, None, gauge.metric_type())?;
        gauge.encode(metric)
    }
}

/// Namespaces told apart in labels before the rest are counted together.
/// Without a configuration file every namespace is open, so clients choose
/// them: an unbounded label would let them grow the series without limit.
const MAX_NAMESPACES: usize = 64;

/// The label for namespaces beyond [`MAX_NAMESPACES`].
pub const OTHER_NAMESPACE: &str = "_other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceLabel {
    namespace: String,
}

/// A counter per namespace (`namespace` label): the first
/// [`MAX_NAMESPACES`] seen each have theirs, later ones share
/// [`OTHER_NAMESPACE`]. Counting costs a read lock and a lookup by `&str`,
/// no allocation, once a namespace has been seen.
#[derive(Clone, Default)]
pub struct NamespaceCounters {
    family: Family<NamespaceLabel, Counter>,
    cached: Arc<RwLock<HashMap<String, Counter>>>,
}

impl NamespaceCounters {
    /// Registers the counters as `name` (`_total` is added) in `registry`.
    pub fn register(&self, registry: &mut Registry, name: &str, help: &str) {
        registry.register(name, help, self.family.clone());
    }

    pub fn inc_by(&self, namespace: &str, n: u64) {
        if let Some(counter) = self.cached.read().expect("namespaces").get(namespace) {
            counter.inc_by(n);
            return;
        }
        let mut cached = self.cached.write().expect("namespaces");
        let label = if cached.len() < MAX_NAMESPACES {
            namespace
        } else {
            OTHER_NAMESPACE
        };
        let counter = cached
            .entry(label.to_string())
            .or_insert_with(|| {
                self.family
                    .get_or_create(&NamespaceLabel {
                        namespace: label.to_string(),
                    })
                    .clone()
            })
            .clone();
        counter.inc_by(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_beyond_the_cap_share_one_counter() {
        let counters = NamespaceCounters::default();
        let mut registry = Registry::with_prefix("herald");
        counters.register(&mut registry, "things", "Things");
        for i in 0..MAX_NAMESPACES {
            counters.inc_by(&format!("ns{i}"), 1);
        }
        counters.inc_by("late", 2);
        counters.inc_by("later", 3);
        counters.inc_by("ns3", 1);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(
            out.contains("herald_things_total{namespace=\"_other\"} 5\n"),
            "{out}"
        );
        assert!(
            out.contains("herald_things_total{namespace=\"ns3\"} 2\n"),
            "{out}"
        );
    }

    #[test]
    fn scrape_gauges_read_their_value_at_scrape_time() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicI64, Ordering};
        let value = Arc::new(AtomicI64::new(1));
        let mut registry = prometheus_client::registry::Registry::with_prefix("herald");
        let read = value.clone();
        registry.register_collector(ScrapeGauge::new("thing", "A thing", move || {
            read.load(Ordering::Relaxed)
        }));
        value.store(7, Ordering::Relaxed);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("herald_thing 7\n"), "{out}");
    }
}
