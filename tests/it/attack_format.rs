//! Scribe format 2 under attack: what a hostile client or a buggy peer can send, through every
//! route (`AppendSigned`, `AppendBatch` `signed` and `sealed`, the peer protocol), against the
//! Merkle proofs, the seal bytes, the envelope's canonical encoding, the detached payloads, the
//! work token and the store's column families. Each refusal is asserted with its status and words,
//! and with the log unchanged; the weaknesses that were found are pinned where they were fixed.

use std::collections::HashSet;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use prost::Message as _;
use quire::pb;
use quire::pb::peer_message::Message as Wire;
use quire::projection_api::{AuthorKey, Kind, ScribeId, StreamId};
use quire::scribe::{
    hash, leading_zero_bits, merkle, seal_all, sha256, Body, Parts, Proof, Scribe, Seal, Unsealed,
    MAX_SEAL_COUNT,
};
use tonic::Code;

use crate::common::*;
use crate::malicious::{wait_for_peer, Intruder};
use crate::replication::{connect, join, wait_for_count, CONVERGE};

/// Head and every stored entry: what a refusal must leave alone.
async fn snapshot(clients: &mut Clients) -> (u64, Vec<pb::Entry>) {
    (head(clients).await, read_all(clients).await)
}

fn unsealed(scribe: &Scribe) -> Unsealed {
    Unsealed {
        envelope: scribe.envelope.clone(),
        id: scribe.id,
        body: scribe.body.clone(),
        payload_sha256: scribe.payload_sha256,
    }
}

/// Scribes of `key` sealed together, in order.
fn sealed_together(scribes: &[&Scribe], key: &SigningKey) -> Vec<Scribe> {
    seal_all(scribes.iter().map(|scribe| unsealed(scribe)).collect(), key)
}

fn sealed_batch(scribes: &[Scribe]) -> pb::SealedBatch {
    pb::SealedBatch {
        scribes: scribes
            .iter()
            .map(|scribe| pb::Unsealed {
                envelope: scribe.envelope.clone(),
                payload: scribe.body.payload.clone(),
            })
            .collect(),
        seal: scribes[0].seal.bytes.clone(),
    }
}

/// A seal entry of a peer batch, without leaves (each scribe carries its proof).
fn peer_seal(seal: &Bytes) -> pb::PeerSeal {
    pb::PeerSeal {
        seal: seal.clone(),
        leaves: vec![],
    }
}

fn request(envelope: Bytes, payload: Bytes, seal: Bytes, proof: Proof) -> pb::AppendSignedRequest {
    signed_request(Parts {
        redacted_by: Default::default(),
        envelope,
        payload,
        seal,
        proof,
        leaves: None,
    })
}

/// A seal of one over exactly these envelope bytes.
fn seal_of_one(envelope: &[u8], key: &SigningKey) -> Bytes {
    Seal::sign(key, 1, merkle::leaf_hash(&hash(envelope))).bytes
}

fn raw_seal(author: &[u8], count: u64, root: &[u8], signature: &[u8]) -> Bytes {
    Bytes::from(
        pb::Seal {
            author: Bytes::copy_from_slice(author),
            count,
            root: Bytes::copy_from_slice(root),
            signature: Bytes::copy_from_slice(signature),
        }
        .encode_to_vec(),
    )
}

fn author_of(key: &SigningKey) -> AuthorKey {
    AuthorKey(key.verifying_key().to_bytes())
}

fn flip_last(bytes: &Bytes) -> Bytes {
    let mut flipped = bytes.to_vec();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    Bytes::from(flipped)
}

/// Sends `request` and asserts it is refused with `code` and words containing `needle`, and that
/// nothing of the log changed.
async fn assert_refused(
    clients: &mut Clients,
    name: &str,
    request: pb::AppendSignedRequest,
    code: Code,
    needle: &str,
) {
    let before = snapshot(clients).await;
    let status = clients.log.append_signed(request).await.expect_err(name);
    assert_eq!(status.code(), code, "{name}: {}", status.message());
    assert!(
        status.message().contains(needle),
        "{name}: {needle:?} not in {:?}",
        status.message()
    );
    assert_eq!(snapshot(clients).await, before, "{name} changed the log");
}

async fn assert_batch_refused(
    clients: &mut Clients,
    name: &str,
    batch: pb::AppendBatchRequest,
    code: Code,
    needles: &[&str],
) {
    let before = head(clients).await;
    let status = clients.log.append_batch(batch).await.expect_err(name);
    assert_eq!(status.code(), code, "{name}: {}", status.message());
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{name}: {needle:?} not in {:?}",
            status.message()
        );
    }
    assert_eq!(head(clients).await, before, "{name} stored something");
}

// ---------------------------------------------------------------------------------------------
// Merkle proofs

/// A proof cannot be bent to another index, another tree size or another seal, a seal's count
/// cannot be changed under its signature, and the root of one id is its leaf hash, not the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merkle_proofs_cannot_be_bent() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "merkle", None).await;
    let key = client_key(101);
    let hlc = node.log.clock().now();
    let [a, b, c, d] = ["a", "b", "c", "d"]
        .map(|text| client_scribe(&key, &stream, "x.note", text.as_bytes(), hlc));
    let pair = sealed_together(&[&a, &b], &key);
    let triple = sealed_together(&[&a, &b, &c], &key);
    let four = sealed_together(&[&a, &b, &c, &d], &key);
    let four_wire = pb::Seal::decode(four[0].seal.bytes.clone()).unwrap();
    let with_proof = |scribe: &Scribe, seal: &Bytes, proof: Proof| {
        request(
            scribe.envelope.clone(),
            scribe.body.payload.clone(),
            seal.clone(),
            proof,
        )
    };
    let pair_seal = pair[0].seal.bytes.clone();
    let triple_seal = triple[0].seal.bytes.clone();
    let pair_wire = pb::Seal::decode(pair_seal.clone()).unwrap();
    let triple_wire = pb::Seal::decode(triple_seal.clone()).unwrap();
    let author = key.verifying_key().to_bytes();
    let mut padded = pair[0].proof.clone();
    padded.siblings.push([0; 32]);
    let mut sixty_four = pair[0].proof.clone();
    sixty_four.siblings = vec![[7; 32]; 64];
    let cases: Vec<(&str, pb::AppendSignedRequest, &str)> = vec![
        (
            "a seal over two ids with the empty proof of a seal of one",
            with_proof(&a, &pair_seal, Proof::default()),
            "fewer than a tree of 2 needs",
        ),
        (
            "index = count",
            with_proof(
                &a,
                &pair_seal,
                Proof {
                    index: 2,
                    ..pair[0].proof.clone()
                },
            ),
            "proof index 2 is outside the seal's 2 ids",
        ),
        (
            "index u64::MAX",
            with_proof(
                &a,
                &pair_seal,
                Proof {
                    index: u64::MAX,
                    ..pair[0].proof.clone()
                },
            ),
            "is outside the seal's 2 ids",
        ),
        (
            "the other leaf's proof",
            with_proof(&a, &pair_seal, pair[1].proof.clone()),
            "does not lead to the seal's root",
        ),
        (
            "one sibling too many",
            with_proof(&a, &pair_seal, padded),
            "more than a tree of 2 has",
        ),
        (
            "64 siblings",
            with_proof(&a, &pair_seal, sixty_four),
            "more than a tree of 2 has",
        ),
        (
            "a tree-of-two proof under a seal of three",
            with_proof(&a, &triple_seal, pair[0].proof.clone()),
            "fewer than a tree of 3 needs",
        ),
        (
            "count and root of three under the signature of two",
            with_proof(
                &a,
                &raw_seal(&author, 3, &triple_wire.root, &pair_wire.signature),
                triple[0].proof.clone(),
            ),
            "bad signature",
        ),
        (
            // Leaf 0's path has the same shape in trees of 3 and of 4: only the signature, which
            // covers the count, tells them apart.
            "a seal of four claiming three, with a path that fits both",
            with_proof(
                &a,
                &raw_seal(&author, 3, &four_wire.root, &four_wire.signature),
                four[0].proof.clone(),
            ),
            "bad signature",
        ),
        (
            "a seal over the id itself instead of its leaf hash",
            with_proof(
                &a,
                &Seal::sign(&key, 1, *a.id.as_bytes()).bytes,
                Proof::default(),
            ),
            "does not lead to the seal's root",
        ),
        (
            "count 0",
            with_proof(
                &a,
                &raw_seal(&author, 0, &pair_wire.root, &pair_wire.signature),
                Proof::default(),
            ),
            "count must be 1 to 1048576, got 0",
        ),
        (
            "count 2^20 + 1",
            with_proof(
                &a,
                &raw_seal(
                    &author,
                    MAX_SEAL_COUNT + 1,
                    &pair_wire.root,
                    &pair_wire.signature,
                ),
                pair[0].proof.clone(),
            ),
            "count must be 1 to 1048576, got 1048577",
        ),
    ];
    for (name, request, needle) in cases {
        assert_refused(&mut clients, name, request, Code::InvalidArgument, needle).await;
    }
    // 65 siblings do not even decode as a proof.
    let mut request = with_proof(&a, &pair_seal, pair[0].proof.clone());
    request.proof = Some(pb::Proof {
        index: 0,
        siblings: vec![Bytes::from(vec![0u8; 32]); 65],
    });
    assert_refused(
        &mut clients,
        "65 siblings",
        request,
        Code::InvalidArgument,
        "proof of 65 siblings",
    )
    .await;
    // The honest proofs are taken: the refusals above were for what was bent, nothing else.
    for (scribe, proof, seal) in [
        (&a, pair[0].proof.clone(), &pair_seal),
        (&c, triple[2].proof.clone(), &triple_seal),
    ] {
        let reply = clients
            .log
            .append_signed(with_proof(scribe, seal, proof))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.id, bytes_of(&scribe.id));
        assert!(!reply.duplicate);
    }
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Seal bytes

/// A seal must be the canonical encoding of well-shaped fields, at most 256 bytes, by the
/// envelope's author; and a stored scribe re-sent under a forged seal is refused, not answered as
/// a duplicate (the signature is checked before the store is asked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seal_bytes_are_strict() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "seals", None).await;
    let key = client_key(102);
    let hlc = node.log.clock().now();
    let good = client_scribe(&key, &stream, "x.note", b"sealed", hlc);
    let other = client_scribe(&key, &stream, "x.note", b"another", hlc);
    let wire = pb::Seal::decode(good.seal.bytes.clone()).unwrap();
    let with_seal = |seal: Bytes| {
        request(
            good.envelope.clone(),
            good.body.payload.clone(),
            seal,
            Proof::default(),
        )
    };
    let canonical = good.seal.bytes.to_vec();
    let mut unknown_field = canonical.clone();
    unknown_field.extend_from_slice(&[0x28, 0x01]); // field 5, varint 1
    let mut repeated_count = canonical.clone();
    repeated_count.extend_from_slice(&[0x10, 0x01]); // count again
                                                     // count (field 2) = 1 as a two-byte varint.
    let mut long_varint = Vec::new();
    long_varint.extend_from_slice(&[0x0a, 0x20]);
    long_varint.extend_from_slice(&wire.author);
    long_varint.extend_from_slice(&[0x10, 0x81, 0x00, 0x1a, 0x20]);
    long_varint.extend_from_slice(&wire.root);
    long_varint.extend_from_slice(&[0x22, 0x40]);
    long_varint.extend_from_slice(&wire.signature);
    // signature (4) before root (3).
    let mut out_of_order = Vec::new();
    out_of_order.extend_from_slice(&[0x0a, 0x20]);
    out_of_order.extend_from_slice(&wire.author);
    out_of_order.extend_from_slice(&[0x10, 0x01, 0x22, 0x40]);
    out_of_order.extend_from_slice(&wire.signature);
    out_of_order.extend_from_slice(&[0x1a, 0x20]);
    out_of_order.extend_from_slice(&wire.root);
    let stranger = client_key(103);
    let cases: Vec<(&str, Bytes, &str)> = vec![
        (
            "an unknown field",
            Bytes::from(unknown_field),
            "seal is not canonically encoded",
        ),
        (
            "a field twice",
            Bytes::from(repeated_count),
            "seal is not canonically encoded",
        ),
        (
            "a non-minimal varint",
            Bytes::from(long_varint),
            "seal is not canonically encoded",
        ),
        (
            "fields out of order",
            Bytes::from(out_of_order),
            "seal is not canonically encoded",
        ),
        (
            "over 256 bytes",
            raw_seal(&wire.author, 1, &wire.root, &[0u8; 200]),
            "bytes is not a seal",
        ),
        (
            "a 63-byte signature",
            raw_seal(&wire.author, 1, &wire.root, &wire.signature[..63]),
            "signature must be 64 bytes, got 63",
        ),
        (
            "a 31-byte author",
            raw_seal(&wire.author[..31], 1, &wire.root, &wire.signature),
            "author must be a 32-byte Ed25519 key, got 31 bytes",
        ),
        (
            "a 31-byte root",
            raw_seal(&wire.author, 1, &wire.root[..31], &wire.signature),
            "root must be 32 bytes, got 31",
        ),
        (
            "empty",
            Bytes::from_static(b"\x08"),
            "malformed scribe: seal",
        ),
        (
            "a valid seal over the id by a key that is not the author",
            seal_of_one(&good.envelope, &stranger),
            "a scribe must be sealed by its author",
        ),
        (
            "the author's valid seal over another id",
            other.seal.bytes.clone(),
            "the seal does not cover scribe",
        ),
        (
            "a forged signature",
            flip_last(&good.seal.bytes),
            "bad signature",
        ),
    ];
    for (name, seal, needle) in cases {
        assert_refused(
            &mut clients,
            name,
            with_seal(seal),
            Code::InvalidArgument,
            needle,
        )
        .await;
    }
    clients
        .log
        .append_signed(with_seal(good.seal.bytes.clone()))
        .await
        .unwrap();
    assert_refused(
        &mut clients,
        "a stored scribe under a forged seal",
        with_seal(flip_last(&good.seal.bytes)),
        Code::InvalidArgument,
        "bad signature",
    )
    .await;
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Envelope bytes

/// Every envelope below is correctly sealed over its exact bytes: only the canonical-encoding and
/// shape rules can refuse it, and they do, with the status the protocol names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_bytes_are_canonical_and_shaped() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "envelopes", None).await;
    let key = client_key(104);
    let payload = Bytes::from_static(b"payload");
    let base = pb::Envelope {
        format: 2,
        stream: bytes_of(&stream),
        author: Bytes::copy_from_slice(&key.verifying_key().to_bytes()),
        hlc: node.log.clock().now(),
        kind: "x.note".into(),
        content_type: "text/plain".into(),
        parents: vec![],
        payload_sha256: Bytes::copy_from_slice(&sha256(&payload)),
        payload_len: payload.len() as u64,
        membership: Bytes::new(),
        nonce: 0,
    };
    let canonical = base.encode_to_vec();
    let with = |change: &dyn Fn(&mut pb::Envelope)| {
        let mut envelope = base.clone();
        change(&mut envelope);
        envelope.encode_to_vec()
    };
    let spliced = |prefix: &[u8], body: &[u8], suffix: &[u8]| {
        let mut bytes = prefix.to_vec();
        bytes.extend_from_slice(body);
        bytes.extend_from_slice(suffix);
        bytes
    };
    // nonce (11) before membership (10).
    let mut nonce_first = canonical.clone();
    nonce_first.extend_from_slice(&[0x58, 0x07, 0x52, 0x20]);
    nonce_first.extend_from_slice(&[5u8; 32]);
    assert_eq!(canonical[..2], [0x08, 0x02], "format leads");
    let cases: Vec<(&str, Vec<u8>, Bytes, Code, &str)> = vec![
        (
            "a 31-byte membership",
            with(&|envelope| envelope.membership = Bytes::from(vec![1u8; 31])),
            payload.clone(),
            Code::InvalidArgument,
            "membership must be 32 bytes, got 31",
        ),
        (
            "format 2 with an unknown field",
            spliced(&canonical, &[0x60, 0x01], &[]),
            payload.clone(),
            Code::InvalidArgument,
            "envelope is not canonically encoded",
        ),
        (
            "the nonce before membership",
            nonce_first,
            payload.clone(),
            Code::InvalidArgument,
            "envelope is not canonically encoded",
        ),
        (
            "a default field encoded (nonce 0)",
            spliced(&canonical, &[0x58, 0x00], &[]),
            payload.clone(),
            Code::InvalidArgument,
            "envelope is not canonically encoded",
        ),
        (
            "format twice",
            spliced(&[0x08, 0x02], &canonical, &[]),
            payload.clone(),
            Code::InvalidArgument,
            "envelope is not canonically encoded",
        ),
        (
            "format as a two-byte varint",
            spliced(&[0x08, 0x82, 0x00], &canonical[2..], &[]),
            payload.clone(),
            Code::InvalidArgument,
            "envelope is not canonically encoded",
        ),
        (
            "format 3",
            with(&|envelope| envelope.format = 3),
            payload.clone(),
            Code::InvalidArgument,
            "unsupported scribe format 3",
        ),
        (
            "over 4 KiB",
            with(&|envelope| envelope.membership = Bytes::from(vec![1u8; 5000])),
            payload.clone(),
            Code::InvalidArgument,
            "larger than the hard limit of 4096 bytes",
        ),
        (
            "a payload_len over 32 MiB",
            with(&|envelope| {
                envelope.payload_sha256 = Bytes::copy_from_slice(&sha256(b""));
                envelope.payload_len = (32 << 20) + 1;
            }),
            Bytes::new(),
            Code::ResourceExhausted,
            "payload of 33554433 bytes is larger than the hard limit",
        ),
        (
            "a genesis with a stream",
            with(&|envelope| envelope.kind = "stream.create".into()),
            payload.clone(),
            Code::InvalidArgument,
            "must have an empty stream field",
        ),
        (
            "a 31-byte parent",
            with(&|envelope| envelope.parents = vec![Bytes::from(vec![1u8; 31])]),
            payload.clone(),
            Code::InvalidArgument,
            "parent ids must be 32 bytes, got 31",
        ),
    ];
    for (name, envelope, payload, code, needle) in cases {
        let seal = seal_of_one(&envelope, &key);
        assert_refused(
            &mut clients,
            name,
            request(Bytes::from(envelope), payload, seal, Proof::default()),
            code,
            needle,
        )
        .await;
    }
    // The canonical bytes themselves are taken.
    let seal = seal_of_one(&canonical, &key);
    let reply = clients
        .log
        .append_signed(request(
            Bytes::from(canonical.clone()),
            payload,
            seal,
            Proof::default(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.id, bytes_of(&hash(&canonical)));
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Payloads

/// Payloads are stored once per SHA-256 across streams, but a scribe can only name a payload by
/// sending its bytes: naming another stream's payload by hash alone, or with a lying length, is
/// refused; the honest copy shares the stored bytes and each stream reads back its own scribes.
/// Empty payloads are payloads like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_is_never_claimed_by_its_hash_alone() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let first = create_stream(&mut clients, "first", None).await;
    let second = create_stream(&mut clients, "second", None).await;
    let secret = b"the bytes of a payload in the first stream";
    let original = clients
        .log
        .append(pb::AppendRequest {
            stream: bytes_of(&first),
            kind: "x.note".into(),
            content_type: "text/plain".into(),
            payload: Bytes::from_static(secret),
            parents: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let key = client_key(105);
    let hlc = node.log.clock().now();
    let copy = client_scribe(&key, &second, "x.note", secret, hlc);
    assert_eq!(copy.payload_sha256, sha256(secret));
    let sent_with = |payload: &[u8]| {
        request(
            copy.envelope.clone(),
            Bytes::copy_from_slice(payload),
            copy.seal.bytes.clone(),
            Proof::default(),
        )
    };
    let same_length = vec![b'x'; secret.len()];
    for (name, payload) in [
        ("no payload", &b""[..]),
        ("another payload of the same length", &same_length[..]),
        ("the payload cut short", &secret[..secret.len() - 1]),
    ] {
        assert_refused(
            &mut clients,
            name,
            sent_with(payload),
            Code::InvalidArgument,
            "payload does not match its envelope",
        )
        .await;
    }
    // A payload_len that lies by one, over the right bytes.
    let lying = pb::Envelope {
        payload_len: secret.len() as u64 + 1,
        ..pb::Envelope::decode(copy.envelope.clone()).unwrap()
    }
    .encode_to_vec();
    assert_refused(
        &mut clients,
        "payload_len one too many",
        request(
            Bytes::from(lying.clone()),
            Bytes::from_static(secret),
            seal_of_one(&lying, &key),
            Proof::default(),
        ),
        Code::InvalidArgument,
        &format!("the envelope names {} bytes", secret.len() + 1),
    )
    .await;
    let first_before = node.log.stream(&first).unwrap().record;
    // The honest copy is stored, sharing the payload.
    let stored = clients
        .log
        .append_signed(sent_with(secret))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(stored.id, original.id);
    assert_eq!(node.log.stream(&first).unwrap().record, first_before);
    let second_record = node.log.stream(&second).unwrap().record;
    assert_eq!(second_record.scribes, 2);
    // Empty payloads in both streams.
    let mut empties = Vec::new();
    for stream in [first, second] {
        let empty = client_scribe(&key, &stream, "x.note", b"", hlc);
        let reply = clients
            .log
            .append_signed(signed_request(empty.parts()))
            .await
            .unwrap()
            .into_inner();
        empties.push(reply.id);
    }
    for (id, payload, stream) in [
        (original.id, &secret[..], first),
        (stored.id, &secret[..], second),
        (empties[0].clone(), &b""[..], first),
        (empties[1].clone(), &b""[..], second),
    ] {
        let entry = clients
            .log
            .get(pb::GetScribeRequest { id })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&entry.payload[..], payload);
        assert_eq!(entry.stream, bytes_of(&stream));
        Scribe::decode(entry_parts(&entry)).unwrap();
    }
    // Each stream reads back only its own scribes.
    for stream in [first, second] {
        let mut read = clients
            .log
            .read(pb::ReadRequest {
                stream: bytes_of(&stream),
                from_seq: 0,
                limit: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut count = 0;
        while let Some(entry) = read.message().await.unwrap() {
            assert_eq!(entry.stream, bytes_of(&stream));
            Scribe::decode(entry_parts(&entry)).unwrap();
            count += 1;
        }
        assert_eq!(count, 3, "genesis, the secret, the empty one");
    }
    node.stop().await.unwrap();
}

/// A payload of exactly the 32 MiB hard limit is taken by a stream that allows it, read back and
/// replicated whole; a stream with the default limit refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_32_mib_payload_is_stored_read_and_replicated() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = start_node(dir_b.path()).await;
    let mut clients_a = clients(&a.url()).await;
    let big = pb::Policy {
        max_file_bytes: 32 << 20,
        max_stream_bytes: 128 << 20,
        ..Default::default()
    };
    let stream = create_stream(&mut clients_a, "big", Some(big)).await;
    let small = create_stream(&mut clients_a, "default", None).await;
    let key = client_key(106);
    let data: Vec<u8> = (0..32u32 << 20).map(|i| (i ^ (i >> 9)) as u8).collect();
    let hlc = a.log.clock().now();
    let scribe = client_scribe(&key, &stream, "x.blob", &data, hlc);
    let too_big = client_scribe(&key, &small, "x.blob", &data, hlc);
    let status = clients_a
        .log
        .append_signed(signed_request(too_big.parts()))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert!(
        status
            .message()
            .contains("over the limit of 10485760 bytes"),
        "{}",
        status.message()
    );
    let reply = clients_a
        .log
        .append_signed(signed_request(scribe.parts()))
        .await
        .unwrap()
        .into_inner();
    connect(&b, &a).await;
    join(&b, &stream).await;
    wait_for_count(&[&b], &stream, 2).await;
    let mut clients_b = clients(&b.url()).await;
    for clients in [&mut clients_a, &mut clients_b] {
        let entry = clients
            .log
            .get(pb::GetScribeRequest {
                id: reply.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(entry.payload.len(), 32 << 20);
        assert!(entry.payload == data);
        Scribe::decode(entry_parts(&entry)).unwrap();
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Batches

/// `AppendBatch` is one unit whichever item's seal is bad; a `SealedBatch` is checked against its
/// seal before any proof is computed (count, then every envelope), so garbage costs the node no
/// more than its own size; one envelope twice under one seal is one scribe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_refused_whole_and_checked_before_their_proofs_are_built() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "batches", None).await;
    let key = client_key(107);
    let hlc = node.log.clock().now();
    let [a, b] =
        ["a", "b"].map(|text| client_scribe(&key, &stream, "x.note", text.as_bytes(), hlc));
    let mut forged = b.parts();
    forged.seal = flip_last(&forged.seal);
    assert_batch_refused(
        &mut clients,
        "a good item and a forged one",
        pb::AppendBatchRequest {
            appends: vec![pb::AppendRequest {
                stream: bytes_of(&stream),
                kind: "x.node".into(),
                ..Default::default()
            }],
            signed: vec![signed_request(a.parts()), signed_request(forged)],
            sealed: vec![],
        },
        Code::InvalidArgument,
        &["item 2", "bad signature", "nothing of the batch was stored"],
    )
    .await;
    let pair = sealed_together(&[&a, &b], &key);
    let mut forged_pair = sealed_batch(&pair);
    forged_pair.seal = flip_last(&forged_pair.seal);
    assert_batch_refused(
        &mut clients,
        "a sealed batch under a forged seal",
        pb::AppendBatchRequest {
            sealed: vec![forged_pair],
            ..Default::default()
        },
        Code::InvalidArgument,
        &["item 0", "bad signature"],
    )
    .await;
    // The seal of the pair over three envelopes, and over one.
    let c = client_scribe(&key, &stream, "x.note", b"c", hlc);
    let mut three = sealed_batch(&[pair[0].clone(), pair[1].clone(), c.clone()]);
    three.seal = pair[0].seal.bytes.clone();
    assert_batch_refused(
        &mut clients,
        "a seal of two over three envelopes",
        pb::AppendBatchRequest {
            sealed: vec![three],
            ..Default::default()
        },
        Code::InvalidArgument,
        &["sealed[0]: the seal does not cover this batch: it seals 2 ids, the batch holds 3"],
    )
    .await;
    // Another author's envelope inside the batch.
    let stranger = client_scribe(&client_key(108), &stream, "x.note", b"s", hlc);
    let mixed = seal_all(
        vec![
            unsealed(&a),
            Unsealed {
                body: Body {
                    author: author_of(&key),
                    ..stranger.body.clone()
                },
                ..unsealed(&stranger)
            },
        ],
        &key,
    );
    assert_batch_refused(
        &mut clients,
        "another author's envelope under the seal",
        pb::AppendBatchRequest {
            sealed: vec![sealed_batch(&mixed)],
            ..Default::default()
        },
        Code::InvalidArgument,
        &["item 1", "a scribe must be sealed by its author"],
    )
    .await;
    assert_batch_refused(
        &mut clients,
        "an empty sealed batch",
        pb::AppendBatchRequest {
            sealed: vec![pb::SealedBatch {
                scribes: vec![],
                seal: pair[0].seal.bytes.clone(),
            }],
            ..Default::default()
        },
        Code::InvalidArgument,
        &["sealed[0]: a sealed batch needs at least one scribe"],
    )
    .await;
    // 2^20 + 1 envelopes of two bytes each on the wire.
    let empties = |count: usize| (0..count).map(|_| pb::Unsealed::default()).collect();
    let author = key.verifying_key().to_bytes();
    assert_batch_refused(
        &mut clients,
        "more scribes than a seal may cover",
        pb::AppendBatchRequest {
            sealed: vec![pb::SealedBatch {
                scribes: empties(MAX_SEAL_COUNT as usize + 1),
                seal: pair[0].seal.bytes.clone(),
            }],
            ..Default::default()
        },
        Code::InvalidArgument,
        &["a sealed batch holds at most 1048576 scribes, got 1048577"],
    )
    .await;
    // A million empty envelopes under a seal that claims a million ids: before the checks, the
    // node built a gigabyte of audit paths for this two-megabyte request before it looked at an
    // envelope. Now the first envelope refuses it.
    assert_batch_refused(
        &mut clients,
        "a million empty envelopes",
        pb::AppendBatchRequest {
            sealed: vec![pb::SealedBatch {
                scribes: empties(MAX_SEAL_COUNT as usize),
                seal: raw_seal(&author, MAX_SEAL_COUNT, &[0; 32], &[0; 64]),
            }],
            ..Default::default()
        },
        Code::InvalidArgument,
        &["sealed[0]: scribes[0]: unsupported scribe format 0"],
    )
    .await;
    assert_batch_refused(
        &mut clients,
        "garbage under a seal of one",
        pb::AppendBatchRequest {
            sealed: vec![pb::SealedBatch {
                scribes: empties(1000),
                seal: pair[0].seal.bytes.clone(),
            }],
            ..Default::default()
        },
        Code::InvalidArgument,
        &["it seals 2 ids, the batch holds 1000 scribes"],
    )
    .await;
    // One envelope twice under one seal: one scribe, the second answer a duplicate of the first.
    let twice = sealed_together(&[&c, &c], &key);
    let before = head(&mut clients).await;
    let results = clients
        .log
        .append_batch(pb::AppendBatchRequest {
            sealed: vec![sealed_batch(&twice)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 2);
    assert_eq!(results[0].id, results[1].id);
    assert_eq!(results[0].seq, results[1].seq);
    assert!(!results[0].duplicate && results[1].duplicate);
    assert_eq!(head(&mut clients).await, before + 1);
    node.stop().await.unwrap();
}

/// A seal authorises each scribe it covers, not the batch as a whole: a batch refused for one
/// item can still have its other items admitted one by one, with their proofs, by anyone who saw
/// the seal (here over `AppendSigned`; a peer does the same). An author who needs all-or-nothing
/// must not rely on the seal for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seal_is_not_a_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "no transaction", None).await;
    let key = client_key(109);
    let hlc = node.log.clock().now();
    let allowed = client_scribe(&key, &stream, "x.note", b"half of a pair", hlc);
    let forbidden = client_scribe(&key, &stream, "file.put", b"not the owner", hlc);
    let pair = sealed_together(&[&allowed, &forbidden], &key);
    assert_batch_refused(
        &mut clients,
        "the pair",
        pb::AppendBatchRequest {
            sealed: vec![sealed_batch(&pair)],
            ..Default::default()
        },
        Code::PermissionDenied,
        &["item 1"],
    )
    .await;
    let reply = clients
        .log
        .append_signed(signed_request(pair[0].parts()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.id, bytes_of(&allowed.id));
    assert!(!reply.duplicate);
    node.stop().await.unwrap();
}

/// A node-signed seal covers every node-signed scribe of its group, whatever their streams: a
/// reader of one stream gets the group's size and the leaf hashes of other streams' scribes in its
/// proof. Harmless while every stream is readable by everyone; it matters once streams have
/// access rules (issue 15).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_signed_seal_spans_the_streams_of_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let one = create_stream(&mut clients, "one", None).await;
    let two = create_stream(&mut clients, "two", None).await;
    let append = |stream: &StreamId, text: &str| pb::AppendRequest {
        stream: bytes_of(stream),
        kind: "x.note".into(),
        payload: Bytes::from(text.to_string()),
        ..Default::default()
    };
    let results = clients
        .log
        .append_batch(pb::AppendBatchRequest {
            appends: vec![append(&one, "mine"), append(&two, "someone else's")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let entry = clients
        .log
        .get(pb::GetScribeRequest {
            id: results[0].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let scribe = Scribe::decode(entry_parts(&entry)).unwrap();
    assert_eq!(scribe.seal.count, 2);
    let other = ScribeId::from_slice(&results[1].id).unwrap();
    assert_eq!(scribe.proof.siblings, vec![merkle::leaf_hash(&other)]);
    node.stop().await.unwrap();
}

/// Node-signed scribes are sealed in trees no larger than the format allows. One `AppendBatch` of
/// 2^20 + 1 appends (45 MB on the wire) used to be sealed under one seal of count 2^20 + 1, which
/// every node, this one included (`quire verify`), refuses: the whole batch was stored but could
/// never replicate. This drives the very function the signer seals each group with;
/// `a_node_signed_batch_over_the_seal_limit_verifies_everywhere` below does the same through a node (about
/// 100 s and several GB, so it is run on demand).
#[test]
fn node_signed_groups_are_sealed_in_trees_the_format_accepts() {
    let key = client_key(110);
    let count = MAX_SEAL_COUNT as usize + 1;
    let stream = ScribeId([1; 32]);
    let envelopes: Vec<Unsealed> = (0..count)
        .map(|index| {
            Body {
                stream: Some(stream),
                author: author_of(&key),
                hlc: index as u64,
                kind: "x.a".parse::<Kind>().unwrap(),
                content_type: String::new(),
                payload: Bytes::new(),
                parents: vec![],
                membership: None,
                nonce: 0,
            }
            .into_unsealed(0)
        })
        .collect();
    let sealed = seal_all(envelopes, &key);
    assert_eq!(sealed.len(), count);
    let seals: HashSet<[u8; 32]> = sealed.iter().map(|scribe| scribe.seal.id).collect();
    assert_eq!(seals.len(), 2, "one seal per 2^20 ids");
    for scribe in [&sealed[0], &sealed[count - 2], &sealed[count - 1]] {
        Scribe::decode(scribe.parts()).expect("every scribe verifies");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "about 100 s and 4 GB: run with --ignored"]
async fn a_node_signed_batch_over_the_seal_limit_verifies_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let room = pb::Policy {
        max_stream_bytes: 1 << 30,
        ..Default::default()
    };
    let stream = create_stream(&mut clients, "large", Some(room)).await;
    let appends = (0..MAX_SEAL_COUNT + 1)
        .map(|_| pb::AppendRequest {
            stream: bytes_of(&stream),
            kind: "x.a".into(),
            ..Default::default()
        })
        .collect();
    let results = clients
        .log
        .append_batch(pb::AppendBatchRequest {
            appends,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    for result in [&results[0], results.last().unwrap()] {
        let entry = clients
            .log
            .get(pb::GetScribeRequest {
                id: result.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        Scribe::decode(entry_parts(&entry)).expect("every node accepts the seal");
    }
    node.stop().await.unwrap();
}

/// Jobs the signer groups together (verifying each distinct seal once for all of them) keep their
/// own outcomes: good scribes among forged ones, a scribe whose seal is shared with a job sending
/// a wrong proof, and node-signed appends, all at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_grouped_together_keep_their_own_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "grouped", None).await;
    let key = client_key(111);
    let hlc = node.log.clock().now();
    let before = head(&mut clients).await;
    // (request, expected refusal).
    let mut jobs: Vec<(pb::AppendSignedRequest, Option<&'static str>)> = Vec::new();
    for index in 0..30 {
        let scribe = client_scribe(
            &key,
            &stream,
            "x.note",
            format!("job {index}").as_bytes(),
            hlc,
        );
        if index % 2 == 0 {
            jobs.push((signed_request(scribe.parts()), None));
        } else {
            let mut forged = scribe.parts();
            forged.seal = flip_last(&forged.seal);
            jobs.push((signed_request(forged), Some("bad signature")));
        }
    }
    for index in 0..10 {
        let [p, q] = ["p", "q"].map(|name| {
            client_scribe(
                &key,
                &stream,
                "x.note",
                format!("{name} {index}").as_bytes(),
                hlc,
            )
        });
        let pair = sealed_together(&[&p, &q], &key);
        jobs.push((signed_request(pair[0].parts()), None));
        let mut wrong = pair[1].parts();
        wrong.proof = pair[0].proof.clone();
        jobs.push((signed_request(wrong), Some("does not cover")));
    }
    let good = jobs.iter().filter(|(_, refusal)| refusal.is_none()).count() as u64;
    let mut tasks = Vec::new();
    for (request, refusal) in jobs {
        let mut log = clients.log.clone();
        tasks.push(tokio::spawn(async move {
            (log.append_signed(request).await, refusal)
        }));
    }
    for index in 0..20 {
        let mut log = clients.log.clone();
        tasks.push(tokio::spawn(async move {
            let reply = log
                .append(pb::AppendRequest {
                    stream: bytes_of(&stream),
                    kind: "x.node".into(),
                    payload: Bytes::from(format!("node {index}")),
                    ..Default::default()
                })
                .await;
            (reply, None)
        }));
    }
    for task in tasks {
        let (reply, refusal) = task.await.unwrap();
        match (reply, refusal) {
            (Ok(reply), None) => {
                let entry = clients
                    .log
                    .get(pb::GetScribeRequest {
                        id: reply.into_inner().id,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                Scribe::decode(entry_parts(&entry)).unwrap();
            }
            (Err(status), Some(words)) => {
                assert_eq!(status.code(), Code::InvalidArgument);
                assert!(status.message().contains(words), "{}", status.message());
            }
            (reply, refusal) => panic!("expected {refusal:?}, got {reply:?}"),
        }
    }
    assert_eq!(head(&mut clients).await, before + good + 20);
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Work tokens

/// A `record.add` without its work token is refused on every route; a solved envelope re-sealed
/// by a peer is the stored scribe, not a second record; the node's own record.add carries the work;
/// a policy cannot ask for more than 24 bits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_takes_a_record_with_too_little_work() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let policy = pb::Policy {
        work_bits: 16,
        ..Default::default()
    };
    let stream = create_stream(&mut clients, "work", Some(policy)).await;
    let key = client_key(112);
    let record = br#"{"_table":"t","n":1}"#;
    let mut hlc = node.log.clock().now();
    let lazy = loop {
        let scribe = client_scribe(&key, &stream, "record.add", record, hlc);
        if leading_zero_bits(scribe.id.as_bytes()) < 16 {
            break scribe;
        }
        hlc += 1;
    };
    assert_refused(
        &mut clients,
        "AppendSigned",
        signed_request(lazy.parts()),
        Code::PermissionDenied,
        "must start with 16 zero bits",
    )
    .await;
    assert_batch_refused(
        &mut clients,
        "AppendBatch.signed",
        pb::AppendBatchRequest {
            signed: vec![signed_request(lazy.parts())],
            ..Default::default()
        },
        Code::PermissionDenied,
        &["must start with 16 zero bits"],
    )
    .await;
    let note = client_scribe(&key, &stream, "x.note", b"cover", hlc);
    assert_batch_refused(
        &mut clients,
        "AppendBatch.sealed",
        pb::AppendBatchRequest {
            sealed: vec![sealed_batch(&sealed_together(&[&note, &lazy], &key))],
            ..Default::default()
        },
        Code::PermissionDenied,
        &["item 1", "must start with 16 zero bits"],
    )
    .await;
    // The node's own record.add carries the work.
    let own = clients
        .log
        .append(pb::AppendRequest {
            stream: bytes_of(&stream),
            kind: "record.add".into(),
            content_type: "application/json".into(),
            payload: Bytes::from_static(record),
            parents: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let own_id: [u8; 32] = own.id[..].try_into().unwrap();
    assert!(leading_zero_bits(&own_id) >= 16);
    // A solved envelope, stored once.
    let solved = Scribe::sign_with_work(lazy.body.clone(), &key, 16);
    clients
        .log
        .append_signed(signed_request(solved.parts()))
        .await
        .unwrap();
    // Over replication: the lazy one is refused; the solved one under a new seal is a duplicate.
    let intruder = intrude(&node, client_key(113), &stream).await;
    let resealed = sealed_together(&[&note, &solved], &key);
    let scribes = vec![lazy.parts(), resealed[0].parts(), resealed[1].parts()];
    let held = node.log.stream(&stream).unwrap().record.scribes;
    intruder
        .send(Wire::Batch(peer_batch(&stream, &scribes)))
        .await;
    let peer = wait_for_peer(&node, &client_key(113), |peer| {
        peer.streams
            .first()
            .is_some_and(|counters| counters.received + counters.duplicates + counters.refused == 3)
    })
    .await;
    let counters = &peer.streams[0];
    assert_eq!(
        (counters.received, counters.duplicates, counters.refused),
        (1, 1, 1),
        "the cover note new, the solved record a duplicate, the lazy one refused"
    );
    assert_eq!(node.log.stream(&stream).unwrap().record.scribes, held + 1);
    // At most 24 bits.
    let status = clients
        .streams
        .create(pb::CreateStreamRequest {
            name: "too much".into(),
            policy: Some(pb::Policy {
                work_bits: 25,
                ..Default::default()
            }),
            owner: Bytes::new(),
            access: None,
            retention: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("work_bits 25 is over the most allowed, 24"),
        "{}",
        status.message()
    );
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Peers

/// An intruder with `key`, connected to `node`, asked for `stream`.
async fn intrude(node: &quire::node::RunningNode, key: SigningKey, stream: &StreamId) -> Intruder {
    let mut intruder = Intruder::connect(node.peer_addr.unwrap(), key, true).await;
    intruder.offer(stream).await;
    intruder
}

/// A batch of `scribes` with each distinct seal once.
fn peer_batch(stream: &StreamId, scribes: &[Parts]) -> pb::PeerBatch {
    let mut seals: Vec<pb::PeerSeal> = Vec::new();
    let scribes: Vec<pb::PeerScribe> = scribes
        .iter()
        .enumerate()
        .map(|(index, parts)| {
            let seal = match seals.iter().position(|seal| seal.seal == parts.seal) {
                Some(seal) => seal,
                None => {
                    seals.push(peer_seal(&parts.seal));
                    seals.len() - 1
                }
            };
            pb::PeerScribe {
                redacted_by: Default::default(),
                seq: index as u64 + 1,
                id: bytes_of(&hash(&parts.envelope)),
                envelope: parts.envelope.clone(),
                payload: parts.payload.clone(),
                seal: seal as u32,
                proof: Some(parts.proof.to_proto()),
            }
        })
        .collect();
    let through = scribes.len() as u64;
    pb::PeerBatch {
        stream: bytes_of(stream),
        scribes,
        through_seq: through,
        head_seq: through,
        seals,
    }
}

/// A peer's batch is judged scribe by scribe, each referenced seal verified for the scribes that
/// name it: unreferenced seals cost nothing and count for nothing; a forged seal refuses only its
/// own scribes; a batch longer than the protocol allows closes the connection before any of it is
/// verified; many scribes under one forged seal all count, and get the peer banned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_batch_is_judged_scribe_by_scribe_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "peer batches", None).await;
    let peer_key = client_key(114);
    let author = client_key(115);
    let hlc = node.log.clock().now();
    let note = |text: &str| client_scribe(&author, &stream, "x.note", text.as_bytes(), hlc);
    let mut intruder = intrude(&node, peer_key.clone(), &stream).await;

    // One scribe naming the last of 10,000 seals; the 9,999 others are forged.
    let lonely = note("lonely");
    let mut batch = peer_batch(&stream, &[lonely.parts()]);
    let forged_seal = flip_last(&lonely.seal.bytes);
    batch.seals = vec![peer_seal(&forged_seal); 9_999];
    batch.seals.push(peer_seal(&lonely.seal.bytes));
    batch.scribes[0].seal = 9_999;
    intruder.send(Wire::Batch(batch)).await;
    wait_until(CONVERGE, "the lonely scribe", || {
        let stored = node.log.stream(&stream).unwrap().record.scribes == 2;
        async move { stored }
    })
    .await;
    let peer = wait_for_peer(&node, &peer_key, |peer| {
        peer.streams
            .first()
            .is_some_and(|counters| counters.received == 1)
    })
    .await;
    assert_eq!(
        peer.refused, 0,
        "an unreferenced forged seal is never judged"
    );

    // A good scribe, a forged one, and two sealed together.
    let (good, forged) = (note("good"), note("forged"));
    let mut forged_parts = forged.parts();
    forged_parts.seal = flip_last(&forged_parts.seal);
    let (c, d) = (note("c"), note("d"));
    let together = sealed_together(&[&c, &d], &author);
    let mut batch = peer_batch(
        &stream,
        &[
            good.parts(),
            forged_parts,
            together[0].parts(),
            together[1].parts(),
        ],
    );
    for scribe in &mut batch.scribes {
        scribe.seq += 1;
    }
    batch.through_seq += 1;
    intruder.send(Wire::Batch(batch)).await;
    let peer = wait_for_peer(&node, &peer_key, |peer| peer.refused == 1).await;
    assert_eq!(peer.streams[0].received, 4, "lonely, good, c and d");
    assert_eq!(node.log.stream(&stream).unwrap().record.scribes, 5);

    // 513 scribes: a protocol error, nothing of it judged or stored.
    let many: Vec<Parts> = (0..513)
        .map(|index| {
            let mut parts = note(&format!("many {index}")).parts();
            parts.seal = flip_last(&parts.seal);
            parts
        })
        .collect();
    intruder.send(Wire::Batch(peer_batch(&stream, &many))).await;
    let error = intruder.error().await;
    assert!(
        error.contains("protocol error: a batch of 513 scribes; at most 512 allowed"),
        "{error}"
    );
    let peer = wait_for_peer(&node, &peer_key, |peer| !peer.connected).await;
    assert_eq!(peer.refused, 1, "none of the 513 was verified or counted");
    assert_eq!(node.log.stream(&stream).unwrap().record.scribes, 5);

    // 100 scribes under one forged seal (verified once) are 100 refusals: disconnected, banned.
    let shared_key = client_key(116);
    let mut intruder = intrude(&node, shared_key.clone(), &stream).await;
    let envelopes: Vec<Scribe> = (0..100)
        .map(|index| note(&format!("shared {index}")))
        .collect();
    let sealed = sealed_together(&envelopes.iter().collect::<Vec<_>>(), &author);
    let forged_shared = flip_last(&sealed[0].seal.bytes);
    let parts: Vec<Parts> = sealed
        .iter()
        .map(|scribe| Parts {
            seal: forged_shared.clone(),
            ..scribe.parts()
        })
        .collect();
    let batch = peer_batch(&stream, &parts);
    assert_eq!(batch.seals.len(), 1);
    intruder.send(Wire::Batch(batch)).await;
    let error = intruder.error().await;
    assert!(
        error.contains("peer sent 100 invalid scribes on this connection"),
        "{error}"
    );
    assert_eq!(node.log.stream(&stream).unwrap().record.scribes, 5);
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Storage

fn open_db(dir: &std::path::Path) -> rocksdb::DB {
    let options = rocksdb::Options::default();
    let path = dir.join("db");
    let families = rocksdb::DB::list_cf(&options, &path).unwrap();
    rocksdb::DB::open_cf(&options, &path, families).unwrap()
}

fn column_families(dir: &std::path::Path) -> Vec<String> {
    let mut families = rocksdb::DB::list_cf(&rocksdb::Options::default(), dir.join("db")).unwrap();
    families.sort();
    families
}

/// A format-2 directory that lost a column family is damaged, not "another format": it is refused
/// with the missing family named (it used to say "storage format 2, this quire reads format 2"),
/// by `serve` and by `verify`, and left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_2_directory_missing_a_column_family_is_refused_as_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "partial", None).await;
    append_note(&mut clients, &stream, "note").await;
    node.stop().await.unwrap();
    open_db(dir.path()).drop_cf("seals").unwrap();
    let families = column_families(dir.path());
    let error = quire::node::RunningNode::start(
        quire::node::NodeConfig::new(dir.path()),
        "127.0.0.1:0".parse().unwrap(),
        Some("127.0.0.1:0".parse().unwrap()),
    )
    .await
    .expect_err("the node refuses the directory")
    .to_string();
    assert!(
        error.contains("storage format 2 but lacks its column families seals"),
        "{error}"
    );
    assert!(!error.contains("reads format 2"), "{error}");
    // `quire verify` (its library function: the `quire` binary in a shared target directory may
    // be another checkout's).
    let error = quire::verify::verify(dir.path())
        .expect_err("verify refuses the directory")
        .to_string();
    assert!(error.contains("lacks its column families seals"), "{error}");
    assert_eq!(column_families(dir.path()), families, "nothing was changed");
}

/// A payload or a seal missing from its column family (damage today; a dropped payload one day,
/// issue 18): `Get` and `Read` fail with the missing key named instead of serving anything else,
/// `quire verify` reports the scribes, and replication keeps sending the node's other streams.
/// (It used to close the peer connection on every attempt to read the damaged stream, so a peer
/// never received the streams served after it either.) The damaged stream stops at the batch that
/// holds the damage: there is no way yet to send a scribe without its payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_payload_or_seal_is_reported_and_stops_only_its_stream() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let mut clients_a = clients(&a.url()).await;
    let x = create_stream(&mut clients_a, "x", None).await;
    let y = create_stream(&mut clients_a, "y", None).await;
    // The damaged stream is the one served first (streams are served in id order).
    let (damaged, healthy) = if x < y { (x, y) } else { (y, x) };
    // Over 1 KiB, so it is stored apart from its envelope, in `payloads`.
    let lost_text = format!("payload to lose {}", "x".repeat(2000));
    let lost_payload = append_note(&mut clients_a, &damaged, &lost_text).await;
    let lost_seal = append_note(&mut clients_a, &damaged, "seal to lose").await;
    append_note(&mut clients_a, &damaged, "after").await;
    for index in 0..3 {
        append_note(&mut clients_a, &healthy, &format!("healthy {index}")).await;
    }
    let seal_entry = clients_a
        .log
        .get(pb::GetScribeRequest {
            id: lost_seal.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let seal_id = sha256(&seal_entry.seal);
    let payload_id = sha256(lost_text.as_bytes());
    a.stop().await.unwrap();
    {
        let db = open_db(dir_a.path());
        db.delete_cf(db.cf_handle("payloads").unwrap(), payload_id)
            .unwrap();
        db.delete_cf(db.cf_handle("seals").unwrap(), seal_id)
            .unwrap();
    }
    let a = start_node(dir_a.path()).await;
    let mut clients_a = clients(&a.url()).await;
    for (id, missing) in [
        (
            &lost_payload.id,
            format!("payload {} is not stored", hex::encode(payload_id)),
        ),
        (
            &lost_seal.id,
            format!("seal {} is not stored", hex::encode(seal_id)),
        ),
    ] {
        let status = clients_a
            .log
            .get(pb::GetScribeRequest { id: id.clone() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Internal, "{}", status.message());
        assert!(status.message().contains(&missing), "{}", status.message());
    }
    let mut read = clients_a
        .log
        .read(pb::ReadRequest {
            stream: bytes_of(&damaged),
            from_seq: 0,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let status = read.message().await.unwrap_err();
    assert!(
        status.message().contains("is not stored"),
        "{}",
        status.message()
    );
    // `quire verify` (its library function: the `quire` binary in a shared target directory may
    // be another checkout's).
    let report = quire::verify::verify(dir_a.path()).unwrap();
    // Besides these two, the damaged stream's counters are reported as differing from the log's
    // (verify cannot count a scribe it could not read), and the payload's index names it as
    // missing.
    assert_eq!(report.damage.len(), 4, "{:?}", report.damage);
    assert!(
        report.damage.iter().any(|line| line.contains(&format!(
            "names payload {}, which is not stored",
            hex::encode(payload_id)
        ))),
        "{:?}",
        report.damage
    );
    for (seq, missing) in [
        (
            lost_payload.seq,
            format!("payload {} is not stored", hex::encode(payload_id)),
        ),
        (
            lost_seal.seq,
            format!("seal {} is not stored", hex::encode(seal_id)),
        ),
    ] {
        assert!(
            report
                .damage
                .iter()
                .any(|line| line.starts_with(&format!("seq {seq} (")) && line.contains(&missing)),
            "seq {seq}: {:?}",
            report.damage
        );
    }

    let b = start_node(dir_b.path()).await;
    connect(&b, &a).await;
    join(&b, &damaged).await;
    join(&b, &healthy).await;
    wait_for_count(&[&b], &healthy, 4).await;
    append_note(&mut clients_a, &healthy, "live").await;
    wait_for_count(&[&b], &healthy, 5).await;
    // A tells its operator why it holds the stream back from B.
    let b_id = b.log.node_key().to_hex();
    let mut admin = clients_a.admin.clone();
    wait_until(CONVERGE, "A to report the damaged stream", || {
        let mut admin = admin.clone();
        let b_id = b_id.clone();
        async move {
            admin
                .status(pb::StatusRequest::default())
                .await
                .unwrap()
                .into_inner()
                .peers
                .iter()
                .any(|peer| peer.node_id == b_id && peer.last_error.contains("is not stored"))
        }
    })
    .await;
    let status = admin
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let peer = status
        .peers
        .iter()
        .find(|peer| peer.node_id == b_id)
        .unwrap();
    assert!(peer.connected, "the connection stays up");
    assert_eq!(peer.connects, 1, "and was never dropped for it");
    assert_eq!(
        b.log.stream(&damaged).unwrap().record.scribes,
        1,
        "only the genesis: the first batch holds the damage"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
