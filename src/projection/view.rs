//! Stored scribes as projectors see them.

use quire_projection_api::Scribe as View;

use super::ProjectionsError;
use crate::log::store::StoredEntry;
use crate::scribe::Scribe;

/// The projector's view of a stored scribe. Stored scribes were verified when they were admitted,
/// so the signature is not checked again here.
pub(crate) fn to_view(entry: &StoredEntry) -> Result<View, ProjectionsError> {
    let (scribe, _signature) = Scribe::decode_unverified(entry.bytes.clone()).map_err(|error| {
        ProjectionsError::Damaged(format!("stored scribe at seq {}: {error}", entry.seq))
    })?;
    let stream = scribe.stream_id();
    let body = scribe.body;
    Ok(View {
        id: entry.id,
        stream,
        author: body.author,
        hlc: body.hlc,
        kind: body.kind,
        content_type: body.content_type,
        payload: body.payload.to_vec(),
        parents: body.parents,
        local_seq: entry.seq,
    })
}
