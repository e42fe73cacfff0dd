//! Static file trees: publishing a site and a second node catching up on it, against `cp -r`,
//! and GETs over HTTP.
//!
//! `cargo bench --bench files`:
//! 1. Writes a 50 MB site of 2,000 files (25 KB each, in 20 directories), copies it with
//!    `cp -r` (the ceiling: same disk, same run), publishes it with `quire files push` to node A
//!    (seconds until every file is served), then starts node B, joins, and times until B serves
//!    every file. Reports seconds and the ratio of `cp -r`'s time to each.
//! 2. `GET` of a 10 KB file over HTTP with keep-alive from one client: requests per second.
//!
//! `-- --test` runs a tiny version for CI.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quire::api::access::AuthChannel;
use quire::node::{NodeConfig, RunningNode};
use quire::pb;

mod support;

fn main() {
    let test_mode = std::env::args().any(|arg| arg == "--test");
    let (files, size) = if test_mode {
        (40, 25_000)
    } else {
        (2_000, 25_000)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(publish(files, size));
    runtime.block_on(gets(Duration::from_millis(if test_mode {
        200
    } else {
        5_000
    })));
}

async fn start(dir: &Path) -> RunningNode {
    RunningNode::start(
        NodeConfig::new(dir),
        "127.0.0.1:0".parse().unwrap(),
        Some("127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap()
}

async fn count(channel: &AuthChannel, stream: &Bytes) -> usize {
    pb::files_client::FilesClient::new(channel.clone())
        .list(pb::FilesListRequest {
            stream: stream.clone(),
            prefix: String::new(),
            limit: 100_000,
        })
        .await
        .map(|reply| reply.into_inner().files.len())
        .unwrap_or(0)
}

async fn publish(files: usize, size: usize) {
    let work = tempfile::tempdir().unwrap();
    let site = work.path().join("site");
    for n in 0..files {
        let dir = site.join(format!("section{:02}", n % 20));
        std::fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..size).map(|i| ((i * 31 + n * 7) % 251) as u8).collect();
        std::fs::write(dir.join(format!("page{n:04}.html")), data).unwrap();
    }
    let total = files * size;
    // Flush the site to disk first, so neither measurement pays for the other's writeback.
    Command::new("sync").status().unwrap();

    let started = Instant::now();
    let copied = Command::new("cp")
        .arg("-r")
        .arg(&site)
        .arg(work.path().join("copy"))
        .status()
        .unwrap();
    assert!(copied.success());
    Command::new("sync").status().unwrap();
    let cp_seconds = started.elapsed().as_secs_f64();

    let dir_a = tempfile::tempdir().unwrap();
    let a = start(dir_a.path()).await;
    let channel_a = support::owner(&a).await;
    let stream = support::create_stream(&channel_a, "site", Some(support::unlimited())).await;
    let started = Instant::now();
    let pushed = Command::new(env!("CARGO_BIN_EXE_quire"))
        .args(["files", "push", &hex::encode(&stream)])
        .arg(&site)
        .args(["--node", &a.url(), "--token", a.token.as_str()])
        .output()
        .unwrap();
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let push_seconds = started.elapsed().as_secs_f64();
    assert_eq!(count(&channel_a, &stream).await, files);

    let dir_b = tempfile::tempdir().unwrap();
    let b = start(dir_b.path()).await;
    let channel_b = support::owner(&b).await;
    let started = Instant::now();
    pb::admin_client::AdminClient::new(channel_b.clone())
        .add_peer(pb::AddPeerRequest {
            addr: a.peer_addr.unwrap().to_string(),
        })
        .await
        .unwrap();
    pb::streams_client::StreamsClient::new(channel_b.clone())
        .join(pb::JoinStreamRequest {
            stream: stream.clone(),
            timeout_ms: 60_000,
        })
        .await
        .unwrap();
    while count(&channel_b, &stream).await < files {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let catch_up_seconds = started.elapsed().as_secs_f64();

    println!("site: {files} files, {:.1} MB", total as f64 / 1e6);
    println!("  cp -r (and sync):            {cp_seconds:>6.2} s");
    println!(
        "  quire files push to A:       {push_seconds:>6.2} s  (cp / push {:.2})",
        cp_seconds / push_seconds
    );
    println!(
        "  B joins and serves it all:   {catch_up_seconds:>6.2} s  (cp / catch-up {:.2})",
        cp_seconds / catch_up_seconds
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

async fn gets(run_for: Duration) {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let channel = support::owner(&node).await;
    let stream = support::create_stream(&channel, "get", None).await;
    pb::files_client::FilesClient::new(channel.clone())
        .put(pb::FilesPutRequest {
            stream: stream.clone(),
            path: "ten.html".into(),
            content_type: String::new(),
            data: Bytes::from(vec![b'x'; 10 * 1024]),
        })
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/{}/ten.html", node.url(), hex::encode(&stream));
    let started = Instant::now();
    let mut requests = 0u64;
    let mut latencies = Vec::new();
    while started.elapsed() < run_for {
        let asked = Instant::now();
        let body = http.get(&url).send().await.unwrap().bytes().await.unwrap();
        latencies.push(asked.elapsed());
        assert_eq!(body.len(), 10 * 1024);
        requests += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort();
    println!(
        "GET of a 10 KB file, one keep-alive client: {:.0} requests/s (p50 {:?}, p99 {:?})",
        requests as f64 / seconds,
        latencies[latencies.len() / 2],
        latencies[(latencies.len() - 1) * 99 / 100]
    );
    node.stop().await.unwrap();
}
