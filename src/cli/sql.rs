//! `quire sql query|add|upvote|schema`: the SQLite tables of a stream from the command line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Subcommand;
use quire_projection_api::files::{FileChange, CONTENT_TYPE, SCHEMA_PATH};
use quire_projection_api::{Kind, StreamId};

use super::client::Node;
use super::{channel, status_error};
use crate::api::access::AuthChannel;
use crate::api::MAX_MESSAGE_BYTES;
use crate::pb;

/// `quire sql ...`.
#[derive(Debug, Subcommand)]
pub enum SqlCommand {
    /// Run one read-only SQL statement on a stream's tables; prints a header line of column names,
    /// then one line per row, values separated by tabs (NULL for null; `--json` for JSON lines).
    Query {
        /// The stream.
        stream: StreamId,
        /// One SELECT statement (or a schema-reading PRAGMA such as `PRAGMA table_info(t)`).
        sql: String,
        /// A value for the next `?` parameter, as JSON (`10`, `"text"`, `null`); repeatable.
        #[arg(short, long = "param", value_name = "JSON")]
        params: Vec<String>,
        /// Print each row as a JSON list, without the header.
        #[arg(long)]
        json: bool,
        /// Wait until the tables include the log up to this local seq.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Add a record (a JSON object whose `_table` names its table), signed by the node with the
    /// work token the stream asks for; prints its id and local seq.
    Add {
        /// The stream.
        stream: StreamId,
        /// The record, e.g. '{"_table": "post", "title": "hello"}'.
        record: String,
    },
    /// Upvote a record (signed by the node; a node's repeated upvotes of a record count once).
    Upvote {
        /// The stream.
        stream: StreamId,
        /// The record's id (64 hex characters).
        record: quire_projection_api::ScribeId,
    },
    /// Publish a `_schema` file (the stream owner's node only): tables, field types and indexes.
    /// The node refuses an invalid schema and says why; a valid one remaps every record.
    Schema {
        /// The stream.
        stream: StreamId,
        /// The schema file (JSON), e.g. {"schema": {"post": {"title": "fulltext"}}, "indexes": []}.
        file: PathBuf,
    },
}

fn value_from_json(text: &str) -> Result<pb::SqlValue> {
    let json: serde_json::Value = serde_json::from_str(text)
        .with_context(|| format!("--param {text:?} is not JSON: quote text as '\"text\"'"))?;
    Ok(crate::api::sql::value_to_proto(
        quire_projection_sql::to_sql(Some(&json)),
    ))
}

/// A value as printed: JSON, but NULL as the word in text mode.
fn value_text(value: &pb::SqlValue, json: bool) -> serde_json::Value {
    match crate::api::sql::value_to_json(crate::api::sql::value_from_proto(value.clone())) {
        serde_json::Value::Null if !json => serde_json::Value::String("NULL".into()),
        other => other,
    }
}

/// Runs a `quire sql` command against the node at `url`.
pub async fn run(url: &Node, command: SqlCommand) -> Result<()> {
    let channel = channel(url).await?;
    match command {
        SqlCommand::Query {
            stream,
            sql,
            params,
            json,
            after,
        } => {
            let params = params
                .iter()
                .map(|p| value_from_json(p))
                .collect::<Result<Vec<_>>>()?;
            let reply = pb::sql_client::SqlClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .query(pb::SqlQueryRequest {
                    stream: Bytes::copy_from_slice(stream.as_bytes()),
                    sql,
                    params,
                    named: Default::default(),
                    after_seq: after,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if !json {
                println!("{}", reply.columns.join("\t"));
            }
            for row in &reply.rows {
                let values: Vec<serde_json::Value> =
                    row.values.iter().map(|v| value_text(v, json)).collect();
                if json {
                    println!("{}", serde_json::Value::Array(values));
                } else {
                    let cells: Vec<String> = values
                        .iter()
                        .map(|v| match v {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect();
                    println!("{}", cells.join("\t"));
                }
            }
        }
        SqlCommand::Add { stream, record } => {
            let reply = append(
                channel,
                stream,
                Kind::RecordAdd,
                "application/json",
                record.into_bytes(),
            )
            .await?;
            println!("{} seq {}", hex::encode(&reply.id), reply.seq);
        }
        SqlCommand::Upvote { stream, record } => {
            let reply = pb::log_client::LogClient::new(channel)
                .append(pb::AppendRequest {
                    stream: Bytes::copy_from_slice(stream.as_bytes()),
                    kind: Kind::RecordUpvote.to_string(),
                    content_type: "application/json".into(),
                    payload: Bytes::new(),
                    parents: vec![Bytes::copy_from_slice(record.as_bytes())],
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{} seq {}", hex::encode(&reply.id), reply.seq);
        }
        SqlCommand::Schema { stream, file } => {
            let data = std::fs::read(&file)
                .with_context(|| format!("cannot read schema file {}", file.display()))?;
            let (kind, payload) = FileChange::Put {
                path: SCHEMA_PATH.into(),
                content_type: "application/json".into(),
                data,
            }
            .encode();
            let reply = append(channel, stream, kind, CONTENT_TYPE, payload).await?;
            println!(
                "_schema published: {} seq {}",
                hex::encode(&reply.id),
                reply.seq
            );
        }
    }
    Ok(())
}

async fn append(
    channel: AuthChannel,
    stream: StreamId,
    kind: Kind,
    content_type: &str,
    payload: Vec<u8>,
) -> Result<pb::AppendReply> {
    Ok(pb::log_client::LogClient::new(channel)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
        .append(pb::AppendRequest {
            stream: Bytes::copy_from_slice(stream.as_bytes()),
            kind: kind.to_string(),
            content_type: content_type.into(),
            payload: Bytes::from(payload),
            parents: Vec::new(),
        })
        .await
        .map_err(status_error)?
        .into_inner())
}
