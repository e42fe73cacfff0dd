//! Private streams and membership (issue 15): a private stream is announced, sent and answered
//! only to keys holding a role in it — peers by their proven node key, clients as the owner or
//! the stream's own app; membership changes by admin-signed `acl.grant` / `acl.revoke` scribes;
//! writers are judged against the membership their author had seen.

use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use quire::membership::Role;
use quire::node::RunningNode;
use quire::pb;
use quire::pb::peer_message::Message as Wire;
use quire::projection_api::{AuthorKey, StreamId};

use crate::attack_acl::{contains, excluded, key_bytes, private_stream, set_role};
use crate::common::*;
use crate::malicious::Intruder;
use crate::replication::{connect, wait_for_count};

const SECRET: &str = "the-private-payload-nobody-else-may-see";

/// Everything a hand-written peer with a fresh key learns from `node` in `within`: the streams
/// announced and the bytes of every message.
async fn what_a_stranger_learns(
    node: &RunningNode,
    stream: &StreamId,
    seed: u8,
) -> (Vec<Bytes>, Vec<u8>) {
    let mut intruder = Intruder::connect(node.peer_addr.unwrap(), client_key(seed), true).await;
    let mut announced = Vec::new();
    let mut bytes = Vec::new();
    // It asks for the stream it should not know, and for its genesis.
    intruder
        .send(Wire::Want(pb::PeerWant {
            stream: bytes_of(stream),
            after_seq: 0,
            ..Default::default()
        }))
        .await;
    intruder
        .send(Wire::GenesisRequest(pb::PeerGenesisRequest {
            stream: bytes_of(stream),
        }))
        .await;
    let mut genesis_answered = false;
    while let Some(message) = intruder.next_within(Duration::from_secs(2)).await {
        bytes.extend(
            pb::PeerMessage {
                message: Some(message.clone()),
            }
            .encode_to_vec(),
        );
        match message {
            Wire::Streams(streams) => announced.extend(streams.streams),
            Wire::Genesis(genesis) => {
                assert_eq!(genesis.stream, bytes_of(stream));
                assert!(
                    genesis.scribe.is_none(),
                    "the genesis was served to a stranger"
                );
                genesis_answered = true;
            }
            Wire::Batch(batch) => panic!("a batch of {:?} was sent to a stranger", batch.stream),
            _ => {}
        }
    }
    assert!(genesis_answered, "the genesis request was answered");
    (announced, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_stream_reaches_its_members_only_and_follows_grants_and_revokes() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let c = start_node(dirs[2].path()).await;
    let stream = private_stream(&a, &[(b.log.node_key(), Role::Reader)]).await;
    let mut clients_a = clients(&a.url()).await;
    let public = create_stream(&mut clients_a, "public", None).await;
    for _ in 0..3 {
        append_note(&mut clients_a, &stream, SECRET).await;
    }
    // B (a reader) joins through A; C dials both.
    connect(&b, &a).await;
    connect(&c, &a).await;
    connect(&c, &b).await;
    crate::replication::join(&b, &stream).await;
    wait_for_count(&[&b], &stream, 4).await;
    let join_c = clients(&c.url())
        .await
        .streams
        .join(pb::JoinStreamRequest {
            stream: bytes_of(&stream),
            timeout_ms: 2_000,
        })
        .await;
    assert_eq!(
        join_c.unwrap_err().code(),
        tonic::Code::DeadlineExceeded,
        "no member serves C the genesis"
    );
    crate::replication::join(&c, &public).await;
    assert_eq!(held(&c, &stream), 0);

    // A hand-written peer with a fresh key hears of the public stream, not of the private one,
    // is refused its genesis and scribes, and receives no byte of its payloads — from A and B.
    for node in [&a, &b] {
        let (announced, bytes) = what_a_stranger_learns(node, &stream, 91).await;
        if node.url() == a.url() {
            assert!(
                announced.contains(&bytes_of(&public)),
                "the public stream is announced"
            );
        }
        assert!(
            !announced.contains(&bytes_of(&stream)),
            "the private stream was announced"
        );
        assert!(!contains(&bytes, SECRET.as_bytes()));
    }

    // The client API serves it to the owner alone: a stranger is told it is not here.
    let stranger = stranger_channel(&a.url()).await;
    let status = pb::streams_client::StreamsClient::new(stranger.clone())
        .get(pb::GetStreamRequest {
            stream: bytes_of(&stream),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    let listed = pb::streams_client::StreamsClient::new(stranger.clone())
        .list(pb::ListStreamsRequest {})
        .await
        .unwrap()
        .into_inner()
        .streams;
    assert!(listed.iter().all(|info| info.stream != bytes_of(&stream)));
    assert!(listed.iter().any(|info| info.stream == bytes_of(&public)));
    let mut read = pb::log_client::LogClient::new(stranger.clone())
        .read(pb::ReadRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut seen = 0;
    while let Some(entry) = futures::StreamExt::next(&mut read).await {
        let entry = entry.unwrap();
        assert_ne!(
            entry.stream,
            bytes_of(&stream),
            "a whole-log read showed a private scribe"
        );
        assert!(!contains(&entry.payload, SECRET.as_bytes()));
        seen += 1;
    }
    assert!(seen >= 1, "the public stream's genesis is read");
    for status in [
        pb::sql_client::SqlClient::new(stranger.clone())
            .query(pb::SqlQueryRequest {
                stream: bytes_of(&stream),
                sql: "SELECT 1".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        pb::kv_client::KvClient::new(stranger.clone())
            .scan(pb::KvScanRequest {
                stream: bytes_of(&stream),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        pb::files_client::FilesClient::new(stranger.clone())
            .list(pb::FilesListRequest {
                stream: bytes_of(&stream),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        pb::log_client::LogClient::new(stranger)
            .read(pb::ReadRequest {
                stream: bytes_of(&stream),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    }
    let owner_view = clients_a
        .streams
        .get(pb::GetStreamRequest {
            stream: bytes_of(&stream),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(owner_view.members.len(), 2, "{owner_view:?}");

    // A grants C: C joins and catches up.
    set_role(&a, &stream, &c.log.node_key(), Some(Role::Reader)).await;
    crate::replication::join(&c, &stream).await;
    wait_for_count(&[&c, &b], &stream, 5).await;

    // A revokes C: what A writes after the revoke reaches B, never C.
    set_role(&a, &stream, &c.log.node_key(), None).await;
    wait_for_count(&[&b], &stream, 6).await;
    append_note(&mut clients_a, &stream, "after the revoke").await;
    wait_for_count(&[&b], &stream, 7).await;
    // B relays nothing to C either: both judge C by the same membership. C stays where the revoke
    // found it (it may have received the revoke itself, which is sent before the cut).
    let c_held = held(&c, &stream);
    assert!(c_held <= 6, "C received {c_held} scribes");
    append_note(&mut clients_a, &stream, "later still").await;
    wait_for_count(&[&b], &stream, 8).await;
    let entries = read_all(&mut clients(&c.url()).await).await;
    assert!(
        entries
            .iter()
            .all(|entry| !contains(&entry.payload, b"after the revoke")
                && !contains(&entry.payload, b"later still")),
        "C received a scribe written after its revoke"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_writers_write_a_private_stream_at_the_api_and_over_replication() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let writer = client_key(31);
    let reader = client_key(32);
    let writer_key = AuthorKey(writer.verifying_key().to_bytes());
    let reader_key = AuthorKey(reader.verifying_key().to_bytes());
    let stream = private_stream(
        &a,
        &[
            (writer_key, Role::Writer),
            (reader_key, Role::Reader),
            (b.log.node_key(), Role::Reader),
            // A peer that may receive the stream (so A asks it for the stream) but relays a
            // scribe of a key that may not write it.
            (
                AuthorKey(client_key(34).verifying_key().to_bytes()),
                Role::Reader,
            ),
        ],
    )
    .await;
    let mut clients_a = clients(&a.url()).await;
    let hlc = a.log.clock().now();
    // The writer's own scribe is taken.
    let scribe = client_scribe(&writer, &stream, "x.note", b"by the writer", hlc + 1);
    clients_a
        .log
        .append_signed(signed_request(scribe.parts()))
        .await
        .expect("a writer writes");
    // A reader's and a stranger's are refused, with who may.
    for (key, name) in [(&reader, "reader"), (&client_key(33), "stranger")] {
        let scribe = client_scribe(key, &stream, "x.note", b"not a writer", hlc + 2);
        let status = clients_a
            .log
            .append_signed(signed_request(scribe.parts()))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{name}: {status:?}"
        );
        assert!(status.message().contains("writers"), "{name}: {status:?}");
    }
    // A writer may not grant.
    let grant = quire::scribe::Scribe::sign(
        quire::scribe::Body {
            stream: Some(stream),
            author: writer_key,
            hlc: hlc + 3,
            kind: quire::projection_api::Kind::AclGrant,
            content_type: quire::membership::ACL_CONTENT_TYPE.into(),
            payload: pb::AclGrant {
                key: key_bytes(&reader_key),
                role: Role::Admin.to_proto(),
            }
            .encode_to_vec()
            .into(),
            parents: vec![],
            membership: None,
            nonce: 0,
        },
        &writer,
    );
    let status = clients_a
        .log
        .append_signed(signed_request(grant.parts()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("not an admin"), "{status:?}");
    assert_eq!(held(&a, &stream), 2);

    // Over replication: a peer sending the reader's scribe has it refused and counted.
    let mut intruder = Intruder::connect(a.peer_addr.unwrap(), client_key(34), true).await;
    intruder.offer(&stream).await;
    let refused = client_scribe(&reader, &stream, "x.note", b"relayed by a peer", hlc + 4);
    intruder.send(batch_of(&stream, &[refused], 1)).await;
    crate::malicious::wait_for_peer(&a, &client_key(34), |peer| peer.refused == 1).await;
    assert_eq!(held(&a, &stream), 2);

    // B, a reader, receives the writer's scribe and not the refused ones.
    connect(&b, &a).await;
    crate::replication::join(&b, &stream).await;
    wait_for_count(&[&b], &stream, 2).await;
}

/// A `file.put` of `path` signed by `key` at `hlc`.
fn file_put(
    key: &ed25519_dalek::SigningKey,
    stream: &StreamId,
    path: &str,
    hlc: u64,
    membership: Option<quire::projection_api::ScribeId>,
) -> quire::scribe::Scribe {
    let payload = pb::FilePut {
        path: path.into(),
        content_type: "text/plain".into(),
        data: Bytes::from(format!("written to {path}")),
    }
    .encode_to_vec();
    quire::scribe::Scribe::sign(
        quire::scribe::Body {
            stream: Some(*stream),
            author: AuthorKey(key.verifying_key().to_bytes()),
            hlc,
            kind: quire::projection_api::Kind::FilePut,
            content_type: quire::projection_api::files::CONTENT_TYPE.into(),
            payload: Bytes::from(payload),
            parents: vec![],
            membership,
            nonce: 0,
        },
        key,
    )
}

async fn paths(node: &RunningNode, stream: &StreamId) -> Vec<String> {
    pb::files_client::FilesClient::new(owner_channel(&node.url()).await)
        .list(pb::FilesListRequest {
            stream: bytes_of(stream),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .files
        .into_iter()
        .map(|file| file.path)
        .collect()
}

async fn digest(node: &RunningNode, stream: &StreamId) -> Bytes {
    pb::projections_client::ProjectionsClient::new(owner_channel(&node.url()).await)
        .digest(pb::DigestRequest {
            name: "files".into(),
            stream: bytes_of(stream),
        })
        .await
        .unwrap()
        .into_inner()
        .digest
}

/// A writer revoked on A while it keeps writing on B (partitioned from A): once they meet, both
/// hold every scribe, both leave out the writes dated after the revoke it had not seen (B's
/// projections are rebuilt without them), list the same excluded scribes and show the same
/// digests; what the writer wrote before the revoke stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_concurrent_with_their_authors_revoke_are_excluded_on_every_node() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let writer = client_key(41);
    let writer_key = AuthorKey(writer.verifying_key().to_bytes());
    let info = clients(&a.url())
        .await
        .streams
        .create(pb::CreateStreamRequest {
            name: "site".into(),
            policy: Some(pb::Policy {
                rules: vec![pb::KindRule {
                    kind: "file.put".into(),
                    authors: Some(pb::Authors {
                        owner: true,
                        writers: true,
                        ..Default::default()
                    }),
                }],
                ..Default::default()
            }),
            owner: Bytes::new(),
            retention: None,
            access: Some(pb::Access {
                private: true,
                members: vec![
                    pb::Member {
                        key: key_bytes(&writer_key),
                        role: Role::Writer.to_proto(),
                    },
                    pb::Member {
                        key: key_bytes(&b.log.node_key()),
                        role: Role::Reader.to_proto(),
                    },
                ],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let stream = StreamId::from_slice(&info.stream).unwrap();
    let put_seeing = |node: &RunningNode,
                      path: &str,
                      hlc: u64,
                      view: Option<quire::projection_api::ScribeId>| {
        let scribe = file_put(&writer, &stream, path, hlc, view);
        let url = node.url();
        async move {
            clients(&url)
                .await
                .log
                .append_signed(signed_request(scribe.parts()))
                .await
        }
    };
    let put = |node: &RunningNode, path: &str, hlc: u64| put_seeing(node, path, hlc, None);
    put(&a, "before.txt", a.log.clock().now()).await.unwrap();
    connect(&b, &a).await;
    crate::replication::join(&b, &stream).await;
    wait_for_count(&[&b], &stream, 2).await;

    // Partition: B forgets A.
    crate::replication::part(&b, &a).await;
    set_role(&a, &stream, &writer_key, None).await;
    let revoke_hlc = a.log.clock().now();
    // On B the writer is still a writer: it writes on, after the revoke it has not seen.
    put(&b, "during.txt", revoke_hlc + 1).await.unwrap();
    wait_until(Duration::from_secs(30), "B shows the write", || async {
        paths(&b, &stream).await.contains(&"during.txt".to_string())
    })
    .await;
    // On A, having seen its revoke (its view names it), the writer is refused.
    let heads = clients(&a.url())
        .await
        .streams
        .get(pb::GetStreamRequest {
            stream: bytes_of(&stream),
        })
        .await
        .unwrap()
        .into_inner()
        .membership_heads;
    assert_eq!(heads.len(), 1);
    let revoke = quire::projection_api::ScribeId::from_slice(&heads[0]).unwrap();
    let status = put_seeing(&a, "after.txt", a.log.clock().now(), Some(revoke))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // Claiming not to have seen it, it is taken — and excluded: dated after a revoke it had not
    // seen.
    put(&a, "claims-not-to-know.txt", a.log.clock().now())
        .await
        .unwrap();

    // They meet again.
    connect(&b, &a).await;
    wait_for_count(&[&a, &b], &stream, 5).await;
    for node in [&a, &b] {
        wait_until(
            Duration::from_secs(60),
            "the excluded write leaves the files",
            || async { paths(node, &stream).await == vec!["before.txt".to_string()] },
        )
        .await;
    }
    // In each node's local order: the same set.
    let (mut excluded_a, mut excluded_b) =
        (excluded(&a, &stream).await, excluded(&b, &stream).await);
    excluded_a.sort();
    excluded_b.sort();
    assert_eq!(excluded_a.len(), 2);
    assert_eq!(excluded_a, excluded_b);
    wait_until(Duration::from_secs(60), "equal digests", || async {
        digest(&a, &stream).await == digest(&b, &stream).await
    })
    .await;
    // The excluded scribe stays in the log on both nodes.
    for node in [&a, &b] {
        assert_eq!(held(node, &stream), 5);
    }
}
