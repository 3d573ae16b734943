//! A server span per gRPC call, child of the caller's `traceparent` when
//! the request metadata carries one (a call without one starts a trace).
//! A tower layer, so one line adds it to a tonic server.

use std::task::{Context, Poll};

use futures::future::Either;
use tracing::Instrument;
use tracing::instrument::Instrumented;

use crate::{TARGET, enabled, extract};

/// `tonic::transport::Server::builder().layer(GrpcServerSpans)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcServerSpans;

impl<S> tower::Layer<S> for GrpcServerSpans {
    type Service = GrpcServerSpan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcServerSpan { inner }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcServerSpan<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for GrpcServerSpan<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Instrumented<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !enabled() {
            return Either::Left(self.inner.call(req));
        }
        // "/herald.v1.Router/Publish" → service and method.
        let path = req.uri().path().trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        let span = tracing::info_span!(
            target: TARGET,
            "grpc.server",
            otel.name = %path,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
        );
        extract(&span, |key| {
            req.headers().get(key).and_then(|v| v.to_str().ok())
        });
        // Inner layers (the latency histogram) see the call's span when called.
        let answer = span.in_scope(|| self.inner.call(req));
        Either::Right(answer.instrument(span))
    }
}
