//! What every scenario shares: the server, the tasks and migrations that
//! stand for a service's upgrade work, and ways to connect.

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgSslMode};
use sqlx::{AssertSqlSafe, ConnectOptions as _, SqlSafeStr as _};
use upsilon::backend::Backend;
use upsilon::{AboveAppPolicy, Outcome, Task, TaskContext, TaskFuture, Upsilon};
use upsilon_backends::postgres::{PostgresBackend, PostgresOptions};
use upsilon_test_servers::Postgres;

/// The role the waiting nodes of the store-load scenario connect as, so that
/// `pg_stat_statements` tells their statements from everyone else's.
pub const WAITER_ROLE: &str = "bench_waiter";
/// The role of the statement-cost probe of scenario 1.
pub const PROBE_ROLE: &str = "bench_probe";
const PASSWORD: &str = "bench-pw";

/// The service's schema migrations for sqlx, the same files a user would
/// keep in `migrations/`: five migrations, seven statements.
const MIGRATIONS: [(i64, &str, &str); 5] = [
    (
        20240101000001,
        "accounts",
        include_str!("../migrations/20240101000001_accounts.sql"),
    ),
    (
        20240101000002,
        "orders",
        include_str!("../migrations/20240101000002_orders.sql"),
    ),
    (
        20240101000003,
        "account names",
        include_str!("../migrations/20240101000003_account_names.sql"),
    ),
    (
        20240101000004,
        "invoices",
        include_str!("../migrations/20240101000004_invoices.sql"),
    ),
    (
        20240101000005,
        "seed",
        include_str!("../migrations/20240101000005_seed.sql"),
    ),
];

/// The version of the migration that stands for the new release's slow work.
const SLOW_VERSION: i64 = 20240201000000;

/// An advisory lock key the benchmark holds while nodes line up, so that a
/// gated slow migration starts its sleep only once every node waits.
pub const GATE: i64 = 0x6265_6e63_6867_6174;

/// The PostgreSQL server of the run, and a connection to watch it with.
pub struct Env {
    pub pg: Postgres,
    pub url: String,
    pub admin: tokio_postgres::Client,
    pub dir: tempfile::TempDir,
}

impl Env {
    /// Starts a server with room for `max_connections` and
    /// `pg_stat_statements`, creates the waiters' role and Upsilon's tables.
    pub async fn start(max_connections: u32) -> anyhow::Result<Env> {
        let pg = tokio::task::spawn_blocking(move || {
            Postgres::builder()
                .max_connections(max_connections)
                .setting("shared_preload_libraries", "pg_stat_statements")
                .start()
        })
        .await?;
        let url = pg.url();
        let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        // Statements are tracked only for the two roles that are counted,
        // so that tracking costs nothing elsewhere.
        admin
            .batch_execute("ALTER SYSTEM SET pg_stat_statements.track = 'none'")
            .await?;
        admin.batch_execute("SELECT pg_reload_conf()").await?;
        admin
            .batch_execute(&format!(
                "CREATE EXTENSION pg_stat_statements;
                 CREATE ROLE {WAITER_ROLE} LOGIN SUPERUSER PASSWORD '{PASSWORD}';
                 ALTER ROLE {WAITER_ROLE} SET pg_stat_statements.track = 'top';
                 CREATE ROLE {PROBE_ROLE} LOGIN SUPERUSER PASSWORD '{PASSWORD}';
                 ALTER ROLE {PROBE_ROLE} SET pg_stat_statements.track = 'top';
                 ALTER ROLE {PROBE_ROLE} SET pg_stat_statements.track_planning = on;"
            ))
            .await?;
        // Creates Upsilon's tables once, so that no scenario times it.
        PostgresBackend::connect_url(&url).await?;
        Ok(Env {
            pg,
            url,
            admin,
            dir: tempfile::tempdir()?,
        })
    }

    /// The URL of the waiters' role on `port` (the server's, or a proxy's).
    pub fn waiter_url(&self, port: u16) -> String {
        format!("postgres://{WAITER_ROLE}:{PASSWORD}@127.0.0.1:{port}/postgres")
    }

    /// The URL of the probe's role.
    pub fn probe_url(&self) -> String {
        format!(
            "postgres://{PROBE_ROLE}:{PASSWORD}@127.0.0.1:{}/postgres",
            self.pg.port()
        )
    }

    pub async fn reset_statements(&self) -> anyhow::Result<()> {
        self.admin
            .batch_execute("SELECT pg_stat_statements_reset()")
            .await?;
        Ok(())
    }

    /// What `role` ran since the last reset, per statement (its first 70
    /// characters): calls, mean planning and execution ms on the server.
    pub async fn statements(&self, role: &str) -> anyhow::Result<Vec<Statement>> {
        let rows = self
            .admin
            .query(
                "SELECT s.query, s.calls, s.mean_plan_time, s.mean_exec_time
                 FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
                 WHERE r.rolname = $1 ORDER BY s.calls DESC, s.query",
                &[&role],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Statement {
                text: r
                    .get::<_, String>(0)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .chars()
                    .take(70)
                    .collect(),
                calls: r.get(1),
                plan_ms: r.get(2),
                exec_ms: r.get(3),
            })
            .collect())
    }

    pub async fn server_version(&self) -> String {
        match self.admin.query_one("SHOW server_version", &[]).await {
            Ok(row) => row.get(0),
            Err(_) => "unknown".to_owned(),
        }
    }

    /// A schema with the migrations of [`MIGRATIONS`] applied by sqlx.
    pub async fn sqlx_schema(&self, schema: &str) -> anyhow::Result<()> {
        self.admin
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await?;
        let mut conn = sqlx_connect(&self.url, Some(schema)).await?;
        migrator(None).run(&mut conn).await?;
        Ok(())
    }
}

/// One statement's counts from `pg_stat_statements`.
#[derive(Debug, Clone)]
pub struct Statement {
    pub text: String,
    pub calls: i64,
    pub plan_ms: f64,
    pub exec_ms: f64,
}

impl Statement {
    pub fn json(list: &[Statement]) -> serde_json::Value {
        serde_json::Value::Array(
            list.iter()
                .map(|s| {
                    serde_json::json!({
                        "statement": s.text, "calls": s.calls,
                        "mean_plan_ms": s.plan_ms, "mean_exec_ms": s.exec_ms,
                    })
                })
                .collect(),
        )
    }
}

/// A node's backend: its own pool of `pool_size` connections (and, once it
/// waits or holds the lease, its own listening session).
pub async fn pg_node(
    url: &str,
    pool_size: usize,
    holder_check: Option<Duration>,
) -> anyhow::Result<Arc<dyn Backend>> {
    let mut options = PostgresOptions::from_url(url)?.pool_size(pool_size);
    if let Some(every) = holder_check {
        options = options.holder_check_every(every);
    }
    Ok(Arc::new(PostgresBackend::connect(options).await?))
}

/// A sqlx connection (no TLS, as Upsilon's), with `search_path` set to
/// `schema` in the start-up packet when given.
pub async fn sqlx_connect(url: &str, schema: Option<&str>) -> anyhow::Result<PgConnection> {
    sqlx_connect_with(url, schema, &[]).await
}

/// [`sqlx_connect`] with other session settings in the start-up packet.
pub async fn sqlx_connect_with(
    url: &str,
    schema: Option<&str>,
    settings: &[(&str, &str)],
) -> anyhow::Result<PgConnection> {
    let mut options = PgConnectOptions::from_str(url)?.ssl_mode(PgSslMode::Disable);
    if let Some(s) = schema {
        options = options.options([("search_path", s)]);
    }
    if !settings.is_empty() {
        options = options.options(settings.iter().copied());
    }
    Ok(options.connect().await?)
}

/// sqlx's migrator over [`MIGRATIONS`], plus a migration that sleeps for
/// `slow` (the new release's work) when given.
pub fn migrator(slow: Option<Duration>) -> Migrator {
    migrator_with(slow, false)
}

/// [`migrator`] whose slow migration first waits for the [`GATE`] lock to
/// be free.
pub fn gated_migrator(slow: Duration) -> Migrator {
    migrator_with(Some(slow), true)
}

fn migrator_with(slow: Option<Duration>, gated: bool) -> Migrator {
    let mut all: Vec<Migration> = MIGRATIONS
        .iter()
        .map(|(version, name, sql)| {
            Migration::new(
                *version,
                Cow::Borrowed(*name),
                MigrationType::Simple,
                sql.into_sql_str(),
                false,
            )
        })
        .collect();
    if let Some(d) = slow {
        all.push(Migration::new(
            SLOW_VERSION,
            Cow::Borrowed("slow"),
            MigrationType::Simple,
            AssertSqlSafe(format!(
                "{}SELECT pg_sleep({})",
                if gated {
                    format!("SELECT pg_advisory_xact_lock_shared({GATE}); ")
                } else {
                    String::new()
                },
                d.as_secs_f64()
            ))
            .into_sql_str(),
            false,
        ));
    }
    Migrator::with_migrations(all)
}

/// `migrator.run(conn)` in a spawned task: what `Migrator::run` does once it
/// has the connection. Called through `run` there, the compiler cannot prove
/// the future `Send` for every lifetime (sqlx's own note on `run_direct`).
pub async fn sqlx_migrate(
    migrator: &Migrator,
    conn: &mut PgConnection,
) -> Result<(), sqlx::migrate::MigrateError> {
    migrator.run_direct(None, conn, false).await
}

/// A task that does nothing.
pub fn noop(version: &str, order: u32, id: &str) -> Task {
    Task::new(
        version,
        order,
        id,
        |_ctx: &mut TaskContext| -> TaskFuture<'_> { Box::pin(async { Ok(()) }) },
    )
    .expect("a valid task")
}

/// The tasks of the release already deployed (1.0): five, done before any
/// measurement, as the five migrations are for sqlx.
pub fn released_tasks() -> Vec<Task> {
    ["accounts", "orders", "account_names", "invoices", "seed"]
        .iter()
        .enumerate()
        .map(|(i, id)| noop("1.0", i as u32 + 1, id))
        .collect()
}

/// The new release's one task (1.1), with the given body.
pub fn new_task<F>(body: F) -> Task
where
    F: for<'a> Fn(&'a mut TaskContext) -> TaskFuture<'a> + Send + Sync + 'static,
{
    Task::new("1.1", 1, "slow", body).expect("a valid task")
}

/// A task of 1.1 that sleeps for `d`.
pub fn sleeping_task(d: Duration) -> Task {
    new_task(move |_ctx: &mut TaskContext| -> TaskFuture<'_> {
        Box::pin(async move {
            tokio::time::sleep(d).await;
            Ok(())
        })
    })
}

/// A runner for `service` at `app` over `tasks`.
pub fn runner(
    service: &str,
    app: &str,
    backend: Arc<dyn Backend>,
    tasks: Vec<Task>,
) -> anyhow::Result<Upsilon> {
    Ok(Upsilon::builder()
        .service(service)
        .app_version(app)
        .backend(backend)
        .tasks(tasks)
        .tasks_above_app(AboveAppPolicy::Ignore)
        .build()?)
}

/// Brings `service` to data version 1.0 (the released tasks done).
pub async fn at_released(service: &str, backend: Arc<dyn Backend>) -> anyhow::Result<()> {
    let outcome = runner(service, "1.0", backend, released_tasks())?
        .run()
        .await
        .with_context(|| format!("bringing {service} to 1.0"))?;
    ensure!(
        matches!(outcome, Outcome::Upgraded { .. }),
        "setting up {service}: {outcome}"
    );
    Ok(())
}
