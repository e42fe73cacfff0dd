//! The local log: validation, group commit, gapless local seqs, reads and subscriptions.
//!
//! # How an append flows
//! 1. A caller hands [`Log::append`] a *job*: one or more [`Draft`]s, committed all together or not
//!    at all.
//! 2. The **signer** thread drains every job waiting, gives each node-signed draft the next value of
//!    the node's hybrid logical clock (in arrival order), then signs those drafts and decodes and
//!    verifies client-signed ones *in parallel on every core* (rayon). Signing is the expensive part
//!    of an append, so it never runs on the commit path.
//! 3. The **committer** thread takes prepared groups in order, checks each scribe against what is
//!    stored (duplicate? stream known? author allowed by the stream's policy? within the limits?
//!    parents stored?), assigns the next local seqs and writes the whole group in one RocksDB write
//!    batch (group commit; one fsync with `--sync`). Only then does it publish the new head and
//!    answer the callers.
//!
//! Two threads in a pipeline means group N+1 is being signed while group N is being written, and
//! node-signed scribes commit in the order of their clocks (a scribe is never stored before one its
//! author wrote earlier).
//!
//! **Architecture invariant:** only the committer thread writes to the store, and it publishes a new
//! head only after the write batch holding every seq up to it has been written. Readers bound every
//! read by the published head, so they only ever see a committed, gapless prefix (invariant 4).
//!
//! Subscriptions live in [`subscribe`]; storage layouts in [`store`].

pub mod store;
pub mod subscribe;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use quire_projection_api::{AuthorKey, Kind, Policy, ScribeId, StreamId};
use rayon::prelude::*;
use tokio::sync::{mpsc, oneshot, watch};

use crate::convert;
use crate::hlc::{Clock, WallClock};
use crate::identity;
use crate::scribe::{leading_zero_bits, Body, Scribe, ScribeError};
use store::{
    Commit, CursorUpdate, NewEntry, PeerOrigin, Store, StoreError, StoredEntry, StreamRecord,
};

/// Most drafts the signer gathers into one group.
const MAX_GROUP_DRAFTS: usize = 8192;
/// Jobs waiting to be signed before `append` callers wait for room.
const SUBMIT_QUEUE: usize = 1024;

/// Why an append was refused. Nothing of a refused job is stored.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The bytes are not a valid scribe (malformed, bad signature, bad hash, not canonical).
    #[error(transparent)]
    Scribe(#[from] ScribeError),
    /// The scribe's stream is not held by this node.
    #[error("stream {0} is not held by this node; create it, or join it from a peer that has it")]
    UnknownStream(StreamId),
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
    #[error("stream {stream} asks record.add scribes for a work token: sha256(body) must start with {bits} zero bits (it has {has}); choose a nonce that gives it, or let the node sign")]
    MissingWork {
        /// Bits asked for.
        bits: u32,
        /// Bits the scribe has.
        has: u32,
        /// The stream.
        stream: StreamId,
    },
    /// A built-in kind's payload breaks its rules (a file path, the `_schema`).
    #[error("{kind} scribe refused: {reason}")]
    BadPayload {
        /// The scribe's kind.
        kind: Kind,
        /// What is wrong, in words that say what to fix.
        reason: String,
    },
    /// A genesis scribe's payload is not a valid `StreamGenesis`.
    #[error("bad stream genesis: {0}")]
    BadGenesis(String),
    /// One draft of a multi-draft job was refused; the whole job was.
    #[error("item {index} of the batch (counting `appends` first, then `signed`): {source} (nothing of the batch was stored)")]
    InBatch {
        /// Position of the refused draft in the job.
        index: usize,
        /// Why.
        source: Box<AppendError>,
    },
    /// The store failed to write.
    #[error("storage failure, nothing stored: {0}")]
    Storage(String),
    /// The node is shutting down.
    #[error("the node is shutting down; retry on a running node")]
    ShuttingDown,
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
}

/// One thing to append.
#[derive(Debug, Clone)]
pub enum Draft {
    /// A new scribe the node signs with its own key.
    New(NewScribe),
    /// A scribe a client signed; stored exactly as given.
    Signed {
        /// The encoded scribe.
        bytes: Bytes,
        /// The id the client claims, checked against the bytes if given.
        claimed_id: Option<ScribeId>,
    },
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
}

/// Options for opening a log.
#[derive(Clone)]
pub struct LogOptions {
    /// fsync every group commit.
    pub sync: bool,
    /// The wall clock (injectable for tests).
    pub wall: WallClock,
}

impl std::fmt::Debug for LogOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogOptions")
            .field("sync", &self.sync)
            .finish()
    }
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            sync: false,
            wall: crate::hlc::system_wall_clock(),
        }
    }
}

struct Job {
    drafts: Vec<Draft>,
    origin: Origin,
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

struct PreparedJob {
    /// Each scribe, and whether the node signed it just now (so it cannot be stored already).
    scribes: Vec<(Result<Scribe, AppendError>, bool)>,
    origin: Origin,
    cursor: Option<CursorUpdate>,
    expect_stream: Option<StreamId>,
    reply: Reply,
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
    epoch: [u8; 16],
    /// Fires when this value is dropped: declared last, so after `store` is closed.
    _closed: ClosedSignal,
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
        std::fs::create_dir_all(data_dir).map_err(|source| OpenError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let key = identity::load_or_create(&data_dir.join(identity::KEY_FILE))?;
        let store = Store::open(&store_path(data_dir), options.sync)?;
        let head = store.head()?;
        let clock = Clock::new(store.hlc_high_water()?, options.wall.clone());
        let epoch = store.epoch()?;
        let mut streams = HashMap::new();
        for (stream, record) in store.streams()? {
            let genesis = store.get(&stream)?.ok_or_else(|| {
                StoreError::Damaged(format!("stream {stream} has no genesis scribe"))
            })?;
            let (scribe, _) = Scribe::decode_unverified(genesis.bytes)
                .map_err(|error| StoreError::Damaged(format!("genesis of {stream}: {error}")))?;
            let genesis = convert::genesis_from_payload(&scribe.body.payload, scribe.body.author)
                .map_err(|error| {
                StoreError::Damaged(format!("genesis of {stream}: {error}"))
            })?;
            streams.insert(
                stream,
                StreamState {
                    id: stream,
                    name: genesis.name,
                    owner: genesis.owner,
                    policy: genesis.policy,
                    record,
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
            epoch,
            _closed: ClosedSignal(Some(closed_tx)),
        });
        let (submit, submit_rx) = mpsc::channel(SUBMIT_QUEUE);
        let (prepared_tx, prepared_rx) = std::sync::mpsc::sync_channel(2);
        let signer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("quire-signer".into())
                .spawn(move || signer_loop(&shared, submit_rx, prepared_tx))
                .expect("spawn signer thread")
        };
        let committer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("quire-committer".into())
                .spawn(move || committer_loop(&shared, prepared_rx))
                .expect("spawn committer thread")
        };
        Ok(Log {
            shared,
            submit: Arc::new(RwLock::new(Some(submit))),
            threads: Arc::new(std::sync::Mutex::new(vec![signer, committer])),
            closed: Arc::new(std::sync::Mutex::new(Some(closed_rx))),
        })
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
        let (reply, answer) = oneshot::channel();
        let reply = Reply::Atomic(reply);
        let submit = self
            .submit
            .read()
            .expect("submit lock")
            .clone()
            .ok_or(AppendError::ShuttingDown)?;
        submit
            .send(Job {
                drafts,
                origin,
                cursor: None,
                expect_stream: None,
                reply,
            })
            .await
            .map_err(|_| AppendError::ShuttingDown)?;
        answer.await.map_err(|_| AppendError::ShuttingDown)?
    }

    /// Stores a batch of scribes received from `peer`: each is validated exactly like an append and
    /// stored or refused on its own; `cursor` (if any) is written in the same write batch as the
    /// scribes it covers (invariant 6), even when every scribe was a duplicate or refused.
    pub async fn replicate(
        &self,
        peer: PeerOrigin,
        stream: StreamId,
        scribes: Vec<(Bytes, Option<ScribeId>)>,
        cursor: Option<CursorUpdate>,
    ) -> Result<EachOutcome, AppendError> {
        if scribes.is_empty() && cursor.is_none() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        let submit = self
            .submit
            .read()
            .expect("submit lock")
            .clone()
            .ok_or(AppendError::ShuttingDown)?;
        let drafts = scribes
            .into_iter()
            .map(|(bytes, claimed_id)| Draft::Signed { bytes, claimed_id })
            .collect();
        submit
            .send(Job {
                drafts,
                origin: Origin::Peer(peer),
                cursor,
                expect_stream: Some(stream),
                reply: Reply::Each(reply),
            })
            .await
            .map_err(|_| AppendError::ShuttingDown)?;
        answer.await.map_err(|_| AppendError::ShuttingDown)?
    }

    /// Replication cursors on `peer`.
    pub fn cursors(&self, peer: &AuthorKey) -> Result<Vec<(StreamId, store::Cursor)>, StoreError> {
        self.shared.store.cursors(peer)
    }

    /// A receiver that changes whenever the set of streams held changes (create or join).
    pub fn watch_streams(&self) -> watch::Receiver<usize> {
        self.shared.streams_tx.subscribe()
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

    /// This node's key.
    pub fn node_key(&self) -> AuthorKey {
        identity::author_key(&self.shared.key)
    }

    /// The random id of this data directory.
    pub fn epoch(&self) -> [u8; 16] {
        self.shared.epoch
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

    /// Scribes from `from` (inclusive) up to the head, at most `limit`; `stream` `None` is the
    /// whole log.
    pub fn read(
        &self,
        stream: Option<&StreamId>,
        from: u64,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        read_range(&self.shared.store, stream, from.max(1), self.head(), limit)
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

/// Where a data directory keeps its RocksDB store.
pub fn store_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("db")
}

pub(crate) fn read_range(
    store: &Store,
    stream: Option<&StreamId>,
    from: u64,
    to: u64,
    limit: usize,
) -> Result<Vec<StoredEntry>, StoreError> {
    match stream {
        Some(stream) => store.read_stream(stream, from, to, limit),
        None => store.read_log(from, to, limit),
    }
}

fn signer_loop(
    shared: &Shared,
    mut submit: mpsc::Receiver<Job>,
    prepared: std::sync::mpsc::SyncSender<Vec<PreparedJob>>,
) {
    while let Some(first) = submit.blocking_recv() {
        let mut drafts_in_group = first.drafts.len();
        let mut jobs = vec![first];
        while drafts_in_group < MAX_GROUP_DRAFTS {
            match submit.try_recv() {
                Ok(job) => {
                    drafts_in_group += job.drafts.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        // Clocks are handed out here, in arrival order, one thread: the committer commits groups
        // in the same order, so node-signed scribes are stored in the order of their clocks.
        let author = identity::author_key(&shared.key);
        let mut work: Vec<(usize, usize, Prepared)> = Vec::with_capacity(drafts_in_group);
        for (job_index, job) in jobs.iter_mut().enumerate() {
            for (draft_index, draft) in std::mem::take(&mut job.drafts).into_iter().enumerate() {
                let prepared = match draft {
                    Draft::New(new) => {
                        let work_bits = match (&new.kind, new.stream) {
                            (Kind::RecordAdd, Some(stream)) => shared
                                .streams
                                .read()
                                .expect("streams lock")
                                .get(&stream)
                                .map_or(0, |state| state.policy.work_bits),
                            _ => 0,
                        };
                        let body = Body {
                            stream: new.stream,
                            author,
                            hlc: shared.clock.now(),
                            kind: new.kind,
                            content_type: new.content_type,
                            payload: new.payload,
                            parents: new.parents,
                            nonce: 0,
                        };
                        Prepared::Sign(body, work_bits)
                    }
                    Draft::Signed { bytes, claimed_id } => Prepared::Verify(bytes, claimed_id),
                };
                work.push((job_index, draft_index, prepared));
            }
        }
        let results: Vec<(usize, Result<Scribe, AppendError>, bool)> = work
            .into_par_iter()
            .map(|(job_index, _draft_index, prepared)| {
                let fresh = matches!(prepared, Prepared::Sign(..));
                let result = match prepared {
                    Prepared::Sign(body, work_bits) => {
                        Ok(Scribe::sign_with_work(body, &shared.key, work_bits))
                    }
                    Prepared::Verify(bytes, Some(claimed)) => {
                        Scribe::decode_claimed(bytes, claimed).map_err(AppendError::from)
                    }
                    Prepared::Verify(bytes, None) => {
                        Scribe::decode(bytes).map_err(AppendError::from)
                    }
                };
                (job_index, result, fresh)
            })
            .collect();
        let mut per_job: Vec<Vec<(Result<Scribe, AppendError>, bool)>> = jobs
            .iter()
            .map(|job| Vec::with_capacity(job.drafts.len()))
            .collect();
        for (job_index, result, fresh) in results {
            per_job[job_index].push((result, fresh));
        }
        let group: Vec<PreparedJob> = jobs
            .into_iter()
            .zip(per_job)
            .map(|(job, scribes)| PreparedJob {
                scribes,
                origin: job.origin,
                cursor: job.cursor,
                expect_stream: job.expect_stream,
                reply: job.reply,
            })
            .collect();
        if prepared.send(group).is_err() {
            return;
        }
    }
}

enum Prepared {
    Sign(Body, u32),
    Verify(Bytes, Option<ScribeId>),
}

fn committer_loop(shared: &Shared, prepared: std::sync::mpsc::Receiver<Vec<PreparedJob>>) {
    while let Ok(mut group) = prepared.recv() {
        while let Ok(more) = prepared.try_recv() {
            group.extend(more);
        }
        commit_group(shared, group);
    }
}

/// What a group has added so far, on top of the store.
#[derive(Default)]
struct Overlay {
    ids: HashMap<ScribeId, (u64, StreamId, u64)>,
    streams: HashMap<StreamId, StreamState>,
    entries: Vec<NewEntry>,
    cursors: HashMap<(AuthorKey, StreamId), CursorUpdate>,
    new_streams: usize,
}

impl Overlay {
    fn absorb(&mut self, job: Overlay) {
        self.ids.extend(job.ids);
        self.streams.extend(job.streams);
        self.entries.extend(job.entries);
        self.new_streams += job.new_streams;
        for (key, cursor) in job.cursors {
            self.add_cursor_at(key, cursor);
        }
    }

    fn add_cursor_at(&mut self, key: (AuthorKey, StreamId), cursor: CursorUpdate) {
        match self.cursors.get(&key) {
            // Never move a cursor backwards within an epoch (a late duplicate batch).
            Some(existing) if existing.epoch == cursor.epoch && existing.seq >= cursor.seq => {}
            _ => {
                self.cursors.insert(key, cursor);
            }
        }
    }
}

enum Outcome {
    Atomic(
        oneshot::Sender<Result<Vec<Appended>, AppendError>>,
        Result<Vec<Appended>, AppendError>,
    ),
    Each(
        oneshot::Sender<Result<EachOutcome, AppendError>>,
        EachOutcome,
    ),
}

fn commit_group(shared: &Shared, group: Vec<PreparedJob>) {
    let head = shared.head.load(Ordering::Acquire);
    let mut overlay = Overlay::default();
    // (outcome, whether the job wrote anything)
    let mut outcomes: Vec<(Outcome, bool)> = Vec::with_capacity(group.len());
    for job in group {
        let multi = job.scribes.len() > 1;
        let next_seq = head + overlay.entries.len() as u64 + 1;
        let mut job_overlay = Overlay::default();
        let rules = JobRules {
            origin: job.origin,
            expect_stream: job.expect_stream,
        };
        match job.reply {
            Reply::Atomic(reply) => {
                let mut results = Vec::with_capacity(job.scribes.len());
                let mut failure = None;
                for (index, (scribe, fresh)) in job.scribes.into_iter().enumerate() {
                    let seq = next_seq + job_overlay.entries.len() as u64;
                    let admitted = scribe.and_then(|scribe| {
                        admit(
                            shared,
                            &overlay,
                            &mut job_overlay,
                            scribe,
                            seq,
                            &rules,
                            fresh,
                        )
                    });
                    match admitted {
                        Ok(appended) => results.push(appended),
                        Err(error) => {
                            failure = Some(if multi {
                                AppendError::InBatch {
                                    index,
                                    source: Box::new(error),
                                }
                            } else {
                                error
                            });
                            break;
                        }
                    }
                }
                match failure {
                    Some(error) => outcomes.push((Outcome::Atomic(reply, Err(error)), false)),
                    None => {
                        let wrote = !job_overlay.entries.is_empty();
                        overlay.absorb(job_overlay);
                        outcomes.push((Outcome::Atomic(reply, Ok(results)), wrote));
                    }
                }
            }
            Reply::Each(reply) => {
                let mut results = Vec::with_capacity(job.scribes.len());
                for (scribe, fresh) in job.scribes {
                    let seq = next_seq + job_overlay.entries.len() as u64;
                    results.push(scribe.and_then(|scribe| {
                        admit(
                            shared,
                            &overlay,
                            &mut job_overlay,
                            scribe,
                            seq,
                            &rules,
                            fresh,
                        )
                    }));
                }
                if let Some(cursor) = job.cursor {
                    job_overlay.add_cursor_at((cursor.peer, cursor.stream), cursor);
                }
                let wrote = !job_overlay.entries.is_empty() || !job_overlay.cursors.is_empty();
                overlay.absorb(job_overlay);
                outcomes.push((Outcome::Each(reply, results), wrote));
            }
        }
    }
    if !overlay.entries.is_empty() || !overlay.cursors.is_empty() {
        let new_head = head + overlay.entries.len() as u64;
        let commit = Commit {
            streams: overlay
                .streams
                .iter()
                .map(|(id, state)| (*id, state.record))
                .collect(),
            scribes: std::mem::take(&mut overlay.entries),
            head: new_head,
            hlc: shared.clock.peek(),
            cursors: overlay.cursors.values().copied().collect(),
        };
        if let Err(error) = shared.store.commit(&commit) {
            tracing::error!(%error, "group commit failed; nothing of it was stored");
            let failed = || AppendError::Storage(error.to_string());
            // Every job that would have succeeded fails: even a "duplicate" answer may point at a
            // seq of this group, which was never written.
            for (outcome, _) in outcomes {
                match outcome {
                    Outcome::Atomic(reply, Ok(_)) => drop(reply.send(Err(failed()))),
                    Outcome::Atomic(reply, Err(error)) => drop(reply.send(Err(error))),
                    Outcome::Each(reply, _) => drop(reply.send(Err(failed()))),
                }
            }
            return;
        }
        {
            let mut streams = shared.streams.write().expect("streams lock");
            streams.extend(overlay.streams);
            if overlay.new_streams > 0 {
                shared.streams_tx.send_replace(streams.len());
            }
        }
        shared.head.store(new_head, Ordering::Release);
        shared.head_tx.send_replace(new_head);
    }
    for (outcome, _) in outcomes {
        match outcome {
            Outcome::Atomic(reply, result) => drop(reply.send(result)),
            Outcome::Each(reply, results) => drop(reply.send(Ok(results))),
        }
    }
}

/// Checks one scribe against the store, the group and the job so far; records it in `job` if new.
/// What a job asks of each of its scribes beyond validity.
struct JobRules {
    origin: Origin,
    /// Replicated batches: the stream every scribe must belong to.
    expect_stream: Option<StreamId>,
}

fn admit(
    shared: &Shared,
    group: &Overlay,
    job: &mut Overlay,
    scribe: Scribe,
    seq: u64,
    rules: &JobRules,
    fresh: bool,
) -> Result<Appended, AppendError> {
    let origin = rules.origin;
    if let Some(expected) = rules.expect_stream {
        if scribe.stream_id() != expected {
            return Err(AppendError::WrongStream {
                expected,
                actual: scribe.stream_id(),
            });
        }
    }
    let hlc = scribe.body.hlc;
    // Idempotence: a scribe already stored (or earlier in this group) changes nothing. A scribe
    // the node has just signed cannot be stored already (its clock value is new), so the lookups
    // are skipped for it: one RocksDB read less per node-signed append.
    if !fresh {
        let earlier = job
            .ids
            .get(&scribe.id)
            .or_else(|| group.ids.get(&scribe.id));
        if let Some((seq, _, hlc)) = earlier {
            return Ok(Appended {
                id: scribe.id,
                seq: *seq,
                duplicate: true,
                hlc: *hlc,
            });
        }
        let stored = shared
            .store
            .seq_of(&scribe.id)
            .map_err(|error| AppendError::Storage(error.to_string()))?;
        if let Some(seq) = stored {
            return Ok(Appended {
                id: scribe.id,
                seq,
                duplicate: true,
                hlc,
            });
        }
    }
    let size = scribe.bytes.len() as u64;
    let stream_id = scribe.stream_id();
    let state = if scribe.body.kind == Kind::StreamCreate {
        let genesis = convert::genesis_from_payload(&scribe.body.payload, scribe.body.author)
            .map_err(|error| AppendError::BadGenesis(error.to_string()))?;
        StreamState {
            id: stream_id,
            name: genesis.name,
            owner: genesis.owner,
            policy: genesis.policy,
            record: StreamRecord {
                genesis_seq: seq,
                head_seq: seq,
                scribes: 1,
                bytes: size,
            },
        }
    } else {
        let mut state = job
            .streams
            .get(&stream_id)
            .or_else(|| group.streams.get(&stream_id))
            .cloned()
            .or_else(|| {
                shared
                    .streams
                    .read()
                    .expect("streams lock")
                    .get(&stream_id)
                    .cloned()
            })
            .ok_or(AppendError::UnknownStream(stream_id))?;
        let allowed = state.policy.authors_for(&scribe.body.kind);
        if !allowed.contains(&scribe.body.author, &state.owner) {
            return Err(AppendError::PermissionDenied {
                author: scribe.body.author,
                kind: scribe.body.kind.clone(),
                stream: stream_id,
                allowed: allowed.to_string(),
            });
        }
        let payload = scribe.body.payload.len() as u64;
        if payload > state.policy.max_file_bytes {
            return Err(AppendError::PayloadTooLarge {
                size: payload,
                limit: state.policy.max_file_bytes,
                stream: stream_id,
            });
        }
        if origin == Origin::Local && state.record.bytes + size > state.policy.max_stream_bytes {
            return Err(AppendError::StreamFull {
                held: state.record.bytes,
                size,
                limit: state.policy.max_stream_bytes,
                stream: stream_id,
            });
        }
        check_payload(&scribe.body).map_err(|reason| AppendError::BadPayload {
            kind: scribe.body.kind.clone(),
            reason,
        })?;
        if scribe.body.kind == Kind::RecordAdd && state.policy.work_bits > 0 {
            let has = leading_zero_bits(&scribe.body_hash);
            if has < state.policy.work_bits {
                return Err(AppendError::MissingWork {
                    bits: state.policy.work_bits,
                    has,
                    stream: stream_id,
                });
            }
        }
        for parent in &scribe.body.parents {
            let parent_stream = match job.ids.get(parent).or_else(|| group.ids.get(parent)) {
                Some((_, parent_stream, _)) => Some(*parent_stream),
                None => stored_stream_of(shared, parent)?,
            };
            match parent_stream {
                Some(parent_stream) if parent_stream == stream_id => {}
                Some(parent_stream) => {
                    return Err(AppendError::ParentInOtherStream {
                        parent: *parent,
                        parent_stream,
                        stream: stream_id,
                    })
                }
                None => {
                    return Err(AppendError::UnknownParent {
                        parent: *parent,
                        stream: stream_id,
                    })
                }
            }
        }
        state.record.head_seq = seq;
        state.record.scribes += 1;
        state.record.bytes += size;
        state
    };
    shared.clock.observe(hlc);
    job.ids.insert(scribe.id, (seq, stream_id, hlc));
    job.streams.insert(stream_id, state);
    if scribe.body.kind == Kind::StreamCreate {
        job.new_streams += 1;
    }
    job.entries.push(NewEntry {
        seq,
        id: scribe.id,
        stream: stream_id,
        bytes: scribe.bytes,
        origin: match origin {
            Origin::Peer(peer) => Some(peer),
            Origin::Local => None,
        },
    });
    Ok(Appended {
        id: scribe.id,
        seq,
        duplicate: false,
        hlc,
    })
}

fn stored_stream_of(shared: &Shared, id: &ScribeId) -> Result<Option<StreamId>, AppendError> {
    let Some(entry) = shared
        .store
        .get(id)
        .map_err(|error| AppendError::Storage(error.to_string()))?
    else {
        return Ok(None);
    };
    let (scribe, _) = Scribe::decode_unverified(entry.bytes)
        .map_err(|error| AppendError::Storage(error.to_string()))?;
    Ok(Some(scribe.stream_id()))
}

/// The rules of built-in kinds every node checks, for local appends and scribes from peers
/// alike: a file scribe's payload decodes and its path is valid; a `_schema` is JSON content that
/// the SQLite projection accepts; an upvote names one record.
pub fn check_payload(body: &crate::scribe::Body) -> Result<(), String> {
    use quire_projection_api::files::{FileChange, SCHEMA_PATH};
    if body.kind == Kind::RecordUpvote && body.parents.len() != 1 {
        return Err(format!(
            "a record.upvote names the record it upvotes as its one parent; this one has {}",
            body.parents.len()
        ));
    }
    if let Some(FileChange::Put {
        path,
        content_type,
        data,
    }) = FileChange::decode(&body.kind, &body.payload)?
    {
        if path == SCHEMA_PATH {
            if content_type.split(';').next().map(str::trim) != Some("application/json") {
                return Err(format!(
                    "{SCHEMA_PATH} must have content type application/json, not {content_type:?}"
                ));
            }
            quire_projection_sql::Schema::parse(&data)?;
        }
    }
    Ok(())
}
