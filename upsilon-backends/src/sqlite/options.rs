//! How a [`SqliteBackend`](super::SqliteBackend) is opened.

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
#[derive(Debug, Clone, Default)]
pub struct SqliteOptions {
    /// Open a database on a network filesystem (NFS, SMB/CIFS, FUSE, 9p,
    /// CephFS, ...) instead of refusing it. Default `false`: SQLite's locking
    /// does not hold between hosts there, so two hosts could hold the lease
    /// at once. Set it only for a mount that no other host ever opens the
    /// file through; the backend then logs a warning at every open.
    pub allow_network_filesystem: bool,
}
