//! The one clock the fault test reads everywhere: `CLOCK_MONOTONIC`, in
//! microseconds. Every process on the host reads the same clock, it never
//! steps (NTP slews it at most), and it keeps counting while a process is
//! stopped, so the nodes' task records and the harness's fault records can
//! be compared with each other directly.

use nix::time::{clock_gettime, ClockId};

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
