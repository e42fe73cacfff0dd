//! `quire kv get|set|del|scan|watch`.

use std::io::Write as _;

use anyhow::{bail, Result};
use bytes::Bytes;
use clap::Subcommand;
use quire_projection_api::StreamId;

use super::client::Node;
use super::{channel, status_error};
use crate::api::MAX_MESSAGE_BYTES;
use crate::pb;

/// `quire kv ...`. Keys and values are UTF-8 text on the command line; `--hex` reads and prints
/// them as hex instead (for binary keys and values).
#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Print a key's value (exit status 1 if it has none).
    Get {
        /// The stream.
        stream: StreamId,
        /// The key.
        key: String,
        /// Keys and values are hex.
        #[arg(long)]
        hex: bool,
        /// Also print the fencing token, the holder and the lease's end.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Set a key (refused while another node's lease on it lives); prints the fencing token.
    Set {
        /// The stream.
        stream: StreamId,
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Keys and values are hex.
        #[arg(long)]
        hex: bool,
    },
    /// Delete a key (a tombstone that releases its lease).
    Del {
        /// The stream.
        stream: StreamId,
        /// The key.
        key: String,
        /// The key is hex.
        #[arg(long)]
        hex: bool,
    },
    /// Print the live keys starting with a prefix, one `key<TAB>value` per line.
    Scan {
        /// The stream.
        stream: StreamId,
        /// The prefix (default: every key).
        #[arg(default_value = "")]
        prefix: String,
        /// At most this many (0: every one). Asked for in pages (the node answers at most 10,000
        /// entries and 2 MiB a page); each page is consistent with its own seq.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// Keys and values are hex.
        #[arg(long)]
        hex: bool,
    },
    /// Print the current values under a prefix, then every change, until Ctrl-C.
    Watch {
        /// The stream.
        stream: StreamId,
        /// The prefix (default: every key).
        #[arg(default_value = "")]
        prefix: String,
        /// Resume from this seq (no snapshot).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Keys and values are hex.
        #[arg(long)]
        hex: bool,
    },
}

fn bytes_in(text: &str, hex: bool) -> Result<Bytes> {
    if hex {
        Ok(Bytes::from(hex::decode(text).map_err(|error| {
            anyhow::anyhow!("{text:?} is not hex ({error}); drop --hex for text")
        })?))
    } else {
        Ok(Bytes::copy_from_slice(text.as_bytes()))
    }
}

fn bytes_out(bytes: &[u8], hex: bool) -> String {
    if hex {
        hex::encode(bytes)
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    }
}

fn id(stream: &StreamId) -> Bytes {
    Bytes::copy_from_slice(stream.as_bytes())
}

fn describe(entry: &pb::KvEntry) -> String {
    let mut text = format!("fence {}", entry.fence);
    if !entry.owner.is_empty() {
        text.push_str(&format!(", held by {}", hex::encode(&entry.owner)));
    }
    if entry.lease_until_ms > 0 {
        text.push_str(&format!(", lease until unix ms {}", entry.lease_until_ms));
    }
    text
}

/// Runs a `quire kv` command against the node at `url`.
pub async fn run(url: &Node, command: KvCommand) -> Result<std::process::ExitCode> {
    let mut client = pb::kv_client::KvClient::new(channel(url).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    match command {
        KvCommand::Get {
            stream,
            key,
            hex,
            verbose,
        } => {
            let reply = client
                .get(pb::KvGetRequest {
                    stream: id(&stream),
                    key: bytes_in(&key, hex)?,
                })
                .await;
            match reply {
                Ok(entry) => {
                    let entry = entry.into_inner();
                    println!("{}", bytes_out(&entry.value, hex));
                    if verbose {
                        eprintln!("{}", describe(&entry));
                    }
                }
                Err(status) if status.code() == tonic::Code::NotFound => {
                    eprintln!("{}", status.message());
                    return Ok(std::process::ExitCode::from(1));
                }
                Err(status) => return Err(status_error(status)),
            }
        }
        KvCommand::Set {
            stream,
            key,
            value,
            hex,
        } => {
            let entry = client
                .set(pb::KvSetRequest {
                    stream: id(&stream),
                    key: bytes_in(&key, hex)?,
                    value: bytes_in(&value, hex)?,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("set at seq {}: {}", entry.seq, describe(&entry));
            if entry.written != entry.id {
                eprintln!("note: a concurrent write from another node came out ahead by the lease rule; the key holds its value, not this one");
            }
        }
        KvCommand::Del { stream, key, hex } => {
            let entry = client
                .delete(pb::KvDeleteRequest {
                    stream: id(&stream),
                    key: bytes_in(&key, hex)?,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("deleted at seq {}: fence {}", entry.seq, entry.fence);
        }
        KvCommand::Scan {
            stream,
            prefix,
            limit,
            hex,
        } => {
            let prefix = bytes_in(&prefix, hex)?;
            let mut after = bytes::Bytes::new();
            let mut left = if limit == 0 { u64::MAX } else { limit.into() };
            while left > 0 {
                let reply = client
                    .scan(pb::KvScanRequest {
                        stream: id(&stream),
                        prefix: prefix.clone(),
                        limit: left.min(u32::MAX.into()) as u32,
                        after: after.clone(),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                let mut stdout = std::io::stdout().lock();
                for entry in &reply.entries {
                    writeln!(
                        stdout,
                        "{}\t{}",
                        bytes_out(&entry.key, hex),
                        bytes_out(&entry.value, hex)
                    )?;
                }
                left = left.saturating_sub(reply.entries.len() as u64);
                match reply.entries.last() {
                    Some(last) if reply.more => after = last.key.clone(),
                    _ => break,
                }
            }
        }
        KvCommand::Watch {
            stream,
            prefix,
            from,
            hex,
        } => {
            let mut events = client
                .watch(pb::KvWatchRequest {
                    stream: id(&stream),
                    prefix: bytes_in(&prefix, hex)?,
                    key: Bytes::new(),
                    from_seq: from,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            // Where a new watch can take over without losing a change: known once the snapshot
            // is complete (CaughtUp), or from the start when resuming.
            let mut resume = (from > 0).then_some(from);
            while let Some(event) = events.message().await.map_err(status_error)? {
                let mut stdout = std::io::stdout().lock();
                match event.event {
                    Some(pb::kv_watch_event::Event::Entry(entry)) => {
                        if entry.present {
                            writeln!(
                                stdout,
                                "{}\t{}\t(seq {}, fence {})",
                                bytes_out(&entry.key, hex),
                                bytes_out(&entry.value, hex),
                                entry.seq,
                                entry.fence
                            )?;
                        } else {
                            writeln!(
                                stdout,
                                "{}\t(deleted at seq {})",
                                bytes_out(&entry.key, hex),
                                entry.seq
                            )?;
                        }
                        resume = resume.map(|_| entry.seq + 1);
                    }
                    Some(pb::kv_watch_event::Event::CaughtUp(at)) => {
                        writeln!(stdout, "caught up at seq {}", at.seq)?;
                        resume = Some(at.seq + 1);
                    }
                    None => {}
                }
                stdout.flush()?;
            }
            match resume {
                Some(seq) => {
                    bail!("the node closed the watch (shutting down?); resume with --from {seq}")
                }
                None => bail!(
                    "the node closed the watch before its snapshot was complete; start it again"
                ),
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
