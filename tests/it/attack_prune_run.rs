//! Attacks on two retention changes, as a Jepsen-style tester would:
//!
//! - a prune run rebuilds each projection copy once (the stream's copies hold their rebuild while
//!   `Log::prune` commits its jobs, an untouched rebuild is kept rather than started over, and a
//!   rebuild answers every erasure committed before it started): erasures (a `redact`, an
//!   `acl.revoke`) committed while the rebuild is held, an operator's rebuild started mid-run, a
//!   run cut short by a `retain`, two streams pruned at once, and a SIGKILL of a real
//!   `quire serve` in the middle of a multi-job run with a redaction in flight. After each, every
//!   copy must settle (no rebuild left behind) with the digests of a clean replay of the log.
//! - kv erasures count by their set: an author's `redact` of a kv write its owner pruned while
//!   the two nodes were apart; both nodes and a clean replay agree, and a second prune pass
//!   changes no digest.

use std::path::Path;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use quire::log::store::Store;
use quire::membership::Role;
use quire::node::{NodeConfig, RunningNode};
use quire::pb;
use quire::projection::{self, Registry};
use quire::projection_api::{Kind, ScribeId, StreamId};
use quire::scribe::{Body, Scribe};
use serde_json::json;

use crate::attack_retention::many_versions;
use crate::common::*;
use crate::leave::kv_set;
use crate::redact::{add_note, count, publish_schema, redact};
use crate::replication::{connect, join, part, wait_for_count, CONVERGE};
use crate::retention::{generations, keep, prune, settled_digests};

/// Prunes one append job signs (`retention::PRUNES_PER_JOB`).
const JOB: u64 = 4096;
/// Superseded versions of one path: six jobs of prunes, so a run lasts long enough to act in.
const VERSIONS: usize = 24_000;
const SECRET: &str = "attack-prune-run-secret-note";

/// A stream of `node`'s with `retention` and, if given, `access`.
async fn retained_stream(
    url: &str,
    name: &str,
    retention: pb::Retention,
    access: Option<pb::Access>,
) -> StreamId {
    let info = clients(url)
        .await
        .streams
        .create(pb::CreateStreamRequest {
            name: name.into(),
            policy: None,
            owner: Bytes::new(),
            access,
            retention: Some(retention),
        })
        .await
        .expect("create a retained stream")
        .into_inner();
    StreamId::from_slice(&info.stream).unwrap()
}

/// A node that prunes only when asked.
async fn quiet_node(dir: &Path, peer: bool) -> RunningNode {
    let mut config = NodeConfig::new(dir);
    config.prune_every = None;
    start_config(config, peer).await
}

/// The digests of a clean replay of `stream`'s log on the store in `data_dir` into fresh copies
/// of the sql, kv and files projectors (the order of [`digests`]).
fn fresh_digests(data_dir: &Path, stream: &StreamId) -> Vec<(String, Bytes)> {
    let store = Store::open_read_only(&quire::log::store_path(data_dir)).unwrap();
    let registry = Registry::builtin();
    let scratch = tempfile::tempdir().unwrap();
    ["sql", "kv", "files"]
        .iter()
        .map(|name| {
            let plugin = registry.get(name).unwrap();
            let replayed = projection::replay(
                &store,
                &**plugin,
                Some(*stream),
                &scratch.path().join(name),
                1,
                u64::MAX,
                |_| {},
            )
            .unwrap();
            (
                name.to_string(),
                Bytes::copy_from_slice(&replayed[0].digest),
            )
        })
        .collect()
}

/// Starts `Log::prune` of `stream` on `node` in the background.
fn start_run(
    node: &RunningNode,
    stream: &StreamId,
) -> tokio::task::JoinHandle<Option<quire::log::retention::Plan>> {
    let log = node.log.clone();
    let stream = *stream;
    tokio::spawn(async move { log.prune(&stream, false).await.expect("prune") })
}

/// Waits until `run` on `stream` has committed its first job and is still under way; fails if
/// it ended first (the run is too short for the test to act in).
async fn wait_mid_run<T>(
    node: &RunningNode,
    stream: &StreamId,
    before: u64,
    run: &tokio::task::JoinHandle<T>,
) {
    wait_until(CONVERGE, "the run's first commit", || async {
        count(node, stream) >= before + JOB || run.is_finished()
    })
    .await;
    assert!(
        node.log.pruning(stream) && !run.is_finished(),
        "the run ended before the test could act in it"
    );
}

/// A scribe of `kind` with `payload` signed by `signer`, dated `hlc`.
fn signed(
    signer: &SigningKey,
    stream: &StreamId,
    kind: &str,
    content_type: &str,
    payload: Vec<u8>,
    hlc: u64,
) -> Scribe {
    Scribe::sign(
        Body {
            stream: Some(*stream),
            author: key_of(signer),
            hlc,
            kind: kind.parse::<Kind>().unwrap(),
            content_type: content_type.into(),
            payload: Bytes::from(payload),
            parents: vec![],
            membership: None,
            nonce: 0,
        },
        signer,
    )
}

async fn append_signed(url: &str, scribe: &Scribe) -> pb::AppendReply {
    clients(url)
        .await
        .log
        .append_signed(signed_request(scribe.parts()))
        .await
        .expect("append signed")
        .into_inner()
}

/// A redaction committed while the stream's copies hold their rebuild (a multi-job prune run
/// under way) takes a record every live copy applied: once the run ends, every copy settles with
/// a clean replay's digests and the record is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redact_committed_while_the_rebuild_is_held_is_in_effect_after_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let node = quiet_node(dir.path(), false).await;
    let stream = retained_stream(&node.url(), "held-redact", keep(1), None).await;
    let tid = stream.to_hex();
    publish_schema(&node, &stream).await;
    add_note(&node, &stream, "kept").await;
    let secret = add_note(&node, &stream, SECRET).await;
    many_versions(&node, &stream, "page", "held", VERSIONS).await;
    settled_digests(&node, &stream).await;
    assert_eq!(query_notes(&node.url(), &tid).await.len(), 2);
    let generations_before = generations(&node, &stream).await;

    let before = count(&node, &stream);
    let run = start_run(&node, &stream);
    wait_mid_run(&node, &stream, before, &run).await;
    redact(&node, &stream, &secret, "mid-run").await.unwrap();
    assert!(
        node.log.pruning(&stream),
        "the redaction committed while the run was under way"
    );
    let plan = run.await.unwrap().unwrap();
    assert_eq!(plan.pruned_now.payloads, VERSIONS as u64 - 1);

    let settled = settled_digests(&node, &stream).await;
    assert_eq!(
        query_notes(&node.url(), &tid).await,
        vec![json!(["kept"])],
        "the redacted note left its table"
    );
    assert_eq!(settled, fresh_digests(dir.path(), &stream));
    for ((name, was), (_, now)) in generations_before
        .iter()
        .zip(&generations(&node, &stream).await)
    {
        assert!(now > was, "{name}: rebuilt");
    }
    node.stop().await.unwrap();
}

/// An `acl.revoke` committed while the rebuild is held excludes (strong remove) a record the
/// live copies applied before it: once the run ends the record is out of every copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_revoke_committed_while_the_rebuild_is_held_excludes_what_copies_applied() {
    let dir = tempfile::tempdir().unwrap();
    let node = quiet_node(dir.path(), false).await;
    let writer = client_key(201);
    let admin = client_key(202);
    let access = pb::Access {
        private: true,
        members: [
            (key_of(&writer), Role::Writer),
            (key_of(&admin), Role::Admin),
        ]
        .iter()
        .map(|(key, role)| pb::Member {
            key: Bytes::copy_from_slice(key.as_bytes()),
            role: role.to_proto(),
        })
        .collect(),
    };
    let stream = retained_stream(&node.url(), "held-revoke", keep(1), Some(access)).await;
    publish_schema(&node, &stream).await;
    add_note(&node, &stream, "kept").await;
    // The revoke will be dated here: the writer's record, dated after it and not having seen it,
    // is what it excludes.
    let revoked_at = node.log.clock().now();
    let record = signed(
        &writer,
        &stream,
        "record.add",
        "application/json",
        json!({"_table": "note", "text": SECRET})
            .to_string()
            .into_bytes(),
        node.log.clock().now(),
    );
    append_signed(&node.url(), &record).await;
    many_versions(&node, &stream, "page", "revoke", VERSIONS).await;
    let with_record = settled_digests(&node, &stream).await;

    let before = count(&node, &stream);
    let run = start_run(&node, &stream);
    wait_mid_run(&node, &stream, before, &run).await;
    let revoke = signed(
        &admin,
        &stream,
        "acl.revoke",
        quire::membership::ACL_CONTENT_TYPE,
        prost::Message::encode_to_vec(&pb::AclRevoke {
            key: Bytes::copy_from_slice(key_of(&writer).as_bytes()),
        }),
        revoked_at,
    );
    append_signed(&node.url(), &revoke).await;
    assert!(
        node.log.pruning(&stream),
        "the revoke committed while the run was under way"
    );
    run.await.unwrap().unwrap();
    let excluded = clients(&node.url())
        .await
        .streams
        .excluded(pb::ExcludedRequest {
            stream: bytes_of(&stream),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .scribes;
    assert!(
        excluded
            .iter()
            .any(|scribe| scribe.id == bytes_of(&record.id)),
        "the revoke excludes the writer's record"
    );
    let settled = settled_digests(&node, &stream).await;
    let fresh = fresh_digests(dir.path(), &stream);
    assert_ne!(with_record[0], fresh[0], "the record was in the sql copy");
    assert_eq!(settled, fresh);
    node.stop().await.unwrap();
}

/// `Projections.Rebuild` of a stream's copies while a prune run is under way on it: the rebuild
/// waits for the run (its copy reads nothing meanwhile), then finishes, with a clean replay's
/// digests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_rebuild_during_a_run_is_held_then_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let node = quiet_node(dir.path(), false).await;
    let stream = retained_stream(&node.url(), "held-rebuild", keep(1), None).await;
    publish_schema(&node, &stream).await;
    add_note(&node, &stream, "kept").await;
    many_versions(&node, &stream, "page", "rebuild", VERSIONS).await;
    settled_digests(&node, &stream).await;

    let before = count(&node, &stream);
    let run = start_run(&node, &stream);
    wait_mid_run(&node, &stream, before, &run).await;
    let started = pb::projections_client::ProjectionsClient::new(owner_channel(&node.url()).await)
        .rebuild(pb::RebuildRequest {
            name: "sql".into(),
            stream: bytes_of(&stream),
        })
        .await
        .unwrap()
        .into_inner()
        .projections;
    assert_eq!(started.len(), 1);
    let held = node_status(&node)
        .await
        .projections
        .into_iter()
        .find(|copy| copy.name == "sql" && copy.stream == bytes_of(&stream))
        .unwrap();
    if node.log.pruning(&stream) {
        let rebuild = held.rebuild.expect("a rebuild under way");
        assert_eq!(rebuild.checkpoint, 0, "held while the run is under way");
    }
    run.await.unwrap().unwrap();
    let settled = settled_digests(&node, &stream).await;
    assert_eq!(settled, fresh_digests(dir.path(), &stream));
    node.stop().await.unwrap();
}

/// A run cut short (a `retain` committed mid-run: the next job is refused, the run stops) leaves
/// no copy holding its rebuild; the next pass, under the new rule, settles too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cut_short_by_a_retain_leaves_no_copy_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let node = quiet_node(dir.path(), false).await;
    let stream = retained_stream(&node.url(), "cut-short", keep(1), None).await;
    publish_schema(&node, &stream).await;
    let secret = add_note(&node, &stream, SECRET).await;
    many_versions(&node, &stream, "page", "cut", VERSIONS).await;
    settled_digests(&node, &stream).await;

    let before = count(&node, &stream);
    let run = start_run(&node, &stream);
    wait_mid_run(&node, &stream, before, &run).await;
    clients(&node.url())
        .await
        .streams
        .retain(pb::RetainRequest {
            stream: bytes_of(&stream),
            retention: Some(keep(2)),
        })
        .await
        .unwrap();
    redact(&node, &stream, &secret, "cut").await.unwrap();
    let plan = run.await.unwrap().unwrap();
    assert!(
        plan.pruned_now.payloads < VERSIONS as u64 - 1,
        "the retain stopped the run: {plan:?}"
    );
    let settled = settled_digests(&node, &stream).await;
    assert_eq!(settled, fresh_digests(dir.path(), &stream));
    assert!(query_notes(&node.url(), &stream.to_hex()).await.is_empty());
    let rest = prune(&node, &stream, false).await.unwrap();
    assert!(rest.pruned_now > 0, "{rest:?}");
    assert_eq!(settled_digests(&node, &stream).await, settled);
    assert_eq!(settled, fresh_digests(dir.path(), &stream));
    node.stop().await.unwrap();
}

/// Two streams pruned at once, each with a redaction committed mid-run: both settle with a clean
/// replay's digests, each rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_pruned_at_once_both_settle() {
    let dir = tempfile::tempdir().unwrap();
    let node = quiet_node(dir.path(), false).await;
    let mut streams = Vec::new();
    for name in ["twin-a", "twin-b"] {
        let stream = retained_stream(&node.url(), name, keep(1), None).await;
        publish_schema(&node, &stream).await;
        add_note(&node, &stream, "kept").await;
        let secret = add_note(&node, &stream, SECRET).await;
        many_versions(&node, &stream, "page", name, VERSIONS).await;
        settled_digests(&node, &stream).await;
        streams.push((stream, secret, generations(&node, &stream).await));
    }
    let befores: Vec<u64> = streams.iter().map(|(s, ..)| count(&node, s)).collect();
    let runs: Vec<_> = streams.iter().map(|(s, ..)| start_run(&node, s)).collect();
    wait_mid_run(&node, &streams[0].0, befores[0], &runs[0]).await;
    redact(&node, &streams[0].0, &streams[0].1, "twin")
        .await
        .unwrap();
    redact(&node, &streams[1].0, &streams[1].1, "twin")
        .await
        .unwrap();
    for run in runs {
        run.await.unwrap().unwrap();
    }
    for (stream, _, was) in &streams {
        let settled = settled_digests(&node, stream).await;
        assert_eq!(settled, fresh_digests(dir.path(), stream));
        assert_eq!(
            query_notes(&node.url(), &stream.to_hex()).await,
            vec![json!(["kept"])]
        );
        for ((name, was), (_, now)) in was.iter().zip(&generations(&node, stream).await) {
            assert!(now > was, "{name}: rebuilt");
        }
    }
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// A real process killed mid-run.

async fn status_at(url: &str) -> pb::StatusReply {
    clients(url)
        .await
        .admin
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner()
}

async fn scribes_at(url: &str, stream: &StreamId) -> u64 {
    clients(url)
        .await
        .streams
        .get(pb::GetStreamRequest {
            stream: bytes_of(stream),
        })
        .await
        .unwrap()
        .into_inner()
        .scribes
}

/// The stream's digests at `url` once its copies settled (as `settled_digests`, over the API).
async fn settled_at(url: &str, stream: &StreamId) -> Vec<(String, Bytes)> {
    let id = bytes_of(stream);
    wait_until(CONVERGE, "the stream's projections settled", || async {
        let status = status_at(url).await;
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
    let mut client = pb::projections_client::ProjectionsClient::new(owner_channel(url).await);
    let mut out = Vec::new();
    for name in ["sql", "kv", "files"] {
        let digest = client
            .digest(pb::DigestRequest {
                name: name.into(),
                stream: bytes_of(stream),
            })
            .await
            .unwrap()
            .into_inner()
            .digest;
        out.push((name.to_string(), digest));
    }
    out
}

async fn append_at(url: &str, stream: &StreamId, kind: &str, payload: Vec<u8>) -> ScribeId {
    let reply = clients(url)
        .await
        .log
        .append(pb::AppendRequest {
            stream: bytes_of(stream),
            kind: kind.into(),
            content_type: "application/json".into(),
            payload: Bytes::from(payload),
            parents: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    ScribeId::from_slice(&reply.id).unwrap()
}

/// SIGKILL of `quire serve` in the middle of a multi-job prune run, right after a redaction
/// committed mid-run: after the restart every copy settles (the recorded rebuild finishes) with a
/// clean replay's digests and without the redacted note; the rest of the run then prunes the
/// remainder, and the copies settle again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_with_a_redaction_in_flight_settles_to_a_clean_replay() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url, _) =
        crate::crash::spawn_serve_with(dir.path(), &["--prune-every", "0"]).await;
    let stream = retained_stream(&url, "crash-run", keep(1), None).await;
    let (_, schema) = quire::projection_api::files::FileChange::Put {
        path: "_schema".into(),
        content_type: "application/json".into(),
        data: br#"{"schema": {"note": {"text": "text"}}}"#.to_vec(),
    }
    .encode();
    append_at(&url, &stream, "file.put", schema).await;
    let note = |text: &str| {
        json!({"_table": "note", "text": text})
            .to_string()
            .into_bytes()
    };
    append_at(&url, &stream, "record.add", note("kept")).await;
    let secret = append_at(&url, &stream, "record.add", note(SECRET)).await;
    // The versions, through the API of the child (`many_versions` needs an in-process node).
    for batch in 0..VERSIONS.div_ceil(1000) {
        let appends = (batch * 1000..((batch + 1) * 1000).min(VERSIONS))
            .map(|v| {
                let (kind, payload) = quire::projection_api::files::FileChange::Put {
                    path: "page".into(),
                    content_type: "text/plain".into(),
                    data: format!("crash v{v}").into_bytes(),
                }
                .encode();
                pb::AppendRequest {
                    stream: bytes_of(&stream),
                    kind: kind.as_str().into(),
                    content_type: quire::projection_api::files::CONTENT_TYPE.into(),
                    payload: Bytes::from(payload),
                    parents: vec![],
                }
            })
            .collect();
        clients(&url)
            .await
            .log
            .append_batch(pb::AppendBatchRequest {
                appends,
                signed: vec![],
                sealed: vec![],
            })
            .await
            .unwrap();
    }
    settled_at(&url, &stream).await;
    let before = scribes_at(&url, &stream).await;
    let run = crate::retention::prune_in_background(&url, &stream);
    wait_until(CONVERGE, "the run's first commit", || async {
        scribes_at(&url, &stream).await >= before + JOB || run.is_finished()
    })
    .await;
    assert!(!run.is_finished(), "the run ended before the kill");
    let redacted = clients(&url)
        .await
        .streams
        .redact(pb::RedactRequest {
            stream: bytes_of(&stream),
            target: bytes_of(&secret),
            reason: "mid-run".into(),
        })
        .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let answered = matches!(run.await, Ok(Ok(_)));
    assert!(redacted.is_ok(), "{redacted:?}");

    let (mut child, url) = crate::crash::spawn_serve(dir.path()).await;
    let after_restart = settled_at(&url, &stream).await;
    let notes = query_notes(&url, &stream.to_hex()).await;
    assert_eq!(notes, vec![json!(["kept"])], "the redaction held");
    let rest = clients(&url)
        .await
        .streams
        .prune(pb::PruneRequest {
            stream: bytes_of(&stream),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    if answered {
        assert_eq!(rest.streams[0].pruned_now, 0);
    }
    let settled = settled_at(&url, &stream).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let fresh = fresh_digests(dir.path(), &stream);
    assert_eq!(settled, fresh);
    // Pruning superseded versions changes no digest: the copies right after the restart already
    // had the final state.
    assert_eq!(after_restart, fresh);
}

// ---------------------------------------------------------------------------------------------
// kv erasures by their set, across two nodes.

/// The `kv.set` scribes of `stream` on `node`, in local order.
async fn kv_writes(node: &RunningNode, stream: &StreamId) -> Vec<ScribeId> {
    read_all(&mut clients(&node.url()).await)
        .await
        .into_iter()
        .filter(|entry| entry.stream == bytes_of(stream) && entry.kind == "kv.set")
        .map(|entry| ScribeId::from_slice(&entry.id).unwrap())
        .collect()
}

/// B writes a key three times; while the two nodes are apart, the owner A prunes B's two older
/// writes and B (their author) redacts the oldest. Once they meet, both hold the same scribes
/// and the same digests as a clean replay of their own log; a second prune pass on A (the
/// planner judging the redact-plus-prune as the projector does) changes no digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authors_redact_of_a_write_its_owner_pruned_meanwhile_converges() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = quiet_node(dirs[0].path(), true).await;
    let b = quiet_node(dirs[1].path(), true).await;
    let stream = retained_stream(&a.url(), "kv-set-erasures", keep(1), None).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    for v in 1..=3 {
        kv_set(&b.url(), &stream, "k", &format!("value-{v}"))
            .await
            .unwrap();
    }
    let writes = kv_writes(&b, &stream).await;
    assert_eq!(writes.len(), 3);
    let total = count(&b, &stream);
    wait_for_count(&[&a], &stream, total).await;
    part(&b, &a).await;

    let pruned = prune(&a, &stream, false).await.unwrap();
    assert_eq!(pruned.pruned_now, 2, "{pruned:?}");
    redact(&b, &stream, &writes[0], "author's own")
        .await
        .unwrap();

    // A's scribes and B's redaction (counted before they meet: afterwards A may hold it already).
    let total = count(&a, &stream) + 1;
    connect(&b, &a).await;
    // (What each node holds is printed as it changes: a run that times out shows who lacks what.)
    let seen = std::cell::Cell::new((0, 0));
    wait_until(CONVERGE, "both nodes hold every scribe", || async {
        let now = (count(&a, &stream), count(&b, &stream));
        if seen.replace(now) != now {
            eprintln!("A holds {}, B {}, of {total}", now.0, now.1);
        }
        now == (total, total)
    })
    .await;
    let (da, db) = (
        settled_digests(&a, &stream).await,
        settled_digests(&b, &stream).await,
    );
    assert_eq!(da, db, "the same scribes, the same digests");
    assert_eq!(da, fresh_digests(dirs[0].path(), &stream));
    assert_eq!(db, fresh_digests(dirs[1].path(), &stream));
    let again = prune(&a, &stream, false).await.unwrap();
    wait_for_count(&[&b], &stream, count(&a, &stream)).await;
    assert_eq!(settled_digests(&a, &stream).await, da, "{again:?}");
    assert_eq!(settled_digests(&b, &stream).await, da);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
