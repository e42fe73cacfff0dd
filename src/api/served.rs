//! What the services over a per-stream projection share (`Sql`, `Files`): finding a held stream,
//! reading its live copy through pooled readers, and appending a node-signed scribe that is
//! answered once the copy includes it, so a client reads its own writes.

// Service code returns tonic's `Status`, as every client API service does.
#![allow(clippy::result_large_err)]

use std::time::Duration;

use bytes::Bytes;
use quire_projection_api::{Kind, ProjectionError, ScribeId, StreamId};
use tonic::Status;

use crate::api::access::{self, Caller};
use crate::api::{append_status, projections_status, wait_status};

/// The answer for a stream this node does not hold, or does not serve to the caller (the same
/// words: a private stream's id is not confirmed to a stranger).
pub fn not_held(stream: &StreamId) -> Status {
    Status::not_found(crate::log::AppendError::UnknownStream(*stream).to_string())
}
use crate::log::{Appended, Draft, Log, NewScribe};
use crate::projection::readers::{Loan, Readers, TakeError};
use crate::projection::Projections;

/// How long a write, or a read after a seq, waits for this node's copy to include it.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A log and the live copies of one per-stream projection.
#[derive(Debug)]
pub struct Served<R> {
    /// The node's log.
    pub log: Log,
    /// Readers of the projection's live copies.
    pub readers: Readers<R>,
}

impl<R> Clone for Served<R> {
    fn clone(&self) -> Self {
        Served {
            log: self.log.clone(),
            readers: self.readers.clone(),
        }
    }
}

impl<R: Send + 'static> Served<R> {
    /// The projection `name` of `log`'s streams, read with `open`.
    pub fn new(
        log: Log,
        projections: Projections,
        name: &'static str,
        open: fn(&std::path::Path) -> Result<R, ProjectionError>,
    ) -> Self {
        Served {
            log,
            readers: Readers::new(name, projections, open),
        }
    }

    /// The stream named by `bytes`, if this node holds it and serves it to `caller`.
    pub fn stream(&self, bytes: &[u8], caller: Caller) -> Result<StreamId, Status> {
        let stream = crate::api::convert::id_field(bytes, "stream")?;
        self.held(stream, caller)
    }

    /// `stream`, if this node holds it and serves it to `caller` (a private stream is served to
    /// the owner and to its own app alone; to anyone else it is not here, as if not held).
    pub fn held(&self, stream: StreamId, caller: Caller) -> Result<StreamId, Status> {
        match self.log.stream(&stream) {
            Some(state) if access::may_read(caller, &state) => Ok(stream),
            _ => Err(not_held(&stream)),
        }
    }

    /// Waits until `stream`'s copy includes the log up to `seq`.
    pub async fn wait(&self, stream: &StreamId, seq: u64) -> Result<(), Status> {
        self.readers
            .wait_applied(stream, seq, APPLY_TIMEOUT)
            .await
            .map_err(|error| wait_status(&error))
    }

    /// Runs `read` on a reader of `stream`'s live copy, off the async executor. A reader whose
    /// read failed with `E::is_storage` is dropped rather than pooled.
    pub async fn read<T, E>(
        &self,
        stream: StreamId,
        read: impl FnOnce(&mut R) -> Result<T, E> + Send + 'static,
        to_status: fn(&E) -> Status,
    ) -> Result<T, Status>
    where
        T: Send + 'static,
        E: Send + 'static,
    {
        let readers = self.readers.clone();
        // A turn first: reads beyond the node's few at once wait here, holding no reader and no
        // thread, and are refused when too many wait.
        let turn = readers
            .turn()
            .await
            .map_err(|busy| Status::unavailable(busy.to_string()))?;
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let mut loan: Loan<R> = readers.take(&stream).map_err(|error| match error {
                TakeError::Runner(error) => projections_status(&error),
                other => Status::internal(other.to_string()),
            })?;
            let result = read(&mut loan.reader);
            let status = result.as_ref().err().map(to_status);
            if status
                .as_ref()
                .is_none_or(|s| s.code() != tonic::Code::Internal)
            {
                readers.give(loan);
            }
            result.map_err(|_| status.expect("an error has a status"))
        })
        .await
        .map_err(|error| Status::internal(format!("read task failed: {error}")))?
    }

    /// Appends a node-signed scribe and waits until this node's copy includes it.
    pub async fn append_applied(
        &self,
        stream: StreamId,
        kind: Kind,
        content_type: &str,
        payload: Bytes,
        parents: Vec<ScribeId>,
    ) -> Result<Appended, Status> {
        let appended = self
            .log
            .append_one(Draft::New(NewScribe {
                stream: Some(stream),
                kind,
                content_type: content_type.into(),
                payload,
                parents,
            }))
            .await
            .map_err(|error| append_status(&error))?;
        self.wait(&stream, appended.seq).await?;
        Ok(appended)
    }
}
