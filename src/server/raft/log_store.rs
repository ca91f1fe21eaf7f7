//! The Raft log in the `log` column family, the vote and the purge mark in `raft_meta`.
//!
//! Durability by group commit: `append` writes entries without syncing (so they are readable at
//! once) and hands the completion callback to one flusher thread, which syncs the WAL once for
//! every callback waiting and then completes them all, in order. Since the WAL is one sequential
//! file, one sync covers every earlier write, and completing append N vouches for all before it.
//!
//! openraft reads every entry back right after appending it, to replicate it and again to apply
//! it. A RocksDB read makes an iterator over every SST file, ~17 µs per entry measured on a
//! leader with a warm database, twice on the path of each write; so the newest entries are also
//! kept in memory ([`Tail`]), exactly as they are in the log, and served from there.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::{LogState, OptionalSend, RaftLogReader};

use super::format::encode;
use super::TypeConfig;
use geolock_core::limits::{LOG_APPEND_BATCH_ENTRIES_MAX, LOG_TAIL_CACHE_BYTES_MAX};
use geolock_core::storage::{Cf, Engine, WriteBatch};

type TC = TypeConfig;

/// How long the flusher polls for the next append before it sleeps, when one writer waits on
/// each sync: about one put's turnaround outside the sync.
const LOG_FLUSHER_SPIN_US: u64 = 300;

pub(super) const VOTE: &[u8] = b"vote";
const PURGED: &[u8] = b"purged";

/// etcd's WAL fsync latency: here each group commit's sync of RocksDB's WAL (and a vote's).
/// etcd's buckets: 1 ms doubling to 8.192 s.
pub(super) static WAL_FSYNC_SECONDS: std::sync::LazyLock<prometheus::Histogram> = std::sync::LazyLock::new(|| {
    crate::metrics::histogram(
        "etcd_disk_wal_fsync_duration_seconds",
        "Latency of the log's syncs to disk, each covering one group commit.",
        crate::metrics::exponential(0.001, 2.0, 14),
    )
});

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> io::Result<T> {
    Ok(super::format::decode(b)?)
}

/// The log store; clones share the engine and the flusher.
#[derive(Clone)]
pub struct LogStore {
    engine: Arc<dyn Engine>,
    tail: Arc<Mutex<Tail>>,
    flusher: mpsc::Sender<(IOFlushed<TC>, usize)>,
}

impl LogStore {
    /// A log store over `engine`, with its flusher thread (which ends when every clone is gone).
    pub fn new(engine: Arc<dyn Engine>) -> Self {
        let (tx, rx) = mpsc::channel::<(IOFlushed<TC>, usize)>();
        // Weak, so that the engine closes where its owners drop it and never in this detached
        // thread, which could still be closing RocksDB while the process exits (RocksDB aborts).
        let e = Arc::downgrade(&engine);
        std::thread::Builder::new()
            .name("geolock-log-flush".into())
            .spawn(move || {
                let mut spin = false;
                while let Some(first) = next_callback(&rx, spin) {
                    let mut group = vec![first];
                    group.extend(rx.try_iter());
                    spin = group.iter().map(|(_, entries)| entries).sum::<usize>() == 1;
                    let res = match e.upgrade() {
                        Some(e) => {
                            let _timer = WAL_FSYNC_SECONDS.start_timer();
                            e.sync_wal().map_err(|err| err.to_string())
                        }
                        None => Err("the storage engine is closed".to_string()),
                    };
                    for (cb, _) in group {
                        cb.io_completed(res.clone().map_err(io::Error::other));
                    }
                }
            })
            .expect("spawn the log flusher");
        LogStore { engine, tail: Arc::default(), flusher: tx }
    }

    /// Write `batch`, then keep its entries in the tail.
    fn write_and_keep(&self, batch: WriteBatch, entries: Vec<(u64, Vec<u8>)>) -> io::Result<()> {
        self.engine.write(batch, false).map_err(io_err)?;
        let mut tail = self.tail.lock().expect("log tail lock");
        for (index, bytes) in entries {
            tail.push(index, bytes);
        }
        Ok(())
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        match self.engine.get(Cf::RaftMeta, key).map_err(io_err)? {
            Some(b) => Ok(Some(decode(&b)?)),
            None => Ok(None),
        }
    }
}

/// The next callback to complete, or `None` once every sender is gone. With `spin` (the last
/// sync covered a single entry: one writer waits on each sync) it polls for a while before
/// it sleeps, since waking a sleeping thread costs a good part of a sync on this class of
/// machine. Under load a sync covers several entries (the writes that arrived during the last
/// one are appended together), and it sleeps at once: spinning then only takes the CPU from
/// the runtime (on two cores, 16-client put throughput fell by a tenth).
fn next_callback(rx: &mpsc::Receiver<(IOFlushed<TC>, usize)>, spin: bool) -> Option<(IOFlushed<TC>, usize)> {
    let spin_us = if spin { LOG_FLUSHER_SPIN_US } else { 0 };
    let spin_until = Instant::now() + Duration::from_micros(spin_us);
    while Instant::now() < spin_until {
        match rx.try_recv() {
            Ok(cb) => return Some(cb),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) => std::thread::yield_now(),
        }
    }
    rx.recv().ok()
}

/// The newest entries of the log, encoded, at consecutive indexes from `first`: a copy of the
/// log's tail, never of anything else. Appends extend it (a gap starts it anew), truncation and
/// purges cut it as they cut the log, and the oldest entries go past
/// [`LOG_TAIL_CACHE_BYTES_MAX`].
#[derive(Default)]
struct Tail {
    first: u64,
    entries: VecDeque<Vec<u8>>,
    bytes: usize,
}

impl Tail {
    fn end(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    fn push(&mut self, index: u64, entry: Vec<u8>) {
        if self.entries.is_empty() || index != self.end() {
            *self = Tail { first: index, ..Tail::default() };
        }
        self.bytes += entry.len();
        self.entries.push_back(entry);
        while self.bytes > LOG_TAIL_CACHE_BYTES_MAX {
            let Some(old) = self.entries.pop_front() else { break };
            self.bytes -= old.len();
            self.first += 1;
        }
    }

    /// Forget the entries at `from` and after.
    fn truncate(&mut self, from: u64) {
        while self.end() > from.max(self.first) {
            let Some(e) = self.entries.pop_back() else { break };
            self.bytes -= e.len();
        }
    }

    /// Forget the entries up to and including `upto`.
    fn purge(&mut self, upto: u64) {
        while self.first <= upto {
            let Some(e) = self.entries.pop_front() else { break };
            self.bytes -= e.len();
            self.first += 1;
        }
    }

    /// Entries `from..to`, if every one of them is here.
    fn get(&self, from: u64, to: u64) -> Option<impl Iterator<Item = &Vec<u8>>> {
        if self.entries.is_empty() || from < self.first || to > self.end() {
            return None;
        }
        Some(self.entries.range((from - self.first) as usize..(to - self.first) as usize))
    }
}

fn index_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

impl RaftLogReader<TC> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<TC>>, io::Error> {
        let from = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(i) => i.checked_add(1),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        if to.is_some_and(|t| t <= from) {
            return Ok(Vec::new());
        }
        if let Some(to) = to {
            let tail = self.tail.lock().expect("log tail lock");
            let kept: Option<io::Result<Vec<_>>> = tail.get(from, to).map(|es| es.map(|e| decode(e)).collect());
            if let Some(entries) = kept {
                return entries;
            }
        }
        let to_key = to.map(index_key);
        let pairs =
            self.engine.scan(Cf::Log, &index_key(from), to_key.as_ref().map(|k| &k[..]), usize::MAX).map_err(io_err)?;
        pairs.iter().map(|(_, v)| decode(v)).collect()
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TC>>, io::Error> {
        self.meta(VOTE)
    }
}

impl RaftLogStorage<TC> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TC>, io::Error> {
        let purged: Option<LogIdOf<TC>> = self.meta(PURGED)?;
        let last = match self.engine.last(Cf::Log).map_err(io_err)? {
            Some((_, v)) => Some(decode::<EntryOf<TC>>(&v)?.log_id),
            None => purged,
        };
        Ok(LogState { last_purged_log_id: purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TC>) -> Result<(), io::Error> {
        let mut b = WriteBatch::default();
        b.put(Cf::RaftMeta, VOTE, encode(vote));
        // A vote is durable before it is acted on; the sync also covers earlier appends.
        let _timer = WAL_FSYNC_SECONDS.start_timer();
        self.engine.write(b, true).map_err(io_err)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TC>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<TC>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut b = WriteBatch::default();
        let mut written = Vec::new();
        let mut n = 0;
        for e in entries {
            let bytes = encode(&e);
            b.put(Cf::Log, index_key(e.log_id.index).to_vec(), bytes.clone());
            written.push((e.log_id.index, bytes));
            n += 1;
            if n % LOG_APPEND_BATCH_ENTRIES_MAX == 0 {
                self.write_and_keep(std::mem::take(&mut b), std::mem::take(&mut written))?;
            }
        }
        self.write_and_keep(b, written)?;
        self.flusher.send((callback, n)).map_err(|_| io_err("log flusher stopped"))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<TC>>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        let mut b = WriteBatch::default();
        b.delete_range(Cf::Log, index_key(from).to_vec(), index_key(u64::MAX).to_vec());
        b.delete(Cf::Log, index_key(u64::MAX).to_vec());
        self.tail.lock().expect("log tail lock").truncate(from);
        self.engine.write(b, false).map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogIdOf<TC>) -> Result<(), io::Error> {
        let mut b = WriteBatch::default();
        b.put(Cf::RaftMeta, PURGED, encode(&log_id));
        b.delete_range(Cf::Log, index_key(0).to_vec(), index_key(log_id.index + 1).to_vec());
        self.tail.lock().expect("log tail lock").purge(log_id.index);
        self.engine.write(b, false).map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn indexes(t: &Tail, from: u64, to: u64) -> Option<Vec<u8>> {
        t.get(from, to).map(|es| es.map(|e| e[0]).collect())
    }

    #[test]
    fn tail_mirrors_appends_truncation_and_purges() {
        let mut t = Tail::default();
        assert_eq!(indexes(&t, 0, 1), None);
        for i in 5..10u64 {
            t.push(i, vec![i as u8]);
        }
        assert_eq!(indexes(&t, 5, 10), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(indexes(&t, 7, 8), Some(vec![7]));
        assert_eq!(indexes(&t, 4, 6), None, "index 4 was never kept");
        assert_eq!(indexes(&t, 9, 11), None, "index 10 is not in the log");

        t.truncate(8);
        assert_eq!(indexes(&t, 5, 8), Some(vec![5, 6, 7]));
        assert_eq!(indexes(&t, 8, 9), None);
        t.push(8, vec![80]);
        assert_eq!(indexes(&t, 7, 9), Some(vec![7, 80]), "the rewritten entry, not the old one");

        t.purge(6);
        assert_eq!(indexes(&t, 6, 7), None);
        assert_eq!(indexes(&t, 7, 9), Some(vec![7, 80]));

        t.push(20, vec![20]);
        assert_eq!(indexes(&t, 7, 8), None, "a gap starts the tail anew");
        assert_eq!(indexes(&t, 20, 21), Some(vec![20]));

        t.truncate(3);
        assert_eq!(indexes(&t, 20, 21), None);
        assert_eq!(t.bytes, 0);
    }

    #[test]
    fn tail_keeps_only_the_newest_bytes() {
        let mut t = Tail::default();
        let entry = LOG_TAIL_CACHE_BYTES_MAX / 4;
        for i in 0..10u64 {
            t.push(i, vec![i as u8; entry]);
        }
        assert!(t.bytes <= LOG_TAIL_CACHE_BYTES_MAX);
        assert_eq!(indexes(&t, 6, 10), Some(vec![6, 7, 8, 9]));
        assert_eq!(indexes(&t, 5, 10), None);
    }
}
