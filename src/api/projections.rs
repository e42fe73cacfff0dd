//! The `Projections` gRPC service: list, rebuild, quarantine (list, retry, skip) and durable
//! consumers' acks. A thin impl over [`crate::projection::Projections`]; every operation that may
//! take a lock or fsync runs off the executor ([`super::status::blocking`]).

// Handlers return `tonic::Status` by design; boxing it would only move the allocation.
#![allow(clippy::result_large_err)]

use bytes::Bytes;
use tonic::{Request, Response, Status};

use super::status::{blocking, invalid};
use super::{convert, Api};
use crate::pb;

fn projection_name(name: &str) -> Result<&str, Status> {
    if name.is_empty() {
        return Err(invalid(
            "name the projection (see `quire projections` for the names)".into(),
        ));
    }
    Ok(name)
}

#[tonic::async_trait]
impl pb::projections_server::Projections for Api {
    async fn list(
        &self,
        request: Request<pb::ListProjectionsRequest>,
    ) -> Result<Response<pb::ListProjectionsReply>, Status> {
        let digests = request.into_inner().with_digests;
        let projections = self.projections.clone();
        let list = blocking(move || projections.list(digests)).await?;
        Ok(Response::new(pb::ListProjectionsReply {
            projections: list.iter().map(convert::projection_status).collect(),
        }))
    }

    async fn rebuild(
        &self,
        request: Request<pb::RebuildRequest>,
    ) -> Result<Response<pb::ListProjectionsReply>, Status> {
        let request = request.into_inner();
        projection_name(&request.name)?;
        let stream = convert::optional_stream(&request.stream)?;
        let projections = self.projections.clone();
        let started = blocking(move || projections.rebuild(&request.name, stream.as_ref())).await?;
        Ok(Response::new(pb::ListProjectionsReply {
            projections: started.iter().map(convert::projection_status).collect(),
        }))
    }

    async fn digest(
        &self,
        request: Request<pb::DigestRequest>,
    ) -> Result<Response<pb::DigestReply>, Status> {
        let request = request.into_inner();
        projection_name(&request.name)?;
        let stream = convert::optional_stream(&request.stream)?;
        let projections = self.projections.clone();
        let (digest, checkpoint) =
            blocking(move || projections.digest(&request.name, stream.as_ref())).await?;
        Ok(Response::new(pb::DigestReply {
            digest: Bytes::copy_from_slice(&digest),
            checkpoint,
        }))
    }

    async fn quarantined(
        &self,
        _request: Request<pb::QuarantinedRequest>,
    ) -> Result<Response<pb::QuarantinedReply>, Status> {
        let projections = self.projections.clone();
        let (entries, not_kept) =
            blocking(move || Ok((projections.quarantined()?, projections.not_kept()?))).await?;
        Ok(Response::new(pb::QuarantinedReply {
            entries: entries.iter().map(convert::quarantine_entry).collect(),
            not_kept: not_kept
                .into_iter()
                .map(|(name, stream, count)| pb::NotKept {
                    name,
                    stream: stream.map_or_else(Bytes::new, |stream| {
                        Bytes::copy_from_slice(stream.as_bytes())
                    }),
                    count,
                })
                .collect(),
        }))
    }

    async fn retry(
        &self,
        request: Request<pb::QuarantineActionRequest>,
    ) -> Result<Response<pb::QuarantinedReply>, Status> {
        let (id, name) = quarantine_action(request.into_inner())?;
        let projections = self.projections.clone();
        let entries = blocking(move || projections.retry(&id, name.as_deref())).await?;
        Ok(Response::new(pb::QuarantinedReply {
            entries: entries.iter().map(convert::quarantine_entry).collect(),
            not_kept: Vec::new(),
        }))
    }

    async fn skip(
        &self,
        request: Request<pb::QuarantineActionRequest>,
    ) -> Result<Response<pb::QuarantinedReply>, Status> {
        let (id, name) = quarantine_action(request.into_inner())?;
        let projections = self.projections.clone();
        let entries = blocking(move || projections.skip(&id, name.as_deref())).await?;
        Ok(Response::new(pb::QuarantinedReply {
            entries: entries.iter().map(convert::quarantine_entry).collect(),
            not_kept: Vec::new(),
        }))
    }
}

fn quarantine_action(
    request: pb::QuarantineActionRequest,
) -> Result<(quire_projection_api::ScribeId, Option<String>), Status> {
    let id = convert::id_field(&request.id, "id")?;
    let name = (!request.name.is_empty()).then_some(request.name);
    Ok((id, name))
}
