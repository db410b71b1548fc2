//! The conformance suite: what every [`Lock`] + [`Store`] must do.
//!
//! A backend's tests implement [`Harness`] and call [`run_all`]. Each check
//! works on its own service name, so checks do not disturb each other and can
//! share one database.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::backend::{
    Acquire, AttemptKind, AttemptState, BackendError, Change, FinishAttempt, Lease, Lock,
    StartAttempt, Store,
};
use crate::ids::{Holder, TaskKey};

use super::{holder, start_attempt, v};

/// What the suite needs from a backend under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// The lock under test.
    fn lock(&self) -> Arc<dyn Lock>;
    /// The store under test.
    fn store(&self) -> Arc<dyn Store>;
    /// The shortest TTL the backend honours (etcd: 2 s).
    fn min_ttl(&self) -> Duration {
        Duration::from_millis(300)
    }
    /// Makes the stored data of `service` unparsable (for example a data
    /// version that is not a version), behind the backend's back.
    async fn corrupt(&self, service: &str);
    /// Undoes [`Harness::corrupt`].
    async fn repair(&self, service: &str);
    /// Marks the store as written by a format newer than this build knows,
    /// and returns `true`; `false` where the backend has no format marker.
    /// [`Harness::reset_format`] undoes it.
    async fn future_format(&self) -> bool {
        false
    }
    /// Undoes [`Harness::future_format`].
    async fn reset_format(&self) {}
}

/// Runs every check, in order, panicking with the name of the first that fails.
pub async fn run_all(h: &dyn Harness) {
    let prefix = format!("conf{:x}", crate::util::random_u64() & 0xffff_ffff);
    exclusive(h, &format!("{prefix}_excl")).await;
    fence_grows(h, &format!("{prefix}_fence")).await;
    renewal(h, &format!("{prefix}_renew")).await;
    expiry_takeover(h, &format!("{prefix}_expiry")).await;
    stale_fence_refused(h, &format!("{prefix}_stale")).await;
    non_holder_refused(h, &format!("{prefix}_nonholder")).await;
    store_rules(h, &format!("{prefix}_rules")).await;
    replay_is_idempotent(h, &format!("{prefix}_replay")).await;
    history_round_trip(h, &format!("{prefix}_history")).await;
    services_are_separate(h, &format!("{prefix}_a"), &format!("{prefix}_b")).await;
    corrupt_data_is_typed(h, &format!("{prefix}_corrupt")).await;
    unknown_format_refused(h, &format!("{prefix}_format")).await;
}

const TTL: Duration = Duration::from_secs(30);

async fn grant(lock: &dyn Lock, service: &str, who: &Holder, ttl: Duration) -> Lease {
    match lock.try_acquire(service, who, ttl).await {
        Ok(Acquire::Granted(lease)) => lease,
        other => panic!("conformance: {service}: {who} should get the free lease, got {other:?}"),
    }
}

fn finish(id: &str, version: &str, attempt: u32, state: AttemptState) -> Change {
    Change::Finish(FinishAttempt {
        key: key(id, version),
        attempt,
        state,
        error: (state == AttemptState::Failed).then(|| "boom; it said \"no\"".to_owned()),
        duration: Duration::from_millis(12),
    })
}

fn key(id: &str, version: &str) -> TaskKey {
    TaskKey {
        version: v(version),
        id: id.to_owned(),
    }
}

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

/// Once the store has seen fence F, writes and claims with a lower fence are
/// refused and change nothing (S2).
pub async fn stale_fence_refused(h: &dyn Harness, service: &str) {
    let store = h.store();
    store.claim(service, 5).await.expect("claim 5");
    store
        .apply(service, 5, &[start_attempt("a", "1.0", 1)])
        .await
        .expect("write under 5");
    let snap = store.claim(service, 7).await.expect("claim 7");
    assert_eq!(snap.fence, 7, "stale: claim raises the fence");
    match store
        .apply(
            service,
            5,
            &[finish("a", "1.0", 1, AttemptState::Completed)],
        )
        .await
    {
        Err(BackendError::StaleFence {
            presented: 5,
            current: 7,
        }) => {}
        other => panic!("stale_fence_refused: a write with fence 5 after 7 gave {other:?}"),
    }
    match store.claim(service, 6).await {
        Err(BackendError::StaleFence {
            presented: 6,
            current: 7,
        }) => {}
        other => panic!("stale_fence_refused: claim 6 after 7 gave {other:?}"),
    }
    match store
        .apply(service, 9, &[Change::DataVersion(v("1.0"))])
        .await
    {
        Err(BackendError::Rejected(_)) => {}
        other => panic!("stale_fence_refused: a write with an unclaimed fence gave {other:?}"),
    }
    let after = store.load(service).await.expect("load");
    assert_eq!(after.fence, 7);
    assert!(
        !after.is_completed(&key("a", "1.0")),
        "stale_fence_refused: the stale completion did not commit"
    );
    assert_eq!(
        after.data_version, None,
        "stale_fence_refused: the unclaimed write did not commit"
    );
    assert_eq!(store.history(service).await.expect("history").len(), 1);
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

/// A second completion of a task (S3), a data version going back (S4) and a
/// baseline of a store that is not empty are refused, atomically.
pub async fn store_rules(h: &dyn Harness, service: &str) {
    let store = h.store();
    let empty = store.load(service).await.expect("load");
    assert!(
        empty.is_empty(),
        "store_rules: a new service's store is empty"
    );
    store.claim(service, 1).await.expect("claim");
    store
        .apply(
            service,
            1,
            &[
                start_attempt("a", "1.1", 1),
                finish("a", "1.1", 1, AttemptState::Completed),
                Change::DataVersion(v("1.1")),
            ],
        )
        .await
        .expect("store_rules: a task runs and the data version advances in one write");
    let snap = store.load(service).await.expect("load");
    assert!(snap.is_completed(&key("a", "1.1")));
    assert_eq!(snap.data_version, Some(v("1.1")));
    let refused: [(&str, Vec<Change>); 4] = [
        (
            "a second start of a completed task",
            vec![start_attempt("a", "1.1", 2)],
        ),
        (
            "a data version going back",
            vec![Change::DataVersion(v("1.0"))],
        ),
        (
            "a baseline of a store that is not empty",
            vec![Change::Baseline(v("1.0"))],
        ),
        (
            "a batch whose last change is refused",
            vec![start_attempt("b", "1.2", 1), Change::DataVersion(v("1.0"))],
        ),
    ];
    for (what, changes) in refused {
        match store.apply(service, 1, &changes).await {
            Err(BackendError::Rejected(_)) => {}
            other => panic!("store_rules: {what} gave {other:?}"),
        }
    }
    let after = store.load(service).await.expect("load");
    assert_eq!(after, snap, "store_rules: refused writes changed nothing");
    assert_eq!(store.history(service).await.expect("history").len(), 1);

    let fresh = format!("{service}_baseline");
    store.claim(&fresh, 1).await.expect("claim");
    store
        .apply(&fresh, 1, &[Change::Baseline(v("2.0"))])
        .await
        .expect("baseline an empty store");
    let b = store.load(&fresh).await.expect("load");
    assert_eq!(
        (b.baseline.clone(), b.data_version.clone()),
        (Some(v("2.0")), Some(v("2.0")))
    );
}

/// A write retried after a lost reply is accepted once and not doubled.
pub async fn replay_is_idempotent(h: &dyn Harness, service: &str) {
    let store = h.store();
    store.claim(service, 3).await.expect("claim");
    let batch = [
        start_attempt("a", "1.0", 1),
        finish("a", "1.0", 1, AttemptState::Completed),
        Change::DataVersion(v("1.0")),
    ];
    store.apply(service, 3, &batch).await.expect("first write");
    store
        .apply(service, 3, &batch[1..])
        .await
        .expect("replayed write");
    let rows = store.history(service).await.expect("history");
    assert_eq!(rows.len(), 1, "replay: one row, not two");
    assert_eq!(rows[0].state, AttemptState::Completed);
}

/// History rows keep every field.
pub async fn history_round_trip(h: &dyn Harness, service: &str) {
    let store = h.store();
    store.claim(service, 2).await.expect("claim");
    store
        .apply(service, 2, &[start_attempt("x", "2.0.0-rc.1", 1)])
        .await
        .expect("start");
    store
        .apply(
            service,
            2,
            &[finish("x", "2.0.0-rc.1", 1, AttemptState::Failed)],
        )
        .await
        .expect("fail");
    store
        .apply(
            service,
            2,
            &[Change::Start(StartAttempt {
                key: key("x", "2.0.0-rc.1"),
                attempt: 2,
                kind: AttemptKind::Rollback,
                description: "task x".into(),
                holder: Holder {
                    pod: Some("pod-7;odd%name".into()),
                    ..holder(1)
                },
            })],
        )
        .await
        .expect("rollback start");
    let rows = store.history(service).await.expect("history");
    assert_eq!(rows.len(), 2);
    let r = &rows[0];
    assert_eq!(r.key, key("x", "2.0.0-rc.1"));
    assert_eq!(
        (r.attempt, r.kind, r.state, r.fence),
        (1, AttemptKind::Run, AttemptState::Failed, 2)
    );
    assert_eq!(r.description, "task x");
    assert_eq!(r.holder, holder(1));
    assert_eq!(r.error.as_deref(), Some("boom; it said \"no\""));
    assert_eq!(r.duration, Some(Duration::from_millis(12)));
    assert!(r.finished_at_ms.is_some_and(|f| f >= r.started_at_ms));
    let r = &rows[1];
    assert_eq!(
        (r.attempt, r.kind, r.state),
        (2, AttemptKind::Rollback, AttemptState::Running)
    );
    assert_eq!(r.holder.pod.as_deref(), Some("pod-7;odd%name"));
    assert_eq!(r.finished_at_ms, None);
    let snap = store.load(service).await.expect("load");
    let t = &snap.tasks[&key("x", "2.0.0-rc.1")];
    assert_eq!(
        (t.rows, t.completed, t.last.kind),
        (2, false, AttemptKind::Rollback)
    );
}

/// Leases, fences and stores of two services do not touch each other.
pub async fn services_are_separate(h: &dyn Harness, a: &str, b: &str) {
    let (lock, store) = (h.lock(), h.store());
    let la = grant(&*lock, a, &holder(1), TTL).await;
    let lb = grant(&*lock, b, &holder(2), TTL).await;
    store.claim(a, la.fence + 10).await.expect("claim a");
    store
        .apply(a, la.fence + 10, &[Change::DataVersion(v("3.0"))])
        .await
        .expect("write a");
    let sb = store.load(b).await.expect("load b");
    assert!(sb.is_empty(), "services_are_separate: b sees nothing of a");
    store
        .claim(b, 1)
        .await
        .expect("b's store has its own fence");
    lock.release(&la).await.expect("release a");
    lock.release(&lb).await.expect("release b");
}

/// Stored data that does not parse gives [`BackendError::Corrupt`] on read
/// and on write, and the write changes nothing.
pub async fn corrupt_data_is_typed(h: &dyn Harness, service: &str) {
    let store = h.store();
    store.claim(service, 1).await.expect("claim");
    store
        .apply(service, 1, &[Change::DataVersion(v("1.0"))])
        .await
        .expect("write");
    h.corrupt(service).await;
    assert!(
        matches!(store.load(service).await, Err(BackendError::Corrupt { .. })),
        "corrupt: load"
    );
    assert!(
        matches!(
            store
                .apply(service, 1, &[start_attempt("a", "1.1", 1)])
                .await,
            Err(BackendError::Corrupt { .. })
        ),
        "corrupt: apply"
    );
    h.repair(service).await;
    let snap = store.load(service).await.expect("load after repair");
    assert_eq!(snap.data_version, Some(v("1.0")));
    assert!(
        snap.tasks.is_empty(),
        "corrupt: the refused write left no row"
    );
}

/// A store written by a newer format is refused with a typed error.
pub async fn unknown_format_refused(h: &dyn Harness, service: &str) {
    if !h.future_format().await {
        return;
    }
    let result = h.store().load(service).await;
    h.reset_format().await;
    assert!(
        matches!(result, Err(BackendError::UnsupportedFormat { .. })),
        "unknown_format_refused: got {result:?}"
    );
}
