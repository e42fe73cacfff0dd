//! The admission rules: where the log decides whether a scribe may be stored. Every refusal of a
//! well-formed, correctly signed scribe comes from here.
//!
//! [`admit`] takes one scribe of a job, on the committer thread, and checks it in named steps
//! against the store, the group being committed and the job so far: the batch's stream (replicated
//! batches), duplicates (idempotence), the genesis or the stream it belongs to, the author against
//! the stream's policy, the size limits, the payload rules, the work token, the clock (a scribe
//! dated too far ahead is held: `log::held`) and the parents. It
//! answers a [`Verdict`] and changes nothing; recording an admitted scribe is the committer's.
//!
//! The payload rules are not the log's own: [`PayloadChecks`] holds the [`PayloadCheck`]s that
//! whoever opens the log hands in ([`super::LogOptions::payload_checks`]; a node hands in one
//! fixed set, `node::payload_checks`, so every node applies the same rules). The log depends on
//! no projector crate.
//!
//! What does not live here: decoding and verifying signatures (the signer, [`super::signer`]),
//! assigning seqs and writing (the committer, [`super::committer`]).

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message as _;
use quire_projection_api::{
    AuthorKey, Candidate, Kind, PayloadCheck, PayloadError, ScribeId, StreamId,
};

use super::held;
use super::store::{HeldKey, NewEntry, Redaction, StoreError, StreamRecord, Usage, UsageKey};
use super::{AcceptStreams, AppendError, Appended, Origin, Shared, StreamState};
use crate::genesis::genesis_from_payload;
use crate::membership::{Change, Membership, MembershipError, Op, Role};
use crate::pb;
use crate::scribe::{decode_envelope, leading_zero_bits, Body, Parts, Scribe};

/// The version of the rules this build judges scribes by: bumped whenever a scribe one version
/// stores could be refused by the other. Peers tell each other theirs (see `log::held`: what this
/// node's rules refuse of a peer with other rules is kept aside, not counted against it).
///
/// - 1: the rules of format 2.
/// - 2: a `kv.*` payload must decode (`quire_projection_kv::KvCheck`), and a `_schema` is at most
///   64 KiB (`quire_projection_sql::admission::MAX_SCHEMA_BYTES`).
/// - 3: stream membership (`acl.grant`, `acl.revoke`, the envelope's `membership` view, policy
///   `writers`, private streams; `crate::membership`).
/// - 4: policy `defaults_version` (1: `x.*` owner-only in a public stream) and prefix rules
///   (`x.*`, `x.chat.*`, `record.*`).
/// - 5: `redact` scribes, and redacted scribes (an envelope without its payload, justified by
///   the `redact` scribe it carries).
/// - 6: retention: the genesis `retention` rule, `retain` and `prune` scribes (the owner's), and
///   scribes pruned by a `prune` scribe they carry (`log::retention`).
/// - 7: a `prune` may target a `kv.*` write, and then carries what the kv fold needs of it
///   (`quire.v1.PrunedKvWrite`, matching the write); no other `redact` or `prune` carries it.
pub const RULES_VERSION: u32 = 7;

/// Whether `error` is a rule's verdict on a well-formed, correctly signed scribe (which another
/// version of the rules may judge otherwise), rather than damage, a wrong batch or a local failure.
pub(crate) fn is_rule_refusal(error: &AppendError) -> bool {
    matches!(
        error,
        AppendError::ParentInOtherStream { .. }
            | AppendError::PermissionDenied { .. }
            | AppendError::PayloadTooLarge { .. }
            | AppendError::StreamFull { .. }
            | AppendError::MissingWork { .. }
            | AppendError::BadPayload { .. }
            | AppendError::BadGenesis(_)
            | AppendError::Membership { .. }
            | AppendError::QuotaExceeded { .. }
            | AppendError::BadMembership { .. }
            | AppendError::BadRedaction { .. }
            | AppendError::BadRetention(_)
            | AppendError::RedactDenied { .. }
    )
}

/// The payload rules a log applies to every scribe but a genesis, local or from a peer, in the
/// order they were added; the first refusal wins. Empty by default: a log checks no payload rule it
/// was not handed. Cheap to clone.
#[derive(Clone, Default)]
pub struct PayloadChecks {
    checks: Vec<Arc<dyn PayloadCheck>>,
}

impl std::fmt::Debug for PayloadChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.checks.iter().map(|check| check.name()))
            .finish()
    }
}

impl PayloadChecks {
    /// No rules.
    pub fn new() -> PayloadChecks {
        PayloadChecks::default()
    }

    /// Adds `check` after the rules already held.
    pub fn with(mut self, check: impl PayloadCheck) -> PayloadChecks {
        self.checks.push(Arc::new(check));
        self
    }

    /// Whether there is no rule at all.
    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    /// Runs every rule on `body`, in order; the first refusal.
    pub fn check(&self, body: &Body) -> Result<(), PayloadError> {
        let candidate =
            Candidate::new(&body.kind, &body.content_type, &body.payload, &body.parents);
        self.checks
            .iter()
            .try_for_each(|check| check.check(&candidate))
    }
}

impl Extend<Arc<dyn PayloadCheck>> for PayloadChecks {
    fn extend<I: IntoIterator<Item = Arc<dyn PayloadCheck>>>(&mut self, checks: I) {
        self.checks.extend(checks);
    }
}

impl FromIterator<Arc<dyn PayloadCheck>> for PayloadChecks {
    fn from_iter<I: IntoIterator<Item = Arc<dyn PayloadCheck>>>(checks: I) -> Self {
        PayloadChecks {
            checks: checks.into_iter().collect(),
        }
    }
}

/// What a job asks of each of its scribes beyond validity.
pub(super) struct JobRules {
    /// Where the job came from (local appends are held to the stream's total size limit).
    pub(super) origin: Origin,
    /// Replicated batches: the stream every scribe must belong to.
    pub(super) expect_stream: Option<StreamId>,
    /// A client's own scribes (not a peer's, not a held one entering the log): a `kv.*` scribe
    /// must not be dated more than [`held::MAX_AHEAD_MS`] before the node's clock.
    pub(super) from_client: bool,
}

/// What [`admit`] reads besides the scribe: the store, what the group has added so far before
/// this job, and what this job has added so far.
pub(super) struct Seen<'a> {
    pub(super) shared: &'a Shared,
    pub(super) group: Added<'a>,
    pub(super) job: Added<'a>,
}

/// What a group (or one job of it) has admitted on top of the store, as admission reads it: the
/// committer keeps it, admission only looks.
#[derive(Clone, Copy)]
pub(super) struct Added<'a> {
    /// Every scribe added: `(seq, stream, hlc)` by id.
    pub(super) ids: &'a HashMap<ScribeId, (u64, StreamId, u64)>,
    /// Every stream touched, with its counters after the additions.
    pub(super) streams: &'a HashMap<StreamId, StreamState>,
    /// Per-author usage of streams with quotas, after the additions.
    pub(super) usage: &'a HashMap<UsageKey, Usage>,
    /// The scribes added, in seq order (a `redact` scribe's target may be one).
    pub(super) entries: &'a [NewEntry],
    /// The redactions added.
    pub(super) redactions: &'a [Redaction],
}

impl Seen<'_> {
    /// `(seq, stream, hlc)` of a scribe added earlier in this job or group (not the store).
    fn added(&self, id: &ScribeId) -> Option<&(u64, StreamId, u64)> {
        self.job.ids.get(id).or_else(|| self.group.ids.get(id))
    }

    /// An author's usage as it stands after what the job and the group added.
    fn usage(&self, key: &UsageKey) -> Result<Usage, AppendError> {
        match self
            .job
            .usage
            .get(key)
            .or_else(|| self.group.usage.get(key))
        {
            Some(usage) => Ok(*usage),
            None => Ok(self.shared.store.usage(key)?),
        }
    }

    /// The stream as it stands after what the job and the group added, if held.
    fn stream(&self, id: &StreamId) -> Option<StreamState> {
        self.job
            .streams
            .get(id)
            .or_else(|| self.group.streams.get(id))
            .cloned()
            .or_else(|| {
                self.shared
                    .streams
                    .read()
                    .expect("streams lock")
                    .get(id)
                    .cloned()
            })
    }
}

/// What [`admit`] decided about a scribe it did not refuse.
pub(super) enum Verdict {
    /// Already stored (or earlier in this group): nothing changes, this is its answer.
    Duplicate(Appended),
    /// New: store it at the seq asked about; this is its stream with the scribe counted in, and
    /// its author's usage with it counted in (streams with quotas).
    New(StreamState, Vec<(UsageKey, Usage)>),
    /// Valid so far, but dated too far ahead of the node's clock: keep it aside under this key
    /// (see `log::held`). Its parents are checked when it enters the log.
    Hold(HeldKey),
}

/// Checks one scribe, to be stored at `seq`, against the store, the group and the job so far.
/// `fresh`: the node signed it just now, so it cannot be stored already.
pub(super) fn admit(
    seen: &Seen<'_>,
    payload: Result<(), AppendError>,
    rules: &JobRules,
    scribe: &Scribe,
    seq: u64,
    fresh: bool,
) -> Result<Verdict, AppendError> {
    check_batch_stream(rules, scribe)?;
    // Idempotence: a scribe already stored (or earlier in this group) changes nothing. A scribe
    // the node has just signed cannot be stored already (its clock value is new), so the lookups
    // are skipped for it: one RocksDB read less per node-signed append.
    if seen
        .shared
        .leaving
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&scribe.stream_id())
    {
        return Err(AppendError::Leaving(scribe.stream_id()));
    }
    if !fresh {
        if let Some(duplicate) = find_duplicate(seen, scribe)? {
            return Ok(Verdict::Duplicate(duplicate));
        }
    }
    if scribe.redacted_by.is_some() && matches!(scribe.body.kind, Kind::StreamCreate) {
        return Err(AppendError::BadRedaction {
            target: scribe.id.to_string(),
            reason: "a genesis cannot be redacted".into(),
        });
    }
    if scribe.body.kind == Kind::StreamCreate {
        let state = genesis_state(scribe, seq)?;
        check_owner_known(seen.shared, scribe, &state)?;
        if let Some(key) = too_early(seen, scribe, fresh) {
            return Ok(Verdict::Hold(key));
        }
        return Ok(Verdict::New(state, Vec::new()));
    }
    let stream = scribe.stream_id();
    let mut state = seen
        .stream(&stream)
        .ok_or(AppendError::UnknownStream(stream))?;
    state.membership = judge_access(&state, scribe)?;
    // A redaction of a scribe not yet redacted is never refused for quota; another one is an
    // ordinary scribe there (and refused outright from a client: it changes nothing).
    let mut quota_exempt = false;
    if scribe.body.kind == Kind::Retain {
        let rule = super::retention::retain_rule(scribe)?;
        Arc::make_mut(&mut state.retention).replace_if_newer(scribe, rule);
    }
    if scribe.body.kind == Kind::Prune && fresh {
        // This node's own prune names the `retain` it applied (none: the genesis's rule), after
        // its target: a rule replaced since the plan decides instead.
        let applied = scribe.body.parents.get(1).copied();
        if applied != state.retention.from.map(|(_, id)| id) {
            return Err(AppendError::RuleChanged(state.id));
        }
    }
    if scribe.body.kind.erases() {
        let target = check_redact(seen, &state, scribe)?;
        let redundant = already_redacted(seen, &target)?;
        if redundant && rules.from_client {
            return Err(AppendError::AlreadyRedacted(target));
        }
        quota_exempt = !redundant;
    }
    if let Some(justification) = &scribe.redacted_by {
        check_justification(&state, scribe, justification)?;
    }
    check_size(&state, scribe, rules.origin)?;
    // The payload rules' verdict, reached by the signer (off this thread, in parallel).
    payload?;
    check_work(&state, scribe)?;
    if rules.from_client && !fresh {
        check_not_backdated(seen, scribe)?;
    }
    if let Some(key) = too_early(seen, scribe, fresh) {
        return Ok(Verdict::Hold(key));
    }
    check_parents(seen, scribe)?;
    // Last: a quota refuses only a scribe that is otherwise valid (a peer's quota refusals are
    // not counted against it, so nothing invalid may hide behind one).
    let usage = check_quota(seen, &state, scribe, quota_exempt)?;
    state.record.head_seq = seq;
    state.record.scribes += 1;
    state.record.bytes += scribe.size();
    Ok(Verdict::New(state, usage))
}

/// Under `--accept-streams known`, a new stream's owner and the signer of its genesis (who chose
/// its policy and first members) are this node or keys allowed with `quire peer allow`. A node's
/// own setting, not a rule on the scribe: a peer is never blamed.
fn check_owner_known(
    shared: &Shared,
    genesis: &Scribe,
    state: &StreamState,
) -> Result<(), AppendError> {
    if shared.accept_streams == AcceptStreams::Any {
        return Ok(());
    }
    for (key, what) in [
        (state.owner, "owner"),
        (genesis.body.author, "signer of the genesis"),
    ] {
        if !shared.knows(&key)? {
            return Err(AppendError::OwnerNotKnown {
                stream: state.id,
                key,
                what,
            });
        }
    }
    Ok(())
}

/// The key to hold the scribe under if it is dated too far ahead of the node's wall clock. A
/// scribe the node signed just now (`fresh`) carries the node's own clock, which is its "now":
/// it runs ahead of the wall clock only if the wall clock was set back, and then peers hold it.
fn too_early(seen: &Seen<'_>, scribe: &Scribe, fresh: bool) -> Option<HeldKey> {
    if fresh {
        return None;
    }
    held::hold_key(scribe.body.hlc, scribe.id, seen.shared.clock.wall_ms())
}

/// A lease is judged by the writers' clocks: a client's `kv.*` write may be at most
/// [`held::MAX_AHEAD_MS`] older than the node's clock (from peers, older writes are normal: they
/// were written during a partition, and the node that took them from their client checked this).
fn check_not_backdated(seen: &Seen<'_>, scribe: &Scribe) -> Result<(), AppendError> {
    if !matches!(scribe.body.kind, Kind::KvSet | Kind::KvDelete) {
        return Ok(());
    }
    let behind_ms = seen
        .shared
        .clock
        .wall_ms()
        .saturating_sub(scribe.body.hlc >> 16);
    if behind_ms > held::MAX_AHEAD_MS {
        return Err(AppendError::Backdated {
            kind: scribe.body.kind.clone(),
            behind_ms,
            limit_ms: held::MAX_AHEAD_MS,
        });
    }
    Ok(())
}

/// A replicated batch of one stream carries scribes of that stream only (a genesis only if it is
/// the stream's own).
fn check_batch_stream(rules: &JobRules, scribe: &Scribe) -> Result<(), AppendError> {
    match rules.expect_stream {
        Some(expected) if scribe.stream_id() != expected => Err(AppendError::WrongStream {
            expected,
            actual: scribe.stream_id(),
        }),
        _ => Ok(()),
    }
}

/// The answer for a scribe already stored or added earlier in the group, if it is one.
fn find_duplicate(seen: &Seen<'_>, scribe: &Scribe) -> Result<Option<Appended>, AppendError> {
    if let Some((seq, _, hlc)) = seen.added(&scribe.id) {
        return Ok(Some(Appended {
            id: scribe.id,
            seq: *seq,
            duplicate: true,
            hlc: *hlc,
            held: false,
        }));
    }
    match seen.shared.store.seq_and_redacted(&scribe.id)? {
        // Its payload was redacted here: offering it again is refused, whoever does.
        Some((_, true)) if scribe.redacted_by.is_none() => Err(AppendError::Redacted(scribe.id)),
        Some((seq, _)) => Ok(Some(Appended {
            id: scribe.id,
            seq,
            duplicate: true,
            hlc: scribe.body.hlc,
            held: false,
        })),
        None => Ok(None),
    }
}

/// Kinds whose payload may be redacted: every kind but a genesis, a membership scribe (a stream's
/// owner, policy and roles must stay readable on every node) and a `redact` scribe (the
/// justification a redacted scribe carries).
pub fn redactable(kind: &Kind) -> bool {
    !kind.is_membership() && !kind.judged_by_log()
}

/// Kinds a `prune` scribe may target: those a retention rule covers.
pub fn prunable(kind: &Kind) -> bool {
    matches!(
        kind,
        Kind::FilePut
            | Kind::FileDelete
            | Kind::RecordAdd
            | Kind::RecordUpvote
            | Kind::KvSet
            | Kind::KvDelete
    )
}

/// A `prune` of a `kv.*` write carries what the kv fold needs of it (`quire.v1.PrunedKvWrite`):
/// its author and clock as `target`'s envelope says, whether it deletes as its kind says, and its
/// key and `replaces` as its payload says where this node holds it (`payload`; a node that never
/// held it trusts the owner's signature). No other `redact` or `prune` carries one.
fn check_pruned_kv(
    redact: &Scribe,
    target: ScribeId,
    body: &Body,
    payload: Option<&[u8]>,
) -> Result<(), AppendError> {
    let bad = |reason: String| AppendError::BadRedaction {
        target: target.to_string(),
        reason,
    };
    let kv_target = matches!(body.kind, Kind::KvSet | Kind::KvDelete);
    let carried = pb::Redact::decode(&redact.body.payload[..])
        .map_err(|error| bad(format!("the payload is not a quire.v1.Redact: {error}")))?
        .kv;
    if redact.body.kind != Kind::Prune || !kv_target {
        return match carried {
            None => Ok(()),
            Some(_) => Err(bad(format!(
                "only a prune of a kv.set or kv.delete carries `kv`, not a {} of a {}",
                redact.body.kind, body.kind
            ))),
        };
    }
    if carried.is_none() {
        return Err(bad(
            "a prune of a kv write must carry `kv`: what the key's state still needs of it".into(),
        ));
    }
    let (key, pruned) = quire_projection_kv::decode_pruned(&redact.body.kind, &redact.body.payload)
        .map_err(|error| bad(format!("its `kv`: {error}")))?
        .ok_or_else(|| bad("its `kv` does not decode".into()))?;
    if pruned.author != body.author || pruned.hlc != body.hlc {
        return Err(bad(format!(
            "its `kv` names author {} at clock {}, the write's envelope {} at {}",
            pruned.author, pruned.hlc, body.author, body.hlc
        )));
    }
    if pruned.pruned_set != (body.kind == Kind::KvSet) {
        return Err(bad(format!(
            "its `kv` says deleted = {}, the write is a {}",
            !pruned.pruned_set, body.kind
        )));
    }
    if let Some(payload) = payload {
        let write = quire_projection_kv::decode_write(&body.kind, payload)
            .map_err(|error| bad(format!("the write's payload: {error}")))?;
        if write.is_none_or(|write| write.key != key || write.replaces != pruned.replaces) {
            return Err(bad(
                "its `kv` names another key or replaced write than the write's payload".into(),
            ));
        }
    }
    Ok(())
}

/// The most bytes of a `redact` scribe's reason.
pub const MAX_REDACT_REASON_BYTES: usize = 1024;

/// The target a `redact` scribe names, checked: its payload decodes, the reason is short, and the
/// target is one of its parents (so it is stored first, in the same stream).
pub fn redact_target(scribe: &Scribe) -> Result<ScribeId, AppendError> {
    let bad = |reason: String| AppendError::BadRedaction {
        target: "?".into(),
        reason,
    };
    let redact = pb::Redact::decode(&scribe.body.payload[..])
        .map_err(|error| bad(format!("the payload is not a quire.v1.Redact: {error}")))?;
    let target = ScribeId::from_slice(&redact.target).map_err(|_| {
        bad(format!(
            "target must be 32 bytes, got {}",
            redact.target.len()
        ))
    })?;
    if redact.reason.len() > MAX_REDACT_REASON_BYTES {
        return Err(AppendError::BadRedaction {
            target: target.to_string(),
            reason: format!(
                "the reason has {} bytes; the most is {MAX_REDACT_REASON_BYTES}",
                redact.reason.len()
            ),
        });
    }
    if !scribe.body.parents.contains(&target) {
        return Err(AppendError::BadRedaction {
            target: target.to_string(),
            reason: "the target must be one of the redact scribe's parents".into(),
        });
    }
    Ok(target)
}

/// Who may redact: the target's author or the stream's owner, and only a redactable kind. Who may
/// prune: the stream's owner, and only a kind a retention rule covers.
fn check_redactor(
    state: &StreamState,
    redact: &Scribe,
    target: ScribeId,
    target_author: AuthorKey,
    target_kind: &Kind,
) -> Result<(), AppendError> {
    if !redactable(target_kind) {
        return Err(AppendError::BadRedaction {
            target: target.to_string(),
            reason: format!("a {target_kind} scribe cannot be redacted"),
        });
    }
    if redact.body.kind == Kind::Prune {
        if !prunable(target_kind) {
            return Err(AppendError::BadRedaction {
                target: target.to_string(),
                reason: format!(
                    "a prune targets a file.*, record.* or kv.* scribe (what a retention rule covers), not a {target_kind}"
                ),
            });
        }
        if redact.body.author != state.owner {
            return Err(AppendError::RedactDenied {
                author: redact.body.author,
                target,
                who: format!(
                    "a prune: only the owner {} of stream {}",
                    state.owner, state.id
                ),
            });
        }
    }
    if redact.body.author != target_author && redact.body.author != state.owner {
        return Err(AppendError::RedactDenied {
            author: redact.body.author,
            target,
            who: format!(
                "author {target_author}, owner {} of stream {}",
                state.owner, state.id
            ),
        });
    }
    Ok(())
}

/// A `redact` scribe: its target is stored (or earlier in the group), of its stream, and it may
/// redact it. A target redacted already is no refusal: two nodes may redact the same scribe at
/// once.
fn check_redact(
    seen: &Seen<'_>,
    state: &StreamState,
    scribe: &Scribe,
) -> Result<ScribeId, AppendError> {
    let target = redact_target(scribe)?;
    let pending = seen
        .job
        .entries
        .iter()
        .chain(seen.group.entries)
        .find(|entry| entry.id == target);
    let envelope = match pending {
        Some(entry) => entry.parts.envelope.clone(),
        None => match seen.shared.store.envelope(&target)? {
            Some((_, envelope)) => envelope,
            None => {
                return Err(AppendError::UnknownParent {
                    parent: target,
                    stream: state.id,
                })
            }
        },
    };
    let (body, ..) = decode_envelope(&envelope)
        .map_err(|error| StoreError::Damaged(format!("stored scribe {target}: {error}")))?;
    if body.stream.unwrap_or(target) != state.id {
        return Err(AppendError::ParentInOtherStream {
            parent: target,
            parent_stream: body.stream.unwrap_or(target),
            stream: state.id,
        });
    }
    check_redactor(state, scribe, target, body.author, &body.kind)?;
    if scribe.body.kind == Kind::Prune && matches!(body.kind, Kind::KvSet | Kind::KvDelete) {
        // The write's payload, where this node holds it (a kv payload is small).
        let payload = match pending {
            Some(entry) if entry.parts.redacted_by.is_none() => Some(entry.parts.payload.to_vec()),
            Some(_) => None,
            None => match seen.shared.store.payload(&target)? {
                Some(super::store::StoredPayload::Bytes(bytes)) => Some(bytes),
                _ => None,
            },
        };
        check_pruned_kv(scribe, target, &body, payload.as_deref())?;
    } else {
        check_pruned_kv(scribe, target, &body, None)?;
    }
    Ok(target)
}

/// Whether `target` is redacted in the store, or by a redaction the job or the group added.
fn already_redacted(seen: &Seen<'_>, target: &ScribeId) -> Result<bool, AppendError> {
    let added = |redactions: &[Redaction]| redactions.iter().any(|r| r.target == *target);
    if added(seen.job.redactions) || added(seen.group.redactions) {
        return Ok(true);
    }
    Ok(matches!(
        seen.shared.store.seq_and_redacted(target)?,
        Some((_, true))
    ))
}

/// A redacted scribe carries the `redact` scribe that justifies it: a valid, sealed `redact` of
/// this scribe's stream naming it, by its author or the stream's owner. Checked here in full (its
/// seal too), since the `redact` scribe itself may reach this node only later.
fn check_justification(
    state: &StreamState,
    scribe: &Scribe,
    justification: &bytes::Bytes,
) -> Result<(), AppendError> {
    let bad = |reason: String| AppendError::BadRedaction {
        target: scribe.id.to_string(),
        reason: format!("its justification {reason}"),
    };
    let sealed = pb::SealedScribe::decode(justification.clone())
        .map_err(|error| bad(format!("is not a quire.v1.SealedScribe: {error}")))?;
    if !sealed.redacted_by.is_empty() {
        return Err(bad("is itself redacted".into()));
    }
    let parts = Parts::from_proto(sealed).map_err(|error| bad(error.to_string()))?;
    let redact = Scribe::decode(parts).map_err(|error| bad(format!("is not valid: {error}")))?;
    if !redact.body.kind.erases() || redact.stream_id() != state.id {
        return Err(bad(format!(
            "is a {} scribe of stream {}, not a redact or prune of stream {}",
            redact.body.kind,
            redact.stream_id(),
            state.id
        )));
    }
    let target = redact_target(&redact)?;
    if target != scribe.id {
        return Err(bad(format!("redacts {target}, not this scribe")));
    }
    check_redactor(
        state,
        &redact,
        scribe.id,
        scribe.body.author,
        &scribe.body.kind,
    )?;
    // The scribe arrives without its payload: its envelope is what the `kv` can be checked by.
    check_pruned_kv(&redact, scribe.id, &scribe.body, None)
}

/// Whether the stream lets the scribe's author write it (its policy, and the membership as the
/// author had seen it), and the stream's membership with the scribe counted in (a membership
/// scribe must also be a valid operation). Pure: the same stream state and scribe give the same
/// answer on every node, which is what makes membership converge (`tests/it/simulation.rs`).
pub fn judge_access(state: &StreamState, scribe: &Scribe) -> Result<Arc<Membership>, AppendError> {
    // A redaction is judged by its target's author and the stream's owner (`check_redact`), not
    // by the policy: erasure does not depend on a role. The retention rule is the owner's alone.
    match scribe.body.kind {
        Kind::Redact => return Ok(state.membership.clone()),
        Kind::Retain | Kind::Prune if scribe.body.author == state.owner => {
            return Ok(state.membership.clone())
        }
        Kind::Retain | Kind::Prune => {
            return Err(AppendError::PermissionDenied {
                author: scribe.body.author,
                kind: scribe.body.kind.clone(),
                stream: state.id,
                allowed: format!("the stream's owner ({}) only", state.owner),
            })
        }
        _ => {}
    }
    check_author(state, scribe)?;
    if !scribe.body.kind.is_membership() {
        return Ok(state.membership.clone());
    }
    let op = membership_op(scribe, &state.membership)?;
    let mut membership = (*state.membership).clone();
    membership
        .add(op)
        .map_err(|error| membership_refusal(state, scribe, error))?;
    Ok(Arc::new(membership))
}

/// A genesis starts a stream: its payload must be a valid `StreamGenesis`; the new stream holds it
/// alone, at `seq`.
pub fn genesis_state(scribe: &Scribe, seq: u64) -> Result<StreamState, AppendError> {
    let genesis = genesis_from_payload(&scribe.body.payload, scribe.body.author)
        .map_err(AppendError::BadGenesis)?;
    Ok(StreamState {
        id: scribe.stream_id(),
        name: genesis.name,
        owner: genesis.owner,
        policy: genesis.policy,
        membership: Arc::new(Membership::new(genesis.owner, genesis.members)),
        retention: Arc::new(super::retention::InForce::genesis(genesis.retention)),
        record: StreamRecord {
            genesis_seq: seq,
            head_seq: seq,
            scribes: 1,
            bytes: scribe.size(),
        },
    })
}

/// The membership scribes a scribe links to: its `membership` field and, for a membership
/// scribe, those of its parents that are membership scribes (the heads it merges).
pub(super) fn membership_links(scribe: &Scribe, membership: &Membership) -> Vec<ScribeId> {
    let mut links: Vec<ScribeId> = scribe.body.membership.into_iter().collect();
    if scribe.body.kind.is_membership() {
        links.extend(
            scribe
                .body
                .parents
                .iter()
                .filter(|parent| membership.holds(parent)),
        );
    }
    links
}

/// The membership operation an `acl.*` scribe states.
pub(crate) fn membership_op(scribe: &Scribe, membership: &Membership) -> Result<Op, AppendError> {
    let bad = |reason: String| AppendError::BadMembership {
        kind: scribe.body.kind.clone(),
        reason,
    };
    let key = |bytes: &[u8]| {
        AuthorKey::from_slice(bytes)
            .map_err(|_| bad(format!("key must be 32 bytes, got {}", bytes.len())))
    };
    let change = match scribe.body.kind {
        Kind::AclGrant => {
            let grant = pb::AclGrant::decode(&scribe.body.payload[..])
                .map_err(|error| bad(format!("not a quire.v1.AclGrant: {error}")))?;
            let role = Role::from_proto(grant.role)
                .ok_or_else(|| bad("role must be reader, writer or admin".to_string()))?;
            Change::Grant(key(&grant.key)?, role)
        }
        Kind::AclRevoke => {
            let revoke = pb::AclRevoke::decode(&scribe.body.payload[..])
                .map_err(|error| bad(format!("not a quire.v1.AclRevoke: {error}")))?;
            Change::Revoke(key(&revoke.key)?)
        }
        _ => return Err(bad("not a membership kind".to_string())),
    };
    Ok(Op {
        id: scribe.id,
        author: scribe.body.author,
        hlc: scribe.body.hlc,
        links: membership_links(scribe, membership),
        change,
    })
}

fn membership_refusal(state: &StreamState, scribe: &Scribe, error: MembershipError) -> AppendError {
    AppendError::Membership {
        stream: state.id,
        kind: scribe.body.kind.clone(),
        author: scribe.body.author,
        error,
    }
}

/// The stream's policy lets the scribe's author write its kind: as a key it names, or as a
/// writer in the membership the scribe's author had seen (its `membership` view).
fn check_author(state: &StreamState, scribe: &Scribe) -> Result<(), AppendError> {
    let allowed = state.policy.authors_for(&scribe.body.kind);
    let links = membership_links(scribe, &state.membership);
    // A view the scribe names must be one the stream holds, whatever the policy; with no view
    // and no `writers` rule there is nothing to look up.
    let role = if links.is_empty() && !allowed.writers {
        None
    } else {
        state
            .membership
            .role_at(&links, &scribe.body.author)
            .map_err(|error| membership_refusal(state, scribe, error))?
    };
    if allowed.contains(&scribe.body.author, &state.owner)
        || (allowed.writers && role >= Some(Role::Writer))
    {
        return Ok(());
    }
    Err(AppendError::PermissionDenied {
        author: scribe.body.author,
        kind: scribe.body.kind.clone(),
        stream: state.id,
        allowed: allowed.to_string(),
    })
}

/// The payload is within the stream's per-scribe limit and, for a local append, the stream stays
/// within its total limit (a peer's scribes are already in the stream elsewhere).
fn check_size(state: &StreamState, scribe: &Scribe, origin: Origin) -> Result<(), AppendError> {
    // The length the envelope names: a redacted scribe is judged as it was with its payload.
    let payload = scribe.payload_len;
    if payload > state.policy.max_file_bytes {
        return Err(AppendError::PayloadTooLarge {
            size: payload,
            limit: state.policy.max_file_bytes,
            stream: state.id,
        });
    }
    let size = scribe.size();
    // A redaction or prune frees room rather than taking it (and at most one per scribe is
    // accepted from a client): a full stream can still be pruned and redacted.
    if origin == Origin::Local
        && !scribe.body.kind.erases()
        && state.record.bytes + size > state.policy.max_stream_bytes
    {
        return Err(AppendError::StreamFull {
            held: state.record.bytes,
            size,
            limit: state.policy.max_stream_bytes,
            stream: state.id,
        });
    }
    Ok(())
}

/// The scribe stays within its author's quotas of the stream (a policy's, on every node: local
/// appends and scribes from peers alike, so one author cannot fill every replica); the owner is
/// exempt. Answers the author's usage with the scribe counted in.
fn check_quota(
    seen: &Seen<'_>,
    state: &StreamState,
    scribe: &Scribe,
    exempt: bool,
) -> Result<Vec<(UsageKey, Usage)>, AppendError> {
    let policy = &state.policy;
    // Membership scribes are exempt: admins change who may write, and a membership that
    // differed between nodes would split every judgement that follows.
    if (policy.author_max_bytes == 0 && policy.author_max_scribes_per_day == 0)
        || scribe.body.author == state.owner
        || scribe.body.kind.is_membership()
    {
        return Ok(Vec::new());
    }
    let size = scribe.size();
    let key = |day| UsageKey {
        stream: state.id,
        author: scribe.body.author,
        day,
    };
    let day = (scribe.body.hlc >> 16) / 86_400_000;
    let total = seen.usage(&key(UsageKey::TOTAL))?;
    let daily = seen.usage(&key(day))?;
    let refuse = |what: String| AppendError::QuotaExceeded {
        author: scribe.body.author,
        stream: state.id,
        what,
    };
    // `exempt`: counted, never refused (erasure must not depend on room left).
    if !exempt && policy.author_max_bytes > 0 && total.bytes + size > policy.author_max_bytes {
        return Err(refuse(format!(
            "its scribes take {} bytes of the stream and this one {size}; the most one author may take is {} (author_max_bytes)",
            total.bytes, policy.author_max_bytes
        )));
    }
    if !exempt
        && policy.author_max_scribes_per_day > 0
        && daily.scribes + 1 > policy.author_max_scribes_per_day
    {
        return Err(refuse(format!(
            "it dated {} scribes on that UTC day already; the most is {} (author_max_scribes_per_day)",
            daily.scribes, policy.author_max_scribes_per_day
        )));
    }
    let add = |usage: Usage| Usage {
        scribes: usage.scribes + 1,
        bytes: usage.bytes + size,
    };
    Ok(vec![
        (key(UsageKey::TOTAL), add(total)),
        (key(day), add(daily)),
    ])
}

/// The payload rules handed to the log (the built-in kinds' and the projectors'), for every scribe
/// but a genesis. They depend on the scribe alone, so the signer runs them, in parallel.
pub(super) fn check_payload(
    checks: &PayloadChecks,
    body: &Body,
    redacted: bool,
) -> Result<(), AppendError> {
    // A redacted scribe has no payload to check: its justification is checked instead.
    if body.kind == Kind::StreamCreate || redacted {
        return Ok(());
    }
    checks
        .check(body)
        .map_err(|reason| AppendError::BadPayload {
            kind: body.kind.clone(),
            reason,
        })
}

/// A `record.add` carries the work token its stream's policy asks for.
fn check_work(state: &StreamState, scribe: &Scribe) -> Result<(), AppendError> {
    if scribe.body.kind != Kind::RecordAdd || state.policy.work_bits == 0 {
        return Ok(());
    }
    let has = leading_zero_bits(scribe.id.as_bytes());
    if has < state.policy.work_bits {
        return Err(AppendError::MissingWork {
            bits: state.policy.work_bits,
            has,
            stream: state.id,
        });
    }
    Ok(())
}

/// Every parent is stored (or earlier in the group), in the scribe's own stream.
fn check_parents(seen: &Seen<'_>, scribe: &Scribe) -> Result<(), AppendError> {
    let stream = scribe.stream_id();
    for parent in &scribe.body.parents {
        let parent_stream = match seen.added(parent) {
            Some((_, parent_stream, _)) => Some(*parent_stream),
            None => stored_stream_of(seen.shared, parent)?,
        };
        match parent_stream {
            Some(parent_stream) if parent_stream == stream => {}
            Some(parent_stream) => {
                return Err(AppendError::ParentInOtherStream {
                    parent: *parent,
                    parent_stream,
                    stream,
                })
            }
            None => {
                return Err(AppendError::UnknownParent {
                    parent: *parent,
                    stream,
                })
            }
        }
    }
    Ok(())
}

/// The stream of a stored scribe, if it is stored.
fn stored_stream_of(shared: &Shared, id: &ScribeId) -> Result<Option<StreamId>, AppendError> {
    let Some((_, envelope)) = shared.store.envelope(id)? else {
        return Ok(None);
    };
    let (body, ..) = decode_envelope(&envelope)
        .map_err(|error| StoreError::Damaged(format!("stored scribe {id}: {error}")))?;
    Ok(Some(body.stream.unwrap_or(*id)))
}
