//! The live binding under load: many WebSocket clients bound to one list page while records
//! arrive, and the latency from a record added on one node to the frame on another.
//!
//! `cargo bench --bench live` prints, in one run:
//! - 1,000 clients bound to page 0 of a list (`ORDER BY timestamp DESC`, 25 rows), 100 records/s
//!   added for 20 s: frames/s delivered, latency from sending `add_record` to each client's
//!   `insert` frame of that record (p50 / p99, over every client and record; a client that fell
//!   behind gets several inserts in one diff, and a record that was pushed off the page before
//!   the client caught up is never inserted: those are counted as not delivered), the `add_record` round trip for
//!   reference, and node A's CPU (cores busy) and RSS (before the clients, with them, peak);
//! - two nodes: a record added on B → the `insert` frame on a client of A (p50 / p99).
//!
//! The nodes are `quire serve` child processes, so their CPU and memory are their own; the
//! clients run in this process. `-- --test` runs a tiny version for CI.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

mod support;

/// A `quire serve` child: its API URL, peer address and owner's token.
struct Node {
    child: Child,
    url: String,
    peer: String,
    token: String,
}

async fn spawn_node(dir: &Path, peers: &[&str]) -> Node {
    let mut command = Command::new(env!("CARGO_BIN_EXE_quire"));
    command
        .args(["serve", "--api", "127.0.0.1:0", "--listen", "127.0.0.1:0"])
        .arg("-d")
        .arg(dir)
        .env("QUIRE_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    for peer in peers {
        command.args(["--peer", peer]);
    }
    let mut child = command.spawn().expect("spawn quire serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut url = None;
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(api) = line.strip_prefix("client API listening on ") {
            url = Some(api.trim().to_string());
        }
        if let Some(peer) = line.strip_prefix("peer listener on ") {
            let peer = peer.trim().to_string();
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            let token = support::token_of(dir);
            return Node {
                child,
                url: url.expect("the API line comes first"),
                peer,
                token,
            };
        }
    }
    panic!("quire serve exited before listening");
}

/// (user + system CPU seconds, RSS bytes, peak RSS bytes) of process `pid`.
fn usage(pid: u32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |n: usize| {
        fields
            .get(n)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields after the command: utime is the 12th, stime the 13th (from 0 after ')').
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |name: &str| {
        status
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (cpu, kib("VmRSS:"), kib("VmHWM:"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

async fn owner_post(http: &reqwest::Client, node: &Node, path: &str, body: Value) -> Value {
    let reply = http
        .post(format!("{}{path}", node.url))
        .bearer_auth(&node.token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = reply.status();
    let value: Value = reply.json().await.unwrap();
    assert!(status.is_success(), "{path}: {status} {value}");
    value
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A client bound to page 0 of list `latest`, once its `set_all` arrived.
async fn bind(node: &Node, stream: &str) -> Socket {
    let url = format!("{}/{stream}/socksync", node.url.replace("http://", "ws://"));
    // Nagle off, as a browser has it: a subscribe and a get go out at once.
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .unwrap();
    for frame in [
        json!({"func": "subscribe", "type": "list", "name": "latest"}),
        json!({"func": "get", "type": "list", "name": "latest"}),
    ] {
        socket.send(Message::Text(frame.to_string())).await.unwrap();
    }
    loop {
        let Some(Ok(Message::Text(text))) = socket.next().await else {
            panic!("the live binding closed before set_all");
        };
        let frame: Value = serde_json::from_str(&text).unwrap();
        if frame["func"] == "set_all" {
            return socket;
        }
        assert_ne!(frame["func"], "error", "{frame}");
    }
}

/// When each record (by its text) was sent.
type Sent = Arc<Mutex<HashMap<String, Instant>>>;

/// Reads `socket` until it is closed, recording the latency of every `insert` and counting
/// frames.
async fn listen(
    mut socket: Socket,
    sent: Sent,
    latencies: Arc<Mutex<Vec<Duration>>>,
    frames: Arc<AtomicU64>,
) {
    while let Some(Ok(message)) = socket.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let arrived = Instant::now();
        frames.fetch_add(1, Ordering::Relaxed);
        // Only inserts are timed: skip parsing the rest (the clients share this machine's two
        // cores with the node).
        if !text.starts_with(r#"{"func":"insert""#) && !text.contains(r#""func":"insert""#) {
            continue;
        }
        let frame: Value = serde_json::from_str(&text).unwrap();
        if frame["func"] == "insert" {
            let text = frame["value"]["text"].as_str().unwrap_or_default();
            if let Some(at) = sent.lock().unwrap().get(text) {
                latencies.lock().unwrap().push(arrived - *at);
            }
        }
    }
}

fn main() {
    let test_mode = std::env::args().any(|arg| arg == "--test");
    let (clients, rate, seconds, remote) = if test_mode {
        (20, 20, 1, 10)
    } else {
        (1_000, 100, 20, 200)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = spawn_node(dir_a.path(), &[]).await;
        let pid = a.child.id().unwrap();
        let http = reqwest::Client::new();
        let created = owner_post(&http, &a, "/create_app", json!({})).await;
        let stream = created["tid"].as_str().unwrap().to_string();
        let schema = json!({
            "schema": {"message": {"text": "text"}},
            "lists": {"latest": {"query": "SELECT id, text, timestamp FROM message ORDER BY timestamp DESC, id", "page_size": 25}}
        });
        let put = http
            .put(format!("{}/{stream}/_schema", a.url))
            .bearer_auth(&a.token)
            .body(schema.to_string())
            .send()
            .await
            .unwrap();
        assert!(put.status().is_success(), "{}", put.status());
        // A first page of 25 rows, so every new record pushes one out.
        for n in 0..25 {
            owner_post(
                &http,
                &a,
                &format!("/{stream}/add_record"),
                json!({"_table": "message", "text": format!("seed {n}")}),
            )
            .await;
        }
        let (_, rss_idle, _) = usage(pid);

        let started = Instant::now();
        let mut sockets = Vec::with_capacity(clients);
        for _ in 0..clients {
            sockets.push(bind(&a, &stream).await);
        }
        let bind_time = started.elapsed();
        let (_, rss_bound, _) = usage(pid);
        let sent: Sent = Arc::default();
        let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let counted: Arc<AtomicU64> = Arc::default();
        let listeners: Vec<_> = sockets
            .into_iter()
            .map(|socket| {
                tokio::spawn(listen(socket, sent.clone(), latencies.clone(), counted.clone()))
            })
            .collect();

        let (cpu_before, _, _) = usage(pid);
        let (own_before, _, _) = usage(std::process::id());
        let started = Instant::now();
        let records = rate * seconds;
        // Records go out on the clock, each on its own task, whatever the node's answer time.
        let mut writers = Vec::with_capacity(records);
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate as u32);
        for n in 0..records {
            tick.tick().await;
            let text = format!("record {n}");
            sent.lock().unwrap().insert(text.clone(), Instant::now());
            let (http, url, token) = (http.clone(), a.url.clone(), a.token.clone());
            let path = format!("/{stream}/add_record");
            writers.push(tokio::spawn(async move {
                let at = Instant::now();
                let reply = http
                    .post(format!("{url}{path}"))
                    .bearer_auth(token)
                    .json(&json!({"_table": "message", "text": text}))
                    .send()
                    .await
                    .unwrap();
                assert!(reply.status().is_success(), "{}", reply.status());
                at.elapsed()
            }));
        }
        let sending = started.elapsed();
        let (cpu_sent, _, _) = usage(pid);
        let (own_sent, _, _) = usage(std::process::id());
        let mut round_trips = Vec::with_capacity(records);
        for writer in writers {
            round_trips.push(writer.await.unwrap());
        }
        // Every client has every insert (or the wait gives up after 30 s and reports what came).
        let expected = clients * records;
        // Done when every insert came, or when none came for a second (a client that fell behind
        // never gets the inserts of records pushed off its page meanwhile).
        let mut last = (0, Instant::now());
        loop {
            let delivered = latencies.lock().unwrap().len();
            if delivered >= expected || last.1.elapsed() > Duration::from_secs(1) {
                break;
            }
            if delivered != last.0 {
                last = (delivered, Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = started.elapsed();
        let frames = counted.load(Ordering::Relaxed);
        let (_, rss_loaded, rss_peak) = usage(pid);
        // The 1,000 clients leave; the two-node latency is measured on its own.
        for listener in &listeners {
            listener.abort();
        }

        // Two nodes: B joins the stream; a record added on B reaches a client of A.
        let b = spawn_node(dir_b.path(), &[&a.peer]).await;
        owner_post(&http, &b, &format!("/{stream}/join_app"), json!({})).await;
        let local = bind(&a, &stream).await;
        let remote_sent: Sent = Arc::default();
        let remote_latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let remote_listener = tokio::spawn(listen(
            local,
            remote_sent.clone(),
            remote_latencies.clone(),
            Arc::default(),
        ));
        // Wait until B holds the stream's tables (its add_record works).
        let ready = Instant::now();
        loop {
            let reply = http
                .post(format!("{}/{stream}/query", b.url))
                .bearer_auth(&b.token)
                .json(&json!({"query": "SELECT count(*) FROM message"}))
                .send()
                .await
                .unwrap();
            if reply.status().is_success() {
                break;
            }
            assert!(ready.elapsed() < Duration::from_secs(60), "B never caught up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for n in 0..remote {
            tick.tick().await;
            let text = format!("from b {n}");
            remote_sent.lock().unwrap().insert(text.clone(), Instant::now());
            owner_post(
                &http,
                &b,
                &format!("/{stream}/add_record"),
                json!({"_table": "message", "text": text}),
            )
            .await;
        }
        let waited = Instant::now();
        while remote_latencies.lock().unwrap().len() < remote && waited.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        drop(a);
        drop(b);
        for listener in listeners {
            let _ = listener.await;
        }
        let _ = remote_listener.await;
        let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
        let mut remote_latencies = std::mem::take(&mut *remote_latencies.lock().unwrap());
        let delivered = latencies.len();
        println!("live binding, {clients} clients on one list page, {rate} records/s for {seconds} s (sent in {:.1} s):", sending.as_secs_f64());
        println!("  {clients} clients bound in {:.2} s", bind_time.as_secs_f64());
        println!(
            "  inserts delivered: {delivered} of {expected}; frames: {frames} ({:.0} frames/s)",
            frames as f64 / elapsed.as_secs_f64()
        );
        println!(
            "  add_record sent -> insert frame: p50 {:.2} ms, p99 {:.2} ms (add_record round trip p50 {:.2} ms)",
            support::percentile(&mut latencies, 0.5).as_secs_f64() * 1e3,
            support::percentile(&mut latencies, 0.99).as_secs_f64() * 1e3,
            support::percentile(&mut round_trips, 0.5).as_secs_f64() * 1e3,
        );
        println!(
            "  while sending: the clients (this process) {:.2} cores busy, node A {:.2} cores busy\n  node A RSS {:.1} MiB idle, {:.1} MiB with the clients, {:.1} MiB after the load (peak {:.1} MiB)",
            (own_sent - own_before) / sending.as_secs_f64(),
            (cpu_sent - cpu_before) / sending.as_secs_f64(),
            mib(rss_idle),
            mib(rss_bound),
            mib(rss_loaded),
            mib(rss_peak),
        );
        println!(
            "two nodes: record added on B -> insert frame on a client of A ({} of {remote}): p50 {:.2} ms, p99 {:.2} ms",
            remote_latencies.len(),
            support::percentile(&mut remote_latencies, 0.5).as_secs_f64() * 1e3,
            support::percentile(&mut remote_latencies, 0.99).as_secs_f64() * 1e3,
        );
    });
}
