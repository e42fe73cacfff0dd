//! `quire projections`, `rebuild`, `replay`, `digest` and `quarantine`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Subcommand};
use quire_projection_api::{ScribeId, StreamId};

use super::client::Node;
use super::{channel, status_error};
use crate::api::access::AuthChannel;
use crate::log::store::Store;
use crate::pb;
use crate::projection::{self, Registry};
use std::path::Path;

/// `quire rebuild`.
#[derive(Debug, Args)]
pub struct RebuildArgs {
    /// The projection (or durable consumer) to rebuild, as `quire projections` names it.
    pub name: String,
    /// Only this stream's copy (for a per-stream projection).
    #[arg(long)]
    pub stream: Option<StreamId>,
    /// Rebuild every stream's copy without asking (needed when there is more than one).
    #[arg(long)]
    pub yes: bool,
    /// Work on a stopped node's data directory (-d) instead of through a running node.
    #[arg(long)]
    pub offline: bool,
    /// Start the rebuild and return without waiting for the swap.
    #[arg(long, conflicts_with = "offline")]
    pub no_wait: bool,
}

/// `quire replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Replay into this projection only (default: every projector of this binary).
    pub name: Option<String>,
    /// First local seq to replay.
    #[arg(long, default_value_t = 1)]
    pub from: u64,
    /// Last local seq to replay (default: the head).
    #[arg(long)]
    pub to: Option<u64>,
    /// Directory for the scratch copies (created; must be empty or missing).
    #[arg(long)]
    pub into: PathBuf,
    /// Only this stream (for per-stream projections).
    #[arg(long)]
    pub stream: Option<StreamId>,
}

/// `quire digest`.
#[derive(Debug, Args)]
pub struct DigestArgs {
    /// The projection.
    pub name: String,
    /// The stream (for a per-stream projection).
    #[arg(long)]
    pub stream: Option<StreamId>,
}

/// `quire quarantine ...`.
#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// Every parked (and skipped) scribe, with the projection and the error.
    List,
    /// Re-apply a parked scribe after the fault is fixed (fails if it still fails).
    Retry {
        /// The scribe id.
        id: ScribeId,
        /// Only in this projection (default: every projection that parked it).
        #[arg(long)]
        projection: Option<String>,
    },
    /// Record the decision to skip a parked scribe; a projection halted at it goes on.
    Skip {
        /// The scribe id.
        id: ScribeId,
        /// Only in this projection (default: every projection that parked it).
        #[arg(long)]
        projection: Option<String>,
    },
}

async fn client(url: &Node) -> Result<pb::projections_client::ProjectionsClient<AuthChannel>> {
    Ok(pb::projections_client::ProjectionsClient::new(
        channel(url).await?,
    ))
}

fn stream_bytes(stream: Option<&StreamId>) -> Bytes {
    stream
        .map(|s| Bytes::copy_from_slice(s.as_bytes()))
        .unwrap_or_default()
}

fn scope_of(status: &pb::ProjectionStatus) -> String {
    if status.stream.is_empty() {
        "log".into()
    } else {
        hex::encode(&status.stream[..4.min(status.stream.len())])
    }
}

/// `quire projections`.
pub async fn list(url: &Node) -> Result<()> {
    let reply = client(url)
        .await?
        .list(pb::ListProjectionsRequest { with_digests: true })
        .await
        .map_err(status_error)?
        .into_inner();
    if reply.projections.is_empty() {
        println!("no projections: this node runs no projectors and has no durable consumers");
        return Ok(());
    }
    println!(
        "{:<20} {:<9} {:<9} {:>10} {:>8} {:>6}  {:<16}  state",
        "name", "kind", "scope", "checkpoint", "lag", "parked", "digest"
    );
    for status in &reply.projections {
        let mut state = Vec::new();
        if let Some(rebuild) = &status.rebuild {
            state.push(format!(
                "rebuilding gen {} ({} of {})",
                rebuild.generation, rebuild.checkpoint, rebuild.target
            ));
        }
        if !status.halted.is_empty() {
            state.push(format!(
                "HALTED at seq {}: {}",
                status.halted_seq, status.halted
            ));
        }
        if !status.error.is_empty() {
            state.push(format!("FAILING: {}", status.error));
        }
        if state.is_empty() {
            state.push(if status.lag == 0 {
                "caught up".into()
            } else {
                "catching up".into()
            });
        }
        let digest = if status.digest.is_empty() {
            "-".to_string()
        } else {
            hex::encode(&status.digest[..8])
        };
        println!(
            "{:<20} {:<9} {:<9} {:>10} {:>8} {:>6}  {:<16}  {}",
            status.name,
            status.kind,
            scope_of(status),
            status.checkpoint,
            status.lag,
            status.quarantined,
            digest,
            state.join("; ")
        );
    }
    Ok(())
}

/// `quire digest`.
pub async fn digest(url: &Node, args: DigestArgs) -> Result<()> {
    let reply = client(url)
        .await?
        .digest(pb::DigestRequest {
            name: args.name,
            stream: stream_bytes(args.stream.as_ref()),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "{} at checkpoint {}",
        hex::encode(&reply.digest),
        reply.checkpoint
    );
    Ok(())
}

/// `quire quarantine ...`.
pub async fn quarantine(url: &Node, command: QuarantineCommand) -> Result<()> {
    let mut client = client(url).await?;
    let (verb, reply) = match command {
        QuarantineCommand::List => (None, client.quarantined(pb::QuarantinedRequest {}).await),
        QuarantineCommand::Retry { id, projection } => (
            Some("applied"),
            client
                .retry(pb::QuarantineActionRequest {
                    id: Bytes::copy_from_slice(id.as_bytes()),
                    name: projection.unwrap_or_default(),
                })
                .await,
        ),
        QuarantineCommand::Skip { id, projection } => (
            Some("skipped"),
            client
                .skip(pb::QuarantineActionRequest {
                    id: Bytes::copy_from_slice(id.as_bytes()),
                    name: projection.unwrap_or_default(),
                })
                .await,
        ),
    };
    let reply = reply.map_err(status_error)?.into_inner();
    let entries = reply.entries;
    if entries.is_empty() && reply.not_kept.is_empty() {
        println!("the quarantine is empty");
    }
    for not_kept in &reply.not_kept {
        let projection = if not_kept.stream.is_empty() {
            not_kept.name.clone()
        } else {
            format!("{}/{}", not_kept.name, hex::encode(&not_kept.stream))
        };
        let stream = if not_kept.stream.is_empty() {
            String::new()
        } else {
            format!(" --stream {}", hex::encode(&not_kept.stream))
        };
        println!(
            "{projection}: {} more refused scribes were passed over but not kept (its quarantine holds at most 1,000); `quire rebuild {}{stream}` applies them again",
            not_kept.count, not_kept.name
        );
    }
    for entry in entries {
        let projection = if entry.stream.is_empty() {
            entry.name.clone()
        } else {
            format!("{}/{}", entry.name, hex::encode(&entry.stream[..4]))
        };
        match verb {
            Some(verb) => println!("{verb} {} in {projection}", hex::encode(&entry.id)),
            None => println!(
                "{:<8} seq {:<8} {}  {projection}  {}: {}",
                entry.state,
                entry.seq,
                hex::encode(&entry.id),
                entry.kind,
                entry.error
            ),
        }
    }
    Ok(())
}

/// `quire rebuild`.
pub async fn rebuild(
    url: &Node,
    args: RebuildArgs,
    data_dir: &Path,
    registry: &Registry,
) -> Result<()> {
    if args.offline {
        return rebuild_offline(args, data_dir, registry);
    }
    let mut client = client(url).await?;
    let before = client
        .list(pb::ListProjectionsRequest::default())
        .await
        .map_err(status_error)?
        .into_inner()
        .projections;
    let copies = before
        .iter()
        .filter(|status| status.name == args.name && status.kind == "projector")
        .filter(|status| {
            args.stream
                .is_none_or(|stream| status.stream.as_ref() == stream.as_bytes())
        })
        .count();
    if copies > 1 && !args.yes {
        bail!(
            "{} has {copies} copies (one per stream); pass --stream <id> for one, or --yes for all",
            args.name
        );
    }
    let started = client
        .rebuild(pb::RebuildRequest {
            name: args.name.clone(),
            stream: stream_bytes(args.stream.as_ref()),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .projections;
    if started.iter().all(|status| status.kind == "consumer") {
        println!(
            "consumer {} starts over from seq 1 at its next subscription",
            args.name
        );
        return Ok(());
    }
    let generations: Vec<(Bytes, u64)> = started
        .iter()
        .filter_map(|s| s.rebuild.as_ref().map(|r| (s.stream.clone(), r.generation)))
        .collect();
    println!(
        "rebuilding {} ({} {}) beside the live copy",
        args.name,
        generations.len(),
        if generations.len() == 1 {
            "copy"
        } else {
            "copies"
        }
    );
    if args.no_wait {
        return Ok(());
    }
    let mut progress = Progress::new(&args.name);
    loop {
        let now = client
            .list(pb::ListProjectionsRequest::default())
            .await
            .map_err(status_error)?
            .into_inner()
            .projections;
        let mine: Vec<&pb::ProjectionStatus> = now
            .iter()
            .filter(|s| s.name == args.name && s.kind == "projector")
            .filter(|s| generations.iter().any(|(stream, _)| *stream == s.stream))
            .collect();
        let pending: Vec<&&pb::ProjectionStatus> =
            mine.iter().filter(|s| s.rebuild.is_some()).collect();
        let done: u64 = mine
            .iter()
            .map(|s| s.rebuild.as_ref().map(|r| r.checkpoint).unwrap_or(s.target))
            .sum();
        let total: u64 = mine.iter().map(|s| s.target).sum();
        progress.update(done, total);
        if let Some(failing) = mine.iter().find(|s| !s.error.is_empty()) {
            progress.note(&format!("failing: {}", failing.error));
        }
        if pending.is_empty() {
            progress.finish();
            let done = client
                .list(pb::ListProjectionsRequest { with_digests: true })
                .await
                .map_err(status_error)?
                .into_inner()
                .projections;
            let mine = done
                .iter()
                .filter(|s| s.name == args.name && s.kind == "projector")
                .filter(|s| generations.iter().any(|(stream, _)| *stream == s.stream));
            for status in mine {
                println!(
                    "{} {}: generation {} live, digest {}",
                    args.name,
                    scope_of(status),
                    status.generation,
                    hex::encode(&status.digest)
                );
            }
            return Ok(());
        }
        // A display refresh, not synchronisation: the swap is read from the node's own state.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn rebuild_offline(args: RebuildArgs, data_dir: &Path, registry: &Registry) -> Result<()> {
    let Some(plugin) = registry.get(&args.name) else {
        let names: Vec<&str> = registry.plugins().iter().map(|p| p.name()).collect();
        bail!(
            "this quire binary has no projector named {:?} (it has: {})",
            args.name,
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
    };
    let store = Store::open(&crate::log::store_path(data_dir), true).map_err(|error| {
        let text = error.to_string();
        if text.contains("lock") {
            anyhow::anyhow!("{} is in use by a running node: stop it first, or drop --offline to rebuild through it", data_dir.display())
        } else {
            anyhow::anyhow!("opening {}: {text}", data_dir.display())
        }
    })?;
    if args.stream.is_none() && !args.yes && plugin.scope() == quire_projection_api::Scope::Stream {
        let streams = store.streams()?.len();
        if streams > 1 {
            bail!("{} has {streams} copies (one per stream); pass --stream <id> for one, or --yes for all", args.name);
        }
    }
    let mut progress = Progress::new(&args.name);
    let digests = projection::rebuild_offline(
        &store,
        data_dir,
        Arc::clone(plugin),
        args.stream,
        |done, total| progress.update(done, total),
    )?;
    progress.finish();
    for rebuilt in digests {
        println!(
            "{} {}: rebuilt, digest {}",
            args.name,
            rebuilt
                .stream
                .map(|s| s.short())
                .unwrap_or_else(|| "log".into()),
            hex::encode(rebuilt.digest)
        );
    }
    Ok(())
}

/// `quire replay`.
pub fn replay(args: ReplayArgs, data_dir: &Path, registry: &Registry) -> Result<()> {
    if args
        .into
        .read_dir()
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
    {
        bail!(
            "{} is not empty; replay into a new or empty directory",
            args.into.display()
        );
    }
    let plugins: Vec<_> = match &args.name {
        Some(name) => vec![registry
            .get(name)
            .cloned()
            .with_context(|| format!("this quire binary has no projector named {name:?}"))?],
        None => registry.plugins().to_vec(),
    };
    if plugins.is_empty() {
        bail!("this quire binary has no projectors to replay into (see docs/plugins.md)");
    }
    let store = Store::open_read_only(&crate::log::store_path(data_dir))
        .with_context(|| format!("opening {} read-only", data_dir.display()))?;
    let to = args.to.unwrap_or(u64::MAX);
    for plugin in plugins {
        let mut progress = Progress::new(plugin.name());
        let total = to.min(store.head()?);
        let results = projection::replay(
            &store,
            plugin.as_ref(),
            args.stream,
            &args.into,
            args.from,
            to,
            |seq| {
                progress.update(
                    seq.saturating_sub(args.from) + 1,
                    total + 1 - args.from.min(total + 1),
                )
            },
        )?;
        progress.finish();
        for projection::Replayed {
            stream,
            applied,
            refused,
            digest,
        } in results
        {
            let dir = projection::scope_dir(&args.into, plugin.name(), stream.as_ref());
            println!(
                "{}: seqs {}..={} → {} scribes applied, {} refused, digest {} in {}",
                plugin.name(),
                args.from,
                total,
                applied,
                refused.len(),
                hex::encode(digest),
                dir.display()
            );
            for (seq, reason) in refused {
                println!("  refused seq {seq}: {reason}");
            }
        }
    }
    Ok(())
}

/// A progress bar with rate and ETA on a terminal; a plain line every few seconds otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    name: String,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    fn new(name: &str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {pos}/{len} scribes, {per_sec}, ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(name.to_string());
            bar
        });
        Progress {
            bar,
            name: name.to_string(),
            started: Instant::now(),
            last_line: Instant::now(),
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(total);
                bar.set_position(done.min(total));
            }
            None if self.last_line.elapsed() >= Duration::from_secs(2) => {
                self.last_line = Instant::now();
                let seconds = self.started.elapsed().as_secs_f64().max(0.001);
                let rate = done as f64 / seconds;
                let eta = if rate > 0.0 {
                    format!("{:.0}s", total.saturating_sub(done) as f64 / rate)
                } else {
                    "?".into()
                };
                eprintln!(
                    "{}: {done}/{total} scribes, {rate:.0}/s, ETA {eta}",
                    self.name
                );
            }
            None => {}
        }
    }

    fn note(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{}: {text}", self.name),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!(
            "{}: done in {:.1}s",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }
}
