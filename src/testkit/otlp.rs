//! An OTLP/gRPC trace receiver, the front half of an OpenTelemetry collector (its service from
//! `opentelemetry-proto`): it keeps every span it is sent, for the tests and benches that trace.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
pub use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};

/// A running receiver; it serves until the runtime it was started on stops.
#[derive(Clone, Default)]
pub struct OtlpReceiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

impl OtlpReceiver {
    /// Serve on a free port of 127.0.0.1; returns the receiver and its `host:port`.
    pub async fn start() -> std::io::Result<(OtlpReceiver, String)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let receiver = OtlpReceiver::default();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Ok((receiver, addr))
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
