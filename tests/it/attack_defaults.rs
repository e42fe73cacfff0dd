//! Attacks on four pieces written together: `x.*` kinds owner-only by default in new public
//! streams (policy `defaults_version`), prefix policy rules (`x.*`, `x.chat.*`, `record.*`, ...),
//! `--accept-streams known`, and a rejoining node getting its own scribes back (`Want`
//! `own_since_seq`). Written by a reviewing helper.
//!
//! Each test says what it attacks and what must hold. Three were findings, all fixed: a stranger's
//! genesis that named a known key as owner was taken under `--accept-streams known` (the signer
//! of the genesis must be known too); of concurrent joins of a refused stream only one was told
//! (a refusal is now read by every waiting join); a flock `join_app` of a refused app answered
//! "pending" forever (a refusal that still holds is the next join's answer at once).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use prost::Message as _;
use quire::api::access::app_label;
use quire::genesis::{genesis_payload, GENESIS_CONTENT_TYPE};
use quire::log::AcceptStreams;
use quire::node::{NodeConfig, RunningNode};
use quire::pb;
use quire::pb::peer_message::Message as Wire;
use quire::projection_api::{AuthorKey, Kind, ScribeId, StreamId};
use quire::replication::session::Message;
use quire::scribe::{seal_all, Body, Scribe};
use serde_json::json;
use tonic::Code;

use crate::common::*;
use crate::malicious::{wait_for_peer, Intruder};
use crate::replication::{connect, join, part, stream_ids, wait_for_count, CONVERGE};

const HOUR_MS: u64 = 3600 * 1000;

// ---------------------------------------------------------------------------------------------
// Helpers.

fn key_bytes(key: &AuthorKey) -> Bytes {
    Bytes::copy_from_slice(key.as_bytes())
}

fn anyone() -> Option<pb::Authors> {
    Some(pb::Authors {
        anyone: true,
        ..Default::default()
    })
}

fn owner_only() -> Option<pb::Authors> {
    Some(pb::Authors {
        owner: true,
        ..Default::default()
    })
}

fn keys(keys: &[&SigningKey]) -> Option<pb::Authors> {
    Some(pb::Authors {
        keys: keys.iter().map(|key| key_bytes(&key_of(key))).collect(),
        ..Default::default()
    })
}

fn rule(kind: &str, authors: Option<pb::Authors>) -> pb::KindRule {
    pb::KindRule {
        kind: kind.into(),
        authors,
    }
}

/// A body of `stream` by `key` with every field chosen (the kind unchecked: `Kind::Custom`
/// carries any text).
fn body(
    key: &SigningKey,
    stream: &StreamId,
    kind: Kind,
    content_type: &str,
    payload: Bytes,
    hlc: u64,
    parents: Vec<ScribeId>,
) -> Body {
    Body {
        stream: Some(*stream),
        author: key_of(key),
        hlc,
        kind,
        content_type: content_type.into(),
        payload,
        parents,
        membership: None,
        nonce: 0,
    }
}

/// A scribe of `stream` by `key` of `kind` (parsed) with a payload fitting the kind.
fn scribe_of(
    key: &SigningKey,
    stream: &StreamId,
    kind: &str,
    hlc: u64,
    parents: Vec<ScribeId>,
) -> Scribe {
    let kind: Kind = kind.parse().unwrap();
    let (content_type, payload) = match kind {
        Kind::FilePut => (
            quire::projection_api::files::CONTENT_TYPE,
            pb::FilePut {
                path: "stranger.txt".into(),
                content_type: "text/plain".into(),
                data: Bytes::from_static(b"a stranger's file"),
            }
            .encode_to_vec(),
        ),
        Kind::FileDelete => (
            quire::projection_api::files::CONTENT_TYPE,
            pb::FileDelete {
                path: "stranger.txt".into(),
            }
            .encode_to_vec(),
        ),
        Kind::KvSet => (
            quire_projection_kv::CONTENT_TYPE,
            quire_projection_kv::KvSet {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                replaces: vec![],
            }
            .encode_to_vec(),
        ),
        Kind::KvDelete => (
            quire_projection_kv::CONTENT_TYPE,
            quire_projection_kv::KvDelete {
                key: b"k".to_vec(),
                replaces: vec![],
            }
            .encode_to_vec(),
        ),
        _ => (
            "text/plain",
            format!("{kind} by {}", key_of(key)).into_bytes(),
        ),
    };
    Scribe::sign(
        body(
            key,
            stream,
            kind,
            content_type,
            Bytes::from(payload),
            hlc,
            parents,
        ),
        key,
    )
}

/// A genesis body signed by `key`, naming `owner` (None: `key`) with `policy`.
fn genesis_body(
    key: &SigningKey,
    owner: Option<AuthorKey>,
    policy: Option<pb::Policy>,
    access: Option<pb::Access>,
    hlc: u64,
    salt: u8,
) -> Body {
    Body {
        stream: None,
        author: key_of(key),
        hlc,
        kind: Kind::StreamCreate,
        content_type: GENESIS_CONTENT_TYPE.into(),
        payload: Bytes::from(genesis_payload(
            "attack_defaults",
            owner,
            policy,
            access,
            [salt; 16],
        )),
        parents: vec![],
        membership: None,
        nonce: 0,
    }
}

fn genesis(
    key: &SigningKey,
    owner: Option<AuthorKey>,
    policy: Option<pb::Policy>,
    hlc: u64,
    salt: u8,
) -> Scribe {
    Scribe::sign(genesis_body(key, owner, policy, None, hlc, salt), key)
}

/// `AppendSigned` of `scribe` with the owner's token.
async fn append_as_owner(node: &RunningNode, scribe: &Scribe) -> Result<pb::AppendReply, Code> {
    clients(&node.url())
        .await
        .log
        .append_signed(signed_request(scribe.parts()))
        .await
        .map(|reply| reply.into_inner())
        .map_err(|status| status.code())
}

/// `AppendSigned` of `scribe` without a token: anyone who reaches the port.
async fn append_as_stranger(
    node: &RunningNode,
    scribe: &Scribe,
) -> Result<pb::AppendReply, tonic::Status> {
    pb::log_client::LogClient::new(stranger_channel(&node.url()).await)
        .append_signed(signed_request(scribe.parts()))
        .await
        .map(|reply| reply.into_inner())
}

/// Head and every stored entry: what a refusal must leave alone.
async fn snapshot(node: &RunningNode) -> (u64, Vec<pb::Entry>) {
    let mut clients = clients(&node.url()).await;
    (head(&mut clients).await, read_all(&mut clients).await)
}

async fn create_raw(
    node: &RunningNode,
    rules: Vec<pb::KindRule>,
    defaults_version: u32,
) -> Result<pb::StreamInfo, tonic::Status> {
    clients(&node.url())
        .await
        .streams
        .create(pb::CreateStreamRequest {
            name: "raw".into(),
            policy: Some(pb::Policy {
                rules,
                defaults_version,
                ..Default::default()
            }),
            owner: Bytes::new(),
            access: None,
            retention: None,
        })
        .await
        .map(|reply| reply.into_inner())
}

/// Both nodes hold the same scribes of `stream`, and neither counted a refusal against the other.
async fn same_and_unblamed(a: &RunningNode, b: &RunningNode, stream: &StreamId) {
    assert_eq!(
        set(&stream_ids(a, stream).await),
        set(&stream_ids(b, stream).await)
    );
    assert_eq!(refused_by(a).await + refused_by(b).await, 0);
}

/// A stream created over gRPC with `rules` (a refusal panics).
async fn stream_with(node: &RunningNode, rules: Vec<pb::KindRule>) -> StreamId {
    let info = create_raw(node, rules, 1).await.expect("create");
    StreamId::from_slice(&info.stream).unwrap()
}

async fn join_within(node: &RunningNode, stream: &StreamId, ms: u64) -> Result<(), tonic::Status> {
    clients(&node.url())
        .await
        .streams
        .join(pb::JoinStreamRequest {
            stream: bytes_of(stream),
            timeout_ms: ms,
        })
        .await
        .map(|_| ())
}

async fn set_key(node: &RunningNode, key: &AuthorKey, allow: bool) {
    let request = pb::PeerKeyRequest {
        node_id: key_bytes(key),
    };
    let mut admin = clients(&node.url()).await.admin;
    if allow {
        admin.allow_peer(request).await.unwrap();
    } else {
        admin.deny_peer(request).await.unwrap();
    }
}

fn pending(node: &RunningNode) -> Vec<StreamId> {
    node.log.store().pending_joins().unwrap()
}

async fn known_node(dir: &std::path::Path) -> RunningNode {
    let mut config = NodeConfig::new(dir);
    config.accept_streams = AcceptStreams::Known;
    start_config(config, true).await
}

fn genesis_message(stream: &StreamId, scribe: &Scribe) -> Wire {
    quire::replication::wire::to_proto(&Message::Genesis {
        stream: *stream,
        scribe: Some(scribe.parts()),
    })
    .message
    .expect("a message")
}

/// Everything the node sent before it answers a `GenesisRequest` of a stream nobody holds: the
/// node handles a connection's messages in order, so whatever the intruder sent before has been
/// handled.
async fn barrier(intruder: &mut Intruder) -> Vec<Wire> {
    let nobody = StreamId::from([0xEE; 32]);
    intruder
        .send(Wire::GenesisRequest(pb::PeerGenesisRequest {
            stream: bytes_of(&nobody),
        }))
        .await;
    let mut seen = Vec::new();
    loop {
        match intruder.next().await {
            Some(Wire::Genesis(genesis)) if genesis.stream == bytes_of(&nobody) => return seen,
            Some(other) => seen.push(other),
            None => panic!("the node closed the connection"),
        }
    }
}

/// The ids the node sends of `stream` after the intruder's `Want`, up to its `CaughtUp`.
async fn want(intruder: &mut Intruder, stream: &StreamId, after: u64, since: u64) -> Vec<Bytes> {
    intruder
        .send(Wire::Want(pb::PeerWant {
            stream: bytes_of(stream),
            after_seq: after,
            own_since_seq: since,
        }))
        .await;
    let mut ids = Vec::new();
    loop {
        match intruder.next().await {
            Some(Wire::Batch(batch)) if batch.stream == bytes_of(stream) => {
                ids.extend(batch.scribes.into_iter().map(|scribe| scribe.id))
            }
            Some(Wire::CaughtUp(caught)) if caught.stream == bytes_of(stream) => return ids,
            Some(_) => continue,
            None => panic!("the node closed the connection"),
        }
    }
}

fn set(ids: &[Bytes]) -> HashSet<Bytes> {
    ids.iter().cloned().collect()
}

// ---------------------------------------------------------------------------------------------
// 1. `x.*` owner-only by default: `defaults_version`.

/// Attack: ask `Streams.Create` (and the HTTP flock `create_app`) for a stream under the old
/// defaults (`defaults_version` 0), a newer one (2, `u32::MAX`), or with rules that look like
/// they open `x.*` without doing so; then write `x.*` kinds as a stranger, also with kinds that
/// spell a rule (`x.*`, `x.chat.*`) and through an app's page. Must hold: every stream the node
/// creates is under `defaults_version` 1, a stranger's `x.*` scribe is refused
/// (`PERMISSION_DENIED`, or `INVALID_ARGUMENT` for a kind that is not a kind), a node-signed
/// `stream.create` append is refused, and no refusal changes the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_created_stream_keeps_x_kinds_for_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut streams = Vec::new();
    for asked in [0, 2, 7, u32::MAX] {
        let info = create_raw(&node, vec![], asked)
            .await
            .unwrap_or_else(|status| panic!("defaults_version {asked}: {status:?}"));
        assert_eq!(
            info.policy.as_ref().unwrap().defaults_version,
            1,
            "asked for {asked}"
        );
        streams.push(StreamId::from_slice(&info.stream).unwrap());
    }
    // Rules for other kinds, or an empty rule for x.*, do not open x.* to strangers.
    let info = create_raw(
        &node,
        vec![
            rule("x.*", Some(pb::Authors::default())),
            rule("record.*", anyone()),
        ],
        0,
    )
    .await
    .unwrap();
    streams.push(StreamId::from_slice(&info.stream).unwrap());
    // The HTTP flock create_app.
    let created: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/create_app", node.url()))
        .bearer_auth(node.token.as_str())
        .json(&json!({"name": "flock", "work_bits": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let app: StreamId = created["tid"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        stream_info(&node, &app)
            .await
            .policy
            .unwrap()
            .defaults_version,
        1,
        "create_app"
    );
    streams.push(app);

    let stranger = client_key(140);
    let before = snapshot(&node).await;
    let mut hlc = node.log.clock().now();
    for stream in &streams {
        for kind in ["x.note", "x.a.b.c", "x.chat.msg", "x.-"] {
            hlc += 1;
            let refused =
                append_as_stranger(&node, &scribe_of(&stranger, stream, kind, hlc, vec![]))
                    .await
                    .unwrap_err();
            assert_eq!(
                refused.code(),
                Code::PermissionDenied,
                "{kind}: {refused:?}"
            );
        }
        // A kind spelled like a rule is no kind at all.
        for text in ["x.*", "x.chat.*", "*", "x."] {
            hlc += 1;
            let raw = Scribe::sign(
                body(
                    &stranger,
                    stream,
                    Kind::Custom(text.into()),
                    "text/plain",
                    Bytes::from_static(b"?"),
                    hlc,
                    vec![],
                ),
                &stranger,
            );
            let refused = append_as_stranger(&node, &raw).await.unwrap_err();
            assert!(
                matches!(
                    refused.code(),
                    Code::InvalidArgument | Code::PermissionDenied
                ),
                "{text}: {refused:?}"
            );
        }
    }
    // No route makes the node sign a genesis of a client's choosing.
    let mut owner = clients(&node.url()).await;
    let refused = owner
        .log
        .append(pb::AppendRequest {
            stream: bytes_of(&streams[0]),
            kind: "stream.create".into(),
            content_type: GENESIS_CONTENT_TYPE.into(),
            payload: Bytes::from(genesis_payload("old", None, None, None, [1; 16])),
            parents: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    // An app's page has no action that writes an x.* kind.
    let host = format!("{}.localhost", app_label(&app));
    let origin = format!("http://{host}:{}", node.api_addr.port());
    for action in ["/x.note", "/append", "/add_record?kind=x.note"] {
        let (status, reply) = http_to(
            &node,
            Some(&host),
            reqwest::Method::POST,
            action,
            &[("origin", origin.clone())],
            Some(json!({"_table": "note", "text": "from the page", "kind": "x.note"})),
        )
        .await;
        if status == 200 {
            // Only add_record answers: it must have written a record.add, nothing else.
            let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
            let id = hex::decode(reply["id"].as_str().unwrap()).unwrap();
            let entry = owner
                .log
                .get(pb::GetScribeRequest {
                    id: Bytes::from(id),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(entry.kind, "record.add", "{action}");
        }
    }
    let after = snapshot(&node).await;
    let records = after.1.len() - before.1.len();
    assert!(
        after.1[..before.1.len()] == before.1[..]
            && after.1[before.1.len()..]
                .iter()
                .all(|entry| entry.kind == "record.add"),
        "refusals changed the log ({records} entries more)"
    );
    node.stop().await.unwrap();
}

/// Attack: plant a stream under the old, open defaults (`defaults_version` 0) with a
/// client-signed genesis: without the owner's token through `AppendSigned`, `AppendBatch.signed`
/// and `AppendBatch.sealed`; with it, a genesis of `defaults_version` 2 (newer than the node).
/// Must hold: without the token every route is `UNAUTHENTICATED` and stores nothing; a newer
/// `defaults_version` is `INVALID_ARGUMENT` saying to upgrade. With the token a genesis of 0 (a
/// stream from before the default) is the owner's documented choice: it keeps `x.*` open, and a
/// second node that joins it judges a stranger's `x.*` scribe exactly as the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_can_plant_a_genesis_with_old_defaults_and_peers_judge_it_alike() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = start_node(dir_b.path()).await;
    let planter = client_key(141);
    let old = pb::Policy {
        defaults_version: 0,
        ..Default::default()
    };
    let hlc = a.log.clock().now();
    let g0 = genesis(&planter, None, Some(old), hlc, 1);
    let stream = g0.id;
    let child = scribe_of(&planter, &stream, "x.note", hlc + 1, vec![]);
    let before = snapshot(&a).await;
    let refused = append_as_stranger(&a, &g0).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let mut stranger_log = pb::log_client::LogClient::new(stranger_channel(&a.url()).await);
    let refused = stranger_log
        .append_batch(pb::AppendBatchRequest {
            appends: vec![],
            signed: vec![signed_request(g0.parts()), signed_request(child.parts())],
            sealed: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let together = seal_all(
        vec![
            genesis_body(&planter, None, None, None, hlc + 2, 2).into_unsealed(0),
            body(
                &planter,
                &genesis_body(&planter, None, None, None, hlc + 2, 2)
                    .into_unsealed(0)
                    .id,
                "x.note".parse().unwrap(),
                "text/plain",
                Bytes::from_static(b"sealed"),
                hlc + 3,
                vec![],
            )
            .into_unsealed(0),
        ],
        &planter,
    );
    let refused = stranger_log
        .append_batch(pb::AppendBatchRequest {
            appends: vec![],
            signed: vec![],
            sealed: vec![pb::SealedBatch {
                scribes: together
                    .iter()
                    .map(|scribe| pb::Unsealed {
                        envelope: scribe.envelope.clone(),
                        payload: scribe.body.payload.clone(),
                    })
                    .collect(),
                seal: together[0].seal.bytes.clone(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert_eq!(snapshot(&a).await, before, "refusals store nothing");
    assert!(a.log.stream(&stream).is_none());

    // Newer than the node knows: refused with the words to fix it.
    let newer = genesis(
        &planter,
        None,
        Some(pb::Policy {
            defaults_version: 2,
            ..Default::default()
        }),
        hlc,
        3,
    );
    let refused = clients(&a.url())
        .await
        .log
        .append_signed(signed_request(newer.parts()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("upgrade"),
        "{}",
        refused.message()
    );
    assert_eq!(snapshot(&a).await, before, "refusals store nothing");

    // The owner's choice: a stream from before the default.
    append_as_owner(&a, &g0).await.unwrap();
    assert_eq!(
        stream_info(&a, &stream)
            .await
            .policy
            .unwrap()
            .defaults_version,
        0
    );
    connect(&b, &a).await;
    join(&b, &stream).await;
    assert_eq!(
        stream_info(&b, &stream)
            .await
            .policy
            .unwrap()
            .defaults_version,
        0,
        "the joiner reads the same defaults"
    );
    let stranger = client_key(142);
    let on_a = scribe_of(&stranger, &stream, "x.note", hlc + 10, vec![]);
    let on_b = scribe_of(&stranger, &stream, "x.vote", hlc + 11, vec![]);
    append_as_stranger(&a, &on_a).await.unwrap();
    append_as_stranger(&b, &on_b).await.unwrap();
    wait_for_count(&[&a, &b], &stream, 3).await;
    same_and_unblamed(&a, &b, &stream).await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Attack: a peer answers a join with a genesis of `defaults_version` 2, 99 or `u32::MAX` (a
/// newer quire's, or a forged one), or 0 (a stream from before the default). Must hold: a newer
/// genesis is not stored and the peer is not blamed (not counted, not cut off: it may simply run
/// a newer quire); the join ends at once, `FAILED_PRECONDITION` saying to upgrade (every peer
/// holds the same bytes: the id is their hash), and nothing stays pending. A genesis of 0 is
/// taken, and its `x.*` kinds are open to anyone on the joiner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_genesis_with_unknown_defaults_is_not_stored_and_blames_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let peer_key = client_key(143);
    let mut intruder = Intruder::connect(node.peer_addr.unwrap(), peer_key.clone(), true).await;
    barrier(&mut intruder).await;
    let author = client_key(144);
    let hlc = node.log.clock().now();
    for (n, version) in [2u32, 99, u32::MAX].into_iter().enumerate() {
        let newer = genesis(
            &author,
            None,
            Some(pb::Policy {
                defaults_version: version,
                ..Default::default()
            }),
            hlc,
            10 + n as u8,
        );
        let stream = newer.id;
        let serve = async {
            loop {
                match intruder.next().await {
                    Some(Wire::GenesisRequest(request)) if request.stream == bytes_of(&stream) => {
                        break
                    }
                    Some(_) => continue,
                    None => panic!("the node closed the connection"),
                }
            }
            intruder.send(genesis_message(&stream, &newer)).await;
            barrier(&mut intruder).await;
        };
        let (joined, ()) = tokio::join!(join_within(&node, &stream, 3000), serve);
        let status = joined.unwrap_err();
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{version}: {status:?}"
        );
        assert!(status.message().contains("upgrade quire"), "{status:?}");
        assert!(node.log.stream(&stream).is_none(), "{version}");
        assert!(!pending(&node).contains(&stream), "the join ended");
    }
    let status = wait_for_peer(&node, &peer_key, |peer| peer.connected).await;
    assert_eq!(status.refused, 0, "a newer genesis is not the peer's fault");

    // Defaults 0: taken, x.* open.
    let old = genesis(&author, None, None, hlc, 20);
    let stream = old.id;
    let serve = async {
        loop {
            match intruder.next().await {
                Some(Wire::GenesisRequest(request)) if request.stream == bytes_of(&stream) => break,
                Some(_) => continue,
                None => panic!("the node closed the connection"),
            }
        }
        intruder.send(genesis_message(&stream, &old)).await;
    };
    let (joined, ()) = tokio::join!(join_within(&node, &stream, 30_000), serve);
    joined.unwrap();
    assert_eq!(
        stream_info(&node, &stream)
            .await
            .policy
            .unwrap()
            .defaults_version,
        0
    );
    let stranger = client_key(145);
    append_as_stranger(
        &node,
        &scribe_of(&stranger, &stream, "x.note", hlc + 1, vec![]),
    )
    .await
    .unwrap();
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 2. Prefix rules.

/// Attack: odd rule patterns at create: no prefix, an empty or doubled segment, a star inside,
/// a prefix of a built-in kind (`record.add.*`), `acl.*`, `stream.*`, upper case, spaces, and
/// one rule twice. Must hold: each is `INVALID_ARGUMENT` and creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_rule_patterns_are_refused_at_create() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let before = snapshot(&node).await;
    let bad: Vec<Vec<pb::KindRule>> = [
        "*",
        ".*",
        "x",
        "x.",
        "x*",
        "x..*",
        "x.*.*",
        "x.chat.**",
        "x.chat*",
        "X.*",
        "x.*.chat",
        " x.*",
        "x.* ",
        "record.add.*",
        "file.put.*",
        "kv.set.*",
        "record",
        "acl.*",
        "acl.grant",
        "stream.*",
        "stream.create",
        "y.*",
        "",
    ]
    .into_iter()
    .map(|kind| vec![rule(kind, anyone())])
    .chain([
        vec![rule("x.*", anyone()), rule("x.*", owner_only())],
        vec![rule("x.*", anyone()), rule("x.*", anyone())],
        vec![rule("record.*", anyone()), rule("record.*", anyone())],
        vec![rule("x.chat.*", anyone()), rule("x.chat.*", owner_only())],
        vec![
            rule("kv.*", anyone()),
            rule("kv.set", anyone()),
            rule("kv.set", owner_only()),
        ],
        vec![rule(
            "x.*",
            Some(pb::Authors {
                keys: vec![Bytes::from_static(b"short")],
                ..Default::default()
            }),
        )],
    ])
    .collect();
    for rules in bad {
        let shown: Vec<String> = rules.iter().map(|rule| rule.kind.clone()).collect();
        let status = create_raw(&node, rules, 1).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{shown:?}: {status:?}"
        );
    }
    assert_eq!(snapshot(&node).await, before, "nothing created");
    // The documented families are taken.
    create_raw(
        &node,
        vec![
            rule("x.*", anyone()),
            rule("x.chat.*", owner_only()),
            rule("x.chat", anyone()),
            rule("record.*", owner_only()),
            rule("record.upvote", anyone()),
            rule("kv.*", anyone()),
            rule("file.*", anyone()),
        ],
        1,
    )
    .await
    .unwrap();
    node.stop().await.unwrap();
}

/// Attack: a stream with overlapping prefix rules — `x.chat.*` for one key beside an exact
/// `x.chat` for anyone, `x.a.*` open, `record.*` owner-only with an exact `record.upvote` open,
/// `file.*` open, `kv.*` for one key — and scribes that probe every edge (`x.chat` vs
/// `x.chat.msg`, `x.a` vs `x.a.b.c` vs `x.ab`, deeper kinds, kinds no rule covers), each
/// appended to two replicating nodes separately while they are apart. Must hold: each verdict is
/// the one docs/protocol.md ("Streams and policies") gives — exact rule, else longest prefix,
/// else the default (`x.*` owner-only) — the same on both nodes; refusals change nothing; once
/// reconnected the nodes hold the same scribes and neither refuses anything of the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_rules_judge_every_edge_alike_on_two_nodes() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = start_node(dir_b.path()).await;
    let (stranger, k1, k2) = (client_key(150), client_key(151), client_key(152));
    let info = create_raw(
        &a,
        vec![
            rule("x.chat.*", keys(&[&k1])),
            rule("x.chat", anyone()),
            rule("x.a.*", anyone()),
            rule("record.*", owner_only()),
            rule("record.upvote", anyone()),
            rule("file.*", anyone()),
            rule("kv.*", keys(&[&k2])),
        ],
        0,
    )
    .await
    .unwrap();
    let stream = StreamId::from_slice(&info.stream).unwrap();
    connect(&b, &a).await;
    join(&b, &stream).await;
    part(&b, &a).await;
    assert_eq!(
        stream_info(&b, &stream).await.policy,
        info.policy,
        "both read one policy"
    );
    let ok = true;
    let cases: Vec<(&SigningKey, &str, Vec<ScribeId>, bool, &str)> = vec![
        (&stranger, "x.chat", vec![], ok, "the exact rule"),
        (&stranger, "x.chat.msg", vec![], !ok, "x.chat.* is k1's"),
        (&k1, "x.chat.msg", vec![], ok, "x.chat.* is k1's"),
        (&k1, "x.chat.room.deep", vec![], ok, "deeper kinds too"),
        (&k1, "x.chat", vec![], ok, "anyone"),
        (&k1, "x.chatter", vec![], !ok, "not under x.chat.*: default"),
        (&stranger, "x.a.b.c", vec![], ok, "x.a.*"),
        (&stranger, "x.a.b", vec![], ok, "x.a.*"),
        (&stranger, "x.a", vec![], !ok, "x.a.* does not cover x.a"),
        (&stranger, "x.ab", vec![], !ok, "nor x.ab"),
        (&stranger, "x.b", vec![], !ok, "default: owner"),
        (&stranger, "record.add", vec![], !ok, "record.* owner"),
        (&stranger, "record.upvote", vec![stream], ok, "exact first"),
        (&stranger, "file.put", vec![], ok, "file.* anyone"),
        (&stranger, "file.delete", vec![], ok, "file.* anyone"),
        (&stranger, "kv.set", vec![], !ok, "kv.* is k2's"),
        (&k1, "kv.delete", vec![], !ok, "kv.* is k2's"),
        (&k2, "kv.set", vec![], ok, "kv.* is k2's"),
    ];
    let hlc = a.log.clock().now();
    let mut accepted = 0;
    for (n, (key, kind, parents, expected, why)) in cases.into_iter().enumerate() {
        let scribe = scribe_of(key, &stream, kind, hlc + n as u64, parents);
        let before = (snapshot(&a).await, snapshot(&b).await);
        let on_a = append_as_stranger(&a, &scribe).await.map(|_| ());
        let on_b = append_as_stranger(&b, &scribe).await.map(|_| ());
        let codes = (
            on_a.as_ref().map_err(|status| status.code()).err(),
            on_b.as_ref().map_err(|status| status.code()).err(),
        );
        assert_eq!(
            codes.0, codes.1,
            "{kind}: the nodes disagree: {on_a:?} / {on_b:?}"
        );
        if expected {
            assert!(on_a.is_ok(), "{kind} ({why}): {on_a:?}");
            accepted += 1;
        } else {
            assert_eq!(codes.0, Some(Code::PermissionDenied), "{kind} ({why})");
            assert_eq!(
                (snapshot(&a).await, snapshot(&b).await),
                before,
                "{kind}: a refusal changed a log"
            );
        }
    }
    assert_eq!(held(&a, &stream), 1 + accepted);
    assert_eq!(held(&b, &stream), 1 + accepted);
    connect(&b, &a).await;
    let mut owner_a = clients(&a.url()).await;
    append_note(&mut owner_a, &stream, "the owner's x.note").await;
    wait_for_count(&[&b], &stream, 2 + accepted).await;
    same_and_unblamed(&a, &b, &stream).await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Attack: an app's page (at its own origin, writing as the node) adds records and upvotes to a
/// stream whose `record.*` is the owner's, and to one where `record.*` is open but the exact
/// `record.add` is the owner's; a stranger signs a `file.put` into a stream whose `file.*` is
/// open. Must hold: the page is refused (`403`) wherever the rule that applies is not "anyone",
/// and writes where it is; the stranger's file is stored and served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_pages_and_strangers_get_what_the_prefix_rules_give() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let closed = stream_with(&node, vec![rule("record.*", owner_only())]).await;
    let exact = stream_with(
        &node,
        vec![rule("record.*", anyone()), rule("record.add", owner_only())],
    )
    .await;
    let open = stream_with(
        &node,
        vec![rule("record.*", anyone()), rule("file.*", anyone())],
    )
    .await;
    let page = |stream: StreamId, action: &'static str, body: serde_json::Value| {
        let node = &node;
        async move {
            let host = format!("{}.localhost", app_label(&stream));
            let origin = format!("http://{host}:{}", node.api_addr.port());
            http_to(
                node,
                Some(&host),
                reqwest::Method::POST,
                action,
                &[("origin", origin)],
                Some(body),
            )
            .await
        }
    };
    let record = json!({"_table": "note", "text": "from a page"});
    let upvote = |stream: StreamId| json!({"id": stream.to_hex()});
    let before = snapshot(&node).await;
    for (stream, action, body, why) in [
        (closed, "/add_record", record.clone(), "record.* owner"),
        (closed, "/upvote", upvote(closed), "record.* owner"),
        (
            exact,
            "/add_record",
            record.clone(),
            "exact record.add owner",
        ),
    ] {
        let (status, reply) = page(stream, action, body).await;
        assert_eq!(status, 403, "{action} ({why}): {reply}");
    }
    assert_eq!(snapshot(&node).await, before, "refusals change nothing");
    let (status, reply) = page(open, "/add_record", record.clone()).await;
    assert_eq!(status, 200, "{reply}");

    let stranger = client_key(153);
    let hlc = node.log.clock().now();
    append_as_stranger(&node, &scribe_of(&stranger, &open, "file.put", hlc, vec![]))
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the stranger's file served",
        || {
            let node = &node;
            async move {
                let (status, body) = http_to(
                    node,
                    None,
                    reqwest::Method::GET,
                    &format!("/{}/stranger.txt", open.to_hex()),
                    &[],
                    None,
                )
                .await;
                status == 200 && body == "a stranger's file"
            }
        },
    )
    .await;
    node.stop().await.unwrap();
}

/// Attack: an app's page calls `kv_set` over the live binding (writing as the node) in a stream
/// whose `kv.*` is the owner's, and in one where `kv.*` is open but the exact `kv.set` is the
/// owner's. Must hold: both calls fail and change nothing; in a stream whose `kv.*` is open the
/// same call works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_page_live_binding_obeys_prefix_rules_for_kv() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let closed = stream_with(&node, vec![rule("kv.*", owner_only())]).await;
    let exact = stream_with(
        &node,
        vec![rule("kv.*", anyone()), rule("kv.set", owner_only())],
    )
    .await;
    let open = stream_with(&node, vec![rule("kv.*", anyone())]).await;
    let before = snapshot(&node).await;
    for (n, stream) in [closed, exact].into_iter().enumerate() {
        let mut page = crate::ws::open_app(&node, &stream, "/socksync")
            .await
            .expect("the app's page opens it");
        page.subscribe("function", "kv_set").await;
        let (outcome, _) = page
            .call_frames(
                "kv_set",
                &format!("p{n}"),
                json!({"key": "motd", "value": "page"}),
            )
            .await;
        let frame = outcome.expect_err("the page may not write kv.set here");
        assert_eq!(frame["error_code"], json!(8), "{frame}");
        assert!(
            frame["message"].as_str().unwrap().contains("policy"),
            "{frame}"
        );
    }
    assert_eq!(snapshot(&node).await, before, "refusals change nothing");
    let mut page = crate::ws::open_app(&node, &open, "/socksync")
        .await
        .expect("the app's page opens it");
    page.subscribe("function", "kv_set").await;
    let (outcome, _) = page
        .call_frames("kv_set", "ok", json!({"key": "motd", "value": "page"}))
        .await;
    outcome.unwrap();
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 3. `--accept-streams known`.

/// `node`'s view of the peer with node key `key`, if it has one.
async fn peer_of(node: &RunningNode, key: &AuthorKey) -> Option<pb::PeerStatus> {
    let hex = key.to_hex();
    node_status(node)
        .await
        .peers
        .into_iter()
        .find(|peer| peer.node_id == hex)
}

/// Attack: a join of a stream whose owner the node does not know, pending before any peer is
/// connected, so the genesis arrives when the peer connects; then a join while connected. Must
/// hold: both are refused, nothing is stored, nothing stays pending, the peer is neither counted
/// nor cut off; allowing the owner does not make the stream appear by itself, and a join after
/// the allow succeeds and replicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_join_ends_clean_and_a_join_after_allow_succeeds() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = known_node(dir_b.path()).await;
    let user = client_key(160);
    let hlc = a.log.clock().now();
    let g = genesis(&user, None, None, hlc, 1);
    let stream = g.id;
    append_as_owner(&a, &g).await.unwrap();
    append_as_owner(&a, &scribe_of(&user, &stream, "x.note", hlc + 1, vec![]))
        .await
        .unwrap();
    let before = snapshot(&b).await;
    let status = join_within(&b, &stream, 1).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(pending(&b), vec![stream]);
    connect(&b, &a).await;
    wait_until(CONVERGE, "the pending join refused", || {
        let empty = pending(&b).is_empty();
        async move { empty }
    })
    .await;
    assert!(b.log.stream(&stream).is_none());
    assert_eq!(snapshot(&b).await, before, "nothing stored");
    // A join while connected: refused at once, saying what to run.
    let status = join_within(&b, &stream, 60_000).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("quire peer allow {}", key_of(&user))),
        "{}",
        status.message()
    );
    assert!(pending(&b).is_empty());
    assert_eq!(snapshot(&b).await, before, "nothing stored");
    let a_status = peer_of(&b, &a.log.node_key()).await.unwrap();
    assert!(a_status.connected, "the peer is not cut off");
    assert_eq!(refused_by(&b).await, 0, "the peer is not blamed");

    set_key(&b, &key_of(&user), true).await;
    assert!(b.log.stream(&stream).is_none() && pending(&b).is_empty());
    join(&b, &stream).await;
    wait_for_count(&[&b], &stream, 2).await;
    assert_eq!(refused_by(&b).await, 0);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Attack: joins of streams of unknown owners race `quire peer allow` of those owners, with the
/// peer that holds them connected. Must hold: each join ends either joined (the stream held) or
/// refused (`PERMISSION_DENIED`, nothing held, nothing pending) — never held after a refusal,
/// never left pending — and a join after the allow always succeeds; the peer is never blamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_racing_an_allow_end_joined_or_cleanly_refused() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = known_node(dir_b.path()).await;
    let hlc = a.log.clock().now();
    let users: Vec<SigningKey> = (0..8).map(|n| client_key(161 + n)).collect();
    let mut streams = Vec::new();
    for (n, user) in users.iter().enumerate() {
        let g = genesis(user, None, None, hlc + n as u64, 2);
        append_as_owner(&a, &g).await.unwrap();
        streams.push(g.id);
    }
    connect(&b, &a).await;
    wait_until(CONVERGE, "B connected to A", || async {
        peer_of(&b, &a.log.node_key())
            .await
            .is_some_and(|peer| peer.connected)
    })
    .await;
    let (mut joined, mut refused) = (0, 0);
    for (user, stream) in users.iter().zip(&streams) {
        let user = key_of(user);
        let (outcome, ()) = tokio::join!(join_within(&b, stream, 60_000), set_key(&b, &user, true));
        match outcome {
            Ok(()) => {
                joined += 1;
                assert!(b.log.stream(stream).is_some());
            }
            Err(status) => {
                assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
                refused += 1;
                assert!(b.log.stream(stream).is_none(), "held after a refusal");
                assert!(!pending(&b).contains(stream), "left pending");
                join_within(&b, stream, 60_000).await.unwrap();
            }
        }
        assert!(b.log.stream(stream).is_some());
    }
    assert_eq!(joined + refused, users.len());
    // A join answers once the stream is held; its pending mark goes right after.
    wait_until(CONVERGE, "no join pending", || {
        let empty = pending(&b).is_empty();
        async move { empty }
    })
    .await;
    assert_eq!(refused_by(&b).await, 0, "the peer is never blamed");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Attack: the owner is allowed when the join starts (pending, no peer yet) and denied before the
/// genesis arrives. Must hold: the deny wins — nothing held, nothing pending, the peer not
/// blamed — and allowing the owner again lets a new join through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_between_a_join_and_its_genesis_wins() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = known_node(dir_b.path()).await;
    let user = client_key(168);
    let hlc = a.log.clock().now();
    let g = genesis(&user, None, None, hlc, 3);
    append_as_owner(&a, &g).await.unwrap();
    set_key(&b, &key_of(&user), true).await;
    join_within(&b, &g.id, 1).await.unwrap_err();
    assert_eq!(pending(&b), vec![g.id]);
    set_key(&b, &key_of(&user), false).await;
    connect(&b, &a).await;
    wait_until(CONVERGE, "the pending join refused", || {
        let empty = pending(&b).is_empty();
        async move { empty }
    })
    .await;
    assert!(
        b.log.stream(&g.id).is_none(),
        "held after the owner was denied"
    );
    assert_eq!(refused_by(&b).await, 0);
    set_key(&b, &key_of(&user), true).await;
    join(&b, &g.id).await;
    assert!(b.log.stream(&g.id).is_some());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Attack: three joins of an unknown owner's stream run at once (a retrying client, the CLI and
/// a flock `join_app` together), with the peer that has it connected. Must hold: nothing is held
/// or left pending, and every one of them ends refused at once (`PERMISSION_DENIED`), as the
/// docs promise of a refused join; none waits out its timeout to answer "join pending"
/// (`DEADLINE_EXCEEDED`) for a join that is not pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_joins_of_an_unknown_owners_stream_are_all_refused_at_once() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = known_node(dir_b.path()).await;
    let other = client_key(169);
    let hlc = a.log.clock().now();
    let h = genesis(&other, None, None, hlc, 4);
    append_as_owner(&a, &h).await.unwrap();
    connect(&b, &a).await;
    wait_until(CONVERGE, "B connected to A", || async {
        peer_of(&b, &a.log.node_key())
            .await
            .is_some_and(|peer| peer.connected)
    })
    .await;
    let started = tokio::time::Instant::now();
    let (first, second, third) = tokio::join!(
        join_within(&b, &h.id, 15_000),
        join_within(&b, &h.id, 15_000),
        join_within(&b, &h.id, 15_000),
    );
    let codes: Vec<Code> = [first, second, third]
        .into_iter()
        .map(|outcome| outcome.unwrap_err().code())
        .collect();
    let took = started.elapsed();
    assert!(b.log.stream(&h.id).is_none());
    assert!(pending(&b).is_empty());
    assert_eq!(refused_by(&b).await, 0);
    assert_eq!(
        codes,
        vec![Code::PermissionDenied; 3],
        "answered after {took:?}"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Attack: the flock `POST /<tid>/join_app` (which does not wait for the genesis) of an unknown
/// owner's app on a node under `--accept-streams known`, with the peer that has it connected;
/// then the same call again once the genesis was refused. Must hold: the app is never held and
/// nothing stays pending; and once the node has refused it, `join_app` says so (an error naming
/// `quire peer allow`) instead of answering `"pending": true` for a join that is not pending and
/// will be refused again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flock_join_app_of_an_unknown_owners_app_says_it_was_refused() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = known_node(dir_b.path()).await;
    let user = client_key(174);
    let hlc = a.log.clock().now();
    let g = genesis(&user, None, None, hlc, 5);
    append_as_owner(&a, &g).await.unwrap();
    connect(&b, &a).await;
    wait_until(CONVERGE, "B connected to A", || async {
        peer_of(&b, &a.log.node_key())
            .await
            .is_some_and(|peer| peer.connected)
    })
    .await;
    let join_app = || async {
        let reply = reqwest::Client::new()
            .post(format!("{}/{}/join_app", b.url(), g.id.to_hex()))
            .bearer_auth(b.token.as_str())
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        let status = reply.status().as_u16();
        (status, reply.text().await.unwrap())
    };
    let first = join_app().await;
    wait_until(CONVERGE, "the genesis refused", || {
        let empty = pending(&b).is_empty();
        async move { empty }
    })
    .await;
    assert!(b.log.stream(&g.id).is_none());
    let second = join_app().await;
    wait_until(CONVERGE, "the genesis refused again", || {
        let empty = pending(&b).is_empty();
        async move { empty }
    })
    .await;
    assert!(b.log.stream(&g.id).is_none());
    assert_eq!(refused_by(&b).await, 0);
    assert!(
        second.0 == 403 && second.1.contains("quire peer allow"),
        "first join_app: {first:?}; after the refusal: {second:?}"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Attack: a peer sends geneses nobody asked for — of a stranger's stream, of a stream naming
/// the node itself as owner, of its own — and a batch of a stream the node does not hold, to a
/// node under `--accept-streams known` and to one under `any`; then it answers a pending join of
/// an unknown owner's stream. Must hold: nothing unasked is stored (under either setting), the
/// unasked batch ends the connection as a protocol error, and the answered join is refused
/// (`known`) without blaming the peer and without leaving it pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unasked_geneses_and_batches_from_a_peer_never_add_a_stream() {
    let (dir_b, dir_c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let b = known_node(dir_b.path()).await;
    let c = start_node(dir_c.path()).await;
    let stranger = client_key(170);
    for (n, node) in [&b, &c].into_iter().enumerate() {
        let peer_key = client_key(171 + n as u8);
        let hlc = node.log.clock().now();
        let mut intruder = Intruder::connect(node.peer_addr.unwrap(), peer_key.clone(), true).await;
        barrier(&mut intruder).await;
        let before = snapshot(node).await;
        let geneses = [
            genesis(&stranger, None, None, hlc, 30 + n as u8),
            genesis(
                &stranger,
                Some(node.log.node_key()),
                None,
                hlc,
                32 + n as u8,
            ),
            genesis(&peer_key, None, None, hlc, 34 + n as u8),
        ];
        for g in &geneses {
            intruder.send(genesis_message(&g.id, g)).await;
        }
        // One under another stream's id too.
        intruder
            .send(genesis_message(&StreamId::from([0x11; 32]), &geneses[0]))
            .await;
        barrier(&mut intruder).await;
        for g in &geneses {
            assert!(
                node.log.stream(&g.id).is_none(),
                "node {n}: unasked genesis stored"
            );
        }
        assert_eq!(snapshot(node).await, before, "node {n}");
        assert!(pending(node).is_empty());
        intruder
            .send(batch_of(
                &geneses[0].id,
                std::slice::from_ref(&geneses[0]),
                1,
            ))
            .await;
        let reason = intruder.error().await;
        assert!(reason.contains("not asked for"), "{reason}");
        assert!(node.log.stream(&geneses[0].id).is_none());
        assert_eq!(snapshot(node).await, before, "node {n}");
    }

    // A pending join on B, answered by the peer when it connects: refused, not blamed.
    let hlc = b.log.clock().now();
    let unknown = genesis(&stranger, None, None, hlc, 40);
    let stream = unknown.id;
    join_within(&b, &stream, 1).await.unwrap_err();
    assert_eq!(pending(&b), vec![stream]);
    let peer_key = client_key(173);
    let mut intruder = Intruder::connect(b.peer_addr.unwrap(), peer_key.clone(), true).await;
    loop {
        match intruder.next().await {
            Some(Wire::GenesisRequest(request)) if request.stream == bytes_of(&stream) => break,
            Some(_) => continue,
            None => panic!("the node closed the connection"),
        }
    }
    intruder.send(genesis_message(&stream, &unknown)).await;
    barrier(&mut intruder).await;
    assert!(b.log.stream(&stream).is_none());
    assert!(pending(&b).is_empty(), "the refused join ended");
    let status = peer_of(&b, &key_of(&peer_key)).await.unwrap();
    assert!(status.connected && status.refused == 0, "{status:?}");
    b.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// Attack: under `--accept-streams known`, genesis scribes dated two hours ahead are held (not
/// stored) while their owners are allowed; one owner is then denied, and the node's clock moves
/// on so both are due. A future-dated genesis of an owner never allowed is tried too. Must hold:
/// the never-allowed one is refused at once (not held); when the held ones enter the log they
/// are judged again — the denied owner's is refused, the allowed one's becomes a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_genesis_is_judged_again_when_its_time_comes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicU64::new(now_ms()));
    let mut config = NodeConfig::new(dir.path());
    config.accept_streams = AcceptStreams::Known;
    let wall = clock.clone();
    config.wall = Some(Arc::new(move || wall.load(Ordering::SeqCst)));
    let b = start_config(config, true).await;
    let (u1, u2, u3) = (client_key(175), client_key(176), client_key(177));
    set_key(&b, &key_of(&u1), true).await;
    set_key(&b, &key_of(&u2), true).await;
    let ahead = (clock.load(Ordering::SeqCst) + 2 * HOUR_MS) << 16;
    let (g1, g2, g3) = (
        genesis(&u1, None, None, ahead, 41),
        genesis(&u2, None, None, ahead, 42),
        genesis(&u3, None, None, ahead, 43),
    );
    assert!(append_as_owner(&b, &g1).await.unwrap().held);
    assert!(append_as_owner(&b, &g2).await.unwrap().held);
    assert_eq!(
        append_as_owner(&b, &g3).await.unwrap_err(),
        Code::PermissionDenied
    );
    assert_eq!(b.log.held().0, 2, "the unknown owner's genesis is not held");
    set_key(&b, &key_of(&u1), false).await;
    clock.fetch_add(3 * HOUR_MS, Ordering::SeqCst);
    wait_until(CONVERGE, "the allowed owner's genesis entered", || {
        let entered = b.log.stream(&g2.id).is_some();
        async move { entered }
    })
    .await;
    wait_until(CONVERGE, "nothing held any more", || {
        let held = b.log.held().0;
        async move { held == 0 }
    })
    .await;
    assert!(
        b.log.stream(&g1.id).is_none(),
        "a genesis held while its owner was allowed entered after the owner was denied"
    );
    assert!(b.log.stream(&g3.id).is_none());
    b.stop().await.unwrap();
}

/// Attack: under `--accept-streams known`, an unknown owner's genesis inside `AppendBatch` (with
/// the token): as a `signed` item with a scribe of the new stream after it, sealed together with
/// that scribe, and beside a node-signed append to a stream the node holds. Must hold: each batch
/// is refused whole (`PERMISSION_DENIED`), nothing of it is stored; once the owner is allowed
/// the same batches go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_genesis_inside_a_batch_needs_a_known_owner_too() {
    let dir = tempfile::tempdir().unwrap();
    let b = known_node(dir.path()).await;
    let mut owner = clients(&b.url()).await;
    let own = create_stream(&mut owner, "b's", None).await;
    let user = client_key(178);
    let hlc = b.log.clock().now();
    let g = genesis(&user, None, None, hlc, 50);
    let child = scribe_of(&user, &g.id, "x.note", hlc + 1, vec![g.id]);
    let signed = pb::AppendBatchRequest {
        appends: vec![],
        signed: vec![signed_request(g.parts()), signed_request(child.parts())],
        sealed: vec![],
    };
    let sealed_id = genesis_body(&user, None, None, None, hlc + 2, 51)
        .into_unsealed(0)
        .id;
    let together = seal_all(
        vec![
            genesis_body(&user, None, None, None, hlc + 2, 51).into_unsealed(0),
            body(
                &user,
                &sealed_id,
                "x.note".parse().unwrap(),
                "text/plain",
                Bytes::from_static(b"sealed with its genesis"),
                hlc + 3,
                vec![sealed_id],
            )
            .into_unsealed(0),
        ],
        &user,
    );
    let sealed = pb::AppendBatchRequest {
        appends: vec![],
        signed: vec![],
        sealed: vec![pb::SealedBatch {
            scribes: together
                .iter()
                .map(|scribe| pb::Unsealed {
                    envelope: scribe.envelope.clone(),
                    payload: scribe.body.payload.clone(),
                })
                .collect(),
            seal: together[0].seal.bytes.clone(),
        }],
    };
    let mixed = pb::AppendBatchRequest {
        appends: vec![pb::AppendRequest {
            stream: bytes_of(&own),
            kind: "x.note".into(),
            content_type: "text/plain".into(),
            payload: Bytes::from_static(b"beside an unknown genesis"),
            parents: vec![],
        }],
        signed: vec![signed_request(
            genesis(&user, None, None, hlc + 4, 52).parts(),
        )],
        sealed: vec![],
    };
    let before = snapshot(&b).await;
    for (what, request) in [
        ("signed", signed.clone()),
        ("sealed", sealed.clone()),
        ("mixed", mixed.clone()),
    ] {
        let status = owner.log.append_batch(request).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
        assert_eq!(snapshot(&b).await, before, "{what}: nothing stored");
    }
    set_key(&b, &key_of(&user), true).await;
    for request in [signed, sealed, mixed] {
        owner.log.append_batch(request).await.unwrap();
    }
    assert_eq!(held(&b, &g.id), 2);
    assert_eq!(held(&b, &sealed_id), 2);
    assert_eq!(held(&b, &own), 2);
    b.stop().await.unwrap();
}

/// Attack: a stranger signs a genesis whose `owner` field names a key the node knows (a key
/// allowed with `quire peer allow`, or the node's own key), with a policy that gives the stranger
/// `file.*` and `x.*`; a node under `--accept-streams any` holds it; the node under `known` joins
/// it. What `--accept-streams known` promises (README, docs/security.md) is that such a node
/// "takes a new stream only if the stream's owner is the node's own key or a key allowed"; the
/// check reads the owner *field*, which the genesis's signer writes freely, so the named owner
/// need never have seen the stream. Must hold: the join is refused (the stream's signer is not a
/// key the node knows); today it is taken, and the stranger's own writes land on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_cannot_get_a_stream_held_by_naming_a_known_owner() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = known_node(dir_b.path()).await;
    let known = client_key(190);
    set_key(&b, &key_of(&known), true).await;
    let stranger = client_key(191);
    let policy = pb::Policy {
        rules: vec![
            rule("file.*", keys(&[&stranger])),
            rule("x.*", keys(&[&stranger])),
        ],
        ..Default::default()
    };
    let hlc = a.log.clock().now();
    let naming_known = genesis(
        &stranger,
        Some(key_of(&known)),
        Some(policy.clone()),
        hlc,
        60,
    );
    let naming_b = genesis(&stranger, Some(b.log.node_key()), Some(policy), hlc, 61);
    append_as_owner(&a, &naming_known).await.unwrap();
    append_as_owner(&a, &naming_b).await.unwrap();
    connect(&b, &a).await;
    let mut taken = Vec::new();
    for (g, named) in [
        (&naming_known, "an allowed key"),
        (&naming_b, "the node's own key"),
    ] {
        match join_within(&b, &g.id, 60_000).await {
            Err(status) if status.code() == Code::PermissionDenied => {
                assert!(b.log.stream(&g.id).is_none());
            }
            Err(status) => panic!("{named}: {status:?}"),
            Ok(()) => {
                let file = scribe_of(&stranger, &g.id, "file.put", hlc + 1, vec![]);
                append_as_stranger(&a, &file).await.unwrap();
                wait_for_count(&[&b], &g.id, 2).await;
                taken.push(format!(
                    "a stream signed by the stranger {} naming {named} as owner was joined, and the stranger's own file.put in it was stored on the known-only node",
                    key_of(&stranger)
                ));
            }
        }
    }
    assert!(taken.is_empty(), "{taken:#?}");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 4. Rejoin: `Want.own_since_seq`.

/// Attack: B leaves a stream and joins it again three times while its connection to A stays up,
/// writing each round as the node and through a client; A writes too. Must hold: after every
/// rejoin B holds exactly A's scribes — its own earlier ones included — and neither side counts a
/// refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_and_rejoining_again_and_again_brings_back_every_own_scribe() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = start_node(dir_b.path()).await;
    let mut owner_a = clients(&a.url()).await;
    let mut owner_b = clients(&b.url()).await;
    let stream = create_stream(&mut owner_a, "s", None).await;
    connect(&b, &a).await;
    let client = client_key(200);
    let rounds = 3u64;
    for round in 0..rounds {
        join(&b, &stream).await;
        append_note(&mut owner_b, &stream, &format!("b {round}")).await;
        let hlc = b.log.clock().now();
        append_as_stranger(&b, &scribe_of(&client, &stream, "x.note", hlc, vec![]))
            .await
            .unwrap();
        append_note(&mut owner_a, &stream, &format!("a {round}")).await;
        let total = 1 + 3 * (round + 1);
        wait_for_count(&[&a, &b], &stream, total).await;
        assert_eq!(
            set(&stream_ids(&a, &stream).await),
            set(&stream_ids(&b, &stream).await),
            "round {round}"
        );
        leave(&b, &stream).await;
        assert!(b.log.stream(&stream).is_none());
    }
    join(&b, &stream).await;
    wait_for_count(&[&b], &stream, 1 + 3 * rounds).await;
    let ids_b = stream_ids(&b, &stream).await;
    assert_eq!(ids_b.len() as u64, 1 + 3 * rounds, "no duplicates");
    assert_eq!(set(&stream_ids(&a, &stream).await), set(&ids_b));
    let b_key = key_bytes(&b.log.node_key());
    let own = read_all(&mut owner_b)
        .await
        .into_iter()
        .filter(|entry| entry.stream == bytes_of(&stream) && entry.author == b_key)
        .count() as u64;
    assert_eq!(own, rounds, "B's own notes came back");
    assert_eq!(refused_by(&a).await + refused_by(&b).await, 0);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Attack: a hand-written peer that sent scribes to A asks for the stream with `own_since_seq`
/// 0, 2, `u64::MAX`, and with `after_seq` at and near `u64::MAX`. Must hold: 0 is the old
/// behaviour (what came from it is not sent back), 2 sends back exactly what it sent at its seqs
/// 1 and 2, `u64::MAX` sends everything (harmless duplicates), a cursor at the end sends nothing
/// and nothing overflows; A keeps working, serves an honest joiner everything, and blames no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_want_with_any_own_since_seq_only_ever_sends_more() {
    let (dir_a, dir_c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let c = start_node(dir_c.path()).await;
    let mut owner_a = clients(&a.url()).await;
    let stream = create_stream(&mut owner_a, "s", None).await;
    append_note(&mut owner_a, &stream, "a 1").await;
    append_note(&mut owner_a, &stream, "a 2").await;
    let peer_key = client_key(210);
    let mut intruder = Intruder::connect(a.peer_addr.unwrap(), peer_key.clone(), true).await;
    intruder.offer(&stream).await;
    let author = client_key(211);
    let hlc = a.log.clock().now();
    let sent: Vec<Scribe> = (0..3)
        .map(|n| scribe_of(&author, &stream, "x.note", hlc + n, vec![]))
        .collect();
    intruder.send(batch_of(&stream, &sent, 1)).await;
    intruder
        .send(Wire::CaughtUp(pb::PeerCaughtUp {
            stream: bytes_of(&stream),
            seq: 3,
        }))
        .await;
    wait_for_count(&[&a], &stream, 6).await;
    let all = set(&stream_ids(&a, &stream).await);
    let without = |skip: &[usize]| -> HashSet<Bytes> {
        let mut expected = all.clone();
        for index in skip {
            expected.remove(&bytes_of(&sent[*index].id));
        }
        expected
    };
    let got = want(&mut intruder, &stream, 0, 0).await;
    assert_eq!(set(&got), without(&[0, 1, 2]), "own_since_seq 0");
    let got = want(&mut intruder, &stream, 0, 2).await;
    assert_eq!(set(&got), without(&[2]), "own_since_seq 2");
    let got = want(&mut intruder, &stream, 0, u64::MAX).await;
    assert_eq!(set(&got), all, "own_since_seq u64::MAX");
    assert_eq!(got.len(), all.len(), "each once");
    for after in [u64::MAX, u64::MAX - 1] {
        for since in [0, u64::MAX] {
            let got = want(&mut intruder, &stream, after, since).await;
            assert!(got.is_empty(), "after {after}, since {since}: {got:?}");
        }
    }
    // A is fine: it appends, serves an honest joiner everything, and blames no one.
    append_note(&mut owner_a, &stream, "a 3").await;
    connect(&c, &a).await;
    join(&c, &stream).await;
    wait_for_count(&[&c], &stream, 7).await;
    assert_eq!(
        set(&stream_ids(&c, &stream).await),
        set(&stream_ids(&a, &stream).await)
    );
    let status = peer_of(&a, &key_of(&peer_key)).await.unwrap();
    assert!(status.connected && status.refused == 0, "{status:?}");
    a.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// Attack: in a chain A–B–C (A and C meet only through B) the middle node leaves, both ends
/// write while it is away, and B joins again (twice, the second time at once). Must hold: all
/// three end with the same scribes, B with its own earlier ones, and nobody counts a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_middle_of_a_chain_leaves_and_rejoins_and_all_three_converge() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let c = start_node(dirs[2].path()).await;
    connect(&b, &a).await;
    connect(&c, &b).await;
    let mut owner_a = clients(&a.url()).await;
    let mut owner_b = clients(&b.url()).await;
    let mut owner_c = clients(&c.url()).await;
    let stream = create_stream(&mut owner_a, "chain", None).await;
    join(&b, &stream).await;
    join(&c, &stream).await;
    for (owner, name) in [
        (&mut owner_a, "a"),
        (&mut owner_b, "b"),
        (&mut owner_c, "c"),
    ] {
        for n in 0..2 {
            append_note(owner, &stream, &format!("{name} {n}")).await;
        }
    }
    wait_for_count(&[&a, &b, &c], &stream, 7).await;
    leave(&b, &stream).await;
    append_note(&mut owner_a, &stream, "a while b is away").await;
    append_note(&mut owner_c, &stream, "c while b is away").await;
    join(&b, &stream).await;
    append_note(&mut owner_b, &stream, "b back").await;
    wait_for_count(&[&a, &b, &c], &stream, 10).await;
    let ids = set(&stream_ids(&a, &stream).await);
    assert_eq!(ids.len(), 10);
    assert_eq!(set(&stream_ids(&b, &stream).await), ids);
    assert_eq!(set(&stream_ids(&c, &stream).await), ids);
    leave(&b, &stream).await;
    join(&b, &stream).await;
    wait_for_count(&[&b], &stream, 10).await;
    append_note(&mut owner_c, &stream, "c last").await;
    wait_for_count(&[&a, &b, &c], &stream, 11).await;
    let ids = set(&stream_ids(&a, &stream).await);
    for node in [&b, &c] {
        assert_eq!(set(&stream_ids(node, &stream).await), ids);
    }
    let b_key = key_bytes(&b.log.node_key());
    let own = read_all(&mut owner_b)
        .await
        .into_iter()
        .filter(|entry| entry.stream == bytes_of(&stream) && entry.author == b_key)
        .count();
    assert_eq!(own, 3, "B's own notes, the ones from before its leaves too");
    let refused = refused_by(&a).await + refused_by(&b).await + refused_by(&c).await;
    assert_eq!(refused, 0);
    for node in [a, b, c] {
        node.stop().await.unwrap();
    }
}
