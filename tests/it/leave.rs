//! `quire stream leave`: a node stops holding a stream and deletes every local copy of it
//! (scribes, payloads nothing else names, seals, projection copies), on real RocksDB and SQLite,
//! through the CLI, gRPC and HTTP; a refused leave changes nothing; a leave a stop interrupted
//! finishes at the next start; joining again fetches the stream whole.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use proptest::prelude::*;
use quire::api::access::app_label;
use quire::log::store::StoredEntry;
use quire::log::{Draft, NewScribe};
use quire::node::{NodeConfig, RunningNode};
use quire::pb;
use quire::projection_api::{Kind, ScribeId, StreamId};
use serde_json::json;

use crate::common::*;
use crate::replication::{connect, converge, digests, join, stream_ids, wait_for_count, CONVERGE};

/// Bytes only the stream that is left carries: none may stay on the leaving node's disk.
const SECRET: &str = "leave-me-7f3a9c-secret";

/// Every file under `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path)
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
            {
                found.push(path);
            }
        }
    }
    found
}

/// A file of `len` bytes made of `text` repeated (over 1 KiB: stored apart, once per hash).
pub fn big(text: &str, len: usize) -> Bytes {
    Bytes::from(text.bytes().cycle().take(len).collect::<Vec<u8>>())
}

pub async fn put_file(
    url: &str,
    stream: &StreamId,
    path: &str,
    data: Bytes,
) -> Result<Bytes, tonic::Status> {
    pb::files_client::FilesClient::new(owner_channel(url).await)
        .put(pb::FilesPutRequest {
            stream: bytes_of(stream),
            path: path.into(),
            content_type: String::new(),
            data,
        })
        .await
        .map(|reply| reply.into_inner().id)
}

pub async fn kv_set(
    url: &str,
    stream: &StreamId,
    key: &str,
    value: &str,
) -> Result<(), tonic::Status> {
    pb::kv_client::KvClient::new(owner_channel(url).await)
        .set(pb::KvSetRequest {
            stream: bytes_of(stream),
            key: Bytes::from(key.to_string()),
            value: Bytes::from(value.to_string()),
        })
        .await
        .map(|_| ())
}

async fn add_record(node: &RunningNode, stream: &StreamId, text: &str) {
    clients(&node.url())
        .await
        .log
        .append(pb::AppendRequest {
            stream: bytes_of(stream),
            kind: "record.add".into(),
            content_type: "application/json".into(),
            payload: Bytes::from(json!({"_table": "notes", "text": text}).to_string()),
            parents: vec![],
        })
        .await
        .expect("add a record");
}

/// Records, kv writes and files into `stream`, each carrying `text`; returns its file.put id of
/// `shared.bin` (the same bytes in every stream this is called for).
async fn fill(node: &RunningNode, stream: &StreamId, text: &str) -> Bytes {
    let url = node.url();
    for index in 0..5 {
        add_record(node, stream, &format!("{text} {index}")).await;
        let key = format!("k{}", index % 2);
        kv_set(&url, stream, &key, &format!("{text} {index}"))
            .await
            .unwrap();
    }
    let page = big(&format!("<p>{text}</p>"), 4096);
    put_file(&url, stream, "site/index.html", page)
        .await
        .unwrap();
    let shared = big("the same bytes everywhere ", 2048);
    put_file(&url, stream, "shared.bin", shared).await.unwrap()
}

/// The copies of `stream`'s projections under `dir`.
fn copies(dir: &Path, stream: &StreamId) -> Vec<PathBuf> {
    ["sql", "kv", "files"]
        .iter()
        .map(|name| dir.join("projections").join(name).join(stream.to_hex()))
        .filter(|path| path.exists())
        .collect()
}

/// `quire verify -d dir`: its output, which must report no damage.
pub fn verify_clean(dir: &Path) -> String {
    let output = std::process::Command::new(quire_bin())
        .args(["verify", "-d"])
        .arg(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "verify found damage:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

async fn get_scribe(node: &RunningNode, id: &Bytes) -> Result<pb::Entry, tonic::Status> {
    clients(&node.url())
        .await
        .log
        .get(pb::GetScribeRequest { id: id.clone() })
        .await
        .map(|reply| reply.into_inner())
}

fn refused_by_peers(status: &pb::StatusReply) -> u64 {
    status.peers.iter().map(|peer| peer.refused).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_deletes_every_local_copy_and_joining_again_fetches_the_stream_whole() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = start_node(dir_b.path()).await;
    let mut owner_a = clients(&a.url()).await;
    let left = create_stream(&mut owner_a, "left", None).await;
    let kept = create_stream(&mut owner_a, "kept", None).await;
    fill(&a, &left, SECRET).await;
    let shared_in_kept = fill(&a, &kept, "kept").await;
    connect(&b, &a).await;
    join(&b, &left).await;
    join(&b, &kept).await;
    let count = |node: &RunningNode, stream: &StreamId| {
        node.log
            .stream(stream)
            .map_or(0, |state| state.record.scribes)
    };
    let (left_count, kept_count) = (count(&a, &left), count(&a, &kept));
    converge(&a, &b, &left, left_count).await;
    converge(&a, &b, &kept, kept_count).await;
    assert!(!files_containing(dir_b.path(), SECRET.as_bytes()).is_empty());
    let left_ids = stream_ids(&a, &left).await;
    let b_head = b.log.head();
    // A subscriber of the stream on B: caught up now, ended by the leave.
    let mut subscription = clients(&b.url())
        .await
        .log
        .subscribe(pb::SubscribeRequest {
            stream: bytes_of(&left),
            from_seq: 0,
            consumer: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let event = subscription.message().await.unwrap().unwrap();
        if matches!(event.event, Some(pb::subscribe_event::Event::CaughtUp(_))) {
            break;
        }
    }

    // The owner leaves it through the CLI.
    let mut cli = quire_cli(&b.url());
    cli.args(["stream", "leave", &left.to_hex(), "--yes"]);
    let output = tokio::task::spawn_blocking(move || cli.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "leave failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "left {} (left): deleted {left_count} scribes, 1 payloads (",
            left.to_hex()
        )),
        "{stdout}"
    );
    // Every seal of the stream went: each covered only its own scribes.
    assert!(
        stdout.contains(&format!("{left_count} seals and 3 projection copies")),
        "{stdout}"
    );

    let ended = loop {
        match subscription.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the subscription ended without saying why"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::NotFound, "{ended:?}");
    assert!(ended.message().contains("left stream"), "{ended:?}");

    // Gone from B: the stream, every scribe of it, its projection copies, its bytes on disk.
    let mut owner_b = clients(&b.url()).await;
    let missing = owner_b
        .streams
        .get(pb::GetStreamRequest {
            stream: bytes_of(&left),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    for id in &left_ids {
        let gone = get_scribe(&b, id).await.unwrap_err();
        assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");
    }
    let entries = read_all(&mut owner_b).await;
    assert!(entries.iter().all(|entry| entry.stream != bytes_of(&left)));
    assert_eq!(
        entries.len() as u64,
        kept_count,
        "only the kept stream is left in B's log"
    );
    assert_eq!(
        b.log.head(),
        b_head,
        "the head stays: seqs are vacated, not reused"
    );
    assert_eq!(copies(dir_b.path(), &left), Vec::<PathBuf>::new());
    assert_eq!(
        files_containing(dir_b.path(), SECRET.as_bytes()),
        Vec::<PathBuf>::new(),
        "the left stream's bytes are still on B's disk"
    );
    let report = verify_clean(dir_b.path());
    assert!(
        report.contains(&format!(
            "({left_count} seqs vacated by leaving their streams)"
        )),
        "{report}"
    );

    // The kept stream is whole, with the payload it shares with the left one.
    assert_eq!(digests(&a, &kept).await, digests(&b, &kept).await);
    let shared = get_scribe(&b, &shared_in_kept)
        .await
        .expect("shared file scribe");
    assert!(shared
        .payload
        .ends_with(&big("the same bytes everywhere ", 2048)));

    // A keeps writing into both: B takes the kept stream's and nothing of the left one, and
    // counts no refusal against A.
    add_record(&a, &left, &format!("{SECRET} after")).await;
    add_record(&a, &kept, "kept after").await;
    wait_for_count(&[&b], &kept, kept_count + 1).await;
    assert!(b.log.stream(&left).is_none());
    assert_eq!(refused_by_peers(&node_status(&b).await), 0);
    assert_eq!(
        files_containing(dir_b.path(), SECRET.as_bytes()),
        Vec::<PathBuf>::new()
    );

    // Joining again fetches it whole, and the copies agree again.
    join(&b, &left).await;
    converge(&a, &b, &left, left_count + 1).await;
    assert_eq!(refused_by_peers(&node_status(&b).await), 0);
    verify_clean(dir_b.path());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// What a refused leave must leave as it was: the log's ids, the streams, every projection digest.
async fn state(
    node: &RunningNode,
    streams: &[StreamId],
) -> (Vec<Bytes>, Vec<StreamId>, Vec<Vec<(String, Bytes)>>) {
    let ids = read_all(&mut clients(&node.url()).await)
        .await
        .into_iter()
        .map(|entry| entry.id)
        .collect();
    let held = node
        .log
        .streams()
        .into_iter()
        .map(|state| state.id)
        .collect();
    let mut all = Vec::new();
    for stream in streams {
        all.push(digests(node, stream).await);
    }
    (ids, held, all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_leave_changes_nothing_and_an_owner_leave_over_http_answers_what_went() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut owner = clients(&node.url()).await;
    let app = create_stream(&mut owner, "app", None).await;
    let other = create_stream(&mut owner, "other", None).await;
    fill(&node, &app, "app").await;
    fill(&node, &other, "other").await;
    let streams = [app, other];
    wait_until(CONVERGE, "projections caught up", || async {
        digests(&node, &app)
            .await
            .iter()
            .all(|(_, d)| !d.is_empty())
    })
    .await;
    let before = state(&node, &streams).await;

    // gRPC: a stream not held, a stranger, a malformed id.
    let unknown = owner
        .streams
        .leave(pb::LeaveStreamRequest {
            stream: Bytes::from(vec![7u8; 32]),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    assert!(unknown.message().contains("not held"), "{unknown:?}");
    let mut stranger = pb::streams_client::StreamsClient::new(stranger_channel(&node.url()).await);
    let refused = stranger
        .leave(pb::LeaveStreamRequest {
            stream: bytes_of(&app),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let bad = owner
        .streams
        .leave(pb::LeaveStreamRequest {
            stream: Bytes::from_static(b"short"),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");

    // HTTP: no token, and the app's own page (its origin, on its host).
    let path = format!("/{}/leave", app.to_hex());
    let (status, reply) = http_to(
        &node,
        None,
        reqwest::Method::POST,
        &path,
        &[],
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 401, "{reply}");
    let host = format!("{}.localhost", app_label(&app));
    let origin = format!("http://{host}:{}", node.api_addr.port());
    let (status, reply) = http_to(
        &node,
        Some(&host),
        reqwest::Method::POST,
        "/leave",
        &[("origin", origin)],
        Some(json!({})),
    )
    .await;
    assert!(status == 403 || status == 404, "{status} {reply}");

    // The CLI without --yes, with no terminal to ask on.
    let mut cli = quire_cli(&node.url());
    cli.args(["stream", "leave", &app.to_hex()])
        .stdin(std::process::Stdio::null());
    let output = tokio::task::spawn_blocking(move || cli.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success());
    assert!(stderr.contains("--yes"), "{stderr}");

    assert_eq!(
        state(&node, &streams).await,
        before,
        "a refused leave changed something"
    );

    // The owner, over HTTP: the answer says what went; a second leave is NOT_FOUND.
    let app_scribes = node.log.stream(&app).unwrap().record.scribes;
    let bearer = [("authorization", format!("Bearer {}", node.token.as_str()))];
    let owner_leave = || {
        http_to(
            &node,
            None,
            reqwest::Method::POST,
            &path,
            &bearer,
            Some(json!({})),
        )
    };
    let (status, reply) = owner_leave().await;
    assert_eq!(status, 200, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["scribes"], app_scribes, "{reply}");
    assert_eq!(reply["payloads"], 1, "{reply}");
    assert_eq!(reply["projections"], 3, "{reply}");
    let (status, reply) = owner_leave().await;
    assert_eq!(status, 404, "{reply}");
    // The other stream is as it was.
    assert_eq!(digests(&node, &other).await, before.2[1]);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_a_stop_interrupted_finishes_when_the_node_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut owner = clients(&node.url()).await;
    let left = create_stream(&mut owner, "left", None).await;
    let kept = create_stream(&mut owner, "kept", None).await;
    fill(&node, &left, SECRET).await;
    append_bulk(&mut owner, &left, 3000).await;
    fill(&node, &kept, "kept").await;
    let left_count = node.log.stream(&left).unwrap().record.scribes;
    wait_until(CONVERGE, "the left stream's copies to exist", || async {
        copies(dir.path(), &left).len() == 3
    })
    .await;
    let kept_before = {
        wait_until(CONVERGE, "projections caught up", || async {
            digests(&node, &kept)
                .await
                .iter()
                .all(|(_, d)| !d.is_empty())
        })
        .await;
        digests(&node, &kept).await
    };
    // The leave begins and deletes a few scribes; then the node stops.
    node.log.begin_leave(left).await.unwrap();
    let some = node.log.store().leave_chunk(&left, 10).unwrap();
    assert_eq!(some.scribes, 10);
    let head = node.log.head();
    node.stop().await.unwrap();

    let node = start_node(dir.path()).await;
    assert!(node.log.stream(&left).is_none());
    assert_eq!(node.log.head(), head);
    wait_until(CONVERGE, "the interrupted leave to finish", || async {
        !node.log.is_leaving(&left) && copies(dir.path(), &left).is_empty()
    })
    .await;
    let entries = read_all(&mut clients(&node.url()).await).await;
    assert!(entries.iter().all(|entry| entry.stream != bytes_of(&left)));
    node.stop().await.unwrap();
    assert_eq!(
        files_containing(dir.path(), SECRET.as_bytes()),
        Vec::<PathBuf>::new()
    );
    let report = verify_clean(dir.path());
    assert!(
        report.contains(&format!("({left_count} seqs vacated")),
        "{report}"
    );
    let node = start_node(dir.path()).await;
    wait_until(
        CONVERGE,
        "the kept stream's copies as they were",
        || async { digests(&node, &kept).await == kept_before },
    )
    .await;
    node.stop().await.unwrap();
}

/// One step of the property: a note into stream `stream` (of three) with payload `payload` (of a
/// pool shared by all streams; the odd ones are over 1 KiB, stored apart).
#[derive(Debug, Clone)]
struct Note {
    stream: usize,
    payload: usize,
}

fn pool(index: usize) -> Bytes {
    if index % 2 == 1 {
        big(&format!("payload {index} "), 1500)
    } else {
        Bytes::from(format!("small {index}"))
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// For any history of three streams sharing payloads, and any streams left: every scribe of a
    /// kept stream reads back whole, no scribe of a left one does, the log reads in seq order with
    /// the head unchanged, no payload stays that no stored scribe names, and verify finds no damage.
    #[test]
    fn leaving_keeps_everything_else_whole_and_drops_only_what_nothing_names(
        notes in prop::collection::vec((0usize..3, 0usize..6).prop_map(|(stream, payload)| Note { stream, payload }), 0..60),
        leave in prop::collection::btree_set(0usize..3, 1..=3),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let dir = tempfile::tempdir().unwrap();
            let log = quire::node::open_log(&NodeConfig::new(dir.path())).unwrap();
            let mut streams = Vec::new();
            for index in 0..3u8 {
                let genesis = quire::genesis::genesis_payload(&format!("s{index}"), None, None, None, [index; 16]);
                let appended = log
                    .append_one(Draft::New(NewScribe {
                        stream: None,
                        kind: Kind::StreamCreate,
                        content_type: quire::genesis::GENESIS_CONTENT_TYPE.into(),
                        payload: Bytes::from(genesis),
                        parents: vec![],
                    }))
                    .await
                    .unwrap();
                streams.push(appended.id);
            }
            let mut written: BTreeMap<ScribeId, (usize, Bytes)> = BTreeMap::new();
            // Each batch is one group: node seals span the streams of a batch.
            for batch in notes.chunks(7) {
                let drafts = batch
                    .iter()
                    .map(|note| {
                        Draft::New(NewScribe {
                            stream: Some(streams[note.stream]),
                            kind: "x.note".parse().unwrap(),
                            content_type: "text/plain".into(),
                            payload: pool(note.payload),
                            parents: vec![],
                        })
                    })
                    .collect();
                let appended = log.append(drafts, quire::log::Origin::Local).await.unwrap();
                for (note, appended) in batch.iter().zip(appended) {
                    written.insert(appended.id, (note.stream, pool(note.payload)));
                }
            }
            let head = log.head();
            for index in &leave {
                let stream = streams[*index];
                log.begin_leave(stream).await.unwrap();
                log.finish_leave(stream).await.unwrap();
                log.end_leave(stream).await.unwrap();
            }
            assert_eq!(log.head(), head);
            let kept: HashSet<usize> = (0..3).filter(|index| !leave.contains(index)).collect();
            for (id, (stream, payload)) in &written {
                match log.get(id).unwrap() {
                    Some(entry) => {
                        assert!(kept.contains(stream), "a scribe of a left stream is still stored");
                        assert_eq!(&entry.parts.payload, payload);
                    }
                    None => assert!(!kept.contains(stream), "a kept scribe is gone"),
                }
            }
            let mut read = Vec::new();
            loop {
                let chunk = log.read(None, read.last().map_or(1, |e: &StoredEntry| e.seq + 1), usize::MAX).unwrap();
                read.extend(chunk.entries);
                if !chunk.more {
                    break;
                }
            }
            assert!(read.windows(2).all(|pair| pair[0].seq < pair[1].seq));
            let expected = written.values().filter(|(stream, _)| kept.contains(stream)).count()
                + kept.len();
            assert_eq!(read.len(), expected);
            let report = quire::verify::verify(dir.path()).unwrap();
            assert_eq!(report.damage, Vec::<String>::new());
            assert_eq!(report.scribes as usize, expected);
            assert_eq!(report.vacated + report.scribes, head);
            log.close().await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_while_leaving_is_refused_and_the_leave_of_a_pending_join_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut owner = clients(&node.url()).await;
    let stream = create_stream(&mut owner, "s", None).await;
    node.log.begin_leave(stream).await.unwrap();
    let refused = owner
        .streams
        .join(pb::JoinStreamRequest {
            stream: bytes_of(&stream),
            timeout_ms: 100,
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("leaving"), "{refused:?}");
    let again = owner
        .streams
        .leave(pb::LeaveStreamRequest {
            stream: bytes_of(&stream),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    // A pending join is not a held stream: the answer names `join --cancel`.
    let pending = StreamId::from([9u8; 32]);
    let _ = owner
        .streams
        .join(pb::JoinStreamRequest {
            stream: bytes_of(&pending),
            timeout_ms: 1,
        })
        .await;
    let not_held = owner
        .streams
        .leave(pb::LeaveStreamRequest {
            stream: bytes_of(&pending),
        })
        .await
        .unwrap_err();
    assert_eq!(not_held.code(), tonic::Code::NotFound, "{not_held:?}");
    assert!(not_held.message().contains("join --cancel"), "{not_held:?}");
    node.stop().await.unwrap();
}
