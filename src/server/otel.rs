//! OpenTelemetry traces, exported over OTLP/gRPC; the only importer of the SDK and exporter.
//! Off unless `--experimental-enable-distributed-tracing` (etcd 3.5's flags, as every setting
//! here). When on: a span per client RPC (`api`), with children for a write's propose, commit and
//! apply (`raft`); a client's W3C `traceparent` makes the RPC's span its child and decides
//! sampling (etcd's rule: parent-based, otherwise `sampling_rate` per million).
//!
//! A collector that is slow or down never holds a request: finished spans go to a bounded queue
//! ([`TRACE_SPANS_QUEUED_MAX`]); when it is full they are dropped and counted
//! (`geolock_tracing_spans_dropped_total`), and one task exports the queue in batches.
//!
//! [`TRACE_SPANS_QUEUED_MAX`]: geolock_core::limits::TRACE_SPANS_QUEUED_MAX

use std::sync::LazyLock;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor};
use prometheus::IntCounter;

use crate::config::TracingSection;
use crate::metrics::counter;
use geolock_core::limits::TRACE_SPANS_QUEUED_MAX;

/// Spans sent in one export request.
const EXPORT_BATCH_MAX: usize = 512;
/// How long the first span of a batch waits for others. Exporting each span as it ends cost 9 %
/// of put throughput at 1 % sampling (`geolock-bench -- tracing`): a request per few spans.
const EXPORT_DELAY: Duration = Duration::from_secs(1);
/// How long one export may take before its spans count as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

struct Counters {
    dropped: IntCounter,
    exported: IntCounter,
    failed: IntCounter,
}

static COUNTERS: LazyLock<Counters> = LazyLock::new(|| Counters {
    dropped: counter(
        "geolock_tracing_spans_dropped_total",
        "Finished spans dropped because the export queue was full.",
    ),
    exported: counter("geolock_tracing_spans_exported_total", "Spans the collector accepted."),
    failed: counter("geolock_tracing_spans_failed_total", "Spans whose export failed or timed out."),
});

/// Finished spans into the bounded queue.
#[derive(Debug)]
struct Queue {
    tx: tokio::sync::mpsc::Sender<SpanData>,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            COUNTERS.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Export the queue in batches, one request at a time, until every sender is gone.
async fn export(mut rx: tokio::sync::mpsc::Receiver<SpanData>, exporter: opentelemetry_otlp::SpanExporter) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let full = tokio::time::sleep(EXPORT_DELAY);
        tokio::pin!(full);
        while batch.len() < EXPORT_BATCH_MAX {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(span) => batch.push(span),
                    None => break,
                },
                _ = &mut full => break,
            }
        }
        let n = batch.len() as u64;
        match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(batch)).await {
            Ok(Ok(())) => COUNTERS.exported.inc_by(n),
            Ok(Err(e)) => {
                COUNTERS.failed.inc_by(n);
                tracing::debug!("exporting {n} spans: {e}");
            }
            Err(_) => COUNTERS.failed.inc_by(n),
        }
    }
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
#[error("distributed tracing: {0}")]
pub struct TracingError(String);

/// Install the tracer provider `cfg` asks for (nothing when tracing is off). Must run on the
/// Tokio runtime, which carries the export task.
pub fn init(cfg: &TracingSection, member: &str) -> Result<(), TracingError> {
    LazyLock::force(&COUNTERS);
    if !cfg.experimental_enable_distributed_tracing {
        return Ok(());
    }
    let endpoint = match &cfg.experimental_distributed_tracing_address {
        a if a.contains("://") => a.clone(),
        a => format!("http://{a}"),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| TracingError(e.to_string()))?;
    let instance = if cfg.experimental_distributed_tracing_instance_id.is_empty() {
        member
    } else {
        &cfg.experimental_distributed_tracing_instance_id
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(cfg.experimental_distributed_tracing_service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new("service.instance.id", instance.to_string()))
        .build();
    let (tx, rx) = tokio::sync::mpsc::channel(TRACE_SPANS_QUEUED_MAX);
    tokio::spawn(export(rx, exporter));
    let ratio = f64::from(cfg.experimental_distributed_tracing_sampling_rate) / 1_000_000.0;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(Queue { tx })
        .with_sampler(opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
            opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(ratio),
        )))
        .with_resource(resource)
        .build();
    opentelemetry::global::set_tracer_provider(provider);
    Ok(())
}

/// The W3C trace context a request's headers carry (`traceparent`, `tracestate`), as the
/// parent of the span that serves it; an empty context when there is none.
pub fn parent_from(headers: &http::HeaderMap) -> Context {
    struct Headers<'a>(&'a http::HeaderMap);
    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(|k| k.as_str()).collect()
        }
    }
    opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&Headers(headers))
}
