//! The runner against the in-memory backend: the protocol's steps and
//! invariants as a user sees them (outcomes, status, history rows).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use upsilon::backend::{Acquire, BackendError, Change, Lock, Store};
use upsilon::backend::{AttemptKind, AttemptState};
use upsilon::testing::{self, Fault, MemoryBackend, Op};
use upsilon::{
    Builder, DataAheadPolicy, Error, LeaseLoss, Outcome, RetryPolicy, Status, Task, TaskContext,
    TaskFuture, Upsilon,
};

/// Which node ran which task, in order.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(String, String)>>>);

impl Log {
    fn push(&self, ctx: &TaskContext) {
        let what = if ctx.task().rollback {
            format!("undo {}", ctx.task().id)
        } else {
            ctx.task().id.clone()
        };
        self.0
            .lock()
            .unwrap()
            .push((ctx.holder().host.clone(), what));
    }
    fn tasks(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, t)| t.clone())
            .collect()
    }
    fn nodes(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }
}

fn logged(log: &Log, version: &str, order: u32, id: &str) -> Task {
    let log = log.clone();
    Task::new(
        version,
        order,
        id,
        move |ctx: &mut TaskContext| -> TaskFuture<'_> {
            log.push(ctx);
            Box::pin(async { Ok(()) })
        },
    )
    .unwrap()
}

fn failing(log: &Log, version: &str, order: u32, id: &str, fail_times: usize) -> Task {
    let log = log.clone();
    let calls = Arc::new(Mutex::new(0));
    Task::new(
        version,
        order,
        id,
        move |ctx: &mut TaskContext| -> TaskFuture<'_> {
            log.push(ctx);
            let mut c = calls.lock().unwrap();
            *c += 1;
            let fail = *c <= fail_times;
            Box::pin(async move {
                if fail {
                    Err("disk full".into())
                } else {
                    Ok(())
                }
            })
        },
    )
    .unwrap()
}

fn undo(
    log: &Log,
) -> impl for<'a> Fn(&'a mut TaskContext) -> TaskFuture<'a> + Send + Sync + 'static {
    let log = log.clone();
    move |ctx: &mut TaskContext| -> TaskFuture<'_> {
        log.push(ctx);
        Box::pin(async { Ok(()) })
    }
}

fn standard(log: &Log) -> Vec<Task> {
    vec![
        logged(log, "1.0", 1, "create_tables"),
        logged(log, "1.1", 2, "check_accounts"),
        logged(log, "1.1", 1, "backfill_accounts"),
        logged(log, "1.1.1", 1, "fix_index"),
        logged(log, "1.2", 1, "future_task"),
    ]
}

/// Builds and runs a node, expecting it to become READY, or to fail.
trait RunNode {
    async fn succeeds(self) -> Outcome;
    async fn fails(self) -> Error;
}

impl RunNode for Builder {
    async fn succeeds(self) -> Outcome {
        self.build().unwrap().run().await.unwrap()
    }
    async fn fails(self) -> Error {
        self.build().unwrap().run().await.unwrap_err()
    }
}

fn node(backend: &Arc<MemoryBackend>, n: usize, app: &str, tasks: Vec<Task>) -> Builder {
    Upsilon::builder()
        .service("svc")
        .app_version(app)
        .backend(backend.clone())
        .holder(testing::holder(n))
        .ttl(Duration::from_secs(3))
        .poll_interval(Duration::from_millis(50))
        .tasks(tasks)
}

#[tokio::test]
async fn fresh_store_runs_every_task_in_order_and_records_it() {
    let backend = MemoryBackend::new();
    let log = Log::default();
    let up = node(&backend, 1, "1.1.1", standard(&log)).build().unwrap();
    let outcome = up.run().await.unwrap();
    assert_eq!(
        log.tasks(),
        [
            "create_tables",
            "backfill_accounts",
            "check_accounts",
            "fix_index"
        ]
    );
    let Outcome::Upgraded { report } = &outcome else {
        panic!("expected an upgrade, got {outcome:?}")
    };
    assert_eq!(report.from, None);
    assert_eq!(report.to, Some(upsilon::parse_version("1.1.1").unwrap()));
    assert_eq!(report.completed.len(), 4);
    let history = backend.history("svc").await.unwrap();
    assert_eq!(history.len(), 4);
    assert!(history
        .iter()
        .all(|r| r.state == AttemptState::Completed && r.attempt == 1 && r.fence == 1));
    assert!(up.probe().ready());
    assert_eq!(
        up.probe().status(),
        Status::Ready {
            data_version: Some(upsilon::parse_version("1.1.1").unwrap())
        }
    );
    assert_eq!(
        backend.current("svc").await.unwrap(),
        None,
        "lease released"
    );
}

#[tokio::test]
async fn up_to_date_node_takes_no_lease_and_writes_nothing() {
    let backend = MemoryBackend::new();
    let log = Log::default();
    node(&backend, 1, "1.1", standard(&log)).succeeds().await;
    let acquires = backend.faults().calls(Op::Acquire);
    let applies = backend.faults().calls(Op::Apply);
    let loads = backend.faults().calls(Op::Load);
    let outcome = node(&backend, 2, "1.1", standard(&log)).succeeds().await;
    assert!(matches!(outcome, Outcome::UpToDate { .. }), "{outcome:?}");
    assert_eq!(backend.faults().calls(Op::Acquire), acquires, "no lease");
    assert_eq!(backend.faults().calls(Op::Apply), applies, "no write");
    assert_eq!(backend.faults().calls(Op::Load), loads + 1, "one read");
    assert_eq!(log.tasks().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_nodes_run_each_task_exactly_once() {
    for round in 0..20 {
        let backend = MemoryBackend::new();
        let log = Log::default();
        let nodes = (0..8)
            .map(|n| node(&backend, n, "1.1.1", standard(&log)).build().unwrap())
            .collect();
        let results = testing::run_nodes(nodes).await;
        let mut upgraded = 0;
        for r in &results {
            match r {
                Ok(Outcome::Upgraded { .. }) => upgraded += 1,
                // A node whose read came just before the canary's last
                // commit may be granted the lease after it, and find the
                // work done: it says so, and runs nothing.
                Ok(
                    Outcome::WaitedForOther { .. }
                    | Outcome::UpToDate { .. }
                    | Outcome::FoundUpToDate { .. },
                ) => {}
                other => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(upgraded, 1, "round {round}: exactly one node upgrades");
        let mut tasks = log.tasks();
        tasks.sort();
        assert_eq!(
            tasks,
            [
                "backfill_accounts",
                "check_accounts",
                "create_tables",
                "fix_index"
            ],
            "round {round}: every task exactly once"
        );
        let nodes = log.nodes();
        assert!(
            nodes.iter().all(|n| *n == nodes[0]),
            "one node did all the work"
        );
        let history = backend.history("svc").await.unwrap();
        assert_eq!(history.len(), 4, "one history row per task");
    }
}

/// Lets a test hold a parked task (`gate`) and know it has started (`entered`).
struct Gate {
    gate: Arc<Notify>,
    entered: Arc<Notify>,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            gate: Arc::new(Notify::new()),
            entered: Arc::new(Notify::new()),
        }
    }
}

/// A task that parks until released, to hold a node mid-task.
fn parked(
    log: &Log,
    version: &str,
    order: u32,
    id: &str,
    gate: &Arc<Notify>,
    entered: &Arc<Notify>,
) -> Task {
    let (gate, entered) = (gate.clone(), entered.clone());
    let log = log.clone();
    Task::new(
        version,
        order,
        id,
        move |ctx: &mut TaskContext| -> TaskFuture<'_> {
            log.push(ctx);
            let (gate, entered) = (gate.clone(), entered.clone());
            Box::pin(async move {
                entered.notify_one();
                gate.notified().await;
                Ok(())
            })
        },
    )
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn waiters_become_ready_without_taking_the_lease() {
    let backend = MemoryBackend::new();
    let log = Log::default();
    let Gate { gate, entered } = Gate::new();
    let tasks = vec![
        logged(&log, "1.0", 1, "a"),
        parked(&log, "1.1", 1, "slow", &gate, &entered),
    ];
    let canary = node(&backend, 1, "1.1", tasks.clone()).build().unwrap();
    let canary_run = tokio::spawn({
        let c = canary.clone();
        async move { c.run().await }
    });
    entered.notified().await;
    let waiters: Vec<Upsilon> = (2..5)
        .map(|n| node(&backend, n, "1.1", tasks.clone()).build().unwrap())
        .collect();
    let mut statuses: Vec<_> = waiters.iter().map(|w| w.status()).collect();
    let runs: Vec<_> = waiters
        .iter()
        .map(|w| {
            let w = w.clone();
            tokio::spawn(async move { w.run().await })
        })
        .collect();
    for s in &mut statuses {
        let st = s
            .wait_for(|st| matches!(st, Status::Waiting { .. }))
            .await
            .unwrap()
            .clone();
        assert_eq!(
            st,
            Status::Waiting {
                holder: Some(testing::holder(1))
            }
        );
    }
    assert!(matches!(
        canary.probe().status(),
        Status::Upgrading {
            index: 2,
            total: 2,
            ..
        }
    ));
    assert!(waiters.iter().all(|w| !w.probe().ready() && w.probe().up()));
    gate.notify_one();
    assert!(matches!(
        canary_run.await.unwrap().unwrap(),
        Outcome::Upgraded { .. }
    ));
    for r in runs {
        match r.await.unwrap().unwrap() {
            Outcome::WaitedForOther {
                holder,
                data_version,
                ..
            } => {
                assert_eq!(holder, Some(testing::holder(1)));
                assert_eq!(data_version, Some(upsilon::parse_version("1.1").unwrap()));
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(waiters.iter().all(|w| w.probe().ready()));
    assert_eq!(
        backend.load("svc").await.unwrap().fence,
        1,
        "no waiter was granted the lease"
    );
    assert_eq!(log.tasks(), ["a", "slow"]);
}

#[tokio::test(start_paused = true)]
async fn a_dead_holder_is_resumed_without_rerunning_completed_tasks() {
    let backend = MemoryBackend::new();
    let log = Log::default();
    let Gate { gate, entered } = Gate::new();
    let tasks = vec![
        logged(&log, "1.1", 1, "first"),
        parked(&log, "1.1", 2, "second", &gate, &entered),
        logged(&log, "1.1", 3, "third"),
    ];
    // Node 1 dies mid-task: its process is gone, nothing is released.
    backend.faults().always(Op::Release, Fault::Broken);
    let dead = tokio::spawn({
        let n = node(&backend, 1, "1.1", tasks.clone()).build().unwrap();
        async move { n.run().await }
    });
    entered.notified().await;
    dead.abort();
    let _ = dead.await;
    backend.faults().clear();
    let started = tokio::time::Instant::now();
    gate.notify_one(); // the second run of `second` goes through
    let outcome = node(&backend, 2, "1.1", tasks).succeeds().await;
    assert!(matches!(outcome, Outcome::Upgraded { .. }), "{outcome:?}");
    // L1: taken over within the TTL (3 s) plus a poll.
    assert!(started.elapsed() <= Duration::from_secs(3) + Duration::from_millis(200));
    assert_eq!(log.tasks(), ["first", "second", "second", "third"]);
    let history = backend.history("svc").await.unwrap();
    let rows: Vec<_> = history
        .iter()
        .map(|r| {
            (
                r.key.id.as_str(),
                r.attempt,
                r.state,
                r.holder.host.as_str(),
                r.fence,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("first", 1, AttemptState::Completed, "node-1", 1),
            ("second", 1, AttemptState::Running, "node-1", 1),
            ("second", 2, AttemptState::Completed, "node-2", 2),
            ("third", 1, AttemptState::Completed, "node-2", 2),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_holder_whose_lease_expired_cannot_write() {
    let backend = MemoryBackend::new();
    let log = Log::default();
    let Gate { gate, entered } = Gate::new();
    let tasks = vec![parked(&log, "1.1", 1, "slow", &gate, &entered)];
    // Node 1 cannot reach the backend to renew, but is not told: its renewals hang.
    let old = tokio::spawn({
        let n = node(&backend, 1, "1.1", tasks.clone())
            .safety_margin(Duration::ZERO)
            .renew_every(Duration::from_secs(1))
            .build()
            .unwrap();
        async move { n.run().await }
    });
    entered.notified().await;
    backend
        .faults()
        .always(Op::Renew, Fault::Delay(Duration::from_secs(3600)));
    backend.expire_lease("svc");
    // Node 2 takes over and claims the store with fence 2.
    let lock: &dyn Lock = &*backend;
    let Acquire::Granted(lease) = lock
        .try_acquire("svc", &testing::holder(2), Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!("takeover")
    };
    backend.claim("svc", lease.fence).await.unwrap();
    // Node 1's task finishes now; its completion must be refused.
    gate.notify_one();
    let err = old.await.unwrap().unwrap_err();
    let Error::LeaseLost { reason, .. } = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(
            reason,
            LeaseLoss::StaleFence {
                presented: 1,
                current: 2,
                ..
            }
        ),
        "{reason}"
    );
    assert!(
        err.to_string()
            .contains("fence 1 is stale: the store has seen fence 2"),
        "{err}"
    );
    let snap = backend.load("svc").await.unwrap();
    assert!(
        !snap.tasks.values().any(|t| t.completed),
        "the stale completion did not commit"
    );
    assert_eq!(snap.data_version, None);
}

#[tokio::test(start_paused = true)]
async fn losing_the_lease_cancels_the_running_task() {
    let backend = MemoryBackend::new();
    let cancelled = Arc::new(Notify::new());
    let seen = cancelled.clone();
    let task = Task::new(
        "1.1",
        1,
        "long",
        move |ctx: &mut TaskContext| -> TaskFuture<'_> {
            let seen = seen.clone();
            // Work the task handed to another tokio task sees the token fire;
            // the task's own future is dropped.
            let token = ctx.cancellation().clone();
            tokio::spawn(async move {
                token.cancelled().await;
                seen.notify_one();
            });
            Box::pin(std::future::pending())
        },
    )
    .unwrap();
    let up = node(&backend, 1, "1.1", vec![task]).build().unwrap();
    backend.faults().nth(Op::Renew, 2, Fault::Broken);
    let err = up.run().await.unwrap_err();
    let Error::LeaseLost { reason, .. } = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(reason, LeaseLoss::RenewalRefused { .. }),
        "{reason}"
    );
    assert!(
        reason.to_string().starts_with("renewal refused: "),
        "{reason}"
    );
    let history = backend.history("svc").await.unwrap();
    assert_eq!(history[0].state, AttemptState::Cancelled);
    assert!(matches!(up.probe().status(), Status::Failed { .. }));
    assert!(!up.probe().ready());
    cancelled.notified().await; // the task saw its cancellation token fire
}

#[tokio::test(start_paused = true)]
async fn the_local_deadline_cancels_when_renewals_hang() {
    let backend = MemoryBackend::new();
    let task = Task::new(
        "1.1",
        1,
        "long",
        |_ctx: &mut TaskContext| -> TaskFuture<'_> {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            })
        },
    )
    .unwrap();
    backend
        .faults()
        .always(Op::Renew, Fault::Delay(Duration::from_secs(3600)));
    let started = tokio::time::Instant::now();
    let err = node(&backend, 1, "1.1", vec![task]).fails().await;
    let Error::LeaseLost { reason, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(
        *reason,
        LeaseLoss::Deadline {
            ttl: Duration::from_secs(3),
            margin: Duration::from_millis(600)
        }
    );
    assert!(
        reason
            .to_string()
            .starts_with("the lease was not renewed within 2.4s"),
        "{reason}"
    );
    // TTL 3 s minus the default margin (TTL/5): 2.4 s.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2400) && took < Duration::from_millis(2500),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_failed_task_is_recorded_and_the_data_version_stays() {
    let backend = MemoryBackend::new();
    let log = Log::default();
    let tasks = vec![
        logged(&log, "1.0", 1, "base"),
        logged(&log, "1.1", 1, "ok"),
        failing(&log, "1.1", 2, "broken", usize::MAX),
        logged(&log, "1.1", 3, "never"),
    ];
    let up = node(&backend, 1, "1.1", tasks).build().unwrap();
    let err = up.run().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "task broken@1.1.0 failed on attempt 1: disk full"
    );
    let report = err.report().unwrap();
    assert_eq!(report.completed.len(), 2);
    assert_eq!(report.to, Some(upsilon::parse_version("1.0").unwrap()));
    assert_eq!(log.tasks(), ["base", "ok", "broken"]);
    let snap = backend.load("svc").await.unwrap();
    assert_eq!(
        snap.data_version,
        Some(upsilon::parse_version("1.0").unwrap())
    );
    let row = backend.history("svc").await.unwrap().pop().unwrap();
    assert_eq!(
        (row.key.id.as_str(), row.state),
        ("broken", AttemptState::Failed)
    );
    assert_eq!(row.error.as_deref(), Some("disk full"));
    assert_eq!(row.holder, testing::holder(1));
    assert!(row.duration.is_some());
    assert_eq!(
        backend.current("svc").await.unwrap(),
        None,
        "released after the failure"
    );
    assert_eq!(
        up.probe().status(),
        Status::Failed {
            error: err.to_string()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn the_retry_policy_retries_with_backoff() {
    let backend = MemoryBackend::new();
    let log = Log::default();
    let up = node(
        &backend,
        1,
        "1.1",
        vec![failing(&log, "1.1", 1, "flaky", 2)],
    )
    .retry(RetryPolicy::attempts(3, Duration::from_secs(1)))
    .build()
    .unwrap();
    let started = tokio::time::Instant::now();
    up.run().await.unwrap();
    // Backoff 1 s then 2 s, each jittered by ±50 %.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let states: Vec<_> = backend
        .history("svc")
        .await
        .unwrap()
        .iter()
        .map(|r| (r.attempt, r.state))
        .collect();
    assert_eq!(
        states,
        [
            (1, AttemptState::Failed),
            (2, AttemptState::Failed),
            (3, AttemptState::Completed)
        ]
    );
}

#[tokio::test]
async fn rollbacks_run_in_reverse_and_the_history_says_so() {
    let backend = MemoryBackend::new();
    let log = Log::default();
    let tasks = vec![
        logged(&log, "1.0", 1, "old"),
        logged(&log, "1.1", 1, "add_column").with_rollback(undo(&log)),
        logged(&log, "1.1", 2, "no_undo"),
        failing(&log, "1.1", 3, "backfill", usize::MAX).with_rollback(undo(&log)),
    ];
    let err = node(&backend, 1, "1.1", tasks.clone())
        .rollback_on_failure(true)
        .fails()
        .await;
    assert!(err.to_string().ends_with("rolled back 2 task(s)"), "{err}");
    assert_eq!(
        log.tasks(),
        [
            "old",
            "add_column",
            "no_undo",
            "backfill",
            "undo backfill",
            "undo add_column"
        ]
    );
    let snap = backend.load("svc").await.unwrap();
    let done = |id: &str| {
        snap.is_completed(&upsilon::TaskKey {
            version: upsilon::parse_version("1.1").unwrap(),
            id: id.into(),
        })
    };
    assert!(!done("add_column"), "a rolled back task is owed again");
    assert!(done("no_undo"));
    assert_eq!(
        snap.data_version,
        Some(upsilon::parse_version("1.0").unwrap())
    );
    let rollbacks: Vec<_> = backend
        .history("svc")
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == AttemptKind::Rollback)
        .map(|r| (r.key.id, r.state))
        .collect();
    assert_eq!(
        rollbacks,
        [
            ("backfill".to_owned(), AttemptState::Completed),
            ("add_column".to_owned(), AttemptState::Completed)
        ]
    );
}

#[tokio::test]
async fn a_panicking_task_fails_the_upgrade_and_releases_the_lease() {
    let backend = MemoryBackend::new();
    let task = Task::new(
        "1.1",
        1,
        "panics",
        |_ctx: &mut TaskContext| -> TaskFuture<'_> {
            Box::pin(async { panic!("index out of bounds") })
        },
    )
    .unwrap();
    let err = node(&backend, 1, "1.1", vec![task]).fails().await;
    assert!(
        err.to_string().contains("panicked: index out of bounds"),
        "{err}"
    );
    assert_eq!(backend.current("svc").await.unwrap(), None);
}

#[tokio::test]
async fn baselining_adopts_an_existing_deployment() {
    let backend = MemoryBackend::new();
    let log = Log::default();
    let up = node(&backend, 1, "1.1.1", standard(&log))
        .baseline("1.1")
        .build()
        .unwrap();
    let Outcome::Upgraded { report } = up.run().await.unwrap() else {
        panic!()
    };
    assert_eq!(
        report.baselined,
        Some(upsilon::parse_version("1.1").unwrap())
    );
    assert_eq!(
        log.tasks(),
        ["fix_index"],
        "tasks up to the baseline are not run"
    );
    // The operator's function leaves a store that is not empty alone.
    let other = MemoryBackend::new();
    assert!(
        upsilon::baseline(other.clone(), other.clone(), "svc", "2.0")
            .await
            .unwrap()
    );
    assert!(
        !upsilon::baseline(other.clone(), other.clone(), "svc", "3.0")
            .await
            .unwrap()
    );
    let snap = other.load("svc").await.unwrap();
    assert_eq!(
        snap.data_version,
        Some(upsilon::parse_version("2.0").unwrap())
    );
    assert_eq!(snap.baseline, snap.data_version);
}

#[tokio::test(start_paused = true)]
async fn waiting_gives_up_naming_the_holder() {
    let backend = MemoryBackend::new();
    let log = Log::default();
    let lock: &dyn Lock = &*backend;
    lock.try_acquire("svc", &testing::holder(9), Duration::from_secs(3600))
        .await
        .unwrap();
    let err = node(&backend, 1, "1.1", standard(&log))
        .max_wait(Duration::from_secs(5))
        .fails()
        .await;
    let text = err.to_string();
    assert!(matches!(err, Error::WaitTimeout { .. }), "{text}");
    assert!(text.contains("held by node-9 (pid"), "{text}");
    assert!(log.tasks().is_empty());
}

#[tokio::test]
async fn resources_reach_tasks_and_a_missing_one_is_named() {
    let backend = MemoryBackend::new();
    struct Pool(&'static str);
    let task = Task::new(
        "1.1",
        1,
        "uses_pool",
        |ctx: &mut TaskContext| -> TaskFuture<'_> {
            Box::pin(async move {
                assert_eq!(ctx.resource::<Pool>()?.0, "pool");
                ctx.resource::<u64>()?;
                Ok(())
            })
        },
    )
    .unwrap();
    let err = node(&backend, 1, "1.1", vec![task])
        .resource(Pool("pool"))
        .fails()
        .await;
    assert!(
        err.to_string().contains(
            "asked for a resource of type `u64` that was never registered; add `.resource(value)`"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn data_ahead_of_the_app_follows_the_policy() {
    let backend = MemoryBackend::new();
    let log = Log::default();
    node(&backend, 1, "1.2", standard(&log)).succeeds().await;
    let older = node(&backend, 2, "1.1", standard(&log)).succeeds().await;
    assert!(matches!(older, Outcome::UpToDate { .. }));
    let err = node(&backend, 2, "1.1", standard(&log))
        .data_ahead(DataAheadPolicy::Fail)
        .fails()
        .await;
    assert!(err.to_string().contains("data version 1.2.0"), "{err}");
}

#[tokio::test]
async fn tasks_added_out_of_order_are_reported_and_run_only_when_asked() {
    let backend = MemoryBackend::new();
    let log = Log::default();
    node(&backend, 1, "1.1", vec![logged(&log, "1.1", 1, "a")])
        .succeeds()
        .await;
    let late = vec![logged(&log, "1.1", 1, "a"), logged(&log, "1.0", 5, "late")];
    let up = node(&backend, 1, "1.1", late.clone()).build().unwrap();
    let plan = up.plan().await.unwrap();
    assert!(plan.is_empty());
    assert_eq!(plan.out_of_order.len(), 1);
    up.run().await.unwrap();
    assert_eq!(log.tasks(), ["a"]);
    node(&backend, 1, "1.1", late)
        .run_out_of_order(true)
        .succeeds()
        .await;
    assert_eq!(log.tasks(), ["a", "late"]);
}

#[tokio::test(start_paused = true)]
async fn lost_replies_and_transient_errors_are_retried_without_rerunning() {
    let backend = MemoryBackend::new();
    let log = Log::default();
    backend.faults().nth(Op::Load, 1, Fault::Unavailable);
    backend.faults().nth(Op::Acquire, 1, Fault::LoseReply);
    backend.faults().nth(Op::Apply, 2, Fault::LoseReply);
    backend.faults().nth(Op::Apply, 3, Fault::Unavailable);
    let up = node(&backend, 1, "1.1.1", standard(&log)).build().unwrap();
    let outcome = up.run().await;
    // The lost acquire reply left a lease granted to us that we never saw:
    // the runner waits for it to expire and then takes it over.
    let outcome = outcome.unwrap();
    assert!(
        matches!(
            outcome,
            Outcome::Upgraded { .. } | Outcome::WaitedForOther { .. }
        ),
        "{outcome:?}"
    );
    assert_eq!(
        log.tasks(),
        [
            "create_tables",
            "backfill_accounts",
            "check_accounts",
            "fix_index"
        ]
    );
    assert_eq!(backend.history("svc").await.unwrap().len(), 4);
}

#[tokio::test]
async fn a_broken_backend_is_a_clear_error_never_nothing_to_do() {
    let backend = MemoryBackend::new();
    backend.faults().always(Op::Load, Fault::Broken);
    let up = node(&backend, 1, "1.1", vec![]).build().unwrap();
    let err = up.run().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Backend {
                during: "reading the store",
                ..
            }
        ),
        "{err}"
    );
    // The status says what failed and why, once.
    assert_eq!(
        up.probe().status(),
        Status::Failed {
            error: "reading the store failed: injected fault: Load broken".into()
        }
    );
    backend.faults().clear();
    backend.faults().always(Op::Load, Fault::Unavailable);
    let err = node(&backend, 1, "1.1", vec![])
        .backend_attempts(3)
        .fails()
        .await;
    assert!(matches!(
        err,
        Error::Backend {
            source: BackendError::Unavailable { .. },
            ..
        }
    ));
    assert_eq!(backend.faults().calls(Op::Load), 4);
}

/// The setting `build` refused, and what it said about it.
fn refused(builder: Builder) -> (&'static str, String) {
    match builder.build().unwrap_err() {
        Error::Config {
            setting, problem, ..
        } => (setting, problem),
        other => panic!("expected a configuration error, got {other}"),
    }
}

#[test]
fn nonsense_settings_are_refused_when_building() {
    let backend = MemoryBackend::new();
    let base = || node(&backend, 1, "1.1", vec![]);
    let cases = [
        (
            Upsilon::builder().backend(backend.clone()),
            "app_version",
            "not set; call `.app_version(",
        ),
        (
            base().app_version("v2"),
            "app_version",
            "`v2` is not a version",
        ),
        (base().ttl(Duration::from_millis(10)), "ttl", "too short"),
        (
            base().renew_every(Duration::from_secs(2)),
            "renew_every",
            "renew at most every",
        ),
        (
            base().safety_margin(Duration::from_secs(5)),
            "safety_margin",
            "must be shorter than the ttl",
        ),
        (
            base().service("has space"),
            "service",
            "\"has space\" must be",
        ),
        (base().baseline("2.0"), "baseline", "above the app version"),
        (
            base().require_tasks_from("billing_tasks"),
            "require_tasks_from",
            "add `use billing_tasks as _;`",
        ),
        // A Cargo package name is advised as the Rust name `use` takes.
        (
            base().require_tasks_from("billing-tasks"),
            "require_tasks_from",
            "add `use billing_tasks as _;`",
        ),
        (
            Upsilon::builder().app_version("1.0"),
            "backend",
            "not set; call `.backend(..)`",
        ),
        (
            Upsilon::builder().app_version("1.0").store(backend.clone()),
            "lock",
            "not set",
        ),
        (
            base().poll_interval(Duration::ZERO),
            "poll_interval",
            "must not be zero",
        ),
        (
            base().retry(RetryPolicy::attempts(0, Duration::from_secs(1))),
            "retry",
            "max_attempts must be at least 1",
        ),
        (base().backend_attempts(0), "backend_attempts", "at least 1"),
    ];
    for (builder, setting, says) in cases {
        let (at, problem) = refused(builder);
        assert_eq!(at, setting, "{problem}");
        assert!(problem.contains(says), "{setting}: {problem}");
    }
    let err = base().ttl(Duration::from_millis(10)).build().unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid Upsilon configuration: ttl: 10ms is too short; use at least 100 ms (seconds in production)"
    );
}

#[test]
fn durations_too_long_for_a_clock_are_refused_not_overflowed() {
    let backend = MemoryBackend::new();
    let base = || node(&backend, 1, "1.1", vec![]);
    let cases = [
        (base().max_wait(Duration::MAX), "max_wait"),
        (base().ttl(Duration::MAX), "ttl"),
        // Too long for the backend's clock in milliseconds, not for Instant.
        (base().ttl(Duration::from_secs(u64::MAX / 3_000)), "ttl"),
        (base().poll_interval(Duration::MAX), "poll_interval"),
        (
            base().retry(RetryPolicy::attempts(3, Duration::MAX)),
            "retry",
        ),
    ];
    for (builder, setting) in cases {
        let (at, problem) = refused(builder);
        assert_eq!(at, setting, "{problem}");
        assert!(problem.contains("too long to add to a clock"), "{problem}");
    }
    // Renewing every Duration::MAX would overflow the old check itself.
    for every in [Duration::MAX, Duration::from_secs(3)] {
        let (at, problem) = refused(base().renew_every(every));
        assert_eq!(at, "renew_every");
        assert!(
            problem.contains("is not shorter than the ttl 3s"),
            "{problem}"
        );
    }
    let (at, problem) = refused(base().safety_margin(Duration::MAX));
    assert_eq!(at, "safety_margin", "{problem}");
    // Long but finite waits still build.
    base()
        .max_wait(Duration::from_secs(86_400 * 365))
        .build()
        .unwrap();
}

/// What the runner logs on this thread, as a user's fmt subscriber prints it.
///
/// One global subscriber serves every test of this binary and writes to the
/// buffer of the thread that logs, if that thread captures. (A subscriber set
/// per thread would not do: tracing caches each call site's interest across
/// threads, so a test running beside it on another thread, with no
/// subscriber, can switch a call site off in the middle of a capture.)
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

thread_local! {
    static CAPTURING: std::cell::RefCell<Option<Logs>> = const { std::cell::RefCell::new(None) };
}

/// Stops a thread's capture when dropped.
struct Capture;

impl Drop for Capture {
    fn drop(&mut self) {
        CAPTURING.with(|c| c.borrow_mut().take());
    }
}

impl Logs {
    /// Captures this thread's logs until the guard is dropped.
    fn capture() -> (Logs, Capture) {
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_writer(|| ThreadLogs)
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .finish();
            tracing::subscriber::set_global_default(subscriber).unwrap();
        });
        let logs = Logs::default();
        CAPTURING.with(|c| *c.borrow_mut() = Some(logs.clone()));
        (logs, Capture)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

/// The global subscriber's writer: the logging thread's capture, or nowhere.
struct ThreadLogs;

impl std::io::Write for ThreadLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURING.with(|c| {
            if let Some(logs) = c.borrow().as_ref() {
                logs.0.lock().unwrap().extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn logs_show_plain_versions_and_the_attempt_that_completed() {
    let backend = MemoryBackend::new();
    let log = Log::default();
    let tasks = vec![
        logged(&log, "1.0", 1, "base"),
        failing(&log, "1.1", 1, "flaky", 2),
    ];
    let (logs, _guard) = Logs::capture();
    node(&backend, 1, "1.1", tasks)
        .retry(RetryPolicy::attempts(3, Duration::from_millis(1)))
        .succeeds()
        .await;
    let text = logs.text();
    assert!(!text.contains("Some("), "{text}");
    let needed = logs.lines_with("upgrade needed");
    assert!(needed[0].ends_with("data_version=none"), "{text}");
    let complete = logs.lines_with("version complete");
    assert_eq!(complete.len(), 2, "{text}");
    assert!(complete[0].ends_with("data_version=1.0.0"), "{text}");
    assert!(complete[1].ends_with("data_version=1.1.0"), "{text}");
    let completed = logs.lines_with("task completed task=flaky@1.1.0");
    assert_eq!(completed.len(), 1, "{text}");
    assert!(completed[0].contains(" attempt=3 "), "{text}");
}

#[test]
fn tasks_above_the_app_are_warned_about_once_and_after_every_setting_is_checked() {
    let backend = MemoryBackend::new();
    let log = Log::default();
    let tasks = || {
        vec![
            logged(&log, "1.1", 1, "now"),
            logged(&log, "9.0", 1, "warned_once"),
        ]
    };
    let (logs, _guard) = Logs::capture();
    let warnings = || logs.lines_with("above the app version").len();
    let (setting, _) = refused(node(&backend, 1, "1.1", tasks()).require_tasks_from("nowhere"));
    assert_eq!(setting, "require_tasks_from");
    let (setting, _) = refused(node(&backend, 1, "1.1", tasks()).ttl(Duration::from_millis(10)));
    assert_eq!(setting, "ttl");
    assert_eq!(warnings(), 0, "no warning before a configuration error");
    for _ in 0..3 {
        node(&backend, 1, "1.1", tasks()).build().unwrap();
    }
    assert_eq!(warnings(), 1, "{}", logs.text());
    assert!(
        logs.lines_with("above the app version")[0].contains("warned_once@9.0.0"),
        "{}",
        logs.text()
    );
}

/// Each layer of an error chain, outermost first, as anyhow's `{:#}` walks it.
fn layers(err: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut layers = vec![err.to_string()];
    let mut source = err.source();
    while let Some(s) = source {
        layers.push(s.to_string());
        source = s.source();
    }
    layers
}

#[test]
fn an_error_chain_says_each_thing_once() {
    let err = Error::Backend {
        during: "reading the store",
        source: BackendError::unavailable(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )),
    };
    let layers = layers(&err);
    assert_eq!(
        layers,
        ["reading the store failed", "connection reset by peer"]
    );
    for (i, outer) in layers.iter().enumerate() {
        for inner in &layers[i + 1..] {
            assert!(
                !outer.contains(inner.as_str()),
                "{outer:?} repeats its cause {inner:?}"
            );
        }
    }
    assert_eq!(
        format!("{:#}", anyhow::Error::new(err)),
        "reading the store failed: connection reset by peer"
    );
}

#[test]
fn conflicting_tasks_are_refused_before_any_lock_naming_both() {
    let backend = MemoryBackend::new();
    let log = Log::default();
    let tasks = vec![
        logged(&log, "1.1", 1, "a"),
        logged(&log, "1.1", 1, "b"),
        logged(&log, "1.1.0", 2, "a"),
        logged(&log, "2.0", 1, "too_new"),
    ];
    let err = node(&backend, 1, "1.1", tasks.clone())
        .tasks_above_app(upsilon::AboveAppPolicy::Error)
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("2 problems in the registered upgrade tasks"),
        "{err}"
    );
    assert!(err.contains("tasks `a` (upsilon/tests/runner.rs:"), "{err}");
    assert!(err.contains("both have version 1.1.0 and order 1"), "{err}");
    assert!(
        err.contains("two tasks have id `a` in version 1.1.0"),
        "{err}"
    );
    let err = node(&backend, 1, "1.1", vec![tasks[3].clone()])
        .tasks_above_app(upsilon::AboveAppPolicy::Error)
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has version 2.0.0, above the app version 1.1.0"),
        "{err}"
    );
    assert_eq!(backend.faults().calls(Op::Acquire), 0);
}

#[tokio::test]
async fn progress_is_visible_in_the_status() {
    let backend = MemoryBackend::new();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<()>();
    let seen = Arc::new(Mutex::new(Some(seen_tx)));
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let task = Task::new(
        "1.1",
        1,
        "copy",
        move |ctx: &mut TaskContext| -> TaskFuture<'_> {
            let (seen, g) = (seen.clone(), g.clone());
            Box::pin(async move {
                ctx.progress(40, 100, "copying rows");
                let _ = seen.lock().unwrap().take().unwrap().send(());
                g.notified().await;
                Ok(())
            })
        },
    )
    .unwrap();
    let up = node(&backend, 1, "1.1", vec![task]).build().unwrap();
    let run = tokio::spawn({
        let up = up.clone();
        async move { up.run().await }
    });
    seen_rx.await.unwrap();
    let status = up.probe().status();
    assert_eq!(
        status.to_string(),
        "upgrading: task 1 of 1 (copy@1.1.0), 40/100 copying rows"
    );
    gate.notify_one();
    run.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_notified_waiter_makes_two_queries() {
    let backend = MemoryBackend::new();
    let log = Log::default();
    let Gate { gate, entered } = Gate::new();
    let tasks = vec![parked(&log, "1.1", 1, "slow", &gate, &entered)];
    let canary = node(&backend, 1, "1.1", tasks.clone()).build().unwrap();
    let canary_run = tokio::spawn(async move { canary.run().await });
    entered.notified().await;
    let (loads, acquires) = (
        backend.faults().calls(Op::Load),
        backend.faults().calls(Op::Acquire),
    );
    let waiter = node(&backend, 2, "1.1", tasks).build().unwrap();
    let mut status = waiter.status();
    let waiter_run = tokio::spawn({
        let w = waiter.clone();
        async move { w.run().await }
    });
    status
        .wait_for(|s| matches!(s, Status::Waiting { .. }))
        .await
        .unwrap();
    gate.notify_one();
    canary_run.await.unwrap().unwrap();
    let outcome = waiter_run.await.unwrap().unwrap();
    assert!(
        matches!(outcome, Outcome::WaitedForOther { .. }),
        "{outcome:?}"
    );
    // Read, try the lease; the canary's last write carries its notice, so
    // no read follows the notification, and there is no polling.
    assert_eq!(backend.faults().calls(Op::Load) - loads, 1);
    assert_eq!(backend.faults().calls(Op::Acquire) - acquires, 1);
}

#[tokio::test]
async fn a_data_version_left_behind_by_a_completed_task_is_caught_up() {
    use upsilon::backend::{FinishAttempt, StartAttempt};
    let backend = MemoryBackend::new();
    let log = Log::default();
    // A task committed its own completion (a same-transaction helper), and
    // its node died before recording the data version.
    backend.claim("svc", 1).await.unwrap();
    let key = upsilon::TaskKey {
        version: upsilon::parse_version("1.1").unwrap(),
        id: "only".into(),
    };
    backend
        .apply(
            "svc",
            1,
            &[
                Change::Start(StartAttempt {
                    key: key.clone(),
                    attempt: 1,
                    kind: AttemptKind::Run,
                    description: String::new(),
                    holder: testing::holder(9),
                    checkpoint: None,
                }),
                Change::Finish(FinishAttempt {
                    key,
                    attempt: 1,
                    state: AttemptState::Completed,
                    error: None,
                    duration: Duration::from_millis(5),
                }),
            ],
        )
        .await
        .unwrap();
    let outcome = node(&backend, 1, "1.1", vec![logged(&log, "1.1", 1, "only")])
        .succeeds()
        .await;
    let Outcome::Upgraded { report } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        report.completed.is_empty() && log.tasks().is_empty(),
        "nothing re-ran"
    );
    assert_eq!(report.to, Some(upsilon::parse_version("1.1").unwrap()));
    assert_eq!(
        backend.load("svc").await.unwrap().data_version,
        Some(upsilon::parse_version("1.1").unwrap())
    );
}
