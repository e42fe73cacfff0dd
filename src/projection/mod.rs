//! Projections: turn the log into read models, keep them caught up, rebuild them blue/green, park
//! scribes they cannot apply, and keep durable consumers' checkpoints.
//!
//! - `registry`: [`Registry`], the plugins a node runs (built-in and the embedding binary's own).
//! - `runner`: [`Projections`], the running set: one task per slot (a plugin in one scope: the
//!   whole log, or one stream), catching up from its checkpoint in batches and then following the
//!   head; and the admin operations.
//! - `slot`: one slot's live and shadow copies and the swap (synchronous code).
//! - `quarantine`: scribes a slot parked, and the operator's retry or skip.
//! - `offline`: [`rebuild_offline`] and [`replay`], on a stopped node's store.
//! - `consumers`: checkpoints of out-of-process consumers (`Log.Subscribe` with a name, `Log.Ack`).
//! - `view`: a stored scribe as projectors see it.
//! - `payloads`: [`StorePayloads`], the node's payload store as projectors read it (every
//!   instance's `Place::payloads`).
//! - [`readers`]: pooled read-only connections to live copies, for the services that read them.
//!
//! Invariant 6 (checkpoint with the work) holds because every batch commits inside the projector
//! together with its checkpoint, and the runner always resumes from the checkpoint the projector
//! reports after it is opened.

mod budget;
mod consumers;
mod offline;
mod payloads;
mod quarantine;
pub mod readers;
mod registry;
mod runner;
mod slot;
mod view;

pub use consumers::Consumer;
pub use offline::{rebuild_offline, replay, Rebuilt, Replayed};
pub use payloads::StorePayloads;
pub use quarantine::Parked;
pub use registry::Registry;
pub use runner::{ProjectionStatus, Projections, RunnerError};
pub use slot::{scope_dir, SlotError, PROJECTIONS_DIR};
pub(crate) use view::to_view;
