//! The process's Prometheus registry and its text exposition. Each module defines its own
//! metrics next to the code that moves them, registered here on first use; names, types,
//! labels and buckets are etcd's where etcd has the metric (so etcd's dashboards and the etcd
//! mixin's alerts work unchanged), `geolock_*` where it has none.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

/// Every metric of this process in Prometheus's classic text format (version 0.0.4), which
/// `promtool check metrics` accepts.
pub fn exposition() -> String {
    let mut out = Vec::new();
    // Encoding to a Vec fails only on a metric family that is invalid by construction (an
    // empty name), which registration has already refused.
    if let Err(e) = prometheus::TextEncoder::new().encode(&prometheus::gather(), &mut out) {
        tracing::warn!("encoding metrics: {e}");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The content type of [`exposition`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `count` bucket bounds from `start`, each `factor` times the one before (Prometheus Go
/// client's `ExponentialBuckets`, which etcd's histograms use).
pub fn exponential(start: f64, factor: f64, count: usize) -> Vec<f64> {
    std::iter::successors(Some(start), |b| Some(b * factor)).take(count).collect()
}

// Registration fails only for a malformed name or a name registered twice: both are fixed in
// the code, so a failure is a programming error, reported at the first scrape or update.
fn registered<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    prometheus::register(Box::new(c.clone())).expect("a metric with a fixed, unique, valid name");
    c
}

/// A counter named `name`.
pub fn counter(name: &str, help: &str) -> IntCounter {
    registered(IntCounter::with_opts(Opts::new(name, help)).expect("valid metric options"))
}

/// A counter per value of `labels`.
pub fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    registered(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric options"))
}

/// A gauge named `name`.
pub fn gauge(name: &str, help: &str) -> IntGauge {
    registered(IntGauge::with_opts(Opts::new(name, help)).expect("valid metric options"))
}

/// A gauge per value of `labels`.
pub fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    registered(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric options"))
}

/// A gauge of fractional values (seconds).
pub fn float_gauge(name: &str, help: &str) -> prometheus::Gauge {
    registered(prometheus::Gauge::with_opts(Opts::new(name, help)).expect("valid metric options"))
}

/// A gauge of fractional values per value of `labels`.
pub fn float_gauge_vec(name: &str, help: &str, labels: &[&str]) -> prometheus::GaugeVec {
    registered(prometheus::GaugeVec::new(Opts::new(name, help), labels).expect("valid metric options"))
}

/// A histogram with these bucket upper bounds (seconds, unless the name says otherwise).
pub fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    registered(Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric options"))
}

/// A histogram per value of `labels`.
pub fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    registered(
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid metric options"),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn exponential_buckets_are_prometheus_goes() {
        assert_eq!(super::exponential(0.001, 2.0, 4), vec![0.001, 0.002, 0.004, 0.008]);
    }
}
