//! Per-author quotas (issue 15): a stream's policy bounds what one author may put in it — bytes in
//! all and scribes per UTC day of the scribes' own clocks — on every node, for local appends and
//! scribes from peers alike, so one author cannot fill every replica; other authors keep writing,
//! the owner is exempt, and a peer relaying an author at its quota is not blamed for it.

use std::time::Duration;

use quire::node::RunningNode;
use quire::pb;
use quire::projection_api::StreamId;

use crate::common::*;
use crate::replication::{connect, join, wait_for_count};

pub(crate) async fn quota_stream(node: &RunningNode, bytes: u64, per_day: u64) -> StreamId {
    create_stream(
        &mut clients(&node.url()).await,
        "quota",
        Some(pb::Policy {
            author_max_bytes: bytes,
            author_max_scribes_per_day: per_day,
            ..Default::default()
        }),
    )
    .await
}

async fn write(
    node: &RunningNode,
    seed: u8,
    stream: &StreamId,
    payload: &[u8],
    hlc: u64,
) -> Result<pb::AppendReply, tonic::Status> {
    let scribe = client_scribe(&client_key(seed), stream, "x.note", payload, hlc);
    clients(&node.url())
        .await
        .log
        .append_signed(signed_request(scribe.parts()))
        .await
        .map(|reply| reply.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_author_over_its_quota_is_refused_on_every_node_and_the_others_keep_writing() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let stream = quota_stream(&a, 0, 5).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    let hlc = a.log.clock().now();
    // Author 51 writes its 5 of the day on A; B receives them.
    for n in 1..=5 {
        write(&a, 51, &stream, format!("note {n}").as_bytes(), hlc + n)
            .await
            .unwrap();
    }
    wait_for_count(&[&b], &stream, 6).await;
    // The 6th is refused on A and on B alike, saying which quota.
    for node in [&a, &b] {
        let status = write(node, 51, &stream, b"one too many", hlc + 6)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("author_max_scribes_per_day"),
            "{status:?}"
        );
    }
    // Another author writes on.
    for n in 1..=5 {
        write(&b, 52, &stream, format!("other {n}").as_bytes(), hlc + n)
            .await
            .unwrap_or_else(|status| panic!("author 52 is within its quota: {status:?}"));
    }
    // The owner is exempt.
    for n in 0..7 {
        append_note(&mut clients(&a.url()).await, &stream, &format!("owner {n}")).await;
    }
    // The genesis, 5 of author 51, 5 of author 52 and 7 of the owner.
    wait_for_count(&[&a, &b], &stream, 18).await;
    assert_eq!(held(&a, &stream), held(&b, &stream));
}

/// Two nodes apart each take a different 3 of an author's scribes at its quota; once they meet,
/// each refuses the other's 3 — without counting them against the peer that relays them — and
/// every other author's scribes converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_relaying_an_author_at_its_quota_is_not_blamed() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let stream = quota_stream(&a, 0, 3).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    crate::replication::part(&b, &a).await;
    let hlc = a.log.clock().now();
    for n in 1..=3 {
        write(&a, 53, &stream, format!("on a {n}").as_bytes(), hlc + n)
            .await
            .unwrap();
        write(
            &b,
            53,
            &stream,
            format!("on b {n}").as_bytes(),
            hlc + 10 + n,
        )
        .await
        .unwrap();
        write(
            &b,
            54,
            &stream,
            format!("other {n}").as_bytes(),
            hlc + 20 + n,
        )
        .await
        .unwrap();
    }
    connect(&b, &a).await;
    // A gets author 54's 3 (1 + 3 + 3 = 7), and neither node takes the other's 3 of author 53.
    wait_for_count(&[&a], &stream, 7).await;
    wait_until(Duration::from_secs(30), "both caught up", || async {
        node_status(&b).await.peers.iter().any(|peer| {
            peer.connected
                && peer
                    .streams
                    .iter()
                    .any(|counters| counters.stream == bytes_of(&stream) && counters.lag == 0)
        })
    })
    .await;
    assert_eq!(held(&a, &stream), 7);
    assert_eq!(held(&b, &stream), 7);
    for node in [&a, &b] {
        for peer in node_status(node).await.peers {
            assert_eq!(
                peer.refused, 0,
                "a peer was blamed for an author's quota: {peer:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_author_may_take_at_most_its_bytes_of_a_stream() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(dir.path()).await;
    let stream = quota_stream(&a, 3_000, 0).await;
    let hlc = a.log.clock().now();
    let payload = vec![7u8; 1_000];
    write(&a, 55, &stream, &payload, hlc + 1).await.unwrap();
    write(&a, 55, &stream, &payload, hlc + 2).await.unwrap();
    let status = write(&a, 55, &stream, &payload, hlc + 3).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("author_max_bytes"), "{status:?}");
    // A refusal changes nothing; a smaller scribe still fits.
    assert_eq!(held(&a, &stream), 3);
    write(&a, 55, &stream, b"small", hlc + 4).await.unwrap();
    // The usage is kept in the data directory: after a restart the quota still holds.
    a.stop().await.unwrap();
    let a = start_node(dir.path()).await;
    let status = write(&a, 55, &stream, &payload, hlc + 5).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(held(&a, &stream), 4);
}
