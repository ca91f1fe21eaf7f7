//! The failover controller's executor (`lockctl failover-controller --config FILE`): it feeds the
//! runbook ([`crate::failover::Runbook`]) what it observes and carries out what the runbook
//! returns, in order, each journal record synced ([`crate::journal`]) before the next action.
//!
//! It serves `/metrics` on the same address: the runbook's phase and step (`controller_metrics`).
//!
//! It is itself a vantage point: it serves `geolockpb.Vantage` (granting the primary's leader its
//! region write lease until the runbook decides, and answering Observe), probes the primary, and
//! asks the other vantage points (arbiters) for their views. Only one controller acts: it holds
//! an exclusive lock on its journal file (`flock`), and a second one started on the same journal
//! waits for it.
//!
//! Each step is idempotent, so a step the journal shows started and not finished runs again
//! with one effect: FENCE records the same epoch again; PROMOTE first looks for a standby member
//! already in the new epoch; REDIRECT's DNS compare-and-swap finds the records already moved.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::dns::{DnsError, Endpoint, SrvTarget, TsigKey, Updater};
use crate::failover::{self, Action, Event, Mode, Phase, Record, Runbook, Settings, Step, Vantage};
use crate::journal::{Journal, JournalError};
use crate::notify::NotifyConfig;
use geolock_proto::geolockpb as fpb;

/// The controller's configuration file (YAML or TOML). Durations in milliseconds.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// This vantage point's name in the runbook's records (`standby`).
    pub name: String,
    /// Where it serves `geolockpb.Vantage` (`host:port`): the primary's `--failover-vantages`
    /// names it.
    pub listen: String,
    /// The journal file; its lock keeps a second controller out.
    pub journal: PathBuf,
    /// The primary's members' client endpoints, comma-separated (probed, and fenced).
    pub primary: String,
    /// The standby's members' client endpoints, comma-separated (one is promoted).
    pub standby: String,
    /// The other vantage points' endpoints (`lockctl failover vantage`), whose views count.
    #[serde(default)]
    pub arbiters: Vec<String>,
    /// The primary's revision epoch; the failover goes into the next.
    #[serde(default)]
    pub epoch: u64,
    /// `auto` or `approve`.
    #[serde(default = "auto")]
    pub mode: String,
    #[serde(default = "default_detect_window_ms")]
    pub detect_window_ms: u64,
    #[serde(default = "default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// The primary's `--failover-write-lease-ms`.
    #[serde(default = "default_write_lease_ms")]
    pub write_lease_ms: u64,
    #[serde(default = "default_clock_drift_ms")]
    pub clock_drift_ms: u64,
    #[serde(default = "default_step_retry_ms")]
    pub step_retry_ms: u64,
    /// Commands FENCE runs first (a firewall rule, a certificate revocation), each an argument
    /// vector; `GEOLOCK_FAILOVER_EPOCH` is set for them. A command that fails fails the step.
    #[serde(default)]
    pub fence_hooks: Vec<Vec<String>>,
    /// REDIRECT's DNS change; none, and REDIRECT does nothing.
    #[serde(default)]
    pub dns: Option<DnsConfig>,
    /// NOTIFY's webhook; none, and NOTIFY only logs.
    #[serde(default)]
    pub notify: Option<NotifyConfig>,
    /// How both regions' members are reached, and as whom (`cacert`, `cert`, `key`, `user`,
    /// `password`, as etcdctl's flags); none, plain text as nobody. While auth is on the user
    /// must be root (FENCE, PROMOTE and JOIN are), best named by a client certificate's common
    /// name: a password costs a bcrypt on the member at every probe's connection.
    #[serde(default)]
    pub client: crate::Credentials,
}

impl ControllerConfig {
    /// `endpoints` reached with [`ControllerConfig::client`]; the files are read on each call,
    /// so a renewed certificate is used from the next connection on.
    fn reach(&self, endpoints: &str) -> Result<crate::Cluster, String> {
        crate::Cluster::with(endpoints, &self.client).map_err(|e| format!("client: {e}"))
    }
}

fn auto() -> String {
    "auto".into()
}
fn default_detect_window_ms() -> u64 {
    Settings::default().detect_window_ms
}
fn default_probe_interval_ms() -> u64 {
    1_000
}
fn default_write_lease_ms() -> u64 {
    Settings::default().write_lease_ms
}
fn default_clock_drift_ms() -> u64 {
    Settings::default().clock_drift_ms
}
fn default_step_retry_ms() -> u64 {
    Settings::default().step_retry_ms
}

/// The client name's records before and after, and the server that takes the update.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// `host:port` of the zone's primary server.
    pub server: String,
    pub zone: String,
    /// The client name (`clients.example.com.`).
    pub name: String,
    /// The TSIG key's name and base64 secret (hmac-sha256); none sends the update unsigned.
    pub key_name: Option<String>,
    pub key_secret: Option<String>,
    pub primary: RegionRecords,
    pub standby: RegionRecords,
}

impl DnsConfig {
    /// The updater, and the records before and after.
    fn change(&self) -> Result<(Updater, Endpoint, Endpoint), ControllerError> {
        let server =
            self.server.parse().map_err(|_| ControllerError::Config(format!("dns.server {:?}", self.server)))?;
        let key = match (&self.key_name, &self.key_secret) {
            (Some(n), Some(s)) => Some(TsigKey::from_base64(n, s)?),
            _ => None,
        };
        Ok((Updater::new(server, &self.zone, &self.name, key)?, self.primary.endpoint()?, self.standby.endpoint()?))
    }
}

/// A region's records: its client addresses and its members' `host:port` for SRV.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionRecords {
    #[serde(default)]
    pub addrs: Vec<std::net::IpAddr>,
    #[serde(default)]
    pub srv: Vec<String>,
}

impl RegionRecords {
    fn endpoint(&self) -> Result<Endpoint, ControllerError> {
        let mut members = std::collections::BTreeSet::new();
        for hp in &self.srv {
            let (host, port) =
                hp.rsplit_once(':').ok_or_else(|| ControllerError::Config(format!("srv {hp:?}: not host:port")))?;
            let port = port.parse().map_err(|_| ControllerError::Config(format!("srv {hp:?}: bad port")))?;
            let mut host = host.to_lowercase();
            if !host.ends_with('.') {
                host.push('.');
            }
            members.insert(SrvTarget { host, port });
        }
        Ok(Endpoint { addrs: self.addrs.iter().copied().collect(), members })
    }
}

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("controller configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("journal lock {path}: {source}")]
    Lock { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error(transparent)]
    Dns(#[from] DnsError),
}

/// Milliseconds of wall-clock time: journal records outlive the process, so a restarted
/// controller compares its clock with the times they hold (the drift bound covers the rest).
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl ControllerConfig {
    fn settings(&self) -> Result<Settings, ControllerError> {
        let mode = match self.mode.as_str() {
            "auto" => Mode::Auto,
            "approve" => Mode::Approve,
            other => return Err(ControllerError::Config(format!("mode {other:?}: auto or approve"))),
        };
        // The primary's lease needs a majority of its vantage points; with this controller and
        // one arbiter that is both, so this controller withholding its grant ends it. With more
        // arbiters a majority could go on granting after the decision, and the lapse the runbook
        // waits for would not be one.
        if let Some(n) = &self.notify {
            n.check().map_err(ControllerError::Config)?;
        }
        if self.arbiters.len() != 1 {
            return Err(ControllerError::Config(format!(
                "arbiters: exactly one is supported (the primary's --failover-vantages being this controller and it), not {}",
                self.arbiters.len()
            )));
        }
        Ok(Settings {
            mode,
            detect_window_ms: self.detect_window_ms,
            vantages_required: 2,
            // Three probes missed, and a vantage point's view no longer counts.
            report_max_age_ms: self.probe_interval_ms * 3,
            write_lease_ms: self.write_lease_ms,
            clock_drift_ms: self.clock_drift_ms,
            step_retry_ms: self.step_retry_ms,
            ..Settings::default()
        })
    }
}

/// Hold the journal's lock: exclusive, for as long as the returned file is open. Waits while
/// another controller holds it.
async fn lock_journal(path: &std::path::Path) -> Result<std::fs::File, ControllerError> {
    let lock_path = path.with_extension("lock");
    let err = |source| ControllerError::Lock { path: lock_path.clone(), source };
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(err)?;
    let mut waiting = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => {
                if !waiting {
                    tracing::warn!("another controller holds {}: waiting", lock_path.display());
                    waiting = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(err(e)),
        }
    }
}

/// Run the controller until the runbook is done. Returns the epoch it failed over into.
pub async fn run(cfg: ControllerConfig) -> Result<u64, ControllerError> {
    let settings = cfg.settings()?;
    let dns = cfg.dns.as_ref().map(DnsConfig::change).transpose()?;
    // The lock first: a second controller waits here, and takes over the vantage point's
    // address only once the first is gone.
    let _lock = lock_journal(&cfg.journal).await?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|source| ControllerError::Listen { addr: cfg.listen.clone(), source })?;
    let (journal, records, torn) = Journal::open(&cfg.journal)?;
    if torn > 0 {
        tracing::warn!("dropped {torn} bytes of a journal record cut short by a crash");
    }
    let (mut runbook, first) = Runbook::resume(settings, cfg.epoch, rand::random(), &records, now_ms());
    let decided = records.iter().any(|r| matches!(r, Record::Decided { .. }));
    let policy = failover::GrantPolicy { lease_ms_max: cfg.write_lease_ms, epoch: cfg.epoch };
    let vantage = Vantage::new(!decided, Some(policy));
    let (approvals_tx, mut approvals) = tokio::sync::mpsc::channel(APPROVALS_QUEUED_MAX);
    crate::controller_metrics::publish(&runbook, cfg.epoch);
    let metrics = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(|| async {
                (
                    [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                    crate::controller_metrics::exposition(),
                )
            }),
        )
        // Another path is a gRPC method this controller does not serve: gRPC's Unimplemented.
        .fallback(|| async { [("content-type", "application/grpc"), ("grpc-status", "12")] });
    tokio::spawn(
        tonic::transport::Server::builder()
            .accept_http1(true)
            .add_routes(tonic::service::Routes::from(metrics))
            .add_service(fpb::vantage_server::VantageServer::new(vantage.clone()))
            .add_service(fpb::controller_server::ControllerServer::new(Approvals(approvals_tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let every = Duration::from_millis(cfg.probe_interval_ms.max(1));
    let primary = cfg.reach(&cfg.primary).map_err(ControllerError::Config)?;
    tokio::spawn(vantage.clone().watch_primary(primary, every));
    tracing::info!("controller {} resumes at {:?} after {} journal records", cfg.name, runbook.phase(), records.len());

    let mut executor = Executor {
        cfg: cfg.clone(),
        dns,
        journal,
        vantage: vantage.clone(),
        failpoint: Failpoint::from_env(),
        progress_records: 0,
        feedback: Vec::new(),
    };
    let mut pending: VecDeque<Action> = first.into();
    let mut running: Option<StepTask> = None;
    loop {
        while let Some(action) = pending.pop_front() {
            if let Some(started) = executor.carry_out(action, &runbook)? {
                running = Some(started);
            }
            for e in std::mem::take(&mut executor.feedback) {
                pending.extend(runbook.on(e));
            }
        }
        crate::controller_metrics::publish(&runbook, cfg.epoch);
        if let Phase::Done { epoch } = runbook.phase() {
            tracing::info!("failover into revision epoch {epoch} done");
            return Ok(*epoch);
        }
        let step_done = async {
            match running.as_mut() {
                Some((step, h)) => h.await.unwrap_or_else(|e| {
                    vec![Event::Failed { step: *step, reason: format!("step task: {e}"), at_ms: now_ms() }]
                }),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            events = step_done => {
                running = None;
                for e in events {
                    pending.extend(runbook.on(e));
                }
            }
            Some((token, answer)) = approvals.recv() => {
                let actions = runbook.on(Event::Approve { token, at_ms: now_ms() });
                let refused = actions.iter().find_map(|a| match a {
                    Action::RefuseApproval { why, .. } => Some(why.to_string()),
                    _ => None,
                });
                let _ = answer.send(match refused {
                    Some(why) => Err(why),
                    None => Ok(cfg.epoch + 1),
                });
                pending.extend(actions);
            }
            _ = tokio::time::sleep(every) => {
                for e in observations(&cfg, &vantage).await {
                    pending.extend(runbook.on(e));
                }
            }
        }
    }
}

/// Approvals waiting for the runbook; more are refused as busy.
const APPROVALS_QUEUED_MAX: usize = 16;

/// An approval for the runbook, and where its answer goes: the epoch, or why it was refused.
type Approval = (u64, tokio::sync::oneshot::Sender<Result<u64, String>>);

/// `geolockpb.Controller`: hands each approval to the runbook's loop and answers with its verdict.
struct Approvals(tokio::sync::mpsc::Sender<Approval>);

#[tonic::async_trait]
impl fpb::controller_server::Controller for Approvals {
    async fn approve(
        &self,
        req: tonic::Request<fpb::ApproveRequest>,
    ) -> Result<tonic::Response<fpb::ApproveResponse>, tonic::Status> {
        let token = req.into_inner().token;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0
            .try_send((token, tx))
            .map_err(|_| tonic::Status::resource_exhausted("geolock: too many approvals queued; try again"))?;
        match rx.await {
            Ok(Ok(epoch)) => Ok(tonic::Response::new(fpb::ApproveResponse { epoch })),
            Ok(Err(why)) => Err(tonic::Status::failed_precondition(format!("geolock: approval refused: {why}"))),
            Err(_) => Err(tonic::Status::unavailable("geolock: the controller stopped before it answered")),
        }
    }
}

/// A step running in a task of its own, and the events it will report.
type StepTask = (Step, tokio::task::JoinHandle<Vec<Event>>);

/// What carries out the runbook's actions.
struct Executor {
    cfg: ControllerConfig,
    dns: Option<(Updater, Endpoint, Endpoint)>,
    journal: Journal,
    vantage: Vantage,
    failpoint: Option<Failpoint>,
    /// Records journaled by this process, `Armed` and `Detected` ones not counted.
    progress_records: usize,
    /// Events an action reported at once, for the runbook.
    feedback: Vec<Event>,
}

impl Executor {
    /// How long the old primary's lease may still run by this process's monotonic clock: the
    /// lease plus the drift bound from this vantage point's last grant. The runbook counts in
    /// wall-clock milliseconds (they survive a restart, in the journal); a wall clock stepped
    /// forward would end its wait early, and this floor, while the process that granted lives,
    /// does not move with it.
    fn lease_left_by_monotonic_clock(&self) -> Duration {
        let lease = Duration::from_millis(self.cfg.write_lease_ms + self.cfg.clock_drift_ms);
        self.vantage.last_grant().map_or(Duration::ZERO, |t| lease.saturating_sub(t.elapsed()))
    }

    /// Carry out `action`, which `runbook` returned: a record is synced before this returns; a
    /// step starts in a task of its own, which is returned.
    fn carry_out(&mut self, action: Action, runbook: &Runbook) -> Result<Option<StepTask>, ControllerError> {
        match action {
            Action::Journal(record) => {
                tracing::info!("journal: {record:?}");
                self.journal.append(&record)?;
                if !matches!(record, Record::Armed { .. } | Record::Detected { .. }) {
                    self.progress_records += 1;
                    if self.failpoint == Some(Failpoint::DieAfterRecords(self.progress_records)) {
                        tracing::warn!("failpoint: dying after {} journal records", self.progress_records);
                        std::process::abort();
                    }
                }
            }
            Action::StopRenewing => {
                let last = self.vantage.set_granting(false);
                let now = now_ms();
                let last_grant_ms = last.map(|t| now.saturating_sub(t.elapsed().as_millis() as u64));
                self.feedback.push(Event::RenewingStopped { last_grant_ms, at_ms: now });
            }
            Action::Run { .. } | Action::PromoteChosen { .. } => {
                let (step, epoch, target) = match action {
                    Action::PromoteChosen { epoch, target } => (Step::Promote, epoch, Some(target)),
                    Action::Run { step, epoch } => (step, epoch, None),
                    _ => unreachable!("matched above"),
                };
                let (cfg, dns, promoted) = (self.cfg.clone(), self.dns.clone(), runbook.promoted().map(str::to_string));
                let not_before = match step {
                    Step::Promote if !runbook.fenced_by_majority() => self.lease_left_by_monotonic_clock(),
                    _ => Duration::ZERO,
                };
                // Choosing PROMOTE's target has no effect to die after.
                let die =
                    self.failpoint == Some(Failpoint::DieInStep(step)) && (step != Step::Promote || target.is_some());
                let task = tokio::spawn(async move {
                    if !not_before.is_zero() {
                        tracing::warn!(
                            "the wall clock says the old primary's lease has lapsed, this process's monotonic clock \
                             says {not_before:?} more: waiting that out before PROMOTE"
                        );
                        tokio::time::sleep(not_before).await;
                    }
                    let events = run_step(&cfg, dns.as_ref(), step, epoch, target, promoted).await;
                    if die {
                        tracing::warn!("failpoint: dying in {step:?}, its effect done and not journaled");
                        std::process::abort();
                    }
                    events
                });
                return Ok(Some((step, task)));
            }
            Action::RequestApproval { token, expires_at_ms } => {
                let approve = format!("lockctl failover approve --endpoints {} --token {token:x}", self.cfg.listen);
                tracing::warn!("failover awaits approval: {approve} (valid until {expires_at_ms} ms)");
                if let Some(notify) = self.cfg.notify.clone() {
                    let body = serde_json::json!({
                        "event": "awaiting_approval",
                        "controller": self.cfg.name,
                        "token": format!("{token:x}"),
                        "expires_at_ms": expires_at_ms,
                        "approve": approve,
                    });
                    // Not awaited: the runbook waits for the approval, not for the webhook.
                    tokio::spawn(async move {
                        if let Err(e) = notify.post(&body).await {
                            tracing::warn!("awaiting approval, not notified: {e}");
                        }
                    });
                }
            }
            Action::RefuseApproval { token, why } => tracing::warn!("approval {token:x} refused: {why}"),
        }
        Ok(None)
    }
}

/// The instant `age` ago (now, if the clock has not run that long).
fn ago_instant(age: Duration) -> std::time::Instant {
    let now = std::time::Instant::now();
    now.checked_sub(age).unwrap_or(now)
}

/// What this vantage point and the arbiters saw of the primary, the last lease grant, and the
/// time: the events of one probe interval.
async fn observations(cfg: &ControllerConfig, vantage: &Vantage) -> Vec<Event> {
    // The arbiters first, each within a probe interval; then the time, so that a decision
    // their views trigger is made at the current time, counting every grant made until then;
    // then the last grant, then the views (each as old as its probe).
    let mut views = Vec::new();
    if let Some((age, h)) = vantage.observation() {
        views.push((cfg.name.clone(), ago_instant(age), h.healthy));
    }
    for arbiter in &cfg.arbiters {
        let every = Duration::from_millis(cfg.probe_interval_ms.max(1));
        match tokio::time::timeout(every, failover::observe(arbiter)).await {
            Ok(Ok(Some((age, h)))) => views.push((arbiter.clone(), ago_instant(age), h.healthy)),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::debug!("arbiter {arbiter}: {e}"),
            Err(_) => tracing::debug!("arbiter {arbiter}: no answer within {every:?}"),
        }
    }
    let now = now_ms();
    let ago = |d: Duration| now.saturating_sub(d.as_millis() as u64);
    let mut events = vec![Event::Tick { now_ms: now }];
    if let Some(t) = vantage.last_grant() {
        events.push(Event::LeaseRenewed { at_ms: ago(t.elapsed()) });
    }
    for (name, seen, healthy) in views {
        events.push(Event::Health { vantage: name, healthy, at_ms: ago(seen.elapsed()) });
    }
    events
}

/// Test hooks, from `GEOLOCK_FAILPOINT` (as etcd's gofail failpoints): `die-after-records:N`
/// aborts the process once it has journaled N records beyond `Detected` ones (so that a
/// controller restarted each time dies at every step boundary in turn); `die-in-step:STEP`
/// aborts once STEP's effect is done and before it is journaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failpoint {
    DieAfterRecords(usize),
    DieInStep(Step),
}

impl Failpoint {
    fn from_env() -> Option<Failpoint> {
        let v = std::env::var("GEOLOCK_FAILPOINT").ok()?;
        let (kind, arg) = v.split_once(':')?;
        match kind {
            "die-after-records" => arg.parse().ok().map(Failpoint::DieAfterRecords),
            "die-in-step" => [Step::Fence, Step::Promote, Step::Join, Step::Redirect, Step::Verify, Step::Notify]
                .into_iter()
                .find(|s| format!("{s:?}") == arg)
                .map(Failpoint::DieInStep),
            _ => None,
        }
    }
}

/// The longest a step may run before it counts as failed and is tried again: a member that
/// takes a connection and never answers must not hold the runbook (PROMOTE's own waits come
/// to 43 s at most).
pub(crate) const STEP_DURATION_MAX: Duration = Duration::from_secs(90);

/// The most of a failed step's reason the journal keeps, in bytes: well inside a journal line
/// (`JOURNAL_LINE_BYTES_MAX`).
const FAILED_REASON_BYTES_MAX: usize = 4 * 1024;
const _: () = assert!(FAILED_REASON_BYTES_MAX * 2 < crate::journal::JOURNAL_LINE_BYTES_MAX);

/// Carry out `step` of the failover into `epoch`; the events that report it.
async fn run_step(
    cfg: &ControllerConfig,
    dns: Option<&(Updater, Endpoint, Endpoint)>,
    step: Step,
    epoch: u64,
    target: Option<String>,
    promoted: Option<String>,
) -> Vec<Event> {
    let started = std::time::Instant::now();
    let finishes = !(step == Step::Promote && target.is_none());
    let run = async {
        match (step, target) {
            (Step::Fence, _) => fence(cfg, epoch).await,
            (Step::Promote, None) => choose(cfg, epoch).await,
            (Step::Promote, Some(target)) => promote(&cfg.reach(&target)?, epoch).await,
            (Step::Join, _) => join(cfg, epoch, promoted.as_deref().ok_or("no learner was promoted")?).await,
            (Step::Redirect, _) => redirect(dns).await,
            (Step::Verify, _) => verify(cfg, promoted.as_deref().ok_or("no learner was promoted")?, dns, epoch).await,
            (Step::Notify, _) => notify(cfg, epoch, promoted.as_deref()).await,
        }
    };
    let outcome = tokio::time::timeout(STEP_DURATION_MAX, run)
        .await
        .unwrap_or_else(|_| Err(format!("{step:?} did not finish within {STEP_DURATION_MAX:?}")));
    let at_ms = now_ms();
    match outcome {
        Ok(mut events) => {
            if finishes {
                tracing::info!("{step:?} done in {} ms", started.elapsed().as_millis());
                events.push(Event::Done { step, at_ms });
            }
            events
        }
        Err(mut reason) => {
            tracing::warn!("{step:?} failed after {} ms: {reason}", started.elapsed().as_millis());
            // A hook's whole stderr would not fit a journal line.
            if reason.len() > FAILED_REASON_BYTES_MAX {
                let mut cut = FAILED_REASON_BYTES_MAX;
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                reason.truncate(cut);
                reason.push_str(" [cut]");
            }
            vec![Event::Failed { step, reason, at_ms }]
        }
    }
}

/// FENCE: the hooks, then `fenced(epoch)` on every old member that answers; a majority of them
/// recorded lets PROMOTE go without waiting out the write lease.
async fn fence(cfg: &ControllerConfig, epoch: u64) -> Result<Vec<Event>, String> {
    for hook in &cfg.fence_hooks {
        let Some((program, args)) = hook.split_first() else { continue };
        let out = tokio::process::Command::new(program)
            .args(args)
            .env("GEOLOCK_FAILOVER_EPOCH", epoch.to_string())
            .output()
            .await
            .map_err(|e| format!("fence hook {program}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "fence hook {program} {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let primary = cfg.reach(&cfg.primary)?;
    let members: Vec<crate::Cluster> =
        cfg.primary.split(',').filter(|e| !e.is_empty()).map(|ep| primary.at(ep)).collect();
    let asks = members.iter().map(|m| tokio::time::timeout(Duration::from_secs(3), failover::fence(m, epoch)));
    let fenced: Vec<fpb::FenceResponse> =
        futures::future::join_all(asks).await.into_iter().filter_map(|r| r.ok()?.ok()).collect();
    let old_applied = fenced.iter().map(|f| f.applied_index).max();
    let answers: Vec<(u64, Vec<Vec<u64>>)> = fenced
        .into_iter()
        .map(|f| {
            let id = f.header.map_or(0, |h| h.member_id);
            (id, f.voter_configs.into_iter().map(|v| v.ids).collect())
        })
        .collect();
    let majority = failover::fenced_by_majority(&answers);
    tracing::info!(
        "fenced {} of {} old members{}",
        answers.len(),
        members.len(),
        if majority { ": a majority of the old voters" } else { "" }
    );
    let mut events: Vec<Event> =
        old_applied.map(|index| Event::OldApplied { index, at_ms: now_ms() }).into_iter().collect();
    if majority {
        events.push(Event::FencedByMajority { epoch, at_ms: now_ms() });
    }
    Ok(events)
}

/// Status of each standby member that answers: (endpoint, revision epoch, applied index, is
/// learner).
async fn standby_status(cfg: &ControllerConfig) -> Result<Vec<(String, u64, u64, bool)>, String> {
    let standby = cfg.reach(&cfg.standby)?;
    let mut out = Vec::new();
    for ep in cfg.standby.split(',').filter(|e| !e.is_empty()) {
        if let Some((epoch, applied, learner)) = member_status(&standby.at(ep)).await {
            out.push((ep.to_string(), epoch, applied, learner));
        }
    }
    Ok(out)
}

/// `member` (one endpoint): (revision epoch it is in, applied index, is learner); `None` when
/// it does not answer within 3 s.
async fn member_status(member: &crate::Cluster) -> Option<(u64, u64, bool)> {
    let s = tokio::time::timeout(Duration::from_secs(3), failover::status(member)).await.ok()?.ok()?;
    let rev = s.header.as_ref().map_or(0, |h| h.revision);
    Some((failover::epoch_of(rev), s.raft_applied_index, s.is_learner))
}

/// PROMOTE's choice: the standby learner that applied the most (or one already in `epoch`,
/// should there be one). Reported, and journaled, before any learner is asked to promote.
async fn choose(cfg: &ControllerConfig, epoch: u64) -> Result<Vec<Event>, String> {
    let seen = standby_status(cfg).await?;
    let best = match seen.iter().find(|s| s.1 >= epoch) {
        Some(promoted) => promoted,
        None => seen.iter().filter(|s| s.3).max_by_key(|s| s.2).ok_or("no standby learner answers")?,
    };
    tracing::info!("chose {} (applied index {}) to promote", best.0, best.2);
    Ok(vec![Event::Chose { target: best.0.clone(), at_ms: now_ms() }])
}

/// PROMOTE `target` into `epoch`, unless it already is in it (an earlier run did it); then wait
/// until it serves. Only `target`: while it restarts into the new cluster it answers nobody,
/// and another learner promoted meanwhile would seed a second cluster.
async fn promote(chosen: &crate::Cluster, epoch: u64) -> Result<Vec<Event>, String> {
    let target = &chosen.endpoints;
    let mut events = Vec::new();
    match member_status(chosen).await {
        None => return Err(format!("the chosen learner {target} does not answer")),
        // Promoted by an earlier run, whose answer (where it started) is lost.
        Some((e, _, _)) if e >= epoch => {}
        Some(_) => {
            let r = tokio::time::timeout(Duration::from_secs(10), failover::promote(chosen, epoch))
                .await
                .map_err(|_| format!("promote {target}: no answer within 10 s"))?
                .map_err(|e| format!("promote {target}: {e}"))?;
            tracing::info!(
                "promoted {target} from applied index {} ({} received entries dropped) into cluster {:x}",
                r.applied_index,
                r.dropped_entries,
                r.cluster_id
            );
            events.push(Event::Seeded {
                applied_index: r.applied_index,
                dropped_entries: r.dropped_entries,
                at_ms: now_ms(),
            });
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !member_status(chosen).await.is_some_and(|(e, _, learner)| e >= epoch && !learner) {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{target} does not serve revision epoch {epoch} 30 s after the promotion"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(events)
}

/// How long JOIN waits for the members it added to catch up and become voters before it goes
/// on (they keep catching up after): a snapshot of the whole key space crosses one region.
const JOIN_CATCH_UP_WAIT: Duration = Duration::from_secs(30);
const _: () = assert!(JOIN_CATCH_UP_WAIT.as_secs() * 2 < STEP_DURATION_MAX.as_secs());

/// How long, from JOIN's start, the other standby members have to answer (all of them
/// together: a lost one must not hold the failover for long).
const JOIN_ANSWER_WAIT: Duration = Duration::from_secs(10);
const _: () = assert!(JOIN_ANSWER_WAIT.as_secs() + JOIN_CATCH_UP_WAIT.as_secs() < STEP_DURATION_MAX.as_secs());

/// How many of `joined` members, beside the one voter PROMOTE left, become voters: an even
/// number, so that the new primary has an odd count (as etcd advises: a fourth voter raises
/// the quorum without tolerating another failure, and two voters need both for every commit).
fn voters_to_add(joined: usize) -> usize {
    joined / 2 * 2
}

/// JOIN: every other standby member that answers is wiped and added to the new primary
/// (`promoted`) as a learner; then, within [`JOIN_CATCH_UP_WAIT`], an even number of them
/// ([`voters_to_add`]) are made voters once caught up, the first in the configured order.
/// A member already in the new cluster is not added again; one that does not answer is left,
/// logged, for `lockctl failover rejoin`.
async fn join(cfg: &ControllerConfig, epoch: u64, promoted: &str) -> Result<Vec<Event>, String> {
    use geolock_proto::etcdserverpb as pb;
    let at = cfg.reach(promoted)?;
    let new = failover::NewPrimary::ask(&at).await.map_err(|e| format!("the new primary {promoted}: {e}"))?;
    if new.epoch != epoch {
        return Err(format!("{promoted} is in revision epoch {}, not {epoch}", new.epoch));
    }
    let mut joined = Vec::new();
    let answer_by = tokio::time::Instant::now() + JOIN_ANSWER_WAIT;
    for ep in cfg.standby.split(',').filter(|e| !e.is_empty() && *e != promoted) {
        loop {
            let asked = tokio::time::timeout_at(answer_by, failover::join(&new, ep, false)).await;
            match asked {
                Ok(Ok(name)) => {
                    tracing::info!("{name} ({ep}) wiped and added to the new primary");
                    joined.push(name);
                }
                // A member slow to answer (a loaded machine, a restart) is asked again.
                Ok(Err(crate::ClientError::Connect(_))) if tokio::time::Instant::now() < answer_by => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
                Ok(Err(crate::ClientError::Rpc(s)))
                    if s.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < answer_by =>
                {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
                Ok(Err(e)) => tracing::warn!("standby member {ep} not joined ({e}): lockctl failover rejoin it"),
                Err(_) => tracing::warn!(
                    "standby member {ep} not joined within {JOIN_ANSWER_WAIT:?}: lockctl failover rejoin it"
                ),
            }
            break;
        }
    }
    let voters = &joined[..voters_to_add(joined.len())];
    let deadline = tokio::time::Instant::now() + JOIN_CATCH_UP_WAIT;
    for name in voters {
        loop {
            let members = failover::NewPrimary::ask(&at).await.map_err(|e| e.to_string())?.members;
            let Some(m) = members.iter().find(|m| &m.name == name) else {
                return Err(format!("{name} is not a member of the new primary"));
            };
            if !m.is_learner {
                break;
            }
            let ch = crate::connect_to(&at).await.map_err(|e| e.to_string())?;
            let mut cluster = pb::cluster_client::ClusterClient::new(ch);
            match cluster.member_promote(pb::MemberPromoteRequest { id: m.id }).await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    tracing::warn!("{name} not made a voter within {JOIN_CATCH_UP_WAIT:?}, going on: {}", e.message());
                    return Ok(vec![]);
                }
                // Not yet in sync, or the previous promotion still under way.
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    tracing::info!("joined the new primary: {voters:?} as voters, {:?} as learners", &joined[voters.len()..]);
    Ok(vec![])
}

/// REDIRECT: the DNS compare-and-swap (a no-op when it already happened).
async fn redirect(dns: Option<&(Updater, Endpoint, Endpoint)>) -> Result<Vec<Event>, String> {
    let Some((updater, from, to)) = dns else {
        tracing::warn!("no DNS configured: clients are not redirected");
        return Ok(vec![]);
    };
    let done = updater.swap(from, to).await.map_err(|e| e.to_string())?;
    tracing::info!("DNS: {done:?}");
    Ok(vec![])
}

/// VERIFY: the name resolves to the standby's records; through the members its SRV records
/// lead to (or `promoted` without DNS), a probe write lands in the new epoch and reads back,
/// and a probe lock is granted and released; no member of the old primary takes a write.
async fn verify(
    cfg: &ControllerConfig,
    promoted: &str,
    dns: Option<&(Updater, Endpoint, Endpoint)>,
    epoch: u64,
) -> Result<Vec<Event>, String> {
    use geolock_proto::etcdserverpb as pb;
    let through = match dns {
        Some((updater, _, to)) => {
            let found = updater.read().await.map_err(|e| e.to_string())?;
            if found != *to {
                return Err(format!("the client name resolves to {found}, not {to}"));
            }
            let members = updater.members().await.map_err(|e| e.to_string())?;
            if members.is_empty() {
                return Err(format!("the client name's SRV records ({to}) lead to no address"));
            }
            members.iter().map(std::net::SocketAddr::to_string).collect::<Vec<_>>().join(",")
        }
        None => promoted.to_string(),
    };
    let cluster = cfg.reach(&through)?;
    let ch = crate::connect_to(&cluster).await.map_err(|e| e.to_string())?;
    let mut kv = pb::kv_client::KvClient::new(ch);
    let (key, value) = (b"geolock/failover/verify".to_vec(), epoch.to_string().into_bytes());
    let put = pb::PutRequest { key: key.clone(), value: value.clone(), ..Default::default() };
    let rev = kv.put(put).await.map_err(|e| format!("probe write: {e}"))?.into_inner().header.map_or(0, |h| h.revision);
    if failover::epoch_of(rev) != epoch {
        return Err(format!("probe write at revision {rev}, outside revision epoch {epoch}"));
    }
    let got = kv.range(pb::RangeRequest { key, ..Default::default() }).await.map_err(|e| format!("probe read: {e}"))?;
    if got.into_inner().kvs.first().map(|kv| &kv.value) != Some(&value) {
        return Err("the probe write does not read back".into());
    }
    let mut session = crate::Session::grant(&cluster, 10).await.map_err(|e| e.to_string())?;
    let held =
        crate::acquire(&cluster, "geolock/failover/verify-lock", &mut session).await.map_err(|e| e.to_string())?;
    crate::unlock(&cluster, &held.key).await.map_err(|e| e.to_string())?;
    session.revoke(&cluster).await;
    let old = old_primary_takes_no_write(cfg, epoch).await?;
    tracing::info!(
        "verified through {through}: probe write at revision {rev:#x}, probe lock token {:#x}; {old}",
        held.token
    );
    Ok(vec![])
}

/// How long VERIFY waits for each old member's answer to its probe write.
const OLD_PROBE_WAIT: Duration = Duration::from_secs(2);

/// A probe write to each of the old primary's members, at once: an error if any acknowledges
/// it (the fence failed), else how they refused.
async fn old_primary_takes_no_write(cfg: &ControllerConfig, epoch: u64) -> Result<String, String> {
    use geolock_proto::etcdserverpb as pb;
    let primary = cfg.reach(&cfg.primary)?;
    let members: Vec<&str> = cfg.primary.split(',').filter(|e| !e.is_empty()).collect();
    let primary = &primary;
    let probes = members.iter().map(|ep| async move {
        let probe = async {
            let ch = crate::connect_to(&primary.at(ep)).await.map_err(|e| e.to_string())?;
            let put = pb::PutRequest {
                key: b"geolock/failover/verify-old-primary".to_vec(),
                value: epoch.to_string().into_bytes(),
                ..Default::default()
            };
            pb::kv_client::KvClient::new(ch).put(put).await.map_err(|e| e.message().to_string())
        };
        (ep, tokio::time::timeout(OLD_PROBE_WAIT, probe).await)
    });
    for (ep, outcome) in futures::future::join_all(probes).await {
        if let Ok(Ok(acked)) = outcome {
            let rev = acked.into_inner().header.map_or(0, |h| h.revision);
            return Err(format!(
                "the old primary's member {ep} acknowledged a write at revision {rev} after the failover"
            ));
        }
    }
    Ok(format!("none of the old primary's {} members took a probe write", members.len()))
}

/// NOTIFY: the journal's timeline, and each step's duration, in the log and to the webhook. A
/// webhook that fails every attempt is logged, and the step finishes all the same.
async fn notify(cfg: &ControllerConfig, epoch: u64, promoted: Option<&str>) -> Result<Vec<Event>, String> {
    let records = Journal::read(&cfg.journal).map_err(|e| e.to_string())?;
    let timeline = failover::timeline(&records);
    tracing::info!("failed over into revision epoch {epoch}; the timeline:\n{}", timeline.join("\n"));
    tracing::info!("{}", failover::describe_lost_window(failover::lost_window(&records)));
    let Some(webhook) = &cfg.notify else { return Ok(vec![]) };
    let steps: Vec<serde_json::Value> = failover::step_durations(&records)
        .into_iter()
        .map(|(step, ms)| serde_json::json!({ "step": format!("{step:?}"), "ms": ms }))
        .collect();
    let body = serde_json::json!({
        "event": "failed_over",
        "controller": cfg.name,
        "epoch": epoch,
        "promoted": promoted,
        "lost_window": failover::lost_window(&records),
        "steps": steps,
        "timeline": timeline,
    });
    match webhook.post(&body).await {
        Ok(attempts) => tracing::info!("webhook notified in {attempts} attempt(s)"),
        Err(e) => tracing::warn!("not notified, going on: {e}"),
    }
    Ok(vec![])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(arbiters: &[&str]) -> ControllerConfig {
        let yaml = format!(
            "{{\"name\": \"standby\", \"listen\": \"127.0.0.1:1\", \"journal\": \"j\", \"primary\": \"a\", \"standby\": \"b\", \"arbiters\": {arbiters:?}}}"
        );
        serde_json::from_str(&yaml).unwrap()
    }

    #[test]
    fn join_leaves_the_new_primary_an_odd_number_of_voters() {
        for (joined, added) in [(0, 0), (1, 0), (2, 2), (3, 2), (4, 4)] {
            assert_eq!(voters_to_add(joined), added, "{joined} joined");
            assert_eq!((1 + voters_to_add(joined)) % 2, 1);
        }
    }

    #[test]
    fn only_a_controller_and_one_arbiter_make_the_lease_the_controller_can_end_alone() {
        assert!(config(&["arb:1"]).settings().is_ok());
        for arbiters in [&[][..], &["a:1", "b:1"][..]] {
            let e = config(arbiters).settings().unwrap_err().to_string();
            assert!(e.contains("arbiters: exactly one is supported"), "{e}");
        }
    }
}
