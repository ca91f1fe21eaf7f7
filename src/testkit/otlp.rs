//! An OTLP/gRPC receiver of traces and metrics, the front half of an OpenTelemetry collector
//! (its services from `opentelemetry-proto`): it keeps every span and every metric export it is
//! sent, for the tests and benches that trace or export metrics.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
pub use opentelemetry_proto::tonic::metrics::v1::ResourceMetrics;
pub use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
/// The message types of what the receiver keeps, for tests to take apart.
pub use opentelemetry_proto::tonic::{common::v1 as common, metrics::v1 as metrics};

/// A running receiver; it serves until the runtime it was started on stops.
#[derive(Clone, Default)]
pub struct OtlpReceiver {
    spans: Arc<Mutex<Vec<Span>>>,
    metric_exports: Arc<Mutex<Vec<ResourceMetrics>>>,
}

impl OtlpReceiver {
    /// Serve on a free port of 127.0.0.1; returns the receiver and its `host:port`.
    pub async fn start() -> std::io::Result<(OtlpReceiver, String)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        Ok((OtlpReceiver::serve(listener), addr))
    }

    /// Serve on `listener`: for a test that holds its address before the receiver is up.
    pub fn serve(listener: tokio::net::TcpListener) -> OtlpReceiver {
        let receiver = OtlpReceiver::default();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver.clone()))
                .add_service(MetricsServiceServer::new(receiver.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        receiver
    }

    /// Every resource's metrics of every export received so far, in arrival order.
    pub fn metric_exports(&self) -> Vec<ResourceMetrics> {
        self.metric_exports.lock().expect("metric list lock").clone()
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().expect("span list lock").clone()
    }

    /// How many spans were received.
    pub fn count(&self) -> usize {
        self.spans.lock().expect("span list lock").len()
    }
}

#[tonic::async_trait]
impl TraceService for OtlpReceiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.spans.lock().expect("span list lock");
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                kept.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for OtlpReceiver {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metric_exports.lock().expect("metric list lock").extend(req.into_inner().resource_metrics);
        Ok(tonic::Response::new(Default::default()))
    }
}
