//! The client API's conversions between protobuf (`crate::pb`) and the domain types it shows
//! (the genesis codec is `crate::genesis`, the peer wire codec `crate::replication::wire`), converting between
//! them (rust-analyzer's `to_proto` / `from_proto` style). Free functions only.

use bytes::Bytes;
use quire_projection_api::{ScribeId, StreamId};

use crate::genesis::policy_to_proto;
use crate::log::store::StoredEntry;
use crate::log::StreamState;
use crate::pb;
use crate::scribe::decode_stored_envelope as decode_envelope;

/// A stream's state as the API shows it.
pub fn stream_info(state: &StreamState) -> pb::StreamInfo {
    pb::StreamInfo {
        stream: Bytes::copy_from_slice(state.id.as_bytes()),
        name: state.name.clone(),
        owner: Bytes::copy_from_slice(state.owner.as_bytes()),
        policy: Some(policy_to_proto(&state.policy)),
        genesis_seq: state.record.genesis_seq,
        head_seq: state.record.head_seq,
        scribes: state.record.scribes,
        bytes: state.record.bytes,
        private: state.policy.private,
        members: crate::genesis::access_to_proto(false, &state.membership.roles()).members,
        membership_heads: state
            .membership
            .heads()
            .iter()
            .map(|head| Bytes::copy_from_slice(head.as_bytes()))
            .collect(),
        retention: Some(state.retention.rule.to_proto()),
    }
}

/// A stream's payloads and retention as the API shows them.
pub fn stream_payloads(plan: &crate::log::retention::Plan) -> pb::StreamPayloads {
    pb::StreamPayloads {
        stream: Bytes::copy_from_slice(plan.stream.as_bytes()),
        retention: Some(plan.in_force.rule.to_proto()),
        retain_id: plan
            .in_force
            .from
            .map(|(_, id)| Bytes::copy_from_slice(id.as_bytes()))
            .unwrap_or_default(),
        live_payloads: plan.live.payloads,
        live_bytes: plan.live.bytes,
        reclaimable_payloads: plan.reclaimable.payloads,
        reclaimable_bytes: plan.reclaimable.bytes,
        pruned_payloads: plan.pruned.payloads,
        pruned_bytes: plan.pruned.bytes,
        redacted_payloads: plan.redacted.payloads,
        redacted_bytes: plan.redacted.bytes,
        owner_here: plan.owner_here,
        pruned_now: plan.pruned_now.payloads,
        pruned_now_bytes: plan.pruned_now.bytes,
    }
}

/// A stored scribe as the API shows it: envelope, payload, seal and proof exactly as stored, plus
/// fields decoded from the envelope.
pub fn entry(stored: StoredEntry) -> pb::Entry {
    let decoded = decode_envelope(&stored.parts.envelope)
        .ok()
        .map(|(body, ..)| body);
    let id = |id: &ScribeId| Bytes::copy_from_slice(id.as_bytes());
    pb::Entry {
        seq: stored.seq,
        id: id(&stored.id),
        stream: decoded
            .as_ref()
            .map(|body| id(&body.stream.unwrap_or(stored.id)))
            .unwrap_or_default(),
        author: decoded
            .as_ref()
            .map(|body| Bytes::copy_from_slice(body.author.as_bytes()))
            .unwrap_or_default(),
        hlc: decoded.as_ref().map_or(0, |body| body.hlc),
        kind: decoded
            .map(|body| body.kind.as_str().to_string())
            .unwrap_or_default(),
        proof: Some(stored.parts.proof.to_proto()),
        envelope: stored.parts.envelope,
        payload: stored.parts.payload,
        redacted_by: stored.parts.redacted_by.unwrap_or_default(),
        seal: stored.parts.seal,
    }
}

/// A request's id field that is not 32 bytes; answered as `InvalidArgument`, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} must be a 32-byte id, got {len} bytes")]
pub struct BadId {
    /// The request field.
    pub field: &'static str,
    /// Its length.
    pub len: usize,
}

impl From<BadId> for tonic::Status {
    fn from(error: BadId) -> tonic::Status {
        tonic::Status::invalid_argument(error.to_string())
    }
}

/// A 32-byte id field of a request, with a message naming the field when it is not one.
pub fn id_field(bytes: &[u8], field: &'static str) -> Result<ScribeId, BadId> {
    ScribeId::from_slice(bytes).map_err(|_| BadId {
        field,
        len: bytes.len(),
    })
}

/// An optional stream field: empty means "every stream".
pub fn optional_stream(bytes: &[u8]) -> Result<Option<StreamId>, BadId> {
    if bytes.is_empty() {
        Ok(None)
    } else {
        id_field(bytes, "stream").map(Some)
    }
}

/// A peer's state as `Admin.Status` shows it.
pub fn peer_status(state: &crate::replication::PeerState) -> pb::PeerStatus {
    pb::PeerStatus {
        addr: state.addr.clone(),
        node_id: state.node.map(|node| node.to_hex()).unwrap_or_default(),
        connected: state.connected,
        dialed: state.dialed,
        connects: state.connects,
        last_error: state.last_error.clone().unwrap_or_default(),
        refused: state.refused,
        rules: state.rules,
        streams: state
            .streams
            .iter()
            .map(|(stream, counters)| pb::PeerStreamStatus {
                stream: Bytes::copy_from_slice(stream.as_bytes()),
                cursor: counters.cursor,
                lag: counters.peer_head.saturating_sub(counters.cursor),
                sent: counters.sent,
                received: counters.received,
                duplicates: counters.duplicates,
                refused: counters.refused,
                caught_up: counters.caught_up,
                held: counters.held,
                redacted_refused: counters.redacted_refused,
            })
            .collect(),
    }
}

fn optional_stream_bytes(stream: Option<&StreamId>) -> Bytes {
    stream
        .map(|s| Bytes::copy_from_slice(s.as_bytes()))
        .unwrap_or_default()
}

/// A projection's or consumer's status.
pub fn projection_status(status: &crate::projection::ProjectionStatus) -> pb::ProjectionStatus {
    pb::ProjectionStatus {
        name: status.name.clone(),
        stream: optional_stream_bytes(status.stream.as_ref()),
        kind: status.kind.to_string(),
        fingerprint: status.fingerprint.clone(),
        generation: status.generation,
        checkpoint: status.checkpoint,
        target: status.target,
        lag: status.lag(),
        quarantined: status.quarantined,
        digest: status
            .digest
            .map(|d| Bytes::copy_from_slice(&d))
            .unwrap_or_default(),
        rebuild: status
            .rebuild
            .as_ref()
            .map(
                |(generation, fingerprint, checkpoint)| pb::RebuildProgress {
                    generation: *generation,
                    fingerprint: fingerprint.clone(),
                    checkpoint: *checkpoint,
                    target: status.target,
                },
            ),
        halted: status
            .halted
            .as_ref()
            .map(|(_, reason)| reason.clone())
            .unwrap_or_default(),
        halted_seq: status.halted.as_ref().map(|(seq, _)| *seq).unwrap_or(0),
        error: status.error.clone().unwrap_or_default(),
    }
}

/// A parked scribe.
pub fn quarantine_entry(parked: &crate::projection::Parked) -> pb::QuarantineEntry {
    pb::QuarantineEntry {
        name: parked.name.clone(),
        stream: optional_stream_bytes(parked.stream.as_ref()),
        seq: parked.seq,
        id: Bytes::copy_from_slice(parked.id.as_bytes()),
        kind: parked.kind.clone(),
        error: parked.error.clone(),
        state: parked.state.clone(),
        at_ms: parked.at_ms,
    }
}
