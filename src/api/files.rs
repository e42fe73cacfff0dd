//! The `Files` gRPC service and the file operations it shares with HTTP: the stream's file tree
//! as this node's `files` projector (`projections/files`) holds it; writes are node-signed
//! `file.put` / `file.delete` scribes, answered once the tree includes them.

// Service code returns tonic's `Status`, as every client API service does.
#![allow(clippy::result_large_err)]

use bytes::Bytes;
use quire_projection_api::files::{check_path, FileChange, CONTENT_TYPE};
use std::sync::Arc;

use quire_projection_api::{Payloads, ProjectionError, StreamId};
use quire_projection_files::{content_type_for, Entry, Reader, NAME};
use tonic::{Request, Response, Status};

use crate::api::access::{self, Caller};
use crate::api::served::Served;
use crate::log::{Appended, Log};
use crate::pb;
use crate::projection::{Projections, StorePayloads};

/// Most entries of one `List`.
const LIST_CAP: usize = 100_000;

/// The file operations of one node.
#[derive(Clone)]
pub struct FilesService {
    served: Served<Reader>,
    /// The node's payload store: a file's bytes are its winning scribe's payload.
    payloads: Arc<dyn Payloads>,
}

impl std::fmt::Debug for FilesService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilesService")
            .field("served", &self.served)
            .finish_non_exhaustive()
    }
}

fn read_status(error: &ProjectionError) -> Status {
    Status::internal(format!("reading the file tree: {error}"))
}

/// An index entry as protobuf.
pub fn info(entry: &Entry) -> pb::FileInfo {
    pb::FileInfo {
        path: entry.path.clone(),
        content_type: entry.content_type.clone(),
        size: entry.size,
        sha256: Bytes::copy_from_slice(&entry.sha256),
        id: Bytes::copy_from_slice(entry.id.as_bytes()),
        hlc: entry.hlc,
    }
}

impl FilesService {
    /// The service over `log`'s streams and their `files` projections.
    pub fn new(log: Log, projections: Projections) -> FilesService {
        FilesService {
            payloads: StorePayloads::shared(log.store()),
            served: Served::new(log, projections, NAME, Reader::open),
        }
    }

    /// `stream`, if this node holds it and serves it to `caller`.
    pub fn held(&self, stream: StreamId, caller: Caller) -> Result<StreamId, Status> {
        self.served.held(stream, caller)
    }

    /// The live entry of `path` and its bytes (`with_data`: read from the payload store, checked
    /// against the entry's SHA-256), if there is one. A version whose payload was redacted is
    /// not served (`None`).
    pub async fn get(
        &self,
        stream: StreamId,
        path: String,
        with_data: bool,
    ) -> Result<Option<(Entry, Vec<u8>)>, Status> {
        let payloads = self.payloads.clone();
        self.served
            .read(
                stream,
                move |reader: &mut Reader| {
                    if with_data {
                        reader.get_with_data(&path, &*payloads)
                    } else {
                        Ok(reader.get(&path)?.map(|entry| (entry, Vec::new())))
                    }
                },
                read_status,
            )
            .await
    }

    /// Live entries under `prefix`, and the seq they include.
    pub async fn list(
        &self,
        stream: StreamId,
        prefix: String,
        limit: usize,
    ) -> Result<(Vec<Entry>, u64), Status> {
        let limit = limit.clamp(1, LIST_CAP);
        self.served
            .read(
                stream,
                move |reader: &mut Reader| Ok((reader.list(&prefix, limit)?, reader.checkpoint()?)),
                read_status,
            )
            .await
    }

    /// Puts a file (the node signs) and returns its entry once the tree holds it.
    pub async fn put(
        &self,
        stream: StreamId,
        path: String,
        content_type: String,
        data: Vec<u8>,
    ) -> Result<Entry, Status> {
        check_path(&path).map_err(Status::invalid_argument)?;
        let content_type = if content_type.is_empty() {
            content_type_for(&path).to_string()
        } else {
            content_type
        };
        let (kind, payload) = FileChange::Put {
            path: path.clone(),
            content_type,
            data,
        }
        .encode();
        self.served
            .append_applied(stream, kind, CONTENT_TYPE, Bytes::from(payload), Vec::new())
            .await?;
        self.get(stream, path.clone(), false)
            .await?
            .map(|(entry, _)| entry)
            // A newer version from elsewhere may already have replaced or deleted it.
            .ok_or_else(|| Status::aborted(format!("{path} was deleted again by a newer scribe")))
    }

    /// Deletes a live file (the node signs a tombstone).
    pub async fn delete(&self, stream: StreamId, path: String) -> Result<Appended, Status> {
        check_path(&path).map_err(Status::invalid_argument)?;
        if self.get(stream, path.clone(), false).await?.is_none() {
            return Err(Status::not_found(format!(
                "no file {path:?} in stream {stream}"
            )));
        }
        let (kind, payload) = FileChange::Delete { path }.encode();
        self.served
            .append_applied(stream, kind, CONTENT_TYPE, Bytes::from(payload), Vec::new())
            .await
    }
}

#[tonic::async_trait]
impl pb::files_server::Files for FilesService {
    async fn put(
        &self,
        request: Request<pb::FilesPutRequest>,
    ) -> Result<Response<pb::FileInfo>, Status> {
        let caller = access::caller_of(&request);
        let request = request.into_inner();
        let stream = self.served.stream(&request.stream, caller)?;
        let entry = FilesService::put(
            self,
            stream,
            request.path,
            request.content_type,
            request.data.to_vec(),
        )
        .await?;
        Ok(Response::new(info(&entry)))
    }

    async fn get(
        &self,
        request: Request<pb::FilesGetRequest>,
    ) -> Result<Response<pb::FileContent>, Status> {
        let caller = access::caller_of(&request);
        let request = request.into_inner();
        let stream = self.served.stream(&request.stream, caller)?;
        match FilesService::get(self, stream, request.path.clone(), true).await? {
            Some((entry, data)) => Ok(Response::new(pb::FileContent {
                info: Some(info(&entry)),
                data: Bytes::from(data),
            })),
            None => Err(Status::not_found(format!(
                "no file {:?} in stream {stream}",
                request.path
            ))),
        }
    }

    async fn delete(
        &self,
        request: Request<pb::FilesDeleteRequest>,
    ) -> Result<Response<pb::FilesDeleteReply>, Status> {
        let caller = access::caller_of(&request);
        let request = request.into_inner();
        let stream = self.served.stream(&request.stream, caller)?;
        let appended = FilesService::delete(self, stream, request.path).await?;
        Ok(Response::new(pb::FilesDeleteReply {
            id: Bytes::copy_from_slice(appended.id.as_bytes()),
            seq: appended.seq,
        }))
    }

    async fn list(
        &self,
        request: Request<pb::FilesListRequest>,
    ) -> Result<Response<pb::FilesListReply>, Status> {
        let caller = access::caller_of(&request);
        let request = request.into_inner();
        let stream = self.served.stream(&request.stream, caller)?;
        let limit = match request.limit {
            0 => 10_000,
            n => n as usize,
        };
        let (entries, seq) = FilesService::list(self, stream, request.prefix, limit).await?;
        Ok(Response::new(pb::FilesListReply {
            files: entries.iter().map(info).collect(),
            seq,
        }))
    }
}
