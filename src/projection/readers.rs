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

/// A pool of readers of type `R` for the projection `name`.
pub struct Readers<R> {
    name: &'static str,
    projections: Projections,
    open: fn(&Path) -> Result<R, ProjectionError>,
    idle: Arc<Mutex<Idle<R>>>,
    /// Idle readers kept in all (each holds a few file descriptors): the node's
    /// [`crate::fds::FdBudget::idle_readers`]. A node with many streams keeps the busiest ones open
    /// and reopens the others.
    max_idle_total: usize,
    /// The node's turns to read, shared by every pool.
    turns: Arc<ReadTurns>,
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
            max_idle_total: self.max_idle_total,
            turns: self.turns.clone(),
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
            max_idle_total: projections.fds().idle_readers,
            turns: projections.read_turns(),
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

    /// Waits for a turn to read (at most [`max_reads`] run at once on the node); hold the permit
    /// while the reader works.
    pub async fn turn(&self) -> Result<tokio::sync::OwnedSemaphorePermit, BusyError> {
        self.turns.turn().await
    }

    /// Returns a reader after use (drop a loan instead if its reader failed).
    pub fn give(&self, loan: Loan<R>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if loan.forgets != idle.forgets {
            return; // taken before a stream was left: closed
        }
        if idle.by_dir.values().map(Vec::len).sum::<usize>() >= self.max_idle_total {
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

/// Reads running at once on a node, over every query service: each holds a reader (a few file
/// descriptors) and a blocking thread, so a flood of queries queues here instead of opening a
/// connection and a thread each. Eight per core: a few slow queries (each stopped at the time
/// limit) hold a few turns while point queries go on beside them, sharing the cores.
pub fn max_reads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 8
}

/// Reads that may wait for a turn; one more is refused at once.
pub const MAX_WAITING_READS: usize = 1024;

/// How long a read may wait for its turn before it is refused.
pub const READ_QUEUE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The node's turns to read: [`max_reads`] at once, first come first served, at most
/// [`MAX_WAITING_READS`] waiting for at most [`READ_QUEUE_TIMEOUT`].
#[derive(Debug)]
pub struct ReadTurns {
    running: Arc<tokio::sync::Semaphore>,
    waiting: std::sync::atomic::AtomicUsize,
    max: usize,
    max_waiting: usize,
    timeout: std::time::Duration,
}

/// Why a read got no turn.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusyError {
    /// Too many reads wait already.
    #[error("the node is busy: {running} reads running and {waiting} waiting; try again shortly")]
    Queue {
        /// Reads running.
        running: usize,
        /// Reads waiting.
        waiting: usize,
    },
    /// The read waited too long.
    #[error(
        "the node is busy: no turn to read within {0:?} ({1} reads run at once); try again shortly"
    )]
    Timeout(std::time::Duration, usize),
}

impl Default for ReadTurns {
    fn default() -> Self {
        ReadTurns::new(max_reads(), MAX_WAITING_READS, READ_QUEUE_TIMEOUT)
    }
}

impl ReadTurns {
    /// Turns for `max` reads at once, `max_waiting` waiting for at most `timeout`.
    pub fn new(max: usize, max_waiting: usize, timeout: std::time::Duration) -> ReadTurns {
        ReadTurns {
            running: Arc::new(tokio::sync::Semaphore::new(max.max(1))),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            max: max.max(1),
            max_waiting,
            timeout,
        }
    }

    /// Waits for a turn; the permit is the turn, given back when dropped.
    pub async fn turn(&self) -> Result<tokio::sync::OwnedSemaphorePermit, BusyError> {
        use std::sync::atomic::Ordering;
        if let Ok(permit) = self.running.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let waiting = self.waiting.fetch_add(1, Ordering::AcqRel);
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            }
        }
        let _waiting = Waiting(&self.waiting);
        if waiting >= self.max_waiting {
            return Err(BusyError::Queue {
                running: self.max,
                waiting,
            });
        }
        match tokio::time::timeout(self.timeout, self.running.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(BusyError::Timeout(self.timeout, self.max)),
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
            // The copy went: the node is stopping, or the stream was left meanwhile.
            Ok(Err(_)) if self.projections.holds(stream) => Err(WaitError::ShuttingDown),
            Ok(Err(_)) => Err(WaitError::Runner(RunnerError::NotReady(format!(
                "stream {stream} was left before its {} table applied seq {seq}",
                self.name
            )))),
            Err(_) => Err(WaitError::Timeout {
                name: self.name,
                seq,
                timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_run_a_few_queue_a_bounded_number_and_refuse_the_rest() {
        let turns = Arc::new(ReadTurns::new(1, 2, std::time::Duration::from_millis(100)));
        let first = turns.turn().await.unwrap();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let turns = turns.clone();
                tokio::spawn(async move { turns.turn().await.map(drop) })
            })
            .collect();
        while turns.waiting.load(std::sync::atomic::Ordering::Acquire) < 2 {
            tokio::task::yield_now().await;
        }
        let refused = turns.turn().await.unwrap_err();
        assert!(
            matches!(
                refused,
                BusyError::Queue {
                    running: 1,
                    waiting: 2
                }
            ),
            "{refused}"
        );
        for waiter in waiters {
            let timed_out = waiter.await.unwrap().unwrap_err();
            assert!(matches!(timed_out, BusyError::Timeout(_, 1)), "{timed_out}");
        }
        assert_eq!(turns.waiting.load(std::sync::atomic::Ordering::Acquire), 0);
        drop(first);
        let _turn = turns
            .turn()
            .await
            .expect("a turn once the first is given back");
    }
}
