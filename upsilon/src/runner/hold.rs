//! Steps 3, 4 and 6 while this node holds the lease: claim the store,
//! re-read, run the plan with a fenced write after each task, record the data
//! version; the rollbacks after a failure.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lease::{Halt, Held, Keeper};
use super::task::{task_info, Ran};
use super::{Inner, Outcome};
use crate::backend::{
    AttemptKind, AttemptState, BackendError, Change, Checkpoint, FinishAttempt, Lease, Snapshot,
    StartAttempt,
};
use crate::error::{Error, LeaseLoss, OrNone, Report, TaskReport};
use crate::planner::{self, Plan};
use crate::registry::Task;
use crate::status::Status;

impl Inner {
    /// Steps 3-7 while holding `lease`. Releases on every path.
    pub(super) async fn hold(
        &self,
        lease: Lease,
        sent: Instant,
        before: Snapshot,
        stop: &CancellationToken,
    ) -> Result<Outcome, Error> {
        let mut report = Report {
            service: self.service.clone(),
            fence: lease.fence,
            ..Report::default()
        };
        let keeper = Keeper::start(self.lock.clone(), lease, sent, &self.config, stop.clone());
        let result = self.upgrade(keeper.held(), &mut report, before).await;
        self.release(keeper).await;
        match result {
            Ok(()) => {}
            Err(Failure::Lost(reason)) => {
                return Err(Error::LeaseLost {
                    reason,
                    report: Box::new(report),
                })
            }
            Err(Failure::Stopped) => {
                return Err(Error::Stopped {
                    report: Box::new(report),
                })
            }
            Err(Failure::Task) => {
                return Err(Error::TaskFailed {
                    report: Box::new(report),
                })
            }
            Err(Failure::Other(e)) => return Err(e),
        }
        if report.completed.is_empty() && report.baselined.is_none() && report.to == report.from {
            // Another node finished between our read and our grant: the
            // re-read under the lease found nothing to do.
            info!(fence = report.fence, data_version = %OrNone(report.to.as_ref()),
                "took the lease and found the data already at this version: another node \
                 finished first; nothing ran");
            return Ok(Outcome::FoundUpToDate {
                fence: report.fence,
                data_version: report.to,
            });
        }
        Ok(Outcome::Upgraded { report })
    }

    /// Steps 3, 4 and 6.
    async fn upgrade(
        &self,
        held: &Arc<Held>,
        report: &mut Report,
        before: Snapshot,
    ) -> Result<(), Failure> {
        let snapshot = self.claim(held, report.fence, before).await?;
        report.from = snapshot.data_version.clone();
        report.to = snapshot.data_version.clone();
        let mut work = Work {
            inner: self,
            held,
            fence: report.fence,
            snapshot,
            pending: Vec::new(),
            report,
        };
        work.baseline().await?;
        // Never plan from state read before the lease.
        let plan = self.plan(&work.snapshot);
        self.preflight(&work.snapshot, &plan)
            .map_err(Failure::Other)?;
        for i in 0..plan.steps.len() {
            let done = work.run_task(&plan, i).await?;
            work.report.completed.push(done);
            work.after_task(&plan, i).await?;
        }
        work.catch_up().await
    }

    /// Step 3: claims the store with the fence and re-reads everything.
    async fn claim(&self, held: &Held, fence: u64, before: Snapshot) -> Result<Snapshot, Failure> {
        if let Some(halt) = held.halt() {
            return Err(halt.into());
        }
        let snapshot = self
            .retry("claiming the store", || {
                self.store.claim(&self.service, fence)
            })
            .await
            .map_err(|e| lost_or(held, e))?;
        if self.config.skip_reread {
            return Ok(Snapshot { fence, ..before });
        }
        Ok(snapshot)
    }
}

/// One upgrade under the lease: the runner's mirror of the store, the writes
/// not yet sent, and the report so far.
struct Work<'a> {
    inner: &'a Inner,
    held: &'a Arc<Held>,
    fence: u64,
    snapshot: Snapshot,
    /// Changes that ride with the next write.
    pending: Vec<Change>,
    report: &'a mut Report,
}

impl Work<'_> {
    /// Records the builder's baseline in an empty store.
    async fn baseline(&mut self) -> Result<(), Failure> {
        let Some(b) = self.inner.config.baseline.clone() else {
            return Ok(());
        };
        if !self.snapshot.is_empty() {
            return Ok(());
        }
        self.write(vec![Change::Baseline(b.clone())]).await?;
        info!(version = %b, "baselined the empty store");
        self.report.baselined = Some(b);
        self.report.to = self.snapshot.data_version.clone();
        Ok(())
    }

    /// Step 4 for the plan's task `i`: attempts until one completes, the
    /// retry policy gives up, or the lease is lost.
    async fn run_task(&mut self, plan: &Plan, i: usize) -> Result<TaskReport, Failure> {
        let step = &plan.steps[i];
        let task = &step.task;
        let total = plan.steps.len();
        info!(task = %task.key(), reason = %step.reason, "task {} of {total}", i + 1);
        let mut failures = 0;
        loop {
            let attempt = self.start_attempt(task, AttemptKind::Run).await?;
            let resume = self.checkpoint_of(task);
            self.inner.status.send_replace(Status::Upgrading {
                task: task.id().to_owned(),
                version: task.version().clone(),
                index: i + 1,
                total,
                progress: None,
                checkpoint: resume.clone(),
            });
            let info = task_info(task, attempt, i + 1, total, false);
            let (ran, duration, newest) = self.inner.run_one(self.held, task, info, resume).await;
            self.keep_checkpoint(task, newest);
            let mut task_report = TaskReport {
                key: task.key().clone(),
                description: task.description().to_owned(),
                attempt,
                duration,
                error: None,
            };
            match ran {
                Ran::Ok => {
                    info!(task = %task.key(), attempt, ?duration, "task completed");
                    let done = finish(task, attempt, AttemptState::Completed, None, duration);
                    self.pending.push(done);
                    return Ok(task_report);
                }
                Ran::Cancelled(halt) => {
                    match &halt {
                        Halt::Lost(reason) => {
                            warn!(task = %task.key(), attempt, %reason, "task cancelled: the lease was lost")
                        }
                        Halt::Stopped => {
                            warn!(task = %task.key(), attempt, "task cancelled: the run was stopped")
                        }
                    }
                    return Err(self.cancelled(task, attempt, duration, halt).await);
                }
                Ran::Failed(message) => {
                    failures += 1;
                    crate::metrics::task_failed(&self.inner.service, task);
                    warn!(task = %task.key(), attempt, error = %message, ?duration, "task failed");
                    let failed = finish(
                        task,
                        attempt,
                        AttemptState::Failed,
                        Some(message.clone()),
                        duration,
                    );
                    self.write(vec![failed]).await?;
                    if failures >= self.inner.config.retry.max_attempts {
                        task_report.error = Some(message);
                        self.report.failed = Some(task_report);
                        if self.inner.config.rollback_on_failure {
                            self.roll_back(plan, i).await?;
                        }
                        return Err(Failure::Task);
                    }
                    self.back_off(task, failures).await;
                    self.reread_checkpoint(task).await?;
                }
            }
        }
    }

    /// Records the start of `task`'s next attempt, with whatever rides with
    /// it, and returns the attempt's number.
    async fn start_attempt(&mut self, task: &Task, kind: AttemptKind) -> Result<u32, Failure> {
        if let Some(halt) = self.held.halt() {
            // A completion waiting to ride with this start is still written:
            // the store takes it unless another node has claimed it since.
            let changes = std::mem::take(&mut self.pending);
            if !changes.is_empty() {
                let _ = self.write(changes).await;
            }
            return Err(halt.into());
        }
        let summary = self.snapshot.tasks.get(task.key());
        let attempt = summary.map_or(0, |s| s.rows) + 1;
        // The new row starts where the task's previous row of the same kind
        // got: a rollback never resumes from a run's position, nor a run
        // from a rollback's.
        let checkpoint = summary
            .filter(|s| s.last.kind == kind)
            .and_then(|s| s.checkpoint.clone());
        self.pending.push(Change::Start(StartAttempt {
            key: task.key().clone(),
            attempt,
            kind,
            description: task.description().to_owned(),
            holder: self.inner.holder.clone(),
            checkpoint,
        }));
        let changes = std::mem::take(&mut self.pending);
        self.write(changes).await?;
        Ok(attempt)
    }

    /// The checkpoint the task's newest row holds.
    fn checkpoint_of(&self, task: &Task) -> Option<Checkpoint> {
        self.snapshot
            .tasks
            .get(task.key())
            .and_then(|s| s.checkpoint.clone())
    }

    /// Before a retry: the checkpoint the store holds for the task's newest
    /// row. A checkpoint whose write failed may still have committed (a
    /// lost reply, or PostgreSQL's `run_batches` committing a batch with its
    /// checkpoint), so the retry starts from what the store says.
    async fn reread_checkpoint(&mut self, task: &Task) -> Result<(), Failure> {
        let (inner, key) = (self.inner, task.key());
        let stored = inner
            .retry("reading the store", || inner.store.load(&inner.service))
            .await
            .map_err(|e| lost_or(self.held, e))?;
        if let (Some(s), Some(mine)) = (stored.tasks.get(key), self.snapshot.tasks.get_mut(key)) {
            if s.last.attempt == mine.last.attempt && s.last.fence == self.fence {
                mine.checkpoint = s.checkpoint.clone();
            }
        }
        Ok(())
    }

    /// Keeps the checkpoint the task's attempt saved last in the mirror, for
    /// its next attempt to start from.
    fn keep_checkpoint(&mut self, task: &Task, newest: Option<Checkpoint>) {
        if let Some(s) = self.snapshot.tasks.get_mut(task.key()) {
            s.checkpoint = newest;
        }
    }

    /// Records a cancelled attempt, best effort: the store refuses it if
    /// another node took over.
    async fn cancelled(
        &mut self,
        task: &Task,
        attempt: u32,
        duration: Duration,
        halt: Halt,
    ) -> Failure {
        let why = match &halt {
            Halt::Lost(_) => None,
            Halt::Stopped => Some("stopped: the run was asked to stop".to_owned()),
        };
        self.pending.push(finish(
            task,
            attempt,
            AttemptState::Cancelled,
            why,
            duration,
        ));
        let changes = std::mem::take(&mut self.pending);
        let _ = self.write(changes).await;
        halt.into()
    }

    /// Waits out the retry policy's backoff, or until the lease is lost.
    async fn back_off(&self, task: &Task, failures: u32) {
        let wait = self.inner.config.retry.backoff(failures);
        info!(task = %task.key(), failed_attempts = failures, ?wait, "retrying the task");
        crate::metrics::task_retried(&self.inner.service, task);
        tokio::select! {
            biased;
            _ = tokio::time::sleep(wait) => {}
            _ = self.held.lost.cancelled() => {}
        }
    }

    /// After the plan's task `i` completed: a version's last completion is
    /// written at once, with the data version it reaches (step 6); any other
    /// rides with the next task's start, which follows without a pause.
    async fn after_task(&mut self, plan: &Plan, i: usize) -> Result<(), Failure> {
        let task = &plan.steps[i].task;
        let version_done = plan
            .steps
            .get(i + 1)
            .is_none_or(|next| next.task.version() != task.version());
        if !version_done {
            return Ok(());
        }
        let reached = planner::reached_version(
            &self.inner.registry,
            &self.snapshot,
            &self.inner.app,
            Some(task.key()),
        );
        if let Some(v) = reached {
            if self.snapshot.data_version.as_ref() != Some(&v) {
                self.pending.push(Change::DataVersion(v));
            }
        }
        let changes = std::mem::take(&mut self.pending);
        self.write(changes).await?;
        self.report.to = self.snapshot.data_version.clone();
        info!(data_version = %OrNone(self.report.to.as_ref()), "version complete");
        Ok(())
    }

    /// Records a data version that lags behind the completed tasks.
    async fn catch_up(&mut self) -> Result<(), Failure> {
        if let Some(v) = self.inner.lagging_version(&self.snapshot) {
            self.write(vec![Change::DataVersion(v)]).await?;
        }
        self.report.to = self.snapshot.data_version.clone();
        Ok(())
    }

    /// Runs rollbacks after the plan's task `failed` failed for good: the
    /// failed task first, then the completed tasks of its version, newest
    /// first. Stops at the first rollback that fails.
    async fn roll_back(&mut self, plan: &Plan, failed: usize) -> Result<(), Failure> {
        let version = plan.steps[failed].task.version();
        if self.snapshot.data_version.as_ref() >= Some(version) {
            // A task run out of order, at or below the data version: other
            // nodes may already serve that version, so nothing of it is
            // undone (the store would refuse it too).
            warn!(task = %plan.steps[failed].task.key(), data_version = %OrNone(self.snapshot.data_version.as_ref()),
                "not rolling back: the task's version is at or below the data version");
            return Ok(());
        }
        let mut undo: Vec<&Task> = vec![&plan.steps[failed].task];
        undo.extend(
            self.inner
                .registry
                .tasks()
                .iter()
                .rev()
                .filter(|t| t.version() == version && self.snapshot.is_completed(t.key())),
        );
        let total = undo.len();
        for (i, task) in undo.into_iter().enumerate() {
            if !task.has_rollback() {
                continue;
            }
            let undone = self.roll_back_one(task, i + 1, total).await?;
            let error = undone.error.clone();
            self.report.rolled_back.push(undone);
            if let Some(e) = error {
                error!(task = %task.key(), error = %e, "rollback failed; stopping the rollback");
                break;
            }
        }
        Ok(())
    }

    async fn roll_back_one(
        &mut self,
        task: &Task,
        index: usize,
        total: usize,
    ) -> Result<TaskReport, Failure> {
        let attempt = self.start_attempt(task, AttemptKind::Rollback).await?;
        let info = task_info(task, attempt, index, total, true);
        info!(task = %task.key(), "rolling back");
        let resume = self.checkpoint_of(task);
        let (ran, duration, newest) = self.inner.run_one(self.held, task, info, resume).await;
        self.keep_checkpoint(task, newest);
        let (state, error) = match ran {
            Ran::Ok => (AttemptState::Completed, None),
            Ran::Failed(e) => (AttemptState::Failed, Some(e)),
            Ran::Cancelled(halt) => {
                return Err(self.cancelled(task, attempt, duration, halt).await);
            }
        };
        self.write(vec![finish(task, attempt, state, error.clone(), duration)])
            .await?;
        Ok(TaskReport {
            key: task.key().clone(),
            description: task.description().to_owned(),
            attempt,
            duration,
            error,
        })
    }

    /// One fenced write. Checked against the local mirror first, so that a
    /// refusal is found before the round trip, then applied to the mirror.
    async fn write(&mut self, changes: Vec<Change>) -> Result<(), Failure> {
        if changes.is_empty() {
            return Ok(());
        }
        let (inner, fence) = (self.inner, self.fence);
        // Only the touched tasks are copied, so a write's cost does not grow
        // with the plan.
        let mut after = self.snapshot.subset(Change::touched(&changes).as_ref());
        after.check(fence, &changes).map_err(|e| {
            Failure::Other(Error::Backend {
                during: "checking a store write",
                source: e,
            })
        })?;
        let notice = inner.notice(fence, &self.snapshot, &after, &changes);
        inner
            .retry("writing to the store", || match &notice {
                Some(notice) => {
                    inner
                        .store
                        .apply_with_notice(&inner.service, fence, &changes, notice)
                }
                None => inner.store.apply(&inner.service, fence, &changes),
            })
            .await
            .map_err(|e| lost_or(self.held, e))?;
        self.snapshot.absorb(after);
        Ok(())
    }
}

/// A store error that says another node has the lease marks it lost.
fn lost_or(held: &Held, e: Error) -> Failure {
    let reason = match &e {
        Error::Backend {
            during,
            source: BackendError::StaleFence { presented, current },
        } => LeaseLoss::StaleFence {
            during,
            presented: *presented,
            current: *current,
        },
        Error::Backend {
            during,
            source: BackendError::LeaseLost(detail),
        } => LeaseLoss::NotHeld {
            during,
            detail: detail.clone(),
        },
        _ => return Failure::Other(e),
    };
    held.lose(reason.clone());
    Failure::Lost(reason)
}

fn finish(
    task: &Task,
    attempt: u32,
    state: AttemptState,
    error: Option<String>,
    duration: Duration,
) -> Change {
    Change::Finish(FinishAttempt {
        key: task.key().clone(),
        attempt,
        state,
        error,
        duration,
    })
}

/// Why the work under the lease stopped.
enum Failure {
    Lost(LeaseLoss),
    Stopped,
    Task,
    Other(Error),
}

impl From<Halt> for Failure {
    fn from(halt: Halt) -> Failure {
        match halt {
            Halt::Lost(reason) => Failure::Lost(reason),
            Halt::Stopped => Failure::Stopped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Acquire, Lock, Store};
    use crate::testing::MemoryBackend;
    use crate::{TaskContext, TaskFuture, Upsilon};

    fn noop(order: u32, id: &str) -> Task {
        Task::new("1.1", order, id, |_: &mut TaskContext| -> TaskFuture<'_> {
            Box::pin(async { Ok(()) })
        })
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_completion_pending_when_the_lease_is_lost_is_still_written() {
        let backend = MemoryBackend::new();
        let (t1, t2) = (noop(1, "t1"), noop(2, "t2"));
        let up = Upsilon::builder()
            .service("svc")
            .app_version("1.1")
            .backend(backend.clone())
            .tasks([t1.clone(), t2.clone()])
            .build()
            .unwrap();
        let inner = &up.inner;
        let ttl = inner.config.ttl;
        let Acquire::Granted(lease) = backend
            .try_acquire("svc", &inner.holder, ttl)
            .await
            .unwrap()
        else {
            panic!("the lease is free");
        };
        let snapshot = backend.claim("svc", lease.fence).await.unwrap();
        let keeper = Keeper::start(
            inner.lock.clone(),
            lease.clone(),
            Instant::now(),
            &inner.config,
            CancellationToken::new(),
        );
        let mut report = Report::default();
        let mut work = Work {
            inner,
            held: keeper.held(),
            fence: lease.fence,
            snapshot,
            pending: Vec::new(),
            report: &mut report,
        };
        let Ok(attempt) = work.start_attempt(&t1, AttemptKind::Run).await else {
            panic!("t1 starts");
        };
        // t1 completed; its completion rides with t2's start, but the lease
        // is lost first (no other node has claimed the store).
        let done = finish(&t1, attempt, AttemptState::Completed, None, Duration::ZERO);
        work.pending.push(done);
        keeper.held().lose(LeaseLoss::Deadline {
            ttl,
            margin: inner.config.margin,
        });
        let next = work.start_attempt(&t2, AttemptKind::Run).await;
        assert!(matches!(next, Err(Failure::Lost(_))));
        let history = backend.history("svc").await.unwrap();
        assert_eq!(history.len(), 1, "t2 was not started");
        assert_eq!(
            history[0].state,
            AttemptState::Completed,
            "t1 is not run again"
        );
    }
}
