//! Readiness: what a node reports while it starts, waits, upgrades.

use std::fmt;

use semver::Version;
use tokio::sync::watch;

use crate::ids::Holder;

/// Where a node is in its start-up.
///
/// `Starting -> Waiting(holder) -> Upgrading(task i of n) -> Ready(data version) | Failed(error)`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// Reading the store.
    Starting,
    /// Another node holds the lease (`None` while it is not yet known who).
    Waiting {
        /// The node that holds the lease.
        holder: Option<Holder>,
    },
    /// This node holds the lease and runs task `index` of `total`.
    Upgrading {
        /// Id of the running task.
        task: String,
        /// Its version.
        version: Version,
        /// 1-based position in the plan.
        index: usize,
        /// Number of tasks in the plan.
        total: usize,
        /// The task's last progress report.
        progress: Option<Progress>,
    },
    /// The data is at a version this node can serve.
    Ready {
        /// The data version read from the store (`None` for a store with no
        /// version and no tasks to run).
        data_version: Option<Version>,
    },
    /// The upgrade failed; the node must not take traffic.
    Failed {
        /// What went wrong.
        error: String,
    },
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Starting => f.write_str("starting"),
            Status::Waiting { holder: Some(h) } => write!(f, "waiting for {h}"),
            Status::Waiting { holder: None } => f.write_str("waiting for the lease"),
            Status::Upgrading {
                task,
                version,
                index,
                total,
                progress,
            } => {
                write!(f, "upgrading: task {index} of {total} ({task}@{version})")?;
                if let Some(p) = progress {
                    write!(f, ", {}/{} {}", p.done, p.total, p.message)?;
                }
                Ok(())
            }
            Status::Ready {
                data_version: Some(v),
            } => write!(f, "ready at data version {v}"),
            Status::Ready { data_version: None } => f.write_str("ready (no data version)"),
            Status::Failed { error } => write!(f, "failed: {error}"),
        }
    }
}

/// A task's progress report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Units done.
    pub done: u64,
    /// Units in all.
    pub total: u64,
    /// What the task says it is doing.
    pub message: String,
}

/// The two health checks of a node, for its probe endpoints.
///
/// `up()` is the liveness check: the process is alive, also while it waits or
/// upgrades. `ready()` is the readiness check: the data is at a version this
/// node serves, so it may take traffic.
#[derive(Debug, Clone)]
pub struct Probe {
    pub(crate) rx: watch::Receiver<Status>,
}

impl Probe {
    /// The process is alive. True in every state, `Failed` included: a failed
    /// upgrade keeps the node out of traffic through `ready()`, and the
    /// outcome of [`Upsilon::run`](crate::Upsilon::run) decides whether the
    /// process exits.
    pub fn up(&self) -> bool {
        true
    }

    /// The data is at our version: the node may take traffic.
    pub fn ready(&self) -> bool {
        matches!(*self.rx.borrow(), Status::Ready { .. })
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.rx.borrow().clone()
    }

    /// Waits until the node is ready or failed, and returns that status.
    pub async fn settled(&mut self) -> Status {
        let status = self
            .rx
            .wait_for(|s| matches!(s, Status::Ready { .. } | Status::Failed { .. }))
            .await
            .map(|s| s.clone());
        status.unwrap_or_else(|_| self.rx.borrow().clone())
    }
}
