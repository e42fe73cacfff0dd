//! Attacks on redaction (written by a reviewing helper): forged justifications from a peer, a
//! redact of another stream's scribe, an app page redacting what it may not, redactions of
//! scribes whose payload bytes are shared (in one commit, across streams), an honest peer that
//! has not seen a redaction yet, repeated redacts past a quota, and a kv watch that held a
//! redacted value.

use bytes::Bytes;
use prost::Message as _;
use quire::api::access::app_label;
use quire::node::RunningNode;
use quire::pb;
use quire::projection_api::{ScribeId, StreamId};
use quire::scribe::Scribe;
use serde_json::json;

use crate::common::*;
use crate::leave::{big, files_containing, kv_set, put_file, verify_clean};
use crate::malicious::{wait_for_peer, Intruder};
use crate::redact::{
    add_note, count, file_data, get_entry, kv_value, newest_kv_write, redact, redact_scribe,
};
use crate::replication::{connect, join, part, wait_for_count, CONVERGE};

/// `key`'s `x.note` with `payload` into `stream`, appended on `node`; the scribe.
async fn users_note(
    node: &RunningNode,
    key: &ed25519_dalek::SigningKey,
    stream: &StreamId,
    payload: &[u8],
) -> Scribe {
    let scribe = client_scribe(key, stream, "x.note", payload, node.log.clock().now());
    clients(&node.url())
        .await
        .log
        .append_signed(signed_request(scribe.parts()))
        .await
        .expect("the user's note");
    scribe
}

/// The encoded `SealedScribe` of `scribe`, as a redacted scribe carries its justification.
pub(crate) fn encoded(scribe: &Scribe) -> Bytes {
    scribe.parts().to_proto().encode_to_vec().into()
}

/// `scribe` without its payload, carrying `justification`.
pub(crate) fn stripped(scribe: &Scribe, justification: Bytes) -> Scribe {
    let mut stripped = scribe.clone();
    stripped.body.payload = Bytes::new();
    stripped.redacted_by = Some(justification);
    stripped
}

/// Appends client-sealed scribes in one `AppendBatch` (one job, so one commit).
pub(crate) async fn append_together(
    node: &RunningNode,
    scribes: &[Scribe],
) -> Result<(), tonic::Status> {
    clients(&node.url())
        .await
        .log
        .append_batch(pb::AppendBatchRequest {
            appends: vec![],
            signed: scribes
                .iter()
                .map(|scribe| signed_request(scribe.parts()))
                .collect(),
            sealed: vec![],
        })
        .await
        .map(|_| ())
}

/// Waits until every redaction `node` committed has left its disk.
async fn purged(node: &RunningNode) {
    node.log.wait_purged(node.log.redactions_committed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redacting_two_scribes_that_share_their_payload_in_one_commit_deletes_it() {
    const SECRET: &str = "twice-the-same-secret-4b1d-";
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = create_stream(&mut clients(&node.url()).await, "shared", None).await;
    let user = client_key(61);
    // The same 2 KiB (stored apart, once) in two notes of the user's.
    let bytes = big(SECRET, 2048);
    let first = users_note(&node, &user, &stream, &bytes).await;
    let second = users_note(&node, &user, &stream, &bytes).await;
    assert_ne!(first.id, second.id);
    // The user redacts both at once: one batch, one commit.
    let hlc = node.log.clock().now();
    append_together(
        &node,
        &[
            redact_scribe(&user, &stream, &first.id, hlc),
            redact_scribe(&user, &stream, &second.id, hlc),
        ],
    )
    .await
    .expect("both redactions");
    purged(&node).await;
    for id in [first.id, second.id] {
        assert!(get_entry(&node, &id).await.payload.is_empty());
    }
    let holding = files_containing(dir.path(), SECRET.as_bytes());
    node.stop().await.unwrap();
    // `quire verify` finds the payload named by no stored scribe.
    verify_clean(dir.path());
    assert_eq!(
        holding,
        Vec::<std::path::PathBuf>::new(),
        "both scribes naming the bytes are redacted, yet they are still on the disk"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_peer_that_has_not_seen_a_redaction_yet_is_not_blamed() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let stream = create_stream(&mut clients(&a.url()).await, "late", None).await;
    let user = client_key(62);
    let mut notes = Vec::new();
    for index in 0..3 {
        notes.push(users_note(&a, &user, &stream, format!("note {index}").as_bytes()).await);
    }
    // B takes the notes whole, then goes apart before the redactions.
    connect(&b, &a).await;
    join(&b, &stream).await;
    let total = count(&a, &stream);
    wait_for_count(&[&b], &stream, total).await;
    part(&b, &a).await;
    let hlc = a.log.clock().now();
    let redacts: Vec<Scribe> = notes
        .iter()
        .map(|note| redact_scribe(&user, &stream, &note.id, hlc))
        .collect();
    append_together(&a, &redacts).await.unwrap();
    // C joins from A: it stores the notes redacted, then meets B, which still has them whole.
    let c = start_node(dirs[2].path()).await;
    connect(&c, &a).await;
    join(&c, &stream).await;
    wait_for_count(&[&c], &stream, total + 3).await;
    connect(&c, &b).await;
    let b_id = b.log.node_key().to_hex();
    wait_until(CONVERGE, "C took B's backlog", || async {
        node_status(&c).await.peers.iter().any(|peer| {
            peer.node_id == b_id
                && peer.streams.iter().any(|counters| {
                    counters.stream == bytes_of(&stream)
                        && counters.received
                            + counters.duplicates
                            + counters.refused
                            + counters.redacted_refused
                            >= total
                })
        })
    })
    .await;
    // B sent only what it holds, honestly: nothing may be counted against it.
    let peer = node_status(&c)
        .await
        .peers
        .into_iter()
        .find(|peer| peer.node_id == b_id)
        .unwrap();
    assert_eq!(
        peer.refused, 0,
        "C blamed B for scribes B holds honestly: {peer:?}"
    );
    for node in [a, b, c] {
        node.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_justifications_from_a_peer_are_refused_and_a_true_one_is_stored_envelope_only() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = create_stream(&mut clients(&node.url()).await, "forged", None).await;
    let other = create_stream(&mut clients(&node.url()).await, "other", None).await;
    let user = client_key(63);
    let kept = users_note(&node, &user, &stream, b"kept note").await;
    // A note of the user's the node has never seen.
    let hlc = node.log.clock().now();
    let unseen = client_scribe(&user, &stream, "x.note", b"unseen note", hlc);
    let valid = redact_scribe(&user, &stream, &unseen.id, hlc);
    let before = read_all(&mut clients(&node.url()).await).await;

    let oversized = {
        // A valid justification padded past 16 KiB with a field nobody reads.
        let mut bytes = encoded(&valid).to_vec();
        bytes.push((15 << 3) | 2);
        let mut length = 17 * 1024u64;
        while length >= 0x80 {
            bytes.push((length as u8 & 0x7f) | 0x80);
            length >>= 7;
        }
        bytes.push(length as u8);
        bytes.extend(std::iter::repeat_n(0u8, 17 * 1024));
        Bytes::from(bytes)
    };
    let itself_redacted = {
        let mut parts = valid.parts();
        parts.redacted_by = Some(encoded(&valid));
        Bytes::from(parts.to_proto().encode_to_vec())
    };
    let bad_seal = {
        let mut parts = valid.parts();
        let mut seal = parts.seal.to_vec();
        *seal.last_mut().unwrap() ^= 1;
        parts.seal = seal.into();
        Bytes::from(parts.to_proto().encode_to_vec())
    };
    let not_a_redact = {
        let mut body = valid.body.clone();
        body.kind = "x.note".parse().unwrap();
        encoded(&Scribe::sign(body, &user))
    };
    let mut with_payload = unseen.clone();
    with_payload.redacted_by = Some(encoded(&valid));
    let forgeries: Vec<(&str, Scribe)> = vec![
        (
            "a redact of another scribe",
            stripped(
                &unseen,
                encoded(&redact_scribe(&user, &stream, &kept.id, hlc)),
            ),
        ),
        (
            "a redact of this scribe in another stream",
            stripped(
                &unseen,
                encoded(&redact_scribe(&user, &other, &unseen.id, hlc)),
            ),
        ),
        ("a redacted redact", stripped(&unseen, itself_redacted)),
        ("over 16 KiB", stripped(&unseen, oversized)),
        (
            "not a SealedScribe",
            stripped(&unseen, Bytes::from_static(b"\xff\xff\xff\xffnot a scribe")),
        ),
        ("a broken seal", stripped(&unseen, bad_seal)),
        ("an x.note, not a redact", stripped(&unseen, not_a_redact)),
        ("both a payload and a justification", with_payload),
        (
            "a stranger's redact",
            stripped(
                &unseen,
                encoded(&redact_scribe(&client_key(64), &stream, &unseen.id, hlc)),
            ),
        ),
    ];
    let key = client_key(93);
    let mut intruder = Intruder::connect(node.peer_addr.unwrap(), key.clone(), true).await;
    intruder.offer(&stream).await;
    let mut refused = 0;
    for (what, forged) in &forgeries {
        refused += 1;
        intruder
            .send(batch_of(&stream, std::slice::from_ref(forged), refused))
            .await;
        let peer = wait_for_peer(&node, &key, |peer| peer.refused >= refused).await;
        assert_eq!(peer.refused, refused, "{what}");
        assert_eq!(peer.streams[0].received, 0, "{what} was stored");
    }
    assert_eq!(read_all(&mut clients(&node.url()).await).await, before);
    let unknown = clients(&node.url())
        .await
        .log
        .get(pb::GetScribeRequest {
            id: bytes_of(&unseen.id),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // The true justification: stored, envelope only, and it verifies as a reader gets it.
    intruder
        .send(batch_of(
            &stream,
            &[stripped(&unseen, encoded(&valid))],
            refused + 1,
        ))
        .await;
    let peer = wait_for_peer(&node, &key, |peer| peer.streams[0].received == 1).await;
    assert_eq!(peer.refused, refused);
    let entry = get_entry(&node, &unseen.id).await;
    assert!(entry.payload.is_empty());
    assert_eq!(entry.redacted_by, encoded(&valid));
    let decoded = Scribe::decode(entry_parts(&entry)).expect("a redacted scribe still verifies");
    assert_eq!(decoded.id, unseen.id);
    // Its payload offered afterwards, by a client, is refused.
    let again = clients(&node.url())
        .await
        .log
        .append_signed(signed_request(unseen.parts()))
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    assert!(files_containing(dir.path(), b"unseen note").is_empty());
    node.stop().await.unwrap();
    let report = verify_clean(dir.path());
    assert!(report.contains("(1 payloads redacted)"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redact_naming_a_scribe_of_another_stream_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let first = create_stream(&mut clients(&node.url()).await, "first", None).await;
    let second = create_stream(&mut clients(&node.url()).await, "second", None).await;
    let user = client_key(65);
    let note = users_note(&node, &user, &first, b"cross-stream-secret").await;
    let before = read_all(&mut clients(&node.url()).await).await;
    // The author signs a redact of it in the other stream (the target among its parents).
    let cross = redact_scribe(&user, &second, &note.id, node.log.clock().now());
    let refused = clients(&node.url())
        .await
        .log
        .append_signed(signed_request(cross.parts()))
        .await
        .unwrap_err();
    assert_ne!(refused.code(), tonic::Code::Ok);
    // The owner asks for it through the other stream.
    let not_there = redact(&node, &second, &note.id, "").await.unwrap_err();
    assert_eq!(not_there.code(), tonic::Code::NotFound, "{not_there:?}");
    assert_eq!(read_all(&mut clients(&node.url()).await).await, before);
    assert_eq!(
        get_entry(&node, &note.id).await.payload,
        Bytes::from_static(b"cross-stream-secret")
    );
    node.stop().await.unwrap();
}

/// The app's own host and the Origin its pages send.
fn app_host(node: &RunningNode, stream: &StreamId) -> (String, String) {
    let host = format!("{}.localhost", app_label(stream));
    let origin = format!("http://{host}:{}", node.api_addr.port());
    (host, origin)
}

/// POSTs `action` with `body` as a page of `page`'s app to `target`'s app host.
async fn as_page(
    node: &RunningNode,
    page: &StreamId,
    target: &StreamId,
    action: &str,
    body: serde_json::Value,
) -> (u16, String) {
    let (_, origin) = app_host(node, page);
    let (host, _) = app_host(node, target);
    http_to(
        node,
        Some(&host),
        reqwest::Method::POST,
        &format!("/{action}"),
        &[("origin", origin)],
        Some(body),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_page_may_redact_only_the_records_its_node_wrote_in_its_own_stream() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let app = create_stream(&mut clients(&node.url()).await, "app", None).await;
    let other = create_stream(&mut clients(&node.url()).await, "other-app", None).await;
    let tid = app.to_hex();
    let nodes_note = add_note(&node, &app, "the node's note").await;
    let others_note = add_note(&node, &other, "the other app's note").await;
    let file = put_file(&node.url(), &app, "page.html", Bytes::from("a page"))
        .await
        .unwrap();
    let file = ScribeId::from_slice(&file).unwrap();
    kv_set(&node.url(), &app, "k", "a value").await.unwrap();
    let kv = newest_kv_write(&node).await;
    let user = client_key(66);
    let users_record = users_note(&node, &user, &app, b"{\"_table\": \"note\"}").await;
    let before = read_all(&mut clients(&node.url()).await).await;

    let body = |id: &ScribeId| json!({"id": id.to_hex(), "reason": "page"});
    // The app's page: not a file, not a kv write, not a user's record.
    for (what, id) in [
        ("a file", file),
        ("a kv write", kv),
        ("a user's record", users_record.id),
    ] {
        let (status, reply) = as_page(&node, &app, &app, "redact", body(&id)).await;
        assert_eq!(status, 403, "{what}: {reply}");
    }
    // Not another app's record, through its own host nor through the other app's.
    let (status, reply) = as_page(&node, &app, &app, "redact", body(&others_note)).await;
    assert_eq!(status, 404, "{reply}");
    let (status, reply) = as_page(&node, &app, &other, "redact", body(&others_note)).await;
    assert_eq!(status, 403, "{reply}");
    // Nobody without the owner's token, on the node's host.
    let path = format!("/{tid}/redact");
    let (status, reply) = http_to(
        &node,
        None,
        reqwest::Method::POST,
        &path,
        &[],
        Some(body(&nodes_note)),
    )
    .await;
    assert_eq!(status, 401, "{reply}");
    let (status, reply) = http_to(
        &node,
        None,
        reqwest::Method::POST,
        &path,
        &[("authorization", "Bearer not-the-token".into())],
        Some(body(&nodes_note)),
    )
    .await;
    assert_eq!(status, 401, "{reply}");
    assert_eq!(read_all(&mut clients(&node.url()).await).await, before);

    // What it may: a record its node wrote in its own stream.
    let (status, reply) = as_page(&node, &app, &app, "redact", body(&nodes_note)).await;
    assert_eq!(status, 200, "{reply}");
    assert!(get_entry(&node, &nodes_note).await.payload.is_empty());
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_page_may_not_redact_records_the_policy_keeps_from_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    // A public blog: the owner alone writes records.
    let policy = pb::Policy {
        rules: vec![pb::KindRule {
            kind: "record.*".into(),
            authors: Some(pb::Authors {
                owner: true,
                ..Default::default()
            }),
        }],
        ..Default::default()
    };
    let blog = create_stream(&mut clients(&node.url()).await, "blog", Some(policy)).await;
    let post = add_note(&node, &blog, "the owner's post").await;
    // A page claiming the app's origin may not add a record here (the policy keeps it from
    // strangers)...
    let (status, reply) = as_page(
        &node,
        &blog,
        &blog,
        "add_record",
        json!({"_table": "note", "text": "spam"}),
    )
    .await;
    assert_eq!(status, 403, "{reply}");
    // ...so it may not erase the owner's posts either.
    let (status, reply) = as_page(
        &node,
        &blog,
        &blog,
        "redact",
        json!({"id": post.to_hex(), "reason": "vandal"}),
    )
    .await;
    let payload = get_entry(&node, &post).await.payload;
    node.stop().await.unwrap();
    assert_eq!(status, 403, "{reply}");
    assert!(
        !payload.is_empty(),
        "the owner's post was redacted by a page"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_redacts_of_a_redacted_scribe_do_not_escape_the_quota() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = crate::quota::quota_stream(&node, 0, 3).await;
    let user = client_key(67);
    let mut notes = Vec::new();
    for index in 0..3 {
        notes.push(users_note(&node, &user, &stream, format!("quota {index}").as_bytes()).await);
    }
    let over = client_scribe(
        &user,
        &stream,
        "x.note",
        b"one too many",
        node.log.clock().now(),
    );
    let refused = clients(&node.url())
        .await
        .log
        .append_signed(signed_request(over.parts()))
        .await
        .unwrap_err();
    assert!(refused.message().contains("quota"), "{refused:?}");
    // Erasing its own note needs no room: accepted.
    let first = redact_scribe(&user, &stream, &notes[0].id, node.log.clock().now());
    append_together(&node, std::slice::from_ref(&first))
        .await
        .expect("the author's redaction");
    // Redacting it again erases nothing: it is one more scribe, and must count or be refused.
    let before = count(&node, &stream);
    let mut accepted = 0;
    for round in 0..20u8 {
        let mut body = redact_scribe(&user, &stream, &notes[0].id, node.log.clock().now()).body;
        body.payload = pb::Redact {
            target: bytes_of(&notes[0].id),
            reason: format!("{round} {}", "x".repeat(1000)),
            kv: None,
        }
        .encode_to_vec()
        .into();
        let again = Scribe::sign(body, &user);
        if append_together(&node, &[again]).await.is_ok() {
            accepted += 1;
        }
    }
    let after = count(&node, &stream);
    node.stop().await.unwrap();
    assert_eq!(
        accepted, 0,
        "an author at its quota wrote {accepted} more scribes ({before} → {after} in the stream)"
    );
}

/// A kv watch of the keys under "k" of `stream`.
async fn watch_k(node: &RunningNode, stream: &StreamId) -> tonic::Streaming<pb::KvWatchEvent> {
    pb::kv_client::KvClient::new(owner_channel(&node.url()).await)
        .watch(pb::KvWatchRequest {
            stream: bytes_of(stream),
            prefix: Bytes::from("k"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// The next event of a kv watch.
async fn next_event(watch: &mut tonic::Streaming<pb::KvWatchEvent>) -> pb::kv_watch_event::Event {
    tokio::time::timeout(CONVERGE, watch.message())
        .await
        .expect("the watch answers")
        .unwrap()
        .expect("the watch stays open")
        .event
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_watch_that_sent_a_redacted_value_is_ended_and_a_new_one_shows_what_replaced_it() {
    const SECRET: &str = "watched-secret-77aa";
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = create_stream(&mut clients(&node.url()).await, "watch", None).await;
    kv_set(&node.url(), &stream, "k", "older value")
        .await
        .unwrap();
    kv_set(&node.url(), &stream, "k", SECRET).await.unwrap();
    let secret_write = newest_kv_write(&node).await;
    let mut watch = watch_k(&node, &stream).await;
    // The snapshot: k is the secret.
    let mut seen = None;
    loop {
        match next_event(&mut watch).await {
            pb::kv_watch_event::Event::Entry(entry) if entry.key == "k" => seen = Some(entry.value),
            pb::kv_watch_event::Event::CaughtUp(_) => break,
            pb::kv_watch_event::Event::Entry(_) => {}
        }
    }
    assert_eq!(seen, Some(Bytes::from(SECRET)));
    redact(&node, &stream, &secret_write, "erasure")
        .await
        .unwrap();
    wait_until(CONVERGE, "Kv.Get answers the older value", || async {
        kv_value(&node, &stream, "k").await == Some(Bytes::from("older value"))
    })
    .await;
    // The watch cannot know the redacted write's key (it went with the payload): it ends, and
    // says to watch again.
    let ended = loop {
        match tokio::time::timeout(CONVERGE, watch.message())
            .await
            .expect("the watch answers")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the watch ended without saying why"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::Aborted, "{ended:?}");
    assert!(ended.message().contains("watch again"), "{ended:?}");
    // Watching again: the snapshot holds what replaced the secret.
    let mut watch = watch_k(&node, &stream).await;
    loop {
        match next_event(&mut watch).await {
            pb::kv_watch_event::Event::Entry(entry) if entry.key == "k" => seen = Some(entry.value),
            pb::kv_watch_event::Event::CaughtUp(_) => break,
            pb::kv_watch_event::Event::Entry(_) => {}
        }
    }
    node.stop().await.unwrap();
    assert_eq!(
        seen,
        Some(Bytes::from("older value")),
        "the watcher still holds the redacted value"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_bytes_in_another_stream_survive_a_redaction_and_leave_with_the_last() {
    const SECRET: &str = "shared-across-streams-5eed-";
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let first = create_stream(&mut clients(&node.url()).await, "first", None).await;
    let second = create_stream(&mut clients(&node.url()).await, "second", None).await;
    // The same path and bytes: the same payload, stored once.
    let data = big(SECRET, 4096);
    let mut ids = Vec::new();
    for stream in [&first, &second] {
        let id = put_file(&node.url(), stream, "shared.bin", data.clone())
            .await
            .unwrap();
        ids.push(ScribeId::from_slice(&id).unwrap());
    }
    for (stream, id) in [(&first, ids[0]), (&second, ids[1])] {
        wait_until(CONVERGE, "both files served", || async {
            file_data(&node, stream, "shared.bin").await == Some(data.clone())
        })
        .await;
        assert!(!get_entry(&node, &id).await.payload.is_empty());
    }
    redact(&node, &first, &ids[0], "first only").await.unwrap();
    // The first stream's copy is gone; the second still serves the bytes, whole and verifying.
    wait_until(CONVERGE, "the first stream's file gone", || async {
        file_data(&node, &first, "shared.bin").await.is_none()
    })
    .await;
    assert_eq!(
        file_data(&node, &second, "shared.bin").await,
        Some(data.clone())
    );
    let kept = get_entry(&node, &ids[1]).await;
    assert!(kept.redacted_by.is_empty());
    Scribe::decode(entry_parts(&kept)).expect("the second stream's file verifies");
    // Log.Read of the first stream: the target without payload, its justification a redact of it.
    let entries: Vec<pb::Entry> = {
        let mut read = clients(&node.url())
            .await
            .log
            .read(pb::ReadRequest {
                stream: bytes_of(&first),
                from_seq: 1,
                limit: 1000,
            })
            .await
            .unwrap()
            .into_inner();
        let mut entries = Vec::new();
        while let Some(entry) = read.message().await.unwrap() {
            entries.push(entry);
        }
        entries
    };
    let target = entries
        .iter()
        .find(|entry| entry.id == bytes_of(&ids[0]))
        .unwrap();
    assert!(target.payload.is_empty());
    let justification = Scribe::decode(
        quire::scribe::Parts::from_proto(
            pb::SealedScribe::decode(target.redacted_by.clone()).unwrap(),
        )
        .unwrap(),
    )
    .expect("the justification verifies");
    assert!(entries
        .iter()
        .any(|entry| entry.id == bytes_of(&justification.id) && entry.kind == "redact"));
    Scribe::decode(entry_parts(target)).expect("the redacted scribe verifies");

    // The last scribe naming the bytes goes: so do they, from every file of the node.
    redact(&node, &second, &ids[1], "second too").await.unwrap();
    wait_until(CONVERGE, "the bytes off the disk", || async {
        file_data(&node, &second, "shared.bin").await.is_none()
            && files_containing(dir.path(), SECRET.as_bytes()).is_empty()
    })
    .await;
    node.stop().await.unwrap();
    let report = verify_clean(dir.path());
    assert!(report.contains("(2 payloads redacted)"), "{report}");
}
