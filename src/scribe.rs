//! The scribe: encoding, signing, decoding and verifying the exact bytes of a change.
//!
//! A scribe is an encoded `quire.v1.Scribe` envelope (`format`, `body`, `signature`) whose body is an
//! encoded `quire.v1.ScribeBody`. Its id is SHA-256 of the envelope bytes exactly as received;
//! nothing here ever re-encodes a scribe in order to hash or forward it (BRIEF invariant 1). The
//! canonical-encoding check below re-encodes only to *compare*: a scribe whose bytes are not the one
//! canonical encoding of its fields is refused, so the same signed body can never travel under two
//! ids. `docs/protocol.md` documents the bytes.
//!
//! What is *not* here: anything that needs storage (is the stream known, is the author allowed, are
//! the parents stored) — that is `crate::log`.

use bytes::Bytes;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use prost::Message;
use quire_projection_api::{AuthorKey, Kind, ParseError, ScribeId, StreamId};
use sha2::{Digest, Sha256};

use crate::pb;

/// The envelope format this version writes and reads: one Ed25519 signature over
/// [`SIGNING_PREFIX`] followed by the body bytes.
pub const FORMAT_V1: u32 = 1;

/// Domain-separation prefix of every format-1 signature, so a quire signature can never be
/// mistaken for a signature over anything else.
pub const SIGNING_PREFIX: &[u8; 16] = b"quire.scribe.v1\0";

/// Longest `content_type`, in bytes.
pub const MAX_CONTENT_TYPE_BYTES: usize = 256;
/// Most parents one scribe may name.
pub const MAX_PARENTS: usize = 64;
/// Largest payload any policy may allow (a policy's own limit is usually lower).
pub const HARD_MAX_PAYLOAD_BYTES: u64 = 32 * 1024 * 1024;
/// Largest encoded scribe accepted at all: the hard payload cap plus room for the other fields.
pub const MAX_SCRIBE_BYTES: usize = HARD_MAX_PAYLOAD_BYTES as usize + 64 * 1024;

/// Why a byte string is not a valid scribe. Every variant means "refuse it": nothing is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScribeError {
    /// The bytes do not decode as a `quire.v1.Scribe` / `ScribeBody`.
    #[error("malformed scribe: {0}")]
    Malformed(String),
    /// The envelope says a format this node does not know.
    #[error("unsupported scribe format {0}; this node reads format {FORMAT_V1}")]
    UnsupportedFormat(u32),
    /// The bytes decode, but are not the canonical encoding of what they decode to.
    #[error("scribe {part} is not canonically encoded (fields in number order, defaults omitted, no unknown or repeated fields); encode it with a standard protobuf library")]
    NotCanonical {
        /// `envelope` or `body`.
        part: &'static str,
    },
    /// The signature does not verify against the body's author key.
    #[error("bad signature: the scribe is not signed by its author {author}")]
    BadSignature {
        /// The key the body claims as author.
        author: AuthorKey,
    },
    /// The id a sender claimed is not the SHA-256 of the bytes.
    #[error("bad hash: the scribe's bytes hash to {actual}, not to the claimed id {claimed}")]
    BadHash {
        /// What the sender said.
        claimed: ScribeId,
        /// sha256 of the bytes.
        actual: ScribeId,
    },
    /// Larger than [`MAX_SCRIBE_BYTES`].
    #[error("scribe of {0} bytes is larger than the hard limit of {MAX_SCRIBE_BYTES} bytes")]
    TooLarge(usize),
}

impl From<ParseError> for ScribeError {
    fn from(error: ParseError) -> Self {
        ScribeError::Malformed(error.to_string())
    }
}

/// The fields of a scribe body, decoded. `stream` is `None` exactly for a genesis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    /// The stream; `None` in a `stream.create` genesis.
    pub stream: Option<StreamId>,
    /// Who signs it.
    pub author: AuthorKey,
    /// Hybrid logical clock of the author when written.
    pub hlc: u64,
    /// What it does.
    pub kind: Kind,
    /// MIME type of the payload.
    pub content_type: String,
    /// The payload.
    pub payload: Bytes,
    /// Scribes of the same stream it refers to.
    pub parents: Vec<ScribeId>,
    /// Work-token nonce.
    pub nonce: u64,
}

impl Body {
    /// The canonical encoding of this body: the bytes an author signs.
    pub fn encode(&self) -> Vec<u8> {
        self.to_proto().encode_to_vec()
    }

    fn to_proto(&self) -> pb::ScribeBody {
        pb::ScribeBody {
            stream: self
                .stream
                .map(|id| Bytes::copy_from_slice(id.as_bytes()))
                .unwrap_or_default(),
            author: Bytes::copy_from_slice(self.author.as_bytes()),
            hlc: self.hlc,
            kind: self.kind.as_str().to_string(),
            content_type: self.content_type.clone(),
            payload: self.payload.clone(),
            parents: self
                .parents
                .iter()
                .map(|id| Bytes::copy_from_slice(id.as_bytes()))
                .collect(),
            nonce: self.nonce,
        }
    }

    pub(crate) fn from_proto(body: pb::ScribeBody) -> Result<Body, ScribeError> {
        let kind: Kind = body.kind.parse()?;
        let stream = if body.stream.is_empty() {
            None
        } else {
            Some(StreamId::from_slice(&body.stream).map_err(|_| {
                ScribeError::Malformed(format!(
                    "stream must be 32 bytes, got {}",
                    body.stream.len()
                ))
            })?)
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
        check_shape(&body.content_type, body.parents.len(), body.payload.len())?;
        let author = AuthorKey::from_slice(&body.author).map_err(|_| {
            ScribeError::Malformed(format!(
                "author must be a 32-byte Ed25519 key, got {} bytes",
                body.author.len()
            ))
        })?;
        let parents = body
            .parents
            .iter()
            .map(|parent| {
                ScribeId::from_slice(parent).map_err(|_| {
                    ScribeError::Malformed(format!(
                        "parent ids must be 32 bytes, got {}",
                        parent.len()
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Body {
            stream,
            author,
            hlc: body.hlc,
            kind,
            content_type: body.content_type,
            payload: body.payload,
            parents,
            nonce: body.nonce,
        })
    }
}

/// The size rules every body obeys, checked when decoding and before the node signs anything:
/// a content type of at most [`MAX_CONTENT_TYPE_BYTES`], at most [`MAX_PARENTS`] parents and a
/// payload of at most [`HARD_MAX_PAYLOAD_BYTES`].
pub fn check_shape(content_type: &str, parents: usize, payload: usize) -> Result<(), ScribeError> {
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
    if payload as u64 > HARD_MAX_PAYLOAD_BYTES {
        return Err(ScribeError::TooLarge(payload));
    }
    Ok(())
}

/// A decoded scribe: its exact bytes, its id, and its body's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scribe {
    /// The exact encoded envelope: what is stored, hashed and sent.
    pub bytes: Bytes,
    /// sha256 of `bytes`.
    pub id: ScribeId,
    /// The decoded body.
    pub body: Body,
    /// The body bytes inside `bytes` (a zero-copy slice, never re-encoded): what was signed.
    pub body_bytes: Bytes,
    /// sha256 of the body bytes: what a work token is judged on.
    pub body_hash: [u8; 32],
}

/// SHA-256 of `bytes` as a scribe id.
pub fn hash(bytes: &[u8]) -> ScribeId {
    ScribeId(Sha256::digest(bytes).into())
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

impl Scribe {
    /// Signs `body` with `key` (whose public key must be `body.author`) and encodes the envelope.
    pub fn sign(body: Body, key: &SigningKey) -> Scribe {
        debug_assert_eq!(key.verifying_key().to_bytes(), body.author.0);
        let body_bytes = Bytes::from(body.encode());
        let signature = key.sign(&signing_message(&body_bytes));
        Self::seal(body, body_bytes, signature)
    }

    /// Signs `body` after choosing a nonce that gives sha256(body) at least `work_bits` leading
    /// zero bits (the stream policy's work token). With `work_bits` 0 this is [`Scribe::sign`].
    pub fn sign_with_work(mut body: Body, key: &SigningKey, work_bits: u32) -> Scribe {
        if work_bits == 0 {
            return Self::sign(body, key);
        }
        // `nonce` is the body's last field, so the encoding is `prefix ‖ 0x40 ‖ varint(nonce)`
        // (nothing at all for nonce 0): hash the prefix once and only the nonce per try.
        body.nonce = 0;
        let prefix = body.encode();
        let mut prefix_hash = Sha256::new();
        prefix_hash.update(&prefix);
        let mut suffix = Vec::with_capacity(11);
        let mut nonce: u64 = 0;
        loop {
            suffix.clear();
            if nonce != 0 {
                suffix.push(0x40);
                prost::encoding::encode_varint(nonce, &mut suffix);
            }
            let mut hasher = prefix_hash.clone();
            hasher.update(&suffix);
            let hash: [u8; 32] = hasher.finalize().into();
            if leading_zero_bits(&hash) >= work_bits {
                body.nonce = nonce;
                let mut body_bytes = prefix;
                body_bytes.extend_from_slice(&suffix);
                debug_assert_eq!(body_bytes, body.encode());
                let body_bytes = Bytes::from(body_bytes);
                let signature = key.sign(&signing_message(&body_bytes));
                return Self::seal(body, body_bytes, signature);
            }
            nonce = nonce.wrapping_add(1);
        }
    }

    fn seal(body: Body, body_bytes: Bytes, signature: Signature) -> Scribe {
        let body_hash: [u8; 32] = Sha256::digest(&body_bytes).into();
        let envelope = pb::Scribe {
            format: FORMAT_V1,
            body: body_bytes.clone(),
            signature: Bytes::copy_from_slice(&signature.to_bytes()),
        };
        let bytes = Bytes::from(envelope.encode_to_vec());
        Scribe {
            id: hash(&bytes),
            bytes,
            body,
            body_bytes,
            body_hash,
        }
    }

    /// Decodes and fully verifies `bytes`: format, canonical encoding, field shapes and the
    /// author's signature. The id is sha256 of `bytes` as given.
    pub fn decode(bytes: Bytes) -> Result<Scribe, ScribeError> {
        let (scribe, signature) = Self::decode_unverified(bytes)?;
        scribe.verify_signature(&signature)?;
        Ok(scribe)
    }

    /// Like [`Scribe::decode`], and also checks that the bytes hash to `claimed`.
    pub fn decode_claimed(bytes: Bytes, claimed: ScribeId) -> Result<Scribe, ScribeError> {
        let actual = hash(&bytes);
        if actual != claimed {
            return Err(ScribeError::BadHash { claimed, actual });
        }
        Self::decode(bytes)
    }

    /// Decodes without checking the signature; returns the signature for a later (batch) check.
    pub fn decode_unverified(bytes: Bytes) -> Result<(Scribe, Signature), ScribeError> {
        if bytes.len() > MAX_SCRIBE_BYTES {
            return Err(ScribeError::TooLarge(bytes.len()));
        }
        let envelope = pb::Scribe::decode(bytes.clone())
            .map_err(|error| ScribeError::Malformed(format!("envelope: {error}")))?;
        if envelope.format != FORMAT_V1 {
            return Err(ScribeError::UnsupportedFormat(envelope.format));
        }
        if envelope.encoded_len() != bytes.len() || envelope.encode_to_vec() != bytes {
            return Err(ScribeError::NotCanonical { part: "envelope" });
        }
        let signature = Signature::from_slice(&envelope.signature).map_err(|_| {
            ScribeError::Malformed(format!(
                "signature must be 64 bytes, got {}",
                envelope.signature.len()
            ))
        })?;
        let body_proto = pb::ScribeBody::decode(envelope.body.clone())
            .map_err(|error| ScribeError::Malformed(format!("body: {error}")))?;
        if body_proto.encoded_len() != envelope.body.len()
            || body_proto.encode_to_vec() != envelope.body
        {
            return Err(ScribeError::NotCanonical { part: "body" });
        }
        let body = Body::from_proto(body_proto)?;
        let body_hash: [u8; 32] = Sha256::digest(&envelope.body).into();
        let scribe = Scribe {
            id: hash(&bytes),
            bytes,
            body,
            body_bytes: envelope.body,
            body_hash,
        };
        Ok((scribe, signature))
    }

    /// Checks `signature` over this scribe's body bytes against its author key (strict Ed25519:
    /// no malleable or small-order forms).
    pub fn verify_signature(&self, signature: &Signature) -> Result<(), ScribeError> {
        let bad = || ScribeError::BadSignature {
            author: self.body.author,
        };
        let key = VerifyingKey::from_bytes(&self.body.author.0).map_err(|_| bad())?;
        key.verify_strict(&signing_message(&self.body_bytes), signature)
            .map_err(|_| bad())
    }

    /// The stream this scribe belongs to: its own id for a genesis.
    pub fn stream_id(&self) -> StreamId {
        self.body.stream.unwrap_or(self.id)
    }
}

fn signing_message(body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNING_PREFIX.len() + body.len());
    message.extend_from_slice(SIGNING_PREFIX);
    message.extend_from_slice(body);
    message
}
