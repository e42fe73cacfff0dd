//! The `quire` command line (clap derive). `serve`, `verify`, `replay` and `rebuild --offline` work
//! on a data directory; every other command is a gRPC client of a running node (`--node`, default
//! the local API address).
//! `anyhow` is used here, at the binary's edge, and nowhere else.
//!
//! This file holds the argument tree and the dispatch only; each command lives in the file of
//! its group: [`serve`] (serve, verify), [`stream`] (stream, append, get, log), [`admin`]
//! (status, join, peer), [`projections`], [`kv`], [`sql`], [`files`]; [`client`] is the
//! connection to a running node.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use quire_projection_api::{AuthorKey, ScribeId};

use crate::net::ConnectionLimits;
use crate::projection::Registry;

mod admin;
mod client;
mod files;
mod kv;
mod projections;
mod serve;
mod sql;
mod stream;

pub(crate) use client::{channel, status_error, Node};
use projections::{DigestArgs, QuarantineCommand, RebuildArgs, ReplayArgs};

/// Default client API address.
pub const DEFAULT_API: &str = "127.0.0.1:8000";
/// Default peer listener address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7000";

/// quire: a replicated, content-addressed event log with pluggable projections.
///
/// Run a node with `quire serve`; every other command (but `verify`, `replay` and
/// `rebuild --offline`, which open a data directory) talks to a running node's client API: by
/// default the node serving the data directory (-d), else --node.
///
/// Commands that act as the node (create streams, append, write files or kv, peers, joins,
/// rebuilds) need the node owner's token. On the node's machine the CLI reads it from the data
/// directory (file api.token, readable by the node's user only); for another node pass --token.
#[derive(Debug, Parser)]
#[command(name = "quire", version, propagate_version = true)]
pub struct Cli {
    /// Client API of the node to talk to. Default: the node serving the data directory (its
    /// api.addr), else http://127.0.0.1:8000.
    #[arg(long, global = true, env = "QUIRE_NODE")]
    pub node: Option<String>,
    /// The node owner's token (default: read from the data directory's api.token, and sent only
    /// to the node serving that directory). Other users see a command line in `ps`: prefer
    /// QUIRE_TOKEN or --token-file.
    #[arg(long, global = true, env = "QUIRE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the node owner's token from this file (e.g. a copy of another node's api.token).
    #[arg(
        long,
        global = true,
        env = "QUIRE_TOKEN_FILE",
        value_name = "FILE",
        conflicts_with = "token"
    )]
    pub token_file: Option<PathBuf>,
    /// Send the owner's token over plain http:// to a --node that is not on this machine (it
    /// crosses the network in clear text; refused without this flag).
    #[arg(long, global = true)]
    pub insecure: bool,
    /// A CA certificate (PEM) to trust, besides the system's, for an https:// --node (for
    /// example a node's self-signed --api-tls-cert).
    #[arg(long, global = true, env = "QUIRE_CA_CERT", value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,
    /// Data directory. Default: $XDG_DATA_HOME/quire or ~/.local/share/quire.
    #[arg(short = 'd', long = "data-dir", global = true, env = "QUIRE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node: open (or create) a data directory and serve the client API until Ctrl-C.
    Serve(ServeArgs),
    /// Create, list, show and leave streams.
    #[command(subcommand)]
    Stream(StreamCommand),
    /// Append a scribe to a stream, signed by the node; prints its id and local seq.
    Append(AppendArgs),
    /// Show one stored scribe by id.
    Get(GetArgs),
    /// Delete the payload of one scribe on every node that holds its stream: appends a `redact`
    /// scribe signed by this node (which must be the scribe's author or the stream's owner). The
    /// envelope stays; projections drop the scribe (each is rebuilt from the log); a peer that
    /// offers the payload again is refused. Returns once the bytes have left this node's disk.
    Redact(RedactArgs),
    /// Replace a stream's retention rule (which payloads the owner's node prunes): appends a
    /// `retain` scribe signed by this node, which must be the stream's owner. With no option:
    /// keep everything.
    Retain(RetainArgs),
    /// Apply retention rules now: for each stream (or the one given), print payloads live,
    /// reclaimable, pruned and redacted; where this node holds the stream owner's key, sign a
    /// `prune` scribe for each payload its rule lets go and return once their bytes have left
    /// the disk (every node holding the stream deletes them when the prune scribes reach it).
    /// Nodes also prune in the background (`quire serve --prune-every`).
    Prune(PruneArgs),
    /// Print a stream's scribes (or the whole log's, with `all`), then "caught up at seq N".
    Log(LogArgs),
    /// Show the node's id, data directory, streams, heads, listeners, projections (checkpoint,
    /// lag) and peers (cursor, lag, sent, received, refused, last error).
    Status,
    /// Start replicating a stream this node does not hold, from connected peers.
    Join(JoinArgs),
    /// Manage peers.
    #[command(subcommand)]
    Peer(PeerCommand),
    /// A stream's membership: grant and revoke roles (reader, writer, admin), list the members.
    #[command(subcommand)]
    Acl(AclCommand),
    /// The node owner's token.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Re-hash and re-verify every scribe stored in a data directory; exit status 1 on damage.
    Verify(VerifyArgs),
    /// Show each projection (projector per scope, and durable consumer): checkpoint, lag,
    /// quarantined scribes, rebuild progress and state digest.
    Projections,
    /// Rebuild a projection blue/green: a fresh copy is built beside the live one, which keeps
    /// answering, and swapped in when it reaches the head. For a durable consumer: start it over
    /// from seq 1.
    Rebuild(RebuildArgs),
    /// Replay a range of local seqs into scratch copies of projectors, to inspect them (the node's
    /// own projections are not touched; works while the node runs).
    Replay(ReplayArgs),
    /// Print the SHA-256 digest of a projection's live state: equal scribe sets give equal
    /// digests on every node.
    Digest(DigestArgs),
    /// Scribes a projector could not apply: list them, retry one after a fix, or skip it.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// The key/value table of a stream: get, set, delete, scan and watch keys.
    #[command(subcommand)]
    Kv(kv::KvCommand),
    /// The SQLite tables of a stream: run read-only queries, add records, publish the schema.
    #[command(subcommand)]
    Sql(sql::SqlCommand),
    /// The file tree of a stream: publish a directory, list, get and delete files.
    #[command(subcommand)]
    Files(files::FilesCommand),
}

/// `quire serve` (the data directory, -d, is created if missing; at first start the node writes
/// the owner's token to api.token in it, mode 0600).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address of the client API: gRPC and the HTTP API share it, told apart by content type.
    /// Keep it on loopback: an address others can reach needs TLS (--api-tls-cert/--api-tls-key)
    /// or --insecure-api.
    #[arg(long, env = "QUIRE_API", default_value = DEFAULT_API)]
    pub api: SocketAddr,
    /// A host name the client API answers to, besides IP addresses and localhost (requests
    /// naming any other host are refused, against DNS rebinding); apps are then served at
    /// <label>.NAME too. Repeatable.
    #[arg(long = "api-host", value_name = "NAME")]
    pub api_hosts: Vec<String>,
    /// Serve the client API over TLS (HTTPS, gRPC over TLS) with this certificate chain (PEM).
    #[arg(long, requires = "api_tls_key", value_name = "PEM")]
    pub api_tls_cert: Option<PathBuf>,
    /// The private key of --api-tls-cert (PEM).
    #[arg(long, requires = "api_tls_cert", value_name = "PEM")]
    pub api_tls_key: Option<PathBuf>,
    /// Allow --api on an address other than loopback without TLS: the token and every answer
    /// cross the network in clear text.
    #[arg(long)]
    pub insecure_api: bool,
    /// fsync every group commit, so acknowledged appends survive power loss (not only a crash).
    #[arg(long)]
    pub sync: bool,
    /// Address of the peer listener, which serves replication and nothing else. On loopback by
    /// default, so a node is not reachable from the network until you say so: use 0.0.0.0:7000
    /// to let peers dial in. A node can replicate without it by dialing out (--peer).
    #[arg(long, env = "QUIRE_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Do not open a peer listener at all (the node only dials out).
    #[arg(long, conflicts_with = "listen")]
    pub no_listen: bool,
    /// A peer to dial (host:port of its peer listener); repeatable; remembered in the data
    /// directory like `quire peer add`.
    #[arg(long = "peer", value_name = "HOST:PORT")]
    pub peers: Vec<String>,
    /// Which peers may replicate with this node, judged by the node key each proves over the
    /// encrypted peer connection: `open`, any node but those denied with `quire peer deny`;
    /// `known`, only the node keys allowed with `quire peer allow` (dialed peers too).
    #[arg(
        long = "peers",
        env = "QUIRE_PEERS",
        value_name = "open|known",
        default_value = "open"
    )]
    pub peer_admission: crate::replication::PeerAdmission,
    /// Which new streams this node takes (created here, appended as a client-signed genesis, or
    /// fetched by `quire join`): `any`; or `known`, only streams owned by this node's key or by
    /// a key allowed with `quire peer allow` (others are refused, and a join of one ends saying
    /// so). Streams already held stay.
    #[arg(
        long = "accept-streams",
        env = "QUIRE_ACCEPT_STREAMS",
        value_name = "any|known",
        default_value = "any"
    )]
    pub accept_streams: crate::log::AcceptStreams,
    /// How often to apply the retention rules of the streams this node owns (sign `prune`
    /// scribes for what each rule lets go): a duration such as 30s, 10m, 1h; 0 turns background
    /// pruning off (`quire prune` still prunes on demand).
    #[arg(long, env = "QUIRE_PRUNE_EVERY", value_name = "DURATION", default_value = "60s", value_parser = parse_millis)]
    pub prune_every: u64,
    /// Time limit of one SQL query (gRPC Sql.Query, HTTP /<tid>/query), in milliseconds.
    #[arg(long, env = "QUIRE_SQL_TIME_LIMIT_MS", default_value_t = 2000)]
    pub sql_time_limit_ms: u64,
    /// Most rows one SQL query may return; a query with more is refused.
    #[arg(long, env = "QUIRE_SQL_MAX_ROWS", default_value_t = 10_000)]
    pub sql_max_rows: usize,
    /// Most client API connections open at once; a connection past it is closed at once (a
    /// plain HTTP client is told why with a 429).
    #[arg(long, default_value_t = ConnectionLimits::API.max_connections as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_api_connections: u64,
    /// Most client API connections open at once from one address (an IPv6 /64 counts as one):
    /// a browser opens a few per page, a live binding holds one per open page.
    #[arg(long, default_value_t = ConnectionLimits::API.max_per_address as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_api_connections_per_address: u64,
    /// Most peer connections open at once (an honest peer holds one).
    #[arg(long, default_value_t = ConnectionLimits::PEER.max_connections as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_peer_connections: u64,
    /// Most peer connections open at once from one address (an IPv6 /64 counts as one): raise
    /// it when many nodes share one address (behind a NAT, or on one host).
    #[arg(long, default_value_t = ConnectionLimits::PEER.max_per_address as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_peer_connections_per_address: u64,
}

/// `quire join`.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// Stream id (64 hex characters).
    pub stream: ScribeId,
    /// Seconds to wait for a peer to send the stream's genesis (the join stays pending after).
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// Cancel the pending join of the stream instead (a genesis that arrives later is ignored).
    #[arg(long, conflicts_with = "timeout")]
    pub cancel: bool,
}

/// `quire token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Replace the owner's token with a new random one: the node writes it to api.token in its
    /// data directory and the old one stops working at once. Prints where the new one is (and,
    /// with --print, the token itself, for use on another machine).
    Rotate {
        /// Print the new token on standard output.
        #[arg(long)]
        print: bool,
    },
}

/// `quire peer ...`.
#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Remember a peer (host:port of its peer listener) and start dialing it.
    Add {
        /// host:port (port 7000 if omitted).
        addr: String,
    },
    /// List peers with their connection state and per-stream counters.
    List,
    /// Forget a remembered peer and stop dialing it (its connection, if up, ends).
    Remove {
        /// host:port as added (port 7000 if omitted).
        addr: String,
    },
    /// Allow a node key to replicate with this node (needed under `quire serve --peers known`;
    /// lifts a deny). The key is the `quire node …` line a node prints when it starts, or its
    /// `node_id` in `quire status`.
    Allow {
        /// The peer's node key (64 hex characters).
        #[arg(value_name = "NODE_KEY")]
        key: AuthorKey,
    },
    /// Deny a node key: its connections end at once and it is refused from then on, whatever
    /// `--peers` says (replaces an allow).
    Deny {
        /// The peer's node key (64 hex characters).
        #[arg(value_name = "NODE_KEY")]
        key: AuthorKey,
    },
}

/// `quire acl ...`.
#[derive(Debug, Subcommand)]
pub enum AclCommand {
    /// Give KEY a role in STREAM (an acl.grant scribe signed by this node, which must be an admin
    /// of the stream). A node key with a role receives a private stream from then on.
    Grant {
        /// Stream id (64 hex characters).
        stream: ScribeId,
        /// The key (64 hex): a user's or a node's.
        key: AuthorKey,
        /// reader, writer (also reads) or admin (also writes, grants and revokes).
        #[arg(long, default_value = "reader")]
        role: crate::membership::Role,
    },
    /// Take KEY's role in STREAM away (an acl.revoke scribe). Forward-only: what KEY already
    /// received stays with it; its scribes dated after the revoke that had not seen it are
    /// excluded from projections.
    Revoke {
        /// Stream id (64 hex characters).
        stream: ScribeId,
        /// The key (64 hex).
        key: AuthorKey,
    },
    /// List the scribes of STREAM its membership excludes from projections: each is by a key
    /// revoked by a revoke it had not seen, and dated after it. They stay in the log.
    Excluded {
        /// Stream id (64 hex characters).
        stream: ScribeId,
        /// Most to list.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// List STREAM's members with their roles (as this node's membership scribes say).
    List {
        /// Stream id (64 hex characters).
        stream: ScribeId,
    },
}

/// `quire stream ...`.
#[derive(Debug, Subcommand)]
pub enum StreamCommand {
    /// Create a stream (the node signs its genesis); prints the new stream id.
    Create(Box<CreateArgs>),
    /// List the streams this node holds.
    List,
    /// Show one stream and its policy.
    Get {
        /// Stream id (64 hex characters).
        stream: ScribeId,
    },
    /// Stop holding a stream and delete this node's copies of it: it is no longer replicated or
    /// projected here, and its scribes, payloads and projection copies are deleted (other nodes
    /// keep it; `quire join` fetches it whole again). Asks for confirmation unless --yes.
    Leave {
        /// Stream id (64 hex characters).
        stream: ScribeId,
        /// Do not ask for confirmation (needed when stdin is not a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// `quire stream create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A human name for the stream (not unique).
    pub name: String,
    /// Owner key (64 hex); default: this node.
    #[arg(long)]
    pub owner: Option<AuthorKey>,
    /// Who may author a kind, overriding the default: KIND=WHO[,WHO...] where KIND is a kind
    /// (x.vote) or a prefix (x.*, x.chat.*, record.*: the longest that matches wins, an exact
    /// kind first) and WHO is anyone, owner, writers (keys holding the writer role: `quire acl`)
    /// or a 64-hex key. Repeatable.
    /// Defaults: file.* and x.* owner; record.*, kv.* anyone (in a private stream record.*,
    /// kv.* and x.* its writers). E.g. --allow x.vote=anyone opens one extension kind.
    #[arg(long = "allow", value_name = "KIND=WHO")]
    pub allow: Vec<String>,
    /// Largest payload of one scribe, in bytes (default 10 MiB).
    #[arg(long)]
    pub max_file_bytes: Option<u64>,
    /// Largest total size of the stream for local appends, in bytes (default 100 MiB).
    #[arg(long)]
    pub max_stream_bytes: Option<u64>,
    /// Turn key leasing off (kv.* becomes last-writer-wins).
    #[arg(long)]
    pub no_leasing: bool,
    /// Lease duration in seconds (default 3600).
    #[arg(long)]
    pub lease_secs: Option<u64>,
    /// Work-token bits record.add scribes must carry (default 0: none).
    #[arg(long, default_value_t = 0)]
    pub work_bits: u32,
    /// Per-author quota: most bytes one author's scribes may take in the stream, on every node
    /// (local appends and scribes from peers alike; the owner is exempt). Default: none.
    #[arg(long, value_name = "BYTES")]
    pub author_max_bytes: Option<u64>,
    /// Per-author quota: most scribes one author may date within one UTC day, on every node (the
    /// owner is exempt). Default: none.
    #[arg(long, value_name = "SCRIBES")]
    pub author_max_scribes_per_day: Option<u64>,
    /// Make the stream private: it is served (to peers, to clients) only to its members, and
    /// record.*, kv.* and x.* are written by its writers unless --allow says otherwise. Give the
    /// nodes that are to hold it a role (--reader NODE_KEY at least).
    #[arg(long)]
    pub private: bool,
    /// A member from the start with the reader role: a user's or a node's key (64 hex).
    /// Repeatable.
    #[arg(long = "reader", value_name = "KEY")]
    pub readers: Vec<AuthorKey>,
    /// A member from the start with the writer role (also reads). Repeatable.
    #[arg(long = "writer", value_name = "KEY")]
    pub writers: Vec<AuthorKey>,
    /// A member from the start with the admin role (also writes, grants and revokes).
    /// Repeatable.
    #[arg(long = "admin", value_name = "KEY")]
    pub admins: Vec<AuthorKey>,
    #[command(flatten)]
    pub retention: RetentionArgs,
}

/// A retention rule (docs/protocol.md, "Retention"). With none of these: keep everything.
#[derive(Debug, Args, Clone, Copy, Default)]
pub struct RetentionArgs {
    /// Keep only the newest N versions of each file path (`_schema` included) and the newest N
    /// valid writes of each kv key; the owner's node prunes older versions' payloads (a pruned
    /// kv write still counts in its key's fence and lease). 0: keep all.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_versions: u32,
    /// Keep records (`record.*`) at most this long, judged by scribes' clocks: 30d, 12h, 90m,
    /// 45s, 500ms. Older records' payloads are pruned and they leave their tables. 0: forever.
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = parse_millis)]
    pub max_age: u64,
    /// Keep a superseded file version or kv write at least this long after it was superseded,
    /// so a peer that far behind still receives every version (like Kafka's
    /// min.compaction.lag.ms).
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = parse_millis)]
    pub min_lag: u64,
}

impl RetentionArgs {
    /// The wire form.
    pub fn to_proto(self) -> crate::pb::Retention {
        crate::pb::Retention {
            keep_versions: self.keep_versions,
            max_age_ms: self.max_age,
            min_lag_ms: self.min_lag,
        }
    }
}

/// A duration in milliseconds: a number with a unit (ms, s, m, h, d), or 0.
pub fn parse_millis(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| {
        format!(
            "{text:?} is not a duration: write a number and a unit, e.g. 30d, 12h, 10m, 45s, 500ms"
        )
    })?;
    let scale = match unit {
        "" if number == 0 => 0,
        "ms" => 1,
        "s" => 1000,
        "m" => 60 * 1000,
        "h" => 3600 * 1000,
        "d" => 24 * 3600 * 1000,
        _ => {
            return Err(format!(
                "{text:?}: the unit is one of ms, s, m, h, d (e.g. 30d, 12h, 10m, 45s, 500ms)"
            ))
        }
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too long a duration"))
}

/// `quire retain`.
#[derive(Debug, Args)]
pub struct RetainArgs {
    /// Stream id (64 hex characters).
    pub stream: ScribeId,
    #[command(flatten)]
    pub retention: RetentionArgs,
}

/// `quire prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Stream id (64 hex characters); default: every stream held.
    pub stream: Option<ScribeId>,
    /// Only print how many payloads and bytes each stream's rule would reclaim.
    #[arg(long)]
    pub dry_run: bool,
}

/// `quire append`.
#[derive(Debug, Args)]
pub struct AppendArgs {
    /// Stream id (64 hex characters).
    pub stream: ScribeId,
    /// Kind: file.put, file.delete, record.add, record.upvote, kv.set, kv.delete or x.<name>.
    pub kind: String,
    /// Payload as text.
    #[arg(long, conflicts_with = "file")]
    pub data: Option<String>,
    /// Payload from a file ("-": standard input). Without --data or --file the payload is empty.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// MIME type of the payload.
    #[arg(long, default_value = "text/plain; charset=utf-8")]
    pub content_type: String,
    /// Id of a scribe of the same stream this one refers to. Repeatable.
    #[arg(long = "parent")]
    pub parents: Vec<ScribeId>,
}

/// `quire get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Scribe id (64 hex characters).
    pub id: ScribeId,
    /// Write only the raw payload to standard output.
    #[arg(long)]
    pub payload: bool,
}

/// `quire redact`.
#[derive(Debug, Args)]
pub struct RedactArgs {
    /// Stream id (64 hex characters).
    pub stream: ScribeId,
    /// Id of the scribe whose payload goes (64 hex characters).
    pub id: ScribeId,
    /// Why, stored in the redact scribe for everyone who holds the stream to read (at most 1,024
    /// bytes).
    #[arg(long, default_value = "")]
    pub reason: String,
}

/// `quire log`.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Stream id (64 hex characters), or `all` for the whole log.
    pub stream: String,
    /// First local seq to show.
    #[arg(long, default_value_t = 1)]
    pub from: u64,
    /// After catching up, keep printing scribes as they commit (until Ctrl-C).
    #[arg(short, long)]
    pub follow: bool,
}

/// `quire verify` (of the data directory, -d; works while a node runs on it).
#[derive(Debug, Args)]
pub struct VerifyArgs {}

/// Parses the command line and runs it, with quire's built-in projectors.
pub fn main() -> std::process::ExitCode {
    main_with(Registry::builtin())
}

/// Parses the command line and runs it with the projectors of `registry`: the entry point of a
/// binary that adds its own projectors (see `docs/plugins.md`).
pub fn main_with(registry: Registry) -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, registry)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, registry: Registry) -> Result<std::process::ExitCode> {
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(crate::node::default_data_dir);
    let token = match &cli.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--token-file {}", path.display()))?,
        ),
        None => cli.token.clone(),
    };
    let node_url = Node::resolve(
        cli.node.as_deref(),
        token.as_deref(),
        cli.ca_cert.as_deref(),
        &data_dir,
    )?
    .insecure(cli.insecure);
    match cli.command {
        Command::Serve(args) => serve::serve(args, &data_dir, registry).await?,
        Command::Projections => projections::list(&node_url).await?,
        Command::Rebuild(args) => {
            projections::rebuild(&node_url, args, &data_dir, &registry).await?
        }
        Command::Replay(args) => projections::replay(args, &data_dir, &registry)?,
        Command::Digest(args) => projections::digest(&node_url, args).await?,
        Command::Quarantine(command) => projections::quarantine(&node_url, command).await?,
        Command::Kv(command) => return kv::run(&node_url, command).await,
        Command::Sql(command) => sql::run(&node_url, command).await?,
        Command::Files(command) => files::run(&node_url, command).await?,
        Command::Verify(VerifyArgs {}) => return serve::verify(&data_dir),
        Command::Stream(command) => stream::stream(&node_url, command).await?,
        Command::Acl(command) => stream::acl(&node_url, command).await?,
        Command::Append(args) => stream::append(&node_url, args).await?,
        Command::Get(args) => stream::get(&node_url, args).await?,
        Command::Redact(args) => stream::redact(&node_url, args).await?,
        Command::Retain(args) => stream::retain(&node_url, args).await?,
        Command::Prune(args) => stream::prune(&node_url, args).await?,
        Command::Log(args) => stream::log(&node_url, args).await?,
        Command::Status => admin::status(&node_url).await?,
        Command::Join(args) => admin::join(&node_url, args).await?,
        Command::Peer(PeerCommand::Add { addr }) => admin::peer_add(&node_url, addr).await?,
        Command::Peer(PeerCommand::List) => admin::peer_list(&node_url).await?,
        Command::Peer(PeerCommand::Remove { addr }) => admin::peer_remove(&node_url, addr).await?,
        Command::Peer(PeerCommand::Allow { key }) => admin::peer_key(&node_url, key, true).await?,
        Command::Peer(PeerCommand::Deny { key }) => admin::peer_key(&node_url, key, false).await?,
        Command::Token(TokenCommand::Rotate { print }) => {
            admin::token_rotate(&node_url, &data_dir, print).await?
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::parse_millis;

    #[test]
    fn durations_read_with_their_units_and_nonsense_is_refused() {
        assert_eq!(parse_millis("0"), Ok(0));
        assert_eq!(parse_millis("500ms"), Ok(500));
        assert_eq!(parse_millis("45s"), Ok(45_000));
        assert_eq!(parse_millis("10m"), Ok(600_000));
        assert_eq!(parse_millis("12h"), Ok(43_200_000));
        assert_eq!(parse_millis("30d"), Ok(2_592_000_000));
        for bad in ["", "5", "d", "3x", "-1d", "1.5h", "99999999999999999999d"] {
            assert!(parse_millis(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            crate::genesis::human_millis(2_592_000_000),
            "30d",
            "and back"
        );
        assert_eq!(crate::genesis::human_millis(1500), "1500ms");
    }
}
