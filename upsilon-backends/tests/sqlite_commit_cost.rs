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
/// store operation of the backend is: `statement` between `BEGIN IMMEDIATE`
/// and `COMMIT`.
fn commits(dir: &Path, name: &str, synchronous: &str, statement: &str) -> Vec<Duration> {
    let c = Connection::open(dir.join(format!("{name}.db"))).unwrap();
    c.pragma_update(None, "journal_mode", "WAL").unwrap();
    c.pragma_update(None, "synchronous", synchronous).unwrap();
    c.execute_batch(
        "CREATE TABLE t (k INTEGER PRIMARY KEY, v INTEGER); INSERT INTO t VALUES (1, 0);",
    )
    .unwrap();
    let batch = format!("BEGIN IMMEDIATE; {statement}; COMMIT;");
    (0..COMMITS)
        .map(|_| {
            let start = Instant::now();
            c.execute_batch(&batch).unwrap();
            start.elapsed()
        })
        .collect()
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    let mean = times.iter().sum::<Duration>() / COMMITS as u32;
    println!(
        "{what}: {COMMITS} commits, median {:?}, 90th percentile {:?}, mean {mean:?}",
        times[COMMITS / 2],
        times[COMMITS * 9 / 10],
    );
}

#[test]
#[ignore = "a measurement; run it with --ignored --nocapture"]
fn commit_cost_normal_vs_full() {
    // On the build's disk, not a tmpfs /tmp.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    // Every commit changes the row: SQLite writes nothing for an update that
    // leaves the bytes as they were.
    let change = "UPDATE t SET v = v + 1 WHERE k = 1";
    for synchronous in ["NORMAL", "FULL"] {
        let times = commits(dir.path(), synchronous, synchronous, change);
        report(&format!("synchronous = {synchronous}"), times);
    }
    // A write transaction that changes nothing, as the backend's reads are
    // (load, current, a refused try_acquire): nothing to sync.
    let unchanged = "INSERT OR IGNORE INTO t VALUES (1, 0)";
    report(
        "synchronous = FULL, a transaction that changes nothing",
        commits(dir.path(), "unchanged", "FULL", unchanged),
    );
}
