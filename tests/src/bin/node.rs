//! A cluster node for the multi-process tests: runs Upsilon with generated
//! tasks against a backend URL, and records every run of task code so that a
//! checker can tell which node did what, under which fence, and when.
//!
//! ```text
//! node --url sqlite:///PATH [--lock-url URL] --name NAME --app-version 1.1 --tasks 1.0:2,1.1:3 [--task-ms 50] [--ttl-ms 2000]
//!      [--audit-dir DIR] [--margin-ms MS] [--no-loss-signal] [--no-wait-out] [--rollbacks] [--fail-task ID --fail-while PATH]
//!      [--wall-clock-offset FILE] [--judge-expiry-by-wall-clock]
//!      [--backfill ROWS [--batch-size N] [--batch-pause-ms MS] [--backfill-db PATH] [--backfill-ignores-checkpoint]]
//! ```
//!
//! With `--backfill`, task t1 is a batched backfill over the harness's
//! table of ROWS rows (`upsilon_tests::backfill`), recorded in the audit log
//! like any task.
//!
//! Without `--audit-dir`, each task appends a row (task, node, fence, start,
//! end) to an `audit` table in the store's database. With it, the node writes
//! an audit log of its own in `DIR` instead (`upsilon_tests::audit`): task
//! runs and rollbacks with their start, end and cancellation times on the
//! host's `CLOCK_MONOTONIC`, and every lease and store call with its outcome.
//! The fault test uses the log: it cuts, terminates and restarts the store's
//! connections, and a record must not depend on them.
//!
//! The node stops cleanly on SIGTERM or SIGINT (`run_until(shutdown_signal())`):
//! a holder cancels its task, records it cancelled and releases the lease.
//!
//! Exit code 0 when the node became READY, 3 when it was stopped by a
//! signal before, 1 for any other error (on stderr), 2 for bad flags (clap's
//! message on stderr); `--help` lists them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgAction, Parser};
use rusqlite::Connection;
use tokio_util::sync::CancellationToken;
use upsilon::backend::{Backend, Lock, Store};
use upsilon::{AboveAppPolicy, Error, Holder, Outcome, Task, TaskContext, TaskFuture, Upsilon};
use upsilon_backends::sqlite::{SqliteBackend, SqliteOptions};
use upsilon_tests::audit::{AuditLog, Ended, Record};
use upsilon_tests::backfill::{self, Backfill};
use upsilon_tests::clock::{now_us, SteppedWallClock};
use upsilon_tests::watched::Watched;

/// A cluster node for the multi-process tests: runs Upsilon with generated
/// tasks, each recording its runs in an `audit` table of the store's
/// database or in an audit log of its own. Exits 0 once READY.
#[derive(Debug, Parser)]
#[command(name = "node", args_override_self = true)]
struct Args {
    /// The store: sqlite:///PATH or postgres://...; the audit table goes
    /// in the same database.
    #[arg(long)]
    url: String,
    /// The lock, when it lives apart from the store (a URL like `--url`'s):
    /// the lease in one system, the data version and history in another.
    #[arg(long, value_name = "URL")]
    lock_url: Option<String>,
    /// The node's name (its holder's pod), in the audit rows and its output.
    #[arg(long)]
    name: String,
    /// The version of the app the node runs.
    #[arg(long, value_name = "VERSION")]
    app_version: String,
    /// How many tasks at each version, numbered t1, t2, ... in order.
    #[arg(long, value_name = "VERSION:COUNT,...", required = true, value_delimiter = ',',
        action = ArgAction::Set, value_parser = task_count)]
    tasks: Vec<(String, u32)>,
    /// How long each task (and each rollback) runs, in milliseconds.
    #[arg(long, value_name = "MS", value_parser = millis, allow_negative_numbers = true,
        default_value = "50")]
    task_ms: Duration,
    /// The lease TTL, in milliseconds.
    #[arg(long, value_name = "MS", value_parser = millis, allow_negative_numbers = true,
        default_value = "2000")]
    ttl_ms: Duration,
    /// The runner's safety margin, in milliseconds (default: the runner's,
    /// TTL/5).
    #[arg(long, value_name = "MS", value_parser = millis, allow_negative_numbers = true)]
    margin_ms: Option<Duration>,
    /// Write an audit log of this process in DIR instead of rows in the
    /// store's `audit` table.
    #[arg(long, value_name = "DIR")]
    audit_dir: Option<PathBuf>,
    /// Negative control: the backend's signal that the lease may be gone
    /// (`Lock::until_lost`) never reaches the runner, so a holder learns of a
    /// loss only from its renewals and its local deadline.
    #[arg(long)]
    no_loss_signal: bool,
    /// Negative control: a grant whose fence the store has already seen is
    /// given back at once, not held unused for a TTL
    /// (`Builder::skip_waiting_out_a_forgetful_lock`; feature
    /// `negative-controls`).
    #[arg(long)]
    no_wait_out: bool,
    /// Give every task a rollback (recorded like a task), and roll back
    /// when a task fails for good.
    #[arg(long)]
    rollbacks: bool,
    /// The task (t1, t2, ...) that fails while the file --fail-while names
    /// exists.
    #[arg(long, value_name = "ID", requires = "fail_while")]
    fail_task: Option<String>,
    /// See --fail-task.
    #[arg(long, value_name = "PATH", requires = "fail_task")]
    fail_while: Option<PathBuf>,
    /// SQLite: the backend's wall clock is the host's stepped by the
    /// milliseconds written in FILE (`upsilon_tests::clock::SteppedWallClock`).
    #[arg(long, value_name = "FILE")]
    wall_clock_offset: Option<PathBuf>,
    /// SQLite, negative control: judge lease expiry by the wall clock
    /// (`SqliteOptions::judge_expiry_by_wall_clock`).
    #[arg(long)]
    judge_expiry_by_wall_clock: bool,
    /// Task t1 backfills the harness's table of ROWS rows in batches
    /// (PostgreSQL: `run_batches` in the store's database; SQLite: the plain
    /// batch loop over --backfill-db).
    #[arg(long, value_name = "ROWS")]
    backfill: Option<u64>,
    /// Rows per batch of the backfill.
    #[arg(long, value_name = "N", default_value = "20", requires = "backfill")]
    batch_size: u64,
    /// The pause after each batch of the backfill, in milliseconds.
    #[arg(long, value_name = "MS", value_parser = millis, default_value = "30",
        requires = "backfill")]
    batch_pause_ms: Duration,
    /// SQLite: the file with the backfill's tables.
    #[arg(long, value_name = "PATH", requires = "backfill")]
    backfill_db: Option<PathBuf>,
    /// Negative control: each attempt of the backfill starts from its first
    /// row, whatever its checkpoint says.
    #[arg(long, requires = "backfill")]
    backfill_ignores_checkpoint: bool,
}

fn task_count(s: &str) -> Result<(String, u32), String> {
    s.split_once(':')
        .and_then(|(v, n)| Some((v.to_owned(), n.parse().ok()?)))
        .ok_or_else(|| "expected VERSION:COUNT, such as 1.1:3".to_owned())
}

fn millis(s: &str) -> Result<Duration, String> {
    s.parse()
        .map(Duration::from_millis)
        .map_err(|_| "expected a duration in whole milliseconds".to_owned())
}

/// Where the audit rows go: the same database as the store.
enum Sink {
    Sqlite(PathBuf),
    Postgres(tokio_postgres::Client),
}

const AUDIT_PG: &str =
    "CREATE TABLE IF NOT EXISTS audit (id BIGSERIAL PRIMARY KEY, task TEXT NOT NULL,
    version TEXT NOT NULL, node TEXT NOT NULL, fence BIGINT NOT NULL,
    started_ms BIGINT NOT NULL, finished_ms BIGINT)";
const NOW_MS_PG: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// The `audit` table of the store's database.
struct AuditTable {
    sink: Sink,
}

fn open(db: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(db)?;
    c.busy_timeout(Duration::from_secs(10))?;
    Ok(c)
}

impl AuditTable {
    async fn for_url(url: &str) -> anyhow::Result<AuditTable> {
        let sink = match url.split_once("://") {
            Some(("postgres" | "postgresql", _)) => {
                let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                client.batch_execute(AUDIT_PG).await.or_else(|e| {
                    // Two nodes creating the table at once: one loses the race.
                    if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })?;
                Sink::Postgres(client)
            }
            Some(("sqlite", path)) => {
                let path = PathBuf::from(path);
                open(&path)?.execute_batch(
                    "CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY, task TEXT NOT NULL,
                     version TEXT NOT NULL, node TEXT NOT NULL, fence INTEGER NOT NULL,
                     started_ms INTEGER NOT NULL, finished_ms INTEGER)",
                )?;
                Sink::Sqlite(path)
            }
            _ => bail!("no audit table for {url:?}"),
        };
        Ok(AuditTable { sink })
    }

    /// Records the start of a run; returns its row id.
    async fn start(&self, ctx: &TaskContext) -> anyhow::Result<i64> {
        match &self.sink {
            Sink::Sqlite(path) => Ok(open(path)?.query_row(
                "INSERT INTO audit (task, version, node, fence, started_ms)
                 VALUES (?1, ?2, ?3, ?4, CAST(unixepoch('subsec') * 1000 AS INTEGER)) RETURNING id",
                rusqlite::params![
                    ctx.task().id,
                    ctx.task().version.to_string(),
                    ctx.holder().pod.clone().unwrap_or_default(),
                    ctx.fence() as i64
                ],
                |r| r.get(0),
            )?),
            Sink::Postgres(client) => Ok(client
                .query_one(
                    &format!(
                        "INSERT INTO audit (task, version, node, fence, started_ms)
                         VALUES ($1, $2, $3, $4, {NOW_MS_PG}) RETURNING id"
                    ),
                    &[
                        &ctx.task().id,
                        &ctx.task().version.to_string(),
                        &ctx.holder().pod.clone().unwrap_or_default(),
                        &(ctx.fence() as i64),
                    ],
                )
                .await?
                .get(0)),
        }
    }

    /// Records the end of run `row`.
    async fn finish(&self, row: i64) -> anyhow::Result<()> {
        match &self.sink {
            Sink::Sqlite(path) => {
                open(path)?.execute(
                    "UPDATE audit SET finished_ms = CAST(unixepoch('subsec') * 1000 AS INTEGER) WHERE id = ?1",
                    [row],
                )?;
            }
            Sink::Postgres(client) => {
                client
                    .execute(
                        &format!("UPDATE audit SET finished_ms = {NOW_MS_PG} WHERE id = $1"),
                        &[&row],
                    )
                    .await?;
            }
        }
        Ok(())
    }
}

/// What the task bodies share: where they record, how long they run,
/// whether they fail.
struct Tasks {
    table: Option<AuditTable>,
    log: Option<Arc<AuditLog>>,
    task: Duration,
    fail: Option<(String, PathBuf)>,
    backfill: Option<Backfill>,
}

impl Tasks {
    fn fails(&self, ctx: &TaskContext) -> bool {
        !ctx.task().rollback
            && self
                .fail
                .as_ref()
                .is_some_and(|(id, marker)| *id == ctx.task().id && marker.exists())
    }
}

/// One run of task code in the audit log, from its start until it stops.
/// Written on drop too, so that a run the runner cancels (by dropping its
/// future) records when it stopped.
struct RunRecord {
    log: Arc<AuditLog>,
    seq: u64,
    token: CancellationToken,
    /// When the watcher saw the token fire; 0 until then.
    cancelled_at: Arc<AtomicI64>,
    watcher: tokio::task::JoinHandle<()>,
    ended: bool,
}

impl RunRecord {
    fn start(log: &Arc<AuditLog>, ctx: &TaskContext) -> RunRecord {
        let seq = log.next_seq();
        let token = ctx.cancellation().clone();
        let cancelled_at = Arc::new(AtomicI64::new(0));
        let watcher = {
            let (token, at) = (token.clone(), cancelled_at.clone());
            tokio::spawn(async move {
                token.cancelled().await;
                at.store(now_us(), Ordering::SeqCst);
            })
        };
        log.write(&Record::Run {
            seq,
            task: ctx.task().id.clone(),
            version: ctx.task().version.to_string(),
            rollback: ctx.task().rollback,
            fence: ctx.fence(),
            attempt: ctx.task().attempt,
            at: now_us(),
        });
        RunRecord {
            log: log.clone(),
            seq,
            token,
            cancelled_at,
            watcher,
            ended: false,
        }
    }

    fn end(&mut self, how: Ended) {
        if self.ended {
            return;
        }
        self.ended = true;
        let at = now_us();
        let seen = self.cancelled_at.load(Ordering::SeqCst);
        let cancelled_at = if seen != 0 {
            Some(seen)
        } else {
            // Fired, and the watcher has not run yet: it is seen now.
            self.token.is_cancelled().then_some(at)
        };
        self.watcher.abort();
        self.log.write(&Record::End {
            seq: self.seq,
            at,
            cancelled_at,
            how,
        });
    }
}

impl Drop for RunRecord {
    fn drop(&mut self) {
        self.end(Ended::Dropped);
    }
}

/// The body of every task and rollback.
fn body(ctx: &mut TaskContext) -> TaskFuture<'_> {
    Box::pin(async move {
        let tasks = ctx.resource::<Tasks>()?;
        if let (Some(backfill), Some(log)) = (&tasks.backfill, &tasks.log) {
            if ctx.task().id == "t1" && !ctx.task().rollback {
                let mut run = RunRecord::start(log, ctx);
                let r = backfill.run(ctx).await;
                run.end(if r.is_ok() {
                    Ended::Returned
                } else {
                    Ended::Failed
                });
                return r;
            }
        }
        if let Some(log) = &tasks.log {
            let mut run = RunRecord::start(log, ctx);
            tokio::time::sleep(tasks.task).await;
            if tasks.fails(ctx) {
                run.end(Ended::Failed);
                return Err(format!("{} fails while its marker file exists", ctx.task().id).into());
            }
            run.end(Ended::Returned);
            return Ok(());
        }
        let table = tasks.table.as_ref().expect("an audit table or a log");
        let row = table.start(ctx).await?;
        tokio::time::sleep(tasks.task).await;
        table.finish(row).await?;
        if tasks.fails(ctx) {
            return Err(format!("{} fails while its marker file exists", ctx.task().id).into());
        }
        Ok(())
    })
}

fn audit_task(version: &str, n: u32, rollback: bool) -> anyhow::Result<Task> {
    let task = Task::new(version, n, &format!("t{n}"), body)?;
    Ok(if rollback {
        task.with_rollback(body)
    } else {
        task
    })
}

/// The store of `--url` (with the SQLite clock options), and the lock of
/// `--lock-url`, or of `--url` without it.
async fn backend(args: &Args) -> anyhow::Result<(Arc<dyn Lock>, Arc<dyn Store>)> {
    let sqlite = |url: &str| url.starts_with("sqlite:");
    if (args.wall_clock_offset.is_some() || args.judge_expiry_by_wall_clock)
        && !sqlite(&args.url)
        && !args.lock_url.as_deref().is_some_and(sqlite)
    {
        bail!("--wall-clock-offset and --judge-expiry-by-wall-clock are for SQLite");
    }
    let store = open_backend(args, &args.url).await?;
    let lock: Arc<dyn Lock> = match &args.lock_url {
        Some(url) => open_backend(args, url).await?,
        None => store.clone(),
    };
    Ok((lock, store))
}

async fn open_backend(args: &Args, url: &str) -> anyhow::Result<Arc<dyn Backend>> {
    let sqlite = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"));
    let Some(path) = sqlite else {
        return Ok(upsilon_backends::connect(url).await?);
    };
    let mut options = SqliteOptions {
        judge_expiry_by_wall_clock: args.judge_expiry_by_wall_clock,
        ..SqliteOptions::default()
    };
    if let Some(file) = &args.wall_clock_offset {
        options.clock = Arc::new(SteppedWallClock {
            offset_file: file.clone(),
        });
    }
    Ok(Arc::new(SqliteBackend::open_with(path, options).await?))
}

/// Exit codes.
const READY: u8 = 0;
const FAILED: u8 = 1;
const STOPPED: u8 = 3;

async fn node(args: Args, log: Option<Arc<AuditLog>>) -> anyhow::Result<u8> {
    let table = match &log {
        Some(_) => None,
        None => Some(AuditTable::for_url(&args.url).await?),
    };
    let mut tasks = Vec::new();
    let mut order = 0;
    for (version, count) in &args.tasks {
        for _ in 0..*count {
            order += 1;
            tasks.push(audit_task(version, order, args.rollbacks)?);
        }
    }
    let holder = Holder {
        pod: Some(args.name.clone()),
        ..Holder::current()
    };
    let (lock, store) = backend(&args).await?;
    let backfill = match args.backfill {
        Some(rows) => Some(Backfill {
            target: match &args.backfill_db {
                Some(path) => backfill::Target::Sqlite(path.clone()),
                None => backfill::Target::Postgres(
                    upsilon_backends::postgres::PostgresBackend::connect_url(&args.url).await?,
                ),
            },
            batch: args.batch_size,
            pause: args.batch_pause_ms,
            rows,
            ignore_checkpoint: args.backfill_ignores_checkpoint,
            node: args.name.clone(),
        }),
        None => None,
    };
    let backend = Watched {
        lock,
        store,
        log: log.clone(),
        holder: holder.clone(),
        loss_signal: !args.no_loss_signal,
    };
    let mut builder = Upsilon::builder()
        .service("cluster")
        .app_version(&args.app_version)
        .backend(Arc::new(backend))
        .holder(holder)
        .tasks(tasks)
        .tasks_above_app(AboveAppPolicy::Ignore)
        .ttl(args.ttl_ms)
        .poll_interval(Duration::from_millis(50))
        .rollback_on_failure(args.rollbacks)
        .resource(Tasks {
            table,
            log,
            task: args.task_ms,
            fail: args.fail_task.clone().zip(args.fail_while.clone()),
            backfill,
        });
    if let Some(margin) = args.margin_ms {
        builder = builder.safety_margin(margin);
    }
    if args.no_wait_out {
        #[cfg(feature = "negative-controls")]
        {
            builder = builder.skip_waiting_out_a_forgetful_lock();
        }
        #[cfg(not(feature = "negative-controls"))]
        bail!("--no-wait-out needs the node built with the feature negative-controls");
    }
    let upsilon = builder.build()?;
    match upsilon.run_until(upsilon::shutdown_signal()).await {
        Ok(outcome) => {
            let kind = match &outcome {
                Outcome::Upgraded { .. } => "upgraded",
                Outcome::WaitedForOther { .. } => "waited",
                Outcome::FoundUpToDate { .. } => "found-up-to-date",
                _ => "up-to-date",
            };
            println!("{} {kind}: {outcome}", args.name);
            Ok(READY)
        }
        Err(e @ Error::Stopped { .. }) => {
            eprintln!("{} stopped: {e}", args.name);
            Ok(STOPPED)
        }
        Err(e) => Err(e).context(format!("{} not ready", args.name)),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse();
    let log = match &args.audit_dir {
        Some(dir) => match AuditLog::create(dir, &args.name) {
            Ok(log) => Some(Arc::new(log)),
            Err(e) => {
                eprintln!("cannot create the audit log in {}: {e}", dir.display());
                return ExitCode::from(FAILED);
            }
        },
        None => None,
    };
    let code = match node(args, log.clone()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e:#}");
            FAILED
        }
    };
    if let Some(log) = &log {
        log.write(&Record::Exit {
            at: now_us(),
            code: code.into(),
        });
    }
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_flags_are_well_formed() {
        <super::Args as clap::CommandFactory>::command().debug_assert();
    }
}
