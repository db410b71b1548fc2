//! The shapes `--json` prints, shared by the commands (docs/CLI.md documents
//! each field).

use serde::Serialize;
use upsilon::backend::{Checkpoint, HistoryEntry, LeaseInfo};
use upsilon::Holder;

use crate::text;

/// A lease holder.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HolderJson {
    /// Host name.
    pub(crate) host: String,
    /// Kubernetes pod name, when set.
    pub(crate) pod: Option<String>,
    /// Process id.
    pub(crate) pid: u32,
    /// The holder's per-run id.
    pub(crate) run_id: String,
    /// The holder as the human output shows it.
    pub(crate) display: String,
}

impl From<&Holder> for HolderJson {
    fn from(h: &Holder) -> HolderJson {
        HolderJson {
            host: h.host.clone(),
            pod: h.pod.clone(),
            pid: h.pid,
            run_id: h.run_id.clone(),
            display: h.to_string(),
        }
    }
}

/// A live lease.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LeaseJson {
    /// Who holds it.
    pub(crate) holder: HolderJson,
    /// Its fence.
    pub(crate) fence: u64,
    /// Its expiry, ms since the epoch on the backend's clock.
    pub(crate) expires_at_ms: i64,
    /// Time left when it was read, in ms.
    pub(crate) expires_in_ms: u64,
    /// When it was granted, if the backend records it.
    pub(crate) granted_at_ms: Option<i64>,
    /// How long it had been held when it was read, if the backend records
    /// when it was granted.
    pub(crate) held_for_ms: Option<u64>,
    /// The backend's clock when it was read.
    pub(crate) read_at_ms: i64,
}

impl From<&LeaseInfo> for LeaseJson {
    fn from(l: &LeaseInfo) -> LeaseJson {
        LeaseJson {
            holder: (&l.holder).into(),
            fence: l.fence,
            expires_at_ms: l.expires_at_ms,
            expires_in_ms: l.expires_in().as_millis() as u64,
            granted_at_ms: l.granted_at_ms,
            held_for_ms: l.held_for().map(|d| d.as_millis() as u64),
            read_at_ms: l.now_ms,
        }
    }
}

/// One history row.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RowJson {
    /// The service.
    pub(crate) service: String,
    /// The task's version (`0.0.0` for an unlock).
    pub(crate) version: String,
    /// The task's id (`(unlock)` for an unlock).
    pub(crate) task: String,
    /// 1-based number among the task's rows.
    pub(crate) attempt: u32,
    /// `run`, `rollback` or `unlock`.
    pub(crate) kind: &'static str,
    /// `running`, `completed`, `failed` or `cancelled`.
    pub(crate) state: &'static str,
    /// The fence it was written with.
    pub(crate) fence: u64,
    /// Who wrote it.
    pub(crate) holder: HolderJson,
    /// The task's description (for an unlock: what was freed).
    pub(crate) description: String,
    /// Start, ms since the epoch on the backend's clock.
    pub(crate) started_at_ms: i64,
    /// The start as RFC 3339 (UTC).
    pub(crate) started_at: String,
    /// End, once finished.
    pub(crate) finished_at_ms: Option<i64>,
    /// Run time on the runner's clock, once finished.
    pub(crate) duration_ms: Option<u64>,
    /// Error text of a failure.
    pub(crate) error: Option<String>,
    /// The row's newest checkpoint: the position its attempt reached.
    pub(crate) checkpoint: Option<CheckpointJson>,
}

/// A row's checkpoint.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CheckpointJson {
    /// The position as the task saved it: JSON, or the stored text as a
    /// string if it does not parse.
    pub(crate) position: serde_json::Value,
    /// When it was saved, ms since the epoch on the saving node's clock.
    pub(crate) saved_at_ms: i64,
    /// The same, as RFC 3339 (UTC).
    pub(crate) saved_at: String,
    /// Units done, if the task counts them.
    pub(crate) done: Option<u64>,
    /// Units in all, if known.
    pub(crate) total: Option<u64>,
}

impl From<&Checkpoint> for CheckpointJson {
    fn from(c: &Checkpoint) -> CheckpointJson {
        CheckpointJson {
            position: serde_json::from_str(&c.position)
                .unwrap_or_else(|_| serde_json::Value::String(c.position.clone())),
            saved_at_ms: c.saved_at_ms,
            saved_at: text::timestamp(c.saved_at_ms),
            done: c.done,
            total: c.total,
        }
    }
}

impl RowJson {
    /// The row `e` of `service`.
    pub(crate) fn new(service: &str, e: &HistoryEntry) -> RowJson {
        RowJson {
            service: service.to_owned(),
            version: e.key.version.to_string(),
            task: e.key.id.clone(),
            attempt: e.attempt,
            kind: e.kind.as_str(),
            state: e.state.as_str(),
            fence: e.fence,
            holder: (&e.holder).into(),
            description: e.description.clone(),
            started_at_ms: e.started_at_ms,
            started_at: text::timestamp(e.started_at_ms),
            finished_at_ms: e.finished_at_ms,
            duration_ms: e.duration.map(|d| d.as_millis() as u64),
            error: e.error.clone(),
            checkpoint: e.checkpoint.as_ref().map(CheckpointJson::from),
        }
    }
}

/// What `--json` prints when a command fails.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ErrorJson {
    /// The failure.
    pub(crate) error: ErrorBody,
}

/// The failure inside [`ErrorJson`].
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ErrorBody {
    /// `failed`, `usage`, `not_found`, `refused` or `unreachable`.
    pub(crate) kind: &'static str,
    /// The exit code.
    pub(crate) exit: u8,
    /// What happened.
    pub(crate) message: String,
}
