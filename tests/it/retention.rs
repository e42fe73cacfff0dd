//! Retention and compaction (`quire retain`, `quire prune`, `Streams.Retain`, `Streams.Prune`,
//! the background pruner), on real RocksDB and SQLite: the owner's node prunes what its stream's
//! rule lets go by signing `prune` scribes; every node deletes those payloads, keeps the
//! envelopes, and keeps projection digests unchanged for superseded versions; records past their
//! age leave their tables everywhere; a node joining after compaction converges; only the owner
//! retains and prunes, at append and at replication; a SIGKILL during a prune loses nothing
//! referenced and `quire verify` counts pruned payloads, not damage; and (property) pruning at
//! any points of any history of file versions leaves every digest as it was.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use quire::node::{NodeConfig, RunningNode};
use quire::pb;
use quire::projection_api::{ScribeId, StreamId};
use quire::scribe::Scribe;
use serde_json::json;

use crate::common::*;
use crate::leave::{big, files_containing, put_file, verify_clean};
use crate::malicious::Intruder;
use crate::redact::{add_note, file_data, get_entry, publish_schema};
use crate::replication::{connect, digests, join, wait_for_count, CONVERGE};

/// A stream created by `node` with `retention`.
async fn create_retained(
    node: &RunningNode,
    name: &str,
    retention: pb::Retention,
) -> Result<StreamId, tonic::Status> {
    let info = clients(&node.url())
        .await
        .streams
        .create(pb::CreateStreamRequest {
            name: name.into(),
            policy: None,
            owner: Bytes::new(),
            access: None,
            retention: Some(retention),
        })
        .await?
        .into_inner();
    Ok(StreamId::from_slice(&info.stream).unwrap())
}

/// A rule keeping the newest `versions` of each path.
pub(crate) fn keep(versions: u32) -> pb::Retention {
    pb::Retention {
        keep_versions: versions,
        ..Default::default()
    }
}

/// `Streams.Prune` of `stream` on `node`: its one stream's payloads.
pub(crate) async fn prune(
    node: &RunningNode,
    stream: &StreamId,
    dry_run: bool,
) -> Result<pb::StreamPayloads, tonic::Status> {
    let reply = clients(&node.url())
        .await
        .streams
        .prune(pb::PruneRequest {
            stream: bytes_of(stream),
            dry_run,
        })
        .await?
        .into_inner();
    Ok(reply.streams.into_iter().next().expect("one stream"))
}

/// `Streams.Prune` of `stream` on the node at `url`, in the background (for tests that act while
/// it runs, or kill the node under it).
pub(crate) fn prune_in_background(
    url: &str,
    stream: &StreamId,
) -> tokio::task::JoinHandle<Result<tonic::Response<pb::PruneReply>, tonic::Status>> {
    let url = url.to_string();
    let stream = *stream;
    tokio::spawn(async move {
        clients(&url)
            .await
            .streams
            .prune(pb::PruneRequest {
                stream: bytes_of(&stream),
                dry_run: false,
            })
            .await
    })
}

/// Runs the CLI against `node`; answers its standard output, asserting success.
async fn cli(node: &RunningNode, args: &[&str]) -> String {
    let mut command = quire_cli(&node.url());
    command.args(args);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "quire {args:?}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The stream's projection digests once every copy of it has applied its last scribe and no
/// rebuild is under way (a prune rebuilds them: the live copy answers until the swap).
pub(crate) async fn settled_digests(node: &RunningNode, stream: &StreamId) -> Vec<(String, Bytes)> {
    let id = bytes_of(stream);
    wait_until(CONVERGE, "the stream's projections settled", || async {
        let status = node_status(node).await;
        let copies: Vec<_> = status
            .projections
            .iter()
            .filter(|copy| copy.stream == id)
            .collect();
        copies.len() >= 3
            && copies
                .iter()
                .all(|copy| copy.lag == 0 && copy.rebuild.is_none() && copy.error.is_empty())
    })
    .await;
    digests(node, stream).await
}

/// Marker bytes of version `v` of a path: over 1 KiB, so each is stored apart.
fn version_bytes(path: &str, v: usize) -> Bytes {
    big(&format!("retention-{path}-v{v}-marker|"), 4096)
}

fn marker(path: &str, v: usize) -> Vec<u8> {
    format!("retention-{path}-v{v}-marker|").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_prunes_superseded_versions_on_every_node_digests_unchanged_and_a_late_joiner_converges(
) {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let stream = create_retained(&a, "site", keep(1)).await.unwrap();
    let tid = stream.to_hex();
    publish_schema(&a, &stream).await;
    add_note(&a, &stream, "a note").await;
    // Three versions of two pages: only the third of each is kept.
    let mut ids = Vec::new();
    for v in 1..=3 {
        for path in ["index.html", "about.html"] {
            let id = put_file(&a.url(), &stream, path, version_bytes(path, v))
                .await
                .unwrap();
            ids.push((path, v, ScribeId::from_slice(&id).unwrap()));
        }
    }
    connect(&b, &a).await;
    join(&b, &stream).await;
    let total = crate::redact::count(&a, &stream);
    wait_for_count(&[&b], &stream, total).await;
    let before = settled_digests(&a, &stream).await;
    assert_eq!(settled_digests(&b, &stream).await, before);

    // A dry run counts and changes nothing; B (not the owner) says the owner's node decides.
    let dry = cli(&a, &["prune", &tid, "--dry-run"]).await;
    assert!(dry.contains("reclaimable 4 ("), "{dry}");
    assert!(dry.contains("`quire prune` reclaims them now"), "{dry}");
    assert_eq!(crate::redact::count(&a, &stream), total);
    let on_b = cli(&b, &["prune", &tid]).await;
    assert!(on_b.contains("owner's key is not on this node"), "{on_b}");
    assert_eq!(crate::redact::count(&b, &stream), total);

    // The owner prunes: four prune scribes, the old versions' bytes leave both disks.
    let pruned = cli(&a, &["prune", &tid]).await;
    assert!(pruned.contains("pruned now 4 ("), "{pruned}");
    wait_for_count(&[&a, &b], &stream, total + 4).await;
    for dir in [&dirs[0], &dirs[1]] {
        wait_until(CONVERGE, "old versions off the disk", || async {
            (1..=2).all(|v| {
                ["index.html", "about.html"]
                    .iter()
                    .all(|path| files_containing(dir.path(), &marker(path, v)).is_empty())
            })
        })
        .await;
        // The kept versions are whole.
        for path in ["index.html", "about.html"] {
            assert!(!files_containing(dir.path(), &marker(path, 3)).is_empty());
        }
    }
    // Superseded versions were in no projection: every digest is unchanged, on both nodes.
    assert_eq!(settled_digests(&a, &stream).await, before);
    assert_eq!(settled_digests(&b, &stream).await, before);
    for node in [&a, &b] {
        assert_eq!(
            file_data(node, &stream, "index.html").await,
            Some(version_bytes("index.html", 3))
        );
    }
    // The envelopes stay, verifiable, each naming its prune scribe.
    for (_, v, id) in &ids {
        let entry = get_entry(&b, id).await;
        assert_eq!(entry.payload.is_empty(), *v < 3, "version {v}");
        assert_eq!(entry.redacted_by.is_empty(), *v == 3);
        Scribe::decode(entry_parts(&entry)).expect("still verifies");
    }
    let shown = cli(&a, &["get", &ids[0].2.to_hex()]).await;
    assert!(
        shown.contains("pruned (the stream's retention rule) by"),
        "{shown}"
    );
    let status = cli(&a, &["status"]).await;
    assert!(status.contains("pruned 4 ("), "{status}");
    // Nothing more to prune: a second prune signs nothing.
    let again = prune(&a, &stream, false).await.unwrap();
    assert_eq!((again.pruned_now, again.reclaimable_payloads), (0, 0));

    // A node joining after compaction: the same scribes, the same digests, none of the bytes.
    let c = start_node(dirs[2].path()).await;
    connect(&c, &b).await;
    join(&c, &stream).await;
    wait_for_count(&[&c], &stream, total + 4).await;
    assert_eq!(settled_digests(&c, &stream).await, before);
    for v in 1..=2 {
        assert!(files_containing(dirs[2].path(), &marker("index.html", v)).is_empty());
    }
    for node in [&a, &b, &c] {
        assert_eq!(refused_by(node).await, 0, "{}", node.url());
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    c.stop().await.unwrap();
    for dir in &dirs {
        let report = verify_clean(dir.path());
        assert!(report.contains("(4 payloads pruned)"), "{report}");
    }
}

/// Kv value `v` of `key`: over 1 KiB, so each is stored apart.
fn kv_value(key: &str, v: usize) -> Bytes {
    big(&format!("retention-kv-{key}-v{v}-marker|"), 4096)
}

fn kv_marker(key: &str, v: usize) -> Vec<u8> {
    format!("retention-kv-{key}-v{v}-marker|").into_bytes()
}

/// A key's value, holder, fencing token and last write on `node`.
async fn kv_state(node: &RunningNode, stream: &StreamId, key: &[u8]) -> (Bytes, Bytes, u64, Bytes) {
    let entry = crate::kv::get(&mut crate::kv::kv(node).await, stream, key)
        .await
        .expect("kv get");
    (entry.value, entry.owner, entry.fence, entry.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_keys_keep_their_newest_versions_and_every_fencing_token_on_every_node() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let stream = create_retained(&a, "config", keep(2)).await.unwrap();
    let mut kv = crate::kv::kv(&a).await;
    // Four versions of "k"; "gone" set, deleted and set again. Keeping two per key: k v1 and v2
    // go, and gone's first set (its delete and second set are the newest two).
    for v in 1..=4 {
        crate::kv::set(&mut kv, &stream, b"k", &kv_value("k", v))
            .await
            .unwrap();
    }
    crate::kv::set(&mut kv, &stream, b"gone", &kv_value("gone", 1))
        .await
        .unwrap();
    crate::kv::delete(&mut kv, &stream, b"gone").await.unwrap();
    crate::kv::set(&mut kv, &stream, b"gone", &kv_value("gone", 3))
        .await
        .unwrap();
    connect(&b, &a).await;
    join(&b, &stream).await;
    let total = crate::redact::count(&a, &stream);
    wait_for_count(&[&b], &stream, total).await;
    let before = settled_digests(&a, &stream).await;
    assert_eq!(settled_digests(&b, &stream).await, before);
    let k_before = kv_state(&a, &stream, b"k").await;
    assert_eq!(k_before.2, 4, "four valid writes");
    assert_eq!(kv_state(&b, &stream, b"k").await, k_before);

    let dry = prune(&a, &stream, true).await.unwrap();
    assert_eq!(
        (dry.reclaimable_payloads, dry.pruned_now),
        (3, 0),
        "{dry:?}"
    );
    let pruned = prune(&a, &stream, false).await.unwrap();
    assert_eq!(pruned.pruned_now, 3, "{pruned:?}");
    wait_for_count(&[&a, &b], &stream, total + 3).await;
    let gone = [("k", 1), ("k", 2), ("gone", 1)];
    let kept = [("k", 3), ("k", 4), ("gone", 3)];
    for dir in [&dirs[0], &dirs[1]] {
        // Off the disk everywhere: the payload store and the kv table's copy of each value.
        wait_until(CONVERGE, "superseded kv values off the disk", || async {
            gone.iter()
                .all(|(key, v)| files_containing(dir.path(), &kv_marker(key, *v)).is_empty())
        })
        .await;
        for (key, v) in kept {
            assert!(!files_containing(dir.path(), &kv_marker(key, v)).is_empty());
        }
    }
    // Each key's value, holder, fence and last write are as they were, on both nodes.
    assert_eq!(settled_digests(&a, &stream).await, before);
    assert_eq!(settled_digests(&b, &stream).await, before);
    for node in [&a, &b] {
        assert_eq!(kv_state(node, &stream, b"k").await, k_before);
        assert_eq!(
            kv_state(node, &stream, b"gone").await.0,
            kv_value("gone", 3)
        );
    }

    // A node joining after compaction: the same digests, none of the pruned values.
    let c = start_node(dirs[2].path()).await;
    connect(&c, &b).await;
    join(&c, &stream).await;
    wait_for_count(&[&c], &stream, total + 3).await;
    assert_eq!(settled_digests(&c, &stream).await, before);
    assert_eq!(kv_state(&c, &stream, b"k").await, k_before);
    for (key, v) in gone {
        assert!(files_containing(dirs[2].path(), &kv_marker(key, v)).is_empty());
    }

    // The chain goes on from the kept write: fence 5, on every node; a second prune takes v3.
    let written = crate::kv::set(&mut kv, &stream, b"k", &kv_value("k", 5))
        .await
        .unwrap();
    assert_eq!((written.fence, &written.written), (5, &written.id));
    let again = prune(&a, &stream, false).await.unwrap();
    assert_eq!(again.pruned_now, 1, "{again:?}");
    wait_for_count(&[&a, &b, &c], &stream, total + 5).await;
    let after = settled_digests(&a, &stream).await;
    for node in [&b, &c] {
        assert_eq!(settled_digests(node, &stream).await, after);
        let state = kv_state(node, &stream, b"k").await;
        assert_eq!((state.0, state.2), (kv_value("k", 5), 5));
    }
    for node in [&a, &b, &c] {
        assert_eq!(refused_by(node).await, 0, "{}", node.url());
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    c.stop().await.unwrap();
    for dir in &dirs {
        let report = verify_clean(dir.path());
        assert!(report.contains("(4 payloads pruned)"), "{report}");
    }
}

/// The live generation of each projection copy of `stream` on `node`, by name.
pub(crate) async fn generations(node: &RunningNode, stream: &StreamId) -> Vec<(String, u64)> {
    let id = bytes_of(stream);
    let mut out: Vec<_> = node_status(node)
        .await
        .projections
        .into_iter()
        .filter(|copy| copy.stream == id)
        .map(|copy| (copy.name, copy.generation))
        .collect();
    out.sort();
    out
}

/// A prune run of several commits (4,096 prunes each) rebuilds each projection copy once, not
/// once per commit: the copies hold their rebuild while the run is under way, and one rebuild
/// answers every prune committed before it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_run_of_several_commits_rebuilds_each_copy_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::new(dir.path());
    config.prune_every = None;
    let node = start_config(config, false).await;
    let stream = create_retained(&node, "many", keep(1)).await.unwrap();
    crate::attack_retention::many_versions(&node, &stream, "page", "run", 4_300).await;
    let before = settled_digests(&node, &stream).await;
    let generations_before = generations(&node, &stream).await;
    assert_eq!(generations_before.len(), 3, "{generations_before:?}");
    let pruned = prune(&node, &stream, false).await.unwrap();
    assert_eq!(
        pruned.pruned_now, 4_299,
        "two commits of prunes: {pruned:?}"
    );
    assert_eq!(settled_digests(&node, &stream).await, before);
    let after = generations(&node, &stream).await;
    for ((name, was), (_, now)) in generations_before.iter().zip(&after) {
        assert_eq!(*now, was + 1, "{name}: one rebuild for the whole run");
    }
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_past_their_age_leave_their_table_on_every_node_by_the_scribes_clocks() {
    const DAY: u64 = 24 * 3600 * 1000;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    // A's wall clock starts three days back: its first notes are dated then.
    let wall = Arc::new(AtomicU64::new(now_ms() - 3 * DAY));
    let mut config = NodeConfig::new(dirs[0].path());
    let clock = wall.clone();
    config.wall = Some(Arc::new(move || clock.load(Ordering::SeqCst)));
    config.prune_every = None;
    let a = start_config(config, true).await;
    let b = start_node(dirs[1].path()).await;
    let stream = create_retained(
        &a,
        "notes",
        pb::Retention {
            max_age_ms: 2 * DAY,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let tid = stream.to_hex();
    publish_schema(&a, &stream).await;
    add_note(&a, &stream, "old note one").await;
    add_note(&a, &stream, "old note two").await;
    wall.store(now_ms(), Ordering::SeqCst);
    add_note(&a, &stream, "new note").await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    let total = crate::redact::count(&a, &stream);
    wait_for_count(&[&b], &stream, total).await;
    wait_until(CONVERGE, "three notes on B", || async {
        query_notes(&b.url(), &tid).await.len() == 3
    })
    .await;
    let dry = prune(&a, &stream, true).await.unwrap();
    assert_eq!(dry.reclaimable_payloads, 2, "{dry:?}");
    let done = prune(&a, &stream, false).await.unwrap();
    assert_eq!(done.pruned_now, 2);
    wait_for_count(&[&b], &stream, total + 2).await;
    for node in [&a, &b] {
        wait_until(CONVERGE, "only the new note", || async {
            query_notes(&node.url(), &tid).await == vec![json!(["new note"])]
        })
        .await;
    }
    assert_eq!(
        settled_digests(&a, &stream).await,
        settled_digests(&b, &stream).await
    );
    for dir in &dirs {
        assert!(files_containing(dir.path(), b"old note one").is_empty());
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_version_is_kept_until_the_minimum_lag_has_passed_by_the_clock() {
    const HOUR: u64 = 3600 * 1000;
    let dir = tempfile::tempdir().unwrap();
    let wall = Arc::new(AtomicU64::new(now_ms() - 5 * HOUR));
    let mut config = NodeConfig::new(dir.path());
    let clock = wall.clone();
    config.wall = Some(Arc::new(move || clock.load(Ordering::SeqCst)));
    config.prune_every = None;
    let node = start_config(config, false).await;
    let stream = create_retained(
        &node,
        "lag",
        pb::Retention {
            keep_versions: 1,
            min_lag_ms: 2 * HOUR,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // v1 at -5 h, v2 at -4 h, v3 at -1 h: v1 was superseded 4 h ago, v2 only 1 h ago.
    put_file(&node.url(), &stream, "p", version_bytes("p", 1))
        .await
        .unwrap();
    wall.fetch_add(HOUR, Ordering::SeqCst);
    put_file(&node.url(), &stream, "p", version_bytes("p", 2))
        .await
        .unwrap();
    wall.fetch_add(3 * HOUR, Ordering::SeqCst);
    put_file(&node.url(), &stream, "p", version_bytes("p", 3))
        .await
        .unwrap();
    wall.fetch_add(HOUR, Ordering::SeqCst);
    let first = prune(&node, &stream, false).await.unwrap();
    assert_eq!(first.pruned_now, 1, "{first:?}");
    assert!(files_containing(dir.path(), &marker("p", 1)).is_empty());
    assert!(!files_containing(dir.path(), &marker("p", 2)).is_empty());
    // Two more hours by the clock: v2's lag has passed too.
    wall.fetch_add(2 * HOUR, Ordering::SeqCst);
    let second = prune(&node, &stream, false).await.unwrap();
    assert_eq!(second.pruned_now, 1, "{second:?}");
    assert!(files_containing(dir.path(), &marker("p", 2)).is_empty());
    assert_eq!(
        file_data(&node, &stream, "p").await,
        Some(version_bytes("p", 3))
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retain_scribe_changes_the_rule_and_the_background_pruner_applies_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::new(dir.path());
    config.prune_every = Some(Duration::from_millis(50));
    let node = start_config(config, false).await;
    let stream = create_retained(&node, "bg", pb::Retention::default())
        .await
        .unwrap();
    let tid = stream.to_hex();
    for v in 1..=3 {
        put_file(&node.url(), &stream, "p", version_bytes("p", v))
            .await
            .unwrap();
    }
    // Keep everything: nothing reclaimable.
    let plan = prune(&node, &stream, true).await.unwrap();
    assert_eq!(plan.reclaimable_payloads, 0);
    assert!(plan.retain_id.is_empty());
    // Out-of-bounds rules are refused and change nothing.
    let bad = clients(&node.url())
        .await
        .streams
        .retain(pb::RetainRequest {
            stream: bytes_of(&stream),
            retention: Some(keep(5_000_000)),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    // A malformed or unknown stream: clear refusals, nothing appended.
    let mut streams = clients(&node.url()).await.streams;
    let malformed = streams
        .prune(pb::PruneRequest {
            stream: Bytes::from_static(b"short"),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        malformed.code(),
        tonic::Code::InvalidArgument,
        "{malformed:?}"
    );
    let unknown = StreamId::from([9u8; 32]);
    let missing = streams
        .prune(pb::PruneRequest {
            stream: bytes_of(&unknown),
            dry_run: true,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    let missing = streams
        .retain(pb::RetainRequest {
            stream: bytes_of(&unknown),
            retention: Some(keep(1)),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    let out = cli(&node, &["retain", &tid, "--keep-versions", "2"]).await;
    assert!(out.contains("newest 2 versions per path and key"), "{out}");
    let info = stream_info(&node, &stream).await;
    assert_eq!(info.retention.unwrap().keep_versions, 2);
    // The background pruner (every 50 ms here) prunes the first version on its own.
    wait_until(CONVERGE, "the background pruner", || async {
        files_containing(dir.path(), &marker("p", 1)).is_empty()
    })
    .await;
    assert!(!files_containing(dir.path(), &marker("p", 2)).is_empty());
    // The rule survives a restart (indexed with the membership scribes).
    node.stop().await.unwrap();
    let node = start_node(dir.path()).await;
    let info = stream_info(&node, &stream).await;
    assert_eq!(info.retention.unwrap().keep_versions, 2);
    let shown = cli(&node, &["stream", "get", &tid]).await;
    assert!(
        shown.contains("retention   newest 2 versions per path and key"),
        "{shown}"
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_retains_and_prunes_at_append_and_at_replication() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let stream = create_retained(&a, "owner-only", keep(1)).await.unwrap();
    let first = put_file(&a.url(), &stream, "p", version_bytes("p", 1))
        .await
        .unwrap();
    let first = ScribeId::from_slice(&first).unwrap();
    put_file(&a.url(), &stream, "p", version_bytes("p", 2))
        .await
        .unwrap();
    let note = add_note(&a, &stream, "a note").await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    let total = crate::redact::count(&a, &stream);
    wait_for_count(&[&b], &stream, total).await;

    // B's node key is not the owner: Streams.Retain is refused, nothing appended.
    let denied = clients(&b.url())
        .await
        .streams
        .retain(pb::RetainRequest {
            stream: bytes_of(&stream),
            retention: Some(keep(3)),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    // A user's own retain and prune scribes: refused at append.
    let user = client_key(71);
    let hlc = a.log.clock().now();
    let retain = client_scribe(
        &user,
        &stream,
        "retain",
        &prost::Message::encode_to_vec(&pb::Retain {
            retention: Some(keep(9)),
        }),
        hlc,
    );
    let prune_scribe =
        crate::redact::redact_scribe_of_kind(&user, &stream, &first, hlc + 1, "prune");
    for scribe in [&retain, &prune_scribe] {
        let refused = clients(&a.url())
            .await
            .log
            .append_signed(signed_request(scribe.parts()))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    }
    // The owner's node may not prune what retention does not cover (a genesis, an acl scribe,
    // a kv write): a prune of the genesis is refused at append.
    let genesis_prune =
        crate::redact::redact_scribe_of_kind(&client_key(72), &stream, &stream, hlc + 2, "prune");
    let refused = clients(&a.url())
        .await
        .log
        .append_signed(signed_request(genesis_prune.parts()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused.code(),
            tonic::Code::PermissionDenied | tonic::Code::InvalidArgument
        ),
        "{refused:?}"
    );
    // A policy rule for retain or prune is refused at creation.
    for kind in ["retain", "prune"] {
        let refused = clients(&a.url())
            .await
            .streams
            .create(pb::CreateStreamRequest {
                name: "rule".into(),
                policy: Some(pb::Policy {
                    rules: vec![pb::KindRule {
                        kind: kind.into(),
                        authors: Some(pb::Authors {
                            anyone: true,
                            ..Default::default()
                        }),
                    }],
                    ..Default::default()
                }),
                owner: Bytes::new(),
                access: None,
                retention: None,
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("owner alone"), "{refused:?}");
    }
    assert_eq!(crate::redact::count(&a, &stream), total);

    // From a peer: the same prune scribe is refused at replication and counted against it.
    let key = client_key(94);
    let mut intruder = Intruder::connect(a.peer_addr.unwrap(), key, true).await;
    intruder.offer(&stream).await;
    let refused_before = refused_by(&a).await;
    intruder
        .send(batch_of(&stream, std::slice::from_ref(&prune_scribe), 1))
        .await;
    wait_until(CONVERGE, "the intruder's prune refused", || async {
        refused_by(&a).await > refused_before
    })
    .await;
    assert_eq!(crate::redact::count(&a, &stream), total);
    let entry = get_entry(&a, &first).await;
    assert!(
        !entry.payload.is_empty(),
        "the first version is still whole"
    );
    let _ = note;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_prune_loses_nothing_referenced_and_verify_reports_pruned_payloads() {
    use rand::Rng;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url, _) =
        crate::crash::spawn_serve_with(dir.path(), &["--prune-every", "0"]).await;
    let mut owner = clients(&url).await;
    let info = owner
        .streams
        .create(pb::CreateStreamRequest {
            name: "crash-prune".into(),
            policy: None,
            owner: Bytes::new(),
            access: None,
            retention: Some(keep(1)),
        })
        .await
        .unwrap()
        .into_inner();
    let stream = StreamId::from_slice(&info.stream).unwrap();
    // Ten paths, five versions each: forty superseded versions, ten kept.
    for v in 1..=5 {
        for index in 0..10 {
            let path = format!("f{index}");
            put_file(&url, &stream, &path, version_bytes(&path, v))
                .await
                .unwrap();
        }
    }
    let task = prune_in_background(&url, &stream);
    let kill_after = rand::thread_rng().gen_range(5..120);
    let _ = tokio::time::timeout(Duration::from_millis(kill_after), async {
        while !task.is_finished() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let answered = matches!(task.await, Ok(Ok(_)));

    let report = verify_clean(dir.path());
    let (mut child, url) = crate::crash::spawn_serve(dir.path()).await;
    let entries = read_all(&mut clients(&url).await).await;
    let pruned = entries
        .iter()
        .filter(|entry| !entry.redacted_by.is_empty())
        .count();
    if answered {
        assert_eq!(pruned, 40, "an answered prune holds after the restart");
    }
    if pruned > 0 {
        assert!(
            report.contains(&format!("({pruned} payloads pruned)")),
            "{report}"
        );
    }
    // Every kept version is whole; a superseded one is whole or pruned, never lost otherwise.
    for entry in entries.iter().filter(|entry| entry.kind == "file.put") {
        Scribe::decode(entry_parts(entry)).expect("every stored scribe verifies");
        assert!(
            !entry.payload.is_empty() || !entry.redacted_by.is_empty(),
            "{} lost its payload without a prune",
            hex::encode(&entry.id)
        );
    }
    let rest = {
        let mut streams = clients(&url).await.streams;
        streams
            .prune(pb::PruneRequest {
                stream: bytes_of(&stream),
                dry_run: false,
            })
            .await
            .unwrap()
            .into_inner()
    };
    assert_eq!(rest.streams[0].pruned_now as usize + pruned, 40);
    for index in 0..10 {
        let path = format!("f{index}");
        assert!(!files_containing(dir.path(), &marker(&path, 5)).is_empty());
        for v in 1..5 {
            assert!(files_containing(dir.path(), &marker(&path, v)).is_empty());
        }
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let report = verify_clean(dir.path());
    assert!(report.contains("(40 payloads pruned)"), "{report}");
}

/// One step of a history: a version of one of three paths, a delete, a note, a kv write, or a
/// prune.
#[derive(Debug, Clone)]
enum Step {
    Put(u8, u8),
    Delete(u8),
    Note(u8),
    /// A new version of `_schema` (the same tables, other bytes).
    Schema(u8),
    Kv(KvStep),
    Prune,
}

/// A kv write by one of three client keys to one of two keys.
#[derive(Debug, Clone)]
struct KvStep {
    author: u8,
    key: u8,
    /// The value set; `None`: a delete.
    value: Option<u8>,
    /// What it names as replaced.
    names: Names,
    /// At the same instant as the previous kv write (a concurrent write: the lower author first).
    same_instant: bool,
}

#[derive(Debug, Clone)]
enum Names {
    /// The key's last valid write (a writer that saw it).
    Current,
    /// None (a writer that saw nothing).
    Nothing,
    /// An earlier write of the key (a stale writer, or one backdating history).
    Earlier(prop::sample::Index),
}

/// How the case's stream leases kv keys.
#[derive(Debug, Clone, Copy)]
enum Leases {
    /// The default: an hour, so other writers are kept out.
    Hour,
    /// 20 ms of the writers' clocks: some takeovers come too early, others not.
    Short,
    Off,
}

fn step() -> impl Strategy<Value = Step> {
    let names = prop_oneof![
        3 => Just(Names::Current),
        1 => Just(Names::Nothing),
        1 => any::<prop::sample::Index>().prop_map(Names::Earlier),
    ];
    let kv = (
        0u8..3,
        0u8..2,
        prop::option::weighted(0.8, any::<u8>()),
        names,
        prop::bool::weighted(0.2),
    )
        .prop_map(|(author, key, value, names, same_instant)| {
            Step::Kv(KvStep {
                author,
                key,
                value,
                names,
                same_instant,
            })
        });
    prop_oneof![
        4 => (0u8..3, any::<u8>()).prop_map(|(path, byte)| Step::Put(path, byte)),
        1 => (0u8..3).prop_map(Step::Delete),
        1 => any::<u8>().prop_map(Step::Note),
        1 => (0u8..8).prop_map(Step::Schema),
        4 => kv,
        2 => Just(Step::Prune),
    ]
}

/// The writes of each key so far, as the kv fold sees them.
#[derive(Default)]
struct KvHistory {
    keys: [Vec<quire_projection_kv::Write>; 2],
    last_hlc: u64,
}

impl KvHistory {
    /// Signs `step`'s write into `stream` at the node's clock, and remembers it.
    fn write(
        &mut self,
        node: &RunningNode,
        stream: &StreamId,
        policy: &quire::projection_api::Policy,
        step: &KvStep,
    ) -> Scribe {
        let writes = &mut self.keys[step.key as usize];
        let replaces = match &step.names {
            Names::Current => quire_projection_kv::fold(&mut writes.clone(), policy).id,
            Names::Nothing => ScribeId::default(),
            Names::Earlier(index) if !writes.is_empty() => writes[index.index(writes.len())].id,
            Names::Earlier(_) => ScribeId::default(),
        };
        let hlc = match step.same_instant && self.last_hlc > 0 {
            true => self.last_hlc,
            false => node.log.clock().now(),
        };
        self.last_hlc = hlc;
        let key = format!("key{}", step.key);
        let value = step.value.map(|byte| vec![byte; 8 + byte as usize]);
        let (kind, payload) = quire_projection_kv::encode(
            key.as_bytes(),
            value.as_deref(),
            (replaces != ScribeId::default()).then_some(&replaces),
        );
        let signer = client_key(40 + step.author);
        let scribe = Scribe::sign(
            quire::scribe::Body {
                stream: Some(*stream),
                author: key_of(&signer),
                hlc,
                kind,
                content_type: quire_projection_kv::CONTENT_TYPE.into(),
                payload: payload.into(),
                parents: vec![],
                membership: None,
                nonce: 0,
            },
            &signer,
        );
        writes.push(quire_projection_kv::Write {
            hlc,
            author: key_of(&signer),
            id: scribe.id,
            value,
            replaces,
            pruned_set: false,
        });
        scribe
    }
}

/// Property (the issue's): for any history of file versions and kv writes (three writers, valid
/// and invalid writes, leases of an hour, of 20 ms or none) and any "newest N" rule, pruning at
/// any points, any number of times, leaves every projection digest as it was just before; a
/// rebuild after it gives the same digests. One node; one fresh stream per case.
#[test]
fn pruning_at_any_points_of_any_history_leaves_every_digest_unchanged() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = runtime.block_on(async {
        let mut config = NodeConfig::new(dir.path());
        config.prune_every = None;
        start_config(config, false).await
    });
    let cases = std::env::var("QUIRE_RETENTION_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(24);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    let leases = prop_oneof![Just(Leases::Hour), Just(Leases::Short), Just(Leases::Off)];
    let strategy = (1u32..=3, leases, proptest::collection::vec(step(), 1..24));
    let counter = AtomicU64::new(0);
    runner
        .run(&strategy, |(keep_versions, leases, steps)| {
            let case = counter.fetch_add(1, Ordering::SeqCst);
            runtime.block_on(async {
                let policy = pb::Policy {
                    leasing_disabled: matches!(leases, Leases::Off),
                    lease_ms: if matches!(leases, Leases::Short) {
                        20
                    } else {
                        0
                    },
                    ..Default::default()
                };
                let info = clients(&node.url())
                    .await
                    .streams
                    .create(pb::CreateStreamRequest {
                        name: format!("case{case}"),
                        policy: Some(policy),
                        owner: Bytes::new(),
                        access: None,
                        retention: Some(keep(keep_versions)),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let stream = StreamId::from_slice(&info.stream).unwrap();
                let fold_policy = quire::projection_api::Policy {
                    leasing: !matches!(leases, Leases::Off),
                    lease_ms: if matches!(leases, Leases::Short) {
                        20
                    } else {
                        3_600_000
                    },
                    ..Default::default()
                };
                publish_schema(&node, &stream).await;
                let mut history = KvHistory::default();
                let mut prunes = 0;
                for step in &steps {
                    match step {
                        Step::Kv(write) => {
                            let scribe = history.write(&node, &stream, &fold_policy, write);
                            clients(&node.url())
                                .await
                                .log
                                .append_signed(signed_request(scribe.parts()))
                                .await
                                .expect("every kv write is stored, valid or not");
                        }
                        Step::Put(path, byte) => {
                            put_file(
                                &node.url(),
                                &stream,
                                &format!("p{path}"),
                                Bytes::from(vec![*byte; 16 + *byte as usize]),
                            )
                            .await
                            .unwrap();
                        }
                        Step::Delete(path) => {
                            let deleted = pb::files_client::FilesClient::new(
                                owner_channel(&node.url()).await,
                            )
                            .delete(pb::FilesDeleteRequest {
                                stream: bytes_of(&stream),
                                path: format!("p{path}"),
                            })
                            .await;
                            // NOT_FOUND: no such file (never put, or deleted already).
                            if let Err(status) = deleted {
                                assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
                            }
                        }
                        Step::Note(byte) => {
                            add_note(&node, &stream, &format!("note {byte}")).await;
                        }
                        Step::Schema(spaces) => {
                            let schema = format!(
                                "{}{{\"schema\": {{\"note\": {{\"text\": \"text\"}}}}}}",
                                " ".repeat(*spaces as usize)
                            );
                            put_file(&node.url(), &stream, "_schema", Bytes::from(schema))
                                .await
                                .unwrap();
                        }
                        Step::Prune => {
                            let before = settled_digests(&node, &stream).await;
                            prunes += prune(&node, &stream, false).await.unwrap().pruned_now;
                            let after = settled_digests(&node, &stream).await;
                            assert_eq!(after, before, "a prune changed a digest: {steps:?}");
                        }
                    }
                }
                let before = settled_digests(&node, &stream).await;
                let mut projections = pb::projections_client::ProjectionsClient::new(
                    owner_channel(&node.url()).await,
                );
                for name in ["sql", "kv", "files"] {
                    projections
                        .rebuild(pb::RebuildRequest {
                            name: name.into(),
                            stream: bytes_of(&stream),
                        })
                        .await
                        .unwrap();
                }
                assert_eq!(
                    settled_digests(&node, &stream).await,
                    before,
                    "a rebuild after {prunes} prunes changed a digest: {steps:?}"
                );
            });
            Ok(())
        })
        .unwrap();
    runtime.block_on(node.stop()).unwrap();
}
