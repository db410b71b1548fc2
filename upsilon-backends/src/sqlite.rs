//! The embedded default: lease, fence, state and history in one SQLite file.
//!
//! Safe across processes on one host: every operation is one
//! `BEGIN IMMEDIATE` transaction, so SQLite's file lock serialises them, and
//! the lease's expiry is judged by the host's clock. Use a local disk: SQLite's
//! locking is not reliable on network file systems. Waiting nodes poll.
//!
//! Tables (`upsilon_` prefix, shared by every service in the file):
//! - `upsilon_meta(key, value)`: the stored format (`format` = 1);
//! - `upsilon_state(service, data_version, baseline, store_fence, granted,
//!   lease_holder, lease_fence, lease_expires_ms)`: one row per service;
//! - `upsilon_history(...)`: one row per task attempt.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use upsilon::backend::{
    decide_acquire, fence_from_column, fence_to_column, ttl_ms, Acquire, BackendError, Change,
    Columns, HistoryColumns, HistoryEntry, Lease, LeaseInfo, Lock, Snapshot, StateColumns, Store,
    StoredLease, SummaryColumns, Value, Write,
};
use upsilon::{Holder, TaskKey};

/// The driver, for task crates that use the same database file: a task
/// crate that depends on another `rusqlite` than this one fails to build (two
/// `libsqlite3-sys`), so use this one (`upsilon_backends::sqlite::rusqlite`).
pub use rusqlite;

/// The stored format this build writes and reads.
pub const FORMAT: u32 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS upsilon_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS upsilon_state (
    service          TEXT PRIMARY KEY,
    data_version     TEXT,
    baseline         TEXT,
    store_fence      INTEGER NOT NULL DEFAULT 0,
    granted          INTEGER NOT NULL DEFAULT 0,
    lease_holder     TEXT,
    lease_fence      INTEGER,
    lease_expires_ms INTEGER
);
CREATE TABLE IF NOT EXISTS upsilon_history (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    service      TEXT NOT NULL,
    version      TEXT NOT NULL,
    task_id      TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    state        TEXT NOT NULL,
    fence        INTEGER NOT NULL,
    holder       TEXT NOT NULL,
    description  TEXT NOT NULL,
    started_ms   INTEGER NOT NULL,
    finished_ms  INTEGER,
    duration_ms  INTEGER,
    error        TEXT,
    UNIQUE (service, version, task_id, attempt)
);
";

/// The host's clock in ms, as SQLite computes it, so every process agrees.
const NOW_MS: &str = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";

/// Lock and store in one SQLite database file.
#[derive(Debug, Clone)]
pub struct SqliteBackend {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

fn driver(e: rusqlite::Error) -> BackendError {
    if driver_is_busy(&e) {
        BackendError::unavailable(e)
    } else {
        BackendError::other(e)
    }
}

impl SqliteBackend {
    /// Opens (creating if needed) the database at `path`, creates Upsilon's
    /// tables and checks the stored format.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteBackend, BackendError> {
        let path = path.as_ref().to_path_buf();
        if path.as_os_str().is_empty() {
            return Err(BackendError::other(
                "the SQLite path is empty; give a file path like `sqlite:///var/lib/app/upsilon.db`",
            ));
        }
        let p = path.clone();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection, BackendError> {
            let conn = Connection::open(&p).map_err(|e| cannot_open(&p, e))?;
            conn.busy_timeout(BUSY_TIMEOUT).map_err(driver)?;
            wal(&conn)?;
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(driver)?;
            let mut conn = conn;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(driver)?;
            tx.execute_batch(SCHEMA).map_err(driver)?;
            let format: Option<String> = tx
                .query_row(
                    "SELECT value FROM upsilon_meta WHERE key = 'format'",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(driver)?;
            match format {
                None => {
                    tx.execute(
                        "INSERT INTO upsilon_meta (key, value) VALUES ('format', ?1)",
                        [FORMAT.to_string()],
                    )
                    .map_err(driver)?;
                }
                Some(f) => check_format(&f)?,
            }
            tx.commit().map_err(driver)?;
            Ok(conn)
        })
        .await
        .map_err(BackendError::other)??;
        Ok(SqliteBackend {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction on a blocking thread,
    /// committing if it returns `Ok`.
    async fn tx<T, F>(&self, f: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, BackendError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(driver)?;
            let format: String = tx
                .query_row(
                    "SELECT value FROM upsilon_meta WHERE key = 'format'",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(driver)?
                .ok_or_else(|| BackendError::corrupt("upsilon_meta has no `format` row"))?;
            check_format(&format)?;
            let value = f(&tx)?;
            tx.commit().map_err(driver)?;
            Ok(value)
        })
        .await
        .map_err(BackendError::other)?
    }
}

/// How long a statement waits for another process's lock on the file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `path` could not be opened, said once: the path, then the reason.
fn cannot_open(path: &Path, e: rusqlite::Error) -> BackendError {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let why = match std::fs::metadata(dir) {
        Err(_) => format!(
            "its directory {} does not exist; create it first",
            dir.display()
        ),
        Ok(m) if !m.is_dir() => format!("{} is not a directory", dir.display()),
        Ok(_) if path.is_dir() => "it is a directory; give the path of a file in it".to_owned(),
        Ok(_) => match &e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::CannotOpen => {
                format!(
                    "SQLite cannot open or create it; check that this process may write to {}",
                    dir.display()
                )
            }
            rusqlite::Error::SqliteFailure(f, _) => f.to_string(),
            other => other.to_string(),
        },
    };
    BackendError::other(format!(
        "cannot open the SQLite database {}: {why}",
        path.display()
    ))
}

/// Switches the file to WAL. The switch takes the file's lock without the
/// busy timeout, so processes that open a new file at once retry it here
/// until the timeout instead of failing with `database is locked`.
fn wal(conn: &Connection) -> Result<(), BackendError> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(e @ rusqlite::Error::SqliteFailure(..))
                if driver_is_busy(&e) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(upsilon::backend::jitter(Duration::from_millis(10)));
            }
            other => return other.map_err(driver),
        }
    }
}

fn driver_is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            )
    )
}

fn check_format(found: &str) -> Result<(), BackendError> {
    BackendError::check_format(found, FORMAT, "upsilon_meta.format")
}

fn now_ms(tx: &Transaction<'_>) -> Result<i64, BackendError> {
    tx.query_row(&format!("SELECT {NOW_MS}"), [], |r| r.get(0))
        .map_err(driver)
}

/// The state row of `service`, created if missing.
struct StateRow {
    columns: StateColumns,
    granted: i64,
    lease: Option<StoredLease>,
}

fn state(tx: &Transaction<'_>, service: &str) -> Result<StateRow, BackendError> {
    tx.execute(
        "INSERT OR IGNORE INTO upsilon_state (service) VALUES (?1)",
        [service],
    )
    .map_err(driver)?;
    let (columns, granted, holder, fence, expires) = tx
        .query_row(
            "SELECT data_version, baseline, store_fence, granted, lease_holder, lease_fence, lease_expires_ms
             FROM upsilon_state WHERE service = ?1",
            [service],
            |r| {
                Ok((
                    StateColumns {
                        data_version: r.get(0)?,
                        baseline: r.get(1)?,
                        store_fence: r.get(2)?,
                    },
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                ))
            },
        )
        .map_err(driver)?;
    Ok(StateRow {
        columns,
        granted,
        lease: StoredLease::from_columns(holder.as_deref(), fence, expires)?,
    })
}

fn summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<SummaryColumns> {
    Ok(SummaryColumns {
        version: r.get(0)?,
        task_id: r.get(1)?,
        attempt: r.get(2)?,
        kind: r.get(3)?,
        state: r.get(4)?,
        fence: r.get(5)?,
    })
}

fn snapshot(tx: &Transaction<'_>, service: &str) -> Result<Snapshot, BackendError> {
    snapshot_of(tx, service, None)
}

/// The state of `service` with the summaries of the tasks in `only`, or of
/// every task. A write needs only the tasks it touches, so that its cost does
/// not grow with the history.
fn snapshot_of(
    tx: &Transaction<'_>,
    service: &str,
    only: Option<&BTreeSet<&TaskKey>>,
) -> Result<Snapshot, BackendError> {
    let row = state(tx, service)?;
    let mut rows = Vec::new();
    match only {
        None => {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT version, task_id, attempt, kind, state, fence FROM upsilon_history
                     WHERE service = ?1 ORDER BY id",
                )
                .map_err(driver)?;
            for r in stmt.query_map([service], summary).map_err(driver)? {
                rows.push(r.map_err(driver)?);
            }
        }
        Some(keys) => {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT version, task_id, attempt, kind, state, fence FROM upsilon_history
                     WHERE service = ?1 AND version = ?2 AND task_id = ?3 ORDER BY id",
                )
                .map_err(driver)?;
            for k in keys {
                let found = stmt
                    .query_map(params![service, k.version.to_string(), k.id], summary)
                    .map_err(driver)?;
                for r in found {
                    rows.push(r.map_err(driver)?);
                }
            }
        }
    }
    Snapshot::from_columns(row.columns, rows)
}

#[async_trait]
impl Lock for SqliteBackend {
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        let (service, holder) = (service.to_owned(), holder.clone());
        self.tx(move |tx| {
            let row = state(tx, &service)?;
            let now = now_ms(tx)?;
            let history_max: i64 = tx
                .query_row(
                    "SELECT COALESCE(MAX(fence), 0) FROM upsilon_history WHERE service = ?1",
                    [&service],
                    |r| r.get(0),
                )
                .map_err(driver)?;
            let seen = [
                fence_from_column(row.granted, "the granted fence")?,
                fence_from_column(row.columns.store_fence, "the store's fence")?,
                fence_from_column(history_max, "the history's fence")?,
            ];
            let decision = decide_acquire(&service, row.lease.as_ref(), now, seen, &holder, ttl)?;
            if let Acquire::Granted(lease) = &decision {
                tx.execute(
                    "UPDATE upsilon_state SET granted = ?2, lease_holder = ?3, lease_fence = ?2,
                     lease_expires_ms = ?4 WHERE service = ?1",
                    params![
                        service,
                        fence_to_column(lease.fence)?,
                        holder.encode(),
                        lease.expires_at_ms
                    ],
                )
                .map_err(driver)?;
            }
            Ok(decision)
        })
        .await
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, BackendError> {
        let lease = lease.clone();
        self.tx(move |tx| {
            let ttl_ms = ttl_ms(lease.ttl)?;
            let exp: Option<i64> = tx
                .query_row(
                    &format!(
                        "UPDATE upsilon_state SET lease_expires_ms = {NOW_MS} + ?4
                         WHERE service = ?1 AND lease_holder = ?2 AND lease_fence = ?3
                           AND lease_expires_ms > {NOW_MS}
                         RETURNING lease_expires_ms"
                    ),
                    params![
                        lease.service,
                        lease.holder.encode(),
                        lease.fence as i64,
                        ttl_ms
                    ],
                    |r| r.get(0),
                )
                .optional()
                .map_err(driver)?;
            match exp {
                Some(expires_at_ms) => Ok(Lease {
                    expires_at_ms,
                    ..lease
                }),
                None => Err(BackendError::lease_lost("renew", &lease)),
            }
        })
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        let lease = lease.clone();
        self.tx(move |tx| {
            let n = tx
                .execute(
                    &format!(
                        "UPDATE upsilon_state SET lease_holder = NULL, lease_fence = NULL,
                         lease_expires_ms = NULL
                         WHERE service = ?1 AND lease_holder = ?2 AND lease_fence = ?3
                           AND lease_expires_ms > {NOW_MS}"
                    ),
                    params![lease.service, lease.holder.encode(), lease.fence as i64],
                )
                .map_err(driver)?;
            if n == 1 {
                Ok(())
            } else {
                Err(BackendError::lease_lost("release", &lease))
            }
        })
        .await
    }

    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        let service = service.to_owned();
        self.tx(move |tx| {
            let row = state(tx, &service)?;
            let now = now_ms(tx)?;
            Ok(row.lease.and_then(|l| l.live(now)))
        })
        .await
    }
}

#[async_trait]
impl Store for SqliteBackend {
    async fn load(&self, service: &str) -> Result<Snapshot, BackendError> {
        let service = service.to_owned();
        self.tx(move |tx| snapshot(tx, &service)).await
    }

    async fn claim(&self, service: &str, fence: u64) -> Result<Snapshot, BackendError> {
        let service = service.to_owned();
        self.tx(move |tx| {
            let mut snap = snapshot(tx, &service)?;
            if snap.claim(fence)? {
                tx.execute(
                    "UPDATE upsilon_state SET store_fence = ?2 WHERE service = ?1",
                    params![service, fence_to_column(fence)?],
                )
                .map_err(driver)?;
            }
            Ok(snap)
        })
        .await
    }

    async fn apply(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
    ) -> Result<(), BackendError> {
        let service = service.to_owned();
        let changes = changes.to_vec();
        self.tx(move |tx| {
            let touched = Change::touched(&changes);
            let mut snap = snapshot_of(tx, &service, touched.as_ref())?;
            let todo = snap.check(fence, &changes)?;
            let now = now_ms(tx)?;
            for change in todo {
                write(tx, &service, now, Columns::of(fence, change)?)?;
            }
            Ok(())
        })
        .await
    }

    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>, BackendError> {
        let service = service.to_owned();
        self.tx(move |tx| {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT version, task_id, attempt, kind, state, fence, holder, description,
                            started_ms, finished_ms, duration_ms, error
                     FROM upsilon_history WHERE service = ?1 ORDER BY id",
                )
                .map_err(driver)?;
            let rows = stmt
                .query_map([&service], |r| {
                    Ok(HistoryColumns {
                        summary: summary(r)?,
                        holder: r.get(6)?,
                        description: r.get(7)?,
                        started_ms: r.get(8)?,
                        finished_ms: r.get(9)?,
                        duration_ms: r.get(10)?,
                        error: r.get(11)?,
                    })
                })
                .map_err(driver)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row.map_err(driver)?.decode()?);
            }
            Ok(out)
        })
        .await
    }
}

fn write(
    tx: &Transaction<'_>,
    service: &str,
    now: i64,
    columns: Columns,
) -> Result<(), BackendError> {
    let sql = match columns.write() {
        Write::Start => {
            "INSERT INTO upsilon_history
               (service, version, task_id, attempt, kind, fence, holder, description, state, started_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'running', ?9)"
        }
        Write::Finish => {
            "UPDATE upsilon_history SET state = ?5, duration_ms = ?6, error = ?7, finished_ms = ?8
             WHERE service = ?1 AND version = ?2 AND task_id = ?3 AND attempt = ?4"
        }
        Write::DataVersion => "UPDATE upsilon_state SET data_version = ?2 WHERE service = ?1",
        Write::Baseline => {
            "UPDATE upsilon_state SET data_version = ?2, baseline = ?2 WHERE service = ?1"
        }
        other => {
            return Err(BackendError::other(format!(
                "this SQLite backend does not know the write {other:?}"
            )))
        }
    };
    let now =
        matches!(columns.write(), Write::Start | Write::Finish).then_some(SqlValue::Integer(now));
    let values = std::iter::once(SqlValue::Text(service.to_owned()))
        .chain(columns.into_values().into_iter().map(sql_value))
        .chain(now);
    tx.execute(sql, rusqlite::params_from_iter(values))
        .map(|_| ())
        .map_err(driver)
}

fn sql_value(value: Value) -> SqlValue {
    match value {
        Value::Text(t) => SqlValue::Text(t),
        Value::OptText(t) => t.map_or(SqlValue::Null, SqlValue::Text),
        Value::Int4(i) => SqlValue::Integer(i.into()),
        Value::Int8(i) => SqlValue::Integer(i),
    }
}
