//! One projection slot: a plugin's state for the whole log or for one stream, as a live copy and,
//! during a rebuild, a shadow copy beside it; reading and applying batches to them, and the swap.
//! Everything here is synchronous (the async runner in `runner.rs` calls it off the executor, and
//! `offline.rs` calls it directly). Not here: the tasks and admin operations (`runner.rs`), the
//! records of parked scribes and the operator's retry/skip (`quarantine.rs`).
//!
//! The slot's record in the store's `projections` column family (a JSON value):
//! `s/<name>/<scope>` → `{"live": {"generation", "fingerprint"}, "shadow": {…} | null, "next": n}`.
//!
//! `<scope>` is `log` or the stream id in hex. Instances live in
//! `<data>/projections/<name>/<scope>/<generation>/`.
//!
//! Crash safety, step by step:
//! - a batch and its checkpoint commit together inside the projector (its contract);
//! - a parked scribe's quarantine record is written (fsynced) *before* the checkpoint moves past it,
//!   so a crash in between re-applies it on restart instead of losing it;
//! - a swap writes the slot record (fsynced) first and removes the old generation's directory
//!   after; directories that no record names are removed when the slot is opened.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use quire_projection_api::{
    ApplyError, OnFailure, Place, Plugin, ProjectionError, Projector, Scribe as View, ScribeId,
    StreamId,
};
use serde_json::{json, Value};

use super::payloads::StorePayloads;
use super::view::{to_view, to_view_with_membership};
use crate::log::store::{Store, StoreError, StoredEntry};
use crate::log::{read_range, Exclusions};

/// The directory under a node's data directory that holds every projection.
pub const PROJECTIONS_DIR: &str = "projections";

/// What an operation on one slot (or an offline command driving slots) can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SlotError {
    /// The projector (the plugin's code) failed as a whole, or its directory could not be made.
    #[error("projector: {0}")]
    Projector(String),
    /// The scope does not fit: the stream is not held by this node, or the projector covers the
    /// whole log and a stream was named.
    #[error("{0}")]
    Stream(String),
    /// Nothing is parked at this seq.
    #[error("nothing parked in the quarantine for {0}; `quire quarantine list` shows what is")]
    NotParked(String),
    /// A retried scribe failed again; it stays parked.
    #[error("scribe {id} still fails: {reason}; it stays in the quarantine")]
    StillFails {
        /// The scribe.
        id: ScribeId,
        /// What the projector said.
        reason: String,
    },
    /// A record of the slot, the quarantine or a stored scribe has the wrong shape.
    #[error("damaged projection record: {0}")]
    Damaged(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Scribes read per store call.
const READ_CHUNK: usize = 2048;
/// Most scribes of one batch, whatever the plugin asks ([`Plugin::max_batch`]). Big batches let a
/// projector commit once for many scribes: a SQLite projector writes each page it touched once per
/// commit, so a catch-up or rebuild in batches of 2,048 wrote its random-keyed indexes about ten
/// times as often as in batches of 65,536.
pub(crate) const BATCH: usize = 65_536;
/// Most bytes of one batch (the scribes are held twice while a batch is applied: stored bytes and
/// decoded views), so a slot's memory stays bounded whatever the payloads.
const BATCH_BYTES: usize = 32 << 20;

/// The next batch after `from`, up to `to`: at most `max` scribes (and [`BATCH`]) and about
/// [`BATCH_BYTES`]. The flag is true when a cap ended it (more may follow before `to`).
pub(crate) fn read_batch(
    store: &Store,
    stream: Option<&StreamId>,
    from: u64,
    to: u64,
    max: usize,
) -> Result<(Vec<StoredEntry>, bool), StoreError> {
    let max = max.clamp(1, BATCH);
    let mut out: Vec<StoredEntry> = Vec::new();
    let mut bytes = 0;
    let mut next = from;
    loop {
        let want = READ_CHUNK.min(max - out.len());
        // Bytes are counted before payloads are read: a batch ends at about BATCH_BYTES, or at
        // its first scribe, whatever the payloads' sizes.
        let room = BATCH_BYTES.saturating_sub(bytes);
        let chunk = read_range(store, stream, next, to, want, room)?;
        let Some(last) = chunk.entries.last() else {
            return Ok((out, false));
        };
        next = last.seq + 1;
        bytes += chunk
            .entries
            .iter()
            .map(|e| e.parts.size() as usize)
            .sum::<usize>();
        out.extend(chunk.entries);
        if !chunk.more {
            return Ok((out, false));
        }
        if out.len() >= max || bytes >= BATCH_BYTES {
            return Ok((out, true));
        }
    }
}

/// One copy of the state. Its projector is open only while it is used: a quiet copy is closed
/// (its files, a few descriptors each) when the node holds more open copies than its budget, and
/// opened again from its place when it is next needed. Every batch commits with its checkpoint, so
/// between two batches the files are the whole state.
pub(crate) struct Instance {
    pub(crate) generation: u64,
    pub(crate) fingerprint: String,
    projector: Option<Box<dyn Projector>>,
    place: Place,
    /// The committed checkpoint.
    pub(crate) checkpoint: u64,
    /// How far the log has been read for it (≥ checkpoint: a per-stream instance skips other
    /// streams' seqs without committing a checkpoint for them).
    pub(crate) scanned: u64,
}

impl Instance {
    /// The open projector, opening it again if it was closed.
    pub(super) fn projector(
        &mut self,
        plugin: &dyn Plugin,
    ) -> Result<&mut dyn Projector, SlotError> {
        if self.projector.is_none() {
            let projector = plugin.open(&self.place)?;
            let checkpoint = projector.checkpoint()?;
            if checkpoint != self.checkpoint {
                // Only another process writing the copy's files could do this: believe them.
                tracing::warn!(dir = %self.place.dir.display(), checkpoint, expected = self.checkpoint, "a projection copy reopened at another checkpoint");
                self.checkpoint = checkpoint;
                self.scanned = checkpoint;
            }
            self.projector = Some(projector);
        }
        Ok(&mut **self.projector.as_mut().expect("opened above"))
    }

    /// Closes the projector (its files); the next use opens it again.
    pub(super) fn close(&mut self) -> bool {
        self.projector.take().is_some()
    }

    fn is_open(&self) -> bool {
        self.projector.is_some()
    }

    fn state(&self) -> CopyState {
        CopyState {
            generation: self.generation,
            fingerprint: self.fingerprint.clone(),
            checkpoint: self.checkpoint.max(self.scanned),
        }
    }
}

/// Flags of a slot that are not state.
#[derive(Debug, Default, Clone)]
pub(crate) struct Flags {
    /// Halted at this seq with this reason (policy [`OnFailure::Halt`]).
    pub(crate) halted: Option<(u64, String)>,
    /// The last storage error, cleared by the next successful batch.
    pub(crate) error: Option<String>,
}

/// What one step of work did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Worked {
    /// Scribes applied (or parked).
    pub(crate) applied: usize,
    /// Whether more is left to do now.
    pub(crate) more: bool,
    /// Whether the shadow was swapped in.
    pub(crate) swapped: bool,
    /// The live copy met an `acl.revoke` at this seq, not applied yet: the slot starts a fresh
    /// rebuild (a revoke can exclude scribes applied before it), then applies it.
    revoke: Option<u64>,
}

/// Whether applying a batch stopped at a scribe (policy [`OnFailure::Halt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halted {
    Yes,
    No,
}

/// A plugin's state in one scope.
pub(crate) struct Slot {
    pub(crate) plugin: Arc<dyn Plugin>,
    pub(crate) stream: Option<StreamId>,
    /// `<name>/<scope>`.
    pub(super) key: String,
    /// `<data>/projections/<name>/<scope>`.
    dir: PathBuf,
    pub(super) live: Mutex<Instance>,
    pub(super) shadow: Mutex<Option<Instance>>,
    /// The next generation number to hand out.
    next: Mutex<u64>,
    /// What status reports show of the live and shadow copies, refreshed after every step, so a
    /// status never waits for a batch being applied.
    shown: Mutex<(CopyState, Option<CopyState>)>,
    /// How far the live copy has seen the log: readers wait on it for their own writes.
    applied: tokio::sync::watch::Sender<u64>,
    pub(crate) flags: Mutex<Flags>,
    /// The live copy met an `acl.revoke`, `redact` or `prune` and answered it by starting a
    /// fresh rebuild: the log's seq then, up to which every such scribe is in effect for that
    /// rebuild (in memory: after a restart the live copy resumes past the revokes it met, and
    /// the recorded rebuild resumes).
    revokes_met: Mutex<u64>,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn scope_name(stream: Option<&StreamId>) -> String {
    stream.map(|s| s.to_hex()).unwrap_or_else(|| "log".into())
}

impl From<super::view::DamagedEntry> for SlotError {
    fn from(error: super::view::DamagedEntry) -> SlotError {
        SlotError::Damaged(error.to_string())
    }
}

impl From<ProjectionError> for SlotError {
    fn from(error: ProjectionError) -> SlotError {
        SlotError::Projector(error.0)
    }
}

impl Slot {
    /// Opens (creating if new) the slot of `plugin` in `stream`'s scope under `root`
    /// (`<data>/projections`). Resumes a rebuild under way, and starts one if the plugin's
    /// fingerprint differs from the live copy's.
    pub(crate) fn open(
        store: &Store,
        plugin: Arc<dyn Plugin>,
        stream: Option<StreamId>,
        root: &Path,
    ) -> Result<Slot, SlotError> {
        let name = plugin.name().to_string();
        let scope = scope_name(stream.as_ref());
        let key = format!("{name}/{scope}");
        let dir = root.join(&name).join(&scope);
        let fingerprint = plugin.fingerprint();
        let mut record = SlotRecord::read_or_create(store, &key, &fingerprint)?;
        // A rebuild started by other code (another fingerprint) is not resumed: its copy would be
        // half one version, half the other.
        let discard_shadow = record
            .shadow
            .as_ref()
            .is_some_and(|(_, f)| *f != fingerprint);
        if discard_shadow {
            record.shadow = None;
        }
        remove_unnamed_generations(&dir, record.live.0, record.shadow.as_ref().map(|s| s.0));
        let open = |(generation, fingerprint): (u64, String)| {
            open_instance(store, &*plugin, &dir, stream, generation, fingerprint)
        };
        let mut live = open(record.live)?;
        let mut shadow = record.shadow.map(open).transpose()?;
        let mut next = record.next;
        // A copy ahead of the log holds scribes the log no longer has: it lost its unsynced tail
        // (a power loss without `--sync`) or was restored from a backup, and its next seqs will
        // name other scribes. Such a copy starts over from the log (the lost scribes come back
        // from peers that have them, as new seqs).
        let head = store.head()?;
        let mut rewrite = discard_shadow;
        let ahead = |copy: &Instance, which: &str| {
            let ahead = copy.checkpoint > head;
            if ahead {
                tracing::warn!(
                    slot = %key,
                    copy = which,
                    checkpoint = copy.checkpoint,
                    head,
                    "projection copy is ahead of the log (the log lost its unsynced tail, or was \
                     restored from a backup): rebuilding it from the log"
                );
            }
            ahead
        };
        if shadow.as_ref().is_some_and(|copy| ahead(copy, "shadow")) {
            let copy = shadow.take().expect("checked");
            let generation_dir = dir.join(copy.generation.to_string());
            drop(copy);
            let _ = std::fs::remove_dir_all(generation_dir);
            rewrite = true;
        }
        let mut stale_live = None;
        if ahead(&live, "live") {
            let _ = std::fs::remove_dir_all(dir.join(next.to_string()));
            let fresh = open((next, fingerprint.clone()))?;
            stale_live = Some(std::mem::replace(&mut live, fresh).generation);
            next += 1;
            rewrite = true;
        }
        let shown = (live.state(), shadow.as_ref().map(Instance::state));
        let slot = Slot {
            plugin,
            stream,
            key,
            dir,
            applied: tokio::sync::watch::Sender::new(shown.0.checkpoint),
            shown: Mutex::new(shown),
            live: Mutex::new(live),
            shadow: Mutex::new(shadow),
            next: Mutex::new(next),
            flags: Mutex::new(Flags::default()),
            revokes_met: Mutex::new(0),
        };
        if rewrite {
            let live = lock(&slot.live);
            let shadow = lock(&slot.shadow);
            slot.write_record(store, &live, shadow.as_ref(), next)?;
        }
        if let Some(generation) = stale_live {
            // Only once the record names the fresh copy (a crash before this leaves a directory
            // no record names, removed at the next open).
            let _ = std::fs::remove_dir_all(slot.dir.join(generation.to_string()));
        }
        slot.rebuild_if_stale(store, &fingerprint)?;
        Ok(slot)
    }

    /// Starts a rebuild if the live copy was made by other code than the plugin's `fingerprint`
    /// and none is under way.
    fn rebuild_if_stale(&self, store: &Store, fingerprint: &str) -> Result<(), SlotError> {
        let stale = {
            let live = lock(&self.live);
            let shadow = lock(&self.shadow);
            live.fingerprint != fingerprint && shadow.is_none()
        };
        if stale {
            tracing::info!(slot = %self.key, %fingerprint, "projector fingerprint changed: rebuilding blue/green");
            self.start_rebuild(store)?;
        }
        Ok(())
    }

    /// Reopens both copies from their directories: after a projector panicked mid-batch, its
    /// in-memory state cannot be trusted, its last committed state can.
    pub(crate) fn reopen(&self, store: &Store) -> Result<(), SlotError> {
        let mut live = lock(&self.live);
        let mut shadow = lock(&self.shadow);
        let reopen = |instance: &Instance| {
            open_instance(
                store,
                &*self.plugin,
                &self.dir,
                self.stream,
                instance.generation,
                instance.fingerprint.clone(),
            )
        };
        *live = reopen(&live)?;
        if let Some(copy) = shadow.as_ref() {
            *shadow = Some(reopen(copy)?);
        }
        *lock(&self.shown) = (live.state(), shadow.as_ref().map(Instance::state));
        self.applied.send_replace(live.state().checkpoint);
        Ok(())
    }

    /// `<name>/<scope>`.
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    /// The local seq this slot is working towards: the log's head, or its stream's last seq.
    pub(crate) fn target(&self, store: &Store, head: u64) -> Result<u64, SlotError> {
        Ok(slot_target(store, self.stream.as_ref(), head)?)
    }

    /// Starts a rebuild into a new generation (a no-op if one is under way). Returns its
    /// generation.
    pub(crate) fn start_rebuild(&self, store: &Store) -> Result<u64, SlotError> {
        self.begin_rebuild(store, false)
    }

    /// Starts a rebuild from the first seq: one under way that has read anything is dropped.
    /// What an offline rebuild does: a copy recorded before a stop may have read a scribe that
    /// an erasure committed later takes away, and with no live copy stepping, nothing else
    /// would start it over.
    pub(crate) fn start_fresh_rebuild(&self, store: &Store) -> Result<u64, SlotError> {
        self.begin_rebuild(store, true)
    }

    /// Starts a rebuild; `fresh`: a rebuild under way is dropped and started over (it may have
    /// applied scribes a revoke committed since excludes) unless it has read nothing yet.
    fn begin_rebuild(&self, store: &Store, fresh: bool) -> Result<u64, SlotError> {
        // Lock order everywhere: live, shadow, next, shown.
        let live = lock(&self.live);
        let mut shadow = lock(&self.shadow);
        let untouched = shadow
            .as_ref()
            .is_some_and(|copy| copy.scanned == 0 && copy.checkpoint == 0);
        if fresh && !untouched {
            if let Some(stale) = shadow.take() {
                let stale_dir = self.dir.join(stale.generation.to_string());
                drop(stale);
                let _ = std::fs::remove_dir_all(stale_dir);
            }
        }
        if let Some(existing) = shadow.as_ref() {
            return Ok(existing.generation);
        }
        let mut next = lock(&self.next);
        let generation = *next;
        let fingerprint = self.plugin.fingerprint();
        let generation_dir = self.dir.join(generation.to_string());
        let _ = std::fs::remove_dir_all(&generation_dir);
        let instance = open_instance(
            store,
            &*self.plugin,
            &self.dir,
            self.stream,
            generation,
            fingerprint,
        )?;
        self.write_record(store, &live, Some(&instance), generation + 1)?;
        *next = generation + 1;
        lock(&self.shown).1 = Some(instance.state());
        *shadow = Some(instance);
        Ok(generation)
    }

    fn write_record(
        &self,
        store: &Store,
        live: &Instance,
        shadow: Option<&Instance>,
        next: u64,
    ) -> Result<(), SlotError> {
        let part = |instance: &Instance| json!({"generation": instance.generation, "fingerprint": instance.fingerprint});
        let record = json!({
            "live": part(live),
            "shadow": shadow.map(part),
            "next": next,
        });
        store.put_projection_records(&[(
            record_key(&self.key).into_bytes(),
            Some(record.to_string().into_bytes()),
        )])?;
        Ok(())
    }

    /// One step: a batch for the live copy (unless halted, or `live` is false: an offline
    /// rebuild leaves the copy it replaces alone), a batch for the shadow copy (unless
    /// `shadow_held`: a prune run is under way on the stream, and each of its commits would start
    /// the shadow over), and the swap once the shadow has reached `target`.
    pub(crate) fn work(
        &self,
        store: &Store,
        exclusions: &Exclusions,
        target: u64,
        live: bool,
        shadow_held: bool,
    ) -> Result<Worked, SlotError> {
        let mut worked = Worked::default();
        let halted = lock(&self.flags).halted.is_some();
        if live && !halted {
            let step = {
                let mut live = lock(&self.live);
                let step = self.step(store, exclusions, &mut live, target, true);
                self.show_live(&live);
                step?
            };
            if let Some(seq) = step.revoke {
                // The revoke (or redaction) may exclude scribes every copy holds: rebuild from
                // the log, with it — and with every other one committed up to `target`, which
                // the rebuild reads already in effect (a run of prune commits starts one rebuild,
                // not one per commit).
                self.begin_rebuild(store, true)?;
                *lock(&self.revokes_met) = target;
                tracing::info!(slot = %self.key, seq, "a revoke or a redaction: rebuilding the copy without what it takes away");
                worked.more = true;
                return Ok(worked);
            }
            worked.applied += step.applied;
            worked.more |= step.more;
        }
        let shadow_done = {
            let mut shadow = lock(&self.shadow);
            match shadow.as_mut() {
                Some(_) if shadow_held => false,
                Some(instance) => {
                    let step = self.step(store, exclusions, instance, target, false);
                    lock(&self.shown).1 = Some(instance.state());
                    let step = step?;
                    worked.applied += step.applied;
                    worked.more |= step.more;
                    !step.more
                }
                None => false,
            }
        };
        if shadow_done {
            self.swap(store)?;
            worked.swapped = true;
        }
        lock(&self.flags).error = None;
        Ok(worked)
    }

    /// Reads the next batch for `instance` up to `target` and applies it, parking scribes the
    /// projector refuses.
    fn step(
        &self,
        store: &Store,
        exclusions: &Exclusions,
        instance: &mut Instance,
        target: u64,
        live: bool,
    ) -> Result<Worked, SlotError> {
        let from = instance.scanned.max(instance.checkpoint) + 1;
        if from > target {
            return Ok(Worked::default());
        }
        let (entries, full) = read_batch(
            store,
            self.stream.as_ref(),
            from,
            target,
            self.plugin.max_batch(),
        )?;
        let scanned_to = match entries.last() {
            Some(last) if full => last.seq,
            _ => target,
        };
        let applied = entries.len();
        if !entries.is_empty() {
            let (views, revoke) = views_and_revokes(&entries, exclusions)?;
            if live && revoke > *lock(&self.revokes_met) {
                return Ok(Worked {
                    revoke: Some(revoke),
                    ..Worked::default()
                });
            }
            if self.apply_parking(store, instance, &views, live)? == Halted::Yes {
                instance.scanned = instance.checkpoint;
                return Ok(Worked::default());
            }
        }
        instance.scanned = scanned_to;
        Ok(Worked {
            applied,
            more: full,
            swapped: false,
            revoke: None,
        })
    }

    /// Applies `batch`; a scribe the projector refuses is parked (and, by policy, halts the live
    /// copy at it) while the rest is applied around it.
    fn apply_parking(
        &self,
        store: &Store,
        instance: &mut Instance,
        batch: &[View],
        live: bool,
    ) -> Result<Halted, SlotError> {
        let mut start = 0;
        let mut end = batch.len();
        while start < batch.len() {
            let part = &batch[start..end];
            let checkpoint = part.last().expect("non-empty part").local_seq;
            match instance.projector(&*self.plugin)?.apply(part, checkpoint) {
                Ok(()) => {
                    instance.checkpoint = checkpoint;
                    let first = part.first().expect("non-empty part").local_seq;
                    self.clear_applied(store, instance.generation, first, checkpoint)?;
                    start = end;
                    end = batch.len();
                }
                Err(ApplyError::Scribe { index, reason }) if index < part.len() => {
                    if index > 0 {
                        // Commit what comes before the refused scribe, then come back to it.
                        end = start + index;
                        continue;
                    }
                    let bad = &part[0];
                    let skipped = self.park(store, bad, &reason, instance.generation)?;
                    if !skipped && live && self.plugin.on_failure() == OnFailure::Halt {
                        tracing::warn!(slot = %self.key, seq = bad.local_seq, id = %bad.id, %reason, "projection halted at a scribe it cannot apply");
                        lock(&self.flags).halted = Some((bad.local_seq, reason));
                        return Ok(Halted::Yes);
                    }
                    tracing::warn!(slot = %self.key, seq = bad.local_seq, id = %bad.id, %reason, "scribe parked in the quarantine");
                    self.move_checkpoint(instance, bad.local_seq)?;
                    start += 1;
                    end = batch.len();
                }
                Err(ApplyError::Scribe { index, .. }) => {
                    return Err(SlotError::Projector(format!(
                        "projector {} refused scribe {index} of a batch of {}",
                        self.plugin.name(),
                        part.len()
                    )))
                }
                Err(ApplyError::Storage(message)) => return Err(SlotError::Projector(message)),
            }
        }
        Ok(Halted::No)
    }

    pub(super) fn move_checkpoint(
        &self,
        instance: &mut Instance,
        seq: u64,
    ) -> Result<(), SlotError> {
        if seq <= instance.checkpoint {
            return Ok(());
        }
        match instance.projector(&*self.plugin)?.apply(&[], seq) {
            Ok(()) => {
                instance.checkpoint = seq;
                Ok(())
            }
            Err(error) => Err(SlotError::Projector(error.to_string())),
        }
    }

    /// Makes the shadow copy live and removes the old one.
    fn swap(&self, store: &Store) -> Result<(), SlotError> {
        let mut live = lock(&self.live);
        let mut shadow = lock(&self.shadow);
        let Some(new) = shadow.as_ref() else {
            return Ok(());
        };
        let next = *lock(&self.next);
        // The record first: if it cannot be written, nothing changed and the rebuild goes on.
        self.write_record(store, new, None, next)?;
        let new = shadow.take().expect("checked above");
        self.forget_parked_by_others(store, new.generation)?;
        lock(&self.flags).halted = None;
        *lock(&self.shown) = (new.state(), None);
        self.applied.send_replace(new.state().checkpoint);
        let old = std::mem::replace(&mut *live, new);
        let old_dir = self.dir.join(old.generation.to_string());
        drop(old);
        if let Err(error) = std::fs::remove_dir_all(&old_dir) {
            tracing::warn!(dir = %old_dir.display(), %error, "could not remove a retired projection copy");
        }
        tracing::info!(slot = %self.key, generation = live.generation, "rebuilt copy swapped in");
        Ok(())
    }

    /// The live copy's digest and checkpoint.
    pub(crate) fn digest(&self) -> Result<([u8; 32], u64), SlotError> {
        let mut live = lock(&self.live);
        let digest = live.projector(&*self.plugin)?.digest()?;
        Ok((digest, live.checkpoint))
    }

    pub(super) fn show_live(&self, live: &Instance) {
        let state = live.state();
        self.applied.send_replace(state.checkpoint);
        lock(&self.shown).0 = state;
    }

    /// A receiver of how far the live copy has seen the log (its checkpoint, or beyond for a
    /// per-stream copy that skipped other streams' seqs).
    pub(crate) fn watch_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// The live copy's directory.
    pub(crate) fn live_dir(&self) -> PathBuf {
        self.dir.join(lock(&self.shown).0.generation.to_string())
    }

    /// Closes the copies' projectors unless one is in use now (then it says false: a busy copy
    /// stays open). They open again when next needed.
    pub(crate) fn close_copies(&self) -> bool {
        let (Ok(mut live), Ok(mut shadow)) = (self.live.try_lock(), self.shadow.try_lock()) else {
            return false;
        };
        live.close();
        if let Some(shadow) = shadow.as_mut() {
            shadow.close();
        }
        true
    }

    /// Whether a copy's projector is open.
    pub(crate) fn is_open(&self) -> bool {
        let open = |instance: Option<&Instance>| instance.is_some_and(Instance::is_open);
        open(Some(&lock(&self.live))) || open(lock(&self.shadow).as_ref())
    }

    /// The live copy and the shadow copy, if any, as of their last step.
    pub(crate) fn copies(&self) -> (CopyState, Option<CopyState>) {
        lock(&self.shown).clone()
    }
}

/// What `quire projections` shows of one copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CopyState {
    pub(crate) generation: u64,
    pub(crate) fingerprint: String,
    /// How far it has seen the log (its checkpoint, or beyond for a per-stream copy that skipped
    /// other streams' seqs).
    pub(crate) checkpoint: u64,
}

fn record_key(key: &str) -> String {
    format!("s/{key}")
}

/// A slot's record, `s/<name>/<scope>`: its copies by (generation, fingerprint), and the next
/// generation number to hand out.
struct SlotRecord {
    live: (u64, String),
    shadow: Option<(u64, String)>,
    next: u64,
}

impl SlotRecord {
    /// The record of slot `key`; a new slot's (generation 1 of `fingerprint`) is written first.
    fn read_or_create(
        store: &Store,
        key: &str,
        fingerprint: &str,
    ) -> Result<SlotRecord, SlotError> {
        let record = match store.projection_record(record_key(key).as_bytes())? {
            Some(bytes) => serde_json::from_slice::<Value>(&bytes)
                .map_err(|error| SlotError::Damaged(format!("slot {key}: {error}")))?,
            None => {
                let record = json!({
                    "live": {"generation": 1, "fingerprint": fingerprint},
                    "shadow": null,
                    "next": 2,
                });
                store.put_projection_records(&[(
                    record_key(key).into_bytes(),
                    Some(record.to_string().into_bytes()),
                )])?;
                record
            }
        };
        let generation_of = |part: &Value| -> Option<(u64, String)> {
            Some((
                part.get("generation")?.as_u64()?,
                part.get("fingerprint")?.as_str()?.to_string(),
            ))
        };
        let live = generation_of(&record["live"])
            .ok_or_else(|| SlotError::Damaged(format!("slot {key}: no live generation")))?;
        Ok(SlotRecord {
            shadow: generation_of(&record["shadow"]),
            next: record["next"].as_u64().unwrap_or(live.0 + 1),
            live,
        })
    }
}

/// What a projector is given of `entries`: every scribe but those `exclusions` leaves out.
pub(super) fn views(
    entries: &[StoredEntry],
    exclusions: &Exclusions,
) -> Result<Vec<View>, SlotError> {
    Ok(views_and_revokes(entries, exclusions)?.0)
}

/// [`views`], and the newest seq of an `acl.revoke` or a `redact` among `entries` (0: none):
/// either may take away a scribe a copy applied before it. A redacted scribe is never given (its
/// payload is gone: projections behave as if it had never been written).
fn views_and_revokes(
    entries: &[StoredEntry],
    exclusions: &Exclusions,
) -> Result<(Vec<View>, u64), SlotError> {
    let mut views = Vec::with_capacity(entries.len());
    let mut revoke = 0;
    for entry in entries {
        if entry.parts.redacted_by.is_some() {
            continue;
        }
        let (view, membership) = to_view_with_membership(entry)?;
        if matches!(
            view.kind,
            quire_projection_api::Kind::AclRevoke
                | quire_projection_api::Kind::Redact
                | quire_projection_api::Kind::Prune
        ) {
            revoke = entry.seq;
        }
        if !exclusions.excludes(&view.stream, &view.author, view.hlc, membership) {
            views.push(view);
        }
    }
    Ok((views, revoke))
}

/// Where an instance of `stream`'s scope lives: its directory, stream and the stream's policy
/// (read from its genesis; the default policy for the whole log), and the node's payloads.
pub(super) fn place_of(
    store: &Store,
    dir: PathBuf,
    stream: Option<StreamId>,
) -> Result<Place, SlotError> {
    let mut place = Place::new(dir, stream).with_payloads(StorePayloads::shared(store));
    if let Some(stream) = stream {
        let genesis = store.get(&stream)?.ok_or_else(|| {
            SlotError::Stream(format!("stream {stream} is not held by this node"))
        })?;
        let view = to_view(&genesis)?;
        place.policy = crate::genesis::genesis_from_payload(&view.payload, view.author)
            .map_err(|error| SlotError::Damaged(format!("genesis of {stream}: {error}")))?
            .policy;
    }
    Ok(place)
}

fn open_instance(
    store: &Store,
    plugin: &dyn Plugin,
    dir: &Path,
    stream: Option<StreamId>,
    generation: u64,
    fingerprint: String,
) -> Result<Instance, SlotError> {
    let place = place_of(store, dir.join(generation.to_string()), stream)?;
    std::fs::create_dir_all(&place.dir)
        .map_err(|error| SlotError::Projector(format!("{}: {error}", place.dir.display())))?;
    let projector = plugin.open(&place)?;
    let checkpoint = projector.checkpoint()?;
    Ok(Instance {
        generation,
        fingerprint,
        projector: Some(projector),
        place,
        checkpoint,
        scanned: checkpoint,
    })
}

/// Removes generation directories no record names (left by a crash after a swap).
fn remove_unnamed_generations(dir: &Path, live: u64, shadow: Option<u64>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let keep = name
            .to_str()
            .and_then(|name| name.parse::<u64>().ok())
            .is_some_and(|generation| generation == live || Some(generation) == shadow);
        if !keep {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A scope's directory name, for tools that look at the files.
pub fn scope_dir(root: &Path, name: &str, stream: Option<&StreamId>) -> PathBuf {
    root.join(name).join(scope_name(stream))
}

/// The local seq a slot of `stream`'s scope (`None`: the whole log) works towards when the log's
/// head is `head`: the head, or the stream's last seq.
pub(crate) fn slot_target(
    store: &Store,
    stream: Option<&StreamId>,
    head: u64,
) -> Result<u64, StoreError> {
    Ok(match stream {
        None => head,
        Some(stream) => store
            .stream_record(stream)?
            .map(|record| record.head_seq.min(head))
            .unwrap_or(0),
    })
}
