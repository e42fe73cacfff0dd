//! Plain scribe types shared by the quire daemon and every projector.
//!
//! This crate is deliberately small and knows nothing of RocksDB, gRPC or tokio (it uses protobuf
//! only for the file payloads): a projector crate depends on it alone. It holds the names of things — scribe ids, author keys,
//! kinds, a stream's policy — and the rules that need no storage to answer (who may author which
//! kind). Encoding and signing live in the daemon (`quire::scribe`), because they are where the
//! bytes are fixed forever.
//!
//! # Layout
//! - [`ScribeId`] / [`StreamId`]: 32-byte SHA-256 ids, shown as 64 lowercase hex characters.
//! - [`AuthorKey`]: a 32-byte Ed25519 public key.
//! - [`Kind`]: the built-in scribe kinds and custom `x.<name>` kinds.
//! - [`Policy`], [`Authors`]: what a stream's genesis says about who may write and how much.
//! - [`Scribe`]: a decoded, verified scribe as a projector will receive it.
//! - [`Plugin`], [`Projector`]: what a projector implements (see the [`projector`] module);
//!   [`Payloads`], the node's stored payloads by scribe id, which the daemon hands it in its
//!   [`Place`].
//! - [`files`]: the payloads of `file.put` / `file.delete` and the path rules.
//! - [`admission`]: [`PayloadCheck`], the payload rules a node applies before it stores a scribe
//!   (the built-in kinds' own, and those a [`Plugin`] contributes).
//! - `sqlite` (feature `sqlite`): the SQLite copy scaffold the built-in projectors share (opening,
//!   read-only readers, the checkpoint row, reset).
//! - `testing` (feature `testing`): the conformance suite every projector runs.
//!
//! # Example
//! ```
//! use quire_projection_api::{AuthorKey, Kind, Policy, ScribeId};
//!
//! let owner = AuthorKey([1; 32]);
//! let visitor = AuthorKey([2; 32]);
//! let policy = Policy::default();
//! // Anyone may add records; only the owner may publish files.
//! assert!(policy.authors_for(&"record.add".parse::<Kind>()?).contains(&visitor, &owner));
//! assert!(!policy.authors_for(&Kind::FilePut).contains(&visitor, &owner));
//! // Ids are 64 hex characters everywhere.
//! let id: ScribeId = "ab".repeat(32).parse()?;
//! assert_eq!(id.to_hex(), "ab".repeat(32));
//! # Ok::<(), quire_projection_api::ParseError>(())
//! ```

use std::fmt;
use std::str::FromStr;

pub mod admission;
pub mod files;
pub mod projector;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;

pub use admission::{BuiltinKinds, Candidate, PayloadCheck, PayloadError};
pub use projector::{
    ApplyError, NoPayloads, OnFailure, Payloads, Place, Plugin, ProjectionError, Projector, Scope,
    DEFAULT_MAX_BATCH,
};

/// Errors from parsing the plain types of this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The text is not 64 hexadecimal characters.
    #[error("expected 64 hex characters (a 32-byte id or key), got {0:?}")]
    BadHex(String),
    /// The byte string is not 32 bytes long.
    #[error("expected 32 bytes, got {0}")]
    BadLength(usize),
    /// The kind is neither built in nor `x.<name>`.
    #[error("unknown kind {0:?}: use one of {known} or a custom `x.<name>` kind", known = Kind::BUILT_IN.join(", "))]
    UnknownKind(String),
}

macro_rules! thirty_two_bytes {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// Takes exactly 32 bytes.
            pub fn from_slice(bytes: &[u8]) -> Result<Self, ParseError> {
                let array: [u8; 32] = bytes.try_into().map_err(|_| ParseError::BadLength(bytes.len()))?;
                Ok(Self(array))
            }

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// 64 lowercase hex characters.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// The first 8 hex characters, for logs and tables.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
        }

        impl From<[u8; 32]> for $name {
            fn from(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }
        }

        impl FromStr for $name {
            type Err = ParseError;
            fn from_str(text: &str) -> Result<Self, ParseError> {
                let text = text.trim();
                let mut out = [0u8; 32];
                if text.len() != 64 || hex::decode_to_slice(text, &mut out).is_err() {
                    return Err(ParseError::BadHex(text.to_string()));
                }
                Ok(Self(out))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }
    };
}

thirty_two_bytes!(
    /// The id of a scribe: SHA-256 of its encoded bytes, exactly as stored and sent.
    ScribeId
);
thirty_two_bytes!(
    /// An Ed25519 public key: the identity of an author (a node or a client).
    AuthorKey
);

/// A stream is named by the id of its genesis scribe.
pub type StreamId = ScribeId;

/// What a scribe does. Built-in kinds have fixed names; custom kinds are `x.<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `stream.create`: the genesis of a stream; its payload states the owner and the policy.
    StreamCreate,
    /// `file.put`: a file in the stream's file tree.
    FilePut,
    /// `file.delete`: a tombstone for a path of the file tree.
    FileDelete,
    /// `record.add`: a JSON record for the SQLite projection.
    RecordAdd,
    /// `record.upvote`: an upvote of the record named by the scribe's parent.
    RecordUpvote,
    /// `kv.set`: a value of the key/value table.
    KvSet,
    /// `kv.delete`: a tombstone of the key/value table.
    KvDelete,
    /// `acl.grant`: a role given to a key (stream membership; admins only).
    AclGrant,
    /// `acl.revoke`: a key's role taken away (stream membership; admins only).
    AclRevoke,
    /// `redact`: deletes the payload of the scribe it targets, on every node (its author or the
    /// stream's owner only). Projectors never see a redacted scribe: a copy that applied it is
    /// rebuilt without it.
    Redact,
    /// `retain`: the stream's retention rule from now on (its owner only).
    Retain,
    /// `prune`: deletes the payload of a `file.*` or `record.*` scribe the stream's retention rule
    /// lets go, on every node (the stream's owner only; its node applies the rule). Projectors
    /// never see a pruned scribe, as for `redact`.
    Prune,
    /// `x.<name>`: an application's own kind, stored and replicated but not projected by built-ins.
    Custom(String),
}

impl Kind {
    /// Names of the built-in kinds, in documentation order.
    pub const BUILT_IN: [&'static str; 12] = [
        "stream.create",
        "file.put",
        "file.delete",
        "record.add",
        "record.upvote",
        "kv.set",
        "kv.delete",
        "acl.grant",
        "acl.revoke",
        "redact",
        "retain",
        "prune",
    ];

    /// Whether it is a membership kind (`acl.*`).
    pub fn is_membership(&self) -> bool {
        matches!(self, Kind::AclGrant | Kind::AclRevoke)
    }

    /// Whether it deletes another scribe's payload (`redact`, `prune`).
    pub fn erases(&self) -> bool {
        matches!(self, Kind::Redact | Kind::Prune)
    }

    /// Whether the log, not a policy rule, says who may write it: `stream.create` (a stream has
    /// one genesis), `redact` (the target's author or the owner), `retain` and `prune` (the
    /// owner).
    pub fn judged_by_log(&self) -> bool {
        matches!(
            self,
            Kind::StreamCreate | Kind::Redact | Kind::Retain | Kind::Prune
        )
    }

    /// The kind's name as it appears in a scribe.
    pub fn as_str(&self) -> &str {
        match self {
            Kind::StreamCreate => "stream.create",
            Kind::FilePut => "file.put",
            Kind::FileDelete => "file.delete",
            Kind::RecordAdd => "record.add",
            Kind::RecordUpvote => "record.upvote",
            Kind::KvSet => "kv.set",
            Kind::KvDelete => "kv.delete",
            Kind::AclGrant => "acl.grant",
            Kind::AclRevoke => "acl.revoke",
            Kind::Redact => "redact",
            Kind::Retain => "retain",
            Kind::Prune => "prune",
            Kind::Custom(name) => name,
        }
    }
}

impl FromStr for Kind {
    type Err = ParseError;
    fn from_str(text: &str) -> Result<Self, ParseError> {
        Ok(match text {
            "stream.create" => Kind::StreamCreate,
            "file.put" => Kind::FilePut,
            "file.delete" => Kind::FileDelete,
            "record.add" => Kind::RecordAdd,
            "record.upvote" => Kind::RecordUpvote,
            "kv.set" => Kind::KvSet,
            "kv.delete" => Kind::KvDelete,
            "acl.grant" => Kind::AclGrant,
            "acl.revoke" => Kind::AclRevoke,
            "redact" => Kind::Redact,
            "retain" => Kind::Retain,
            "prune" => Kind::Prune,
            custom if is_custom_kind(custom) => Kind::Custom(custom.to_string()),
            other => return Err(ParseError::UnknownKind(other.to_string())),
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `x.` followed by 1–120 characters of `[a-zA-Z0-9_.-]`.
fn is_custom_kind(text: &str) -> bool {
    match text.strip_prefix("x.") {
        Some(name) => {
            !name.is_empty()
                && name.len() <= 120
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
        }
        None => false,
    }
}

/// A set of authors: the union of its parts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Authors {
    /// Any key at all.
    pub anyone: bool,
    /// The stream's owner.
    pub owner: bool,
    /// These keys.
    pub keys: Vec<AuthorKey>,
    /// Every key holding the writer role (or admin) in the stream's membership, as the
    /// scribe's author had seen it (the log judges this part; [`Authors::contains`] cannot).
    pub writers: bool,
}

impl Authors {
    /// Everybody.
    pub fn anyone() -> Self {
        Authors {
            anyone: true,
            ..Default::default()
        }
    }

    /// The owner alone.
    pub fn owner_only() -> Self {
        Authors {
            owner: true,
            ..Default::default()
        }
    }

    /// Whether `author` is in the set, given the stream's `owner` (not counting `writers`).
    pub fn contains(&self, author: &AuthorKey, owner: &AuthorKey) -> bool {
        self.anyone || (self.owner && author == owner) || self.keys.contains(author)
    }

    /// The stream's writers (membership).
    pub fn writers() -> Self {
        Authors {
            writers: true,
            ..Default::default()
        }
    }
}

impl fmt::Display for Authors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.anyone {
            return f.write_str("anyone");
        }
        let mut parts = Vec::new();
        if self.owner {
            parts.push("the owner".to_string());
        }
        parts.extend(self.keys.iter().map(|key| key.short()));
        if self.writers {
            parts.push("the stream's writers".to_string());
        }
        if parts.is_empty() {
            f.write_str("nobody")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// What a stream's genesis says about who may write and how much. Every field is explicit here:
/// the wire form's zero values are turned into these defaults when a genesis is decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Author rules for exact kinds; kinds without a rule use [`Policy::default_authors`].
    pub rules: Vec<(String, Authors)>,
    /// Largest payload of one scribe, in bytes.
    pub max_file_bytes: u64,
    /// Largest total encoded size of a stream's scribes that a local append may reach.
    pub max_stream_bytes: u64,
    /// Key leasing for `kv.*` scribes.
    pub leasing: bool,
    /// Lease duration in milliseconds.
    pub lease_ms: u64,
    /// Zero bits a `record.add` work token must have (0: no work token).
    pub work_bits: u32,
    /// Most bytes one author's scribes may take in the stream (0: no quota; the owner is exempt).
    pub author_max_bytes: u64,
    /// Most scribes one author may date within one UTC day (0: no quota; the owner is exempt).
    pub author_max_scribes_per_day: u64,
    /// The stream is private (its genesis says so): served only to its members, and written by
    /// its writers unless a rule says otherwise.
    pub private: bool,
    /// The default rules the stream was created under (see [`Policy::default_authors`]): 0, the
    /// first, lets anyone write `x.*` kinds into a public stream; 1 lets only its owner.
    pub defaults_version: u32,
}

impl Policy {
    /// The default rules a node creating a stream writes into its genesis.
    pub const CURRENT_DEFAULTS: u32 = 1;

    /// 10 MiB.
    pub const DEFAULT_MAX_FILE_BYTES: u64 = 10 * 1024 * 1024;
    /// 100 MiB.
    pub const DEFAULT_MAX_STREAM_BYTES: u64 = 100 * 1024 * 1024;
    /// One hour.
    pub const DEFAULT_LEASE_MS: u64 = 3_600_000;
    /// The most work bits a policy may ask for (each bit doubles the cost of an append; 24 bits
    /// is about 16 million hashes, a few seconds of one core).
    pub const MAX_WORK_BITS: u32 = 24;

    /// Who may author `kind` when the policy has no rule for it: `file.*` the owner only;
    /// `record.*` and `kv.*` anyone (in a public stream) or its writers (in a private one); `x.*`
    /// the owner (in a public stream; anyone under `defaults_version` 0) or its writers (in a
    /// private one); `stream.create` nobody (a stream has one genesis); `acl.*` its writers (the
    /// log lets only admins grant and revoke); `redact`, `retain` and `prune` nobody by policy
    /// (the log lets the target's author or the owner redact, and the owner retain and prune).
    pub fn default_authors(&self, kind: &Kind) -> Authors {
        match kind {
            Kind::FilePut | Kind::FileDelete => Authors::owner_only(),
            _ if self.private && !kind.is_membership() && !kind.judged_by_log() => {
                Authors::writers()
            }
            Kind::RecordAdd | Kind::RecordUpvote | Kind::KvSet | Kind::KvDelete => {
                Authors::anyone()
            }
            Kind::Custom(_) => {
                if self.defaults_version >= 1 {
                    Authors::owner_only()
                } else {
                    Authors::anyone()
                }
            }
            Kind::AclGrant | Kind::AclRevoke => Authors::writers(),
            Kind::StreamCreate | Kind::Redact | Kind::Retain | Kind::Prune => Authors::default(),
        }
    }

    /// The authors allowed to write `kind` into a stream with this policy: the rule for the kind
    /// itself, else the rule `PREFIX.*` with the longest prefix the kind starts with (`x.*`,
    /// `x.chat.*`, `record.*`), else the default.
    pub fn authors_for(&self, kind: &Kind) -> Authors {
        if *kind == Kind::StreamCreate {
            return Authors::default();
        }
        let name = kind.as_str();
        if let Some((_, authors)) = self.rules.iter().find(|(rule_kind, _)| rule_kind == name) {
            return authors.clone();
        }
        self.rules
            .iter()
            .filter_map(|(rule_kind, authors)| {
                let prefix = rule_kind.strip_suffix('*')?;
                (prefix.ends_with('.') && name.starts_with(prefix))
                    .then_some((prefix.len(), authors))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, authors)| authors.clone())
            .unwrap_or_else(|| self.default_authors(kind))
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            rules: Vec::new(),
            max_file_bytes: Self::DEFAULT_MAX_FILE_BYTES,
            max_stream_bytes: Self::DEFAULT_MAX_STREAM_BYTES,
            leasing: true,
            lease_ms: Self::DEFAULT_LEASE_MS,
            work_bits: 0,
            author_max_bytes: 0,
            author_max_scribes_per_day: 0,
            private: false,
            defaults_version: 0,
        }
    }
}

/// A decoded, verified scribe with its place in the local log: what a projector receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scribe {
    /// SHA-256 of the scribe's encoded bytes.
    pub id: ScribeId,
    /// The stream it belongs to (for a genesis, its own id).
    pub stream: StreamId,
    /// Who signed it.
    pub author: AuthorKey,
    /// The author's hybrid logical clock when it was written: unix ms << 16 | counter.
    pub hlc: u64,
    /// What it does.
    pub kind: Kind,
    /// MIME type of the payload.
    pub content_type: String,
    /// The payload bytes.
    pub payload: Vec<u8>,
    /// Ids of scribes it refers to.
    pub parents: Vec<ScribeId>,
    /// Its local sequence number on this node (from 1, gapless).
    pub local_seq: u64,
}

/// Unix milliseconds of a hybrid logical clock value.
pub fn hlc_millis(hlc: u64) -> u64 {
    hlc >> 16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_unknown_kinds_are_refused() {
        for name in Kind::BUILT_IN {
            assert_eq!(name.parse::<Kind>().unwrap().as_str(), name);
        }
        assert_eq!(
            "x.note".parse::<Kind>().unwrap(),
            Kind::Custom("x.note".into())
        );
        for bad in ["", "x.", "note", "file.rename", "x.a b", "X.note"] {
            assert!(bad.parse::<Kind>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn default_policy_gives_files_to_the_owner_and_the_rest_to_anyone() {
        let policy = Policy::default();
        let owner = AuthorKey([1; 32]);
        let other = AuthorKey([2; 32]);
        assert!(policy.authors_for(&Kind::FilePut).contains(&owner, &owner));
        assert!(!policy.authors_for(&Kind::FilePut).contains(&other, &owner));
        assert!(policy
            .authors_for(&Kind::RecordAdd)
            .contains(&other, &owner));
        assert!(policy
            .authors_for(&Kind::Custom("x.y".into()))
            .contains(&other, &owner));
        assert!(!policy
            .authors_for(&Kind::StreamCreate)
            .contains(&owner, &owner));
    }

    #[test]
    fn ids_parse_from_hex_and_refuse_anything_else() {
        let id = ScribeId([0xab; 32]);
        assert_eq!(id.to_hex().parse::<ScribeId>().unwrap(), id);
        assert!("abc".parse::<ScribeId>().is_err());
        assert!("zz".repeat(32).parse::<ScribeId>().is_err());
    }
}
