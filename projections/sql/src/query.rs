//! Read-only queries over a copy's tables, with a time limit and a row limit.
//!
//! A [`Reader`] is a read-only SQLite connection with an authorizer that allows what reads and
//! refuses, at prepare time and with a message saying why, everything else: statements that
//! write (INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, transactions, ...), `ATTACH`/`DETACH`,
//! PRAGMAs other than the read-only introspection ones, and `load_extension`. One statement per
//! query.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quire_projection_api::ProjectionError;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, ErrorCode, OptionalExtension};

use crate::schema::List;
use crate::{db_error, describe, DB};

/// PRAGMAs a query may use: they only read the schema.
pub const READ_PRAGMAS: [&str; 6] = [
    "data_version",
    "table_info",
    "table_xinfo",
    "index_list",
    "index_info",
    "index_xinfo",
];

/// How long a query may run and how many rows it may return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time for preparing and stepping the statement.
    pub time: Duration,
    /// Rows of the result.
    pub rows: usize,
}

impl Default for Limits {
    /// 2 seconds, 10,000 rows.
    fn default() -> Self {
        Limits {
            time: Duration::from_secs(2),
            rows: 10_000,
        }
    }
}

/// A query's parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Params {
    /// Bound to `?` (or `?N`) in order.
    Positional(Vec<Value>),
    /// Bound by name; a name may omit its prefix (`:`, `@` or `$`).
    Named(Vec<(String, Value)>),
}

impl Default for Params {
    fn default() -> Self {
        Params::Positional(Vec::new())
    }
}

/// A query's answer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rows {
    /// Column names, in order.
    pub columns: Vec<String>,
    /// Rows, each with one value per column.
    pub rows: Vec<Vec<Value>>,
    /// The copy's checkpoint when the query ran: the local seq its answer includes.
    pub checkpoint: u64,
}

/// One page of a list, and the list's size, from one snapshot.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Window {
    /// The page (from 0).
    pub page: u64,
    /// Rows per page (the request's, clamped to the list's).
    pub page_size: u64,
    /// Rows of the whole list.
    pub total: u64,
    /// Column names, in order.
    pub columns: Vec<String>,
    /// The page's rows.
    pub rows: Vec<Vec<Value>>,
    /// The copy's checkpoint the page is from.
    pub checkpoint: u64,
}

/// Why a query gave no answer. Nothing a query does can change the database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// The statement is not allowed (it writes, attaches, changes a PRAGMA, loads an extension,
    /// or is more than one statement).
    #[error("{0}")]
    Refused(String),
    /// The SQL or its parameters are wrong.
    #[error("{0}")]
    Invalid(String),
    /// The query ran past its time limit.
    #[error("the query ran past its time limit of {} ms and was stopped; narrow it (an index, a LIMIT) or ask the operator to raise --sql-time-limit-ms", .0.as_millis())]
    TimeLimit(Duration),
    /// The answer has more rows than the limit.
    #[error("the query returns more than {0} rows (the row limit); add a LIMIT, page with WHERE, or ask the operator to raise --sql-max-rows")]
    RowLimit(usize),
    /// The answer (or one value in it) is bigger than the result size limit.
    #[error(
        "the query's answer is over {0} bytes; select fewer or smaller values (LIMIT, substr)"
    )]
    TooLarge(usize),
    /// The database failed.
    #[error("sql database: {0}")]
    Storage(String),
}

/// Most bytes of one query's answer, and of any one value computed in it.
pub const MAX_RESULT_BYTES: usize = 32 << 20;

/// Most columns of one answer.
pub const MAX_COLUMNS: usize = 1_024;

/// Longest LIKE or GLOB pattern (bytes): matching is quadratic in it.
pub const MAX_PATTERN_BYTES: i32 = 1_000;

/// How long a query runs before it is slow: from then on it needs a turn in the slow lane.
pub const SLOW_AFTER: Duration = Duration::from_millis(50);

/// The slow lane: queries that have run past [`SLOW_AFTER`] go on at most half the cores at once
/// (at least one); the others sleep in their progress handler until a turn frees or their
/// deadline comes. So a few queries that run to the time limit leave cores to point queries,
/// appends and projections instead of taking every core between them.
struct SlowLane {
    running: Mutex<usize>,
    freed: std::sync::Condvar,
    max: usize,
}

/// A slow query's turn in the [`SlowLane`], given back when dropped.
struct SlowTurn(&'static SlowLane);

impl Drop for SlowTurn {
    fn drop(&mut self) {
        *self.0.running.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.0.freed.notify_one();
    }
}

fn slow_lane() -> &'static SlowLane {
    static LANE: std::sync::OnceLock<SlowLane> = std::sync::OnceLock::new();
    LANE.get_or_init(|| SlowLane {
        running: Mutex::new(0),
        freed: std::sync::Condvar::new(),
        max: (std::thread::available_parallelism().map_or(2, |n| n.get()) / 2).max(1),
    })
}

impl SlowLane {
    /// Waits for a turn until `deadline`; `None` once it passed.
    fn turn(&'static self, deadline: Instant) -> Option<SlowTurn> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        while *running >= self.max {
            let left = deadline.checked_duration_since(Instant::now())?;
            running = self
                .freed
                .wait_timeout(running, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *running += 1;
        Some(SlowTurn(self))
    }
}

/// The progress handler of a query that must end by `deadline`: true (stop) once it passed;
/// past [`SLOW_AFTER`], it first waits for a turn in the slow lane.
fn progress(
    deadline: Instant,
) -> impl FnMut() -> bool + Send + std::panic::RefUnwindSafe + 'static {
    let started = Instant::now();
    let mut turn: Option<SlowTurn> = None;
    move || {
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        if turn.is_none() && now.duration_since(started) >= SLOW_AFTER {
            match slow_lane().turn(deadline) {
                Some(slow) => turn = Some(slow),
                None => return true,
            }
        }
        false
    }
}

/// Stops queries that run past their deadline from outside the query's thread
/// (`sqlite3_interrupt`), so a single long SQL function call — which never reaches the progress
/// handler — is stopped at the time limit too. One thread for the whole process.
struct Watchdog {
    armed: Mutex<BTreeMap<(Instant, u64), rusqlite::InterruptHandle>>,
    wake: std::sync::Condvar,
}

static WATCHDOG: std::sync::OnceLock<Arc<Watchdog>> = std::sync::OnceLock::new();
static NEXT_ARMED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn watchdog() -> &'static Arc<Watchdog> {
    WATCHDOG.get_or_init(|| {
        let watchdog = Arc::new(Watchdog {
            armed: Mutex::default(),
            wake: std::sync::Condvar::new(),
        });
        let watching = watchdog.clone();
        std::thread::Builder::new()
            .name("sql-watchdog".into())
            .spawn(move || watching.run())
            .expect("the SQL watchdog thread starts");
        watchdog
    })
}

impl Watchdog {
    fn run(&self) {
        let mut armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = Instant::now();
            // Interrupting under the lock: once `Armed` is dropped, its query is never hit.
            while let Some(entry) = armed.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                entry.remove().interrupt();
            }
            armed = match armed.keys().next().map(|(deadline, _)| *deadline) {
                Some(deadline) => {
                    let wait = deadline.saturating_duration_since(now);
                    self.wake
                        .wait_timeout(armed, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.wake.wait(armed).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }

    /// Interrupts `handle` at `deadline` unless the returned guard is dropped first.
    fn arm(&'static self, deadline: Instant, handle: rusqlite::InterruptHandle) -> Armed {
        let key = (deadline, NEXT_ARMED.fetch_add(1, Ordering::Relaxed));
        self.armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, handle);
        self.wake.notify_one();
        Armed {
            watchdog: self,
            key,
        }
    }
}

/// A query's deadline with the watchdog; dropping it disarms.
struct Armed {
    watchdog: &'static Watchdog,
    key: (Instant, u64),
}

impl Drop for Armed {
    fn drop(&mut self) {
        self.watchdog
            .armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// A read-only connection to one copy.
pub struct Reader {
    db: Connection,
    refusal: Arc<Mutex<Option<String>>>,
    /// Set while the reader runs its own statements (the read transaction, the checkpoint).
    trusted: Arc<AtomicBool>,
    /// The lists of the schema in force, by the id of the `_schema` scribe they come from.
    lists: Option<(Vec<u8>, BTreeMap<String, List>)>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

fn refusal_of(action: &AuthAction<'_>) -> Option<String> {
    if touches_sqlite_schema(action) {
        // SQLite asks for this before the DROP or CREATE itself, and stops at the first denial.
        return Some(
            "changing the database schema (CREATE, DROP, ALTER) is refused: queries are read-only"
                .into(),
        );
    }
    let writes = |what: &str| {
        Some(format!(
            "{what} is refused: queries are read-only (SELECT, with joins, subqueries, aggregates, JSON and FTS functions)"
        ))
    };
    match action {
        AuthAction::Select | AuthAction::Read { .. } | AuthAction::Recursive => None,
        AuthAction::Function { function_name } => {
            if function_name.eq_ignore_ascii_case("load_extension") {
                Some("load_extension is refused: queries cannot load code".into())
            } else {
                None
            }
        }
        AuthAction::Pragma { pragma_name, .. } => {
            if READ_PRAGMAS.contains(&pragma_name.to_ascii_lowercase().as_str()) {
                None
            } else {
                Some(format!(
                    "PRAGMA {pragma_name} is refused: queries cannot read or change settings (allowed: {})",
                    READ_PRAGMAS.join(", ")
                ))
            }
        }
        AuthAction::Attach { .. } => {
            Some("ATTACH is refused: queries see this stream's database only".into())
        }
        AuthAction::Detach { .. } => Some("DETACH is refused".into()),
        AuthAction::Insert { table_name } => writes(&format!("INSERT into {table_name}")),
        AuthAction::Update { table_name, .. } => writes(&format!("UPDATE of {table_name}")),
        AuthAction::Delete { table_name } => writes(&format!("DELETE from {table_name}")),
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } => {
            writes("a transaction statement")
        }
        AuthAction::CreateIndex { .. }
        | AuthAction::CreateTable { .. }
        | AuthAction::CreateTempIndex { .. }
        | AuthAction::CreateTempTable { .. }
        | AuthAction::CreateTempTrigger { .. }
        | AuthAction::CreateTempView { .. }
        | AuthAction::CreateTrigger { .. }
        | AuthAction::CreateView { .. }
        | AuthAction::CreateVtable { .. } => writes("CREATE"),
        AuthAction::DropIndex { .. }
        | AuthAction::DropTable { .. }
        | AuthAction::DropTempIndex { .. }
        | AuthAction::DropTempTable { .. }
        | AuthAction::DropTempTrigger { .. }
        | AuthAction::DropTempView { .. }
        | AuthAction::DropTrigger { .. }
        | AuthAction::DropView { .. }
        | AuthAction::DropVtable { .. } => writes("DROP"),
        AuthAction::AlterTable { .. } => writes("ALTER TABLE"),
        AuthAction::Reindex { .. } => writes("REINDEX"),
        AuthAction::Analyze { .. } => writes("ANALYZE"),
        _ => writes("this statement"),
    }
}

fn touches_sqlite_schema(action: &AuthAction<'_>) -> bool {
    match action {
        AuthAction::Insert { table_name }
        | AuthAction::Update { table_name, .. }
        | AuthAction::Delete { table_name } => table_name.starts_with("sqlite_"),
        _ => false,
    }
}

impl Reader {
    /// Opens the copy in `dir` for reading.
    pub fn open(dir: &Path) -> Result<Reader, ProjectionError> {
        let db = DB.open_read_only(dir)?;
        // No single string or blob over the result limit, however it is computed.
        db.set_limit(
            rusqlite::limits::Limit::SQLITE_LIMIT_LENGTH,
            MAX_RESULT_BYTES as i32,
        );
        db.set_limit(
            rusqlite::limits::Limit::SQLITE_LIMIT_LIKE_PATTERN_LENGTH,
            MAX_PATTERN_BYTES,
        );
        // No function call that cannot be stopped at the time limit.
        crate::functions::install(&db).map_err(db_error)?;
        let refusal: Arc<Mutex<Option<String>>> = Arc::default();
        let noted = refusal.clone();
        let trusted: Arc<AtomicBool> = Arc::default();
        let ours = trusted.clone();
        db.authorizer(Some(move |context: AuthContext<'_>| {
            if ours.load(Ordering::Relaxed) {
                return Authorization::Allow;
            }
            match refusal_of(&context.action) {
                None => Authorization::Allow,
                Some(reason) => {
                    let mut noted = noted.lock().unwrap_or_else(|p| p.into_inner());
                    noted.get_or_insert(reason);
                    Authorization::Deny
                }
            }
        }));
        Ok(Reader {
            db,
            refusal,
            trusted,
            lists: None,
        })
    }

    /// The checkpoint of the committed state.
    pub fn checkpoint(&self) -> Result<u64, ProjectionError> {
        self.trusted(|db| DB.checkpoint(db)).map_err(db_error)
    }

    fn trusted<T>(&self, run: impl FnOnce(&Connection) -> T) -> T {
        self.trusted.store(true, Ordering::Relaxed);
        let out = run(&self.db);
        self.trusted.store(false, Ordering::Relaxed);
        out
    }

    /// Runs one read-only statement.
    pub fn query(
        &mut self,
        sql: &str,
        params: &Params,
        limits: Limits,
    ) -> Result<Rows, QueryError> {
        *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let deadline = Instant::now() + limits.time;
        self.db.progress_handler(1_000, Some(progress(deadline)));
        let result = self.run(sql, params, limits, deadline);
        self.db.progress_handler(0, None::<fn() -> bool>);
        result
    }

    fn run(
        &mut self,
        sql: &str,
        params: &Params,
        limits: Limits,
        deadline: Instant,
    ) -> Result<Rows, QueryError> {
        // One read transaction: the checkpoint and the answer come from the same snapshot.
        self.trusted(|db| db.execute_batch("BEGIN"))
            .map_err(|e| QueryError::Storage(e.to_string()))?;
        let armed = watchdog().arm(deadline, self.db.get_interrupt_handle());
        let result = self.run_in_transaction(sql, params, limits);
        drop(armed);
        let _ = self.trusted(|db| db.execute_batch("COMMIT"));
        result
    }

    fn run_in_transaction(
        &mut self,
        sql: &str,
        params: &Params,
        limits: Limits,
    ) -> Result<Rows, QueryError> {
        let checkpoint = self
            .trusted(|db| DB.checkpoint(db))
            .map_err(|e| QueryError::Storage(e.to_string()))?;
        let (columns, rows) = self.statement(sql, params, limits)?;
        Ok(Rows {
            columns,
            rows,
            checkpoint,
        })
    }

    /// The lists the schema in force declares (none before a schema is put).
    /// Parsed once per schema: a frame that names a list costs one small read.
    pub fn lists(&mut self) -> Result<BTreeMap<String, List>, QueryError> {
        let storage = |e: rusqlite::Error| QueryError::Storage(e.to_string());
        let id: Option<Vec<u8>> = self
            .trusted(|db| {
                db.query_row(
                    "SELECT value FROM _quire_meta WHERE name = 'schema'",
                    [],
                    |row| row.get(0),
                )
                .optional()
            })
            .map_err(storage)?;
        let Some(id) = id else {
            return Ok(BTreeMap::new());
        };
        if let Some((cached, lists)) = &self.lists {
            if *cached == id {
                return Ok(lists.clone());
            }
        }
        let applied = self.trusted(crate::load_applied).map_err(storage)?;
        let lists = applied
            .and_then(|(_, schema)| schema)
            .map(|schema| schema.lists)
            .unwrap_or_default();
        self.lists = Some((id, lists.clone()));
        Ok(lists)
    }

    /// One page of list `name` (at most `page_size` rows, clamped to the list's own and to the
    /// row limit), with the
    /// list's total row count, from one snapshot. `Ok(None)`: the schema in force declares no
    /// such list.
    pub fn window(
        &mut self,
        name: &str,
        page: u64,
        page_size: Option<u64>,
        limits: Limits,
    ) -> Result<Option<Window>, QueryError> {
        *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let deadline = Instant::now() + limits.time;
        self.db.progress_handler(1_000, Some(progress(deadline)));
        self.trusted(|db| db.execute_batch("BEGIN"))
            .map_err(|e| QueryError::Storage(e.to_string()))?;
        let armed = watchdog().arm(deadline, self.db.get_interrupt_handle());
        let result = self.window_in_transaction(name, page, page_size, limits);
        drop(armed);
        let _ = self.trusted(|db| db.execute_batch("COMMIT"));
        self.db.progress_handler(0, None::<fn() -> bool>);
        result
    }

    fn window_in_transaction(
        &mut self,
        name: &str,
        page: u64,
        page_size: Option<u64>,
        limits: Limits,
    ) -> Result<Option<Window>, QueryError> {
        let Some(list) = self.lists()?.remove(name) else {
            return Ok(None);
        };
        let checkpoint = self
            .trusted(|db| DB.checkpoint(db))
            .map_err(|e| QueryError::Storage(e.to_string()))?;
        // At most the list's page size, and never more rows than any query may return.
        let most = list.page_size.min(limits.rows as u64).max(1);
        let page_size = page_size.unwrap_or(most).clamp(1, most);
        let offset = page
            .checked_mul(page_size)
            .filter(|o| *o <= i64::MAX as u64);
        let Some(offset) = offset else {
            return Err(QueryError::Invalid(format!("page {page} is out of range")));
        };
        let (_, count) = self.statement(
            &format!("SELECT count(*) FROM ({})", list.query),
            &Params::default(),
            limits,
        )?;
        let total = match count.first().and_then(|row| row.first()) {
            Some(Value::Integer(n)) => *n as u64,
            _ => 0,
        };
        let (columns, rows) = self.statement(
            &format!("SELECT * FROM ({}) LIMIT ?1 OFFSET ?2", list.query),
            &Params::Positional(vec![
                Value::Integer(page_size as i64),
                Value::Integer(offset as i64),
            ]),
            Limits {
                rows: page_size as usize,
                ..limits
            },
        )?;
        Ok(Some(Window {
            page,
            page_size,
            total,
            columns,
            rows,
            checkpoint,
        }))
    }

    /// Prepares and runs one read-only statement: its column names and rows.
    #[allow(clippy::type_complexity)]
    fn statement(
        &mut self,
        sql: &str,
        params: &Params,
        limits: Limits,
    ) -> Result<(Vec<String>, Vec<Vec<Value>>), QueryError> {
        let mut batch = rusqlite::Batch::new(&self.db, sql);
        let mut statement = match batch.next() {
            Ok(Some(statement)) => statement,
            Ok(None) => {
                return Err(QueryError::Invalid(
                    "the query is empty: give one SELECT statement".into(),
                ))
            }
            Err(error) => return Err(self.explain(error, limits)),
        };
        match batch.next() {
            Ok(None) => {}
            Ok(Some(_)) | Err(_) => {
                return Err(QueryError::Refused(
                    "more than one statement: give exactly one SELECT per query".into(),
                ))
            }
        }
        if !statement.readonly() {
            return Err(QueryError::Refused(
                "the statement writes, which is refused: queries are read-only".into(),
            ));
        }
        bind(&mut statement, params)?;
        let columns: Vec<String> = statement
            .column_names()
            .iter()
            .map(|c| c.to_string())
            .collect();
        let width = columns.len();
        if width > MAX_COLUMNS {
            return Err(QueryError::Refused(format!(
                "the query returns {width} columns; at most {MAX_COLUMNS}: select fewer"
            )));
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut rows = statement.raw_query();
        loop {
            match rows.next() {
                Ok(Some(row)) => {
                    if out.len() == limits.rows {
                        return Err(QueryError::RowLimit(limits.rows));
                    }
                    let mut values = Vec::with_capacity(width);
                    for n in 0..width {
                        // Sized where SQLite holds it, before anything is copied.
                        let value = row
                            .get_ref(n)
                            .map_err(|e| QueryError::Storage(e.to_string()))?;
                        bytes += match value {
                            ValueRef::Text(t) | ValueRef::Blob(t) => t.len(),
                            _ => 8,
                        };
                        if bytes > MAX_RESULT_BYTES {
                            return Err(QueryError::TooLarge(MAX_RESULT_BYTES));
                        }
                        values.push(crate::functions::owned(value));
                    }
                    out.push(values);
                }
                Ok(None) => break,
                Err(error) => return Err(self.explain(error, limits)),
            }
        }
        Ok((columns, out))
    }

    fn explain(&self, error: rusqlite::Error, limits: Limits) -> QueryError {
        if let Some(reason) = self
            .refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return QueryError::Refused(reason);
        }
        match &error {
            rusqlite::Error::SqliteFailure(failure, _)
                if failure.code == ErrorCode::OperationInterrupted =>
            {
                QueryError::TimeLimit(limits.time)
            }
            rusqlite::Error::SqliteFailure(failure, _)
                if matches!(
                    failure.code,
                    ErrorCode::DatabaseBusy
                        | ErrorCode::DatabaseLocked
                        | ErrorCode::SystemIoFailure
                        | ErrorCode::DatabaseCorrupt
                        | ErrorCode::OutOfMemory
                        | ErrorCode::DiskFull
                        | ErrorCode::CannotOpen
                        | ErrorCode::NotADatabase
                ) =>
            {
                QueryError::Storage(error.to_string())
            }
            rusqlite::Error::SqliteFailure(failure, _) if failure.code == ErrorCode::TooBig => {
                QueryError::TooLarge(MAX_RESULT_BYTES)
            }
            rusqlite::Error::SqliteFailure(failure, _)
                if failure.code == ErrorCode::ReadOnly
                    || failure.code == ErrorCode::AuthorizationForStatementDenied =>
            {
                QueryError::Refused(format!("{error}: queries are read-only"))
            }
            rusqlite::Error::SqlInputError { .. } | rusqlite::Error::SqliteFailure(..) => {
                let mut message = error.to_string();
                if message.contains("no such table") {
                    if let Ok(tables) = self.trusted(describe) {
                        let names: Vec<&String> = tables.keys().collect();
                        message = if names.is_empty() {
                            format!("{message} (this stream has no tables yet: put a _schema file)")
                        } else {
                            format!("{message} (this stream's tables: {names:?})")
                        };
                    }
                }
                QueryError::Invalid(message)
            }
            _ => QueryError::Invalid(error.to_string()),
        }
    }
}

fn bind(statement: &mut rusqlite::Statement<'_>, params: &Params) -> Result<(), QueryError> {
    let expected = statement.parameter_count();
    let invalid = |e: rusqlite::Error| QueryError::Invalid(format!("binding parameters: {e}"));
    match params {
        Params::Positional(values) => {
            if values.len() != expected {
                return Err(QueryError::Invalid(format!(
                    "the query has {expected} parameter(s), {} given",
                    values.len()
                )));
            }
            for (n, value) in values.iter().enumerate() {
                statement
                    .raw_bind_parameter(n + 1, value)
                    .map_err(invalid)?;
            }
        }
        Params::Named(values) => {
            if values.len() != expected {
                return Err(QueryError::Invalid(format!(
                    "the query has {expected} parameter(s), {} given",
                    values.len()
                )));
            }
            for (name, value) in values {
                let candidates = if name.starts_with([':', '@', '$']) {
                    vec![name.clone()]
                } else {
                    vec![format!(":{name}"), format!("@{name}"), format!("${name}")]
                };
                let mut index = None;
                for candidate in &candidates {
                    if let Some(found) = statement.parameter_index(candidate).map_err(invalid)? {
                        index = Some(found);
                        break;
                    }
                }
                let index = index.ok_or_else(|| {
                    QueryError::Invalid(format!(
                        "the query has no parameter named {name:?} (write :{name} in the SQL)",
                        name = name.trim_start_matches([':', '@', '$'])
                    ))
                })?;
                statement
                    .raw_bind_parameter(index, value)
                    .map_err(invalid)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slow_lane_lets_its_few_on_and_the_others_wait_until_their_deadline() {
        let lane: &'static SlowLane = Box::leak(Box::new(SlowLane {
            running: Mutex::new(0),
            freed: std::sync::Condvar::new(),
            max: 1,
        }));
        let first = lane.turn(Instant::now() + Duration::from_secs(5)).unwrap();
        let waited = Instant::now();
        assert!(lane
            .turn(Instant::now() + Duration::from_millis(50))
            .is_none());
        assert!(waited.elapsed() >= Duration::from_millis(50));
        // A waiter gets the turn as soon as it is given back.
        let waiter = std::thread::spawn(move || {
            lane.turn(Instant::now() + Duration::from_secs(30))
                .is_some()
        });
        drop(first);
        assert!(waiter.join().unwrap());
        assert_eq!(*lane.running.lock().unwrap(), 0);
    }

    #[test]
    fn a_query_past_its_deadline_is_stopped_by_its_progress_handler() {
        let mut handler = progress(Instant::now() + Duration::from_millis(20));
        assert!(!handler());
        std::thread::sleep(Duration::from_millis(30));
        assert!(handler());
    }
}
