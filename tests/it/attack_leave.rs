//! Attacks on `quire stream leave` (written by a reviewing helper): leaving under load, readers
//! that outlive the copy they read, a leave whose client goes away, a stop at any instant.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quire::node::RunningNode;
use quire::pb;
use quire::projection_api::StreamId;

use crate::common::*;
use crate::crash::spawn_serve;
use crate::leave::{big, files_containing, kv_set, put_file, verify_clean};
use crate::replication::{connect, converge, digests, join, stream_ids, CONVERGE};

/// Bytes only the stream that is left carries.
const SECRET: &str = "attack-leave-c0ffee-secret";

/// Files under `dir` that are deleted but still open in this process and whose bytes contain
/// `needle`: they still take room on the disk, with those bytes in it.
fn deleted_but_open_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let Some(path) = target.strip_suffix(" (deleted)") else {
            continue;
        };
        if !Path::new(path).starts_with(&dir) {
            continue;
        }
        if std::fs::read(entry.path())
            .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        {
            found.push(path.to_string());
        }
    }
    found
}

async fn kv_get(url: &str, stream: &StreamId, key: &str) -> Result<Bytes, tonic::Status> {
    pb::kv_client::KvClient::new(owner_channel(url).await)
        .get(pb::KvGetRequest {
            stream: bytes_of(stream),
            key: Bytes::from(key.to_string()),
        })
        .await
        .map(|reply| reply.into_inner().value)
}

async fn leave(url: &str, stream: &StreamId) -> pb::LeaveStreamReply {
    clients(url)
        .await
        .streams
        .leave(pb::LeaveStreamRequest {
            stream: bytes_of(stream),
        })
        .await
        .expect("leave")
        .into_inner()
}

/// Whether every projection of `stream` on `node` has a copy (a digest) yet.
async fn copies_open(node: &RunningNode, stream: &StreamId) -> bool {
    let mut client =
        pb::projections_client::ProjectionsClient::new(owner_channel(&node.url()).await);
    for name in ["sql", "kv", "files"] {
        let digest = client
            .digest(pb::DigestRequest {
                name: name.into(),
                stream: bytes_of(stream),
            })
            .await;
        if digest.is_err() {
            return false;
        }
    }
    true
}

/// [`converge`], once both nodes have opened their copies of the stream.
async fn settle(a: &RunningNode, b: &RunningNode, stream: &StreamId) {
    wait_until(CONVERGE, "the copies of the stream to open", || async {
        copies_open(a, stream).await && copies_open(b, stream).await
    })
    .await;
    converge(a, b, stream, scribes_of(a, stream)).await;
}

fn scribes_of(node: &RunningNode, stream: &StreamId) -> u64 {
    node.log
        .stream(stream)
        .map_or(0, |state| state.record.scribes)
}

/// Two nodes; A creates `s` with one kv value, B joins it and reads the value (its reader goes
/// back to the pool).
async fn joined_pair(
    dir_a: &Path,
    dir_b: &Path,
    value: &str,
) -> (RunningNode, RunningNode, StreamId) {
    let a = start_node(dir_a).await;
    let b = start_node(dir_b).await;
    let stream = create_stream(&mut clients(&a.url()).await, "s", None).await;
    kv_set(&a.url(), &stream, "k", value).await.unwrap();
    connect(&b, &a).await;
    join(&b, &stream).await;
    settle(&a, &b, &stream).await;
    assert_eq!(
        kv_get(&b.url(), &stream, "k").await.unwrap(),
        Bytes::from(value.to_string())
    );
    (a, b, stream)
}

/// A stream left and joined again on B is read from its new copy: B's idle kv readers of the
/// deleted copy (same directory path: the new slot starts again at generation 0) must not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_stream_joined_again_is_read_from_its_new_copy_not_from_a_reader_of_the_deleted_one() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b, stream) = joined_pair(dir_a.path(), dir_b.path(), "before").await;
    leave(&b.url(), &stream).await;
    kv_set(&a.url(), &stream, "k", "after").await.unwrap();
    join(&b, &stream).await;
    settle(&a, &b, &stream).await;
    assert_eq!(
        kv_get(&a.url(), &stream, "k").await.unwrap(),
        Bytes::from_static(b"after")
    );
    assert_eq!(
        kv_get(&b.url(), &stream, "k").await.unwrap(),
        Bytes::from_static(b"after"),
        "B's copy converged (same digests as A) but Kv.Get on B answers the value of the copy \
         its leave deleted"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// After a leave, no file of the left stream's copies stays open: a deleted file still open keeps
/// its bytes on the disk (the pool of idle readers holds the SQLite files it read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn no_reader_keeps_a_deleted_copy_of_the_left_stream_open() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b, stream) = joined_pair(dir_a.path(), dir_b.path(), SECRET).await;
    assert!(!files_containing(dir_b.path(), SECRET.as_bytes()).is_empty());
    leave(&b.url(), &stream).await;
    assert_eq!(
        files_containing(dir_b.path(), SECRET.as_bytes()),
        Vec::<PathBuf>::new()
    );
    assert_eq!(
        deleted_but_open_containing(dir_b.path(), SECRET.as_bytes()),
        Vec::<String>::new(),
        "files of the left stream, deleted but still open, keep its bytes on B's disk"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// A leave whose client goes away (a timeout, a closed terminal) still finishes: the mark goes
/// and the stream may be joined again without restarting the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_leave_whose_client_goes_away_still_finishes() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = start_node(dir_b.path()).await;
    let mut owner_a = clients(&a.url()).await;
    let stream = create_stream(&mut owner_a, "big", None).await;
    append_bulk(&mut owner_a, &stream, 20_000).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    settle(&a, &b, &stream).await;

    let url = b.url();
    let call = tokio::spawn(async move {
        clients(&url)
            .await
            .streams
            .leave(pb::LeaveStreamRequest {
                stream: bytes_of(&stream),
            })
            .await
    });
    // The leave has begun (the stream is no longer held); the client goes away.
    wait_until(CONVERGE, "the leave to begin", || async {
        b.log.stream(&stream).is_none()
    })
    .await;
    call.abort();
    let outcome = call.await;
    assert!(
        outcome.as_ref().is_err_and(|error| error.is_cancelled()),
        "the leave answered before its client went away: {outcome:?}"
    );
    wait_until(
        Duration::from_secs(60),
        "the leave to finish without its client",
        || async { !b.log.is_leaving(&stream) },
    )
    .await;
    join(&b, &stream).await;
    settle(&a, &b, &stream).await;
    verify_clean(dir_b.path());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// What the writers of the concurrent test saw.
#[derive(Default)]
struct Seen {
    /// Ids of the kept stream's acknowledged appends and file puts.
    kept: Vec<Bytes>,
    /// Kv values the kept stream acknowledged (key → last value).
    kv: std::collections::BTreeMap<String, String>,
    /// Codes of refused writes into the left stream.
    refused_left: Vec<tonic::Code>,
    /// Codes of refused writes into the kept stream (none expected).
    refused_kept: Vec<String>,
}

/// Leaving a big stream while clients write into it and into another stream (appends, kv sets,
/// file puts): nothing of the other stream is lost, no write into the left one fails with an
/// internal error or lands after the leave, and verify finds no damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_under_concurrent_writes_keeps_every_other_write_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut owner = clients(&node.url()).await;
    let left = create_stream(&mut owner, "left", None).await;
    let kept = create_stream(&mut owner, "kept", None).await;
    append_bulk(&mut owner, &left, 12_000).await;
    put_file(&node.url(), &left, "secret.bin", big(SECRET, 4096))
        .await
        .unwrap();
    // The same bytes in both streams: the kept one keeps them.
    let shared = big("shared between the streams ", 3000);
    put_file(&node.url(), &left, "shared.bin", shared.clone())
        .await
        .unwrap();
    let shared_id = put_file(&node.url(), &kept, "shared.bin", shared.clone())
        .await
        .unwrap();

    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for writer in 0..4usize {
        let (url, seen, stop) = (node.url(), seen.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut owner = clients(&url).await;
            let mut index = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || index < 20 {
                index += 1;
                let target = if index % 2 == 0 { kept } else { left };
                let result: Result<Option<Bytes>, tonic::Status> = match (writer, index % 3) {
                    (0 | 1, _) | (_, 0) => owner
                        .log
                        .append(pb::AppendRequest {
                            stream: bytes_of(&target),
                            kind: "x.note".into(),
                            content_type: "text/plain".into(),
                            payload: Bytes::from(format!("w{writer} #{index}")),
                            parents: vec![],
                        })
                        .await
                        .map(|reply| Some(reply.into_inner().id)),
                    (2, _) => {
                        let key = format!("w{writer}k{}", index % 5);
                        let value = format!("w{writer} #{index}");
                        kv_set(&url, &target, &key, &value).await.map(|()| {
                            if target == kept {
                                seen.lock().unwrap().kv.insert(key, value);
                            }
                            None
                        })
                    }
                    _ => put_file(
                        &url,
                        &target,
                        &format!("f{}", index % 7),
                        big(&format!("w{writer} #{index} "), 2000),
                    )
                    .await
                    .map(Some),
                };
                let mut seen = seen.lock().unwrap();
                match result {
                    Ok(Some(id)) if target == kept => seen.kept.push(id),
                    Ok(_) => {}
                    Err(status) if target == left => seen.refused_left.push(status.code()),
                    Err(status) => seen.refused_kept.push(format!("{status:?}")),
                }
            }
        }));
    }
    // Let the writers get going, then leave.
    wait_until(CONVERGE, "writes into both streams", || async {
        seen.lock().unwrap().kept.len() >= 10
    })
    .await;
    let reply = leave(&node.url(), &left).await;
    assert!(reply.scribes >= 12_000, "{reply:?}");
    let refused_before_stop = seen.lock().unwrap().refused_left.len();
    wait_until(CONVERGE, "writes into the left stream refused", || async {
        seen.lock().unwrap().refused_left.len() > refused_before_stop + 5
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen.refused_kept, Vec::<String>::new());
    let bad: Vec<_> = seen
        .refused_left
        .iter()
        .filter(|code| {
            !matches!(
                code,
                tonic::Code::NotFound | tonic::Code::FailedPrecondition
            )
        })
        .collect();
    assert!(
        bad.is_empty(),
        "writes into the left stream failed with {bad:?}"
    );

    // Nothing of the left stream is stored, everything acknowledged of the kept one is.
    assert!(node.log.stream(&left).is_none());
    assert!(!node.log.is_leaving(&left));
    let entries = read_all(&mut owner).await;
    assert!(entries.iter().all(|entry| entry.stream != bytes_of(&left)));
    let stored: std::collections::HashSet<Bytes> =
        entries.iter().map(|entry| entry.id.clone()).collect();
    for id in seen.kept.iter().chain([&shared_id]) {
        assert!(
            stored.contains(id),
            "an acknowledged scribe of the kept stream is gone"
        );
    }
    let shared_entry = owner
        .log
        .get(pb::GetScribeRequest {
            id: shared_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(shared_entry.payload.ends_with(&shared));
    for (key, value) in &seen.kv {
        assert_eq!(
            kv_get(&node.url(), &kept, key).await.unwrap(),
            Bytes::from(value.clone()),
            "kv {key}"
        );
    }
    let kept_digests = digests(&node, &kept).await;
    node.stop().await.unwrap();
    assert_eq!(
        files_containing(dir.path(), SECRET.as_bytes()),
        Vec::<PathBuf>::new()
    );
    verify_clean(dir.path());
    // The kept stream's copies are what a rebuild from its scribes makes.
    let node = start_node(dir.path()).await;
    assert_eq!(digests(&node, &kept).await, kept_digests);
    node.stop().await.unwrap();
}

/// SIGKILL of a real `quire serve` just as a leave begins: after a restart the stream is gone,
/// verify is clean, the other stream is whole and the left stream's bytes are off the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_as_a_leave_begins_is_finished_at_the_next_start() {
    sigkill_during_a_leave(None).await;
}

/// The same, killed as soon as the first chunk's scribes are deleted (its records and payload
/// references went in one write; the payloads nothing names any more go in a second one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn sigkill_right_after_a_chunk_of_a_leave_is_finished_at_the_next_start() {
    sigkill_during_a_leave(Some(0)).await;
}

/// The same, killed as soon as the scribe `kill_after` (of 20,000, in order; `None`: as the leave
/// begins) is deleted.
async fn sigkill_during_a_leave(kill_after: Option<usize>) {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = spawn_serve(dir.path()).await;
    let mut owner = clients(&url).await;
    let left = create_stream(&mut owner, "left", None).await;
    let kept = create_stream(&mut owner, "kept", None).await;
    // Many distinct payloads stored apart: each chunk has many to check and delete.
    let mut left_ids = Vec::new();
    for batch in 0..20usize {
        let appends = (0..1000usize)
            .map(|index| pb::AppendRequest {
                stream: bytes_of(&left),
                kind: "x.bulk".into(),
                payload: big(&format!("{SECRET} {batch}/{index} "), 1100),
                ..Default::default()
            })
            .collect();
        let reply = owner
            .log
            .append_batch(pb::AppendBatchRequest {
                appends,
                signed: vec![],
                sealed: vec![],
            })
            .await
            .expect("bulk append")
            .into_inner();
        left_ids.extend(reply.results.into_iter().map(|result| result.id));
    }
    let mut kept_ids = Vec::new();
    for index in 0..50 {
        kept_ids.push(
            append_note(&mut owner, &kept, &format!("kept {index}"))
                .await
                .id,
        );
    }
    let head = head(&mut owner).await;

    let leave_url = url.clone();
    let call = tokio::spawn(async move {
        clients(&leave_url)
            .await
            .streams
            .leave(pb::LeaveStreamRequest {
                stream: bytes_of(&left),
            })
            .await
    });
    // Kill as the leave begins, or as soon as scribe `kill_after` is deleted.
    let probe = clients(&url).await;
    wait_until(CONVERGE, "the leave to begin", || {
        let mut streams = probe.streams.clone();
        async move {
            streams
                .get(pb::GetStreamRequest {
                    stream: bytes_of(&left),
                })
                .await
                .is_err()
        }
    })
    .await;
    if let Some(index) = kill_after {
        let gone = left_ids[index].clone();
        wait_until(CONVERGE, "a chunk of the leave deleted", || {
            let (mut log, gone) = (probe.log.clone(), gone.clone());
            async move { log.get(pb::GetScribeRequest { id: gone }).await.is_err() }
        })
        .await;
    }
    child.kill().await.unwrap();
    let _ = call.await;

    let (mut child, url) = spawn_serve(dir.path()).await;
    let mut owner = clients(&url).await;
    let missing = owner
        .streams
        .get(pb::GetStreamRequest {
            stream: bytes_of(&left),
        })
        .await;
    assert!(missing.is_err(), "the left stream is held again");
    let entries = read_all(&mut owner).await;
    assert!(
        entries.iter().all(|entry| entry.stream != bytes_of(&left)),
        "a scribe of the left stream survived"
    );
    let stored: std::collections::HashSet<Bytes> =
        entries.iter().map(|entry| entry.id.clone()).collect();
    assert!(kept_ids.iter().all(|id| stored.contains(id)));
    assert_eq!(
        crate::common::head(&mut owner).await,
        head,
        "seqs are vacated, never reused or lost"
    );
    // A new scribe gets the next seq.
    let next = append_note(&mut owner, &kept, "after the restart").await;
    assert_eq!(next.seq, head + 1);
    child.kill().await.unwrap();
    verify_clean(dir.path());
    assert_eq!(
        files_containing(dir.path(), SECRET.as_bytes()),
        Vec::<PathBuf>::new(),
        "the left stream's bytes are still on disk"
    );
}

/// B joins and leaves a stream again and again on one connection, each time while its backlog is
/// on its way and another stream is replicated: at the end it joins once more and converges (same
/// ids, same copies), and neither peer counted a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_and_join_again_repeatedly_on_one_connection_converges_with_no_refusal() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = start_node(dir_b.path()).await;
    let mut owner_a = clients(&a.url()).await;
    let stream = create_stream(&mut owner_a, "s", None).await;
    let other = create_stream(&mut owner_a, "other", None).await;
    append_bulk(&mut owner_a, &stream, 3000).await;
    kv_set(&a.url(), &stream, "k", "v0").await.unwrap();
    connect(&b, &a).await;
    join(&b, &other).await;
    for round in 1..=4 {
        join(&b, &stream).await;
        // Leave while the backlog is on its way (round 1..) and the other stream is written.
        append_note(&mut owner_a, &other, &format!("other {round}")).await;
        wait_until(CONVERGE, "part of the backlog", || async {
            scribes_of(&b, &stream) > 0
        })
        .await;
        leave(&b.url(), &stream).await;
        kv_set(&a.url(), &stream, "k", &format!("v{round}"))
            .await
            .unwrap();
    }
    join(&b, &stream).await;
    let count = scribes_of(&a, &stream);
    settle(&a, &b, &stream).await;
    settle(&a, &b, &other).await;
    assert_eq!(stream_ids(&a, &stream).await.len() as u64, count);
    let refused: u64 = node_status(&b)
        .await
        .peers
        .iter()
        .map(|peer| peer.refused)
        .sum();
    assert_eq!(refused, 0, "B counted refusals against A");
    let refused: u64 = node_status(&a)
        .await
        .peers
        .iter()
        .map(|peer| peer.refused)
        .sum();
    assert_eq!(refused, 0, "A counted refusals against B");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    verify_clean(dir_b.path());
}
