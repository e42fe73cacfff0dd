//! Access-control benchmark (issue 15), in one run:
//! - appends into a public stream and into a private stream whose writers are a 100-member list
//!   (every scribe judged against its author's view of the membership), and the catch-up of each
//!   by a second node: the private stream's rates as ratios of the public one's;
//! - replication catch-up over TLS with channel-bound proofs against plaintext HTTP/2 (the same
//!   protocol without TLS: the baseline `quire serve` never runs).
//!
//! `cargo bench --bench access` (200,000 scribes; a few minutes); `-- --test` runs a tiny version.

use std::time::Instant;

use bytes::Bytes;
use quire::membership::Role;
use quire::node::{NodeConfig, RunningNode};
use quire::pb;
use quire::projection_api::{AuthorKey, StreamId};

mod support;

const PAYLOAD: usize = 256;

async fn start(dir: &std::path::Path, tls: bool) -> RunningNode {
    let mut config = NodeConfig::new(dir);
    if !tls {
        config.peer_options.tls = None;
    }
    RunningNode::start(
        config,
        "127.0.0.1:0".parse().unwrap(),
        Some("127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap()
}

/// A stream of `node`'s: public, or private with `writers` writer keys and `reader` a reader.
async fn stream(node: &RunningNode, writers: usize, reader: Option<AuthorKey>) -> StreamId {
    let channel = support::owner(node).await;
    let access = reader.map(|reader| {
        let mut members: Vec<pb::Member> = (0..writers)
            .map(|index| pb::Member {
                key: Bytes::copy_from_slice(&[index as u8 + 1; 32]),
                role: Role::Writer.to_proto(),
            })
            .collect();
        members.push(pb::Member {
            key: Bytes::copy_from_slice(reader.as_bytes()),
            role: Role::Reader.to_proto(),
        });
        pb::Access {
            private: true,
            members,
        }
    });
    let info = pb::streams_client::StreamsClient::new(channel)
        .create(pb::CreateStreamRequest {
            name: "bench".into(),
            policy: Some(support::unlimited()),
            owner: Bytes::new(),
            access,
            retention: None,
        })
        .await
        .unwrap()
        .into_inner();
    StreamId::from_slice(&info.stream).unwrap()
}

/// Appends `count` node-signed scribes in batches of 1,000; scribes per second.
async fn fill(node: &RunningNode, stream: &StreamId, count: usize) -> f64 {
    let mut log = support::log_client(support::owner(node).await);
    let started = Instant::now();
    let mut done = 0;
    while done < count {
        let batch = (count - done).min(1000);
        let appends = (0..batch)
            .map(|index| pb::AppendRequest {
                stream: Bytes::copy_from_slice(stream.as_bytes()),
                kind: "x.bench".into(),
                payload: Bytes::from(vec![(done + index) as u8; PAYLOAD]),
                ..Default::default()
            })
            .collect();
        log.append_batch(pb::AppendBatchRequest {
            appends,
            signed: vec![],
            sealed: vec![],
        })
        .await
        .unwrap();
        done += batch;
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// `b` joins `stream` from `a` and takes all `count` scribes; scribes per second.
async fn catch_up(a: &RunningNode, b: &RunningNode, stream: &StreamId, count: u64) -> f64 {
    let started = Instant::now();
    let channel = support::owner(b).await;
    pb::streams_client::StreamsClient::new(channel.clone())
        .join(pb::JoinStreamRequest {
            stream: Bytes::copy_from_slice(stream.as_bytes()),
            timeout_ms: 60_000,
        })
        .await
        .unwrap();
    let _ = a;
    let mut heads = b.log.watch_head();
    while b.log.stream(stream).map_or(0, |state| state.record.scribes) < count {
        heads.changed().await.unwrap();
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// Waits until every projection of `node` has applied everything (a catch-up measured while
/// another stream's projections still work would share the 2 cores with them).
async fn settle(node: &RunningNode) {
    let mut admin = pb::admin_client::AdminClient::new(support::owner(node).await);
    loop {
        let status = admin
            .status(pb::StatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        if status.projections.iter().all(|p| p.checkpoint >= p.target) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn pair(
    tls: bool,
) -> (
    tempfile::TempDir,
    tempfile::TempDir,
    RunningNode,
    RunningNode,
) {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(dir_a.path(), tls).await;
    let b = start(dir_b.path(), tls).await;
    pb::admin_client::AdminClient::new(support::owner(&b).await)
        .add_peer(pb::AddPeerRequest {
            addr: a.peer_addr.unwrap().to_string(),
        })
        .await
        .unwrap();
    (dir_a, dir_b, a, b)
}

fn main() {
    let test_mode = std::env::args().any(|arg| arg == "--test");
    let count = if test_mode { 2_000 } else { 200_000 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        // Public against private with 100 writers, over TLS.
        let (_da, _db, a, b) = pair(true).await;
        let public = stream(&a, 0, None).await;
        let private = stream(&a, 100, Some(b.log.node_key())).await;
        // Alternating rounds, so neither stream is measured on a larger log than the other.
        let (mut public_secs, mut private_secs) = (0.0, 0.0);
        let round = count / 10;
        for _ in 0..10 {
            public_secs += round as f64 / fill(&a, &public, round).await;
            private_secs += round as f64 / fill(&a, &private, round).await;
        }
        let append_public = count as f64 / public_secs;
        let append_private = count as f64 / private_secs;
        settle(&a).await;
        let catch_public = catch_up(&a, &b, &public, count as u64 + 1).await;
        settle(&b).await;
        let catch_private = catch_up(&a, &b, &private, count as u64 + 1).await;

        // TLS against plaintext: the same catch-up of a public stream.
        let (_pa, _pb, plain_a, plain_b) = pair(false).await;
        let plain = stream(&plain_a, 0, None).await;
        fill(&plain_a, &plain, count).await;
        settle(&b).await;
        settle(&plain_a).await;
        let catch_plain = catch_up(&plain_a, &plain_b, &plain, count as u64 + 1).await;

        println!("access benchmark ({count} scribes of {PAYLOAD} bytes, in-process nodes)");
        println!(
            "append     public {append_public:>9.0}/s  private, 100 writers {append_private:>9.0}/s  ratio {:.2}",
            append_private / append_public
        );
        println!(
            "catch-up   public {catch_public:>9.0}/s  private, 100 writers {catch_private:>9.0}/s  ratio {:.2}",
            catch_private / catch_public
        );
        println!(
            "catch-up   TLS    {catch_public:>9.0}/s  plaintext            {catch_plain:>9.0}/s  ratio {:.2}",
            catch_public / catch_plain
        );
        for node in [a, b, plain_a, plain_b] {
            node.stop().await.unwrap();
        }
    });
}
