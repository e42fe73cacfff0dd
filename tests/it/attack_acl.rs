//! Attacks on access control (issue 15): peer transport and admission, private streams, and
//! membership as data (`acl.grant` / `acl.revoke`, the envelope's `membership` view, strong
//! remove). Each test pins one attempt and asserts the secure outcome. Five found weaknesses,
//! all fixed since: a revoked admin acting by claiming an old view (grants are dropped causally,
//! and authority that came from a dropped grant is void), dropped revokes still removing and
//! excluding (only revokes that count do), scribes committed with a peer's revoke still sent to
//! it (a connection reads by one stream snapshot), and appends confirming a private stream to a
//! stranger (answered as for a stream not held).

use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use prost::Message as _;
use quire::api::access::app_label;
use quire::membership::Role;
use quire::node::{NodeConfig, RunningNode};
use quire::pb;
use quire::pb::peer_message::Message as Wire;
use quire::projection_api::{AuthorKey, Kind, ScribeId, StreamId};
use quire::replication::PeerAdmission;
use quire::scribe::{Body, Scribe};
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::common::*;
use crate::malicious::Intruder;
use crate::replication::{connect, join, wait_for_count};

const SECRET: &str = "attack-acl-private-payload-nobody-else-may-see";

// ---------------------------------------------------------------------------------------------
// Helpers (copied from tests/it/private.rs where they are private there).

pub(crate) fn key_bytes(key: &AuthorKey) -> Bytes {
    Bytes::copy_from_slice(key.as_bytes())
}

pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// A private stream of `node`'s with `members` from the start and `policy`.
pub(crate) async fn private_stream_with(
    node: &RunningNode,
    members: &[(AuthorKey, Role)],
    policy: Option<pb::Policy>,
) -> StreamId {
    let info = clients(&node.url())
        .await
        .streams
        .create(pb::CreateStreamRequest {
            name: "private".into(),
            policy,
            owner: Bytes::new(),
            access: Some(pb::Access {
                private: true,
                members: members
                    .iter()
                    .map(|(key, role)| pb::Member {
                        key: key_bytes(key),
                        role: role.to_proto(),
                    })
                    .collect(),
            }),
            retention: None,
        })
        .await
        .expect("create a private stream")
        .into_inner();
    assert!(info.private);
    StreamId::from_slice(&info.stream).unwrap()
}

pub(crate) async fn private_stream(node: &RunningNode, members: &[(AuthorKey, Role)]) -> StreamId {
    private_stream_with(node, members, None).await
}

/// `node` (an admin of `stream`) grants `role` to `key`, or revokes it (`role` None); the id.
pub(crate) async fn set_role(
    node: &RunningNode,
    stream: &StreamId,
    key: &AuthorKey,
    role: Option<Role>,
) -> ScribeId {
    let (kind, payload) = acl_payload(key, role);
    let reply = clients(&node.url())
        .await
        .log
        .append(pb::AppendRequest {
            stream: bytes_of(stream),
            kind: kind.into(),
            content_type: quire::membership::ACL_CONTENT_TYPE.into(),
            payload: Bytes::from(payload),
            parents: vec![],
        })
        .await
        .unwrap_or_else(|status| panic!("{kind}: {status:?}"))
        .into_inner();
    ScribeId::from_slice(&reply.id).unwrap()
}

fn acl_payload(key: &AuthorKey, role: Option<Role>) -> (&'static str, Vec<u8>) {
    match role {
        Some(role) => (
            "acl.grant",
            pb::AclGrant {
                key: key_bytes(key),
                role: role.to_proto(),
            }
            .encode_to_vec(),
        ),
        None => (
            "acl.revoke",
            pb::AclRevoke {
                key: key_bytes(key),
            }
            .encode_to_vec(),
        ),
    }
}

/// A scribe of `kind` with `payload` sealed by `signer`, dated `hlc`, with view `membership`
/// and `parents`.
#[allow(clippy::too_many_arguments)]
fn sealed(
    signer: &SigningKey,
    stream: &StreamId,
    kind: Kind,
    content_type: &str,
    payload: Vec<u8>,
    hlc: u64,
    membership: Option<ScribeId>,
    parents: Vec<ScribeId>,
) -> Scribe {
    Scribe::sign(
        Body {
            stream: Some(*stream),
            author: key_of(signer),
            hlc,
            kind,
            content_type: content_type.into(),
            payload: Bytes::from(payload),
            parents,
            membership,
            nonce: 0,
        },
        signer,
    )
}

/// An `acl.grant` (role Some) or `acl.revoke` of `target` signed by `signer`.
fn acl(
    signer: &SigningKey,
    stream: &StreamId,
    target: &AuthorKey,
    role: Option<Role>,
    hlc: u64,
    membership: Option<ScribeId>,
    parents: Vec<ScribeId>,
) -> Scribe {
    let (kind, payload) = acl_payload(target, role);
    sealed(
        signer,
        stream,
        kind.parse().unwrap(),
        quire::membership::ACL_CONTENT_TYPE,
        payload,
        hlc,
        membership,
        parents,
    )
}

/// An `x.note` signed by `signer`.
fn note(
    signer: &SigningKey,
    stream: &StreamId,
    text: &str,
    hlc: u64,
    membership: Option<ScribeId>,
) -> Scribe {
    sealed(
        signer,
        stream,
        "x.note".parse().unwrap(),
        "text/plain",
        text.as_bytes().to_vec(),
        hlc,
        membership,
        vec![],
    )
}

async fn append_signed(
    node: &RunningNode,
    scribe: &Scribe,
) -> Result<pb::AppendReply, tonic::Status> {
    clients(&node.url())
        .await
        .log
        .append_signed(signed_request(scribe.parts()))
        .await
        .map(|reply| reply.into_inner())
}

/// `key`'s role in `stream` as `node` serves it (`Streams.Get` members).
async fn role_of(node: &RunningNode, stream: &StreamId, key: &AuthorKey) -> Option<Role> {
    stream_info(node, stream)
        .await
        .members
        .iter()
        .find(|member| member.key == key_bytes(key))
        .and_then(|member| Role::from_proto(member.role))
}

async fn heads(node: &RunningNode, stream: &StreamId) -> Vec<ScribeId> {
    stream_info(node, stream)
        .await
        .membership_heads
        .iter()
        .map(|head| ScribeId::from_slice(head).unwrap())
        .collect()
}

pub(crate) async fn excluded(node: &RunningNode, stream: &StreamId) -> Vec<Bytes> {
    clients(&node.url())
        .await
        .streams
        .excluded(pb::ExcludedRequest {
            stream: bytes_of(stream),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .scribes
        .into_iter()
        .map(|scribe| scribe.id)
        .collect()
}

/// `text` with every id of `ids` (hex) and its app label replaced by a placeholder: the words of
/// an answer about one stream compared to those about another.
fn normalised(text: &str, ids: &[StreamId]) -> String {
    let mut text = text.to_string();
    for id in ids {
        text = text.replace(&id.to_hex(), "<id>");
        text = text.replace(&app_label(id), "<label>");
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Membership forgery.

/// A revoked admin signs, at a view from before its revoke and dated before it (the documented
/// residual risk: "it could have written them then"), an `acl.grant` of admin to a second key of
/// its own; that key, having seen everything, grants the revoked admin back. Secure outcome:
/// after the revoke neither key holds a role — a revoked admin cannot outlive its revoke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_admin_cannot_come_back_through_a_backdated_grant_to_a_second_key() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(dir.path()).await;
    let admin = client_key(101);
    let sockpuppet = client_key(102);
    let stream = private_stream(&a, &[(key_of(&admin), Role::Admin)]).await;
    // A clock value before the revoke: the admin claims it wrote then.
    let before = a.log.clock().now();
    let revoke = set_role(&a, &stream, &key_of(&admin), None).await;
    assert_eq!(role_of(&a, &stream, &key_of(&admin)).await, None);

    // Having seen its revoke, the admin is refused (the rule works in the honest view).
    let seen = acl(
        &admin,
        &stream,
        &key_of(&sockpuppet),
        Some(Role::Admin),
        a.log.clock().now(),
        Some(revoke),
        vec![revoke],
    );
    let status = append_signed(&a, &seen).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // At the genesis view (where it is an admin), dated before the revoke.
    let backdated = acl(
        &admin,
        &stream,
        &key_of(&sockpuppet),
        Some(Role::Admin),
        before,
        None,
        vec![],
    );
    let _ = append_signed(&a, &backdated).await;
    // The sockpuppet, having seen everything, grants the revoked admin back.
    let now_heads = heads(&a, &stream).await;
    let regrant = acl(
        &sockpuppet,
        &stream,
        &key_of(&admin),
        Some(Role::Admin),
        a.log.clock().now(),
        Some(revoke),
        now_heads,
    );
    let _ = append_signed(&a, &regrant).await;

    assert_eq!(
        role_of(&a, &stream, &key_of(&sockpuppet)).await,
        None,
        "a key granted by a revoked admin, after its revoke, holds a role"
    );
    assert_eq!(
        role_of(&a, &stream, &key_of(&admin)).await,
        None,
        "the revoked admin is an admin again"
    );
}

/// The owner revokes admin A; writer W keeps writing (it saw A's revoke). Later A, at its old
/// view, signs a revoke of W dated just after its own revoke. The membership itself drops that
/// revoke (A was revoked before it: W still shows as a writer), so it must not exclude W's
/// writes either. Secure outcome: W remains a writer and nothing of W's is excluded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_the_membership_drops_does_not_exclude_its_targets_writes() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(dir.path()).await;
    let admin = client_key(103);
    let writer = client_key(104);
    let stream = private_stream(
        &a,
        &[
            (key_of(&admin), Role::Admin),
            (key_of(&writer), Role::Writer),
        ],
    )
    .await;
    let revoke_admin = set_role(&a, &stream, &key_of(&admin), None).await;
    let between = a.log.clock().now();
    // W writes, having seen A's revoke.
    let write = note(
        &writer,
        &stream,
        "written by a writer in good standing",
        a.log.clock().now(),
        Some(revoke_admin),
    );
    let written = append_signed(&a, &write).await.expect("the writer writes");
    // The revoked admin's revoke of W, at the genesis view, dated between its own revoke and W's
    // write.
    let bogus = acl(
        &admin,
        &stream,
        &key_of(&writer),
        None,
        between,
        None,
        vec![],
    );
    let _ = append_signed(&a, &bogus).await;
    assert_eq!(
        role_of(&a, &stream, &key_of(&writer)).await,
        Some(Role::Writer),
        "the membership drops the revoked admin's revoke"
    );
    let excluded = excluded(&a, &stream).await;
    assert!(
        !excluded.contains(&written.id),
        "the writer's write is excluded by a revoke the membership itself drops: {excluded:?}"
    );
}

/// Same root as above, for roles: admins A and B; the owner revokes A; B (still an admin, having
/// seen A's revoke) grants reader R. A, at its old view, revokes B dated between its own revoke
/// and B's grant. That revoke is dropped (B remains an admin), so B's grant must stand: R is a
/// reader (and its node would be served the private stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_the_membership_drops_does_not_undo_another_admins_grants() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(dir.path()).await;
    let admin_a = client_key(105);
    let admin_b = client_key(106);
    let reader = client_key(107);
    let stream = private_stream(
        &a,
        &[
            (key_of(&admin_a), Role::Admin),
            (key_of(&admin_b), Role::Admin),
        ],
    )
    .await;
    let revoke_a = set_role(&a, &stream, &key_of(&admin_a), None).await;
    let between = a.log.clock().now();
    let grant = acl(
        &admin_b,
        &stream,
        &key_of(&reader),
        Some(Role::Reader),
        a.log.clock().now(),
        Some(revoke_a),
        vec![revoke_a],
    );
    append_signed(&a, &grant).await.expect("B grants R");
    assert_eq!(
        role_of(&a, &stream, &key_of(&reader)).await,
        Some(Role::Reader)
    );
    let bogus = acl(
        &admin_a,
        &stream,
        &key_of(&admin_b),
        None,
        between,
        None,
        vec![],
    );
    let _ = append_signed(&a, &bogus).await;
    assert_eq!(
        role_of(&a, &stream, &key_of(&admin_b)).await,
        Some(Role::Admin),
        "the revoked admin's revoke of B is dropped"
    );
    assert_eq!(
        role_of(&a, &stream, &key_of(&reader)).await,
        Some(Role::Reader),
        "B's grant was undone by a revoke the membership itself drops"
    );
}

/// Malformed and forged membership scribes and views: every one refused with its code, nothing
/// stored, the membership unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_membership_scribes_and_views_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(dir.path()).await;
    let admin = client_key(111);
    let writer = client_key(112);
    let stranger = client_key(113);
    let target = AuthorKey(client_key(114).verifying_key().to_bytes());
    let stream = private_stream(
        &a,
        &[
            (key_of(&admin), Role::Admin),
            (key_of(&writer), Role::Writer),
        ],
    )
    .await;
    // Another private stream with a membership scribe, and a plain note of this stream.
    let other = private_stream(&a, &[]).await;
    let other_grant = set_role(&a, &other, &target, Some(Role::Reader)).await;
    let plain = ScribeId::from_slice(
        &append_note(&mut clients(&a.url()).await, &stream, "a plain note")
            .await
            .id,
    )
    .unwrap();
    let members_before = stream_info(&a, &stream).await.members;
    let held_before = held(&a, &stream);
    let hlc = a.log.clock().now();
    let grant_payload = |key: Vec<u8>, role: i32| {
        pb::AclGrant {
            key: key.into(),
            role,
        }
        .encode_to_vec()
    };
    let raw = |signer: &SigningKey, kind: &str, payload: Vec<u8>, membership, parents| {
        sealed(
            signer,
            &stream,
            kind.parse().unwrap(),
            quire::membership::ACL_CONTENT_TYPE,
            payload,
            hlc,
            membership,
            parents,
        )
    };
    let owner = a.log.node_key();
    let attempts: Vec<(&str, Scribe, tonic::Code)> = vec![
        (
            "role 0",
            raw(
                &admin,
                "acl.grant",
                grant_payload(target.as_bytes().to_vec(), 0),
                None,
                vec![],
            ),
            tonic::Code::InvalidArgument,
        ),
        (
            "role 9",
            raw(
                &admin,
                "acl.grant",
                grant_payload(target.as_bytes().to_vec(), 9),
                None,
                vec![],
            ),
            tonic::Code::InvalidArgument,
        ),
        (
            "garbage payload",
            raw(
                &admin,
                "acl.grant",
                vec![0xff, 0xff, 0xff, 0x01],
                None,
                vec![],
            ),
            tonic::Code::InvalidArgument,
        ),
        (
            "31-byte key",
            raw(
                &admin,
                "acl.grant",
                grant_payload(vec![7; 31], 1),
                None,
                vec![],
            ),
            tonic::Code::InvalidArgument,
        ),
        (
            "revoke of the owner",
            acl(&admin, &stream, &owner, None, hlc, None, vec![]),
            tonic::Code::PermissionDenied,
        ),
        (
            "view: another stream's membership scribe",
            acl(
                &admin,
                &stream,
                &target,
                Some(Role::Admin),
                hlc,
                Some(other_grant),
                vec![],
            ),
            tonic::Code::FailedPrecondition,
        ),
        (
            "view: a plain scribe of this stream",
            acl(
                &admin,
                &stream,
                &target,
                Some(Role::Admin),
                hlc,
                Some(plain),
                vec![],
            ),
            tonic::Code::FailedPrecondition,
        ),
        (
            "view: an id stored nowhere",
            acl(
                &admin,
                &stream,
                &target,
                Some(Role::Admin),
                hlc,
                Some(ScribeId([9; 32])),
                vec![],
            ),
            tonic::Code::FailedPrecondition,
        ),
        (
            "a writer grants itself admin",
            acl(
                &writer,
                &stream,
                &key_of(&writer),
                Some(Role::Admin),
                hlc,
                None,
                vec![],
            ),
            tonic::Code::PermissionDenied,
        ),
        (
            "a stranger grants",
            acl(
                &stranger,
                &stream,
                &target,
                Some(Role::Reader),
                hlc,
                None,
                vec![],
            ),
            tonic::Code::PermissionDenied,
        ),
        (
            "a stranger's revoke of the writer",
            acl(
                &stranger,
                &stream,
                &key_of(&writer),
                None,
                hlc,
                None,
                vec![],
            ),
            tonic::Code::PermissionDenied,
        ),
        (
            "a writer's note naming an unknown view",
            note(&writer, &stream, "x", hlc, Some(ScribeId([8; 32]))),
            tonic::Code::FailedPrecondition,
        ),
        (
            "a writer's note naming another stream's membership scribe",
            note(&writer, &stream, "x", hlc, Some(other_grant)),
            tonic::Code::FailedPrecondition,
        ),
    ];
    for (what, scribe, code) in &attempts {
        let status = append_signed(&a, scribe)
            .await
            .expect_err(&format!("{what} was accepted"));
        assert_eq!(status.code(), *code, "{what}: {status:?}");
    }
    // A grant whose parent is another stream's membership scribe (the parent is no link: it is
    // refused as a parent in another stream).
    let cross_parent = acl(
        &admin,
        &stream,
        &target,
        Some(Role::Admin),
        hlc,
        None,
        vec![other_grant],
    );
    let status = append_signed(&a, &cross_parent).await.unwrap_err();
    assert_ne!(status.code(), tonic::Code::Ok, "{status:?}");
    assert_eq!(held(&a, &stream), held_before, "a forged scribe was stored");
    assert_eq!(stream_info(&a, &stream).await.members, members_before);
    assert_eq!(role_of(&a, &stream, &target).await, None);
}

/// A revoked writer's backdated writes (documented residual risk): having seen its revoke it is
/// refused; at its old view dated before the revoke it is kept (it held the role there); dated
/// after, it is stored but excluded. A key that never held the role gets nothing, whatever it
/// claims to have seen or whenever it dates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backdated_write_counts_only_where_its_author_held_the_role() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(dir.path()).await;
    let writer = client_key(115);
    let stranger = client_key(116);
    let stream = private_stream(&a, &[(key_of(&writer), Role::Writer)]).await;
    let before = a.log.clock().now();
    let revoke = set_role(&a, &stream, &key_of(&writer), None).await;
    let now = a.log.clock().now();

    let status = append_signed(&a, &note(&writer, &stream, "seen", now, Some(revoke)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let kept = append_signed(&a, &note(&writer, &stream, "backdated", before, None))
        .await
        .expect("dated before the revoke, at a view where it wrote: kept (documented)");
    let late = append_signed(&a, &note(&writer, &stream, "late", now + 1, None))
        .await
        .expect("dated after the revoke it claims not to have seen: stored");
    for (what, scribe) in [
        (
            "backdated, old view",
            note(&stranger, &stream, "s1", before, None),
        ),
        (
            "the revoke's view",
            note(&stranger, &stream, "s2", now, Some(revoke)),
        ),
        ("dated at zero", note(&stranger, &stream, "s3", 1, None)),
    ] {
        let status = append_signed(&a, &scribe).await.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{what}: {status:?}"
        );
    }
    assert_eq!(excluded(&a, &stream).await, vec![late.id.clone()]);
    assert_ne!(kept.id, late.id);
}

// ---------------------------------------------------------------------------------------------
// Peers.

/// A member peer is revoked while the owner keeps writing: the revoke and notes are committed
/// together (one `AppendBatch`), and once more right after. From the revoke on, nothing of the
/// stream but (at most) the revoke itself may reach the peer; the peer reads until the node's
/// `Streams` tells it the stream is gone. Repeated (re-granted each round) because the node's
/// connection loop picks among ready branches at random.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_losing_its_role_receives_nothing_committed_with_or_after_its_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(dir.path()).await;
    let reader = client_key(121);
    let stream = private_stream(&a, &[(key_of(&reader), Role::Reader)]).await;
    let mut owner = clients(&a.url()).await;
    let mut intruder = Intruder::connect(a.peer_addr.unwrap(), reader.clone(), true).await;
    let mut leaked: Vec<String> = Vec::new();
    const ROUNDS: usize = 20;
    for round in 0..ROUNDS {
        if round > 0 {
            set_role(&a, &stream, &key_of(&reader), Some(Role::Reader)).await;
        }
        // The stream is announced to the peer again.
        loop {
            match intruder.next().await {
                Some(Wire::Streams(streams)) if streams.streams.contains(&bytes_of(&stream)) => {
                    break
                }
                Some(_) => continue,
                None => panic!("the node closed the connection"),
            }
        }
        let head = a.log.stream(&stream).unwrap().record.head_seq;
        intruder
            .send(Wire::Want(pb::PeerWant {
                stream: bytes_of(&stream),
                after_seq: head,
                ..Default::default()
            }))
            .await;
        loop {
            match intruder.next().await {
                Some(Wire::CaughtUp(caught)) if caught.stream == bytes_of(&stream) => break,
                Some(_) => continue,
                None => panic!("the node closed the connection"),
            }
        }
        let marker = format!("written-after-the-revoke-round-{round:02}");
        let (kind, payload) = acl_payload(&key_of(&reader), None);
        owner
            .log
            .append_batch(pb::AppendBatchRequest {
                appends: vec![
                    pb::AppendRequest {
                        stream: bytes_of(&stream),
                        kind: kind.into(),
                        content_type: quire::membership::ACL_CONTENT_TYPE.into(),
                        payload: Bytes::from(payload),
                        parents: vec![],
                    },
                    pb::AppendRequest {
                        stream: bytes_of(&stream),
                        kind: "x.note".into(),
                        content_type: "text/plain".into(),
                        payload: Bytes::from(format!("{marker}-same-commit")),
                        parents: vec![],
                    },
                ],
                signed: vec![],
                sealed: vec![],
            })
            .await
            .expect("revoke and note");
        append_note(&mut owner, &stream, &format!("{marker}-next-commit")).await;
        loop {
            match intruder.next().await {
                Some(Wire::Batch(batch)) => {
                    for scribe in batch.scribes {
                        if contains(&scribe.payload, marker.as_bytes()) {
                            leaked.push(String::from_utf8_lossy(&scribe.payload).into_owned());
                        }
                    }
                }
                Some(Wire::Streams(streams)) if !streams.streams.contains(&bytes_of(&stream)) => {
                    break
                }
                Some(_) => continue,
                None => panic!("the node closed the connection"),
            }
        }
    }
    assert!(
        leaked.is_empty(),
        "a revoked peer received {} scribe(s) written with or after its revoke in {ROUNDS} rounds: {leaked:?}",
        leaked.len()
    );
}

/// A node that is not a member, connected only to a member, asks to join the private stream,
/// and a hand-written non-member peer offers the stream's id as its own (to make the owner ask
/// for it and so confirm it holds it) and sends a batch of it unasked. Nothing of the stream
/// reaches the non-members, the owner never asks for it, and the unasked batch stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_members_neither_get_the_stream_through_a_member_nor_make_the_owner_ask_for_it() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_node(dirs[0].path()).await;
    let b = start_node(dirs[1].path()).await;
    let c = start_node(dirs[2].path()).await;
    let stream = private_stream(&a, &[(b.log.node_key(), Role::Reader)]).await;
    let mut owner = clients(&a.url()).await;
    append_note(&mut owner, &stream, SECRET).await;
    let public = create_stream(&mut owner, "public", None).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    join(&b, &public).await;
    wait_for_count(&[&b], &stream, 2).await;
    // C knows the id (say, a link) and reaches B alone.
    connect(&c, &b).await;
    join(&c, &public).await;
    let _ = clients(&c.url())
        .await
        .streams
        .join(pb::JoinStreamRequest {
            stream: bytes_of(&stream),
            timeout_ms: 1_000,
        })
        .await;
    append_note(&mut owner, &stream, &format!("{SECRET} later")).await;
    wait_for_count(&[&b], &stream, 3).await;
    // The public stream, written after, reaches C through B: B had every chance to send.
    append_note(&mut owner, &public, "marker").await;
    wait_for_count(&[&b, &c], &public, 2).await;
    assert!(
        c.log.stream(&stream).is_none(),
        "C holds the private stream"
    );
    let everything = read_all(&mut clients(&c.url()).await).await;
    assert!(everything
        .iter()
        .all(|entry| !contains(&entry.payload, SECRET.as_bytes())));

    // A hand-written non-member offers the stream and sends an unasked batch of it.
    let outsider = client_key(122);
    let mut intruder = Intruder::connect(a.peer_addr.unwrap(), outsider.clone(), true).await;
    intruder
        .send(Wire::Streams(pb::PeerStreams {
            streams: vec![bytes_of(&stream), bytes_of(&public)],
        }))
        .await;
    let mut asked_for_public = false;
    while let Some(message) = intruder.next_within(Duration::from_secs(3)).await {
        match message {
            Wire::Want(want) => {
                assert_ne!(
                    want.stream,
                    bytes_of(&stream),
                    "the owner asked a non-member for the private stream"
                );
                asked_for_public |= want.stream == bytes_of(&public);
            }
            Wire::Streams(streams) => assert!(!streams.streams.contains(&bytes_of(&stream))),
            Wire::Batch(batch) => assert_ne!(batch.stream, bytes_of(&stream)),
            Wire::Genesis(genesis) => assert!(genesis.scribe.is_none()),
            _ => {}
        }
        if asked_for_public {
            break;
        }
    }
    assert!(
        asked_for_public,
        "the owner asks for the public stream it offered (the premise)"
    );
    let before = held(&a, &stream);
    let forged = note(&outsider, &stream, "pushed", a.log.clock().now(), None);
    intruder.send(batch_of(&stream, &[forged], 1)).await;
    let reason = intruder.error().await;
    assert!(reason.contains("not asked for"), "{reason}");
    assert_eq!(held(&a, &stream), before);
}

/// `--peers known` holds whichever side dials: a known-only node that dials an unknown node (its
/// owner added the address) replicates nothing with it either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_known_also_refuses_a_node_it_dials_itself() {
    let (dir_a, dir_c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut config = NodeConfig::new(dir_a.path());
    config.peer_options.admission = PeerAdmission::Known;
    let a = start_config(config, true).await;
    let c = start_node(dir_c.path()).await;
    let mut clients_a = clients(&a.url()).await;
    let mut clients_c = clients(&c.url()).await;
    let of_a = create_stream(&mut clients_a, "a's", None).await;
    let of_c = create_stream(&mut clients_c, "c's", None).await;
    connect(&a, &c).await;
    wait_until(Duration::from_secs(30), "A refuses C", || async {
        node_status(&a)
            .await
            .peers
            .iter()
            .any(|peer| peer.last_error.contains("known peers only"))
    })
    .await;
    let joined = clients_a
        .streams
        .join(pb::JoinStreamRequest {
            stream: bytes_of(&of_c),
            timeout_ms: 1_000,
        })
        .await;
    assert!(joined.is_err() || a.log.stream(&of_c).is_none());
    let _ = clients_c
        .streams
        .join(pb::JoinStreamRequest {
            stream: bytes_of(&of_a),
            timeout_ms: 1_000,
        })
        .await;
    assert!(
        a.log.stream(&of_c).is_none(),
        "A joined a stream of a refused node"
    );
    assert!(
        c.log.stream(&of_a).is_none(),
        "a refused node joined A's stream"
    );
    assert!(node_status(&a)
        .await
        .peers
        .iter()
        .all(|peer| !peer.connected));
}

// ---------------------------------------------------------------------------------------------
// The client API, as a stranger (no token, not the app's page).

/// The HTTP status a WebSocket upgrade was refused with (101: it was not).
fn refused_with<S>(result: Result<crate::ws::Live<S>, WsError>) -> u16 {
    match result {
        Ok(_) => 101,
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("refused with an HTTP status, not {other}"),
    }
}

/// Every read path of the client API for a private stream, as a stranger: gRPC Files.Get,
/// Kv.Get, Kv.Watch, Log.Get of a private scribe, a whole-log Log.Subscribe that sees private
/// scribes arrive live, Streams.Excluded and Admin.Status; HTTP files on the node's host and on
/// the app host without Origin, a navigation, the query action on both hosts, the live
/// binding's WebSocket on both hosts. Each answer is the one for a stream the node does not hold
/// (same code, same words) or an owner-only refusal, and no answer carries the payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_read_path_answers_a_stranger_as_for_an_unknown_stream() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(dir.path()).await;
    let stream = private_stream(&a, &[]).await;
    let unknown = StreamId::from_slice(&[0x5c; 32]).unwrap();
    let ids = [stream, unknown];
    let owner = owner_channel(&a.url()).await;
    pb::files_client::FilesClient::new(owner.clone())
        .put(pb::FilesPutRequest {
            stream: bytes_of(&stream),
            path: "index.html".into(),
            content_type: "text/html".into(),
            data: Bytes::from(SECRET),
        })
        .await
        .expect("the owner puts a file");
    pb::kv_client::KvClient::new(owner.clone())
        .set(pb::KvSetRequest {
            stream: bytes_of(&stream),
            key: Bytes::from_static(b"k"),
            value: Bytes::from(SECRET),
        })
        .await
        .expect("the owner sets a key");
    let mut owner_clients = clients(&a.url()).await;
    let private_note = append_note(&mut owner_clients, &stream, SECRET).await;
    let public = create_stream(&mut owner_clients, "public", None).await;

    let stranger = stranger_channel(&a.url()).await;
    // gRPC: each private answer equals the unknown stream's.
    let mut files = pb::files_client::FilesClient::new(stranger.clone());
    let mut kv = pb::kv_client::KvClient::new(stranger.clone());
    let mut log = pb::log_client::LogClient::new(stranger.clone());
    let pairs: Vec<(&str, tonic::Status, tonic::Status)> = vec![
        (
            "Files.Get",
            files
                .get(pb::FilesGetRequest {
                    stream: bytes_of(&stream),
                    path: "index.html".into(),
                })
                .await
                .unwrap_err(),
            files
                .get(pb::FilesGetRequest {
                    stream: bytes_of(&unknown),
                    path: "index.html".into(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "Kv.Get",
            kv.get(pb::KvGetRequest {
                stream: bytes_of(&stream),
                key: Bytes::from_static(b"k"),
            })
            .await
            .unwrap_err(),
            kv.get(pb::KvGetRequest {
                stream: bytes_of(&unknown),
                key: Bytes::from_static(b"k"),
            })
            .await
            .unwrap_err(),
        ),
        (
            "Kv.Watch",
            kv.watch(pb::KvWatchRequest {
                stream: bytes_of(&stream),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .unwrap_err(),
            kv.watch(pb::KvWatchRequest {
                stream: bytes_of(&unknown),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .unwrap_err(),
        ),
        (
            "Log.Get",
            log.get(pb::GetScribeRequest {
                id: private_note.id.clone(),
            })
            .await
            .unwrap_err(),
            log.get(pb::GetScribeRequest {
                id: Bytes::from(vec![0x5d; 32]),
            })
            .await
            .unwrap_err(),
        ),
        (
            "Log.Subscribe of the stream",
            log.subscribe(pb::SubscribeRequest {
                stream: bytes_of(&stream),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .unwrap_err(),
            log.subscribe(pb::SubscribeRequest {
                stream: bytes_of(&unknown),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .unwrap_err(),
        ),
    ];
    for (what, private, unknown_answer) in &pairs {
        assert_eq!(private.code(), tonic::Code::NotFound, "{what}: {private:?}");
        assert_eq!(private.code(), unknown_answer.code(), "{what}");
        let mut private_words = normalised(private.message(), &ids);
        let mut unknown_words = normalised(unknown_answer.message(), &ids);
        // Log.Get names the scribe id asked for.
        if *what == "Log.Get" {
            private_words = private_words.replace(&hex::encode(&private_note.id), "<id>");
            unknown_words = unknown_words.replace(&hex::encode([0x5d; 32]), "<id>");
        }
        assert_eq!(private_words, unknown_words, "{what}");
        assert!(!private.message().contains(SECRET));
    }
    // Owner-only methods.
    let status = pb::streams_client::StreamsClient::new(stranger.clone())
        .excluded(pb::ExcludedRequest {
            stream: bytes_of(&stream),
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let status = pb::admin_client::AdminClient::new(stranger.clone())
        .status(pb::StatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    // A whole-log subscription sees private scribes arrive live and skips them.
    let mut events = log
        .subscribe(pb::SubscribeRequest::default())
        .await
        .expect("a whole-log subscription")
        .into_inner();
    append_note(&mut owner_clients, &stream, &format!("{SECRET} live")).await;
    append_note(&mut owner_clients, &public, "public marker").await;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), events.message())
            .await
            .expect("the public marker arrives")
            .unwrap()
            .expect("the subscription goes on");
        if let Some(pb::subscribe_event::Event::Scribe(entry)) = event.event {
            assert_ne!(
                entry.stream,
                bytes_of(&stream),
                "a private scribe reached a stranger"
            );
            assert!(!contains(&entry.payload, SECRET.as_bytes()));
            if contains(&entry.payload, b"public marker") {
                break;
            }
        }
    }

    // HTTP, each against the unknown stream's answer.
    let port = a.api_addr.port();
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    let query = || Some(serde_json::json!({"query": "SELECT 1"}));
    let mut http_pairs = Vec::new();
    for id in [stream, unknown] {
        let tid = id.to_hex();
        let host = format!("{}.localhost", app_label(&id));
        let mut answers = Vec::new();
        answers.push(
            http_to(
                &a,
                None,
                get.clone(),
                &format!("/{tid}/index.html"),
                &[],
                None,
            )
            .await,
        );
        answers.push(http_to(&a, None, get.clone(), &format!("/{tid}/"), &[], None).await);
        answers.push(http_to(&a, Some(&host), get.clone(), "/", &[], None).await);
        answers.push(http_to(&a, Some(&host), get.clone(), "/index.html", &[], None).await);
        answers.push(
            http_to(
                &a,
                Some(&host),
                get.clone(),
                "/index.html",
                &[
                    ("sec-fetch-mode", "navigate".into()),
                    ("sec-fetch-site", "none".into()),
                ],
                None,
            )
            .await,
        );
        answers.push(
            http_to(
                &a,
                None,
                post.clone(),
                &format!("/{tid}/query"),
                &[],
                query(),
            )
            .await,
        );
        answers.push(http_to(&a, Some(&host), post.clone(), "/query", &[], query()).await);
        // A page of another app (the public one) asking the private app's host.
        answers.push(
            http_to(
                &a,
                Some(&host),
                post.clone(),
                "/query",
                &[(
                    "origin",
                    format!("http://{}.localhost:{port}", app_label(&public)),
                )],
                query(),
            )
            .await,
        );
        let ws_node =
            refused_with(crate::ws::open_as(&a, None, &format!("/{tid}/socksync"), &[]).await);
        let ws_app = refused_with(crate::ws::open_as(&a, Some(&host), "/socksync", &[]).await);
        http_pairs.push((answers, ws_node, ws_app));
    }
    let (private_http, unknown_http) = (&http_pairs[0], &http_pairs[1]);
    for (index, ((p_status, p_body), (u_status, u_body))) in
        private_http.0.iter().zip(unknown_http.0.iter()).enumerate()
    {
        assert!(
            !p_body.contains(SECRET),
            "HTTP {index}: the payload was served"
        );
        assert!(*p_status >= 400, "HTTP {index}: {p_status} {p_body}");
        assert_eq!(p_status, u_status, "HTTP {index}: {p_body} / {u_body}");
        assert_eq!(
            normalised(p_body, &ids),
            normalised(u_body, &ids),
            "HTTP {index}"
        );
    }
    assert_eq!(private_http.1, 404, "the live binding on the node's host");
    assert_eq!(private_http.2, 404, "the live binding on the app host");
    assert_eq!(
        (private_http.1, private_http.2),
        (unknown_http.1, unknown_http.2)
    );
}

/// `Log.AppendSigned` is public (writers append through any node). A stranger who has a private
/// stream's id (a link, a revoked member) probes it with a scribe of its own key: the answer
/// must be the one for a stream the node does not hold, or the node confirms it holds the
/// private stream ("To anyone else the stream does not exist").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_append_does_not_confirm_that_a_private_stream_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(dir.path()).await;
    let stream = private_stream(&a, &[]).await;
    let unknown = StreamId::from_slice(&[0x6e; 32]).unwrap();
    let prober = client_key(131);
    let hlc = a.log.clock().now();
    let mut log = pb::log_client::LogClient::new(stranger_channel(&a.url()).await);
    let mut answers = Vec::new();
    for id in [stream, unknown] {
        let scribe = client_scribe(&prober, &id, "x.note", b"probe", hlc);
        answers.push(
            log.append_signed(signed_request(scribe.parts()))
                .await
                .unwrap_err(),
        );
    }
    let (private, not_held) = (&answers[0], &answers[1]);
    assert_eq!(
        private.code(),
        not_held.code(),
        "{private:?} / {not_held:?}"
    );
    assert_eq!(
        normalised(private.message(), &[stream, unknown]),
        normalised(not_held.message(), &[stream, unknown])
    );
}
