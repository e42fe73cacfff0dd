//! The projection conformance suite (feature `testing`): properties every projector must keep.
//!
//! Run it from a projector crate's tests with a strategy that makes scribes your projector cares
//! about (kinds, payloads, authors, clocks); the suite renumbers their local seqs itself:
//!
//! ```ignore
//! #[test]
//! fn conformance() {
//!     let scribes = proptest::collection::vec(my_scribe_strategy(), 0..40);
//!     quire_projection_api::testing::check_all(&MyPlugin::default(), scribes, 64).unwrap();
//! }
//! ```
//!
//! The properties (each [`check_all`] case runs all four on one generated set of scribes):
//! 1. [`check_order_and_duplicates`]: any permutation of the scribes, with any of them delivered
//!    twice and cut into batches anywhere, gives the digest of applying them once in order.
//! 2. [`check_crash_and_resume`]: abandoning the instance after any batch (a crash: no destructor
//!    runs), reopening its directory and going on from its checkpoint applies nothing twice and
//!    skips nothing; the reopened checkpoint is exactly the last one committed.
//! 3. [`check_rebuild_equals_incremental`]: many small batches give the digest of one big batch
//!    applied to a reset instance.
//!
//! Throughout, local seqs have gaps, the checkpoint is sometimes moved by an empty batch, and
//! `checkpoint()` must always report the last checkpoint passed to `apply`.
//! 4. [`check_reset_empties`]: after `reset` the checkpoint is 0 and the digest is that of a new,
//!    empty instance.
//!
//! A failing property comes back as `Err` with proptest's smallest failing case, so a suite run
//! against a deliberately order-sensitive projector fails (the daemon's tests do exactly that).
//!
//! Every instance the suite opens reads payloads ([`crate::Place::payloads`]) from a
//! [`MemoryPayloads`] holding the scribes of the case, so a projector that keeps ids instead of
//! bytes runs the suite without a node. Use one in your own tests the same way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use sha2::{Digest, Sha256};

use crate::{
    AuthorKey, Kind, Payloads, Place, Plugin, Policy, ProjectionError, Projector, Scope, Scribe,
    ScribeId, StreamId,
};

/// A [`Payloads`] source in memory, for tests: it answers the payloads of the scribes given to
/// [`MemoryPayloads::insert`], `None` for those [`MemoryPayloads::redact`]ed, and an error for
/// any other id (as the node's store does for a scribe it does not hold).
#[derive(Debug, Default)]
pub struct MemoryPayloads {
    /// Payload by scribe id; `None`: redacted.
    payloads: Mutex<HashMap<ScribeId, Option<Vec<u8>>>>,
}

impl MemoryPayloads {
    /// A source holding the payloads of `scribes`.
    pub fn from_scribes<'a>(scribes: impl IntoIterator<Item = &'a Scribe>) -> MemoryPayloads {
        let source = MemoryPayloads::default();
        for scribe in scribes {
            source.insert(scribe);
        }
        source
    }

    /// Stores `scribe`'s payload (as a node stores every scribe it admits).
    pub fn insert(&self, scribe: &Scribe) {
        self.lock()
            .entry(scribe.id)
            .or_insert_with(|| Some(scribe.payload.clone()));
    }

    /// Redacts `id`'s payload: from now on it answers `None`.
    pub fn redact(&self, id: &ScribeId) {
        self.lock().insert(*id, None);
    }

    /// Forgets `id` altogether (a damaged store): from now on it answers an error.
    pub fn forget(&self, id: &ScribeId) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ScribeId, Option<Vec<u8>>>> {
        self.payloads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Payloads for MemoryPayloads {
    fn payload(&self, id: &ScribeId) -> Result<Option<Vec<u8>>, ProjectionError> {
        match self.lock().get(id) {
            Some(payload) => Ok(payload.clone()),
            None => Err(ProjectionError::new(format!(
                "scribe {id} is not stored in this MemoryPayloads"
            ))),
        }
    }
}

/// A scribe for tests, with an id derived from its fields (so equal fields give equal ids) and
/// local seq 0 (the suite assigns seqs).
pub fn scribe(
    stream: StreamId,
    author: AuthorKey,
    hlc: u64,
    kind: Kind,
    content_type: &str,
    payload: Vec<u8>,
) -> Scribe {
    let mut hasher = Sha256::new();
    hasher.update(stream.0);
    hasher.update(author.0);
    hasher.update(hlc.to_be_bytes());
    hasher.update(kind.as_str().as_bytes());
    hasher.update([0]);
    hasher.update(content_type.as_bytes());
    hasher.update([0]);
    hasher.update(&payload);
    Scribe {
        id: ScribeId(hasher.finalize().into()),
        stream,
        author,
        hlc,
        kind,
        content_type: content_type.to_string(),
        payload,
        parents: Vec::new(),
        local_seq: 0,
    }
}

/// Runs the four properties over `cases` sets of scribes drawn from `scribes`.
pub fn check_all<S>(plugin: &dyn Plugin, scribes: S, cases: u32) -> Result<(), String>
where
    S: Strategy<Value = Vec<Scribe>>,
{
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&(scribes, proptest::num::u64::ANY), |(scribes, seed)| {
            let fail = |error: String| TestCaseError::fail(error);
            check_order_and_duplicates(plugin, &scribes, seed).map_err(fail)?;
            check_crash_and_resume(plugin, &scribes, seed).map_err(fail)?;
            check_rebuild_equals_incremental(plugin, &scribes, seed).map_err(fail)?;
            check_reset_empties(plugin, &scribes).map_err(fail)?;
            Ok(())
        })
        .map_err(|error| format!("{} failed the conformance suite: {error}", plugin.name()))
}

/// [`check_all`] with every instance opened under `policy` (a per-stream projector whose rules
/// depend on the stream's policy, e.g. key leases on and off).
pub fn check_all_with_policy<P, S>(
    plugin: &P,
    policy: Policy,
    scribes: S,
    cases: u32,
) -> Result<(), String>
where
    P: Plugin + Clone,
    S: Strategy<Value = Vec<Scribe>>,
{
    check_all(
        &WithPolicy {
            inner: plugin.clone(),
            policy,
        },
        scribes,
        cases,
    )
}

/// A plugin whose instances are opened under a given policy.
struct WithPolicy<P> {
    inner: P,
    policy: Policy,
}

impl<P: Plugin> Plugin for WithPolicy<P> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn fingerprint(&self) -> String {
        self.inner.fingerprint()
    }
    fn scope(&self) -> Scope {
        self.inner.scope()
    }
    fn open(&self, place: &Place) -> Result<Box<dyn Projector>, crate::ProjectionError> {
        self.inner.open(&Place {
            policy: self.policy.clone(),
            ..place.clone()
        })
    }
}

/// Property 1: permutations, duplicates, batch cuts and the retry form (one scribe applied again
/// out of order, at or below the checkpoint) do not change the digest.
pub fn check_order_and_duplicates(
    plugin: &dyn Plugin,
    scribes: &[Scribe],
    seed: u64,
) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let expected = {
        let mut fresh = Instance::open(plugin, scribes)?;
        fresh.feed(scribes, &mut Rng::new(1), usize::MAX)?;
        fresh.digest()?
    };
    let mut shuffled: Vec<Scribe> = scribes.to_vec();
    for i in (1..shuffled.len()).rev() {
        shuffled.swap(i, rng.below(i + 1));
    }
    let twice: Vec<Scribe> = shuffled
        .iter()
        .filter(|_| rng.below(4) == 0)
        .cloned()
        .collect();
    for again in twice {
        let at = rng.below(shuffled.len() + 1);
        shuffled.insert(at, again);
    }
    // One scribe arrives last in the retry form: a scribe at or below the checkpoint, with the
    // checkpoint unchanged (what `quire quarantine retry` does).
    let held = (shuffled.len() >= 2).then(|| shuffled.remove(rng.below(shuffled.len())));
    let mut other = Instance::open(plugin, scribes)?;
    other.feed(&shuffled, &mut rng, usize::MAX)?;
    if let Some(mut held) = held {
        let checkpoint = other.checkpoint()?;
        held.local_seq = checkpoint.max(1);
        other
            .projector()
            .apply(std::slice::from_ref(&held), checkpoint)
            .map_err(|error| format!("apply (retry form): {error}"))?;
        let after = other.checkpoint()?;
        if after != checkpoint {
            return Err(format!(
                "a retry-form apply with checkpoint {checkpoint} left the checkpoint at {after}"
            ));
        }
    }
    let actual = other.digest()?;
    if actual != expected {
        return Err(format!(
            "order or duplicates changed the digest: in order {}, shuffled with duplicates {}",
            hex::encode(expected),
            hex::encode(actual)
        ));
    }
    Ok(())
}

/// Property 2: a crash after any committed batch, then a resume from the checkpoint, gives the
/// digest of an uninterrupted run.
pub fn check_crash_and_resume(
    plugin: &dyn Plugin,
    scribes: &[Scribe],
    seed: u64,
) -> Result<(), String> {
    let mut rng = Rng::new(seed.rotate_left(17));
    let expected = {
        let mut clean = Instance::open(plugin, scribes)?;
        clean.feed(scribes, &mut Rng::new(1), usize::MAX)?;
        clean.digest()?
    };
    let mut crashing = Instance::open(plugin, scribes)?;
    let batches = 1 + rng.below(4);
    crashing.feed(scribes, &mut rng, batches)?;
    let committed = crashing.committed;
    crashing.crash_and_reopen(plugin)?;
    let after = crashing.checkpoint()?;
    if after != committed {
        return Err(format!(
            "checkpoint {committed} was committed, but the reopened instance says {after}"
        ));
    }
    let rest: Vec<Scribe> = crashing
        .numbered(scribes)
        .into_iter()
        .filter(|scribe| scribe.local_seq > after)
        .collect();
    crashing.apply_in_batches(&rest, &mut rng, usize::MAX)?;
    let actual = crashing.digest()?;
    if actual != expected {
        return Err(format!(
            "resuming from checkpoint {after} after a crash gave digest {}, an uninterrupted run {}",
            hex::encode(actual),
            hex::encode(expected)
        ));
    }
    Ok(())
}

/// Property 3: incremental application equals a rebuild from scratch.
pub fn check_rebuild_equals_incremental(
    plugin: &dyn Plugin,
    scribes: &[Scribe],
    seed: u64,
) -> Result<(), String> {
    let mut incremental = Instance::open(plugin, scribes)?;
    incremental.feed(scribes, &mut Rng::new(seed.rotate_left(31)), usize::MAX)?;
    let expected = incremental.digest()?;
    incremental.reset()?;
    let all = incremental.numbered(scribes);
    if let Some(last) = all.last() {
        incremental
            .projector()
            .apply(&all, last.local_seq)
            .map_err(|error| format!("apply (one batch): {error}"))?;
    }
    let actual = incremental.digest()?;
    if actual != expected {
        return Err(format!(
            "reset then one batch gave digest {}, small batches {}",
            hex::encode(actual),
            hex::encode(expected)
        ));
    }
    Ok(())
}

/// Property 4: reset gives back an empty instance.
pub fn check_reset_empties(plugin: &dyn Plugin, scribes: &[Scribe]) -> Result<(), String> {
    let empty = Instance::open(plugin, scribes)?.digest()?;
    let mut used = Instance::open(plugin, scribes)?;
    used.feed(scribes, &mut Rng::new(7), usize::MAX)?;
    used.reset()?;
    let checkpoint = used.checkpoint()?;
    if checkpoint != 0 {
        return Err(format!("checkpoint after reset is {checkpoint}, not 0"));
    }
    let digest = used.digest()?;
    if digest != empty {
        return Err(format!(
            "digest after reset is {}, an empty instance's is {}",
            hex::encode(digest),
            hex::encode(empty)
        ));
    }
    Ok(())
}

/// A small deterministic generator (xorshift), so a failing seed reproduces.
struct Rng(u64);

impl Rng {
    /// A generator from any seed (xorshift has a fixed point at 0).
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    fn below(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        if bound == 0 {
            0
        } else {
            (self.0 % bound as u64) as usize
        }
    }
}

/// One instance in its own scratch directory, removed on drop.
struct Instance {
    place: Place,
    projector: Option<Box<dyn Projector>>,
    /// The last checkpoint passed to a successful `apply`.
    committed: u64,
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

impl Instance {
    fn open(plugin: &dyn Plugin, scribes: &[Scribe]) -> Result<Instance, String> {
        let dir = std::env::temp_dir().join(format!(
            "quire-conformance-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|error| format!("{}: {error}", dir.display()))?;
        let stream = match plugin.scope() {
            Scope::Log => None,
            Scope::Stream => Some(scribes.first().map(|s| s.stream).unwrap_or_default()),
        };
        let payloads = Arc::new(MemoryPayloads::from_scribes(scribes));
        let place = Place::new(dir, stream).with_payloads(payloads);
        let projector = plugin
            .open(&place)
            .map_err(|error| format!("open: {error}"))?;
        Ok(Instance {
            place,
            projector: Some(projector),
            committed: 0,
        })
    }

    fn projector(&mut self) -> &mut Box<dyn Projector> {
        self.projector.as_mut().expect("instance is open")
    }

    /// `scribes` with local seqs in the order given, from 1, with gaps (a per-stream projector
    /// sees gaps; so does one after a parked scribe). The same list always gets the same seqs.
    fn numbered(&self, scribes: &[Scribe]) -> Vec<Scribe> {
        let mut gaps = Rng::new(scribes.len() as u64);
        let mut seq = 0;
        scribes
            .iter()
            .map(|scribe| {
                seq += 1 + gaps.below(3) as u64;
                Scribe {
                    local_seq: seq,
                    ..scribe.clone()
                }
            })
            .collect()
    }

    /// Numbers `scribes` and applies them in random batches; stops after `max_batches`.
    fn feed(
        &mut self,
        scribes: &[Scribe],
        rng: &mut Rng,
        max_batches: usize,
    ) -> Result<(), String> {
        let numbered = self.numbered(scribes);
        self.apply_in_batches(&numbered, rng, max_batches)
    }

    /// Applies numbered scribes in random batches, sometimes moving the checkpoint alone (an
    /// empty batch) into the gap before the next scribe; checks the checkpoint after each.
    fn apply_in_batches(
        &mut self,
        numbered: &[Scribe],
        rng: &mut Rng,
        max_batches: usize,
    ) -> Result<(), String> {
        let mut rest = numbered;
        let mut batches = 0;
        while !rest.is_empty() && batches < max_batches {
            let size = 1 + rng.below(rest.len());
            let (batch, tail) = rest.split_at(size);
            let mut checkpoint = batch.last().expect("non-empty").local_seq;
            self.apply_checked(batch, checkpoint)?;
            if let Some(next) = tail.first() {
                if next.local_seq > checkpoint + 1 && rng.below(2) == 0 {
                    checkpoint = next.local_seq - 1;
                    self.apply_checked(&[], checkpoint)?;
                }
            }
            rest = tail;
            batches += 1;
        }
        Ok(())
    }

    fn apply_checked(&mut self, batch: &[Scribe], checkpoint: u64) -> Result<(), String> {
        self.projector()
            .apply(batch, checkpoint)
            .map_err(|error| format!("apply: {error}"))?;
        self.committed = checkpoint;
        let reported = self.checkpoint()?;
        if reported != checkpoint {
            return Err(format!(
                "apply committed checkpoint {checkpoint}, but checkpoint() says {reported}"
            ));
        }
        Ok(())
    }

    fn crash_and_reopen(&mut self, plugin: &dyn Plugin) -> Result<(), String> {
        // A killed process runs no destructors: whatever `apply` committed is all there is.
        if let Some(projector) = self.projector.take() {
            std::mem::forget(projector);
        }
        self.projector = Some(
            plugin
                .open(&self.place)
                .map_err(|error| format!("reopen: {error}"))?,
        );
        Ok(())
    }

    fn checkpoint(&mut self) -> Result<u64, String> {
        self.projector()
            .checkpoint()
            .map_err(|error| format!("checkpoint: {error}"))
    }

    fn digest(&mut self) -> Result<[u8; 32], String> {
        self.projector()
            .digest()
            .map_err(|error| format!("digest: {error}"))
    }

    fn reset(&mut self) -> Result<(), String> {
        self.projector()
            .reset()
            .map_err(|error| format!("reset: {error}"))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.projector = None;
        let _ = std::fs::remove_dir_all(&self.place.dir);
    }
}
