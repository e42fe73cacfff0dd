//! Set-up shared by the benches (a directory, so cargo does not take it for a bench of its own).

#![allow(dead_code)]

use bytes::Bytes;
use quire::pb;
use tonic::transport::Channel;

/// A connected channel to the node at `url`.
pub async fn connect(url: String) -> Channel {
    Channel::from_shared(url).unwrap().connect().await.unwrap()
}

/// Creates a stream named `name` with `policy` (`None`: the defaults); returns its id bytes.
pub async fn create_stream(channel: &Channel, name: &str, policy: Option<pb::Policy>) -> Bytes {
    pb::streams_client::StreamsClient::new(channel.clone())
        .create(pb::CreateStreamRequest {
            name: name.into(),
            policy,
            owner: Bytes::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .stream
}

/// A policy without the default 100 MiB per-stream limit (a million scribes are far over it).
pub fn unlimited() -> pb::Policy {
    pb::Policy {
        max_stream_bytes: 1 << 40,
        ..Default::default()
    }
}

/// A `Log` client on `channel` that takes batches of up to 64 MiB each way.
pub fn log_client(channel: Channel) -> pb::log_client::LogClient<Channel> {
    pb::log_client::LogClient::new(channel)
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20)
}

/// How many scribes of `stream` (genesis included) the node on `channel` holds; 0 if none.
pub async fn scribes_held(channel: &Channel, stream: &Bytes) -> u64 {
    pb::streams_client::StreamsClient::new(channel.clone())
        .get(pb::GetStreamRequest {
            stream: stream.clone(),
        })
        .await
        .map(|info| info.into_inner().scribes)
        .unwrap_or(0)
}
