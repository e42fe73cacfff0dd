//! The client side of the live binding, shared by `tests/it/live.rs` and
//! `tests/it/attack_live.rs`: a WebSocket to a node's socksync endpoint ([`Live`], generic over
//! the transport so that TLS can use it too) opened as the owner, anyone or an app's page, the
//! frames it sends and reads, and the HTTP helpers that make a stream with a schema and add
//! records to it. What only one of the two files needs (its schema, its kind of call, its list
//! model) stays in that file.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use quire::api::access::app_label;
use quire::node::RunningNode;
use quire::pb;
use quire::projection_api::StreamId;
use serde_json::{json, Value as Json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::common::*;
use crate::replication::CONVERGE;

/// How long a frame the test expects may take.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Connections.

/// One WebSocket to a node's live endpoint.
pub(crate) struct Live<S = TcpStream> {
    pub(crate) ws: WebSocketStream<S>,
    /// Frames received so far.
    pub(crate) received: usize,
}

/// What came next on a connection.
#[derive(Debug)]
pub(crate) enum Event {
    Frame(Json),
    /// The server closed the connection (a close frame, an error or the end of the stream).
    Closed(String),
    Timeout,
}

/// A TCP connection to `addr`, with a receive buffer of `recv_buffer` bytes if given.
pub(crate) async fn tcp_to(addr: SocketAddr, recv_buffer: Option<u32>) -> TcpStream {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4().unwrap(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6().unwrap(),
    };
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    socket.connect(addr).await.unwrap()
}

/// The WebSocket handshake for `ws://{authority}{path}` with extra `headers`, over `io`.
pub(crate) async fn upgrade_over<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    authority: &str,
    path: &str,
    headers: &[(&str, String)],
) -> Result<Live<S>, WsError> {
    let mut request = format!("ws://{authority}{path}").into_client_request()?;
    for (name, value) in headers {
        request.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    let (ws, _) = tokio_tungstenite::client_async(request, io).await?;
    Ok(Live { ws, received: 0 })
}

/// Opens `path` on `node`'s API port with `Host: host` (the node's own `127.0.0.1:<port>` when
/// None) and extra `headers`. The TCP connection always goes to the node's address (127.0.0.1),
/// as a browser's to `*.localhost` does.
pub(crate) async fn open_as(
    node: &RunningNode,
    host: Option<&str>,
    path: &str,
    headers: &[(&str, String)],
) -> Result<Live, WsError> {
    open_with(node, host, path, headers, None).await
}

/// [`open_as`] over a socket whose receive buffer is `recv_buffer` bytes (None: the system's,
/// which grows as the client reads).
pub(crate) async fn open_with(
    node: &RunningNode,
    host: Option<&str>,
    path: &str,
    headers: &[(&str, String)],
    recv_buffer: Option<u32>,
) -> Result<Live, WsError> {
    let authority = match host {
        Some(host) => format!("{host}:{}", node.api_addr.port()),
        None => node.api_addr.to_string(),
    };
    let tcp = tcp_to(node.api_addr, recv_buffer).await;
    upgrade_over(tcp, &authority, path, headers).await
}

/// The `authorization` header with the node owner's token.
pub(crate) fn bearer(node: &RunningNode) -> (&'static str, String) {
    ("authorization", format!("Bearer {}", node.token.as_str()))
}

/// `/<tid>/socksync` on the node's host, with the owner's token or none (anyone).
pub(crate) async fn open(node: &RunningNode, stream: &StreamId, owner: bool) -> Live {
    let headers = if owner { vec![bearer(node)] } else { vec![] };
    open_as(
        node,
        None,
        &format!("/{}/socksync", stream.to_hex()),
        &headers,
    )
    .await
    .expect("the live endpoint upgrades")
}

/// The host of `stream`'s app origin, without the port.
pub(crate) fn app_host(stream: &StreamId) -> String {
    format!("{}.localhost", app_label(stream))
}

/// Opens `path` as a page of `stream`'s app would: its Host and Origin.
pub(crate) async fn open_app(
    node: &RunningNode,
    stream: &StreamId,
    path: &str,
) -> Result<Live, WsError> {
    let host = app_host(stream);
    let origin = format!("http://{host}:{}", node.api_addr.port());
    open_as(node, Some(&host), path, &[("origin", origin)]).await
}

impl<S: AsyncRead + AsyncWrite + Unpin> Live<S> {
    pub(crate) async fn send(&mut self, frame: Json) {
        self.raw(Message::Text(frame.to_string())).await;
    }

    pub(crate) async fn raw(&mut self, message: Message) {
        self.ws.send(message).await.expect("the frame is sent");
    }

    /// The next frame (counted in `received`), or why there is none within `within`.
    pub(crate) async fn event(&mut self, within: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Event::Timeout,
                Ok(next) => next,
            };
            match next {
                Some(Ok(Message::Text(text))) => {
                    self.received += 1;
                    let frame = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("the server sent JSON ({e}): {text}"));
                    return Event::Frame(frame);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Binary(bytes))) => {
                    panic!(
                        "the server sends text frames only, not {} bytes",
                        bytes.len()
                    )
                }
                Some(Ok(Message::Close(close))) => return Event::Closed(format!("{close:?}")),
                Some(Err(error)) => return Event::Closed(error.to_string()),
                None => return Event::Closed("end of stream".into()),
            }
        }
    }

    /// The next frame (the test fails without one within [`WAIT`]).
    pub(crate) async fn next(&mut self) -> Json {
        match self.event(WAIT).await {
            Event::Frame(frame) => frame,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Sends `frame` and returns the next frame.
    pub(crate) async fn ask(&mut self, frame: Json) -> Json {
        self.send(frame).await;
        self.next().await
    }

    /// Sends `frame`, which must get no answer: the next frame is the answer to a probe sent
    /// after it (an unknown list's error 3), so nothing came in between.
    pub(crate) async fn silent(&mut self, frame: Json) {
        self.send(frame.clone()).await;
        self.probe(&format!("{frame} must get no answer")).await;
    }

    /// The session still reads and answers: an unknown list's error 3 comes back.
    pub(crate) async fn probe(&mut self, what: &str) {
        let probe = self
            .ask(json!({"func": "get", "type": "list", "name": "silence_probe"}))
            .await;
        assert_eq!(
            probe,
            error(3, "silence_probe is not registered."),
            "{what}"
        );
    }

    pub(crate) async fn subscribe(&mut self, kind: &str, name: &str) {
        self.silent(json!({"func": "subscribe", "type": kind, "name": name}))
            .await;
    }

    /// Calls function `name` (already subscribed) and reads until the call ends: Ok(its
    /// `return` frame, matched by `id`) or Err(the first error frame), with the frames of other
    /// groups that arrived meanwhile, in order. Each test file says what it makes of them.
    pub(crate) async fn call_frames(
        &mut self,
        name: &str,
        id: &str,
        args: Json,
    ) -> (Result<Json, Json>, Vec<Json>) {
        self.send(
            json!({"func": "call", "type": "function", "name": name, "id": id, "args": args}),
        )
        .await;
        let mut others = Vec::new();
        loop {
            let frame = self.next().await;
            if frame["func"] == "return" && frame["id"] == id {
                return (Ok(frame), others);
            }
            if frame["func"] == "error" {
                return (Err(frame), others);
            }
            others.push(frame);
        }
    }
}

/// An error frame: exactly these three keys.
pub(crate) fn error(code: u64, message: &str) -> Json {
    json!({"func": "error", "error_code": code, "message": message})
}

// ---------------------------------------------------------------------------------------------
// Streams and records (over HTTP, as the owner unless said otherwise).

/// A `POST /<tid>/<action>` on the node's host, with the owner's token if `owner`.
pub(crate) async fn post(
    node: &RunningNode,
    stream: &StreamId,
    action: &str,
    owner: bool,
    body: Json,
) -> (u16, Json) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/{}/{action}", node.url(), stream.to_hex()))
        .json(&body);
    if owner {
        request = request.bearer_auth(node.token.as_str());
    }
    let reply = request.send().await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or(Json::Null))
}

/// Puts `schema` as the stream's `_schema` (as its owner).
pub(crate) async fn put_schema(node: &RunningNode, stream: &StreamId, schema: &str) {
    let put = reqwest::Client::new()
        .put(format!("{}/{}/_schema", node.url(), stream.to_hex()))
        .bearer_auth(node.token.as_str())
        .header("content-type", "application/json")
        .body(schema.to_string())
        .send()
        .await
        .unwrap();
    let status = put.status().as_u16();
    assert_eq!(status, 204, "{}", put.text().await.unwrap());
}

/// A new stream on `node` with `schema` in force (its lists registered).
pub(crate) async fn stream_with(
    node: &RunningNode,
    name: &str,
    schema: &str,
    policy: Option<pb::Policy>,
) -> StreamId {
    let mut owner = clients(&node.url()).await;
    let stream = create_stream(&mut owner, name, policy).await;
    put_schema(node, &stream, schema).await;
    wait_for_table(node, &stream).await;
    stream
}

/// Waits until `node`'s copy of `stream` has table `message` (its schema is in force).
pub(crate) async fn wait_for_table(node: &RunningNode, stream: &StreamId) {
    wait_until(CONVERGE, "the schema to be in force", || async {
        post(
            node,
            stream,
            "query",
            false,
            json!({"query": "SELECT count(*) FROM message"}),
        )
        .await
        .0 == 200
    })
    .await;
}

/// Adds a record as the node's owner over HTTP: (record id, seq).
pub(crate) async fn add(node: &RunningNode, stream: &StreamId, record: Json) -> (String, u64) {
    let (status, reply) = post(node, stream, "add_record", true, record).await;
    assert_eq!(status, 200, "{reply}");
    (
        reply["id"].as_str().unwrap().to_string(),
        reply["seq"].as_u64().unwrap(),
    )
}
