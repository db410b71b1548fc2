//! The planner: which registered tasks to run, in which order, and why.
//! No I/O: it works from a [`Snapshot`] the runner read.

use std::fmt;

use semver::Version;

use crate::backend::Snapshot;
use crate::registry::{Registry, Task};

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
    let mut steps = Vec::new();
    let mut out_of_order = Vec::new();
    for task in registry.tasks() {
        let v = task.version();
        if v > app || snapshot.is_completed(task.key()) {
            continue;
        }
        if snapshot.baseline.as_ref().is_some_and(|b| v <= b) {
            continue;
        }
        let reason = match data {
            None => Reason::FreshStore,
            Some(d) if v > d => Reason::Pending,
            Some(_) if snapshot.tasks.contains_key(task.key()) => {
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

/// The data version a completed prefix of `plan` reaches, given the
/// registry: the highest version `v` such that every registered task of
/// every version up to `v` (and at most `app`) is completed or baselined.
pub(crate) fn reached_version(
    registry: &Registry,
    snapshot: &Snapshot,
    app: &Version,
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
