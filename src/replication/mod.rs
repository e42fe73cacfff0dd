//! Replication: peers exchange scribes by since-last-sync catch-up and a live tail over gRPC.
//!
//! - [`session`]: the protocol as a sans-IO state machine (handshake, wants, what to send next).
//! - [`wire`]: the peer wire codec (a session message to its protobuf bytes and back).
//! - [`connection`]: the driver that moves a session's messages over one tonic stream, reads
//!   from the store when there is room to send, and stores what arrives with its cursor.
//! - this module: the [`Replicator`] — the peer service (accepting side), the dial loops with
//!   backoff (dialing side), joins, and the counters `quire status` shows.
//!
//! **Architecture invariant:** every scribe received from a peer goes through `Log::replicate`,
//! the same validation as a client append; invalid scribes are refused, counted and never stored,
//! so they are never relayed either.
//!
//! **Architecture invariant:** the cursor on a peer is written in the same RocksDB write batch as
//! the scribes it covers (`Log::replicate`), so a crash can lose neither nor apply anything twice.

pub mod connection;
pub mod session;
pub mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use quire_projection_api::{AuthorKey, StreamId};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::log::store::PeerKeyRule;
use crate::log::subscribe::{metered, Share};
use crate::log::Log;
use crate::net::{ChannelBinding, PeerTls};
use crate::pb;

pub use crate::net::MAX_PEER_MESSAGE_BYTES;
const _: () = assert!(connection::BATCH_BYTES + (1 << 20) <= MAX_PEER_MESSAGE_BYTES);
/// Messages queued towards one peer before the connection stops reading from storage.
pub const OUTBOUND_QUEUE: usize = 8;
/// Bytes of messages queued towards one peer before the connection stops reading from storage
/// (one message larger than this waits alone): two batches of [`connection::BATCH_BYTES`].
pub const OUTBOUND_BYTES: usize = 2 * connection::BATCH_BYTES;
/// Longest wait between two dial attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// First wait after a failed dial.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Counters of one stream with one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamCounters {
    /// Last peer seq taken (the cursor).
    pub cursor: u64,
    /// The peer's newest seq of the stream, as last heard.
    pub peer_head: u64,
    /// Scribes sent to the peer.
    pub sent: u64,
    /// New scribes stored from the peer.
    pub received: u64,
    /// Scribes from the peer that were already stored.
    pub duplicates: u64,
    /// Scribes from the peer refused as invalid.
    pub refused: u64,
    /// Scribes from the peer dated too far ahead, kept aside (`log::held`).
    pub held: u64,
    /// Scribes from the peer whose payload this node redacted, offered with it: not stored.
    pub redacted_refused: u64,
    /// Whether the peer said `CaughtUp` on this connection.
    pub caught_up: bool,
}

/// What this node knows of one peer.
#[derive(Debug, Clone, Default)]
pub struct PeerState {
    /// The address dialed, or the remote address of an accepted connection.
    pub addr: String,
    /// The peer's node id, once a handshake succeeded.
    pub node: Option<AuthorKey>,
    /// Whether a connection is up.
    pub connected: bool,
    /// Whether this node dials it (a remembered peer).
    pub dialed: bool,
    /// Connections that completed a handshake.
    pub connects: u64,
    /// Why the last connection ended or failed.
    pub last_error: Option<String>,
    /// Invalid scribes refused from it, all streams.
    pub refused: u64,
    /// The version of the rules it judges scribes by (0: unknown, or before rule versions).
    pub rules: u32,
    /// Per stream.
    pub streams: BTreeMap<StreamId, StreamCounters>,
}

/// Which proven node keys may replicate with this node (`quire serve --peers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PeerAdmission {
    /// Any node key that proves itself, but those denied (`quire peer deny`).
    #[default]
    Open,
    /// Only node keys allowed with `quire peer allow`.
    Known,
}

impl std::str::FromStr for PeerAdmission {
    type Err = String;

    fn from_str(text: &str) -> Result<PeerAdmission, String> {
        match text {
            "open" => Ok(PeerAdmission::Open),
            "known" => Ok(PeerAdmission::Known),
            other => Err(format!("--peers is open or known, not {other:?}")),
        }
    }
}

/// How this node replicates.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    /// Which node keys may replicate with it.
    pub admission: PeerAdmission,
    /// The peer transport: TLS with channel-bound proofs (`net::tls`). `None` — plaintext HTTP/2
    /// with unbound proofs, which a relay can read and inject into — is for the transport
    /// benchmark's baseline only; `quire serve` never runs it.
    pub tls: Option<PeerTls>,
}

impl PeerOptions {
    /// Open admission over TLS (a fresh throwaway certificate).
    pub fn new() -> Result<PeerOptions, String> {
        Ok(PeerOptions {
            admission: PeerAdmission::Open,
            tls: Some(PeerTls::generate()?),
        })
    }
}

pub(crate) enum Command {
    RequestGenesis(StreamId),
    Close(String),
}

pub(crate) struct Live {
    peer: Option<AuthorKey>,
    dialer: Option<AuthorKey>,
    commands: mpsc::UnboundedSender<Command>,
}

pub(crate) struct Inner {
    pub(crate) log: Log,
    pub(crate) key: ed25519_dalek::SigningKey,
    /// Connections by id.
    pub(crate) live: Mutex<HashMap<u64, Live>>,
    /// Peer states: dialed ones by address, accepted ones by node id (hex).
    pub(crate) peers: Mutex<BTreeMap<String, PeerState>>,
    pub(crate) pending_joins: Mutex<HashSet<StreamId>>,
    /// Joins this node refused once the genesis came (`--accept-streams known` and an unknown
    /// key, or a genesis these rules refuse): every join of the stream is told, until the
    /// refusal no longer holds (the key was allowed since). Bounded by the joins the owner asked.
    pub(crate) refused_joins: Mutex<HashMap<StreamId, JoinRefusal>>,
    /// Wakes the joins waiting when one is refused.
    pub(crate) join_refused: tokio::sync::Notify,
    /// The dial loop of each remembered peer, by address: dropping the sender stops it.
    dialers: Mutex<HashMap<String, watch::Sender<bool>>>,
    pub(crate) bans: Mutex<HashMap<AuthorKey, (tokio::time::Instant, u32)>>,
    pub(crate) closing: watch::Receiver<bool>,
    closer: watch::Sender<bool>,
    next_connection: AtomicU64,
    pub(crate) options: PeerOptions,
    /// `quire peer allow|deny`, as stored.
    keys: Mutex<HashMap<AuthorKey, PeerKeyRule>>,
}

/// The replication side of a node. Cheap to clone.
#[derive(Clone)]
pub struct Replicator {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator").finish()
    }
}

/// Errors of peer management and joins.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// The peer address is not `host:port`.
    #[error("peer address {0:?} is not host:port (for example 127.0.0.1:7001)")]
    BadAddress(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] crate::log::store::StoreError),
    /// No connected peer had the stream within the time given; the join stays pending.
    #[error("no connected peer has sent the genesis of stream {0} yet; the join stays pending and completes when a peer that holds it connects (add one with `quire peer add`, or cancel it with `quire join --cancel`)")]
    JoinPending(StreamId),
    /// No peer is remembered at this address.
    #[error("no peer {0} is remembered (see `quire peer list`)")]
    UnknownPeer(String),
    /// No join of this stream is pending.
    #[error("no join of stream {0} is pending")]
    NoJoin(StreamId),
    /// The stream is already held: there is no join to cancel.
    #[error("stream {0} is already held: its join completed")]
    AlreadyHeld(StreamId),
    /// This node is leaving the stream: it cannot be joined until the leave has finished.
    #[error(
        "this node is leaving stream {0}; join it again once `quire stream leave` has returned"
    )]
    Leaving(StreamId),
    /// The genesis came, and this node refused to hold the stream (its reason); the join ended.
    #[error("joining stream {stream}: {reason}")]
    JoinRefused {
        /// The stream.
        stream: StreamId,
        /// Why.
        reason: String,
        /// Refused for a key this node does not know (`--accept-streams known`); else the
        /// genesis itself is refused by this version's rules.
        unknown_key: bool,
    },
}

/// Why a join ended without the stream.
#[derive(Debug, Clone)]
pub(crate) struct JoinRefusal {
    /// What the join answers.
    pub(crate) reason: String,
    /// The key this node did not know, if that was why (allowing it lets a new join try again);
    /// none: the genesis itself is refused by these rules, and always will be.
    pub(crate) unknown: Option<AuthorKey>,
}

impl JoinRefusal {
    fn error(&self, stream: StreamId) -> ReplicationError {
        ReplicationError::JoinRefused {
            stream,
            reason: self.reason.clone(),
            unknown_key: self.unknown.is_some(),
        }
    }
}

impl Replicator {
    /// A replicator over `log`; call [`Replicator::start`] to dial remembered peers.
    pub fn new(log: Log, options: PeerOptions) -> Result<Replicator, ReplicationError> {
        let (closer, closing) = watch::channel(false);
        let key = log.signing_key();
        let keys = log.store().peer_keys()?.into_iter().collect();
        Ok(Replicator {
            inner: Arc::new(Inner {
                log,
                key,
                live: Mutex::new(HashMap::new()),
                peers: Mutex::new(BTreeMap::new()),
                pending_joins: Mutex::new(HashSet::new()),
                refused_joins: Mutex::new(HashMap::new()),
                join_refused: tokio::sync::Notify::new(),
                dialers: Mutex::new(HashMap::new()),
                bans: Mutex::new(HashMap::new()),
                closing,
                closer,
                next_connection: AtomicU64::new(1),
                options,
                keys: Mutex::new(keys),
            }),
        })
    }

    /// Allows (`quire peer allow`) or denies (`quire peer deny`) a peer node key, replacing what
    /// was said of it before. A denied key's connections end at once, as do those of a key no
    /// longer allowed under `--peers known`.
    pub fn set_peer_key(&self, key: AuthorKey, rule: PeerKeyRule) -> Result<(), ReplicationError> {
        self.inner.log.store().set_peer_key(&key, rule)?;
        self.inner.keys.lock().expect("keys lock").insert(key, rule);
        if let Some(reason) = self.inner.refusal(&key) {
            for live in self.inner.live.lock().expect("live lock").values() {
                if live.peer == Some(key) {
                    let _ = live.commands.send(Command::Close(reason.clone()));
                }
            }
        }
        Ok(())
    }

    /// The peer node keys allowed or denied, and the admission mode.
    pub fn peer_keys(&self) -> (PeerAdmission, Vec<(AuthorKey, PeerKeyRule)>) {
        let mut keys: Vec<_> = self
            .inner
            .keys
            .lock()
            .expect("keys lock")
            .iter()
            .map(|(key, rule)| (*key, *rule))
            .collect();
        keys.sort_by_key(|(key, _)| *key);
        (self.inner.options.admission, keys)
    }

    /// Starts dialing every remembered peer and `extra_peers` (which are remembered too), and
    /// reloads pending joins.
    pub fn start(&self, extra_peers: &[String]) -> Result<(), ReplicationError> {
        for addr in extra_peers {
            self.inner.log.store().add_peer(&normalise_addr(addr)?)?;
        }
        for stream in self.inner.log.store().pending_joins()? {
            self.inner
                .pending_joins
                .lock()
                .expect("joins lock")
                .insert(stream);
        }
        for addr in self.inner.log.store().peers()? {
            self.spawn_dialer(addr);
        }
        Ok(())
    }

    /// Remembers `addr` and starts dialing it (no-op if already known).
    pub fn add_peer(&self, addr: &str) -> Result<String, ReplicationError> {
        let addr = normalise_addr(addr)?;
        let known = self
            .inner
            .peers
            .lock()
            .expect("peers lock")
            .get(&addr)
            .is_some_and(|state| state.dialed);
        self.inner.log.store().add_peer(&addr)?;
        if !known {
            self.spawn_dialer(addr.clone());
        }
        Ok(addr)
    }

    fn spawn_dialer(&self, addr: String) {
        {
            let mut peers = self.inner.peers.lock().expect("peers lock");
            let state = peers.entry(addr.clone()).or_default();
            if state.dialed {
                return;
            }
            state.dialed = true;
            state.addr = addr.clone();
        }
        let (stop, stopped) = watch::channel(false);
        self.inner
            .dialers
            .lock()
            .expect("dialers lock")
            .insert(addr.clone(), stop);
        tokio::spawn(connection::dial_loop(self.inner.clone(), addr, stopped));
    }

    /// Forgets the remembered peer at `addr` and stops dialing it; a connection to it that is up
    /// ends. Returns the address as it was remembered.
    pub fn remove_peer(&self, addr: &str) -> Result<String, ReplicationError> {
        let addr = normalise_addr(addr)?;
        if !self.inner.log.store().peers()?.contains(&addr) {
            return Err(ReplicationError::UnknownPeer(addr));
        }
        self.inner.log.store().remove_peer(&addr)?;
        // Dropping the sender ends the dial loop, and with it the connection it runs.
        self.inner
            .dialers
            .lock()
            .expect("dialers lock")
            .remove(&addr);
        self.inner.peers.lock().expect("peers lock").remove(&addr);
        Ok(addr)
    }

    /// Forgets what replication knows of `stream`, which this node left: its pending join and
    /// every peer's counters for it.
    pub fn forget_stream(&self, stream: &StreamId) {
        self.inner
            .pending_joins
            .lock()
            .expect("joins lock")
            .remove(stream);
        for state in self.inner.peers.lock().expect("peers lock").values_mut() {
            state.streams.remove(stream);
        }
    }

    /// Cancels the pending join of `stream`: a genesis that arrives later is ignored.
    pub fn cancel_join(&self, stream: StreamId) -> Result<(), ReplicationError> {
        if self.inner.log.stream(&stream).is_some() {
            return Err(ReplicationError::AlreadyHeld(stream));
        }
        let was_pending = self
            .inner
            .pending_joins
            .lock()
            .expect("joins lock")
            .remove(&stream);
        if !was_pending && !self.inner.log.store().pending_joins()?.contains(&stream) {
            return Err(ReplicationError::NoJoin(stream));
        }
        self.inner.log.store().set_join_pending(&stream, false)?;
        Ok(())
    }

    /// Joins `stream`: asks every connected peer for its genesis, checks that it hashes to the
    /// stream id, stores it, and from then on the stream replicates like any other. Waits up to
    /// `timeout` for the genesis; if none came, the join stays pending (also across restarts).
    pub async fn join(&self, stream: StreamId, timeout: Duration) -> Result<(), ReplicationError> {
        if self.inner.log.stream(&stream).is_some() {
            return Ok(());
        }
        if self.inner.log.is_leaving(&stream) {
            return Err(ReplicationError::Leaving(stream));
        }
        // A refusal that still holds is the answer at once; one that no longer does (its key was
        // allowed since) is forgotten, and the join tries again.
        let earlier = self
            .inner
            .refused_joins
            .lock()
            .expect("joins lock")
            .get(&stream)
            .cloned();
        if let Some(refusal) = earlier {
            let holds = match refusal.unknown {
                Some(key) => !self.inner.log.knows(&key)?,
                None => true,
            };
            if holds {
                return Err(refusal.error(stream));
            }
            self.inner
                .refused_joins
                .lock()
                .expect("joins lock")
                .remove(&stream);
        }
        let mut streams = self.inner.log.watch_streams();
        self.inner.log.store().set_join_pending(&stream, true)?;
        self.inner
            .pending_joins
            .lock()
            .expect("joins lock")
            .insert(stream);
        for live in self.inner.live.lock().expect("live lock").values() {
            let _ = live.commands.send(Command::RequestGenesis(stream));
        }
        let mut closing = self.inner.closing.clone();
        // Read, not taken: every join waiting on the stream is told.
        let refused = || {
            self.inner
                .refused_joins
                .lock()
                .expect("joins lock")
                .get(&stream)
                .map(|refusal| refusal.error(stream))
        };
        let wait = async {
            loop {
                // Made before the checks, so a refusal between them and the select wakes it.
                let refusal = self.inner.join_refused.notified();
                if self.inner.log.stream(&stream).is_some() {
                    return Ok(());
                }
                if let Some(refused) = refused() {
                    return Err(refused);
                }
                tokio::select! {
                    changed = streams.changed() => if changed.is_err() { return Ok(()) },
                    _ = closing.changed() => return Ok(()),
                    _ = refusal => {}
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Err(refused)) => Err(refused),
            Ok(Ok(())) if self.inner.log.stream(&stream).is_some() => Ok(()),
            _ => Err(ReplicationError::JoinPending(stream)),
        }
    }

    /// Every peer's state, dialed ones first.
    pub fn peers(&self) -> Vec<PeerState> {
        let mut peers: Vec<PeerState> = self
            .inner
            .peers
            .lock()
            .expect("peers lock")
            .values()
            .cloned()
            .collect();
        peers.sort_by_key(|peer| (!peer.dialed, peer.addr.clone()));
        peers
    }

    /// Ends every connection and dial loop.
    pub fn shutdown(&self) {
        let _ = self.inner.closer.send(true);
    }

    /// The gRPC service of the peer listener.
    pub fn service(&self) -> pb::peer_server::PeerServer<PeerService> {
        pb::peer_server::PeerServer::new(PeerService {
            inner: self.inner.clone(),
        })
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES)
    }
}

impl Inner {
    pub(crate) fn register(&self, commands: mpsc::UnboundedSender<Command>) -> u64 {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        self.live.lock().expect("live lock").insert(
            id,
            Live {
                peer: None,
                dialer: None,
                commands,
            },
        );
        id
    }

    pub(crate) fn unregister(&self, id: u64) {
        self.live.lock().expect("live lock").remove(&id);
    }

    /// Marks connection `id` as talking to `peer`. If another connection to the same peer is up,
    /// one of the two is closed: both sides keep the one dialed by the lower node id, so a pair
    /// of peers ends with exactly one connection. Returns false if `id` itself must close.
    pub(crate) fn claim(&self, id: u64, peer: AuthorKey, dialer: AuthorKey) -> bool {
        let mut live = self.live.lock().expect("live lock");
        let rival = live
            .iter()
            .find(|(other, state)| **other != id && state.peer == Some(peer))
            .map(|(other, state)| (*other, state.dialer));
        if let Some((rival_id, Some(rival_dialer))) = rival {
            // The lower dialer wins; between two connections dialed by the same side, the newer
            // one wins (the older may be half-open: that side has already given up on it).
            if rival_dialer < dialer {
                return false;
            }
            if let Some(rival) = live.get(&rival_id) {
                let _ = rival.commands.send(Command::Close(
                    "replaced by the connection dialed by the lower node id".into(),
                ));
            }
        }
        if let Some(state) = live.get_mut(&id) {
            state.peer = Some(peer);
            state.dialer = Some(dialer);
        }
        true
    }

    /// Why a proven `peer` may not replicate with this node, if it may not.
    pub(crate) fn refusal(&self, peer: &AuthorKey) -> Option<String> {
        match (
            self.keys.lock().expect("keys lock").get(peer),
            self.options.admission,
        ) {
            (Some(PeerKeyRule::Deny), _) => Some(format!(
                "node {peer} is denied on this node (`quire peer allow {peer}` there lifts it)"
            )),
            (None, PeerAdmission::Known) => Some(format!(
                "this node replicates with known peers only (--peers known) and node {peer} is not one: run `quire peer allow {peer}` on it"
            )),
            _ => None,
        }
    }

    pub(crate) fn with_peer<R>(&self, key: &str, update: impl FnOnce(&mut PeerState) -> R) -> R {
        let mut peers = self.peers.lock().expect("peers lock");
        update(peers.entry(key.to_string()).or_default())
    }

    pub(crate) fn banned(&self, peer: &AuthorKey) -> Option<Duration> {
        let bans = self.bans.lock().expect("bans lock");
        let (until, _) = bans.get(peer)?;
        until.checked_duration_since(tokio::time::Instant::now())
    }

    pub(crate) fn ban(&self, peer: AuthorKey) -> Duration {
        let mut bans = self.bans.lock().expect("bans lock");
        let entry = bans.entry(peer).or_insert((tokio::time::Instant::now(), 0));
        entry.1 += 1;
        let duration = Duration::from_secs(30u64.saturating_mul(1 << entry.1.min(5)) / 2)
            .min(Duration::from_secs(600));
        entry.0 = tokio::time::Instant::now() + duration;
        duration
    }
}

/// `host:port`, with a default port of 7000 and no scheme.
pub fn normalise_addr(addr: &str) -> Result<String, ReplicationError> {
    let trimmed = addr
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/');
    if trimmed.is_empty() || trimmed.contains('/') || trimmed.contains(' ') {
        return Err(ReplicationError::BadAddress(addr.to_string()));
    }
    let with_port = if trimmed
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
    {
        trimmed.to_string()
    } else if trimmed.contains(':') && !trimmed.starts_with('[') {
        return Err(ReplicationError::BadAddress(addr.to_string()));
    } else {
        format!("{trimmed}:7000")
    };
    Ok(with_port)
}

/// The peer listener's only service.
#[derive(Clone)]
pub struct PeerService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PeerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerService").finish()
    }
}

type PeerStream = Pin<Box<dyn Stream<Item = Result<pb::PeerMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    type ReplicateStream = PeerStream;

    async fn replicate(
        &self,
        request: Request<Streaming<pb::PeerMessage>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let addr = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |addr| addr.to_string());
        // The listener's budget of what this connection may send before its peer proved its key.
        let proven = request.extensions().get::<crate::net::Proven>().cloned();
        let binding = match (
            &self.inner.options.tls,
            request.extensions().get::<ChannelBinding>(),
        ) {
            (Some(_), Some(binding)) => *binding,
            (Some(_), None) => {
                return Err(Status::failed_precondition(
                    "replication runs over TLS only: this connection has no TLS session",
                ))
            }
            (None, _) => ChannelBinding([0; 32]),
        };
        let incoming = request.into_inner();
        let (outgoing, receiver) = metered(OUTBOUND_QUEUE, OUTBOUND_BYTES, Share::default());
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let link = connection::Link {
                dialed: false,
                addr: addr.clone(),
                proven,
                binding,
            };
            let result = connection::run(inner, incoming, outgoing, link).await;
            if let Err(error) = result {
                tracing::info!(peer = %addr, %error, "accepted peer connection ended");
            }
        });
        Ok(Response::new(Box::pin(receiver.map(Ok))))
    }
}
