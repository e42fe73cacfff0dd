//! The payloads of the file tree's scribes, and the path rules every node checks.
//!
//! - `file.put` carries [`FilePut`] `{ path, content_type, data }` (protobuf, content type
//!   [`CONTENT_TYPE`]): the newest version of one file.
//! - `file.delete` carries [`FileDelete`] `{ path }`: a tombstone.
//!
//! Per path, the newest scribe by `(hlc, id)` wins, a tombstone included. The SQLite projection
//! reads its table definitions from the file [`SCHEMA_PATH`].

use prost::Message;

use crate::Kind;

/// Content type of `file.put` and `file.delete` payloads.
pub const CONTENT_TYPE: &str = "application/vnd.quire.file+protobuf";

/// Longest path, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;

/// Longest segment (file or directory name), in bytes: what file systems allow.
pub const MAX_SEGMENT_BYTES: usize = 255;

/// The path of a stream's SQL schema (see the SQLite projection).
pub const SCHEMA_PATH: &str = "_schema";

/// The payload of a `file.put` scribe.
#[derive(Clone, PartialEq, Message)]
pub struct FilePut {
    /// Where the file lives in the tree (see [`check_path`]).
    #[prost(string, tag = "1")]
    pub path: String,
    /// Its MIME type, served back on GET.
    #[prost(string, tag = "2")]
    pub content_type: String,
    /// Its bytes.
    #[prost(bytes = "vec", tag = "3")]
    pub data: Vec<u8>,
}

/// The payload of a `file.delete` scribe.
#[derive(Clone, PartialEq, Message)]
pub struct FileDelete {
    /// The path removed.
    #[prost(string, tag = "1")]
    pub path: String,
}

/// A file scribe, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileChange {
    /// A new version of a file.
    Put {
        /// The path.
        path: String,
        /// Its MIME type.
        content_type: String,
        /// Its bytes.
        data: Vec<u8>,
    },
    /// A tombstone.
    Delete {
        /// The path.
        path: String,
    },
}

impl FileChange {
    /// The path it changes.
    pub fn path(&self) -> &str {
        match self {
            FileChange::Put { path, .. } | FileChange::Delete { path } => path,
        }
    }

    /// The kind and payload of a scribe making this change.
    pub fn encode(&self) -> (Kind, Vec<u8>) {
        match self {
            FileChange::Put {
                path,
                content_type,
                data,
            } => (
                Kind::FilePut,
                FilePut {
                    path: path.clone(),
                    content_type: content_type.clone(),
                    data: data.clone(),
                }
                .encode_to_vec(),
            ),
            FileChange::Delete { path } => (
                Kind::FileDelete,
                FileDelete { path: path.clone() }.encode_to_vec(),
            ),
        }
    }

    /// A file scribe's change; `Ok(None)` for other kinds; an error naming the problem for a
    /// payload that does not decode or a path that breaks [`check_path`].
    pub fn decode(kind: &Kind, payload: &[u8]) -> Result<Option<FileChange>, String> {
        let change = match kind {
            Kind::FilePut => {
                let put = FilePut::decode(payload)
                    .map_err(|error| format!("file.put payload is not a FilePut: {error}"))?;
                FileChange::Put {
                    path: put.path,
                    content_type: put.content_type,
                    data: put.data,
                }
            }
            Kind::FileDelete => {
                let delete = FileDelete::decode(payload)
                    .map_err(|error| format!("file.delete payload is not a FileDelete: {error}"))?;
                FileChange::Delete { path: delete.path }
            }
            _ => return Ok(None),
        };
        check_path(change.path())?;
        Ok(Some(change))
    }
}

/// Checks a file path: UTF-8 (a `&str` is), relative, normalized, at most [`MAX_PATH_BYTES`]
/// bytes and [`MAX_SEGMENT_BYTES`] per segment; no leading `/`, no empty, `.` or `..` segment, no backslash, no NUL. The error says
/// which rule the path breaks.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("a file path must not be empty".into());
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(format!(
            "a file path is at most {MAX_PATH_BYTES} bytes, this one has {}",
            path.len()
        ));
    }
    if path.starts_with('/') {
        return Err(format!(
            "file path {path:?} starts with '/': paths are relative to the stream's tree"
        ));
    }
    if path.contains('\0') {
        return Err(format!("file path {path:?} contains a NUL byte"));
    }
    if path.contains('\\') {
        return Err(format!(
            "file path {path:?} contains a backslash: separate directories with '/'"
        ));
    }
    for segment in path.split('/') {
        match segment {
            "" => {
                return Err(format!(
                    "file path {path:?} has an empty segment (a doubled or trailing '/')"
                ))
            }
            "." | ".." => {
                return Err(format!(
                    "file path {path:?} has a {segment:?} segment: paths must be normalized"
                ))
            }
            long if long.len() > MAX_SEGMENT_BYTES => {
                return Err(format!(
                    "file path {path:?} has a segment of {} bytes; a file or directory name is at most {MAX_SEGMENT_BYTES}",
                    long.len()
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_paths_pass_and_every_bad_class_is_named() {
        for good in [
            "index.html",
            "a/b/c.js",
            "_schema",
            "é/ü.txt",
            "a..b",
            ".hidden",
        ] {
            check_path(good).unwrap();
        }
        let long = "a/".repeat(MAX_PATH_BYTES / 2) + "a";
        let long_name = "n".repeat(MAX_SEGMENT_BYTES + 1);
        for (bad, says) in [
            ("", "empty"),
            ("/etc/passwd", "starts with '/'"),
            ("a/../b", "\"..\" segment"),
            ("..", "\"..\" segment"),
            ("./a", "\".\" segment"),
            ("a//b", "empty segment"),
            ("a/", "empty segment"),
            ("a\\b", "backslash"),
            ("a\0b", "NUL"),
            (long.as_str(), "at most 1024 bytes"),
            (long_name.as_str(), "at most 255"),
        ] {
            let error = check_path(bad).unwrap_err();
            assert!(error.contains(says), "{bad:?}: {error}");
        }
    }

    #[test]
    fn changes_round_trip() {
        let put = FileChange::Put {
            path: "a/b.txt".into(),
            content_type: "text/plain".into(),
            data: b"hi".to_vec(),
        };
        let (kind, payload) = put.encode();
        assert_eq!(FileChange::decode(&kind, &payload).unwrap(), Some(put));
        let delete = FileChange::Delete { path: "x".into() };
        let (kind, payload) = delete.encode();
        assert_eq!(FileChange::decode(&kind, &payload).unwrap(), Some(delete));
        let (kind, payload) = FileChange::Delete {
            path: "../x".into(),
        }
        .encode();
        assert!(FileChange::decode(&kind, &payload).is_err());
        assert_eq!(FileChange::decode(&Kind::RecordAdd, b"{}").unwrap(), None);
    }
}
