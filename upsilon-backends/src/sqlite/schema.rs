//! The tables, the stored format every transaction checks, and the
//! migrations.

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use upsilon::backend::BackendError;

use super::{driver, rows, wal, Now, Result};

/// The stored format this build writes and reads. Format 2 judges leases by
/// `CLOCK_MONOTONIC` and the boot id (`lease_boot`), and keeps the fences in
/// a table of their own; a format-1 file is migrated when it is opened.
pub const FORMAT: u32 = 2;

const META: &str = "
CREATE TABLE IF NOT EXISTS upsilon_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// The fences of each service: the newest granted and the newest claimed
/// (the store's fence). Apart from the state row, so that deleting that row
/// (an operator resetting a service) takes neither back.
const FENCES: &str = "
CREATE TABLE upsilon_fence (
    service     TEXT PRIMARY KEY,
    granted     INTEGER NOT NULL DEFAULT 0,
    store_fence INTEGER NOT NULL DEFAULT 0
);
";

/// Format 2's other tables, for a new file. `lease_expires_ms` is on the
/// lease clock (`CLOCK_MONOTONIC` ms) of the boot `lease_boot` names; the
/// history's times are wall-clock ms, for people.
const TABLES: &str = "
CREATE TABLE upsilon_state (
    service          TEXT PRIMARY KEY,
    data_version     TEXT,
    baseline         TEXT,
    lease_holder     TEXT,
    lease_fence      INTEGER,
    lease_expires_ms INTEGER,
    lease_boot       TEXT
);
CREATE TABLE upsilon_history (
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
    checkpoint          TEXT,
    checkpoint_saved_ms INTEGER,
    checkpoint_done     INTEGER,
    checkpoint_total    INTEGER,
    UNIQUE (service, version, task_id, attempt)
);
";

/// The checkpoint columns of the history, which files made before
/// checkpoints existed lack. Nullable and added in place: the format stays
/// 2, so a node of the previous release still opens the file (it names the
/// columns it writes, and a row it starts has no checkpoint).
const CHECKPOINT_COLUMNS: [(&str, &str); 4] = [
    ("checkpoint", "TEXT"),
    ("checkpoint_saved_ms", "INTEGER"),
    ("checkpoint_done", "INTEGER"),
    ("checkpoint_total", "INTEGER"),
];

/// At open: makes sure the file is in WAL and holds this build's tables.
/// A file already set up is only read, without the write lock; otherwise,
/// in a transaction that holds the file's lock, creates the tables of a new
/// file, migrates a format-1 file, adds the checkpoint columns a file of an
/// earlier release lacks, and refuses any other format.
pub(super) fn prepare(conn: &mut Connection, now: &Now) -> Result<()> {
    if set_up(conn)? {
        return Ok(());
    }
    wal(conn)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(driver)?;
    upgrade(&tx, now)?;
    tx.commit().map_err(driver)
}

/// Whether the file needs nothing done: in WAL, with this build's format
/// and every column of the history. Read in one deferred transaction; a
/// newer format is an error. A table or a column missing fails the
/// preparation of the start-up read ([`rows::LOAD`], which names every
/// column a file of an earlier release may lack), and anything else that
/// fails leaves the file to [`upgrade`], which says what is wrong if
/// something is.
pub(super) fn set_up(conn: &mut Connection) -> Result<bool> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Deferred)
        .map_err(driver)?;
    let wal = tx
        .query_row("PRAGMA journal_mode", [], |r| r.get::<_, String>(0))
        .is_ok_and(|mode| mode.eq_ignore_ascii_case("wal"));
    let Ok(Some(format)) = stored_format(&tx) else {
        return Ok(false);
    };
    if format == "1" {
        return Ok(false);
    }
    check_format(&format)?;
    // Prepared once for the connection: the start-up read that follows
    // finds it ready.
    let columns = tx.prepare_cached(rows::LOAD).is_ok();
    tx.commit().map_err(driver)?;
    Ok(wal && columns)
}

/// In the transaction that holds the file's lock: creates the tables of a
/// new file, migrates a format-1 file, and refuses any other format.
fn upgrade(tx: &Transaction<'_>, now: &Now) -> Result<()> {
    tx.execute_batch(META).map_err(driver)?;
    match stored_format(tx)?.as_deref() {
        None => create(tx),
        Some("1") => migrate_from_1(tx, now).and_then(|()| add_checkpoint_columns(tx)),
        Some(f) => check_format(f).and_then(|()| add_checkpoint_columns(tx)),
    }
}

/// Adds the checkpoint columns a file made by an earlier release lacks.
fn add_checkpoint_columns(tx: &Transaction<'_>) -> Result<()> {
    let mut stmt = tx
        .prepare("SELECT name FROM pragma_table_info('upsilon_history')")
        .map_err(driver)?;
    let have: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .map_err(driver)?
        .collect::<rusqlite::Result<_>>()
        .map_err(driver)?;
    let mut added = 0;
    for (name, kind) in CHECKPOINT_COLUMNS {
        if !have.iter().any(|h| h == name) {
            tx.execute_batch(&format!(
                "ALTER TABLE upsilon_history ADD COLUMN {name} {kind}"
            ))
            .map_err(driver)?;
            added += 1;
        }
    }
    if added > 0 {
        tracing::info!("added the checkpoint columns to the SQLite history");
    }
    Ok(())
}

fn create(tx: &Transaction<'_>) -> Result<()> {
    let tables: i64 = tx
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'upsilon_state'",
            [],
            |r| r.get(0),
        )
        .map_err(driver)?;
    if tables > 0 {
        return Err(BackendError::corrupt(
            "upsilon_meta has no `format` row, yet upsilon_state exists",
        ));
    }
    tx.execute_batch(FENCES).map_err(driver)?;
    tx.execute_batch(TABLES).map_err(driver)?;
    set_format(tx)
}

/// Format 1 kept the fences in the state row and judged leases by the wall
/// clock. The fences move to `upsilon_fence`. A lease live at the migration
/// keeps the time it had left, now counted on the lease clock of this boot,
/// so that its holder (which stops at its own deadline, since a format-1
/// process refuses this file from now on) is not overtaken before it.
fn migrate_from_1(tx: &Transaction<'_>, now: &Now) -> Result<()> {
    tx.execute_batch(FENCES).map_err(driver)?;
    tx.execute_batch(
        "INSERT INTO upsilon_fence (service, granted, store_fence)
           SELECT service, granted, store_fence FROM upsilon_state;
         ALTER TABLE upsilon_state DROP COLUMN granted;
         ALTER TABLE upsilon_state DROP COLUMN store_fence;
         ALTER TABLE upsilon_state ADD COLUMN lease_boot TEXT;",
    )
    .map_err(driver)?;
    tx.execute(
        "UPDATE upsilon_state SET lease_expires_ms = ?1 + (lease_expires_ms - ?2), lease_boot = ?3
         WHERE lease_expires_ms IS NOT NULL",
        params![now.lease, now.wall, now.boot],
    )
    .map_err(driver)?;
    tracing::info!("migrated the SQLite database from format 1 to format {FORMAT}");
    set_format(tx)
}

fn set_format(tx: &Transaction<'_>) -> Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO upsilon_meta (key, value) VALUES ('format', ?1)",
        [FORMAT.to_string()],
    )
    .map_err(driver)?;
    Ok(())
}

/// In every transaction: the file is still of this build's format.
pub(super) fn check_stored(tx: &Transaction<'_>) -> Result<()> {
    check_format_column(stored_format(tx)?.as_deref())
}

/// Refuses a stored format this build does not know, or none.
pub(super) fn check_format_column(format: Option<&str>) -> Result<()> {
    let format = format.ok_or_else(|| BackendError::corrupt("upsilon_meta has no `format` row"))?;
    check_format(format)
}

fn stored_format(tx: &Transaction<'_>) -> Result<Option<String>> {
    tx.prepare_cached("SELECT value FROM upsilon_meta WHERE key = 'format'")
        .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)).optional())
        .map_err(driver)
}

fn check_format(found: &str) -> Result<()> {
    BackendError::check_format(found, FORMAT, "upsilon_meta.format")
}
