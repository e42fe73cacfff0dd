//! Replication end to end, with real nodes on `127.0.0.1:0`: convergence in pairs, chains and
//! triangles; causal local order; late joiners; resuming from cursors; wiped peers; malicious
//! peers.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use quire::node::RunningNode;
use quire::pb;
use quire::projection_api::StreamId;

use crate::common::*;

pub const CONVERGE: Duration = Duration::from_secs(120);

/// `from` dials `to`'s peer listener.
pub async fn connect(from: &RunningNode, to: &RunningNode) {
    let mut clients = clients(&from.url()).await;
    clients
        .admin
        .add_peer(pb::AddPeerRequest {
            addr: to.peer_addr.unwrap().to_string(),
        })
        .await
        .expect("add peer");
}

/// Parts `from` (which dialed) and `to`: `from` forgets `to`, and both wait until `to` holds no
/// connection.
pub async fn part(from: &RunningNode, to: &RunningNode) {
    clients(&from.url())
        .await
        .admin
        .remove_peer(pb::RemovePeerRequest {
            addr: to.peer_addr.unwrap().to_string(),
        })
        .await
        .expect("remove peer");
    wait_until(CONVERGE, "the two nodes are apart", || async {
        !node_status(to)
            .await
            .peers
            .iter()
            .any(|peer| peer.connected)
    })
    .await;
}

/// Joins `stream` on `node` (retrying while its peers are still connecting).
pub async fn join(node: &RunningNode, stream: &StreamId) {
    let mut clients = clients(&node.url()).await;
    clients
        .streams
        .join(pb::JoinStreamRequest {
            stream: bytes_of(stream),
            timeout_ms: 60_000,
        })
        .await
        .expect("join");
}

/// The ids of `stream` on `node`, in local order.
pub async fn stream_ids(node: &RunningNode, stream: &StreamId) -> Vec<Bytes> {
    let mut clients = clients(&node.url()).await;
    read_all(&mut clients)
        .await
        .into_iter()
        .filter(|entry| entry.stream == bytes_of(stream))
        .map(|entry| entry.id)
        .collect()
}

/// Waits until every node holds `count` scribes of `stream`.
pub async fn wait_for_count(nodes: &[&RunningNode], stream: &StreamId, count: u64) {
    for node in nodes {
        let log = node.log.clone();
        let stream = *stream;
        wait_until(
            CONVERGE,
            &format!("{count} scribes of the stream on every node"),
            || {
                let held = log.stream(&stream).map_or(0, |state| state.record.scribes);
                async move { held >= count }
            },
        )
        .await;
    }
}

async fn write_notes(node: &RunningNode, stream: StreamId, prefix: &str, count: usize) {
    let mut clients = clients(&node.url()).await;
    for index in 0..count {
        append_note(&mut clients, &stream, &format!("{prefix} {index}")).await;
    }
}

/// Every scribe authored by a node follows, in every other node's order, everything that node had
/// stored before it (the local order is causal).
async fn assert_causal(nodes: &[&RunningNode], stream: &StreamId) {
    let mut orders = Vec::new();
    for node in nodes {
        let mut clients = clients(&node.url()).await;
        let entries: Vec<pb::Entry> = read_all(&mut clients)
            .await
            .into_iter()
            .filter(|entry| entry.stream == bytes_of(stream))
            .collect();
        orders.push((node.log.node_key(), entries));
    }
    for (author, author_order) in &orders {
        for (_, other_order) in &orders {
            let position: HashMap<&Bytes, usize> = other_order
                .iter()
                .enumerate()
                .map(|(index, entry)| (&entry.id, index))
                .collect();
            let mut latest_seen: Option<usize> = None;
            for entry in author_order {
                let here = position[&entry.id];
                if entry.author.as_ref() == author.as_bytes() {
                    if let Some(latest) = latest_seen {
                        assert!(
                            here > latest,
                            "a scribe by {author:?} precedes one its author had already stored"
                        );
                    }
                }
                latest_seen = Some(latest_seen.map_or(here, |latest| latest.max(here)));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_writing_concurrently_converge_in_causal_order() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = start_node(dir_b.path()).await;
    let mut clients_a = clients(&a.url()).await;
    let stream = create_stream(&mut clients_a, "pair", None).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    tokio::join!(
        write_notes(&a, stream, "a1", 150),
        write_notes(&a, stream, "a2", 150),
        write_notes(&b, stream, "b1", 150),
        write_notes(&b, stream, "b2", 150),
    );
    wait_for_count(&[&a, &b], &stream, 601).await;
    let (ids_a, ids_b) = (stream_ids(&a, &stream).await, stream_ids(&b, &stream).await);
    assert_eq!(
        ids_a.iter().collect::<HashSet<_>>(),
        ids_b.iter().collect::<HashSet<_>>()
    );
    assert_eq!(ids_a.len(), 601, "each scribe stored once");
    assert_causal(&[&a, &b], &stream).await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_and_a_triangle_converge_with_each_scribe_stored_once() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let c = start_node(dirs[2].path()).await;
    let mut clients_a = clients(&a.url()).await;
    let stream = create_stream(&mut clients_a, "chain", None).await;
    // Chain A – B – C: no link between A and C.
    connect(&b, &a).await;
    connect(&c, &b).await;
    join(&b, &stream).await;
    join(&c, &stream).await;
    tokio::join!(
        write_notes(&a, stream, "a", 60),
        write_notes(&c, stream, "c", 60),
        write_notes(&b, stream, "b", 60)
    );
    wait_for_count(&[&a, &b, &c], &stream, 181).await;
    let reference: HashSet<Bytes> = stream_ids(&a, &stream).await.into_iter().collect();
    for node in [&b, &c] {
        assert_eq!(
            stream_ids(node, &stream)
                .await
                .into_iter()
                .collect::<HashSet<_>>(),
            reference
        );
    }
    // Close the triangle: C – A too. Every scribe is still stored exactly once per node.
    connect(&a, &c).await;
    tokio::join!(
        write_notes(&a, stream, "a", 40),
        write_notes(&b, stream, "b", 40),
        write_notes(&c, stream, "c", 40)
    );
    wait_for_count(&[&a, &b, &c], &stream, 301).await;
    let reference: HashSet<Bytes> = stream_ids(&a, &stream).await.into_iter().collect();
    for node in [&a, &b, &c] {
        let ids = stream_ids(node, &stream).await;
        assert_eq!(ids.len(), 301, "stored once per node");
        assert_eq!(ids.into_iter().collect::<HashSet<_>>(), reference);
    }
    assert_causal(&[&a, &b, &c], &stream).await;
    for node in [a, b, c] {
        node.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_catches_up_100k_then_receives_live_scribes() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let mut clients_a = clients(&a.url()).await;
    let stream = create_stream(&mut clients_a, "late", None).await;
    append_bulk(&mut clients_a, &stream, 100_000).await;
    let b = start_node(dir_b.path()).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    wait_for_count(&[&b], &stream, 100_001).await;
    // Then live: a subscriber on B sees a scribe appended on A.
    let mut clients_b = clients(&b.url()).await;
    let mut events = clients_b
        .log
        .subscribe(pb::SubscribeRequest {
            stream: bytes_of(&stream),
            from_seq: b.log.head() + 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let live = append_note(&mut clients_a, &stream, "live").await;
    loop {
        let event = tokio::time::timeout(CONVERGE, events.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(pb::subscribe_event::Event::Scribe(entry)) = event.event {
            assert_eq!(entry.id, live.id);
            break;
        }
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// `quire status` counters of `node` for its peer at `addr` and `stream`.
async fn counters(
    node: &RunningNode,
    addr: &str,
    stream: &StreamId,
) -> Option<pb::PeerStreamStatus> {
    let mut clients = clients(&node.url()).await;
    let status = clients
        .admin
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let peer = status.peers.into_iter().find(|peer| peer.addr == addr)?;
    peer.streams
        .into_iter()
        .find(|counters| counters.stream == bytes_of(stream))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_mid_catch_up_resumes_from_its_cursor() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let mut clients_a = clients(&a.url()).await;
    let stream = create_stream(&mut clients_a, "resume", None).await;
    append_bulk(&mut clients_a, &stream, 30_000).await;
    let a_addr = a.peer_addr.unwrap().to_string();
    let b = start_node(dir_b.path()).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    let log = b.log.clone();
    wait_until(CONVERGE, "B half way through the catch-up", || {
        let held = log.stream(&stream).map_or(0, |state| state.record.scribes);
        async move { held >= 5_000 }
    })
    .await;
    drop(log);
    b.stop().await.unwrap();
    // What B held when it stopped, read from its data directory.
    let before = quire::verify::verify(dir_b.path()).unwrap().scribes;
    assert!(
        before < 30_001,
        "the restart happens mid catch-up ({before} held)"
    );

    // Restart: the peer is remembered, the join too; catch-up resumes from the cursor.
    let b = start_node(dir_b.path()).await;
    wait_for_count(&[&b], &stream, 30_001).await;
    // The counters are updated just after a batch commits: wait for the last one's.
    wait_until(
        CONVERGE,
        "B's counters to include the last batch",
        || async {
            counters(&b, &a_addr, &stream)
                .await
                .is_some_and(|counters| counters.received >= 30_001 - before)
        },
    )
    .await;
    let counters = counters(&b, &a_addr, &stream)
        .await
        .expect("counters for A");
    assert!(
        counters.duplicates <= quire::replication::connection::BATCH_SCRIBES as u64,
        "after the restart {} scribes were re-sent; at most one batch may be",
        counters.duplicates
    );
    assert_eq!(
        counters.received,
        30_001 - before,
        "after the restart B receives exactly what it lacked"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_data_was_wiped_is_refilled() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let mut clients_a = clients(&a.url()).await;
    let stream = create_stream(&mut clients_a, "wipe", None).await;
    write_notes(&a, stream, "before", 50).await;
    let b = start_node(dir_b.path()).await;
    connect(&b, &a).await;
    connect(&a, &b).await;
    join(&b, &stream).await;
    write_notes(&b, stream, "from b", 20).await;
    wait_for_count(&[&a, &b], &stream, 71).await;
    let old_epoch = b.log.epoch();
    b.stop().await.unwrap();

    // Wipe B's log (its key stays: same node, new log epoch).
    std::fs::remove_dir_all(dir_b.path().join("db")).unwrap();
    let b = start_node(dir_b.path()).await;
    assert_ne!(b.log.epoch(), old_epoch);
    connect(&b, &a).await;
    join(&b, &stream).await;
    write_notes(&a, stream, "after", 10).await;
    // A ignores its cursor on B's old epoch: what B writes now reaches A.
    write_notes(&b, stream, "b after the wipe", 5).await;
    wait_for_count(&[&a, &b], &stream, 86).await;
    assert_eq!(
        stream_ids(&b, &stream)
            .await
            .into_iter()
            .collect::<HashSet<_>>(),
        stream_ids(&a, &stream)
            .await
            .into_iter()
            .collect::<HashSet<_>>()
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_and_joins_are_remembered_and_bad_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let status = clients
        .admin
        .add_peer(pb::AddPeerRequest {
            addr: "not an address".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let reply = clients
        .admin
        .add_peer(pb::AddPeerRequest {
            addr: "127.0.0.1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.addr, "127.0.0.1:7000", "the default peer port");
    // Nobody has this stream: the join is pending, with a message saying what to do.
    let status = clients
        .streams
        .join(pb::JoinStreamRequest {
            stream: Bytes::from(vec![5u8; 32]),
            timeout_ms: 100,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    assert!(
        status.message().contains("quire peer add"),
        "{}",
        status.message()
    );
    node.stop().await.unwrap();
    let node = start_node(dir.path()).await;
    let peers = node.log.store().peers().unwrap();
    assert_eq!(peers, vec!["127.0.0.1:7000".to_string()]);
    assert_eq!(
        node.log.store().pending_joins().unwrap(),
        vec![StreamId::from([5u8; 32])]
    );
    node.stop().await.unwrap();
}

/// The digests of the stream's sql, kv and files copies on `node`.
pub async fn digests(node: &RunningNode, stream: &StreamId) -> Vec<(String, Bytes)> {
    let mut client =
        pb::projections_client::ProjectionsClient::new(owner_channel(&node.url()).await);
    let mut out = Vec::new();
    for name in ["sql", "kv", "files"] {
        let digest = client
            .digest(pb::DigestRequest {
                name: name.into(),
                stream: bytes_of(stream),
            })
            .await
            .unwrap_or_else(|status| panic!("digest of {name}: {status:?}"))
            .into_inner()
            .digest;
        out.push((name.to_string(), digest));
    }
    out
}

/// Waits until both nodes hold `count` scribes of the stream, the same ones, and every projection
/// of it has the same digest on both.
pub async fn converge(a: &RunningNode, b: &RunningNode, stream: &StreamId, count: u64) {
    wait_for_count(&[a, b], stream, count).await;
    let (ids_a, ids_b) = (stream_ids(a, stream).await, stream_ids(b, stream).await);
    assert_eq!(ids_a.len() as u64, count, "A stored each scribe once");
    assert_eq!(ids_b.len() as u64, count, "B stored each scribe once");
    assert_eq!(
        ids_a.iter().collect::<HashSet<_>>(),
        ids_b.iter().collect::<HashSet<_>>()
    );
    wait_until(CONVERGE, "equal projection digests", || async {
        digests(a, stream).await == digests(b, stream).await
    })
    .await;
}
