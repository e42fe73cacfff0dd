//! Payload checks: rules about a scribe's payload that a node applies before it stores the scribe.
//!
//! A node refuses a scribe whose payload breaks a rule of its kind, for local appends and for
//! scribes from peers alike, so a bad payload never enters the log of a node that knows the rule.
//! The log itself knows none of these rules: whoever builds the node hands them in. Each rule is a
//! [`PayloadCheck`]; [`BuiltinKinds`] holds the rules of the built-in kinds' own wire formats (a
//! file scribe's payload and path, an upvote's one parent), and a projector crate may export the
//! rules its projection relies on (the SQLite projector's `SchemaCheck`: a `_schema` it can use).
//! The set a node applies is fixed for its version, not gathered from the plugins a binary
//! registers: two nodes that applied different rules could disagree about a scribe.
//!
//! What does not live here: who may write which kind and how much (the stream's [`Policy`], checked
//! by the log), and whether parents are stored (the log, against its store). A check sees the
//! scribe alone, never stored state.
//!
//! [`Policy`]: crate::Policy

use std::fmt;

use crate::files::FileChange;
use crate::{Kind, ScribeId};

/// What a [`PayloadCheck`] sees of a scribe the node is about to admit: its kind, content type,
/// payload and parents. The scribe is already decoded and its signature verified; whether its
/// author may write it and whether its parents are stored is checked elsewhere.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Candidate<'a> {
    /// The scribe's kind.
    pub kind: &'a Kind,
    /// MIME type of the payload.
    pub content_type: &'a str,
    /// The payload bytes.
    pub payload: &'a [u8],
    /// Ids of the scribes it refers to, in order.
    pub parents: &'a [ScribeId],
}

impl<'a> Candidate<'a> {
    /// A candidate made of these parts of a scribe.
    pub fn new(
        kind: &'a Kind,
        content_type: &'a str,
        payload: &'a [u8],
        parents: &'a [ScribeId],
    ) -> Candidate<'a> {
        Candidate {
            kind,
            content_type,
            payload,
            parents,
        }
    }
}

/// Why a [`PayloadCheck`] refused a scribe: one sentence saying what is wrong and, where it can,
/// what to fix. The node shows it to the author as `<kind> scribe refused: <reason>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PayloadError(String);

impl PayloadError {
    /// A refusal for this reason.
    pub fn new(reason: impl fmt::Display) -> Self {
        PayloadError(reason.to_string())
    }

    /// The reason, in words.
    pub fn reason(&self) -> &str {
        &self.0
    }
}

impl From<String> for PayloadError {
    fn from(reason: String) -> Self {
        PayloadError(reason)
    }
}

/// One rule about payloads that a node checks before it stores a scribe.
///
/// A node runs every check it was given, in order, on every scribe except a stream's genesis
/// (whose payload the log decodes itself), and refuses the scribe with the first error. Checks
/// run on the log's commit path, one scribe after the other, so they must be cheap.
pub trait PayloadCheck: Send + Sync + 'static {
    /// A short name for diagnostics (`Debug` output of a node's rule set), e.g. `"sql _schema"`.
    /// It is never part of a refusal's message.
    fn name(&self) -> &str;

    /// Checks one scribe: `Ok(())` admits it as far as this rule is concerned, `Err` refuses it.
    ///
    /// Contract:
    /// - **Only your own kinds.** Answer `Ok(())` for every scribe the rule is not about (other
    ///   kinds, other paths), including payloads that do not decode as what the rule expects:
    ///   refusing those is the business of the rule that owns the format ([`BuiltinKinds`] for
    ///   the built-in kinds).
    /// - **A function of the candidate alone.** The same candidate gives the same answer on every
    ///   node, at any time: no clock, no randomness, no I/O, no stored state. Scribes from peers
    ///   are checked too, and replicas that disagreed on a rule would hold different logs.
    /// - **Cheap and total.** No panics, no blocking; it runs on the thread that commits every
    ///   append of the node.
    fn check(&self, scribe: &Candidate<'_>) -> Result<(), PayloadError>;
}

/// The rules of the built-in kinds' own formats, which every node checks whatever projectors it
/// runs:
/// - a `record.upvote` names the record it upvotes as its one parent;
/// - a `file.put` / `file.delete` payload decodes, and its path passes
///   [`check_path`](crate::files::check_path) (no `..`, no leading `/`, ...).
#[derive(Debug, Clone, Copy, Default)]
pub struct BuiltinKinds;

impl PayloadCheck for BuiltinKinds {
    fn name(&self) -> &str {
        "built-in kinds"
    }

    fn check(&self, scribe: &Candidate<'_>) -> Result<(), PayloadError> {
        if *scribe.kind == Kind::RecordUpvote && scribe.parents.len() != 1 {
            return Err(PayloadError::new(format!(
                "a record.upvote names the record it upvotes as its one parent; this one has {}",
                scribe.parents.len()
            )));
        }
        FileChange::decode(scribe.kind, scribe.payload)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_kinds_refuse_bad_paths_and_upvotes_without_one_parent() {
        let parent = [ScribeId([1; 32])];
        let upvote = Kind::RecordUpvote;
        assert!(BuiltinKinds
            .check(&Candidate::new(&upvote, "", b"", &parent))
            .is_ok());
        let none = BuiltinKinds
            .check(&Candidate::new(&upvote, "", b"", &[]))
            .unwrap_err();
        assert!(none.reason().contains("one parent"), "{none}");
        let (kind, payload) = FileChange::Delete {
            path: "../x".into(),
        }
        .encode();
        assert!(BuiltinKinds
            .check(&Candidate::new(&kind, "", &payload, &[]))
            .is_err());
        let (kind, payload) = FileChange::Delete { path: "x".into() }.encode();
        assert!(BuiltinKinds
            .check(&Candidate::new(&kind, "", &payload, &[]))
            .is_ok());
        assert!(BuiltinKinds
            .check(&Candidate::new(&Kind::FilePut, "", b"\xff\xff", &[]))
            .is_err());
        assert!(BuiltinKinds
            .check(&Candidate::new(&Kind::RecordAdd, "", b"not json", &[]))
            .is_ok());
    }
}
