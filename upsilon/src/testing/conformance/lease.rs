//! Lease checks: exclusivity, fence growth (S1), renewal, expiry and
//! takeover (L1), and refusals of a non-holder (S6).

use std::time::Duration;

use crate::backend::{Acquire, BackendError, Lease};

use super::{grant, holder, Harness, TTL};

/// A held lease keeps every other holder out and names its holder.
pub async fn exclusive(h: &dyn Harness, service: &str) {
    let lock = h.lock();
    let a = grant(&*lock, service, &holder(1), TTL).await;
    for n in 2..4 {
        match lock.try_acquire(service, &holder(n), TTL).await {
            Ok(Acquire::Held(info)) => {
                assert_eq!(info.holder, holder(1), "exclusive: the holder is named");
                assert_eq!(
                    info.fence, a.fence,
                    "exclusive: the holder's fence is reported"
                );
                assert!(
                    info.expires_at_ms > info.now_ms,
                    "exclusive: expiry is ahead"
                );
            }
            other => panic!("exclusive: a second node got {other:?} while node 1 held the lease"),
        }
    }
    let current = lock.current(service).await.expect("current");
    assert_eq!(
        current.map(|c| c.holder),
        Some(holder(1)),
        "exclusive: current() names the holder"
    );
    lock.release(&a)
        .await
        .expect("exclusive: the holder releases");
    assert_eq!(
        lock.current(service).await.expect("current"),
        None,
        "exclusive: released lease is free"
    );
}

/// Every grant has a fence above every earlier one (S1), after release too.
pub async fn fence_grows(h: &dyn Harness, service: &str) {
    let lock = h.lock();
    let mut last = 0;
    for n in 1..5 {
        let lease = grant(&*lock, service, &holder(n), TTL).await;
        assert!(
            lease.fence > last,
            "fence_grows: grant {n} got fence {} after {last}",
            lease.fence
        );
        last = lease.fence;
        lock.release(&lease).await.expect("fence_grows: release");
    }
    // The same holder again still gets a new fence.
    let again = grant(&*lock, service, &holder(4), TTL).await;
    assert!(
        again.fence > last,
        "fence_grows: re-grant to the same holder reuses no fence"
    );
    lock.release(&again).await.expect("release");
}

/// Renewal extends the lease; the renewed lease keeps holder and fence.
pub async fn renewal(h: &dyn Harness, service: &str) {
    let lock = h.lock();
    let ttl = h.min_ttl().max(Duration::from_secs(2));
    let a = grant(&*lock, service, &holder(1), ttl).await;
    let renewed = lock.renew(&a).await.expect("renewal: the holder renews");
    assert_eq!(
        (renewed.fence, &renewed.holder),
        (a.fence, &a.holder),
        "renewal keeps the grant"
    );
    assert!(
        renewed.expires_at_ms >= a.expires_at_ms,
        "renewal: expiry does not move back"
    );
    let twice = lock.renew(&renewed).await.expect("renewal: renews again");
    assert_eq!(twice.fence, a.fence);
    lock.release(&twice).await.expect("release after renewal");
}

/// An expired lease is granted to the next asker with a higher fence, and the
/// old holder can no longer renew or release it (L1, S6).
pub async fn expiry_takeover(h: &dyn Harness, service: &str) {
    let lock = h.lock();
    let ttl = h.min_ttl();
    let a = grant(&*lock, service, &holder(1), ttl).await;
    let deadline = tokio::time::Instant::now() + ttl * 10 + Duration::from_secs(5);
    let b = loop {
        match lock.try_acquire(service, &holder(2), TTL).await {
            Ok(Acquire::Granted(lease)) => break lease,
            // This check reads no store; a lock that answers so for it asks
            // the caller to read one, and the loop asks again.
            Ok(Acquire::StoreMoved) => {}
            Ok(Acquire::Held(info)) => {
                assert_eq!(info.holder, holder(1));
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "expiry_takeover: a lease with ttl {ttl:?} was still held long after expiry"
                );
                tokio::time::sleep(ttl / 4).await;
            }
            Err(e) => panic!("expiry_takeover: {e}"),
        }
    };
    assert!(
        b.fence > a.fence,
        "expiry_takeover: the new grant has a higher fence"
    );
    assert!(
        matches!(lock.renew(&a).await, Err(BackendError::LeaseLost(_))),
        "expiry_takeover: the old holder cannot renew"
    );
    assert!(
        matches!(lock.release(&a).await, Err(BackendError::LeaseLost(_))),
        "expiry_takeover: the old holder cannot release"
    );
    assert_eq!(
        lock.current(service)
            .await
            .expect("current")
            .map(|c| c.holder),
        Some(holder(2)),
        "expiry_takeover: the old holder's release left the new lease alone"
    );
    lock.release(&b).await.expect("release");
}

/// Renew and release by a non-holder, or with another fence, are refused and
/// leave the lease alone (S6).
pub async fn non_holder_refused(h: &dyn Harness, service: &str) {
    let lock = h.lock();
    let a = grant(&*lock, service, &holder(1), TTL).await;
    let forged = [
        Lease {
            holder: holder(2),
            ..a.clone()
        },
        Lease {
            fence: a.fence + 1,
            ..a.clone()
        },
        Lease {
            fence: a.fence.saturating_sub(1),
            ..a.clone()
        },
    ];
    for lease in &forged {
        assert!(
            matches!(lock.release(lease).await, Err(BackendError::LeaseLost(_))),
            "non_holder_refused: release by {} with fence {} was not refused",
            lease.holder,
            lease.fence
        );
        assert!(
            matches!(lock.renew(lease).await, Err(BackendError::LeaseLost(_))),
            "non_holder_refused: renew by {} with fence {} was not refused",
            lease.holder,
            lease.fence
        );
    }
    let current = lock
        .current(service)
        .await
        .expect("current")
        .expect("still held");
    assert_eq!((current.holder, current.fence), (holder(1), a.fence));
    lock.release(&a).await.expect("release");
}

/// After [`Lock::raise_fence`](crate::backend::Lock::raise_fence) with a
/// floor, every later grant's fence is above it (a held lease keeps its
/// own); a floor below the counter changes nothing, and the fence still
/// grows. Skipped (`false`) for a lock that refuses to raise its fence (the
/// trait's default): such a lock can only be used with its own store.
pub async fn raise_fence_lifts_later_grants(h: &dyn Harness, service: &str) -> bool {
    let lock = h.lock();
    let a = grant(&*lock, service, &holder(1), TTL).await;
    let floor = a.fence + 100;
    match lock.raise_fence(service, floor).await {
        Ok(()) => {}
        Err(BackendError::Rejected(_)) => {
            lock.release(&a).await.expect("release");
            return false;
        }
        Err(e) => panic!("raise_fence_lifts_later_grants: raise_fence failed: {e}"),
    }
    let renewed = lock
        .renew(&a)
        .await
        .expect("raise_fence_lifts_later_grants: the lease held while the floor rose renews");
    assert_eq!(renewed.fence, a.fence, "a held lease keeps its fence");
    lock.release(&renewed).await.expect("release");
    let b = grant(&*lock, service, &holder(2), TTL).await;
    assert!(
        b.fence > floor,
        "raise_fence_lifts_later_grants: the grant after raising the floor to {floor} got fence {}",
        b.fence
    );
    lock.release(&b).await.expect("release");
    lock.raise_fence(service, 1)
        .await
        .expect("raise_fence_lifts_later_grants: a floor below the counter is accepted");
    let c = grant(&*lock, service, &holder(3), TTL).await;
    assert!(
        c.fence > b.fence,
        "raise_fence_lifts_later_grants: a lower floor let fence {} follow {}",
        c.fence,
        b.fence
    );
    lock.release(&c).await.expect("release");
    true
}
