//! Scenario 2: cluster convergence. N nodes wait while a canary runs the
//! new release's slow task; how long after the canary's final commit is the
//! last node READY? Against the same N nodes each running sqlx's
//! `Migrator::run`, which serialises them on one advisory lock.
//!
//! Upsilon: the canary's store is wrapped so that the instant its last
//! write returns (the COMMIT that records the task and the new data version
//! acknowledged) is known; each node's READY instant is when its `run()`
//! returns. sqlx: the canary's final commit is inside `Migrator::run`, so the
//! instant its `run()` returns (after the commit and the unlock) stands in
//! for it; that is later than the commit, which favours sqlx.
//!
//! Either way the canary's slow work starts only once every node waits: the
//! Upsilon task waits for a signal, the sqlx migration for a lock the
//! benchmark holds until every node is blocked on sqlx's advisory lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use serde_json::json;
use tokio::sync::watch;
use upsilon::backend::Backend;
use upsilon::{Outcome, Status, TaskContext, TaskFuture, Upsilon};
use upsilon_backends::postgres::{PostgresBackend, PostgresOptions};

use crate::common::{
    at_released, gated_migrator, new_task, released_tasks, sqlx_connect, sqlx_migrate, Env, GATE,
};
use crate::report::{Report, Row, Unit};
use crate::stats::{ms, slope, summary};
use crate::wrappers::{TimedStore, Watched};
use crate::Options;

/// What one upgrade with waiting nodes gave, in ms after the canary's
/// final commit.
pub struct Round {
    /// The last node READY.
    pub last: f64,
    /// Each node READY.
    pub each: Vec<f64>,
    /// The last node woken (its wait for the lease ended); Upsilon only.
    pub last_woken: Option<f64>,
    /// When the canary's final write returned (Upsilon) or its `run()`
    /// did (sqlx): the instant the figures count from.
    pub commit: Instant,
    /// Leases granted in the upgrade, the canary's included (Upsilon; 1
    /// when no waiting node took the lease). 0 for sqlx, which has none.
    pub grants: u64,
    /// Waits the waiting nodes began, all together (Upsilon; 0 for sqlx).
    pub waits: u64,
}

/// The canary's task waits for `go`, then sleeps `task`; the waiters' copy
/// of it must never run.
pub fn gated_task(go: watch::Receiver<bool>, task: Duration) -> upsilon::Task {
    new_task(move |_ctx: &mut TaskContext| -> TaskFuture<'_> {
        let mut go = go.clone();
        Box::pin(async move {
            let _ = go.wait_for(|g| *g).await;
            tokio::time::sleep(task).await;
            Ok(())
        })
    })
}

fn never_task(ran: Arc<AtomicBool>) -> upsilon::Task {
    new_task(move |_ctx: &mut TaskContext| -> TaskFuture<'_> {
        ran.store(true, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    })
}

async fn wait_status(
    mut rx: watch::Receiver<Status>,
    what: &str,
    pred: impl Fn(&Status) -> bool,
) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(120), rx.wait_for(|s| pred(s)))
        .await
        .with_context(|| format!("no node reached {what} within 120 s"))?
        .with_context(|| format!("a node ended before {what}"))?;
    Ok(())
}

/// One upgrade of `service` from 1.0 to 1.1: `canary` runs the task while a
/// node on each of `nodes` waits, all on one backend (of any kind).
/// `configure` adjusts each runner's builder.
pub async fn upsilon_round(
    service: &str,
    canary: &Arc<dyn Backend>,
    nodes: &[Arc<dyn Backend>],
    task: Duration,
    configure: impl Fn(upsilon::Builder) -> upsilon::Builder,
    before_go: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<Round> {
    at_released(service, canary.clone()).await?;
    let (go_tx, go_rx) = watch::channel(false);
    let store = Arc::new(TimedStore::new(canary.clone()));
    let canary_lock = Arc::new(Watched::new(canary.clone()));
    let mut tasks = released_tasks();
    tasks.push(gated_task(go_rx, task));
    let canary_up = configure(
        Upsilon::builder()
            .service(service)
            .app_version("1.1")
            .lock(canary_lock.clone())
            .store(store.clone())
            .tasks(tasks),
    )
    .build()?;
    let canary_status = canary_up.status();
    let canary_run = canary_runtime().spawn(async move { canary_up.run().await });
    wait_status(canary_status, "the canary's upgrade", |s| {
        matches!(s, Status::Upgrading { .. })
    })
    .await?;

    let ran = Arc::new(AtomicBool::new(false));
    let mut runs = Vec::with_capacity(nodes.len());
    let mut statuses = Vec::with_capacity(nodes.len());
    let mut watched = Vec::with_capacity(nodes.len());
    for node in nodes {
        let mut tasks = released_tasks();
        tasks.push(never_task(ran.clone()));
        let backend = Arc::new(Watched::new(node.clone()));
        watched.push(backend.clone());
        let up = configure(
            Upsilon::builder()
                .service(service)
                .app_version("1.1")
                .backend(backend)
                .tasks(tasks),
        )
        .build()?;
        statuses.push(up.status());
        runs.push(tokio::spawn(async move {
            let r = up.run().await;
            (r, Instant::now())
        }));
    }
    for s in statuses {
        wait_status(s, "waiting", |s| matches!(s, Status::Waiting { .. })).await?;
    }
    before_go.await?;
    go_tx.send_replace(true);
    let outcome = canary_run.await??;
    ensure!(
        matches!(outcome, Outcome::Upgraded { .. }),
        "the canary did not upgrade: {outcome}"
    );
    let commit = store
        .last_write()
        .context("the canary wrote nothing to the store")?;
    let mut each = Vec::with_capacity(runs.len());
    for run in runs {
        let (r, ready) = run.await?;
        let outcome = r?;
        // A node that polls may be granted the lease the canary has just
        // released, and find the work done under it: up to date.
        ensure!(
            matches!(
                outcome,
                Outcome::WaitedForOther { .. }
                    | Outcome::UpToDate { .. }
                    | Outcome::FoundUpToDate { .. }
            ),
            "a waiting node did not wait for the canary: {outcome}"
        );
        each.push(signed_ms(ready, commit));
    }
    ensure!(
        !ran.load(Ordering::SeqCst),
        "a waiting node ran the canary's task"
    );
    let last = each.iter().copied().fold(f64::MIN, f64::max);
    let last_woken = watched
        .iter()
        .filter_map(|w| *w.woke.lock().unwrap_or_else(|p| p.into_inner()))
        .max()
        .map(|t| signed_ms(t, commit));
    let grants = canary_lock.granted.load(Ordering::SeqCst)
        + watched
            .iter()
            .map(|w| w.granted.load(Ordering::SeqCst))
            .sum::<u64>();
    let waits = watched.iter().map(|w| w.waits.load(Ordering::SeqCst)).sum();
    Ok(Round {
        last,
        each,
        last_woken,
        commit,
        grants,
        waits,
    })
}

/// The row of the leases granted per upgrade (the most in one of them),
/// against the target of one: a waiting node that took the lease found
/// nothing left to do under it.
pub fn grants_row(scenario: &str, what: &str, grants: &[u64]) -> Row {
    let most = grants.iter().copied().max().unwrap_or(0);
    Row::new(
        scenario,
        format!("{what}leases granted per upgrade, most of {}", grants.len()),
        Unit::Count,
        most as f64,
    )
    .at_most(1.0, "1")
}

/// `a - b` in ms, negative when `a` came first.
pub fn signed_ms(a: Instant, b: Instant) -> f64 {
    if a >= b {
        ms(a - b)
    } else {
        -ms(b - a)
    }
}

/// Polls `sql` (one integer) on the admin connection until `pred` holds.
pub async fn poll_until(
    env: &Env,
    sql: &str,
    what: &str,
    pred: impl Fn(i64) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v: i64 = env.admin.query_one(sql, &[]).await?.get(0);
        if pred(v) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: still {v} after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The same upgrade with sqlx: the canary's `Migrator::run` applies the slow
/// migration while every node's `Migrator::run` waits on the advisory lock.
/// The nodes' connections are given open (their set-up is not timed).
pub async fn sqlx_round(
    env: &Env,
    schema: &str,
    canary_url: &str,
    nodes: Vec<sqlx::PgConnection>,
    task: Duration,
    before_go: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<Round> {
    let n = nodes.len();
    let mut canary = sqlx_connect(canary_url, Some(schema)).await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut canary)
        .await?;
    let m = Arc::new(gated_migrator(task));
    // The canary's migration starts its sleep once the gate opens, after
    // every node waits.
    env.admin
        .batch_execute(&format!("SELECT pg_advisory_lock({GATE})"))
        .await?;
    let canary_run = {
        let m = m.clone();
        tokio::spawn(async move {
            let r = sqlx_migrate(&m, &mut canary).await;
            (r, Instant::now())
        })
    };
    poll_until(
        env,
        &format!(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = {pid}"
        ),
        "the canary's advisory lock",
        |v| v >= 1,
    )
    .await?;
    let mut runs = Vec::with_capacity(n);
    for mut conn in nodes {
        let m = m.clone();
        runs.push(tokio::spawn(async move {
            let r = sqlx_migrate(&m, &mut conn).await;
            (r, Instant::now())
        }));
    }
    poll_until(
        env,
        &format!(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND pid <> {pid}"
        ),
        "nodes waiting on the advisory lock",
        |v| v as usize == n,
    )
    .await?;
    ensure!(
        !canary_run.is_finished(),
        "the canary finished before every node waited"
    );
    before_go.await?;
    env.admin
        .batch_execute(&format!("SELECT pg_advisory_unlock({GATE})"))
        .await?;
    let (r, done) = canary_run.await?;
    r?;
    let mut each = Vec::with_capacity(n);
    for run in runs {
        let (r, ready) = run.await?;
        r?;
        each.push(signed_ms(ready, done));
    }
    let last = each.iter().copied().fold(f64::MIN, f64::max);
    Ok(Round {
        last,
        each,
        last_woken: None,
        commit: done,
        grants: 0,
        waits: 0,
    })
}

/// The floor: one `NOTIFY`, committed by one connection, delivered to `n`
/// others that `LISTEN`. Per repeat, ms from the NOTIFY's acknowledgement
/// to the last delivery, and to the last of the `SELECT 1`s that each
/// listener then sends on a second connection of its own (as a node reads
/// the store on its pool connection once woken).
pub async fn notify_floor(
    env: &Env,
    n: usize,
    repeats: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    type Times = Arc<Mutex<Vec<Instant>>>;
    let delivered: Times = Arc::default();
    let answered: Times = Arc::default();
    let mut clients = Vec::with_capacity(2 * n);
    for _ in 0..n {
        let (listener, mut conn) = tokio_postgres::connect(&env.url, tokio_postgres::NoTls).await?;
        let (reader, conn2) = tokio_postgres::connect(&env.url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn2);
        let reader = Arc::new(reader);
        let (delivered, answered) = (delivered.clone(), answered.clone());
        tokio::spawn(async move {
            while let Some(Ok(m)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                if let tokio_postgres::AsyncMessage::Notification(_) = m {
                    delivered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Instant::now());
                    let (reader, answered) = (reader.clone(), answered.clone());
                    tokio::spawn(async move {
                        if reader.simple_query("SELECT 1").await.is_ok() {
                            answered
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(Instant::now());
                        }
                    });
                }
            }
        });
        listener.batch_execute("LISTEN bench_floor").await?;
        clients.push(listener);
    }
    let (sender, conn) = tokio_postgres::connect(&env.url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let mut notified = Vec::with_capacity(repeats);
    let mut read = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        delivered.lock().unwrap_or_else(|p| p.into_inner()).clear();
        answered.lock().unwrap_or_else(|p| p.into_inner()).clear();
        sender.batch_execute("NOTIFY bench_floor").await?;
        let acked = Instant::now();
        let deadline = acked + Duration::from_secs(60);
        let last = |t: &Times| {
            let t = t.lock().unwrap_or_else(|p| p.into_inner());
            (t.len() >= n).then(|| t.iter().copied().max().unwrap_or(acked))
        };
        let (d, a) = loop {
            if let (Some(d), Some(a)) = (last(&delivered), last(&answered)) {
                break (d, a);
            }
            ensure!(
                Instant::now() < deadline,
                "a NOTIFY reached only some listeners"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        notified.push(signed_ms(d, acked));
        read.push(signed_ms(a, acked));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((notified, read))
}

/// The floor of a wake that a waiting node on one connection can get: `n`
/// connections that `LISTEN` and block on one of 16 shared advisory locks
/// that another connection holds (as waiting nodes block on their sessions
/// on a holder's wake locks); one `NOTIFY`, committed by a third
/// connection, then the locks let go. Per repeat, ms from the NOTIFY's
/// acknowledgement to the last delivery, which each blocked session sends
/// once its statement has ended.
pub async fn lock_floor(env: &Env, n: usize, repeats: usize) -> anyhow::Result<Vec<f64>> {
    let keys: Vec<i64> = (0..16).map(|i| 0x7570_7369_6c6f_0000 + i).collect();
    let delivered: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let (client, mut conn) = tokio_postgres::connect(&env.url, tokio_postgres::NoTls).await?;
        let delivered = delivered.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                if let tokio_postgres::AsyncMessage::Notification(_) = m {
                    delivered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Instant::now());
                }
            }
        });
        client.batch_execute("LISTEN bench_lock_floor").await?;
        clients.push((Arc::new(client), keys[i % keys.len()]));
    }
    let connect = || async {
        let (client, conn) = tokio_postgres::connect(&env.url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        anyhow::Ok(client)
    };
    let (holder, sender, watcher) = (connect().await?, connect().await?, connect().await?);
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        holder
            .query(
                "SELECT pg_advisory_lock(k) FROM unnest($1::int8[]) AS k",
                &[&keys],
            )
            .await?;
        delivered.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let mut blocks = tokio::task::JoinSet::new();
        for (client, key) in &clients {
            let (client, key) = (client.clone(), *key);
            blocks.spawn(async move {
                client
                    .query("SELECT pg_advisory_xact_lock_shared($1)", &[&key])
                    .await
            });
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                    &[],
                )
                .await?
                .get(0);
            if waiting as usize >= n {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "only {waiting} of {n} sessions blocked"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        sender.batch_execute("NOTIFY bench_lock_floor").await?;
        let acked = Instant::now();
        holder
            .query(
                "SELECT pg_advisory_unlock(k) FROM unnest($1::int8[]) AS k",
                &[&keys],
            )
            .await?;
        let last = loop {
            {
                let d = delivered.lock().unwrap_or_else(|p| p.into_inner());
                if d.len() >= n {
                    break d.iter().copied().max().unwrap_or(acked);
                }
            }
            ensure!(
                Instant::now() < deadline,
                "a NOTIFY reached only some blocked sessions"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        while let Some(done) = blocks.join_next().await {
            done??;
        }
        times.push(signed_ms(last, acked));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(times)
}

/// How long the canary's ping may go unanswered, and the takeover grace
/// that goes with it (above the ping's period of 100 ms plus this bound, as
/// docs/POSTGRES.md requires). 200 waiting nodes, the canary and the server
/// on two cores can hold a ping past the default 200 ms; the canary then
/// stops its task, the safe side of the bound, and the round fails. How
/// soon the nodes are READY does not depend on the bound.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
const TAKEOVER_GRACE: Duration = Duration::from_millis(1500);

/// A node of this scenario, with `pool` connections and the bound above.
async fn convergence_node(url: &str, pool: usize) -> anyhow::Result<Arc<dyn Backend>> {
    let options = PostgresOptions::from_url(url)?
        .pool_size(pool)
        .holder_ping_timeout(PING_TIMEOUT)
        .takeover_grace(TAKEOVER_GRACE);
    Ok(Arc::new(PostgresBackend::connect(options).await?))
}

pub async fn run(env: &Env, o: &Options, report: &mut Report) -> anyhow::Result<()> {
    let task = Duration::from_millis(o.task_ms);
    let mut details = Vec::new();
    let mut p50s = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for &n in &o.nodes {
        eprintln!("  2: {n} nodes, {} repeats", o.repeats);
        let url = env.url.clone();
        let canary = canary_runtime()
            .spawn(async move { convergence_node(&url, 4).await })
            .await??;
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            nodes.push(convergence_node(&env.url, 1).await?);
        }
        let mut ups = Vec::new();
        let mut up_each = Vec::new();
        let mut woken = Vec::new();
        let mut grants = Vec::new();
        for r in 0..o.repeats {
            let service = format!("converge-{n}-{r}");
            let round =
                upsilon_round(&service, &canary, &nodes, task, |b| b, async { Ok(()) }).await?;
            grants.push(round.grants);
            ups.push(round.last);
            up_each.push(round.each);
            woken.extend(round.last_woken);
        }
        drop(nodes);
        drop(canary);
        let (floor, floor_read) = notify_floor(env, n, o.repeats).await?;
        let floor_locked = lock_floor(env, n, o.repeats).await?;

        let mut sqlxs = Vec::new();
        for r in 0..o.repeats {
            let schema = format!("sqlx_converge_{n}_{r}");
            env.sqlx_schema(&schema).await?;
            let mut conns = Vec::with_capacity(n);
            for _ in 0..n {
                conns.push(sqlx_connect(&env.url, Some(&schema)).await?);
            }
            let round = sqlx_round(env, &schema, &env.url, conns, task, async { Ok(()) }).await?;
            sqlxs.push(round.last);
        }
        let (u, s) = (summary(&ups), summary(&sqlxs));
        let base = "sqlx Migrator::run";
        report.push(
            Row::new(
                "2",
                format!("{n} nodes: canary's final commit to last node READY, p50"),
                Unit::Ms,
                u.p50,
            )
            .vs(base, s.p50),
        );
        report.push(
            Row::new(
                "2",
                format!(
                    "{n} nodes: canary's final commit to last node READY, p99 of {}",
                    o.repeats
                ),
                Unit::Ms,
                u.p99,
            )
            .vs(base, s.p99),
        );
        let (f, fr) = (summary(&floor), summary(&floor_read));
        let p50_row = || {
            Row::new(
                "2",
                format!("{n} nodes: canary's final commit to last node READY, p50"),
                Unit::Ms,
                u.p50,
            )
        };
        report.push(p50_row().vs(
            format!("the floor: one NOTIFY to {n} LISTENing connections"),
            f.p50,
        ));
        report.push(
            p50_row()
                .vs(
                    format!("one NOTIFY to {n} LISTENing connections, each then one SELECT 1"),
                    fr.p50,
                )
                .ratio_at_most(2.0, "<= 2x"),
        );
        let fl = summary(&floor_locked);
        report.push(
            p50_row()
            .vs(
                format!(
                    "one NOTIFY to {n} connections blocked on 16 advisory locks, delivered as the locks are let go"
                ),
                fl.p50,
            ),
        );
        report.push(grants_row("2", &format!("{n} nodes: "), &grants));
        p50s.4.push(fl.p50);
        p50s.0.push(n as f64);
        p50s.1.push(u.p50);
        p50s.2.push(s.p50);
        p50s.3.push(fr.p50);
        details.push(json!({
            "nodes": n,
            "upsilon_ms": ups,
            "upsilon_last_woken_ms": woken,
            "upsilon_grants": grants,
            "notify_floor_ms": floor,
            "notify_then_select1_ms": floor_read,
            "notify_to_blocked_sessions_ms": floor_locked,
            "sqlx_ms": sqlxs,
            "upsilon_each_node_ms": up_each,
        }));
    }
    if o.nodes.len() > 1 {
        let growth = || {
            Row::new(
                "2",
                "growth per node (least-squares slope of the p50s)",
                Unit::MsPerNode,
                slope(&p50s.0, &p50s.1),
            )
        };
        report.push(
            growth()
                .vs("sqlx Migrator::run", slope(&p50s.0, &p50s.2))
                .at_most(0.02, "<= 0.02 ms/node"),
        );
        for (floor, p50) in [
            (
                "one NOTIFY to N LISTENing connections, each then one SELECT 1",
                &p50s.3,
            ),
            (
                "one NOTIFY to N connections blocked on 16 advisory locks",
                &p50s.4,
            ),
        ] {
            report.push(growth().vs(floor, slope(&p50s.0, p50)));
        }
    }
    report.detail(
        "2",
        json!({"task_ms": o.task_ms, "repeats": o.repeats, "rounds": details}),
    );
    Ok(())
}

/// The runtime canaries run on: a thread of its own, as the canary is a
/// process of its own in a cluster, so that the waiting nodes' work in
/// this process does not hold up its pings. It lasts as long as the
/// process: a canary's listening session, whose driver runs on it, outlives
/// the round that opened it.
pub fn canary_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("canary")
            .enable_all()
            .build()
            .expect("a runtime for the canary")
    })
}
