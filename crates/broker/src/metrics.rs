//! The broker's latencies: NATS requests and durable appends. They are
//! process-wide because every service of a process (all three in `herald
//! dev`) shares the broker and its callers hold no registry; each service
//! registers them, with the broker's connection state, in its own registry
//! ([`register_metrics`]).

use std::sync::LazyLock;
use std::time::Instant;

use herald_telemetry::{TracedHistogram, observe_traced};
use prometheus_client::registry::Registry;

use crate::SharedBroker;

/// The buckets every Herald latency histogram uses, in seconds (the same as
/// `herald_ops::metrics::latency_buckets`; this crate does not depend on
/// the services' crate), keeping the caller's trace as exemplar.
fn latency_histogram() -> TracedHistogram {
    TracedHistogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 16,
    ))
}

static REQUESTS: LazyLock<TracedHistogram> = LazyLock::new(latency_histogram);
static APPENDS: LazyLock<TracedHistogram> = LazyLock::new(latency_histogram);

/// Times a NATS request, from sending to its answer (or its failure).
pub(crate) async fn timed_request<T>(request: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let answer = request.await;
    observe_traced(&REQUESTS, started.elapsed().as_secs_f64());
    answer
}

/// Times a durable append, from the call to the store's confirmation.
pub(crate) async fn timed_append<T>(append: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let stored = append.await;
    observe_traced(&APPENDS, started.elapsed().as_secs_f64());
    stored
}

/// Registers `herald_broker_connected`, `herald_broker_request_duration_seconds`
/// and `herald_durable_append_duration_seconds` in `registry`.
pub fn register_metrics(registry: &mut Registry, broker: &SharedBroker) {
    let broker = broker.clone();
    registry.register_collector(Box::new(Connected(broker)));
    registry.register(
        "broker_request_duration_seconds",
        "NATS requests (presence queries, subscription confirmations), from sending to the answer or the failure",
        REQUESTS.clone(),
    );
    registry.register(
        "durable_append_duration_seconds",
        "Durable room messages stored (JetStream; in memory in herald dev), from the call to the store's confirmation",
        APPENDS.clone(),
    );
}

/// `herald_broker_connected`, read at scrape time.
struct Connected(SharedBroker);

impl std::fmt::Debug for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connected")
    }
}

impl prometheus_client::collector::Collector for Connected {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let gauge =
            prometheus_client::metrics::gauge::ConstGauge::new(i64::from(self.0.is_connected()));
        let metric = encoder.encode_descriptor(
            "broker_connected",
            "1 while the connection to the broker (NATS) is up, 0 while it is not.",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}
