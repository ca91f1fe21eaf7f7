//! Starting a member: its storage, its Raft settings, its peer transport, openraft itself, and on
//! a new cluster's first start the founders' membership. What runs beside it is chosen per role
//! in `roles`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::{Config as RaftConfig, SnapshotPolicy, StepDownPolicy};
use tokio::sync::Semaphore;

use super::lag::LagClock;
use super::log_store::LogStore;
use super::network::{self, Peers, SnapshotInbox};
use super::quorum::QuorumView;
use super::state_machine::{Shared, StateMachine};
use super::write_lease::WriteLease;
use super::{fence, rejoin};
use super::{Member, Node, Raft, StartError};
use crate::auth::SimpleTokens;
use crate::config::{Config, InitialMember, Role};
use crate::rocks::{Footprint, RocksEngine};
use crate::transport::Transport;
use geolock_core::limits::PROPOSALS_IN_FLIGHT_MAX;
use geolock_core::member::member_id;
use geolock_core::storage::Engine;

impl Node {
    /// Open storage, start Raft, and (on first start of a new cluster) initialise membership.
    /// Nothing runs in the background yet: `roles` starts what the member's role needs.
    pub async fn start(cfg: &Config) -> Result<Arc<Node>, StartError> {
        let (engine, shared) = open_storage(cfg)?;
        let fenced_epoch = fence::load(&*engine)?;
        let members = cfg.initial_members()?;
        // A member that seeded a new cluster (PROMOTE) or was wiped to join one (Rejoin) is in
        // that cluster, whatever the flags it was started with say of the old one.
        let flags = (cluster_id(&cfg.cluster.name), members.iter().map(|m| m.name.clone()).collect(), cfg.role);
        let (cluster_id, founders, role, failed_over) = rejoin::start_as(&*engine, flags)?;
        let id = member_id(&cfg.name);
        let raft_cfg = Arc::new(raft_config(cfg)?);
        let transport = bind_transport(cfg, members.len()).await?;
        let peers = Peers::new(transport.clone());
        // openraft's leader lease is election_timeout_max: a quorum's acknowledgement counts for
        // as long as openraft itself lets the leader propose on it.
        let quorum = Arc::new(QuorumView::new(id, Duration::from_millis(raft_cfg.election_timeout_max)));
        let network = network::Network { peers: peers.clone(), role, quorum: quorum.clone() };
        let raft =
            Raft::new(id, raft_cfg, network, LogStore::new(engine), StateMachine { shared: shared.clone() }).await?;
        quorum.attach(raft.clone());
        if fenced_epoch > 0 {
            // Before the first election timeout can pass: a fenced member never campaigns.
            fence::stop_taking_part(&raft);
            tracing::warn!("fenced by the failover to revision epoch {fenced_epoch}: refusing writes and Raft traffic");
        }
        if !failed_over && !raft.is_initialized().await? && cfg.initial_cluster_state() == "new" {
            initialize(&raft, cfg, &members).await?;
        }
        let me = Member {
            name: cfg.name.clone(),
            peer_addr: cfg.peer_addr()?,
            peer_urls: cfg.peer_urls(),
            client_urls: cfg.client_urls(),
            role: role.into(),
            region: cfg.region.clone(),
        };
        Ok(Arc::new(Node {
            raft,
            shared,
            id,
            me,
            founders,
            role,
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
            transport,
            snapshot_inbox: SnapshotInbox::default(),
            published: tokio::sync::watch::Sender::new(false),
            fenced_epoch: std::sync::atomic::AtomicU64::new(fenced_epoch),
            failover_gate: tokio::sync::RwLock::new(()),
            restart: tokio::sync::watch::Sender::new(false),
            write_lease: write_lease(cfg, failed_over),
        }))
    }
}

/// The region write lease, when the configuration names vantage points (each counted once).
/// None on a member of a cluster a failover made: the old primary's vantage points have
/// stopped granting, and its flags are still the old primary's.
fn write_lease(cfg: &Config, failed_over: bool) -> Option<WriteLease> {
    let mut vantages: Vec<String> =
        cfg.failover.vantages.split(',').filter(|v| !v.is_empty()).map(str::to_string).collect();
    vantages.sort();
    vantages.dedup();
    (!vantages.is_empty() && !failed_over).then(|| WriteLease::new(vantages, cfg.failover.write_lease))
}

/// The cluster's ID, from its name alone, so that a member added later computes the same one.
pub(super) fn cluster_id(name: &str) -> u64 {
    member_id(&format!("cluster/{name}"))
}

/// The engine, sized for what the member keeps, and the state machine loaded from it.
fn open_storage(cfg: &Config) -> Result<(Arc<dyn Engine>, Arc<Shared>), StartError> {
    let dir = cfg.data_dir();
    std::fs::create_dir_all(&dir).map_err(|source| StartError::DataDir { path: dir.clone(), source })?;
    let witness = cfg.role == Role::Witness;
    let footprint = if witness { Footprint::LogTail } else { Footprint::Data };
    let engine: Arc<dyn Engine> = RocksEngine::open_sized(&dir.join("db"), footprint)?;
    // With JWTs no simple token is ever presented: none is kept.
    let tokens = match cfg.auth_token.split(',').next() {
        Some("jwt") => SimpleTokens::none(),
        _ => SimpleTokens::new(Duration::from_secs(cfg.auth_token_ttl)),
    };
    let shared = Shared::open(engine.clone(), dir.join("snapshots"), witness, tokens).map_err(StartError::State)?;
    Ok((engine, shared))
}

/// openraft's settings for this member.
fn raft_config(cfg: &Config) -> Result<RaftConfig, StartError> {
    let et_ms = cfg.raft.election_timeout.as_millis() as u64;
    let hb_ms = cfg.raft.heartbeat_interval.as_millis() as u64;
    // A follower of openraft campaigns only after the leader's lease (election_timeout_max)
    // plus a random timeout in [min, max) have passed without a heartbeat. Halving and
    // quartering etcd's setting keeps that whole wait within one election timeout, where
    // etcd waits between one and two.
    let (et_max_ms, et_min_ms) = (et_ms / 2, (et_ms / 4).max(hb_ms * 2).min(et_ms / 2 - 1));
    let mut raft_cfg = RaftConfig {
        cluster_name: cfg.cluster.name.clone(),
        heartbeat_interval: hb_ms,
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
    if cfg.role == Role::Witness {
        // It never campaigns on its own timeout (its supervisor decides), never snapshots on
        // its own, and purges only up to what the leader says every data voter holds.
        raft_cfg.enable_elect = false;
        raft_cfg.snapshot_policy = SnapshotPolicy::Never;
        raft_cfg.max_in_snapshot_log_to_keep = u64::MAX;
    }
    Ok(raft_cfg.validate()?)
}

/// The QUIC endpoint for peers, bound to the first `listen_peer_urls`; none for a single member
/// without peer TLS (a cluster of more needs it).
async fn bind_transport(cfg: &Config, members: usize) -> Result<Option<Arc<Transport>>, StartError> {
    let Some(tls) = cfg.peer_tls()? else {
        return if members > 1 { Err(StartError::NeedsPeerTls { members }) } else { Ok(None) };
    };
    let listen = cfg.listen_peer_urls.split(',').next().map(crate::config::host_port).transpose()?;
    let listen = listen.ok_or(StartError::NoPeerListenUrl)?;
    let resolved = tokio::net::lookup_host(&listen).await.ok().and_then(|mut a| a.next());
    let addr = resolved.ok_or(StartError::Resolve { addr: listen })?;
    let transport = Arc::new(Transport::bind(addr, &tls)?);
    crate::reload::watch(&transport, "peer TLS settings", Transport::reload);
    Ok(Some(transport))
}

/// A new cluster's first start: the founders' membership as log entry 0.
async fn initialize(raft: &Raft, cfg: &Config, members: &[InitialMember]) -> Result<(), StartError> {
    if cfg.role == Role::Learner {
        // Founders are voters: a learner listed among them would vote.
        return Err(StartError::LearnerFounder { name: cfg.name.clone() });
    }
    // Every founder must propose the very same membership: each writes it as log entry 0
    // of its own log, and Raft takes entries with equal IDs to be equal. So it holds only
    // what the initial cluster says of everyone; each member then publishes the rest.
    let nodes: BTreeMap<u64, Member> = members
        .iter()
        .map(|m| {
            let peer_urls = vec![format!("http://{}", m.peer_addr)];
            (
                member_id(&m.name),
                Member { name: m.name.clone(), peer_addr: m.peer_addr.clone(), peer_urls, ..Default::default() },
            )
        })
        .collect();
    if !nodes.contains_key(&member_id(&cfg.name)) {
        return Err(StartError::NotInInitialCluster { name: cfg.name.clone() });
    }
    if let Err(e) = raft.initialize(nodes).await {
        tracing::info!("initialize: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(role: Role, et_ms: u64, hb_ms: u64) -> Config {
        let mut cfg = Config { role, ..Default::default() };
        cfg.raft.election_timeout = Duration::from_millis(et_ms);
        cfg.raft.heartbeat_interval = Duration::from_millis(hb_ms);
        cfg
    }

    #[test]
    fn openraft_waits_within_one_election_timeout_and_a_witness_never_campaigns() {
        let r = raft_config(&with(Role::Voter, 1000, 100)).unwrap();
        assert_eq!((r.election_timeout_min, r.election_timeout_max, r.enable_elect), (250, 500, true));
        // Two heartbeats at least between elections, however short the timeout.
        let r = raft_config(&with(Role::Voter, 1000, 200)).unwrap();
        assert_eq!((r.election_timeout_min, r.election_timeout_max), (400, 500));
        let w = raft_config(&with(Role::Witness, 1000, 100)).unwrap();
        assert_eq!(
            (w.enable_elect, w.snapshot_policy.clone(), w.max_in_snapshot_log_to_keep),
            (false, SnapshotPolicy::Never, u64::MAX)
        );
    }
}
