//! Subscriptions: the backlog from a seq, then exactly one `CaughtUp`, then live scribes.
//!
//! A subscription is a task that always reads from the store, bounded by the published head, and
//! pushes into a bounded channel. There is no in-memory fan-out buffer that could overflow, so a
//! subscriber that reads slowly is never dropped and never skips a scribe: it simply reads further
//! behind the head, from storage, until it catches up again (invariant 8). Freshly committed scribes
//! are still in RocksDB's memtable, so the live tail costs a memory read, not a disk read.
//!
//! What is not here: per-subscriber durable checkpoints (the projection issue adds named consumers).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quire_projection_api::StreamId;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::store::{StoreError, StoredEntry};
use super::{read_range, Log, Shared};

/// Scribes read from the store per round trip of a subscription.
const READ_CHUNK: usize = 512;
/// Most bytes of envelopes and payloads one read of a subscription loads (at least one scribe).
const READ_BYTES: usize = 4 << 20;
/// Most bytes of scribes waiting in a subscription's channel for its reader (one scribe larger
/// than this waits alone). With [`READ_BYTES`], a subscription holds at most about 8 MiB and two
/// scribes, however large the stream's payloads and however slowly its reader reads.
pub const SUBSCRIPTION_BYTES: usize = 4 << 20;

/// A bounded channel whose items also hold their bytes of a byte budget until they are received:
/// at most `items` items and about `bytes` bytes wait (an item larger than the budget waits alone).
pub(crate) fn metered<T>(items: usize, bytes: usize) -> (MeteredSender<T>, Metered<T>) {
    let (sender, receiver) = mpsc::channel(items.max(1));
    let bytes = bytes.clamp(1, u32::MAX as usize);
    (
        MeteredSender {
            sender,
            budget: Arc::new(Semaphore::new(bytes)),
            bytes,
        },
        Metered { receiver },
    )
}

/// The sending half of [`metered`].
pub(crate) struct MeteredSender<T> {
    sender: mpsc::Sender<(T, Option<OwnedSemaphorePermit>)>,
    budget: Arc<Semaphore>,
    bytes: usize,
}

impl<T> MeteredSender<T> {
    /// Sends `item`, which holds `size` bytes, once the budget and the channel have room; `Err`
    /// when the receiver is gone.
    pub(crate) async fn send(&self, item: T, size: usize) -> Result<(), ()> {
        let cost = size.clamp(1, self.bytes) as u32;
        let permit = tokio::select! {
            permit = self.budget.clone().acquire_many_owned(cost) => permit.ok(),
            () = self.sender.closed() => return Err(()),
        };
        self.sender.send((item, permit)).await.map_err(|_| ())
    }

    /// Waits for room for one item in the channel; the permit then waits for its bytes.
    pub(crate) async fn reserve(&self) -> Result<MeteredPermit<'_, T>, ()> {
        let permit = self.sender.reserve().await.map_err(|_| ())?;
        Ok(MeteredPermit {
            permit,
            budget: &self.budget,
            bytes: self.bytes,
        })
    }

    /// Sends `item`, which holds no bytes, if the channel has room now.
    pub(crate) fn try_send(&self, item: T) {
        let _ = self.sender.try_send((item, None));
    }

    /// Resolves once the receiver is gone.
    pub(crate) async fn closed(&self) {
        self.sender.closed().await
    }
}

/// Room for one item in a [`metered`] channel (see [`MeteredSender::reserve`]).
pub(crate) struct MeteredPermit<'a, T> {
    permit: mpsc::Permit<'a, (T, Option<OwnedSemaphorePermit>)>,
    budget: &'a Arc<Semaphore>,
    bytes: usize,
}

impl<T> MeteredPermit<'_, T> {
    /// Sends `item`, which holds `size` bytes, once the budget has room for them.
    pub(crate) async fn send(self, item: T, size: usize) {
        let cost = size.clamp(1, self.bytes) as u32;
        let bytes = self.budget.clone().acquire_many_owned(cost).await.ok();
        self.permit.send((item, bytes));
    }
}

/// The receiving half of [`metered`]; a received item gives its bytes back to the budget.
pub struct Metered<T> {
    receiver: mpsc::Receiver<(T, Option<OwnedSemaphorePermit>)>,
}

impl<T> std::fmt::Debug for Metered<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered")
            .field("waiting", &self.receiver.len())
            .finish()
    }
}

impl<T> Metered<T> {
    /// The next item; `None` once the sender is gone and nothing waits.
    pub async fn recv(&mut self) -> Option<T> {
        self.receiver.recv().await.map(|(item, _)| item)
    }
}

impl<T> tokio_stream::Stream for Metered<T> {
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.receiver
            .poll_recv(cx)
            .map(|item| item.map(|(item, _)| item))
    }
}

/// A subscription's events (see [`Log::subscribe`]).
pub type Subscription = Metered<Result<LogEvent, StoreError>>;

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
    /// `buffer` events and about [`SUBSCRIPTION_BYTES`] wait in memory. The subscription ends when
    /// the receiver is dropped or the log closes; a storage error is delivered and ends it.
    pub fn subscribe(&self, stream: Option<StreamId>, from: u64, buffer: usize) -> Subscription {
        let (events, receiver) = metered(buffer, SUBSCRIPTION_BYTES);
        let shared = self.shared().clone();
        tokio::spawn(run(shared, stream, from.max(1), events));
        receiver
    }
}

async fn run(
    shared: Arc<Shared>,
    stream: Option<StreamId>,
    mut next: u64,
    events: MeteredSender<Result<LogEvent, StoreError>>,
) {
    let mut heads = shared.head_tx.subscribe();
    let mut closing = shared.closing.subscribe();
    let mut streams = shared.streams_tx.subscribe();
    // CaughtUp is due once everything up to the head at the start has been delivered, even if
    // writes keep the head moving (the subscriber would otherwise chase it forever).
    let mut caught_up_at = Some(*heads.borrow_and_update());
    loop {
        if *closing.borrow() {
            events.try_send(Err(StoreError::Closed));
            return;
        }
        streams.borrow_and_update();
        if let Some(stream) = stream {
            if !shared.holds(&stream) {
                let _ = events.send(Err(StoreError::Left(stream)), 0).await;
                return;
            }
        }
        if let Some(target) = caught_up_at {
            if next > target {
                caught_up_at = None;
                if events
                    .send(Ok(LogEvent::CaughtUp(next - 1)), 0)
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        }
        let head = *heads.borrow_and_update();
        if next <= head {
            let reader = shared.clone();
            let read = tokio::task::spawn_blocking(move || {
                read_range(
                    &reader.store,
                    stream.as_ref(),
                    next,
                    head,
                    READ_CHUNK,
                    READ_BYTES,
                )
            })
            .await;
            let chunk = match read {
                Ok(Ok(chunk)) => chunk,
                Ok(Err(error)) => {
                    let _ = events.send(Err(error), 0).await;
                    return;
                }
                Err(_) => return,
            };
            // A chunk no limit ended means everything up to `head` was read; otherwise go on
            // after its last scribe.
            next = match chunk.entries.last() {
                Some(last) if chunk.more => last.seq + 1,
                _ => head + 1,
            };
            for entry in chunk.entries {
                let size = entry.parts.size() as usize;
                tokio::select! {
                    sent = events.send(Ok(LogEvent::Entry(entry)), size) => if sent.is_err() { return },
                    _ = closing.changed() => {
                        events.try_send(Err(StoreError::Closed));
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
