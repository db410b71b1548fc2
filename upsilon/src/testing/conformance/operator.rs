//! What an operator's tool asks of a backend: the services a store holds,
//! and freeing a lease by force without lowering the fence.

use crate::backend::{BackendError, Change};

use super::{grant, holder, v, Harness, TTL};

/// `force_release` frees a live lease and says what it freed; the old
/// holder can then neither renew nor release (S6), the next grant's fence is
/// above it (S1), and a free lease gives `None` and changes nothing.
pub async fn force_release_keeps_the_fence(h: &dyn Harness, service: &str) {
    let check = "force_release_keeps_the_fence";
    let lock = h.lock();
    assert_eq!(
        lock.force_release(service).await.expect("force_release"),
        None,
        "{check}: nothing to free"
    );
    let held = grant(&*lock, service, &holder(1), TTL).await;
    let freed = lock
        .force_release(service)
        .await
        .expect("force_release")
        .unwrap_or_else(|| panic!("{check}: a live lease was not reported freed"));
    assert_eq!(
        (&freed.holder, freed.fence),
        (&held.holder, held.fence),
        "{check}"
    );
    assert_eq!(
        lock.current(service).await.expect("current"),
        None,
        "{check}"
    );
    assert!(
        matches!(lock.renew(&held).await, Err(BackendError::LeaseLost(_))),
        "{check}: the freed holder renewed"
    );
    assert!(
        matches!(lock.release(&held).await, Err(BackendError::LeaseLost(_))),
        "{check}: the freed holder released"
    );
    let next = grant(&*lock, service, &holder(2), TTL).await;
    assert!(
        next.fence > held.fence,
        "{check}: fence {} granted after the freed {}",
        next.fence,
        held.fence
    );
    lock.release(&next).await.expect("release");
}

/// `services` lists a service once the store holds something of it (here a
/// baseline), in order, and not one that was only read.
pub async fn services_lists_what_the_store_holds(h: &dyn Harness, written: &str, read: &str) {
    let check = "services_lists_what_the_store_holds";
    let (lock, store) = (h.lock(), h.store());
    store.load(read).await.expect("load");
    lock.current(read).await.expect("current");
    let lease = grant(&*lock, written, &holder(1), TTL).await;
    store.claim(written, lease.fence).await.expect("claim");
    store
        .apply(written, lease.fence, &[Change::Baseline(v("1.0"))])
        .await
        .expect("baseline");
    lock.release(&lease).await.expect("release");
    let services = store.services().await.expect("services");
    assert!(
        services.iter().any(|s| s == written),
        "{check}: {written} is not listed in {services:?}"
    );
    assert!(
        !services.iter().any(|s| s == read),
        "{check}: {read}, only read, is listed in {services:?}"
    );
    let mut sorted = services.clone();
    sorted.sort();
    assert_eq!(services, sorted, "{check}: not in order");
}
