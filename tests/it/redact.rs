//! Redaction (`quire redact`, `Streams.Redact`, the HTTP `redact` action): a `redact` scribe
//! deletes its target's payload on every node that holds the stream, on real RocksDB and SQLite.
//! Projections drop the target (a record, a file version, a kv write), the bytes leave every
//! node's disk, digests agree; a node offline during the redaction gets nothing back; a peer or
//! client offering the payload again is refused; only the target's author or the stream's owner
//! may redact, at append and at replication; a node joining later converges; a node killed right
//! after a redaction purges at its next start, and `quire verify` counts redacted payloads, not
//! damage.

use std::path::Path;

use bytes::Bytes;
use quire::node::RunningNode;
use quire::pb;
use quire::projection_api::files::FileChange;
use quire::projection_api::{ScribeId, StreamId};
use quire::scribe::{Body, Scribe};
use serde_json::json;

use crate::common::*;
use crate::leave::{big, files_containing, kv_set, put_file, verify_clean};
use crate::malicious::{wait_for_peer, Intruder};
use crate::replication::{connect, digests, join, wait_for_count, CONVERGE};

/// Bytes of the record that is redacted (inline: under 1 KiB).
const RECORD_SECRET: &str = "record-secret-5d1e77";
/// Bytes of the file version that is redacted (over 1 KiB: stored apart).
const FILE_SECRET: &str = "file-secret-c0ffee-";
/// The kv value that is redacted.
const KV_SECRET: &str = "kv-secret-a11ce";
const SCHEMA: &str = r#"{"schema": {"note": {"text": "text"}}}"#;

pub(crate) async fn append(
    node: &RunningNode,
    stream: &StreamId,
    kind: &str,
    payload: Vec<u8>,
) -> pb::AppendReply {
    clients(&node.url())
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
        .expect("append")
        .into_inner()
}

pub(crate) async fn add_note(node: &RunningNode, stream: &StreamId, text: &str) -> ScribeId {
    let reply = append(
        node,
        stream,
        "record.add",
        json!({"_table": "note", "text": text})
            .to_string()
            .into_bytes(),
    )
    .await;
    ScribeId::from_slice(&reply.id).unwrap()
}

pub(crate) async fn publish_schema(node: &RunningNode, stream: &StreamId) {
    let (_, payload) = FileChange::Put {
        path: "_schema".into(),
        content_type: "application/json".into(),
        data: SCHEMA.as_bytes().to_vec(),
    }
    .encode();
    append(node, stream, "file.put", payload).await;
}

pub(crate) async fn redact(
    node: &RunningNode,
    stream: &StreamId,
    target: &ScribeId,
    reason: &str,
) -> Result<pb::RedactReply, tonic::Status> {
    clients(&node.url())
        .await
        .streams
        .redact(pb::RedactRequest {
            stream: bytes_of(stream),
            target: bytes_of(target),
            reason: reason.into(),
        })
        .await
        .map(|reply| reply.into_inner())
}

pub(crate) async fn get_entry(node: &RunningNode, id: &ScribeId) -> pb::Entry {
    clients(&node.url())
        .await
        .log
        .get(pb::GetScribeRequest { id: bytes_of(id) })
        .await
        .expect("stored")
        .into_inner()
}

pub(crate) async fn file_data(node: &RunningNode, stream: &StreamId, path: &str) -> Option<Bytes> {
    match pb::files_client::FilesClient::new(owner_channel(&node.url()).await)
        .get(pb::FilesGetRequest {
            stream: bytes_of(stream),
            path: path.into(),
        })
        .await
    {
        Ok(reply) => Some(reply.into_inner().data),
        Err(status) if status.code() == tonic::Code::NotFound => None,
        Err(status) => panic!("files get {path}: {status:?}"),
    }
}

pub(crate) async fn kv_value(node: &RunningNode, stream: &StreamId, key: &str) -> Option<Bytes> {
    match pb::kv_client::KvClient::new(owner_channel(&node.url()).await)
        .get(pb::KvGetRequest {
            stream: bytes_of(stream),
            key: Bytes::from(key.to_string()),
        })
        .await
    {
        Ok(reply) => Some(reply.into_inner().value),
        Err(status) if status.code() == tonic::Code::NotFound => None,
        Err(status) => panic!("kv get {key}: {status:?}"),
    }
}

fn secrets() -> [&'static str; 3] {
    [RECORD_SECRET, FILE_SECRET, KV_SECRET]
}

/// Files under `dir` that hold any of the redacted bytes.
fn holding_secrets(dir: &Path) -> Vec<String> {
    secrets()
        .iter()
        .flat_map(|secret| files_containing(dir, secret.as_bytes()))
        .map(|path| path.display().to_string())
        .collect()
}

/// What the redaction must take away on `node`, checked through its services: the note is not in
/// SQL, the file falls back to its older version, the kv key to its older value.
async fn redacted_everywhere_on(node: &RunningNode, stream: &StreamId, tid: &str) -> bool {
    let notes = query_notes(&node.url(), tid).await;
    notes == vec![json!(["kept note"])]
        && file_data(node, stream, "site/page.html").await == Some(Bytes::from("older page"))
        && kv_value(node, stream, "k").await == Some(Bytes::from("older value"))
}

/// A stream with a schema, a kept note, a file with two versions and a kv key with two values;
/// the newest of each (and one more note) carries a secret. Returns the three secret scribes.
async fn fill(node: &RunningNode, stream: &StreamId) -> [ScribeId; 3] {
    publish_schema(node, stream).await;
    add_note(node, stream, "kept note").await;
    let note = add_note(node, stream, RECORD_SECRET).await;
    put_file(
        &node.url(),
        stream,
        "site/page.html",
        Bytes::from("older page"),
    )
    .await
    .unwrap();
    let file = put_file(
        &node.url(),
        stream,
        "site/page.html",
        big(FILE_SECRET, 8192),
    )
    .await
    .unwrap();
    kv_set(&node.url(), stream, "k", "older value")
        .await
        .unwrap();
    kv_set(&node.url(), stream, "k", KV_SECRET).await.unwrap();
    let kv = newest_kv_write(node).await;
    [note, ScribeId::from_slice(&file).unwrap(), kv]
}

/// The id of the newest `kv.set` in `node`'s log.
pub(crate) async fn newest_kv_write(node: &RunningNode) -> ScribeId {
    read_all(&mut clients(&node.url()).await)
        .await
        .into_iter()
        .rev()
        .find(|entry| entry.kind == "kv.set")
        .map(|entry| ScribeId::from_slice(&entry.id).unwrap())
        .unwrap()
}

pub(crate) fn count(node: &RunningNode, stream: &StreamId) -> u64 {
    node.log
        .stream(stream)
        .map_or(0, |state| state.record.scribes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redaction_on_one_node_takes_the_payload_off_every_node_and_every_projection() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let c = start_node(dirs[2].path()).await;
    let stream = create_stream(&mut clients(&a.url()).await, "redact", None).await;
    let tid = stream.to_hex();
    let [note, file, kv] = fill(&a, &stream).await;
    connect(&b, &a).await;
    connect(&c, &b).await;
    join(&b, &stream).await;
    join(&c, &stream).await;
    let total = count(&a, &stream);
    wait_for_count(&[&b, &c], &stream, total).await;
    for (node, dir) in [(&b, &dirs[1]), (&c, &dirs[2])] {
        wait_until(CONVERGE, "the secrets on every node", || async {
            query_notes(&node.url(), &tid).await.len() == 2
                && holding_secrets(dir.path()).len() >= 3
        })
        .await;
    }

    // The note through the CLI, the file through gRPC, the kv write through HTTP (the owner).
    let mut cli = quire_cli(&a.url());
    cli.args([
        "redact",
        &stream.to_hex(),
        &note.to_hex(),
        "--reason",
        "posted by mistake",
    ]);
    let output = tokio::task::spawn_blocking(move || cli.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(&format!("redacted {note} by ")), "{stdout}");
    redact(&a, &stream, &file, "").await.unwrap();
    // From the moment the redaction answers, A never serves the redacted version: its copy reads
    // bytes from the payload store, which has none for it (until the rebuilt copy is swapped
    // in, the path shows nothing; then the older version).
    let served = file_data(&a, &stream, "site/page.html").await;
    assert!(
        served.as_ref().is_none_or(|data| !data
            .windows(FILE_SECRET.len())
            .any(|w| w == FILE_SECRET.as_bytes())),
        "A served the redacted version"
    );
    let token = token_of(&a.url()).unwrap();
    let (status, body) = http_to(
        &a,
        None,
        reqwest::Method::POST,
        &format!("/{tid}/redact"),
        &[("authorization", format!("Bearer {token}"))],
        Some(json!({"id": kv.to_hex(), "reason": "GDPR erasure"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"success\":true"), "{body}");
    // The redaction answered once the bytes left A's disk.
    let left_on_a = holding_secrets(dirs[0].path())
        .into_iter()
        .filter(|path| !path.contains("projections"))
        .collect::<Vec<_>>();
    assert_eq!(left_on_a, Vec::<String>::new(), "A's log still holds them");

    // Every node: the projections drop them, the bytes leave the disk, the digests agree.
    for (node, dir) in [(&a, &dirs[0]), (&b, &dirs[1]), (&c, &dirs[2])] {
        wait_for_count(&[node], &stream, total + 3).await;
        wait_until(CONVERGE, "the redactions projected", || async {
            redacted_everywhere_on(node, &stream, &tid).await
        })
        .await;
        wait_until(CONVERGE, "the redacted bytes off the disk", || async {
            holding_secrets(dir.path()).is_empty()
        })
        .await;
    }
    let digest_a = digests(&a, &stream).await;
    assert_eq!(digests(&b, &stream).await, digest_a);
    assert_eq!(digests(&c, &stream).await, digest_a);
    // The envelopes stay: each target still reads, with no payload and its redaction named.
    for node in [&a, &b, &c] {
        for target in [note, file, kv] {
            let entry = get_entry(node, &target).await;
            assert!(entry.payload.is_empty());
            assert!(!entry.redacted_by.is_empty(), "{target} on {}", node.url());
            let scribe = Scribe::decode(entry_parts(&entry)).expect("still verifies");
            assert_eq!(scribe.id, target);
        }
    }
    // A second redaction of the same scribe is refused here, changing nothing.
    let again = redact(&a, &stream, &note, "").await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    assert_eq!(count(&a, &stream), total + 3);
    // Nobody's refusal was counted: every node sent only what the others take.
    for node in [&a, &b, &c] {
        assert_eq!(refused_by(node).await, 0, "{}", node.url());
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    c.stop().await.unwrap();
    for dir in &dirs {
        let report = verify_clean(dir.path());
        assert!(report.contains("(3 payloads redacted)"), "{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_offline_during_a_redaction_brings_nothing_back_and_an_offered_payload_is_refused() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let c = start_node(dirs[2].path()).await;
    let stream = create_stream(&mut clients(&a.url()).await, "offline", None).await;
    let tid = stream.to_hex();
    let [note, file, kv] = fill(&a, &stream).await;
    // The full scribe as it was, to offer again later.
    let original = Scribe::decode(entry_parts(&get_entry(&a, &file).await)).unwrap();
    connect(&b, &a).await;
    connect(&c, &a).await;
    connect(&c, &b).await;
    join(&b, &stream).await;
    join(&c, &stream).await;
    let total = count(&a, &stream);
    wait_for_count(&[&b, &c], &stream, total).await;
    wait_until(CONVERGE, "C projected the secrets", || async {
        query_notes(&c.url(), &tid).await.len() == 2
    })
    .await;
    // C goes away holding every payload; A redacts; B takes the redactions.
    c.stop().await.unwrap();
    for target in [note, file, kv] {
        redact(&a, &stream, &target, "erasure").await.unwrap();
    }
    wait_for_count(&[&b], &stream, total + 3).await;
    wait_until(CONVERGE, "B dropped them", || async {
        redacted_everywhere_on(&b, &stream, &tid).await
            && holding_secrets(dirs[1].path()).is_empty()
    })
    .await;
    assert!(
        !holding_secrets(dirs[2].path()).is_empty(),
        "C, stopped, still holds them"
    );

    // C comes back (it dials A and B again): it takes the redactions, and nothing comes back.
    let c = start_node(dirs[2].path()).await;
    wait_for_count(&[&c], &stream, total + 3).await;
    for (node, dir) in [(&a, &dirs[0]), (&b, &dirs[1]), (&c, &dirs[2])] {
        wait_until(CONVERGE, "redacted everywhere after C's return", || async {
            redacted_everywhere_on(node, &stream, &tid).await
                && holding_secrets(dir.path()).is_empty()
        })
        .await;
    }
    let digest_a = digests(&a, &stream).await;
    assert_eq!(digests(&b, &stream).await, digest_a);
    assert_eq!(digests(&c, &stream).await, digest_a);

    // A client appending the payload again is refused, and nothing changes.
    let refused = clients(&a.url())
        .await
        .log
        .append_signed(signed_request(original.parts()))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("was redacted"), "{refused:?}");
    // A peer offering it again is refused and counted, and nothing changes.
    let key = client_key(91);
    let mut intruder = Intruder::connect(a.peer_addr.unwrap(), key.clone(), true).await;
    intruder.offer(&stream).await;
    intruder
        .send(batch_of(&stream, std::slice::from_ref(&original), 1))
        .await;
    // Counted apart, not as refused: an honest peer that missed the redaction does the same.
    let peer = wait_for_peer(&a, &key, |peer| {
        peer.streams
            .first()
            .is_some_and(|stream| stream.redacted_refused == 1)
    })
    .await;
    assert_eq!((peer.refused, peer.streams[0].received), (0, 0));
    assert!(get_entry(&a, &file).await.payload.is_empty());
    assert!(holding_secrets(dirs[0].path()).is_empty());
    assert_eq!(digests(&a, &stream).await, digest_a);

    // A node joining after the redaction gets the envelopes without payloads, and the same
    // projections.
    let d = start_node(dirs[3].path()).await;
    connect(&d, &c).await;
    join(&d, &stream).await;
    wait_for_count(&[&d], &stream, total + 3).await;
    wait_until(CONVERGE, "D's projections", || async {
        redacted_everywhere_on(&d, &stream, &tid).await && digests(&d, &stream).await == digest_a
    })
    .await;
    assert!(holding_secrets(dirs[3].path()).is_empty());
    assert_eq!(refused_by(&d).await, 0);
    for node in [a, b, c, d] {
        node.stop().await.unwrap();
    }
    verify_clean(dirs[3].path());
}

/// A `redact` scribe of `target` signed by `key`.
pub(crate) fn redact_scribe(
    key: &ed25519_dalek::SigningKey,
    stream: &StreamId,
    target: &ScribeId,
    hlc: u64,
) -> Scribe {
    redact_scribe_of_kind(key, stream, target, hlc, "redact")
}

/// A `redact` or `prune` scribe (`kind`) of `target`, signed by `key`.
pub(crate) fn redact_scribe_of_kind(
    key: &ed25519_dalek::SigningKey,
    stream: &StreamId,
    target: &ScribeId,
    hlc: u64,
    kind: &str,
) -> Scribe {
    erasure_scribe(key, stream, target, hlc, kind, None)
}

/// A `redact` or `prune` scribe (`kind`) of `target` carrying `kv`, signed by `key`.
pub(crate) fn erasure_scribe(
    key: &ed25519_dalek::SigningKey,
    stream: &StreamId,
    target: &ScribeId,
    hlc: u64,
    kind: &str,
    kv: Option<pb::PrunedKvWrite>,
) -> Scribe {
    use prost::Message as _;
    Scribe::sign(
        Body {
            stream: Some(*stream),
            author: key_of(key),
            hlc,
            kind: kind.parse().unwrap(),
            content_type: format!("application/vnd.quire.{kind}+protobuf"),
            payload: pb::Redact {
                target: bytes_of(target),
                reason: String::new(),
                kv,
            }
            .encode_to_vec()
            .into(),
            parents: vec![*target],
            membership: None,
            nonce: 0,
        },
        key,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_author_or_the_owner_may_redact_at_append_and_at_replication() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let stream = create_stream(&mut clients(&a.url()).await, "who", None).await;
    publish_schema(&a, &stream).await;
    // A user writes a note with its own key; a stranger and another user try to redact it and
    // a note the node wrote.
    let (user, stranger) = (client_key(41), client_key(42));
    let hlc = a.log.clock().now();
    let users_note = client_scribe(
        &user,
        &stream,
        "record.add",
        json!({"_table": "note", "text": "mine"})
            .to_string()
            .as_bytes(),
        hlc,
    );
    let mut log = clients(&a.url()).await.log;
    log.append_signed(signed_request(users_note.parts()))
        .await
        .unwrap();
    let nodes_note = add_note(&a, &stream, "the node's").await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    let total = count(&a, &stream);
    wait_for_count(&[&b], &stream, total).await;
    let before = read_all(&mut clients(&a.url()).await).await;

    let hlc = a.log.clock().now();
    for (key, target) in [
        (&stranger, users_note.id),
        (&stranger, nodes_note),
        (&user, nodes_note),
    ] {
        let scribe = redact_scribe(key, &stream, &target, hlc);
        let refused = log
            .append_signed(signed_request(scribe.parts()))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("only its author"), "{refused:?}");
    }
    // Nobody redacts a genesis; an unknown target or an overlong reason is refused before
    // anything is signed.
    let genesis = redact(&a, &stream, &stream, "").await.unwrap_err();
    assert_eq!(
        genesis.code(),
        tonic::Code::FailedPrecondition,
        "{genesis:?}"
    );
    let unknown = redact(&a, &stream, &ScribeId([3; 32]), "")
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let long = redact(&a, &stream, &nodes_note, &"x".repeat(1025))
        .await
        .unwrap_err();
    assert_eq!(long.code(), tonic::Code::InvalidArgument, "{long:?}");
    // A redaction whose target is not among its parents is malformed.
    let mut orphan = redact_scribe(&user, &stream, &users_note.id, hlc).body;
    orphan.parents.clear();
    let orphan = Scribe::sign(orphan, &user);
    let refused = log
        .append_signed(signed_request(orphan.parts()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert_eq!(read_all(&mut clients(&a.url()).await).await, before);

    // At replication: a peer sends B a stranger's redaction and a redacted envelope whose
    // justification is a stranger's: both refused, counted, and nothing changes.
    let key = client_key(92);
    let mut intruder = Intruder::connect(b.peer_addr.unwrap(), key.clone(), true).await;
    intruder.offer(&stream).await;
    let forged = redact_scribe(&stranger, &stream, &users_note.id, hlc);
    // A note of the user's B has never seen, sent without its payload, "justified" by a
    // stranger's redaction of it.
    let unseen = client_scribe(
        &user,
        &stream,
        "record.add",
        json!({"_table": "note", "text": "unseen"})
            .to_string()
            .as_bytes(),
        hlc,
    );
    let mut stripped = unseen.clone();
    stripped.body.payload = Bytes::new();
    let justification = redact_scribe(&stranger, &stream, &unseen.id, hlc);
    stripped.redacted_by =
        Some(prost::Message::encode_to_vec(&justification.parts().to_proto()).into());
    intruder
        .send(batch_of(&stream, &[forged, stripped], 1))
        .await;
    let peer = wait_for_peer(&b, &key, |peer| peer.refused == 2).await;
    assert_eq!(peer.streams[0].received, 0);
    let b_entries = read_all(&mut clients(&b.url()).await).await;
    assert_eq!(b_entries.len() as u64, total);
    assert!(b_entries.iter().all(|entry| entry.redacted_by.is_empty()));

    // The author may redact its own note, the owner (the node) the node's: both reach B.
    let own = redact_scribe(&user, &stream, &users_note.id, a.log.clock().now());
    log.append_signed(signed_request(own.parts()))
        .await
        .unwrap();
    redact(&a, &stream, &nodes_note, "").await.unwrap();
    wait_for_count(&[&b], &stream, total + 2).await;
    wait_until(CONVERGE, "both notes redacted on B", || async {
        query_notes(&b.url(), &stream.to_hex()).await.is_empty()
    })
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_redactions_loses_nothing_kept_and_the_restart_purges_the_rest() {
    use rand::Rng;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = crate::crash::spawn_serve(dir.path()).await;
    let mut owner = clients(&url).await;
    let stream = create_stream(&mut owner, "crash-redact", None).await;
    // Forty scribes with a secret each: notes (payload inline) and files (stored apart).
    let mut targets = Vec::new();
    for index in 0..40 {
        let secret = format!("crash-secret-{index:02}-e1d2");
        let id = if index % 2 == 0 {
            let reply = owner
                .log
                .append(pb::AppendRequest {
                    stream: bytes_of(&stream),
                    kind: "record.add".into(),
                    content_type: "application/json".into(),
                    payload: Bytes::from(json!({"_table": "note", "text": secret}).to_string()),
                    parents: vec![],
                })
                .await
                .unwrap()
                .into_inner();
            ScribeId::from_slice(&reply.id).unwrap()
        } else {
            let id = put_file(&url, &stream, &format!("f/{index}.bin"), big(&secret, 4096))
                .await
                .unwrap();
            ScribeId::from_slice(&id).unwrap()
        };
        targets.push((id, secret));
    }
    // Redactions race a SIGKILL: those answered must hold after the restart, the rest may or may
    // not have committed, and nothing else may be lost.
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for chunk in targets.chunks(10).map(|chunk| chunk.to_vec()) {
        let (url, answered) = (url.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            let mut streams = clients(&url).await.streams;
            for (target, _) in chunk {
                let request = pb::RedactRequest {
                    stream: bytes_of(&stream),
                    target: bytes_of(&target),
                    reason: "crash test".into(),
                };
                match streams.redact(request).await {
                    Ok(_) => answered.lock().unwrap().push(target),
                    Err(_) => return,
                }
            }
        }));
    }
    let kill_after = rand::thread_rng().gen_range(20..200);
    tokio::time::timeout(
        std::time::Duration::from_millis(kill_after),
        futures::future::join_all(&mut tasks),
    )
    .await
    .ok();
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    for task in tasks {
        let _ = task.await;
    }
    let answered: Vec<ScribeId> = answered.lock().unwrap().clone();

    let report = verify_clean(dir.path());
    let (mut child, url) = crate::crash::spawn_serve(dir.path()).await;
    let entries = read_all(&mut clients(&url).await).await;
    let redacted: Vec<ScribeId> = entries
        .iter()
        .filter(|entry| !entry.redacted_by.is_empty())
        .map(|entry| ScribeId::from_slice(&entry.id).unwrap())
        .collect();
    assert!(
        report.contains(&format!("({} payloads redacted)", redacted.len())) || redacted.is_empty(),
        "{report}"
    );
    for target in &answered {
        assert!(
            redacted.contains(target),
            "answered redaction of {target} lost"
        );
    }
    // Every scribe still verifies, every target is there, and every payload not redacted is whole.
    for entry in &entries {
        Scribe::decode(entry_parts(entry)).expect("every stored scribe verifies");
    }
    for (target, secret) in &targets {
        let entry = entries
            .iter()
            .find(|entry| entry.id == bytes_of(target))
            .expect("every target is still in the log");
        if redacted.contains(target) {
            assert!(entry.payload.is_empty());
        } else {
            assert!(
                entry
                    .payload
                    .windows(secret.len())
                    .any(|window| window == secret.as_bytes()),
                "{target} lost its payload without a redaction"
            );
        }
    }
    // The restart purged whatever a redaction committed before the kill left on the disk; the
    // projections rebuild without them.
    wait_until(CONVERGE, "no redacted secret on the disk", || async {
        targets
            .iter()
            .filter(|(target, _)| redacted.contains(target))
            .all(|(_, secret)| files_containing(dir.path(), secret.as_bytes()).is_empty())
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    verify_clean(dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scribe_and_its_redaction_in_one_batch_never_put_the_payload_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = create_stream(&mut clients(&node.url()).await, "one-batch", None).await;
    let user = client_key(43);
    let hlc = node.log.clock().now();
    let secret = "one-batch-secret-77aa";
    let note = client_scribe(
        &user,
        &stream,
        "record.add",
        json!({"_table": "note", "text": secret})
            .to_string()
            .as_bytes(),
        hlc,
    );
    let redaction = redact_scribe(&user, &stream, &note.id, hlc + 1);
    // From a peer, in one batch: the note with its payload, then its redaction.
    let key = client_key(93);
    let mut intruder = Intruder::connect(node.peer_addr.unwrap(), key.clone(), true).await;
    intruder.offer(&stream).await;
    intruder
        .send(batch_of(&stream, &[note.clone(), redaction.clone()], 1))
        .await;
    let peer = wait_for_peer(&node, &key, |peer| {
        peer.streams.first().is_some_and(|s| s.received == 2)
    })
    .await;
    assert_eq!(peer.refused, 0);
    let entry = get_entry(&node, &note.id).await;
    assert!(entry.payload.is_empty() && !entry.redacted_by.is_empty());
    wait_until(CONVERGE, "no trace of the payload", || async {
        files_containing(dir.path(), secret.as_bytes()).is_empty()
    })
    .await;
    // And from a client, in one atomic batch, the same.
    let secret = "client-batch-secret-99bb";
    let note = client_scribe(
        &user,
        &stream,
        "record.add",
        json!({"_table": "note", "text": secret})
            .to_string()
            .as_bytes(),
        hlc + 2,
    );
    let redaction = redact_scribe(&user, &stream, &note.id, hlc + 3);
    clients(&node.url())
        .await
        .log
        .append_batch(pb::AppendBatchRequest {
            appends: vec![],
            signed: vec![
                signed_request(note.parts()),
                signed_request(redaction.parts()),
            ],
            sealed: vec![],
        })
        .await
        .unwrap();
    assert!(get_entry(&node, &note.id).await.payload.is_empty());
    wait_until(CONVERGE, "no trace of the client's payload", || async {
        files_containing(dir.path(), secret.as_bytes()).is_empty()
    })
    .await;
    node.stop().await.unwrap();
    verify_clean(dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seventy_redactions_in_one_commit_leave_no_byte_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = create_stream(&mut clients(&node.url()).await, "many", None).await;
    let user = client_key(44);
    let hlc = node.log.clock().now();
    let notes: Vec<Scribe> = (0..70u64)
        .map(|index| {
            let text = format!("many-secret-{index:02}-{}", "z".repeat(1100));
            client_scribe(
                &user,
                &stream,
                "record.add",
                json!({"_table": "note", "text": text})
                    .to_string()
                    .as_bytes(),
                hlc + index,
            )
        })
        .collect();
    let mut log = clients(&node.url()).await.log;
    for note in &notes {
        log.append_signed(signed_request(note.parts()))
            .await
            .unwrap();
    }
    // Past the purge's range-by-range limit: one batch, one commit, whole families compacted.
    let redactions = notes
        .iter()
        .map(|note| signed_request(redact_scribe(&user, &stream, &note.id, hlc + 100).parts()))
        .collect();
    log.append_batch(pb::AppendBatchRequest {
        appends: vec![],
        signed: redactions,
        sealed: vec![],
    })
    .await
    .unwrap();
    wait_until(CONVERGE, "no redacted note on the disk", || async {
        files_containing(dir.path(), b"many-secret-").is_empty()
    })
    .await;
    node.stop().await.unwrap();
    let report = verify_clean(dir.path());
    assert!(report.contains("(70 payloads redacted)"), "{report}");
}
