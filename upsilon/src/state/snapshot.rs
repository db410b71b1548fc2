//! What a node reads from the store, and the rules every write obeys.

use std::collections::{BTreeMap, BTreeSet};

use semver::Version;

use crate::ids::TaskKey;
use crate::state::{AttemptKind, AttemptState, BackendError, Change, Checkpoint};

/// What the store knows of one task: enough to plan and to check writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSummary {
    /// Number of history rows (attempts and rollbacks).
    pub rows: u32,
    /// A run completed and no rollback completed after it.
    pub completed: bool,
    /// The newest row.
    pub last: LastRow,
    /// The newest row's checkpoint: where the task's next attempt of the
    /// same kind resumes.
    pub checkpoint: Option<Checkpoint>,
}

/// The newest history row of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastRow {
    /// Its 1-based number among the task's rows.
    pub attempt: u32,
    /// Run, rollback or unlock.
    pub kind: AttemptKind,
    /// Its state.
    pub state: AttemptState,
    /// The fence it was written with.
    pub fence: u64,
}

/// Everything a node reads from the store: one round trip.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The data version; `None` for a store that never recorded one.
    pub data_version: Option<Version>,
    /// The version the store was baselined at, if it was.
    pub baseline: Option<Version>,
    /// The newest fence the store has seen.
    pub fence: u64,
    /// Per task that has any history.
    pub tasks: BTreeMap<TaskKey, TaskSummary>,
}

impl Snapshot {
    /// Whether the store has no data version, no baseline and no task
    /// history. Unlock rows ([`TaskKey::unlock`]) do not count: an operator
    /// freeing the lease leaves no data behind.
    pub fn is_empty(&self) -> bool {
        self.data_version.is_none()
            && self.baseline.is_none()
            && self.tasks.keys().all(TaskKey::is_unlock)
    }

    /// Folds one history row of `key` into the task summaries. Backends that
    /// keep rows call it for each row, oldest first, to build a snapshot.
    pub fn fold_row(&mut self, key: TaskKey, row: LastRow) {
        self.fold_row_checkpointed(key, row, None);
    }

    /// [`Snapshot::fold_row`] for a row with its checkpoint.
    pub fn fold_row_checkpointed(
        &mut self,
        key: TaskKey,
        row: LastRow,
        checkpoint: Option<Checkpoint>,
    ) {
        let entry = self.tasks.entry(key).or_insert(TaskSummary {
            rows: 0,
            completed: false,
            last: row.clone(),
            checkpoint: None,
        });
        entry.rows += 1;
        if row.state == AttemptState::Completed {
            entry.completed = row.kind == AttemptKind::Run;
        }
        entry.last = row;
        entry.checkpoint = checkpoint;
    }

    /// A copy with only the task summaries in `keys` (all of them for
    /// `None`): enough for [`Snapshot::check`] on changes that touch only
    /// those tasks (see [`Change::touched`]).
    pub fn subset(&self, keys: Option<&BTreeSet<&TaskKey>>) -> Snapshot {
        let Some(keys) = keys else {
            return self.clone();
        };
        Snapshot {
            data_version: self.data_version.clone(),
            baseline: self.baseline.clone(),
            fence: self.fence,
            tasks: keys
                .iter()
                .filter_map(|k| self.tasks.get_key_value(*k))
                .map(|(k, t)| (k.clone(), t.clone()))
                .collect(),
        }
    }

    /// Takes in a [`Snapshot::subset`] that was changed: its version, fence
    /// and task summaries replace this snapshot's.
    pub fn absorb(&mut self, part: Snapshot) {
        self.data_version = part.data_version;
        self.baseline = part.baseline;
        self.fence = part.fence;
        self.tasks.extend(part.tasks);
    }

    /// Whether `key` has a live completion.
    pub fn is_completed(&self, key: &TaskKey) -> bool {
        self.tasks.get(key).is_some_and(|t| t.completed)
    }

    /// Applies `changes` to this snapshot as a store would, after checking
    /// them. Returns the changes that still have to be written: a change the
    /// store already holds with the same fence (a retried write whose reply was
    /// lost) is dropped, so every write is idempotent.
    ///
    /// Backends call this inside their transaction, on the state read under
    /// lock, so that every backend refuses the same things:
    /// - a fence other than the newest (`StaleFence`, or `Rejected` for a fence
    ///   that was never claimed);
    /// - a second completion of a completed task (S3);
    /// - a data version below the current one (S4);
    /// - a baseline on a store that is not empty;
    /// - an unlock row anywhere but under [`TaskKey::unlock`], and any other
    ///   kind of row there;
    /// - a checkpoint for any row but the task's newest, running row of the
    ///   same fence, or whose position is not JSON.
    pub fn check<'c>(
        &mut self,
        fence: u64,
        changes: &'c [Change],
    ) -> Result<Vec<&'c Change>, BackendError> {
        if fence < self.fence {
            return Err(BackendError::StaleFence {
                presented: fence,
                current: self.fence,
            });
        }
        if fence > self.fence {
            return Err(BackendError::Rejected(format!(
                "fence {fence} was never claimed (the store's newest is {}); claim the store first",
                self.fence
            )));
        }
        let mut todo = Vec::new();
        for change in changes {
            if self.check_one(fence, change)? {
                todo.push(change);
            }
        }
        Ok(todo)
    }

    fn check_one(&mut self, fence: u64, change: &Change) -> Result<bool, BackendError> {
        match change {
            Change::Start(start) => {
                if start.key.is_unlock() != (start.kind == AttemptKind::Unlock) {
                    return Err(BackendError::Rejected(format!(
                        "a {} row cannot be recorded under {}: unlock rows, and only they, go under {}",
                        start.kind.as_str(),
                        start.key,
                        TaskKey::unlock()
                    )));
                }
                let summary = self.tasks.get(&start.key);
                let rows = summary.map_or(0, |s| s.rows);
                if let Some(s) = summary {
                    let l = &s.last;
                    if l.attempt == start.attempt
                        && l.fence == fence
                        && l.kind == start.kind
                        && l.state == AttemptState::Running
                    {
                        return Ok(false);
                    }
                    if start.kind == AttemptKind::Run && s.completed {
                        return Err(BackendError::Rejected(format!(
                            "task {} is already completed; it is not started again",
                            start.key
                        )));
                    }
                }
                if start.kind == AttemptKind::Rollback
                    && self.data_version.as_ref() >= Some(&start.key.version)
                {
                    return Err(BackendError::Rejected(format!(
                        "task {} is at or below the data version {}: other nodes may already serve that version, so it is not rolled back",
                        start.key,
                        self.data_version.as_ref().map_or("none".to_owned(), |v| v.to_string())
                    )));
                }
                if start.attempt != rows + 1 {
                    return Err(BackendError::Rejected(format!(
                        "task {}: attempt {} does not follow the {rows} recorded",
                        start.key, start.attempt
                    )));
                }
                let completed = summary.is_some_and(|s| s.completed);
                self.tasks.insert(
                    start.key.clone(),
                    TaskSummary {
                        rows: start.attempt,
                        completed,
                        last: LastRow {
                            attempt: start.attempt,
                            kind: start.kind,
                            state: AttemptState::Running,
                            fence,
                        },
                        checkpoint: start.checkpoint.clone(),
                    },
                );
                Ok(true)
            }
            Change::Checkpoint(save) => {
                let refuse = |why: String| {
                    Err(BackendError::Rejected(format!(
                        "task {}: the checkpoint of attempt {} is refused: {why}",
                        save.key, save.attempt
                    )))
                };
                let Some(s) = self.tasks.get_mut(&save.key) else {
                    return refuse("the task has no attempt".to_owned());
                };
                let l = &s.last;
                if l.attempt != save.attempt || l.fence != fence {
                    return refuse(format!(
                        "its newest row is attempt {} with fence {}, not attempt {} with fence {fence}",
                        l.attempt, l.fence, save.attempt
                    ));
                }
                if l.state != AttemptState::Running {
                    return refuse(format!("the attempt is already {}", l.state.as_str()));
                }
                if l.kind == AttemptKind::Unlock {
                    return refuse("an unlock row keeps no checkpoint".to_owned());
                }
                if let Err(e) =
                    serde_json::from_str::<serde::de::IgnoredAny>(&save.checkpoint.position)
                {
                    return refuse(format!("its position is not JSON ({e})"));
                }
                if s.checkpoint.as_ref() == Some(&save.checkpoint) {
                    return Ok(false);
                }
                s.checkpoint = Some(save.checkpoint.clone());
                Ok(true)
            }
            Change::Finish(finish) => {
                let Some(s) = self.tasks.get_mut(&finish.key) else {
                    return Err(BackendError::Rejected(format!(
                        "task {} has no attempt {} to finish",
                        finish.key, finish.attempt
                    )));
                };
                let l = &mut s.last;
                if l.attempt != finish.attempt || l.fence != fence {
                    return Err(BackendError::Rejected(format!(
                        "task {}: attempt {} with fence {fence} is not its newest row (that is attempt {} with fence {})",
                        finish.key, finish.attempt, l.attempt, l.fence
                    )));
                }
                if l.state == finish.state {
                    return Ok(false);
                }
                if l.state != AttemptState::Running {
                    return Err(BackendError::Rejected(format!(
                        "task {}: attempt {} is already {}",
                        finish.key,
                        finish.attempt,
                        l.state.as_str()
                    )));
                }
                if finish.state == AttemptState::Running {
                    return Err(BackendError::Rejected(format!(
                        "task {}: an attempt cannot finish as running",
                        finish.key
                    )));
                }
                l.state = finish.state;
                if finish.state == AttemptState::Completed {
                    s.completed = l.kind == AttemptKind::Run;
                }
                Ok(true)
            }
            Change::DataVersion(v) => match &self.data_version {
                Some(d) if d == v => Ok(false),
                Some(d) if d > v => Err(BackendError::Rejected(format!(
                    "data version {v} is below the recorded {d}; the data version never goes back"
                ))),
                _ => {
                    self.data_version = Some(v.clone());
                    Ok(true)
                }
            },
            Change::Baseline(v) => {
                if self.baseline.as_ref() == Some(v) && self.data_version.as_ref() == Some(v) {
                    return Ok(false);
                }
                if !self.is_empty() {
                    return Err(BackendError::Rejected(format!(
                        "the store is not empty (data version {}, {} tasks in history); only an empty store can be baselined",
                        self.data_version
                            .as_ref()
                            .map_or("none".to_owned(), |v| v.to_string()),
                        self.tasks.len()
                    )));
                }
                self.baseline = Some(v.clone());
                self.data_version = Some(v.clone());
                Ok(true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StartAttempt;
    use crate::testing::{holder, v};

    fn start(id: &str, version: &str, attempt: u32, kind: AttemptKind) -> Change {
        Change::Start(StartAttempt {
            key: TaskKey {
                version: v(version),
                id: id.to_owned(),
            },
            attempt,
            kind,
            description: String::new(),
            holder: holder(1),
            checkpoint: None,
        })
    }

    #[test]
    fn a_task_at_or_below_the_data_version_is_never_rolled_back() {
        let mut snap = Snapshot {
            fence: 1,
            ..Snapshot::default()
        };
        snap.check(1, &[start("a", "1.1", 1, AttemptKind::Run)])
            .unwrap();
        snap.check(1, &[Change::DataVersion(v("1.1"))]).unwrap();
        let err = snap
            .check(1, &[start("a", "1.1", 2, AttemptKind::Rollback)])
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("at or below the data version 1.1.0"),
            "{err}"
        );
        // Above the data version, a rollback is taken.
        snap.check(1, &[start("b", "1.2", 1, AttemptKind::Run)])
            .unwrap();
        snap.check(1, &[start("b", "1.2", 2, AttemptKind::Rollback)])
            .unwrap();
    }

    #[test]
    fn unlock_rows_go_under_their_own_key_never_complete_and_leave_the_store_empty() {
        let mut snap = Snapshot {
            fence: 2,
            ..Snapshot::default()
        };
        let unlock = TaskKey::unlock();
        let row = |attempt| {
            Change::Start(StartAttempt {
                key: TaskKey::unlock(),
                attempt,
                kind: AttemptKind::Unlock,
                description: "forced release".into(),
                holder: holder(9),
                checkpoint: None,
            })
        };
        let finish = |attempt| {
            Change::Finish(crate::state::FinishAttempt {
                key: TaskKey::unlock(),
                attempt,
                state: AttemptState::Completed,
                error: None,
                duration: std::time::Duration::ZERO,
            })
        };
        snap.check(2, &[row(1), finish(1)]).unwrap();
        assert!(!snap.is_completed(&unlock));
        assert!(snap.is_empty(), "an unlock leaves no data: {snap:?}");
        snap.check(2, &[row(2)]).unwrap();
        // A replay of the same write is dropped, as for any row.
        assert!(snap.check(2, &[row(2)]).unwrap().is_empty());
        snap.check(2, &[finish(2)]).unwrap();
        assert!(snap.check(2, &[finish(2)]).unwrap().is_empty());
        assert_eq!(snap.tasks[&unlock].rows, 2);

        for bad in [
            start("a", "1.0", 1, AttemptKind::Unlock),
            Change::Start(StartAttempt {
                key: TaskKey::unlock(),
                attempt: 3,
                kind: AttemptKind::Run,
                description: String::new(),
                holder: holder(1),
                checkpoint: None,
            }),
        ] {
            let err = snap.check(2, &[bad]).unwrap_err();
            assert!(
                err.to_string()
                    .contains("only they, go under (unlock)@0.0.0"),
                "{err}"
            );
        }
        // Once empty of data, it still takes a baseline.
        snap.check(2, &[Change::Baseline(v("1.4"))]).unwrap();
        assert_eq!(snap.data_version, Some(v("1.4")));
    }
}
