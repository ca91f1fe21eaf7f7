//! Replication with openraft: the type configuration, the RocksDB log store, the state machine
//! adapter, and [`Node`], the handle the client API drives. The only module that imports
//! openraft, so a version bump touches nothing else.

mod lag;
mod log_store;
mod membership;
mod network;
mod quorum;
mod state_machine;
mod witness;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use openraft::async_runtime::watch::WatchReceiver;
use openraft::errors::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::{Config as RaftConfig, ReadPolicy, ServerState, SnapshotPolicy, StepDownPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};

pub use lag::{Lag, LagClock};
pub use log_store::LogStore;
pub use membership::{MemberChange, MemberError};
pub use state_machine::{LockWake, Shared, SmState, StateMachine};

use crate::config::{Config, Role};
use crate::transport::Transport;
use network::{Kind, Peers, RemoteError, SnapshotInbox};
use quorum::{Leadership, QuorumView};
use geolock_core::lease::{LeaseError, TtlBounds};
use geolock_core::limits::{LEASE_EXPIRIES_PER_PROPOSAL_MAX, PROPOSALS_IN_FLIGHT_MAX};
use geolock_core::machine::{ApplyError, Applied, Command, Machine};
use geolock_core::member::member_id;
use geolock_core::storage::Engine;

use crate::rocks::{Footprint, RocksEngine};
use geolock_core::watch::{Reply, StreamId, WatchSpec};

/// A member as Raft carries it in the membership: enough to reach it and show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// `host:port` of its peer (QUIC) endpoint.
    pub peer_addr: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub role: Role,
    pub region: String,
}

openraft::declare_raft_types!(
    /// geolock's openraft types: classic Raft (one leader per term), our commands and members.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = Member,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);

type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// Milliseconds on this process's monotonic clock: lease deadlines live on it.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Why a request could not be served by this node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("etcdserver: not leader")]
    NotLeader { leader: Option<u64> },
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: server stopped")]
    Stopped,
    #[error("etcdserver: request timed out")]
    Timeout,
    /// The proposal's entry was discarded when another leader took over: it may or may not
    /// commit. Not tried again on the caller's behalf (it is not known to be safe to repeat);
    /// etcd reports this as "leader changed", which its clients take as unknown outcome.
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    #[error("etcdserver: too many requests (proposals_in_flight_max {max})")]
    TooManyProposals { max: usize },
    #[error("geolock: this member is a {role}: it holds no key space and does not serve {what}; use a voter or learner endpoint")]
    Role { role: Role, what: &'static str },
    #[error("etcdserver: leader unreachable: {0}")]
    Peer(String),
    #[error(transparent)]
    Member(#[from] MemberError),
    #[error("geolock: storage: {0}")]
    Storage(String),
    #[error("geolock: {0}")]
    Internal(String),
}

impl NodeError {
    /// Whether the same request may succeed later on this member without anything changing on
    /// the caller's side: the cluster had no leader, or this member could not reach it in time.
    pub fn is_transient(&self) -> bool {
        matches!(self, NodeError::NotLeader { .. } | NodeError::NoLeader | NodeError::Timeout | NodeError::Peer(_))
    }
}

/// What every response header carries besides the revision.
#[derive(Clone, Copy, Debug)]
pub struct HeaderInfo {
    pub cluster_id: u64,
    pub member_id: u64,
    pub raft_term: u64,
}

/// Maintenance.Status figures.
#[derive(Clone, Debug)]
pub struct NodeStatus {
    pub revision: i64,
    pub db_size_bytes: u64,
    pub leader: u64,
    pub raft_index: u64,
    pub raft_term: u64,
    pub applied_index: u64,
    pub is_learner: bool,
    pub role: Role,
}

/// A member as Cluster.MemberList shows it.
#[derive(Clone, Debug)]
pub struct MemberInfo {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
    pub role: Role,
    pub region: String,
}

/// LeaseTimeToLive figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub remaining_s: i64,
    pub granted_s: i64,
    pub keys: Vec<Vec<u8>>,
}

/// How long a client write may wait for its entry to be applied.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running member.
pub struct Node {
    raft: Raft,
    shared: Arc<Shared>,
    id: u64,
    /// The role this member was started in (DESIGN.md "Roles").
    role: Role,
    /// While leading: when the log reached which index, for members' lag in time.
    lag: std::sync::Mutex<LagClock>,
    /// When ([`now_ms`]) an AppendEntries or heartbeat last arrived from a leader that held a
    /// quorum when it sent it.
    leader_contact_ms: std::sync::atomic::AtomicU64,
    /// Whether this member leads with a quorum's acknowledgement (CheckQuorum).
    quorum: Arc<QuorumView>,
    cluster_id: u64,
    ttl_bounds: TtlBounds,
    quota_bytes: u64,
    election_timeout: Duration,
    proposals: Semaphore,
    next_stream: std::sync::atomic::AtomicU64,
    next_waiter: std::sync::atomic::AtomicU64,
    peers: Arc<Peers>,
    transport: Option<Arc<Transport>>,
    snapshot_inbox: SnapshotInbox,
    /// Whether this member's own addresses are in the membership.
    published: tokio::sync::watch::Sender<bool>,
}

impl From<&NodeError> for RemoteError {
    fn from(e: &NodeError) -> Self {
        match e {
            NodeError::NotLeader { .. } => RemoteError::NotLeader,
            NodeError::NoLeader => RemoteError::NoLeader,
            NodeError::Timeout => RemoteError::Timeout,
            NodeError::Stopped => RemoteError::Stopped,
            NodeError::LeaderChanged => RemoteError::LeaderChanged,
            other => RemoteError::Other(other.to_string()),
        }
    }
}

impl From<RemoteError> for NodeError {
    fn from(e: RemoteError) -> Self {
        match e {
            RemoteError::NotLeader => NodeError::NotLeader { leader: None },
            RemoteError::NoLeader => NodeError::NoLeader,
            RemoteError::Timeout => NodeError::Timeout,
            RemoteError::Stopped => NodeError::Stopped,
            RemoteError::LeaderChanged => NodeError::LeaderChanged,
            RemoteError::Other(m) => NodeError::Internal(m),
        }
    }
}

impl Node {
    /// Open storage, start Raft, and (on first start of a new cluster) initialise membership.
    pub async fn start(cfg: &Config) -> Result<Arc<Node>, NodeError> {
        let dir = cfg.data_dir();
        std::fs::create_dir_all(&dir).map_err(|e| NodeError::Storage(format!("{}: {e}", dir.display())))?;
        let witness = cfg.role == Role::Witness;
        let footprint = if witness { Footprint::LogTail } else { Footprint::Data };
        let engine: Arc<dyn Engine> =
            RocksEngine::open_sized(&dir.join("db"), footprint).map_err(|e| NodeError::Storage(e.to_string()))?;
        let shared =
            Shared::open(engine.clone(), dir.join("snapshots"), witness).map_err(|e| NodeError::Storage(e.to_string()))?;
        let id = member_id(&cfg.name);
        let members = cfg.initial_members().map_err(|e| NodeError::Internal(e.to_string()))?;
        // From the cluster's name alone, so that a member added later computes the same ID.
        let cluster_id = member_id(&format!("cluster/{}", cfg.cluster.name));
        let et_ms = cfg.raft.election_timeout.as_millis() as u64;
        let hb_ms = cfg.raft.heartbeat_interval.as_millis() as u64;
        // A follower of openraft campaigns only after the leader's lease (election_timeout_max)
        // plus a random timeout in [min, max) have passed without a heartbeat. Halving and
        // quartering etcd's setting keeps that whole wait within one election timeout, where
        // etcd waits between one and two.
        let (et_max_ms, et_min_ms) = (et_ms / 2, (et_ms / 4).max(hb_ms * 2).min(et_ms / 2 - 1));
        let mut raft_cfg = RaftConfig {
            cluster_name: cfg.cluster.name.clone(),
            heartbeat_interval: cfg.raft.heartbeat_interval.as_millis() as u64,
            election_timeout_min: et_min_ms,
            election_timeout_max: et_max_ms,
            enable_pre_vote: Some(true),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.raft.snapshot_count),
            max_in_snapshot_log_to_keep: 1_000,
            purge_batch_size: 256,
            // A leader removes itself only after handing over (see `membership`), so openraft
            // never has to choose a successor, which could be a witness.
            removed_leader_step_down: StepDownPolicy::Never,
            // Our state machine writes are not synced; a restarted leader must win an election
            // (and so re-commit its log) before it serves.
            enable_leader_restore: Some(false),
            install_snapshot_timeout: 60_000,
            ..Default::default()
        };
        if witness {
            // It never campaigns on its own timeout (its supervisor decides), never snapshots on
            // its own, and purges only up to what the leader says every data voter holds.
            raft_cfg.enable_elect = false;
            raft_cfg.snapshot_policy = SnapshotPolicy::Never;
            raft_cfg.max_in_snapshot_log_to_keep = u64::MAX;
        }
        let raft_cfg = raft_cfg.validate().map_err(|e| NodeError::Internal(format!("raft config: {e}")))?;
        let tls = cfg.peer_tls().map_err(|e| NodeError::Internal(e.to_string()))?;
        if members.len() > 1 && tls.is_none() {
            return Err(NodeError::Internal(format!(
                "a cluster of {} members needs peer TLS: set --peer-trusted-ca-file, --peer-cert-file and --peer-key-file",
                members.len()
            )));
        }
        let transport = match tls {
            Some(tls) => {
                let listen = cfg
                    .listen_peer_urls
                    .split(',')
                    .next()
                    .map(crate::config::host_port)
                    .transpose()
                    .map_err(|e| NodeError::Internal(e.to_string()))?
                    .ok_or_else(|| NodeError::Internal("no listen_peer_urls".into()))?;
                let addr = tokio::net::lookup_host(&listen)
                    .await
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| NodeError::Internal(format!("cannot resolve peer address {listen}")))?;
                Some(Arc::new(Transport::bind(addr, &tls).map_err(|e| NodeError::Internal(e.to_string()))?))
            }
            None => None,
        };
        let peers = Peers::new(transport.clone());
        // openraft's leader lease is election_timeout_max: a quorum's acknowledgement counts for
        // as long as openraft itself lets the leader propose on it.
        let quorum = Arc::new(QuorumView::new(id, Duration::from_millis(raft_cfg.election_timeout_max)));
        let raft = Raft::new(
            id,
            Arc::new(raft_cfg),
            network::Network { peers: peers.clone(), role: cfg.role, quorum: quorum.clone() },
            LogStore::new(engine),
            StateMachine { shared: shared.clone() },
        )
        .await
        .map_err(|e| NodeError::Internal(format!("raft: {e}")))?;
        quorum.attach(raft.clone());

        let fresh = !raft.is_initialized().await.map_err(|e| NodeError::Internal(e.to_string()))?;
        if fresh && cfg.initial_cluster_state() == "new" {
            if cfg.role == Role::Learner {
                // Founders are voters: a learner listed among them would vote.
                return Err(NodeError::Internal(format!(
                    "a learner joins a running cluster: add it with `lockctl member add {} --learner --peer-urls URL` \
                     and start it with --initial-cluster-state existing",
                    cfg.name
                )));
            }
            // Every founder must propose the very same membership: each writes it as log entry 0
            // of its own log, and Raft takes entries with equal IDs to be equal. So it holds only
            // what the initial cluster says of everyone; each member then publishes the rest.
            let mut nodes = BTreeMap::new();
            for m in &members {
                nodes.insert(
                    member_id(&m.name),
                    Member {
                        name: m.name.clone(),
                        peer_addr: m.peer_addr.clone(),
                        peer_urls: vec![format!("http://{}", m.peer_addr)],
                        ..Default::default()
                    },
                );
            }
            if !nodes.contains_key(&id) {
                return Err(NodeError::Internal(format!("{} is not in the initial cluster", cfg.name)));
            }
            if let Err(e) = raft.initialize(nodes).await {
                tracing::info!("initialize: {e}");
            }
        }
        let node = Arc::new(Node {
            raft,
            shared,
            id,
            role: cfg.role,
            lag: std::sync::Mutex::new(LagClock::default()),
            leader_contact_ms: std::sync::atomic::AtomicU64::new(0),
            quorum,
            cluster_id,
            ttl_bounds: cfg.ttl_bounds(),
            quota_bytes: cfg.quota_bytes(),
            election_timeout: cfg.raft.election_timeout,
            proposals: Semaphore::new(PROPOSALS_IN_FLIGHT_MAX),
            next_stream: std::sync::atomic::AtomicU64::new(1),
            next_waiter: std::sync::atomic::AtomicU64::new(1),
            peers,
            transport: transport.clone(),
            snapshot_inbox: SnapshotInbox::default(),
            published: tokio::sync::watch::Sender::new(false),
        });
        if let Some(t) = transport {
            let founders: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
            tokio::spawn(serve_peers(Arc::downgrade(&node), t, founders));
        }
        tokio::spawn(leadership_loop(Arc::downgrade(&node)));
        tokio::spawn(witness::tell_witnesses(Arc::downgrade(&node)));
        if witness {
            tokio::spawn(witness::supervise(Arc::downgrade(&node), cfg.raft.election_timeout));
        }
        tokio::spawn(snapshot_loop(Arc::downgrade(&node)));
        let me = Member {
            name: cfg.name.clone(),
            peer_addr: cfg.peer_addr().map_err(|e| NodeError::Internal(e.to_string()))?,
            peer_urls: cfg.peer_urls(),
            client_urls: cfg.client_urls(),
            role: cfg.role,
            region: cfg.region.clone(),
        };
        tokio::spawn(Node::publish_self(Arc::downgrade(&node), me));
        tokio::spawn(progress_notify_loop(Arc::downgrade(&node), cfg.watch.progress_notify_interval));
        Ok(node)
    }

    /// Stop Raft and the peer transport. A leader first hands leadership to the voter that has
    /// replicated the most of its log, so the cluster does not wait out an election timeout.
    pub async fn shutdown(self: Arc<Self>) {
        self.hand_over_leadership().await;
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
        if let Some(t) = &self.transport {
            t.close();
        }
    }

    async fn hand_over_leadership(&self) {
        if !self.is_leader() {
            return;
        }
        // Never a witness: it would only hand leadership on again.
        let (data_voters, _) = self.voters_by_kind();
        let target = {
            let replication = self.raft.metrics().borrow_watched().replication.clone().unwrap_or_default();
            data_voters
                .into_iter()
                .filter(|v| *v != self.id)
                .max_by_key(|v| replication.get(v).cloned().flatten().map(|l| l.index))
        };
        let Some(to) = target else { return };
        match self.transfer_leadership(to).await {
            Ok(_) => tracing::info!("handed leadership to {to:x}"),
            Err(e) => tracing::warn!("leadership hand-over to {to:x} did not complete: {e}"),
        }
    }

    /// Header fields of this member.
    pub fn header(&self) -> HeaderInfo {
        let m = self.raft.metrics();
        let term = m.borrow_watched().current_term;
        HeaderInfo { cluster_id: self.cluster_id, member_id: self.id, raft_term: term }
    }

    /// The latest applied revision.
    pub fn current_rev(&self) -> i64 {
        self.shared.lock().machine.kv.current_rev()
    }

    /// Lease TTL bounds.
    pub fn ttl_bounds(&self) -> TtlBounds {
        self.ttl_bounds
    }

    /// This member's space quota in bytes ([`crate::config::Config::quota_bytes`]).
    pub fn quota_bytes(&self) -> u64 {
        self.quota_bytes
    }

    /// A fresh lease ID, positive, not in use now.
    pub fn new_lease_id(&self) -> i64 {
        loop {
            let id = rand::random::<i64>() & i64::MAX;
            if id != 0 && !self.shared.lock().machine.leases.contains(id) {
                return id;
            }
        }
    }

    /// Run `f` on the state as applied so far.
    pub fn read<R>(&self, f: impl FnOnce(&Machine) -> R) -> R {
        f(&self.shared.lock().machine)
    }

    /// Propose a command and wait until it is applied here: on the leader directly, on a
    /// follower through the leader, then until this node has applied it too (so a read here
    /// after the write sees it).
    pub async fn propose(&self, cmd: Command) -> Result<Applied, NodeError> {
        let _permit = self
            .proposals
            .try_acquire()
            .map_err(|_| NodeError::TooManyProposals { max: PROPOSALS_IN_FLIGHT_MAX })?;
        self.with_leader(|| self.propose_once(cmd.clone())).await
    }

    /// Run `attempt` until it is not refused for want of a leader: during an election a request
    /// waits for the outcome, as etcd's do, rather than failing at once. Only refusals are tried
    /// again: a request refused as "not leader" or "no leader" was never proposed, so it cannot
    /// take effect twice.
    pub(super) async fn with_leader<T, F: std::future::Future<Output = Result<T, NodeError>>>(
        &self,
        attempt: impl FnMut() -> F,
    ) -> Result<T, NodeError> {
        self.retry_until_led(attempt, |e| matches!(e, NodeError::NotLeader { .. } | NodeError::NoLeader)).await
    }

    /// As [`Node::with_leader`], for a request that may run twice (a read index, a keep-alive, a
    /// time-to-live): also tried again when the leader could not be reached or did not answer in
    /// time, which is how a leader change looks from a member that was talking to the old one.
    /// etcd's server retries its lease renewals to the leader the same way.
    async fn with_leader_idempotent<T, F: std::future::Future<Output = Result<T, NodeError>>>(
        &self,
        attempt: impl FnMut() -> F,
    ) -> Result<T, NodeError> {
        self.retry_until_led(attempt, NodeError::is_transient).await
    }

    async fn retry_until_led<T, F: std::future::Future<Output = Result<T, NodeError>>>(
        &self,
        mut attempt: impl FnMut() -> F,
        retry: impl Fn(&NodeError) -> bool,
    ) -> Result<T, NodeError> {
        let deadline = tokio::time::Instant::now() + self.election_timeout * 3;
        loop {
            match attempt().await {
                Err(e) if retry(&e) && tokio::time::Instant::now() < deadline => {
                    tracing::debug!("waiting for a leader: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    async fn propose_once(&self, cmd: Command) -> Result<Applied, NodeError> {
        match self.leader()? {
            None => Ok(self.propose_here(cmd).await?.0),
            Some((leader, member)) => {
                let call = self.peers.call::<_, Result<(Applied, u64), RemoteError>>(leader, &member, Kind::ForwardWrite, &cmd);
                let (applied, index) = match tokio::time::timeout(PROPOSE_TIMEOUT, call).await {
                    Err(_) => return Err(NodeError::Timeout),
                    Ok(Err(e)) => return Err(NodeError::Peer(e.to_string())),
                    Ok(Ok(r)) => r?,
                };
                self.wait_applied(index).await?;
                Ok(applied)
            }
        }
    }

    /// The leader, if it is another member (`None` if this node leads).
    fn leader(&self) -> Result<Option<(u64, Member)>, NodeError> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        match self.live_leader(&m) {
            None => Err(NodeError::NoLeader),
            Some(l) if l == self.id => Ok(None),
            Some(l) => match m.membership_config.membership().get_node(&l) {
                Some(member) => Ok(Some((l, member.clone()))),
                None => Err(NodeError::NoLeader),
            },
        }
    }

    /// The leader as this member knows it now: itself if it leads with a quorum (see
    /// [`quorum`]), another member only if that one's AppendEntries or heartbeats, sent while it
    /// held a quorum, arrived within an election timeout. openraft keeps a dead or cut-off
    /// leader as the current one until a new one is elected (which may take a witness's help);
    /// etcd's members, like this, report no leader once they stop hearing from a live one.
    fn live_leader(&self, m: &openraft::RaftMetrics<TypeConfig>) -> Option<u64> {
        match m.current_leader {
            Some(l) if l == self.id => (self.quorum.of(m) == Leadership::Leads).then_some(l),
            Some(l) => {
                let heard = self.leader_contact_ms.load(std::sync::atomic::Ordering::Relaxed);
                (now_ms().saturating_sub(heard) <= self.election_timeout.as_millis() as u64).then_some(l)
            }
            None => None,
        }
    }

    /// Note that the leader was just heard from.
    fn leader_heard(&self) {
        self.leader_contact_ms.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Propose on this node, which must lead. Returns the result and the entry's log index.
    async fn propose_here(&self, cmd: Command) -> Result<(Applied, u64), NodeError> {
        self.serves_clients_as_leader()?;
        match tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.client_write(cmd)).await {
            Err(_) => Err(NodeError::Timeout),
            Ok(Ok(resp)) => Ok((resp.data, resp.log_id.index)),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => match f.leader_id {
                Some(l) => Err(NodeError::NotLeader { leader: Some(l) }),
                None => Err(NodeError::NoLeader),
            },
            Ok(Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)))) => Err(NodeError::LeaderChanged),
            Ok(Err(RaftError::APIError(e))) => Err(NodeError::Internal(e.to_string())),
            Ok(Err(RaftError::Fatal(_))) => Err(NodeError::Stopped),
        }
    }

    /// Wait until this node has applied log index `index`.
    async fn wait_applied(&self, index: u64) -> Result<(), NodeError> {
        self.raft
            .wait(Some(PROPOSE_TIMEOUT))
            .applied_index_at_least(Some(index), "forwarded request")
            .await
            .map(|_| ())
            .map_err(|_| NodeError::Timeout)
    }

    /// Wait until this node has applied everything committed when the call began, confirmed by
    /// a quorum (a read index, asked of the leader when this node follows): reads after this are
    /// linearizable.
    pub async fn linearize(&self) -> Result<(), NodeError> {
        self.with_leader_idempotent(|| self.linearize_once()).await
    }

    async fn linearize_once(&self) -> Result<(), NodeError> {
        match self.leader()? {
            None => self.read_index_here().await.map(|_| ()),
            Some((leader, member)) => {
                let call = self.peers.call::<_, Result<u64, RemoteError>>(leader, &member, Kind::ReadIndex, &());
                let index = match tokio::time::timeout(self.election_timeout, call).await {
                    Err(_) => return Err(NodeError::Timeout),
                    Ok(Err(e)) => return Err(NodeError::Peer(e.to_string())),
                    Ok(Ok(r)) => r?,
                };
                self.wait_applied(index).await
            }
        }
    }

    /// The read index on this node, which must lead; waits until it is applied here.
    async fn read_index_here(&self) -> Result<u64, NodeError> {
        self.serves_clients_as_leader()?;
        match tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.ensure_linearizable(ReadPolicy::ReadIndex)).await {
            Err(_) => Err(NodeError::Timeout),
            Ok(Ok(read)) => Ok(read.index()),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => match f.leader_id {
                Some(l) => Err(NodeError::NotLeader { leader: Some(l) }),
                None => Err(NodeError::NoLeader),
            },
            Ok(Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(_)))) => Err(NodeError::NoLeader),
            Ok(Err(RaftError::Fatal(_))) => Err(NodeError::Stopped),
        }
    }

    /// A witness that leads does so only to hand over: it answers no client request, and the
    /// member that forwarded one tries again once a data voter leads.
    fn serves_clients_as_leader(&self) -> Result<(), NodeError> {
        match self.role {
            Role::Witness => Err(NodeError::NotLeader { leader: None }),
            Role::Voter | Role::Learner => Ok(()),
        }
    }

    /// The role this member was started in.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The membership's record of member `id`.
    fn member_record(&self, id: u64) -> Option<Member> {
        self.raft.metrics().borrow_watched().membership_config.membership().get_node(&id).cloned()
    }

    /// Every member's replication lag: computed here on the leader, asked of it elsewhere
    /// (empty when it cannot be reached).
    pub async fn lags(&self) -> BTreeMap<u64, Lag> {
        match self.leader() {
            Ok(None) => self.lags_here(),
            Ok(Some((leader, member))) => {
                let call = self.peers.call::<_, BTreeMap<u64, Lag>>(leader, &member, Kind::Lag, &());
                match tokio::time::timeout(self.election_timeout, call).await {
                    Ok(Ok(lags)) => lags,
                    _ => BTreeMap::new(),
                }
            }
            Err(_) => BTreeMap::new(),
        }
    }

    fn lags_here(&self) -> BTreeMap<u64, Lag> {
        if !self.quorum.leads() {
            return BTreeMap::new();
        }
        let (replication, last) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            (m.replication.clone().unwrap_or_default(), m.last_log_index.unwrap_or(0))
        };
        let clock = self.lag.lock().unwrap();
        let now = now_ms();
        replication
            .into_iter()
            .map(|(id, matched)| {
                let lag = if id == self.id { Lag::default() } else { clock.lag(matched.map_or(0, |l| l.index), last, now) };
                (id, lag)
            })
            .collect()
    }

    /// Whether openraft has this member as leader. Raft's own operations (membership changes,
    /// hand-overs, the witness's purge point) go by this, and openraft gates them; answers given
    /// outside the log go by [`QuorumView::leads`] instead.
    fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    /// A keep-alive: the leader restarts the lease's TTL (asked of it when this node follows).
    pub async fn lease_keep_alive(&self, id: i64) -> Result<i64, NodeError> {
        self.with_leader_idempotent(|| async {
            match self.leader()? {
                None => self.lease_keep_alive_here(id),
                Some((leader, member)) => self.ask_leader::<_, i64>(leader, &member, Kind::LeaseKeepAlive, &id).await,
            }
        })
        .await
    }

    fn lease_keep_alive_here(&self, id: i64) -> Result<i64, NodeError> {
        self.serves_clients_as_leader()?;
        if !self.quorum.leads() {
            return Err(self.not_leader());
        }
        let ttl = self.shared.lock().machine.leases.renew(id, now_ms()).map_err(ApplyError::from)?;
        Ok(ttl)
    }

    /// A lease request only the leader can answer, asked of it; lease errors come back as such.
    /// An election timeout bounds the wait: a leader that does not answer within it has most
    /// likely been replaced, and the caller asks again.
    async fn ask_leader<Req: Serialize, Rep: serde::de::DeserializeOwned>(
        &self,
        leader: u64,
        member: &Member,
        kind: Kind,
        req: &Req,
    ) -> Result<Rep, NodeError> {
        let call = self.peers.call::<_, Result<Result<Rep, LeaseError>, RemoteError>>(leader, member, kind, req);
        match tokio::time::timeout(self.election_timeout, call).await {
            Err(_) => Err(NodeError::Timeout),
            Ok(Err(e)) => Err(NodeError::Peer(e.to_string())),
            Ok(Ok(Err(remote))) => Err(remote.into()),
            Ok(Ok(Ok(Err(lease)))) => Err(ApplyError::Lease(lease).into()),
            Ok(Ok(Ok(Ok(rep)))) => Ok(rep),
        }
    }

    /// TTL left and keys of a lease, as the leader sees it (asked of it when this node follows).
    pub async fn lease_time_to_live(&self, id: i64, keys: bool) -> Result<LeaseInfo, NodeError> {
        self.with_leader_idempotent(|| async {
            match self.leader()? {
                None => self.lease_time_to_live_here(id, keys),
                Some((leader, member)) => self.ask_leader(leader, &member, Kind::LeaseTimeToLive, &(id, keys)).await,
            }
        })
        .await
    }

    fn lease_time_to_live_here(&self, id: i64, keys: bool) -> Result<LeaseInfo, NodeError> {
        self.serves_clients_as_leader()?;
        if !self.quorum.leads() {
            return Err(self.not_leader());
        }
        let st = self.shared.lock();
        let leases = &st.machine.leases;
        let lease = leases.get(id).ok_or(ApplyError::Lease(LeaseError::NotFound { lease: id }))?;
        Ok(LeaseInfo {
            remaining_s: leases.remaining_s(id, now_ms()).map_err(ApplyError::from)?,
            granted_s: lease.ttl_s,
            keys: if keys {
                lease.keys.iter().take(geolock_core::limits::LEASE_KEYS_LISTED_MAX).cloned().collect()
            } else {
                Vec::new()
            },
        })
    }

    fn not_leader(&self) -> NodeError {
        match self.live_leader(&self.raft.metrics().borrow_watched()) {
            Some(l) => NodeError::NotLeader { leader: Some(l) },
            None => NodeError::NoLeader,
        }
    }

    /// Maintenance.Status figures.
    pub fn status(&self) -> NodeStatus {
        let (revision, applied) = {
            let st = self.shared.lock();
            (st.machine.kv.current_rev(), st.last_applied.map_or(0, |l| l.index))
        };
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        NodeStatus {
            revision,
            db_size_bytes: self.shared.db_size_bytes(),
            leader: self.live_leader(&m).unwrap_or(0),
            raft_index: m.last_log_index.unwrap_or(0),
            raft_term: m.current_term,
            applied_index: applied,
            is_learner: m.state == ServerState::Learner,
            role: self.role,
        }
    }

    /// Every member, voters first.
    pub fn members(&self) -> Vec<MemberInfo> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| MemberInfo {
                id: *id,
                name: node.name.clone(),
                peer_urls: node.peer_urls.clone(),
                client_urls: node.client_urls.clone(),
                is_learner: !voters.contains(id),
                role: node.role,
                region: node.region.clone(),
            })
            .collect()
    }

    /// Register a watch stream whose replies go to `tx`.
    pub fn watch_open(&self, tx: mpsc::Sender<Reply>) -> StreamId {
        let id = self.next_stream.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.shared.lock().streams.insert(id, tx);
        id
    }

    /// Create a watcher and start catching it up.
    pub fn watch_create(&self, stream: StreamId, spec: WatchSpec) {
        let mut st = self.shared.lock();
        let st = &mut *st;
        let created = st.hub.create(stream, spec, &st.machine.kv);
        st.deliver(vec![created]);
        let out = st.hub.catch_up(stream, &st.machine.kv);
        st.deliver(out);
    }

    /// Cancel a watcher.
    pub fn watch_cancel(&self, stream: StreamId, watch_id: i64) {
        let mut st = self.shared.lock();
        if let Some(o) = st.hub.cancel(stream, watch_id) {
            st.deliver(vec![o]);
        }
    }

    /// Answer a progress request (now, or once every watcher of the stream is level).
    pub fn watch_progress(&self, stream: StreamId) {
        let mut st = self.shared.lock();
        let st = &mut *st;
        if let Some(o) = st.hub.request_progress(stream, &st.machine.kv) {
            st.deliver(vec![o]);
        }
    }

    /// Send unsynced watchers of `stream` their next batch of history, if the stream's queue has
    /// room. Returns whether some are still behind.
    pub fn watch_catch_up(&self, stream: StreamId) -> bool {
        let mut st = self.shared.lock();
        let st = &mut *st;
        if !st.hub.has_unsynced(stream) {
            return false;
        }
        let room = st.streams.get(&stream).is_some_and(|tx| tx.capacity() > 0);
        if room {
            let out = st.hub.catch_up(stream, &st.machine.kv);
            st.deliver(out);
        }
        st.hub.has_unsynced(stream)
    }

    /// Wait until the key created at `rev` is the oldest under `prefix` (this caller holds the
    /// lock or leads the election), or until it is deleted. Woken by the apply that settles it;
    /// dropping the future withdraws the waiter.
    pub async fn wait_for_lock(&self, prefix: &[u8], rev: i64) -> LockWake {
        let id = self.next_waiter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut st = self.shared.lock();
            let st = &mut *st;
            match st.locks.wait(prefix, rev, id, &st.machine.kv) {
                geolock_core::lock::Wait::Holding => return LockWake::Holding,
                geolock_core::lock::Wait::Gone => return LockWake::Lost,
                geolock_core::lock::Wait::Queued => {
                    st.lock_waiters.insert(id, tx);
                }
            }
        }
        let _withdraw = WithdrawOnDrop { shared: &self.shared, prefix, rev, id };
        rx.await.unwrap_or(LockWake::Lost)
    }

    /// Lock waiters on this node.
    pub fn lock_waiters(&self) -> usize {
        self.shared.lock().locks.waiters()
    }

    /// Forget a stream.
    pub fn watch_close(&self, stream: StreamId) {
        let mut st = self.shared.lock();
        st.streams.remove(&stream);
        st.hub.close_stream(stream);
    }
}

/// Accept peers and answer their requests.
async fn serve_peers(node: std::sync::Weak<Node>, transport: Arc<Transport>, founders: Vec<String>) {
    let members = {
        let node = node.clone();
        move || {
            let Some(n) = node.upgrade() else { return Vec::new() };
            let m = n.raft.metrics();
            let m = m.borrow_watched();
            let mut names: Vec<String> = m.membership_config.membership().nodes().map(|(_, n)| n.name.clone()).collect();
            if names.is_empty() {
                names = founders.clone();
            }
            names
        }
    };
    while let Some((conn, peer)) = transport.accept(&members).await {
        let node = node.clone();
        tokio::spawn(async move {
            let max = geolock_core::limits::PEER_MESSAGE_BYTES_MAX;
            while let Some(req) = crate::transport::next_request(&conn, max, Kind::StreamAppend as u8).await {
                let req = match req {
                    Ok(crate::transport::Incoming::Call(r)) => r,
                    Ok(crate::transport::Incoming::Duplex { frames, replies, .. }) => {
                        let Some(n) = node.upgrade() else { return };
                        tokio::spawn(n.answer_append_stream(frames, replies));
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("peer {peer}: {e}");
                        continue;
                    }
                };
                let Some(n) = node.upgrade() else { return };
                tokio::spawn(async move {
                    let reply = match Kind::of(req.kind) {
                        Some(kind) => n.answer_peer(kind, &req.body).await,
                        _ => Err(crate::transport::TransportError::Stream(format!("bad request kind {}", req.kind))),
                    };
                    match reply {
                        Ok(bytes) => {
                            let _ = req.reply(&bytes).await;
                        }
                        Err(e) => tracing::warn!("peer request: {e}"),
                    }
                });
            }
        });
    }
}

impl Node {
    /// Feed a leader's stream of AppendEntries to Raft and send back its answers, in order,
    /// until either side ends the stream.
    async fn answer_append_stream(
        self: Arc<Self>,
        frames: crate::transport::FrameReader,
        mut replies: crate::transport::FrameWriter,
    ) {
        use futures::StreamExt;
        let requests = futures::stream::unfold((frames, self.clone()), |(mut frames, me)| async move {
            match frames.read(geolock_core::limits::PEER_MESSAGE_BYTES_MAX).await {
                Ok(Some(bytes)) => match network::decode::<quorum::Replicate<openraft::raft::AppendEntriesRequest<TypeConfig>>>(&bytes) {
                    Ok(frame) => {
                        if frame.leads {
                            me.leader_heard();
                        }
                        Some((frame.req, (frames, me)))
                    }
                    Err(e) => {
                        tracing::warn!("replication stream: {e}");
                        None
                    }
                },
                Ok(None) => None,
                Err(e) => {
                    tracing::debug!("replication stream: {e}");
                    None
                }
            }
        });
        let answers = self.raft.stream_append(requests);
        let mut answers = std::pin::pin!(answers);
        while let Some(answer) = answers.next().await {
            let stop = answer.is_err();
            let answer: network::StreamAppendReply = answer;
            if replies.write(&network::encode(&answer)).await.is_err() || stop {
                return;
            }
        }
        replies.finish();
    }

    /// Answer one request from a peer.
    async fn answer_peer(self: &Arc<Self>, kind: Kind, body: &[u8]) -> Result<Vec<u8>, crate::transport::TransportError> {
        use network::{decode, encode};
        let remote = |e: NodeError| RemoteError::from(&e);
        fn lease<T>(r: Result<T, NodeError>) -> Result<Result<T, LeaseError>, RemoteError> {
            match r {
                Ok(v) => Ok(Ok(v)),
                Err(NodeError::Apply(ApplyError::Lease(l))) => Ok(Err(l)),
                Err(e) => Err(RemoteError::from(&e)),
            }
        }
        Ok(match kind {
            Kind::AppendEntries => {
                let frame: quorum::Replicate<openraft::raft::AppendEntriesRequest<TypeConfig>> = decode(body)?;
                if frame.leads {
                    self.leader_heard();
                }
                encode(&self.raft.append_entries(frame.req).await)
            }
            Kind::StreamAppend => return Err(crate::transport::TransportError::Stream("a replication stream sent as one request".into())),
            Kind::Vote => encode(&self.raft.vote(decode(body)?).await),
            Kind::PreVote => encode(&self.raft.pre_vote(decode(body)?).await),
            Kind::SnapshotChunk => {
                let chunk: network::SnapshotChunk = decode(body)?;
                match self.snapshot_inbox.take(&chunk)? {
                    None => encode(&Ok::<_, openraft::errors::Fatal<TypeConfig>>(None::<openraft::raft::SnapshotResponse<TypeConfig>>)),
                    Some(snapshot) if snapshot.is_empty() && self.role != Role::Witness => {
                        tracing::warn!("refused a snapshot without data (a witness's): installing it would erase the key space");
                        return Err(crate::transport::TransportError::Stream(
                            "refused: a snapshot without data (a witness's) would erase this member's key space".into(),
                        ));
                    }
                    Some(snapshot) => {
                        let meta = chunk.meta;
                        tracing::info!("installing a snapshot of {} bytes up to {:?}", snapshot.len(), meta.last_log_id);
                        let snapshot = openraft::Snapshot { meta, snapshot };
                        encode(&self.raft.install_full_snapshot(chunk.vote, snapshot).await.map(Some))
                    }
                }
            }
            Kind::ChangeMembers => encode(&self.answer_change(decode(body)?).await),
            Kind::TransferLeader => encode(&self.raft.handle_transfer_leader(decode(body)?).await),
            Kind::ForwardWrite => encode(&self.propose_here(decode(body)?).await.map_err(remote)),
            Kind::ReadIndex => encode(&self.read_index_here().await.map_err(remote)),
            Kind::WitnessPurge => encode(&self.witness_purge(decode(body)?).await.map_err(remote)),
            Kind::LogState => encode(&self.last_log_id()),
            Kind::Lag => encode(&self.lags_here()),
            Kind::LeaseKeepAlive => encode(&lease(self.lease_keep_alive_here(decode(body)?))),
            Kind::LeaseTimeToLive => {
                let (id, keys): (i64, bool) = decode(body)?;
                encode(&lease(self.lease_time_to_live_here(id, keys)))
            }
        })
    }
}

/// Removes a lock waiter however its wait ends (a no-op once the apply woke it).
struct WithdrawOnDrop<'a> {
    shared: &'a Shared,
    prefix: &'a [u8],
    rev: i64,
    id: u64,
}

impl Drop for WithdrawOnDrop<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.locks.cancel(self.prefix, self.rev, self.id);
        st.lock_waiters.remove(&self.id);
    }
}

/// Follows this node's leadership: a new leader takes over lease expiry (granting every lease a
/// full TTL plus an election timeout), and while leading it revokes expired leases. A leader
/// that no quorum has acknowledged within the lease stops here too (see [`quorum`]): it hands
/// expiry back, so that it neither expires leases nobody could renew while no side had a
/// majority, nor keeps clocks the next leader will reset anyway.
async fn leadership_loop(node: std::sync::Weak<Node>) {
    let tick = Duration::from_millis(50);
    let mut leading = false;
    let mut was = Leadership::Follows;
    loop {
        tokio::time::sleep(tick).await;
        let Some(node) = node.upgrade() else { return };
        let now = node.quorum.leadership();
        match (was, now) {
            (Leadership::Leads, Leadership::LostQuorum { since_ack }) => tracing::warn!(
                "stepping down: no quorum acknowledged this leader within {:?} (last {:?} ago); it answers no \
                 keep-alive, lease or status query as leader until one does or another member is elected",
                node.quorum.lease(),
                since_ack
            ),
            (Leadership::LostQuorum { .. }, Leadership::Leads) => tracing::info!("a quorum acknowledges this leader again"),
            _ => {}
        }
        was = now;
        let now_leader = now == Leadership::Leads;
        if now_leader != leading {
            leading = now_leader;
            node.lag.lock().unwrap().clear();
            let mut st = node.shared.lock();
            if leading {
                st.machine.leases.promote(now_ms(), node.election_timeout.as_millis() as u64);
            } else {
                st.machine.leases.demote();
            }
        }
        if !leading {
            continue;
        }
        let last = node.raft.metrics().borrow_watched().last_log_index.unwrap_or(0);
        node.lag.lock().unwrap().record(last, now_ms());
        let expired = node.shared.lock().machine.leases.take_expired(
            now_ms(),
            node.election_timeout.as_millis() as u64,
            LEASE_EXPIRIES_PER_PROPOSAL_MAX,
        );
        for id in expired {
            let n = node.clone();
            tokio::spawn(async move {
                if let Err(e) = n.propose(Command::LeaseRevoke { id }).await {
                    tracing::debug!("expire lease {id:x}: {e}");
                }
            });
        }
    }
}

/// A snapshot at least every [`SNAPSHOT_INTERVAL`], however few entries were applied, so the
/// log behind it can be purged on a quiet cluster too.
async fn snapshot_loop(node: std::sync::Weak<Node>) {
    let mut ticker = tokio::time::interval(geolock_core::limits::SNAPSHOT_INTERVAL);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(node) = node.upgrade() else { return };
        if let Err(e) = node.raft.trigger().snapshot().await {
            tracing::warn!("hourly snapshot: {e}");
        }
    }
}

/// Progress notifications for watchers that asked for them.
async fn progress_notify_loop(node: std::sync::Weak<Node>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(node) = node.upgrade() else { return };
        let mut st = node.shared.lock();
        let st = &mut *st;
        let out = st.hub.progress_tick(&st.machine.kv);
        st.deliver(out);
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::log::{StoreBuilder, Suite};
    use openraft::StorageError;

    use super::*;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
            let dir = tempfile::tempdir().expect("temp dir");
            let engine: Arc<dyn Engine> = RocksEngine::open(&dir.path().join("db")).expect("open rocksdb");
            let shared = Shared::open(engine.clone(), dir.path().join("snapshots"), false).expect("open state machine");
            Ok((dir, LogStore::new(engine), StateMachine { shared }))
        }
    }

    /// openraft's own storage test suite, against our RocksDB log store and state machine.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_suite_passes_on_rocksdb() {
        Suite::test_all(Builder).await.expect("openraft storage suite");
    }
}
