//! The values that cross the backend traits: leases, store snapshots, the
//! writes a runner makes and the history they leave, and the rules every
//! store applies to a write ([`Snapshot::check`]). Plain data: nothing here
//! does I/O, so the planner and the runner's checks depend on these and
//! never on a backend trait.

mod error;
mod history;
mod lease;
mod snapshot;

pub use error::BackendError;
pub use history::{
    AttemptKind, AttemptState, Change, Checkpoint, FinishAttempt, HistoryEntry, SaveCheckpoint,
    StartAttempt, UNLOCK_TASK_ID,
};
pub use lease::{Acquire, Lease, LeaseInfo};
pub use snapshot::{LastRow, Snapshot, TaskSummary};
