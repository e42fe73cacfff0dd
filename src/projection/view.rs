//! Stored scribes as projectors see them.

use quire_projection_api::{Scribe as View, ScribeId};

use crate::log::store::StoredEntry;
use crate::scribe::decode_stored_envelope;

/// A stored scribe that does not decode: the store is damaged (it was checked when admitted).
#[derive(Debug, Clone, thiserror::Error)]
#[error("stored scribe at seq {seq}: {reason}")]
pub struct DamagedEntry {
    /// Its local seq.
    pub seq: u64,
    /// What does not decode.
    pub reason: String,
}

/// The projector's view of a stored scribe. Stored scribes were fully checked when they were
/// admitted (seal, payload hash, id, canonical encoding, policy), and the store keys them by id, so
/// this only decodes the envelope: no hashing, no seal check (a rebuild decodes every scribe of the
/// log; see `benches/projection.rs`).
pub(crate) fn to_view(entry: &StoredEntry) -> Result<View, DamagedEntry> {
    Ok(to_view_with_membership(entry)?.0)
}

/// [`to_view`], with the membership scribe the scribe's author had seen (its envelope's
/// `membership` field), which projectors are not shown but exclusions go by.
pub(crate) fn to_view_with_membership(
    entry: &StoredEntry,
) -> Result<(View, Option<ScribeId>), DamagedEntry> {
    let damaged = |reason: String| DamagedEntry {
        seq: entry.seq,
        reason,
    };
    let (body, ..) = decode_stored_envelope(&entry.parts.envelope)
        .map_err(|error| damaged(error.to_string()))?;
    let membership = body.membership;
    let view = View {
        id: entry.id,
        // A genesis names no stream: its stream is itself.
        stream: body.stream.unwrap_or(entry.id),
        author: body.author,
        hlc: body.hlc,
        kind: body.kind,
        content_type: body.content_type,
        payload: entry.parts.payload.to_vec(),
        parents: body.parents,
        local_seq: entry.seq,
    };
    Ok((view, membership))
}
