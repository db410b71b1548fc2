//! A lock and a store in different systems: the lock's fences must rise above
//! every fence the store has seen, or the store refuses every claim.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use upsilon::backend::{Acquire, BackendError, Lease, LeaseInfo, Lock, Store};
use upsilon::testing::{self, MemoryBackend};
use upsilon::{Error, Holder, Outcome, Task, TaskContext, TaskFuture, Upsilon};

fn task(version: &str, id: &str) -> Task {
    Task::new(version, 1, id, |_: &mut TaskContext| -> TaskFuture<'_> {
        Box::pin(async { Ok(()) })
    })
    .unwrap()
}

/// A store that has been used with another lock up to fence 40.
async fn used_store() -> Arc<MemoryBackend> {
    let store = MemoryBackend::new();
    let outcome = Upsilon::builder()
        .service("svc")
        .app_version("1.0")
        .backend(store.clone())
        .tasks([task("1.0", "create")])
        .build()
        .unwrap()
        .run()
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Upgraded { .. }));
    store.claim("svc", 40).await.unwrap();
    store
}

fn node(lock: Arc<dyn Lock>, store: Arc<MemoryBackend>) -> Upsilon {
    Upsilon::builder()
        .service("svc")
        .app_version("1.1")
        .lock(lock)
        .store(store)
        .holder(testing::holder(2))
        .ttl(Duration::from_secs(3))
        .tasks([task("1.0", "create"), task("1.1", "backfill")])
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_new_lock_in_front_of_a_used_store_catches_up_with_its_fence() {
    let store = used_store().await;
    let lock = MemoryBackend::new();
    let outcome = node(lock.clone(), store.clone()).run().await.unwrap();
    let Outcome::Upgraded { report } = outcome else {
        panic!("expected an upgrade, got {outcome:?}");
    };
    assert!(report.fence > 40, "upgraded with fence {}", report.fence);
    let fences: Vec<u64> = lock.grants().iter().map(|g| g.fence).collect();
    assert_eq!(
        fences.len(),
        2,
        "the stale grant, then one above the store's: {fences:?}"
    );
    assert!(fences[0] <= 40 && fences[1] > 40, "{fences:?}");
    // The stale grant was released at once, not left to expire.
    assert_eq!(lock.current("svc").await.unwrap(), None);
    let history = store.history("svc").await.unwrap();
    let backfill = history.iter().find(|r| r.key.id == "backfill").unwrap();
    assert_eq!(backfill.fence, report.fence);
}

/// A lock that keeps the trait's default `raise_fence` (it refuses).
#[derive(Debug)]
struct Fixed(Arc<MemoryBackend>);

#[async_trait]
impl Lock for Fixed {
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        self.0.try_acquire(service, holder, ttl).await
    }
    async fn renew(&self, lease: &Lease) -> Result<Lease, BackendError> {
        self.0.renew(lease).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        self.0.release(lease).await
    }
    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        self.0.current(service).await
    }
    async fn force_release(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        self.0.force_release(service).await
    }
}

#[tokio::test]
async fn a_lock_that_cannot_raise_its_fence_fails_with_a_clear_error_and_runs_nothing() {
    let store = used_store().await;
    let lock = MemoryBackend::new();
    let err = node(Arc::new(Fixed(lock.clone())), store.clone())
        .run()
        .await
        .unwrap_err();
    let Error::Backend { during, source } = &err else {
        panic!("expected a backend error, got {err:?}");
    };
    assert!(during.contains("raising the lock's fence"), "{during}");
    assert!(
        source
            .to_string()
            .contains("cannot raise its fence counter"),
        "{source}"
    );
    assert_eq!(
        lock.current("svc").await.unwrap(),
        None,
        "the lease was released"
    );
    let history = store.history("svc").await.unwrap();
    assert!(
        history.iter().all(|r| r.key.id == "create"),
        "nothing ran: {history:?}"
    );
}
