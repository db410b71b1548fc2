//! Store checks: stale fences (S2), the rules of `Snapshot::check` (S3, S4,
//! baselines), idempotent replays, history contents, service scoping, and
//! typed errors for corrupt or newer stored data.

use std::time::Duration;

use crate::backend::{AttemptKind, AttemptState, BackendError, Change, StartAttempt};
use crate::ids::Holder;

use super::{finish, grant, holder, key, start_attempt, v, Harness, TTL};

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
                checkpoint: None,
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

/// A store written by a newer format is refused with
/// [`BackendError::UnsupportedFormat`] by every store operation (load, claim,
/// apply, history), and the refused claim and write change nothing.
///
/// Needs [`Harness::future_format`]; returns `false` without it.
pub async fn unknown_format_refused(h: &dyn Harness, service: &str) -> bool {
    let store = h.store();
    store.claim(service, 1).await.expect("claim");
    store
        .apply(service, 1, &[Change::DataVersion(v("1.0"))])
        .await
        .expect("write");
    let before = store.load(service).await.expect("load");
    if !h.future_format().await {
        return false;
    }
    let load = store.load(service).await.map(|_| ());
    let claim = store.claim(service, 2).await.map(|_| ());
    let apply = store
        .apply(service, 1, &[start_attempt("a", "1.1", 1)])
        .await;
    let history = store.history(service).await.map(|_| ());
    // Put the format back before asserting, so a failure leaves the store usable.
    h.reset_format().await;
    for (op, result) in [
        ("load", load),
        ("claim", claim),
        ("apply", apply),
        ("history", history),
    ] {
        assert!(
            matches!(result, Err(BackendError::UnsupportedFormat { .. })),
            "unknown_format_refused: {op} gave {result:?}"
        );
    }
    let after = store
        .load(service)
        .await
        .expect("load after the format is reset");
    assert_eq!(
        after, before,
        "unknown_format_refused: the refused claim and write changed nothing"
    );
    true
}
