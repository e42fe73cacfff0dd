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
    let (child, url, _) = spawn_serve_with(dir, &[]).await;
    (child, url)
}

/// Starts `quire serve` on `dir` with free ports and `extra` arguments; returns the child, its API
/// URL and its peer listener address.
pub async fn spawn_serve_with(dir: &Path, extra: &[&str]) -> (Child, String, String) {
    spawn_binary(Path::new(quire_bin()), dir, extra, &[]).await
}

/// Starts `<binary> serve` (quire, or a binary built on `quire::cli::main_with`) on `dir` with
/// free ports, `extra` arguments and `env`; returns the child, its API URL and peer address.
pub async fn spawn_binary(
    binary: &Path,
    dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Child, String, String) {
    let mut child = Command::new(binary)
        .args(["serve", "--api", "127.0.0.1:0", "--listen", "127.0.0.1:0"])
        .args(extra)
        .arg("-d")
        .arg(dir)
        .env("QUIRE_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn quire serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut url = None;
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(api) = line.strip_prefix("client API listening on ") {
            url = Some(api.trim().to_string());
        }
        if let Some(peer) = line.strip_prefix("peer listener on ") {
            let peer = peer.trim().to_string();
            // Keep draining stdout so the child never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            let url = url.expect("the API line comes first");
            // The node wrote its token before it listened.
            let token = std::fs::read_to_string(dir.join("api.token")).expect("api.token");
            remember_token(&url, token.trim());
            return (child, url, peer);
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
                            sealed: vec![],
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

async fn held(url: &str, stream: &quire::projection_api::StreamId) -> u64 {
    let mut clients = crate::common::clients(url).await;
    match clients
        .streams
        .get(pb::GetStreamRequest {
            stream: bytes_of(stream),
        })
        .await
    {
        Ok(info) => info.into_inner().scribes,
        Err(_) => 0,
    }
}

async fn verify_clean(dir: &Path) {
    let output = std::process::Command::new(quire_bin())
        .args(["verify", "-d"])
        .arg(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && text.contains("no damage"),
        "verify found damage:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_catch_up_and_live_replication_loses_and_duplicates_nothing() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut child_a, url_a, peer_a) = spawn_serve_with(dir_a.path(), &[]).await;
    let mut clients_a = crate::common::clients(&url_a).await;
    let stream = create_stream(&mut clients_a, "replicated crash", None).await;
    append_bulk(&mut clients_a, &stream, 20_000).await;

    // B dials A, joins, and is killed in the middle of the catch-up.
    let (mut child_b, url_b, _) = spawn_serve_with(dir_b.path(), &["--peer", &peer_a]).await;
    let mut clients_b = crate::common::clients(&url_b).await;
    clients_b
        .streams
        .join(pb::JoinStreamRequest {
            stream: bytes_of(&stream),
            timeout_ms: 60_000,
        })
        .await
        .unwrap();
    let timeout = std::time::Duration::from_secs(120);
    wait_until(timeout, "B part way through the catch-up", || {
        let url_b = url_b.clone();
        async move { held(&url_b, &stream).await >= 2_000 }
    })
    .await;
    child_b.kill().await.unwrap();
    let (next_b, url_b, _) = spawn_serve_with(dir_b.path(), &[]).await;
    child_b = next_b;
    wait_until(timeout, "B to catch up after the crash", || {
        let url_b = url_b.clone();
        async move { held(&url_b, &stream).await >= 20_001 }
    })
    .await;

    // Live: A keeps appending while B is killed again.
    let writer = {
        let url_a = url_a.clone();
        tokio::spawn(async move {
            let mut clients = crate::common::clients(&url_a).await;
            for index in 0..600 {
                append_note(&mut clients, &stream, &format!("live {index}")).await;
            }
        })
    };
    wait_until(timeout, "B to receive live scribes", || {
        let url_b = url_b.clone();
        async move { held(&url_b, &stream).await >= 20_101 }
    })
    .await;
    child_b.kill().await.unwrap();
    writer.await.unwrap();
    let (next_b, url_b, _) = spawn_serve_with(dir_b.path(), &[]).await;
    child_b = next_b;
    wait_until(timeout, "B to converge after the second crash", || {
        let url_b = url_b.clone();
        async move { held(&url_b, &stream).await >= 20_601 }
    })
    .await;

    // Same set on both, each stored once, nothing damaged.
    let mut clients_b = crate::common::clients(&url_b).await;
    let ids = |entries: Vec<pb::Entry>| {
        entries
            .into_iter()
            .map(|entry| entry.id)
            .collect::<Vec<_>>()
    };
    let on_a = ids(read_all(&mut clients_a).await);
    let on_b = ids(read_all(&mut clients_b).await);
    assert_eq!(on_b.len(), on_a.len(), "nothing lost, nothing duplicated");
    assert_eq!(
        on_a.iter().collect::<std::collections::HashSet<_>>(),
        on_b.iter().collect::<std::collections::HashSet<_>>()
    );
    child_a.kill().await.unwrap();
    child_b.kill().await.unwrap();
    verify_clean(dir_a.path()).await;
    verify_clean(dir_b.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_raises_its_open_files_limit_to_the_hard_limit() {
    // A soft limit of 256 (the hard limit stays): the node raises it at start.
    let dir = tempfile::tempdir().unwrap();
    let script = format!("ulimit -Sn 256 && exec {} \"$@\"", quire_bin());
    let wrapper = dir.path().join("quire-low-fd-limit");
    std::fs::write(&wrapper, format!("#!/bin/sh\n{script}\n")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let data = dir.path().join("node");
    let (mut child, _, _) = spawn_binary(&wrapper, &data, &[], &[]).await;
    let pid = child.id().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers[0], numbers[1], "soft limit not raised: {line}");
    assert_ne!(numbers[0], "256", "{line}");
    child.kill().await.unwrap();
}
