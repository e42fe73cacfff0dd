//! The peer wire codec: a [`Message`] of the sans-IO session to its `quire.v1.PeerMessage` bytes
//! and back. Nothing else: the session decides what to send, the connection moves the bytes.
//!
//! Decoding never trusts a peer: every fixed-size field is checked, and the error says which one
//! was wrong (it is sent back to the peer before the connection closes).

use std::collections::HashMap;

use bytes::Bytes;
use quire_projection_api::{AuthorKey, ScribeId, StreamId};

use super::session::{Message, WireScribe, MAX_BATCH_SCRIBES, PROTOCOL_VERSION};
use crate::log::epoch::{Epochs, MAX_ENDED};
use crate::pb;
use crate::scribe::{merkle, Leaves, Parts, Proof, MAX_SEAL_COUNT};

/// Why a peer's message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The message has no body.
    #[error("empty peer message")]
    Empty,
    /// The peer speaks another protocol version.
    #[error(
        "peer speaks protocol {peer}, this node speaks {PROTOCOL_VERSION}; upgrade the older node"
    )]
    Protocol {
        /// The version the peer stated.
        peer: u32,
    },
    /// A fixed-size field has the wrong length.
    #[error("{field} must be {expected} bytes, got {got}")]
    Length {
        /// The field.
        field: &'static str,
        /// Its required length.
        expected: usize,
        /// Its length in the message.
        got: usize,
    },
    /// A repeated field has more entries than allowed.
    #[error("{field} may have at most {most} entries, got {got}")]
    TooMany {
        /// The field.
        field: &'static str,
        /// The most allowed.
        most: usize,
        /// Entries in the message.
        got: usize,
    },
    /// A scribe names a seal the batch does not carry.
    #[error("scribe {index} of the batch names seal {seal}, but the batch carries {seals} seals")]
    NoSuchSeal {
        /// The scribe's position in the batch.
        index: usize,
        /// The seal index it names.
        seal: u32,
        /// Seals in the batch.
        seals: usize,
    },
    /// A scribe's inclusion proof is malformed.
    #[error("scribe {index} of the batch: {reason}")]
    BadProof {
        /// The scribe's position in the batch (0 for a genesis).
        index: usize,
        /// What is wrong.
        reason: String,
    },
}

/// A peer-protocol message to its wire form.
pub fn to_proto(message: &Message) -> pb::PeerMessage {
    use pb::peer_message::Message as Wire;
    let id = |id: &ScribeId| Bytes::copy_from_slice(id.as_bytes());
    let wire = match message {
        Message::Hello {
            node,
            epochs,
            rules,
            nonce,
        } => Wire::Hello(pb::PeerHello {
            rules: *rules,
            node_id: Bytes::copy_from_slice(node.as_bytes()),
            epoch: Bytes::copy_from_slice(&epochs.current),
            nonce: Bytes::copy_from_slice(nonce),
            protocol: PROTOCOL_VERSION,
            ended_epochs: epochs
                .ended
                .iter()
                .map(|(epoch, ended_at)| pb::PeerEpoch {
                    epoch: Bytes::copy_from_slice(epoch),
                    ended_at: *ended_at,
                })
                .collect(),
        }),
        Message::Proof(signature) => Wire::Proof(pb::PeerProof {
            signature: Bytes::copy_from_slice(&signature.to_bytes()),
        }),
        Message::Streams(streams) => Wire::Streams(pb::PeerStreams {
            streams: streams.iter().map(id).collect(),
        }),
        Message::Want {
            stream,
            after,
            since,
        } => Wire::Want(pb::PeerWant {
            stream: id(stream),
            after_seq: *after,
            own_since_seq: *since,
        }),
        Message::Batch {
            stream,
            scribes,
            through,
            head,
        } => {
            let (seals, with_leaves) = batch_seals(scribes);
            let scribes = scribes
                .iter()
                .map(|scribe| {
                    let seal = seals
                        .iter()
                        .position(|seal| seal.seal == scribe.parts.seal)
                        .expect("every seal of the batch is listed")
                        as u32;
                    pb::PeerScribe {
                        seq: scribe.seq,
                        id: id(&scribe.id),
                        envelope: scribe.parts.envelope.clone(),
                        payload: scribe.parts.payload.clone(),
                        seal,
                        proof: (!with_leaves[seal as usize]).then(|| scribe.parts.proof.to_proto()),
                        redacted_by: scribe.parts.redacted_by.clone().unwrap_or_default(),
                    }
                })
                .collect();
            Wire::Batch(pb::PeerBatch {
                stream: id(stream),
                scribes,
                through_seq: *through,
                head_seq: *head,
                seals,
            })
        }
        Message::CaughtUp { stream, seq } => Wire::CaughtUp(pb::PeerCaughtUp {
            stream: id(stream),
            seq: *seq,
        }),
        Message::GenesisRequest(stream) => {
            Wire::GenesisRequest(pb::PeerGenesisRequest { stream: id(stream) })
        }
        Message::Genesis { stream, scribe } => Wire::Genesis(pb::PeerGenesis {
            stream: id(stream),
            scribe: scribe.as_ref().map(Parts::to_proto),
        }),
        Message::Error(reason) => Wire::Error(pb::PeerError {
            message: reason.clone(),
        }),
    };
    pb::PeerMessage {
        message: Some(wire),
    }
}

/// The distinct seals of a batch's scribes, in order of first use, and for each whether it is sent
/// with its leaves (known, and fewer bytes than the proofs of the batch's scribes it covers).
fn batch_seals(scribes: &[WireScribe]) -> (Vec<pb::PeerSeal>, Vec<bool>) {
    let mut seals: Vec<(&Bytes, Option<&[ScribeId]>, usize)> = Vec::new();
    for scribe in scribes {
        let proof_bytes = scribe.parts.proof.siblings.len();
        match seals
            .iter_mut()
            .find(|(seal, ..)| **seal == scribe.parts.seal)
        {
            Some((_, _, siblings)) => *siblings += proof_bytes,
            None => seals.push((
                &scribe.parts.seal,
                scribe.parts.leaves.as_deref(),
                proof_bytes,
            )),
        }
    }
    seals
        .into_iter()
        .map(|(seal, leaves, siblings)| match leaves {
            Some(leaves) if leaves.len() < siblings => (
                pb::PeerSeal {
                    seal: seal.clone(),
                    leaves: leaves
                        .iter()
                        .map(|leaf| Bytes::copy_from_slice(leaf.as_bytes()))
                        .collect(),
                },
                true,
            ),
            _ => (
                pb::PeerSeal {
                    seal: seal.clone(),
                    leaves: Vec::new(),
                },
                false,
            ),
        })
        .unzip()
}

/// Most leaves a batch's seal may come with. A sender sends leaves only when they are fewer than
/// the sibling hashes of the proofs they replace, and a batch holds at most
/// [`MAX_BATCH_SCRIBES`] scribes of proofs at most 20 deep: more is never needed, and would let a
/// peer make the receiver build a tree of a million leaves for one scribe.
pub const MAX_SENT_LEAVES: usize = MAX_BATCH_SCRIBES * MAX_SEAL_COUNT.trailing_zeros() as usize;

/// The leaves a batch's seal came with, each leaf's proof, and where each id stands among them
/// (derived once per seal).
type Derived = Option<(Leaves, Vec<Proof>, HashMap<ScribeId, usize>)>;

fn derive(seal: &pb::PeerSeal, index: usize) -> Result<Derived, WireError> {
    if seal.leaves.is_empty() {
        return Ok(None);
    }
    if seal.leaves.len() > MAX_SENT_LEAVES {
        return Err(WireError::BadProof {
            index,
            reason: format!(
                "its seal comes with {} leaves; at most {MAX_SENT_LEAVES} are ever sent (send proofs instead)",
                seal.leaves.len()
            ),
        });
    }
    let leaves: Leaves = seal
        .leaves
        .iter()
        .map(|leaf| {
            ScribeId::from_slice(leaf).map_err(|_| WireError::Length {
                field: "seal leaf",
                expected: 32,
                got: leaf.len(),
            })
        })
        .collect::<Result<_, _>>()?;
    let proofs = merkle::tree(&leaves).1;
    // The first place of each id (an id twice in one seal is one scribe).
    let mut at = HashMap::with_capacity(leaves.len());
    for (position, leaf) in leaves.iter().enumerate() {
        at.entry(*leaf).or_insert(position);
    }
    Ok(Some((leaves, proofs, at)))
}

/// A peer-protocol message from its wire form; the error says what was wrong with it.
pub fn from_proto(message: pb::PeerMessage) -> Result<Message, WireError> {
    use pb::peer_message::Message as Wire;
    let fixed = |bytes: &[u8], field: &'static str| -> Result<[u8; 32], WireError> {
        bytes.try_into().map_err(|_| WireError::Length {
            field,
            expected: 32,
            got: bytes.len(),
        })
    };
    Ok(match message.message.ok_or(WireError::Empty)? {
        Wire::Hello(hello) => {
            if hello.protocol != PROTOCOL_VERSION {
                return Err(WireError::Protocol {
                    peer: hello.protocol,
                });
            }
            let epoch = |bytes: &Bytes| -> Result<[u8; 16], WireError> {
                bytes.as_ref().try_into().map_err(|_| WireError::Length {
                    field: "epoch",
                    expected: 16,
                    got: bytes.len(),
                })
            };
            if hello.ended_epochs.len() > MAX_ENDED {
                return Err(WireError::TooMany {
                    field: "ended_epochs",
                    most: MAX_ENDED,
                    got: hello.ended_epochs.len(),
                });
            }
            Message::Hello {
                node: AuthorKey(fixed(&hello.node_id, "node_id")?),
                epochs: Epochs {
                    current: epoch(&hello.epoch)?,
                    ended: hello
                        .ended_epochs
                        .iter()
                        .map(|ended| Ok((epoch(&ended.epoch)?, ended.ended_at)))
                        .collect::<Result<_, WireError>>()?,
                },
                rules: hello.rules,
                nonce: fixed(&hello.nonce, "nonce")?,
            }
        }
        Wire::Proof(proof) => Message::Proof(
            ed25519_dalek::Signature::from_slice(&proof.signature).map_err(|_| {
                WireError::Length {
                    field: "proof signature",
                    expected: 64,
                    got: proof.signature.len(),
                }
            })?,
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
            since: want.own_since_seq,
        },
        Wire::Batch(batch) => {
            let seals = batch.seals;
            let mut derived: Vec<Option<Derived>> = vec![None; seals.len()];
            let mut scribes = Vec::with_capacity(batch.scribes.len());
            for (index, scribe) in batch.scribes.into_iter().enumerate() {
                let slot = scribe.seal as usize;
                let seal = seals.get(slot).ok_or(WireError::NoSuchSeal {
                    index,
                    seal: scribe.seal,
                    seals: seals.len(),
                })?;
                if derived[slot].is_none() {
                    derived[slot] = Some(derive(seal, index)?);
                }
                let (proof, leaves) = match (&derived[slot], scribe.proof) {
                    // Sent with its leaves: the proof is the one they give for this id's index.
                    (Some(Some((leaves, proofs, at))), _) => {
                        let id = ScribeId(fixed(&scribe.id, "scribe id")?);
                        let at = *at.get(&id).ok_or_else(|| WireError::BadProof {
                            index,
                            reason: format!("its seal's leaves do not include {id}"),
                        })?;
                        (proofs[at].clone(), Some(leaves.clone()))
                    }
                    (_, proof) => (
                        Proof::from_proto(proof).map_err(|error| WireError::BadProof {
                            index,
                            reason: error.to_string(),
                        })?,
                        None,
                    ),
                };
                scribes.push(WireScribe {
                    seq: scribe.seq,
                    id: ScribeId(fixed(&scribe.id, "scribe id")?),
                    parts: Parts {
                        envelope: scribe.envelope,
                        payload: scribe.payload,
                        seal: seal.seal.clone(),
                        proof,
                        leaves,
                        redacted_by: (!scribe.redacted_by.is_empty()).then_some(scribe.redacted_by),
                    },
                });
            }
            Message::Batch {
                stream: StreamId::from(fixed(&batch.stream, "stream")?),
                scribes,
                through: batch.through_seq,
                head: batch.head_seq,
            }
        }
        Wire::CaughtUp(caught_up) => Message::CaughtUp {
            stream: StreamId::from(fixed(&caught_up.stream, "stream")?),
            seq: caught_up.seq,
        },
        Wire::GenesisRequest(request) => {
            Message::GenesisRequest(StreamId::from(fixed(&request.stream, "stream")?))
        }
        Wire::Genesis(genesis) => Message::Genesis {
            stream: StreamId::from(fixed(&genesis.stream, "stream")?),
            scribe: genesis
                .scribe
                .map(Parts::from_proto)
                .transpose()
                .map_err(|error| WireError::BadProof {
                    index: 0,
                    reason: error.to_string(),
                })?,
        },
        Wire::Error(error) => Message::Error(error.message),
    })
}
