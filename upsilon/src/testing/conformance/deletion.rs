//! Rows deleted by hand: what the store reports after an operator deleted a
//! service's state row or its history behind the backend's back, and that
//! the fence still never goes back (S1) nor lets an old holder write (S2).

use crate::backend::{AttemptState, BackendError, Change};

use super::{finish, grant, holder, key, start_attempt, v, Harness, TTL};

/// A grant that wrote nothing but its claim, then the state row deleted: the
/// next grant's fence is still above it (S1), and the old holder cannot
/// write (S2). Nothing in the history carries the fence here, so the backend
/// must keep its fence counters apart from the row an operator may delete.
///
/// Needs [`Harness::delete_state_row`]; returns `false` without it.
pub async fn deleting_the_state_row_after_a_bare_claim_keeps_the_fence(
    h: &dyn Harness,
    service: &str,
) -> bool {
    let check = "deleting_the_state_row_after_a_bare_claim_keeps_the_fence";
    let (lock, store) = (h.lock(), h.store());
    let first = grant(&*lock, service, &holder(1), TTL).await;
    store.claim(service, first.fence).await.expect("claim");
    lock.release(&first).await.expect("release");
    if !h.delete_state_row(service).await {
        return false;
    }
    let next = grant(&*lock, service, &holder(2), TTL).await;
    assert!(
        next.fence > first.fence,
        "{check}: fence {} was granted again after the state row was deleted",
        next.fence
    );
    store.claim(service, next.fence).await.expect("claim");
    let stale = store
        .apply(service, first.fence, &[start_attempt("t", "1.1", 1)])
        .await;
    assert!(
        matches!(stale, Err(BackendError::StaleFence { .. })),
        "{check}: the old holder wrote after the deletion: {stale:?}"
    );
    lock.release(&next).await.expect("release");
    true
}

/// After the state row of `service` is deleted (the lease, the fence
/// counters, the data version and the baseline; see
/// [`Harness::delete_state_row`]):
/// - the store reports the history and the task summaries as before, and no
///   data version or baseline; no lease is held;
/// - the next grant's fence is above every earlier one (S1), whether the
///   deleted row held no lease or a live one;
/// - once the new holder has claimed the store, writes with an older fence
///   are refused (S2), and the old holder can neither renew nor release (S6).
///
/// The history is what carries the fence past the deletion, so every grant
/// here writes a history row under its fence before the row is deleted.
///
/// Needs [`Harness::delete_state_row`]; returns `false` without it.
pub async fn deleting_the_state_row_keeps_the_fence(h: &dyn Harness, service: &str) -> bool {
    let check = "deleting_the_state_row_keeps_the_fence";
    let (lock, store) = (h.lock(), h.store());
    let first = grant(&*lock, service, &holder(1), TTL).await;
    assert!(first.fence > 0, "{check}: the first grant got fence 0");
    store.claim(service, first.fence).await.expect("claim");
    store
        .apply(service, first.fence, &[Change::Baseline(v("1.0"))])
        .await
        .expect("baseline");
    lock.release(&first).await.expect("release");
    let mut last = first.fence;
    for n in 2..5 {
        let lease = grant(&*lock, service, &holder(n), TTL).await;
        assert!(
            lease.fence > last,
            "{check}: grant {n} got fence {} after {last}",
            lease.fence
        );
        store.claim(service, lease.fence).await.expect("claim");
        store
            .apply(
                service,
                lease.fence,
                &[start_attempt(&format!("t{n}"), "1.1", 1)],
            )
            .await
            .expect("start");
        last = lease.fence;
        lock.release(&lease).await.expect("release");
    }
    let before = store.load(service).await.expect("load");
    let rows = store.history(service).await.expect("history");
    if !h.delete_state_row(service).await {
        return false;
    }

    let after = store
        .load(service)
        .await
        .unwrap_or_else(|e| panic!("{check}: load after the state row was deleted: {e}"));
    assert_eq!(
        (&after.data_version, &after.baseline),
        (&None, &None),
        "{check}: the data version and the baseline were in the deleted row"
    );
    assert_eq!(
        after.tasks, before.tasks,
        "{check}: the task summaries come from the history, which was kept"
    );
    assert_eq!(
        store.history(service).await.expect("history"),
        rows,
        "{check}: the history was kept"
    );
    assert_eq!(
        lock.current(service).await.expect("current"),
        None,
        "{check}: no lease is held once its row is gone"
    );

    let next = grant(&*lock, service, &holder(9), TTL).await;
    assert!(
        next.fence > last,
        "{check}: fence {} after {last}",
        next.fence
    );
    store.claim(service, next.fence).await.expect("claim");
    match store
        .apply(
            service,
            last,
            &[finish("t4", "1.1", 1, AttemptState::Failed)],
        )
        .await
    {
        Err(BackendError::StaleFence { presented, current })
            if (presented, current) == (last, next.fence) => {}
        other => panic!(
            "{check}: a write with the old fence {last} after fence {} was claimed gave {other:?}",
            next.fence
        ),
    }
    store
        .apply(
            service,
            next.fence,
            &[start_attempt("t4", "1.1", 2), Change::DataVersion(v("1.0"))],
        )
        .await
        .unwrap_or_else(|e| panic!("{check}: the new holder writes: {e}"));
    let snap = store.load(service).await.expect("load");
    assert_eq!(snap.data_version, Some(v("1.0")));
    assert_eq!(snap.tasks[&key("t4", "1.1")].rows, 2);

    // Deleted again, this time under a live lease whose holder has written.
    if !h.delete_state_row(service).await {
        panic!("{check}: delete_state_row worked once, then not");
    }
    let taken = grant(&*lock, service, &holder(10), TTL).await;
    assert!(
        taken.fence > next.fence,
        "{check}: fence {} after {} (the deleted row held that lease)",
        taken.fence,
        next.fence
    );
    assert!(
        matches!(lock.renew(&next).await, Err(BackendError::LeaseLost(_))),
        "{check}: the holder of the deleted lease cannot renew"
    );
    assert!(
        matches!(lock.release(&next).await, Err(BackendError::LeaseLost(_))),
        "{check}: the holder of the deleted lease cannot release"
    );
    store.claim(service, taken.fence).await.expect("claim");
    match store
        .apply(service, next.fence, &[start_attempt("t5", "1.1", 1)])
        .await
    {
        Err(BackendError::StaleFence { .. }) => {}
        other => panic!("{check}: a write by the holder of the deleted lease gave {other:?}"),
    }
    assert!(
        !store
            .load(service)
            .await
            .expect("load")
            .tasks
            .contains_key(&key("t5", "1.1")),
        "{check}: the refused write left no row"
    );
    lock.release(&taken).await.expect("release");
    true
}

/// After the history of `service` is deleted (see
/// [`Harness::delete_history`]):
/// - the store reports no tasks and no history rows, and the data version
///   and baseline as before;
/// - the next grant's fence is above every earlier one (S1);
/// - once the new holder has claimed the store, writes with an older fence
///   are refused (S2), and the data version still does not go back (S4).
///
/// Needs [`Harness::delete_history`]; returns `false` without it.
pub async fn deleting_the_history_keeps_the_fence(h: &dyn Harness, service: &str) -> bool {
    let check = "deleting_the_history_keeps_the_fence";
    let (lock, store) = (h.lock(), h.store());
    let mut last = 0;
    for n in 1..4 {
        let lease = grant(&*lock, service, &holder(n), TTL).await;
        assert!(
            lease.fence > last,
            "{check}: grant {n} got fence {} after {last}",
            lease.fence
        );
        let version = format!("1.{n}");
        let id = format!("t{n}");
        store.claim(service, lease.fence).await.expect("claim");
        store
            .apply(
                service,
                lease.fence,
                &[
                    start_attempt(&id, &version, 1),
                    finish(&id, &version, 1, AttemptState::Completed),
                    Change::DataVersion(v(&version)),
                ],
            )
            .await
            .expect("a task runs");
        last = lease.fence;
        lock.release(&lease).await.expect("release");
    }
    let before = store.load(service).await.expect("load");
    if !h.delete_history(service).await {
        return false;
    }

    let after = store
        .load(service)
        .await
        .unwrap_or_else(|e| panic!("{check}: load after the history was deleted: {e}"));
    assert!(
        after.tasks.is_empty(),
        "{check}: no task summaries without a history: {:?}",
        after.tasks
    );
    assert_eq!(
        (&after.data_version, &after.baseline),
        (&before.data_version, &before.baseline),
        "{check}: the data version and the baseline were kept"
    );
    assert_eq!(
        store.history(service).await.expect("history"),
        [],
        "{check}: the history is empty"
    );

    let next = grant(&*lock, service, &holder(9), TTL).await;
    assert!(
        next.fence > last,
        "{check}: fence {} after {last}",
        next.fence
    );
    store.claim(service, next.fence).await.expect("claim");
    match store
        .apply(service, last, &[Change::DataVersion(v("1.4"))])
        .await
    {
        Err(BackendError::StaleFence { presented, current })
            if (presented, current) == (last, next.fence) => {}
        other => panic!(
            "{check}: a write with the old fence {last} after fence {} was claimed gave {other:?}",
            next.fence
        ),
    }
    match store
        .apply(service, next.fence, &[Change::DataVersion(v("1.0"))])
        .await
    {
        Err(BackendError::Rejected(_)) => {}
        other => panic!("{check}: the data version going back from 1.3 gave {other:?}"),
    }
    store
        .apply(service, next.fence, &[Change::DataVersion(v("1.4"))])
        .await
        .unwrap_or_else(|e| panic!("{check}: the new holder writes: {e}"));
    assert_eq!(
        store.load(service).await.expect("load").data_version,
        Some(v("1.4"))
    );
    lock.release(&next).await.expect("release");
    true
}
