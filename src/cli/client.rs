//! The CLI's connection to a running node: one channel, the typed clients, and a gRPC status
//! turned into an error that names its code.

use anyhow::{Context, Result};
use tonic::transport::Channel;

use crate::api::MAX_MESSAGE_BYTES;
use crate::pb;

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

pub(crate) async fn streams_client(
    url: &str,
) -> Result<pb::streams_client::StreamsClient<Channel>> {
    Ok(pb::streams_client::StreamsClient::new(channel(url).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

pub(crate) async fn log_client(url: &str) -> Result<pb::log_client::LogClient<Channel>> {
    Ok(pb::log_client::LogClient::new(channel(url).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}
