//! The driver of one peer connection: moves a [`Session`]'s messages over a tonic stream.
//!
//! It listens to four things at once — the peer's messages, room in the outbound queue, the local
//! head, and the set of local streams — and never blocks on one while another could deadlock it:
//! every message, control or data, is sent through a permit taken in the same `select!` that
//! reads the peer, so two peers pushing backlogs at each other keep reading each other too. Scribes
//! are read from storage only when there is room to send them (flow control: memory does not grow
//! with the backlog). Received batches are stored with their cursor before the next message is
//! read (back-pressure to the sender through HTTP/2 flow control).
//!
//! Also here: the dial loop with exponential backoff and jitter.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use quire_projection_api::{AuthorKey, ScribeId, StreamId};
use rand::Rng;
use tokio::sync::{mpsc, watch};

use super::session::{Action, Message, ReadPlan, Session, Step};
use super::wire::{self, WireError};
use super::{
    Command, Inner, FIRST_BACKOFF, MAX_BACKOFF, MAX_PEER_MESSAGE_BYTES, OUTBOUND_BYTES,
    OUTBOUND_QUEUE,
};
use crate::log::store::{CursorUpdate, PeerOrigin, StoreError};
use crate::log::subscribe::{metered, MeteredPermit, MeteredSender, Share};
use crate::log::AppendError;
use crate::net::{ChannelBinding, PeerTls, Proven};
use crate::pb;
use crate::scribe::{self, Parts};

/// Most scribes read into one batch: as many as a receiver takes.
pub const BATCH_SCRIBES: usize = super::session::MAX_BATCH_SCRIBES;
/// A batch is cut once it holds this many bytes (it always holds at least one scribe).
pub const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Time allowed for the handshake (Hello and Proof both ways).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Control messages queued towards a peer before its messages stop being read.
pub const MAX_CONTROL_QUEUE: usize = 64;
/// A connection that lasted less than this counts as a failed attempt for the backoff.
pub const MIN_HEALTHY_CONNECTION: Duration = Duration::from_secs(5);

/// Scribes over their author's quota a connection remembers (so their descendants are not held
/// against the peer either).
pub const MAX_OVER_QUOTA_REMEMBERED: usize = 100_000;

/// Invalid scribes a peer may send on one connection before it is disconnected (and banned for a
/// while, doubling each time).
pub const MAX_REFUSED_PER_CONNECTION: u64 = 64;

/// Why a peer connection ended. The message is what the peer is told and what `quire status`
/// shows as the peer's last error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// This node is shutting down.
    #[error("this node is shutting down")]
    ShuttingDown,
    /// The handshake did not complete in time.
    #[error("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    HandshakeTimeout,
    /// The outbound queue closed: the peer's side of the stream is gone.
    #[error("the peer went away")]
    PeerGone,
    /// The peer ended its stream.
    #[error("the peer closed the connection")]
    PeerClosed,
    /// The peer's stream failed with this gRPC status message.
    #[error("the peer's stream failed: {0}")]
    PeerStream(String),
    /// The peer sent a message that does not decode.
    #[error("malformed peer message: {0}")]
    Malformed(#[from] WireError),
    /// The local log closed under the connection.
    #[error("the log closed")]
    LogClosed,
    /// The node's table of connections closed.
    #[error("the connection registry closed")]
    RegistryClosed,
    /// The session (a protocol violation by the peer, or the peer's own error) or the node (peer
    /// removed) closed the connection, with this reason.
    #[error("{0}")]
    Closed(String),
    /// This node keeps as many scribes aside as it may (see `log::held`): what the peer sent
    /// was not stored and its cursor did not move; the peer sends it again on a later connection.
    #[error("this node already keeps as many scribes aside as it may (dated ahead, or refused by rules the peer does not share); the rest of stream {stream} waits for a later connection")]
    HeldFull {
        /// The stream of the batch.
        stream: StreamId,
    },
    /// The peer is banned for sending invalid scribes.
    #[error("node {peer} sent too many invalid scribes; refused for another {seconds} s")]
    Banned {
        /// The peer's node key.
        peer: AuthorKey,
        /// Seconds left of the ban.
        seconds: u64,
    },
    /// Another connection with the same peer is kept instead of this one.
    #[error(
        "a connection with this peer is already up (the one dialed by the lower node id is kept)"
    )]
    Duplicate,
    /// The peer's node key may not replicate with this node (`--peers`, `quire peer allow|deny`).
    #[error("{0}")]
    NotAllowed(String),
    /// The peer sent too many invalid scribes on this connection and is now banned.
    #[error("peer sent {refused} invalid scribes on this connection; disconnected and refused for {seconds} s")]
    TooManyRefused {
        /// Invalid scribes on this connection.
        refused: u64,
        /// Length of the ban in seconds.
        seconds: u64,
    },
    /// Data arrived before the handshake named the peer.
    #[error("{0} before the handshake")]
    BeforeHandshake(&'static str),
    /// Reading a stream's scribes to send failed.
    #[error("reading stream {stream}: {source}")]
    Read {
        /// The stream read.
        stream: StreamId,
        /// The storage error.
        source: StoreError,
    },
    /// Loading this peer's cursors failed.
    #[error("loading cursors: {0}")]
    Cursors(StoreError),
    /// Reading a genesis to serve failed.
    #[error("{0}")]
    Storage(#[from] StoreError),
    /// The log could not take the peer's scribes at all (not a refusal of one scribe: those are
    /// counted, and the connection goes on).
    #[error("storing scribes from the peer failed: {0}")]
    Replicate(AppendError),
    /// A blocking task of the connection panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The peer address is not one to dial.
    #[error("bad peer address {addr}: {reason}")]
    Address {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The peer could not be reached.
    #[error("cannot connect to peer {addr}: {source}")]
    Connect {
        /// The address dialed.
        addr: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The peer answered, but refused the replication stream.
    #[error("peer {addr} refused the replication stream: {message}")]
    Refused {
        /// The address dialed.
        addr: String,
        /// The gRPC status message.
        message: String,
    },
}

/// A connection's place in [`Inner::live`], given up when dropped.
struct Registered {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.inner.unregister(self.id);
    }
}

/// Sends `message` in the room `permit` holds, once the connection's byte budget has room for it.
async fn send(permit: MeteredPermit<'_, pb::PeerMessage>, message: &Message) {
    let message = wire::to_proto(message);
    let size = prost::Message::encoded_len(&message);
    permit.send(message, size).await;
}

/// Runs one connection to its end. `dialed`: this side dialed (the peer is at `addr`).
/// One connection's ends: which side dialed, the address, the listener's mark (accepted) and the
/// TLS channel binding the handshake proofs sign.
pub(crate) struct Link {
    pub(crate) dialed: bool,
    pub(crate) addr: String,
    pub(crate) proven: Option<Proven>,
    pub(crate) binding: ChannelBinding,
}

pub(crate) async fn run<S>(
    inner: Arc<Inner>,
    incoming: S,
    outgoing: MeteredSender<pb::PeerMessage>,
    link: Link,
) -> Result<(), ConnectionError>
where
    S: Stream<Item = Result<pb::PeerMessage, tonic::Status>> + Unpin + Send,
{
    let (commands_tx, commands) = mpsc::unbounded_channel();
    let id = inner.register(commands_tx);
    // Unregisters even if this future is dropped (a removed peer's dial loop drops it).
    let registered = Registered {
        inner: inner.clone(),
        id,
    };
    let mut driver = Driver {
        inner: inner.clone(),
        session: None,
        control: VecDeque::new(),
        peer: None,
        epoch: [0; 16],
        peer_rules: 0,
        dialed: link.dialed,
        addr: link.addr,
        refused_here: 0,
        id,
        proven: link.proven,
        binding: link.binding,
        over_quota: std::collections::HashSet::new(),
    };
    let result = driver.drive(incoming, &outgoing, commands).await;
    // Best effort: tell the peer why.
    if let Err(reason) = &result {
        outgoing.try_send(wire::to_proto(&Message::Error(reason.to_string())));
    }
    drop(registered);
    if !driver.dialed && driver.peer.is_none() {
        // An inbound connection that never completed the handshake leaves no trace in the
        // peer table (scanners and self-dials would otherwise fill it).
        return result;
    }
    let key = driver.state_key();
    inner.with_peer(&key, |state| {
        state.connected = inner
            .live
            .lock()
            .expect("live lock")
            .values()
            .any(|live| live.peer.is_some() && live.peer == driver.peer);
        if let Err(reason) = &result {
            state.last_error = Some(reason.to_string());
        }
    });
    result
}

struct Driver {
    inner: Arc<Inner>,
    session: Option<Session>,
    control: VecDeque<Message>,
    peer: Option<AuthorKey>,
    epoch: [u8; 16],
    /// The version of the rules the peer judges scribes by.
    peer_rules: u32,
    dialed: bool,
    addr: String,
    refused_here: u64,
    id: u64,
    /// An accepted connection's mark for its listener: set once the peer proved its key.
    proven: Option<Proven>,
    binding: ChannelBinding,
    /// Scribes this peer sent that were over their author's quota (and their descendants): not
    /// held against it.
    over_quota: std::collections::HashSet<ScribeId>,
}

impl Driver {
    /// Dialed peers are kept under their address, accepted ones under their node id.
    fn state_key(&self) -> String {
        match (self.dialed, self.peer) {
            (true, _) | (false, None) => self.addr.clone(),
            (false, Some(peer)) => peer.to_hex(),
        }
    }

    async fn drive<S>(
        &mut self,
        mut incoming: S,
        outgoing: &MeteredSender<pb::PeerMessage>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) -> Result<(), ConnectionError>
    where
        S: Stream<Item = Result<pb::PeerMessage, tonic::Status>> + Unpin + Send,
    {
        let log = self.inner.log.clone();
        let (session, actions) = Session::new(
            self.inner.key.clone(),
            log.epochs().clone(),
            log.rules_version(),
            rand::random(),
            self.binding.0,
        );
        self.session = Some(session);
        self.execute(actions).await?;
        let mut heads = log.watch_head();
        let mut streams = log.watch_streams();
        // Each held stream's genesis seq when this connection last looked: a stream left and
        // joined again between two looks has the same id but a new genesis seq.
        let incarnations = |log: &crate::log::Log| -> HashMap<StreamId, u64> {
            log.streams()
                .into_iter()
                .map(|state| (state.id, state.record.genesis_seq))
                .collect()
        };
        let mut seen = incarnations(&log);
        streams.borrow_and_update();
        let mut closing = self.inner.closing.clone();
        let mut maybe_more = true;
        let handshake_deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        loop {
            if *closing.borrow() {
                return Err(ConnectionError::ShuttingDown);
            }
            let started = self.session().is_started();
            let want_room = !self.control.is_empty() || (started && maybe_more);
            // A peer that asks for more than it reads stops being read until it catches up:
            // the control queue stays small.
            let room_to_read = self.control.len() < MAX_CONTROL_QUEUE;
            tokio::select! {
                () = tokio::time::sleep_until(handshake_deadline), if !started => {
                    return Err(ConnectionError::HandshakeTimeout);
                }
                permit = outgoing.reserve(), if want_room => {
                    let permit = permit.map_err(|()| ConnectionError::PeerGone)?;
                    if let Some(message) = self.control.pop_front() {
                        send(permit, &message).await;
                        continue;
                    }
                    let step = self.session_mut().next_step(|stream| log.stream(stream).map_or(0, |state| state.record.head_seq));
                    match step {
                        None => maybe_more = false,
                        Some(Step::Send(message)) => send(permit, &message).await,
                        Some(Step::Read(plan)) => {
                            if let Some(batch) = self.read(plan).await? {
                                if let Message::Batch { stream, scribes, .. } = &batch {
                                    let sent = scribes.len() as u64;
                                    let stream = *stream;
                                    self.counters(stream, |counters| counters.sent += sent);
                                }
                                send(permit, &batch).await;
                            }
                        }
                    }
                }
                message = incoming.next(), if room_to_read => {
                    let message = match message {
                        None => return Err(ConnectionError::PeerClosed),
                        Some(Err(status)) => return Err(ConnectionError::PeerStream(status.message().to_string())),
                        Some(Ok(message)) => message,
                    };
                    // A whole message: the bytes the listener counted for it are given back.
                    if let Some(proven) = &self.proven {
                        proven.message_received();
                    }
                    let message = wire::from_proto(message)?;
                    // A peer that now holds a stream we are waiting to join: ask it for the genesis.
                    let joinable: Vec<StreamId> = match &message {
                        Message::Streams(streams) => {
                            let pending = self.inner.pending_joins.lock().expect("joins lock");
                            streams.iter().filter(|stream| pending.contains(*stream)).copied().collect()
                        }
                        _ => Vec::new(),
                    };
                    let actions = self.session_mut().handle(message);
                    self.execute(actions).await?;
                    for stream in joinable {
                        let actions = self.session().request_genesis(stream);
                        self.execute(actions).await?;
                    }
                    maybe_more = true;
                }
                changed = heads.changed() => {
                    if changed.is_err() { return Err(ConnectionError::LogClosed); }
                    maybe_more = true;
                }
                changed = streams.changed() => {
                    if changed.is_err() { return Err(ConnectionError::LogClosed); }
                    let now = incarnations(&log);
                    if now.iter().any(|(id, genesis)| seen.get(id).is_some_and(|was| was != genesis)) {
                        return Err(ConnectionError::Closed("a stream was left and joined again; reconnecting to replicate it from the start".into()));
                    }
                    seen = now;
                    // Membership changes wake this too: a private stream the peer may no longer
                    // receive leaves the set, and nothing more of it is served (or asked for).
                    let ids = self.visible_streams();
                    let actions = self.session_mut().set_local_streams(ids);
                    self.execute(actions).await?;
                    maybe_more = true;
                }
                command = commands.recv() => match command {
                    Some(Command::RequestGenesis(stream)) => {
                        let actions = self.session().request_genesis(stream);
                        self.execute(actions).await?;
                    }
                    Some(Command::Close(reason)) => return Err(ConnectionError::Closed(reason)),
                    None => return Err(ConnectionError::RegistryClosed),
                },
                _ = closing.changed() => return Err(ConnectionError::ShuttingDown),
            }
        }
    }

    /// The streams this connection announces, serves and asks for: those the proven peer may
    /// receive (a private stream only if its node key holds a role in it); none before the
    /// handshake. Each with the seq its genesis is stored at (see `Message::Want`).
    fn visible_streams(&self) -> Vec<(StreamId, u64)> {
        match &self.peer {
            Some(peer) => self.inner.log.stream_ids_for(peer),
            None => Vec::new(),
        }
    }

    fn session(&self) -> &Session {
        self.session.as_ref().expect("session made at start")
    }

    fn session_mut(&mut self) -> &mut Session {
        self.session.as_mut().expect("session made at start")
    }

    fn counters(&self, stream: StreamId, update: impl FnOnce(&mut super::StreamCounters)) {
        let key = self.state_key();
        self.inner.with_peer(&key, |state| {
            update(state.streams.entry(stream).or_default())
        });
    }

    async fn read(&mut self, mut plan: ReadPlan) -> Result<Option<Message>, ConnectionError> {
        // One snapshot of the stream decides both whether the peer may receive it and how far:
        // a membership change and the scribes committed with it land in the snapshot together,
        // so nothing committed with (or after) a revoke reaches the revoked peer, even before
        // this connection has heard of the change.
        let Some(state) = self.inner.log.stream(&plan.stream) else {
            return Ok(None);
        };
        if self.peer.is_some_and(|peer| !state.may_read(&peer)) {
            let ids = self.visible_streams();
            let actions = self.session_mut().set_local_streams(ids);
            Box::pin(self.execute(actions)).await?;
            return Ok(None);
        }
        plan.to = plan.to.min(state.record.head_seq);
        if plan.to < plan.from {
            return Ok(None);
        }
        let log = self.inner.log.clone();
        let read = tokio::task::spawn_blocking(move || {
            log.store()
                .read_stream(&plan.stream, plan.from, plan.to, BATCH_SCRIBES, BATCH_BYTES)
        })
        .await?;
        let chunk = match read {
            Ok(chunk) => chunk,
            // Damage (a payload or seal missing, a malformed record) is local and lasting: stop
            // sending this stream, not every stream (closing would only reconnect and fail again).
            Err(source @ StoreError::Damaged(_)) => {
                let error = ConnectionError::Read {
                    stream: plan.stream,
                    source,
                };
                tracing::error!(peer = %self.peer.map(|peer| peer.short()).unwrap_or_default(), %error, "not sending this stream to the peer; its other streams go on");
                let key = self.state_key();
                self.inner
                    .with_peer(&key, |state| state.last_error = Some(error.to_string()));
                self.session_mut().stop_serving(&plan.stream);
                return Ok(None);
            }
            Err(source) => {
                return Err(ConnectionError::Read {
                    stream: plan.stream,
                    source,
                })
            }
        };
        // The store read counted bytes before loading payloads: a batch is at most BATCH_BYTES,
        // or one scribe.
        let kept = chunk
            .entries
            .into_iter()
            .map(|entry| (entry.seq, entry.id, entry.parts, entry.origin))
            .collect();
        Ok(self.session_mut().read_done(plan, kept, chunk.more))
    }

    async fn execute(&mut self, actions: Vec<Action>) -> Result<(), ConnectionError> {
        for action in actions {
            match action {
                Action::Send(message) => self.control.push_back(message),
                Action::Close(reason) => return Err(ConnectionError::Closed(reason)),
                Action::Ready { peer, epoch, rules } => self.ready(peer, epoch, rules).await?,
                Action::Store {
                    stream,
                    scribes,
                    through,
                    head,
                } => self.store(stream, scribes, through, head).await?,
                Action::CaughtUp { stream, seq } => {
                    tracing::debug!(peer = %self.peer.map(|peer| peer.short()).unwrap_or_default(), %stream, seq, "caught up");
                    self.counters(stream, |counters| counters.caught_up = true);
                }
                Action::ServeGenesis(stream) => {
                    let log = self.inner.log.clone();
                    let genesis = tokio::task::spawn_blocking(move || log.get(&stream)).await??;
                    self.control.push_back(Message::Genesis {
                        stream,
                        scribe: genesis.map(|entry| entry.parts),
                    });
                }
                Action::GenesisReceived { stream, scribe } => self.genesis(stream, scribe).await?,
            }
        }
        Ok(())
    }

    async fn ready(
        &mut self,
        peer: AuthorKey,
        epoch: [u8; 16],
        rules: u32,
    ) -> Result<(), ConnectionError> {
        if let Some(reason) = self.inner.refusal(&peer) {
            return Err(ConnectionError::NotAllowed(reason));
        }
        self.peer = Some(peer);
        if let Some(proven) = &self.proven {
            // The listener stops counting what this peer sends against its unproven budget.
            proven.set();
        }
        self.epoch = epoch;
        self.peer_rules = rules;
        let own = self.inner.log.rules_version();
        if rules != own {
            tracing::warn!(
                peer = %peer.short(),
                peer_rules = rules,
                rules = own,
                "this peer judges scribes by other rules: what this node's rules refuse of it is kept aside (not counted against it) until this node's rules change"
            );
        }
        if let Some(left) = self.inner.banned(&peer) {
            return Err(ConnectionError::Banned {
                peer,
                seconds: left.as_secs() + 1,
            });
        }
        let local = self.inner.log.node_key();
        let dialer = if self.dialed { local } else { peer };
        if !self.inner.claim(self.id, peer, dialer) {
            return Err(ConnectionError::Duplicate);
        }
        let key = self.state_key();
        let addr = self.addr.clone();
        self.inner.with_peer(&key, |state| {
            state.node = Some(peer);
            state.rules = rules;
            state.connected = true;
            state.connects += 1;
            state.last_error = None;
            for counters in state.streams.values_mut() {
                counters.caught_up = false;
            }
            if state.addr.is_empty() {
                state.addr = addr;
            }
        });
        tracing::info!(peer = %peer.short(), addr = %self.addr, dialed = self.dialed, "peer connected");
        let log = self.inner.log.clone();
        let cursors = tokio::task::spawn_blocking(move || log.cursors(&peer))
            .await?
            .map_err(ConnectionError::Cursors)?;
        let streams = self.visible_streams();
        let actions = self.session_mut().start(cursors, streams);
        Box::pin(self.execute(actions)).await?;
        let pending: Vec<StreamId> = self
            .inner
            .pending_joins
            .lock()
            .expect("joins lock")
            .iter()
            .copied()
            .collect();
        for stream in pending {
            let actions = self.session().request_genesis(stream);
            Box::pin(self.execute(actions)).await?;
        }
        Ok(())
    }

    async fn store(
        &mut self,
        stream: StreamId,
        scribes: Vec<super::session::WireScribe>,
        through: u64,
        head: u64,
    ) -> Result<(), ConnectionError> {
        let peer = self.peer.ok_or(ConnectionError::BeforeHandshake("store"))?;
        if self.inner.log.stream(&stream).is_none() {
            return Ok(()); // left while the batch was on its way
        }
        let cursor = CursorUpdate {
            peer,
            stream,
            epoch: self.epoch,
            seq: through,
        };
        let ids: Vec<ScribeId> = scribes.iter().map(|scribe| scribe.id).collect();
        let drafts: Vec<(Parts, Option<ScribeId>, u64)> = scribes
            .into_iter()
            .map(|scribe| (scribe.parts, Some(scribe.id), scribe.seq))
            .collect();
        let origin = PeerOrigin {
            peer,
            epoch: self.epoch,
            seq: u64::MAX, // each scribe's own
        };
        let keep_refused = self.peer_rules != self.inner.log.rules_version();
        let outcomes = self
            .inner
            .log
            .replicate(origin, stream, drafts, Some(cursor), keep_refused)
            .await
            .map_err(ConnectionError::Replicate)?;
        let (mut received, mut duplicates, mut refused, mut held) = (0, 0, 0, 0);
        let mut redacted_refused = 0;
        // A scribe this node had no room to hold is not the peer's fault: the log did not move
        // the cursor past it either, and the batch comes again on a later connection. Its
        // descendants in the batch miss their parent for the same reason; every other refusal
        // counts, so a peer cannot hide refusals behind a scribe that does not fit.
        let mut not_stored = std::collections::HashSet::new();
        for (id, outcome) in ids.iter().zip(&outcomes) {
            let waits = match outcome {
                Err(AppendError::HeldFull { .. }) => true,
                Err(AppendError::UnknownParent { parent, .. }) => not_stored.contains(parent),
                _ => false,
            };
            if waits {
                not_stored.insert(*id);
            }
        }
        let held_full = !not_stored.is_empty();
        // Over its author's quota: the author's doing, not the peer's (two nodes may hold other
        // scribes of an author at its quota), so neither it nor its descendants count — in this
        // batch or a later one on this connection.
        for (id, outcome) in ids.iter().zip(&outcomes) {
            let over = match outcome {
                Err(AppendError::QuotaExceeded { .. }) => true,
                Err(AppendError::UnknownParent { parent, .. }) => self.over_quota.contains(parent),
                _ => false,
            };
            if over && self.over_quota.len() < MAX_OVER_QUOTA_REMEMBERED {
                self.over_quota.insert(*id);
            }
        }
        let over_quota = &self.over_quota;
        // The stream was left while the batch was being stored: not the peer's fault.
        let left = |outcome: &Result<_, AppendError>| match outcome {
            Err(AppendError::Leaving(_)) => true,
            Err(AppendError::UnknownStream(_)) => self.inner.log.stream(&stream).is_none(),
            _ => false,
        };
        for (id, outcome) in ids.iter().zip(&outcomes) {
            match outcome {
                _ if not_stored.contains(id) || left(outcome) => {}
                _ if over_quota.contains(id) => {
                    tracing::debug!(peer = %peer.short(), %stream, %id, "a scribe over its author's quota, not stored");
                }
                Ok(appended) if appended.duplicate => duplicates += 1,
                // A payload this node redacted: not stored, and not the peer's fault (it may not
                // have the redaction yet), so counted apart and never toward a ban.
                Err(AppendError::Redacted(_)) => redacted_refused += 1,
                Ok(appended) if appended.held => held += 1,
                Ok(_) => received += 1,
                Err(error) => {
                    refused += 1;
                    tracing::warn!(peer = %peer.short(), %stream, %error, "refused a scribe from a peer");
                }
            }
        }
        let cursor_now = self.session().cursor(&stream);
        self.counters(stream, |counters| {
            counters.received += received;
            counters.duplicates += duplicates;
            counters.refused += refused;
            counters.held += held;
            counters.redacted_refused += redacted_refused;
            counters.cursor = cursor_now;
            counters.peer_head = counters.peer_head.max(head);
        });
        if refused > 0 {
            let key = self.state_key();
            self.inner.with_peer(&key, |state| state.refused += refused);
            self.refused_here += refused;
            if self.refused_here > MAX_REFUSED_PER_CONNECTION {
                let ban = self.inner.ban(peer);
                return Err(ConnectionError::TooManyRefused {
                    refused: self.refused_here,
                    seconds: ban.as_secs(),
                });
            }
        }
        if held_full {
            return Err(ConnectionError::HeldFull { stream });
        }
        Ok(())
    }

    /// The join of `stream` is no longer pending (done, or refused).
    async fn end_join(&self, stream: StreamId) {
        self.inner
            .pending_joins
            .lock()
            .expect("joins lock")
            .remove(&stream);
        let log = self.inner.log.clone();
        let _ =
            tokio::task::spawn_blocking(move || log.store().set_join_pending(&stream, false)).await;
    }

    async fn genesis(&mut self, stream: StreamId, scribe: Parts) -> Result<(), ConnectionError> {
        let peer = self
            .peer
            .ok_or(ConnectionError::BeforeHandshake("genesis"))?;
        if !self
            .inner
            .pending_joins
            .lock()
            .expect("joins lock")
            .contains(&stream)
        {
            return Ok(()); // not asked for, or already joined through another peer
        }
        if scribe::hash(&scribe.envelope) != stream {
            tracing::warn!(peer = %peer.short(), %stream, "a peer sent a genesis that does not hash to the stream id; ignored");
            let key = self.state_key();
            self.inner.with_peer(&key, |state| state.refused += 1);
            return Ok(());
        }
        // A genesis is served without its seq: the peer gets it back whenever its epoch changes
        // (a duplicate it ignores).
        let origin = PeerOrigin {
            peer,
            epoch: self.epoch,
            seq: u64::MAX,
        };
        let outcome = self
            .inner
            .log
            .replicate(
                origin,
                stream,
                vec![(scribe, Some(stream), u64::MAX)],
                None,
                false,
            )
            .await
            .map_err(ConnectionError::Replicate)?;
        match outcome.first() {
            Some(Ok(_)) => {
                self.end_join(stream).await;
                tracing::info!(%stream, peer = %peer.short(), "joined stream");
            }
            // This node's own choice of streams (`--accept-streams known`), or a genesis its
            // rules refuse (every peer has the same bytes: the id is their hash): not the
            // peer's fault. The join ends, and says why.
            Some(Err(error @ (AppendError::OwnerNotKnown { .. } | AppendError::BadGenesis(_)))) => {
                tracing::warn!(%stream, %error, "join refused");
                self.end_join(stream).await;
                let unknown = match error {
                    AppendError::OwnerNotKnown { key, .. } => Some(*key),
                    _ => None,
                };
                self.inner.refused_joins.lock().expect("joins lock").insert(
                    stream,
                    super::JoinRefusal {
                        reason: error.to_string(),
                        unknown,
                    },
                );
                self.inner.join_refused.notify_waiters();
            }
            Some(Err(error)) => {
                tracing::warn!(peer = %peer.short(), %stream, %error, "a peer sent an invalid genesis")
            }
            None => {}
        }
        Ok(())
    }
}

/// Dials `addr` again and again, with exponential backoff and jitter between failures, until the
/// node shuts down.
pub(crate) async fn dial_loop(inner: Arc<Inner>, addr: String, mut stop: watch::Receiver<bool>) {
    let mut failures: u32 = 0;
    let mut closing = inner.closing.clone();
    loop {
        if *closing.borrow() || stop.has_changed().is_err() {
            return;
        }
        let connects_before = inner.with_peer(&addr, |state| state.connects);
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            result = dial_once(inner.clone(), &addr) => result,
            _ = closing.changed() => return,
            // The peer was removed: dropping `dial_once` ends its connection.
            _ = stop.changed() => return,
        };
        let connected = inner.with_peer(&addr, |state| {
            if let Err(error) = &result {
                state.last_error = Some(error.to_string());
            }
            state.connected = false;
            // Only a connection that did its handshake and then lasted resets the backoff (a peer
            // that bans us completes the handshake and then hangs up at once).
            state.connects > connects_before && started.elapsed() >= MIN_HEALTHY_CONNECTION
        });
        failures = if connected {
            0
        } else {
            failures.saturating_add(1)
        };
        let delay = backoff(failures);
        if let Err(error) = &result {
            tracing::debug!(peer = %addr, %error, retry_in_ms = delay.as_millis() as u64, "peer connection ended");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = closing.changed() => return,
            _ = stop.changed() => return,
        }
    }
}

/// Exponential backoff with ±50% jitter: 0 after a connection that worked.
pub fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::from_millis(rand::thread_rng().gen_range(50..150));
    }
    let base = FIRST_BACKOFF
        .saturating_mul(1 << failures.min(10).saturating_sub(1))
        .min(MAX_BACKOFF);
    let jitter = rand::thread_rng().gen_range(0.5..1.5);
    base.mul_f64(jitter).min(MAX_BACKOFF)
}

async fn dial_once(inner: Arc<Inner>, addr: &str) -> Result<(), ConnectionError> {
    let (channel, binding) = peer_channel(inner.options.tls.as_ref(), addr).await?;
    let mut client = pb::peer_client::PeerClient::new(channel)
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
    let (outgoing, receiver) = metered(OUTBOUND_QUEUE, OUTBOUND_BYTES, Share::default());
    let response = client
        .replicate(receiver)
        .await
        .map_err(|status| ConnectionError::Refused {
            addr: addr.to_string(),
            message: status.message().to_string(),
        })?;
    let link = Link {
        dialed: true,
        addr: addr.to_string(),
        proven: None,
        binding,
    };
    run(inner, response.into_inner(), outgoing, link).await
}

/// Dials the peer listener at `addr` (host:port) over `tls` (plaintext without: the transport
/// benchmark's baseline) and returns an HTTP/2 channel on that one connection with its channel
/// binding, which the handshake proofs sign. Public for tests that play a peer by hand.
pub async fn peer_channel(
    tls: Option<&PeerTls>,
    addr: &str,
) -> Result<(tonic::transport::Channel, ChannelBinding), ConnectionError> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|error| ConnectionError::Address {
            addr: addr.to_string(),
            reason: error.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    let connect_error = |source| ConnectionError::Connect {
        addr: addr.to_string(),
        source,
    };
    let Some(tls) = tls else {
        let channel = endpoint.connect().await.map_err(connect_error)?;
        return Ok((channel, ChannelBinding([0; 32])));
    };
    // The connector runs once: this channel makes one call, and a new dial makes a new channel.
    let binding = Arc::new(std::sync::Mutex::new(None));
    let (connector_tls, exported, target) = (tls.clone(), binding.clone(), addr.to_string());
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let (tls, exported, target) = (connector_tls.clone(), exported.clone(), target.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(&target).await?;
            let _ = tcp.set_nodelay(true);
            let (stream, binding) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.connect(tcp))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            *exported.lock().expect("binding lock") = Some(binding);
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let channel = endpoint
        .connect_with_connector(connector)
        .await
        .map_err(connect_error)?;
    let binding = binding
        .lock()
        .expect("binding lock")
        .take()
        .ok_or_else(|| ConnectionError::Address {
            addr: addr.to_string(),
            reason: "the TLS session gave no channel binding".to_string(),
        })?;
    Ok((channel, binding))
}
