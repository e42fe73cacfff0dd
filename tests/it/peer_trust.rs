//! The peer transport and peer admission (issue 15): replication runs over TLS 1.3 with handshake
//! proofs bound to the TLS session, so a relay between two nodes reads no payload byte and gets no
//! injected byte accepted; a relay that terminates TLS fails the handshake. `--peers known` admits
//! only node keys allowed with `quire peer allow`; `quire peer deny` ends a key's connections.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quire::node::NodeConfig;
use quire::pb;
use quire::replication::PeerAdmission;
use quire_projection_api::StreamId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;
use crate::replication::{connect, join, wait_for_count};

/// A TCP relay on a free loopback port in front of `target`: it records every byte it carries
/// (both directions) in `captured`. With `inject_after`, on its first connection only, once that
/// many bytes passed from the dialed node back to the dialer, it inserts a forged TLS
/// application-data record (a relay trying to inject a message).
struct Relay {
    addr: SocketAddr,
    captured: Arc<Mutex<Vec<u8>>>,
}

async fn relay(target: SocketAddr, inject_after: Option<usize>) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let captured = Arc::new(Mutex::new(Vec::new()));
    let record = captured.clone();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((dialer, _)) = listener.accept().await {
            let Ok(dialed) = TcpStream::connect(target).await else {
                continue;
            };
            let inject = inject_after.filter(|_| first);
            first = false;
            let (dialer_read, dialer_write) = dialer.into_split();
            let (dialed_read, dialed_write) = dialed.into_split();
            tokio::spawn(pipe(dialer_read, dialed_write, record.clone(), None));
            tokio::spawn(pipe(dialed_read, dialer_write, record.clone(), inject));
        }
    });
    Relay { addr, captured }
}

/// Copies `from` to `to`, recording what passes; with `inject`, inserts a forged TLS record once
/// that many bytes passed.
async fn pipe(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    record: Arc<Mutex<Vec<u8>>>,
    mut inject: Option<usize>,
) {
    let mut buf = vec![0u8; 16 << 10];
    let mut passed = 0;
    loop {
        let read = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        record.lock().unwrap().extend_from_slice(&buf[..read]);
        if to.write_all(&buf[..read]).await.is_err() {
            break;
        }
        passed += read;
        if inject.is_some_and(|after| passed >= after) {
            inject = None;
            // A TLS 1.3 application-data record header and 64 bytes the relay made up.
            let mut forged = vec![0x17, 0x03, 0x03, 0x00, 0x40];
            forged.extend_from_slice(&[0x5a; 64]);
            if to.write_all(&forged).await.is_err() {
                break;
            }
        }
    }
    let _ = to.shutdown().await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// A payload no TLS record would contain by chance.
fn marker(index: usize) -> String {
    format!("secret-payload-{index:04}-the-relay-must-never-see-this")
}

async fn peer_status(node: &quire::node::RunningNode) -> Vec<pb::PeerStatus> {
    node_status(node).await.peers
}

/// A stream of A's with `count` marked notes, and B joined to it through `via`.
async fn replicate_through(
    a: &quire::node::RunningNode,
    b: &quire::node::RunningNode,
    via: SocketAddr,
    count: usize,
) -> StreamId {
    let mut clients_a = clients(&a.url()).await;
    let stream = create_stream(&mut clients_a, "through a relay", None).await;
    for index in 0..count {
        append_note(&mut clients_a, &stream, &marker(index)).await;
    }
    clients(&b.url())
        .await
        .admin
        .add_peer(pb::AddPeerRequest {
            addr: via.to_string(),
        })
        .await
        .unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_between_two_nodes_carries_no_payload_byte_and_injects_nothing_accepted() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = start_node(dir_b.path()).await;
    let relay = relay(a.peer_addr.unwrap(), Some(4096)).await;
    let stream = replicate_through(&a, &b, relay.addr, 50).await;
    join(&b, &stream).await;
    // 50 notes and the genesis, after the relay broke the first connection with its forgery.
    wait_for_count(&[&b], &stream, 51).await;
    let mut clients_a = clients(&a.url()).await;
    for index in 50..60 {
        append_note(&mut clients_a, &stream, &marker(index)).await;
    }
    wait_for_count(&[&b], &stream, 61).await;

    let captured = relay.captured.lock().unwrap().clone();
    assert!(captured.len() > 10_000, "the relay carried the replication");
    for index in 0..60 {
        assert!(
            !contains(&captured, marker(index).as_bytes()),
            "payload {index} crossed the relay in the clear"
        );
    }
    for node in [&a, &b] {
        assert!(
            !contains(&captured, node.log.node_key().as_bytes()),
            "a Hello crossed the relay in the clear"
        );
    }
    // The forgery ended a connection and nothing else: no scribe was refused, the honest peer is
    // not banned, and B holds exactly A's scribes.
    let peers = peer_status(&b).await;
    let via = peers
        .iter()
        .find(|peer| peer.addr == relay.addr.to_string())
        .expect("B's peer through the relay");
    assert_eq!(via.refused, 0, "{via:?}");
    assert!(via.connected, "{via:?}");
    assert!(
        via.connects >= 2,
        "the forged record ended the first connection: {via:?}"
    );
    let held = |node: &quire::node::RunningNode| {
        node.log.stream(&stream).map(|state| state.record.scribes)
    };
    assert_eq!(held(&a), held(&b));
}

/// A relay that terminates TLS towards each node (it holds two TLS sessions and reads the HTTP/2
/// between them): the handshake proofs name the other session's binding, so both nodes refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_terminates_tls_fails_the_handshake_and_learns_no_payload() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = start_node(dir_b.path()).await;
    let target = a.peer_addr.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = listener.local_addr().unwrap();
    let captured = Arc::new(Mutex::new(Vec::new()));
    let record = captured.clone();
    tokio::spawn(async move {
        let tls = quire::net::PeerTls::generate().unwrap();
        while let Ok((dialer, _)) = listener.accept().await {
            let (tls, record) = (tls.clone(), record.clone());
            tokio::spawn(async move {
                let Ok(from_b) = tls.acceptor().accept(dialer).await else {
                    return;
                };
                let Ok(tcp) = TcpStream::connect(target).await else {
                    return;
                };
                let Ok((to_a, _)) = tls.connect(tcp).await else {
                    return;
                };
                let (b_read, b_write) = tokio::io::split(from_b);
                let (a_read, a_write) = tokio::io::split(to_a);
                tokio::join!(
                    pipe(b_read, a_write, record.clone(), None),
                    pipe(a_read, b_write, record, None),
                );
            });
        }
    });
    let stream = replicate_through(&a, &b, relay_addr, 5).await;
    wait_until(
        Duration::from_secs(30),
        "B reports the failed proof",
        || async {
            peer_status(&b).await.iter().any(|peer| {
                peer.addr == relay_addr.to_string() && peer.last_error.contains("failed to prove")
            })
        },
    )
    .await;
    let via = peer_status(&b)
        .await
        .into_iter()
        .find(|peer| peer.addr == relay_addr.to_string())
        .unwrap();
    assert_eq!(via.connects, 0, "no handshake completed: {via:?}");
    assert!(b.log.stream(&stream).is_none());
    let captured = captured.lock().unwrap().clone();
    assert!(
        contains(&captured, a.log.node_key().as_bytes()),
        "the relay read the Hello it carried (the test's premise)"
    );
    for index in 0..5 {
        assert!(!contains(&captured, marker(index).as_bytes()));
    }
}

fn known_config(dir: &std::path::Path) -> NodeConfig {
    let mut config = NodeConfig::new(dir);
    config.peer_options.admission = PeerAdmission::Known;
    config
}

async fn set_key(node: &quire::node::RunningNode, of: &quire::node::RunningNode, allow: bool) {
    let request = pb::PeerKeyRequest {
        node_id: Bytes::copy_from_slice(of.log.node_key().as_bytes()),
    };
    let mut admin = clients(&node.url()).await.admin;
    if allow {
        admin.allow_peer(request).await.unwrap();
    } else {
        admin.deny_peer(request).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_peers_known_only_allowed_keys_replicate_and_a_denied_key_is_cut_off() {
    let (dir_a, dir_b, dir_c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let a = start_config(known_config(dir_a.path()), true).await;
    let b = start_node(dir_b.path()).await;
    let c = start_node(dir_c.path()).await;
    let mut clients_a = clients(&a.url()).await;
    let stream = create_stream(&mut clients_a, "known only", None).await;
    append_note(&mut clients_a, &stream, "one").await;

    // B and C dial A; neither is known yet: both are refused with what to do.
    connect(&b, &a).await;
    connect(&c, &a).await;
    for node in [&b, &c] {
        wait_until(
            crate::replication::CONVERGE,
            "the refusal reaches the dialer",
            || async {
                peer_status(node).await.iter().any(|peer| {
                    peer.last_error.contains("known peers only")
                        && peer.last_error.contains("quire peer allow")
                })
            },
        )
        .await;
    }
    let keys = clients_a
        .admin
        .peer_keys(pb::PeerKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.admission, "known");
    assert!(keys.keys.is_empty());

    // A allows B: B joins and catches up; C still gets nothing.
    set_key(&a, &b, true).await;
    join(&b, &stream).await;
    wait_for_count(&[&b], &stream, 2).await;
    assert!(c.log.stream(&stream).is_none());
    assert!(!peer_status(&c).await.iter().any(|peer| peer.connected));

    // A denies B: B's connection ends at once and what A writes next never reaches it.
    set_key(&a, &b, false).await;
    wait_until(crate::replication::CONVERGE, "A drops B", || async {
        !peer_status(&a)
            .await
            .iter()
            .any(|peer| peer.connected && peer.node_id == b.log.node_key().to_hex())
    })
    .await;
    append_note(&mut clients_a, &stream, "after the deny").await;
    wait_until(crate::replication::CONVERGE, "B hears why", || async {
        peer_status(&b)
            .await
            .iter()
            .any(|peer| peer.last_error.contains("is denied on this node"))
    })
    .await;
    assert_eq!(b.log.stream(&stream).unwrap().record.scribes, 2);
    let keys = clients_a
        .admin
        .peer_keys(pb::PeerKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.keys.len(), 1);
    assert!(!keys.keys[0].allowed);

    // A stranger may not change A's peer keys.
    let status = pb::admin_client::AdminClient::new(stranger_channel(&a.url()).await)
        .allow_peer(pb::PeerKeyRequest {
            node_id: Bytes::copy_from_slice(c.log.node_key().as_bytes()),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    // A malformed key is refused with what to fix.
    let status = clients_a
        .admin
        .allow_peer(pb::PeerKeyRequest {
            node_id: Bytes::from_static(b"short"),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("32-byte"), "{status:?}");
}

/// The CLI end to end: `quire serve --peers known`, `quire peer allow KEY`, `quire peer list`,
/// `quire peer deny KEY`; the allow-list survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_allow_list_is_driven_by_the_cli_and_remembered() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let (mut child, url_a, peer_a) =
        crate::crash::spawn_serve_with(dir_a.path(), &["--peers", "known"]).await;
    let b = start_node(dir_b.path()).await;
    let key_b = b.log.node_key().to_hex();
    let cli = |url: &str, args: &[&str]| {
        let output = quire_cli(url).args(args).output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (ok, out) = cli(&url_a, &["peer", "allow", &key_b]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("allow {key_b}")), "{out}");
    let (ok, out) = cli(&url_a, &["peer", "allow", "not-a-key"]);
    assert!(!ok, "{out}");

    let mut clients_a = clients(&url_a).await;
    let stream = create_stream(&mut clients_a, "cli", None).await;
    clients(&b.url())
        .await
        .admin
        .add_peer(pb::AddPeerRequest { addr: peer_a })
        .await
        .unwrap();
    join(&b, &stream).await;
    wait_for_count(&[&b], &stream, 1).await;

    // Restarted, A still allows B; then B is denied.
    child.kill().await.unwrap();
    let (mut child, url_a, _) =
        crate::crash::spawn_serve_with(dir_a.path(), &["--peers", "known"]).await;
    let (ok, out) = cli(&url_a, &["peer", "list"]);
    assert!(ok, "{out}");
    assert!(out.contains("known only"), "{out}");
    assert!(out.contains(&format!("allow {key_b}")), "{out}");
    let (ok, out) = cli(&url_a, &["peer", "deny", &key_b]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("deny  {key_b}")), "{out}");
    child.kill().await.unwrap();
}

/// `--accept-streams known`: B holds a new stream only if its owner is B itself or a key allowed
/// with `quire peer allow` — created on B, appended to B as a client-signed genesis, or fetched
/// by `quire join` (which ends at once, saying what to run; the peer that sent the genesis is not
/// blamed). Allowing the key lets the same requests through; streams held stay across a restart.
/// Driven over gRPC, and over the CLI as a real process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_accept_streams_known_only_streams_of_known_owners_are_held() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let mut config = NodeConfig::new(dir_b.path());
    config.accept_streams = quire::log::AcceptStreams::Known;
    let b = start_config(config, true).await;
    let a_key = a.log.node_key();
    let mut clients_a = clients(&a.url()).await;
    let mut clients_b = clients(&b.url()).await;
    let from_a = create_stream(&mut clients_a, "a's", None).await;
    append_note(&mut clients_a, &from_a, "hello from a").await;
    connect(&b, &a).await;

    // A join of A's stream: refused once the genesis comes, at once, with what to run.
    let before = read_all(&mut clients_b).await;
    let refused = clients_b
        .streams
        .join(pb::JoinStreamRequest {
            stream: bytes_of(&from_a),
            timeout_ms: 60_000,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains(&format!("quire peer allow {a_key}")),
        "{}",
        refused.message()
    );
    assert!(b.log.stream(&from_a).is_none());
    assert!(
        b.log.store().pending_joins().unwrap().is_empty(),
        "the join ended"
    );
    // The user's key, as the owner of a stream B would create.
    let user = client_key(91);
    let user_key = quire::projection_api::AuthorKey(user.verifying_key().to_bytes());
    let create_for_user = || pb::CreateStreamRequest {
        name: "user's".into(),
        policy: None,
        owner: Bytes::copy_from_slice(user_key.as_bytes()),
        access: None,
        retention: None,
    };
    let refused = clients_b
        .streams
        .create(create_for_user())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("--accept-streams known"),
        "{}",
        refused.message()
    );
    // A genesis the user signed, appended with the owner's token: refused too.
    let genesis = quire::scribe::Scribe::sign(
        quire::scribe::Body {
            stream: None,
            author: user_key,
            hlc: b.log.clock().now(),
            kind: quire::projection_api::Kind::StreamCreate,
            content_type: quire::genesis::GENESIS_CONTENT_TYPE.into(),
            payload: Bytes::from(quire::genesis::genesis_payload(
                "signed by the user",
                None,
                None,
                None,
                [3; 16],
            )),
            parents: vec![],
            membership: None,
            nonce: 0,
        },
        &user,
    );
    let refused = clients_b
        .log
        .append_signed(signed_request(genesis.parts()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert_eq!(
        read_all(&mut clients_b).await,
        before,
        "refusals store nothing"
    );
    // B's own streams are B's to hold.
    let own = create_stream(&mut clients_b, "b's", None).await;

    // Known now: the same requests go through.
    set_key(&b, &a, true).await;
    clients_b
        .admin
        .allow_peer(pb::PeerKeyRequest {
            node_id: Bytes::copy_from_slice(user_key.as_bytes()),
        })
        .await
        .unwrap();
    join(&b, &from_a).await;
    wait_for_count(&[&b], &from_a, 2).await;
    clients_b.streams.create(create_for_user()).await.unwrap();
    clients_b
        .log
        .append_signed(signed_request(genesis.parts()))
        .await
        .unwrap();
    let refused_by_b: u64 = peer_status(&b).await.iter().map(|peer| peer.refused).sum();
    assert_eq!(refused_by_b, 0, "A was never blamed for B's choice");
    let held = b.log.stream_ids().len();
    assert_eq!(held, 4, "a's, b's, the user's two");
    b.stop().await.unwrap();
    a.stop().await.unwrap();

    // As a process: `--accept-streams known` is shown, and held streams stay.
    let (mut child, url_b, _) =
        crate::crash::spawn_serve_with(dir_b.path(), &["--accept-streams", "known"]).await;
    let out = quire_cli(&url_b).args(["peer", "list"]).output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.contains("streams: known owners only"), "{out}");
    let listed = clients(&url_b)
        .await
        .streams
        .list(pb::ListStreamsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .streams;
    assert_eq!(listed.len(), 4);
    assert!(listed.iter().any(|info| info.stream == bytes_of(&own)));
    // A stream the CLI creates for an unknown owner is refused, with the words to fix it.
    let stranger = quire::projection_api::AuthorKey([5; 32]).to_hex();
    let out = quire_cli(&url_b)
        .args(["stream", "create", "x", "--owner", &stranger])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("quire peer allow {stranger}")),
        "{err}"
    );
    let bad = quire_cli(&url_b)
        .args(["serve", "--accept-streams", "some"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("use any"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    child.kill().await.unwrap();
}
