//! The PostgreSQL backend against a real server that these tests start
//! themselves (see `upsilon-test-servers`): conformance, node processes,
//! killed holders and connections, a server restart, the exactly-once helper,
//! identifiers, credentials.
//!
//! One server serves every test of this file, each test in its own schema or
//! service; the restart test has a server of its own. Node processes are this
//! test binary run again with `UPSILON_PG_NODE` set (see [`node_process`]).
#![cfg(feature = "postgres")]

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::counting_proxy;
use upsilon::backend::AttemptState;
use upsilon::backend::{Acquire, BackendError, Lock, Store};
use upsilon::testing::conformance::{self, Harness, Notices, Wake};
use upsilon::testing::{self};
use upsilon::{BoxError, Error, Outcome, RetryPolicy, Task, TaskContext, TaskFuture, Upsilon};
use upsilon_backends::postgres::tokio_postgres::{self, Client, NoTls};
use upsilon_backends::postgres::{PostgresBackend, PostgresOptions};
use upsilon_test_servers::Postgres;

/// The server shared by this file's tests. Never dropped: its watchdog stops
/// it when the test process exits.
fn server() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(Postgres::start)
}

async fn raw(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

fn options(schema: &str) -> PostgresOptions {
    PostgresOptions::from_url(&server().url())
        .unwrap()
        .schema(schema)
}

async fn backend(schema: &str) -> PostgresBackend {
    PostgresBackend::connect(options(schema)).await.unwrap()
}

fn granted(a: Acquire) -> upsilon::backend::Lease {
    match a {
        Acquire::Granted(l) => l,
        other => panic!("expected a grant, got {other:?}"),
    }
}

struct Pg {
    backend: Arc<PostgresBackend>,
    /// Another node's backend on the same schema: its own pool and session.
    peer: Arc<PostgresBackend>,
    schema: String,
    client: Client,
    saved: Mutex<Option<String>>,
}

impl Pg {
    async fn new(schema: &str) -> Pg {
        Pg {
            backend: Arc::new(backend(schema).await),
            peer: Arc::new(backend(schema).await),
            schema: schema.to_owned(),
            client: raw(&server().url()).await,
            saved: Mutex::new(None),
        }
    }
}

#[async_trait]
impl Harness for Pg {
    fn lock(&self) -> Arc<dyn Lock> {
        self.backend.clone()
    }
    fn store(&self) -> Arc<dyn Store> {
        self.backend.clone()
    }
    fn peer_lock(&self) -> Arc<dyn Lock> {
        self.peer.clone()
    }
    fn peer_store(&self) -> Arc<dyn Store> {
        self.peer.clone()
    }
    async fn corrupt(&self, service: &str) {
        let s = &self.schema;
        let row = self
            .client
            .query_one(
                &format!("SELECT data_version FROM {s}.upsilon_state WHERE service = $1"),
                &[&service],
            )
            .await
            .unwrap();
        *self.saved.lock().unwrap() = row.get(0);
        self.client
            .execute(
                &format!(
                    "UPDATE {s}.upsilon_state SET data_version = 'one point oh' WHERE service = $1"
                ),
                &[&service],
            )
            .await
            .unwrap();
    }
    async fn repair(&self, service: &str) {
        let old = self.saved.lock().unwrap().take();
        self.client
            .execute(
                &format!(
                    "UPDATE {}.upsilon_state SET data_version = $2 WHERE service = $1",
                    self.schema
                ),
                &[&service, &old],
            )
            .await
            .unwrap();
    }
    async fn future_format(&self) -> bool {
        self.client
            .batch_execute(&format!(
                "UPDATE {}.upsilon_meta SET value = '99' WHERE key = 'format'",
                self.schema
            ))
            .await
            .unwrap();
        true
    }
    async fn reset_format(&self) {
        self.client
            .batch_execute(&format!(
                "UPDATE {}.upsilon_meta SET value = '1' WHERE key = 'format'",
                self.schema
            ))
            .await
            .unwrap();
    }
    async fn delete_state_row(&self, service: &str) -> bool {
        let sql = format!(
            "DELETE FROM {}.upsilon_state WHERE service = $1",
            self.schema
        );
        let deleted = self.client.execute(&sql, &[&service]).await.unwrap();
        assert_eq!(deleted, 1, "the state row of {service}");
        true
    }
    async fn delete_history(&self, service: &str) -> bool {
        let sql = format!(
            "DELETE FROM {}.upsilon_history WHERE service = $1",
            self.schema
        );
        let deleted = self.client.execute(&sql, &[&service]).await.unwrap();
        assert!(deleted > 0, "the history of {service}");
        true
    }
}

#[tokio::test]
async fn postgres_backend_conforms() {
    let report = conformance::run_all(&Pg::new("conformance").await).await;
    assert_eq!(report.wake, Wake::Notifies, "LISTEN/NOTIFY wakes waiters");
    assert_eq!(
        report.notices,
        Notices::Delivered,
        "NOTIFY carries the holder's notice"
    );
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);
}

#[tokio::test]
async fn behind_a_transaction_pooler_it_conforms_and_polls() {
    let pg = Pg::new("pooled").await;
    let pooled = || async {
        let opts = options("pooled").transaction_pooling(true);
        Arc::new(PostgresBackend::connect(opts).await.unwrap())
    };
    let h = Pg {
        backend: pooled().await,
        peer: pooled().await,
        ..pg
    };
    let report = conformance::run_all(&h).await;
    assert_eq!(report.wake, Wake::Polls, "no notifications behind a pooler");
    assert_eq!(report.notices, Notices::Unsupported);
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);
    // No session: the lease row names no server process.
    let lease = granted(
        h.backend
            .try_acquire("svc", &testing::holder(1), Duration::from_secs(30))
            .await
            .unwrap(),
    );
    let pid: Option<i32> = h
        .client
        .query_one(
            "SELECT lease_pid FROM pooled.upsilon_state WHERE service = 'svc'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid, None);
    h.backend.release(&lease).await.unwrap();
}

#[tokio::test]
async fn a_newer_format_is_refused_from_the_first_call_and_nothing_is_written() {
    let h = Pg::new("newer_format").await;
    h.backend.load("svc").await.unwrap();
    h.future_format().await;
    // Connecting sends no statement; the first call reads the format.
    let fresh = PostgresBackend::connect(options("newer_format"))
        .await
        .unwrap();
    for b in [&fresh, &*h.backend] {
        let err = b.load("svc").await.unwrap_err();
        assert!(
            matches!(err, BackendError::UnsupportedFormat { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("format 99"), "{err}");
        let err = b.claim("svc", 1).await.unwrap_err();
        assert!(
            matches!(err, BackendError::UnsupportedFormat { .. }),
            "{err}"
        );
    }
    let rows: i64 = h
        .client
        .query_one("SELECT count(*) FROM newer_format.upsilon_state", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "nothing was written");
}

#[tokio::test]
async fn forcing_a_release_does_not_reset_the_fence() {
    let h = Pg::new("fence_kept").await;
    let b = &h.backend;
    let ttl = Duration::from_secs(60);
    let held = granted(
        b.try_acquire("svc", &testing::holder(7), ttl)
            .await
            .unwrap(),
    );
    // An operator forces the lease free: the holder loses it, the fence stays.
    let cleared = b.force_release("svc").await.unwrap().unwrap();
    assert_eq!(
        (cleared.holder, cleared.fence),
        (testing::holder(7), held.fence)
    );
    assert_eq!(b.force_release("svc").await.unwrap(), None);
    assert!(matches!(
        b.renew(&held).await,
        Err(BackendError::LeaseLost(_))
    ));
    let next = granted(
        b.try_acquire("svc", &testing::holder(8), ttl)
            .await
            .unwrap(),
    );
    assert!(next.fence > held.fence);
    b.release(&next).await.unwrap();
}

#[tokio::test]
async fn names_are_validated_before_connecting_and_tables_land_where_configured() {
    // Validation comes first: nothing listens on port 1.
    let nowhere = PostgresOptions::new().host("127.0.0.1").port(1);
    for (opts, named) in [
        (
            nowhere.clone().schema("Robert'); DROP TABLE x; --"),
            "schema name",
        ),
        (nowhere.clone().schema("Ops"), "schema name"),
        (nowhere.clone().schema("9lives"), "schema name"),
        (nowhere.clone().schema("a".repeat(64)), "schema name"),
        (nowhere.clone().schema(""), "schema name"),
        (nowhere.clone().schema("pg_temp_x"), "reserved"),
        (
            nowhere.clone().tables("m", "st\"x", "h"),
            "state table name",
        ),
        (
            nowhere.clone().tables("m", "s", "h h"),
            "history table name",
        ),
        (
            nowhere.clone().tables("same", "same", "h"),
            "three different names",
        ),
    ] {
        let err = PostgresBackend::connect(opts)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(named), "{named}: {err}");
        assert!(
            !err.contains("connect"),
            "validated before connecting: {err}"
        );
    }
    let err = PostgresBackend::connect_url(&format!("{}?schema=Bad-Name", server().url()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("schema name \"Bad-Name\""), "{err}");

    // Custom names, 63 bytes long, in a schema that Upsilon creates.
    let long = format!("h{}", "x".repeat(62));
    let custom = PostgresBackend::connect(options("custom_names").tables("meta1", "order", &long))
        .await
        .unwrap();
    let lease = granted(
        custom
            .try_acquire("svc", &testing::holder(1), Duration::from_secs(5))
            .await
            .unwrap(),
    );
    let client = raw(&server().url()).await;
    let tables: Vec<String> = client
        .query(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = 'custom_names' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tables, vec![long.clone(), "meta1".into(), "order".into()]);
    custom.claim("svc", lease.fence).await.unwrap();
    custom.release(&lease).await.unwrap();
    assert_eq!(custom.load("svc").await.unwrap().fence, lease.fence);
}

#[tokio::test]
async fn a_wrong_password_gives_a_clear_error_without_the_password() {
    let url = server().url();
    let good = server().password().to_owned();
    let bad_url = url.replace(&good, "not-the-password");
    let err = PostgresBackend::connect_url(&bad_url).await.unwrap_err();
    let text = err.to_string();
    assert!(
        !err.is_transient(),
        "retrying a wrong password is pointless: {text}"
    );
    assert!(
        text.contains("password authentication failed for user \"postgres\""),
        "{text}"
    );
    assert!(text.contains("check the user name and password"), "{text}");
    assert!(
        text.contains(&format!(
            "127.0.0.1:{}/postgres as user `postgres`",
            server().port()
        )),
        "{text}"
    );
    assert!(!text.contains("not-the-password"), "{text}");
    assert!(!format!("{err:?}").contains("not-the-password"));

    // Through connect(), the URL scheme picks the backend.
    let err = upsilon_backends::connect(&bad_url.replace("postgres://", "postgresql://"))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!err.contains("not-the-password"), "{err}");

    // Nobody listening: worth retrying, and says where it tried.
    let err = PostgresBackend::connect(
        PostgresOptions::new()
            .host("127.0.0.1")
            .port(upsilon_test_servers::free_port())
            .password("sekrit"),
    )
    .await
    .unwrap_err();
    assert!(err.is_transient(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("cannot connect to PostgreSQL at 127.0.0.1:"),
        "{text}"
    );
    assert!(!text.contains("sekrit"), "{text}");

    let ok = upsilon_backends::connect(&url).await.unwrap();
    assert!(ok.load("svc").await.unwrap().is_empty());
    assert!(!format!("{ok:?}").contains(&good));
}

#[tokio::test]
async fn a_user_with_table_privileges_only_can_run_and_a_user_without_is_told_why() {
    // An administrator sets Upsilon's tables up once (here: Upsilon itself,
    // connected as the superuser), then grants the app's user what it needs.
    let admin = raw(&server().url()).await;
    backend("granted").await.load("svc").await.unwrap();
    admin
        .batch_execute(
            "CREATE ROLE upsilon_app LOGIN PASSWORD 'app-pw';
             GRANT USAGE ON SCHEMA granted TO upsilon_app;
             GRANT SELECT, INSERT, UPDATE ON granted.upsilon_meta, granted.upsilon_state,
                   granted.upsilon_history TO upsilon_app;
             CREATE ROLE upsilon_nobody LOGIN PASSWORD 'nobody-pw';",
        )
        .await
        .unwrap();
    let as_user = |user: &str, pw: &str, schema: &str| {
        PostgresOptions::new()
            .host("127.0.0.1")
            .port(server().port())
            .user(user)
            .password(pw)
            .dbname("postgres")
            .schema(schema)
    };
    let app = PostgresBackend::connect(as_user("upsilon_app", "app-pw", "granted"))
        .await
        .unwrap();
    let runs = Arc::new(Mutex::new(0));
    let counted = runs.clone();
    let task = Task::new(
        "1.0",
        1,
        "t",
        move |_ctx: &mut TaskContext| -> TaskFuture<'_> {
            *counted.lock().unwrap() += 1;
            Box::pin(async { Ok(()) })
        },
    )
    .unwrap();
    let outcome = Upsilon::builder()
        .service("svc")
        .app_version("1.0")
        .backend(Arc::new(app))
        .tasks([task])
        .build()
        .unwrap()
        .run()
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Upgraded { .. }), "{outcome}");
    assert_eq!(*runs.lock().unwrap(), 1);

    // No CREATE on the database: the schema cannot be created, which the
    // first call finds out.
    let nobody = |schema| async move {
        PostgresBackend::connect(as_user("upsilon_nobody", "nobody-pw", schema))
            .await
            .unwrap()
            .load("svc")
            .await
            .unwrap_err()
            .to_string()
    };
    let err = nobody("fresh_schema").await;
    assert!(
        err.contains("permission denied for database postgres"),
        "{err}"
    );
    assert!(err.contains("USAGE on the schema"), "{err}");
    // No privileges on existing tables.
    let err = nobody("granted").await;
    assert!(
        err.contains("permission denied for schema granted"),
        "{err}"
    );
    assert!(!err.contains("nobody-pw"), "{err}");
}

#[cfg(feature = "postgres-rustls")]
#[tokio::test]
async fn tls_verifies_the_server_against_the_given_ca() {
    let pg = tokio::task::spawn_blocking(Postgres::start_tls)
        .await
        .unwrap();
    let ca = pg.ca_file();
    let url = format!(
        "postgres://postgres:{}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}&application_name=tls_url",
        pg.password(),
        pg.port(),
        ca.display()
    );
    let by_url = PostgresBackend::connect_url(&url).await.unwrap();
    by_url.load("svc").await.unwrap();
    let by_parts = PostgresBackend::connect(
        PostgresOptions::new()
            .host("127.0.0.1")
            .port(pg.port())
            .user("postgres")
            .password(pg.password())
            .application_name("tls_parts")
            .tls(Some(&ca)),
    )
    .await
    .unwrap();
    let lease = granted(
        by_parts
            .try_acquire("svc", &testing::holder(1), Duration::from_secs(5))
            .await
            .unwrap(),
    );
    by_parts.release(&lease).await.unwrap();
    let encrypted = pg.psql(
        "SELECT a.application_name || '=' || s.ssl FROM pg_stat_ssl s
         JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name LIKE 'tls_%' ORDER BY 1",
    );
    assert!(encrypted.contains("tls_url=t"), "{encrypted}");
    assert!(encrypted.contains("tls_parts=t"), "{encrypted}");
    assert!(!encrypted.contains("=f"), "{encrypted}");

    // Without the CA the server is not trusted: a clear, permanent error.
    let err = PostgresBackend::connect_url(&format!(
        "postgres://postgres:{}@localhost:{}/postgres?sslmode=require",
        pg.password(),
        pg.port()
    ))
    .await
    .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    let text = err.to_string();
    assert!(text.contains("TLS"), "{text}");
    assert!(text.contains("sslrootcert"), "{text}");
    assert!(!text.contains(pg.password()), "{text}");
}

// ---------------------------------------------------------------------------
// Tasks that write to an app table through `complete_with`.

/// The app table the test tasks write: one row per committed effect.
async fn effects_table(client: &Client, schema: &str) {
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.effects (
               service text NOT NULL, task text NOT NULL, fence bigint NOT NULL,
               node text NOT NULL)"
        ))
        .await
        .unwrap();
}

async fn effects(client: &Client, schema: &str, service: &str) -> BTreeMap<String, i64> {
    client
        .query(
            &format!(
                "SELECT task, count(*) FROM {schema}.effects WHERE service = $1 GROUP BY task"
            ),
            &[&service],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// What a test task does besides writing its effect.
#[derive(Clone, Debug, Default)]
struct Behaviour {
    sleep: Duration,
    /// Task id whose work aborts the process after its write, before commit.
    abort_before_commit: Option<String>,
    /// Task id whose node aborts right after `complete_with` committed.
    abort_after_commit: Option<String>,
    /// Task id that waits (for its cancellation) instead of finishing.
    hang: Option<String>,
    /// Task id whose connection is terminated after its write, before commit,
    /// on its first attempt.
    drop_connection: Option<String>,
    /// Where the tasks record when their code starts and ends.
    timeline: Option<Timeline>,
}

/// One moment of task code: node, task id, "start" or "end", when.
type Moment = (String, String, &'static str, Instant);

/// When task code ran.
#[derive(Clone, Debug, Default)]
struct Timeline(Arc<Mutex<Vec<Moment>>>);

impl Timeline {
    fn record(&self, node: &str, task: &str, event: &'static str) {
        let entry = (node.to_owned(), task.to_owned(), event, Instant::now());
        self.0.lock().unwrap().push(entry);
    }

    fn at(&self, node: &str, task: &str, event: &str) -> Option<Instant> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|(n, t, e, _)| n == node && t == task && *e == event)
            .map(|(_, _, _, at)| *at)
    }
}

/// Records the end of a task's code when dropped: when the task returns,
/// fails or is cancelled (its future dropped).
struct EndOfTask(Timeline, String, String);

impl Drop for EndOfTask {
    fn drop(&mut self) {
        self.0.record(&self.1, &self.2, "end");
    }
}

fn effect_task(schema: &str, version: &str, order: u32, id: &str, b: &Behaviour) -> Task {
    let (schema, b) = (schema.to_owned(), b.clone());
    Task::new(version, order, id, move |ctx: &mut TaskContext| -> TaskFuture<'_> {
        let (schema, b) = (schema.clone(), b.clone());
        Box::pin(async move {
            let id = ctx.task().id.clone();
            let _end = b.timeline.clone().map(|t| {
                let node = ctx.holder().host.clone();
                t.record(&node, &id, "start");
                EndOfTask(t, node, id.clone())
            });
            tokio::time::sleep(b.sleep).await;
            if b.hang.as_deref() == Some(&id) {
                ctx.cancellation().cancelled().await;
                return Err("cancelled".into());
            }
            let pg = ctx.resource::<PostgresBackend>()?;
            let node = ctx.holder().host.clone();
            let attempt = ctx.task().attempt;
            pg.complete_with(ctx, async |tx| {
                tx.execute(
                    &format!(
                        "INSERT INTO {schema}.effects (service, task, fence, node) VALUES ($1, $2, $3, $4)"
                    ),
                    &[&ctx.service(), &id, &(ctx.fence() as i64), &node],
                )
                .await?;
                if b.abort_before_commit.as_deref() == Some(&id) {
                    std::process::abort();
                }
                if b.drop_connection.as_deref() == Some(&id) && attempt == 1 {
                    // The server ends this very session: nothing of the
                    // transaction commits.
                    let _ = tx.batch_execute("SELECT pg_terminate_backend(pg_backend_pid())").await;
                }
                Ok::<_, BoxError>(())
            })
            .await?;
            if b.abort_after_commit.as_deref() == Some(&id) {
                std::process::abort();
            }
            Ok(())
        })
    })
    .unwrap()
}

/// Tasks `t1..tN` of each version in `spec` (`1.0:2,1.1:2`).
fn effect_tasks(schema: &str, spec: &str, b: &Behaviour) -> Vec<Task> {
    let mut tasks = Vec::new();
    for part in spec.split(',') {
        let (v, n) = part.split_once(':').unwrap();
        for i in 1..=n.parse::<u32>().unwrap() {
            let id = format!("v{}_t{i}", v.replace('.', "_"));
            tasks.push(effect_task(schema, v, i, &id, b));
        }
    }
    tasks
}

fn node(
    backend: PostgresBackend,
    service: &str,
    name: &str,
    app: &str,
    tasks: Vec<Task>,
    ttl: Duration,
    poll: Duration,
) -> Upsilon {
    Upsilon::builder()
        .service(service)
        .app_version(app)
        .backend(Arc::new(backend.clone()))
        .resource(backend)
        .holder(upsilon::Holder {
            host: name.to_owned(),
            ..upsilon::Holder::current()
        })
        .tasks(tasks)
        .ttl(ttl)
        .poll_interval(poll)
        .backend_attempts(20)
        .max_wait(Duration::from_secs(60))
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------
// Node processes: this test binary, run again as one node.

/// A node process's entry point: does nothing in a normal test run. With
/// `UPSILON_PG_NODE` set it runs one node from the `UPSILON_PG_*` variables
/// and prints `OUTCOME <kind>`.
#[test]
fn node_process() {
    let Ok(name) = std::env::var("UPSILON_PG_NODE") else {
        return;
    };
    let env = |k: &str| std::env::var(format!("UPSILON_PG_{k}")).unwrap_or_default();
    let ms = |k: &str, default: u64| {
        env(k)
            .parse()
            .map_or(Duration::from_millis(default), Duration::from_millis)
    };
    let some = |k: &str| Some(env(k)).filter(|v| !v.is_empty());
    let b = Behaviour {
        sleep: ms("SLEEP_MS", 0),
        abort_before_commit: some("ABORT_BEFORE_COMMIT"),
        abort_after_commit: some("ABORT_AFTER_COMMIT"),
        hang: some("HANG"),
        drop_connection: None,
        timeline: None,
    };
    let schema = env("SCHEMA");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let outcome = runtime.block_on(async {
        let opts = PostgresOptions::from_url(&env("URL"))
            .unwrap()
            .schema(&schema)
            .application_name(format!("node {name}"));
        let backend = PostgresBackend::connect(opts).await.unwrap();
        let tasks = effect_tasks(&schema, &env("TASKS"), &b);
        node(
            backend,
            &env("SERVICE"),
            &name,
            &env("APP"),
            tasks,
            ms("TTL_MS", 5000),
            ms("POLL_MS", 1000),
        )
        .run()
        .await
    });
    match outcome {
        Ok(Outcome::Upgraded { report }) => println!("OUTCOME upgraded fence={}", report.fence),
        Ok(Outcome::UpToDate { .. }) => println!("OUTCOME up-to-date"),
        Ok(Outcome::WaitedForOther { .. }) => println!("OUTCOME waited"),
        Ok(other) => println!("OUTCOME {other}"),
        Err(e) => {
            println!("OUTCOME error {e}");
            std::process::exit(3);
        }
    }
}

struct NodeSpec<'a> {
    schema: &'a str,
    service: &'a str,
    tasks: &'a str,
    app: &'a str,
    ttl_ms: u64,
    poll_ms: u64,
    extra: Vec<(&'a str, String)>,
}

fn spawn_node(spec: &NodeSpec<'_>, name: &str) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "node_process",
        "--nocapture",
        "--test-threads=1",
        "--quiet",
    ])
    .env("UPSILON_PG_NODE", name)
    .env("UPSILON_PG_URL", server().url())
    .env("UPSILON_PG_SCHEMA", spec.schema)
    .env("UPSILON_PG_SERVICE", spec.service)
    .env("UPSILON_PG_TASKS", spec.tasks)
    .env("UPSILON_PG_APP", spec.app)
    .env("UPSILON_PG_TTL_MS", spec.ttl_ms.to_string())
    .env("UPSILON_PG_POLL_MS", spec.poll_ms.to_string())
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in &spec.extra {
        cmd.env(format!("UPSILON_PG_{k}"), v);
    }
    cmd.spawn().unwrap()
}

/// Waits for a node process; returns its `OUTCOME` line (or how it died).
fn outcome(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("OUTCOME "))
        .map(str::to_owned)
        .unwrap_or_else(|| {
            format!(
                "no outcome ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Completed history rows per task id.
async fn completions(b: &PostgresBackend, service: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for row in b.history(service).await.unwrap() {
        if row.state == AttemptState::Completed {
            *out.entry(row.key.id.clone()).or_default() += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_processes_run_each_task_exactly_once() {
    let schema = "processes";
    let client = raw(&server().url()).await;
    effects_table(&client, schema).await;
    let spec = NodeSpec {
        schema,
        service: "svc",
        tasks: "1.0:2,1.1:2",
        app: "1.1",
        ttl_ms: 5000,
        poll_ms: 500,
        extra: vec![("SLEEP_MS", "100".into())],
    };
    let children: Vec<Child> = (0..5)
        .map(|n| spawn_node(&spec, &format!("p{n}")))
        .collect();
    let outcomes: Vec<String> =
        tokio::task::spawn_blocking(move || children.into_iter().map(outcome).collect())
            .await
            .unwrap();
    let upgraded = outcomes
        .iter()
        .filter(|o| o.starts_with("upgraded"))
        .count();
    assert_eq!(upgraded, 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| o.starts_with("upgraded") || o == "waited" || o == "up-to-date"),
        "{outcomes:?}"
    );
    let b = backend(schema).await;
    let snap = b.load("svc").await.unwrap();
    assert_eq!(
        snap.data_version,
        Some(upsilon::parse_version("1.1").unwrap())
    );
    let effects = effects(&client, schema, "svc").await;
    assert_eq!(effects.len(), 4, "{effects:?}");
    assert!(effects.values().all(|n| *n == 1), "{effects:?}");
    let done = completions(&b, "svc").await;
    assert_eq!(done.len(), 4, "{done:?}");
    assert!(done.values().all(|n| *n == 1), "{done:?}");
    // Every effect carries the fence of the node that ran it.
    let fences: Vec<i64> = client
        .query(
            &format!("SELECT DISTINCT fence FROM {schema}.effects WHERE service = 'svc'"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(fences.len(), 1, "{fences:?}");
}

/// Polls until `f` is true, for at most `limit`; returns how long it took.
async fn until<F, Fut>(limit: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "still waiting after {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

/// The fence of the newest history row of `task`, if any.
async fn attempt_fence(client: &Client, schema: &str, service: &str, task: &str) -> Option<i64> {
    client
        .query_opt(
            &format!(
                "SELECT fence FROM {schema}.upsilon_history WHERE service = $1 AND task_id = $2
                 ORDER BY attempt DESC LIMIT 1"
            ),
            &[&service, &task],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_process_is_taken_over_long_before_its_ttl() {
    let schema = "killed";
    let client = raw(&server().url()).await;
    effects_table(&client, schema).await;
    let b = backend(schema).await;
    // The tables, for the reads below: the first call creates them.
    b.load("svc").await.unwrap();
    // A TTL of 30 s: a takeover much sooner than that comes from seeing the
    // holder's session end.
    let spec = NodeSpec {
        schema,
        service: "svc",
        tasks: "1.0:2",
        app: "1.0",
        ttl_ms: 30_000,
        poll_ms: 1000,
        extra: vec![("HANG", "v1_0_t1".into())],
    };
    let mut holder = spawn_node(&spec, "doomed");
    let first = until(Duration::from_secs(20), || async {
        attempt_fence(&client, schema, "svc", "v1_0_t1")
            .await
            .is_some()
    })
    .await;
    let fence = attempt_fence(&client, schema, "svc", "v1_0_t1")
        .await
        .unwrap();
    let waiter = spawn_node(
        &NodeSpec {
            extra: vec![],
            ..spec
        },
        "heir",
    );
    // The heir found the lease held and waits: one of its sessions blocks
    // on the lease's advisory lock.
    until(Duration::from_secs(20), || async {
        client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'node heir'
                 AND query LIKE 'SELECT pg_advisory_xact_lock_shared%'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            > 0
    })
    .await;
    holder.kill().unwrap();
    let took = until(Duration::from_secs(25), || async {
        attempt_fence(&client, schema, "svc", "v1_0_t1").await != Some(fence)
    })
    .await;
    // Detection (the lease's advisory lock comes free as the server sees the
    // session end, then one check) plus the takeover grace (600 ms), then
    // the grant, the claim and the task's start.
    eprintln!(
        "holder started its task after {first:?}; failover after SIGKILL: {took:?} (ttl 30 s)"
    );
    assert!(took < Duration::from_secs(10), "takeover took {took:?}");
    let _ = holder.wait();
    let heir = tokio::task::spawn_blocking(move || outcome(waiter))
        .await
        .unwrap();
    assert!(heir.starts_with("upgraded"), "{heir}");
    let effects = effects(&client, schema, "svc").await;
    assert_eq!(effects.values().sum::<i64>(), 2, "{effects:?}");
    let history = b.history("svc").await.unwrap();
    let t1: Vec<_> = history.iter().filter(|r| r.key.id == "v1_0_t1").collect();
    assert_eq!(t1.len(), 2, "{history:?}");
    assert_eq!(
        t1[0].state,
        AttemptState::Running,
        "the dead node's row stays running"
    );
    assert_eq!(t1[1].state, AttemptState::Completed);
    assert!(t1[1].fence > t1[0].fence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_holder_connection_hands_the_lease_over() {
    let schema = "terminated";
    let client = raw(&server().url()).await;
    effects_table(&client, schema).await;
    let canary_backend =
        PostgresBackend::connect(options(schema).application_name("upsilon canary"))
            .await
            .unwrap();
    let heir_backend = backend(schema).await;
    // The tables, for the reads below: the first call creates them.
    heir_backend.load("svc").await.unwrap();
    let timeline = Timeline::default();
    let hang = Behaviour {
        hang: Some("v1_0_t1".into()),
        timeline: Some(timeline.clone()),
        ..Behaviour::default()
    };
    let canary = node(
        canary_backend,
        "svc",
        "canary",
        "1.0",
        effect_tasks(schema, "1.0:2", &hang),
        Duration::from_secs(30),
        Duration::from_millis(200),
    );
    let heir = node(
        heir_backend,
        "svc",
        "heir",
        "1.0",
        effect_tasks(
            schema,
            "1.0:2",
            &Behaviour {
                timeline: Some(timeline.clone()),
                ..Behaviour::default()
            },
        ),
        Duration::from_secs(30),
        Duration::from_secs(1),
    );
    let canary_run = tokio::spawn(async move { canary.run().await });
    until(Duration::from_secs(10), || async {
        attempt_fence(&client, schema, "svc", "v1_0_t1")
            .await
            .is_some()
    })
    .await;
    let fence = attempt_fence(&client, schema, "svc", "v1_0_t1")
        .await
        .unwrap();
    let mut heir_status = heir.status();
    let heir_run = tokio::spawn(async move { heir.run().await });
    // The heir finds the lease held and waits.
    tokio::time::timeout(
        Duration::from_secs(10),
        heir_status.wait_for(|s| matches!(s, upsilon::Status::Waiting { .. })),
    )
    .await
    .expect("the heir waits")
    .unwrap();
    let killed: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = 'upsilon canary'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 1, "the canary's connections were found");
    let took = until(Duration::from_secs(20), || async {
        attempt_fence(&client, schema, "svc", "v1_0_t1").await != Some(fence)
    })
    .await;
    eprintln!("taken over {took:?} after pg_terminate_backend (ttl 30 s)");
    assert!(took < Duration::from_secs(10), "takeover took {took:?}");
    let heir_outcome = heir_run.await.unwrap().unwrap();
    assert!(
        matches!(heir_outcome, Outcome::Upgraded { .. }),
        "{heir_outcome}"
    );
    // The canary stops: at once once the runner follows `until_lost`, at its
    // next renewal or write otherwise.
    let canary_outcome = tokio::time::timeout(Duration::from_secs(20), canary_run)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(canary_outcome, Err(Error::LeaseLost { .. })),
        "{canary_outcome:?}"
    );
    let effects = effects(&client, schema, "svc").await;
    assert_eq!(effects.len(), 2, "{effects:?}");
    assert!(effects.values().all(|n| *n == 1), "{effects:?}");

    let canary_end = timeline
        .at("canary", "v1_0_t1", "end")
        .expect("the canary's task ended");
    let heir_start = timeline
        .at("heir", "v1_0_t1", "start")
        .expect("the heir ran the task");
    eprintln!(
        "the canary's task ended {:?} the heir's started",
        if canary_end < heir_start {
            "before"
        } else {
            "after"
        }
    );
    // E1: no two nodes run task code at overlapping times. This needs the
    // runner to cancel the task when `Lock::until_lost` resolves.
    assert!(
        canary_end < heir_start,
        "E1: the canary's task ended {:?} after the heir's started",
        canary_end - heir_start
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_mid_upgrade_is_ridden_out() {
    // A server of its own: the others' tests must not see it restart.
    let mut pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let url = pg.url();
    let schema = "restart";
    let opts = || PostgresOptions::from_url(&url).unwrap().schema(schema);
    {
        let client = raw(&url).await;
        effects_table(&client, schema).await;
    }
    let slow = Behaviour {
        sleep: Duration::from_millis(700),
        ..Behaviour::default()
    };
    let canary = node(
        PostgresBackend::connect(opts()).await.unwrap(),
        "svc",
        "canary",
        "1.1",
        effect_tasks(schema, "1.0:2,1.1:2", &slow),
        Duration::from_secs(6),
        Duration::from_millis(200),
    );
    let follower = node(
        PostgresBackend::connect(opts()).await.unwrap(),
        "svc",
        "follower",
        "1.1",
        effect_tasks(schema, "1.0:2,1.1:2", &slow),
        Duration::from_secs(6),
        Duration::from_millis(200),
    );
    let canary_run = tokio::spawn(async move { canary.run().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let follower_run = tokio::spawn(async move { follower.run().await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let pg = tokio::task::spawn_blocking(move || {
        pg.restart();
        pg
    })
    .await
    .unwrap();
    let mid = PostgresBackend::connect(opts()).await.unwrap();
    let done_at_restart = completions(&mid, "svc").await.len();
    assert!(done_at_restart < 4, "the restart came mid-upgrade");
    let canary_outcome = canary_run.await.unwrap();
    let follower_outcome = follower_run.await.unwrap();
    let client = raw(&url).await;
    let effects = effects(&client, schema, "svc").await;
    assert_eq!(effects.len(), 4, "{effects:?}");
    assert!(effects.values().all(|n| *n == 1), "{effects:?}");
    let b = PostgresBackend::connect(opts()).await.unwrap();
    assert_eq!(
        b.load("svc").await.unwrap().data_version,
        Some(upsilon::parse_version("1.1").unwrap())
    );
    let done = completions(&b, "svc").await;
    assert!(
        done.len() == 4 && done.values().all(|n| *n == 1),
        "{done:?}"
    );
    // Either the canary rides the restart out and the follower finds
    // nothing left to do, or the canary stops and the follower finishes:
    // a runner that follows `Lock::until_lost` stops the canary's task when
    // the restart ends its session (no node may take over early, since the
    // lease row names a session of the old server, but the canary cannot
    // tell a restart from a terminated session), and a task whose commit
    // falls while the server is down fails (tasks are not retried here).
    match (&canary_outcome, &follower_outcome) {
        (
            Ok(Outcome::Upgraded { .. }),
            Ok(
                Outcome::WaitedForOther { .. }
                | Outcome::UpToDate { .. }
                | Outcome::FoundUpToDate { .. },
            ),
        ) => {}
        (Err(Error::LeaseLost { .. }), Ok(Outcome::Upgraded { .. })) => {}
        (Err(Error::TaskFailed { report }), Ok(Outcome::Upgraded { .. }))
            if report
                .failed
                .as_ref()
                .and_then(|f| f.error.as_deref())
                .is_some_and(|e| e.contains("connect") || e.contains("closed")) => {}
        other => panic!("one of them upgraded, the other waited: {other:?}"),
    }
    drop(pg);
}

// ---------------------------------------------------------------------------
// Exactly once with `complete_with`.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_before_commit_leaves_no_effect_and_the_task_runs_again() {
    let schema = "lost_commit";
    let client = raw(&server().url()).await;
    effects_table(&client, schema).await;
    let b = Behaviour {
        drop_connection: Some("v1_0_t1".into()),
        ..Behaviour::default()
    };
    let runner = Upsilon::builder()
        .service("svc")
        .app_version("1.0")
        .backend(Arc::new(backend(schema).await))
        .resource(backend(schema).await)
        .tasks(effect_tasks(schema, "1.0:2", &b))
        .retry(RetryPolicy::attempts(2, Duration::from_millis(10)))
        .build()
        .unwrap();
    let outcome = runner.run().await.unwrap();
    assert!(matches!(outcome, Outcome::Upgraded { .. }), "{outcome}");
    let effects = effects(&client, schema, "svc").await;
    assert_eq!(effects.get("v1_0_t1"), Some(&1), "{effects:?}");
    let history = backend(schema).await.history("svc").await.unwrap();
    let t1: Vec<_> = history.iter().filter(|r| r.key.id == "v1_0_t1").collect();
    assert_eq!(t1.len(), 2, "{history:?}");
    assert_eq!(t1[0].state, AttemptState::Failed);
    let error = t1[0].error.as_deref().unwrap_or_default();
    assert!(error.contains("recording the completion"), "{error}");
    assert!(error.contains("connection closed"), "{error}");
    assert_eq!((t1[1].attempt, t1[1].state), (2, AttemptState::Completed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dying_around_the_commit_leaves_the_effect_exactly_once() {
    let client = raw(&server().url()).await;
    for (schema, point) in [
        ("die_before", "ABORT_BEFORE_COMMIT"),
        ("die_after", "ABORT_AFTER_COMMIT"),
    ] {
        effects_table(&client, schema).await;
        let spec = NodeSpec {
            schema,
            service: "svc",
            tasks: "1.0:2",
            app: "1.0",
            ttl_ms: 30_000,
            poll_ms: 200,
            extra: vec![(point, "v1_0_t1".into())],
        };
        let dying = tokio::task::spawn_blocking({
            let child = spawn_node(&spec, "dying");
            move || outcome(child)
        })
        .await
        .unwrap();
        assert!(
            dying.contains("signal: 6"),
            "{point}: the node aborted: {dying}"
        );
        let before = effects(&client, schema, "svc").await;
        let expected_before = if point == "ABORT_BEFORE_COMMIT" { 0 } else { 1 };
        assert_eq!(
            before.get("v1_0_t1").copied().unwrap_or(0),
            expected_before,
            "{point}: {before:?}"
        );
        // The next node takes over at once (the dead node's session is gone)
        // and finishes the upgrade.
        let started = Instant::now();
        let next = tokio::task::spawn_blocking({
            let child = spawn_node(
                &NodeSpec {
                    extra: vec![],
                    ..spec
                },
                "next",
            );
            move || outcome(child)
        })
        .await
        .unwrap();
        assert!(next.starts_with("upgraded"), "{point}: {next}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{point}: no TTL wait"
        );
        let after = effects(&client, schema, "svc").await;
        assert_eq!(after.get("v1_0_t1"), Some(&1), "{point}: {after:?}");
        assert_eq!(after.get("v1_0_t2"), Some(&1), "{point}: {after:?}");
        let b = backend(schema).await;
        let t1: Vec<_> = b
            .history("svc")
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.key.id == "v1_0_t1")
            .collect();
        if point == "ABORT_BEFORE_COMMIT" {
            // Attempt 1 never completed; attempt 2 by the next node did.
            assert_eq!(t1.len(), 2, "{t1:?}");
            assert_eq!(t1[0].state, AttemptState::Running);
            assert_eq!(t1[1].state, AttemptState::Completed);
        } else {
            // Completed with the effect, by the node that died: not run again.
            assert_eq!(t1.len(), 1, "{t1:?}");
            assert_eq!(t1[0].state, AttemptState::Completed);
            assert_eq!(t1[0].holder.host, "dying");
        }
    }
}

/// Takes the lease of `svc`, claims the store and starts attempt 1 of task
/// `t@1.0`, as the runner does before it calls the task that
/// `testing::context("t", "1.0", ..)` stands for.
async fn holding_t_running(b: &PostgresBackend, svc: &str) -> upsilon::backend::Lease {
    let lease = granted(
        b.try_acquire(svc, &testing::holder(1), Duration::from_secs(30))
            .await
            .unwrap(),
    );
    b.claim(svc, lease.fence).await.unwrap();
    b.apply(svc, lease.fence, &[testing::start_attempt("t", "1.0", 1)])
        .await
        .unwrap();
    lease
}

#[tokio::test]
async fn a_stale_fence_commits_nothing_through_complete_with() {
    let schema = "stale_helper";
    // `testing::context` runs in service `test` with fence 1.
    let svc = "test";
    let client = raw(&server().url()).await;
    effects_table(&client, schema).await;
    let b = backend(schema).await;
    // A node whose lease was taken over runs the helper with its old fence.
    let old = holding_t_running(&b, svc).await;
    b.claim(svc, old.fence + 1).await.unwrap();
    let mut resources = upsilon::Resources::default();
    resources.insert(b.clone());
    let (ctx, _cancel) = testing::context("t", "1.0", resources);
    let ran = Arc::new(Mutex::new(false));
    let err = b
        .complete_with(&ctx, async |_tx| {
            *ran.lock().unwrap() = true;
            Ok::<_, BackendError>(())
        })
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::StaleFence { .. }), "{err}");
    assert!(!*ran.lock().unwrap(), "the work never ran");
}

// ---------------------------------------------------------------------------
// Waking waiting nodes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_nodes_are_woken_by_notify_not_by_their_poll() {
    let schema = "notify";
    let client = raw(&server().url()).await;
    effects_table(&client, schema).await;
    let slow = Behaviour {
        sleep: Duration::from_millis(400),
        ..Behaviour::default()
    };
    // Long enough for the waiters to start and wait on a loaded machine.
    let slower = Behaviour {
        sleep: Duration::from_millis(1500),
        ..Behaviour::default()
    };
    let first = node(
        backend(schema).await,
        "svc",
        "first",
        "1.0",
        effect_tasks(schema, "1.0:1", &slower),
        Duration::from_secs(10),
        Duration::from_secs(30),
    );
    let waiters: Vec<Upsilon> = {
        let mut v = Vec::new();
        for n in 0..3 {
            v.push(node(
                backend(schema).await,
                "svc",
                &format!("waiter{n}"),
                "1.0",
                effect_tasks(schema, "1.0:1", &slow),
                Duration::from_secs(10),
                // A poll this slow would fail the test: notifications wake them.
                Duration::from_secs(30),
            ));
        }
        v
    };
    let start = Instant::now();
    let mut first_status = first.status();
    let first_run = tokio::spawn(async move { first.run().await });
    // The waiters start once the first node holds the lease and works.
    first_status
        .wait_for(|s| {
            use upsilon::Status::*;
            matches!(s, Upgrading { .. } | Ready { .. } | Failed { .. })
        })
        .await
        .unwrap();
    let results = testing::run_nodes(waiters).await;
    let first_outcome = first_run.await.unwrap().unwrap();
    let total = start.elapsed();
    assert!(
        matches!(first_outcome, Outcome::Upgraded { .. }),
        "{first_outcome}"
    );
    for r in &results {
        assert!(matches!(r, Ok(Outcome::WaitedForOther { .. })), "{r:?}");
    }
    assert!(
        total < Duration::from_secs(5),
        "waiters finished after {total:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_pooler_waiting_nodes_poll() {
    let schema = "pooled_wait";
    let client = raw(&server().url()).await;
    effects_table(&client, schema).await;
    let slow = Behaviour {
        sleep: Duration::from_millis(300),
        ..Behaviour::default()
    };
    let mut nodes = Vec::new();
    for n in 0..3 {
        let b = PostgresBackend::connect(options(schema).transaction_pooling(true))
            .await
            .unwrap();
        assert!(!b.notifies(), "no notifications behind a pooler");
        nodes.push(node(
            b,
            "svc",
            &format!("pooled{n}"),
            "1.0",
            effect_tasks(schema, "1.0:2", &slow),
            Duration::from_secs(10),
            Duration::from_millis(100),
        ));
    }
    let results = testing::run_nodes(nodes).await;
    let upgraded = results
        .iter()
        .filter(|r| matches!(r, Ok(Outcome::Upgraded { .. })))
        .count();
    assert_eq!(upgraded, 1, "{results:?}");
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let effects = effects(&client, schema, "svc").await;
    assert_eq!(effects.len(), 2, "{effects:?}");
    assert!(effects.values().all(|n| *n == 1), "{effects:?}");
}

// One thread: the driver's task then runs only once every statement of a
// pipeline is queued, so they leave in one write and the count is exact.
#[tokio::test]
async fn operations_take_one_or_two_round_trips() {
    use std::sync::atomic::Ordering;
    let (port, turns) = counting_proxy(server().port()).await;
    let url = server()
        .url()
        .replace(&format!(":{}/", server().port()), &format!(":{port}/"));
    let b = PostgresBackend::connect(
        PostgresOptions::from_url(&url)
            .unwrap()
            .schema("round_trips")
            .pool_size(1),
    )
    .await
    .unwrap();
    // Open the listening session and warm the pooled connection first.
    let warm = granted(
        b.try_acquire("warm", &testing::holder(1), Duration::from_secs(5))
            .await
            .unwrap(),
    );
    b.release(&warm).await.unwrap();
    let count = |before: usize| turns.load(Ordering::SeqCst) - before;

    let t = turns.load(Ordering::SeqCst);
    let lease = granted(
        b.try_acquire("svc", &testing::holder(1), Duration::from_secs(5))
            .await
            .unwrap(),
    );
    assert_eq!(count(t), 2, "try_acquire");
    let t = turns.load(Ordering::SeqCst);
    b.claim("svc", lease.fence).await.unwrap();
    assert_eq!(count(t), 2, "claim");
    let t = turns.load(Ordering::SeqCst);
    b.apply(
        "svc",
        lease.fence,
        &[
            upsilon::backend::Change::Baseline(upsilon::parse_version("1.0").unwrap()),
            testing::start_attempt("t", "1.1", 1),
        ],
    )
    .await
    .unwrap();
    assert_eq!(count(t), 1, "apply after a claim");
    let t = turns.load(Ordering::SeqCst);
    b.apply(
        "svc",
        lease.fence,
        &[upsilon::backend::Change::Finish(
            upsilon::backend::FinishAttempt {
                key: upsilon::TaskKey {
                    version: upsilon::parse_version("1.1").unwrap(),
                    id: "t".into(),
                },
                attempt: 1,
                state: AttemptState::Completed,
                error: None,
                duration: Duration::ZERO,
            },
        )],
    )
    .await
    .unwrap();
    assert_eq!(count(t), 1, "apply after an apply");
    let t = turns.load(Ordering::SeqCst);
    b.renew(&lease).await.unwrap();
    assert_eq!(count(t), 1, "renew");
    let t = turns.load(Ordering::SeqCst);
    b.release(&lease).await.unwrap();
    assert_eq!(count(t), 1, "release");
    let t = turns.load(Ordering::SeqCst);
    let snap = b.load("svc").await.unwrap();
    assert_eq!(count(t), 1, "load");
    assert_eq!(snap.tasks.len(), 1);
    assert_eq!(
        snap.data_version,
        Some(upsilon::parse_version("1.0").unwrap())
    );
}

/// The harness runs the server with `synchronous_commit=off`; Upsilon's own
/// connections turn it on, so an acknowledged fence or completion survives a
/// server crash.
#[tokio::test]
async fn upsilon_commits_are_durable_even_where_the_server_default_is_not() {
    let schema = "durable_commit";
    let svc = "test";
    let client = raw(&server().url()).await;
    let server_default: String = client
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        server_default, "off",
        "the harness's default, for this test to mean something"
    );
    let b = backend(schema).await;
    let lease = holding_t_running(&b, svc).await;
    assert_eq!(lease.fence, 1, "testing::context runs with fence 1");
    let (ctx, _cancel) = testing::context("t", "1.0", upsilon::Resources::default());
    let setting: String = b
        .complete_with(&ctx, async |tx| {
            let row = tx
                .query_one("SHOW synchronous_commit", &[])
                .await
                .map_err(BackendError::other)?;
            Ok::<_, BackendError>(row.get(0))
        })
        .await
        .unwrap();
    assert_eq!(setting, "on");
}
