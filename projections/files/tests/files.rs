//! The file-tree projector on a real filesystem: newest wins per path, tombstones, hidden paths,
//! the tree rewritten after a crash between commit and tree update (from the payload source),
//! an index that holds no bytes, payloads missing, redacted or wrong in the source, an index of
//! the old format, and the conformance suite.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use quire_projection_api::files::FileChange;
use quire_projection_api::testing::{self, scribe, MemoryPayloads};
use quire_projection_api::{
    ApplyError, AuthorKey, Payloads, Place, Plugin, ProjectionError, Projector, Scribe, ScribeId,
};
use quire_projection_files::{tree_digest, Files, Reader, INDEX_FILE, TREE_DIR};

const STREAM: ScribeId = ScribeId([9; 32]);

fn put(author: u8, hlc: u64, path: &str, data: &str) -> Scribe {
    let (kind, payload) = FileChange::Put {
        path: path.into(),
        content_type: "text/plain".into(),
        data: data.as_bytes().to_vec(),
    }
    .encode();
    scribe(
        STREAM,
        AuthorKey([author; 32]),
        hlc,
        kind,
        "application/vnd.quire.file+protobuf",
        payload,
    )
}

fn delete(author: u8, hlc: u64, path: &str) -> Scribe {
    let (kind, payload) = FileChange::Delete { path: path.into() }.encode();
    scribe(
        STREAM,
        AuthorKey([author; 32]),
        hlc,
        kind,
        "application/vnd.quire.file+protobuf",
        payload,
    )
}

struct Copy {
    dir: tempfile::TempDir,
    projector: Box<dyn Projector>,
    seq: u64,
    /// What the node's payload store would hold: every scribe applied.
    payloads: Arc<MemoryPayloads>,
}

/// The place of a copy in `dir` reading payloads from `payloads`.
fn place(dir: &Path, payloads: Arc<dyn Payloads>) -> Place {
    Place::new(dir, Some(STREAM)).with_payloads(payloads)
}

impl Copy {
    fn new() -> Copy {
        let dir = tempfile::tempdir().unwrap();
        let payloads = Arc::new(MemoryPayloads::default());
        let projector = Files.open(&place(dir.path(), payloads.clone())).unwrap();
        Copy {
            dir,
            projector,
            seq: 0,
            payloads,
        }
    }

    /// Opens the copy's directory again (as after a crash), reading from `payloads`.
    fn reopen_with(
        &self,
        payloads: Arc<dyn Payloads>,
    ) -> Result<Box<dyn Projector>, ProjectionError> {
        Files.open(&place(self.dir.path(), payloads))
    }

    fn reopen(&self) -> Box<dyn Projector> {
        self.reopen_with(self.payloads.clone()).unwrap()
    }

    fn apply(&mut self, scribes: &[Scribe]) {
        self.try_apply(scribes).unwrap();
    }

    fn try_apply(&mut self, scribes: &[Scribe]) -> Result<(), ApplyError> {
        for scribe in scribes {
            self.payloads.insert(scribe);
        }
        let batch: Vec<Scribe> = scribes
            .iter()
            .map(|s| {
                self.seq += 1;
                Scribe {
                    local_seq: self.seq,
                    ..s.clone()
                }
            })
            .collect();
        self.projector.apply(&batch, self.seq)
    }

    fn file(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join(TREE_DIR).join(path)).ok()
    }

    fn tree(&self) -> [u8; 32] {
        tree_digest(&self.dir.path().join(TREE_DIR)).unwrap()
    }
}

#[test]
fn newest_wins_per_path_and_a_delete_is_a_tombstone() {
    let mut copy = Copy::new();
    copy.apply(&[
        put(1, 20, "site/index.html", "new"),
        put(2, 10, "site/index.html", "old"),
    ]);
    assert_eq!(copy.file("site/index.html").as_deref(), Some("new"));
    // An older put arriving later loses.
    copy.apply(&[put(3, 15, "site/index.html", "older")]);
    assert_eq!(copy.file("site/index.html").as_deref(), Some("new"));
    // A newer delete wins; an older put after it does not bring the file back.
    copy.apply(&[delete(1, 30, "site/index.html")]);
    assert_eq!(copy.file("site/index.html"), None);
    assert!(
        !copy.dir.path().join(TREE_DIR).join("site").exists(),
        "empty directories go"
    );
    copy.apply(&[put(2, 25, "site/index.html", "zombie")]);
    assert_eq!(copy.file("site/index.html"), None);
    copy.apply(&[put(2, 40, "site/index.html", "back")]);
    assert_eq!(copy.file("site/index.html").as_deref(), Some("back"));
    let reader = Reader::open(copy.dir.path()).unwrap();
    let entry = reader.get("site/index.html").unwrap().unwrap();
    assert_eq!(
        (entry.size, entry.content_type.as_str(), entry.hlc),
        (4, "text/plain", 40)
    );
    assert_eq!(
        reader
            .get_with_data("site/index.html", &*copy.payloads)
            .unwrap()
            .unwrap(),
        (entry, b"back".to_vec())
    );
    assert_eq!(reader.list("site/", 10).unwrap().len(), 1);
}

#[test]
fn a_live_file_hides_the_paths_below_it_until_it_is_deleted() {
    let mut copy = Copy::new();
    copy.apply(&[
        put(1, 10, "a/b.txt", "below"),
        put(1, 11, "a/c/d.txt", "deeper"),
    ]);
    copy.apply(&[put(2, 12, "a", "a file")]);
    assert_eq!(copy.file("a").as_deref(), Some("a file"));
    // A put under a live file is indexed but hidden.
    copy.apply(&[put(1, 13, "a/e.txt", "hidden")]);
    assert_eq!(copy.file("a").as_deref(), Some("a file"));
    copy.apply(&[delete(2, 14, "a")]);
    assert_eq!(copy.file("a/b.txt").as_deref(), Some("below"));
    assert_eq!(copy.file("a/c/d.txt").as_deref(), Some("deeper"));
    assert_eq!(copy.file("a/e.txt").as_deref(), Some("hidden"));
    // Same scribes in another order: the same tree.
    let mut other = Copy::new();
    other.apply(&[
        delete(2, 14, "a"),
        put(1, 13, "a/e.txt", "hidden"),
        put(2, 12, "a", "a file"),
    ]);
    other.apply(&[
        put(1, 11, "a/c/d.txt", "deeper"),
        put(1, 10, "a/b.txt", "below"),
    ]);
    assert_eq!(other.tree(), copy.tree());
    assert_eq!(
        other.projector.digest().unwrap(),
        copy.projector.digest().unwrap()
    );
}

#[test]
fn a_crash_between_commit_and_tree_update_is_repaired_on_open() {
    let mut copy = Copy::new();
    copy.apply(&[put(1, 10, "x.txt", "one"), put(1, 11, "y/z.txt", "two")]);
    let good = copy.tree();
    // As if the process died after committing the index but before writing the tree.
    std::fs::remove_file(copy.dir.path().join(TREE_DIR).join("x.txt")).unwrap();
    std::fs::write(copy.dir.path().join(TREE_DIR).join("stray.txt"), "junk").unwrap();
    mark_tree_behind(copy.dir.path());
    drop(copy.reopen());
    assert_eq!(copy.tree(), good);
}

/// Pins the conformance failure `apply: creating …/tree/a/b: File exists`: the tree shows the file
/// `a/b` (hiding `a/b/c.txt`), then one batch deletes both `a` (a path never written) and `a/b`.
/// The tree is synced path by path in path order, so the sync of `a` uncovers `a/b/c.txt` (the
/// committed index has `a/b` deleted) while the tree still holds the file `a/b`, whose own sync
/// comes after; the writer must replace that stale file with the directory.
#[test]
fn a_batch_deleting_a_file_and_a_path_above_it_uncovers_the_path_below() {
    let mut copy = Copy::new();
    copy.apply(&[put(1, 10, "a/b", "file"), put(1, 11, "a/b/c.txt", "below")]);
    assert_eq!(copy.file("a/b").as_deref(), Some("file"));
    copy.apply(&[delete(1, 12, "a"), delete(1, 13, "a/b")]);
    assert_eq!(copy.file("a/b/c.txt").as_deref(), Some("below"));
    assert_tree_is_the_index(&copy);
    // The other way round: a directory `a/b/…` replaced by the file `a/b`, and back again.
    copy.apply(&[put(1, 14, "a/b", "again"), delete(1, 15, "a")]);
    assert_eq!(copy.file("a/b").as_deref(), Some("again"));
    assert_tree_is_the_index(&copy);
    // The same scribes in one batch on a new copy, and after a crash between commit and tree
    // update: the same tree.
    let mut other = Copy::new();
    other.apply(&[
        delete(1, 15, "a"),
        put(1, 14, "a/b", "again"),
        delete(1, 13, "a/b"),
        delete(1, 12, "a"),
        put(1, 11, "a/b/c.txt", "below"),
        put(1, 10, "a/b", "file"),
    ]);
    assert_eq!(other.tree(), copy.tree());
    mark_tree_behind(copy.dir.path());
    drop(copy.reopen());
    assert_eq!(other.tree(), copy.tree());
    assert_tree_is_the_index(&copy);
}

/// Sets `tree_synced` to 0, as if the process died between a commit and the tree's update.
fn mark_tree_behind(dir: &Path) {
    let index = rusqlite::Connection::open(dir.join("index.sqlite3")).unwrap();
    index
        .execute("UPDATE meta SET value = 0 WHERE name = 'tree_synced'", [])
        .unwrap();
}

/// The tree as it is on disk: every file's relative path and bytes, and every directory that
/// holds nothing.
fn tree_on_disk(root: &Path) -> (BTreeMap<String, Vec<u8>>, Vec<String>) {
    fn walk(
        root: &Path,
        dir: &Path,
        files: &mut BTreeMap<String, Vec<u8>>,
        empty: &mut Vec<String>,
    ) {
        let mut any = false;
        for item in std::fs::read_dir(dir).unwrap() {
            any = true;
            let path = item.unwrap().path();
            let relative = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if path.is_dir() {
                walk(root, &path, files, empty);
            } else {
                files.insert(relative, std::fs::read(&path).unwrap());
            }
        }
        if !any && dir != root {
            empty.push(
                dir.strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    let (mut files, mut empty) = (BTreeMap::new(), Vec::new());
    walk(root, root, &mut files, &mut empty);
    (files, empty)
}

/// The tree is a function of the index: exactly the live paths with no live path above them,
/// with their bytes, and no empty directories.
fn assert_tree_is_the_index(copy: &Copy) {
    let dir = copy.dir.path();
    let reader = Reader::open(dir).unwrap();
    let live = reader.list("", usize::MAX).unwrap();
    let is_live = |path: &str| live.iter().any(|e| e.path == path);
    let expected: BTreeMap<String, Vec<u8>> = live
        .iter()
        .filter(|e| {
            !e.path
                .char_indices()
                .any(|(at, c)| c == '/' && is_live(&e.path[..at]))
        })
        .map(|e| {
            let (_, data) = reader
                .get_with_data(&e.path, &*copy.payloads)
                .unwrap()
                .unwrap();
            (e.path.clone(), data)
        })
        .collect();
    let (files, empty) = tree_on_disk(&dir.join(TREE_DIR));
    assert_eq!(
        files, expected,
        "the tree is not the index's live, visible paths"
    );
    assert!(
        empty.is_empty(),
        "empty directories left in the tree: {empty:?}"
    );
}

#[test]
fn a_bad_payload_is_the_scribes_problem() {
    let mut copy = Copy::new();
    let mut bad = put(1, 10, "ok", "x");
    bad.payload = vec![0xff, 0xff];
    bad.local_seq = 1;
    let refused = copy.projector.apply(&[bad], 1).unwrap_err();
    assert!(refused.to_string().contains("not a FilePut"), "{refused}");
}

/// Bytes that do not compress: an xorshift stream from `seed`.
fn noise(seed: u64, len: usize) -> String {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'!' + (state % 90) as u8)
        })
        .collect()
}

/// Bytes of the index database with its write-ahead log.
fn index_bytes(dir: &Path) -> u64 {
    ["", "-wal"]
        .iter()
        .filter_map(|suffix| std::fs::metadata(dir.join(format!("{INDEX_FILE}{suffix}"))).ok())
        .map(|found| found.len())
        .sum()
}

fn tables(dir: &Path) -> Vec<String> {
    let index = rusqlite::Connection::open(dir.join(INDEX_FILE)).unwrap();
    let mut statement = index
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap();
    let names = statement
        .query_map([], |row| row.get::<_, String>(0))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    names
}

#[test]
fn the_index_keeps_no_bytes_of_the_files() {
    let mut copy = Copy::new();
    let site: Vec<Scribe> = (0..8)
        .map(|n| put(1, 10 + n, &format!("big/{n}.bin"), &noise(n, 256 << 10)))
        .collect();
    copy.apply(&site);
    // Replaced and deleted versions leave nothing behind either.
    copy.apply(&[
        put(1, 30, "big/0.bin", &noise(99, 256 << 10)),
        delete(1, 31, "big/1.bin"),
    ]);
    assert_eq!(tables(copy.dir.path()), ["files", "meta"]);
    let index = index_bytes(copy.dir.path());
    assert!(
        index < 64 << 10,
        "the index holds {index} bytes for 2 MiB of files"
    );
    assert_eq!(copy.file("big/0.bin").unwrap(), noise(99, 256 << 10));
    assert_eq!(copy.file("big/1.bin"), None);
}

#[test]
fn a_tree_lost_after_a_crash_is_rewritten_from_the_payload_store() {
    let mut copy = Copy::new();
    copy.apply(&[put(1, 10, "a.txt", "one"), put(1, 11, "d/b.txt", "two")]);
    let good = copy.tree();
    std::fs::remove_dir_all(copy.dir.path().join(TREE_DIR)).unwrap();
    std::fs::create_dir(copy.dir.path().join(TREE_DIR)).unwrap();
    mark_tree_behind(copy.dir.path());
    // A source holding only what the node stores (not the scribes of any batch in memory).
    let store = Arc::new(MemoryPayloads::from_scribes(&[
        put(1, 10, "a.txt", "one"),
        put(1, 11, "d/b.txt", "two"),
    ]));
    drop(copy.reopen_with(store).unwrap());
    assert_eq!(copy.tree(), good);
}

#[test]
fn a_payload_missing_from_the_store_is_an_error_naming_the_path_and_scribe() {
    let mut copy = Copy::new();
    let hidden = put(1, 10, "a/b.txt", "below");
    copy.apply(&[hidden.clone(), put(1, 11, "a", "above")]);
    // The store lost `a/b.txt`'s payload (a damaged store): deleting `a` uncovers it.
    copy.payloads.forget(&hidden.id);
    let refused = copy.try_apply(&[delete(1, 12, "a")]).unwrap_err();
    let ApplyError::Storage(message) = &refused else {
        panic!("not a storage error: {refused:?}");
    };
    assert!(
        message.contains("a/b.txt") && message.contains(&hidden.id.to_hex()),
        "{message}"
    );
    assert_eq!(copy.file("a/b.txt"), None, "nothing written for it");
    // Reopening (the tree is behind the index) says the same, and writes no wrong file.
    let refused = copy
        .reopen_with(copy.payloads.clone())
        .err()
        .expect("refused");
    assert!(refused.0.contains(&hidden.id.to_hex()), "{refused}");
    assert_eq!(copy.file("a/b.txt"), None);
    // Once the store has it again, the next open brings the tree up to the index.
    copy.payloads.insert(&hidden);
    drop(copy.reopen());
    assert_eq!(copy.file("a/b.txt").as_deref(), Some("below"));
    assert_tree_is_the_index(&copy);
}

#[test]
fn a_redacted_version_is_neither_written_nor_served() {
    let mut copy = Copy::new();
    let secret = put(1, 10, "a/secret.txt", "redacted bytes");
    copy.apply(&[
        secret.clone(),
        put(1, 11, "a", "above"),
        put(1, 12, "kept.txt", "kept"),
    ]);
    copy.payloads.redact(&secret.id);
    // Uncovered after its redaction (before the runner's rebuild swaps in a copy without it).
    copy.apply(&[delete(1, 13, "a")]);
    assert_eq!(copy.file("a/secret.txt"), None);
    let reader = Reader::open(copy.dir.path()).unwrap();
    assert!(
        reader.get("a/secret.txt").unwrap().is_some(),
        "still indexed"
    );
    assert_eq!(
        reader
            .get_with_data("a/secret.txt", &*copy.payloads)
            .unwrap(),
        None
    );
    // A tree rewritten after a crash leaves it out too (and keeps the rest).
    std::fs::create_dir_all(copy.dir.path().join(TREE_DIR).join("a")).unwrap();
    std::fs::write(
        copy.dir.path().join(TREE_DIR).join("a/secret.txt"),
        "redacted bytes",
    )
    .unwrap();
    mark_tree_behind(copy.dir.path());
    drop(copy.reopen());
    assert_eq!(copy.file("a/secret.txt"), None);
    assert_eq!(copy.file("kept.txt").as_deref(), Some("kept"));
}

/// A store that answers a well-formed put of the right path with the wrong bytes.
struct Wrong;

impl Payloads for Wrong {
    fn payload(&self, _id: &ScribeId) -> Result<Option<Vec<u8>>, ProjectionError> {
        Ok(Some(
            FileChange::Put {
                path: "x.txt".into(),
                content_type: "text/plain".into(),
                data: b"not the indexed bytes".to_vec(),
            }
            .encode()
            .1,
        ))
    }
}

#[test]
fn bytes_that_do_not_match_the_index_are_refused_and_not_served() {
    let mut copy = Copy::new();
    let file = put(1, 10, "x.txt", "the indexed bytes");
    copy.apply(std::slice::from_ref(&file));
    std::fs::remove_file(copy.dir.path().join(TREE_DIR).join("x.txt")).unwrap();
    mark_tree_behind(copy.dir.path());
    let refused = copy.reopen_with(Arc::new(Wrong)).err().expect("refused");
    assert!(
        refused.0.contains("x.txt") && refused.0.contains("SHA-256"),
        "{refused}"
    );
    assert_eq!(copy.file("x.txt"), None, "no wrong file written");
    let reader = Reader::open(copy.dir.path()).unwrap();
    let refused = reader.get_with_data("x.txt", &Wrong).unwrap_err();
    assert!(refused.0.contains(&file.id.to_hex()), "{refused}");
}

#[test]
fn an_index_of_the_old_format_opens_with_its_blobs_dropped() {
    let mut copy = Copy::new();
    copy.apply(&[put(1, 10, "x.txt", "one"), put(1, 11, "y.txt", "two")]);
    let digest = copy.projector.digest().unwrap();
    drop(std::mem::replace(
        &mut copy.projector,
        Box::new(NoProjector),
    ));
    {
        // What the old version kept: every live file's bytes, by SHA-256.
        let index = rusqlite::Connection::open(copy.dir.path().join(INDEX_FILE)).unwrap();
        index
            .execute_batch(
                "CREATE TABLE blobs (sha256 BLOB PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
                 PRAGMA wal_checkpoint(TRUNCATE);",
            )
            .unwrap();
        index
            .execute(
                "INSERT INTO blobs (sha256, data) VALUES (?1, ?2)",
                rusqlite::params![vec![1u8; 32], noise(1, 1 << 20).into_bytes()],
            )
            .unwrap();
        index
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
    }
    assert!(index_bytes(copy.dir.path()) > 1 << 20);
    let reopened = copy.reopen();
    assert_eq!(tables(copy.dir.path()), ["files", "meta"]);
    assert_eq!(reopened.digest().unwrap(), digest, "the state is the same");
    assert!(
        index_bytes(copy.dir.path()) < 256 << 10,
        "the space came back: {} bytes",
        index_bytes(copy.dir.path())
    );
    assert_eq!(copy.file("x.txt").as_deref(), Some("one"));
}

/// A stand-in while a copy's projector is closed.
struct NoProjector;

impl Projector for NoProjector {
    fn apply(&mut self, _: &[Scribe], _: u64) -> Result<(), ApplyError> {
        unreachable!()
    }
    fn checkpoint(&self) -> Result<u64, ProjectionError> {
        unreachable!()
    }
    fn reset(&mut self) -> Result<(), ProjectionError> {
        unreachable!()
    }
    fn digest(&self) -> Result<[u8; 32], ProjectionError> {
        unreachable!()
    }
}

fn scribes() -> impl Strategy<Value = Vec<Scribe>> {
    let paths = ["index.html", "a", "a/b", "a/b/c.txt", "d/e.css"];
    let op = (0..paths.len(), 1..30u64, 1..4u8, any::<bool>(), 0..3u8);
    proptest::collection::vec(op, 0..20).prop_map(move |ops| {
        ops.into_iter()
            .map(|(p, hlc, author, is_delete, body)| {
                if is_delete {
                    delete(author, hlc, paths[p])
                } else {
                    put(author, hlc, paths[p], &format!("body {body}"))
                }
            })
            .collect()
    })
}

/// Scribes on a chain of paths where each is a file or a directory of the next (`a`, `a/b`,
/// `a/b/c`, …), cut into batches anywhere: a file replaced by a directory at the same path and
/// the reverse, in any order and grouping.
fn nested_batches() -> impl Strategy<Value = Vec<Vec<Scribe>>> {
    let paths = ["a", "a/b", "a/b/c", "a/b/c/d", "a/e"];
    let op = (
        0..paths.len(),
        1..40u64,
        1..4u8,
        any::<bool>(),
        0..3u8,
        0..3u8,
    );
    proptest::collection::vec(op, 0..40).prop_map(move |ops| {
        let mut batches: Vec<Vec<Scribe>> = vec![Vec::new()];
        for (p, hlc, author, is_delete, body, cut) in ops {
            if cut == 0 {
                batches.push(Vec::new());
            }
            let scribe = if is_delete {
                delete(author, hlc, paths[p])
            } else {
                put(author, hlc, paths[p], &format!("{} {body}", paths[p]))
            };
            batches.last_mut().expect("one batch at least").push(scribe);
        }
        batches
    })
}

#[test]
fn conformance() {
    testing::check_all(&Files, scribes(), 48).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]
    /// The directory trees, not only the index digests, are equal for any order.
    #[test]
    fn trees_are_equal_in_any_order(scribes in scribes(), seed in any::<u64>()) {
        let mut shuffled = scribes.clone();
        let mut state = seed | 1;
        for i in (1..shuffled.len()).rev() {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17;
            shuffled.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let mut one = Copy::new();
        for s in &scribes { one.apply(std::slice::from_ref(s)); }
        let mut two = Copy::new();
        two.apply(&shuffled);
        prop_assert_eq!(one.tree(), two.tree());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]
    /// After every batch, and after a crash between a commit and the tree's update, the tree on
    /// disk is exactly the function of the index (live paths with no live file above them).
    #[test]
    fn the_tree_is_a_function_of_the_index_after_every_batch(batches in nested_batches()) {
        let mut copy = Copy::new();
        for batch in &batches {
            copy.apply(batch);
            assert_tree_is_the_index(&copy);
        }
        mark_tree_behind(copy.dir.path());
        drop(copy.reopen());
        assert_tree_is_the_index(&copy);
    }
}
