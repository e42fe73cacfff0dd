//! A `quire` binary with one more projector: the example plugin `latest` (`examples/latest`).
//!
//! This is all it takes to register a projector: build the registry, hand it to the CLI. Every
//! `quire` command works the same (`serve`, `projections`, `rebuild latest`, `replay`, ...).
//!
//! ```text
//! cargo run --example latest-node -- serve -d /tmp/q
//! cargo run --example latest-node -- projections -d /tmp/q
//! ```
//!
//! (`-d` names the node serving that directory and the owner's token the CLI reads there,
//! `api.token`: listing projections, like every call that acts as the node, needs it.)
//!
//! For the crash tests only: `QUIRE_EXAMPLE_BATCH_DELAY_MS=N` makes `latest` take batches of at
//! most 1,024 scribes, each at least N ms longer, so a test can kill the process in the middle of
//! a catch-up or a rebuild.

use std::time::Duration;

use quire::projection::Registry;
use quire::projection_api::{ApplyError, Place, Plugin, ProjectionError, Projector, Scope, Scribe};
use quire_example_latest::Latest;

fn main() -> std::process::ExitCode {
    let delay = std::env::var("QUIRE_EXAMPLE_BATCH_DELAY_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis);
    let registry = match delay {
        Some(delay) => Registry::builtin().with(Slowed(Latest::new(), delay)),
        None => Registry::builtin().with(Latest::new()),
    };
    quire::cli::main_with(registry)
}

/// `latest`, with a pause before every non-empty batch.
struct Slowed(Latest, Duration);

impl Plugin for Slowed {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn fingerprint(&self) -> String {
        self.0.fingerprint()
    }
    fn scope(&self) -> Scope {
        self.0.scope()
    }
    /// Small batches, so a catch-up of a few thousand scribes takes many slow steps.
    fn max_batch(&self) -> usize {
        1024
    }
    fn open(&self, place: &Place) -> Result<Box<dyn Projector>, ProjectionError> {
        Ok(Box::new(SlowedProjector(self.0.open(place)?, self.1)))
    }
}

struct SlowedProjector(Box<dyn Projector>, Duration);

impl Projector for SlowedProjector {
    fn apply(&mut self, batch: &[Scribe], checkpoint: u64) -> Result<(), ApplyError> {
        if !batch.is_empty() {
            std::thread::sleep(self.1);
        }
        self.0.apply(batch, checkpoint)
    }
    fn checkpoint(&self) -> Result<u64, ProjectionError> {
        self.0.checkpoint()
    }
    fn reset(&mut self) -> Result<(), ProjectionError> {
        self.0.reset()
    }
    fn digest(&self) -> Result<[u8; 32], ProjectionError> {
        self.0.digest()
    }
}
