//! The open projection copies, within their share of the node's file descriptors
//! ([`crate::fds::FdBudget::open_copies`]). Each open copy of a SQLite-backed projector holds
//! about [`crate::fds::FDS_PER_COPY`] descriptors (the database, its WAL and its shared memory); a
//! node that held every copy of every stream open would stop at about a hundred streams under the
//! common limit of 1,024. So copies are opened when used and the least recently used are closed
//! once more than the budget are open: a quiet stream costs no descriptor, a busy one stays open.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};

use super::slot::{lock, Slot};
use crate::fds::MIN_OPEN_COPIES;

/// The projection slots whose copies are open, least recently used first.
pub(crate) struct OpenCopies {
    max: usize,
    state: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    tick: u64,
    by_key: HashMap<String, u64>,
    order: BTreeMap<u64, (String, Weak<Slot>)>,
}

impl Lru {
    fn touch(&mut self, key: &str, slot: Weak<Slot>) {
        self.tick += 1;
        if let Some(old) = self.by_key.insert(key.to_string(), self.tick) {
            self.order.remove(&old);
        }
        self.order.insert(self.tick, (key.to_string(), slot));
    }
}

impl OpenCopies {
    pub(crate) fn new(max: usize) -> OpenCopies {
        OpenCopies {
            max: max.max(MIN_OPEN_COPIES),
            state: Mutex::new(Lru::default()),
        }
    }

    /// `slot` was just used and its copies are open: it becomes the most recently used, and the
    /// least recently used past the budget are closed (a copy in use right now is passed over
    /// and kept as recent). Blocking: closing a SQLite copy checkpoints its WAL.
    pub(crate) fn used(&self, slot: &Arc<Slot>) {
        let victims = {
            let mut lru = lock(&self.state);
            lru.touch(slot.key(), Arc::downgrade(slot));
            let mut victims = Vec::new();
            while lru.order.len() > self.max {
                let Some((_, (key, weak))) = lru.order.pop_first() else {
                    break;
                };
                lru.by_key.remove(&key);
                victims.push((key, weak));
            }
            victims
        };
        let mut busy = Vec::new();
        for (key, weak) in victims {
            let Some(victim) = weak.upgrade() else {
                continue; // its stream was left
            };
            if !victim.close_copies() {
                busy.push((key, weak));
            }
        }
        if !busy.is_empty() {
            let mut lru = lock(&self.state);
            for (key, weak) in busy {
                lru.touch(&key, weak);
            }
        }
    }

    /// The slot `key` is gone.
    pub(crate) fn forget(&self, key: &str) {
        let mut lru = lock(&self.state);
        if let Some(tick) = lru.by_key.remove(key) {
            lru.order.remove(&tick);
        }
    }

    /// How many slots are counted as open.
    pub(crate) fn len(&self) -> usize {
        lock(&self.state).order.len()
    }

    /// The most slots kept open.
    pub(crate) fn max(&self) -> usize {
        self.max
    }
}
