//! Pooled read-only connections to the live copies of a per-stream projection, for the services
//! that answer reads from them (`Kv`, `Sql`).
//!
//! A reader belongs to one copy's directory. [`Readers::take`] finds the stream's live copy
//! now (a rebuild may have swapped in a new one since the last read), and hands out an idle
//! reader of that copy or opens one; [`Readers::give`] returns it. Readers of retired copies are
//! dropped when next noticed, so a swapped-out copy's files are closed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use quire_projection_api::{ProjectionError, StreamId};

use super::{Projections, RunnerError};

/// Idle readers kept per copy.
const MAX_IDLE: usize = 8;
/// Idle readers kept in all (each holds a few file descriptors): a node with many streams keeps
/// the busiest ones open and reopens the others.
const MAX_IDLE_TOTAL: usize = 64;

/// A pool of readers of type `R` for the projection `name`.
pub struct Readers<R> {
    name: &'static str,
    projections: Projections,
    open: fn(&Path) -> Result<R, ProjectionError>,
    idle: Arc<Mutex<Idle<R>>>,
}

/// Idle readers by copy directory, and how many times copies were forgotten: a reader on loan
/// from before a forget is closed when given back (its directory may hold a new copy by then).
struct Idle<R> {
    by_dir: HashMap<PathBuf, Vec<R>>,
    forgets: u64,
}

impl<R> Default for Idle<R> {
    fn default() -> Self {
        Idle {
            by_dir: HashMap::new(),
            forgets: 0,
        }
    }
}

impl<R> Clone for Readers<R> {
    fn clone(&self) -> Self {
        Readers {
            name: self.name,
            projections: self.projections.clone(),
            open: self.open,
            idle: self.idle.clone(),
        }
    }
}

impl<R> std::fmt::Debug for Readers<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readers").field("name", &self.name).finish()
    }
}

/// Why no reader could be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TakeError {
    /// The stream has no copy (unknown stream, or not opened yet).
    #[error(transparent)]
    Runner(#[from] RunnerError),
    /// The copy could not be opened.
    #[error("opening the {name} table: {source}")]
    Open {
        /// The projection.
        name: &'static str,
        /// Why.
        source: ProjectionError,
    },
}

/// A reader on loan, and the copy it reads.
#[derive(Debug)]
pub struct Loan<R> {
    /// The reader.
    pub reader: R,
    dir: PathBuf,
    forgets: u64,
}

impl<R> Readers<R> {
    /// A pool for projection `name`, opening readers with `open(copy directory)`.
    pub fn new(
        name: &'static str,
        projections: Projections,
        open: fn(&Path) -> Result<R, ProjectionError>,
    ) -> Readers<R>
    where
        R: Send + 'static,
    {
        let idle: Arc<Mutex<Idle<R>>> = Arc::default();
        // When a stream is left, its copies' readers are closed at once (they hold its files
        // open, and a copy joined again later may reuse the path).
        let weak = Arc::downgrade(&idle);
        projections.on_forget(Box::new(move |dir: &Path| {
            let Some(idle) = weak.upgrade() else {
                return false;
            };
            let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.forgets += 1;
            idle.by_dir.retain(|path, _| !path.starts_with(dir));
            true
        }));
        Readers {
            name,
            projections,
            open,
            idle,
        }
    }

    /// A reader of `stream`'s live copy.
    pub fn take(&self, stream: &StreamId) -> Result<Loan<R>, TakeError> {
        let (dir, _) = self.projections.live(self.name, stream)?;
        let forgets = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let forgets = idle.forgets;
            if let Some(reader) = idle.by_dir.get_mut(&dir).and_then(Vec::pop) {
                return Ok(Loan {
                    reader,
                    dir,
                    forgets,
                });
            }
            // A new copy may have been swapped in: forget readers of removed ones.
            idle.by_dir.retain(|path, _| path.exists());
            forgets
        };
        let reader = (self.open)(&dir).map_err(|source| TakeError::Open {
            name: self.name,
            source,
        })?;
        Ok(Loan {
            reader,
            dir,
            forgets,
        })
    }

    /// Returns a reader after use (drop a loan instead if its reader failed).
    pub fn give(&self, loan: Loan<R>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if loan.forgets != idle.forgets {
            return; // taken before a stream was left: closed
        }
        if idle.by_dir.values().map(Vec::len).sum::<usize>() >= MAX_IDLE_TOTAL {
            // Make room: forget readers of removed copies, then of the most crowded copy.
            idle.by_dir.retain(|path, _| path.exists());
            if let Some(crowded) = idle.by_dir.values_mut().max_by_key(|readers| readers.len()) {
                crowded.pop();
            }
        }
        let readers = idle.by_dir.entry(loan.dir).or_default();
        if readers.len() < MAX_IDLE {
            readers.push(loan.reader);
        }
    }
}

/// Why a wait for a copy to apply a seq ended without it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// The stream has no copy.
    #[error(transparent)]
    Runner(#[from] RunnerError),
    /// The node is shutting down.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// The copy did not reach the seq in time.
    #[error("written at seq {seq}, but the {name} table has not applied it within {timeout:?}; `quire projections` shows why")]
    Timeout {
        /// The projection.
        name: &'static str,
        /// The seq waited for.
        seq: u64,
        /// How long.
        timeout: std::time::Duration,
    },
}

impl<R> Readers<R> {
    /// Waits until `stream`'s live copy has applied the log up to `seq`.
    pub async fn wait_applied(
        &self,
        stream: &StreamId,
        seq: u64,
        timeout: std::time::Duration,
    ) -> Result<(), WaitError> {
        let (_, mut applied) = self.projections.live(self.name, stream)?;
        let waited = tokio::time::timeout(timeout, applied.wait_for(|applied| *applied >= seq))
            .await
            .map(|result| result.map(|_| ()));
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(WaitError::ShuttingDown),
            Err(_) => Err(WaitError::Timeout {
                name: self.name,
                seq,
                timeout,
            }),
        }
    }
}
