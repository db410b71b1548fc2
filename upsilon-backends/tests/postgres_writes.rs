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
