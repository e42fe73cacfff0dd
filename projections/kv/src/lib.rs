//! The key/value projector: a replicated dictionary per stream, with leases and fencing tokens.
//!
//! # Scribes
//! - `kv.set`: payload [`KvSet`] `{ key, value }` (protobuf, content type
//!   [`CONTENT_TYPE`]).
//! - `kv.delete`: payload [`KvDelete`] `{ key }`: a tombstone, so a partitioned peer can never
//!   bring the key back.
//!
//! Keys are 1 to [`MAX_KEY_BYTES`] bytes; values are any bytes within the stream's per-file limit
//! (checked when the node accepts the scribe). A node refuses a kv scribe whose payload does not
//! decode at admission ([`KvCheck`], one of its payload rules), so none is stored or replicated;
//! one that still reaches the projector is refused with [`ApplyError::Scribe`] and parked.
//!
//! # The rule (judged by the scribes' own clocks and ids, never by arrival order)
//! The state of a key is [`fold`] of every write to it, in `(hlc, author, id)` order (an instant
//! is a hybrid-logical-clock value, so a write made after seeing another always sorts after it;
//! lease durations are measured in the clock's milliseconds):
//! - **Leasing on** (the policy's default, `lease_ms` = 1 hour): a write by X at time t is valid if
//!   it names, as the write it `replaces`, the key's last valid write before it (empty if none),
//!   and the key is free at t: no live value, or the live value is X's, or X's predecessor wrote
//!   it at least `lease_ms` before t. The owner's set renews the lease; the owner's delete releases
//!   it. Two writes at the same instant by different authors: the lower author id comes first and
//!   takes the key, so the other is invalid.
//! - **Leasing off**: every write is valid; the last by `(hlc, author, id)` wins (`replaces` is
//!   not read).
//! - The **fencing token** of a key is the pair (fence, id): the number of valid writes so far and
//!   the last of them. Two writers partitioned from each other can each believe they hold the key
//!   with the same fence (each saw the same predecessor), but never with the same id; once they
//!   hear from each other, one of the two writes is invalid. A resource the key protects accepts
//!   a request whose fence is above every fence it has seen, or equal with the same id.
//!
//! Naming the replaced write is what stops a write dated in the past from rewriting history: a
//! writer that saw X's write and names it is invalid anywhere before it. A node refuses a client's
//! `kv.*` scribe dated more than a minute before its own clock, and holds one dated more than a
//! minute ahead until then (`quire::log::held`), so a lease can be taken early or late by at most
//! a minute of clock error.
//!
//! Because the fold sorts the key's whole history, every node computes the same state from the
//! same set of scribes in any arrival order (BRIEF invariant 7), and applying a scribe twice
//! changes nothing (writes are stored once by id).
//!
//! # Retention
//! A stream's retention rule may keep only the newest N versions of each key: the owner's node
//! then signs a `prune` scribe for each write older than the key's N newest valid writes. A
//! pruned write's payload is gone, but its `prune` carries what the fold needs of it (its key,
//! clock, author, `replaces`, and whether it was a set: `quire.v1.PrunedKvWrite`, checked by
//! every node against the write's envelope), so the projector keeps counting it, without its
//! value ([`Write::pruned_set`]): its fence, lease and `replaces` chain are unchanged, and so is
//! every key's state while its newest valid write is kept. An owner's or author's `redact`, by
//! contrast, takes the write out of the fold altogether.
//!
//! Which erasures count is a function of the set of `redact` and `prune` scribes, never of the
//! order they arrived in or of which one a node keeps as the write's justification:
//! - a write any `redact` names does not count (a redaction wins over a prune);
//! - else a write `prune`s name counts, value-less, if they all state the same of it; prunes that
//!   disagree (only the owner signs them, and a node that never held the write cannot check
//!   them) take it out of the fold, as the owner's redaction could.
//!
//! # Storage
//! One SQLite file `kv.sqlite` per instance (WAL mode, so [`Reader`]s read while the runner
//! writes): `writes` (every kv scribe, by key), `erasures` (every `redact`, and every `prune` of
//! a kv write with what it states), `current` (the folded state of each key) and `meta` (the
//! checkpoint), all changed in one transaction per batch. Opening it, its readers and
//! its checkpoint row are the shared scaffold of [`quire_projection_api::sqlite`].

use std::path::Path;

use prost::Message;
use quire_projection_api::sqlite::{blob32, Database};
use quire_projection_api::{
    hlc_millis, ApplyError, AuthorKey, Kind, Place, Plugin, Policy, ProjectionError, Projector,
    Scope, Scribe, ScribeId,
};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

/// The projection's name.
pub const NAME: &str = "kv";
/// Bump when the same scribes would give a different state.
pub const FINGERPRINT: &str = "kv v2";
/// The content type of `kv.*` payloads.
pub const CONTENT_TYPE: &str = "application/vnd.quire.kv+protobuf";
/// The longest key.
pub const MAX_KEY_BYTES: usize = 1024;
/// The instance's database file.
pub const DB_FILE: &str = "kv.sqlite";

/// The payload of a `kv.set` scribe.
#[derive(Clone, PartialEq, Message)]
pub struct KvSet {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// The value.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
    /// The key's last valid write the writer saw (its scribe id), or empty if it saw none.
    #[prost(bytes = "vec", tag = "3")]
    pub replaces: Vec<u8>,
}

/// The payload of a `kv.delete` scribe.
#[derive(Clone, PartialEq, Message)]
pub struct KvDelete {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// The key's last valid write the writer saw (its scribe id), or empty if it saw none.
    #[prost(bytes = "vec", tag = "2")]
    pub replaces: Vec<u8>,
}

/// The part of a `prune` scribe's payload (a `quire.v1.Redact`) this projector reads: the write
/// it prunes, if that is a kv write. Other fields are skipped.
#[derive(Clone, PartialEq, Message)]
pub struct Prune {
    /// The pruned scribe's id.
    #[prost(bytes = "vec", tag = "1")]
    pub target: Vec<u8>,
    /// What the key's state still needs of it (`None`: not a kv write).
    #[prost(message, optional, tag = "3")]
    pub kv: Option<PrunedKvWrite>,
}

/// What a `prune` keeps of a kv write (`quire.v1.PrunedKvWrite`).
#[derive(Clone, PartialEq, Message)]
pub struct PrunedKvWrite {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// The write it names as replaced (empty or a 32-byte id).
    #[prost(bytes = "vec", tag = "2")]
    pub replaces: Vec<u8>,
    /// A `kv.delete` (else a `kv.set`).
    #[prost(bool, tag = "3")]
    pub deleted: bool,
    /// The write's author (32 bytes).
    #[prost(bytes = "vec", tag = "4")]
    pub author: Vec<u8>,
    /// The write's clock.
    #[prost(uint64, tag = "5")]
    pub hlc: u64,
}

/// The key and the value-less [`Write`] a `prune` scribe's payload keeps of a kv write; `Ok(None)`
/// for another kind, or a prune of something else; an error for a payload that does not decode or
/// a field out of shape.
pub fn decode_pruned(kind: &Kind, payload: &[u8]) -> Result<Option<(Vec<u8>, Write)>, String> {
    if *kind != Kind::Prune {
        return Ok(None);
    }
    let prune = Prune::decode(payload)
        .map_err(|error| format!("prune payload does not decode: {error}"))?;
    let Some(kv) = prune.kv else {
        return Ok(None);
    };
    check_key(&kv.key)?;
    let id = |bytes: &[u8], what: &str| match bytes.len() {
        32 => Ok(blob32(bytes.to_vec())),
        other => Err(format!(
            "a pruned kv write's {what} must be 32 bytes, it has {other}"
        )),
    };
    let replaces = match kv.replaces.len() {
        0 => ScribeId::default(),
        _ => ScribeId(id(&kv.replaces, "replaces")?),
    };
    Ok(Some((
        kv.key,
        Write {
            hlc: kv.hlc,
            author: AuthorKey(id(&kv.author, "author")?),
            id: ScribeId(id(&prune.target, "target")?),
            value: None,
            replaces,
            pruned_set: !kv.deleted,
        },
    )))
}

/// Checks a key's length.
pub fn check_key(key: &[u8]) -> Result<(), String> {
    if key.is_empty() {
        return Err("a key must not be empty".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "a key is at most {MAX_KEY_BYTES} bytes, this one has {}",
            key.len()
        ));
    }
    Ok(())
}

/// One write to a key: a set (`value` is `Some`) or a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// The writer's clock.
    pub hlc: u64,
    /// The writer.
    pub author: AuthorKey,
    /// The scribe.
    pub id: ScribeId,
    /// The value set, or `None` for a delete (or a set whose value was pruned).
    pub value: Option<Vec<u8>>,
    /// The last valid write the writer saw ([`ScribeId::default`]: none).
    pub replaces: ScribeId,
    /// A set whose value a retention rule pruned (`value` is `None`): it still gave its author
    /// the key, but its value is no longer known.
    pub pruned_set: bool,
}

impl Write {
    /// Whether the write set a value (rather than deleting the key).
    pub fn sets(&self) -> bool {
        self.value.is_some() || self.pruned_set
    }
}

/// The state of a key after folding its writes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    /// The live value (`None`: never set, or deleted).
    pub value: Option<Vec<u8>>,
    /// Who holds the key (the author of the live value).
    pub owner: Option<AuthorKey>,
    /// Clock of the last valid write.
    pub hlc: u64,
    /// The last valid write.
    pub id: ScribeId,
    /// Valid writes so far: the fencing token.
    pub fence: u64,
}

impl State {
    /// When the owner's lease ends (unix ms), if the key is held under a lease.
    pub fn lease_until_ms(&self, policy: &Policy) -> Option<u64> {
        (policy.leasing && self.owner.is_some())
            .then(|| hlc_millis(self.hlc).saturating_add(policy.lease_ms))
    }

    /// Whether a write by `author` at `hlc`, naming `replaces` as the write it replaces, would be
    /// valid after this state.
    pub fn admits(
        &self,
        author: &AuthorKey,
        hlc: u64,
        replaces: &ScribeId,
        policy: &Policy,
    ) -> bool {
        if !policy.leasing {
            return true;
        }
        if *replaces != self.id {
            // It replaces another state than this one: it was written before this state
            // existed (a backdated write), or concurrently with the write that made it.
            return false;
        }
        match &self.owner {
            None => true,
            Some(owner) if owner == author => true,
            Some(_) => hlc_millis(hlc) >= hlc_millis(self.hlc).saturating_add(policy.lease_ms),
        }
    }
}

/// The state of a key with these writes, in any order (see the crate docs for the rule).
pub fn fold(writes: &mut [Write], policy: &Policy) -> State {
    fold_marking(writes, policy, |_| {})
}

/// [`fold`], calling `valid` with the index of each valid write (in the order `writes` is left
/// in: sorted by `(hlc, author, id)`).
pub fn fold_marking(writes: &mut [Write], policy: &Policy, mut valid: impl FnMut(usize)) -> State {
    // An instant is a hybrid logical clock value: a write made after seeing another always has a
    // greater one, so only concurrent writes can share an instant; then the lower author goes
    // first (and, with leasing on, takes the key).
    writes.sort_by_key(|w| (w.hlc, w.author, w.id));
    let mut state = State::default();
    let mut previous: Option<&Write> = None;
    for (index, write) in writes.iter().enumerate() {
        if previous.is_some_and(|p| p.id == write.id) {
            continue;
        }
        previous = Some(write);
        if !state.admits(&write.author, write.hlc, &write.replaces, policy) {
            continue;
        }
        valid(index);
        state.fence += 1;
        state.hlc = write.hlc;
        state.id = write.id;
        state.owner = write.sets().then_some(write.author);
        state.value = write.value.clone();
    }
    state
}

/// The writes of one key that its `keep` newest valid writes supersede (`keep` ≥ 1; 0 gives
/// none): for each, its index in `writes` (sorted as [`fold`] leaves them) and the clock of the
/// valid write that pushed it out (the `keep`-th valid write after it). A valid write is
/// superseded by the `keep` valid writes after it; an invalid one, which never counted, by the
/// `keep` valid writes after it too. Pruning any of them (keeping them as value-less writes)
/// leaves the key's state as it was: validity never depends on a value, and the state's value
/// is its last valid write's, which is never superseded.
pub fn superseded(writes: &mut [Write], policy: &Policy, keep: usize) -> Vec<(usize, u64)> {
    if keep == 0 {
        return Vec::new();
    }
    let mut valid = Vec::new();
    fold_marking(writes, policy, |index| valid.push(index));
    let mut out = Vec::new();
    for (index, write) in writes.iter().enumerate() {
        if index > 0 && writes[index - 1].id == write.id {
            continue;
        }
        // Valid writes up to this one (itself included): the `keep`-th after it comes next.
        let counted = valid.partition_point(|&v| v <= index);
        match valid.get(counted + keep - 1) {
            Some(&pusher) => out.push((index, writes[pusher].hlc)),
            None => break,
        }
    }
    out
}

/// The key/value plugin: one SQLite database per stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct Kv;

impl Plugin for Kv {
    fn name(&self) -> &str {
        NAME
    }

    fn fingerprint(&self) -> String {
        FINGERPRINT.into()
    }

    fn scope(&self) -> Scope {
        Scope::Stream
    }

    fn open(&self, place: &Place) -> Result<Box<dyn Projector>, ProjectionError> {
        Ok(Box::new(KvProjector::open(place)?))
    }
}

fn db_error(error: rusqlite::Error) -> ProjectionError {
    DB.error(error)
}

struct KvProjector {
    db: Connection,
    policy: Policy,
}

/// The instance's database (the scaffold adds WAL and `synchronous = NORMAL` before `setup`).
const DB: Database = Database {
    file: DB_FILE,
    label: "kv database",
    setup: "
    CREATE TABLE IF NOT EXISTS writes (
        key BLOB NOT NULL, hlc INTEGER NOT NULL, author BLOB NOT NULL, id BLOB NOT NULL,
        value BLOB, replaces BLOB NOT NULL, PRIMARY KEY (key, hlc, author, id)) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS writes_by_id ON writes (id);
    CREATE TABLE IF NOT EXISTS erasures (
        target BLOB NOT NULL, erasure BLOB NOT NULL, pruned INTEGER NOT NULL,
        key BLOB, hlc INTEGER, author BLOB, replaces BLOB, sets INTEGER,
        PRIMARY KEY (target, erasure)) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS erasures_by_key ON erasures (key) WHERE key IS NOT NULL;
    CREATE TABLE IF NOT EXISTS current (
        key BLOB PRIMARY KEY, value BLOB, owner BLOB, hlc INTEGER NOT NULL, id BLOB NOT NULL,
        fence INTEGER NOT NULL, seq INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
",
    meta: "meta",
    tables: &["writes", "erasures", "current", "meta"],
};

/// A key's writes as the fold takes them (the crate docs, "Retention"): its whole writes no
/// `redact` names, and the writes `prune`s name under it, value-less, where no `redact` names the
/// write, its whole copy is not here, and every prune of it states the same (one row each).
const KEY_WRITES: &str = "
    SELECT hlc, author, id, value, replaces, 0 FROM writes
     WHERE key = ?1
       AND NOT EXISTS (SELECT 1 FROM erasures r WHERE r.target = writes.id AND r.pruned = 0)
    UNION ALL
    SELECT e.hlc, e.author, e.target, NULL, e.replaces, e.sets FROM erasures e
     WHERE e.key = ?1 AND e.pruned = 1
       AND e.erasure = (SELECT min(m.erasure) FROM erasures m
                         WHERE m.target = e.target AND m.pruned = 1)
       AND NOT EXISTS (SELECT 1 FROM erasures r WHERE r.target = e.target AND r.pruned = 0)
       AND NOT EXISTS (SELECT 1 FROM writes w WHERE w.id = e.target)
       AND NOT EXISTS (SELECT 1 FROM erasures o WHERE o.target = e.target AND o.pruned = 1
             AND (o.key IS NOT e.key OR o.hlc IS NOT e.hlc OR o.author IS NOT e.author
                  OR o.replaces IS NOT e.replaces OR o.sets IS NOT e.sets))";

/// What one scribe adds to the table.
enum Change {
    /// A kv write, whole.
    Write(Vec<u8>, Write),
    /// A `redact` (`None`) or a `prune` of a kv write (its key and value-less write) of `target`.
    Erasure {
        target: ScribeId,
        pruned: Option<(Vec<u8>, Write)>,
    },
}

/// What `scribe` adds to the table, if anything.
fn change_of(scribe: &Scribe) -> Result<Option<Change>, String> {
    if let Some(write) = decode_write(&scribe.kind, &scribe.payload)? {
        let whole = Write {
            hlc: scribe.hlc,
            author: scribe.author,
            id: scribe.id,
            value: write.value,
            replaces: write.replaces,
            pruned_set: false,
        };
        return Ok(Some(Change::Write(write.key, whole)));
    }
    match scribe.kind {
        Kind::Prune => Ok(
            decode_pruned(&scribe.kind, &scribe.payload)?.map(|(key, write)| Change::Erasure {
                target: write.id,
                pruned: Some((key, write)),
            }),
        ),
        Kind::Redact => {
            let redact = Prune::decode(&scribe.payload[..])
                .map_err(|error| format!("redact payload does not decode: {error}"))?;
            match redact.target.len() {
                32 => Ok(Some(Change::Erasure {
                    target: ScribeId(blob32(redact.target)),
                    pruned: None,
                })),
                other => Err(format!(
                    "a redact's target must be 32 bytes, it has {other}"
                )),
            }
        }
        _ => Ok(None),
    }
}

impl KvProjector {
    fn open(place: &Place) -> Result<KvProjector, ProjectionError> {
        Ok(KvProjector {
            db: DB.open(&place.dir)?,
            policy: place.policy.clone(),
        })
    }

    /// Stores an erasure of `target`; the keys whose fold it may change.
    fn erase(
        &self,
        target: &ScribeId,
        erasure: &ScribeId,
        pruned: Option<&(Vec<u8>, Write)>,
        keys: &mut Vec<Vec<u8>>,
    ) -> rusqlite::Result<()> {
        let (key, write) = match pruned {
            Some((key, write)) => (Some(key), Some(write)),
            None => (None, None),
        };
        self.db
            .prepare_cached(
                "INSERT OR IGNORE INTO erasures
                 (target, erasure, pruned, key, hlc, author, replaces, sets)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                target.0.to_vec(),
                erasure.0.to_vec(),
                pruned.is_some(),
                key,
                write.map(|w| w.hlc as i64),
                write.map(|w| w.author.0.to_vec()),
                write.map(|w| w.replaces.0.to_vec()),
                write.map(|w| w.pruned_set),
            ])?;
        // Every key the target is counted under, whole or pruned.
        let mut statement = self.db.prepare_cached(
            "SELECT key FROM writes WHERE id = ?1
             UNION SELECT key FROM erasures WHERE target = ?1 AND key IS NOT NULL",
        )?;
        for key in statement.query_map([target.0.to_vec()], |row| row.get(0))? {
            keys.push(key?);
        }
        Ok(())
    }

    fn refold(&self, key: &[u8], seq: u64) -> rusqlite::Result<()> {
        let mut statement = self.db.prepare_cached(KEY_WRITES)?;
        let mut writes: Vec<Write> = statement
            .query_map([key], |row| {
                Ok(Write {
                    hlc: row.get::<_, i64>(0)? as u64,
                    author: AuthorKey(blob32(row.get(1)?)),
                    id: ScribeId(blob32(row.get(2)?)),
                    value: row.get(3)?,
                    replaces: ScribeId(blob32(row.get(4)?)),
                    pruned_set: row.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        let state = fold(&mut writes, &self.policy);
        self.db
            .prepare_cached(
                "INSERT INTO current (key, value, owner, hlc, id, fence, seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (key) DO UPDATE SET value = ?2, owner = ?3, hlc = ?4, id = ?5,
                 fence = ?6, seq = ?7",
            )?
            .execute(params![
                key,
                state.value,
                state.owner.map(|o| o.0.to_vec()),
                state.hlc as i64,
                state.id.0.to_vec(),
                state.fence as i64,
                seq as i64
            ])?;
        Ok(())
    }
}

/// A key, and the value a write sets (`None` for a delete).
pub type KeyAndValue = (Vec<u8>, Option<Vec<u8>>);

/// What a kv scribe says: its key, the value it sets (`None` for a delete) and the write it
/// replaces ([`ScribeId::default`]: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvWrite {
    /// The key.
    pub key: Vec<u8>,
    /// The value set, or `None` for a delete.
    pub value: Option<Vec<u8>>,
    /// The last valid write of the key the writer saw.
    pub replaces: ScribeId,
}

/// The kind and payload of a write: a `kv.set` of `value`, or a `kv.delete` for `None`.
/// `replaces` is the key's last valid write the writer saw (`None`: it saw none).
pub fn encode(key: &[u8], value: Option<&[u8]>, replaces: Option<&ScribeId>) -> (Kind, Vec<u8>) {
    let replaces = replaces.map(|id| id.0.to_vec()).unwrap_or_default();
    match value {
        Some(value) => (
            Kind::KvSet,
            KvSet {
                key: key.to_vec(),
                value: value.to_vec(),
                replaces,
            }
            .encode_to_vec(),
        ),
        None => (
            Kind::KvDelete,
            KvDelete {
                key: key.to_vec(),
                replaces,
            }
            .encode_to_vec(),
        ),
    }
}

/// A kv scribe's key and value (`None` for a delete); `Ok(None)` for other kinds; an error for a
/// payload that does not decode or a bad key.
/// The payload rule this projector contributes to a node's admission rules: a `kv.set` or
/// `kv.delete` whose payload does not decode (or has a bad key, or a `replaces` that is not a
/// scribe id) is refused when it is appended or replicated, naming the problem, instead of being
/// stored, replicated and parked by every replica. Every other scribe passes.
#[derive(Debug, Clone, Copy, Default)]
pub struct KvCheck;

impl quire_projection_api::PayloadCheck for KvCheck {
    fn name(&self) -> &str {
        "kv payloads"
    }

    fn check(
        &self,
        scribe: &quire_projection_api::Candidate<'_>,
    ) -> Result<(), quire_projection_api::PayloadError> {
        decode_write(scribe.kind, scribe.payload)
            .map(|_| ())
            .map_err(quire_projection_api::PayloadError::new)
    }
}

pub fn decode(kind: &Kind, payload: &[u8]) -> Result<Option<KeyAndValue>, String> {
    Ok(decode_write(kind, payload)?.map(|write| (write.key, write.value)))
}

/// A kv scribe's [`KvWrite`]; `Ok(None)` for other kinds; an error for a payload that does not
/// decode, a bad key, or a `replaces` that is not empty or a 32-byte scribe id.
pub fn decode_write(kind: &Kind, payload: &[u8]) -> Result<Option<KvWrite>, String> {
    let (key, value, replaces) = match kind {
        Kind::KvSet => {
            let set = KvSet::decode(payload)
                .map_err(|error| format!("kv.set payload is not a KvSet: {error}"))?;
            (set.key, Some(set.value), set.replaces)
        }
        Kind::KvDelete => {
            let delete = KvDelete::decode(payload)
                .map_err(|error| format!("kv.delete payload is not a KvDelete: {error}"))?;
            (delete.key, None, delete.replaces)
        }
        _ => return Ok(None),
    };
    check_key(&key)?;
    let replaces = match replaces.len() {
        0 => ScribeId::default(),
        32 => ScribeId(blob32(replaces)),
        other => {
            return Err(format!(
                "replaces must be empty or a 32-byte scribe id, it has {other} bytes"
            ))
        }
    };
    Ok(Some(KvWrite {
        key,
        value,
        replaces,
    }))
}

impl Projector for KvProjector {
    fn apply(&mut self, batch: &[Scribe], checkpoint: u64) -> Result<(), ApplyError> {
        let mut changes = Vec::new();
        for (index, scribe) in batch.iter().enumerate() {
            match change_of(scribe) {
                Ok(Some(change)) => changes.push((scribe, change)),
                Ok(None) => {}
                Err(reason) => return Err(ApplyError::Scribe { index, reason }),
            }
        }
        let storage = |error| DB.storage(error);
        let tx = self.db.unchecked_transaction().map_err(storage)?;
        let mut touched = std::collections::BTreeMap::new();
        for (scribe, change) in changes {
            match change {
                Change::Write(key, write) => {
                    self.db
                        .prepare_cached(
                            "INSERT OR IGNORE INTO writes (key, hlc, author, id, value, replaces)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        )
                        .and_then(|mut insert| {
                            insert.execute(params![
                                key,
                                write.hlc as i64,
                                write.author.0.to_vec(),
                                write.id.0.to_vec(),
                                write.value,
                                write.replaces.0.to_vec(),
                            ])
                        })
                        .map_err(storage)?;
                    touched.insert(key, scribe.local_seq);
                }
                Change::Erasure { target, pruned } => {
                    // (A copy still holding the whole write keeps counting it: the copy is being
                    // rebuilt without the payload.)
                    let mut keys = Vec::new();
                    self.erase(&target, &scribe.id, pruned.as_ref(), &mut keys)
                        .map_err(storage)?;
                    for key in keys {
                        touched.insert(key, scribe.local_seq);
                    }
                }
            }
        }
        for (key, seq) in &touched {
            self.refold(key, *seq).map_err(storage)?;
        }
        DB.set_checkpoint(&self.db, checkpoint).map_err(storage)?;
        tx.commit().map_err(storage)
    }

    fn checkpoint(&self) -> Result<u64, ProjectionError> {
        DB.checkpoint(&self.db).map_err(db_error)
    }

    fn reset(&mut self) -> Result<(), ProjectionError> {
        DB.reset(&self.db, || Ok(()))
    }

    fn digest(&self) -> Result<[u8; 32], ProjectionError> {
        let mut hasher = Sha256::new();
        hasher.update(b"quire kv digest v1\n");
        let mut statement = self
            .db
            .prepare("SELECT key, value, owner, hlc, id, fence FROM current ORDER BY key")
            .map_err(db_error)?;
        let mut rows = statement.query([]).map_err(db_error)?;
        while let Some(row) = rows.next().map_err(db_error)? {
            let key: Vec<u8> = row.get(0).map_err(db_error)?;
            let value: Option<Vec<u8>> = row.get(1).map_err(db_error)?;
            let owner: Option<Vec<u8>> = row.get(2).map_err(db_error)?;
            hasher.update((key.len() as u64).to_be_bytes());
            hasher.update(&key);
            match value {
                Some(value) => {
                    hasher.update([1]);
                    hasher.update((value.len() as u64).to_be_bytes());
                    hasher.update(&value);
                }
                None => hasher.update([0]),
            }
            hasher.update(owner.unwrap_or_default());
            hasher.update(row.get::<_, i64>(3).map_err(db_error)?.to_be_bytes());
            hasher.update(row.get::<_, Vec<u8>>(4).map_err(db_error)?);
            hasher.update(row.get::<_, i64>(5).map_err(db_error)?.to_be_bytes());
        }
        Ok(hasher.finalize().into())
    }
}

/// A key's state as readers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: Vec<u8>,
    /// The folded state.
    pub state: State,
    /// Local seq of the last scribe that touched the key on this node.
    pub seq: u64,
}

/// One page of a [`Reader::scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPage {
    /// The entries, in key order.
    pub entries: Vec<Entry>,
    /// The local seq they are consistent with.
    pub seq: u64,
    /// Whether a limit ended the page: more entries of the prefix follow its last key.
    pub more: bool,
}

/// Read-only access to a live instance (its own SQLite connection; reads never block the
/// runner's writes, and see only committed batches).
#[derive(Debug)]
pub struct Reader {
    db: Connection,
}

impl Reader {
    /// Opens the instance in `dir` for reading.
    pub fn open(dir: &Path) -> Result<Reader, ProjectionError> {
        Ok(Reader {
            db: DB.open_read_only(dir)?,
        })
    }

    /// The key's entry (tombstones included: their `state.value` is `None`).
    pub fn get(&self, key: &[u8]) -> Result<Option<Entry>, ProjectionError> {
        self.db
            .prepare_cached(
                "SELECT key, value, owner, hlc, id, fence, seq FROM current WHERE key = ?1",
            )
            .and_then(|mut statement| statement.query_row([key], entry).optional())
            .map_err(db_error)
    }

    /// Live entries whose key starts with `prefix` and sorts after `after` (from the first when
    /// `None`), in key order: at most `limit`, and as many as fit in `max_bytes` of keys and values
    /// (at least one). With the checkpoint they are consistent with (one read transaction), and
    /// whether a limit ended the page before the prefix's last key.
    pub fn scan(
        &mut self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<ScanPage, ProjectionError> {
        let tx = self.db.transaction().map_err(db_error)?;
        let checkpoint = DB.checkpoint(&tx).map_err(db_error)?;
        let mut entries = Vec::new();
        let mut more = false;
        {
            // Sizes first: a value is read only once it is known to fit. One lower bound, so
            // SQLite seeks to it: a page costs its own keys, not every key before it.
            let (sql, from) = match after {
                Some(after) if after >= prefix => (
                    "SELECT key, length(value) FROM current
                     WHERE key > ?1 AND value IS NOT NULL ORDER BY key",
                    after,
                ),
                _ => (
                    "SELECT key, length(value) FROM current
                     WHERE key >= ?1 AND value IS NOT NULL ORDER BY key",
                    prefix,
                ),
            };
            let mut statement = tx.prepare_cached(sql).map_err(db_error)?;
            let mut rows = statement.query([from]).map_err(db_error)?;
            let mut bytes = 0usize;
            let mut keys = Vec::new();
            while let Some(row) = rows.next().map_err(db_error)? {
                let key: Vec<u8> = row.get(0).map_err(db_error)?;
                if !key.starts_with(prefix) {
                    break;
                }
                let size = key.len() + row.get::<_, i64>(1).map_err(db_error)? as usize;
                if keys.len() >= limit || (!keys.is_empty() && bytes + size > max_bytes) {
                    more = true;
                    break;
                }
                bytes += size;
                keys.push(key);
            }
            drop(rows);
            let mut read = tx
                .prepare_cached(
                    "SELECT key, value, owner, hlc, id, fence, seq FROM current WHERE key = ?1",
                )
                .map_err(db_error)?;
            for key in keys {
                entries.push(read.query_row([key], entry).map_err(db_error)?);
            }
        }
        tx.commit().map_err(db_error)?;
        Ok(ScanPage {
            entries,
            seq: checkpoint,
            more,
        })
    }

    /// The checkpoint of the committed state.
    pub fn checkpoint(&self) -> Result<u64, ProjectionError> {
        DB.checkpoint(&self.db).map_err(db_error)
    }
}

fn entry(row: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    let owner: Option<Vec<u8>> = row.get(2)?;
    Ok(Entry {
        key: row.get(0)?,
        state: State {
            value: row.get(1)?,
            owner: owner.map(|o| AuthorKey(blob32(o))),
            hlc: row.get::<_, i64>(3)? as u64,
            id: ScribeId(blob32(row.get(4)?)),
            fence: row.get::<_, i64>(5)? as u64,
        },
        seq: row.get::<_, i64>(6)? as u64,
    })
}
