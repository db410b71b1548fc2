//! The one clock the fault test reads everywhere: `CLOCK_MONOTONIC`, in
//! microseconds. Every process on the host reads the same clock, it never
//! steps (NTP slews it at most), and it keeps counting while a process is
//! stopped, so the nodes' task records and the harness's fault records can
//! be compared with each other directly.
//!
//! Also the wall clock the fault test steps for the SQLite backend
//! ([`SteppedWallClock`]).

use std::path::PathBuf;

use nix::time::{clock_gettime, ClockId};
use upsilon_backends::sqlite::{Clock, HostTime, SystemClock};

/// Microseconds on `CLOCK_MONOTONIC` (since an arbitrary point, the same for
/// every process on the host until it reboots).
pub fn now_us() -> i64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is always readable");
    t.tv_sec() * 1_000_000 + t.tv_nsec() / 1_000
}

/// Microseconds as milliseconds, for messages: `12.345 ms`.
pub fn ms(us: i64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

/// The host's clocks as the SQLite backend reads them, with the wall clock
/// stepped by the offset (ms, signed) written in a file, as an NTP step or
/// an operator would step it for every process on the host at once. The
/// monotonic clock is the host's own: it never steps. The fault test steps
/// the file; without it the offset is 0.
#[derive(Debug, Clone)]
pub struct SteppedWallClock {
    /// Where the offset is, in whole milliseconds.
    pub offset_file: PathBuf,
}

impl SteppedWallClock {
    /// The offset now: 0 if the file is missing or does not parse.
    pub fn offset_ms(&self) -> i64 {
        std::fs::read_to_string(&self.offset_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Steps the wall clock by `ms` (every process reading the file sees it
    /// at once: the file is replaced, never written in place).
    pub fn step(&self, ms: i64) -> std::io::Result<()> {
        let next = self.offset_ms() + ms;
        let tmp = self.offset_file.with_extension("tmp");
        std::fs::write(&tmp, next.to_string())?;
        std::fs::rename(tmp, &self.offset_file)
    }
}

impl Clock for SteppedWallClock {
    fn now(&self) -> Result<HostTime, upsilon::backend::BackendError> {
        let mut t = SystemClock.now()?;
        t.wall_ms += self.offset_ms();
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_clock_never_goes_back() {
        let mut last = super::now_us();
        for _ in 0..1000 {
            let now = super::now_us();
            assert!(now >= last);
            last = now;
        }
    }
}
