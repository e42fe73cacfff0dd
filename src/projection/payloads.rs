//! The node's payload store as projectors read it: [`StorePayloads`], the
//! [`quire_projection_api::Payloads`] every [`quire_projection_api::Place`] the runner builds
//! carries (and the `Files` service serves bytes from). Not here: how payloads are stored
//! (`log/store.rs`).

use std::sync::Arc;

use quire_projection_api::{Payloads, ProjectionError, ScribeId};

use crate::log::store::{PayloadReader, Store, StoredPayload};

/// Payloads by scribe id, from the node's store: a redacted payload is `None`, a scribe the
/// store does not hold an error. Holds the store weakly (reads fail once it is closed).
#[derive(Debug, Clone)]
pub struct StorePayloads {
    reader: PayloadReader,
}

impl StorePayloads {
    /// The payloads of `store`.
    pub fn new(store: &Store) -> StorePayloads {
        StorePayloads {
            reader: store.payload_reader(),
        }
    }

    /// The payloads of `store`, as a projector's place holds them.
    pub fn shared(store: &Store) -> Arc<dyn Payloads> {
        Arc::new(StorePayloads::new(store))
    }
}

impl Payloads for StorePayloads {
    fn payload(&self, id: &ScribeId) -> Result<Option<Vec<u8>>, ProjectionError> {
        match self.reader.payload(id) {
            Ok(Some(StoredPayload::Bytes(payload))) => Ok(Some(payload)),
            Ok(Some(StoredPayload::Redacted)) => Ok(None),
            Ok(None) => Err(ProjectionError::new(format!(
                "scribe {id} is not stored on this node"
            ))),
            Err(error) => Err(ProjectionError::new(format!(
                "reading the payload of scribe {id}: {error}"
            ))),
        }
    }
}
