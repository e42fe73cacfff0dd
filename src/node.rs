//! A whole node: opens the log of a data directory and serves the client API until told to stop.
//!
//! Shutdown is an argument ([`serve`] takes a future), so tests start and stop whole nodes
//! in-process on `127.0.0.1:0` ([`RunningNode`]); `quire serve` passes Ctrl-C / SIGTERM.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use quire_projection_api::BuiltinKinds;
use quire_projection_sql::SchemaCheck;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::api::access::{Access, Token};
use crate::api::{Api, NodeFacts};
use crate::fds::FdBudget;
use crate::hlc::WallClock;
use crate::log::{Log, LogOptions, OpenError, PayloadChecks};
use crate::net::{ConnectionLimits, PeerTls};
use crate::projection::{Projections, Registry, RunnerError};
use crate::replication::{PeerOptions, ReplicationError, Replicator};

/// Name of the file in the data directory that holds the client API address while a node runs.
pub const API_ADDR_FILE: &str = "api.addr";

/// How to run a node.
#[derive(Clone)]
pub struct NodeConfig {
    /// Its data directory.
    pub data_dir: PathBuf,
    /// fsync each group commit.
    pub sync: bool,
    /// The wall clock (tests inject one).
    pub wall: Option<WallClock>,
    /// Peers to dial (host:port), remembered in the data directory like `quire peer add`.
    pub peers: Vec<String>,
    /// The projectors to run.
    pub registry: Registry,
    /// Time and row limits of SQL queries.
    pub sql_limits: quire_projection_sql::Limits,
    /// Caps of the client API's listener: connections in all and per address, HTTP/2 streams
    /// per connection (`--max-api-connections`, `--max-api-connections-per-address`).
    pub api_limits: ConnectionLimits,
    /// Caps of the peer listener (`--max-peer-connections`, `--max-peer-connections-per-address`).
    pub peer_limits: ConnectionLimits,
    /// How the node spends its file descriptors: open projection copies and idle readers (by
    /// default the shares of the process's open-files limit; RocksDB's share always is).
    pub fds: FdBudget,
    /// Host names the client API answers to besides IP addresses and `localhost`
    /// (`--api-host`); apps are served at `<label>.<name>` too.
    pub api_hosts: Vec<String>,
    /// Serve the client API over TLS: (certificate chain, private key), PEM files.
    pub api_tls: Option<(PathBuf, PathBuf)>,
    /// The rules the node judges scribes by: their version and payload checks. `None` (always,
    /// but in tests): this build's, [`crate::log::rules::RULES_VERSION`] and [`payload_checks`].
    /// Tests set it to play a cluster of mixed versions.
    pub rules: Option<(u32, PayloadChecks)>,
    /// For the trust boundary's benchmark only (`benches/sql.rs`, `benches/kv.rs` measure with and
    /// without it in one run): while the flag is true, every client API request is admitted as
    /// the owner at the node's host — no Host, Origin or token check, no app-host split, no
    /// security headers. `quire serve` never sets it.
    #[doc(hidden)]
    pub without_access_checks: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Which peers may replicate with the node (`--peers`) and the peer transport (TLS).
    pub peer_options: PeerOptions,
    /// Which new streams the node takes (`--accept-streams`; default any).
    pub accept_streams: crate::log::AcceptStreams,
    /// How often the node applies the retention rules of the streams it owns (`--prune-every`;
    /// default a minute; `None`: only on `quire prune`).
    pub prune_every: Option<std::time::Duration>,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("data_dir", &self.data_dir)
            .field("sync", &self.sync)
            .field("peers", &self.peers)
            .field("registry", &self.registry)
            .field("sql_limits", &self.sql_limits)
            .field("api_hosts", &self.api_hosts)
            .field("api_limits", &self.api_limits)
            .field("peer_limits", &self.peer_limits)
            .field("fds", &self.fds)
            .field("api_tls", &self.api_tls)
            .field("peer_options", &self.peer_options)
            .field("prune_every", &self.prune_every)
            .finish()
    }
}

impl NodeConfig {
    /// A node on `data_dir` with default options.
    pub fn new(data_dir: impl Into<PathBuf>) -> NodeConfig {
        NodeConfig {
            data_dir: data_dir.into(),
            sync: false,
            wall: None,
            peers: Vec::new(),
            registry: Registry::builtin(),
            sql_limits: quire_projection_sql::Limits::default(),
            api_hosts: Vec::new(),
            api_limits: ConnectionLimits::API,
            peer_limits: ConnectionLimits::PEER,
            fds: FdBudget::from_limit(),
            api_tls: None,
            rules: None,
            without_access_checks: None,
            peer_options: PeerOptions::new()
                .expect("a throwaway TLS certificate for the peer transport"),
            accept_streams: crate::log::AcceptStreams::Any,
            prune_every: Some(std::time::Duration::from_secs(60)),
        }
    }
}

/// Errors running a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// Opening the data directory failed.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// A listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// The gRPC server failed.
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The TLS certificate or key of the client API could not be used.
    #[error("--api-tls-cert/--api-tls-key: {0}")]
    Tls(String),
    /// Peers could not be set up.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// Projections could not be opened.
    #[error("projections: {0}")]
    Projections(#[from] RunnerError),
    /// A leave a stop interrupted could not be finished.
    #[error("finishing the leave of a stream: {0}")]
    Leave(String),
}

/// Opens the node's log, handing it the payload rules of the node (see [`payload_checks`]).
pub fn open_log(config: &NodeConfig) -> Result<Log, OpenError> {
    let mut options = LogOptions {
        sync: config.sync,
        payload_checks: payload_checks(),
        accept_streams: config.accept_streams,
        ..LogOptions::default()
    };
    if let Some((version, checks)) = &config.rules {
        options.rules_version = *version;
        options.payload_checks = checks.clone();
    }
    if let Some(wall) = &config.wall {
        options.wall = wall.clone();
    }
    Log::open(&config.data_dir, options)
}

/// The payload rules a node's log applies, handed to it here: the built-in kinds' own
/// ([`BuiltinKinds`]: a file payload decodes and its path is valid, an upvote has one parent),
/// then the SQLite projector's ([`SchemaCheck`]: a `_schema` of at most 64 KiB it can apply) and
/// the kv projector's (`KvCheck`: a `kv.*` payload decodes, with a valid key).
///
/// The set is fixed for every node of this version, whatever projectors a binary registers: a
/// rule that one node applies and another does not would let the two disagree about a scribe
/// (invariant 2), and a node would refuse, and in the end ban, a peer for scribes that peer
/// rightly stored. A projector that cannot use a scribe parks it in its quarantine instead.
pub fn payload_checks() -> PayloadChecks {
    PayloadChecks::new()
        .with(BuiltinKinds)
        .with(SchemaCheck)
        .with(quire_projection_kv::KvCheck)
}

/// How long servers may take to finish open streams once shutdown begins.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the client API of `log` on `api` and replication on `peer` (if given) until
/// `shutdown` completes, then closes the log. The peer listener serves the replication service
/// and nothing else (invariant 9).
pub async fn serve(
    config: &NodeConfig,
    log: Log,
    api: TcpListener,
    peer: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let api_addr = api.local_addr()?;
    let peer_addr = match &peer {
        Some(listener) => Some(listener.local_addr()?),
        None => None,
    };
    let tls = match &config.api_tls {
        Some((cert, key)) => Some(crate::net::tls_acceptor(cert, key).map_err(NodeError::Tls)?),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let access = Access::open(&config.data_dir, &config.api_hosts, tls.is_some())?
        .without_checks(config.without_access_checks.clone());
    let addr_file = config.data_dir.join(API_ADDR_FILE);
    std::fs::write(&addr_file, format!("{scheme}://{api_addr}\n"))?;
    let mut listeners = vec![("api".to_string(), format!("{scheme}://{api_addr}"))];
    if let Some(peer_addr) = peer_addr {
        listeners.push(("peer".to_string(), peer_addr.to_string()));
    }
    let facts = NodeFacts {
        data_dir: config.data_dir.display().to_string(),
        listeners,
        sync_writes: config.sync,
    };
    // Projections first: a copy ahead of the log (after a lost tail) is found while the head is
    // still the one the log came back with, before replication moves it.
    let projections = Projections::start(
        log.clone(),
        config.registry.clone(),
        &config.data_dir,
        config.fds,
    )?;
    // A leave a stop interrupted: its scribes went at open and its copies as the projections
    // started; whole-log projections forget it, then it may be joined again.
    for stream in log.interrupted_leaves() {
        projections.rebuild_log_scope()?;
        log.end_leave(stream)
            .await
            .map_err(|error| NodeError::Leave(error.to_string()))?;
        tracing::info!(%stream, "finished leaving a stream (a stop had interrupted it)");
    }
    let replicator = Replicator::new(log.clone(), config.peer_options.clone())?;
    replicator.start(&config.peers)?;
    tokio::spawn(crate::log::held::release_loop(log.clone()));
    tokio::spawn(crate::log::redact::purge_loop(log.clone()));
    if let Some(every) = config.prune_every {
        tokio::spawn(crate::log::retention::prune_loop(log.clone(), every));
    }
    tracing::info!(node = %log.node_key(), api = %api_addr, peer = ?peer_addr, data_dir = %config.data_dir.display(), "node serving");

    let (stop_tx, stop_rx) = watch::channel(false);
    {
        let log = log.clone();
        let replicator = replicator.clone();
        tokio::spawn(async move {
            shutdown.await;
            // End connections and subscriptions first: servers wait for open streams.
            replicator.shutdown();
            log.signal_closing();
            let _ = stop_tx.send(true);
        });
    }
    let stopped = |mut stop: watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };
    let (api_limits, peer_limits) = (
        config.api_limits.within(config.fds.api_connections),
        config.peer_limits.within(config.fds.peer_connections),
    );
    let sql = crate::api::sql::SqlService::new(log.clone(), projections.clone(), config.sql_limits);
    let routes = Api::new(
        log.clone(),
        replicator.clone(),
        projections.clone(),
        facts,
        access,
    )
    .routes(
        sql,
        crate::api::files::FilesService::new(log.clone(), projections.clone()),
    )
    .await;
    // HTTP/1.1 (browsers, curl, the live binding's WebSocket) and HTTP/2 (gRPC) on one port.
    let api_server = async {
        crate::net::serve(
            api,
            tls,
            routes.into_axum_router(),
            api_limits,
            stopped(stop_rx.clone()),
        )
        .await;
        Ok::<(), tonic::transport::Error>(())
    };
    let peer_server = async {
        match peer {
            Some(listener) => {
                // HTTP/2 only, pinged so a dead peer is noticed while a stream is idle, within
                // the peer listener's caps.
                crate::net::serve(
                    listener,
                    config.peer_options.tls.as_ref().map(PeerTls::acceptor),
                    tonic::service::Routes::new(replicator.service()).into_axum_router(),
                    peer_limits,
                    stopped(stop_rx.clone()),
                )
                .await;
                Ok(())
            }
            None => {
                stopped(stop_rx.clone()).await;
                Ok(())
            }
        }
    };
    let servers = async { tokio::join!(api_server, peer_server) };
    let grace = async {
        stopped(stop_rx.clone()).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let result = tokio::select! {
        (api_result, peer_result) = servers => api_result.and(peer_result).map_err(NodeError::from),
        () = grace => {
            tracing::warn!("clients kept streams open {SHUTDOWN_GRACE:?} after shutdown began; closing anyway");
            Ok(())
        }
    };
    let _ = std::fs::remove_file(&addr_file);
    drop(replicator);
    drop(projections);
    log.close().await;
    result
}

/// A node running in this process (for tests and embedding).
#[derive(Debug)]
pub struct RunningNode {
    /// The client API address.
    pub api_addr: SocketAddr,
    /// The peer listener address, if it has one.
    pub peer_addr: Option<SocketAddr>,
    /// The node's log.
    pub log: Log,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// The owner's token (as in `api.token` when the node started).
    pub token: Token,
    scheme: &'static str,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), NodeError>>,
}

impl RunningNode {
    /// Starts a node on `config` with its client API on `api` and, if given, a peer listener on
    /// `peer` (use `127.0.0.1:0` for both in tests).
    pub async fn start(
        config: NodeConfig,
        api: SocketAddr,
        peer: Option<SocketAddr>,
    ) -> Result<RunningNode, NodeError> {
        let log = open_log(&config)?;
        let token = Token::load_or_create(&config.data_dir)?;
        let api_listener = TcpListener::bind(api).await?;
        let api_addr = api_listener.local_addr()?;
        let peer_listener = match peer {
            Some(peer) => Some(TcpListener::bind(peer).await?),
            None => None,
        };
        let peer_addr = match &peer_listener {
            Some(listener) => Some(listener.local_addr()?),
            None => None,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let data_dir = config.data_dir.clone();
        let scheme = if config.api_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let task = tokio::spawn({
            let log = log.clone();
            async move {
                serve(&config, log, api_listener, peer_listener, async move {
                    let _ = stopped.await;
                })
                .await
            }
        });
        Ok(RunningNode {
            api_addr,
            peer_addr,
            log,
            data_dir,
            token,
            scheme,
            stop: Some(stop),
            task,
        })
    }

    /// `http://` URL of the client API (`https://` with TLS).
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.api_addr)
    }

    /// Stops the node and waits until its data directory is closed.
    pub async fn stop(mut self) -> Result<(), NodeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let RunningNode { log, task, .. } = self;
        drop(log);
        task.await.expect("node task panicked")
    }
}

/// The default data directory: `$XDG_DATA_HOME/quire`, else `~/.local/share/quire`, else `./quire-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|dir| !dir.is_empty()) {
        return Path::new(&dir).join("quire");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|home| !home.is_empty()) {
        return Path::new(&home).join(".local/share/quire");
    }
    PathBuf::from("quire-data")
}
