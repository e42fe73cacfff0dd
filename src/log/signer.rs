//! The signer stage of the append pipeline: the `quire-signer` thread.
//!
//! It drains every job waiting on the submit queue (up to [`MAX_GROUP_DRAFTS`] drafts), gives each
//! node-signed draft the next value of the node's hybrid logical clock in arrival order (a
//! `record.add` whose stream asks for a work token came with its envelope made and its clock read
//! when its search began, in `work`), makes their envelopes and decodes client-sealed ones in
//! parallel on every core (rayon), seals every
//! node-signed envelope of the group with one signature over their Merkle root, verifies each
//! distinct client seal once, and hands the group to the committer as [`PreparedJob`]s. Nothing of
//! this runs on the commit path.
//!
//! The payload rules (a `_schema`'s parse, a `kv.*` payload's decode, a file path's shape) depend
//! on the scribe alone: they run here too, in parallel, and the committer takes their verdict.
//!
//! What does not live here: checks against stored state (duplicates, streams, policies, parents)
//! are the committer's, in [`super::rules`]; nothing here reads or writes the store.

use std::collections::HashMap;
use std::sync::Arc;

use quire_projection_api::{ScribeId, StreamId};
use rayon::prelude::*;
use tokio::sync::mpsc;

use super::rules::{self, PayloadChecks};
use super::store::CursorUpdate;
use super::{AppendError, Draft, Job, NewScribe, Origin, Reply, Shared};
use crate::identity;
use crate::scribe::{
    hash, merkle, seal_all, Body, Leaves, Parts, Scribe, ScribeError, Seal, Unsealed,
};

/// Most drafts the signer gathers into one group.
const MAX_GROUP_DRAFTS: usize = 8192;

/// A job whose drafts are signed or verified: what the signer hands the committer.
pub(super) struct PreparedJob {
    /// Each scribe, whether the node signed it just now (so it cannot be stored already), and the
    /// payload rules' verdict on it.
    pub(super) scribes: Vec<Checked>,
    pub(super) origin: Origin,
    pub(super) peer_seqs: Vec<u64>,
    pub(super) release: Option<super::store::HeldKey>,
    pub(super) keep_refused: bool,
    pub(super) cursor: Option<CursorUpdate>,
    pub(super) expect_stream: Option<StreamId>,
    pub(super) reply: Reply,
}

/// A scribe as the signer hands it on: the scribe (or why it is refused), whether the node signed it
/// just now, and the payload rules' verdict on it.
pub(super) type Checked = (Result<Scribe, AppendError>, bool, Result<(), AppendError>);

/// The signer thread's body: runs until the submit queue closes (the log is closing) or the
/// committer is gone.
pub(super) fn signer_loop(
    shared: &Shared,
    checks: &PayloadChecks,
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
                    // A work token is never searched for here (see `work`): a draft that needs
                    // one and comes without is refused by the committer.
                    Draft::New(new) => Prepared::Sign(body(shared, author, new)),
                    Draft::Worked(worked) => Prepared::Sealable(worked.0),
                    Draft::Signed { parts, claimed_id } => Prepared::Verify(parts, claimed_id),
                };
                work.push((job_index, draft_index, prepared));
            }
        }
        let results = prepare(shared, checks, work);
        let mut per_job: Vec<Vec<Checked>> = jobs
            .iter()
            .map(|job| Vec::with_capacity(job.drafts.len()))
            .collect();
        for (job_index, checked) in results {
            per_job[job_index].push(checked);
        }
        let group: Vec<PreparedJob> = jobs
            .into_iter()
            .zip(per_job)
            .map(|(job, scribes)| PreparedJob {
                scribes,
                origin: job.origin,
                peer_seqs: job.peer_seqs,
                release: job.release,
                keep_refused: job.keep_refused,
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

/// The body the node signs for `new`, carrying the next value of the node's clock. Its view of
/// the stream's membership is a head under which the node holds the most (the newest such head by
/// id order when several tie); a membership scribe also lists every membership head as a parent,
/// merging concurrent branches.
pub(super) fn body(
    shared: &Shared,
    author: quire_projection_api::AuthorKey,
    new: NewScribe,
) -> Body {
    let mut parents = new.parents;
    let mut membership = None;
    let held = new.stream.and_then(|stream| {
        shared
            .streams
            .read()
            .expect("streams lock")
            .get(&stream)
            .map(|state| state.membership.clone())
    });
    if let Some(held) = held.filter(|held| !held.is_empty()) {
        membership = held.view_for(&author);
        if new.kind.is_membership() {
            for head in held.heads() {
                if !parents.contains(&head) {
                    parents.push(head);
                }
            }
        }
    }
    Body {
        stream: new.stream,
        author,
        hlc: shared.clock.now(),
        kind: new.kind,
        content_type: new.content_type,
        payload: new.payload,
        parents,
        membership,
        nonce: 0,
    }
}

/// The parallel work of one draft.
enum Prepared {
    /// A body to seal.
    Sign(Body),
    /// An envelope to seal, its work token found already.
    Sealable(Unsealed),
    /// A client-sealed scribe to decode and verify, with the id the client claims.
    Verify(Parts, Option<ScribeId>),
}

/// A draft once its envelope is made (node-signed) or decoded (client-sealed), before sealing or
/// seal verification.
enum Stage {
    Unsealed(Unsealed),
    /// Its envelope was taken to be sealed with the group's others (in order).
    Sealed,
    Decoded(Result<Scribe, AppendError>),
}

/// Signs and verifies one group's drafts: envelopes are made and client scribes decoded in
/// parallel; then every node-signed envelope of the group is sealed with *one* signature, and every
/// distinct client seal is verified once, in parallel; then the payload rules judge each scribe,
/// in parallel. Answers `(job index, checked)` in draft order.
fn prepare(
    shared: &Shared,
    checks: &PayloadChecks,
    work: Vec<(usize, usize, Prepared)>,
) -> Vec<(usize, Checked)> {
    let mut staged: Vec<(usize, Stage)> = work
        .into_par_iter()
        .map(|(job_index, _draft_index, prepared)| {
            let stage = match prepared {
                Prepared::Sign(body) => Stage::Unsealed(body.into_unsealed(0)),
                Prepared::Sealable(unsealed) => Stage::Unsealed(unsealed),
                Prepared::Verify(parts, claimed) => Stage::Decoded(decode(parts, claimed)),
            };
            (job_index, stage)
        })
        .collect();
    let mut unsealed = Vec::new();
    for (_, stage) in &mut staged {
        if matches!(stage, Stage::Unsealed(_)) {
            if let Stage::Unsealed(envelope) = std::mem::replace(stage, Stage::Sealed) {
                unsealed.push(envelope);
            }
        }
    }
    let mut sealed = seal_all(unsealed, &shared.key).into_iter();
    // Each distinct seal once: its signature and, when its leaves came with it, that they are the
    // list it seals.
    let mut seals: HashMap<[u8; 32], (Arc<Seal>, Option<Leaves>)> = HashMap::new();
    for (_, stage) in &staged {
        if let Stage::Decoded(Ok(scribe)) = stage {
            let entry = seals
                .entry(scribe.seal.id)
                .or_insert_with(|| (scribe.seal.clone(), None));
            if entry.1.is_none() {
                entry.1 = scribe.leaves.clone();
            }
        }
    }
    let refused: HashMap<[u8; 32], ScribeError> = seals
        .into_par_iter()
        .filter_map(|(id, (seal, leaves))| {
            check_seal(&seal, leaves.as_deref())
                .err()
                .map(|error| (id, error))
        })
        .collect();
    let scribes: Vec<(usize, Result<Scribe, AppendError>, bool)> = staged
        .into_iter()
        .map(|(job_index, stage)| match stage {
            Stage::Unsealed(_) | Stage::Sealed => {
                (job_index, Ok(sealed.next().expect("sealed in order")), true)
            }
            Stage::Decoded(Ok(scribe)) => match refused.get(&scribe.seal.id) {
                Some(error) => (job_index, Err(AppendError::from(error.clone())), false),
                None => (job_index, Ok(scribe), false),
            },
            Stage::Decoded(Err(error)) => (job_index, Err(error), false),
        })
        .collect();
    scribes
        .into_par_iter()
        .map(|(job_index, scribe, fresh)| {
            let payload = match &scribe {
                Ok(scribe) => {
                    rules::check_payload(checks, &scribe.body, scribe.redacted_by.is_some())
                }
                Err(_) => Ok(()),
            };
            (job_index, (scribe, fresh, payload))
        })
        .collect()
}

/// A seal's signature, and that `leaves` (if any) hash to its root.
fn check_seal(seal: &Seal, leaves: Option<&[ScribeId]>) -> Result<(), ScribeError> {
    seal.verify()?;
    match leaves {
        Some(leaves) if leaves.is_empty() || merkle::root(leaves) != seal.root => Err(
            ScribeError::Malformed("the seal's leaves do not hash to its root".into()),
        ),
        _ => Ok(()),
    }
}

/// Decodes a client-sealed scribe, all but its seal's signature.
fn decode(parts: Parts, claimed: Option<ScribeId>) -> Result<Scribe, AppendError> {
    if let Some(claimed) = claimed {
        let actual = hash(&parts.envelope);
        if actual != claimed {
            return Err(ScribeError::BadHash { claimed, actual }.into());
        }
    }
    Ok(Scribe::decode_unverified(parts, None)?)
}
