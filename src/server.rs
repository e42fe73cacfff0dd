//! The gRPC client API: thin service impls over [`crate::log::Log`].
//!
//! Each handler decodes its request, calls the log, and maps domain errors to `tonic::Status` in one
//! place ([`append_status`], [`store_status`]). Server streaming goes through bounded channels.
//! This listener is the *client* API (invariant 9: it binds to loopback by default); the peer
//! listener of the replication issue serves replication and nothing else.

// Handlers return `tonic::Status` by design; boxing it would only move the allocation.
#![allow(clippy::result_large_err)]

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use quire_projection_api::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::log::store::StoreError;
use crate::log::subscribe::LogEvent;
use crate::log::{AppendError, Appended, Draft, Log, NewScribe, Origin};
use crate::pb;
use crate::projection::readers::WaitError;
use crate::projection::{Projections, RunnerError};
use crate::replication::{ReplicationError, Replicator};

/// Largest gRPC message either way: room for a maximal scribe, or a batch of many small ones.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Default and largest `limit` of `Log.Read`.
pub const READ_DEFAULT_LIMIT: u32 = 1000;
/// Largest `limit` of `Log.Read`.
pub const READ_MAX_LIMIT: u32 = 100_000;
/// Events buffered per subscription before the subscription waits for the client.
pub const SUBSCRIBE_BUFFER: usize = 256;

/// Maps an append refusal to its status: one place, so every API agrees.
pub fn append_status(error: &AppendError) -> Status {
    use tonic::Code;
    let code = match error.root() {
        AppendError::Scribe(crate::scribe::ScribeError::TooLarge(_)) => Code::ResourceExhausted,
        AppendError::Scribe(_)
        | AppendError::WrongStream { .. }
        | AppendError::BadGenesis(_)
        | AppendError::BadPayload { .. }
        | AppendError::ParentInOtherStream { .. } => Code::InvalidArgument,
        AppendError::UnknownStream(_) | AppendError::UnknownParent { .. } => Code::NotFound,
        AppendError::PermissionDenied { .. } | AppendError::MissingWork { .. } => {
            Code::PermissionDenied
        }
        AppendError::PayloadTooLarge { .. } | AppendError::StreamFull { .. } => {
            Code::ResourceExhausted
        }
        AppendError::ShuttingDown => Code::Unavailable,
        _ => Code::Internal,
    };
    Status::new(code, error.to_string())
}

/// Maps a storage failure to its status.
pub fn store_status(error: &StoreError) -> Status {
    match error {
        StoreError::Closed => Status::unavailable(error.to_string()),
        other => Status::internal(other.to_string()),
    }
}

/// The status for a projection error.
pub fn projections_status(error: &RunnerError) -> Status {
    match error {
        RunnerError::Unknown { .. }
        | RunnerError::UnknownConsumer(_)
        | RunnerError::NotParked(_) => Status::not_found(error.to_string()),
        RunnerError::Stream(_) | RunnerError::Consumer(_) => {
            Status::invalid_argument(error.to_string())
        }
        RunnerError::StillFails { .. } | RunnerError::NotReady(_) => {
            Status::failed_precondition(error.to_string())
        }
        RunnerError::Damaged(_) => Status::data_loss(error.to_string()),
        RunnerError::Store(store) => store_status(store),
        _ => Status::internal(error.to_string()),
    }
}

/// The status for a wait on a projection that ended without the seq applied.
pub fn wait_status(error: &WaitError) -> Status {
    match error {
        WaitError::Projections(error) => projections_status(error),
        WaitError::ShuttingDown => Status::unavailable("the node is shutting down"),
        WaitError::Timeout { .. } => Status::deadline_exceeded(error.to_string()),
    }
}

fn invalid(message: String) -> Status {
    Status::invalid_argument(message)
}

fn reply(appended: Appended) -> pb::AppendReply {
    pb::AppendReply {
        id: Bytes::copy_from_slice(appended.id.as_bytes()),
        seq: appended.seq,
        duplicate: appended.duplicate,
        hlc: appended.hlc,
    }
}

fn new_scribe(request: pb::AppendRequest) -> Result<Draft, Status> {
    let stream = convert::id_field(&request.stream, "stream").map_err(invalid)?;
    let kind: Kind = request
        .kind
        .parse()
        .map_err(|error| invalid(format!("{error}")))?;
    if kind == Kind::StreamCreate {
        return Err(invalid(
            "stream.create scribes are made by Streams.Create, not appended".into(),
        ));
    }
    crate::scribe::check_shape(
        &request.content_type,
        request.parents.len(),
        request.payload.len(),
    )
    .map_err(|error| append_status(&AppendError::Scribe(error)))?;
    let parents = request
        .parents
        .iter()
        .map(|parent| convert::id_field(parent, "parent"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    Ok(Draft::New(NewScribe {
        stream: Some(stream),
        kind,
        content_type: request.content_type,
        payload: request.payload,
        parents,
    }))
}

fn signed(request: pb::AppendSignedRequest) -> Result<Draft, Status> {
    let claimed_id = if request.id.is_empty() {
        None
    } else {
        Some(convert::id_field(&request.id, "id").map_err(invalid)?)
    };
    if request.scribe.is_empty() {
        return Err(invalid(
            "scribe is empty: send the encoded quire.v1.Scribe bytes".into(),
        ));
    }
    Ok(Draft::Signed {
        bytes: request.scribe,
        claimed_id,
    })
}

/// Static facts the API reports about its node.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    /// The data directory.
    pub data_dir: String,
    /// Listeners: (name, address).
    pub listeners: Vec<(String, String)>,
    /// Whether commits are fsynced.
    pub sync_writes: bool,
}

/// The client API over one log.
#[derive(Debug, Clone)]
pub struct Api {
    log: Log,
    replicator: Replicator,
    projections: Projections,
    facts: Arc<NodeFacts>,
}

impl Api {
    /// An API over `log`.
    pub fn new(
        log: Log,
        replicator: Replicator,
        projections: Projections,
        facts: NodeFacts,
    ) -> Api {
        Api {
            log,
            replicator,
            projections,
            facts: Arc::new(facts),
        }
    }

    /// Every service of the client API over gRPC, and the HTTP API, on one set of routes: a
    /// request whose content type is `application/grpc…` goes to gRPC, any other to HTTP.
    pub async fn routes(
        self,
        sql: crate::sql::SqlService,
        files: crate::files::FilesService,
    ) -> tonic::service::Routes {
        let (mut reporter, health_service) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<pb::log_server::LogServer<Api>>()
            .await;
        reporter
            .set_serving::<pb::streams_server::StreamsServer<Api>>()
            .await;
        reporter
            .set_serving::<pb::admin_server::AdminServer<Api>>()
            .await;
        reporter
            .set_serving::<pb::projections_server::ProjectionsServer<Api>>()
            .await;
        reporter
            .set_serving::<pb::kv_server::KvServer<crate::kv::KvService>>()
            .await;
        reporter
            .set_serving::<pb::sql_server::SqlServer<crate::sql::SqlService>>()
            .await;
        reporter
            .set_serving::<pb::files_server::FilesServer<crate::files::FilesService>>()
            .await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("quire's descriptor set is valid");
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .expect("quire's descriptor set is valid");
        let http = crate::http::router(self.clone(), sql.clone(), files.clone());
        let mut grpc = tonic::service::Routes::builder();
        grpc.add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                pb::streams_server::StreamsServer::new(self.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                pb::log_server::LogServer::new(self.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(pb::projections_server::ProjectionsServer::new(self.clone()))
            .add_service(
                pb::kv_server::KvServer::new(crate::kv::KvService::new(
                    self.log.clone(),
                    self.projections.clone(),
                ))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(pb::sql_server::SqlServer::new(sql))
            .add_service(
                pb::files_server::FilesServer::new(files)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                pb::admin_server::AdminServer::new(self)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            );
        let grpc = grpc.routes().into_axum_router();
        let dispatch = tower::service_fn(move |request: axum::extract::Request| {
            let grpc = grpc.clone();
            let http = http.clone();
            async move {
                use tower::ServiceExt;
                let is_grpc = request
                    .headers()
                    .get(axum::http::header::CONTENT_TYPE)
                    .and_then(|value| value.to_str().ok())
                    .is_some_and(|value| value.starts_with("application/grpc"));
                if is_grpc {
                    grpc.oneshot(request).await
                } else {
                    http.oneshot(request).await
                }
            }
        });
        tonic::service::Routes::from(axum::Router::new().fallback_service(dispatch))
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::streams_server::Streams for Api {
    async fn create(
        &self,
        request: Request<pb::CreateStreamRequest>,
    ) -> Result<Response<pb::StreamInfo>, Status> {
        let request = request.into_inner();
        if let Some(policy) = &request.policy {
            convert::policy_from_proto(policy.clone())
                .map_err(|error| invalid(format!("policy: {error}")))?;
        }
        let owner = if request.owner.is_empty() {
            None
        } else {
            Some(
                quire_projection_api::AuthorKey::from_slice(&request.owner)
                    .map_err(|_| invalid("owner must be a 32-byte key".into()))?,
            )
        };
        let payload =
            convert::genesis_payload(&request.name, owner, request.policy, rand::random());
        let appended = self
            .log
            .append_one(Draft::New(NewScribe {
                stream: None,
                kind: Kind::StreamCreate,
                content_type: convert::GENESIS_CONTENT_TYPE.to_string(),
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
        let stream = convert::id_field(&request.into_inner().stream, "stream").map_err(invalid)?;
        let state = self.log.stream(&stream).ok_or_else(|| {
            Status::not_found(format!("stream {stream} is not held by this node"))
        })?;
        Ok(Response::new(convert::stream_info(&state)))
    }

    async fn join(
        &self,
        request: Request<pb::JoinStreamRequest>,
    ) -> Result<Response<pb::StreamInfo>, Status> {
        let request = request.into_inner();
        let stream = convert::id_field(&request.stream, "stream").map_err(invalid)?;
        let timeout = match request.timeout_ms {
            0 => std::time::Duration::from_secs(10),
            ms => std::time::Duration::from_millis(ms),
        };
        match self.replicator.join(stream, timeout).await {
            Ok(()) => {}
            Err(error @ ReplicationError::JoinPending(_)) => {
                return Err(Status::deadline_exceeded(error.to_string()))
            }
            Err(error) => return Err(Status::internal(error.to_string())),
        }
        let state = self
            .log
            .stream(&stream)
            .ok_or_else(|| Status::internal("stream vanished after joining"))?;
        Ok(Response::new(convert::stream_info(&state)))
    }

    async fn list(
        &self,
        _request: Request<pb::ListStreamsRequest>,
    ) -> Result<Response<pb::ListStreamsReply>, Status> {
        let streams = self
            .log
            .streams()
            .iter()
            .map(convert::stream_info)
            .collect();
        Ok(Response::new(pb::ListStreamsReply { streams }))
    }
}

impl Api {
    async fn append_draft(&self, draft: Draft) -> Result<Response<pb::AppendReply>, Status> {
        let appended = self
            .log
            .append_one(draft)
            .await
            .map_err(|error| append_status(&error))?;
        Ok(Response::new(reply(appended)))
    }
}

#[tonic::async_trait]
impl pb::log_server::Log for Api {
    async fn append(
        &self,
        request: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendReply>, Status> {
        self.append_draft(new_scribe(request.into_inner())?).await
    }

    async fn append_signed(
        &self,
        request: Request<pb::AppendSignedRequest>,
    ) -> Result<Response<pb::AppendReply>, Status> {
        self.append_draft(signed(request.into_inner())?).await
    }

    async fn append_batch(
        &self,
        request: Request<pb::AppendBatchRequest>,
    ) -> Result<Response<pb::AppendBatchReply>, Status> {
        let request = request.into_inner();
        let mut drafts = Vec::with_capacity(request.appends.len() + request.signed.len());
        for (index, append) in request.appends.into_iter().enumerate() {
            drafts
                .push(new_scribe(append).map_err(|status| {
                    invalid(format!("appends[{index}]: {}", status.message()))
                })?);
        }
        for (index, append) in request.signed.into_iter().enumerate() {
            drafts.push(
                signed(append)
                    .map_err(|status| invalid(format!("signed[{index}]: {}", status.message())))?,
            );
        }
        let appended = self
            .log
            .append(drafts, Origin::Local)
            .await
            .map_err(|error| append_status(&error))?;
        Ok(Response::new(pb::AppendBatchReply {
            results: appended.into_iter().map(reply).collect(),
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetScribeRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let id = convert::id_field(&request.into_inner().id, "id").map_err(invalid)?;
        let log = self.log.clone();
        let found = tokio::task::spawn_blocking(move || log.get(&id))
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(|error| store_status(&error))?;
        let entry = found
            .ok_or_else(|| Status::not_found(format!("scribe {id} is not stored on this node")))?;
        Ok(Response::new(convert::entry(entry)))
    }

    type ReadStream = ResponseStream<pb::Entry>;

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let request = request.into_inner();
        let stream = convert::optional_stream(&request.stream).map_err(invalid)?;
        if let Some(stream) = stream {
            if self.log.stream(&stream).is_none() {
                return Err(Status::not_found(format!(
                    "stream {stream} is not held by this node"
                )));
            }
        }
        let limit = match request.limit {
            0 => READ_DEFAULT_LIMIT,
            limit => limit.min(READ_MAX_LIMIT),
        } as usize;
        let (entries, receiver) = mpsc::channel(64);
        let log = self.log.clone();
        let mut next = request.from_seq.max(1);
        tokio::spawn(async move {
            let mut left = limit;
            while left > 0 {
                let reader = log.clone();
                let chunk = left.min(1000);
                let read =
                    tokio::task::spawn_blocking(move || reader.read(stream.as_ref(), next, chunk))
                        .await;
                let batch = match read {
                    Ok(Ok(batch)) => batch,
                    Ok(Err(error)) => {
                        let _ = entries.send(Err(store_status(&error))).await;
                        return;
                    }
                    Err(_) => return,
                };
                let done = batch.len() < chunk;
                left -= batch.len();
                for entry in batch {
                    next = entry.seq + 1;
                    if entries.send(Ok(convert::entry(entry))).await.is_err() {
                        return;
                    }
                }
                if done {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    type SubscribeStream = ResponseStream<pb::SubscribeEvent>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let request = request.into_inner();
        let stream = convert::optional_stream(&request.stream).map_err(invalid)?;
        if let Some(stream) = stream {
            if self.log.stream(&stream).is_none() {
                return Err(Status::not_found(format!(
                    "stream {stream} is not held by this node"
                )));
            }
        }
        let from = if request.consumer.is_empty() {
            request.from_seq
        } else {
            if request.from_seq != 0 {
                return Err(invalid(format!(
                    "consumer {:?} resumes after its last ack; leave from_seq at 0 (or use `quire rebuild {}` to start it over)",
                    request.consumer, request.consumer
                )));
            }
            let projections = self.projections.clone();
            let consumer = request.consumer.clone();
            tokio::task::spawn_blocking(move || {
                projections.consumer_start(&consumer, stream.as_ref())
            })
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))?
            .map_err(|error| projections_status(&error))?
        };
        let events = self.log.subscribe(stream, from, SUBSCRIBE_BUFFER);
        let events = ReceiverStream::new(events).map(|event| match event {
            Ok(LogEvent::Entry(entry)) => Ok(pb::SubscribeEvent {
                event: Some(pb::subscribe_event::Event::Scribe(convert::entry(entry))),
            }),
            Ok(LogEvent::CaughtUp(seq)) => Ok(pb::SubscribeEvent {
                event: Some(pb::subscribe_event::Event::CaughtUp(pb::CaughtUp { seq })),
            }),
            Err(error) => Err(store_status(&error)),
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckReply>, Status> {
        let request = request.into_inner();
        let projections = self.projections.clone();
        let consumer = blocking(move || projections.ack(&request.consumer, request.seq)).await?;
        Ok(Response::new(pb::AckReply {
            acked: consumer.acked,
        }))
    }
}

/// Runs a projection operation (which may take file locks and fsync) off the executor.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RunnerError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| Status::unavailable("the node is shutting down"))?
        .map_err(|error| projections_status(&error))
}

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
        let stream = convert::optional_stream(&request.stream).map_err(invalid)?;
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
        let stream = convert::optional_stream(&request.stream).map_err(invalid)?;
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
        let entries = blocking(move || projections.quarantined()).await?;
        Ok(Response::new(pb::QuarantinedReply {
            entries: entries.iter().map(convert::quarantine_entry).collect(),
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
        }))
    }
}

fn quarantine_action(
    request: pb::QuarantineActionRequest,
) -> Result<(quire_projection_api::ScribeId, Option<String>), Status> {
    let id = convert::id_field(&request.id, "id").map_err(invalid)?;
    let name = (!request.name.is_empty()).then_some(request.name);
    Ok((id, name))
}

#[tonic::async_trait]
impl pb::admin_server::Admin for Api {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let projections = self.projections.clone();
        let projections = blocking(move || projections.list(false)).await?;
        Ok(Response::new(pb::StatusReply {
            projections: projections.iter().map(convert::projection_status).collect(),
            node_id: self.log.node_key().to_hex(),
            data_dir: self.facts.data_dir.clone(),
            log_epoch: Bytes::copy_from_slice(&self.log.epoch()),
            head_seq: self.log.head(),
            streams: self
                .log
                .streams()
                .iter()
                .map(convert::stream_info)
                .collect(),
            listeners: self
                .facts
                .listeners
                .iter()
                .map(|(name, addr)| pb::Listener {
                    name: name.clone(),
                    addr: addr.clone(),
                })
                .collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            hlc: self.log.clock().peek(),
            sync_writes: self.facts.sync_writes,
            store_memory: Some({
                let (memtables, table_readers, block_cache, pinned) = self.log.store().memory();
                pb::StoreMemory {
                    memtables,
                    table_readers,
                    block_cache,
                    pinned,
                }
            }),
            peers: self
                .replicator
                .peers()
                .iter()
                .map(convert::peer_status)
                .collect(),
        }))
    }

    async fn add_peer(
        &self,
        request: Request<pb::AddPeerRequest>,
    ) -> Result<Response<pb::AddPeerReply>, Status> {
        let addr = self
            .replicator
            .add_peer(&request.into_inner().addr)
            .map_err(|error| match error {
                ReplicationError::BadAddress(_) => Status::invalid_argument(error.to_string()),
                other => Status::internal(other.to_string()),
            })?;
        Ok(Response::new(pb::AddPeerReply { addr }))
    }
}
