//! A second client's appends while strangers abuse the node (issue 17's abuse suite, as numbers).
//!
//! `cargo bench --bench abuse` starts one node and times node-signed appends (`Log.Append` over
//! gRPC, one at a time, each answered once committed) to a quiet stream — alone, then beside each
//! attack — and prints p50 / p99 and their ratios to the figures alone, with the process's
//! resident set:
//! 1. **work tokens**: 4 clients keep asking the node to sign `record.add`s into a stream whose
//!    policy asks for a 24-bit work token (seconds of a core each). The searches run beside the
//!    append pipeline (before, every append waited for the search in its group).
//! 2. **stalled readers**: a stream of 48 scribes of 4 MiB (192 MiB); 8 subscribers and 4
//!    `Log.Read`s of it each take one scribe and stop reading. Reads are cut by bytes before
//!    payloads load, and what waits for a reader is bounded (before, each held the stream).
//! 3. **kv watches**: 16 unread `Kv.Watch`es of a 32 MiB table (64 values of 512 KiB): the
//!    snapshot is read a page at a time as the client reads (before, each held the table twice).
//!
//! `-- --test` runs a tiny version for CI (12-bit tokens, small payloads, 50 appends a phase).

use std::time::{Duration, Instant};

use bytes::Bytes;
use quire::api::access::AuthChannel;
use quire::node::{NodeConfig, RunningNode};
use quire::pb;

mod support;

/// `count` appends to `stream`, one at a time: their latencies.
async fn appends(channel: &AuthChannel, stream: &Bytes, count: usize) -> Vec<Duration> {
    let mut log = support::log_client(channel.clone());
    let mut samples = Vec::with_capacity(count);
    for index in 0..count {
        let started = Instant::now();
        log.append(pb::AppendRequest {
            stream: stream.clone(),
            kind: "x.note".into(),
            content_type: "text/plain".into(),
            payload: Bytes::from(format!("beside {index}")),
            parents: vec![],
        })
        .await
        .unwrap();
        samples.push(started.elapsed());
    }
    samples
}

/// p50 and p99 of `samples`, in ms.
fn figures(samples: &mut [Duration]) -> (f64, f64) {
    (
        support::percentile(samples, 0.50).as_secs_f64() * 1e3,
        support::percentile(samples, 0.99).as_secs_f64() * 1e3,
    )
}

fn report(phase: &str, alone: (f64, f64), beside: (f64, f64), rss: (f64, f64), note: &str) {
    println!(
        "{phase:<16} append p50 {:>7.2} ms ({:>5.2}x alone)  p99 {:>7.2} ms ({:>5.2}x alone)  RSS {:.0} -> {:.0} MiB  {note}",
        beside.0,
        beside.0 / alone.0,
        beside.1,
        beside.1 / alone.1,
        rss.0,
        rss.1,
    );
}

/// `n` bytes that do not compress.
fn noise(seed: u64, n: usize) -> Bytes {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(n);
    Bytes::from(out)
}

fn main() {
    let test_mode = std::env::args().any(|arg| arg == "--test");
    let samples = if test_mode { 50 } else { 600 };
    let work_bits = if test_mode { 12 } else { 24 };
    let (blobs, blob_size) = if test_mode {
        (8, 64 << 10)
    } else {
        (48, 4 << 20)
    };
    let (keys, value_size) = if test_mode {
        (16, 16 << 10)
    } else {
        (64, 512 << 10)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let node = RunningNode::start(
            NodeConfig::new(dir.path()),
            "127.0.0.1:0".parse().unwrap(),
            None,
        )
        .await
        .unwrap();
        let channel = support::owner(&node).await;
        let quiet = support::create_stream(&channel, "quiet", None).await;
        appends(&channel, &quiet, 50).await; // warm up
        let rss = support::rss_mib();
        let alone = figures(&mut appends(&channel, &quiet, samples).await);
        println!(
            "alone            append p50 {:>7.2} ms  p99 {:>7.2} ms  RSS {rss:.0} MiB",
            alone.0, alone.1
        );

        // 1. Work-token searches.
        let worked = support::create_stream(
            &channel,
            "worked",
            Some(pb::Policy {
                work_bits,
                ..Default::default()
            }),
        )
        .await;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut searchers = Vec::new();
        for _ in 0..4 {
            // Each attacker has a connection of its own (as strangers would).
            let mut log = support::log_client(support::owner(&node).await);
            let worked = worked.clone();
            let mut stopped = stopped.clone();
            searchers.push(tokio::spawn(async move {
                let mut stored = 0u64;
                loop {
                    let append = log.append(pb::AppendRequest {
                        stream: worked.clone(),
                        kind: "record.add".into(),
                        content_type: "application/json".into(),
                        payload: Bytes::from_static(br#"{"_table": "notes", "text": "w"}"#),
                        parents: vec![],
                    });
                    tokio::select! {
                        answer = append => if answer.is_ok() { stored += 1 },
                        _ = stopped.wait_for(|stop| *stop) => return stored,
                    }
                }
            }));
        }
        let before = support::rss_mib();
        let beside = figures(&mut appends(&channel, &quiet, samples).await);
        let after = support::rss_mib();
        let _ = stop.send(true);
        let mut stored = 0;
        for searcher in searchers {
            stored += searcher.await.unwrap();
        }
        report(
            "work tokens",
            alone,
            beside,
            (before, after),
            &format!("({stored} records with {work_bits}-bit tokens stored meanwhile)"),
        );

        // 2. Stalled readers of large payloads.
        let large = support::create_stream(&channel, "large", Some(support::unlimited())).await;
        let mut log = support::log_client(channel.clone());
        for index in 0..blobs {
            log.append(pb::AppendRequest {
                stream: large.clone(),
                kind: "x.blob".into(),
                content_type: "application/octet-stream".into(),
                payload: noise(index as u64, blob_size),
                parents: vec![],
            })
            .await
            .unwrap();
        }
        let before = support::rss_mib();
        let mut held: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
        // Each stalled reader has a connection of its own: unread replies fill their
        // connection's windows (on the client's side), not the measured client's.
        for _ in 0..8 {
            let mut log = support::log_client(support::owner(&node).await);
            let mut events = log
                .subscribe(pb::SubscribeRequest {
                    stream: large.clone(),
                    from_seq: 1,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            events.message().await.unwrap().unwrap();
            held.push(Box::new(events));
        }
        for _ in 0..4 {
            let mut log = support::log_client(support::owner(&node).await);
            let mut read = log
                .read(pb::ReadRequest {
                    stream: large.clone(),
                    from_seq: 1,
                    limit: 1000,
                })
                .await
                .unwrap()
                .into_inner();
            read.message().await.unwrap().unwrap();
            held.push(Box::new(read));
        }
        let beside = figures(&mut appends(&channel, &quiet, samples).await);
        let after = support::rss_mib();
        report(
            "stalled readers",
            alone,
            beside,
            (before, after),
            &format!(
                "(12 readers of a {} MiB stream, each stopped after one scribe)",
                (blobs * blob_size) >> 20
            ),
        );
        drop(held);

        // 3. Unread kv watches.
        let table = support::create_stream(&channel, "table", Some(support::unlimited())).await;
        let mut kv = pb::kv_client::KvClient::new(channel.clone());
        for index in 0..keys {
            kv.set(pb::KvSetRequest {
                stream: table.clone(),
                key: Bytes::from(format!("key {index:03}")),
                value: noise(1000 + index as u64, value_size),
            })
            .await
            .unwrap();
        }
        let before = support::rss_mib();
        let mut watches = Vec::new();
        for _ in 0..16 {
            let mut kv = pb::kv_client::KvClient::new(support::owner(&node).await);
            let mut watch = kv
                .watch(pb::KvWatchRequest {
                    stream: table.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            watch.message().await.unwrap().unwrap();
            watches.push(watch);
        }
        let beside = figures(&mut appends(&channel, &quiet, samples).await);
        let after = support::rss_mib();
        report(
            "unread watches",
            alone,
            beside,
            (before, after),
            &format!(
                "(16 watches of a {} MiB table, each stopped after one entry)",
                (keys * value_size) >> 20
            ),
        );
        drop(watches);
        node.stop().await.unwrap();
    });
}
