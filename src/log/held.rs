//! Scribes from the future: kept aside until this node's clock catches up with them.
//!
//! Every rule that reads a scribe's clock (the kv lease, "newest wins" for records and files)
//! trusts the author's clock, so a scribe dated next year would win every race until next year. A
//! scribe dated more than [`MAX_AHEAD_MS`] ahead of this node's wall clock is therefore not stored
//! in the log: it is **held** (column family `held`, keyed by the moment it becomes admissible),
//! and enters the log, judged by every rule like any scribe, once the node's clock is within
//! [`MAX_AHEAD_MS`] of it.
//! - Held, not refused: a peer whose scribe is held is not counted as misbehaving, and the scribe
//!   is not lost. A replicated batch's cursor moves past it in the same write that holds it.
//! - Not in the log: no seq, not projected, not sent on to other peers (each node holds its own
//!   copy until its own clock allows it), not a parent any scribe may name yet.
//! - A client appending one future-dated scribe is told it is held (`AppendReply.held`); a batch
//!   with one is refused whole (a batch is stored all at once or not at all).
//! - Bounded: at most [`MAX_HELD`] scribes and [`MAX_HELD_BYTES`] bytes node-wide, in shares
//!   ([`share_limit`]: the node's clients together half, each peer a quarter). Past its share a
//!   client's scribe is refused; a peer's batch is not stored and its cursor does not move (the
//!   connection ends, and the peer sends it again later).
//!
//! A node's own scribes are never future-dated: its clock is at most [`MAX_AHEAD_MS`] ahead of its
//! wall clock (it ignores clocks further ahead, `crate::hlc`).

use std::time::Duration;

use prost::Message;
use std::collections::HashMap;

use quire_projection_api::{AuthorKey, ScribeId};

use super::store::{HeldKey, PeerOrigin};
use super::{Log, Origin};
use crate::pb;
use crate::scribe::Parts;

/// How far ahead of this node's wall clock a scribe may be dated and still enter the log now.
pub const MAX_AHEAD_MS: u64 = crate::hlc::MAX_OBSERVED_DRIFT_MS;
/// Most scribes held node-wide.
pub const MAX_HELD: u64 = 10_000;
/// Most bytes (as stored) held node-wide.
pub const MAX_HELD_BYTES: u64 = 64 << 20;
/// How often the node looks for held scribes whose time has come.
pub const RELEASE_EVERY: Duration = Duration::from_millis(500);
/// Most held scribes released in one round.
const RELEASE_ROUND: usize = 256;

/// The key under which a scribe with clock `hlc` is held, if it is dated more than
/// [`MAX_AHEAD_MS`] ahead of `wall_ms`.
pub fn hold_key(hlc: u64, id: ScribeId, wall_ms: u64) -> Option<HeldKey> {
    (hlc > due_until(wall_ms)).then_some(HeldKey {
        rules: None,
        hlc,
        id,
    })
}

/// The newest clock that may enter the log when the wall clock says `wall_ms`.
pub fn due_until(wall_ms: u64) -> u64 {
    wall_ms
        .saturating_add(MAX_AHEAD_MS)
        .checked_mul(1 << 16)
        .map_or(u64::MAX, |at| at | 0xffff)
}

/// The key a scribe with clock `hlc`, refused by rules `version` (from a peer whose rules
/// differ), is kept under.
pub fn rules_key(id: ScribeId, hlc: u64, version: u32) -> HeldKey {
    HeldKey {
        rules: Some(version),
        hlc,
        id,
    }
}

/// Whose a held scribe is, for the shares of the held set: `None` for this node's clients, or the
/// peer it came from.
pub type Share = Option<AuthorKey>;

/// The most one share may hold: this node's clients together half of the held set, each peer a
/// quarter, so neither a client (anyone may append what they sign) nor one peer can fill it for
/// everyone else.
pub fn share_limit(share: &Share) -> (u64, u64) {
    match share {
        None => (MAX_HELD / 2, MAX_HELD_BYTES / 2),
        Some(_) => (MAX_HELD / 4, MAX_HELD_BYTES / 4),
    }
}

/// The share of a held record (see [`encode`]).
pub fn share_of(value: &[u8]) -> Share {
    match value.first() {
        Some(1) => value
            .get(1..33)
            .and_then(|peer| AuthorKey::from_slice(peer).ok()),
        _ => None,
    }
}

/// What the log keeps in memory of the held set: its size, each share's, and each scribe's key by
/// id (a scribe whose parent is held waits with it).
#[derive(Debug, Default)]
pub(crate) struct HeldSet {
    /// Scribes held.
    pub(crate) count: u64,
    /// Bytes of their records.
    pub(crate) bytes: u64,
    /// Scribes and bytes by share.
    pub(crate) shares: HashMap<Share, (u64, u64)>,
    /// Each scribe's key, share and record size, by id.
    keys: HashMap<ScribeId, (HeldKey, Share, u64)>,
}

impl HeldSet {
    pub(crate) fn new(keys: Vec<(HeldKey, Share, u64)>) -> HeldSet {
        let mut set = HeldSet::default();
        for (key, share, size) in keys {
            set.add(key, share, size);
        }
        set
    }

    pub(crate) fn add(&mut self, key: HeldKey, share: Share, size: u64) {
        if let Some(old) = self.keys.insert(key.id, (key, share, size)) {
            self.subtract(&old.1, old.2);
        }
        self.count += 1;
        self.bytes += size;
        let used = self.shares.entry(share).or_default();
        used.0 += 1;
        used.1 += size;
    }

    pub(crate) fn remove(&mut self, key: &HeldKey) {
        if self
            .keys
            .get(&key.id)
            .is_some_and(|(held, _, _)| held == key)
        {
            let (_, share, size) = self.keys.remove(&key.id).expect("checked");
            self.subtract(&share, size);
        }
    }

    fn subtract(&mut self, share: &Share, size: u64) {
        self.count = self.count.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(size);
        if let Some(used) = self.shares.get_mut(share) {
            used.0 = used.0.saturating_sub(1);
            used.1 = used.1.saturating_sub(size);
        }
    }

    /// The key of held scribe `id`.
    pub(crate) fn key_of(&self, id: &ScribeId) -> Option<HeldKey> {
        self.keys.get(id).map(|(key, _, _)| *key)
    }
}

/// A held scribe's stored value: where it came from, then its parts.
pub(super) fn encode(origin: Origin, parts: &Parts) -> Vec<u8> {
    let mut out = Vec::new();
    match origin {
        Origin::Local => out.push(0),
        Origin::Peer(peer) => {
            out.push(1);
            out.extend_from_slice(peer.peer.as_bytes());
            out.extend_from_slice(&peer.epoch);
            out.extend_from_slice(&peer.seq.to_be_bytes());
        }
    }
    parts.to_proto().encode(&mut out).expect("a Vec grows");
    out
}

/// Reads [`encode`]'s form; `None` if damaged.
pub(super) fn decode(value: &[u8]) -> Option<(Origin, Parts)> {
    let (origin, rest) = match *value.first()? {
        0 => (Origin::Local, &value[1..]),
        1 => {
            let header = value.get(1..57)?;
            (
                Origin::Peer(PeerOrigin {
                    peer: AuthorKey::from_slice(&header[..32]).ok()?,
                    epoch: header[32..48].try_into().ok()?,
                    seq: u64::from_be_bytes(header[48..56].try_into().ok()?),
                }),
                &value[57..],
            )
        }
        _ => return None,
    };
    let sealed = pb::SealedScribe::decode(rest).ok()?;
    Some((origin, Parts::from_proto(sealed).ok()?))
}

/// Releases held scribes whose time has come, every [`RELEASE_EVERY`], until the log closes.
pub async fn release_loop(log: Log) {
    let mut closing = log.shared.closing.subscribe();
    loop {
        tokio::select! {
            _ = closing.wait_for(|closing| *closing) => return,
            () = tokio::time::sleep(RELEASE_EVERY) => {}
        }
        loop {
            match log.release_due(RELEASE_ROUND).await {
                Ok(released) if released == RELEASE_ROUND => continue,
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "could not release held scribes; retrying");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quire_projection_api::ScribeId;

    #[test]
    fn only_scribes_dated_past_the_limit_are_held_until_they_are_within_it() {
        let id = ScribeId([7; 32]);
        let wall = 1_000_000;
        assert_eq!(
            hold_key(((wall + MAX_AHEAD_MS) << 16) | 0xffff, id, wall),
            None
        );
        let hlc = ((wall + MAX_AHEAD_MS + 1) << 16) | 5;
        assert_eq!(hold_key(hlc, id, wall).unwrap().hlc, hlc);
        assert_eq!(
            hold_key(hlc, id, wall + 1),
            None,
            "one millisecond later it is due"
        );
        assert!(hold_key(u64::MAX, id, 0).is_some());
        assert_eq!(hold_key(u64::MAX, id, u64::MAX), None, "nothing overflows");
        // Clocks near zero (a scribe dated 1970) are not held.
        assert_eq!(hold_key(1, id, wall), None);
        assert_eq!(hold_key(0, id, 0), None);
    }
}
