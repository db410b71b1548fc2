//! The two traits a backend implements, [`Lock`] and [`Store`], and the
//! values that cross them.
//!
//! A lease only elects who works; safety comes from the store, which refuses
//! any write stamped with a fence older than the newest it has seen.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use semver::Version;

use crate::registry::{BoxError, TaskKey};

/// Who holds (or asks for) a lease: host, pod name when set, pid, a per-run id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Holder {
    /// Host name.
    pub host: String,
    /// Kubernetes pod name (`POD_NAME`), when set.
    pub pod: Option<String>,
    /// Process id.
    pub pid: u32,
    /// Random id of this run, distinct for every process start.
    pub run_id: String,
}

impl Holder {
    /// This process: host from `HOSTNAME` or the kernel, pod from `POD_NAME`,
    /// and a fresh run id.
    pub fn current() -> Holder {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown-host".to_owned());
        let pod = std::env::var("POD_NAME").ok().filter(|p| !p.is_empty());
        Holder {
            host,
            pod,
            pid: std::process::id(),
            run_id: format!("{:016x}", crate::util::random_u64()),
        }
    }

    /// One-line form kept by backends; [`Holder::decode`] reads it back.
    pub fn encode(&self) -> String {
        format!(
            "{};{};{};{}",
            escape(&self.host),
            self.pod.as_deref().map(escape).unwrap_or_default(),
            self.pid,
            escape(&self.run_id)
        )
    }

    /// Reads what [`Holder::encode`] wrote.
    pub fn decode(text: &str) -> Result<Holder, BackendError> {
        let corrupt = || BackendError::Corrupt {
            detail: format!("lease holder {text:?} is not in the `host;pod;pid;run` form"),
        };
        let parts: Vec<&str> = text.split(';').collect();
        let [host, pod, pid, run_id] = parts[..] else {
            return Err(corrupt());
        };
        Ok(Holder {
            host: unescape(host).ok_or_else(corrupt)?,
            pod: if pod.is_empty() {
                None
            } else {
                Some(unescape(pod).ok_or_else(corrupt)?)
            },
            pid: pid.parse().map_err(|_| corrupt())?,
            run_id: unescape(run_id).ok_or_else(corrupt)?,
        })
    }
}

fn escape(s: &str) -> String {
    s.replace('%', "%25").replace(';', "%3B")
}

fn unescape(s: &str) -> Option<String> {
    let out = s.replace("%3B", ";").replace("%25", "%");
    (!s.contains(';')).then_some(out)
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pod {
            Some(pod) => write!(f, "pod {pod} on {}", self.host)?,
            None => write!(f, "{}", self.host)?,
        }
        write!(f, " (pid {}, run {})", self.pid, self.run_id)
    }
}

/// A granted lease. Its expiry is on the backend's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The service the lease is scoped by.
    pub service: String,
    /// Who holds it.
    pub holder: Holder,
    /// Fence of this grant; every store write carries it.
    pub fence: u64,
    /// Expiry, in milliseconds since the Unix epoch on the backend's clock.
    pub expires_at_ms: i64,
    /// The time to live it was granted (and is renewed) with.
    pub ttl: Duration,
}

/// The current state of a lease, as another node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// Who holds it.
    pub holder: Holder,
    /// Its fence.
    pub fence: u64,
    /// Expiry on the backend's clock (ms since the epoch).
    pub expires_at_ms: i64,
    /// The backend's clock when this was read (ms since the epoch).
    pub now_ms: i64,
}

/// The answer to [`Lock::try_acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// The lease is ours, with a fence above every earlier grant.
    Granted(Lease),
    /// Another holder has an unexpired lease.
    Held(LeaseInfo),
}

/// The cluster-wide lease: who may run a plan.
///
/// Every method is atomic in the backend. Implementations must keep, and the
/// conformance suite in `upsilon::testing` checks:
/// - the fence grows with every grant and never decreases, not even when the
///   lease is released, expires or its rows are deleted (S1);
/// - `renew` and `release` take effect only for the matching holder and fence (S6);
/// - expiry is judged by the backend's clock.
#[async_trait]
pub trait Lock: Send + Sync + fmt::Debug {
    /// If the lease is free or expired: holder := `holder`, fence := fence + 1,
    /// expiry := backend clock + `ttl`. Otherwise report who holds it.
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError>;

    /// Extends the lease by its TTL from the backend's clock, if `lease` still
    /// holds it (same holder, same fence, not expired). Otherwise
    /// [`BackendError::LeaseLost`].
    async fn renew(&self, lease: &Lease) -> Result<Lease, BackendError>;

    /// Frees the lease if `lease` still holds it; [`BackendError::LeaseLost`]
    /// if not (nothing is changed then).
    async fn release(&self, lease: &Lease) -> Result<(), BackendError>;

    /// The unexpired lease of `service`, if any.
    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError>;

    /// Returns when the lease or the data version of `service` may have
    /// changed since the caller read the lease as `seen`, or after `timeout`.
    /// A backend with notifications returns at once if a change arrived
    /// since `seen` was read, and otherwise wakes on the next one; the
    /// default only sleeps (the runner then polls).
    async fn wait(
        &self,
        service: &str,
        seen: &LeaseInfo,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        let _ = (service, seen);
        tokio::time::sleep(timeout).await;
        Ok(())
    }

    /// Whether [`Lock::wait`] wakes on release and on data-version changes
    /// (LISTEN/NOTIFY, pub/sub, watch). Then a waiting node sleeps until a
    /// notification or the lease's expiry instead of polling, so it makes no
    /// queries while it waits. May change at run time, for example while a
    /// notification connection is down.
    fn notifies(&self) -> bool {
        false
    }
}

/// What a history row is: a run of the task, or a run of its rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptKind {
    /// The task itself.
    Run,
    /// The task's rollback.
    Rollback,
}

impl AttemptKind {
    /// Stable name kept in stores.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptKind::Run => "run",
            AttemptKind::Rollback => "rollback",
        }
    }

    /// Reads [`AttemptKind::as_str`].
    pub fn parse(s: &str) -> Result<AttemptKind, BackendError> {
        match s {
            "run" => Ok(AttemptKind::Run),
            "rollback" => Ok(AttemptKind::Rollback),
            other => Err(BackendError::corrupt(format!(
                "unknown attempt kind {other:?}"
            ))),
        }
    }
}

/// The state of one history row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptState {
    /// Started and not finished (or its holder died).
    Running,
    /// Finished successfully. For a rollback row: the task was undone.
    Completed,
    /// Returned an error or panicked.
    Failed,
    /// Stopped because the lease was lost.
    Cancelled,
}

impl AttemptState {
    /// Stable name kept in stores.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptState::Running => "running",
            AttemptState::Completed => "completed",
            AttemptState::Failed => "failed",
            AttemptState::Cancelled => "cancelled",
        }
    }

    /// Reads [`AttemptState::as_str`].
    pub fn parse(s: &str) -> Result<AttemptState, BackendError> {
        match s {
            "running" => Ok(AttemptState::Running),
            "completed" => Ok(AttemptState::Completed),
            "failed" => Ok(AttemptState::Failed),
            "cancelled" => Ok(AttemptState::Cancelled),
            other => Err(BackendError::corrupt(format!(
                "unknown attempt state {other:?}"
            ))),
        }
    }
}

/// What the store knows of one task: enough to plan and to check writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSummary {
    /// Number of history rows (attempts and rollbacks).
    pub rows: u32,
    /// A run completed and no rollback completed after it.
    pub completed: bool,
    /// The newest row.
    pub last: LastRow,
}

/// The newest history row of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastRow {
    /// Its 1-based number among the task's rows.
    pub attempt: u32,
    /// Run or rollback.
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
    /// Whether the store has no data version, no baseline and no history.
    pub fn is_empty(&self) -> bool {
        self.data_version.is_none() && self.baseline.is_none() && self.tasks.is_empty()
    }

    /// Folds one history row of `key` into the task summaries. Backends that
    /// keep rows call it for each row, oldest first, to build a snapshot.
    pub fn fold_row(&mut self, key: TaskKey, row: LastRow) {
        let entry = self.tasks.entry(key).or_insert(TaskSummary {
            rows: 0,
            completed: false,
            last: row.clone(),
        });
        entry.rows += 1;
        if row.state == AttemptState::Completed {
            entry.completed = row.kind == AttemptKind::Run;
        }
        entry.last = row;
    }

    /// A copy with only the task summaries in `keys` (all of them for
    /// `None`): enough for [`Snapshot::check`] on changes that touch only
    /// those tasks (see [`Change::touched`]).
    pub fn subset(&self, keys: Option<&std::collections::BTreeSet<&TaskKey>>) -> Snapshot {
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
    /// - a baseline on a store that is not empty.
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
                    },
                );
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

/// One fenced write to the store. [`Store::apply`] takes several and applies
/// them atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// A new history row in state `running`.
    Start(StartAttempt),
    /// The end of the task's newest row.
    Finish(FinishAttempt),
    /// The data version advances (never back).
    DataVersion(Version),
    /// An empty store adopts `version` as its data version and baseline.
    Baseline(Version),
}

impl Change {
    /// The tasks whose summaries [`Snapshot::check`] needs to judge
    /// `changes`, or `None` when it needs the whole history (a baseline, which
    /// only an empty store takes). A backend may load just these for a write,
    /// so that a write's cost does not grow with the history.
    pub fn touched(changes: &[Change]) -> Option<std::collections::BTreeSet<&TaskKey>> {
        let mut keys = std::collections::BTreeSet::new();
        for change in changes {
            match change {
                Change::Start(s) => {
                    keys.insert(&s.key);
                }
                Change::Finish(f) => {
                    keys.insert(&f.key);
                }
                Change::DataVersion(_) => {}
                Change::Baseline(_) => return None,
            }
        }
        Some(keys)
    }
}

/// A new history row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartAttempt {
    /// The task.
    pub key: TaskKey,
    /// 1-based number of the row among the task's rows.
    pub attempt: u32,
    /// Run or rollback.
    pub kind: AttemptKind,
    /// The task's description.
    pub description: String,
    /// Who runs it.
    pub holder: Holder,
}

/// The end of a history row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishAttempt {
    /// The task.
    pub key: TaskKey,
    /// The row's number.
    pub attempt: u32,
    /// How it ended (not `Running`).
    pub state: AttemptState,
    /// The error text, for a failure.
    pub error: Option<String>,
    /// How long it ran, on the runner's monotonic clock.
    pub duration: Duration,
}

/// One row of a service's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The task.
    pub key: TaskKey,
    /// Its description.
    pub description: String,
    /// 1-based number among the task's rows.
    pub attempt: u32,
    /// Run or rollback.
    pub kind: AttemptKind,
    /// Its state.
    pub state: AttemptState,
    /// The fence it was written with.
    pub fence: u64,
    /// Who ran it.
    pub holder: Holder,
    /// Backend clock at start (ms since the epoch).
    pub started_at_ms: i64,
    /// Backend clock at the end, once finished.
    pub finished_at_ms: Option<i64>,
    /// Run time on the runner's clock, once finished.
    pub duration: Option<Duration>,
    /// Error text of a failure.
    pub error: Option<String>,
}

/// Data version and task history, guarded by the fence.
///
/// Implementations keep, and the conformance suite checks: every write is
/// atomic and commits only while its fence is the newest the store has seen
/// (S2); [`Snapshot::check`] decides what a write may do, so that every
/// backend refuses the same things; stored data that does not parse gives
/// [`BackendError::Corrupt`] and no write.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Data version, baseline, fence and task summaries of `service`, in one
    /// round trip where the backend allows.
    async fn load(&self, service: &str) -> Result<Snapshot, BackendError>;

    /// Atomically raises the store's fence to `fence` and reads the snapshot
    /// after it. [`BackendError::StaleFence`] if the store has seen a newer one.
    async fn claim(&self, service: &str, fence: u64) -> Result<Snapshot, BackendError>;

    /// Atomically checks `changes` with [`Snapshot::check`] against the
    /// current state and writes them, or writes nothing.
    async fn apply(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
    ) -> Result<(), BackendError>;

    /// Every history row of `service`, oldest first.
    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>, BackendError>;
}

/// A backend that is both the [`Lock`] and the [`Store`], as
/// [`Builder::backend`](crate::Builder::backend) takes it. Implemented for
/// every type that implements both.
pub trait Backend: Lock + Store {}

impl<T: Lock + Store + ?Sized> Backend for T {}

/// What a backend can fail with. Driver errors are boxed behind `source`, so
/// `upsilon` names no driver type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The write carried a fence older than the newest the store has seen:
    /// another node has taken over.
    #[error("fence {presented} is stale: the store has seen fence {current}, so another node has taken over")]
    StaleFence {
        /// The fence the write carried.
        presented: u64,
        /// The store's newest fence.
        current: u64,
    },
    /// The lease is not (or no longer) held by the caller.
    #[error("the lease is no longer held by this node: {0}")]
    LeaseLost(String),
    /// The write breaks a rule of the store (see [`Snapshot::check`]).
    #[error("the store refused the write: {0}")]
    Rejected(String),
    /// Stored data does not parse. Nothing was written.
    #[error("stored data is corrupt: {detail}; nothing was written, repair or restore it")]
    Corrupt {
        /// What did not parse, and where.
        detail: String,
    },
    /// The store was written by a format this build does not know.
    #[error("the store has format {found}, and this build knows formats up to {supported}; upgrade Upsilon before using this store")]
    UnsupportedFormat {
        /// The format found.
        found: String,
        /// The newest this build knows.
        supported: String,
    },
    /// The backend could not be reached or timed out: worth retrying.
    #[error("backend unavailable: {source}")]
    Unavailable {
        /// The driver's error.
        #[source]
        source: BoxError,
    },
    /// Any other backend failure: not retried.
    #[error("backend error: {source}")]
    Other {
        /// The driver's error.
        #[source]
        source: BoxError,
    },
}

impl BackendError {
    /// A [`BackendError::Corrupt`].
    pub fn corrupt(detail: impl Into<String>) -> BackendError {
        BackendError::Corrupt {
            detail: detail.into(),
        }
    }

    /// A [`BackendError::LeaseLost`] for `what` (renew, release) done with a
    /// lease that no longer holds.
    pub fn lease_lost(what: &str, lease: &Lease) -> BackendError {
        BackendError::LeaseLost(format!(
            "{what}: the lease of `{}` is no longer held by {} with fence {}",
            lease.service, lease.holder, lease.fence
        ))
    }

    /// Checks a stored format marker against the newest format a backend
    /// knows: [`BackendError::UnsupportedFormat`] for a newer one,
    /// [`BackendError::Corrupt`] for one that is not a number.
    pub fn check_format(found: &str, supported: u32, place: &str) -> Result<(), BackendError> {
        match found.parse::<u32>() {
            Ok(f) if f == supported => Ok(()),
            Ok(_) => Err(BackendError::UnsupportedFormat {
                found: found.to_owned(),
                supported: supported.to_string(),
            }),
            Err(_) => Err(BackendError::corrupt(format!(
                "{place} is {found:?}, not a number"
            ))),
        }
    }

    /// A transient [`BackendError::Unavailable`].
    pub fn unavailable(source: impl Into<BoxError>) -> BackendError {
        BackendError::Unavailable {
            source: source.into(),
        }
    }

    /// A permanent [`BackendError::Other`].
    pub fn other(source: impl Into<BoxError>) -> BackendError {
        BackendError::Other {
            source: source.into(),
        }
    }

    /// Whether retrying the same call may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, BackendError::Unavailable { .. })
    }
}
