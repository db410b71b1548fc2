//! For backend authors: the two traits a backend implements, [`Lock`] and
//! [`Store`], the values that cross them, and the kit that makes every
//! protocol decision, so that a backend's methods stay thin atomic reads and
//! writes in its own store.
//!
//! A lease only elects who works; safety comes from the store, which refuses
//! any write stamped with a fence older than the newest it has seen.
//!
//! # Writing a backend
//!
//! `upsilon-backends/src/sqlite/` is the worked example: a few hundred lines
//! of SQL and column mapping, no protocol logic. Each method is one atomic
//! operation in the backend's store (a transaction, a compare-and-set, a
//! script):
//!
//! | method | read | decide with | write |
//! |---|---|---|---|
//! | [`Lock::try_acquire`] | the lease row, the clock, every fence counter the store keeps | [`decide_acquire`] | on [`Acquire::Granted`]: holder, fence, expiry |
//! | [`Lock::renew`] / [`Lock::release`] | — | compare on (holder, fence, unexpired) in the store itself | the new expiry ([`expiry`]) / nothing; [`BackendError::lease_lost`] when the compare fails |
//! | [`Lock::current`] | the lease row, the clock | [`StoredLease::live`] | — |
//! | [`Store::load`] | the state row and the history's summary columns | [`Snapshot::from_columns`] | — |
//! | [`Store::claim`] | the same, under lock | [`Snapshot::claim`] | the store's fence, when it rose |
//! | [`Store::apply`] | the same, for the tasks [`Change::touched`] names | [`Snapshot::check`] | [`Columns::of`] each change it returns |
//! | [`Store::history`] | every history row | [`HistoryColumns::decode`] | — |
//! | [`Store::services`] | the services with a state or history row | — | — |
//! | [`Lock::force_release`] | the lease row, the clock | [`StoredLease::live`] | clear the lease (holder, fence, expiry), keep the grant counter |
//! | [`Lock::raise_fence`] | the grant counter | max(counter, floor) | the counter |
//!
//! A backend that keeps the time of each grant (the `now_ms` it wrote the
//! grant with) reports it through [`StoredLease::granted_at`], so that an
//! operator sees how long a lease has been held.
//!
//! A backend with change notifications also implements [`Lock::wait`] and
//! [`Lock::notifies`]: a waiting node then sleeps until the lease is
//! released or the data version changes ([`Columns::wakes_waiters`] says
//! which writes do). Randomness (poll jitter) comes from [`jitter`], so that
//! a seeded simulation replays exactly.
//!
//! Then run the conformance suite, `upsilon::testing::conformance` (feature
//! `testing`), against the backend: it checks S1, S2, S3, S4 and S6, the
//! wake-ups, and what happens when rows are deleted or corrupt.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::ids::Holder;

mod checkpoint_columns;
mod kit;
mod notice;
mod unlock;

pub use crate::state::{
    Acquire, AttemptKind, AttemptState, BackendError, Change, Checkpoint, FinishAttempt,
    HistoryEntry, LastRow, Lease, LeaseInfo, SaveCheckpoint, Snapshot, StartAttempt, TaskSummary,
    UNLOCK_TASK_ID,
};
pub use checkpoint_columns::CheckpointColumns;
pub use kit::{
    decide_acquire, expiry, fence_from_column, fence_to_column, jitter, ttl_ms,
    version_from_column, Columns, HistoryColumns, StateColumns, StoredLease, SummaryColumns, Value,
    Write,
};
pub use notice::{Notice, PlanDigest, PlanHasher};
pub use unlock::{unlock, Unlocked, UNLOCK_TTL};

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

    /// The unexpired lease of `service`, if any: `None` once a request for
    /// it would be granted (it expired, or its holder's session ended and a
    /// takeover is allowed). A polling node that finds the lease it last saw
    /// still here waits again without asking for it.
    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError>;

    /// Frees the unexpired lease of `service`, whoever holds it, and returns
    /// what it freed (`None`: no lease was held, nothing changed). The
    /// operator's escape hatch: call [`unlock()`] rather than this alone, so
    /// that the store fences the old holder out and the history records it.
    ///
    /// One atomic operation. The grant counter stays, so the next grant's
    /// fence is above the freed one (S1; [`decide_acquire`] takes every fence
    /// seen). The old holder's renewals and releases then fail with
    /// [`BackendError::LeaseLost`]. A backend with notifications wakes its
    /// waiters, as a release does.
    async fn force_release(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError>;

    /// Makes every later grant of `service` carry a fence above `floor`. The
    /// lease itself is not touched: a lease held now keeps its fence.
    ///
    /// The runner calls it when this lock granted a fence that the store
    /// has already seen (a lock in one system in front of a store in
    /// another: a new lock, or one that lost its counter). It releases that
    /// lease, raises the floor to the store's fence and asks again, so that
    /// the cluster catches up instead of being refused by the store forever.
    /// Raising a counter that only grows can never let a fence be granted
    /// twice (S1). The default refuses; a lock that can share a service
    /// with another system's store implements it.
    async fn raise_fence(&self, service: &str, floor: u64) -> Result<(), BackendError> {
        let _ = floor;
        Err(BackendError::Rejected(format!(
            "the lock of `{service}` cannot raise its fence counter"
        )))
    }

    /// Gets ready to wait for `service`: opens what [`Lock::wait`] and
    /// [`Lock::try_acquire`] will need (a listening session, a
    /// subscription) if it is not open yet. The runner calls it once a
    /// start-up read has found work to do, before it first asks for the
    /// lease, and reads the store again if this (or anything else) took
    /// long, so that a node whose preparation outlasted another node's
    /// upgrade does not take the lease only to find nothing left to do.
    /// A failure here is not the runner's to report: the next call opens
    /// what it needs, or polls. The default does nothing.
    async fn prepare_wait(&self, service: &str) -> Result<(), BackendError> {
        let _ = service;
        Ok(())
    }

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

    /// Resolves as soon as this backend knows that `lease` may no longer be
    /// held by the caller: the session it is tied to closed, a check of it
    /// failed or timed out, a keep-alive broke. The answer says why
    /// (usually [`BackendError::LeaseLost`]).
    ///
    /// The runner awaits it beside the running task while it holds `lease`
    /// and cancels the task the moment it resolves (invariant E1). A backend
    /// that lets another node take a lease over before its expiry (because
    /// the holder's session ended) must resolve this, on the holder, before
    /// that takeover can happen: see docs/DESIGN.md for the bound. The
    /// default never resolves: the holder's renewals and local deadline
    /// decide, and the backend must then never grant the lease before it
    /// expires.
    async fn until_lost(&self, lease: &Lease) -> BackendError {
        let _ = lease;
        std::future::pending().await
    }
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

    /// [`Store::apply`], and with the write, once it commits, `notice` to
    /// every node waiting on `service` that reads this store's
    /// notifications, so that a waiting node with the same plan inputs is
    /// READY without a read ([`Notice`] says what it promises). The runner
    /// sends its last write of a finished plan this way. The notice must
    /// reach no node unless the write commits: sent in the same transaction
    /// or atomic operation. The default sends none and only applies.
    async fn apply_with_notice(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
        notice: &Notice,
    ) -> Result<(), BackendError> {
        let _ = notice;
        self.apply(service, fence, changes).await
    }

    /// The notice with the highest fence this backend has received for
    /// `service` (from any node, by [`Store::apply_with_notice`]), if any.
    /// A waiting node asks after each wake-up and trusts a notice whose
    /// fence is at least its last read's and whose digest is its own. The
    /// default knows none: waiting nodes read the store.
    fn notice(&self, service: &str) -> Option<Notice> {
        let _ = service;
        None
    }

    /// Every history row of `service`, oldest first.
    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>, BackendError>;

    /// The services this store holds anything for (a data version, a
    /// baseline, a fence above 0, a lease grant or a history row), in
    /// lexicographic order. A service that was only read is not listed.
    async fn services(&self) -> Result<Vec<String>, BackendError>;
}

/// A backend that is both the [`Lock`] and the [`Store`], as
/// [`Builder::backend`](crate::Builder::backend) takes it. Implemented for
/// every type that implements both.
pub trait Backend: Lock + Store {}

impl<T: Lock + Store + ?Sized> Backend for T {}
