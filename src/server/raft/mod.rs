//! Replication with openraft: the type configuration, the RocksDB log store, the state machine
//! adapter, and [`Node`], the handle the client API drives. The only module that imports
//! openraft, so a version bump touches nothing else. One file per concern:
//!
//! - `bootstrap`: starting a member; `tasks`: what runs beside it (chosen per role in `roles`)
//! - `node`: the handle; `forward`: whether this member or the leader answers
//! - `peer_server` and `network`: the two ends of the peer RPCs
//! - `log_store`, `state_machine`: openraft's storage on RocksDB
//! - `membership`, `witness`, `quorum`, `lag`: membership changes, the witness role,
//!   CheckQuorum, members' lag
//! - `fence`, `promote`, `rejoin`, `write_lease`: a member fenced out by a region failover; a
//!   learner seeding the new primary; a member wiped to learn from it; an active-passive
//!   primary's region write lease
//! - `metrics`, `view`: this member's figures for Prometheus, and its account for the cluster page
//! - `error`: what requests and starts fail with; `format`: the replicated and persisted formats

mod bootstrap;
mod error;
mod fence;
mod format;
mod forward;
mod lag;
mod log_store;
mod membership;
mod metrics;
mod network;
mod node;
mod peer_server;
mod promote;
mod quorum;
mod rejoin;
mod state_machine;
mod tasks;
mod view;
mod witness;
mod write_lease;

use std::sync::OnceLock;
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use error::{NodeError, StartError};
pub use membership::{MemberChange, MemberError};
pub use metrics::{count_range, count_txn, register as register_metrics};
pub use node::Node;
pub use state_machine::LockWake;
pub use tasks::Task;
pub use view::HOT_LOCKS_MAX;

pub use format::MemberRole;
use geolock_core::machine::{Applied, Command};
use state_machine::StateMachine;

/// A member as Raft carries it in the membership: enough to reach it and show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// `host:port` of its peer (QUIC) endpoint.
    pub peer_addr: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub role: MemberRole,
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

#[cfg(test)]
mod tests {
    use openraft::testing::log::{StoreBuilder, Suite};
    use openraft::StorageError;

    use super::*;
    use crate::rocks::{Footprint, RocksEngine};
    use geolock_core::storage::Engine;
    use log_store::LogStore;
    use state_machine::Shared;
    use std::sync::Arc;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
            let dir = tempfile::tempdir().expect("temp dir");
            let engine: Arc<dyn Engine> =
                RocksEngine::open_sized(&dir.path().join("db"), Footprint::Data).expect("open rocksdb");
            let shared = Shared::open(
                engine.clone(),
                dir.path().join("snapshots"),
                false,
                crate::auth::SimpleTokens::new(std::time::Duration::from_secs(300)),
            )
            .expect("open state machine");
            Ok((dir, LogStore::new(engine), StateMachine { shared }))
        }
    }

    /// openraft's own storage test suite, against our RocksDB log store and state machine.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_suite_passes_on_rocksdb() {
        Suite::test_all(Builder).await.expect("openraft storage suite");
    }
}
