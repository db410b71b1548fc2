//! The protocol decisions every backend shares, so that a backend only reads
//! and writes plain column values atomically in its own store:
//! - [`decide_acquire`]: who gets the lease, with which fence and expiry;
//! - [`Snapshot::claim`] and [`Snapshot::check`]: what a claim or a write may do;
//! - [`StateColumns`], [`SummaryColumns`] and [`HistoryColumns`]: decoding the
//!   rows a store keeps, [`Columns`]: encoding the rows a write makes;
//! - [`jitter`]: randomness that follows the simulation's seed.

use std::time::Duration;

use semver::Version;

use super::CheckpointColumns;
use crate::ids::{Holder, TaskKey};
use crate::state::{
    Acquire, AttemptKind, AttemptState, BackendError, Change, Checkpoint, HistoryEntry, LastRow,
    Lease, LeaseInfo, Snapshot,
};

/// A lease row as a backend keeps it, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLease {
    /// Who was granted it.
    pub holder: Holder,
    /// Its fence.
    pub fence: u64,
    /// Its expiry on the backend's clock (ms since the epoch).
    pub expires_at_ms: i64,
    /// When it was granted, on the same clock, if the backend keeps it.
    pub granted_at_ms: Option<i64>,
}

impl StoredLease {
    /// Decodes a lease row from its column values: the holder as
    /// [`Holder::encode`] wrote it, the fence, the expiry. `None` when the row
    /// holds no lease (any of the three is missing).
    pub fn from_columns(
        holder: Option<&str>,
        fence: Option<i64>,
        expires_at_ms: Option<i64>,
    ) -> Result<Option<StoredLease>, BackendError> {
        let (Some(holder), Some(fence), Some(expires_at_ms)) = (holder, fence, expires_at_ms)
        else {
            return Ok(None);
        };
        Ok(Some(StoredLease {
            holder: Holder::decode(holder)?,
            fence: fence_from_column(fence, "the lease's fence")?,
            expires_at_ms,
            granted_at_ms: None,
        }))
    }

    /// The same lease, with the time it was granted (a column the backend
    /// keeps beside the lease, written with the grant's `now_ms`), so that
    /// [`LeaseInfo::held_for`] can say how long it has been held.
    pub fn granted_at(self, granted_at_ms: Option<i64>) -> StoredLease {
        StoredLease {
            granted_at_ms,
            ..self
        }
    }

    /// The lease as another node sees it, if it is unexpired at `now_ms`.
    pub fn live(&self, now_ms: i64) -> Option<LeaseInfo> {
        (self.expires_at_ms > now_ms).then(|| LeaseInfo {
            holder: self.holder.clone(),
            fence: self.fence,
            expires_at_ms: self.expires_at_ms,
            now_ms,
            granted_at_ms: self.granted_at_ms,
        })
    }
}

/// Decides a lease request from what the backend read under its lock (or in
/// the transaction that will write the answer):
/// - `stored`: the lease row, or `None` when there is none or its holder is
///   known to be gone (a backend that can tell, like PostgreSQL's session
///   check, passes `None` then);
/// - `now_ms`: the backend's clock;
/// - `fences_seen`: every fence counter the backend keeps for the service
///   (the grant counter, the store's fence, the newest fence in the history).
///
/// An unexpired lease is [`Acquire::Held`]. Otherwise [`Acquire::Granted`],
/// with a fence one above every fence seen, so that the fence never
/// decreases, not even when rows were deleted or the lease was force-released
/// (S1), and an expiry of `now_ms + ttl`. The backend then writes the granted
/// fence, holder and expiry, in the same atomic operation as its read.
pub fn decide_acquire(
    service: &str,
    stored: Option<&StoredLease>,
    now_ms: i64,
    fences_seen: impl IntoIterator<Item = u64>,
    holder: &Holder,
    ttl: Duration,
) -> Result<Acquire, BackendError> {
    if let Some(info) = stored.and_then(|s| s.live(now_ms)) {
        return Ok(Acquire::Held(info));
    }
    let newest = fences_seen.into_iter().max().unwrap_or(0);
    let fence = newest
        .checked_add(1)
        .filter(|f| i64::try_from(*f).is_ok())
        .ok_or_else(|| {
            BackendError::corrupt(format!(
                "the newest fence of `{service}` is {newest}, so no higher fence can be granted"
            ))
        })?;
    Ok(Acquire::Granted(Lease {
        service: service.to_owned(),
        holder: holder.clone(),
        fence,
        expires_at_ms: expiry(now_ms, ttl)?,
        ttl,
    }))
}

/// `now_ms + ttl` on the backend's clock, or an error for a TTL too large
/// to add to it.
pub fn expiry(now_ms: i64, ttl: Duration) -> Result<i64, BackendError> {
    i64::try_from(ttl.as_millis())
        .ok()
        .and_then(|ttl| now_ms.checked_add(ttl))
        .ok_or_else(|| {
            BackendError::Rejected(format!(
                "a lease TTL of {ttl:?} is too large to add to the backend's clock"
            ))
        })
}

/// A TTL in whole milliseconds, as stores keep it.
pub fn ttl_ms(ttl: Duration) -> Result<i64, BackendError> {
    expiry(0, ttl)
}

/// A fence read from a signed column: a negative one is corrupt, never a
/// grant.
pub fn fence_from_column(value: i64, what: &str) -> Result<u64, BackendError> {
    u64::try_from(value).map_err(|_| {
        BackendError::corrupt(format!("{what} is {value}, and fences are never negative"))
    })
}

/// A fence for a signed column.
pub fn fence_to_column(fence: u64) -> Result<i64, BackendError> {
    i64::try_from(fence)
        .map_err(|_| BackendError::Rejected(format!("fence {fence} does not fit a store column")))
}

/// A stored version; `what` names it in the error.
pub fn version_from_column(text: &str, what: &str) -> Result<Version, BackendError> {
    Version::parse(text)
        .map_err(|e| BackendError::corrupt(format!("{what} {text:?} is not a version ({e})")))
}

fn count_from_column(value: i64, what: &str) -> Result<u32, BackendError> {
    u32::try_from(value).map_err(|_| BackendError::corrupt(format!("{what} is {value}")))
}

/// The per-service state row, as a backend reads its columns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateColumns {
    /// The data version, as text.
    pub data_version: Option<String>,
    /// The baseline, as text.
    pub baseline: Option<String>,
    /// The store's newest fence.
    pub store_fence: i64,
}

/// The columns of one history row that a snapshot needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryColumns {
    /// The task's version, as text.
    pub version: String,
    /// The task's id.
    pub task_id: String,
    /// The row's 1-based number among the task's rows.
    pub attempt: i64,
    /// [`AttemptKind::as_str`].
    pub kind: String,
    /// [`AttemptState::as_str`].
    pub state: String,
    /// The fence it was written with.
    pub fence: i64,
    /// The row's checkpoint, if it has one (a store made before checkpoints
    /// existed has none).
    pub checkpoint: Option<CheckpointColumns>,
}

impl SummaryColumns {
    /// The row's task and what a snapshot keeps of it, without its
    /// checkpoint.
    pub fn decode(self) -> Result<(TaskKey, LastRow), BackendError> {
        self.decode_checkpointed().map(|(key, last, _)| (key, last))
    }

    /// The row's task, what a snapshot keeps of it, and its checkpoint.
    pub fn decode_checkpointed(
        self,
    ) -> Result<(TaskKey, LastRow, Option<Checkpoint>), BackendError> {
        let checkpoint = self.checkpoint.map(CheckpointColumns::decode).transpose()?;
        Ok((
            TaskKey {
                version: version_from_column(&self.version, "a history row's version")?,
                id: self.task_id,
            },
            LastRow {
                attempt: count_from_column(self.attempt, "a history row's attempt number")?,
                kind: AttemptKind::parse(&self.kind)?,
                state: AttemptState::parse(&self.state)?,
                fence: fence_from_column(self.fence, "a history row's fence")?,
            },
            checkpoint,
        ))
    }
}

impl Snapshot {
    /// A snapshot from the state row and the history rows of the tasks it
    /// covers, oldest first. A missing state row is
    /// `StateColumns::default()`.
    pub fn from_columns(
        state: StateColumns,
        rows: impl IntoIterator<Item = SummaryColumns>,
    ) -> Result<Snapshot, BackendError> {
        let mut snapshot = Snapshot {
            data_version: state
                .data_version
                .as_deref()
                .map(|v| version_from_column(v, "the data version"))
                .transpose()?,
            baseline: state
                .baseline
                .as_deref()
                .map(|v| version_from_column(v, "the baseline"))
                .transpose()?,
            fence: fence_from_column(state.store_fence, "the store's fence")?,
            tasks: Default::default(),
        };
        for row in rows {
            let (key, last, checkpoint) = row.decode_checkpointed()?;
            snapshot.fold_row_checkpointed(key, last, checkpoint);
        }
        Ok(snapshot)
    }

    /// Decides a claim of the store with `fence`, on the state read under
    /// lock: [`BackendError::StaleFence`] if the store has seen a newer fence;
    /// otherwise the snapshot takes `fence`, and the answer says whether the
    /// backend has to write it (it rose).
    pub fn claim(&mut self, fence: u64) -> Result<bool, BackendError> {
        if fence < self.fence {
            return Err(BackendError::StaleFence {
                presented: fence,
                current: self.fence,
            });
        }
        let rose = fence > self.fence;
        self.fence = fence;
        Ok(rose)
    }
}

/// Every column of one history row, as a backend reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryColumns {
    /// What [`Snapshot`]s need of the row.
    pub summary: SummaryColumns,
    /// The holder, as [`Holder::encode`] wrote it.
    pub holder: String,
    /// The task's description.
    pub description: String,
    /// Backend clock at the start (ms since the epoch).
    pub started_ms: i64,
    /// Backend clock at the end.
    pub finished_ms: Option<i64>,
    /// Run time on the runner's clock.
    pub duration_ms: Option<i64>,
    /// Error text of a failure.
    pub error: Option<String>,
}

impl HistoryColumns {
    /// The history entry these columns hold.
    pub fn decode(self) -> Result<HistoryEntry, BackendError> {
        let (key, last, checkpoint) = self.summary.decode_checkpointed()?;
        Ok(HistoryEntry {
            key,
            description: self.description,
            attempt: last.attempt,
            kind: last.kind,
            state: last.state,
            fence: last.fence,
            holder: Holder::decode(&self.holder)?,
            started_at_ms: self.started_ms,
            finished_at_ms: self.finished_ms,
            duration: self
                .duration_ms
                .map(|d| Duration::from_millis(d.max(0) as u64)),
            error: self.error,
            checkpoint,
        })
    }
}

/// What a write does to a store's rows. [`Columns::values`] lists what it
/// binds, in the order each variant names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Write {
    /// Insert a history row in state `running`: version, task id, attempt
    /// (`Int4`), kind ([`AttemptKind::as_str`]), fence (`Int8`), holder
    /// ([`Holder::encode`]), description, then the checkpoint it starts
    /// from: position (`OptText`), saved at (`OptInt8`), done (`OptInt8`),
    /// total (`OptInt8`). [`Columns::checkpoint`] has the same, decoded.
    Start,
    /// End the history row `(version, task id, attempt)`: version, task id,
    /// attempt (`Int4`), state ([`AttemptState::as_str`]), run time in ms
    /// (`Int8`), error (`OptText`).
    Finish,
    /// Set the data version: the version.
    DataVersion,
    /// Set the data version and the baseline: the version.
    Baseline,
    /// Set the checkpoint of the history row `(version, task id, attempt)`:
    /// version, task id, attempt (`Int4`), position (`OptText`, never null
    /// here), saved at (`OptInt8`), done (`OptInt8`), total (`OptInt8`).
    /// [`Columns::checkpoint`] has the same, decoded.
    Checkpoint,
}

/// One value a write binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Text.
    Text(String),
    /// Text or null.
    OptText(Option<String>),
    /// A 32-bit integer.
    Int4(i32),
    /// A 64-bit integer.
    Int8(i64),
    /// A 64-bit integer or null.
    OptInt8(Option<i64>),
}

/// A change as the column values a store writes: what to do, and the values
/// to bind, in the order [`Write`] names. A backend picks its statement by
/// [`Columns::write`] and binds [`Columns::values`] after the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    write: Write,
    values: Vec<Value>,
    checkpoint: Option<CheckpointColumns>,
}

impl Columns {
    /// The column values `change`, written with `fence`, stores.
    pub fn of(fence: u64, change: &Change) -> Result<Columns, BackendError> {
        let attempt = |a: u32| {
            i32::try_from(a).map(Value::Int4).map_err(|_| {
                BackendError::Rejected(format!("attempt {a} does not fit a store column"))
            })
        };
        let text = |t: &str| Value::Text(t.to_owned());
        let checkpoint = match change {
            Change::Start(a) => a.checkpoint.as_ref(),
            Change::Checkpoint(c) => Some(&c.checkpoint),
            _ => None,
        }
        .map(CheckpointColumns::of)
        .transpose()?;
        let checkpoint_values = |c: Option<&CheckpointColumns>| {
            [
                Value::OptText(c.map(|c| c.position.clone())),
                Value::OptInt8(c.map(|c| c.saved_ms)),
                Value::OptInt8(c.and_then(|c| c.done)),
                Value::OptInt8(c.and_then(|c| c.total)),
            ]
        };
        let (write, values) = match change {
            Change::Start(a) => (
                Write::Start,
                [
                    Value::Text(a.key.version.to_string()),
                    text(&a.key.id),
                    attempt(a.attempt)?,
                    text(a.kind.as_str()),
                    Value::Int8(fence_to_column(fence)?),
                    Value::Text(a.holder.encode()),
                    text(&a.description),
                ]
                .into_iter()
                .chain(checkpoint_values(checkpoint.as_ref()))
                .collect(),
            ),
            Change::Checkpoint(c) => (
                Write::Checkpoint,
                [
                    Value::Text(c.key.version.to_string()),
                    text(&c.key.id),
                    attempt(c.attempt)?,
                ]
                .into_iter()
                .chain(checkpoint_values(checkpoint.as_ref()))
                .collect(),
            ),
            Change::Finish(f) => (
                Write::Finish,
                vec![
                    Value::Text(f.key.version.to_string()),
                    text(&f.key.id),
                    attempt(f.attempt)?,
                    text(f.state.as_str()),
                    Value::Int8(i64::try_from(f.duration.as_millis()).unwrap_or(i64::MAX)),
                    Value::OptText(f.error.clone()),
                ],
            ),
            Change::DataVersion(v) => (Write::DataVersion, vec![Value::Text(v.to_string())]),
            Change::Baseline(v) => (Write::Baseline, vec![Value::Text(v.to_string())]),
        };
        Ok(Columns {
            write,
            values,
            checkpoint,
        })
    }

    /// The checkpoint a [`Write::Start`] or [`Write::Checkpoint`] stores,
    /// for a backend that keeps serialised records rather than columns.
    pub fn checkpoint(&self) -> Option<&CheckpointColumns> {
        self.checkpoint.as_ref()
    }

    /// What the write does.
    pub fn write(&self) -> Write {
        self.write
    }

    /// The values to bind, in the order [`Write`] names.
    pub fn values(&self) -> &[Value] {
        &self.values
    }

    /// The values, owned.
    pub fn into_values(self) -> Vec<Value> {
        self.values
    }

    /// Whether other nodes wait on this write: it moves the data version.
    pub fn wakes_waiters(&self) -> bool {
        matches!(self.write, Write::DataVersion | Write::Baseline)
    }
}

/// `base` scaled by a random factor in [0.5, 1.5), so that nodes that started
/// together do not poll together. Follows the seed of
/// `upsilon::testing::seed_thread_rng`, so a simulation replays exactly.
pub fn jitter(base: Duration) -> Duration {
    crate::util::jitter(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder() -> Holder {
        Holder {
            host: "h".into(),
            pod: None,
            pid: 1,
            run_id: "r".into(),
        }
    }

    #[test]
    fn a_live_lease_is_held_and_an_expired_one_is_granted_above_every_fence() {
        let stored = StoredLease {
            holder: holder(),
            fence: 4,
            expires_at_ms: 1_000,
            granted_at_ms: None,
        };
        let ttl = Duration::from_secs(2);
        let held = decide_acquire("s", Some(&stored), 999, [4, 2, 3], &holder(), ttl).unwrap();
        assert!(matches!(held, Acquire::Held(ref i) if i.fence == 4 && i.now_ms == 999));
        let Acquire::Granted(lease) =
            decide_acquire("s", Some(&stored), 1_000, [4, 9, 3], &holder(), ttl).unwrap()
        else {
            panic!("an expired lease is granted");
        };
        assert_eq!((lease.fence, lease.expires_at_ms), (10, 3_000));
    }

    #[test]
    fn corrupt_and_overflowing_values_are_errors_not_grants() {
        assert!(matches!(
            fence_from_column(-1, "the fence"),
            Err(BackendError::Corrupt { .. })
        ));
        assert!(
            decide_acquire("s", None, 0, [i64::MAX as u64], &holder(), Duration::ZERO).is_err()
        );
        assert!(expiry(i64::MAX - 5, Duration::from_millis(10)).is_err());
        assert!(expiry(0, Duration::MAX).is_err());
        assert!(StoredLease::from_columns(Some("not a holder"), Some(1), Some(1)).is_err());
        assert_eq!(
            StoredLease::from_columns(None, Some(1), Some(1)).unwrap(),
            None
        );
    }

    #[test]
    fn a_claim_never_lowers_the_fence() {
        let mut s = Snapshot {
            fence: 3,
            ..Snapshot::default()
        };
        assert!(matches!(
            s.claim(2),
            Err(BackendError::StaleFence {
                presented: 2,
                current: 3
            })
        ));
        assert!(!s.claim(3).unwrap());
        assert!(s.claim(5).unwrap());
        assert_eq!(s.fence, 5);
    }
}
