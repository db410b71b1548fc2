//! The runner's errors and reports.

use std::fmt;
use std::time::Duration;

use semver::Version;

use crate::ids::{Holder, TaskKey};
use crate::registry::RegistryError;
use crate::state::BackendError;

/// What the runner can fail with. A failure that happens after tasks ran
/// carries the partial [`Report`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The builder was given settings that make no sense. Nothing was
    /// read or written.
    #[error("invalid Upsilon configuration: {setting}: {problem}")]
    #[non_exhaustive]
    Config {
        /// The builder setting at fault, by its method's name: `"ttl"`,
        /// `"renew_every"`, `"max_wait"`, `"service"`, `"app_version"`,
        /// `"backend"`, `"baseline"`, `"require_tasks_from"`, ...
        setting: &'static str,
        /// What is wrong with it, and what to do.
        problem: String,
    },
    /// The registered tasks conflict, or a task is above the app version.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The backend failed (after bounded retries for transient errors). The
    /// message says what the runner was doing; the backend's error is the
    /// [`source`](std::error::Error::source): print the chain (anyhow's
    /// `{:#}`) to see both.
    #[error("{during} failed")]
    Backend {
        /// What the runner was doing.
        during: &'static str,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// Another node held the lease for longer than the builder's `max_wait`.
    #[error("gave up after waiting {waited:?} for the upgrade lease of service `{service}`{}; if that node is gone its lease expires within its TTL, otherwise raise `max_wait`", holder.as_ref().map(|h| format!(", held by {h}")).unwrap_or_default())]
    WaitTimeout {
        /// The service.
        service: String,
        /// Who held the lease when the runner gave up.
        holder: Option<Holder>,
        /// How long it waited.
        waited: Duration,
    },
    /// The lease was lost while this node held it: renewal was refused, the
    /// local deadline passed, or the store saw a newer fence. Work stopped.
    #[error("lost the upgrade lease of service `{}`: {reason}; the running task was cancelled and nothing more was written", report.service)]
    LeaseLost {
        /// Why.
        reason: LeaseLoss,
        /// What was done before.
        report: Box<Report>,
    },
    /// The run was asked to stop ([`Upsilon::run_until`](crate::Upsilon::run_until)):
    /// the running task was cancelled and recorded as such, and the lease
    /// released, so that the next node takes over at once.
    #[error("the upgrade of service `{}` was stopped before it completed; the running task was cancelled and the lease released", report.service)]
    Stopped {
        /// What was done before (empty if the node was still waiting).
        report: Box<Report>,
    },
    /// A task failed after the retry policy's attempts. The data version
    /// stays where it was; the lease was released.
    #[error("{}", failed_message(report))]
    TaskFailed {
        /// What was done, what failed, what was rolled back.
        report: Box<Report>,
    },
    /// The data version is above the app version and the policy refuses.
    #[error("the data version {data} of service `{service}` is ahead of the app version {app}, and the data-ahead policy is `Fail`")]
    DataAhead {
        /// The service.
        service: String,
        /// The store's data version.
        data: Version,
        /// This binary's version.
        app: Version,
    },
}

impl Error {
    /// An [`Error::Config`] for `setting`.
    pub(crate) fn config(setting: &'static str, problem: impl Into<String>) -> Error {
        Error::Config {
            setting,
            problem: problem.into(),
        }
    }
}

/// Why a node lost the lease it held ([`Error::LeaseLost`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseLoss {
    /// The lock refused to renew the lease: it is no longer this node's.
    RenewalRefused {
        /// The lock's answer.
        detail: String,
    },
    /// The local deadline passed while renewals failed or hung: counted
    /// from the last successful renewal on the monotonic clock, it falls
    /// `margin` before the lease's expiry.
    Deadline {
        /// The lease's time to live.
        ttl: Duration,
        /// The builder's safety margin.
        margin: Duration,
    },
    /// A store write carried a fence older than the newest the store has
    /// seen: another node has taken over.
    StaleFence {
        /// What the runner was writing.
        during: &'static str,
        /// The fence this node wrote with.
        presented: u64,
        /// The store's newest fence.
        current: u64,
    },
    /// The backend signalled that the lease may be gone before any renewal
    /// said so: the session it is tied to ended, a check of it failed
    /// ([`Lock::until_lost`](crate::backend::Lock::until_lost)).
    Signalled {
        /// The backend's account.
        detail: String,
    },
    /// The store refused a write because the lease is no longer held.
    NotHeld {
        /// What the runner was writing.
        during: &'static str,
        /// The store's answer.
        detail: String,
    },
}

impl fmt::Display for LeaseLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseLoss::RenewalRefused { detail } => write!(f, "renewal refused: {detail}"),
            LeaseLoss::Deadline { ttl, margin } => write!(
                f,
                "the lease was not renewed within {:?} (ttl {ttl:?} minus safety margin {margin:?})",
                ttl.saturating_sub(*margin)
            ),
            LeaseLoss::StaleFence {
                during,
                presented,
                current,
            } => write!(
                f,
                "{during}: fence {presented} is stale: the store has seen fence {current}, so another node has taken over"
            ),
            LeaseLoss::Signalled { detail } => write!(f, "{detail}"),
            LeaseLoss::NotHeld { during, detail } => write!(
                f,
                "{during}: the lease is no longer held by this node: {detail}"
            ),
        }
    }
}

fn failed_message(report: &Report) -> String {
    match &report.failed {
        Some(t) => format!(
            "task {} failed on attempt {}: {}{}",
            t.key,
            t.attempt,
            t.error.as_deref().unwrap_or("unknown error"),
            if report.rolled_back.is_empty() {
                String::new()
            } else {
                format!("; rolled back {} task(s)", report.rolled_back.len())
            }
        ),
        None => "an upgrade task failed".to_owned(),
    }
}

impl Error {
    /// The partial report, for failures that happen after tasks ran.
    pub fn report(&self) -> Option<&Report> {
        match self {
            Error::LeaseLost { report, .. }
            | Error::TaskFailed { report }
            | Error::Stopped { report } => Some(report),
            _ => None,
        }
    }
}

/// What a node did under the lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The service.
    pub service: String,
    /// The data version read after taking the lease.
    pub from: Option<Version>,
    /// The data version when the node let go.
    pub to: Option<Version>,
    /// The version the store was baselined at by this run, if any.
    pub baselined: Option<Version>,
    /// Tasks run to completion, in order.
    pub completed: Vec<TaskReport>,
    /// The task that failed, if any.
    pub failed: Option<TaskReport>,
    /// Rollbacks run after the failure, in order.
    pub rolled_back: Vec<TaskReport>,
    /// The fence the node worked under.
    pub fence: u64,
}

/// One task's run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskReport {
    /// The task.
    pub key: TaskKey,
    /// Its description.
    pub description: String,
    /// The history row number of the final attempt.
    pub attempt: u32,
    /// Run time of the final attempt.
    pub duration: Duration,
    /// The error, for a failure.
    pub error: Option<String>,
}

/// An optional version as messages and log fields show it: `1.0.0`, or
/// `none`.
pub(crate) struct OrNone<'a>(pub(crate) Option<&'a Version>);

impl fmt::Display for OrNone<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("none"),
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "service `{}` from data version {} to {} under fence {}",
            self.service,
            OrNone(self.from.as_ref()),
            OrNone(self.to.as_ref()),
            self.fence
        )?;
        if let Some(b) = &self.baselined {
            write!(f, "\n  baselined the empty store at {b}")?;
        }
        for t in &self.completed {
            write!(
                f,
                "\n  ran {} (attempt {}) in {:?}",
                t.key, t.attempt, t.duration
            )?;
        }
        if let Some(t) = &self.failed {
            write!(
                f,
                "\n  FAILED {} (attempt {}): {}",
                t.key,
                t.attempt,
                t.error.as_deref().unwrap_or("")
            )?;
        }
        for t in &self.rolled_back {
            write!(f, "\n  rolled back {}", t.key)?;
            if let Some(e) = &t.error {
                write!(f, " (rollback failed: {e})")?;
            }
        }
        Ok(())
    }
}
