//! Starting on PostgreSQL: a connect sends no statement, and every entry
//! point works on an empty database, on one of the previous layout (before
//! checkpoints) and with nodes starting together, and refuses a newer
//! format.
#![cfg(feature = "postgres")]

mod common;

use std::time::Duration;

use common::{granted, options, raw, server};
use upsilon::backend::{BackendError, Lease, Lock, Store};
use upsilon::testing;
use upsilon::BatchDone;
use upsilon_backends::postgres::tokio_postgres::Client;
use upsilon_backends::postgres::PostgresBackend;

const TTL: Duration = Duration::from_secs(30);

/// Every way into the backend: the lock's calls, the store's, the CLI's
/// (services, history, current, force_release) and the task helpers.
const ENTRY_POINTS: [&str; 13] = [
    "load",
    "claim",
    "apply",
    "services",
    "history",
    "try_acquire",
    "renew",
    "release",
    "current",
    "force_release",
    "raise_fence",
    "complete_with",
    "run_batches",
];

/// Calls entry point `name` on `b` for service `test` (the service of
/// `testing::context`), as a first call: nothing else ran before it.
/// `Ok` carries what the caller sees when the call itself was refused for
/// a reason of the store's rules (no lease, no running attempt).
async fn call(b: &PostgresBackend, name: &str) -> Result<String, BackendError> {
    let svc = "test";
    let forged = Lease {
        service: svc.into(),
        holder: testing::holder(1),
        fence: 1,
        expires_at_ms: 0,
        ttl: TTL,
    };
    let refused = |r: Result<(), BackendError>| match r {
        Ok(()) => Ok("ok".to_owned()),
        Err(e @ (BackendError::LeaseLost(_) | BackendError::Rejected(_))) => {
            Ok(format!("refused: {e}"))
        }
        Err(e) => Err(e),
    };
    match name {
        "load" => b.load(svc).await.map(|s| format!("{s:?}")),
        "claim" => b.claim(svc, 1).await.map(|s| format!("{s:?}")),
        "apply" => {
            b.claim(svc, 1).await?;
            let start = testing::start_attempt("u", "1.0", 1);
            refused(b.apply(svc, 1, &[start]).await)
        }
        "services" => b.services().await.map(|s| format!("{s:?}")),
        "history" => b.history(svc).await.map(|h| format!("{h:?}")),
        "try_acquire" => b
            .try_acquire(svc, &testing::holder(1), TTL)
            .await
            .map(|a| format!("{a:?}")),
        "renew" => refused(b.renew(&forged).await.map(|_| ())),
        "release" => refused(b.release(&forged).await),
        "current" => b.current(svc).await.map(|c| format!("{c:?}")),
        "force_release" => b.force_release(svc).await.map(|c| format!("{c:?}")),
        "raise_fence" => b.raise_fence(svc, 3).await.map(|()| "ok".into()),
        "complete_with" => {
            let (ctx, _cancel) = testing::context("t", "1.0", upsilon::Resources::default());
            refused(
                b.complete_with(&ctx, async |_tx| Ok::<_, BackendError>(()))
                    .await,
            )
        }
        "run_batches" => {
            let (ctx, _cancel) = testing::context("t", "1.0", upsilon::Resources::default());
            let r = b
                .run_batches(ctx.batches::<i64>(), async |_tx, _batch| {
                    Ok(BatchDone::end())
                })
                .await;
            match r {
                Ok(_) => Ok("ok".into()),
                Err(e) => {
                    let text = e.to_string();
                    if text.contains("has no attempt") {
                        Ok(format!("refused: {text}"))
                    } else {
                        Err(BackendError::other(text))
                    }
                }
            }
        }
        other => panic!("no entry point {other}"),
    }
}

async fn fresh(client: &Client, schema: &str) -> PostgresBackend {
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .unwrap();
    PostgresBackend::connect(options(schema)).await.unwrap()
}

async fn tables(client: &Client, schema: &str) -> Vec<String> {
    client
        .query(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = $1 ORDER BY 1",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn checkpoint_columns(client: &Client, schema: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM information_schema.columns
             WHERE table_schema = $1 AND table_name = 'upsilon_history'
               AND column_name LIKE 'checkpoint%'",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_connect_opens_one_session_and_sends_no_statement() {
    let client = raw(&server().url()).await;
    client
        .batch_execute("DROP SCHEMA IF EXISTS no_statement CASCADE")
        .await
        .unwrap();
    let opts = options("no_statement").application_name("connect only");
    let b = PostgresBackend::connect(opts).await.unwrap();
    let sessions: Vec<String> = client
        .query(
            "SELECT query FROM pg_stat_activity WHERE application_name = 'connect only'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(sessions, [""], "one session, and no statement on it");
    assert!(tables(&client, "no_statement").await.is_empty());
    // The first operation creates the tables, on that same session.
    b.load("svc").await.unwrap();
    assert_eq!(
        tables(&client, "no_statement").await,
        ["upsilon_history", "upsilon_meta", "upsilon_state"]
    );
    let sessions: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'connect only'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sessions, 1);
}

#[tokio::test]
async fn every_entry_point_works_first_on_an_empty_database() {
    let client = raw(&server().url()).await;
    for name in ENTRY_POINTS {
        let schema = format!("empty_{name}");
        let b = fresh(&client, &schema).await;
        let seen = call(&b, name)
            .await
            .unwrap_or_else(|e| panic!("{name} on an empty database: {e}"));
        assert!(!seen.contains("SQLSTATE"), "{name}: {seen}");
        assert_eq!(
            tables(&client, &schema).await,
            ["upsilon_history", "upsilon_meta", "upsilon_state"],
            "{name}"
        );
        // And again, now that the tables are there.
        call(&b, name)
            .await
            .unwrap_or_else(|e| panic!("{name} a second time: {e}"));
    }
}

/// The tables as the release before checkpoints created them, in `schema`,
/// with a running attempt of task `t@1.0` of service `test` (fence 1).
async fn previous_layout(client: &Client, schema: &str) {
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE;
             CREATE SCHEMA {schema};
             CREATE TABLE {schema}.upsilon_meta (key text PRIMARY KEY, value text NOT NULL);
             CREATE TABLE {schema}.upsilon_state (
               service text PRIMARY KEY, data_version text, baseline text,
               store_fence bigint NOT NULL DEFAULT 0, granted bigint NOT NULL DEFAULT 0,
               lease_holder text, lease_fence bigint, lease_expires timestamptz,
               lease_pid integer, lease_server_start bigint);
             CREATE TABLE {schema}.upsilon_history (
               id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
               service text NOT NULL, version text NOT NULL, task_id text NOT NULL,
               attempt integer NOT NULL, kind text NOT NULL, state text NOT NULL,
               fence bigint NOT NULL, holder text NOT NULL, description text NOT NULL,
               started timestamptz NOT NULL, finished timestamptz, duration_ms bigint,
               error text, UNIQUE (service, version, task_id, attempt));
             INSERT INTO {schema}.upsilon_meta VALUES ('format', '1'), ('fence:test', '1');
             INSERT INTO {schema}.upsilon_state (service, store_fence, granted)
               VALUES ('test', 1, 1);"
        ))
        .await
        .unwrap();
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.upsilon_history
                   (service, version, task_id, attempt, kind, state, fence, holder,
                    description, started)
                 VALUES ('test', '1.0.0', 't', 1, 'run', 'running', 1, $1, 't', now())"
            ),
            &[&testing::holder(1).encode()],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn every_entry_point_works_first_on_a_database_of_the_previous_layout() {
    let client = raw(&server().url()).await;
    for name in ENTRY_POINTS {
        let schema = format!("previous_{name}");
        previous_layout(&client, &schema).await;
        let b = PostgresBackend::connect(options(&schema)).await.unwrap();
        let seen = call(&b, name)
            .await
            .unwrap_or_else(|e| panic!("{name} on the previous layout: {e}"));
        assert!(!seen.contains("SQLSTATE"), "{name}: {seen}");
        if name == "complete_with" {
            assert_eq!(seen, "ok", "the running attempt completes");
        }
        if ["load", "claim", "history", "complete_with", "run_batches"].contains(&name) {
            assert_eq!(checkpoint_columns(&client, &schema).await, 4, "{name}");
        }
        call(&b, name)
            .await
            .unwrap_or_else(|e| panic!("{name} a second time: {e}"));
        let format: String = client
            .query_one(
                &format!("SELECT value FROM {schema}.upsilon_meta WHERE key = 'format'"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(format, "1", "{name}: the format stays");
    }
}

#[tokio::test]
async fn every_entry_point_refuses_a_newer_format_and_writes_nothing() {
    let client = raw(&server().url()).await;
    let schema = "newer_format_everywhere";
    let b = fresh(&client, schema).await;
    let lease = granted(
        b.try_acquire("test", &testing::holder(1), TTL)
            .await
            .unwrap(),
    );
    b.release(&lease).await.unwrap();
    client
        .batch_execute(&format!(
            "UPDATE {schema}.upsilon_meta SET value = '99' WHERE key = 'format'"
        ))
        .await
        .unwrap();
    let before = dump(&client, schema).await;
    // A lease's own renewal and release rest on the grant's check.
    for name in ENTRY_POINTS
        .into_iter()
        .filter(|n| !["renew", "release"].contains(n))
    {
        let err = call(&b, name).await.expect_err(name);
        assert!(
            matches!(err, BackendError::UnsupportedFormat { .. }) || {
                // run_batches and complete_with say it in their own words.
                err.to_string().contains("format 99")
            },
            "{name}: {err}"
        );
        assert!(err.to_string().contains("format 99"), "{name}: {err}");
    }
    assert_eq!(dump(&client, schema).await, before, "nothing was written");
}

async fn dump(client: &Client, schema: &str) -> String {
    let rows = client
        .query(
            &format!(
                "SELECT (SELECT string_agg(m::text, ',' ORDER BY key) FROM {schema}.upsilon_meta m)
                     || (SELECT coalesce(string_agg(s::text, ','), '') FROM {schema}.upsilon_state s)
                     || (SELECT coalesce(string_agg(h::text, ','), '') FROM {schema}.upsilon_history h)"
            ),
            &[],
        )
        .await
        .unwrap();
    rows[0].get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_starting_together_on_an_empty_database_all_start() {
    let client = raw(&server().url()).await;
    for (schema, layout) in [("together_empty", false), ("together_previous", true)] {
        if layout {
            previous_layout(&client, schema).await;
        } else {
            client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .await
                .unwrap();
        }
        let mut nodes = Vec::new();
        for _ in 0..8 {
            nodes.push(PostgresBackend::connect(options(schema)).await.unwrap());
        }
        let mut running = tokio::task::JoinSet::new();
        for (n, b) in nodes.into_iter().enumerate() {
            running.spawn(async move {
                if n % 2 == 0 {
                    b.load("test").await.map(|_| ())
                } else {
                    b.try_acquire("other", &testing::holder(n), TTL)
                        .await
                        .map(|_| ())
                }
            });
        }
        while let Some(done) = running.join_next().await {
            done.unwrap()
                .unwrap_or_else(|e| panic!("{schema}: a node failed to start: {e}"));
        }
        assert_eq!(checkpoint_columns(&client, schema).await, 4, "{schema}");
    }
}

/// Behind a transaction pooler each statement may run on another server
/// session, so every statement is sent unnamed; otherwise a statement run
/// again on a connection runs as one prepared on it (named).
#[tokio::test]
async fn statements_are_prepared_except_behind_a_transaction_pooler() {
    let pg = upsilon_test_servers::Postgres::builder()
        .setting("log_line_prefix", "[%a] ")
        .setting("log_statement", "all")
        .start();
    let run = |app: &'static str, pooling: bool| {
        let url = pg.url();
        async move {
            let b = PostgresBackend::connect(
                upsilon_backends::postgres::PostgresOptions::from_url(&url)
                    .unwrap()
                    .application_name(app)
                    .transaction_pooling(pooling),
            )
            .await
            .unwrap();
            for n in 0..3 {
                b.load("svc").await.unwrap();
                let lease = granted(
                    b.try_acquire("svc", &testing::holder(n), TTL)
                        .await
                        .unwrap(),
                );
                b.renew(&lease).await.unwrap();
                b.release(&lease).await.unwrap();
            }
        }
    };
    run("behind a pooler", true).await;
    run("direct", false).await;
    let log = pg.log();
    let executes = |app: &str, named: bool| {
        log.lines()
            .filter(|l| l.starts_with(&format!("[{app}] ")) && l.contains("execute "))
            .filter(|l| l.contains("execute <unnamed>") != named)
            .count()
    };
    assert!(executes("behind a pooler", false) > 0, "{log}");
    assert_eq!(executes("behind a pooler", true), 0, "{log}");
    // The snapshot, the lease row and the lease statements, from their
    // second run on.
    assert!(executes("direct", true) >= 5, "{log}");
}
