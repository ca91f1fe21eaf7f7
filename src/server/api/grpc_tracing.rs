//! A server span per client RPC (OpenTelemetry; see `otel`), named `service/method`
//! (`etcdserverpb.KV/Put`; `unknown/unknown` for a path no service serves), kind server, a child of the client's W3C trace context when its
//! metadata carries one. The handler runs inside the span's context, so the node's own spans
//! (propose, commit, apply) are its children. The span ends when the handler has answered (for
//! a stream: when the stream is set up), with the gRPC status.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use opentelemetry::trace::{FutureExt, SpanKind, Status, TraceContextExt, Tracer};

/// The tower layer; `enabled` is whether traces are exported at all (no span is made if not).
#[derive(Clone, Copy, Debug)]
pub struct GrpcTracingLayer {
    pub enabled: bool,
}

impl<S> tower_layer::Layer<S> for GrpcTracingLayer {
    type Service = Traced<S>;
    fn layer(&self, inner: S) -> Traced<S> {
        Traced { inner, enabled: self.enabled }
    }
}

/// A service whose gRPC calls are traced.
#[derive(Clone, Debug)]
pub struct Traced<S> {
    inner: S,
    enabled: bool,
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for Traced<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if !self.enabled || !grpc {
            return Box::pin(self.inner.call(req));
        }
        let parent = crate::otel::parent_from(req.headers());
        let (service, method) = super::grpc_metrics::method_name(req.uri().path());
        let name = format!("{service}/{method}");
        let attributes = vec![
            opentelemetry::KeyValue::new("rpc.system", "grpc"),
            opentelemetry::KeyValue::new("rpc.service", service),
            opentelemetry::KeyValue::new("rpc.method", method),
        ];
        let tracer = opentelemetry::global::tracer("geolock");
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(&tracer, &parent);
        let cx = parent.with_span(span);
        let fut = self.inner.call(req).with_context(cx.clone());
        Box::pin(async move {
            let resp = fut.await;
            let span = cx.span();
            let code = match &resp {
                Ok(r) => r.headers().get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i32>().ok()).unwrap_or(0),
                Err(_) => 2,
            };
            span.set_attribute(opentelemetry::KeyValue::new("rpc.grpc.status_code", i64::from(code)));
            if code != 0 {
                span.set_status(Status::error(format!("gRPC status {code}")));
            }
            span.end();
            resp
        })
    }
}
