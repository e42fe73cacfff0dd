//! The signer stage of the append pipeline: the `quire-signer` thread.
//!
//! It drains every job waiting on the submit queue (up to [`MAX_GROUP_DRAFTS`] drafts), gives each
//! node-signed draft the next value of the node's hybrid logical clock in arrival order, then signs
//! those drafts and decodes and verifies client-signed ones in parallel on every core (rayon), and
//! hands the group to the committer as [`PreparedJob`]s. Signing is the expensive part of an
//! append, so it never runs on the commit path.
//!
//! What does not live here: checks against stored state (duplicates, streams, policies, parents,
//! payload rules) are the committer's, in [`super::rules`]; nothing here reads or writes the store.

use bytes::Bytes;
use quire_projection_api::{Kind, ScribeId, StreamId};
use rayon::prelude::*;
use tokio::sync::mpsc;

use super::store::CursorUpdate;
use super::{AppendError, Draft, Job, Origin, Reply, Shared};
use crate::identity;
use crate::scribe::{Body, Scribe};

/// Most drafts the signer gathers into one group.
const MAX_GROUP_DRAFTS: usize = 8192;

/// A job whose drafts are signed or verified: what the signer hands the committer.
pub(super) struct PreparedJob {
    /// Each scribe, and whether the node signed it just now (so it cannot be stored already).
    pub(super) scribes: Vec<(Result<Scribe, AppendError>, bool)>,
    pub(super) origin: Origin,
    pub(super) cursor: Option<CursorUpdate>,
    pub(super) expect_stream: Option<StreamId>,
    pub(super) reply: Reply,
}

/// The signer thread's body: runs until the submit queue closes (the log is closing) or the
/// committer is gone.
pub(super) fn signer_loop(
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

/// The parallel work of one draft.
enum Prepared {
    /// A body to sign, with the work bits its stream asks of a `record.add`.
    Sign(Body, u32),
    /// Client-signed bytes to decode and verify, with the id the client claims.
    Verify(Bytes, Option<ScribeId>),
}
