//! The payload rule the SQLite projector contributes to a node's admission rules: a `_schema`
//! file is JSON content that [`Schema::parse`] accepts, so a schema no node could use is refused
//! when it is put, naming the problem, instead of being stored and parked by every replica.
//!
//! The rules of the file payload itself (it decodes, its path is valid) are not here: they are the
//! built-in kinds' own ([`quire_projection_api::BuiltinKinds`]). Applying a schema is in the
//! projector (`lib.rs`), parsing it in [`crate::schema`].

use prost::Message;
use quire_projection_api::files::{FileChange, SCHEMA_PATH};
use quire_projection_api::{Candidate, Kind, PayloadCheck, PayloadError};

use crate::Schema;

/// Largest `_schema`: a schema is parsed on the commit path, and by every replica.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;

/// Refuses a `file.put` of [`SCHEMA_PATH`] whose content type is not `application/json`, whose
/// content is over [`MAX_SCHEMA_BYTES`] or is not a valid schema. Every other scribe passes.
#[derive(Debug, Clone, Copy, Default)]
pub struct SchemaCheck;

impl PayloadCheck for SchemaCheck {
    fn name(&self) -> &str {
        "sql _schema"
    }

    fn check(&self, scribe: &Candidate<'_>) -> Result<(), PayloadError> {
        // The path first, without copying the file's bytes: most puts are not the schema.
        if *scribe.kind != Kind::FilePut
            || !PathOnly::decode(scribe.payload).is_ok_and(|put| put.path == SCHEMA_PATH)
        {
            return Ok(());
        }
        // A file payload that does not decode is refused by the built-in kinds' rules, not here.
        let Ok(Some(FileChange::Put {
            path,
            content_type,
            data,
        })) = FileChange::decode(scribe.kind, scribe.payload)
        else {
            return Ok(());
        };
        if path != SCHEMA_PATH {
            return Ok(());
        }
        if content_type.split(';').next().map(str::trim) != Some("application/json") {
            return Err(PayloadError::new(format!(
                "{SCHEMA_PATH} must have content type application/json, not {content_type:?}"
            )));
        }
        if data.len() > MAX_SCHEMA_BYTES {
            return Err(PayloadError::new(format!(
                "{SCHEMA_PATH} is {} bytes; at most {MAX_SCHEMA_BYTES} are allowed",
                data.len()
            )));
        }
        Schema::parse(&data)?;
        Ok(())
    }
}

/// The path of a `quire.v1.FilePut`, decoded alone (protobuf skips the other fields unread).
#[derive(Clone, PartialEq, Message)]
struct PathOnly {
    #[prost(string, tag = "1")]
    path: String,
}

#[cfg(test)]
mod tests {
    use quire_projection_api::Kind;

    use super::*;

    fn put(path: &str, content_type: &str, data: &str) -> (Kind, Vec<u8>) {
        FileChange::Put {
            path: path.into(),
            content_type: content_type.into(),
            data: data.as_bytes().to_vec(),
        }
        .encode()
    }

    fn check(kind: &Kind, payload: &[u8]) -> Result<(), PayloadError> {
        SchemaCheck.check(&Candidate::new(kind, "", payload, &[]))
    }

    #[test]
    fn a_schema_over_the_limit_is_refused_before_it_is_parsed() {
        let padding = " ".repeat(MAX_SCHEMA_BYTES);
        let (kind, payload) = put(
            SCHEMA_PATH,
            "application/json",
            &format!("{{\"schema\": {{}}}}{padding}"),
        );
        let refused = check(&kind, &payload).unwrap_err();
        assert!(refused.reason().contains("at most 65536"), "{refused}");
        let (kind, payload) = put(SCHEMA_PATH, "application/json", r#"{"schema": {}}"#);
        assert!(check(&kind, &payload).is_ok());
    }

    #[test]
    fn only_a_bad_schema_is_refused() {
        let (kind, payload) = put(SCHEMA_PATH, "application/json", r#"{"schema": {}}"#);
        check(&kind, &payload).unwrap();
        let (kind, payload) = put(SCHEMA_PATH, "text/plain", r#"{"schema": {}}"#);
        let error = check(&kind, &payload).unwrap_err();
        assert!(error.reason().contains("application/json"), "{error}");
        let (kind, payload) = put(SCHEMA_PATH, "application/json", "not json");
        check(&kind, &payload).unwrap_err();
        // Other paths, other kinds and undecodable payloads are not this rule's business.
        let (kind, payload) = put("notes.txt", "text/plain", "not json");
        check(&kind, &payload).unwrap();
        check(&Kind::FilePut, b"\xff\xff").unwrap();
        check(&Kind::RecordAdd, b"{}").unwrap();
    }
}
