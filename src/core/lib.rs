//! geolock's pure core: the MVCC key space, the lessor, watches, locks and elections, and the
//! replicated state machine over them, with every limit and the storage engine contract.
//!
//! Pure and deterministic: time is passed in, nothing here does I/O of its own beyond the
//! [`storage::Engine`] it is handed, and no tokio, tonic, openraft, rocksdb or quinn is in this
//! crate's dependency tree (`tests/run` checks). Modules, lowest first: [`limits`], [`storage`],
//! [`kv`], [`lease`], [`watch`], [`lock`], [`machine`]; [`member`] (member identity).

pub mod auth;
pub mod kv;
pub mod lease;
pub mod limits;
pub mod lock;
pub mod machine;
pub mod member;
pub mod storage;
pub mod watch;
