//! `quire verify`: re-hashes and re-verifies every stored scribe of a data directory.
//!
//! Opens the store read-only (so it also works beside a running node) and checks, for every local
//! seq from 1 to the head: the seq is present with no gap; the scribe it names is stored under that
//! id with that seq; sha256 of the stored envelope is the id; the envelope decodes canonically, the
//! stored payload hashes to what the envelope names, the proof leads to its seal's root and the
//! seal's signature verifies (each distinct seal once per chunk); its stream's genesis was stored
//! before it, and so was every parent (the local order is causal); the stream index agrees. Then it
//! recomputes every stream's counters and compares them with the stored ones, counts the index
//! entries, and checks that every payload stored apart is named by a stored scribe and every
//! scribe's reference to one is stored. Seqs vacated by leaving a stream are counted, not gaps;
//! so are redacted payloads (a redacted scribe has no payload to hash: the `redact` scribe it
//! names instead must verify, be a `redact` of its stream, and target it).
//! Checks run in parallel on every core.

use std::collections::HashMap;
use std::path::Path;

use quire_projection_api::{Kind, ScribeId, StreamId};
use rayon::prelude::*;

use crate::log::store::{Store, StoreError, StreamRecord};
use crate::scribe::{hash, Scribe};

/// What `verify` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The head recorded in the store.
    pub head: u64,
    /// Scribes checked.
    pub scribes: u64,
    /// Streams found.
    pub streams: u64,
    /// Seqs vacated when this node left their streams (accounted for, not gaps).
    pub vacated: u64,
    /// Scribes whose payload was redacted (accounted for, not damage).
    pub redacted: u64,
    /// Scribes whose payload was pruned by the stream's retention rule (accounted for, not
    /// damage).
    pub pruned: u64,
    /// One line per problem; empty means no damage.
    pub damage: Vec<String>,
}

const CHUNK: usize = 4096;

/// Verifies the store of the data directory `data_dir`.
pub fn verify(data_dir: &Path) -> Result<VerifyReport, StoreError> {
    let store = Store::open_read_only(&crate::log::store_path(data_dir))?;
    let head = store.head()?;
    let mut report = VerifyReport {
        head,
        ..VerifyReport::default()
    };
    let mut expected_seq = 1u64;
    let mut seen: HashMap<StreamId, StreamRecord> = HashMap::new();
    let mut chunk: Vec<(u64, ScribeId)> = Vec::with_capacity(CHUNK);
    let mut ids = store.log_ids();
    loop {
        chunk.clear();
        for item in ids.by_ref() {
            let (seq, id) = item?;
            if seq != expected_seq {
                report.damage.push(format!(
                    "gap in the log: expected seq {expected_seq}, found {seq}"
                ));
            }
            expected_seq = seq + 1;
            match id {
                Some(id) => chunk.push((seq, id)),
                None => report.vacated += 1,
            }
            if chunk.len() == CHUNK {
                break;
            }
        }
        if chunk.is_empty() {
            break;
        }
        let checked = check_chunk(&store, &chunk);
        for (seq, id, result) in checked {
            report.scribes += 1;
            if seq > head {
                report
                    .damage
                    .push(format!("seq {seq} is above the recorded head {head}"));
            }
            let scribe = match result {
                Ok(scribe) => scribe,
                Err(problem) => {
                    report.damage.push(format!("seq {seq} ({id}): {problem}"));
                    continue;
                }
            };
            let stream = scribe.stream_id();
            if let Some(justification) = &scribe.redacted_by {
                match check_justification(&scribe, justification) {
                    Ok(Kind::Prune) => report.pruned += 1,
                    Ok(_) => report.redacted += 1,
                    Err(problem) => {
                        report.redacted += 1;
                        report.damage.push(format!(
                            "seq {seq} ({id}): redacted, but its justification {problem}"
                        ))
                    }
                }
            }
            if scribe.body.kind == Kind::StreamCreate {
                seen.insert(
                    stream,
                    StreamRecord {
                        genesis_seq: seq,
                        head_seq: seq,
                        scribes: 1,
                        bytes: scribe.size(),
                    },
                );
            } else {
                match seen.get_mut(&stream) {
                    Some(record) => {
                        record.head_seq = seq;
                        record.scribes += 1;
                        record.bytes += scribe.size();
                    }
                    None => report.damage.push(format!(
                        "seq {seq} ({id}): its stream {stream} has no genesis stored before it"
                    )),
                }
            }
            for parent in &scribe.body.parents {
                match store.seq_of(parent)? {
                    Some(parent_seq) if parent_seq < seq => {}
                    Some(parent_seq) => report.damage.push(format!(
                        "seq {seq} ({id}): parent {parent} is stored after it, at seq {parent_seq}"
                    )),
                    None => report
                        .damage
                        .push(format!("seq {seq} ({id}): parent {parent} is not stored")),
                }
            }
            match store.stream_index_at(&stream, seq)? {
                Some(indexed) if indexed == id => {}
                other => report
                    .damage
                    .push(format!("seq {seq} ({id}): stream index says {other:?}")),
            }
        }
    }
    if expected_seq != head + 1 {
        report.damage.push(format!(
            "the log ends at seq {} but the recorded head is {head}",
            expected_seq - 1
        ));
    }
    let stored: HashMap<StreamId, StreamRecord> = store.streams()?.into_iter().collect();
    for (stream, record) in &seen {
        match stored.get(stream) {
            Some(stored) if stored == record => {}
            Some(stored) => report.damage.push(format!(
                "stream {stream}: stored counters {stored:?} differ from the log's {record:?}"
            )),
            None => report
                .damage
                .push(format!("stream {stream}: no stream record")),
        }
    }
    for stream in stored.keys().filter(|stream| !seen.contains_key(*stream)) {
        report.damage.push(format!(
            "stream {stream}: a record but no genesis in the log"
        ));
    }
    report.streams = seen.len() as u64;
    check_payloads(&store, &mut report)?;
    let (scribes, indexed) = store.index_counts()?;
    if scribes != report.scribes {
        report.damage.push(format!(
            "{scribes} scribes stored but {} in the log",
            report.scribes
        ));
    }
    if indexed != report.scribes {
        report.damage.push(format!(
            "{indexed} stream-index entries but {} scribes in the log",
            report.scribes
        ));
    }
    Ok(report)
}

/// A redacted scribe's justification is a valid `redact` or `prune` scribe of its stream that
/// targets it; answers which kind.
fn check_justification(scribe: &Scribe, justification: &bytes::Bytes) -> Result<Kind, String> {
    use prost::Message as _;
    let sealed = crate::pb::SealedScribe::decode(justification.clone())
        .map_err(|error| format!("does not decode: {error}"))?;
    let parts = crate::scribe::Parts::from_proto(sealed).map_err(|error| error.to_string())?;
    let redact = Scribe::decode(parts).map_err(|error| format!("does not verify: {error}"))?;
    let target = crate::log::rules::redact_target(&redact).map_err(|error| error.to_string())?;
    if !redact.body.kind.erases() || redact.stream_id() != scribe.stream_id() || target != scribe.id
    {
        return Err(format!(
            "is a {} of stream {} targeting {target}",
            redact.body.kind,
            redact.stream_id()
        ));
    }
    Ok(redact.body.kind)
}

/// Every payload stored apart is named by a stored scribe, and every reference to one names a
/// stored scribe and a stored payload (a payload is deleted when the last scribe naming it goes).
fn check_payloads(store: &Store, report: &mut VerifyReport) -> Result<(), StoreError> {
    // Keys sort as: a payload's hash, then its references (hash ‖ id).
    let mut current: Option<([u8; 32], bool)> = None;
    let unnamed = |current: Option<([u8; 32], bool)>, report: &mut VerifyReport| {
        if let Some((hash, false)) = current {
            report.damage.push(format!(
                "payload {} is named by no stored scribe (it should have been deleted with the last one)",
                hex::encode(hash)
            ));
        }
    };
    for item in store.payload_keys() {
        match item? {
            (hash, None) => {
                unnamed(current, report);
                current = Some((hash, false));
            }
            (hash, Some(id)) => {
                match &mut current {
                    Some((payload, named)) if *payload == hash => *named = true,
                    _ => report.damage.push(format!(
                        "scribe {id} names payload {}, which is not stored",
                        hex::encode(hash)
                    )),
                }
                if store.seq_of(&id)?.is_none() {
                    report.damage.push(format!(
                        "payload {} is said to be named by scribe {id}, which is not stored",
                        hex::encode(hash)
                    ));
                }
            }
        }
    }
    unnamed(current, report);
    Ok(())
}

fn check_one(store: &Store, seq: u64, id: &ScribeId) -> Result<Scribe, String> {
    let entry = store
        .get(id)
        .map_err(|error| error.to_string())?
        .ok_or("the log names it but it is not stored")?;
    if entry.seq != seq {
        return Err(format!("stored with seq {}, not {seq}", entry.seq));
    }
    let actual = hash(&entry.parts.envelope);
    if actual != *id {
        return Err(format!("stored envelope hashes to {actual}"));
    }
    Scribe::decode_unverified(entry.parts, None).map_err(|error| error.to_string())
}

/// Checks a chunk of `(seq, id)`: each scribe on its own, then each distinct seal's signature once.
fn check_chunk(
    store: &Store,
    chunk: &[(u64, ScribeId)],
) -> Vec<(u64, ScribeId, Result<Scribe, String>)> {
    let decoded: Vec<(u64, ScribeId, Result<Scribe, String>)> = chunk
        .par_iter()
        .map(|(seq, id)| (*seq, *id, check_one(store, *seq, id)))
        .collect();
    let mut seals = HashMap::new();
    for (.., scribe) in &decoded {
        if let Ok(scribe) = scribe {
            seals
                .entry(scribe.seal.id)
                .or_insert_with(|| scribe.seal.clone());
        }
    }
    let bad: HashMap<[u8; 32], String> = seals
        .into_par_iter()
        .filter_map(|(id, seal)| seal.verify().err().map(|error| (id, error.to_string())))
        .collect();
    decoded
        .into_iter()
        .map(|(seq, id, result)| {
            let result = result.and_then(|scribe| match bad.get(&scribe.seal.id) {
                Some(error) => Err(error.clone()),
                None => Ok(scribe),
            });
            (seq, id, result)
        })
        .collect()
}
