//! The committer stage of the append pipeline: the `quire-committer` thread, the only code that
//! writes scribes to the store.
//!
//! It takes the groups the signer prepared, in order (several at once when they queue up), asks
//! the admission rules ([`super::rules::admit`]) about each scribe, assigns the next local seqs to
//! the admitted ones and records them in an [`Overlay`] (what the group adds on top of the store),
//! then writes the whole group in one RocksDB write batch: one [`Store::commit`] per group (group
//! commit). Whether that write is fsynced is decided once, when the store is opened
//! ([`super::LogOptions::sync`] → `Store::open`): with `--sync` a group costs one fsync, however
//! many appends it holds. Only after the write does it publish the new streams and the new head,
//! and answer the callers.
//!
//! What does not live here: why a scribe is refused ([`super::rules`]), signing and verifying
//! ([`super::signer`]), the key layout of a commit ([`super::store`]).
//!
//! [`Store::commit`]: super::store::Store::commit

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use quire_projection_api::{AuthorKey, Kind, ScribeId, StreamId};
use tokio::sync::oneshot;

use super::held;
use super::rules::{self, Added, JobRules, Seen, Verdict};
use super::signer::PreparedJob;
use super::store::{
    Commit, CursorUpdate, HeldKey, NewEntry, PeerOrigin, Redaction, Usage, UsageKey,
};
use super::{AppendError, Appended, EachOutcome, Origin, Reply, Shared, StreamState};
use crate::scribe::Scribe;

/// The committer thread's body: runs until the signer is gone (the log is closing).
pub(super) fn committer_loop(
    shared: &Shared,
    prepared: std::sync::mpsc::Receiver<Vec<PreparedJob>>,
) {
    while let Ok(mut group) = prepared.recv() {
        while let Ok(more) = prepared.try_recv() {
            group.extend(more);
        }
        commit_group(shared, group);
    }
}

/// What a group (or one job of it) has added so far, on top of the store.
#[derive(Default)]
pub(super) struct Overlay {
    /// Every scribe added: `(seq, stream, hlc)` by id.
    pub(super) ids: HashMap<ScribeId, (u64, StreamId, u64)>,
    /// Every stream touched, with its counters after the additions.
    pub(super) streams: HashMap<StreamId, StreamState>,
    /// Per-author usage of streams with quotas, after the additions.
    pub(super) usage: HashMap<UsageKey, Usage>,
    entries: Vec<NewEntry>,
    cursors: HashMap<(AuthorKey, StreamId), CursorUpdate>,
    new_streams: usize,
    /// Membership scribes added (who may receive a private stream may have changed).
    membership_changes: usize,
    /// Scribes kept aside (see `log::held`), by key.
    held: HashMap<HeldKey, Vec<u8>>,
    /// Held scribes taken out of the held set (judged now).
    released: Vec<HeldKey>,
    /// Payloads `redact` scribes delete.
    redactions: Vec<Redaction>,
}

impl Overlay {
    /// What admission reads of it.
    fn added(&self) -> Added<'_> {
        Added {
            ids: &self.ids,
            streams: &self.streams,
            usage: &self.usage,
            entries: &self.entries,
            redactions: &self.redactions,
        }
    }

    fn absorb(&mut self, job: Overlay) {
        self.ids.extend(job.ids);
        self.streams.extend(job.streams);
        self.usage.extend(job.usage);
        self.entries.extend(job.entries);
        self.new_streams += job.new_streams;
        self.membership_changes += job.membership_changes;
        self.held.extend(job.held);
        self.released.extend(job.released);
        self.redactions.extend(job.redactions);
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

    /// Records an admitted scribe at `seq`, with its stream as it stands with the scribe counted.
    fn record(
        &mut self,
        scribe: Scribe,
        seq: u64,
        (state, usage): (StreamState, Vec<(UsageKey, Usage)>),
        origin: Origin,
    ) -> Appended {
        self.usage.extend(usage);
        let stream = scribe.stream_id();
        let hlc = scribe.body.hlc;
        self.ids.insert(scribe.id, (seq, stream, hlc));
        self.streams.insert(stream, state);
        if scribe.body.kind == Kind::StreamCreate {
            self.new_streams += 1;
        }
        if scribe.body.kind.is_membership() {
            self.membership_changes += 1;
        }
        if scribe.body.kind.erases() {
            // Admitted, so its target decodes (`rules::check_redact`).
            if let Ok(target) = rules::redact_target(&scribe) {
                self.redactions.push(Redaction {
                    target,
                    justification: prost::Message::encode_to_vec(&scribe.parts().to_proto()).into(),
                });
            }
        }
        self.entries.push(NewEntry {
            seq,
            id: scribe.id,
            stream,
            parts: scribe.parts(),
            payload_sha256: scribe.payload_sha256,
            seal_id: scribe.seal.id,
            seal_leaves: scribe.leaves.clone(),
            origin: match origin {
                Origin::Peer(peer) => Some(peer),
                Origin::Local => None,
            },
            membership: scribe.body.kind.is_membership() || scribe.body.kind == Kind::Retain,
        });
        Appended {
            id: scribe.id,
            seq,
            duplicate: false,
            hlc,
            held: false,
        }
    }

    /// Keeps `scribe` aside under `key` (see `log::held`), unless it is already, within the
    /// node-wide bounds counting what the group (`group`) holds already.
    fn hold(
        &mut self,
        shared: &Shared,
        group: &Overlay,
        key: HeldKey,
        scribe: &Scribe,
        origin: Origin,
    ) -> Result<Appended, AppendError> {
        let appended = Appended {
            id: scribe.id,
            seq: 0,
            duplicate: false,
            hlc: scribe.body.hlc,
            held: true,
        };
        let ahead_ms = (scribe.body.hlc >> 16).saturating_sub(shared.clock.wall_ms());
        // Held again as this commit releases it (its parent is still held, or the clock went
        // back): its record is deleted by this commit, so it must be written back; it replaces
        // itself, so it takes no more room than it had and is never dropped for want of room.
        let rehold = group.released.iter().any(|released| released.id == key.id);
        if self.held.contains_key(&key)
            || group.held.contains_key(&key)
            || (!rehold && shared.held.lock().expect("held lock").key_of(&key.id) == Some(key))
        {
            return Ok(appended);
        }
        let value = held::encode(origin, &scribe.parts());
        if rehold {
            self.held.insert(key, value);
            return Ok(appended);
        }
        let share = held::share_of(&value);
        let (all, mine) = {
            let held = shared.held.lock().expect("held lock");
            let mine = held.shares.get(&share).copied().unwrap_or_default();
            ((held.count, held.bytes), mine)
        };
        let pending: Vec<&Vec<u8>> = self.held.values().chain(group.held.values()).collect();
        let add = |(n, b): (u64, u64), v: &&Vec<u8>| (n + 1, b + v.len() as u64);
        let all = pending.iter().fold(all, add);
        let mine = pending
            .iter()
            .filter(|v| held::share_of(v) == share)
            .fold(mine, add);
        let (most, most_bytes) = held::share_limit(&share);
        let size = value.len() as u64;
        let full = |(count, bytes): (u64, u64), most: u64, most_bytes: u64, whose| {
            (count >= most || bytes + size > most_bytes).then_some(AppendError::HeldFull {
                ahead_ms,
                held: count,
                bytes,
                whose,
            })
        };
        let whose = if share.is_none() {
            "from this node's clients"
        } else {
            "from this peer"
        };
        if let Some(error) = full(all, held::MAX_HELD, held::MAX_HELD_BYTES, "in all")
            .or_else(|| full(mine, most, most_bytes, whose))
        {
            return Err(error);
        }
        self.held.insert(key, value);
        Ok(appended)
    }
}

/// A job's answer, held until the group is written.
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

/// Admits every job of the group, writes what they added in one write batch, publishes it, and
/// answers every caller.
fn commit_group(shared: &Shared, group: Vec<PreparedJob>) {
    let _gate = shared.gate.lock().unwrap_or_else(|p| p.into_inner());
    let head = shared.head.load(Ordering::Acquire);
    let mut overlay = Overlay::default();
    let outcomes: Vec<Outcome> = group
        .into_iter()
        .map(|job| admit_job(shared, head, &mut overlay, job))
        .collect();
    if !overlay.entries.is_empty()
        || !overlay.cursors.is_empty()
        || !overlay.held.is_empty()
        || !overlay.released.is_empty()
    {
        if let Err(error) = write_and_publish(shared, head, overlay) {
            tracing::error!(%error, "group commit failed; nothing of it was stored");
            let failed = || AppendError::Storage(error.clone());
            // Every job that would have succeeded fails: even a "duplicate" answer may point at a
            // seq of this group, which was never written.
            for outcome in outcomes {
                match outcome {
                    Outcome::Atomic(reply, Ok(_)) => drop(reply.send(Err(failed()))),
                    Outcome::Atomic(reply, Err(error)) => drop(reply.send(Err(error))),
                    Outcome::Each(reply, _) => drop(reply.send(Err(failed()))),
                }
            }
            return;
        }
    }
    for outcome in outcomes {
        match outcome {
            Outcome::Atomic(reply, result) => drop(reply.send(result)),
            Outcome::Each(reply, results) => drop(reply.send(Ok(results))),
        }
    }
}

/// Admits the scribes of one job on top of the store (whose head is `head`) and what the group
/// added before it (`overlay`), into which an admitted job's additions go. An atomic job adds
/// nothing if one of its scribes is refused; a replicated batch adds each admitted scribe, and its
/// cursor.
fn admit_job(shared: &Shared, head: u64, overlay: &mut Overlay, job: PreparedJob) -> Outcome {
    let multi = job.scribes.len() > 1;
    let multi_atomic = multi && matches!(job.reply, Reply::Atomic(_));
    let keep_refused = job.keep_refused;
    if let Some(release) = job.release {
        // Whatever the verdict, the held record goes: the scribe is judged now.
        overlay.released.push(release);
    }
    let next_seq = head + overlay.entries.len() as u64 + 1;
    let mut job_overlay = Overlay::default();
    let rules = JobRules {
        origin: job.origin,
        expect_stream: job.expect_stream,
        from_client: job.origin == Origin::Local && job.release.is_none(),
    };
    // A replicated scribe's origin names its own seq in the peer's log.
    let origin_of = |index: usize| match rules.origin {
        Origin::Peer(peer) => Origin::Peer(PeerOrigin {
            seq: job.peer_seqs.get(index).copied().unwrap_or(u64::MAX),
            ..peer
        }),
        Origin::Local => Origin::Local,
    };
    let admit = |job_overlay: &mut Overlay,
                 scribe: Scribe,
                 fresh: bool,
                 payload: Result<(), AppendError>,
                 origin: Origin|
     -> Result<Appended, AppendError> {
        let seq = next_seq + job_overlay.entries.len() as u64;
        let seen = Seen {
            shared,
            group: overlay.added(),
            job: job_overlay.added(),
        };
        let verdict = match rules::admit(&seen, payload, &rules, &scribe, seq, fresh) {
            Ok(verdict) => verdict,
            Err(error) if keep_refused && rules::is_rule_refusal(&error) => {
                tracing::info!(id = %scribe.id, %error, "kept aside: refused by this node's rules, from a peer with other rules");
                let key = held::rules_key(scribe.id, scribe.body.hlc, shared.rules_version);
                return job_overlay.hold(shared, overlay, key, &scribe, origin);
            }
            Err(AppendError::UnknownParent { parent, .. }) if !multi_atomic => {
                if let Some(parent_key) = held_key_of(shared, overlay, job_overlay, &parent) {
                    // Its parent waits in the held set: it waits with it (released together,
                    // it is judged again once the parent is in the log).
                    let key = HeldKey {
                        hlc: parent_key.hlc.max(scribe.body.hlc),
                        id: scribe.id,
                        ..parent_key
                    };
                    return job_overlay.hold(shared, overlay, key, &scribe, origin);
                }
                return Err(AppendError::UnknownParent {
                    parent,
                    stream: scribe.stream_id(),
                });
            }
            Err(error) => return Err(error),
        };
        match verdict {
            Verdict::Duplicate(appended) => Ok(appended),
            Verdict::Hold(key) => {
                if multi_atomic {
                    return Err(AppendError::FutureInBatch {
                        ahead_ms: (scribe.body.hlc >> 16).saturating_sub(shared.clock.wall_ms()),
                        limit_ms: held::MAX_AHEAD_MS,
                    });
                }
                job_overlay.hold(shared, overlay, key, &scribe, origin)
            }
            Verdict::New(state, usage) => {
                shared.clock.observe(scribe.body.hlc);
                Ok(job_overlay.record(scribe, seq, (state, usage), origin))
            }
        }
    };
    match job.reply {
        Reply::Atomic(reply) => {
            let mut results = Vec::with_capacity(job.scribes.len());
            for (index, (scribe, fresh, payload)) in job.scribes.into_iter().enumerate() {
                match scribe.and_then(|scribe| {
                    admit(&mut job_overlay, scribe, fresh, payload, origin_of(index))
                }) {
                    Ok(appended) => results.push(appended),
                    Err(error) => {
                        let error = if multi {
                            AppendError::InBatch {
                                index,
                                source: Box::new(error),
                            }
                        } else {
                            error
                        };
                        return Outcome::Atomic(reply, Err(error));
                    }
                }
            }
            overlay.absorb(job_overlay);
            Outcome::Atomic(reply, Ok(results))
        }
        Reply::Each(reply) => {
            let mut results = Vec::with_capacity(job.scribes.len());
            for (index, (scribe, fresh, payload)) in job.scribes.into_iter().enumerate() {
                results.push(scribe.and_then(|scribe| {
                    admit(&mut job_overlay, scribe, fresh, payload, origin_of(index))
                }));
            }
            // A scribe that could not be held for lack of room was not stored: the cursor must
            // not move past it (the peer sends it again on a later connection).
            let held_full = results
                .iter()
                .any(|result| matches!(result, Err(AppendError::HeldFull { .. })));
            // Nor past a stream this node no longer holds (left while the batch was on its way):
            // a cursor of a stream joined again later must start from nothing.
            let held = |stream: &StreamId| {
                overlay.streams.contains_key(stream)
                    || job_overlay.streams.contains_key(stream)
                    || shared
                        .streams
                        .read()
                        .expect("streams lock")
                        .contains_key(stream)
            };
            if let Some(cursor) = job
                .cursor
                .filter(|cursor| !held_full && held(&cursor.stream))
            {
                job_overlay.add_cursor_at((cursor.peer, cursor.stream), cursor);
            }
            overlay.absorb(job_overlay);
            Outcome::Each(reply, results)
        }
    }
}

/// The held key of `id`, if it is held (or being held by this group), unless this group releases
/// it.
fn held_key_of(shared: &Shared, group: &Overlay, job: &Overlay, id: &ScribeId) -> Option<HeldKey> {
    let pending = |overlay: &Overlay| overlay.held.keys().find(|key| key.id == *id).copied();
    if let Some(key) = pending(job).or_else(|| pending(group)) {
        return Some(key);
    }
    let key = shared.held.lock().expect("held lock").key_of(id)?;
    (!group.released.contains(&key)).then_some(key)
}

/// Writes what the group added in one write batch; then publishes the new streams and the new
/// head (in that order, so a reader that sees the head finds the streams). Nothing is published if
/// the write fails.
fn write_and_publish(
    shared: &Shared,
    head: u64,
    mut overlay: Overlay,
) -> Result<(), Arc<super::store::StoreError>> {
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
        usage: overlay.usage.drain().collect(),
        released: std::mem::take(&mut overlay.released),
        held: overlay.held.drain().collect(),
        redactions: std::mem::take(&mut overlay.redactions),
    };
    let redacted = shared.store.commit(&commit).map_err(Arc::new)?;
    if !commit.redactions.is_empty() {
        shared.redactions.committed(redacted);
    }
    if !commit.held.is_empty() || !commit.released.is_empty() {
        let mut held = shared.held.lock().expect("held lock");
        for key in &commit.released {
            held.remove(key);
        }
        for (key, value) in &commit.held {
            held.add(*key, held::share_of(value), value.len() as u64);
        }
    }
    let touched: Vec<(StreamId, u64)> = overlay
        .streams
        .iter()
        .map(|(id, state)| (*id, state.record.head_seq))
        .collect();
    {
        let mut streams = shared.streams.write().expect("streams lock");
        streams.extend(overlay.streams);
        // A membership change wakes the same watchers: a peer connection then re-checks which
        // private streams its peer may receive (and stops serving one it no longer may).
        if overlay.new_streams > 0 || overlay.membership_changes > 0 {
            shared.streams_tx.send_replace(streams.len());
        }
    }
    shared.head.store(new_head, Ordering::Release);
    shared.head_tx.send_replace(new_head);
    // Then each touched stream's watchers, and only theirs.
    let heads = shared
        .stream_heads
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    for (stream, head_seq) in touched {
        if let Some(watchers) = heads.get(&stream) {
            watchers.send_if_modified(|seen| {
                let newer = head_seq > *seen;
                if newer {
                    *seen = head_seq;
                }
                newer
            });
        }
    }
    Ok(())
}
