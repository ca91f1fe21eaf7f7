//! The one table that maps geolock's errors to gRPC statuses. Codes and messages are etcd's
//! (its `rpctypes`), because client libraries match on them: a compacted revision must read
//! "etcdserver: mvcc: required revision has been compacted" for a Go client to see
//! `rpctypes.ErrCompacted`. Where geolock says more than etcd's text (the limit that was
//! broken), the status message is etcd's text to the byte and the whole story goes into the
//! [`DETAIL_METADATA`] entry of the status's metadata.

use tonic::{Code, Status};

use crate::raft::{MemberError, NodeError};
use geolock_core::auth::AuthError;
use geolock_core::kv::KvError;
use geolock_core::lease::LeaseError;
use geolock_core::machine::ApplyError;

/// Anything a client request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("etcdserver: request is too large ({len} bytes, request_bytes_max {max})")]
    RequestTooLarge { len: usize, max: usize },
    #[error("etcdserver: {0}")]
    InvalidArgument(String),
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    #[error("etcdserver: {0} is not supported by geolock yet")]
    Unimplemented(&'static str),
    #[error("geolock: lock {name} needs its parent lock {parent} held by lease {lease:x}")]
    ParentNotHeld { name: String, parent: String, lease: i64 },
    #[error("geolock: lock key {key} was deleted before it was acquired (its lease ended or it was unlocked)")]
    LockLost { key: String },
    #[error("election: not leader")]
    ElectionNotLeader,
    #[error("election: no leader")]
    ElectionNoLeader,
    /// A watch stream's queue overflowed with replies the client did not read.
    #[error("etcdserver: watch stream queue full (watch_stream_queue_max {max})")]
    WatchQueueFull { max: usize },
    /// The state machine answered a command with a result of another kind: a bug.
    #[error("geolock: unexpected apply result {got}")]
    UnexpectedApply { got: String },
    /// Authenticate on a member given a JWT public key but no private key (etcd's text).
    #[error("auth: token signing attempted with verify-only key")]
    VerifyOnly,
    /// Hashing or checking a password failed, or waits past the queue's bound.
    #[error("etcdserver: {0}")]
    Password(#[from] crate::auth::PasswordError),
    /// A Txn that found the lock key already created did not read it back: a bug.
    #[error("geolock: lock key {key} vanished during its creation")]
    LockKeyVanished { key: String },
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Kv(e) => ApiError::Kv(e),
            ApplyError::Lease(e) => ApiError::Lease(e),
            ApplyError::Auth(e) => ApiError::Auth(e),
        }
    }
}

fn kv_code(e: &KvError) -> Code {
    match e {
        KvError::Compacted { .. } | KvError::FutureRev { .. } => Code::OutOfRange,
        KvError::LeaseNotFound { .. } => Code::NotFound,
        KvError::NoSpace { .. } => Code::ResourceExhausted,
        KvError::EpochNotAfter { .. } => Code::FailedPrecondition,
        KvError::KeyNotFound
        | KvError::DuplicateKey
        | KvError::TooManyOps { .. }
        | KvError::EmptyKey
        | KvError::KeyTooLarge { .. }
        | KvError::ValueProvided
        | KvError::LeaseProvided
        | KvError::TxnTooDeep { .. }
        | KvError::EpochTooLarge { .. } => Code::InvalidArgument,
    }
}

fn lease_code(e: &LeaseError) -> Code {
    match e {
        LeaseError::NotFound { .. } => Code::NotFound,
        LeaseError::Exists { .. } => Code::FailedPrecondition,
        LeaseError::TtlTooLarge { .. } => Code::OutOfRange,
        LeaseError::TooMany { .. } => Code::ResourceExhausted,
        LeaseError::Invalid { .. } => Code::InvalidArgument,
    }
}

/// etcd's codes for its auth errors (its `rpctypes`); the messages are the errors' own.
fn auth_code(e: &AuthError) -> Code {
    match e {
        AuthError::PermissionDenied => Code::PermissionDenied,
        AuthError::InvalidToken => Code::Unauthenticated,
        AuthError::UserEmpty
        | AuthError::RoleEmpty
        | AuthError::AuthFailed
        | AuthError::PermissionNotGiven
        | AuthError::InvalidMgmt
        | AuthError::OldRevision
        | AuthError::NameTooLong { .. }
        | AuthError::KeyTooLarge { .. } => Code::InvalidArgument,
        AuthError::RootUserNotExist
        | AuthError::RootRoleNotExist
        | AuthError::UserAlreadyExist
        | AuthError::UserNotFound
        | AuthError::RoleAlreadyExist
        | AuthError::RoleNotFound
        | AuthError::RoleNotGranted
        | AuthError::PermissionNotGranted
        | AuthError::NotEnabled => Code::FailedPrecondition,
        AuthError::TooManyUsers { .. }
        | AuthError::TooManyRoles { .. }
        | AuthError::TooManyRolesOfUser { .. }
        | AuthError::TooManyPermissions { .. } => Code::ResourceExhausted,
    }
}

/// The gRPC metadata key that carries geolock's account of an error whose message is etcd's
/// fixed text (for instance which limit a request broke, and by how much).
pub const DETAIL_METADATA: &str = "geolock-detail";

/// etcd's exact text for an error that geolock describes in more detail, from etcd's
/// `rpctypes` table; `None` where geolock's own message is the status message.
fn etcd_text(e: &ApiError) -> Option<&'static str> {
    let kv = |k: &KvError| match k {
        KvError::TooManyOps { .. } => Some("etcdserver: too many operations in txn request"),
        KvError::NoSpace { .. } => Some("etcdserver: mvcc: database space exceeded"),
        _ => None,
    };
    let lease = |l: &LeaseError| match l {
        LeaseError::TtlTooLarge { .. } => Some("etcdserver: too large lease TTL"),
        _ => None,
    };
    match e {
        ApiError::Kv(k) | ApiError::Node(NodeError::Apply(ApplyError::Kv(k))) => kv(k),
        ApiError::Lease(l) | ApiError::Node(NodeError::Apply(ApplyError::Lease(l))) => lease(l),
        ApiError::RequestTooLarge { .. } => Some("etcdserver: request is too large"),
        ApiError::Node(NodeError::TooManyProposals { .. })
        | ApiError::Password(crate::auth::PasswordError::Busy { .. }) => Some("etcdserver: too many requests"),
        ApiError::Node(NodeError::Member(MemberError::LastVoter)) => {
            Some("etcdserver: re-configuration failed due to not enough started members")
        }
        // A member that cannot reach the leader: etcd's text for a proposal that timed out
        // while its member had lost the leader's connection.
        ApiError::Node(NodeError::Peer(_)) => Some("etcdserver: request timed out, possibly due to connection lost"),
        ApiError::Node(NodeError::Member(MemberError::TransferTimeout { .. })) => {
            Some("etcdserver: request timed out, leader transfer took too long")
        }
        _ => None,
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let code = match &e {
            ApiError::Kv(k) => kv_code(k),
            ApiError::Lease(l) => lease_code(l),
            ApiError::Auth(a) => auth_code(a),
            ApiError::Node(n) => match n {
                NodeError::Apply(ApplyError::Kv(k)) => kv_code(k),
                NodeError::Apply(ApplyError::Lease(l)) => lease_code(l),
                NodeError::Apply(ApplyError::Auth(a)) => auth_code(a),
                NodeError::NotLeader { .. }
                | NodeError::NoLeader
                | NodeError::Stopped
                | NodeError::Timeout
                | NodeError::LeaderChanged
                | NodeError::Peer(_) => Code::Unavailable,
                NodeError::TooManyProposals { .. } => Code::ResourceExhausted,
                NodeError::Role { .. } => Code::FailedPrecondition,
                NodeError::Member(MemberError::NotFound) => Code::NotFound,
                NodeError::Member(MemberError::InProgress) => Code::Unavailable,
                // etcd has no gRPC status for it: its table leaves it Unknown.
                NodeError::Member(MemberError::TransferTimeout { .. }) => Code::Unknown,
                NodeError::Member(_) => Code::FailedPrecondition,
                NodeError::Membership(_) | NodeError::Remote(_) => Code::Internal,
                // For writes this member is gone for good; etcd's clients retry Unavailable on
                // another endpoint, and re-resolve the client name, which by then names the new
                // primary.
                NodeError::Fenced { .. } => Code::Unavailable,
                NodeError::NotPromotable { .. } | NodeError::NotRejoinable { .. } => Code::FailedPrecondition,
                // Transient as a leaderless cluster is: etcd's clients retry.
                NodeError::NoWriteLease { .. } => Code::Unavailable,
            },
            ApiError::RequestTooLarge { .. } | ApiError::InvalidArgument(_) | ApiError::InvalidSortOption => {
                Code::InvalidArgument
            }
            ApiError::Unimplemented(_) => Code::Unimplemented,
            ApiError::ParentNotHeld { .. } | ApiError::ElectionNotLeader => Code::FailedPrecondition,
            ApiError::LockLost { .. } | ApiError::ElectionNoLeader => Code::NotFound,
            ApiError::WatchQueueFull { .. } => Code::ResourceExhausted,
            ApiError::UnexpectedApply { .. } | ApiError::LockKeyVanished { .. } => Code::Internal,
            ApiError::VerifyOnly => Code::Unknown,
            ApiError::Password(crate::auth::PasswordError::Busy { .. }) => Code::ResourceExhausted,
            ApiError::Password(crate::auth::PasswordError::TooLong { .. }) => Code::InvalidArgument,
            ApiError::Password(_) => Code::Internal,
        };
        let detail = e.to_string();
        match etcd_text(&e) {
            None => Status::new(code, detail),
            Some(text) => {
                let mut md = tonic::metadata::MetadataMap::new();
                if let Ok(v) = detail.parse() {
                    md.insert(DETAIL_METADATA, v);
                }
                Status::with_metadata(code, text, md)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_etcds_codes_and_messages() {
        let s: Status = ApiError::Kv(KvError::Compacted { requested: 2, compact_revision: 5 }).into();
        assert_eq!(
            (s.code(), s.message()),
            (Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted")
        );
        let s: Status = ApiError::Node(NodeError::Apply(ApplyError::Lease(LeaseError::NotFound { lease: 1 }))).into();
        assert_eq!((s.code(), s.message()), (Code::NotFound, "etcdserver: requested lease not found"));
        // etcd's text alone in the message; the limit in the metadata.
        let s: Status = ApiError::Kv(KvError::TooManyOps { ops: 200, max: 128 }).into();
        assert_eq!((s.code(), s.message()), (Code::InvalidArgument, "etcdserver: too many operations in txn request"));
        assert!(s.metadata().get(DETAIL_METADATA).unwrap().to_str().unwrap().contains("txn_ops_max 128"));
        let s: Status = ApiError::Node(NodeError::TooManyProposals { max: 4 }).into();
        assert_eq!((s.code(), s.message()), (Code::ResourceExhausted, "etcdserver: too many requests"));
        let s: Status =
            ApiError::Node(NodeError::Peer(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into())).into();
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unavailable, "etcdserver: request timed out, possibly due to connection lost")
        );
        assert!(s.metadata().get(DETAIL_METADATA).unwrap().to_str().unwrap().contains("connection refused"));
        let s: Status =
            ApiError::Node(NodeError::Member(MemberError::TransferTimeout { to: 2, waited_ms: 5000 })).into();
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unknown, "etcdserver: request timed out, leader transfer took too long")
        );
    }
}
