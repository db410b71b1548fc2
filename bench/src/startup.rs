//! Scenario 1: the start-up of a node whose data is already at its version,
//! (a) whole, connect included, and (b) on an already open connection.

use std::sync::Arc;
use std::time::Instant;

use anyhow::ensure;
use serde_json::json;
use upsilon::backend::Store as _;
use upsilon::Outcome;
use upsilon_backends::postgres::PostgresBackend;
use upsilon_backends::sqlite::SqliteBackend;

use crate::common::{
    at_released, migrator, released_tasks, runner, sqlx_connect, Env, Statement, PROBE_ROLE,
};
use crate::report::{Report, Row, Unit};
use crate::stats::{ms, summary};
use crate::Options;

const SERVICE: &str = "startup";
const SCHEMA: &str = "sqlx_startup";

fn up_to_date(outcome: &Outcome) -> anyhow::Result<()> {
    ensure!(
        matches!(outcome, Outcome::UpToDate { .. }),
        "expected an up-to-date node, got: {outcome}"
    );
    Ok(())
}

/// Runs `f` once and returns its time in ms.
async fn timed<F, Fut>(f: F) -> anyhow::Result<f64>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let t = Instant::now();
    f().await?;
    Ok(ms(t.elapsed()))
}

/// The server's planning and execution time of each statement of an
/// up-to-date start-up, on new sessions and on an open one, beside
/// `SELECT 1` (from `pg_stat_statements`, for the probe's role only).
async fn statement_costs(env: &Env, n: usize) -> anyhow::Result<serde_json::Value> {
    let url = env.probe_url();
    env.reset_statements().await?;
    for _ in 0..n {
        let backend = PostgresBackend::connect_url(&url).await?;
        backend.load(SERVICE).await?;
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client.query_typed("SELECT 1", &[]).await?;
    }
    let fresh = env.statements(PROBE_ROLE).await?;
    env.reset_statements().await?;
    let backend = PostgresBackend::connect_url(&url).await?;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    env.reset_statements().await?;
    for _ in 0..n {
        backend.load(SERVICE).await?;
        client.query_typed("SELECT 1", &[]).await?;
    }
    let open = env.statements(PROBE_ROLE).await?;
    Ok(json!({
        "new_sessions": Statement::json(&fresh),
        "open_session": Statement::json(&open),
    }))
}

pub async fn run(env: &Env, o: &Options, report: &mut Report) -> anyhow::Result<()> {
    let url = env.url.as_str();
    at_released(SERVICE, Arc::new(PostgresBackend::connect_url(url).await?)).await?;
    env.sqlx_schema(SCHEMA).await?;
    let lite_path = env.dir.path().join("startup.db");
    at_released(SERVICE, Arc::new(SqliteBackend::open(&lite_path).await?)).await?;
    let m = migrator(None);

    // 1a: whole start-up, connect included. The four ways take turns, so
    // that whatever else the machine does falls on all of them alike.
    let warm = (o.startup_iters / 10).max(1);
    let mut a: [Vec<f64>; 6] = Default::default();
    // Upsilon's start-up in steps: connect (and read the stored format),
    // build the runner, run; the bare client's: connect, SELECT 1.
    let mut steps: [Vec<f64>; 5] = Default::default();
    for i in 0..warm + o.startup_iters {
        let mut took = [0.0; 6];
        for k in 0..6 {
            let which = (k + i) % 6;
            took[which] = match which {
                0 => {
                    let t = Instant::now();
                    let backend = PostgresBackend::connect_url(url).await?;
                    let connected = t.elapsed();
                    let up = runner(SERVICE, "1.0", Arc::new(backend), released_tasks())?;
                    let built = t.elapsed();
                    up_to_date(&up.run().await?)?;
                    let all = t.elapsed();
                    if i >= warm {
                        steps[0].push(ms(connected));
                        steps[1].push(ms(built - connected));
                        steps[2].push(ms(all - built));
                    }
                    ms(all)
                }
                1 => {
                    let t = Instant::now();
                    let (client, conn) =
                        tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
                    tokio::spawn(conn);
                    let connected = t.elapsed();
                    client.simple_query("SELECT 1").await?;
                    let all = t.elapsed();
                    if i >= warm {
                        steps[3].push(ms(connected));
                        steps[4].push(ms(all - connected));
                    }
                    ms(all)
                }
                2 => {
                    timed(|| async {
                        let mut conn = sqlx_connect(url, Some(SCHEMA)).await?;
                        m.run(&mut conn).await?;
                        Ok(())
                    })
                    .await?
                }
                3 => {
                    timed(|| async {
                        let mut conn = sqlx_connect(url, Some(SCHEMA)).await?;
                        sqlx::query("SELECT 1").execute(&mut conn).await?;
                        Ok(())
                    })
                    .await?
                }
                4 => {
                    timed(|| async {
                        let backend = SqliteBackend::open(&lite_path).await?;
                        let up = runner(SERVICE, "1.0", Arc::new(backend), released_tasks())?;
                        up_to_date(&up.run().await?)
                    })
                    .await?
                }
                _ => {
                    timed(|| async {
                        let conn = rusqlite::Connection::open(&lite_path)?;
                        conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?;
                        Ok(())
                    })
                    .await?
                }
            };
        }
        if i >= warm {
            for (v, t) in a.iter_mut().zip(took) {
                v.push(t);
            }
        }
    }
    let [up, bare, sqlx_run, sqlx_bare, lite, lite_bare] = a.map(|v| summary(&v));
    let base = "tokio-postgres connect + SELECT 1";
    report.push(
        Row::new(
            "1a",
            "PG start-up to READY, connect included, p50",
            Unit::Ms,
            up.p50,
        )
        .vs(base, bare.p50)
        .ratio_at_most(1.1, "<= 1.1x"),
    );
    report.push(
        Row::new(
            "1a",
            "PG start-up to READY, connect included, p99",
            Unit::Ms,
            up.p99,
        )
        .vs(base, bare.p99),
    );
    report.push(
        Row::new(
            "1a",
            "sqlx connect + Migrator::run, nothing to do, p50 (reference)",
            Unit::Ms,
            sqlx_run.p50,
        )
        .vs("sqlx connect + SELECT 1", sqlx_bare.p50),
    );
    report.push(
        Row::new(
            "1a",
            "PG start-up to READY, connect included, p50",
            Unit::Ms,
            up.p50,
        )
        .vs("sqlx connect + Migrator::run", sqlx_run.p50),
    );
    report.push(
        Row::new(
            "1a",
            "SQLite start-up to READY, open included, p50",
            Unit::Ms,
            lite.p50,
        )
        .vs("rusqlite open + SELECT 1", lite_bare.p50)
        .ratio_at_most(3.0, "<= 3x"),
    );

    // 1b: the check alone, on an open connection.
    let backend = Arc::new(PostgresBackend::connect_url(url).await?);
    let up_pg = runner(SERVICE, "1.0", backend, released_tasks())?;
    let mut sqlx_conn = sqlx_connect(url, Some(SCHEMA)).await?;
    let lite_up = runner(
        SERVICE,
        "1.0",
        Arc::new(SqliteBackend::open(&lite_path).await?),
        released_tasks(),
    )?;
    let lite_conn = rusqlite::Connection::open(&lite_path)?;
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let iters = o.startup_iters * 2;
    let mut b: [Vec<f64>; 5] = Default::default();
    for i in 0..warm + iters {
        let mut took = [0.0; 5];
        for k in 0..5 {
            let which = (k + i) % 5;
            let t = Instant::now();
            match which {
                0 => up_to_date(&up_pg.run().await?)?,
                1 => m.run(&mut sqlx_conn).await?,
                2 => up_to_date(&lite_up.run().await?)?,
                3 => {
                    lite_conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?;
                }
                _ => {
                    client.simple_query("SELECT 1").await?;
                }
            }
            took[which] = ms(t.elapsed());
        }
        if i >= warm {
            for (v, t) in b.iter_mut().zip(took) {
                v.push(t);
            }
        }
    }
    let [check, sqlx_check, lite_check, lite_select, select] = b.map(|v| summary(&v));
    report.push(
        Row::new(
            "1b",
            "PG check on an open connection, p50",
            Unit::Ms,
            check.p50,
        )
        .vs("sqlx Migrator::run, all applied", sqlx_check.p50)
        .ratio_at_most(1.0, "faster (< 1x)"),
    );
    report.push(
        Row::new(
            "1b",
            "PG check on an open connection, p99",
            Unit::Ms,
            check.p99,
        )
        .vs("sqlx Migrator::run, all applied", sqlx_check.p99),
    );
    report.push(
        Row::new(
            "1b",
            "PG check on an open connection, p50",
            Unit::Ms,
            check.p50,
        )
        .vs(
            "SELECT 1 on an open tokio-postgres connection (one round trip)",
            select.p50,
        )
        .ratio_at_most(1.5, "<= 1.5x"),
    );
    report.push(
        Row::new(
            "1b",
            "SQLite check on an open file, p50",
            Unit::Ms,
            lite_check.p50,
        )
        .vs("rusqlite SELECT 1 on an open connection", lite_select.p50)
        .ratio_at_most(3.0, "<= 3x"),
    );
    let probe = statement_costs(env, (o.startup_iters / 6).clamp(2, 50)).await?;
    let s = |x: &crate::stats::Summary| json!({"n": x.n, "p50": x.p50, "p99": x.p99, "min": x.min, "max": x.max});
    report.detail(
        "1",
        json!({
            "iterations_a": o.startup_iters,
            "iterations_b": iters,
            "warm_up": warm,
            "a": {
                "upsilon_pg": s(&up), "tokio_postgres_connect_select1": s(&bare),
                "sqlx_connect_migrator_run": s(&sqlx_run), "sqlx_connect_select1": s(&sqlx_bare),
                "upsilon_sqlite": s(&lite), "rusqlite_open_select1": s(&lite_bare),
                "upsilon_pg_steps_p50_ms": {
                    "connect_and_read_format": summary(&steps[0]).p50,
                    "build": summary(&steps[1]).p50,
                    "run": summary(&steps[2]).p50,
                },
                "tokio_postgres_steps_p50_ms": {
                    "connect": summary(&steps[3]).p50,
                    "select1": summary(&steps[4]).p50,
                },
            },
            "b": {
                "upsilon_pg": s(&check), "sqlx_migrator_run": s(&sqlx_check),
                "upsilon_sqlite": s(&lite_check), "rusqlite_select1": s(&lite_select),
                "tokio_postgres_select1": s(&select),
            },
            "server_time_per_statement": probe,
        }),
    );
    Ok(())
}
