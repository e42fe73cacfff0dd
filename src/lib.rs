//! quire: a replicated, content-addressed event log with pluggable projections.
//!
//! This crate is the daemon: the local log in RocksDB, the client API over gRPC, the CLI. The plain
//! scribe types it shares with projectors live in the `quire-projection-api` crate.
//!
//! # Layout
//! Layers, top to bottom; a module imports only from its own layer or those below it, and no two
//! modules import each other (`tests/it/tidy.rs` checks both).
//! - [`cli`]: the `quire` command line.
//! - [`node`]: a whole node: open, serve until a shutdown future completes, close.
//! - [`api`]: the client API — gRPC services, the HTTP router, the status mapping, `Served`.
//! - [`projection`]: the projection runner (plugins, live and shadow copies, quarantine, durable
//!   consumers) and the offline rebuild and replay. [`replication`]: peers exchange scribes
//!   (sans-IO [`replication::session`], its wire codec, its tonic driver, dial loops and joins).
//!   [`verify`]: offline verification of a data directory.
//! - [`log`]: validation, group commit and gapless local seqs ([`log::store`]: RocksDB layout;
//!   [`log::subscribe`]: catch-up-then-live subscriptions).
//! - [`scribe`]: the bytes of a scribe — encode, sign, decode, verify; [`genesis`]: what a
//!   genesis says; [`hlc`]: the node's hybrid logical clock; [`identity`]: the node's key file;
//!   [`pb`]: generated protobuf and gRPC code for `proto/quire/v1`; [`net`]: the node's two
//!   listeners (connection caps, deadlines, HTTP/2 limits); [`fds`]: how the node spends its
//!   file descriptors.

pub mod api;
pub mod cli;
pub mod fds;
pub mod genesis;
pub mod hlc;
pub mod identity;
pub mod log;
pub mod membership;
pub mod net;
pub mod node;
pub mod pb;
pub mod projection;
pub mod replication;
pub mod scribe;
pub mod verify;

/// The projector API crate (`quire-projection-api`): the plain scribe types and the `Plugin` /
/// `Projector` traits, re-exported for binaries that register their own projectors.
pub use quire_projection_api as projection_api;
