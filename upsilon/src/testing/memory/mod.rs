//! The in-memory backend with fault injection.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backend::{
    decide_acquire, expiry, Acquire, BackendError, Change, HistoryEntry, Lease, LeaseInfo, Lock,
    Notice, Snapshot, StoredLease,
};
use crate::ids::Holder;
use crate::Version;

use super::faults::{After, Fault, Faults, Op};

mod store;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A lease grant, as [`MemoryBackend::grants`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The service.
    pub service: String,
    /// The fence granted.
    pub fence: u64,
    /// To whom.
    pub holder: Holder,
    /// Backend clock at the grant (ms).
    pub at_ms: i64,
}

/// A committed store write, as [`MemoryBackend::commits`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// The service.
    pub service: String,
    /// The fence the write carried.
    pub fence: u64,
    /// The store's newest fence when it committed (S2: equal to `fence`).
    pub newest: u64,
    /// What was written (replays already held by the store left out).
    pub changes: Vec<Change>,
    /// The state after the write.
    pub after: Snapshot,
}

#[derive(Debug, Default)]
struct Service {
    /// The current grant.
    lease: Option<StoredLease>,
    /// Fences granted so far; never decreases.
    granted: u64,
    snapshot: Snapshot,
    history: Vec<HistoryEntry>,
    corrupt: bool,
    /// When the current holder's session ended, if it did (backend clock).
    session_ended_ms: Option<i64>,
    /// The newest fence granted or claimed, kept apart from the state (the
    /// lease, the counters, the data version), as the SQL backends keep
    /// theirs: deleting the state does not lower the next grant's fence.
    fence_floor: u64,
    /// The holders' notice with the highest fence.
    notice: Option<Notice>,
    /// The data version, baseline and fence the last load found (see
    /// [`MemoryBackend::set_store_moved_answers`]).
    read: Option<(Option<Version>, Option<Version>, u64)>,
}

/// How the in-memory backend models a lease tied to its holder's session,
/// as PostgreSQL's is: when the session ends, the holder learns of it within
/// `detection` and waiting nodes may take the lease over `grace` after the
/// end, before its expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionModel {
    /// How long after its session ends the holder's
    /// [`Lock::until_lost`] resolves; `None`: never (loss detection off, a
    /// negative control).
    pub detection: Option<Duration>,
    /// How long after the session ended another node may be granted the
    /// lease.
    pub grace: Duration,
}

impl Default for SessionModel {
    fn default() -> Self {
        SessionModel {
            detection: Some(Duration::from_millis(300)),
            grace: Duration::from_millis(600),
        }
    }
}

/// An in-memory [`Lock`] + [`Store`] for tests, with fault injection.
///
/// Its clock is tokio's, so `tokio::time::pause` and `advance` drive lease
/// expiry; [`MemoryBackend::jump_clock`] moves it by hand. Waiters are woken
/// at once on release and on every write.
pub struct MemoryBackend {
    services: Mutex<BTreeMap<String, Service>>,
    grants: Mutex<Vec<Grant>>,
    commits: Mutex<Vec<Commit>>,
    skip_fence_check: std::sync::atomic::AtomicBool,
    /// See [`MemoryBackend::set_lock_apart`].
    lock_apart: std::sync::atomic::AtomicBool,
    /// See [`MemoryBackend::set_store_moved_answers`].
    store_moved: std::sync::atomic::AtomicBool,
    faults: Faults,
    notify: Notify,
    origin: Instant,
    origin_ms: i64,
    jump_ms: Mutex<i64>,
    sessions: Mutex<SessionModel>,
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("services", &lock(&self.services).len())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        MemoryBackend {
            services: Mutex::default(),
            grants: Mutex::default(),
            commits: Mutex::default(),
            skip_fence_check: Default::default(),
            lock_apart: Default::default(),
            store_moved: Default::default(),
            faults: Faults::default(),
            notify: Notify::new(),
            origin: Instant::now(),
            origin_ms: 1_700_000_000_000,
            jump_ms: Mutex::new(0),
            sessions: Mutex::default(),
        }
    }
}

impl MemoryBackend {
    /// A new, empty backend.
    pub fn new() -> Arc<MemoryBackend> {
        Arc::new(MemoryBackend::default())
    }

    /// The faults armed on this backend.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Every lease granted so far, oldest first.
    pub fn grants(&self) -> Vec<Grant> {
        lock(&self.grants).clone()
    }

    /// Every store write committed so far, oldest first.
    pub fn commits(&self) -> Vec<Commit> {
        lock(&self.commits).clone()
    }

    /// Negative control for simulations: the store stops checking fences, so
    /// a stale holder's writes commit. Never use it outside a test of the
    /// test harness itself.
    #[cfg(feature = "_negative-controls")]
    pub fn skip_fence_check(&self) {
        self.skip_fence_check
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn fence_check_skipped(&self) -> bool {
        self.skip_fence_check
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The backend's clock, in ms since the epoch.
    pub fn now_ms(&self) -> i64 {
        self.origin_ms + self.origin.elapsed().as_millis() as i64 + *lock(&self.jump_ms)
    }

    /// Moves the backend's clock by `ms` (negative: back).
    pub fn jump_clock(&self, ms: i64) {
        *lock(&self.jump_ms) += ms;
    }

    /// Models a lock kept in another system than the store (a Redis lock in
    /// front of a PostgreSQL store): a grant is above the lock's own grant
    /// counter only, not above the store's fence or the history's, which
    /// that lock cannot read. With [`MemoryBackend::forget_lock`], a lock
    /// that loses its state.
    pub fn set_lock_apart(&self, on: bool) {
        self.lock_apart
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Models a lock that is its own store and answers
    /// [`Acquire::StoreMoved`] as PostgreSQL's does: a request that finds
    /// the lease free is not granted when the service's data version,
    /// baseline or fence changed since the last [`Store::load`] of it (by
    /// any caller of this backend), once per load. Off by default.
    pub fn set_store_moved_answers(&self, on: bool) {
        self.store_moved
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// The state a load records for [`MemoryBackend::set_store_moved_answers`].
    fn read_state(s: &Service) -> (Option<Version>, Option<Version>, u64) {
        let snap = &s.snapshot;
        (snap.data_version.clone(), snap.baseline.clone(), snap.fence)
    }

    /// Models a lock that loses its state (a Redis restarted without its
    /// data): the lease of `service`, live or not, and its grant counter are
    /// gone, while the store keeps everything. Only with
    /// [`MemoryBackend::set_lock_apart`] (a backend that is its own store
    /// keeps its fences there); returns whether a live lease was forgotten.
    pub fn forget_lock(&self, service: &str) -> bool {
        let now = self.now_ms();
        let forgot = match lock(&self.services).get_mut(service) {
            Some(s) => {
                let live = s.lease.take().is_some_and(|l| l.expires_at_ms > now);
                s.granted = 0;
                s.session_ended_ms = None;
                live
            }
            None => false,
        };
        self.notify.notify_waiters();
        forgot
    }

    /// The newest fence the store of `service` has seen, read past any
    /// injected fault.
    pub fn store_fence(&self, service: &str) -> u64 {
        lock(&self.services)
            .get(service)
            .map_or(0, |s| s.snapshot.fence)
    }

    /// Makes the current lease of `service` expire now: its holder loses it
    /// at its next renewal.
    pub fn expire_lease(&self, service: &str) {
        let now = self.now_ms();
        if let Some(s) = lock(&self.services).get_mut(service) {
            if let Some(lease) = &mut s.lease {
                lease.expires_at_ms = now;
            }
        }
        self.notify.notify_waiters();
    }

    /// Sets how a lease follows its holder's session (see [`SessionModel`]).
    pub fn set_session_model(&self, model: SessionModel) {
        *lock(&self.sessions) = model;
    }

    /// Ends the session of the current holder of `service`'s lease, as a
    /// server that terminates a connection does. The holder's
    /// [`Lock::until_lost`] resolves after the model's detection time, and
    /// other nodes may take the lease over after its grace. `false` if no
    /// lease is held.
    pub fn end_session(&self, service: &str) -> bool {
        let now = self.now_ms();
        let ended = match lock(&self.services).get_mut(service) {
            Some(s) if s.lease.as_ref().is_some_and(|l| l.expires_at_ms > now) => {
                s.session_ended_ms.get_or_insert(now);
                true
            }
            _ => false,
        };
        self.notify.notify_waiters();
        ended
    }

    /// When another node may take over the lease of `s`, if its holder's
    /// session ended.
    fn takeover_at(&self, s: &Service) -> Option<i64> {
        let grace = lock(&self.sessions).grace.as_millis() as i64;
        s.session_ended_ms.map(|ended| ended + grace)
    }

    /// Deletes the state of `service` (the lease, the grant counter, the data
    /// version, the baseline, the store's fence) behind the backend's back,
    /// as an operator deleting a state row would; the history stays.
    pub fn delete_state(&self, service: &str) {
        if let Some(s) = lock(&self.services).get_mut(service) {
            s.lease = None;
            s.granted = 0;
            s.session_ended_ms = None;
            s.snapshot.data_version = None;
            s.snapshot.baseline = None;
            s.snapshot.fence = 0;
        }
    }

    /// Deletes every history row of `service` behind the backend's back.
    pub fn delete_history(&self, service: &str) {
        if let Some(s) = lock(&self.services).get_mut(service) {
            s.history.clear();
            s.snapshot.tasks.clear();
        }
    }

    /// Marks the stored data of `service` as unparsable (or parsable again).
    pub fn set_corrupt(&self, service: &str, corrupt: bool) {
        lock(&self.services)
            .entry(service.to_owned())
            .or_default()
            .corrupt = corrupt;
    }

    async fn fault(&self, op: Op) -> Result<After, BackendError> {
        match self.faults.take(op) {
            None => Ok(After::Reply),
            Some(Fault::Unavailable) => Err(BackendError::unavailable(format!(
                "injected fault: {op:?} unavailable"
            ))),
            Some(Fault::Broken) => Err(BackendError::other(format!(
                "injected fault: {op:?} broken"
            ))),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(After::Reply)
            }
            Some(Fault::LoseReply) => Ok(After::LoseReply),
            Some(Fault::DelayReply(d)) => Ok(After::DelayReply(d)),
        }
    }

    async fn lose_reply<T>(
        after: After,
        op: Op,
        result: Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        match (after, result) {
            (After::LoseReply, Ok(_)) => Err(BackendError::unavailable(format!(
                "injected fault: the reply of {op:?} was lost"
            ))),
            (After::DelayReply(d), r) => {
                tokio::time::sleep(d).await;
                r
            }
            (_, r) => r,
        }
    }

    fn with_service<T>(
        &self,
        service: &str,
        f: impl FnOnce(&mut Service, i64) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let now = self.now_ms();
        let mut services = lock(&self.services);
        let s = services.entry(service.to_owned()).or_default();
        f(s, now)
    }

    fn holds(held: &StoredLease, lease: &Lease, now: i64) -> bool {
        held.holder == lease.holder && held.fence == lease.fence && held.expires_at_ms > now
    }

    fn readable(s: &Service) -> Result<(), BackendError> {
        if s.corrupt {
            Err(BackendError::corrupt("the data version is not a version"))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Lock for MemoryBackend {
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        let lost_reply = self.fault(Op::Acquire).await?;
        let r = self.with_service(service, |s, now| {
            let gone = self.takeover_at(s).is_some_and(|at| now >= at);
            let stored = s.lease.as_ref().filter(|_| !gone);
            let history = s.history.iter().map(|r| r.fence).max().unwrap_or(0);
            let seen = if self.lock_apart.load(std::sync::atomic::Ordering::SeqCst) {
                [s.granted, 0, 0, 0]
            } else {
                [s.granted, s.snapshot.fence, history, s.fence_floor]
            };
            let decision = decide_acquire(service, stored, now, seen, holder, ttl)?;
            let moved = self.store_moved.load(std::sync::atomic::Ordering::SeqCst)
                && matches!(decision, Acquire::Granted(_))
                && s.read.as_ref().is_some_and(|r| *r != Self::read_state(s));
            if moved {
                s.read = None;
                return Ok(Acquire::StoreMoved);
            }
            if let Acquire::Granted(lease) = &decision {
                s.session_ended_ms = None;
                s.granted = lease.fence;
                s.fence_floor = lease.fence;
                s.lease = Some(StoredLease {
                    holder: holder.clone(),
                    fence: lease.fence,
                    expires_at_ms: lease.expires_at_ms,
                    granted_at_ms: Some(now),
                });
                lock(&self.grants).push(Grant {
                    service: service.to_owned(),
                    fence: lease.fence,
                    holder: holder.clone(),
                    at_ms: now,
                });
            }
            Ok(decision)
        });
        Self::lose_reply(lost_reply, Op::Acquire, r).await
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, BackendError> {
        let lost_reply = self.fault(Op::Renew).await?;
        let r = self.with_service(&lease.service, |s, now| match &mut s.lease {
            Some(held) if Self::holds(held, lease, now) => {
                held.expires_at_ms = expiry(now, lease.ttl)?;
                Ok(Lease {
                    expires_at_ms: held.expires_at_ms,
                    ..lease.clone()
                })
            }
            _ => Err(BackendError::lease_lost("renew", lease)),
        });
        Self::lose_reply(lost_reply, Op::Renew, r).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        let lost_reply = self.fault(Op::Release).await?;
        let r = self.with_service(&lease.service, |s, now| match &s.lease {
            Some(held) if Self::holds(held, lease, now) => {
                s.lease = None;
                s.session_ended_ms = None;
                Ok(())
            }
            _ => Err(BackendError::lease_lost("release", lease)),
        });
        self.notify.notify_waiters();
        Self::lose_reply(lost_reply, Op::Release, r).await
    }

    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        self.with_service(service, |s, now| {
            let gone = self.takeover_at(s).is_some_and(|at| now >= at);
            Ok(s.lease.as_ref().filter(|_| !gone).and_then(|l| l.live(now)))
        })
    }

    async fn force_release(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        let freed = self.with_service(service, |s, now| {
            let freed = s.lease.take().and_then(|l| l.live(now));
            s.session_ended_ms = None;
            Ok(freed)
        });
        self.notify.notify_waiters();
        freed
    }

    async fn raise_fence(&self, service: &str, floor: u64) -> Result<(), BackendError> {
        self.with_service(service, |s, _| {
            s.granted = s.granted.max(floor);
            Ok(())
        })
    }

    async fn wait(
        &self,
        service: &str,
        seen: &LeaseInfo,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // A change that happened after `seen` was read: no need to wait.
        let (changed, takeover_in) = self.with_service(service, |s, now| {
            let changed = match &s.lease {
                Some(l) => {
                    l.holder != seen.holder || l.fence != seen.fence || l.expires_at_ms <= now
                }
                None => true,
            };
            let takeover_in = self
                .takeover_at(s)
                .map(|at| Duration::from_millis((at - now).max(0) as u64));
            Ok((changed, takeover_in))
        })?;
        if !changed {
            let timeout = takeover_in.map_or(timeout, |t| t.min(timeout));
            let _ = tokio::time::timeout(timeout, notified).await;
        }
        Ok(())
    }

    fn notifies(&self) -> bool {
        true
    }

    async fn until_lost(&self, lease: &Lease) -> BackendError {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let detection = lock(&self.sessions).detection;
            let ended = self
                .with_service(&lease.service, |s, _| {
                    let ours = s
                        .lease
                        .as_ref()
                        .is_some_and(|l| l.holder == lease.holder && l.fence == lease.fence);
                    Ok(s.session_ended_ms.filter(|_| ours))
                })
                .ok()
                .flatten();
            match (ended, detection) {
                (Some(ended), Some(detection)) => {
                    let at = ended + detection.as_millis() as i64;
                    let left = (at - self.now_ms()).max(0) as u64;
                    tokio::time::sleep(Duration::from_millis(left)).await;
                    return BackendError::LeaseLost(format!(
                        "the session of {} (fence {}) ended",
                        lease.holder, lease.fence
                    ));
                }
                _ => notified.await,
            }
        }
    }
}
