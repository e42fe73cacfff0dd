//! Leaving a stream: this node stops holding it and deletes every local copy of its scribes.
//!
//! In three steps, so a node that is stopped at any instant finishes the job when it starts:
//! 1. [`Log::begin_leave`], under the commit gate (no group commits meanwhile): one fsynced write
//!    deletes the stream's record, pending join, every peer's cursor on it and its held scribes, and
//!    marks it as being left. From then on the committer refuses its scribes (`Leaving`), so
//!    neither a client nor a peer adds to it, and replication stops asking for it.
//! 2. The caller stops projecting it (the projection runner deletes its copies).
//! 3. [`Log::finish_leave`] deletes its scribes in chunks, each under the gate: records, stream
//!    index, payloads and seals nothing else names. Their seqs stay in the `log` family, empty
//!    (vacated): no seq is ever given out twice, and every seq up to the head is accounted for.
//!    Then the store is flushed and compacted, so the deleted bytes leave the disk too.
//! 4. The caller has whole-log projections forget it (a rebuild), then [`Log::end_leave`] takes
//!    the mark away and the stream may be joined again.
//!
//! [`Log::open`] deletes the scribes of a leave a stop interrupted before anything runs, and keeps
//! the mark: [`Log::interrupted_leaves`] names them so the node finishes steps 2 and 4.

use std::collections::HashSet;

use quire_projection_api::StreamId;

use super::store::{Store, StoreError, Vacated};
use super::{held, Log, Shared};
use crate::scribe::Scribe;

/// Scribes deleted per chunk (the commit gate is held for one chunk at a time).
const CHUNK: usize = 4096;

/// Why a stream could not be left.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaveError {
    /// The node does not hold it.
    #[error("stream {0} is not held by this node; `quire stream list` shows the streams it holds (a join still waiting for its genesis is cancelled with `quire join --cancel`)")]
    NotHeld(StreamId),
    /// Another leave of it is under way.
    #[error("stream {0} is being left already")]
    Leaving(StreamId),
    /// Storage failed (what was done stays done; the leave finishes at the next start).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The node is shutting down (the leave finishes at the next start).
    #[error("the node is shutting down; the leave finishes when it starts again")]
    ShuttingDown,
}

/// Whether a held scribe's record is of `stream`.
fn held_of(stream: &StreamId, value: &[u8]) -> bool {
    held::decode(value)
        .and_then(|(_, parts)| Scribe::decode_unverified(parts, None).ok())
        .is_some_and(|scribe| scribe.stream_id() == *stream)
}

/// Deletes the scribes of a stream being left, chunk by chunk, each under `gate` (if any).
fn delete_scribes(
    store: &Store,
    stream: &StreamId,
    gate: Option<&std::sync::Mutex<()>>,
) -> Result<Vacated, StoreError> {
    let mut total = Vacated::default();
    loop {
        let chunk = {
            let _gate = gate.map(|gate| gate.lock().unwrap_or_else(|p| p.into_inner()));
            store.leave_chunk(stream, CHUNK)?
        };
        if chunk.scribes == 0 {
            break;
        }
        total += chunk;
    }
    store.purge()?;
    Ok(total)
}

/// Deletes the scribes of every leave a stop interrupted (at open, before the pipeline runs);
/// returns those streams (still marked).
pub(super) fn finish_interrupted(store: &Store) -> Result<HashSet<StreamId>, StoreError> {
    let leaving = store.leaving()?;
    for stream in &leaving {
        let vacated = delete_scribes(store, stream, None)?;
        tracing::info!(%stream, scribes = vacated.scribes, "deleted the scribes of a stream a stop interrupted leaving");
    }
    Ok(leaving.into_iter().collect())
}

impl Log {
    /// Stops holding `stream` (step 1 of the module docs): from now on its scribes are refused,
    /// and the set of streams held no longer names it.
    pub async fn begin_leave(&self, stream: StreamId) -> Result<(), LeaveError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || begin(&shared, stream))
            .await
            .map_err(|_| LeaveError::ShuttingDown)?
    }

    /// Deletes the scribes of a stream [`Log::begin_leave`] left (step 3 of the module docs).
    pub async fn finish_leave(&self, stream: StreamId) -> Result<Vacated, LeaveError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            delete_scribes(&shared.store, &stream, Some(&shared.gate))
        })
        .await
        .map_err(|_| LeaveError::ShuttingDown)?
        .map_err(LeaveError::from)
    }

    /// Ends the leave of `stream` (step 4 of the module docs): the mark goes, and the stream may
    /// be joined again. A leave that failed before this stays marked; the next start finishes it.
    pub async fn end_leave(&self, stream: StreamId) -> Result<(), LeaveError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            shared.store.end_leave(&stream)?;
            shared
                .leaving
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&stream);
            Ok(())
        })
        .await
        .map_err(|_| LeaveError::ShuttingDown)?
    }

    /// Streams whose leave a stop interrupted: their scribes are gone (deleted at open), their
    /// projections and the mark not yet.
    pub fn interrupted_leaves(&self) -> Vec<StreamId> {
        self.shared
            .leaving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// Whether `stream` is being left now.
    pub fn is_leaving(&self, stream: &StreamId) -> bool {
        self.shared
            .leaving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(stream)
    }
}

fn begin(shared: &Shared, stream: StreamId) -> Result<(), LeaveError> {
    let _gate = shared.gate.lock().unwrap_or_else(|p| p.into_inner());
    if !shared
        .leaving
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(stream)
    {
        return Err(LeaveError::Leaving(stream));
    }
    let held = shared
        .streams
        .read()
        .expect("streams lock")
        .contains_key(&stream);
    let begun = if held {
        shared
            .store
            .begin_leave(&stream, |value| held_of(&stream, value))
            .map_err(LeaveError::from)
    } else {
        Err(LeaveError::NotHeld(stream))
    };
    let released = match begun {
        Ok(released) => released,
        Err(error) => {
            shared
                .leaving
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&stream);
            return Err(error);
        }
    };
    {
        let mut held = shared.held.lock().expect("held lock");
        for key in &released {
            held.remove(key);
        }
    }
    let mut streams = shared.streams.write().expect("streams lock");
    streams.remove(&stream);
    shared.streams_tx.send_replace(streams.len());
    drop(streams);
    // Its watchers' receivers close.
    shared
        .stream_heads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&stream);
    Ok(())
}
