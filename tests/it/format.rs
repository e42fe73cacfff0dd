//! Scribe format 2 end to end: one envelope is one scribe however it is sealed (over the API and
//! over replication), payloads are stored once per hash, a client-sealed batch is admitted exactly
//! as sealed, and a data directory of format 1 is refused on open and left as it was.

use std::process::Command;

use bytes::Bytes;
use quire::pb;
use quire::projection_api::StreamId;
use quire::scribe::{seal_all, Scribe, Unsealed};
use tonic::Code;

use crate::common::*;
use crate::replication::{connect, join, stream_ids, wait_for_count};

/// A `SealedBatch` of `scribes`, all sealed once by their author.
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

fn unsealed(scribe: &Scribe) -> Unsealed {
    Unsealed {
        envelope: scribe.envelope.clone(),
        id: scribe.id,
        body: scribe.body.clone(),
        payload_sha256: scribe.payload_sha256,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resealing_a_solved_envelope_is_the_same_scribe_over_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let policy = pb::Policy {
        work_bits: 10,
        ..Default::default()
    };
    let stream = create_stream(&mut clients, "work", Some(policy)).await;
    let key = client_key(21);
    let hlc = node.log.clock().now();
    let body = client_scribe(&key, &stream, "record.add", br#"{"_table":"t"}"#, hlc).body;
    // Solved once, sealed alone.
    let solved = Scribe::sign_with_work(body, &key, 10);
    let first = clients
        .log
        .append_signed(signed_request(solved.parts()))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.duplicate);
    let head = node.log.head();
    // The same solved envelope under fresh seals, alone and inside a batch: no new record.
    let other = client_scribe(&key, &stream, "x.note", b"other", hlc + 1);
    let batch = seal_all(vec![unsealed(&other), unsealed(&solved)], &key);
    assert_ne!(batch[1].seal.bytes, solved.seal.bytes);
    assert_eq!(batch[1].id, solved.id);
    let replies = clients
        .log
        .append_batch(pb::AppendBatchRequest {
            appends: vec![],
            signed: vec![],
            sealed: vec![sealed_batch(&batch)],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(replies.len(), 2);
    assert!(!replies[0].duplicate);
    assert!(
        replies[1].duplicate,
        "the re-sealed envelope is the stored scribe"
    );
    assert_eq!(replies[1].id, bytes_of(&solved.id));
    assert_eq!(replies[1].seq, first.seq);
    assert_eq!(node.log.head(), head + 1, "only the other envelope was new");
    // A seal over two ids does not admit a batch of one of them, nor the two in another order.
    let before = node.log.head();
    for scribes in [
        vec![batch[0].clone()],
        vec![batch[1].clone(), batch[0].clone()],
    ] {
        let mut request = sealed_batch(&scribes);
        request.seal = batch[0].seal.bytes.clone();
        let status = clients
            .log
            .append_batch(pb::AppendBatchRequest {
                sealed: vec![request],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().contains("does not cover"),
            "{}",
            status.message()
        );
    }
    assert_eq!(node.log.head(), before);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resealing_is_the_same_scribe_over_replication() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = start_node(dir_b.path()).await;
    let mut clients_a = clients(&a.url()).await;
    let mut clients_b = clients(&b.url()).await;
    let stream = create_stream(&mut clients_a, "resealed", None).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    let key = client_key(22);
    let hlc = a.log.clock().now();
    let x = client_scribe(&key, &stream, "x.note", b"x", hlc);
    let y = client_scribe(&key, &stream, "x.note", b"y", hlc + 1);
    // A holds X sealed alone; B holds X and Y sealed together.
    clients_a
        .log
        .append_signed(signed_request(x.parts()))
        .await
        .unwrap();
    let together = seal_all(vec![unsealed(&x), unsealed(&y)], &key);
    clients_b
        .log
        .append_batch(pb::AppendBatchRequest {
            sealed: vec![sealed_batch(&together)],
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for_count(&[&a, &b], &stream, 3).await;
    let mut ids_a = stream_ids(&a, &stream).await;
    let mut ids_b = stream_ids(&b, &stream).await;
    ids_a.sort();
    ids_b.sort();
    assert_eq!(ids_a, ids_b);
    assert_eq!(ids_a.len(), 3, "genesis, X once, Y");
    // Each node keeps the seal it first stored X with (B may have had it from A before its own
    // batch arrived); whichever it is, it verifies.
    for clients in [&mut clients_a, &mut clients_b] {
        let entry = clients
            .log
            .get(pb::GetScribeRequest {
                id: bytes_of(&x.id),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(entry.seal == x.seal.bytes || entry.seal == together[0].seal.bytes);
        Scribe::decode(entry_parts(&entry)).unwrap();
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_file_in_two_streams_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let first = create_stream(&mut clients, "one", None).await;
    let second = create_stream(&mut clients, "two", None).await;
    let data: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let (kind, payload) = quire::projection_api::files::FileChange::Put {
        path: "big.bin".into(),
        content_type: "application/octet-stream".into(),
        data,
    }
    .encode();
    let put = |stream: StreamId| pb::AppendRequest {
        stream: bytes_of(&stream),
        kind: kind.as_str().into(),
        content_type: quire::projection_api::files::CONTENT_TYPE.into(),
        payload: Bytes::from(payload.clone()),
        parents: vec![],
    };
    let empty = node.log.store().payload_bytes();
    let one = clients.log.append(put(first)).await.unwrap().into_inner();
    let after_one = node.log.store().payload_bytes();
    let two = clients.log.append(put(second)).await.unwrap().into_inner();
    let after_two = node.log.store().payload_bytes();
    assert_ne!(one.id, two.id, "two scribes");
    let mib = 1024 * 1024;
    assert!(
        after_one - empty >= mib,
        "the first copy is stored: {after_one} - {empty}"
    );
    assert!(
        after_two - after_one < mib / 16,
        "the second copy took {} bytes",
        after_two - after_one
    );
    // Both scribes read back whole, with the shared payload.
    for id in [one.id, two.id] {
        let entry = clients
            .log
            .get(pb::GetScribeRequest { id })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(entry.payload.len(), payload.len());
        Scribe::decode(entry_parts(&entry)).unwrap();
    }
    node.stop().await.unwrap();
}

#[test]
fn a_format_1_data_directory_is_refused_on_open_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("db");
    // What a format-1 node left: its column families and `format` = 1.
    let format_1 = [
        "default",
        "scribes",
        "log",
        "by_stream",
        "streams",
        "cursors",
        "peers",
        "joins",
        "projections",
    ];
    {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let db = rocksdb::DB::open_cf(&options, &db_path, &format_1[1..]).unwrap();
        db.put(b"format", 1u64.to_be_bytes()).unwrap();
        db.put(b"head", 0u64.to_be_bytes()).unwrap();
    }
    let output = Command::new(quire_bin())
        .args(["serve", "-d"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("storage format 1") && stderr.contains("nothing was changed"),
        "{stderr}"
    );
    // Nothing was rewritten: the same column families, the same format.
    let mut families = rocksdb::DB::list_cf(&rocksdb::Options::default(), &db_path).unwrap();
    families.sort();
    let mut expected: Vec<String> = format_1.iter().map(|name| name.to_string()).collect();
    expected.sort();
    assert_eq!(families, expected);
    let db = rocksdb::DB::open_cf_for_read_only(
        &rocksdb::Options::default(),
        &db_path,
        &format_1[1..],
        false,
    )
    .unwrap();
    assert_eq!(db.get(b"format").unwrap().unwrap(), 1u64.to_be_bytes());
}

/// A node-signed batch is sealed once: every scribe shares one seal over the group, and each one
/// read back (its proof derived from the seal's stored leaves) verifies, also after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_signed_batch_shares_one_seal_and_every_proof_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "sealed once", None).await;
    let appends = (0..37)
        .map(|index| pb::AppendRequest {
            stream: bytes_of(&stream),
            kind: "x.note".into(),
            payload: Bytes::from(format!("note {index}")),
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
    for round in 0..2 {
        let mut seals = std::collections::HashSet::new();
        for (index, result) in results.iter().enumerate() {
            let entry = clients
                .log
                .get(pb::GetScribeRequest {
                    id: result.id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            let scribe = Scribe::decode(entry_parts(&entry)).unwrap();
            assert!(scribe.seal.count >= 37, "one seal over the whole group");
            assert_eq!(&scribe.body.payload[..], format!("note {index}").as_bytes());
            seals.insert(entry.seal);
        }
        assert_eq!(seals.len(), 1, "round {round}: one seal for the batch");
        if round == 0 {
            node.stop().await.unwrap();
            node = start_node(dir.path()).await;
            clients = crate::common::clients(&node.url()).await;
        }
    }
    node.stop().await.unwrap();
}
