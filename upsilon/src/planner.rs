//! The planner: which registered tasks to run, in which order, and why.
//! No I/O: it works from a [`Snapshot`] the runner read.

use std::fmt;

use semver::Version;

use crate::ids::TaskKey;
use crate::registry::{Registry, Task};
use crate::state::{Snapshot, TaskSummary};

/// Why a task is in the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The store has no data version: every task up to the app version runs.
    FreshStore,
    /// data version < task version <= app version, and not completed.
    Pending,
    /// Its version is at or below the data version but the store never saw
    /// it (added out of order), and the builder opted in to running such tasks.
    OutOfOrder,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::FreshStore => "the store has no data version yet",
            Reason::Pending => "its version is above the data version and it is not completed",
            Reason::OutOfOrder => {
                "it is at or below the data version but was never run (added out of order)"
            }
        })
    }
}

/// One task of a plan.
#[derive(Debug, Clone)]
pub struct Step {
    /// The task.
    pub task: Task,
    /// Why it runs.
    pub reason: Reason,
}

/// What a node has to do, worked out from the store's state.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The tasks to run, in order (semver, then order, then id).
    pub steps: Vec<Step>,
    /// Tasks at or below the data version that the store never saw, left out
    /// because running them was not opted in to.
    pub out_of_order: Vec<Task>,
    /// The data version is above the app version.
    pub data_ahead: bool,
}

impl Plan {
    /// Nothing to run.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// Options the planner follows.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions {
    /// Run tasks added out of order (at or below the data version, never seen).
    pub run_out_of_order: bool,
}

/// Plans the registered tasks against the store's state.
///
/// A task is in the plan when its version is at most `app`, it is not
/// completed in the store, and either it is above the data version (or the
/// store has none) or it was added out of order and `run_out_of_order` is set.
/// Tasks at or below the store's baseline are taken as done.
pub fn plan(registry: &Registry, snapshot: &Snapshot, app: &Version, options: PlanOptions) -> Plan {
    let data = snapshot.data_version.as_ref();
    let summaries = summaries(registry, snapshot);
    let mut steps = Vec::new();
    let mut out_of_order = Vec::new();
    for (i, task) in registry.tasks().iter().enumerate() {
        let v = task.version();
        let summary = summaries.as_ref().and_then(|s| s[i]);
        if v > app || summary.is_some_and(|t| t.completed) {
            continue;
        }
        if snapshot.baseline.as_ref().is_some_and(|b| v <= b) {
            continue;
        }
        let reason = match data {
            None => Reason::FreshStore,
            Some(d) if v > d => Reason::Pending,
            Some(_) if summary.is_some() => {
                // Seen but not completed at or below the data version: it was
                // rolled back, or recorded under a data version that a
                // baseline set. Either way it is owed.
                Reason::OutOfOrder
            }
            Some(_) => {
                if !options.run_out_of_order {
                    out_of_order.push(task.clone());
                    continue;
                }
                Reason::OutOfOrder
            }
        };
        steps.push(Step {
            task: task.clone(),
            reason,
        });
    }
    Plan {
        steps,
        out_of_order,
        data_ahead: data.is_some_and(|d| d > app),
    }
}

/// The store's summary of each registered task, by position in the
/// registry; `None` for a store without task history. Both sides are walked
/// in key order, one seek into the store's summaries per version, rather
/// than one lookup per task.
fn summaries<'s>(
    registry: &Registry,
    snapshot: &'s Snapshot,
) -> Option<Vec<Option<&'s TaskSummary>>> {
    if snapshot.tasks.is_empty() {
        return None;
    }
    let tasks = registry.tasks();
    let mut found = vec![None; tasks.len()];
    let mut rows = snapshot.tasks.range::<TaskKey, _>(..).peekable();
    let mut version = None;
    for &i in registry.by_key() {
        let key = tasks[i].key();
        if version != Some(&key.version) {
            version = Some(&key.version);
            rows = snapshot.tasks.range(key..).peekable();
        }
        while rows.next_if(|(k, _)| *k < key).is_some() {}
        if let Some((_, summary)) = rows.peek().filter(|(k, _)| *k == key) {
            found[i] = Some(*summary);
        }
    }
    Some(found)
}

/// The data version the store's completed tasks reach, given the registry:
/// the highest version `v` such that every registered task of every version
/// up to `v` (and at most `app`) is completed or baselined, counting
/// `also_done` as completed (a completion about to be written with it).
pub(crate) fn reached_version(
    registry: &Registry,
    snapshot: &Snapshot,
    app: &Version,
    also_done: Option<&TaskKey>,
) -> Option<Version> {
    let mut reached = snapshot.data_version.clone();
    let mut current: Option<&Version> = None;
    let mut version_ok = true;
    for task in registry.tasks() {
        let v = task.version();
        if v > app {
            break;
        }
        if current != Some(v) {
            if let (Some(prev), true) = (current, version_ok) {
                if reached.as_ref().is_none_or(|r| prev > r) {
                    reached = Some(prev.clone());
                }
            }
            if !version_ok {
                return reached;
            }
            current = Some(v);
            version_ok = true;
        }
        let done = snapshot.is_completed(task.key())
            || also_done == Some(task.key())
            || snapshot.baseline.as_ref().is_some_and(|b| v <= b)
            || snapshot.data_version.as_ref().is_some_and(|d| v <= d);
        version_ok &= done;
    }
    if let (Some(prev), true) = (current, version_ok) {
        if reached.as_ref().is_none_or(|r| prev > r) {
            reached = Some(prev.clone());
        }
    }
    reached
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::registry::{Task, TaskFuture};
    use crate::state::{AttemptKind, AttemptState, LastRow, TaskSummary};
    use crate::testing::v;
    use crate::TaskContext;

    fn task(version: &str, order: u32, id: &str) -> Task {
        Task::new(
            version,
            order,
            id,
            |_: &mut TaskContext| -> TaskFuture<'_> { Box::pin(async { Ok(()) }) },
        )
        .unwrap()
    }

    fn completed(keys: &[(&str, &str)]) -> BTreeMap<TaskKey, TaskSummary> {
        keys.iter()
            .map(|(version, id)| {
                (
                    TaskKey {
                        version: v(version),
                        id: (*id).to_owned(),
                    },
                    TaskSummary {
                        rows: 1,
                        completed: true,
                        last: LastRow {
                            attempt: 1,
                            kind: AttemptKind::Run,
                            state: AttemptState::Completed,
                            fence: 1,
                        },
                        checkpoint: None,
                    },
                )
            })
            .collect()
    }

    fn ids(plan: &Plan) -> Vec<String> {
        plan.steps
            .iter()
            .map(|s| format!("{}@{}", s.task.id(), s.task.version()))
            .collect()
    }

    fn registry() -> Registry {
        Registry::new(vec![
            task("1.1", 2, "b"),
            task("1.0", 1, "a"),
            task("1.1", 1, "z"),
            task("1.1.0-rc.1", 1, "rc"),
            task("1.2", 1, "c"),
            task("2.0", 1, "d"),
        ])
        .unwrap()
    }

    #[test]
    fn semver_then_order_then_id() {
        let plan = plan(
            &registry(),
            &Snapshot::default(),
            &v("2.0"),
            PlanOptions::default(),
        );
        assert_eq!(
            ids(&plan),
            [
                "a@1.0.0",
                "rc@1.1.0-rc.1",
                "z@1.1.0",
                "b@1.1.0",
                "c@1.2.0",
                "d@2.0.0"
            ]
        );
        assert!(plan.steps.iter().all(|s| s.reason == Reason::FreshStore));
    }

    #[test]
    fn only_tasks_above_the_data_version_up_to_the_app() {
        let snapshot = Snapshot {
            data_version: Some(v("1.0")),
            tasks: completed(&[("1.0", "a"), ("1.1", "z")]),
            ..Snapshot::default()
        };
        let plan = plan(&registry(), &snapshot, &v("1.2"), PlanOptions::default());
        assert_eq!(ids(&plan), ["rc@1.1.0-rc.1", "b@1.1.0", "c@1.2.0"]);
        assert!(plan.steps.iter().all(|s| s.reason == Reason::Pending));
        assert!(!plan.data_ahead);
    }

    #[test]
    fn out_of_order_tasks_are_reported_or_run() {
        let snapshot = Snapshot {
            data_version: Some(v("1.1")),
            tasks: completed(&[("1.1", "z"), ("1.1", "b")]),
            ..Snapshot::default()
        };
        let plan1 = plan(&registry(), &snapshot, &v("1.1"), PlanOptions::default());
        assert!(plan1.is_empty());
        let late: Vec<_> = plan1
            .out_of_order
            .iter()
            .map(|t| t.id().to_owned())
            .collect();
        assert_eq!(late, ["a", "rc"]);
        let plan2 = plan(
            &registry(),
            &snapshot,
            &v("1.1"),
            PlanOptions {
                run_out_of_order: true,
            },
        );
        assert_eq!(ids(&plan2), ["a@1.0.0", "rc@1.1.0-rc.1"]);
        assert!(plan2.steps.iter().all(|s| s.reason == Reason::OutOfOrder));
    }

    #[test]
    fn a_baseline_counts_as_done_and_data_ahead_is_flagged() {
        let snapshot = Snapshot {
            data_version: Some(v("1.1")),
            baseline: Some(v("1.1")),
            ..Snapshot::default()
        };
        let p = plan(
            &registry(),
            &snapshot,
            &v("1.2"),
            PlanOptions {
                run_out_of_order: true,
            },
        );
        assert_eq!(ids(&p), ["c@1.2.0"]);
        let ahead = plan(&registry(), &snapshot, &v("1.0"), PlanOptions::default());
        assert!(ahead.data_ahead && ahead.is_empty());
    }

    #[test]
    fn the_reached_version_waits_for_every_task_of_a_version() {
        let r = registry();
        let mut snapshot = Snapshot {
            data_version: Some(v("1.0")),
            tasks: completed(&[("1.0", "a"), ("1.1.0-rc.1", "rc"), ("1.1", "z")]),
            ..Snapshot::default()
        };
        assert_eq!(
            reached_version(&r, &snapshot, &v("2.0"), None),
            Some(v("1.1.0-rc.1"))
        );
        snapshot
            .tasks
            .extend(completed(&[("1.1", "b"), ("2.0", "d")]));
        // 1.2's task `c` is not done, so 2.0 is not reached either.
        assert_eq!(
            reached_version(&r, &snapshot, &v("2.0"), None),
            Some(v("1.1"))
        );
        assert_eq!(
            reached_version(&r, &snapshot, &v("1.1"), None),
            Some(v("1.1"))
        );
    }

    fn arb_version() -> impl Strategy<Value = String> {
        (
            0u64..3,
            0u64..3,
            0u64..2,
            prop::option::of(prop::sample::select(vec![
                "alpha", "rc.1", "rc.2", "beta.11",
            ])),
        )
            .prop_map(|(a, b, c, pre)| match pre {
                Some(p) => format!("{a}.{b}.{c}-{p}"),
                None => format!("{a}.{b}.{c}"),
            })
    }

    proptest! {
        #[test]
        fn plans_are_sorted_complete_and_bounded(
            defs in prop::collection::vec((arb_version(), 0u32..4), 0..24),
            data in prop::option::of(arb_version()),
            app in arb_version(),
            done_mask in any::<u64>(),
        ) {
            let tasks: Vec<Task> = defs.iter().enumerate()
                .map(|(i, (ver, order))| task(ver, *order * 100 + i as u32, &format!("t{i}")))
                .collect();
            let registry = Registry::new(tasks).unwrap();
            let done: Vec<(String, String)> = registry.tasks().iter().enumerate()
                .filter(|(i, _)| done_mask & (1 << i) != 0)
                .map(|(_, t)| (t.version().to_string(), t.id().to_owned()))
                .collect();
            let done_ref: Vec<(&str, &str)> = done.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            let snapshot = Snapshot {
                data_version: data.as_deref().map(v),
                tasks: completed(&done_ref),
                ..Snapshot::default()
            };
            let app = v(&app);
            let p = plan(&registry, &snapshot, &app, PlanOptions::default());
            for w in p.steps.windows(2) {
                prop_assert!(w[0].task.plan_cmp(&w[1].task).is_lt());
            }
            for t in registry.tasks() {
                let expected = t.version() <= &app
                    && !snapshot.is_completed(t.key())
                    && snapshot.data_version.as_ref().is_none_or(|d| t.version() > d);
                let in_plan = p.steps.iter().any(|s| s.task.key() == t.key());
                prop_assert_eq!(in_plan, expected, "task {}", t.key());
            }
            // S7's condition: once the plan is run, every task in (D, app] is complete.
            let mut after = snapshot.clone();
            after.tasks.extend(completed(&p.steps.iter()
                .map(|s| (s.task.version().to_string(), s.task.id().to_owned()))
                .collect::<Vec<_>>().iter().map(|(a, b)| (a.as_str(), b.as_str())).collect::<Vec<_>>()));
            prop_assert!(plan(&registry, &after, &app, PlanOptions::default()).is_empty());
        }
    }
}
