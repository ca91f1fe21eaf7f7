//! `geolockpb.Failover`: the region failover controller's calls on a member (served on every
//! role: a witness votes, so fencing one counts toward the old voters' majority). Each is a
//! root user's while authentication is on, as etcd's membership changes are.

use tonic::{Request, Response, Status};

use super::{Api, ApiError, Credentials};
use geolock_core::kv::EPOCH_MAX;
use geolock_proto::geolockpb as fpb;

#[tonic::async_trait]
impl fpb::failover_server::Failover for Api {
    async fn fence(&self, req: Request<fpb::FenceRequest>) -> Result<Response<fpb::FenceResponse>, Status> {
        self.as_caller(&Credentials::of(&req)).await?.must_be_admin()?;
        let epoch = req.into_inner().epoch;
        if epoch == 0 || epoch > EPOCH_MAX {
            return Err(ApiError::InvalidArgument(format!(
                "geolock: a fence names the new primary's revision epoch, from 1 to {EPOCH_MAX}; got {epoch}"
            ))
            .into());
        }
        let fenced_epoch = self.node.fence(epoch).await.map_err(ApiError::from)?;
        let status = self.node.status();
        Ok(Response::new(fpb::FenceResponse {
            header: Some(self.header(status.revision)),
            fenced_epoch,
            applied_index: status.applied_index,
            voter_configs: self.node.voter_configs().into_iter().map(|ids| fpb::VoterSet { ids }).collect(),
        }))
    }

    async fn promote(&self, req: Request<fpb::PromoteRequest>) -> Result<Response<fpb::PromoteResponse>, Status> {
        self.as_caller(&Credentials::of(&req)).await?.must_be_admin()?;
        let epoch = req.into_inner().epoch;
        let header = self.header(self.node.current_rev());
        let seeded = self.node.promote(epoch).await.map_err(ApiError::from)?;
        Ok(Response::new(fpb::PromoteResponse {
            header: Some(header),
            applied_index: seeded.applied_index,
            dropped_entries: seeded.dropped_entries,
            cluster_id: seeded.cluster_id,
        }))
    }

    async fn rejoin(&self, req: Request<fpb::RejoinRequest>) -> Result<Response<fpb::RejoinResponse>, Status> {
        self.as_caller(&Credentials::of(&req)).await?.must_be_admin()?;
        let req = req.into_inner();
        if req.epoch == 0 || req.epoch > EPOCH_MAX || req.leader_name.is_empty() {
            return Err(ApiError::InvalidArgument(format!(
                "geolock: a rejoin names the new primary's revision epoch, from 1 to {EPOCH_MAX}, and its leader; \
                 got epoch {} and leader {:?}",
                req.epoch, req.leader_name
            ))
            .into());
        }
        let header = self.header(self.node.current_rev());
        let restarting = self.node.rejoin(req.epoch, req.cluster_id, &req.leader_name).await.map_err(ApiError::from)?;
        let (name, peer_urls) = self.node.identity();
        Ok(Response::new(fpb::RejoinResponse {
            header: Some(header),
            restarting,
            name: name.to_string(),
            peer_urls: peer_urls.to_vec(),
        }))
    }
}
