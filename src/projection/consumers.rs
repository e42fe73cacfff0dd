//! Durable consumers: out-of-process projectors in any language.
//!
//! A client subscribes with `Log.Subscribe { consumer: "name" }` and calls `Log.Ack { consumer,
//! seq }` once it has made its own state durable up to `seq`. The node stores the ack (record
//! `c/<name>` of the `projections` column family: `{"stream": hex or "", "acked": n}`) and the next
//! subscription under that name starts at `acked + 1`. The consumer's own state and the ack cannot
//! commit together (they live in different processes), so a consumer that dies between the two
//! sees the scribes after its last ack again: it must apply idempotently (by scribe id) or keep
//! its own checkpoint beside its state and skip what it already has — the example in
//! `examples/python-consumer` does the latter.

use quire_projection_api::StreamId;
use serde_json::{json, Value};

use super::{RunnerError, SlotError};
use crate::log::store::Store;

/// A durable consumer's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    /// Its name.
    pub name: String,
    /// The stream it follows (`None`: the whole log).
    pub stream: Option<StreamId>,
    /// The last seq it acknowledged (0: none).
    pub acked: u64,
}

fn key(name: &str) -> Vec<u8> {
    format!("c/{name}").into_bytes()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn decode(name: &str, value: &[u8]) -> Result<Consumer, RunnerError> {
    let damaged = || RunnerError::from(SlotError::Damaged(format!("consumer {name}")));
    let value: Value = serde_json::from_slice(value).map_err(|_| damaged())?;
    let stream = match value["stream"].as_str().unwrap_or_default() {
        "" => None,
        hex => Some(hex.parse().map_err(|_| damaged())?),
    };
    Ok(Consumer {
        name: name.to_string(),
        stream,
        acked: value["acked"].as_u64().ok_or_else(damaged)?,
    })
}

fn put(store: &Store, consumer: &Consumer) -> Result<(), RunnerError> {
    let value = json!({
        "stream": consumer.stream.map(|s| s.to_hex()).unwrap_or_default(),
        "acked": consumer.acked,
    });
    store.put_projection_records(&[(key(&consumer.name), Some(value.to_string().into_bytes()))])?;
    Ok(())
}

/// The consumer named `name`, if it exists.
pub(crate) fn get(store: &Store, name: &str) -> Result<Option<Consumer>, RunnerError> {
    match store.projection_record(&key(name))? {
        Some(value) => Ok(Some(decode(name, &value)?)),
        None => Ok(None),
    }
}

/// Every consumer, by name.
pub(crate) fn list(store: &Store) -> Result<Vec<Consumer>, RunnerError> {
    store
        .projection_records(b"c/")?
        .iter()
        .map(|(key, value)| decode(&String::from_utf8_lossy(&key[2..]), value))
        .collect()
}

/// Where `name` resumes; creates it (following `stream`) on first use.
pub(crate) fn start(
    store: &Store,
    name: &str,
    stream: Option<&StreamId>,
) -> Result<u64, RunnerError> {
    if !valid_name(name) {
        return Err(RunnerError::Consumer(format!(
            "consumer name {name:?} must be 1-128 characters of letters, digits, '-', '_' and '.'"
        )));
    }
    match get(store, name)? {
        Some(consumer) if consumer.stream.as_ref() != stream => {
            let follows = consumer
                .stream
                .map(|s| format!("stream {s}"))
                .unwrap_or_else(|| "the whole log".into());
            Err(RunnerError::Consumer(format!(
                "consumer {name:?} follows {follows}; subscribe to that, or use another name"
            )))
        }
        Some(consumer) => Ok(consumer.acked + 1),
        None => {
            put(
                store,
                &Consumer {
                    name: name.to_string(),
                    stream: stream.copied(),
                    acked: 0,
                },
            )?;
            Ok(1)
        }
    }
}

/// Records an ack of `consumer`. Acks never move backwards (a late, lower ack is ignored) and
/// never past `limit` (what it can have received).
pub(crate) fn ack(
    store: &Store,
    mut consumer: Consumer,
    seq: u64,
    limit: u64,
) -> Result<Consumer, RunnerError> {
    if seq > limit {
        return Err(RunnerError::Consumer(format!(
            "ack of seq {seq} is beyond the last seq consumer {:?} can have received ({limit}): acknowledge only seqs you received",
            consumer.name
        )));
    }
    if seq > consumer.acked {
        consumer.acked = seq;
        put(store, &consumer)?;
    }
    Ok(consumer)
}

/// Starts `name` over from seq 1 (`quire rebuild <consumer>`).
pub(crate) fn reset(store: &Store, name: &str) -> Result<(), RunnerError> {
    if let Some(mut consumer) = get(store, name)? {
        consumer.acked = 0;
        put(store, &consumer)?;
    }
    Ok(())
}
