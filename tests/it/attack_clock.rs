//! Attacks on issue 16 (epochs, held scribes, kv replaces): written by a reviewing helper.
//!
//! Tests marked `#[ignore = "finding: ..."]` fail today and pin a bug; the others pin behaviour
//! found correct under attack.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use quire::log::held::{MAX_AHEAD_MS, MAX_HELD_BYTES};
use quire::node::RunningNode;
use quire::pb;
use quire::pb::peer_message::Message as Wire;
use quire::projection_api::{AuthorKey, Kind, ScribeId, StreamId};
use quire::replication::session::{Message, WireScribe, PROTOCOL_VERSION};
use quire::scribe::{Body, Scribe};
use quire_projection_kv::{KvSet, CONTENT_TYPE};

use crate::common::*;
use crate::kv::{get, kv, node_at, set};
use crate::malicious::Intruder;
use crate::replication::{connect, join, CONVERGE};

const YEAR_MS: u64 = 365 * 24 * 3600 * 1000;
/// Long enough for anything the node does on its own (the release loop runs every 500 ms).
const SETTLE: Duration = Duration::from_secs(30);

/// A scribe of `stream` by client `seed` with every field chosen.
fn scribe_with(
    seed: u8,
    stream: &StreamId,
    kind: &str,
    payload: &[u8],
    hlc: u64,
    parents: Vec<ScribeId>,
    nonce: u64,
) -> Scribe {
    let key = client_key(seed);
    Scribe::sign(
        Body {
            stream: Some(*stream),
            author: AuthorKey(key.verifying_key().to_bytes()),
            hlc,
            kind: kind.parse::<Kind>().unwrap(),
            content_type: "text/plain".into(),
            payload: Bytes::copy_from_slice(payload),
            parents,
            membership: None,
            nonce,
        },
        &key,
    )
}

fn in_log(node: &RunningNode, id: &ScribeId) -> bool {
    node.log.store().seq_of(id).unwrap().is_some()
}

/// `node`'s view of peer `peer` (by node id), if it has one.
async fn peer_status(node: &RunningNode, peer: &AuthorKey) -> Option<pb::PeerStatus> {
    let hex = peer.to_hex();
    node_status(node)
        .await
        .peers
        .into_iter()
        .find(|status| status.node_id == hex)
}

fn stream_counters(peer: &pb::PeerStatus, stream: &StreamId) -> pb::PeerStreamStatus {
    peer.streams
        .iter()
        .find(|counters| counters.stream == bytes_of(stream))
        .cloned()
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Held scribes
// ---------------------------------------------------------------------------------------------

/// Fills the clients' share of `node`'s held set (by bytes) with client scribes of a stream of its
/// own, dated a year ahead, until it refuses even a 64 KiB one.
async fn fill_held_bytes(node: &RunningNode, now: u64) {
    let mut clients = clients(&node.url()).await;
    let filler = create_stream(&mut clients, "filler", None).await;
    let mut n = 0u64;
    // Big scribes until the clients' share refuses one, then small ones until it refuses again.
    for size in [10 * 1024 * 1024 - 4096, 64 * 1024] {
        loop {
            n += 1;
            let scribe = scribe_with(
                50,
                &filler,
                "x.note",
                &vec![b'f'; size],
                (now + YEAR_MS + n) << 16,
                vec![],
                0,
            );
            match clients
                .log
                .append_signed(signed_request(scribe.parts()))
                .await
            {
                Ok(reply) => assert!(reply.into_inner().held),
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                    assert!(
                        status.message().contains("from this node's clients"),
                        "{status:?}"
                    );
                    break;
                }
            }
        }
    }
    assert!(node_status(node).await.held_bytes > MAX_HELD_BYTES / 2 - 64 * 1024);
}

/// An honest peer whose clock is a few minutes fast sends scribes while the node's clients have
/// filled their share of the held set (anyone may append what they sign). The issue asks that a scribe dated ahead be
/// "held, not refused and not lost, and not counted past by any cursor". Today `Overlay::hold`
/// answers `HeldFull`, the replicated batch counts it as refused, the cursor moves past it in the
/// same write, and once the node's clock catches up nothing ever asks for it again; past 64 of
/// them the honest peer is banned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_held_set_neither_loses_nor_bans_an_honest_peers_future_scribes() {
    let now = now_ms();
    let ahead = 5 * 60 * 1000;
    let (clock_v, clock_b) = (
        Arc::new(AtomicU64::new(now)),
        Arc::new(AtomicU64::new(now + ahead)),
    );
    let (dir_v, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let v = node_at(dir_v.path(), &clock_v).await;
    let b = node_at(dir_b.path(), &clock_b).await;
    let stream = create_stream(&mut clients(&v.url()).await, "honest", None).await;
    connect(&b, &v).await;
    join(&b, &stream).await;

    // Anyone fills V's held set, here a client of V with a clock a year fast.
    fill_held_bytes(&v, now).await;

    // B's clock is five minutes fast: everything it signs is dated ahead of V's clock.
    let notes = 70u64;
    let payload = vec![b'n'; 8 * 1024];
    let mut ids = Vec::new();
    let mut clients_b = clients(&b.url()).await;
    for _ in 0..notes {
        let reply = clients_b
            .log
            .append(pb::AppendRequest {
                stream: bytes_of(&stream),
                kind: "x.note".into(),
                content_type: "text/plain".into(),
                payload: Bytes::from(payload.clone()),
                parents: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(ScribeId::from_slice(&reply.id).unwrap());
    }
    let b_key = b.log.node_key();
    // The clients' share is full, the peer's is not: V holds them (not refused, no ban).
    wait_until(CONVERGE, "V to hold B's notes", || async {
        peer_status(&v, &b_key)
            .await
            .is_some_and(|peer| stream_counters(&peer, &stream).held >= notes)
    })
    .await;
    let peer = peer_status(&v, &b_key).await.unwrap();
    let counters = stream_counters(&peer, &stream);
    assert_eq!(
        (counters.refused, peer.refused),
        (0, 0),
        "an honest peer's scribes dated ahead were refused: {peer:?}"
    );
    assert!(!ids.iter().any(|id| in_log(&v, id)));

    // V's clock catches up with B's: every note of B reaches V.
    clock_v.store(now + ahead + 1_000, Ordering::SeqCst);
    wait_until(SETTLE, "every note of B to reach V", || async {
        ids.iter().all(|id| in_log(&v, id))
    })
    .await;
    v.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Two scribes dated ahead, the second naming the first as its parent, dated in the same
/// millisecond (as a fast writer's HLC does: same ms, next logical counter). Both are held with
/// the same `ready_ms`, and `release_due` takes them in key order, (ready_ms, id): when the
/// child's id sorts first it is judged before its parent is in the log, refused for an unknown
/// parent and dropped, though the client was told it was held. A node whose clock was not behind
/// stores both: the nodes disagree about the child for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_held_child_is_not_released_before_its_held_parent() {
    let now = now_ms();
    let clock = Arc::new(AtomicU64::new(now));
    let dir = tempfile::tempdir().unwrap();
    let node = node_at(dir.path(), &clock).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "family", None).await;
    let at = now + YEAR_MS;
    let parent = scribe_with(60, &stream, "x.note", b"parent", at << 16, vec![], 0);
    // The child, one logical tick later in the same ms; its nonce chosen so its id sorts first.
    let child = (0..)
        .map(|nonce| {
            scribe_with(
                60,
                &stream,
                "x.note",
                b"child",
                (at << 16) | 1,
                vec![parent.id],
                nonce,
            )
        })
        .find(|child| child.id < parent.id)
        .unwrap();
    for scribe in [&parent, &child] {
        let reply = clients
            .log
            .append_signed(signed_request(scribe.parts()))
            .await
            .expect("held, not refused")
            .into_inner();
        assert!(reply.held, "{reply:?}");
    }
    assert_eq!(node.log.held().0, 2);

    clock.store(at, Ordering::SeqCst);
    wait_until(SETTLE, "the parent to enter the log", || async {
        in_log(&node, &parent.id)
    })
    .await;
    wait_until(SETTLE, "the held set to empty", || async {
        node.log.held().0 == 0
    })
    .await;
    assert!(
        in_log(&node, &child.id),
        "the child, told it was held, was refused when released before its parent"
    );
    node.stop().await.unwrap();
}

/// The boundary: dated exactly `MAX_AHEAD_MS` ahead (any logical counter) is stored at once;
/// one ms more is held, and released (not refused) once the clock moves by that ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scribe_dated_exactly_at_the_limit_is_stored_and_one_ms_more_is_held() {
    let now = now_ms();
    let clock = Arc::new(AtomicU64::new(now));
    let dir = tempfile::tempdir().unwrap();
    let node = node_at(dir.path(), &clock).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "edge", None).await;

    let at_limit = scribe_with(
        61,
        &stream,
        "x.note",
        b"at the limit",
        ((now + MAX_AHEAD_MS) << 16) | 0xffff,
        vec![],
        0,
    );
    let reply = clients
        .log
        .append_signed(signed_request(at_limit.parts()))
        .await
        .unwrap()
        .into_inner();
    assert!(!reply.held && reply.seq > 0, "{reply:?}");

    let over = scribe_with(
        61,
        &stream,
        "x.note",
        b"one ms over",
        (now + MAX_AHEAD_MS + 1) << 16,
        vec![],
        0,
    );
    let reply = clients
        .log
        .append_signed(signed_request(over.parts()))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.held && reply.seq == 0, "{reply:?}");
    assert!(!in_log(&node, &over.id));

    clock.store(now + 1, Ordering::SeqCst);
    wait_until(SETTLE, "the held scribe to enter the log", || async {
        in_log(&node, &over.id)
    })
    .await;
    assert_eq!(node.log.held(), (0, 0));
    node.stop().await.unwrap();
}

/// A held scribe sent again once its time has come (before or after the release loop reaches
/// it) is stored once and the held set empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_scribe_sent_again_when_due_is_stored_once() {
    let now = now_ms();
    let clock = Arc::new(AtomicU64::new(now));
    let dir = tempfile::tempdir().unwrap();
    let node = node_at(dir.path(), &clock).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "twice", None).await;
    let scribe = scribe_with(
        62,
        &stream,
        "x.note",
        b"later",
        (now + 2 * MAX_AHEAD_MS) << 16,
        vec![],
        0,
    );
    let first = clients
        .log
        .append_signed(signed_request(scribe.parts()))
        .await
        .unwrap()
        .into_inner();
    assert!(first.held);
    clock.store(now + 2 * MAX_AHEAD_MS, Ordering::SeqCst);
    let again = clients
        .log
        .append_signed(signed_request(scribe.parts()))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.held && again.seq > 0, "{again:?}");
    wait_until(SETTLE, "the held set to empty", || async {
        node.log.held() == (0, 0)
    })
    .await;
    let stored: Vec<_> = read_all(&mut clients)
        .await
        .into_iter()
        .filter(|entry| entry.id == bytes_of(&scribe.id))
        .collect();
    assert_eq!(stored.len(), 1, "stored once");
    assert_eq!(stored[0].seq, again.seq);
    node.stop().await.unwrap();
}

/// A stream whose genesis is dated ahead of a joining node's clock (its creator's clock is fast):
/// the genesis is held (the API says so for a signed append), the stream is not listed, and once
/// the node's clock catches up the stream appears and replicates without any reconnection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_genesis_is_dated_ahead_appears_and_replicates_when_the_clock_allows() {
    let now = now_ms();
    let ahead = 5 * 60 * 1000;
    let (clock_v, clock_b) = (
        Arc::new(AtomicU64::new(now)),
        Arc::new(AtomicU64::new(now + ahead)),
    );
    let (dir_v, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let v = node_at(dir_v.path(), &clock_v).await;
    let b = node_at(dir_b.path(), &clock_b).await;
    let mut clients_b = clients(&b.url()).await;
    let stream = create_stream(&mut clients_b, "fast", None).await;
    let note = append_note(&mut clients_b, &stream, "from the future").await;

    // The genesis handed over as a signed append: held, no seq, no stream yet.
    let genesis = clients_b
        .log
        .get(pb::GetScribeRequest {
            id: bytes_of(&stream),
        })
        .await
        .unwrap()
        .into_inner();
    let reply = clients(&v.url())
        .await
        .log
        .append_signed(pb::AppendSignedRequest {
            id: genesis.id.clone(),
            ..signed_request(entry_parts(&genesis))
        })
        .await
        .expect("a held genesis is not refused")
        .into_inner();
    assert!(reply.held && reply.seq == 0, "{reply:?}");
    assert_eq!(reply.id, bytes_of(&stream));
    assert!(v.log.stream(&stream).is_none(), "not a stream yet");
    let missing = clients(&v.url())
        .await
        .log
        .append(pb::AppendRequest {
            stream: bytes_of(&stream),
            kind: "x.note".into(),
            content_type: "text/plain".into(),
            payload: Bytes::from_static(b"too soon"),
            parents: vec![],
        })
        .await
        .expect_err("no appends to a stream not held yet");
    assert_ne!(missing.code(), tonic::Code::Internal, "{missing:?}");

    // Linked, V asks for nothing of the stream yet; once its clock catches up, it has it all.
    connect(&v, &b).await;
    clock_v.store(now + ahead + 1_000, Ordering::SeqCst);
    wait_until(SETTLE, "the stream and B's note on V", || async {
        v.log
            .stream(&stream)
            .is_some_and(|state| state.record.scribes == 2)
    })
    .await;
    assert!(in_log(&v, &ScribeId::from_slice(&note.id).unwrap()));
    assert_eq!(v.log.held(), (0, 0));
    v.stop().await.unwrap();
    b.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Epochs: a hostile peer's Hello
// ---------------------------------------------------------------------------------------------

/// Connects as `key` with a hand-made Hello (current epoch and ended epochs), proving the key.
async fn hello_as(
    node: &RunningNode,
    key: &ed25519_dalek::SigningKey,
    current: [u8; 16],
    ended: &[([u8; 16], u64)],
) -> Intruder {
    let mut intruder = Intruder::dial(node.peer_addr.unwrap(), key.clone()).await;
    let hello = pb::PeerHello {
        node_id: Bytes::copy_from_slice(&key.verifying_key().to_bytes()),
        epoch: Bytes::copy_from_slice(&current),
        nonce: Bytes::copy_from_slice(&[7u8; 32]),
        protocol: PROTOCOL_VERSION,
        ended_epochs: ended
            .iter()
            .map(|(epoch, ended_at)| pb::PeerEpoch {
                epoch: Bytes::copy_from_slice(epoch),
                ended_at: *ended_at,
            })
            .collect(),
        ..Default::default()
    };
    intruder.send(Wire::Hello(hello)).await;
    intruder.prove(true).await;
    intruder
}

/// Says the intruder holds `stream`; the `after_seq` of the node's Want for it.
async fn want_after(intruder: &mut Intruder, stream: &StreamId) -> u64 {
    intruder
        .send(Wire::Streams(pb::PeerStreams {
            streams: vec![bytes_of(stream)],
        }))
        .await;
    loop {
        match intruder.next().await {
            Some(Wire::Want(want)) if want.stream == bytes_of(stream) => return want.after_seq,
            Some(Wire::Error(error)) => panic!("the node closed: {error:?}"),
            Some(_) => continue,
            None => panic!("the node closed the connection"),
        }
    }
}

/// Asks the node for all of `stream`; the ids it sends before `CaughtUp`.
async fn read_from(intruder: &mut Intruder, stream: &StreamId) -> Vec<Bytes> {
    intruder
        .send(Wire::Want(pb::PeerWant {
            stream: bytes_of(stream),
            after_seq: 0,
            ..Default::default()
        }))
        .await;
    let mut ids = Vec::new();
    loop {
        match intruder.next().await {
            Some(Wire::Batch(batch)) if batch.stream == bytes_of(stream) => {
                ids.extend(batch.scribes.into_iter().map(|scribe| scribe.id));
            }
            Some(Wire::CaughtUp(caught)) if caught.stream == bytes_of(stream) => return ids,
            Some(Wire::Error(error)) => panic!("the node closed: {error:?}"),
            Some(_) => continue,
            None => panic!("the node closed the connection"),
        }
    }
}

async fn hang_up(node: &RunningNode, intruder: Intruder, peer: &AuthorKey) {
    drop(intruder);
    wait_until(CONVERGE, "the node to see the peer gone", || async {
        peer_status(node, peer)
            .await
            .is_none_or(|status| !status.connected)
    })
    .await;
}

/// A claimed history (current epoch, ended epochs), the `after_seq` the node then asks from, and
/// whether it sends the peer's own scribes back.
type Round = ([u8; 16], Vec<([u8; 16], u64)>, u64, bool);

/// A peer's Hello can claim any history of its own epochs: an ended epoch with `u64::MAX`, the
/// current epoch also listed as ended, the same epoch twice. It only ever makes the node re-read
/// more from that peer or send it more of its own scribes back, never skip anything, and never
/// touches what the node holds from anyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_epoch_history_never_makes_the_node_skip_and_only_costs_the_liar() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "epochs", None).await;
    append_note(&mut clients, &stream, "the node's own").await;
    let key = client_key(70);
    let peer = AuthorKey(key.verifying_key().to_bytes());
    let e1 = [1u8; 16];

    // Round 1: the peer (epoch E1) hands over 10 scribes at its seqs 1..=10.
    let mut intruder = hello_as(&node, &key, e1, &[]).await;
    assert_eq!(want_after(&mut intruder, &stream).await, 0);
    let hlc = node.log.clock().now();
    let scribes: Vec<Scribe> = (0..10u64)
        .map(|n| scribe_with(70, &stream, "x.note", b"peer", hlc + n, vec![], 0))
        .collect();
    let batch = Message::Batch {
        stream,
        scribes: scribes
            .iter()
            .enumerate()
            .map(|(n, scribe)| WireScribe {
                seq: n as u64 + 1,
                id: scribe.id,
                parts: scribe.parts(),
            })
            .collect(),
        through: 10,
        head: 10,
    };
    intruder
        .send(
            quire::replication::wire::to_proto(&batch)
                .message
                .expect("a message"),
        )
        .await;
    wait_until(CONVERGE, "the node's cursor on the peer at 10", || async {
        node.log
            .cursors(&peer)
            .unwrap()
            .iter()
            .any(|(s, cursor)| *s == stream && cursor.epoch == e1 && cursor.seq == 10)
    })
    .await;
    let theirs: Vec<Bytes> = scribes.iter().map(|s| bytes_of(&s.id)).collect();
    assert!(scribes.iter().all(|s| in_log(&node, &s.id)));
    hang_up(&node, intruder, &peer).await;

    // (claimed history, the Want's after_seq, whether the node sends the peer's scribes back)
    let rounds: Vec<Round> = vec![
        // The current epoch also listed as ended, low: the current epoch wins.
        (e1, vec![(e1, 3)], 10, false),
        // E1 ended at u64::MAX: no more than the cursor itself.
        ([2; 16], vec![(e1, u64::MAX)], 10, false),
        // E1 twice, then E2 ended low: the lowest end since the first listing counts.
        ([3; 16], vec![(e1, 8), ([2; 16], 4), (e1, 6)], 4, true),
        // E1 forgotten: start over, and get everything back.
        ([4; 16], vec![], 0, true),
        // Ended at 0: start over.
        ([5; 16], vec![(e1, 0)], 0, true),
    ];
    for (current, ended, after, sent_back) in rounds {
        let mut intruder = hello_as(&node, &key, current, &ended).await;
        assert_eq!(
            want_after(&mut intruder, &stream).await,
            after,
            "after claiming {current:?} {ended:?}"
        );
        let got = read_from(&mut intruder, &stream).await;
        assert!(got.contains(&bytes_of(&stream)), "the genesis is served");
        let back = theirs.iter().filter(|id| got.contains(id)).count();
        if sent_back {
            // Everything above what the claimed history says the peer still holds.
            assert!(back > 0, "after claiming {current:?} {ended:?}: {back}");
        } else {
            assert_eq!(back, 0, "after claiming {current:?} {ended:?}");
        }
        assert_eq!(got.len() - back, 2, "the node's own two scribes, always");
        hang_up(&node, intruder, &peer).await;
    }
    // Nothing the node holds changed, and the liar was not banned for lying about itself.
    assert!(scribes.iter().all(|s| in_log(&node, &s.id)));
    assert_eq!(node.log.stream(&stream).unwrap().record.scribes, 12);
    assert!(node
        .log
        .cursors(&peer)
        .unwrap()
        .iter()
        .any(|(s, cursor)| *s == stream && cursor.epoch == e1 && cursor.seq == 10));
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// kv leases
// ---------------------------------------------------------------------------------------------

/// Many clients of one node set the same key at once. Each reads the key's state, then appends a
/// write naming it as the write it replaces; two that read the same state both name it, the
/// first committed is valid and the second is invalid by the rule (it replaces a state that is no
/// longer the last). Both callers are answered OK: the second caller's write silently does not
/// count. (Before `replaces`, a holder's writes were always valid.) Every OK must stand for a
/// valid write: the fence must count every success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn concurrent_sets_of_one_key_on_one_node_are_all_valid_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = create_stream(&mut clients(&node.url()).await, "race", None).await;
    let mut kv_client = kv(&node).await;
    let first = set(&mut kv_client, &stream, b"counter", b"start")
        .await
        .unwrap();
    let writers = 40;
    let tasks: Vec<_> = (0..writers)
        .map(|n| {
            let mut kv_client = kv_client.clone();
            tokio::spawn(async move {
                set(
                    &mut kv_client,
                    &stream,
                    b"counter",
                    format!("{n}").as_bytes(),
                )
                .await
            })
        })
        .collect();
    let mut ok = Vec::new();
    for task in tasks {
        if let Ok(entry) = task.await.unwrap() {
            ok.push(entry);
        }
    }
    let last = get(&mut kv_client, &stream, b"counter").await.unwrap();
    let lost: Vec<_> = ok
        .iter()
        .filter(|entry| entry.written != entry.id)
        .map(|entry| entry.value.clone())
        .collect();
    assert_eq!(
        last.fence,
        first.fence + ok.len() as u64,
        "{} writes were answered OK, the fence moved by {}; answered OK but not the key's \
         write when answered: {lost:?}",
        ok.len(),
        last.fence - first.fence
    );
    node.stop().await.unwrap();
}

/// A `kv.set` whose `replaces` is not 32 bytes is stored (kv payloads are not checked at
/// admission) but does not break the key: the table parks it and later writes work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_set_with_a_malformed_replaces_does_not_break_the_key() {
    let now = now_ms();
    let clock = Arc::new(AtomicU64::new(now));
    let dir = tempfile::tempdir().unwrap();
    let node = node_at(dir.path(), &clock).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "malformed", None).await;
    let mut kv_client = kv(&node).await;
    let holder = set(&mut kv_client, &stream, b"k", b"one").await.unwrap();
    for replaces in [vec![7u8; 5], vec![7u8; 33]] {
        let payload = KvSet {
            key: b"k".to_vec(),
            value: b"bad".to_vec(),
            replaces,
        }
        .encode_to_vec();
        let mut scribe = client_scribe(&client_key(71), &stream, "kv.set", &payload, now << 16);
        scribe.body.content_type = CONTENT_TYPE.into();
        let scribe = Scribe::sign(scribe.body, &client_key(71));
        let _ = clients
            .log
            .append_signed(signed_request(scribe.parts()))
            .await;
    }
    let renewed = set(&mut kv_client, &stream, b"k", b"two").await.unwrap();
    assert_eq!(renewed.value, Bytes::from_static(b"two"));
    assert_eq!(renewed.fence, holder.fence + 1);
    assert_eq!(renewed.written, renewed.id);
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Second review: shares, re-holds, HeldFull batches, rules-held scribes
// ---------------------------------------------------------------------------------------------

/// A parent dated a year ahead and a child dated in the same clock value (a client signs any
/// clock), naming it, whose id sorts first: both held under keys of the same clock, so the child
/// is released first, finds its parent still held and is held again with it.
async fn hold_tied_parent_and_child(
    clients: &mut Clients,
    stream: &StreamId,
    at: u64,
) -> (Scribe, Scribe) {
    let parent = scribe_with(63, stream, "x.note", b"parent", at << 16, vec![], 0);
    let child = (0..)
        .map(|nonce| {
            scribe_with(
                63,
                stream,
                "x.note",
                &[b'c'; 8 * 1024],
                at << 16,
                vec![parent.id],
                nonce,
            )
        })
        .find(|child| child.id < parent.id)
        .unwrap();
    for scribe in [&parent, &child] {
        let reply = clients
            .log
            .append_signed(signed_request(scribe.parts()))
            .await
            .expect("held, not refused")
            .into_inner();
        assert!(reply.held, "{reply:?}");
    }
    (parent, child)
}

/// Fills the clients' share of `node`'s held set to the byte with client scribes dated after
/// `after_ms`: big ones, then smaller and smaller until even a 1 KiB one is refused.
async fn fill_clients_share_to_the_byte(node: &RunningNode, after_ms: u64) {
    let mut clients = clients(&node.url()).await;
    let filler = create_stream(&mut clients, "filler-exact", None).await;
    let mut n = 0u64;
    for size in [10 * 1024 * 1024 - 4096, 64 * 1024, 1024] {
        loop {
            n += 1;
            let scribe = scribe_with(
                51,
                &filler,
                "x.note",
                &vec![b'f'; size],
                (after_ms + n) << 16,
                vec![],
                0,
            );
            match clients
                .log
                .append_signed(signed_request(scribe.parts()))
                .await
            {
                Ok(reply) => assert!(reply.into_inner().held),
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                    break;
                }
            }
        }
    }
}

/// Pins the tie: a child dated like its parent, whose id sorts first, is released before it, is
/// held again with it (not refused), and enters the log right after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_child_dated_like_its_parent_is_held_again_and_enters_after_it() {
    let now = now_ms();
    let clock = Arc::new(AtomicU64::new(now));
    let dir = tempfile::tempdir().unwrap();
    let node = node_at(dir.path(), &clock).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "tie", None).await;
    let at = now + YEAR_MS / 2;
    let (parent, child) = hold_tied_parent_and_child(&mut clients, &stream, at).await;
    clock.store(at, Ordering::SeqCst);
    wait_until(SETTLE, "parent and child in the log", || async {
        in_log(&node, &parent.id) && in_log(&node, &child.id)
    })
    .await;
    assert_eq!(node.log.held(), (0, 0));
    node.stop().await.unwrap();
}

/// The same tie while the clients' share is full (anyone may fill it: it is the share of every
/// client of the node). Released first, the child is held again with its parent, and `hold`
/// checks the share as if it were a new scribe: the share still counts the child itself (the
/// in-memory set is updated only after the write), so the re-hold is `HeldFull`, and since a
/// released record is deleted "whatever the verdict", the child is gone for good. Its client was
/// told it was held; a node whose share was not full stores it (the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_child_held_again_with_its_parent_is_not_dropped_when_the_share_is_full() {
    let now = now_ms();
    let clock = Arc::new(AtomicU64::new(now));
    let dir = tempfile::tempdir().unwrap();
    let node = node_at(dir.path(), &clock).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "tie-full", None).await;
    let at = now + YEAR_MS / 2;
    let (parent, child) = hold_tied_parent_and_child(&mut clients, &stream, at).await;
    // Everything else is dated later than `at`: only the two are due when the clock gets there.
    // (Later by more than the 60 s a due scribe may be ahead: they stay held.)
    fill_clients_share_to_the_byte(&node, at + 2 * MAX_AHEAD_MS).await;
    let (held_before, _) = node.log.held();

    clock.store(at, Ordering::SeqCst);
    wait_until(SETTLE, "the parent in the log", || async {
        in_log(&node, &parent.id)
    })
    .await;
    wait_until(SETTLE, "the two out of the held set", || async {
        node.log.held().0 <= held_before - 2
    })
    .await;
    wait_until(
        SETTLE,
        "the child, told it was held, in the log (not dropped when held again with its parent)",
        || async { in_log(&node, &child.id) },
    )
    .await;
    assert_eq!(
        node.log.held().0,
        held_before - 2,
        "only the two left the held set"
    );
    node.stop().await.unwrap();
}

/// Reads until the node ends the connection; its reason, if it gave one.
async fn until_closed(intruder: &mut Intruder) -> Option<String> {
    loop {
        match intruder.next().await {
            Some(Wire::Error(error)) => return Some(format!("{error:?}")),
            Some(_) => continue,
            None => return None,
        }
    }
}

/// A peer past 64 refused scribes in one connection is banned. A peer that first fills its own
/// share of the held set (a few scribes dated a year ahead: its own cost) puts one more of them
/// in every batch: the batch ends in `HeldFull`, and `store` returns before it counts the
/// batch's refusals against the peer, so any number of invalid scribes (here 100 naming a parent
/// nobody has) are judged, refused and never counted: the ban never comes, and the peer may
/// reconnect and do it again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_in_a_held_full_batch_still_count_against_the_peer() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "evade", None).await;
    let key = client_key(72);
    let peer = AuthorKey(key.verifying_key().to_bytes());
    let mut intruder = Intruder::connect(node.peer_addr.unwrap(), key, true).await;
    assert_eq!(want_after(&mut intruder, &stream).await, 0);
    let later = (now_ms() + YEAR_MS) << 16;

    // 10 MiB held: most of the peer's quarter (16 MiB).
    let big = scribe_with(
        72,
        &stream,
        "x.note",
        &vec![b'b'; 10 << 20],
        later,
        vec![],
        0,
    );
    intruder
        .send(batch_of(&stream, std::slice::from_ref(&big), 1))
        .await;
    wait_until(CONVERGE, "the peer's first scribe held", || async {
        node.log.held().0 == 1
    })
    .await;

    // 7 MiB more does not fit; 100 scribes naming a parent nobody has ride along.
    let mut scribes = vec![scribe_with(
        72,
        &stream,
        "x.note",
        &vec![b'c'; 7 << 20],
        later + 1,
        vec![],
        0,
    )];
    let hlc = node.log.clock().now();
    for n in 0..100u64 {
        scribes.push(scribe_with(
            72,
            &stream,
            "x.note",
            b"orphan",
            hlc + n,
            vec![ScribeId([n as u8; 32])],
            0,
        ));
    }
    intruder.send(batch_of(&stream, &scribes, 2)).await;
    let reason = until_closed(&mut intruder).await;
    let status = peer_status(&node, &peer).await.expect("the peer is known");
    assert!(
        status.refused >= 100,
        "100 invalid scribes judged and refused, {} counted against the peer (connection ended: \
         {reason:?}, {:?})",
        status.refused,
        status.last_error
    );
    node.stop().await.unwrap();
}

/// The rule an older version had (as in `versions.rs`): it knew no `x.v2.*` kinds.
struct NoV2Kinds;

impl quire::projection_api::PayloadCheck for NoV2Kinds {
    fn name(&self) -> &str {
        "no x.v2 kinds (an older version)"
    }

    fn check(
        &self,
        scribe: &quire::projection_api::Candidate<'_>,
    ) -> Result<(), quire::projection_api::PayloadError> {
        if scribe.kind.as_str().starts_with("x.v2.") {
            return Err(quire::projection_api::PayloadError::new(
                "this version knows no x.v2 kinds",
            ));
        }
        Ok(())
    }
}

/// Scribes kept aside for another rules version never leave the held set until the node's rules
/// change, yet they fill the peer's share like scribes dated ahead, which leave as the clock
/// moves. Once a newer peer has written 16 MiB (or 2,500 scribes) of a kind the old node's rules
/// refuse, the next one is `HeldFull`: the batch is not stored, the cursor stays, the connection
/// ends, and on every reconnection the same batch ends it again. Nothing the newer node writes in
/// that stream after it (here a plain note, valid under both rules) ever reaches the old node
/// until it is upgraded: "no ban, nothing skipped" holds, but the stream stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "finding: rules-held scribes fill a peer's share and never drain: past 16 MiB of a new kind the stream stops reaching an old node"]
async fn rules_held_scribes_filling_a_peers_share_do_not_stop_the_stream() {
    let (dir_new, dir_old) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut config = quire::node::NodeConfig::new(dir_new.path());
    config.rules = Some((
        quire::log::rules::RULES_VERSION + 1,
        quire::node::payload_checks(),
    ));
    let new = start_config(config, true).await;
    let mut config = quire::node::NodeConfig::new(dir_old.path());
    config.rules = Some((
        quire::log::rules::RULES_VERSION,
        quire::node::payload_checks().with(NoV2Kinds),
    ));
    let old = start_config(config, true).await;
    let mut clients_new = clients(&new.url()).await;
    let stream = create_stream(&mut clients_new, "v2-files", None).await;
    connect(&old, &new).await;
    join(&old, &stream).await;
    for n in 0..2u8 {
        clients_new
            .log
            .append(pb::AppendRequest {
                stream: bytes_of(&stream),
                kind: "x.v2.file".into(),
                content_type: "application/octet-stream".into(),
                payload: Bytes::from(vec![n; 9 << 20]),
                parents: vec![],
            })
            .await
            .unwrap();
    }
    let note = append_note(&mut clients_new, &stream, "valid under both rules").await;
    let note = ScribeId::from_slice(&note.id).unwrap();
    let new_key = new.log.node_key();
    wait_until(
        SETTLE,
        "the note, or the connection ended for a full share",
        || async {
            in_log(&old, &note)
                || peer_status(&old, &new_key).await.is_some_and(|peer| {
                    peer.last_error.contains("already keeps as many") && peer.connects >= 3
                })
        },
    )
    .await;
    let peer = peer_status(&old, &new_key).await.unwrap();
    assert!(
        in_log(&old, &note),
        "the plain note never reaches the old node: {} connections, each ended by {:?}",
        peer.connects,
        peer.last_error
    );
    new.stop().await.unwrap();
    old.stop().await.unwrap();
}

/// Any key may connect as a peer, and each peer key has its own quarter of the held set: five
/// throwaway keys, each sending scribes dated a year ahead until its share is full, fill the whole
/// held set (in all). An honest peer whose clock is five minutes fast then gets `HeldFull` "in
/// all": its stream stops reaching the node for as long as the attacker's scribes are dated ahead
/// (a year). The commit says no one client and no one peer can crowd out a peer's scribes; a
/// handful of keys, which cost nothing, can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "finding: five throwaway peer keys fill the whole held set for a year; an honest fast-clock peer's stream stops"]
async fn throwaway_peer_keys_do_not_crowd_out_an_honest_peers_scribes() {
    let now = now_ms();
    let ahead = 5 * 60 * 1000;
    let (clock_v, clock_b) = (
        Arc::new(AtomicU64::new(now)),
        Arc::new(AtomicU64::new(now + ahead)),
    );
    let (dir_v, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let v = node_at(dir_v.path(), &clock_v).await;
    let b = node_at(dir_b.path(), &clock_b).await;
    let stream = create_stream(&mut clients(&v.url()).await, "crowded", None).await;
    connect(&b, &v).await;
    join(&b, &stream).await;

    for seed in 80..85u8 {
        let mut intruder = Intruder::connect(v.peer_addr.unwrap(), client_key(seed), true).await;
        assert_eq!(want_after(&mut intruder, &stream).await, 0);
        for n in 0..17u64 {
            let scribe = scribe_with(
                seed,
                &stream,
                "x.note",
                &vec![seed; 1 << 20],
                (now + YEAR_MS + n) << 16,
                vec![],
                0,
            );
            intruder
                .send(batch_of(&stream, std::slice::from_ref(&scribe), n + 1))
                .await;
        }
        let reason = until_closed(&mut intruder).await;
        assert!(
            reason
                .as_deref()
                .is_some_and(|reason| reason.contains("already keeps as many")),
            "{reason:?}"
        );
    }
    assert!(
        v.log.held().1 > MAX_HELD_BYTES - (1 << 20),
        "{:?}",
        v.log.held()
    );

    // B's clock is five minutes fast: its notes are dated ahead of V's clock, to be held.
    let mut clients_b = clients(&b.url()).await;
    let mut ids = Vec::new();
    for _ in 0..32 {
        let reply = clients_b
            .log
            .append(pb::AppendRequest {
                stream: bytes_of(&stream),
                kind: "x.note".into(),
                content_type: "text/plain".into(),
                payload: Bytes::from(vec![b'h'; 64 * 1024]),
                parents: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(ScribeId::from_slice(&reply.id).unwrap());
    }
    let b_key = b.log.node_key();
    wait_until(
        SETTLE,
        "V to hold B's notes, or to end B's connection",
        || async {
            peer_status(&v, &b_key).await.is_some_and(|peer| {
                stream_counters(&peer, &stream).held >= ids.len() as u64
                    || peer.last_error.contains("already keeps as many")
            })
        },
    )
    .await;
    let peer = peer_status(&v, &b_key).await.unwrap();
    assert!(
        stream_counters(&peer, &stream).held >= ids.len() as u64,
        "the honest peer's notes are not held: {:?}",
        peer.last_error
    );
    v.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// A peer's batch mixing due scribes and one that does not fit its share: the due ones are
/// stored, the cursor stays before the batch, the connection ends; sent again on the next
/// connection, the due ones are duplicates (stored once) and the cursor still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_full_batch_stores_its_due_scribes_once_and_keeps_the_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "mixed", None).await;
    let key = client_key(73);
    let peer = AuthorKey(key.verifying_key().to_bytes());
    let later = (now_ms() + YEAR_MS) << 16;
    let big = scribe_with(
        73,
        &stream,
        "x.note",
        &vec![b'b'; 10 << 20],
        later,
        vec![],
        0,
    );
    let hlc = node.log.clock().now();
    let batch = vec![
        scribe_with(73, &stream, "x.note", b"due one", hlc, vec![], 0),
        scribe_with(
            73,
            &stream,
            "x.note",
            &vec![b'c'; 7 << 20],
            later + 1,
            vec![],
            0,
        ),
        scribe_with(73, &stream, "x.note", b"due two", hlc + 1, vec![], 0),
    ];
    let cursor = || {
        node.log
            .cursors(&peer)
            .unwrap()
            .iter()
            .find(|(s, _)| *s == stream)
            .map(|(_, cursor)| cursor.seq)
    };
    let mut intruder = Intruder::connect(node.peer_addr.unwrap(), key.clone(), true).await;
    assert_eq!(want_after(&mut intruder, &stream).await, 0);
    intruder
        .send(batch_of(&stream, std::slice::from_ref(&big), 1))
        .await;
    wait_until(CONVERGE, "the peer's cursor at 1", || async {
        cursor() == Some(1)
    })
    .await;
    for round in 0..2 {
        if round > 0 {
            intruder = Intruder::connect(node.peer_addr.unwrap(), key.clone(), true).await;
            assert_eq!(
                want_after(&mut intruder, &stream).await,
                1,
                "the cursor stayed"
            );
        }
        intruder.send(batch_of(&stream, &batch, 2)).await;
        let reason = until_closed(&mut intruder).await;
        assert!(
            reason
                .as_deref()
                .is_some_and(|reason| reason.contains("already keeps as many")),
            "{reason:?}"
        );
        assert!(in_log(&node, &batch[0].id) && in_log(&node, &batch[2].id));
        assert!(!in_log(&node, &batch[1].id));
        assert_eq!(cursor(), Some(1));
        // The genesis and the two due scribes, each once; the big one held.
        assert_eq!(node.log.stream(&stream).unwrap().record.scribes, 3);
        assert_eq!(node.log.held().0, 1);
    }
    node.stop().await.unwrap();
}

/// A peer that claims another rules version has every rule refusal kept aside instead of
/// counted: a liar could use that to send invalid scribes forever without a ban. What it can make
/// the node keep stays within its quarter of the held set, none of it reaches the log, and past
/// its share the connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_lying_about_its_rules_version_gets_no_more_than_its_share_kept_aside() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "liar", None).await;
    let head = node.log.head();
    let key = client_key(74);
    let mut intruder = Intruder::dial(node.peer_addr.unwrap(), key.clone()).await;
    let hello = pb::PeerHello {
        node_id: Bytes::copy_from_slice(&key.verifying_key().to_bytes()),
        epoch: Bytes::copy_from_slice(&[4u8; 16]),
        nonce: Bytes::copy_from_slice(&[7u8; 32]),
        protocol: PROTOCOL_VERSION,
        rules: quire::log::rules::RULES_VERSION + 7,
        ..Default::default()
    };
    intruder.send(Wire::Hello(hello)).await;
    intruder.prove(true).await;
    assert_eq!(want_after(&mut intruder, &stream).await, 0);
    // Upvotes without a parent: refused by the built-in kinds' rule on every version.
    let (most, most_bytes) =
        quire::log::held::share_limit(&Some(AuthorKey(key.verifying_key().to_bytes())));
    let hlc = node.log.clock().now();
    // 3,000 of them: more than the 2,500 a peer's share holds.
    for first in (1..=3_000).step_by(500) {
        let scribes: Vec<Scribe> = (first..first + 500)
            .map(|n| scribe_with(74, &stream, "record.upvote", b"", hlc + n, vec![], 0))
            .collect();
        intruder.send(batch_of(&stream, &scribes, first)).await;
    }
    let reason = tokio::time::timeout(CONVERGE, until_closed(&mut intruder))
        .await
        .expect("the connection ends once the liar's share is full");
    let (held, bytes) = node.log.held();
    assert!(
        held <= most && bytes <= most_bytes,
        "held {held} ({bytes} bytes), {reason:?}"
    );
    assert!(
        held > most - 500,
        "kept aside up to its share, not refused: held {held}, {reason:?}"
    );
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("scribes aside as it may")),
        "the connection ended because the share was full: {reason:?}"
    );
    assert_eq!(node.log.head(), head, "none of it reached the log");
    node.stop().await.unwrap();
}
