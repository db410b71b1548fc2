//! The in-memory backend's store: the state and history of each service,
//! checked by [`Snapshot::check`] as every backend's are, and the holders'
//! notices.

use async_trait::async_trait;

use crate::backend::{AttemptState, BackendError, Change, HistoryEntry, Notice, Snapshot, Store};

use super::super::faults::Op;
use super::{lock, Commit, MemoryBackend};

#[async_trait]
impl Store for MemoryBackend {
    async fn load(&self, service: &str) -> Result<Snapshot, BackendError> {
        let lost_reply = self.fault(Op::Load).await?;
        let r = self.with_service(service, |s, _| {
            Self::readable(s)?;
            s.read = Some(Self::read_state(s));
            Ok(s.snapshot.clone())
        });
        Self::lose_reply(lost_reply, Op::Load, r).await
    }

    async fn claim(&self, service: &str, fence: u64) -> Result<Snapshot, BackendError> {
        let lost_reply = self.fault(Op::Claim).await?;
        let r = self.with_service(service, |s, _| {
            Self::readable(s)?;
            if self.fence_check_skipped() {
                s.snapshot.fence = s.snapshot.fence.max(fence);
            } else {
                s.snapshot.claim(fence)?;
            }
            s.fence_floor = s.fence_floor.max(fence);
            Ok(Snapshot {
                fence,
                ..s.snapshot.clone()
            })
        });
        Self::lose_reply(lost_reply, Op::Claim, r).await
    }

    async fn apply(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
    ) -> Result<(), BackendError> {
        self.write(service, fence, changes, None).await
    }

    async fn apply_with_notice(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
        notice: &Notice,
    ) -> Result<(), BackendError> {
        self.write(service, fence, changes, Some(notice)).await
    }

    fn notice(&self, service: &str) -> Option<Notice> {
        lock(&self.services).get(service)?.notice.clone()
    }

    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>, BackendError> {
        self.with_service(service, |s, _| {
            Self::readable(s)?;
            Ok(s.history.clone())
        })
    }

    async fn services(&self) -> Result<Vec<String>, BackendError> {
        // Reads create entries: list only those that hold something.
        Ok(lock(&self.services)
            .iter()
            .filter(|(_, s)| {
                s.granted > 0
                    || s.fence_floor > 0
                    || !s.history.is_empty()
                    || s.snapshot != Snapshot::default()
            })
            .map(|(name, _)| name.clone())
            .collect())
    }
}

impl MemoryBackend {
    /// [`Store::apply`], with `notice` kept once the write commits.
    async fn write(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
        notice: Option<&Notice>,
    ) -> Result<(), BackendError> {
        let lost_reply = self.fault(Op::Apply).await?;
        let r = self.with_service(service, |s, now| {
            Self::readable(s)?;
            let mut next = s.snapshot.clone();
            let newest = next.fence;
            if self.fence_check_skipped() {
                next.fence = fence;
            }
            let todo = next.check(fence, changes)?;
            next.fence = newest.max(fence);
            if !todo.is_empty() {
                lock(&self.commits).push(Commit {
                    service: service.to_owned(),
                    fence,
                    newest,
                    changes: todo.iter().map(|c| (*c).clone()).collect(),
                    after: next.clone(),
                });
            }
            for change in todo {
                match change {
                    Change::Start(a) => s.history.push(HistoryEntry {
                        key: a.key.clone(),
                        description: a.description.clone(),
                        attempt: a.attempt,
                        kind: a.kind,
                        state: AttemptState::Running,
                        fence,
                        holder: a.holder.clone(),
                        started_at_ms: now,
                        finished_at_ms: None,
                        duration: None,
                        error: None,
                        checkpoint: a.checkpoint.clone(),
                    }),
                    Change::Finish(f) => {
                        if let Some(row) = s
                            .history
                            .iter_mut()
                            .rev()
                            .find(|r| r.key == f.key && r.attempt == f.attempt)
                        {
                            row.state = f.state;
                            row.finished_at_ms = Some(now);
                            row.duration = Some(f.duration);
                            row.error = f.error.clone();
                        }
                    }
                    Change::Checkpoint(c) => {
                        if let Some(row) = s
                            .history
                            .iter_mut()
                            .rev()
                            .find(|r| r.key == c.key && r.attempt == c.attempt)
                        {
                            row.checkpoint = Some(c.checkpoint.clone());
                        }
                    }
                    Change::DataVersion(_) | Change::Baseline(_) => {}
                }
            }
            s.snapshot = next;
            if let Some(n) = notice {
                if s.notice.as_ref().is_none_or(|old| old.fence <= n.fence) {
                    s.notice = Some(n.clone());
                }
            }
            Ok(())
        });
        self.notify.notify_waiters();
        Self::lose_reply(lost_reply, Op::Apply, r).await
    }
}
