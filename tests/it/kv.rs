//! The key/value table end to end: `Kv` over gRPC on real nodes, leases judged by injectable
//! clocks (nobody sleeps an hour), replication to late joiners, same-instant ties, partitions and
//! heals, and `Watch` under heavy writes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quire::node::{NodeConfig, RunningNode};
use quire::pb;
use quire::projection_api::StreamId;

use crate::common::*;
use crate::replication::{connect, join, CONVERGE};
use quire::api::access::AuthChannel;

const HOUR_MS: u64 = 3_600_000;
const WAIT_WRITES: Duration = Duration::from_secs(60);

/// A node whose wall clock the test sets.
pub async fn node_at(dir: &std::path::Path, clock: &Arc<AtomicU64>) -> RunningNode {
    let mut config = NodeConfig::new(dir);
    let clock = clock.clone();
    config.wall = Some(Arc::new(move || clock.load(Ordering::SeqCst)));
    start_config(config, true).await
}

pub async fn kv(node: &RunningNode) -> pb::kv_client::KvClient<AuthChannel> {
    let channel = owner_channel(&node.url()).await;
    pb::kv_client::KvClient::new(channel)
}

pub async fn set(
    kv: &mut pb::kv_client::KvClient<AuthChannel>,
    stream: &StreamId,
    key: &[u8],
    value: &[u8],
) -> Result<pb::KvEntry, tonic::Status> {
    kv.set(pb::KvSetRequest {
        stream: bytes_of(stream),
        key: Bytes::copy_from_slice(key),
        value: Bytes::copy_from_slice(value),
    })
    .await
    .map(|reply| reply.into_inner())
}

pub async fn get(
    kv: &mut pb::kv_client::KvClient<AuthChannel>,
    stream: &StreamId,
    key: &[u8],
) -> Result<pb::KvEntry, tonic::Status> {
    kv.get(pb::KvGetRequest {
        stream: bytes_of(stream),
        key: Bytes::copy_from_slice(key),
    })
    .await
    .map(|reply| reply.into_inner())
}

pub async fn delete(
    kv: &mut pb::kv_client::KvClient<AuthChannel>,
    stream: &StreamId,
    key: &[u8],
) -> Result<pb::KvEntry, tonic::Status> {
    kv.delete(pb::KvDeleteRequest {
        stream: bytes_of(stream),
        key: Bytes::copy_from_slice(key),
    })
    .await
    .map(|reply| reply.into_inner())
}

/// The whole dict of `stream` on `node`: key → (value, fence), in pages.
async fn dict(node: &RunningNode, stream: &StreamId) -> BTreeMap<Vec<u8>, (Vec<u8>, u64)> {
    let mut kv = kv(node).await;
    let mut dict = BTreeMap::new();
    let mut after = Bytes::new();
    loop {
        let page = kv
            .scan(pb::KvScanRequest {
                stream: bytes_of(stream),
                prefix: Bytes::new(),
                limit: 0,
                after: after.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        for entry in &page.entries {
            dict.insert(entry.key.to_vec(), (entry.value.to_vec(), entry.fence));
        }
        match page.entries.last() {
            Some(last) if page.more => after = last.key.clone(),
            _ => return dict,
        }
    }
}

/// Gives `to` the stream's genesis by hand (no peer link): `to` holds the stream while the two
/// nodes are still partitioned.
pub async fn hand_over_genesis(from: &RunningNode, to: &RunningNode, stream: &StreamId) {
    let genesis = clients(&from.url())
        .await
        .log
        .get(pb::GetScribeRequest {
            id: bytes_of(stream),
        })
        .await
        .unwrap()
        .into_inner();
    clients(&to.url())
        .await
        .log
        .append_signed(pb::AppendSignedRequest {
            id: genesis.id.clone(),
            ..signed_request(entry_parts(&genesis))
        })
        .await
        .expect("the genesis is accepted as a signed scribe");
}

/// Whether `node`'s kv table has applied everything `node` holds of `stream`.
async fn table_caught_up(node: &RunningNode, stream: &StreamId) -> bool {
    let head = node.log.stream(stream).map_or(0, |s| s.record.head_seq);
    kv(node)
        .await
        .scan(pb::KvScanRequest {
            stream: bytes_of(stream),
            prefix: Bytes::new(),
            limit: 1,
            after: Bytes::new(),
        })
        .await
        .map(|reply| reply.into_inner().seq >= head)
        .unwrap_or(false)
}

/// Waits until every node holds the same scribes of `stream` and the same kv table; returns it.
pub async fn converged(
    nodes: &[&RunningNode],
    stream: &StreamId,
) -> BTreeMap<Vec<u8>, (Vec<u8>, u64)> {
    wait_until(
        CONVERGE,
        "every node's scribes and kv table to agree",
        || async {
            let counts: Vec<u64> = nodes
                .iter()
                .map(|node| node.log.stream(stream).map_or(0, |s| s.record.scribes))
                .collect();
            if counts.iter().any(|count| *count != counts[0]) {
                return false;
            }
            for node in nodes {
                if !table_caught_up(node, stream).await {
                    return false;
                }
            }
            let first = dict(nodes[0], stream).await;
            for node in &nodes[1..] {
                if dict(node, stream).await != first {
                    return false;
                }
            }
            true
        },
    )
    .await;
    dict(nodes[0], stream).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_round_trip_and_bad_requests_are_refused_with_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "kv", None).await;
    let mut kv = kv(&node).await;

    let binary: Vec<u8> = (0..=255).collect();
    for (key, value) in [
        (&b"ascii"[..], &b"hello"[..]),
        ("ключ".as_bytes(), "значение ✓".as_bytes()),
        (&[0u8, 255, 7][..], &binary[..]),
        (&b"empty"[..], &b""[..]),
    ] {
        let written = set(&mut kv, &stream, key, value).await.unwrap();
        assert_eq!(written.fence, 1);
        assert_eq!(written.written, written.id, "this write is the key's state");
        assert_eq!(written.owner.as_ref(), node.log.node_key().as_bytes());
        assert!(written.lease_until_ms > 0, "leasing is on by default");
        let read = get(&mut kv, &stream, key).await.unwrap();
        assert_eq!(read.value.as_ref(), value);
        assert!(read.present);
    }
    let again = set(&mut kv, &stream, b"ascii", b"again").await.unwrap();
    assert_eq!(again.fence, 2, "the owner's set renews and counts");
    let scanned = dict(&node, &stream).await;
    assert_eq!(scanned.len(), 4);

    let head_before = head(&mut clients).await;
    let missing = get(&mut kv, &stream, b"nope").await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let missing = delete(&mut kv, &stream, b"nope").await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert!(
        missing.message().contains("no value to delete"),
        "{missing:?}"
    );
    let empty = set(&mut kv, &stream, b"", b"x").await.unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    let long = set(&mut kv, &stream, &[b'k'; 1025], b"x")
        .await
        .unwrap_err();
    assert_eq!(long.code(), tonic::Code::InvalidArgument);
    assert!(long.message().contains("1024"), "{long:?}");
    let unknown = set(&mut kv, &StreamId::from([3; 32]), b"k", b"x")
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert_eq!(
        head(&mut clients).await,
        head_before,
        "a refused write writes nothing"
    );

    // An update is all or nothing: one refused op refuses the whole call.
    let mixed = kv
        .update(pb::KvUpdateRequest {
            stream: bytes_of(&stream),
            sets: vec![pb::KvSetRequest {
                stream: bytes_of(&stream),
                key: Bytes::from("fresh"),
                value: Bytes::from("x"),
            }],
            deletes: vec![pb::KvDeleteRequest {
                stream: bytes_of(&stream),
                key: Bytes::from("nope"),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(mixed.code(), tonic::Code::NotFound);
    let twice = kv
        .update(pb::KvUpdateRequest {
            stream: bytes_of(&stream),
            sets: vec![
                pb::KvSetRequest {
                    stream: bytes_of(&stream),
                    key: Bytes::from("fresh"),
                    value: Bytes::from("1"),
                },
                pb::KvSetRequest {
                    stream: bytes_of(&stream),
                    key: Bytes::from("fresh"),
                    value: Bytes::from("2"),
                },
            ],
            deletes: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(twice.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        head(&mut clients).await,
        head_before,
        "nothing of either was written"
    );
    assert_eq!(
        get(&mut kv, &stream, b"fresh").await.unwrap_err().code(),
        tonic::Code::NotFound
    );

    let deleted = delete(&mut kv, &stream, b"ascii").await.unwrap();
    assert!(!deleted.present);
    assert_eq!(deleted.fence, 3);
    assert_eq!(
        get(&mut kv, &stream, b"ascii").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_hold_across_a_chain_of_three_nodes_until_they_end() {
    let now = quire::hlc::system_wall_clock()();
    let clocks: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::new(AtomicU64::new(now))).collect();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = node_at(dirs[0].path(), &clocks[0]).await;
    let b = node_at(dirs[1].path(), &clocks[1]).await;
    let c = node_at(dirs[2].path(), &clocks[2]).await;
    let mut clients_a = clients(&a.url()).await;
    let stream = create_stream(&mut clients_a, "leases", None).await;
    let mut kv_a = kv(&a).await;
    set(&mut kv_a, &stream, b"lock", b"held by a")
        .await
        .unwrap();

    // Chain A - B - C; B and C join after the value was set.
    connect(&b, &a).await;
    connect(&c, &b).await;
    join(&b, &stream).await;
    join(&c, &stream).await;
    let dict_c = converged(&[&a, &b, &c], &stream).await;
    assert_eq!(dict_c[&b"lock".to_vec()].0, b"held by a");

    // C may not take A's key while A's lease lives; the refusal names the holder and the end.
    let mut kv_c = kv(&c).await;
    let head_c = c.log.head();
    let refused = set(&mut kv_c, &stream, b"lock", b"c wants it")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains(&a.log.node_key().to_hex()),
        "{refused:?}"
    );
    assert!(refused.message().contains("until unix ms"), "{refused:?}");
    let refused = delete(&mut kv_c, &stream, b"lock").await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "a non-owner delete"
    );
    assert_eq!(c.log.head(), head_c, "nothing written");

    // An hour later (on every clock: a node ignores clocks far ahead of its own), the key is free.
    for clock in &clocks {
        clock.store(now + HOUR_MS + 1_000, Ordering::SeqCst);
    }
    let taken = set(&mut kv_c, &stream, b"lock", b"c has it").await.unwrap();
    assert_eq!(taken.owner.as_ref(), c.log.node_key().as_bytes());
    assert_eq!(taken.fence, 2, "the fencing token counts valid writes");
    let dict = converged(&[&a, &b, &c], &stream).await;
    assert_eq!(dict[&b"lock".to_vec()], (b"c has it".to_vec(), 2));

    // A is now refused in turn: the lease is C's.
    let refused = set(&mut kv_a, &stream, b"lock", b"a again")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

    // C's delete releases the key: once A has it, A takes the key at once.
    delete(&mut kv_c, &stream, b"lock").await.unwrap();
    converged(&[&a, &b, &c], &stream).await;
    let retaken = set(&mut kv_a, &stream, b"lock", b"a again").await.unwrap();
    assert_eq!(retaken.owner.as_ref(), a.log.node_key().as_bytes());
    assert_eq!(retaken.fence, 4);

    // Binary keys and values travel the chain intact.
    let binary: Vec<u8> = (0..=255u8).rev().collect();
    set(&mut kv_a, &stream, &[0, 1, 255], &binary)
        .await
        .unwrap();
    converged(&[&a, &b, &c], &stream).await;
    let read = get(&mut kv_c, &stream, &[0, 1, 255]).await.unwrap();
    assert_eq!(read.value.as_ref(), &binary[..]);
    for node in [a, b, c] {
        node.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_leasing_off_concurrent_writers_converge_on_the_last_by_clock() {
    let now = quire::hlc::system_wall_clock()();
    let clocks: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::new(AtomicU64::new(now))).collect();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = node_at(dirs[0].path(), &clocks[0]).await;
    let b = node_at(dirs[1].path(), &clocks[1]).await;
    let c = node_at(dirs[2].path(), &clocks[2]).await;
    let mut clients_a = clients(&a.url()).await;
    // Leasing off: last writer wins by (hlc, author, id).
    let policy = pb::Policy {
        leasing_disabled: true,
        ..Default::default()
    };
    let stream = create_stream(&mut clients_a, "lww", Some(policy)).await;
    // Partitioned: B and C hold the stream (its genesis handed over) but no link yet.
    hand_over_genesis(&a, &b, &stream).await;
    hand_over_genesis(&a, &c, &stream).await;

    // Three authors write the same keys while A, B and C cannot see each other's writes:
    // B's write is later on its clock, so B wins "k" everywhere; "gone" is set then deleted on A
    // at a later instant than C's set, so it stays deleted everywhere.
    let (mut kv_a, mut kv_b, mut kv_c) = (kv(&a).await, kv(&b).await, kv(&c).await);
    clocks[1].store(now + 5_000, Ordering::SeqCst);
    clocks[0].store(now + 10_000, Ordering::SeqCst);
    let mut writes = Vec::new();
    writes.push(tokio::spawn(async move {
        set(&mut kv_a, &stream, b"gone", b"a").await.unwrap();
        delete(&mut kv_a, &stream, b"gone").await.unwrap();
    }));
    writes.push(tokio::spawn(async move {
        set(&mut kv_b, &stream, b"k", b"from b, later")
            .await
            .unwrap();
    }));
    writes.push(tokio::spawn(async move {
        set(&mut kv_c, &stream, b"k", b"from c, earlier")
            .await
            .unwrap();
        set(&mut kv_c, &stream, b"gone", b"c, before the delete")
            .await
            .unwrap();
    }));
    for write in writes {
        write.await.unwrap();
    }
    // Heal, as a chain A - B - C.
    connect(&b, &a).await;
    connect(&c, &b).await;
    let dict = converged(&[&a, &b, &c], &stream).await;
    assert_eq!(dict[&b"k".to_vec()].0, b"from b, later");
    assert!(
        !dict.contains_key(b"gone".as_slice()),
        "a deleted key never comes back: {dict:?}"
    );
    for node in [a, b, c] {
        node.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_same_instant_the_lower_author_wins_on_every_node() {
    let now = quire::hlc::system_wall_clock()();
    // Both clocks stand still at the same millisecond, and the nodes are partitioned: both
    // writes get the same hlc, and neither node refuses its own.
    let clock = Arc::new(AtomicU64::new(now));
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node_at(dir_a.path(), &clock).await;
    let b = node_at(dir_b.path(), &clock).await;
    let mut clients_a = clients(&a.url()).await;
    let stream = create_stream(&mut clients_a, "tie", None).await;
    hand_over_genesis(&a, &b, &stream).await;
    let written_a = set(&mut kv(&a).await, &stream, b"tie", b"a").await.unwrap();
    let written_b = set(&mut kv(&b).await, &stream, b"tie", b"b").await.unwrap();
    assert_eq!(written_a.hlc, written_b.hlc, "the same instant");
    // Heal.
    connect(&b, &a).await;
    let dict = converged(&[&a, &b], &stream).await;
    let (winner, loser) = if a.log.node_key() < b.log.node_key() {
        (b"a", b"b")
    } else {
        (b"b", b"a")
    };
    assert_eq!(
        dict[&b"tie".to_vec()],
        (winner.to_vec(), 1),
        "the lower author id wins"
    );
    // The loser is refused now that it sees the winner's lease.
    let loser_node = if winner == b"a" { &b } else { &a };
    let refused = set(&mut kv(loser_node).await, &stream, b"tie", loser)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_writers_agree_after_healing_and_a_delete_never_comes_back() {
    let now = quire::hlc::system_wall_clock()();
    let clocks: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(now))).collect();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node_at(dir_a.path(), &clocks[0]).await;
    let b = node_at(dir_b.path(), &clocks[1]).await;
    let stream = create_stream(&mut clients(&a.url()).await, "partition", None).await;
    hand_over_genesis(&a, &b, &stream).await;
    let mut kv_a = kv(&a).await;
    // Partitioned, leasing on: A takes "k"; B, a second later on its own clock, takes it too
    // (it cannot see A's lease).
    set(&mut kv_a, &stream, b"k", b"a, first").await.unwrap();
    set(&mut kv_a, &stream, b"gone", b"soon deleted")
        .await
        .unwrap();
    clocks[1].store(now + 1_000, Ordering::SeqCst);
    set(&mut kv(&b).await, &stream, b"k", b"b, second")
        .await
        .unwrap();
    // Heal: A's lease was live when B wrote, so A's value wins everywhere.
    connect(&b, &a).await;
    let dict = converged(&[&a, &b], &stream).await;
    assert_eq!(dict[&b"k".to_vec()], (b"a, first".to_vec(), 1));
    assert!(dict.contains_key(b"gone".as_slice()));

    // Partition again (B down), A deletes "gone", heal (B back, it redials A): the tombstone
    // reaches B, and B's stale copy does not bring the key back.
    b.stop().await.unwrap();
    clocks[0].store(now + 2_000, Ordering::SeqCst);
    delete(&mut kv_a, &stream, b"gone").await.unwrap();
    let b = node_at(dir_b.path(), &clocks[1]).await;
    let dict = converged(&[&a, &b], &stream).await;
    assert!(!dict.contains_key(b"gone".as_slice()), "{dict:?}");
    assert_eq!(
        get(&mut kv(&b).await, &stream, b"gone")
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_started_during_heavy_writes_ends_with_exactly_the_final_state() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "watched", None).await;
    // The writer pauses halfway until the watch has its snapshot, so the watch overlaps the writes
    // however the two tasks are scheduled.
    let (snapshot_taken, mut resume) = tokio::sync::oneshot::channel::<()>();
    let writer = {
        let mut kv = kv(&node).await;
        tokio::spawn(async move {
            for round in 0..40u32 {
                if round == 20 {
                    (&mut resume).await.unwrap();
                }
                let sets = (0..10u32)
                    .map(|key| pb::KvSetRequest {
                        stream: bytes_of(&stream),
                        key: Bytes::from(format!("key{key}")),
                        value: Bytes::from(format!("round {round}")),
                    })
                    .collect();
                // Some rounds, and the last, delete key3 instead.
                let deletes = if round % 7 == 2 || round == 39 {
                    vec![pb::KvDeleteRequest {
                        stream: bytes_of(&stream),
                        key: Bytes::from("key3"),
                    }]
                } else {
                    vec![]
                };
                let update = pb::KvUpdateRequest {
                    stream: bytes_of(&stream),
                    sets: if deletes.is_empty() { sets } else { vec![] },
                    deletes,
                };
                kv.update(update).await.unwrap();
            }
        })
    };
    // Start watching once the writer is well under way: once the kv table (not just the log, which
    // runs ahead of it) holds a write past seq 50.
    let reader = kv(&node).await;
    wait_until(WAIT_WRITES, "the kv table to pass seq 50", || {
        let mut reader = reader.clone();
        async move {
            reader
                .get(pb::KvGetRequest {
                    stream: bytes_of(&stream),
                    key: Bytes::from("key0"),
                })
                .await
                .is_ok_and(|entry| entry.into_inner().seq > 50)
        }
    })
    .await;
    let mut watch = kv(&node)
        .await
        .watch(pb::KvWatchRequest {
            stream: bytes_of(&stream),
            prefix: Bytes::from("key"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The first event comes from the snapshot (or is CaughtUp after it): it exists by now.
    let first = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .expect("the watch starts")
        .unwrap()
        .expect("the watch stays open");
    snapshot_taken.send(()).unwrap();
    writer.await.unwrap();
    let last_seq = node.log.stream(&stream).unwrap().record.head_seq;
    let mut seen: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
    let mut caught_up_at = None;
    let mut changes = Vec::new();
    let mut first = Some(first);
    while changes.last().copied().unwrap_or(0) < last_seq {
        let event = match first.take() {
            Some(event) => event,
            None => tokio::time::timeout(Duration::from_secs(30), watch.message())
                .await
                .expect("the watch keeps delivering")
                .unwrap()
                .expect("the watch stays open"),
        };
        match event.event.unwrap() {
            pb::kv_watch_event::Event::Entry(entry) => {
                seen.insert(
                    entry.key.to_vec(),
                    entry.present.then(|| entry.value.to_vec()),
                );
                if caught_up_at.is_some() {
                    changes.push(entry.seq);
                }
            }
            pb::kv_watch_event::Event::CaughtUp(at) => {
                assert!(caught_up_at.is_none(), "CaughtUp comes once");
                caught_up_at = Some(at.seq);
                changes.push(at.seq);
            }
        }
    }
    // Every write after the snapshot arrives, in order, none skipped (every scribe of the stream
    // after the genesis is a kv write to a "key…" key).
    let caught_up_at = caught_up_at.unwrap();
    assert!(
        caught_up_at > 50 && caught_up_at < last_seq,
        "the watch overlapped the writes"
    );
    assert_eq!(changes, (caught_up_at..=last_seq).collect::<Vec<_>>());
    assert_eq!(
        seen[b"key3".as_slice()],
        None,
        "the last write, a delete, arrived as one"
    );
    let live: BTreeMap<Vec<u8>, Option<Vec<u8>>> = dict(&node, &stream)
        .await
        .into_iter()
        .map(|(key, (value, _))| (key, Some(value)))
        .collect();
    let seen_live: BTreeMap<Vec<u8>, Option<Vec<u8>>> = seen
        .into_iter()
        .filter(|(_, value)| value.is_some())
        .collect();
    assert_eq!(seen_live, live, "snapshot + changes = the final state");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_from_a_seq_without_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "resume", None).await;
    let mut kv = kv(&node).await;
    set(&mut kv, &stream, b"a", b"1").await.unwrap();
    let resume_at = set(&mut kv, &stream, b"b", b"2").await.unwrap().seq;
    set(&mut kv, &stream, b"a", b"3").await.unwrap();
    append_note(&mut clients, &stream, "not a kv scribe").await;
    let mut watch = kv
        .watch(pb::KvWatchRequest {
            stream: bytes_of(&stream),
            from_seq: resume_at,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut changes = Vec::new();
    for _ in 0..2 {
        let event = watch.message().await.unwrap().unwrap();
        match event.event.unwrap() {
            pb::kv_watch_event::Event::Entry(entry) => {
                changes.push((entry.seq, entry.key.to_vec()))
            }
            other => panic!("a resumed watch has no snapshot and no CaughtUp: {other:?}"),
        }
    }
    assert_eq!(
        changes,
        [(resume_at, b"b".to_vec()), (resume_at + 1, b"a".to_vec())]
    );
    // Live changes follow.
    let live = set(&mut kv, &stream, b"c", b"4").await.unwrap();
    let event = watch.message().await.unwrap().unwrap();
    match event.event.unwrap() {
        pb::kv_watch_event::Event::Entry(entry) => assert_eq!(entry.seq, live.seq),
        other => panic!("{other:?}"),
    }
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_payload_that_does_not_decode_is_refused_at_admission_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut owner = clients(&node.url()).await;
    let stream = create_stream(&mut owner, "kv", None).await;
    let head = node.log.head();
    let garbage: &[u8] = b"\xff\xfe not a protobuf KvSet";
    // Node-signed, through Log.Append.
    for kind in ["kv.set", "kv.delete"] {
        let refused = owner
            .log
            .append(pb::AppendRequest {
                stream: bytes_of(&stream),
                kind: kind.into(),
                content_type: "application/x-protobuf".into(),
                payload: Bytes::from_static(garbage),
                parents: vec![],
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().contains("payload is not a Kv"),
            "{refused:?}"
        );
    }
    // Signed by a stranger (anyone may write kv.* by default), through AppendSigned.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let scribe = client_scribe(&client_key(9), &stream, "kv.set", garbage, now << 16);
    let refused = pb::log_client::LogClient::new(stranger_channel(&node.url()).await)
        .append_signed(signed_request(scribe.parts()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    // A key that is too long, in a well-formed payload.
    let (kind, payload) = quire_projection_kv::encode(&vec![b'k'; 100_000], Some(b"v"), None);
    let refused = owner
        .log
        .append(pb::AppendRequest {
            stream: bytes_of(&stream),
            kind: kind.to_string(),
            content_type: quire_projection_kv::CONTENT_TYPE.into(),
            payload: Bytes::from(payload),
            parents: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    // Nothing was stored, and nothing waits in a quarantine.
    assert_eq!(node.log.head(), head);
    let parked = pb::projections_client::ProjectionsClient::new(owner_channel(&node.url()).await)
        .quarantined(pb::QuarantinedRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(parked.entries.is_empty(), "{parked:?}");
    node.stop().await.unwrap();
}

/// A watch's snapshot of a table larger than a page (600 values of 64 KiB: about 16 a page) is
/// read page by page as the client reads, so writes land between its pages. Applying the events
/// in order, the client never sees a key go back to an older write (a change a page already holds
/// is not sent again), ends with exactly the final state, and `CaughtUp` names the seq of the
/// last page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_watch_snapshot_with_writes_between_its_pages_ends_with_the_final_state() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "paged", None).await;
    let mut writer = kv(&node).await;
    let value = |round: u32, key: u32| {
        let mut value = format!("round {round} key {key} ").into_bytes();
        value.resize(64 << 10, b'.');
        Bytes::from(value)
    };
    let key = |key: u32| Bytes::from(format!("k{key:04}"));
    for batch in 0..20u32 {
        writer
            .update(pb::KvUpdateRequest {
                stream: bytes_of(&stream),
                sets: (batch * 30..(batch + 1) * 30)
                    .map(|k| pb::KvSetRequest {
                        stream: bytes_of(&stream),
                        key: key(k),
                        value: value(0, k),
                    })
                    .collect(),
                deletes: vec![],
            })
            .await
            .unwrap();
    }
    let mut watch = kv(&node)
        .await
        .watch(pb::KvWatchRequest {
            stream: bytes_of(&stream),
            prefix: Bytes::from("k"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().expect("a first entry");
    // While the watch waits for its reader, keys all over the table change and some go.
    for round in 1..=30u32 {
        let k = (round * 197) % 600;
        let deletes = if round % 5 == 0 {
            vec![pb::KvDeleteRequest {
                stream: bytes_of(&stream),
                key: key((k + 300) % 600),
            }]
        } else {
            vec![]
        };
        writer
            .update(pb::KvUpdateRequest {
                stream: bytes_of(&stream),
                sets: vec![pb::KvSetRequest {
                    stream: bytes_of(&stream),
                    key: key(k),
                    value: value(round, k),
                }],
                deletes,
            })
            .await
            .unwrap();
    }
    let last_seq = node.log.stream(&stream).unwrap().record.head_seq;
    let mut seen: BTreeMap<Vec<u8>, (Option<Vec<u8>>, u64)> = BTreeMap::new();
    let mut caught_up_at = None;
    let mut event = Some(first);
    while caught_up_at.is_none() {
        let next = match event.take() {
            Some(event) => event,
            None => tokio::time::timeout(Duration::from_secs(30), watch.message())
                .await
                .expect("the watch keeps delivering")
                .unwrap()
                .expect("the watch stays open"),
        };
        match next.event.unwrap() {
            pb::kv_watch_event::Event::Entry(entry) => {
                let key = entry.key.to_vec();
                if let Some((_, seq)) = seen.get(&key) {
                    assert!(
                        entry.seq > *seq,
                        "{:?} went from seq {seq} back to {}",
                        String::from_utf8_lossy(&key),
                        entry.seq
                    );
                }
                seen.insert(
                    key,
                    (entry.present.then(|| entry.value.to_vec()), entry.seq),
                );
            }
            pb::kv_watch_event::Event::CaughtUp(at) => caught_up_at = Some(at.seq),
        }
    }
    // The pages after the first were read after the writes: CaughtUp is at the last of them.
    assert_eq!(caught_up_at, Some(last_seq));
    let live: BTreeMap<Vec<u8>, Vec<u8>> = dict(&node, &stream)
        .await
        .into_iter()
        .map(|(key, (value, _))| (key, value))
        .collect();
    let seen_live: BTreeMap<Vec<u8>, Vec<u8>> = seen
        .into_iter()
        .filter_map(|(key, (value, _))| Some((key, value?)))
        .collect();
    assert_eq!(seen_live.len(), live.len());
    assert!(
        seen_live == live,
        "snapshot pages + changes = the final state"
    );
    node.stop().await.unwrap();
}
