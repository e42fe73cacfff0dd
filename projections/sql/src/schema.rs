//! The `_schema` file: which tables a stream's records go to, their columns and indexes.
//!
//! ```json
//! {"schema": {"post": {"title": "fulltext", "votes": "int"}},
//!  "indexes": [["post", "votes"], ["post", "timestamp", "votes"]]}
//! ```
//! Names match `^[A-Za-z][_a-zA-Z0-9]*$`. Types: `int`, `real` (or `float`), `text`, `datetime`,
//! `fulltext`. Every table also has the implicit columns `id`, `timestamp` and `score`, so fields
//! may not use those names. An index entry is the table and then one or more columns: one
//! compound index.
//!
//! `"lists"` (optional) names read-only queries that clients bind to over the live binding
//! (`/socksync`): `{"latest": {"query": "SELECT ...", "page_size": 25}}`. Each query is checked
//! here against the schema's tables (one read-only statement, no parameters); `page_size` is the
//! most rows one page may hold (1 to [`MAX_PAGE_SIZE`], default [`DEFAULT_PAGE_SIZE`]).

use std::collections::BTreeMap;

use serde_json::Value as Json;

/// The implicit columns every table has, in column order.
pub const IMPLICIT: [&str; 3] = ["id", "timestamp", "score"];

/// Field names SQLite (the row id) or FTS5 (`rank`) reserve.
pub const RESERVED: [&str; 4] = ["rowid", "oid", "_rowid_", "rank"];

/// Most fields of one table (SQLite allows 2,000 columns; the implicit ones take three).
pub const MAX_FIELDS: usize = 1_000;

/// Most rows one page of a list may hold.
pub const MAX_PAGE_SIZE: u64 = 1_000;

/// A list's page size when its definition gives none.
pub const DEFAULT_PAGE_SIZE: u64 = 25;

/// Longest query of a list, in bytes.
pub const MAX_LIST_QUERY: usize = 16 * 1024;

/// Most lists one schema may declare.
pub const MAX_LISTS: usize = 256;

/// A named, read-only query a client may bind to, page by page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct List {
    /// One read-only SELECT, without parameters.
    pub query: String,
    /// The most rows one page may hold.
    pub page_size: u64,
}

/// Suffix of the FTS5 table that indexes a table's `fulltext` columns.
pub const FTS_SUFFIX: &str = "_fts";

/// A column type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// `int`: INTEGER affinity.
    Int,
    /// `real` or `float`: REAL affinity.
    Real,
    /// `text`: TEXT affinity.
    Text,
    /// `datetime`: NUMERIC affinity (ISO-8601 text stays text, numbers stay numbers), so
    /// SQLite's date functions work on it.
    Datetime,
    /// `fulltext`: TEXT, and indexed by the table's FTS5 table `<table>_fts`.
    Fulltext,
}

impl Type {
    fn parse(text: &str) -> Option<Type> {
        Some(match text {
            "int" => Type::Int,
            "real" | "float" => Type::Real,
            "text" => Type::Text,
            "datetime" => Type::Datetime,
            "fulltext" => Type::Fulltext,
            _ => return None,
        })
    }

    /// The SQL declared type.
    pub fn sql(self) -> &'static str {
        match self {
            Type::Int => "INTEGER",
            Type::Real => "REAL",
            Type::Text | Type::Fulltext => "TEXT",
            Type::Datetime => "DATETIME",
        }
    }
}

/// A parsed, valid schema.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Schema {
    /// Tables by name, each with its fields by name (both in name order: column order is the
    /// same on every node).
    pub tables: BTreeMap<String, BTreeMap<String, Type>>,
    /// Indexes: table, then columns.
    pub indexes: Vec<(String, Vec<String>)>,
    /// Lists by name.
    pub lists: BTreeMap<String, List>,
    /// The statements that insert a record into each table, made once.
    inserts: BTreeMap<String, Insert>,
}

/// How a record goes into one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// `INSERT INTO "t" (id, timestamp, score, <fields>) VALUES (?, ...)`.
    pub row: String,
    /// `INSERT INTO "t_fts" (rowid, <fulltext fields>) VALUES (?, ...)`, if the table has any.
    pub fulltext: Option<String>,
    /// The fulltext fields, in the order of `fulltext`'s parameters.
    pub fulltext_fields: Vec<String>,
}

fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic())
        && bytes.all(|b| b == b'_' || b.is_ascii_alphanumeric())
        && name.len() <= 64
}

impl Schema {
    /// Parses and checks a `_schema` file. The error names the first problem found.
    pub fn parse(bytes: &[u8]) -> Result<Schema, String> {
        let schema = Schema::parse_stored(bytes)?;
        schema.dry_run()?;
        Ok(schema)
    }

    /// Parses a schema that was checked when it was stored (every stored schema passed
    /// [`Schema::parse`]): the same answer without creating its tables in a scratch database.
    pub fn parse_stored(bytes: &[u8]) -> Result<Schema, String> {
        let json: Json = serde_json::from_slice(bytes)
            .map_err(|error| format!("_schema is not valid JSON: {error}"))?;
        let Json::Object(top) = json else {
            return Err("_schema must be a JSON object with \"schema\" and \"indexes\"".into());
        };
        if let Some(key) = top
            .keys()
            .find(|k| !["schema", "indexes", "lists"].contains(&k.as_str()))
        {
            return Err(format!(
                "_schema has an unknown key {key:?}: only \"schema\", \"indexes\" and \"lists\" are allowed"
            ));
        }
        let Some(Json::Object(tables)) = top.get("schema") else {
            return Err(
                "_schema needs \"schema\": an object of tables, each an object of field: type"
                    .into(),
            );
        };
        let mut schema = Schema::default();
        let mut lower_names = BTreeMap::new();
        for (table, fields) in tables {
            if !valid_name(table) {
                return Err(format!(
                    "table name {table:?} must match ^[A-Za-z][_a-zA-Z0-9]*$ (at most 64 characters)"
                ));
            }
            if table.to_ascii_lowercase().starts_with("sqlite") {
                return Err(format!(
                    "table name {table:?} starts with \"sqlite\", which SQLite reserves"
                ));
            }
            if let Some(other) = lower_names.insert(table.to_ascii_lowercase(), table.clone()) {
                return Err(format!(
                    "tables {other:?} and {table:?} differ only in case: SQL names are case-insensitive"
                ));
            }
            let Json::Object(fields) = fields else {
                return Err(format!(
                    "table {table:?} must be an object of field: type, e.g. {{\"title\": \"text\"}}"
                ));
            };
            if fields.len() > MAX_FIELDS {
                return Err(format!(
                    "table {table:?} has {} fields; at most {MAX_FIELDS}",
                    fields.len()
                ));
            }
            let mut columns = BTreeMap::new();
            let mut lower_fields = BTreeMap::new();
            for (field, kind) in fields {
                if !valid_name(field) {
                    return Err(format!(
                        "field name {field:?} of table {table:?} must match ^[A-Za-z][_a-zA-Z0-9]*$ (at most 64 characters)"
                    ));
                }
                let lower = field.to_ascii_lowercase();
                if IMPLICIT.contains(&lower.as_str()) {
                    return Err(format!(
                        "field {field:?} of table {table:?} is an implicit column (id, timestamp, score): every table has it already"
                    ));
                }
                if RESERVED.contains(&lower.as_str())
                    || lower == format!("{table}{FTS_SUFFIX}").to_ascii_lowercase()
                {
                    return Err(format!(
                        "field {field:?} of table {table:?} has a name SQLite or full-text search reserves ({}, or the table's name + {FTS_SUFFIX:?}): rename it",
                        RESERVED.join(", ")
                    ));
                }
                if let Some(other) = lower_fields.insert(lower, field.clone()) {
                    return Err(format!(
                        "fields {other:?} and {field:?} of table {table:?} differ only in case"
                    ));
                }
                let kind = kind.as_str().and_then(Type::parse).ok_or_else(|| {
                    format!(
                        "field {field:?} of table {table:?} has type {kind}: use int, real (or float), text, datetime or fulltext"
                    )
                })?;
                columns.insert(field.clone(), kind);
            }
            schema.tables.insert(table.clone(), columns);
        }
        for (table, fields) in &schema.tables {
            let fts = format!("{table}{FTS_SUFFIX}").to_ascii_lowercase();
            if fields.values().any(|t| *t == Type::Fulltext) {
                if let Some(other) = lower_names.get(&fts) {
                    return Err(format!(
                        "table {other:?} has the name of table {table:?}'s full-text index: rename one"
                    ));
                }
            }
        }
        match top.get("indexes") {
            None | Some(Json::Null) => {}
            Some(Json::Array(indexes)) => {
                for (n, index) in indexes.iter().enumerate() {
                    schema.indexes.push(parse_index(&schema, n, index)?);
                }
            }
            Some(_) => {
                return Err("\"indexes\" must be a list of [table, column, ...] lists".into())
            }
        }
        match top.get("lists") {
            None | Some(Json::Null) => {}
            Some(Json::Object(lists)) => {
                if lists.len() > MAX_LISTS {
                    return Err(format!("\"lists\" names {} lists; at most {MAX_LISTS}", lists.len()));
                }
                for (name, list) in lists {
                    schema.lists.insert(name.clone(), parse_list(name, list)?);
                }
            }
            Some(_) => {
                return Err(
                    "\"lists\" must be an object of name: {\"query\": \"SELECT ...\", \"page_size\": N}"
                        .into(),
                )
            }
        }
        for (table, fields) in &schema.tables {
            let columns: String = fields.keys().map(|f| format!(", \"{f}\"")).collect();
            let marks = ", ?".repeat(fields.len());
            let fulltext_fields: Vec<String> = fields
                .iter()
                .filter(|(_, t)| **t == Type::Fulltext)
                .map(|(f, _)| f.clone())
                .collect();
            let fulltext = (!fulltext_fields.is_empty()).then(|| {
                let columns: String = fulltext_fields
                    .iter()
                    .map(|f| format!(", \"{f}\""))
                    .collect();
                let marks = ", ?".repeat(fulltext_fields.len());
                format!("INSERT INTO \"{table}{FTS_SUFFIX}\" (rowid{columns}) VALUES (?{marks})")
            });
            let insert = Insert {
                row: format!(
                    "INSERT INTO \"{table}\" (id, timestamp, score{columns}) VALUES (?, ?, ?{marks})"
                ),
                fulltext,
                fulltext_fields,
            };
            schema.inserts.insert(table.clone(), insert);
        }
        Ok(schema)
    }

    /// Creates the schema's tables in an empty in-memory database, so that anything SQLite
    /// itself would refuse (a name an FTS5 table needs, say) is refused here, when the schema is
    /// put, and never stops a node's projection later.
    fn dry_run(&self) -> Result<(), String> {
        let db = rusqlite::Connection::open_in_memory()
            .map_err(|error| format!("checking the schema: {error}"))?;
        for statement in self.create_statements() {
            db.execute(&statement, [])
                .map_err(|error| format!("SQLite refuses this schema: {error}"))?;
        }
        for (name, list) in &self.lists {
            let refused = |error: rusqlite::Error| {
                format!("list {name:?}: SQLite refuses its query: {error}")
            };
            let mut batch = rusqlite::Batch::new(&db, &list.query);
            let statement = batch
                .next()
                .map_err(refused)?
                .ok_or_else(|| format!("list {name:?}: its query is empty"))?;
            if !matches!(batch.next(), Ok(None)) {
                return Err(format!("list {name:?}: its query must be one statement"));
            }
            if !statement.readonly() {
                return Err(format!(
                    "list {name:?}: its query writes; a list is one read-only SELECT"
                ));
            }
            if statement.parameter_count() > 0 {
                return Err(format!(
                    "list {name:?}: its query has parameters; a list's query has none"
                ));
            }
            if statement.column_count() == 0 {
                return Err(format!("list {name:?}: its query returns no columns"));
            }
        }
        Ok(())
    }

    /// How a record goes into `table`, if the schema has it.
    pub fn insert(&self, table: &str) -> Option<&Insert> {
        self.inserts.get(table)
    }

    /// The SQL statements that create every table and index of the schema.
    pub fn create_statements(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (table, fields) in &self.tables {
            let mut columns = vec![
                "id TEXT PRIMARY KEY NOT NULL".to_string(),
                "timestamp INTEGER NOT NULL".to_string(),
                "score INTEGER NOT NULL".to_string(),
            ];
            columns.extend(fields.iter().map(|(f, t)| format!("\"{f}\" {}", t.sql())));
            out.push(format!("CREATE TABLE \"{table}\" ({})", columns.join(", ")));
            if fields.values().any(|t| *t == Type::Fulltext) {
                let columns: Vec<String> = IMPLICIT
                    .iter()
                    .map(|c| format!("{c} UNINDEXED"))
                    .chain(fields.iter().map(|(f, t)| match t {
                        Type::Fulltext => format!("\"{f}\""),
                        _ => format!("\"{f}\" UNINDEXED"),
                    }))
                    .collect();
                out.push(format!(
                    "CREATE VIRTUAL TABLE \"{table}{FTS_SUFFIX}\" USING fts5({}, content='{table}', content_rowid='rowid')",
                    columns.join(", ")
                ));
            }
        }
        for (n, (table, columns)) in self.indexes.iter().enumerate() {
            let quoted: Vec<String> = columns.iter().map(|c| format!("\"{c}\"")).collect();
            out.push(format!(
                "CREATE INDEX \"_quire_index_{n}_{table}\" ON \"{table}\" ({})",
                quoted.join(", ")
            ));
        }
        out
    }

    /// Names of the SQL tables the schema creates (FTS tables first, so dropping in this order
    /// works).
    pub fn table_names(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .tables
            .iter()
            .filter(|(_, fields)| fields.values().any(|t| *t == Type::Fulltext))
            .map(|(table, _)| format!("{table}{FTS_SUFFIX}"))
            .collect();
        out.extend(self.tables.keys().cloned());
        out
    }
}

fn parse_list(name: &str, list: &Json) -> Result<List, String> {
    if !valid_name(name) {
        return Err(format!(
            "list name {name:?} must match ^[A-Za-z][_a-zA-Z0-9]*$ (at most 64 characters)"
        ));
    }
    let Json::Object(fields) = list else {
        return Err(format!(
            "list {name:?} must be an object: {{\"query\": \"SELECT ...\", \"page_size\": N}}"
        ));
    };
    if let Some(key) = fields.keys().find(|k| *k != "query" && *k != "page_size") {
        return Err(format!(
            "list {name:?} has an unknown key {key:?}: only \"query\" and \"page_size\" are allowed"
        ));
    }
    let query = match fields.get("query") {
        Some(Json::String(query)) if !query.trim().is_empty() => query.trim().to_string(),
        _ => {
            return Err(format!(
                "list {name:?} needs \"query\": one read-only SELECT"
            ))
        }
    };
    if query.len() > MAX_LIST_QUERY {
        return Err(format!(
            "list {name:?}: its query is {} bytes; at most {MAX_LIST_QUERY}",
            query.len()
        ));
    }
    // The query becomes a subquery when a page is read: no trailing `;`.
    let query = query
        .trim_end_matches([';', ' ', '\n', '\t', '\r'])
        .to_string();
    let page_size = match fields.get("page_size") {
        None | Some(Json::Null) => DEFAULT_PAGE_SIZE,
        Some(size) => size
            .as_u64()
            .filter(|size| (1..=MAX_PAGE_SIZE).contains(size))
            .ok_or_else(|| {
                format!("list {name:?}: \"page_size\" must be an integer from 1 to {MAX_PAGE_SIZE}")
            })?,
    };
    Ok(List { query, page_size })
}

fn parse_index(schema: &Schema, n: usize, index: &Json) -> Result<(String, Vec<String>), String> {
    let parts: Option<Vec<&str>> = index
        .as_array()
        .map(|parts| parts.iter().map(Json::as_str).collect())
        .unwrap_or(None);
    let parts = match parts {
        Some(parts) if parts.len() >= 2 => parts,
        _ => {
            return Err(format!(
                "index {n} ({index}) must be a list of strings: the table, then one or more columns"
            ))
        }
    };
    let table = parts[0];
    let Some(fields) = schema.tables.get(table) else {
        return Err(format!(
            "index {n} names table {table:?}, which the schema does not define"
        ));
    };
    let mut columns = Vec::new();
    for column in &parts[1..] {
        if !fields.contains_key(*column) && !IMPLICIT.contains(column) {
            return Err(format!(
                "index {n} names column {column:?}, which table {table:?} does not have"
            ));
        }
        if columns.iter().any(|c: &String| c == column) {
            return Err(format!("index {n} names column {column:?} twice"));
        }
        columns.push(column.to_string());
    }
    Ok((table.to_string(), columns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flock_example_parses() {
        let schema = Schema::parse(
            br#"{"schema": {"user": {"handle": "text", "pub_key": "text"},
                 "post": {"user_id": "text", "title": "fulltext", "text": "fulltext", "votes": "float", "at": "datetime"}},
                 "indexes": [["user", "handle"], ["post", "timestamp"], ["post", "score", "user_id"]]}"#,
        )
        .unwrap();
        assert_eq!(schema.tables["post"]["votes"], Type::Real);
        assert_eq!(schema.indexes[2].1, vec!["score", "user_id"]);
        assert_eq!(schema.table_names(), vec!["post_fts", "post", "user"]);
        let statements = schema.create_statements().join(";\n");
        let db = rusqlite::Connection::open_in_memory().unwrap();
        db.execute_batch(&statements).unwrap();
    }

    #[test]
    fn lists_are_checked_against_the_tables() {
        let schema = Schema::parse(
            br#"{"schema": {"m": {"text": "text"}},
                 "lists": {"latest": {"query": "SELECT id, text FROM m ORDER BY timestamp DESC;"},
                           "top": {"query": "SELECT * FROM m ORDER BY score DESC", "page_size": 3}}}"#,
        )
        .unwrap();
        assert_eq!(schema.lists["latest"].page_size, DEFAULT_PAGE_SIZE);
        assert_eq!(
            schema.lists["latest"].query,
            "SELECT id, text FROM m ORDER BY timestamp DESC"
        );
        assert_eq!(schema.lists["top"].page_size, 3);
        let list =
            |list: &str| format!(r#"{{"schema": {{"m": {{"text": "text"}}}}, "lists": {list}}}"#);
        for (bad, says) in [
            (list("[]"), "\"lists\" must be an object"),
            (list(r#"{"1": {"query": "SELECT 1"}}"#), "must match"),
            (list(r#"{"l": "SELECT 1"}"#), "must be an object"),
            (list(r#"{"l": {}}"#), "needs \"query\""),
            (
                list(r#"{"l": {"query": "SELECT 1", "size": 2}}"#),
                "unknown key \"size\"",
            ),
            (
                list(r#"{"l": {"query": "SELECT 1", "page_size": 0}}"#),
                "from 1 to 1000",
            ),
            (
                list(r#"{"l": {"query": "SELECT 1", "page_size": 1001}}"#),
                "from 1 to 1000",
            ),
            (
                list(r#"{"l": {"query": "SELECT * FROM nope"}}"#),
                "no such table",
            ),
            (list(r#"{"l": {"query": "DELETE FROM m"}}"#), "writes"),
            (
                list(r#"{"l": {"query": "SELECT * FROM m WHERE id = ?"}}"#),
                "parameters",
            ),
            (
                list(r#"{"l": {"query": "SELECT 1; SELECT 2"}}"#),
                "one statement",
            ),
        ] {
            let error = Schema::parse(bad.as_bytes()).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn every_problem_is_named() {
        for (bad, says) in [
            ("[]", "JSON object"),
            ("{", "not valid JSON"),
            (r#"{"tables": {}}"#, "unknown key \"tables\""),
            (r#"{"indexes": []}"#, "needs \"schema\""),
            (r#"{"schema": {"1t": {}}}"#, "must match"),
            (r#"{"schema": {"t-t": {}}}"#, "must match"),
            (r#"{"schema": {"sqlite_x": {}}}"#, "reserves"),
            (r#"{"schema": {"t": {}, "T": {}}}"#, "differ only in case"),
            (r#"{"schema": {"t": []}}"#, "must be an object"),
            (r#"{"schema": {"t": {"a b": "int"}}}"#, "must match"),
            (r#"{"schema": {"t": {"ID": "int"}}}"#, "implicit column"),
            (r#"{"schema": {"t": {"score": "int"}}}"#, "implicit column"),
            (r#"{"schema": {"t": {"a": "blob"}}}"#, "has type \"blob\""),
            (r#"{"schema": {"t": {"a": 1}}}"#, "has type 1"),
            (
                r#"{"schema": {"t": {"a": "fulltext"}, "t_fts": {}}}"#,
                "full-text index",
            ),
            (r#"{"schema": {"t": {}}, "indexes": {}}"#, "must be a list"),
            (
                r#"{"schema": {"t": {}}, "indexes": [["t"]]}"#,
                "one or more columns",
            ),
            (
                r#"{"schema": {"t": {}}, "indexes": [["u", "id"]]}"#,
                "does not define",
            ),
            (
                r#"{"schema": {"t": {}}, "indexes": [["t", "x"]]}"#,
                "does not have",
            ),
            (
                r#"{"schema": {"t": {}}, "indexes": [["t", "id", "id"]]}"#,
                "twice",
            ),
        ] {
            let error = Schema::parse(bad.as_bytes()).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }
}
