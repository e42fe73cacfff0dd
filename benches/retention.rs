//! Retention and compaction: what a republished site takes on disk before and after `quire
//! prune`, and how fast a prune goes on a big stream.
//!
//! `cargo bench --bench retention`:
//! 1. **Site**: a 50 MB site of 2,000 files (25 KB of random bytes each, so nothing compresses)
//!    in a stream whose rule keeps the newest version of each path, published with `quire files
//!    push`, then republished 9 more times with 10% of the files changed each time. Reports the
//!    node's data directory (RocksDB and projection copies, `du`-style: the sum of file sizes)
//!    before and after `quire prune`, as a ratio of the live site's size (target: at most 2.2×
//!    after).
//! 2. **Throughput**: a stream of 1,000,000 records (`record.add`, about 100 bytes each) dated
//!    two days back, then a `retain` of "records kept one day" and a `quire prune`
//!    (`Streams.Prune`, which answers once the bytes have left the disk): payloads per second and
//!    MB per second, and the plan alone (a dry run) for comparison.
//! 3. **Kv keys**: 200,000 kv writes (200 versions of each of 1,000 keys, 64-byte values, in
//!    `Kv.Update`s of 1,000 keys), rule "newest 1": plan and prune in payloads per second (every
//!    key folded; each prune carries what the fold needs of its write), and the kv digest
//!    checked unchanged after the prune.
//!
//! `QUIRE_BENCH_SITE_FILES` / `QUIRE_BENCH_PRUNE_RECORDS` / `QUIRE_BENCH_PRUNE_KV_WRITES` change
//! the sizes; `-- --test` runs a tiny version for CI.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use quire::api::access::AuthChannel;
use quire::node::{NodeConfig, RunningNode};
use quire::pb;
use rand::RngCore;

mod support;

/// Bytes of one site file.
const FILE_BYTES: usize = 25_000;

/// Records per `AppendBatch`.
const BATCH: usize = 1000;

const DAY_MS: u64 = 24 * 3600 * 1000;

fn size_from_env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let test_mode = std::env::args().any(|arg| arg == "--test");
    let files = size_from_env("QUIRE_BENCH_SITE_FILES", if test_mode { 40 } else { 2_000 });
    let records = size_from_env(
        "QUIRE_BENCH_PRUNE_RECORDS",
        if test_mode { 2_000 } else { 1_000_000 },
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("retention (newest 1 version per path; records kept 1 day)");
    runtime.block_on(site(files, if test_mode { 3 } else { 10 }));
    runtime.block_on(throughput(records));
    let kv_writes = size_from_env(
        "QUIRE_BENCH_PRUNE_KV_WRITES",
        if test_mode { 2_000 } else { 200_000 },
    );
    runtime.block_on(kv_keys(kv_writes, if test_mode { 100 } else { 1_000 }));
}

/// Sum of the sizes of every file under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

/// Where the bytes under `dir` are: its subdirectories' sums, and RocksDB's files by kind.
fn breakdown(dir: &Path) -> String {
    let mut parts = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return String::new();
    };
    let mut by_kind = std::collections::BTreeMap::<String, u64>::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            parts.push(format!(
                "{} {:.1} MB",
                entry.file_name().to_string_lossy(),
                mb(disk_bytes(&path))
            ));
            if let Ok(files) = std::fs::read_dir(&path) {
                for file in files.flatten() {
                    let name = file.file_name().to_string_lossy().into_owned();
                    let kind = name.rsplit('.').next().unwrap_or("").to_string();
                    if matches!(kind.as_str(), "sst" | "log" | "blob") {
                        *by_kind.entry(kind).or_default() +=
                            file.metadata().map(|m| m.len()).unwrap_or(0);
                    }
                }
            }
        }
    }
    for (kind, bytes) in by_kind {
        parts.push(format!("*.{kind} {:.1} MB", mb(bytes)));
    }
    parts.sort();
    parts.join(", ")
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

async fn start(config: NodeConfig) -> RunningNode {
    RunningNode::start(config, "127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap()
}

async fn prune(channel: &AuthChannel, stream: &Bytes, dry_run: bool) -> pb::StreamPayloads {
    pb::streams_client::StreamsClient::new(channel.clone())
        .prune(pb::PruneRequest {
            stream: stream.clone(),
            dry_run,
        })
        .await
        .unwrap()
        .into_inner()
        .streams
        .remove(0)
}

/// Waits until every projection copy of `stream` has applied everything and no rebuild is under
/// way (a prune rebuilds them).
async fn settle(channel: &AuthChannel, stream: &Bytes) {
    loop {
        let status = pb::admin_client::AdminClient::new(channel.clone())
            .status(pb::StatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        let settled = status
            .projections
            .iter()
            .filter(|copy| copy.stream == *stream)
            .all(|copy| copy.lag == 0 && copy.rebuild.is_none());
        if settled {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Waits until every projection slot under `data` keeps one generation (a rebuilt copy's old
/// generation is deleted after the swap, in the background).
async fn retired_copies_gone(data: &Path) {
    let generations = |slot: &Path| {
        std::fs::read_dir(slot)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().parse::<u64>().is_ok())
                    .count()
            })
            .unwrap_or(0)
    };
    loop {
        let mut extra = false;
        for projection in std::fs::read_dir(data.join("projections"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for slot in std::fs::read_dir(projection.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                extra |= generations(&slot.path()) > 1;
            }
        }
        if !extra {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn site(files: usize, publishes: usize) {
    let work = tempfile::tempdir().unwrap();
    let site = work.path().join("site");
    let mut rng = rand::thread_rng();
    let mut write = |n: usize| {
        let dir = site.join(format!("section{:02}", n % 20));
        std::fs::create_dir_all(&dir).unwrap();
        let mut data = vec![0u8; FILE_BYTES];
        rng.fill_bytes(&mut data);
        std::fs::write(dir.join(format!("page{n:04}.html")), data).unwrap();
    };
    for n in 0..files {
        write(n);
    }
    let live = (files * FILE_BYTES) as u64;

    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::new(dir.path());
    config.prune_every = None;
    let node = start(config).await;
    let channel = support::owner(&node).await;
    let stream = support::create_retained(
        &channel,
        "site",
        Some(support::unlimited()),
        Some(pb::Retention {
            keep_versions: 1,
            ..Default::default()
        }),
    )
    .await;
    let push = || {
        let pushed = Command::new(env!("CARGO_BIN_EXE_quire"))
            .args(["files", "push", &hex::encode(&stream)])
            .arg(&site)
            .args(["--node", &node.url(), "--token", node.token.as_str()])
            .output()
            .unwrap();
        assert!(
            pushed.status.success(),
            "{}",
            String::from_utf8_lossy(&pushed.stderr)
        );
    };
    push();
    let changed = files / 10;
    for round in 1..publishes {
        for k in 0..changed {
            write((round * changed + k) % files);
        }
        push();
    }
    settle(&channel, &stream).await;
    retired_copies_gone(dir.path()).await;
    let before = disk_bytes(dir.path());
    println!("      before: {}", breakdown(dir.path()));
    let plan = prune(&channel, &stream, true).await;
    let started = Instant::now();
    let done = prune(&channel, &stream, false).await;
    let prune_seconds = started.elapsed().as_secs_f64();
    settle(&channel, &stream).await;
    retired_copies_gone(dir.path()).await;
    let after = disk_bytes(dir.path());
    println!(
        "  site: {files} files, {:.1} MB live, published {publishes} times ({changed} files changed each time)",
        mb(live)
    );
    println!(
        "    payloads before prune   {:>8.1} MB in {} payloads ({} reclaimable, {:.1} MB)",
        mb(plan.live_bytes),
        plan.live_payloads,
        plan.reclaimable_payloads,
        mb(plan.reclaimable_bytes)
    );
    println!(
        "    data dir before prune   {:>8.1} MB  ({:.2}x live)",
        mb(before),
        before as f64 / live as f64
    );
    println!(
        "    data dir after prune    {:>8.1} MB  ({:.2}x live; target <= 2.2x)  [pruned {} payloads in {prune_seconds:.2} s]",
        mb(after),
        after as f64 / live as f64,
        done.pruned_now
    );
    println!("      {}", breakdown(dir.path()));
    node.stop().await.unwrap();
}

async fn throughput(records: usize) {
    let dir = tempfile::tempdir().unwrap();
    let wall = Arc::new(AtomicU64::new(support::now_ms() - 2 * DAY_MS));
    let mut config = NodeConfig::new(dir.path());
    let clock = wall.clone();
    config.wall = Some(Arc::new(move || clock.load(Ordering::SeqCst)));
    config.prune_every = None;
    let node = start(config).await;
    let channel = support::owner(&node).await;
    let stream =
        support::create_retained(&channel, "records", Some(support::unlimited()), None).await;
    let mut log = pb::log_client::LogClient::new(channel.clone())
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20);
    let started = Instant::now();
    for batch in 0..records.div_ceil(BATCH) {
        let appends = (0..BATCH.min(records - batch * BATCH))
            .map(|index| pb::AppendRequest {
                stream: stream.clone(),
                kind: "record.add".into(),
                content_type: "application/json".into(),
                payload: Bytes::from(format!(
                    r#"{{"_table":"note","text":"record {:09} of the retention benchmark, padded"}}"#,
                    batch * BATCH + index
                )),
                parents: vec![],
            })
            .collect();
        log.append_batch(pb::AppendBatchRequest {
            appends,
            signed: vec![],
            sealed: vec![],
        })
        .await
        .unwrap();
    }
    let append_seconds = started.elapsed().as_secs_f64();
    wall.store(support::now_ms(), Ordering::SeqCst);
    pb::streams_client::StreamsClient::new(channel.clone())
        .retain(pb::RetainRequest {
            stream: stream.clone(),
            retention: Some(pb::Retention {
                max_age_ms: DAY_MS,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let started = Instant::now();
    let plan = prune(&channel, &stream, true).await;
    let plan_seconds = started.elapsed().as_secs_f64();
    assert_eq!(plan.reclaimable_payloads as usize, records);
    let started = Instant::now();
    let done = prune(&channel, &stream, false).await;
    let prune_seconds = started.elapsed().as_secs_f64();
    assert_eq!(done.pruned_now as usize, records);
    let started = Instant::now();
    settle(&channel, &stream).await;
    let settle_seconds = started.elapsed().as_secs_f64();
    println!(
        "  throughput: {records} records ({:.1} MB of payloads) appended in {append_seconds:.1} s",
        mb(plan.reclaimable_bytes)
    );
    println!(
        "    plan (dry run)          {:>10.0} payloads/s  {:>7.1} MB/s",
        records as f64 / plan_seconds,
        mb(plan.reclaimable_bytes) / plan_seconds
    );
    println!(
        "    prune (signed, purged)  {:>10.0} payloads/s  {:>7.1} MB/s  ({prune_seconds:.1} s)",
        records as f64 / prune_seconds,
        mb(done.pruned_now_bytes) / prune_seconds
    );
    println!("    projections settled {settle_seconds:.1} s after the prune answered");
    node.stop().await.unwrap();
}

/// The kv projection's digest of `stream`.
async fn kv_digest(channel: &AuthChannel, stream: &Bytes) -> Bytes {
    pb::projections_client::ProjectionsClient::new(channel.clone())
        .digest(pb::DigestRequest {
            name: "kv".into(),
            stream: stream.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .digest
}

async fn kv_keys(writes: usize, keys: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::new(dir.path());
    config.prune_every = None;
    let node = start(config).await;
    let channel = support::owner(&node).await;
    let stream = support::create_retained(
        &channel,
        "kv",
        Some(support::unlimited()),
        Some(pb::Retention {
            keep_versions: 1,
            ..Default::default()
        }),
    )
    .await;
    let mut kv = pb::kv_client::KvClient::new(channel.clone())
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20);
    let versions = writes / keys;
    let started = Instant::now();
    for version in 0..versions {
        let sets = (0..keys)
            .map(|key| pb::KvSetRequest {
                stream: stream.clone(),
                key: Bytes::from(format!("key-{key:05}")),
                value: Bytes::from(format!("{version:09} {key:05} {}", "v".repeat(48))),
            })
            .collect();
        kv.update(pb::KvUpdateRequest {
            stream: stream.clone(),
            sets,
            deletes: vec![],
        })
        .await
        .unwrap();
    }
    let append_seconds = started.elapsed().as_secs_f64();
    let writes = versions * keys;
    settle(&channel, &stream).await;
    let before = kv_digest(&channel, &stream).await;
    let started = Instant::now();
    let plan = prune(&channel, &stream, true).await;
    let plan_seconds = started.elapsed().as_secs_f64();
    let reclaimable = writes - keys;
    assert_eq!(plan.reclaimable_payloads as usize, reclaimable);
    let started = Instant::now();
    let done = prune(&channel, &stream, false).await;
    let prune_seconds = started.elapsed().as_secs_f64();
    assert_eq!(done.pruned_now as usize, reclaimable);
    let started = Instant::now();
    settle(&channel, &stream).await;
    let settle_seconds = started.elapsed().as_secs_f64();
    assert_eq!(
        kv_digest(&channel, &stream).await,
        before,
        "pruning superseded kv writes changed the kv digest"
    );
    println!(
        "  kv keys: {writes} writes ({versions} versions of {keys} keys) set in {append_seconds:.1} s"
    );
    println!(
        "    plan (dry run)          {:>10.0} payloads/s  {:>7.1} MB/s",
        reclaimable as f64 / plan_seconds,
        mb(plan.reclaimable_bytes) / plan_seconds
    );
    println!(
        "    prune (signed, purged)  {:>10.0} payloads/s  {:>7.1} MB/s  ({prune_seconds:.1} s)",
        reclaimable as f64 / prune_seconds,
        mb(done.pruned_now_bytes) / prune_seconds
    );
    println!(
        "    projections settled {settle_seconds:.1} s after the prune answered; kv digest unchanged"
    );
    node.stop().await.unwrap();
}
