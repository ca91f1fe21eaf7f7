//! Integration tests: real `lockctl start` processes driven by Debian's etcdctl and by the
//! `etcd-client` crate, compared with a real etcd where output can be compared.

mod auth;
mod bad_input;
mod client_tls;
mod cluster;
mod common;
mod crash;
mod differential;
mod failover_controller;
mod failover_dns;
mod failover_fence;
mod failover_geo;
mod failover_lease;
mod failover_promote;
mod geo;
mod kv;
mod lease;
mod linearizability;
mod lock;
mod maintenance;
mod membership;
mod observability;
mod partition;
mod wan;
mod watch;
