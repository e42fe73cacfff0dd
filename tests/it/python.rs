//! A Python client generated from `proto/` with grpcio-tools at test time creates a stream,
//! appends and subscribes: the API works with no Rust. It sends the node owner's token only with
//! the calls that need it, and shows that those fail without it (UNAUTHENTICATED) while a batch it
//! seals itself and the reads do not need it. Needs `pip install grpcio grpcio-tools` (the
//! README's test command and `.ci/run` install them).

use std::path::Path;
use std::process::Command;

use crate::common::*;

/// Python stubs for `proto/quire/v1`, generated into a temporary directory.
pub fn python_stubs(root: &Path) -> tempfile::TempDir {
    let stubs = tempfile::tempdir().unwrap();
    let protos: Vec<_> = ["quire/v1/scribe.proto", "quire/v1/api.proto"]
        .iter()
        .map(|file| root.join("proto").join(file))
        .collect();
    let output = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(root.join("proto"))
        .arg(format!("--python_out={}", stubs.path().display()))
        .arg(format!("--grpc_python_out={}", stubs.path().display()))
        .args(&protos)
        .output()
        .expect("python3 is installed");
    assert!(
        output.status.success(),
        "generating Python stubs failed (run `pip install grpcio grpcio-tools`): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    stubs
}

/// Runs the Python script `script` (under the repository `root`) against `node` with `stubs` on
/// its path and the node owner's token in `QUIRE_TOKEN`; returns its stdout, failing with its
/// output if it fails.
pub async fn run_script(
    root: &Path,
    stubs: &tempfile::TempDir,
    script: &str,
    node: &quire::node::RunningNode,
) -> String {
    run_python(root, Some(stubs), script, node, &[]).await
}

/// Runs `script` (under `root`) with the node's address and then `args` as arguments, `stubs`
/// (if any) on its path and the owner's token in `QUIRE_TOKEN`; its stdout, failing with its
/// output if it fails.
async fn run_python(
    root: &Path,
    stubs: Option<&tempfile::TempDir>,
    script: &str,
    node: &quire::node::RunningNode,
    args: &[String],
) -> String {
    let mut command = Command::new("python3");
    command
        .arg(root.join(script))
        .arg(node.api_addr.to_string())
        .args(args)
        .env("QUIRE_TOKEN", node.token.as_str());
    if let Some(stubs) = stubs {
        command.env("PYTHONPATH", stubs.path());
    }
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "python {script} failed (pip install grpcio grpcio-tools cryptography websockets?):\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_generated_from_the_protos_works() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stubs = python_stubs(root);

    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stdout = run_script(root, &stubs, "tests/python/client.py", &node).await;
    assert!(stdout.contains("python client ok: 8 scribes"), "{stdout}");
    assert!(
        stdout.contains(
            "python client ok: owner calls need the token, sealed batches and reads do not"
        ),
        "{stdout}"
    );
    node.stop().await.unwrap();
}

/// `examples/python-live/live.py`, a standard WebSocket client (`websockets`), binds the message
/// board's list `latest` and a kv key over the live binding, adds a record and sets the key as the
/// owner, and ends holding exactly the page and value the node has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_live_example_binds_a_list_and_a_var() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "board", None).await;
    let pushed = quire_cli(&node.url())
        .args(["files", "push", &stream.to_hex()])
        .arg(root.join("examples/message-board"))
        .output()
        .unwrap();
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let stdout = run_python(
        root,
        None,
        "examples/python-live/live.py",
        &node,
        &[stream.to_hex()],
    )
    .await;
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(
        summary["var"],
        serde_json::json!({"text": "set from Python"})
    );
    assert_eq!(summary["list"]["total"], 1);
    let item = &summary["list"]["items"][0];
    assert_eq!(item["text"], "hello from Python");
    assert_eq!(item["id"], summary["record"]["id"]);
    eprintln!(
        "python live client: record pushed in {} ms, var in {} ms",
        summary["record_ms"], summary["var_ms"]
    );
    node.stop().await.unwrap();
}
