//! Crash tests that really crash: a child `quire serve` is killed with SIGKILL while clients append
//! as fast as they can; after a restart every acknowledged scribe is there, seqs are gapless and
//! `quire verify` finds no damage.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use quire::pb;
use rand::Rng;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::*;

/// Starts `quire serve` on `dir` with a free port; returns the child and its API URL.
pub async fn spawn_serve(dir: &Path) -> (Child, String) {
    let mut child = Command::new(quire_bin())
        .args(["serve", "--api", "127.0.0.1:0", "-d"])
        .arg(dir)
        .env("QUIRE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn quire serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(url) = line.strip_prefix("client API listening on ") {
            let url = url.trim().to_string();
            // Keep draining stdout so the child never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return (child, url);
        }
    }
    panic!("quire serve exited before listening");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut url) = spawn_serve(dir.path()).await;
    let mut clients = clients(&url).await;
    let stream = create_stream(&mut clients, "crash", None).await;
    let acknowledged: Arc<Mutex<Vec<Bytes>>> = Arc::new(Mutex::new(Vec::new()));

    for round in 0..3 {
        let kill_after = rand::thread_rng().gen_range(300..1500);
        let mut writers = Vec::new();
        for writer in 0..6 {
            let mut clients = crate::common::clients(&url).await;
            let acknowledged = acknowledged.clone();
            writers.push(tokio::spawn(async move {
                let mut index = 0u64;
                loop {
                    index += 1;
                    let request = pb::AppendRequest {
                        stream: bytes_of(&stream),
                        kind: "x.crash".into(),
                        content_type: String::new(),
                        payload: Bytes::from(format!("round {round} writer {writer} #{index}")),
                        parents: vec![],
                    };
                    // Batches and single appends both.
                    let result = if index % 2 == 0 {
                        clients
                            .log
                            .append(request)
                            .await
                            .map(|reply| vec![reply.into_inner().id])
                    } else {
                        let batch = pb::AppendBatchRequest {
                            appends: vec![request.clone(), request],
                            signed: vec![],
                        };
                        clients.log.append_batch(batch).await.map(|reply| {
                            reply
                                .into_inner()
                                .results
                                .into_iter()
                                .map(|r| r.id)
                                .collect()
                        })
                    };
                    match result {
                        Ok(ids) => acknowledged.lock().unwrap().extend(ids),
                        Err(_) => return, // the node died under us
                    }
                }
            }));
        }
        let start = acknowledged.lock().unwrap().len();
        wait_until(
            std::time::Duration::from_secs(120),
            "appends to be acknowledged",
            || {
                let count = acknowledged.lock().unwrap().len();
                async move { count >= start + kill_after }
            },
        )
        .await;
        child.kill().await.unwrap(); // SIGKILL
        for writer in writers {
            writer.await.unwrap();
        }

        let (next_child, next_url) = spawn_serve(dir.path()).await;
        child = next_child;
        let mut clients = crate::common::clients(&next_url).await;
        let stored: std::collections::HashSet<Bytes> = read_all(&mut clients)
            .await
            .into_iter()
            .map(|entry| entry.id)
            .collect();
        let acked = acknowledged.lock().unwrap().clone();
        let missing = acked.iter().filter(|id| !stored.contains(*id)).count();
        assert_eq!(
            missing,
            0,
            "round {round}: {missing} of {} acknowledged scribes lost",
            acked.len()
        );
        let entries = read_all(&mut clients).await;
        let seqs: Vec<u64> = entries.iter().map(|entry| entry.seq).collect();
        assert_eq!(
            seqs,
            (1..=entries.len() as u64).collect::<Vec<_>>(),
            "gapless after a crash"
        );

        let output = std::process::Command::new(quire_bin())
            .args(["verify", "-d"])
            .arg(dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "round {round}: verify found damage:\n{text}"
        );
        assert!(text.contains("no damage"), "{text}");
        url = next_url;
    }
    child.kill().await.unwrap();
}
