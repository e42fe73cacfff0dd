//! Set-up shared by the benches (a directory, so cargo does not take it for a bench of its own).

#![allow(dead_code)]

use bytes::Bytes;
use quire::api::access::{AuthChannel, Bearer};
use quire::node::RunningNode;
use quire::pb;
use tonic::transport::Channel;

/// A connected channel to the node at `url` that sends the node owner's `token` with every call
/// (creating streams, appending and the like need it).
pub async fn connect(url: String, token: &str) -> AuthChannel {
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    AuthChannel::new(channel, Bearer::new(Some(token)).unwrap())
}

/// A connected channel to the in-process `node`, as its owner.
pub async fn owner(node: &RunningNode) -> AuthChannel {
    connect(node.url(), node.token.as_str()).await
}

/// The owner's token of the node serving `data_dir` (a `quire serve` child process), once the
/// node has written it.
pub fn token_of(data_dir: &std::path::Path) -> String {
    let path = data_dir.join(quire::api::access::TOKEN_FILE);
    let started = std::time::Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            if !text.trim().is_empty() {
                return text.trim().to_string();
            }
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{} was not written",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Creates a stream named `name` with `policy` (`None`: the defaults); returns its id bytes.
pub async fn create_stream(channel: &AuthChannel, name: &str, policy: Option<pb::Policy>) -> Bytes {
    create_retained(channel, name, policy, None).await
}

/// [`create_stream`] with a retention rule (`None`: keep everything).
pub async fn create_retained(
    channel: &AuthChannel,
    name: &str,
    policy: Option<pb::Policy>,
    retention: Option<pb::Retention>,
) -> Bytes {
    pb::streams_client::StreamsClient::new(channel.clone())
        .create(pb::CreateStreamRequest {
            name: name.into(),
            policy,
            owner: Bytes::new(),
            access: None,
            retention,
        })
        .await
        .unwrap()
        .into_inner()
        .stream
}

/// A policy without the default 100 MiB per-stream limit (a million scribes are far over it).
pub fn unlimited() -> pb::Policy {
    pb::Policy {
        max_stream_bytes: 1 << 40,
        ..Default::default()
    }
}

/// A `Log` client on `channel` that takes batches of up to 64 MiB each way.
pub fn log_client(channel: AuthChannel) -> pb::log_client::LogClient<AuthChannel> {
    pb::log_client::LogClient::new(channel)
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20)
}

/// How many scribes of `stream` (genesis included) the node on `channel` holds; 0 if none.
pub async fn scribes_held(channel: &AuthChannel, stream: &Bytes) -> u64 {
    pb::streams_client::StreamsClient::new(channel.clone())
        .get(pb::GetStreamRequest {
            stream: stream.clone(),
        })
        .await
        .map(|info| info.into_inner().scribes)
        .unwrap_or(0)
}

/// What the client API's trust boundary adds to one request: the median cost of
/// `Access::admit` (Host, Origin and token checks) plus the gRPC method's rule, on the headers
/// of a typical request to `path` (`grpc`: a gRPC call; `token`: the owner's, with the token).
/// Measured as batches of 1000 calls; the median batch, per call.
pub fn access_check_cost(path: &str, grpc: bool, token: bool) -> std::time::Duration {
    use axum::http::{header, HeaderMap, HeaderValue, Method, Uri};
    let dir = tempfile::tempdir().unwrap();
    let access = quire::api::access::Access::open(dir.path(), &[], false).unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8000"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if grpc {
            "application/grpc"
        } else {
            "application/json"
        }),
    );
    if token {
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {}", access.token().as_str())
                .parse()
                .unwrap(),
        );
    }
    let uri: Uri = path.parse().unwrap();
    let mut batches = Vec::with_capacity(200);
    for _ in 0..200 {
        let started = std::time::Instant::now();
        for _ in 0..1000 {
            let admitted = access
                .admit(&Method::POST, &uri, &headers, grpc, true)
                .unwrap();
            let rule = quire::api::access::grpc_rule(uri.path());
            std::hint::black_box((admitted, rule));
        }
        batches.push(started.elapsed() / 1000);
    }
    batches.sort();
    batches[batches.len() / 2]
}

/// The `p` quantile (0..=1) of `samples`, sorting them; zero when there are none.
pub fn percentile(samples: &mut [std::time::Duration], p: f64) -> std::time::Duration {
    if samples.is_empty() {
        return std::time::Duration::ZERO;
    }
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

/// This process's resident set, in MiB (0 if `/proc` cannot say).
pub fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The system clock in unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
