//! The in-memory backend passes the conformance suite every backend runs, and
//! the suite rejects backends that break its rules.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use upsilon::backend::{
    Acquire, BackendError, Change, HistoryEntry, Lease, LeaseInfo, Lock, Snapshot, Store,
};
use upsilon::testing::conformance::{self, Harness, Notices, Wake};
use upsilon::testing::MemoryBackend;
use upsilon::Holder;

struct Memory(Arc<MemoryBackend>);

#[async_trait]
impl Harness for Memory {
    fn lock(&self) -> Arc<dyn Lock> {
        self.0.clone()
    }
    fn store(&self) -> Arc<dyn Store> {
        self.0.clone()
    }
    async fn corrupt(&self, service: &str) {
        self.0.set_corrupt(service, true);
    }
    async fn repair(&self, service: &str) {
        self.0.set_corrupt(service, false);
    }
    async fn delete_state_row(&self, service: &str) -> bool {
        self.0.delete_state(service);
        true
    }
    async fn delete_history(&self, service: &str) -> bool {
        self.0.delete_history(service);
        true
    }
}

#[tokio::test(start_paused = true)]
async fn memory_backend_conforms() {
    let report = conformance::run_all(&Memory(MemoryBackend::new())).await;
    assert_eq!(report.wake, Wake::Notifies, "waiters are woken at once");
    assert_eq!(report.notices, Notices::Delivered);
    // No format marker: nothing else is skipped.
    assert_eq!(report.skipped, ["unknown_format_refused"]);
}

// ---------------------------------------------------------------------------
// The suite rejects a backend that breaks a rule: a wrapper around the memory
// backend with one flaw each.

/// What is wrong with a [`Flawed`] backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    /// Nothing: the wrapper only forwards.
    None,
    /// Every grant reports fence 1, as a backend that lost its counter would.
    ReusesFence,
    /// Says it notifies, but `wait` only sleeps out its timeout.
    NeverWakes,
    /// Says it notifies, but `wait` only looks once whether the lease changed
    /// and then sleeps out its timeout: it misses changes made while it waits.
    LooksOnce,
    /// Says it notifies, but `wait` returns at once every time.
    NeverBlocks,
}

#[derive(Debug)]
struct Flawed {
    inner: Arc<MemoryBackend>,
    flaw: Flaw,
}

#[async_trait]
impl Lock for Flawed {
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        match self.inner.try_acquire(service, holder, ttl).await? {
            Acquire::Granted(lease) if self.flaw == Flaw::ReusesFence => {
                Ok(Acquire::Granted(Lease { fence: 1, ..lease }))
            }
            other => Ok(other),
        }
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
    async fn wait(
        &self,
        service: &str,
        seen: &LeaseInfo,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        match self.flaw {
            Flaw::None | Flaw::ReusesFence => self.inner.wait(service, seen, timeout).await,
            Flaw::NeverWakes => {
                tokio::time::sleep(timeout).await;
                Ok(())
            }
            Flaw::LooksOnce => {
                let now = self.inner.current(service).await?;
                if now.is_none_or(|l| (&l.holder, l.fence) != (&seen.holder, seen.fence)) {
                    return Ok(());
                }
                tokio::time::sleep(timeout).await;
                Ok(())
            }
            Flaw::NeverBlocks => Ok(()),
        }
    }
    fn notifies(&self) -> bool {
        true
    }
}

#[async_trait]
impl Store for Flawed {
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
    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>, BackendError> {
        self.inner.history(service).await
    }
    async fn services(&self) -> Result<Vec<String>, BackendError> {
        self.inner.services().await
    }
}

struct FlawedHarness(Arc<Flawed>);

#[async_trait]
impl Harness for FlawedHarness {
    fn lock(&self) -> Arc<dyn Lock> {
        self.0.clone()
    }
    fn store(&self) -> Arc<dyn Store> {
        self.0.clone()
    }
    async fn corrupt(&self, service: &str) {
        self.0.inner.set_corrupt(service, true);
    }
    async fn repair(&self, service: &str) {
        self.0.inner.set_corrupt(service, false);
    }
}

async fn run_flawed(flaw: Flaw) -> conformance::Report {
    let backend = Flawed {
        inner: MemoryBackend::new(),
        flaw,
    };
    conformance::run_all(&FlawedHarness(Arc::new(backend))).await
}

#[tokio::test(start_paused = true)]
async fn the_wrapper_without_a_flaw_conforms() {
    let report = run_flawed(Flaw::None).await;
    assert_eq!(report.wake, Wake::Notifies);
}

#[tokio::test(start_paused = true)]
#[should_panic(
    expected = "conformance check `fence_grows` failed: fence_grows: grant 2 got fence 1"
)]
async fn a_backend_that_reuses_a_fence_is_rejected() {
    run_flawed(Flaw::ReusesFence).await;
}

#[tokio::test(start_paused = true)]
#[should_panic(expected = "conformance check `wait_wakes_on_release` failed")]
async fn a_notifying_backend_whose_wait_never_wakes_is_rejected() {
    run_flawed(Flaw::NeverWakes).await;
}

#[tokio::test(start_paused = true)]
#[should_panic(expected = "conformance check `wait_wakes_on_release` failed")]
async fn a_notifying_backend_whose_wait_misses_changes_while_it_waits_is_rejected() {
    run_flawed(Flaw::LooksOnce).await;
}

#[tokio::test(start_paused = true)]
#[should_panic(expected = "conformance check `wait_blocks_until_a_change` failed")]
async fn a_notifying_backend_whose_wait_never_blocks_is_rejected() {
    run_flawed(Flaw::NeverBlocks).await;
}
