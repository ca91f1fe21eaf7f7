//! Code generated from `proto/`: etcd's packages, services and messages, and geolock's own
//! `geolockpb.Failover` (the region failover controller's calls).
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// The gRPC metadata key that carries a new member's name in MemberAdd (etcd's request has no
/// name field; `lockctl member add` sets it, and a member ID is derived from its name).
pub const MEMBER_NAME_HEADER: &str = "geolock-member-name";

/// Every method of every service above: `(service, method, grpc_type)`, with the service's
/// full name (`etcdserverpb.KV`) and go-grpc-prometheus's type names (`unary`,
/// `client_stream`, `server_stream`, `bidi_stream`).
pub mod methods {
    include!(concat!(env!("OUT_DIR"), "/grpc_methods.rs"));
}

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}
pub mod authpb {
    tonic::include_proto!("authpb");
}
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}
/// geolock's own calls, for the region failover controller.
pub mod geolockpb {
    tonic::include_proto!("geolockpb");
}
