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
//! - Every operation that may write is one `BEGIN IMMEDIATE` transaction,
//!   so SQLite's file lock serialises them across processes. Reads take no
//!   write lock: the snapshot of a service whose rows exist is one
//!   statement (SQLite reads it as one snapshot of the file); its history
//!   and the services are deferred transactions; so is the check at open
//!   of a file that is already set up.
//! - The connection belongs to one thread of the backend's, which runs its
//!   calls in turn. A snapshot read runs on the caller's thread instead
//!   when the connection is free, no call waits for it and the last read
//!   found at most 32 tasks: it then takes microseconds, less than the
//!   hand-off to the backend's thread. It does not wait for the file there:
//!   a read that would wait for a lock goes to the backend's thread, which
//!   waits with the busy timeout.
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

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, Transaction, TransactionBehavior};
use tokio::sync::oneshot;
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
mod worker;

pub use clock::{Clock, HostTime, SystemClock};
pub use options::SqliteOptions;
/// The driver, for task crates that use the same database file: a task
/// crate that depends on another `rusqlite` than this one fails to build (two
/// `libsqlite3-sys`), so use this one (`upsilon_backends::sqlite::rusqlite`).
pub use rusqlite;
pub use schema::FORMAT;

type Result<T, E = BackendError> = std::result::Result<T, E>;

/// Lock and store in one SQLite database file.
///
/// Clones share one connection. Its calls run in turn on a blocking thread,
/// one thread while they keep coming ([`worker`]). The connection closes
/// when the last clone is dropped, or after the call that runs then.
#[derive(Debug, Clone)]
pub struct SqliteBackend {
    shared: Arc<Shared>,
}

/// What the clones of a backend share.
#[derive(Debug)]
struct Shared {
    session: Mutex<Session>,
    queue: Arc<worker::Queue>,
    path: PathBuf,
    /// Reads may run on the caller's thread ([`SqliteBackend::read_here`]):
    /// no read has yet found the store too large for it, or the last one
    /// found it small enough again.
    read_here: AtomicBool,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// The backend's connection, and the clocks its transactions read.
struct Session {
    conn: Connection,
    clock: Arc<dyn Clock>,
    by_wall_clock: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("conn", &self.conn)
            .field("clock", &self.clock)
            .field("by_wall_clock", &self.by_wall_clock)
            .finish()
    }
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

/// Runs `sql`, prepared once per connection, with `params`: the rows it
/// changed.
fn exec(tx: &Transaction<'_>, sql: &str, params: impl rusqlite::Params) -> Result<usize> {
    tx.prepare_cached(sql)
        .and_then(|mut stmt| stmt.execute(params))
        .map_err(driver)
}

/// The first row of `sql`, prepared once per connection, run with `params`.
fn query_row<T>(
    tx: &Transaction<'_>,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    tx.prepare_cached(sql)?.query_row(params, f)
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
        filesystem::check(&path, options.allow_network_filesystem)?;
        if let Some(session) = Session::open_here(&path, &options) {
            return Ok(SqliteBackend::serving(session, path, false));
        }
        let (opened, open_result) = oneshot::channel();
        let p = path.clone();
        // The thread that opens the file goes on to take the backend's
        // first calls: a start-up's read follows at once.
        tokio::task::spawn_blocking(move || {
            let session = match guarded(|| Session::open(&p, options)) {
                Ok(session) => session,
                Err(e) => {
                    let _ = opened.send(Err(e));
                    return;
                }
            };
            let backend = SqliteBackend::serving(session, p, true);
            let queue = backend.shared.queue.clone();
            let weak = Arc::downgrade(&backend.shared);
            // Dropped here if the open was given up: the queue closes.
            let _ = opened.send(Ok(backend));
            worker::serve(&queue, &weak);
        });
        open_result.await.map_err(|_| stopped())?
    }

    /// The backend of the open `session`. Its queue is marked as served
    /// if `here` is a thread that goes on to serve it; otherwise the first
    /// call starts one.
    fn serving(session: Session, path: PathBuf, here: bool) -> SqliteBackend {
        let queue = Arc::new(worker::Queue::default());
        if here {
            queue.serving();
        }
        SqliteBackend {
            shared: Arc::new(Shared {
                session: Mutex::new(session),
                queue,
                path,
                read_here: AtomicBool::new(true),
            }),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Runs `f` on the backend's thread, with its connection.
    async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Session) -> Result<T> + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        worker::Queue::push(
            &self.shared,
            Box::new(move |shared| {
                let value = {
                    let mut session = shared.session.lock().unwrap_or_else(|p| p.into_inner());
                    guarded(|| f(&mut session))
                };
                drop(shared);
                let _ = done.send(value);
            }),
        );
        result.await.map_err(|_| stopped())?
    }

    /// Runs the read `f` here, on the caller's thread, when that costs
    /// less than handing it to the backend's thread: the connection is free,
    /// no call waits for it, and no read since the last one that found a
    /// small store has found a large one. `f` reads at most
    /// [`READ_HERE_ROWS`] rows, so it takes microseconds. It does not wait
    /// for the file: with the busy timeout off for it, a read that would
    /// wait, fails, finds more rows, or finds that it has to write (`None`)
    /// is left to [`SqliteBackend::call`], which runs it whole. `None` then;
    /// `Some(Err)` only when the busy timeout cannot be put back.
    fn read_here<T>(&self, f: impl FnOnce(&mut Session) -> Result<Option<T>>) -> Option<Result<T>> {
        if !self.shared.read_here.load(Ordering::Relaxed) || !self.shared.queue.is_empty() {
            return None;
        }
        let mut session = self.shared.session.try_lock().ok()?;
        session.conn.busy_timeout(Duration::ZERO).ok()?;
        let value = guarded(|| f(&mut session));
        if let Err(e) = session.conn.busy_timeout(BUSY_TIMEOUT) {
            return Some(Err(driver(e)));
        }
        value.ok().flatten().map(Ok)
    }

    /// Lets the next reads run on the caller's thread if the store as just
    /// read has at most [`READ_HERE_ROWS`] history rows (`rows`).
    fn read_here_next(&self, rows: usize) {
        self.shared
            .read_here
            .store(rows <= READ_HERE_ROWS, Ordering::Relaxed);
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction ([`Session::write`]).
    async fn tx<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>, &Now) -> Result<T> + Send + 'static,
    {
        self.call(move |session| session.write(f)).await
    }
}

/// `f`, with a panic as an error: the transaction it was in rolls back as
/// the panic unwinds, and the thread goes on with the next call.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(BackendError::other(format!(
            "the SQLite backend panicked: {why}"
        )))
    })
}

/// A call that ended without an answer: the thread that ran it was stopped
/// (its runtime shut down).
fn stopped() -> BackendError {
    BackendError::other("the SQLite backend's call was dropped before it ran")
}

impl Session {
    /// Opens the connection and makes sure the file holds this build's
    /// tables ([`schema::prepare`]), waiting for the file's lock as long as
    /// the busy timeout if another process holds it.
    fn open(path: &Path, options: SqliteOptions) -> Result<Session> {
        let mut conn = connect(path, BUSY_TIMEOUT)?;
        // A clock that cannot be read fails the open, not the first lease.
        let now = Now::read(&*options.clock, options.judge_expiry_by_wall_clock)?;
        schema::prepare(&mut conn, &now)?;
        Ok(Session {
            conn,
            clock: options.clock,
            by_wall_clock: options.judge_expiry_by_wall_clock,
        })
    }

    /// [`Session::open`] of a file that is already set up, on the caller's
    /// thread: one read, without waiting for the file. `None` if the file
    /// needs a write (a new file, a migration), if the read would wait for
    /// another process's lock, or if anything fails; [`Session::open`] then
    /// does it all again on a blocking thread, and says what failed.
    fn open_here(path: &Path, options: &SqliteOptions) -> Option<Session> {
        let mut conn = connect(path, Duration::ZERO).ok()?;
        Now::read(&*options.clock, options.judge_expiry_by_wall_clock).ok()?;
        if !schema::set_up(&mut conn).ok()? {
            return None;
        }
        conn.busy_timeout(BUSY_TIMEOUT).ok()?;
        Some(Session {
            conn,
            clock: options.clock.clone(),
            by_wall_clock: options.judge_expiry_by_wall_clock,
        })
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction, with the time read
    /// once the transaction holds the file's lock, and commits if it returns
    /// `Ok`. SQLite's lock on the file serialises these across processes.
    fn write<T>(&mut self, f: impl FnOnce(&Transaction<'_>, &Now) -> Result<T>) -> Result<T> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(driver)?;
        schema::check_stored(&tx)?;
        let now = Now::read(&*self.clock, self.by_wall_clock)?;
        let value = f(&tx, &now)?;
        tx.commit().map_err(driver)?;
        Ok(value)
    }

    /// Runs `f` in one deferred transaction, which reads one snapshot of the
    /// file without taking its write lock. `f` must not write: a deferred
    /// transaction that starts writing after it has read can fail with
    /// `SQLITE_BUSY` when another connection wrote in between.
    fn read<T>(&mut self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(driver)?;
        schema::check_stored(&tx)?;
        let value = f(&tx)?;
        tx.commit().map_err(driver)?;
        Ok(value)
    }
}

/// Opens a connection to `path` as the backend uses every one: a busy
/// timeout, and `synchronous = FULL`, which syncs the WAL at every commit
/// (the file is switched to WAL when it is prepared, [`schema::prepare`]).
/// `NORMAL` (SQLite's WAL default) syncs only at checkpoints, so a power loss
/// can take back the newest acknowledged commits: a lost grant would let the
/// next grant reuse its fence while the first holder still works.
fn connect(path: &Path, busy_timeout: Duration) -> Result<Connection> {
    let conn = Connection::open(path).map_err(|e| cannot_open(path, e))?;
    conn.busy_timeout(busy_timeout).map_err(driver)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(driver)?;
    // Room for every statement the backend runs, each prepared once.
    conn.set_prepared_statement_cache_capacity(STATEMENTS);
    Ok(conn)
}

/// More than the statements the backend runs.
const STATEMENTS: usize = 32;

/// How long a statement waits for another process's lock on the file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The most history rows a read on the caller's thread reads
/// ([`SqliteBackend::read_here`]); a read folds a row in about a
/// microsecond.
const READ_HERE_ROWS: usize = 32;

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
pub(super) fn wal(conn: &Connection) -> Result<()> {
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
