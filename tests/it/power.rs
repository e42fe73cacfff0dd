//! Power loss without `--sync`, played as a restored data directory: a node comes back at an older
//! head and gives out seqs its peer has already seen for other scribes. Its new log epoch makes the
//! peer re-read from the surviving head and send back what the node lost; projection copies that
//! are ahead of the log start over; a durable consumer resumes from its surviving ack.

use std::collections::HashSet;
use std::path::Path;

use bytes::Bytes;
use quire::node::RunningNode;
use quire::pb;
use quire::pb::subscribe_event::Event;
use quire::projection_api::StreamId;

use crate::common::*;
use crate::replication::{connect, converge, join, stream_ids, CONVERGE};

/// Copies the directory tree `from` to `to` (created).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Replaces `dir/part` (or all of `dir` for `""`) with the snapshot's copy.
fn restore(snapshot: &Path, dir: &Path, part: &str) {
    let (from, to) = (snapshot.join(part), dir.join(part));
    std::fs::remove_dir_all(&to).unwrap();
    copy_tree(&from, &to);
}

async fn add_records(node: &RunningNode, stream: &StreamId, prefix: &str, count: usize) {
    let mut clients = clients(&node.url()).await;
    let mut kv = pb::kv_client::KvClient::new(owner_channel(&node.url()).await);
    for index in 0..count {
        let payload = serde_json::json!({"_table": "notes", "text": format!("{prefix} {index}")});
        clients
            .log
            .append(pb::AppendRequest {
                stream: bytes_of(stream),
                kind: "record.add".into(),
                content_type: "application/json".into(),
                payload: Bytes::from(payload.to_string()),
                parents: vec![],
            })
            .await
            .expect("append a record");
        kv.set(pb::KvSetRequest {
            stream: bytes_of(stream),
            key: Bytes::from(format!("{prefix}/{}", index % 3)),
            value: Bytes::from(format!("{prefix} {index}")),
        })
        .await
        .expect("kv set");
    }
}

async fn consume(
    url: &str,
    stream: &StreamId,
    name: &str,
    until: u64,
    ack: bool,
) -> Vec<(u64, Bytes)> {
    let mut clients = clients(url).await;
    let mut events = clients
        .log
        .subscribe(pb::SubscribeRequest {
            stream: bytes_of(stream),
            from_seq: 0,
            consumer: name.into(),
        })
        .await
        .expect("subscribe")
        .into_inner();
    let mut seen = Vec::new();
    while seen.last().is_none_or(|(seq, _)| *seq < until) {
        let event = tokio::time::timeout(CONVERGE, events.message())
            .await
            .expect("an event in time")
            .expect("subscription ok")
            .expect("subscription open");
        if let Some(Event::Scribe(entry)) = event.event {
            seen.push((entry.seq, entry.id));
        }
    }
    if ack {
        clients
            .log
            .ack(pb::AckRequest {
                consumer: name.into(),
                seq: until,
            })
            .await
            .expect("ack");
    }
    seen
}

/// The repro, with the whole data directory restored (`part` "") or only the log (`"db"`:
/// the projection copies stay, ahead of the log).
async fn lost_tail(part: &str) {
    let (dir_a, dir_b, snapshot) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let a = start_node(dir_a.path()).await;
    let b = start_node(dir_b.path()).await;
    let stream = create_stream(&mut clients(&a.url()).await, "power", None).await;
    connect(&a, &b).await;
    join(&b, &stream).await;
    add_records(&a, &stream, "first", 5).await;
    let base = 1 + 10;
    converge(&a, &b, &stream, base).await;
    let base_seq = a.log.head();
    consume(&a.url(), &stream, "audit", base_seq, true).await;

    // The snapshot of the stopped node.
    a.stop().await.unwrap();
    copy_tree(dir_a.path(), snapshot.path());
    let a = start_node(dir_a.path()).await;
    add_records(&a, &stream, "lost", 10).await; // 20 scribes
    converge(&a, &b, &stream, base + 20).await;
    let lost_head = a.log.head();
    consume(&a.url(), &stream, "audit", lost_head, true).await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();

    // The power loss: the log (and maybe the rest) is back where the snapshot was. A writes
    // while B is away, so its new scribes take seqs B has seen for others (and, with the copies
    // kept, seqs its own projection copies have already applied).
    restore(snapshot.path(), dir_a.path(), part);
    let a = start_node(dir_a.path()).await;
    assert_eq!(a.log.head(), base_seq, "A is back at the snapshot's head");
    add_records(&a, &stream, "after", 2).await; // 4 scribes
    let b = start_node(dir_b.path()).await;
    connect(&a, &b).await; // B's new address
    converge(&a, &b, &stream, base + 24).await;

    // The consumer's ack after the snapshot was lost with the tail: it resumes after the
    // snapshot's ack and sees every scribe A holds now, each once.
    let head = a.log.head();
    let seen = consume(&a.url(), &stream, "audit", head, false).await;
    let seqs: Vec<u64> = seen.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, ((base_seq + 1)..=head).collect::<Vec<_>>());
    let ids: HashSet<Bytes> = seen.into_iter().map(|(_, id)| id).collect();
    let held: HashSet<Bytes> = stream_ids(&a, &stream).await.into_iter().collect();
    assert_eq!(ids.len(), (head - base_seq) as usize);
    assert!(ids.is_subset(&held));
    assert_eq!(held.len() as u64, base + 24);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restored_to_an_older_data_directory_converges_with_its_peer() {
    lost_tail("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_copies_ahead_of_a_restored_log_start_over() {
    lost_tail("db").await;
}
