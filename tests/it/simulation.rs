//! The replication state machine in a deterministic in-process network (raft-rs harness style):
//! nodes with in-memory logs run the very same `Session` as real nodes; proptest picks random
//! interleavings of appends, deliveries, duplicated messages, cuts (partitions: the connection and
//! everything in flight is lost), heals, wiped data directories and restarts, some after a power
//! loss took the node's last unsynced writes (its seqs are given out again). After healing
//! everything, all nodes hold the same set, each scribe once.
//!
//! With access rules on (`Network::with_access`), each node also judges every scribe it stores
//! by the log's own rule (`rules::judge_access`: writer lists, membership views, grants and
//! revokes by admins), in whatever order it arrives; the nodes must refuse nothing a node once
//! accepted and end with the same membership, the same excluded scribes and the same projection.

use std::collections::{BTreeSet, HashMap, VecDeque};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use prost::Message as _;
use quire::genesis::{access_to_proto, genesis_payload};
use quire::log::epoch::Epochs;
use quire::log::rules::{genesis_state, judge_access};
use quire::log::store::{Cursor, PeerOrigin};
use quire::log::StreamState;
use quire::membership::Role;
use quire::pb;
use quire::projection_api::{AuthorKey, Kind, ScribeId, StreamId};
use quire::replication::session::{Action, Message, Session, Step};
use quire::scribe::{Body, Parts, Scribe};

const NODES: usize = 3;
const READ_LIMIT: usize = 3;

struct Entry {
    id: ScribeId,
    parts: Parts,
    origin: Option<PeerOrigin>,
}

/// A node with an in-memory log of one stream.
struct SimNode {
    key: SigningKey,
    epochs: Epochs,
    /// Epochs begun so far (their ids are made from it).
    started: u8,
    log: Vec<Entry>,
    ids: HashMap<ScribeId, u64>,
    cursors: HashMap<AuthorKey, Cursor>,
    /// The state after each unsynced write (an append, or a stored batch with its cursor), oldest
    /// first: what a power loss can roll back to.
    unsynced: Vec<(usize, HashMap<AuthorKey, Cursor>)>,
    clock: u64,
    /// With access rules on: the stream as this node's log judges it (its membership).
    access: Option<StreamState>,
    /// Scribes from peers this node's rules refused (with access rules on).
    refused: Vec<String>,
}

impl SimNode {
    fn id(&self) -> AuthorKey {
        AuthorKey(self.key.verifying_key().to_bytes())
    }

    fn head(&self) -> u64 {
        self.log.len() as u64
    }

    /// Remembers the state before a write, which a power loss may take.
    fn journal(&mut self) {
        self.unsynced.push((self.log.len(), self.cursors.clone()));
    }

    /// The node starts again: a new epoch, the old one ending at the head it has now. The epoch
    /// record is written with fsync, so nothing before it can be lost any more.
    fn restart(&mut self) {
        self.started += 1;
        let next = [
            self.index(),
            self.started,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        self.epochs.rotate(self.head(), next);
        self.unsynced.clear();
    }

    fn index(&self) -> u8 {
        self.key.to_bytes()[0] - 1
    }

    /// A power loss takes the last `writes` unsynced writes (log entries and cursors together: a
    /// WAL loses a suffix), then the node starts again.
    fn lose_tail(&mut self, writes: usize) {
        let keep = self.unsynced.len().saturating_sub(writes);
        if let Some((len, cursors)) = self.unsynced.get(keep).cloned() {
            self.log.truncate(len);
            self.cursors = cursors;
            self.ids = self
                .log
                .iter()
                .enumerate()
                .map(|(n, entry)| (entry.id, n as u64 + 1))
                .collect();
            self.rejudge();
        }
        self.restart();
    }

    /// With access rules on, the stream state the node's log now holds: its entries judged again
    /// in log order (a start loads the membership of what survived).
    fn rejudge(&mut self) {
        if self.access.is_none() {
            return;
        }
        let scribes: Vec<Scribe> = self
            .log
            .iter()
            .map(|entry| Scribe::decode_claimed(entry.parts.clone(), entry.id).unwrap())
            .collect();
        let mut state = genesis_state(&scribes[0], 1).unwrap();
        for scribe in &scribes[1..] {
            state.membership = judge_access(&state, scribe).expect("it was accepted in this order");
        }
        self.access = Some(state);
    }

    /// Validates (decode + signature + hash + stream) and stores unless already stored.
    fn store(
        &mut self,
        parts: Parts,
        claimed: ScribeId,
        origin: Option<PeerOrigin>,
        stream: StreamId,
    ) {
        let Ok(scribe) = Scribe::decode_claimed(parts, claimed) else {
            return;
        };
        if scribe.stream_id() != stream || self.ids.contains_key(&scribe.id) {
            return;
        }
        if let Some(state) = self.access.as_mut() {
            if scribe.body.kind != Kind::StreamCreate {
                match judge_access(state, &scribe) {
                    Ok(membership) => state.membership = membership,
                    Err(error) => {
                        self.refused.push(format!("{}: {error}", scribe.id));
                        return;
                    }
                }
            }
        }
        // A hybrid clock: what a node signs next is dated after everything it holds.
        self.clock = self.clock.max(scribe.body.hlc);
        self.log.push(Entry {
            id: scribe.id,
            parts: scribe.parts(),
            origin,
        });
        self.ids.insert(scribe.id, self.head());
    }
}

/// One connection: a session at each end and the messages in flight each way.
struct Link {
    ends: [Session; 2],
    nodes: [usize; 2],
    in_flight: [VecDeque<Message>; 2], // in_flight[k]: towards ends[k]
}

#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    Deliver(usize, usize),
    Duplicate(usize, usize),
    Pump(usize, usize),
    Cut(usize),
    Heal(usize),
    /// Node signs an `x.sim` scribe naming its membership view (access rules on).
    Write(usize),
    /// Node grants node (0 reader, 1 writer, 2 admin), merging every membership head.
    Grant(usize, usize, usize),
    /// Node revokes node.
    Revoke(usize, usize),
    Wipe(usize),
    /// Stop and start again (a new epoch), losing this many unsynced writes first.
    Restart(usize, usize),
    /// Run the link until it has nothing to send (what was appended reaches the peer).
    Exchange(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..NODES).prop_map(Op::Append),
        6 => (0..3usize, 0..2usize).prop_map(|(link, end)| Op::Deliver(link, end)),
        1 => (0..3usize, 0..2usize).prop_map(|(link, end)| Op::Duplicate(link, end)),
        6 => (0..3usize, 0..2usize).prop_map(|(link, end)| Op::Pump(link, end)),
        1 => (0..3usize).prop_map(Op::Cut),
        2 => (0..3usize).prop_map(Op::Heal),
        1 => (0..NODES).prop_map(Op::Wipe),
        1 => (0..NODES).prop_map(|node| Op::Restart(node, 0)),
        1 => (0..NODES, 1..40usize).prop_map(|(node, lost)| Op::Restart(node, lost)),
    ]
}

/// With access rules: writes, grants and revokes among partitions. Grants and revokes are
/// rarer than writes (each is one admin decision), cuts frequent enough that they are often
/// concurrent with what they change.
fn op_access() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..NODES).prop_map(Op::Write),
        2 => (0..NODES, 1..NODES, 0..3usize).prop_map(|(by, to, role)| Op::Grant(by, to, role)),
        2 => (0..NODES, 1..NODES).prop_map(|(by, to)| Op::Revoke(by, to)),
        6 => (0..3usize, 0..2usize).prop_map(|(link, end)| Op::Deliver(link, end)),
        1 => (0..3usize, 0..2usize).prop_map(|(link, end)| Op::Duplicate(link, end)),
        6 => (0..3usize, 0..2usize).prop_map(|(link, end)| Op::Pump(link, end)),
        2 => (0..3usize).prop_map(Op::Cut),
        2 => (0..3usize).prop_map(Op::Heal),
        1 => (0..NODES).prop_map(Op::Wipe),
        1 => (0..NODES, 0..40usize).prop_map(|(node, lost)| Op::Restart(node, lost)),
        1 => (0..3usize).prop_map(Op::Exchange),
    ]
}

/// Two nodes: fewer cuts (every cut, wipe and restart drops the one link), so the links get past
/// the handshake and power losses take scribes the peer holds.
fn op_two() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..2usize).prop_map(Op::Append),
        8 => (0..2usize).prop_map(|end| Op::Deliver(0, end)),
        1 => (0..2usize).prop_map(|end| Op::Duplicate(0, end)),
        8 => (0..2usize).prop_map(|end| Op::Pump(0, end)),
        1 => Just(Op::Cut(0)),
        2 => Just(Op::Heal(0)),
        1 => (0..2usize).prop_map(|node| Op::Restart(node, 0)),
        2 => (0..2usize, 1..40usize).prop_map(|(node, lost)| Op::Restart(node, lost)),
        2 => Just(Op::Exchange(0)),
    ]
}

struct Network {
    /// Scribes a node received back although it wrote them itself.
    echoes: usize,
    nodes: Vec<SimNode>,
    links: Vec<Option<Link>>,
    stream: StreamId,
    /// Links 0..this are used (1: nodes 0 and 1 alone, so no third node can hide a lost scribe).
    in_use: usize,
}

const PAIRS: [[usize; 2]; 3] = [[0, 1], [1, 2], [0, 2]];

impl Network {
    fn new() -> Network {
        Network::start(Vec::new(), false)
    }

    /// Node 0 owns a public stream whose `x.sim` scribes only its writers may sign; node 1 is an
    /// admin and node 2 a writer from the genesis on. Every node judges what it stores.
    fn with_access() -> Network {
        let key = |node: u8| {
            AuthorKey(
                SigningKey::from_bytes(&[node + 1; 32])
                    .verifying_key()
                    .to_bytes(),
            )
        };
        let members = [(key(1), Role::Admin), (key(2), Role::Writer)]
            .into_iter()
            .collect();
        let policy = pb::Policy {
            rules: vec![pb::KindRule {
                kind: "x.sim".into(),
                authors: Some(pb::Authors {
                    writers: true,
                    ..Default::default()
                }),
            }],
            ..Default::default()
        };
        let payload = genesis_payload(
            "sim",
            None,
            Some(policy),
            Some(access_to_proto(false, &members)),
            [0; 16],
        );
        Network::start(payload, true)
    }

    fn start(genesis: Vec<u8>, access: bool) -> Network {
        let mut nodes: Vec<SimNode> = (0..NODES)
            .map(|index| SimNode {
                key: SigningKey::from_bytes(&[index as u8 + 1; 32]),
                epochs: Epochs::new([index as u8; 16]),
                started: 0,
                log: Vec::new(),
                ids: HashMap::new(),
                cursors: HashMap::new(),
                unsynced: Vec::new(),
                clock: 0,
                access: None,
                refused: Vec::new(),
            })
            .collect();
        // Node 0 creates the stream; every node holds its genesis (joined).
        let genesis = Scribe::sign(
            Body {
                stream: None,
                author: nodes[0].id(),
                hlc: 1,
                kind: Kind::StreamCreate,
                content_type: String::new(),
                payload: Bytes::from(genesis),
                parents: vec![],
                membership: None,
                nonce: 0,
            },
            &nodes[0].key,
        );
        let stream = genesis.id;
        for node in &mut nodes {
            node.store(genesis.parts(), genesis.id, None, stream);
            if access {
                node.access = Some(genesis_state(&genesis, 1).expect("a valid genesis"));
            }
        }
        Network {
            echoes: 0,
            nodes,
            links: vec![None, None, None],
            stream,
            in_use: 3,
        }
    }

    fn append(&mut self, node: usize) {
        let stream = self.stream;
        let sim = &mut self.nodes[node];
        sim.journal();
        sim.clock += 1;
        let scribe = Scribe::sign(
            Body {
                stream: Some(stream),
                author: sim.id(),
                hlc: sim.clock,
                kind: Kind::Custom("x.sim".into()),
                content_type: String::new(),
                payload: Bytes::from(vec![node as u8; 4]),
                parents: vec![],
                membership: None,
                nonce: 0,
            },
            &sim.key,
        );
        sim.store(scribe.parts(), scribe.id, None, stream);
    }

    /// Node signs a scribe of `kind` as the log's signer would (its membership view; a
    /// membership scribe merges every head) and stores it if its own rules let it: a refusal
    /// there is the API's answer to its caller, nothing is stored. Whether it was stored.
    fn sign_judged(&mut self, node: usize, kind: Kind, payload: Vec<u8>) -> bool {
        let stream = self.stream;
        let sim = &mut self.nodes[node];
        let state = sim.access.as_ref().expect("access rules on");
        let author = sim.id();
        let parents = if kind.is_membership() {
            state.membership.heads()
        } else {
            Vec::new()
        };
        let scribe = Scribe::sign(
            Body {
                stream: Some(stream),
                author,
                hlc: sim.clock + 1,
                kind,
                content_type: String::new(),
                payload: Bytes::from(payload),
                parents,
                membership: state.membership.view_for(&author),
                nonce: 0,
            },
            &sim.key,
        );
        if judge_access(state, &scribe).is_err() {
            return false;
        }
        sim.journal();
        sim.store(scribe.parts(), scribe.id, None, stream);
        true
    }

    fn write(&mut self, node: usize) -> bool {
        self.sign_judged(node, Kind::Custom("x.sim".into()), vec![node as u8; 4])
    }

    fn grant(&mut self, by: usize, to: usize, role: Role) -> bool {
        let grant = pb::AclGrant {
            key: Bytes::copy_from_slice(self.nodes[to].id().as_bytes()),
            role: role.to_proto(),
        };
        self.sign_judged(by, Kind::AclGrant, grant.encode_to_vec())
    }

    fn revoke(&mut self, by: usize, to: usize) -> bool {
        let revoke = pb::AclRevoke {
            key: Bytes::copy_from_slice(self.nodes[to].id().as_bytes()),
        };
        self.sign_judged(by, Kind::AclRevoke, revoke.encode_to_vec())
    }

    /// What a node's projections and `quire acl list / excluded` would show: every key's role,
    /// the `x.sim` scribes its membership excludes, and those it projects.
    fn judgement(&self, node: usize) -> Judgement {
        let sim = &self.nodes[node];
        let membership = &sim.access.as_ref().expect("access rules on").membership;
        let mut judgement = Judgement {
            roles: membership
                .roles()
                .iter()
                .map(|(key, role)| (*key, *role))
                .collect(),
            ..Judgement::default()
        };
        for entry in &sim.log[1..] {
            let scribe = Scribe::decode_claimed(entry.parts.clone(), entry.id).unwrap();
            if scribe.body.kind.is_membership() {
                continue;
            }
            let view: Vec<ScribeId> = scribe.body.membership.into_iter().collect();
            let excluded = membership
                .excludes(&scribe.body.author, scribe.body.hlc, &view)
                .expect("a stored scribe's view is held");
            if excluded {
                judgement.excluded.insert(scribe.id);
            } else {
                judgement.projected.insert(scribe.id);
            }
        }
        judgement
    }

    fn heal(&mut self, link: usize) {
        if self.links[link].is_some() {
            return;
        }
        let nodes = PAIRS[link];
        let mut in_flight = [VecDeque::new(), VecDeque::new()];
        let mut make = |end: usize| {
            let node = &self.nodes[nodes[end]];
            let (session, actions) = Session::new(
                node.key.clone(),
                node.epochs.clone(),
                1,
                [end as u8 + 7; 32],
                // Both ends of one simulated link share its channel binding.
                [link as u8; 32],
            );
            for action in actions {
                if let Action::Send(message) = action {
                    in_flight[1 - end].push_back(message);
                }
            }
            session
        };
        let ends = [make(0), make(1)];
        self.links[link] = Some(Link {
            ends,
            nodes,
            in_flight,
        });
    }

    fn cut(&mut self, link: usize) {
        self.links[link] = None;
    }

    /// The node's data directory is wiped: its log holds only the genesis again, its cursors are
    /// gone and its log epoch is new (its key stays). Its connections drop.
    fn wipe(&mut self, node: usize) {
        for (link, pair) in PAIRS.iter().enumerate() {
            if pair.contains(&node) {
                self.cut(link);
            }
        }
        let sim = &mut self.nodes[node];
        sim.log.truncate(1);
        let genesis = sim.log[0].id;
        sim.ids.clear();
        sim.ids.insert(genesis, 1);
        sim.cursors.clear();
        sim.unsynced.clear();
        sim.rejudge();
        sim.started += 1;
        sim.epochs = Epochs::new([
            sim.index(),
            sim.started,
            1,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ]);
    }

    /// The node stops and starts again (connections drop); with `lost` > 0, a power loss first
    /// takes that many of its last unsynced writes.
    fn restart(&mut self, node: usize, lost: usize) {
        for (link, pair) in PAIRS.iter().enumerate() {
            if pair.contains(&node) {
                self.cut(link);
            }
        }
        self.nodes[node].lose_tail(lost);
    }

    fn deliver(&mut self, link: usize, end: usize, duplicate: bool) {
        let Some(mut connection) = self.links[link].take() else {
            return;
        };
        let message = if duplicate {
            connection.in_flight[end].front().cloned()
        } else {
            connection.in_flight[end].pop_front()
        };
        let mut open = true;
        if let Some(message) = message {
            let actions = connection.ends[end].handle(message);
            open = self.execute(&mut connection, end, actions);
        }
        if open {
            self.links[link] = Some(connection);
        }
    }

    /// Lets `end` send what it has to send (one step).
    fn pump(&mut self, link: usize, end: usize) {
        let Some(mut connection) = self.links[link].take() else {
            return;
        };
        let node = &self.nodes[connection.nodes[end]];
        let head = node.head();
        let stream = self.stream;
        if let Some(step) = connection.ends[end].next_step(|s| if *s == stream { head } else { 0 })
        {
            let message = match step {
                Step::Send(message) => Some(message),
                Step::Read(plan) => {
                    let entries: Vec<_> = (plan.from..=plan.to)
                        .take(READ_LIMIT)
                        .map(|seq| {
                            let entry = &node.log[seq as usize - 1];
                            (seq, entry.id, entry.parts.clone(), entry.origin)
                        })
                        .collect();
                    let more = entries.len() == READ_LIMIT;
                    connection.ends[end].read_done(plan, entries, more)
                }
            };
            if let Some(message) = message {
                connection.in_flight[1 - end].push_back(message);
            }
        }
        self.links[link] = Some(connection);
    }

    /// Carries out a session's actions; false if the connection closed.
    fn execute(&mut self, connection: &mut Link, end: usize, actions: Vec<Action>) -> bool {
        let node_index = connection.nodes[end];
        for action in actions {
            match action {
                Action::Send(message) => connection.in_flight[1 - end].push_back(message),
                Action::Close(_) => return false,
                Action::Ready { peer, .. } => {
                    let node = &self.nodes[node_index];
                    let cursors: Vec<(StreamId, Cursor)> = node
                        .cursors
                        .get(&peer)
                        .map(|cursor| (self.stream, *cursor))
                        .into_iter()
                        .collect();
                    let more = connection.ends[end].start(cursors, vec![(self.stream, 1)]);
                    if !self.execute(connection, end, more) {
                        return false;
                    }
                }
                Action::Store {
                    stream,
                    scribes,
                    through,
                    ..
                } => {
                    let peer = connection.ends[end].peer().unwrap();
                    let epoch = connection.ends[end].peer_epoch().unwrap();
                    let node = &mut self.nodes[node_index];
                    node.journal();
                    let mut echoes = 0;
                    for scribe in scribes {
                        if let Some(seq) = node.ids.get(&scribe.id) {
                            if node.log[*seq as usize - 1].origin.is_none() && *seq > 1 {
                                echoes += 1;
                            }
                        }
                        node.store(
                            scribe.parts,
                            scribe.id,
                            Some(PeerOrigin {
                                peer,
                                epoch,
                                seq: scribe.seq,
                            }),
                            stream,
                        );
                    }
                    // The cursor moves with the scribes (never backwards within an epoch).
                    let cursor = node.cursors.entry(peer).or_insert(Cursor { epoch, seq: 0 });
                    if cursor.epoch != epoch || cursor.seq < through {
                        *cursor = Cursor {
                            epoch,
                            seq: through,
                        };
                    }
                    self.echoes += echoes;
                }
                Action::CaughtUp { .. }
                | Action::ServeGenesis(_)
                | Action::GenesisReceived { .. } => {}
            }
        }
        true
    }

    /// Heals every link and runs until nothing moves.
    fn settle(&mut self) {
        for link in 0..self.in_use {
            self.heal(link);
        }
        for _ in 0..100_000 {
            let mut moved = false;
            for link in 0..self.in_use {
                if self.links[link].is_none() {
                    self.heal(link);
                    moved = true;
                }
            }
            for link in 0..self.in_use {
                moved |= self.step(link);
            }
            if !moved {
                return;
            }
        }
        panic!("the network did not settle");
    }

    fn sets(&self) -> Vec<BTreeSet<ScribeId>> {
        self.nodes
            .iter()
            .map(|node| node.ids.keys().copied().collect())
            .collect()
    }
}

/// Plays `ops` (on nodes and links below `nodes` and `in_use`), settles, and checks the sets.
fn play(ops: Vec<Op>, in_use: usize) -> Result<(), TestCaseError> {
    let mut network = Network::new();
    network.in_use = in_use;
    let nodes = if in_use == 1 { 2 } else { NODES };
    let mut appended = 1;
    let mut wiped = false;
    for op in ops {
        match op {
            Op::Wipe(node) => {
                network.wipe(node % nodes);
                wiped = true;
            }
            Op::Restart(node, lost) => {
                network.restart(node % nodes, lost);
                wiped |= lost > 0;
            }
            Op::Append(node) => {
                network.append(node % nodes);
                appended += 1;
            }
            Op::Deliver(link, end) => network.deliver(link % in_use, end, false),
            Op::Duplicate(link, end) => network.deliver(link % in_use, end, true),
            Op::Pump(link, end) => network.pump(link % in_use, end),
            Op::Cut(link) => network.cut(link % in_use),
            Op::Heal(link) => network.heal(link % in_use),
            Op::Exchange(link) => network.exchange(link % in_use),
            Op::Write(_) | Op::Grant(..) | Op::Revoke(..) => unreachable!("access rules are off"),
        }
    }
    network.settle();
    let sets = network.sets();
    if !wiped {
        prop_assert_eq!(sets[0].len(), appended, "every append reached node 0");
    }
    for other in 1..nodes {
        prop_assert_eq!(&sets[0], &sets[other]);
    }
    // Every node stored each scribe once.
    for node in &network.nodes[..nodes] {
        prop_assert_eq!(node.log.len(), sets[0].len());
    }
    Ok(())
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Judgement {
    roles: BTreeSet<(AuthorKey, Role)>,
    excluded: BTreeSet<ScribeId>,
    projected: BTreeSet<ScribeId>,
}

const ROLES: [Role; 3] = [Role::Reader, Role::Writer, Role::Admin];

/// Plays `ops` with access rules on, settles, and checks that the nodes agree on everything the
/// rules decide. Returns the nodes' common judgement.
fn play_access(ops: Vec<Op>) -> Result<Judgement, TestCaseError> {
    let mut network = Network::with_access();
    for op in ops {
        match op {
            Op::Write(node) => {
                network.write(node);
            }
            Op::Grant(by, to, role) => {
                network.grant(by, to, ROLES[role]);
            }
            Op::Revoke(by, to) => {
                network.revoke(by, to);
            }
            Op::Wipe(node) => network.wipe(node),
            Op::Restart(node, lost) => network.restart(node, lost),
            Op::Deliver(link, end) => network.deliver(link, end, false),
            Op::Duplicate(link, end) => network.deliver(link, end, true),
            Op::Pump(link, end) => network.pump(link, end),
            Op::Cut(link) => network.cut(link),
            Op::Heal(link) => network.heal(link),
            Op::Exchange(link) => network.exchange(link),
            Op::Append(_) => unreachable!("access ops sign through the rules"),
        }
    }
    network.settle();
    let sets = network.sets();
    for node in 0..NODES {
        prop_assert_eq!(&sets[0], &sets[node]);
        prop_assert!(
            network.nodes[node].refused.is_empty(),
            "node {} refused what another node accepted: {:?}",
            node,
            network.nodes[node].refused
        );
    }
    let judgement = network.judgement(0);
    for node in 1..NODES {
        prop_assert_eq!(&judgement, &network.judgement(node), "node {}", node);
    }
    // The same set judged in another causal order (by date: a node dates what it signs after all
    // it holds) refuses nothing and decides the same.
    let mut by_date: Vec<Scribe> = network.nodes[0]
        .log
        .iter()
        .map(|entry| Scribe::decode_claimed(entry.parts.clone(), entry.id).unwrap())
        .collect();
    by_date.sort_by_key(|scribe| (scribe.body.hlc, scribe.id));
    let mut state = genesis_state(&by_date[0], 1).unwrap();
    for scribe in &by_date[1..] {
        state.membership = judge_access(&state, scribe)
            .map_err(|error| TestCaseError::fail(format!("by date, {}: {error}", scribe.id)))?;
    }
    let roles: BTreeSet<(AuthorKey, Role)> = state
        .membership
        .roles()
        .iter()
        .map(|(key, role)| (*key, *role))
        .collect();
    prop_assert_eq!(&roles, &judgement.roles);
    Ok(judgement)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// A revoke concurrent with the revoked key's writes, mutual revokes, a grant concurrent with
    /// a revoke, across partitions, power losses and wiped nodes: every node ends with the same
    /// roles, the same excluded scribes and the same projected ones, and refuses nothing another
    /// node accepted (validity never depends on arrival order).
    #[test]
    fn every_node_judges_membership_the_same(ops in proptest::collection::vec(op_access(), 0..200)) {
        play_access(ops)?;
    }

    #[test]
    fn after_healing_every_node_holds_the_same_set(ops in proptest::collection::vec(op(), 0..120)) {
        play(ops, 3)?;
    }

    /// Two nodes alone: nothing but the epochs can bring back what a power loss took, or make a
    /// peer read seqs given out again.
    #[test]
    fn two_nodes_converge_after_power_losses(ops in proptest::collection::vec(op_two(), 0..200)) {
        play(ops, 1)?;
    }
}

impl Network {
    /// Pumps and delivers on `link` (if it is up) until nothing moves.
    fn exchange(&mut self, link: usize) {
        for _ in 0..1_000 {
            if !self.step(link) {
                return;
            }
        }
    }

    /// Lets each end of `link` (if it is up) send one step and take one message; whether
    /// anything moved.
    fn step(&mut self, link: usize) -> bool {
        let mut moved = false;
        for end in 0..2 {
            let Some(connection) = self.links[link].as_ref() else {
                return moved;
            };
            let before = connection.in_flight[1 - end].len();
            self.pump(link, end);
            let after = self.links[link]
                .as_ref()
                .map_or(0, |l| l.in_flight[1 - end].len());
            moved |= after != before;
            if self.links[link]
                .as_ref()
                .is_some_and(|l| !l.in_flight[end].is_empty())
            {
                self.deliver(link, end, false);
                moved = true;
            }
        }
        moved
    }

    /// Runs only `links` (healed once) for a while: pump and deliver on every end.
    fn run_links(&mut self, links: &[usize]) {
        for link in links {
            self.heal(*link);
        }
        for _ in 0..2_000 {
            for link in links {
                for end in 0..2 {
                    self.pump(*link, end);
                    self.deliver(*link, end, false);
                }
            }
        }
    }
}

#[test]
fn a_wiped_node_gets_back_what_it_had_sent() {
    let mut network = Network::new();
    for _ in 0..4 {
        network.append(1);
    }
    network.run_links(&[0]);
    assert_eq!(network.sets()[0].len(), 5);
    // Node 1 loses everything; only node 0 (which got those scribes from node 1) can refill it.
    network.wipe(1);
    network.run_links(&[0]);
    let sets = network.sets();
    assert_eq!(
        sets[1].len(),
        5,
        "node 0 must send node 1's own scribes back to its new epoch"
    );
    assert_eq!(sets[0], sets[1]);
}

#[test]
fn a_chain_relays_without_echoing() {
    let mut network = Network::new();
    // Only links 0 (0–1) and 1 (1–2): a chain, no 0–2 link.
    network.heal(0);
    network.heal(1);
    for _ in 0..5 {
        network.append(0);
        network.append(2);
    }
    for _ in 0..10_000 {
        for link in 0..2 {
            for end in 0..2 {
                network.pump(link, end);
                network.deliver(link, end, false);
            }
        }
    }
    let sets = network.sets();
    assert_eq!(sets[0].len(), 11);
    assert_eq!(sets[0], sets[2]);
    assert_eq!(sets[0], sets[1]);
    assert_eq!(
        network.echoes, 0,
        "a scribe went back to the node that wrote it"
    );
}

#[test]
fn a_clean_restart_sends_nothing_again() {
    let mut network = Network::new();
    for _ in 0..4 {
        network.append(0);
        network.append(1);
    }
    network.run_links(&[0]);
    let before: Vec<usize> = network.nodes.iter().map(|node| node.log.len()).collect();
    network.restart(0, 0);
    network.restart(1, 0);
    network.append(0);
    network.run_links(&[0]);
    assert_eq!(
        network.echoes, 0,
        "a scribe went back to its writer after a restart"
    );
    assert_eq!(network.nodes[0].log.len(), before[0] + 1);
    assert_eq!(
        network.nodes[1].log.len(),
        before[1] + 1,
        "only the new scribe moved"
    );
}

/// The repro: a node's peer takes 20 new scribes, a power loss takes them from the node,
/// which then writes 5 more at the same seqs. Both end with all 25, each once.
#[test]
fn a_lost_tail_comes_back_and_reused_seqs_are_not_skipped() {
    let mut network = Network::new();
    network.append(0);
    network.run_links(&[0]);
    network.restart(0, 0); // synced here
    for _ in 0..20 {
        network.append(0);
    }
    network.run_links(&[0]);
    assert_eq!(network.nodes[1].log.len(), 22);
    network.restart(0, 1_000); // every write since the restart
    assert_eq!(network.nodes[0].log.len(), 2, "the power loss took the 20");
    for _ in 0..5 {
        network.append(0);
    }
    network.run_links(&[0]);
    let sets = network.sets();
    assert_eq!(sets[0].len(), 27);
    assert_eq!(sets[0], sets[1]);
    for node in &network.nodes[..2] {
        assert_eq!(node.log.len(), 27, "each scribe stored once");
    }
}

/// Node 0 revokes node 2 while node 2 is cut off and keeps writing: on every node, node 2's
/// writes dated after the revoke are excluded, the earlier one projected, and nobody refuses
/// anything (node 2's writes were valid in its view).
#[test]
fn a_revoke_concurrent_with_writes_excludes_them_everywhere() {
    let mut network = Network::with_access();
    assert!(network.write(2));
    network.settle();
    // Node 2 alone on one side (links 0–1 only), node 0 revokes it.
    network.cut(1);
    network.cut(2);
    assert!(network.revoke(0, 2));
    network.run_links(&[0]);
    network.cut(0);
    // Node 2 has not seen the revoke; its clock runs past it.
    for _ in 0..3 {
        network.nodes[2].clock += 5;
        assert!(network.write(2), "valid in node 2's view");
    }
    network.settle();
    let judgement = network.judgement(0);
    for node in 0..NODES {
        assert!(network.nodes[node].refused.is_empty());
        assert_eq!(network.judgement(node), judgement, "node {node}");
    }
    assert_eq!(judgement.excluded.len(), 3, "the concurrent writes");
    assert_eq!(judgement.projected.len(), 1, "the write before the revoke");
    let node2 = network.nodes[2].id();
    assert!(!judgement.roles.iter().any(|(key, _)| *key == node2));
    // Once node 2 has seen the revoke, it may not write at all.
    assert!(!network.write(2));
}

/// Two admins revoke each other, each cut off from the other: mutual removal removes both, on
/// every node.
#[test]
fn mutual_revoke_removes_both_everywhere() {
    let mut network = Network::with_access();
    assert!(network.grant(0, 2, Role::Admin));
    network.settle();
    for link in 0..3 {
        network.cut(link);
    }
    assert!(network.revoke(1, 2));
    assert!(network.revoke(2, 1));
    network.settle();
    let judgement = network.judgement(0);
    for node in 0..NODES {
        assert!(network.nodes[node].refused.is_empty());
        assert_eq!(network.judgement(node), judgement, "node {node}");
    }
    let owner = network.nodes[0].id();
    assert_eq!(
        judgement.roles,
        [(owner, Role::Admin)].into_iter().collect(),
        "only the owner is left"
    );
}

/// An admin re-grants a key while another revokes it, concurrently: the revoke wins on every
/// node.
#[test]
fn a_concurrent_re_grant_loses_to_the_revoke() {
    let mut network = Network::with_access();
    network.settle();
    for link in 0..3 {
        network.cut(link);
    }
    assert!(network.revoke(0, 2));
    assert!(network.grant(1, 2, Role::Admin));
    network.settle();
    let judgement = network.judgement(0);
    for node in 0..NODES {
        assert!(network.nodes[node].refused.is_empty());
        assert_eq!(network.judgement(node), judgement, "node {node}");
    }
    let node2 = network.nodes[2].id();
    assert!(!judgement.roles.iter().any(|(key, _)| *key == node2));
}
