//! Checkpoints: how far a running task got, saved in the store with the
//! lease's fence, read back by the task's next attempt of the same kind.
//!
//! The runner carries a row's checkpoint into the task's next row of the same
//! kind (`StartAttempt::checkpoint`), so the context reads the position from
//! the snapshot it already has, and each save goes to the store as one fenced
//! [`Change::Checkpoint`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backend::{BackendError, Change, Checkpoint, SaveCheckpoint, Store};
use crate::error::LeaseLoss;
use crate::ids::TaskKey;
use crate::status::Status;
use crate::util::jitter;

/// What [`TaskContext::checkpoint`](crate::TaskContext::checkpoint) and
/// [`TaskContext::save_checkpoint`](crate::TaskContext::save_checkpoint) report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The stored position does not read as the type the task asked for: the
    /// task's position type changed in a way the stored JSON does not fit.
    #[error("task {task}: the checkpoint that attempt {attempt} resumes from (saved at {saved_at_ms} ms since the epoch) does not read as `{type_name}`: {source}; keep the position's type able to read what earlier releases saved (add fields with `#[serde(default)]`), or give the task a new id to start over from nothing")]
    Incompatible {
        /// The task.
        task: TaskKey,
        /// The attempt that tried to resume.
        attempt: u32,
        /// When the position was saved.
        saved_at_ms: i64,
        /// The type asked for.
        type_name: &'static str,
        /// Why it does not read.
        #[source]
        source: serde_json::Error,
    },
    /// The position does not serialise to JSON.
    #[error("task {task}: the checkpoint's position does not serialise to JSON: {source}")]
    Unserialisable {
        /// The task.
        task: TaskKey,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The store refused the checkpoint: another node took the lease over
    /// (a stale fence), the lease is gone, or the attempt is no longer
    /// running. Return this error from the task: its attempt is over.
    #[error("task {task}: the store refused the checkpoint of attempt {attempt}: {source}; the attempt is over, return this error from the task")]
    Refused {
        /// The task.
        task: TaskKey,
        /// The attempt.
        attempt: u32,
        /// The store's answer.
        #[source]
        source: BackendError,
    },
    /// The store could not be reached, after the runner's retries.
    #[error("task {task}: saving the checkpoint of attempt {attempt} failed: {source}")]
    Backend {
        /// The task.
        task: TaskKey,
        /// The attempt.
        attempt: u32,
        /// The last error.
        #[source]
        source: BackendError,
    },
}

impl CheckpointError {
    /// Whether the store refused the checkpoint because this node no longer
    /// holds the lease (or the attempt is over).
    pub fn is_refused(&self) -> bool {
        matches!(self, CheckpointError::Refused { .. })
    }
}

/// Where a context saves its checkpoints.
pub(crate) struct Saver {
    pub(crate) store: Arc<dyn Store>,
    /// How many times a transient error is tried (the runner's setting).
    pub(crate) attempts: u32,
    /// Marks the lease lost when the store says another node has it.
    pub(crate) lose: Arc<dyn Fn(LeaseLoss) + Send + Sync>,
}

/// A context's checkpoint: the one it resumed from, then the newest saved.
pub(crate) struct Checkpoints {
    pub(crate) key: TaskKey,
    pub(crate) attempt: u32,
    pub(crate) fence: u64,
    pub(crate) service: Arc<str>,
    /// `None` in a test context: saves are kept here only.
    pub(crate) saver: Option<Saver>,
    /// Shared with the runner, which carries it into the next attempt.
    pub(crate) current: Arc<Mutex<Option<Checkpoint>>>,
    /// Where a saved checkpoint is shown (`None` in a test context).
    pub(crate) status: Option<tokio::sync::watch::Sender<Status>>,
}

impl Checkpoints {
    pub(crate) fn current(&self) -> Option<Checkpoint> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn read<T: DeserializeOwned>(&self) -> Result<Option<T>, CheckpointError> {
        let Some(c) = self.current() else {
            return Ok(None);
        };
        serde_json::from_str(&c.position)
            .map(Some)
            .map_err(|source| CheckpointError::Incompatible {
                task: self.key.clone(),
                attempt: self.attempt,
                saved_at_ms: c.saved_at_ms,
                type_name: std::any::type_name::<T>(),
                source,
            })
    }

    pub(crate) async fn save<T: Serialize + ?Sized>(
        &self,
        position: &T,
        done: Option<u64>,
        total: Option<u64>,
    ) -> Result<(), CheckpointError> {
        let position =
            serde_json::to_string(position).map_err(|source| CheckpointError::Unserialisable {
                task: self.key.clone(),
                source,
            })?;
        self.save_prepared(Checkpoint {
            position,
            saved_at_ms: wall_ms(),
            done,
            total,
        })
        .await
    }

    /// Saves a checkpoint whose position is already JSON.
    pub(crate) async fn save_prepared(
        &self,
        checkpoint: Checkpoint,
    ) -> Result<(), CheckpointError> {
        if let Some(saver) = &self.saver {
            let change = [Change::Checkpoint(SaveCheckpoint {
                key: self.key.clone(),
                attempt: self.attempt,
                checkpoint: checkpoint.clone(),
            })];
            self.write(saver, &change).await?;
        }
        self.set_current(checkpoint);
        Ok(())
    }

    /// Keeps `checkpoint` as the newest, already in the store, and shows it
    /// in the status.
    pub(crate) fn set_current(&self, checkpoint: Checkpoint) {
        if let Some(status) = &self.status {
            status.send_modify(|s| {
                if let Status::Upgrading { checkpoint: c, .. } = s {
                    *c = Some(checkpoint.clone());
                }
            });
        }
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(checkpoint);
    }

    async fn write(&self, saver: &Saver, change: &[Change]) -> Result<(), CheckpointError> {
        const DURING: &str = "saving a checkpoint";
        let mut tries = 1;
        let error = loop {
            match saver.store.apply(&self.service, self.fence, change).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && tries < saver.attempts => {
                    let wait = jitter(Duration::from_millis(50) * 2u32.pow(tries.min(6)));
                    tracing::warn!(task = %self.key, error = %e, tries, ?wait,
                        "{DURING}: transient backend error, retrying");
                    tokio::time::sleep(wait).await;
                    tries += 1;
                }
                Err(e) => break e,
            }
        };
        let loss = match &error {
            BackendError::StaleFence { presented, current } => Some(LeaseLoss::StaleFence {
                during: DURING,
                presented: *presented,
                current: *current,
            }),
            BackendError::LeaseLost(detail) => Some(LeaseLoss::NotHeld {
                during: DURING,
                detail: detail.clone(),
            }),
            _ => None,
        };
        let refused = matches!(error, BackendError::Rejected(_));
        if let Some(loss) = loss {
            (saver.lose)(loss);
        } else if !refused {
            return Err(CheckpointError::Backend {
                task: self.key.clone(),
                attempt: self.attempt,
                source: error,
            });
        }
        Err(CheckpointError::Refused {
            task: self.key.clone(),
            attempt: self.attempt,
            source: error,
        })
    }
}

pub(crate) fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
