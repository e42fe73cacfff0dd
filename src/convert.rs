//! The one module that knows both protobuf (`crate::pb`) and domain types, and converts between
//! them (rust-analyzer's `to_proto` / `from_proto` style). Free functions only.

use bytes::Bytes;
use prost::Message;
use quire_projection_api::{AuthorKey, Authors, Kind, Policy, ScribeId, StreamId};

use crate::log::store::StoredEntry;
use crate::log::StreamState;
use crate::pb;
use crate::scribe::{Scribe, HARD_MAX_PAYLOAD_BYTES};

/// Content type of a `stream.create` payload.
pub const GENESIS_CONTENT_TYPE: &str = "application/vnd.quire.genesis+protobuf";

/// What a genesis says, with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Genesis {
    /// Human name.
    pub name: String,
    /// Owner key.
    pub owner: AuthorKey,
    /// Effective policy.
    pub policy: Policy,
}

/// Decodes a `stream.create` payload; `author` is the owner when the payload names none.
pub fn genesis_from_payload(payload: &[u8], author: AuthorKey) -> Result<Genesis, String> {
    let genesis = pb::StreamGenesis::decode(payload)
        .map_err(|error| format!("payload is not a quire.v1.StreamGenesis: {error}"))?;
    let owner = if genesis.owner.is_empty() {
        author
    } else {
        AuthorKey::from_slice(&genesis.owner).map_err(|_| {
            format!(
                "owner must be a 32-byte key, got {} bytes",
                genesis.owner.len()
            )
        })?
    };
    let policy = policy_from_proto(genesis.policy.unwrap_or_default())?;
    if genesis.name.len() > 256 {
        return Err(format!(
            "name is {} bytes, at most 256 allowed",
            genesis.name.len()
        ));
    }
    Ok(Genesis {
        name: genesis.name,
        owner,
        policy,
    })
}

/// Encodes a genesis payload. `salt` makes two streams of the same name and clock differ.
pub fn genesis_payload(
    name: &str,
    owner: Option<AuthorKey>,
    policy: Option<pb::Policy>,
    salt: [u8; 16],
) -> Vec<u8> {
    pb::StreamGenesis {
        name: name.to_string(),
        owner: owner
            .map(|key| Bytes::copy_from_slice(key.as_bytes()))
            .unwrap_or_default(),
        policy,
        salt: Bytes::copy_from_slice(&salt),
    }
    .encode_to_vec()
}

/// Turns a wire policy (zeros meaning defaults) into an explicit one, refusing nonsense.
pub fn policy_from_proto(policy: pb::Policy) -> Result<Policy, String> {
    let defaults = Policy::default();
    let mut rules = Vec::with_capacity(policy.rules.len());
    for rule in policy.rules {
        let kind: Kind = rule
            .kind
            .parse()
            .map_err(|error| format!("policy rule: {error}"))?;
        if kind == Kind::StreamCreate {
            return Err("policy rule for stream.create: a stream has exactly one genesis".into());
        }
        if rules.iter().any(|(existing, _)| *existing == rule.kind) {
            return Err(format!("policy has two rules for {}", rule.kind));
        }
        let authors = rule.authors.unwrap_or_default();
        let keys = authors
            .keys
            .iter()
            .map(|key| {
                AuthorKey::from_slice(key)
                    .map_err(|_| format!("policy rule for {}: keys must be 32 bytes", rule.kind))
            })
            .collect::<Result<Vec<_>, _>>()?;
        rules.push((
            rule.kind,
            Authors {
                anyone: authors.anyone,
                owner: authors.owner,
                keys,
            },
        ));
    }
    let or_default = |value: u64, default: u64| if value == 0 { default } else { value };
    let max_file_bytes = or_default(policy.max_file_bytes, defaults.max_file_bytes);
    if max_file_bytes > HARD_MAX_PAYLOAD_BYTES {
        return Err(format!(
            "max_file_bytes {max_file_bytes} is over the hard limit of {HARD_MAX_PAYLOAD_BYTES}"
        ));
    }
    if policy.work_bits > Policy::MAX_WORK_BITS {
        return Err(format!(
            "work_bits {} is over the most allowed, {}",
            policy.work_bits,
            Policy::MAX_WORK_BITS
        ));
    }
    Ok(Policy {
        rules,
        max_file_bytes,
        max_stream_bytes: or_default(policy.max_stream_bytes, defaults.max_stream_bytes),
        leasing: !policy.leasing_disabled,
        lease_ms: or_default(policy.lease_ms, defaults.lease_ms),
        work_bits: policy.work_bits,
    })
}

/// The explicit wire form of a policy.
pub fn policy_to_proto(policy: &Policy) -> pb::Policy {
    pb::Policy {
        rules: policy
            .rules
            .iter()
            .map(|(kind, authors)| pb::KindRule {
                kind: kind.clone(),
                authors: Some(pb::Authors {
                    anyone: authors.anyone,
                    owner: authors.owner,
                    keys: authors
                        .keys
                        .iter()
                        .map(|key| Bytes::copy_from_slice(key.as_bytes()))
                        .collect(),
                }),
            })
            .collect(),
        max_file_bytes: policy.max_file_bytes,
        max_stream_bytes: policy.max_stream_bytes,
        leasing_disabled: !policy.leasing,
        lease_ms: policy.lease_ms,
        work_bits: policy.work_bits,
    }
}

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
    }
}

/// A stored scribe as the API shows it: the exact bytes plus fields decoded from them.
pub fn entry(stored: StoredEntry) -> pb::Entry {
    let decoded = Scribe::decode_unverified(stored.bytes.clone())
        .ok()
        .map(|(scribe, _)| scribe);
    pb::Entry {
        seq: stored.seq,
        id: Bytes::copy_from_slice(stored.id.as_bytes()),
        stream: decoded
            .as_ref()
            .map(|scribe| Bytes::copy_from_slice(scribe.stream_id().as_bytes()))
            .unwrap_or_default(),
        author: decoded
            .as_ref()
            .map(|scribe| Bytes::copy_from_slice(scribe.body.author.as_bytes()))
            .unwrap_or_default(),
        hlc: decoded.as_ref().map_or(0, |scribe| scribe.body.hlc),
        kind: decoded
            .map(|scribe| scribe.body.kind.as_str().to_string())
            .unwrap_or_default(),
        scribe: stored.bytes,
    }
}

/// A 32-byte id field of a request, with a message naming the field when it is not one.
pub fn id_field(bytes: &[u8], field: &str) -> Result<ScribeId, String> {
    ScribeId::from_slice(bytes)
        .map_err(|_| format!("{field} must be a 32-byte id, got {} bytes", bytes.len()))
}

/// An optional stream field: empty means "every stream".
pub fn optional_stream(bytes: &[u8]) -> Result<Option<StreamId>, String> {
    if bytes.is_empty() {
        Ok(None)
    } else {
        id_field(bytes, "stream").map(Some)
    }
}

/// A peer-protocol message to its wire form.
pub fn peer_message_to_proto(message: &crate::replication::session::Message) -> pb::PeerMessage {
    use crate::replication::session::Message;
    use pb::peer_message::Message as Wire;
    let id = |id: &ScribeId| Bytes::copy_from_slice(id.as_bytes());
    let wire = match message {
        Message::Hello { node, epoch, nonce } => Wire::Hello(pb::PeerHello {
            node_id: Bytes::copy_from_slice(node.as_bytes()),
            epoch: Bytes::copy_from_slice(epoch),
            nonce: Bytes::copy_from_slice(nonce),
            protocol: crate::replication::session::PROTOCOL_VERSION,
        }),
        Message::Proof(signature) => Wire::Proof(pb::PeerProof {
            signature: Bytes::copy_from_slice(&signature.to_bytes()),
        }),
        Message::Streams(streams) => Wire::Streams(pb::PeerStreams {
            streams: streams.iter().map(id).collect(),
        }),
        Message::Want { stream, after } => Wire::Want(pb::PeerWant {
            stream: id(stream),
            after_seq: *after,
        }),
        Message::Batch {
            stream,
            scribes,
            through,
            head,
        } => Wire::Batch(pb::PeerBatch {
            stream: id(stream),
            scribes: scribes
                .iter()
                .map(|scribe| pb::PeerScribe {
                    seq: scribe.seq,
                    scribe: scribe.bytes.clone(),
                    id: id(&scribe.id),
                })
                .collect(),
            through_seq: *through,
            head_seq: *head,
        }),
        Message::CaughtUp { stream, seq } => Wire::CaughtUp(pb::PeerCaughtUp {
            stream: id(stream),
            seq: *seq,
        }),
        Message::GenesisRequest(stream) => {
            Wire::GenesisRequest(pb::PeerGenesisRequest { stream: id(stream) })
        }
        Message::Genesis { stream, scribe } => Wire::Genesis(pb::PeerGenesis {
            stream: id(stream),
            scribe: scribe.clone().unwrap_or_default(),
        }),
        Message::Error(reason) => Wire::Error(pb::PeerError {
            message: reason.clone(),
        }),
    };
    pb::PeerMessage {
        message: Some(wire),
    }
}

/// A peer-protocol message from its wire form; the error says what was wrong with it.
pub fn peer_message_from_proto(
    message: pb::PeerMessage,
) -> Result<crate::replication::session::Message, String> {
    use crate::replication::session::{Message, WireScribe};
    use pb::peer_message::Message as Wire;
    let fixed = |bytes: &[u8], field: &str| -> Result<[u8; 32], String> {
        bytes
            .try_into()
            .map_err(|_| format!("{field} must be 32 bytes, got {}", bytes.len()))
    };
    Ok(match message.message.ok_or("empty peer message")? {
        Wire::Hello(hello) => {
            if hello.protocol != crate::replication::session::PROTOCOL_VERSION {
                return Err(format!(
                    "peer speaks protocol {}, this node speaks {}; upgrade the older node",
                    hello.protocol,
                    crate::replication::session::PROTOCOL_VERSION
                ));
            }
            Message::Hello {
                node: AuthorKey(fixed(&hello.node_id, "node_id")?),
                epoch: hello
                    .epoch
                    .as_ref()
                    .try_into()
                    .map_err(|_| "epoch must be 16 bytes".to_string())?,
                nonce: fixed(&hello.nonce, "nonce")?,
            }
        }
        Wire::Proof(proof) => Message::Proof(
            ed25519_dalek::Signature::from_slice(&proof.signature)
                .map_err(|_| "proof signature must be 64 bytes".to_string())?,
        ),
        Wire::Streams(streams) => Message::Streams(
            streams
                .streams
                .iter()
                .map(|stream| fixed(stream, "stream").map(StreamId::from))
                .collect::<Result<_, _>>()?,
        ),
        Wire::Want(want) => Message::Want {
            stream: StreamId::from(fixed(&want.stream, "stream")?),
            after: want.after_seq,
        },
        Wire::Batch(batch) => Message::Batch {
            stream: StreamId::from(fixed(&batch.stream, "stream")?),
            scribes: batch
                .scribes
                .into_iter()
                .map(|scribe| {
                    Ok(WireScribe {
                        seq: scribe.seq,
                        id: ScribeId(fixed(&scribe.id, "scribe id")?),
                        bytes: scribe.scribe,
                    })
                })
                .collect::<Result<_, String>>()?,
            through: batch.through_seq,
            head: batch.head_seq,
        },
        Wire::CaughtUp(caught_up) => Message::CaughtUp {
            stream: StreamId::from(fixed(&caught_up.stream, "stream")?),
            seq: caught_up.seq,
        },
        Wire::GenesisRequest(request) => {
            Message::GenesisRequest(StreamId::from(fixed(&request.stream, "stream")?))
        }
        Wire::Genesis(genesis) => Message::Genesis {
            stream: StreamId::from(fixed(&genesis.stream, "stream")?),
            scribe: if genesis.scribe.is_empty() {
                None
            } else {
                Some(genesis.scribe)
            },
        },
        Wire::Error(error) => Message::Error(error.message),
    })
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
