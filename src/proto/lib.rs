//! Code generated from `proto/`: etcd's packages, services and messages, and geolock's own
//! `geolockpb.Failover` (the region failover controller's calls).
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// The gRPC metadata key that carries a new member's name in MemberAdd (etcd's request has no
/// name field; `lockctl member add` sets it, and a member ID is derived from its name).
pub const MEMBER_NAME_HEADER: &str = "geolock-member-name";

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
