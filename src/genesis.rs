//! The genesis codec: what a `stream.create` payload says (name, owner, policy) and its bytes.
//!
//! A stream's genesis is part of the scribe format, so this sits beside [`crate::scribe`] at the
//! bottom of the layers: the log decodes it to admit a stream, the projection runner to learn a
//! stream's policy, the client API to create one. Nothing here knows RocksDB, gRPC services or
//! the network; the wire messages it encodes are the generated `quire.v1.StreamGenesis` and
//! `quire.v1.Policy` (`docs/protocol.md` has their fields).

use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message;
use quire_projection_api::{AuthorKey, Authors, Kind, Policy};

use crate::membership::Role;

use crate::pb;
use crate::scribe::HARD_MAX_PAYLOAD_BYTES;

/// Why a genesis payload or a policy was refused; the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GenesisError {
    /// The payload is not a `quire.v1.StreamGenesis`.
    #[error("payload is not a quire.v1.StreamGenesis: {0}")]
    Decode(String),
    /// The owner field is not a 32-byte key.
    #[error("owner must be a 32-byte key, got {0} bytes")]
    Owner(usize),
    /// The name is longer than 256 bytes.
    #[error("name is {0} bytes, at most 256 allowed")]
    NameTooLong(usize),
    /// The policy is not one a stream can have.
    #[error("{0}")]
    Policy(#[from] PolicyError),
    /// A member entry is not a 32-byte key with a role.
    #[error("access.members: {0}")]
    Member(String),
    /// The retention rule is out of bounds.
    #[error("retention: {0}")]
    Retention(String),
}

/// Why a policy was refused; the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A rule names a kind that does not parse.
    #[error("policy rule: {0}")]
    Kind(String),
    /// A rule for `stream.create`, which no policy may govern.
    #[error("policy rule for stream.create: a stream has exactly one genesis")]
    Genesis,
    /// Two rules for one kind.
    #[error("policy has two rules for {0}")]
    DuplicateRule(String),
    /// A rule lists a key that is not 32 bytes.
    #[error("policy rule for {0}: keys must be 32 bytes")]
    Key(String),
    /// `max_file_bytes` is over the hard payload limit.
    #[error("max_file_bytes {0} is over the hard limit of {HARD_MAX_PAYLOAD_BYTES}")]
    MaxFileBytes(u64),
    /// A rule for `acl.grant` or `acl.revoke`: admins grant and revoke, whatever a policy says.
    #[error("policy rule for {0}: membership is changed by admins only, no rule applies")]
    Membership(String),
    /// A rule for `redact`: the target's author or the stream's owner redacts, whatever a policy
    /// says.
    #[error("policy rule for redact: a scribe is redacted by its author or the stream's owner only, no rule applies")]
    Redact,
    /// A rule for `retain` or `prune`: the stream's owner sets and applies its retention rule,
    /// whatever a policy says.
    #[error("policy rule for {0}: the stream's owner alone sets and applies its retention rule, no rule applies")]
    Retention(String),
    /// `work_bits` is over [`Policy::MAX_WORK_BITS`].
    #[error("work_bits {0} is over the most allowed, {max}", max = Policy::MAX_WORK_BITS)]
    WorkBits(u32),
    /// `defaults_version` is newer than this node knows.
    #[error("defaults_version {0} is newer than this node knows (at most {max}): upgrade quire", max = Policy::CURRENT_DEFAULTS)]
    Defaults(u32),
}

/// Content type of a `stream.create` payload.
pub const GENESIS_CONTENT_TYPE: &str = "application/vnd.quire.genesis+protobuf";

/// What a genesis says, with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Genesis {
    /// Human name.
    pub name: String,
    /// Owner key.
    pub owner: AuthorKey,
    /// Effective policy (`policy.private` from the genesis's access).
    pub policy: Policy,
    /// Members from the start, besides the owner.
    pub members: BTreeMap<AuthorKey, Role>,
    /// The retention rule (default: keep everything).
    pub retention: RetentionRule,
}

/// Most versions of a path a retention rule may keep (more is "all": 0).
pub const MAX_KEEP_VERSIONS: u32 = 1_000_000;

/// Longest age or lag a retention rule may name: a thousand years, in milliseconds.
pub const MAX_RETENTION_MS: u64 = 1000 * 366 * 24 * 3600 * 1000;

/// Checks a retention rule's bounds.
pub fn check_retention(retention: &pb::Retention) -> Result<(), GenesisError> {
    if retention.keep_versions > MAX_KEEP_VERSIONS {
        return Err(GenesisError::Retention(format!(
            "keep_versions {} is over {MAX_KEEP_VERSIONS} (0 keeps every version)",
            retention.keep_versions
        )));
    }
    for (name, value) in [
        ("max_age_ms", retention.max_age_ms),
        ("min_lag_ms", retention.min_lag_ms),
    ] {
        if value > MAX_RETENTION_MS {
            return Err(GenesisError::Retention(format!(
                "{name} {value} is over {MAX_RETENTION_MS} (a thousand years; 0 means none)"
            )));
        }
    }
    Ok(())
}

/// A retention rule (`quire.v1.Retention`, checked). Zeros keep everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionRule {
    /// Newest versions kept per file path (0: all).
    pub keep_versions: u32,
    /// Longest a record is kept, in milliseconds of scribe clocks (0: forever).
    pub max_age_ms: u64,
    /// How long a superseded version is kept after it was superseded (0: not at all).
    pub min_lag_ms: u64,
}

impl RetentionRule {
    /// The rule a wire `Retention` states, checked.
    pub fn from_proto(rule: &pb::Retention) -> Result<RetentionRule, GenesisError> {
        check_retention(rule)?;
        Ok(RetentionRule {
            keep_versions: rule.keep_versions,
            max_age_ms: rule.max_age_ms,
            min_lag_ms: rule.min_lag_ms,
        })
    }

    /// The wire form.
    pub fn to_proto(self) -> pb::Retention {
        pb::Retention {
            keep_versions: self.keep_versions,
            max_age_ms: self.max_age_ms,
            min_lag_ms: self.min_lag_ms,
        }
    }

    /// Whether it keeps everything.
    pub fn keeps_all(self) -> bool {
        self.keep_versions == 0 && self.max_age_ms == 0
    }
}

impl std::fmt::Display for RetentionRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&describe_retention(&self.to_proto()))
    }
}

/// A duration in its largest whole unit: 30d, 12h, 90m, 45s, 1500ms.
pub fn human_millis(ms: u64) -> String {
    for (unit, scale) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= scale && ms % scale == 0 {
            return format!("{}{unit}", ms / scale);
        }
    }
    format!("{ms}ms")
}

/// How a retention rule reads, for people: "newest 3 versions per path and key, records kept
/// 30d".
pub fn describe_retention(retention: &pb::Retention) -> String {
    let mut parts = Vec::new();
    if retention.keep_versions > 0 {
        parts.push(format!(
            "newest {} version{} per path and key",
            retention.keep_versions,
            if retention.keep_versions == 1 {
                ""
            } else {
                "s"
            }
        ));
        if retention.min_lag_ms > 0 {
            parts.push(format!(
                "superseded versions kept {}",
                human_millis(retention.min_lag_ms)
            ));
        }
    }
    if retention.max_age_ms > 0 {
        parts.push(format!(
            "records kept {}",
            human_millis(retention.max_age_ms)
        ));
    }
    if parts.is_empty() {
        "keep everything".into()
    } else {
        parts.join(", ")
    }
}

/// Decodes a `stream.create` payload; `author` is the owner when the payload names none.
pub fn genesis_from_payload(payload: &[u8], author: AuthorKey) -> Result<Genesis, GenesisError> {
    let genesis = pb::StreamGenesis::decode(payload)
        .map_err(|error| GenesisError::Decode(error.to_string()))?;
    let owner = if genesis.owner.is_empty() {
        author
    } else {
        AuthorKey::from_slice(&genesis.owner)
            .map_err(|_| GenesisError::Owner(genesis.owner.len()))?
    };
    let mut policy = policy_from_proto(genesis.policy.unwrap_or_default())?;
    if genesis.name.len() > 256 {
        return Err(GenesisError::NameTooLong(genesis.name.len()));
    }
    let access = genesis.access.unwrap_or_default();
    policy.private = access.private;
    if access.members.len() > crate::membership::MAX_MEMBERSHIP_SCRIBES {
        return Err(GenesisError::Member(format!(
            "{} members, at most {} (grant more later with acl.grant)",
            access.members.len(),
            crate::membership::MAX_MEMBERSHIP_SCRIBES
        )));
    }
    let mut members = BTreeMap::new();
    for member in access.members {
        let key = AuthorKey::from_slice(&member.key).map_err(|_| {
            GenesisError::Member(format!("a key must be 32 bytes, got {}", member.key.len()))
        })?;
        let role = Role::from_proto(member.role).ok_or_else(|| {
            GenesisError::Member(format!("{key}: a role is reader, writer or admin"))
        })?;
        if key == owner {
            return Err(GenesisError::Member(format!(
                "{key} is the owner, an admin always"
            )));
        }
        if members.insert(key, role).is_some() {
            return Err(GenesisError::Member(format!("{key} is listed twice")));
        }
    }
    let retention = RetentionRule::from_proto(&genesis.retention.unwrap_or_default())?;
    Ok(Genesis {
        name: genesis.name,
        owner,
        policy,
        members,
        retention,
    })
}

/// The wire form of a stream's access: `private`, and `members` with their roles.
pub fn access_to_proto(private: bool, members: &BTreeMap<AuthorKey, Role>) -> pb::Access {
    pb::Access {
        private,
        members: members
            .iter()
            .map(|(key, role)| pb::Member {
                key: Bytes::copy_from_slice(key.as_bytes()),
                role: role.to_proto(),
            })
            .collect(),
    }
}

/// Encodes a genesis payload. `salt` makes two streams of the same name and clock differ.
pub fn genesis_payload(
    name: &str,
    owner: Option<AuthorKey>,
    policy: Option<pb::Policy>,
    access: Option<pb::Access>,
    salt: [u8; 16],
) -> Vec<u8> {
    genesis_payload_retained(name, owner, policy, access, None, salt)
}

/// [`genesis_payload`] with a retention rule.
pub fn genesis_payload_retained(
    name: &str,
    owner: Option<AuthorKey>,
    policy: Option<pb::Policy>,
    access: Option<pb::Access>,
    retention: Option<pb::Retention>,
    salt: [u8; 16],
) -> Vec<u8> {
    pb::StreamGenesis {
        name: name.to_string(),
        owner: owner
            .map(|key| Bytes::copy_from_slice(key.as_bytes()))
            .unwrap_or_default(),
        policy,
        salt: Bytes::copy_from_slice(&salt),
        access,
        retention,
    }
    .encode_to_vec()
}

/// Turns a wire policy (zeros meaning defaults) into an explicit one, refusing nonsense.
pub fn policy_from_proto(policy: pb::Policy) -> Result<Policy, PolicyError> {
    let defaults = Policy::default();
    let mut rules = Vec::with_capacity(policy.rules.len());
    for rule in policy.rules {
        check_rule_kind(&rule.kind)?;
        if rules.iter().any(|(existing, _)| *existing == rule.kind) {
            return Err(PolicyError::DuplicateRule(rule.kind));
        }
        let authors = rule.authors.unwrap_or_default();
        let keys = authors
            .keys
            .iter()
            .map(|key| AuthorKey::from_slice(key).map_err(|_| PolicyError::Key(rule.kind.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        rules.push((
            rule.kind,
            Authors {
                anyone: authors.anyone,
                owner: authors.owner,
                keys,
                writers: authors.writers,
            },
        ));
    }
    let or_default = |value: u64, default: u64| if value == 0 { default } else { value };
    let max_file_bytes = or_default(policy.max_file_bytes, defaults.max_file_bytes);
    if max_file_bytes > HARD_MAX_PAYLOAD_BYTES {
        return Err(PolicyError::MaxFileBytes(max_file_bytes));
    }
    if policy.work_bits > Policy::MAX_WORK_BITS {
        return Err(PolicyError::WorkBits(policy.work_bits));
    }
    if policy.defaults_version > Policy::CURRENT_DEFAULTS {
        return Err(PolicyError::Defaults(policy.defaults_version));
    }
    Ok(Policy {
        rules,
        max_file_bytes,
        max_stream_bytes: or_default(policy.max_stream_bytes, defaults.max_stream_bytes),
        leasing: !policy.leasing_disabled,
        lease_ms: or_default(policy.lease_ms, defaults.lease_ms),
        work_bits: policy.work_bits,
        author_max_bytes: policy.author_max_bytes,
        author_max_scribes_per_day: policy.author_max_scribes_per_day,
        private: false,
        defaults_version: policy.defaults_version,
    })
}

/// A policy rule names an exact kind (`x.vote`, `record.add`) or every kind with a prefix
/// (`x.*`, `x.chat.*`, `record.*`, `kv.*`, `file.*`); never `stream.create` nor `acl.*`.
pub fn check_rule_kind(text: &str) -> Result<(), PolicyError> {
    let kind = match text.strip_suffix(".*") {
        Some("file" | "record" | "kv" | "x") => return Ok(()),
        Some("acl") => return Err(PolicyError::Membership(text.to_string())),
        Some("stream") => return Err(PolicyError::Genesis),
        // `x.chat.*`: the prefix must itself be an extension kind.
        Some(prefix) => match prefix.parse::<Kind>() {
            Ok(Kind::Custom(_)) => return Ok(()),
            _ => {
                return Err(PolicyError::Kind(format!(
                    "{text:?}: a prefix rule is file.*, record.*, kv.*, x.* or x.NAME.*"
                )))
            }
        },
        None => text
            .parse::<Kind>()
            .map_err(|error| PolicyError::Kind(format!("{error}")))?,
    };
    if kind == Kind::StreamCreate {
        return Err(PolicyError::Genesis);
    }
    if kind.is_membership() {
        return Err(PolicyError::Membership(text.to_string()));
    }
    if kind == Kind::Redact {
        return Err(PolicyError::Redact);
    }
    if matches!(kind, Kind::Retain | Kind::Prune) {
        return Err(PolicyError::Retention(text.to_string()));
    }
    Ok(())
}

/// The explicit wire form of a policy.
pub fn policy_to_proto(policy: &Policy) -> pb::Policy {
    pb::Policy {
        rules: policy
            .rules
            .iter()
            .map(|(kind, authors)| pb::KindRule {
                kind: kind.clone(),
                authors: Some(pb::Authors {
                    anyone: authors.anyone,
                    owner: authors.owner,
                    keys: authors
                        .keys
                        .iter()
                        .map(|key| Bytes::copy_from_slice(key.as_bytes()))
                        .collect(),
                    writers: authors.writers,
                }),
            })
            .collect(),
        max_file_bytes: policy.max_file_bytes,
        max_stream_bytes: policy.max_stream_bytes,
        leasing_disabled: !policy.leasing,
        lease_ms: policy.lease_ms,
        work_bits: policy.work_bits,
        author_max_bytes: policy.author_max_bytes,
        author_max_scribes_per_day: policy.author_max_scribes_per_day,
        defaults_version: policy.defaults_version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_kinds_are_exact_kinds_or_family_prefixes() {
        for good in [
            "x.vote",
            "record.add",
            "file.put",
            "x.*",
            "x.chat.*",
            "record.*",
            "kv.*",
            "file.*",
        ] {
            assert!(check_rule_kind(good).is_ok(), "{good}");
        }
        for bad in ["*", ".*", "x*", "y.*", "x..*", "stream.*", "stream.create"] {
            assert!(check_rule_kind(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            check_rule_kind("acl.*"),
            Err(PolicyError::Membership(_))
        ));
        assert!(matches!(
            check_rule_kind("acl.grant"),
            Err(PolicyError::Membership(_))
        ));
        let policy = |rules: &[(&str, Authors)]| Policy {
            rules: rules
                .iter()
                .map(|(kind, authors)| (kind.to_string(), authors.clone()))
                .collect(),
            defaults_version: Policy::CURRENT_DEFAULTS,
            ..Policy::default()
        };
        let vote = Kind::Custom("x.chat.vote".into());
        assert_eq!(policy(&[]).authors_for(&vote), Authors::owner_only());
        let open = policy(&[("x.*", Authors::anyone())]);
        assert_eq!(open.authors_for(&vote), Authors::anyone());
        let narrower = policy(&[("x.*", Authors::anyone()), ("x.chat.*", Authors::writers())]);
        assert_eq!(
            narrower.authors_for(&vote),
            Authors::writers(),
            "longest prefix"
        );
        let exact = policy(&[
            ("x.chat.*", Authors::writers()),
            ("x.chat.vote", Authors::owner_only()),
        ]);
        assert_eq!(
            exact.authors_for(&vote),
            Authors::owner_only(),
            "exact first"
        );
        assert_eq!(
            exact.authors_for(&Kind::Custom("x.chatter".into())),
            Authors::owner_only(),
            "x.chat.* does not cover x.chatter (the default does)"
        );
        let old = Policy {
            defaults_version: 0,
            ..Policy::default()
        };
        assert_eq!(
            old.authors_for(&vote),
            Authors::anyone(),
            "defaults 0 keep x.* open"
        );
        assert!(matches!(
            policy_from_proto(pb::Policy {
                defaults_version: Policy::CURRENT_DEFAULTS + 1,
                ..Default::default()
            }),
            Err(PolicyError::Defaults(_))
        ));
    }

    fn with_members(members: Vec<pb::Member>) -> Result<Genesis, GenesisError> {
        let payload = genesis_payload(
            "g",
            None,
            None,
            Some(pb::Access {
                private: true,
                members,
            }),
            [0; 16],
        );
        genesis_from_payload(&payload, AuthorKey([9; 32]))
    }

    fn member(key: u8, role: Role) -> pb::Member {
        pb::Member {
            key: Bytes::copy_from_slice(&[key; 32]),
            role: role.to_proto(),
        }
    }

    #[test]
    fn genesis_members_are_checked_and_capped() {
        let genesis = with_members(vec![member(1, Role::Reader), member(2, Role::Admin)]).unwrap();
        assert!(genesis.policy.private);
        assert_eq!(genesis.members.get(&AuthorKey([2; 32])), Some(&Role::Admin));
        let refused = |members| match with_members(members) {
            Err(GenesisError::Member(reason)) => reason,
            other => panic!("not refused: {other:?}"),
        };
        assert!(refused(vec![member(1, Role::Reader), member(1, Role::Writer)]).contains("twice"));
        assert!(refused(vec![member(9, Role::Writer)]).contains("owner"));
        let mut no_role = member(1, Role::Reader);
        no_role.role = 0;
        assert!(refused(vec![no_role]).contains("role"));
        let short = pb::Member {
            key: Bytes::from_static(b"short"),
            role: Role::Reader.to_proto(),
        };
        assert!(refused(vec![short]).contains("32 bytes"));
        let too_many = (0..=crate::membership::MAX_MEMBERSHIP_SCRIBES)
            .map(|n| pb::Member {
                key: Bytes::copy_from_slice(&{
                    let mut key = [0u8; 32];
                    key[..8].copy_from_slice(&(n as u64).to_be_bytes());
                    key
                }),
                role: Role::Reader.to_proto(),
            })
            .collect();
        assert!(refused(too_many).contains("at most"));
    }
}
