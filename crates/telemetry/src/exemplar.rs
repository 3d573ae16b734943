//! Exemplars: a latency observation made inside an exported trace keeps
//! that trace's id beside its histogram bucket, so a dashboard's latency
//! panel links straight to a slow call's trace in Tempo. Only for
//! histograms observed per call (gRPC, NATS requests, durable appends):
//! keeping an exemplar takes a lock, which the per-delivery histograms
//! do not pay.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;

/// The exemplar's label: `trace_id`, the name Grafana's Prometheus
/// datasource looks for (`exemplarTraceIdDestinations`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceExemplar {
    pub trace_id: String,
}

/// A latency histogram that keeps, per bucket, the trace of its latest
/// observation.
pub type TracedHistogram = HistogramWithExemplars<TraceExemplar>;

/// The trace `span` belongs to, when it is exported and sampled (a trace
/// nobody kept would be a dead link); `None` at the cost of a branch when
/// traces are off.
pub fn exemplar(span: &tracing::Span) -> Option<TraceExemplar> {
    if !crate::enabled() || span.is_disabled() {
        return None;
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    let sc = opentelemetry::trace::TraceContextExt::span(&cx)
        .span_context()
        .clone();
    (sc.is_valid() && sc.is_sampled()).then(|| TraceExemplar {
        trace_id: sc.trace_id().to_string(),
    })
}

/// Observes `seconds` in `histogram`, with the current span's trace as the
/// bucket's exemplar when there is one.
pub fn observe_traced(histogram: &TracedHistogram, seconds: f64) {
    histogram.observe(seconds, exemplar(&tracing::Span::current()), None);
}
