//! Who is calling: the trust boundary of the client API (`docs/security.md`).
//!
//! Every request on the client API listener passes [`Access::admit`] before any service sees it:
//! - **Host.** Only the node's own names are answered: IP literals, `localhost`, app hosts
//!   `<label>.localhost` and the names given with `--api-host` (and their app hosts). A
//!   DNS-rebinding page (`Host: evil.example`) is refused.
//! - **Caller.** [`Caller::Owner`] presents the node's token (`authorization: Bearer …`, from
//!   `api.token` in the data directory); [`Caller::App`] is a page of an app, at the app's own
//!   origin, calling that origin; [`Caller::Anyone`] is everybody else. A browser request that is
//!   not from the origin it targets is refused, but for a plain GET navigation (a link).
//! - **gRPC methods.** [`grpc_rule`] sorts every method: public (reads, client-signed appends),
//!   owner-only (anything that acts with the node's key or changes the node), or decided by the
//!   method from its request ([`Rule::ByRequest`]). A method missing from the table is owner-only.
//!
//! The caller travels in the request's extensions; services read it with [`caller_of`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use axum::http::{header, HeaderMap, Method, Uri};
use quire_projection_api::StreamId;
use subtle::ConstantTimeEq;

/// Name of the file in the data directory that holds the node owner's token.
pub const TOKEN_FILE: &str = "api.token";

/// The names a node answers to without `--api-host`.
pub const LOCAL_NAME: &str = "localhost";

/// Who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// Holds the node's token: may do everything.
    Owner,
    /// A page of this app, calling its own origin: may query, add records, upvote and read
    /// files and kv of its own stream.
    App(StreamId),
    /// Anybody who reaches the port: reads and client-signed appends.
    Anyone,
}

/// What a request is addressed to, by its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The node itself (an IP literal, `localhost` or an `--api-host` name).
    Node {
        /// The name it was reached by (None for an IP literal or no Host).
        name: Option<String>,
    },
    /// An app's own origin, `<label>.<name>`.
    App {
        /// The app's stream.
        stream: StreamId,
        /// The node name under the label.
        name: String,
    },
}

/// A request let in: who calls, what it targets, and whether a browser sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// Who is calling.
    pub caller: Caller,
    /// What it targets.
    pub target: Target,
    /// A browser sent it (it carries `Origin`, `Sec-Fetch-Site` or `Sec-Fetch-Mode`).
    pub browser: bool,
    /// The request's port in its Host, if any (for links to app origins).
    pub port: Option<u16>,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No token, or a wrong one, for a call that needs it (gRPC 16, HTTP 401).
    Unauthenticated(String),
    /// Not allowed whatever the token (gRPC 7, HTTP 403).
    Forbidden(String),
}

impl Refusal {
    /// The gRPC status of the refusal.
    pub fn status(&self) -> tonic::Status {
        match self {
            Refusal::Unauthenticated(message) => tonic::Status::unauthenticated(message.clone()),
            Refusal::Forbidden(message) => tonic::Status::permission_denied(message.clone()),
        }
    }
}

/// How a gRPC method is guarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Anyone may call it.
    Public,
    /// Only the owner.
    Owner,
    /// The method decides from its request (it reads [`caller_of`]).
    ByRequest,
}

/// Every gRPC method of the client API that is not owner-only. Kept beside the owner-only ones
/// so that a test can check every method of the descriptor set is named here.
pub const GRPC_METHODS: &[(&str, Rule)] = &[
    ("/quire.v1.Streams/Create", Rule::Owner),
    ("/quire.v1.Streams/Get", Rule::Public),
    ("/quire.v1.Streams/List", Rule::Public),
    ("/quire.v1.Streams/Join", Rule::Owner),
    ("/quire.v1.Streams/CancelJoin", Rule::Owner),
    ("/quire.v1.Streams/Leave", Rule::Owner),
    ("/quire.v1.Streams/Excluded", Rule::Owner),
    ("/quire.v1.Streams/Redact", Rule::Owner),
    ("/quire.v1.Streams/Retain", Rule::Owner),
    ("/quire.v1.Streams/Prune", Rule::Owner),
    ("/quire.v1.Log/Append", Rule::Owner),
    ("/quire.v1.Log/AppendSigned", Rule::Public),
    // Node-signed `appends` need the owner; client-signed and sealed ones do not.
    ("/quire.v1.Log/AppendBatch", Rule::ByRequest),
    ("/quire.v1.Log/Get", Rule::Public),
    ("/quire.v1.Log/Read", Rule::Public),
    // A durable consumer (its cursor lives on the node) needs the owner.
    ("/quire.v1.Log/Subscribe", Rule::ByRequest),
    ("/quire.v1.Log/Ack", Rule::Owner),
    ("/quire.v1.Admin/Status", Rule::Owner),
    ("/quire.v1.Admin/AddPeer", Rule::Owner),
    ("/quire.v1.Admin/RemovePeer", Rule::Owner),
    ("/quire.v1.Admin/RotateToken", Rule::Owner),
    ("/quire.v1.Admin/AllowPeer", Rule::Owner),
    ("/quire.v1.Admin/DenyPeer", Rule::Owner),
    ("/quire.v1.Admin/PeerKeys", Rule::Owner),
    ("/quire.v1.Admin/Prove", Rule::Public),
    ("/quire.v1.Projections/List", Rule::Owner),
    ("/quire.v1.Projections/Rebuild", Rule::Owner),
    ("/quire.v1.Projections/Digest", Rule::Owner),
    ("/quire.v1.Projections/Quarantined", Rule::Owner),
    ("/quire.v1.Projections/Retry", Rule::Owner),
    ("/quire.v1.Projections/Skip", Rule::Owner),
    ("/quire.v1.Kv/Get", Rule::Public),
    ("/quire.v1.Kv/Set", Rule::Owner),
    ("/quire.v1.Kv/Delete", Rule::Owner),
    ("/quire.v1.Kv/Update", Rule::Owner),
    ("/quire.v1.Kv/Scan", Rule::Public),
    ("/quire.v1.Kv/Watch", Rule::Public),
    ("/quire.v1.Sql/Query", Rule::Public),
    ("/quire.v1.Files/Put", Rule::Owner),
    ("/quire.v1.Files/Get", Rule::Public),
    ("/quire.v1.Files/Delete", Rule::Owner),
    ("/quire.v1.Files/List", Rule::Public),
];

/// The rule of the gRPC method at `path` (`/package.Service/Method`). Health checks and
/// reflection are public; a method not in [`GRPC_METHODS`] is owner-only.
pub fn grpc_rule(path: &str) -> Rule {
    if path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
    {
        return Rule::Public;
    }
    GRPC_METHODS
        .iter()
        .find(|(method, _)| *method == path)
        .map_or(Rule::Owner, |(_, rule)| *rule)
}

/// Whether `caller` may read `stream` on this node's client API: anyone a public stream; a
/// private one, the node's owner and the stream's own app (its origin) alone.
pub fn may_read(caller: Caller, stream: &crate::log::StreamState) -> bool {
    may_read_stream(caller, &stream.id, stream.policy.private)
}

/// [`may_read`] from a stream's id and whether it is private.
pub fn may_read_stream(caller: Caller, stream: &StreamId, private: bool) -> bool {
    !private || caller == Caller::Owner || caller == Caller::App(*stream)
}

/// The caller a service method was admitted as. A request that did not pass [`Access::admit`]
/// (an in-process call) counts as [`Caller::Anyone`]: in-process callers that act for the owner
/// say so with [`as_owner`].
pub fn caller_of<T>(request: &tonic::Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .copied()
        .unwrap_or(Caller::Anyone)
}

/// `request` marked as the owner's (for in-process calls made after the owner was checked).
pub fn as_owner<T>(mut request: tonic::Request<T>) -> tonic::Request<T> {
    request.extensions_mut().insert(Caller::Owner);
    request
}

/// Refuses `request` unless its caller is the owner.
#[allow(clippy::result_large_err)] // a service's own error type
pub fn require_owner<T>(request: &tonic::Request<T>, what: &str) -> Result<(), tonic::Status> {
    match caller_of(request) {
        Caller::Owner => Ok(()),
        _ => Err(Refusal::Unauthenticated(needs_token(what)).status()),
    }
}

/// The message of a refusal for want of the token.
pub fn needs_token(what: &str) -> String {
    format!(
        "{what} needs the node owner's token: send `authorization: Bearer <token>` (the token is in \
         the node's data directory, file {TOKEN_FILE}; the quire CLI reads it there, or takes \
         --token / QUIRE_TOKEN)"
    )
}

/// The node owner's secret: 32 random bytes, as 64 hex characters.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// A new random token.
    pub fn generate() -> Token {
        use rand::RngCore;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Token(hex::encode(bytes))
    }

    /// A token from its text (trimmed); None if it is too short, too long or not printable.
    pub fn parse(text: &str) -> Option<Token> {
        let text = text.trim();
        let printable = text.bytes().all(|b| b.is_ascii_graphic());
        (printable && (16..=256).contains(&text.len())).then(|| Token(text.to_string()))
    }

    /// The token's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time independent of where they differ and of
    /// either's length (their SHA-256 digests are compared in constant time).
    pub fn matches(&self, presented: &str) -> bool {
        use sha2::{Digest, Sha256};
        let (ours, theirs) = (
            Sha256::digest(self.0.as_bytes()),
            Sha256::digest(presented.as_bytes()),
        );
        bool::from(ours.as_slice().ct_eq(theirs.as_slice()))
    }

    /// The proof that a node holds this token, for `nonce` (`Admin.Prove`):
    /// HMAC-SHA256(key = token, message = "quire.prove.v1" ‖ nonce).
    pub fn prove(&self, nonce: &[u8]) -> [u8; 32] {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(self.0.as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(b"quire.prove.v1");
        mac.update(nonce);
        mac.finalize().into_bytes().into()
    }

    /// Whether `mac` is this token's proof for `nonce` (in constant time).
    pub fn verify_proof(&self, nonce: &[u8], mac: &[u8]) -> bool {
        bool::from(self.prove(nonce).as_slice().ct_eq(mac))
    }

    /// Reads the token of `data_dir`, writing a new one (mode 0600) if there is none. A token
    /// file others can read is made private again, with a warning.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<Token> {
        let path = data_dir.join(TOKEN_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let token = Token::parse(&text).ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "{} does not hold a token (16 to 256 printable characters); delete it and a new one is made at start",
                            path.display()
                        ),
                    )
                })?;
                make_private(&path)?;
                Ok(token)
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let token = Token::generate();
                token.store(data_dir)?;
                Ok(token)
            }
            Err(error) => Err(error),
        }
    }

    /// Writes this token to `data_dir/api.token` (mode 0600), replacing any there atomically.
    pub fn store(&self, data_dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let path = data_dir.join(TOKEN_FILE);
        let temporary = data_dir.join(format!("{TOKEN_FILE}.new"));
        let _ = std::fs::remove_file(&temporary);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&temporary)?;
        file.write_all(format!("{}\n", self.0).as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path)?;
        if let Ok(dir) = std::fs::File::open(data_dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

fn make_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "the token file could be read by others; making it private (0600)");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// The trust boundary of one node's client API. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Access {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    token: RwLock<Token>,
    data_dir: PathBuf,
    /// Lower-case names the node answers to: `localhost` and every `--api-host`.
    names: Vec<String>,
    /// Whether the API is served over TLS (app links are `https://`).
    tls: bool,
    /// How many times the token was rotated: what an open connection admitted as the owner
    /// watches, to end when its token no longer works.
    rotations: tokio::sync::watch::Sender<u64>,
    /// The benchmark's switch ([`crate::node::NodeConfig::without_access_checks`]).
    unchecked: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Access {
    /// The boundary of a node on `data_dir` (its token is read or made there), answering to
    /// `localhost`, IP literals and `extra_names`.
    pub fn open(data_dir: &Path, extra_names: &[String], tls: bool) -> std::io::Result<Access> {
        let token = Token::load_or_create(data_dir)?;
        let mut names = vec![LOCAL_NAME.to_string()];
        for name in extra_names {
            let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
            if !name.is_empty() && !names.contains(&name) {
                names.push(name);
            }
        }
        Ok(Access {
            inner: Arc::new(Inner {
                token: RwLock::new(token),
                data_dir: data_dir.to_path_buf(),
                names,
                tls,
                rotations: tokio::sync::watch::Sender::new(0),
                unchecked: None,
            }),
        })
    }

    /// Hands the benchmark's switch over (see
    /// [`crate::node::NodeConfig::without_access_checks`]); call before serving.
    pub fn without_checks(mut self, switch: Option<Arc<std::sync::atomic::AtomicBool>>) -> Access {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.unchecked = switch;
        }
        self
    }

    /// Whether the benchmark's switch is on now: every request is the owner's, at the node's host.
    pub(crate) fn unchecked(&self) -> bool {
        self.inner
            .unchecked
            .as_ref()
            .is_some_and(|switch| switch.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The current token.
    pub fn token(&self) -> Token {
        self.inner.token.read().expect("token lock").clone()
    }

    /// Replaces the token with a new random one, on disk first; returns it.
    pub fn rotate(&self) -> std::io::Result<Token> {
        let mut token = self.inner.token.write().expect("token lock");
        let fresh = Token::generate();
        fresh.store(&self.inner.data_dir)?;
        *token = fresh.clone();
        self.inner.rotations.send_modify(|n| *n += 1);
        Ok(fresh)
    }

    /// Changes each time the token is rotated: a long-lived connection admitted as the owner
    /// (the live binding's WebSocket) ends when it does.
    pub fn watch_rotations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.rotations.subscribe()
    }

    /// The names the node answers to (`localhost` first).
    pub fn names(&self) -> &[String] {
        &self.inner.names
    }

    /// Whether the API is served over TLS.
    pub fn tls(&self) -> bool {
        self.inner.tls
    }

    /// The origin of app `stream` for a request admitted as `admitted`, if the node has a name
    /// to put under the app's label: `http://<label>.<name>[:port]`.
    pub fn app_origin(&self, stream: &StreamId, admitted: &Admitted) -> Option<String> {
        let name = match &admitted.target {
            Target::Node { name: Some(name) } => name.clone(),
            Target::App { name, .. } => name.clone(),
            // An IP literal: `localhost` serves loopback; another address needs a name.
            Target::Node { name: None } => LOCAL_NAME.to_string(),
        };
        let scheme = if self.inner.tls { "https" } else { "http" };
        let port = admitted.port.map(|p| format!(":{p}")).unwrap_or_default();
        Some(format!("{scheme}://{}.{name}{port}", app_label(stream)))
    }

    /// Decides who sends a request, or refuses it. `grpc`: the request is gRPC (by content type);
    /// `local`: it came over a loopback connection. An app's page counts as the app only over
    /// loopback: elsewhere anyone can claim an app's Origin, so such a page is a plain visitor.
    pub fn admit(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        grpc: bool,
        local: bool,
    ) -> Result<Admitted, Refusal> {
        let (host, port) = request_host(uri, headers);
        let target = self.target(host.as_deref())?;
        let origin = text(headers, header::ORIGIN);
        let site = text(headers, "sec-fetch-site");
        // Sent by a page (not typed by the user): it must come from the origin it targets.
        let from_page = origin.is_some() || site.is_some_and(|site| site != "none");
        let browser = from_page || headers.contains_key("sec-fetch-mode");
        let admitted = |caller| Admitted {
            caller,
            target: target.clone(),
            browser,
            port,
        };
        if from_page {
            if grpc {
                return Err(Refusal::Forbidden(
                    "gRPC is not answered to web pages (this request carries Origin or Sec-Fetch-Site)"
                        .into(),
                ));
            }
            let same_origin = match origin {
                Some(origin) => same_origin(origin, host.as_deref(), port, self.inner.tls),
                None => site == Some("same-origin"),
            };
            return match (&target, same_origin) {
                (Target::App { stream, .. }, true) if local => Ok(admitted(Caller::App(*stream))),
                (Target::App { .. }, true) => Ok(admitted(Caller::Anyone)),
                _ if is_navigation(method, headers) => Ok(admitted(Caller::Anyone)),
                _ => Err(Refusal::Forbidden(format!(
                    "a page at {} may not call {}: an app's page may only call its own origin",
                    origin.unwrap_or("another site"),
                    host.as_deref().unwrap_or("this node"),
                ))),
            };
        }
        match bearer(headers) {
            None => Ok(admitted(Caller::Anyone)),
            // Compared under the read lock: no copy of the token per request.
            Some(presented) if self.inner.token.read().expect("token lock").matches(presented) => {
                Ok(admitted(Caller::Owner))
            }
            Some(_) => Err(Refusal::Unauthenticated(format!(
                "wrong token: the node owner's token is in the node's data directory, file {TOKEN_FILE} (it changes with `quire token rotate`)"
            ))),
        }
    }

    fn target(&self, host: Option<&str>) -> Result<Target, Refusal> {
        let Some(host) = host else {
            return Ok(Target::Node { name: None });
        };
        if host.contains(['@', '/', '\\', ' ']) {
            return Err(Refusal::Forbidden(format!("{host:?} is not a host name")));
        }
        if host.parse::<IpAddr>().is_ok() {
            return Ok(Target::Node { name: None });
        }
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        if self.inner.names.contains(&name) {
            return Ok(Target::Node { name: Some(name) });
        }
        if let Some((label, base)) = name.split_once('.') {
            if self.inner.names.iter().any(|known| known == base) {
                if let Some(stream) = parse_app_label(label) {
                    return Ok(Target::App {
                        stream,
                        name: base.to_string(),
                    });
                }
            }
        }
        Err(Refusal::Forbidden(format!(
            "this node does not answer to the host name {host:?}: it answers to IP addresses, {} and apps' <label>.{} hosts (add a name with `quire serve --api-host NAME`)",
            self.inner.names.join(", "),
            LOCAL_NAME,
        )))
    }
}

/// A GET or HEAD that loads a page (a followed link, a typed address): it can change nothing
/// and its answer is shown to the user, not to the page that linked it.
fn is_navigation(method: &Method, headers: &HeaderMap) -> bool {
    (method == Method::GET || method == Method::HEAD)
        && text(headers, "sec-fetch-mode").is_some_and(|mode| mode == "navigate")
}

fn text<K: header::AsHeaderName>(headers: &HeaderMap, name: K) -> Option<&str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// The token of an `authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = text(headers, header::AUTHORIZATION)?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The host (lower case, without brackets) and port a request was sent to: the URI's
/// authority (HTTP/2) or the Host header (HTTP/1.1).
fn request_host(uri: &Uri, headers: &HeaderMap) -> (Option<String>, Option<u16>) {
    let authority = uri
        .authority()
        .map(|authority| authority.as_str().to_string())
        .or_else(|| text(headers, header::HOST).map(str::to_string));
    match authority {
        Some(authority) => split_host(&authority),
        None => (None, None),
    }
}

fn split_host(authority: &str) -> (Option<String>, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').unwrap_or((rest, ""));
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        return (Some(host.to_ascii_lowercase()), port);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => (Some(host.to_ascii_lowercase()), port.parse().ok()),
        None => (Some(authority.to_ascii_lowercase()), None),
    }
}

/// Whether `origin` (`scheme://host[:port]`) is the origin the request was sent to.
fn same_origin(origin: &str, host: Option<&str>, port: Option<u16>, tls: bool) -> bool {
    let (scheme, default_port) = if tls { ("https", 443) } else { ("http", 80) };
    let Some(rest) = origin
        .strip_prefix(scheme)
        .and_then(|r| r.strip_prefix("://"))
    else {
        return false;
    };
    let (origin_host, origin_port) = split_host(rest);
    let Some(host) = host else { return false };
    origin_host.as_deref() == Some(host)
        && origin_port.unwrap_or(default_port) == port.unwrap_or(default_port)
}

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// The DNS label of an app: its stream id in lower-case base32 without padding (52 characters;
/// a label may have 63).
pub fn app_label(stream: &StreamId) -> String {
    let mut out = String::with_capacity(52);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for byte in stream.as_bytes() {
        buffer = (buffer << 8) | u32::from(*byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(BASE32[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(BASE32[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The stream of an app label made by [`app_label`] (case-insensitive); None for anything else.
pub fn parse_app_label(label: &str) -> Option<StreamId> {
    if label.len() != 52 {
        return None;
    }
    let mut bytes = Vec::with_capacity(33);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for c in label.bytes() {
        let value = BASE32.iter().position(|b| *b == c.to_ascii_lowercase())? as u32;
        buffer = (buffer << 5) | value;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            bytes.push((buffer >> bits) as u8);
        }
    }
    // 52 × 5 = 260 bits: the 4 left over must be zero, so each id has exactly one label.
    if buffer & ((1 << bits) - 1) != 0 {
        return None;
    }
    StreamId::from_slice(&bytes).ok()
}

/// Adds `authorization: Bearer <token>` to every call of a gRPC client (none without a token):
/// `pb::log_client::LogClient::with_interceptor(channel, Bearer::new(Some(token))?)`.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl Bearer {
    /// An interceptor sending `token`, or nothing. Fails if the token is not a valid header value.
    pub fn new(
        token: Option<&str>,
    ) -> Result<Bearer, tonic::metadata::errors::InvalidMetadataValue> {
        Ok(Bearer(match token {
            Some(token) => Some(format!("Bearer {}", token.trim()).parse()?),
            None => None,
        }))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A gRPC channel that sends the owner's token (if it has one) with every call.
pub type AuthChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn access() -> (tempfile::TempDir, Access) {
        let dir = tempfile::tempdir().unwrap();
        let access = Access::open(dir.path(), &["Node.Example.".into()], false).unwrap();
        (dir, access)
    }

    fn request(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        headers
    }

    fn admit(access: &Access, method: Method, pairs: &[(&str, &str)]) -> Result<Caller, Refusal> {
        access
            .admit(
                &method,
                &Uri::from_static("/x"),
                &request(pairs),
                false,
                true,
            )
            .map(|admitted| admitted.caller)
    }

    proptest! {
        #[test]
        fn app_labels_round_trip_and_are_dns_labels(bytes in any::<[u8; 32]>()) {
            let stream = quire_projection_api::ScribeId(bytes);
            let label = app_label(&stream);
            prop_assert_eq!(label.len(), 52);
            prop_assert!(label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
            prop_assert_eq!(parse_app_label(&label), Some(stream));
            prop_assert_eq!(parse_app_label(&label.to_ascii_uppercase()), Some(stream));
        }

        #[test]
        fn no_other_label_names_an_app(label in "[a-z2-7]{0,60}") {
            if let Some(stream) = parse_app_label(&label) {
                prop_assert_eq!(app_label(&stream), label);
            }
        }
    }

    #[test]
    fn the_token_file_is_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = Token::load_or_create(dir.path()).unwrap();
        assert_eq!(first.as_str().len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.path().join(TOKEN_FILE);
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert_eq!(Token::load_or_create(dir.path()).unwrap(), first);
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert_eq!(Token::load_or_create(dir.path()).unwrap(), first);
        // A file that holds no token stops the start, saying which file.
        std::fs::write(dir.path().join(TOKEN_FILE), "short\n").unwrap();
        let error = Token::load_or_create(dir.path()).unwrap_err();
        assert!(error.to_string().contains(TOKEN_FILE), "{error}");
    }

    #[test]
    fn only_the_right_token_makes_the_owner() {
        let (_dir, access) = access();
        let token = access.token();
        let bearer = format!("Bearer {}", token.as_str());
        assert_eq!(admit(&access, Method::POST, &[]), Ok(Caller::Anyone));
        assert_eq!(
            admit(&access, Method::POST, &[("authorization", &bearer)]),
            Ok(Caller::Owner)
        );
        assert!(matches!(
            admit(&access, Method::POST, &[("authorization", "Bearer nope")]),
            Err(Refusal::Unauthenticated(_))
        ));
        let rotated = access.rotate().unwrap();
        assert_ne!(rotated, token);
        assert!(matches!(
            admit(&access, Method::POST, &[("authorization", &bearer)]),
            Err(Refusal::Unauthenticated(_))
        ));
        assert_eq!(
            Token::load_or_create(&access.inner.data_dir).unwrap(),
            rotated
        );
    }

    #[test]
    fn hosts_other_than_the_nodes_names_are_refused() {
        let (_dir, access) = access();
        let app = quire_projection_api::ScribeId([7; 32]);
        let label = app_label(&app);
        for host in [
            "127.0.0.1:8000",
            "[::1]:8000",
            "localhost:8000",
            "LOCALHOST",
            "node.example:1",
        ] {
            assert_eq!(
                admit(&access, Method::GET, &[("host", host)]),
                Ok(Caller::Anyone),
                "{host}"
            );
        }
        let admitted = access
            .admit(
                &Method::GET,
                &Uri::from_static("/"),
                &request(&[("host", &format!("{label}.localhost:8000"))]),
                false,
                true,
            )
            .unwrap();
        assert_eq!(
            admitted.target,
            Target::App {
                stream: app,
                name: "localhost".into()
            }
        );
        for host in [
            "evil.example:8000",
            "localhost.evil.example",
            &format!("{label}.evil.example"),
            "nope.localhost",
            "evil.example@localhost",
            &format!("x{label}.localhost"),
        ] {
            assert!(
                matches!(
                    admit(&access, Method::GET, &[("host", host)]),
                    Err(Refusal::Forbidden(_))
                ),
                "{host}"
            );
        }
    }

    #[test]
    fn a_browser_may_only_call_the_app_it_is_on() {
        let (_dir, access) = access();
        let (mine, theirs) = (
            quire_projection_api::ScribeId([1; 32]),
            quire_projection_api::ScribeId([2; 32]),
        );
        let my_host = format!("{}.localhost:8000", app_label(&mine));
        let my_origin = format!("http://{my_host}");
        let their_host = format!("{}.localhost:8000", app_label(&theirs));
        let token = format!("Bearer {}", access.token().as_str());
        // Its own origin: the app.
        assert_eq!(
            admit(
                &access,
                Method::POST,
                &[("host", &my_host), ("origin", &my_origin)]
            ),
            Ok(Caller::App(mine))
        );
        assert_eq!(
            admit(
                &access,
                Method::GET,
                &[("host", &my_host), ("sec-fetch-site", "same-origin")]
            ),
            Ok(Caller::App(mine))
        );
        // Another app, the node, a foreign site: refused, even with the token.
        for (host, origin) in [
            (their_host.as_str(), my_origin.as_str()),
            ("127.0.0.1:8000", my_origin.as_str()),
            ("localhost:8000", "http://localhost:8000"),
            (my_host.as_str(), "https://evil.example"),
            (my_host.as_str(), "null"),
            (my_host.as_str(), &format!("https://{my_host}")),
            (
                my_host.as_str(),
                &format!("http://{}", my_host.replace("8000", "8001")),
            ),
        ] {
            assert!(
                matches!(
                    admit(
                        &access,
                        Method::POST,
                        &[
                            ("host", host),
                            ("origin", origin),
                            ("authorization", &token)
                        ]
                    ),
                    Err(Refusal::Forbidden(_))
                ),
                "{host} from {origin}"
            );
        }
        assert!(matches!(
            admit(
                &access,
                Method::GET,
                &[
                    ("host", &my_host),
                    ("sec-fetch-site", "cross-site"),
                    ("sec-fetch-mode", "no-cors")
                ]
            ),
            Err(Refusal::Forbidden(_))
        ));
        // A link followed from anywhere is a plain visitor.
        assert_eq!(
            admit(
                &access,
                Method::GET,
                &[
                    ("host", &my_host),
                    ("sec-fetch-site", "cross-site"),
                    ("sec-fetch-mode", "navigate")
                ]
            ),
            Ok(Caller::Anyone)
        );
        assert!(matches!(
            admit(
                &access,
                Method::POST,
                &[
                    ("host", &my_host),
                    ("sec-fetch-site", "cross-site"),
                    ("sec-fetch-mode", "navigate")
                ]
            ),
            Err(Refusal::Forbidden(_))
        ));
        // gRPC from any page: refused.
        assert!(matches!(
            access.admit(
                &Method::POST,
                &Uri::from_static("/quire.v1.Log/Read"),
                &request(&[("host", &my_host), ("origin", &my_origin)]),
                true,
                true,
            ),
            Err(Refusal::Forbidden(_))
        ));
        // Over a connection from elsewhere, a page claiming the app's origin is a visitor.
        let remote = access
            .admit(
                &Method::POST,
                &Uri::from_static("/add_record"),
                &request(&[("host", &my_host), ("origin", &my_origin)]),
                false,
                false,
            )
            .unwrap();
        assert_eq!(remote.caller, Caller::Anyone);
    }

    #[test]
    fn unknown_grpc_methods_are_owner_only() {
        assert_eq!(grpc_rule("/quire.v1.Log/Read"), Rule::Public);
        assert_eq!(grpc_rule("/quire.v1.Log/Append"), Rule::Owner);
        assert_eq!(grpc_rule("/quire.v1.Log/Nope"), Rule::Owner);
        assert_eq!(grpc_rule("/grpc.health.v1.Health/Check"), Rule::Public);
    }
}
