//! The failover controller's state as Prometheus metrics, served at `/metrics` on its listen
//! address beside its gRPC services: which phase the runbook is in, which step runs, whether it
//! is armed, and the epoch it fails over out of. The alert rules' `GeolockFailoverInProgress`
//! and `GeolockFailoverAwaitingApproval` read them.

use std::sync::LazyLock;

use prometheus::{IntGauge, IntGaugeVec, Opts};

use crate::failover::{Phase, Runbook, Step};

struct Gauges {
    phase: IntGaugeVec,
    step: IntGaugeVec,
    in_progress: IntGauge,
    armed: IntGauge,
    epoch: IntGauge,
}

fn registered<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    prometheus::register(Box::new(c.clone())).expect("a metric with a fixed, unique, valid name");
    c
}

static GAUGES: LazyLock<Gauges> = LazyLock::new(|| {
    let gauge = |name: &str, help: &str| registered(IntGauge::with_opts(Opts::new(name, help)).expect("valid options"));
    let vec = |name: &str, help: &str, label: &str| {
        registered(IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid options"))
    };
    Gauges {
        phase: vec("geolock_failover_phase", "1 for the phase the failover runbook is in, 0 for the others.", "phase"),
        step: vec(
            "geolock_failover_step",
            "1 for the failover step running (or waiting to run again), else 0.",
            "step",
        ),
        in_progress: gauge(
            "geolock_failover_in_progress",
            "1 from the decision to fail over until every step is done.",
        ),
        armed: gauge(
            "geolock_failover_armed",
            "1 once the controller has seen the primary healthy (it acts only then).",
        ),
        epoch: gauge("geolock_failover_epoch", "The revision epoch the controller fails over out of."),
    }
});

/// Show where `runbook` stands.
pub fn publish(runbook: &Runbook, epoch: u64) {
    let g = &*GAUGES;
    let phase = runbook.phase();
    for name in Phase::NAMES {
        g.phase.with_label_values(&[name]).set(i64::from(name == phase.name()));
    }
    let running = match phase {
        Phase::Running { step, .. } => Some(*step),
        _ => None,
    };
    for step in Step::ALL {
        g.step.with_label_values(&[step.name()]).set(i64::from(running == Some(step)));
    }
    let in_progress = matches!(phase, Phase::Deciding { .. } | Phase::Running { .. } | Phase::WaitingForLease { .. });
    g.in_progress.set(i64::from(in_progress));
    g.armed.set(i64::from(runbook.armed()));
    g.epoch.set(epoch as i64);
}

/// Every metric of this process in Prometheus's text format.
pub fn exposition() -> String {
    let mut out = String::new();
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&prometheus::gather(), &mut out) {
        tracing::warn!("encoding metrics: {e}");
    }
    out
}
