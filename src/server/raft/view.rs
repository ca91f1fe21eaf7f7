//! What each member tells about itself for the cluster page: its state, its round trips to the
//! other members, and the lock queues it has waiters in. Asked of every member over the peer
//! transport (which reaches members in other regions through the same paths Raft takes), so
//! one member's page shows the whole cluster.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::network::{Kind, RemoteError};
use super::Node;

/// How long the page waits for each member's view: a member that has not answered by then is
/// shown as unreachable (a WAN round trip is at most a few hundred milliseconds).
const VIEW_WAIT: Duration = Duration::from_secs(1);

/// Lock queues each member reports (its longest), and so the most the page lists.
pub const HOT_LOCKS_MAX: usize = 10;

/// One member's own account.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    pub id: u64,
    pub name: String,
    /// `voter`, `learner` or `witness`.
    pub role: String,
    pub region: String,
    pub term: u64,
    pub applied_index: u64,
    /// The leader it knows is live, 0 if none.
    pub leader: u64,
    /// QUIC's smoothed round-trip time to each member it has a connection to, in ms.
    pub rtt_ms: Vec<(u64, f64)>,
    /// Its longest lock queues: lock name and keys queued (holder included), longest first.
    pub locks: Vec<(String, usize)>,
}

impl Node {
    /// This member's view.
    pub(super) fn view_here(&self) -> MemberView {
        let st = self.status();
        let locks = self.shared.lock().locks.longest(HOT_LOCKS_MAX);
        let ids: Vec<(u64, String)> = self.members().into_iter().map(|m| (m.id, m.name)).collect();
        MemberView {
            id: self.id,
            name: self.me.name.clone(),
            role: if st.is_learner { "learner".into() } else { self.role.to_string() },
            region: self.me.region.clone(),
            term: st.raft_term,
            applied_index: st.applied_index,
            leader: st.leader,
            rtt_ms: self.peers.rtts(&ids).into_iter().map(|(id, rtt)| (id, rtt.as_secs_f64() * 1000.0)).collect(),
            locks: locks
                .into_iter()
                .map(|(prefix, n)| (String::from_utf8_lossy(prefix.strip_suffix(b"/").unwrap_or(&prefix)).into(), n))
                .collect(),
        }
    }

    /// Every member's view, in membership order: its own, or why it could not be had.
    pub async fn cluster_view(&self) -> Vec<(u64, Result<MemberView, String>)> {
        let asks = self.members().into_iter().map(|m| async move {
            if m.id == self.id {
                return (m.id, Ok(self.view_here()));
            }
            let Some(member) = self.member_record(m.id) else {
                return (m.id, Err("not in the membership".to_string()));
            };
            let call = self.peers.call::<_, Result<MemberView, RemoteError>>(m.id, &member, Kind::View, &());
            let got = match tokio::time::timeout(VIEW_WAIT, call).await {
                Err(_) => Err(format!("no answer within {VIEW_WAIT:?}")),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(Err(e))) => Err(e.to_string()),
                Ok(Ok(Ok(v))) => Ok(v),
            };
            (m.id, got)
        });
        futures::future::join_all(asks).await
    }
}
