//! The embedded default: lease, fences, state and history in one SQLite file,
//! for the processes of one host.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use upsilon_backends::sqlite::{SqliteBackend, SqliteOptions};
//!
//! let backend = SqliteBackend::open_with(
//!     "/var/lib/app/upsilon.db",
//!     SqliteOptions::default(),
//! )
//! .await?;
//! let upsilon = upsilon::Upsilon::builder()
//!     .service("billing")
//!     .app_version(env!("CARGO_PKG_VERSION"))
//!     .backend(Arc::new(backend))
//!     .build()?;
//! upsilon.run().await?;
//! # Ok(()) }
//! ```
//!
//! How it works (docs/SQLITE.md says more):
//! - Every operation is one `BEGIN IMMEDIATE` transaction, so SQLite's file
//!   lock serialises them across processes.
//! - The lease's expiry is judged by `CLOCK_MONOTONIC`, read once the
//!   transaction holds the lock ([`Clock`]): it never steps and every process
//!   on the host shares it, so a wall-clock step neither hands a live lease
//!   over nor keeps a dead one. The boot id is stored with the lease: a lease
//!   written in an earlier boot has expired.
//! - The fences live apart from the state row, so deleting that row takes
//!   neither back; a grant is also above every fence in the history.
//! - WAL with `synchronous = FULL`: an acknowledged commit survives a power
//!   loss, so a grant's fence is never granted again.
//! - A file on a network filesystem is refused
//!   ([`SqliteOptions::allow_network_filesystem`]): SQLite's locking does not
//!   hold between hosts. Use PostgreSQL for a cluster of hosts.
//! - Waiting nodes poll.
//!
//! Tables (`upsilon_` prefix, shared by every service in the file):
//! - `upsilon_meta(key, value)`: the stored format (`format` = 2; a format-1
//!   file is migrated when it is opened);
//! - `upsilon_state(service, data_version, baseline, lease_holder,
//!   lease_fence, lease_expires_ms, lease_boot)`: one row per service;
//! - `upsilon_fence(service, granted, store_fence)`: the newest fence
//!   granted and claimed, per service, kept when the state row is deleted;
//! - `upsilon_history(...)`: one row per task attempt.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, Transaction, TransactionBehavior};
use upsilon::backend::BackendError;

mod clock;
mod filesystem;
mod lock;
mod options;
mod rows;
mod schema;
mod store;
#[cfg(test)]
mod tests;

pub use clock::{Clock, HostTime, SystemClock};
pub use options::SqliteOptions;
/// The driver, for task crates that use the same database file: a task
/// crate that depends on another `rusqlite` than this one fails to build (two
/// `libsqlite3-sys`), so use this one (`upsilon_backends::sqlite::rusqlite`).
pub use rusqlite;
pub use schema::FORMAT;

type Result<T, E = BackendError> = std::result::Result<T, E>;

/// Lock and store in one SQLite database file.
#[derive(Debug, Clone)]
pub struct SqliteBackend {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    clock: Arc<dyn Clock>,
    by_wall_clock: bool,
}

/// The time a transaction runs at, read once it holds the file's lock.
struct Now {
    /// Wall-clock ms since the epoch: history timestamps, and the times
    /// leases are reported at.
    wall: i64,
    /// The clock lease expiry is judged by, in ms: `CLOCK_MONOTONIC`, or the
    /// wall clock under [`SqliteOptions::judge_expiry_by_wall_clock`].
    lease: i64,
    /// The host's boot: a lease written in another one has expired.
    boot: String,
}

impl Now {
    fn read(clock: &dyn Clock, by_wall_clock: bool) -> Result<Now> {
        let t = clock.now()?;
        Ok(Now {
            wall: t.wall_ms,
            lease: if by_wall_clock {
                t.wall_ms
            } else {
                t.monotonic_ms
            },
            boot: t.boot_id,
        })
    }

    /// `at` on the lease clock as wall-clock ms: now, plus the time left
    /// until `at`. Only the difference of two reported times means anything
    /// when the wall clock steps.
    fn reported(&self, at: i64) -> i64 {
        self.wall.saturating_add(at.saturating_sub(self.lease))
    }
}

fn driver(e: rusqlite::Error) -> BackendError {
    if driver_is_busy(&e) {
        BackendError::unavailable(e)
    } else {
        BackendError::other(e)
    }
}

impl SqliteBackend {
    /// Opens (creating if needed) the database at `path` with the default
    /// [`SqliteOptions`], creates Upsilon's tables and checks the stored
    /// format.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteBackend> {
        SqliteBackend::open_with(path, SqliteOptions::default()).await
    }

    /// [`SqliteBackend::open`] with `options`. A database on a network
    /// filesystem is refused unless
    /// [`SqliteOptions::allow_network_filesystem`].
    pub async fn open_with(
        path: impl AsRef<Path>,
        options: SqliteOptions,
    ) -> Result<SqliteBackend> {
        let path = path.as_ref().to_path_buf();
        if path.as_os_str().is_empty() {
            return Err(BackendError::other(
                "the SQLite path is empty; give a file path like `sqlite:///var/lib/app/upsilon.db`",
            ));
        }
        let p = path.clone();
        let (clock, by_wall_clock) = (options.clock.clone(), options.judge_expiry_by_wall_clock);
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection> {
            filesystem::check(&p, options.allow_network_filesystem)?;
            let mut conn = connect(&p)?;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(driver)?;
            // A clock that cannot be read fails the open, not the first lease.
            let now = Now::read(&*clock, by_wall_clock)?;
            schema::prepare(&tx, &now)?;
            tx.commit().map_err(driver)?;
            Ok(conn)
        })
        .await
        .map_err(BackendError::other)??;
        Ok(SqliteBackend {
            conn: Arc::new(Mutex::new(conn)),
            path,
            clock: options.clock,
            by_wall_clock,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction on a blocking thread,
    /// with the time read once the transaction holds the file's lock, and
    /// commits if it returns `Ok`.
    async fn tx<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>, &Now) -> Result<T> + Send + 'static,
    {
        let (conn, clock, by_wall_clock) =
            (self.conn.clone(), self.clock.clone(), self.by_wall_clock);
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(driver)?;
            schema::check_stored(&tx)?;
            let now = Now::read(&*clock, by_wall_clock)?;
            let value = f(&tx, &now)?;
            tx.commit().map_err(driver)?;
            Ok(value)
        })
        .await
        .map_err(BackendError::other)?
    }
}

/// Opens a connection to `path` as the backend uses every one: WAL, a busy
/// timeout, and `synchronous = FULL`, which syncs the WAL at every commit.
/// `NORMAL` (SQLite's WAL default) syncs only at checkpoints, so a power loss
/// can take back the newest acknowledged commits: a lost grant would let the
/// next grant reuse its fence while the first holder still works.
fn connect(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).map_err(|e| cannot_open(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(driver)?;
    wal(&conn)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(driver)?;
    Ok(conn)
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
fn wal(conn: &Connection) -> Result<()> {
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
