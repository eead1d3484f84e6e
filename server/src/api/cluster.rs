//! ClusterService: the nodes and who owns which partition.

use tidings_api::v1 as pb;
use tidings_api::v1::cluster_service_server::ClusterService;
use tidings_scheduler::cluster::Cluster;
use tonic::{Request, Response, Status};

use super::ApiError;

/// Serves ClusterService.
pub(crate) struct ClusterApi {
    cluster: Cluster,
}

impl ClusterApi {
    pub(crate) fn new(cluster: Cluster) -> Self {
        Self { cluster }
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn list_nodes(
        &self,
        _: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self
            .cluster
            .nodes()
            .await
            .into_iter()
            .map(|node| pb::Node {
                id: node.id,
                address: node.record.address,
                version: node.record.version,
                partitions: node.partitions,
                lease_time_left: node
                    .lease_left
                    .map(|left| super::convert::duration(left.as_millis() as u64)),
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn list_partitions(
        &self,
        _: Request<pb::ListPartitionsRequest>,
    ) -> Result<Response<pb::ListPartitionsResponse>, Status> {
        let partitions = self
            .cluster
            .partition_status()
            .await
            .map_err(|e| ApiError::of_store(e.failure(), e.to_string()))?
            .into_iter()
            .map(|p| pb::Partition {
                id: p.id,
                owner: p.owner.unwrap_or_default(),
                epoch: p.epoch,
                pending_timers: p.pending_timers,
                inbox_backlog: p.inbox_backlog,
            })
            .collect();
        Ok(Response::new(pb::ListPartitionsResponse { partitions }))
    }
}
