//! Shared test helpers: start nodes in-process, gRPC clients, signing as a client, waiting on
//! conditions.

#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use quire::api::access::{AuthChannel, Bearer};
use quire::node::{NodeConfig, RunningNode};
use quire::pb;
use quire::projection_api::{AuthorKey, Kind, ScribeId, StreamId};
use quire::scribe::{Body, Parts, Proof, Scribe};
use tonic::transport::Channel;

/// Starts a node on `dir` with its API on a free loopback port.
pub async fn start_node(dir: &Path) -> RunningNode {
    let node = RunningNode::start(
        NodeConfig::new(dir),
        "127.0.0.1:0".parse().unwrap(),
        Some("127.0.0.1:0".parse().unwrap()),
    )
    .await
    .expect("node starts");
    remember(&node);
    node
}

/// Starts a node on `config` with its API (and, if `peer`, a peer listener) on free loopback
/// ports, remembering its token.
pub async fn start_config(config: NodeConfig, peer: bool) -> RunningNode {
    let node = RunningNode::start(
        config,
        "127.0.0.1:0".parse().unwrap(),
        peer.then(|| "127.0.0.1:0".parse().unwrap()),
    )
    .await
    .expect("node starts");
    remember(&node);
    node
}

/// The owner's token of each node a test started, by API URL: [`owner_channel`] and
/// [`clients`] send it.
static TOKENS: std::sync::Mutex<Option<std::collections::HashMap<String, String>>> =
    std::sync::Mutex::new(None);

/// Makes [`clients`] and [`owner_channel`] of `node`'s URL send its token.
pub fn remember(node: &RunningNode) {
    remember_token(&node.url(), node.token.as_str());
}

/// Makes [`clients`] and [`owner_channel`] of `url` send `token`.
pub fn remember_token(url: &str, token: &str) {
    TOKENS
        .lock()
        .unwrap()
        .get_or_insert_with(Default::default)
        .insert(url.trim_end_matches('/').to_string(), token.to_string());
}

/// The token remembered for `url`.
pub fn token_of(url: &str) -> Option<String> {
    TOKENS
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|tokens| tokens.get(url.trim_end_matches('/')).cloned())
}

/// A channel to `url` that sends the node owner's token (if the test started that node).
pub async fn owner_channel(url: &str) -> AuthChannel {
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .expect("connect to node");
    AuthChannel::new(channel, Bearer::new(token_of(url).as_deref()).unwrap())
}

/// A channel to `url` that sends no token: a stranger.
pub async fn stranger_channel(url: &str) -> AuthChannel {
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .expect("connect to node");
    AuthChannel::new(channel, Bearer::default())
}

/// gRPC clients of one node.
pub struct Clients {
    pub log: pb::log_client::LogClient<AuthChannel>,
    pub streams: pb::streams_client::StreamsClient<AuthChannel>,
    pub admin: pb::admin_client::AdminClient<AuthChannel>,
}

/// The node owner's clients of `url` (see [`remember`]).
pub async fn clients(url: &str) -> Clients {
    let channel = owner_channel(url).await;
    Clients {
        log: pb::log_client::LogClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20),
        streams: pb::streams_client::StreamsClient::new(channel.clone()),
        admin: pb::admin_client::AdminClient::new(channel),
    }
}

pub fn bytes_of(id: &ScribeId) -> Bytes {
    Bytes::copy_from_slice(id.as_bytes())
}

/// Creates a stream with `policy` (None: defaults) and returns its id.
/// Creates a stream whose `x.*` kinds anyone may write (as streams were before the owner-only
/// default; `api::extension_kinds_are_owner_only_by_default` pins that default), unless `policy`
/// has an `x.*` rule of its own.
pub async fn create_stream(
    clients: &mut Clients,
    name: &str,
    policy: Option<pb::Policy>,
) -> StreamId {
    let mut policy = policy.unwrap_or_default();
    if !policy.rules.iter().any(|rule| rule.kind == "x.*") {
        policy.rules.push(pb::KindRule {
            kind: "x.*".into(),
            authors: Some(pb::Authors {
                anyone: true,
                ..Default::default()
            }),
        });
    }
    let info = clients
        .streams
        .create(pb::CreateStreamRequest {
            name: name.into(),
            policy: Some(policy),
            owner: Bytes::new(),
            access: None,
            retention: None,
        })
        .await
        .expect("create stream")
        .into_inner();
    StreamId::from_slice(&info.stream).unwrap()
}

/// Node-signed append of an `x.note`.
pub async fn append_note(clients: &mut Clients, stream: &StreamId, text: &str) -> pb::AppendReply {
    clients
        .log
        .append(pb::AppendRequest {
            stream: bytes_of(stream),
            kind: "x.note".into(),
            content_type: "text/plain".into(),
            payload: Bytes::from(text.to_string()),
            parents: vec![],
        })
        .await
        .expect("append")
        .into_inner()
}

/// The public key of `key`.
pub fn key_of(key: &SigningKey) -> AuthorKey {
    AuthorKey(key.verifying_key().to_bytes())
}

/// The system wall clock now, in milliseconds.
pub fn now_ms() -> u64 {
    quire::hlc::system_wall_clock()()
}

/// `Streams.Get` of `stream` on `node` (as the owner).
pub async fn stream_info(node: &RunningNode, stream: &StreamId) -> pb::StreamInfo {
    clients(&node.url())
        .await
        .streams
        .get(pb::GetStreamRequest {
            stream: bytes_of(stream),
        })
        .await
        .expect("stream get")
        .into_inner()
}

/// Leaves `stream` on `node` (the whole leave: the call returns once it is done).
pub async fn leave(node: &RunningNode, stream: &StreamId) {
    clients(&node.url())
        .await
        .streams
        .leave(pb::LeaveStreamRequest {
            stream: bytes_of(stream),
        })
        .await
        .expect("leave");
}

/// Every refusal any peer of `node` was blamed for.
pub async fn refused_by(node: &RunningNode) -> u64 {
    node_status(node)
        .await
        .peers
        .iter()
        .map(|peer| peer.refused)
        .sum()
}

/// A client key, deterministic from `seed`.
pub fn client_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A scribe signed by `key` into `stream`.
pub fn client_scribe(
    key: &SigningKey,
    stream: &StreamId,
    kind: &str,
    payload: &[u8],
    hlc: u64,
) -> Scribe {
    Scribe::sign(
        Body {
            stream: Some(*stream),
            author: AuthorKey(key.verifying_key().to_bytes()),
            hlc,
            kind: kind.parse::<Kind>().unwrap(),
            content_type: "application/octet-stream".into(),
            payload: Bytes::copy_from_slice(payload),
            parents: vec![],
            membership: None,
            nonce: 0,
        },
        key,
    )
}

/// An `AppendSigned` request for `parts` (envelope, payload and a seal of one).
pub fn signed_request(parts: Parts) -> pb::AppendSignedRequest {
    pb::AppendSignedRequest {
        envelope: parts.envelope,
        payload: parts.payload,
        seal: parts.seal,
        proof: Some(parts.proof.to_proto()),
        id: Bytes::new(),
    }
}

/// The parts of a scribe as the API returned it.
pub fn entry_parts(entry: &pb::Entry) -> Parts {
    Parts {
        redacted_by: (!entry.redacted_by.is_empty()).then(|| entry.redacted_by.clone()),
        envelope: entry.envelope.clone(),
        payload: entry.payload.clone(),
        seal: entry.seal.clone(),
        proof: Proof::from_proto(entry.proof.clone()).unwrap(),
        leaves: None,
    }
}

/// Appends `count` node-signed `x.bulk` scribes in batches of 1000.
pub async fn append_bulk(clients: &mut Clients, stream: &StreamId, count: usize) {
    for batch in 0..count.div_ceil(1000) {
        let appends = (batch * 1000..((batch + 1) * 1000).min(count))
            .map(|index| pb::AppendRequest {
                stream: bytes_of(stream),
                kind: "x.bulk".into(),
                payload: Bytes::from(format!("bulk {index}")),
                ..Default::default()
            })
            .collect();
        clients
            .log
            .append_batch(pb::AppendBatchRequest {
                appends,
                signed: vec![],
                sealed: vec![],
            })
            .await
            .expect("bulk append");
    }
}

/// Every entry of the whole log, via `Log.Read`.
pub async fn read_all(clients: &mut Clients) -> Vec<pb::Entry> {
    let mut entries = Vec::new();
    let mut from = 1;
    loop {
        let mut stream = clients
            .log
            .read(pb::ReadRequest {
                stream: Bytes::new(),
                from_seq: from,
                limit: 100_000,
            })
            .await
            .expect("read")
            .into_inner();
        let before = entries.len();
        while let Some(entry) = stream.message().await.expect("read stream") {
            from = entry.seq + 1;
            entries.push(entry);
        }
        if entries.len() == before {
            return entries;
        }
    }
}

/// `Admin.Status` of `node`, as its owner.
pub async fn node_status(node: &RunningNode) -> pb::StatusReply {
    clients(&node.url())
        .await
        .admin
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner()
}

pub async fn head(clients: &mut Clients) -> u64 {
    clients
        .admin
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .head_seq
}

/// Polls `condition` until it holds, failing the test after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn quire_bin() -> &'static str {
    env!("CARGO_BIN_EXE_quire")
}

/// `quire` with `--node url` and, if the test started that node, `--token`.
pub fn quire_cli(url: &str) -> std::process::Command {
    let mut command = std::process::Command::new(quire_bin());
    command.args(["--node", url]);
    if let Some(token) = token_of(url) {
        command.args(["--token", &token]);
    }
    command
}

/// One HTTP request through reqwest (no redirects followed); `host` is resolved to the node like
/// a browser resolves `*.localhost`. Returns status and body.
pub async fn http_to(
    node: &RunningNode,
    host: Option<&str>,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, String)],
    body: Option<serde_json::Value>,
) -> (u16, String) {
    let mut client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
    if let Some(host) = host {
        client = client.resolve(host, node.api_addr);
    }
    let client = client.build().unwrap();
    let base = match host {
        Some(host) => format!("http://{host}:{}", node.api_addr.port()),
        None => node.url(),
    };
    let mut request = client.request(method, format!("{base}{path}"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let reply = request.send().await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.text().await.unwrap())
}

/// Every `note` row (its `text`) of app `tid`, by the anonymous HTTP query route.
pub async fn query_notes(url: &str, tid: &str) -> Vec<serde_json::Value> {
    let reply: serde_json::Value = reqwest::Client::new()
        .post(format!("{url}/{tid}/query"))
        .json(&serde_json::json!({"query": "SELECT text FROM note ORDER BY rowid"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    reply["results"].as_array().cloned().unwrap_or_default()
}

/// Scribes of `stream` `node` holds, genesis included (0 if it does not hold it).
pub fn held(node: &RunningNode, stream: &StreamId) -> u64 {
    node.log
        .stream(stream)
        .map_or(0, |state| state.record.scribes)
}

/// A peer batch of `stream` with `scribes` at the sender's seqs `first..`, as the wire has it.
pub fn batch_of(stream: &StreamId, scribes: &[Scribe], first: u64) -> pb::peer_message::Message {
    let last = first + scribes.len() as u64 - 1;
    let batch = quire::replication::session::Message::Batch {
        stream: *stream,
        scribes: scribes
            .iter()
            .enumerate()
            .map(|(n, scribe)| quire::replication::session::WireScribe {
                seq: first + n as u64,
                id: scribe.id,
                parts: scribe.parts(),
            })
            .collect(),
        through: last,
        head: last,
    };
    quire::replication::wire::to_proto(&batch)
        .message
        .expect("a message")
}
