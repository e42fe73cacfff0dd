//! Retention (docs/protocol.md, "Retention"): a stream's rule for which payloads go, and the
//! pruner that applies it.
//!
//! The rule is data in the stream: the genesis's `retention`, replaced by the newest (by clock,
//! then id) `retain` scribe of the stream's owner. Only a node holding the owner's key applies it:
//! it signs one `prune` scribe per payload the rule lets go, and every node then treats a pruned
//! scribe exactly like a redacted one (`log::redact`: the payload leaves the disk, the envelope
//! stays, projections are rebuilt without it, the payload is refused if offered again). So every
//! node prunes the same payloads at the same points of the log — the prune scribes — whatever its
//! own clock or the order scribes reached it, and a node that joins later receives the envelopes
//! with their prune scribes as justification.

use std::collections::HashMap;

use prost::Message;
use quire_projection_api::files::FileChange;
use quire_projection_api::{AuthorKey, Kind, ScribeId, StreamId};

use super::store::{Store, StoreError};
use super::{AppendError, Draft, Log, NewScribe, Origin, StreamState};
use crate::pb;
use crate::scribe::{decode_stored_envelope, Scribe};

/// Content type of a `retain` payload.
pub const RETAIN_CONTENT_TYPE: &str = "application/vnd.quire.retain+protobuf";

/// Content type of a `prune` payload (a `quire.v1.Redact`).
pub const PRUNE_CONTENT_TYPE: &str = "application/vnd.quire.prune+protobuf";

pub use crate::genesis::RetentionRule as Rule;

/// A stream's retention rule in force, and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InForce {
    /// The rule.
    pub rule: Rule,
    /// The `retain` scribe it comes from (its clock and id); `None`: the genesis.
    pub from: Option<(u64, ScribeId)>,
}

impl InForce {
    /// The genesis's rule.
    pub fn genesis(rule: Rule) -> InForce {
        InForce { rule, from: None }
    }

    /// Takes `retain`'s rule if it is newer (by clock, then id) than the one in force.
    pub fn replace_if_newer(&mut self, retain: &Scribe, rule: Rule) {
        let key = (retain.body.hlc, retain.id);
        if self.from.is_none_or(|from| key > from) {
            self.rule = rule;
            self.from = Some(key);
        }
    }
}

/// The rule a `retain` scribe sets, checked.
pub fn retain_rule(scribe: &Scribe) -> Result<Rule, AppendError> {
    let retain = pb::Retain::decode(&scribe.body.payload[..])
        .map_err(|error| AppendError::BadRetention(format!("not a quire.v1.Retain: {error}")))?;
    Rule::from_proto(&retain.retention.unwrap_or_default())
        .map_err(|error| AppendError::BadRetention(error.to_string()))
}

/// Most `prune` scribes one append job signs (one commit, one seal).
const PRUNES_PER_JOB: usize = 4096;

/// Payload counts and bytes (bytes as the envelopes state them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Count {
    /// Payloads.
    pub payloads: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Count {
    fn add(&mut self, bytes: u64) {
        self.payloads += 1;
        self.bytes += bytes;
    }
}

/// What a stream's payloads are on this node, and what its rule lets go now.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// The stream.
    pub stream: StreamId,
    /// The rule in force.
    pub in_force: InForce,
    /// Payloads held (not pruned, not redacted).
    pub live: Count,
    /// Of those, what the rule lets go now.
    pub reclaimable: Count,
    /// Payloads pruned and redacted.
    pub pruned: Count,
    /// Payloads redacted.
    pub redacted: Count,
    /// Whether this node holds the owner's key.
    pub owner_here: bool,
    /// The scribes to prune.
    pub targets: Vec<Target>,
    /// Prune scribes signed by [`Log::prune`] (none for a plan).
    pub pruned_now: Count,
}

impl Plan {
    /// The counts once `pruned_now` has gone (what a prune leaves).
    fn after_pruning(&mut self) {
        let gone = self.pruned_now;
        self.live.payloads -= gone.payloads;
        self.live.bytes -= gone.bytes;
        self.reclaimable.payloads -= gone.payloads;
        self.reclaimable.bytes -= gone.bytes;
        self.pruned.payloads += gone.payloads;
        self.pruned.bytes += gone.bytes;
    }
}

/// A scribe the rule lets go.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The scribe.
    pub id: ScribeId,
    /// Which part of the rule (the prune's `reason`).
    pub reason: &'static str,
    /// Its payload bytes.
    pub bytes: u64,
    /// For a kv write, what its key's state still needs of it (the prune carries it).
    pub kv: Option<pb::PrunedKvWrite>,
}

/// A version of a path, or a record: its clock, id and payload bytes.
type Dated = (u64, ScribeId, u64);

/// The writes of a kv key this node knows: each with its payload bytes, and whether it is pruned
/// already (then it counts, value-less, as the kv projector counts it).
type KeyWrites = Vec<(quire_projection_kv::Write, u64, bool)>;

/// The erasures of one scribe in a stream: whether a `redact` names it, and what each `prune` of
/// it states (by prune id) if it is a kv write.
#[derive(Default)]
struct Erased {
    redacted: bool,
    prunes: Vec<(Vec<u8>, quire_projection_kv::Write)>,
}

/// Milliseconds of a hybrid-logical-clock value.
fn millis(hlc: u64) -> u64 {
    hlc >> 16
}

/// Reads a stream and judges its payloads by its rule at the clock `now` (blocking: reads every
/// scribe of the stream once, payloads included; only `file.*` payloads are decoded, for their
/// paths).
pub fn plan(
    store: &Store,
    state: &StreamState,
    node: AuthorKey,
    now: u64,
) -> Result<Plan, StoreError> {
    let rule = state.retention.rule;
    let mut plan = Plan {
        stream: state.id,
        in_force: (*state.retention).clone(),
        owner_here: state.owner == node,
        ..Plan::default()
    };
    let mut paths: HashMap<String, Vec<Dated>> = HashMap::new();
    let mut records: Vec<Dated> = Vec::new();
    let mut keys: HashMap<Vec<u8>, KeyWrites> = HashMap::new();
    // Judged from the stream's `redact` and `prune` scribes as the kv projector judges them (a
    // function of their set: `quire_projection_kv`, "Retention").
    let mut erased: HashMap<ScribeId, Erased> = HashMap::new();
    let mut from = state.record.genesis_seq;
    loop {
        let chunk = store.read_stream(&state.id, from, u64::MAX, 4096, 64 << 20)?;
        for entry in &chunk.entries {
            from = entry.seq + 1;
            let damaged = |error: String| {
                StoreError::Damaged(format!(
                    "stored scribe {} at seq {}: {error}",
                    entry.id, entry.seq
                ))
            };
            let (body, _, payload_len) = decode_stored_envelope(&entry.parts.envelope)
                .map_err(|error| damaged(error.to_string()))?;
            if let Some(justification) = &entry.parts.redacted_by {
                match justification_kind(justification) {
                    Some(Kind::Prune) => plan.pruned.add(payload_len),
                    _ => plan.redacted.add(payload_len),
                }
                continue;
            }
            if payload_len > 0 {
                plan.live.add(payload_len);
            }
            if state
                .membership
                .excludes(
                    &body.author,
                    body.hlc,
                    &body.membership.into_iter().collect::<Vec<_>>(),
                )
                .unwrap_or(false)
            {
                // Not in any projection (its author was revoked): neither counted as a newer
                // version nor pruned (a dropped revoke may bring it back).
                continue;
            }
            let dated = (body.hlc, entry.id, payload_len);
            match body.kind {
                Kind::FilePut | Kind::FileDelete if rule.keep_versions > 0 => {
                    let change =
                        FileChange::decode(&body.kind, &entry.parts.payload).map_err(damaged)?;
                    if let Some(change) = change {
                        paths
                            .entry(change.path().to_string())
                            .or_default()
                            .push(dated);
                    }
                }
                Kind::RecordAdd | Kind::RecordUpvote if rule.max_age_ms > 0 => records.push(dated),
                Kind::KvSet | Kind::KvDelete if rule.keep_versions > 0 => {
                    let write = quire_projection_kv::decode_write(&body.kind, &entry.parts.payload)
                        .map_err(damaged)?;
                    if let Some(write) = write {
                        let whole = quire_projection_kv::Write {
                            hlc: body.hlc,
                            author: body.author,
                            id: entry.id,
                            value: write.value,
                            replaces: write.replaces,
                            pruned_set: false,
                        };
                        keys.entry(write.key)
                            .or_default()
                            .push((whole, payload_len, false));
                    }
                }
                Kind::Redact if rule.keep_versions > 0 => {
                    let target = pb::Redact::decode(&entry.parts.payload[..])
                        .ok()
                        .and_then(|redact| ScribeId::from_slice(&redact.target).ok());
                    if let Some(target) = target {
                        erased.entry(target).or_default().redacted = true;
                    }
                }
                Kind::Prune if rule.keep_versions > 0 => {
                    if let Ok(Some(pruned)) =
                        quire_projection_kv::decode_pruned(&body.kind, &entry.parts.payload)
                    {
                        erased.entry(pruned.1.id).or_default().prunes.push(pruned);
                    }
                }
                _ => {}
            }
        }
        if !chunk.more {
            break;
        }
    }
    // A pruned kv write counts, value-less, where no `redact` names it and its prunes agree.
    for (_, erasure) in erased {
        let Some((first, rest)) = erasure.prunes.split_first() else {
            continue;
        };
        if !erasure.redacted && rest.iter().all(|other| other == first) {
            let (key, write) = first.clone();
            keys.entry(key).or_default().push((write, 0, true));
        }
    }
    let now = millis(now);
    let keep = rule.keep_versions as usize;
    for versions in paths.values_mut() {
        if versions.len() <= keep {
            continue;
        }
        // Newest first, as the files projection orders them: (clock, id).
        versions.sort_unstable_by_key(|&(hlc, id, _)| std::cmp::Reverse((hlc, id)));
        for (index, &(_, id, bytes)) in versions.iter().enumerate().skip(keep) {
            // The version that pushed this one out of the newest `keep`.
            let superseded_at = millis(versions[index - keep].0);
            if now.saturating_sub(superseded_at) >= rule.min_lag_ms {
                plan.add_target(id, "retention: newest versions per file path", bytes, None);
            }
        }
    }
    for (hlc, id, bytes) in records {
        if now.saturating_sub(millis(hlc)) >= rule.max_age_ms {
            plan.add_target(id, "retention: records past their age", bytes, None);
        }
    }
    for (key, known) in keys {
        let (mut writes, rest): (Vec<_>, Vec<_>) = known
            .into_iter()
            .map(|(write, bytes, pruned)| (write, (bytes, pruned)))
            .unzip();
        // Sorted by the fold: `rest` follows the same order.
        let mut order: Vec<usize> = (0..writes.len()).collect();
        order.sort_by_key(|&index| {
            let write = &writes[index];
            (write.hlc, write.author, write.id)
        });
        let rest: Vec<_> = order.iter().map(|&index| rest[index]).collect();
        let superseded = quire_projection_kv::superseded(&mut writes, &state.policy, keep);
        for (index, pushed_at) in superseded {
            let (bytes, pruned) = rest[index];
            if pruned || now.saturating_sub(millis(pushed_at)) < rule.min_lag_ms {
                continue;
            }
            let write = &writes[index];
            let kv = pb::PrunedKvWrite {
                key: bytes::Bytes::copy_from_slice(&key),
                replaces: match write.replaces == ScribeId::default() {
                    true => bytes::Bytes::new(),
                    false => bytes::Bytes::copy_from_slice(write.replaces.as_bytes()),
                },
                deleted: !write.sets(),
                author: bytes::Bytes::copy_from_slice(&write.author.0),
                hlc: write.hlc,
            };
            plan.add_target(
                write.id,
                "retention: newest versions per kv key",
                bytes,
                Some(kv),
            );
        }
    }
    Ok(plan)
}

impl Plan {
    fn add_target(
        &mut self,
        id: ScribeId,
        reason: &'static str,
        bytes: u64,
        kv: Option<pb::PrunedKvWrite>,
    ) {
        self.reclaimable.add(bytes);
        self.targets.push(Target {
            id,
            reason,
            bytes,
            kv,
        });
    }
}

/// The kind of a justification (`redact` or `prune`), if it decodes.
fn justification_kind(justification: &bytes::Bytes) -> Option<Kind> {
    let sealed = pb::SealedScribe::decode(justification.clone()).ok()?;
    let (body, ..) = decode_stored_envelope(&sealed.envelope).ok()?;
    Some(body.kind)
}

impl Log {
    /// Judges `stream`'s payloads by its retention rule now ([`plan`]); `None` if not held.
    pub async fn prune_plan(&self, stream: &StreamId) -> Result<Option<Plan>, StoreError> {
        let Some(state) = self.stream(stream) else {
            return Ok(None);
        };
        let log = self.clone();
        let now = self.clock().now();
        tokio::task::spawn_blocking(move || {
            plan(log.store(), &state, log.node_key(), now).map(Some)
        })
        .await
        .unwrap_or_else(|error| Err(StoreError::Damaged(format!("prune plan task: {error}"))))
    }

    /// Applies `stream`'s retention rule now: where this node holds the owner's key, signs a
    /// `prune` scribe for every payload the rule lets go (in jobs of [`PRUNES_PER_JOB`]).
    /// `wait`: answers once their bytes have left the disk. The plan says what was pruned
    /// (`pruned_now`), and what is live, reclaimable and pruned after it (not counting the prune
    /// scribes' own small payloads).
    pub async fn prune(&self, stream: &StreamId, wait: bool) -> Result<Option<Plan>, AppendError> {
        let Some(mut plan) = self.prune_plan(stream).await? else {
            return Ok(None);
        };
        if !plan.owner_here || plan.targets.is_empty() {
            return Ok(Some(plan));
        }
        let targets = std::mem::take(&mut plan.targets);
        let run = PruneRun::begin(self, *stream);
        for job in targets.chunks(PRUNES_PER_JOB) {
            // A `retain` committed since the plan: its rule decides, at the next pass.
            match self.stream(stream) {
                Some(state) if *state.retention == plan.in_force => {}
                Some(_) => break,
                None => return Ok(None),
            }
            let drafts = job
                .iter()
                .map(|target| {
                    Draft::New(NewScribe {
                        stream: Some(*stream),
                        kind: Kind::Prune,
                        content_type: PRUNE_CONTENT_TYPE.into(),
                        payload: pb::Redact {
                            target: bytes::Bytes::copy_from_slice(target.id.as_bytes()),
                            reason: target.reason.into(),
                            kv: target.kv.clone(),
                        }
                        .encode_to_vec()
                        .into(),
                        // The `retain` scribe whose rule this is, if not the genesis's: the
                        // committer refuses the prune if the rule changed since the plan.
                        parents: std::iter::once(target.id)
                            .chain(plan.in_force.from.map(|(_, id)| id))
                            .collect(),
                    })
                })
                .collect();
            match self.append(drafts, Origin::Local).await {
                Ok(_) => {
                    for target in job {
                        plan.pruned_now.add(target.bytes);
                    }
                }
                Err(error) => match error.root() {
                    // Redacted meanwhile (or pruned by a concurrent pass): the next pass plans
                    // again without it.
                    AppendError::AlreadyRedacted(_) | AppendError::RuleChanged(_) => break,
                    // Left meanwhile: not held any more, nothing to say of it.
                    AppendError::Leaving(_) | AppendError::UnknownStream(_) => return Ok(None),
                    _ => return Err(error),
                },
            }
        }
        drop(run);
        plan.after_pruning();
        if wait {
            self.wait_purged(self.redactions_committed()).await;
        }
        Ok(Some(plan))
    }
}

/// A prune run under way on a stream: while one is, the stream's projection copies hold their
/// rebuild (each commit of prunes would otherwise start it over), and build it once when the run
/// ends (the rebuild itself is recorded when the first prune is met, so a crash mid-run still
/// rebuilds at the next start).
struct PruneRun {
    log: Log,
    stream: StreamId,
}

impl PruneRun {
    fn begin(log: &Log, stream: StreamId) -> PruneRun {
        *lock(&log.shared.prune_runs).entry(stream).or_insert(0) += 1;
        PruneRun {
            log: log.clone(),
            stream,
        }
    }
}

impl Drop for PruneRun {
    fn drop(&mut self) {
        {
            let mut runs = lock(&self.log.shared.prune_runs);
            if let Some(count) = runs.get_mut(&self.stream) {
                *count -= 1;
                if *count == 0 {
                    runs.remove(&self.stream);
                }
            }
        }
        // Wake the stream's projection slots: the rebuild they held can go on.
        self.log.poke_stream_head(&self.stream);
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Log {
    /// Whether a prune run is under way on `stream` (its projection copies hold their rebuild).
    pub fn pruning(&self, stream: &StreamId) -> bool {
        lock(&self.shared.prune_runs).contains_key(stream)
    }
}

/// Prunes, every `every`, each stream this node owns whose rule lets something go (the
/// background half of retention; `quire prune` is the on-demand one). Ends when the log closes.
/// A stream whose rule has no time in it (no age, no lag) is read again only once it changed.
pub async fn prune_loop(log: Log, every: std::time::Duration) {
    let mut closing = log.watch_closing();
    // Per stream: its head and rule when a pass left nothing to prune.
    let mut settled: HashMap<StreamId, (u64, InForce)> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = closing.changed() => return,
        }
        if *closing.borrow() {
            return;
        }
        let node = log.node_key();
        for state in log.streams() {
            if state.owner != node || state.retention.rule.keeps_all() {
                continue;
            }
            let rule = state.retention.rule;
            let key = (state.record.head_seq, (*state.retention).clone());
            if rule.max_age_ms == 0 && rule.min_lag_ms == 0 && settled.get(&state.id) == Some(&key)
            {
                continue;
            }
            settled.remove(&state.id);
            match log.prune(&state.id, false).await {
                Ok(Some(plan)) if plan.pruned_now.payloads > 0 => tracing::info!(
                    stream = %state.id,
                    pruned = plan.pruned_now.payloads,
                    rule = %plan.in_force.rule,
                    "retention: pruned payloads"
                ),
                Ok(Some(_)) => {
                    settled.insert(state.id, key);
                }
                Ok(None) => {}
                Err(AppendError::ShuttingDown) => return,
                Err(error) => tracing::warn!(stream = %state.id, %error, "retention: prune failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kv projector reads a `prune` with its own mirror of `quire.v1.Redact`: the two agree.
    #[test]
    fn the_kv_projector_reads_the_prune_this_node_writes() {
        let payload = pb::Redact {
            target: bytes::Bytes::from(vec![7; 32]),
            reason: "retention: newest versions per kv key".into(),
            kv: Some(pb::PrunedKvWrite {
                key: bytes::Bytes::from_static(b"k"),
                replaces: bytes::Bytes::from(vec![5; 32]),
                deleted: false,
                author: bytes::Bytes::from(vec![9; 32]),
                hlc: 42 << 16,
            }),
        }
        .encode_to_vec();
        let (key, write) = quire_projection_kv::decode_pruned(&Kind::Prune, &payload)
            .unwrap()
            .unwrap();
        assert_eq!(key, b"k");
        assert_eq!(
            write,
            quire_projection_kv::Write {
                hlc: 42 << 16,
                author: AuthorKey([9; 32]),
                id: ScribeId([7; 32]),
                value: None,
                replaces: ScribeId([5; 32]),
                pruned_set: true,
            }
        );
        let deleted = pb::Redact {
            target: bytes::Bytes::from(vec![7; 32]),
            reason: String::new(),
            kv: Some(pb::PrunedKvWrite {
                key: bytes::Bytes::from_static(b"k"),
                replaces: bytes::Bytes::new(),
                deleted: true,
                author: bytes::Bytes::from(vec![9; 32]),
                hlc: 1,
            }),
        }
        .encode_to_vec();
        let (_, write) = quire_projection_kv::decode_pruned(&Kind::Prune, &deleted)
            .unwrap()
            .unwrap();
        assert!(!write.sets() && write.replaces == ScribeId::default());
        // A prune of a file carries no `kv`; a redact is not read at all.
        let file = pb::Redact {
            target: bytes::Bytes::from(vec![7; 32]),
            reason: String::new(),
            kv: None,
        }
        .encode_to_vec();
        assert_eq!(
            quire_projection_kv::decode_pruned(&Kind::Prune, &file),
            Ok(None)
        );
        assert_eq!(
            quire_projection_kv::decode_pruned(&Kind::Redact, &payload),
            Ok(None)
        );
    }
}
