//! What a member's requests fail with ([`NodeError`]), what a member fails to start with
//! ([`StartError`]), and the forms both take between members ([`RemoteError`]).

use std::path::PathBuf;

use openraft::errors::{
    ChangeMembershipError, ClientWriteError, Fatal, ForwardToLeader, LinearizableReadError, RaftError,
};
use openraft::type_config::alias::CommittedLeaderIdOf;

use super::membership::MemberError;
use super::network::RemoteError;
use super::TypeConfig;
use crate::config::{ConfigError, Role};
use crate::transport::TransportError;
use geolock_core::machine::ApplyError;
use geolock_core::storage::StorageError;

/// openraft's refusal of a membership change.
pub type MembershipRefused = ChangeMembershipError<CommittedLeaderIdOf<TypeConfig>, u64>;

/// Why a request could not be served by this member. Every variant is a request error: the
/// member goes on serving (a failure it cannot go on from stops openraft, which reads as
/// [`NodeError::Stopped`]). The API edge maps each to etcd's status (`api/errors.rs`).
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
    /// The leader could not be reached over the peer transport.
    #[error("etcdserver: leader unreachable: {0}")]
    Peer(#[source] TransportError),
    #[error(transparent)]
    Member(#[from] MemberError),
    /// openraft refused a membership change for a reason etcd has no error for.
    #[error("geolock: membership change refused: {0}")]
    Membership(#[source] MembershipRefused),
    /// The leader failed a forwarded request in a way that has no typed form between members.
    #[error("geolock: the leader failed the request: {0}")]
    Remote(String),
    /// This member (or the leader it forwarded to) belongs to an old primary that a region
    /// failover fenced out (DESIGN.md "Region failover", FENCE).
    #[error(
        "geolock: this member was fenced by the failover to revision epoch {epoch}: it accepts no writes; \
         the new primary does (lockctl failover rejoin makes this member its learner)"
    )]
    Fenced { epoch: u64 },
    /// An active-passive primary's leader without its region write lease (see `write_lease`).
    #[error(
        "geolock: this primary holds no region write lease (a majority of its {vantages} vantage points grants it, \
         {lease_ms} ms at a time): it takes no writes until they grant it again, or fail the region over"
    )]
    NoWriteLease { vantages: usize, lease_ms: u64 },
    /// PROMOTE asked of a member that cannot seed a new primary.
    #[error("geolock: this member cannot seed the new primary: {why}")]
    NotPromotable { why: &'static str },
    /// Rejoin asked of a member that cannot become a learner of the new primary.
    #[error("geolock: this member cannot rejoin as a learner of the new primary: {why}")]
    NotRejoinable { why: &'static str },
}

impl NodeError {
    /// Whether the same request may succeed later on this member without anything changing on
    /// the caller's side: the cluster had no leader, or this member could not reach it in time.
    pub fn is_transient(&self) -> bool {
        matches!(self, NodeError::NotLeader { .. } | NodeError::NoLeader | NodeError::Timeout | NodeError::Peer(_))
    }
}

/// "Ask the leader" from openraft: who it names, if anyone.
impl From<ForwardToLeader<TypeConfig>> for NodeError {
    fn from(f: ForwardToLeader<TypeConfig>) -> Self {
        match f.leader_id {
            Some(l) => NodeError::NotLeader { leader: Some(l) },
            None => NodeError::NoLeader,
        }
    }
}

/// A write's or a membership change's failure in openraft.
impl From<RaftError<TypeConfig, ClientWriteError<TypeConfig>>> for NodeError {
    fn from(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Self {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => f.into(),
            RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)) => NodeError::LeaderChanged,
            // Only for a write made under a precondition on its leader, which geolock does not
            // make; a leader other than the one required reads as a leader change.
            RaftError::APIError(ClientWriteError::PreconditionFailed(_)) => NodeError::LeaderChanged,
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => match e {
                ChangeMembershipError::InProgress(_) => MemberError::InProgress.into(),
                ChangeMembershipError::LearnerNotFound(_) => MemberError::NotFound.into(),
                other => NodeError::Membership(other),
            },
            RaftError::Fatal(_) => NodeError::Stopped,
        }
    }
}

/// A read index's failure in openraft.
impl From<RaftError<TypeConfig, LinearizableReadError<TypeConfig>>> for NodeError {
    fn from(e: RaftError<TypeConfig, LinearizableReadError<TypeConfig>>) -> Self {
        match e {
            RaftError::APIError(LinearizableReadError::ForwardToLeader(f)) => f.into(),
            RaftError::APIError(LinearizableReadError::QuorumNotEnough(_)) => NodeError::NoLeader,
            RaftError::Fatal(_) => NodeError::Stopped,
        }
    }
}

impl From<&NodeError> for RemoteError {
    fn from(e: &NodeError) -> Self {
        match e {
            NodeError::NotLeader { .. } => RemoteError::NotLeader,
            NodeError::NoLeader => RemoteError::NoLeader,
            NodeError::Timeout => RemoteError::Timeout,
            NodeError::Stopped => RemoteError::Stopped,
            NodeError::LeaderChanged => RemoteError::LeaderChanged,
            NodeError::Apply(a) => RemoteError::Apply(a.clone()),
            NodeError::Member(m) => RemoteError::Member(m.clone()),
            NodeError::TooManyProposals { max } => RemoteError::TooManyProposals { max: *max },
            NodeError::Fenced { epoch } => RemoteError::Fenced { epoch: *epoch },
            NodeError::NoWriteLease { vantages, lease_ms } => {
                RemoteError::NoWriteLease { vantages: *vantages, lease_ms: *lease_ms }
            }
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
            RemoteError::Apply(a) => NodeError::Apply(a),
            RemoteError::Member(m) => NodeError::Member(m),
            RemoteError::TooManyProposals { max } => NodeError::TooManyProposals { max },
            RemoteError::Other(m) => NodeError::Remote(m),
            RemoteError::Fenced { epoch } => NodeError::Fenced { epoch },
            RemoteError::NoWriteLease { vantages, lease_ms } => NodeError::NoWriteLease { vantages, lease_ms },
        }
    }
}

/// Why a member could not start. Fatal: `lockctl start` reports it and exits.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("loading the state machine: {0}")]
    State(#[source] std::io::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("raft settings: {0}")]
    RaftConfig(#[from] openraft::ConfigError),
    #[error("a cluster of {members} members needs peer TLS: set --peer-trusted-ca-file, --peer-cert-file and --peer-key-file")]
    NeedsPeerTls { members: usize },
    #[error("config: listen_peer_urls is empty")]
    NoPeerListenUrl,
    #[error("cannot resolve peer address {addr}")]
    Resolve { addr: String },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("raft: {0}")]
    Raft(#[from] Fatal<TypeConfig>),
    #[error(
        "a learner joins a running cluster: add it with `lockctl member add {name} --learner --peer-urls URL` \
         and start it with --initial-cluster-state existing"
    )]
    LearnerFounder { name: String },
    #[error("{name} is not in the initial cluster")]
    NotInInitialCluster { name: String },
}
