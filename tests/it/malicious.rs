//! A malicious peer — a test client speaking the peer protocol with its own key — sends forged,
//! tampered, wrongly hashed and policy-breaking scribes: all are refused and counted, none is
//! stored, none is relayed to a third node. A peer that cannot prove its key is turned away.

use bytes::Bytes;
use ed25519_dalek::{Signer, SigningKey};
use futures::StreamExt;
use quire::pb;
use quire::pb::peer_message::Message as Wire;
use quire::projection_api::{AuthorKey, ScribeId, StreamId};
use quire::replication::session::PROOF_PREFIX;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::common::*;
use crate::replication::{connect, join, stream_ids, wait_for_count};

struct Intruder {
    key: SigningKey,
    outgoing: mpsc::Sender<pb::PeerMessage>,
    incoming: tonic::Streaming<pb::PeerMessage>,
}

impl Intruder {
    /// Dials `addr` and says hello; `honest` decides whether the proof is right.
    async fn connect(addr: std::net::SocketAddr, key: SigningKey, honest: bool) -> Intruder {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = pb::peer_client::PeerClient::new(channel);
        let (outgoing, receiver) = mpsc::channel(16);
        let incoming = client
            .replicate(ReceiverStream::new(receiver))
            .await
            .unwrap()
            .into_inner();
        let mut intruder = Intruder {
            key,
            outgoing,
            incoming,
        };
        let nonce = [9u8; 32];
        intruder
            .send(Wire::Hello(pb::PeerHello {
                node_id: Bytes::copy_from_slice(&intruder.key.verifying_key().to_bytes()),
                epoch: Bytes::from(vec![1u8; 16]),
                nonce: Bytes::copy_from_slice(&nonce),
                protocol: 1,
            }))
            .await;
        let Some(Wire::Hello(hello)) = intruder.next().await else {
            panic!("expected Hello")
        };
        let mut message = PROOF_PREFIX.to_vec();
        message.extend_from_slice(&hello.nonce);
        message.extend_from_slice(&intruder.key.verifying_key().to_bytes());
        message.extend_from_slice(&hello.node_id);
        if !honest {
            message[PROOF_PREFIX.len()] ^= 1;
        }
        let signature = intruder.key.sign(&message);
        intruder
            .send(Wire::Proof(pb::PeerProof {
                signature: Bytes::copy_from_slice(&signature.to_bytes()),
            }))
            .await;
        intruder
    }

    async fn send(&self, message: Wire) {
        let _ = self
            .outgoing
            .send(pb::PeerMessage {
                message: Some(message),
            })
            .await;
    }

    async fn next(&mut self) -> Option<Wire> {
        match tokio::time::timeout(std::time::Duration::from_secs(30), self.incoming.next())
            .await
            .expect("the node answers")
        {
            Some(Ok(message)) => message.message,
            _ => None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_scribes_from_a_peer_are_refused_counted_and_never_relayed() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let node = start_node(dirs[0].path()).await;
    let third = start_node(dirs[1].path()).await;
    let mut clients_node = clients(&node.url()).await;
    let key = client_key(66);
    // The intruder may delete files: its file.delete breaks a payload rule, not the policy.
    let policy = pb::Policy {
        rules: vec![pb::KindRule {
            kind: "file.delete".into(),
            authors: Some(pb::Authors {
                keys: vec![Bytes::copy_from_slice(&key.verifying_key().to_bytes())],
                ..Default::default()
            }),
        }],
        ..Default::default()
    };
    let stream = create_stream(&mut clients_node, "target", Some(policy)).await;
    append_note(&mut clients_node, &stream, "honest").await;
    connect(&third, &node).await;
    join(&third, &stream).await;
    wait_for_count(&[&third], &stream, 2).await;
    let other_stream = create_stream(&mut clients_node, "other", None).await;
    let before_node = stream_ids(&node, &stream).await;

    let mut intruder = Intruder::connect(node.peer_addr.unwrap(), key.clone(), true).await;
    intruder
        .send(Wire::Streams(pb::PeerStreams {
            streams: vec![bytes_of(&stream)],
        }))
        .await;
    // Wait for the node to ask for the stream.
    loop {
        match intruder.next().await {
            Some(Wire::Want(want)) if want.stream == bytes_of(&stream) => break,
            Some(_) => continue,
            None => panic!("the node closed the connection"),
        }
    }
    let hlc = node.log.clock().now();
    let good = client_scribe(&key, &stream, "x.note", b"looks fine", hlc);
    let mut forged = good.bytes.to_vec();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let mut tampered = client_scribe(&key, &stream, "x.note", b"tampered payload", hlc)
        .bytes
        .to_vec();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x20;
    let policy_breaking = client_scribe(&key, &stream, "file.put", b"<script>", hlc);
    // Allowed kinds, but payloads every node refuses: a path outside the tree, an upvote of
    // nothing.
    let (_, escaping) = quire::projection_api::files::FileChange::Delete {
        path: "../outside".into(),
    }
    .encode();
    let bad_path = client_scribe(&key, &stream, "file.delete", &escaping, hlc);
    let orphan_upvote = client_scribe(&key, &stream, "record.upvote", b"", hlc);
    let wire = |seq: u64, bytes: Vec<u8>, id: ScribeId| pb::PeerScribe {
        seq,
        scribe: Bytes::from(bytes),
        id: Bytes::copy_from_slice(id.as_bytes()),
    };
    // Well signed, but of another stream the node holds, and a genesis of a stream of its own:
    // neither belongs in a batch of `stream` (no unasked-for joins through a batch).
    let elsewhere = client_scribe(&key, &other_stream, "x.note", b"wrong stream", hlc);
    let foreign_genesis = quire::scribe::Scribe::sign(
        quire::scribe::Body {
            stream: None,
            author: AuthorKey(key.verifying_key().to_bytes()),
            hlc,
            kind: quire::projection_api::Kind::StreamCreate,
            content_type: String::new(),
            payload: Bytes::new(),
            parents: vec![],
            nonce: 0,
        },
        &key,
    );
    let scribes = vec![
        wire(1, forged.clone(), quire::scribe::hash(&forged)),
        wire(2, tampered.clone(), quire::scribe::hash(&tampered)),
        wire(3, policy_breaking.bytes.to_vec(), policy_breaking.id),
        wire(4, good.bytes.to_vec(), ScribeId([7; 32])), // bad hash: claims another id
        wire(5, elsewhere.bytes.to_vec(), elsewhere.id),
        wire(6, foreign_genesis.bytes.to_vec(), foreign_genesis.id),
        wire(7, bad_path.bytes.to_vec(), bad_path.id),
        wire(8, orphan_upvote.bytes.to_vec(), orphan_upvote.id),
    ];
    let streams_before = node.log.stream_ids().len();
    intruder
        .send(Wire::Batch(pb::PeerBatch {
            stream: bytes_of(&stream),
            scribes,
            through_seq: 8,
            head_seq: 8,
        }))
        .await;
    intruder
        .send(Wire::CaughtUp(pb::PeerCaughtUp {
            stream: bytes_of(&stream),
            seq: 4,
        }))
        .await;

    let intruder_id = AuthorKey(key.verifying_key().to_bytes()).to_hex();
    let mut admin = clients(&node.url()).await.admin;
    wait_until(
        std::time::Duration::from_secs(30),
        "the node to count 8 refused scribes",
        || {
            let mut admin = admin.clone();
            let intruder_id = intruder_id.clone();
            async move {
                let status = admin
                    .status(pb::StatusRequest {})
                    .await
                    .unwrap()
                    .into_inner();
                status
                    .peers
                    .iter()
                    .any(|peer| peer.node_id == intruder_id && peer.refused == 8)
            }
        },
    )
    .await;
    let status = admin
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let peer = status
        .peers
        .iter()
        .find(|peer| peer.node_id == intruder_id)
        .unwrap();
    assert_eq!(peer.streams[0].refused, 8);
    assert_eq!(
        node.log.stream_ids().len(),
        streams_before,
        "no stream appeared"
    );
    assert!(node.log.stream(&foreign_genesis.id).is_none());
    assert_eq!(peer.streams[0].received, 0);
    // Nothing stored on the node, nothing relayed to the third node.
    assert_eq!(stream_ids(&node, &stream).await, before_node);
    append_note(&mut clients_node, &stream, "marker").await;
    wait_for_count(&[&third], &stream, 3).await;
    assert_eq!(
        stream_ids(&third, &stream).await,
        stream_ids(&node, &stream).await
    );
    node.stop().await.unwrap();
    third.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_cannot_prove_its_key_is_turned_away_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut intruder = Intruder::connect(node.peer_addr.unwrap(), client_key(67), false).await;
    let mut error = None;
    while let Some(message) = intruder.next().await {
        if let Wire::Error(reason) = message {
            error = Some(reason.message);
            break;
        }
    }
    let error = error.expect("an error message before the stream closes");
    assert!(error.contains("failed to prove"), "{error}");
    // The peer listener serves replication and nothing else.
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", node.peer_addr.unwrap()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let status = pb::log_client::LogClient::new(channel.clone())
        .append(pb::AppendRequest {
            stream: Bytes::from(vec![1u8; 32]),
            kind: "x.a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    let query = pb::sql_client::SqlClient::new(channel.clone())
        .query(pb::SqlQueryRequest {
            stream: Bytes::from(vec![1u8; 32]),
            sql: "SELECT 1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(query.code(), tonic::Code::Unimplemented);
    let files = pb::files_client::FilesClient::new(channel)
        .list(pb::FilesListRequest::default())
        .await
        .unwrap_err();
    assert_eq!(files.code(), tonic::Code::Unimplemented);
    // Nor the HTTP API.
    let http = reqwest::Client::new()
        .post(format!("http://{}/create_app", node.peer_addr.unwrap()))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await;
    assert!(
        !matches!(&http, Ok(reply) if reply.status().is_success()),
        "the peer listener answered HTTP: {http:?}"
    );
    let _ = StreamId::default();
    node.stop().await.unwrap();
}
