//! Subscriptions: the backlog from a seq, then exactly one `CaughtUp`, then live scribes.
//!
//! A subscription is a task that always reads from the store, bounded by the published head, and
//! pushes into a bounded channel. There is no in-memory fan-out buffer that could overflow, so a
//! subscriber that reads slowly is never dropped and never skips a scribe: it simply reads further
//! behind the head, from storage, until it catches up again (invariant 8). Freshly committed scribes
//! are still in RocksDB's memtable, so the live tail costs a memory read, not a disk read.
//!
//! What is not here: per-subscriber durable checkpoints (the projection issue adds named consumers).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use quire_projection_api::StreamId;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::store::{StoreError, StoredEntry};
use super::{read_range, Log, Shared};

/// Scribes read from the store per round trip of a subscription.
const READ_CHUNK: usize = 512;
/// Most bytes of envelopes and payloads one read of a subscription or `Log.Read` loads (at least
/// one scribe): the store's default.
pub const READ_BYTES: usize = super::store::READ_BYTES;
/// Most bytes of scribes waiting in a subscription's channel for its reader (one scribe larger
/// than this waits alone). With [`READ_BYTES`], a subscription holds at most about 8 MiB and two
/// scribes, however large the stream's payloads and however slowly its reader reads.
pub const SUBSCRIPTION_BYTES: usize = 4 << 20;

/// Most bytes of scribes and entries that readers' channels (subscriptions, `Log.Read`, kv
/// watches) hold for their clients in all, and for the clients of one address: however many calls
/// strangers open and leave unread, they hold at most these. A call past them waits (reading
/// nothing more from the store) until other readers take what waits for them.
pub const NODE_READER_BYTES: usize = 256 << 20;
/// See [`NODE_READER_BYTES`].
pub const ADDRESS_READER_BYTES: usize = 32 << 20;

/// The node's budget of bytes waiting in readers' channels, in all and per address.
pub struct ReaderBytes {
    node: Arc<Semaphore>,
    addresses: std::sync::Mutex<HashMap<IpAddr, Weak<Semaphore>>>,
}

impl std::fmt::Debug for ReaderBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderBytes")
            .field("free", &self.node.available_permits())
            .finish()
    }
}

impl Default for ReaderBytes {
    fn default() -> Self {
        ReaderBytes {
            node: Arc::new(Semaphore::new(NODE_READER_BYTES)),
            addresses: std::sync::Mutex::new(HashMap::new()),
        }
    }
}

impl ReaderBytes {
    /// The shares a reader for `caller` draws on: the node's, and its address's (`None`: a
    /// reader inside the node, which draws on the node's alone; so does the node's own machine,
    /// at 127.0.0.1 or ::1 — the owner's tools and local apps, like the connection caps).
    pub fn share(&self, caller: Option<SocketAddr>) -> Share {
        let own_machine = |caller: &SocketAddr| {
            let ip = caller.ip().to_canonical();
            ip == IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
                || ip == IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        };
        let address = caller.filter(|caller| !own_machine(caller)).map(|caller| {
            let address = crate::net::address_of(&caller);
            let mut addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(budget) = addresses.get(&address).and_then(Weak::upgrade) {
                return budget;
            }
            if addresses.len() >= 1024 {
                addresses.retain(|_, budget| budget.strong_count() > 0);
            }
            let budget = Arc::new(Semaphore::new(ADDRESS_READER_BYTES));
            addresses.insert(address, Arc::downgrade(&budget));
            budget
        });
        Share {
            node: Some(self.node.clone()),
            address,
        }
    }
}

/// The shared budgets a [`metered`] channel also draws on (see [`ReaderBytes`]).
#[derive(Clone, Debug, Default)]
pub struct Share {
    node: Option<Arc<Semaphore>>,
    address: Option<Arc<Semaphore>>,
}

/// The budgets an item holds until it is received: its channel's, its address's, the node's.
type Held = [Option<OwnedSemaphorePermit>; 3];

/// A bounded channel whose items also hold their bytes of a budget until they are received:
/// at most `items` items and about `bytes` bytes wait (an item larger than the budget waits
/// alone), drawn on `share` too.
pub(crate) fn metered<T>(
    items: usize,
    bytes: usize,
    share: Share,
) -> (MeteredSender<T>, Metered<T>) {
    let (sender, receiver) = mpsc::channel(items.max(1));
    let bytes = bytes.clamp(1, u32::MAX as usize);
    (
        MeteredSender {
            sender,
            budget: Arc::new(Semaphore::new(bytes)),
            bytes,
            share,
        },
        Metered { receiver },
    )
}

/// Takes `size` bytes (at most `cap`, at least one) of `budget`.
async fn take(budget: &Arc<Semaphore>, size: usize, cap: usize) -> Option<OwnedSemaphorePermit> {
    let cost = size.clamp(1, cap) as u32;
    budget.clone().acquire_many_owned(cost).await.ok()
}

/// The sending half of [`metered`].
pub(crate) struct MeteredSender<T> {
    sender: mpsc::Sender<(T, Held)>,
    budget: Arc<Semaphore>,
    bytes: usize,
    share: Share,
}

impl<T> MeteredSender<T> {
    /// The bytes of this channel's budget, its address's and the node's, for an item of `size`.
    async fn held(&self, size: usize) -> Held {
        let own = take(&self.budget, size, self.bytes).await;
        let address = match &self.share.address {
            Some(budget) => take(budget, size, self.bytes).await,
            None => None,
        };
        let node = match &self.share.node {
            Some(budget) => take(budget, size, self.bytes).await,
            None => None,
        };
        [own, address, node]
    }

    /// Room in the shared budgets (the address's, the node's) for a read of up to `bytes`, taken
    /// *before* the read: what a reader reads counts from the start, so a reader whose client
    /// reads nothing reads nothing more once the budgets are spent. `None` when the receiver is
    /// gone.
    pub(crate) async fn ticket(&self, bytes: usize) -> Option<Ticket> {
        let take_shares = async {
            // First, until what waits for the reader is taken: a stalled reader holds what
            // waits for it, not that and a chunk read ahead.
            drop(take(&self.budget, self.bytes, self.bytes).await);
            let address = match &self.share.address {
                Some(budget) => take(budget, bytes, self.bytes.max(bytes)).await,
                None => None,
            };
            let node = match &self.share.node {
                Some(budget) => take(budget, bytes, self.bytes.max(bytes)).await,
                None => None,
            };
            Ticket { address, node }
        };
        tokio::select! {
            ticket = take_shares => Some(ticket),
            () = self.sender.closed() => None,
        }
    }

    /// [`MeteredSender::send`] for an item read under `ticket`: its bytes of the shared budgets
    /// come out of the ticket (as far as it goes).
    pub(crate) async fn send_read(
        &self,
        item: T,
        size: usize,
        ticket: &mut Ticket,
    ) -> Result<(), ()> {
        let cost = size.clamp(1, self.bytes) as u32;
        let held = async {
            let own = take(&self.budget, size, self.bytes).await;
            let address = match ticket.address.as_mut().and_then(|p| split(p, cost)) {
                Some(permit) => Some(permit),
                None => match ticket.address.take() {
                    Some(rest) => Some(rest),
                    None => match &self.share.address {
                        Some(budget) => take(budget, size, self.bytes).await,
                        None => None,
                    },
                },
            };
            let node = match ticket.node.as_mut().and_then(|p| split(p, cost)) {
                Some(permit) => Some(permit),
                None => match ticket.node.take() {
                    Some(rest) => Some(rest),
                    None => match &self.share.node {
                        Some(budget) => take(budget, size, self.bytes).await,
                        None => None,
                    },
                },
            };
            [own, address, node]
        };
        let held = tokio::select! {
            held = held => held,
            () = self.sender.closed() => return Err(()),
        };
        self.sender.send((item, held)).await.map_err(|_| ())
    }

    /// Sends `item`, which holds `size` bytes, once the budgets and the channel have room; `Err`
    /// when the receiver is gone.
    pub(crate) async fn send(&self, item: T, size: usize) -> Result<(), ()> {
        let held = tokio::select! {
            held = self.held(size) => held,
            () = self.sender.closed() => return Err(()),
        };
        self.sender.send((item, held)).await.map_err(|_| ())
    }

    /// Waits for room for one item in the channel; the permit then waits for its bytes.
    pub(crate) async fn reserve(&self) -> Result<MeteredPermit<'_, T>, ()> {
        let permit = self.sender.reserve().await.map_err(|_| ())?;
        Ok(MeteredPermit {
            permit,
            sender: self,
        })
    }

    /// Sends `item`, which holds no bytes, if the channel has room now.
    pub(crate) fn try_send(&self, item: T) {
        let _ = self.sender.try_send((item, [None, None, None]));
    }

    /// Resolves once the receiver is gone.
    pub(crate) async fn closed(&self) {
        self.sender.closed().await
    }
}

/// Bytes of the shared budgets taken before a read (see [`MeteredSender::ticket`]); what its items
/// do not take goes back when it is dropped.
#[derive(Debug)]
pub(crate) struct Ticket {
    address: Option<OwnedSemaphorePermit>,
    node: Option<OwnedSemaphorePermit>,
}

impl Ticket {
    /// Gives back what the read did not take: the ticket keeps `bytes` (at least one).
    pub(crate) fn keep(&mut self, bytes: usize) {
        for permit in [&mut self.address, &mut self.node].into_iter().flatten() {
            let excess = permit.num_permits().saturating_sub(bytes.max(1));
            if excess > 0 {
                drop(permit.split(excess));
            }
        }
    }
}

/// `cost` permits split off `permit`, if it holds more than that.
fn split(permit: &mut OwnedSemaphorePermit, cost: u32) -> Option<OwnedSemaphorePermit> {
    if permit.num_permits() > cost as usize {
        permit.split(cost as usize)
    } else {
        None
    }
}

/// Room for one item in a [`metered`] channel (see [`MeteredSender::reserve`]).
pub(crate) struct MeteredPermit<'a, T> {
    permit: mpsc::Permit<'a, (T, Held)>,
    sender: &'a MeteredSender<T>,
}

impl<T> MeteredPermit<'_, T> {
    /// Sends `item`, which holds `size` bytes, once the budgets have room for them.
    pub(crate) async fn send(self, item: T, size: usize) {
        let held = self.sender.held(size).await;
        self.permit.send((item, held));
    }
}

/// The receiving half of [`metered`]; a received item gives its bytes back to the budgets.
pub struct Metered<T> {
    receiver: mpsc::Receiver<(T, Held)>,
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
    /// The budgets a reader for `caller` draws on (see [`ReaderBytes`]).
    pub fn reader_share(&self, caller: Option<SocketAddr>) -> Share {
        self.shared().readers.share(caller)
    }

    /// Subscribes to `stream` (`None`: the whole log) from local seq `from` (inclusive; 0 means 1).
    /// The receiver yields the backlog, one [`LogEvent::CaughtUp`], then live scribes; at most
    /// `buffer` events and about [`SUBSCRIPTION_BYTES`] wait in memory, drawn on the node's
    /// readers' budget too ([`ReaderBytes`]) and on that of `caller`'s address, if given. The
    /// subscription ends when the receiver is dropped or the log closes; a storage error is
    /// delivered and ends it.
    pub fn subscribe(
        &self,
        stream: Option<StreamId>,
        from: u64,
        buffer: usize,
        caller: Option<SocketAddr>,
    ) -> Subscription {
        let (events, receiver) = metered(buffer, SUBSCRIPTION_BYTES, self.reader_share(caller));
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
            // A stalled reader waits here for its client; the log closing ends the wait.
            let ticket = tokio::select! {
                ticket = events.ticket(READ_BYTES) => ticket,
                _ = closing.changed() => {
                    events.try_send(Err(StoreError::Closed));
                    return;
                }
            };
            let Some(mut ticket) = ticket else {
                return;
            };
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
            ticket.keep(chunk.entries.iter().map(|e| e.parts.size() as usize).sum());
            // A chunk no limit ended means everything up to `head` was read; otherwise go on
            // after its last scribe.
            next = match chunk.entries.last() {
                Some(last) if chunk.more => last.seq + 1,
                _ => head + 1,
            };
            for entry in chunk.entries {
                let size = entry.parts.size() as usize;
                tokio::select! {
                    sent = events.send_read(Ok(LogEvent::Entry(entry)), size, &mut ticket) => if sent.is_err() { return },
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
