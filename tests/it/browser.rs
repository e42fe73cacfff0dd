//! The example app in a real browser: headless Chromium, driven over WebDriver (chromedriver),
//! opens the message board from node A and posts a message; the same board opened from node B
//! shows it without reloading. Needs Debian's `chromium` and `chromium-driver` (the README's test
//! command and `.ci/run` install them).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;
use crate::replication::{connect, join, CONVERGE};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver child process, killed on drop.
struct Driver {
    child: std::process::Child,
    url: String,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
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
    let profile = driver._profile.path().join(name);
    let http = reqwest::Client::new();
    let reply: Value = http
        .post(format!("{}/session", driver.url))
        .json(&json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                         "--disable-background-networking", "--disable-dev-shm-usage",
                         format!("--user-data-dir={}", profile.display())]
            }
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
    Session {
        http,
        url: format!("{}/session/{id}", driver.url),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_board_posted_on_a_appears_on_b_without_a_reload() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = start_node(dir_b.path()).await;
    let mut clients_a = clients(&a.url()).await;
    let stream = create_stream(&mut clients_a, "board", None).await;
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/message-board");
    let pushed = Command::new(quire_bin())
        .args(["files", "push", &stream.to_hex()])
        .arg(&app)
        .args(["--node", &a.url()])
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
    for session in [on_a, on_b] {
        session.call(reqwest::Method::DELETE, "", json!({})).await;
    }
    drop(driver);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
