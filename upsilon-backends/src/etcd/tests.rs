//! Unit tests that need no server.

use std::time::Duration;

use super::lock::ttl_seconds;

#[test]
fn ttls_are_whole_seconds_rounded_up_and_at_least_two() {
    assert_eq!(ttl_seconds(Duration::from_secs(2)).unwrap(), 2);
    assert_eq!(ttl_seconds(Duration::from_millis(2001)).unwrap(), 3);
    assert_eq!(ttl_seconds(Duration::from_secs(15)).unwrap(), 15);
    let err = ttl_seconds(Duration::from_millis(1999))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("below etcd's smallest lease TTL of 2 s"),
        "{err}"
    );
    assert!(err.contains("`Builder::ttl`"), "{err}");
    assert!(ttl_seconds(Duration::from_secs(u64::MAX)).is_err());
}
