//! History rows and the writes that make them.

use std::collections::BTreeSet;
use std::time::Duration;

use semver::Version;

use crate::ids::{Holder, TaskKey};
use crate::state::BackendError;

/// What a history row is: a run of the task, a run of its rollback, or an
/// operator's forced release of the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AttemptKind {
    /// The task itself.
    Run,
    /// The task's rollback.
    Rollback,
    /// An operator forced the lease free (`upsilon unlock`). Recorded under
    /// [`TaskKey::unlock`], which no task can have; it never counts as a
    /// completion.
    Unlock,
}

impl AttemptKind {
    /// Stable name kept in stores.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptKind::Run => "run",
            AttemptKind::Rollback => "rollback",
            AttemptKind::Unlock => "unlock",
        }
    }

    /// Reads [`AttemptKind::as_str`].
    pub fn parse(s: &str) -> Result<AttemptKind, BackendError> {
        match s {
            "run" => Ok(AttemptKind::Run),
            "rollback" => Ok(AttemptKind::Rollback),
            "unlock" => Ok(AttemptKind::Unlock),
            other => Err(BackendError::corrupt(format!(
                "unknown attempt kind {other:?}"
            ))),
        }
    }
}

/// The task id of [`TaskKey::unlock`]: the id rule refuses parentheses, so no
/// task can have it.
pub const UNLOCK_TASK_ID: &str = "(unlock)";

// Beside the kind it goes with, rather than in `ids`: only unlock rows use it.
impl TaskKey {
    /// The pseudo task that [`AttemptKind::Unlock`] rows are recorded under:
    /// version 0.0.0 and id [`UNLOCK_TASK_ID`], which no real task can have.
    pub fn unlock() -> TaskKey {
        TaskKey {
            version: Version::new(0, 0, 0),
            id: UNLOCK_TASK_ID.to_owned(),
        }
    }

    /// Whether this is [`TaskKey::unlock`].
    pub fn is_unlock(&self) -> bool {
        self.id == UNLOCK_TASK_ID && self.version == Version::new(0, 0, 0)
    }
}

/// The state of one history row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptState {
    /// Started and not finished (or its holder died).
    Running,
    /// Finished successfully. For a rollback row: the task was undone.
    Completed,
    /// Returned an error or panicked.
    Failed,
    /// Stopped because the lease was lost.
    Cancelled,
}

impl AttemptState {
    /// Stable name kept in stores.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptState::Running => "running",
            AttemptState::Completed => "completed",
            AttemptState::Failed => "failed",
            AttemptState::Cancelled => "cancelled",
        }
    }

    /// Reads [`AttemptState::as_str`].
    pub fn parse(s: &str) -> Result<AttemptState, BackendError> {
        match s {
            "running" => Ok(AttemptState::Running),
            "completed" => Ok(AttemptState::Completed),
            "failed" => Ok(AttemptState::Failed),
            "cancelled" => Ok(AttemptState::Cancelled),
            other => Err(BackendError::corrupt(format!(
                "unknown attempt state {other:?}"
            ))),
        }
    }
}

/// One fenced write to the store. [`Store::apply`](crate::backend::Store::apply) takes several and applies
/// them atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// A new history row in state `running`.
    Start(StartAttempt),
    /// The end of the task's newest row.
    Finish(FinishAttempt),
    /// The data version advances (never back).
    DataVersion(Version),
    /// An empty store adopts `version` as its data version and baseline.
    Baseline(Version),
    /// The task's newest row, still running, records how far it got.
    Checkpoint(SaveCheckpoint),
}

impl Change {
    /// The tasks whose summaries [`Snapshot::check`](crate::backend::Snapshot::check) needs to judge
    /// `changes`, or `None` when it needs the whole history (a baseline, which
    /// only an empty store takes). A backend may load just these for a write,
    /// so that a write's cost does not grow with the history.
    pub fn touched(changes: &[Change]) -> Option<BTreeSet<&TaskKey>> {
        let mut keys = BTreeSet::new();
        for change in changes {
            match change {
                Change::Start(s) => {
                    keys.insert(&s.key);
                }
                Change::Finish(f) => {
                    keys.insert(&f.key);
                }
                Change::Checkpoint(c) => {
                    keys.insert(&c.key);
                }
                Change::DataVersion(_) => {}
                Change::Baseline(_) => return None,
            }
        }
        Some(keys)
    }
}

/// A new history row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartAttempt {
    /// The task.
    pub key: TaskKey,
    /// 1-based number of the row among the task's rows.
    pub attempt: u32,
    /// Run, rollback or unlock.
    pub kind: AttemptKind,
    /// The task's description.
    pub description: String,
    /// Who runs it.
    pub holder: Holder,
    /// The position the row starts from: the checkpoint of the task's
    /// previous row when that row is of the same kind (a run after a run, a
    /// rollback after a rollback), so that the newest row always holds the
    /// latest position. `None` for a first row, or after a row of another
    /// kind.
    pub checkpoint: Option<Checkpoint>,
}

/// How far a running attempt got, as a task saved it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// The position, as JSON.
    pub position: String,
    /// Wall clock of the node that saved it (ms since the epoch).
    pub saved_at_ms: i64,
    /// Units done, if the task counts them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<u64>,
    /// Units in all, if the task knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// A checkpoint written to the task's newest row, which must be `attempt`,
/// still running, written with the same fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveCheckpoint {
    /// The task.
    pub key: TaskKey,
    /// The row's number.
    pub attempt: u32,
    /// What it saves.
    pub checkpoint: Checkpoint,
}

/// The end of a history row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishAttempt {
    /// The task.
    pub key: TaskKey,
    /// The row's number.
    pub attempt: u32,
    /// How it ended (not `Running`).
    pub state: AttemptState,
    /// The error text, for a failure.
    pub error: Option<String>,
    /// How long it ran, on the runner's monotonic clock.
    pub duration: Duration,
}

/// One row of a service's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The task.
    pub key: TaskKey,
    /// Its description.
    pub description: String,
    /// 1-based number among the task's rows.
    pub attempt: u32,
    /// Run, rollback or unlock.
    pub kind: AttemptKind,
    /// Its state.
    pub state: AttemptState,
    /// The fence it was written with.
    pub fence: u64,
    /// Who ran it.
    pub holder: Holder,
    /// Backend clock at start (ms since the epoch).
    pub started_at_ms: i64,
    /// Backend clock at the end, once finished.
    pub finished_at_ms: Option<i64>,
    /// Run time on the runner's clock, once finished.
    pub duration: Option<Duration>,
    /// Error text of a failure.
    pub error: Option<String>,
    /// The newest checkpoint of the row: the position its attempt reached.
    pub checkpoint: Option<Checkpoint>,
}
