//! `complete_with` and the grant path against a real server: a completed
//! attempt's work never runs twice, a task's session settings never reach
//! Upsilon's own writes, and the fence never repeats after the state row is
//! deleted.
#![cfg(feature = "postgres")]

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{backend, granted, options, raw, server, via_port, Proxy};
use upsilon::backend::{BackendError, Lease, Lock, Store};
use upsilon::testing;
use upsilon_backends::postgres::tokio_postgres::Client;
use upsilon_backends::postgres::{PostgresBackend, PostgresOptions};

/// An app table for the tasks' effects, in `schema`.
async fn effects_table(client: &Client, schema: &str) {
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.effects (task text NOT NULL)"
        ))
        .await
        .unwrap();
}

async fn count_effects(client: &Client, schema: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {schema}.effects"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Takes the lease of `test` (the service of `testing::context`), claims the
/// store and starts attempt 1 of task `id@1.0`: what the runner has done
/// before it calls that task.
async fn running(b: &PostgresBackend, id: &str) -> Lease {
    let lease = granted(
        b.try_acquire("test", &testing::holder(1), Duration::from_secs(30))
            .await
            .unwrap(),
    );
    assert_eq!(lease.fence, 1, "testing::context runs with fence 1");
    b.claim("test", lease.fence).await.unwrap();
    b.apply("test", lease.fence, &[testing::start_attempt(id, "1.0", 1)])
        .await
        .unwrap();
    lease
}

fn context_of(b: &PostgresBackend, id: &str) -> upsilon::TaskContext {
    let mut resources = upsilon::Resources::default();
    resources.insert(b.clone());
    testing::context(id, "1.0", resources).0
}

#[tokio::test]
async fn a_second_complete_with_of_a_completed_attempt_runs_nothing() {
    let schema = "complete_twice";
    let client = raw(&server().url()).await;
    effects_table(&client, schema).await;
    let b = backend(schema).await;
    running(&b, "t").await;
    let ctx = context_of(&b, "t");
    let runs = Arc::new(Mutex::new(0));
    let work = async |tx: &upsilon_backends::postgres::tokio_postgres::Transaction<'_>| {
        *runs.lock().unwrap() += 1;
        tx.execute(&format!("INSERT INTO {schema}.effects VALUES ('t')"), &[])
            .await
            .map_err(BackendError::other)?;
        Ok::<_, BackendError>(())
    };
    b.complete_with(&ctx, work).await.unwrap();
    let err = b.complete_with(&ctx, work).await.unwrap_err();
    assert!(
        matches!(err, BackendError::Rejected(_)),
        "a second call is refused: {err:?}"
    );
    assert!(err.to_string().contains("already completed"), "{err}");
    assert_eq!(*runs.lock().unwrap(), 1, "the work ran once");
    assert_eq!(count_effects(&client, schema).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_lost_commit_reply_runs_nothing() {
    let schema = "commit_reply_lost";
    let client = raw(&server().url()).await;
    effects_table(&client, schema).await;
    let (proxy, port) = Proxy::start(server().port()).await;
    let url = via_port(&server().url(), server().port(), port);
    let b = PostgresBackend::connect(PostgresOptions::from_url(&url).unwrap().schema(schema))
        .await
        .unwrap();
    running(&b, "t").await;
    let ctx = context_of(&b, "t");
    let runs = Arc::new(Mutex::new(0));
    let work = async |tx: &upsilon_backends::postgres::tokio_postgres::Transaction<'_>| {
        *runs.lock().unwrap() += 1;
        tx.execute(&format!("INSERT INTO {schema}.effects VALUES ('t')"), &[])
            .await
            .map_err(BackendError::other)?;
        // The reply to this transaction's COMMIT will not arrive.
        proxy.lose_commit_reply.store(true, Ordering::SeqCst);
        Ok::<_, BackendError>(())
    };
    let first = b.complete_with(&ctx, work).await;
    assert!(first.is_err(), "the commit's reply was lost: {first:?}");
    assert_eq!(count_effects(&client, schema).await, 1, "yet it committed");
    // The task does what a careful task does with an unknown outcome: it
    // tries again.
    let err = b.complete_with(&ctx, work).await.unwrap_err();
    assert!(err.to_string().contains("already completed"), "{err}");
    assert_eq!(*runs.lock().unwrap(), 1, "the work ran once");
    assert_eq!(count_effects(&client, schema).await, 1);
}

#[tokio::test]
async fn a_tasks_session_settings_never_reach_upsilons_writes() {
    let schema = "session_reset";
    let client = raw(&server().url()).await;
    // Every write to the history table records the session's
    // synchronous_commit: the completion in complete_with's transaction and
    // Upsilon's own later writes on the same pooled connection.
    let b = PostgresBackend::connect(options(schema).pool_size(1))
        .await
        .unwrap();
    // The first call creates the tables.
    b.load("t").await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE {schema}.seen (setting text NOT NULL);
             CREATE FUNCTION {schema}.record_setting() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                 INSERT INTO {schema}.seen VALUES (current_setting('synchronous_commit'));
                 RETURN NULL;
               END $$;
             CREATE TRIGGER record AFTER INSERT OR UPDATE ON {schema}.upsilon_history
               FOR EACH ROW EXECUTE FUNCTION {schema}.record_setting();"
        ))
        .await
        .unwrap();
    let lease = running(&b, "t").await;
    client
        .batch_execute(&format!("DELETE FROM {schema}.seen"))
        .await
        .unwrap();
    let ctx = context_of(&b, "t");
    b.complete_with(&ctx, async |tx| {
        tx.batch_execute("SET synchronous_commit = off").await?;
        Ok::<_, upsilon::BoxError>(())
    })
    .await
    .unwrap();
    b.apply(
        "test",
        lease.fence,
        &[testing::start_attempt("u", "1.0", 1)],
    )
    .await
    .unwrap();
    let seen: Vec<String> = client
        .query(&format!("SELECT setting FROM {schema}.seen"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(seen.len(), 2, "the completion and the next write: {seen:?}");
    assert!(seen.iter().all(|s| s == "on"), "{seen:?}");
}

#[tokio::test]
async fn the_fence_never_repeats_after_the_state_row_is_deleted() {
    let schema = "fence_floor";
    let client = raw(&server().url()).await;
    let b = backend(schema).await;
    let ttl = Duration::from_secs(30);
    let first = granted(
        b.try_acquire("svc", &testing::holder(1), ttl)
            .await
            .unwrap(),
    );
    // A grant that wrote no history: only the state row knows its fence.
    b.claim("svc", first.fence).await.unwrap();
    let deleted = client
        .execute(
            &format!("DELETE FROM {schema}.upsilon_state WHERE service = 'svc'"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let next = granted(
        b.try_acquire("svc", &testing::holder(2), ttl)
            .await
            .unwrap(),
    );
    assert!(
        next.fence > first.fence,
        "fence {} was granted again",
        next.fence
    );
    // Other services keep their own fences.
    let other = granted(
        b.try_acquire("other", &testing::holder(3), ttl)
            .await
            .unwrap(),
    );
    assert_eq!(other.fence, 1);
}

/// Upsilon's statements, prepared on its pooled connection after their
/// first use, still run after a task's `complete_with` reset that session
/// (`DISCARD ALL` drops prepared statements), and after a batch's.
#[tokio::test]
async fn calls_after_a_tasks_session_reset_run_on_the_same_connection() {
    let schema = "prepared_reset";
    let b = PostgresBackend::connect(options(schema).pool_size(1))
        .await
        .unwrap();
    // Each call three times: run once, prepared, run prepared.
    for _ in 0..3 {
        b.load("test").await.unwrap();
        b.current("test").await.unwrap();
    }
    let lease = running(&b, "t").await;
    for n in 0..3 {
        b.renew(&lease).await.unwrap();
        b.apply(
            "test",
            lease.fence,
            &[testing::start_attempt(&format!("before{n}"), "1.0", 1)],
        )
        .await
        .unwrap();
    }
    let ctx = context_of(&b, "t");
    b.complete_with(&ctx, async |tx| {
        tx.batch_execute("SELECT 1").await?;
        Ok::<_, upsilon::BoxError>(())
    })
    .await
    .unwrap();
    // The same (only) connection, its session reset.
    for n in 0..3 {
        b.load("test").await.unwrap();
        b.current("test").await.unwrap();
        b.renew(&lease).await.unwrap();
        b.apply(
            "test",
            lease.fence,
            &[testing::start_attempt(&format!("after{n}"), "1.0", 1)],
        )
        .await
        .unwrap();
    }
    let snap = b.load("test").await.unwrap();
    assert_eq!(snap.tasks.len(), 7, "t, three before, three after");
    b.release(&lease).await.unwrap();
}
