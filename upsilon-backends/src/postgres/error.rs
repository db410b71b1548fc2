//! Driver errors as [`BackendError`]s: the server's own words, the target
//! without credentials, and whether retrying may help.

use std::fmt;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use upsilon::backend::BackendError;

/// What went wrong, with the server's own words where it gave them, and the
/// target without credentials.
#[derive(Debug)]
pub(super) struct PgError {
    message: String,
    /// The statement named a schema, table or column of Upsilon's that is
    /// not there (yet).
    missing: bool,
}

impl PgError {
    pub(super) fn new(message: impl Into<String>) -> PgError {
        PgError {
            message: message.into(),
            missing: false,
        }
    }
}

/// Whether `e` says that a statement found Upsilon's schema, a table, or a
/// column of the current layout missing: the tables are to be created or
/// upgraded, and the statement sent again.
pub(super) fn tables_missing(e: &BackendError) -> bool {
    match e {
        BackendError::Other { source } => source
            .downcast_ref::<PgError>()
            .is_some_and(|pg| pg.missing),
        _ => false,
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PgError {}

/// The server's words for a driver error: the database error's message,
/// detail, hint and SQLSTATE, or the driver's error and its causes.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            s.push_str(&format!("; {d}"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; hint: {h}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(c) = source {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = c.source();
    }
    s
}

/// Maps a driver error: lost connections, timeouts, shutdowns, lock and
/// serialisation conflicts are worth retrying; the rest is not.
pub(super) fn driver(e: tokio_postgres::Error) -> BackendError {
    driver_in(e, "")
}

pub(super) fn driver_in(e: tokio_postgres::Error, context: &str) -> BackendError {
    let mut message = describe(&e);
    if !context.is_empty() {
        message = format!("{context}: {message}");
    }
    let transient = match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08")
                || c.starts_with("57P")
                || [
                    SqlState::T_R_SERIALIZATION_FAILURE,
                    SqlState::T_R_DEADLOCK_DETECTED,
                    SqlState::LOCK_NOT_AVAILABLE,
                    SqlState::TOO_MANY_CONNECTIONS,
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                    SqlState::QUERY_CANCELED,
                ]
                .contains(code)
        }
        // No SQLSTATE: the connection failed, closed or timed out.
        None => true,
    };
    if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
        message.push_str(
            "; Upsilon's user needs USAGE on the schema and SELECT, INSERT, UPDATE on its tables (and CREATE the first time, to create them)",
        );
    }
    let missing = matches!(
        e.code(),
        Some(&SqlState::UNDEFINED_TABLE)
            | Some(&SqlState::UNDEFINED_COLUMN)
            | Some(&SqlState::INVALID_SCHEMA_NAME)
    );
    let err = PgError { message, missing };
    if transient {
        BackendError::unavailable(err)
    } else {
        BackendError::other(err)
    }
}

/// An operation that ran out of time; its connection is not reused.
pub(super) fn timed_out(what: &str, after: Duration) -> BackendError {
    BackendError::unavailable(format!(
        "{what} did not finish within {after:?}; the connection was dropped"
    ))
}
