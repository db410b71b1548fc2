//! Checkpoints through the runner, against the in-memory backend: a task's
//! next attempt resumes where the last one got, on the same node or
//! another; a rollback never reads a run's position; a stale holder's
//! checkpoint is refused and stops it as a lost lease does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use upsilon::backend::{AttemptKind, Store};
use upsilon::testing::{self, MemoryBackend};
use upsilon::{Builder, Error, LeaseLoss, RetryPolicy, Task, TaskContext, TaskFuture, Upsilon};

fn node(backend: &Arc<MemoryBackend>, n: usize, tasks: Vec<Task>) -> Builder {
    Upsilon::builder()
        .service("svc")
        .app_version("1.1")
        .backend(backend.clone())
        .holder(testing::holder(n))
        .ttl(Duration::from_secs(3))
        .poll_interval(Duration::from_millis(50))
        .tasks(tasks)
}

/// What each attempt read when it started: (attempt, rollback, position).
type Seen = Arc<Mutex<Vec<(u32, bool, Option<u64>)>>>;

/// A task that records the position it resumes from, then saves
/// `saves[attempt - 1]` and fails while `attempt <= fail_until`.
fn counting(seen: &Seen, saves: &'static [u64], fail_until: u32) -> Task {
    let seen = seen.clone();
    Task::new(
        "1.1",
        1,
        "fill",
        move |ctx: &mut TaskContext| -> TaskFuture<'_> {
            let seen = seen.clone();
            Box::pin(async move {
                let from = ctx.checkpoint::<u64>()?;
                let attempt = ctx.task().attempt;
                seen.lock().unwrap().push((attempt, false, from));
                if let Some(save) = saves.get(attempt as usize - 1) {
                    ctx.save_checkpoint_with_progress(save, *save, Some(100))
                        .await?;
                }
                if attempt <= fail_until {
                    return Err("the batch failed".into());
                }
                Ok(())
            })
        },
    )
    .unwrap()
}

fn positions(history: &[upsilon::backend::HistoryEntry]) -> Vec<Option<String>> {
    history
        .iter()
        .map(|r| r.checkpoint.as_ref().map(|c| c.position.clone()))
        .collect()
}

#[tokio::test]
async fn each_attempt_resumes_where_the_last_got_on_this_node_and_the_next() {
    let backend = MemoryBackend::new();
    let seen = Seen::default();
    let err = node(&backend, 1, vec![counting(&seen, &[40, 70], 3)])
        .retry(RetryPolicy::attempts(2, Duration::from_millis(1)))
        .build()
        .unwrap()
        .run()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TaskFailed { .. }), "{err}");
    // Another node, later: it resumes from what the store holds.
    node(&backend, 2, vec![counting(&seen, &[40, 70], 2)])
        .build()
        .unwrap()
        .run()
        .await
        .unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(1, false, None), (2, false, Some(40)), (3, false, Some(70))]
    );
    let history = backend.history("svc").await.unwrap();
    // Each row shows the position its attempt reached.
    let some = |s: &str| Some(s.to_owned());
    assert_eq!(
        positions(&history),
        vec![some("40"), some("70"), some("70")]
    );
    let c = history[1].checkpoint.as_ref().unwrap();
    assert_eq!((c.done, c.total), (Some(70), Some(100)));
    assert!(c.saved_at_ms > 0);
}

#[tokio::test]
async fn a_rollback_never_reads_the_runs_checkpoint_nor_a_run_the_rollbacks() {
    let backend = MemoryBackend::new();
    let seen = Seen::default();
    let with_rollback = |seen: &Seen, fail: u32| {
        let undo = seen.clone();
        counting(seen, &[40, 0, 5], fail).with_rollback(
            move |ctx: &mut TaskContext| -> TaskFuture<'_> {
                let undo = undo.clone();
                Box::pin(async move {
                    let from = ctx.checkpoint::<u64>()?;
                    undo.lock().unwrap().push((ctx.task().attempt, true, from));
                    ctx.save_checkpoint(&9u64).await?;
                    Ok(())
                })
            },
        )
    };
    node(&backend, 1, vec![with_rollback(&seen, 1)])
        .rollback_on_failure(true)
        .build()
        .unwrap()
        .run()
        .await
        .unwrap_err();
    node(&backend, 1, vec![with_rollback(&seen, 0)])
        .build()
        .unwrap()
        .run()
        .await
        .unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(1, false, None), (2, true, None), (3, false, None)]
    );
    let history = backend.history("svc").await.unwrap();
    let kinds: Vec<_> = history.iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        [AttemptKind::Run, AttemptKind::Rollback, AttemptKind::Run]
    );
    let some = |s: &str| Some(s.to_owned());
    assert_eq!(positions(&history), vec![some("40"), some("9"), some("5")]);
}

#[tokio::test]
async fn a_checkpoint_after_another_node_claimed_the_store_is_refused_and_stops_the_holder() {
    let backend = MemoryBackend::new();
    let store = backend.clone();
    let refused = Arc::new(Mutex::new(None));
    let said = refused.clone();
    let task = Task::new(
        "1.1",
        1,
        "fill",
        move |ctx: &mut TaskContext| -> TaskFuture<'_> {
            let (store, said) = (store.clone(), said.clone());
            Box::pin(async move {
                ctx.save_checkpoint(&1u64).await?;
                // Another node takes the store over.
                store.claim("svc", ctx.fence() + 1).await?;
                let err = ctx.save_checkpoint(&2u64).await.unwrap_err();
                *said.lock().unwrap() = Some((err.is_refused(), err.to_string()));
                Err(err.into())
            })
        },
    )
    .unwrap();
    let err = node(&backend, 1, vec![task])
        .build()
        .unwrap()
        .run()
        .await
        .unwrap_err();
    match &err {
        Error::LeaseLost {
            reason: LeaseLoss::StaleFence { during, .. },
            ..
        } => assert_eq!(*during, "saving a checkpoint"),
        other => panic!("expected a lost lease, got {other}"),
    }
    let (is_refused, text) = refused.lock().unwrap().clone().unwrap();
    assert!(is_refused, "{text}");
    assert!(
        text.contains("task fill@1.1.0: the store refused the checkpoint of attempt 1"),
        "{text}"
    );
    // The stale holder's position never reached the store.
    let history = backend.history("svc").await.unwrap();
    assert_eq!(positions(&history), vec![Some("1".to_owned())]);
}

/// A batch loop whose holder is overtaken in the middle of a batch (its
/// writes done, its checkpoint not yet saved): the stale holder's
/// checkpoint is refused, and the next holder starts after the last batch
/// saved, so that one batch, and only it, is done twice.
#[tokio::test]
async fn a_takeover_in_the_middle_of_a_batch_does_that_batch_again_and_no_other() {
    let backend = MemoryBackend::new();
    // How many times each of the items 1..=10 was done.
    let done = Arc::new(Mutex::new(vec![0u32; 10]));
    let backfill = |take_over_in: Option<u64>| {
        let (store, done) = (backend.clone(), done.clone());
        Task::new(
            "1.1",
            1,
            "fill",
            move |ctx: &mut TaskContext| -> TaskFuture<'_> {
                let (store, done) = (store.clone(), done.clone());
                Box::pin(async move {
                    let (done, store, ctx_ref) = (&done, &store, &*ctx);
                    ctx_ref
                        .batches::<u64>()
                        .size(3)
                        .run(async |batch| {
                            let first = batch.after.unwrap_or(0) + 1;
                            let last = (first + batch.size - 1).min(10);
                            if first > 10 {
                                return Ok(upsilon::BatchDone::end());
                            }
                            for i in first..=last {
                                done.lock().unwrap()[i as usize - 1] += 1;
                            }
                            if Some(batch.number) == take_over_in {
                                store.claim("svc", ctx_ref.fence() + 1).await?;
                            }
                            Ok(upsilon::BatchDone::next(last, last - first + 1))
                        })
                        .await?;
                    Ok(())
                })
            },
        )
        .unwrap()
    };
    let err = node(&backend, 1, vec![backfill(Some(3))])
        .build()
        .unwrap()
        .run()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
    node(&backend, 2, vec![backfill(None)])
        .build()
        .unwrap()
        .run()
        .await
        .unwrap();
    assert_eq!(
        *done.lock().unwrap(),
        [1, 1, 1, 1, 1, 1, 2, 2, 2, 1],
        "batch 3 (items 7 to 9) was done twice, every other batch once"
    );
    let history = backend.history("svc").await.unwrap();
    let reached: Vec<_> = history
        .iter()
        .map(|r| r.checkpoint.as_ref().and_then(|c| c.done))
        .collect();
    // The first holder's attempt got to 6 rows; the second started there.
    assert_eq!(reached, [Some(6), Some(10)]);
}
