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

const TTL: Duration = Duration::from_secs(3);

fn node(lock: Arc<dyn Lock>, store: Arc<MemoryBackend>, n: usize) -> Upsilon {
    Upsilon::builder()
        .service("svc")
        .app_version("1.1")
        .lock(lock)
        .store(store)
        .holder(testing::holder(n))
        .ttl(TTL)
        .poll_interval(Duration::from_millis(50))
        .tasks([task("1.0", "create"), task("1.1", "backfill")])
        .build()
        .unwrap()
}

/// The first grants of a new lock are behind the store: nothing runs under
/// them, and the lock is raised only a TTL after the first (the lock may
/// have forgotten a live lease); then one node upgrades above the store's
/// fence and the other waits.
#[tokio::test(start_paused = true)]
async fn a_new_lock_in_front_of_a_used_store_catches_up_after_one_ttl() {
    let store = used_store().await;
    let lock = MemoryBackend::new();
    let (one, two) = (
        node(lock.clone(), store.clone(), 2),
        node(lock.clone(), store.clone(), 3),
    );
    let (a, b) = tokio::join!(one.run(), two.run());
    let (a, b) = (a.unwrap(), b.unwrap());
    let upgraded: Vec<&Outcome> = [&a, &b]
        .into_iter()
        .filter(|o| matches!(o, Outcome::Upgraded { .. }))
        .collect();
    assert_eq!(upgraded.len(), 1, "one upgrade, one wait: {a:?} / {b:?}");
    let Outcome::Upgraded { report } = upgraded[0] else {
        unreachable!()
    };
    assert!(report.fence > 40, "upgraded with fence {}", report.fence);
    // Every grant of the first TTL is behind the store (each node's, as
    // the store's raised fence bars the lock's counter); the first one
    // above it comes a TTL after the first.
    let grants = lock.grants();
    let first = grants[0].at_ms;
    let (early, late): (Vec<_>, Vec<_>) = grants
        .iter()
        .partition(|g| g.at_ms < first + TTL.as_millis() as i64);
    assert!(early.iter().all(|g| g.fence <= 40), "{grants:?}");
    assert!(
        !late.is_empty() && late.iter().all(|g| g.fence > 40),
        "{grants:?}"
    );
    assert_eq!(lock.current("svc").await.unwrap(), None);
    let history = store.history("svc").await.unwrap();
    let backfill: Vec<_> = history.iter().filter(|r| r.key.id == "backfill").collect();
    assert_eq!(backfill.len(), 1, "{history:?}");
    assert_eq!(backfill[0].fence, report.fence);
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

#[tokio::test(start_paused = true)]
async fn a_lock_that_cannot_raise_its_fence_fails_with_a_clear_error_and_runs_nothing() {
    let store = used_store().await;
    let lock = MemoryBackend::new();
    let err = node(Arc::new(Fixed(lock.clone())), store.clone(), 2)
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
