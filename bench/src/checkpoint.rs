//! Scenario 7: what checkpointing costs a batch, beside the batch's own
//! write, in the same run. A batch is a keyset UPDATE of `rows` rows in one
//! transaction; each way does `batches` of them over the same table, in
//! rounds that take turns, and the figure is the median over the rounds of
//! the loop's time divided by its batches.
//!
//! - 7a PostgreSQL: the bare batch (tokio-postgres: BEGIN, UPDATE, COMMIT)
//!   against `PostgresBackend::run_batches` (the UPDATE and the checkpoint
//!   in one fenced transaction), and against the plain `ctx.batches().run`
//!   (the same bare transaction, then the checkpoint as a store write of
//!   its own);
//! - 7b SQLite: the bare batch (rusqlite: BEGIN IMMEDIATE, UPDATE, COMMIT
//!   in a data file) against `ctx.batches().run` with the checkpoint saved
//!   in the store's file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;
use upsilon::backend::Backend;
use upsilon::{BatchDone, BoxError, Task, TaskContext, TaskFuture};
use upsilon_backends::postgres::PostgresBackend;
use upsilon_backends::sqlite::SqliteBackend;

use crate::common::{runner, Env};
use crate::report::{Report, Row, Unit};
use crate::stats::summary;
use crate::Options;

/// Rows per batch, batches per loop, rounds.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    rows: u64,
    batches: u64,
    rounds: usize,
}

fn sizes(o: &Options) -> Sizes {
    if o.tiny {
        Sizes {
            rows: 20,
            batches: 3,
            rounds: 1,
        }
    } else {
        Sizes {
            rows: 500,
            batches: 40,
            rounds: 5,
        }
    }
}

const PG_BATCH: &str = "WITH b AS (UPDATE ckpt_items SET v = v + 1
        WHERE id IN (SELECT id FROM ckpt_items WHERE id > $1 ORDER BY id LIMIT $2)
        RETURNING id)
    SELECT max(id), count(*) FROM b";

fn done(last: Option<i64>, rows: i64) -> BatchDone<i64> {
    match last {
        Some(last) if rows > 0 => BatchDone::next(last, rows as u64),
        _ => BatchDone::end(),
    }
}

/// One bare PostgreSQL batch in its own transaction.
async fn pg_batch(
    client: &mut tokio_postgres::Client,
    after: i64,
    rows: u64,
) -> Result<BatchDone<i64>, BoxError> {
    let tx = client.transaction().await?;
    let row = tx.query_one(PG_BATCH, &[&after, &(rows as i64)]).await?;
    tx.commit().await?;
    Ok(done(row.get(0), row.get(1)))
}

/// The ms per batch of a task's batch loop, as the task measured it.
type Measured = Arc<Mutex<Option<f64>>>;

/// Runs `body` as task 1.1 of a fresh service on `backend`; returns the ms
/// per batch it measured.
async fn through_runner<F>(backend: Arc<dyn Backend>, service: &str, body: F) -> anyhow::Result<f64>
where
    F: for<'a> Fn(&'a mut TaskContext, Measured) -> TaskFuture<'a> + Send + Sync + 'static,
{
    let measured = Measured::default();
    let m = measured.clone();
    let task = Task::new(
        "1.1",
        1,
        "fill",
        move |ctx: &mut TaskContext| -> TaskFuture<'_> { body(ctx, m.clone()) },
    )?;
    runner(service, "1.1", backend, vec![task])?
        .run()
        .await
        .with_context(|| format!("the batch loop of {service}"))?;
    let ms = measured.lock().unwrap().take();
    ms.context("the task measured nothing")
}

fn per_batch(t: Instant, batches: u64) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0 / batches as f64
}

async fn postgres(env: &Env, s: Sizes, report: &mut Report) -> anyhow::Result<()> {
    let (client, conn) = tokio_postgres::connect(&env.url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS ckpt_items;
             CREATE TABLE ckpt_items (id bigint PRIMARY KEY, v bigint NOT NULL DEFAULT 0);
             INSERT INTO ckpt_items (id) SELECT generate_series(1, {});",
            s.rows * s.batches
        ))
        .await?;
    client.batch_execute("VACUUM ANALYZE ckpt_items").await?;
    let pg = PostgresBackend::connect_url(&env.url).await?;
    let client = Arc::new(tokio::sync::Mutex::new(client));
    let (mut bare, mut same_tx, mut apart) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..s.rounds {
        // The bare batches.
        let t = Instant::now();
        let mut after = 0;
        loop {
            match pg_batch(&mut *client.lock().await, after, s.rows).await {
                Ok(BatchDone { last: Some(l), .. }) => after = l,
                Ok(_) => break,
                Err(e) => anyhow::bail!("a bare batch: {e}"),
            }
        }
        bare.push(per_batch(t, s.batches));

        // run_batches: the UPDATE and the checkpoint in one transaction.
        let rb = pg.clone();
        same_tx.push(
            through_runner(
                Arc::new(pg.clone()),
                &format!("ckpt-tx-{round}"),
                move |ctx, m| {
                    let pg = rb.clone();
                    Box::pin(async move {
                        let t = Instant::now();
                        let loop_ = ctx.batches::<i64>().size(s.rows);
                        let b = pg
                            .run_batches(loop_, async |tx, b| {
                                let row = tx
                                    .query_one(PG_BATCH, &[&b.after.unwrap_or(0), &(b.size as i64)])
                                    .await?;
                                Ok(done(row.get(0), row.get(1)))
                            })
                            .await?;
                        *m.lock().unwrap() = Some(per_batch(t, b.batches));
                        Ok(())
                    })
                },
            )
            .await?,
        );

        // The plain loop: the bare transaction, then the checkpoint.
        let c = client.clone();
        apart.push(
            through_runner(
                Arc::new(pg.clone()),
                &format!("ckpt-apart-{round}"),
                move |ctx, m| {
                    let c = c.clone();
                    Box::pin(async move {
                        let t = Instant::now();
                        let c = &c;
                        let b = ctx
                            .batches::<i64>()
                            .size(s.rows)
                            .run(async |b| {
                                pg_batch(&mut *c.lock().await, b.after.unwrap_or(0), b.size).await
                            })
                            .await?;
                        *m.lock().unwrap() = Some(per_batch(t, b.batches));
                        Ok(())
                    })
                },
            )
            .await?,
        );
    }
    let (b, x, a) = (
        summary(&bare).p50,
        summary(&same_tx).p50,
        summary(&apart).p50,
    );
    let what = format!("ms per batch of {} rows", s.rows);
    report.push(
        Row::new("7a", format!("PostgreSQL run_batches, {what}"), Unit::Ms, x)
            .vs("bare transaction", b)
            .ratio_at_most(1.2, "<= 1.2x"),
    );
    report.push(
        Row::new(
            "7a",
            format!("PostgreSQL checkpoint apart, {what}"),
            Unit::Ms,
            a,
        )
        .vs("bare transaction", b)
        .ratio_at_most(1.2, "<= 1.2x"),
    );
    report.detail(
        "7a",
        json!({"rows_per_batch": s.rows, "batches": s.batches, "rounds": s.rounds,
               "bare_ms": bare, "run_batches_ms": same_tx, "checkpoint_apart_ms": apart}),
    );
    Ok(())
}

/// One bare SQLite batch in its own transaction. Blocking.
fn sqlite_batch(path: &Path, after: i64, rows: u64) -> rusqlite::Result<BatchDone<i64>> {
    let mut c = rusqlite::Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(10))?;
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let (last, n): (Option<i64>, i64) = tx.query_row(
        "WITH b AS (SELECT id FROM ckpt_items WHERE id > ?1 ORDER BY id LIMIT ?2)
         SELECT max(id), count(*) FROM b",
        [after, rows as i64],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if let Some(last) = last {
        tx.execute(
            "UPDATE ckpt_items SET v = v + 1 WHERE id > ?1 AND id <= ?2",
            [after, last],
        )?;
    }
    tx.commit()?;
    Ok(done(last, n))
}

async fn sqlite_batch_async(
    path: PathBuf,
    after: i64,
    rows: u64,
) -> Result<BatchDone<i64>, BoxError> {
    Ok(tokio::task::spawn_blocking(move || sqlite_batch(&path, after, rows)).await??)
}

async fn sqlite(env: &Env, s: Sizes, report: &mut Report) -> anyhow::Result<()> {
    let data = env.dir.path().join("ckpt-data.db");
    let store = env.dir.path().join("ckpt-store.db");
    {
        let c = rusqlite::Connection::open(&data)?;
        c.execute_batch(
            "PRAGMA journal_mode = WAL;
             DROP TABLE IF EXISTS ckpt_items;
             CREATE TABLE ckpt_items (id INTEGER PRIMARY KEY, v INTEGER NOT NULL DEFAULT 0);",
        )?;
        c.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
             INSERT INTO ckpt_items (id) SELECT i FROM n",
            [(s.rows * s.batches) as i64],
        )?;
    }
    let backend: Arc<dyn Backend> = Arc::new(SqliteBackend::open(&store).await?);
    let (mut bare, mut apart) = (Vec::new(), Vec::new());
    for round in 0..s.rounds {
        let t = Instant::now();
        let mut after = 0;
        loop {
            match sqlite_batch_async(data.clone(), after, s.rows).await {
                Ok(BatchDone { last: Some(l), .. }) => after = l,
                Ok(_) => break,
                Err(e) => anyhow::bail!("a bare batch: {e}"),
            }
        }
        bare.push(per_batch(t, s.batches));

        let path = data.clone();
        apart.push(
            through_runner(
                backend.clone(),
                &format!("ckpt-lite-{round}"),
                move |ctx, m| {
                    let path = path.clone();
                    Box::pin(async move {
                        let t = Instant::now();
                        let path = &path;
                        let b = ctx
                            .batches::<i64>()
                            .size(s.rows)
                            .run(async |b| {
                                sqlite_batch_async(path.clone(), b.after.unwrap_or(0), b.size).await
                            })
                            .await?;
                        *m.lock().unwrap() = Some(per_batch(t, b.batches));
                        Ok(())
                    })
                },
            )
            .await?,
        );
    }
    let (b, a) = (summary(&bare).p50, summary(&apart).p50);
    report.push(
        Row::new(
            "7b",
            format!("SQLite batches().run, ms per batch of {} rows", s.rows),
            Unit::Ms,
            a,
        )
        .vs("bare transaction", b)
        .ratio_at_most(1.2, "<= 1.2x"),
    );
    report.detail(
        "7b",
        json!({"rows_per_batch": s.rows, "batches": s.batches, "rounds": s.rounds,
               "bare_ms": bare, "batches_run_ms": apart}),
    );
    Ok(())
}

pub async fn run(env: &Env, o: &Options, report: &mut Report) -> anyhow::Result<()> {
    let s = sizes(o);
    postgres(env, s, report).await.context("7a (PostgreSQL)")?;
    sqlite(env, s, report).await.context("7b (SQLite)")
}
