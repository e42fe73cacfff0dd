//! Projection runner overhead: a rebuild of a no-op projector over the whole log, against a bare
//! sequential read of the same log, in the same run.
//!
//! `cargo bench --bench projection` writes 1,000,000 scribes (64-byte payloads) through a node,
//! stops it, and on its data directory measures:
//! - bare read: `Store::read_log` in chunks from seq 1 to the head, touching every scribe's bytes;
//! - runner: `projection::rebuild_offline` of a projector whose `apply` only records the
//!   checkpoint (so what is timed is the runner: reading, decoding each scribe into the
//!   projector's view, batching, the slot bookkeeping and the swap);
//! - for reference, the same rebuild of the example `latest` projector (a real one, fsyncing a
//!   state file per batch).
//!
//! Target: runner rate / bare read rate ≥ 0.8. `-- --test` runs a tiny version for CI.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use quire::log::store::Store;
use quire::node::{NodeConfig, RunningNode};
use quire::pb;
use quire::projection;
use quire::projection_api::{ApplyError, Place, Plugin, ProjectionError, Projector, Scope, Scribe};

mod support;

const BATCH: usize = 1000;

struct Noop;

impl Plugin for Noop {
    fn name(&self) -> &str {
        "noop"
    }
    fn fingerprint(&self) -> String {
        "noop v1".into()
    }
    fn scope(&self) -> Scope {
        Scope::Log
    }
    fn open(&self, _place: &Place) -> Result<Box<dyn Projector>, ProjectionError> {
        Ok(Box::new(NoopProjector { checkpoint: 0 }))
    }
}

struct NoopProjector {
    checkpoint: u64,
}

impl Projector for NoopProjector {
    fn apply(&mut self, _batch: &[Scribe], checkpoint: u64) -> Result<(), ApplyError> {
        self.checkpoint = checkpoint;
        Ok(())
    }
    fn checkpoint(&self) -> Result<u64, ProjectionError> {
        Ok(self.checkpoint)
    }
    fn reset(&mut self) -> Result<(), ProjectionError> {
        self.checkpoint = 0;
        Ok(())
    }
    fn digest(&self) -> Result<[u8; 32], ProjectionError> {
        Ok([0; 32])
    }
}

fn main() {
    let test_mode = std::env::args().any(|arg| arg == "--test");
    let batches = if test_mode { 2 } else { 1000 };
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), batches);
    let store = Store::open(&quire::log::store_path(dir.path()), false).unwrap();
    let head = store.head().unwrap();

    // Warm the OS page cache and RocksDB's block cache alike for both measurements.
    let _ = bare_read(&store, head);
    let started = Instant::now();
    let bytes = bare_read(&store, head);
    let read_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    projection::rebuild_offline(&store, dir.path(), Arc::new(Noop), None, |_, _| {}).unwrap();
    let noop_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    projection::rebuild_offline(
        &store,
        dir.path(),
        Arc::new(quire_example_latest::Latest::new()),
        None,
        |_, _| {},
    )
    .unwrap();
    let latest_seconds = started.elapsed().as_secs_f64();

    let rate = |seconds: f64| head as f64 / seconds;
    println!("log: {head} scribes, {bytes} bytes");
    println!(
        "bare sequential read:       {:>10.0} scribes/s",
        rate(read_seconds)
    );
    println!(
        "rebuild, no-op projector:   {:>10.0} scribes/s  (ratio to bare read {:.2}, target >= 0.8)",
        rate(noop_seconds),
        read_seconds / noop_seconds
    );
    println!(
        "rebuild, example `latest`:  {:>10.0} scribes/s  (ratio to bare read {:.2})",
        rate(latest_seconds),
        read_seconds / latest_seconds
    );
}

/// Reads every scribe from seq 1 to `head` in chunks; returns the bytes seen.
fn bare_read(store: &Store, head: u64) -> u64 {
    let mut next = 1;
    let mut bytes = 0u64;
    while next <= head {
        let entries = store
            .read_log(next, head, 2048, usize::MAX)
            .unwrap()
            .entries;
        let last = entries.last().expect("the log is gapless").seq;
        bytes += entries.iter().map(|e| e.parts.size()).sum::<u64>();
        next = last + 1;
    }
    bytes
}

fn write_log(dir: &std::path::Path, batches: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let node = RunningNode::start(NodeConfig::new(dir), "127.0.0.1:0".parse().unwrap(), None)
            .await
            .unwrap();
        let channel = support::owner(&node).await;
        let stream = support::create_stream(&channel, "bench", Some(support::unlimited())).await;
        let mut log = pb::log_client::LogClient::new(channel)
            .max_encoding_message_size(64 << 20)
            .max_decoding_message_size(64 << 20);
        for batch in 0..batches {
            let appends = (0..BATCH)
                .map(|index| pb::AppendRequest {
                    stream: stream.clone(),
                    kind: if index % 2 == 0 { "x.even" } else { "x.odd" }.into(),
                    content_type: "application/octet-stream".into(),
                    payload: Bytes::from(format!("{:064}", batch * BATCH + index)),
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
        node.stop().await.unwrap();
    });
}
