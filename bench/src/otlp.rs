//! An OTLP/gRPC trace sink (`--otlp-sink`): Herald's processes export their
//! spans to it, as they would to a collector, so that the cost of tracing
//! can be measured. It counts what it receives and keeps nothing. It runs
//! on a thread of the bench's own, so its CPU is the load's, not Herald's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

/// A running sink.
pub struct OtlpSink {
    pub addr: SocketAddr,
    spans: Arc<AtomicU64>,
}

#[derive(Clone)]
struct Count(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Count {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl OtlpSink {
    pub fn start() -> Result<OtlpSink> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind the OTLP sink")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let spans = Arc::new(AtomicU64::new(0));
        let count = Count(spans.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("the OTLP sink's runtime")?;
        std::thread::Builder::new()
            .name("otlp-sink".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("a listener on this runtime");
                    let _ = tonic::transport::Server::builder()
                        .add_service(TraceServiceServer::new(count))
                        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                        .await;
                })
            })
            .context("start the OTLP sink's thread")?;
        Ok(OtlpSink { addr, spans })
    }

    /// Spans received so far.
    pub fn spans(&self) -> u64 {
        self.spans.load(Ordering::Relaxed)
    }
}
