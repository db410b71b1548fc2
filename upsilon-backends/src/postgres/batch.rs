//! Exactly-once batches: [`PostgresBackend::run_batches`].

use serde::de::DeserializeOwned;
use serde::Serialize;
use upsilon::backend::{
    fence_to_column, AttemptState, BackendError, Change, Columns, SaveCheckpoint, Snapshot,
};
use upsilon::{Batch, BatchDone, BatchError, Batched, Batches, BoxError, TaskContext, TaskKey};

use super::error::{driver, driver_in, timed_out};
use super::known::Known;
use super::pipeline::{first_error, int8, opt_text, pipeline, text, text_array, Stmt};
use super::pool::commit_and_reset;
use super::store::{bound, snapshot_of};
use super::{get, PostgresBackend};

impl PostgresBackend {
    /// Runs a batch loop set up on the task's context
    /// ([`TaskContext::batches`]) with each batch in one transaction of this
    /// database: `batch` does the batch's writes through the transaction it
    /// gets, and the batch's checkpoint is written in the same transaction,
    /// which checks the context's fence under the state row's lock before it
    /// commits. Each batch then takes effect exactly once: either its writes
    /// and its checkpoint commit together, or neither does (a node that lost
    /// its lease commits nothing), and the next attempt resumes after the
    /// last batch that committed, even when a commit's reply was lost.
    ///
    /// The tables `batch` writes must be in this database (any schema).
    /// Like [`PostgresBackend::complete_with`], the connection's session is
    /// reset (`DISCARD ALL`) after each batch. `batch` is called once per
    /// batch on a clone of itself, as in [`Batches::run`].
    ///
    /// ```no_run
    /// use upsilon::{BatchDone, BoxError, TaskContext};
    /// use upsilon_backends::postgres::PostgresBackend;
    ///
    /// #[upsilon::task(version = "1.2", order = 1)]
    /// async fn fill_currency(ctx: &mut TaskContext) -> Result<(), BoxError> {
    ///     let pg = ctx.resource::<PostgresBackend>()?;
    ///     pg.run_batches(ctx.batches::<i64>().size(500), async |tx, batch| {
    ///         let row = tx
    ///             .query_one(
    ///                 "WITH b AS (UPDATE accounts SET currency = 'EUR'
    ///                     WHERE id IN (SELECT id FROM accounts WHERE id > $1
    ///                                  ORDER BY id LIMIT $2) RETURNING id)
    ///                  SELECT max(id), count(*) FROM b",
    ///                 &[&batch.after.unwrap_or(0), &(batch.size as i64)],
    ///             )
    ///             .await?;
    ///         let (last, rows): (Option<i64>, i64) = (row.get(0), row.get(1));
    ///         Ok(match last {
    ///             Some(last) => BatchDone::next(last, rows as u64),
    ///             None => BatchDone::end(),
    ///         })
    ///     })
    ///     .await?;
    ///     Ok(())
    /// }
    /// ```
    pub async fn run_batches<K, F>(
        &self,
        batches: Batches<'_, K>,
        batch: F,
    ) -> Result<Batched<K>, BatchError>
    where
        K: Serialize + DeserializeOwned + Clone,
        F: AsyncFnOnce(
                &tokio_postgres::Transaction<'_>,
                &Batch<K>,
            ) -> Result<BatchDone<K>, BoxError>
            + Clone,
    {
        let ctx = batches.context();
        let batch = &batch;
        batches
            .run_committing(async move |b: Batch<K>| {
                self.one_batch(ctx, &b, batch.clone())
                    .await
                    .map_err(|e| e.into_box())
            })
            .await
    }

    async fn one_batch<K, F>(
        &self,
        ctx: &TaskContext,
        b: &Batch<K>,
        work: F,
    ) -> Result<(BatchDone<K>, Option<upsilon::backend::Checkpoint>), OneError>
    where
        K: Serialize,
        F: AsyncFnOnce(
            &tokio_postgres::Transaction<'_>,
            &Batch<K>,
        ) -> Result<BatchDone<K>, BoxError>,
    {
        let sql = &self.inner.sql;
        let service = ctx.service();
        let fence = ctx.fence();
        let info = ctx.task();
        let key = TaskKey {
            version: info.version.clone(),
            id: info.id.clone(),
        };
        let attempt = info.attempt;
        let read = || {
            Stmt::Typed(
                &sql.snapshot_of_tasks,
                vec![
                    text(service),
                    text_array(vec![key.version.to_string()]),
                    text_array(vec![key.id.clone()]),
                ],
            )
        };
        // Before the work: is the attempt still ours? What this handle knows
        // of the store (its own last write) says so without a read; it is
        // taken for the batch, and checked again under the lock. Otherwise
        // the store is read (and a database of the previous layout gains
        // its columns here).
        let only = std::collections::BTreeSet::from([&key]);
        let known = self
            .inner
            .known
            .take(service, fence)
            .filter(|k| still_ours(&k.snapshot, fence, &key, attempt).is_ok());
        if known.is_none() {
            still_ours(
                &self.read_snapshot(service, Some(&only)).await?,
                fence,
                &key,
                attempt,
            )?;
        }
        let timeout = self.inner.options.op_timeout;
        let mut conn = self.conn().await?;
        let tx = tokio::time::timeout(timeout, conn.client_mut().transaction())
            .await
            .map_err(|_| timed_out("beginning a transaction", timeout))?
            .map_err(driver)?;

        let done = work(&tx, b).await.map_err(OneError::Batch)?;
        let checkpoint = b.checkpoint(&done).map_err(OneError::Batch)?;

        // Lock the state row only now, so that renewals are not held up
        // while the work runs; then check again and write the checkpoint.
        let context = format!("recording batch {} of task {key}", b.number);
        let commit = async {
            let c = tx.client();
            if let (Some(known), Some(cp)) = (known, &checkpoint) {
                let change = SaveCheckpoint {
                    key: key.clone(),
                    attempt,
                    checkpoint: cp.clone(),
                };
                if let Some(known) = self
                    .checkpoint_known(c, service, fence, change, known, &context)
                    .await?
                {
                    return Ok::<Option<Known>, BackendError>(Some(known));
                }
            }
            let lock = [
                // Whatever the work set, the checkpoint is durable.
                Stmt::Simple("SET LOCAL synchronous_commit = on"),
                Stmt::Typed(&sql.lock_row, vec![text(service)]),
                read(),
            ];
            let rows = first_error(pipeline(c, &lock).await).map_err(|e| driver_in(e, &context))?;
            let mut snap = snapshot_of(&rows[2])?;
            still_ours(&snap, fence, &key, attempt)?;
            if let Some(cp) = &checkpoint {
                let change = [Change::Checkpoint(SaveCheckpoint {
                    key: key.clone(),
                    attempt,
                    checkpoint: cp.clone(),
                })];
                if !snap.check(fence, &change)?.is_empty() {
                    let stmts = [
                        Stmt::Typed(
                            &sql.checkpoint,
                            bound(service, Columns::of(fence, &change[0])?),
                        ),
                        Stmt::Typed(&sql.bump_revision, vec![text(service)]),
                    ];
                    first_error(pipeline(c, &stmts).await).map_err(|e| driver_in(e, &context))?;
                    // What this handle knew of the store is out of date.
                    self.inner.known.forget(service);
                }
            }
            Ok(None)
        };
        let known = tokio::time::timeout(timeout, commit)
            .await
            .map_err(|_| timed_out("recording the batch", timeout))??;
        let reset = commit_and_reset(tx, timeout, &context).await?;
        if let Some(known) = known {
            self.inner.known.put(service, fence, known);
        }
        if reset {
            conn.reset_done();
        }
        Ok((done, checkpoint))
    }
}

impl PostgresBackend {
    /// Writes the checkpoint `change` of a batch in its open transaction
    /// with one statement, checked against `known` (what this handle's last
    /// write left in the store) and guarded as a one-round-trip store write
    /// is (`Sql::guarded_checkpoint`). Returns what the store holds once
    /// the transaction commits, or `None` when `known` refuses the change or
    /// the guard finds that someone else wrote since: nothing was written,
    /// and the transaction goes on to lock, read and check.
    async fn checkpoint_known(
        &self,
        c: &tokio_postgres::Client,
        service: &str,
        fence: u64,
        save: SaveCheckpoint,
        mut known: Known,
        context: &str,
    ) -> Result<Option<Known>, BackendError> {
        let sql = &self.inner.sql;
        let only = std::collections::BTreeSet::from([&save.key]);
        let mut part = known.snapshot.subset(Some(&only));
        let change = [Change::Checkpoint(save.clone())];
        match part.check(fence, &change) {
            Ok(todo) if !todo.is_empty() => {}
            _ => return Ok(None),
        }
        let mut params = bound(service, Columns::of(fence, &change[0])?);
        params.extend([
            int8(fence_to_column(fence)?),
            text(super::FORMAT.to_string()),
            opt_text(known.snapshot.data_version.as_ref().map(|v| v.to_string())),
            opt_text(known.snapshot.baseline.as_ref().map(|v| v.to_string())),
            text(known.revision.clone()),
        ]);
        let stmts = [
            // Whatever the work set, the checkpoint is durable.
            Stmt::Simple("SET LOCAL synchronous_commit = on"),
            Stmt::Typed(&sql.guarded_checkpoint, params),
        ];
        let rows = first_error(pipeline(c, &stmts).await).map_err(|e| driver_in(e, context))?;
        let row = rows[1]
            .first()
            .ok_or_else(|| BackendError::corrupt("the checkpoint's write returned no row"))?;
        let Some(revision) = get::<Option<String>>(row, 0, "the store revision")? else {
            return Ok(None);
        };
        if get::<i64>(row, 1, "the checkpoints written")? != 1 {
            return Err(BackendError::corrupt(
                "the store revision matched, but the task's row was not there for its checkpoint",
            ));
        }
        known.snapshot.absorb(part);
        Ok(Some(Known {
            revision,
            snapshot: known.snapshot,
        }))
    }
}

/// Why one batch did not commit.
enum OneError {
    Batch(BoxError),
    Store(BackendError),
}

impl From<BackendError> for OneError {
    fn from(e: BackendError) -> OneError {
        OneError::Store(e)
    }
}

impl OneError {
    fn into_box(self) -> BoxError {
        match self {
            OneError::Batch(e) => e,
            OneError::Store(e) => Box::new(e),
        }
    }
}

/// Refuses the batch unless the task's newest row is `attempt`, running,
/// written with `fence`, and `fence` is the store's newest.
fn still_ours(
    snap: &Snapshot,
    fence: u64,
    key: &TaskKey,
    attempt: u32,
) -> Result<(), BackendError> {
    if fence < snap.fence {
        return Err(BackendError::StaleFence {
            presented: fence,
            current: snap.fence,
        });
    }
    match snap.tasks.get(key).map(|t| &t.last) {
        Some(l) if l.attempt == attempt && l.fence == fence && l.state == AttemptState::Running => {
            Ok(())
        }
        Some(l) => Err(BackendError::Rejected(format!(
            "task {key}: attempt {attempt} with fence {fence} may not run a batch: the task's newest row is attempt {} with fence {}, {}",
            l.attempt,
            l.fence,
            l.state.as_str()
        ))),
        None => Err(BackendError::Rejected(format!(
            "task {key} has no attempt {attempt} to run a batch for"
        ))),
    }
}
