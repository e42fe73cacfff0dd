//! Replication benchmarks: catch-up rate against its ceiling, peak memory, resume cost, live
//! propagation latency. Node A runs in this process; node B is a real `quire serve` child process,
//! so its peak RSS is its own.
//!
//! `cargo bench --bench replication` prints the numbers (1,000,000 scribes; a few minutes);
//! `cargo bench --bench replication -- --test` runs a tiny version.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quire::api::access::{AuthChannel, Bearer};
use quire::node::{NodeConfig, RunningNode};
use quire::pb;
use quire::projection_api::StreamId;
use quire::scribe::Scribe;
use rayon::prelude::*;
use tonic::transport::Channel;

mod support;

const PAYLOAD: usize = 256;

fn main() {
    let test_mode = std::env::args().any(|arg| arg == "--test");
    let (big, small, live) = if test_mode {
        (3_000, 1_000, 50)
    } else if let Ok(sizes) = std::env::var("QUIRE_BENCH_SIZES") {
        let mut sizes = sizes.split(',').map(|n| n.parse().unwrap());
        (sizes.next().unwrap(), sizes.next().unwrap(), 50)
    } else {
        (1_000_000, 100_000, 2_000)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let dir_a = tempfile::tempdir().unwrap();
        let a = RunningNode::start(NodeConfig::new(dir_a.path()), "127.0.0.1:0".parse().unwrap(), Some("127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        let peer_a = a.peer_addr.unwrap().to_string();
        let small_stream = fill(&a, "small", small).await;
        let big_stream = fill(&a, "big", big).await;

        // Ceiling: read the big stream from A's store and verify every scribe on every core (its
        // payload, its proof, and each distinct seal's signature once).
        let started = Instant::now();
        let mut from = 1;
        let mut verified = 0usize;
        loop {
            let entries = a.log.store().read_stream(&big_stream, from, u64::MAX - 1, 10_000, usize::MAX).unwrap().entries;
            let Some(last) = entries.last() else { break };
            from = last.seq + 1;
            let scribes: Vec<Scribe> = entries.into_par_iter().filter_map(|entry| Scribe::decode_unverified(entry.parts, None).ok()).collect();
            let mut seals = std::collections::HashMap::new();
            for scribe in &scribes {
                seals.entry(scribe.seal.id).or_insert_with(|| scribe.seal.clone());
            }
            let bad = seals.into_par_iter().filter(|(_, seal)| seal.verify().is_err()).count();
            assert_eq!(bad, 0);
            verified += scribes.len();
        }
        let ceiling = verified as f64 / started.elapsed().as_secs_f64();

        // Catch-up of the small and the big stream by fresh B processes: rate and peak RSS.
        let (small_rate, small_rss, _) = catch_up(&peer_a, &small_stream, small as u64 + 1).await;
        let (big_rate, big_rss, dir_b) = catch_up(&peer_a, &big_stream, big as u64 + 1).await;

        // Resume cost: B (caught up on the big stream) restarts after A appended 1,000 more.
        let resume_big = resume(&a, &peer_a, dir_b.path(), &big_stream, big as u64 + 1).await;
        let (_, _, dir_small_b) = catch_up(&peer_a, &small_stream, small as u64 + 1).await;
        let resume_small = resume(&a, &peer_a, dir_small_b.path(), &small_stream, small as u64 + 1).await;

        // Live propagation: append on A at 1,000/s, delivered to a Subscribe on B.
        let (p50, p99) = live_latency(&a, &peer_a, live).await;

        println!("replication benchmark ({} cores, {PAYLOAD}-byte payloads)", rayon::current_num_threads());
        println!("  ceiling: read + verify on every core   {ceiling:>10.0} scribes/s");
        println!("  catch-up {big:>8} scribes              {big_rate:>10.0} scribes/s   / ceiling = {:.2}", big_rate / ceiling);
        println!("  catch-up {small:>8} scribes              {small_rate:>10.0} scribes/s");
        println!("  B peak RSS: {} MiB for {big}, {} MiB for {small}: ratio {:.2}", big_rss / 1024, small_rss / 1024, big_rss as f64 / small_rss as f64);
        println!("  resume after 1,000 new: {:?} on a {big} log, {:?} on a {small} log: ratio {:.2}", resume_big, resume_small, resume_big.as_secs_f64() / resume_small.as_secs_f64());
        println!("  live propagation A→B at 1,000/s: p50 {p50:?}  p99 {p99:?}");
        a.stop().await.unwrap();
    });
}

/// Clients of the node at `url`, sending its owner's `token` with every call.
async fn client(
    url: &str,
    token: &str,
) -> (
    pb::log_client::LogClient<AuthChannel>,
    pb::streams_client::StreamsClient<AuthChannel>,
) {
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let channel = AuthChannel::new(channel, Bearer::new(Some(token)).unwrap());
    (
        pb::log_client::LogClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20),
        pb::streams_client::StreamsClient::new(channel),
    )
}

fn payload(index: usize) -> Bytes {
    let mut bytes = vec![(index % 251) as u8; PAYLOAD];
    bytes[..8].copy_from_slice(&(index as u64).to_be_bytes());
    Bytes::from(bytes)
}

async fn fill(node: &RunningNode, name: &str, count: usize) -> StreamId {
    let (mut log, mut streams) = client(&node.url(), node.token.as_str()).await;
    // A million scribes are far over the default 100 MiB per stream.
    let policy = pb::Policy {
        max_stream_bytes: 1 << 40,
        ..Default::default()
    };
    let info = streams
        .create(pb::CreateStreamRequest {
            name: name.into(),
            policy: Some(policy),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let stream = StreamId::from_slice(&info.stream).unwrap();
    append(&mut log, &stream, count, 0).await;
    stream
}

async fn append(
    log: &mut pb::log_client::LogClient<AuthChannel>,
    stream: &StreamId,
    count: usize,
    offset: usize,
) {
    let mut done = 0;
    while done < count {
        let batch = (count - done).min(1000);
        let appends = (0..batch)
            .map(|index| pb::AppendRequest {
                stream: Bytes::copy_from_slice(stream.as_bytes()),
                kind: "x.bench".into(),
                payload: payload(offset + done + index),
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
}

struct ChildNode {
    child: Child,
    url: String,
    /// The owner's token, from `api.token` in its data directory.
    token: String,
}

fn spawn_b(dir: &Path, peer: &str) -> ChildNode {
    use std::io::BufRead;
    let wrap = std::env::var("QUIRE_BENCH_WRAP").ok();
    let mut command = match &wrap {
        Some(wrap) => {
            let mut parts = wrap.split_whitespace();
            let mut command = Command::new(parts.next().unwrap());
            command.args(parts).arg(env!("CARGO_BIN_EXE_quire"));
            command
        }
        None => Command::new(env!("CARGO_BIN_EXE_quire")),
    };
    let mut child = command
        .args([
            "serve",
            "--api",
            "127.0.0.1:0",
            "--no-listen",
            "--peer",
            peer,
            "-d",
        ])
        .arg(dir)
        .env("QUIRE_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("quire serve printed its address")
            .unwrap();
        if let Some(url) = line.strip_prefix("client API listening on ") {
            break url.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let token = support::token_of(dir);
    ChildNode { child, url, token }
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            line.strip_prefix("VmHWM:").map(|value| {
                value
                    .trim()
                    .trim_end_matches(" kB")
                    .trim()
                    .parse()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0)
}

async fn held(b: &ChildNode, stream: &StreamId) -> u64 {
    let (_, mut streams) = client(&b.url, &b.token).await;
    streams
        .get(pb::GetStreamRequest {
            stream: Bytes::copy_from_slice(stream.as_bytes()),
        })
        .await
        .map(|info| info.into_inner().scribes)
        .unwrap_or(0)
}

/// Polls (a benchmark may) until B holds `count` scribes of `stream`.
async fn wait_for(b: &ChildNode, stream: &StreamId, count: u64) {
    while held(b, stream).await < count {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stop(mut b: ChildNode) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(b.child.id().to_string())
        .status();
    let _ = b.child.wait();
}

async fn catch_up(peer_a: &str, stream: &StreamId, count: u64) -> (f64, u64, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let b = spawn_b(dir.path(), peer_a);
    let (_, mut streams) = client(&b.url, &b.token).await;
    let started = Instant::now();
    streams
        .join(pb::JoinStreamRequest {
            stream: Bytes::copy_from_slice(stream.as_bytes()),
            timeout_ms: 60_000,
        })
        .await
        .unwrap();
    wait_for(&b, stream, count).await;
    let rate = count as f64 / started.elapsed().as_secs_f64();
    let rss = peak_rss_kib(b.child.id());
    stop(b);
    (rate, rss, dir)
}

async fn resume(
    a: &RunningNode,
    peer_a: &str,
    dir_b: &Path,
    stream: &StreamId,
    held_before: u64,
) -> Duration {
    let (mut log, _) = client(&a.url(), a.token.as_str()).await;
    append(&mut log, stream, 1_000, 10_000_000).await;
    let started = Instant::now();
    let b = spawn_b(dir_b, peer_a);
    wait_for(&b, stream, held_before + 1_000).await;
    let elapsed = started.elapsed();
    stop(b);
    elapsed
}

async fn live_latency(a: &RunningNode, peer_a: &str, count: usize) -> (Duration, Duration) {
    let (mut log_a, mut streams_a) = client(&a.url(), a.token.as_str()).await;
    let info = streams_a
        .create(pb::CreateStreamRequest {
            name: "live".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let stream = StreamId::from_slice(&info.stream).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let b = spawn_b(dir.path(), peer_a);
    let (mut log_b, mut streams_b) = client(&b.url, &b.token).await;
    streams_b
        .join(pb::JoinStreamRequest {
            stream: info.stream.clone(),
            timeout_ms: 60_000,
        })
        .await
        .unwrap();
    let mut events = log_b
        .subscribe(pb::SubscribeRequest {
            stream: info.stream.clone(),
            from_seq: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let origin = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(count);
        while latencies.len() < count {
            let Some(event) = events.message().await.unwrap() else {
                break;
            };
            if let Some(pb::subscribe_event::Event::Scribe(entry)) = event.event {
                if entry.kind != "x.live" {
                    continue;
                }
                let parts = quire::scribe::Parts {
                    envelope: entry.envelope,
                    payload: entry.payload,
                    seal: entry.seal,
                    proof: quire::scribe::Proof::from_proto(entry.proof).unwrap(),
                    leaves: None,
                    redacted_by: None,
                };
                let scribe = Scribe::decode(parts).unwrap();
                let sent = u64::from_be_bytes(scribe.body.payload[..8].try_into().unwrap());
                latencies.push(origin.elapsed().saturating_sub(Duration::from_nanos(sent)));
            }
        }
        latencies
    });
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    for _ in 0..count {
        ticker.tick().await;
        let mut payload = (origin.elapsed().as_nanos() as u64).to_be_bytes().to_vec();
        payload.resize(PAYLOAD, 0);
        log_a
            .append(pb::AppendRequest {
                stream: Bytes::copy_from_slice(stream.as_bytes()),
                kind: "x.live".into(),
                payload: Bytes::from(payload),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut latencies = receiver.await.unwrap();
    stop(b);
    latencies.sort_unstable();
    let at = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    (at(0.5), at(0.99))
}
