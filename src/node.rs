//! A whole node: opens the log of a data directory and serves the client API until told to stop.
//!
//! Shutdown is an argument ([`serve`] takes a future), so tests start and stop whole nodes
//! in-process on `127.0.0.1:0` ([`RunningNode`]); `quire serve` passes Ctrl-C / SIGTERM.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;

use crate::hlc::WallClock;
use crate::log::{Log, LogOptions, OpenError};
use crate::server::{Api, NodeFacts};

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
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("data_dir", &self.data_dir)
            .field("sync", &self.sync)
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
}

/// Opens the node's log.
pub fn open_log(config: &NodeConfig) -> Result<Log, OpenError> {
    let mut options = LogOptions {
        sync: config.sync,
        ..LogOptions::default()
    };
    if let Some(wall) = &config.wall {
        options.wall = wall.clone();
    }
    Log::open(&config.data_dir, options)
}

/// Serves the client API of `log` on `listener` until `shutdown` completes, then closes the log.
pub async fn serve(
    config: &NodeConfig,
    log: Log,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let addr = listener.local_addr()?;
    let addr_file = config.data_dir.join(API_ADDR_FILE);
    std::fs::write(&addr_file, format!("http://{addr}\n"))?;
    let facts = NodeFacts {
        data_dir: config.data_dir.display().to_string(),
        listeners: vec![("api".to_string(), format!("http://{addr}"))],
        sync_writes: config.sync,
    };
    tracing::info!(node = %log.node_key(), %addr, data_dir = %config.data_dir.display(), "client API listening");
    let closer = log.clone();
    let shutdown = async move {
        shutdown.await;
        // End subscriptions first: the server waits for open response streams before it returns.
        closer.signal_closing();
    };
    let result = Api::new(log.clone(), facts)
        .router()
        .await
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(&addr_file);
    log.close().await;
    result.map_err(NodeError::from)
}

/// A node running in this process (for tests and embedding).
#[derive(Debug)]
pub struct RunningNode {
    /// The client API address.
    pub api_addr: SocketAddr,
    /// The node's log.
    pub log: Log,
    /// Its data directory.
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), NodeError>>,
}

impl RunningNode {
    /// Starts a node on `config` with its client API on `api` (use `127.0.0.1:0` in tests).
    pub async fn start(config: NodeConfig, api: SocketAddr) -> Result<RunningNode, NodeError> {
        let log = open_log(&config)?;
        let listener = TcpListener::bind(api).await?;
        let api_addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let data_dir = config.data_dir.clone();
        let task = tokio::spawn({
            let log = log.clone();
            async move {
                serve(&config, log, listener, async move {
                    let _ = stopped.await;
                })
                .await
            }
        });
        Ok(RunningNode {
            api_addr,
            log,
            data_dir,
            stop: Some(stop),
            task,
        })
    }

    /// `http://` URL of the client API.
    pub fn url(&self) -> String {
        format!("http://{}", self.api_addr)
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
