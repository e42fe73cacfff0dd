//! The SQLite copy scaffold the built-in projectors share (feature `sqlite`).
//!
//! What lives here is what every projector that keeps its copy in one SQLite file does the same
//! way, described once by a [`Database`]: opening the file for the projector (a busy timeout,
//! WAL journal, `synchronous = NORMAL`, then the projector's own pragmas and
//! `CREATE TABLE IF NOT EXISTS` statements), opening read-only connections for readers (WAL lets
//! them read while the runner writes), the `(name, value)` rows of its meta table (above all the
//! checkpoint, written inside the batch's transaction so the state and the checkpoint commit
//! together), emptying its tables for a reset, naming its errors, and the prefix scan readers
//! list with ([`scan_prefix`]). What does not live here:
//! any projector's tables, statements, rules or digest (those stay in `projections/kv`, `sql` and
//! `files`), and anything of RocksDB, gRPC or tokio.
//!
//! Nothing here changes what is on disk: the file names, table names, meta rows and pragmas are
//! the ones each [`Database`] names.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use rusqlite;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, ToSql};

use crate::{ApplyError, ProjectionError};

/// How long a connection waits for another's lock (a checkpoint of the write-ahead log) before
/// giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The meta row of the checkpoint: the local seq the committed state includes.
pub const CHECKPOINT: &str = "checkpoint";

/// Set on every database a projector opens for writing, before its own [`Database::setup`].
const PRAGMAS: &str = "
    PRAGMA journal_mode = WAL;
    PRAGMA synchronous = NORMAL;
";

/// One projector's SQLite database: what differs between projectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Database {
    /// The file in the copy's directory.
    pub file: &'static str,
    /// How error messages name the database (`"kv database"`).
    pub label: &'static str,
    /// Run at every open for writing, after WAL and `synchronous = NORMAL`: the projector's own
    /// pragmas and `CREATE TABLE IF NOT EXISTS` statements (its meta table among them).
    pub setup: &'static str,
    /// The table of `(name, value)` rows that holds the checkpoint.
    pub meta: &'static str,
    /// The tables a reset empties, in order (the meta table among them).
    pub tables: &'static [&'static str],
}

impl Database {
    /// The database file in the copy's directory `dir`.
    pub fn path(&self, dir: &Path) -> PathBuf {
        dir.join(self.file)
    }

    /// Opens (or creates) the database in the copy's directory `dir` for the projector.
    pub fn open(&self, dir: &Path) -> Result<Connection, ProjectionError> {
        self.open_file(&self.path(dir))
    }

    /// Opens (or creates) the database at `path` for the projector: busy timeout, WAL,
    /// `synchronous = NORMAL`, then [`Database::setup`].
    pub fn open_file(&self, path: &Path) -> Result<Connection, ProjectionError> {
        let db = Connection::open(path).map_err(|e| self.error(e))?;
        db.busy_timeout(BUSY_TIMEOUT).map_err(|e| self.error(e))?;
        db.execute_batch(PRAGMAS).map_err(|e| self.error(e))?;
        db.execute_batch(self.setup).map_err(|e| self.error(e))?;
        Ok(db)
    }

    /// A read-only connection to the database in `dir`, for a reader: it never blocks the
    /// runner's writes and sees only committed batches.
    pub fn open_read_only(&self, dir: &Path) -> Result<Connection, ProjectionError> {
        let db = Connection::open_with_flags(
            self.path(dir),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| self.error(e))?;
        db.busy_timeout(BUSY_TIMEOUT).map_err(|e| self.error(e))?;
        Ok(db)
    }

    /// The number in meta row `name` (0 when there is none).
    pub fn meta(&self, db: &Connection, name: &str) -> rusqlite::Result<u64> {
        Ok(db
            .query_row(
                &format!("SELECT value FROM {} WHERE name = ?1", self.meta),
                [name],
                |row| row.get::<_, i64>(0),
            )
            .optional()?
            .unwrap_or(0) as u64)
    }

    /// Sets meta row `name` to `value` (in the caller's transaction, if it has one).
    pub fn set_meta(&self, db: &Connection, name: &str, value: u64) -> rusqlite::Result<()> {
        db.execute(
            &format!(
                "INSERT INTO {} (name, value) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET value = ?2",
                self.meta
            ),
            params![name, value as i64],
        )?;
        Ok(())
    }

    /// The checkpoint of the committed state (0 for a new copy).
    pub fn checkpoint(&self, db: &Connection) -> rusqlite::Result<u64> {
        self.meta(db, CHECKPOINT)
    }

    /// Records `checkpoint`; call it inside the batch's transaction, so the state and its
    /// checkpoint commit together.
    pub fn set_checkpoint(&self, db: &Connection, checkpoint: u64) -> rusqlite::Result<()> {
        self.set_meta(db, CHECKPOINT, checkpoint)
    }

    /// Empties [`Database::tables`] in one transaction, after `first` (run in the same
    /// transaction: a projector drops what it created beyond its fixed tables there).
    pub fn reset(
        &self,
        db: &Connection,
        first: impl FnOnce() -> rusqlite::Result<()>,
    ) -> Result<(), ProjectionError> {
        let tx = db.unchecked_transaction().map_err(|e| self.error(e))?;
        first().map_err(|e| self.error(e))?;
        for table in self.tables {
            db.execute(&format!("DELETE FROM {table}"), [])
                .map_err(|e| self.error(e))?;
        }
        tx.commit().map_err(|e| self.error(e))
    }

    /// A database error, named after the database.
    pub fn error(&self, error: rusqlite::Error) -> ProjectionError {
        ProjectionError::new(format!("{}: {error}", self.label))
    }

    /// A database error while applying a batch, named after the database.
    pub fn storage(&self, error: rusqlite::Error) -> ApplyError {
        ApplyError::Storage(format!("{}: {error}", self.label))
    }
}

/// The rows `sql` selects from `prefix` on, while their key starts with `prefix`, at most `limit`:
/// a prefix scan over an index. `sql` binds `prefix` to `?1` as the lower bound of its key
/// (`WHERE key >= ?1 ... ORDER BY key`); `read` makes a row into a `T` and `key` gives its key.
pub fn scan_prefix<P, T>(
    db: &Connection,
    sql: &str,
    prefix: &P,
    limit: usize,
    read: impl Fn(&Row<'_>) -> rusqlite::Result<T>,
    key: impl Fn(&T) -> &[u8],
) -> rusqlite::Result<Vec<T>>
where
    P: ToSql + AsRef<[u8]> + ?Sized,
{
    let mut statement = db.prepare_cached(sql)?;
    let mut rows = statement.query([prefix])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let found = read(row)?;
        if !key(&found).starts_with(prefix.as_ref()) || out.len() >= limit {
            break;
        }
        out.push(found);
    }
    Ok(out)
}

/// A 32-byte id or key stored as a blob (all zeros if the blob has another length).
pub fn blob32(bytes: Vec<u8>) -> [u8; 32] {
    let mut out = [0; 32];
    if bytes.len() == 32 {
        out.copy_from_slice(&bytes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DB: Database = Database {
        file: "test.sqlite",
        label: "test database",
        setup: "CREATE TABLE IF NOT EXISTS things (name TEXT PRIMARY KEY);
                CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        meta: "meta",
        tables: &["things", "meta"],
    };

    #[test]
    fn the_checkpoint_commits_with_the_batch_and_readers_see_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = DB.open(dir.path()).unwrap();
        let journal: String = db
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .unwrap();
        assert_eq!(journal, "wal");
        assert_eq!(DB.checkpoint(&db).unwrap(), 0);
        let reader = DB.open_read_only(dir.path()).unwrap();
        {
            let tx = db.unchecked_transaction().unwrap();
            db.execute("INSERT INTO things (name) VALUES ('a')", [])
                .unwrap();
            DB.set_checkpoint(&db, 7).unwrap();
            assert_eq!(DB.checkpoint(&reader).unwrap(), 0, "not committed yet");
            tx.commit().unwrap();
        }
        assert_eq!(DB.checkpoint(&reader).unwrap(), 7);
        DB.set_meta(&db, "other", 3).unwrap();
        assert_eq!(DB.meta(&reader, "other").unwrap(), 3);
        assert!(reader
            .execute("INSERT INTO things (name) VALUES ('b')", [])
            .is_err());
    }

    #[test]
    fn reset_empties_every_table_after_first() {
        let dir = tempfile::tempdir().unwrap();
        let db = DB.open(dir.path()).unwrap();
        db.execute("INSERT INTO things (name) VALUES ('a')", [])
            .unwrap();
        DB.set_checkpoint(&db, 7).unwrap();
        DB.reset(&db, || db.execute_batch("CREATE TABLE extra (x)"))
            .unwrap();
        assert_eq!(DB.checkpoint(&db).unwrap(), 0);
        let things: i64 = db
            .query_row("SELECT COUNT(*) FROM things", [], |row| row.get(0))
            .unwrap();
        assert_eq!(things, 0);
        let error = DB.reset(&db, || db.execute_batch("NOT SQL")).unwrap_err();
        assert!(error.0.starts_with("test database: "), "{error}");
        // The failed reset left no transaction open.
        assert!(db.is_autocommit());
    }

    #[test]
    fn scan_prefix_stops_at_the_first_key_past_the_prefix_or_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let db = DB.open(dir.path()).unwrap();
        for name in ["a", "b/1", "b/2", "b/3", "c"] {
            db.execute("INSERT INTO things (name) VALUES (?1)", [name])
                .unwrap();
        }
        let scan = |prefix: &str, limit| {
            scan_prefix(
                &db,
                "SELECT name FROM things WHERE name >= ?1 ORDER BY name",
                prefix,
                limit,
                |row| row.get::<_, String>(0),
                |name| name.as_bytes(),
            )
            .unwrap()
        };
        assert_eq!(scan("b/", 10), ["b/1", "b/2", "b/3"]);
        assert_eq!(scan("b/", 2), ["b/1", "b/2"]);
        assert_eq!(scan("", 10).len(), 5);
        assert!(scan("d", 10).is_empty());
    }

    #[test]
    fn blob32_takes_exactly_32_bytes() {
        assert_eq!(blob32(vec![7; 32]), [7; 32]);
        assert_eq!(blob32(vec![7; 31]), [0; 32]);
    }
}
