//! The `Streams` gRPC service: create, get, join, list, leave streams and redact their scribes. A
//! thin impl: decode the request, call the log or the replicator, map the error with
//! [`super::status`]. [`Api::redact_as_node`] is shared with the HTTP `redact` action.

// Handlers return `tonic::Status` by design; boxing it would only move the allocation.
#![allow(clippy::result_large_err)]

use bytes::Bytes;
use prost::Message as _;
use quire_projection_api::{Kind, Policy, ScribeId, StreamId};
use tonic::{Request, Response, Status};

use super::status::{append_status, invalid, projections_status};
use super::{convert, Api};
use crate::genesis;
use crate::log::{Draft, LeaveError, NewScribe};
use crate::pb;
use crate::replication::ReplicationError;

#[tonic::async_trait]
impl pb::streams_server::Streams for Api {
    async fn create(
        &self,
        request: Request<pb::CreateStreamRequest>,
    ) -> Result<Response<pb::StreamInfo>, Status> {
        let mut request = request.into_inner();
        // A new stream is created under the newest default rules (x.* owner-only when public).
        let mut policy = request.policy.take().unwrap_or_default();
        policy.defaults_version = Policy::CURRENT_DEFAULTS;
        genesis::policy_from_proto(policy.clone())
            .map_err(|error| invalid(format!("policy: {error}")))?;
        let owner = if request.owner.is_empty() {
            None
        } else {
            Some(
                quire_projection_api::AuthorKey::from_slice(&request.owner)
                    .map_err(|_| invalid("owner must be a 32-byte key".into()))?,
            )
        };
        if let Some(retention) = &request.retention {
            genesis::RetentionRule::from_proto(retention)
                .map_err(|error| invalid(error.to_string()))?;
        }
        let payload = genesis::genesis_payload_retained(
            &request.name,
            owner,
            Some(policy),
            request.access,
            request.retention,
            rand::random(),
        );
        let appended = self
            .log
            .append_one(Draft::New(NewScribe {
                stream: None,
                kind: Kind::StreamCreate,
                content_type: genesis::GENESIS_CONTENT_TYPE.to_string(),
                payload: Bytes::from(payload),
                parents: Vec::new(),
            }))
            .await
            .map_err(|error| append_status(&error))?;
        let state = self
            .log
            .stream(&appended.id)
            .ok_or_else(|| Status::internal("stream vanished after creation"))?;
        Ok(Response::new(convert::stream_info(&state)))
    }

    async fn get(
        &self,
        request: Request<pb::GetStreamRequest>,
    ) -> Result<Response<pb::StreamInfo>, Status> {
        let caller = super::access::caller_of(&request);
        let stream = convert::id_field(&request.into_inner().stream, "stream")?;
        let state = self
            .log
            .stream(&stream)
            .filter(|state| super::access::may_read(caller, state))
            .ok_or_else(|| super::served::not_held(&stream))?;
        Ok(Response::new(convert::stream_info(&state)))
    }

    async fn join(
        &self,
        request: Request<pb::JoinStreamRequest>,
    ) -> Result<Response<pb::StreamInfo>, Status> {
        let request = request.into_inner();
        let stream = convert::id_field(&request.stream, "stream")?;
        let timeout = match request.timeout_ms {
            0 => std::time::Duration::from_secs(10),
            ms => std::time::Duration::from_millis(ms),
        };
        match self.replicator.join(stream, timeout).await {
            Ok(()) => {}
            Err(error @ ReplicationError::JoinPending(_)) => {
                return Err(Status::deadline_exceeded(error.to_string()))
            }
            Err(error @ ReplicationError::Leaving(_)) => {
                return Err(Status::failed_precondition(error.to_string()))
            }
            Err(
                error @ ReplicationError::JoinRefused {
                    unknown_key: true, ..
                },
            ) => return Err(Status::permission_denied(error.to_string())),
            // The genesis is refused by this version's rules (e.g. a newer quire's).
            Err(error @ ReplicationError::JoinRefused { .. }) => {
                return Err(Status::failed_precondition(error.to_string()))
            }
            Err(error) => return Err(Status::internal(error.to_string())),
        }
        let state = self
            .log
            .stream(&stream)
            .ok_or_else(|| Status::internal("stream vanished after joining"))?;
        Ok(Response::new(convert::stream_info(&state)))
    }

    async fn cancel_join(
        &self,
        request: Request<pb::CancelJoinRequest>,
    ) -> Result<Response<pb::CancelJoinReply>, Status> {
        let stream = convert::id_field(&request.into_inner().stream, "stream")?;
        self.replicator
            .cancel_join(stream)
            .map_err(|error| match error {
                ReplicationError::NoJoin(_) => Status::not_found(error.to_string()),
                ReplicationError::AlreadyHeld(_) => Status::failed_precondition(error.to_string()),
                other => Status::internal(other.to_string()),
            })?;
        Ok(Response::new(pb::CancelJoinReply {}))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveStreamRequest>,
    ) -> Result<Response<pb::LeaveStreamReply>, Status> {
        let stream = convert::id_field(&request.into_inner().stream, "stream")?;
        // Its own task: a client that goes away (a cancelled call, a timed-out CLI) does not
        // stop a leave half way.
        let (log, projections, replicator) = (
            self.log.clone(),
            self.projections.clone(),
            self.replicator.clone(),
        );
        tokio::spawn(leave(log, projections, replicator, stream))
            .await
            .map_err(|_| {
                Status::unavailable(
                    "the node is shutting down; the leave finishes when it starts again",
                )
            })?
            .map(Response::new)
    }

    async fn redact(
        &self,
        request: Request<pb::RedactRequest>,
    ) -> Result<Response<pb::RedactReply>, Status> {
        let request = request.into_inner();
        let stream = convert::id_field(&request.stream, "stream")?;
        let target = convert::id_field(&request.target, "target")?;
        self.redact_as_node(stream, target, request.reason, false)
            .await
            .map(Response::new)
    }

    async fn retain(
        &self,
        request: Request<pb::RetainRequest>,
    ) -> Result<Response<pb::RetainReply>, Status> {
        let request = request.into_inner();
        let stream = convert::id_field(&request.stream, "stream")?;
        let state = self
            .log
            .stream(&stream)
            .ok_or_else(|| super::served::not_held(&stream))?;
        let retention = request.retention.unwrap_or_default();
        genesis::RetentionRule::from_proto(&retention)
            .map_err(|error| invalid(error.to_string()))?;
        let node = self.log.node_key();
        if state.owner != node {
            return Err(Status::permission_denied(format!(
                "this node ({node}) is not the owner of stream {stream} ({}): only the owner sets its retention rule (sign a retain scribe with the owner's key and append it with Log.AppendBatch)",
                state.owner
            )));
        }
        let appended = self
            .log
            .append_one(Draft::New(NewScribe {
                stream: Some(stream),
                kind: Kind::Retain,
                content_type: crate::log::retention::RETAIN_CONTENT_TYPE.into(),
                payload: pb::Retain {
                    retention: Some(retention),
                }
                .encode_to_vec()
                .into(),
                parents: Vec::new(),
            }))
            .await
            .map_err(|error| append_status(&error))?;
        Ok(Response::new(pb::RetainReply {
            id: Bytes::copy_from_slice(appended.id.as_bytes()),
            seq: appended.seq,
        }))
    }

    async fn prune(
        &self,
        request: Request<pb::PruneRequest>,
    ) -> Result<Response<pb::PruneReply>, Status> {
        let request = request.into_inner();
        let streams = if request.stream.is_empty() {
            self.log.stream_ids()
        } else {
            let stream = convert::id_field(&request.stream, "stream")?;
            if self.log.stream(&stream).is_none() {
                return Err(super::served::not_held(&stream));
            }
            vec![stream]
        };
        let mut reply = pb::PruneReply::default();
        for stream in streams {
            let plan = if request.dry_run {
                self.log
                    .prune_plan(&stream)
                    .await
                    .map_err(|error| super::status::store_status(&error))?
            } else {
                self.log
                    .prune(&stream, true)
                    .await
                    .map_err(|error| append_status(&error))?
            };
            // A stream left meanwhile is no longer held: nothing to say of it.
            if let Some(plan) = plan {
                reply.streams.push(convert::stream_payloads(&plan));
            }
        }
        Ok(Response::new(reply))
    }

    async fn excluded(
        &self,
        request: Request<pb::ExcludedRequest>,
    ) -> Result<Response<pb::ExcludedReply>, Status> {
        let request = request.into_inner();
        let stream = convert::id_field(&request.stream, "stream")?;
        if self.log.stream(&stream).is_none() {
            return Err(super::served::not_held(&stream));
        }
        let limit = match request.limit {
            0 => 1_000,
            n => (n as usize).min(10_000),
        };
        let log = self.log.clone();
        let reply = tokio::task::spawn_blocking(move || {
            let exclusions = crate::log::Exclusions::Log(log.clone());
            let mut reply = pb::ExcludedReply::default();
            let mut from = 1;
            loop {
                let chunk = log.read(Some(&stream), from, 1_000)?;
                let Some(last) = chunk.entries.last() else {
                    break;
                };
                from = last.seq + 1;
                for entry in &chunk.entries {
                    let Ok((body, ..)) = crate::scribe::decode_envelope(&entry.parts.envelope)
                    else {
                        continue;
                    };
                    if exclusions.excludes(&stream, &body.author, body.hlc, body.membership) {
                        if reply.scribes.len() == limit {
                            reply.more = true;
                            return Ok(reply);
                        }
                        reply.scribes.push(pb::ExcludedScribe {
                            id: Bytes::copy_from_slice(entry.id.as_bytes()),
                            author: Bytes::copy_from_slice(body.author.as_bytes()),
                            hlc: body.hlc,
                            kind: body.kind.to_string(),
                            seq: entry.seq,
                        });
                    }
                }
                if !chunk.more && chunk.entries.len() < 1_000 {
                    break;
                }
            }
            Ok::<_, crate::log::store::StoreError>(reply)
        })
        .await
        .map_err(|_| Status::unavailable("the node is shutting down"))?
        .map_err(|error| super::status::store_status(&error))?;
        Ok(Response::new(reply))
    }

    async fn list(
        &self,
        request: Request<pb::ListStreamsRequest>,
    ) -> Result<Response<pb::ListStreamsReply>, Status> {
        let caller = super::access::caller_of(&request);
        let streams = self
            .log
            .streams()
            .iter()
            .filter(|state| super::access::may_read(caller, state))
            .map(convert::stream_info)
            .collect();
        Ok(Response::new(pb::ListStreamsReply { streams }))
    }
}

/// Leaves `stream`: the steps of `crate::log` `leave.rs`, with the projections' between.
async fn leave(
    log: crate::log::Log,
    projections: crate::projection::Projections,
    replicator: crate::replication::Replicator,
    stream: quire_projection_api::StreamId,
) -> Result<pb::LeaveStreamReply, Status> {
    let log_status = |error: LeaveError| match error {
        LeaveError::NotHeld(_) => Status::not_found(error.to_string()),
        LeaveError::Leaving(_) => Status::failed_precondition(error.to_string()),
        LeaveError::ShuttingDown => Status::unavailable(error.to_string()),
        other => Status::internal(other.to_string()),
    };
    log.begin_leave(stream).await.map_err(log_status)?;
    tracing::info!(%stream, "leaving a stream: deleting its projections and scribes");
    replicator.forget_stream(&stream);
    let copies = projections
        .forget_stream(&stream)
        .await
        .map_err(|error| projections_status(&error))?;
    let vacated = log.finish_leave(stream).await.map_err(log_status)?;
    let rebuilding = projections
        .rebuild_log_scope()
        .map_err(|error| projections_status(&error))?;
    log.end_leave(stream).await.map_err(log_status)?;
    tracing::info!(%stream, scribes = vacated.scribes, payload_bytes = vacated.payload_bytes, "left a stream");
    Ok(pb::LeaveStreamReply {
        scribes: vacated.scribes,
        payloads: vacated.payloads,
        payload_bytes: vacated.payload_bytes,
        seals: vacated.seals,
        projections: copies as u64,
        rebuilding,
    })
}

impl Api {
    /// Redacts `target` of `stream` with a `redact` scribe this node signs, and answers once its
    /// payload has left this node's disk. `app_only`: the caller is the stream's app, which may
    /// redact only records (`record.*`) the node wrote.
    pub(crate) async fn redact_as_node(
        &self,
        stream: StreamId,
        target: ScribeId,
        reason: String,
        app_only: bool,
    ) -> Result<pb::RedactReply, Status> {
        let state = self
            .log
            .stream(&stream)
            .ok_or_else(|| super::served::not_held(&stream))?;
        if reason.len() > crate::log::rules::MAX_REDACT_REASON_BYTES {
            return Err(invalid(format!(
                "the reason has {} bytes; the most is {}",
                reason.len(),
                crate::log::rules::MAX_REDACT_REASON_BYTES
            )));
        }
        let not_here = || {
            Status::not_found(format!(
                "scribe {target} is not held by this node in stream {stream}"
            ))
        };
        let log = self.log.clone();
        let entry = tokio::task::spawn_blocking(move || log.get(&target))
            .await
            .map_err(|error| Status::internal(format!("read task failed: {error}")))?
            .map_err(|error| super::status::store_status(&error))?
            .ok_or_else(not_here)?;
        let (body, ..) = crate::scribe::decode_envelope(&entry.parts.envelope)
            .map_err(|error| Status::internal(format!("stored scribe {target}: {error}")))?;
        if body.stream.unwrap_or(target) != stream {
            return Err(not_here());
        }
        if entry.parts.redacted_by.is_some() {
            return Err(Status::failed_precondition(format!(
                "scribe {target} is redacted already"
            )));
        }
        if !crate::log::rules::redactable(&body.kind) {
            return Err(Status::failed_precondition(format!(
                "a {} scribe cannot be redacted: a stream's genesis, membership and redactions stay readable",
                body.kind
            )));
        }
        let node = self.log.node_key();
        if app_only
            && !(body.author == node && matches!(body.kind, Kind::RecordAdd | Kind::RecordUpvote))
        {
            return Err(Status::permission_denied(format!(
                "an app may redact only records its node wrote; scribe {target} is a {} by {}",
                body.kind, body.author
            )));
        }
        if body.author != node && state.owner != node {
            return Err(Status::permission_denied(format!(
                "this node ({node}) is neither the author of scribe {target} ({}) nor the owner of its stream ({}): sign the redact scribe with one of their keys and append it with Log.AppendBatch",
                body.author, state.owner
            )));
        }
        let payload = pb::Redact {
            target: Bytes::copy_from_slice(target.as_bytes()),
            reason,
            kv: None,
        }
        .encode_to_vec();
        let appended = self
            .log
            .append_one(Draft::New(NewScribe {
                stream: Some(stream),
                kind: Kind::Redact,
                content_type: "application/vnd.quire.redact+protobuf".into(),
                payload: payload.into(),
                parents: vec![target],
            }))
            .await
            .map_err(|error| append_status(&error))?;
        self.log.wait_purged(self.log.redactions_committed()).await;
        Ok(pb::RedactReply {
            id: Bytes::copy_from_slice(appended.id.as_bytes()),
            seq: appended.seq,
        })
    }
}
