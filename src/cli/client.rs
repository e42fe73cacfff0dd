//! The CLI's connection to a running node: which node, with which token, one channel, the typed
//! clients, and a gRPC status turned into an error that names its code and says what to do.
//!
//! The node is `--node` (or `$QUIRE_NODE`), else the node serving the data directory (`-d DIR`,
//! default the default data directory: its `api.addr`), else `http://127.0.0.1:8000`. The token
//! is `--token` (or `$QUIRE_TOKEN`), else the data directory's `api.token` — sent only to the
//! node whose `api.addr` that directory holds, so one node's token never goes to another.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result};
use tonic::transport::Channel;

use crate::api::access::{AuthChannel, Bearer, TOKEN_FILE};
use crate::api::MAX_MESSAGE_BYTES;
use crate::node::API_ADDR_FILE;
use crate::pb;

/// The node a command talks to, and how it proves to be its owner.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    url: String,
    token: Option<String>,
    /// The token was read from a data directory: the node must prove it holds it first.
    token_from_dir: bool,
    ca_cert: Option<PathBuf>,
    /// `--insecure`: a token may go over plain http:// to another machine.
    insecure: bool,
}

/// Where the token came from (or why there is none), for the message of a refusal.
static TOKEN_NOTE: OnceLock<String> = OnceLock::new();

impl Node {
    /// The node and token the command line names (see the module docs).
    pub(crate) fn resolve(
        node: Option<&str>,
        token: Option<&str>,
        ca_cert: Option<&Path>,
        data_dir: &Path,
    ) -> Result<Node> {
        let served = read_trimmed(&data_dir.join(API_ADDR_FILE));
        let url = match node {
            Some(node) => with_scheme(node),
            None => served
                .clone()
                .unwrap_or_else(|| format!("http://{}", super::DEFAULT_API)),
        };
        let token_from_dir = token.is_none();
        let (token, note) = match token {
            Some(token) => (Some(token.trim().to_string()), "the token given by --token / QUIRE_TOKEN was refused: it is not this node's (see its data directory's api.token; `quire token rotate` changes it)".to_string()),
            None if served.as_deref() == Some(url.as_str()) => {
                let path = data_dir.join(TOKEN_FILE);
                match read_trimmed(&path) {
                    Some(token) => (Some(token), format!("the token read from {} was refused (was it rotated?)", path.display())),
                    None => (None, format!("cannot read {}: run as the user who runs the node, or pass --token / QUIRE_TOKEN", path.display())),
                }
            }
            None => (None, format!(
                "no token was sent: {url} is not the node serving {} (its api.addr), so its token is not used; pass -d <that node's data directory>, or --token / QUIRE_TOKEN",
                data_dir.display()
            )),
        };
        let _ = TOKEN_NOTE.set(note);
        Ok(Node {
            url,
            token_from_dir: token_from_dir && token.is_some(),
            token,
            ca_cert: ca_cert.map(Path::to_path_buf),
            insecure: false,
        })
    }

    /// Lets the token go over plain http:// to another machine (`--insecure`).
    pub(crate) fn insecure(mut self, insecure: bool) -> Node {
        self.insecure = insecure;
        self
    }

    /// The client API URL.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// `127.0.0.1:8000` → `http://127.0.0.1:8000`.
fn with_scheme(node: &str) -> String {
    if node.contains("://") {
        node.to_string()
    } else {
        format!("http://{node}")
    }
}

/// Whether `url`'s host is this machine: a loopback address, the unspecified address (a node
/// listening on all addresses writes that in its api.addr; connecting to it reaches this
/// machine), `localhost` or a name under it.
fn is_local(url: &str) -> bool {
    let Ok(uri) = url.parse::<axum::http::Uri>() else {
        return false;
    };
    let Some(host) = uri.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = host.to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
}

/// A channel to `node` that sends its token with every call.
pub(crate) async fn channel(node: &Node) -> Result<AuthChannel> {
    let url = node.url();
    if node.token.is_some() && !node.insecure && !url.starts_with("https://") && !is_local(url) {
        anyhow::bail!(
            "refusing to send the owner's token in clear text to {url}, which is not on this machine: serve the node with TLS (--api-tls-cert/--api-tls-key) and use https://, or pass --insecure if the network in between is trusted"
        );
    }
    let mut endpoint = Channel::from_shared(url.to_string())
        .with_context(|| format!("--node {url:?} is not a URL like http://127.0.0.1:8000"))?;
    if url.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if let Some(path) = &node.ca_cert {
            let pem =
                std::fs::read(path).with_context(|| format!("--ca-cert {}", path.display()))?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).context("TLS settings")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach a quire node at {url}: is `quire serve` running there? (set --node or QUIRE_NODE)"))?;
    let mut token = node.token.as_deref();
    if node.token_from_dir && !proves_token(&channel, token.unwrap_or_default()).await {
        // A stale api.addr: whoever listens there now must not get the token.
        token = None;
        STALE.set(()).ok();
    }
    let bearer = Bearer::new(token).context("the token has characters a header cannot carry")?;
    Ok(AuthChannel::new(channel, bearer))
}

/// Set when the node at a data directory's api.addr could not prove it holds its token.
static STALE: OnceLock<()> = OnceLock::new();

/// Whether the node on `channel` proves it holds `token` (`Admin.Prove` with a fresh nonce).
async fn proves_token(channel: &Channel, token: &str) -> bool {
    use rand::RngCore;
    let Some(token) = crate::api::access::Token::parse(token) else {
        return false;
    };
    let mut nonce = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let reply = pb::admin_client::AdminClient::new(channel.clone())
        .prove(pb::ProveRequest {
            nonce: bytes::Bytes::copy_from_slice(&nonce),
        })
        .await;
    reply.is_ok_and(|reply| token.verify_proof(&nonce, &reply.into_inner().mac))
}

pub(crate) fn status_error(status: tonic::Status) -> anyhow::Error {
    if status.code() == tonic::Code::Unauthenticated {
        if STALE.get().is_some() {
            return anyhow::anyhow!(
                "unauthenticated: {}\nthe token of the data directory was not sent: the node at its api.addr could not prove it holds that token (the node is not running and another program listens there, or api.token changed by hand); start the node, or pass --node and --token",
                status.message()
            );
        }
        if let Some(note) = TOKEN_NOTE.get() {
            return anyhow::anyhow!("unauthenticated: {}\n{note}", status.message());
        }
    }
    anyhow::anyhow!("{}: {}", code_name(status.code()), status.message())
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::InvalidArgument => "invalid argument",
        Code::NotFound => "not found",
        Code::PermissionDenied => "permission denied",
        Code::Unauthenticated => "unauthenticated",
        Code::ResourceExhausted => "too large",
        Code::FailedPrecondition => "failed precondition",
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "not yet",
        _ => "failed",
    }
}

pub(crate) async fn streams_client(
    node: &Node,
) -> Result<pb::streams_client::StreamsClient<AuthChannel>> {
    Ok(pb::streams_client::StreamsClient::new(channel(node).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

pub(crate) async fn log_client(node: &Node) -> Result<pb::log_client::LogClient<AuthChannel>> {
    Ok(pb::log_client::LogClient::new(channel(node).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

#[cfg(test)]
mod tests {
    use super::is_local;

    #[test]
    fn only_this_machine_is_local() {
        for url in [
            "http://127.0.0.1:8000",
            "http://127.9.9.9:1",
            "http://[::1]:8000",
            "http://localhost:8000",
            "http://LocalHost:8000",
            "http://abc.localhost:8000",
            "http://0.0.0.0:8000",
        ] {
            assert!(is_local(url), "{url}");
        }
        for url in [
            "http://10.0.0.5:8000",
            "http://example.com:8000",
            "http://localhost.example.com:8000",
            "http://127.0.0.1.nip.io:8000",
            "http://[::ffff:10.0.0.1]:8000",
            "not a url",
        ] {
            assert!(!is_local(url), "{url}");
        }
    }
}
