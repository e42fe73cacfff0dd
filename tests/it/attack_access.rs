//! Attacks on the client API's trust boundary (`docs/security.md`, `src/api/access.rs`): forged
//! origins, foreign hosts in odd spellings, gRPC dressed as HTTP and back, paths that try to leave
//! an app's host, token look-alikes, smuggled requests, and the CLI's token discovery.
//!
//! Every test pins an attack that fails. Four were holes when written (a forged app origin signing
//! past an owner-only rule or making the node do a stranger's work, a stale `api.addr` receiving
//! the token, a stranger's genesis making the node hold a stream) and are closed now.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quire::api::access::app_label;
use quire::node::RunningNode;
use quire::pb;
use quire::projection_api::{AuthorKey, Kind, StreamId};
use quire::scribe::{Body, Scribe};
use serde_json::{json, Value as Json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// What a refused request must leave as it was: the log's head, the streams and the peers.
#[derive(Debug, PartialEq)]
struct Fingerprint {
    head: u64,
    streams: Vec<(Bytes, u64)>,
    peers: Vec<String>,
}

async fn fingerprint(url: &str) -> Fingerprint {
    let status = clients(url)
        .await
        .admin
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    Fingerprint {
        head: status.head_seq,
        streams: status
            .streams
            .iter()
            .map(|s| (s.stream.clone(), s.head_seq))
            .collect(),
        peers: status.peers.iter().map(|p| p.addr.clone()).collect(),
    }
}

/// Writes `request` as is to the node's API port and reads until the node closes the connection
/// (or 5 s pass). Returns everything read.
async fn raw(node: &RunningNode, request: &str) -> String {
    let mut socket = tokio::net::TcpStream::connect(node.api_addr).await.unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status codes of every HTTP/1.1 response in `text`.
fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| text[at + 9..].get(..3)?.parse().ok())
        .collect()
}

/// PUTs a `note` table schema into `stream` as the owner.
async fn put_schema(node: &RunningNode, stream: &StreamId) {
    let put = reqwest::Client::new()
        .put(format!("{}/{}/_schema", node.url(), stream.to_hex()))
        .bearer_auth(node.token.as_str())
        .header("content-type", "application/json")
        .body(r#"{"schema": {"note": {"text": "text"}}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 204);
}

/// A `record.add` a stranger signs into `stream` (nonce 0: no work token).
fn stranger_record(stream: &StreamId, text: &str) -> Scribe {
    let key = client_key(77);
    Scribe::sign(
        Body {
            stream: Some(*stream),
            author: AuthorKey(key.verifying_key().to_bytes()),
            hlc: 1,
            kind: Kind::RecordAdd,
            content_type: "application/json".into(),
            payload: Bytes::from(json!({"_table": "note", "text": text}).to_string()),
            parents: vec![],
            membership: None,
            nonce: 0,
        },
        &key,
    )
}

fn leading_zero_bits(bytes: &[u8]) -> u32 {
    let mut bits = 0;
    for byte in bytes {
        if *byte == 0 {
            bits += 8;
        } else {
            return bits + byte.leading_zeros();
        }
    }
    bits
}

// ---------------------------------------------------------------------------------------------
// Holes.
// ---------------------------------------------------------------------------------------------

/// The owner keeps a stream where only the owner (the node) may add records. A stranger's own
/// `record.add` is refused by that policy, but the same stranger — a local process, or anyone on
/// the network with `--insecure-api`/TLS — only has to send `Host: <label>.localhost` and a
/// matching `Origin` to become `Caller::App` and have the node sign the record for it: no token,
/// no browser. The policy's author rule is void for every stream the node holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_app_origin_cannot_sign_past_an_owner_only_record_rule() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let url = node.url();
    let mut owner = clients(&url).await;
    let policy = pb::Policy {
        rules: vec![pb::KindRule {
            kind: "record.add".into(),
            authors: Some(pb::Authors {
                anyone: false,
                owner: true,
                keys: vec![],
                writers: false,
            }),
        }],
        ..Default::default()
    };
    let diary = create_stream(&mut owner, "the owner's diary", Some(policy)).await;
    put_schema(&node, &diary).await;
    // The policy holds for a stranger's own scribes.
    let mut stranger = pb::log_client::LogClient::new(stranger_channel(&url).await);
    let refused = stranger
        .append_signed(signed_request(stranger_record(&diary, "mine").parts()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // Not a browser: a program that says it is the diary's page.
    let host = format!("{}.localhost", app_label(&diary));
    let origin = format!("http://{host}:{}", node.api_addr.port());
    let (status, reply) = http_to(
        &node,
        Some(&host),
        reqwest::Method::POST,
        "/add_record",
        &[("origin", origin)],
        Some(json!({"_table": "note", "text": "written by a stranger, signed by the node"})),
    )
    .await;
    assert!(
        status == 401 || status == 403,
        "a client without the token made the node sign a record.add into an owner-only stream: {status} {reply}"
    );
    assert!(query_notes(&node.url(), &diary.to_hex()).await.is_empty());
    node.stop().await.unwrap();
}

/// `work_bits` is what a stream asks of writers it does not know: a stranger's `record.add`
/// without the work is refused. Forging the app's Origin makes the node do the work (it mines the
/// nonce for node-signed records) and sign: the spam limit is gone and the node's CPU is the
/// attacker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_app_origin_cannot_make_the_node_do_a_strangers_work() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let url = node.url();
    let created: Json = reqwest::Client::new()
        .post(format!("{url}/create_app"))
        .bearer_auth(node.token.as_str())
        .json(&json!({"work_bits": 12}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let app: StreamId = created["tid"].as_str().unwrap().parse().unwrap();
    put_schema(&node, &app).await;
    let spam = stranger_record(&app, "spam");
    assert!(
        leading_zero_bits(spam.id.as_bytes()) < 12,
        "pick another seed"
    );
    let mut stranger = pb::log_client::LogClient::new(stranger_channel(&url).await);
    let refused = stranger
        .append_signed(signed_request(spam.parts()))
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("zero bits"),
        "a stranger must do the work: {refused:?}"
    );
    let host = format!("{}.localhost", app_label(&app));
    let origin = format!("http://{host}:{}", node.api_addr.port());
    let (status, reply) = http_to(
        &node,
        Some(&host),
        reqwest::Method::POST,
        "/add_record",
        &[("origin", origin)],
        Some(json!({"_table": "note", "text": "spam, mined by the node"})),
    )
    .await;
    assert!(
        status == 401 || status == 403,
        "a client without the token had the node mine and sign its record: {status} {reply}"
    );
    node.stop().await.unwrap();
}

/// A node that died without cleaning up (kill -9, OOM, power loss, a reboot) leaves `api.addr`
/// behind. Another local user who binds that address first gets the owner's token from the next
/// `quire -d DIR ...`: the CLI trusts `api.addr` without checking that the node is running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_api_addr_never_gets_the_token() {
    let dir = tempfile::tempdir().unwrap();
    // The owner's data directory: a node ran here and crashed.
    let node = start_node(dir.path()).await;
    let token = node.token.as_str().to_string();
    let addr_file = dir.path().join("api.addr");
    wait_until(Duration::from_secs(30), "api.addr", || {
        let exists = addr_file.exists();
        async move { exists }
    })
    .await;
    let served = std::fs::read_to_string(&addr_file).unwrap();
    node.stop().await.unwrap();
    // Another user's listener, on the address the stale file names (here: a fresh port).
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let imposter = format!("http://{}", listener.local_addr().unwrap());
    let router = axum::Router::new().fallback({
        let seen = seen.clone();
        move |headers: axum::http::HeaderMap| {
            let seen = seen.clone();
            async move {
                if let Some(value) = headers.get("authorization") {
                    seen.lock()
                        .unwrap()
                        .push(value.to_str().unwrap_or_default().to_string());
                }
                tonic::Status::unavailable("not quire")
                    .into_http()
                    .map(axum::body::Body::new)
            }
        }
    });
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(tonic::service::Routes::from(router))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    assert!(served.starts_with("http://127.0.0.1:"), "{served}");
    std::fs::write(dir.path().join("api.addr"), format!("{imposter}\n")).unwrap();
    let data = dir.path().to_path_buf();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(quire_bin())
            .arg("-d")
            .arg(&data)
            .env_remove("QUIRE_TOKEN")
            .env_remove("QUIRE_NODE")
            .args(["stream", "list"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    server.abort();
    let seen = seen.lock().unwrap().clone();
    assert!(
        !seen.iter().any(|value| value.contains(&token)),
        "the CLI sent the owner's token to a listener that is not the node: {seen:?} ({})",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// "Creating streams or apps" needs the owner (`docs/security.md`), but a stranger who signs a
/// `stream.create` genesis with a key of its own and sends it to `Log.AppendSigned` makes the
/// node hold a new stream — listed, projected (three projections each), and served as an app
/// origin `<label>.localhost` — as many as it likes, without the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_cannot_make_the_node_hold_new_streams() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let url = node.url();
    let before = fingerprint(&url).await;
    let key = client_key(78);
    let genesis = Scribe::sign(
        Body {
            stream: None,
            author: AuthorKey(key.verifying_key().to_bytes()),
            hlc: 1,
            kind: Kind::StreamCreate,
            content_type: quire::genesis::GENESIS_CONTENT_TYPE.into(),
            payload: Bytes::from(quire::genesis::genesis_payload(
                "squatter", None, None, None, [7; 16],
            )),
            parents: vec![],
            membership: None,
            nonce: 0,
        },
        &key,
    );
    let mut stranger = pb::log_client::LogClient::new(stranger_channel(&url).await);
    let answer = stranger
        .append_signed(signed_request(genesis.parts()))
        .await;
    let after = fingerprint(&url).await;
    assert!(
        answer.is_err() && after.streams == before.streams,
        "a client without the token made the node hold a new stream: {answer:?}, streams {} -> {}",
        before.streams.len(),
        after.streams.len()
    );
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Pins: attacks that fail today.
// ---------------------------------------------------------------------------------------------

/// A DNS-rebinding page cannot choose its Host; a raw client tries every spelling anyway. With the
/// owner's token (as if it had it) every one is refused and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_hosts_in_every_spelling_are_refused_on_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let url = node.url();
    let before = fingerprint(&url).await;
    let port = node.api_addr.port();
    let token = node.token.as_str();
    let label = app_label(&StreamId::from_slice(&[9; 32]).unwrap());
    let post = |target: &str, hosts: &[String]| {
        let mut request = format!("POST {target} HTTP/1.1\r\n");
        for host in hosts {
            request.push_str(&format!("Host: {host}\r\n"));
        }
        request.push_str(&format!(
            "Authorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        ));
        request
    };
    let cases: Vec<(&str, String)> = vec![
        (
            "rebinding",
            post("/create_app", &[format!("evil.example:{port}")]),
        ),
        (
            "localhost as a prefix",
            post("/create_app", &[format!("localhost.evil.example:{port}")]),
        ),
        (
            "an IP as a prefix",
            post("/create_app", &[format!("127.0.0.1.nip.io:{port}")]),
        ),
        (
            "an app label under a foreign name",
            post("/create_app", &[format!("{label}.evil.example:{port}")]),
        ),
        (
            "two labels",
            post(
                "/create_app",
                &[format!("{label}.{label}.localhost:{port}")],
            ),
        ),
        (
            "upper case and trailing dots",
            post("/create_app", &[format!("EVIL.example.:{port}")]),
        ),
        (
            "a foreign Host first, ours second",
            post(
                "/create_app",
                &[format!("evil.example:{port}"), format!("localhost:{port}")],
            ),
        ),
        (
            "absolute form naming a foreign host",
            post(
                &format!("http://evil.example:{port}/create_app"),
                &[format!("localhost:{port}")],
            ),
        ),
        (
            "an IPv6 zone id",
            post("/create_app", &[format!("[fe80::1%25lo]:{port}")]),
        ),
        (
            "a short IPv4 form",
            post("/create_app", &[format!("0x7f.1:{port}")]),
        ),
        ("an empty Host", post("/create_app", &[String::new()])),
    ];
    for (what, request) in &cases {
        let answer = raw(&node, request).await;
        let codes = statuses(&answer);
        assert!(
            !codes.is_empty() && codes.iter().all(|code| *code >= 400),
            "{what}: {answer}"
        );
    }
    assert_eq!(fingerprint(&url).await, before);
    node.stop().await.unwrap();
}

/// On an app's host, only a page of that very origin is the app. Pages of look-alike origins —
/// `null`, a trailing dot, another scheme or port, another app, the node — are refused, as is a
/// same-site fetch without Origin, and a `Sec-Fetch-Site: none` that comes with an Origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alike_origins_are_not_the_app() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let url = node.url();
    let mut owner = clients(&url).await;
    let victim = create_stream(&mut owner, "victim", None).await;
    let other = create_stream(&mut owner, "other", None).await;
    put_schema(&node, &victim).await;
    let before = fingerprint(&url).await;
    let port = node.api_addr.port();
    let host = format!("{}.localhost", app_label(&victim));
    let other_host = format!("{}.localhost", app_label(&other));
    let token = format!("Bearer {}", node.token.as_str());
    let record = json!({"_table": "note", "text": "forged"});
    let headers: Vec<Vec<(&str, String)>> = vec![
        vec![("origin", "null".into())],
        vec![("origin", format!("http://{host}.:{port}"))],
        vec![("origin", format!("https://{host}:{port}"))],
        vec![("origin", format!("http://{host}:{}", port.wrapping_add(1)))],
        vec![("origin", format!("http://{host}"))],
        vec![("origin", format!("http://{host}:{port}/"))],
        vec![("origin", format!("http://{other_host}:{port}"))],
        vec![("origin", format!("http://localhost:{port}"))],
        vec![("origin", format!("http://127.0.0.1:{port}"))],
        vec![("origin", format!("http://x.{host}:{port}"))],
        vec![
            ("origin", format!("http://{other_host}:{port}")),
            ("sec-fetch-site", "none".into()),
            ("authorization", token.clone()),
        ],
        vec![("sec-fetch-site", "same-site".into())],
        vec![("sec-fetch-site", "cross-site".into())],
        vec![
            ("sec-fetch-site", "cross-site".into()),
            ("sec-fetch-mode", "navigate".into()),
        ],
    ];
    for headers in &headers {
        let (status, reply) = http_to(
            &node,
            Some(&host),
            reqwest::Method::POST,
            "/add_record",
            headers,
            Some(record.clone()),
        )
        .await;
        assert_eq!(status, 403, "{headers:?}: {reply}");
    }
    // The app's own page on the node's host, with the token it somehow got: still refused.
    let (status, reply) = http_to(
        &node,
        None,
        reqwest::Method::POST,
        &format!("/{}/add_record", victim.to_hex()),
        &[
            ("origin", format!("http://{host}:{port}")),
            ("authorization", token.clone()),
        ],
        Some(record.clone()),
    )
    .await;
    assert_eq!(status, 403, "{reply}");
    assert_eq!(fingerprint(&url).await, before);
    assert!(query_notes(&node.url(), &victim.to_hex()).await.is_empty());
    node.stop().await.unwrap();
}

/// From its own origin, an app's page tries to reach another app's stream through paths: the
/// other's id, dot segments, encoded slashes and dots, doubled slashes. Nothing lands in the
/// other stream and none of it is a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_page_cannot_path_its_way_into_another_app() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let url = node.url();
    let mut owner = clients(&url).await;
    let mine = create_stream(&mut owner, "mine", None).await;
    let theirs = create_stream(&mut owner, "theirs", None).await;
    put_schema(&node, &mine).await;
    put_schema(&node, &theirs).await;
    let before = fingerprint(&url).await;
    let port = node.api_addr.port();
    let host = format!("{}.localhost", app_label(&mine));
    let origin = format!("http://{host}:{port}");
    let (m, t) = (mine.to_hex(), theirs.to_hex());
    let body = r#"{"_table": "note", "text": "crossed over"}"#;
    let paths = [
        format!("/{t}/add_record"),
        format!("/{m}/{t}/add_record"),
        format!("/{m}/../{t}/add_record"),
        format!("/%2e%2e/{t}/add_record"),
        format!("/{m}/%2e%2e/{t}/add_record"),
        format!("/{t}%2Fadd_record"),
        format!("/{m}%2F..%2F{t}%2Fadd_record"),
        format!("//{t}/add_record"),
        format!("/./{t}/add_record"),
        format!("/{t}/add_record/"),
        format!("http://localhost:{port}/{t}/add_record"),
    ];
    for path in &paths {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nOrigin: {origin}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let answer = raw(&node, &request).await;
        let codes = statuses(&answer);
        assert!(
            !codes.is_empty() && codes.iter().all(|code| *code >= 400),
            "{path}: {answer}"
        );
    }
    // Files: another app's id on this host names a path in this app, not the other app.
    for method in ["PUT", "DELETE"] {
        let request = format!(
            "{method} /{t}/_schema HTTP/1.1\r\nHost: {host}:{port}\r\nOrigin: {origin}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        let answer = raw(&node, &request).await;
        assert!(
            statuses(&answer).iter().all(|code| *code >= 400),
            "{answer}"
        );
    }
    assert_eq!(fingerprint(&url).await, before);
    assert!(query_notes(&node.url(), &theirs.to_hex()).await.is_empty());
    node.stop().await.unwrap();
}

/// gRPC dressed as other content types, and HTTP requests dressed as gRPC: whichever side they
/// land on, the owner's methods refuse them without the token, pages are refused outright, and
/// nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_http_in_each_others_clothes_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let url = node.url();
    let mut owner = clients(&url).await;
    let app = create_stream(&mut owner, "app", None).await;
    let before = fingerprint(&url).await;
    let port = node.api_addr.port();
    let host = format!("{}.localhost", app_label(&app));
    let origin = format!("http://{host}:{port}");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(&host, node.api_addr)
        .build()
        .unwrap();
    // An empty Streams.Create message, framed as gRPC.
    let frame = Bytes::from_static(&[0, 0, 0, 0, 0]);
    for content_type in [
        "application/grpc",
        "application/grpc+proto",
        "application/grpc-web",
        "application/grpc-web+proto",
        "application/grpc-web-text",
        "Application/GRPC",
        "application/json",
        "text/plain",
    ] {
        for path in [
            "/quire.v1.Streams/Create",
            "/quire.v1.Admin/RotateToken",
            "/quire.v1.Admin/AddPeer",
            "/create_app",
        ] {
            for (base, extra) in [
                (url.clone(), None),
                (format!("http://{host}:{port}"), Some(origin.clone())),
            ] {
                let mut request = client
                    .post(format!("{base}{path}"))
                    .header("content-type", content_type)
                    .header("te", "trailers")
                    .body(frame.clone());
                if let Some(origin) = &extra {
                    request = request.header("origin", origin);
                }
                let reply = request.send().await.unwrap();
                let status = reply.status().as_u16();
                let grpc_status = reply
                    .headers()
                    .get("grpc-status")
                    .map(|v| v.to_str().unwrap().to_string());
                let text = reply.text().await.unwrap_or_default();
                let refused =
                    status >= 400 || grpc_status.as_deref().is_some_and(|code| code != "0");
                assert!(
                    refused,
                    "{content_type} {base}{path}: {status} {grpc_status:?} {text}"
                );
            }
        }
    }
    // A page's gRPC to a public method: refused outright, as an HTTP 403 a page can see.
    let reply = client
        .post(format!("http://{host}:{port}/quire.v1.Streams/List"))
        .header("content-type", "application/grpc-web+proto")
        .header("origin", &origin)
        .body(frame.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 403);
    assert_eq!(fingerprint(&url).await, before);
    node.stop().await.unwrap();
}

/// Only the exact token makes the owner: look-alikes, other schemes, a prefix, a longer string, an
/// oversized header, a wrong token before the right one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_exact_token_makes_the_owner() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let url = node.url();
    let before = fingerprint(&url).await;
    let token = node.token.as_str().to_string();
    let huge = "a".repeat(60_000);
    let attempts: Vec<Vec<(&str, String)>> = vec![
        vec![("authorization", format!("Bearer {}", &token[..63]))],
        vec![("authorization", format!("Bearer {token}0"))],
        vec![("authorization", format!("Bearer 0{token}"))],
        vec![("authorization", format!("Basic {token}"))],
        vec![("authorization", format!("Token {token}"))],
        vec![("authorization", token.clone())],
        vec![("authorization", format!("Bearer {}", token.to_uppercase()))],
        vec![("authorization", format!("Bearer {huge}"))],
        vec![("authorization", "Bearer ".into())],
        vec![("x-authorization", format!("Bearer {token}"))],
        vec![
            ("authorization", "Bearer 0123456789abcdef-wrong".into()),
            ("authorization", format!("Bearer {token}")),
        ],
    ];
    for headers in &attempts {
        let (status, _) = http_to(
            &node,
            None,
            reqwest::Method::POST,
            "/create_app",
            headers,
            Some(json!({})),
        )
        .await;
        assert!(
            status == 401 || status == 431 || status == 400,
            "{:?}: {status}",
            headers
                .iter()
                .map(|(n, v)| (n, v.len()))
                .collect::<Vec<_>>()
        );
    }
    assert_eq!(fingerprint(&url).await, before);
    node.stop().await.unwrap();
}

/// A refused request whose body is another request (for the app's host, with its Origin): the
/// node answers the outer request only and never runs the inner one, with Content-Length and with
/// a Content-Length/Transfer-Encoding conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_smuggles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let url = node.url();
    let mut owner = clients(&url).await;
    let app = create_stream(&mut owner, "app", None).await;
    put_schema(&node, &app).await;
    let before = fingerprint(&url).await;
    let port = node.api_addr.port();
    let host = format!("{}.localhost:{port}", app_label(&app));
    let record = r#"{"_table": "note", "text": "smuggled"}"#;
    let inner = format!(
        "POST /add_record HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{record}",
        record.len()
    );
    let with_length = format!(
        "POST /create_app HTTP/1.1\r\nHost: evil.example:{port}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{inner}",
        inner.len()
    );
    let conflicting = format!(
        "POST /create_app HTTP/1.1\r\nHost: evil.example:{port}\r\nContent-Type: text/plain\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{inner}"
    );
    let chunked_short = format!(
        "POST /create_app HTTP/1.1\r\nHost: evil.example:{port}\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{inner}\r\n0\r\n\r\n",
        inner.len()
    );
    for (what, request) in [
        ("content-length", &with_length),
        ("cl+te", &conflicting),
        ("chunked", &chunked_short),
    ] {
        let answer = raw(&node, request).await;
        let codes = statuses(&answer);
        assert!(
            !codes.is_empty() && codes.iter().all(|code| *code >= 400),
            "{what}: only refusals: {answer}"
        );
    }
    assert_eq!(fingerprint(&url).await, before);
    assert!(query_notes(&node.url(), &app.to_hex()).await.is_empty());
    node.stop().await.unwrap();
}

/// Whatever the node's own host serves runs no script with the node's origin: an HTML and an SVG
/// file an owner published, their HEAD and 304 answers, and error answers all carry the sandbox;
/// a browser is sent on to the app's origin, never elsewhere, whatever the path says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_host_runs_nothing_and_redirects_only_to_the_app() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let url = node.url();
    let mut owner = clients(&url).await;
    let app = create_stream(&mut owner, "app", None).await;
    let tid = app.to_hex();
    let port = node.api_addr.port();
    let http_client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for (path, content_type, body) in [
        ("page.html", "text/html", "<script>alert(1)</script>"),
        (
            "image.svg",
            "image/svg+xml",
            "<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>",
        ),
    ] {
        let put = http_client
            .put(format!("{url}/{tid}/{path}"))
            .bearer_auth(node.token.as_str())
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 204);
        let etag = put.headers()["etag"].to_str().unwrap().to_string();
        for (method, extra) in [
            (reqwest::Method::GET, None),
            (reqwest::Method::HEAD, None),
            (reqwest::Method::GET, Some(etag.clone())),
        ] {
            let mut request = http_client.request(method.clone(), format!("{url}/{tid}/{path}"));
            if let Some(etag) = &extra {
                request = request.header("if-none-match", etag);
            }
            let reply = request.send().await.unwrap();
            assert!(reply.status().as_u16() < 400, "{method} {path}");
            let csp = reply
                .headers()
                .get("content-security-policy")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            assert!(csp.starts_with("sandbox"), "{method} {path}: {csp:?}");
        }
    }
    for path in [format!("/{tid}/nope.html"), "/nope".into()] {
        let reply = http_client
            .get(format!("{url}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 404);
        assert!(reply.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("sandbox"));
    }
    // A browser's navigation goes to the app's origin with the path kept, never to another host.
    let app_origin = format!("http://{}.localhost:{port}/", app_label(&app));
    for path in [
        "%2F%2Fevil.example/x",
        "%5C%5Cevil.example",
        "@evil.example",
        "..%2F..%2Fevil",
        "%0d%0aSet-Cookie:%20x=1",
    ] {
        let reply = http_client
            .get(format!("{url}/{tid}/{path}"))
            .header("sec-fetch-mode", "navigate")
            .header("sec-fetch-site", "cross-site")
            .send()
            .await
            .unwrap();
        if let Some(location) = reply.headers().get("location") {
            let location = location.to_str().unwrap();
            assert!(location.starts_with(&app_origin), "{path}: {location}");
            let parsed = reqwest::Url::parse(location).unwrap();
            assert_eq!(
                parsed.host_str(),
                Some(format!("{}.localhost", app_label(&app)).as_str()),
                "{path}: {location}"
            );
        }
        assert!(reply.headers().get("set-cookie").is_none(), "{path}");
    }
    node.stop().await.unwrap();
}
