//! The local log: the [`Log`] handle, its options, errors and types; reads and the head.
//!
//! This file holds what callers see and the state the pipeline shares ([`Log`], [`LogOptions`],
//! [`AppendError`], [`Draft`], [`StreamState`], ...). The pipeline itself lives beside it, one
//! file per stage: `signer.rs` (clocks, signing, verification), `committer.rs` (seqs, the write
//! batch, publishing the head) and `rules.rs` (the admission rules: every reason a valid scribe
//! is refused, see [`PayloadChecks`]). Storage layouts are in [`store`], subscriptions in [`subscribe`].
//!
//! # How an append flows
//! 1. A caller hands [`Log::append`] a *job*: one or more [`Draft`]s, committed all together or not
//!    at all.
//! 2. The **signer** thread drains every job waiting, gives each node-signed draft the next value of
//!    the node's hybrid logical clock (in arrival order), then signs those drafts and decodes and
//!    verifies client-signed ones *in parallel on every core* (rayon). Signing is the expensive part
//!    of an append, so it never runs on the commit path.
//!    The payload rules, which depend on the scribe alone, are judged there too. A work token is
//!    found before a job reaches the signer (`work.rs`), so no search holds up the pipeline.
//! 3. The **committer** thread takes prepared groups in order, checks each scribe against what is
//!    stored (duplicate? stream known? author allowed by the stream's policy? within the limits?
//!    parents stored? — the rules are in `rules.rs`; the signer's payload verdict is taken in its
//!    place among them), assigns the next local seqs and
//!    writes the whole group in one RocksDB write batch (group commit; one fsync with `--sync`).
//!    Only then does it publish the new head and answer the callers.
//!
//! Two threads in a pipeline means group N+1 is being signed while group N is being written, and
//! node-signed scribes commit in the order of their clocks (a scribe is never stored before one its
//! author wrote earlier) — but for a `record.add` whose work token was searched for: its clock is
//! read when the search begins.
//!
//! **Architecture invariant:** only the committer thread writes to the store, and it publishes a new
//! head only after the write batch holding every seq up to it has been written. Readers bound every
//! read by the published head, so they only ever see a committed, gapless prefix (invariant 4).
//!
//! The payload rules of built-in kinds and projectors are handed in through
//! [`LogOptions::payload_checks`]: this module depends on no projector crate.

mod committer;
pub mod epoch;
pub mod held;
mod leave;
pub mod redact;
pub mod retention;
pub mod rules;
mod signer;
pub mod store;
pub mod subscribe;
pub mod work;

pub use leave::LeaveError;
pub use rules::PayloadChecks;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use quire_projection_api::{AuthorKey, Kind, PayloadError, Policy, ScribeId, StreamId};
use tokio::sync::{mpsc, oneshot, watch};

use crate::genesis::{genesis_from_payload, GenesisError};
use crate::hlc::{Clock, WallClock};
use crate::identity;
use crate::membership::Membership;
use crate::scribe::{Parts, Scribe, ScribeError};
use epoch::Epochs;
use store::{CursorUpdate, HeldKey, PeerOrigin, Store, StoreError, StoredEntry, StreamRecord};

/// Jobs waiting to be signed before `append` callers wait for room.
const SUBMIT_QUEUE: usize = 1024;

/// Why an append was refused. Nothing of a refused job is stored.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// Not a valid scribe (malformed, not canonical, payload or proof not matching, bad seal).
    #[error(transparent)]
    Scribe(#[from] ScribeError),
    /// The scribe's stream is not held by this node.
    #[error("stream {0} is not held by this node; create it, or join it from a peer that has it")]
    UnknownStream(StreamId),
    /// A new stream whose owner, or the signer of its genesis, this node does not know, under
    /// `--accept-streams known`.
    #[error("this node holds new streams only of known owners (--accept-streams known), and {key} (the {what} of stream {stream}) is not one: `quire peer allow {key}` on this node makes it known")]
    OwnerNotKnown {
        /// The stream.
        stream: StreamId,
        /// The key it does not know.
        key: AuthorKey,
        /// What the key is to the stream: "owner", or "signer of the genesis".
        what: &'static str,
    },
    /// This node is leaving the scribe's stream (deleting its scribes).
    #[error("this node is leaving stream {0} (deleting its scribes); join it again once the leave has finished")]
    Leaving(StreamId),
    /// A parent named by the scribe is not stored here (in the same stream).
    #[error(
        "parent {parent} is not stored on this node in stream {stream}; append the parent first"
    )]
    UnknownParent {
        /// The missing parent.
        parent: ScribeId,
        /// The scribe's stream.
        stream: StreamId,
    },
    /// A replicated batch of one stream carried a scribe of another (or another genesis).
    #[error("a batch of stream {expected} carried a scribe of stream {actual}")]
    WrongStream {
        /// The batch's stream.
        expected: StreamId,
        /// The scribe's stream.
        actual: StreamId,
    },
    /// A parent named by the scribe belongs to another stream.
    #[error("parent {parent} belongs to stream {parent_stream}, not to {stream}: parents must be scribes of the same stream")]
    ParentInOtherStream {
        /// The parent.
        parent: ScribeId,
        /// The parent's stream.
        parent_stream: StreamId,
        /// The scribe's stream.
        stream: StreamId,
    },
    /// A membership rule refused the scribe (not an admin, an unknown view, the owner revoked).
    #[error("stream {stream}: {kind} scribe by {author} refused: {error}")]
    Membership {
        /// The stream.
        stream: StreamId,
        /// The kind.
        kind: Kind,
        /// The author.
        author: AuthorKey,
        /// Why.
        error: crate::membership::MembershipError,
    },
    /// The author is over one of its quotas in the stream.
    #[error("author {author} is over its quota in stream {stream}: {what}")]
    QuotaExceeded {
        /// The author.
        author: AuthorKey,
        /// The stream.
        stream: StreamId,
        /// Which quota, and by how much.
        what: String,
    },
    /// A `redact` scribe that cannot redact its target (its payload does not decode, its target
    /// is not one of its parents or may not be redacted), or a redacted scribe whose
    /// justification is not a valid `redact` of it.
    #[error("redaction of {target}: {reason}")]
    BadRedaction {
        /// The scribe whose payload would go.
        target: String,
        /// What is wrong.
        reason: String,
    },
    /// A `redact` scribe by neither the target's author nor the stream's owner.
    #[error("author {author} may not redact scribe {target}: only its author or the stream's owner may ({who})")]
    RedactDenied {
        /// The `redact` scribe's author.
        author: AuthorKey,
        /// The scribe it targets.
        target: ScribeId,
        /// Who may: the target's author and the stream's owner, by key.
        who: String,
    },
    /// A prune this node planned under a retention rule a `retain` has replaced since.
    #[error("stream {0}: its retention rule changed since this prune was planned; prune again")]
    RuleChanged(StreamId),
    /// A `retain` scribe whose rule does not decode or is out of bounds.
    #[error("retain payload: {0}")]
    BadRetention(String),
    /// A client's `redact` of a scribe redacted already (it would change nothing).
    #[error("scribe {0} is redacted already")]
    AlreadyRedacted(ScribeId),
    /// The scribe's payload was redacted on this node: it is never stored again.
    #[error("scribe {0} was redacted: its payload is refused (only its envelope is kept)")]
    Redacted(ScribeId),
    /// A membership scribe's payload does not decode.
    #[error("{kind} payload: {reason}")]
    BadMembership {
        /// The kind.
        kind: Kind,
        /// What is wrong.
        reason: String,
    },
    /// The stream's policy does not let this author write this kind.
    #[error("author {author} may not write {kind} scribes into stream {stream}: its policy allows {allowed}")]
    PermissionDenied {
        /// The author.
        author: AuthorKey,
        /// The kind.
        kind: Kind,
        /// The stream.
        stream: StreamId,
        /// Who may, in words.
        allowed: String,
    },
    /// The payload is over the stream's per-scribe limit.
    #[error(
        "payload of {size} bytes is over the limit of {limit} bytes per scribe in stream {stream}"
    )]
    PayloadTooLarge {
        /// Payload size.
        size: u64,
        /// The policy's limit.
        limit: u64,
        /// The stream.
        stream: StreamId,
    },
    /// The stream would grow over its total limit.
    #[error(
        "stream {stream} holds {held} bytes; {size} more would pass its limit of {limit} bytes"
    )]
    StreamFull {
        /// Bytes the stream holds.
        held: u64,
        /// Size of the refused scribe.
        size: u64,
        /// The policy's limit.
        limit: u64,
        /// The stream.
        stream: StreamId,
    },
    /// A `record.add` lacks the work token its stream's policy asks for.
    #[error("stream {stream} asks record.add scribes for a work token: the id (sha256 of the envelope) must start with {bits} zero bits (it has {has}); choose a nonce that gives it, or let the node sign")]
    MissingWork {
        /// Bits asked for.
        bits: u32,
        /// Bits the scribe has.
        has: u32,
        /// The stream.
        stream: StreamId,
    },
    /// The payload breaks a payload rule handed to the log ([`LogOptions::payload_checks`]: a
    /// built-in kind's rule such as a file path, or a projector's such as the `_schema`).
    #[error("{kind} scribe refused: {reason}")]
    BadPayload {
        /// The scribe's kind.
        kind: Kind,
        /// What is wrong, in words that say what to fix.
        reason: PayloadError,
    },
    /// A genesis scribe's payload is not a valid `StreamGenesis`.
    #[error("bad stream genesis: {0}")]
    BadGenesis(GenesisError),
    /// One draft of a multi-draft job was refused; the whole job was.
    #[error("item {index} of the batch (counting `appends` first, then `signed`, then the scribes of `sealed`): {source} (nothing of the batch was stored)")]
    InBatch {
        /// Position of the refused draft in the job.
        index: usize,
        /// Why.
        source: Box<AppendError>,
    },
    /// A scribe of a batch is dated too far ahead of this node's clock: only a scribe appended on
    /// its own is kept aside until then (a batch is stored all at once or not at all).
    #[error("the scribe is dated {ahead_ms} ms ahead of this node's clock, more than the {limit_ms} ms allowed; only a scribe appended on its own is kept aside until its time: append it alone, or fix the writer's clock")]
    FutureInBatch {
        /// How far ahead.
        ahead_ms: u64,
        /// [`held::MAX_AHEAD_MS`].
        limit_ms: u64,
    },
    /// A client's `kv.*` scribe is dated too far before this node's clock.
    #[error("{kind} scribe is dated {behind_ms} ms before this node's clock, more than the {limit_ms} ms allowed for kv writes (leases are judged by the writers' clocks): sign it with a current clock")]
    Backdated {
        /// The scribe's kind.
        kind: Kind,
        /// How far behind.
        behind_ms: u64,
        /// [`held::MAX_AHEAD_MS`].
        limit_ms: u64,
    },
    /// Too many scribes are held already, in all or in the writer's share (see [`held`]).
    #[error("the scribe is dated {ahead_ms} ms ahead of this node's clock, and this node already keeps {held} scribes ({bytes} bytes) {whose} aside, the most it may; fix the writer's clock, or retry once their time has come")]
    HeldFull {
        /// How far ahead.
        ahead_ms: u64,
        /// Scribes held.
        held: u64,
        /// Bytes held (likewise).
        bytes: u64,
        /// Whose: "in all", "from this node's clients", "from this peer".
        whose: &'static str,
    },
    /// The store failed (to read what a scribe is checked against, or to write the group).
    /// Shared: one failed write fails every job of its group.
    #[error("storage failure, nothing stored: {0}")]
    Storage(Arc<StoreError>),
    /// The node is shutting down.
    #[error("the node is shutting down; retry on a running node")]
    ShuttingDown,
    /// Too many node-signed appends wait for a work-token search (see [`work`]).
    #[error("{waiting} appends already wait for this node to search for work tokens ({turns} searches run at once, at most {max} wait); retry later, or find the token yourself and send the scribe signed", max = work::MAX_WAITING)]
    WorkBusy {
        /// Appends waiting.
        waiting: usize,
        /// Searches that run at once.
        turns: usize,
    },
}

impl From<StoreError> for AppendError {
    fn from(error: StoreError) -> Self {
        AppendError::Storage(Arc::new(error))
    }
}

impl AppendError {
    /// The underlying error, looking through [`AppendError::InBatch`].
    pub fn root(&self) -> &AppendError {
        match self {
            AppendError::InBatch { source, .. } => source.root(),
            other => other,
        }
    }
}

/// Errors opening a log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The node key failed.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Other users may write into the data directory (and so swap the node's key or its log).
    #[error("data directory {path} can be written by other users (mode {mode:o}); make it private with `chmod 700 {path}`")]
    DataDirMode {
        /// The directory.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
}

/// Creates the data directory private to this user (mode 0700) if it is missing; refuses one other
/// users may write into, and warns about one they may read.
fn private_data_dir(data_dir: &Path) -> Result<(), OpenError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let path = || data_dir.display().to_string();
    let new = !data_dir.exists();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|source| OpenError::DataDir {
            path: path(),
            source,
        })?;
    let mode = std::fs::metadata(data_dir)
        .map_err(|source| OpenError::DataDir {
            path: path(),
            source,
        })?
        .permissions()
        .mode()
        & 0o7777;
    if new {
        // The umask may have taken bits away, never added any; make it exactly 0700.
        let _ = std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700));
        return Ok(());
    }
    if mode & 0o022 != 0 {
        return Err(OpenError::DataDirMode { path: path(), mode });
    }
    if mode & 0o044 != 0 {
        tracing::warn!(
            dir = %data_dir.display(),
            mode = format!("{mode:o}"),
            "other users can list the data directory (its key and token files stay private); `chmod 700` it"
        );
    }
    Ok(())
}

/// One thing to append.
#[derive(Debug, Clone)]
pub enum Draft {
    /// A new scribe the node signs with its own key.
    New(NewScribe),
    /// A scribe a client sealed; stored exactly as given.
    Signed {
        /// Its envelope, payload, seal and proof.
        parts: Parts,
        /// The id the client claims, checked against the bytes if given.
        claimed_id: Option<ScribeId>,
    },
    /// A new scribe whose work token the log has found (only the log makes these: see [`work`]).
    Worked(work::Worked),
}

/// The fields of a scribe the node will sign.
#[derive(Debug, Clone)]
pub struct NewScribe {
    /// The stream (`None` only for a `stream.create` genesis).
    pub stream: Option<StreamId>,
    /// The kind.
    pub kind: Kind,
    /// MIME type of the payload.
    pub content_type: String,
    /// The payload.
    pub payload: Bytes,
    /// Parents (stored scribes of the same stream).
    pub parents: Vec<ScribeId>,
}

/// The result of one appended draft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The scribe's id.
    pub id: ScribeId,
    /// Its local seq.
    pub seq: u64,
    /// True when it was already stored and nothing changed.
    pub duplicate: bool,
    /// Its clock.
    pub hlc: u64,
    /// True when it is dated too far ahead of this node's clock and was kept aside (see
    /// [`held`]): it has no seq yet (`seq` is 0).
    pub held: bool,
}

/// Where a job came from: local appends are held to the stream's total size limit; scribes from a
/// peer remember the peer, so they are never sent back to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A client of this node.
    Local,
    /// Replication from this peer (in this log epoch of it).
    Peer(PeerOrigin),
}

/// The outcome of each scribe of a replicated batch.
pub type EachOutcome = Vec<Result<Appended, AppendError>>;

/// A stream held by this node: what its genesis says, and its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    /// The stream id (its genesis id).
    pub id: StreamId,
    /// Its human name.
    pub name: String,
    /// Its owner.
    pub owner: AuthorKey,
    /// Its effective policy.
    pub policy: Policy,
    /// Its counters.
    pub record: StreamRecord,
    /// Its membership: genesis members and stored membership scribes (shared; replaced, not
    /// changed, when a membership scribe is admitted).
    pub membership: Arc<Membership>,
    /// Its retention rule in force: the newest `retain` scribe's, else the genesis's.
    pub retention: Arc<retention::InForce>,
}

impl StreamState {
    /// Whether `key` may receive the stream: anyone for a public stream; for a private one, a
    /// key holding a role in its membership (every membership scribe held counts).
    pub fn may_read(&self, key: &AuthorKey) -> bool {
        !self.policy.private || self.membership.roles().contains_key(key)
    }
}

/// Options for opening a log.
#[derive(Clone)]
pub struct LogOptions {
    /// fsync every group commit (the store's write options are set from it when it is opened).
    pub sync: bool,
    /// The wall clock (injectable for tests).
    pub wall: WallClock,
    /// The payload rules every scribe but a genesis must pass, local or from a peer. Default:
    /// none. A node hands in the built-in kinds' rules and its projectors' (see
    /// `crate::node::open_log`); a log opened with none stores any payload its policy allows.
    pub payload_checks: PayloadChecks,
    /// The version of the rules it applies ([`rules::RULES_VERSION`] unless a test plays an
    /// older or newer node).
    pub rules_version: u32,
    /// Which new streams it takes (a genesis appended, created, or fetched by a join).
    pub accept_streams: AcceptStreams,
}

/// Which new streams a node takes (`quire serve --accept-streams`). Streams already held are
/// kept whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AcceptStreams {
    /// Any stream its owner (token) creates or joins.
    #[default]
    Any,
    /// Only streams owned by this node's key or by a key allowed with `quire peer allow` (a
    /// known key); any other genesis is refused, `PERMISSION_DENIED`.
    Known,
}

impl std::str::FromStr for AcceptStreams {
    type Err = String;

    fn from_str(text: &str) -> Result<AcceptStreams, String> {
        match text {
            "any" => Ok(AcceptStreams::Any),
            "known" => Ok(AcceptStreams::Known),
            other => Err(format!(
                "--accept-streams {other:?}: use any (every stream the owner creates or joins) or known (only streams owned by this node or by keys allowed with `quire peer allow`)"
            )),
        }
    }
}

impl std::fmt::Display for AcceptStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AcceptStreams::Any => "any",
            AcceptStreams::Known => "known",
        })
    }
}

impl std::fmt::Debug for LogOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogOptions")
            .field("sync", &self.sync)
            .field("payload_checks", &self.payload_checks)
            .finish()
    }
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            sync: false,
            wall: crate::hlc::system_wall_clock(),
            payload_checks: PayloadChecks::default(),
            rules_version: rules::RULES_VERSION,
            accept_streams: AcceptStreams::Any,
        }
    }
}

struct Job {
    drafts: Vec<Draft>,
    origin: Origin,
    /// For a replicated batch: each draft's seq in the peer's log (its origin's seq).
    peer_seqs: Vec<u64>,
    /// A held scribe entering the log now: its record goes, whatever the verdict.
    release: Option<HeldKey>,
    /// From a peer whose rules differ: a scribe a rule refuses is kept aside, not refused (see
    /// [`held`]).
    keep_refused: bool,
    cursor: Option<CursorUpdate>,
    /// Replicated batches: every scribe must belong to this stream (a genesis only if it is the
    /// stream's own).
    expect_stream: Option<StreamId>,
    reply: Reply,
}

/// All-or-nothing jobs (client appends) and each-on-its-own jobs (replicated batches).
enum Reply {
    Atomic(oneshot::Sender<Result<Vec<Appended>, AppendError>>),
    Each(oneshot::Sender<Result<EachOutcome, AppendError>>),
}

pub(crate) struct Shared {
    pub(crate) store: Store,
    streams: RwLock<HashMap<StreamId, StreamState>>,
    head: AtomicU64,
    pub(crate) head_tx: watch::Sender<u64>,
    streams_tx: watch::Sender<usize>,
    pub(crate) closing: watch::Sender<bool>,
    clock: Clock,
    key: SigningKey,
    epochs: Epochs,
    /// The held set (see [`held`]).
    held: std::sync::Mutex<held::HeldSet>,
    /// The version of the rules this log applies.
    rules_version: u32,
    /// Which new streams it takes.
    accept_streams: AcceptStreams,
    /// Held by the committer while it commits a group, and by a leave while it deletes (see
    /// `leave.rs`): nothing is admitted against a store a leave is changing.
    gate: std::sync::Mutex<()>,
    /// Streams being left: their scribes are refused.
    leaving: std::sync::Mutex<HashSet<StreamId>>,
    /// The head seq of each stream someone watches ([`Log::watch_stream_head`]), published after
    /// the log's head: a commit wakes only the watchers of the streams it touched.
    stream_heads: std::sync::Mutex<HashMap<StreamId, watch::Sender<u64>>>,
    /// Turns for the work-token searches of node-signed appends.
    work: work::WorkTurns,
    /// Bytes waiting in readers' channels, in all and per address.
    readers: subscribe::ReaderBytes,
    /// Redactions committed and not yet purged from the disk.
    redactions: redact::Redactions,
    /// Prune runs under way, per stream ([`Log::pruning`]).
    prune_runs: std::sync::Mutex<HashMap<StreamId, usize>>,
    /// Fires when this value is dropped: declared last, so after `store` is closed.
    _closed: ClosedSignal,
}

impl Shared {
    /// Whether `key` is this node's own or one allowed with `quire peer allow`.
    pub(crate) fn knows(&self, key: &AuthorKey) -> Result<bool, StoreError> {
        Ok(key.as_bytes() == self.key.verifying_key().as_bytes()
            || self.store.peer_key(key)? == Some(store::PeerKeyRule::Allow))
    }

    /// Whether the log holds `stream`.
    pub(crate) fn holds(&self, stream: &StreamId) -> bool {
        self.streams
            .read()
            .expect("streams lock")
            .contains_key(stream)
    }
}

/// Sends on drop: tells [`Log::close`] that the store is closed (a strong count of 0 is not
/// enough: the last holder may still be inside the store's destructor).
struct ClosedSignal(Option<tokio::sync::oneshot::Sender<()>>);

impl Drop for ClosedSignal {
    fn drop(&mut self) {
        if let Some(sender) = self.0.take() {
            let _ = sender.send(());
        }
    }
}

/// The local log of one node. Cheap to clone; every clone is the same log.
#[derive(Clone)]
pub struct Log {
    shared: Arc<Shared>,
    submit: Arc<RwLock<Option<mpsc::Sender<Job>>>>,
    threads: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    closed: Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").field("head", &self.head()).finish()
    }
}

impl Log {
    /// Opens the log of the data directory `data_dir` (created if missing, with a new node key).
    pub fn open(data_dir: &Path, options: LogOptions) -> Result<Log, OpenError> {
        private_data_dir(data_dir)?;
        let key = identity::load_or_create(&data_dir.join(identity::KEY_FILE))?;
        let store = Store::open(&store_path(data_dir), options.sync)?;
        let head = store.head()?;
        let clock = Clock::new(store.hlc_high_water()?, options.wall.clone());
        let ahead_ms = (clock.peek() >> 16).saturating_sub(clock.wall_ms());
        if ahead_ms > held::MAX_AHEAD_MS {
            tracing::warn!(
                ahead_ms,
                "this node's clock is ahead of its wall clock (it never goes back: was the wall \
                 clock set back?); until the wall clock catches up, peers hold what this node signs"
            );
        }
        let leaving = leave::finish_interrupted(&store)?;
        if store.purge_marked()? {
            // A redaction committed before a stop its purge did not follow: purge everything.
            store.purge()?;
            store.clear_purge_mark()?;
        }
        let epochs = store.epochs()?;
        let requeued = store.requeue_held_for_rules(options.rules_version)?;
        let held_set = held::HeldSet::new(store.held_keys(held::share_of)?);
        if requeued > 0 {
            tracing::info!(
                requeued,
                rules = options.rules_version,
                "scribes kept aside under other rules are judged again by this version's"
            );
        }
        if let Some((_, ended_at)) = epochs.ended.last() {
            tracing::info!(
                head,
                ended_at,
                "log epoch {} begins at seq {}",
                hex::encode(epochs.current),
                head + 1
            );
        }
        let mut streams = HashMap::new();
        for (stream, record) in store.streams()? {
            let genesis = store.get(&stream)?.ok_or_else(|| {
                StoreError::Damaged(format!("stream {stream} has no genesis scribe"))
            })?;
            let scribe = Scribe::decode_unverified(genesis.parts, None)
                .map_err(|error| StoreError::Damaged(format!("genesis of {stream}: {error}")))?;
            let genesis = genesis_from_payload(&scribe.body.payload, scribe.body.author)
                .map_err(|error| StoreError::Damaged(format!("genesis of {stream}: {error}")))?;
            let (membership, retention) = load_membership(&store, &stream, &genesis)?;
            streams.insert(
                stream,
                StreamState {
                    id: stream,
                    name: genesis.name,
                    owner: genesis.owner,
                    policy: genesis.policy,
                    record,
                    membership: Arc::new(membership),
                    retention: Arc::new(retention),
                },
            );
        }
        let (head_tx, _) = watch::channel(head);
        let (closing, _) = watch::channel(false);
        let (streams_tx, _) = watch::channel(streams.len());
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        let shared = Arc::new(Shared {
            store,
            streams: RwLock::new(streams),
            head: AtomicU64::new(head),
            head_tx,
            streams_tx,
            closing,
            clock,
            key,
            epochs,
            held: std::sync::Mutex::new(held_set),
            rules_version: options.rules_version,
            accept_streams: options.accept_streams,
            gate: std::sync::Mutex::new(()),
            leaving: std::sync::Mutex::new(leaving),
            stream_heads: std::sync::Mutex::new(HashMap::new()),
            work: work::WorkTurns::new(),
            readers: subscribe::ReaderBytes::default(),
            redactions: redact::Redactions::new(),
            prune_runs: std::sync::Mutex::new(HashMap::new()),
            _closed: ClosedSignal(Some(closed_tx)),
        });
        let (submit, submit_rx) = mpsc::channel(SUBMIT_QUEUE);
        let (prepared_tx, prepared_rx) = std::sync::mpsc::sync_channel(2);
        let signer = {
            let shared = shared.clone();
            let checks = options.payload_checks;
            std::thread::Builder::new()
                .name("quire-signer".into())
                .spawn(move || signer::signer_loop(&shared, &checks, submit_rx, prepared_tx))
                .expect("spawn signer thread")
        };
        let committer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("quire-committer".into())
                .spawn(move || committer::committer_loop(&shared, prepared_rx))
                .expect("spawn committer thread")
        };
        Ok(Log {
            shared,
            submit: Arc::new(RwLock::new(Some(submit))),
            threads: Arc::new(std::sync::Mutex::new(vec![signer, committer])),
            closed: Arc::new(std::sync::Mutex::new(Some(closed_rx))),
        })
    }

    /// Hands `job` to the signer (then the committer).
    async fn submit(&self, job: Job) -> Result<(), AppendError> {
        let submit = self
            .submit
            .read()
            .expect("submit lock")
            .clone()
            .ok_or(AppendError::ShuttingDown)?;
        submit
            .send(job)
            .await
            .map_err(|_| AppendError::ShuttingDown)
    }

    /// Appends one job: every draft is stored, in order, in one commit, or none is.
    pub async fn append(
        &self,
        drafts: Vec<Draft>,
        origin: Origin,
    ) -> Result<Vec<Appended>, AppendError> {
        if drafts.is_empty() {
            return Ok(Vec::new());
        }
        let drafts = self.find_work(drafts).await?;
        let (reply, answer) = oneshot::channel();
        let reply = Reply::Atomic(reply);
        self.submit(Job {
            drafts,
            origin,
            peer_seqs: Vec::new(),
            release: None,
            keep_refused: false,
            cursor: None,
            expect_stream: None,
            reply,
        })
        .await?;
        answer.await.map_err(|_| AppendError::ShuttingDown)?
    }

    /// Stores a batch of scribes received from `peer`, each with its seq in the peer's log (the
    /// `seq` of `peer` itself is not used): each is validated exactly like an append and
    /// stored or refused on its own; `cursor` (if any) is written in the same write batch as the
    /// scribes it covers (invariant 6), even when every scribe was a duplicate or refused.
    pub async fn replicate(
        &self,
        peer: PeerOrigin,
        stream: StreamId,
        scribes: Vec<(Parts, Option<ScribeId>, u64)>,
        cursor: Option<CursorUpdate>,
        keep_refused: bool,
    ) -> Result<EachOutcome, AppendError> {
        if scribes.is_empty() && cursor.is_none() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        let peer_seqs = scribes.iter().map(|(_, _, seq)| *seq).collect();
        let drafts = scribes
            .into_iter()
            .map(|(parts, claimed_id, _)| Draft::Signed { parts, claimed_id })
            .collect();
        self.submit(Job {
            drafts,
            origin: Origin::Peer(peer),
            peer_seqs,
            release: None,
            keep_refused,
            cursor,
            expect_stream: Some(stream),
            reply: Reply::Each(reply),
        })
        .await?;
        answer.await.map_err(|_| AppendError::ShuttingDown)?
    }

    /// The version of the rules this log judges scribes by.
    pub fn rules_version(&self) -> u32 {
        self.shared.rules_version
    }

    /// Scribes kept aside and bytes they take (see [`held`]).
    pub fn held(&self) -> (u64, u64) {
        let held = self.shared.held.lock().expect("held lock");
        (held.count, held.bytes)
    }

    /// Sends up to `limit` held scribes whose time has come to be judged and stored like any
    /// other (see [`held`]); returns how many were taken out of the held set.
    pub async fn release_due(&self, limit: usize) -> Result<usize, AppendError> {
        let until = held::due_until(self.shared.clock.wall_ms());
        let due = self.shared.store.held_due(until, limit)?;
        let count = due.len();
        for (key, value) in due {
            let (origin, drafts, peer_seqs) = match held::decode(&value) {
                Some((origin, parts)) => {
                    let seq = match origin {
                        Origin::Peer(peer) => peer.seq,
                        Origin::Local => 0,
                    };
                    let draft = Draft::Signed {
                        parts,
                        claimed_id: Some(key.id),
                    };
                    (origin, vec![draft], vec![seq])
                }
                None => {
                    tracing::error!(id = %key.id, "a held scribe's record is damaged; dropping it");
                    (Origin::Local, Vec::new(), Vec::new())
                }
            };
            let (reply, answer) = oneshot::channel();
            self.submit(Job {
                drafts,
                origin,
                peer_seqs,
                release: Some(key),
                keep_refused: false,
                cursor: None,
                expect_stream: None,
                reply: Reply::Each(reply),
            })
            .await?;
            let outcomes = answer.await.map_err(|_| AppendError::ShuttingDown)??;
            for outcome in outcomes {
                match outcome {
                    Ok(appended) if appended.held => {}
                    Ok(appended) => {
                        tracing::info!(id = %key.id, seq = appended.seq, "a scribe dated ahead entered the log: its time has come");
                    }
                    Err(error) => {
                        tracing::warn!(id = %key.id, %error, "a scribe dated ahead was refused when its time came");
                    }
                }
            }
        }
        Ok(count)
    }

    /// Replication cursors on `peer`.
    pub fn cursors(&self, peer: &AuthorKey) -> Result<Vec<(StreamId, store::Cursor)>, StoreError> {
        self.shared.store.cursors(peer)
    }

    /// A receiver that changes whenever the set of streams held changes (create, join or leave)
    /// or a stream's membership does.
    pub fn watch_streams(&self) -> watch::Receiver<usize> {
        self.shared.streams_tx.subscribe()
    }

    /// Ids of the streams held that `key` may receive (see [`StreamState::may_read`]), and the seq each one's genesis is stored at (everything else of it is above that seq).
    pub fn stream_ids_for(&self, key: &AuthorKey) -> Vec<(StreamId, u64)> {
        self.shared
            .streams
            .read()
            .expect("streams lock")
            .values()
            .filter(|state| state.may_read(key))
            .map(|state| (state.id, state.record.genesis_seq))
            .collect()
    }

    /// Ids of the streams held.
    pub fn stream_ids(&self) -> Vec<StreamId> {
        self.shared
            .streams
            .read()
            .expect("streams lock")
            .keys()
            .copied()
            .collect()
    }

    /// Which new streams this log takes (`--accept-streams`).
    pub fn accept_streams(&self) -> AcceptStreams {
        self.shared.accept_streams
    }

    /// Whether `key` is known to this node: its own key, or one allowed with `quire peer allow`.
    pub fn knows(&self, key: &AuthorKey) -> Result<bool, StoreError> {
        self.shared.knows(key)
    }

    /// The store (for replication's storage reads and peer bookkeeping).
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// The node's signing key (the replication handshake proves it).
    pub(crate) fn signing_key(&self) -> SigningKey {
        self.shared.key.clone()
    }

    /// Appends a single draft from a local client.
    pub async fn append_one(&self, draft: Draft) -> Result<Appended, AppendError> {
        let mut appended = self.append(vec![draft], Origin::Local).await?;
        Ok(appended.remove(0))
    }

    /// The newest committed local seq.
    pub fn head(&self) -> u64 {
        self.shared.head.load(Ordering::Acquire)
    }

    /// A receiver that sees every new head.
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.shared.head_tx.subscribe()
    }

    /// A receiver that sees every new head seq of `stream` (never above the published head), and
    /// wakes for nothing else: what a per-stream projection waits on, so an append wakes only the
    /// slots of its own stream. `None` if the stream is not held; it closes when the stream is
    /// left.
    pub fn watch_stream_head(&self, stream: &StreamId) -> Option<watch::Receiver<u64>> {
        let mut heads = self
            .shared
            .stream_heads
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let head_seq = self.stream(stream)?.record.head_seq.min(self.head());
        Some(
            heads
                .entry(*stream)
                .or_insert_with(|| watch::Sender::new(head_seq))
                .subscribe(),
        )
    }

    /// Wakes whoever watches `stream`'s head ([`Log::watch_stream_head`]) without a new head.
    pub(crate) fn poke_stream_head(&self, stream: &StreamId) {
        let heads = self
            .shared
            .stream_heads
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(head) = heads.get(stream) {
            head.send_modify(|_| {});
        }
    }

    /// This node's key.
    pub fn node_key(&self) -> AuthorKey {
        identity::author_key(&self.shared.key)
    }

    /// The log's current epoch: a random id, new every time the node starts (see `log::epoch`).
    pub fn epoch(&self) -> [u8; 16] {
        self.shared.epochs.current
    }

    /// The current epoch and the earlier ones remembered, with the heads they ended at.
    pub fn epochs(&self) -> &Epochs {
        &self.shared.epochs
    }

    /// The node's clock.
    pub fn clock(&self) -> &Clock {
        &self.shared.clock
    }

    /// A stored scribe by id.
    pub fn get(&self, id: &ScribeId) -> Result<Option<StoredEntry>, StoreError> {
        match self.shared.store.get(id)? {
            Some(entry) if entry.seq <= self.head() => Ok(Some(entry)),
            _ => Ok(None),
        }
    }

    /// Scribes from `from` (inclusive) up to the head, at most `limit` and as many as fit in
    /// [`store::READ_BYTES`] (at least one); `stream` `None` is the whole log.
    pub fn read(
        &self,
        stream: Option<&StreamId>,
        from: u64,
        limit: usize,
    ) -> Result<store::Chunk, StoreError> {
        read_range(
            &self.shared.store,
            stream,
            from.max(1),
            self.head(),
            limit,
            store::READ_BYTES,
        )
    }

    /// The streams this node holds, by id.
    pub fn streams(&self) -> Vec<StreamState> {
        let mut streams: Vec<_> = self
            .shared
            .streams
            .read()
            .expect("streams lock")
            .values()
            .cloned()
            .collect();
        streams.sort_by_key(|stream| stream.record.genesis_seq);
        streams
    }

    /// One stream, if held.
    pub fn stream(&self, id: &StreamId) -> Option<StreamState> {
        self.shared
            .streams
            .read()
            .expect("streams lock")
            .get(id)
            .cloned()
    }

    /// Whether the client API serves `stream` to `owner_or_app` (the node's owner, or the
    /// stream's own app) only: it is private. `None` if the stream is not held.
    pub fn is_private(&self, stream: &StreamId) -> Option<bool> {
        self.shared
            .streams
            .read()
            .expect("streams lock")
            .get(stream)
            .map(|state| state.policy.private)
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// A receiver that turns `true` when the log starts closing (background tasks end then).
    pub fn watch_closing(&self) -> watch::Receiver<bool> {
        self.shared.closing.subscribe()
    }

    /// Ends every subscription (their streams finish) without closing the log.
    pub fn signal_closing(&self) {
        let _ = self.shared.closing.send(true);
    }

    /// Stops accepting appends, finishes those under way, ends subscriptions and closes the store.
    /// Returns once the store is closed (the data directory can be reopened).
    pub async fn close(self) {
        let _ = self.shared.closing.send(true);
        let Log {
            shared,
            submit,
            threads,
            closed,
        } = self;
        submit.write().expect("submit lock").take();
        let handles: Vec<_> = std::mem::take(&mut *threads.lock().expect("threads lock"));
        let _ = tokio::task::spawn_blocking(move || {
            for handle in handles {
                let _ = handle.join();
            }
        })
        .await;
        // Subscription and projection tasks hold the store until they notice `closing`; wait
        // until the last one has let go and the store is closed.
        drop(shared);
        let Some(closed) = closed.lock().expect("closed lock").take() else {
            return;
        };
        if tokio::time::timeout(std::time::Duration::from_secs(30), closed)
            .await
            .is_err()
        {
            tracing::warn!("log still in use 30 s after close; the store stays open until its last user lets go");
        }
    }
}

/// `stream`'s membership as stored (its genesis members and its indexed membership scribes), and
/// its retention rule in force (the genesis's, or its newest indexed `retain` scribe's).
fn load_membership(
    store: &Store,
    stream: &StreamId,
    genesis: &crate::genesis::Genesis,
) -> Result<(Membership, retention::InForce), StoreError> {
    let mut membership = Membership::new(genesis.owner, genesis.members.clone());
    let mut in_force = retention::InForce::genesis(genesis.retention);
    for id in store.membership_ids(stream)? {
        let damaged =
            |error: String| StoreError::Damaged(format!("membership scribe {id}: {error}"));
        let entry = store
            .get(&id)?
            .ok_or_else(|| damaged("indexed, not stored".into()))?;
        let scribe = Scribe::decode_unverified(entry.parts, None)
            .map_err(|error| damaged(error.to_string()))?;
        if scribe.body.kind == Kind::Retain {
            let rule =
                retention::retain_rule(&scribe).map_err(|error| damaged(error.to_string()))?;
            in_force.replace_if_newer(&scribe, rule);
            continue;
        }
        let op = rules::membership_op(&scribe, &membership)
            .map_err(|error| damaged(error.to_string()))?;
        membership
            .add(op)
            .map_err(|error| damaged(error.to_string()))?;
    }
    Ok((membership, in_force))
}

/// What projections leave out: a scribe its stream's membership excludes (its author was revoked
/// by a revoke it had not seen and is dated before it: `crate::membership`, strong remove).
/// Judged by the membership as it stands now, so a projection built after the newest revoke is
/// exact; a live copy that meets a revoke is rebuilt (`projection::slot`).
#[derive(Clone)]
pub enum Exclusions {
    /// The running log's memberships.
    Log(Log),
    /// Memberships loaded from a stopped node's store (offline rebuilds and replays).
    Loaded(Arc<HashMap<StreamId, Arc<Membership>>>),
}

impl std::fmt::Debug for Exclusions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Exclusions")
    }
}

impl Exclusions {
    /// The memberships of every stream `store` holds.
    pub fn load(store: &Store) -> Result<Exclusions, StoreError> {
        let mut memberships = HashMap::new();
        for (stream, _) in store.streams()? {
            let Some(genesis) = store.get(&stream)? else {
                continue;
            };
            let scribe = Scribe::decode_unverified(genesis.parts, None)
                .map_err(|error| StoreError::Damaged(format!("genesis of {stream}: {error}")))?;
            let genesis = genesis_from_payload(&scribe.body.payload, scribe.body.author)
                .map_err(|error| StoreError::Damaged(format!("genesis of {stream}: {error}")))?;
            memberships.insert(
                stream,
                Arc::new(load_membership(store, &stream, &genesis)?.0),
            );
        }
        Ok(Exclusions::Loaded(Arc::new(memberships)))
    }

    /// Whether a stored scribe of `stream` by `author`, dated `hlc`, that had seen the
    /// membership scribe `view`, is excluded.
    pub fn excludes(
        &self,
        stream: &StreamId,
        author: &AuthorKey,
        hlc: u64,
        view: Option<ScribeId>,
    ) -> bool {
        let membership = match self {
            Exclusions::Log(log) => log
                .shared
                .streams
                .read()
                .expect("streams lock")
                .get(stream)
                .map(|state| state.membership.clone()),
            Exclusions::Loaded(memberships) => memberships.get(stream).cloned(),
        };
        let Some(membership) = membership else {
            return false;
        };
        let links: Vec<ScribeId> = view.into_iter().collect();
        membership.excludes(author, hlc, &links).unwrap_or(false)
    }
}

/// Where a data directory keeps its RocksDB store.
pub fn store_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("db")
}

/// Scribes of `stream` (`None`: the whole log) with `from <= seq <= to`: at most `limit`, and as
/// many as fit in `max_bytes` (at least one).
pub(crate) fn read_range(
    store: &Store,
    stream: Option<&StreamId>,
    from: u64,
    to: u64,
    limit: usize,
    max_bytes: usize,
) -> Result<store::Chunk, StoreError> {
    match stream {
        Some(stream) => store.read_stream(stream, from, to, limit, max_bytes),
        None => store.read_log(from, to, limit, max_bytes),
    }
}
