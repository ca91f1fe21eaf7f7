//! The geolock server: everything a member process runs over the pure core.
//!
//! Modules, lowest first; a module never imports one above it:
//! 1. [`config`] (flags, environment and file), [`auth`] (tokens and passwords), [`metrics`] (the Prometheus registry), [`otel`]
//!    (OpenTelemetry traces), [`rocks`] (the only importer of RocksDB),
//!    [`reload`] (files read again while running), [`transport`] (the only importer of quinn),
//!    [`client_tls`] (the client port's TLS)
//! 2. [`raft`] (the only importer of openraft)
//! 3. [`api`] (tonic services and the one table that maps errors to gRPC statuses)
//! 4. [`roles`] (composition: what each role runs)
//!
//! Only [`config`] and [`roles`] are public (`lockctl` starts a member with them); everything
//! else is the crate's own, so the compiler reports what nothing uses.

// The health checks' futures nest the API, the node and openraft's calls deeper than rustc's
// default layout query limit of 128.
#![recursion_limit = "256"]

mod api;
mod auth;
mod client_tls;
pub mod config;
mod metrics;
mod otel;
mod otlp_metrics;
mod raft;
mod reload;
mod rocks;
pub mod roles;
mod transport;
