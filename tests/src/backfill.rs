//! The fault test's backfill: a table of `ROWS` rows, processed in keyset
//! batches by task t1 of the node binary (`node --backfill ROWS`), with
//! every row's processing recorded in a processed-log table: which node,
//! process, fence, attempt and batch did it.
//!
//! - PostgreSQL (`PostgresBackend::run_batches`): the rows and the log are
//!   tables of the store's database, and a batch's update, its log rows and
//!   its checkpoint commit in one transaction. Each row is done exactly once
//!   (`done` counts it) and logged once.
//! - SQLite (the plain `ctx.batches().run`): the rows and the log are in a
//!   file of their own beside the store (`--backfill-db`), written in one
//!   transaction per batch, and the checkpoint is a separate write to the
//!   store. The update is idempotent (`filled = id * 2`); the log is appended
//!   to, so that a batch done again shows twice.
//!
//! The harness creates and fills the tables before the nodes start
//! ([`pg_setup`], [`sqlite_setup`]) and reads the log afterwards
//! ([`pg_processed`], [`sqlite_processed`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use upsilon::{BatchDone, BoxError, TaskContext};
use upsilon_backends::postgres::{tokio_postgres, PostgresBackend};

/// Where the backfill's rows are, and how its batches commit.
#[derive(Debug)]
pub enum Target {
    /// In the store's PostgreSQL database, through `run_batches`.
    Postgres(PostgresBackend),
    /// In a SQLite file of their own, through the plain batch loop.
    Sqlite(PathBuf),
}

/// The backfill task of a node.
#[derive(Debug)]
pub struct Backfill {
    pub target: Target,
    /// Rows per batch.
    pub batch: u64,
    /// The pause after each batch.
    pub pause: Duration,
    /// Rows in all (for the progress).
    pub rows: u64,
    /// Negative control: each attempt's first batch starts from the first
    /// row, whatever the checkpoint says.
    pub ignore_checkpoint: bool,
    /// The node's name, for the log.
    pub node: String,
}

/// Who processed a batch: written with each of its rows.
#[derive(Debug, Clone)]
struct Tag {
    node: String,
    pid: i64,
    fence: i64,
    attempt: i64,
    batch: i64,
}

/// One row of the processed log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Processed {
    /// The log row's number: the order of commits on SQLite.
    pub seq: i64,
    /// The row processed.
    pub id: i64,
    pub node: String,
    pub pid: i64,
    pub fence: u64,
    pub attempt: u32,
    /// The batch's number, over every attempt (`Batch::number`).
    pub batch: u64,
}

/// The tables in PostgreSQL, `rows` rows to do.
pub fn pg_setup(rows: u64) -> String {
    format!(
        "CREATE TABLE backfill_items (id bigint PRIMARY KEY, done int NOT NULL DEFAULT 0);
         INSERT INTO backfill_items (id) SELECT generate_series(1, {rows});
         CREATE TABLE backfill_log (seq bigserial PRIMARY KEY, id bigint NOT NULL,
             node text NOT NULL, pid bigint NOT NULL, fence bigint NOT NULL,
             attempt bigint NOT NULL, batch bigint NOT NULL)"
    )
}

/// The tables in the SQLite file `path`, `rows` rows to do.
pub fn sqlite_setup(path: &Path, rows: u64) -> rusqlite::Result<()> {
    let c = rusqlite::Connection::open(path)?;
    c.execute_batch(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE backfill_items (id INTEGER PRIMARY KEY, filled INTEGER);
         CREATE TABLE backfill_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, id INTEGER NOT NULL,
             node TEXT NOT NULL, pid INTEGER NOT NULL, fence INTEGER NOT NULL,
             attempt INTEGER NOT NULL, batch INTEGER NOT NULL);",
    )?;
    c.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
         INSERT INTO backfill_items (id) SELECT i FROM n",
        [rows as i64],
    )?;
    Ok(())
}

fn processed_of(
    seq: i64,
    id: i64,
    node: String,
    pid: i64,
    fence: i64,
    attempt: i64,
    batch: i64,
) -> Processed {
    Processed {
        seq,
        id,
        node,
        pid,
        fence: fence as u64,
        attempt: attempt as u32,
        batch: batch as u64,
    }
}

const LOG: &str = "SELECT seq, id, node, pid, fence, attempt, batch FROM backfill_log ORDER BY seq";

/// The PostgreSQL log, and how many times each row was done (by id).
pub async fn pg_processed(
    client: &tokio_postgres::Client,
) -> Result<(Vec<Processed>, Vec<i64>), tokio_postgres::Error> {
    let log = client
        .query(LOG, &[])
        .await?
        .iter()
        .map(|r| {
            processed_of(
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
            )
        })
        .collect();
    let done = client
        .query("SELECT done::bigint FROM backfill_items ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok((log, done))
}

/// The SQLite log, and per row (by id) 1 if it is filled, else 0.
pub fn sqlite_processed(path: &Path) -> rusqlite::Result<(Vec<Processed>, Vec<i64>)> {
    let c = rusqlite::Connection::open(path)?;
    let log = c
        .prepare(LOG)?
        .query_map([], |r| {
            Ok(processed_of(
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let done = c
        .prepare("SELECT filled = id * 2 FROM backfill_items ORDER BY id")?
        .query_map([], |r| {
            Ok(r.get::<_, Option<bool>>(0)?.unwrap_or(false) as i64)
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok((log, done))
}

/// One SQLite batch: the rows after `after`, at most `size`, filled and
/// logged in one transaction. Blocking.
fn sqlite_batch(path: &Path, after: i64, size: u64, tag: &Tag) -> rusqlite::Result<(i64, u64)> {
    let mut c = rusqlite::Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(10))?;
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let ids: Vec<i64> = tx
        .prepare("SELECT id FROM backfill_items WHERE id > ?1 ORDER BY id LIMIT ?2")?
        .query_map([after, size as i64], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for id in &ids {
        tx.execute(
            "UPDATE backfill_items SET filled = id * 2 WHERE id = ?1",
            [id],
        )?;
        tx.execute(
            "INSERT INTO backfill_log (id, node, pid, fence, attempt, batch)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            rusqlite::params![id, tag.node, tag.pid, tag.fence, tag.attempt, tag.batch],
        )?;
    }
    tx.commit()?;
    Ok((ids.last().copied().unwrap_or(0), ids.len() as u64))
}

const PG_BATCH: &str = "WITH b AS (
        UPDATE backfill_items SET done = done + 1
        WHERE id IN (SELECT id FROM backfill_items WHERE id > $1 ORDER BY id LIMIT $2)
        RETURNING id),
    l AS (INSERT INTO backfill_log (id, node, pid, fence, attempt, batch)
        SELECT id, $3, $4, $5, $6, $7 FROM b)
    SELECT max(id), count(*) FROM b";

fn done(last: i64, rows: u64) -> BatchDone<i64> {
    if rows == 0 {
        BatchDone::end()
    } else {
        BatchDone::next(last, rows)
    }
}

impl Backfill {
    /// Runs the backfill as the task of `ctx`, resuming from its checkpoint
    /// (unless it ignores it).
    pub async fn run(&self, ctx: &TaskContext) -> Result<(), BoxError> {
        let first = AtomicBool::new(true);
        // The key a batch starts after: the negative control's first batch
        // of an attempt starts from the top.
        let after = |given: Option<i64>| {
            let restart = self.ignore_checkpoint && first.swap(false, Ordering::SeqCst);
            if restart {
                0
            } else {
                given.unwrap_or(0)
            }
        };
        let tag = |batch: u64| Tag {
            node: self.node.clone(),
            pid: std::process::id() as i64,
            fence: ctx.fence() as i64,
            attempt: ctx.task().attempt as i64,
            batch: batch as i64,
        };
        let loop_ = ctx
            .batches::<i64>()
            .size(self.batch)
            .pause(self.pause)
            .total(self.rows);
        let (after, tag) = (&after, &tag);
        match &self.target {
            Target::Postgres(pg) => {
                pg.run_batches(loop_, async |tx, b| {
                    let t = tag(b.number);
                    let row = tx
                        .query_one(
                            PG_BATCH,
                            &[
                                &after(b.after),
                                &(b.size as i64),
                                &t.node,
                                &t.pid,
                                &t.fence,
                                &t.attempt,
                                &t.batch,
                            ],
                        )
                        .await?;
                    let (last, rows): (Option<i64>, i64) = (row.get(0), row.get(1));
                    Ok(done(last.unwrap_or(0), rows as u64))
                })
                .await?;
            }
            Target::Sqlite(path) => {
                loop_
                    .run(async |b| {
                        let (path, t, from) = (path.clone(), tag(b.number), after(b.after));
                        let size = b.size;
                        let (last, rows) = tokio::task::spawn_blocking(move || {
                            sqlite_batch(&path, from, size, &t)
                        })
                        .await??;
                        Ok(done(last, rows))
                    })
                    .await?;
            }
        }
        Ok(())
    }
}
