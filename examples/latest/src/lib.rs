//! `latest`: an example quire projector that keeps, for each `(author, kind)` pair, the newest
//! scribe — a tiny last-writer-wins read model.
//!
//! It exists to show the projector API ([`quire_projection_api::Plugin`] and
//! [`quire_projection_api::Projector`]) end to end in a crate that depends on nothing but the API,
//! and to show the invariant every replicated read model needs: **equal sets of scribes give
//! equal state, in any order and with any duplicates**.
//!
//! # What it keeps
//! One instance for the whole log ([`Scope::Log`]). For every `(author, kind)` pair it has seen,
//! it keeps one [`Entry`]: the author, the kind, the hlc, the id, the content type and the payload
//! *length* (never the payload) of the newest scribe of that pair. "Newest" is decided by the
//! scribes' own `(hlc, id)`: the larger hlc wins, and when two scribes have the same hlc the one
//! with the larger 32-byte id (compared byte by byte) wins. The order in which scribes arrive, and
//! how many times, never matters, so every replica that has the same scribes has the same state
//! and the same [`digest`](quire_projection_api::Projector::digest).
//!
//! # Files
//! An instance keeps one file, `state` ([`STATE_FILE`]), in the directory the daemon gives it. It
//! is UTF-8 text with `\n` line endings:
//!
//! ```text
//! quire-example-latest state v1
//! checkpoint 42
//! entries 2
//! <author> <kind> <hlc> <id> <payload-len> <content-type>
//! <author> <kind> <hlc> <id> <payload-len> <content-type>
//! end
//! ```
//!
//! - `checkpoint`: the last applied local seq (decimal); 0 for an empty state.
//! - `entries`: how many entry lines follow (decimal).
//! - One line per entry, fields separated by one space, in strictly increasing order of
//!   `(author bytes, kind name)` — the same order as [`read_state`] returns them:
//!   `author` and `id` are 64 lowercase hex characters, `kind` is the kind's name (`record.add`,
//!   `x.note`, ...; kind names never contain spaces), `hlc` and `payload-len` are decimal, and
//!   `content-type` is the MIME type with every byte outside `!`..`~` and every `%` written as
//!   `%XX` (two uppercase hex digits), so it has no spaces or line breaks; it may be empty.
//! - `end` closes the file; a file without it (or with anything after it) is corrupt.
//!
//! A `state` file that does not follow this format is reported as a [`ProjectionError`] naming
//! the file and the line; the projection must then be rebuilt (`quire rebuild latest`). A missing
//! `state` file is an empty state.
//!
//! # One transaction per batch
//! [`Projector::apply`] computes the new state in memory and, only if the whole batch is accepted,
//! writes the whole new state — entries and checkpoint together — to `state.tmp`, fsyncs it,
//! renames it over `state` and fsyncs the directory. The rename is atomic, so after a crash at any
//! instant `state` holds either the old or the new state, never a mix: the batch and its checkpoint
//! commit together or not at all. [`Projector::reset`] writes an empty state with checkpoint 0 the
//! same way. A `state.tmp` found by [`Plugin::open`] is the remains of a write that never
//! committed, and is removed. The instance keeps its state in memory (a `BTreeMap`,
//! for a deterministic order), so `apply` never re-reads the file.
//!
//! This is fine for an example and for small states; a real projector with a large state would
//! write increments to a database with transactions instead of rewriting one file per batch.
//!
//! # The poison test hook
//! A scribe of kind `x.fail-latest` ([`POISON_KIND`]) whose payload is exactly `b"poison"`
//! ([`POISON_PAYLOAD`]) is **refused on purpose**: `apply` returns
//! [`ApplyError::Scribe`] with the scribe's index in the batch and commits nothing of the batch.
//! It exists only so that tests of the daemon's quarantine (and of a node running this plugin) can
//! make a projector fail on demand with a scribe anyone may write. Every other scribe — any other
//! payload of `x.fail-latest` included — is accepted.
//!
//! # Registering it with a node
//! A node runs the projectors of the registry it is started with. A binary that wants this one
//! besides the built-in ones builds its registry as
//! `quire::projection::Registry::builtin().with(quire_example_latest::Latest::new())` and passes
//! it to `quire::cli::main_with(registry)` from its `main`. This crate does not depend on `quire`
//! itself; only that small binary does. The projection then shows up as `latest` in
//! `quire projections`, and `quire digest latest` prints its digest.
//!
//! # Digest
//! The digest is a SHA-256 ([`sha256`], implemented in this crate) of a canonical binary form of
//! the entries in `(author, kind)` order; the checkpoint is not part of it. See
//! [`digest_entries`] for the exact bytes.
//!
//! # Example
//! ```
//! use quire_example_latest::{read_state, Latest};
//! use quire_projection_api::{AuthorKey, Kind, Place, Plugin, Scribe, ScribeId};
//!
//! let dir = std::env::temp_dir().join(format!("latest-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let place = Place::new(dir.clone(), None);
//! let mut projector = Latest::new().open(&place)?;
//!
//! let scribe = Scribe {
//!     id: ScribeId([7; 32]),
//!     stream: ScribeId([1; 32]),
//!     author: AuthorKey([2; 32]),
//!     hlc: 1 << 16,
//!     kind: Kind::Custom("x.note".into()),
//!     content_type: "text/plain".into(),
//!     payload: b"hello".to_vec(),
//!     parents: Vec::new(),
//!     local_seq: 1,
//! };
//! projector.apply(&[scribe], 1).expect("applied");
//!
//! let (checkpoint, entries) = read_state(&dir)?;
//! assert_eq!(checkpoint, 1);
//! assert_eq!(entries.len(), 1);
//! assert_eq!(entries[0].payload_len, 5);
//! std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use quire_projection_api::{
    ApplyError, AuthorKey, Kind, Place, Plugin, ProjectionError, Projector, Scope, Scribe, ScribeId,
};

mod sha256;

pub use sha256::sha256;

/// The projection's name.
pub const NAME: &str = "latest";

/// The fingerprint: bump the version whenever the same scribes would give a different state.
pub const FINGERPRINT: &str = "latest v1";

/// The file that holds an instance's committed state.
pub const STATE_FILE: &str = "state";

/// The file a new state is written to before it is renamed over [`STATE_FILE`].
pub const TMP_FILE: &str = "state.tmp";

/// The kind of the poison test hook (see the crate docs).
pub const POISON_KIND: &str = "x.fail-latest";

/// The payload of the poison test hook (see the crate docs).
pub const POISON_PAYLOAD: &[u8] = b"poison";

/// The first line of a state file.
const HEADER: &str = "quire-example-latest state v1";

/// What the digest hashes before the entries.
const DIGEST_DOMAIN: &[u8] = b"quire-example-latest digest v1\n";

/// The newest scribe of one `(author, kind)` pair, without its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Who wrote it.
    pub author: AuthorKey,
    /// Its kind.
    pub kind: Kind,
    /// Its hybrid logical clock.
    pub hlc: u64,
    /// Its id; breaks ties of `hlc`.
    pub id: ScribeId,
    /// The MIME type of its payload.
    pub content_type: String,
    /// The length of its payload in bytes.
    pub payload_len: u64,
}

impl Entry {
    /// The entry a scribe would make.
    pub fn of(scribe: &Scribe) -> Entry {
        Entry {
            author: scribe.author,
            kind: scribe.kind.clone(),
            hlc: scribe.hlc,
            id: scribe.id,
            content_type: scribe.content_type.clone(),
            payload_len: scribe.payload.len() as u64,
        }
    }

    /// Whether this entry's scribe is newer than `other`'s: larger `(hlc, id)`.
    pub fn is_newer_than(&self, other: &Entry) -> bool {
        (self.hlc, self.id) > (other.hlc, other.id)
    }

    fn key(&self) -> Key {
        (self.author, self.kind.as_str().to_string())
    }
}

/// Entries are kept and written in order of author bytes, then kind name.
type Key = (AuthorKey, String);

/// Whether `scribe` is the poison test hook.
pub fn is_poison(scribe: &Scribe) -> bool {
    scribe.kind.as_str() == POISON_KIND && scribe.payload == POISON_PAYLOAD
}

/// The `latest` plugin: register it with a node (see the crate docs) or open instances directly.
#[derive(Debug, Clone, Default)]
pub struct Latest {
    // No configuration yet; the private field keeps room for some without breaking callers.
    _config: (),
}

impl Latest {
    /// The plugin, with no configuration.
    pub fn new() -> Latest {
        Latest::default()
    }
}

impl Plugin for Latest {
    fn name(&self) -> &str {
        NAME
    }

    fn fingerprint(&self) -> String {
        FINGERPRINT.to_string()
    }

    fn scope(&self) -> Scope {
        Scope::Log
    }

    fn open(&self, place: &Place) -> Result<Box<dyn Projector>, ProjectionError> {
        let dir = place.dir.clone();
        fs::create_dir_all(&dir)
            .map_err(|error| ProjectionError::new(format!("{}: {error}", dir.display())))?;
        let tmp = dir.join(TMP_FILE);
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(ProjectionError::new(format!(
                    "cannot remove the uncommitted {}: {error}",
                    tmp.display()
                )))
            }
        }
        let (checkpoint, entries) = load(&dir)?;
        Ok(Box::new(LatestProjector {
            dir,
            checkpoint,
            entries,
        }))
    }
}

/// One instance: the committed state, in memory and in `dir/state`.
#[derive(Debug)]
struct LatestProjector {
    dir: PathBuf,
    checkpoint: u64,
    entries: BTreeMap<Key, Entry>,
}

impl Projector for LatestProjector {
    fn apply(&mut self, batch: &[Scribe], checkpoint: u64) -> Result<(), ApplyError> {
        if let Some(index) = batch.iter().position(is_poison) {
            return Err(ApplyError::Scribe {
                index,
                reason: "poison payload: the latest projector refuses it on purpose (used by \
                         tests of the quarantine)"
                    .to_string(),
            });
        }
        let mut entries = self.entries.clone();
        for scribe in batch {
            let entry = Entry::of(scribe);
            match entries.get(&entry.key()) {
                Some(current) if !entry.is_newer_than(current) => {}
                _ => {
                    entries.insert(entry.key(), entry);
                }
            }
        }
        commit(&self.dir, checkpoint, &entries).map_err(ApplyError::Storage)?;
        self.entries = entries;
        self.checkpoint = checkpoint;
        Ok(())
    }

    fn checkpoint(&self) -> Result<u64, ProjectionError> {
        Ok(self.checkpoint)
    }

    fn reset(&mut self) -> Result<(), ProjectionError> {
        let empty = BTreeMap::new();
        commit(&self.dir, 0, &empty).map_err(ProjectionError)?;
        self.entries = empty;
        self.checkpoint = 0;
        Ok(())
    }

    fn digest(&self) -> Result<[u8; 32], ProjectionError> {
        Ok(digest_entries(self.entries.values()))
    }
}

/// The digest of a state with these entries, which must come in `(author bytes, kind name)` order
/// (the order of [`read_state`]): the SHA-256 of
///
/// - `quire-example-latest digest v1\n`, then the number of entries as a big-endian u64;
/// - for each entry: the author's 32 bytes; the kind name's length (big-endian u32) and bytes; the
///   hlc (big-endian u64); the id's 32 bytes; the content type's length (big-endian u32) and
///   bytes; the payload length (big-endian u64).
pub fn digest_entries<'a>(entries: impl ExactSizeIterator<Item = &'a Entry>) -> [u8; 32] {
    let mut bytes = Vec::with_capacity(DIGEST_DOMAIN.len() + 8 + entries.len() * 128);
    bytes.extend_from_slice(DIGEST_DOMAIN);
    bytes.extend_from_slice(&(entries.len() as u64).to_be_bytes());
    for entry in entries {
        let kind = entry.kind.as_str().as_bytes();
        bytes.extend_from_slice(entry.author.as_bytes());
        bytes.extend_from_slice(&(kind.len() as u32).to_be_bytes());
        bytes.extend_from_slice(kind);
        bytes.extend_from_slice(&entry.hlc.to_be_bytes());
        bytes.extend_from_slice(entry.id.as_bytes());
        bytes.extend_from_slice(&(entry.content_type.len() as u32).to_be_bytes());
        bytes.extend_from_slice(entry.content_type.as_bytes());
        bytes.extend_from_slice(&entry.payload_len.to_be_bytes());
    }
    sha256(&bytes)
}

/// Reads the committed state of the instance kept in `dir`: its checkpoint and its entries in
/// `(author bytes, kind name)` order. A directory without a `state` file holds the empty state
/// `(0, [])`; a `state.tmp` is ignored (it was never committed).
pub fn read_state(dir: &Path) -> Result<(u64, Vec<Entry>), ProjectionError> {
    let (checkpoint, entries) = load(dir)?;
    Ok((checkpoint, entries.into_values().collect()))
}

fn load(dir: &Path) -> Result<(u64, BTreeMap<Key, Entry>), ProjectionError> {
    let path = dir.join(STATE_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok((0, BTreeMap::new())),
        Err(error) => {
            return Err(ProjectionError::new(format!(
                "cannot read {}: {error}",
                path.display()
            )))
        }
    };
    parse(&bytes).map_err(|(line, what)| {
        ProjectionError::new(format!(
            "corrupt state file {}, line {line}: {what}; rebuild the projection \
             (`quire rebuild {NAME}`)",
            path.display()
        ))
    })
}

/// Writes the whole state as one transaction: `state.tmp`, fsync, rename over `state`, fsync of
/// the directory.
fn commit(dir: &Path, checkpoint: u64, entries: &BTreeMap<Key, Entry>) -> Result<(), String> {
    let tmp = dir.join(TMP_FILE);
    let path = dir.join(STATE_FILE);
    let text = render(checkpoint, entries);
    let write = || -> io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, &path)?;
        sync_dir(dir)
    };
    write().map_err(|error| format!("cannot commit {}: {error}", path.display()))
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    // Directories cannot be opened for syncing everywhere; the rename is still atomic.
    Ok(())
}

/// The state file's text (see the crate docs for the format).
fn render(checkpoint: u64, entries: &BTreeMap<Key, Entry>) -> String {
    let mut text = String::with_capacity(64 + entries.len() * 200);
    // Writing to a String cannot fail.
    let _ = writeln!(text, "{HEADER}");
    let _ = writeln!(text, "checkpoint {checkpoint}");
    let _ = writeln!(text, "entries {}", entries.len());
    for entry in entries.values() {
        let _ = writeln!(
            text,
            "{} {} {} {} {} {}",
            entry.author.to_hex(),
            entry.kind,
            entry.hlc,
            entry.id.to_hex(),
            entry.payload_len,
            escape(&entry.content_type)
        );
    }
    text.push_str("end\n");
    text
}

/// Parses a state file; errors are `(line number, what is wrong)`.
fn parse(bytes: &[u8]) -> Result<(u64, BTreeMap<Key, Entry>), (usize, String)> {
    let text = std::str::from_utf8(bytes).map_err(|error| (0, format!("not UTF-8: {error}")))?;
    let body = text.strip_suffix('\n').ok_or_else(|| {
        (
            text.lines().count(),
            "truncated: the file does not end with a line break".to_string(),
        )
    })?;
    let mut lines = body
        .split('\n')
        .enumerate()
        .map(|(at, line)| (at + 1, line));
    let mut next = |what: &str| {
        lines
            .next()
            .ok_or_else(|| (0, format!("truncated: missing the {what} line")))
    };

    let (at, line) = next("header")?;
    if line != HEADER {
        return Err((at, format!("expected {HEADER:?}, found {line:?}")));
    }
    let (at, line) = next("checkpoint")?;
    let checkpoint =
        field_u64(line.strip_prefix("checkpoint "), "checkpoint").map_err(|what| (at, what))?;
    let (at, line) = next("entries")?;
    let count =
        field_u64(line.strip_prefix("entries "), "entry count").map_err(|what| (at, what))?;

    let mut entries = BTreeMap::new();
    let mut last: Option<Key> = None;
    for _ in 0..count {
        let (at, line) = next("entry")?;
        let entry = parse_entry(line).map_err(|what| (at, what))?;
        let key = entry.key();
        if last.as_ref().is_some_and(|last| *last >= key) {
            return Err((
                at,
                "entries are not in strictly increasing (author, kind) order".to_string(),
            ));
        }
        last = Some(key.clone());
        entries.insert(key, entry);
    }
    let (at, line) = next("end")?;
    if line != "end" {
        return Err((
            at,
            format!("expected \"end\" after {count} entries, found {line:?}"),
        ));
    }
    if let Some((at, _)) = lines.next() {
        return Err((at, "unexpected text after \"end\"".to_string()));
    }
    Ok((checkpoint, entries))
}

fn parse_entry(line: &str) -> Result<Entry, String> {
    let fields: Vec<&str> = line.split(' ').collect();
    let [author, kind, hlc, id, payload_len, content_type] = fields[..] else {
        return Err(format!(
            "an entry has 6 fields separated by single spaces, this line has {}",
            fields.len()
        ));
    };
    Ok(Entry {
        author: author
            .parse()
            .map_err(|error| format!("bad author: {error}"))?,
        kind: kind.parse().map_err(|error| format!("bad kind: {error}"))?,
        hlc: field_u64(Some(hlc), "hlc")?,
        id: id.parse().map_err(|error| format!("bad id: {error}"))?,
        payload_len: field_u64(Some(payload_len), "payload length")?,
        content_type: unescape(content_type)?,
    })
}

/// A decimal u64 without sign or padding.
fn field_u64(text: Option<&str>, what: &str) -> Result<u64, String> {
    let text = text.ok_or_else(|| format!("missing the {what}"))?;
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    match text.parse::<u64>() {
        Ok(value) if canonical => Ok(value),
        _ => Err(format!("bad {what} {text:?}: expected a decimal number")),
    }
}

/// Percent-escapes every byte outside `!`..`~` and every `%`.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_graphic() && byte != b'%' {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The inverse of [`escape`]; refuses anything `escape` would not write.
fn unescape(text: &str) -> Result<String, String> {
    let bad = || format!("bad content type {text:?}");
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(byte) = bytes.next() {
        if byte == b'%' {
            let (Some(high), Some(low)) = (bytes.next(), bytes.next()) else {
                return Err(bad());
            };
            let digit = |d: u8| match d {
                b'0'..=b'9' => Some(d - b'0'),
                b'A'..=b'F' => Some(d - b'A' + 10),
                _ => None,
            };
            let (Some(high), Some(low)) = (digit(high), digit(low)) else {
                return Err(bad());
            };
            let value = high << 4 | low;
            if value.is_ascii_graphic() && value != b'%' {
                return Err(bad());
            }
            out.push(value);
        } else if byte.is_ascii_graphic() {
            out.push(byte);
        } else {
            return Err(bad());
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(author: u8, kind: &str, content_type: &str) -> Entry {
        Entry {
            author: AuthorKey([author; 32]),
            kind: kind.parse().unwrap(),
            hlc: 5 << 16 | 3,
            id: ScribeId([author ^ 0x5a; 32]),
            content_type: content_type.to_string(),
            payload_len: 17,
        }
    }

    #[test]
    fn state_text_round_trips() {
        let mut entries = BTreeMap::new();
        for entry in [
            entry(2, "record.add", "application/json"),
            entry(1, "x.b", ""),
            entry(1, "x.a", "text/plain; charset=utf-8 %\n\u{e9}"),
        ] {
            entries.insert(entry.key(), entry);
        }
        let text = render(42, &entries);
        assert!(text.starts_with("quire-example-latest state v1\ncheckpoint 42\nentries 3\n"));
        assert!(text.contains(" text/plain;%20charset=utf-8%20%25%0A%C3%A9\n"));
        assert!(text.ends_with("\nend\n"));
        assert_eq!(parse(text.as_bytes()).unwrap(), (42, entries));
        assert_eq!(parse(render(0, &BTreeMap::new()).as_bytes()).unwrap().0, 0);
    }

    #[test]
    fn corrupt_state_text_is_refused_with_its_line() {
        let mut entries = BTreeMap::new();
        let one = entry(1, "x.a", "text/plain");
        entries.insert(one.key(), one);
        let good = render(7, &entries);
        let cases = [
            (good.replace("state v1", "state v2"), 1),
            (good.replace("checkpoint 7", "checkpoint 07"), 2),
            (good.replace("entries 1", "entries 2"), 5),
            (good.replace(" text/plain", " text plain"), 4),
            (good.replace("x.a", "y.a"), 4),
            (good.replace("\nend\n", "\nend\nmore\n"), 6),
            (good.trim_end().to_string(), 5),
            (good.replace("text/plain", "text%2Fplain"), 4),
        ];
        for (text, line) in cases {
            let (at, what) = parse(text.as_bytes()).expect_err(&text);
            assert_eq!(at, line, "{text:?}: {what}");
        }
    }

    #[test]
    fn newer_is_larger_hlc_then_larger_id() {
        let old = entry(1, "x.a", "");
        let mut later = old.clone();
        later.hlc += 1;
        later.id = ScribeId([0; 32]);
        assert!(later.is_newer_than(&old));
        let mut tie = old.clone();
        tie.id.0[31] ^= 0xff;
        assert_eq!(tie.is_newer_than(&old), tie.id > old.id);
        assert!(!old.is_newer_than(&old));
    }
}
