//! Work-token searches for the `record.add`s the node signs, off the append pipeline.
//!
//! A stream's policy may ask every `record.add` for a work token: its id must start with
//! `work_bits` zero bits (up to 24: about 16 million hashes on average, seconds of one core). When
//! the node signs such a scribe for a client, the search runs here, before the job reaches the
//! signer: on the blocking pool, in one of [`WorkTurns`]' turns (half the cores), with at most
//! [`MAX_WAITING`] appends waiting for a turn — past that an append is refused with UNAVAILABLE
//! (HTTP 503), and the signer and committer, which every stream's appends go through,
//! never wait for a search. A search whose caller went away, or whose log is closing, stops
//! within 65,536 tries.
//!
//! The cost of this: the scribe's clock is read when its search begins, so scribes the node signs
//! meanwhile (of any stream) may be stored before it. Node-signed scribes are stored in the order
//! of their clocks except for these.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use quire_projection_api::Kind;
use tokio::sync::Semaphore;

use super::signer::body;
use super::{AppendError, Draft, Log, Shared};
use crate::identity;
use crate::scribe::Unsealed;

/// Most appends that wait for a work turn; one more is refused.
pub const MAX_WAITING: usize = 64;

/// A node-signed draft whose work token the log has found: its envelope, ready to seal. Only the
/// log makes these.
#[derive(Debug, Clone)]
pub struct Worked(pub(super) Unsealed);

/// The node's turns for work-token searches.
pub(super) struct WorkTurns {
    turns: Arc<Semaphore>,
    count: usize,
    /// Appends in `find_work` that need a search: searching or waiting for a turn.
    waiting: AtomicUsize,
    /// Appends searching now.
    searching: Arc<AtomicUsize>,
}

impl WorkTurns {
    /// Half the cores (at least one) search at once.
    pub(super) fn new() -> WorkTurns {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let count = (cores / 2).max(1);
        WorkTurns {
            turns: Arc::new(Semaphore::new(count)),
            count,
            waiting: AtomicUsize::new(0),
            searching: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// Counts one append for as long as it lives.
struct Counted<T: std::ops::Deref<Target = AtomicUsize>>(T);

impl<T: std::ops::Deref<Target = AtomicUsize>> Counted<T> {
    fn new(count: T) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Counted(count)
    }
}

impl<T: std::ops::Deref<Target = AtomicUsize>> Drop for Counted<T> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Tells a running search to stop when the append that started it goes away.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The work bits `draft` needs found before it is signed (0: none).
fn bits_needed(shared: &Shared, draft: &Draft) -> u32 {
    match draft {
        Draft::New(new) if new.kind == Kind::RecordAdd => new.stream.map_or(0, |stream| {
            shared
                .streams
                .read()
                .expect("streams lock")
                .get(&stream)
                .map_or(0, |state| state.policy.work_bits)
        }),
        _ => 0,
    }
}

impl Log {
    /// Node-signed appends searching for a work token now, and those waiting for a turn.
    pub fn work_searches(&self) -> (usize, usize) {
        let work = &self.shared.work;
        let searching = work.searching.load(Ordering::SeqCst);
        let needing = work.waiting.load(Ordering::SeqCst);
        (searching, needing.saturating_sub(searching))
    }

    /// `drafts`, with the work token of each node-signed `record.add` that needs one found (see
    /// the module docs). Drafts that need none come back as they were, at no cost.
    pub(super) async fn find_work(&self, drafts: Vec<Draft>) -> Result<Vec<Draft>, AppendError> {
        let shared = &self.shared;
        if drafts.iter().all(|draft| bits_needed(shared, draft) == 0) {
            return Ok(drafts);
        }
        let work = &shared.work;
        let waiting = work.waiting.load(Ordering::SeqCst);
        let _waiting = Counted::new(&work.waiting);
        if waiting >= MAX_WAITING + work.count {
            return Err(AppendError::WorkBusy {
                waiting: waiting - work.count,
                turns: work.count,
            });
        }
        let mut closing = shared.closing.subscribe();
        let turn = tokio::select! {
            turn = work.turns.clone().acquire_owned() => turn.map_err(|_| AppendError::ShuttingDown)?,
            _ = closing.wait_for(|closing| *closing) => return Err(AppendError::ShuttingDown),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let _stop_on_drop = StopOnDrop(stop.clone());
        let searcher = shared.clone();
        let searching = work.searching.clone();
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let _searching = Counted::new(searching);
            let author = identity::author_key(&searcher.key);
            let stopped = || stop.load(Ordering::SeqCst) || *searcher.closing.borrow();
            drafts
                .into_iter()
                .map(|draft| match bits_needed(&searcher, &draft) {
                    0 => Ok(draft),
                    bits => {
                        let Draft::New(new) = draft else {
                            unreachable!("only new drafts need work")
                        };
                        body(&searcher, author, new)
                            .into_unsealed_unless(bits, &stopped)
                            .map(|unsealed| Draft::Worked(Worked(unsealed)))
                            .ok_or(AppendError::ShuttingDown)
                    }
                })
                .collect()
        })
        .await
        .map_err(|_| AppendError::ShuttingDown)?
    }
}
