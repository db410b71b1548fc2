//! Batches in one transaction with their checkpoint
//! (`PostgresBackend::run_batches`), against a real server: a stale holder
//! commits neither a batch nor its checkpoint; a batch whose commit reply
//! was lost is not done again; a database made before checkpoints existed
//! gains their columns.
#![cfg(feature = "postgres")]

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{backend, granted, raw, server, via_port, Proxy};
use upsilon::backend::{BackendError, Lock, Store};
use upsilon::testing;
use upsilon::{Batch, BatchDone, BatchError, BatchPosition, TaskKey};
use upsilon_backends::postgres::tokio_postgres::{Client, Transaction};
use upsilon_backends::postgres::{PostgresBackend, PostgresOptions};

/// `schema`.items with ids 1..=n, each done 0 times.
async fn items(client: &Client, schema: &str, n: i64) {
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             DROP TABLE IF EXISTS {schema}.items;
             CREATE TABLE {schema}.items (id bigint PRIMARY KEY, done int NOT NULL DEFAULT 0);
             INSERT INTO {schema}.items (id) SELECT generate_series(1, {n})"
        ))
        .await
        .unwrap();
}

/// How many times each item was done, by id.
async fn done_counts(client: &Client, schema: &str) -> Vec<i32> {
    client
        .query(&format!("SELECT done FROM {schema}.items ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// One batch: the items after `batch.after`, at most `batch.size`, done once
/// more.
async fn fill(
    tx: &Transaction<'_>,
    schema: &str,
    batch: &Batch<i64>,
) -> Result<BatchDone<i64>, upsilon::BoxError> {
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
        Some(last) => BatchDone::next(last, rows as u64),
        None => BatchDone::end(),
    })
}

/// Takes the lease of `test` (the service of `testing::context`, fence 1),
/// claims the store and starts attempt 1 of task `fill@1.0`.
async fn running(b: &PostgresBackend) {
    let lease = granted(
        b.try_acquire("test", &testing::holder(1), Duration::from_secs(30))
            .await
            .unwrap(),
    );
    assert_eq!(lease.fence, 1, "testing::context runs with fence 1");
    b.claim("test", 1).await.unwrap();
    b.apply("test", 1, &[testing::start_attempt("fill", "1.0", 1)])
        .await
        .unwrap();
}

fn key() -> TaskKey {
    TaskKey {
        version: "1.0.0".parse().unwrap(),
        id: "fill".into(),
    }
}

/// The position the store holds for the task's newest row.
async fn stored(b: &PostgresBackend) -> Option<BatchPosition<i64>> {
    let snap = b.load("test").await.unwrap();
    let c = snap.tasks[&key()].checkpoint.clone()?;
    Some(serde_json::from_str(&c.position).unwrap())
}

/// A context for the attempt, resuming from what the store holds, as the
/// runner would give it.
async fn context(b: &PostgresBackend) -> upsilon::TaskContext {
    let (ctx, _) = testing::context("fill", "1.0", upsilon::Resources::default());
    if let Some(p) = stored(b).await {
        testing::resume_from(&ctx, &p);
    }
    ctx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_holder_commits_neither_the_batch_nor_its_checkpoint() {
    let schema = "batches_stale";
    let client = raw(&server().url()).await;
    items(&client, schema, 10).await;
    let b = backend(schema).await;
    running(&b).await;
    let ctx = context(&b).await;
    let taken_over = Arc::new(Mutex::new(false));
    let err = b
        .run_batches(ctx.batches::<i64>().size(3), async |tx, batch| {
            let done = fill(tx, schema, batch).await?;
            if batch.number == 2 {
                // Another node takes the store over while this batch runs.
                b.claim("test", 2).await?;
                *taken_over.lock().unwrap() = true;
            }
            Ok(done)
        })
        .await
        .unwrap_err();
    assert!(*taken_over.lock().unwrap());
    match &err {
        BatchError::Failed {
            batch: 2, source, ..
        } => assert!(
            matches!(
                source.downcast_ref::<BackendError>(),
                Some(BackendError::StaleFence {
                    presented: 1,
                    current: 2
                })
            ),
            "{err}"
        ),
        other => panic!("expected batch 2 to be refused, got {other}"),
    }
    assert_eq!(
        done_counts(&client, schema).await,
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        "only the first batch committed"
    );
    assert_eq!(
        stored(&b).await,
        Some(BatchPosition {
            last: 3,
            rows: 3,
            batches: 1
        }),
        "the checkpoint stays at the first batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_commit_reply_was_lost_is_not_done_again() {
    let schema = "batches_reply_lost";
    let client = raw(&server().url()).await;
    items(&client, schema, 10).await;
    let (proxy, port) = Proxy::start(server().port()).await;
    let url = via_port(&server().url(), server().port(), port);
    let b = PostgresBackend::connect(PostgresOptions::from_url(&url).unwrap().schema(schema))
        .await
        .unwrap();
    running(&b).await;
    let ctx = context(&b).await;
    let err = b
        .run_batches(ctx.batches::<i64>().size(3), async |tx, batch| {
            let done = fill(tx, schema, batch).await?;
            if batch.number == 2 {
                // The reply to this batch's COMMIT will not arrive.
                proxy.lose_commit_reply.store(true, Ordering::SeqCst);
            }
            Ok(done)
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, BatchError::Failed { batch: 2, .. }),
        "the commit's reply was lost: {err}"
    );
    assert_eq!(
        done_counts(&client, schema).await,
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        "yet batch 2 committed"
    );
    // The task tries again: it resumes after the batch that committed.
    let ctx = context(&b).await;
    let afters = Mutex::new(Vec::new());
    let done = b
        .run_batches(ctx.batches::<i64>().size(3), async |tx, batch| {
            afters.lock().unwrap().push(batch.after);
            fill(tx, schema, batch).await
        })
        .await
        .unwrap();
    assert_eq!(*afters.lock().unwrap(), [Some(6), Some(9), Some(10)]);
    assert_eq!((done.batches, done.rows), (2, 10));
    assert_eq!(
        done_counts(&client, schema).await,
        [1; 10],
        "each item once"
    );
    assert_eq!(
        stored(&b).await,
        Some(BatchPosition {
            last: 10,
            rows: 10,
            batches: 4
        })
    );
}

/// The tables as the release before checkpoints created them.
const BEFORE_CHECKPOINTS: &str = "
CREATE SCHEMA before_checkpoints;
CREATE TABLE before_checkpoints.upsilon_meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE before_checkpoints.upsilon_state (
  service text PRIMARY KEY, data_version text, baseline text,
  store_fence bigint NOT NULL DEFAULT 0, granted bigint NOT NULL DEFAULT 0,
  lease_holder text, lease_fence bigint, lease_expires timestamptz,
  lease_pid integer, lease_server_start bigint);
CREATE TABLE before_checkpoints.upsilon_history (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  service text NOT NULL, version text NOT NULL, task_id text NOT NULL,
  attempt integer NOT NULL, kind text NOT NULL, state text NOT NULL,
  fence bigint NOT NULL, holder text NOT NULL, description text NOT NULL,
  started timestamptz NOT NULL, finished timestamptz, duration_ms bigint, error text,
  UNIQUE (service, version, task_id, attempt));
INSERT INTO before_checkpoints.upsilon_meta VALUES ('format', '1');
INSERT INTO before_checkpoints.upsilon_state (service, store_fence, granted) VALUES ('test', 1, 1);
";

#[tokio::test]
async fn a_database_from_before_checkpoints_gains_their_columns_at_a_nodes_first_call() {
    let client = raw(&server().url()).await;
    client
        .batch_execute("DROP SCHEMA IF EXISTS before_checkpoints CASCADE")
        .await
        .unwrap();
    client.batch_execute(BEFORE_CHECKPOINTS).await.unwrap();
    client
        .execute(
            "INSERT INTO before_checkpoints.upsilon_history
               (service, version, task_id, attempt, kind, state, fence, holder, description, started)
             VALUES ('test', '1.0.0', 'fill', 1, 'run', 'running', 1, $1, 'fills', now())",
            &[&testing::holder(1).encode()],
        )
        .await
        .unwrap();
    let b = backend("before_checkpoints").await;
    let history = b.history("test").await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].checkpoint, None);
    // The running attempt of the old release's row takes a checkpoint.
    let ctx = context(&b).await;
    let items_schema = "before_checkpoints_items";
    items(&client, items_schema, 4).await;
    b.run_batches(ctx.batches::<i64>().size(2), async |tx, batch| {
        fill(tx, items_schema, batch).await
    })
    .await
    .unwrap();
    assert_eq!(
        stored(&b).await,
        Some(BatchPosition {
            last: 4,
            rows: 4,
            batches: 2
        })
    );
    // A second node finds the columns there.
    let again = backend("before_checkpoints").await;
    assert!(again.history("test").await.unwrap()[0].checkpoint.is_some());
    let format: String = client
        .query_one(
            "SELECT value FROM before_checkpoints.upsilon_meta WHERE key = 'format'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(format, "1", "the format stays: the columns are only added");
}

/// Through the runner: the reply to batch 2's COMMIT is lost, the attempt
/// fails, and the runner's retry resumes after batch 2, which the store
/// holds, rather than after batch 1, which is all the failed attempt knew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runners_retry_after_a_lost_commit_reply_resumes_from_the_store() {
    let schema = "batches_runner_retry";
    let client = raw(&server().url()).await;
    items(&client, schema, 10).await;
    let (proxy, port) = Proxy::start(server().port()).await;
    let url = via_port(&server().url(), server().port(), port);
    let b = PostgresBackend::connect(PostgresOptions::from_url(&url).unwrap().schema(schema))
        .await
        .unwrap();
    let lost_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let task = {
        let (proxy, lost_once) = (proxy.clone(), lost_once.clone());
        upsilon::Task::new(
            "1.0",
            1,
            "fill",
            move |ctx: &mut upsilon::TaskContext| -> upsilon::TaskFuture<'_> {
                let (proxy, lost_once) = (proxy.clone(), lost_once.clone());
                Box::pin(async move {
                    let pg = ctx.resource::<PostgresBackend>()?.clone();
                    let (proxy, lost_once) = (&proxy, &lost_once);
                    pg.run_batches(ctx.batches::<i64>().size(3), async |tx, batch| {
                        let done = fill(tx, schema, batch).await?;
                        if batch.number == 2 && !lost_once.swap(true, Ordering::SeqCst) {
                            proxy.lose_commit_reply.store(true, Ordering::SeqCst);
                        }
                        Ok(done)
                    })
                    .await?;
                    Ok(())
                })
            },
        )
        .unwrap()
    };
    upsilon::Upsilon::builder()
        .service("runner_retry")
        .app_version("1.0")
        .backend(Arc::new(b.clone()))
        .resource(b.clone())
        .retry(upsilon::RetryPolicy::attempts(2, Duration::from_millis(50)))
        .tasks(vec![task])
        .build()
        .unwrap()
        .run()
        .await
        .unwrap();
    assert!(lost_once.load(Ordering::SeqCst));
    assert_eq!(
        done_counts(&client, schema).await,
        [1; 10],
        "each item once"
    );
    let history = b.history("runner_retry").await.unwrap();
    let reached: Vec<_> = history
        .iter()
        .map(|r| r.checkpoint.as_ref().and_then(|c| c.done))
        .collect();
    assert_eq!(reached, [Some(6), Some(10)]);
}
