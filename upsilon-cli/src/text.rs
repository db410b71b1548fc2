//! How values read to a person: durations, times, versions.

use std::time::Duration;

use upsilon::Version;

/// `850ms`, `3.2s`, `2m 3s`, `1h 2m 3s`, `2d 3h 4m`.
pub(crate) fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        _ if d < Duration::from_secs(1) => format!("{}ms", d.as_millis()),
        0..=59 => format!("{:.1}s", d.as_secs_f64()),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m {}s", s / 3600, s % 3600 / 60, s % 60),
        _ => format!("{}d {}h {}m", s / 86_400, s % 86_400 / 3600, s % 3600 / 60),
    }
}

/// The time between two backend-clock readings, never negative.
pub(crate) fn between(from_ms: i64, to_ms: i64) -> Duration {
    Duration::from_millis(to_ms.saturating_sub(from_ms).max(0) as u64)
}

/// Milliseconds since the Unix epoch as RFC 3339 in UTC:
/// `2024-05-01T12:03:04.250Z`.
pub(crate) fn timestamp(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's `civil_from_days`: the proleptic Gregorian date of a day
/// count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A version, or `none`.
pub(crate) fn version(v: Option<&Version>) -> String {
    v.map_or_else(|| "none".to_owned(), Version::to_string)
}

/// The wall clock in ms since the epoch, for stores whose clock is not known
/// (no lease was read).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_durations_read_as_people_write_them() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(1_709_210_096_789), "2024-02-29T12:34:56.789Z");
        assert_eq!(timestamp(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(duration(Duration::from_millis(850)), "850ms");
        assert_eq!(duration(Duration::from_millis(3_240)), "3.2s");
        assert_eq!(duration(Duration::from_secs(123)), "2m 3s");
        assert_eq!(duration(Duration::from_secs(3_723)), "1h 2m 3s");
        assert_eq!(
            duration(Duration::from_secs(2 * 86_400 + 3 * 3600 + 240)),
            "2d 3h 4m"
        );
        assert_eq!(between(10, 5), Duration::ZERO);
    }
}
