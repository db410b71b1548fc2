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
//!   counters and every fence in the history, so neither a forced release nor
//!   deleting the row resets it.
//! - Every store write is one transaction that locks the service's state row
//!   (`SELECT ... FOR UPDATE`), reads the state and the per-task summaries,
//!   checks the write with [`Snapshot::check`] and writes: two round trips,
//!   the statements of each sent together (pipelined).
//! - [`Store::load`], the start-up read of an up-to-date node, is one
//!   statement: one round trip.
//! - Waiting nodes `LISTEN`; a release and every data version change
//!   `NOTIFY` in the same transaction, so a waiting node sleeps until a
//!   notification or the lease's expiry ([`Lock::notifies`]). Without
//!   notifications (transaction pooling, or a lost session) they poll.
//! - A holder also keeps a session of its own (the listening connection) and
//!   records its server process id in the lease row. A node that finds the
//!   lease held by a session that no longer exists treats it as expired, and
//!   a waiting node checks for that about once a second
//!   ([`PostgresOptions::holder_check_every`]), so a killed holder is taken
//!   over within about a second rather than after the TTL. Safety never
//!   depends on this: the new grant still gets a higher fence. Behind a
//!   transaction-mode pooler this is off and the TTL decides.
//!
//! Tables, in a configurable schema (default `public`):
//! - `upsilon_meta(key, value)`: the stored format (`format` = 1);
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

mod connection;
mod error;
mod listener;
mod options;
mod pipeline;
mod pool;
mod sql;
mod tls;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::Row;
use tracing::{debug, info};
use upsilon::backend::{
    decide_acquire, fence_from_column, fence_to_column, jitter, ttl_ms, Acquire, AttemptState,
    Change, Columns, FinishAttempt, HistoryColumns, HistoryEntry, LeaseInfo, Snapshot,
    StateColumns, StoredLease, SummaryColumns,
};
use upsilon::backend::{BackendError, Lease, Lock, Store};
use upsilon::{Holder, TaskContext, TaskKey};

use error::{driver, driver_in, timed_out};
use listener::{Session, SessionId, Wakeups};
pub use options::PostgresOptions;
use pipeline::{
    first_error, int4, int8, opt_int4, opt_int8, opt_text, pipeline, text, text_array, Stmt,
};
use pool::{Conn, Pool};
use sql::Sql;
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
    /// Per service: the fence and session of the lease last found held by
    /// another node, for the waiting node's checks.
    held_by: std::sync::Mutex<HashMap<String, (u64, Option<SessionId>)>>,
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

fn check_format(found: &str) -> Result<(), BackendError> {
    BackendError::check_format(found, FORMAT, "the meta table's format")
}

fn format_of(row: &Row, idx: usize) -> Result<(), BackendError> {
    match get::<Option<String>>(row, idx, "the stored format")? {
        Some(f) => check_format(&f),
        None => Err(BackendError::corrupt("the meta table has no `format` row")),
    }
}

fn get<'r, T: FromSql<'r>>(row: &'r Row, idx: usize, what: &str) -> Result<T, BackendError> {
    row.try_get(idx)
        .map_err(|e| BackendError::corrupt(format!("{what} does not read: {e}")))
}

/// The columns a snapshot needs of one history row, from `first` on.
fn summary(row: &Row, first: usize) -> Result<SummaryColumns, BackendError> {
    Ok(SummaryColumns {
        version: get(row, first, "a history row's version")?,
        task_id: get(row, first + 1, "a history row's task id")?,
        attempt: get::<i32>(row, first + 2, "an attempt number")?.into(),
        kind: get(row, first + 3, "an attempt kind")?,
        state: get(row, first + 4, "an attempt state")?,
        fence: get(row, first + 5, "a history row's fence")?,
    })
}

/// The snapshot from the rows of `Sql::snapshot`: the state columns on the
/// first row, then one row per history row (none when its columns are null).
fn snapshot_of(rows: &[Row]) -> Result<Snapshot, BackendError> {
    let first = rows
        .first()
        .ok_or_else(|| BackendError::corrupt("the snapshot query returned no row"))?;
    format_of(first, 0)?;
    let state = StateColumns {
        data_version: get(first, 1, "the data version")?,
        baseline: get(first, 2, "the baseline")?,
        store_fence: get::<Option<i64>>(first, 3, "the store fence")?.unwrap_or(0),
    };
    let mut history = Vec::with_capacity(rows.len());
    for row in rows {
        if get::<Option<&str>>(row, 4, "a history row's version")?.is_some() {
            history.push(summary(row, 4)?);
        }
    }
    Snapshot::from_columns(state, history)
}

impl PostgresBackend {
    /// Connects from a `postgres://` or `postgresql://` URL; see
    /// [`PostgresOptions::from_url`].
    pub async fn connect_url(url: &str) -> Result<PostgresBackend, BackendError> {
        PostgresBackend::connect(PostgresOptions::from_url(url)?).await
    }

    /// Connects, creates Upsilon's schema and tables if they are missing, and
    /// checks the stored format.
    pub async fn connect(options: PostgresOptions) -> Result<PostgresBackend, BackendError> {
        options.validate()?;
        let connector = Connector::new(&options)?;
        let sql = Sql::new(&options);
        let pool = Pool::new(options.clone(), connector.clone());
        let backend = PostgresBackend {
            inner: Arc::new(Inner {
                options,
                connector,
                pool,
                sql,
                wakeups: Arc::new(Wakeups::default()),
                session: std::sync::Mutex::new(None),
                opening: tokio::sync::Mutex::new(None),
                held_by: std::sync::Mutex::new(HashMap::new()),
            }),
        };
        backend.prepare_tables().await?;
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

    async fn conn(&self) -> Result<Conn<'_>, BackendError> {
        let timeout = self.inner.options.op_timeout;
        match tokio::time::timeout(timeout, self.inner.pool.get()).await {
            Ok(r) => r,
            Err(_) => Err(timed_out("connecting", timeout)),
        }
    }

    /// Ends one operation that ran under the operation timeout: on success
    /// the connection goes back to the pool; on an error any open transaction
    /// is rolled back first (or the connection closed if that fails); on a
    /// timeout the connection is closed.
    async fn settle<T>(
        &self,
        conn: &mut Conn<'_>,
        what: &str,
        result: Result<Result<T, BackendError>, tokio::time::error::Elapsed>,
    ) -> Result<T, BackendError> {
        match result {
            Err(_) => Err(timed_out(what, self.inner.options.op_timeout)),
            Ok(Ok(v)) => {
                conn.done();
                Ok(v)
            }
            Ok(Err(e)) => {
                let rollback = conn.client().batch_execute("ROLLBACK");
                if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), rollback).await {
                    conn.done();
                }
                Err(e)
            }
        }
    }

    async fn timed<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, BackendError>>,
    ) -> Result<Result<T, BackendError>, tokio::time::error::Elapsed> {
        tokio::time::timeout(self.inner.options.op_timeout, op).await
    }

    /// Creates what is missing, under a transaction-level advisory lock so
    /// that nodes starting together do not race; refuses unknown formats.
    async fn prepare_tables(&self) -> Result<(), BackendError> {
        let mut conn = self.conn().await?;
        let sql = &self.inner.sql;
        let first = conn.client().query_typed(&sql.format, &[]).await;
        match first {
            Ok(rows) if !rows.is_empty() => {
                let f: String = get(&rows[0], 0, "the stored format")?;
                check_format(&f)?;
                conn.done();
                return Ok(());
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.code(),
                    Some(&SqlState::UNDEFINED_TABLE) | Some(&SqlState::INVALID_SCHEMA_NAME)
                ) => {}
            Err(e) => return Err(driver_in(e, "reading Upsilon's stored format")),
        }
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

    /// The session's id, opening the session if needed; `None` when sessions
    /// are off (transaction pooling) or it cannot be opened (then dead holders
    /// are taken over after their TTL, and waiting nodes poll).
    async fn session_id(&self) -> Option<SessionId> {
        let inner = &self.inner;
        if inner.options.transaction_pooling {
            return None;
        }
        if let Some(s) = self.open_session() {
            return Some(s.id);
        }
        let mut failed_at = inner.opening.lock().await;
        if let Some(s) = self.open_session() {
            return Some(s.id);
        }
        if failed_at.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return None;
        }
        let opened = Session::open(
            &inner.options,
            &inner.connector,
            &inner.sql.channel,
            inner.wakeups.clone(),
        )
        .await;
        match opened {
            Ok(s) => {
                let id = s.id;
                *inner.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(s));
                *failed_at = None;
                Some(id)
            }
            Err(e) => {
                debug!(error = %e, "no listening session; polling, and dead holders expire by TTL");
                *failed_at = Some(Instant::now());
                None
            }
        }
    }

    /// The listening session, if one is open.
    fn open_session(&self) -> Option<Arc<Session>> {
        self.inner
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|s| s.is_open())
    }

    /// Clears the lease of `service`, whoever holds it: an operator's tool for
    /// a holder known to be dead. The fence stays: the next grant gets a
    /// higher one. The old holder can no longer renew or release, and its
    /// store writes are refused once the next holder has claimed the store.
    /// Returns the holder and fence that were cleared, if any.
    pub async fn force_release(
        &self,
        service: &str,
    ) -> Result<Option<(Holder, u64)>, BackendError> {
        let mut conn = self.conn().await?;
        let sql = &self.inner.sql;
        let stmt = [Stmt::Typed(
            &sql.force_release,
            vec![text(service), text(sql.channel.clone())],
        )];
        let op = async {
            let rows = first_error(pipeline(conn.client(), &stmt).await).map_err(driver)?;
            match rows[0].first() {
                Some(r) => {
                    let h: String = get(r, 0, "the lease holder")?;
                    let f = fence_from_column(get(r, 1, "the lease fence")?, "the lease's fence")?;
                    Ok(Some((Holder::decode(&h)?, f)))
                }
                None => Ok(None),
            }
        };
        let result = self.timed(op).await;
        self.settle(&mut conn, "force-releasing the lease", result)
            .await
    }

    /// Runs `work` in one transaction with the completion record of the task
    /// that `ctx` belongs to, so that the task's own writes commit exactly
    /// once: either both commit, or neither (the task then runs again).
    ///
    /// The transaction checks that `ctx`'s fence is still the store's newest
    /// before `work` runs and again, under the state row's lock, before it
    /// commits; a node that lost its lease commits nothing. `work` gets the
    /// open transaction; do every write that must happen once through it.
    ///
    /// The runner's own completion record that follows is then found already
    /// written and skipped. Return `Ok` from the task right after this call:
    /// the task is recorded completed once this returns `Ok`.
    ///
    /// ```no_run
    /// use upsilon_backends::postgres::PostgresBackend;
    ///
    /// #[upsilon::task(version = "1.1", order = 1)]
    /// async fn add_currency(ctx: &mut upsilon::TaskContext) -> Result<(), upsilon::BoxError> {
    ///     let pg = ctx.resource::<PostgresBackend>()?;
    ///     pg.complete_with(ctx, async |tx| {
    ///         tx.batch_execute("ALTER TABLE accounts ADD COLUMN currency text").await?;
    ///         tx.execute("UPDATE accounts SET currency = 'EUR'", &[]).await?;
    ///         Ok::<_, upsilon::BoxError>(())
    ///     })
    ///     .await
    /// }
    /// ```
    pub async fn complete_with<T, E, F>(&self, ctx: &TaskContext, work: F) -> Result<T, E>
    where
        F: AsyncFnOnce(&tokio_postgres::Transaction<'_>) -> Result<T, E>,
        E: From<BackendError>,
    {
        let sql = &self.inner.sql;
        let service = ctx.service();
        let fence = ctx.fence();
        let info = ctx.task();
        let key = TaskKey {
            version: info.version.clone(),
            id: info.id.clone(),
        };
        let finish = [Change::Finish(FinishAttempt {
            key: key.clone(),
            attempt: info.attempt,
            state: AttemptState::Completed,
            error: None,
            duration: Duration::ZERO,
        })];
        // The completion's own duration is the server's: from the row's start.
        let Columns::Finish {
            version,
            task_id,
            attempt,
            state,
            ..
        } = Columns::of(fence, &finish[0])?
        else {
            return Err(BackendError::other("a finish gave the columns of another change").into());
        };
        let finish_now = Stmt::Typed(
            &sql.finish_now,
            vec![
                text(service),
                text(version),
                text(task_id),
                int4(attempt),
                text(state),
            ],
        );
        let mut conn = self.conn().await?;
        let timeout = self.inner.options.op_timeout;
        let tx = tokio::time::timeout(timeout, conn.client_mut().transaction())
            .await
            .map_err(|_| timed_out("beginning a transaction", timeout))?
            .map_err(driver)?;
        // Before the work: is this attempt still ours to finish?
        let rows = tokio::time::timeout(
            timeout,
            tx.query_typed(
                &sql.snapshot,
                &[(&service, tokio_postgres::types::Type::TEXT)],
            ),
        )
        .await
        .map_err(|_| timed_out("reading the store", timeout))?
        .map_err(driver)?;
        let mut snap = snapshot_of(&rows)?;
        snap.clone().check(fence, &finish)?;

        let value = work(&tx).await?;

        // Lock the state row only now, so that renewals are not held up
        // while the work runs; then check again and record the completion.
        let context = format!("recording the completion of task {key}");
        let commit = async {
            let c = tx.client();
            let read = [
                Stmt::Typed(&sql.lock_row, vec![text(service)]),
                Stmt::Typed(&sql.snapshot, vec![text(service)]),
            ];
            let rows = first_error(pipeline(c, &read).await).map_err(|e| driver_in(e, &context))?;
            snap = snapshot_of(&rows[1])?;
            if !snap.check(fence, &finish)?.is_empty() {
                let write = [finish_now];
                first_error(pipeline(c, &write).await).map_err(|e| driver_in(e, &context))?;
            }
            Ok::<(), BackendError>(())
        };
        tokio::time::timeout(timeout, commit)
            .await
            .map_err(|_| timed_out("recording the completion", timeout))??;
        tokio::time::timeout(timeout, tx.commit())
            .await
            .map_err(|_| timed_out("committing", timeout))?
            .map_err(|e| driver_in(e, &context))?;
        conn.done();
        Ok(value)
    }
}

#[async_trait]
impl Lock for PostgresBackend {
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        self.inner.wakeups.mark_seen(service);
        let session = self.session_id().await;
        let sql = &self.inner.sql;
        let mut conn = self.conn().await?;
        let read = [
            Stmt::Simple("BEGIN"),
            Stmt::Typed(&sql.ensure_row, vec![text(service)]),
            Stmt::Typed(&sql.acquire_read, vec![text(service)]),
        ];
        let op = async {
            let c = conn.client();
            let rows = first_error(pipeline(c, &read).await).map_err(driver)?;
            let row = rows[2]
                .first()
                .ok_or_else(|| BackendError::corrupt("the state row vanished under its lock"))?;
            format_of(row, 0)?;
            let stored = StoredLease::from_columns(
                get(row, 3, "the lease holder")?,
                get(row, 4, "the lease fence")?,
                get(row, 5, "the lease expiry")?,
            )?;
            let now: i64 = get(row, 6, "the clock")?;
            let gone: bool = get(row, 7, "the holder's session")?;
            let seen = [
                fence_from_column(get(row, 1, "the granted fence")?, "the granted fence")?,
                fence_from_column(get(row, 2, "the store fence")?, "the store's fence")?,
                fence_from_column(get(row, 8, "the history's fence")?, "the history's fence")?,
            ];
            let stored = match stored {
                Some(s) if gone => {
                    if s.live(now).is_some() {
                        info!(%service, holder = %s.holder, "the lease holder's session is gone; taking the lease over");
                    }
                    None
                }
                other => other,
            };
            let decision = decide_acquire(service, stored.as_ref(), now, seen, holder, ttl)?;
            let lease = match decision {
                Acquire::Granted(lease) => lease,
                Acquire::Held(info) => {
                    first_error(pipeline(c, &[Stmt::Simple("COMMIT")]).await).map_err(driver)?;
                    let session = match (
                        get(row, 9, "the holder's session")?,
                        get(row, 10, "the holder's session")?,
                    ) {
                        (Some(pid), Some(server_start)) => Some(SessionId { pid, server_start }),
                        _ => None,
                    };
                    self.inner
                        .held_by
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(service.to_owned(), (info.fence, session));
                    return Ok(Acquire::Held(info));
                }
            };
            let write = [
                Stmt::Typed(
                    &sql.grant,
                    vec![
                        text(service),
                        int8(fence_to_column(lease.fence)?),
                        text(holder.encode()),
                        int8(lease.expires_at_ms),
                        opt_int4(session.map(|s| s.pid)),
                        opt_int8(session.map(|s| s.server_start)),
                    ],
                ),
                Stmt::Simple("COMMIT"),
            ];
            let rows = first_error(pipeline(c, &write).await).map_err(driver)?;
            if rows[0].is_empty() {
                return Err(BackendError::corrupt(
                    "the state row vanished under its lock",
                ));
            }
            Ok(Acquire::Granted(lease))
        };
        let result = self.timed(op).await;
        self.settle(&mut conn, "acquiring the lease", result).await
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, BackendError> {
        // A renewal must not wait long for a session: without one the lease
        // row names none, and a dead holder is then taken over by its TTL.
        let session = tokio::time::timeout(Duration::from_millis(500), self.session_id())
            .await
            .ok()
            .flatten();
        let sql = &self.inner.sql;
        let mut conn = self.conn().await?;
        let stmt = [Stmt::Typed(
            &sql.renew,
            vec![
                text(lease.service.clone()),
                text(lease.holder.encode()),
                int8(fence_to_column(lease.fence)?),
                int8(ttl_ms(lease.ttl)?),
                opt_int4(session.map(|s| s.pid)),
                opt_int8(session.map(|s| s.server_start)),
            ],
        )];
        let op = async {
            let rows = first_error(pipeline(conn.client(), &stmt).await).map_err(driver)?;
            match rows[0].first() {
                Some(r) => Ok(Lease {
                    expires_at_ms: get(r, 0, "the lease expiry")?,
                    ..lease.clone()
                }),
                None => Err(BackendError::lease_lost("renew", lease)),
            }
        };
        let result = self.timed(op).await;
        self.settle(&mut conn, "renewing the lease", result).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        let sql = &self.inner.sql;
        let mut conn = self.conn().await?;
        let stmt = [Stmt::Typed(
            &sql.release,
            vec![
                text(lease.service.clone()),
                text(lease.holder.encode()),
                int8(fence_to_column(lease.fence)?),
                text(sql.channel.clone()),
            ],
        )];
        let op = async {
            let rows = first_error(pipeline(conn.client(), &stmt).await).map_err(driver)?;
            if rows[0].len() == 1 {
                Ok(())
            } else {
                Err(BackendError::lease_lost("release", lease))
            }
        };
        let result = self.timed(op).await;
        self.settle(&mut conn, "releasing the lease", result).await
    }

    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        let sql = &self.inner.sql;
        let mut conn = self.conn().await?;
        let stmt = [Stmt::Typed(&sql.current, vec![text(service)])];
        let op = async {
            let rows = first_error(pipeline(conn.client(), &stmt).await).map_err(driver)?;
            let Some(r) = rows[0].first() else {
                return Ok(None);
            };
            if get::<bool>(r, 4, "the holder's session")? {
                return Ok(None);
            }
            let stored = StoredLease::from_columns(
                get(r, 0, "the lease holder")?,
                get(r, 1, "the lease fence")?,
                get(r, 2, "the lease expiry")?,
            )?;
            let now = get(r, 3, "the clock")?;
            Ok(stored.and_then(|s| s.live(now)))
        };
        let result = self.timed(op).await;
        self.settle(&mut conn, "reading the lease", result).await
    }

    async fn wait(
        &self,
        service: &str,
        seen: &LeaseInfo,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        let Some(session) = self
            .open_session()
            .filter(|_| !self.inner.options.transaction_pooling)
        else {
            tokio::time::sleep(timeout).await;
            return Ok(());
        };
        let since = self.inner.wakeups.take_seen(service);
        let holder = self
            .inner
            .held_by
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .filter(|(fence, _)| *fence == seen.fence)
            .and_then(|(_, s)| *s);
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // A notification ends the wait; so does the holder's session
            // ending, which no notification reports: check it now and then.
            let slice = match holder {
                Some(_) => jitter(self.inner.options.holder_check).min(left),
                None => left,
            };
            if self.inner.wakeups.wait_since(service, since, slice).await {
                return Ok(());
            }
            let Some(h) = holder.filter(|_| Instant::now() < deadline) else {
                return Ok(());
            };
            let params: [(&(dyn ToSql + Sync), Type); 2] =
                [(&h.pid, Type::INT4), (&h.server_start, Type::INT8)];
            let check = session
                .client
                .query_typed(&self.inner.sql.session_gone, &params);
            match tokio::time::timeout(Duration::from_secs(2), check).await {
                Ok(Ok(rows)) if rows.first().is_some_and(|r| !r.get::<_, bool>(0)) => {}
                // Gone, or the check failed: let the runner ask for the lease.
                _ => return Ok(()),
            }
        }
    }

    fn notifies(&self) -> bool {
        !self.inner.options.transaction_pooling && self.open_session().is_some()
    }
}

impl PostgresBackend {
    /// Opens a transaction, locks the state row of `service` (creating it if
    /// missing) and reads the snapshot: one round trip.
    /// Begins a transaction, locks the service's state row and reads the
    /// snapshot, with the summaries of the tasks in `only` (every task for
    /// `None`): a write reads only what it touches, so that its cost does not
    /// grow with the history.
    async fn locked_snapshot(
        &self,
        c: &tokio_postgres::Client,
        service: &str,
        only: Option<&BTreeSet<&TaskKey>>,
    ) -> Result<Snapshot, BackendError> {
        let sql = &self.inner.sql;
        let read_snapshot = match only {
            None => Stmt::Typed(&sql.snapshot, vec![text(service)]),
            Some(keys) => Stmt::Typed(
                &sql.snapshot_of_tasks,
                vec![
                    text(service),
                    text_array(keys.iter().map(|k| k.version.to_string()).collect()),
                    text_array(keys.iter().map(|k| k.id.clone()).collect()),
                ],
            ),
        };
        let read = [
            Stmt::Simple("BEGIN"),
            Stmt::Typed(&sql.ensure_row, vec![text(service)]),
            Stmt::Typed(&sql.lock_row, vec![text(service)]),
            read_snapshot,
        ];
        let rows = first_error(pipeline(c, &read).await).map_err(driver)?;
        snapshot_of(&rows[3])
    }

    /// The statement that stores `columns` for `service`.
    fn write_stmt<'s>(&'s self, service: &str, columns: Columns) -> Stmt<'s> {
        let sql = &self.inner.sql;
        match columns {
            Columns::Start {
                version,
                task_id,
                attempt,
                kind,
                fence,
                holder,
                description,
            } => Stmt::Typed(
                &sql.start,
                vec![
                    text(service),
                    text(version),
                    text(task_id),
                    int4(attempt),
                    text(kind),
                    int8(fence),
                    text(holder),
                    text(description),
                ],
            ),
            Columns::Finish {
                version,
                task_id,
                attempt,
                state,
                duration_ms,
                error,
            } => Stmt::Typed(
                &sql.finish,
                vec![
                    text(service),
                    text(version),
                    text(task_id),
                    int4(attempt),
                    text(state),
                    int8(duration_ms),
                    opt_text(error),
                ],
            ),
            Columns::DataVersion(v) => Stmt::Typed(&sql.data_version, vec![text(service), text(v)]),
            Columns::Baseline(v) => Stmt::Typed(&sql.baseline, vec![text(service), text(v)]),
        }
    }
}

#[async_trait]
impl Store for PostgresBackend {
    async fn load(&self, service: &str) -> Result<Snapshot, BackendError> {
        let sql = &self.inner.sql;
        let mut conn = self.conn().await?;
        let stmt = [Stmt::Typed(&sql.snapshot, vec![text(service)])];
        let op = async {
            let rows = first_error(pipeline(conn.client(), &stmt).await).map_err(driver)?;
            snapshot_of(&rows[0])
        };
        let result = self.timed(op).await;
        self.settle(&mut conn, "reading the store", result).await
    }

    async fn claim(&self, service: &str, fence: u64) -> Result<Snapshot, BackendError> {
        let sql = &self.inner.sql;
        let mut conn = self.conn().await?;
        let op = async {
            let c = conn.client();
            let mut snap = self.locked_snapshot(c, service, None).await?;
            let mut write = Vec::with_capacity(2);
            if snap.claim(fence)? {
                write.push(Stmt::Typed(
                    &sql.raise_fence,
                    vec![text(service), int8(fence_to_column(fence)?)],
                ));
            }
            write.push(Stmt::Simple("COMMIT"));
            first_error(pipeline(c, &write).await).map_err(driver)?;
            Ok(snap)
        };
        let result = self.timed(op).await;
        self.settle(&mut conn, "claiming the store", result).await
    }

    async fn apply(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
    ) -> Result<(), BackendError> {
        let sql = &self.inner.sql;
        let mut conn = self.conn().await?;
        let op = async {
            let c = conn.client();
            let touched = Change::touched(changes);
            let mut snap = self.locked_snapshot(c, service, touched.as_ref()).await?;
            let todo = snap.check(fence, changes)?;
            let mut write = Vec::with_capacity(todo.len() + 2);
            let mut notify = false;
            for change in todo {
                let columns = Columns::of(fence, change)?;
                notify |= columns.wakes_waiters();
                write.push(self.write_stmt(service, columns));
            }
            if notify {
                write.push(Stmt::Typed(
                    &sql.notify,
                    vec![text(sql.channel.clone()), text(service)],
                ));
            }
            write.push(Stmt::Simple("COMMIT"));
            first_error(pipeline(c, &write).await).map_err(driver)?;
            Ok(())
        };
        let result = self.timed(op).await;
        self.settle(&mut conn, "writing to the store", result).await
    }

    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>, BackendError> {
        let sql = &self.inner.sql;
        let mut conn = self.conn().await?;
        let stmts = [
            Stmt::Typed(&sql.format, vec![]),
            Stmt::Typed(&sql.history_rows, vec![text(service)]),
        ];
        let op = async {
            let rows = first_error(pipeline(conn.client(), &stmts).await).map_err(driver)?;
            match rows[0].first() {
                Some(r) => format_of(r, 0)?,
                None => return Err(BackendError::corrupt("the meta table has no `format` row")),
            }
            let mut out = Vec::with_capacity(rows[1].len());
            for r in &rows[1] {
                let columns = HistoryColumns {
                    summary: summary(r, 0)?,
                    holder: get(r, 6, "a history row's holder")?,
                    description: get(r, 7, "a history row's description")?,
                    started_ms: get(r, 8, "a start time")?,
                    finished_ms: get(r, 9, "an end time")?,
                    duration_ms: get(r, 10, "a duration")?,
                    error: get(r, 11, "an error text")?,
                };
                out.push(columns.decode()?);
            }
            Ok(out)
        };
        let result = self.timed(op).await;
        self.settle(&mut conn, "reading the history", result).await
    }
}
