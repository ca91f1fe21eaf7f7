//! geolock: a geo-replicated lock and coordination service that speaks the etcd v3 API.
//!
//! Modules are layered, lowest first; a module never imports one above it:
//! 1. [`config`], [`limits`], [`topology`] (region layouts)
//! 2. [`storage`] (the only importer of RocksDB), [`transport`] (the only importer of quinn),
//!    [`relay`] (WAN latency for the local multi-region harness),
//!    [`certs`] (development certificates)
//! 3. [`kv`], [`lease`], [`watch`], [`lock`], [`machine`]: pure and deterministic
//! 4. [`raft`] (the only importer of openraft)
//! 5. [`api`] (tonic services and the error table), [`roles`] (wiring per role), [`dev`] (a local cluster),
//!    [`geo`] (a local multi-region topology), [`client`] and [`cli`]

pub mod api;
pub mod certs;
pub mod cli;
pub mod client;
pub mod config;
pub mod dev;
pub mod geo;
pub mod kv;
pub mod lease;
pub mod limits;
pub mod lock;
pub mod machine;
pub mod raft;
pub mod relay;
pub mod roles;
pub mod storage;
pub mod topology;
pub mod transport;
pub mod watch;
