//! `quire verify`: a clean data directory verifies; a flipped byte in a stored envelope or a stored
//! payload is reported.

use std::process::Command;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_clean_data_and_reports_a_flipped_byte() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "verify", None).await;
    let mut last = None;
    for index in 0..20 {
        // Note 3 is large enough to be stored apart from its envelope, in `payloads`.
        let text = match index {
            3 => format!("note 3 {}", "x".repeat(2000)),
            _ => format!("note {index}"),
        };
        last = Some(append_note(&mut clients, &stream, &text).await);
    }
    // It works beside a running node.
    let output = Command::new(quire_bin())
        .args(["verify", "-d"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("checked 21 scribes in 1 streams up to seq 21: no damage"),
        "{text}"
    );
    node.stop().await.unwrap();

    // Flip one byte of one stored scribe, behind quire's back.
    let id = last.unwrap().id;
    {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(false);
        let path = dir.path().join("db");
        let families = rocksdb::DB::list_cf(&options, &path).unwrap();
        let db = rocksdb::DB::open_cf(&options, &path, families).unwrap();
        let cf = db.cf_handle("scribes").unwrap();
        let mut value = db.get_cf(cf, &id).unwrap().unwrap();
        let last = value.len() - 1; // the record ends with the envelope
        value[last] ^= 0x40;
        db.put_cf(cf, &id, value).unwrap();
        // And one byte of another scribe's payload, stored apart from its envelope.
        let payloads = db.cf_handle("payloads").unwrap();
        let (key, payload) = db
            .iterator_cf(payloads, rocksdb::IteratorMode::Start)
            .map(Result::unwrap)
            .find(|(_, payload)| payload.starts_with(b"note 3"))
            .unwrap();
        let mut payload = payload.to_vec();
        payload[0] ^= 0x01;
        db.put_cf(payloads, key, payload).unwrap();
    }
    let output = Command::new(quire_bin())
        .args(["verify", "-d"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("DAMAGE seq 21"), "{text}");
    assert!(text.contains("stored envelope hashes to"), "{text}");
    assert!(text.contains("DAMAGE seq 5"), "{text}");
    assert!(
        text.contains("payload does not match its envelope"),
        "{text}"
    );
}
