//! The replicated state machine: what one committed command does to the key space and the
//! leases. Deterministic and pure (time is an argument, storage writes go into a batch), so every
//! replica that applies the same log reaches the same state, and the model-based tests can drive
//! it without Raft, disks or clocks.

use serde::{Deserialize, Serialize};

use crate::auth::{Access, AuthError, AuthRequest, AuthStore, Caller};
use crate::kv::{
    self, DeleteRangeRequest, DeleteRangeResponse, Event, KvError, Mvcc, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseOp, Rev, TxnRequest, TxnResponse, WriteEffects,
};
use crate::lease::{LeaseError, Lessor};
use crate::storage::{Engine, StorageError, WriteBatch};

/// A command carried by a Raft log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact {
        revision: Rev,
    },
    /// Create a lease; the ID and the bounded TTL were chosen before proposing.
    LeaseGrant {
        id: i64,
        ttl_s: i64,
    },
    /// Remove a lease and delete its keys, on request or because the leader saw it expire.
    LeaseRevoke {
        id: i64,
    },
    /// A failover's new primary enters revision epoch `epoch` ([`Mvcc::enter_epoch`]): its first
    /// entry, before any write.
    EnterEpoch {
        epoch: u64,
    },
    /// A change to users, roles, permissions or whether authentication is on; always inside a
    /// [`Command::Client`].
    Auth(AuthRequest),
    /// A client's request with its caller as the member that received it established. While
    /// authentication is on it is applied only if that caller may make it, decided where it is
    /// applied, as etcd's auth applier decides: a permission revoked after the request was
    /// checked at the API still counts. Commands outside one are the members' own (lease
    /// expiry, a new epoch), trusted.
    Client {
        caller: Option<Caller>,
        request: Box<Command>,
    },
}

impl std::fmt::Display for Command {
    /// A short description for logs (openraft's entries show their command so).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Put(p) => write!(f, "put {} bytes", p.key.len() + p.value.len()),
            Command::DeleteRange(_) => f.write_str("delete-range"),
            Command::Txn(t) => write!(f, "txn {}+{} ops", t.success.len(), t.failure.len()),
            Command::Compact { revision } => write!(f, "compact {revision}"),
            Command::LeaseGrant { id, ttl_s } => write!(f, "lease-grant {id:x} {ttl_s}s"),
            Command::LeaseRevoke { id } => write!(f, "lease-revoke {id:x}"),
            Command::EnterEpoch { epoch } => write!(f, "enter-epoch {epoch}"),
            Command::Auth(_) => f.write_str("auth"),
            Command::Client { request, .. } => request.fmt(f),
        }
    }
}

/// What a command produced, besides its events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact,
    LeaseGrant {
        id: i64,
        ttl_s: i64,
    },
    LeaseRevoke,
    /// The key space is in the new epoch, at [`Applied::revision`]; every watcher must start again.
    EnterEpoch,
    /// A log entry that carried no command (blank or membership).
    Nothing,
    /// The auth store changed, or was already as asked.
    Auth,
    /// A user was authenticated: `token` is the prefix the proposer chose, to which the member
    /// applying it appends the entry's log index (etcd's simple token `<prefix>.<index>`).
    Authenticated {
        user: String,
        token: String,
    },
}

/// Why a command changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ApplyError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// The result of applying one command: the revision after it and its response or error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub revision: Rev,
    pub result: Result<Response, ApplyError>,
}

/// Key space, leases and the auth store.
#[derive(Clone, Debug, Default)]
pub struct Machine {
    pub kv: Mvcc,
    pub leases: Lessor,
    pub auth: AuthStore,
}

impl Machine {
    /// An empty machine.
    pub fn new() -> Self {
        Machine { kv: Mvcc::new(), leases: Lessor::new(), auth: AuthStore::new() }
    }

    /// Rebuild from storage, re-attaching every live key to its lease.
    pub fn load(engine: &dyn Engine) -> Result<Self, StorageError> {
        let kv = Mvcc::load(engine)?;
        let mut leases = Lessor::load(engine)?;
        let all = RangeRequest { key: vec![0], range_end: vec![0], limit: 0, ..Default::default() };
        let mut from = vec![0];
        // Page through the keys; RANGE_KEYS_MAX bounds each page.
        loop {
            let page = kv
                .range(&RangeRequest { key: from.clone(), keys_only: true, ..all.clone() })
                .map_err(|e| StorageError::Corrupt { what: "key index", detail: e.to_string() })?;
            for item in &page.kvs {
                if item.lease != 0 {
                    leases.move_key(&item.key, 0, item.lease);
                }
            }
            match (page.more, page.kvs.last()) {
                (true, Some(last)) => {
                    from = last.key.clone();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(Machine { kv, leases, auth: AuthStore::load(engine)? })
    }

    /// Serve a read at the state as applied so far.
    pub fn range(&self, r: &RangeRequest) -> Result<RangeResponse, KvError> {
        self.kv.range(r)
    }

    /// Apply one committed command. `now_ms` only feeds the leader's volatile lease deadlines.
    pub fn apply(&mut self, cmd: &Command, now_ms: u64, batch: &mut WriteBatch, events: &mut Vec<Event>) -> Applied {
        let result = self.apply_inner(cmd, now_ms, batch, events);
        let revision = self.kv.finish(batch);
        Applied { revision, result }
    }

    fn apply_inner(
        &mut self,
        cmd: &Command,
        now_ms: u64,
        batch: &mut WriteBatch,
        events: &mut Vec<Event>,
    ) -> Result<Response, ApplyError> {
        // Apply is total: a command that reached the log without passing the API's validation
        // (forwarded by a peer, written by an older or buggy member) is refused here, the same
        // on every replica, rather than trusted. The checks below it rely on what this rules
        // out (a Txn that deletes a key and then puts it with ignore_value would otherwise fail
        // half-way, on every replica).
        validate(cmd)?;
        match cmd {
            Command::Put(p) => {
                self.check_put(p, false)?;
                let mut fx = WriteEffects::default();
                let r = self.kv.put(p, batch, &mut fx)?;
                self.absorb(fx, events);
                Ok(Response::Put(r))
            }
            Command::DeleteRange(d) => {
                let mut fx = WriteEffects::default();
                let r = self.kv.delete_range(d, batch, &mut fx);
                self.absorb(fx, events);
                Ok(Response::DeleteRange(r))
            }
            Command::Txn(t) => {
                let path = self.txn_path(t);
                self.check_txn(t, &path, &mut 0, &mut Vec::new())?;
                let mut fx = WriteEffects::default();
                let r = self.run_txn(t, &path, &mut 0, batch, &mut fx);
                self.absorb(fx, events);
                Ok(Response::Txn(r))
            }
            Command::Compact { revision } => {
                self.kv.compact(*revision, batch)?;
                Ok(Response::Compact)
            }
            Command::LeaseGrant { id, ttl_s } => {
                self.leases.grant(*id, *ttl_s, now_ms, batch)?;
                Ok(Response::LeaseGrant { id: *id, ttl_s: *ttl_s })
            }
            Command::LeaseRevoke { id } => {
                let keys = self.leases.revoke(*id, batch)?;
                let mut fx = WriteEffects::default();
                for key in keys {
                    self.kv.delete_range(&DeleteRangeRequest { key, ..Default::default() }, batch, &mut fx);
                }
                // The lease is gone already; its keys' moves need no mirroring.
                events.append(&mut fx.events);
                Ok(Response::LeaseRevoke)
            }
            Command::EnterEpoch { epoch } => {
                self.kv.enter_epoch(*epoch, batch)?;
                Ok(Response::EnterEpoch)
            }
            // Only inside a Client command, which carries the caller it needs.
            Command::Auth(req) => self.apply_auth(req, None, batch),
            Command::Client { caller, request } => {
                let who = caller.as_ref();
                if let Command::Auth(req) = &**request {
                    return self.apply_auth(req, who, batch);
                }
                self.authorize(request, who)?;
                self.apply_inner(request, now_ms, batch, events)
            }
        }
    }

    /// Apply what a witness keeps of `cmd`: the auth store and nothing else. A witness holds no
    /// key space, but it answers Cluster, Maintenance and Auth requests, and must refuse them
    /// to callers who are not root just as a data-bearing member does.
    pub fn apply_auth_only(&mut self, cmd: &Command, batch: &mut WriteBatch) -> Result<Response, ApplyError> {
        match cmd {
            Command::Client { caller, request } => match &**request {
                Command::Auth(req) => self.apply_auth(req, caller.as_ref(), batch),
                _ => Ok(Response::Nothing),
            },
            Command::Auth(req) => self.apply_auth(req, None, batch),
            _ => Ok(Response::Nothing),
        }
    }

    fn apply_auth(
        &mut self,
        req: &AuthRequest,
        who: Option<&Caller>,
        batch: &mut WriteBatch,
    ) -> Result<Response, ApplyError> {
        Ok(match self.auth.apply(req, who, batch)? {
            Some(user) => {
                let AuthRequest::Authenticate { token_prefix, .. } = req else {
                    unreachable!("only Authenticate names a user")
                };
                Response::Authenticated { user, token: token_prefix.clone() }
            }
            None => Response::Auth,
        })
    }

    /// Whether `who` may make the client request `cmd`, by etcd's auth applier's rules: a Put
    /// needs WRITE on its key, and READ too with `prev_kv`; a Put with a lease, and a lease's
    /// revocation, need WRITE on every key already attached to the lease (or root); a
    /// DeleteRange needs WRITE on its range, and READ with `prev_kv`; a Txn needs READ on every
    /// compared range and what each operation of both branches needs, nested Txns too. A
    /// compaction and a lease grant need a user: etcd 3.6 asks for one at its API for lease
    /// grants and for none for compaction, but an anonymous caller must not be able to erase
    /// the history every watcher resumes from (the README lists this difference).
    pub fn authorize(&self, cmd: &Command, who: Option<&Caller>) -> Result<(), AuthError> {
        if !self.auth.enabled() {
            return Ok(());
        }
        match cmd {
            Command::Put(p) => self.authorize_put(p, who),
            Command::DeleteRange(d) => self.authorize_delete(d, who),
            Command::Txn(t) => self.authorize_txn(t, who),
            Command::LeaseRevoke { id } => self.authorize_lease_keys(*id, who),
            Command::Compact { .. } | Command::LeaseGrant { .. } => self.auth.check_authenticated(who),
            // Checked by the auth store as it applies them.
            Command::Auth(_) => Ok(()),
            // Members' own commands; a client never sends them.
            Command::EnterEpoch { .. } | Command::Client { .. } => self.auth.check_admin(who),
        }
    }

    fn authorize_put(&self, p: &PutRequest, who: Option<&Caller>) -> Result<(), AuthError> {
        self.auth.check(who, Access::Write, &p.key, &[])?;
        if p.lease != 0 {
            self.authorize_lease_keys(p.lease, who)?;
        }
        if p.prev_kv {
            self.auth.check(who, Access::Read, &p.key, &[])?;
        }
        Ok(())
    }

    fn authorize_delete(&self, d: &DeleteRangeRequest, who: Option<&Caller>) -> Result<(), AuthError> {
        self.auth.check(who, Access::Write, &d.key, &d.range_end)?;
        if d.prev_kv {
            self.auth.check(who, Access::Read, &d.key, &d.range_end)?;
        }
        Ok(())
    }

    /// What a Txn needs; also checked at the API for a read-only Txn, which is served without a
    /// log entry.
    pub fn authorize_txn(&self, t: &TxnRequest, who: Option<&Caller>) -> Result<(), AuthError> {
        for c in &t.compare {
            self.auth.check(who, Access::Read, &c.key, &c.range_end)?;
        }
        for op in t.success.iter().chain(&t.failure) {
            match op {
                RequestOp::Range(r) => self.auth.check(who, Access::Read, &r.key, &r.range_end)?,
                RequestOp::Put(p) => self.authorize_put(p, who)?,
                RequestOp::DeleteRange(d) => self.authorize_delete(d, who)?,
                RequestOp::Txn(inner) => self.authorize_txn(inner, who)?,
            }
        }
        Ok(())
    }

    /// WRITE on every key attached to the lease, or root (etcd's `checkLeasePuts`, and its
    /// `checkLeaseRenew` for keep-alives): whoever may revoke a lease, renew it, or tie its fate
    /// to more keys, decides when the keys on it go. Even a lease without keys needs a user: an
    /// anonymous caller keeping others' leases alive would keep their locks held.
    pub fn authorize_lease_keys(&self, id: i64, who: Option<&Caller>) -> Result<(), AuthError> {
        self.auth.check_authenticated(who)?;
        let Some(lease) = self.leases.get(id) else { return Ok(()) };
        if self.auth.check_admin(who).is_ok() {
            return Ok(());
        }
        lease.keys.iter().try_for_each(|k| self.auth.check(who, Access::Write, k, &[]))
    }

    /// Whether `who` may read `[key, range_end)` (a Range, a Watch, a read-only Txn's parts).
    pub fn authorize_read(&self, who: Option<&Caller>, key: &[u8], range_end: &[u8]) -> Result<(), AuthError> {
        self.auth.check(who, Access::Read, key, range_end)
    }

    /// Run a Txn that only reads, without a log entry.
    pub fn read_only_txn(&self, t: &TxnRequest) -> Result<TxnResponse, KvError> {
        let ok = t.compare.iter().all(|c| self.kv.compare(c));
        let mut responses = Vec::new();
        for op in if ok { &t.success } else { &t.failure } {
            responses.push(match op {
                RequestOp::Range(r) => {
                    self.kv.check_txn_range_rev(r.revision)?;
                    ResponseOp::Range(self.kv.range(r)?)
                }
                RequestOp::Txn(inner) => ResponseOp::Txn(self.read_only_txn(inner)?),
                RequestOp::Put(_) | RequestOp::DeleteRange(_) => {
                    unreachable!("read_only_txn is called only for Txns that do not write")
                }
            });
        }
        Ok(TxnResponse { succeeded: ok, responses })
    }

    fn absorb(&mut self, mut fx: WriteEffects, events: &mut Vec<Event>) {
        for m in &fx.lease_moves {
            self.leases.move_key(&m.key, m.from, m.to);
        }
        events.append(&mut fx.events);
    }

    /// The checks of a Put that need the state, in etcd's order: a lone Put's lease first, then
    /// the key `ignore_value`/`ignore_lease` need (etcd's `Put`); in a Txn the key first, then
    /// the lease (etcd's `checkPut`).
    fn check_put(&self, p: &PutRequest, in_txn: bool) -> Result<(), ApplyError> {
        let lease = || {
            if p.lease != 0 && !self.leases.contains(p.lease) {
                return Err(KvError::LeaseNotFound { lease: p.lease });
            }
            Ok(())
        };
        if !in_txn {
            lease()?;
        }
        if (p.ignore_value || p.ignore_lease) && self.kv.get(&p.key).is_none() {
            return Err(KvError::KeyNotFound.into());
        }
        if in_txn {
            lease()?;
        }
        let max = crate::limits::KEYSPACE_BYTES_MAX;
        let bytes = self.kv.bytes() + (p.key.len() + p.value.len()) as u64;
        if bytes > max {
            return Err(KvError::NoSpace { bytes, max }.into());
        }
        Ok(())
    }

    /// Which branch every Txn (nested ones too) takes, decided on the state before any of its
    /// operations runs, as etcd decides it. Pre-order: the outer Txn first.
    fn txn_path(&self, t: &TxnRequest) -> Vec<bool> {
        let mut path = Vec::new();
        self.walk_path(t, &mut path);
        path
    }

    fn walk_path(&self, t: &TxnRequest, path: &mut Vec<bool>) {
        let ok = t.compare.iter().all(|c| self.kv.compare(c));
        path.push(ok);
        for op in if ok { &t.success } else { &t.failure } {
            if let RequestOp::Txn(inner) = op {
                self.walk_path(inner, path);
            }
        }
    }

    /// Check every operation the Txn will run, in the order it runs them, so that the run
    /// cannot fail half-way. `deleted` holds the ranges deleted earlier in the Txn: a put with
    /// `ignore_value` or `ignore_lease` after a delete of its key (which etcd's duplicate-key rule
    /// lets through when the delete runs to the end, `range_end` `\0`) finds no key. etcd's own
    /// apply panics there; here the whole Txn is refused.
    fn check_txn<'t>(
        &self,
        t: &'t TxnRequest,
        path: &[bool],
        at: &mut usize,
        deleted: &mut Vec<&'t DeleteRangeRequest>,
    ) -> Result<(), ApplyError> {
        let ok = path[*at];
        *at += 1;
        for op in if ok { &t.success } else { &t.failure } {
            match op {
                RequestOp::Range(r) => {
                    self.kv.check_txn_range_rev(r.revision)?;
                }
                RequestOp::Put(p) => {
                    self.check_put(p, true)?;
                    let gone = deleted.iter().any(|d| kv::in_range(&p.key, &d.key, &d.range_end));
                    if (p.ignore_value || p.ignore_lease) && gone {
                        return Err(KvError::KeyNotFound.into());
                    }
                }
                RequestOp::DeleteRange(d) => deleted.push(d),
                RequestOp::Txn(inner) => self.check_txn(inner, path, at, deleted)?,
            }
        }
        Ok(())
    }

    fn run_txn(
        &mut self,
        t: &TxnRequest,
        path: &[bool],
        at: &mut usize,
        batch: &mut WriteBatch,
        fx: &mut WriteEffects,
    ) -> TxnResponse {
        let ok = path[*at];
        *at += 1;
        let mut responses = Vec::new();
        for op in if ok { &t.success } else { &t.failure } {
            responses.push(match op {
                RequestOp::Range(r) => {
                    ResponseOp::Range(self.kv.range(r).expect("revision checked before the txn ran"))
                }
                RequestOp::Put(p) => {
                    ResponseOp::Put(self.kv.put(p, batch, fx).expect("put checked before the txn ran"))
                }
                RequestOp::DeleteRange(d) => ResponseOp::DeleteRange(self.kv.delete_range(d, batch, fx)),
                RequestOp::Txn(inner) => ResponseOp::Txn(self.run_txn(inner, path, at, batch, fx)),
            });
        }
        TxnResponse { succeeded: ok, responses }
    }
}

/// Validate a command before it is proposed: the checks that need no state, etcd's.
pub fn validate(cmd: &Command) -> Result<(), ApplyError> {
    match cmd {
        Command::Put(p) => Ok(kv::check_put(p)?),
        Command::DeleteRange(d) => Ok(kv::check_key(&d.key)?),
        Command::Txn(t) => Ok(kv::validate_txn(t)?),
        Command::Auth(req) => Ok(AuthStore::validate(req)?),
        // One caller per request: a client request inside another is nobody's.
        Command::Client { request, .. } if matches!(**request, Command::Client { .. }) => {
            Err(AuthError::InvalidMgmt.into())
        }
        Command::Client { request, .. } => validate(request),
        Command::Compact { .. }
        | Command::LeaseGrant { .. }
        | Command::LeaseRevoke { .. }
        | Command::EnterEpoch { .. } => Ok(()),
    }
}

#[cfg(test)]
#[path = "machine_model_test.rs"]
mod model_test;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{Compare, CompareResult, CompareTarget, EventKind};

    fn put(k: &str, v: &str) -> PutRequest {
        PutRequest { key: k.into(), value: v.into(), ..Default::default() }
    }

    fn apply(m: &mut Machine, cmd: Command) -> (Applied, Vec<Event>) {
        let mut b = WriteBatch::default();
        let mut ev = Vec::new();
        let a = m.apply(&cmd, 0, &mut b, &mut ev);
        (a, ev)
    }

    #[test]
    fn txn_branches_on_compares_taken_before_it_runs() {
        let mut m = Machine::new();
        apply(&mut m, Command::Put(put("a", "1")));
        let guard = |v: &str| Compare {
            result: CompareResult::Equal,
            target: CompareTarget::Value(v.into()),
            key: b"a".to_vec(),
            range_end: vec![],
        };
        // The nested compare sees "a" = "1" although the outer branch overwrote it first.
        let t = TxnRequest {
            compare: vec![guard("1")],
            success: vec![
                RequestOp::Put(put("a", "2")),
                RequestOp::Txn(TxnRequest {
                    compare: vec![guard("1")],
                    success: vec![RequestOp::Put(put("b", "x"))],
                    failure: vec![],
                }),
                RequestOp::Range(RangeRequest { key: b"a".to_vec(), ..Default::default() }),
            ],
            failure: vec![],
        };
        let (a, ev) = apply(&mut m, Command::Txn(t));
        let Ok(Response::Txn(r)) = a.result else { panic!("{a:?}") };
        assert!(r.succeeded);
        assert_eq!(a.revision, 3);
        assert_eq!(ev.len(), 2);
        assert!(ev.iter().all(|e| e.kv.mod_revision == 3 && e.kind == EventKind::Put));
        let ResponseOp::Range(read) = &r.responses[2] else { panic!() };
        assert_eq!(read.kvs[0].value, b"2", "a txn reads its own writes");
    }

    #[test]
    fn a_failing_txn_changes_nothing() {
        let mut m = Machine::new();
        let t = TxnRequest {
            compare: vec![],
            success: vec![RequestOp::Put(put("a", "1")), RequestOp::Put(PutRequest { lease: 99, ..put("b", "1") })],
            failure: vec![],
        };
        let (a, ev) = apply(&mut m, Command::Txn(t));
        assert_eq!(a.result, Err(ApplyError::Kv(KvError::LeaseNotFound { lease: 99 })));
        assert_eq!(a.revision, 1);
        assert!(ev.is_empty());
        assert!(m.kv.get(b"a").is_none());
    }

    #[test]
    fn revoke_deletes_attached_keys_in_one_revision() {
        let mut m = Machine::new();
        apply(&mut m, Command::LeaseGrant { id: 5, ttl_s: 10 });
        apply(&mut m, Command::Put(PutRequest { lease: 5, ..put("a", "1") }));
        apply(&mut m, Command::Put(PutRequest { lease: 5, ..put("b", "1") }));
        apply(&mut m, Command::Put(put("b", "2"))); // detached again
        let (a, ev) = apply(&mut m, Command::LeaseRevoke { id: 5 });
        assert_eq!(a.result, Ok(Response::LeaseRevoke));
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, EventKind::Delete);
        assert!(m.kv.get(b"a").is_none() && m.kv.get(b"b").is_some());
    }

    /// Issue 12, fault 8: a Txn that deletes a key and then puts it with ignore_value passes
    /// every check made against the state before it, and would fail half-way; reaching apply
    /// without the API's validation, it is refused and changes nothing.
    #[test]
    fn an_unvalidated_txn_that_would_fail_half_way_is_refused_whole() {
        let mut m = Machine::new();
        apply(&mut m, Command::Put(put("k", "1")));
        let t = TxnRequest {
            compare: vec![],
            success: vec![
                RequestOp::DeleteRange(DeleteRangeRequest { key: b"k".to_vec(), ..Default::default() }),
                RequestOp::Put(PutRequest { ignore_value: true, ..put("k", "") }),
            ],
            failure: vec![],
        };
        let (a, ev) = apply(&mut m, Command::Txn(t));
        assert_eq!(a.result, Err(ApplyError::Kv(KvError::DuplicateKey)));
        assert_eq!((a.revision, ev.len()), (2, 0));
        assert_eq!(m.kv.get(b"k").unwrap().value, b"1");
    }

    /// The same kind through the door etcd's duplicate-key rule leaves open: a delete to the
    /// end (`range_end` `\0`) does not conflict with a later put there, so validation passes,
    /// and the put with ignore_value finds its key gone. etcd's apply panics on it.
    #[test]
    fn a_put_with_ignore_value_after_a_delete_to_the_end_is_refused_whole() {
        let mut m = Machine::new();
        apply(&mut m, Command::Put(put("k", "1")));
        let t = TxnRequest {
            compare: vec![],
            success: vec![
                RequestOp::Txn(TxnRequest {
                    success: vec![RequestOp::DeleteRange(DeleteRangeRequest {
                        key: b"a".to_vec(),
                        range_end: vec![0],
                        ..Default::default()
                    })],
                    ..Default::default()
                }),
                RequestOp::Txn(TxnRequest {
                    success: vec![RequestOp::Put(PutRequest { ignore_value: true, ..put("k", "") })],
                    ..Default::default()
                }),
            ],
            failure: vec![],
        };
        assert_eq!(validate(&Command::Txn(t.clone())), Ok(()));
        let (a, ev) = apply(&mut m, Command::Txn(t));
        assert_eq!(a.result, Err(ApplyError::Kv(KvError::KeyNotFound)));
        assert_eq!((a.revision, ev.len()), (2, 0));
        assert_eq!(m.kv.get(b"k").unwrap().value, b"1");
    }

    #[test]
    fn validation_before_raft() {
        assert_eq!(validate(&Command::Put(put("", "x"))), Err(KvError::EmptyKey.into()));
        let p = PutRequest { ignore_value: true, ..put("a", "x") };
        assert_eq!(validate(&Command::Put(p)), Err(KvError::ValueProvided.into()));
    }

    #[test]
    fn load_reattaches_keys_to_leases() {
        let engine = crate::storage::MemEngine::new();
        let mut m = Machine::new();
        let mut b = WriteBatch::default();
        let mut ev = Vec::new();
        m.apply(&Command::LeaseGrant { id: 5, ttl_s: 10 }, 0, &mut b, &mut ev);
        m.apply(&Command::Put(PutRequest { lease: 5, ..put("a", "1") }), 0, &mut b, &mut ev);
        engine.write(b, false).unwrap();
        let l = Machine::load(&*engine).unwrap();
        assert_eq!(l.leases.get(5).unwrap().keys.len(), 1);
    }

    /// A machine with auth on: `root`, and `alice` who may write `w/` and read `r/`.
    fn with_auth() -> (Machine, Caller, Caller) {
        use crate::auth::{PermType, Permission};
        let mut m = Machine::new();
        let prefix = |t, k: &str| {
            let mut range_end = k.as_bytes().to_vec();
            *range_end.last_mut().unwrap() += 1;
            Permission { perm_type: t, key: k.into(), range_end }
        };
        let (w, r) = (prefix(PermType::Write, "w/"), prefix(PermType::Read, "r/"));
        for req in [
            AuthRequest::UserAdd { name: "root".into(), password_hash: Some("h".into()) },
            AuthRequest::UserGrantRole { user: "root".into(), role: "root".into() },
            AuthRequest::UserAdd { name: "alice".into(), password_hash: Some("h".into()) },
            AuthRequest::RoleAdd { name: "a".into() },
            AuthRequest::RoleGrantPermission { name: "a".into(), permission: w },
            AuthRequest::RoleGrantPermission { name: "a".into(), permission: r },
            AuthRequest::UserGrantRole { user: "alice".into(), role: "a".into() },
            AuthRequest::Enable,
        ] {
            let (a, _) = apply(&mut m, Command::Client { caller: None, request: Box::new(Command::Auth(req)) });
            assert!(a.result.is_ok(), "{a:?}");
        }
        let rev = m.auth.revision();
        (m, Caller { user: "root".into(), revision: rev }, Caller { user: "alice".into(), revision: rev })
    }

    fn as_client(who: &Caller, cmd: Command) -> Command {
        Command::Client { caller: Some(who.clone()), request: Box::new(cmd) }
    }

    fn denied(a: &Applied) -> bool {
        a.result == Err(ApplyError::Auth(AuthError::PermissionDenied))
    }

    /// etcd's published bypasses, and their kin: a `prev_kv` on a write the caller may make
    /// returns what it may not read, and a put onto someone else's lease lets its revocation
    /// delete keys the caller may not write.
    #[test]
    fn writes_need_read_for_prev_kv_and_write_on_every_key_of_their_lease() {
        let (mut m, root, alice) = with_auth();
        apply(&mut m, as_client(&root, Command::LeaseGrant { id: 7, ttl_s: 60 }));
        apply(&mut m, as_client(&root, Command::Put(PutRequest { lease: 7, ..put("secret", "s") })));
        let writes = [
            Command::Put(PutRequest { prev_kv: true, ..put("w/a", "1") }),
            Command::Put(PutRequest { lease: 7, ..put("w/a", "1") }),
            Command::DeleteRange(DeleteRangeRequest { key: b"w/".to_vec(), range_end: b"w0".to_vec(), prev_kv: true }),
            Command::Txn(TxnRequest {
                success: vec![RequestOp::Put(PutRequest { prev_kv: true, ..put("w/a", "1") })],
                ..Default::default()
            }),
            Command::Txn(TxnRequest {
                failure: vec![RequestOp::Put(PutRequest { lease: 7, ..put("w/b", "1") })],
                ..Default::default()
            }),
            Command::Txn(TxnRequest {
                compare: vec![Compare {
                    result: CompareResult::Equal,
                    target: CompareTarget::Value(b"s".to_vec()),
                    key: b"secret".to_vec(),
                    range_end: vec![],
                }],
                success: vec![RequestOp::Put(put("w/leak", "yes"))],
                failure: vec![],
            }),
            Command::LeaseRevoke { id: 7 },
        ];
        for w in writes {
            let (a, ev) = apply(&mut m, as_client(&alice, w.clone()));
            assert!(denied(&a) && ev.is_empty(), "{w:?}: {a:?}");
        }
        assert_eq!(m.kv.get(b"secret").unwrap().value, b"s");
        assert!(m.kv.get(b"w/a").is_none() && m.kv.get(b"w/leak").is_none());
        let (a, _) = apply(&mut m, as_client(&alice, Command::Put(put("w/a", "1"))));
        assert!(matches!(a.result, Ok(Response::Put(_))), "{a:?}");
        let (a, _) = apply(&mut m, as_client(&root, Command::LeaseRevoke { id: 7 }));
        assert_eq!(a.result, Ok(Response::LeaseRevoke));
    }

    /// The check is made where the entry is applied: a request checked under a revision that
    /// a later change superseded is refused, and one without a caller is refused while auth is on.
    #[test]
    fn a_request_from_before_an_auth_change_or_from_nobody_is_refused_at_apply() {
        let (mut m, root, alice) = with_auth();
        let (a, _) = apply(&mut m, as_client(&root, Command::Auth(AuthRequest::RoleAdd { name: "b".into() })));
        assert_eq!(a.result, Ok(Response::Auth));
        let (a, _) = apply(&mut m, as_client(&alice, Command::Put(put("w/a", "1"))));
        assert_eq!(a.result, Err(ApplyError::Auth(AuthError::OldRevision)));
        let (a, _) = apply(&mut m, Command::Client { caller: None, request: Box::new(Command::Put(put("w/a", "1"))) });
        assert_eq!(a.result, Err(ApplyError::Auth(AuthError::UserEmpty)));
        assert!(m.kv.get(b"w/a").is_none());
        // The members' own commands are not a client's: a lease expiry needs no caller.
        apply(&mut m, Command::LeaseGrant { id: 9, ttl_s: 60 });
        assert_eq!(apply(&mut m, Command::LeaseRevoke { id: 9 }).0.result, Ok(Response::LeaseRevoke));
    }

    /// What etcd lets anyone do, geolock asks a user for: compacting the history, granting a
    /// lease, and renewing or revoking one, even one with no keys.
    #[test]
    fn compaction_and_leases_need_a_user() {
        let (mut m, root, alice) = with_auth();
        apply(&mut m, as_client(&root, Command::LeaseGrant { id: 7, ttl_s: 60 }));
        let nobody = |cmd| Command::Client { caller: None, request: Box::new(cmd) };
        for cmd in
            [Command::Compact { revision: 1 }, Command::LeaseGrant { id: 8, ttl_s: 60 }, Command::LeaseRevoke { id: 7 }]
        {
            let (a, _) = apply(&mut m, nobody(cmd.clone()));
            assert_eq!(a.result, Err(ApplyError::Auth(AuthError::UserEmpty)), "{cmd:?}");
        }
        assert_eq!(m.authorize_lease_keys(7, None), Err(AuthError::UserEmpty), "a keep-alive of a keyless lease");
        assert_eq!(m.authorize_lease_keys(7, Some(&alice)), Ok(()));
        assert!(m.leases.get(7).is_some() && m.leases.get(8).is_none());
        assert_eq!(
            apply(&mut m, as_client(&alice, Command::LeaseRevoke { id: 7 })).0.result,
            Ok(Response::LeaseRevoke)
        );
    }

    /// A witness keeps the auth store and nothing else, so it refuses non-root callers as
    /// every member does.
    #[test]
    fn a_witness_applies_auth_changes_and_nothing_else() {
        let (mut m, root, alice) = with_auth();
        let mut w = Machine::new();
        let mut b = WriteBatch::default();
        // Each caller was checked at the auth revision before any change: the change comes last.
        let cmds = [
            as_client(&root, Command::Put(put("w/a", "1"))),
            as_client(&alice, Command::Auth(AuthRequest::RoleAdd { name: "c".into() })),
            as_client(&root, Command::Auth(AuthRequest::RoleAdd { name: "b".into() })),
        ];
        // The witness starts where the machine stands, as from a snapshot: replay its store.
        w.auth = m.auth.clone();
        let witnessed: Vec<_> = cmds.iter().map(|c| w.apply_auth_only(c, &mut b)).collect();
        let applied: Vec<_> = cmds.iter().map(|c| apply(&mut m, c.clone()).0.result).collect();
        assert_eq!(witnessed[0], Ok(Response::Nothing), "a put leaves a witness's (empty) key space alone");
        assert!(applied[0].is_ok(), "{:?}", applied[0]);
        assert_eq!(witnessed[1], Err(ApplyError::Auth(AuthError::PermissionDenied)));
        assert_eq!(applied[1], witnessed[1]);
        assert_eq!(witnessed[2], Ok(Response::Auth));
        assert_eq!(applied[2], witnessed[2]);
        assert_eq!(w.auth, m.auth);
        assert!(w.kv.get(b"w/a").is_none() && m.kv.get(b"w/a").is_some());
    }
}
