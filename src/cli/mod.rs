//! The `quire` command line (clap derive). `serve`, `verify`, `replay` and `rebuild --offline` work
//! on a data directory; every other command is a gRPC client of a running node (`--node`, default
//! the local API address).
//! `anyhow` is used here, at the binary's edge, and nowhere else.

use std::io::{IsTerminal, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use quire_projection_api::{AuthorKey, Kind, ScribeId};
use tonic::transport::Channel;

use crate::node::{self, NodeConfig};
use crate::pb;
use crate::projection::Registry;

mod files;
mod kv;
mod projections;
mod sql;
use crate::server::MAX_MESSAGE_BYTES;
use projections::{DigestArgs, QuarantineCommand, RebuildArgs, ReplayArgs};

/// Default client API address.
pub const DEFAULT_API: &str = "127.0.0.1:8000";
/// Default peer listener address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7000";

/// quire: a replicated, content-addressed event log with pluggable projections.
///
/// Run a node with `quire serve`; every other command (but `verify`, `replay` and
/// `rebuild --offline`, which open a data directory) talks to a running node's client API, given
/// by --node (default http://127.0.0.1:8000).
#[derive(Debug, Parser)]
#[command(name = "quire", version, propagate_version = true)]
pub struct Cli {
    /// Client API of the node to talk to.
    #[arg(
        long,
        global = true,
        env = "QUIRE_NODE",
        default_value = "http://127.0.0.1:8000"
    )]
    pub node: String,
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node: open (or create) a data directory and serve the client API until Ctrl-C.
    Serve(ServeArgs),
    /// Create, list and show streams.
    #[command(subcommand)]
    Stream(StreamCommand),
    /// Append a scribe to a stream, signed by the node; prints its id and local seq.
    Append(AppendArgs),
    /// Show one stored scribe by id.
    Get(GetArgs),
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

/// `quire serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data directory (created if missing). Default: $XDG_DATA_HOME/quire or ~/.local/share/quire.
    #[arg(short = 'd', long = "data-dir", env = "QUIRE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the client API: gRPC and the HTTP API share it, told apart by content type.
    /// Keep it on loopback: it can append as the node.
    #[arg(long, env = "QUIRE_API", default_value = DEFAULT_API)]
    pub api: SocketAddr,
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
    /// Time limit of one SQL query (gRPC Sql.Query, HTTP /<tid>/query), in milliseconds.
    #[arg(long, env = "QUIRE_SQL_TIME_LIMIT_MS", default_value_t = 2000)]
    pub sql_time_limit_ms: u64,
    /// Most rows one SQL query may return; a query with more is refused.
    #[arg(long, env = "QUIRE_SQL_MAX_ROWS", default_value_t = 10_000)]
    pub sql_max_rows: usize,
}

/// `quire join`.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// Stream id (64 hex characters).
    pub stream: ScribeId,
    /// Seconds to wait for a peer to send the stream's genesis (the join stays pending after).
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
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
}

/// `quire stream ...`.
#[derive(Debug, Subcommand)]
pub enum StreamCommand {
    /// Create a stream (the node signs its genesis); prints the new stream id.
    Create(CreateArgs),
    /// List the streams this node holds.
    List,
    /// Show one stream and its policy.
    Get {
        /// Stream id (64 hex characters).
        stream: ScribeId,
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
    /// Who may author a kind, overriding the default: KIND=WHO[,WHO...] where WHO is anyone, owner
    /// or a 64-hex key. Repeatable. Defaults: file.* owner; record.*, kv.*, x.* anyone.
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

/// `quire verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Data directory to verify (works while a node runs on it).
    #[arg(short = 'd', long = "data-dir", env = "QUIRE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

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
    let node_url = cli.node.clone();
    match cli.command {
        Command::Serve(args) => serve(args, registry).await?,
        Command::Projections => projections::list(&node_url).await?,
        Command::Rebuild(args) => projections::rebuild(&node_url, args, &registry).await?,
        Command::Replay(args) => projections::replay(args, &registry)?,
        Command::Digest(args) => projections::digest(&node_url, args).await?,
        Command::Quarantine(command) => projections::quarantine(&node_url, command).await?,
        Command::Kv(command) => return kv::run(&node_url, command).await,
        Command::Sql(command) => sql::run(&node_url, command).await?,
        Command::Files(command) => files::run(&node_url, command).await?,
        Command::Verify(args) => return verify(args),
        Command::Stream(command) => stream(&node_url, command).await?,
        Command::Append(args) => append(&node_url, args).await?,
        Command::Get(args) => get(&node_url, args).await?,
        Command::Log(args) => log(&node_url, args).await?,
        Command::Status => status(&node_url).await?,
        Command::Join(args) => join(&node_url, args).await?,
        Command::Peer(PeerCommand::Add { addr }) => {
            let mut client = pb::admin_client::AdminClient::new(channel(&node_url).await?);
            let reply = client
                .add_peer(pb::AddPeerRequest { addr })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "peer {} added; it is dialed now and after every restart",
                reply.addr
            );
        }
        Command::Peer(PeerCommand::List) => {
            let mut client = pb::admin_client::AdminClient::new(channel(&node_url).await?);
            let status = client
                .status(pb::StatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            print_peers(&status.peers);
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn serve(args: ServeArgs, registry: Registry) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUIRE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let data_dir = args.data_dir.unwrap_or_else(node::default_data_dir);
    let config = NodeConfig {
        data_dir: data_dir.clone(),
        sync: args.sync,
        wall: None,
        peers: args.peers.clone(),
        registry,
        sql_limits: quire_projection_sql::Limits {
            time: std::time::Duration::from_millis(args.sql_time_limit_ms),
            rows: args.sql_max_rows,
        },
    };
    let log = node::open_log(&config)
        .with_context(|| format!("opening data directory {}", data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(args.api)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; pick another address with --api",
                args.api
            )
        })?;
    let addr = listener.local_addr()?;
    let peer_listener = if args.no_listen {
        None
    } else {
        Some(
            tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("cannot listen for peers on {}; pick another address with --listen (or --no-listen)", args.listen))?,
        )
    };
    println!("quire node {}", log.node_key());
    println!("data directory {}", data_dir.display());
    println!("client API listening on http://{addr}");
    if let Some(peer_listener) = &peer_listener {
        println!("peer listener on {}", peer_listener.local_addr()?);
    }
    std::io::stdout().flush()?;
    let shutdown = async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match terminate.as_mut() { Some(signal) => { signal.recv().await; } None => std::future::pending().await } } => {},
        }
        tracing::info!("shutting down");
    };
    node::serve(&config, log, listener, peer_listener, shutdown).await?;
    Ok(())
}

fn verify(args: VerifyArgs) -> Result<std::process::ExitCode> {
    let data_dir = args.data_dir.unwrap_or_else(node::default_data_dir);
    let report = crate::verify::verify(&data_dir)
        .with_context(|| format!("opening {}", data_dir.display()))?;
    for line in &report.damage {
        println!("DAMAGE {line}");
    }
    println!(
        "checked {} scribes in {} streams up to seq {}: {}",
        report.scribes,
        report.streams,
        report.head,
        match report.damage.len() {
            0 => "no damage".to_string(),
            1 => "1 problem".to_string(),
            n => format!("{n} problems"),
        }
    );
    Ok(if report.damage.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    })
}

pub(crate) async fn channel(url: &str) -> Result<Channel> {
    Channel::from_shared(url.to_string())
        .with_context(|| format!("--node {url:?} is not a URL like http://127.0.0.1:8000"))?
        .connect()
        .await
        .with_context(|| format!("cannot reach a quire node at {url}: is `quire serve` running there? (set --node or QUIRE_NODE)"))
}

pub(crate) fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", code_name(status.code()), status.message())
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::InvalidArgument => "invalid argument",
        Code::NotFound => "not found",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "too large",
        Code::FailedPrecondition => "failed precondition",
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "not yet",
        _ => "failed",
    }
}

async fn streams_client(url: &str) -> Result<pb::streams_client::StreamsClient<Channel>> {
    Ok(pb::streams_client::StreamsClient::new(channel(url).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

async fn log_client(url: &str) -> Result<pb::log_client::LogClient<Channel>> {
    Ok(pb::log_client::LogClient::new(channel(url).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

fn parse_allow(rule: &str) -> Result<pb::KindRule> {
    let (kind, who) = rule
        .split_once('=')
        .with_context(|| format!("--allow {rule:?}: write KIND=WHO, e.g. file.put=anyone"))?;
    kind.parse::<Kind>()
        .with_context(|| format!("--allow {rule:?}"))?;
    let mut authors = pb::Authors::default();
    for part in who
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        match part {
            "anyone" => authors.anyone = true,
            "owner" => authors.owner = true,
            key => {
                let key: AuthorKey = key.parse().with_context(|| {
                    format!("--allow {rule:?}: {key:?} is not anyone, owner or a 64-hex key")
                })?;
                authors.keys.push(Bytes::copy_from_slice(key.as_bytes()));
            }
        }
    }
    Ok(pb::KindRule {
        kind: kind.to_string(),
        authors: Some(authors),
    })
}

async fn stream(url: &str, command: StreamCommand) -> Result<()> {
    let mut client = streams_client(url).await?;
    match command {
        StreamCommand::Create(args) => {
            let policy = pb::Policy {
                rules: args
                    .allow
                    .iter()
                    .map(|rule| parse_allow(rule))
                    .collect::<Result<_>>()?,
                max_file_bytes: args.max_file_bytes.unwrap_or(0),
                max_stream_bytes: args.max_stream_bytes.unwrap_or(0),
                leasing_disabled: args.no_leasing,
                lease_ms: args.lease_secs.map_or(0, |secs| secs.saturating_mul(1000)),
                work_bits: args.work_bits,
            };
            let info = client
                .create(pb::CreateStreamRequest {
                    name: args.name,
                    policy: Some(policy),
                    owner: args
                        .owner
                        .map(|key| Bytes::copy_from_slice(key.as_bytes()))
                        .unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", hex::encode(&info.stream));
        }
        StreamCommand::List => {
            let streams = client
                .list(pb::ListStreamsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .streams;
            if streams.is_empty() {
                println!("no streams; create one with `quire stream create NAME`");
            }
            for info in streams {
                println!(
                    "{}  {:<20} {:>8} scribes  head seq {}",
                    hex::encode(&info.stream),
                    info.name,
                    info.scribes,
                    info.head_seq
                );
            }
        }
        StreamCommand::Get { stream } => {
            let info = client
                .get(pb::GetStreamRequest {
                    stream: Bytes::copy_from_slice(stream.as_bytes()),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_stream(&info);
        }
    }
    Ok(())
}

fn print_stream(info: &pb::StreamInfo) {
    println!("stream      {}", hex::encode(&info.stream));
    println!("name        {}", info.name);
    println!("owner       {}", hex::encode(&info.owner));
    println!(
        "scribes     {} ({} bytes), genesis at seq {}, newest at seq {}",
        info.scribes, info.bytes, info.genesis_seq, info.head_seq
    );
    if let Some(policy) = &info.policy {
        println!(
            "limits      {} bytes per scribe, {} bytes per stream",
            policy.max_file_bytes, policy.max_stream_bytes
        );
        println!(
            "leasing     {}",
            if policy.leasing_disabled {
                "off (last writer wins)".to_string()
            } else {
                format!("on, {} s", policy.lease_ms / 1000)
            }
        );
        println!("work bits   {}", policy.work_bits);
        for rule in &policy.rules {
            let authors = rule.authors.clone().unwrap_or_default();
            let mut who = Vec::new();
            if authors.anyone {
                who.push("anyone".to_string());
            }
            if authors.owner {
                who.push("owner".to_string());
            }
            who.extend(authors.keys.iter().map(hex::encode));
            println!(
                "allow       {} = {}",
                rule.kind,
                if who.is_empty() {
                    "nobody".to_string()
                } else {
                    who.join(",")
                }
            );
        }
    }
}

async fn append(url: &str, args: AppendArgs) -> Result<()> {
    let payload = match (&args.data, &args.file) {
        (Some(data), _) => data.clone().into_bytes(),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut buffer = Vec::new();
            std::io::stdin().read_to_end(&mut buffer)?;
            buffer
        }
        (None, Some(path)) => {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
        }
        (None, None) => Vec::new(),
    };
    let mut client = log_client(url).await?;
    let reply = client
        .append(pb::AppendRequest {
            stream: Bytes::copy_from_slice(args.stream.as_bytes()),
            kind: args.kind,
            content_type: args.content_type,
            payload: Bytes::from(payload),
            parents: args
                .parents
                .iter()
                .map(|id| Bytes::copy_from_slice(id.as_bytes()))
                .collect(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "{} seq {}{}",
        hex::encode(&reply.id),
        reply.seq,
        if reply.duplicate {
            " (already stored)"
        } else {
            ""
        }
    );
    Ok(())
}

async fn get(url: &str, args: GetArgs) -> Result<()> {
    let mut client = log_client(url).await?;
    let entry = client
        .get(pb::GetScribeRequest {
            id: Bytes::copy_from_slice(args.id.as_bytes()),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let (scribe, _) = crate::scribe::Scribe::decode_unverified(entry.scribe.clone())
        .context("the node sent a scribe that does not decode")?;
    if args.payload {
        std::io::stdout().write_all(&scribe.body.payload)?;
        return Ok(());
    }
    println!("id            {}", args.id);
    println!("seq           {}", entry.seq);
    println!("stream        {}", scribe.stream_id());
    println!("kind          {}", scribe.body.kind);
    println!("author        {}", scribe.body.author);
    println!(
        "hlc           {} (unix ms {}, counter {})",
        scribe.body.hlc,
        scribe.body.hlc >> 16,
        scribe.body.hlc & 0xffff
    );
    println!("content type  {}", scribe.body.content_type);
    println!(
        "size          {} bytes ({} payload)",
        entry.scribe.len(),
        scribe.body.payload.len()
    );
    for parent in &scribe.body.parents {
        println!("parent        {parent}");
    }
    match std::str::from_utf8(&scribe.body.payload) {
        Ok(text) if scribe.body.kind != Kind::StreamCreate => println!("payload       {text}"),
        _ => println!(
            "payload       ({} bytes; `quire get --payload` writes them raw)",
            scribe.body.payload.len()
        ),
    }
    Ok(())
}

async fn log(url: &str, args: LogArgs) -> Result<()> {
    let stream = if args.stream == "all" {
        Bytes::new()
    } else {
        let id: ScribeId = args
            .stream
            .parse()
            .with_context(|| format!("{:?} is neither a stream id nor `all`", args.stream))?;
        Bytes::copy_from_slice(id.as_bytes())
    };
    let mut client = log_client(url).await?;
    let mut events = client
        .subscribe(pb::SubscribeRequest {
            stream,
            from_seq: args.from,
            consumer: String::new(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut stdout = std::io::stdout().lock();
    let colour = stdout.is_terminal();
    while let Some(event) = events.message().await.map_err(status_error)? {
        match event.event {
            Some(pb::subscribe_event::Event::Scribe(entry)) => {
                writeln!(
                    stdout,
                    "{:>8}  {}  {:<14} {}  {} B",
                    entry.seq,
                    hex::encode(&entry.id),
                    entry.kind,
                    hex::encode(entry.author.get(..4).unwrap_or_default()),
                    entry.scribe.len()
                )?;
            }
            Some(pb::subscribe_event::Event::CaughtUp(caught_up)) => {
                if colour {
                    writeln!(
                        stdout,
                        "\x1b[2m-- caught up at seq {} --\x1b[0m",
                        caught_up.seq
                    )?;
                } else {
                    writeln!(stdout, "caught up at seq {}", caught_up.seq)?;
                }
                if !args.follow {
                    return Ok(());
                }
            }
            None => {}
        }
        stdout.flush()?;
    }
    if args.follow {
        bail!("the node closed the subscription (shutting down?)");
    }
    Ok(())
}

async fn join(url: &str, args: JoinArgs) -> Result<()> {
    let mut client = streams_client(url).await?;
    let info = client
        .join(pb::JoinStreamRequest {
            stream: Bytes::copy_from_slice(args.stream.as_bytes()),
            timeout_ms: args.timeout.saturating_mul(1000),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "joined {} ({}); catching up from peers — `quire status` shows progress",
        hex::encode(&info.stream),
        info.name
    );
    Ok(())
}

fn print_peers(peers: &[pb::PeerStatus]) {
    if peers.is_empty() {
        println!("no peers; add one with `quire peer add HOST:PORT`");
    }
    for peer in peers {
        println!(
            "peer {:<22} {} {}{}",
            peer.addr,
            if peer.connected {
                "connected   "
            } else {
                "disconnected"
            },
            if peer.node_id.is_empty() {
                "node ?".to_string()
            } else {
                format!("node {}", &peer.node_id[..16])
            },
            if peer.dialed { "" } else { " (dialed in)" },
        );
        if peer.refused > 0 {
            println!("    refused {} invalid scribes", peer.refused);
        }
        if !peer.last_error.is_empty() {
            println!("    last error: {}", peer.last_error);
        }
        for stream in &peer.streams {
            println!(
                "    stream {}  cursor {}  lag {}  sent {}  received {}  duplicates {}  refused {}{}",
                hex::encode(&stream.stream),
                stream.cursor,
                stream.lag,
                stream.sent,
                stream.received,
                stream.duplicates,
                stream.refused,
                if stream.caught_up { "  caught up" } else { "" }
            );
        }
    }
}

async fn status(url: &str) -> Result<()> {
    let mut client = pb::admin_client::AdminClient::new(channel(url).await?);
    let status = client
        .status(pb::StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    println!("node        {}", status.node_id);
    println!("version     {}", status.version);
    println!("data dir    {}", status.data_dir);
    println!("log epoch   {}", hex::encode(&status.log_epoch));
    println!("head seq    {}", status.head_seq);
    println!(
        "writes      {}",
        if status.sync_writes {
            "fsync per group commit (--sync)"
        } else {
            "crash-safe, not fsynced"
        }
    );
    for listener in &status.listeners {
        println!("listener    {:<6} {}", listener.name, listener.addr);
    }
    if let Some(memory) = &status.store_memory {
        println!(
            "store memory {} KiB memtables, {} KiB table readers, {} KiB block cache ({} KiB pinned)",
            memory.memtables / 1024,
            memory.table_readers / 1024,
            memory.block_cache / 1024,
            memory.pinned / 1024
        );
    }
    println!("streams     {}", status.streams.len());
    for info in &status.streams {
        println!(
            "  {}  {:<20} {:>8} scribes  head seq {}",
            hex::encode(&info.stream),
            info.name,
            info.scribes,
            info.head_seq
        );
    }
    println!("projections {}", status.projections.len());
    for projection in &status.projections {
        let scope = if projection.stream.is_empty() {
            "log".to_string()
        } else {
            hex::encode(&projection.stream[..4])
        };
        let mut state = format!(
            "checkpoint {} lag {}",
            projection.checkpoint, projection.lag
        );
        if projection.quarantined > 0 {
            state.push_str(&format!(", {} parked", projection.quarantined));
        }
        if projection.rebuild.is_some() {
            state.push_str(", rebuilding");
        }
        if !projection.halted.is_empty() {
            state.push_str(&format!(", HALTED at seq {}", projection.halted_seq));
        }
        if !projection.error.is_empty() {
            state.push_str(&format!(", FAILING: {}", projection.error));
        }
        println!(
            "  {:<20} {:<9} {:<9} {state}",
            projection.name, projection.kind, scope
        );
    }
    print_peers(&status.peers);
    Ok(())
}
