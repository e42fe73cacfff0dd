//! The projector API: what a read model implements so the daemon can build, follow, rebuild and
//! check it.
//!
//! Two traits, split by lifetime:
//! - [`Plugin`] is registered once with the daemon. It names the projection, says which code and
//!   configuration built it ([`Plugin::fingerprint`]), whether it keeps one state for the whole log
//!   or one per stream ([`Plugin::scope`]), and opens [`Projector`] instances in directories the
//!   daemon chooses.
//! - [`Projector`] is one copy of the state in one directory. The daemon's runner feeds it scribes
//!   in local order, in batches, and it commits each batch together with its checkpoint.
//!
//! The runner keeps several instances of one plugin at once: the live copy that answers reads and a
//! shadow copy being rebuilt beside it (blue/green), or a scratch copy for `quire replay`. Each
//! lives in its own directory and must not share state with the others.
//!
//! # The contract, in one place
//! 1. **One transaction per batch.** [`Projector::apply`] commits the effect of the whole batch and
//!    the new checkpoint together, or nothing at all. After a crash at any instant, reopening the
//!    directory gives a state that is exactly "every scribe up to [`Projector::checkpoint`]"; the
//!    runner then feeds the scribes after it, so nothing is skipped and nothing applied twice.
//! 2. **Order does not matter.** Built-in projectors (and any projector that wants replicas to agree,
//!    BRIEF invariant 7) give the same [`Projector::digest`] for the same *set* of scribes, whatever
//!    order and however many times each arrives. Judge conflicts by the scribes' own `(hlc, id)`,
//!    never by the arrival order or the wall clock. The `testing` feature checks this.
//! 3. **A bad scribe is the scribe's problem, not the projection's.** If one scribe cannot be
//!    applied (a payload that does not parse, say), return [`ApplyError::Scribe`] with its index; the
//!    runner parks it in the quarantine and applies the rest. Return [`ApplyError::Storage`] for
//!    failures of the projection itself (disk full); the runner retries later.
//! 4. **No async, no RocksDB, no gRPC.** Methods are plain blocking calls; the runner calls them off
//!    the async executor.
//! 5. **The log keeps the payloads.** A projector need not copy the bytes of the scribes it applies
//!    to read them later: [`Place::payloads`] reads any stored scribe's payload back by id, from
//!    the node's own store (the built-in `files` projector keeps ids and hashes, not bytes).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::{Policy, Scribe, ScribeId, StreamId};

/// Which scribes one instance of a projector sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One instance for the whole log: it sees every scribe of every stream.
    Log,
    /// One instance per stream: it sees the scribes of its stream only (including the genesis).
    Stream,
}

/// What the runner does when a scribe cannot be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFailure {
    /// Park the scribe in the quarantine and go on with the next ones.
    #[default]
    Quarantine,
    /// Park the scribe and stop this projection at it until an operator retries or skips it.
    Halt,
}

/// Read-only access to the payloads the node stores, by scribe id: what lets a projector keep an
/// id (and a hash) instead of a second copy of the bytes.
///
/// The daemon's runner hands every instance one backed by the node's payload store
/// ([`Place::payloads`]); `quire_projection_api::testing::MemoryPayloads` (feature `testing`)
/// holds the scribes a test applies. Calls are plain blocking reads, made from the thread that
/// calls the projector (or a reader of its copy); they may be made from several threads at once.
pub trait Payloads: Send + Sync {
    /// The payload of the stored scribe `id`, exactly as in the scribe the runner gave
    /// ([`Scribe::payload`]).
    ///
    /// - `Ok(Some(bytes))`: the payload.
    /// - `Ok(None)`: the scribe's payload was **redacted** (deleted on every node by a `redact`
    ///   scribe). A projector must not show what it held: the runner is rebuilding every copy
    ///   that applied it without it, and until that copy is swapped in, the old copy should
    ///   behave as if the version were gone.
    /// - `Err`: the node does not store the scribe (a projector asked for an id it was never
    ///   given, or the store is damaged), or reading failed. The message names the scribe.
    ///
    /// A payload can be up to 32 MiB: read what is needed, when it is needed.
    fn payload(&self, id: &ScribeId) -> Result<Option<Vec<u8>>, ProjectionError>;
}

/// The source of [`Place::new`]: it holds nothing, and says so.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPayloads;

impl Payloads for NoPayloads {
    fn payload(&self, id: &ScribeId) -> Result<Option<Vec<u8>>, ProjectionError> {
        Err(ProjectionError::new(format!(
            "no payload source for scribe {id}: this place was made by `Place::new` without one; \
             give it one with `Place::with_payloads` (tests: `testing::MemoryPayloads`)"
        )))
    }
}

/// Where an instance keeps its state.
#[derive(Clone)]
pub struct Place {
    /// A directory that belongs to this instance alone. It exists (possibly empty) when
    /// [`Plugin::open`] is called and is removed by the daemon when the instance is retired.
    pub dir: PathBuf,
    /// The stream, for a [`Scope::Stream`] plugin; `None` for a [`Scope::Log`] plugin.
    pub stream: Option<StreamId>,
    /// The stream's policy (from its genesis), for a [`Scope::Stream`] plugin; the default policy
    /// for a [`Scope::Log`] plugin. Rules such as key leases are part of the state's meaning.
    pub policy: Policy,
    /// The node's stored payloads, read-only, by scribe id (see [`Payloads`]): the daemon's
    /// runner gives the node's payload store; [`Place::new`] gives [`NoPayloads`].
    pub payloads: Arc<dyn Payloads>,
}

impl fmt::Debug for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Place")
            .field("dir", &self.dir)
            .field("stream", &self.stream)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Place {
    /// A place in `dir` for `stream` (`None`: the whole log), with the default policy and no
    /// payload source ([`NoPayloads`]).
    pub fn new(dir: impl Into<PathBuf>, stream: Option<StreamId>) -> Place {
        Place {
            dir: dir.into(),
            stream,
            policy: Policy::default(),
            payloads: Arc::new(NoPayloads),
        }
    }

    /// The same place, reading payloads from `payloads`.
    pub fn with_payloads(self, payloads: Arc<dyn Payloads>) -> Place {
        Place { payloads, ..self }
    }
}

/// An error of the projection as a whole (opening, reading its checkpoint, resetting, hashing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProjectionError(pub String);

impl ProjectionError {
    /// An error with this message.
    pub fn new(message: impl fmt::Display) -> Self {
        ProjectionError(message.to_string())
    }
}

/// Why [`Projector::apply`] committed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The scribe at `index` of the batch cannot be applied. Nothing of the batch was committed;
    /// the runner will apply the scribes before it, park this one, and go on after it.
    #[error("scribe {index} of the batch: {reason}")]
    Scribe {
        /// Its index in the batch passed to `apply`.
        index: usize,
        /// Why, in words an operator can act on (shown by `quire quarantine list`).
        reason: String,
    },
    /// The projection's own storage failed. Nothing was committed; the runner retries the batch
    /// later and shows the error in `quire projections`.
    #[error("{0}")]
    Storage(String),
}

/// The runner's default for [`Plugin::max_batch`].
pub const DEFAULT_MAX_BATCH: usize = 65_536;

/// A projection as registered with the daemon: a name, a version, a scope and a way to open
/// instances. One value serves every instance, so it holds configuration, not state.
pub trait Plugin: Send + Sync + 'static {
    /// The projection's name: what `quire projections`, `quire rebuild <name>` and `quire digest
    /// <name>` call it. Lowercase letters, digits and `-`; unique among a node's projectors.
    fn name(&self) -> &str;

    /// A fingerprint of the code version and the configuration that shape the state, e.g.
    /// `"v3 tables=notes"`. When it differs from the fingerprint the live copy was built with, the
    /// runner rebuilds the projection blue/green. Bump it whenever the same scribes would now give
    /// a different state.
    fn fingerprint(&self) -> String;

    /// Whether one instance serves the whole log or one serves each stream.
    fn scope(&self) -> Scope;

    /// What the runner does with a scribe this projection cannot apply.
    fn on_failure(&self) -> OnFailure {
        OnFailure::Quarantine
    }

    /// The most scribes the runner passes to one [`Projector::apply`] (it also stops a batch at
    /// 32 MiB of scribes). Big batches are cheaper for a projector that commits per batch (a
    /// database writes the pages a batch touched once); a smaller one bounds what a projector
    /// holds in memory per batch, or makes progress visible sooner.
    fn max_batch(&self) -> usize {
        DEFAULT_MAX_BATCH
    }

    /// Opens the instance kept in `place.dir`, creating an empty state if the directory holds
    /// none. Reopening a directory after a crash must give the last committed state. The runner
    /// also drops an open instance between two batches when it keeps too many open (a node's
    /// budget of open copies) and opens the place again when it is next needed.
    fn open(&self, place: &Place) -> Result<Box<dyn Projector>, ProjectionError>;
}

/// One copy of a projection's state. The runner calls it from one thread at a time.
pub trait Projector: Send {
    /// Applies `batch` and records `checkpoint` as the last applied local seq, in one transaction.
    ///
    /// `batch` is in local order and every scribe in it has `local_seq > self.checkpoint()`, except
    /// when an operator retries a quarantined scribe: then the batch is that one scribe and
    /// `checkpoint` is the current checkpoint, unchanged. `checkpoint` is at least the local seq
    /// of the last scribe in the batch; the batch may be empty, to move the checkpoint alone (past
    /// a parked scribe, or past other streams' scribes).
    fn apply(&mut self, batch: &[Scribe], checkpoint: u64) -> Result<(), ApplyError>;

    /// The last checkpoint committed by [`Projector::apply`]: 0 for an empty state.
    fn checkpoint(&self) -> Result<u64, ProjectionError>;

    /// Empties the state and sets the checkpoint to 0, in one transaction.
    fn reset(&mut self) -> Result<(), ProjectionError>;

    /// A SHA-256 of the state, not of the checkpoint: two instances that applied the same set of
    /// scribes give the same digest, on any node, in any order. Used by `quire digest`, to compare
    /// replicas, and by the conformance suite.
    fn digest(&self) -> Result<[u8; 32], ProjectionError>;
}
