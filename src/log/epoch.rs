//! Log epochs: which of a node's local seqs still name the scribes they named when a peer saw them.
//!
//! A node numbers the scribes it stores 1, 2, 3… (its local seqs), and peers remember how far they
//! got in those numbers (cursors) and which scribes they received from it (origins). Without
//! `--sync`, a power loss can take the log's unsynced tail: the node comes back at an older head
//! and numbers its next scribes with seqs its peers have already seen for other scribes. Restoring
//! a backup of the data directory does the same.
//!
//! So the numbering carries an **epoch**, a random 16-byte id, and the node starts a new one every
//! time its store is opened for writing, remembering each earlier epoch with the head at which it
//! ended (the head the store had when it was next opened: everything at or below it survived).
//! A peer's cursor or origin `(epoch, seq)` is then judged by [`Epochs::valid_through`]:
//! - the current epoch: all of it is valid;
//! - an earlier epoch this node remembers: valid up to the lowest head any epoch since then ended
//!   at (seqs above it may have been lost and reused);
//! - an epoch it does not remember (a data directory wiped, or restored from a backup taken before
//!   that epoch began): none of it.
//!
//! A clean restart costs peers nothing (their cursors are all at or below the head the epoch ended
//! at); a lost tail costs them only the lost part, and the scribes they got from the lost part go
//! back to the node, which has lost them.

/// Earlier epochs remembered (a cursor or origin of an older one counts as unknown: the peer starts
/// that stream over, which is correct and only costs a re-read).
pub const MAX_ENDED: usize = 64;

/// A node's current epoch and the earlier ones it remembers, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Epochs {
    /// The epoch new seqs belong to.
    pub current: [u8; 16],
    /// Earlier epochs, oldest first, each with the head the store had when the next began.
    pub ended: Vec<([u8; 16], u64)>,
}

impl Epochs {
    /// The epochs of a new data directory: one, with nothing before it.
    pub fn new(current: [u8; 16]) -> Epochs {
        Epochs {
            current,
            ended: Vec::new(),
        }
    }

    /// Starts epoch `next`: the current one ends at `head` (the store's head now).
    pub fn rotate(&mut self, head: u64, next: [u8; 16]) {
        self.ended.push((self.current, head));
        if self.ended.len() > MAX_ENDED {
            self.ended.remove(0);
        }
        self.current = next;
    }

    /// How much of "seqs up to `seq` of `epoch`" still names the same scribes: `seq` itself in the
    /// current epoch; in an earlier one, `seq` capped by the head each epoch since then ended at;
    /// `None` for an epoch not remembered.
    pub fn valid_through(&self, epoch: &[u8; 16], seq: u64) -> Option<u64> {
        if *epoch == self.current {
            return Some(seq);
        }
        let at = self.ended.iter().position(|(ended, _)| ended == epoch)?;
        Some(
            self.ended[at..]
                .iter()
                .map(|(_, head)| *head)
                .fold(seq, u64::min),
        )
    }

    /// Whether the scribe at `seq` of `epoch` is still at that seq (so the node still holds it).
    pub fn still_holds(&self, epoch: &[u8; 16], seq: u64) -> bool {
        self.valid_through(epoch, seq) == Some(seq)
    }

    /// The stored form: current (16) ‖ per ended epoch, oldest first: epoch (16) ‖ head (u64 BE).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + 24 * self.ended.len());
        out.extend_from_slice(&self.current);
        for (epoch, head) in &self.ended {
            out.extend_from_slice(epoch);
            out.extend_from_slice(&head.to_be_bytes());
        }
        out
    }

    /// Reads [`Epochs::encode`]'s form; `None` if it has another shape.
    pub fn decode(bytes: &[u8]) -> Option<Epochs> {
        if bytes.len() < 16 || (bytes.len() - 16) % 24 != 0 {
            return None;
        }
        let current = bytes[..16].try_into().ok()?;
        let ended = bytes[16..]
            .chunks_exact(24)
            .map(|chunk| {
                let epoch: [u8; 16] = chunk[..16].try_into().expect("16 bytes");
                let head = u64::from_be_bytes(chunk[16..].try_into().expect("8 bytes"));
                (epoch, head)
            })
            .collect();
        Some(Epochs { current, ended })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn earlier_epochs_are_valid_up_to_the_lowest_head_since() {
        let mut epochs = Epochs::new([1; 16]);
        epochs.rotate(50, [2; 16]); // epoch 1 ended at 50
        epochs.rotate(30, [3; 16]); // epoch 2 ended at 30: seqs 31..50 of epoch 1 were lost
        assert_eq!(epochs.valid_through(&[3; 16], 99), Some(99));
        assert_eq!(epochs.valid_through(&[2; 16], 40), Some(30));
        assert_eq!(epochs.valid_through(&[1; 16], 45), Some(30));
        assert_eq!(epochs.valid_through(&[1; 16], 20), Some(20));
        assert_eq!(epochs.valid_through(&[9; 16], 20), None);
        assert!(epochs.still_holds(&[1; 16], 30));
        assert!(!epochs.still_holds(&[1; 16], 31));
        assert!(!epochs.still_holds(&[9; 16], 1));
    }

    #[test]
    fn only_the_newest_epochs_are_remembered() {
        let mut epochs = Epochs::new([0; 16]);
        for n in 1..=(MAX_ENDED as u64 + 5) {
            epochs.rotate(n, n.to_be_bytes().repeat(2).try_into().unwrap());
        }
        assert_eq!(epochs.ended.len(), MAX_ENDED);
        assert_eq!(epochs.valid_through(&[0; 16], 1), None, "forgotten");
        assert_eq!(Epochs::decode(&epochs.encode()), Some(epochs));
        assert_eq!(Epochs::decode(&[0; 17]), None);
    }

    proptest! {
        /// Whatever the heads, a seq valid in an old epoch is never above any later end, and the
        /// answer for the current epoch is the seq itself.
        #[test]
        fn valid_never_exceeds_a_later_end(heads in proptest::collection::vec(0u64..100, 0..10), seq in 0u64..120) {
            let mut epochs = Epochs::new([0; 16]);
            for (n, head) in heads.iter().enumerate() {
                epochs.rotate(*head, [n as u8 + 1; 16]);
            }
            for (n, (epoch, _)) in epochs.ended.iter().enumerate() {
                let valid = epochs.valid_through(epoch, seq).unwrap();
                prop_assert!(valid <= seq);
                prop_assert!(epochs.ended[n..].iter().all(|(_, head)| valid <= *head));
            }
            prop_assert_eq!(epochs.valid_through(&epochs.current, seq), Some(seq));
        }
    }
}
