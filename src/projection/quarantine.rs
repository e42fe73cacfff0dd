//! The quarantine: scribes a projector refused, parked so the rest of the log goes on. Parking
//! one (durably, before the copy's checkpoint passes it), clearing it once a copy applies it,
//! listing them, and an operator's retry or skip. The records are `q/<name>/<scope>/<seq u64 BE>`
//! in the store's `projections` column family (JSON: `{"id", "kind", "error", "state", "at_ms",
//! "generations"}`). How a batch is applied around a parked scribe, and the halt policy, is
//! `slot.rs`; finding the slots that parked a scribe is the runner's.

use std::time::{SystemTime, UNIX_EPOCH};

use quire_projection_api::{ApplyError, Scribe as View, ScribeId, StreamId};
use serde_json::{json, Value};

use super::slot::{lock, Slot, SlotError};
use super::view::to_view;
use crate::log::store::Store;

/// A parked scribe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    /// Projection name.
    pub name: String,
    /// Its stream scope, if per stream.
    pub stream: Option<StreamId>,
    /// Local seq of the scribe.
    pub seq: u64,
    /// The scribe.
    pub id: ScribeId,
    /// Its kind.
    pub kind: String,
    /// What the projector said.
    pub error: String,
    /// `parked` or `skipped`.
    pub state: String,
    /// When it was parked (unix ms).
    pub at_ms: u64,
    /// The copies (generations) that parked it and have not applied it since.
    pub generations: Vec<u64>,
}

impl Parked {
    fn encode(&self) -> Vec<u8> {
        json!({
            "id": self.id.to_hex(),
            "kind": self.kind,
            "error": self.error,
            "state": self.state,
            "at_ms": self.at_ms,
            "generations": self.generations,
        })
        .to_string()
        .into_bytes()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Scribes kept in one slot's quarantine. A scribe refused past it is passed over like a parked
/// one (the copy goes on after it) but only counted, not kept: a stranger who makes a projector
/// refuse scribes by the million fills no disk and no listing. A rebuild applies them again.
pub const MAX_PARKED: usize = 1_000;

impl Slot {
    /// Records that copy `generation` parked `scribe` (durably, before its checkpoint moves past
    /// it). Returns whether an operator had already decided to skip it. Past [`MAX_PARKED`]
    /// records, a newly refused scribe is only counted ([`Slot::not_kept`]).
    pub(super) fn park(
        &self,
        store: &Store,
        scribe: &View,
        reason: &str,
        generation: u64,
    ) -> Result<bool, SlotError> {
        let key = parked_key(&self.key, scribe.local_seq);
        let existing = store.projection_record(&key)?;
        if existing.is_none() && self.parked_count(store)? >= MAX_PARKED {
            let count = self.not_kept(store)? + 1;
            store.put_projection_records(&[(
                not_kept_key(&self.key),
                Some(count.to_be_bytes().to_vec()),
            )])?;
            tracing::warn!(slot = %self.key, seq = scribe.local_seq, id = %scribe.id, %reason, not_kept = count, "quarantine full ({MAX_PARKED}): a refused scribe is counted, not kept");
            return Ok(false);
        }
        let mut parked = match existing {
            Some(existing) => decode_parked(&key, &existing)?,
            None => Parked {
                name: self.plugin.name().to_string(),
                stream: self.stream,
                seq: scribe.local_seq,
                id: scribe.id,
                kind: scribe.kind.as_str().to_string(),
                error: String::new(),
                state: "parked".into(),
                at_ms: 0,
                generations: Vec::new(),
            },
        };
        if parked.state == "skipped" {
            return Ok(true);
        }
        parked.error = reason.to_string();
        parked.at_ms = now_ms();
        if !parked.generations.contains(&generation) {
            parked.generations.push(generation);
        }
        store.put_projection_records(&[(key, Some(parked.encode()))])?;
        Ok(false)
    }

    /// After copy `generation` was swapped in: scribes only the retired copy held parked were
    /// applied by the new one, so their records go (skipped ones stay, as the decision).
    pub(super) fn forget_parked_by_others(
        &self,
        store: &Store,
        generation: u64,
    ) -> Result<(), SlotError> {
        let stale: Vec<_> = self
            .parked(store)?
            .into_iter()
            .filter(|p| p.state == "parked" && !p.generations.contains(&generation))
            .map(|p| (parked_key(&self.key, p.seq), None))
            .collect();
        if !stale.is_empty() {
            store.put_projection_records(&stale)?;
        }
        if self.not_kept(store)? > 0 {
            // The rebuilt copy applied everything again (what it refused it parked anew).
            store.put_projection_records(&[(not_kept_key(&self.key), None)])?;
        }
        Ok(())
    }

    /// Copy `generation` has applied seqs `from..=to`: it no longer holds any of them parked.
    pub(super) fn clear_applied(
        &self,
        store: &Store,
        generation: u64,
        from: u64,
        to: u64,
    ) -> Result<(), SlotError> {
        // Runs after every batch: read only the records of these seqs (usually none).
        let end = parked_key(&self.key, to);
        let records =
            store.projection_range(&parked_key(&self.key, from), |key| key <= end.as_slice())?;
        let mut updates = Vec::new();
        for (key, value) in records {
            let parked = decode_parked(&key, &value)?;
            if parked.generations.contains(&generation) {
                updates.push(self.without_generation(parked, generation));
            }
        }
        if !updates.is_empty() {
            store.put_projection_records(&updates)?;
        }
        Ok(())
    }

    /// The record update that takes `generation` off `parked` (deleting a parked record no copy
    /// holds any more; a skipped one stays, as the record of the decision).
    fn without_generation(
        &self,
        mut parked: Parked,
        generation: u64,
    ) -> (Vec<u8>, Option<Vec<u8>>) {
        parked.generations.retain(|g| *g != generation);
        let key = parked_key(&self.key, parked.seq);
        if parked.generations.is_empty() && parked.state == "parked" {
            (key, None)
        } else {
            (key, Some(parked.encode()))
        }
    }

    /// Re-applies a parked scribe to the copies that parked it (the live copy, a shadow copy, or
    /// both). A copy halted at it instead resumes there, re-applying it in order.
    pub(crate) fn retry(&self, store: &Store, seq: u64) -> Result<Parked, SlotError> {
        let mut live = lock(&self.live);
        let mut shadow = lock(&self.shadow);
        let parked = self.parked_at(store, seq)?;
        let view = self.load(store, &parked)?;
        let mut record = parked.clone();
        for instance in std::iter::once(&mut *live).chain(shadow.as_mut()) {
            if !record.generations.contains(&instance.generation) {
                continue;
            }
            if instance.checkpoint < seq {
                // Halted before it: the runner applies it in order when it resumes, and parks
                // it again if it still fails.
                let mut flags = lock(&self.flags);
                if matches!(&flags.halted, Some((at, _)) if *at == seq) {
                    flags.halted = None;
                }
            } else {
                let checkpoint = instance.checkpoint;
                match instance
                    .projector(&*self.plugin)?
                    .apply(std::slice::from_ref(&view), checkpoint)
                {
                    Ok(()) => {}
                    Err(ApplyError::Scribe { reason, .. }) => {
                        self.park(store, &view, &reason, instance.generation)?;
                        return Err(SlotError::StillFails {
                            id: parked.id,
                            reason,
                        });
                    }
                    Err(ApplyError::Storage(message)) => return Err(SlotError::Projector(message)),
                }
            }
            let update = self.without_generation(record.clone(), instance.generation);
            record.generations.retain(|g| *g != instance.generation);
            store.put_projection_records(&[update])?;
        }
        Ok(parked)
    }

    /// Records the decision to skip a parked scribe; a live copy halted at it goes on after it.
    pub(crate) fn skip(&self, store: &Store, seq: u64) -> Result<Parked, SlotError> {
        let mut live = lock(&self.live);
        let mut parked = self.parked_at(store, seq)?;
        parked.state = "skipped".into();
        store.put_projection_records(&[(parked_key(&self.key, seq), Some(parked.encode()))])?;
        let mut flags = lock(&self.flags);
        if matches!(&flags.halted, Some((at, _)) if *at == seq) {
            self.move_checkpoint(&mut live, seq)?;
            live.scanned = live.scanned.max(seq);
            self.show_live(&live);
            flags.halted = None;
        }
        Ok(parked)
    }

    fn load(&self, store: &Store, parked: &Parked) -> Result<View, SlotError> {
        let entry = store.get(&parked.id)?.ok_or_else(|| {
            SlotError::Damaged(format!("parked scribe {} is not stored", parked.id))
        })?;
        let mut view = to_view(&entry)?;
        view.local_seq = parked.seq;
        Ok(view)
    }

    fn parked_at(&self, store: &Store, seq: u64) -> Result<Parked, SlotError> {
        let key = parked_key(&self.key, seq);
        let value = store
            .projection_record(&key)?
            .ok_or(SlotError::NotParked(format!("seq {seq}")))?;
        decode_parked(&key, &value)
    }

    /// How many records this slot's quarantine holds.
    fn parked_count(&self, store: &Store) -> Result<usize, SlotError> {
        let prefix = format!("q/{}/", self.key);
        Ok(store.projection_records(prefix.as_bytes())?.len())
    }

    /// Scribes refused while the quarantine was full (since the last swap of a rebuilt copy).
    pub(crate) fn not_kept(&self, store: &Store) -> Result<u64, SlotError> {
        let key = not_kept_key(&self.key);
        Ok(match store.projection_record(&key)? {
            Some(value) => u64::from_be_bytes(
                value
                    .as_slice()
                    .try_into()
                    .map_err(|_| SlotError::Damaged(format!("quarantine count {key:?}")))?,
            ),
            None => 0,
        })
    }

    /// Every parked or skipped scribe of this slot.
    pub(crate) fn parked(&self, store: &Store) -> Result<Vec<Parked>, SlotError> {
        let prefix = format!("q/{}/", self.key);
        store
            .projection_records(prefix.as_bytes())?
            .iter()
            .map(|(key, value)| decode_parked(key, value))
            .collect()
    }
}

/// `n/<name>/<scope>`: how many refused scribes a full quarantine did not keep.
pub(super) fn not_kept_key(key: &str) -> Vec<u8> {
    format!("n/{key}").into_bytes()
}

fn parked_key(key: &str, seq: u64) -> Vec<u8> {
    let mut out = format!("q/{key}/").into_bytes();
    out.extend_from_slice(&seq.to_be_bytes());
    out
}

fn decode_parked(key: &[u8], value: &[u8]) -> Result<Parked, SlotError> {
    let damaged = || SlotError::Damaged(format!("quarantine record {key:?}"));
    // q/<name>/<scope>/<seq BE>
    if key.len() < 10 {
        return Err(damaged());
    }
    let (head, seq) = key.split_at(key.len() - 8);
    let seq = u64::from_be_bytes(seq.try_into().map_err(|_| damaged())?);
    let head = std::str::from_utf8(head).map_err(|_| damaged())?;
    let mut parts = head.trim_end_matches('/').splitn(3, '/');
    let (Some("q"), Some(name), Some(scope)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(damaged());
    };
    let stream = if scope == "log" {
        None
    } else {
        Some(scope.parse().map_err(|_| damaged())?)
    };
    let value: Value = serde_json::from_slice(value).map_err(|_| damaged())?;
    let text = |field: &str| value[field].as_str().unwrap_or_default().to_string();
    Ok(Parked {
        name: name.to_string(),
        stream,
        seq,
        id: text("id").parse().map_err(|_| damaged())?,
        kind: text("kind"),
        error: text("error"),
        state: text("state"),
        at_ms: value["at_ms"].as_u64().unwrap_or(0),
        generations: value["generations"]
            .as_array()
            .map(|list| list.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default(),
    })
}
