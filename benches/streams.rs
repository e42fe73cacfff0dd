//! Many quiet streams: does an append on one stream pay for the others?
//!
//! `cargo bench --bench streams` starts one node with a single stream and one with N quiet
//! streams (default 1,000: created, each with a `_schema`, a record and a kv key, then idle),
//! waits until every copy has caught up, then times node-signed
//! appends (`Log.Append` over gRPC, one at a time, each answered once committed) on one stream of
//! each, alternating between the two nodes so both see the same machine: p50 / p99, and the ratio.
//! It also prints the process's open file descriptors and RSS with the N streams made, and how
//! many projection copies the node keeps open of its budget (quiet ones are closed).
//! `QUIRE_BENCH_STREAMS=N` sets N; `-- --test` runs a tiny version for CI.

use std::time::{Duration, Instant};

use bytes::Bytes;
use quire::node::{NodeConfig, RunningNode};
use quire::pb;

mod support;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count())
}

async fn note(
    log: &mut pb::log_client::LogClient<quire::api::access::AuthChannel>,
    stream: &Bytes,
    kind: &str,
    payload: String,
) {
    log.append(pb::AppendRequest {
        stream: stream.clone(),
        kind: kind.into(),
        content_type: "application/json".into(),
        payload: Bytes::from(payload),
        parents: vec![],
    })
    .await
    .unwrap();
}

/// Creates `count` streams on `node`, each with a schema, a record and a kv key; returns the first.
async fn streams(node: &RunningNode, count: usize) -> Bytes {
    let channel = support::owner(node).await;
    let mut log = support::log_client(channel.clone());
    let mut first = None;
    for index in 0..count {
        let stream = support::create_stream(&channel, &format!("s{index}"), None).await;
        let schema = serde_json::json!({"schema": {"notes": {"text": "text"}}});
        pb::files_client::FilesClient::new(channel.clone())
            .put(pb::FilesPutRequest {
                stream: stream.clone(),
                path: "_schema".into(),
                content_type: "application/json".into(),
                data: Bytes::from(schema.to_string()),
            })
            .await
            .unwrap();
        note(
            &mut log,
            &stream,
            "record.add",
            serde_json::json!({"_table": "notes", "text": format!("n{index}")}).to_string(),
        )
        .await;
        pb::kv_client::KvClient::new(channel.clone())
            .set(pb::KvSetRequest {
                stream: stream.clone(),
                key: Bytes::from_static(b"k"),
                value: Bytes::from(format!("v{index}")),
            })
            .await
            .unwrap();
        first.get_or_insert(stream);
    }
    first.unwrap()
}

/// Waits until every projection copy of `node` has caught up.
async fn settled(node: &RunningNode) {
    let mut projections =
        pb::projections_client::ProjectionsClient::new(support::owner(node).await);
    loop {
        let list = projections
            .list(pb::ListProjectionsRequest::default())
            .await
            .unwrap()
            .into_inner();
        if list.projections.iter().all(|p| p.lag == 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn main() {
    let test_mode = std::env::args().any(|arg| arg == "--test");
    let many: usize = std::env::var("QUIRE_BENCH_STREAMS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(if test_mode { 20 } else { 1_000 });
    let appends = if test_mode { 100 } else { 2_000 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let loopback = || "127.0.0.1:0".parse().unwrap();
        let (dir_one, dir_many) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let one = RunningNode::start(NodeConfig::new(dir_one.path()), loopback(), None).await.unwrap();
        let one_stream = streams(&one, 1).await;
        let (fds_before, rss_before) = (open_fds(), support::rss_mib());
        let started = Instant::now();
        let busy = RunningNode::start(NodeConfig::new(dir_many.path()), loopback(), None).await.unwrap();
        let many_stream = streams(&busy, many).await;
        settled(&busy).await;
        let created = started.elapsed();
        let (fds_after, rss_after) = (open_fds(), support::rss_mib());
        let status = pb::admin_client::AdminClient::new(support::owner(&busy).await)
            .status(pb::StatusRequest::default())
            .await
            .unwrap()
            .into_inner();

        let mut log_one = support::log_client(support::owner(&one).await);
        let mut log_many = support::log_client(support::owner(&busy).await);
        let (mut with_one, mut with_many) = (Vec::new(), Vec::new());
        for index in 0..appends * 2 {
            let (log, stream, samples) = if index % 2 == 0 {
                (&mut log_one, &one_stream, &mut with_one)
            } else {
                (&mut log_many, &many_stream, &mut with_many)
            };
            let asked = Instant::now();
            note(log, stream, "x.note", format!("{{\"n\":{index}}}")).await;
            samples.push(asked.elapsed());
        }
        println!("streams benchmark (2 cores): one active stream beside {many} quiet ones");
        println!(
            "  {many} streams created (schema, record, kv key each) and every copy caught up in {created:.1?}"
        );
        println!(
            "  open fds {fds_before} -> {fds_after} ({:.1} per stream); RSS {rss_before:.0} -> {rss_after:.0} MiB",
            (fds_after.saturating_sub(fds_before)) as f64 / many as f64
        );
        println!(
            "  open-files limit {}: projection copies open {} of at most {} (the budget's share: half the limit at {} descriptors a copy)",
            rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .unwrap_or(0),
            status.open_copies,
            status.max_open_copies,
            quire::fds::FDS_PER_COPY
        );
        let (p50_one, p99_one) = (support::percentile(&mut with_one, 0.5), support::percentile(&mut with_one, 0.99));
        let (p50_many, p99_many) = (support::percentile(&mut with_many, 0.5), support::percentile(&mut with_many, 0.99));
        println!("  append beside 1 stream:      p50 {p50_one:?}  p99 {p99_one:?}");
        println!("  append beside {many} streams: p50 {p50_many:?}  p99 {p99_many:?}");
        println!(
            "  ratio (many / one): p50 {:.2}  p99 {:.2}",
            p50_many.as_secs_f64() / p50_one.as_secs_f64(),
            p99_many.as_secs_f64() / p99_one.as_secs_f64()
        );
        one.stop().await.unwrap();
        busy.stop().await.unwrap();
    });
}
