//! What `synchronous = FULL` costs per commit, against `NORMAL`, on this
//! machine's disk. Not run by default (it measures, it checks nothing):
//!
//! ```text
//! cargo test -p upsilon-backends --test sqlite_commit_cost -- --ignored --nocapture
//! ```
//!
//! docs/SQLITE.md quotes its figures.
#![cfg(feature = "sqlite")]

use std::path::Path;
use std::time::{Duration, Instant};

use upsilon_backends::sqlite::rusqlite::Connection;

const COMMITS: usize = 500;

/// One small write transaction per commit, in WAL mode, as each lease and
/// store operation of the backend is. Every commit changes the row: SQLite
/// writes nothing for an update that leaves the bytes as they were.
fn commits(dir: &Path, synchronous: &str) -> Vec<Duration> {
    let c = Connection::open(dir.join(format!("{synchronous}.db"))).unwrap();
    c.pragma_update(None, "journal_mode", "WAL").unwrap();
    c.pragma_update(None, "synchronous", synchronous).unwrap();
    c.execute_batch(
        "CREATE TABLE t (k INTEGER PRIMARY KEY, v INTEGER); INSERT INTO t VALUES (1, 0);",
    )
    .unwrap();
    (0..COMMITS)
        .map(|_| {
            let start = Instant::now();
            c.execute_batch("BEGIN IMMEDIATE; UPDATE t SET v = v + 1 WHERE k = 1; COMMIT;")
                .unwrap();
            start.elapsed()
        })
        .collect()
}

#[test]
#[ignore = "a measurement; run it with --ignored --nocapture"]
fn commit_cost_normal_vs_full() {
    // On the build's disk, not a tmpfs /tmp.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for synchronous in ["NORMAL", "FULL"] {
        let mut times = commits(dir.path(), synchronous);
        times.sort();
        let mean = times.iter().sum::<Duration>() / COMMITS as u32;
        println!(
            "synchronous = {synchronous}: {COMMITS} commits, median {:?}, 90th percentile {:?}, mean {mean:?}",
            times[COMMITS / 2],
            times[COMMITS * 9 / 10],
        );
    }
}
