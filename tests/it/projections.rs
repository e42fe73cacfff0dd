//! The projection runner end to end: catch-up and live follow, the quarantine (park, retry after
//! the fault is fixed, skip, halt), blue/green rebuilds that never stop the live copy from
//! answering, automatic rebuilds on a fingerprint change, and SIGKILL during catch-up and during a
//! rebuild (a real child process: the example binary `latest-node`).
//!
//! The projector under test is the example plugin `latest` (`examples/latest`), wrapped here by
//! [`TestPlugin`] to inject faults and to hold a rebuild at a gate.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quire::log::store::Store;
use quire::node::{NodeConfig, RunningNode};
use quire::pb;
use quire::projection::{self, Registry};
use quire::projection_api::{
    ApplyError, OnFailure, Place, Plugin, ProjectionError, Projector, Scope, Scribe, StreamId,
};
use quire_example_latest::Latest;

use crate::common::*;
use crate::crash::spawn_binary;
use quire::api::access::AuthChannel;

const WAIT: Duration = Duration::from_secs(60);

/// Switches the tests turn: refuse `x.flaky` scribes, and hold rebuilt (generation > 1) copies
/// before each batch.
#[derive(Default)]
struct Hooks {
    broken: AtomicBool,
    panics: AtomicBool,
    gate_closed: Mutex<bool>,
    gate: Condvar,
}

impl Hooks {
    fn close_gate(&self) {
        *self.gate_closed.lock().unwrap() = true;
    }
    fn open_gate(&self) {
        *self.gate_closed.lock().unwrap() = false;
        self.gate.notify_all();
    }
}

/// `latest` under another name, fingerprint or failure policy, with [`Hooks`].
struct TestPlugin {
    name: &'static str,
    fingerprint: String,
    on_failure: OnFailure,
    scope: Scope,
    hooks: Arc<Hooks>,
}

impl TestPlugin {
    fn new(hooks: &Arc<Hooks>) -> TestPlugin {
        TestPlugin {
            name: "latest",
            fingerprint: Latest::new().fingerprint(),
            on_failure: OnFailure::Quarantine,
            scope: Scope::Log,
            hooks: hooks.clone(),
        }
    }
}

impl TestPlugin {
    /// `latest` named "halting", with the policy of stopping at a scribe it cannot apply.
    fn halting(hooks: &Arc<Hooks>) -> TestPlugin {
        TestPlugin {
            name: "halting",
            on_failure: OnFailure::Halt,
            ..TestPlugin::new(hooks)
        }
    }
}

impl Plugin for TestPlugin {
    fn name(&self) -> &str {
        self.name
    }
    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }
    fn scope(&self) -> Scope {
        self.scope
    }
    fn on_failure(&self) -> OnFailure {
        self.on_failure
    }
    fn open(&self, place: &Place) -> Result<Box<dyn Projector>, ProjectionError> {
        let generation: u64 = place
            .dir
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.parse().ok())
            .unwrap_or(0);
        Ok(Box::new(TestProjector {
            inner: Latest::new().open(place)?,
            hooks: self.hooks.clone(),
            rebuilt: generation > 1,
        }))
    }
}

struct TestProjector {
    inner: Box<dyn Projector>,
    hooks: Arc<Hooks>,
    rebuilt: bool,
}

impl Projector for TestProjector {
    fn apply(&mut self, batch: &[Scribe], checkpoint: u64) -> Result<(), ApplyError> {
        if self.rebuilt && !batch.is_empty() {
            let closed = self.hooks.gate_closed.lock().unwrap();
            drop(
                self.hooks
                    .gate
                    .wait_while(closed, |closed| *closed)
                    .unwrap(),
            );
        }
        if self.hooks.panics.load(Ordering::SeqCst)
            && batch.iter().any(|s| s.kind.as_str() == "x.panic")
        {
            panic!("the test made this projector panic");
        }
        if self.hooks.broken.load(Ordering::SeqCst) {
            if let Some(index) = batch.iter().position(|s| s.kind.as_str() == "x.flaky") {
                return Err(ApplyError::Scribe {
                    index,
                    reason: "flaky: the test broke this projector".into(),
                });
            }
        }
        self.inner.apply(batch, checkpoint)
    }
    fn checkpoint(&self) -> Result<u64, ProjectionError> {
        self.inner.checkpoint()
    }
    fn reset(&mut self) -> Result<(), ProjectionError> {
        self.inner.reset()
    }
    fn digest(&self) -> Result<[u8; 32], ProjectionError> {
        self.inner.digest()
    }
}

async fn start_with(dir: &Path, plugin: TestPlugin) -> RunningNode {
    let mut config = NodeConfig::new(dir);
    config.registry = Registry::builtin().with(plugin);
    start_config(config, false).await
}

async fn projections_client(url: &str) -> pb::projections_client::ProjectionsClient<AuthChannel> {
    let channel = owner_channel(url).await;
    pb::projections_client::ProjectionsClient::new(channel)
}

async fn status_of(
    client: &mut pb::projections_client::ProjectionsClient<AuthChannel>,
    name: &str,
) -> pb::ProjectionStatus {
    list_all(client)
        .await
        .into_iter()
        .find(|status| status.name == name)
        .unwrap_or_else(|| panic!("no projection {name}"))
}

fn stream_field(stream: Option<&StreamId>) -> Bytes {
    stream.map(bytes_of).unwrap_or_default()
}

async fn digest_in(
    client: &mut pb::projections_client::ProjectionsClient<AuthChannel>,
    name: &str,
    stream: Option<&StreamId>,
) -> Result<Bytes, tonic::Status> {
    Ok(client
        .digest(pb::DigestRequest {
            name: name.into(),
            stream: stream_field(stream),
        })
        .await?
        .into_inner()
        .digest)
}

async fn rebuild(
    client: &mut pb::projections_client::ProjectionsClient<AuthChannel>,
    name: &str,
    stream: Option<&StreamId>,
) -> Result<Vec<pb::ProjectionStatus>, tonic::Status> {
    Ok(client
        .rebuild(pb::RebuildRequest {
            name: name.into(),
            stream: stream_field(stream),
        })
        .await?
        .into_inner()
        .projections)
}

/// Every projection but the built-in ones (the node runs `kv` beside the projector under test).
async fn list_all(
    client: &mut pb::projections_client::ProjectionsClient<AuthChannel>,
) -> Vec<pb::ProjectionStatus> {
    client
        .list(pb::ListProjectionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .projections
        .into_iter()
        // The built-in projectors (kv, sql) run on every node; these tests look at their own.
        .filter(|status| Registry::builtin().get(&status.name).is_none())
        .collect()
}

/// `result` is refused with `code`, and its message mentions `needle`.
fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    needle: &str,
) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(needle), "{status:?}");
}

async fn digest_of(
    client: &mut pb::projections_client::ProjectionsClient<AuthChannel>,
    name: &str,
) -> Bytes {
    digest_in(client, name, None).await.unwrap()
}

/// Waits until `name` has applied everything up to the head and no rebuild is under way.
async fn wait_caught_up(url: &str, name: &str) {
    let client = projections_client(url).await;
    let mut clients = clients(url).await;
    wait_until(WAIT, &format!("{name} to catch up"), || {
        let mut client = client.clone();
        let mut clients_admin = clients.admin.clone();
        async move {
            let head = clients_admin
                .status(pb::StatusRequest::default())
                .await
                .unwrap()
                .into_inner()
                .head_seq;
            let status = status_of(&mut client, name).await;
            status.checkpoint == head && status.lag == 0 && status.rebuild.is_none()
        }
    })
    .await;
    let _ = &mut clients;
}

/// The digest of a clean replay of the whole log into a scratch directory.
fn clean_digest(data_dir: &Path) -> [u8; 32] {
    let store = Store::open_read_only(&quire::log::store_path(data_dir)).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let results = projection::replay(
        &store,
        &Latest::new(),
        None,
        scratch.path(),
        1,
        u64::MAX,
        |_| {},
    )
    .unwrap();
    results[0].digest
}

fn generations(data_dir: &Path, name: &str) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(data_dir.join("projections").join(name).join("log"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
    names.sort();
    names
}

async fn append_kind(
    clients: &mut Clients,
    stream: &StreamId,
    kind: &str,
    payload: &[u8],
) -> pb::AppendReply {
    clients
        .log
        .append(pb::AppendRequest {
            stream: bytes_of(stream),
            kind: kind.into(),
            content_type: "text/plain".into(),
            payload: Bytes::copy_from_slice(payload),
            parents: vec![],
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_catches_up_then_follows_and_equals_a_clean_replay() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Arc::new(Hooks::default());
    let node = start_with(dir.path(), TestPlugin::new(&hooks)).await;
    let url = node.url();
    let mut clients = clients(&url).await;
    let stream = create_stream(&mut clients, "projected", None).await;
    append_bulk(&mut clients, &stream, 5000).await;
    wait_caught_up(&url, "latest").await;
    let note = append_note(&mut clients, &stream, "live").await;
    wait_caught_up(&url, "latest").await;

    let mut client = projections_client(&url).await;
    let status = status_of(&mut client, "latest").await;
    assert_eq!(status.kind, "projector");
    assert_eq!(status.generation, 1);
    assert_eq!(status.checkpoint, note.seq);
    assert_eq!(status.quarantined, 0);
    // Admin.Status shows the same projections.
    let node_status = clients
        .admin
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(node_status
        .projections
        .iter()
        .any(|p| p.name == "latest" && p.lag == 0));

    let (checkpoint, entries) =
        quire_example_latest::read_state(&dir.path().join("projections/latest/log/1")).unwrap();
    assert_eq!(checkpoint, note.seq);
    let kinds: Vec<&str> = entries.iter().map(|e| e.kind.as_str()).collect();
    assert!(
        kinds.contains(&"x.bulk") && kinds.contains(&"x.note") && kinds.contains(&"stream.create"),
        "{kinds:?}"
    );
    let digest = digest_of(&mut client, "latest").await;
    assert_eq!(digest.as_ref(), clean_digest(dir.path()));

    // Clear errors, and nothing changes.
    let unknown = digest_in(&mut client, "nope", None).await;
    assert_refused(unknown, tonic::Code::NotFound, "latest");
    let scoped = digest_in(&mut client, "latest", Some(&stream)).await;
    assert_refused(scoped, tonic::Code::InvalidArgument, "whole log");
    let unnamed = rebuild(&mut client, "", None).await;
    assert_refused(unnamed, tonic::Code::InvalidArgument, "name the projection");
    assert_eq!(status_of(&mut client, "latest").await.generation, 1);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_scribe_is_quarantined_the_rest_applied_and_retry_applies_it_after_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Arc::new(Hooks::default());
    hooks.broken.store(true, Ordering::SeqCst);
    let node = start_with(dir.path(), TestPlugin::new(&hooks)).await;
    let url = node.url();
    let mut clients = clients(&url).await;
    let stream = create_stream(&mut clients, "flaky", None).await;
    append_note(&mut clients, &stream, "before").await;
    let flaky = append_kind(&mut clients, &stream, "x.flaky", b"boom").await;
    let after = append_note(&mut clients, &stream, "after").await;
    wait_caught_up(&url, "latest").await;
    let head_before = head(&mut clients).await;

    let mut client = projections_client(&url).await;
    let status = status_of(&mut client, "latest").await;
    assert_eq!(status.quarantined, 1);
    assert_eq!(
        status.checkpoint, after.seq,
        "the scribes after it were applied"
    );
    let parked = client
        .quarantined(pb::QuarantinedRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].id, flaky.id);
    assert_eq!(parked[0].seq, flaky.seq);
    assert_eq!(parked[0].state, "parked");
    assert!(parked[0].error.contains("flaky"), "{}", parked[0].error);
    let state_dir = dir.path().join("projections/latest/log/1");
    let kinds = |dir: &Path| -> Vec<String> {
        quire_example_latest::read_state(dir)
            .unwrap()
            .1
            .into_iter()
            .map(|e| e.kind.to_string())
            .collect()
    };
    assert!(!kinds(&state_dir).contains(&"x.flaky".to_string()));
    assert!(kinds(&state_dir).contains(&"x.note".to_string()));

    // Still broken: retry says so and it stays parked.
    let request = pb::QuarantineActionRequest {
        id: flaky.id.clone(),
        name: String::new(),
    };
    let still = client.retry(request.clone()).await.unwrap_err();
    assert_eq!(still.code(), tonic::Code::FailedPrecondition);
    assert!(
        still.message().contains("still fails"),
        "{}",
        still.message()
    );
    assert_eq!(status_of(&mut client, "latest").await.quarantined, 1);

    // Fixed: retry applies it, the quarantine empties, the log is untouched.
    hooks.broken.store(false, Ordering::SeqCst);
    let retried = client.retry(request).await.unwrap().into_inner().entries;
    assert_eq!(retried.len(), 1);
    assert!(kinds(&state_dir).contains(&"x.flaky".to_string()));
    assert_eq!(status_of(&mut client, "latest").await.quarantined, 0);
    assert!(client
        .quarantined(pb::QuarantinedRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries
        .is_empty());
    assert_eq!(head(&mut clients).await, head_before);
    assert_eq!(
        digest_of(&mut client, "latest").await.as_ref(),
        clean_digest(dir.path())
    );

    let missing = client
        .skip(pb::QuarantineActionRequest {
            id: flaky.id.clone(),
            name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halting_projector_stops_at_the_bad_scribe_until_it_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Arc::new(Hooks::default());
    let node = start_with(dir.path(), TestPlugin::halting(&hooks)).await;
    let url = node.url();
    let mut clients = clients(&url).await;
    let stream = create_stream(&mut clients, "halts", None).await;
    append_note(&mut clients, &stream, "one").await;
    let poison = append_kind(&mut clients, &stream, "x.fail-latest", b"poison").await;
    let last = append_note(&mut clients, &stream, "two").await;
    let mut client = projections_client(&url).await;
    wait_until(WAIT, "the projection to halt", || {
        let mut client = client.clone();
        async move { status_of(&mut client, "halting").await.halted_seq == poison.seq }
    })
    .await;
    let status = status_of(&mut client, "halting").await;
    assert_eq!(
        status.checkpoint,
        poison.seq - 1,
        "halted before the bad scribe"
    );
    assert!(status.halted.contains("poison"), "{}", status.halted);
    assert_eq!(status.quarantined, 1);

    let skipped = client
        .skip(pb::QuarantineActionRequest {
            id: poison.id.clone(),
            name: "halting".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(skipped[0].state, "skipped");
    wait_until(WAIT, "the projection to go on after the skip", || {
        let mut client = client.clone();
        async move {
            let status = status_of(&mut client, "halting").await;
            status.checkpoint == last.seq && status.halted.is_empty()
        }
    })
    .await;
    let entries = client
        .quarantined(pb::QuarantinedRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].state, "skipped", "the decision is recorded");
    assert_eq!(status_of(&mut client, "halting").await.quarantined, 0);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_the_live_copy_keep_succeeding_during_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Arc::new(Hooks::default());
    let node = start_with(dir.path(), TestPlugin::new(&hooks)).await;
    let url = node.url();
    let mut clients = clients(&url).await;
    let stream = create_stream(&mut clients, "rebuilt", None).await;
    append_bulk(&mut clients, &stream, 3000).await;
    wait_caught_up(&url, "latest").await;
    let mut client = projections_client(&url).await;
    let before = digest_of(&mut client, "latest").await;

    // Hold the shadow copy at its first batch, so the rebuild is certainly under way.
    hooks.close_gate();
    let started = rebuild(&mut client, "latest", None).await.unwrap();
    assert_eq!(started[0].rebuild.as_ref().unwrap().generation, 2);
    for _ in 0..20 {
        assert_eq!(
            digest_of(&mut client, "latest").await,
            before,
            "the live copy answers, unchanged"
        );
        let status = status_of(&mut client, "latest").await;
        assert!(status.rebuild.is_some());
        assert_eq!(status.generation, 1);
    }
    assert_eq!(generations(dir.path(), "latest"), ["1", "2"]);
    hooks.open_gate();
    wait_caught_up(&url, "latest").await;
    let status = status_of(&mut client, "latest").await;
    assert_eq!(status.generation, 2);
    assert_eq!(digest_of(&mut client, "latest").await, before);
    assert_eq!(
        generations(dir.path(), "latest"),
        ["2"],
        "the old copy is removed"
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_fingerprint_rebuilds_the_projection_blue_green() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Arc::new(Hooks::default());
    let node = start_with(dir.path(), TestPlugin::new(&hooks)).await;
    let url = node.url();
    let mut clients = clients(&url).await;
    let stream = create_stream(&mut clients, "versions", None).await;
    append_bulk(&mut clients, &stream, 500).await;
    wait_caught_up(&url, "latest").await;
    let before = digest_of(&mut projections_client(&url).await, "latest").await;
    node.stop().await.unwrap();

    let plugin = TestPlugin {
        fingerprint: "latest v2 (test)".into(),
        ..TestPlugin::new(&hooks)
    };
    let node = start_with(dir.path(), plugin).await;
    let url = node.url();
    wait_caught_up(&url, "latest").await;
    let mut client = projections_client(&url).await;
    let status = status_of(&mut client, "latest").await;
    assert_eq!(status.generation, 2);
    assert_eq!(status.fingerprint, "latest v2 (test)");
    assert_eq!(digest_of(&mut client, "latest").await, before);
    assert_eq!(generations(dir.path(), "latest"), ["2"]);
    node.stop().await.unwrap();
}

/// The example binary: `quire` plus the `latest` projector (`examples/latest-node.rs`), built by
/// `cargo test` beside the test binaries.
fn latest_node_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples")
        .join("latest-node");
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds it (cargo build --example latest-node)",
        path.display()
    );
    path
}

/// Runs `latest-node` with `args`; a `--node URL` of a node the test started also gets its token.
fn run_cli(args: &[&str]) -> String {
    let mut command = std::process::Command::new(latest_node_bin());
    command.args(args);
    if let Some(url) = args
        .iter()
        .position(|a| *a == "--node")
        .map(|at| args[at + 1])
    {
        if let Some(token) = token_of(url) {
            command.args(["--token", &token]);
        }
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "latest-node {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_catch_up_and_during_a_rebuild_loses_nothing_and_applies_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    // A log written by a node without the projector: the projector starts from nothing.
    {
        let node = start_node(dir.path()).await;
        let mut clients = clients(&node.url()).await;
        let stream = create_stream(&mut clients, "crashy", None).await;
        append_bulk(&mut clients, &stream, 20_000).await;
        node.stop().await.unwrap();
    }
    let clean = clean_digest(dir.path());
    let slow = [("QUIRE_EXAMPLE_BATCH_DELAY_MS", "40")];

    // 1. Killed during catch-up.
    let (mut child, url, _) = spawn_binary(&latest_node_bin(), dir.path(), &[], &slow).await;
    let client = projections_client(&url).await;
    wait_until(WAIT, "catch-up to be under way", || {
        let mut client = client.clone();
        async move {
            let status = status_of(&mut client, "latest").await;
            status.checkpoint > 0 && status.lag > 0
        }
    })
    .await;
    child.kill().await.unwrap();
    let (mut child, url, _) = spawn_binary(&latest_node_bin(), dir.path(), &[], &[]).await;
    wait_caught_up(&url, "latest").await;
    let mut client = projections_client(&url).await;
    assert_eq!(digest_of(&mut client, "latest").await.as_ref(), clean);
    child.kill().await.unwrap();

    // 2. Killed during a rebuild: the live copy still serves after the restart, and the rebuild
    //    resumes and swaps.
    let (mut child, url, _) = spawn_binary(&latest_node_bin(), dir.path(), &[], &slow).await;
    let mut client = projections_client(&url).await;
    let started = rebuild(&mut client, "latest", None).await.unwrap();
    let generation = started[0].rebuild.as_ref().unwrap().generation;
    wait_until(WAIT, "the rebuild to be under way", || {
        let mut client = client.clone();
        async move {
            let status = status_of(&mut client, "latest").await;
            status.rebuild.is_some_and(|r| r.checkpoint > 0)
        }
    })
    .await;
    child.kill().await.unwrap();
    let (mut child, url, _) = spawn_binary(&latest_node_bin(), dir.path(), &[], &[]).await;
    let mut client = projections_client(&url).await;
    assert_eq!(
        digest_of(&mut client, "latest").await.as_ref(),
        clean,
        "the live copy serves at once"
    );
    wait_caught_up(&url, "latest").await;
    let status = status_of(&mut client, "latest").await;
    assert_eq!(
        status.generation, generation,
        "the interrupted rebuild resumed and swapped in"
    );
    assert_eq!(digest_of(&mut client, "latest").await.as_ref(), clean);
    assert_eq!(generations(dir.path(), "latest"), [generation.to_string()]);

    // The CLI over the same node.
    let listing = run_cli(&["projections", "--node", &url]);
    assert!(
        listing.contains("latest") && listing.contains("caught up"),
        "{listing}"
    );
    let digest_line = run_cli(&["digest", "latest", "--node", &url]);
    assert!(
        digest_line.starts_with(&hex::encode(clean)),
        "{digest_line}"
    );
    assert!(run_cli(&["quarantine", "list", "--node", &url]).contains("the quarantine is empty"));
    let rebuilt = run_cli(&["rebuild", "latest", "--node", &url]);
    assert!(
        rebuilt.contains(&format!(
            "generation {} live, digest {}",
            generation + 1,
            hex::encode(clean)
        )),
        "{rebuilt}"
    );
    let scratch = tempfile::tempdir().unwrap();
    let into = scratch.path().join("replay");
    let replayed = run_cli(&[
        "replay",
        "latest",
        "--from",
        "1",
        "--to",
        "5000",
        "--into",
        into.to_str().unwrap(),
        "-d",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        replayed.contains("5000 scribes applied, 0 refused"),
        "{replayed}"
    );
    child.kill().await.unwrap();
    let _ = child.wait().await;

    // Offline rebuild of the stopped node's data.
    let offline = run_cli(&[
        "rebuild",
        "latest",
        "--offline",
        "-d",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        offline.contains(&format!("rebuilt, digest {}", hex::encode(clean))),
        "{offline}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_stream_projector_keeps_one_copy_per_stream_including_streams_created_later() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Arc::new(Hooks::default());
    let plugin = TestPlugin {
        name: "per-stream",
        scope: Scope::Stream,
        ..TestPlugin::new(&hooks)
    };
    let node = start_with(dir.path(), plugin).await;
    let url = node.url();
    let mut clients = clients(&url).await;
    let first = create_stream(&mut clients, "first", None).await;
    append_note(&mut clients, &first, "in first").await;
    // A stream created while the node runs gets its copy too.
    let second = create_stream(&mut clients, "second", None).await;
    append_bulk(&mut clients, &second, 3000).await;
    let last_of_first = append_kind(&mut clients, &first, "x.first", b"last").await;

    let mut client = projections_client(&url).await;
    let first_bytes = bytes_of(&first);
    wait_until(WAIT, "both streams' copies to catch up", || {
        let mut client = client.clone();
        async move {
            let list = list_all(&mut client).await;
            list.len() == 2 && list.iter().all(|p| p.lag == 0 && p.checkpoint > 0)
        }
    })
    .await;
    let list = list_all(&mut client).await;
    let first_status = list.iter().find(|p| p.stream == first_bytes).unwrap();
    assert_eq!(
        first_status.checkpoint, last_of_first.seq,
        "its own stream's last seq"
    );

    // Each copy saw its own stream only.
    let kinds = |stream: &StreamId| -> Vec<String> {
        let path = dir
            .path()
            .join("projections/per-stream")
            .join(stream.to_hex())
            .join("1");
        quire_example_latest::read_state(&path)
            .unwrap()
            .1
            .into_iter()
            .map(|e| e.kind.to_string())
            .collect()
    };
    assert!(kinds(&first).contains(&"x.first".to_string()));
    assert!(!kinds(&first).contains(&"x.bulk".to_string()));
    assert!(kinds(&second).contains(&"x.bulk".to_string()));
    assert!(!kinds(&second).contains(&"x.first".to_string()));

    // A digest needs the stream; a rebuild of one stream leaves the other alone.
    let no_stream = digest_in(&mut client, "per-stream", None).await;
    assert_refused(no_stream, tonic::Code::InvalidArgument, "--stream");
    let before = digest_in(&mut client, "per-stream", Some(&second))
        .await
        .unwrap();
    let started = rebuild(&mut client, "per-stream", Some(&second))
        .await
        .unwrap();
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].stream, bytes_of(&second));
    let second_bytes = bytes_of(&second);
    wait_until(WAIT, "the second stream's rebuild to swap in", || {
        let mut client = client.clone();
        let second_bytes = second_bytes.clone();
        async move {
            let list = list_all(&mut client).await;
            list.iter()
                .any(|p| p.stream == second_bytes && p.generation == 2 && p.rebuild.is_none())
        }
    })
    .await;
    let after = digest_in(&mut client, "per-stream", Some(&second))
        .await
        .unwrap();
    assert_eq!(before, after);
    let list = list_all(&mut client).await;
    assert_eq!(
        list.iter()
            .find(|p| p.stream == first_bytes)
            .unwrap()
            .generation,
        1
    );
    let unknown_stream = rebuild(&mut client, "per-stream", Some(&StreamId::from([9u8; 32]))).await;
    assert_refused(unknown_stream, tonic::Code::InvalidArgument, "not held");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_of_a_halted_projection_parks_the_scribe_and_a_later_skip_moves_nothing_back() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Arc::new(Hooks::default());
    let node = start_with(dir.path(), TestPlugin::halting(&hooks)).await;
    let url = node.url();
    let mut clients = clients(&url).await;
    let stream = create_stream(&mut clients, "halts", None).await;
    let poison = append_kind(&mut clients, &stream, "x.fail-latest", b"poison").await;
    append_bulk(&mut clients, &stream, 100).await;
    let head = head(&mut clients).await;
    let mut client = projections_client(&url).await;
    wait_until(WAIT, "the projection to halt", || {
        let mut client = client.clone();
        async move { status_of(&mut client, "halting").await.halted_seq == poison.seq }
    })
    .await;
    // The rebuilt copy parks the scribe and goes on; once swapped in, nothing is halted.
    rebuild(&mut client, "halting", None).await.unwrap();
    wait_until(WAIT, "the rebuilt copy to swap in", || {
        let mut client = client.clone();
        async move {
            let status = status_of(&mut client, "halting").await;
            status.generation == 2 && status.rebuild.is_none() && status.checkpoint == head
        }
    })
    .await;
    let status = status_of(&mut client, "halting").await;
    assert!(status.halted.is_empty(), "{status:?}");
    assert_eq!(status.quarantined, 1, "the new copy parked it too");
    // Skipping it now moves no checkpoint backwards: nothing is applied again.
    client
        .skip(pb::QuarantineActionRequest {
            id: poison.id.clone(),
            name: String::new(),
        })
        .await
        .unwrap();
    let status = status_of(&mut client, "halting").await;
    assert_eq!(status.checkpoint, head);
    assert_eq!(
        digest_of(&mut client, "halting").await.as_ref(),
        clean_digest(dir.path())
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_projector_is_reported_and_recovers_from_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Arc::new(Hooks::default());
    hooks.panics.store(true, Ordering::SeqCst);
    let node = start_with(dir.path(), TestPlugin::new(&hooks)).await;
    let url = node.url();
    let mut clients = clients(&url).await;
    let stream = create_stream(&mut clients, "panics", None).await;
    append_note(&mut clients, &stream, "before").await;
    append_kind(&mut clients, &stream, "x.panic", b"boom").await;
    let mut client = projections_client(&url).await;
    wait_until(WAIT, "the panic to be reported", || {
        let mut client = client.clone();
        async move {
            status_of(&mut client, "latest")
                .await
                .error
                .contains("panicked")
        }
    })
    .await;
    assert!(status_of(&mut client, "latest").await.lag > 0);
    hooks.panics.store(false, Ordering::SeqCst);
    wait_caught_up(&url, "latest").await;
    let status = status_of(&mut client, "latest").await;
    assert!(status.error.is_empty(), "{status:?}");
    assert_eq!(
        digest_of(&mut client, "latest").await.as_ref(),
        clean_digest(dir.path())
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_wakes_only_the_watchers_of_its_own_stream() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut owner = clients(&node.url()).await;
    let quiet = create_stream(&mut owner, "quiet", None).await;
    let busy = create_stream(&mut owner, "busy", None).await;
    let mut quiet_heads = node.log.watch_stream_head(&quiet).unwrap();
    let mut busy_heads = node.log.watch_stream_head(&busy).unwrap();
    quiet_heads.borrow_and_update();
    busy_heads.borrow_and_update();
    // The watch is updated before the append is answered.
    let appended = append_note(&mut owner, &busy, "one").await;
    assert!(
        !quiet_heads.has_changed().unwrap(),
        "a quiet stream's watchers woke"
    );
    assert!(busy_heads.has_changed().unwrap());
    assert_eq!(*busy_heads.borrow_and_update(), appended.seq);
    assert!(*busy_heads.borrow() <= node.log.head());
    let appended = append_note(&mut owner, &quiet, "two").await;
    assert_eq!(*quiet_heads.borrow_and_update(), appended.seq);
    assert!(!busy_heads.has_changed().unwrap());
    // Both streams' projections follow.
    for stream in [&quiet, &busy] {
        let info = owner
            .streams
            .get(pb::GetStreamRequest {
                stream: bytes_of(stream),
            })
            .await
            .unwrap()
            .into_inner();
        let projections =
            pb::projections_client::ProjectionsClient::new(owner_channel(&node.url()).await);
        wait_until(
            Duration::from_secs(30),
            "the stream's copies to follow",
            || {
                let mut projections = projections.clone();
                let (stream, head) = (info.stream.clone(), info.head_seq);
                async move {
                    let list = projections
                        .list(pb::ListProjectionsRequest::default())
                        .await
                        .unwrap()
                        .into_inner()
                        .projections;
                    let copies: Vec<_> = list.iter().filter(|p| p.stream == stream).collect();
                    copies.len() == 3 && copies.iter().all(|p| p.checkpoint >= head)
                }
            },
        )
        .await;
    }
    assert!(node.log.watch_stream_head(&quiet).is_some());
    node.stop().await.unwrap();
}

/// A projector that refuses scribes by the thousand: its quarantine keeps 1,000 and counts the
/// rest (passed over like parked ones, so the scribes after them are applied); a rebuild after
/// the fix applies them all and empties both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_quarantine_counts_what_it_cannot_keep_and_a_rebuild_applies_it() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Arc::new(Hooks::default());
    hooks.broken.store(true, Ordering::SeqCst);
    let node = start_with(dir.path(), TestPlugin::new(&hooks)).await;
    let url = node.url();
    let mut clients = clients(&url).await;
    let stream = create_stream(&mut clients, "refused", None).await;
    for batch in 0..5 {
        let appends = (0..201)
            .map(|index| pb::AppendRequest {
                stream: bytes_of(&stream),
                kind: "x.flaky".into(),
                content_type: "text/plain".into(),
                payload: Bytes::from(format!("boom {batch}/{index}")),
                parents: vec![],
            })
            .collect();
        clients
            .log
            .append_batch(pb::AppendBatchRequest {
                appends,
                signed: vec![],
                sealed: vec![],
            })
            .await
            .unwrap();
    }
    let after = append_note(&mut clients, &stream, "after").await;
    wait_caught_up(&url, "latest").await;
    let mut client = projections_client(&url).await;
    let status = status_of(&mut client, "latest").await;
    assert_eq!(status.quarantined, 1_000);
    assert_eq!(
        status.checkpoint, after.seq,
        "the scribes after them were applied"
    );
    let reply = client
        .quarantined(pb::QuarantinedRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.entries.len(), 1_000);
    assert_eq!(reply.not_kept.len(), 1);
    assert_eq!(
        (reply.not_kept[0].name.as_str(), reply.not_kept[0].count),
        ("latest", 5)
    );
    // The CLI says so, and what to do.
    let mut cli = quire_cli(&url);
    cli.args(["quarantine", "list"]);
    let output = tokio::task::spawn_blocking(move || cli.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("latest: 5 more refused scribes were passed over but not kept"),
        "{stdout}"
    );

    // Fixed and rebuilt: every scribe applied, nothing parked, nothing counted.
    hooks.broken.store(false, Ordering::SeqCst);
    client
        .rebuild(pb::RebuildRequest {
            name: "latest".into(),
            stream: Bytes::new(),
        })
        .await
        .unwrap();
    wait_until(
        WAIT,
        "the rebuilt copy swapped in, its quarantine empty",
        || {
            let mut client = client.clone();
            async move {
                let reply = client
                    .quarantined(pb::QuarantinedRequest {})
                    .await
                    .unwrap()
                    .into_inner();
                let status = status_of(&mut client, "latest").await;
                reply.entries.is_empty()
                    && reply.not_kept.is_empty()
                    && status.generation == 2
                    && status.checkpoint == after.seq
            }
        },
    )
    .await;
    assert_eq!(
        digest_of(&mut client, "latest").await.as_ref(),
        clean_digest(dir.path())
    );
    node.stop().await.unwrap();
}
