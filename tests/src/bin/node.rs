//! A cluster node for the multi-process tests: runs Upsilon with generated
//! tasks against a backend URL, and records every task run in an `audit`
//! table of the same database (task, node, fence, start, end), so a checker
//! can tell which node did what under which fence.
//!
//! ```text
//! node --url sqlite:///PATH --name NAME --app-version 1.1 --tasks 1.0:2,1.1:3 [--task-ms 50] [--ttl-ms 2000]
//! ```
//! Exit code 0 when the node became READY, 1 otherwise (the error on
//! stderr), 2 for bad flags (clap's message on stderr); `--help` lists them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgAction, Parser};
use rusqlite::Connection;
use upsilon::{AboveAppPolicy, Holder, Outcome, Task, TaskContext, TaskFuture, Upsilon};

/// A cluster node for the multi-process tests: runs Upsilon with generated
/// tasks, each recording its runs in an `audit` table of the store's
/// database. Exits 0 once READY.
#[derive(Debug, Parser)]
#[command(name = "node", args_override_self = true)]
struct Args {
    /// The store: sqlite:///PATH or postgres://...; the audit table goes
    /// in the same database.
    #[arg(long)]
    url: String,
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
    /// How long each task runs, in milliseconds.
    #[arg(long, value_name = "MS", value_parser = millis, allow_negative_numbers = true,
        default_value = "50")]
    task_ms: Duration,
    /// The lease TTL, in milliseconds.
    #[arg(long, value_name = "MS", value_parser = millis, allow_negative_numbers = true,
        default_value = "2000")]
    ttl_ms: Duration,
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

struct Audit {
    sink: Sink,
    task: Duration,
}

fn open(db: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(db)?;
    c.busy_timeout(Duration::from_secs(10))?;
    Ok(c)
}

impl Audit {
    async fn for_url(url: &str, task: Duration) -> anyhow::Result<Audit> {
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
        Ok(Audit { sink, task })
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

fn audit_task(version: &str, n: u32) -> anyhow::Result<Task> {
    let id = format!("t{n}");
    Ok(Task::new(
        version,
        n,
        &id,
        |ctx: &mut TaskContext| -> TaskFuture<'_> {
            Box::pin(async move {
                let audit = ctx.resource::<Audit>()?;
                let row = audit.start(ctx).await?;
                tokio::time::sleep(audit.task).await;
                audit.finish(row).await?;
                Ok(())
            })
        },
    )?)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let audit = Audit::for_url(&args.url, args.task_ms).await?;
    let mut tasks = Vec::new();
    let mut order = 0;
    for (version, count) in &args.tasks {
        for _ in 0..*count {
            order += 1;
            tasks.push(audit_task(version, order)?);
        }
    }
    let upsilon = Upsilon::builder()
        .service("cluster")
        .app_version(&args.app_version)
        .backend(upsilon_backends::connect(&args.url).await?)
        .holder(Holder {
            pod: Some(args.name.clone()),
            ..Holder::current()
        })
        .tasks(tasks)
        .tasks_above_app(AboveAppPolicy::Ignore)
        .ttl(args.ttl_ms)
        .poll_interval(Duration::from_millis(50))
        .resource(audit)
        .build()?;
    match upsilon.run().await {
        Ok(outcome) => {
            let kind = match &outcome {
                Outcome::Upgraded { .. } => "upgraded",
                Outcome::WaitedForOther { .. } => "waited",
                _ => "up-to-date",
            };
            println!("{} {kind}: {outcome}", args.name);
            Ok(())
        }
        Err(e) => Err(e).context(format!("{} not ready", args.name)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_flags_are_well_formed() {
        <super::Args as clap::CommandFactory>::command().debug_assert();
    }
}
