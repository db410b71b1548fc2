//! Writes on PostgreSQL after a claim: one round trip each while the
//! handle's last write is the store's newest, and the same outcome as a
//! write that reads the store first whenever someone else wrote in between
//! (another handle with the same fence, a takeover), or the handle's own
//! last write ended with an unknown outcome.
#![cfg(feature = "postgres")]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{counting_proxy, granted, options, raw, server, until, via_port, Proxy};
use upsilon::backend::{AttemptState, BackendError, Change, FinishAttempt, Lock, Snapshot, Store};
use upsilon::{testing, TaskKey};
use upsilon_backends::postgres::{PostgresBackend, PostgresOptions};

fn key(id: &str, version: &str) -> TaskKey {
    TaskKey {
        version: upsilon::parse_version(version).unwrap(),
        id: id.to_owned(),
    }
}

fn finish(id: &str, version: &str, attempt: u32, state: AttemptState) -> Change {
    Change::Finish(FinishAttempt {
        key: key(id, version),
        attempt,
        state,
        error: None,
        duration: Duration::from_millis(3),
    })
}

fn completed(id: &str, version: &str) -> Change {
    finish(id, version, 1, AttemptState::Completed)
}

/// The rows and state of task `id@version` in `snap`.
fn task(snap: &Snapshot, id: &str, version: &str) -> Option<(u32, bool, AttemptState)> {
    snap.tasks
        .get(&key(id, version))
        .map(|t| (t.rows, t.completed, t.last.state))
}

async fn fresh(schema: &str) -> PostgresOptions {
    raw(&server().url())
        .await
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .unwrap();
    options(schema)
}

// One thread: the driver's task then runs only once every statement of a
// pipeline is queued, so they leave in one write and the count is exact.
#[tokio::test]
async fn after_a_claim_each_write_is_one_round_trip() {
    let schema = "one_flight";
    fresh(schema).await;
    let (port, turns) = counting_proxy(server().port()).await;
    let url = via_port(&server().url(), server().port(), port);
    let b = PostgresBackend::connect(
        PostgresOptions::from_url(&url)
            .unwrap()
            .schema(schema)
            .pool_size(1),
    )
    .await
    .unwrap();
    let lease = granted(
        b.try_acquire("svc", &testing::holder(1), Duration::from_secs(30))
            .await
            .unwrap(),
    );
    b.claim("svc", lease.fence).await.unwrap();
    let client = raw(&server().url()).await;
    let turns_of = async |change: Change| {
        let t = turns.load(Ordering::SeqCst);
        b.apply("svc", lease.fence, &[change]).await.unwrap();
        turns.load(Ordering::SeqCst) - t
    };
    for n in 0..5 {
        let id = format!("t{n}");
        assert_eq!(turns_of(testing::start_attempt(&id, "1.1", 1)).await, 1);
        assert_eq!(turns_of(completed(&id, "1.1")).await, 1);
    }
    // The lease's own writes to the state row change nothing a write checks.
    b.renew(&lease).await.unwrap();
    assert_eq!(turns_of(testing::start_attempt("r", "1.1", 1)).await, 1);
    // Nor does a freeze of the tables (row versions keep what they hold).
    client
        .batch_execute(&format!(
            "VACUUM FREEZE {schema}.upsilon_state, {schema}.upsilon_meta"
        ))
        .await
        .unwrap();
    assert_eq!(turns_of(completed("r", "1.1")).await, 1);
    // A retried write is still one round trip, and writes nothing new.
    assert_eq!(turns_of(completed("r", "1.1")).await, 1);
    assert_eq!(
        turns_of(Change::DataVersion(upsilon::parse_version("1.1").unwrap())).await,
        1
    );

    // A completion written by `complete_with` on this handle leaves it
    // knowing the store: the runner's own record that follows is one round
    // trip, as is the next write.
    let (ctx, _cancel) = testing::context("w", "1.2", upsilon::Resources::default());
    b.claim("test", ctx.fence()).await.unwrap();
    b.apply(
        "test",
        ctx.fence(),
        &[testing::start_attempt("w", "1.2", 1)],
    )
    .await
    .unwrap();
    b.complete_with(&ctx, async |_tx| Ok::<_, BackendError>(()))
        .await
        .unwrap();
    let t = turns.load(Ordering::SeqCst);
    b.apply("test", ctx.fence(), &[completed("w", "1.2")])
        .await
        .unwrap();
    b.apply(
        "test",
        ctx.fence(),
        &[testing::start_attempt("x", "1.2", 1)],
    )
    .await
    .unwrap();
    assert_eq!(turns.load(Ordering::SeqCst) - t, 2);

    let snap = b.load("svc").await.unwrap();
    assert_eq!(
        task(&snap, "r", "1.1"),
        Some((1, true, AttemptState::Completed))
    );
    assert_eq!(snap.tasks.len(), 6);
    let test = b.load("test").await.unwrap();
    assert_eq!(
        task(&test, "w", "1.2"),
        Some((1, true, AttemptState::Completed))
    );
    assert_eq!(
        task(&test, "x", "1.2"),
        Some((1, false, AttemptState::Running))
    );
}

#[tokio::test]
async fn a_completion_by_another_handle_with_the_same_fence_is_not_written_over() {
    let opts = fresh("same_fence").await;
    let a = PostgresBackend::connect(opts.clone()).await.unwrap();
    let b = PostgresBackend::connect(opts).await.unwrap();
    a.claim("svc", 1).await.unwrap();
    a.apply("svc", 1, &[testing::start_attempt("p", "1.0", 1)])
        .await
        .unwrap();
    a.apply("svc", 1, &[completed("p", "1.0")]).await.unwrap();
    a.apply("svc", 1, &[testing::start_attempt("t", "1.1", 1)])
        .await
        .unwrap();
    // The other handle completes the task with the same fence.
    b.apply("svc", 1, &[completed("t", "1.1")]).await.unwrap();

    // For `a` the attempt is still running; the store says otherwise, and
    // a new attempt would be a second completion (S3).
    let err = a
        .apply("svc", 1, &[testing::start_attempt("t", "1.1", 2)])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BackendError::Rejected(m) if m.contains("already completed")),
        "{err}"
    );
    // A failure of the attempt the other handle completed is refused too.
    let err = a
        .apply("svc", 1, &[finish("t", "1.1", 1, AttemptState::Failed)])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BackendError::Rejected(m) if m.contains("already completed")),
        "{err}"
    );
    // Its own completion record is the same write, taken as done.
    a.apply("svc", 1, &[completed("t", "1.1")]).await.unwrap();
    let snap = b.load("svc").await.unwrap();
    assert_eq!(
        task(&snap, "t", "1.1"),
        Some((1, true, AttemptState::Completed))
    );
    assert_eq!(
        b.history("svc").await.unwrap().len(),
        2,
        "one row for t, completed once"
    );

    // What `a` knows now is the whole store, not only the task it wrote
    // last: a task completed before is not started again.
    let err = a
        .apply("svc", 1, &[testing::start_attempt("p", "1.0", 1)])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BackendError::Rejected(m) if m.contains("already completed")),
        "{err}"
    );
    // And `a` goes on writing, with what the store now holds.
    a.apply("svc", 1, &[testing::start_attempt("u", "1.1", 1)])
        .await
        .unwrap();
    b.apply(
        "svc",
        1,
        &[Change::DataVersion(upsilon::parse_version("1.1").unwrap())],
    )
    .await
    .unwrap();
    let err = a
        .apply(
            "svc",
            1,
            &[Change::DataVersion(upsilon::parse_version("1.0").unwrap())],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BackendError::Rejected(m) if m.contains("never goes back")),
        "{err}"
    );
    let snap = a.load("svc").await.unwrap();
    assert_eq!(
        snap.data_version,
        Some(upsilon::parse_version("1.1").unwrap())
    );
    assert_eq!(
        task(&snap, "u", "1.1"),
        Some((1, false, AttemptState::Running))
    );
}

#[tokio::test]
async fn after_a_takeover_the_old_handles_write_commits_nothing() {
    let opts = fresh("taken_over").await;
    let old = PostgresBackend::connect(opts.clone()).await.unwrap();
    let new = PostgresBackend::connect(opts).await.unwrap();
    old.claim("svc", 1).await.unwrap();
    old.apply("svc", 1, &[testing::start_attempt("t", "1.1", 1)])
        .await
        .unwrap();
    new.claim("svc", 2).await.unwrap();
    for change in [
        completed("t", "1.1"),
        Change::DataVersion(upsilon::parse_version("1.1").unwrap()),
        testing::start_attempt("u", "1.1", 1),
    ] {
        let err = old.apply("svc", 1, &[change]).await.unwrap_err();
        assert!(
            matches!(
                err,
                BackendError::StaleFence {
                    presented: 1,
                    current: 2
                }
            ),
            "{err}"
        );
    }
    let snap = new.load("svc").await.unwrap();
    assert_eq!(snap.fence, 2);
    assert_eq!(snap.data_version, None);
    assert_eq!(
        task(&snap, "t", "1.1"),
        Some((1, false, AttemptState::Running))
    );
    assert_eq!(task(&snap, "u", "1.1"), None);
    // The new holder writes as usual.
    new.apply("svc", 2, &[testing::start_attempt("u", "1.1", 1)])
        .await
        .unwrap();
}

/// A node of the previous release claims with a plain `UPDATE` of the
/// state row's fence, and keeps no store revision: the fence alone stops
/// the old handle's write.
#[tokio::test]
async fn after_a_claim_that_kept_no_revision_the_old_handles_write_commits_nothing() {
    let schema = "taken_over_by_previous_release";
    let opts = fresh(schema).await;
    let old = PostgresBackend::connect(opts).await.unwrap();
    old.claim("svc", 1).await.unwrap();
    old.apply("svc", 1, &[testing::start_attempt("t", "1.1", 1)])
        .await
        .unwrap();
    raw(&server().url())
        .await
        .batch_execute(&format!(
            "UPDATE {schema}.upsilon_state SET store_fence = 2 WHERE service = 'svc'"
        ))
        .await
        .unwrap();
    let err = old
        .apply("svc", 1, &[completed("t", "1.1")])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::StaleFence {
                presented: 1,
                current: 2
            }
        ),
        "{err}"
    );
    let snap = old.load("svc").await.unwrap();
    assert_eq!(
        task(&snap, "t", "1.1"),
        Some((1, false, AttemptState::Running))
    );
}

/// The handle's write is cut off (its session terminated) while it waits
/// for the state row's lock: it never committed, and its retry writes it.
#[tokio::test]
async fn a_write_cut_off_before_its_commit_is_written_by_its_retry_once() {
    let schema = "cut_off";
    let opts = fresh(schema).await;
    let app = "cut off writer";
    let a = PostgresBackend::connect(opts.application_name(app))
        .await
        .unwrap();
    a.claim("svc", 1).await.unwrap();
    a.apply("svc", 1, &[testing::start_attempt("t", "1.1", 1)])
        .await
        .unwrap();

    let blocker = raw(&server().url()).await;
    blocker
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM {schema}.upsilon_state WHERE service = 'svc' FOR UPDATE"
        ))
        .await
        .unwrap();
    let write = {
        let a = a.clone();
        tokio::spawn(async move { a.apply("svc", 1, &[completed("t", "1.1")]).await })
    };
    let observer = raw(&server().url()).await;
    let waiting = "SELECT pid FROM pg_stat_activity
                   WHERE application_name = $1 AND wait_event_type = 'Lock'";
    until(Duration::from_secs(10), || async {
        !observer.query(waiting, &[&app]).await.unwrap().is_empty()
    })
    .await;
    let pid: i32 = observer.query_one(waiting, &[&app]).await.unwrap().get(0);
    observer
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let err = write.await.unwrap().unwrap_err();
    blocker.batch_execute("ROLLBACK").await.unwrap();
    let snap = a.load("svc").await.unwrap();
    assert_eq!(
        task(&snap, "t", "1.1"),
        Some((1, false, AttemptState::Running)),
        "nothing committed: {err}"
    );

    a.apply("svc", 1, &[completed("t", "1.1")]).await.unwrap();
    a.apply("svc", 1, &[completed("t", "1.1")]).await.unwrap();
    let snap = a.load("svc").await.unwrap();
    assert_eq!(
        task(&snap, "t", "1.1"),
        Some((1, true, AttemptState::Completed))
    );
    let err = a
        .apply("svc", 1, &[testing::start_attempt("t", "1.1", 2)])
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::Rejected(_)), "{err}");
}

/// The handle's write commits but the reply is lost: its retry finds the
/// write done and writes nothing twice.
#[tokio::test]
async fn a_write_whose_reply_was_lost_is_retried_idempotently() {
    let schema = "reply_lost";
    fresh(schema).await;
    let (proxy, port) = Proxy::start(server().port()).await;
    let url = via_port(&server().url(), server().port(), port);
    let a = PostgresBackend::connect(PostgresOptions::from_url(&url).unwrap().schema(schema))
        .await
        .unwrap();
    a.claim("svc", 1).await.unwrap();
    a.apply("svc", 1, &[testing::start_attempt("t", "1.1", 1)])
        .await
        .unwrap();

    proxy.lose_commit_reply.store(true, Ordering::SeqCst);
    let changes = [completed("t", "1.1"), testing::start_attempt("u", "1.1", 1)];
    a.apply("svc", 1, &changes).await.unwrap_err();
    a.apply("svc", 1, &changes).await.unwrap();
    a.apply("svc", 1, &changes).await.unwrap();
    let snap = a.load("svc").await.unwrap();
    assert_eq!(
        task(&snap, "t", "1.1"),
        Some((1, true, AttemptState::Completed))
    );
    assert_eq!(
        task(&snap, "u", "1.1"),
        Some((1, false, AttemptState::Running))
    );
    assert_eq!(a.history("svc").await.unwrap().len(), 2);
}

/// `schema`.items with ids 1..=n, each done 0 times.
async fn items(schema: &str, n: i64) -> upsilon_backends::postgres::tokio_postgres::Client {
    let client = raw(&server().url()).await;
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             DROP TABLE IF EXISTS {schema}.items;
             CREATE TABLE {schema}.items (id bigint PRIMARY KEY, done int NOT NULL DEFAULT 0);
             INSERT INTO {schema}.items (id) SELECT generate_series(1, {n})"
        ))
        .await
        .unwrap();
    client
}

/// One batch over `schema`.items: the items after `batch.after`, at most
/// `batch.size`, done once more.
async fn fill(
    tx: &upsilon_backends::postgres::tokio_postgres::Transaction<'_>,
    schema: &str,
    batch: &upsilon::Batch<i64>,
) -> Result<upsilon::BatchDone<i64>, upsilon::BoxError> {
    let row = tx
        .query_one(
            &format!(
                "WITH b AS (UPDATE {schema}.items SET done = done + 1
                   WHERE id IN (SELECT id FROM {schema}.items WHERE id > $1 ORDER BY id LIMIT $2)
                   RETURNING id)
                 SELECT max(id), count(*) FROM b"
            ),
            &[&batch.after.unwrap_or(0), &(batch.size as i64)],
        )
        .await?;
    let (last, rows): (Option<i64>, i64) = (row.get(0), row.get(1));
    Ok(match last {
        Some(last) => upsilon::BatchDone::next(last, rows as u64),
        None => upsilon::BatchDone::end(),
    })
}

async fn done_counts(
    client: &upsilon_backends::postgres::tokio_postgres::Client,
    schema: &str,
) -> Vec<i32> {
    client
        .query(&format!("SELECT done FROM {schema}.items ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A batch on the handle that claimed the store and started the task
/// checks the attempt against what the handle knows instead of reading
/// first, and writes its checkpoint with its checks in one statement:
/// `BEGIN`, the checkpoint, and `COMMIT` with the session's reset in one
/// flight besides the batch's own statements.
#[tokio::test]
async fn after_a_claim_a_batch_takes_three_round_trips_besides_its_work() {
    let schema = "batch_turns";
    fresh(schema).await;
    let client = items(schema, 9).await;
    let (port, turns) = counting_proxy(server().port()).await;
    let url = via_port(&server().url(), server().port(), port);
    let b = PostgresBackend::connect(
        PostgresOptions::from_url(&url)
            .unwrap()
            .schema(schema)
            .pool_size(1),
    )
    .await
    .unwrap();
    let (ctx, _cancel) = testing::context("fill", "1.0", upsilon::Resources::default());
    b.claim("test", 1).await.unwrap();
    b.apply("test", 1, &[testing::start_attempt("fill", "1.0", 1)])
        .await
        .unwrap();
    let per_batch = std::sync::Mutex::new(Vec::new());
    let last = std::sync::atomic::AtomicUsize::new(turns.load(Ordering::SeqCst));
    let done = b
        .run_batches(ctx.batches::<i64>().size(3), async |tx, batch| {
            let t = turns.load(Ordering::SeqCst);
            per_batch
                .lock()
                .unwrap()
                .push(t - last.swap(t, Ordering::SeqCst));
            fill(tx, schema, batch).await
        })
        .await
        .unwrap();
    assert_eq!(done.batches, 3);
    // From the start of one batch's work to the start of the next one's:
    // the work (two: the driver prepares its statement first), the
    // checkpoint, COMMIT with the reset, and BEGIN.
    let per_batch = per_batch.into_inner().unwrap();
    assert_eq!(per_batch[1..], [5, 5, 5], "{per_batch:?}");
    assert_eq!(done_counts(&client, schema).await, [1; 9]);
    let snap = b.load("test").await.unwrap();
    let cp = snap.tasks[&key("fill", "1.0")].checkpoint.clone().unwrap();
    assert!(cp.position.contains("\"batches\":3"), "{cp:?}");
}

/// Another handle writes with the same fence while a batch runs: the
/// batch's checkpoint is then checked under the lock as before, in the
/// same transaction, and the batch commits once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_after_another_handles_write_commits_once() {
    let schema = "batch_other_handle";
    let opts = fresh(schema).await;
    let client = items(schema, 9).await;
    let b = PostgresBackend::connect(opts.clone()).await.unwrap();
    let peer = PostgresBackend::connect(opts).await.unwrap();
    let (ctx, _cancel) = testing::context("fill", "1.0", upsilon::Resources::default());
    b.claim("test", 1).await.unwrap();
    b.apply("test", 1, &[testing::start_attempt("fill", "1.0", 1)])
        .await
        .unwrap();
    let done = b
        .run_batches(ctx.batches::<i64>().size(3), async |tx, batch| {
            if batch.number == 2 {
                peer.apply(
                    "test",
                    1,
                    &[Change::DataVersion(upsilon::parse_version("0.9").unwrap())],
                )
                .await?;
            }
            fill(tx, schema, batch).await
        })
        .await
        .unwrap();
    assert_eq!(done.batches, 3);
    assert_eq!(done_counts(&client, schema).await, [1; 9]);
    let snap = b.load("test").await.unwrap();
    assert_eq!(
        snap.data_version,
        Some(upsilon::parse_version("0.9").unwrap())
    );
    let cp = snap.tasks[&key("fill", "1.0")].checkpoint.clone().unwrap();
    assert!(cp.position.contains("\"batches\":3"), "{cp:?}");
    // The runner's completion that follows is taken, on what the store holds.
    b.apply("test", 1, &[completed("fill", "1.0")])
        .await
        .unwrap();
    assert_eq!(
        task(&b.load("test").await.unwrap(), "fill", "1.0"),
        Some((1, true, AttemptState::Completed))
    );
}
