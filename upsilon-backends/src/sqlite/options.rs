//! How a [`SqliteBackend`](super::SqliteBackend) is opened.

use std::sync::Arc;

use super::{Clock, SystemClock};

/// Options for [`SqliteBackend::open_with`](super::SqliteBackend::open_with).
/// [`SqliteBackend::open`](super::SqliteBackend::open) uses the defaults.
///
/// Build it with `..SqliteOptions::default()`, so that fields added later
/// take their defaults:
///
/// ```
/// use upsilon_backends::sqlite::SqliteOptions;
///
/// let options = SqliteOptions {
///     allow_network_filesystem: true,
///     ..SqliteOptions::default()
/// };
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Open a database on a network filesystem (NFS, SMB/CIFS, FUSE, 9p,
    /// CephFS, ...) instead of refusing it. Default `false`: SQLite's locking
    /// does not hold between hosts there, so two hosts could hold the lease
    /// at once. Set it only for a mount that no other host ever opens the
    /// file through; the backend then logs a warning at every open.
    pub allow_network_filesystem: bool,
    /// Where the backend reads the time. Default: [`SystemClock`]. Every
    /// process that opens the file must read the same clocks; tests give a
    /// clock they can step.
    pub clock: Arc<dyn Clock>,
    /// A negative control, for tests: judge lease expiry by the wall clock,
    /// as format 1 did, instead of by `CLOCK_MONOTONIC`. Never set it
    /// otherwise: a wall-clock step forward longer than the TTL then hands a
    /// live lease to another process while its holder still runs its task,
    /// and a step back keeps a dead holder's lease for as long as the step.
    /// Every process that opens the file must agree on it. Default `false`.
    pub judge_expiry_by_wall_clock: bool,
}

impl Default for SqliteOptions {
    fn default() -> SqliteOptions {
        SqliteOptions {
            allow_network_filesystem: false,
            clock: Arc::new(SystemClock),
            judge_expiry_by_wall_clock: false,
        }
    }
}
