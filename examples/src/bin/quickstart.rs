//! Quickstart: three nodes, as three processes, roll a service from 1.0 to
//! 1.1 on a fresh SQLite file. One node (the canary) runs each version's
//! tasks; the others wait and become READY without doing the work.
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
use upsilon::{AboveAppPolicy, Outcome, TaskContext, Upsilon};
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

/// Backfills the normalised emails in batches, reporting progress.
#[upsilon::task(version = "1.1", order = 2)]
async fn backfill_email_normalized(ctx: &mut TaskContext) -> anyhow::Result<()> {
    let conn = ctx.resource::<AppDb>()?.open()?;
    let total: u64 = conn.query_row("SELECT COUNT(*) FROM accounts", [], |r| r.get(0))?;
    let mut done = 0;
    loop {
        let n = conn.execute(
            "UPDATE accounts SET email_normalized = lower(trim(email))
             WHERE id IN (SELECT id FROM accounts WHERE email_normalized IS NULL LIMIT 500)",
            [],
        )?;
        if n == 0 {
            break;
        }
        done += n as u64;
        ctx.progress(done, total, "rows backfilled");
        // Leave room for the other nodes to show that they wait.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
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

/// One node: runs Upsilon at `version` and prints what it did.
async fn node(db: &Path, version: &str, name: &str) -> anyhow::Result<()> {
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
    match upsilon.run().await {
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
async fn roll(db: &Path, version: &str) -> anyhow::Result<()> {
    println!("\n== rolling out {version} to three nodes ==");
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for n in 1..=3 {
        let name = format!("node-{n}@{version}");
        let mut child = tokio::process::Command::new(&exe)
            .args(["node", &db.display().to_string(), version, &name])
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
    roll(&db, "1.0").await?;
    roll(&db, "1.1").await?;

    let backend = SqliteBackend::open(&db).await?;
    let history = backend.history(SERVICE).await?;
    println!("\n== history: one row per task attempt ==");
    for row in &history {
        println!(
            "  {:<34} {:<10} fence {}  by {}",
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

    let mut ids: Vec<_> = history.iter().map(|r| r.key.to_string()).collect();
    ids.sort();
    ids.dedup();
    if history.len() != 5 || ids.len() != 5 {
        bail!(
            "expected each of the 5 tasks to run exactly once, history has {} rows",
            history.len()
        );
    }
    if data_version.as_deref() != Some("1.1.0") || backfilled != 3000 {
        bail!("the upgrade did not complete");
    }
    println!("\nEach task ran exactly once, on one node; the other nodes skipped the work.");
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
        Some("node") if args.len() == 5 => node(Path::new(&args[2]), &args[3], &args[4]).await,
        None => main_flow().await,
        _ => bail!("usage: quickstart  (or, internally: quickstart node DB VERSION NAME)"),
    }
}
