//! quire: a replicated, content-addressed event log with pluggable projections.
//!
//! This crate is the daemon: the local log in RocksDB, the client API over gRPC, the CLI. The plain
//! scribe types it shares with projectors live in the `quire-projection-api` crate.
//!
//! # Layout
//! - [`scribe`]: the bytes of a scribe — encode, sign, decode, verify. Never re-encodes to hash.
//! - [`hlc`]: the node's hybrid logical clock.
//! - [`identity`]: the node's Ed25519 key file.
//! - [`kv`]: the `Kv` gRPC service over the built-in key/value projector.
//! - [`log`]: validation, group commit and gapless local seqs ([`log::store`]: RocksDB layout;
//!   [`log::subscribe`]: catch-up-then-live subscriptions).
//! - [`convert`]: the one place that knows both protobuf and domain types.
//! - [`pb`]: generated protobuf and gRPC code for `proto/quire/v1`.
//! - [`projection`]: the projection runner (plugins, live and shadow copies, quarantine, durable
//!   consumers) and the offline rebuild and replay.
//! - [`replication`]: peers exchange scribes (sans-IO [`replication::session`], its tonic
//!   driver [`replication::connection`], dial loops and joins).
//! - [`server`]: the gRPC client API (thin service impls, one error-to-status mapping), and the
//!   one listener's routing of gRPC and HTTP by content type.
//! - [`sql`]: the `Sql` gRPC service and the record / query operations it shares with HTTP.
//! - [`files`]: the `Files` gRPC service and the file operations it shares with HTTP.
//! - [`http`]: the flock-compatible HTTP API (apps, records, queries, files).
//! - [`node`]: a whole node: open, serve until a shutdown future completes, close.
//! - [`verify`]: offline verification of a data directory.
//! - [`cli`]: the `quire` command line.

pub mod cli;
pub mod convert;
pub mod files;
pub mod hlc;
pub mod http;
pub mod identity;
pub mod kv;
pub mod log;
pub mod node;
pub mod pb;
pub mod projection;
pub mod replication;
pub mod scribe;
pub mod served;
pub mod server;
pub mod sql;
pub mod verify;

pub use quire_projection_api as api;
