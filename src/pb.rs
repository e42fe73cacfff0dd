//! The generated protobuf messages and gRPC services of package `quire.v1` (see `proto/`).
//!
//! Domain code works with `quire::scribe` and `quire_projection_api` types; the conversions live at
//! the edges that need them: `api::convert` (the client API), `replication::wire` (the peer
//! protocol), `genesis` (a stream's genesis and policy) and the CLI.

#![allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    missing_debug_implementations
)]

tonic::include_proto!("quire.v1");

/// The encoded `FileDescriptorSet` of every quire proto file, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("quire_descriptor");
