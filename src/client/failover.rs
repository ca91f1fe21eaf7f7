//! The region failover runbook (the spec's "Region Failover" procedure, DESIGN.md "Region
//! failover") as a pure decision machine: events in, actions out, time passed in. It does no
//! I/O and reads no clock; the controller's executor feeds it what it observes and carries out
//! what it returns, in order.
//!
//! Durability and idempotence: every decision the machine makes reaches the executor first as an
//! [`Action::Journal`] record, which the executor makes durable before it carries out any later
//! action of the same batch. A step is journaled `Started` before it runs and `Finished` after;
//! a controller killed at any point rebuilds the machine from its journal
//! ([`Runbook::resume`]), which runs again only a step that was started and not finished. Each
//! step's effect is idempotent (a DNS compare-and-swap that already happened is a no-op), so a
//! step run twice has one effect.
//!
//! Steps after DETECT and DECIDE: FENCE, PROMOTE, REDIRECT, VERIFY, NOTIFY. PROMOTE waits until
//! the old primary surely cannot write: its region write lease has lapsed (the last renewal plus
//! the lease plus the stated clock-drift bound), or a majority of its voters recorded the fence.

use std::collections::{BTreeMap, BTreeSet};

use geolock_proto::geolockpb as fpb;

use crate::ClientError;

/// How the runbook decides, once the primary looks lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Fail over as soon as DETECT triggers.
    Auto,
    /// Wait for `lockctl failover approve` with the token NOTIFY gave.
    Approve,
}

/// The runbook's settings. Durations in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub mode: Mode,
    /// How long the primary must look unhealthy, from every vantage point counted.
    pub detect_window_ms: u64,
    /// How many vantage points must see it unhealthy for the whole window (at least 2: one
    /// vantage point alone cannot tell a lost primary from its own partition).
    pub vantages_required: usize,
    /// A vantage point whose last report is older than this does not count.
    pub report_max_age_ms: u64,
    /// How long an approval token stays valid.
    pub approval_ttl_ms: u64,
    /// The old primary's region write lease, from its last renewal.
    pub write_lease_ms: u64,
    /// The most two clocks are taken to drift apart over one lease.
    pub clock_drift_ms: u64,
    /// How long after a failed step it is tried again.
    pub step_retry_ms: u64,
}

impl Default for Settings {
    /// The spec's five minutes of unhealthiness, seen from two vantage points.
    fn default() -> Self {
        Settings {
            mode: Mode::Auto,
            detect_window_ms: 5 * 60 * 1000,
            vantages_required: 2,
            report_max_age_ms: 30_000,
            approval_ttl_ms: 15 * 60 * 1000,
            write_lease_ms: 10_000,
            clock_drift_ms: 1_000,
            step_retry_ms: 5_000,
        }
    }
}

/// A step the executor carries out, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Step {
    /// Run the fence hooks (firewall, certificate revocation) and ask the old voters to record
    /// `fenced(epoch)`.
    Fence,
    /// Seed the new cluster, in the new epoch, from the standby learner with the most applied.
    Promote,
    /// Make the other standby learners the new cluster's members: each is wiped and rejoins as
    /// a learner, and is made a voter once it caught up (a standby member that does not answer
    /// is left for `lockctl failover rejoin`).
    Join,
    /// Move the client name's DNS records to the new region (one compare-and-swap).
    Redirect,
    /// Resolve, connect, write and read back, take and release a probe lock.
    Verify,
    /// The webhook and the log record with the journal's timeline.
    Notify,
}

impl Step {
    /// Every step, in the order they run.
    pub const ALL: [Step; 6] = [Step::Fence, Step::Promote, Step::Join, Step::Redirect, Step::Verify, Step::Notify];

    /// The step's name in lower case (`fence`), as metrics label it.
    pub fn name(self) -> &'static str {
        match self {
            Step::Fence => "fence",
            Step::Promote => "promote",
            Step::Join => "join",
            Step::Redirect => "redirect",
            Step::Verify => "verify",
            Step::Notify => "notify",
        }
    }

    fn next(self) -> Option<Step> {
        match self {
            Step::Fence => Some(Step::Promote),
            Step::Promote => Some(Step::Join),
            Step::Join => Some(Step::Redirect),
            Step::Redirect => Some(Step::Verify),
            Step::Verify => Some(Step::Notify),
            Step::Notify => None,
        }
    }
}

/// What the controller observes or is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Vantage point `vantage` saw the primary healthy (a leader that commits) or not.
    Health { vantage: String, healthy: bool, at_ms: u64 },
    /// The vantage points renewed the primary's region write lease.
    LeaseRenewed { at_ms: u64 },
    /// Time passed.
    Tick { now_ms: u64 },
    /// An operator approved with `token`.
    Approve { token: u64, at_ms: u64 },
    /// The executor finished `step`.
    Done { step: Step, at_ms: u64 },
    /// The executor could not finish `step`; it is tried again.
    Failed { step: Step, reason: String, at_ms: u64 },
    /// A majority of the old voters durably recorded `fenced(epoch)`.
    FencedByMajority { epoch: u64, at_ms: u64 },
    /// The executor stopped granting the write lease (the runbook's `StopRenewing`); its last
    /// grant was at `last_grant_ms`, and it grants no more.
    RenewingStopped { last_grant_ms: Option<u64>, at_ms: u64 },
    /// PROMOTE's first part: the executor chose `target`, the standby learner that applied the
    /// most, to seed the new cluster.
    Chose { target: String, at_ms: u64 },
    /// FENCE found the old primary's members that answered applied up to `index` (the highest).
    OldApplied { index: u64, at_ms: u64 },
    /// PROMOTE seeded the new cluster from the old log's `applied_index`, dropping
    /// `dropped_entries` the learner had received and not applied.
    Seeded { applied_index: u64, dropped_entries: u64, at_ms: u64 },
}

/// A journal record: a decision, durable before what follows it is done.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Record {
    /// The primary was seen healthy for the first time: DETECT counts from here on. A primary
    /// never seen serving (a cluster still starting, a mistyped endpoint) is not failed over.
    Armed {
        at_ms: u64,
        vantage: String,
    },
    /// DETECT triggered: these vantage points saw the primary unhealthy for the whole window.
    Detected {
        at_ms: u64,
        vantages: Vec<String>,
    },
    /// DECIDE waits for an operator.
    AwaitingApproval {
        token: u64,
        expires_at_ms: u64,
    },
    /// The primary looked healthy again before the decision: back to watching.
    Recovered {
        at_ms: u64,
    },
    /// DECIDE: fail over into `epoch`. From here on the write lease is not renewed; it lapses
    /// for good at `lease_lapses_at_ms`.
    Decided {
        epoch: u64,
        at_ms: u64,
        lease_lapses_at_ms: u64,
    },
    Started {
        step: Step,
        at_ms: u64,
    },
    Finished {
        step: Step,
        at_ms: u64,
    },
    Failed {
        step: Step,
        at_ms: u64,
        reason: String,
    },
    /// The old voters recorded the fence: PROMOTE need not wait for the lease.
    Fenced {
        epoch: u64,
        at_ms: u64,
    },
    /// PROMOTE seeds the new cluster from `target` and from no other member, however often it
    /// runs: promoting a second learner would make a second cluster.
    Chose {
        target: String,
        at_ms: u64,
    },
    /// The highest index the old primary's members that answered FENCE had applied: with
    /// [`Record::Seeded`], the lost window.
    OldApplied {
        index: u64,
        at_ms: u64,
    },
    /// Where in the old log the new cluster starts.
    Seeded {
        applied_index: u64,
        dropped_entries: u64,
        at_ms: u64,
    },
}

/// What the executor must do, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Make this record durable before carrying out any later action.
    Journal(Record),
    /// Stop renewing the old primary's region write lease, and report the last grant as
    /// [`Event::RenewingStopped`].
    StopRenewing,
    /// Carry out `step` for the failover into `epoch`. For [`Step::Promote`], only its first
    /// part: choose the learner to promote and report it as [`Event::Chose`].
    Run { step: Step, epoch: u64 },
    /// PROMOTE `target` (journaled as [`Record::Chose`]) into `epoch`, or, when it already is
    /// in `epoch`, wait for it to serve.
    PromoteChosen { epoch: u64, target: String },
    /// Tell the operators a failover awaits approval with `token`.
    RequestApproval { token: u64, expires_at_ms: u64 },
    /// An approval was refused (wrong, used or expired token, or nothing to approve).
    RefuseApproval { token: u64, why: &'static str },
}

/// Where the runbook stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// DETECT: the primary serves, or has not looked lost for long enough.
    Watching,
    /// DECIDE in approve mode.
    AwaitingApproval { token: u64, expires_at_ms: u64 },
    /// DECIDE made, not yet journaled: waiting for the lease's last grant, which the journaled
    /// decision counts the lapse from.
    Deciding { epoch: u64 },
    /// Failing over into `epoch`: `step` is running (or, after a failure, waits to run again at
    /// `retry_at_ms`).
    Running { epoch: u64, step: Step, retry_at_ms: Option<u64> },
    /// FENCE is done; PROMOTE waits for the old primary's write lease to lapse.
    WaitingForLease { epoch: u64 },
    /// Every step finished.
    Done { epoch: u64 },
}

impl Phase {
    /// Every phase's name, as metrics label them.
    pub const NAMES: [&'static str; 6] =
        ["watching", "awaiting_approval", "deciding", "running", "waiting_for_lease", "done"];

    /// This phase's name, one of [`Phase::NAMES`].
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Watching => "watching",
            Phase::AwaitingApproval { .. } => "awaiting_approval",
            Phase::Deciding { .. } => "deciding",
            Phase::Running { .. } => "running",
            Phase::WaitingForLease { .. } => "waiting_for_lease",
            Phase::Done { .. } => "done",
        }
    }
}

/// The runbook for one failover out of `epoch` (the primary's current revision epoch).
#[derive(Clone, Debug)]
pub struct Runbook {
    settings: Settings,
    epoch: u64,
    token_seed: u64,
    tokens_issued: u64,
    phase: Phase,
    /// Whether the primary has been seen healthy (journaled as [`Record::Armed`]).
    armed: bool,
    /// Per vantage point: when its current unhealthy streak began, and its last report.
    views: BTreeMap<String, View>,
    last_renewal_ms: u64,
    lease_lapses_at_ms: u64,
    fenced: bool,
    /// The learner PROMOTE chose, once journaled.
    target: Option<String>,
    /// The highest [`Record::OldApplied`] journaled.
    old_applied: u64,
    /// Whether the running step's `Started` record is in the journal.
    started_journaled: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct View {
    unhealthy_since_ms: Option<u64>,
    last_report_ms: u64,
}

impl Runbook {
    /// A runbook watching a primary in `epoch`. Approval tokens derive from `token_seed` (the
    /// executor draws it at random), so the machine itself stays deterministic.
    /// `vantages_required` below 2 counts as 2: one vantage point cannot tell a lost primary
    /// from its own partition.
    pub fn new(mut settings: Settings, epoch: u64, token_seed: u64) -> Runbook {
        settings.vantages_required = settings.vantages_required.max(2);
        Runbook {
            settings,
            epoch,
            token_seed,
            tokens_issued: 0,
            phase: Phase::Watching,
            armed: false,
            views: BTreeMap::new(),
            last_renewal_ms: 0,
            lease_lapses_at_ms: 0,
            fenced: false,
            target: None,
            old_applied: 0,
            started_journaled: false,
        }
    }

    /// The runbook as `journal` left it, and what to do at `now_ms`: once decided, keep the
    /// old primary's lease unrenewed; run again a step that was started and not finished, or
    /// start the next one; ask again for an approval still awaited.
    pub fn resume(
        settings: Settings,
        epoch: u64,
        token_seed: u64,
        journal: &[Record],
        now_ms: u64,
    ) -> (Runbook, Vec<Action>) {
        let mut r = Runbook::new(settings, epoch, token_seed);
        for record in journal {
            r.replay(record);
        }
        let mut out = Vec::new();
        if r.new_epoch().is_some() {
            out.push(Action::StopRenewing);
        }
        match r.phase {
            Phase::Running { epoch, step, retry_at_ms: None } => {
                let journaled = r.started_journaled;
                out.extend(r.start(step, epoch, (!journaled).then_some(now_ms)));
            }
            Phase::AwaitingApproval { token, expires_at_ms } => {
                out.push(Action::RequestApproval { token, expires_at_ms })
            }
            _ => out.extend(r.evaluate(now_ms)),
        }
        (r, out)
    }

    /// The runbook as `journal` left it, to read where it stands (`lockctl failover status`):
    /// the phase, as [`Runbook::resume`] finds it, depends on no setting.
    pub fn replayed(journal: &[Record]) -> Runbook {
        let mut r = Runbook::new(Settings::default(), 0, 0);
        for record in journal {
            r.replay(record);
        }
        r
    }

    /// Where the runbook stands.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Whether the primary has been seen healthy (DETECT counts from then on).
    pub fn armed(&self) -> bool {
        self.armed
    }

    /// The learner PROMOTE chose (journaled as [`Record::Chose`]): JOIN, VERIFY and NOTIFY act
    /// on it.
    pub fn promoted(&self) -> Option<&str> {
        self.target.as_deref()
    }

    /// Whether a majority of the old voters recorded the fence ([`Record::Fenced`]): PROMOTE
    /// need not wait out the old primary's lease.
    pub fn fenced_by_majority(&self) -> bool {
        self.fenced
    }

    /// Feed one event; returns what to do, in order.
    pub fn on(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Health { vantage, healthy, at_ms } => {
                let v = self.views.entry(vantage.clone()).or_default();
                v.last_report_ms = v.last_report_ms.max(at_ms);
                v.unhealthy_since_ms = if healthy { None } else { v.unhealthy_since_ms.or(Some(at_ms)) };
                if healthy && !self.armed {
                    self.armed = true;
                    out.push(Action::Journal(Record::Armed { at_ms, vantage }));
                }
                out.extend(self.evaluate(at_ms));
            }
            Event::LeaseRenewed { at_ms } => {
                self.last_renewal_ms = self.last_renewal_ms.max(at_ms);
                // A renewal reported after the decision still counts: the lease lapses only
                // after the last grant the primary may hold.
                if self.new_epoch().is_some() {
                    self.lease_lapses_at_ms = self.lease_lapses_at_ms.max(self.lapse_after(at_ms));
                }
            }
            Event::Tick { now_ms } => out.extend(self.evaluate(now_ms)),
            Event::Approve { token, at_ms } => out.extend(self.approve(token, at_ms)),
            Event::Done { step, at_ms } => out.extend(self.done(step, at_ms)),
            Event::Failed { step, reason, at_ms } => {
                if let Phase::Running { epoch, step: running, retry_at_ms: None } = self.phase {
                    if running == step {
                        let retry = at_ms + self.settings.step_retry_ms;
                        self.phase = Phase::Running { epoch, step, retry_at_ms: Some(retry) };
                        out.push(Action::Journal(Record::Failed { step, at_ms, reason }));
                    }
                }
            }
            Event::FencedByMajority { epoch, at_ms } => {
                if self.new_epoch() == Some(epoch) && !self.fenced {
                    self.fenced = true;
                    out.push(Action::Journal(Record::Fenced { epoch, at_ms }));
                    out.extend(self.evaluate(at_ms));
                }
            }
            Event::OldApplied { index, at_ms } => {
                if self.new_epoch().is_some() && index > self.old_applied {
                    self.old_applied = index;
                    out.push(Action::Journal(Record::OldApplied { index, at_ms }));
                }
            }
            Event::Seeded { applied_index, dropped_entries, at_ms } => {
                if let Phase::Running { step: Step::Promote, .. } = self.phase {
                    out.push(Action::Journal(Record::Seeded { applied_index, dropped_entries, at_ms }));
                }
            }
            Event::RenewingStopped { last_grant_ms, at_ms } => {
                if let Phase::Deciding { epoch } = self.phase {
                    out.extend(self.decided(epoch, last_grant_ms, at_ms));
                }
            }
            Event::Chose { target, at_ms } => {
                if let (Phase::Running { epoch, step: Step::Promote, retry_at_ms: None }, None) =
                    (&self.phase, &self.target)
                {
                    let epoch = *epoch;
                    self.target = Some(target.clone());
                    out.push(Action::Journal(Record::Chose { target: target.clone(), at_ms }));
                    out.push(Action::PromoteChosen { epoch, target });
                }
            }
        }
        out
    }

    /// The epoch being failed over into, once decided.
    fn new_epoch(&self) -> Option<u64> {
        match self.phase {
            Phase::Running { epoch, .. } | Phase::WaitingForLease { epoch } | Phase::Done { epoch } => Some(epoch),
            Phase::Watching | Phase::AwaitingApproval { .. } | Phase::Deciding { .. } => None,
        }
    }

    fn lapse_after(&self, renewal_ms: u64) -> u64 {
        renewal_ms + self.settings.write_lease_ms + self.settings.clock_drift_ms
    }

    /// The vantage points that have seen the primary unhealthy for the whole window, with a
    /// recent report; enough of them trigger DETECT.
    fn lost_from(&self, now_ms: u64) -> Vec<String> {
        let s = &self.settings;
        self.views
            .iter()
            .filter(|(_, v)| v.last_report_ms + s.report_max_age_ms >= now_ms)
            .filter(|(_, v)| v.unhealthy_since_ms.is_some_and(|t| t + s.detect_window_ms <= now_ms))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// What time and health call for now.
    fn evaluate(&mut self, now_ms: u64) -> Vec<Action> {
        let lost = self.lost_from(now_ms);
        let triggered = self.armed && lost.len() >= self.settings.vantages_required;
        match self.phase.clone() {
            Phase::Watching if triggered => {
                let mut out = vec![Action::Journal(Record::Detected { at_ms: now_ms, vantages: lost })];
                match self.settings.mode {
                    Mode::Auto => out.extend(self.decide()),
                    Mode::Approve => out.extend(self.request_approval(now_ms)),
                }
                out
            }
            Phase::AwaitingApproval { .. } if !triggered => {
                self.phase = Phase::Watching;
                vec![Action::Journal(Record::Recovered { at_ms: now_ms })]
            }
            Phase::AwaitingApproval { expires_at_ms, .. } if now_ms >= expires_at_ms => self.request_approval(now_ms),
            Phase::Running { epoch, step, retry_at_ms: Some(at) } if now_ms >= at => {
                self.start(step, epoch, Some(now_ms))
            }
            Phase::WaitingForLease { epoch } if self.fenced || now_ms >= self.lease_lapses_at_ms => {
                self.start(Step::Promote, epoch, Some(now_ms))
            }
            _ => Vec::new(),
        }
    }

    fn request_approval(&mut self, now_ms: u64) -> Vec<Action> {
        self.tokens_issued += 1;
        let token = splitmix64(self.token_seed ^ self.tokens_issued);
        let expires_at_ms = now_ms + self.settings.approval_ttl_ms;
        self.phase = Phase::AwaitingApproval { token, expires_at_ms };
        vec![
            Action::Journal(Record::AwaitingApproval { token, expires_at_ms }),
            Action::RequestApproval { token, expires_at_ms },
        ]
    }

    fn approve(&mut self, token: u64, at_ms: u64) -> Vec<Action> {
        let why = match self.phase {
            Phase::AwaitingApproval { token: wanted, expires_at_ms } if token == wanted && at_ms < expires_at_ms => {
                return self.decide();
            }
            Phase::AwaitingApproval { token: wanted, .. } if token == wanted => "the approval token has expired",
            Phase::AwaitingApproval { .. } => "not the approval token this failover awaits",
            Phase::Watching => "no failover awaits approval",
            Phase::Deciding { .. } | Phase::Running { .. } | Phase::WaitingForLease { .. } | Phase::Done { .. } => {
                "the failover was already decided (a token is good once)"
            }
        };
        vec![Action::RefuseApproval { token, why }]
    }

    /// DECIDE: stop renewing the old primary's lease; the decision is journaled once the last
    /// grant is known ([`Event::RenewingStopped`]).
    fn decide(&mut self) -> Vec<Action> {
        self.phase = Phase::Deciding { epoch: self.epoch + 1 };
        vec![Action::StopRenewing]
    }

    /// Journal the decision, with when the old primary's lease surely lapses, and start FENCE.
    /// The lapse counts from the last grant reported, which is exact: granting has stopped, and
    /// a grant is recorded before the primary hears of it.
    fn decided(&mut self, epoch: u64, last_grant_ms: Option<u64>, at_ms: u64) -> Vec<Action> {
        self.last_renewal_ms = self.last_renewal_ms.max(last_grant_ms.unwrap_or(0));
        self.lease_lapses_at_ms = self.lapse_after(self.last_renewal_ms);
        let decided = Record::Decided { epoch, at_ms, lease_lapses_at_ms: self.lease_lapses_at_ms };
        let mut out = vec![Action::Journal(decided)];
        out.extend(self.start(Step::Fence, epoch, Some(at_ms)));
        out
    }

    /// Journal `step` as started (unless resuming one already journaled) and run it.
    fn start(&mut self, step: Step, epoch: u64, at_ms: Option<u64>) -> Vec<Action> {
        self.phase = Phase::Running { epoch, step, retry_at_ms: None };
        let mut out = Vec::new();
        if let Some(at_ms) = at_ms {
            out.push(Action::Journal(Record::Started { step, at_ms }));
        }
        self.started_journaled = true;
        out.push(match (step, &self.target) {
            (Step::Promote, Some(target)) => Action::PromoteChosen { epoch, target: target.clone() },
            _ => Action::Run { step, epoch },
        });
        out
    }

    fn done(&mut self, step: Step, at_ms: u64) -> Vec<Action> {
        let Phase::Running { epoch, step: running, .. } = self.phase else { return Vec::new() };
        if running != step {
            return Vec::new();
        }
        let mut out = vec![Action::Journal(Record::Finished { step, at_ms })];
        match step.next() {
            Some(Step::Promote) => {
                self.phase = Phase::WaitingForLease { epoch };
                out.extend(self.evaluate(at_ms));
            }
            Some(next) => out.extend(self.start(next, epoch, Some(at_ms))),
            None => self.phase = Phase::Done { epoch },
        }
        out
    }

    /// Apply a journal record as the machine made it.
    fn replay(&mut self, record: &Record) {
        match record {
            Record::Armed { .. } => self.armed = true,
            Record::Detected { .. } | Record::Recovered { .. } => {
                self.armed = true;
                self.phase = Phase::Watching;
            }
            Record::AwaitingApproval { token, expires_at_ms } => {
                self.tokens_issued += 1;
                self.phase = Phase::AwaitingApproval { token: *token, expires_at_ms: *expires_at_ms };
            }
            Record::Decided { epoch, lease_lapses_at_ms, .. } => {
                self.lease_lapses_at_ms = *lease_lapses_at_ms;
                self.phase = Phase::Running { epoch: *epoch, step: Step::Fence, retry_at_ms: None };
                self.started_journaled = false;
            }
            Record::Started { step, .. } => {
                if let Some(epoch) = self.new_epoch() {
                    self.phase = Phase::Running { epoch, step: *step, retry_at_ms: None };
                    self.started_journaled = true;
                }
            }
            Record::Finished { step, .. } => {
                if let Some(epoch) = self.new_epoch() {
                    self.phase = match step.next() {
                        Some(Step::Promote) => Phase::WaitingForLease { epoch },
                        // The next step's Started record follows in the journal if it was
                        // reached; if not, resuming starts it.
                        Some(next) => Phase::Running { epoch, step: next, retry_at_ms: None },
                        None => Phase::Done { epoch },
                    };
                    self.started_journaled = false;
                }
            }
            Record::Failed { step, at_ms, .. } => {
                if let Some(epoch) = self.new_epoch() {
                    let retry = at_ms + self.settings.step_retry_ms;
                    self.phase = Phase::Running { epoch, step: *step, retry_at_ms: Some(retry) };
                }
            }
            Record::Fenced { .. } => self.fenced = true,
            Record::Chose { target, .. } => self.target = Some(target.clone()),
            Record::OldApplied { index, .. } => self.old_applied = self.old_applied.max(*index),
            Record::Seeded { .. } => {}
        }
    }
}

/// The journal as an operator reads it: one line a record, its time counted from the first
/// record's, and each finished or failed step with how long it ran.
pub fn timeline(records: &[Record]) -> Vec<String> {
    let t0 = records.iter().find_map(Record::at_ms).unwrap_or(0);
    let rel = |t: u64| t.saturating_sub(t0);
    let mut out = Vec::new();
    for (r, ran) in records.iter().zip(step_runs(records)) {
        let ran_ms = ran.map_or(0, |(_, ms)| ms);
        let line = match r {
            Record::Armed { vantage, .. } => format!("armed: the primary seen healthy from {vantage}"),
            Record::Detected { vantages, .. } => format!("detected: lost as seen from {}", vantages.join(", ")),
            Record::AwaitingApproval { token, .. } => format!("awaiting approval with token {token:x}"),
            Record::Recovered { .. } => "recovered before a decision".to_string(),
            Record::Decided { epoch, lease_lapses_at_ms, .. } => format!(
                "decided: fail over into revision epoch {epoch}; the old primary's write lease lapses at +{} ms",
                rel(*lease_lapses_at_ms)
            ),
            Record::Started { step, .. } => format!("{step:?} started"),
            Record::Finished { step, .. } => format!("{step:?} finished in {ran_ms} ms"),
            Record::Failed { step, reason, .. } => format!("{step:?} failed after {ran_ms} ms: {reason}"),
            Record::Fenced { epoch, .. } => format!("a majority of the old voters recorded fenced({epoch})"),
            Record::Chose { target, .. } => format!("chose {target} to promote"),
            Record::OldApplied { index, .. } => {
                format!("the old primary's members that answered the fence had applied up to index {index}")
            }
            Record::Seeded { applied_index, dropped_entries, .. } => format!(
                "seeded the new cluster from applied index {applied_index} ({dropped_entries} received entries dropped)"
            ),
        };
        out.push(format!("+{} ms {line}", rel(r.at_ms().unwrap_or(0))));
    }
    out
}

impl Record {
    /// When the record was made, in wall-clock milliseconds; none for
    /// [`Record::AwaitingApproval`], which carries only its token's expiry.
    pub fn at_ms(&self) -> Option<u64> {
        match self {
            Record::Armed { at_ms, .. }
            | Record::Detected { at_ms, .. }
            | Record::Recovered { at_ms }
            | Record::Decided { at_ms, .. }
            | Record::Started { at_ms, .. }
            | Record::Finished { at_ms, .. }
            | Record::Failed { at_ms, .. }
            | Record::Fenced { at_ms, .. }
            | Record::Chose { at_ms, .. }
            | Record::OldApplied { at_ms, .. }
            | Record::Seeded { at_ms, .. } => Some(*at_ms),
            Record::AwaitingApproval { .. } => None,
        }
    }
}

/// For each record, in order: when it ends a run of a step (`Finished` or `Failed`), the step
/// and the milliseconds since that step's last `Started`.
fn step_runs(records: &[Record]) -> Vec<Option<(Step, u64)>> {
    let mut started: BTreeMap<Step, u64> = BTreeMap::new();
    records
        .iter()
        .map(|r| match r {
            Record::Started { step, at_ms } => {
                started.insert(*step, *at_ms);
                None
            }
            Record::Finished { step, at_ms } | Record::Failed { step, at_ms, .. } => {
                Some((*step, at_ms.saturating_sub(started.get(step).copied().unwrap_or(*at_ms))))
            }
            _ => None,
        })
        .collect()
}

/// What a failover lost, as far as the journal knows: the old primary's highest applied index
/// among the members FENCE reached, where the new cluster started in the old log, and the
/// entries between (applied by the old primary, never by the new). `None` unless both are
/// known (an old primary that nobody reached tells nothing of what it committed last).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LostWindow {
    pub old_applied_index: u64,
    pub seeded_from_index: u64,
    pub lost_entries: u64,
}

/// The [`LostWindow`] the journal's records tell, if they tell it.
pub fn lost_window(records: &[Record]) -> Option<LostWindow> {
    let old = records
        .iter()
        .filter_map(|r| if let Record::OldApplied { index, .. } = r { Some(*index) } else { None })
        .max()?;
    let seeded = records.iter().rev().find_map(|r| {
        if let Record::Seeded { applied_index, .. } = r {
            Some(*applied_index)
        } else {
            None
        }
    })?;
    Some(LostWindow { old_applied_index: old, seeded_from_index: seeded, lost_entries: old.saturating_sub(seeded) })
}

/// The lost window in a line, for the log and `lockctl failover status`.
pub fn describe_lost_window(w: Option<LostWindow>) -> String {
    match w {
        Some(w) => format!(
            "lost window: {} entries (the old primary applied up to index {}, the new cluster started from {})",
            w.lost_entries, w.old_applied_index, w.seeded_from_index
        ),
        None => "lost window: not known (no old member answered the fence, or the seed was not journaled)".into(),
    }
}

/// How long each finished step ran, in step order: from its last `Started` to its `Finished`,
/// in milliseconds. NOTIFY, not finished while it reports, is left out.
pub fn step_durations(records: &[Record]) -> Vec<(Step, u64)> {
    let finished = records.iter().zip(step_runs(records)).filter(|(r, _)| matches!(r, Record::Finished { .. }));
    let took: BTreeMap<Step, u64> = finished.filter_map(|(_, ran)| ran).collect();
    took.into_iter().collect()
}

/// Fence the member at `endpoint` (one member: not the first of a list that answers) out of the
/// old primary, for the failover into `epoch` (see `geolockpb.Failover.Fence`). Returns what the
/// member recorded: the epoch it is fenced by, and how far it had applied.
///
/// Errors: [`ClientError::Connect`] when the member cannot be reached; the member's refusal as
/// [`ClientError::Rpc`] (an epoch of 0 or above the highest).
pub async fn fence(member: &crate::Cluster, epoch: u64) -> Result<fpb::FenceResponse, ClientError> {
    let ch = crate::connect_to(member).await?;
    let mut c = fpb::failover_client::FailoverClient::new(ch);
    Ok(c.fence(fpb::FenceRequest { epoch }).await?.into_inner())
}

/// Whether the members fenced, each answering with its ID and the voter sets it knows, are a
/// majority of every voter set any of them reported: then no leader of the old primary can
/// commit again (a commit needs a majority of each set of the membership it is in, and moving
/// to a newer membership needs one of the current). The voter sets are those the fenced members
/// know: the controller's `primary` must name the current members. False when nobody answered.
pub fn fenced_by_majority(answers: &[(u64, Vec<Vec<u64>>)]) -> bool {
    let fenced: BTreeSet<u64> = answers.iter().map(|(id, _)| *id).collect();
    let configs: Vec<&Vec<u64>> = answers.iter().flat_map(|(_, c)| c).collect();
    !configs.is_empty()
        && configs.iter().all(|voters| {
            let voters: BTreeSet<u64> = voters.iter().copied().collect();
            voters.intersection(&fenced).count() * 2 > voters.len()
        })
}

/// PROMOTE the learner at `endpoint`: it seeds a new cluster, in revision epoch `epoch`, from
/// the state it applied (see `geolockpb.Failover.Promote`); it restarts to do so, and serves
/// again shortly after as the new cluster's leader.
///
/// Errors: [`ClientError::Connect`]; the member's refusal as [`ClientError::Rpc`] (not a
/// learner, fenced, or an epoch not above its own).
pub async fn promote(member: &crate::Cluster, epoch: u64) -> Result<fpb::PromoteResponse, ClientError> {
    let ch = crate::connect_to(member).await?;
    let mut c = fpb::failover_client::FailoverClient::new(ch);
    Ok(c.promote(fpb::PromoteRequest { epoch }).await?.into_inner())
}

/// Make the member at `endpoint` an empty learner of the new primary, cluster `cluster_id` led
/// by `leader` in revision epoch `epoch` (see `geolockpb.Failover.Rejoin`): it wipes its data
/// and restarts; the caller then adds it on the new primary (MemberAdd, with the name and peer
/// URLs answered).
///
/// Errors: [`ClientError::Connect`]; the member's refusal as [`ClientError::Rpc`] (a witness,
/// the new primary's leader, or an epoch not above its own).
pub async fn rejoin(
    member: &crate::Cluster,
    epoch: u64,
    cluster_id: u64,
    leader: &str,
) -> Result<fpb::RejoinResponse, ClientError> {
    let ch = crate::connect_to(member).await?;
    let mut c = fpb::failover_client::FailoverClient::new(ch);
    let req = fpb::RejoinRequest { epoch, cluster_id, leader_name: leader.to_string() };
    Ok(c.rejoin(req).await?.into_inner())
}

/// The bits of a revision below its epoch (DESIGN.md "Region failover": a revision is
/// `epoch << 40 | counter`); the same as `geolock_core::kv::REV_COUNTER_BITS`, which this
/// library does not link (`lockctl`'s tests check they agree).
pub const REV_COUNTER_BITS: u32 = 40;

/// The revision epoch `revision` is in.
pub fn epoch_of(revision: i64) -> u64 {
    (revision.max(0) as u64) >> REV_COUNTER_BITS
}

/// A primary a failover made, as [`join`] needs it.
#[derive(Clone, Debug)]
pub struct NewPrimary {
    /// The member it was asked through, and how it was reached.
    pub at: crate::Cluster,
    /// Its revision epoch, cluster ID and the name of the member that answered (its leader,
    /// right after PROMOTE).
    pub epoch: u64,
    pub cluster_id: u64,
    pub leader: String,
    /// Its members, from a linearizable list.
    pub members: Vec<geolock_proto::etcdserverpb::Member>,
}

impl NewPrimary {
    /// Ask the member at `endpoint` (one member: a rejoined member accepts Raft traffic only
    /// from the member named here).
    ///
    /// Errors: [`ClientError::Connect`]; its refusal as [`ClientError::Rpc`]; `FailedPrecondition`
    /// when it is in revision epoch 0 (no failover made it) or absent from its own list.
    pub async fn ask(at: &crate::Cluster) -> Result<NewPrimary, ClientError> {
        use geolock_proto::etcdserverpb as pb;
        let ch = crate::connect_to(at).await?;
        let endpoint = &at.endpoints;
        let r = pb::cluster_client::ClusterClient::new(ch)
            .member_list(pb::MemberListRequest { linearizable: true })
            .await?
            .into_inner();
        let header = r.header.unwrap_or_default();
        let epoch = epoch_of(header.revision);
        let leader = r.members.iter().find(|m| m.id == header.member_id).map(|m| m.name.clone());
        let refuse = |why: String| ClientError::Rpc(tonic::Status::failed_precondition(why));
        if epoch == 0 {
            return Err(refuse(format!(
                "{endpoint} is in revision epoch 0, not a primary a failover made: rejoin joins the new primary"
            )));
        }
        let leader = leader.ok_or_else(|| refuse(format!("{endpoint} is not in its own member list")))?;
        Ok(NewPrimary { at: at.clone(), epoch, cluster_id: header.cluster_id, leader, members: r.members })
    }
}

/// JOIN (and ROLLBACK in place) for one running member at `member`: wipe it into an empty
/// learner of `new` ([`rejoin`]) and add it there, as a voter the leader promotes once caught
/// up when `voter`, else as a learner; a member already listed is not added again. Returns its
/// name.
///
/// Errors: [`rejoin`]'s; the new primary's refusal of the MemberAdd (a membership change
/// still under way after 10 s is one).
pub async fn join(new: &NewPrimary, member: &str, voter: bool) -> Result<String, ClientError> {
    let r = rejoin(&new.at.at(member), new.epoch, new.cluster_id, &new.leader).await?;
    // One membership change at a time: the previous member's promotion may be under way.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !new.members.iter().any(|m| m.name == r.name) {
        match crate::member_add(&new.at, &r.name, r.peer_urls.clone(), !voter).await {
            Err(ClientError::Rpc(s))
                if s.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(ClientError::Rpc(s)) if s.message().contains("already exist") => break,
            outcome => {
                outcome?;
                break;
            }
        }
    }
    Ok(r.name)
}

/// A vantage point's side of the region write lease: it grants the primary's leader its share
/// while granting is on, and remembers when it last granted (on its own clock, at the grant: the
/// controller waits the lease plus the clock-drift bound from then before it promotes). Cheap to
/// clone; clones share their state.
#[derive(Clone, Debug, Default)]
pub struct Vantage {
    state: std::sync::Arc<VantageState>,
}

#[derive(Debug, Default)]
struct VantageState {
    granting: std::sync::atomic::AtomicBool,
    /// What a grant must meet, when this vantage point's grant must end the lease.
    policy: Option<GrantPolicy>,
    last_grant: std::sync::Mutex<Option<std::time::Instant>>,
    /// The last probe of the primary: when, and what it found.
    seen: std::sync::Mutex<Option<(std::time::Instant, Health)>>,
}

/// What the controller's vantage point checks before it grants: that withholding its grant ends
/// the lease within the time the runbook waits. Without it a member configured with a longer
/// lease, or with more vantage points (a majority of which could grant without this one), would
/// go on writing after the standby is promoted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantPolicy {
    /// The longest lease granted, in milliseconds: the runbook's `write_lease_ms`.
    pub lease_ms_max: u64,
    /// The revision epoch of the primary this controller would fail over.
    pub epoch: u64,
}

impl GrantPolicy {
    /// Why a leader asking for `lease_ms` in `epoch`, counting `vantages` vantage points, is not
    /// granted; `None` when it is.
    pub fn refusal(&self, lease_ms: u64, epoch: u64, vantages: u32) -> Option<String> {
        if lease_ms > self.lease_ms_max {
            return Some(format!(
                "the leader asks for a {lease_ms} ms write lease, above this controller's write_lease_ms {}",
                self.lease_ms_max
            ));
        }
        if epoch != self.epoch {
            return Some(format!(
                "the leader is in revision epoch {epoch}, this controller fails over epoch {}",
                self.epoch
            ));
        }
        // A majority of n needs every vantage point only for n <= 2.
        if !(1..=2).contains(&vantages) {
            return Some(format!(
                "the leader counts {vantages} vantage points; a majority of them would not need this controller's grant \
                 (configure it and exactly one arbiter)"
            ));
        }
        None
    }
}

/// What one probe found of the primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// Some member of the primary names a leader.
    pub healthy: bool,
    /// Which member, or why none did.
    pub detail: String,
}

/// Probe the primary's members (each of `primary`'s endpoints), each within `timeout`, in
/// parallel: healthy when any member names a leader. A follower stops naming one an election
/// timeout after it last heard from it, and a leader cut off from its quorum steps down, so
/// "a member names a leader" means a leader a quorum hears. (Not a linearizable read: a primary
/// that lost its region write lease refuses those, and a one-sided partition that keeps the
/// standby from granting would then look like a lost primary to the arbiter too.)
pub async fn probe_primary(primary: &crate::Cluster, timeout: std::time::Duration) -> Health {
    let asks = primary.endpoints.split(',').filter(|e| !e.is_empty()).map(|ep| async move {
        let seen = match tokio::time::timeout(timeout, status(&primary.at(ep))).await {
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(s)) if s.leader != 0 => Ok(s.leader),
            Ok(Ok(_)) => Err("no leader".to_string()),
        };
        (ep.to_string(), seen)
    });
    judge(futures::future::join_all(asks).await)
}

/// Maintenance.Status of `member` (one endpoint). While auth is on it needs a user: a client
/// certificate's common name costs nothing per connection, a password a bcrypt on the member.
///
/// Errors: [`ClientError::Connect`]; [`ClientError::Rpc`].
pub async fn status(member: &crate::Cluster) -> Result<geolock_proto::etcdserverpb::StatusResponse, ClientError> {
    let ch = crate::connect_to(member).await?;
    let mut m = geolock_proto::etcdserverpb::maintenance_client::MaintenanceClient::new(ch);
    Ok(m.status(geolock_proto::etcdserverpb::StatusRequest {}).await?.into_inner())
}

/// The primary's health from each member's answer: its leader, or why it named none.
fn judge(answers: Vec<(String, Result<u64, String>)>) -> Health {
    if let Some((ep, Ok(leader))) = answers.iter().find(|(_, a)| a.is_ok()) {
        return Health { healthy: true, detail: format!("{ep} names leader {leader:x}") };
    }
    let why: Vec<String> = answers.iter().map(|(ep, a)| format!("{ep}: {}", a.as_ref().err().unwrap())).collect();
    let detail = if why.is_empty() { "no endpoints to probe".to_string() } else { why.join("; ") };
    Health { healthy: false, detail }
}

impl Vantage {
    /// A vantage point that grants from the start, or not; with `policy`, only grants that meet
    /// it (the controller's), without, any (an arbiter's: withholding it decides nothing alone).
    pub fn new(granting: bool, policy: Option<GrantPolicy>) -> Vantage {
        let v = Vantage { state: std::sync::Arc::new(VantageState { policy, ..VantageState::default() }) };
        v.set_granting(granting);
        v
    }

    /// Grant from now on, or stop (the runbook's `StopRenewing`). Returns the last grant: once
    /// stopped, there is none after it (a grant holds the same lock).
    pub fn set_granting(&self, on: bool) -> Option<std::time::Instant> {
        let last = self.state.last_grant.lock().unwrap();
        self.state.granting.store(on, std::sync::atomic::Ordering::SeqCst);
        *last
    }

    /// When this vantage point last granted the lease.
    pub fn last_grant(&self) -> Option<std::time::Instant> {
        *self.state.last_grant.lock().unwrap()
    }

    /// Keep what a probe of the primary found.
    pub fn record(&self, health: Health) {
        *self.state.seen.lock().unwrap() = Some((std::time::Instant::now(), health));
    }

    /// The last probe's finding, and how long ago it was made.
    pub fn observation(&self) -> Option<(std::time::Duration, Health)> {
        self.state.seen.lock().unwrap().as_ref().map(|(at, h)| (at.elapsed(), h.clone()))
    }

    /// Probe `primary`'s members every `every` (each probe bounded by it), and keep what each
    /// found; until the task is dropped.
    pub async fn watch_primary(self, primary: crate::Cluster, every: std::time::Duration) {
        loop {
            let next = tokio::time::sleep(every);
            self.record(probe_primary(&primary, every).await);
            next.await;
        }
    }

    /// Answer `geolockpb.Vantage` on `listener` until the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .add_service(fpb::vantage_server::VantageServer::new(self))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    }
}

#[tonic::async_trait]
impl fpb::vantage_server::Vantage for Vantage {
    async fn grant_write_lease(
        &self,
        req: tonic::Request<fpb::GrantWriteLeaseRequest>,
    ) -> Result<tonic::Response<fpb::GrantWriteLeaseResponse>, tonic::Status> {
        let req = req.into_inner();
        if let Some(why) = self.state.policy.and_then(|p| p.refusal(req.lease_ms, req.epoch, req.vantages)) {
            tracing::warn!("refused member {:x} of cluster {:x} the write lease: {why}", req.member_id, req.cluster_id);
            return Ok(tonic::Response::new(fpb::GrantWriteLeaseResponse { granted: false, reason: why }));
        }
        // The grant is recorded before it is answered: a grant the leader may act on is never
        // one the controller does not count.
        let mut last = self.state.last_grant.lock().unwrap();
        let granted = self.state.granting.load(std::sync::atomic::Ordering::SeqCst);
        if granted {
            *last = Some(std::time::Instant::now());
        }
        let reason = if granted { String::new() } else { "this vantage point has stopped granting".into() };
        Ok(tonic::Response::new(fpb::GrantWriteLeaseResponse { granted, reason }))
    }

    async fn observe(
        &self,
        _req: tonic::Request<fpb::ObserveRequest>,
    ) -> Result<tonic::Response<fpb::ObserveResponse>, tonic::Status> {
        let answer = match self.observation() {
            None => fpb::ObserveResponse::default(),
            Some((age, h)) => fpb::ObserveResponse {
                observed: true,
                healthy: h.healthy,
                age_ms: age.as_millis() as u64,
                detail: h.detail,
            },
        };
        Ok(tonic::Response::new(answer))
    }
}

/// Approve, at the controller at `endpoint`, the failover awaiting approval with `token`.
/// Returns the revision epoch it goes into.
///
/// Errors: [`ClientError::Connect`]; a refusal as [`ClientError::Rpc`] (FAILED_PRECONDITION
/// with the reason: wrong, used or expired token, or nothing to approve).
pub async fn approve(endpoint: &str, token: u64) -> Result<u64, ClientError> {
    let ch = crate::connect(endpoint).await?;
    let mut c = fpb::controller_client::ControllerClient::new(ch);
    Ok(c.approve(fpb::ApproveRequest { token }).await?.into_inner().epoch)
}

/// How vantage point `endpoint` last saw the primary: `None` if it has not probed it yet.
///
/// Errors: [`ClientError::Connect`]; [`ClientError::Rpc`].
pub async fn observe(endpoint: &str) -> Result<Option<(std::time::Duration, Health)>, ClientError> {
    let ch = crate::connect(endpoint).await?;
    let mut c = fpb::vantage_client::VantageClient::new(ch);
    let r = c.observe(fpb::ObserveRequest {}).await?.into_inner();
    Ok(r.observed
        .then(|| (std::time::Duration::from_millis(r.age_ms), Health { healthy: r.healthy, detail: r.detail })))
}

/// A 64-bit mix (Steele, Lea and Flood's SplitMix64 finaliser): distinct tokens from one seed.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Windows of seconds, as the tests run them; the lease lapses 1.5 s after its last grant.
    fn settings(mode: Mode) -> Settings {
        Settings {
            mode,
            detect_window_ms: 1_000,
            report_max_age_ms: 500,
            approval_ttl_ms: 10_000,
            write_lease_ms: 1_200,
            clock_drift_ms: 300,
            step_retry_ms: 2_000,
            ..Settings::default()
        }
    }

    /// A runbook that has seen the primary healthy (at 0, from the standby), its `Armed` record
    /// taken.
    fn armed(mode: Mode, epoch: u64) -> Runbook {
        let mut r = Runbook::new(settings(mode), epoch, 7);
        assert_eq!(
            health(&mut r, "standby", true, 0),
            vec![Action::Journal(Record::Armed { at_ms: 0, vantage: "standby".into() })]
        );
        r
    }

    fn health(r: &mut Runbook, vantage: &str, healthy: bool, at_ms: u64) -> Vec<Action> {
        r.on(Event::Health { vantage: vantage.into(), healthy, at_ms })
    }

    /// Both vantage points report the primary unhealthy every 100 ms over `[from, to]`; returns
    /// the actions of the last report.
    fn unhealthy_from_both(r: &mut Runbook, from: u64, to: u64) -> Vec<Action> {
        let mut last = Vec::new();
        for t in (from..=to).step_by(100) {
            last = health(r, "standby", false, t);
            last.extend(health(r, "arbiter", false, t));
        }
        last
    }

    /// The primary lost from both vantage points over `[0, at_ms]`, and the decision journaled
    /// once granting stopped, its last grant at `at_ms`.
    fn decide(r: &mut Runbook, at_ms: u64) -> Vec<Action> {
        let mut out = unhealthy_from_both(r, 0, at_ms);
        assert_eq!(out.last(), Some(&Action::StopRenewing), "{out:?}");
        out.extend(r.on(Event::RenewingStopped { last_grant_ms: Some(at_ms), at_ms }));
        out
    }

    fn started(step: Step, at_ms: u64) -> Action {
        Action::Journal(Record::Started { step, at_ms })
    }

    #[test]
    fn a_replayed_journal_tells_where_the_runbook_stands_and_what_it_chose() {
        let journal = [
            Record::Armed { at_ms: 1_000, vantage: "standby".into() },
            Record::AwaitingApproval { token: 0xa, expires_at_ms: 9_000 },
            Record::Decided { epoch: 1, at_ms: 5_000, lease_lapses_at_ms: 7_000 },
            Record::Started { step: Step::Fence, at_ms: 5_000 },
            Record::Fenced { epoch: 1, at_ms: 5_010 },
            Record::Finished { step: Step::Fence, at_ms: 5_020 },
            Record::Started { step: Step::Promote, at_ms: 5_030 },
            Record::Chose { target: "l1".into(), at_ms: 5_040 },
            Record::Finished { step: Step::Promote, at_ms: 5_050 },
            Record::Started { step: Step::Notify, at_ms: 5_060 },
            Record::Finished { step: Step::Notify, at_ms: 5_070 },
        ];
        let at = |n: usize| Runbook::replayed(&journal[..n]);
        assert_eq!((at(0).phase(), at(0).armed()), (&Phase::Watching, false));
        assert_eq!((at(1).phase(), at(1).armed()), (&Phase::Watching, true));
        assert_eq!(at(2).phase(), &Phase::AwaitingApproval { token: 0xa, expires_at_ms: 9_000 });
        assert_eq!(at(3).phase(), &Phase::Running { epoch: 1, step: Step::Fence, retry_at_ms: None });
        assert!(!at(4).fenced_by_majority() && at(5).fenced_by_majority());
        assert_eq!(at(6).phase(), &Phase::WaitingForLease { epoch: 1 });
        assert_eq!((at(7).promoted(), at(8).promoted()), (None, Some("l1")));
        assert_eq!(at(11).phase(), &Phase::Done { epoch: 1 });
    }

    #[test]
    fn the_timeline_counts_from_the_first_record_and_times_each_step_from_its_last_start() {
        let records = [
            Record::AwaitingApproval { token: 0xa, expires_at_ms: 9_000 },
            Record::Detected { at_ms: 5_000, vantages: vec!["arbiter".into(), "standby".into()] },
            Record::Decided { epoch: 1, at_ms: 5_000, lease_lapses_at_ms: 7_000 },
            Record::Started { step: Step::Fence, at_ms: 5_000 },
            Record::Failed { step: Step::Fence, at_ms: 5_040, reason: "hook exited 1".into() },
            Record::Started { step: Step::Fence, at_ms: 6_040 },
            Record::Finished { step: Step::Fence, at_ms: 6_050 },
            Record::Started { step: Step::Promote, at_ms: 7_010 },
            Record::Chose { target: "l1".into(), at_ms: 7_020 },
            Record::Finished { step: Step::Promote, at_ms: 7_215 },
            Record::Started { step: Step::Notify, at_ms: 7_300 },
        ];
        // NOTIFY, started and not finished, is not timed.
        assert_eq!(step_durations(&records), [(Step::Fence, 10), (Step::Promote, 205)]);
        assert_eq!(
            timeline(&records),
            [
                "+0 ms awaiting approval with token a",
                "+0 ms detected: lost as seen from arbiter, standby",
                "+0 ms decided: fail over into revision epoch 1; the old primary's write lease lapses at +2000 ms",
                "+0 ms Fence started",
                "+40 ms Fence failed after 40 ms: hook exited 1",
                "+1040 ms Fence started",
                "+1050 ms Fence finished in 10 ms",
                "+2010 ms Promote started",
                "+2020 ms chose l1 to promote",
                "+2215 ms Promote finished in 205 ms",
                "+2300 ms Notify started",
            ]
        );
    }

    #[test]
    fn the_controller_grants_only_leases_its_withheld_grant_ends_in_time() {
        let p = GrantPolicy { lease_ms_max: 1_500, epoch: 2 };
        assert_eq!(p.refusal(1_500, 2, 2), None);
        assert_eq!(p.refusal(1_000, 2, 1), None);
        let refused = |lease_ms, epoch, vantages, says: &str| {
            let why = p.refusal(lease_ms, epoch, vantages).expect("refused");
            assert!(why.contains(says), "{why}");
        };
        refused(1_501, 2, 2, "above this controller's write_lease_ms 1500");
        refused(60_000, 2, 2, "above this controller's write_lease_ms 1500");
        refused(1_500, 1, 2, "revision epoch 1, this controller fails over epoch 2");
        refused(1_500, 3, 2, "revision epoch 3");
        refused(1_500, 2, 3, "counts 3 vantage points");
        refused(1_500, 2, 5, "counts 5 vantage points");
        refused(1_500, 2, 0, "counts 0 vantage points");
    }

    #[test]
    fn a_fence_counts_only_as_a_majority_of_every_voter_set_reported() {
        let one = |ids: &[u64]| vec![ids.to_vec()];
        // Two of three voters.
        assert!(fenced_by_majority(&[(1, one(&[1, 2, 3])), (2, one(&[1, 2, 3]))]));
        assert!(!fenced_by_majority(&[(1, one(&[1, 2, 3]))]));
        // Fenced endpoints that are not voters (learners) count for nothing.
        assert!(!fenced_by_majority(&[(1, one(&[1, 2, 3])), (7, one(&[1, 2, 3])), (8, one(&[1, 2, 3]))]));
        // The same member answering twice (two endpoints of one member) counts once.
        assert!(!fenced_by_majority(&[(1, one(&[1, 2, 3])), (1, one(&[1, 2, 3]))]));
        // Five voters, of which three fenced, are enough; two are not.
        assert!(fenced_by_majority(&[(1, one(&[1, 2, 3, 4, 5])), (2, vec![]), (3, vec![])]));
        assert!(!fenced_by_majority(&[(1, one(&[1, 2, 3, 4, 5])), (2, vec![])]));
        // A joint change: old {1..5}, new {1,2,3,6,7}. {4,5,6,7} is most of their union and a
        // majority of neither; {1,2,3} unfenced would still commit in both.
        let joint = vec![vec![1, 2, 3, 4, 5], vec![1, 2, 3, 6, 7]];
        let answers: Vec<(u64, Vec<Vec<u64>>)> = [4, 5, 6, 7].iter().map(|id| (*id, joint.clone())).collect();
        assert!(!fenced_by_majority(&answers));
        let answers: Vec<(u64, Vec<Vec<u64>>)> = [1, 2, 6, 7].iter().map(|id| (*id, joint.clone())).collect();
        assert!(!fenced_by_majority(&answers), "2 of the old set's 5");
        let answers: Vec<(u64, Vec<Vec<u64>>)> = [1, 2, 3].iter().map(|id| (*id, joint.clone())).collect();
        assert!(fenced_by_majority(&answers));
        // A member that knows a newer membership: its sets count too.
        assert!(!fenced_by_majority(&[(1, one(&[1, 2, 3])), (2, one(&[2, 4, 5]))]));
        assert!(!fenced_by_majority(&[]));
    }

    #[test]
    fn the_lost_window_is_known_only_when_the_fence_reached_an_old_member_and_the_seed_is_journaled() {
        let mut r = armed(Mode::Auto, 0);
        let mut journal = Vec::new();
        let records = |out: Vec<Action>| -> Vec<Record> {
            out.into_iter().filter_map(|a| if let Action::Journal(x) = a { Some(x) } else { None }).collect()
        };
        journal.extend(records(r.on(Event::OldApplied { index: 90, at_ms: 10 })));
        assert!(journal.is_empty(), "nothing decided yet: {journal:?}");
        journal.extend(records(decide(&mut r, 1_000)));
        journal.extend(records(r.on(Event::OldApplied { index: 120, at_ms: 1_100 })));
        journal.extend(records(r.on(Event::OldApplied { index: 110, at_ms: 1_101 })));
        journal.extend(records(r.on(Event::Seeded { applied_index: 100, dropped_entries: 3, at_ms: 1_102 })));
        assert_eq!(lost_window(&journal), None, "no seed outside PROMOTE");
        journal.extend(records(r.on(Event::Done { step: Step::Fence, at_ms: 1_200 })));
        journal.extend(records(r.on(Event::FencedByMajority { epoch: 1, at_ms: 1_300 })));
        journal.extend(records(r.on(Event::Seeded { applied_index: 100, dropped_entries: 3, at_ms: 1_400 })));
        assert_eq!(
            lost_window(&journal),
            Some(LostWindow { old_applied_index: 120, seeded_from_index: 100, lost_entries: 20 })
        );
        let told = timeline(&journal);
        assert!(told.iter().any(|l| l.ends_with("had applied up to index 120")), "{told:?}");
        assert!(!told.iter().any(|l| l.ends_with("had applied up to index 110")), "{told:?}");
        assert!(told.iter().any(|l| l.ends_with("from applied index 100 (3 received entries dropped)")), "{told:?}");
        assert_eq!(lost_window(&journal[..journal.len() - 1]), None);
    }

    #[test]
    fn the_primary_is_healthy_when_any_member_names_a_leader() {
        let a = |ep: &str, r: Result<u64, &str>| (ep.to_string(), r.map_err(str::to_string));
        assert_eq!(
            judge(vec![a("e1", Err("no leader")), a("e2", Ok(0x2a))]),
            Health { healthy: true, detail: "e2 names leader 2a".into() }
        );
        assert_eq!(
            judge(vec![a("e1", Err("no leader")), a("e2", Err("cannot reach any of e2"))]),
            Health { healthy: false, detail: "e1: no leader; e2: cannot reach any of e2".into() }
        );
        assert_eq!(judge(vec![]), Health { healthy: false, detail: "no endpoints to probe".into() });
    }

    #[test]
    fn two_vantage_points_for_the_whole_window_decide_and_start_the_fence() {
        let mut r = armed(Mode::Auto, 0);
        r.on(Event::LeaseRenewed { at_ms: 400 });
        assert_eq!(unhealthy_from_both(&mut r, 0, 900), vec![]);
        assert_eq!(r.on(Event::Tick { now_ms: 999 }), vec![]);
        assert_eq!(
            r.on(Event::Tick { now_ms: 1_000 }),
            vec![
                Action::Journal(Record::Detected { at_ms: 1_000, vantages: vec!["arbiter".into(), "standby".into()] }),
                Action::StopRenewing,
            ]
        );
        assert_eq!(r.phase(), &Phase::Deciding { epoch: 1 });
        // The vantage point last granted at 990: the lease lapses 1.5 s after.
        assert_eq!(
            r.on(Event::RenewingStopped { last_grant_ms: Some(990), at_ms: 1_001 }),
            vec![
                Action::Journal(Record::Decided { epoch: 1, at_ms: 1_001, lease_lapses_at_ms: 2_490 }),
                started(Step::Fence, 1_001),
                Action::Run { step: Step::Fence, epoch: 1 },
            ]
        );
    }

    /// Found by the partitioned-primary test: a decision triggered by an arbiter's report made a
    /// probe interval ago recorded the lapse from the report's time, while the lease had been
    /// granted since; the primary wrote past the recorded lapse. The lapse now counts from the
    /// last grant itself, reported once granting has stopped, or from a later renewal seen.
    #[test]
    fn the_decision_counts_the_lease_from_the_last_grant_made_before_granting_stopped() {
        let mut r = armed(Mode::Auto, 0);
        unhealthy_from_both(&mut r, 0, 700);
        r.on(Event::LeaseRenewed { at_ms: 1_250 });
        assert_eq!(r.on(Event::Tick { now_ms: 1_300 }), vec![], "both reports are too old to count");
        health(&mut r, "standby", false, 1_300);
        // The arbiter's probe of 1,000 arrives now; it completes the window.
        assert_eq!(health(&mut r, "arbiter", false, 1_000).last(), Some(&Action::StopRenewing));
        // Granted once more at 1,290 while the decision was made: 1,290 + 1,200 + 300.
        let out = r.on(Event::RenewingStopped { last_grant_ms: Some(1_290), at_ms: 1_310 });
        assert_eq!(out[0], Action::Journal(Record::Decided { epoch: 1, at_ms: 1_310, lease_lapses_at_ms: 2_790 }));
        // A report of an earlier grant changes nothing, nor does a second stop.
        let mut r = armed(Mode::Auto, 0);
        r.on(Event::LeaseRenewed { at_ms: 900 });
        unhealthy_from_both(&mut r, 0, 1_000);
        let out = r.on(Event::RenewingStopped { last_grant_ms: None, at_ms: 1_010 });
        assert_eq!(out[0], Action::Journal(Record::Decided { epoch: 1, at_ms: 1_010, lease_lapses_at_ms: 2_400 }));
        assert_eq!(r.on(Event::RenewingStopped { last_grant_ms: Some(1_005), at_ms: 1_020 }), vec![]);
    }

    /// Found by CI: a controller started with the primary ran DETECT while the primary was still
    /// electing its first leader on a loaded machine, and fenced it as it came up.
    #[test]
    fn a_primary_never_seen_healthy_is_not_failed_over() {
        let mut r = Runbook::new(settings(Mode::Auto), 0, 7);
        assert_eq!(unhealthy_from_both(&mut r, 0, 5_000), vec![]);
        assert_eq!(r.on(Event::Tick { now_ms: 6_000 }), vec![]);
        assert_eq!(
            health(&mut r, "arbiter", true, 6_100),
            vec![Action::Journal(Record::Armed { at_ms: 6_100, vantage: "arbiter".into() })]
        );
        assert_eq!(health(&mut r, "standby", true, 6_100), vec![], "armed once");
        assert_eq!(unhealthy_from_both(&mut r, 6_200, 7_100), vec![]);
        assert_eq!(
            r.on(Event::Tick { now_ms: 7_200 })[0],
            Action::Journal(Record::Detected { at_ms: 7_200, vantages: vec!["arbiter".into(), "standby".into()] })
        );
        // A controller that restarts during the outage stays armed, from its journal.
        let armed_at = Record::Armed { at_ms: 6_100, vantage: "arbiter".into() };
        let (mut resumed, out) = Runbook::resume(settings(Mode::Auto), 0, 7, &[armed_at], 8_000);
        assert_eq!(out, vec![]);
        unhealthy_from_both(&mut resumed, 8_000, 8_900);
        assert!(matches!(resumed.on(Event::Tick { now_ms: 9_000 })[0], Action::Journal(Record::Detected { .. })));
    }

    #[test]
    fn a_one_sided_partition_and_stale_reports_do_not_trigger() {
        let mut r = armed(Mode::Auto, 0);
        for t in (0..=5_000).step_by(100) {
            // The standby cannot reach the primary; the arbiter can.
            assert_eq!(health(&mut r, "standby", false, t), vec![]);
            assert_eq!(health(&mut r, "arbiter", true, t), vec![]);
        }
        // The arbiter goes silent while the standby still sees nothing: one recent view only.
        let mut r = armed(Mode::Auto, 0);
        unhealthy_from_both(&mut r, 0, 400);
        for t in (500..=3_000).step_by(100) {
            assert_eq!(health(&mut r, "standby", false, t), vec![]);
        }
        assert_eq!(r.phase(), &Phase::Watching);
    }

    #[test]
    fn health_that_returns_inside_the_window_starts_it_again() {
        let mut r = armed(Mode::Auto, 0);
        unhealthy_from_both(&mut r, 0, 500);
        assert_eq!(health(&mut r, "arbiter", true, 600), vec![]);
        assert_eq!(unhealthy_from_both(&mut r, 700, 1_600), vec![]);
        let out = r.on(Event::Tick { now_ms: 1_700 });
        assert_eq!(
            out[0],
            Action::Journal(Record::Detected { at_ms: 1_700, vantages: vec!["arbiter".into(), "standby".into()] })
        );
    }

    #[test]
    fn approve_mode_waits_for_its_one_token_which_expires() {
        let mut r = armed(Mode::Approve, 3);
        unhealthy_from_both(&mut r, 0, 900);
        let out = r.on(Event::Tick { now_ms: 1_000 });
        let Phase::AwaitingApproval { token, expires_at_ms } = *r.phase() else { panic!("{out:?}") };
        assert_eq!(expires_at_ms, 11_000);
        assert_eq!(
            &out[1..],
            [
                Action::Journal(Record::AwaitingApproval { token, expires_at_ms }),
                Action::RequestApproval { token, expires_at_ms },
            ]
        );
        assert_eq!(
            r.on(Event::Approve { token: token ^ 1, at_ms: 1_100 }),
            vec![Action::RefuseApproval { token: token ^ 1, why: "not the approval token this failover awaits" }]
        );
        // Unapproved past its expiry, with the primary still lost: a new token, the old one dead.
        unhealthy_from_both(&mut r, 1_000, 11_000);
        let Phase::AwaitingApproval { token: second, .. } = *r.phase() else { panic!() };
        assert_ne!(second, token);
        assert_eq!(
            r.on(Event::Approve { token, at_ms: 11_050 })[0],
            Action::RefuseApproval { token, why: "not the approval token this failover awaits" }
        );
        assert_eq!(r.on(Event::Approve { token: second, at_ms: 11_100 }), vec![Action::StopRenewing]);
        let out = r.on(Event::RenewingStopped { last_grant_ms: Some(11_000), at_ms: 11_110 });
        assert_eq!(out[0], Action::Journal(Record::Decided { epoch: 4, at_ms: 11_110, lease_lapses_at_ms: 12_500 }));
        assert_eq!(
            r.on(Event::Approve { token: second, at_ms: 11_200 }),
            vec![Action::RefuseApproval {
                token: second,
                why: "the failover was already decided (a token is good once)"
            }]
        );
    }

    #[test]
    fn a_primary_that_recovers_while_approval_is_awaited_is_not_failed_over() {
        let mut r = armed(Mode::Approve, 0);
        unhealthy_from_both(&mut r, 0, 1_000);
        let Phase::AwaitingApproval { token, .. } = *r.phase() else { panic!() };
        assert_eq!(health(&mut r, "arbiter", true, 1_100), vec![Action::Journal(Record::Recovered { at_ms: 1_100 })]);
        assert_eq!(
            r.on(Event::Approve { token, at_ms: 1_200 }),
            vec![Action::RefuseApproval { token, why: "no failover awaits approval" }]
        );
    }

    #[test]
    fn promote_waits_for_the_lease_to_lapse_or_for_the_fence_records() {
        // The lease lapses at 2,500 (decided at 1,000, lease 1,200, drift 300).
        let mut r = armed(Mode::Auto, 0);
        decide(&mut r, 1_000);
        assert_eq!(
            r.on(Event::Done { step: Step::Fence, at_ms: 1_200 }),
            vec![Action::Journal(Record::Finished { step: Step::Fence, at_ms: 1_200 })]
        );
        // A renewal granted just before the vantage points stopped, reported late, counts.
        r.on(Event::LeaseRenewed { at_ms: 1_100 });
        assert_eq!(r.on(Event::Tick { now_ms: 2_500 }), vec![]);
        assert_eq!(
            r.on(Event::Tick { now_ms: 2_600 }),
            vec![started(Step::Promote, 2_600), Action::Run { step: Step::Promote, epoch: 1 }]
        );
        // With the old voters' fence records, it need not wait.
        let mut r = armed(Mode::Auto, 0);
        decide(&mut r, 1_000);
        r.on(Event::Done { step: Step::Fence, at_ms: 1_200 });
        assert_eq!(r.on(Event::FencedByMajority { epoch: 2, at_ms: 1_300 }), vec![], "another epoch's fence");
        assert_eq!(
            r.on(Event::FencedByMajority { epoch: 1, at_ms: 1_300 }),
            vec![
                Action::Journal(Record::Fenced { epoch: 1, at_ms: 1_300 }),
                started(Step::Promote, 1_300),
                Action::Run { step: Step::Promote, epoch: 1 }
            ]
        );
    }

    #[test]
    fn promote_chooses_its_learner_once_and_a_resumed_controller_promotes_that_one() {
        let mut r = armed(Mode::Auto, 0);
        let mut journal = Vec::new();
        let mut keep = |out: Vec<Action>| {
            journal.extend(out.iter().filter_map(|a| if let Action::Journal(x) = a { Some(x.clone()) } else { None }));
            out
        };
        keep(decide(&mut r, 1_000));
        keep(r.on(Event::Done { step: Step::Fence, at_ms: 1_200 }));
        keep(r.on(Event::FencedByMajority { epoch: 1, at_ms: 1_300 }));
        let promote_l2 = Action::PromoteChosen { epoch: 1, target: "l2".into() };
        assert_eq!(
            keep(r.on(Event::Chose { target: "l2".into(), at_ms: 1_400 })),
            vec![Action::Journal(Record::Chose { target: "l2".into(), at_ms: 1_400 }), promote_l2.clone()]
        );
        assert_eq!(r.on(Event::Chose { target: "l3".into(), at_ms: 1_500 }), vec![], "chosen once");
        // A promotion that failed (the learner restarting) is tried again on the same learner.
        let failed = Event::Failed { step: Step::Promote, reason: "no answer".into(), at_ms: 1_600 };
        assert_eq!(r.on(failed).len(), 1);
        assert_eq!(r.on(Event::Tick { now_ms: 3_600 }), vec![started(Step::Promote, 3_600), promote_l2.clone()]);
        // So does a controller restarted from the journal that ends at the choice.
        assert!(matches!(journal.last(), Some(Record::Chose { .. })), "{journal:?}");
        let (mut resumed, out) = Runbook::resume(settings(Mode::Auto), 0, 7, &journal, 5_000);
        assert_eq!(out, vec![Action::StopRenewing, promote_l2]);
        assert_eq!(resumed.on(Event::Chose { target: "l3".into(), at_ms: 5_100 }), vec![]);
    }

    #[test]
    fn a_failed_step_runs_again_after_its_retry_delay() {
        let mut r = armed(Mode::Auto, 0);
        decide(&mut r, 1_000);
        let failed = Event::Failed { step: Step::Fence, reason: "firewall hook exited 1".into(), at_ms: 1_100 };
        assert_eq!(
            r.on(failed),
            vec![Action::Journal(Record::Failed {
                step: Step::Fence,
                at_ms: 1_100,
                reason: "firewall hook exited 1".into()
            })]
        );
        assert_eq!(r.on(Event::Tick { now_ms: 3_000 }), vec![]);
        assert_eq!(
            r.on(Event::Tick { now_ms: 3_100 }),
            vec![started(Step::Fence, 3_100), Action::Run { step: Step::Fence, epoch: 1 }]
        );
    }

    /// An executor that finishes every step it is asked to run, checking that the journal has it
    /// started first; returns the steps whose effect it carried out, in order.
    fn execute(r: &mut Runbook, first: Vec<Action>, mut now_ms: u64, journal: &mut Vec<Record>) -> Vec<Step> {
        let mut effects = Vec::new();
        let mut pending = first;
        while matches!(r.phase(), Phase::Running { .. } | Phase::WaitingForLease { .. }) || !pending.is_empty() {
            let mut next = Vec::new();
            for a in pending {
                match a {
                    Action::Journal(rec) => journal.push(rec),
                    Action::StopRenewing => {
                        next.extend(r.on(Event::RenewingStopped { last_grant_ms: None, at_ms: now_ms }))
                    }
                    Action::Run { step: Step::Promote, .. } => {
                        now_ms += 10;
                        next.extend(r.on(Event::Chose { target: "l1".into(), at_ms: now_ms }));
                    }
                    Action::PromoteChosen { .. } | Action::Run { .. } => {
                        let step = match a {
                            Action::Run { step, .. } => step,
                            _ => Step::Promote,
                        };
                        // The journal says it started, and not that it finished, before it runs.
                        let last = journal
                            .iter()
                            .rev()
                            .find(|x| matches!(x, Record::Started { .. } | Record::Finished { .. }));
                        assert!(
                            matches!(last, Some(Record::Started { step: s, .. }) if *s == step),
                            "{step:?} run unjournaled"
                        );
                        effects.push(step);
                        now_ms += 10;
                        next.extend(r.on(Event::Done { step, at_ms: now_ms }));
                    }
                    _ => {}
                }
            }
            if next.is_empty() {
                now_ms += 100;
                next = r.on(Event::Tick { now_ms });
            }
            pending = next;
        }
        effects
    }

    #[test]
    fn a_controller_killed_after_any_journal_record_resumes_and_finishes_each_step_once() {
        let mut r = armed(Mode::Auto, 0);
        let mut journal = Vec::new();
        let first = unhealthy_from_both(&mut r, 0, 1_000);
        let effects = execute(&mut r, first, 1_000, &mut journal);
        let all = [Step::Fence, Step::Promote, Step::Join, Step::Redirect, Step::Verify, Step::Notify];
        assert_eq!(effects, all);
        assert_eq!(r.phase(), &Phase::Done { epoch: 1 });
        for crash in 0..=journal.len() {
            let prefix = journal[..crash].to_vec();
            let (mut resumed, actions) = Runbook::resume(settings(Mode::Auto), 0, 7, &prefix, 10_000);
            let mut rest = prefix.clone();
            let again = execute(&mut resumed, actions, 10_000, &mut rest);
            if !prefix.iter().any(|x| matches!(x, Record::Decided { .. })) {
                // Nothing was decided: the resumed controller watches the primary afresh, for a
                // whole window, before it acts.
                assert_eq!(
                    (resumed.phase(), again.as_slice()),
                    (&Phase::Watching, &[][..]),
                    "crash after record {crash}"
                );
                continue;
            }
            assert_eq!(resumed.phase(), &Phase::Done { epoch: 1 }, "crash after record {crash}: {prefix:?}");
            // Every step finishes exactly once across the crash; only a step started and not
            // finished before it runs again (its effect is idempotent).
            for step in &all {
                let finished =
                    rest.iter().filter(|x| matches!(x, Record::Finished { step: s, .. } if s == step)).count();
                assert_eq!(finished, 1, "crash after record {crash}: {step:?} finished {finished} times");
            }
            let done_before: Vec<Step> = prefix
                .iter()
                .filter_map(|x| if let Record::Finished { step, .. } = x { Some(*step) } else { None })
                .collect();
            assert!(again.iter().all(|s| !done_before.contains(s)), "crash after record {crash}: reran {again:?}");
        }
    }
}
