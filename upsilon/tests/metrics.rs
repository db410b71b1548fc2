//! The runner's metrics as Prometheus scrapes them: a Prometheus recorder,
//! `/metrics` beside `upsilon::http`'s routes, and a real HTTP client during
//! and after an upgrade.
//!
//! The recorder is the process's global one: each test has its own service,
//! so its own label values.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::Notify;
use upsilon::backend::{Acquire, Lock};
use upsilon::testing::{self, Fault, MemoryBackend, Op};
use upsilon::{
    Builder, Error, LeaseLoss, Outcome, RetryPolicy, Status, Task, TaskContext, TaskFuture, Upsilon,
};

/// The Prometheus recorder, installed once for the whole test binary.
fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &[0.01, 0.1, 1.0, 10.0])
                .unwrap()
                .install_recorder()
                .unwrap();
            upsilon::metrics::describe();
            handle
        })
        .clone()
}

fn parked(order: u32, id: &str, gate: &Arc<Notify>, entered: &Arc<Notify>) -> Task {
    let (gate, entered) = (gate.clone(), entered.clone());
    Task::new(
        "1.1",
        order,
        id,
        move |_: &mut TaskContext| -> TaskFuture<'_> {
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

/// Fails its first run, then succeeds.
fn flaky(order: u32, id: &str) -> Task {
    let runs = Arc::new(Mutex::new(0));
    Task::new(
        "1.1",
        order,
        id,
        move |_: &mut TaskContext| -> TaskFuture<'_> {
            let mut n = runs.lock().unwrap();
            *n += 1;
            let fail = *n == 1;
            Box::pin(async move {
                if fail {
                    Err("try again".into())
                } else {
                    Ok(())
                }
            })
        },
    )
    .unwrap()
}

/// A task that sleeps for an hour unless it is cancelled.
fn endless(order: u32, id: &str) -> Task {
    Task::new("1.1", order, id, |_: &mut TaskContext| -> TaskFuture<'_> {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        })
    })
    .unwrap()
}

fn node(backend: &Arc<MemoryBackend>, n: usize, tasks: Vec<Task>) -> Builder {
    on(backend, "billing", n, tasks)
}

fn on(backend: &Arc<MemoryBackend>, service: &str, n: usize, tasks: Vec<Task>) -> Builder {
    Upsilon::builder()
        .service(service)
        .app_version("1.1")
        .backend(backend.clone())
        .holder(testing::holder(n))
        // Renewals every 100 ms, so that a parked task sees some.
        .ttl(Duration::from_millis(300))
        .poll_interval(Duration::from_millis(20))
        .retry(RetryPolicy::attempts(2, Duration::from_millis(1)))
        .tasks(tasks)
}

/// The value of the sample `name{labels}` (labels as rendered, in order).
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let head = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&head))
        .map(|v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_with_the_service_label_during_and_after_an_upgrade() {
    let handle = prometheus();
    let backend = MemoryBackend::new();
    let (gate, entered) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let tasks = vec![parked(1, "backfill", &gate, &entered), flaky(2, "check")];
    let canary = node(&backend, 1, tasks.clone()).build().unwrap();
    let waiter = node(&backend, 2, tasks).build().unwrap();
    let app = Router::new()
        .route("/metrics", get(move || async move { handle.render() }))
        .merge(upsilon::http::router(canary.probe()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest::Client::new();
    let scrape = || async {
        let response = client.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        response.text().await.unwrap()
    };

    let run = tokio::spawn({
        let canary = canary.clone();
        async move { canary.run().await }
    });
    entered.notified().await;
    let waiter_run = tokio::spawn({
        let waiter = waiter.clone();
        async move { waiter.run().await }
    });
    waiter
        .status()
        .wait_for(|s| matches!(s, Status::Waiting { .. }))
        .await
        .unwrap();
    // Let a few renewals happen while the task is parked.
    tokio::time::sleep(Duration::from_millis(350)).await;

    let during = scrape().await;
    let svc = r#"service="billing""#;
    assert_eq!(
        sample(&during, "upsilon_lease_grants_total", svc),
        Some(1.0),
        "{during}"
    );
    assert_eq!(
        sample(&during, "upsilon_waiting_nodes", svc),
        Some(1.0),
        "{during}"
    );
    assert!(
        sample(&during, "upsilon_lease_renewals_total", svc).unwrap_or(0.0) >= 1.0,
        "{during}"
    );
    assert!(
        during.contains("# TYPE upsilon_lease_grants_total counter"),
        "{during}"
    );
    assert!(
        during.contains("# HELP upsilon_waiting_nodes Nodes waiting"),
        "{during}"
    );
    assert!(sample(
        &during,
        "upsilon_runs_total",
        &format!(r#"{svc},outcome="upgraded""#)
    )
    .is_none());

    gate.notify_one();
    assert!(matches!(
        run.await.unwrap().unwrap(),
        Outcome::Upgraded { .. }
    ));
    assert!(matches!(
        waiter_run.await.unwrap().unwrap(),
        Outcome::WaitedForOther { .. }
    ));

    let after = scrape().await;
    let has = |name: &str, labels: &str| -> f64 {
        sample(&after, name, labels).unwrap_or_else(|| panic!("no {name}{{{labels}}} in\n{after}"))
    };
    assert_eq!(
        has(
            "upsilon_runs_total",
            &format!(r#"{svc},outcome="upgraded""#)
        ),
        1.0
    );
    assert_eq!(
        has("upsilon_runs_total", &format!(r#"{svc},outcome="waited""#)),
        1.0
    );
    assert_eq!(has("upsilon_waiting_nodes", svc), 0.0);
    assert_eq!(
        has(
            "upsilon_wait_duration_seconds_count",
            &format!(r#"{svc},outcome="ready""#)
        ),
        1.0
    );
    assert_eq!(
        has(
            "upsilon_upgrade_duration_seconds_count",
            &format!(r#"{svc},outcome="upgraded""#)
        ),
        1.0
    );
    let task = |id: &str, outcome: &str| {
        format!(r#"{svc},task="{id}",version="1.1.0",outcome="{outcome}""#)
    };
    assert_eq!(
        has(
            "upsilon_task_duration_seconds_count",
            &task("backfill", "completed")
        ),
        1.0
    );
    assert!(
        has(
            "upsilon_task_duration_seconds_sum",
            &task("backfill", "completed")
        ) > 0.3
    );
    assert_eq!(
        has(
            "upsilon_task_duration_seconds_count",
            &task("check", "failed")
        ),
        1.0
    );
    assert_eq!(
        has(
            "upsilon_task_duration_seconds_count",
            &task("check", "completed")
        ),
        1.0
    );
    let check = format!(r#"{svc},task="check",version="1.1.0""#);
    assert_eq!(has("upsilon_task_failures_total", &check), 1.0);
    assert_eq!(has("upsilon_task_retries_total", &check), 1.0);
    assert!(
        after.contains(r#"upsilon_task_duration_seconds_bucket{service="billing",task="backfill",version="1.1.0",outcome="completed",le="1"} 1"#),
        "histograms have buckets:\n{after}"
    );
    assert!(sample(
        &after,
        "upsilon_lease_losses_total",
        &format!(r#"{svc},reason="deadline""#)
    )
    .is_none());
}

#[tokio::test]
async fn a_grant_after_the_old_holders_lease_ran_out_is_a_takeover() {
    let handle = prometheus();
    let backend = MemoryBackend::new();
    // A node that took the lease and died: nobody renews it.
    let dead = testing::holder(1);
    let granted = backend
        .try_acquire("ledger", &dead, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(matches!(granted, Acquire::Granted(_)));
    let up = on(&backend, "ledger", 2, vec![flaky(1, "t"), endless(2, "u")])
        .retry(RetryPolicy::attempts(1, Duration::ZERO))
        .build()
        .unwrap();
    assert!(matches!(up.run().await, Err(Error::TaskFailed { .. })));

    let text = handle.render();
    let svc = r#"service="ledger""#;
    assert_eq!(
        sample(&text, "upsilon_lease_grants_total", svc),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "upsilon_lease_takeovers_total", svc),
        Some(1.0),
        "{text}"
    );
    let granted = format!(r#"{svc},outcome="granted""#);
    assert_eq!(
        sample(&text, "upsilon_wait_duration_seconds_count", &granted),
        Some(1.0)
    );
    let failed = format!(r#"{svc},outcome="task_failed""#);
    assert_eq!(
        sample(&text, "upsilon_runs_total", &failed),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "upsilon_upgrade_duration_seconds_count", &failed),
        Some(1.0)
    );
    // A failure the policy does not retry.
    let t = format!(r#"{svc},task="t",version="1.1.0""#);
    assert_eq!(
        sample(&text, "upsilon_task_failures_total", &t),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "upsilon_task_retries_total", &t),
        None,
        "{text}"
    );
}

#[tokio::test]
async fn a_grant_after_the_old_holder_released_is_no_takeover() {
    let handle = prometheus();
    let backend = MemoryBackend::new();
    let other = testing::holder(1);
    let Acquire::Granted(lease) = backend
        .try_acquire("journal", &other, Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("the lease is free");
    };
    let up = on(&backend, "journal", 2, vec![flaky(1, "t")])
        .build()
        .unwrap();
    let run = tokio::spawn({
        let up = up.clone();
        async move { up.run().await }
    });
    up.status()
        .wait_for(|s| matches!(s, Status::Waiting { .. }))
        .await
        .unwrap();
    backend.release(&lease).await.unwrap();
    assert!(matches!(run.await.unwrap(), Ok(Outcome::Upgraded { .. })));

    let text = handle.render();
    let svc = r#"service="journal""#;
    assert_eq!(
        sample(&text, "upsilon_lease_grants_total", svc),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "upsilon_lease_takeovers_total", svc),
        None,
        "{text}"
    );
}

#[tokio::test]
async fn lost_leases_are_counted_by_reason_and_a_stop_is_counted() {
    let handle = prometheus();
    let backend = MemoryBackend::new();

    // The second renewal is refused.
    backend.faults().nth(Op::Renew, 2, Fault::Broken);
    let refused = on(&backend, "ledger-refused", 1, vec![endless(1, "t")])
        .build()
        .unwrap();
    let lost = refused.run().await;
    assert!(
        matches!(
            lost,
            Err(Error::LeaseLost {
                reason: LeaseLoss::RenewalRefused { .. },
                ..
            })
        ),
        "{lost:?}"
    );

    // No renewal gets through: the local deadline passes.
    backend.faults().clear();
    backend.faults().always(Op::Renew, Fault::Unavailable);
    let deadline = on(&backend, "ledger-deadline", 1, vec![endless(1, "t")])
        .build()
        .unwrap();
    let lost = deadline.run().await;
    assert!(
        matches!(
            lost,
            Err(Error::LeaseLost {
                reason: LeaseLoss::Deadline { .. },
                ..
            })
        ),
        "{lost:?}"
    );
    backend.faults().clear();

    // Asked to stop in the middle of a task.
    let stopped = on(&backend, "ledger-stop", 1, vec![endless(1, "t")])
        .build()
        .unwrap();
    let mut status = stopped.status();
    let stop = async move {
        status
            .wait_for(|s| matches!(s, Status::Upgrading { .. }))
            .await
            .unwrap();
    };
    assert!(matches!(
        stopped.run_until(stop).await,
        Err(Error::Stopped { .. })
    ));

    let text = handle.render();
    let has = |name: &str, labels: &str| sample(&text, name, labels);
    let r = r#"service="ledger-refused""#;
    assert_eq!(has("upsilon_lease_renewals_total", r), Some(1.0), "{text}");
    assert_eq!(
        has(
            "upsilon_lease_renewal_failures_total",
            &format!(r#"{r},reason="refused""#)
        ),
        Some(1.0)
    );
    assert_eq!(
        has(
            "upsilon_lease_losses_total",
            &format!(r#"{r},reason="renewal_refused""#)
        ),
        Some(1.0)
    );
    let cancelled = format!(r#"{r},task="t",version="1.1.0",outcome="cancelled""#);
    assert_eq!(
        has("upsilon_task_duration_seconds_count", &cancelled),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        has(
            "upsilon_runs_total",
            &format!(r#"{r},outcome="lease_lost""#)
        ),
        Some(1.0)
    );

    let d = r#"service="ledger-deadline""#;
    assert!(
        has(
            "upsilon_lease_renewal_failures_total",
            &format!(r#"{d},reason="transient""#)
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    assert_eq!(
        has(
            "upsilon_lease_losses_total",
            &format!(r#"{d},reason="deadline""#)
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(has("upsilon_lease_renewals_total", d), None);

    let s = r#"service="ledger-stop""#;
    assert_eq!(has("upsilon_stops_total", s), Some(1.0), "{text}");
    assert_eq!(
        has("upsilon_runs_total", &format!(r#"{s},outcome="stopped""#)),
        Some(1.0)
    );
    assert_eq!(
        has(
            "upsilon_upgrade_duration_seconds_count",
            &format!(r#"{s},outcome="stopped""#)
        ),
        Some(1.0)
    );
    assert!(
        !text.contains(r#"upsilon_lease_losses_total{service="ledger-stop""#),
        "a stop is no loss:
{text}"
    );
}
