//! Readiness: what a node reports while it starts, waits, upgrades.

use std::fmt;

use semver::Version;
use serde::ser::{SerializeStruct, Serializer};
use serde::Serialize;
use tokio::sync::watch;

use crate::ids::Holder;
use crate::state::Checkpoint;

/// Where a node is in its start-up.
///
/// `Starting -> Waiting(holder) -> Upgrading(task i of n) -> Ready(data version) | Failed(error)`.
///
/// # As JSON
///
/// `Status` serializes (serde) as one object whose `phase` names the
/// variant; the other keys are the variant's fields. This is the body of the
/// `upsilon::http` endpoints `/readyz` and `/upsilon/status` (feature
/// `http`). Keys are snake_case and stable: new keys or phases may be added,
/// existing ones keep their name and meaning.
///
/// | `phase` | other keys |
/// |---|---|
/// | `"starting"` | none |
/// | `"waiting"` | `holder`: `{"host", "pod" (string or null), "pid", "run_id"}`, or null while not yet known |
/// | `"upgrading"` | `task` (id), `version` (`"1.1.0"`), `index` (1-based), `total`, `progress`: `{"done", "total", "message"}` or null, `checkpoint`: `{"position" (the JSON text the task saved), "saved_at_ms", "done"?, "total"?}` or null |
/// | `"ready"` | `data_version`: `"1.1.0"`, or null for a store with no version and no tasks |
/// | `"failed"` | `error`: the error and its causes, joined with `": "` |
///
/// ```
/// # use upsilon::{Progress, Status, Version};
/// let status = Status::Upgrading {
///     task: "backfill_accounts".into(),
///     version: Version::new(1, 1, 0),
///     index: 1,
///     total: 3,
///     progress: Some(Progress { done: 40, total: 100, message: "rows".into() }),
///     checkpoint: None,
/// };
/// # let json = serde_json::to_string(&status).unwrap();
/// # assert_eq!(json, r#"{"phase":"upgrading","task":"backfill_accounts","version":"1.1.0","index":1,"total":3,"progress":{"done":40,"total":100,"message":"rows"},"checkpoint":null}"#);
/// // {"phase":"upgrading","task":"backfill_accounts","version":"1.1.0","index":1,"total":3,
/// //  "progress":{"done":40,"total":100,"message":"rows"},"checkpoint":null}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Status {
    /// Reading the store.
    Starting,
    /// Another node holds the lease (`None` while it is not yet known who).
    Waiting {
        /// The node that holds the lease.
        #[serde(serialize_with = "holder_json")]
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
        /// Where the task got, as its newest checkpoint says (the one it
        /// resumed from, until it saves another).
        checkpoint: Option<Checkpoint>,
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
                checkpoint,
            } => {
                write!(f, "upgrading: task {index} of {total} ({task}@{version})")?;
                if let Some(p) = progress {
                    write!(f, ", {}/{} {}", p.done, p.total, p.message)?;
                }
                if let Some(c) = checkpoint {
                    write!(f, ", checkpoint at {}", c.position)?;
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

/// A task's progress report: `{"done": 40, "total": 100, "message": "rows"}`
/// as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Units done.
    pub done: u64,
    /// Units in all.
    pub total: u64,
    /// What the task says it is doing.
    pub message: String,
}

/// A holder as `{"host", "pod", "pid", "run_id"}`, or null.
fn holder_json<S: Serializer>(holder: &Option<Holder>, s: S) -> Result<S::Ok, S::Error> {
    let Some(h) = holder else {
        return s.serialize_none();
    };
    let mut out = s.serialize_struct("Holder", 4)?;
    out.serialize_field("host", &h.host)?;
    out.serialize_field("pod", &h.pod)?;
    out.serialize_field("pid", &h.pid)?;
    out.serialize_field("run_id", &h.run_id)?;
    out.end()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn json(status: &Status) -> String {
        serde_json::to_string(status).unwrap()
    }

    #[test]
    fn every_phase_has_its_documented_json() {
        assert_eq!(json(&Status::Starting), r#"{"phase":"starting"}"#);
        assert_eq!(
            json(&Status::Waiting { holder: None }),
            r#"{"phase":"waiting","holder":null}"#
        );
        let holder = Holder {
            host: "web-1".into(),
            pod: Some("web-1-x".into()),
            pid: 7,
            run_id: "ab12".into(),
        };
        assert_eq!(
            json(&Status::Waiting {
                holder: Some(holder)
            }),
            r#"{"phase":"waiting","holder":{"host":"web-1","pod":"web-1-x","pid":7,"run_id":"ab12"}}"#
        );
        assert_eq!(
            json(&Status::Upgrading {
                task: "t".into(),
                version: Version::new(1, 1, 0),
                index: 2,
                total: 3,
                progress: None,
                checkpoint: None,
            }),
            r#"{"phase":"upgrading","task":"t","version":"1.1.0","index":2,"total":3,"progress":null,"checkpoint":null}"#
        );
        let at = Status::Upgrading {
            task: "t".into(),
            version: Version::new(1, 1, 0),
            index: 2,
            total: 3,
            progress: None,
            checkpoint: Some(Checkpoint {
                position: r#"{"last":40}"#.into(),
                saved_at_ms: 1_714_564_972_000,
                done: Some(40),
                total: None,
            }),
        };
        assert_eq!(
            json(&at),
            r#"{"phase":"upgrading","task":"t","version":"1.1.0","index":2,"total":3,"progress":null,"checkpoint":{"position":"{\"last\":40}","saved_at_ms":1714564972000,"done":40}}"#
        );
        assert_eq!(
            at.to_string(),
            r#"upgrading: task 2 of 3 (t@1.1.0), checkpoint at {"last":40}"#
        );
        assert_eq!(
            json(&Status::Ready {
                data_version: Some(Version::new(2, 0, 0))
            }),
            r#"{"phase":"ready","data_version":"2.0.0"}"#
        );
        assert_eq!(
            json(&Status::Ready { data_version: None }),
            r#"{"phase":"ready","data_version":null}"#
        );
        assert_eq!(
            json(&Status::Failed {
                error: "boom".into()
            }),
            r#"{"phase":"failed","error":"boom"}"#
        );
    }
}
