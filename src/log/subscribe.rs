//! Subscriptions: the backlog from a seq, then exactly one `CaughtUp`, then live scribes.
//!
//! A subscription is a task that always reads from the store, bounded by the published head, and
//! pushes into a bounded channel. There is no in-memory fan-out buffer that could overflow, so a
//! subscriber that reads slowly is never dropped and never skips a scribe: it simply reads further
//! behind the head, from storage, until it catches up again (invariant 8). Freshly committed scribes
//! are still in RocksDB's memtable, so the live tail costs a memory read, not a disk read.
//!
//! What is not here: per-subscriber durable checkpoints (the projection issue adds named consumers).

use std::sync::Arc;

use quire_projection_api::StreamId;
use tokio::sync::mpsc;

use super::store::{StoreError, StoredEntry};
use super::{read_range, Log, Shared};

/// Scribes read from the store per round trip of a subscription.
const READ_CHUNK: usize = 512;

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
// Nearly every event is an `Entry`: boxing it would add an allocation per scribe delivered.
#[allow(clippy::large_enum_variant)]
pub enum LogEvent {
    /// A stored scribe, in local order.
    Entry(StoredEntry),
    /// Sent once: every scribe up to this seq has been delivered.
    CaughtUp(u64),
}

impl Log {
    /// Subscribes to `stream` (`None`: the whole log) from local seq `from` (inclusive; 0 means 1).
    /// The receiver yields the backlog, one [`LogEvent::CaughtUp`], then live scribes; at most
    /// `buffer` events wait in memory. The subscription ends when the receiver is dropped or the log
    /// closes; a storage error is delivered and ends it.
    pub fn subscribe(
        &self,
        stream: Option<StreamId>,
        from: u64,
        buffer: usize,
    ) -> mpsc::Receiver<Result<LogEvent, StoreError>> {
        let (events, receiver) = mpsc::channel(buffer.max(1));
        let shared = self.shared().clone();
        tokio::spawn(run(shared, stream, from.max(1), events));
        receiver
    }
}

async fn run(
    shared: Arc<Shared>,
    stream: Option<StreamId>,
    mut next: u64,
    events: mpsc::Sender<Result<LogEvent, StoreError>>,
) {
    let mut heads = shared.head_tx.subscribe();
    let mut closing = shared.closing.subscribe();
    let mut streams = shared.streams_tx.subscribe();
    // CaughtUp is due once everything up to the head at the start has been delivered, even if
    // writes keep the head moving (the subscriber would otherwise chase it forever).
    let mut caught_up_at = Some(*heads.borrow_and_update());
    loop {
        if *closing.borrow() {
            let _ = events.try_send(Err(StoreError::Closed));
            return;
        }
        streams.borrow_and_update();
        if let Some(stream) = stream {
            if !shared.holds(&stream) {
                let _ = events.send(Err(StoreError::Left(stream))).await;
                return;
            }
        }
        if let Some(target) = caught_up_at {
            if next > target {
                caught_up_at = None;
                if events.send(Ok(LogEvent::CaughtUp(next - 1))).await.is_err() {
                    return;
                }
                continue;
            }
        }
        let head = *heads.borrow_and_update();
        if next <= head {
            let reader = shared.clone();
            let read = tokio::task::spawn_blocking(move || {
                read_range(&reader.store, stream.as_ref(), next, head, READ_CHUNK)
            })
            .await;
            let entries = match read {
                Ok(Ok(entries)) => entries,
                Ok(Err(error)) => {
                    let _ = events.send(Err(error)).await;
                    return;
                }
                Err(_) => return,
            };
            // A short chunk means everything up to `head` was read; otherwise go on after the last.
            next = match entries.last() {
                Some(last) if entries.len() == READ_CHUNK => last.seq + 1,
                _ => head + 1,
            };
            for entry in entries {
                tokio::select! {
                    sent = events.send(Ok(LogEvent::Entry(entry))) => if sent.is_err() { return },
                    _ = closing.changed() => {
                        let _ = events.try_send(Err(StoreError::Closed));
                        return;
                    }
                }
            }
            continue;
        }
        tokio::select! {
            changed = heads.changed() => if changed.is_err() { return },
            _ = events.closed() => return,
            _ = closing.changed() => {}
            _ = streams.changed(), if stream.is_some() => {}
        }
    }
}
