//! The clocks the backend reads, behind a trait so that tests can step them.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use upsilon::backend::BackendError;

use super::Result;

/// Where a [`SqliteBackend`](super::SqliteBackend) reads the time: the
/// [`SystemClock`] unless [`SqliteOptions::clock`](super::SqliteOptions::clock)
/// says otherwise. Read once per transaction, after its lock is taken.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The host's clocks now.
    fn now(&self) -> Result<HostTime>;
}

/// One reading of the host's clocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTime {
    /// Wall-clock time, ms since the Unix epoch. It can step (NTP, an
    /// operator, a VM restore), so it only stamps the history and tells
    /// people when a lease expires.
    pub wall_ms: i64,
    /// ms the host has run since it booted, on a clock that never steps and
    /// that every process on the host reads alike: Linux `CLOCK_MONOTONIC`,
    /// the clock the runner's own deadlines (tokio's `Instant`) run on. Lease
    /// expiry is judged by it.
    pub monotonic_ms: i64,
    /// The boot [`HostTime::monotonic_ms`] counts from (Linux
    /// `/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
}

/// The host's own clocks: `CLOCK_MONOTONIC`, the boot id and the wall clock.
/// Linux only; on other systems [`Clock::now`] is an error, so give
/// [`SqliteOptions::clock`](super::SqliteOptions::clock) a clock of the
/// system's own.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Result<HostTime> {
        let wall_ms = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
        };
        Ok(HostTime {
            wall_ms,
            monotonic_ms: monotonic_ms()?,
            boot_id: boot_id()?.to_owned(),
        })
    }
}

/// `CLOCK_MONOTONIC`, not `CLOCK_BOOTTIME`: the latter also counts the time
/// the host was suspended, which the holder's deadline (tokio's `Instant`)
/// does not, so after a suspend longer than a lease's time left, waiting
/// processes could take the lease over before its holder stops its task.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn monotonic_ms() -> Result<i64> {
    use nix::sys::time::TimeValLike;
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.num_milliseconds())
        .map_err(|e| BackendError::other(format!("cannot read CLOCK_MONOTONIC: {e}")))
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn boot_id() -> Result<&'static str> {
    const PATH: &str = "/proc/sys/kernel/random/boot_id";
    // It cannot change while this process runs.
    static BOOT_ID: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    BOOT_ID
        .get_or_init(|| match std::fs::read_to_string(PATH) {
            Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
            Ok(_) => Err(format!("{PATH} is empty")),
            Err(e) => Err(format!("cannot read the host's boot id from {PATH}: {e}")),
        })
        .as_deref()
        .map_err(|e| BackendError::other(e.to_owned()))
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn monotonic_ms() -> Result<i64> {
    Err(BackendError::other(
        "the SQLite backend judges leases by CLOCK_MONOTONIC and Linux's boot id; \
         on this system, give SqliteOptions::clock a Clock of its own",
    ))
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn boot_id() -> Result<&'static str> {
    monotonic_ms().map(|_| "")
}
