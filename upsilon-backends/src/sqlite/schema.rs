//! The tables, and the stored format every transaction checks.

use rusqlite::{OptionalExtension, Transaction};
use upsilon::backend::BackendError;

use super::{driver, Result};

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

/// At open: creates the tables if missing and checks the stored format.
pub(super) fn prepare(tx: &Transaction<'_>) -> Result<()> {
    tx.execute_batch(SCHEMA).map_err(driver)?;
    match stored_format(tx)? {
        None => {
            tx.execute(
                "INSERT INTO upsilon_meta (key, value) VALUES ('format', ?1)",
                [FORMAT.to_string()],
            )
            .map_err(driver)?;
            Ok(())
        }
        Some(f) => check_format(&f),
    }
}

/// In every transaction: the file is still of this build's format.
pub(super) fn check_stored(tx: &Transaction<'_>) -> Result<()> {
    let format = stored_format(tx)?
        .ok_or_else(|| BackendError::corrupt("upsilon_meta has no `format` row"))?;
    check_format(&format)
}

fn stored_format(tx: &Transaction<'_>) -> Result<Option<String>> {
    tx.query_row(
        "SELECT value FROM upsilon_meta WHERE key = 'format'",
        [],
        |r| r.get(0),
    )
    .optional()
    .map_err(driver)
}

fn check_format(found: &str) -> Result<()> {
    BackendError::check_format(found, FORMAT, "upsilon_meta.format")
}
