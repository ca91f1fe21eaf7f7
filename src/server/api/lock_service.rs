//! The v3lock and v3election services, served natively: the waiting happens in the node's lock
//! queues (woken by the apply of the delete that frees the lock), not in a client-side recipe.
//! Keys are etcd's (`name/<lease hex>`), so etcdctl's recipes and native callers share queues.

use std::time::Duration;

use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::proto::v3electionpb as epb;
use super::proto::v3lockpb as lpb;
use super::{convert, Api, ApiError, Credentials, Stream_};
use crate::raft::{LockWake, NodeError};
use geolock_core::kv::{self, Compare, CompareResult, CompareTarget, RequestOp, ResponseOp};
use geolock_core::lock::{self, prefix_end, prefix_of};
use geolock_core::machine::{Command, Response as Done};
use geolock_core::watch::{Reply, WatchSpec};

fn created_at(key: &[u8], rev: i64) -> Compare {
    Compare { result: CompareResult::Equal, target: CompareTarget::Create(rev), key: key.to_vec(), range_end: vec![] }
}

impl Api {
    /// Create `key` (with `value`, attached to `lease`) unless it exists. Returns its create
    /// revision and, if it already existed, its value.
    async fn create_or_get(&self, key: &[u8], value: Vec<u8>, lease: i64) -> Result<(i64, Option<Vec<u8>>), ApiError> {
        let t = kv::TxnRequest {
            compare: vec![created_at(key, 0)],
            success: vec![RequestOp::Put(kv::PutRequest { key: key.to_vec(), value, lease, ..Default::default() })],
            failure: vec![RequestOp::Range(kv::RangeRequest { key: key.to_vec(), ..Default::default() })],
        };
        match self.propose(Command::Txn(t)).await? {
            (Done::Txn(r), rev) if r.succeeded => Ok((rev, None)),
            (Done::Txn(r), _) => match r.responses.into_iter().next() {
                Some(ResponseOp::Range(kv::RangeResponse { kvs, .. })) if !kvs.is_empty() => {
                    Ok((kvs[0].create_revision, Some(kvs[0].value.clone())))
                }
                _ => Err(ApiError::LockKeyVanished { key: String::from_utf8_lossy(key).into_owned() }),
            },
            (other, _) => Err(ApiError::UnexpectedApply { got: format!("{other:?}") }),
        }
    }

    /// Run `then` only if `key` still has create revision `rev`. Returns whether it ran.
    async fn if_created_at(&self, key: &[u8], rev: i64, then: RequestOp) -> Result<(bool, i64), ApiError> {
        let t = kv::TxnRequest { compare: vec![created_at(key, rev)], success: vec![then], failure: vec![] };
        match self.propose(Command::Txn(t)).await? {
            (Done::Txn(r), rev) => Ok((r.succeeded, rev)),
            (other, _) => Err(ApiError::UnexpectedApply { got: format!("{other:?}") }),
        }
    }

    /// Under a hierarchical prefix, a lock needs its parent held by the same lease.
    fn check_parent(&self, name: &[u8], lease: i64) -> Result<(), ApiError> {
        let Some(slash) = name.iter().rposition(|b| *b == b'/') else { return Ok(()) };
        let parent = &name[..slash];
        let governed = self.hierarchical.iter().any(|p| name.starts_with(p) && parent.starts_with(p));
        if !governed || parent.is_empty() {
            return Ok(());
        }
        let holder = self.node.read(|m| lock::holder(&m.kv, &prefix_of(parent)));
        if holder.is_some_and(|h| h.key == lock::key_of(parent, lease)) {
            return Ok(());
        }
        Err(ApiError::ParentNotHeld {
            name: String::from_utf8_lossy(name).into_owned(),
            parent: String::from_utf8_lossy(parent).into_owned(),
            lease,
        })
    }

    /// Queue `key` (created at `rev`) under `name`, wait to hold, and confirm the hold at a
    /// revision the cluster committed. If the caller goes away first, its key is deleted, as
    /// etcd's lock server deletes it.
    ///
    /// Being woken at the head of the queue is only where holding starts on this member's
    /// applied state, which may be behind (a follower catching up after a partition) or about
    /// to delete the key (its lease's revocation applied next). So every grant, on every path,
    /// is confirmed after a linearizable barrier: the key must still exist with create
    /// revision `rev` once this member has applied everything committed before the barrier
    /// ([`lock::confirm`]). The grant's revision is the one the answer's header carries.
    async fn acquire(&self, name: &[u8], key: &[u8], rev: i64) -> Result<lock::Grant, ApiError> {
        let lost = || ApiError::LockLost { key: String::from_utf8_lossy(key).into_owned() };
        let mut release = ReleaseOnDrop { api: Some(self.clone()), key: key.to_vec(), rev };
        let woken = self.node.wait_for_lock(&prefix_of(name), rev).await;
        if let Some(epoch) = self.node.fenced_epoch() {
            // The wait ended because the member was fenced: say so, not that the lock was lost.
            return Err(NodeError::Fenced { epoch }.into());
        }
        if woken == LockWake::Lost {
            release.api = None;
            return Err(lost());
        }
        self.node.linearize().await?;
        release.api = None;
        self.node.read(|m| lock::confirm(&m.kv, key, rev)).ok_or_else(lost)
    }
}

/// Deletes a waiter's key if its request ends before it holds.
struct ReleaseOnDrop {
    api: Option<Api>,
    key: Vec<u8>,
    rev: i64,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        let Some(api) = self.api.take() else { return };
        let (key, rev) = (std::mem::take(&mut self.key), self.rev);
        tokio::spawn(async move {
            let del = RequestOp::DeleteRange(kv::DeleteRangeRequest { key: key.clone(), ..Default::default() });
            if let Err(e) = api.if_created_at(&key, rev, del).await {
                tracing::debug!("releasing an abandoned lock key: {e}");
            }
        });
    }
}

fn check_name(name: &[u8]) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::InvalidArgument("lock or election name is not provided".into()));
    }
    // The key adds '/' and up to 16 hex digits.
    let max = geolock_core::limits::KEY_BYTES_MAX - 17;
    if name.len() > max {
        return Err(kv::KvError::KeyTooLarge { len: name.len() + 17, max: geolock_core::limits::KEY_BYTES_MAX }.into());
    }
    Ok(())
}

/// TTL of the lease granted for a Lock or Campaign that names none: etcd's lock and election
/// servers open a session for such a caller, whose lease has this TTL (`defaultSessionTTL`).
const SESSION_LEASE_TTL_S: i64 = 60;

impl Api {
    /// The lease a Lock or Campaign holds with: the caller's, or with lease 0, a new one of
    /// [`SESSION_LEASE_TTL_S`] granted as the caller's, as etcd's servers open a session. Like
    /// etcd's (whose session is orphaned at once), that lease is never renewed: the lock lasts
    /// until the caller unlocks or the lease's TTL runs out, waiting included.
    async fn lease_for(&self, lease: i64) -> Result<i64, ApiError> {
        if lease < 0 {
            return Err(ApiError::InvalidArgument(format!(
                "a lock or campaign needs a lease of 0 or more (got {lease})"
            )));
        }
        if lease > 0 {
            return Ok(lease);
        }
        let ttl_s = geolock_core::lease::Lessor::effective_ttl(&self.node.ttl_bounds(), SESSION_LEASE_TTL_S)?;
        match self.propose(Command::LeaseGrant { id: self.node.new_lease_id(), ttl_s }).await? {
            (Done::LeaseGrant { id, .. }, _) => Ok(id),
            (other, _) => Err(ApiError::UnexpectedApply { got: format!("{other:?}") }),
        }
    }

    /// The caller may read the queue of `name`: waiting in it tells who is ahead, which etcd's
    /// lock recipe learns with a Range of the prefix under the caller's own credentials.
    fn may_read_queue(&self, name: &[u8]) -> Result<(), ApiError> {
        let prefix = prefix_of(name);
        self.may_read(&prefix, &prefix_end(&prefix))
    }
}

#[tonic::async_trait]
impl lpb::lock_server::Lock for Api {
    async fn lock(&self, req: Request<lpb::LockRequest>) -> Result<Response<lpb::LockResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let r = req.into_inner();
        check_name(&r.name)?;
        api.may_read_queue(&r.name)?;
        let lease = api.lease_for(r.lease).await?;
        api.check_parent(&r.name, lease)?;
        let key = lock::key_of(&r.name, lease);
        let (rev, _) = api.create_or_get(&key, Vec::new(), lease).await?;
        let grant = api.acquire(&r.name, &key, rev).await?;
        Ok(Response::new(lpb::LockResponse {
            header: Some(self.header(grant.revision)),
            key,
            geolock_fencing_token: grant.token,
        }))
    }

    async fn unlock(&self, req: Request<lpb::UnlockRequest>) -> Result<Response<lpb::UnlockResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let key = req.into_inner().key;
        let (_, rev) = api.propose(Command::DeleteRange(kv::DeleteRangeRequest { key, ..Default::default() })).await?;
        Ok(Response::new(lpb::UnlockResponse { header: Some(self.header(rev)) }))
    }
}

fn leader_key(l: Option<epb::LeaderKey>) -> Result<epb::LeaderKey, ApiError> {
    l.ok_or_else(|| ApiError::InvalidArgument("\"leader\" field must be provided".into()))
}

#[tonic::async_trait]
impl epb::election_server::Election for Api {
    async fn campaign(&self, req: Request<epb::CampaignRequest>) -> Result<Response<epb::CampaignResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let r = req.into_inner();
        check_name(&r.name)?;
        api.may_read_queue(&r.name)?;
        let lease = api.lease_for(r.lease).await?;
        let key = lock::key_of(&r.name, lease);
        let (rev, existing) = api.create_or_get(&key, r.value.clone(), lease).await?;
        if existing.is_some_and(|v| v != r.value) {
            let put = RequestOp::Put(kv::PutRequest {
                key: key.clone(),
                value: r.value.clone(),
                lease,
                ..Default::default()
            });
            api.if_created_at(&key, rev, put).await?;
        }
        let grant = api.acquire(&r.name, &key, rev).await?;
        Ok(Response::new(epb::CampaignResponse {
            header: Some(self.header(grant.revision)),
            leader: Some(epb::LeaderKey { name: r.name, key, rev: grant.token, lease }),
        }))
    }

    async fn proclaim(&self, req: Request<epb::ProclaimRequest>) -> Result<Response<epb::ProclaimResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let r = req.into_inner();
        let l = leader_key(r.leader)?;
        let put =
            RequestOp::Put(kv::PutRequest { key: l.key.clone(), value: r.value, lease: l.lease, ..Default::default() });
        match api.if_created_at(&l.key, l.rev, put).await? {
            (true, rev) => Ok(Response::new(epb::ProclaimResponse { header: Some(self.header(rev)) })),
            (false, _) => Err(ApiError::ElectionNotLeader.into()),
        }
    }

    async fn leader(&self, req: Request<epb::LeaderRequest>) -> Result<Response<epb::LeaderResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let name = req.into_inner().name;
        check_name(&name)?;
        let prefix = prefix_of(&name);
        api.may_read(&prefix, &prefix_end(&prefix))?;
        self.node.linearize().await.map_err(ApiError::from)?;
        let (holder, rev) = self.node.read(|m| (lock::holder(&m.kv, &prefix_of(&name)), m.kv.current_rev()));
        let kv = holder.ok_or(ApiError::ElectionNoLeader)?;
        Ok(Response::new(epb::LeaderResponse { header: Some(self.header(rev)), kv: Some(convert::kv_out(kv)) }))
    }

    type ObserveStream = Stream_<epb::LeaderResponse>;

    async fn observe(&self, req: Request<epb::LeaderRequest>) -> Result<Response<Self::ObserveStream>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let name = req.into_inner().name;
        check_name(&name)?;
        let prefix = prefix_of(&name);
        api.may_read(&prefix, &prefix_end(&prefix))?;
        let (tx, mut changes) = mpsc::channel::<Reply>(geolock_core::limits::WATCH_STREAM_QUEUE_MAX);
        let stream = self.node.watch_open(tx);
        // Watch first, then read: a change between the two arrives as an event.
        self.node.watch_create(
            stream,
            WatchSpec { key: prefix.clone(), range_end: prefix_end(&prefix), ..Default::default() },
        );
        let api = self.clone();
        let out = super::async_stream_from(move |out| async move {
            let _close = super::watch_service::CloseOnDrop(api.node.clone(), stream);
            let mut last: Option<(Vec<u8>, i64)> = None;
            loop {
                let (holder, rev) = api.node.read(|m| (lock::holder(&m.kv, &prefix), m.kv.current_rev()));
                if let Some(kv) = holder {
                    let now = (kv.key.clone(), kv.mod_revision);
                    if last.as_ref() != Some(&now) {
                        last = Some(now);
                        let resp = epb::LeaderResponse { header: Some(api.header(rev)), kv: Some(convert::kv_out(kv)) };
                        if out.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                }
                let behind = api.node.watch_catch_up(stream);
                tokio::select! {
                    change = changes.recv() => if change.is_none() { return },
                    _ = tokio::time::sleep(Duration::from_millis(5)), if behind => {}
                    _ = out.closed() => return,
                }
            }
        });
        Ok(Response::new(out))
    }

    async fn resign(&self, req: Request<epb::ResignRequest>) -> Result<Response<epb::ResignResponse>, Status> {
        let api = self.as_caller(&Credentials::of(&req)).await?;
        let l = leader_key(req.into_inner().leader)?;
        let del = RequestOp::DeleteRange(kv::DeleteRangeRequest { key: l.key.clone(), ..Default::default() });
        let (_, rev) = api.if_created_at(&l.key, l.rev, del).await?;
        Ok(Response::new(epb::ResignResponse { header: Some(self.header(rev)) }))
    }
}
