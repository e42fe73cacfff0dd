//! The example app in a real browser: headless Chromium, driven over WebDriver (chromedriver),
//! opens the message board from node A and posts a message; the same board opened from node B
//! shows it without reloading. And the trust boundary: an app's page may touch its own app and
//! nothing else; foreign and DNS-rebinding pages may touch nothing. Needs Debian's `chromium` and
//! `chromium-driver` (the README's test command and `.ci/run` install them).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use quire::api::access::app_label;
use quire::node::RunningNode;
use quire::pb;
use quire::projection_api::StreamId;
use serde_json::{json, Value};

use crate::common::*;
use crate::replication::{connect, join, CONVERGE};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver child process, killed on drop (after it closed its browsers).
struct Driver {
    child: std::process::Child,
    url: String,
    _profile: tempfile::TempDir,
    /// URL of each session opened, so that even a failed test closes its browsers: killing
    /// chromedriver alone leaves them running.
    sessions: std::sync::Mutex<Vec<String>>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        use std::io::{Read, Write};
        for session in self.sessions.lock().unwrap().drain(..) {
            // `DELETE /session/<id>` over a plain socket: no runtime to lean on in a drop.
            let Some((address, path)) = session
                .strip_prefix("http://")
                .and_then(|rest| rest.find('/').map(|slash| rest.split_at(slash)))
            else {
                continue;
            };
            if let Ok(mut socket) = std::net::TcpStream::connect(address) {
                let _ = socket.set_read_timeout(Some(Duration::from_secs(30)));
                let _ = write!(
                    socket,
                    "DELETE {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                // The answer comes once the browser has quit; chromedriver may keep the
                // connection open after it, so stop at the end of its head.
                let (mut head, mut chunk) = (Vec::new(), [0u8; 1024]);
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session.
struct Session {
    http: reqwest::Client,
    url: String,
}

impl Session {
    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let reply = self
            .http
            .request(method, format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .expect("chromedriver answers");
        let status = reply.status();
        let value: Value = reply.json().await.unwrap();
        assert!(status.is_success(), "WebDriver {path}: {status} {value}");
        value["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({"url": url}))
            .await;
    }

    async fn script(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        found[ELEMENT].as_str().unwrap().to_string()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let element = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            json!({"text": text}),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let element = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            json!({}),
        )
        .await;
    }

    async fn messages(&self) -> String {
        self.script("return document.getElementById('messages').innerText")
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_driver() -> Driver {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver is installed (Debian: apt-get install chromium chromium-driver; ./dev deps does it)");
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _profile: tempfile::tempdir().unwrap(),
        sessions: Default::default(),
    };
    let http = reqwest::Client::new();
    wait_until(Duration::from_secs(30), "chromedriver to be ready", || {
        let http = http.clone();
        let url = format!("{}/status", driver.url);
        async move {
            match http.get(url).send().await {
                Ok(reply) => reply
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            }
        }
    })
    .await;
    driver
}

async fn session(driver: &Driver, name: &str) -> Session {
    session_with(driver, name, &[]).await
}

/// A browser session whose Chromium logs its network traffic (see [`Wire`]) and gets `extra`
/// command-line arguments.
async fn session_with(driver: &Driver, name: &str, extra: &[&str]) -> Session {
    let profile = driver._profile.path().join(name);
    let mut args: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    args.push(format!("--user-data-dir={}", profile.display()));
    args.extend(extra.iter().map(|arg| arg.to_string()));
    let http = reqwest::Client::new();
    let reply: Value = http
        .post(format!("{}/session", driver.url))
        .json(&json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
            "goog:loggingPrefs": {"performance": "ALL"},
            "timeouts": {"script": 60_000}
        }}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = reply["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no WebDriver session: {reply}"));
    let url = format!("{}/session/{id}", driver.url);
    driver.sessions.lock().unwrap().push(url.clone());
    Session { http, url }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_board_posted_on_a_appears_on_b_without_a_reload() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = start_node(dir_b.path()).await;
    let mut clients_a = clients(&a.url()).await;
    let stream = create_stream(&mut clients_a, "board", None).await;
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/message-board");
    let pushed = quire_cli(&a.url())
        .args(["files", "push", &stream.to_hex()])
        .arg(&app)
        .output()
        .unwrap();
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    connect(&b, &a).await;
    join(&b, &stream).await;
    let board_b = format!("{}/{}/", b.url(), stream.to_hex());
    wait_until(CONVERGE, "B serves the board", || async {
        let index = reqwest::get(&board_b).await.unwrap();
        let app = reqwest::get(format!("{board_b}app.js")).await.unwrap();
        index.status() == 200 && app.status() == 200
    })
    .await;

    let driver = start_driver().await;
    let on_b = session(&driver, "b").await;
    on_b.open(&board_b).await;
    wait_until(CONVERGE, "B's page to load its (empty) list", || async {
        on_b.script("return document.readyState").await == "complete"
    })
    .await;
    // Marks this page load: a reload would lose it.
    on_b.script("window.loadedOnce = 'yes'; return 1").await;
    // B's page is bound to its list over the live binding: wait for the socket, then forget
    // everything the load sent, so what follows is only what the page does while it waits.
    let loaded = std::cell::RefCell::new(Wire::default());
    wait_until(CONVERGE, "B's page to open its live binding", || async {
        let more = Wire::drain(&on_b).await;
        let mut loaded = loaded.borrow_mut();
        loaded.merge(more);
        loaded.sockets.iter().any(|url| url.ends_with("/socksync"))
    })
    .await;

    let on_a = session(&driver, "a").await;
    on_a.open(&format!("{}/{}/", a.url(), stream.to_hex()))
        .await;
    on_a.type_into("#author", "ann").await;
    on_a.type_into("#text", "hello from node A").await;
    on_a.click("#send").await;
    wait_until(CONVERGE, "A's board to show the message", || async {
        on_a.messages().await.contains("hello from node A")
    })
    .await;
    wait_until(CONVERGE, "B's open board to show A's message", || async {
        on_b.messages().await.contains("hello from node A")
    })
    .await;
    assert_eq!(
        on_b.script("return window.loadedOnce").await,
        "yes",
        "B's page was not reloaded"
    );
    assert!(on_b.messages().await.contains("ann"));
    // The message reached B's page as a frame on its socket, not by polling.
    let after = Wire::drain(&on_b).await;
    let requests: Vec<&(String, String)> = after.requests.values().collect();
    assert!(
        requests.is_empty(),
        "B's page made HTTP requests after load (it should only listen): {requests:?}"
    );
    for session in [on_a, on_b] {
        session.call(reqwest::Method::DELETE, "", json!({})).await;
    }
    drop(driver);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The trust boundary in a real browser: an app's page may touch its own app and nothing else;
// a foreign site, and a DNS-rebinding one, may touch nothing at all. Each attack is checked
// twice: what the page saw (a refusal, or a fetch that failed) and what went over the wire (from
// Chromium's network log: the node's own answer, so a refusal the browser made up, or a request
// it never sent, cannot pass for the node's).

/// HTTP exchanges seen in Chromium's network log: each request (method, URL) by its DevTools
/// request id, and the status of each answer that came back over the wire.
#[derive(Default)]
struct Wire {
    requests: std::collections::HashMap<String, (String, String)>,
    answers: Vec<(String, u64)>,
    /// URLs of the WebSockets the page opened.
    sockets: Vec<String>,
}

impl Wire {
    /// The log entries Chromium wrote since the last read (reading empties the log).
    async fn drain(session: &Session) -> Wire {
        let entries = session
            .call(
                reqwest::Method::POST,
                "/se/log",
                json!({"type": "performance"}),
            )
            .await;
        let mut wire = Wire::default();
        for entry in entries.as_array().into_iter().flatten() {
            let Ok(message) =
                serde_json::from_str::<Value>(entry["message"].as_str().unwrap_or(""))
            else {
                continue;
            };
            let (method, params) = (&message["message"]["method"], &message["message"]["params"]);
            let id = params["requestId"].as_str().unwrap_or_default().to_string();
            if method == "Network.requestWillBeSent" {
                let request = &params["request"];
                wire.requests.insert(
                    id,
                    (
                        request["method"].as_str().unwrap_or_default().to_string(),
                        request["url"].as_str().unwrap_or_default().to_string(),
                    ),
                );
            } else if method == "Network.webSocketCreated" {
                wire.sockets
                    .push(params["url"].as_str().unwrap_or_default().to_string());
            } else if method == "Network.responseReceivedExtraInfo" {
                if let Some(status) = params["statusCode"].as_u64() {
                    wire.answers.push((id, status));
                }
            }
        }
        wire
    }

    fn merge(&mut self, more: Wire) {
        self.requests.extend(more.requests);
        self.answers.extend(more.answers);
        self.sockets.extend(more.sockets);
    }

    /// Reads the log until it holds an answer to a request for `url`; returns every answer to
    /// one, as (method, status).
    async fn wait_for_answer(&mut self, session: &Session, url: &str) -> Vec<(String, u64)> {
        let wire = std::cell::RefCell::new(std::mem::take(self));
        wait_until(
            Duration::from_secs(10),
            &format!("an answer to {url} in the network log"),
            || async {
                let more = Wire::drain(session).await;
                let mut wire = wire.borrow_mut();
                wire.merge(more);
                !wire.answers_for(url).is_empty()
            },
        )
        .await;
        *self = wire.into_inner();
        self.answers_for(url)
    }

    /// (method, status) of every answer to a request for `url`.
    fn answers_for(&self, url: &str) -> Vec<(String, u64)> {
        self.answers
            .iter()
            .filter_map(|(id, status)| {
                let (method, to) = self.requests.get(id)?;
                (to == url).then(|| (method.clone(), *status))
            })
            .collect()
    }
}

/// Runs `fetch(probe.url, probe.init)` in the page open in `session` and returns what the page
/// saw: `{"url": <absolute>, "status": N, "type": ..., "grpc": ..., "csp": ..., "body": ...}`,
/// or `{"url": ..., "type": "error", "error": ...}` when the fetch failed (CORS, CSP, network).
async fn fetch_one(session: &Session, probe: &Probe) -> Value {
    session
        .call(
            reqwest::Method::POST,
            "/execute/async",
            json!({
                "script": r#"
                    const [url, init, done] = arguments;
                    const absolute = new URL(url, location.href).href;
                    fetch(url, init)
                      .then(async (reply) => done({
                        url: absolute,
                        status: reply.status,
                        type: reply.type,
                        grpc: reply.headers.get("grpc-status"),
                        csp: reply.headers.get("content-security-policy"),
                        nosniff: reply.headers.get("x-content-type-options"),
                        body: reply.type === "opaque" ? "" : (await reply.text()).slice(0, 400),
                      }))
                      .catch((error) => done({url: absolute, type: "error", error: String(error)}));
                "#,
                "args": [probe.url, probe.init],
            }),
        )
        .await
}

/// How an attack must end.
#[derive(Clone, Copy)]
enum Expect {
    /// The request reaches the node, which answers one of these statuses (and nothing else).
    NodeRefuses(&'static [u64]),
    /// The page's Content-Security-Policy keeps it in the browser: nothing goes out.
    StoppedByCsp,
}

/// One `fetch` a page tries.
struct Probe {
    /// What it attempts, for the report.
    what: String,
    url: String,
    /// fetch's `init`: method, headers, body, mode.
    init: Value,
    expect: Expect,
    /// Words the node's answer must contain, where the page can read it.
    saying: Option<&'static str>,
}

impl Probe {
    fn new(what: &str, method: &str, url: &str) -> Probe {
        Probe {
            what: what.to_string(),
            url: url.to_string(),
            init: json!({"method": method}),
            expect: Expect::NodeRefuses(&[401, 403]),
            saying: None,
        }
    }

    /// With a JSON body (`Content-Type: application/json`: CORS preflights it cross-origin).
    fn json(mut self, body: Value) -> Probe {
        self.init["headers"] = json!({"content-type": "application/json"});
        self.init["body"] = Value::String(body.to_string());
        self
    }

    /// With a text body and no content type chosen by the page: a "simple" request, which the
    /// browser sends cross-origin without asking first (the classic CSRF).
    fn text(mut self, body: &str) -> Probe {
        self.init["body"] = Value::String(body.to_string());
        self
    }

    /// As gRPC: `Content-Type: application/grpc`, one empty message in gRPC framing.
    fn grpc(mut self) -> Probe {
        self.init["headers"] = json!({"content-type": "application/grpc"});
        self.init["body"] = Value::String("\u{0}\u{0}\u{0}\u{0}\u{0}".into());
        self
    }

    /// `mode: "no-cors"`: the request goes out, the page may not read the answer.
    fn no_cors(mut self) -> Probe {
        self.init["mode"] = json!("no-cors");
        self
    }

    /// The node answers 404 (no such action here) or a refusal.
    fn or_not_found(mut self) -> Probe {
        self.expect = Expect::NodeRefuses(&[401, 403, 404]);
        self
    }

    /// The node's answer gives `reason`.
    fn saying(mut self, reason: &'static str) -> Probe {
        self.saying = Some(reason);
        self
    }

    fn stopped_by_csp(mut self) -> Probe {
        self.expect = Expect::StoppedByCsp;
        self
    }
}

/// Tries each of `probes` from the page open in `session` (`from` names it in the report) and
/// returns a line for each that did not end as it must.
async fn attack(session: &Session, from: &str, probes: &[Probe]) -> Vec<String> {
    let mut violations = Vec::new();
    for probe in probes {
        Wire::drain(session).await; // forget what went before
        let seen = fetch_one(session, probe).await;
        let url = seen["url"].as_str().unwrap_or_default().to_string();
        let page_failed = seen["type"] == "error" || seen["type"] == "opaque";
        let mut wire = Wire::default();
        let (ok, answers) = match probe.expect {
            Expect::NodeRefuses(statuses) => {
                // The node's answer comes into the log shortly after the page has it.
                let answers = wire.wait_for_answer(session, &url).await;
                let page_ok = page_failed
                    || seen["status"]
                        .as_u64()
                        .is_some_and(|status| statuses.contains(&status));
                let wire_ok = answers.iter().all(|(_, status)| statuses.contains(status));
                // Where the page can read the answer, it says why.
                let says_why = match (probe.saying, seen["body"].as_str()) {
                    (Some(reason), Some(body)) => body.contains(reason),
                    _ => true,
                };
                (page_ok && wire_ok && says_why, answers)
            }
            Expect::StoppedByCsp => {
                wire.merge(Wire::drain(session).await);
                let answers = wire.answers_for(&url);
                (seen["type"] == "error" && answers.is_empty(), answers)
            }
        };
        println!(
            "[{from}] {}: the page saw {seen}; the node answered {answers:?}",
            probe.what
        );
        if !ok {
            violations.push(format!(
                "from {from}: {} — fetch({:?}, {}) — the page saw {seen}; the node answered {answers:?}",
                probe.what, probe.url, probe.init
            ));
        }
    }
    violations
}

/// A stranger's web server on `127.0.0.1:0`: answers every request with `html`.
struct Foreign {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Foreign {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn foreign_site(html: &'static str) -> Foreign {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{html}",
                    html.len()
                );
                let _ = socket.write_all(reply.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    Foreign { port, task }
}

/// What the node holds of one app: its stream's info, every file (content type and bytes, as
/// the owner reads them over HTTP) and the rows of `sql`.
#[derive(Debug, Clone, PartialEq)]
struct AppState {
    info: pb::StreamInfo,
    files: std::collections::BTreeMap<String, (String, Vec<u8>)>,
    rows: Value,
}

/// What the node holds beyond its apps: its log head, streams and peers.
#[derive(Debug, Clone, PartialEq)]
struct NodeState {
    head: u64,
    streams: Vec<Vec<u8>>,
    peers: Vec<String>,
    remembered_peers: Vec<String>,
}

async fn owner_post(node: &RunningNode, path: &str, body: Value) -> (u16, Value) {
    let reply = reqwest::Client::new()
        .post(format!("{}{path}", node.url()))
        .bearer_auth(node.token.as_str())
        .json(&body)
        .send()
        .await
        .expect("the node answers");
    (
        reply.status().as_u16(),
        reply.json().await.expect("a JSON reply"),
    )
}

async fn rows(node: &RunningNode, stream: &StreamId, sql: &str) -> Value {
    let (status, reply) = owner_post(
        node,
        &format!("/{}/query", stream.to_hex()),
        json!({"query": sql}),
    )
    .await;
    assert_eq!(
        (status, &reply["success"]),
        (200, &json!(true)),
        "{sql}: {reply}"
    );
    reply["results"].clone()
}

async fn app_state(node: &RunningNode, stream: &StreamId, sql: &str) -> AppState {
    let channel = owner_channel(&node.url()).await;
    let info = pb::streams_client::StreamsClient::new(channel.clone())
        .get(pb::GetStreamRequest {
            stream: bytes_of(stream),
        })
        .await
        .expect("the stream")
        .into_inner();
    let listed = pb::files_client::FilesClient::new(channel)
        .list(pb::FilesListRequest {
            stream: bytes_of(stream),
            prefix: String::new(),
            limit: 0,
        })
        .await
        .expect("the files")
        .into_inner();
    let mut files = std::collections::BTreeMap::new();
    for file in listed.files {
        let reply = reqwest::Client::new()
            .get(format!("{}/{}/{}", node.url(), stream.to_hex(), file.path))
            .bearer_auth(node.token.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200, "{}", file.path);
        let bytes = reply.bytes().await.unwrap().to_vec();
        files.insert(file.path, (file.content_type, bytes));
    }
    AppState {
        info,
        files,
        rows: rows(node, stream, sql).await,
    }
}

async fn node_state(node: &RunningNode) -> NodeState {
    let mut clients = clients(&node.url()).await;
    let status = clients
        .admin
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut streams: Vec<Vec<u8>> = clients
        .streams
        .list(pb::ListStreamsRequest {})
        .await
        .unwrap()
        .into_inner()
        .streams
        .into_iter()
        .map(|info| info.stream.to_vec())
        .collect();
    streams.sort();
    NodeState {
        head: status.head_seq,
        streams,
        peers: status.peers.into_iter().map(|peer| peer.addr).collect(),
        remembered_peers: node.log.store().peers().unwrap(),
    }
}

/// Writes `files` (name, text) into a new directory and pushes it into `stream` as the owner.
fn push_files(node: &RunningNode, stream: &StreamId, files: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let pushed = quire_cli(&node.url())
        .args(["files", "push", &stream.to_hex()])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
}

/// Opens `url` and waits until the page titled `title` has loaded.
async fn open_page(session: &Session, url: &str, title: &str) {
    session.open(url).await;
    let loaded = format!("complete {title}");
    wait_until(
        Duration::from_secs(30),
        &format!("{url} to load"),
        || async {
            session
                .script("return document.readyState + ' ' + document.title")
                .await
                == loaded.as_str()
        },
    )
    .await;
}

const M_PAGE: &str = "<!doctype html><html><head><meta charset=utf-8><title>app M</title></head>\
<body><p id=who>app M</p></body></html>";
const V_PAGE: &str = "<!doctype html><html><head><meta charset=utf-8><title>app V</title></head>\
<body><p id=who>app V, the victim</p></body></html>";
const M_SCHEMA: &str = r#"{"schema": {"note": {"text": "text"}}}"#;
const FOREIGN_PAGE: &str = "<!doctype html><html><head><meta charset=utf-8>\
<title>elsewhere</title></head><body><p>a page of another site</p></body></html>";
const V_ROWS: &str = "SELECT id, author, text, room, timestamp FROM message ORDER BY id";
const M_ROWS: &str = "SELECT id, text FROM note ORDER BY id";

/// The node's refusal of a host name it does not answer to (DNS rebinding).
const WRONG_HOST: &str = "does not answer to the host name";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_page_can_touch_only_its_own_app() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let port = node.api_addr.port();
    let ip = format!("http://127.0.0.1:{port}");
    let mut owner = clients(&node.url()).await;

    // Two apps: M, whose page the browser opens, and V, its victim, with a table and a record.
    let m = create_stream(&mut owner, "m", None).await;
    let v = create_stream(&mut owner, "v", None).await;
    let (m_hex, v_hex) = (m.to_hex(), v.to_hex());
    push_files(&node, &m, &[("index.html", M_PAGE), ("_schema", M_SCHEMA)]);
    let board_schema = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/message-board/_schema"),
    )
    .unwrap();
    push_files(
        &node,
        &v,
        &[("index.html", V_PAGE), ("_schema", &board_schema)],
    );
    let (status, added) = owner_post(
        &node,
        &format!("/{v_hex}/add_record"),
        json!({"_table": "message", "author": "vee", "text": "V's own message", "room": "main"}),
    )
    .await;
    assert_eq!((status, &added["success"]), (200, &json!(true)), "{added}");
    wait_until(
        Duration::from_secs(30),
        "V's record in its table",
        || async { rows(&node, &v, V_ROWS).await.as_array().map(Vec::len) == Some(1) },
    )
    .await;

    // Everything the attacks must leave alone.
    let v_before = app_state(&node, &v, V_ROWS).await;
    let m_before = app_state(&node, &m, M_ROWS).await;
    let node_before = node_state(&node).await;
    assert!(v_before.files.contains_key("index.html") && v_before.files.contains_key("_schema"));

    let (m_origin, v_origin) = (
        format!("http://{}.localhost:{port}", app_label(&m)),
        format!("http://{}.localhost:{port}", app_label(&v)),
    );
    let driver = start_driver().await;
    // `evil.example` resolves to this machine: a DNS-rebinding site, after it rebound.
    let browser = session_with(
        &driver,
        "attacks",
        &["--host-resolver-rules=MAP evil.example 127.0.0.1"],
    )
    .await;
    let mut violations = Vec::new();

    // ---- From M's own page, at its own origin. ----
    open_page(&browser, &format!("{m_origin}/"), "app M").await;
    assert_eq!(
        browser.script("return location.origin").await,
        m_origin.as_str()
    );
    let forged = json!({"_table": "message", "author": "m", "text": "forged", "room": "main"});
    let from_m = [
        // Other origins (V's, the node's own host): M's CSP (`connect-src 'self'`) keeps these
        // in the browser; the node would refuse them too (a page may only call its own origin).
        Probe::new(
            "deface V's page at V's origin",
            "PUT",
            &format!("{v_origin}/index.html"),
        )
        .text("<h1>defaced</h1>")
        .stopped_by_csp(),
        Probe::new(
            "deface V's page on the node's host",
            "PUT",
            &format!("{ip}/{v_hex}/index.html"),
        )
        .text("<h1>defaced</h1>")
        .stopped_by_csp(),
        Probe::new(
            "add a peer to the node",
            "POST",
            &format!("{ip}/{v_hex}/add_peer"),
        )
        .json(json!({"addr": "127.0.0.1", "port": 9}))
        .stopped_by_csp(),
        Probe::new("create an app", "POST", &format!("{ip}/create_app"))
            .json(json!({}))
            .stopped_by_csp(),
        Probe::new("read V's table", "POST", &format!("{v_origin}/query"))
            .json(json!({"query": V_ROWS}))
            .stopped_by_csp(),
        Probe::new(
            "add a record to V",
            "POST",
            &format!("{v_origin}/add_record"),
        )
        .json(forged.clone())
        .stopped_by_csp(),
        Probe::new(
            "gRPC Streams.Create on the node's host",
            "POST",
            &format!("{ip}/quire.v1.Streams/Create"),
        )
        .grpc()
        .stopped_by_csp(),
        // M's own origin: these reach the node, which refuses what an app may not do. gRPC is
        // not answered to any page, its own origin included.
        Probe::new(
            "gRPC Streams.Create on M's own origin",
            "POST",
            &format!("{m_origin}/quire.v1.Streams/Create"),
        )
        .grpc(),
        Probe::new(
            "gRPC Log.Append on M's own origin",
            "POST",
            "/quire.v1.Log/Append",
        )
        .grpc(),
        // Managing even its own app is the owner's.
        Probe::new("overwrite M's own page", "PUT", "index.html").text("<h1>changed</h1>"),
        Probe::new("delete M's own page", "DELETE", "index.html"),
        Probe::new("add a peer through M's origin", "POST", "add_peer")
            .json(json!({"addr": "127.0.0.1", "port": 9})),
        Probe::new("join through M's origin", "POST", "join_app").json(json!({})),
        Probe::new("create an app through M's origin", "POST", "/create_app")
            .json(json!({}))
            .or_not_found(),
        // Flock-style paths naming V on M's origin do not reach V.
        Probe::new(
            "add a record to V by its id on M's origin",
            "POST",
            &format!("/{v_hex}/add_record"),
        )
        .json(forged.clone())
        .or_not_found(),
        Probe::new(
            "read V's table by its id on M's origin",
            "POST",
            &format!("/{v_hex}/query"),
        )
        .json(json!({"query": V_ROWS}))
        .or_not_found(),
        Probe::new(
            "overwrite V's page by its id on M's origin",
            "PUT",
            &format!("/{v_hex}/index.html"),
        )
        .text("<h1>defaced</h1>")
        .or_not_found(),
    ];
    violations.extend(attack(&browser, "M's page", &from_m).await);

    // What M may do: read its own files, add a record to its own table and query it.
    let mut own = Vec::new();
    for probe in [
        Probe::new("read M's page", "GET", "index.html"),
        Probe::new("add a record to M", "POST", "add_record")
            .json(json!({"_table": "note", "text": "written by M's page"})),
        Probe::new("query M", "POST", "query").json(json!({"query": M_ROWS})),
        Probe::new("query V's table on M", "POST", "query").json(json!({"query": V_ROWS})),
    ] {
        let seen = fetch_one(&browser, &probe).await;
        println!("[M's page] {}: {seen}", probe.what);
        own.push(seen);
    }
    let body = |seen: &Value| -> Value {
        serde_json::from_str(seen["body"].as_str().unwrap_or("null")).unwrap_or_default()
    };
    assert_eq!(own[0]["status"], 200, "M reads its own page: {}", own[0]);
    assert_eq!(own[0]["body"], M_PAGE);
    let csp = own[0]["csp"].as_str().unwrap_or_default();
    assert!(
        csp.contains("connect-src 'self'"),
        "M is kept to its origin: {csp:?}"
    );
    assert_eq!(own[0]["nosniff"], "nosniff");
    let (added, queried) = (body(&own[1]), body(&own[2]));
    assert_eq!(
        (&own[1]["status"], &added["success"]),
        (&json!(200), &json!(true)),
        "M adds a record: {}",
        own[1]
    );
    let record = added["id"]
        .as_str()
        .expect("the new record's id")
        .to_string();
    assert_eq!(
        (&own[2]["status"], &queried["success"]),
        (&json!(200), &json!(true)),
        "M queries: {}",
        own[2]
    );
    assert_eq!(queried["results"], json!([[record, "written by M's page"]]));
    // M's queries run on M's tables: V's table is not there.
    assert_eq!(
        body(&own[3])["success"],
        json!(false),
        "M read V's table: {}",
        own[3]
    );

    // ---- From a foreign site: another origin on this machine, no CSP to stop its fetches. ----
    let site = foreign_site(FOREIGN_PAGE).await;
    let foreign = format!("http://127.0.0.1:{}", site.port);
    open_page(&browser, &format!("{foreign}/"), "elsewhere").await;
    // Control: the page's fetches work (its own origin answers).
    let control = fetch_one(&browser, &Probe::new("its own page", "GET", "/")).await;
    assert_eq!(control["status"], 200, "{control}");
    let m_record = json!({"_table": "note", "text": "forged by a foreign page"});
    let from_foreign = [
        // JSON (and PUT) is preflighted: the node refuses the preflight, so the request itself
        // never goes.
        Probe::new("create an app", "POST", &format!("{ip}/create_app")).json(json!({})),
        Probe::new(
            "add a record to M",
            "POST",
            &format!("{ip}/{m_hex}/add_record"),
        )
        .json(m_record.clone()),
        Probe::new(
            "add a record to M at M's origin",
            "POST",
            &format!("{m_origin}/add_record"),
        )
        .json(m_record.clone()),
        Probe::new(
            "overwrite M's page",
            "PUT",
            &format!("{ip}/{m_hex}/index.html"),
        )
        .text("<h1>defaced</h1>"),
        // Simple requests go out without asking (CSRF): the node refuses them itself.
        Probe::new(
            "create an app (simple request)",
            "POST",
            &format!("{ip}/create_app"),
        )
        .text("{}"),
        Probe::new(
            "add a record to M (simple request)",
            "POST",
            &format!("{ip}/{m_hex}/add_record"),
        )
        .text(&m_record.to_string()),
        Probe::new(
            "add a record at M's origin (simple request)",
            "POST",
            &format!("{m_origin}/add_record"),
        )
        .text(&m_record.to_string()),
        Probe::new(
            "add a record at M's origin (no-cors)",
            "POST",
            &format!("{m_origin}/add_record"),
        )
        .text(&m_record.to_string())
        .no_cors(),
        Probe::new(
            "add a peer (no-cors)",
            "POST",
            &format!("{ip}/{m_hex}/add_peer"),
        )
        .text(r#"{"addr": "127.0.0.1", "port": 9}"#)
        .no_cors(),
        // Reading M from a foreign page.
        Probe::new("read M's page", "GET", &format!("{ip}/{m_hex}/index.html")),
        Probe::new(
            "read M's page at M's origin",
            "GET",
            &format!("{m_origin}/index.html"),
        ),
        Probe::new(
            "read M's schema (no-cors)",
            "GET",
            &format!("{ip}/{m_hex}/_schema"),
        )
        .no_cors(),
        Probe::new("query M", "POST", &format!("{m_origin}/query")).json(json!({"query": M_ROWS})),
        Probe::new(
            "gRPC Streams.Create",
            "POST",
            &format!("{ip}/quire.v1.Streams/Create"),
        )
        .grpc(),
        // DNS rebinding, seen from the foreign page: `evil.example` is this machine now.
        Probe::new(
            "read M through evil.example",
            "GET",
            &format!("http://evil.example:{port}/{m_hex}/"),
        ),
        Probe::new(
            "create an app through evil.example",
            "POST",
            &format!("http://evil.example:{port}/create_app"),
        )
        .json(json!({})),
        Probe::new(
            "create an app through evil.example (simple request)",
            "POST",
            &format!("http://evil.example:{port}/create_app"),
        )
        .text("{}"),
    ];
    violations.extend(attack(&browser, "a foreign page", &from_foreign).await);

    // A form posted to M's origin (a navigation, into a frame so the page stays): text/plain
    // whose body reads as JSON, the oldest CSRF there is.
    let form_target = format!("{m_origin}/add_record");
    Wire::drain(&browser).await;
    let form = browser
        .call(
            reqwest::Method::POST,
            "/execute/async",
            json!({
                "script": r#"
                    const [action, done] = arguments;
                    const frame = document.createElement("iframe");
                    frame.name = "sink";
                    document.body.append(frame);
                    frame.onload = () => done("loaded");
                    const form = document.createElement("form");
                    form.method = "POST";
                    form.action = action;
                    form.enctype = "text/plain";
                    form.target = "sink";
                    const field = document.createElement("input");
                    field.name = '{"_table": "note", "text": "forged by a form", "x": "';
                    field.value = '"}';
                    form.append(field);
                    document.body.append(form);
                    form.submit();
                "#,
                "args": [form_target],
            }),
        )
        .await;
    assert_eq!(form, "loaded");
    let answers = Wire::default()
        .wait_for_answer(&browser, &form_target)
        .await;
    println!("[a foreign page] a form posted to M's origin: the node answered {answers:?}");
    if answers != vec![("POST".to_string(), 403)] {
        violations.push(format!(
            "from a foreign page: a form POST to {form_target} — the node answered {answers:?}"
        ));
    }

    // ---- A page on another port of M's own host name (`*.localhost` is this machine). ----
    let same_name = format!("http://{}.localhost:{}", app_label(&m), site.port);
    open_page(&browser, &format!("{same_name}/"), "elsewhere").await;
    let from_other_port = [
        Probe::new(
            "add a record to M",
            "POST",
            &format!("{m_origin}/add_record"),
        )
        .json(m_record.clone()),
        Probe::new(
            "add a record to M (simple request)",
            "POST",
            &format!("{m_origin}/add_record"),
        )
        .text(&m_record.to_string()),
        Probe::new("read M's page", "GET", &format!("{m_origin}/index.html")),
    ];
    violations.extend(attack(&browser, "M's host name on another port", &from_other_port).await);

    // ---- DNS rebinding: a page at `evil.example:<node port>`. ----
    // Once the name points at this machine, evil.example's page calls the node from its own
    // origin: nothing cross-origin stops it, only the node's check of the Host.
    browser
        .open(&format!("http://evil.example:{port}/{m_hex}/"))
        .await;
    wait_until(
        Duration::from_secs(30),
        "the node's refusal to show",
        || async { browser.script("return document.readyState").await == "complete" },
    )
    .await;
    let shown = browser.script("return document.body.innerText").await;
    let shown = shown.as_str().unwrap_or_default();
    assert!(
        shown.contains(WRONG_HOST),
        "the node answered evil.example with: {shown:?}"
    );
    assert!(shown.contains(r#""success":false"#), "{shown:?}");
    // Same origin: the page reads the node's answers, which give the host as the reason.
    let rebound = [
        Probe::new("create an app", "POST", "/create_app").json(json!({})),
        Probe::new("add a record to M", "POST", &format!("/{m_hex}/add_record"))
            .json(m_record.clone()),
        Probe::new("add a peer", "POST", &format!("/{m_hex}/add_peer"))
            .json(json!({"addr": "127.0.0.1", "port": 9})),
        Probe::new("overwrite M's page", "PUT", &format!("/{m_hex}/index.html")).text("<h1>x</h1>"),
        Probe::new("read M's page", "GET", &format!("/{m_hex}/index.html")),
    ]
    .map(|probe| probe.saying(WRONG_HOST));
    violations.extend(attack(&browser, "evil.example", &rebound).await);
    let grpc = Probe::new("gRPC Streams.Create", "POST", "/quire.v1.Streams/Create").grpc();
    violations.extend(attack(&browser, "evil.example", &[grpc]).await);

    // ---- Nothing changed but M's one record. ----
    let v_after = app_state(&node, &v, V_ROWS).await;
    if v_after != v_before {
        violations.push(format!(
            "V changed:\nbefore {v_before:?}\nafter  {v_after:?}"
        ));
    }
    let m_after = app_state(&node, &m, M_ROWS).await;
    if m_after.files != m_before.files {
        violations.push(format!("M's files changed: {:?}", m_after.files.keys()));
    }
    if m_after.rows != json!([[record, "written by M's page"]]) {
        violations.push(format!(
            "M's table holds more than its page's record: {}",
            m_after.rows
        ));
    }
    if m_after.info.scribes != m_before.info.scribes + 1 {
        violations.push(format!(
            "M holds {} scribes, expected {} + 1",
            m_after.info.scribes, m_before.info.scribes
        ));
    }
    let node_after = node_state(&node).await;
    let expected = NodeState {
        head: node_before.head + 1,
        ..node_before.clone()
    };
    if node_after != expected {
        violations.push(format!(
            "the node changed:\nexpected {expected:?}\nfound    {node_after:?}"
        ));
    }
    let newest: Vec<_> = read_all(&mut owner)
        .await
        .into_iter()
        .filter(|entry| entry.seq > node_before.head)
        .map(|entry| (entry.kind, entry.stream.to_vec(), hex::encode(&entry.id)))
        .collect();
    if newest
        != vec![(
            "record.add".to_string(),
            m.as_bytes().to_vec(),
            record.clone(),
        )]
    {
        violations.push(format!("the log grew by other than M's record: {newest:?}"));
    }

    drop(driver); // closes the browser
    drop(site);
    node.stop().await.unwrap();
    assert!(
        violations.is_empty(),
        "{} violations:\n{}",
        violations.len(),
        violations.join("\n")
    );
}
