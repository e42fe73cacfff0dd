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
//! - Bounded: at most [`MAX_HELD`] scribes and [`MAX_HELD_BYTES`] bytes node-wide; past that a
//!   future-dated scribe is refused.
//!
//! A node's own scribes are never future-dated: its clock is at most [`MAX_AHEAD_MS`] ahead of its
//! wall clock (it ignores clocks further ahead, `crate::hlc`).

use std::time::Duration;

use prost::Message;
use quire_projection_api::AuthorKey;

pub use super::store::RULES_KEYS;
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
pub fn hold_key(hlc: u64, id: quire_projection_api::ScribeId, wall_ms: u64) -> Option<HeldKey> {
    let at_ms = hlc >> 16;
    (at_ms > wall_ms.saturating_add(MAX_AHEAD_MS)).then(|| HeldKey {
        ready_ms: at_ms - MAX_AHEAD_MS,
        id,
    })
}

/// The key a scribe refused by rules `version` (from a peer whose rules differ) is kept under.
pub fn rules_key(id: quire_projection_api::ScribeId, version: u32) -> HeldKey {
    HeldKey {
        ready_ms: u64::MAX - u64::from(version),
        id,
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
        assert_eq!(hold_key((wall + MAX_AHEAD_MS) << 16, id, wall), None);
        let key = hold_key((wall + MAX_AHEAD_MS + 1) << 16 | 5, id, wall).unwrap();
        assert_eq!(key.ready_ms, wall + 1);
        assert_eq!(
            hold_key(((wall + MAX_AHEAD_MS + 1) << 16) | 5, id, key.ready_ms),
            None
        );
        assert_eq!(
            hold_key(u64::MAX, id, 0).unwrap().ready_ms,
            (u64::MAX >> 16) - MAX_AHEAD_MS
        );
    }
}
