//! Redaction: a `redact` scribe deletes the payload of the scribe it targets, on every node, and
//! the bytes leave the disk.
//!
//! What happens where:
//! - `rules.rs` judges a `redact` scribe (its target is stored, of its stream, redactable, and it
//!   is by the target's author or the stream's owner) and a redacted scribe from a peer (the
//!   `redact` scribe it carries must justify it), and refuses a redacted payload offered again.
//! - The committer hands each admitted `redact` scribe's target to `Store::commit`, which, in the
//!   same write batch, rewrites the target's record without its payload (naming the `redact`
//!   scribe, sent with it to peers from then on), deletes the payload unless another stored scribe
//!   names the same bytes, and marks the store as having something to purge.
//! - [`purge_loop`] then makes the deleted bytes leave the disk ([`Store::purge_redacted`]: a
//!   flush, so no write-ahead log holds them, and a compaction of their key ranges down to the
//!   last level), and clears the mark; a node that stopped before that purges everything when it
//!   opens ([`super::Log::open`]). [`Log::wait_purged`] waits for it (the `Redact` call answers
//!   after).
//! - Projections never see a redacted scribe, and a copy that meets a `redact` scribe is rebuilt
//!   without its target (`projection::slot`).
//!
//! [`Store::purge_redacted`]: super::store::Store::purge_redacted

use std::sync::Mutex;

use quire_projection_api::ScribeId;
use tokio::sync::watch;

use super::store::{Redacted, StoreError};
use super::Log;

/// Redactions committed and not yet purged from the disk.
pub(super) struct Redactions {
    pending: Mutex<Pending>,
    /// Commits with redactions so far.
    committed: watch::Sender<u64>,
    /// Of those, how many are purged.
    purged: watch::Sender<u64>,
}

#[derive(Default)]
struct Pending {
    /// Targets whose records were rewritten.
    targets: Vec<ScribeId>,
    /// Payloads deleted.
    hashes: Vec<[u8; 32]>,
}

impl Redactions {
    pub(super) fn new() -> Redactions {
        Redactions {
            pending: Mutex::new(Pending::default()),
            committed: watch::channel(0).0,
            purged: watch::channel(0).0,
        }
    }

    /// Called by the committer, holding the commit gate, after a commit with redactions.
    pub(super) fn committed(&self, redacted: Redacted) {
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.targets.extend(redacted.scribes);
            pending.hashes.extend(redacted.hashes);
        }
        self.committed.send_modify(|count| *count += 1);
    }
}

impl Log {
    /// How many commits with redactions this log has made since it opened.
    pub fn redactions_committed(&self) -> u64 {
        *self.shared.redactions.committed.borrow()
    }

    /// Makes the payloads redacted so far leave the disk (blocking: a flush and compactions).
    pub fn purge_redacted(&self) -> Result<(), StoreError> {
        let redactions = &self.shared.redactions;
        let count = *redactions.committed.borrow();
        let (targets, hashes) = {
            let mut pending = redactions.pending.lock().unwrap_or_else(|p| p.into_inner());
            (
                std::mem::take(&mut pending.targets),
                std::mem::take(&mut pending.hashes),
            )
        };
        if !targets.is_empty() {
            self.shared.store.purge_redacted(&targets, &hashes)?;
        }
        {
            // Under the commit gate, so no redaction commits between the check and the clear.
            let _gate = self.shared.gate.lock().unwrap_or_else(|p| p.into_inner());
            let none_left = redactions
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .targets
                .is_empty();
            if none_left {
                self.shared.store.clear_purge_mark()?;
            }
        }
        redactions.purged.send_if_modified(|purged| {
            let newer = count > *purged;
            if newer {
                *purged = count;
            }
            newer
        });
        Ok(())
    }

    /// Waits until the first `count` commits with redactions are purged from the disk (or the log
    /// closes).
    pub async fn wait_purged(&self, count: u64) {
        let mut purged = self.shared.redactions.purged.subscribe();
        let mut closing = self.shared.closing.subscribe();
        tokio::select! {
            _ = purged.wait_for(|purged| *purged >= count) => {}
            _ = closing.wait_for(|closing| *closing) => {}
        }
    }
}

/// Purges redacted payloads from the disk after each commit that redacts, until the log closes.
pub async fn purge_loop(log: Log) {
    let mut committed = log.shared.redactions.committed.subscribe();
    let mut closing = log.shared.closing.subscribe();
    loop {
        tokio::select! {
            _ = closing.wait_for(|closing| *closing) => return,
            changed = committed.changed() => if changed.is_err() { return },
        }
        let purging = log.clone();
        match tokio::task::spawn_blocking(move || purging.purge_redacted()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not purge redacted payloads; retrying at the next redaction or start")
            }
            Err(error) => tracing::warn!(%error, "the purge of redacted payloads panicked"),
        }
    }
}
