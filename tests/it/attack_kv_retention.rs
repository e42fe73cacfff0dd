//! Attacks on the retention of kv keys (written by a reviewing helper): a second `prune` of a kv
//! write already pruned, restating it (another key; another replaced write, reaching two nodes
//! in opposite orders), the author's redaction of a key's kept write after a prune, an author's
//! redaction racing the owner's prune of the same write across a partition, partitioned writers
//! of one key then a prune (their invalid writes pruned), a `Watch` across a prune, writes racing
//! repeated prunes, and a SIGKILL during a prune of more kv writes than one prune job signs.

use bytes::Bytes;
use quire::node::RunningNode;
use quire::pb;
use quire::projection_api::{AuthorKey, ScribeId, StreamId};

use crate::attack_redact::{encoded, stripped};
use crate::attack_retention::{append_signed, kv_truth, kv_write, quiet_node, send_each};
use crate::common::*;
use crate::leave::{files_containing, verify_clean};
use crate::malicious::{wait_for_peer, Intruder};
use crate::redact::{count, erasure_scribe, redact_scribe};
use crate::replication::{connect, join, part, wait_for_count, CONVERGE};
use crate::retention::{keep, prune, settled_digests};

// ---------------------------------------------------------------------------------------------
// Helpers.

/// A stream created by `node`, owned by `owner` (None: the node), keeping `versions` per key.
async fn create(
    node: &RunningNode,
    name: &str,
    owner: Option<AuthorKey>,
    versions: u32,
) -> StreamId {
    crate::attack_retention::create(node, name, owner, None, Some(keep(versions))).await
}

/// `Kv.Get` of `key` on `node`.
async fn kv_get(
    node: &RunningNode,
    stream: &StreamId,
    key: &[u8],
) -> Result<pb::KvEntry, tonic::Status> {
    crate::kv::get(&mut crate::kv::kv(node).await, stream, key).await
}

/// `Kv.Set` of `key` on `node` (written by the node's key).
async fn kv_set(
    node: &RunningNode,
    stream: &StreamId,
    key: &[u8],
    value: &[u8],
) -> Result<pb::KvEntry, tonic::Status> {
    crate::kv::set(&mut crate::kv::kv(node).await, stream, key, value).await
}

/// An entry as every node should agree on it (its local `seq` left out).
fn agreed(entry: pb::KvEntry) -> pb::KvEntry {
    pb::KvEntry { seq: 0, ..entry }
}

/// `Projections.Rebuild` of the kv copy of `stream` on `node`.
async fn rebuild_kv(node: &RunningNode, stream: &StreamId) {
    pb::projections_client::ProjectionsClient::new(owner_channel(&node.url()).await)
        .rebuild(pb::RebuildRequest {
            name: "kv".into(),
            stream: bytes_of(stream),
        })
        .await
        .expect("rebuild the kv copy");
}

/// A value with a marker the disk can be searched for.
fn marked(tag: &str) -> Vec<u8> {
    format!("attack-kv-retention-{tag}-marker|").into_bytes()
}

// ---------------------------------------------------------------------------------------------
// A second prune of a pruned kv write.

/// A node that held a kv write checked its prune's `kv` against the payload (its key). Once the
/// payload is gone, a *second* prune of the same write from the owner (via a peer: a client's
/// second prune is refused as redundant) cannot be checked, and a node that never held the write
/// could not tell which of the two is true: it is stored, and prunes of one write that disagree
/// take it out of the fold (as the owner's redaction could). Was a finding: the projector counted
/// the write under the second key too, so its author held "lock", a key it never wrote, for a
/// whole lease on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_prune_of_a_pruned_kv_write_cannot_move_it_to_another_key() {
    let dir = tempfile::tempdir().unwrap();
    let node = quiet_node(dir.path()).await;
    let owner = client_key(171);
    let writer = client_key(172);
    let stream = create(&node, "kv-second-prune", Some(key_of(&owner)), 1).await;
    let mut hlc = node.log.clock().now();
    let mut next = || {
        hlc += 1;
        hlc
    };
    let w1 = kv_write(&writer, &stream, b"k", Some(b"one"), None, next());
    let w2 = kv_write(&writer, &stream, b"k", Some(b"two"), Some(&w1.id), next());
    for scribe in [&w1, &w2] {
        append_signed(&node, scribe)
            .await
            .expect("the writer's sets");
    }
    // The true prune of w1: checked against its payload, taken; nothing changes.
    let before = settled_digests(&node, &stream).await;
    let p1 = erasure_scribe(
        &owner,
        &stream,
        &w1.id,
        next(),
        "prune",
        Some(kv_truth(&w1, b"k", None)),
    );
    append_signed(&node, &p1).await.expect("the true prune");
    assert_eq!(settled_digests(&node, &stream).await, before);

    // A second prune of w1 stating another key: refused as redundant from a client...
    let mut moved = kv_truth(&w1, b"k", None);
    moved.key = Bytes::from_static(b"lock");
    let p2 = erasure_scribe(&owner, &stream, &w1.id, next(), "prune", Some(moved));
    let status = append_signed(&node, &p2).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    // ... and from a peer, where a redundant erasure is an ordinary scribe.
    let peer_key = client_key(173);
    let mut intruder = Intruder::connect(node.peer_addr.unwrap(), peer_key.clone(), true).await;
    intruder.offer(&stream).await;
    let mut seq = 0;
    send_each(&intruder, &stream, &[&p2], &mut seq).await;
    let peer = wait_for_peer(&node, &peer_key, |peer| {
        peer.refused >= 1 || peer.streams.iter().any(|s| s.received >= 1)
    })
    .await;
    assert_eq!((peer.refused, peer.streams[0].received), (0, 1), "{peer:?}");
    // The prunes disagree: w1 counts nowhere. w2 named it, so w2 is not valid either: "k" has no
    // value, as after the owner's redaction of w1.
    assert_ne!(settled_digests(&node, &stream).await, before);
    let k = kv_get(&node, &stream, b"k").await;
    assert_eq!(
        k.map_err(|status| status.code()),
        Err(tonic::Code::NotFound)
    );
    // "lock" was never written: the node may take it.
    let taken = kv_set(&node, &stream, b"lock", b"mine")
        .await
        .expect("nobody holds \"lock\"");
    assert_eq!((taken.fence, &taken.id), (1, &taken.written));
    node.stop().await.unwrap();
}

/// Two prunes of one kv write by the owner that disagree on its `replaces` (only the owner can
/// sign them; a node that never held the write's payload cannot tell which is true) reach two
/// nodes in opposite orders. Both nodes end up holding the same scribes, so by invariant 7 they
/// must show the same state. Was a finding: the kv table stored a pruned write once per (key,
/// clock, author, id) with `INSERT OR IGNORE`, so each node kept whichever prune it applied
/// first, and the folds differed. Now every prune is kept and disagreeing ones take the write out
/// of the fold, on both nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_prunes_of_one_kv_write_give_one_state_whatever_their_order() {
    let dir = tempfile::tempdir().unwrap();
    let node = quiet_node(dir.path()).await;
    let owner = client_key(174);
    let writer = client_key(175);
    let stream = create(&node, "kv-two-prunes", Some(key_of(&owner)), 1).await;
    // A second node holding the stream but, cut off, never any write of it.
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh = quiet_node(fresh_dir.path()).await;
    connect(&fresh, &node).await;
    join(&fresh, &stream).await;
    part(&fresh, &node).await;
    let mut hlc = node.log.clock().now();
    let mut next = || {
        hlc += 1;
        hlc
    };
    let w1 = kv_write(&writer, &stream, b"k", Some(b"one"), None, next());
    let w2 = kv_write(&writer, &stream, b"k", Some(b"two"), Some(&w1.id), next());
    for scribe in [&w1, &w2] {
        append_signed(&node, scribe)
            .await
            .expect("the writer's sets");
    }
    let truth = erasure_scribe(
        &owner,
        &stream,
        &w1.id,
        next(),
        "prune",
        Some(kv_truth(&w1, b"k", None)),
    );
    let bogus = erasure_scribe(
        &owner,
        &stream,
        &w1.id,
        next(),
        "prune",
        Some(kv_truth(&w1, b"k", Some(&ScribeId([7; 32])))),
    );
    // The node that held w1: the true prune first (checked), then the other one from a peer.
    append_signed(&node, &truth).await.expect("the true prune");
    let key = client_key(176);
    let mut intruder = Intruder::connect(node.peer_addr.unwrap(), key.clone(), true).await;
    intruder.offer(&stream).await;
    let mut seq = 0;
    send_each(&intruder, &stream, &[&bogus], &mut seq).await;
    let on_node = wait_for_peer(&node, &key, |peer| {
        peer.refused >= 1 || peer.streams.iter().any(|s| s.received >= 1)
    })
    .await;
    // The node that never held w1: the other prune first (as w1's justification), then the
    // true one.
    let fresh_key = client_key(177);
    let mut peer = Intruder::connect(fresh.peer_addr.unwrap(), fresh_key.clone(), true).await;
    peer.offer(&stream).await;
    let mut fresh_seq = 0;
    send_each(
        &peer,
        &stream,
        &[&stripped(&w1, encoded(&bogus)), &w2, &bogus, &truth],
        &mut fresh_seq,
    )
    .await;
    wait_for_peer(&fresh, &fresh_key, |peer| {
        peer.refused + peer.streams.iter().map(|s| s.received).sum::<u64>() >= 4
    })
    .await;
    assert!(
        on_node.refused <= 1,
        "the node took or refused the other prune: {on_node:?}"
    );
    // The two nodes meet: whatever each took, they end up holding the same scribes, and then the
    // same state. (As built, each took all four, so they hold the same scribes at once.)
    connect(&fresh, &node).await;
    wait_until(CONVERGE, "both nodes hold the same scribes", || async {
        count(&node, &stream) == count(&fresh, &stream)
    })
    .await;
    assert_eq!(
        settled_digests(&fresh, &stream).await,
        settled_digests(&node, &stream).await,
        "the same scribes, in another order, give another kv state"
    );
    let on_a = kv_get(&node, &stream, b"k").await.map(agreed);
    let on_b = kv_get(&fresh, &stream, b"k").await.map(agreed);
    assert_eq!(
        on_a.map_err(|status| status.code()),
        on_b.map_err(|status| status.code())
    );
    fresh.stop().await.unwrap();
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Redaction and pruning of one key.

/// The owner prunes a key's older writes, then the author redacts the key's kept (newest) write.
/// The key's state falls back to the newest write left, which was pruned: every node (one
/// joining later, and one whose kv copy is rebuilt, included) shows the same state: no value
/// comes back from a pruned write, and the key stays held by its author, with that write's fence
/// (a `Kv.Get` answers NOT_FOUND, a `Kv.Set` by another writer is refused as leased).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redacting_the_kept_write_after_a_prune_brings_no_pruned_value_back_on_any_node() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = quiet_node(dirs[0].path()).await;
    let b = quiet_node(dirs[1].path()).await;
    let stream = create(&a, "kv-redact-kept", None, 1).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    let writer = client_key(181);
    let mut hlc = a.log.clock().now();
    let mut next = || {
        hlc += 1;
        hlc
    };
    let w1 = kv_write(&writer, &stream, b"k", Some(&marked("v1")), None, next());
    let w2 = kv_write(
        &writer,
        &stream,
        b"k",
        Some(&marked("v2")),
        Some(&w1.id),
        next(),
    );
    let w3 = kv_write(
        &writer,
        &stream,
        b"k",
        Some(&marked("v3")),
        Some(&w2.id),
        next(),
    );
    for scribe in [&w1, &w2, &w3] {
        append_signed(&a, scribe).await.expect("the writer's sets");
    }
    let total = count(&a, &stream);
    wait_for_count(&[&b], &stream, total).await;
    let held = kv_get(&a, &stream, b"k").await.unwrap();
    assert_eq!((held.fence, &held.value[..]), (3, &marked("v3")[..]));

    let pruned = prune(&a, &stream, false).await.unwrap();
    assert_eq!(pruned.pruned_now, 2, "{pruned:?}");
    wait_for_count(&[&a, &b], &stream, total + 2).await;
    assert_eq!(
        settled_digests(&b, &stream).await,
        settled_digests(&a, &stream).await
    );
    assert_eq!(
        agreed(kv_get(&b, &stream, b"k").await.unwrap()),
        agreed(held)
    );
    let pruned_digests = settled_digests(&a, &stream).await;

    // The author takes back its newest write.
    let redaction = redact_scribe(&writer, &stream, &w3.id, next());
    append_signed(&a, &redaction)
        .await
        .expect("the author's redaction");
    wait_for_count(&[&a, &b], &stream, total + 3).await;
    let after = settled_digests(&a, &stream).await;
    assert_ne!(after[1], pruned_digests[1], "the redaction changed the key");
    assert_eq!(settled_digests(&b, &stream).await, after);
    rebuild_kv(&a, &stream).await;
    assert_eq!(settled_digests(&a, &stream).await, after);
    // A node joining now.
    let c = quiet_node(dirs[2].path()).await;
    connect(&c, &b).await;
    join(&c, &stream).await;
    wait_for_count(&[&c], &stream, total + 3).await;
    assert_eq!(settled_digests(&c, &stream).await, after);

    for (node, dir) in [(&a, &dirs[0]), (&b, &dirs[1]), (&c, &dirs[2])] {
        // No value: neither the redacted one nor a pruned one.
        let status = kv_get(node, &stream, b"k").await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        assert!(
            status
                .message()
                .contains("was pruned by the stream's retention rule"),
            "{status:?}"
        );
        wait_until(CONVERGE, "the erased values off the disk", || async {
            (1..=3).all(|v| files_containing(dir.path(), &marked(&format!("v{v}"))).is_empty())
        })
        .await;
        // Still held, by w2's author (w2 is the last valid write, counted without its value).
        let status = kv_set(node, &stream, b"k", b"taken").await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains(&key_of(&writer).to_hex()),
            "{status:?}"
        );
    }
    for node in [&a, &b, &c] {
        assert_eq!(refused_by(node).await, 0, "{}", node.url());
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    c.stop().await.unwrap();
    for dir in &dirs {
        let report = verify_clean(dir.path());
        assert!(report.contains("(2 payloads pruned)"), "{report}");
    }
}

/// Cut off from the owner's node, the author redacts a key's middle write while the owner prunes
/// it (and the one before). After the heal both nodes hold the write pruned *and* redacted, each
/// with the other erasure as its justification, and a node joining later receives one of them:
/// every node shows the same state of the key, and no erased value comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authors_redact_racing_the_owners_prune_of_one_kv_write_converges() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = quiet_node(dirs[0].path()).await;
    let b = quiet_node(dirs[1].path()).await;
    let stream = create(&a, "kv-race", None, 1).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    let writer = client_key(185);
    let mut hlc = a.log.clock().now();
    let mut next = || {
        hlc += 1;
        hlc
    };
    let w1 = kv_write(&writer, &stream, b"k", Some(&marked("r1")), None, next());
    let w2 = kv_write(
        &writer,
        &stream,
        b"k",
        Some(&marked("r2")),
        Some(&w1.id),
        next(),
    );
    let w3 = kv_write(
        &writer,
        &stream,
        b"k",
        Some(&marked("r3")),
        Some(&w2.id),
        next(),
    );
    for scribe in [&w1, &w2, &w3] {
        append_signed(&a, scribe).await.expect("the writer's sets");
    }
    let total = count(&a, &stream);
    wait_for_count(&[&b], &stream, total).await;
    part(&b, &a).await;

    // The owner prunes w1 and w2; the author, on the other side, redacts w2.
    let pruned = prune(&a, &stream, false).await.unwrap();
    assert_eq!(pruned.pruned_now, 2, "{pruned:?}");
    let redaction = redact_scribe(&writer, &stream, &w2.id, b.log.clock().now());
    append_signed(&b, &redaction)
        .await
        .expect("the author's redaction");
    assert_eq!(count(&a, &stream), total + 2);
    assert_eq!(count(&b, &stream), total + 1);

    connect(&b, &a).await;
    wait_for_count(&[&a, &b], &stream, total + 3).await;
    let on_a = settled_digests(&a, &stream).await;
    assert_eq!(settled_digests(&b, &stream).await, on_a);
    let state = |node: &RunningNode| {
        let node = node.url();
        async move {
            let mut kv = pb::kv_client::KvClient::new(owner_channel(&node).await);
            kv.get(pb::KvGetRequest {
                stream: bytes_of(&stream),
                key: Bytes::from_static(b"k"),
            })
            .await
            .map(|reply| agreed(reply.into_inner()))
            .map_err(|status| status.code())
        }
    };
    let k = state(&a).await;
    assert_eq!(state(&b).await, k);
    // Whatever the state, no erased value is in it: only w3's can be.
    if let Ok(entry) = &k {
        assert_eq!(&entry.value[..], &marked("r3")[..], "{entry:?}");
    }
    rebuild_kv(&b, &stream).await;
    assert_eq!(settled_digests(&b, &stream).await, on_a);

    // A node joining from the author's side (whose justification of w2 is the redaction).
    let c = quiet_node(dirs[2].path()).await;
    connect(&c, &b).await;
    join(&c, &stream).await;
    wait_for_count(&[&c], &stream, total + 3).await;
    assert_eq!(settled_digests(&c, &stream).await, on_a);
    assert_eq!(state(&c).await, k);
    for (node, dir) in [(&a, &dirs[0]), (&b, &dirs[1]), (&c, &dirs[2])] {
        wait_until(CONVERGE, "the erased values off the disk", || async {
            files_containing(dir.path(), &marked("r1")).is_empty()
                && files_containing(dir.path(), &marked("r2")).is_empty()
        })
        .await;
        assert_eq!(refused_by(node).await, 0, "{}", node.url());
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    c.stop().await.unwrap();
    for dir in &dirs {
        verify_clean(dir.path());
    }
}

/// Partitioned, two nodes each take the same key (leasing on: each sees only its own writes);
/// after the heal the first writer's chain is valid and the other's three writes are not, and the
/// winner writes on. The owner's prune then takes the winner's older writes *and* the loser's
/// invalid ones (they sort before the winner's newest): every node, and one joining later, keeps
/// the same state (value, holder, fence, lease), and the loser still cannot write the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_writers_of_one_key_then_a_prune_leave_the_same_state_everywhere() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = quiet_node(dirs[0].path()).await;
    let b = quiet_node(dirs[1].path()).await;
    let stream = create(&a, "kv-partition", None, 1).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    part(&b, &a).await;
    for v in 1..=2 {
        kv_set(&b, &stream, b"k", &marked(&format!("b{v}")))
            .await
            .expect("B takes k");
    }
    for v in 1..=3 {
        kv_set(&a, &stream, b"k", &marked(&format!("a{v}")))
            .await
            .expect("A takes k, not seeing B");
    }
    connect(&b, &a).await;
    let total = count(&a, &stream) + 2;
    wait_for_count(&[&a, &b], &stream, total).await;
    for v in 3..=4 {
        let written = kv_set(&b, &stream, b"k", &marked(&format!("b{v}")))
            .await
            .expect("B writes on");
        assert_eq!((written.fence, &written.id), (v, &written.written));
    }
    wait_for_count(&[&a, &b], &stream, total + 2).await;
    let before = settled_digests(&a, &stream).await;
    assert_eq!(settled_digests(&b, &stream).await, before);
    let held = agreed(kv_get(&a, &stream, b"k").await.unwrap());
    assert_eq!(
        (held.fence, &held.value[..], &held.owner[..]),
        (4, &marked("b4")[..], b.log.node_key().as_bytes().as_slice())
    );
    assert!(held.lease_until_ms > 0);

    // b1, b2, b3 (valid, superseded) and a1, a2, a3 (invalid, before b4).
    let pruned = prune(&a, &stream, false).await.unwrap();
    assert_eq!(pruned.pruned_now, 6, "{pruned:?}");
    wait_for_count(&[&a, &b], &stream, total + 8).await;
    let c = quiet_node(dirs[2].path()).await;
    connect(&c, &b).await;
    join(&c, &stream).await;
    wait_for_count(&[&c], &stream, total + 8).await;
    for (node, dir) in [(&a, &dirs[0]), (&b, &dirs[1]), (&c, &dirs[2])] {
        assert_eq!(
            settled_digests(node, &stream).await,
            before,
            "{}",
            node.url()
        );
        assert_eq!(agreed(kv_get(node, &stream, b"k").await.unwrap()), held);
        wait_until(CONVERGE, "the superseded values off the disk", || async {
            ["a1", "a2", "a3", "b1", "b2", "b3"]
                .iter()
                .all(|tag| files_containing(dir.path(), &marked(tag)).is_empty())
        })
        .await;
    }
    let status = kv_set(&a, &stream, b"k", b"a again").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    for node in [&a, &b, &c] {
        assert_eq!(refused_by(node).await, 0, "{}", node.url());
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    c.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Watch.

/// A prune changes no key's state, so a `Watch` across it neither sends a change nor ends: the
/// next event after the prune is the next write's, with the next fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_across_a_prune_sees_no_change_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let node = quiet_node(dir.path()).await;
    let stream = create(&node, "kv-watch", None, 1).await;
    for v in 1..=4 {
        kv_set(&node, &stream, b"k", format!("v{v}").as_bytes())
            .await
            .unwrap();
    }
    kv_set(&node, &stream, b"other", b"x").await.unwrap();
    let mut watch = crate::kv::kv(&node)
        .await
        .watch(pb::KvWatchRequest {
            stream: bytes_of(&stream),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut snapshot = Vec::new();
    while let pb::kv_watch_event::Event::Entry(entry) =
        watch.message().await.unwrap().unwrap().event.unwrap()
    {
        snapshot.push(entry);
    }
    assert_eq!(snapshot.len(), 2, "{snapshot:?}");
    assert_eq!((snapshot[0].fence, &snapshot[0].value[..]), (4, &b"v4"[..]));

    let pruned = prune(&node, &stream, false).await.unwrap();
    assert_eq!(pruned.pruned_now, 3, "{pruned:?}");
    settled_digests(&node, &stream).await;
    let next = kv_set(&node, &stream, b"k", b"v5").await.unwrap();
    assert_eq!(next.fence, 5);
    let event = watch.message().await.expect("the watch goes on").unwrap();
    match event.event.unwrap() {
        pb::kv_watch_event::Event::Entry(entry) => {
            assert_eq!(
                (&entry.key[..], entry.fence, &entry.value[..], entry.seq),
                (&b"k"[..], 5, &b"v5"[..], next.seq),
                "the first change after the prune is the next write's"
            );
        }
        other => panic!("{other:?}"),
    }
    node.stop().await.unwrap();
}

/// The node's own writer keeps writing four keys while the owner's node prunes them again and
/// again (each prune commit rebuilds the kv copy and swaps it in): every `Kv.Set` is judged
/// against the key's true state, so each one takes (its write is the key's state, with the next
/// fence), and at the end the copy equals one rebuilt from the log and a second node's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_racing_repeated_prunes_all_take_with_consecutive_fences() {
    const WRITES: usize = 160;
    const KEYS: usize = 4;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = quiet_node(dirs[0].path()).await;
    let b = quiet_node(dirs[1].path()).await;
    let stream = create(&a, "kv-busy", None, 1).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    let writer = {
        let url = a.url();
        tokio::spawn(async move {
            let mut kv = pb::kv_client::KvClient::new(owner_channel(&url).await);
            let mut fences = [0u64; KEYS];
            for i in 0..WRITES {
                let key = i % KEYS;
                let reply = crate::kv::set(
                    &mut kv,
                    &stream,
                    format!("k{key}").as_bytes(),
                    format!("v{i}").as_bytes(),
                )
                .await
                .unwrap_or_else(|status| panic!("write {i}: {status:?}"));
                fences[key] += 1;
                assert_eq!(
                    (reply.fence, &reply.id),
                    (fences[key], &reply.written),
                    "write {i} of k{key} did not take"
                );
            }
        })
    };
    let mut prunes = 0;
    let mut pruned = 0;
    while !writer.is_finished() {
        pruned += prune(&a, &stream, false).await.unwrap().pruned_now;
        prunes += 1;
    }
    writer.await.expect("every write took");
    pruned += prune(&a, &stream, false).await.unwrap().pruned_now;
    assert_eq!(pruned as usize, WRITES - KEYS, "after {prunes} passes");
    let settled = settled_digests(&a, &stream).await;
    rebuild_kv(&a, &stream).await;
    assert_eq!(settled_digests(&a, &stream).await, settled);
    let total = count(&a, &stream);
    wait_for_count(&[&b], &stream, total).await;
    assert_eq!(settled_digests(&b, &stream).await, settled);
    for key in 0..KEYS {
        let last = (0..WRITES).rev().find(|i| i % KEYS == key).unwrap();
        for node in [&a, &b] {
            let entry = kv_get(node, &stream, format!("k{key}").as_bytes())
                .await
                .unwrap();
            assert_eq!(
                (entry.fence, entry.value.to_vec()),
                ((WRITES / KEYS) as u64, format!("v{last}").into_bytes())
            );
        }
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Crash.

/// A node killed (SIGKILL) in the middle of a prune of more kv writes than one prune job signs
/// (4,096: one commit each), once its first job has committed, restarts with every key's state
/// as it was before the prune (the kv digest unchanged), `quire verify` clean before the restart,
/// whole jobs pruned (none half), and a second prune takes exactly what the first did not,
/// leaving the digest unchanged again and only kept values on the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_prune_of_kv_writes_leaves_every_key_as_it_was() {
    const KEYS: usize = 50;
    const VERSIONS: usize = 100;
    const JOB: usize = 4096;
    let dir = tempfile::tempdir().unwrap();
    let value = |key: usize, v: usize| marked(&format!("crash-k{key}-v{v}"));
    // The history, written by an in-process node in batches (leasing off, so every write counts
    // without naming the one it replaces); some keys deleted half way.
    let (stream, before, history_head) = {
        let node = quiet_node(dir.path()).await;
        let info = clients(&node.url())
            .await
            .streams
            .create(pb::CreateStreamRequest {
                name: "kv-crash".into(),
                policy: Some(pb::Policy {
                    leasing_disabled: true,
                    ..Default::default()
                }),
                owner: Bytes::new(),
                access: None,
                retention: Some(keep(1)),
            })
            .await
            .unwrap()
            .into_inner();
        let stream = StreamId::from_slice(&info.stream).unwrap();
        for chunk in 0..VERSIONS / 20 {
            let appends = (chunk * 20 + 1..=(chunk + 1) * 20)
                .flat_map(|v| (0..KEYS).map(move |key| (key, v)))
                .map(|(key, v)| {
                    let name = format!("k{key}");
                    let written = value(key, v);
                    let deletes = v == VERSIONS / 2 && key % 5 == 0;
                    let (kind, payload) = quire_projection_kv::encode(
                        name.as_bytes(),
                        (!deletes).then_some(&written[..]),
                        None,
                    );
                    pb::AppendRequest {
                        stream: bytes_of(&stream),
                        kind: kind.as_str().into(),
                        content_type: quire_projection_kv::CONTENT_TYPE.into(),
                        payload: Bytes::from(payload),
                        parents: vec![],
                    }
                })
                .collect();
            clients(&node.url())
                .await
                .log
                .append_batch(pb::AppendBatchRequest {
                    appends,
                    signed: vec![],
                    sealed: vec![],
                })
                .await
                .expect("kv writes");
        }
        let before = settled_digests(&node, &stream).await;
        let history_head = head(&mut clients(&node.url()).await).await;
        node.stop().await.unwrap();
        (stream, before, history_head)
    };
    let superseded = KEYS * (VERSIONS - 1);
    assert!(superseded > JOB, "more than one prune job");

    let (mut child, url, _) =
        crate::crash::spawn_serve_with(dir.path(), &["--prune-every", "0"]).await;
    let task = crate::retention::prune_in_background(&url, &stream);
    // Killed once the first job has committed: its projections' rebuild, the second job, or
    // both are under way.
    wait_until(CONVERGE, "the first prune job committed", || async {
        head(&mut clients(&url).await).await > history_head
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let answered = matches!(task.await, Ok(Ok(_)));
    verify_clean(dir.path());

    let node = quiet_node(dir.path()).await;
    let pruned_first = read_all(&mut clients(&node.url()).await)
        .await
        .iter()
        .filter(|entry| entry.kind == "prune")
        .count();
    assert!(
        pruned_first == JOB || pruned_first == superseded,
        "whole jobs: {pruned_first}"
    );
    if answered {
        assert_eq!(pruned_first, superseded, "an answered prune holds");
    }
    assert_eq!(
        settled_digests(&node, &stream).await,
        before,
        "{pruned_first} of {superseded} pruned before the kill"
    );
    let rest = prune(&node, &stream, false).await.unwrap();
    assert_eq!(rest.pruned_now as usize + pruned_first, superseded);
    assert_eq!(settled_digests(&node, &stream).await, before);
    for key in 0..KEYS {
        let entry = kv_get(&node, &stream, format!("k{key}").as_bytes())
            .await
            .unwrap();
        assert_eq!(
            (entry.fence, entry.value.to_vec()),
            (VERSIONS as u64, value(key, VERSIONS))
        );
    }
    let sample = [0, 7, KEYS - 1];
    wait_until(CONVERGE, "superseded values off the disk", || async {
        sample.iter().all(|&key| {
            [1, VERSIONS / 2 - 1, VERSIONS - 1]
                .iter()
                .all(|&v| files_containing(dir.path(), &value(key, v)).is_empty())
        })
    })
    .await;
    for key in sample {
        assert!(!files_containing(dir.path(), &value(key, VERSIONS)).is_empty());
    }
    // Nothing more to prune; every superseded write counted as pruned. (`quire verify` ran right
    // after the kill; once more here would double the test's time in a debug build.)
    let after = prune(&node, &stream, true).await.unwrap();
    assert_eq!(
        (after.reclaimable_payloads, after.pruned_payloads),
        (0, superseded as u64),
        "{after:?}"
    );
    node.stop().await.unwrap();
}
