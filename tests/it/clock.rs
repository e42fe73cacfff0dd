//! Clocks from the future: a scribe dated more than 60 s ahead of a node's clock is held (not
//! refused, not lost, not in the log) until the node's (injected) clock catches up, then judged
//! like any scribe; on a peer it does not count as misbehaviour.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use quire::log::held::MAX_AHEAD_MS;
use quire::node::RunningNode;
use quire::pb;
use quire::projection_api::StreamId;
use quire_projection_kv::{KvSet, CONTENT_TYPE};

use crate::common::*;
use crate::kv::{get, kv, node_at, set};
use crate::replication::{connect, join, CONVERGE};

const YEAR_MS: u64 = 365 * 24 * 3600 * 1000;

/// A `kv.set` of `key` signed by client `seed`, dated `at_ms`, replacing no write.
fn kv_set_at(
    seed: u8,
    stream: &StreamId,
    key: &[u8],
    value: &[u8],
    at_ms: u64,
) -> pb::AppendSignedRequest {
    kv_set_replacing(seed, stream, key, value, at_ms, &[])
}

/// A `kv.set` of `key` signed by client `seed`, dated `at_ms`, naming `replaces` as the write it
/// replaces.
fn kv_set_replacing(
    seed: u8,
    stream: &StreamId,
    key: &[u8],
    value: &[u8],
    at_ms: u64,
    replaces: &[u8],
) -> pb::AppendSignedRequest {
    let payload = KvSet {
        key: key.to_vec(),
        value: value.to_vec(),
        replaces: replaces.to_vec(),
    }
    .encode_to_vec();
    let mut scribe = client_scribe(&client_key(seed), stream, "kv.set", &payload, at_ms << 16);
    // The kv content type, re-signed.
    scribe.body.content_type = CONTENT_TYPE.into();
    let scribe = quire::scribe::Scribe::sign(scribe.body, &client_key(seed));
    signed_request(scribe.parts())
}

fn in_log(node: &RunningNode, id: &[u8]) -> bool {
    node.log
        .store()
        .seq_of(&quire::projection_api::ScribeId::from_slice(id).unwrap())
        .unwrap()
        .is_some()
}

async fn held(node: &RunningNode) -> (u64, u64) {
    let status = node_status(node).await;
    (status.held_scribes, status.held_bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_set_dated_a_year_ahead_waits_and_then_is_judged_like_any_write() {
    let now = quire::hlc::system_wall_clock()();
    let (clock_a, clock_b) = (Arc::new(AtomicU64::new(now)), Arc::new(AtomicU64::new(now)));
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node_at(dir_a.path(), &clock_a).await;
    let b = node_at(dir_b.path(), &clock_b).await;
    let stream = create_stream(&mut clients(&a.url()).await, "clocks", None).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    let mut kv_a = kv(&a).await;
    let holder = set(&mut kv_a, &stream, b"lock", b"held by a")
        .await
        .unwrap();

    // A client with a clock a year fast takes the lock through A: held, not refused.
    let future = kv_set_replacing(
        40,
        &stream,
        b"lock",
        b"next year",
        now + YEAR_MS,
        &holder.id,
    );
    let reply = clients(&a.url())
        .await
        .log
        .append_signed(future.clone())
        .await
        .expect("held, not refused")
        .into_inner();
    assert!(reply.held, "{reply:?}");
    assert_eq!(reply.seq, 0);
    assert!(!in_log(&a, &reply.id));
    assert_eq!(held(&a).await.0, 1);
    // Sent again: still one held.
    let again = clients(&a.url())
        .await
        .log
        .append_signed(future)
        .await
        .unwrap()
        .into_inner();
    assert!(again.held);
    assert_eq!(held(&a).await.0, 1);

    // The holder keeps the key everywhere, and the held scribe survives a restart.
    let lock_a = get(&mut kv_a, &stream, b"lock").await.unwrap();
    assert_eq!(
        (lock_a.value.as_ref(), lock_a.fence),
        (&b"held by a"[..], holder.fence)
    );
    a.stop().await.unwrap();
    let a = node_at(dir_a.path(), &clock_a).await;
    connect(&b, &a).await;
    assert_eq!(held(&a).await.0, 1, "held across a restart");
    let mut kv_a = kv(&a).await;
    wait_until(CONVERGE, "B to hold the holder's value", || async {
        let mut kv_b = kv(&b).await;
        get(&mut kv_b, &stream, b"lock")
            .await
            .is_ok_and(|entry| entry.value == Bytes::from_static(b"held by a"))
    })
    .await;
    assert!(!in_log(&b, &reply.id), "a held scribe is not replicated");

    // A's clock reaches it: it enters the log and, the holder's hour long gone, takes the key.
    clock_a.store(now + YEAR_MS, Ordering::SeqCst);
    wait_until(CONVERGE, "the held scribe to enter A's log", || async {
        in_log(&a, &reply.id)
    })
    .await;
    assert_eq!(held(&a).await, (0, 0));
    wait_until(CONVERGE, "A's kv table to judge it", || {
        let mut kv_a = kv_a.clone();
        async move {
            get(&mut kv_a, &stream, b"lock")
                .await
                .is_ok_and(|entry| entry.value == Bytes::from_static(b"next year"))
        }
    })
    .await;

    // B's clock is still a year behind: it holds the scribe A sends (not refused, no ban) ...
    wait_until(CONVERGE, "B to hold what A sent", || async {
        held(&b).await.0 == 1
    })
    .await;
    let peers = node_status(&b).await.peers;
    let counters: Vec<_> = peers.iter().flat_map(|peer| peer.streams.clone()).collect();
    assert_eq!(counters.iter().map(|c| c.refused).sum::<u64>(), 0);
    assert_eq!(counters.iter().map(|c| c.held).sum::<u64>(), 1);
    let mut kv_b = kv(&b).await;
    let lock_b = get(&mut kv_b, &stream, b"lock").await.unwrap();
    assert_eq!(lock_b.value, Bytes::from_static(b"held by a"));

    // ... and once its clock catches up, both agree.
    clock_b.store(now + YEAR_MS, Ordering::SeqCst);
    wait_until(CONVERGE, "B to judge it too", || {
        let mut kv_b = kv_b.clone();
        async move {
            get(&mut kv_b, &stream, b"lock")
                .await
                .is_ok_and(|entry| entry.value == Bytes::from_static(b"next year"))
        }
    })
    .await;
    assert_eq!(held(&b).await, (0, 0));
    let (lock_a, lock_b) = (
        get(&mut kv_a, &stream, b"lock").await.unwrap(),
        get(&mut kv_b, &stream, b"lock").await.unwrap(),
    );
    assert_eq!((lock_a.fence, &lock_a.id), (lock_b.fence, &lock_b.id));
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_a_scribe_from_the_future_is_refused_whole_and_within_the_limit_nothing_waits()
{
    let now = quire::hlc::system_wall_clock()();
    let clock = Arc::new(AtomicU64::new(now));
    let dir = tempfile::tempdir().unwrap();
    let node = node_at(dir.path(), &clock).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "batch", None).await;
    let head = node.log.head();
    let fine = kv_set_at(41, &stream, b"k", b"now", now);
    let ahead = kv_set_at(41, &stream, b"k", b"later", now + MAX_AHEAD_MS + 5_000);
    let status = clients
        .log
        .append_batch(pb::AppendBatchRequest {
            appends: vec![],
            signed: vec![fine.clone(), ahead],
            sealed: vec![],
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("append it alone"), "{status:?}");
    assert_eq!(node.log.head(), head, "nothing of the batch was stored");
    assert_eq!(held(&node).await, (0, 0));

    // Dated within the limit ahead: stored at once.
    let close = kv_set_at(41, &stream, b"k", b"soon", now + MAX_AHEAD_MS - 1_000);
    let reply = clients.log.append_signed(close).await.unwrap().into_inner();
    assert!(!reply.held && reply.seq > head, "{reply:?}");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_held_set_is_bounded() {
    let now = quire::hlc::system_wall_clock()();
    let clock = Arc::new(AtomicU64::new(now));
    let dir = tempfile::tempdir().unwrap();
    let node = node_at(dir.path(), &clock).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "bounded", None).await;
    let head = node.log.head();
    // This node's clients together may hold half of the held set (a peer's share stays free).
    let limit = quire::log::held::share_limit(&None).0;
    for n in 0..limit {
        let request = kv_set_at(
            42,
            &stream,
            format!("k{n}").as_bytes(),
            b"v",
            now + YEAR_MS + n,
        );
        assert!(
            clients
                .log
                .append_signed(request)
                .await
                .unwrap()
                .into_inner()
                .held
        );
    }
    let over = kv_set_at(42, &stream, b"one more", b"v", now + YEAR_MS);
    let status = clients.log.append_signed(over).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("fix the writer's clock"),
        "{status:?}"
    );
    assert_eq!(held(&node).await.0, limit);
    assert_eq!(node.log.head(), head);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_kv_write_dated_in_the_past_cannot_take_a_held_key() {
    let now = quire::hlc::system_wall_clock()();
    let clock = Arc::new(AtomicU64::new(now));
    let dir = tempfile::tempdir().unwrap();
    let node = node_at(dir.path(), &clock).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "backdated", None).await;
    let mut kv = kv(&node).await;
    let holder = set(&mut kv, &stream, b"lock", b"held").await.unwrap();
    let head = node.log.head();

    // Dated two minutes back: refused, nothing stored.
    let old = kv_set_at(
        43,
        &stream,
        b"lock",
        b"mine, long ago",
        now - 2 * MAX_AHEAD_MS,
    );
    let status = clients.log.append_signed(old).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("sign it with a current clock"),
        "{status:?}"
    );
    assert_eq!(node.log.head(), head);

    // Dated 30 s back (within a minute of clock error), naming the holder's write it saw: stored,
    // but it sorts before the write it names, so it is invalid and the holder keeps the key.
    let early = kv_set_replacing(
        43,
        &stream,
        b"lock",
        b"mine, a bit ago",
        now - 30_000,
        &holder.id,
    );
    let reply = clients.log.append_signed(early).await.unwrap().into_inner();
    assert!(reply.seq > head);
    wait_until(CONVERGE, "the table to apply it", || {
        let mut kv = kv.clone();
        async move {
            get(&mut kv, &stream, b"lock")
                .await
                .is_ok_and(|entry| entry.seq >= reply.seq)
        }
    })
    .await;
    let lock = get(&mut kv, &stream, b"lock").await.unwrap();
    assert_eq!(lock.value, Bytes::from_static(b"held"));
    assert_eq!((lock.fence, &lock.id), (holder.fence, &holder.id));
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_holders_get_different_tokens_and_one_keeps_the_key_after_healing() {
    let now = quire::hlc::system_wall_clock()();
    let (clock_a, clock_b) = (Arc::new(AtomicU64::new(now)), Arc::new(AtomicU64::new(now)));
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node_at(dir_a.path(), &clock_a).await;
    let b = node_at(dir_b.path(), &clock_b).await;
    let stream = create_stream(&mut clients(&a.url()).await, "partition", None).await;
    let lease_ms = a.log.stream(&stream).unwrap().policy.lease_ms;
    let mut kv_a = kv(&a).await;
    let first = set(&mut kv_a, &stream, b"lock", b"a").await.unwrap();
    // B holds the stream and A's write, but the two are partitioned (no link).
    crate::kv::hand_over_genesis(&a, &b, &stream).await;
    let written = clients(&a.url())
        .await
        .log
        .get(pb::GetScribeRequest {
            id: first.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    clients(&b.url())
        .await
        .log
        .append_signed(signed_request(entry_parts(&written)))
        .await
        .unwrap();

    // A renews; on B the lease has run out, and B takes the key. Each believes it holds it.
    clock_a.store(now + lease_ms / 2, Ordering::SeqCst);
    let renewed = set(&mut kv_a, &stream, b"lock", b"a again").await.unwrap();
    clock_b.store(now + lease_ms + 1_000, Ordering::SeqCst);
    let mut kv_b = kv(&b).await;
    let taken = set(&mut kv_b, &stream, b"lock", b"b").await.unwrap();
    assert_eq!(
        renewed.owner,
        Bytes::copy_from_slice(a.log.node_key().as_bytes())
    );
    assert_eq!(
        taken.owner,
        Bytes::copy_from_slice(b.log.node_key().as_bytes())
    );
    assert_eq!(
        renewed.fence, taken.fence,
        "each side counted the same valid writes"
    );
    assert_ne!(renewed.id, taken.id, "but the tokens (fence, id) differ");

    // Healed: one write is valid everywhere. A renewed before B took the key (by the writers'
    // clocks), so A holds it; B's write named a replaced state.
    clock_a.store(now + lease_ms + 1_000, Ordering::SeqCst);
    connect(&b, &a).await;
    let table = crate::kv::converged(&[&a, &b], &stream).await;
    assert_eq!(
        table[&b"lock".to_vec()],
        (b"a again".to_vec(), renewed.fence)
    );
    let lock_b = get(&mut kv_b, &stream, b"lock").await.unwrap();
    assert_eq!(lock_b.id, renewed.id);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scribe_whose_parent_is_held_waits_with_it_whatever_its_own_clock() {
    let now = quire::hlc::system_wall_clock()();
    let clock = Arc::new(AtomicU64::new(now));
    let dir = tempfile::tempdir().unwrap();
    let node = node_at(dir.path(), &clock).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "parents", None).await;
    let key = client_key(44);
    let parent = client_scribe(&key, &stream, "x.note", b"parent", (now + YEAR_MS) << 16);
    // The child is dated now (a client may sign any clock): only its parent is ahead.
    let mut child = client_scribe(&key, &stream, "x.note", b"child", now << 16);
    child.body.parents = vec![parent.id];
    let child = quire::scribe::Scribe::sign(child.body, &key);
    for scribe in [&parent, &child] {
        let reply = clients
            .log
            .append_signed(signed_request(scribe.parts()))
            .await
            .expect("held, not refused")
            .into_inner();
        assert!(reply.held, "{reply:?}");
    }
    assert_eq!(held(&node).await.0, 2);
    clock.store(now + YEAR_MS, Ordering::SeqCst);
    wait_until(CONVERGE, "both to enter the log", || async {
        in_log(&node, parent.id.as_bytes()) && in_log(&node, child.id.as_bytes())
    })
    .await;
    let seq = |id: &quire::projection_api::ScribeId| node.log.store().seq_of(id).unwrap().unwrap();
    assert!(seq(&parent.id) < seq(&child.id));
    assert_eq!(held(&node).await, (0, 0));
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_past_its_share_is_turned_away_for_now_not_refused_and_nothing_is_lost() {
    let now = quire::hlc::system_wall_clock()();
    let (clock_v, clock_b) = (
        Arc::new(AtomicU64::new(now)),
        Arc::new(AtomicU64::new(now + YEAR_MS)),
    );
    let (dir_v, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let v = node_at(dir_v.path(), &clock_v).await;
    let b = node_at(dir_b.path(), &clock_b).await;
    let stream = create_stream(&mut clients(&v.url()).await, "share", None).await;
    connect(&b, &v).await;
    join(&b, &stream).await;
    // B's clock is a year fast: its notes wait on V, and 5 × 4 MiB is past a peer's 16 MiB share.
    let share_bytes = quire::log::held::share_limit(&Some(b.log.node_key())).1;
    let note = vec![b'n'; 4 << 20];
    let mut clients_b = clients(&b.url()).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let reply = clients_b
            .log
            .append(pb::AppendRequest {
                stream: bytes_of(&stream),
                kind: "x.note".into(),
                content_type: "text/plain".into(),
                payload: Bytes::from(note.clone()),
                parents: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(reply.id);
    }
    let b_hex = b.log.node_key().to_hex();
    let peer_of_b = || async {
        node_status(&v)
            .await
            .peers
            .into_iter()
            .find(|peer| peer.node_id == b_hex)
    };
    wait_until(CONVERGE, "V to turn B away for now", || async {
        peer_of_b()
            .await
            .is_some_and(|peer| peer.last_error.contains("scribes aside as it may"))
    })
    .await;
    let (count, bytes) = held(&v).await;
    assert!(
        bytes <= share_bytes && count == 3,
        "held {count} ({bytes} bytes)"
    );
    let peer = peer_of_b().await.unwrap();
    assert_eq!(peer.refused, 0, "{peer:?}");
    assert!(peer.streams.iter().all(|s| s.refused == 0), "{peer:?}");
    assert!(!ids.iter().any(|id| in_log(&v, id)));

    // V's clock catches up: every note arrives, each once, and nothing stays held.
    clock_v.store(now + YEAR_MS, Ordering::SeqCst);
    wait_until(CONVERGE, "every note of B on V", || async {
        ids.iter().all(|id| in_log(&v, id))
    })
    .await;
    wait_until(CONVERGE, "V's held set to empty", || async {
        held(&v).await == (0, 0)
    })
    .await;
    assert_eq!(v.log.stream(&stream).unwrap().record.scribes, 6);
    v.stop().await.unwrap();
    b.stop().await.unwrap();
}
