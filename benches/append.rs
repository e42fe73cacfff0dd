//! Append throughput and latency, with the two ceilings measured in the same run.
//!
//! `cargo bench --bench append` prints:
//! - quire: node-signed appends through gRPC, batches of 1000 scribes of 256-byte payloads;
//! - ceiling (a): Ed25519-signing and SHA-256-hashing the same bodies in parallel on every core;
//! - ceiling (b): raw RocksDB write batches of the same keys and values;
//! - single `Append` latency p50 / p99 with nothing else running.
//!
//! `cargo bench --bench append -- --test` runs a tiny version (CI keeps it compiling and working);
//! `-- --quire-only` measures quire alone, for profiling.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use quire::node::{NodeConfig, RunningNode};
use quire::pb;
use quire::projection_api::{AuthorKey, Kind, StreamId};
use quire::scribe::{seal_all, Body, Scribe};
use rayon::prelude::*;

mod support;

const BATCH: usize = 1000;
const PAYLOAD: usize = 256;

fn main() {
    let test_mode = std::env::args().any(|arg| arg == "--test");
    // `--quire-only`: measure quire alone (to profile it: perf record -g … -- --quire-only).
    let quire_only = std::env::args().any(|arg| arg == "--quire-only");
    let (batches, clients, latency_samples) = if test_mode {
        (2, 2, 20)
    } else {
        (200, 4, 2000)
    };
    let total = batches * BATCH;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = runtime
        .block_on(RunningNode::start(
            NodeConfig::new(dir.path()),
            "127.0.0.1:0".parse().unwrap(),
            None,
        ))
        .unwrap();
    let url = node.url();
    let token = node.token.as_str().to_string();
    let stream = runtime.block_on(async {
        let channel = support::owner(&node).await;
        StreamId::from_slice(&support::create_stream(&channel, "bench", None).await).unwrap()
    });

    // quire: `clients` connections each sending batches of 1000 back to back.
    let started = Instant::now();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for client in 0..clients {
            let (url, token) = (url.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                let channel = support::connect(url, &token).await;
                let mut log = pb::log_client::LogClient::new(channel)
                    .max_encoding_message_size(64 << 20)
                    .max_decoding_message_size(64 << 20);
                for batch in (client..batches).step_by(clients) {
                    let appends = (0..BATCH)
                        .map(|index| pb::AppendRequest {
                            stream: Bytes::copy_from_slice(stream.as_bytes()),
                            kind: "x.bench".into(),
                            content_type: "application/octet-stream".into(),
                            payload: payload(batch * BATCH + index),
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
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
    let quire_rate = total as f64 / started.elapsed().as_secs_f64();
    if quire_only {
        println!("quire AppendBatch (node-signed): {quire_rate:.0} scribes/s");
        runtime.block_on(node.stop()).unwrap();
        return;
    }

    // Ceiling (a): make the same envelopes on every core and seal each batch once, nothing else.
    let key = SigningKey::from_bytes(&[3; 32]);
    let author = AuthorKey(key.verifying_key().to_bytes());
    let started = Instant::now();
    let unsealed: Vec<_> = (0..total)
        .into_par_iter()
        .map(|index| {
            Body {
                stream: Some(stream),
                author,
                hlc: index as u64,
                kind: Kind::Custom("x.bench".into()),
                content_type: "application/octet-stream".into(),
                payload: payload(index),
                parents: vec![],
                membership: None,
                nonce: 0,
            }
            .into_unsealed(0)
        })
        .collect();
    let scribes: Vec<Scribe> = unsealed
        .chunks(BATCH)
        .flat_map(|chunk| seal_all(chunk.to_vec(), &key))
        .collect();
    let sign_rate = total as f64 / started.elapsed().as_secs_f64();

    // Ceiling (b): raw RocksDB write batches of the same keys and values as quire writes.
    let raw_dir = tempfile::tempdir().unwrap();
    let mut options = rocksdb::Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    options.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let db =
        rocksdb::DB::open_cf(&options, raw_dir.path(), ["scribes", "log", "by_stream"]).unwrap();
    let started = Instant::now();
    for (chunk_index, chunk) in scribes.chunks(BATCH).enumerate() {
        let mut batch = rocksdb::WriteBatch::default();
        for (offset, scribe) in chunk.iter().enumerate() {
            let seq = (chunk_index * BATCH + offset) as u64 + 1;
            let mut value = seq.to_be_bytes().to_vec();
            value.extend_from_slice(&scribe.envelope);
            value.extend_from_slice(&scribe.body.payload);
            batch.put_cf(
                db.cf_handle("scribes").unwrap(),
                scribe.id.as_bytes(),
                &value,
            );
            batch.put_cf(
                db.cf_handle("log").unwrap(),
                seq.to_be_bytes(),
                scribe.id.as_bytes(),
            );
            let mut stream_key = stream.as_bytes().to_vec();
            stream_key.extend_from_slice(&seq.to_be_bytes());
            batch.put_cf(
                db.cf_handle("by_stream").unwrap(),
                stream_key,
                scribe.id.as_bytes(),
            );
        }
        db.write(batch).unwrap();
    }
    let rocks_rate = total as f64 / started.elapsed().as_secs_f64();

    // Single Append latency, one at a time.
    let mut latencies = runtime.block_on(async {
        let channel = support::connect(url.clone(), &token).await;
        let mut log = pb::log_client::LogClient::new(channel);
        let mut latencies = Vec::with_capacity(latency_samples);
        for index in 0..latency_samples {
            let request = pb::AppendRequest {
                stream: Bytes::copy_from_slice(stream.as_bytes()),
                kind: "x.latency".into(),
                content_type: String::new(),
                payload: payload(index),
                parents: vec![],
            };
            let started = Instant::now();
            log.append(request).await.unwrap();
            latencies.push(started.elapsed());
        }
        latencies
    });
    latencies.sort_unstable();
    let percentile =
        |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    runtime.block_on(node.stop()).unwrap();

    println!("append benchmark: {total} scribes of {PAYLOAD}-byte payloads, batches of {BATCH}, {clients} clients, {} cores", rayon::current_num_threads());
    println!(
        "  quire AppendBatch (node-signed) {:>10.0} scribes/s",
        quire_rate
    );
    println!(
        "  ceiling (a) sign + hash         {:>10.0} scribes/s   quire / (a) = {:.2}",
        sign_rate,
        quire_rate / sign_rate
    );
    println!(
        "  ceiling (b) raw RocksDB batches {:>10.0} scribes/s   quire / (b) = {:.2}",
        rocks_rate,
        quire_rate / rocks_rate
    );
    println!(
        "  single Append latency           p50 {:?}  p99 {:?}",
        round(percentile(0.50)),
        round(percentile(0.99))
    );
}

fn payload(index: usize) -> Bytes {
    let mut bytes = vec![0u8; PAYLOAD];
    bytes[..8].copy_from_slice(&(index as u64).to_be_bytes());
    for (offset, byte) in bytes.iter_mut().enumerate().skip(8) {
        *byte = (offset as u8).wrapping_mul(31) ^ (index as u8);
    }
    Bytes::from(bytes)
}

fn round(duration: Duration) -> Duration {
    Duration::from_micros(duration.as_micros() as u64)
}
