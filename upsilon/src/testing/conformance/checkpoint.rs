//! Checkpoint checks: a checkpoint saved and read back through the snapshot
//! and the history; refused for a stale fence, a finished or wrong attempt,
//! a position that is not JSON; carried by a start; any stored text reads
//! back as it was, never a panic.

use crate::backend::{
    AttemptKind, AttemptState, BackendError, Change, Checkpoint, SaveCheckpoint, StartAttempt,
    Store,
};

use super::{finish, holder, key, start_attempt};

fn checkpoint(position: &str, done: Option<u64>, total: Option<u64>) -> Checkpoint {
    Checkpoint {
        position: position.to_owned(),
        saved_at_ms: 1_700_000_000_123,
        done,
        total,
    }
}

fn save(id: &str, attempt: u32, c: &Checkpoint) -> Change {
    Change::Checkpoint(SaveCheckpoint {
        key: key(id, "1.0"),
        attempt,
        checkpoint: c.clone(),
    })
}

async fn newest(store: &dyn Store, service: &str, id: &str) -> Option<Checkpoint> {
    let snap = store.load(service).await.expect("load");
    snap.tasks[&key(id, "1.0")].checkpoint.clone()
}

/// A checkpoint written to a running attempt reads back, exactly, through
/// `load` and `history`; a newer one replaces it; a replay is idempotent.
pub async fn checkpoint_round_trip(h: &dyn Harness, service: &str) {
    let store = h.store();
    store.claim(service, 2).await.expect("claim");
    store
        .apply(service, 2, &[start_attempt("c", "1.0", 1)])
        .await
        .expect("start");
    assert_eq!(
        newest(&*store, service, "c").await,
        None,
        "no checkpoint yet"
    );
    // Quotes, escapes, a newline, characters beyond ASCII, and size.
    let odd = format!(
        "{{\"last\":\"o'k \\\"q\\\" \\n é 🦀\",\"pad\":\"{}\"}}",
        "x".repeat(20_000)
    );
    let first = checkpoint(&odd, Some(500), Some(10_000));
    store
        .apply(service, 2, &[save("c", 1, &first)])
        .await
        .expect("checkpoint");
    assert_eq!(newest(&*store, service, "c").await.as_ref(), Some(&first));
    store
        .apply(service, 2, &[save("c", 1, &first)])
        .await
        .expect("a replayed checkpoint is taken");
    let second = checkpoint("{\"last\":17}", None, None);
    store
        .apply(service, 2, &[save("c", 1, &second)])
        .await
        .expect("a second checkpoint");
    assert_eq!(newest(&*store, service, "c").await.as_ref(), Some(&second));
    let rows = store.history(service).await.expect("history");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].checkpoint.as_ref(), Some(&second));
    assert_eq!(rows[0].state, AttemptState::Running);
}

/// A checkpoint is refused, and changes nothing, with a stale fence, for an
/// attempt that is not the task's newest, for a finished attempt, and for a
/// position that is not JSON.
pub async fn checkpoint_refused(h: &dyn Harness, service: &str) {
    let store = h.store();
    store.claim(service, 3).await.expect("claim 3");
    store
        .apply(service, 3, &[start_attempt("c", "1.0", 1)])
        .await
        .expect("start");
    let kept = checkpoint("{\"last\":1}", Some(1), None);
    store
        .apply(service, 3, &[save("c", 1, &kept)])
        .await
        .expect("checkpoint under 3");
    store.claim(service, 4).await.expect("claim 4");
    match store
        .apply(
            service,
            3,
            &[save("c", 1, &checkpoint("{\"last\":2}", None, None))],
        )
        .await
    {
        Err(BackendError::StaleFence {
            presented: 3,
            current: 4,
        }) => {}
        other => panic!("a stale holder's checkpoint gave {other:?}"),
    }
    // The new holder cannot write to the old holder's row either.
    let refused = |what: &str, r: Result<(), BackendError>| match r {
        Err(BackendError::Rejected(_)) => {}
        other => panic!("{what} gave {other:?}"),
    };
    refused(
        "a checkpoint for the old holder's row under the new fence",
        store
            .apply(service, 4, &[save("c", 1, &checkpoint("{}", None, None))])
            .await,
    );
    assert_eq!(newest(&*store, service, "c").await.as_ref(), Some(&kept));
    store
        .apply(
            service,
            4,
            // The new holder starts attempt 2 over the dead holder's row.
            &[start_attempt("c", "1.0", 2)],
        )
        .await
        .expect("attempt 2");
    refused(
        "a checkpoint for attempt 3, which does not exist",
        store
            .apply(service, 4, &[save("c", 3, &checkpoint("{}", None, None))])
            .await,
    );
    refused(
        "a position that is not JSON",
        store
            .apply(
                service,
                4,
                &[save("c", 2, &checkpoint("{last", None, None))],
            )
            .await,
    );
    store
        .apply(
            service,
            4,
            &[finish("c", "1.0", 2, AttemptState::Completed)],
        )
        .await
        .expect("complete");
    refused(
        "a checkpoint after the attempt completed",
        store
            .apply(service, 4, &[save("c", 2, &checkpoint("{}", None, None))])
            .await,
    );
    let rows = store.history(service).await.expect("history");
    assert_eq!(rows[0].checkpoint.as_ref(), Some(&kept));
    assert_eq!(rows[1].checkpoint, None);
}

/// A start that carries a checkpoint stores it on the new row, which the
/// snapshot then reads; the older row keeps its own; a start without one
/// (a rollback after runs) has none.
pub async fn checkpoint_carried_by_a_start(h: &dyn Harness, service: &str) {
    let store = h.store();
    store.claim(service, 2).await.expect("claim");
    store
        .apply(service, 2, &[start_attempt("c", "1.0", 1)])
        .await
        .expect("start");
    let reached = checkpoint("[\"k\",41]", Some(41), Some(100));
    store
        .apply(service, 2, &[save("c", 1, &reached)])
        .await
        .expect("checkpoint");
    let Change::Start(mut second) = start_attempt("c", "1.0", 2) else {
        unreachable!()
    };
    second.checkpoint = Some(reached.clone());
    store
        .apply(
            service,
            2,
            &[
                finish("c", "1.0", 1, AttemptState::Failed),
                Change::Start(second),
            ],
        )
        .await
        .expect("attempt 2 from the checkpoint");
    assert_eq!(newest(&*store, service, "c").await.as_ref(), Some(&reached));
    let further = checkpoint("[\"k\",90]", Some(90), Some(100));
    store
        .apply(service, 2, &[save("c", 2, &further)])
        .await
        .expect("attempt 2's checkpoint");
    store
        .apply(
            service,
            2,
            &[
                finish("c", "1.0", 2, AttemptState::Failed),
                Change::Start(StartAttempt {
                    key: key("c", "1.0"),
                    attempt: 3,
                    kind: AttemptKind::Rollback,
                    description: "task c".into(),
                    holder: holder(1),
                    checkpoint: None,
                }),
            ],
        )
        .await
        .expect("the rollback");
    assert_eq!(newest(&*store, service, "c").await, None);
    let rows = store.history(service).await.expect("history");
    let got: Vec<_> = rows.iter().map(|r| r.checkpoint.clone()).collect();
    assert_eq!(got, vec![Some(reached), Some(further), None]);
}

use super::Harness;
