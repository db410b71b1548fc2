//! Quickstart: three nodes, as three processes, roll a service from 1.0 to
//! 1.1 on a fresh SQLite file. One node (the canary) runs each version's
//! tasks; the others wait and become READY without doing the work. The first
//! node to start 1.1 is stopped part-way through its backfill; the next one
//! resumes from the backfill's checkpoint instead of starting over.
//!
//! ```text
//! cargo run -p upsilon-examples --bin quickstart
//! ```

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rusqlite::Connection;
use tokio::io::{AsyncBufReadExt, BufReader};
use upsilon::backend::Store;
use upsilon::{
    AboveAppPolicy, BatchDone, BatchPosition, Error, Outcome, Status, TaskContext, Upsilon,
};
use upsilon_backends::sqlite::SqliteBackend;

/// Where the app keeps its own data: the same file as Upsilon's tables.
struct AppDb(PathBuf);

impl AppDb {
    fn open(&self) -> rusqlite::Result<Connection> {
        let c = Connection::open(&self.0)?;
        c.busy_timeout(Duration::from_secs(10))?;
        Ok(c)
    }
}

/// Creates the accounts table.
#[upsilon::task(version = "1.0", order = 1)]
async fn create_accounts(ctx: &mut TaskContext) -> anyhow::Result<()> {
    let conn = ctx.resource::<AppDb>()?.open()?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS accounts (id INTEGER PRIMARY KEY, email TEXT NOT NULL)",
    )?;
    Ok(())
}

/// Seeds the accounts that version 1.0 ships with.
#[upsilon::task(version = "1.0", order = 2)]
async fn seed_accounts(ctx: &mut TaskContext) -> anyhow::Result<()> {
    let conn = ctx.resource::<AppDb>()?.open()?;
    let tx = conn.unchecked_transaction()?;
    for i in 1..=3000 {
        tx.execute(
            "INSERT OR IGNORE INTO accounts (id, email) VALUES (?1, ?2)",
            rusqlite::params![i, format!("  User{i}@Example.COM ")],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// Adds the normalised email column that 1.1 reads.
#[upsilon::task(version = "1.1", order = 1)]
async fn add_email_normalized(ctx: &mut TaskContext) -> anyhow::Result<()> {
    let conn = ctx.resource::<AppDb>()?.open()?;
    let has: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('accounts') WHERE name = 'email_normalized'")?
        .exists([])?;
    if !has {
        conn.execute_batch("ALTER TABLE accounts ADD COLUMN email_normalized TEXT")?;
    }
    Ok(())
}

/// Backfills the normalised emails in batches of 500 ids, paced, with a
/// checkpoint after each batch: an attempt that is stopped or dies resumes
/// after the last batch it saved.
#[upsilon::task(version = "1.1", order = 2)]
async fn backfill_email_normalized(ctx: &mut TaskContext) -> anyhow::Result<()> {
    let db = ctx.resource::<AppDb>()?;
    let total: u64 = db
        .open()?
        .query_row("SELECT COUNT(*) FROM accounts", [], |r| r.get(0))?;
    if let Some(from) = ctx.checkpoint::<BatchPosition<i64>>()? {
        println!(
            "backfill: resuming after account {} ({} rows done by an earlier attempt)",
            from.last, from.rows
        );
    }
    let done = ctx
        .batches::<i64>()
        .size(500)
        .total(total)
        // Leave room for the other nodes to show that they wait.
        .pause(Duration::from_millis(150))
        .run(async |batch| {
            let mut conn = db.open()?;
            // Write-locked from the start: a read lock upgraded later can
            // fail at once while other nodes read the file.
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let (last, rows): (Option<i64>, u64) = tx.query_row(
                "SELECT max(id), count(*) FROM
                   (SELECT id FROM accounts WHERE id > ?1 ORDER BY id LIMIT ?2)",
                rusqlite::params![batch.after.unwrap_or(0), batch.size],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let Some(last) = last else {
                return Ok(BatchDone::end());
            };
            // Idempotent: a batch done again after a crash writes the same.
            tx.execute(
                "UPDATE accounts SET email_normalized = lower(trim(email))
                 WHERE id > ?1 AND id <= ?2",
                rusqlite::params![batch.after.unwrap_or(0), last],
            )?;
            tx.commit()?;
            Ok(BatchDone::next(last, rows))
        })
        .await?;
    println!(
        "backfill: {} rows in all, {} batches in this attempt",
        done.rows, done.batches
    );
    Ok(())
}

/// Checks that every account has a normalised email.
#[upsilon::task(version = "1.1", order = 3, id = "check-email-normalized")]
async fn check(ctx: &mut TaskContext) -> anyhow::Result<()> {
    let conn = ctx.resource::<AppDb>()?.open()?;
    let missing: i64 = conn.query_row(
        "SELECT COUNT(*) FROM accounts WHERE email_normalized IS NULL OR email_normalized != lower(trim(email))",
        [],
        |r| r.get(0),
    )?;
    if missing > 0 {
        bail!("{missing} accounts have no normalised email");
    }
    Ok(())
}

const SERVICE: &str = "quickstart";

/// One node: runs Upsilon at `version` and prints what it did. With
/// `stop_after`, the node is stopped (as by SIGTERM) once the running task's
/// checkpoint records that many rows done.
async fn node(db: &Path, version: &str, name: &str, stop_after: Option<u64>) -> anyhow::Result<()> {
    let backend = Arc::new(SqliteBackend::open(db).await?);
    let upsilon = Upsilon::builder()
        .service(SERVICE)
        .app_version(version)
        .backend(backend)
        .resource(AppDb(db.to_path_buf()))
        .poll_interval(Duration::from_millis(100))
        // One binary plays both versions here, so 1.1's tasks are known to the 1.0 nodes.
        .tasks_above_app(AboveAppPolicy::Ignore)
        .build()?;
    let started = Instant::now();
    let probe = upsilon.probe();
    let stop = async move {
        let Some(rows) = stop_after else {
            return std::future::pending().await;
        };
        loop {
            if let Status::Upgrading {
                checkpoint: Some(c),
                ..
            } = probe.status()
            {
                if c.done >= Some(rows) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    match upsilon.run_until(stop).await {
        Err(Error::Stopped { .. }) => {
            let backend = SqliteBackend::open(db).await?;
            let snap = backend.load(SERVICE).await?;
            let at = snap
                .tasks
                .values()
                .filter_map(|t| t.checkpoint.as_ref())
                .filter_map(|c| c.done)
                .max()
                .unwrap_or(0);
            println!("{name}: stopped part-way: the backfill's checkpoint is at {at} rows");
        }
        Ok(Outcome::Upgraded { report }) => {
            for t in &report.completed {
                println!("{name}: ran {} in {:?}", t.key, t.duration);
            }
            println!(
                "{name}: READY at {} after upgrading the data ({:.0?})",
                version,
                started.elapsed()
            );
        }
        Ok(Outcome::WaitedForOther { holder, waited, .. }) => println!(
            "{name}: waited {waited:.0?} for {}, then READY at {version} without running a task",
            holder.map(|h| h.pod.unwrap_or(h.host)).unwrap_or_default()
        ),
        Ok(outcome) => println!("{name}: READY at {version}: {outcome}"),
        Err(e) => return Err(e).context(format!("{name}: not ready")),
    }
    Ok(())
}

/// Starts three node processes at `version` and waits for them all.
async fn roll(
    db: &Path,
    version: &str,
    nodes: usize,
    stop_after: Option<u64>,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for n in 1..=nodes {
        let name = format!("node-{n}@{version}");
        let stop = stop_after.map_or_else(String::new, |r| r.to_string());
        let mut child = tokio::process::Command::new(&exe)
            .args(["node", &db.display().to_string(), version, &name, &stop])
            .env("POD_NAME", &name)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a node process")?;
        let stdout = child.stdout.take().context("node stdout")?;
        let printer = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                println!("  {line}");
            }
        });
        children.push((name, child, printer));
    }
    let mut failed = Vec::new();
    for (name, mut child, printer) in children {
        let status = child.wait().await?;
        printer.await?;
        if !status.success() {
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        bail!("nodes {failed:?} did not become ready");
    }
    Ok(())
}

async fn main_flow() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("app.db");
    println!(
        "Upsilon quickstart: service `{SERVICE}` on {}",
        db.display()
    );
    println!("\n== rolling out 1.0 to three nodes ==");
    roll(&db, "1.0", 3, None).await?;
    println!("\n== the first node of 1.1 starts, and is stopped part-way through the backfill ==");
    roll(&db, "1.1", 1, Some(1000)).await?;
    println!("\n== rolling out 1.1 to three nodes ==");
    roll(&db, "1.1", 3, None).await?;

    let backend = SqliteBackend::open(&db).await?;
    let history = backend.history(SERVICE).await?;
    println!("\n== history: one row per task attempt ==");
    for row in &history {
        let reached = row
            .checkpoint
            .as_ref()
            .and_then(|c| c.done)
            .map(|d| format!("  checkpoint at {d} rows"))
            .unwrap_or_default();
        println!(
            "  {:<34} {:<10} fence {}  by {}{reached}",
            row.key.to_string(),
            row.state.as_str(),
            row.fence,
            row.holder.pod.as_deref().unwrap_or(&row.holder.host)
        );
    }
    let snapshot = backend.load(SERVICE).await?;
    let data_version = snapshot.data_version.map(|v| v.to_string());
    println!(
        "\ndata version: {}",
        data_version.as_deref().unwrap_or("none")
    );
    let conn = Connection::open(&db)?;
    let backfilled: i64 = conn.query_row(
        "SELECT COUNT(*) FROM accounts WHERE email_normalized IS NOT NULL",
        [],
        |r| r.get(0),
    )?;
    println!("accounts with a normalised email: {backfilled}");

    let mut completed: Vec<_> = history
        .iter()
        .filter(|r| r.state == upsilon::backend::AttemptState::Completed)
        .map(|r| r.key.to_string())
        .collect();
    completed.sort();
    let all = completed.len();
    completed.dedup();
    if all != 5 || completed.len() != 5 {
        bail!("expected each of the 5 tasks to complete exactly once, the history has {all} completions");
    }
    if data_version.as_deref() != Some("1.1.0") || backfilled != 3000 {
        bail!("the upgrade did not complete");
    }
    println!(
        "\nEach task completed exactly once, on one node; the other nodes skipped the work, \
         and the stopped backfill resumed from its checkpoint."
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("node") if args.len() == 6 => {
            let stop_after = Some(&args[5]).filter(|a| !a.is_empty());
            let stop_after = stop_after.map(|a| a.parse()).transpose()?;
            node(Path::new(&args[2]), &args[3], &args[4], stop_after).await
        }
        None => main_flow().await,
        _ => {
            bail!("usage: quickstart  (or, internally: quickstart node DB VERSION NAME STOP_AFTER)")
        }
    }
}
