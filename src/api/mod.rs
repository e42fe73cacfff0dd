//! The client API: every client-facing service of a node, on the client API listener (bound to
//! loopback by default; the peer listener serves replication and nothing else — invariant 9,
//! `docs/invariants.md`).
//!
//! # Layout
//! - [`access`]: the trust boundary — who calls (the owner with the token, an app at its own
//!   origin, anyone), which host, which gRPC method needs what.
//! - [`router`]: where a request becomes a service call — refused by [`access`], or gRPC by
//!   content type, HTTP otherwise.
//! - [`streams`], [`log`], [`projections`], [`admin`]: thin tonic services over the log, the
//!   projection runner and the replicator.
//! - [`kv`], [`sql`], [`files`]: the services over the built-in projections, sharing
//!   [`served::Served`] (the held stream, pooled readers, node-signed appends answered once the
//!   copy includes them).
//! - [`http`]: the flock-compatible HTTP API; each handler calls the service method that does
//!   the same thing.
//! - [`status`]: domain errors to `tonic::Status`, one function per error type.
//! - [`convert`]: protobuf to and from the domain types the client API shows.
//!
//! Nothing below this layer (`projection`, `replication`, `log`, the scribe) imports from it.

pub mod access;
pub mod admin;
pub mod convert;
pub mod files;
pub mod http;
pub mod kv;
pub mod live;
pub mod log;
pub mod projections;
pub mod router;
pub mod served;
pub mod sql;
pub mod status;
pub mod streams;

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::Status;

use crate::projection::Projections;
use crate::replication::Replicator;

pub use status::{append_status, projections_status, store_status, wait_status};

/// Largest gRPC message either way: room for a maximal scribe, or a batch of many small ones.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Default and largest `limit` of `Log.Read`.
pub const READ_DEFAULT_LIMIT: u32 = 1000;
/// Largest `limit` of `Log.Read`.
pub const READ_MAX_LIMIT: u32 = 100_000;
/// Events buffered per subscription before the subscription waits for the client.
pub const SUBSCRIBE_BUFFER: usize = 256;

/// Static facts the API reports about its node.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    /// The data directory.
    pub data_dir: String,
    /// Listeners: (name, address).
    pub listeners: Vec<(String, String)>,
    /// Whether commits are fsynced.
    pub sync_writes: bool,
}

/// The client API over one log.
#[derive(Debug, Clone)]
pub struct Api {
    log: crate::log::Log,
    replicator: Replicator,
    projections: Projections,
    facts: Arc<NodeFacts>,
    access: access::Access,
}

impl Api {
    /// An API over `log`.
    pub fn new(
        log: crate::log::Log,
        replicator: Replicator,
        projections: Projections,
        facts: NodeFacts,
        access: access::Access,
    ) -> Api {
        Api {
            log,
            replicator,
            projections,
            facts: Arc::new(facts),
            access,
        }
    }
}

pub(crate) type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;
