//! Domain errors to gRPC statuses, one function per error type, so every service (and HTTP, which
//! maps the status on to an HTTP code in `http::http_code`) agrees on what a refusal is.
//! Also the helper that runs a projection operation off the executor and maps its error.
//! No service logic lives here.

// Handlers return `tonic::Status` by design; boxing it would only move the allocation.
#![allow(clippy::result_large_err)]

use tonic::Status;

use crate::log::store::StoreError;
use crate::log::AppendError;
use crate::projection::readers::WaitError;
use crate::projection::{RunnerError, SlotError};

/// Maps an append refusal to its status: one place, so every API agrees.
pub fn append_status(error: &AppendError) -> Status {
    use tonic::Code;
    let code = match error.root() {
        // A payload too large for any policy is a resource limit; an envelope over 4 KiB is
        // malformed (docs/protocol.md, validation step 1).
        AppendError::Scribe(crate::scribe::ScribeError::TooLarge {
            part: "payload", ..
        }) => Code::ResourceExhausted,
        AppendError::Scribe(_)
        | AppendError::WrongStream { .. }
        | AppendError::BadGenesis(_)
        | AppendError::BadPayload { .. }
        | AppendError::ParentInOtherStream { .. } => Code::InvalidArgument,
        AppendError::UnknownStream(_) | AppendError::UnknownParent { .. } => Code::NotFound,
        AppendError::PermissionDenied { .. }
        | AppendError::MissingWork { .. }
        | AppendError::OwnerNotKnown { .. } => Code::PermissionDenied,
        AppendError::BadMembership { .. }
        | AppendError::BadRedaction { .. }
        | AppendError::BadRetention(_) => Code::InvalidArgument,
        AppendError::RedactDenied { .. } => Code::PermissionDenied,
        AppendError::Redacted(_)
        | AppendError::AlreadyRedacted(_)
        | AppendError::RuleChanged(_) => Code::FailedPrecondition,
        AppendError::Membership { error, .. } => match error {
            crate::membership::MembershipError::UnknownView(_) => Code::FailedPrecondition,
            crate::membership::MembershipError::Full => Code::ResourceExhausted,
            _ => Code::PermissionDenied,
        },
        AppendError::PayloadTooLarge { .. }
        | AppendError::StreamFull { .. }
        | AppendError::QuotaExceeded { .. }
        | AppendError::HeldFull { .. } => Code::ResourceExhausted,
        AppendError::FutureInBatch { .. }
        | AppendError::Backdated { .. }
        | AppendError::Leaving(_) => Code::FailedPrecondition,
        // Busy, not refused: the same append succeeds once a turn frees.
        AppendError::ShuttingDown | AppendError::WorkBusy { .. } => Code::Unavailable,
        _ => Code::Internal,
    };
    Status::new(code, error.to_string())
}

/// Maps a storage failure to its status.
pub fn store_status(error: &StoreError) -> Status {
    match error {
        StoreError::Closed => Status::unavailable(error.to_string()),
        StoreError::Left(_) => Status::not_found(error.to_string()),
        other => Status::internal(other.to_string()),
    }
}

/// The status for a projection error.
pub fn projections_status(error: &RunnerError) -> Status {
    match error {
        RunnerError::Unknown { .. } | RunnerError::UnknownConsumer(_) => {
            Status::not_found(error.to_string())
        }
        RunnerError::Stream(_) | RunnerError::Consumer(_) => {
            Status::invalid_argument(error.to_string())
        }
        RunnerError::NotReady(_) => Status::failed_precondition(error.to_string()),
        RunnerError::Slot(slot) => slot_status(slot),
        RunnerError::Store(store) => store_status(store),
    }
}

/// The status for a failure of one projection slot or its quarantine.
pub fn slot_status(error: &SlotError) -> Status {
    match error {
        SlotError::NotParked(_) => Status::not_found(error.to_string()),
        SlotError::Stream(_) => Status::invalid_argument(error.to_string()),
        SlotError::StillFails { .. } => Status::failed_precondition(error.to_string()),
        SlotError::Damaged(_) => Status::data_loss(error.to_string()),
        SlotError::Store(store) => store_status(store),
        _ => Status::internal(error.to_string()),
    }
}

/// The status for a wait on a projection that ended without the seq applied.
pub fn wait_status(error: &WaitError) -> Status {
    match error {
        WaitError::Runner(error) => projections_status(error),
        WaitError::ShuttingDown => Status::unavailable("the node is shutting down"),
        WaitError::Timeout { .. } => Status::deadline_exceeded(error.to_string()),
    }
}

pub(crate) fn invalid(message: String) -> Status {
    Status::invalid_argument(message)
}

/// Runs a projection operation (which may take file locks and fsync) off the executor.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RunnerError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| Status::unavailable("the node is shutting down"))?
        .map_err(|error| projections_status(&error))
}
