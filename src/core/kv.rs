//! The MVCC key space, with etcd's semantics: one cluster-wide revision, per-key create and mod
//! revisions and versions, history kept until a compaction.
//!
//! Pure and deterministic: no clock, no tokio, no tonic types. Every change is applied to the
//! in-memory index and written into a [`WriteBatch`] the caller commits; [`Mvcc::load`] rebuilds
//! the index from what was committed.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::storage::{Cf, Engine, StorageError, WriteBatch};

/// A revision, numbered as etcd numbers them: 1 for the empty key space, then one more for each
/// write (a Txn's writes share one). Across a region failover the revision jumps to the next
/// revision epoch's first: a revision is `epoch << REV_COUNTER_BITS | counter` (DESIGN.md
/// "Region failover"), so every revision, and every lock's fencing token (its key's create
/// revision), issued after a failover is greater than any issued before it, whatever the lost
/// window held.
pub type Rev = i64;

/// Bits of a revision that count writes within one epoch: 2^40 revisions is 35 years of 1,000
/// writes a second.
pub const REV_COUNTER_BITS: u32 = 40;

/// The highest revision epoch: a revision is a positive i64, so 23 bits are left for it.
pub const EPOCH_MAX: u64 = (1 << (63 - REV_COUNTER_BITS)) - 1;

/// The revision epoch `rev` belongs to (0 for a cluster that never failed over).
pub fn epoch_of(rev: Rev) -> u64 {
    (rev.max(0) as u64) >> REV_COUNTER_BITS
}

/// The first revision of `epoch`.
pub fn epoch_start(epoch: u64) -> Rev {
    (epoch.min(EPOCH_MAX) << REV_COUNTER_BITS) as Rev
}

/// One key at one revision, as clients see it (mvccpb.KeyValue).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Revision of the put that created this generation of the key.
    pub create_revision: Rev,
    /// Revision of the last change.
    pub mod_revision: Rev,
    /// Puts since creation, starting at 1.
    pub version: i64,
    /// The value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Lease the key is attached to, 0 for none.
    pub lease: i64,
}

/// What happened to a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// Created or updated.
    Put,
    /// Deleted.
    Delete,
}

/// One change to the key space, as a watcher receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change; for a delete only `key` and `mod_revision` are set, as in etcd.
    pub kv: KeyValue,
    /// The key before the change, if it existed.
    pub prev_kv: Option<KeyValue>,
}

/// Order of a sorted range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortOrder {
    /// Key order, ascending (the natural order).
    #[default]
    None,
    /// Ascending by the target.
    Ascend,
    /// Descending by the target.
    Descend,
}

/// Field a range is sorted by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortTarget {
    /// The key.
    #[default]
    Key,
    /// The version.
    Version,
    /// The create revision.
    Create,
    /// The mod revision.
    Mod,
    /// The value.
    Value,
}

/// A range read (etcdserverpb.RangeRequest).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    pub limit: i64,
    pub revision: Rev,
    pub sort_order: SortOrder,
    pub sort_target: SortTarget,
    pub serializable: bool,
    pub keys_only: bool,
    pub count_only: bool,
    pub min_mod_revision: Rev,
    pub max_mod_revision: Rev,
    pub min_create_revision: Rev,
    pub max_create_revision: Rev,
}

/// Result of a range read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    pub kvs: Vec<KeyValue>,
    pub more: bool,
    pub count: i64,
}

/// A put (etcdserverpb.PutRequest).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub lease: i64,
    pub prev_kv: bool,
    pub ignore_value: bool,
    pub ignore_lease: bool,
}

/// Result of a put.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutResponse {
    pub prev_kv: Option<KeyValue>,
}

/// A delete of one key or a range (etcdserverpb.DeleteRangeRequest).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeRequest {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    pub prev_kv: bool,
}

/// Result of a delete.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeResponse {
    pub deleted: i64,
    pub prev_kvs: Vec<KeyValue>,
}

/// How a compare relates the key's field to the given one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareResult {
    Equal,
    Greater,
    Less,
    NotEqual,
    /// A result value etcd's proto does not define: the compare holds (etcd's `compareKV`
    /// falls through to true).
    Undefined,
}

/// The field a compare looks at, with the value to compare against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    Version(i64),
    Create(Rev),
    Mod(Rev),
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    Lease(i64),
    /// A target value etcd's proto does not define: every key compares as equal to it (etcd's
    /// `compareKV` leaves its result at zero).
    Undefined,
}

/// One guard of a Txn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub result: CompareResult,
    pub target: CompareTarget,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
}

/// One operation of a Txn branch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOp {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
}

/// Result of one Txn operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseOp {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
}

/// A transaction (etcdserverpb.TxnRequest).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

/// Result of a transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
}

/// Why a key-space operation was refused. Messages are etcd's where etcd has one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum KvError {
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted { requested: Rev, compact_revision: Rev },
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev { requested: Rev, current: Rev },
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound { lease: i64 },
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: too many operations in txn request (txn_ops_max {max})")]
    TooManyOps { ops: usize, max: usize },
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key is too large ({len} bytes, key_bytes_max {max})")]
    KeyTooLarge { len: usize, max: usize },
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: txn nested too deep (txn_depth_max {max})")]
    TxnTooDeep { max: usize },
    #[error("etcdserver: mvcc: database space exceeded ({bytes} bytes of keys and values, quota {max})")]
    NoSpace { bytes: u64, max: u64 },
    /// A failover's new epoch must come after the one the key space is in.
    #[error("geolock: revision epoch {epoch} does not come after the current epoch {current}")]
    EpochNotAfter { epoch: u64, current: u64 },
    #[error("geolock: revision epoch {epoch} is above the highest, {EPOCH_MAX}")]
    EpochTooLarge { epoch: u64 },
}

/// One stored version of a key. `value == None` marks a deletion (tombstone).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Version {
    rev: Rev,
    sub: u32,
    create_rev: Rev,
    version: i64,
    lease: i64,
    value: Option<Arc<[u8]>>,
}

/// How a version is written to the `kv` column family, keyed by `rev ++ sub`.
#[derive(Serialize, Deserialize)]
struct StoredVersion<'a> {
    #[serde(borrow)]
    key: &'a [u8],
    create_rev: Rev,
    version: i64,
    lease: i64,
    #[serde(borrow)]
    value: Option<&'a [u8]>,
}

const META_CURRENT_REV: &[u8] = b"kv/current_rev";
const META_COMPACT_REV: &[u8] = b"kv/compact_rev";

fn rev_key(rev: Rev, sub: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&rev.to_be_bytes());
    k[8..].copy_from_slice(&sub.to_be_bytes());
    k
}

/// The multi-version key space.
#[derive(Clone, Debug, Default)]
pub struct Mvcc {
    /// Every key's versions, oldest first.
    index: BTreeMap<Arc<[u8]>, Vec<Version>>,
    /// Key of every change, by `(rev, sub)`, above the compaction point: the watch history.
    changes: BTreeMap<(Rev, u32), Arc<[u8]>>,
    current_rev: Rev,
    compact_rev: Rev,
    /// Bytes of keys and values held, for the space quota.
    bytes: u64,
    /// Keys whose latest version is not a deletion (kept on each write: metrics read it).
    live: usize,
    /// Writes made by the operation in progress: they share `current_rev + 1`.
    pending_subs: u32,
}

/// A write that changed which lease a key belongs to; the lessor mirrors it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseMove {
    pub key: Vec<u8>,
    pub from: i64,
    pub to: i64,
}

/// Everything a write produced besides its response.
#[derive(Debug, Default)]
pub struct WriteEffects {
    pub events: Vec<Event>,
    pub lease_moves: Vec<LeaseMove>,
}

/// Whether `key` is in the range etcd's `key`/`range_end` pair names: `key` alone when
/// `range_end` is empty, everything from `start` on when it is `\0`, else `[start, end)`.
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    if end.is_empty() {
        key == start
    } else if end == [0] {
        key >= start
    } else {
        key >= start && key < end
    }
}

fn compare_ord<T: Ord + ?Sized>(a: &T, b: &T, r: CompareResult) -> bool {
    let o = a.cmp(b);
    match r {
        CompareResult::Equal => o.is_eq(),
        CompareResult::NotEqual => o.is_ne(),
        CompareResult::Greater => o.is_gt(),
        CompareResult::Less => o.is_lt(),
        CompareResult::Undefined => true,
    }
}

impl Mvcc {
    /// An empty key space at revision 1, as etcd starts: the first write is revision 2. Nothing
    /// is compacted, which etcd marks as compact revision -1, so that a first compaction to
    /// revision 0 is accepted and a second one refused.
    pub fn new() -> Self {
        Mvcc { current_rev: 1, compact_rev: -1, ..Default::default() }
    }

    /// Rebuild from what earlier batches committed.
    pub fn load(engine: &dyn Engine) -> Result<Self, StorageError> {
        let mut m = Mvcc::new();
        if let Some(v) = engine.get(Cf::SmMeta, META_CURRENT_REV)? {
            m.current_rev = decode_i64(&v)?;
        }
        if let Some(v) = engine.get(Cf::SmMeta, META_COMPACT_REV)? {
            m.compact_rev = decode_i64(&v)?;
        }
        let mut from = Vec::new();
        loop {
            let page = engine.scan(Cf::Kv, &from, None, 4096)?;
            let Some((last, _)) = page.last() else { break };
            from = last.clone();
            from.push(0);
            for (k, v) in page {
                if k.len() != 12 {
                    return Err(StorageError::Corrupt { what: "revision key", detail: format!("{} bytes", k.len()) });
                }
                let rev = i64::from_be_bytes(k[..8].try_into().unwrap());
                let sub = u32::from_be_bytes(k[8..].try_into().unwrap());
                let sv: StoredVersion = postcard::from_bytes(&v)
                    .map_err(|e| StorageError::Corrupt { what: "key version", detail: e.to_string() })?;
                let key: Arc<[u8]> = match m.index.get_key_value(sv.key) {
                    Some((k, _)) => k.clone(),
                    None => sv.key.into(),
                };
                m.bytes += (key.len() + sv.value.map_or(0, |v| v.len())) as u64;
                m.index.entry(key.clone()).or_default().push(Version {
                    rev,
                    sub,
                    create_rev: sv.create_rev,
                    version: sv.version,
                    lease: sv.lease,
                    value: sv.value.map(Arc::from),
                });
                if rev >= m.compact_rev {
                    m.changes.insert((rev, sub), key);
                }
            }
        }
        m.live = m.count_live();
        Ok(m)
    }

    /// The latest revision.
    pub fn current_rev(&self) -> Rev {
        self.current_rev
    }

    /// The revision of the last compaction (-1 if none, as etcd reports it).
    pub fn compact_rev(&self) -> Rev {
        self.compact_rev
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Keys whose latest version is not a deletion.
    pub fn live_keys(&self) -> usize {
        self.live
    }

    fn count_live(&self) -> usize {
        self.index.values().filter(|vs| vs.last().is_some_and(|v| v.value.is_some())).count()
    }

    /// The revision reads see: writes of the operation in progress included.
    fn read_rev(&self) -> Rev {
        if self.pending_subs > 0 {
            self.current_rev + 1
        } else {
            self.current_rev
        }
    }

    /// Check that a read at `rev` (0 = latest) is possible.
    pub fn check_rev(&self, rev: Rev) -> Result<Rev, KvError> {
        let cur = self.read_rev();
        // etcd reads at the current revision for any revision <= 0, negative ones included.
        if rev <= 0 {
            return Ok(cur);
        }
        if rev > cur {
            return Err(KvError::FutureRev { requested: rev, current: cur });
        }
        if rev < self.compact_rev {
            return Err(KvError::Compacted { requested: rev, compact_revision: self.compact_rev });
        }
        Ok(rev)
    }

    fn version_at(versions: &[Version], rev: Rev) -> Option<&Version> {
        let i = versions.partition_point(|v| v.rev <= rev);
        if i == 0 {
            None
        } else {
            Some(&versions[i - 1])
        }
    }

    fn kv_of(key: &[u8], v: &Version) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            create_revision: v.create_rev,
            mod_revision: v.rev,
            version: v.version,
            value: v.value.as_deref().unwrap_or_default().to_vec(),
            lease: v.lease,
        }
    }

    /// Live keys in `[key, range_end)` (etcd's conventions for `range_end`) at `rev`.
    fn live_at<'a>(
        &'a self,
        key: &'a [u8],
        range_end: &'a [u8],
        rev: Rev,
    ) -> impl Iterator<Item = (&'a [u8], &'a Version)> + 'a {
        let upper: Bound<&[u8]> = if range_end.is_empty() {
            Bound::Included(key)
        } else if range_end == [0] {
            Bound::Unbounded
        } else {
            Bound::Excluded(range_end)
        };
        let empty = !range_end.is_empty() && range_end != [0] && range_end <= key;
        let iter = if empty { None } else { Some(self.index.range::<[u8], _>((Bound::Included(key), upper))) };
        iter.into_iter().flatten().filter_map(move |(k, vs)| {
            let v = Self::version_at(vs, rev)?;
            v.value.as_ref()?;
            Some((&k[..], v))
        })
    }

    /// The live key `key` at the latest revision, including the operation in progress.
    pub fn get(&self, key: &[u8]) -> Option<KeyValue> {
        let vs = self.index.get(key)?;
        let v = vs.last()?;
        v.value.as_ref()?;
        Some(Self::kv_of(key, v))
    }

    /// Serve a range read.
    pub fn range(&self, r: &RangeRequest) -> Result<RangeResponse, KvError> {
        let rev = self.check_rev(r.revision)?;
        let filtered = r.min_mod_revision != 0
            || r.max_mod_revision != 0
            || r.min_create_revision != 0
            || r.max_create_revision != 0;
        let keep = |v: &Version| {
            !(r.max_mod_revision != 0 && v.rev > r.max_mod_revision
                || r.min_mod_revision != 0 && v.rev < r.min_mod_revision
                || r.max_create_revision != 0 && v.create_rev > r.max_create_revision
                || r.min_create_revision != 0 && v.create_rev < r.min_create_revision)
        };
        // etcd counts every live key in the range, before the revision filters and the limit.
        let mut count = 0i64;
        let mut picked: Vec<(&[u8], &Version)> = Vec::new();
        let sorted = r.sort_order != SortOrder::None || r.sort_target != SortTarget::Key;
        // Without sorting or filters the first `limit` keys in key order are the answer, and
        // etcd still reports the total count.
        let cap = if r.count_only {
            0
        } else if r.limit > 0 && !sorted && !filtered {
            (r.limit as usize + 1).min(crate::limits::RANGE_KEYS_MAX + 1)
        } else {
            usize::MAX
        };
        for (k, v) in self.live_at(&r.key, &r.range_end, rev) {
            count += 1;
            if picked.len() < cap && keep(v) {
                picked.push((k, v));
            }
        }
        let order = match (r.sort_target, r.sort_order) {
            (SortTarget::Key, SortOrder::Ascend) => SortOrder::None,
            (t, SortOrder::None) if t != SortTarget::Key => SortOrder::Ascend,
            (_, o) => o,
        };
        if order != SortOrder::None {
            picked.sort_by(|a, b| {
                let o = match r.sort_target {
                    SortTarget::Key => a.0.cmp(b.0),
                    SortTarget::Version => a.1.version.cmp(&b.1.version),
                    SortTarget::Create => a.1.create_rev.cmp(&b.1.create_rev),
                    SortTarget::Mod => a.1.rev.cmp(&b.1.rev),
                    SortTarget::Value => a.1.value.cmp(&b.1.value),
                };
                if order == SortOrder::Descend {
                    o.reverse()
                } else {
                    o
                }
            });
        }
        let limit = if r.limit > 0 { r.limit as usize } else { crate::limits::RANGE_KEYS_MAX };
        let more = picked.len() > limit;
        picked.truncate(limit);
        let kvs = picked
            .into_iter()
            .map(|(k, v)| {
                let mut kv = Self::kv_of(k, v);
                if r.keys_only {
                    kv.value.clear();
                }
                kv
            })
            .collect();
        Ok(RangeResponse { kvs, more, count })
    }

    /// Evaluate one Txn guard at the latest revision.
    pub fn compare(&self, c: &Compare) -> bool {
        let rev = self.read_rev();
        let mut any = false;
        for (k, v) in self.live_at(&c.key, &c.range_end, rev) {
            any = true;
            if !Self::compare_one(&Self::kv_of(k, v), c) {
                return false;
            }
        }
        if any {
            return true;
        }
        // A missing key compares as zeroes, except that a value never matches: there is no way
        // to tell a missing value from an empty one.
        !matches!(c.target, CompareTarget::Value(_)) && Self::compare_one(&KeyValue::default(), c)
    }

    fn compare_one(kv: &KeyValue, c: &Compare) -> bool {
        match &c.target {
            CompareTarget::Version(x) => compare_ord(&kv.version, x, c.result),
            CompareTarget::Create(x) => compare_ord(&kv.create_revision, x, c.result),
            CompareTarget::Mod(x) => compare_ord(&kv.mod_revision, x, c.result),
            CompareTarget::Value(x) => compare_ord(&kv.value[..], &x[..], c.result),
            CompareTarget::Lease(x) => compare_ord(&kv.lease, x, c.result),
            CompareTarget::Undefined => compare_ord(&0, &0, c.result),
        }
    }

    fn write_version(&mut self, key: &[u8], v: Version, batch: &mut WriteBatch) {
        let key: Arc<[u8]> = match self.index.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => key.into(),
        };
        let sv = StoredVersion {
            key: &key,
            create_rev: v.create_rev,
            version: v.version,
            lease: v.lease,
            value: v.value.as_deref(),
        };
        batch.put(Cf::Kv, rev_key(v.rev, v.sub).to_vec(), postcard::to_allocvec(&sv).expect("encodes"));
        self.bytes += (key.len() + v.value.as_ref().map_or(0, |x| x.len())) as u64;
        self.changes.insert((v.rev, v.sub), key.clone());
        // Compaction never drops a key's latest version while it is live, so only writes move
        // the count.
        let was_live = self.index.get(&key).and_then(|vs| vs.last()).is_some_and(|old| old.value.is_some());
        self.live = self.live + usize::from(v.value.is_some()) - usize::from(was_live);
        self.index.entry(key).or_default().push(v);
    }

    fn next_slot(&mut self) -> (Rev, u32) {
        let sub = self.pending_subs;
        self.pending_subs += 1;
        (self.current_rev + 1, sub)
    }

    /// Put `key`. `lease` must already have been checked to exist.
    pub fn put(
        &mut self,
        p: &PutRequest,
        batch: &mut WriteBatch,
        fx: &mut WriteEffects,
    ) -> Result<PutResponse, KvError> {
        let prev = self.get(&p.key);
        if (p.ignore_value || p.ignore_lease) && prev.is_none() {
            return Err(KvError::KeyNotFound);
        }
        let value: Arc<[u8]> = match (&prev, p.ignore_value) {
            (Some(prev), true) => prev.value.as_slice().into(),
            _ => p.value.as_slice().into(),
        };
        let lease = match (&prev, p.ignore_lease) {
            (Some(prev), true) => prev.lease,
            _ => p.lease,
        };
        let (rev, sub) = self.next_slot();
        let v = Version {
            rev,
            sub,
            create_rev: prev.as_ref().map_or(rev, |p| p.create_revision),
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease,
            value: Some(value),
        };
        let kv = Self::kv_of(&p.key, &v);
        self.write_version(&p.key, v, batch);
        let old_lease = prev.as_ref().map_or(0, |p| p.lease);
        if old_lease != lease {
            fx.lease_moves.push(LeaseMove { key: p.key.clone(), from: old_lease, to: lease });
        }
        fx.events.push(Event { kind: EventKind::Put, kv, prev_kv: prev.clone() });
        Ok(PutResponse { prev_kv: if p.prev_kv { prev } else { None } })
    }

    /// Delete every live key in the range.
    pub fn delete_range(
        &mut self,
        d: &DeleteRangeRequest,
        batch: &mut WriteBatch,
        fx: &mut WriteEffects,
    ) -> DeleteRangeResponse {
        let rev = self.read_rev();
        let doomed: Vec<KeyValue> = self.live_at(&d.key, &d.range_end, rev).map(|(k, v)| Self::kv_of(k, v)).collect();
        for prev in &doomed {
            let (rev, sub) = self.next_slot();
            self.write_version(
                &prev.key,
                Version { rev, sub, create_rev: 0, version: 0, lease: 0, value: None },
                batch,
            );
            if prev.lease != 0 {
                fx.lease_moves.push(LeaseMove { key: prev.key.clone(), from: prev.lease, to: 0 });
            }
            fx.events.push(Event {
                kind: EventKind::Delete,
                kv: KeyValue { key: prev.key.clone(), mod_revision: rev, ..Default::default() },
                prev_kv: Some(prev.clone()),
            });
        }
        DeleteRangeResponse { deleted: doomed.len() as i64, prev_kvs: if d.prev_kv { doomed } else { Vec::new() } }
    }

    /// Close the operation in progress: if it wrote anything, the revision advances by one.
    pub fn finish(&mut self, batch: &mut WriteBatch) -> Rev {
        if self.pending_subs > 0 {
            self.current_rev += 1;
            self.pending_subs = 0;
            batch.put(Cf::SmMeta, META_CURRENT_REV, self.current_rev.to_be_bytes().to_vec());
        }
        self.current_rev
    }

    /// etcd's check of a Range inside a Txn (its applier's `checkRange`), stricter than a lone
    /// Range's: 0 reads the current revision, a revision above it is in the future, and one
    /// below the compact revision (-1 before any compaction) is compacted, negative ones
    /// included. A lone Range reads any negative revision as the current one.
    pub fn check_txn_range_rev(&self, rev: Rev) -> Result<(), KvError> {
        if rev == 0 {
            Ok(())
        } else if rev > self.current_rev {
            Err(KvError::FutureRev { requested: rev, current: self.current_rev })
        } else if rev < self.compact_rev {
            Err(KvError::Compacted { requested: rev, compact_revision: self.compact_rev })
        } else {
            Ok(())
        }
    }

    /// Check that a compaction to `rev` is possible.
    pub fn check_compact(&self, rev: Rev) -> Result<(), KvError> {
        if rev <= self.compact_rev {
            return Err(KvError::Compacted { requested: rev, compact_revision: self.compact_rev });
        }
        if rev > self.current_rev {
            return Err(KvError::FutureRev { requested: rev, current: self.current_rev });
        }
        Ok(())
    }

    /// Enter revision epoch `epoch` (a failover's new primary does, before any write): the
    /// revision jumps to the epoch's first, and history before it is compacted away, so a read or
    /// a watch from an older revision gets `Compacted` and re-reads, rather than missing what the
    /// old primary committed and this key space never received. Live keys keep their values and
    /// revisions. Returns the new revision.
    ///
    /// Errors: `EpochNotAfter` unless `epoch` is above the current revision's; `EpochTooLarge`.
    pub fn enter_epoch(&mut self, epoch: u64, batch: &mut WriteBatch) -> Result<Rev, KvError> {
        if epoch > EPOCH_MAX {
            return Err(KvError::EpochTooLarge { epoch });
        }
        let current = epoch_of(self.current_rev);
        if epoch <= current {
            return Err(KvError::EpochNotAfter { epoch, current });
        }
        debug_assert_eq!(self.pending_subs, 0, "an epoch starts between operations");
        self.current_rev = epoch_start(epoch);
        batch.put(Cf::SmMeta, META_CURRENT_REV, self.current_rev.to_be_bytes().to_vec());
        self.compact(self.current_rev, batch)?;
        Ok(self.current_rev)
    }

    /// Drop history at and below `rev`, keeping each key's version as of `rev` if it is live.
    pub fn compact(&mut self, rev: Rev, batch: &mut WriteBatch) -> Result<(), KvError> {
        self.check_compact(rev)?;
        let mut emptied = Vec::new();
        for (key, vs) in self.index.iter_mut() {
            let at = vs.partition_point(|v| v.rev <= rev);
            if at == 0 {
                continue;
            }
            // Keep the version visible at `rev` unless it is a tombstone.
            let drop_to = if vs[at - 1].value.is_some() { at - 1 } else { at };
            for v in vs.drain(..drop_to) {
                batch.delete(Cf::Kv, rev_key(v.rev, v.sub).to_vec());
                self.bytes -= (key.len() + v.value.as_ref().map_or(0, |x| x.len())) as u64;
            }
            if vs.is_empty() {
                emptied.push(key.clone());
            }
        }
        for k in emptied {
            self.index.remove(&k);
        }
        // History from the compact revision on stays readable, as in etcd: the changes made at
        // `rev` itself are kept where their version was (a put; a tombstone at `rev` is gone).
        let kept_at_rev: Vec<_> = self
            .changes
            .range((rev, 0)..=(rev, u32::MAX))
            .filter(|((r, s), k)| self.index.get(&**k).is_some_and(|vs| vs.iter().any(|v| v.rev == *r && v.sub == *s)))
            .map(|(at, k)| (*at, k.clone()))
            .collect();
        self.changes = self.changes.split_off(&(rev + 1, 0));
        self.changes.extend(kept_at_rev);
        self.compact_rev = rev;
        batch.put(Cf::SmMeta, META_COMPACT_REV, rev.to_be_bytes().to_vec());
        Ok(())
    }

    /// A hash of every version at or below `rev` (0 = latest) that compaction has kept, for
    /// comparing replicas (Maintenance.HashKV). FNV-1a: cheap, and only ever compared with
    /// other geolock members.
    pub fn hash(&self, rev: Rev) -> Result<u32, KvError> {
        let rev = self.check_rev(rev)?;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x100_0000_01b3);
            }
        };
        for (k, vs) in &self.index {
            for v in vs.iter().take_while(|v| v.rev <= rev) {
                feed(k);
                feed(&v.rev.to_be_bytes());
                feed(&[u8::from(v.value.is_some())]);
                feed(v.value.as_deref().unwrap_or_default());
            }
        }
        Ok((h ^ (h >> 32)) as u32)
    }

    /// Changes with revision in `[from, to]` to keys in the range, oldest first, at most `max`.
    /// `from` must not be below the compaction point.
    pub fn history(&self, key: &[u8], range_end: &[u8], from: Rev, to: Rev, max: usize) -> Vec<Event> {
        let mut out = Vec::new();
        if from > to {
            return out;
        }
        for ((rev, sub), k) in self.changes.range((from, 0)..=(to, u32::MAX)) {
            if !in_range(k, key, range_end) {
                continue;
            }
            // A whole revision goes out together, so a watcher never sees half a Txn.
            if out.len() >= max && out.last().is_some_and(|e: &Event| e.kv.mod_revision != *rev) {
                break;
            }
            let vs = &self.index[k];
            let i = vs.partition_point(|v| (v.rev, v.sub) < (*rev, *sub));
            let v = &vs[i];
            let prev_kv = if i > 0 && vs[i - 1].value.is_some() { Some(Self::kv_of(k, &vs[i - 1])) } else { None };
            out.push(match v.value {
                Some(_) => Event { kind: EventKind::Put, kv: Self::kv_of(k, v), prev_kv },
                None => Event {
                    kind: EventKind::Delete,
                    kv: KeyValue { key: k.to_vec(), mod_revision: *rev, ..Default::default() },
                    prev_kv,
                },
            });
        }
        out
    }
}

fn decode_i64(v: &[u8]) -> Result<i64, StorageError> {
    v.try_into()
        .map(i64::from_be_bytes)
        .map_err(|_| StorageError::Corrupt { what: "revision", detail: format!("{} bytes, not 8", v.len()) })
}

/// etcd's check of a key in a request (its `checkRangeRequest` and `checkDeleteRequest`), and
/// geolock's bound on its length.
pub fn check_key(key: &[u8]) -> Result<(), KvError> {
    if key.is_empty() {
        Err(KvError::EmptyKey)
    } else if key.len() > crate::limits::KEY_BYTES_MAX {
        Err(KvError::KeyTooLarge { len: key.len(), max: crate::limits::KEY_BYTES_MAX })
    } else {
        Ok(())
    }
}

/// etcd's `checkPutRequest`: the key, then no value with `ignore_value`, no lease with
/// `ignore_lease`.
pub fn check_put(p: &PutRequest) -> Result<(), KvError> {
    check_key(&p.key)?;
    if p.ignore_value && !p.value.is_empty() {
        return Err(KvError::ValueProvided);
    }
    if p.ignore_lease && p.lease != 0 {
        return Err(KvError::LeaseProvided);
    }
    Ok(())
}

/// Check a Txn as etcd's Txn handler does, in its order: first its `checkTxnRequest` over the
/// whole tree ([`check_ops`]), then its duplicate-key rule on each branch ([`branch_writes`]).
/// The first broken rule is the error, as in etcd. Run before the request reaches Raft, and
/// again at apply.
pub fn validate_txn(t: &TxnRequest) -> Result<(), KvError> {
    check_ops(t, crate::limits::TXN_OPS_MAX, 1)?;
    for branch in [&t.success, &t.failure] {
        branch_writes(branch)?;
    }
    Ok(())
}

/// etcd's `checkTxnRequest`: each Txn may hold as many operations as the largest of its
/// compares, then-branch and else-branch, and a nested Txn gets what its parent left of the
/// budget (sibling Txns are not summed: only one branch of each runs); then the compares' keys,
/// then each operation of the then- and else-branches in turn, a nested Txn as a whole before
/// the operation after it.
fn check_ops(t: &TxnRequest, budget: usize, depth: usize) -> Result<(), KvError> {
    if depth > crate::limits::TXN_DEPTH_MAX {
        return Err(KvError::TxnTooDeep { max: crate::limits::TXN_DEPTH_MAX });
    }
    let ops = t.compare.len().max(t.success.len()).max(t.failure.len());
    if ops > budget {
        return Err(KvError::TooManyOps { ops, max: crate::limits::TXN_OPS_MAX });
    }
    for c in &t.compare {
        check_key(&c.key)?;
    }
    for op in t.success.iter().chain(&t.failure) {
        match op {
            RequestOp::Range(r) => check_key(&r.key)?,
            RequestOp::Put(p) => check_put(p)?,
            RequestOp::DeleteRange(d) => check_key(&d.key)?,
            RequestOp::Txn(inner) => check_ops(inner, budget - ops, depth + 1)?,
        }
    }
    Ok(())
}

/// A delete's keys as etcd's `checkIntervals` sees them: one key without a range end, else
/// `[key, range_end)` compared as plain bytes (so a range end of `\0`, "to the end" elsewhere,
/// covers nothing here, as in etcd).
fn deletes(d: &DeleteRangeRequest, key: &[u8]) -> bool {
    if d.range_end.is_empty() {
        key == d.key.as_slice()
    } else {
        key >= d.key.as_slice() && key < d.range_end.as_slice()
    }
}

/// etcd's duplicate-key rule for one branch (its `checkIntervals`): no key put twice, and no
/// key both put and deleted, where a nested Txn's then- and else-branches may put the same key
/// (only one runs). Returns the keys the branch puts and its deletes, for the level above.
fn branch_writes(ops: &[RequestOp]) -> Result<(BTreeSet<Vec<u8>>, Vec<&DeleteRangeRequest>), KvError> {
    let mut dels: Vec<&DeleteRangeRequest> = ops
        .iter()
        .filter_map(|op| match op {
            RequestOp::DeleteRange(d) => Some(d),
            _ => None,
        })
        .collect();
    let deleted = |dels: &[&DeleteRangeRequest], k: &[u8]| dels.iter().any(|d| deletes(d, k));
    let mut puts: BTreeSet<Vec<u8>> = BTreeSet::new();
    for op in ops {
        let RequestOp::Txn(t) = op else { continue };
        let (puts_then, dels_then) = branch_writes(&t.success)?;
        let (puts_else, dels_else) = branch_writes(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || deleted(&dels, k) {
                return Err(KvError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            if (puts.contains(k) && !puts_then.contains(k)) || deleted(&dels, k) {
                return Err(KvError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let RequestOp::Put(p) = op else { continue };
        if puts.contains(&p.key) || deleted(&dels, &p.key) {
            return Err(KvError::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemEngine;

    fn put(m: &mut Mvcc, b: &mut WriteBatch, k: &str, v: &str) -> Rev {
        let mut fx = WriteEffects::default();
        m.put(&PutRequest { key: k.into(), value: v.into(), ..Default::default() }, b, &mut fx).unwrap();
        m.finish(b)
    }

    fn keys(r: &RangeResponse) -> Vec<String> {
        r.kvs.iter().map(|kv| String::from_utf8(kv.key.clone()).unwrap()).collect()
    }

    #[test]
    fn revisions_start_where_etcd_starts() {
        let mut m = Mvcc::new();
        let mut b = WriteBatch::default();
        assert_eq!(m.current_rev(), 1);
        assert_eq!(put(&mut m, &mut b, "a", "1"), 2);
        assert_eq!(put(&mut m, &mut b, "a", "2"), 3);
        let kv = m.get(b"a").unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
    }

    #[test]
    fn range_conventions_limit_count_and_sort() {
        let mut m = Mvcc::new();
        let mut b = WriteBatch::default();
        for (k, v) in [("b", "3"), ("a", "2"), ("c", "1"), ("d", "0")] {
            put(&mut m, &mut b, k, v);
        }
        let all = RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() };
        assert_eq!(keys(&m.range(&all).unwrap()), ["a", "b", "c", "d"]);
        let from_b = RangeRequest { key: b"b".to_vec(), range_end: vec![0], ..Default::default() };
        assert_eq!(keys(&m.range(&from_b).unwrap()), ["b", "c", "d"]);
        let ab = RangeRequest { key: b"a".to_vec(), range_end: b"c".to_vec(), limit: 1, ..Default::default() };
        let r = m.range(&ab).unwrap();
        assert_eq!((keys(&r), r.more, r.count), (vec!["a".to_string()], true, 2));
        let by_value = RangeRequest { sort_target: SortTarget::Value, ..all.clone() };
        assert_eq!(keys(&m.range(&by_value).unwrap()), ["d", "c", "a", "b"]);
        let desc = RangeRequest { sort_order: SortOrder::Descend, ..all.clone() };
        assert_eq!(keys(&m.range(&desc).unwrap()), ["d", "c", "b", "a"]);
        let count = RangeRequest { count_only: true, ..all.clone() };
        let r = m.range(&count).unwrap();
        assert_eq!((r.kvs.len(), r.count), (0, 4));
        let backwards = RangeRequest { key: b"c".to_vec(), range_end: b"a".to_vec(), ..Default::default() };
        assert_eq!(m.range(&backwards).unwrap().count, 0);
    }

    #[test]
    fn reads_at_old_revisions_and_compaction() {
        let mut m = Mvcc::new();
        let mut b = WriteBatch::default();
        put(&mut m, &mut b, "k", "v1"); // 2
        put(&mut m, &mut b, "k", "v2"); // 3
        let mut fx = WriteEffects::default();
        m.delete_range(&DeleteRangeRequest { key: b"k".to_vec(), ..Default::default() }, &mut b, &mut fx);
        m.finish(&mut b); // 4
        let at = |m: &Mvcc, rev| m.range(&RangeRequest { key: b"k".to_vec(), revision: rev, ..Default::default() });
        assert_eq!(at(&m, 2).unwrap().kvs[0].value, b"v1");
        assert_eq!(at(&m, 3).unwrap().kvs[0].value, b"v2");
        assert_eq!(at(&m, 4).unwrap().count, 0);
        assert_eq!(at(&m, 5), Err(KvError::FutureRev { requested: 5, current: 4 }));
        m.compact(3, &mut b).unwrap();
        assert_eq!(at(&m, 2), Err(KvError::Compacted { requested: 2, compact_revision: 3 }));
        assert_eq!(at(&m, 3).unwrap().kvs[0].value, b"v2");
        assert_eq!(m.compact(3, &mut b), Err(KvError::Compacted { requested: 3, compact_revision: 3 }));
        m.compact(4, &mut b).unwrap();
        assert!(m.index.is_empty());
        assert_eq!(m.bytes(), 0);
    }

    #[test]
    fn history_has_every_change_in_order_with_prev_kv() {
        let mut m = Mvcc::new();
        let mut b = WriteBatch::default();
        put(&mut m, &mut b, "a", "1");
        put(&mut m, &mut b, "b", "1");
        put(&mut m, &mut b, "a", "2");
        let h = m.history(b"a", b"", 2, 10, 100);
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].prev_kv.as_ref().unwrap().value, b"1");
        assert_eq!(h[1].kv.mod_revision, 4);
    }

    /// etcd keeps a compacted revision's own puts readable (compaction removes revisions below
    /// it and tombstones at it): a watch from exactly the compact revision sees them.
    #[test]
    fn history_from_the_compact_revision_keeps_its_puts_and_drops_its_tombstones() {
        let engine = MemEngine::new();
        let mut m = Mvcc::new();
        let mut b = WriteBatch::default();
        put(&mut m, &mut b, "k", "a");
        let r = put(&mut m, &mut b, "k", "b");
        m.compact(r, &mut b).unwrap();
        let h = m.history(b"k", b"", r, m.current_rev(), 10);
        assert_eq!(h.len(), 1);
        assert_eq!((h[0].kind, h[0].kv.value.as_slice(), h[0].kv.mod_revision), (EventKind::Put, &b"b"[..], r));
        put(&mut m, &mut b, "d", "1");
        let mut fx = WriteEffects::default();
        m.delete_range(&DeleteRangeRequest { key: b"d".to_vec(), ..Default::default() }, &mut b, &mut fx);
        let del = m.finish(&mut b);
        m.compact(del, &mut b).unwrap();
        assert!(
            m.history(b"d", b"", del, m.current_rev(), 10).is_empty(),
            "a tombstone at the compact revision is gone"
        );
        engine.write(b, false).unwrap();
        let l = Mvcc::load(&*engine).unwrap();
        assert_eq!(l.changes, m.changes, "a restart reads the same history");
    }

    #[test]
    fn the_live_key_count_follows_puts_deletes_compaction_and_reload() {
        let engine = MemEngine::new();
        let mut m = Mvcc::new();
        let mut b = WriteBatch::default();
        let del = |m: &mut Mvcc, b: &mut WriteBatch, k: &str, end: &str| {
            let mut fx = WriteEffects::default();
            let r = DeleteRangeRequest { key: k.into(), range_end: end.into(), ..Default::default() };
            m.delete_range(&r, b, &mut fx);
            m.finish(b)
        };
        for (k, v) in [("a", "1"), ("a", "2"), ("b", "x"), ("c", "y"), ("d", "z")] {
            put(&mut m, &mut b, k, v);
        }
        assert_eq!((m.live_keys(), m.count_live()), (4, 4));
        del(&mut m, &mut b, "b", "d");
        assert_eq!((m.live_keys(), m.count_live()), (2, 2));
        let deleted = del(&mut m, &mut b, "zz", "");
        assert_eq!(m.live_keys(), 2, "deleting nothing changes nothing");
        put(&mut m, &mut b, "b", "again");
        m.compact(deleted, &mut b).unwrap();
        assert_eq!((m.live_keys(), m.count_live()), (3, 3));
        engine.write(b, false).unwrap();
        assert_eq!(Mvcc::load(&*engine).unwrap().live_keys(), 3);
    }

    #[test]
    fn load_rebuilds_what_was_committed() {
        let engine = MemEngine::new();
        let mut m = Mvcc::new();
        let mut b = WriteBatch::default();
        put(&mut m, &mut b, "a", "1");
        put(&mut m, &mut b, "a", "2");
        put(&mut m, &mut b, "b", "x");
        m.compact(3, &mut b).unwrap();
        engine.write(b, false).unwrap();
        let l = Mvcc::load(&*engine).unwrap();
        assert_eq!(l.current_rev(), m.current_rev());
        assert_eq!(l.compact_rev(), 3);
        assert_eq!(l.index, m.index);
        assert_eq!(l.changes, m.changes);
        assert_eq!(l.bytes(), m.bytes());
    }

    #[test]
    fn a_new_epoch_jumps_the_revision_past_every_earlier_one_and_compacts_what_came_before() {
        let engine = MemEngine::new();
        let mut m = Mvcc::new();
        let mut b = WriteBatch::default();
        put(&mut m, &mut b, "a", "1");
        put(&mut m, &mut b, "a", "2");
        assert_eq!(put(&mut m, &mut b, "b", "x"), 4);
        assert_eq!(m.enter_epoch(1, &mut b), Ok(1 << 40));
        assert_eq!((m.current_rev(), m.compact_rev(), epoch_of(m.current_rev())), (1 << 40, 1 << 40, 1));
        // A read or a watch from before the epoch is told to re-read.
        assert_eq!(m.check_rev(3), Err(KvError::Compacted { requested: 3, compact_revision: 1 << 40 }));
        let a = m.get(b"a").unwrap();
        assert_eq!((a.value, a.create_revision, a.mod_revision, a.version), (b"2".to_vec(), 2, 3, 2));
        // The next write, and a key (a lock's fencing token) created by it, come after all before.
        assert_eq!(put(&mut m, &mut b, "c", "y"), (1 << 40) + 1);
        assert_eq!(m.get(b"c").unwrap().create_revision, (1 << 40) + 1);
        for (epoch, err) in [
            (1, KvError::EpochNotAfter { epoch: 1, current: 1 }),
            (0, KvError::EpochNotAfter { epoch: 0, current: 1 }),
            (EPOCH_MAX + 1, KvError::EpochTooLarge { epoch: EPOCH_MAX + 1 }),
        ] {
            assert_eq!(m.enter_epoch(epoch, &mut b), Err(err));
        }
        assert_eq!(m.current_rev(), (1 << 40) + 1, "a refused epoch changes nothing");
        assert_eq!(m.enter_epoch(EPOCH_MAX, &mut b), Ok(epoch_start(EPOCH_MAX)));
        // The last epoch's last revision is the last i64.
        assert_eq!(epoch_start(EPOCH_MAX) + ((1 << REV_COUNTER_BITS) - 1), i64::MAX);
        engine.write(b, false).unwrap();
        let l = Mvcc::load(&*engine).unwrap();
        assert_eq!((l.current_rev(), l.compact_rev()), (epoch_start(EPOCH_MAX), epoch_start(EPOCH_MAX)));
        assert_eq!(l.index, m.index);
    }

    #[test]
    fn txn_validation_counts_and_rejects_duplicates() {
        let p = |k: &str| RequestOp::Put(PutRequest { key: k.into(), ..Default::default() });
        let ok = TxnRequest { success: vec![p("a"), p("b")], failure: vec![p("a")], ..Default::default() };
        assert_eq!(validate_txn(&ok), Ok(()));
        let dup = TxnRequest { success: vec![p("a"), p("a")], ..Default::default() };
        assert_eq!(validate_txn(&dup), Err(KvError::DuplicateKey));
        let many = TxnRequest { success: (0..129).map(|i| p(&i.to_string())).collect(), ..Default::default() };
        assert_eq!(validate_txn(&many), Err(KvError::TooManyOps { ops: 129, max: 128 }));
    }
}
