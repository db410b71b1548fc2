//! A history row's checkpoint as a store keeps it: the columns a backend
//! reads and writes, beside the others of [`super::kit`].

use crate::state::{BackendError, Checkpoint};

/// A row's checkpoint as a store keeps it: four nullable columns in a table
/// (the position's column null when there is none), or one optional field of
/// a serialised record (`#[serde(default)]`, so records written before
/// checkpoints existed still read).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointColumns {
    /// The position, as JSON text. Stored as written, never parsed by the
    /// store: a position that no longer reads is the task's error to report.
    pub position: String,
    /// Wall clock of the node that saved it (ms since the epoch).
    pub saved_ms: i64,
    /// Units done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<i64>,
    /// Units in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<i64>,
}

impl CheckpointColumns {
    /// The columns of a checkpoint.
    pub fn of(c: &Checkpoint) -> Result<CheckpointColumns, BackendError> {
        let count = |n: Option<u64>| {
            n.map(|n| {
                i64::try_from(n).map_err(|_| {
                    BackendError::Rejected(format!(
                        "a progress count of {n} does not fit a store column"
                    ))
                })
            })
            .transpose()
        };
        Ok(CheckpointColumns {
            position: c.position.clone(),
            saved_ms: c.saved_at_ms,
            done: count(c.done)?,
            total: count(c.total)?,
        })
    }

    /// From the four nullable columns of a table: `None` when the position's
    /// column is null.
    pub fn from_nullable(
        position: Option<String>,
        saved_ms: Option<i64>,
        done: Option<i64>,
        total: Option<i64>,
    ) -> Option<CheckpointColumns> {
        position.map(|position| CheckpointColumns {
            position,
            saved_ms: saved_ms.unwrap_or(0),
            done,
            total,
        })
    }

    /// The checkpoint these columns hold.
    pub fn decode(self) -> Result<Checkpoint, BackendError> {
        let count = |n: Option<i64>, what: &str| {
            n.map(|n| {
                u64::try_from(n).map_err(|_| {
                    BackendError::corrupt(format!("a checkpoint's {what} count is {n}"))
                })
            })
            .transpose()
        };
        Ok(Checkpoint {
            position: self.position,
            saved_at_ms: self.saved_ms,
            done: count(self.done, "done")?,
            total: count(self.total, "total")?,
        })
    }
}
