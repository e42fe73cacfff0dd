//! The file-tree projector: the newest version of every path of a stream, as a real directory
//! tree that any static server could serve, with an index of content type, size, SHA-256 and
//! scribe id per path.
//!
//! # Scribes
//! `file.put` / `file.delete` ([`quire_projection_api::files`]). Per path, the newest scribe by
//! `(hlc, id)` wins, a delete (tombstone) included, so equal sets of scribes give equal trees on
//! every node, in any arrival order. A payload that does not decode, or a bad path, is the
//! scribe's problem ([`ApplyError::Scribe`]; nodes refuse those on append already).
//!
//! # The copy's directory
//! - `index.sqlite3`: `files` (one row per path ever written: the winner's scribe id and clock,
//!   live or deleted, content type, size and SHA-256 of its bytes): the state, committed with the
//!   checkpoint in one transaction per batch. It holds no file's bytes: those are in the node's
//!   payload store (the winning scribe's payload, read back by id through
//!   [`quire_projection_api::Place::payloads`]) and in the tree. So a published site takes about
//!   twice its size on a node's disk (store and tree), not three times. An index made by an
//!   older version still holds a `blobs` table of bytes: it is dropped (and the file vacuumed)
//!   when the copy is opened; nothing else changed, so the fingerprint and the digest did not.
//! - `tree/`: the live files as a real directory tree, written after each commit (each file to
//!   a temporary file in `tmp/`, then renamed into place) from the batch's own scribes, or, for
//!   paths a delete uncovers, from the payload store. The index records how far the tree has
//!   been brought (`tree_synced`); if a crash came between a commit and the tree's update,
//!   opening the copy (or the next batch) rewrites the tree from the index and the payload store.
//!
//! Bytes read back from the payload store are checked against the index's SHA-256 before they
//! are written or served. A live entry whose payload the store no longer has is an error naming
//! the path and scribe (a damaged store); nothing is written for it. A live entry whose payload
//! was redacted is left out of the tree and not served: the runner is rebuilding the copy without
//! it, and until the rebuild is swapped in the path shows nothing rather than the redacted bytes.
//!
//! Opening the index, its readers and its meta rows are the shared scaffold of
//! [`quire_projection_api::sqlite`].
//!
//! # Paths that are both a file and a directory
//! Two authors may put `a` and `a/b` concurrently. A live file hides every path below it: the
//! tree holds the live paths with no live ancestor; the hidden ones stay in the index (and come
//! back if the ancestor is deleted).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quire_projection_api::files::FileChange;
use quire_projection_api::sqlite::{blob32, scan_prefix, Database};
use quire_projection_api::{
    ApplyError, Kind, Payloads, Place, Plugin, ProjectionError, Projector, Scope, Scribe, ScribeId,
};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

/// The projection's name.
pub const NAME: &str = "files";
/// Bump when the same scribes would give a different tree.
const FINGERPRINT: &str = "files v1";
/// The index database in a copy's directory.
pub const INDEX_FILE: &str = "index.sqlite3";
/// The tree in a copy's directory.
pub const TREE_DIR: &str = "tree";
/// Temporary files, renamed into the tree when complete.
const TMP_DIR: &str = "tmp";
/// The meta row saying how far the tree has been brought (a checkpoint).
const TREE_SYNCED: &str = "tree_synced";

/// The file-tree plugin: one tree per stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct Files;

impl Plugin for Files {
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
        Ok(Box::new(FilesProjector::open(
            &place.dir,
            place.payloads.clone(),
        )?))
    }
}

fn db_error(error: rusqlite::Error) -> ProjectionError {
    DB.error(error)
}

fn io_error(what: &str, path: &Path, error: std::io::Error) -> ProjectionError {
    ProjectionError::new(format!("{what} {}: {error}", path.display()))
}

/// A copy's index (the scaffold adds WAL and `synchronous = NORMAL` before `setup`).
const DB: Database = Database {
    file: INDEX_FILE,
    label: "files index",
    setup: "
    CREATE TABLE IF NOT EXISTS files (
        path TEXT PRIMARY KEY, hlc INTEGER NOT NULL, id BLOB NOT NULL, deleted INTEGER NOT NULL,
        content_type TEXT NOT NULL, size INTEGER NOT NULL, sha256 BLOB NOT NULL) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
",
    meta: "meta",
    tables: &["files", "meta"],
};

/// Drops the `blobs` table (the live files' bytes) an index made by an older version holds, and
/// gives its pages back to the file system. The bytes are in the payload store; the `files`
/// table, and so the digest, is the same.
fn drop_old_blobs(db: &Connection) -> Result<(), ProjectionError> {
    let old: bool = db
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'blobs')",
            [],
            |row| row.get(0),
        )
        .map_err(db_error)?;
    if old {
        db.execute_batch("DROP TABLE blobs").map_err(db_error)?;
        // Only space (VACUUM writes the smaller file through the write-ahead log, the
        // checkpoint shrinks both): if a reader keeps it from running now, the free pages are
        // reused by later batches instead.
        let _ = db.execute_batch("VACUUM; PRAGMA wal_checkpoint(TRUNCATE);");
    }
    Ok(())
}

/// The bytes of `entry`'s file, read back from `payloads` by its scribe id and checked against
/// the index: `None` if the payload was redacted. An error names the path and the scribe.
pub fn file_data(
    payloads: &dyn Payloads,
    entry: &Entry,
) -> Result<Option<Vec<u8>>, ProjectionError> {
    let fail = |what: String| {
        ProjectionError::new(format!(
            "files: the bytes of {} (scribe {}): {what}",
            entry.path, entry.id
        ))
    };
    let payload = match payloads.payload(&entry.id) {
        Ok(Some(payload)) => payload,
        Ok(None) => return Ok(None),
        Err(error) => return Err(fail(format!("not in the node's payload store: {error}"))),
    };
    let data = match FileChange::decode(&Kind::FilePut, &payload) {
        Ok(Some(FileChange::Put { path, data, .. })) if path == entry.path => data,
        Ok(Some(change)) => {
            return Err(fail(format!(
                "the stored payload puts {:?}, not this path",
                change.path()
            )))
        }
        Ok(None) => return Err(fail("the stored payload is not a file.put".into())),
        Err(error) => return Err(fail(error)),
    };
    let sha256: [u8; 32] = Sha256::digest(&data).into();
    if sha256 != entry.sha256 || data.len() as u64 != entry.size {
        return Err(fail(format!(
            "the payload store gave {} bytes of SHA-256 {}, the index says {} bytes of {}",
            data.len(),
            hex::encode(sha256),
            entry.size,
            hex::encode(entry.sha256)
        )));
    }
    Ok(Some(data))
}

/// The bytes of the files a batch just put, by scribe id: the tree is written from them without
/// reading the payload store back.
type Fresh<'a> = HashMap<ScribeId, &'a [u8]>;

/// One path's entry in the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The path.
    pub path: String,
    /// MIME type.
    pub content_type: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the bytes.
    pub sha256: [u8; 32],
    /// The winning scribe.
    pub id: ScribeId,
    /// Its clock.
    pub hlc: u64,
    /// True for a tombstone.
    pub deleted: bool,
}

fn entry(row: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    Ok(Entry {
        path: row.get(0)?,
        content_type: row.get(1)?,
        size: row.get::<_, i64>(2)? as u64,
        sha256: blob32(row.get(3)?),
        id: ScribeId(blob32(row.get(4)?)),
        hlc: row.get::<_, i64>(5)? as u64,
        deleted: row.get(6)?,
    })
}

const ENTRY_COLUMNS: &str = "path, content_type, size, sha256, id, hlc, deleted";

/// One copy of a stream's tree.
pub struct FilesProjector {
    db: Connection,
    dir: PathBuf,
    /// The node's payloads: the bytes of live files not in the batch being applied.
    payloads: Arc<dyn Payloads>,
}

impl std::fmt::Debug for FilesProjector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilesProjector")
            .field("dir", &self.dir)
            .finish()
    }
}

/// The path's parent paths, nearest first: `a/b/c` → `a/b`, `a`.
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.char_indices()
        .rev()
        .filter(|(_, c)| *c == '/')
        .map(move |(at, _)| &path[..at])
}

/// The first and the last string after every path below `path` (`a/` .. `a0`: '0' follows '/').
fn below(path: &str) -> (String, String) {
    (format!("{path}/"), format!("{path}0"))
}

impl FilesProjector {
    /// Opens (or creates) the copy in `dir`, reading file bytes back from `payloads`, and
    /// brings its tree up to its index if a crash came between the two.
    pub fn open(
        dir: &Path,
        payloads: Arc<dyn Payloads>,
    ) -> Result<FilesProjector, ProjectionError> {
        for sub in [TREE_DIR, TMP_DIR] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(|e| io_error("creating", &dir.join(sub), e))?;
        }
        let db = DB.open(dir)?;
        drop_old_blobs(&db)?;
        let projector = FilesProjector {
            db,
            dir: dir.to_path_buf(),
            payloads,
        };
        let checkpoint = DB.checkpoint(&projector.db).map_err(db_error)?;
        if DB.meta(&projector.db, TREE_SYNCED).map_err(db_error)? != checkpoint {
            projector.rewrite_tree()?;
        }
        Ok(projector)
    }

    fn tree_path(&self, path: &str) -> PathBuf {
        self.dir.join(TREE_DIR).join(path)
    }

    fn live(&self, path: &str) -> rusqlite::Result<Option<Entry>> {
        self.db
            .prepare_cached(&format!(
                "SELECT {ENTRY_COLUMNS} FROM files WHERE path = ?1 AND deleted = 0"
            ))?
            .query_row([path], entry)
            .optional()
    }

    /// Whether a live file above `path` hides it.
    fn hidden(&self, path: &str) -> rusqlite::Result<bool> {
        for ancestor in ancestors(path) {
            if self.live(ancestor)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Writes `entry`'s file into the tree (temporary file, then rename), replacing a directory
    /// of hidden paths there and any file still standing above it. The bytes come from `fresh`
    /// (this batch's puts) or else from the payload store, checked against the index; a
    /// redacted version is not written, and what stood at its path goes.
    ///
    /// `entry` is visible (no live file above it in the index), so a file at one of its parent
    /// paths is stale: a path this batch deleted or replaced whose own sync has not come yet.
    /// [`FilesProjector::apply`] syncs the changed paths one by one in path order, and a
    /// deleted `a` uncovers `a/b/c` before the sync of a deleted `a/b` has removed its file.
    fn write_file(&self, entry: &Entry, fresh: &Fresh<'_>) -> Result<(), ProjectionError> {
        let read;
        let data: &[u8] = match fresh.get(&entry.id) {
            Some(data) => data,
            None => match file_data(&*self.payloads, entry)? {
                Some(data) => {
                    read = data;
                    &read
                }
                None => return self.remove_redacted(entry),
            },
        };
        let target = self.tree_path(&entry.path);
        if target.is_dir() {
            std::fs::remove_dir_all(&target).map_err(|e| io_error("removing", &target, e))?;
        }
        for ancestor in ancestors(&entry.path) {
            let stale = self.tree_path(ancestor);
            match std::fs::symlink_metadata(&stale) {
                Ok(found) if !found.is_dir() => {
                    std::fs::remove_file(&stale).map_err(|e| io_error("removing", &stale, e))?;
                    // Everything above a file is a directory: there is no other.
                    break;
                }
                _ => {}
            }
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_error("creating", parent, e))?;
        }
        let temporary = self
            .dir
            .join(TMP_DIR)
            .join(format!("{}.part", hex::encode(&entry.id.0[..8])));
        std::fs::write(&temporary, data).map_err(|e| io_error("writing", &temporary, e))?;
        std::fs::rename(&temporary, &target).map_err(|e| io_error("renaming into", &target, e))
    }

    /// Leaves `entry`, whose payload was redacted, out of the tree: whatever stands at its path
    /// (an older version, or a directory of the paths it hides) goes.
    fn remove_redacted(&self, entry: &Entry) -> Result<(), ProjectionError> {
        let target = self.tree_path(&entry.path);
        if target.is_dir() {
            std::fs::remove_dir_all(&target).map_err(|e| io_error("removing", &target, e))?;
        }
        self.remove_file(&entry.path)
    }

    /// Removes `path`'s file and the directories it leaves empty.
    fn remove_file(&self, path: &str) -> Result<(), ProjectionError> {
        let target = self.tree_path(path);
        if target.is_file() {
            std::fs::remove_file(&target).map_err(|e| io_error("removing", &target, e))?;
        }
        let root = self.dir.join(TREE_DIR);
        let mut parent = target.parent();
        while let Some(dir) = parent {
            if dir == root || std::fs::remove_dir(dir).is_err() {
                break;
            }
            parent = dir.parent();
        }
        Ok(())
    }

    /// Brings the tree at `path` (and what it hides or uncovers) up to the index.
    fn sync_path(&self, path: &str, fresh: &Fresh<'_>) -> Result<(), ProjectionError> {
        if self.hidden(path).map_err(db_error)? {
            return Ok(());
        }
        match self.live(path).map_err(db_error)? {
            Some(entry) => self.write_file(&entry, fresh),
            None => {
                self.remove_file(path)?;
                // Paths this one hid come back.
                let (from, to) = below(path);
                let uncovered: Vec<Entry> = self
                    .db
                    .prepare_cached(&format!(
                        "SELECT {ENTRY_COLUMNS} FROM files WHERE path >= ?1 AND path < ?2 AND deleted = 0 ORDER BY path"
                    ))
                    .and_then(|mut s| {
                        s.query_map([from, to], entry)?.collect::<rusqlite::Result<_>>()
                    })
                    .map_err(db_error)?;
                for entry in uncovered {
                    if !self.hidden(&entry.path).map_err(db_error)? {
                        self.write_file(&entry, fresh)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Rewrites the whole tree from the index and the payload store (after a crash between a
    /// commit and its tree update, or a reset).
    fn rewrite_tree(&self) -> Result<(), ProjectionError> {
        let tree = self.dir.join(TREE_DIR);
        std::fs::remove_dir_all(&tree).map_err(|e| io_error("removing", &tree, e))?;
        std::fs::create_dir_all(&tree).map_err(|e| io_error("creating", &tree, e))?;
        let live: Vec<Entry> = self
            .db
            .prepare(&format!(
                "SELECT {ENTRY_COLUMNS} FROM files WHERE deleted = 0 ORDER BY path"
            ))
            .and_then(|mut s| s.query_map([], entry)?.collect::<rusqlite::Result<_>>())
            .map_err(db_error)?;
        for entry in &live {
            if !self.hidden(&entry.path).map_err(db_error)? {
                self.write_file(entry, &Fresh::new())?;
            }
        }
        let checkpoint = DB.checkpoint(&self.db).map_err(db_error)?;
        DB.set_meta(&self.db, TREE_SYNCED, checkpoint)
            .map_err(db_error)
    }
}

/// A change to apply: the winner of its path within a batch.
struct Change<'a> {
    scribe: &'a Scribe,
    change: FileChange,
}

impl Projector for FilesProjector {
    fn apply(&mut self, batch: &[Scribe], checkpoint: u64) -> Result<(), ApplyError> {
        // A previous batch committed but could not update the tree (disk full, say): bring the
        // tree up to the index before anything else.
        let synced = DB
            .meta(&self.db, TREE_SYNCED)
            .map_err(|e| ApplyError::Storage(e.to_string()))?;
        if synced
            != DB
                .checkpoint(&self.db)
                .map_err(|e| ApplyError::Storage(e.to_string()))?
        {
            self.rewrite_tree().map_err(|e| ApplyError::Storage(e.0))?;
        }
        let mut newest: BTreeMap<String, Change<'_>> = BTreeMap::new();
        for (index, scribe) in batch.iter().enumerate() {
            let change = match FileChange::decode(&scribe.kind, &scribe.payload) {
                Ok(Some(change)) => change,
                Ok(None) => continue,
                Err(reason) => return Err(ApplyError::Scribe { index, reason }),
            };
            let path = change.path().to_string();
            let newer = newest
                .get(&path)
                .is_none_or(|held| (scribe.hlc, scribe.id) > (held.scribe.hlc, held.scribe.id));
            if newer {
                newest.insert(path, Change { scribe, change });
            }
        }
        let storage = |e| DB.storage(e);
        let tx = self.db.unchecked_transaction().map_err(storage)?;
        let mut changed = Vec::new();
        let mut fresh = Fresh::new();
        for (path, Change { scribe, change }) in &newest {
            let current: Option<(i64, Vec<u8>)> = self
                .db
                .prepare_cached("SELECT hlc, id FROM files WHERE path = ?1")
                .and_then(|mut s| {
                    s.query_row([path], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(storage)?;
            if let Some((hlc, id)) = &current {
                if (*hlc as u64, blob32(id.clone())) >= (scribe.hlc, scribe.id.0) {
                    continue;
                }
            }
            let (content_type, size, sha256) = match change {
                FileChange::Put {
                    content_type, data, ..
                } => {
                    let sha256: [u8; 32] = Sha256::digest(data).into();
                    (content_type.clone(), data.len() as i64, sha256)
                }
                FileChange::Delete { .. } => (String::new(), 0, [0; 32]),
            };
            self.db
                .prepare_cached(
                    "INSERT INTO files (path, hlc, id, deleted, content_type, size, sha256)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (path) DO UPDATE SET hlc = ?2, id = ?3, deleted = ?4,
                     content_type = ?5, size = ?6, sha256 = ?7",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        path,
                        scribe.hlc as i64,
                        scribe.id.0.to_vec(),
                        matches!(change, FileChange::Delete { .. }),
                        content_type,
                        size,
                        sha256.to_vec()
                    ])
                })
                .map_err(storage)?;
            if let FileChange::Put { data, .. } = change {
                fresh.insert(scribe.id, data.as_slice());
            }
            changed.push(path.as_str());
        }
        DB.set_checkpoint(&self.db, checkpoint).map_err(storage)?;
        tx.commit().map_err(storage)?;
        // The tree follows the committed index; `tree_synced` says it has.
        let tree = |e: ProjectionError| ApplyError::Storage(e.0);
        for path in &changed {
            self.sync_path(path, &fresh).map_err(tree)?;
        }
        DB.set_meta(&self.db, TREE_SYNCED, checkpoint)
            .map_err(storage)
    }

    fn checkpoint(&self) -> Result<u64, ProjectionError> {
        DB.checkpoint(&self.db).map_err(db_error)
    }

    fn reset(&mut self) -> Result<(), ProjectionError> {
        DB.reset(&self.db, || Ok(()))?;
        self.rewrite_tree()
    }

    fn digest(&self) -> Result<[u8; 32], ProjectionError> {
        let mut hasher = Sha256::new();
        hasher.update(b"quire files digest v1\n");
        let mut statement = self
            .db
            .prepare(&format!("SELECT {ENTRY_COLUMNS} FROM files ORDER BY path"))
            .map_err(db_error)?;
        let mut rows = statement.query([]).map_err(db_error)?;
        while let Some(row) = rows.next().map_err(db_error)? {
            let e = entry(row).map_err(db_error)?;
            hasher.update((e.path.len() as u64).to_be_bytes());
            hasher.update(e.path.as_bytes());
            hasher.update([e.deleted as u8]);
            hasher.update((e.content_type.len() as u64).to_be_bytes());
            hasher.update(e.content_type.as_bytes());
            hasher.update(e.size.to_be_bytes());
            hasher.update(e.sha256);
            hasher.update(e.id.0);
            hasher.update(e.hlc.to_be_bytes());
        }
        Ok(hasher.finalize().into())
    }
}

/// Read access to a live copy's index (entries; their bytes with a payload source).
#[derive(Debug)]
pub struct Reader {
    db: Connection,
}

impl Reader {
    /// Opens the copy in `dir` for reading.
    pub fn open(dir: &Path) -> Result<Reader, ProjectionError> {
        Ok(Reader {
            db: DB.open_read_only(dir)?,
        })
    }

    /// The live entry of `path`, if there is one.
    pub fn get(&self, path: &str) -> Result<Option<Entry>, ProjectionError> {
        self.db
            .prepare_cached(&format!(
                "SELECT {ENTRY_COLUMNS} FROM files WHERE path = ?1 AND deleted = 0"
            ))
            .and_then(|mut s| s.query_row([path], entry).optional())
            .map_err(db_error)
    }

    /// The live entry of `path` and its bytes, read back from `payloads` (the node's payload
    /// store) by the entry's scribe id and checked against the entry's SHA-256. The id names
    /// those bytes forever, so a concurrent replacement cannot make them disagree. `None` if no
    /// file is live there, or if its version was redacted (a redacted version is never served).
    pub fn get_with_data(
        &self,
        path: &str,
        payloads: &dyn Payloads,
    ) -> Result<Option<(Entry, Vec<u8>)>, ProjectionError> {
        let Some(entry) = self.get(path)? else {
            return Ok(None);
        };
        Ok(file_data(payloads, &entry)?.map(|data| (entry, data)))
    }

    /// Live entries whose path starts with `prefix`, in path order, at most `limit`.
    pub fn list(&self, prefix: &str, limit: usize) -> Result<Vec<Entry>, ProjectionError> {
        scan_prefix(
            &self.db,
            &format!(
                "SELECT {ENTRY_COLUMNS} FROM files WHERE path >= ?1 AND deleted = 0 ORDER BY path"
            ),
            prefix,
            limit,
            entry,
            |found| found.path.as_bytes(),
        )
        .map_err(db_error)
    }

    /// The checkpoint of the committed index.
    pub fn checkpoint(&self) -> Result<u64, ProjectionError> {
        DB.checkpoint(&self.db).map_err(db_error)
    }
}

/// SHA-256 over a directory tree (relative paths and contents, in path order): equal trees give
/// equal digests. For comparing the trees of two nodes.
pub fn tree_digest(root: &Path) -> std::io::Result<[u8; 32]> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> std::io::Result<()> {
        for item in std::fs::read_dir(dir)? {
            let item = item?;
            let path = item.path();
            if item.file_type()?.is_dir() {
                walk(root, &path, out)?;
            } else {
                let relative = path.strip_prefix(root).unwrap_or(&path);
                out.push((relative.to_string_lossy().into_owned(), path));
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(root, root, &mut files)?;
    files.sort();
    let mut hasher = Sha256::new();
    for (relative, path) in files {
        let data = std::fs::read(&path)?;
        hasher.update((relative.len() as u64).to_be_bytes());
        hasher.update(relative.as_bytes());
        hasher.update((data.len() as u64).to_be_bytes());
        hasher.update(&data);
    }
    Ok(hasher.finalize().into())
}

/// A content type for a file name, from its extension (`application/octet-stream` if unknown;
/// `_schema` is JSON).
pub fn content_type_for(path: &str) -> &'static str {
    if path == quire_projection_api::files::SCHEMA_PATH || path.ends_with("/_schema") {
        return "application/json";
    }
    let extension = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match extension.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("txt" | "md") => "text/plain; charset=utf-8",
        Some("xml") => "application/xml",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("ico") => "image/x-icon",
        Some("wasm") => "application/wasm",
        Some("woff") => "font/woff",
        Some("woff2") => "font/woff2",
        Some("ttf") => "font/ttf",
        Some("pdf") => "application/pdf",
        Some("mp4") => "video/mp4",
        Some("webm") => "video/webm",
        Some("mp3") => "audio/mpeg",
        Some("wav") => "audio/wav",
        _ => "application/octet-stream",
    }
}
