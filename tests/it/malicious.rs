//! A malicious peer — a test client speaking the peer protocol with its own key — sends forged,
//! tampered, wrongly hashed and policy-breaking scribes: all are refused and counted, none is
//! stored, none is relayed to a third node. A peer that cannot prove its key is turned away.

use bytes::Bytes;
use ed25519_dalek::{Signer, SigningKey};
use futures::StreamExt;
use quire::pb;
use quire::pb::peer_message::Message as Wire;
use quire::projection_api::{AuthorKey, ScribeId, StreamId};
use quire::replication::session::proof_message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::common::*;
use crate::replication::{connect, join, stream_ids, wait_for_count};

pub(crate) struct Intruder {
    key: SigningKey,
    binding: quire::net::ChannelBinding,
    outgoing: mpsc::Sender<pb::PeerMessage>,
    incoming: tonic::Streaming<pb::PeerMessage>,
}

impl Intruder {
    /// Dials `addr` and says hello; `honest` decides whether the proof is right.
    pub(crate) async fn connect(
        addr: std::net::SocketAddr,
        key: SigningKey,
        honest: bool,
    ) -> Intruder {
        let hello = pb::PeerHello {
            node_id: Bytes::copy_from_slice(&key.verifying_key().to_bytes()),
            epoch: Bytes::from(vec![1u8; 16]),
            nonce: Bytes::copy_from_slice(&[9u8; 32]),
            protocol: quire::replication::session::PROTOCOL_VERSION,
            ended_epochs: vec![],
            rules: quire::log::rules::RULES_VERSION,
        };
        let mut intruder = Intruder::dial(addr, key).await;
        intruder.send(Wire::Hello(hello)).await;
        intruder.prove(honest).await;
        intruder
    }

    /// Dials `addr` and says nothing yet.
    pub(crate) async fn dial(addr: std::net::SocketAddr, key: SigningKey) -> Intruder {
        let tls = quire::net::PeerTls::generate().unwrap();
        let (channel, binding) =
            quire::replication::connection::peer_channel(Some(&tls), &addr.to_string())
                .await
                .unwrap();
        let mut client = pb::peer_client::PeerClient::new(channel);
        let (outgoing, receiver) = mpsc::channel(16);
        let incoming = client
            .replicate(ReceiverStream::new(receiver))
            .await
            .unwrap()
            .into_inner();
        Intruder {
            key,
            binding,
            outgoing,
            incoming,
        }
    }

    /// Answers the node's Hello with a proof of this key (`honest`) or a wrong one.
    pub(crate) async fn prove(&mut self, honest: bool) {
        let intruder = self;
        let Some(Wire::Hello(hello)) = intruder.next().await else {
            panic!("expected Hello")
        };
        let mut message = proof_message(
            hello.nonce[..].try_into().unwrap(),
            &AuthorKey(intruder.key.verifying_key().to_bytes()),
            &AuthorKey(hello.node_id[..].try_into().unwrap()),
            &intruder.binding.0,
        );
        if !honest {
            *message.last_mut().unwrap() ^= 1;
        }
        let signature = intruder.key.sign(&message);
        intruder
            .send(Wire::Proof(pb::PeerProof {
                signature: Bytes::copy_from_slice(&signature.to_bytes()),
            }))
            .await;
    }

    /// Says it holds `stream` and waits until the node asks for it.
    pub(crate) async fn offer(&mut self, stream: &StreamId) {
        self.send(Wire::Streams(pb::PeerStreams {
            streams: vec![bytes_of(stream)],
        }))
        .await;
        loop {
            match self.next().await {
                Some(Wire::Want(want)) if want.stream == bytes_of(stream) => return,
                Some(_) => continue,
                None => panic!("the node closed the connection"),
            }
        }
    }

    /// The reason of the node's `Error` message before it closes the stream.
    pub(crate) async fn error(&mut self) -> String {
        while let Some(message) = self.next().await {
            if let Wire::Error(reason) = message {
                return reason.message;
            }
        }
        panic!("the node closed the stream without an error message")
    }

    pub(crate) async fn send(&self, message: Wire) {
        let _ = self
            .outgoing
            .send(pb::PeerMessage {
                message: Some(message),
            })
            .await;
    }

    /// The node's next message within `within`: `None` if nothing came (or the call ended).
    pub(crate) async fn next_within(&mut self, within: std::time::Duration) -> Option<Wire> {
        match tokio::time::timeout(within, self.incoming.next()).await {
            Ok(Some(Ok(message))) => message.message,
            _ => None,
        }
    }

    pub(crate) async fn next(&mut self) -> Option<Wire> {
        match tokio::time::timeout(std::time::Duration::from_secs(30), self.incoming.next())
            .await
            .expect("the node answers")
        {
            Some(Ok(message)) => message.message,
            _ => None,
        }
    }
}

/// Waits until `node` reports a peer with `key` for which `condition` holds; that peer's status.
pub(crate) async fn wait_for_peer(
    node: &quire::node::RunningNode,
    key: &SigningKey,
    condition: impl Fn(&pb::PeerStatus) -> bool,
) -> pb::PeerStatus {
    let node_id = AuthorKey(key.verifying_key().to_bytes()).to_hex();
    let mut admin = clients(&node.url()).await.admin;
    let deadline = tokio::time::Instant::now() + crate::replication::CONVERGE;
    loop {
        let status = admin
            .status(pb::StatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        if let Some(peer) = status
            .peers
            .into_iter()
            .find(|peer| peer.node_id == node_id && condition(peer))
        {
            return peer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting on peer {node_id}"
        );
        // Polling the node's status: the condition is the node's, not this test's.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
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
    intruder.offer(&stream).await;
    let hlc = node.log.clock().now();
    let good = client_scribe(&key, &stream, "x.note", b"looks fine", hlc);
    // A forged seal signature.
    let mut forged = good.parts();
    let mut seal = forged.seal.to_vec();
    let last = seal.len() - 1;
    seal[last] ^= 1;
    forged.seal = Bytes::from(seal);
    // A tampered envelope (its id changes with it; the seal no longer covers it).
    let mut tampered = client_scribe(&key, &stream, "x.note", b"tampered payload", hlc).parts();
    let mut envelope = tampered.envelope.to_vec();
    let middle = envelope.len() / 2;
    envelope[middle] ^= 0x20;
    tampered.envelope = Bytes::from(envelope);
    // Payloads that are not the one the envelope names: another, and a truncated one.
    let mut swapped = client_scribe(&key, &stream, "x.note", b"the real payload", hlc).parts();
    swapped.payload = Bytes::from_static(b"a forged payload");
    let mut truncated = client_scribe(&key, &stream, "x.note", b"cut short", hlc).parts();
    truncated.payload = truncated.payload.slice(..4);
    // Two scribes sealed together, the first sent with the second's proof.
    let pair = quire::scribe::seal_all(
        ["one", "two"]
            .iter()
            .map(|text| {
                client_scribe(&key, &stream, "x.note", text.as_bytes(), hlc)
                    .body
                    .into_unsealed(0)
            })
            .collect(),
        &key,
    );
    let mut wrong_proof = pair[0].parts();
    wrong_proof.proof = pair[1].proof.clone();
    let policy_breaking = client_scribe(&key, &stream, "file.put", b"<script>", hlc);
    // Allowed kinds, but payloads every node refuses: a path outside the tree, an upvote of
    // nothing.
    let (_, escaping) = quire::projection_api::files::FileChange::Delete {
        path: "../outside".into(),
    }
    .encode();
    let bad_path = client_scribe(&key, &stream, "file.delete", &escaping, hlc);
    let orphan_upvote = client_scribe(&key, &stream, "record.upvote", b"", hlc);
    // Well sealed, but of another stream the node holds, and a genesis of a stream of its own:
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
            membership: None,
            nonce: 0,
        },
        &key,
    );
    let id_of = |parts: &quire::scribe::Parts| quire::scribe::hash(&parts.envelope);
    let sent: Vec<(quire::scribe::Parts, ScribeId)> = vec![
        (forged.clone(), id_of(&forged)),
        (tampered.clone(), id_of(&tampered)),
        (swapped.clone(), id_of(&swapped)),
        (truncated.clone(), id_of(&truncated)),
        (wrong_proof.clone(), id_of(&wrong_proof)),
        (policy_breaking.parts(), policy_breaking.id),
        (good.parts(), ScribeId([7; 32])), // bad hash: claims another id
        (elsewhere.parts(), elsewhere.id),
        (foreign_genesis.parts(), foreign_genesis.id),
        (bad_path.parts(), bad_path.id),
        (orphan_upvote.parts(), orphan_upvote.id),
    ];
    let refused_count = sent.len() as u64;
    let mut seals: Vec<pb::PeerSeal> = Vec::new();
    let scribes: Vec<pb::PeerScribe> = sent
        .into_iter()
        .enumerate()
        .map(|(index, (parts, id))| {
            seals.push(pb::PeerSeal {
                seal: parts.seal.clone(),
                leaves: vec![],
            });
            pb::PeerScribe {
                redacted_by: Default::default(),
                seq: index as u64 + 1,
                id: Bytes::copy_from_slice(id.as_bytes()),
                envelope: parts.envelope,
                payload: parts.payload,
                seal: index as u32,
                proof: Some(parts.proof.to_proto()),
            }
        })
        .collect();
    let streams_before = node.log.stream_ids().len();
    intruder
        .send(Wire::Batch(pb::PeerBatch {
            stream: bytes_of(&stream),
            scribes,
            through_seq: refused_count,
            head_seq: refused_count,
            seals,
        }))
        .await;
    intruder
        .send(Wire::CaughtUp(pb::PeerCaughtUp {
            stream: bytes_of(&stream),
            seq: 4,
        }))
        .await;

    let peer = wait_for_peer(&node, &key, |peer| peer.refused == refused_count).await;
    assert_eq!(peer.streams[0].refused, refused_count);
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
    // The peer listener speaks TLS only: a plaintext HTTP/2 client gets no answer from any service.
    let plaintext =
        tonic::transport::Channel::from_shared(format!("http://{}", node.peer_addr.unwrap()))
            .unwrap()
            .connect()
            .await;
    if let Ok(plaintext) = plaintext {
        let status = pb::log_client::LogClient::new(plaintext)
            .append(pb::AppendRequest::default())
            .await
            .unwrap_err();
        assert_ne!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    }
    // Over TLS it serves replication and nothing else.
    let tls = quire::net::PeerTls::generate().unwrap();
    let (channel, _) = quire::replication::connection::peer_channel(
        Some(&tls),
        &node.peer_addr.unwrap().to_string(),
    )
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

/// Malformed peer messages close the connection with a message that names what was wrong, and
/// change nothing: another protocol version, fixed-size fields of the wrong length, a batch whose
/// scribe names a seal the batch does not carry, a proof with a short sibling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_peer_messages_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients_node = clients(&node.url()).await;
    let stream = create_stream(&mut clients_node, "target", None).await;
    let addr = node.peer_addr.unwrap();
    let key = client_key(70);
    let hello = pb::PeerHello {
        node_id: Bytes::copy_from_slice(&key.verifying_key().to_bytes()),
        epoch: Bytes::from(vec![1u8; 16]),
        nonce: Bytes::copy_from_slice(&[9u8; 32]),
        protocol: quire::replication::session::PROTOCOL_VERSION,
        ended_epochs: vec![],
        rules: quire::log::rules::RULES_VERSION,
    };
    let cases: Vec<(pb::PeerHello, &str)> = vec![
        (
            pb::PeerHello {
                protocol: 1,
                ..hello.clone()
            },
            "peer speaks protocol 1, this node speaks 3",
        ),
        (
            pb::PeerHello {
                node_id: Bytes::from(vec![1u8; 31]),
                ..hello.clone()
            },
            "node_id must be 32 bytes, got 31",
        ),
        (
            pb::PeerHello {
                epoch: Bytes::from(vec![1u8; 15]),
                ..hello.clone()
            },
            "epoch must be 16 bytes, got 15",
        ),
        (
            pb::PeerHello {
                nonce: Bytes::new(),
                ..hello.clone()
            },
            "nonce must be 32 bytes, got 0",
        ),
        (
            pb::PeerHello {
                ended_epochs: vec![pb::PeerEpoch {
                    epoch: Bytes::from(vec![2u8; 17]),
                    ended_at: 5,
                }],
                ..hello.clone()
            },
            "epoch must be 16 bytes, got 17",
        ),
        (
            pb::PeerHello {
                ended_epochs: vec![
                    pb::PeerEpoch {
                        epoch: Bytes::from(vec![2u8; 16]),
                        ended_at: 5,
                    };
                    65
                ],
                ..hello.clone()
            },
            "ended_epochs may have at most 64 entries, got 65",
        ),
    ];
    for (bad, expected) in cases {
        let mut intruder = Intruder::dial(addr, key.clone()).await;
        intruder.send(Wire::Hello(bad)).await;
        let error = intruder.error().await;
        assert!(error.contains(expected), "{expected:?} not in {error:?}");
    }
    let before = stream_ids(&node, &stream).await;
    let good = client_scribe(&key, &stream, "x.note", b"fine", node.log.clock().now());
    let scribe = |seal: u32, proof: pb::Proof| pb::PeerScribe {
        redacted_by: Default::default(),
        seq: 1,
        id: bytes_of(&good.id),
        envelope: good.envelope.clone(),
        payload: good.body.payload.clone(),
        seal,
        proof: Some(proof),
    };
    let batches: Vec<(pb::PeerBatch, &str)> = vec![
        (
            pb::PeerBatch {
                stream: bytes_of(&stream),
                scribes: vec![scribe(3, pb::Proof::default())],
                through_seq: 1,
                head_seq: 1,
                seals: vec![pb::PeerSeal {
                    seal: good.seal.bytes.clone(),
                    leaves: vec![],
                }],
            },
            "names seal 3, but the batch carries 1 seals",
        ),
        (
            pb::PeerBatch {
                stream: bytes_of(&stream),
                scribes: vec![scribe(
                    0,
                    pb::Proof {
                        index: 0,
                        siblings: vec![Bytes::from(vec![0u8; 31])],
                    },
                )],
                through_seq: 1,
                head_seq: 1,
                seals: vec![pb::PeerSeal {
                    seal: good.seal.bytes.clone(),
                    leaves: vec![],
                }],
            },
            "proof siblings must be 32 bytes, got 31",
        ),
        (
            pb::PeerBatch {
                stream: Bytes::from(vec![0u8; 33]),
                scribes: vec![],
                through_seq: 1,
                head_seq: 1,
                seals: vec![],
            },
            "stream must be 32 bytes, got 33",
        ),
        (
            // More leaves than any sender ever sends in place of proofs: refused before any tree
            // is built from them.
            pb::PeerBatch {
                stream: bytes_of(&stream),
                scribes: vec![pb::PeerScribe {
                    proof: None,
                    ..scribe(0, pb::Proof::default())
                }],
                through_seq: 1,
                head_seq: 1,
                seals: vec![pb::PeerSeal {
                    seal: good.seal.bytes.clone(),
                    leaves: vec![bytes_of(&good.id); quire::replication::wire::MAX_SENT_LEAVES + 1],
                }],
            },
            "its seal comes with 10241 leaves; at most 10240 are ever sent",
        ),
    ];
    for (index, (batch, expected)) in batches.into_iter().enumerate() {
        // A key per connection: the node keeps one connection per peer key.
        let mut intruder = Intruder::connect(addr, client_key(80 + index as u8), true).await;
        intruder
            .send(Wire::Streams(pb::PeerStreams {
                streams: vec![bytes_of(&stream)],
            }))
            .await;
        intruder.send(Wire::Batch(batch)).await;
        let error = intruder.error().await;
        assert!(error.contains(expected), "{expected:?} not in {error:?}");
    }
    // A seal sent with leaves that include the scribe's id but are not the list it seals: each
    // proof is derived from them, they do not hash to the seal's root, the scribe is refused and
    // counted (a valid message, so the connection stays).
    let pair = quire::scribe::seal_all(
        ["a", "b"]
            .iter()
            .map(|text| {
                client_scribe(
                    &key,
                    &stream,
                    "x.note",
                    text.as_bytes(),
                    node.log.clock().now(),
                )
                .body
                .into_unsealed(0)
            })
            .collect(),
        &key,
    );
    let liar = client_key(90);
    let mut intruder = Intruder::connect(addr, liar.clone(), true).await;
    intruder.offer(&stream).await;
    let forged_leaves = vec![
        bytes_of(&pair[0].id),
        bytes_of(&quire::scribe::hash(b"not b")),
    ];
    intruder
        .send(Wire::Batch(pb::PeerBatch {
            stream: bytes_of(&stream),
            scribes: vec![pb::PeerScribe {
                redacted_by: Default::default(),
                seq: 1,
                id: bytes_of(&pair[0].id),
                envelope: pair[0].envelope.clone(),
                payload: pair[0].body.payload.clone(),
                seal: 0,
                proof: None,
            }],
            through_seq: 1,
            head_seq: 1,
            seals: vec![pb::PeerSeal {
                seal: pair[0].seal.bytes.clone(),
                leaves: forged_leaves,
            }],
        }))
        .await;
    wait_for_peer(&node, &liar, |peer| peer.refused == 1).await;
    assert_eq!(stream_ids(&node, &stream).await, before, "nothing stored");
    node.stop().await.unwrap();
}
