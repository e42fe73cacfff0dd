//! The SQLite projector on real SQLite: the conformance suite, schema changes, full-text search,
//! upvotes, and the read-only query rules.

use std::time::Duration;

use proptest::prelude::*;
use quire_projection_api::files::FileChange;
use quire_projection_api::testing::{self, scribe};
use quire_projection_api::{AuthorKey, Kind, Place, Plugin, Projector, Scribe, ScribeId};
use quire_projection_sql::{Limits, Params, QueryError, Reader, Sql};
use rusqlite::types::Value;

const STREAM: ScribeId = ScribeId([7; 32]);
const OWNER: AuthorKey = AuthorKey([1; 32]);

fn schema_put(hlc: u64, json: &str) -> Scribe {
    let (kind, payload) = FileChange::Put {
        path: "_schema".into(),
        content_type: "application/json".into(),
        data: json.as_bytes().to_vec(),
    }
    .encode();
    scribe(
        STREAM,
        OWNER,
        hlc,
        kind,
        "application/vnd.quire.file+protobuf",
        payload,
    )
}

fn schema_delete(hlc: u64) -> Scribe {
    let (kind, payload) = FileChange::Delete {
        path: "_schema".into(),
    }
    .encode();
    scribe(
        STREAM,
        OWNER,
        hlc,
        kind,
        "application/vnd.quire.file+protobuf",
        payload,
    )
}

fn record(author: u8, hlc: u64, json: &str) -> Scribe {
    scribe(
        STREAM,
        AuthorKey([author; 32]),
        hlc,
        Kind::RecordAdd,
        "application/json",
        json.as_bytes().to_vec(),
    )
}

fn upvote(author: u8, hlc: u64, of: &Scribe) -> Scribe {
    let mut up = scribe(
        STREAM,
        AuthorKey([author; 32]),
        hlc,
        Kind::RecordUpvote,
        "application/json",
        of.id.0.to_vec(),
    );
    up.parents = vec![of.id];
    up
}

struct Copy {
    _dir: tempfile::TempDir,
    projector: Box<dyn Projector>,
    reader: Reader,
    seq: u64,
}

impl Copy {
    fn new() -> Copy {
        let dir = tempfile::tempdir().unwrap();
        let projector = Sql.open(&Place::new(dir.path(), Some(STREAM))).unwrap();
        let reader = Reader::open(dir.path()).unwrap();
        Copy {
            _dir: dir,
            projector,
            reader,
            seq: 0,
        }
    }

    fn apply(&mut self, scribes: &[Scribe]) {
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
        self.projector.apply(&batch, self.seq).unwrap();
    }

    fn query(&mut self, sql: &str, params: Params) -> Result<Vec<Vec<Value>>, QueryError> {
        self.reader
            .query(sql, &params, Limits::default())
            .map(|rows| rows.rows)
    }

    fn rows(&mut self, sql: &str) -> Vec<Vec<Value>> {
        self.query(sql, Params::default()).unwrap()
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

#[test]
fn records_are_mapped_remapped_and_typed() {
    let mut copy = Copy::new();
    let first = record(
        2,
        5 << 16,
        r#"{"_table": "t", "foo": 10, "bar": "hello", "extra": true}"#,
    );
    // Before any schema: kept, in no table.
    copy.apply(std::slice::from_ref(&first));
    assert!(
        matches!(copy.query("SELECT * FROM t", Params::default()), Err(QueryError::Invalid(m)) if m.contains("no tables yet"))
    );
    copy.apply(&[schema_put(10 << 16, r#"{"schema": {"t": {"foo": "int"}}}"#)]);
    assert_eq!(
        copy.rows("SELECT id, foo, timestamp, score FROM t"),
        vec![vec![
            text(&first.id.to_hex()),
            Value::Integer(10),
            Value::Integer(5),
            Value::Integer(0)
        ]]
    );
    // A new schema adds a column and an index: the stored record is remapped.
    copy.apply(&[schema_put(
        11 << 16,
        r#"{"schema": {"t": {"foo": "int", "bar": "text", "nested": "text", "flag": "int"}}, "indexes": [["t", "foo"]]}"#,
    )]);
    assert_eq!(
        copy.query(
            "SELECT bar FROM t WHERE foo = ?",
            Params::Positional(vec![Value::Integer(10)])
        )
        .unwrap(),
        vec![vec![text("hello")]]
    );
    let plan = copy.rows("EXPLAIN QUERY PLAN SELECT bar FROM t WHERE foo = 10");
    assert!(format!("{plan:?}").contains("USING INDEX"), "{plan:?}");
    // Nested values are JSON text, booleans 0 / 1, missing fields NULL, strings in int columns
    // take the column's affinity.
    copy.apply(&[record(
        3,
        6 << 16,
        r#"{"_table": "t", "foo": "12", "nested": {"a": [1, 2]}, "flag": true}"#,
    )]);
    assert_eq!(
        copy.rows("SELECT foo, bar, nested, flag FROM t WHERE foo = 12"),
        vec![vec![
            Value::Integer(12),
            Value::Null,
            text(r#"{"a":[1,2]}"#),
            Value::Integer(1)
        ]]
    );
    // Not an object, no _table, unknown table: in no table, and nothing fails.
    copy.apply(&[
        record(2, 7 << 16, "[1, 2]"),
        record(2, 8 << 16, "not json"),
        record(2, 9 << 16, r#"{"foo": 1}"#),
        record(2, 9 << 16, r#"{"_table": "nope", "foo": 1}"#),
    ]);
    assert_eq!(
        copy.rows("SELECT count(*) FROM t"),
        vec![vec![Value::Integer(2)]]
    );
    // An older schema arriving late does not win; a delete of _schema empties the tables.
    copy.apply(&[schema_put(1 << 16, r#"{"schema": {"u": {"x": "int"}}}"#)]);
    assert_eq!(
        copy.rows("SELECT count(*) FROM t"),
        vec![vec![Value::Integer(2)]]
    );
    copy.apply(&[schema_delete(12 << 16)]);
    assert!(copy
        .query("SELECT count(*) FROM t", Params::default())
        .is_err());
}

#[test]
fn upvotes_set_score_and_timestamp_by_distinct_authors() {
    let mut copy = Copy::new();
    let post = record(2, 5 << 16, r#"{"_table": "post", "title": "a"}"#);
    // An upvote may be applied before the schema: the score comes from the stored upvotes.
    copy.apply(&[post.clone(), upvote(3, 6 << 16, &post)]);
    copy.apply(&[schema_put(
        1 << 16,
        r#"{"schema": {"post": {"title": "text"}}}"#,
    )]);
    assert_eq!(
        copy.rows("SELECT score, timestamp FROM post"),
        vec![vec![Value::Integer(1), Value::Integer(6)]]
    );
    // The same author again counts once; a second author counts; the newest upvote sets the time.
    copy.apply(&[upvote(3, 9 << 16, &post), upvote(4, 8 << 16, &post)]);
    assert_eq!(
        copy.rows("SELECT score, timestamp FROM post"),
        vec![vec![Value::Integer(2), Value::Integer(9)]]
    );
    // An upvote without a parent is the scribe's problem.
    let mut orphan = upvote(5, 10 << 16, &post);
    orphan.parents.clear();
    orphan.local_seq = 99;
    let refused = copy.projector.apply(&[orphan], 99).unwrap_err();
    assert!(
        refused.to_string().contains("exactly one parent"),
        "{refused}"
    );
}

#[test]
fn fulltext_columns_are_searchable_and_ranked() {
    let mut copy = Copy::new();
    copy.apply(&[schema_put(
        1 << 16,
        r#"{"schema": {"posts": {"title": "fulltext", "body": "fulltext", "votes": "int"}}, "indexes": [["posts", "votes"]]}"#,
    )]);
    let strong = record(
        2,
        2 << 16,
        r#"{"_table": "posts", "title": "needle needle", "body": "a needle in the hay", "votes": 1}"#,
    );
    let weak = record(
        2,
        3 << 16,
        r#"{"_table": "posts", "title": "hay", "body": "one needle among much hay and straw and more words here", "votes": 2}"#,
    );
    let none = record(
        2,
        4 << 16,
        r#"{"_table": "posts", "title": "hay", "body": "nothing", "votes": 3}"#,
    );
    copy.apply(&[weak.clone(), none, strong.clone()]);
    assert_eq!(
        copy.rows("SELECT id FROM posts_fts WHERE posts_fts MATCH 'needle' ORDER BY rank"),
        vec![
            vec![text(&strong.id.to_hex())],
            vec![text(&weak.id.to_hex())]
        ]
    );
    // Column filters, phrase queries, and joins back to the table work.
    assert_eq!(
        copy.rows("SELECT p.votes FROM posts p JOIN posts_fts f ON f.rowid = p.rowid WHERE posts_fts MATCH 'title:needle'"),
        vec![vec![Value::Integer(1)]]
    );
    assert_eq!(
        copy.rows("SELECT votes FROM posts_fts WHERE posts_fts MATCH '\"much hay\"'"),
        vec![vec![Value::Integer(2)]]
    );
    // A schema change rebuilds the index from the stored records.
    copy.apply(&[schema_put(
        5 << 16,
        r#"{"schema": {"posts": {"body": "fulltext"}}}"#,
    )]);
    assert_eq!(
        copy.rows("SELECT count(*) FROM posts_fts WHERE posts_fts MATCH 'straw'"),
        vec![vec![Value::Integer(1)]]
    );
}

#[test]
fn refused_statements_and_limits_say_why_and_change_nothing() {
    let mut copy = Copy::new();
    copy.apply(&[
        schema_put(1 << 16, r#"{"schema": {"t": {"foo": "int"}}}"#),
        record(2, 2 << 16, r#"{"_table": "t", "foo": 1}"#),
    ]);
    let before = copy.projector.digest().unwrap();
    for (sql, says) in [
        (
            "INSERT INTO t (id, timestamp, score, foo) VALUES ('x', 1, 1, 1)",
            "INSERT into t is refused",
        ),
        ("UPDATE t SET foo = 2", "UPDATE of t is refused"),
        ("DELETE FROM t", "DELETE from t is refused"),
        ("DROP TABLE t", "changing the database schema"),
        ("CREATE TABLE x (a)", "changing the database schema"),
        ("CREATE TEMP TABLE x (a)", "refused"),
        ("ALTER TABLE t ADD COLUMN b", "refused"),
        ("BEGIN", "transaction statement is refused"),
        ("ATTACH DATABASE '/tmp/x.db' AS x", "ATTACH is refused"),
        (
            "PRAGMA journal_mode = DELETE",
            "PRAGMA journal_mode is refused",
        ),
        ("PRAGMA user_version = 3", "PRAGMA user_version is refused"),
        ("SELECT load_extension('/tmp/evil')", "load_extension"),
        ("SELECT 1; DELETE FROM t", "more than one statement"),
        (
            "WITH x AS (SELECT 1) DELETE FROM t",
            "DELETE from t is refused",
        ),
        ("VACUUM", "refused"),
        ("REINDEX", "refused"),
        ("ANALYZE", "refused"),
    ] {
        match copy.query(sql, Params::default()) {
            Err(QueryError::Refused(message)) => {
                assert!(message.contains(says), "{sql}: {message}")
            }
            other => panic!("{sql}: expected a refusal, got {other:?}"),
        }
    }
    // Reading pragmas, JSON functions, subqueries and aggregates are allowed.
    copy.rows("PRAGMA table_info(t)");
    assert_eq!(
        copy.rows("SELECT json_extract('{\"a\": 5}', '$.a'), (SELECT max(foo) FROM t), count(*) FROM t WHERE foo LIKE '1%'"),
        vec![vec![Value::Integer(5), Value::Integer(1), Value::Integer(1)]]
    );
    // Bad SQL and bad parameters are invalid, not refused.
    for (sql, params, says) in [
        ("SELEC 1", Params::default(), "syntax error"),
        ("SELECT ?", Params::default(), "1 parameter(s), 0 given"),
        (
            "SELECT :a",
            Params::Named(vec![("b".into(), Value::Null)]),
            "no parameter named \"b\"",
        ),
        ("", Params::default(), "empty"),
    ] {
        match copy.query(sql, params) {
            Err(QueryError::Invalid(message)) => {
                assert!(message.contains(says), "{sql}: {message}")
            }
            other => panic!("{sql}: expected invalid, got {other:?}"),
        }
    }
    assert_eq!(
        copy.query(
            "SELECT :a + @b",
            Params::Named(vec![
                ("a".into(), Value::Integer(1)),
                ("@b".into(), Value::Integer(2))
            ])
        )
        .unwrap(),
        vec![vec![Value::Integer(3)]]
    );
    // The time limit stops a runaway query; the row limit refuses a huge answer.
    let endless =
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n";
    let limits = Limits {
        time: Duration::from_millis(100),
        rows: 10,
    };
    let stopped = copy
        .reader
        .query(endless, &Params::default(), limits)
        .unwrap_err();
    assert_eq!(stopped, QueryError::TimeLimit(Duration::from_millis(100)));
    assert!(
        stopped.to_string().contains("time limit of 100 ms"),
        "{stopped}"
    );
    let many = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 11) SELECT i FROM n";
    let too_many = copy
        .reader
        .query(many, &Params::default(), limits)
        .unwrap_err();
    assert_eq!(too_many, QueryError::RowLimit(10));
    assert_eq!(
        copy.reader
            .query(many, &Params::default(), Limits { rows: 11, ..limits })
            .unwrap()
            .rows
            .len(),
        11
    );
    // The reader still works after all that, and nothing changed.
    assert_eq!(
        copy.rows("SELECT foo FROM t"),
        vec![vec![Value::Integer(1)]]
    );
    assert_eq!(copy.projector.digest().unwrap(), before);
}

#[test]
fn an_invalid_schema_is_the_scribes_problem() {
    let mut copy = Copy::new();
    let mut bad = schema_put(1 << 16, r#"{"schema": {"t": {"id": "int"}}}"#);
    bad.local_seq = 1;
    let refused = copy.projector.apply(&[bad], 1).unwrap_err();
    assert!(refused.to_string().contains("implicit column"), "{refused}");
    assert_eq!(copy.projector.checkpoint().unwrap(), 0);
}

fn scribes() -> impl Strategy<Value = Vec<Scribe>> {
    let schemas = [
        r#"{"schema": {"t": {"foo": "int"}}}"#,
        r#"{"schema": {"t": {"foo": "int", "bar": "fulltext"}, "u": {"x": "real"}}, "indexes": [["t", "foo"]]}"#,
        r#"{"schema": {"u": {"x": "text"}}}"#,
    ];
    let op = prop_oneof![
        (0..3usize, 1..6u64).prop_map(move |(n, t)| (0u8, n, t, 0u8)),
        (1..6u64).prop_map(|t| (1u8, 0, t, 0)),
        (0..4usize, 1..20u64, 2..5u8).prop_map(|(n, t, a)| (2u8, n, t, a)),
        (0..8usize, 1..20u64, 2..5u8).prop_map(|(n, t, a)| (3u8, n, t, a)),
    ];
    proptest::collection::vec(op, 0..24).prop_map(move |ops| {
        let mut out: Vec<Scribe> = Vec::new();
        let mut records: Vec<Scribe> = Vec::new();
        for (what, n, t, author) in ops {
            match what {
                0 => out.push(schema_put(t << 16, schemas[n])),
                1 => out.push(schema_delete(t << 16)),
                2 => {
                    let json = [
                        format!(r#"{{"_table": "t", "foo": {t}, "bar": "word{n} more"}}"#),
                        format!(r#"{{"_table": "u", "x": {t}.5}}"#),
                        format!(r#"{{"_table": "v", "foo": {t}}}"#),
                        "[1]".to_string(),
                    ][n]
                        .clone();
                    let made = record(author, t << 16, &json);
                    records.push(made.clone());
                    out.push(made);
                }
                _ => {
                    if let Some(target) = records.get(n % records.len().max(1)) {
                        out.push(upvote(author, t << 16, target));
                    }
                }
            }
        }
        out
    })
}

#[test]
fn conformance() {
    testing::check_all(&Sql, scribes(), 48).unwrap();
}

#[test]
fn queries_keep_answering_whole_tables_while_a_new_schema_remaps() {
    let mut copy = Copy::new();
    let records: Vec<Scribe> = (0..5000)
        .map(|n| {
            record(
                2,
                (n + 10) << 16,
                &format!(r#"{{"_table": "t", "foo": {n}, "bar": "w{n}"}}"#),
            )
        })
        .collect();
    let mut first = vec![schema_put(1 << 16, r#"{"schema": {"t": {"foo": "int"}}}"#)];
    first.extend(records);
    copy.apply(&first);
    let dir = copy._dir.path().to_path_buf();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut reader = Reader::open(&dir).unwrap();
            let mut answers = 0;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let rows = reader
                    .query(
                        "SELECT count(*), sum(foo) FROM t",
                        &Params::default(),
                        Limits::default(),
                    )
                    .expect("queries keep working during the remap");
                // The old tables or the new ones, whole: never empty, never partial.
                assert_eq!(
                    rows.rows,
                    vec![vec![Value::Integer(5000), Value::Integer(4999 * 5000 / 2)]]
                );
                answers += 1;
                if finished {
                    return answers;
                }
            }
        })
    };
    copy.apply(&[schema_put(
        2 << 16,
        r#"{"schema": {"t": {"foo": "int", "bar": "fulltext"}}, "indexes": [["t", "foo", "bar"]]}"#,
    )]);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(reader.join().unwrap() > 0);
    assert_eq!(
        copy.rows("SELECT count(*) FROM t_fts WHERE t_fts MATCH 'w42'"),
        vec![vec![Value::Integer(1)]]
    );
}

/// One SQL function call never reaches the progress handler or an interrupt (it runs between two
/// VM steps): `instr` over two long strings ran 23 s against a 2 s limit (issue 17). The readers'
/// `instr`, `replace` and two-argument `trim`s are linear, so every call is short and a query of
/// many calls is stopped at its limit. Long LIKE patterns are refused, and a query with more
/// columns than the cap is refused before it runs.
#[test]
fn the_time_limit_holds_for_one_long_function_call() {
    let mut copy = Copy::new();
    copy.apply(&[schema_put(1, r#"{"schema": {"t": {"foo": "int"}}}"#)]);
    let limits = Limits {
        time: Duration::from_millis(200),
        rows: 10,
    };
    // SQLite's own instr is quadratic and ran 16 s here, unstoppable: quire's is linear.
    let long = "SELECT instr(printf('%.*c', 1600000, 'a'), printf('%.*c', 800000, 'a') || 'b')";
    let started = std::time::Instant::now();
    let answer = copy
        .reader
        .query(long, &Params::default(), Limits::default())
        .unwrap();
    assert_eq!(answer.rows, vec![vec![Value::Integer(0)]]);
    let replaced =
        "SELECT length(replace(printf('%.*c', 1600000, 'a'), printf('%.*c', 800000, 'a'), 'b')), \
                    length(trim(printf('%.*c', 1600000, 'a'), printf('%.*c', 800000, 'b') || 'a'))";
    let answer = copy
        .reader
        .query(replaced, &Params::default(), Limits::default())
        .unwrap();
    assert_eq!(
        answer.rows,
        vec![vec![Value::Integer(2), Value::Integer(0)]]
    );
    // Many calls are stopped between two of them, from outside (the watchdog) or by the
    // progress handler.
    let many = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000) \
                SELECT sum(instr(printf('%.*c', 100000, 'a') || i, 'b')) FROM n";
    let stopped = copy
        .reader
        .query(many, &Params::default(), limits)
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(stopped, QueryError::TimeLimit(Duration::from_millis(200)));
    // Unstopped, these take minutes; the margin is for a loaded machine.
    assert!(
        took < Duration::from_secs(5),
        "answered or stopped only after {took:?}"
    );
    let pattern = format!("SELECT 'a' LIKE '{}'", "%a".repeat(10_000));
    let refused = copy
        .reader
        .query(&pattern, &Params::default(), limits)
        .unwrap_err();
    assert!(
        matches!(&refused, QueryError::Invalid(m) if m.contains("LIKE or GLOB pattern too complex")),
        "{refused:?}"
    );
    let columns: Vec<String> = (0..=quire_projection_sql::query::MAX_COLUMNS)
        .map(|n| n.to_string())
        .collect();
    let wide = format!("SELECT {}", columns.join(", "));
    let refused = copy
        .reader
        .query(&wide, &Params::default(), limits)
        .unwrap_err();
    assert!(
        matches!(&refused, QueryError::Refused(m) if m.contains("columns")),
        "{refused:?}"
    );
    // The reader answers the next query: no interrupt is left over for it.
    assert_eq!(copy.rows("SELECT 1"), vec![vec![Value::Integer(1)]]);
}
