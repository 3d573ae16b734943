//! gRPC server latency by service, method and status code
//! (`herald_grpc_server_handling_seconds`), as a tower layer on the tonic
//! server, so every service of a process is measured the same way and no
//! handler needs to know. A call is timed from its request to its final
//! status: the `grpc-status` of a trailers-only answer (an error), or the
//! trailers after the last message. A streaming call (`Presence.Watch`)
//! is therefore timed for as long as the stream lasts. A call in an
//! exported trace leaves its trace id as its bucket's exemplar.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;

use herald_telemetry::{TraceExemplar, TracedHistogram};

use crate::Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    grpc_service: String,
    grpc_method: String,
    grpc_code: &'static str,
}

type Calls = Family<CallLabels, TracedHistogram, fn() -> TracedHistogram>;

/// Times every call of the server it wraps (`Server::builder().layer(..)`).
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    calls: Calls,
}

impl GrpcMetricsLayer {
    /// Registers `herald_grpc_server_handling_seconds` in `metrics`.
    pub fn new(metrics: &Metrics) -> GrpcMetricsLayer {
        let calls: Calls = Family::new_with_constructor(crate::metrics::traced_latency_histogram);
        metrics.lock().expect("metrics registry").register(
            "grpc_server_handling_seconds",
            "gRPC calls served, from the request to the final status, by service, method and status code",
            calls.clone(),
        );
        GrpcMetricsLayer { calls }
    }
}

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics {
            inner,
            calls: self.calls.clone(),
        }
    }
}

/// See [`GrpcMetricsLayer`].
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    calls: Calls,
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for GrpcMetrics<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    type Response = http::Response<Timed<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        // `/herald.v1.Router/Publish`: the service, then the method.
        let (service, method) = req
            .uri()
            .path()
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", ""));
        let mut call = Call {
            calls: self.calls.clone(),
            service: service.to_string(),
            method: method.to_string(),
            started: Instant::now(),
            done: false,
            // The span layer outside this one calls it in the call's span.
            trace: herald_telemetry::exemplar(&tracing::Span::current()),
        };
        let answer = self.inner.call(req);
        Box::pin(async move {
            let response = answer.await?;
            // Trailers-only: the status came with the headers.
            if let Some(code) = response.headers().get("grpc-status") {
                call.finish(code_name(code.as_bytes()));
            }
            Ok(response.map(|body| Timed { body, call }))
        })
    }
}

/// One call being timed; observed once, at its status or when dropped.
struct Call {
    calls: Calls,
    service: String,
    method: String,
    started: Instant,
    done: bool,
    trace: Option<TraceExemplar>,
}

impl Call {
    fn finish(&mut self, code: &'static str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let labels = CallLabels {
            grpc_service: std::mem::take(&mut self.service),
            grpc_method: std::mem::take(&mut self.method),
            grpc_code: code,
        };
        self.calls.get_or_create(&labels).observe(
            self.started.elapsed().as_secs_f64(),
            self.trace.take(),
            None,
        );
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // The answer was dropped before its status: the client went away.
        self.finish("Canceled");
    }
}

/// A response body that observes its call when the trailers pass.
pub struct Timed<B> {
    body: B,
    call: Call,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Timed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(|t| t.get("grpc-status")) {
                    this.call.finish(code_name(code.as_bytes()));
                }
            }
            Poll::Ready(Some(Err(_))) => this.call.finish("Unknown"),
            Poll::Ready(None) => this.call.finish("Unknown"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The canonical name of a `grpc-status` value (`OK`, `InvalidArgument`, ...),
/// as other gRPC exporters label it.
fn code_name(status: &[u8]) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    std::str::from_utf8(status)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .and_then(|n| NAMES.get(n).copied())
        .unwrap_or("Unknown")
}

#[cfg(test)]
mod tests {
    use super::code_name;

    #[test]
    fn status_codes_get_their_canonical_names() {
        assert_eq!(code_name(b"0"), "OK");
        assert_eq!(code_name(b"3"), "InvalidArgument");
        assert_eq!(code_name(b"16"), "Unauthenticated");
        assert_eq!(code_name(b"99"), "Unknown");
        assert_eq!(code_name(b"x"), "Unknown");
    }
}
