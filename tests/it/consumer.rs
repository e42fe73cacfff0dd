//! Durable consumers (`Log.Subscribe { consumer }` + `Log.Ack`): the node resumes a consumer after
//! its last ack, refuses acks and subscriptions that make no sense, and `Projections.Rebuild`
//! starts a consumer over. The Python example in `examples/python-consumer` is killed mid-stream
//! and resumed, and counts every scribe exactly once. The Python test needs `pip install grpcio
//! grpcio-tools`, like `python.rs`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use quire::pb;
use quire::pb::subscribe_event::Event;
use quire::projection_api::StreamId;
use tokio::process::Command;

use crate::common::*;
use crate::python::python_stubs;
use quire::api::access::AuthChannel;

const TIMEOUT: Duration = Duration::from_secs(60);

async fn projections(url: &str) -> pb::projections_client::ProjectionsClient<AuthChannel> {
    pb::projections_client::ProjectionsClient::new(owner_channel(url).await)
}

/// The consumer `name` as `Projections.List` shows it, if the node knows it.
async fn consumer_status(url: &str, name: &str) -> Option<pb::ProjectionStatus> {
    projections(url)
        .await
        .list(pb::ListProjectionsRequest::default())
        .await
        .expect("list projections")
        .into_inner()
        .projections
        .into_iter()
        .find(|status| status.kind == "consumer" && status.name == name)
}

/// The seq `name` has acknowledged (0: none, or unknown).
async fn acked(url: &str, name: &str) -> u64 {
    consumer_status(url, name)
        .await
        .map(|status| status.checkpoint)
        .unwrap_or(0)
}

fn subscribe_request(stream: &StreamId, consumer: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        stream: bytes_of(stream),
        from_seq: 0,
        consumer: consumer.into(),
    }
}

async fn subscribe(
    clients: &mut Clients,
    stream: &StreamId,
    consumer: &str,
) -> tonic::Streaming<pb::SubscribeEvent> {
    clients
        .log
        .subscribe(subscribe_request(stream, consumer))
        .await
        .expect("subscribe as a consumer")
        .into_inner()
}

/// The next event of a subscription, which must be a scribe.
async fn next_scribe(events: &mut tonic::Streaming<pb::SubscribeEvent>) -> pb::Entry {
    let event = tokio::time::timeout(TIMEOUT, events.message())
        .await
        .expect("an event in time")
        .expect("subscription ok")
        .expect("subscription open");
    match event.event {
        Some(Event::Scribe(entry)) => entry,
        other => panic!("expected a scribe, got {other:?}"),
    }
}

async fn ack(clients: &mut Clients, consumer: &str, seq: u64) -> Result<u64, tonic::Status> {
    clients
        .log
        .ack(pb::AckRequest {
            consumer: consumer.into(),
            seq,
        })
        .await
        .map(|reply| reply.into_inner().acked)
}

fn assert_invalid<T: std::fmt::Debug>(result: Result<T, tonic::Status>, what: &str) {
    match result {
        Err(status) => assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status:?}"
        ),
        Ok(value) => panic!("{what} was accepted: {value:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_consumer_resumes_after_its_last_ack() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let url = node.url();
    let mut clients = clients(&url).await;
    let stream = create_stream(&mut clients, "consumed", None).await;
    let other = create_stream(&mut clients, "other", None).await;
    for index in 0..6 {
        append_note(&mut clients, &stream, &format!("note {index}")).await;
    }

    // A new consumer starts at the stream's beginning: its genesis.
    let mut events = subscribe(&mut clients, &stream, "c1").await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_scribe(&mut events).await);
    }
    assert_eq!(seen[0].kind, "stream.create");
    assert!(seen.iter().all(|entry| entry.stream == bytes_of(&stream)));
    let k = seen[2].seq;
    assert_eq!(ack(&mut clients, "c1", k).await.unwrap(), k);
    drop(events);
    let status = consumer_status(&url, "c1").await.expect("c1 is listed");
    assert_eq!(status.checkpoint, k);
    assert_eq!(status.stream, bytes_of(&stream));

    // The same name resumes right after the ack.
    let mut events = subscribe(&mut clients, &stream, "c1").await;
    let first = next_scribe(&mut events).await;
    assert_eq!(first.seq, k + 1, "resumes after the last ack");
    assert_eq!(first.id, seen[3].id);
    drop(events);

    // Acks beyond the head, of unknown consumers, from_seq with a consumer, another scope, and bad
    // names are refused.
    let head = head(&mut clients).await;
    assert_invalid(
        ack(&mut clients, "c1", head + 100).await,
        "an ack beyond the head",
    );
    let unknown = ack(&mut clients, "nobody", 1).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    assert!(
        unknown
            .message()
            .contains("subscribe with that consumer name first"),
        "{unknown:?}"
    );
    // Nor beyond the consumer's own stream: the other stream's scribe came later.
    let elsewhere = append_note(&mut clients, &other, "elsewhere").await;
    assert_invalid(
        ack(&mut clients, "c1", elsewhere.seq).await,
        "an ack beyond the consumer's stream",
    );
    assert_invalid(
        clients
            .log
            .subscribe(pb::SubscribeRequest {
                from_seq: 5,
                ..subscribe_request(&stream, "c1")
            })
            .await,
        "a consumer subscription with from_seq",
    );
    assert_invalid(
        clients.log.subscribe(subscribe_request(&other, "c1")).await,
        "the consumer on another stream",
    );
    assert_invalid(
        clients
            .log
            .subscribe(pb::SubscribeRequest {
                stream: Bytes::new(),
                ..subscribe_request(&stream, "c1")
            })
            .await,
        "the consumer on the whole log",
    );
    assert_invalid(
        clients
            .log
            .subscribe(subscribe_request(&stream, "no spaces!"))
            .await,
        "a bad consumer name",
    );
    assert_eq!(acked(&url, "c1").await, k, "refusals changed nothing");

    // Acks never move backwards.
    let high = k + 2;
    assert_eq!(ack(&mut clients, "c1", high).await.unwrap(), high);
    assert_eq!(
        ack(&mut clients, "c1", k - 1).await.unwrap(),
        high,
        "a lower ack leaves the ack unchanged"
    );
    assert_eq!(ack(&mut clients, "c1", high).await.unwrap(), high);
    assert_eq!(acked(&url, "c1").await, high);
    let mut events = subscribe(&mut clients, &stream, "c1").await;
    assert_eq!(next_scribe(&mut events).await.seq, high + 1);
    drop(events);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilding_a_consumer_starts_it_over() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let url = node.url();
    let mut clients = clients(&url).await;
    // Another stream first, so the consumed stream does not start at log seq 1.
    let before = create_stream(&mut clients, "before", None).await;
    append_note(&mut clients, &before, "elsewhere").await;
    let stream = create_stream(&mut clients, "consumed", None).await;
    for index in 0..5 {
        append_note(&mut clients, &stream, &format!("note {index}")).await;
    }
    let genesis_seq = clients
        .streams
        .get(pb::GetStreamRequest {
            stream: bytes_of(&stream),
        })
        .await
        .unwrap()
        .into_inner()
        .genesis_seq;

    let mut events = subscribe(&mut clients, &stream, "c1").await;
    let genesis = next_scribe(&mut events).await;
    assert_eq!(
        (genesis.seq, genesis.kind.as_str()),
        (genesis_seq, "stream.create")
    );
    let mut last = genesis.seq;
    for _ in 0..4 {
        last = next_scribe(&mut events).await.seq;
        assert_eq!(ack(&mut clients, "c1", last).await.unwrap(), last);
    }
    drop(events);
    assert_eq!(acked(&url, "c1").await, last);

    let started = projections(&url)
        .await
        .rebuild(pb::RebuildRequest {
            name: "c1".into(),
            stream: Bytes::new(),
        })
        .await
        .expect("rebuild a consumer")
        .into_inner()
        .projections;
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(
        (started[0].kind.as_str(), started[0].checkpoint),
        ("consumer", 0)
    );
    assert_eq!(acked(&url, "c1").await, 0);

    // Starts over from the stream's first scribe, its genesis.
    let mut events = subscribe(&mut clients, &stream, "c1").await;
    let first = next_scribe(&mut events).await;
    assert_eq!(first.seq, genesis_seq);
    assert_eq!(first.id, genesis.id);
    drop(events);

    // Unknown names are not silently accepted.
    let status = projections(&url)
        .await
        .rebuild(pb::RebuildRequest {
            name: "nobody".into(),
            stream: Bytes::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    node.stop().await.unwrap();
}

/// `python3 consumer.py` following `stream` of the node at `node` as `name`, with `extra` flags.
struct PythonConsumer {
    script: PathBuf,
    stubs: PathBuf,
    node: String,
    stream: String,
    name: String,
    db: PathBuf,
}

impl PythonConsumer {
    fn command(&self, extra: &[&str]) -> Command {
        let mut command = Command::new("python3");
        command
            .arg(&self.script)
            .args(["--node", &self.node, "--name", &self.name, "--stream"])
            .arg(&self.stream)
            .arg("--db")
            .arg(&self.db)
            .args(extra)
            .env("PYTHONPATH", &self.stubs)
            // A durable consumer keeps its cursor on the node: the owner's call.
            .env(
                "QUIRE_TOKEN",
                token_of(&format!("http://{}", self.node)).expect("the test started the node"),
            )
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Runs to completion; returns stdout.
    async fn run(&self, extra: &[&str]) -> String {
        let output = tokio::time::timeout(TIMEOUT, self.command(extra).output())
            .await
            .expect("consumer.py finishes in time")
            .expect("run consumer.py");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "consumer.py {extra:?} failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_consumer_resumes_from_its_checkpoint_after_being_killed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stubs = python_stubs(root);
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let url = node.url();
    let mut clients = clients(&url).await;
    let stream = create_stream(&mut clients, "projected", None).await;
    for index in 0..30 {
        append_note(&mut clients, &stream, &format!("note {index}")).await;
    }
    let state = tempfile::tempdir().unwrap();
    let consumer = PythonConsumer {
        script: root.join("examples/python-consumer/consumer.py"),
        stubs: stubs.path().to_path_buf(),
        node: node.api_addr.to_string(),
        stream: stream.to_hex(),
        name: "py-counter".into(),
        db: state.path().join("counts.sqlite"),
    };

    // A first run counts 10 scribes, acks each, and exits.
    let stdout = consumer.run(&["--exit-after", "10"]).await;
    assert!(!stdout.contains("caught up"), "{stdout}");
    assert_eq!(acked(&url, "py-counter").await, 10);

    // Starting the consumer over on the node (but not in its own database) redelivers the 10
    // scribes it already counted, exactly as a crash between its commit and its ack would: its
    // checkpoint must skip them.
    projections(&url)
        .await
        .rebuild(pb::RebuildRequest {
            name: "py-counter".into(),
            stream: Bytes::new(),
        })
        .await
        .expect("reset the consumer's ack");
    assert_eq!(acked(&url, "py-counter").await, 0);

    // A second run is SIGKILLed once it has acknowledged 20.
    let mut child = consumer
        .command(&[])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn consumer.py");
    wait_until(TIMEOUT, "consumer.py to acknowledge seq 20", || {
        let url = url.clone();
        async move { acked(&url, "py-counter").await >= 20 }
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "consumer.py exited on its own"
    );
    child.kill().await.unwrap(); // SIGKILL, and reaped
    let killed_at = acked(&url, "py-counter").await;
    assert!(killed_at >= 20, "acked {killed_at}");

    // 15 more while it is down, then a third run until it has counted up to the last one.
    let mut last = 0;
    for index in 0..15 {
        last = append_note(&mut clients, &stream, &format!("later {index}"))
            .await
            .seq;
    }
    let stdout = consumer
        .run(&["--until-seq", &last.to_string(), "--print-counts"])
        .await;
    assert_eq!(acked(&url, "py-counter").await, last);
    let counts: serde_json::Value = serde_json::from_str(
        stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("no counts printed:\n{stdout}")),
    )
    .unwrap_or_else(|error| panic!("counts are not JSON ({error}):\n{stdout}"));
    assert_eq!(
        counts,
        serde_json::json!({"stream.create": 1, "x.note": 45}),
        "every scribe counted exactly once (killed after ack {killed_at})"
    );

    // Caught up and resumed again: nothing new, nothing counted twice.
    let stdout = consumer
        .run(&["--until-seq", &last.to_string(), "--print-counts"])
        .await;
    assert!(
        stdout.contains(&format!("caught up at seq {last}")),
        "{stdout}"
    );
    let counts: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        counts,
        serde_json::json!({"stream.create": 1, "x.note": 45})
    );
    node.stop().await.unwrap();
}
