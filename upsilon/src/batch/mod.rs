//! Batched, paced, resumable loops over keys: [`TaskContext::batches`].
//!
//! ```no_run
//! use std::time::Duration;
//! # async fn copy_after(after: Option<i64>, n: u64) -> Result<Option<(i64, u64)>, upsilon::BoxError> { Ok(None) }
//! # async fn backfill(ctx: &mut upsilon::TaskContext) -> Result<(), upsilon::BoxError> {
//! ctx.batches::<i64>()
//!     .size(500)
//!     .pause(Duration::from_millis(50))
//!     .run(async |batch| {
//!         // Rows with keys after `batch.after`, at most `batch.size` of them.
//!         Ok(match copy_after(batch.after, batch.size).await? {
//!             Some((last, rows)) => upsilon::BatchDone::next(last, rows),
//!             None => upsilon::BatchDone::end(),
//!         })
//!     })
//!     .await?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::backend::Checkpoint;
use crate::checkpoint::CheckpointError;
use crate::context::TaskContext;
use crate::ids::{BoxError, TaskKey};

/// The checkpoint a batch loop saves after each batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPosition<K> {
    /// The last key done: the next batch starts after it.
    pub last: K,
    /// Rows done in all, over every attempt.
    pub rows: u64,
    /// Batches done in all, over every attempt.
    pub batches: u64,
}

/// One batch to do: the keys after `after` (from the first key when `None`),
/// at most `size` of them.
#[derive(Debug, Clone)]
pub struct Batch<K> {
    /// The last key the previous batch did; `None` for the very first batch.
    pub after: Option<K>,
    /// How many rows to take at most.
    pub size: u64,
    /// This batch's number, 1-based, counted over every attempt.
    pub number: u64,
    /// Rows done before this batch, over every attempt.
    pub rows_before: u64,
    total: Option<u64>,
}

impl<K: Serialize> Batch<K> {
    /// The checkpoint to save once this batch did `done`; `None` when
    /// `done` ends the loop. For a backend that commits the checkpoint in
    /// the batch's own transaction ([`Batches::run_committing`]).
    pub fn checkpoint(&self, done: &BatchDone<K>) -> Result<Option<Checkpoint>, BoxError> {
        let Some(last) = done.last.as_ref().filter(|_| done.rows > 0) else {
            return Ok(None);
        };
        let rows = self.rows_before + done.rows;
        let position = serde_json::to_string(&BatchPosition {
            last,
            rows,
            batches: self.number,
        })?;
        Ok(Some(Checkpoint {
            position,
            saved_at_ms: crate::checkpoint::wall_ms(),
            done: Some(rows),
            total: self.total,
        }))
    }
}

/// What a batch did: the last key it did and how many rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchDone<K> {
    /// The last key done; `None` ends the loop.
    pub last: Option<K>,
    /// Rows done; 0 ends the loop.
    pub rows: u64,
}

impl<K> BatchDone<K> {
    /// `rows` rows done, up to `last`: the loop goes on after it.
    pub fn next(last: K, rows: u64) -> BatchDone<K> {
        BatchDone {
            last: Some(last),
            rows,
        }
    }

    /// Nothing left: the loop ends.
    pub fn end() -> BatchDone<K> {
        BatchDone {
            last: None,
            rows: 0,
        }
    }
}

/// How a batch loop ended well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batched<K> {
    /// Where this attempt resumed from, if an earlier one saved a position.
    pub resumed_from: Option<BatchPosition<K>>,
    /// Batches this attempt did (the last, empty one not counted).
    pub batches: u64,
    /// Rows done in all, over every attempt.
    pub rows: u64,
}

/// Why a batch loop stopped early.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// The lease was lost or the run stopped: the loop stopped between
    /// batches; the next attempt resumes after the last one saved.
    #[error("task {task}: cancelled after batch {batch} ({rows} rows done); the next attempt resumes from there")]
    Cancelled {
        /// The task.
        task: TaskKey,
        /// The last batch done (0: none).
        batch: u64,
        /// Rows done in all.
        rows: u64,
    },
    /// A batch returned an error.
    #[error("task {task}: batch {batch} (keys after {after}) failed: {source}")]
    Failed {
        /// The task.
        task: TaskKey,
        /// The batch's number.
        batch: u64,
        /// The key it started after, as JSON (`null` for the first).
        after: String,
        /// The batch's error.
        #[source]
        source: BoxError,
    },
    /// The checkpoint could not be read or saved.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// A batch loop being set up: [`TaskContext::batches`].
#[must_use = "a batch loop does nothing until `run` is awaited"]
pub struct Batches<'c, K> {
    ctx: &'c TaskContext,
    size: u64,
    pause: Duration,
    rate: Option<u64>,
    total: Option<u64>,
    _keys: PhantomData<fn() -> K>,
}

impl<K> fmt::Debug for Batches<'_, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batches")
            .field("size", &self.size)
            .field("pause", &self.pause)
            .field("rate", &self.rate)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl<'c, K> Batches<'c, K>
where
    K: Serialize + DeserializeOwned + Clone,
{
    pub(crate) fn new(ctx: &'c TaskContext) -> Batches<'c, K> {
        Batches {
            ctx,
            size: 1000,
            pause: Duration::ZERO,
            rate: None,
            total: None,
            _keys: PhantomData,
        }
    }

    /// The task's context the loop runs in.
    pub fn context(&self) -> &'c TaskContext {
        self.ctx
    }

    /// Rows per batch at most (default 1000; at least 1).
    pub fn size(mut self, rows: u64) -> Self {
        self.size = rows.max(1);
        self
    }

    /// A pause after each batch (default none).
    pub fn pause(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }

    /// At most `rows_per_second` rows a second: after a batch of `n` rows,
    /// the next starts no sooner than `n / rows_per_second` seconds after
    /// it began (or after [`Batches::pause`], if that is longer).
    pub fn rate(mut self, rows_per_second: u64) -> Self {
        self.rate = Some(rows_per_second.max(1));
        self
    }

    /// The rows in all, if known: the progress reports `done` of `total`.
    pub fn total(mut self, rows: u64) -> Self {
        self.total = Some(rows);
        self
    }

    /// Runs `batch` for each batch until one returns [`BatchDone::end`] (or
    /// no rows), saving the checkpoint after each batch (the last key done,
    /// the rows done) and reporting progress. Resumes after the checkpoint
    /// an earlier attempt saved. Stops between batches once the context is
    /// cancelled.
    ///
    /// A batch that was done but whose checkpoint was not saved (the node
    /// died in between) is done again by the next attempt: make a batch's
    /// writes idempotent, or commit them with the checkpoint where the
    /// backend allows it (PostgreSQL's `PostgresBackend::batches`).
    ///
    /// `batch` is called once per batch, on a clone of itself: a closure
    /// that captures references (a pool, the context) is `Clone` as it is;
    /// keep state that must outlive a batch behind a reference (a `Mutex`,
    /// an atomic) or in the checkpoint.
    pub async fn run<F>(self, batch: F) -> Result<Batched<K>, BatchError>
    where
        F: AsyncFnOnce(Batch<K>) -> Result<BatchDone<K>, BoxError> + Clone,
    {
        self.drive(batch).await
    }

    /// [`Batches::run`] for a backend that commits each batch's checkpoint
    /// itself, in the batch's own transaction: `batch` does the batch, saves
    /// [`Batch::checkpoint`] with it, and returns what it did with the
    /// checkpoint it committed. The loop then only keeps that checkpoint for
    /// the task's next attempt.
    pub async fn run_committing<F>(self, batch: F) -> Result<Batched<K>, BatchError>
    where
        F: AsyncFnOnce(Batch<K>) -> Result<(BatchDone<K>, Option<Checkpoint>), BoxError> + Clone,
    {
        self.drive(batch).await
    }

    async fn drive<F, O>(self, step: F) -> Result<Batched<K>, BatchError>
    where
        F: AsyncFnOnce(Batch<K>) -> Result<O, BoxError> + Clone,
        O: StepOutput<K>,
    {
        let ctx = self.ctx;
        let key = ctx.checkpoints.key.clone();
        let resumed_from = ctx.checkpoint::<BatchPosition<K>>()?;
        if let Some(p) = &resumed_from {
            tracing::info!(task = %key, rows = p.rows, batches = p.batches,
                "resuming after the last batch saved");
        }
        let (mut after, mut rows, mut number) = match &resumed_from {
            Some(p) => (Some(p.last.clone()), p.rows, p.batches),
            None => (None, 0, 0),
        };
        let mut batches = 0;
        loop {
            if ctx.is_cancelled() {
                return Err(BatchError::Cancelled {
                    task: key,
                    batch: number,
                    rows,
                });
            }
            let started = Instant::now();
            let b = Batch {
                after: after.clone(),
                size: self.size,
                number: number + 1,
                rows_before: rows,
                total: self.total,
            };
            let failed = |source| BatchError::Failed {
                task: key.clone(),
                batch: number + 1,
                after: serde_json::to_string(&after).unwrap_or_default(),
                source,
            };
            let (done, committed) = match step.clone()(b.clone()).await {
                Ok(out) => out.split(),
                Err(source) => return Err(failed(source)),
            };
            match committed {
                // The backend committed it with the batch.
                Committed::Yes(Some(c)) => ctx.checkpoints.set_current(c),
                Committed::Yes(None) => {}
                Committed::No => {
                    if let Some(c) = b.checkpoint(&done).map_err(failed)? {
                        ctx.checkpoints.save_prepared(c).await?;
                    }
                }
            }
            let Some(last) = done.last.filter(|_| done.rows > 0) else {
                return Ok(Batched {
                    resumed_from,
                    batches,
                    rows,
                });
            };
            number += 1;
            batches += 1;
            rows += done.rows;
            after = Some(last);
            ctx.progress(
                rows,
                self.total.unwrap_or(0),
                format!("batch {number} done"),
            );
            let mut wait = self.pause;
            if let Some(rate) = self.rate {
                let paced = Duration::from_secs_f64(done.rows as f64 / rate as f64);
                wait = wait.max(paced.saturating_sub(started.elapsed()));
            }
            if !wait.is_zero() {
                tokio::select! {
                    biased;
                    _ = ctx.cancellation().cancelled() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// What one batch returns: what it did, and whether it committed the
/// checkpoint itself.
trait StepOutput<K> {
    fn split(self) -> (BatchDone<K>, Committed);
}

enum Committed {
    /// The loop saves the checkpoint.
    No,
    /// The batch committed this one (none: the batch ended the loop).
    Yes(Option<Checkpoint>),
}

impl<K> StepOutput<K> for BatchDone<K> {
    fn split(self) -> (BatchDone<K>, Committed) {
        (self, Committed::No)
    }
}

impl<K> StepOutput<K> for (BatchDone<K>, Option<Checkpoint>) {
    fn split(self) -> (BatchDone<K>, Committed) {
        (self.0, Committed::Yes(self.1))
    }
}

#[cfg(test)]
mod tests;
