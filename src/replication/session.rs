//! The peer protocol as a sans-IO state machine: one [`Session`] per connection, on both sides.
//!
//! The session takes what arrives ([`Session::handle`]) and local events
//! ([`Session::start`], [`Session::set_local_streams`]), and returns [`Action`]s for its driver to
//! carry out: send a message, store a batch with its cursor, serve a genesis, close. What to send
//! next is asked with [`Session::next_step`] whenever the driver has room to send, so a slow peer
//! simply makes the driver ask less often: the session never buffers scribes, and the driver reads
//! them from storage only when they can be sent (bounded memory, whatever the backlog).
//!
//! The session does no IO at all: the tonic driver (`connection.rs`) and the deterministic
//! simulated network of the tests drive the very same code.
//!
//! # The conversation
//! 1. Both sides send `Hello {node id, log epochs, nonce}`; each answers the other's with
//!    `Proof`, an Ed25519 signature over [`proof_message`]: `PROOF_PREFIX ‖ their nonce ‖ my id ‖
//!    their id ‖ the connection's TLS channel binding` (`net::tls`). A bad proof closes the
//!    connection; a proof made on another TLS session (a relay that terminates TLS) is bad.
//! 2. Both send `Streams` (what they hold), and for each stream both hold, `Want {stream,
//!    after_seq}` where `after_seq` is the cursor on that peer, as far as the peer's epochs say
//!    those seqs still name the same scribes (0 if none; see `log::epoch`).
//! 3. For each `Want`, the other side sends `Batch`es of the stream in its local order, skipping
//!    scribes it received from this very peer and the peer still holds, then one `CaughtUp`, then
//!    live batches.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use quire_projection_api::{AuthorKey, ScribeId, StreamId};

use crate::log::epoch::Epochs;
use crate::log::store::{Cursor, PeerOrigin};
use crate::scribe::Parts;

/// Domain separation of the handshake proof.
pub const PROOF_PREFIX: &[u8; 14] = b"quire.peer.v3\0";
/// Protocol version spoken: 3 (scribe format 2, over TLS with proofs bound to the channel).
pub const PROTOCOL_VERSION: u32 = 3;

/// What a handshake proof signs: `PROOF_PREFIX ‖ verifier's nonce ‖ prover's id ‖ verifier's id ‖
/// channel binding` (32 bytes: the TLS session's exported keying material, see `net::tls`).
pub fn proof_message(
    nonce: &[u8; 32],
    prover: &AuthorKey,
    verifier: &AuthorKey,
    binding: &[u8; 32],
) -> Vec<u8> {
    let mut message = PROOF_PREFIX.to_vec();
    message.extend_from_slice(nonce);
    message.extend_from_slice(prover.as_bytes());
    message.extend_from_slice(verifier.as_bytes());
    message.extend_from_slice(binding);
    message
}
/// Most scribes one batch may hold (the sender cuts its batches there). A longer batch is a
/// protocol error: every scribe of a batch is verified before its refusals are counted, so an
/// unbounded batch would let one peer message occupy the node's append pipeline for seconds.
pub const MAX_BATCH_SCRIBES: usize = 512;

/// A scribe on the wire: the sender's seq, the claimed id, the envelope, payload, seal and proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireScribe {
    /// The sender's local seq.
    pub seq: u64,
    /// The id the sender claims.
    pub id: ScribeId,
    /// Its parts, exactly as stored.
    pub parts: Parts,
}

/// A peer-protocol message (see `proto/quire/v1/peer.proto`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Node id, log epochs, nonce.
    Hello {
        /// The sender's node id.
        node: AuthorKey,
        /// The sender's log epoch and the earlier ones it remembers.
        epochs: Epochs,
        /// The version of the rules the sender judges scribes by.
        rules: u32,
        /// What the receiver must sign.
        nonce: [u8; 32],
    },
    /// The signature proving the sender's node key.
    Proof(Signature),
    /// The streams the sender holds.
    Streams(Vec<StreamId>),
    /// Send `stream` after the receiver's seq `after`.
    Want {
        /// The stream.
        stream: StreamId,
        /// The receiver's last seq already taken.
        after: u64,
        /// The sender holds its own scribes of the stream only above this seq of its log (the
        /// seq of its genesis there): anything it sent before leaving the stream is sent back.
        since: u64,
    },
    /// Scribes of a stream.
    Batch {
        /// The stream.
        stream: StreamId,
        /// In the sender's local order.
        scribes: Vec<WireScribe>,
        /// Everything up to here has been sent.
        through: u64,
        /// The sender's head of the stream when read.
        head: u64,
    },
    /// The backlog of a stream is done up to `seq`.
    CaughtUp {
        /// The stream.
        stream: StreamId,
        /// The sender's seq.
        seq: u64,
    },
    /// Asks for a stream's genesis.
    GenesisRequest(StreamId),
    /// A stream's genesis bytes, or `None` if the sender does not hold it.
    Genesis {
        /// The stream.
        stream: StreamId,
        /// The genesis scribe.
        scribe: Option<Parts>,
    },
    /// The sender is closing because of this.
    Error(String),
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this message.
    Send(Message),
    /// The handshake is done: load the cursors on `peer` and call [`Session::start`].
    Ready {
        /// The peer's node id (proven).
        peer: AuthorKey,
        /// The peer's log epoch.
        epoch: [u8; 16],
        /// The version of the rules the peer judges scribes by.
        rules: u32,
    },
    /// Store these scribes (each validated on its own) and, in the same write batch, the cursor
    /// `(peer, stream, peer epoch, through)`.
    Store {
        /// The stream.
        stream: StreamId,
        /// The scribes.
        scribes: Vec<WireScribe>,
        /// The cursor to write.
        through: u64,
        /// The peer's head of the stream (for lag).
        head: u64,
    },
    /// The peer finished sending the backlog of `stream` (for status).
    CaughtUp {
        /// The stream.
        stream: StreamId,
        /// At this peer seq.
        seq: u64,
    },
    /// Read the genesis of `stream` and send it as [`Message::Genesis`].
    ServeGenesis(StreamId),
    /// A peer sent the genesis of a stream we asked for (check its hash, then store it).
    GenesisReceived {
        /// The stream.
        stream: StreamId,
        /// Its parts.
        scribe: Parts,
    },
    /// Close the connection with this reason (after sending `Message::Error` with it).
    Close(String),
}

/// A range of a stream to read and send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPlan {
    /// The stream.
    pub stream: StreamId,
    /// First local seq.
    pub from: u64,
    /// Last local seq (the stream's head when planned).
    pub to: u64,
}

/// What to send next, when there is room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Read this range and pass it to [`Session::read_done`].
    Read(ReadPlan),
    /// Send this.
    Send(Message),
}

#[derive(Debug, Clone, Copy)]
struct Serving {
    next: u64,
    caught_up_sent: bool,
    /// The peer holds its own scribes of the stream only above this seq of its log (its
    /// genesis seq: what it held before a leave is gone).
    since: u64,
}

/// One side of one peer connection.
pub struct Session {
    key: SigningKey,
    local: AuthorKey,
    nonce: [u8; 32],
    binding: [u8; 32],
    peer: Option<(AuthorKey, Epochs)>,
    peer_rules: u32,
    proven: bool,
    started: bool,
    /// Each stream held locally (that this peer may receive), with the seq its genesis is
    /// stored at here: this node's own scribes of it are all above that seq.
    local_streams: BTreeMap<StreamId, u64>,
    peer_streams: BTreeSet<StreamId>,
    cursors: HashMap<StreamId, u64>,
    wanted: BTreeSet<StreamId>,
    /// Streams asked for on this connection, then left: what the peer still sends of them (it
    /// was on its way, or the peer predates `Streams` ending a subscription) is dropped.
    dropped: BTreeSet<StreamId>,
    serving: BTreeMap<StreamId, Serving>,
    last_served: Option<StreamId>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("local", &self.local)
            .field("peer", &self.peer.as_ref().map(|(peer, _)| *peer))
            .field("started", &self.started)
            .finish()
    }
}

impl Session {
    /// A new session over a connection whose channel binding is `binding`; the returned actions
    /// send our `Hello`.
    pub fn new(
        key: SigningKey,
        local_epochs: Epochs,
        rules: u32,
        nonce: [u8; 32],
        binding: [u8; 32],
    ) -> (Session, Vec<Action>) {
        let local = AuthorKey(key.verifying_key().to_bytes());
        let session = Session {
            key,
            local,
            nonce,
            binding,
            peer: None,
            peer_rules: 0,
            proven: false,
            started: false,
            local_streams: BTreeMap::new(),
            peer_streams: BTreeSet::new(),
            cursors: HashMap::new(),
            wanted: BTreeSet::new(),
            dropped: BTreeSet::new(),
            serving: BTreeMap::new(),
            last_served: None,
        };
        let hello = Message::Hello {
            node: local,
            epochs: local_epochs,
            rules,
            nonce,
        };
        (session, vec![Action::Send(hello)])
    }

    /// The proven peer, once the handshake is done.
    pub fn peer(&self) -> Option<AuthorKey> {
        self.peer
            .as_ref()
            .filter(|_| self.proven)
            .map(|(peer, _)| *peer)
    }

    /// The peer's log epoch, once known.
    pub fn peer_epoch(&self) -> Option<[u8; 16]> {
        self.peer.as_ref().map(|(_, epochs)| epochs.current)
    }

    /// Whether [`Session::start`] has run.
    pub fn is_started(&self) -> bool {
        self.started
    }

    /// Handles one message from the peer.
    pub fn handle(&mut self, message: Message) -> Vec<Action> {
        match message {
            Message::Hello {
                node,
                epochs,
                rules,
                nonce,
            } => {
                if self.peer.is_some() {
                    return close("protocol error: a second Hello");
                }
                if node == self.local {
                    return close(
                        "connected to itself (this address is this node's own peer listener)",
                    );
                }
                self.peer = Some((node, epochs));
                self.peer_rules = rules;
                let signature =
                    self.key
                        .sign(&proof_message(&nonce, &self.local, &node, &self.binding));
                vec![Action::Send(Message::Proof(signature))]
            }
            Message::Proof(signature) => {
                let Some((peer, epoch)) = self
                    .peer
                    .as_ref()
                    .map(|(peer, epochs)| (*peer, epochs.current))
                else {
                    return close("protocol error: Proof before Hello");
                };
                if self.proven {
                    return close("protocol error: a second Proof");
                }
                let valid = VerifyingKey::from_bytes(&peer.0)
                    .and_then(|key| {
                        key.verify_strict(
                            &proof_message(&self.nonce, &peer, &self.local, &self.binding),
                            &signature,
                        )
                    })
                    .is_ok();
                if !valid {
                    return close(&format!("peer failed to prove it holds the key of node {peer}: bad handshake signature"));
                }
                self.proven = true;
                vec![Action::Ready {
                    peer,
                    epoch,
                    rules: self.peer_rules,
                }]
            }
            Message::Error(reason) => vec![Action::Close(format!(
                "peer closed the connection: {reason}"
            ))],
            other if !self.started => close(&format!(
                "protocol error: {} before the handshake finished",
                name(&other)
            )),
            Message::Streams(streams) => {
                self.peer_streams = streams.into_iter().collect();
                // A stream the peer no longer holds (it left it) is no longer sent to it.
                let peer_streams = &self.peer_streams;
                self.serving
                    .retain(|stream, _| peer_streams.contains(stream));
                self.wants()
            }
            Message::Want {
                stream,
                after,
                since,
            } => {
                if self.local_streams.contains_key(&stream) {
                    self.serving.insert(
                        stream,
                        Serving {
                            next: after.saturating_add(1),
                            caught_up_sent: false,
                            since,
                        },
                    );
                }
                Vec::new()
            }
            Message::Batch {
                stream,
                scribes,
                through,
                head,
            } => {
                if self.dropped.contains(&stream) {
                    return Vec::new();
                }
                if !self.wanted.contains(&stream) {
                    return close(&format!(
                        "protocol error: a batch of stream {stream}, which was not asked for"
                    ));
                }
                if scribes.len() > MAX_BATCH_SCRIBES {
                    return close(&format!(
                        "protocol error: a batch of {} scribes; at most {MAX_BATCH_SCRIBES} allowed",
                        scribes.len()
                    ));
                }
                if scribes.windows(2).any(|pair| pair[0].seq >= pair[1].seq)
                    || scribes.last().is_some_and(|last| last.seq > through)
                {
                    return close("protocol error: a batch out of order");
                }
                let cursor = self.cursors.entry(stream).or_insert(0);
                *cursor = (*cursor).max(through);
                vec![Action::Store {
                    stream,
                    scribes,
                    through,
                    head,
                }]
            }
            Message::CaughtUp { stream, seq } => {
                if self.dropped.contains(&stream) {
                    return Vec::new();
                }
                if !self.wanted.contains(&stream) {
                    return close(&format!(
                        "protocol error: CaughtUp for stream {stream}, which was not asked for"
                    ));
                }
                let cursor = self.cursors.entry(stream).or_insert(0);
                *cursor = (*cursor).max(seq);
                vec![
                    Action::Store {
                        stream,
                        scribes: Vec::new(),
                        through: seq,
                        head: seq,
                    },
                    Action::CaughtUp { stream, seq },
                ]
            }
            Message::GenesisRequest(stream) => {
                if self.local_streams.contains_key(&stream) {
                    vec![Action::ServeGenesis(stream)]
                } else {
                    vec![Action::Send(Message::Genesis {
                        stream,
                        scribe: None,
                    })]
                }
            }
            Message::Genesis { stream, scribe } => match scribe {
                Some(scribe) => vec![Action::GenesisReceived { stream, scribe }],
                None => Vec::new(),
            },
        }
    }

    /// After [`Action::Ready`]: the stored cursors on this peer and the streams held locally,
    /// each with the seq its genesis is stored at.
    /// A cursor of an earlier epoch of the peer counts only as far as the peer still holds those
    /// seqs; one of an epoch it does not remember counts for nothing (its log was wiped or
    /// restored from a backup: start over). See `log::epoch`.
    pub fn start(
        &mut self,
        cursors: Vec<(StreamId, Cursor)>,
        local_streams: Vec<(StreamId, u64)>,
    ) -> Vec<Action> {
        let (_, epochs) = self.peer.as_ref().expect("start after Ready");
        self.cursors = cursors
            .into_iter()
            .filter_map(|(stream, cursor)| {
                let seq = epochs.valid_through(&cursor.epoch, cursor.seq)?;
                (seq > 0).then_some((stream, seq))
            })
            .collect();
        self.started = true;
        self.local_streams = local_streams.into_iter().collect();
        let mut actions = vec![Action::Send(Message::Streams(
            self.local_streams.keys().copied().collect(),
        ))];
        actions.extend(self.wants());
        actions
    }

    /// The set of local streams changed (a stream was created, joined or left, or left and
    /// joined again: its genesis seq changed).
    pub fn set_local_streams(&mut self, local_streams: Vec<(StreamId, u64)>) -> Vec<Action> {
        let local_streams: BTreeMap<StreamId, u64> = local_streams.into_iter().collect();
        if !self.started || local_streams == self.local_streams {
            self.local_streams = local_streams;
            return Vec::new();
        }
        // Streams left (and those joined again since): nothing more is asked for, stored or
        // sent of them here.
        let left: Vec<StreamId> = self
            .local_streams
            .iter()
            .filter(|(stream, since)| local_streams.get(stream) != Some(since))
            .map(|(stream, _)| *stream)
            .collect();
        for stream in left {
            if self.wanted.remove(&stream) {
                self.dropped.insert(stream);
            }
            self.cursors.remove(&stream);
            self.serving.remove(&stream);
        }
        // A stream left and joined again on one connection: what the peer still sends of the old
        // subscription cannot be told from the new one's, so start a new connection.
        if local_streams
            .keys()
            .any(|stream| self.dropped.contains(stream))
        {
            return close("a stream left on this connection was joined again; reconnecting to replicate it from the start");
        }
        self.local_streams = local_streams;
        let mut actions = vec![Action::Send(Message::Streams(
            self.local_streams.keys().copied().collect(),
        ))];
        actions.extend(self.wants());
        actions
    }

    /// Asks the peer for a stream's genesis (to join it).
    pub fn request_genesis(&self, stream: StreamId) -> Vec<Action> {
        if self.started {
            vec![Action::Send(Message::GenesisRequest(stream))]
        } else {
            Vec::new()
        }
    }

    fn wants(&mut self) -> Vec<Action> {
        let common: Vec<(StreamId, u64)> = self
            .local_streams
            .iter()
            .filter(|(stream, _)| {
                self.peer_streams.contains(*stream) && !self.wanted.contains(*stream)
            })
            .map(|(stream, since)| (*stream, *since))
            .collect();
        common
            .into_iter()
            .map(|(stream, since)| {
                self.wanted.insert(stream);
                let after = self.cursors.get(&stream).copied().unwrap_or(0);
                Action::Send(Message::Want {
                    stream,
                    after,
                    since,
                })
            })
            .collect()
    }

    /// Stops sending `stream` on this connection: its scribes cannot be read (the local store is
    /// damaged there). The other streams go on; the peer asks for it again when it reconnects.
    pub fn stop_serving(&mut self, stream: &StreamId) {
        self.serving.remove(stream);
    }

    /// The last peer seq taken of `stream` on this connection.
    pub fn cursor(&self, stream: &StreamId) -> u64 {
        self.cursors.get(stream).copied().unwrap_or(0)
    }

    /// What to send next, given each stream's local head; `None` when there is nothing to send.
    /// Streams take turns, so one long backlog does not starve the others' live scribes.
    pub fn next_step(&mut self, stream_head: impl Fn(&StreamId) -> u64) -> Option<Step> {
        let order: Vec<StreamId> = match self.last_served {
            Some(last) => self
                .serving
                .range((std::ops::Bound::Excluded(last), std::ops::Bound::Unbounded))
                .chain(self.serving.range(..=last))
                .map(|(stream, _)| *stream)
                .collect(),
            None => self.serving.keys().copied().collect(),
        };
        for stream in order {
            let head = stream_head(&stream);
            let serving = self.serving.get_mut(&stream).expect("listed above");
            if serving.next <= head {
                self.last_served = Some(stream);
                return Some(Step::Read(ReadPlan {
                    stream,
                    from: serving.next,
                    to: head,
                }));
            }
            if !serving.caught_up_sent {
                serving.caught_up_sent = true;
                self.last_served = Some(stream);
                return Some(Step::Send(Message::CaughtUp {
                    stream,
                    seq: serving.next - 1,
                }));
            }
        }
        None
    }

    /// The result of a [`Step::Read`]: `entries` (seq, id, parts, origin) read from `plan.from`;
    /// `more` when a limit ended the read before `plan.to`. Returns the batch to send, if any: scribes that came from this peer are
    /// not sent back to it while it still holds them.
    pub fn read_done(
        &mut self,
        plan: ReadPlan,
        entries: Vec<(u64, ScribeId, Parts, Option<PeerOrigin>)>,
        more: bool,
    ) -> Option<Message> {
        let serving = self.serving.get_mut(&plan.stream)?;
        if serving.next != plan.from {
            return None; // the peer re-sent Want meanwhile; this read is stale
        }
        serving.next = match entries.last() {
            Some((seq, ..)) if more => seq + 1,
            _ => plan.to + 1,
        };
        let through = serving.next - 1;
        let peer = self.peer.as_ref().filter(|_| self.proven);
        let since = serving.since;
        let held_by_peer = |origin: &PeerOrigin| {
            peer.is_some_and(|(peer, epochs)| {
                origin.peer == *peer
                    && origin.seq > since
                    && epochs.still_holds(&origin.epoch, origin.seq)
            })
        };
        let scribes: Vec<WireScribe> = entries
            .into_iter()
            .filter(|(_, _, _, origin)| !origin.as_ref().is_some_and(held_by_peer))
            .map(|(seq, id, parts, _)| WireScribe { seq, id, parts })
            .collect();
        // Sent even when empty (everything read came from this peer): the peer's cursor moves
        // past what was held back, so a reconnect never reads it again.
        Some(Message::Batch {
            stream: plan.stream,
            scribes,
            through,
            head: plan.to,
        })
    }
}

fn close(reason: &str) -> Vec<Action> {
    vec![
        Action::Send(Message::Error(reason.to_string())),
        Action::Close(reason.to_string()),
    ]
}

fn name(message: &Message) -> &'static str {
    match message {
        Message::Hello { .. } => "Hello",
        Message::Proof(_) => "Proof",
        Message::Streams(_) => "Streams",
        Message::Want { .. } => "Want",
        Message::Batch { .. } => "Batch",
        Message::CaughtUp { .. } => "CaughtUp",
        Message::GenesisRequest(_) => "GenesisRequest",
        Message::Genesis { .. } => "Genesis",
        Message::Error(_) => "Error",
    }
}
