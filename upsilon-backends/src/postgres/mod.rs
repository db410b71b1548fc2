//! PostgreSQL: lease, fence, state and history in the database the service
//! already runs on.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use upsilon_backends::postgres::PostgresBackend;
//!
//! let backend = PostgresBackend::connect_url("postgres://app:secret@db/app").await?;
//! let upsilon = upsilon::Upsilon::builder()
//!     .service("billing")
//!     .app_version(env!("CARGO_PKG_VERSION"))
//!     .backend(Arc::new(backend.clone()))
//!     .resource(backend) // for tasks that use `complete_with`
//!     .build()?;
//! upsilon.run().await?;
//! # Ok(()) }
//! ```
//!
//! How it works:
//! - The lease is a row, judged by the database's clock
//!   (`clock_timestamp()`), and holds no session state, so it works behind
//!   PgBouncer in transaction mode. The fence is a counter in the same row
//!   that only grows: a grant takes one more than the highest of the row's
//!   counters, every fence in the history and the service's fence floor in
//!   the meta table (which every grant raises), so neither a forced release
//!   nor deleting the row resets it.
//! - Every store write is one transaction that locks the service's state row
//!   and is checked with
//!   [`Snapshot::check`](upsilon::backend::Snapshot::check). A handle that
//!   claimed the store keeps the snapshot its own last write left there and
//!   the store revision (`rev:SERVICE` in the meta table) that write set;
//!   it checks the next write against that snapshot and sends it in one
//!   round trip, with a guard that locks the state row and aborts the
//!   transaction unless the fence, data version, baseline and revision are
//!   still the ones it knows. Otherwise (someone else wrote since, or the
//!   handle's last write ended with an unknown outcome) the write reads the
//!   state and the summaries under the lock first: two round trips, the
//!   statements of each sent together (pipelined).
//! - [`Store::load`](upsilon::backend::Store::load), the start-up read of an up-to-date node, is one
//!   statement: one round trip.
//! - Waiting nodes `LISTEN`; a release and every data version change
//!   `NOTIFY` in the same transaction, so a waiting node sleeps until a
//!   notification or the lease's expiry ([`Lock::notifies`](upsilon::backend::Lock::notifies)). Without
//!   notifications (transaction pooling, or a lost session) they poll. The
//!   holder's last write of a finished plan also notifies its notice
//!   ([`Notice`](upsilon::backend::Notice)), first, so that a woken node
//!   with the same plan inputs is READY without reading the store.
//! - The listening session is the pooled connection a node started with,
//!   taken out of the pool by its first lease request, which reads the
//!   lease row in the same flight.
//! - A holder also keeps a session of its own (the listening connection) and
//!   records its server process id in the lease row; that session holds an
//!   advisory lock of the lease while it holds it. A waiting node blocks on
//!   that lock, which comes free when the holder releases or its session
//!   ends, and then checks once whether the session still exists (about
//!   once a second, [`PostgresOptions::holder_check_every`], where the lock
//!   is not held: a holder of an older release); once it has seen it gone for
//!   [`PostgresOptions::takeover_grace`] it takes the lease over, so a killed
//!   holder is taken over within a second or two rather than after the TTL.
//!   The holder pings its session while it holds the lease
//!   ([`PostgresOptions::holder_ping_every`]) and
//!   [`Lock::until_lost`](upsilon::backend::Lock::until_lost) tells it, well
//!   within the grace, that its session ended, so that it stops its task
//!   before anyone else can start one (invariant E1). The new grant still
//!   gets a higher fence. Behind a transaction-mode pooler this is off and
//!   the TTL decides.
//!
//! Tables, in a configurable schema (default `public`):
//! - `upsilon_meta(key, value)`: the stored format (`format` = 1), each
//!   service's fence floor (`fence:SERVICE`) and store revision
//!   (`rev:SERVICE`, replaced by every write to the service's store rows);
//! - `upsilon_state(service, data_version, baseline, store_fence, granted,
//!   lease_holder, lease_fence, lease_expires, lease_pid, lease_server_start)`:
//!   one row per service;
//! - `upsilon_history(id, service, version, task_id, attempt, kind, state,
//!   fence, holder, description, started, finished, duration_ms, error)`:
//!   one row per task attempt.
//!
//! Upsilon creates them (and the schema) when they are missing, and refuses a
//! store whose format is newer than it knows. See `docs/POSTGRES.md` for the
//! privileges it needs and for PgBouncer.

mod batch;
mod block;
mod complete;
mod connection;
mod conninfo;
mod error;
mod holding;
mod known;
mod listener;
mod lock;
mod options;
mod pipeline;
mod pool;
mod sql;
mod store;
mod takeover;
#[cfg(test)]
mod tests;
mod tls;

use std::fmt;
use std::sync::Arc;

use tokio::time::Instant;
use tokio_postgres::types::FromSql;
use tokio_postgres::Row;
use tracing::info;
use upsilon::backend::BackendError;

use crate::wakeups::Wakeups;
use error::{driver, driver_in, timed_out};
use holding::Holding;
use known::{KnownStores, ReadStates};
use listener::Session;
pub use options::PostgresOptions;
use pool::Pool;
use sql::Sql;
use takeover::Waiting;
use tls::Connector;

/// The driver, for the transaction [`PostgresBackend::complete_with`] hands
/// to a task.
pub use tokio_postgres;

/// The stored format this build writes and reads.
pub const FORMAT: u32 = 1;

/// Lock and store in a PostgreSQL database. Cheap to clone: clones share the
/// pool and the session.
#[derive(Clone)]
pub struct PostgresBackend {
    inner: Arc<Inner>,
}

struct Inner {
    options: PostgresOptions,
    connector: Connector,
    pool: Pool,
    sql: Sql,
    wakeups: Arc<Wakeups>,
    /// The listening session, when one is open.
    session: std::sync::Mutex<Option<Arc<Session>>>,
    /// Held while a session is being opened; the time of the last failure.
    opening: tokio::sync::Mutex<Option<Instant>>,
    /// The leases this node holds that are tied to its session.
    holding: Holding,
    /// The leases this node found held by others, for early takeovers.
    waiting: Waiting,
    /// The stores this handle claimed, as its own last write left them.
    known: KnownStores,
    /// The state rows as this handle last read them.
    reads: ReadStates,
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.inner.options;
        f.debug_struct("PostgresBackend")
            .field("target", &o.target())
            .field("schema", &o.schema)
            .field("tables", &[&o.meta_table, &o.state_table, &o.history_table])
            .field("transaction_pooling", &o.transaction_pooling)
            .finish_non_exhaustive()
    }
}

/// The parameters of `Sql::has_checkpoints`.
fn checkpoint_columns(sql: &Sql) -> [(pipeline::Param, tokio_postgres::types::Type); 2] {
    [
        pipeline::text(sql.history.clone()),
        pipeline::text_array(
            sql::CHECKPOINT_COLUMNS
                .iter()
                .map(|(name, _)| (*name).to_owned())
                .collect(),
        ),
    ]
}

fn check_format(found: &str) -> Result<(), BackendError> {
    BackendError::check_format(found, FORMAT, "the meta table's format")
}

fn format_of(row: &Row, idx: usize) -> Result<(), BackendError> {
    match get::<Option<String>>(row, idx, "the stored format")? {
        Some(f) => check_format(&f),
        None => Err(BackendError::corrupt("the meta table has no `format` row")),
    }
}

/// The stored format from the rows of `Sql::format`.
fn format_row(rows: &[Row]) -> Result<(), BackendError> {
    match rows.first() {
        Some(r) => format_of(r, 0),
        None => Err(BackendError::corrupt("the meta table has no `format` row")),
    }
}

fn get<'r, T: FromSql<'r>>(row: &'r Row, idx: usize, what: &str) -> Result<T, BackendError> {
    row.try_get(idx)
        .map_err(|e| BackendError::corrupt(format!("{what} does not read: {e}")))
}

impl PostgresBackend {
    /// Connects from a `postgres://` or `postgresql://` URL; see
    /// [`PostgresOptions::from_url`].
    pub async fn connect_url(url: &str) -> Result<PostgresBackend, BackendError> {
        PostgresBackend::connect(PostgresOptions::from_url(url)?).await
    }

    /// Connects, and sends no statement. The first operation that finds
    /// Upsilon's schema or tables missing creates them (and adds the columns
    /// a table of the previous layout lacks); every operation refuses a
    /// stored format newer than this build knows.
    pub async fn connect(options: PostgresOptions) -> Result<PostgresBackend, BackendError> {
        options.validate()?;
        let connector = Connector::new(&options)?;
        let sql = Sql::new(&options);
        let wakeups = Arc::new(Wakeups::default());
        let pool = Pool::new(
            options.clone(),
            connector.clone(),
            sql.channel.clone(),
            wakeups.clone(),
        );
        let waiting = Waiting::new(options.takeover_grace);
        let backend = PostgresBackend {
            inner: Arc::new(Inner {
                options,
                connector,
                pool,
                sql,
                wakeups,
                session: std::sync::Mutex::new(None),
                opening: tokio::sync::Mutex::new(None),
                holding: Holding::default(),
                waiting,
                known: KnownStores::default(),
                reads: ReadStates::default(),
            }),
        };
        // One connection, so that a wrong address or password is reported
        // here; no statement: the first operation's own statements find out
        // whether the tables are there and which format they hold.
        backend.conn().await?.done();
        Ok(backend)
    }

    /// The options it was connected with.
    pub fn options(&self) -> &PostgresOptions {
        &self.inner.options
    }

    /// The `LISTEN`/`NOTIFY` channel of this schema and state table; the
    /// payload is the service name.
    pub fn channel(&self) -> &str {
        &self.inner.sql.channel
    }

    /// Tells the pool the server's `idle_session_timeout`, from column
    /// `idx` of `row`.
    fn learn_idle_timeout(&self, row: &Row, idx: usize) {
        if let Ok(Some(text)) = row.try_get::<_, Option<&str>>(idx) {
            if let Some(ms) = sql::idle_timeout_ms(text) {
                self.inner.pool.server_idle_timeout(ms);
            }
        }
    }

    /// Runs `op`; when one of its statements found Upsilon's schema, a
    /// table or a column missing (an empty database, or one of the previous
    /// layout), creates or upgrades the tables and runs `op` once more. `op`
    /// ends its own transaction on an error (see [`PostgresBackend::settle`]),
    /// so the second run starts on a clean connection.
    pub(super) async fn with_tables<T, F, Fut>(&self, op: F) -> Result<T, BackendError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, BackendError>>,
    {
        match op().await {
            Err(e) if error::tables_missing(&e) => {
                self.prepare_tables().await?;
                op().await
            }
            result => result,
        }
    }

    /// Creates what is missing, under a transaction-level advisory lock so
    /// that nodes starting together do not race; refuses unknown formats.
    async fn prepare_tables(&self) -> Result<(), BackendError> {
        let mut conn = self.conn().await?;
        let sql = &self.inner.sql;
        let o = &self.inner.options;
        let op = async {
            let c = conn.client();
            c.batch_execute("BEGIN").await.map_err(driver)?;
            c.query_typed(
                "SELECT pg_advisory_xact_lock($1)",
                &[(&sql::MIGRATION_LOCK, tokio_postgres::types::Type::INT8)],
            )
            .await
            .map_err(driver)?;
            let found = c
                .query_typed(
                    &sql.inspect,
                    &[
                        (&o.schema, tokio_postgres::types::Type::TEXT),
                        (&sql.meta, tokio_postgres::types::Type::TEXT),
                        (&sql.state, tokio_postgres::types::Type::TEXT),
                        (&sql.history, tokio_postgres::types::Type::TEXT),
                    ],
                )
                .await
                .map_err(driver)?;
            let row = &found[0];
            let missing = [
                !get::<bool>(row, 0, "schema")?,
                !get::<bool>(row, 1, "meta table")?,
                !get::<bool>(row, 2, "state table")?,
                !get::<bool>(row, 3, "history table")?,
            ];
            let creating = missing.iter().any(|m| *m);
            for stmt in sql.create(missing, FORMAT) {
                c.batch_execute(&stmt).await.map_err(|e| {
                    driver_in(
                        e,
                        &format!("creating Upsilon's tables in schema {}", o.schema),
                    )
                })?;
            }
            let rows = c.query_typed(&sql.format, &[]).await.map_err(driver)?;
            let f: Option<String> = match rows.first() {
                Some(r) => get(r, 0, "the stored format")?,
                None => None,
            };
            check_format(f.as_deref().unwrap_or_default())?;
            // A history made before checkpoints existed gains their columns:
            // nullable, so the format stays and a node of the previous
            // release, which names the columns it reads and writes, still
            // works beside this one.
            let [(history, history_type), (names, names_type)] = checkpoint_columns(sql);
            let have: i64 = c
                .query_typed(
                    &sql.has_checkpoints,
                    &[(&*history, history_type), (&*names, names_type)],
                )
                .await
                .map_err(driver)
                .and_then(|rows| get(&rows[0], 0, "the checkpoint columns"))?;
            if have < sql::CHECKPOINT_COLUMNS.len() as i64 {
                c.batch_execute(&sql.add_checkpoints).await.map_err(|e| {
                    driver_in(
                        e,
                        &format!("adding the checkpoint columns to {}", sql.history),
                    )
                })?;
                info!(table = %sql.history, "added the checkpoint columns to the history");
            }
            c.batch_execute("COMMIT").await.map_err(driver)?;
            if creating {
                info!(schema = %o.schema, "created Upsilon's tables");
            }
            Ok(())
        };
        let timeout = o.op_timeout;
        let result = tokio::time::timeout(timeout, op)
            .await
            .unwrap_or_else(|_| Err(timed_out("creating Upsilon's tables", timeout)));
        if result.is_ok() || conn.client().batch_execute("ROLLBACK").await.is_ok() {
            conn.done();
        }
        result
    }
}
