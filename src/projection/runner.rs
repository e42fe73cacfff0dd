//! The runner: [`Projections`], the running set of a node's projections. One task per slot
//! (a plugin in one scope: the whole log, or one stream) catches up from its checkpoint in
//! batches, then follows the head; a failing slot retries with backoff, a panicking one is
//! reopened from its files. The admin operations (status, rebuild, digest, quarantine decisions,
//! durable consumers' starts and acks) are methods here. What a slot does with a batch is
//! `slot.rs`; the commands that work on a stopped node's store are `offline.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quire_projection_api::{Plugin, Scope, ScribeId, StreamId};
use tokio::sync::Notify;

use super::budget::OpenCopies;
use super::consumers::{self, Consumer};
use super::quarantine::Parked;
use super::readers::ReadTurns;
use super::registry::Registry;
use super::slot::{lock, slot_target, Slot, SlotError, Worked, PROJECTIONS_DIR};
use crate::fds::FdBudget;
use crate::log::store::{Store, StoreError};
use crate::log::Log;

/// What the runner ([`Projections`]) can fail with: starting, and its admin operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerError {
    /// No projector or consumer has this name.
    #[error("no projection named {name:?}; this node has: {known}")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The names it has.
        known: String,
    },
    /// No durable consumer has this name.
    #[error("no durable consumer named {0:?}: subscribe with that consumer name first")]
    UnknownConsumer(String),
    /// The scope asked for does not fit: a per-stream projector needs a stream, a whole-log one
    /// takes none, or the stream is not held.
    #[error("{0}")]
    Stream(String),
    /// The projection exists but has no copy to answer from.
    #[error("{0}")]
    NotReady(String),
    /// A consumer request is wrong (bad name, ack beyond the head, other stream).
    #[error("{0}")]
    Consumer(String),
    /// One slot (one plugin in one scope) or the quarantine failed: the projector itself, a
    /// parked scribe, a damaged record.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `quire projections` shows of one projection or consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionStatus {
    /// Its name.
    pub name: String,
    /// Its stream, for a per-stream projector or a consumer of one stream.
    pub stream: Option<StreamId>,
    /// `projector` or `consumer`.
    pub kind: &'static str,
    /// The fingerprint of the live copy (empty for a consumer).
    pub fingerprint: String,
    /// Generation of the live copy (0 for a consumer).
    pub generation: u64,
    /// Last local seq applied (or acknowledged).
    pub checkpoint: u64,
    /// The seq it is working towards: the head, or its stream's last seq.
    pub target: u64,
    /// Parked scribes (not counting skipped ones).
    pub quarantined: u64,
    /// Digest of the live copy's state (projectors only).
    pub digest: Option<[u8; 32]>,
    /// A rebuild under way: (generation, fingerprint, checkpoint).
    pub rebuild: Option<(u64, String, u64)>,
    /// Halted at a scribe: (seq, reason).
    pub halted: Option<(u64, String)>,
    /// The last error, if the projection is failing.
    pub error: Option<String>,
}

impl ProjectionStatus {
    /// Local seqs between the checkpoint and the target.
    pub fn lag(&self) -> u64 {
        self.target.saturating_sub(self.checkpoint)
    }
}

#[derive(Clone)]
struct SlotTask {
    slot: Arc<Slot>,
    wake: Arc<Notify>,
    /// Turned `true` to end the slot's task (its stream was left).
    stop: Arc<tokio::sync::watch::Sender<bool>>,
    /// The task, until someone waits for it to end.
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

struct Inner {
    log: Log,
    registry: Registry,
    root: PathBuf,
    slots: Mutex<BTreeMap<String, SlotTask>>,
    /// Serialises consumers' read-modify-write of their records.
    consumers: Mutex<()>,
    /// Serialises opening slots (the new-stream watcher and a reader may both try).
    opening: Mutex<()>,
    /// Slot steps running at once: each holds a batch (up to 32 MiB read, and its decoded
    /// views), so this bounds the runner's memory and CPU however many streams catch up together.
    working: Arc<tokio::sync::Semaphore>,
    /// What holds copies open besides the slots (the services' reader pools): called with a
    /// forgotten copy's directory, each closes what it holds under it; false once it is gone.
    forget_hooks: Mutex<Vec<ForgetHook>>,
    /// The slots whose copies are open; past the budget, the least recently used are closed.
    open: Arc<OpenCopies>,
    /// How the node spends its file descriptors.
    fds: FdBudget,
    /// Turns to read the copies (every query service's reads share them).
    reads: Arc<ReadTurns>,
    /// Streams whose every slot is open: a new stream costs opening its own slots, not a look
    /// at every stream's.
    complete: Mutex<std::collections::HashSet<StreamId>>,
}

/// See `Inner::forget_hooks`.
pub(crate) type ForgetHook = Box<dyn Fn(&Path) -> bool + Send + Sync>;

/// The projections of a running node. Cheap to clone.
#[derive(Clone)]
pub struct Projections {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Projections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projections")
            .field("registry", &self.inner.registry)
            .finish()
    }
}

impl Projections {
    /// Opens every slot of `registry` over `log` (data under `<data_dir>/projections`) and starts
    /// their tasks; per-stream slots follow as streams are created or joined. Tasks end when the
    /// log closes.
    /// At most `fds.open_copies` copies are open at once.
    pub fn start(
        log: Log,
        registry: Registry,
        data_dir: &Path,
        fds: FdBudget,
    ) -> Result<Projections, RunnerError> {
        let projections = Projections {
            inner: Arc::new(Inner {
                log: log.clone(),
                registry,
                root: data_dir.join(PROJECTIONS_DIR),
                slots: Mutex::new(BTreeMap::new()),
                consumers: Mutex::new(()),
                opening: Mutex::new(()),
                working: Arc::new(tokio::sync::Semaphore::new(
                    std::thread::available_parallelism().map_or(2, |n| n.get()),
                )),
                forget_hooks: Mutex::new(Vec::new()),
                open: Arc::new(OpenCopies::new(fds.open_copies)),
                fds,
                reads: Arc::new(ReadTurns::default()),
                complete: Mutex::new(std::collections::HashSet::new()),
            }),
        };
        projections.forget_orphans()?;
        projections.open_missing_slots()?;
        if projections
            .inner
            .registry
            .plugins()
            .iter()
            .any(|p| p.scope() == Scope::Stream)
        {
            projections.follow_new_streams();
        }
        Ok(projections)
    }

    /// Opens the slots of every stream created or joined from now on, until the log closes.
    fn follow_new_streams(&self) {
        let weak = Arc::downgrade(&self.inner);
        let mut streams = self.inner.log.watch_streams();
        let mut closing = self.inner.log.watch_closing();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = streams.changed() => if changed.is_err() { return },
                    _ = closing.wait_for(|closing| *closing) => return,
                }
                let Some(inner) = weak.upgrade() else { return };
                if let Err(error) = (Projections { inner }).open_missing_slots() {
                    tracing::error!(%error, "could not open projections of a new stream");
                }
            }
        });
    }

    fn open_missing_slots(&self) -> Result<(), RunnerError> {
        let inner = &self.inner;
        let _opening = lock(&inner.opening);
        let mut first_error = None;
        let streams: Vec<StreamId> = {
            let complete = lock(&inner.complete);
            inner
                .log
                .stream_ids()
                .into_iter()
                .filter(|stream| !complete.contains(stream))
                .collect()
        };
        let mut failed = std::collections::HashSet::new();
        for plugin in inner.registry.plugins() {
            let scopes: Vec<Option<StreamId>> = match plugin.scope() {
                Scope::Log => vec![None],
                Scope::Stream => streams.iter().copied().map(Some).collect(),
            };
            for stream in scopes {
                let key = format!(
                    "{}/{}",
                    plugin.name(),
                    stream.map(|s| s.to_hex()).unwrap_or_else(|| "log".into())
                );
                if lock(&inner.slots).contains_key(&key) {
                    continue;
                }
                if let Err(error) = self.open_slot(plugin, stream, &key) {
                    // The other slots still start; this one is tried again when the set of
                    // streams next changes, or at the next start.
                    tracing::error!(slot = %key, %error, "cannot open projection");
                    first_error.get_or_insert(error);
                    failed.extend(stream);
                }
            }
        }
        lock(&inner.complete).extend(streams.into_iter().filter(|s| !failed.contains(s)));
        match first_error {
            Some(error) => Err(error.into()),
            None => Ok(()),
        }
    }

    /// Opens the slot of `plugin` in `stream`'s scope and starts its task.
    fn open_slot(
        &self,
        plugin: &Arc<dyn Plugin>,
        stream: Option<StreamId>,
        key: &str,
    ) -> Result<(), SlotError> {
        let inner = &self.inner;
        let slot = Arc::new(Slot::open(
            inner.log.store(),
            plugin.clone(),
            stream,
            &inner.root,
        )?);
        // Opening read its checkpoint: the copy counts as used (and may close a quieter one).
        inner.open.used(&slot);
        let wake = Arc::new(Notify::new());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(run_slot(
            inner.log.clone(),
            slot.clone(),
            wake.clone(),
            stopped,
            inner.working.clone(),
            inner.open.clone(),
        ));
        lock(&inner.slots).insert(
            key.to_string(),
            SlotTask {
                slot,
                wake,
                stop: Arc::new(stop),
                task: Arc::new(Mutex::new(Some(task))),
            },
        );
        Ok(())
    }

    /// Stops projecting `stream`, which this node no longer holds (it is being left): ends its
    /// slots' tasks, then deletes their copies and records. Returns how many slots went.
    pub async fn forget_stream(&self, stream: &StreamId) -> Result<usize, RunnerError> {
        let tasks: Vec<SlotTask> = {
            let _opening = lock(&self.inner.opening);
            let mut slots = lock(&self.inner.slots);
            let keys: Vec<String> = slots
                .iter()
                .filter(|(_, task)| task.slot.stream.as_ref() == Some(stream))
                .map(|(key, _)| key.clone())
                .collect();
            keys.iter().filter_map(|key| slots.remove(key)).collect()
        };
        lock(&self.inner.complete).remove(stream);
        for task in &tasks {
            task.stop.send_replace(true);
            self.inner.open.forget(task.slot.key());
        }
        for task in &tasks {
            let handle = lock(&task.task).take();
            if let Some(handle) = handle {
                let _ = handle.await;
            }
        }
        let names: Vec<String> = tasks
            .iter()
            .map(|task| task.slot.plugin.name().to_string())
            .collect();
        drop(tasks);
        let count = names.len();
        let inner = self.inner.clone();
        let stream = *stream;
        tokio::task::spawn_blocking(move || {
            for name in names {
                let dir = super::slot::scope_dir(&inner.root, &name, Some(&stream));
                lock(&inner.forget_hooks).retain(|hook| hook(&dir));
                forget_slot(inner.log.store(), &inner.root, &name, &stream)?;
            }
            Ok::<_, StoreError>(())
        })
        .await
        .map_err(|_| RunnerError::NotReady("the node is shutting down".into()))??;
        Ok(count)
    }

    /// Whether this node holds `stream` (and is not leaving it).
    pub fn holds(&self, stream: &StreamId) -> bool {
        self.inner.log.stream(stream).is_some() && !self.inner.log.is_leaving(stream)
    }

    /// The node's turns to read projection copies.
    pub fn read_turns(&self) -> Arc<ReadTurns> {
        self.inner.reads.clone()
    }

    /// How the node spends its file descriptors.
    pub fn fds(&self) -> FdBudget {
        self.inner.fds
    }

    /// Projection slots whose copies are open now, and the most kept open.
    pub fn open_copies(&self) -> (usize, usize) {
        (self.inner.open.len(), self.inner.open.max())
    }

    /// Registers what to call with the directory of every copy a left stream forgets.
    pub(crate) fn on_forget(&self, hook: ForgetHook) {
        lock(&self.inner.forget_hooks).push(hook);
    }

    /// Starts a rebuild of every whole-log projection (after a stream was left, so they forget
    /// what they made of it). Returns their names.
    pub fn rebuild_log_scope(&self) -> Result<Vec<String>, RunnerError> {
        let names: Vec<String> = self
            .inner
            .registry
            .plugins()
            .iter()
            .filter(|plugin| plugin.scope() == Scope::Log)
            .map(|plugin| plugin.name().to_string())
            .collect();
        for name in &names {
            self.rebuild(name, None)?;
        }
        Ok(names)
    }

    /// Deletes the copies and records of per-stream slots whose stream this node does not hold
    /// (a stop interrupted a leave before its projections went).
    fn forget_orphans(&self) -> Result<(), RunnerError> {
        let inner = &self.inner;
        let held: std::collections::HashSet<StreamId> =
            inner.log.stream_ids().into_iter().collect();
        for plugin in inner.registry.plugins() {
            if plugin.scope() != Scope::Stream {
                continue;
            }
            let dir = inner.root.join(plugin.name());
            let mut orphans = std::collections::BTreeSet::new();
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    if let Some(stream) = name.to_str().and_then(|n| n.parse::<StreamId>().ok()) {
                        orphans.insert(stream);
                    }
                }
            }
            let prefix = format!("s/{}/", plugin.name());
            for (key, _) in inner.log.store().projection_records(prefix.as_bytes())? {
                if let Some(stream) = std::str::from_utf8(&key[prefix.len()..])
                    .ok()
                    .and_then(|hex| hex.parse::<StreamId>().ok())
                {
                    orphans.insert(stream);
                }
            }
            for stream in orphans.into_iter().filter(|stream| !held.contains(stream)) {
                tracing::info!(projection = plugin.name(), %stream, "deleting the copy of a stream this node no longer holds");
                forget_slot(inner.log.store(), &inner.root, plugin.name(), &stream)?;
            }
        }
        Ok(())
    }

    /// The slots of `name` (one stream's, or all of them with `stream` `None`).
    fn slots_of(
        &self,
        name: &str,
        stream: Option<&StreamId>,
    ) -> Result<Vec<SlotTask>, RunnerError> {
        let Some(plugin) = self.inner.registry.get(name) else {
            return Err(self.unknown(name));
        };
        if plugin.scope() == Scope::Log && stream.is_some() {
            return Err(RunnerError::Stream(format!(
                "projection {name} covers the whole log; drop --stream"
            )));
        }
        if let Some(stream) = stream {
            if self.inner.log.stream(stream).is_none() {
                return Err(RunnerError::Stream(format!(
                    "stream {stream} is not held by this node"
                )));
            }
        }
        let matching = || -> Vec<SlotTask> {
            lock(&self.inner.slots)
                .values()
                .filter(|task| task.slot.plugin.name() == name)
                .filter(|task| stream.is_none() || task.slot.stream.as_ref() == stream)
                .cloned()
                .collect()
        };
        let slots = matching();
        if slots.is_empty() && stream.is_some() {
            // A stream created or joined a moment ago: its slots may not be open yet (they open
            // when the runner next sees the set of streams change). Open them now; a slot that
            // cannot be opened is logged there and answered as missing here.
            let _ = self.open_missing_slots();
            return Ok(matching());
        }
        Ok(slots)
    }

    /// Every slot, taken out of the map's lock.
    fn all_slots(&self) -> Vec<Arc<Slot>> {
        lock(&self.inner.slots)
            .values()
            .map(|task| task.slot.clone())
            .collect()
    }

    fn unknown(&self, name: &str) -> RunnerError {
        let mut known = self.inner.registry.names();
        if let Ok(consumers) = consumers::list(self.inner.log.store()) {
            known.extend(
                consumers
                    .into_iter()
                    .map(|c| format!("{} (consumer)", c.name)),
            );
        }
        RunnerError::Unknown {
            name: name.to_string(),
            known: if known.is_empty() {
                "no projections".into()
            } else {
                known.join(", ")
            },
        }
    }

    /// Every projection slot and durable consumer; with `digests`, each live copy's digest too
    /// (which costs a pass over the state: `Admin.Status` leaves it out).
    pub fn list(&self, digests: bool) -> Result<Vec<ProjectionStatus>, RunnerError> {
        let store = self.inner.log.store();
        let head = self.inner.log.head();
        let mut out = Vec::new();
        for slot in self.all_slots() {
            out.push(self.slot_status(&slot, store, head, digests)?);
        }
        for consumer in consumers::list(store)? {
            out.push(consumer_status(store, head, consumer)?);
        }
        Ok(out)
    }

    fn slot_status(
        &self,
        slot: &Slot,
        store: &Store,
        head: u64,
        digests: bool,
    ) -> Result<ProjectionStatus, RunnerError> {
        let (live, shadow) = slot.copies();
        let target = slot.target(store, head)?;
        let flags = slot.flags.lock().map(|f| f.clone()).unwrap_or_default();
        let quarantined = slot
            .parked(store)?
            .iter()
            .filter(|p| p.state == "parked")
            .count() as u64;
        let mut error = flags.error;
        let digest = match digests.then(|| slot.digest()) {
            Some(Ok((digest, _))) => Some(digest),
            Some(Err(failed)) => {
                error.get_or_insert(format!("digest: {failed}"));
                None
            }
            None => None,
        };
        Ok(ProjectionStatus {
            name: slot.plugin.name().to_string(),
            stream: slot.stream,
            kind: "projector",
            fingerprint: live.fingerprint,
            generation: live.generation,
            checkpoint: live.checkpoint.min(target),
            target,
            quarantined,
            digest,
            rebuild: shadow.map(|s| (s.generation, s.fingerprint, s.checkpoint.min(target))),
            halted: flags.halted,
            error,
        })
    }

    /// Starts a blue/green rebuild of `name` (every stream's copy, or one stream's); for a
    /// durable consumer, resets its checkpoint to 0. Returns the status of what was started.
    pub fn rebuild(
        &self,
        name: &str,
        stream: Option<&StreamId>,
    ) -> Result<Vec<ProjectionStatus>, RunnerError> {
        let store = self.inner.log.store();
        if self.inner.registry.get(name).is_none() {
            if let Some(consumer) = consumers::get(store, name)? {
                return self.restart_consumer(consumer, stream);
            }
            return Err(self.unknown(name));
        }
        let slots = self.slots_of(name, stream)?;
        let head = self.inner.log.head();
        let mut out = Vec::new();
        for task in slots {
            task.slot.start_rebuild(store)?;
            task.wake.notify_one();
            out.push(self.slot_status(&task.slot, store, head, false)?);
        }
        Ok(out)
    }

    /// `quire rebuild <consumer>`: starts `consumer` over from seq 1.
    fn restart_consumer(
        &self,
        consumer: Consumer,
        stream: Option<&StreamId>,
    ) -> Result<Vec<ProjectionStatus>, RunnerError> {
        let name = consumer.name.as_str();
        if stream.is_some() && consumer.stream.as_ref() != stream {
            return Err(RunnerError::Stream(format!(
                "consumer {name:?} follows {}; drop --stream to start it over",
                consumer
                    .stream
                    .map(|s| format!("stream {s}"))
                    .unwrap_or_else(|| "the whole log".into())
            )));
        }
        let _serial = lock(&self.inner.consumers);
        consumers::reset(self.inner.log.store(), name)?;
        Ok(self
            .list(false)?
            .into_iter()
            .filter(|status| status.kind == "consumer" && status.name == name)
            .collect())
    }

    /// The live copy's digest and checkpoint.
    pub fn digest(
        &self,
        name: &str,
        stream: Option<&StreamId>,
    ) -> Result<([u8; 32], u64), RunnerError> {
        let plugin = self
            .inner
            .registry
            .get(name)
            .ok_or_else(|| self.unknown(name))?;
        if plugin.scope() == Scope::Stream && stream.is_none() {
            return Err(RunnerError::Stream(format!(
                "projection {name} keeps one state per stream; pass --stream <id>"
            )));
        }
        let slots = self.slots_of(name, stream)?;
        let task = slots.first().ok_or_else(|| {
            RunnerError::NotReady(format!(
                "projection {name} has no copy for that stream yet (it could not be opened: see the node's log)"
            ))
        })?;
        let digest = task.slot.digest()?;
        self.inner.open.used(&task.slot);
        Ok(digest)
    }

    /// The live copy of `name` for `stream`: its directory (for a built-in projector's readers)
    /// and a receiver of how far it has seen the log.
    pub fn live(
        &self,
        name: &str,
        stream: &StreamId,
    ) -> Result<(PathBuf, tokio::sync::watch::Receiver<u64>), RunnerError> {
        let slots = self.slots_of(name, Some(stream))?;
        let task = slots.into_iter().next().ok_or_else(|| {
            RunnerError::NotReady(format!(
                "projection {name} has no copy for stream {stream} yet"
            ))
        })?;
        Ok((task.slot.live_dir(), task.slot.watch_applied()))
    }

    /// Scribes refused while a quarantine was full, by projection and stream (only those with
    /// any).
    pub fn not_kept(&self) -> Result<Vec<(String, Option<StreamId>, u64)>, RunnerError> {
        let store = self.inner.log.store();
        let mut out = Vec::new();
        for slot in self.all_slots() {
            let count = slot.not_kept(store)?;
            if count > 0 {
                out.push((slot.plugin.name().to_string(), slot.stream, count));
            }
        }
        Ok(out)
    }

    /// Every parked and skipped scribe.
    pub fn quarantined(&self) -> Result<Vec<Parked>, RunnerError> {
        let store = self.inner.log.store();
        let mut out = Vec::new();
        for slot in self.all_slots() {
            out.extend(slot.parked(store)?);
        }
        Ok(out)
    }

    /// Re-applies the parked scribe `id` (in every projection that parked it, or only `name`).
    pub fn retry(&self, id: &ScribeId, name: Option<&str>) -> Result<Vec<Parked>, RunnerError> {
        self.decide(id, name, |slot, store, seq| slot.retry(store, seq))
    }

    /// Records the decision to skip the parked scribe `id`.
    pub fn skip(&self, id: &ScribeId, name: Option<&str>) -> Result<Vec<Parked>, RunnerError> {
        self.decide(id, name, |slot, store, seq| slot.skip(store, seq))
    }

    fn decide(
        &self,
        id: &ScribeId,
        name: Option<&str>,
        action: impl Fn(&Slot, &Store, u64) -> Result<Parked, SlotError>,
    ) -> Result<Vec<Parked>, RunnerError> {
        let store = self.inner.log.store();
        let tasks: Vec<SlotTask> = lock(&self.inner.slots)
            .values()
            .filter(|task| name.is_none_or(|name| task.slot.plugin.name() == name))
            .cloned()
            .collect();
        let mut done = Vec::new();
        let mut failed = None;
        for task in tasks {
            for parked in task.slot.parked(store)? {
                if parked.id == *id {
                    // Every projection that parked it gets its turn, even if one fails.
                    match action(&task.slot, store, parked.seq) {
                        Ok(parked) => done.push(parked),
                        Err(error) => {
                            failed.get_or_insert(error);
                        }
                    }
                    if task.slot.is_open() {
                        self.inner.open.used(&task.slot);
                    }
                    task.wake.notify_one();
                }
            }
        }
        if let Some(error) = failed {
            return Err(error.into());
        }
        if done.is_empty() {
            return Err(SlotError::NotParked(id.to_hex()).into());
        }
        Ok(done)
    }

    /// Durable consumers: where `name` resumes (the seq after its last ack). Creates the consumer
    /// on first use; a consumer follows one scope (a stream, or the whole log) for life.
    pub fn consumer_start(
        &self,
        name: &str,
        stream: Option<&StreamId>,
    ) -> Result<u64, RunnerError> {
        if self.inner.registry.get(name).is_some() {
            return Err(RunnerError::Consumer(format!(
                "{name:?} is the name of a projector of this node; pick another consumer name"
            )));
        }
        let _serial = lock(&self.inner.consumers);
        consumers::start(self.inner.log.store(), name, stream)
    }

    /// Records that consumer `name` has processed everything up to `seq`.
    /// Acks are bounded by what the consumer can have received: its stream's last seq (or the
    /// head, for a consumer of the whole log).
    pub fn ack(&self, name: &str, seq: u64) -> Result<Consumer, RunnerError> {
        let store = self.inner.log.store();
        let _serial = lock(&self.inner.consumers);
        let Some(consumer) = consumers::get(store, name)? else {
            return Err(RunnerError::UnknownConsumer(name.to_string()));
        };
        let limit = slot_target(store, consumer.stream.as_ref(), self.inner.log.head())?;
        consumers::ack(store, consumer, seq, limit)
    }
}

/// What `quire projections` shows of a durable consumer.
fn consumer_status(
    store: &Store,
    head: u64,
    consumer: Consumer,
) -> Result<ProjectionStatus, RunnerError> {
    let target = match &consumer.stream {
        Some(stream) => slot_target(store, Some(stream), head)?,
        None => head,
    };
    Ok(ProjectionStatus {
        name: consumer.name,
        stream: consumer.stream,
        kind: "consumer",
        fingerprint: String::new(),
        generation: 0,
        checkpoint: consumer.acked.min(target),
        target,
        quarantined: 0,
        digest: None,
        rebuild: None,
        halted: None,
        error: None,
    })
}

/// Deletes the records (slot, parked scribes) and the copies of `name`'s slot of `stream`.
fn forget_slot(
    store: &Store,
    root: &Path,
    name: &str,
    stream: &StreamId,
) -> Result<(), StoreError> {
    let key = format!("{name}/{}", stream.to_hex());
    let mut records: Vec<(Vec<u8>, Option<Vec<u8>>)> = store
        .projection_records(format!("q/{key}/").as_bytes())?
        .into_iter()
        .map(|(key, _)| (key, None))
        .collect();
    records.push((format!("s/{key}").into_bytes(), None));
    records.push((super::quarantine::not_kept_key(&key), None));
    store.put_projection_records(&records)?;
    let dir = super::slot::scope_dir(root, name, Some(stream));
    if let Err(error) = std::fs::remove_dir_all(&dir) {
        if error.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), %error, "could not delete a projection copy");
        }
    }
    Ok(())
}

/// How long a failing projection waits before trying again (doubling up to the cap).
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_CAP: Duration = Duration::from_secs(30);

/// The task of one slot: work while there is work, then wait for a new head, a command or the
/// log closing.
async fn run_slot(
    log: Log,
    slot: Arc<Slot>,
    wake: Arc<Notify>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    working: Arc<tokio::sync::Semaphore>,
    open: Arc<OpenCopies>,
) {
    // A per-stream slot wakes for its own stream's commits only (10,000 quiet streams cost an
    // append nothing); a whole-log slot for every commit.
    let mut heads = match slot.stream.as_ref() {
        Some(stream) => match log.watch_stream_head(stream) {
            Some(heads) => heads,
            None => return, // not held (any more)
        },
        None => log.watch_head(),
    };
    let mut closing = log.watch_closing();
    let mut backoff = RETRY_FIRST;
    loop {
        if *closing.borrow() || *stop.borrow() {
            return;
        }
        let head = *heads.borrow_and_update();
        let Some(stepped) = step(&log, &slot, head, &working, &open).await else {
            return;
        };
        match stepped {
            Ok(worked) => {
                backoff = RETRY_FIRST;
                if worked.more || worked.swapped {
                    continue;
                }
            }
            Err(error) => {
                tracing::error!(slot = %slot.key(), %error, "projection failed; retrying");
                lock(&slot.flags).error = Some(error);
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = wake.notified() => {}
                    _ = closing.wait_for(|closing| *closing) => return,
                    _ = stop.wait_for(|stop| *stop) => return,
                }
                backoff = (backoff * 2).min(RETRY_CAP);
                continue;
            }
        }
        tokio::select! {
            changed = heads.changed() => if changed.is_err() { return },
            () = wake.notified() => {}
            _ = closing.wait_for(|closing| *closing) => return,
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

/// One step of `slot` towards `head`, on a blocking thread once `working` has a permit free.
/// `Err` is the failure as `quire projections` shows it (after a panic, the slot is reopened from
/// its files first); `None`: the runtime is shutting down.
async fn step(
    log: &Log,
    slot: &Arc<Slot>,
    head: u64,
    working: &Arc<tokio::sync::Semaphore>,
    open: &Arc<OpenCopies>,
) -> Option<Result<Worked, String>> {
    let worker = slot.clone();
    let store_log = log.clone();
    let used = open.clone();
    let permit = working.clone().acquire_owned().await.ok()?;
    let result = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let store = store_log.store();
        let target = worker.target(store, head)?;
        // A prune run under way on the stream: its commits would start a rebuild over each time;
        // the run wakes the slot when it ends.
        let shadow_held = worker
            .stream
            .as_ref()
            .is_some_and(|stream| store_log.pruning(stream));
        let worked = worker.work(
            store,
            &crate::log::Exclusions::Log(store_log.clone()),
            target,
            true,
            shadow_held,
        );
        if worker.is_open() {
            used.used(&worker);
        }
        worked
    })
    .await;
    match result {
        Ok(Ok(worked)) => Some(Ok(worked)),
        Ok(Err(error)) => Some(Err(error.to_string())),
        Err(join) if join.is_panic() => {
            // Its in-memory state may be half a batch: start again from its files.
            let reopened = slot.clone();
            let store_log = log.clone();
            let open = open.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if reopened.reopen(store_log.store()).is_ok() {
                    open.used(&reopened);
                }
            })
            .await;
            Some(Err(format!(
                "the projector panicked: {}",
                panic_message(join)
            )))
        }
        Err(_) => None,
    }
}

fn panic_message(join: tokio::task::JoinError) -> String {
    let payload = join.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}
