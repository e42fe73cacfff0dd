//! The scribe (format 2): the envelope an author states, the payload it names by hash, and the
//! seal that signs one envelope id or the Merkle root of many.
//!
//! - The **envelope** (`quire.v1.Envelope`) holds every field but the payload, which it names by
//!   `payload_sha256` and `payload_len`. A scribe's **id** is SHA-256 of the envelope's bytes exactly
//!   as received; nothing here re-encodes an envelope in order to hash or forward it (BRIEF
//!   invariant 1). The canonical-encoding check re-encodes only to *compare*: an envelope whose
//!   bytes are not the one canonical encoding of its fields is refused, so one statement never
//!   travels under two ids. The id depends on no signature: one envelope is one scribe however often
//!   it is sealed, and the work token (judged on the id) buys exactly one scribe.
//! - The **payload** travels and is stored beside its envelope, once per SHA-256; it can later be
//!   dropped without touching the id or any signature (retention, redaction).
//! - A **seal** (`quire.v1.Seal`) is the author's Ed25519 signature over [`SEAL_PREFIX`], a count
//!   and the Merkle root ([`merkle`]) of an ordered list of envelope ids: one signature for a whole
//!   group. Each scribe carries a [`Proof`] that its seal covers its id, so a node verifies one
//!   signature and a few hashes per scribe, and anyone can verify a scribe without trusting the
//!   node that served it.
//!
//! Verification is strict Ed25519 (`verify_strict`: no small-order key or R, canonical S), one
//! signature at a time on every path, so two nodes can never disagree about a seal.
//! `docs/protocol.md` documents the bytes.
//!
//! What is *not* here: anything that needs storage (is the stream known, is the author allowed, are
//! the parents stored) — that is `crate::log`.

use std::sync::Arc;

use bytes::Bytes;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use prost::Message;
use quire_projection_api::{AuthorKey, Kind, ParseError, ScribeId, StreamId};
use sha2::{Digest, Sha256};

use crate::pb;

pub mod merkle;

/// The envelope format this version writes and reads.
pub const FORMAT_V2: u32 = 2;

/// Domain-separation prefix of every seal signature, so a quire seal can never be mistaken for a
/// signature over anything else (the peer handshake signs under `quire.peer.v1\0`).
pub const SEAL_PREFIX: &[u8; 16] = b"quire.seal.v2\0\0\0";

/// Longest `content_type`, in bytes.
pub const MAX_CONTENT_TYPE_BYTES: usize = 256;
/// Most parents one scribe may name.
pub const MAX_PARENTS: usize = 64;
/// Largest payload any policy may allow (a policy's own limit is usually lower).
pub const HARD_MAX_PAYLOAD_BYTES: u64 = 32 * 1024 * 1024;
/// Largest encoded envelope accepted: 64 parents, the longest content type, room for the rest.
pub const MAX_ENVELOPE_BYTES: usize = 4 * 1024;
/// Most ids one seal may cover (a proof then has at most 20 siblings).
pub const MAX_SEAL_COUNT: u64 = 1 << 20;

/// Why a scribe is not valid. Every variant means "refuse it": nothing is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScribeError {
    /// The bytes do not decode as a `quire.v1.Envelope` / `Seal`, or a field has the wrong shape.
    #[error("malformed scribe: {0}")]
    Malformed(String),
    /// The envelope says a format this node does not know.
    #[error("unsupported scribe format {0}; this node reads format {FORMAT_V2}")]
    UnsupportedFormat(u32),
    /// The bytes decode, but are not the canonical encoding of what they decode to.
    #[error("scribe {part} is not canonically encoded (fields in number order, defaults omitted, no unknown or repeated fields); encode it with a standard protobuf library")]
    NotCanonical {
        /// `envelope` or `seal`.
        part: &'static str,
    },
    /// The payload is not the one the envelope names.
    #[error("payload does not match its envelope: the envelope names {expected_len} bytes with sha256 {expected}, the payload sent has {actual_len} bytes with sha256 {actual}")]
    BadPayload {
        /// `payload_sha256` of the envelope, hex.
        expected: String,
        /// `payload_len` of the envelope.
        expected_len: u64,
        /// sha256 of the payload sent, hex.
        actual: String,
        /// Length of the payload sent.
        actual_len: u64,
    },
    /// The seal is by another key than the envelope's author.
    #[error("the seal is by {sealer}, but the envelope's author is {author}: a scribe must be sealed by its author")]
    WrongSealer {
        /// The seal's key.
        sealer: AuthorKey,
        /// The envelope's author.
        author: AuthorKey,
    },
    /// The proof does not lead from the scribe's id to the seal's root.
    #[error("the seal does not cover scribe {id}: {reason}")]
    NotCovered {
        /// The scribe's id.
        id: ScribeId,
        /// What does not fit.
        reason: String,
    },
    /// The seal's signature does not verify against its author key.
    #[error("bad signature: the seal is not signed by its author {author}")]
    BadSignature {
        /// The key the seal claims.
        author: AuthorKey,
    },
    /// The id a sender claimed is not the SHA-256 of the envelope.
    #[error("bad hash: the envelope hashes to {actual}, not to the claimed id {claimed}")]
    BadHash {
        /// What the sender said.
        claimed: ScribeId,
        /// sha256 of the envelope.
        actual: ScribeId,
    },
    /// A payload over [`HARD_MAX_PAYLOAD_BYTES`] or an envelope over [`MAX_ENVELOPE_BYTES`].
    #[error("{part} of {size} bytes is larger than the hard limit of {limit} bytes")]
    TooLarge {
        /// `payload` or `envelope`.
        part: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
}

impl From<ParseError> for ScribeError {
    fn from(error: ParseError) -> Self {
        ScribeError::Malformed(error.to_string())
    }
}

/// The fields of a scribe, decoded, with its payload. `stream` is `None` exactly for a genesis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    /// The stream; `None` in a `stream.create` genesis.
    pub stream: Option<StreamId>,
    /// Who states it (and must seal it).
    pub author: AuthorKey,
    /// Hybrid logical clock of the author when written.
    pub hlc: u64,
    /// What it does.
    pub kind: Kind,
    /// MIME type of the payload.
    pub content_type: String,
    /// The payload (named in the envelope by its hash and length).
    pub payload: Bytes,
    /// Scribes of the same stream it refers to.
    pub parents: Vec<ScribeId>,
    /// Reserved for access control: the newest membership scribe the author had seen.
    pub membership: Option<ScribeId>,
    /// Work-token nonce.
    pub nonce: u64,
}

/// sha256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Body {
    /// The canonical encoding of this body's envelope: what its id is the hash of.
    pub fn encode_envelope(&self) -> Vec<u8> {
        self.to_envelope(sha256(&self.payload)).encode_to_vec()
    }

    fn to_envelope(&self, payload_sha256: [u8; 32]) -> pb::Envelope {
        let id = |id: &ScribeId| Bytes::copy_from_slice(id.as_bytes());
        pb::Envelope {
            format: FORMAT_V2,
            stream: self.stream.as_ref().map(id).unwrap_or_default(),
            author: Bytes::copy_from_slice(self.author.as_bytes()),
            hlc: self.hlc,
            kind: self.kind.as_str().to_string(),
            content_type: self.content_type.clone(),
            parents: self.parents.iter().map(id).collect(),
            payload_sha256: Bytes::copy_from_slice(&payload_sha256),
            payload_len: self.payload.len() as u64,
            membership: self.membership.as_ref().map(id).unwrap_or_default(),
            nonce: self.nonce,
        }
    }

    /// The envelope for this body, after choosing a nonce that gives its id at least `work_bits`
    /// leading zero bits (the stream policy's work token; with 0 the nonce stays as it is).
    pub fn into_unsealed(self, work_bits: u32) -> Unsealed {
        self.into_unsealed_unless(work_bits, &|| false)
            .expect("a search nothing stops ends")
    }

    /// [`Body::into_unsealed`], giving up (`None`) if `stop` says so; it is asked every 65,536
    /// tries of the search (a few milliseconds).
    pub fn into_unsealed_unless(
        mut self,
        work_bits: u32,
        stop: &dyn Fn() -> bool,
    ) -> Option<Unsealed> {
        let payload_sha256 = sha256(&self.payload);
        if work_bits == 0 {
            let envelope = Bytes::from(self.to_envelope(payload_sha256).encode_to_vec());
            return Some(Unsealed {
                id: hash(&envelope),
                envelope,
                body: self,
                payload_sha256,
            });
        }
        // `nonce` is the envelope's last field, so the encoding is `prefix ‖ 0x58 ‖ varint(nonce)`
        // (nothing at all for nonce 0): hash the prefix once and only the nonce per try.
        self.nonce = 0;
        let prefix = self.to_envelope(payload_sha256).encode_to_vec();
        let mut prefix_hash = Sha256::new();
        prefix_hash.update(&prefix);
        let mut suffix = Vec::with_capacity(11);
        let mut nonce: u64 = 0;
        loop {
            suffix.clear();
            if nonce != 0 {
                suffix.push(NONCE_TAG);
                prost::encoding::encode_varint(nonce, &mut suffix);
            }
            let mut hasher = prefix_hash.clone();
            hasher.update(&suffix);
            let id: [u8; 32] = hasher.finalize().into();
            if leading_zero_bits(&id) >= work_bits {
                self.nonce = nonce;
                let mut envelope = prefix;
                envelope.extend_from_slice(&suffix);
                debug_assert_eq!(envelope, self.to_envelope(payload_sha256).encode_to_vec());
                return Some(Unsealed {
                    envelope: Bytes::from(envelope),
                    id: ScribeId(id),
                    body: self,
                    payload_sha256,
                });
            }
            nonce = nonce.wrapping_add(1);
            if nonce % 65_536 == 0 && stop() {
                return None;
            }
        }
    }
}

/// The key byte of `Envelope.nonce` (field 11, varint).
const NONCE_TAG: u8 = 11 << 3;

/// The size rules every body obeys, checked when decoding and before the node signs anything:
/// a content type of at most [`MAX_CONTENT_TYPE_BYTES`], at most [`MAX_PARENTS`] parents and a
/// payload of at most [`HARD_MAX_PAYLOAD_BYTES`].
pub fn check_shape(content_type: &str, parents: usize, payload: u64) -> Result<(), ScribeError> {
    if content_type.len() > MAX_CONTENT_TYPE_BYTES {
        return Err(ScribeError::Malformed(format!(
            "content_type is {} bytes, at most {MAX_CONTENT_TYPE_BYTES} allowed",
            content_type.len()
        )));
    }
    if parents > MAX_PARENTS {
        return Err(ScribeError::Malformed(format!(
            "{parents} parents named, at most {MAX_PARENTS} allowed"
        )));
    }
    if payload > HARD_MAX_PAYLOAD_BYTES {
        return Err(ScribeError::TooLarge {
            part: "payload",
            size: payload,
            limit: HARD_MAX_PAYLOAD_BYTES,
        });
    }
    Ok(())
}

/// An envelope ready to be sealed: its exact bytes, its id and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsealed {
    /// The exact envelope bytes.
    pub envelope: Bytes,
    /// sha256 of `envelope`.
    pub id: ScribeId,
    /// The decoded fields and the payload.
    pub body: Body,
    /// sha256 of the payload.
    pub payload_sha256: [u8; 32],
}

/// A decoded seal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    /// The exact encoded `quire.v1.Seal`.
    pub bytes: Bytes,
    /// sha256 of `bytes`.
    pub id: [u8; 32],
    /// Who signed it.
    pub author: AuthorKey,
    /// Leaves of its tree.
    pub count: u64,
    /// Merkle tree hash of the ids it covers.
    pub root: [u8; 32],
    signature: Signature,
}

impl Seal {
    /// Signs the tree of `count` ids with root `root`.
    pub fn sign(key: &SigningKey, count: u64, root: [u8; 32]) -> Seal {
        let signature = key.sign(&seal_message(count, &root));
        let proto = pb::Seal {
            author: Bytes::copy_from_slice(key.verifying_key().as_bytes()),
            count,
            root: Bytes::copy_from_slice(&root),
            signature: Bytes::copy_from_slice(&signature.to_bytes()),
        };
        let bytes = Bytes::from(proto.encode_to_vec());
        Seal {
            id: sha256(&bytes),
            bytes,
            author: AuthorKey(key.verifying_key().to_bytes()),
            count,
            root,
            signature,
        }
    }

    /// Decodes `bytes` (canonical encoding and field shapes checked); the signature is not
    /// checked here (see [`Seal::verify`]).
    pub fn decode(bytes: Bytes) -> Result<Seal, ScribeError> {
        let malformed = |what: String| ScribeError::Malformed(format!("seal: {what}"));
        if bytes.len() > 256 {
            return Err(malformed(format!("{} bytes is not a seal", bytes.len())));
        }
        let proto =
            pb::Seal::decode(bytes.clone()).map_err(|error| malformed(error.to_string()))?;
        if proto.encode_to_vec() != bytes {
            return Err(ScribeError::NotCanonical { part: "seal" });
        }
        let author = AuthorKey::from_slice(&proto.author).map_err(|_| {
            malformed(format!(
                "author must be a 32-byte Ed25519 key, got {} bytes",
                proto.author.len()
            ))
        })?;
        if proto.count == 0 || proto.count > MAX_SEAL_COUNT {
            return Err(malformed(format!(
                "count must be 1 to {MAX_SEAL_COUNT}, got {}",
                proto.count
            )));
        }
        let root: [u8; 32] =
            proto.root.as_ref().try_into().map_err(|_| {
                malformed(format!("root must be 32 bytes, got {}", proto.root.len()))
            })?;
        let signature = Signature::from_slice(&proto.signature).map_err(|_| {
            malformed(format!(
                "signature must be 64 bytes, got {}",
                proto.signature.len()
            ))
        })?;
        Ok(Seal {
            id: sha256(&bytes),
            bytes,
            author,
            count: proto.count,
            root,
            signature,
        })
    }

    /// Checks the signature against the seal's author (strict Ed25519: no small-order key or R,
    /// no non-canonical S).
    pub fn verify(&self) -> Result<(), ScribeError> {
        let bad = || ScribeError::BadSignature {
            author: self.author,
        };
        let key = VerifyingKey::from_bytes(&self.author.0).map_err(|_| bad())?;
        key.verify_strict(&seal_message(self.count, &self.root), &self.signature)
            .map_err(|_| bad())
    }
}

/// What a seal's signature is over.
pub fn seal_message(count: u64, root: &[u8; 32]) -> [u8; 56] {
    let mut message = [0u8; 56];
    message[..16].copy_from_slice(SEAL_PREFIX);
    message[16..24].copy_from_slice(&count.to_be_bytes());
    message[24..].copy_from_slice(root);
    message
}

/// Every id a seal covers, in order (shared by the scribes it covers).
pub type Leaves = Arc<[ScribeId]>;

/// Proof that a seal covers one id: the leaf's index and its audit path (RFC 9162).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Proof {
    /// The leaf's position in the seal's list.
    pub index: u64,
    /// Sibling hashes from the leaf up.
    pub siblings: Vec<[u8; 32]>,
}

impl Proof {
    /// As protobuf.
    pub fn to_proto(&self) -> pb::Proof {
        pb::Proof {
            index: self.index,
            siblings: self
                .siblings
                .iter()
                .map(|hash| Bytes::copy_from_slice(hash))
                .collect(),
        }
    }

    /// From protobuf (`None`: the empty proof of a seal of one).
    pub fn from_proto(proof: Option<pb::Proof>) -> Result<Proof, ScribeError> {
        let Some(proof) = proof else {
            return Ok(Proof::default());
        };
        if proof.siblings.len() > 64 {
            return Err(ScribeError::Malformed(format!(
                "proof of {} siblings; a seal's tree is at most {} deep",
                proof.siblings.len(),
                MAX_SEAL_COUNT.trailing_zeros()
            )));
        }
        let siblings = proof
            .siblings
            .iter()
            .map(|hash| {
                <[u8; 32]>::try_from(hash.as_ref()).map_err(|_| {
                    ScribeError::Malformed(format!(
                        "proof siblings must be 32 bytes, got {}",
                        hash.len()
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Proof {
            index: proof.index,
            siblings,
        })
    }
}

/// A scribe's parts as stored and sent: the envelope's exact bytes, the payload, the encoded seal
/// and the proof that the seal covers the envelope's id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parts {
    /// The exact envelope bytes.
    pub envelope: Bytes,
    /// The payload.
    pub payload: Bytes,
    /// The exact encoded seal.
    pub seal: Bytes,
    /// Its proof.
    pub proof: Proof,
    /// Every id the seal covers, in order, when whoever holds these parts knows them (the node
    /// made the seal, or a peer sent them): a store keeps them once instead of a proof per scribe,
    /// and a peer can be sent them instead of proofs. Checked on decode: they must be as many as
    /// the seal counts, and the proof must lead to the seal's root.
    pub leaves: Option<Leaves>,
    /// The payload was redacted (`payload` is empty): the encoded `quire.v1.SealedScribe` of the
    /// `redact` scribe that justifies it (checked by the log's rules, which know the stream's
    /// owner).
    pub redacted_by: Option<Bytes>,
}

/// The largest encoded `redact` scribe a redacted scribe may carry: an envelope, a payload of a
/// target and a reason, a seal and a proof of a seal over [`MAX_SEAL_COUNT`] ids.
pub const MAX_REDACTION_BYTES: usize = 16 * 1024;

impl Parts {
    /// Size counted against a stream's limits: envelope and payload.
    pub fn size(&self) -> u64 {
        (self.envelope.len() + self.payload.len()) as u64
    }

    /// As a `quire.v1.SealedScribe`.
    pub fn to_proto(&self) -> pb::SealedScribe {
        pb::SealedScribe {
            envelope: self.envelope.clone(),
            payload: self.payload.clone(),
            seal: self.seal.clone(),
            proof: Some(self.proof.to_proto()),
            redacted_by: self.redacted_by.clone().unwrap_or_default(),
        }
    }

    /// From a `quire.v1.SealedScribe`.
    pub fn from_proto(sealed: pb::SealedScribe) -> Result<Parts, ScribeError> {
        Ok(Parts {
            envelope: sealed.envelope,
            payload: sealed.payload,
            seal: sealed.seal,
            proof: Proof::from_proto(sealed.proof)?,
            leaves: None,
            redacted_by: (!sealed.redacted_by.is_empty()).then_some(sealed.redacted_by),
        })
    }
}

/// A decoded, sealed scribe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scribe {
    /// The exact envelope bytes: what is stored, hashed and sent.
    pub envelope: Bytes,
    /// sha256 of `envelope`.
    pub id: ScribeId,
    /// The decoded fields and the payload.
    pub body: Body,
    /// sha256 of the payload (the envelope's `payload_sha256`).
    pub payload_sha256: [u8; 32],
    /// Its seal (shared by every scribe it covers).
    pub seal: Arc<Seal>,
    /// Proof that `seal` covers `id`.
    pub proof: Proof,
    /// Every id `seal` covers, in order, when they are known here (the seal was just made by
    /// [`seal_all`]): a store can then keep them once instead of a proof per scribe.
    pub leaves: Option<Leaves>,
    /// The payload's length, as the envelope names it (also when it was redacted).
    pub payload_len: u64,
    /// The payload was redacted (`body.payload` is empty): the encoded `redact` scribe that
    /// justifies it, unchecked here (see [`Parts::redacted_by`]).
    pub redacted_by: Option<Bytes>,
}

/// SHA-256 of `bytes` as a scribe id.
pub fn hash(bytes: &[u8]) -> ScribeId {
    ScribeId(sha256(bytes))
}

/// Number of leading zero bits of a hash.
pub fn leading_zero_bits(hash: &[u8; 32]) -> u32 {
    let mut bits = 0;
    for byte in hash {
        if *byte == 0 {
            bits += 8;
        } else {
            bits += byte.leading_zeros();
            break;
        }
    }
    bits
}

/// Seals `unsealed` (every one by `key`'s author) with one signature over the Merkle root of their
/// ids, in order: one signature per [`MAX_SEAL_COUNT`] ids, since no node accepts a seal over more
/// (a node-signed group of that many comes from one large `AppendBatch`).
pub fn seal_all(unsealed: Vec<Unsealed>, key: &SigningKey) -> Vec<Scribe> {
    let mut sealed = Vec::with_capacity(unsealed.len());
    let mut rest = unsealed.into_iter().peekable();
    while rest.peek().is_some() {
        let chunk: Vec<Unsealed> = rest.by_ref().take(MAX_SEAL_COUNT as usize).collect();
        sealed.extend(seal_one_tree(chunk, key));
    }
    sealed
}

/// Seals 1 to [`MAX_SEAL_COUNT`] envelopes with one signature.
fn seal_one_tree(unsealed: Vec<Unsealed>, key: &SigningKey) -> Vec<Scribe> {
    debug_assert!(!unsealed.is_empty() && unsealed.len() as u64 <= MAX_SEAL_COUNT);
    let ids: Vec<ScribeId> = unsealed.iter().map(|u| u.id).collect();
    let (root, proofs) = merkle::tree(&ids);
    let seal = Arc::new(Seal::sign(key, ids.len() as u64, root));
    let leaves: Option<Leaves> = (ids.len() > 1).then(|| ids.into());
    unsealed
        .into_iter()
        .zip(proofs)
        .map(|(unsealed, proof)| {
            debug_assert_eq!(key.verifying_key().to_bytes(), unsealed.body.author.0);
            let payload_len = unsealed.body.payload.len() as u64;
            Scribe {
                envelope: unsealed.envelope,
                id: unsealed.id,
                body: unsealed.body,
                payload_sha256: unsealed.payload_sha256,
                seal: seal.clone(),
                proof,
                leaves: leaves.clone(),
                payload_len,
                redacted_by: None,
            }
        })
        .collect()
}

impl Scribe {
    /// Seals `body` alone with `key` (whose public key must be `body.author`).
    pub fn sign(body: Body, key: &SigningKey) -> Scribe {
        Self::sign_with_work(body, key, 0)
    }

    /// Seals `body` alone after choosing a nonce that gives its id at least `work_bits` leading
    /// zero bits (the stream policy's work token).
    pub fn sign_with_work(body: Body, key: &SigningKey, work_bits: u32) -> Scribe {
        seal_all(vec![body.into_unsealed(work_bits)], key)
            .pop()
            .expect("one sealed")
    }

    /// The parts to store and send.
    pub fn parts(&self) -> Parts {
        Parts {
            envelope: self.envelope.clone(),
            payload: self.body.payload.clone(),
            seal: self.seal.bytes.clone(),
            proof: self.proof.clone(),
            leaves: self.leaves.clone(),
            redacted_by: self.redacted_by.clone(),
        }
    }

    /// Size counted against a stream's limits: envelope and payload (the length its envelope
    /// names, so a redacted scribe counts as it did with its payload, on every node).
    pub fn size(&self) -> u64 {
        self.envelope.len() as u64 + self.payload_len
    }

    /// Decodes and fully verifies `parts`: envelope format, canonical encoding and field shapes,
    /// the payload against the envelope, the proof against the seal, and the seal's signature.
    /// The id is sha256 of the envelope as given.
    pub fn decode(parts: Parts) -> Result<Scribe, ScribeError> {
        let scribe = Self::decode_unverified(parts, None)?;
        scribe.seal.verify()?;
        Ok(scribe)
    }

    /// Like [`Scribe::decode`], and also checks that the envelope hashes to `claimed`.
    pub fn decode_claimed(parts: Parts, claimed: ScribeId) -> Result<Scribe, ScribeError> {
        let actual = hash(&parts.envelope);
        if actual != claimed {
            return Err(ScribeError::BadHash { claimed, actual });
        }
        Self::decode(parts)
    }

    /// Everything [`Scribe::decode`] checks but the seal's signature, for a caller that verifies
    /// each distinct seal once ([`Seal::verify`]). `seal`: the seal already decoded from
    /// `parts.seal` (shared by many scribes); `None` decodes it.
    pub fn decode_unverified(parts: Parts, seal: Option<Arc<Seal>>) -> Result<Scribe, ScribeError> {
        let (mut body, payload_sha256, payload_len) = decode_envelope(&parts.envelope)?;
        let id = hash(&parts.envelope);
        if let Some(redaction) = &parts.redacted_by {
            if !parts.payload.is_empty() {
                return Err(ScribeError::Malformed(
                    "a redacted scribe carries no payload; send either the payload or redacted_by"
                        .into(),
                ));
            }
            if redaction.len() > MAX_REDACTION_BYTES {
                return Err(ScribeError::TooLarge {
                    part: "redacted_by",
                    size: redaction.len() as u64,
                    limit: MAX_REDACTION_BYTES as u64,
                });
            }
        }
        let actual = sha256(&parts.payload);
        if parts.redacted_by.is_none()
            && (actual != payload_sha256 || parts.payload.len() as u64 != payload_len)
        {
            return Err(ScribeError::BadPayload {
                expected: hex::encode(payload_sha256),
                expected_len: payload_len,
                actual: hex::encode(actual),
                actual_len: parts.payload.len() as u64,
            });
        }
        body.payload = parts.payload;
        let seal = match seal {
            Some(seal) if seal.bytes == parts.seal => seal,
            _ => Arc::new(Seal::decode(parts.seal)?),
        };
        if seal.author != body.author {
            return Err(ScribeError::WrongSealer {
                sealer: seal.author,
                author: body.author,
            });
        }
        merkle::check(&id, &parts.proof, seal.count, &seal.root)
            .map_err(|reason| ScribeError::NotCovered { id, reason })?;
        if let Some(leaves) = &parts.leaves {
            // The proof checks, so these leaves are the sealed list only if they are as many.
            if leaves.len() as u64 != seal.count
                || leaves.get(parts.proof.index as usize) != Some(&id)
            {
                return Err(ScribeError::NotCovered {
                    id,
                    reason: format!(
                        "the seal's leaves ({} ids) are not the {} it seals, with this id at {}",
                        leaves.len(),
                        seal.count,
                        parts.proof.index
                    ),
                });
            }
        }
        Ok(Scribe {
            envelope: parts.envelope,
            id,
            body,
            payload_sha256,
            seal,
            proof: parts.proof,
            leaves: parts.leaves,
            payload_len,
            redacted_by: parts.redacted_by,
        })
    }

    /// The stream this scribe belongs to: its own id for a genesis.
    pub fn stream_id(&self) -> StreamId {
        self.body.stream.unwrap_or(self.id)
    }
}

/// Decodes an envelope (format, canonical encoding, field shapes) into a body with an *empty*
/// payload, plus the payload's sha256 and length the envelope names. No hashing of the envelope,
/// no payload: what a reader of stored scribes needs to learn a scribe's fields.
pub fn decode_envelope(bytes: &Bytes) -> Result<(Body, [u8; 32], u64), ScribeError> {
    parse_envelope(bytes, true)
}

/// [`decode_envelope`] for an envelope read back from this node's own store, which was checked in
/// full when it was admitted: skips the canonical re-encoding (a rebuild reads every scribe).
pub fn decode_stored_envelope(bytes: &Bytes) -> Result<(Body, [u8; 32], u64), ScribeError> {
    parse_envelope(bytes, false)
}

fn parse_envelope(bytes: &Bytes, canonical: bool) -> Result<(Body, [u8; 32], u64), ScribeError> {
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(ScribeError::TooLarge {
            part: "envelope",
            size: bytes.len() as u64,
            limit: MAX_ENVELOPE_BYTES as u64,
        });
    }
    let envelope = pb::Envelope::decode(bytes.clone())
        .map_err(|error| ScribeError::Malformed(format!("envelope: {error}")))?;
    if envelope.format != FORMAT_V2 {
        return Err(ScribeError::UnsupportedFormat(envelope.format));
    }
    if canonical && (envelope.encoded_len() != bytes.len() || envelope.encode_to_vec() != *bytes) {
        return Err(ScribeError::NotCanonical { part: "envelope" });
    }
    let kind: Kind = envelope.kind.parse()?;
    let id_of = |field: &str, value: &Bytes| {
        ScribeId::from_slice(value).map_err(|_| {
            ScribeError::Malformed(format!("{field} must be 32 bytes, got {}", value.len()))
        })
    };
    let stream = if envelope.stream.is_empty() {
        None
    } else {
        Some(id_of("stream", &envelope.stream)?)
    };
    match (&kind, stream) {
        (Kind::StreamCreate, Some(_)) => {
            return Err(ScribeError::Malformed(
                "a stream.create genesis must have an empty stream field".into(),
            ))
        }
        (kind, None) if *kind != Kind::StreamCreate => {
            return Err(ScribeError::Malformed(format!(
                "a {kind} scribe needs a 32-byte stream id; only stream.create has none"
            )))
        }
        _ => {}
    }
    check_shape(
        &envelope.content_type,
        envelope.parents.len(),
        envelope.payload_len,
    )?;
    let author = AuthorKey::from_slice(&envelope.author).map_err(|_| {
        ScribeError::Malformed(format!(
            "author must be a 32-byte Ed25519 key, got {} bytes",
            envelope.author.len()
        ))
    })?;
    let parents = envelope
        .parents
        .iter()
        .map(|parent| id_of("parent ids", parent))
        .collect::<Result<Vec<_>, _>>()?;
    let payload_sha256: [u8; 32] = envelope.payload_sha256.as_ref().try_into().map_err(|_| {
        ScribeError::Malformed(format!(
            "payload_sha256 must be 32 bytes, got {}",
            envelope.payload_sha256.len()
        ))
    })?;
    let membership = if envelope.membership.is_empty() {
        None
    } else {
        Some(id_of("membership", &envelope.membership)?)
    };
    Ok((
        Body {
            stream,
            author,
            hlc: envelope.hlc,
            kind,
            content_type: envelope.content_type,
            payload: Bytes::new(),
            parents,
            membership,
            nonce: envelope.nonce,
        },
        payload_sha256,
        envelope.payload_len,
    ))
}
