//! Herald's traces: one OpenTelemetry trace follows a message from a
//! backend's `Router.Publish` (or a client's `publish`) through NATS to
//! every edge that delivers it.
//!
//! - [`init`] builds the OTLP exporter and the `tracing` layer that turns
//!   Herald's spans into OpenTelemetry spans, when an endpoint is configured.
//! - Herald's spans use the target [`TARGET`]. Without an exporter no layer
//!   wants that target, so those spans are disabled where they are written
//!   and cost a cached branch: the hot path pays nothing measurable.
//! - The W3C trace context (`traceparent`, `tracestate`) crosses process
//!   boundaries in gRPC metadata ([`GrpcServerSpans`]) and NATS headers
//!   ([`inject`], [`extract`]).
//! - Latency histograms observed inside a trace keep its id as an exemplar
//!   ([`exemplar`]), for dashboards to link a slow bucket to a trace.

mod exemplar;
mod grpc;
mod logs;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::registry::LookupSpan;

pub use exemplar::{TraceExemplar, TracedHistogram, exemplar, observe_traced};
pub use grpc::GrpcServerSpans;
pub use logs::{SpanStack, WithTraceIds, remember_dispatch};

/// The `tracing` target of every span Herald exports.
pub const TARGET: &str = "herald_trace";

/// Whether spans are being exported: checked before any work that only
/// tracing needs (reading or writing trace context).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether [`init`] set up an exporter in this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// What [`init`] needs: the standard `OTEL_*` settings (from the
/// environment or the matching flags) and this process's identity.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: where spans go (OTLP over gRPC).
    /// Nothing is exported without it.
    pub endpoint: Option<String>,
    /// `OTEL_SDK_DISABLED`: no export even with an endpoint.
    pub disabled: bool,
    /// `OTEL_SERVICE_NAME`, else the process's default (`herald-edge`, ...).
    pub service_name: String,
    /// `service.instance.id`: the node or replica id.
    pub instance_id: String,
    /// `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`.
    pub sampler: Option<String>,
    pub sampler_arg: Option<String>,
    /// `OTEL_RESOURCE_ATTRIBUTES`: `key=value,key=value`.
    pub resource_attributes: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "unknown traces sampler `{0}`; expected always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
    )]
    Sampler(String),
    #[error("the sampler argument `{0}` is not a ratio between 0 and 1")]
    SamplerArg(String),
    #[error("resource attribute `{0}` is not key=value")]
    ResourceAttribute(String),
    #[error("cannot start the trace exporter's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot build the OTLP exporter for {endpoint}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The exporting side, kept alive for the life of the process.
pub struct Telemetry {
    provider: SdkTracerProvider,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// Sends the spans still buffered and stops exporting.
    pub fn shutdown(mut self) {
        if let Err(e) = self.provider.shutdown_with_timeout(Duration::from_secs(3)) {
            tracing::warn!(error = %e, "the last spans could not be exported");
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Sets up export when `settings` ask for it. Returns the layer to add to
/// the process's subscriber (it sees only [`TARGET`] spans) and the handle
/// that must live as long as the process; `None` when nothing is to be
/// exported.
#[allow(clippy::type_complexity)]
pub fn init<S>(
    settings: &Settings,
) -> Result<Option<(Telemetry, Box<dyn Layer<S> + Send + Sync>)>, TelemetryError>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let Some(endpoint) = settings.endpoint.clone().filter(|e| !e.is_empty()) else {
        return Ok(None);
    };
    if settings.disabled {
        return Ok(None);
    }
    let sampler = sampler(settings)?;
    let resource = resource(settings)?;
    // The SDK exports from a thread of its own that has no Tokio runtime,
    // and the gRPC exporter needs one: a small runtime runs the exports.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(TelemetryError::Runtime)?;
    let exporter = {
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|source| TelemetryError::Exporter {
                endpoint: endpoint.clone(),
                source,
            })?
    };
    let exporter = OnRuntime {
        inner: Arc::new(exporter),
        handle: runtime.handle().clone(),
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(resource)
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let tracer = provider.tracer("herald");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .and_then(SpanStack)
        .with_filter(Targets::new().with_target(TARGET, LevelFilter::TRACE));
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Some((
        Telemetry {
            provider,
            runtime: Some(runtime),
        },
        Box::new(layer),
    )))
}

fn sampler(settings: &Settings) -> Result<Sampler, TelemetryError> {
    let ratio = || -> Result<f64, TelemetryError> {
        match settings.sampler_arg.as_deref() {
            None | Some("") => Ok(1.0),
            Some(arg) => arg
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| TelemetryError::SamplerArg(arg.to_string())),
        }
    };
    Ok(
        match settings
            .sampler
            .as_deref()
            .unwrap_or("parentbased_always_on")
        {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
            "parentbased_always_on" | "" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            "parentbased_traceidratio" => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio()?)))
            }
            other => return Err(TelemetryError::Sampler(other.to_string())),
        },
    )
}

fn resource(settings: &Settings) -> Result<Resource, TelemetryError> {
    let mut attributes = Vec::new();
    let mut has_instance = false;
    for pair in settings
        .resource_attributes
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| TelemetryError::ResourceAttribute(pair.to_string()))?;
        has_instance |= k.trim() == "service.instance.id";
        attributes.push(KeyValue::new(k.trim().to_string(), v.trim().to_string()));
    }
    if !has_instance {
        attributes.push(KeyValue::new(
            "service.instance.id",
            settings.instance_id.clone(),
        ));
    }
    Ok(Resource::builder_empty()
        .with_service_name(settings.service_name.clone())
        .with_attributes(attributes)
        .build())
}

/// Runs the OTLP exporter's calls on the runtime made for it.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: Arc<E>,
    handle: tokio::runtime::Handle,
}

impl<E: SpanExporter + Send + Sync + 'static> SpanExporter for OnRuntime<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let task = self.handle.spawn(async move { inner.export(batch).await });
        async move {
            task.await
                .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string())))
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// Writes the trace context of `span` (`traceparent`, and `tracestate`
/// when there is one) through `set`. Nothing when tracing is off or the
/// span is not recorded.
pub fn inject(span: &tracing::Span, set: impl FnMut(&str, String)) {
    if !enabled() || span.is_disabled() {
        return;
    }
    struct Set<F>(F);
    impl<F: FnMut(&str, String)> Injector for Set<F> {
        fn set(&mut self, key: &str, value: String) {
            (self.0)(key, value)
        }
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut Set(set));
}

/// Makes the trace context read through `get` (`traceparent`, ...) the
/// parent of `span`. Nothing when tracing is off or no context came.
pub fn extract<'a>(span: &tracing::Span, get: impl Fn(&str) -> Option<&'a str>) {
    if !enabled() || span.is_disabled() {
        return;
    }
    struct Fields<'a>([(&'static str, Option<&'a str>); 2]);
    impl Extractor for Fields<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.iter().find(|(k, _)| *k == key).and_then(|(_, v)| *v)
        }
        fn keys(&self) -> Vec<&str> {
            self.0.iter().map(|(k, _)| *k).collect()
        }
    }
    let fields = Fields([
        ("traceparent", get("traceparent")),
        ("tracestate", get("tracestate")),
    ]);
    if fields.0[0].1.is_none() {
        return;
    }
    let cx: Context = TraceContextPropagator::new().extract(&fields);
    if opentelemetry::trace::TraceContextExt::span(&cx)
        .span_context()
        .is_valid()
    {
        let _ = span.set_parent(cx);
    }
}

/// The trace id and span id of `span` as hex, for logs; `None` when the
/// span is not exported.
pub fn ids(span: &tracing::Span) -> Option<(String, String)> {
    if !enabled() || span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = opentelemetry::trace::TraceContextExt::span(&cx)
        .span_context()
        .clone();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            service_name: "herald-test".into(),
            instance_id: "node-1".into(),
            ..Settings::default()
        }
    }

    #[test]
    fn samplers_are_read_as_the_specification_names_them() {
        let mut s = settings();
        s.sampler = Some("parentbased_traceidratio".into());
        s.sampler_arg = Some("0.25".into());
        assert!(matches!(sampler(&s).unwrap(), Sampler::ParentBased(_)));
        s.sampler_arg = Some("2".into());
        assert!(matches!(sampler(&s), Err(TelemetryError::SamplerArg(_))));
        s.sampler = Some("sometimes".into());
        assert!(matches!(sampler(&s), Err(TelemetryError::Sampler(_))));
    }

    #[test]
    fn resource_attributes_are_pairs_and_the_instance_defaults_to_the_node() {
        let mut s = settings();
        s.resource_attributes = Some("deployment.environment=prod, team=rt".into());
        let r = resource(&s).unwrap();
        let get = |k: &'static str| {
            r.get(&opentelemetry::Key::from_static_str(k))
                .map(|v| v.to_string())
        };
        assert_eq!(get("service.name").as_deref(), Some("herald-test"));
        assert_eq!(get("service.instance.id").as_deref(), Some("node-1"));
        assert_eq!(get("team").as_deref(), Some("rt"));
        s.resource_attributes = Some("nonsense".into());
        assert!(matches!(
            resource(&s),
            Err(TelemetryError::ResourceAttribute(_))
        ));
    }

    /// A JSON line logged inside an exported span names its trace and
    /// span; one logged outside does not.
    #[test]
    fn json_logs_inside_a_span_carry_its_ids() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;

        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let sink = lines.clone();
        let provider = SdkTracerProvider::builder().build();
        let otel = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("test"))
            .and_then(SpanStack)
            .with_filter(Targets::new().with_target(TARGET, LevelFilter::TRACE));
        let fmt = tracing_subscriber::fmt::layer()
            .event_format(WithTraceIds(tracing_subscriber::fmt::format().json()))
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .with_writer(move || sink.clone())
            .with_filter(tracing_subscriber::EnvFilter::new("info,herald_trace=off"));
        let subscriber = tracing_subscriber::registry().with(otel).with(fmt);
        ENABLED.store(true, Ordering::Relaxed);
        let dispatch = tracing::Dispatch::new(subscriber);
        tracing::dispatcher::with_default(&dispatch, || {
            let span = tracing::info_span!(target: TARGET, "work");
            let (trace, id) = ids(&span).expect("an exported span has ids");
            span.in_scope(|| tracing::info!("inside"));
            tracing::info!("outside");
            let out = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
            let mut parsed = out.lines().map(|l| -> serde_json::Value {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))
            });
            let inside = parsed.next().unwrap();
            assert_eq!(inside["fields"]["message"], "inside");
            assert_eq!(inside["trace_id"], trace.as_str());
            assert_eq!(inside["span_id"], id.as_str());
            let outside = parsed.next().unwrap();
            assert_eq!(outside["fields"]["message"], "outside");
            assert!(outside.get("trace_id").is_none(), "{outside}");
        });
        ENABLED.store(false, Ordering::Relaxed);
    }

    #[test]
    fn without_an_endpoint_nothing_is_set_up() {
        let none = init::<tracing_subscriber::Registry>(&settings()).unwrap();
        assert!(none.is_none());
    }
}
