//! The storage engine contract: a few ordered key-value column families with atomic batches and
//! an explicit WAL sync. The server crate's `RocksEngine` is the real engine; [`MemEngine`] is
//! its in-memory twin for pure tests. Both pass the same suite, [`engine_suite`].
//!
//! Nothing here depends on RocksDB: the core crate builds without it, as TiKV's `engine_traits`
//! cannot depend on its RocksDB implementation.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

/// Column families, as DESIGN.md lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    /// Raft log entries, keyed by big-endian index.
    Log,
    /// Raft vote and purge marker.
    RaftMeta,
    /// The MVCC key space, keyed by revision.
    Kv,
    /// Leases, keyed by id.
    Lease,
    /// State-machine metadata: last applied log id, membership, revisions.
    SmMeta,
    /// Users, roles and whether authentication is on ([`crate::auth::AuthStore`]).
    Auth,
}

impl Cf {
    /// Every column family, in a fixed order.
    pub const ALL: [Cf; 6] = [Cf::Log, Cf::RaftMeta, Cf::Kv, Cf::Lease, Cf::SmMeta, Cf::Auth];

    /// The column family's name on disk.
    pub fn name(self) -> &'static str {
        match self {
            Cf::Log => "log",
            Cf::RaftMeta => "raft_meta",
            Cf::Kv => "kv",
            Cf::Lease => "lease",
            Cf::SmMeta => "sm_meta",
            Cf::Auth => "auth",
        }
    }
}

/// A storage failure. Callers treat it as fatal for the node: a store that cannot write
/// cannot promise durability.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The engine failed, in its own words (RocksDB's errors are text).
    #[error("storage: {0}")]
    Engine(String),
    /// A stored `what` record does not read back: the store is damaged, or was written by
    /// another version.
    #[error("storage: a stored {what} does not decode: {detail}")]
    Corrupt { what: &'static str, detail: String },
}

/// Result of a storage operation.
pub type Result<T> = std::result::Result<T, StorageError>;

/// One mutation in a [`WriteBatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Put(Cf, Vec<u8>, Vec<u8>),
    /// Remove `key`.
    Delete(Cf, Vec<u8>),
    /// Remove every key in `[from, to)`.
    DeleteRange(Cf, Vec<u8>, Vec<u8>),
}

/// Mutations applied atomically, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    ops: Vec<Op>,
}

impl WriteBatch {
    /// Queue a put.
    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put(cf, key.into(), value.into()));
    }
    /// Queue a delete.
    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete(cf, key.into()));
    }
    /// Queue the deletion of `[from, to)`.
    pub fn delete_range(&mut self, cf: Cf, from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) {
        self.ops.push(Op::DeleteRange(cf, from.into(), to.into()));
    }
    /// True if nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    /// The queued mutations.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }
    /// The queued mutations, owned, for an engine to apply.
    pub fn into_ops(self) -> Vec<Op> {
        self.ops
    }
}

/// Key-value pairs in key order.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// An ordered, durable key-value engine.
pub trait Engine: Send + Sync + 'static {
    /// Read one key.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Up to `limit` pairs with `from <= key < to` (`to = None`: to the end), in key order.
    fn scan(&self, cf: Cf, from: &[u8], to: Option<&[u8]>, limit: usize) -> Result<Pairs>;
    /// The pair with the greatest key, if any.
    fn last(&self, cf: Cf) -> Result<Option<(Vec<u8>, Vec<u8>)>>;
    /// Apply `batch` atomically. With `sync`, it is on stable storage when this returns;
    /// without, it is ordered before any later [`Engine::sync_wal`].
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()>;
    /// Every pair of `cfs` as they stood at one instant: the instant at which `at` is called.
    /// A caller that holds a lock over its writes calls this under that lock and releases it in
    /// `at`, so the writer waits only for the instant to be fixed, not for the whole scan.
    fn scan_at_instant(&self, cfs: &[Cf], at: &mut dyn FnMut()) -> Result<Vec<(Cf, Pairs)>>;
    /// Make every write made so far durable.
    fn sync_wal(&self) -> Result<()>;
    /// Approximate bytes on disk (or in memory for the twin).
    fn size_bytes(&self) -> u64;
}

/// Every column family's pairs, in key order.
type Columns = BTreeMap<Cf, BTreeMap<Vec<u8>, Vec<u8>>>;

/// The in-memory twin of the server's `RocksEngine`: same contract, nothing durable.
#[derive(Default)]
pub struct MemEngine {
    cfs: Mutex<Columns>,
}

impl MemEngine {
    /// An empty engine.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
}

impl Engine for MemEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.cfs.lock().unwrap().get(&cf).and_then(|m| m.get(key).cloned()))
    }

    fn scan(&self, cf: Cf, from: &[u8], to: Option<&[u8]>, limit: usize) -> Result<Pairs> {
        let cfs = self.cfs.lock().unwrap();
        let Some(m) = cfs.get(&cf) else { return Ok(Vec::new()) };
        let upper = match to {
            Some(to) => Bound::Excluded(to.to_vec()),
            None => Bound::Unbounded,
        };
        if matches!(to, Some(to) if to <= from) {
            return Ok(Vec::new());
        }
        Ok(m.range((Bound::Included(from.to_vec()), upper)).take(limit).map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn last(&self, cf: Cf) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let cfs = self.cfs.lock().unwrap();
        Ok(cfs.get(&cf).and_then(|m| m.iter().next_back().map(|(k, v)| (k.clone(), v.clone()))))
    }

    fn write(&self, batch: WriteBatch, _sync: bool) -> Result<()> {
        let mut cfs = self.cfs.lock().unwrap();
        for op in batch.ops {
            match op {
                Op::Put(cf, k, v) => {
                    cfs.entry(cf).or_default().insert(k, v);
                }
                Op::Delete(cf, k) => {
                    cfs.entry(cf).or_default().remove(&k);
                }
                Op::DeleteRange(cf, from, to) => {
                    let m = cfs.entry(cf).or_default();
                    if from < to {
                        let doomed: Vec<_> = m.range(from..to).map(|(k, _)| k.clone()).collect();
                        for k in doomed {
                            m.remove(&k);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn scan_at_instant(&self, cfs: &[Cf], at: &mut dyn FnMut()) -> Result<Vec<(Cf, Pairs)>> {
        let copy: Vec<(Cf, Pairs)> = {
            let all = self.cfs.lock().unwrap();
            let pairs = |cf: &Cf| all.get(cf).map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
            cfs.iter().map(|cf| (*cf, pairs(cf).unwrap_or_default())).collect()
        };
        at();
        Ok(copy)
    }

    fn sync_wal(&self) -> Result<()> {
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        let cfs = self.cfs.lock().unwrap();
        cfs.values().flat_map(|m| m.iter()).map(|(k, v)| (k.len() + v.len()) as u64).sum()
    }
}

/// The contract every engine must meet; run against both engines (the server crate runs it on
/// RocksDB). Panics on the first breach.
#[cfg(any(test, feature = "engine-suite"))]
pub fn engine_suite(e: &dyn Engine) {
    assert_eq!(e.get(Cf::Kv, b"a").unwrap(), None);
    assert_eq!(e.last(Cf::Kv).unwrap(), None);
    let mut b = WriteBatch::default();
    for k in [b"a", b"b", b"c", b"d"] {
        b.put(Cf::Kv, k.to_vec(), k.to_vec());
    }
    b.put(Cf::Lease, b"a".to_vec(), b"other-cf".to_vec());
    e.write(b, true).unwrap();
    assert_eq!(e.get(Cf::Kv, b"b").unwrap(), Some(b"b".to_vec()));
    assert_eq!(e.get(Cf::Lease, b"a").unwrap(), Some(b"other-cf".to_vec()));
    let keys = |p: Pairs| p.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(keys(e.scan(Cf::Kv, b"b", Some(b"d"), 10).unwrap()), vec![b"b".to_vec(), b"c".to_vec()]);
    assert_eq!(keys(e.scan(Cf::Kv, b"", None, 2).unwrap()), vec![b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(e.scan(Cf::Kv, b"c", Some(b"a"), 10).unwrap(), vec![]);
    assert_eq!(e.last(Cf::Kv).unwrap(), Some((b"d".to_vec(), b"d".to_vec())));
    let mut b = WriteBatch::default();
    b.delete(Cf::Kv, b"a".to_vec());
    b.delete_range(Cf::Kv, b"b".to_vec(), b"d".to_vec());
    b.put(Cf::Kv, b"e".to_vec(), b"e2".to_vec());
    e.write(b, false).unwrap();
    e.sync_wal().unwrap();
    assert_eq!(keys(e.scan(Cf::Kv, b"", None, 10).unwrap()), vec![b"d".to_vec(), b"e".to_vec()]);
    // A scan at an instant sees nothing written after it, even while it is still reading.
    let mut later = WriteBatch::default();
    later.put(Cf::Kv, b"f".to_vec(), b"f".to_vec());
    let mut later = Some(later);
    let seen = e.scan_at_instant(&[Cf::Kv, Cf::Lease], &mut || e.write(later.take().unwrap(), false).unwrap()).unwrap();
    assert_eq!(
        seen.iter().map(|(cf, p)| (*cf, keys(p.clone()))).collect::<Vec<_>>(),
        vec![(Cf::Kv, vec![b"d".to_vec(), b"e".to_vec()]), (Cf::Lease, vec![b"a".to_vec()]),]
    );
    assert_eq!(e.get(Cf::Kv, b"f").unwrap(), Some(b"f".to_vec()));
    assert_eq!(e.get(Cf::Lease, b"a").unwrap(), Some(b"other-cf".to_vec()));
    assert!(e.size_bytes() > 0 || e.get(Cf::Kv, b"e").unwrap().is_some());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_engine_meets_the_contract() {
        engine_suite(&*MemEngine::new());
    }
}
