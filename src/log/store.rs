//! RocksDB storage of the log: the only module that knows key layouts and column families.
//!
//! Column families (keys and values are documented byte for byte in `docs/protocol.md`):
//! - `scribes`:   scribe id (32) → local seq (u64 BE) ‖ payload sha256 (32) ‖ seal id (32) ‖ proof
//!   index (u64 BE) ‖ sibling count (u8) ‖ siblings (32 each) ‖ exact envelope bytes. Sibling count
//!   0xff: no siblings stored, the proof is derived from the seal's stored leaves (seals this node
//!   made itself, whose every id it knows: a proof per scribe would cost more than its payload).
//!   Then the payload's length (u32 BE) and the payload itself when it is at most
//!   [`INLINE_PAYLOAD_BYTES`], or 0xffffffff when it is in `payloads`, or 0xfffffffe when it was
//!   redacted, then the length (u32 BE) and bytes of the encoded `quire.v1.SealedScribe` of the
//!   `redact` scribe that justifies it.
//! - `payloads`:  payload sha256 (32) → payload bytes, once however many scribes name it (payloads
//!   over [`INLINE_PAYLOAD_BYTES`]; a small one is kept in its scribe's record: storing it apart
//!   would cost a lookup on every write and read to save at most that many bytes); and beside it,
//!   payload sha256 (32) ‖ scribe id (32) → empty, one per scribe that names it, so a payload is
//!   deleted only when no stored scribe names it any more (see [`Store::leave_chunk`])
//! - `seals`:     seal id (sha256 of its bytes, 32) → seal length (u16 BE) ‖ exact encoded seal ‖
//!   its leaves, the ids it covers in order (32 each), when this node knows them
//! - `log`:       local seq (u64 BE) → scribe id (32), or empty: the seq was vacated when this
//!   node left the scribe's stream (never given out again; readers skip it)
//! - `by_stream`: stream id (32) ‖ local seq (u64 BE) → scribe id (32) ‖ for scribes received from
//!   a peer: its node id (32) ‖ its log epoch (16) ‖ the scribe's seq there (u64 BE; absent in
//!   records written before epochs had histories), so they are not sent back while it holds them
//! - `streams`:   stream id (32) → [`StreamRecord`] (4 × u64 BE)
//! - `cursors`:   peer node id (32) ‖ stream id (32) → peer log epoch (16) ‖ last peer seq taken (u64 BE)
//! - `peers`:     peer address (UTF-8) → empty (peers to dial, remembered across restarts)
//! - `joins`:     stream id (32) → empty (joins waiting for a peer that has the genesis)
//! - `projections`: the projection runner's own records (live and shadow generations, quarantine,
//!   durable consumers' acks), laid out by `crate::projection`; this module only stores them
//! - `held`:      0 ‖ its clock (u64 BE) ‖ scribe id (32), or, refused by a rule of a peer's other
//!   version, 1 ‖ the version (u32 BE) ‖ clock ‖ id → where it came from
//!   (0: a client of this node; 1: a peer, then its node id (32) ‖ epoch (16) ‖ the scribe's seq
//!   there (u64 BE)) ‖ the scribe as an encoded `quire.v1.SealedScribe`: scribes dated too far
//!   ahead of this node's clock, kept aside until it catches up (see `log::held`)
//! - `default`:   metadata: `format`, `epoch` (the current log epoch (16) ‖ the earlier ones, oldest
//!   first: epoch (16) ‖ the head it ended at (u64 BE); see `log::epoch`), `head`, `hlc`,
//!   `payload_refs` (present once every payload reference is indexed), `leaving/` ‖ stream id (32)
//!   (a stream being left: its scribes are still being deleted)
//!
//! Contract: [`Store::commit`] writes a whole [`Commit`] in one RocksDB write batch (all or
//! nothing), so the log, its indexes, the stream records, the head and the clock high-water mark can
//! never disagree after a crash. Reads never see a seq above the head passed in by the caller, so
//! readers only ever see a committed, contiguous prefix. Validation is not done here (see
//! `log::Log`): this module stores what it is given.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Weak};

use super::epoch::Epochs;
use crate::scribe::{decode_stored_envelope, merkle, Leaves, Parts, Proof};
use bytes::Bytes;
use quire_projection_api::{AuthorKey, ScribeId, StreamId};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions, WriteBatch,
    WriteOptions, DB,
};

const CF_SCRIBES: &str = "scribes";
const CF_LOG: &str = "log";
const CF_BY_STREAM: &str = "by_stream";
const CF_STREAMS: &str = "streams";
const CF_CURSORS: &str = "cursors";
const CF_PEERS: &str = "peers";
const CF_JOINS: &str = "joins";
const CF_PROJECTIONS: &str = "projections";
const CF_PAYLOADS: &str = "payloads";
const CF_SEALS: &str = "seals";
const CF_HELD: &str = "held";
const CF_PEER_KEYS: &str = "peer_keys";
const CF_MEMBERSHIP: &str = "membership";
const CF_USAGE: &str = "usage";
const COLUMN_FAMILIES: [&str; 14] = [
    CF_SCRIBES,
    CF_PAYLOADS,
    CF_SEALS,
    CF_LOG,
    CF_BY_STREAM,
    CF_STREAMS,
    CF_CURSORS,
    CF_PEERS,
    CF_PEER_KEYS,
    CF_MEMBERSHIP,
    CF_USAGE,
    CF_JOINS,
    CF_PROJECTIONS,
    CF_HELD,
];

const META_FORMAT: &[u8] = b"format";
const META_EPOCH: &[u8] = b"epoch";
const META_HEAD: &[u8] = b"head";
const META_HLC: &[u8] = b"hlc";
const META_PAYLOAD_REFS: &[u8] = b"payload_refs";
const META_LEAVING: &[u8] = b"leaving/";
const META_PURGE: &[u8] = b"purge";

/// Whose usage of which stream a quota counts: one author's scribes in one stream, in all
/// ([`UsageKey::TOTAL`]) or dated within one UTC day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UsageKey {
    /// The stream.
    pub stream: StreamId,
    /// The author.
    pub author: AuthorKey,
    /// The UTC day (days since the epoch, by the scribes' clocks), or [`UsageKey::TOTAL`].
    pub day: u64,
}

impl UsageKey {
    /// The day of a stream's whole usage.
    pub const TOTAL: u64 = u64::MAX;

    fn encode(&self) -> [u8; 72] {
        let mut key = [0u8; 72];
        key[..32].copy_from_slice(self.stream.as_bytes());
        key[32..64].copy_from_slice(self.author.as_bytes());
        key[64..].copy_from_slice(&self.day.to_be_bytes());
        key
    }
}

/// Scribes and bytes counted against a quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Scribes.
    pub scribes: u64,
    /// Their bytes (envelopes and payloads).
    pub bytes: u64,
}

impl Usage {
    fn encode(&self) -> [u8; 16] {
        let mut value = [0u8; 16];
        value[..8].copy_from_slice(&self.scribes.to_be_bytes());
        value[8..].copy_from_slice(&self.bytes.to_be_bytes());
        value
    }

    fn decode(value: &[u8]) -> Option<Usage> {
        Some(Usage {
            scribes: u64::from_be_bytes(value.get(..8)?.try_into().ok()?),
            bytes: u64::from_be_bytes(value.get(8..16)?.try_into().ok()?),
        })
    }
}

/// What this node says of one peer node key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKeyRule {
    /// It may replicate with this node, also under `--peers known`.
    Allow,
    /// It may not, whatever `--peers` says.
    Deny,
}

/// The storage format this version writes; a data directory with another is refused. Format 2
/// holds scribe format 2 (envelope, detached payload, seal); format 1 held format-1 scribes.
pub const STORE_FORMAT: u64 = 2;

/// Storage errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// RocksDB said no.
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// The data directory was written by another storage format.
    #[error("data directory has storage format {found}, this quire reads format {STORE_FORMAT} (scribe format 2: signed envelopes, detached payloads, seals); nothing was changed. Read it with the quire version that wrote it, or start this version on a new data directory and join its streams again from a peer")]
    Format {
        /// What the directory says.
        found: u64,
    },
    /// The log is closing (the node is shutting down).
    #[error(
        "the node is shutting down; reconnect to a running node and resume from the last seq seen"
    )]
    Closed,
    /// A stored value has the wrong shape: the store is damaged.
    #[error("damaged store: {0}; run `quire verify -d <data dir>` for a full report")]
    Damaged(String),
    /// The node left the stream being read (`quire stream leave`).
    #[error("this node left stream {0} (`quire stream leave`): its scribes are deleted here; join it again to read it")]
    Left(StreamId),
}

/// A raw key and value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Per-stream counters kept beside the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamRecord {
    /// Local seq of the genesis scribe.
    pub genesis_seq: u64,
    /// Local seq of the newest scribe of the stream.
    pub head_seq: u64,
    /// Scribes held, genesis included.
    pub scribes: u64,
    /// Their total size: envelopes and payloads (a payload shared with other scribes counts for
    /// each).
    pub bytes: u64,
}

impl StreamRecord {
    fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[0..8].copy_from_slice(&self.genesis_seq.to_be_bytes());
        out[8..16].copy_from_slice(&self.head_seq.to_be_bytes());
        out[16..24].copy_from_slice(&self.scribes.to_be_bytes());
        out[24..32].copy_from_slice(&self.bytes.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<StreamRecord, StoreError> {
        if bytes.len() != 32 {
            return Err(StoreError::Damaged(format!(
                "stream record of {} bytes",
                bytes.len()
            )));
        }
        let field =
            |index: usize| u64::from_be_bytes(bytes[index * 8..index * 8 + 8].try_into().unwrap());
        Ok(StreamRecord {
            genesis_seq: field(0),
            head_seq: field(1),
            scribes: field(2),
            bytes: field(3),
        })
    }
}

/// Everything one group commit writes.
#[derive(Debug, Default)]
pub struct Commit {
    /// New scribes with their seqs, in seq order, starting at the old head + 1.
    pub scribes: Vec<NewEntry>,
    /// The new records of every stream these scribes touch.
    pub streams: Vec<(StreamId, StreamRecord)>,
    /// The new head (the last seq in `scribes`).
    pub head: u64,
    /// The clock high-water mark to persist.
    pub hlc: u64,
    /// Replication cursors covered by this commit (written in the same batch: invariant 6).
    pub cursors: Vec<CursorUpdate>,
    /// Per-author usage of streams with quotas, as it stands after this commit.
    pub usage: Vec<(UsageKey, Usage)>,
    /// Held scribes released by this commit (admitted or refused now): deleted first.
    pub released: Vec<HeldKey>,
    /// Scribes kept aside by this commit, to enter the log later.
    pub held: Vec<(HeldKey, Vec<u8>)>,
    /// Payloads to delete: of stored scribes, or of scribes of this commit (stored redacted).
    pub redactions: Vec<Redaction>,
}

/// The key of a held scribe. Scribes waiting for the clock come first, in clock order (so a
/// parent enters the log before its children: a child's clock is above its parent's); then
/// scribes a rule refused, from a peer with other rules, by the version that refused them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HeldKey {
    /// `Some(version)`: refused by that version of the rules, waiting for the node's rules to
    /// change ([`Store::requeue_held_for_rules`]); `None`: waiting for the clock.
    pub rules: Option<u32>,
    /// The scribe's clock.
    pub hlc: u64,
    /// The scribe.
    pub id: ScribeId,
}

impl HeldKey {
    /// 0 ‖ hlc (u64 BE) ‖ id (32), or 1 ‖ rules version (u32 BE) ‖ hlc ‖ id.
    fn encode(&self) -> Vec<u8> {
        let mut key = Vec::with_capacity(45);
        match self.rules {
            None => key.push(0),
            Some(version) => {
                key.push(1);
                key.extend_from_slice(&version.to_be_bytes());
            }
        }
        key.extend_from_slice(&self.hlc.to_be_bytes());
        key.extend_from_slice(self.id.as_bytes());
        key
    }

    fn decode(key: &[u8]) -> Option<HeldKey> {
        let (rules, rest) = match key.first()? {
            0 => (None, &key[1..]),
            1 => (
                Some(u32::from_be_bytes(key.get(1..5)?.try_into().ok()?)),
                &key[5..],
            ),
            _ => return None,
        };
        if rest.len() != 40 {
            return None;
        }
        Some(HeldKey {
            rules,
            hlc: u64::from_be_bytes(rest[..8].try_into().ok()?),
            id: ScribeId::from_slice(&rest[8..]).ok()?,
        })
    }
}

/// A held scribe as stored: its key and value bytes (see `log::held` for the value's layout).
pub type HeldRecord = (HeldKey, Vec<u8>);

/// Where a replicated scribe came from: the peer, its log epoch then and the scribe's seq there. A
/// scribe is not sent back to that peer while the peer still holds it at that seq (see
/// `log::epoch`); a peer whose log was wiped or lost its tail gets it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerOrigin {
    /// The peer's node id.
    pub peer: AuthorKey,
    /// The peer's log epoch.
    pub epoch: [u8; 16],
    /// The scribe's seq in the peer's log ([`u64::MAX`]: not recorded, by a version before
    /// epochs had histories; the peer holds it only while that epoch is current).
    pub seq: u64,
}

/// "Everything of `stream` up to the peer's local seq `seq` (in log epoch `epoch`) has been taken."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorUpdate {
    /// The peer's node id.
    pub peer: AuthorKey,
    /// The stream.
    pub stream: StreamId,
    /// The peer's log epoch the seq belongs to.
    pub epoch: [u8; 16],
    /// The last peer seq taken.
    pub seq: u64,
}

/// A stored replication cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The peer's log epoch.
    pub epoch: [u8; 16],
    /// The last peer seq taken.
    pub seq: u64,
}

/// One scribe to store.
#[derive(Debug, Clone)]
pub struct NewEntry {
    /// Its local seq.
    pub seq: u64,
    /// Its id.
    pub id: ScribeId,
    /// Its stream.
    pub stream: StreamId,
    /// Its envelope, payload, seal and proof.
    pub parts: Parts,
    /// sha256 of the payload (the key it is stored under).
    pub payload_sha256: [u8; 32],
    /// sha256 of the seal (the key it is stored under).
    pub seal_id: [u8; 32],
    /// Every id the seal covers, in order, when this node knows them (it made the seal, or a peer
    /// sent them): then the proof is not stored per scribe but derived from these, stored once
    /// with the seal.
    pub seal_leaves: Option<Leaves>,
    /// The peer it was received from, if any.
    pub origin: Option<PeerOrigin>,
    /// A membership scribe (`acl.*`): indexed by stream, so a stream's membership loads at start
    /// without reading the stream ([`Store::membership_ids`]).
    pub membership: bool,
}

/// Sibling count of a record whose proof is derived from its seal's leaves.
const PROOF_FROM_LEAVES: u8 = 0xff;

/// Largest payload kept in its scribe's record rather than in `payloads` (stored once per hash).
pub const INLINE_PAYLOAD_BYTES: usize = 1024;

/// Payload length of a record whose payload is in `payloads`.
const PAYLOAD_APART: u32 = u32::MAX;

/// Payload length of a record whose payload was redacted.
const PAYLOAD_REDACTED: u32 = u32::MAX - 1;

/// Most keys one purge compacts range by range; past it, whole families.
const MAX_PURGE_RANGES: usize = 64;

/// A payload to delete because a `redact` scribe in the same commit targets its scribe.
#[derive(Debug, Clone)]
pub struct Redaction {
    /// The scribe whose payload goes.
    pub target: ScribeId,
    /// The encoded `quire.v1.SealedScribe` of the `redact` scribe (stored in the target's record,
    /// and sent with it to peers).
    pub justification: Bytes,
}

/// What the redactions of one commit know of the payloads they may delete.
struct PayloadsGone<'a> {
    /// Payloads this commit writes (a new scribe names them).
    written: &'a HashSet<[u8; 32]>,
    /// Every target this commit redacts: their references do not keep a payload.
    targets: HashSet<ScribeId>,
    /// Payloads this commit deletes already.
    deleted: HashSet<[u8; 32]>,
}

/// What a commit's redactions deleted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Redacted {
    /// Scribes whose payload went (not counting targets redacted already).
    pub scribes: Vec<ScribeId>,
    /// The payloads stored apart that were deleted (their keys are to be compacted away).
    pub hashes: Vec<[u8; 32]>,
}

impl std::ops::AddAssign for Redacted {
    fn add_assign(&mut self, other: Redacted) {
        self.scribes.extend(other.scribes);
        self.hashes.extend(other.hashes);
    }
}

/// What leaving a stream deleted (see [`Store::leave_chunk`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Vacated {
    /// Scribes deleted (their seqs vacated).
    pub scribes: u64,
    /// Payloads deleted (no stored scribe named them any more).
    pub payloads: u64,
    /// Their bytes.
    pub payload_bytes: u64,
    /// Seals deleted (none of their leaves is stored any more).
    pub seals: u64,
}

impl std::ops::AddAssign for Vacated {
    fn add_assign(&mut self, other: Vacated) {
        self.scribes += other.scribes;
        self.payloads += other.payloads;
        self.payload_bytes += other.payload_bytes;
        self.seals += other.seals;
    }
}

/// Most bytes of envelopes and payloads one read of a stream or of the log loads by default (it
/// always loads at least one scribe, of at most an envelope and the hard payload limit).
pub const READ_BYTES: usize = 4 << 20;

/// What one read of a stream or of the log found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The scribes, in seq order.
    pub entries: Vec<StoredEntry>,
    /// Whether a limit (the count or the bytes) ended it: more may follow the last before `to`.
    /// When false, everything up to `to` was read.
    pub more: bool,
}

/// A stored scribe with its local seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// Local seq.
    pub seq: u64,
    /// Scribe id (the key it is stored under).
    pub id: ScribeId,
    /// The exact stored envelope, its payload, seal and proof.
    pub parts: Parts,
    /// The peer it was received from (known on stream reads only).
    pub origin: Option<PeerOrigin>,
}

/// A `scribes` value, decoded (see the module docs for its bytes).
struct Record {
    seq: u64,
    payload_sha256: [u8; 32],
    seal_id: [u8; 32],
    index: u64,
    /// `None`: derive the proof from the seal's leaves.
    siblings: Option<Vec<[u8; 32]>>,
    /// `None`: the payload is in `payloads`. Empty when redacted.
    payload: Option<Bytes>,
    /// The encoded `redact` scribe, when the payload was redacted.
    redacted_by: Option<Bytes>,
    envelope: Bytes,
}

impl Record {
    /// Bytes of its envelope and payload, known before the payload is read (a payload kept apart
    /// has its length in the envelope).
    fn size(&self, id: &ScribeId) -> Result<usize, StoreError> {
        let payload = match &self.payload {
            Some(payload) => payload.len() as u64,
            None => {
                decode_stored_envelope(&self.envelope)
                    .map_err(|error| {
                        StoreError::Damaged(format!(
                            "scribe {id} has a malformed envelope: {error}"
                        ))
                    })?
                    .2
            }
        };
        Ok(self.envelope.len().saturating_add(payload as usize))
    }

    fn encode(entry: &NewEntry, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&entry.seq.to_be_bytes());
        out.extend_from_slice(&entry.payload_sha256);
        out.extend_from_slice(&entry.seal_id);
        out.extend_from_slice(&entry.parts.proof.index.to_be_bytes());
        if entry.seal_leaves.is_some() {
            out.push(PROOF_FROM_LEAVES);
        } else {
            out.push(entry.parts.proof.siblings.len() as u8);
            for sibling in &entry.parts.proof.siblings {
                out.extend_from_slice(sibling);
            }
        }
        if let Some(justification) = &entry.parts.redacted_by {
            out.extend_from_slice(&PAYLOAD_REDACTED.to_be_bytes());
            out.extend_from_slice(&(justification.len() as u32).to_be_bytes());
            out.extend_from_slice(justification);
        } else if entry.parts.payload.len() <= INLINE_PAYLOAD_BYTES {
            out.extend_from_slice(&(entry.parts.payload.len() as u32).to_be_bytes());
            out.extend_from_slice(&entry.parts.payload);
        } else {
            out.extend_from_slice(&PAYLOAD_APART.to_be_bytes());
        }
        out.extend_from_slice(&entry.parts.envelope);
    }

    fn decode(id: &ScribeId, value: &[u8]) -> Result<Record, StoreError> {
        let damaged = || StoreError::Damaged(format!("scribe {id} has a malformed record"));
        if value.len() < 81 {
            return Err(damaged());
        }
        let (siblings, payload_at) = match value[80] {
            PROOF_FROM_LEAVES => (None, 81),
            count => {
                let payload_at = 81 + count as usize * 32;
                if value.len() < payload_at {
                    return Err(damaged());
                }
                let siblings = value[81..payload_at]
                    .chunks_exact(32)
                    .map(|chunk| chunk.try_into().unwrap())
                    .collect();
                (Some(siblings), payload_at)
            }
        };
        let length = value.get(payload_at..payload_at + 4).ok_or_else(damaged)?;
        let mut redacted_by = None;
        let (payload, envelope_at) = match u32::from_be_bytes(length.try_into().unwrap()) {
            PAYLOAD_APART => (None, payload_at + 4),
            PAYLOAD_REDACTED => {
                let at = payload_at + 4;
                let length = value.get(at..at + 4).ok_or_else(damaged)?;
                let end = at + 4 + u32::from_be_bytes(length.try_into().unwrap()) as usize;
                let justification = value.get(at + 4..end).ok_or_else(damaged)?;
                redacted_by = Some(Bytes::copy_from_slice(justification));
                (Some(Bytes::new()), end)
            }
            length => {
                let end = payload_at + 4 + length as usize;
                let payload = value.get(payload_at + 4..end).ok_or_else(damaged)?;
                (Some(Bytes::copy_from_slice(payload)), end)
            }
        };
        Ok(Record {
            seq: u64::from_be_bytes(value[..8].try_into().unwrap()),
            payload_sha256: value[8..40].try_into().unwrap(),
            seal_id: value[40..72].try_into().unwrap(),
            index: u64::from_be_bytes(value[72..80].try_into().unwrap()),
            siblings,
            payload,
            redacted_by,
            envelope: Bytes::copy_from_slice(&value[envelope_at..]),
        })
    }
}

/// The RocksDB store of one data directory.
pub struct Store {
    /// Shared only with [`PayloadReader`]s, which hold it weakly: the store closes when the
    /// `Store` is dropped, whatever readers remain.
    db: Arc<DB>,
    write_options: WriteOptions,
}

/// What the store holds of one scribe's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredPayload {
    /// The payload's bytes.
    Bytes(Vec<u8>),
    /// Deleted by a `redact` scribe (the record names it; the bytes are gone).
    Redacted,
}

/// Reads payloads by scribe id without holding the store open: what the projection runner hands
/// projectors ([`quire_projection_api::Payloads`]), which outlive no store but need an owned
/// handle. Once the [`Store`] is dropped, every read is [`StoreError::Closed`].
#[derive(Debug, Clone)]
pub struct PayloadReader {
    db: Weak<DB>,
}

impl PayloadReader {
    /// `id`'s payload (see [`Store::payload`]).
    pub fn payload(&self, id: &ScribeId) -> Result<Option<StoredPayload>, StoreError> {
        let db = self.db.upgrade().ok_or(StoreError::Closed)?;
        read_payload(&db, id)
    }
}

/// `id`'s payload: `None` if the scribe is not stored. A payload kept apart is read without
/// filling the block cache (a file of megabytes would evict the index and filter blocks every
/// read needs).
fn read_payload(db: &DB, id: &ScribeId) -> Result<Option<StoredPayload>, StoreError> {
    let family = |name| db.cf_handle(name).expect("column family opened at start");
    let Some(value) = db.get_pinned_cf(family(CF_SCRIBES), id.as_bytes())? else {
        return Ok(None);
    };
    let record = Record::decode(id, &value)?;
    if record.redacted_by.is_some() {
        return Ok(Some(StoredPayload::Redacted));
    }
    if let Some(payload) = record.payload {
        return Ok(Some(StoredPayload::Bytes(payload.to_vec())));
    }
    let mut options = ReadOptions::default();
    options.fill_cache(false);
    let payload = db
        .get_pinned_cf_opt(family(CF_PAYLOADS), record.payload_sha256, &options)?
        .ok_or_else(|| {
            StoreError::Damaged(format!(
                "payload {} of scribe {id} is not stored",
                hex::encode(record.payload_sha256)
            ))
        })?;
    Ok(Some(StoredPayload::Bytes(payload.to_vec())))
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.db.path())
            .finish()
    }
}

/// Memory the store may use, whatever the size of the log: memtables of all column families
/// together, and one block cache shared by all of them. A node's memory must not grow with the
/// log (a node catching up a million scribes uses what one catching up a hundred thousand does).
const MEMTABLE_BUDGET: usize = 16 * 1024 * 1024;
const WRITE_BUFFER_BYTES: usize = 4 * 1024 * 1024;
const BLOCK_CACHE_BYTES: usize = 8 * 1024 * 1024;

fn db_options() -> Options {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    options.set_compression_type(rocksdb::DBCompressionType::Lz4);
    options.increase_parallelism(2);
    options.set_db_write_buffer_size(MEMTABLE_BUDGET);
    // Small memtables also keep the write-ahead log short, so a restart replays little.
    options.set_max_total_wal_size(4 * MEMTABLE_BUDGET as u64);
    // Table files kept open: RocksDB's share of the node's descriptors, not one per file.
    options.set_max_open_files(crate::fds::FdBudget::from_limit().store_files as i32);
    options
}

fn descriptors() -> Vec<ColumnFamilyDescriptor> {
    let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
    COLUMN_FAMILIES
        .iter()
        .map(|name| {
            let mut options = Options::default();
            options.set_compression_type(rocksdb::DBCompressionType::Lz4);
            options.set_write_buffer_size(WRITE_BUFFER_BYTES);
            options.set_max_write_buffer_number(2);
            let mut table = rocksdb::BlockBasedOptions::default();
            table.set_block_cache(&cache);
            // Index and filter blocks grow with the number of keys (about 4 MiB per million
            // scribes): partition them, keep them in the block cache, and pin only the small
            // top-level parts, so memory does not grow with the log.
            table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
            table.set_cache_index_and_filter_blocks(true);
            table.set_pin_top_level_index_and_filter(true);
            table.set_pin_l0_filter_and_index_blocks_in_cache(true);
            if *name == CF_SCRIBES || *name == CF_PAYLOADS || *name == CF_SEALS {
                // Point lookups by key: every replicated scribe (the duplicate check), every new
                // payload and seal (stored once).
                table.set_bloom_filter(10.0, false);
                table.set_partition_filters(true);
            }
            options.set_block_based_table_factory(&table);
            ColumnFamilyDescriptor::new(*name, options)
        })
        .collect()
}

impl Store {
    /// Opens (creating if needed) the store at `path`. With `sync`, every commit is fsynced
    /// before it is acknowledged (survives power loss); without, it survives a process crash.
    pub fn open(path: &Path, sync: bool) -> Result<Store, StoreError> {
        refuse_other_format(path)?;
        let db = DB::open_cf_descriptors(&db_options(), path, descriptors())?;
        let mut write_options = WriteOptions::default();
        write_options.set_sync(sync);
        let store = Store {
            db: Arc::new(db),
            write_options,
        };
        if !store.initialise()? {
            store.start_epoch()?;
        }
        store.index_payload_refs()?;
        Ok(store)
    }

    /// Starts a new log epoch (see `log::epoch`): the current one ends at the head as found now,
    /// which is everything that survived however the last run ended. Written with fsync before any
    /// new seq can be given out.
    fn start_epoch(&self) -> Result<(), StoreError> {
        let mut epochs = self.epochs()?;
        let head = self.head()?;
        epochs.rotate(head, rand::random());
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.db.put_opt(META_EPOCH, epochs.encode(), &sync)?;
        Ok(())
    }

    /// Opens the store at `path` read-only (works while a node is running on it).
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        refuse_other_format(path)?;
        let db = DB::open_cf_descriptors_read_only(&db_options(), path, descriptors(), false)?;
        let store = Store {
            db: Arc::new(db),
            write_options: WriteOptions::default(),
        };
        match store.meta_u64(META_FORMAT)? {
            Some(STORE_FORMAT) => Ok(store),
            Some(found) => Err(StoreError::Format { found }),
            None => Err(StoreError::Damaged("no storage format recorded".into())),
        }
    }

    /// Writes a new store's metadata; true if the store was new.
    fn initialise(&self) -> Result<bool, StoreError> {
        match self.meta_u64(META_FORMAT)? {
            Some(STORE_FORMAT) => Ok(false),
            Some(found) => Err(StoreError::Format { found }),
            None => {
                let mut batch = WriteBatch::default();
                batch.put(META_FORMAT, STORE_FORMAT.to_be_bytes());
                let epoch: [u8; 16] = rand::random();
                batch.put(META_EPOCH, epoch);
                batch.put(META_HEAD, 0u64.to_be_bytes());
                batch.put(META_HLC, 0u64.to_be_bytes());
                batch.put(META_PAYLOAD_REFS, b"");
                let mut sync = WriteOptions::default();
                sync.set_sync(true);
                self.db.write_opt(batch, &sync)?;
                Ok(true)
            }
        }
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family opened at start")
    }

    fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        match self.db.get_pinned(key)? {
            Some(value) => Ok(Some(u64::from_be_bytes(
                value
                    .as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Damaged(format!("meta {key:?}")))?,
            ))),
            None => Ok(None),
        }
    }

    /// The log's current epoch and the earlier ones it remembers (a new epoch begins every time
    /// the store is opened for writing).
    pub fn epochs(&self) -> Result<Epochs, StoreError> {
        let value = self
            .db
            .get_pinned(META_EPOCH)?
            .ok_or_else(|| StoreError::Damaged("no epoch".into()))?;
        Epochs::decode(&value)
            .ok_or_else(|| StoreError::Damaged("the epoch record has the wrong length".into()))
    }

    /// The last committed local seq (0 for an empty log).
    pub fn head(&self) -> Result<u64, StoreError> {
        Ok(self.meta_u64(META_HEAD)?.unwrap_or(0))
    }

    /// The persisted clock high-water mark.
    pub fn hlc_high_water(&self) -> Result<u64, StoreError> {
        Ok(self.meta_u64(META_HLC)?.unwrap_or(0))
    }

    /// Writes a whole commit in one write batch; answers what its redactions deleted.
    pub fn commit(&self, commit: &Commit) -> Result<Redacted, StoreError> {
        let mut batch = WriteBatch::default();
        let (scribes, log, by_stream, streams, cursors) = (
            self.cf(CF_SCRIBES),
            self.cf(CF_LOG),
            self.cf(CF_BY_STREAM),
            self.cf(CF_STREAMS),
            self.cf(CF_CURSORS),
        );
        let payloads = self.cf(CF_PAYLOADS);
        let mut written_payloads = HashSet::new();
        let mut written_seals = HashMap::new();
        let mut value = Vec::new();
        let redacting: HashMap<ScribeId, &Bytes> = commit
            .redactions
            .iter()
            .map(|redaction| (redaction.target, &redaction.justification))
            .collect();
        let mut redacted = Redacted::default();
        for entry in &commit.scribes {
            // A scribe redacted by a scribe of the same commit is stored redacted at once.
            let redacted_entry;
            let entry = match redacting.get(&entry.id) {
                Some(justification) if entry.parts.redacted_by.is_none() => {
                    redacted.scribes.push(entry.id);
                    let mut copy = entry.clone();
                    copy.parts.payload = Bytes::new();
                    copy.parts.redacted_by = Some((*justification).clone());
                    redacted_entry = copy;
                    &redacted_entry
                }
                _ => entry,
            };
            Record::encode(entry, &mut value);
            batch.put_cf(scribes, entry.id.as_bytes(), &value);
            batch.put_cf(log, entry.seq.to_be_bytes(), entry.id.as_bytes());
            let mut index_value = entry.id.as_bytes().to_vec();
            if let Some(origin) = entry.origin {
                index_value.extend_from_slice(origin.peer.as_bytes());
                index_value.extend_from_slice(&origin.epoch);
                index_value.extend_from_slice(&origin.seq.to_be_bytes());
            }
            batch.put_cf(by_stream, stream_key(&entry.stream, entry.seq), index_value);
            if entry.membership {
                batch.put_cf(
                    self.cf(CF_MEMBERSHIP),
                    stream_key(&entry.stream, entry.seq),
                    entry.id.as_bytes(),
                );
            }
            // A payload or seal already stored is not written again: the same file in two
            // streams takes the space of one.
            if entry.parts.payload.len() > INLINE_PAYLOAD_BYTES {
                batch.put_cf(payloads, payload_ref(&entry.payload_sha256, &entry.id), b"");
                if written_payloads.insert(entry.payload_sha256)
                    && self
                        .db
                        .get_pinned_cf(payloads, entry.payload_sha256)?
                        .is_none()
                {
                    batch.put_cf(payloads, entry.payload_sha256, &entry.parts.payload);
                }
            }
            self.put_seal(&mut batch, &mut written_seals, entry)?;
        }
        let in_commit: HashSet<ScribeId> = commit.scribes.iter().map(|entry| entry.id).collect();
        // Two targets of this commit may name the same payload: neither keeps it for the other.
        let mut payloads_gone = PayloadsGone {
            written: &written_payloads,
            targets: redacting.keys().copied().collect(),
            deleted: HashSet::new(),
        };
        for redaction in &commit.redactions {
            if in_commit.contains(&redaction.target) {
                continue;
            }
            let gone = self.redact_record(
                &mut batch,
                &redaction.target,
                &redaction.justification,
                &mut payloads_gone,
            )?;
            redacted += gone;
        }
        for (stream, record) in &commit.streams {
            batch.put_cf(streams, stream.as_bytes(), record.encode());
        }
        for (key, usage) in &commit.usage {
            batch.put_cf(self.cf(CF_USAGE), key.encode(), usage.encode());
        }
        for cursor in &commit.cursors {
            let mut value = cursor.epoch.to_vec();
            value.extend_from_slice(&cursor.seq.to_be_bytes());
            batch.put_cf(cursors, cursor_key(&cursor.peer, &cursor.stream), value);
        }
        let held = self.cf(CF_HELD);
        for key in &commit.released {
            batch.delete_cf(held, key.encode());
        }
        for (key, value) in &commit.held {
            batch.put_cf(held, key.encode(), value);
        }
        batch.put(META_HEAD, commit.head.to_be_bytes());
        batch.put(META_HLC, commit.hlc.to_be_bytes());
        if !commit.redactions.is_empty() {
            // Cleared once the deleted bytes have left the disk (`log::redact`).
            batch.put(META_PURGE, b"");
        }
        self.db.write_opt(batch, &self.write_options)?;
        Ok(redacted)
    }

    /// Rewrites the stored record of `target` without its payload, naming `justification`, and
    /// deletes the payload if no other stored scribe names it (but the targets of the same
    /// commit), nor one this batch writes. Nothing if it is not stored or redacted already.
    fn redact_record(
        &self,
        batch: &mut WriteBatch,
        target: &ScribeId,
        justification: &Bytes,
        gone: &mut PayloadsGone<'_>,
    ) -> Result<Redacted, StoreError> {
        let mut redacted = Redacted::default();
        let Some(value) = self
            .db
            .get_pinned_cf(self.cf(CF_SCRIBES), target.as_bytes())?
        else {
            return Ok(redacted);
        };
        let record = Record::decode(target, &value)?;
        if record.redacted_by.is_some() {
            return Ok(redacted);
        }
        redacted.scribes.push(*target);
        let payloads = self.cf(CF_PAYLOADS);
        // A payload kept in the record goes with the rewrite; one stored apart goes below.
        if record.payload.is_none() {
            let hash = record.payload_sha256;
            batch.delete_cf(payloads, payload_ref(&hash, target));
            if !gone.written.contains(&hash)
                && !gone.deleted.contains(&hash)
                && !self.payload_named_by_other(&hash, &gone.targets)?
            {
                gone.deleted.insert(hash);
                redacted.hashes.push(hash);
                batch.delete_cf(payloads, hash);
            }
        }
        let mut out = value[..72].to_vec();
        out.extend_from_slice(&record.index.to_be_bytes());
        match &record.siblings {
            None => out.push(PROOF_FROM_LEAVES),
            Some(siblings) => {
                out.push(siblings.len() as u8);
                for sibling in siblings {
                    out.extend_from_slice(sibling);
                }
            }
        }
        out.extend_from_slice(&PAYLOAD_REDACTED.to_be_bytes());
        out.extend_from_slice(&(justification.len() as u32).to_be_bytes());
        out.extend_from_slice(justification);
        out.extend_from_slice(&record.envelope);
        batch.put_cf(self.cf(CF_SCRIBES), target.as_bytes(), out);
        Ok(redacted)
    }

    /// Whether a stored scribe not in `except` names the payload `hash`.
    fn payload_named_by_other(
        &self,
        hash: &[u8; 32],
        except: &HashSet<ScribeId>,
    ) -> Result<bool, StoreError> {
        for item in self.db.iterator_cf(
            self.cf(CF_PAYLOADS),
            IteratorMode::From(&payload_ref(hash, &ScribeId::default()), Direction::Forward),
        ) {
            let (key, _) = item?;
            if key.len() != 64 || key[..32] != hash[..] {
                return Ok(false);
            }
            let id = ScribeId::from_slice(&key[32..]).expect("32 bytes");
            if !except.contains(&id) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether a stored scribe's payload was redacted, with its local seq; `None`: not stored.
    pub fn seq_and_redacted(&self, id: &ScribeId) -> Result<Option<(u64, bool)>, StoreError> {
        let Some(value) = self.db.get_pinned_cf(self.cf(CF_SCRIBES), id.as_bytes())? else {
            return Ok(None);
        };
        // Only the header is read: this runs for every duplicate a peer sends.
        let damaged = || StoreError::Damaged(format!("scribe {id} has a malformed record"));
        let payload_at = match *value.get(80).ok_or_else(damaged)? {
            PROOF_FROM_LEAVES => 81,
            count => 81 + count as usize * 32,
        };
        let length = value.get(payload_at..payload_at + 4).ok_or_else(damaged)?;
        Ok(Some((
            u64::from_be_bytes(value[..8].try_into().expect("8 bytes")),
            u32::from_be_bytes(length.try_into().expect("4 bytes")) == PAYLOAD_REDACTED,
        )))
    }

    /// Makes the payloads of redacted scribes leave the disk: flushes every memtable (so no
    /// write-ahead log holds them), then compacts, down to the last level, the key ranges of their
    /// records (`targets`) and payloads (`hashes`), so no table file keeps an old value. Costs the
    /// table files those keys fall in, not a pass over the store.
    pub fn purge_redacted(
        &self,
        targets: &[ScribeId],
        hashes: &[[u8; 32]],
    ) -> Result<(), StoreError> {
        let options = self.flush_for_purge()?;
        if targets.len() + hashes.len() > MAX_PURGE_RANGES {
            // Many redactions at once (ids are random, so their ranges span the families
            // anyway): one compaction of each family instead of one per key.
            for name in [CF_SCRIBES, CF_PAYLOADS] {
                self.db
                    .compact_range_cf_opt(self.cf(name), None::<&[u8]>, None::<&[u8]>, &options);
            }
            return Ok(());
        }
        for target in targets {
            self.db.compact_range_cf_opt(
                self.cf(CF_SCRIBES),
                Some(target.as_bytes()),
                Some(target.as_bytes()),
                &options,
            );
        }
        for hash in hashes {
            let end = payload_ref(hash, &ScribeId([0xff; 32]));
            self.db.compact_range_cf_opt(
                self.cf(CF_PAYLOADS),
                Some(&hash[..]),
                Some(&end[..]),
                &options,
            );
        }
        Ok(())
    }

    /// Whether a redaction was committed whose deleted bytes may still be on the disk.
    pub fn purge_marked(&self) -> Result<bool, StoreError> {
        Ok(self.db.get_pinned(META_PURGE)?.is_some())
    }

    /// Every redaction's deleted bytes have left the disk (fsynced).
    pub fn clear_purge_mark(&self) -> Result<(), StoreError> {
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.db.delete_opt(META_PURGE, &sync)?;
        Ok(())
    }

    /// Scribes waiting for the clock whose clock is at most `until_hlc`, in clock order, up to
    /// `limit`.
    pub fn held_due(&self, until_hlc: u64, limit: usize) -> Result<Vec<HeldRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_HELD), IteratorMode::Start) {
            let (key, value) = item?;
            let key = HeldKey::decode(&key).ok_or_else(|| {
                StoreError::Damaged("a held scribe's key has the wrong shape".into())
            })?;
            if key.rules.is_some() || key.hlc > until_hlc || out.len() >= limit {
                break;
            }
            out.push((key, value.to_vec()));
        }
        Ok(out)
    }

    /// Every held scribe's key, what `read` makes of its record, and the record's size.
    pub fn held_keys<T>(
        &self,
        read: impl Fn(&[u8]) -> T,
    ) -> Result<Vec<(HeldKey, T, u64)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_HELD), IteratorMode::Start) {
            let (key, value) = item?;
            let key = HeldKey::decode(&key).ok_or_else(|| {
                StoreError::Damaged("a held scribe's key has the wrong shape".into())
            })?;
            out.push((key, read(&value), value.len() as u64));
        }
        Ok(out)
    }

    /// Makes every scribe a rule of another version than `version` refused wait for the clock
    /// only, so it is judged again by these rules; returns how many. Written with fsync.
    pub fn requeue_held_for_rules(&self, version: u32) -> Result<usize, StoreError> {
        let held = self.cf(CF_HELD);
        let mut batch = WriteBatch::default();
        let mut count = 0;
        for item in self
            .db
            .iterator_cf(held, IteratorMode::From(&[1], Direction::Forward))
        {
            let (key, value) = item?;
            let Some(parsed) = HeldKey::decode(&key) else {
                continue;
            };
            if parsed.rules.is_none() || parsed.rules == Some(version) {
                continue;
            }
            batch.delete_cf(held, &key);
            let requeued = HeldKey {
                rules: None,
                ..parsed
            };
            batch.put_cf(held, requeued.encode(), value);
            count += 1;
        }
        if count > 0 {
            let mut sync = WriteOptions::default();
            sync.set_sync(true);
            self.db.write_opt(batch, &sync)?;
        }
        Ok(count)
    }

    /// Adds `entry`'s seal to `batch` unless it is stored (or written earlier in this batch)
    /// already; `written` says for each seal of the batch whether it has its leaves. A seal stored
    /// without leaves gets them when an entry brings them (its record then derives its proof).
    fn put_seal(
        &self,
        batch: &mut WriteBatch,
        written: &mut HashMap<[u8; 32], bool>,
        entry: &NewEntry,
    ) -> Result<(), StoreError> {
        let brings = entry.seal_leaves.is_some();
        let has = match written.get(&entry.seal_id) {
            Some(has) => Some(*has),
            None => self
                .db
                .get_pinned_cf(self.cf(CF_SEALS), entry.seal_id)?
                .map(|value| {
                    split_seal_value(&value).is_some_and(|(_, leaves)| !leaves.is_empty())
                }),
        };
        if has == Some(true) || (has == Some(false) && !brings) {
            written.insert(entry.seal_id, has == Some(true));
            return Ok(());
        }
        let leaves = entry.seal_leaves.as_deref().unwrap_or_default();
        let mut value = Vec::with_capacity(2 + entry.parts.seal.len() + leaves.len() * 32);
        value.extend_from_slice(&(entry.parts.seal.len() as u16).to_be_bytes());
        value.extend_from_slice(&entry.parts.seal);
        for leaf in leaves {
            value.extend_from_slice(leaf.as_bytes());
        }
        batch.put_cf(self.cf(CF_SEALS), entry.seal_id, value);
        written.insert(entry.seal_id, brings);
        Ok(())
    }

    /// The local seq of a stored scribe.
    pub fn seq_of(&self, id: &ScribeId) -> Result<Option<u64>, StoreError> {
        match self.db.get_pinned_cf(self.cf(CF_SCRIBES), id.as_bytes())? {
            Some(value) if value.len() >= 8 => {
                Ok(Some(u64::from_be_bytes(value[..8].try_into().unwrap())))
            }
            Some(_) => Err(StoreError::Damaged(format!(
                "scribe {id} has a value under 8 bytes"
            ))),
            None => Ok(None),
        }
    }

    /// Bytes the `payloads` column family holds, as RocksDB estimates them (live data in its
    /// files and memtables).
    pub fn payload_bytes(&self) -> u64 {
        self.property(CF_PAYLOADS, "rocksdb.estimate-live-data-size")
            + self.property(CF_PAYLOADS, "rocksdb.cur-size-all-mem-tables")
    }

    /// An integer property of one column family (0 when RocksDB has none).
    fn property(&self, cf: &str, key: &str) -> u64 {
        self.db
            .property_int_value_cf(self.cf(cf), key)
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// A stored scribe by id.
    pub fn get(&self, id: &ScribeId) -> Result<Option<StoredEntry>, StoreError> {
        let Some(value) = self.db.get_pinned_cf(self.cf(CF_SCRIBES), id.as_bytes())? else {
            return Ok(None);
        };
        let record = Record::decode(id, &value)?;
        Ok(self.complete(vec![(*id, None, record)])?.pop())
    }

    /// A stored scribe's payload alone (no seal, no proof): its bytes, or
    /// [`StoredPayload::Redacted`]; `None` if the scribe is not stored.
    pub fn payload(&self, id: &ScribeId) -> Result<Option<StoredPayload>, StoreError> {
        read_payload(&self.db, id)
    }

    /// A handle that reads payloads like [`Store::payload`] for as long as this store is open.
    pub fn payload_reader(&self) -> PayloadReader {
        PayloadReader {
            db: Arc::downgrade(&self.db),
        }
    }

    /// The local seq and exact envelope of a stored scribe, without its payload or seal.
    pub fn envelope(&self, id: &ScribeId) -> Result<Option<(u64, Bytes)>, StoreError> {
        match self.db.get_pinned_cf(self.cf(CF_SCRIBES), id.as_bytes())? {
            Some(value) => {
                let record = Record::decode(id, &value)?;
                Ok(Some((record.seq, record.envelope)))
            }
            None => Ok(None),
        }
    }

    /// The entries of `ids` (seq, id, origin), ids first: their records (an envelope and at most
    /// [`INLINE_PAYLOAD_BYTES`] each), then — for as many as fit in `max_bytes` of envelopes and
    /// payloads, at least one — their payloads and seals, each distinct one read once. `more` is
    /// true when the bytes cut it short, or `full` (the ids reached their count limit).
    fn ids_to_entries(
        &self,
        ids: Vec<(u64, ScribeId, Option<PeerOrigin>)>,
        max_bytes: usize,
        full: bool,
    ) -> Result<Chunk, StoreError> {
        let values = self.db.batched_multi_get_cf(
            self.cf(CF_SCRIBES),
            ids.iter().map(|(_, id, _)| id.as_bytes()),
            false,
        );
        let mut records = Vec::with_capacity(ids.len());
        let mut bytes = 0usize;
        let mut more = full;
        for ((seq, id, origin), value) in ids.into_iter().zip(values) {
            let record = match value? {
                Some(value) => Record::decode(&id, &value)?,
                None => {
                    return Err(StoreError::Damaged(format!(
                        "seq {seq} names scribe {id}, which is not stored"
                    )))
                }
            };
            let size = record.size(&id)?;
            if !records.is_empty() && bytes.saturating_add(size) > max_bytes {
                more = true;
                break;
            }
            bytes = bytes.saturating_add(size);
            records.push((id, origin, record));
        }
        Ok(Chunk {
            entries: self.complete(records)?,
            more,
        })
    }

    /// Stored entries from their records: each distinct payload and seal read once.
    fn complete(
        &self,
        records: Vec<(ScribeId, Option<PeerOrigin>, Record)>,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        let payloads = self.values_by_hash(
            CF_PAYLOADS,
            records
                .iter()
                .filter(|(.., record)| record.payload.is_none())
                .map(|(.., record)| record.payload_sha256),
            "payload",
        )?;
        let seals = self.values_by_hash(
            CF_SEALS,
            records.iter().map(|(.., record)| record.seal_id),
            "seal",
        )?;
        // Proofs derived from a seal's leaves: its tree's levels are built once for the whole
        // read (about 2n hashes), and only the proofs read are taken from them.
        let mut trees: HashMap<[u8; 32], Option<(Leaves, merkle::Levels)>> = HashMap::new();
        records
            .into_iter()
            .map(|(id, origin, record)| {
                let stored = &seals[&record.seal_id];
                let (seal, leaves) = split_seal_value(stored).ok_or_else(|| {
                    StoreError::Damaged(format!("seal {}", hex::encode(record.seal_id)))
                })?;
                let (proof, leaves) = match record.siblings {
                    Some(siblings) => (
                        Proof {
                            index: record.index,
                            siblings,
                        },
                        None,
                    ),
                    None => {
                        let tree = trees.entry(record.seal_id).or_insert_with(|| {
                            let leaves: Leaves = leaves
                                .chunks_exact(32)
                                .map(|leaf| ScribeId(leaf.try_into().unwrap()))
                                .collect();
                            (!leaves.is_empty()).then(|| {
                                let levels = merkle::Levels::new(&leaves);
                                (leaves, levels)
                            })
                        });
                        let found = tree.as_ref().and_then(|(leaves, levels)| {
                            Some((levels.proof(record.index)?, leaves.clone()))
                        });
                        let (proof, leaves) = found.ok_or_else(|| {
                            StoreError::Damaged(format!(
                                "scribe {id}: its seal has no stored leaf {}",
                                record.index
                            ))
                        })?;
                        (proof, Some(leaves))
                    }
                };
                Ok(StoredEntry {
                    seq: record.seq,
                    id,
                    parts: Parts {
                        envelope: record.envelope,
                        payload: match record.payload {
                            Some(payload) => payload,
                            None => payloads[&record.payload_sha256].clone(),
                        },
                        seal: stored.slice_ref(seal),
                        proof,
                        leaves,
                        redacted_by: record.redacted_by,
                    },
                    origin,
                })
            })
            .collect()
    }

    /// The values of `cf` under each distinct key of `keys` (all must be stored).
    fn values_by_hash(
        &self,
        cf: &str,
        keys: impl Iterator<Item = [u8; 32]>,
        what: &str,
    ) -> Result<HashMap<[u8; 32], Bytes>, StoreError> {
        let mut distinct: Vec<[u8; 32]> = keys.collect();
        distinct.sort_unstable();
        distinct.dedup();
        let values = self
            .db
            .batched_multi_get_cf(self.cf(cf), distinct.iter(), true);
        let mut out = HashMap::with_capacity(distinct.len());
        for (key, value) in distinct.into_iter().zip(values) {
            let value = value?.ok_or_else(|| {
                StoreError::Damaged(format!("{what} {} is not stored", hex::encode(key)))
            })?;
            out.insert(key, Bytes::copy_from_slice(&value));
        }
        Ok(out)
    }

    /// Scribes of the whole log with `from <= seq <= to`, in seq order: at most `limit`, and as
    /// many as fit in `max_bytes` of envelopes and payloads (at least one).
    pub fn read_log(
        &self,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Chunk, StoreError> {
        if from > to || limit == 0 {
            return Ok(Chunk::default());
        }
        let mut read_options = ReadOptions::default();
        read_options.set_iterate_upper_bound((to + 1).to_be_bytes().to_vec());
        let start = from.to_be_bytes();
        let iter = self.db.iterator_cf_opt(
            self.cf(CF_LOG),
            read_options,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut ids = Vec::new();
        for item in iter {
            let (key, value) = item?;
            let seq = u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Damaged("log key".into()))?,
            );
            if value.is_empty() {
                continue; // vacated: its stream was left
            }
            let id = ScribeId::from_slice(&value)
                .map_err(|_| StoreError::Damaged(format!("log value at seq {seq}")))?;
            ids.push((seq, id, None));
            if ids.len() == limit {
                break;
            }
        }
        let full = ids.len() == limit;
        self.ids_to_entries(ids, max_bytes, full)
    }

    /// Scribes of one stream with `from <= seq <= to`, in seq order: at most `limit`, and as many
    /// as fit in `max_bytes` of envelopes and payloads (at least one).
    pub fn read_stream(
        &self,
        stream: &StreamId,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Chunk, StoreError> {
        if from > to || limit == 0 {
            return Ok(Chunk::default());
        }
        let mut read_options = ReadOptions::default();
        read_options.set_iterate_upper_bound(stream_key(stream, to.saturating_add(1)).to_vec());
        if to == u64::MAX {
            read_options = ReadOptions::default();
        }
        let start = stream_key(stream, from);
        let iter = self.db.iterator_cf_opt(
            self.cf(CF_BY_STREAM),
            read_options,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut ids = Vec::new();
        for item in iter.take(limit) {
            let (key, value) = item?;
            if key.len() != 40 || &key[..32] != stream.as_bytes() {
                break;
            }
            let seq = u64::from_be_bytes(key[32..].try_into().unwrap());
            if seq > to {
                break;
            }
            let (id, origin) = decode_index_value(&value)
                .ok_or_else(|| StoreError::Damaged(format!("stream index value at seq {seq}")))?;
            ids.push((seq, id, origin));
        }
        let full = ids.len() == limit;
        self.ids_to_entries(ids, max_bytes, full)
    }

    /// Every stream record.
    pub fn streams(&self) -> Result<Vec<(StreamId, StreamRecord)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_STREAMS), IteratorMode::Start)
        {
            let (key, value) = item?;
            let stream =
                StreamId::from_slice(&key).map_err(|_| StoreError::Damaged("stream key".into()))?;
            out.push((stream, StreamRecord::decode(&value)?));
        }
        Ok(out)
    }

    /// Every (seq, id) of the `log` column family, in order, for verification (`None`: the seq was
    /// vacated when its stream was left).
    pub fn log_ids(
        &self,
    ) -> impl Iterator<Item = Result<(u64, Option<ScribeId>), StoreError>> + '_ {
        self.db
            .iterator_cf(self.cf(CF_LOG), IteratorMode::Start)
            .map(|item| {
                let (key, value) = item?;
                let seq = u64::from_be_bytes(
                    key.as_ref()
                        .try_into()
                        .map_err(|_| StoreError::Damaged("log key is not 8 bytes".into()))?,
                );
                if value.is_empty() {
                    return Ok((seq, None));
                }
                let id = ScribeId::from_slice(&value).map_err(|_| {
                    StoreError::Damaged(format!("log value at seq {seq} is not 32 bytes"))
                })?;
                Ok((seq, Some(id)))
            })
    }

    /// Every key of the `payloads` family in order, for verification: a payload's hash with no
    /// id, or a reference (the hash and the id of a scribe that names it), which sorts right
    /// after its payload.
    pub fn payload_keys(
        &self,
    ) -> impl Iterator<Item = Result<([u8; 32], Option<ScribeId>), StoreError>> + '_ {
        self.db
            .iterator_cf(self.cf(CF_PAYLOADS), IteratorMode::Start)
            .map(|item| {
                let (key, _) = item?;
                let hash: [u8; 32] = key
                    .get(..32)
                    .and_then(|hash| hash.try_into().ok())
                    .ok_or_else(|| StoreError::Damaged("a payloads key under 32 bytes".into()))?;
                match key.len() {
                    32 => Ok((hash, None)),
                    64 => Ok((
                        hash,
                        Some(ScribeId::from_slice(&key[32..]).expect("32 bytes")),
                    )),
                    n => Err(StoreError::Damaged(format!("a payloads key of {n} bytes"))),
                }
            })
    }

    /// Memory RocksDB holds now: (memtables, table readers, block cache, pinned blocks), in bytes.
    pub fn memory(&self) -> (u64, u64, u64, u64) {
        let mut memtables = 0;
        let mut table_readers = 0;
        let mut block_cache = 0;
        let mut pinned = 0;
        for name in COLUMN_FAMILIES {
            let property = |key: &str| self.property(name, key);
            memtables += property("rocksdb.cur-size-all-mem-tables");
            table_readers += property("rocksdb.estimate-table-readers-mem");
            // One cache is shared by every column family: count it once.
            block_cache = block_cache.max(property("rocksdb.block-cache-usage"));
            pinned = pinned.max(property("rocksdb.block-cache-pinned-usage"));
        }
        (memtables, table_readers, block_cache, pinned)
    }

    /// Number of entries in the `scribes` and `by_stream` column families (for verification).
    pub fn index_counts(&self) -> Result<(u64, u64), StoreError> {
        let count = |cf| -> Result<u64, StoreError> {
            let mut n = 0;
            for item in self.db.iterator_cf(cf, IteratorMode::Start) {
                item?;
                n += 1;
            }
            Ok(n)
        };
        Ok((count(self.cf(CF_SCRIBES))?, count(self.cf(CF_BY_STREAM))?))
    }

    /// The stream-index entry for `stream` at `seq`, if any (for verification).
    pub fn stream_index_at(
        &self,
        stream: &StreamId,
        seq: u64,
    ) -> Result<Option<ScribeId>, StoreError> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_BY_STREAM), stream_key(stream, seq))?
        {
            Some(value) => Ok(Some(
                decode_index_value(&value)
                    .ok_or_else(|| StoreError::Damaged("stream index value".into()))?
                    .0,
            )),
            None => Ok(None),
        }
    }

    /// Every replication cursor on `peer`, by stream.
    pub fn cursors(&self, peer: &AuthorKey) -> Result<Vec<(StreamId, Cursor)>, StoreError> {
        let mut out = Vec::new();
        let start = cursor_key(peer, &StreamId::default());
        for item in self.db.iterator_cf(
            self.cf(CF_CURSORS),
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (key, value) = item?;
            if key.len() != 64 || &key[..32] != peer.as_bytes() {
                break;
            }
            if value.len() != 24 {
                return Err(StoreError::Damaged("cursor value is not 24 bytes".into()));
            }
            let stream = StreamId::from_slice(&key[32..]).expect("32 bytes");
            let epoch: [u8; 16] = value[..16].try_into().expect("16 bytes");
            let seq = u64::from_be_bytes(value[16..].try_into().expect("8 bytes"));
            out.push((stream, Cursor { epoch, seq }));
        }
        Ok(out)
    }

    /// Remembers a peer address to dial (synced: it is configuration).
    pub fn add_peer(&self, addr: &str) -> Result<(), StoreError> {
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.db
            .put_cf_opt(self.cf(CF_PEERS), addr.as_bytes(), b"", &sync)?;
        Ok(())
    }

    /// Forgets a remembered peer address (synced, like [`Store::add_peer`]).
    pub fn remove_peer(&self, addr: &str) -> Result<(), StoreError> {
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.db
            .delete_cf_opt(self.cf(CF_PEERS), addr.as_bytes(), &sync)?;
        Ok(())
    }

    /// Records what this node says of a peer's node key (`quire peer allow|deny`), replacing
    /// what it said before (synced: it is configuration).
    pub fn set_peer_key(&self, key: &AuthorKey, rule: PeerKeyRule) -> Result<(), StoreError> {
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        let value: &[u8] = match rule {
            PeerKeyRule::Allow => b"allow",
            PeerKeyRule::Deny => b"deny",
        };
        self.db
            .put_cf_opt(self.cf(CF_PEER_KEYS), key.as_bytes(), value, &sync)?;
        Ok(())
    }

    /// What this node says of one key (`quire peer allow|deny`), if anything.
    pub fn peer_key(&self, key: &AuthorKey) -> Result<Option<PeerKeyRule>, StoreError> {
        Ok(
            match self
                .db
                .get_pinned_cf(self.cf(CF_PEER_KEYS), key.as_bytes())?
                .as_deref()
            {
                None => None,
                Some(b"allow") => Some(PeerKeyRule::Allow),
                Some(b"deny") => Some(PeerKeyRule::Deny),
                Some(_) => return Err(StoreError::Damaged("peer key rule".into())),
            },
        )
    }

    /// Every peer node key this node allows or denies.
    pub fn peer_keys(&self) -> Result<Vec<(AuthorKey, PeerKeyRule)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_PEER_KEYS), IteratorMode::Start)
        {
            let (key, value) = item?;
            let key =
                AuthorKey::from_slice(&key).map_err(|_| StoreError::Damaged("peer key".into()))?;
            let rule = match &*value {
                b"allow" => PeerKeyRule::Allow,
                b"deny" => PeerKeyRule::Deny,
                _ => return Err(StoreError::Damaged("peer key rule".into())),
            };
            out.push((key, rule));
        }
        Ok(out)
    }

    /// What one author's scribes take of a stream with quotas (nothing if none stored).
    pub fn usage(&self, key: &UsageKey) -> Result<Usage, StoreError> {
        match self.db.get_pinned_cf(self.cf(CF_USAGE), key.encode())? {
            Some(value) => {
                Usage::decode(&value).ok_or_else(|| StoreError::Damaged("usage record".into()))
            }
            None => Ok(Usage::default()),
        }
    }

    /// The membership scribes of `stream`, in local order.
    pub fn membership_ids(&self, stream: &StreamId) -> Result<Vec<ScribeId>, StoreError> {
        let mut out = Vec::new();
        let start = stream_key(stream, 0);
        for item in self.db.iterator_cf(
            self.cf(CF_MEMBERSHIP),
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (key, value) = item?;
            if !key.starts_with(stream.as_bytes()) {
                break;
            }
            out.push(
                ScribeId::from_slice(&value)
                    .map_err(|_| StoreError::Damaged("membership index".into()))?,
            );
        }
        Ok(out)
    }

    /// Every remembered peer address.
    pub fn peers(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_PEERS), IteratorMode::Start) {
            let (key, _) = item?;
            out.push(String::from_utf8_lossy(&key).into_owned());
        }
        Ok(out)
    }

    /// Records (`pending` true) or clears a join waiting for its genesis.
    pub fn set_join_pending(&self, stream: &StreamId, pending: bool) -> Result<(), StoreError> {
        if pending {
            self.db.put_cf(self.cf(CF_JOINS), stream.as_bytes(), b"")?;
        } else {
            self.db.delete_cf(self.cf(CF_JOINS), stream.as_bytes())?;
        }
        Ok(())
    }

    /// Joins waiting for a genesis.
    pub fn pending_joins(&self) -> Result<Vec<StreamId>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_JOINS), IteratorMode::Start) {
            let (key, _) = item?;
            out.push(
                StreamId::from_slice(&key).map_err(|_| StoreError::Damaged("join key".into()))?,
            );
        }
        Ok(out)
    }

    /// A record of the projection runner (`projections` column family).
    pub fn projection_record(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_PROJECTIONS), key)?)
    }

    /// Writes (`Some`) or deletes (`None`) records of the projection runner in one write batch,
    /// fsynced: they are rare and must be durable before a projector's checkpoint moves past them.
    pub fn put_projection_records(
        &self,
        records: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), StoreError> {
        let cf = self.cf(CF_PROJECTIONS);
        let mut batch = WriteBatch::default();
        for (key, value) in records {
            match value {
                Some(value) => batch.put_cf(cf, key, value),
                None => batch.delete_cf(cf, key),
            }
        }
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.db.write_opt(batch, &sync)?;
        Ok(())
    }

    /// Every record of the projection runner whose key starts with `prefix`, in key order.
    pub fn projection_records(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        self.projection_range(prefix, |key| key.starts_with(prefix))
    }

    /// The records of the projection runner from key `start` on, in key order, while `within`
    /// holds for their keys.
    pub fn projection_range(
        &self,
        start: &[u8],
        within: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_PROJECTIONS),
            IteratorMode::From(start, Direction::Forward),
        );
        for item in iter {
            let (key, value) = item?;
            if !within(&key) {
                break;
            }
            out.push((key.to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    /// Indexes which scribe names which payload (see the module docs), once, for a store written
    /// before that index existed. Written with fsync.
    fn index_payload_refs(&self) -> Result<(), StoreError> {
        if self.db.get_pinned(META_PAYLOAD_REFS)?.is_some() {
            return Ok(());
        }
        let payloads = self.cf(CF_PAYLOADS);
        let mut batch = WriteBatch::default();
        for item in self
            .db
            .iterator_cf(self.cf(CF_SCRIBES), IteratorMode::Start)
        {
            let (key, value) = item?;
            let id = ScribeId::from_slice(&key)
                .map_err(|_| StoreError::Damaged("scribe key is not 32 bytes".into()))?;
            let record = Record::decode(&id, &value)?;
            if record.payload.is_none() {
                batch.put_cf(payloads, payload_ref(&record.payload_sha256, &id), b"");
            }
            if batch.len() >= 4096 {
                self.db.write(std::mem::take(&mut batch))?;
            }
        }
        batch.put(META_PAYLOAD_REFS, b"");
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.db.write_opt(batch, &sync)?;
        Ok(())
    }

    /// Begins leaving `stream`, in one fsynced write: its record, its pending join, every peer's
    /// cursor on it and the held scribes `of_stream` picks (by their held record) go, and a marker
    /// says its scribes are being deleted ([`Store::leave_chunk`], then [`Store::end_leave`]; a
    /// start finds the marker and finishes). Returns the held keys deleted.
    pub fn begin_leave(
        &self,
        stream: &StreamId,
        of_stream: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<HeldKey>, StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_STREAMS), stream.as_bytes());
        batch.delete_cf(self.cf(CF_JOINS), stream.as_bytes());
        let mut usage_end = stream.as_bytes().to_vec();
        usage_end.extend_from_slice(&[0xff; 41]);
        batch.delete_range_cf(self.cf(CF_USAGE), &stream.as_bytes()[..], &usage_end[..]);
        batch.delete_range_cf(
            self.cf(CF_MEMBERSHIP),
            stream_key(stream, 0),
            stream_key(stream, u64::MAX),
        );
        let cursors = self.cf(CF_CURSORS);
        for item in self.db.iterator_cf(cursors, IteratorMode::Start) {
            let (key, _) = item?;
            if key.len() == 64 && &key[32..] == stream.as_bytes() {
                batch.delete_cf(cursors, &key);
            }
        }
        let held = self.cf(CF_HELD);
        let mut released = Vec::new();
        for item in self.db.iterator_cf(held, IteratorMode::Start) {
            let (key, value) = item?;
            if of_stream(&value) {
                batch.delete_cf(held, &key);
                released.extend(HeldKey::decode(&key));
            }
        }
        batch.put(leaving_key(stream), b"");
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.db.write_opt(batch, &sync)?;
        Ok(released)
    }

    /// Deletes up to `limit` scribes of a stream being left (oldest first), in one write batch:
    /// their records, stream index entries and references to payloads; their seqs in `log` are
    /// vacated (kept, empty, so no seq is given out twice and every seq up to the head is
    /// accounted for); and every payload no other stored scribe names, and every seal none of
    /// whose other leaves is stored. One batch, so a crash leaves either the whole chunk or none
    /// of it (a later chunk never sees the payloads of an earlier one). Returns what went; no
    /// scribes: the stream has none left.
    pub fn leave_chunk(&self, stream: &StreamId, limit: usize) -> Result<Vacated, StoreError> {
        let by_stream = self.cf(CF_BY_STREAM);
        let mut keys = Vec::new();
        for item in self.db.iterator_cf(
            by_stream,
            IteratorMode::From(&stream_key(stream, 0), Direction::Forward),
        ) {
            let (key, value) = item?;
            if key.len() != 40 || &key[..32] != stream.as_bytes() || keys.len() >= limit {
                break;
            }
            let seq = u64::from_be_bytes(key[32..].try_into().expect("8 bytes"));
            let (id, _) = decode_index_value(&value)
                .ok_or_else(|| StoreError::Damaged(format!("stream index value at seq {seq}")))?;
            keys.push((seq, id));
        }
        let mut vacated = Vacated::default();
        if keys.is_empty() {
            return Ok(vacated);
        }
        let (scribes, log, payloads, seals) = (
            self.cf(CF_SCRIBES),
            self.cf(CF_LOG),
            self.cf(CF_PAYLOADS),
            self.cf(CF_SEALS),
        );
        let records =
            self.db
                .batched_multi_get_cf(scribes, keys.iter().map(|(_, id)| id.as_bytes()), false);
        let mut batch = WriteBatch::default();
        let deleted: HashSet<ScribeId> = keys.iter().map(|(_, id)| *id).collect();
        let mut hashes = HashSet::new();
        // Each seal named, and whether a deleted scribe named it with no siblings and no leaves.
        let mut seal_ids = HashSet::new();
        for ((seq, id), record) in keys.iter().zip(records) {
            if let Some(value) = record? {
                let record = Record::decode(id, &value)?;
                if record.payload.is_none() {
                    batch.delete_cf(payloads, payload_ref(&record.payload_sha256, id));
                    hashes.insert(record.payload_sha256);
                }
                seal_ids.insert(record.seal_id);
                batch.delete_cf(scribes, id.as_bytes());
            }
            batch.put_cf(log, seq.to_be_bytes(), b"");
            batch.delete_cf(by_stream, stream_key(stream, *seq));
            vacated.scribes += 1;
        }
        // A payload goes when no scribe but those deleted here names it.
        for hash in hashes {
            let mut named = false;
            for item in self.db.iterator_cf(
                payloads,
                IteratorMode::From(
                    &payload_ref(&hash, &ScribeId::default()),
                    Direction::Forward,
                ),
            ) {
                let (key, _) = item?;
                if key.len() != 64 || key[..32] != hash {
                    break;
                }
                let id = ScribeId::from_slice(&key[32..]).expect("32 bytes");
                if !deleted.contains(&id) {
                    named = true;
                    break;
                }
            }
            if named {
                continue;
            }
            if let Some(payload) = self.db.get_pinned_cf(payloads, hash)? {
                vacated.payloads += 1;
                vacated.payload_bytes += payload.len() as u64;
                batch.delete_cf(payloads, hash);
            }
        }
        // A seal goes when none of its leaves but those deleted here is stored.
        for seal_id in seal_ids {
            let Some(value) = self.db.get_pinned_cf(seals, seal_id)? else {
                continue;
            };
            let Some((seal, leaves)) = split_seal_value(&value) else {
                continue;
            };
            let gone = if leaves.is_empty() {
                // Stored without its leaves: a seal over one scribe named only the one deleted
                // here; one over more may cover scribes of other streams, and stays.
                crate::scribe::Seal::decode(Bytes::copy_from_slice(seal))
                    .is_ok_and(|seal| seal.count == 1)
            } else {
                let others: Vec<&[u8]> = leaves
                    .chunks_exact(32)
                    .filter(|leaf| {
                        ScribeId::from_slice(leaf).is_ok_and(|leaf| !deleted.contains(&leaf))
                    })
                    .collect();
                !self
                    .db
                    .batched_multi_get_cf(scribes, others, false)
                    .into_iter()
                    .try_fold(false, |any, found| {
                        Ok::<_, StoreError>(any || found?.is_some())
                    })?
            };
            if gone {
                vacated.seals += 1;
                batch.delete_cf(seals, seal_id);
            }
        }
        self.db.write_opt(batch, &self.write_options)?;
        Ok(vacated)
    }

    /// Makes what was deleted leave the disk: flushes every memtable (so the write-ahead log that
    /// still holds deleted values is dropped), then compacts every family a leave deletes from down
    /// to the last level (so no table file keeps a deleted value). Costs a pass over those
    /// families: done once per leave.
    pub fn purge(&self) -> Result<(), StoreError> {
        let options = self.flush_for_purge()?;
        for name in [
            CF_SCRIBES,
            CF_PAYLOADS,
            CF_SEALS,
            CF_LOG,
            CF_BY_STREAM,
            CF_HELD,
            CF_CURSORS,
        ] {
            self.db
                .compact_range_cf_opt(self.cf(name), None::<&[u8]>, None::<&[u8]>, &options);
        }
        Ok(())
    }

    /// Flushes every memtable (so the write-ahead log that holds deleted values is dropped), and
    /// answers the options of a compaction that reaches the last level (so no table file keeps
    /// one).
    fn flush_for_purge(&self) -> Result<rocksdb::CompactOptions, StoreError> {
        let families: Vec<&rocksdb::ColumnFamily> =
            COLUMN_FAMILIES.iter().map(|name| self.cf(name)).collect();
        self.db
            .flush_cfs_opt(&families, &rocksdb::FlushOptions::default())?;
        self.db.flush()?;
        let mut options = rocksdb::CompactOptions::default();
        options.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        Ok(options)
    }

    /// Ends leaving `stream` (fsynced): every scribe of it is gone.
    pub fn end_leave(&self, stream: &StreamId) -> Result<(), StoreError> {
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.db.delete_opt(leaving_key(stream), &sync)?;
        Ok(())
    }

    /// Streams being left whose scribes are not all deleted yet.
    pub fn leaving(&self) -> Result<Vec<StreamId>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(META_LEAVING, Direction::Forward))
        {
            let (key, _) = item?;
            let Some(id) = key.strip_prefix(META_LEAVING) else {
                break;
            };
            out.push(
                StreamId::from_slice(id)
                    .map_err(|_| StoreError::Damaged("a leaving marker's stream id".into()))?,
            );
        }
        Ok(out)
    }

    /// The record of one stream, if this node holds it.
    pub fn stream_record(&self, stream: &StreamId) -> Result<Option<StreamRecord>, StoreError> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_STREAMS), stream.as_bytes())?
        {
            Some(value) => Ok(Some(StreamRecord::decode(&value)?)),
            None => Ok(None),
        }
    }
}

/// An existing store that lacks a column family of this format was written by another format:
/// refuse it *before* opening it for writing (which would add the missing families), reading its
/// recorded format read-only. Nothing of it is changed. One that says it is of this format but
/// lacks some of its families is damaged, and refused the same way.
fn refuse_other_format(path: &Path) -> Result<(), StoreError> {
    let Ok(existing) = DB::list_cf(&Options::default(), path) else {
        return Ok(()); // no store yet
    };
    let missing: Vec<&str> = COLUMN_FAMILIES
        .iter()
        .copied()
        .filter(|name| !existing.iter().any(|have| have == name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let db = DB::open_cf_for_read_only(&Options::default(), path, &existing, false)?;
    let found = match db.get(META_FORMAT)? {
        Some(value) => u64::from_be_bytes(
            value
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Damaged("meta format is not 8 bytes".into()))?,
        ),
        None => return Err(StoreError::Damaged("no storage format recorded".into())),
    };
    if found == STORE_FORMAT {
        return Err(StoreError::Damaged(format!(
            "the data directory has storage format {found} but lacks its column families {} (nothing was changed)",
            missing.join(", ")
        )));
    }
    Err(StoreError::Format { found })
}

/// A `seals` value: the encoded seal and its leaves (empty when not stored).
fn split_seal_value(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let length = u16::from_be_bytes(value.get(..2)?.try_into().ok()?) as usize;
    let seal = value.get(2..2 + length)?;
    let leaves = &value[2 + length..];
    (leaves.len() % 32 == 0).then_some((seal, leaves))
}

fn stream_key(stream: &StreamId, seq: u64) -> [u8; 40] {
    let mut key = [0u8; 40];
    key[..32].copy_from_slice(stream.as_bytes());
    key[32..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn decode_index_value(value: &[u8]) -> Option<(ScribeId, Option<PeerOrigin>)> {
    match value.len() {
        32 => Some((ScribeId::from_slice(value).ok()?, None)),
        80 | 88 => Some((
            ScribeId::from_slice(&value[..32]).ok()?,
            Some(PeerOrigin {
                peer: AuthorKey::from_slice(&value[32..64]).ok()?,
                epoch: value[64..80].try_into().ok()?,
                seq: value.get(80..88).map_or(u64::MAX, |seq| {
                    u64::from_be_bytes(seq.try_into().expect("8 bytes"))
                }),
            }),
        )),
        _ => None,
    }
}

fn leaving_key(stream: &StreamId) -> Vec<u8> {
    [META_LEAVING, stream.as_bytes()].concat()
}

/// The key in `payloads` that says scribe `id` names the payload `hash`.
fn payload_ref(hash: &[u8; 32], id: &ScribeId) -> [u8; 64] {
    let mut key = [0u8; 64];
    key[..32].copy_from_slice(hash);
    key[32..].copy_from_slice(id.as_bytes());
    key
}

fn cursor_key(peer: &AuthorKey, stream: &StreamId) -> [u8; 64] {
    let mut key = [0u8; 64];
    key[..32].copy_from_slice(peer.as_bytes());
    key[32..].copy_from_slice(stream.as_bytes());
    key
}
