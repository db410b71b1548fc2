//! Backends wrapped to time what the convergence scenario measures: when a
//! store's last write returned, when a waiting node's wait ended.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use upsilon::backend::{Acquire, Change, HistoryEntry, LeaseInfo, Notice};
use upsilon::backend::{Backend, BackendError, Lease, Lock, Snapshot, Store};
use upsilon::Holder;

/// A store that remembers when its last successful write returned.
#[derive(Debug)]
pub struct TimedStore {
    inner: Arc<dyn Backend>,
    last_write: Mutex<Option<Instant>>,
    /// Whether each successful write also prints `wrote` on stdout (for a
    /// node process whose parent times its lines).
    print: bool,
}

impl TimedStore {
    pub fn new(inner: Arc<dyn Backend>) -> TimedStore {
        TimedStore {
            inner,
            last_write: Mutex::new(None),
            print: false,
        }
    }

    /// A store that prints `wrote` on stdout as each successful write returns.
    pub fn printing(inner: Arc<dyn Backend>) -> TimedStore {
        TimedStore {
            print: true,
            ..TimedStore::new(inner)
        }
    }

    /// Notes a write that succeeded.
    fn wrote(&self, r: Result<(), BackendError>) -> Result<(), BackendError> {
        if r.is_ok() {
            *self.last_write.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            if self.print {
                println!("wrote");
            }
        }
        r
    }

    pub fn last_write(&self) -> Option<Instant> {
        *self.last_write.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Store for TimedStore {
    async fn load(&self, service: &str) -> Result<Snapshot, BackendError> {
        self.inner.load(service).await
    }

    async fn claim(&self, service: &str, fence: u64) -> Result<Snapshot, BackendError> {
        self.inner.claim(service, fence).await
    }

    async fn apply(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
    ) -> Result<(), BackendError> {
        let r = self.inner.apply(service, fence, changes).await;
        self.wrote(r)
    }

    async fn apply_with_notice(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
        notice: &Notice,
    ) -> Result<(), BackendError> {
        let r = self
            .inner
            .apply_with_notice(service, fence, changes, notice)
            .await;
        self.wrote(r)
    }

    fn notice(&self, service: &str) -> Option<Notice> {
        self.inner.notice(service)
    }

    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>, BackendError> {
        self.inner.history(service).await
    }

    async fn services(&self) -> Result<Vec<String>, BackendError> {
        self.inner.services().await
    }
}

/// A waiting node's backend that remembers when its last wait ended (the
/// notification arrived), to tell the wake-up from the read that follows it.
#[derive(Debug)]
pub struct Watched {
    pub inner: Arc<dyn Backend>,
    /// When the last wait ended.
    pub woke: Mutex<Option<Instant>>,
    /// Leases granted to it.
    pub granted: AtomicU64,
    /// Waits it began (polls, for a lock without notifications).
    pub waits: AtomicU64,
}

impl Watched {
    pub fn new(inner: Arc<dyn Backend>) -> Watched {
        Watched {
            inner,
            woke: Mutex::new(None),
            granted: AtomicU64::new(0),
            waits: AtomicU64::new(0),
        }
    }
}

#[async_trait]
impl Lock for Watched {
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        let r = self.inner.try_acquire(service, holder, ttl).await;
        if let Ok(Acquire::Granted(_)) = &r {
            self.granted.fetch_add(1, Ordering::SeqCst);
        }
        r
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, BackendError> {
        self.inner.renew(lease).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        self.inner.release(lease).await
    }

    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        self.inner.current(service).await
    }

    async fn force_release(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        self.inner.force_release(service).await
    }

    async fn prepare_wait(&self, service: &str) -> Result<(), BackendError> {
        self.inner.prepare_wait(service).await
    }

    async fn raise_fence(&self, service: &str, floor: u64) -> Result<(), BackendError> {
        self.inner.raise_fence(service, floor).await
    }

    async fn until_lost(&self, lease: &Lease) -> BackendError {
        self.inner.until_lost(lease).await
    }

    async fn wait(
        &self,
        service: &str,
        seen: &LeaseInfo,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        self.waits.fetch_add(1, Ordering::SeqCst);
        let r = self.inner.wait(service, seen, timeout).await;
        *self.woke.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        r
    }

    fn notifies(&self) -> bool {
        self.inner.notifies()
    }
}

#[async_trait]
impl Store for Watched {
    async fn load(&self, service: &str) -> Result<Snapshot, BackendError> {
        self.inner.load(service).await
    }

    async fn claim(&self, service: &str, fence: u64) -> Result<Snapshot, BackendError> {
        self.inner.claim(service, fence).await
    }

    async fn apply(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
    ) -> Result<(), BackendError> {
        self.inner.apply(service, fence, changes).await
    }

    async fn apply_with_notice(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
        notice: &Notice,
    ) -> Result<(), BackendError> {
        self.inner
            .apply_with_notice(service, fence, changes, notice)
            .await
    }

    fn notice(&self, service: &str) -> Option<Notice> {
        self.inner.notice(service)
    }

    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>, BackendError> {
        self.inner.history(service).await
    }

    async fn services(&self) -> Result<Vec<String>, BackendError> {
        self.inner.services().await
    }
}
