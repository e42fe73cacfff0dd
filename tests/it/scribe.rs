//! Property tests of the scribe bytes (invariants 1 and 2): encode → decode → encode is the identical
//! bytes, the id is stable, and any single flipped byte makes a scribe refused.

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use quire::pb;
use quire::projection_api::{AuthorKey, Kind, ScribeId};
use quire::scribe::{hash, Body, Scribe};

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::FilePut),
        Just(Kind::FileDelete),
        Just(Kind::RecordAdd),
        Just(Kind::RecordUpvote),
        Just(Kind::KvSet),
        Just(Kind::KvDelete),
        "x\\.[a-z0-9_.-]{1,20}".prop_map(Kind::Custom),
    ]
}

prop_compose! {
    fn body_and_key()(
        seed in any::<[u8; 32]>(),
        stream in any::<[u8; 32]>(),
        hlc in any::<u64>(),
        kind in kind(),
        content_type in "[a-z/+; =-]{0,40}",
        payload in proptest::collection::vec(any::<u8>(), 0..600),
        parents in proptest::collection::vec(any::<[u8; 32]>(), 0..4),
        nonce in any::<u64>(),
    ) -> (Body, SigningKey) {
        let key = SigningKey::from_bytes(&seed);
        let body = Body {
            stream: Some(ScribeId(stream)),
            author: AuthorKey(key.verifying_key().to_bytes()),
            hlc,
            kind,
            content_type,
            payload: Bytes::from(payload),
            parents: parents.into_iter().map(ScribeId).collect(),
            nonce,
        };
        (body, key)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn encode_decode_encode_is_identical_and_the_id_is_stable((body, key) in body_and_key()) {
        let signed = Scribe::sign(body.clone(), &key);
        let decoded = Scribe::decode(signed.bytes.clone()).unwrap();
        prop_assert_eq!(&decoded.body, &body);
        prop_assert_eq!(decoded.id, signed.id);
        prop_assert_eq!(decoded.id, hash(&signed.bytes));
        // Encoding the decoded fields again gives the same body and envelope bytes.
        prop_assert_eq!(&decoded.body.encode()[..], &signed.body_bytes[..]);
        let again = Scribe::sign(decoded.body.clone(), &key);
        prop_assert_eq!(&again.bytes, &signed.bytes);
        prop_assert_eq!(again.id, signed.id);
    }

    #[test]
    fn flipping_any_single_byte_makes_it_refused((body, key) in body_and_key(), position in any::<prop::sample::Index>(), mask in 1u8..=255) {
        let signed = Scribe::sign(body, &key);
        let mut tampered = signed.bytes.to_vec();
        let index = position.index(tampered.len());
        tampered[index] ^= mask;
        prop_assert!(Scribe::decode(Bytes::from(tampered)).is_err(), "flipping byte {} with {:#x} was accepted", index, mask);
    }

    #[test]
    fn any_garbage_is_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        prop_assert!(Scribe::decode(Bytes::from(bytes)).is_err());
    }
}

#[test]
fn a_genesis_has_no_stream_and_everything_else_has_one() {
    let key = SigningKey::from_bytes(&[4; 32]);
    let author = AuthorKey(key.verifying_key().to_bytes());
    let body = |stream, kind| Body {
        stream,
        author,
        hlc: 1,
        kind,
        content_type: String::new(),
        payload: Bytes::new(),
        parents: vec![],
        nonce: 0,
    };
    assert!(Scribe::decode(Scribe::sign(body(None, Kind::StreamCreate), &key).bytes).is_ok());
    assert!(Scribe::decode(
        Scribe::sign(body(Some(ScribeId([1; 32])), Kind::StreamCreate), &key).bytes
    )
    .is_err());
    assert!(Scribe::decode(Scribe::sign(body(None, Kind::RecordAdd), &key).bytes).is_err());
}

#[test]
fn a_non_canonical_body_is_refused_even_when_correctly_signed() {
    use ed25519_dalek::Signer;
    use prost::Message;
    let key = SigningKey::from_bytes(&[4; 32]);
    let good = crate::common::client_scribe(&key, &ScribeId([1; 32]), "x.a", b"p", 1);
    // The same fields with an unknown field appended, signed properly by the author.
    let mut body = good.body_bytes.to_vec();
    body.extend_from_slice(&[0x78, 0x01]); // field 15, varint 1
    let mut message = quire::scribe::SIGNING_PREFIX.to_vec();
    message.extend_from_slice(&body);
    let signature = key.sign(&message);
    let bytes = pb::Scribe {
        format: 1,
        body: Bytes::from(body),
        signature: Bytes::copy_from_slice(&signature.to_bytes()),
    }
    .encode_to_vec();
    let error = Scribe::decode(Bytes::from(bytes)).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("body is not canonically encoded"),
        "{error}"
    );
}

#[test]
fn work_tokens_computed_by_the_signer_verify() {
    let key = SigningKey::from_bytes(&[4; 32]);
    for bits in [1, 8, 12] {
        let body =
            crate::common::client_scribe(&key, &ScribeId([1; 32]), "record.add", b"{}", 1).body;
        let scribe = Scribe::sign_with_work(body, &key, bits);
        let decoded = Scribe::decode(scribe.bytes.clone()).unwrap();
        assert!(quire::scribe::leading_zero_bits(&decoded.body_hash) >= bits);
        assert_eq!(decoded.id, scribe.id);
    }
}

#[test]
fn other_formats_are_refused_with_a_clear_error() {
    use prost::Message;
    let key = SigningKey::from_bytes(&[4; 32]);
    let good = crate::common::client_scribe(&key, &ScribeId([1; 32]), "x.a", b"", 1);
    let envelope = pb::Scribe::decode(good.bytes.clone()).unwrap();
    let v2 = pb::Scribe {
        format: 2,
        ..envelope
    }
    .encode_to_vec();
    let error = Scribe::decode(Bytes::from(v2)).unwrap_err();
    assert!(
        error.to_string().contains("unsupported scribe format 2"),
        "{error}"
    );
}

#[test]
fn the_signature_is_domain_separated() {
    use ed25519_dalek::{Signer, Verifier};
    let key = SigningKey::from_bytes(&[4; 32]);
    let scribe = crate::common::client_scribe(&key, &ScribeId([1; 32]), "x.a", b"p", 1);
    let envelope = <pb::Scribe as prost::Message>::decode(scribe.bytes.clone()).unwrap();
    let signature = ed25519_dalek::Signature::from_slice(&envelope.signature).unwrap();
    // Not a signature over the bare body...
    assert!(key
        .verifying_key()
        .verify(&scribe.body_bytes, &signature)
        .is_err());
    // ...but over the prefix and the body.
    let mut message = b"quire.scribe.v1\0".to_vec();
    message.extend_from_slice(&scribe.body_bytes);
    assert!(key.verifying_key().verify(&message, &signature).is_ok());
    let _ = key.sign(b"");
}
