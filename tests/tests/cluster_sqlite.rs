//! Multi-process cluster tests on the SQLite default: real node processes
//! (`src/bin/node.rs`) on one file, each task recording its runs in an
//! `audit` table.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rusqlite::Connection;

const NODE: &str = env!("CARGO_BIN_EXE_node");

fn node(db: &Path, name: &str, app: &str, tasks: &str, task_ms: u64) -> Command {
    let mut c = Command::new(NODE);
    let url = format!("sqlite://{}", db.display());
    c.args(["--url", &url, "--name", name, "--app-version", app])
        .args([
            "--tasks",
            tasks,
            "--task-ms",
            &task_ms.to_string(),
            "--ttl-ms",
            "1000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn finish(name: &str, child: Child) -> Output {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{name} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// (task, node, fence, finished) rows of the audit table, in run order.
fn audit(db: &Path) -> Vec<(String, String, i64, bool)> {
    let c = Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut stmt = c
        .prepare("SELECT task, node, fence, finished_ms IS NOT NULL FROM audit ORDER BY id")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    rows
}

fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cluster.db");
    (dir, db)
}

#[test]
fn five_processes_run_each_task_exactly_once() {
    let (_dir, db) = temp_db();
    let children: Vec<_> = (1..=5)
        .map(|n| {
            let name = format!("n{n}");
            let child = node(&db, &name, "1.1", "1.0:2,1.1:3", 30).spawn().unwrap();
            (name, child)
        })
        .collect();
    let outputs: Vec<String> = children
        .into_iter()
        .map(|(name, child)| String::from_utf8_lossy(&finish(&name, child).stdout).into_owned())
        .collect();
    let upgraded = outputs.iter().filter(|o| o.contains(" upgraded: ")).count();
    assert_eq!(upgraded, 1, "{outputs:#?}");
    let rows = audit(&db);
    let tasks: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(tasks, ["t1", "t2", "t3", "t4", "t5"], "{rows:?}");
    assert!(
        rows.iter().all(|r| r.1 == rows[0].1 && r.3),
        "one node ran them all: {rows:?}"
    );
}

#[test]
fn a_killed_canary_is_resumed_without_rerunning_completed_tasks() {
    let (_dir, db) = temp_db();
    let mut canary = node(&db, "canary", "1.1", "1.1:4", 400).spawn().unwrap();
    // Wait until the canary is inside its third task, then kill it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if db.exists()
            && Connection::open(&db).is_ok_and(|c| {
                c.query_row("SELECT COUNT(*) FROM audit WHERE task = 't3'", [], |r| {
                    r.get::<_, i64>(0)
                })
                .is_ok_and(|n| n == 1)
            })
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the canary never reached its third task"
        );
        assert!(
            canary.try_wait().unwrap().is_none(),
            "the canary exited early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    canary.kill().unwrap();
    canary.wait().unwrap();
    let killed_at = Instant::now();
    let others: Vec<_> = (1..=2)
        .map(|n| {
            let name = format!("n{n}");
            (
                name.clone(),
                node(&db, &name, "1.1", "1.1:4", 50).spawn().unwrap(),
            )
        })
        .collect();
    for (name, child) in others {
        finish(&name, child);
    }
    // L1: the lease (TTL 1 s) was taken over and the work finished quickly.
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "{:?}",
        killed_at.elapsed()
    );
    let rows = audit(&db);
    let summary: Vec<(&str, &str, bool)> = rows
        .iter()
        .map(|r| (r.0.as_str(), r.1.as_str(), r.3))
        .collect();
    assert_eq!(
        &summary[..3],
        [
            ("t1", "canary", true),
            ("t2", "canary", true),
            ("t3", "canary", false)
        ]
    );
    let rest: Vec<&str> = summary[3..].iter().map(|r| r.0).collect();
    assert_eq!(rest, ["t3", "t4"], "t1 and t2 are not run again: {rows:?}");
    assert!(
        rows[3].2 > rows[0].2,
        "the new holder works under a higher fence"
    );
    assert!(rows[3..].iter().all(|r| r.3 && r.1 == rows[3].1));
}

#[test]
fn a_node_refuses_an_unknown_or_malformed_flag_naming_it() {
    let (_dir, db) = temp_db();
    for (extra, named) in [
        (&["--bogus", "1"][..], "'--bogus'"),
        (&["--task-ms", "soon"], "--task-ms <MS>"),
        (&["--ttl-ms", "-5"], "--ttl-ms <MS>"),
        (&["--tasks", "1.0-2"], "--tasks <VERSION:COUNT,...>"),
        (&["--ttl-ms"], "--ttl-ms <MS>"),
    ] {
        let out = node(&db, "a", "1.1", "1.0:1", 10)
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} accepted:\n{stderr}");
        assert!(stderr.contains(named), "{extra:?}:\n{stderr}");
        assert!(!db.exists(), "{extra:?}: the node opened its store");
    }
    let out = Command::new(NODE).arg("--url").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--url <URL>"), "{stderr}");
}
