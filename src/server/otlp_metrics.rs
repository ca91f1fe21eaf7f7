//! The member's metrics pushed to an OpenTelemetry collector over OTLP/gRPC: every family
//! `/metrics` shows, under the same names, labels and buckets, so one set of dashboards reads
//! either. Off unless `otlp_metrics.address` (`--otlp-metrics-address`) is set; etcd has no
//! such export, so the names are geolock's.
//!
//! The Prometheus registry stays the one source: each interval it is gathered (after the
//! scrape-time gauges are refreshed, as a scrape does) and translated by [`to_otlp`], the
//! mapping of OpenTelemetry's Prometheus bridge (Go's `go.opentelemetry.io/contrib/bridges/
//! prometheus`): a counter becomes a cumulative monotonic sum, a gauge a gauge, a histogram a
//! cumulative explicit-bucket histogram (the `prometheus` crate makes no summaries and
//! deprecates untyped metrics). The Rust SDK (0.33) has no hook to feed foreign data to its
//! exporter (its `ResourceMetrics` cannot be built outside it), so the request is built from
//! `opentelemetry-proto`'s types and sent by its generated client.
//!
//! A collector that is slow or down holds no request: exports run one at a time in their own
//! task, each bounded by [`EXPORT_TIMEOUT`], counted in `geolock_otlp_metrics_exports_total` and
//! `..._failed_total`. Gathering and encoding cost what a scrape of `/metrics` costs.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus::proto::{MetricFamily, MetricType};
use prometheus::IntCounter;

use crate::config::Config;
use crate::metrics::counter;

/// How long one export may take before it counts as failed. Exports start an interval apart, or
/// at once after one that took longer.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

struct Counters {
    exported: IntCounter,
    failed: IntCounter,
}

static COUNTERS: LazyLock<Counters> = LazyLock::new(|| Counters {
    exported: counter("geolock_otlp_metrics_exports_total", "Metric exports the OTLP collector accepted whole."),
    failed: counter(
        "geolock_otlp_metrics_exports_failed_total",
        "Metric exports that failed, timed out or were rejected in part (the collector down, slow or refusing).",
    ),
});

/// When this process started: the start of every cumulative series it exports.
static STARTED: LazyLock<SystemTime> = LazyLock::new(SystemTime::now);

/// Why the export could not start.
#[derive(Debug, thiserror::Error)]
#[error("otlp_metrics.address {address:?}: {reason}")]
pub struct OtlpMetricsError {
    address: String,
    reason: String,
}

/// The export a member's configuration asks for.
pub struct Exporter {
    address: String,
    client: MetricsServiceClient<tonic::transport::Channel>,
    resource: Resource,
    interval: Duration,
}

impl Exporter {
    /// The export `cfg.otlp_metrics` asks for, `None` when its address is empty. Its resource
    /// is the one the member's spans carry (`service.name`, `service.instance.id` from the
    /// `tracing` section), so a collector joins the two. The collector is connected to on the
    /// first export, and again after a failure: one that starts later is found.
    pub fn new(cfg: &Config) -> Result<Option<Exporter>, OtlpMetricsError> {
        let address = &cfg.otlp_metrics.address;
        if address.is_empty() {
            return Ok(None);
        }
        LazyLock::force(&STARTED);
        LazyLock::force(&COUNTERS);
        let url = if address.contains("://") { address.clone() } else { format!("http://{address}") };
        let endpoint = tonic::transport::Endpoint::from_shared(url)
            .map_err(|e| OtlpMetricsError { address: address.clone(), reason: e.to_string() })?
            .connect_timeout(EXPORT_TIMEOUT)
            .timeout(EXPORT_TIMEOUT);
        let t = &cfg.tracing;
        let instance = if t.experimental_distributed_tracing_instance_id.is_empty() {
            &cfg.name
        } else {
            &t.experimental_distributed_tracing_instance_id
        };
        let resource = Resource {
            attributes: vec![
                text("service.name", &t.experimental_distributed_tracing_service_name),
                text("service.instance.id", instance),
            ],
            ..Default::default()
        };
        Ok(Some(Exporter {
            address: address.clone(),
            client: MetricsServiceClient::new(endpoint.connect_lazy()),
            resource,
            interval: cfg.otlp_metrics.interval,
        }))
    }

    /// Export every interval, the first one interval after the start, one at a time, for as long as
    /// `refresh` (which brings the scrape-time gauges up to date) says the member runs.
    pub async fn run(mut self, refresh: impl Fn() -> bool) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut failing = false;
        loop {
            ticker.tick().await;
            if !refresh() {
                return;
            }
            let request = ExportMetricsServiceRequest {
                resource_metrics: vec![ResourceMetrics {
                    resource: Some(self.resource.clone()),
                    scope_metrics: vec![ScopeMetrics {
                        scope: Some(InstrumentationScope {
                            name: "geolock".into(),
                            version: env!("CARGO_PKG_VERSION").into(),
                            ..Default::default()
                        }),
                        metrics: to_otlp(&prometheus::gather(), unix_nanos(*STARTED), unix_nanos(SystemTime::now())),
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                }],
            };
            let answer = tokio::time::timeout(EXPORT_TIMEOUT, self.client.export(request)).await;
            // A collector that stays down is logged once, not every interval: the counter
            // tells how long.
            match refusal(answer.map_err(|_| ()).map(|r| r.map(tonic::Response::into_inner))) {
                None => {
                    COUNTERS.exported.inc();
                    if std::mem::take(&mut failing) {
                        tracing::info!("exporting metrics to {} again", self.address);
                    }
                }
                Some(why) => {
                    COUNTERS.failed.inc();
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(
                            "exporting metrics to {}: {why} (each failure counted in \
                             geolock_otlp_metrics_exports_failed_total)",
                            self.address
                        );
                    }
                }
            }
        }
    }
}

/// Why an export's answer (`Err(())`: none within [`EXPORT_TIMEOUT`]) is not a success, `None`
/// when it is. A collector that rejects some data points says so in a partial success (OTLP's
/// rule), which counts as a failure.
fn refusal(answer: Result<Result<ExportMetricsServiceResponse, tonic::Status>, ()>) -> Option<String> {
    match answer {
        Err(()) => Some(format!("no answer within {EXPORT_TIMEOUT:?}")),
        Ok(Err(status)) => Some(format!("{:?}: {}", status.code(), status.message())),
        Ok(Ok(resp)) => resp
            .partial_success
            .filter(|p| p.rejected_data_points > 0)
            .map(|p| format!("the collector rejected {} data points: {}", p.rejected_data_points, p.error_message)),
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
        ..Default::default()
    }
}

/// Prometheus metric families as OTLP metrics, one per family, in the same order: each series a
/// data point whose attributes are its labels, its time `now_ns` and (when cumulative) its start
/// `start_ns`, both nanoseconds since the Unix epoch. A histogram's cumulative bucket counts
/// become per-bucket counts, its `+Inf` bucket the last, unbounded one.
pub fn to_otlp(families: &[MetricFamily], start_ns: u64, now_ns: u64) -> Vec<Metric> {
    families
        .iter()
        .filter_map(|family| {
            let series = family.get_metric();
            let attributes =
                |m: &prometheus::proto::Metric| m.get_label().iter().map(|l| text(l.name(), l.value())).collect();
            let number = |m: &prometheus::proto::Metric, start: u64, value: f64| NumberDataPoint {
                attributes: attributes(m),
                start_time_unix_nano: start,
                time_unix_nano: now_ns,
                value: Some(number_data_point::Value::AsDouble(value)),
                ..Default::default()
            };
            let cumulative = AggregationTemporality::Cumulative as i32;
            let data = match family.get_field_type() {
                MetricType::COUNTER => metric::Data::Sum(Sum {
                    data_points: series.iter().map(|m| number(m, start_ns, m.get_counter().get_value())).collect(),
                    aggregation_temporality: cumulative,
                    is_monotonic: true,
                }),
                MetricType::GAUGE => metric::Data::Gauge(Gauge {
                    data_points: series.iter().map(|m| number(m, 0, m.get_gauge().get_value())).collect(),
                }),
                MetricType::HISTOGRAM => metric::Data::Histogram(Histogram {
                    data_points: series
                        .iter()
                        .map(|m| {
                            let h = m.get_histogram();
                            let buckets = h.get_bucket();
                            let mut below = 0;
                            let mut counts: Vec<u64> = buckets
                                .iter()
                                .map(|b| {
                                    let n = b.cumulative_count().saturating_sub(below);
                                    below = b.cumulative_count();
                                    n
                                })
                                .collect();
                            counts.push(h.get_sample_count().saturating_sub(below));
                            HistogramDataPoint {
                                attributes: attributes(m),
                                start_time_unix_nano: start_ns,
                                time_unix_nano: now_ns,
                                count: h.get_sample_count(),
                                sum: Some(h.get_sample_sum()),
                                bucket_counts: counts,
                                explicit_bounds: buckets.iter().map(|b| b.upper_bound()).collect(),
                                ..Default::default()
                            }
                        })
                        .collect(),
                    aggregation_temporality: cumulative,
                }),
                // The crate has no summary and deprecates untyped metrics: no collector here
                // makes either.
                MetricType::SUMMARY | MetricType::UNTYPED => return None,
            };
            Some(Metric {
                name: family.name().into(),
                description: family.help().into(),
                data: Some(data),
                ..Default::default()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_prometheus_type_maps_to_its_otlp_shape_with_labels_and_times() {
        let registry = prometheus::Registry::new();
        let puts = prometheus::IntCounterVec::new(prometheus::Opts::new("puts_total", "Puts."), &["region"]).unwrap();
        let leader = prometheus::IntGauge::new("has_leader", "Leader known.").unwrap();
        let fsync = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new("fsync_seconds", "Syncs.").buckets(vec![0.001, 0.01]),
        )
        .unwrap();
        registry.register(Box::new(puts.clone())).unwrap();
        registry.register(Box::new(leader.clone())).unwrap();
        registry.register(Box::new(fsync.clone())).unwrap();
        puts.with_label_values(&["eu"]).inc_by(3);
        puts.with_label_values(&["us"]).inc();
        leader.set(1);
        // Powers of two: the sum is exact.
        for s in [0.0009765625, 0.00390625, 0.0078125, 0.5] {
            fsync.observe(s);
        }

        let out = to_otlp(&registry.gather(), 10, 20);
        let names: Vec<&str> = out.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["fsync_seconds", "has_leader", "puts_total"]);
        assert_eq!(out[0].description, "Syncs.");

        let Some(metric::Data::Histogram(h)) = &out[0].data else { panic!("{:?}", out[0]) };
        assert_eq!(h.aggregation_temporality, AggregationTemporality::Cumulative as i32);
        let p = &h.data_points[0];
        assert_eq!(
            (p.count, p.sum, &p.explicit_bounds[..], &p.bucket_counts[..]),
            (4, Some(0.5126953125), &[0.001, 0.01][..], &[1, 2, 1][..])
        );
        assert_eq!((p.start_time_unix_nano, p.time_unix_nano), (10, 20));

        let Some(metric::Data::Gauge(g)) = &out[1].data else { panic!("{:?}", out[1]) };
        assert_eq!(g.data_points.len(), 1);
        assert_eq!(g.data_points[0].value, Some(number_data_point::Value::AsDouble(1.0)));
        assert_eq!((g.data_points[0].start_time_unix_nano, g.data_points[0].time_unix_nano), (0, 20));

        let Some(metric::Data::Sum(s)) = &out[2].data else { panic!("{:?}", out[2]) };
        assert!(s.is_monotonic);
        assert_eq!(s.aggregation_temporality, AggregationTemporality::Cumulative as i32);
        let by_region: Vec<(Vec<KeyValue>, Option<number_data_point::Value>)> =
            s.data_points.iter().map(|p| (p.attributes.clone(), p.value)).collect();
        assert_eq!(
            by_region,
            [
                (vec![text("region", "eu")], Some(number_data_point::Value::AsDouble(3.0))),
                (vec![text("region", "us")], Some(number_data_point::Value::AsDouble(1.0))),
            ]
        );
    }

    #[test]
    fn an_export_fails_when_unanswered_refused_or_rejected_in_part() {
        use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsPartialSuccess;
        let partial = |rejected, message: &str| ExportMetricsServiceResponse {
            partial_success: Some(ExportMetricsPartialSuccess {
                rejected_data_points: rejected,
                error_message: message.into(),
            }),
        };
        assert_eq!(refusal(Ok(Ok(ExportMetricsServiceResponse::default()))), None);
        // A warning with nothing rejected is a success (OTLP's rule).
        assert_eq!(refusal(Ok(Ok(partial(0, "slow down")))), None);
        assert_eq!(
            refusal(Ok(Ok(partial(3, "bad unit")))).as_deref(),
            Some("the collector rejected 3 data points: bad unit")
        );
        assert_eq!(
            refusal(Ok(Err(tonic::Status::unavailable("connection refused")))).as_deref(),
            Some("Unavailable: connection refused")
        );
        assert_eq!(refusal(Err(())).as_deref(), Some("no answer within 5s"));
    }
}
