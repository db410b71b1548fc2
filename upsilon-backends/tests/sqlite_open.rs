//! Opening a SQLite database: what a user sees for a bad path, and several
//! processes creating the same new file at once.

use std::io::Write;
use std::process::{Command, Stdio};

use upsilon_backends::sqlite::rusqlite::Connection;
use upsilon_backends::sqlite::SqliteBackend;

/// Set in a child process: open the database at this path and exit.
const CHILD_PATH: &str = "UPSILON_SQLITE_OPEN_CHILD";

#[tokio::test]
async fn a_missing_directory_is_named_once_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("upsilon.db");
    let err = SqliteBackend::open(&path).await.unwrap_err().to_string();
    let shown = path.display().to_string();
    assert_eq!(err.matches(&shown).count(), 1, "{err}");
    assert!(
        err.contains("no-such-dir does not exist; create it first"),
        "{err}"
    );
}

#[tokio::test]
async fn a_directory_given_as_the_file_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let err = SqliteBackend::open(dir.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("it is a directory"), "{err}");
}

#[tokio::test]
async fn the_driver_is_the_one_the_backend_uses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.db");
    SqliteBackend::open(&path).await.unwrap();
    let conn = Connection::open(&path).unwrap();
    let format: String = conn
        .query_row(
            "SELECT value FROM upsilon_meta WHERE key = 'format'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(format, upsilon_backends::sqlite::FORMAT.to_string());
}

/// The child side of the next test: open, and exit non-zero on error.
#[tokio::test]
async fn open_child() {
    let Ok(path) = std::env::var(CHILD_PATH) else {
        return;
    };
    // Start when the parent says so, together with the other children.
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    if let Err(e) = SqliteBackend::open(&path).await {
        eprintln!("open failed: {e}");
        std::process::exit(3);
    }
}

#[test]
fn processes_opening_a_new_file_at_once_all_succeed() {
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for round in 0..25 {
        let path = dir.path().join(format!("round-{round}.db"));
        let mut children: Vec<_> = (0..4)
            .map(|_| {
                Command::new(&exe)
                    .args(["--exact", "open_child", "--nocapture", "--test-threads=1"])
                    .env(CHILD_PATH, &path)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in &mut children {
            writeln!(child.stdin.take().unwrap(), "go").unwrap();
        }
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The filesystems SQLite's locking holds on open without an option: the
/// machine's own disk (the temporary directory) and tmpfs (`/dev/shm`).
/// Refusal itself is checked on the `statfs` magic numbers in the unit
/// tests: a network filesystem (NFS, SMB, FUSE, ...) cannot be mounted on
/// the machines these tests run on, and a faked mount would test the fake.
#[tokio::test]
async fn local_disks_and_tmpfs_open() {
    let disk = tempfile::tempdir().unwrap();
    let mut dirs = vec![disk.path().to_path_buf()];
    let shm = std::path::Path::new("/dev/shm");
    let shm_dir = shm.is_dir().then(|| tempfile::tempdir_in(shm).unwrap());
    dirs.extend(shm_dir.as_ref().map(|d| d.path().to_path_buf()));
    for dir in dirs {
        let path = dir.join("u.db");
        SqliteBackend::open(&path)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Opened again, when the file exists and is judged by itself.
        SqliteBackend::open(&path).await.unwrap();
    }
}
