//! Exactly-once task writes: [`PostgresBackend::complete_with`].

use std::time::Duration;

use upsilon::backend::{AttemptState, BackendError, Change, Columns, FinishAttempt, Snapshot};
use upsilon::{TaskContext, TaskKey};

use super::error::{driver, driver_in, timed_out};
use super::known::Known;
use super::pipeline::{first_error, pipeline, text, Stmt};
use super::pool::commit_and_reset;
use super::store::{bound, revision_of, snapshot_of};
use super::PostgresBackend;

impl PostgresBackend {
    /// Runs `work` in one transaction with the completion record of the task
    /// that `ctx` belongs to, so that the task's own writes commit exactly
    /// once: either both commit, or neither (the task then runs again).
    ///
    /// The transaction checks that `ctx`'s fence is still the store's newest
    /// before `work` runs and again, under the state row's lock, before it
    /// commits; a node that lost its lease commits nothing. `work` gets the
    /// open transaction; do every write that must happen once through it.
    ///
    /// The runner's own completion record that follows is then found already
    /// written and skipped. Return `Ok` from the task right after this call:
    /// the task is recorded completed once this returns `Ok`.
    ///
    /// It runs `work` only while the attempt is running: a second call for
    /// an attempt that completed (a retry after the reply to the commit was
    /// lost, say) is refused with [`BackendError::Rejected`] and runs
    /// nothing. The connection goes back to the pool with its session reset
    /// (`DISCARD ALL`), so nothing `work` set (`SET synchronous_commit`,
    /// `SET ROLE`, ...) reaches Upsilon's own statements; the completion
    /// itself commits with `synchronous_commit = on` whatever `work` set.
    ///
    /// ```no_run
    /// use upsilon_backends::postgres::PostgresBackend;
    ///
    /// #[upsilon::task(version = "1.1", order = 1)]
    /// async fn add_currency(ctx: &mut upsilon::TaskContext) -> Result<(), upsilon::BoxError> {
    ///     let pg = ctx.resource::<PostgresBackend>()?;
    ///     pg.complete_with(ctx, async |tx| {
    ///         tx.batch_execute("ALTER TABLE accounts ADD COLUMN currency text").await?;
    ///         tx.execute("UPDATE accounts SET currency = 'EUR'", &[]).await?;
    ///         Ok::<_, upsilon::BoxError>(())
    ///     })
    ///     .await
    /// }
    /// ```
    pub async fn complete_with<T, E, F>(&self, ctx: &TaskContext, work: F) -> Result<T, E>
    where
        F: AsyncFnOnce(&tokio_postgres::Transaction<'_>) -> Result<T, E>,
        E: From<BackendError>,
    {
        let sql = &self.inner.sql;
        let service = ctx.service();
        let fence = ctx.fence();
        let info = ctx.task();
        let key = TaskKey {
            version: info.version.clone(),
            id: info.id.clone(),
        };
        let finish = [Change::Finish(FinishAttempt {
            key: key.clone(),
            attempt: info.attempt,
            state: AttemptState::Completed,
            error: None,
            duration: Duration::ZERO,
        })];
        // The completion's own duration is the server's, from the row's
        // start: the statement binds the service, version, task id, attempt
        // and state ($1 to $5), not the runner's duration and error.
        let mut params = bound(service, Columns::of(fence, &finish[0])?);
        params.truncate(5);
        let finish_now = Stmt::Typed(&sql.finish_now, params);
        // Before the work: is this attempt still ours to finish? (A database
        // of the previous layout gains its columns here.)
        let snap = self.read_snapshot(service, None).await?;
        still_running(&mut snap.clone(), fence, &finish, &key, info.attempt)?;
        let mut conn = self.conn().await?;
        let timeout = self.inner.options.op_timeout;
        let tx = tokio::time::timeout(timeout, conn.client_mut().transaction())
            .await
            .map_err(|_| timed_out("beginning a transaction", timeout))?
            .map_err(driver)?;

        let value = work(&tx).await?;

        // Lock the state row only now, so that renewals are not held up
        // while the work runs; then check again and record the completion.
        let context = format!("recording the completion of task {key}");
        let commit = async {
            let c = tx.client();
            let read = [
                // Whatever the work set, Upsilon's completion is durable.
                Stmt::Simple("SET LOCAL synchronous_commit = on"),
                Stmt::Typed(&sql.lock_row, vec![text(service)]),
                Stmt::Typed(&sql.snapshot, vec![text(service)]),
            ];
            let rows = first_error(pipeline(c, &read).await).map_err(|e| driver_in(e, &context))?;
            let mut snap = snapshot_of(&rows[2])?;
            still_running(&mut snap, fence, &finish, &key, info.attempt)?;
            let write = [
                finish_now,
                Stmt::Typed(&sql.bump_revision, vec![text(service)]),
            ];
            let rows =
                first_error(pipeline(c, &write).await).map_err(|e| driver_in(e, &context))?;
            let revision = revision_of(&rows[1], 0)?;
            Ok::<Known, BackendError>(Known {
                revision,
                snapshot: snap,
            })
        };
        let known = tokio::time::timeout(timeout, commit)
            .await
            .map_err(|_| timed_out("recording the completion", timeout))??;
        let reset = commit_and_reset(tx, timeout, &context).await?;
        // The whole snapshot was read under the lock: the runner's write
        // that follows takes one round trip.
        self.inner.known.put(service, fence, known);
        if reset {
            conn.reset_done();
        }
        Ok(value)
    }
}

/// Refuses the completion unless the attempt is still running with `fence`:
/// a completed attempt's work is never run, or committed, again, not even
/// by a retry after the reply to its commit was lost.
fn still_running(
    snap: &mut Snapshot,
    fence: u64,
    finish: &[Change],
    key: &TaskKey,
    attempt: u32,
) -> Result<(), BackendError> {
    if snap.check(fence, finish)?.is_empty() {
        return Err(BackendError::Rejected(format!(
            "task {key}: attempt {attempt} is already completed; complete_with does not run its work again"
        )));
    }
    Ok(())
}
