//! Commands on a stopped node's store, outside the runner: [`rebuild_offline`] (a blue/green
//! rebuild run to the end, then swapped in) and [`replay`] (seqs replayed into scratch copies,
//! nothing of the node changed). The slot machinery they drive is `slot.rs`.

use std::path::Path;
use std::sync::Arc;

use quire_projection_api::{ApplyError, Plugin, Projector, Scope, Scribe as View, StreamId};

use super::slot::{place_of, read_batch, scope_dir, views, Slot, SlotError, PROJECTIONS_DIR};
use crate::log::store::Store;
use crate::log::Exclusions;

/// The scopes an offline command covers: the whole log, one stream, or every stream held.
fn scopes(
    store: &Store,
    plugin: &dyn Plugin,
    stream: Option<StreamId>,
) -> Result<Vec<Option<StreamId>>, SlotError> {
    Ok(match (plugin.scope(), stream) {
        (Scope::Log, None) => vec![None],
        (Scope::Log, Some(_)) => {
            return Err(SlotError::Stream(format!(
                "projection {} covers the whole log; drop --stream",
                plugin.name()
            )))
        }
        (Scope::Stream, Some(stream)) => vec![Some(stream)],
        (Scope::Stream, None) => store
            .streams()?
            .into_iter()
            .map(|(id, _)| Some(id))
            .collect(),
    })
}

/// A copy rebuilt offline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    /// The stream, for a per-stream projection.
    pub stream: Option<StreamId>,
    /// The new copy's digest.
    pub digest: [u8; 32],
}

/// Rebuilds `name` on a stopped node's store (every stream's copy, or one stream's), calling
/// `progress(done, total)` as it goes, and swaps each rebuilt copy in. Returns the new digests.
pub fn rebuild_offline(
    store: &Store,
    data_dir: &Path,
    plugin: Arc<dyn Plugin>,
    stream: Option<StreamId>,
    mut progress: impl FnMut(u64, u64),
) -> Result<Vec<Rebuilt>, SlotError> {
    let root = data_dir.join(PROJECTIONS_DIR);
    let head = store.head()?;
    let scopes = scopes(store, plugin.as_ref(), stream)?;
    let exclusions = Exclusions::load(store)?;
    let mut out = Vec::new();
    for scope in scopes {
        let slot = Slot::open(store, plugin.clone(), scope, &root)?;
        slot.start_fresh_rebuild(store)?;
        let target = slot.target(store, head)?;
        loop {
            let worked = slot.work(store, &exclusions, target, false, false)?;
            let (_, shadow) = slot.copies();
            progress(shadow.map(|s| s.checkpoint).unwrap_or(target), target);
            if worked.swapped || !worked.more && slot.copies().1.is_none() {
                break;
            }
        }
        out.push(Rebuilt {
            stream: scope,
            digest: slot.digest()?.0,
        });
    }
    Ok(out)
}

/// Replays seqs `from..=to` into fresh copies of `plugin` under `into` (nothing of the node is
/// changed), one per scope.
pub fn replay(
    store: &Store,
    plugin: &dyn Plugin,
    stream: Option<StreamId>,
    into: &Path,
    from: u64,
    to: u64,
    mut progress: impl FnMut(u64),
) -> Result<Vec<Replayed>, SlotError> {
    let to = to.min(store.head()?);
    let scopes = scopes(store, plugin, stream)?;
    let exclusions = Exclusions::load(store)?;
    let mut out = Vec::new();
    for scope in scopes {
        let dir = scope_dir(into, plugin.name(), scope.as_ref());
        out.push(replay_scope(
            store,
            plugin,
            (scope, &exclusions),
            &dir,
            (from, to),
            &mut progress,
        )?);
    }
    Ok(out)
}

/// Replays local seqs `from..=to` of `stream`'s scope (`None`: the whole log) into a new
/// instance of `plugin` in `dir`, parking nothing: a refused scribe is reported and skipped.
fn replay_scope(
    store: &Store,
    plugin: &dyn Plugin,
    (stream, exclusions): (Option<StreamId>, &Exclusions),
    dir: &Path,
    (from, to): (u64, u64),
    mut progress: impl FnMut(u64),
) -> Result<Replayed, SlotError> {
    let place = place_of(store, dir.to_path_buf(), stream)?;
    std::fs::create_dir_all(dir)
        .map_err(|error| SlotError::Projector(format!("{}: {error}", dir.display())))?;
    let mut projector = plugin.open(&place)?;
    let mut applied = 0;
    let mut refused = Vec::new();
    let mut next = from.max(1);
    while next <= to {
        let (entries, _) = read_batch(store, stream.as_ref(), next, to, plugin.max_batch())?;
        let Some(last) = entries.last() else {
            break;
        };
        next = last.seq + 1;
        applied += apply_refusing(&mut *projector, &views(&entries, exclusions)?, &mut refused)?;
        progress(next - 1);
    }
    let digest = projector.digest()?;
    Ok(Replayed {
        stream,
        applied,
        refused,
        digest,
    })
}

/// What a replay did in one scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// The stream, for a per-stream projection.
    pub stream: Option<StreamId>,
    /// Scribes applied.
    pub applied: u64,
    /// Scribes the projector refused: (local seq, its reason).
    pub refused: Vec<(u64, String)>,
    /// The scratch copy's digest.
    pub digest: [u8; 32],
}

/// Applies `batch`, leaving out (and adding to `refused`) each scribe the projector refuses.
/// Returns how many it applied.
fn apply_refusing(
    projector: &mut dyn Projector,
    batch: &[View],
    refused: &mut Vec<(u64, String)>,
) -> Result<u64, SlotError> {
    let mut applied = 0;
    let mut rest = batch;
    while !rest.is_empty() {
        let checkpoint = rest.last().expect("non-empty").local_seq;
        match projector.apply(rest, checkpoint) {
            Ok(()) => {
                applied += rest.len() as u64;
                rest = &[];
            }
            Err(ApplyError::Scribe { index, reason }) if index < rest.len() => {
                if index > 0 {
                    projector
                        .apply(&rest[..index], rest[index - 1].local_seq)
                        .map_err(|error| SlotError::Projector(error.to_string()))?;
                    applied += index as u64;
                }
                refused.push((rest[index].local_seq, reason));
                rest = &rest[index + 1..];
            }
            Err(error) => return Err(SlotError::Projector(error.to_string())),
        }
    }
    Ok(applied)
}
