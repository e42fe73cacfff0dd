//! The Merkle tree a seal signs: RFC 9162 (Certificate Transparency v2), section 2.1.
//!
//! Leaves are scribe ids in the order sealed. `leaf = sha256(0x00 ‖ id)`,
//! `node = sha256(0x01 ‖ left ‖ right)`; a list of `n > 1` ids splits at the largest power of two
//! below `n`. The root of one id is its leaf hash. An inclusion proof is the audit path: sibling
//! hashes from the leaf up, checked with the RFC's algorithm (which also checks that the path has
//! exactly the length the index and count call for, so no proof has two forms).

use quire_projection_api::ScribeId;
use sha2::{Digest, Sha256};

use super::Proof;

/// The hash of a leaf.
pub fn leaf_hash(id: &ScribeId) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update([0u8]);
    hasher.update(id.as_bytes());
    hasher.finalize().into()
}

/// The hash of an inner node.
pub fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update([1u8]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The root of the tree of `ids` (at least one) and every leaf's proof, in order.
pub fn tree(ids: &[ScribeId]) -> ([u8; 32], Vec<Proof>) {
    assert!(!ids.is_empty(), "a tree has at least one leaf");
    let leaves: Vec<[u8; 32]> = ids.iter().map(leaf_hash).collect();
    // No path is longer than ceil(log2 n): reserve exactly that, not what pushing one by one would
    // grow to (up to 32 siblings' room for 20, on a million leaves).
    let depth = (usize::BITS - (ids.len() - 1).leading_zeros()) as usize;
    let mut proofs: Vec<Proof> = (0..ids.len() as u64)
        .map(|index| Proof {
            index,
            siblings: Vec::with_capacity(depth),
        })
        .collect();
    let root = subtree(&leaves, &mut proofs);
    (root, proofs)
}

/// The root of the tree of `ids` (at least one), without the proofs.
pub fn root(ids: &[ScribeId]) -> [u8; 32] {
    assert!(!ids.is_empty(), "a tree has at least one leaf");
    let leaves: Vec<[u8; 32]> = ids.iter().map(leaf_hash).collect();
    subtree_root(&leaves)
}

fn subtree_root(leaves: &[[u8; 32]]) -> [u8; 32] {
    if leaves.len() == 1 {
        return leaves[0];
    }
    let split = split_point(leaves.len());
    node_hash(
        &subtree_root(&leaves[..split]),
        &subtree_root(&leaves[split..]),
    )
}

/// The root of `leaves`, appending each leaf's siblings at this level and above to its proof.
fn subtree(leaves: &[[u8; 32]], proofs: &mut [Proof]) -> [u8; 32] {
    if leaves.len() == 1 {
        return leaves[0];
    }
    let split = split_point(leaves.len());
    let (left_proofs, right_proofs) = proofs.split_at_mut(split);
    let left = subtree(&leaves[..split], left_proofs);
    let right = subtree(&leaves[split..], right_proofs);
    for proof in left_proofs {
        proof.siblings.push(right);
    }
    for proof in right_proofs {
        proof.siblings.push(left);
    }
    node_hash(&left, &right)
}

/// Every level of the tree of some ids, leaves first, root last: built once (about 2n hashes) to
/// give the proofs of a few of its leaves without building all n of them.
///
/// Bottom-up pairing with an unpaired last node carried up unchanged gives RFC 9162's tree (the
/// split at the largest power of two), so a proof is, level by level, the sibling of the node on
/// the leaf's path where there is one.
#[derive(Debug, Clone)]
pub struct Levels(Vec<Vec<[u8; 32]>>);

impl Levels {
    /// The levels of the tree of `ids` (at least one).
    pub fn new(ids: &[ScribeId]) -> Levels {
        assert!(!ids.is_empty(), "a tree has at least one leaf");
        let mut levels = vec![ids.iter().map(leaf_hash).collect::<Vec<_>>()];
        while levels.last().expect("one level").len() > 1 {
            let below = levels.last().expect("one level");
            let above = below
                .chunks(2)
                .map(|pair| match pair {
                    [left, right] => node_hash(left, right),
                    [carried] => *carried,
                    _ => unreachable!("chunks of two"),
                })
                .collect();
            levels.push(above);
        }
        Levels(levels)
    }

    /// How many leaves the tree has.
    pub fn count(&self) -> u64 {
        self.0[0].len() as u64
    }

    /// The proof of the leaf at `index`, if there is one.
    pub fn proof(&self, index: u64) -> Option<Proof> {
        if index >= self.count() {
            return None;
        }
        let mut siblings = Vec::new();
        let mut at = index as usize;
        for level in &self.0[..self.0.len() - 1] {
            if let Some(sibling) = level.get(at ^ 1) {
                siblings.push(*sibling);
            }
            at /= 2;
        }
        Some(Proof { index, siblings })
    }
}

/// The largest power of two below `n` (n > 1).
fn split_point(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// Checks that `proof` leads from `id` to `root` in a tree of `count` leaves (RFC 9162 2.1.3.2).
/// The error says what does not fit.
pub fn check(id: &ScribeId, proof: &Proof, count: u64, root: &[u8; 32]) -> Result<(), String> {
    if proof.index >= count {
        return Err(format!(
            "proof index {} is outside the seal's {count} ids",
            proof.index
        ));
    }
    let mut fn_ = proof.index;
    let mut sn = count - 1;
    let mut r = leaf_hash(id);
    for sibling in &proof.siblings {
        if sn == 0 {
            return Err(format!(
                "the proof has {} siblings, more than a tree of {count} has",
                proof.siblings.len()
            ));
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(sibling, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, sibling);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(format!(
            "the proof has {} siblings, fewer than a tree of {count} needs",
            proof.siblings.len()
        ));
    }
    if &r != root {
        return Err("the proof does not lead to the seal's root".into());
    }
    Ok(())
}
