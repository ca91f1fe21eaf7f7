//! What runs geolock locally the way it runs across regions, for `lockctl dev`, the tests and the
//! benches: topology files ([`topology`]), the WAN relay ([`relay`]), the multi-region harness
//! ([`geo`]), development certificates ([`certs`]), a real BIND9 ([`bind`]), an OTLP trace
//! receiver ([`otlp`]) and the one process launcher ([`launch`]).
//!
//! It starts `lockctl` processes and talks to them over the etcd API; it links no server code.

pub mod bind;
pub mod certs;
pub mod geo;
pub mod launch;
pub mod otlp;
pub mod relay;
pub mod tcp_relay;
pub mod topology;
