//! Linear-time versions of the SQL functions whose built-in versions are quadratic in their
//! arguments' lengths: `instr(X, Y)`, `replace(X, Y, Z)` and the two-argument `trim`, `ltrim`,
//! `rtrim`. One call of a built-in runs between two steps of SQLite's virtual machine, so neither
//! the progress handler nor `sqlite3_interrupt` can stop it: `instr` over two strings of a few
//! MB ran for tens of seconds against a 2 s limit. These give the same answers as SQLite's own
//! (the same NULL, type and character rules) in time linear in their input, so every query
//! stays stoppable at its time limit. Readers install them on their connections ([`install`]).

use std::collections::HashMap;

use memchr::memmem;
use rusqlite::functions::{Context, FunctionFlags};
use rusqlite::types::{Value, ValueRef};
use rusqlite::Connection;

/// Replaces the quadratic built-ins on `db` with the linear versions.
pub fn install(db: &Connection) -> rusqlite::Result<()> {
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    db.create_scalar_function("instr", 2, flags, instr)?;
    db.create_scalar_function("replace", 3, flags, replace)?;
    db.create_scalar_function("trim", 2, flags, |ctx| trim(ctx, "trim", true, true))?;
    db.create_scalar_function("ltrim", 2, flags, |ctx| trim(ctx, "ltrim", true, false))?;
    db.create_scalar_function("rtrim", 2, flags, |ctx| trim(ctx, "rtrim", false, true))?;
    Ok(())
}

thread_local! {
    /// A connection with SQLite's own functions, for calls with a real argument.
    static BUILTIN: Option<Connection> = Connection::open_in_memory().ok();
}

/// `call` (e.g. `instr(?1, ?2)`) answered by SQLite's own function, when an argument is a real:
/// its text is SQLite's business, and at most a few dozen bytes, so the call is cheap.
fn builtin(ctx: &Context<'_>, call: &str) -> Option<rusqlite::Result<Value>> {
    let args: Vec<Value> = (0..ctx.len()).map(|n| owned(ctx.get_raw(n))).collect();
    if !args.iter().any(|a| matches!(a, Value::Real(_))) {
        return None;
    }
    Some(BUILTIN.with(|db| match db {
        Some(db) => db.query_row(
            &format!("SELECT {call}"),
            rusqlite::params_from_iter(args.iter()),
            |row| Ok(owned(row.get_ref(0)?)),
        ),
        None => Err(rusqlite::Error::InvalidQuery),
    }))
}

/// Argument `n` as SQLite's `sqlite3_value_text` gives it (`None`: NULL); never a real.
fn text(ctx: &Context<'_>, n: usize) -> Option<Vec<u8>> {
    match ctx.get_raw(n) {
        ValueRef::Null => None,
        ValueRef::Integer(i) => Some(i.to_string().into_bytes()),
        ValueRef::Real(r) => Some(r.to_string().into_bytes()),
        ValueRef::Text(t) | ValueRef::Blob(t) => Some(t.to_vec()),
    }
}

/// A value as an owned one; text that is not UTF-8 is read lossily (rusqlite's own conversion
/// would panic on it).
pub fn owned(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        other => Value::from(other),
    }
}

/// Bytes SQLite returns as text (lossy only where the input was not UTF-8).
fn into_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn is_continuation(byte: u8) -> bool {
    byte & 0xc0 == 0x80
}

/// `instr(X, Y)`: 1 + the characters (bytes, if both are blobs) of X before the first Y; 0 if
/// none; 1 if Y is empty; NULL if either is NULL.
fn instr(ctx: &Context<'_>) -> rusqlite::Result<Value> {
    if let Some(answer) = builtin(ctx, "instr(?1, ?2)") {
        return answer;
    }
    let blobs = matches!(
        (ctx.get_raw(0), ctx.get_raw(1)),
        (ValueRef::Blob(_), ValueRef::Blob(_))
    );
    let (Some(haystack), Some(needle)) = (text(ctx, 0), text(ctx, 1)) else {
        return Ok(Value::Null);
    };
    if needle.is_empty() {
        return Ok(Value::Integer(1));
    }
    // SQLite tries a match at byte 0 and at every byte that starts a character.
    let found = memmem::find_iter(&haystack, &needle)
        .find(|&at| blobs || at == 0 || !is_continuation(haystack[at]));
    Ok(Value::Integer(match found {
        None => 0,
        Some(at) if blobs => at as i64 + 1,
        Some(at) => {
            let starts = haystack[..at]
                .iter()
                .enumerate()
                .filter(|(n, byte)| *n == 0 || !is_continuation(**byte))
                .count();
            starts as i64 + 1
        }
    }))
}

/// `replace(X, Y, Z)`: X with every Y, left to right and not overlapping, replaced by Z; X (as
/// text) if Y is empty or starts with a NUL byte; NULL if X, Y, or (for a non-empty Y) Z is NULL.
fn replace(ctx: &Context<'_>) -> rusqlite::Result<Value> {
    if let Some(answer) = builtin(ctx, "replace(?1, ?2, ?3)") {
        return answer;
    }
    let Some(string) = text(ctx, 0) else {
        return Ok(Value::Null);
    };
    let Some(pattern) = text(ctx, 1) else {
        return Ok(Value::Null);
    };
    // SQLite reads Y's first byte as a C string's: a Y that starts with a NUL counts as empty.
    if pattern.first().is_none_or(|&byte| byte == 0) {
        // X, as text.
        return Ok(Value::Text(into_text(string)));
    }
    let Some(replacement) = text(ctx, 2) else {
        return Ok(Value::Null);
    };
    let mut out = Vec::with_capacity(string.len());
    let mut from = 0;
    for at in memmem::find_iter(&string, &pattern) {
        out.extend_from_slice(&string[from..at]);
        out.extend_from_slice(&replacement);
        from = at + pattern.len();
    }
    out.extend_from_slice(&string[from..]);
    Ok(Value::Text(into_text(out)))
}

/// The characters of `set` as SQLite splits them: a byte, then its continuation bytes.
fn characters(set: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < set.len() {
        let mut end = start + 1;
        if set[start] >= 0xc0 {
            while end < set.len() && is_continuation(set[end]) {
                end += 1;
            }
        }
        out.push(&set[start..end]);
        start = end;
    }
    out
}

/// `trim(X, Y)` (and `ltrim`, `rtrim`): X without the characters of Y at its start and/or end;
/// NULL if either is NULL. Where two characters of Y match, the first in Y counts, as SQLite's.
fn trim(ctx: &Context<'_>, name: &str, left: bool, right: bool) -> rusqlite::Result<Value> {
    if let Some(answer) = builtin(ctx, &format!("{name}(?1, ?2)")) {
        return answer;
    }
    let (Some(string), Some(mut set)) = (text(ctx, 0), text(ctx, 1)) else {
        return Ok(Value::Null);
    };
    // SQLite walks Y as a C string: its characters end at the first NUL.
    if let Some(nul) = set.iter().position(|&byte| byte == 0) {
        set.truncate(nul);
    }
    let chars = characters(&set);
    let mut first: HashMap<&[u8], usize> = HashMap::new();
    for (n, c) in chars.iter().enumerate() {
        first.entry(c).or_insert(n);
    }
    let mut lengths: Vec<usize> = chars.iter().map(|c| c.len()).collect();
    lengths.sort_unstable();
    lengths.dedup();
    // The first character of Y (by its place in Y) that `at` starts or ends with: its length.
    let matching = |part: &[u8], at_start: bool| {
        lengths
            .iter()
            .filter(|&&len| len <= part.len())
            .filter_map(|&len| {
                let piece = if at_start {
                    &part[..len]
                } else {
                    &part[part.len() - len..]
                };
                first.get(piece).map(|n| (*n, len))
            })
            .min()
            .map(|(_, len)| len)
    };
    let (mut start, mut end) = (0, string.len());
    if !chars.is_empty() {
        if left {
            while let Some(len) = matching(&string[start..end], true) {
                start += len;
            }
        }
        if right {
            while let Some(len) = matching(&string[start..end], false) {
                end -= len;
            }
        }
    }
    Ok(Value::Text(into_text(string[start..end].to_vec())))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rusqlite::types::Value;
    use rusqlite::Connection;

    /// What `sql` answers with SQLite's own functions and with ours.
    fn both(sql: &str, params: &[Value]) -> (rusqlite::Result<Value>, rusqlite::Result<Value>) {
        let builtin = Connection::open_in_memory().unwrap();
        let ours = Connection::open_in_memory().unwrap();
        super::install(&ours).unwrap();
        let run = |db: &Connection| {
            db.query_row(sql, rusqlite::params_from_iter(params.iter()), |row| {
                Ok(super::owned(row.get_ref(0)?))
            })
        };
        (run(&builtin), run(&ours))
    }

    fn value() -> impl Strategy<Value = Value> {
        let text = proptest::collection::vec(
            prop_oneof![Just('a'), Just('b'), Just('é'), Just('😀'), Just(' ')],
            0..8,
        )
        .prop_map(|chars| chars.into_iter().collect::<String>());
        prop_oneof![
            Just(Value::Null),
            (-20i64..200).prop_map(Value::Integer),
            prop_oneof![Just(0.5), Just(1.0), Just(-2.25), Just(1e20), Just(3.0e-7)]
                .prop_map(Value::Real),
            text.clone().prop_map(Value::Text),
            text.prop_map(|t| Value::Blob(t.into_bytes())),
            proptest::collection::vec(any::<u8>(), 0..6).prop_map(Value::Blob),
            // NUL bytes, which SQLite's C code reads as a string's end in some places.
            proptest::collection::vec(prop_oneof![Just(0u8), Just(b'a'), Just(b' ')], 0..4)
                .prop_map(Value::Blob),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        #[test]
        fn the_same_answers_as_sqlite(a in value(), b in value(), c in value()) {
            for sql in [
                "SELECT instr(?1, ?2)",
                "SELECT replace(?1, ?2, ?3)",
                "SELECT trim(?1, ?2)",
                "SELECT ltrim(?1, ?2)",
                "SELECT rtrim(?1, ?2)",
                "SELECT typeof(replace(?1, ?2, ?3))",
            ] {
                let params = [a.clone(), b.clone(), c.clone()];
                let used = sql.matches('?').count();
                let (builtin, ours) = both(sql, &params[..used]);
                prop_assert_eq!(builtin.ok(), ours.ok(), "{} with {:?}", sql, &params[..used]);
            }
        }
    }
}
