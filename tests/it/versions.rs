//! Mixed versions: two nodes whose rules differ (an old node that does not know a kind the new one
//! accepts). The old node keeps what its rules refuse aside instead of counting it against the
//! peer (no ban), its cursor does not lose it, and once it is upgraded both hold the same set.

use std::collections::HashSet;

use quire::log::rules::RULES_VERSION;
use quire::node::{payload_checks, NodeConfig, RunningNode};
use quire::pb;
use quire::projection_api::{Candidate, PayloadCheck, PayloadError};

use crate::common::*;
use crate::replication::{connect, join, stream_ids, wait_for_count, CONVERGE};

/// The rule an older version had: it knew no `x.v2.*` kinds.
struct NoV2Kinds;

impl PayloadCheck for NoV2Kinds {
    fn name(&self) -> &str {
        "no x.v2 kinds (an older version)"
    }

    fn check(&self, scribe: &Candidate<'_>) -> Result<(), PayloadError> {
        if scribe.kind.as_str().starts_with("x.v2.") {
            return Err(PayloadError::new("this version knows no x.v2 kinds"));
        }
        Ok(())
    }
}

async fn start_old(dir: &std::path::Path) -> RunningNode {
    let mut config = NodeConfig::new(dir);
    config.rules = Some((RULES_VERSION, payload_checks().with(NoV2Kinds)));
    start_config(config, true).await
}

async fn start_new(dir: &std::path::Path) -> RunningNode {
    let mut config = NodeConfig::new(dir);
    config.rules = Some((RULES_VERSION + 1, payload_checks()));
    start_config(config, true).await
}

async fn append_kind(
    node: &RunningNode,
    stream: &quire::projection_api::StreamId,
    kind: &str,
    count: usize,
) {
    let mut clients = clients(&node.url()).await;
    for index in 0..count {
        clients
            .log
            .append(pb::AppendRequest {
                stream: bytes_of(stream),
                kind: kind.into(),
                content_type: "text/plain".into(),
                payload: format!("{kind} {index}").into(),
                parents: vec![],
            })
            .await
            .expect("append");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_node_keeps_aside_what_its_rules_refuse_and_takes_it_once_upgraded() {
    let (dir_new, dir_old) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let new = start_new(dir_new.path()).await;
    let old = start_old(dir_old.path()).await;
    let stream = create_stream(&mut clients(&new.url()).await, "versions", None).await;
    connect(&old, &new).await;
    join(&old, &stream).await;
    // More than the 64 refusals that would get an honest peer banned.
    append_kind(&new, &stream, "x.v2.note", 100).await;
    append_kind(&new, &stream, "x.note", 5).await;
    wait_for_count(&[&old], &stream, 1 + 5).await;
    wait_until(CONVERGE, "the old node to keep the 100 aside", || async {
        node_status(&old).await.held_scribes == 100
    })
    .await;
    let peers = node_status(&old).await.peers;
    let peer = peers
        .iter()
        .find(|peer| peer.node_id == new.log.node_key().to_hex())
        .expect("the new node is a peer");
    assert!(peer.connected, "not banned: {peer:?}");
    assert_eq!(peer.refused, 0);
    let counters = &peer.streams[0];
    assert_eq!((counters.held, counters.refused), (100, 0));
    assert_eq!(counters.lag, 0, "the cursor moved past what was kept aside");
    assert_eq!(old.log.stream(&stream).unwrap().record.scribes, 6);

    // Upgraded, the old node judges them again by the new rules and stores them.
    old.stop().await.unwrap();
    let upgraded = start_new(dir_old.path()).await;
    connect(&upgraded, &new).await;
    wait_for_count(&[&upgraded, &new], &stream, 106).await;
    wait_until(CONVERGE, "nothing kept aside any more", || async {
        node_status(&upgraded).await.held_scribes == 0
    })
    .await;
    let (a, b) = (
        stream_ids(&new, &stream).await,
        stream_ids(&upgraded, &stream).await,
    );
    assert_eq!(a.len(), 106);
    assert_eq!(b.len(), 106, "each stored once");
    assert_eq!(
        a.into_iter().collect::<HashSet<_>>(),
        b.into_iter().collect::<HashSet<_>>()
    );
    new.stop().await.unwrap();
    upgraded.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_same_rules_a_refused_scribe_still_counts_against_the_peer() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Same version, different checks: a misbehaving peer, not an older one.
    let a = start_new(dir_a.path()).await;
    let mut config = NodeConfig::new(dir_b.path());
    config.rules = Some((RULES_VERSION + 1, payload_checks().with(NoV2Kinds)));
    let b = start_config(config, true).await;
    let stream = create_stream(&mut clients(&a.url()).await, "same", None).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    append_kind(&a, &stream, "x.v2.note", 3).await;
    append_kind(&a, &stream, "x.note", 1).await;
    wait_for_count(&[&b], &stream, 2).await;
    let peers = node_status(&b).await.peers;
    let counters = &peers[0].streams[0];
    assert_eq!((counters.held, counters.refused), (0, 3));
    assert_eq!(node_status(&b).await.held_scribes, 0);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
