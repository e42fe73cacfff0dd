//! Attacks on the live binding (`src/api/live.rs`, `docs/live.md`) and the API listener it rides
//! on (`src/api/listen.rs`), as a stranger, a hostile web page, or a slow client would make them.
//! Each test pins one attack and the node's answer to it. Twelve of them found bugs when they were
//! written (the listener had no deadline before a request's first bytes, a rotated token kept
//! its sockets, a client that stopped reading mid-backlog was never dropped, ...); all are fixed,
//! and the tests keep them fixed.
//!
//! `tests/it/live.rs` already covers the dispatch table, a foreign Origin / the app's Origin on
//! the node's host / a wrong token at the upgrade, an anonymous `add_record`, the subscription
//! limit, a frame over the size limit, and a client that stops reading and then resumes; none of
//! that is repeated here.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use quire::api::access::app_label;
use quire::api::live;
use quire::node::{NodeConfig, RunningNode};
use quire::pb;
use quire::projection_api::StreamId;
use serde_json::{json, Value as Json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::common::*;
use crate::ws::*;

/// A stream of messages with one list, `latest`, five rows a page.
const BOARD: &str = r#"{"schema": {"message": {"author": "text", "text": "text"}},
    "lists": {"latest": {"query": "SELECT id, author, text, score, timestamp FROM message ORDER BY timestamp DESC, id", "page_size": 5}}}"#;

// ---------------------------------------------------------------------------------------------
// Connections (the shared client, generic over the transport so TLS can use it too, is
// `tests/it/ws.rs`).

/// The HTTP status an upgrade was refused with.
fn refused_with<S>(result: Result<Live<S>, WsError>) -> u16 {
    match result {
        Ok(_) => 101,
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("refused with an HTTP status, not {other}"),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Live<S> {
    /// Calls function `name` (already subscribed): Ok(the returned value) or Err(the message of
    /// the error frame that names this call). Frames of other groups are skipped.
    async fn try_call(&mut self, name: &str, id: &str, args: Json) -> Result<Json, String> {
        let failed = format!("call {id} of {name} failed: ");
        match self.call_frames(name, id, args).await.0 {
            Ok(frame) => Ok(frame["value"].clone()),
            Err(frame) => {
                let message = frame["message"].as_str().unwrap_or_default();
                assert!(message.starts_with(&failed), "unexpected error: {frame}");
                Err(message.to_string())
            }
        }
    }

    /// The current value of var `name` (subscribes first): the first `set` of it after a
    /// `get` (a change pushed before the get's answer is newer still).
    async fn var(&mut self, name: &str) -> Json {
        self.send(json!({"func": "subscribe", "type": "var", "name": name}))
            .await;
        self.send(json!({"func": "get", "type": "var", "name": name}))
            .await;
        loop {
            let frame = self.next().await;
            assert_ne!(frame["func"], "error", "{frame}");
            if frame["type"] == "var" && frame["name"] == name {
                assert_eq!(frame["func"], "set", "{frame}");
                return frame["value"].clone();
            }
        }
    }

    /// Subscribes list `name` and returns the `set_all` of page `page`.
    async fn page(&mut self, name: &str, page: u64) -> Json {
        self.subscribe("list", name).await;
        let frame = self
            .ask(json!({"func": "get", "type": "list", "name": name, "page": page}))
            .await;
        assert_eq!(frame["func"], "set_all", "{frame}");
        frame
    }
}

// ---------------------------------------------------------------------------------------------
// Streams and addresses.

/// The newest seq of `stream` on `node`.
fn head_of(node: &RunningNode, stream: &StreamId) -> u64 {
    node.log.stream(stream).unwrap().record.head_seq
}

/// A policy that keeps `kinds` to the stream's owner.
fn owner_only(kinds: &[&str]) -> pb::Policy {
    pb::Policy {
        rules: kinds
            .iter()
            .map(|kind| pb::KindRule {
                kind: kind.to_string(),
                authors: Some(pb::Authors {
                    owner: true,
                    keys: vec![],
                    anyone: false,
                    writers: false,
                }),
            })
            .collect(),
        ..Default::default()
    }
}

/// A local address of this machine that is not loopback, if it has one.
fn non_loopback_ipv4() -> Option<IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    // A UDP "connect" sends nothing: it only picks the route, and so the source address.
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

// ---------------------------------------------------------------------------------------------
// 1. Who may open the socket.

/// An upgrade attempt: the Host (None: the node's address), the path, extra headers.
type Attempt = (Option<String>, String, Vec<(&'static str, String)>);

/// Pins cross-site WebSocket hijacking and Host tricks beyond tests/it/live.rs: `Origin: null`
/// (a sandboxed iframe), the app's origin without its port, over https, with a look-alike label
/// (one character off: another stream's label), with userinfo, with a suffix after the port or
/// the name, the node's own origin on the node's host and on `localhost`, a foreign page that
/// carries the owner's token, `Sec-Fetch-Site: cross-site` / `same-site` without Origin (a
/// sibling app under `*.localhost` is same-site), a Host with a trailing dot, a DNS-rebinding
/// Host, an app label under a foreign name — every one is refused 403 before the socket opens.
/// An app host's `/<other tid>/socksync`, a look-alike app host, a stream the node does not hold
/// and a tid that is not one are 404: no socket on another stream. A foreign page that claims a
/// navigation (`Sec-Fetch-Mode: navigate`, which a page cannot set on a WebSocket) gets in only
/// as anyone, and cannot write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_and_look_alike_upgrades_are_refused_before_the_socket_opens() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = stream_with(&node, "target", BOARD, None).await;
    let other = stream_with(&node, "other", BOARD, None).await;
    let port = node.api_addr.port();
    let app = app_host(&stream);
    let label = app_label(&stream);
    // One character off: still a valid label, of a stream this node does not hold.
    let first = if label.starts_with('a') { "b" } else { "a" };
    let look_alike = format!("{first}{}.localhost", &label[1..]);
    assert!(quire::api::access::parse_app_label(&look_alike[..52]).is_some());
    let tid_path = format!("/{}/socksync", stream.to_hex());
    let head = head_of(&node, &stream);

    let origin = |value: String| vec![("origin", value)];
    let site = |value: &str| vec![("sec-fetch-site", value.to_string())];
    let forbidden: Vec<Attempt> = vec![
        (Some(app.clone()), "/socksync".into(), origin("null".into())),
        (
            Some(app.clone()),
            "/socksync".into(),
            origin(format!("http://{app}")),
        ),
        (
            Some(app.clone()),
            "/socksync".into(),
            origin(format!("https://{app}:{port}")),
        ),
        (
            Some(app.clone()),
            "/socksync".into(),
            origin(format!("http://{look_alike}:{port}")),
        ),
        (
            Some(app.clone()),
            "/socksync".into(),
            origin(format!("http://evil@{app}:{port}")),
        ),
        (
            Some(app.clone()),
            "/socksync".into(),
            origin(format!("http://{app}:{port}.evil.example")),
        ),
        (
            Some(app.clone()),
            "/socksync".into(),
            origin(format!("http://{app}.evil.example:{port}")),
        ),
        (
            Some(app.clone()),
            "/socksync".into(),
            origin(format!("http://localhost:{port}")),
        ),
        (
            Some(app.clone()),
            "/socksync".into(),
            origin(format!("http://{}:{port}", app_host(&other))),
        ),
        (
            Some(app.clone()),
            "/socksync".into(),
            vec![("origin", "https://evil.example".into()), bearer(&node)],
        ),
        (Some(app.clone()), "/socksync".into(), site("cross-site")),
        (Some(app.clone()), "/socksync".into(), site("same-site")),
        (
            Some(format!("{app}.")),
            "/socksync".into(),
            origin(format!("http://{app}:{port}")),
        ),
        (
            None,
            tid_path.clone(),
            origin(format!("http://127.0.0.1:{port}")),
        ),
        (
            Some("localhost".into()),
            tid_path.clone(),
            origin(format!("http://localhost:{port}")),
        ),
        (
            None,
            tid_path.clone(),
            vec![("origin", "null".into()), bearer(&node)],
        ),
        (Some("evil.example".into()), tid_path.clone(), vec![]),
        (
            Some(format!("{label}.evil.example")),
            "/socksync".into(),
            vec![],
        ),
        (Some(format!("localhost.{app}")), "/socksync".into(), vec![]),
    ];
    for (host, path, headers) in &forbidden {
        let status = refused_with(open_as(&node, host.as_deref(), path, headers).await);
        assert_eq!(status, 403, "Host {host:?}, {path}, {headers:?}");
    }
    let own_origin = origin(format!("http://{app}:{port}"));
    let not_found: Vec<Attempt> = vec![
        // Another app's tid on an app's host: a file path, not the other stream's socket.
        (
            Some(app.clone()),
            format!("/{}/socksync", other.to_hex()),
            own_origin.clone(),
        ),
        (
            Some(app.clone()),
            format!("/{}/socksync", other.to_hex()),
            vec![bearer(&node)],
        ),
        (
            Some(look_alike.clone()),
            "/socksync".into(),
            origin(format!("http://{look_alike}:{port}")),
        ),
        (
            None,
            format!("/{}/socksync", "ab".repeat(32)),
            vec![bearer(&node)],
        ),
        (None, "/not-a-tid/socksync".into(), vec![]),
        (None, "/socksync".into(), vec![bearer(&node)]),
    ];
    for (host, path, headers) in &not_found {
        let status = refused_with(open_as(&node, host.as_deref(), path, headers).await);
        assert_eq!(status, 404, "Host {host:?}, {path}, {headers:?}");
    }

    // A (forged) navigation from a foreign page is let in as anyone: it may read, not write.
    let mut navigated = open_as(
        &node,
        Some(&app),
        "/socksync",
        &[
            ("origin", "http://evil.example".into()),
            ("sec-fetch-mode", "navigate".into()),
            ("sec-fetch-site", "cross-site".into()),
        ],
    )
    .await
    .expect("a navigation is let in as anyone");
    assert_eq!(navigated.page("latest", 0).await["total_item_count"], 0);
    navigated.subscribe("function", "add_record").await;
    let refused = navigated
        .try_call(
            "add_record",
            "n1",
            json!({"_table": "message", "author": "evil", "text": "csrf"}),
        )
        .await
        .unwrap_err();
    assert!(refused.contains("token"), "{refused}");
    assert_eq!(head_of(&node, &stream), head, "a refusal changed the log");
    node.stop().await.unwrap();
}

/// Pins that a stranger (no token, not a page) who opens `/<tid>/socksync` can call no write:
/// `add_record`, `upvote`, `kv_set` and `kv_delete` each fail with error 8 naming the token,
/// also when smuggled with odd names (`ADD_RECORD`, a trailing space: error 3, not a call); and
/// afterwards nothing changed — not the stream's log, not the list (count, score), not the var.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_can_call_no_write_and_a_refusal_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = stream_with(&node, "strangers", BOARD, None).await;
    let (record, _) = add(&node, &stream, json!({"_table": "message", "text": "hi"})).await;
    let mut owner = open(&node, &stream, true).await;
    owner.subscribe("function", "kv_set").await;
    owner
        .try_call("kv_set", "o1", json!({"key": "motd", "value": "hello"}))
        .await
        .unwrap();
    let head = head_of(&node, &stream);

    let mut stranger = open(&node, &stream, false).await;
    for name in ["add_record", "upvote", "kv_set", "kv_delete"] {
        stranger.subscribe("function", name).await;
    }
    let calls = [
        ("add_record", json!({"_table": "message", "text": "spam"})),
        ("upvote", json!({"id": record})),
        ("kv_set", json!({"key": "motd", "value": "pwned"})),
        ("kv_delete", json!({"key": "motd"})),
    ];
    for (n, (name, args)) in calls.iter().enumerate() {
        let refused = stranger
            .try_call(name, &format!("s{n}"), args.clone())
            .await
            .unwrap_err();
        assert!(refused.contains("token"), "{name}: {refused}");
    }
    for name in ["ADD_RECORD", "add_record ", "kv_set\u{0}", "Query"] {
        assert_eq!(
            stranger
                .ask(json!({"func": "subscribe", "type": "function", "name": name}))
                .await,
            error(3, &format!("{name} is not registered.")),
        );
    }
    assert_eq!(
        head_of(&node, &stream),
        head,
        "a refused call changed the log"
    );
    let page = stranger.page("latest", 0).await;
    assert_eq!(page["total_item_count"], 1, "{page}");
    assert_eq!(page["items"][0]["score"], 0, "{page}");
    assert_eq!(stranger.var("motd").await, "hello");
    node.stop().await.unwrap();
}

/// Pins an app's page (its own Host and Origin, over loopback) on a stream whose policy keeps
/// `record.upvote`, `kv.set` and `kv.delete` to the owner: it may add records (anyone may), but
/// its `upvote`, `kv_set` and `kv_delete` fail with error 8 naming the policy; on a stream that
/// asks work of every record its `add_record` fails naming the work. Nothing of it reaches the
/// log, while the owner's own socket may do all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_page_writes_only_what_its_stream_lets_anyone_write() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let policy = owner_only(&["record.upvote", "kv.set", "kv.delete"]);
    let stream = stream_with(&node, "guarded", BOARD, Some(policy)).await;
    let mut owner = open(&node, &stream, true).await;
    owner.subscribe("function", "kv_set").await;
    owner
        .try_call("kv_set", "o1", json!({"key": "motd", "value": 1}))
        .await
        .expect("the owner may");

    let mut page = open_app(&node, &stream, "/socksync").await.unwrap();
    for name in ["add_record", "upvote", "kv_set", "kv_delete"] {
        page.subscribe("function", name).await;
    }
    let added = page
        .try_call(
            "add_record",
            "p1",
            json!({"_table": "message", "text": "from the page"}),
        )
        .await
        .expect("anyone may add records here");
    let head = head_of(&node, &stream);
    let calls = [
        ("upvote", json!({"id": added["id"]})),
        ("kv_set", json!({"key": "motd", "value": 2})),
        ("kv_set", json!({"key": "other", "value": 2})),
        ("kv_delete", json!({"key": "motd"})),
    ];
    for (n, (name, args)) in calls.iter().enumerate() {
        let refused = page
            .try_call(name, &format!("p{}", n + 2), args.clone())
            .await
            .unwrap_err();
        assert!(refused.contains("policy"), "{name}: {refused}");
    }
    assert_eq!(
        head_of(&node, &stream),
        head,
        "a refused call changed the log"
    );
    assert_eq!(page.var("motd").await, 1);
    assert_eq!(page.page("latest", 0).await["items"][0]["score"], 0);

    let work = pb::Policy {
        work_bits: 4,
        ..Default::default()
    };
    let worked = stream_with(&node, "work", BOARD, Some(work)).await;
    let head = head_of(&node, &worked);
    let mut page = open_app(&node, &worked, "/socksync").await.unwrap();
    page.subscribe("function", "add_record").await;
    let refused = page
        .try_call(
            "add_record",
            "w1",
            json!({"_table": "message", "text": "free work"}),
        )
        .await
        .unwrap_err();
    assert!(refused.contains("work"), "{refused}");
    assert_eq!(
        head_of(&node, &worked),
        head,
        "a refused call changed the log"
    );
    node.stop().await.unwrap();
}

/// Pins the loopback rule end to end: on a node whose API listens on all interfaces, a client
/// that reaches it over a non-loopback address and claims an app's Host and Origin is let in
/// only as anyone (reads, but its `add_record` fails naming the token), while the same claim
/// over 127.0.0.1 is the app (its `add_record` succeeds). Skipped on a machine with no
/// non-loopback IPv4 address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_origin_claimed_from_another_address_is_a_visitor() {
    let Some(ip) = non_loopback_ipv4() else {
        eprintln!("no non-loopback IPv4 address: skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let node = start_config(NodeConfig::new(dir.path()), false).await;
    // The test helpers reach it at 127.0.0.1; a second node on 0.0.0.0 is what this is about.
    let stream = stream_with(&node, "remote", BOARD, None).await;
    node.stop().await.unwrap();
    let node = RunningNode::start(
        NodeConfig::new(dir.path()),
        "0.0.0.0:0".parse().unwrap(),
        None,
    )
    .await
    .unwrap();
    let port = node.api_addr.port();
    let host = app_host(&stream);
    let headers = [("origin", format!("http://{host}:{port}"))];
    let authority = format!("{host}:{port}");

    let tcp = tcp_to(SocketAddr::new(ip, port), None).await;
    let mut remote = upgrade_over(tcp, &authority, "/socksync", &headers)
        .await
        .expect("a visitor may read");
    remote.page("latest", 0).await;
    remote.subscribe("function", "add_record").await;
    let refused = remote
        .try_call(
            "add_record",
            "r1",
            json!({"_table": "message", "text": "remote"}),
        )
        .await
        .unwrap_err();
    assert!(refused.contains("token"), "{refused}");

    let tcp = tcp_to(SocketAddr::from(([127, 0, 0, 1], port)), None).await;
    let mut local = upgrade_over(tcp, &authority, "/socksync", &headers)
        .await
        .unwrap();
    local.subscribe("function", "add_record").await;
    local
        .try_call(
            "add_record",
            "l1",
            json!({"_table": "message", "text": "local"}),
        )
        .await
        .expect("the app, over loopback, may add a record");
    node.stop().await.unwrap();
}

/// Pins the loopback rule on a dual-stack listener (`--api [::]:PORT`): a browser's connection
/// to `http://<label>.localhost:PORT` over IPv4 arrives as `::ffff:127.0.0.1`, which is loopback;
/// the app's page must be the app there (its `add_record` succeeds on a stream anyone may write).
/// Skipped where IPv6 is unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_page_over_ipv4_on_a_dual_stack_listener_is_the_app() {
    let dir = tempfile::tempdir().unwrap();
    let Ok(node) =
        RunningNode::start(NodeConfig::new(dir.path()), "[::]:0".parse().unwrap(), None).await
    else {
        eprintln!("no IPv6: skipped");
        return;
    };
    remember_token(
        &format!("http://[::1]:{}", node.api_addr.port()),
        node.token.as_str(),
    );
    let port = node.api_addr.port();
    let mut owner = clients(&format!("http://[::1]:{port}")).await;
    let stream = create_stream(&mut owner, "dual", None).await;
    let host = app_host(&stream);
    let headers = [("origin", format!("http://{host}:{port}"))];
    let tcp = tcp_to(SocketAddr::from(([127, 0, 0, 1], port)), None).await;
    let mut page = upgrade_over(tcp, &format!("{host}:{port}"), "/socksync", &headers)
        .await
        .expect("the app's page opens it");
    page.subscribe("function", "kv_set").await;
    let set = page
        .try_call("kv_set", "d1", json!({"key": "k", "value": 1}))
        .await;
    assert!(
        set.is_ok(),
        "the app's own page over IPv4 loopback was refused: {set:?}"
    );
    node.stop().await.unwrap();
}

/// Pins that rotating the owner's token takes the owner's rights from sockets opened with the
/// old one (docs/security.md: the old token "stops working at once"): after `Admin.RotateToken`
/// the old token is refused over HTTP (401) and at a new upgrade (401), and a socket opened with
/// it is told (error 8 naming the rotation) and closed; a stranger's socket is left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_closes_the_sockets_it_opened() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let policy = owner_only(&["kv.set", "record.add"]);
    let stream = stream_with(&node, "rotate", BOARD, Some(policy)).await;
    let mut old = open(&node, &stream, true).await;
    old.subscribe("function", "kv_set").await;
    old.try_call("kv_set", "before", json!({"key": "k", "value": 1}))
        .await
        .expect("the owner writes");
    let mut stranger = open(&node, &stream, false).await;

    let rotated = clients(&node.url())
        .await
        .admin
        .rotate_token(pb::RotateTokenRequest {})
        .await
        .expect("the owner rotates the token")
        .into_inner()
        .token;
    assert_ne!(rotated, node.token.as_str());
    let told = old.next().await;
    assert_eq!(told["error_code"], 8, "{told}");
    assert!(
        told["message"].as_str().unwrap().contains("rotated"),
        "{told}"
    );
    match old.event(WAIT).await {
        Event::Closed(_) => {}
        other => panic!("the old token's socket stays open: {other:?}"),
    }
    let (status, _) = post(
        &node,
        &stream,
        "add_record",
        true,
        json!({"_table": "message"}),
    )
    .await;
    assert_eq!(status, 401, "the old token is refused over HTTP");
    let refused = open_as(
        &node,
        None,
        &format!("/{}/socksync", stream.to_hex()),
        &[bearer(&node)],
    )
    .await;
    assert_eq!(refused_with(refused), 401, "and for a new socket");
    stranger
        .probe("a stranger's socket is not the owner's")
        .await;
    assert_eq!(stranger.var("k").await, 1);
    node.stop().await.unwrap();
}

/// Pins the same rule for a write the old token's socket sent just before the rotation but
/// that waits its turn behind 16 slow calls (each waits up to the 10 s apply timeout for a seq
/// the stream will not reach): once the token is rotated it must not run as the owner — the
/// session ends when the rotation is noticed, but a frame already being dispatched (blocked on
/// the call slots) runs when a slot frees, up to 10 s after the rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_queued_before_a_rotation_does_not_run_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = stream_with(&node, "queued", BOARD, Some(owner_only(&["kv.set"]))).await;
    let far = head_of(&node, &stream) + 1_000_000_000;
    let mut old = open(&node, &stream, true).await;
    old.subscribe("function", "query").await;
    old.subscribe("function", "kv_set").await;
    for n in 0..live::MAX_CALLS {
        old.send(
            json!({"func": "call", "type": "function", "name": "query", "id": n,
                        "args": {"query": "SELECT 1", "after_seq": far}}),
        )
        .await;
    }
    // Once this frame's error comes back, the node has started the 16 calls and is reading
    // the kv_set after it, which waits for a free call slot.
    old.send(json!("x")).await;
    old.send(
        json!({"func": "call", "type": "function", "name": "kv_set", "id": "late",
                    "args": {"key": "late", "value": "written after the rotation"}}),
    )
    .await;
    assert_eq!(old.next().await, error(1, "func is required."));
    let mut clients = clients(&node.url()).await;
    clients
        .admin
        .rotate_token(pb::RotateTokenRequest {})
        .await
        .unwrap();
    let rotated = Instant::now();
    let mut watcher = open(&node, &stream, false).await;
    while rotated.elapsed() < APPLY_TIMEOUT + Duration::from_secs(5) {
        let late = watcher.var("late").await;
        assert_eq!(
            late,
            Json::Null,
            "a write of the revoked token's socket ran {:?} after the rotation",
            rotated.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    node.stop().await.unwrap();
}

/// The node's apply timeout (`src/api/served.rs`): how long a call with `after_seq` waits.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// 2. Hostile frames.

/// Pins frames built to crash or confuse the session: JSON nested 200 and 500,000 deep, a lone
/// surrogate, a number too large for any float, `func` as an object; pages as strings of digits
/// with blanks, floats, negative, `true`, `u64::MAX` and a page whose offset overflows
/// `page * page_size` (error 8 "out of range", no panic) or is the largest valid one (an empty
/// page); a `page_size` of `u64::MAX` is lowered to the list's; unicode and NUL var names, a name
/// of exactly 1,024 bytes of two-byte characters (allowed) and one byte more (error 3). After
/// each, the session still answers, and the node serves a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_get_an_error_and_the_session_lives() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = stream_with(&node, "frames", BOARD, None).await;
    add(&node, &stream, json!({"_table": "message", "text": "one"})).await;
    let mut live = open(&node, &stream, false).await;

    for text in [
        format!("{}{}", "[".repeat(200), "]".repeat(200)),
        "[".repeat(500_000),
        format!(
            "{{\"func\": \"get\", \"type\": \"var\", \"name\": {}}}",
            "{\"a\":".repeat(300)
        ),
        r#"{"func": "get", "type": "var", "name": "\ud800"}"#.to_string(),
        r#"{"func": "get", "type": "list", "name": "latest", "page": 1e400}"#.to_string(),
    ] {
        live.raw(Message::Text(text.clone())).await;
        let answer = live.next().await;
        assert_eq!(
            answer,
            error(7, "Invalid json."),
            "{}",
            &text[..text.len().min(80)]
        );
        live.probe("after bad JSON").await;
    }
    let odd = live
        .ask(json!({"func": {"call": 1}, "type": "function", "name": "query"}))
        .await;
    assert_eq!(odd, error(1, r#"{"call":1} is not valid for this group."#));

    live.subscribe("list", "latest").await;
    let get = |page: Json, size: Json| json!({"func": "get", "type": "list", "name": "latest", "page": page, "page_size": size});
    let not_whole = error(8, "page must be a whole number (from 0)");
    for page in [
        json!(1.5),
        json!(-1),
        json!(true),
        json!("1e3"),
        json!({}),
        json!("-0"),
    ] {
        assert_eq!(
            live.ask(get(page.clone(), Json::Null)).await,
            not_whole,
            "{page}"
        );
    }
    for size in [
        json!(0),
        json!("0"),
        json!(1e30),
        json!("99999999999999999999999"),
    ] {
        assert_eq!(
            live.ask(get(json!(0), size.clone())).await,
            error(8, "page_size must be a whole number from 1"),
            "{size}"
        );
    }
    // Numbers as strings, with blanks: read as the number.
    let spaced = live.ask(get(json!(" 0 "), json!("2"))).await;
    assert_eq!(
        (&spaced["page"], &spaced["page_size"]),
        (&json!(0), &json!(2))
    );
    // page * page_size past i64: refused, not wrapped.
    for (page, size) in [
        (u64::MAX, 5u64),
        (u64::MAX / 5 + 1, 5),
        (i64::MAX as u64, 2),
    ] {
        let frame = live.ask(get(json!(page.to_string()), json!(size))).await;
        assert_eq!(
            frame,
            error(8, &format!("list latest: page {page} is out of range")),
            "{page} × {size}"
        );
    }
    let last = live.ask(get(json!(i64::MAX as u64 / 5), json!(5))).await;
    assert_eq!(
        (&last["items"], &last["total_item_count"]),
        (&json!([]), &json!(1))
    );
    let clamped = live.ask(get(json!(0), json!(u64::MAX))).await;
    assert_eq!(clamped["page_size"], 5, "{clamped}");
    assert_eq!(clamped["items"][0]["text"], "one");

    for name in [
        "ключ🔑",
        "\u{0}",
        "a\u{0}b",
        "\u{202e}evil",
        &"é".repeat(512),
    ] {
        assert_eq!(live.var(name).await, Json::Null, "{name:?}");
    }
    let long = "é".repeat(513);
    assert_eq!(
        live.ask(json!({"func": "subscribe", "type": "var", "name": long}))
            .await,
        error(3, &format!("{long} is not registered."))
    );
    live.probe("after everything").await;
    let mut fresh = open(&node, &stream, false).await;
    fresh.probe("a new connection").await;
    node.stop().await.unwrap();
}

/// Pins a WebSocket frame whose header announces 2^62 bytes (masked, as a client's must be): the
/// node closes the connection without trying to read or allocate it, and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_header_announcing_exabytes_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = stream_with(&node, "huge", BOARD, None).await;
    let mut live = open(&node, &stream, false).await;
    live.probe("before").await;
    let mut header = vec![0x81u8, 0xff];
    header.extend_from_slice(&(1u64 << 62).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    header.extend_from_slice(b"{\"func\"");
    live.ws.get_mut().write_all(&header).await.unwrap();
    let mut buffer = vec![0u8; 4096];
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match live.ws.get_mut().read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue, // a close frame, then the end
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection stayed open");
    open(&node, &stream, false)
        .await
        .probe("a new connection")
        .await;
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 3. Lists from `_schema`.

/// Pins that a `_schema` list cannot escape read-only: a list query that writes, attaches,
/// runs two statements or breaks out of the subquery the page is read from is refused when the
/// schema is put (the schema in force stays, its list still served); a list that calls
/// `load_extension` or never ends (a recursive CTE) fails as a list (error 8) within the time
/// limit, and the node still answers. Nothing is written by any of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_list_cannot_write_attach_or_run_forever() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = stream_with(&node, "lists", BOARD, None).await;
    add(
        &node,
        &stream,
        json!({"_table": "message", "text": "keep me"}),
    )
    .await;
    let schema = |lists: Json| {
        json!({"schema": {"message": {"author": "text", "text": "text"}}, "lists": lists})
            .to_string()
    };
    // Refused when put: the node stores the file, but the schema in force does not change.
    for query in [
        "DELETE FROM message",
        "INSERT INTO message (id, timestamp, score) VALUES ('x', 0, 0)",
        "ATTACH DATABASE '/tmp/quire-attack.db' AS evil",
        "SELECT 1; DELETE FROM message",
        "SELECT * FROM message) UNION ALL SELECT * FROM (SELECT * FROM message",
        "PRAGMA writable_schema = ON",
    ] {
        let bad = schema(json!({"latest": {"query": query}, "evil": {"query": query}}));
        let put = reqwest::Client::new()
            .put(format!("{}/{}/_schema", node.url(), stream.to_hex()))
            .bearer_auth(node.token.as_str())
            .header("content-type", "application/json")
            .body(bad)
            .send()
            .await
            .unwrap();
        let status = put.status().as_u16();
        // Once the tables include the put, the list is still the old one.
        let (applied, reply) = post(
            &node,
            &stream,
            "query",
            false,
            json!({"query": "SELECT 1", "after_seq": head_of(&node, &stream)}),
        )
        .await;
        assert_eq!(applied, 200, "{reply}");
        let mut live = open(&node, &stream, false).await;
        let page = live.page("latest", 0).await;
        assert_eq!(
            page["items"][0]["text"], "keep me",
            "{query} ({status}): {page}"
        );
        assert_eq!(
            live.ask(json!({"func": "subscribe", "type": "list", "name": "evil"}))
                .await,
            error(3, "evil is not registered."),
            "{query} was put"
        );
    }
    // Accepted, but fails when read: not a write, and bounded in time.
    put_schema(
        &node,
        &stream,
        &schema(json!({
            "latest": {"query": "SELECT id, text FROM message"},
            "ext": {"query": "SELECT load_extension('/tmp/nope.so') AS x"},
            "forever": {"query": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c WHERE x < 0"},
            "comment": {"query": "SELECT id FROM message /* the rest"},
        })),
    )
    .await;
    let (applied, reply) = post(
        &node,
        &stream,
        "query",
        false,
        json!({"query": "SELECT 1", "after_seq": head_of(&node, &stream)}),
    )
    .await;
    assert_eq!(applied, 200, "{reply}");
    let mut live = open(&node, &stream, false).await;
    for name in ["ext", "forever", "comment"] {
        live.subscribe("list", name).await;
        let started = Instant::now();
        let frame = live
            .ask(json!({"func": "get", "type": "list", "name": name}))
            .await;
        assert_eq!(frame["func"], "error", "{name}: {frame}");
        assert_eq!(frame["error_code"], 8, "{name}: {frame}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name} took {:?}",
            started.elapsed()
        );
    }
    let (status, rows) = post(
        &node,
        &stream,
        "query",
        false,
        json!({"query": "SELECT text FROM message"}),
    )
    .await;
    assert_eq!((status, &rows["results"]), (200, &json!([["keep me"]])));
    node.stop().await.unwrap();
}

/// Pins docs/live.md "a list is read under the same limits as `query` (time, rows)": on a node
/// whose row limit (`--sql-max-rows`) is 3, a `query` of 10 rows is refused, and a list page of
/// 10 rows (its `page_size` is 10) must be refused or cut to the limit too, not served whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_page_obeys_the_nodes_row_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::new(dir.path());
    config.sql_limits.rows = 3;
    let node = start_config(config, false).await;
    let schema = r#"{"schema": {"message": {"text": "text"}},
        "lists": {"all": {"query": "SELECT id, text FROM message ORDER BY id", "page_size": 10}}}"#;
    let stream = stream_with(&node, "rows", schema, None).await;
    for n in 0..10 {
        add(
            &node,
            &stream,
            json!({"_table": "message", "text": format!("row {n}")}),
        )
        .await;
    }
    let (status, reply) = post(
        &node,
        &stream,
        "query",
        false,
        json!({"query": "SELECT id, text FROM message"}),
    )
    .await;
    assert_eq!(status, 413, "the query is over the row limit: {reply}");
    let mut live = open(&node, &stream, false).await;
    live.subscribe("list", "all").await;
    let frame = live
        .ask(json!({"func": "get", "type": "list", "name": "all"}))
        .await;
    let served = frame["items"].as_array().map_or(0, Vec::len);
    assert!(
        frame["func"] == "error" || served <= 3,
        "a list page of {served} rows was served past the node's limit of 3"
    );
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 4. Slow and greedy clients.

/// A stream whose list `big` holds 20 rows of 8 KiB: each `set_all` of it is some 165 KB.
async fn big_stream(node: &RunningNode) -> StreamId {
    let schema = r#"{"schema": {"message": {"text": "text"}},
        "lists": {"big": {"query": "SELECT id, text FROM message ORDER BY id", "page_size": 20}}}"#;
    let stream = stream_with(node, "big", schema, None).await;
    for n in 0..20 {
        let text = format!("{n:04}{}", "x".repeat(8 * 1024));
        add(node, &stream, json!({"_table": "message", "text": text})).await;
    }
    stream
}

/// An owner's socket with a small receive buffer, subscribed to `big` and `kv_set` (the owner
/// only so that the test can see how far the node has read: a slow stranger is no different).
async fn slow_client(node: &RunningNode, stream: &StreamId) -> Live {
    let path = format!("/{}/socksync", stream.to_hex());
    let mut slow = open_with(node, None, &path, &[bearer(node)], Some(16 * 1024))
        .await
        .unwrap();
    slow.subscribe("list", "big").await;
    slow.subscribe("function", "kv_set").await;
    slow
}

/// Makes `slow` owe the node `gets` whole pages of `big` (far more than the sockets hold) and
/// waits until the node has read them all: a `kv_set` of `marker` sent after them has happened.
/// A subscription takes at most 16 gets ahead of its task, so by then nearly all those pages
/// wait in the node's outbox.
async fn owe(node: &RunningNode, stream: &StreamId, slow: &mut Live, gets: usize, marker: &str) {
    for _ in 0..gets {
        slow.send(json!({"func": "get", "type": "list", "name": "big"}))
            .await;
    }
    slow.send(
        json!({"func": "call", "type": "function", "name": "kv_set", "id": marker,
                     "args": {"key": marker, "value": 1}}),
    )
    .await;
    wait_until(
        WAIT,
        "the node to read the slow client's frames",
        || async { open(node, stream, false).await.var(marker).await == 1 },
    )
    .await;
}

/// Reads `frames` frames of `slow` (the node, blocked on a full socket, goes on writing).
async fn read_some(slow: &mut Live, frames: usize) {
    for _ in 0..frames {
        slow.next().await;
    }
}

/// What a client that stopped reading finds when it reads again: (frames, Some(why) if the
/// node had closed the connection).
async fn read_again(slow: &mut Live) -> (usize, Option<String>) {
    let mut frames = 0;
    loop {
        match slow.event(Duration::from_secs(5)).await {
            Event::Frame(_) => frames += 1,
            Event::Closed(why) => return (frames, Some(why)),
            Event::Timeout => return (frames, None),
        }
    }
}

/// Pins docs/live.md's "a client that takes no frame for 30 s is disconnected" for a client that
/// stops reading at once: it asks for 300 whole pages of big rows (some 50 MB) and reads nothing
/// for [`live::SEND_TIMEOUT`] plus 15 s; when it reads again it gets what the sockets held, then
/// the end of the connection. (The test waits out the node's own timer: there is nothing else
/// to wait on.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_after_the_send_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = big_stream(&node).await;
    let mut slow = slow_client(&node, &stream).await;
    owe(&node, &stream, &mut slow, 300, "m1").await;
    tokio::time::sleep(live::SEND_TIMEOUT + Duration::from_secs(15)).await;
    let (frames, closed) = read_again(&mut slow).await;
    assert!(
        closed.is_some(),
        "the node kept a client that read nothing for {:?}: it got {frames} frames",
        live::SEND_TIMEOUT + Duration::from_secs(15)
    );
    assert!(frames < 300, "it got every page it asked for ({frames})");
    node.stop().await.unwrap();
}

/// Pins the same rule for a client that reads a little and then stops: it owes 300 whole pages,
/// reads 40 of them (so the node's writer, blocked on the full socket, moves on to the pages
/// waiting in its outbox and blocks again in the middle of them), then reads nothing for
/// [`live::SEND_TIMEOUT`] plus 15 s. It must find the connection closed, as above. The node's
/// writer only times its `flush`; blocked in `feed` (the WebSocket sink's `poll_ready`, which
/// waits for the previous frame's bytes to leave) it waits forever, so the client keeps the
/// connection, its subscriptions and up to [`live::OUTBOX`] frames for as long as it likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_a_little_then_stops_is_disconnected_too() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = big_stream(&node).await;
    let mut slow = slow_client(&node, &stream).await;
    owe(&node, &stream, &mut slow, 300, "m1").await;
    read_some(&mut slow, 40).await;
    tokio::time::sleep(live::SEND_TIMEOUT + Duration::from_secs(15)).await;
    let (frames, closed) = read_again(&mut slow).await;
    let answers = if closed.is_none() {
        slow.send(json!({"func": "get", "type": "list", "name": "silence_probe"}))
            .await;
        matches!(slow.event(WAIT).await, Event::Frame(_))
    } else {
        false
    };
    assert!(
        closed.is_some(),
        "the node kept a client that read nothing for {:?}: it then got {frames} more frames \
         (every page it had asked for: 260), and the connection still answers: {answers}",
        live::SEND_TIMEOUT + Duration::from_secs(15)
    );
    node.stop().await.unwrap();
}

/// Pins that a client that stopped reading cannot hold the node's shutdown: its socket's writer
/// is blocked on a full TCP buffer in the middle of a backlog, and its reader on the full
/// outbox (1,300 frames that each get an error frame) — where it does not watch for the node
/// closing. `stop()` must still return within the node's shutdown grace, with the data
/// directory closed so that the node starts again on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_is_not_held_by_a_client_that_stopped_reading() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = big_stream(&node).await;
    let mut slow = slow_client(&node, &stream).await;
    owe(&node, &stream, &mut slow, 300, "m1").await;
    read_some(&mut slow, 40).await;
    // The node reads the frames after this marker (and blocks on the outbox) within moments
    // of reading the marker.
    slow.send(
        json!({"func": "call", "type": "function", "name": "kv_set", "id": "m2",
                     "args": {"key": "m2", "value": 1}}),
    )
    .await;
    for _ in 0..1_300 {
        slow.raw(Message::Text("\"x\"".into())).await;
    }
    wait_until(WAIT, "the node to read the second marker", || async {
        open(&node, &stream, false).await.var("m2").await == 1
    })
    .await;
    let started = Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(90), node.stop()).await;
    let took = started.elapsed();
    let restarted = RunningNode::start(
        NodeConfig::new(dir.path()),
        "127.0.0.1:0".parse().unwrap(),
        None,
    )
    .await;
    let reopened = match &restarted {
        Ok(_) => "could be reopened".to_string(),
        Err(error) => format!("could not be reopened: {error}"),
    };
    eprintln!(
        "stop() with a stuck live client: {took:?} (returned: {}); the directory {reopened}",
        stopped.is_ok()
    );
    assert!(
        took < Duration::from_secs(15) && restarted.is_ok(),
        "stop() took {took:?} with a client that stopped reading, and the directory {reopened}"
    );
    restarted.unwrap().stop().await.unwrap();
    drop(slow);
}

/// Pins what thousands of subscriptions cost and that they are given back: 8 connections of
/// 1,024 distinct var keys each (8,192 feeds and as many subscription tasks) and 40 connections
/// each on another page of one list; a write still reaches a watcher (the times are printed:
/// every feed of the stream re-reads its value on every write, so they grow with the feeds a
/// stranger opens); once the connections close, and after 3,000 subscribe / get / unsubscribe
/// rounds on one connection, the runtime holds no more tasks than before (no feed or
/// subscription leaks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_subscriptions_and_churn_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = stream_with(&node, "many", BOARD, None).await;
    add(
        &node,
        &stream,
        json!({"_table": "message", "text": "first"}),
    )
    .await;
    let mut owner = open(&node, &stream, true).await;
    owner.subscribe("function", "kv_set").await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();

    let mut vars = Vec::new();
    for c in 0..8 {
        let mut live = open(&node, &stream, false).await;
        for n in 0..live::MAX_SUBSCRIPTIONS {
            live.send(json!({"func": "subscribe", "type": "var", "name": format!("c{c}-{n}")}))
                .await;
        }
        live.probe("after 1,024 subscriptions").await;
        vars.push(live);
    }
    let mut pages = Vec::new();
    for page in 0..40u64 {
        let mut live = open(&node, &stream, false).await;
        live.page("latest", page).await;
        pages.push(live);
    }
    let peak = metrics.num_alive_tasks();
    eprintln!("tasks: {baseline} before, {peak} with 8,192 var and 40 page subscriptions");
    assert!(peak >= baseline + 2 * 8 * live::MAX_SUBSCRIPTIONS, "{peak}");

    let started = Instant::now();
    owner
        .try_call("kv_set", "w", json!({"key": "c3-7", "value": "seen"}))
        .await
        .unwrap();
    let pushed = vars[3].next().await;
    assert_eq!(pushed["value"], "seen", "{pushed}");
    let var_took = started.elapsed();
    let started = Instant::now();
    add(
        &node,
        &stream,
        json!({"_table": "message", "text": "second"}),
    )
    .await;
    for live in &mut pages {
        let frame = live.next().await;
        assert_eq!(frame["func"], "set_count", "{frame}");
    }
    eprintln!(
        "with 8,192 var feeds, a kv write reached its watcher in {var_took:?}; a record reached \
         40 watchers of 40 pages in {:?}",
        started.elapsed()
    );
    drop(vars);
    drop(pages);
    wait_until(WAIT, "the subscriptions' tasks to end", || async {
        metrics.num_alive_tasks() <= baseline + 20
    })
    .await;

    let mut churn = open(&node, &stream, false).await;
    for n in 0..3_000 {
        let (kind, name) = match n % 2 {
            0 => ("var", format!("churn{}", n % 7)),
            _ => ("list", "latest".to_string()),
        };
        churn
            .send(json!({"func": "subscribe", "type": kind, "name": name}))
            .await;
        churn
            .send(json!({"func": "get", "type": kind, "name": name, "page": n % 11}))
            .await;
        churn
            .send(json!({"func": "unsubscribe", "type": kind, "name": name}))
            .await;
    }
    // A get's answer may or may not have gone out before its unsubscribe: skip them.
    churn
        .send(json!({"func": "get", "type": "list", "name": "silence_probe"}))
        .await;
    loop {
        let frame = churn.next().await;
        if frame == error(3, "silence_probe is not registered.") {
            break;
        }
        assert!(
            frame["func"] == "set_all" || frame["func"] == "set",
            "{frame}"
        );
    }
    wait_until(WAIT, "the churned subscriptions' tasks to end", || async {
        metrics.num_alive_tasks() <= baseline + 20
    })
    .await;
    node.stop().await.unwrap();
}

/// Pins that slow calls hold only their own connection: 40 `query` calls that each wait for a
/// seq the stream will not reach (the node's 10 s apply timeout) fill one connection's 16 call
/// slots, while another connection's call, an HTTP query and a gRPC call are answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_calls_hold_only_their_own_connection() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = stream_with(&node, "slow calls", BOARD, None).await;
    let far = head_of(&node, &stream) + 1_000_000_000;
    let mut greedy = open(&node, &stream, false).await;
    greedy.subscribe("function", "query").await;
    for n in 0..40 {
        greedy
            .send(
                json!({"func": "call", "type": "function", "name": "query", "id": n,
                         "args": {"query": "SELECT 1", "after_seq": far}}),
            )
            .await;
    }
    let started = Instant::now();
    let mut other = open(&node, &stream, false).await;
    other.subscribe("function", "query").await;
    let value = other
        .try_call("query", "q", json!({"query": "SELECT 2"}))
        .await
        .unwrap();
    assert_eq!(value["results"], json!([[2]]));
    let (status, _) = post(&node, &stream, "query", false, json!({"query": "SELECT 3"})).await;
    assert_eq!(status, 200);
    let mut streams = pb::streams_client::StreamsClient::new(stranger_channel(&node.url()).await);
    streams.list(pb::ListStreamsRequest {}).await.unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "other clients waited {took:?}"
    );
    drop(greedy);
    node.stop().await.unwrap();
}

/// Pins that the calls a client queued die with its connection. A client sends 16 calls that
/// each wait 10 s (`query` with a seq the stream will not reach), then one more call (a
/// `kv_set`, so that the test can see whether it runs), and closes the socket at once. The 16
/// running may finish, but the node must not go on reading the closed socket's buffered frames
/// and starting the calls queued behind them for a client that is gone: a stranger could queue
/// thousands of 2-second queries in one burst (the frames wait in the kernel's buffer), leave,
/// and keep 16 of the node's threads busy for hours. The owner sends them here only so that the
/// queued call has a visible effect; a stranger's queries take the same path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_queued_by_a_client_that_left_die_with_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = stream_with(&node, "left", BOARD, None).await;
    let far = head_of(&node, &stream) + 1_000_000_000;
    let mut greedy = open(&node, &stream, true).await;
    greedy.subscribe("function", "query").await;
    greedy.subscribe("function", "kv_set").await;
    for n in 0..live::MAX_CALLS {
        greedy
            .send(
                json!({"func": "call", "type": "function", "name": "query", "id": n,
                         "args": {"query": "SELECT 1", "after_seq": far}}),
            )
            .await;
    }
    greedy
        .send(
            json!({"func": "call", "type": "function", "name": "kv_set", "id": "queued",
                     "args": {"key": "queued", "value": "ran for a client that left"}}),
        )
        .await;
    greedy.ws.close(None).await.unwrap();
    drop(greedy);
    let left = Instant::now();
    let mut watcher = open(&node, &stream, false).await;
    while left.elapsed() < APPLY_TIMEOUT + Duration::from_secs(5) {
        let queued = watcher.var("queued").await;
        assert_eq!(
            queued,
            Json::Null,
            "a call queued by a client that had left ran {:?} after it left",
            left.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    node.stop().await.unwrap();
}

/// Pins what one small list frame may cost the node. Every list frame — even a `get` of a name
/// the schema lacks, from a stranger — reads the stream's `_schema` and parses it, which
/// dry-runs it: every table and FTS table created, every list query prepared, in a new
/// in-memory SQLite. With a large schema (101 tables, 1,000 FTS columns, 256 lists) 200 such
/// frames must still cost little more than 200 var frames, not seconds of CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_frame_does_not_rebuild_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    // As costly a schema as the 64 KiB limit allows (about 51 KB).
    let mut tables = serde_json::Map::new();
    for t in 0..60 {
        let fields: serde_json::Map<String, Json> = (0..30)
            .map(|f| {
                (
                    format!("f{f}"),
                    json!(if f < 10 { "fulltext" } else { "text" }),
                )
            })
            .collect();
        tables.insert(format!("t{t}"), Json::Object(fields));
    }
    tables.insert("message".into(), json!({"text": "text"}));
    let lists: serde_json::Map<String, Json> = (0..256)
        .map(|l| {
            let query = format!(
                "SELECT a.id, b.f3 FROM t{} a JOIN t{} b ON a.f1 = b.f2 ORDER BY a.timestamp DESC",
                l % 60,
                (l + 1) % 60
            );
            (format!("l{l}"), json!({"query": query}))
        })
        .collect();
    let schema = json!({"schema": tables, "lists": lists}).to_string();
    let stream = stream_with(&node, "costly", &schema, None).await;
    let mut live = open(&node, &stream, false).await;
    let mut took = Vec::new();
    for frame in [
        json!({"func": "get", "type": "var", "name": "nope"}),
        json!({"func": "get", "type": "list", "name": "nope"}),
    ] {
        let started = Instant::now();
        for _ in 0..200 {
            live.send(frame.clone()).await;
        }
        for _ in 0..200 {
            assert_eq!(live.next().await["func"], "error");
        }
        took.push(started.elapsed());
    }
    eprintln!(
        "200 var frames: {:?}; 200 list frames: {:?}",
        took[0], took[1]
    );
    assert!(
        took[1] < Duration::from_secs(2),
        "200 list frames of a stranger took {:?} (200 var frames: {:?})",
        took[1],
        took[0]
    );
    node.stop().await.unwrap();
}

/// Pins that a client that vanished (its machine gone, no FIN or RST: here a client that keeps
/// its socket open and never reads or writes again) is eventually dropped with its
/// subscriptions. It holds 1,024 var subscriptions, one of which changes; the `set` fits in the
/// sockets' buffers, so the writer's flush succeeds and [`live::SEND_TIMEOUT`] never applies;
/// the node sends no WebSocket ping and sets no TCP keepalive, so nothing ever finds out. The
/// session must end within four times [`live::SEND_TIMEOUT`] (two minutes: room for a ping
/// that goes unanswered twice), observed on the runtime's tasks: the session's and its 2,048
/// subscription and feed tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanished_is_dropped_with_its_subscriptions() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = stream_with(&node, "vanish", BOARD, None).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let mut owner = open(&node, &stream, true).await;
    owner.subscribe("function", "kv_set").await;
    let mut gone = open(&node, &stream, false).await;
    for n in 0..live::MAX_SUBSCRIPTIONS {
        gone.send(json!({"func": "subscribe", "type": "var", "name": format!("k{n}")}))
            .await;
    }
    gone.probe("after 1,024 subscriptions").await;
    let held = metrics.num_alive_tasks();
    owner
        .try_call("kv_set", "w", json!({"key": "k1", "value": "pushed"}))
        .await
        .unwrap();
    // From here on the client neither reads nor writes (nor closes): it vanished.
    let vanished = Instant::now();
    let deadline = live::SEND_TIMEOUT * 4;
    while metrics.num_alive_tasks() + live::MAX_SUBSCRIPTIONS > held {
        assert!(
            vanished.elapsed() < deadline,
            "{deadline:?} after its client vanished, the node still holds its session: {} \
             tasks (with the session: {held})",
            metrics.num_alive_tasks()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(gone);
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 5. The listener.

/// Reads `tcp` until the node closes it; the time it took, or None if it is still open after
/// `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => continue,
            }
        }
    })
    .await
    .ok()
}

/// The HTTP/2 client preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Connections to `node` that send `bytes` and then nothing, each with when the node closed it.
async fn silent_connections(
    node: &RunningNode,
    cases: &[(&'static str, &[u8])],
    within: Duration,
) -> Vec<(&'static str, Option<Duration>)> {
    let runs = cases.iter().map(|(what, bytes)| {
        let addr = node.api_addr;
        async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(bytes).await.unwrap();
            (*what, closed_within(&mut tcp, within).await)
        }
    });
    futures::future::join_all(runs).await
}

/// Pins the slowloris guard of the listener for the clients it covers: half an HTTP/1.1 request
/// head is dropped after [`quire::net::HEADER_TIMEOUT`], and an HTTP/2 preface with
/// nothing after it once the keep-alive ping goes unanswered; meanwhile a plain HTTP/1.1 GET and
/// a gRPC call are answered on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_head_and_a_silent_h2_connection_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let header = quire::net::HEADER_TIMEOUT;
    let cases = [
        (
            "half an HTTP/1.1 head",
            &b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"[..],
        ),
        ("the h2 preface, then nothing", H2_PREFACE),
    ];
    let silent = silent_connections(&node, &cases, header + Duration::from_secs(40));
    let others = async {
        let (status, _) = http_to(
            &node,
            None,
            reqwest::Method::GET,
            "/_quire/socksync.js",
            &[],
            None,
        )
        .await;
        assert_eq!(status, 200);
        let mut streams =
            pb::streams_client::StreamsClient::new(stranger_channel(&node.url()).await);
        streams.list(pb::ListStreamsRequest {}).await.unwrap();
    };
    let (closed, ()) = tokio::join!(silent, others);
    let head = closed[0].1.expect("a slow HTTP/1.1 head is dropped");
    assert!(head >= header - Duration::from_secs(1), "{head:?}");
    assert!(closed[1].1.is_some(), "a silent h2 connection is dropped");
    node.stop().await.unwrap();
}

/// Pins that a connection that sends nothing at all, or only the start of the HTTP/2 preface,
/// is dropped like a slow HTTP/1.1 head (within [`quire::net::HEADER_TIMEOUT`] and a
/// margin). hyper-util's protocol detection (`auto::Builder`, reading the first 24 bytes to tell
/// HTTP/2 from HTTP/1.1) has no timeout, and the header timeout starts only after it: such a
/// connection, and its task and file descriptor, are held for as long as the client likes —
/// a stranger can exhaust the node's file descriptors with idle sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let header = quire::net::HEADER_TIMEOUT;
    let cases = [
        ("nothing", &b""[..]),
        ("16 bytes of the h2 preface", &H2_PREFACE[..16]),
    ];
    let closed = silent_connections(&node, &cases, header + Duration::from_secs(15)).await;
    for (what, closed) in &closed {
        assert!(
            closed.is_some(),
            "a connection that sent {what} was still open {:?} later",
            header + Duration::from_secs(15)
        );
    }
    node.stop().await.unwrap();
}

/// Pins that a stranger's half-sent request cannot hold the node's shutdown. For each of: a
/// connection that sent nothing, one that sent half an HTTP/1.1 request head, one that sent
/// the HTTP/2 preface and nothing more — a fresh node with that one connection open must stop
/// within 5 s and leave its data directory closed (the node starts on it again). The graceful
/// shutdown waits for a connection that is mid-request; after the node's 10 s grace the
/// connection tasks are left running, and as they hold the routes (and so the log), the log's
/// close waits for them too: for the HTTP/1.1 head until its 30 s header timeout, for the
/// HTTP/2 preface past the log's own 30 s wait, after which the store is left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_is_not_held_by_a_half_sent_request() {
    let cases = [
        ("nothing", &b""[..]),
        (
            "half an HTTP/1.1 head",
            &b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"[..],
        ),
        ("the HTTP/2 preface", H2_PREFACE),
    ];
    let mut held = Vec::new();
    for (what, bytes) in cases {
        let dir = tempfile::tempdir().unwrap();
        let node = start_node(dir.path()).await;
        let mut tcp = TcpStream::connect(node.api_addr).await.unwrap();
        tcp.write_all(bytes).await.unwrap();
        // One round trip through the listener, so that it has accepted the connection.
        let (status, _) = http_to(
            &node,
            None,
            reqwest::Method::GET,
            "/_quire/socksync.js",
            &[],
            None,
        )
        .await;
        assert_eq!(status, 200);
        let started = Instant::now();
        node.stop().await.unwrap();
        let took = started.elapsed();
        let restarted = RunningNode::start(
            NodeConfig::new(dir.path()),
            "127.0.0.1:0".parse().unwrap(),
            None,
        )
        .await;
        eprintln!(
            "{what}: stop() took {took:?}; the node starts again: {}",
            restarted.is_ok()
        );
        if took > Duration::from_secs(5) || restarted.is_err() {
            held.push(format!(
                "{what}: stop() took {took:?}, restart: {}",
                match &restarted {
                    Ok(_) => "ok".to_string(),
                    Err(error) => error.to_string(),
                }
            ));
        }
        if let Ok(node) = restarted {
            node.stop().await.unwrap();
        }
        drop(tcp);
    }
    assert!(held.is_empty(), "{held:#?}");
}

// ---------------------------------------------------------------------------------------------
// 6. TLS.

/// A node serving its API over TLS with a fresh self-signed certificate for `localhost`; the
/// certificate's PEM.
async fn tls_node(dir: &std::path::Path) -> (RunningNode, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let data = dir.join("node");
    std::fs::create_dir_all(&data).unwrap();
    let mut config = NodeConfig::new(&data);
    config.api_tls = Some((cert, key));
    (start_config(config, false).await, certified.cert.pem())
}

/// A TLS connection to `addr` trusting `pem`, offering `alpn`.
async fn tls_to(
    addr: SocketAddr,
    pem: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector
        .connect(name, TcpStream::connect(addr).await.unwrap())
        .await
        .expect("the TLS handshake")
}

/// gRPC clients of a TLS node, as its owner.
async fn owner_over_tls(node: &RunningNode, pem: &str) -> Clients {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    let channel = Channel::from_shared(format!("https://127.0.0.1:{}", node.api_addr.port()))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pem))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .expect("gRPC over TLS");
    let channel = quire::api::access::AuthChannel::new(
        channel,
        quire::api::access::Bearer::new(Some(node.token.as_str())).unwrap(),
    );
    Clients {
        log: pb::log_client::LogClient::new(channel.clone()),
        streams: pb::streams_client::StreamsClient::new(channel.clone()),
        admin: pb::admin_client::AdminClient::new(channel),
    }
}

/// Opens 50 TCP connections that never start the TLS handshake and one that sends two bytes of
/// a TLS record header.
async fn stall_handshakes(addr: SocketAddr) -> Vec<TcpStream> {
    let mut stalled = Vec::new();
    for _ in 0..50 {
        stalled.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(&[0x16, 0x03]).await.unwrap();
    stalled.push(half);
    stalled
}

/// Pins TLS on the shared port: with 51 connections stalled before or in the TLS handshake, a
/// real client still completes its handshake at once and is served on one port by gRPC over h2
/// (ALPN `h2`), the live binding over `wss://` (ALPN `http/1.1`, the upgrade needs HTTP/1.1) and
/// a plain HTTP/1.1 GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_that_never_finish_block_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let (node, pem) = tls_node(dir.path()).await;
    let addr = node.api_addr;
    let stalled = stall_handshakes(addr).await;

    let started = Instant::now();
    let mut owner = owner_over_tls(&node, &pem).await;
    let stream = create_stream(&mut owner, "tls", None).await;
    let tls = tls_to(addr, &pem, b"http/1.1").await;
    let mut live = upgrade_over(
        tls,
        &format!("localhost:{}", addr.port()),
        &format!("/{}/socksync", stream.to_hex()),
        &[bearer(&node)],
    )
    .await
    .expect("wss upgrades");
    live.subscribe("function", "kv_set").await;
    live.try_call("kv_set", "t", json!({"key": "motd", "value": "over tls"}))
        .await
        .unwrap();
    assert_eq!(live.var("motd").await, "over tls");
    let mut http = tls_to(addr, &pem, b"http/1.1").await;
    http.write_all(
        b"GET /_quire/socksync.js HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut reply = Vec::new();
    http.read_to_end(&mut reply).await.unwrap();
    assert!(
        reply.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&reply[..reply.len().min(40)])
    );
    let took = started.elapsed();
    assert!(
        took < quire::net::HANDSHAKE_TIMEOUT / 2,
        "51 stalled handshakes held a real client {took:?}"
    );
    drop(stalled);
    node.stop().await.unwrap();
}

/// Pins that strangers stalled in the TLS handshake do not hold the node's shutdown: with 51
/// of them open, `stop()` must return well before [`quire::net::HANDSHAKE_TIMEOUT`]. A
/// connection's task holds the router (and with it the log) during its handshake, outside the
/// graceful-shutdown watcher, so the log's close waits for each handshake to time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_is_not_held_by_stalled_tls_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _) = tls_node(dir.path()).await;
    let stalled = stall_handshakes(node.api_addr).await;
    let started = Instant::now();
    node.stop().await.unwrap();
    let took = started.elapsed();
    assert!(
        took < quire::net::HANDSHAKE_TIMEOUT / 2,
        "stop() waited {took:?} for stalled TLS handshakes"
    );
    drop(stalled);
}
