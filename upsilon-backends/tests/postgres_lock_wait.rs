//! How a waiting node waits on PostgreSQL while the holder's session lives:
//! it blocks on the lease's advisory lock, which the holder's session holds,
//! instead of asking about that session now and then. So its statements do
//! not grow with the wait's length, a killed holder wakes it at once (the
//! takeover still waits for the grace), a release and a notification still
//! wake it, and a holder that holds no lock is checked periodically, as
//! before, without a busy loop.
#![cfg(feature = "postgres")]

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{granted, raw, until};
use upsilon::backend::{Acquire, Change, LeaseInfo, Lock, Store};
use upsilon::testing;
use upsilon_backends::postgres::tokio_postgres::Client;
use upsilon_backends::postgres::{PostgresBackend, PostgresOptions};
use upsilon_test_servers::Postgres;

// Pings and grace as in postgres_takeover.rs: a busy two-core machine must
// not make a holder take its own session for lost.
const EVERY: Duration = Duration::from_millis(100);
const TIMEOUT: Duration = Duration::from_millis(1000);
const GRACE: Duration = Duration::from_millis(1300);
const TTL: Duration = Duration::from_secs(30);
/// The waiting nodes' periodic check: short, so that any check shows.
const CHECK: Duration = Duration::from_millis(200);

/// This file's server; its log shows every statement with its application.
fn server() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(|| {
        Postgres::builder()
            .setting("log_line_prefix", "[%a] ")
            .setting("log_statement", "all")
            .start()
    })
}

fn options(schema: &str, app: &str) -> PostgresOptions {
    PostgresOptions::from_url(&server().url())
        .unwrap()
        .schema(schema)
        .application_name(app)
        .holder_ping_every(EVERY)
        .holder_ping_timeout(TIMEOUT)
        .takeover_grace(GRACE)
        .holder_check_every(CHECK)
}

async fn node(options: PostgresOptions) -> PostgresBackend {
    PostgresBackend::connect(options).await.unwrap()
}

fn held(a: Acquire) -> LeaseInfo {
    match a {
        Acquire::Held(info) => info,
        other => panic!("expected the lease held, got {other:?}"),
    }
}

/// `holder` is granted the lease of `service`, and `waiter` then finds it
/// held: the lease, and what the waiter saw.
async fn held_by_one(
    holder: &PostgresBackend,
    waiter: &PostgresBackend,
    service: &str,
) -> (upsilon::backend::Lease, LeaseInfo) {
    let lease = granted(
        holder
            .try_acquire(service, &testing::holder(1), TTL)
            .await
            .unwrap(),
    );
    let seen = held(
        waiter
            .try_acquire(service, &testing::holder(2), TTL)
            .await
            .unwrap(),
    );
    (lease, seen)
}

/// The statements the server ran for application `app`, as its log shows
/// them (simple and extended protocol).
fn statements(app: &str) -> Vec<String> {
    server()
        .log()
        .lines()
        .filter(|l| l.starts_with(&format!("[{app}] ")))
        .filter(|l| l.contains("LOG:  statement: ") || l.contains("LOG:  execute "))
        .map(str::to_owned)
        .collect()
}

fn blocks(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| l.contains("pg_advisory_xact_lock_shared"))
        .count()
}

/// The waiting node's checks of the holder's session (the lease request's
/// own read of `pg_stat_activity` is not one).
fn checks(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| l.contains("FROM pg_stat_activity WHERE pid = $1"))
        .count()
}

/// The server process of the session that the lease row of `service` names.
async fn lease_pid(client: &Client, schema: &str, service: &str) -> i32 {
    client
        .query_one(
            &format!("SELECT lease_pid FROM {schema}.upsilon_state WHERE service = $1"),
            &[&service],
        )
        .await
        .unwrap()
        .get::<_, Option<i32>>(0)
        .expect("the lease row names the holder's session")
}

/// What `waiter` ran while it waited on the lease of `service`, held by
/// `holder`, for `length` before the holder released it; asserts that the
/// release ended the wait.
async fn wait_through(
    holder: &PostgresBackend,
    waiter: &PostgresBackend,
    app: &str,
    service: &str,
    length: Duration,
) -> Vec<String> {
    let (lease, seen) = held_by_one(holder, waiter, service).await;
    let before = statements(app).len();
    let waiting = {
        let (waiter, service) = (waiter.clone(), service.to_owned());
        tokio::spawn(async move { waiter.wait(&service, &seen, TTL).await })
    };
    // The upgrade: the holder works for `length`.
    tokio::time::sleep(length).await;
    assert!(
        !waiting.is_finished(),
        "the wait ended while the lease was held"
    );
    let released = Instant::now();
    holder.release(&lease).await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("the release ended the wait")
        .unwrap()
        .unwrap();
    eprintln!("a release ended a wait {:?} later", released.elapsed());
    let lines = statements(app);
    lines[before..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_node_makes_the_same_few_statements_however_long_it_waits() {
    let schema = "lw_quiet";
    let app = "lw quiet waiter";
    let holder = node(options(schema, "lw quiet holder")).await;
    let waiter = node(options(schema, app)).await;
    waiter.prepare_wait("short").await.unwrap();
    let short = wait_through(&holder, &waiter, app, "short", Duration::from_secs(1)).await;
    let long = wait_through(&holder, &waiter, app, "long", Duration::from_secs(5)).await;
    eprintln!("a 1 s wait: {short:#?}\na 5 s wait: {long:#?}");
    // One statement: the block, which the release ends. At most one check
    // more, when the lock's release outran the release's notification (on
    // a very busy machine): never one per interval.
    for lines in [&short, &long] {
        assert!(
            checks(lines) <= 1,
            "the holder's session was polled: {lines:#?}"
        );
        assert_eq!(blocks(lines), 1, "{lines:#?}");
        assert!(lines.len() <= 2, "{lines:#?}");
    }
    assert!(
        long.len() <= short.len() + 1,
        "more statements in a longer wait: {short:#?} {long:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_wakes_the_waiting_node_without_a_check() {
    let schema = "lw_killed";
    let client = raw(&server().url()).await;
    let holder = node(options(schema, "lw killed holder")).await;
    // A check interval far longer than the bound: only the lock can wake it.
    let waiter =
        node(options(schema, "lw killed waiter").holder_check_every(Duration::from_secs(20))).await;
    waiter.prepare_wait("svc").await.unwrap();
    let (first, seen) = held_by_one(&holder, &waiter, "svc").await;
    let runner_like = {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            let mut seen = seen;
            loop {
                waiter.wait("svc", &seen, TTL).await.unwrap();
                match waiter
                    .try_acquire("svc", &testing::holder(2), TTL)
                    .await
                    .unwrap()
                {
                    Acquire::Granted(lease) => return (Instant::now(), lease),
                    Acquire::Held(again) => seen = again,
                    Acquire::StoreMoved => panic!("the waiter read no store"),
                }
            }
        })
    };
    // The waiter is blocked on the lock before the holder dies.
    until(Duration::from_secs(5), || async {
        blocks(&statements("lw killed waiter")) == 1
    })
    .await;
    let pid = lease_pid(&client, schema, "svc").await;
    let killed = Instant::now();
    let ok: bool = client
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(ok);
    let (granted_at, lease) = tokio::time::timeout(Duration::from_secs(10), runner_like)
        .await
        .expect("the waiting node took the lease over")
        .unwrap();
    let after = granted_at - killed;
    eprintln!("the holder's session was terminated; the lease was taken over {after:?} later");
    assert!(lease.fence > first.fence);
    // The grace still stands (the session was seen gone after it ended),
    // and nothing else is waited for.
    assert!(after >= GRACE, "taken over {after:?} after");
    assert!(
        after <= GRACE + Duration::from_millis(700),
        "taken over {after:?} after"
    );
    let lines = statements("lw killed waiter");
    assert_eq!(
        checks(&lines),
        1,
        "one check of the session, when the lock came free: {lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_version_written_mid_plan_wakes_a_blocked_waiting_node_and_the_next_wait_blocks_again(
) {
    // A data version written mid-plan notifies while the lease stays held
    // (a node of the version just reached becomes READY): the notification
    // must end the wait although the lock is still held.
    let schema = "lw_notified";
    let app = "lw notified waiter";
    let holder = node(options(schema, "lw notified holder")).await;
    let waiter = node(options(schema, app)).await;
    waiter.prepare_wait("svc").await.unwrap();
    let lease = granted(
        holder
            .try_acquire("svc", &testing::holder(1), TTL)
            .await
            .unwrap(),
    );
    holder.claim("svc", lease.fence).await.unwrap();
    for round in 1..=2 {
        let waiting = asks_then_blocks(&waiter, app, round).await;
        let written = Instant::now();
        let version = upsilon::parse_version(&format!("1.{round}")).unwrap();
        holder
            .apply("svc", lease.fence, &[Change::DataVersion(version)])
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("the holder's write ended the wait")
            .unwrap()
            .unwrap();
        let after = written.elapsed();
        eprintln!("round {round}: a data version ended a blocked wait {after:?} later");
        assert!(after < Duration::from_millis(1000), "{after:?}");
    }
    let lines = statements(app);
    assert_eq!(checks(&lines), 0, "{lines:#?}");
    // The cancelled statement left the node's pooled connection usable.
    held(
        waiter
            .try_acquire("svc", &testing::holder(2), TTL)
            .await
            .unwrap(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_release_wakes_a_blocked_waiting_node() {
    let schema = "lw_forced";
    let app = "lw forced waiter";
    let holder = node(options(schema, "lw forced holder")).await;
    let waiter = node(options(schema, app)).await;
    let operator = node(options(schema, "lw forced operator")).await;
    waiter.prepare_wait("svc").await.unwrap();
    let (_, seen) = held_by_one(&holder, &waiter, "svc").await;
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.wait("svc", &seen, TTL).await })
    };
    until(Duration::from_secs(5), || async {
        blocks(&statements(app)) == 1
    })
    .await;
    let forced = Instant::now();
    assert!(operator.force_release("svc").await.unwrap().is_some());
    tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("the forced release ended the wait")
        .unwrap()
        .unwrap();
    eprintln!(
        "a forced release ended a blocked wait {:?} later",
        forced.elapsed()
    );
    // The holder still holds the lease's lock (it learns of the release
    // at its next renewal): the waiting node is granted the lease.
    assert!(matches!(
        waiter
            .try_acquire("svc", &testing::holder(2), TTL)
            .await
            .unwrap(),
        Acquire::Granted(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_without_the_lock_is_checked_periodically_and_still_taken_over() {
    let schema = "lw_unlocked";
    let app = "lw unlocked waiter";
    let client = raw(&server().url()).await;
    // A holder that takes no lock (as a node of an older version).
    let holder = node(options(schema, "lw unlocked holder").lease_locks(false)).await;
    let waiter = node(options(schema, app)).await;
    waiter.prepare_wait("svc").await.unwrap();
    granted(
        holder
            .try_acquire("svc", &testing::holder(1), TTL)
            .await
            .unwrap(),
    );
    let before = statements(app).len();
    let started = Instant::now();
    let length = Duration::from_secs(2);
    // The runner's loop: each wait that ends asks again.
    let mut seen = held(
        waiter
            .try_acquire("svc", &testing::holder(2), TTL)
            .await
            .unwrap(),
    );
    while started.elapsed() < length {
        waiter
            .wait("svc", &seen, length.saturating_sub(started.elapsed()))
            .await
            .unwrap();
        seen = held(
            waiter
                .try_acquire("svc", &testing::holder(2), TTL)
                .await
                .unwrap(),
        );
    }
    let lines = statements(app)[before..].to_vec();
    let (checked, blocked) = (checks(&lines), blocks(&lines));
    eprintln!(
        "in {length:?}: {checked} checks, {blocked} blocks, {} statements",
        lines.len()
    );
    // Blocked once, found the lock free while the session lived, and from
    // then on checked about every CHECK (jittered ±50 %): never a busy loop.
    assert_eq!(blocked, 1, "{lines:#?}");
    let most = (length.as_millis() / (CHECK.as_millis() / 2)) as usize + 2;
    assert!(
        checked >= 3 && checked <= most,
        "{checked} checks: {lines:#?}"
    );
    assert!(lines.len() <= checked + 10, "{lines:#?}");

    // The checks still find a killed holder.
    let pid = lease_pid(&client, schema, "svc").await;
    let killed = Instant::now();
    client
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let granted_at = loop {
        waiter.wait("svc", &seen, TTL).await.unwrap();
        match waiter
            .try_acquire("svc", &testing::holder(2), TTL)
            .await
            .unwrap()
        {
            Acquire::Granted(_) => break Instant::now(),
            Acquire::Held(again) => seen = again,
            Acquire::StoreMoved => panic!("the waiter read no store"),
        }
        assert!(killed.elapsed() < Duration::from_secs(10), "not taken over");
    };
    let after = granted_at - killed;
    eprintln!("taken over {after:?} after the kill");
    assert!(after >= GRACE && after <= GRACE + CHECK * 2 + Duration::from_millis(700));
}

/// How many sessions application `app` has open on the server.
async fn connections(client: &Client, app: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0)
}

/// `waiter` (application `app`) asks for the lease of `svc`, finds it held,
/// and waits: returns once its `blocks_so_far`th block is on the server.
async fn asks_then_blocks(
    waiter: &PostgresBackend,
    app: &str,
    blocks_so_far: usize,
) -> tokio::task::JoinHandle<Result<(), upsilon::backend::BackendError>> {
    let seen = held(
        waiter
            .try_acquire("svc", &testing::holder(2), TTL)
            .await
            .unwrap(),
    );
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.wait("svc", &seen, TTL).await })
    };
    until(Duration::from_secs(5), || async {
        blocks(&statements(app)) == blocks_so_far
    })
    .await;
    waiting
}

/// A waiting node (application `app`) started as the runner starts one:
/// its start-up read leaves the pool's connection idle, its first request
/// makes that the listening session, and it blocks there, on one
/// connection, waiting for the lease of `svc`, which another node holds
/// and has claimed. A raw client, the holder, the node, the lease and the
/// wait.
async fn waiting_as_a_node_starts(
    schema: &str,
    app: &str,
) -> (
    Client,
    PostgresBackend,
    PostgresBackend,
    upsilon::backend::Lease,
    tokio::task::JoinHandle<Result<(), upsilon::backend::BackendError>>,
) {
    let client = raw(&server().url()).await;
    let holder = node(options(schema, &format!("{app} holder"))).await;
    let waiter = node(options(schema, app)).await;
    let lease = granted(
        holder
            .try_acquire("svc", &testing::holder(1), TTL)
            .await
            .unwrap(),
    );
    holder.claim("svc", lease.fence).await.unwrap();
    waiter.load("svc").await.unwrap();
    waiter.prepare_wait("svc").await.unwrap();
    let waiting = asks_then_blocks(&waiter, app, 1).await;
    assert_eq!(
        connections(&client, app).await,
        1,
        "a waiting node blocks on its listening session"
    );
    (client, holder, waiter, lease, waiting)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_node_that_holds_no_lease_waits_on_one_connection_and_still_wakes_mid_plan() {
    let app = "lw one waiter";
    let (client, holder, waiter, lease, waiting) = waiting_as_a_node_starts("lw_one", app).await;
    // Blocked in a statement, the session is sent no notification: the
    // holder's write hands its wake lock on, and that ends the block.
    let written = Instant::now();
    holder
        .apply(
            "svc",
            lease.fence,
            &[Change::DataVersion(upsilon::parse_version("1.1").unwrap())],
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("the holder's write ended the wait")
        .unwrap()
        .unwrap();
    eprintln!(
        "a data version ended a wait on the session {:?} later",
        written.elapsed()
    );
    assert_eq!(connections(&client, app).await, 1);
    assert_eq!(checks(&statements(app)), 0, "{:#?}", statements(app));
    // The next wait, on the new stage, blocks again, and the release ends it.
    let waiting = asks_then_blocks(&waiter, app, 2).await;
    holder.release(&lease).await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("the release ended the wait")
        .unwrap()
        .unwrap();
    assert_eq!(checks(&statements(app)), 0, "{:#?}", statements(app));
}

/// A waiting node (application `app`) blocked on its listening session in a
/// wait for the lease of `a`, which another node holds: the node, the holder
/// and the wait.
async fn blocked_on_its_session(
    schema: &str,
    app: &str,
) -> (
    PostgresBackend,
    PostgresBackend,
    tokio::task::JoinHandle<Result<(), upsilon::backend::BackendError>>,
) {
    let holder = node(options(schema, &format!("{app} holder"))).await;
    let waiter = node(options(schema, app)).await;
    waiter.prepare_wait("a").await.unwrap();
    let (_lease, seen) = held_by_one(&holder, &waiter, "a").await;
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.wait("a", &seen, TTL).await })
    };
    until(Duration::from_secs(5), || async {
        blocks(&statements(app)) == 1
    })
    .await;
    (waiter, holder, waiting)
}

/// `waiter` is granted the lease of `b`, tied to its session, and keeps it
/// for several pings' worth of time: the session answers them.
async fn granted_and_kept(waiter: &PostgresBackend) {
    let b = granted(
        waiter
            .try_acquire("b", &testing::holder(2), TTL)
            .await
            .unwrap(),
    );
    let lost = tokio::time::timeout(4 * TIMEOUT, waiter.until_lost(&b)).await;
    assert!(lost.is_err(), "the new lease was lost: {lost:?}");
    waiter.release(&b).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_ends_a_wait_blocked_on_the_session_so_the_holder_pings_answer() {
    let (waiter, _holder, waiting) = blocked_on_its_session("lw_grant", "lw grant waiter").await;
    // The same node is granted another service's lease: its pings go on
    // the session, so the wait on it ends (the runner asks again).
    let granted = {
        let waiter = waiter.clone();
        tokio::spawn(async move { granted_and_kept(&waiter).await })
    };
    tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("the grant ended the wait on the session")
        .unwrap()
        .unwrap();
    granted.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_given_up_while_blocked_on_the_session_leaves_the_session_free() {
    let (waiter, _holder, waiting) =
        blocked_on_its_session("lw_dropped", "lw dropped waiter").await;
    // The caller gives up on the wait (as a runner that is shut down).
    waiting.abort();
    assert!(waiting.await.unwrap_err().is_cancelled());
    granted_and_kept(&waiter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_write_of_a_plan_reaches_a_node_blocked_on_its_session_before_any_release() {
    let app = "lw last waiter";
    let (_client, holder, waiter, lease, waiting) = waiting_as_a_node_starts("lw_last", app).await;
    // The holder's last write, with its notice; the lease stays held.
    let notice = upsilon::backend::Notice {
        fence: lease.fence,
        data_version: Some(upsilon::parse_version("1.1").unwrap()),
        plan: upsilon::backend::PlanDigest(7),
    };
    let version = upsilon::parse_version("1.1").unwrap();
    holder
        .apply_with_notice("svc", lease.fence, &[Change::DataVersion(version)], &notice)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("the last write ended the wait")
        .unwrap()
        .unwrap();
    assert_eq!(waiter.notice("svc"), Some(notice));
    assert_eq!(checks(&statements(app)), 0, "{:#?}", statements(app));
    holder.release(&lease).await.unwrap();
}
