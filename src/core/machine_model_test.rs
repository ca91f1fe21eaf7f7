//! Model-based test of the state machine: random sequences of puts, deletes, Txns, compactions,
//! lease grants and revokes, revision epochs, applied both to [`Machine`] and to a deliberately naive model of
//! etcd's MVCC (a full copy of the key space per revision), must give the same responses, the
//! same events and the same reads at every revision.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::kv::{epoch_of, epoch_start, Compare, CompareResult, CompareTarget, Event, EventKind, KeyValue, EPOCH_MAX};
use crate::storage::WriteBatch;

type State = BTreeMap<Vec<u8>, KeyValue>;

#[derive(Clone, Debug, Default)]
struct Model {
    /// (revision, key space after it), oldest first; starts at revision 1, empty.
    history: Vec<(Rev, State)>,
    compacted: Rev,
    leases: BTreeSet<i64>,
}

fn in_range(k: &[u8], key: &[u8], end: &[u8]) -> bool {
    if end.is_empty() {
        k == key
    } else if end == [0] {
        k >= key
    } else {
        k >= key && k < end
    }
}

impl Model {
    fn new() -> Self {
        // etcd's compact revision before any compaction is -1.
        Model { history: vec![(1, State::new())], compacted: -1, ..Default::default() }
    }
    fn rev(&self) -> Rev {
        self.history.last().unwrap().0
    }
    fn cur(&self) -> &State {
        &self.history.last().unwrap().1
    }
    fn at(&self, rev: Rev) -> Result<&State, KvError> {
        let rev = if rev == 0 { self.rev() } else { rev };
        if rev > self.rev() {
            return Err(KvError::FutureRev { requested: rev, current: self.rev() });
        }
        if rev < self.compacted {
            return Err(KvError::Compacted { requested: rev, compact_revision: self.compacted });
        }
        Ok(&self.history.iter().rev().find(|(r, _)| *r <= rev).unwrap().1)
    }

    fn range(&self, r: &RangeRequest, work: Option<&State>) -> Result<RangeResponse, KvError> {
        let state = match work {
            Some(w) if r.revision == 0 => w,
            _ => self.at(r.revision)?,
        };
        let all: Vec<&KeyValue> = state.values().filter(|kv| in_range(&kv.key, &r.key, &r.range_end)).collect();
        let limit = if r.limit > 0 { r.limit as usize } else { usize::MAX };
        let kvs = if r.count_only {
            vec![]
        } else {
            all.iter()
                .take(limit)
                .map(|kv| KeyValue { value: if r.keys_only { vec![] } else { kv.value.clone() }, ..(*kv).clone() })
                .collect()
        };
        Ok(RangeResponse { more: !r.count_only && all.len() > limit, count: all.len() as i64, kvs })
    }

    fn compare(state: &State, c: &Compare) -> bool {
        let hits: Vec<&KeyValue> = state.values().filter(|kv| in_range(&kv.key, &c.key, &c.range_end)).collect();
        let check = |kv: &KeyValue| {
            let o = match &c.target {
                CompareTarget::Version(x) => kv.version.cmp(x),
                CompareTarget::Create(x) => kv.create_revision.cmp(x),
                CompareTarget::Mod(x) => kv.mod_revision.cmp(x),
                CompareTarget::Value(x) => kv.value.cmp(x),
                CompareTarget::Lease(x) => kv.lease.cmp(x),
                CompareTarget::Undefined => std::cmp::Ordering::Equal,
            };
            match c.result {
                CompareResult::Equal => o.is_eq(),
                CompareResult::NotEqual => o.is_ne(),
                CompareResult::Greater => o.is_gt(),
                CompareResult::Less => o.is_lt(),
                CompareResult::Undefined => true,
            }
        };
        if hits.is_empty() {
            return !matches!(c.target, CompareTarget::Value(_)) && check(&KeyValue::default());
        }
        hits.into_iter().all(check)
    }

    /// Apply writes to a working copy at revision `rev`.
    fn put(work: &mut State, p: &PutRequest, rev: Rev, events: &mut Vec<Event>) -> PutResponse {
        let prev = work.get(&p.key).cloned();
        let kv = KeyValue {
            key: p.key.clone(),
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            value: p.value.clone(),
            lease: p.lease,
        };
        work.insert(p.key.clone(), kv.clone());
        events.push(Event { kind: EventKind::Put, kv, prev_kv: prev.clone() });
        PutResponse { prev_kv: if p.prev_kv { prev } else { None } }
    }

    fn delete(work: &mut State, d: &DeleteRangeRequest, rev: Rev, events: &mut Vec<Event>) -> DeleteRangeResponse {
        let doomed: Vec<KeyValue> =
            work.values().filter(|kv| in_range(&kv.key, &d.key, &d.range_end)).cloned().collect();
        for kv in &doomed {
            work.remove(&kv.key);
            events.push(Event {
                kind: EventKind::Delete,
                kv: KeyValue { key: kv.key.clone(), mod_revision: rev, ..Default::default() },
                prev_kv: Some(kv.clone()),
            });
        }
        DeleteRangeResponse { deleted: doomed.len() as i64, prev_kvs: if d.prev_kv { doomed } else { vec![] } }
    }

    fn txn_path(start: &State, t: &TxnRequest, path: &mut Vec<bool>) {
        let ok = t.compare.iter().all(|c| Model::compare(start, c));
        path.push(ok);
        for op in if ok { &t.success } else { &t.failure } {
            if let RequestOp::Txn(inner) = op {
                Model::txn_path(start, inner, path);
            }
        }
    }

    fn txn_check(&self, t: &TxnRequest, path: &[bool], at: &mut usize) -> Result<(), ApplyError> {
        let ok = path[*at];
        *at += 1;
        for op in if ok { &t.success } else { &t.failure } {
            match op {
                RequestOp::Range(r) => {
                    self.at(r.revision.min(self.rev()))?;
                    if r.revision > self.rev() {
                        return Err(KvError::FutureRev { requested: r.revision, current: self.rev() }.into());
                    }
                }
                RequestOp::Put(p) if p.lease != 0 && !self.leases.contains(&p.lease) => {
                    return Err(KvError::LeaseNotFound { lease: p.lease }.into())
                }
                RequestOp::Txn(inner) => self.txn_check(inner, path, at)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn txn_run(
        &self,
        work: &mut State,
        t: &TxnRequest,
        path: &[bool],
        at: &mut usize,
        rev: Rev,
        ev: &mut Vec<Event>,
    ) -> TxnResponse {
        let ok = path[*at];
        *at += 1;
        let mut responses = vec![];
        for op in if ok { &t.success } else { &t.failure } {
            responses.push(match op {
                // Reads inside a Txn see its earlier writes.
                RequestOp::Range(r) => ResponseOp::Range(self.range(r, Some(work)).unwrap()),
                RequestOp::Put(p) => ResponseOp::Put(Model::put(work, p, rev, ev)),
                RequestOp::DeleteRange(d) => ResponseOp::DeleteRange(Model::delete(work, d, rev, ev)),
                RequestOp::Txn(inner) => ResponseOp::Txn(self.txn_run(work, inner, path, at, rev, ev)),
            });
        }
        TxnResponse { succeeded: ok, responses }
    }

    fn commit(&mut self, work: State, events: &[Event]) -> Rev {
        if !events.is_empty() {
            let rev = self.rev() + 1;
            self.history.push((rev, work));
        }
        self.rev()
    }

    fn apply(&mut self, cmd: &Command) -> (Applied, Vec<Event>) {
        let next = self.rev() + 1;
        let mut work = self.cur().clone();
        let mut ev = vec![];
        let result: Result<Response, ApplyError> = match cmd {
            Command::Put(p) => {
                if p.lease != 0 && !self.leases.contains(&p.lease) {
                    Err(KvError::LeaseNotFound { lease: p.lease }.into())
                } else {
                    Ok(Response::Put(Model::put(&mut work, p, next, &mut ev)))
                }
            }
            Command::DeleteRange(d) => Ok(Response::DeleteRange(Model::delete(&mut work, d, next, &mut ev))),
            Command::Txn(t) => {
                let mut path = vec![];
                Model::txn_path(self.cur(), t, &mut path);
                match self.txn_check(t, &path, &mut 0) {
                    Err(e) => Err(e),
                    Ok(()) => Ok(Response::Txn(self.txn_run(&mut work, t, &path, &mut 0, next, &mut ev))),
                }
            }
            Command::Compact { revision } => {
                if *revision <= self.compacted {
                    Err(KvError::Compacted { requested: *revision, compact_revision: self.compacted }.into())
                } else if *revision > self.rev() {
                    Err(KvError::FutureRev { requested: *revision, current: self.rev() }.into())
                } else {
                    self.compacted = *revision;
                    Ok(Response::Compact)
                }
            }
            Command::LeaseGrant { id, ttl_s } => {
                if self.leases.insert(*id) {
                    Ok(Response::LeaseGrant { id: *id, ttl_s: *ttl_s })
                } else {
                    Err(LeaseError::Exists { lease: *id }.into())
                }
            }
            Command::LeaseRevoke { id } => {
                if self.leases.remove(id) {
                    let keys: Vec<Vec<u8>> =
                        work.values().filter(|kv| kv.lease == *id).map(|kv| kv.key.clone()).collect();
                    for key in keys {
                        Model::delete(&mut work, &DeleteRangeRequest { key, ..Default::default() }, next, &mut ev);
                    }
                    Ok(Response::LeaseRevoke)
                } else {
                    Err(LeaseError::NotFound { lease: *id }.into())
                }
            }
            Command::EnterEpoch { epoch } => {
                let current = epoch_of(self.rev());
                if *epoch > EPOCH_MAX {
                    Err(KvError::EpochTooLarge { epoch: *epoch }.into())
                } else if *epoch <= current {
                    Err(KvError::EpochNotAfter { epoch: *epoch, current }.into())
                } else {
                    // The state carries over to the epoch's first revision; all before is gone.
                    let start = epoch_start(*epoch);
                    self.history.push((start, work.clone()));
                    self.compacted = start;
                    Ok(Response::EnterEpoch)
                }
            }
            // The model checks the key space and leases; auth has tests of its own.
            Command::Auth(_) | Command::Client { .. } => unreachable!("the model generates no auth commands"),
        };
        if result.is_err() {
            ev.clear();
            work = self.cur().clone();
        }
        let revision = self.commit(work, &ev);
        (Applied { revision, result }, ev)
    }
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"a".to_vec()),
        Just(b"b".to_vec()),
        Just(b"b/1".to_vec()),
        Just(b"b/2".to_vec()),
        Just(b"c".to_vec())
    ]
}

fn range_end() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![3 => Just(vec![]), 1 => Just(vec![0]), 1 => Just(b"b0".to_vec()), 1 => Just(b"c".to_vec())]
}

fn lease() -> impl Strategy<Value = i64> {
    prop_oneof![3 => Just(0i64), 1 => Just(1i64), 1 => Just(2i64)]
}

fn put() -> impl Strategy<Value = PutRequest> {
    (key(), "[xyz]{0,2}", lease(), any::<bool>()).prop_map(|(key, v, lease, prev_kv)| PutRequest {
        key,
        value: v.into_bytes(),
        lease,
        prev_kv,
        ..Default::default()
    })
}

fn delete() -> impl Strategy<Value = DeleteRangeRequest> {
    (key(), range_end(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| DeleteRangeRequest {
        key,
        range_end,
        prev_kv,
    })
}

fn range() -> impl Strategy<Value = RangeRequest> {
    (key(), range_end(), 0i64..3, 0i64..12, any::<bool>(), any::<bool>()).prop_map(
        |(key, range_end, limit, revision, keys_only, count_only)| RangeRequest {
            key,
            range_end,
            limit,
            revision,
            keys_only,
            count_only,
            ..Default::default()
        },
    )
}

fn compare() -> impl Strategy<Value = Compare> {
    let result = prop_oneof![
        Just(CompareResult::Equal),
        Just(CompareResult::Greater),
        Just(CompareResult::Less),
        Just(CompareResult::NotEqual),
        Just(CompareResult::Undefined)
    ];
    let target = prop_oneof![
        (0i64..3).prop_map(CompareTarget::Version),
        (0i64..8).prop_map(CompareTarget::Create),
        (0i64..8).prop_map(CompareTarget::Mod),
        "[xyz]{0,2}".prop_map(|v| CompareTarget::Value(v.into_bytes())),
        lease().prop_map(CompareTarget::Lease),
        Just(CompareTarget::Undefined),
    ];
    (result, target, key(), prop_oneof![3 => Just(vec![]), 1 => Just(b"b0".to_vec())])
        .prop_map(|(result, target, key, range_end)| Compare { result, target, key, range_end })
}

fn txn() -> impl Strategy<Value = TxnRequest> {
    let op = prop_oneof![
        put().prop_map(RequestOp::Put),
        delete().prop_map(RequestOp::DeleteRange),
        range().prop_map(RequestOp::Range)
    ];
    let leaf = (
        prop::collection::vec(compare(), 0..3),
        prop::collection::vec(op.clone(), 0..3),
        prop::collection::vec(op.clone(), 0..3),
    )
        .prop_map(|(compare, success, failure)| TxnRequest { compare, success, failure });
    (leaf, prop::collection::vec(op, 0..2), any::<bool>()).prop_map(|(inner, mut ops, nest)| {
        if nest {
            ops.push(RequestOp::Txn(inner.clone()));
        }
        TxnRequest { success: ops, ..inner }
    })
}

#[derive(Clone, Debug)]
enum Step {
    Apply(Command),
    Read(RangeRequest),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => put().prop_map(|p| Step::Apply(Command::Put(p))),
        2 => delete().prop_map(|d| Step::Apply(Command::DeleteRange(d))),
        2 => txn().prop_map(|t| Step::Apply(Command::Txn(t))),
        1 => (0i64..14).prop_map(|revision| Step::Apply(Command::Compact { revision })),
        1 => (1i64..3).prop_map(|id| Step::Apply(Command::LeaseGrant { id, ttl_s: 10 })),
        1 => (1i64..3).prop_map(|id| Step::Apply(Command::LeaseRevoke { id })),
        1 => (0u64..3).prop_map(|epoch| Step::Apply(Command::EnterEpoch { epoch })),
        3 => range().prop_map(Step::Read),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn machine_agrees_with_a_naive_model_of_etcd(steps in prop::collection::vec(step(), 1..40)) {
        let mut m = Machine::new();
        let mut model = Model::new();
        for s in &steps {
            match s {
                Step::Apply(cmd) => {
                    // Commands the API would refuse before Raft never reach the machine.
                    if validate(cmd).is_err() {
                        continue;
                    }
                    let mut b = WriteBatch::default();
                    let mut ev = vec![];
                    let got = m.apply(cmd, 0, &mut b, &mut ev);
                    let (want, want_ev) = model.apply(cmd);
                    prop_assert_eq!(&got, &want, "applying {:?}", cmd);
                    prop_assert_eq!(&ev, &want_ev, "events of {:?}", cmd);
                }
                Step::Read(r) => {
                    prop_assert_eq!(m.range(r), model.range(r, None), "reading {:?}", r);
                }
            }
            // Every revision still readable reads the same.
            for rev in model.compacted.max(1)..=model.rev() {
                let all = RangeRequest { key: vec![0], range_end: vec![0], revision: rev, ..Default::default() };
                prop_assert_eq!(m.range(&all), model.range(&all, None), "full read at {}", rev);
            }
        }
    }
}

/// Any key, the empty one included.
fn any_key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![4 => key(), 1 => Just(vec![])]
}

/// Puts as a buggy or hostile peer could log them: every flag, any key.
fn any_put() -> impl Strategy<Value = PutRequest> {
    (any_key(), "[xyz]{0,2}", lease(), any::<bool>(), any::<bool>()).prop_map(
        |(key, v, lease, ignore_value, ignore_lease)| PutRequest {
            key,
            value: v.into_bytes(),
            lease,
            ignore_value,
            ignore_lease,
            ..Default::default()
        },
    )
}

fn any_txn() -> impl Strategy<Value = TxnRequest> {
    let op = prop_oneof![
        any_put().prop_map(RequestOp::Put),
        delete().prop_map(RequestOp::DeleteRange),
        range().prop_map(RequestOp::Range)
    ];
    let leaf = (
        prop::collection::vec(compare(), 0..3),
        prop::collection::vec(op.clone(), 0..4),
        prop::collection::vec(op.clone(), 0..4),
    )
        .prop_map(|(compare, success, failure)| TxnRequest { compare, success, failure });
    leaf.prop_recursive(3, 24, 3, move |inner| {
        (
            prop::collection::vec(compare(), 0..2),
            prop::collection::vec(inner.clone().prop_map(RequestOp::Txn), 0..3),
            prop::collection::vec(op.clone(), 0..3),
        )
            .prop_map(|(compare, nested, mut ops)| {
                ops.extend(nested);
                TxnRequest { compare, success: ops.clone(), failure: ops }
            })
    })
}

fn any_command() -> impl Strategy<Value = Command> {
    prop_oneof![
        3 => any_put().prop_map(Command::Put),
        1 => delete().prop_map(Command::DeleteRange),
        3 => any_txn().prop_map(Command::Txn),
        1 => (-2i64..14).prop_map(|revision| Command::Compact { revision }),
        1 => (-1i64..3, -1i64..20).prop_map(|(id, ttl_s)| Command::LeaseGrant { id, ttl_s }),
        1 => (-1i64..3).prop_map(|id| Command::LeaseRevoke { id }),
        1 => prop_oneof![Just(0), Just(1), Just(EPOCH_MAX + 1)].prop_map(|epoch| Command::EnterEpoch { epoch }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Issue 12, fault 8: apply is total. Any command, valid or not, applied straight to the
    /// machine either applies or yields an error; an invalid one changes nothing.
    #[test]
    fn no_command_panics_the_machine_and_an_invalid_one_changes_nothing(cmds in prop::collection::vec(any_command(), 1..40)) {
        let mut m = Machine::new();
        for cmd in &cmds {
            let before = m.kv.current_rev();
            let mut b = WriteBatch::default();
            let mut ev = vec![];
            let got = m.apply(cmd, 0, &mut b, &mut ev);
            if validate(cmd).is_err() {
                prop_assert!(got.result.is_err(), "{:?} applied", cmd);
                prop_assert_eq!(got.revision, before);
                prop_assert!(ev.is_empty());
            }
        }
    }
}
