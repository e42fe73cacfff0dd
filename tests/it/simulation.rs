//! The replication state machine in a deterministic in-process network (raft-rs harness style):
//! nodes with in-memory logs run the very same `Session` as real nodes; proptest picks random
//! interleavings of appends, deliveries, duplicated messages, cuts (partitions: the connection and
//! everything in flight is lost) and heals. After healing everything, all nodes hold the same set.

use std::collections::{BTreeSet, HashMap, VecDeque};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use quire::log::store::{Cursor, PeerOrigin};
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
    epoch: [u8; 16],
    log: Vec<Entry>,
    ids: HashMap<ScribeId, u64>,
    cursors: HashMap<AuthorKey, Cursor>,
    clock: u64,
}

impl SimNode {
    fn id(&self) -> AuthorKey {
        AuthorKey(self.key.verifying_key().to_bytes())
    }

    fn head(&self) -> u64 {
        self.log.len() as u64
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
    Wipe(usize),
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
    ]
}

struct Network {
    /// Scribes a node received back although it wrote them itself.
    echoes: usize,
    nodes: Vec<SimNode>,
    links: Vec<Option<Link>>,
    stream: StreamId,
}

const PAIRS: [[usize; 2]; 3] = [[0, 1], [1, 2], [0, 2]];

impl Network {
    fn new() -> Network {
        let mut nodes: Vec<SimNode> = (0..NODES)
            .map(|index| SimNode {
                key: SigningKey::from_bytes(&[index as u8 + 1; 32]),
                epoch: [index as u8; 16],
                log: Vec::new(),
                ids: HashMap::new(),
                cursors: HashMap::new(),
                clock: 0,
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
                payload: Bytes::new(),
                parents: vec![],
                membership: None,
                nonce: 0,
            },
            &nodes[0].key,
        );
        let stream = genesis.id;
        for node in &mut nodes {
            node.store(genesis.parts(), genesis.id, None, stream);
        }
        Network {
            echoes: 0,
            nodes,
            links: vec![None, None, None],
            stream,
        }
    }

    fn append(&mut self, node: usize) {
        let stream = self.stream;
        let sim = &mut self.nodes[node];
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

    fn heal(&mut self, link: usize) {
        if self.links[link].is_some() {
            return;
        }
        let nodes = PAIRS[link];
        let mut in_flight = [VecDeque::new(), VecDeque::new()];
        let mut make = |end: usize| {
            let node = &self.nodes[nodes[end]];
            let (session, actions) =
                Session::new(node.key.clone(), node.epoch, [end as u8 + 7; 32]);
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
        sim.epoch[15] = sim.epoch[15].wrapping_add(1);
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
                    connection.ends[end].read_done(plan, entries, READ_LIMIT)
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
                    let more = connection.ends[end].start(cursors, vec![self.stream]);
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
                            Some(PeerOrigin { peer, epoch }),
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
        for link in 0..3 {
            self.heal(link);
        }
        for _ in 0..100_000 {
            let mut moved = false;
            for link in 0..3 {
                if self.links[link].is_none() {
                    self.heal(link);
                    moved = true;
                }
            }
            for link in 0..3 {
                for end in 0..2 {
                    let before = self.links[link]
                        .as_ref()
                        .map_or(0, |l| l.in_flight[1 - end].len());
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn after_healing_every_node_holds_the_same_set(ops in proptest::collection::vec(op(), 0..120)) {
        let mut network = Network::new();
        let mut appended = 1;
        let mut wiped = false;
        for op in ops {
            match op {
                Op::Wipe(node) => { network.wipe(node); wiped = true; }
                Op::Append(node) => { network.append(node); appended += 1; }
                Op::Deliver(link, end) => network.deliver(link, end, false),
                Op::Duplicate(link, end) => network.deliver(link, end, true),
                Op::Pump(link, end) => network.pump(link, end),
                Op::Cut(link) => network.cut(link),
                Op::Heal(link) => network.heal(link),
            }
        }
        network.settle();
        let sets = network.sets();
        if !wiped {
            prop_assert_eq!(sets[0].len(), appended, "every append reached node 0");
        }
        prop_assert_eq!(&sets[0], &sets[1]);
        prop_assert_eq!(&sets[1], &sets[2]);
        // Every node stored each scribe once.
        for node in &network.nodes {
            prop_assert_eq!(node.log.len(), sets[0].len());
        }
    }
}

impl Network {
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
