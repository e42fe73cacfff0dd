//! Attacks on per-author quotas (`author_max_bytes`, `author_max_scribes_per_day`): written by a
//! reviewing helper. Every route an author or a peer has into a stream — atomic batches (`signed`
//! and `sealed` in one group), concurrent appends, peer batches of 512, held scribes released
//! later, scribes dated on other days, duplicates, restarts, leaving and joining again — is tried
//! against the bound, and every way a peer might be blamed (or escape blame) for an author.
//!
//! Three found weaknesses, all fixed: a quota is checked last (it hid invalid scribes from
//! blame); a connection remembers what it refused for quota (their children in later batches got
//! an honest peer banned); after a leave and a rejoin, a node did not get back the scribes that
//! first entered through it (`session.rs` skipped what the peer "still holds"), so its usage
//! restarted low — a `Want` now says from which seq the asker holds its own scribes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use quire::log::held::MAX_AHEAD_MS;
use quire::log::store::{Usage, UsageKey};
use quire::node::RunningNode;
use quire::pb;
use quire::projection_api::{AuthorKey, Kind, ScribeId, StreamId};
use quire::scribe::{seal_all, Body, Scribe, Unsealed};
use quire_projection_kv::{KvSet, CONTENT_TYPE};

use crate::common::*;
use crate::kv::node_at;
use crate::malicious::Intruder;
use crate::quota::quota_stream;
use crate::replication::{connect, join, part, wait_for_count, CONVERGE};

const DAY_MS: u64 = 86_400_000;
/// A bound for what must happen soon (or for showing that something does not).
const SOON: Duration = Duration::from_secs(60);

fn author(seed: u8) -> AuthorKey {
    AuthorKey(client_key(seed).verifying_key().to_bytes())
}

/// A scribe of `stream` by client `seed` with every field chosen.
fn scribe_with(
    seed: u8,
    stream: &StreamId,
    kind: &str,
    payload: &[u8],
    hlc: u64,
    parents: Vec<ScribeId>,
) -> Scribe {
    let key = client_key(seed);
    let content_type = if kind.starts_with("kv.") {
        CONTENT_TYPE
    } else {
        "text/plain"
    };
    Scribe::sign(
        Body {
            stream: Some(*stream),
            author: author(seed),
            hlc,
            kind: kind.parse::<Kind>().unwrap(),
            content_type: content_type.into(),
            payload: Bytes::copy_from_slice(payload),
            parents,
            membership: None,
            nonce: 0,
        },
        &key,
    )
}

fn note(seed: u8, stream: &StreamId, payload: &[u8], hlc: u64) -> Scribe {
    scribe_with(seed, stream, "x.note", payload, hlc, vec![])
}

fn kv_set(seed: u8, stream: &StreamId, key: &[u8], hlc: u64) -> Scribe {
    let payload = KvSet {
        key: key.to_vec(),
        value: b"v".to_vec(),
        replaces: vec![],
    }
    .encode_to_vec();
    scribe_with(seed, stream, "kv.set", &payload, hlc, vec![])
}

async fn send(node: &RunningNode, scribe: &Scribe) -> Result<pb::AppendReply, tonic::Status> {
    clients(&node.url())
        .await
        .log
        .append_signed(signed_request(scribe.parts()))
        .await
        .map(|reply| reply.into_inner())
}

fn in_log(node: &RunningNode, id: &ScribeId) -> bool {
    node.log.store().seq_of(id).unwrap().is_some()
}

fn usage(node: &RunningNode, stream: &StreamId, seed: u8, day: u64) -> Usage {
    node.log
        .store()
        .usage(&UsageKey {
            stream: *stream,
            author: author(seed),
            day,
        })
        .unwrap()
}

fn day_of(hlc: u64) -> u64 {
    (hlc >> 16) / DAY_MS
}

fn assert_quota_refusal(result: Result<impl std::fmt::Debug, tonic::Status>, quota: &str) {
    let status = result.expect_err("over the quota: refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(quota), "{status:?}");
}

/// Scribes of client `seed` sealed together, as a `SealedBatch`.
fn sealed_batch(seed: u8, scribes: &[Scribe]) -> pb::SealedBatch {
    let sealed = seal_all(
        scribes
            .iter()
            .map(|scribe| Unsealed {
                envelope: scribe.envelope.clone(),
                id: scribe.id,
                body: scribe.body.clone(),
                payload_sha256: scribe.payload_sha256,
            })
            .collect(),
        &client_key(seed),
    );
    pb::SealedBatch {
        scribes: sealed
            .iter()
            .map(|scribe| pb::Unsealed {
                envelope: scribe.envelope.clone(),
                payload: scribe.body.payload.clone(),
            })
            .collect(),
        seal: sealed[0].seal.bytes.clone(),
    }
}

/// `node`'s view of the peer with key `peer`, if it has one.
async fn peer_status(node: &RunningNode, peer: &AuthorKey) -> Option<pb::PeerStatus> {
    let hex = peer.to_hex();
    node_status(node)
        .await
        .peers
        .into_iter()
        .find(|status| status.node_id == hex)
}

// ---------------------------------------------------------------------------------------------
// Local routes
// ---------------------------------------------------------------------------------------------

/// One `AppendBatch` mixing `signed` entries (a note and a `kv.set`) and a `sealed` batch, all
/// by one author, is one group: the job's own additions count. Six with a quota of 5 are refused
/// whole (nothing stored, no usage); five fit; a sixth (a `kv.*`, counted like any kind) is
/// refused afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_of_signed_and_sealed_scribes_cannot_carry_an_author_past_its_quota() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = quota_stream(&node, 0, 5).await;
    let mut clients = clients(&node.url()).await;
    let hlc = node.log.clock().now();
    let day = day_of(hlc);
    let signed = |scribes: &[&Scribe]| -> Vec<pb::AppendSignedRequest> {
        scribes
            .iter()
            .map(|scribe| signed_request(scribe.parts()))
            .collect()
    };
    let a = note(90, &stream, b"a", hlc + 1);
    let b = kv_set(90, &stream, b"k1", hlc + 2);
    let sealed: Vec<Scribe> = (0..4)
        .map(|n| note(90, &stream, format!("sealed {n}").as_bytes(), hlc + 10 + n))
        .collect();

    // 2 signed + 4 sealed = 6.
    let refused = clients
        .log
        .append_batch(pb::AppendBatchRequest {
            appends: vec![],
            signed: signed(&[&a, &b]),
            sealed: vec![sealed_batch(90, &sealed)],
        })
        .await;
    assert_quota_refusal(refused, "author_max_scribes_per_day");
    assert_eq!(held(&node, &stream), 1, "a refused batch stores nothing");
    assert_eq!(usage(&node, &stream, 90, day), Usage::default());
    assert_eq!(usage(&node, &stream, 90, UsageKey::TOTAL), Usage::default());

    // 2 signed + 3 sealed = 5: fits.
    let replies = clients
        .log
        .append_batch(pb::AppendBatchRequest {
            appends: vec![],
            signed: signed(&[&a, &b]),
            sealed: vec![sealed_batch(90, &sealed[..3])],
        })
        .await
        .expect("five fit")
        .into_inner();
    assert_eq!(replies.results.len(), 5);
    assert_eq!(held(&node, &stream), 6);
    assert_eq!(usage(&node, &stream, 90, day).scribes, 5);

    // The 6th, a kv.set, alone or in a batch with a duplicate of the first 5.
    let sixth = kv_set(90, &stream, b"k2", hlc + 20);
    assert_quota_refusal(send(&node, &sixth).await, "author_max_scribes_per_day");
    let again = clients
        .log
        .append_batch(pb::AppendBatchRequest {
            appends: vec![],
            signed: signed(&[&a, &sixth]),
            sealed: vec![],
        })
        .await;
    assert_quota_refusal(again, "author_max_scribes_per_day");
    assert_eq!(held(&node, &stream), 6);
    assert_eq!(usage(&node, &stream, 90, day).scribes, 5);
    node.stop().await.unwrap();
}

/// 24 clients append 24 different scribes of one author at once (they meet in group commits):
/// exactly the quota's 5 are stored, every other is refused for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_of_one_author_store_exactly_its_quota() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = quota_stream(&node, 1 << 20, 5).await;
    let hlc = node.log.clock().now();
    let url = node.url();
    let mut tasks = Vec::new();
    for n in 0..24u64 {
        let url = url.clone();
        let scribe = note(91, &stream, format!("racer {n}").as_bytes(), hlc + n);
        tasks.push(tokio::spawn(async move {
            clients(&url)
                .await
                .log
                .append_signed(signed_request(scribe.parts()))
                .await
        }));
    }
    let (mut stored, mut refused) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(reply) => {
                assert!(!reply.get_ref().duplicate && !reply.get_ref().held);
                stored += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((stored, refused), (5, 19));
    assert_eq!(held(&node, &stream), 6);
    assert_eq!(usage(&node, &stream, 91, day_of(hlc)).scribes, 5);
    assert_eq!(usage(&node, &stream, 91, UsageKey::TOTAL).scribes, 5);
    node.stop().await.unwrap();
}

/// Scribes dated more than 60 s ahead are held, not stored: at hold time they pass the quota
/// (nothing counted yet). 8 are parked, then the author writes 2 now; when the clock reaches the
/// 8, each is judged again as it enters the log: only 3 get in (5 in all that day).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_scribes_are_counted_when_they_enter_the_log_and_cannot_pass_the_quota() {
    // Noon (UTC) of today: every scribe of the test falls on one day.
    let base = now_ms() / DAY_MS * DAY_MS + DAY_MS / 2;
    let clock = Arc::new(AtomicU64::new(base));
    let dir = tempfile::tempdir().unwrap();
    let node = node_at(dir.path(), &clock).await;
    let stream = quota_stream(&node, 0, 5).await;
    let later = base + 2 * MAX_AHEAD_MS;
    let parked: Vec<Scribe> = (0..8u64)
        .map(|n| {
            note(
                92,
                &stream,
                format!("parked {n}").as_bytes(),
                (later + n) << 16,
            )
        })
        .collect();
    for scribe in &parked {
        let reply = send(&node, scribe).await.expect("held, not refused");
        assert!(reply.held, "{reply:?}");
    }
    for n in 1..=2u64 {
        let reply = send(&node, &note(92, &stream, b"now", (base << 16) + n))
            .await
            .unwrap();
        assert!(!reply.held && reply.seq > 0, "{reply:?}");
    }
    clock.store(later + 100, Ordering::SeqCst);
    wait_until(SOON, "the held set to empty", || async {
        node.log.held() == (0, 0)
    })
    .await;
    let released = parked
        .iter()
        .filter(|scribe| in_log(&node, &scribe.id))
        .count();
    assert_eq!(
        released, 3,
        "only what fits in the day's quota enters the log"
    );
    assert_eq!(held(&node, &stream), 1 + 5);
    assert_eq!(usage(&node, &stream, 92, day_of(base << 16)).scribes, 5);
    assert_quota_refusal(
        send(&node, &note(92, &stream, b"more", (later + 200) << 16)).await,
        "author_max_scribes_per_day",
    );
    node.stop().await.unwrap();
}

/// The byte quota binds whatever day the scribes are dated on (spreading them over days, even a
/// year back, buys nothing); a refusal leaves the usage alone; a duplicate is answered as one —
/// never refused, never counted twice — even at the quota and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_bind_across_days_and_duplicates_neither_count_nor_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = quota_stream(&node, 3_000, 0).await;
    let hlc = node.log.clock().now();
    let payload = vec![7u8; 1_000];
    let today = note(93, &stream, &payload, hlc);
    let yesterday = note(93, &stream, &payload, hlc - (DAY_MS << 16));
    let last_year = note(93, &stream, &payload, hlc - ((400 * DAY_MS) << 16));
    send(&node, &today).await.unwrap();
    send(&node, &yesterday).await.unwrap();
    let total = usage(&node, &stream, 93, UsageKey::TOTAL);
    assert_eq!(total.bytes, today.size() + yesterday.size());
    assert_quota_refusal(send(&node, &last_year).await, "author_max_bytes");
    assert!(!in_log(&node, &last_year.id));
    assert_eq!(usage(&node, &stream, 93, UsageKey::TOTAL), total);
    assert_eq!(
        usage(&node, &stream, 93, day_of(last_year.body.hlc)),
        Usage::default()
    );
    // Sent again: duplicates, nothing counted.
    for scribe in [&today, &yesterday] {
        assert!(send(&node, scribe).await.unwrap().duplicate);
    }
    assert_eq!(usage(&node, &stream, 93, UsageKey::TOTAL), total);
    // A scribe that brings the author to the quota to the byte.
    let room = 3_000 - total.bytes;
    let mut length = room - note(93, &stream, b"", hlc + 1).size();
    let fill = loop {
        // The envelope grows with the payload's length (a varint): shrink until it fits exactly.
        let fill = note(93, &stream, &vec![1u8; length as usize], hlc + 1);
        if fill.size() <= room {
            break fill;
        }
        length -= fill.size() - room;
    };
    assert_eq!(total.bytes + fill.size(), 3_000);
    send(&node, &fill).await.expect("to the byte: fits");
    assert_quota_refusal(
        send(&node, &note(93, &stream, b"x", hlc + 2)).await,
        "author_max_bytes",
    );
    // At the quota, every stored scribe sent again is a duplicate, not a refusal.
    for scribe in [&today, &yesterday, &fill] {
        let reply = send(&node, scribe).await.expect("a duplicate at the quota");
        assert!(reply.duplicate, "{reply:?}");
    }
    node.stop().await.unwrap();
    let node = start_node(dir.path()).await;
    for scribe in [&today, &yesterday, &fill] {
        let reply = send(&node, scribe)
            .await
            .expect("a duplicate after a restart");
        assert!(reply.duplicate, "{reply:?}");
    }
    assert_eq!(usage(&node, &stream, 93, UsageKey::TOTAL).bytes, 3_000);
    assert_eq!(held(&node, &stream), 4);
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Peers
// ---------------------------------------------------------------------------------------------

/// A peer relays a full batch of 512 scribes of one author (quota 5), then another 100: exactly 5
/// are stored, the peer is blamed for none, stays connected, and what it sends next (another
/// author's scribe) is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_relaying_hundreds_of_over_quota_scribes_is_not_blamed_and_only_the_quota_enters() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = quota_stream(&node, 0, 5).await;
    let key = client_key(94);
    let peer = author(94);
    let mut intruder = Intruder::connect(node.peer_addr.unwrap(), key, true).await;
    intruder.offer(&stream).await;
    let hlc = node.log.clock().now();
    let flood: Vec<Scribe> = (0..612u64)
        .map(|n| note(95, &stream, format!("flood {n}").as_bytes(), hlc + n))
        .collect();
    intruder.send(batch_of(&stream, &flood[..512], 1)).await;
    intruder.send(batch_of(&stream, &flood[512..], 513)).await;
    let marker = note(96, &stream, b"after the flood", hlc + 1_000);
    intruder
        .send(batch_of(&stream, std::slice::from_ref(&marker), 613))
        .await;
    wait_until(SOON, "the marker stored, or the peer blamed", || async {
        in_log(&node, &marker.id)
            || peer_status(&node, &peer)
                .await
                .is_some_and(|status| status.refused > 0 || !status.connected)
    })
    .await;
    let status = peer_status(&node, &peer).await.expect("a known peer");
    assert_eq!(status.refused, 0, "{status:?}");
    assert!(status.connected, "{status:?}");
    assert!(in_log(&node, &marker.id));
    let stored = flood
        .iter()
        .filter(|scribe| in_log(&node, &scribe.id))
        .count();
    assert_eq!(stored, 5);
    assert_eq!(held(&node, &stream), 1 + 5 + 1);
    node.stop().await.unwrap();
}

/// Over-quota is not blamed on the peer; but the quota is checked before the payload rules, so a
/// scribe that is over quota *and* invalid on its own (here a `kv.set` whose payload is not a
/// `KvSet`, which no honest peer of the same rules ever relays) is answered "over quota" and not
/// counted either. A peer holding one author key at its quota (5 scribes of its own) can then
/// send any number of invalid scribes and is never banned ("every other refusal counts").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_author_at_its_quota_does_not_shield_invalid_scribes_from_blame() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = quota_stream(&node, 0, 5).await;
    let hlc = node.log.clock().now();
    for n in 0..5u64 {
        send(&node, &note(97, &stream, b"mine", hlc + n))
            .await
            .unwrap();
    }
    let key = client_key(98);
    let peer = author(98);
    let mut intruder = Intruder::connect(node.peer_addr.unwrap(), key, true).await;
    intruder.offer(&stream).await;
    let garbage: Vec<Scribe> = (0..100u64)
        .map(|n| scribe_with(97, &stream, "kv.set", &[0xff; 9], hlc + 10 + n, vec![]))
        .collect();
    intruder.send(batch_of(&stream, &garbage, 1)).await;
    let marker = note(99, &stream, b"after", hlc + 1_000);
    intruder
        .send(batch_of(&stream, std::slice::from_ref(&marker), 101))
        .await;
    wait_until(SOON, "the marker stored, or the peer blamed", || async {
        in_log(&node, &marker.id)
            || peer_status(&node, &peer)
                .await
                .is_some_and(|status| status.refused > 0)
    })
    .await;
    let status = peer_status(&node, &peer).await.expect("a known peer");
    assert!(
        status.refused >= 100,
        "100 kv.set with undecodable payloads, {} counted against the peer ({status:?})",
        status.refused
    );
    node.stop().await.unwrap();
}

/// Two nodes apart each take 2 of an author's scribes (quota 2). Once they meet, A refuses B's 2
/// without blame — but B goes on holding them, and other authors on B may name them as parents.
/// Each such child reaches A in a later batch, where it misses its parent: A counts it as a
/// refusal against B (the "not blamed" set is per batch), and 65 of them ban the honest B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_of_an_over_quota_scribe_do_not_get_an_honest_peer_banned() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let stream = quota_stream(&a, 0, 2).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    part(&b, &a).await;
    let hlc = a.log.clock().now();
    let mut on_b = Vec::new();
    for n in 1..=2u64 {
        send(&a, &note(100, &stream, b"on a", hlc + n))
            .await
            .unwrap();
        let scribe = note(100, &stream, b"on b", hlc + 10 + n);
        send(&b, &scribe).await.unwrap();
        on_b.push(scribe);
    }
    let first = note(101, &stream, b"first marker", hlc + 20);
    send(&b, &first).await.unwrap();
    connect(&b, &a).await;
    wait_until(CONVERGE, "A has B's marker", || async {
        in_log(&a, &first.id)
    })
    .await;
    assert!(on_b.iter().all(|scribe| !in_log(&a, &scribe.id)));
    // 70 authors on B answer one of the scribes B holds, each within its own quota.
    for seed in 110..180u8 {
        let child = scribe_with(
            seed,
            &stream,
            "x.note",
            b"a reply",
            hlc + 100 + seed as u64,
            vec![on_b[0].id],
        );
        send(&b, &child).await.unwrap();
    }
    let last = note(102, &stream, b"last marker", hlc + 1_000);
    send(&b, &last).await.unwrap();
    wait_until(SOON, "A has B's last marker, or blamed B", || async {
        in_log(&a, &last.id) || refused_by(&a).await > 0
    })
    .await;
    for node in [&a, &b] {
        for peer in node_status(node).await.peers {
            assert_eq!(
                peer.refused, 0,
                "an honest peer was blamed for the children of an over-quota scribe: {peer:?}"
            );
        }
    }
    assert!(in_log(&a, &last.id));
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// B's node-signed appends into `stream` (B's key: a writer like any other, not the owner).
fn b_append(stream: &StreamId) -> pb::AppendRequest {
    pb::AppendRequest {
        stream: bytes_of(stream),
        kind: "x.note".into(),
        content_type: "text/plain".into(),
        payload: Bytes::from_static(b"by node b"),
        parents: vec![],
    }
}

/// The owner exemption is the owner's alone: the owner's scribes beyond the quota reach B, while
/// node B's own appends (B's key, not the owner) are bound on B. Leaving deletes B's usage with
/// its data; joining again counts it again from the scribes that come back: all come back (none
/// refused by a stale count), B's usage equals A's, and the quota binds on B as on A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_is_exempt_and_a_rejoin_recounts_usage_with_the_data() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let stream = quota_stream(&a, 0, 3).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    let mut clients_a = clients(&a.url()).await;
    let mut clients_b = clients(&b.url()).await;
    // A client author, 3 on A.
    let hlc = a.log.clock().now();
    for n in 0..3u64 {
        send(&a, &note(103, &stream, b"client", hlc + n))
            .await
            .unwrap();
    }
    // The owner: 8, more than the quota, accepted on A and on B.
    for n in 0..8 {
        append_note(&mut clients_a, &stream, &format!("owner {n}")).await;
    }
    let all = 1 + 3 + 8;
    wait_for_count(&[&b], &stream, all).await;
    assert_eq!(held(&b, &stream), all);

    leave(&b, &stream).await;
    assert_eq!(usage(&b, &stream, 103, UsageKey::TOTAL), Usage::default());
    join(&b, &stream).await;
    wait_for_count(&[&b], &stream, all).await;
    assert_eq!(
        held(&b, &stream),
        all,
        "everything came back, nothing refused"
    );
    for day in [UsageKey::TOTAL, day_of(hlc)] {
        assert_eq!(usage(&b, &stream, 103, day), usage(&a, &stream, 103, day));
    }
    assert_eq!(usage(&b, &stream, 103, day_of(hlc)).scribes, 3);
    assert_quota_refusal(
        send(&b, &note(103, &stream, b"4th", hlc + 10)).await,
        "author_max_scribes_per_day",
    );
    // Node B is bound like any author.
    for _ in 0..3 {
        clients_b
            .log
            .append(b_append(&stream))
            .await
            .expect("within B's quota");
    }
    assert_quota_refusal(
        clients_b.log.append(b_append(&stream)).await,
        "author_max_scribes_per_day",
    );
    wait_for_count(&[&a], &stream, all + 3).await;
    assert_eq!(refused_by(&a).await + refused_by(&b).await, 0);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Scribes that entered the stream through B (B's own appends, and a client's on B) reach A. B
/// leaves and joins again. This was a finding: A did not send them back (they "came from this
/// very peer, which still holds them": the leave vacated them without a new epoch), so B's count
/// of its own key started again from 0 while A's stayed at 3, and B could write 3 more that A
/// refused. Fixed: B's `Want` says it holds its own scribes of the stream only above its new
/// genesis seq, so A sends them back and B counts them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rejoin_a_node_counts_the_scribes_that_entered_through_it() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let stream = quota_stream(&a, 0, 3).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    let mut clients_b = clients(&b.url()).await;
    for _ in 0..3 {
        clients_b.log.append(b_append(&stream)).await.unwrap();
    }
    let hlc = b.log.clock().now();
    for n in 0..3u64 {
        send(&b, &note(104, &stream, b"client on b", hlc + n))
            .await
            .unwrap();
    }
    let all = 1 + 3 + 3;
    wait_for_count(&[&a], &stream, all).await;
    leave(&b, &stream).await;
    join(&b, &stream).await;
    wait_for_count(&[&b], &stream, all).await;
    let b_key = b.log.node_key();
    let b_usage = |node: &RunningNode| {
        node.log
            .store()
            .usage(&UsageKey {
                stream,
                author: b_key,
                day: UsageKey::TOTAL,
            })
            .unwrap()
    };
    assert_eq!(
        (
            held(&b, &stream),
            b_usage(&b),
            usage(&b, &stream, 104, UsageKey::TOTAL)
        ),
        (
            held(&a, &stream),
            b_usage(&a),
            usage(&a, &stream, 104, UsageKey::TOTAL)
        ),
        "B after its rejoin (scribes, its own key's usage, client 104's) against A"
    );
    assert_quota_refusal(
        clients_b.log.append(b_append(&stream)).await,
        "author_max_scribes_per_day",
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
