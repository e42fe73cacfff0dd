//! The `latest` projector against the projection conformance suite, a deliberately
//! order-sensitive projector that the suite must reject, and unit tests of the state file.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use quire_example_latest::{
    digest_entries, read_state, sha256, Entry, Latest, POISON_KIND, POISON_PAYLOAD, STATE_FILE,
    TMP_FILE,
};
use quire_projection_api::testing::{check_all, scribe};
use quire_projection_api::{
    ApplyError, AuthorKey, Kind, Place, Plugin, ProjectionError, Projector, Scope, Scribe, StreamId,
};

/// Scribes of 3 authors and 3 kinds, with clocks from a range of 4 values so that ties of hlc
/// (broken by id) are common, and small random payloads.
fn scribes() -> impl Strategy<Value = Vec<Scribe>> {
    let one = (
        0u8..3,
        prop::sample::select(vec!["x.a", "x.b", "record.add"]),
        0u64..4,
        prop::sample::select(vec!["text/plain", "application/json"]),
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(author, kind, tick, content_type, payload)| {
            scribe(
                StreamId::from([9; 32]),
                AuthorKey([author + 1; 32]),
                (1_700_000_000_000 << 16) + tick,
                kind.parse().expect("a valid kind"),
                content_type,
                payload,
            )
        });
    prop::collection::vec(one, 0..40)
}

#[test]
fn latest_passes_the_conformance_suite() {
    check_all(&Latest::new(), scribes(), 64).unwrap();
}

// --- A projector the suite must reject ----------------------------------------------------------

/// Keeps the *last applied* scribe per `(author, kind)` instead of the newest by `(hlc, id)`: its
/// state depends on the arrival order. It commits properly (so crash and resume, rebuild and reset
/// all hold); only the order property fails.
#[derive(Debug)]
struct LastApplied;

impl Plugin for LastApplied {
    fn name(&self) -> &str {
        "last-applied"
    }

    fn fingerprint(&self) -> String {
        "last-applied v1".to_string()
    }

    fn scope(&self) -> Scope {
        Scope::Log
    }

    fn open(&self, place: &Place) -> Result<Box<dyn Projector>, ProjectionError> {
        let path = place.dir.join("state");
        let mut projector = LastAppliedProjector {
            path: path.clone(),
            checkpoint: 0,
            entries: BTreeMap::new(),
        };
        if let Ok(text) = fs::read_to_string(&path) {
            let mut lines = text.lines();
            projector.checkpoint = lines
                .next()
                .and_then(|line| line.parse().ok())
                .ok_or_else(|| ProjectionError::new("bad checkpoint line"))?;
            for line in lines {
                let fields: Vec<&str> = line.split(' ').collect();
                let [author, kind, hlc, id, payload_len, content_type] = fields[..] else {
                    return Err(ProjectionError::new(format!("bad line {line:?}")));
                };
                let bad = |_| ProjectionError::new(format!("bad line {line:?}"));
                let entry = Entry {
                    author: author.parse().map_err(|_| bad(()))?,
                    kind: kind.parse().map_err(|_| bad(()))?,
                    hlc: hlc.parse().map_err(|_| bad(()))?,
                    id: id.parse().map_err(|_| bad(()))?,
                    payload_len: payload_len.parse().map_err(|_| bad(()))?,
                    content_type: content_type.to_string(),
                };
                projector
                    .entries
                    .insert((entry.author, entry.kind.to_string()), entry);
            }
        }
        Ok(Box::new(projector))
    }
}

#[derive(Debug)]
struct LastAppliedProjector {
    path: PathBuf,
    checkpoint: u64,
    entries: BTreeMap<(AuthorKey, String), Entry>,
}

impl LastAppliedProjector {
    fn save(&self) -> Result<(), String> {
        let mut text = format!("{}\n", self.checkpoint);
        for entry in self.entries.values() {
            text.push_str(&format!(
                "{} {} {} {} {} {}\n",
                entry.author,
                entry.kind,
                entry.hlc,
                entry.id,
                entry.payload_len,
                entry.content_type
            ));
        }
        let tmp = self.path.with_extension("tmp");
        fs::write(&tmp, text).map_err(|error| error.to_string())?;
        fs::rename(&tmp, &self.path).map_err(|error| error.to_string())
    }
}

impl Projector for LastAppliedProjector {
    fn apply(&mut self, batch: &[Scribe], checkpoint: u64) -> Result<(), ApplyError> {
        for scribe in batch {
            // The bug on purpose: whatever arrives last wins.
            self.entries
                .insert((scribe.author, scribe.kind.to_string()), Entry::of(scribe));
        }
        self.checkpoint = checkpoint;
        self.save().map_err(ApplyError::Storage)
    }

    fn checkpoint(&self) -> Result<u64, ProjectionError> {
        Ok(self.checkpoint)
    }

    fn reset(&mut self) -> Result<(), ProjectionError> {
        self.entries.clear();
        self.checkpoint = 0;
        self.save().map_err(ProjectionError)
    }

    fn digest(&self) -> Result<[u8; 32], ProjectionError> {
        Ok(digest_entries(self.entries.values()))
    }
}

#[test]
fn the_suite_rejects_an_order_sensitive_projector() {
    let error = check_all(&LastApplied, scribes(), 64)
        .expect_err("a last-applied-wins projector must fail the conformance suite");
    assert!(
        error.contains("last-applied failed the conformance suite"),
        "{error}"
    );
    assert!(
        error.contains("order or duplicates changed the digest"),
        "the failure should name the order property: {error}"
    );
}

// --- Unit tests ---------------------------------------------------------------------------------

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "quire-example-latest-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn place(&self) -> Place {
        Place::new(self.0.clone(), None)
    }

    fn open(&self) -> Box<dyn Projector> {
        Latest::new().open(&self.place()).unwrap()
    }

    fn state_bytes(&self) -> Vec<u8> {
        fs::read(self.0.join(STATE_FILE)).unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn note(author: u8, hlc: u64, kind: &str, payload: &[u8], seq: u64) -> Scribe {
    let mut scribe = scribe(
        StreamId::from([9; 32]),
        AuthorKey([author; 32]),
        hlc,
        kind.parse().unwrap(),
        "text/plain",
        payload.to_vec(),
    );
    scribe.local_seq = seq;
    scribe
}

#[test]
fn the_plugin_describes_itself() {
    let latest = Latest::default();
    assert_eq!(latest.name(), "latest");
    assert_eq!(latest.fingerprint(), "latest v1");
    assert_eq!(latest.scope(), Scope::Log);
}

#[test]
fn newest_by_hlc_then_id_wins_in_any_order() {
    let old = note(1, 10, "x.a", b"old", 1);
    let tie_a = note(1, 20, "x.a", b"tie one", 2);
    let tie_b = note(1, 20, "x.a", b"tie two", 3);
    let other_kind = note(1, 5, "x.b", b"other kind", 4);
    let other_author = note(2, 1, "x.a", b"other author", 5);
    let winner = if tie_a.id > tie_b.id { &tie_a } else { &tie_b };

    let all = [&old, &tie_a, &tie_b, &other_kind, &other_author];
    let mut digests = Vec::new();
    for order in [[0, 1, 2, 3, 4], [2, 1, 0, 4, 3], [4, 3, 1, 2, 0]] {
        let dir = TempDir::new();
        let mut projector = dir.open();
        for (seq, index) in order.into_iter().enumerate() {
            let mut scribe = all[index].clone();
            scribe.local_seq = seq as u64 + 1;
            projector.apply(&[scribe], seq as u64 + 1).unwrap();
        }
        let (checkpoint, entries) = read_state(dir.path()).unwrap();
        assert_eq!(checkpoint, 5);
        assert_eq!(entries.len(), 3);
        let x_a = entries
            .iter()
            .find(|entry| entry.author == AuthorKey([1; 32]) && entry.kind.as_str() == "x.a")
            .unwrap();
        assert_eq!(x_a.id, winner.id);
        assert_eq!(x_a.hlc, 20);
        assert_eq!(x_a.payload_len, 7);
        assert_eq!(x_a.content_type, "text/plain");
        digests.push(projector.digest().unwrap());
    }
    assert!(digests.windows(2).all(|pair| pair[0] == pair[1]));
}

#[test]
fn reopening_after_apply_gives_the_same_checkpoint_and_digest() {
    let dir = TempDir::new();
    let mut projector = dir.open();
    projector
        .apply(
            &[note(1, 10, "x.a", b"one", 1), note(2, 11, "x.b", b"two", 2)],
            2,
        )
        .unwrap();
    projector
        .apply(&[note(1, 12, "x.a", b"three", 3)], 5)
        .unwrap();
    let checkpoint = projector.checkpoint().unwrap();
    let digest = projector.digest().unwrap();
    assert_eq!(checkpoint, 5);
    drop(projector);

    let reopened = dir.open();
    assert_eq!(reopened.checkpoint().unwrap(), checkpoint);
    assert_eq!(reopened.digest().unwrap(), digest);
    let (file_checkpoint, entries) = read_state(dir.path()).unwrap();
    assert_eq!(file_checkpoint, 5);
    assert_eq!(digest_entries(entries.iter()), digest);
    assert!(!dir.path().join(TMP_FILE).exists());
}

#[test]
fn an_empty_batch_moves_the_checkpoint_alone() {
    let dir = TempDir::new();
    let mut projector = dir.open();
    projector
        .apply(&[note(1, 10, "x.a", b"one", 1)], 1)
        .unwrap();
    let digest = projector.digest().unwrap();
    projector.apply(&[], 9).unwrap();
    assert_eq!(projector.checkpoint().unwrap(), 9);
    assert_eq!(projector.digest().unwrap(), digest);
    assert_eq!(read_state(dir.path()).unwrap().0, 9);
}

#[test]
fn the_poison_scribe_is_refused_and_nothing_of_its_batch_is_committed() {
    let dir = TempDir::new();
    let mut projector = dir.open();
    projector
        .apply(&[note(1, 10, "x.a", b"first", 1)], 1)
        .unwrap();
    let before = dir.state_bytes();
    let digest = projector.digest().unwrap();

    let batch = [
        note(1, 20, "x.a", b"newer", 2),
        note(2, 20, "x.b", b"fine", 3),
        note(3, 20, POISON_KIND, POISON_PAYLOAD, 4),
        note(3, 21, "x.a", b"after", 5),
    ];
    match projector.apply(&batch, 5) {
        Err(ApplyError::Scribe { index, reason }) => {
            assert_eq!(index, 2);
            assert!(reason.contains("poison"), "{reason}");
        }
        other => panic!("expected ApplyError::Scribe, got {other:?}"),
    }
    assert_eq!(dir.state_bytes(), before, "the state file must not change");
    assert_eq!(projector.checkpoint().unwrap(), 1);
    assert_eq!(projector.digest().unwrap(), digest);
    assert!(!dir.path().join(TMP_FILE).exists());

    // The runner then applies the scribes before it, parks it, and goes on after it.
    projector.apply(&batch[..2], 3).unwrap();
    projector.apply(&batch[3..], 5).unwrap();
    assert_eq!(projector.checkpoint().unwrap(), 5);
    assert_eq!(read_state(dir.path()).unwrap().1.len(), 3);

    // Only the exact payload is poison.
    projector
        .apply(&[note(3, 22, POISON_KIND, b"poison!", 6)], 6)
        .unwrap();
    let entries = read_state(dir.path()).unwrap().1;
    assert!(entries
        .iter()
        .any(|entry| entry.kind.as_str() == POISON_KIND));
}

#[test]
fn reset_empties_the_state() {
    let dir = TempDir::new();
    let empty = dir.open().digest().unwrap();
    let mut projector = dir.open();
    projector
        .apply(
            &[note(1, 10, "x.a", b"one", 1), note(2, 10, "x.a", b"two", 2)],
            2,
        )
        .unwrap();
    assert_ne!(projector.digest().unwrap(), empty);
    projector.reset().unwrap();
    assert_eq!(projector.checkpoint().unwrap(), 0);
    assert_eq!(projector.digest().unwrap(), empty);
    assert_eq!(read_state(dir.path()).unwrap(), (0, Vec::new()));
    drop(projector);
    let reopened = dir.open();
    assert_eq!(reopened.checkpoint().unwrap(), 0);
    assert_eq!(reopened.digest().unwrap(), empty);
}

#[test]
fn a_leftover_tmp_file_is_ignored_and_removed() {
    let dir = TempDir::new();
    let mut projector = dir.open();
    projector
        .apply(&[note(1, 10, "x.a", b"one", 1)], 1)
        .unwrap();
    let digest = projector.digest().unwrap();
    drop(projector);
    // What a crash between writing state.tmp and renaming it leaves behind.
    fs::write(dir.path().join(TMP_FILE), b"half a state").unwrap();
    assert_eq!(read_state(dir.path()).unwrap().0, 1);
    let reopened = dir.open();
    assert_eq!(reopened.checkpoint().unwrap(), 1);
    assert_eq!(reopened.digest().unwrap(), digest);
    assert!(!dir.path().join(TMP_FILE).exists());
}

#[test]
fn a_corrupt_state_file_is_a_clear_error() {
    let dir = TempDir::new();
    let mut projector = dir.open();
    projector
        .apply(&[note(1, 10, "x.a", b"one", 1)], 1)
        .unwrap();
    drop(projector);
    let good = String::from_utf8(dir.state_bytes()).unwrap();
    fs::write(
        dir.path().join(STATE_FILE),
        good.replace("checkpoint 1", "checkpoint one"),
    )
    .unwrap();
    let error = match Latest::new().open(&dir.place()) {
        Err(error) => error.to_string(),
        Ok(_) => panic!("a corrupt state file must not open"),
    };
    assert!(error.contains("corrupt state file"), "{error}");
    assert!(error.contains("line 2"), "{error}");
    assert!(error.contains(STATE_FILE), "{error}");
    assert!(read_state(dir.path()).is_err());

    // A truncated file (no `end`) is corrupt too.
    fs::write(dir.path().join(STATE_FILE), &good[..good.len() - 4]).unwrap();
    assert!(Latest::new().open(&dir.place()).is_err());
}

#[test]
fn the_state_file_is_the_documented_text() {
    let dir = TempDir::new();
    let mut projector = dir.open();
    let one = note(1, 10, "x.a", b"one", 1);
    projector.apply(std::slice::from_ref(&one), 1).unwrap();
    let text = String::from_utf8(dir.state_bytes()).unwrap();
    assert_eq!(
        text,
        format!(
            "quire-example-latest state v1\ncheckpoint 1\nentries 1\n{} x.a 10 {} 3 text/plain\nend\n",
            AuthorKey([1; 32]).to_hex(),
            one.id.to_hex()
        )
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The crate's own SHA-256 agrees with the `sha2` crate, which `testing::scribe` uses to make
    /// ids, for inputs across the one- and two-block padding boundaries.
    #[test]
    fn sha256_agrees_with_sha2(payload in prop::collection::vec(any::<u8>(), 0..300), hlc: u64) {
        let made = scribe(StreamId::from([3; 32]), AuthorKey([4; 32]), hlc, Kind::KvSet, "a/b", payload.clone());
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&[3; 32]);
        bytes.extend_from_slice(&[4; 32]);
        bytes.extend_from_slice(&hlc.to_be_bytes());
        bytes.extend_from_slice(b"kv.set\0a/b\0");
        bytes.extend_from_slice(&payload);
        prop_assert_eq!(sha256(&bytes), made.id.0);
    }
}
