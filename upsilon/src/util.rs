//! Small helpers: randomness for run ids and jitter.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// A random 64-bit number from the process's hash keys, the clock and a counter.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.write_u32(std::process::id());
    h.finish()
}

/// `base` scaled by a random factor in [0.5, 1.5), so that nodes that started
/// together do not poll together.
pub(crate) fn jitter(base: Duration) -> Duration {
    let unit = (random_u64() >> 11) as f64 / (1u64 << 53) as f64;
    base.mul_f64(0.5 + unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let base = Duration::from_millis(100);
        let samples: Vec<Duration> = (0..200).map(|_| jitter(base)).collect();
        assert!(samples.iter().all(|d| *d >= base / 2 && *d < base * 3 / 2));
        assert!(samples.iter().any(|d| *d != samples[0]));
    }
}
