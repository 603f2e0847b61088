//! The `patchflow.v1.Patchflow` service: discovery calls answered from the registry, Sample
//! streams handed to their producer tasks.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use patchflow_grid::MAX_PATCH_AXIS;
use patchflow_proto::v1 as pb;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::check_name;
use crate::error::StreamError;
use crate::stream::{self, ResponseStream, StreamContext};

/// The service implementation.
#[derive(Clone)]
pub(crate) struct PatchflowService {
    ctx: Arc<StreamContext>,
    streams: Arc<Semaphore>,
}

impl PatchflowService {
    pub fn new(ctx: Arc<StreamContext>) -> PatchflowService {
        let streams = Arc::new(Semaphore::new(ctx.limits.max_streams));
        PatchflowService { ctx, streams }
    }
}

#[tonic::async_trait]
impl pb::patchflow_server::Patchflow for PatchflowService {
    async fn list_datasets(
        &self,
        _request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let limits = &self.ctx.limits;
        let datasets = self
            .ctx
            .registry
            .iter()
            .map(|(_, entry)| entry.summary())
            .collect();
        Ok(Response::new(pb::ListDatasetsResponse {
            datasets,
            limits: Some(pb::ServerLimits {
                max_patch_voxels: limits.max_patch_voxels,
                max_batch_bytes: limits.max_batch_bytes,
                max_batch_size: u32::try_from(limits.max_batch_size).unwrap_or(u32::MAX),
                max_credits: limits.max_credits,
                max_message_bytes: limits.max_message_bytes as u64,
                max_streams: u32::try_from(limits.max_streams).unwrap_or(u32::MAX),
                max_shared_slots: if self.ctx.shared_memory.is_some() {
                    limits.max_shared_slots
                } else {
                    0
                },
                max_patch_axis: u32::try_from(MAX_PATCH_AXIS).unwrap_or(u32::MAX),
            }),
        }))
    }

    async fn describe_dataset(
        &self,
        request: Request<pb::DescribeDatasetRequest>,
    ) -> Result<Response<pb::DatasetDescription>, Status> {
        let name = &request.get_ref().dataset;
        check_name("dataset", name).map_err(|reason| StreamError::InvalidName {
            scope: "request",
            reason,
        })?;
        let entry = self.ctx.registry.find(name)?;
        Ok(Response::new(entry.describe()))
    }

    type SampleStream = ResponseStream;

    async fn sample(
        &self,
        request: Request<Streaming<pb::SampleRequest>>,
    ) -> Result<Response<Self::SampleStream>, Status> {
        let permit = Arc::clone(&self.streams).try_acquire_owned().map_err(|_| {
            self.ctx
                .metrics
                .streams_refused
                .fetch_add(1, Ordering::Relaxed);
            StreamError::TooManyStreams {
                limit: self.ctx.limits.max_streams,
            }
        })?;
        let peer = request
            .remote_addr()
            .map_or_else(|| "local".to_owned(), |a| a.to_string());
        let inbound = request.into_inner();
        Ok(Response::new(stream::open(
            Arc::clone(&self.ctx),
            inbound,
            peer,
            permit,
        )))
    }
}
