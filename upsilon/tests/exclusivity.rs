//! E1, execution exclusivity, as a user sees it: a node that may have lost
//! its lease stops its task before another node starts one; a late or lost
//! reply to a grant neither buys a full TTL nor leaves a node waiting on
//! itself; a node asked to stop records its task as cancelled and hands the
//! lease over at once. All on the in-memory backend with paused time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use upsilon::backend::{AttemptState, Lock, Store};
use upsilon::testing::{Fault, MemoryBackend, Op, SessionModel};
use upsilon::{Error, LeaseLoss, Outcome, Task, TaskContext, TaskFuture, Upsilon};

const SERVICE: &str = "svc";
const TTL: Duration = Duration::from_secs(6);

/// One run of task code: the node, its start, its end once it ended.
type Run = (String, Instant, Option<Instant>);

/// When each node's task code ran.
#[derive(Clone, Default)]
struct Runs(Arc<Mutex<Vec<Run>>>);

impl Runs {
    fn begin(&self, node: &str) -> usize {
        let mut runs = self.0.lock().unwrap();
        runs.push((node.to_owned(), Instant::now(), None));
        runs.len() - 1
    }
    fn end(&self, i: usize) {
        self.0.lock().unwrap()[i].2 = Some(Instant::now());
    }
    fn all(&self) -> Vec<Run> {
        self.0.lock().unwrap().clone()
    }
    /// Pairs of runs of different nodes whose times overlap.
    fn overlaps(&self) -> Vec<String> {
        let runs = self.all();
        let mut found = Vec::new();
        for (i, a) in runs.iter().enumerate() {
            for b in &runs[i + 1..] {
                let a_end = a.2.unwrap_or_else(Instant::now);
                let b_end = b.2.unwrap_or_else(Instant::now);
                if a.0 != b.0 && a.1 < b_end && b.1 < a_end {
                    found.push(format!("{} and {} ran at once", a.0, b.0));
                }
            }
        }
        found
    }
}

/// Ends the run it belongs to when the task's future ends, however it ends.
struct RunGuard(Runs, usize);

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.0.end(self.1);
    }
}

/// A task that runs for `length` (cancellable) and records when it ran.
fn long_task(runs: &Runs, length: Duration) -> Task {
    let runs = runs.clone();
    Task::new(
        "1.1",
        1,
        "backfill",
        move |ctx: &mut TaskContext| -> TaskFuture<'_> {
            let guard = RunGuard(runs.clone(), runs.begin(&ctx.holder().host));
            Box::pin(async move {
                let _guard = guard;
                tokio::time::sleep(length).await;
                Ok(())
            })
        },
    )
    .unwrap()
}

fn node(backend: &Arc<MemoryBackend>, n: usize, task: Task) -> Upsilon {
    Upsilon::builder()
        .service(SERVICE)
        .app_version("1.1")
        .backend(backend.clone())
        .holder(upsilon::testing::holder(n))
        .ttl(TTL)
        .max_wait(Duration::from_secs(600))
        .tasks([task])
        .build()
        .unwrap()
}

/// Node 1 holds the lease and runs a 60 s task; its session ends 1 s in;
/// node 2 waits. Returns what both runs ended with.
async fn session_ends_under_a_running_task(
    model: SessionModel,
    runs: &Runs,
) -> (Result<Outcome, Error>, Result<Outcome, Error>) {
    let backend = MemoryBackend::new();
    backend.set_session_model(model);
    let task = long_task(runs, Duration::from_secs(60));
    let holder = tokio::spawn({
        let node = node(&backend, 1, task.clone());
        async move { node.run().await }
    });
    while runs.all().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waiter = tokio::spawn({
        let node = node(&backend, 2, task);
        async move { node.run().await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(backend.end_session(SERVICE), "node 1 holds the lease");
    (holder.await.unwrap(), waiter.await.unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_holder_whose_session_ends_stops_before_another_node_starts() {
    let runs = Runs::default();
    let (first, second) = session_ends_under_a_running_task(SessionModel::default(), &runs).await;
    let Err(Error::LeaseLost {
        reason: LeaseLoss::Signalled { detail },
        ..
    }) = &first
    else {
        panic!("node 1 stops on the backend's signal: {first:?}");
    };
    assert!(detail.contains("session"), "{detail}");
    assert!(matches!(second, Ok(Outcome::Upgraded { .. })), "{second:?}");
    let all = runs.all();
    assert_eq!(
        all.len(),
        2,
        "{:?}",
        all.iter().map(|r| &r.0).collect::<Vec<_>>()
    );
    assert!(runs.overlaps().is_empty(), "{:?}", runs.overlaps());
    // Taken over within the session model's grace, long before the TTL.
    let handover = all[1].1 - all[0].2.unwrap();
    assert!(handover < TTL / 2, "{handover:?}");
}

/// The negative control: with the holder's loss detection off, the same
/// takeover makes two nodes run the task at once, and the check sees it.
#[tokio::test(start_paused = true)]
async fn without_loss_detection_the_runs_overlap() {
    let runs = Runs::default();
    let model = SessionModel {
        detection: None,
        ..SessionModel::default()
    };
    let (_first, _second) = session_ends_under_a_running_task(model, &runs).await;
    assert!(!runs.overlaps().is_empty(), "the check finds the overlap");
}

#[tokio::test(start_paused = true)]
async fn a_late_grant_reply_counts_the_deadline_from_the_request() {
    let backend = MemoryBackend::new();
    // The grant takes effect at once; its reply arrives 2 s later. Renewals
    // all fail, so the local deadline alone ends the run.
    backend
        .faults()
        .nth(Op::Acquire, 1, Fault::DelayReply(Duration::from_secs(2)));
    backend.faults().always(Op::Renew, Fault::Unavailable);
    let runs = Runs::default();
    let sent = Instant::now();
    let err = node(&backend, 1, long_task(&runs, Duration::from_secs(60)))
        .run()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::LeaseLost {
                reason: LeaseLoss::Deadline { .. },
                ..
            }
        ),
        "{err}"
    );
    let stopped = runs.all()[0].2.unwrap();
    // The default margin is a fifth of the TTL: the deadline is 4.8 s after
    // the request, not 4.8 s after the late reply (which would be 6.8 s, past
    // the backend's expiry at 6 s).
    assert!(stopped - sent <= TTL - TTL / 5, "{:?}", stopped - sent);
    let grant = backend.grants()[0].at_ms;
    let expiry = grant + TTL.as_millis() as i64;
    let stopped_ms = grant + (stopped - sent).as_millis() as i64;
    assert!(stopped_ms < expiry, "stopped before the backend's expiry");
}

/// A grant request retried after transient errors for longer than the
/// lease's local budget: the deadline counts from the try that was granted,
/// not from the first of them, so the node runs its plan.
#[tokio::test(start_paused = true)]
async fn a_grant_after_long_retries_counts_the_deadline_from_its_own_request() {
    let backend = MemoryBackend::new();
    // Seven refused tries, backed off for about 9 s in all: longer than the
    // 4.8 s the lease may be used for.
    for nth in 1..=7 {
        backend.faults().nth(Op::Acquire, nth, Fault::Unavailable);
    }
    let runs = Runs::default();
    let started = Instant::now();
    let node = Upsilon::builder()
        .service(SERVICE)
        .app_version("1.1")
        .backend(backend.clone())
        .holder(upsilon::testing::holder(1))
        .ttl(TTL)
        .backend_attempts(10)
        .tasks([long_task(&runs, Duration::from_millis(100))])
        .build()
        .unwrap();
    let outcome = node.run().await.unwrap();
    assert!(matches!(outcome, Outcome::Upgraded { .. }), "{outcome}");
    assert!(
        started.elapsed() > TTL - TTL / 5,
        "the retries outlasted the budget: {:?}",
        started.elapsed()
    );
    assert_eq!(backend.faults().calls(Op::Acquire), 8);
    assert_eq!(backend.grants().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_lost_grant_reply_is_taken_up_not_waited_out() {
    let backend = MemoryBackend::new();
    backend.faults().nth(Op::Acquire, 1, Fault::LoseReply);
    let runs = Runs::default();
    let started = Instant::now();
    let outcome = node(&backend, 1, long_task(&runs, Duration::from_millis(100)))
        .run()
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Upgraded { .. }), "{outcome}");
    assert!(started.elapsed() < TTL / 2, "{:?}", started.elapsed());
    let grants = backend.grants();
    assert_eq!(grants.len(), 1, "one grant, taken up: {grants:?}");
    assert!(
        backend.current(SERVICE).await.unwrap().is_none(),
        "released"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stopped_holder_records_its_task_cancelled_and_hands_over_at_once() {
    let backend = MemoryBackend::new();
    let runs = Runs::default();
    let task = long_task(&runs, Duration::from_secs(60));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let holder = tokio::spawn({
        let node = node(&backend, 1, task.clone());
        async move {
            node.run_until(async {
                let _ = stopped.await;
            })
            .await
        }
    });
    while runs.all().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waiter = tokio::spawn({
        let node = node(&backend, 2, task);
        async move { node.run().await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let asked = Instant::now();
    stop.send(()).unwrap();
    let err = holder.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Stopped { .. }), "{err}");
    let outcome = waiter.await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Upgraded { .. }), "{outcome}");

    let all = runs.all();
    assert!(runs.overlaps().is_empty(), "{:?}", runs.overlaps());
    let handover = all[1].1 - asked;
    assert!(handover < Duration::from_millis(500), "{handover:?}");
    let history = backend.history(SERVICE).await.unwrap();
    assert_eq!(history[0].state, AttemptState::Cancelled);
    assert!(
        history[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("stopped"),
        "{:?}",
        history[0]
    );
    assert_eq!(history[1].state, AttemptState::Completed);
    assert_eq!(backend.grants().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_node_asked_to_stop_stops_waiting() {
    let backend = MemoryBackend::new();
    let runs = Runs::default();
    let task = long_task(&runs, Duration::from_secs(60));
    let holder = tokio::spawn({
        let node = node(&backend, 1, task.clone());
        async move { node.run().await }
    });
    while runs.all().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = node(&backend, 2, task)
        .run_until(tokio::time::sleep(Duration::from_secs(1)))
        .await
        .unwrap_err();
    let Error::Stopped { report } = &err else {
        panic!("{err}");
    };
    assert!(report.completed.is_empty());
    assert_eq!(runs.all().len(), 1, "the waiting node ran nothing");
    holder.abort();
}
