//! The RocksDB engine: the only module that imports `rocksdb`. It meets the contract of
//! [`geolock_core::storage::Engine`], and passes the same suite as the in-memory twin.

use std::path::Path;
use std::sync::Arc;

use geolock_core::storage::{Cf, Engine, Op, Pairs, Result, StorageError, WriteBatch};

fn storage_error(e: rocksdb::Error) -> StorageError {
    StorageError::Engine(e.into_string())
}

/// How much a member keeps, which sizes its engine's buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Footprint {
    /// The key space and the log (voters and learners).
    Data,
    /// The tail of the log only (a witness): small buffers, so memory and disk stay bounded.
    LogTail,
}

/// The RocksDB engine.
pub struct RocksEngine {
    db: rocksdb::DB,
}

impl RocksEngine {
    /// Open (creating if needed) the database at `path` with every column family, sized for
    /// what the member keeps.
    pub fn open_sized(path: &Path, footprint: Footprint) -> Result<Arc<Self>> {
        let mut opts = rocksdb::Options::default();
        // Reused WAL files are already allocated and as long as what is written to them, so the
        // group commit's fdatasync writes the data alone, not also the inode's new size (on
        // ext4, about a third of the sync). RocksDB reuses only WALs that have retired, so their
        // total is bounded (a witness's more tightly): past the bound, the column
        // families still holding the oldest WAL are flushed.
        opts.set_recycle_log_file_num(geolock_core::limits::WAL_FILES_RECYCLED);
        opts.set_max_total_wal_size(match footprint {
            Footprint::Data => geolock_core::limits::WAL_BYTES_MAX,
            Footprint::LogTail => geolock_core::limits::WITNESS_WAL_BYTES_MAX,
        });
        let witness_cache = (footprint == Footprint::LogTail).then(|| {
            opts.set_db_write_buffer_size(geolock_core::limits::WITNESS_WRITE_BUFFER_BYTES * 2);
            rocksdb::Cache::new_lru_cache(geolock_core::limits::WITNESS_BLOCK_CACHE_BYTES)
        });
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Writes stay in RocksDB's WAL buffer until `sync_wal` (the log's group-commit flusher)
        // writes and syncs them in one go: no write syscall on the path of each write.
        opts.set_manual_wal_flush(true);
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(4);
        let cfs = Cf::ALL.iter().map(|cf| {
            let mut o = rocksdb::Options::default();
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            // Larger than the WAL bound, so that only the bound switches WALs: every column
            // family is flushed at once, and the old WAL retires before the next switch, which
            // then reuses it at the size it was written to.
            o.set_write_buffer_size(geolock_core::limits::WAL_BYTES_MAX as usize * 2);
            if let Some(cache) = &witness_cache {
                o.set_write_buffer_size(geolock_core::limits::WITNESS_WRITE_BUFFER_BYTES);
                o.set_max_write_buffer_number(2);
                let mut table = rocksdb::BlockBasedOptions::default();
                table.set_block_cache(cache);
                o.set_block_based_table_factory(&table);
            }
            rocksdb::ColumnFamilyDescriptor::new(cf.name(), o)
        });
        let db = rocksdb::DB::open_cf_descriptors(&opts, path, cfs).map_err(storage_error)?;
        Ok(Arc::new(RocksEngine { db }))
    }

    fn cf(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(cf.name()).expect("every column family is created at open")
    }
}

impl Drop for RocksEngine {
    /// What is still in the WAL buffer reaches the disk on a clean close.
    fn drop(&mut self) {
        if let Err(e) = self.db.flush_wal(true) {
            tracing::warn!("storage: WAL flush on close: {e}");
        }
    }
}

impl Engine for RocksEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db.get_cf(self.cf(cf), key).map_err(storage_error)
    }

    fn scan(&self, cf: Cf, from: &[u8], to: Option<&[u8]>, limit: usize) -> Result<Pairs> {
        let mut ro = rocksdb::ReadOptions::default();
        if let Some(to) = to {
            ro.set_iterate_upper_bound(to.to_vec());
        }
        let mode = rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(self.cf(cf), ro, mode) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(storage_error)?;
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    fn last(&self, cf: Cf) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let mut it = self.db.iterator_cf(self.cf(cf), rocksdb::IteratorMode::End);
        match it.next() {
            Some(item) => {
                let (k, v) = item.map_err(storage_error)?;
                Ok(Some((k.into_vec(), v.into_vec())))
            }
            None => Ok(None),
        }
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let mut wb = rocksdb::WriteBatch::default();
        for op in batch.into_ops() {
            match op {
                Op::Put(cf, k, v) => wb.put_cf(self.cf(cf), k, v),
                Op::Delete(cf, k) => wb.delete_cf(self.cf(cf), k),
                Op::DeleteRange(cf, from, to) => wb.delete_range_cf(self.cf(cf), from, to),
            }
        }
        self.db.write(wb).map_err(storage_error)?;
        if sync {
            self.sync_wal()?;
        }
        Ok(())
    }

    fn scan_at_instant(&self, cfs: &[Cf], at: &mut dyn FnMut()) -> Result<Vec<(Cf, Pairs)>> {
        let snapshot = self.db.snapshot();
        at();
        let mut out = Vec::new();
        for cf in cfs {
            let mut ro = rocksdb::ReadOptions::default();
            ro.set_snapshot(&snapshot);
            let mut pairs = Vec::new();
            for item in self.db.iterator_cf_opt(self.cf(*cf), ro, rocksdb::IteratorMode::Start) {
                let (k, v) = item.map_err(storage_error)?;
                pairs.push((k.into_vec(), v.into_vec()));
            }
            out.push((*cf, pairs));
        }
        Ok(out)
    }

    fn sync_wal(&self) -> Result<()> {
        self.db.flush_wal(true).map_err(storage_error)
    }

    fn size_bytes(&self) -> u64 {
        Cf::ALL
            .iter()
            .filter_map(|cf| self.db.property_int_value_cf(self.cf(*cf), "rocksdb.total-sst-files-size").ok().flatten())
            .sum::<u64>()
            + self.db.property_int_value("rocksdb.cur-size-all-mem-tables").ok().flatten().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geolock_core::storage::engine_suite;

    #[test]
    fn rocks_engine_meets_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        engine_suite(&*RocksEngine::open_sized(dir.path(), Footprint::Data).unwrap());
    }

    #[test]
    fn rocks_engine_keeps_synced_writes_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let e = RocksEngine::open_sized(dir.path(), Footprint::Data).unwrap();
            let mut b = WriteBatch::default();
            b.put(Cf::Log, 7u64.to_be_bytes().to_vec(), b"entry".to_vec());
            e.write(b, false).unwrap();
            e.sync_wal().unwrap();
        }
        let e = RocksEngine::open_sized(dir.path(), Footprint::Data).unwrap();
        assert_eq!(e.get(Cf::Log, &7u64.to_be_bytes()).unwrap(), Some(b"entry".to_vec()));
    }
}
