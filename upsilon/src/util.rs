//! Small helpers: randomness for run ids and jitter.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

thread_local! {
    /// When set, this thread draws from a seeded generator instead: a
    /// simulation replays exactly from its seed.
    static SEEDED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Makes this thread's random numbers (run ids, jitter) follow `seed`, or the
/// process's entropy again with `None`.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn seed_thread(seed: Option<u64>) {
    SEEDED.with(|s| s.set(seed));
}

/// A random 64-bit number: from the thread's seed when one is set
/// (splitmix64), otherwise from the process's hash keys, the clock and a counter.
pub(crate) fn random_u64() -> u64 {
    if let Some(next) = SEEDED.with(|s| {
        s.get().map(|state| {
            let state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            s.set(Some(state));
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
    }) {
        return next;
    }
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

    #[test]
    fn a_seeded_thread_repeats_itself() {
        seed_thread(Some(7));
        let a: Vec<u64> = (0..5).map(|_| random_u64()).collect();
        seed_thread(Some(7));
        let b: Vec<u64> = (0..5).map(|_| random_u64()).collect();
        seed_thread(None);
        assert_eq!(a, b);
        assert!(a.windows(2).all(|w| w[0] != w[1]));
        assert_ne!(random_u64(), random_u64());
    }
}
