//! `quire files push|ls|get|rm`: a stream's file tree from the command line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Subcommand;
use futures::StreamExt as _;
use quire_projection_api::files::check_path;
use quire_projection_api::StreamId;
use quire_projection_files::content_type_for;
use sha2::{Digest, Sha256};

use super::client::Node;
use super::{channel, status_error};
use crate::api::access::AuthChannel;
use crate::api::MAX_MESSAGE_BYTES;
use crate::pb;

/// Uploads at once during a push.
const PARALLEL_PUTS: usize = 16;

/// `quire files ...`.
#[derive(Debug, Subcommand)]
pub enum FilesCommand {
    /// Publish a directory as the stream's file tree (the owner's node, by default): uploads the
    /// files whose content or type changed (content types from file extensions; `_schema` is
    /// JSON), and with --delete removes the stream's files that are gone locally. Prints what it
    /// did.
    Push {
        /// The stream.
        stream: StreamId,
        /// The directory to publish (its files keep their paths relative to it).
        dir: PathBuf,
        /// Also delete the stream's files that are not in the directory.
        #[arg(long)]
        delete: bool,
        /// Only print what would change.
        #[arg(long)]
        dry_run: bool,
    },
    /// List the stream's files: size, content type, SHA-256 (first 16 hex) and path.
    Ls {
        /// The stream.
        stream: StreamId,
        /// Only paths starting with this.
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Print a file's bytes to stdout.
    Get {
        /// The stream.
        stream: StreamId,
        /// The path.
        path: String,
    },
    /// Delete a file (a tombstone, replicated like any change).
    Rm {
        /// The stream.
        stream: StreamId,
        /// The path.
        path: String,
    },
}

type Client = pb::files_client::FilesClient<AuthChannel>;

fn id(stream: &StreamId) -> Bytes {
    Bytes::copy_from_slice(stream.as_bytes())
}

/// Every file under `root`, by its `/`-separated relative path.
fn local_files(root: &Path) -> Result<BTreeMap<String, PathBuf>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            let kind = std::fs::metadata(&path)?.file_type();
            if kind.is_dir() {
                walk(root, &path, out)?;
            } else if kind.is_file() {
                let relative = path.strip_prefix(root).expect("under root");
                let parts: Vec<String> = relative
                    .components()
                    .map(|c| c.as_os_str().to_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .with_context(|| format!("{} is not UTF-8", path.display()))?;
                out.insert(parts.join("/"), path);
            }
        }
        Ok(())
    }
    if !root.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out)?;
    for path in out.keys() {
        check_path(path).map_err(|reason| anyhow::anyhow!("cannot publish {path:?}: {reason}"))?;
    }
    Ok(out)
}

async fn remote_files(
    client: &mut Client,
    stream: &StreamId,
    prefix: &str,
) -> Result<Vec<pb::FileInfo>> {
    Ok(client
        .list(pb::FilesListRequest {
            stream: id(stream),
            prefix: prefix.into(),
            limit: 100_000,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .files)
}

/// Runs a `quire files` command against the node at `url`.
pub async fn run(url: &Node, command: FilesCommand) -> Result<()> {
    let mut client = pb::files_client::FilesClient::new(channel(url).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    match command {
        FilesCommand::Push {
            stream,
            dir,
            delete,
            dry_run,
        } => push(&mut client, stream, &dir, delete, dry_run).await?,
        FilesCommand::Ls { stream, prefix } => {
            for file in remote_files(&mut client, &stream, &prefix).await? {
                println!(
                    "{:>10}  {:<32}  {}  {}",
                    file.size,
                    file.content_type,
                    &hex::encode(&file.sha256)[..16],
                    file.path
                );
            }
        }
        FilesCommand::Get { stream, path } => {
            let file = client
                .get(pb::FilesGetRequest {
                    stream: id(&stream),
                    path,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            use std::io::Write as _;
            std::io::stdout().write_all(&file.data)?;
        }
        FilesCommand::Rm { stream, path } => {
            let reply = client
                .delete(pb::FilesDeleteRequest {
                    stream: id(&stream),
                    path: path.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("deleted {path} at seq {}", reply.seq);
        }
    }
    Ok(())
}

async fn push(
    client: &mut Client,
    stream: StreamId,
    dir: &Path,
    delete: bool,
    dry_run: bool,
) -> Result<()> {
    let local = local_files(dir)?;
    let remote: BTreeMap<String, pb::FileInfo> = remote_files(client, &stream, "")
        .await?
        .into_iter()
        .map(|file| (file.path.clone(), file))
        .collect();
    let mut uploads = Vec::new();
    let mut unchanged = 0;
    for (path, file) in &local {
        let data =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let content_type = content_type_for(path);
        let sha256: [u8; 32] = Sha256::digest(&data).into();
        match remote.get(path) {
            Some(held) if held.sha256.as_ref() == sha256 && held.content_type == content_type => {
                unchanged += 1
            }
            _ => uploads.push((path.clone(), content_type.to_string(), data)),
        }
    }
    let removals: Vec<String> = if delete {
        remote
            .keys()
            .filter(|p| !local.contains_key(*p))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let (mut put_files, mut put_bytes) = (0, 0);
    if dry_run {
        for (path, _, data) in &uploads {
            println!("would put     {path} ({} bytes)", data.len());
        }
        for path in &removals {
            println!("would delete  {path}");
        }
    } else {
        let shared = client.clone();
        let puts = uploads.into_iter().map(|(path, content_type, data)| {
            let mut client = shared.clone();
            async move {
                let size = data.len();
                let reply = client
                    .put(pb::FilesPutRequest {
                        stream: id(&stream),
                        path: path.clone(),
                        content_type,
                        data: Bytes::from(data),
                    })
                    .await
                    .map_err(|status| {
                        anyhow::anyhow!("putting {path}: {}", status_error(status))
                    })?;
                Ok::<_, anyhow::Error>((path, size, reply.into_inner()))
            }
        });
        let mut puts = futures::stream::iter(puts).buffer_unordered(PARALLEL_PUTS);
        while let Some(put) = puts.next().await {
            let (path, size, _) = put?;
            println!("put     {path} ({size} bytes)");
            put_files += 1;
            put_bytes += size;
        }
        drop(puts);
        for path in &removals {
            client
                .delete(pb::FilesDeleteRequest {
                    stream: id(&stream),
                    path: path.clone(),
                })
                .await
                .map_err(|status| anyhow::anyhow!("deleting {path}: {}", status_error(status)))?;
            println!("deleted {path}");
        }
    }
    println!(
        "{put_files} put ({put_bytes} bytes), {unchanged} unchanged, {} deleted{}",
        if dry_run { 0 } else { removals.len() },
        if !delete {
            let stale = remote.keys().filter(|p| !local.contains_key(*p)).count();
            if stale > 0 {
                format!(" ({stale} only in the stream: --delete removes them)")
            } else {
                String::new()
            }
        } else {
            String::new()
        }
    );
    Ok(())
}
