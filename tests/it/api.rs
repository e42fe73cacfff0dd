//! The client API end to end: appends, refusals with the right status (and nothing changed),
//! idempotence, restart with gapless seqs.

use bytes::Bytes;
use quire::pb;
use quire::projection_api::{AuthorKey, ScribeId, StreamId};
use quire::scribe::{Body, Parts, Proof, Scribe};
use tonic::Code;

use crate::common::*;

/// Everything a refusal must leave alone: head and every stored entry.
async fn snapshot(clients: &mut Clients) -> (u64, Vec<pb::Entry>) {
    (head(clients).await, read_all(clients).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_append_get_read_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "blog", None).await;
    let first = append_note(&mut clients, &stream, "hello").await;
    let second = append_note(&mut clients, &stream, "world").await;
    assert_eq!((first.seq, second.seq), (2, 3), "the genesis is seq 1");
    assert!(!first.duplicate);

    let entry = clients
        .log
        .get(pb::GetScribeRequest {
            id: first.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(entry.seq, 2);
    assert_eq!(entry.kind, "x.note");
    assert_eq!(entry.stream, bytes_of(&stream));
    // The exact stored envelope comes back and hashes to the id; with its payload, seal and proof
    // it verifies without trusting the node.
    assert_eq!(
        quire::scribe::hash(&entry.envelope).as_bytes().as_slice(),
        first.id.as_ref()
    );
    let scribe = Scribe::decode(entry_parts(&entry)).unwrap();
    assert_eq!(&scribe.body.payload[..], b"hello");

    let info = clients
        .streams
        .get(pb::GetStreamRequest {
            stream: bytes_of(&stream),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            info.name.as_str(),
            info.scribes,
            info.head_seq,
            info.genesis_seq
        ),
        ("blog", 3, 3, 1)
    );
    let policy = info.policy.unwrap();
    assert_eq!(policy.max_file_bytes, 10 << 20);
    assert_eq!(policy.max_stream_bytes, 100 << 20);
    assert_eq!(policy.lease_ms, 3_600_000);
    assert!(!policy.leasing_disabled);

    let status = clients
        .admin
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.head_seq, 3);
    assert_eq!(status.node_id, node.log.node_key().to_hex());
    assert_eq!(status.streams.len(), 1);
    let memory = status.store_memory.expect("store memory is reported");
    assert!(memory.memtables > 0, "three scribes sit in the memtables");
    assert_eq!(status.listeners[0].addr, node.url());
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_appends_get_the_right_status_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let small = pb::Policy {
        max_file_bytes: 1024,
        ..Default::default()
    };
    let stream = create_stream(&mut clients, "refusals", Some(small)).await;
    append_note(&mut clients, &stream, "before").await;
    let client = client_key(7);
    let hlc = node.log.clock().now();

    // Each case: a request and the code it must get.
    let mut cases: Vec<(&str, pb::AppendSignedRequest, Code)> = Vec::new();
    let good = client_scribe(&client, &stream, "x.note", b"fine", hlc);

    let mut forged = good.parts();
    let mut seal = forged.seal.to_vec();
    let last = seal.len() - 1;
    seal[last] ^= 0x01; // the last byte is inside the signature
    forged.seal = Bytes::from(seal);
    cases.push(("forged signature", signed(forged), Code::InvalidArgument));

    // Claims to be by key 8, sealed by key 7.
    let impostor = client_key(8);
    let mut body = good.body.clone();
    body.author = AuthorKey(impostor.verifying_key().to_bytes());
    cases.push((
        "wrong author key",
        signed(seal_as(body, &client)),
        Code::InvalidArgument,
    ));

    let mut wrong_payload = good.parts();
    wrong_payload.payload = Bytes::from_static(b"fin3");
    cases.push((
        "payload not matching its envelope",
        signed(wrong_payload),
        Code::InvalidArgument,
    ));

    let mut no_seal = good.parts();
    no_seal.seal = Bytes::new();
    cases.push(("no seal", signed(no_seal), Code::InvalidArgument));

    let unknown = client_scribe(&client, &ScribeId([9; 32]), "x.note", b"lost", hlc);
    cases.push(("unknown stream", signed(unknown.parts()), Code::NotFound));

    let not_owner = client_scribe(&client, &stream, "file.put", b"<html>", hlc);
    cases.push((
        "non-owner file.put",
        signed(not_owner.parts()),
        Code::PermissionDenied,
    ));

    let oversize = client_scribe(&client, &stream, "x.note", &[0u8; 2048], hlc);
    cases.push((
        "oversize payload",
        signed(oversize.parts()),
        Code::ResourceExhausted,
    ));

    cases.push((
        "garbage bytes",
        signed(Parts {
            envelope: Bytes::from_static(b"\xff\xfe not a scribe at all"),
            ..good.parts()
        }),
        Code::InvalidArgument,
    ));

    let mut bad_hash = signed(good.parts());
    bad_hash.id = Bytes::copy_from_slice(&[1u8; 32]);
    cases.push(("bad hash", bad_hash, Code::InvalidArgument));

    let mut not_canonical = good.envelope.to_vec();
    not_canonical.extend_from_slice(&[0xf8, 0x01, 0x01]); // field 31 (unknown), varint 1
    let not_canonical_id = quire::scribe::hash(&not_canonical);
    let seal = quire::scribe::Seal::sign(
        &client,
        1,
        quire::scribe::merkle::leaf_hash(&not_canonical_id),
    );
    cases.push((
        "non-canonical envelope",
        signed(Parts {
            envelope: Bytes::from(not_canonical),
            seal: seal.bytes,
            ..good.parts()
        }),
        Code::InvalidArgument,
    ));

    let mut orphan_body = good.body.clone();
    orphan_body.parents = vec![ScribeId([3; 32])];
    cases.push((
        "unknown parent",
        signed(Scribe::sign(orphan_body, &client).parts()),
        Code::NotFound,
    ));

    let before = snapshot(&mut clients).await;
    for (name, request, code) in cases {
        let status = clients.log.append_signed(request).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {}", status.message());
        assert!(!status.message().is_empty());
        assert_eq!(
            snapshot(&mut clients).await,
            before,
            "{name} changed the log"
        );
    }

    // Node-signed refusals too.
    let status = clients
        .log
        .append(pb::AppendRequest {
            stream: bytes_of(&stream),
            kind: "x.big".into(),
            payload: Bytes::from(vec![0u8; 4096]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("1024"),
        "the message names the limit: {}",
        status.message()
    );
    let status = clients
        .log
        .append(pb::AppendRequest {
            stream: bytes_of(&stream),
            kind: "note".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("x.<name>"),
        "{}",
        status.message()
    );
    let status = clients
        .log
        .append(pb::AppendRequest {
            stream: Bytes::from_static(b"short"),
            kind: "x.a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // Shape rules apply to what the node signs too: nothing it could not decode is ever stored.
    let status = clients
        .log
        .append(pb::AppendRequest {
            stream: bytes_of(&stream),
            kind: "x.a".into(),
            content_type: "t".repeat(300),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("content_type"),
        "{}",
        status.message()
    );
    let status = clients
        .log
        .append(pb::AppendRequest {
            stream: bytes_of(&stream),
            kind: "x.a".into(),
            parents: vec![bytes_of(&stream); 65],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("parents"), "{}", status.message());

    // A batch with one bad item stores nothing at all.
    let batch = pb::AppendBatchRequest {
        appends: vec![pb::AppendRequest {
            stream: bytes_of(&stream),
            kind: "x.ok".into(),
            ..Default::default()
        }],
        signed: vec![signed(not_owner_parts(&client, &stream, hlc))],
        sealed: vec![],
    };
    let status = clients.log.append_batch(batch).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("item 1"), "{}", status.message());
    assert_eq!(
        snapshot(&mut clients).await,
        before,
        "a refused batch changed the log"
    );

    // And the stream still takes good scribes afterwards.
    let reply = clients
        .log
        .append_signed(signed(good.parts()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.seq, before.0 + 1);
    node.stop().await.unwrap();
}

fn not_owner_parts(key: &ed25519_dalek::SigningKey, stream: &StreamId, hlc: u64) -> Parts {
    client_scribe(key, stream, "file.delete", b"", hlc).parts()
}

fn signed(parts: Parts) -> pb::AppendSignedRequest {
    signed_request(parts)
}

/// Seals `body` with `key` whatever author the body claims (to forge).
fn seal_as(body: Body, key: &ed25519_dalek::SigningKey) -> Parts {
    let unsealed = body.into_unsealed(0);
    let seal = quire::scribe::Seal::sign(key, 1, quire::scribe::merkle::leaf_hash(&unsealed.id));
    Parts {
        redacted_by: Default::default(),
        envelope: unsealed.envelope,
        payload: unsealed.body.payload,
        seal: seal.bytes,
        proof: Proof::default(),
        leaves: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_appends_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "dups", None).await;
    let scribe = client_scribe(
        &client_key(1),
        &stream,
        "record.add",
        br#"{"_table":"t"}"#,
        node.log.clock().now(),
    );
    let first = clients
        .log
        .append_signed(signed(scribe.parts()))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.duplicate);
    let before = snapshot(&mut clients).await;
    for _ in 0..3 {
        let again = clients
            .log
            .append_signed(pb::AppendSignedRequest {
                id: bytes_of(&scribe.id),
                ..signed(scribe.parts())
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (again.id.clone(), again.seq, again.duplicate),
            (first.id.clone(), first.seq, true)
        );
    }
    // Twice in one batch, plus once already stored: one copy.
    let batch = pb::AppendBatchRequest {
        appends: vec![],
        signed: vec![signed(scribe.parts()), signed(scribe.parts())],
        sealed: vec![],
    };
    let results = clients
        .log
        .append_batch(batch)
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(results
        .iter()
        .all(|result| result.duplicate && result.seq == first.seq));
    assert_eq!(snapshot(&mut clients).await, before);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_every_scribe_and_seqs_continue_without_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    // The first run's wall clock is a day ahead; the second's is back to now: the node's clock
    // must still not go backwards.
    let ahead = quire::hlc::system_wall_clock()() + 86_400_000;
    let mut config = quire::node::NodeConfig::new(dir.path());
    config.wall = Some(std::sync::Arc::new(move || ahead));
    let node = start_config(config, false).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "restart", None).await;
    for index in 0..50 {
        append_note(&mut clients, &stream, &format!("note {index}")).await;
    }
    let before = read_all(&mut clients).await;
    let node_id = node.log.node_key();
    let last_hlc = node.log.clock().peek();
    node.stop().await.unwrap();

    assert!(
        last_hlc >> 16 >= ahead,
        "the first run used the clock a day ahead"
    );
    let node = start_node(dir.path()).await;
    assert_eq!(node.log.node_key(), node_id, "the node keeps its identity");
    assert!(
        node.log.clock().now() > last_hlc,
        "the clock never goes backwards across a restart"
    );
    let mut clients = crate::common::clients(&node.url()).await;
    assert_eq!(read_all(&mut clients).await, before);
    let next = append_note(&mut clients, &stream, "after").await;
    assert_eq!(next.seq, before.len() as u64 + 1);
    let seqs: Vec<u64> = read_all(&mut clients)
        .await
        .iter()
        .map(|entry| entry.seq)
        .collect();
    assert_eq!(seqs, (1..=before.len() as u64 + 1).collect::<Vec<_>>());
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_get_gapless_unique_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "concurrent", None).await;
    let mut tasks = Vec::new();
    for writer in 0..8 {
        let mut clients = crate::common::clients(&node.url()).await;
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for index in 0..100 {
                seqs.push(
                    append_note(&mut clients, &stream, &format!("{writer}/{index}"))
                        .await
                        .seq,
                );
            }
            seqs
        }));
    }
    let mut seqs = Vec::new();
    for task in tasks {
        let mine = task.await.unwrap();
        assert!(
            mine.windows(2).all(|pair| pair[0] < pair[1]),
            "one writer's appends commit in order"
        );
        seqs.extend(mine);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (2..=801).collect::<Vec<u64>>());
    // Node-signed scribes are stored in the order of their clocks.
    let entries = read_all(&mut clients).await;
    assert!(entries.windows(2).all(|pair| pair[0].hlc < pair[1].hlc));
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_and_work_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let client = client_key(5);
    let policy = pb::Policy {
        work_bits: 8,
        rules: vec![pb::KindRule {
            kind: "file.put".into(),
            authors: Some(pb::Authors {
                owner: true,
                keys: vec![Bytes::copy_from_slice(&client.verifying_key().to_bytes())],
                anyone: false,
                writers: false,
            }),
        }],
        ..Default::default()
    };
    let stream = create_stream(&mut clients, "work", Some(policy)).await;
    let hlc = node.log.clock().now();
    // The listed key may put files now.
    let (_, file) = quire::projection_api::files::FileChange::Put {
        path: "x.txt".into(),
        content_type: "text/plain".into(),
        data: b"x".to_vec(),
    }
    .encode();
    let put = client_scribe(&client, &stream, "file.put", &file, hlc);
    clients
        .log
        .append_signed(signed(put.parts()))
        .await
        .unwrap();
    // A record without enough work is refused...
    let mut nonce = 0;
    let lazy = loop {
        let scribe = work_scribe(&client, &stream, hlc, nonce);
        if quire::scribe::leading_zero_bits(scribe.id.as_bytes()) < 8 {
            break scribe;
        }
        nonce += 1;
    };
    let status = clients
        .log
        .append_signed(signed(lazy.parts()))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("8 zero bits"),
        "{}",
        status.message()
    );
    // ...one with it is taken, and the node does the work when it signs.
    let worked = Scribe::sign_with_work(lazy.body.clone(), &client, 8);
    clients
        .log
        .append_signed(signed(worked.parts()))
        .await
        .unwrap();
    let reply = clients
        .log
        .append(pb::AppendRequest {
            stream: bytes_of(&stream),
            kind: "record.add".into(),
            payload: Bytes::from_static(b"{}"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let entry = clients
        .log
        .get(pb::GetScribeRequest { id: reply.id })
        .await
        .unwrap()
        .into_inner();
    let scribe = Scribe::decode(entry_parts(&entry)).unwrap();
    assert!(quire::scribe::leading_zero_bits(scribe.id.as_bytes()) >= 8);
    // A bad policy is refused when the stream is created.
    let status = clients
        .streams
        .create(pb::CreateStreamRequest {
            name: "bad".into(),
            policy: Some(pb::Policy {
                work_bits: 99,
                ..Default::default()
            }),
            owner: Bytes::new(),
            access: None,
            retention: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    node.stop().await.unwrap();
}

fn work_scribe(key: &ed25519_dalek::SigningKey, stream: &StreamId, hlc: u64, nonce: u64) -> Scribe {
    let mut body = client_scribe(key, stream, "record.add", b"{}", hlc).body;
    body.nonce = nonce;
    Scribe::sign(body, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let channel = owner_channel(&node.url()).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "quire.v1.Log".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    node.stop().await.unwrap();
}

/// A new stream lets only its owner write `x.*` kinds (policy `defaults_version` 1, written by
/// the node whatever the client asks); a prefix rule opens a family (`x.chat.*`), an exact rule
/// wins over it; refusals change nothing. Through gRPC and the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extension_kinds_are_owner_only_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let create = |name: &str, rules: Vec<pb::KindRule>| pb::CreateStreamRequest {
        name: name.into(),
        policy: Some(pb::Policy {
            rules,
            // A client cannot ask for the old defaults: the node writes the newest.
            defaults_version: 0,
            ..Default::default()
        }),
        owner: Bytes::new(),
        access: None,
        retention: None,
    };
    let closed = clients
        .streams
        .create(create("closed", vec![]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(closed.policy.as_ref().unwrap().defaults_version, 1);
    let closed = StreamId::from_slice(&closed.stream).unwrap();
    let stranger = client_key(77);
    let hlc = node.log.clock().now();
    let before = snapshot(&mut clients).await;
    let refused = clients
        .log
        .append_signed(signed_request(
            client_scribe(&stranger, &closed, "x.note", b"mine", hlc).parts(),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("x.note") && refused.message().contains("owner"),
        "{}",
        refused.message()
    );
    assert_eq!(
        snapshot(&mut clients).await,
        before,
        "a refusal changes nothing"
    );
    // The owner (the node, with the token) writes it.
    append_note(&mut clients, &closed, "the owner's").await;

    let anyone = Some(pb::Authors {
        anyone: true,
        ..Default::default()
    });
    let owner = Some(pb::Authors {
        owner: true,
        ..Default::default()
    });
    let chat = clients
        .streams
        .create(create(
            "chat",
            vec![
                pb::KindRule {
                    kind: "x.chat.*".into(),
                    authors: anyone,
                },
                pb::KindRule {
                    kind: "x.chat.pin".into(),
                    authors: owner,
                },
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    let chat = StreamId::from_slice(&chat.stream).unwrap();
    for (n, (kind, expected, why)) in [
        ("x.chat.msg", Ok(()), "the prefix rule"),
        ("x.chat.room.msg", Ok(()), "deeper kinds too"),
        (
            "x.chat.pin",
            Err(Code::PermissionDenied),
            "an exact rule wins over the prefix",
        ),
        (
            "x.chatter",
            Err(Code::PermissionDenied),
            "x.chat.* does not cover x.chatter",
        ),
        ("record.add", Ok(()), "record.* is still anyone's"),
    ]
    .into_iter()
    .enumerate()
    {
        let scribe = client_scribe(&stranger, &chat, kind, b"hi", hlc + 1 + n as u64);
        let outcome = clients
            .log
            .append_signed(signed_request(scribe.parts()))
            .await
            .map(|_| ())
            .map_err(|status| status.code());
        assert_eq!(outcome, expected, "{kind}: {why}");
    }

    // Bad rules are refused with what to fix, and create nothing.
    for (kind, words) in [
        ("acl.*", "membership"),
        ("y.*", "a prefix rule is"),
        ("stream.*", "exactly one genesis"),
    ] {
        let status = clients
            .streams
            .create(create(
                "bad",
                vec![pb::KindRule {
                    kind: kind.into(),
                    authors: Some(pb::Authors {
                        anyone: true,
                        ..Default::default()
                    }),
                }],
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{kind}");
        assert!(
            status.message().contains(words),
            "{kind}: {}",
            status.message()
        );
    }

    // The CLI: `stream create --allow 'x.*=anyone'` and `stream get` says the defaults.
    let out = quire_cli(&node.url())
        .args(["stream", "create", "cli", "--allow", "x.*=anyone"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = quire_cli(&node.url())
        .args(["stream", "get", &id])
        .output()
        .unwrap();
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(
        shown.contains("x.* the owner") && shown.contains("allow       x.* = anyone"),
        "{shown}"
    );
    let out = quire_cli(&node.url())
        .args(["stream", "create", "cli", "--allow", "acl.*=anyone"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("membership"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.stop().await.unwrap();
}
