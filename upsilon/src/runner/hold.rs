//! Steps 3, 4 and 6 while this node holds the lease: claim the store,
//! re-read, run the plan with a fenced write after each task, record the data
//! version; the rollbacks after a failure.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

use super::lease::{renew_loop, AbortOnDrop, Held, ReleaseGuard};
use super::task::Ran;
use super::{Inner, Outcome};
use crate::backend::{
    AttemptKind, AttemptState, BackendError, Change, FinishAttempt, Lease, Snapshot, StartAttempt,
};
use crate::context::TaskInfo;
use crate::error::{Error, Report, TaskReport};
use crate::planner::{self, Plan};
use crate::registry::Task;
use crate::status::Status;

impl Inner {
    /// Steps 3-7 while holding `lease`. Releases on every path.
    pub(super) async fn hold(&self, lease: Lease, before: Snapshot) -> Result<Outcome, Error> {
        let held = Arc::new(Held {
            lease: Mutex::new(lease.clone()),
            lost: CancellationToken::new(),
            reason: Mutex::new(None),
        });
        let renewer = AbortOnDrop(tokio::spawn(
            renew_loop(self.lock.clone(), held.clone(), self.config.clone())
                .instrument(info_span!("upsilon.renew", fence = lease.fence)),
        ));
        let mut guard = ReleaseGuard {
            lock: self.lock.clone(),
            held: held.clone(),
            armed: true,
        };
        let mut report = Report {
            service: self.service.clone(),
            fence: lease.fence,
            ..Report::default()
        };
        let result = self.upgrade(&held, &mut report, before).await;
        drop(renewer);
        guard.armed = false;
        let current = held.lease.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !held.lost.is_cancelled() {
            let released = self
                .retry("releasing the lease", || self.lock.release(&current))
                .instrument(info_span!("upsilon.release", fence = current.fence))
                .await;
            match released {
                Ok(()) => info!(fence = current.fence, "lease released"),
                Err(e) => {
                    warn!(error = %e, "releasing the lease failed; it expires within its TTL")
                }
            }
        }
        let result = result.map_err(|e| match e {
            Failure::Lost(reason) => Error::LeaseLost {
                reason,
                report: Box::new(report.clone()),
            },
            Failure::Task => Error::TaskFailed {
                report: Box::new(report.clone()),
            },
            Failure::Other(e) => e,
        });
        result?;
        if report.completed.is_empty() && report.baselined.is_none() && report.to == report.from {
            // Another node finished between our read and our grant: the
            // re-read under the lease found nothing to do.
            return Ok(Outcome::UpToDate {
                data_version: report.to,
            });
        }
        Ok(Outcome::Upgraded { report })
    }

    /// Steps 3, 4 and 6.
    async fn upgrade(
        &self,
        held: &Held,
        report: &mut Report,
        before: Snapshot,
    ) -> Result<(), Failure> {
        let fence = report.fence;
        let mut snapshot = self
            .retry("claiming the store", || {
                self.store.claim(&self.service, fence)
            })
            .await
            .map_err(|e| self.lost_or(held, e))?;
        if self.config.skip_reread {
            snapshot = Snapshot { fence, ..before };
        }
        report.from = snapshot.data_version.clone();
        report.to = snapshot.data_version.clone();
        if let Some(b) = self.config.baseline.clone().filter(|_| snapshot.is_empty()) {
            self.write(
                held,
                &mut snapshot,
                fence,
                vec![Change::Baseline(b.clone())],
            )
            .await?;
            info!(version = %b, "baselined the empty store");
            report.baselined = Some(b);
            report.to = snapshot.data_version.clone();
        }
        // Never plan from state read before the lease.
        let plan = self.plan(&snapshot);
        self.preflight(&snapshot, &plan).map_err(Failure::Other)?;
        let total = plan.steps.len();
        let mut pending: Vec<Change> = Vec::new();
        for (i, step) in plan.steps.iter().enumerate() {
            let task = &step.task;
            info!(task = %task.key(), reason = %step.reason, "task {} of {total}", i + 1);
            let mut failures = 0;
            let done = loop {
                if let Some(reason) = held.lost_reason() {
                    return Err(Failure::Lost(reason));
                }
                let attempt = snapshot.tasks.get(task.key()).map_or(0, |s| s.rows) + 1;
                pending.push(Change::Start(StartAttempt {
                    key: task.key().clone(),
                    attempt,
                    kind: AttemptKind::Run,
                    description: task.description().to_owned(),
                    holder: self.holder.clone(),
                }));
                self.write(held, &mut snapshot, fence, std::mem::take(&mut pending))
                    .await?;
                self.status.send_replace(Status::Upgrading {
                    task: task.id().to_owned(),
                    version: task.version().clone(),
                    index: i + 1,
                    total,
                    progress: None,
                });
                let info = TaskInfo {
                    id: task.id().to_owned(),
                    version: task.version().clone(),
                    description: task.description().to_owned(),
                    attempt,
                    index: i + 1,
                    total,
                    rollback: false,
                };
                let (ran, duration) = self.run_one(held, task, info, false).await;
                let mut task_report = TaskReport {
                    key: task.key().clone(),
                    description: task.description().to_owned(),
                    attempt,
                    duration,
                    error: None,
                };
                match ran {
                    Ran::Ok => {
                        info!(task = %task.key(), ?duration, "task completed");
                        pending.push(finish(
                            task,
                            attempt,
                            AttemptState::Completed,
                            None,
                            duration,
                        ));
                        break task_report;
                    }
                    Ran::Cancelled(reason) => {
                        warn!(task = %task.key(), %reason, "task cancelled: the lease was lost");
                        pending.push(finish(
                            task,
                            attempt,
                            AttemptState::Cancelled,
                            None,
                            duration,
                        ));
                        // Best effort: the store refuses it if another node took over.
                        let _ = self.write(held, &mut snapshot, fence, pending).await;
                        return Err(Failure::Lost(reason));
                    }
                    Ran::Failed(message) => {
                        failures += 1;
                        warn!(task = %task.key(), attempt, error = %message, ?duration, "task failed");
                        pending.push(finish(
                            task,
                            attempt,
                            AttemptState::Failed,
                            Some(message.clone()),
                            duration,
                        ));
                        self.write(held, &mut snapshot, fence, std::mem::take(&mut pending))
                            .await?;
                        if failures >= self.config.retry.max_attempts {
                            task_report.error = Some(message);
                            report.failed = Some(task_report);
                            if self.config.rollback_on_failure {
                                self.roll_back(held, &mut snapshot, &plan, i, report)
                                    .await?;
                            }
                            return Err(Failure::Task);
                        }
                        let wait = self.config.retry.backoff(failures);
                        info!(task = %task.key(), ?wait, "retrying the task");
                        tokio::select! {
                            biased;
                            _ = tokio::time::sleep(wait) => {}
                            _ = held.lost.cancelled() => {}
                        }
                    }
                }
            };
            report.completed.push(done);
            let version_done = plan
                .steps
                .get(i + 1)
                .is_none_or(|next| next.task.version() != task.version());
            if version_done {
                let reached = planner::reached_version(
                    &self.registry,
                    &snapshot,
                    &self.app,
                    Some(task.key()),
                );
                if let Some(v) = reached {
                    if snapshot.data_version.as_ref() != Some(&v) {
                        pending.push(Change::DataVersion(v));
                    }
                }
            }
            // A version's last completion is written at once, with the data
            // version it reaches; any other rides with the next task's start,
            // which follows without a pause.
            if version_done {
                self.write(held, &mut snapshot, fence, std::mem::take(&mut pending))
                    .await?;
                report.to = snapshot.data_version.clone();
                info!(data_version = ?report.to.as_ref().map(|v| v.to_string()), "version complete");
            }
        }
        if let Some(v) = self.lagging_version(&snapshot) {
            self.write(held, &mut snapshot, fence, vec![Change::DataVersion(v)])
                .await?;
        }
        report.to = snapshot.data_version.clone();
        Ok(())
    }

    /// Runs rollbacks after the task at `failed` failed for good: the failed
    /// task first, then the completed tasks of its version, newest first.
    async fn roll_back(
        &self,
        held: &Held,
        snapshot: &mut Snapshot,
        plan: &Plan,
        failed: usize,
        report: &mut Report,
    ) -> Result<(), Failure> {
        let version = plan.steps[failed].task.version().clone();
        let mut undo: Vec<&Task> = vec![&plan.steps[failed].task];
        undo.extend(
            self.registry
                .tasks()
                .iter()
                .rev()
                .filter(|t| t.version() == &version && snapshot.is_completed(t.key())),
        );
        let fence = report.fence;
        let total = undo.len();
        for (i, task) in undo.into_iter().enumerate() {
            if !task.has_rollback() {
                continue;
            }
            if let Some(reason) = held.lost_reason() {
                return Err(Failure::Lost(reason));
            }
            let attempt = snapshot.tasks.get(task.key()).map_or(0, |s| s.rows) + 1;
            self.write(
                held,
                snapshot,
                fence,
                vec![Change::Start(StartAttempt {
                    key: task.key().clone(),
                    attempt,
                    kind: AttemptKind::Rollback,
                    description: task.description().to_owned(),
                    holder: self.holder.clone(),
                })],
            )
            .await?;
            let info = TaskInfo {
                id: task.id().to_owned(),
                version: task.version().clone(),
                description: task.description().to_owned(),
                attempt,
                index: i + 1,
                total,
                rollback: true,
            };
            info!(task = %task.key(), "rolling back");
            let (ran, duration) = self.run_one(held, task, info, true).await;
            let (state, error) = match ran {
                Ran::Ok => (AttemptState::Completed, None),
                Ran::Failed(e) => (AttemptState::Failed, Some(e)),
                Ran::Cancelled(reason) => {
                    let change = finish(task, attempt, AttemptState::Cancelled, None, duration);
                    let _ = self.write(held, snapshot, fence, vec![change]).await;
                    return Err(Failure::Lost(reason));
                }
            };
            let change = finish(task, attempt, state, error.clone(), duration);
            self.write(held, snapshot, fence, vec![change]).await?;
            report.rolled_back.push(TaskReport {
                key: task.key().clone(),
                description: task.description().to_owned(),
                attempt,
                duration,
                error: error.clone(),
            });
            if let Some(e) = error {
                error!(task = %task.key(), error = %e, "rollback failed; stopping the rollback");
                break;
            }
        }
        Ok(())
    }

    /// One fenced write. Checked against the local mirror first, so that a
    /// refusal is found before the round trip, then applied to the mirror.
    async fn write(
        &self,
        held: &Held,
        snapshot: &mut Snapshot,
        fence: u64,
        changes: Vec<Change>,
    ) -> Result<(), Failure> {
        if changes.is_empty() {
            return Ok(());
        }
        // Only the touched tasks are copied, so a write's cost does not grow
        // with the plan.
        let mut after = snapshot.subset(Change::touched(&changes).as_ref());
        after.check(fence, &changes).map_err(|e| {
            Failure::Other(Error::Backend {
                during: "checking a store write",
                source: e,
            })
        })?;
        self.retry("writing to the store", || {
            self.store.apply(&self.service, fence, &changes)
        })
        .await
        .map_err(|e| self.lost_or(held, e))?;
        snapshot.absorb(after);
        Ok(())
    }

    fn lost_or(&self, held: &Held, e: Error) -> Failure {
        match e {
            Error::Backend {
                source: source @ (BackendError::StaleFence { .. } | BackendError::LeaseLost(_)),
                during,
            } => {
                let reason = format!("{during}: {source}");
                held.lose(reason.clone());
                Failure::Lost(reason)
            }
            other => Failure::Other(other),
        }
    }
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

enum Failure {
    Lost(String),
    Task,
    Other(Error),
}
