//! The client API's trust boundary (issue 14, `docs/security.md`): the node's key answers only to
//! the holder of the token in `api.token`; an app's page acts only on its own stream; a foreign
//! Host or page is refused; strangers read and append what they sign themselves. Every refusal
//! leaves the log, the peers and the projections as they were.

use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use quire::api::access::{app_label, Rule, GRPC_METHODS};
use quire::node::RunningNode;
use quire::pb;
use quire::projection_api::StreamId;
use serde_json::{json, Value as Json};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

use crate::common::*;

/// Any request message: an empty body decodes as every request type's default.
#[derive(Clone, PartialEq, prost::Message)]
struct Empty {}

async fn raw_channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Calls the unary method at `path` with an empty request and `metadata`; returns the status.
async fn call(url: &str, path: &'static str, metadata: &[(&'static str, String)]) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(raw_channel(url).await);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(Empty {});
    for (name, value) in metadata {
        request.metadata_mut().insert(*name, value.parse().unwrap());
    }
    let codec: tonic::codec::ProstCodec<Empty, Empty> = Default::default();
    match grpc
        .unary(request, PathAndQuery::from_static(path), codec)
        .await
    {
        Ok(_) => tonic::Status::ok("answered"),
        Err(status) => status,
    }
}

/// What a refused request must leave as it was: the log's head and every scribe's id, the
/// streams, the peers and every projection's checkpoint.
#[derive(Debug, PartialEq)]
struct Snapshot {
    head: u64,
    ids: Vec<Bytes>,
    /// Each stream and the local seq of its newest scribe.
    streams: Vec<(Bytes, u64)>,
    peers: Vec<String>,
    projections: Vec<(String, u64)>,
}

/// The snapshot once every projection of every stream has caught up with the log.
async fn snapshot(url: &str) -> Snapshot {
    let taken = std::sync::Mutex::new(None);
    wait_until(
        Duration::from_secs(30),
        "every projection to reach the head",
        || async {
            let now = snapshot_now(url).await;
            let settled = now.projections.len() == 3 * now.streams.len()
                && now.projections.iter().all(|(name, seq)| {
                    now.streams
                        .iter()
                        .any(|(id, head)| name.ends_with(&hex::encode(id)) && seq >= head)
                });
            *taken.lock().unwrap() = Some(now);
            settled
        },
    )
    .await;
    let taken = taken.lock().unwrap().take();
    taken.unwrap()
}

async fn snapshot_now(url: &str) -> Snapshot {
    let mut owner = clients(url).await;
    let status = owner
        .admin
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    Snapshot {
        head: status.head_seq,
        ids: read_all(&mut owner)
            .await
            .into_iter()
            .map(|e| e.id)
            .collect(),
        streams: status
            .streams
            .iter()
            .map(|s| (s.stream.clone(), s.head_seq))
            .collect(),
        peers: status.peers.iter().map(|p| p.addr.clone()).collect(),
        projections: status
            .projections
            .iter()
            .map(|p| {
                (
                    format!("{} {}", p.name, hex::encode(&p.stream)),
                    p.checkpoint,
                )
            })
            .collect(),
    }
}

/// A node with an app that has a table and a record, a remembered peer and a pending join: every
/// kind of state an owner-only call could change.
async fn busy_node(dir: &std::path::Path) -> (RunningNode, StreamId) {
    let node = start_node(dir).await;
    let mut owner = clients(&node.url()).await;
    let app = create_stream(&mut owner, "app", None).await;
    let tid = app.to_hex();
    let http = reqwest::Client::new();
    let put = http
        .put(format!("{}/{tid}/_schema", node.url()))
        .bearer_auth(node.token.as_str())
        .header("content-type", "application/json")
        .body(r#"{"schema": {"note": {"text": "text"}}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);
    let added = http
        .post(format!("{}/{tid}/add_record", node.url()))
        .bearer_auth(node.token.as_str())
        .json(&json!({"_table": "note", "text": "first"}))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 200, "{}", added.text().await.unwrap());
    owner
        .admin
        .add_peer(pb::AddPeerRequest {
            addr: "127.0.0.1:9".into(),
        })
        .await
        .unwrap();
    let pending = owner
        .streams
        .join(pb::JoinStreamRequest {
            stream: Bytes::from(vec![0xab; 32]),
            timeout_ms: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(pending.code(), tonic::Code::DeadlineExceeded);
    wait_until(
        Duration::from_secs(30),
        "the app's table to hold the record",
        || {
            let (url, tid) = (node.url(), tid.clone());
            async move { query_notes(&url, &tid).await.len() == 1 }
        },
    )
    .await;
    (node, app)
}

#[test]
fn every_grpc_method_of_the_api_has_a_rule() {
    let set = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
    let mut seen = 0;
    for file in &set.file {
        for service in &file.service {
            if service.name() == "Peer" {
                continue; // the peer listener's, never served on the API listener
            }
            for method in &service.method {
                let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                assert!(
                    GRPC_METHODS.iter().any(|(known, _)| *known == path),
                    "{path} has no rule in GRPC_METHODS: say who may call it"
                );
                seen += 1;
            }
        }
    }
    assert_eq!(
        seen,
        GRPC_METHODS.len(),
        "GRPC_METHODS names a method that does not exist"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_only_grpc_methods_refuse_strangers_and_apps_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (node, app) = busy_node(dir.path()).await;
    let url = node.url();
    let before = snapshot(&url).await;
    let port = node.api_addr.port();
    let app_origin = format!("http://{}.localhost:{port}", app_label(&app));
    let right = format!("Bearer {}", node.token.as_str());
    let owner_only: Vec<&'static str> = GRPC_METHODS
        .iter()
        .filter(|(_, rule)| *rule == Rule::Owner)
        .map(|(path, _)| *path)
        .collect();
    assert!(owner_only.len() >= 20, "{owner_only:?}");
    for path in owner_only {
        let none = call(&url, path, &[]).await;
        assert_eq!(
            none.code(),
            tonic::Code::Unauthenticated,
            "{path}: {none:?}"
        );
        assert!(none.message().contains("api.token"), "{path}: {none:?}");
        let wrong = call(
            &url,
            path,
            &[("authorization", "Bearer 0123456789abcdef0123".into())],
        )
        .await;
        assert_eq!(
            wrong.code(),
            tonic::Code::Unauthenticated,
            "{path}: {wrong:?}"
        );
        assert!(wrong.message().contains("wrong token"), "{path}: {wrong:?}");
        // A page of an app, even one that somehow holds the token.
        let page = call(
            &url,
            path,
            &[
                ("authorization", right.clone()),
                ("origin", app_origin.clone()),
            ],
        )
        .await;
        // Answered like any refusal to a page: HTTP 403 (a page would not see a gRPC status).
        assert!(page.message().contains("403 Forbidden"), "{path}: {page:?}");
    }
    // The methods that decide by their request: node-signed appends and durable consumers.
    let mut stranger = pb::log_client::LogClient::new(stranger_channel(&url).await);
    let batch = stranger
        .append_batch(pb::AppendBatchRequest {
            appends: vec![pb::AppendRequest {
                stream: bytes_of(&app),
                kind: "x.note".into(),
                ..Default::default()
            }],
            signed: vec![],
            sealed: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(batch.code(), tonic::Code::Unauthenticated, "{batch:?}");
    let Err(consumer) = stranger
        .subscribe(pb::SubscribeRequest {
            consumer: "thief".into(),
            ..Default::default()
        })
        .await
    else {
        panic!("a stranger's durable consumer is refused")
    };
    assert_eq!(
        consumer.code(),
        tonic::Code::Unauthenticated,
        "{consumer:?}"
    );
    assert_eq!(snapshot(&url).await, before);
    // The same calls with the token work: the refusals above were the boundary, not breakage.
    let status = call(&url, "/quire.v1.Admin/Status", &[("authorization", right)]).await;
    assert_eq!(status.code(), tonic::Code::Ok, "{status:?}");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_read_and_append_what_they_sign_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let url = node.url();
    let mut owner = clients(&url).await;
    let stream = create_stream(&mut owner, "open", None).await;
    let note = append_note(&mut owner, &stream, "by the node").await;
    let channel = stranger_channel(&url).await;
    let mut log = pb::log_client::LogClient::new(channel.clone());
    let mut streams = pb::streams_client::StreamsClient::new(channel.clone());
    assert_eq!(
        streams
            .list(pb::ListStreamsRequest {})
            .await
            .unwrap()
            .into_inner()
            .streams
            .len(),
        1
    );
    let got = log
        .get(pb::GetScribeRequest {
            id: note.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.payload, Bytes::from("by the node"));
    // A scribe the stranger signed is theirs to append.
    let key = client_key(41);
    let scribe = client_scribe(&key, &stream, "x.note", b"signed by a stranger", 1);
    let appended = log
        .append_signed(signed_request(scribe.parts()))
        .await
        .expect("a client-signed append needs no token")
        .into_inner();
    assert_eq!(appended.id, bytes_of(&scribe.id));
    // Appending as the node is not.
    let refused = log
        .append(pb::AppendRequest {
            stream: bytes_of(&stream),
            kind: "x.note".into(),
            payload: Bytes::from("as the node"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let entries = read_all(&mut owner).await;
    assert_eq!(entries.len(), 3, "genesis, the node's note, the stranger's");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_only_http_actions_refuse_strangers_apps_and_foreign_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let (node, victim) = busy_node(dir.path()).await;
    let url = node.url();
    let mut owner = clients(&url).await;
    let mallory = create_stream(&mut owner, "mallory", None).await;
    let (v, m) = (victim.to_hex(), mallory.to_hex());
    let port = node.api_addr.port();
    let m_host = format!("{}.localhost", app_label(&mallory));
    let v_host = format!("{}.localhost", app_label(&victim));
    let m_origin = format!("http://{m_host}:{port}");
    let index_before = http_to(
        &node,
        None,
        reqwest::Method::GET,
        &format!("/{v}/_schema"),
        &[],
        None,
    )
    .await;
    assert_eq!(index_before.0, 200);
    let before = snapshot(&url).await;
    let token = node.token.as_str().to_string();

    let owner_actions: Vec<(reqwest::Method, String, Option<Json>)> = vec![
        (reqwest::Method::POST, "/create_app".into(), Some(json!({}))),
        (
            reqwest::Method::POST,
            format!("/{v}/join_app"),
            Some(json!({})),
        ),
        (
            reqwest::Method::POST,
            format!("/{v}/add_peer"),
            Some(json!({"addr": "127.0.0.1", "port": 7})),
        ),
        (
            reqwest::Method::POST,
            format!("/{v}/cancel_join"),
            Some(json!({})),
        ),
        (
            reqwest::Method::POST,
            format!("/{v}/leave"),
            Some(json!({})),
        ),
        (
            reqwest::Method::POST,
            "/remove_peer".into(),
            Some(json!({"addr": "127.0.0.1", "port": 9})),
        ),
        (
            reqwest::Method::POST,
            format!("/{v}/add_record"),
            Some(json!({"_table": "note", "text": "x"})),
        ),
        (
            reqwest::Method::POST,
            format!("/{v}/upvote"),
            Some(json!({"id": "00".repeat(32)})),
        ),
        (
            reqwest::Method::PUT,
            format!("/{v}/_schema"),
            Some(json!({"schema": {}})),
        ),
        (reqwest::Method::DELETE, format!("/{v}/_schema"), None),
    ];
    for (method, path, body) in &owner_actions {
        let what = format!("{method} {path}");
        // No token, a wrong token: 401, saying where the token is.
        let (status, reply) = http_to(&node, None, method.clone(), path, &[], body.clone()).await;
        assert_eq!(status, 401, "{what}: {reply}");
        assert!(reply.contains("api.token"), "{what}: {reply}");
        let wrong = [("authorization", "Bearer not-the-token-at-all".to_string())];
        let (status, reply) =
            http_to(&node, None, method.clone(), path, &wrong, body.clone()).await;
        assert_eq!(status, 401, "{what}: {reply}");
        // A page of app M, on the node's host and on V's host: 403, even with the token.
        let from_m = [
            ("origin", m_origin.clone()),
            ("authorization", format!("Bearer {token}")),
        ];
        let (status, reply) =
            http_to(&node, None, method.clone(), path, &from_m, body.clone()).await;
        assert_eq!(status, 403, "{what} from M's page: {reply}");
        let on_v = path.replacen(&format!("/{v}"), "", 1);
        let (status, reply) = http_to(
            &node,
            Some(&v_host),
            method.clone(),
            &on_v,
            &from_m,
            body.clone(),
        )
        .await;
        assert_eq!(status, 403, "{what} on V's host from M's page: {reply}");
        // A DNS-rebinding page: its requests name the attacker's host.
        let rebound = [
            ("host", format!("evil.example:{port}")),
            ("authorization", format!("Bearer {token}")),
        ];
        let (status, reply) =
            http_to(&node, None, method.clone(), path, &rebound, body.clone()).await;
        assert_eq!(status, 403, "{what} with Host evil.example: {reply}");
        assert!(
            reply.contains("does not answer to the host name"),
            "{reply}"
        );
    }
    // V's own page may add records but not write V's files or manage the node.
    let from_v = [("origin", format!("http://{v_host}:{port}"))];
    let (status, reply) = http_to(
        &node,
        Some(&v_host),
        reqwest::Method::PUT,
        "/_schema",
        &from_v,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 403, "{reply}");
    // A form post (no preflight) from the app's own page: refused, it must be JSON.
    let (status, reply) = http_to(
        &node,
        Some(&v_host),
        reqwest::Method::POST,
        "/add_record",
        &[
            ("origin", format!("http://{v_host}:{port}")),
            ("content-type", "application/x-www-form-urlencoded".into()),
        ],
        None,
    )
    .await;
    assert_eq!(status, 415, "{reply}");
    assert_eq!(snapshot(&url).await, before);
    let index_after = http_to(
        &node,
        None,
        reqwest::Method::GET,
        &format!("/{v}/_schema"),
        &[],
        None,
    )
    .await;
    assert_eq!(index_after, index_before);
    assert_eq!(query_notes(&url, &v).await.len(), 1);

    // What an app may do: add a record to its own stream, from its own origin, and query it.
    let (status, reply) = http_to(
        &node,
        Some(&v_host),
        reqwest::Method::POST,
        "/add_record",
        &from_v,
        Some(json!({"_table": "note", "text": "from V's page"})),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    // Flock-style absolute paths of its own id work too.
    let (status, reply) = http_to(
        &node,
        Some(&v_host),
        reqwest::Method::POST,
        &format!("/{v}/query"),
        &from_v,
        Some(json!({"query": "SELECT count(*) FROM note", "after_seq": before.head + 1})),
    )
    .await;
    assert_eq!((status, reply.contains("[[2]]")), (200, true), "{reply}");
    // ...but not another app's id on its host.
    let (status, _) = http_to(
        &node,
        Some(&v_host),
        reqwest::Method::POST,
        &format!("/{m}/query"),
        &from_v,
        Some(json!({"query": "SELECT 1"})),
    )
    .await;
    assert_eq!(status, 404);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_are_served_at_their_own_origin_with_a_policy_that_keeps_them_there() {
    let dir = tempfile::tempdir().unwrap();
    let (node, app) = busy_node(dir.path()).await;
    let tid = app.to_hex();
    let port = node.api_addr.port();
    let host = format!("{}.localhost", app_label(&app));
    let index = b"<!doctype html><title>app</title><script src=app.js></script>";
    let put = reqwest::Client::new()
        .put(format!("{}/{tid}/index.html", node.url()))
        .bearer_auth(node.token.as_str())
        .header("content-type", "text/html")
        .body(index.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);
    // A browser that follows a flock-style link goes on to the app's origin, path kept.
    let navigate = [
        ("sec-fetch-mode", "navigate".to_string()),
        ("sec-fetch-site", "none".to_string()),
    ];
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(&host, node.api_addr)
        .build()
        .unwrap();
    for (path, to) in [
        (format!("/{tid}/"), "/"),
        (format!("/{tid}"), "/"),
        (format!("/{tid}/a/b.js"), "/a/b.js"),
    ] {
        let mut request = client.get(format!("{}{path}", node.url()));
        for (name, value) in &navigate {
            request = request.header(*name, value);
        }
        let reply = request.send().await.unwrap();
        assert_eq!(reply.status(), 307, "{path}");
        assert_eq!(
            reply.headers()["location"].to_str().unwrap(),
            format!("http://{host}:{port}{to}"),
            "{path}"
        );
    }
    // There the app is served with a policy that keeps it to its own origin.
    let reply = client
        .get(format!("http://{host}:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let csp = reply.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("connect-src 'self'") && csp.contains("default-src 'self'"),
        "{csp}"
    );
    assert_eq!(reply.headers()["x-content-type-options"], "nosniff");
    assert_eq!(reply.bytes().await.unwrap().as_ref(), index);
    // A non-browser client still reads the file on the node's host, sandboxed: nothing served
    // there runs with the node's origin.
    let reply = reqwest::get(format!("{}/{tid}/", node.url()))
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    assert!(reply.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .starts_with("sandbox"));
    assert_eq!(reply.bytes().await.unwrap().as_ref(), index);
    // A cross-site subresource load (a <script src> on another site) is refused.
    let (status, _) = http_to(
        &node,
        Some(&host),
        reqwest::Method::GET,
        "/index.html",
        &[
            ("sec-fetch-site", "cross-site".into()),
            ("sec-fetch-mode", "no-cors".into()),
        ],
        None,
    )
    .await;
    assert_eq!(status, 403);
    // A label that is no app's id is no host of this node.
    let (status, _) = http_to(
        &node,
        Some("notanapp.localhost"),
        reqwest::Method::GET,
        "/",
        &[],
        None,
    )
    .await;
    assert_eq!(status, 403);
    node.stop().await.unwrap();
}

fn cli(dir: &std::path::Path) -> std::process::Command {
    let mut command = std::process::Command::new(quire_bin());
    command
        .arg("-d")
        .arg(dir)
        .env_remove("QUIRE_TOKEN")
        .env_remove("QUIRE_TOKEN_FILE")
        .env_remove("QUIRE_NODE");
    command
}

fn run(command: &mut std::process::Command) -> (bool, String, String) {
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_finds_the_owners_token_and_says_what_to_do_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("api.token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // The owner on the node's machine: just -d (the node's api.addr and api.token are there).
    let (ok, out, err) = run(cli(dir.path()).args(["stream", "create", "mine"]));
    assert!(ok, "{out}{err}");
    let stream = out
        .split_whitespace()
        .find(|w| w.len() == 64)
        .unwrap()
        .to_string();
    // Another data directory's CLI: no token is sent to a node that is not its own.
    let elsewhere = tempfile::tempdir().unwrap();
    let (ok, out, err) =
        run(cli(elsewhere.path()).args(["--node", &node.url(), "stream", "create", "x"]));
    assert!(!ok, "{out}");
    assert!(
        err.contains("unauthenticated") && err.contains("no token was sent"),
        "{err}"
    );
    // A wrong token says so; the right one works; reads need none.
    let (ok, _, err) = run(cli(elsewhere.path()).args([
        "--node",
        &node.url(),
        "--token",
        "0123456789abcdef-wrong",
        "stream",
        "create",
        "x",
    ]));
    assert!(!ok && err.contains("wrong token"), "{err}");
    let (ok, out, err) = run(cli(elsewhere.path()).args([
        "--node",
        &node.url(),
        "--token",
        node.token.as_str(),
        "append",
        &stream,
        "x.note",
        "--data",
        "hi",
    ]));
    assert!(ok, "{out}{err}");
    let (ok, out, err) = run(cli(elsewhere.path()).args(["--node", &node.url(), "log", &stream]));
    assert!(ok && out.contains("x.note"), "{out}{err}");
    // A scheme is not needed.
    let (ok, out, err) =
        run(cli(dir.path()).args(["--node", &node.api_addr.to_string(), "stream", "list"]));
    assert!(ok && out.contains(&stream), "{out}{err}");

    // Rotation: the old token stops working at once, the file holds the new one.
    let old = node.token.as_str().to_string();
    let (ok, out, err) = run(cli(dir.path()).args(["token", "rotate"]));
    assert!(ok, "{out}{err}");
    let new = std::fs::read_to_string(dir.path().join("api.token"))
        .unwrap()
        .trim()
        .to_string();
    assert_ne!(new, old);
    let (ok, _, err) = run(cli(elsewhere.path()).args([
        "--node",
        &node.url(),
        "--token",
        &old,
        "stream",
        "create",
        "x",
    ]));
    assert!(!ok && err.contains("wrong token"), "{err}");
    let (ok, out, err) = run(cli(dir.path()).args(["stream", "create", "after rotation"]));
    assert!(ok, "{out}{err}");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_stays_off_command_lines_and_off_the_network_in_clear() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let elsewhere = tempfile::tempdir().unwrap();
    // --token-file: the token never appears on the command line.
    let file = elsewhere.path().join("token");
    std::fs::write(&file, format!("{}\n", node.token.as_str())).unwrap();
    let token_file = file.to_str().unwrap();
    let (ok, out, err) = run(cli(elsewhere.path()).args([
        "--node",
        &node.url(),
        "--token-file",
        token_file,
        "stream",
        "create",
        "by file",
    ]));
    assert!(ok, "{out}{err}");
    let (ok, _, err) = run(cli(elsewhere.path()).args([
        "--node",
        &node.url(),
        "--token-file",
        token_file,
        "--token",
        "x",
        "stream",
        "list",
    ]));
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    // A token is not sent over plain http:// to another machine (nothing is dialed: the
    // address is not routed), unless --insecure says the network is trusted.
    let before = node.log.head();
    let (ok, _, err) = run(cli(elsewhere.path()).args([
        "--node",
        "http://192.0.2.1:8000",
        "--token-file",
        token_file,
        "stream",
        "create",
        "x",
    ]));
    assert!(
        !ok && err.contains("clear text") && err.contains("--insecure"),
        "{err}"
    );
    assert_eq!(node.log.head(), before);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_others_can_write_is_refused_and_a_new_one_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let fresh = parent.path().join("fresh");
    let node = start_node(&fresh).await;
    node.stop().await.unwrap();
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o777)).unwrap();
    let refused = quire::node::RunningNode::start(
        quire::node::NodeConfig::new(&fresh),
        "127.0.0.1:0".parse().unwrap(),
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("chmod 700") && refused.contains("777"),
        "{refused}"
    );
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755)).unwrap();
    let node = start_node(&fresh).await;
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_can_undo_a_peer_and_a_pending_join() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let (ok, out, err) = run(cli(dir.path()).args(["peer", "add", "127.0.0.1:9"]));
    assert!(ok, "{out}{err}");
    let (_, out, _) = run(cli(dir.path()).args(["peer", "list"]));
    assert!(out.contains("127.0.0.1:9"), "{out}");
    let (ok, out, err) = run(cli(dir.path()).args(["peer", "remove", "127.0.0.1:9"]));
    assert!(ok, "{out}{err}");
    let (_, out, _) = run(cli(dir.path()).args(["peer", "list"]));
    assert!(!out.contains("127.0.0.1:9"), "{out}");
    let (ok, _, err) = run(cli(dir.path()).args(["peer", "remove", "127.0.0.1:9"]));
    assert!(!ok && err.contains("not found"), "{err}");

    let wanted = "cd".repeat(32);
    let (ok, _, err) = run(cli(dir.path()).args(["join", &wanted, "--timeout", "1"]));
    assert!(!ok && err.contains("pending"), "{err}");
    let (ok, out, err) = run(cli(dir.path()).args(["join", "--cancel", &wanted]));
    assert!(ok, "{out}{err}");
    let (ok, _, err) = run(cli(dir.path()).args(["join", "--cancel", &wanted]));
    assert!(!ok && err.contains("no join"), "{err}");
    // Neither comes back with a restart.
    node.stop().await.unwrap();
    let node = start_node(dir.path()).await;
    let status = clients(&node.url())
        .await
        .admin
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(status.peers.is_empty(), "{:?}", status.peers);
    assert!(node.log.store().pending_joins().unwrap().is_empty());
    node.stop().await.unwrap();
}

#[test]
fn an_api_others_can_reach_needs_insecure_api() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = run(cli(dir.path()).args(["serve", "--api", "0.0.0.0:0", "--no-listen"]));
    assert!(!ok, "{out}");
    assert!(
        err.contains("--insecure-api") && err.contains("clear text"),
        "{err}"
    );
    assert!(
        !dir.path().join("api.token").exists(),
        "nothing is written before the refusal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_cli_and_https_clients_reach_the_node_and_plain_http_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let data = dir.path().join("node");
    std::fs::create_dir(&data).unwrap();
    let mut config = quire::node::NodeConfig::new(&data);
    config.api_tls = Some((cert.clone(), key.clone()));
    let node = start_config(config, false).await;
    assert!(node.url().starts_with("https://"));
    let https = format!("https://localhost:{}", node.api_addr.port());
    // The owner's CLI over TLS, trusting the node's own certificate.
    let (ok, out, err) = run(cli(&data)
        .args(["--node", &https, "--ca-cert"])
        .arg(&cert)
        .args([
            "--token",
            node.token.as_str(),
            "stream",
            "create",
            "over tls",
        ]));
    assert!(ok, "{out}{err}");
    // Without trusting the certificate: refused by the client, nothing sent.
    let (ok, _, err) = run(cli(&data).args(["--node", &https, "stream", "list"]));
    assert!(!ok && err.contains("cannot reach"), "{err}");
    let (ok, out, err) = run(cli(&data)
        .args(["--node", &https, "--ca-cert"])
        .arg(&cert)
        .args(["stream", "list"]));
    assert!(ok && out.contains("over tls"), "{out}{err}");
    // Plain HTTP to the TLS port gets no answer from the API.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/", node.api_addr.port()))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    // The CLI in the node's own data directory finds https:// in api.addr by itself.
    let served = std::fs::read_to_string(data.join("api.addr")).unwrap();
    assert!(served.starts_with("https://"), "{served}");
    node.stop().await.unwrap();

    // With TLS, an API others can reach is allowed.
    let mut child = tokio::process::Command::new(quire_bin())
        .arg("-d")
        .arg(&data)
        .args([
            "serve",
            "--api",
            "0.0.0.0:0",
            "--no-listen",
            "--api-tls-cert",
        ])
        .arg(&cert)
        .arg("--api-tls-key")
        .arg(&key)
        .env("QUIRE_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut listening = None;
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(addr) = line.strip_prefix("client API listening on ") {
            listening = Some(addr.to_string());
            break;
        }
    }
    assert!(listening.unwrap().starts_with("https://0.0.0.0:"));
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prove_answers_a_fresh_nonce_with_a_mac_and_refuses_odd_nonces() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut admin = pb::admin_client::AdminClient::new(stranger_channel(&node.url()).await);
    let nonce = vec![7u8; 32];
    let mac = admin
        .prove(pb::ProveRequest {
            nonce: Bytes::from(nonce.clone()),
        })
        .await
        .expect("anyone may ask for a proof")
        .into_inner()
        .mac;
    assert!(node.token.verify_proof(&nonce, &mac));
    assert!(
        !node.token.verify_proof(&[8u8; 32], &mac),
        "bound to the nonce"
    );
    assert!(!mac
        .windows(8)
        .any(|w| node.token.as_str().as_bytes().windows(8).any(|t| t == w)));
    // Too short (a replayable proof), too long (work for nothing): refused.
    for size in [0usize, 15, 65, 1 << 20] {
        let refused = admin
            .prove(pb::ProveRequest {
                nonce: Bytes::from(vec![1u8; size]),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{size} bytes");
    }
    node.stop().await.unwrap();
}
