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

/// The tables as format 1 created them: leases judged by the wall clock,
/// with no boot id.
const FORMAT_1: &str = "
CREATE TABLE upsilon_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE upsilon_state (
    service          TEXT PRIMARY KEY,
    data_version     TEXT,
    baseline         TEXT,
    store_fence      INTEGER NOT NULL DEFAULT 0,
    granted          INTEGER NOT NULL DEFAULT 0,
    lease_holder     TEXT,
    lease_fence      INTEGER,
    lease_expires_ms INTEGER
);
CREATE TABLE upsilon_history (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    service      TEXT NOT NULL,
    version      TEXT NOT NULL,
    task_id      TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    state        TEXT NOT NULL,
    fence        INTEGER NOT NULL,
    holder       TEXT NOT NULL,
    description  TEXT NOT NULL,
    started_ms   INTEGER NOT NULL,
    finished_ms  INTEGER,
    duration_ms  INTEGER,
    error        TEXT,
    UNIQUE (service, version, task_id, attempt)
);
INSERT INTO upsilon_meta (key, value) VALUES ('format', '1');
";

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A file written by format 1: service `live` with a lease 60 s from expiry
/// and a completed task, service `dead` with an expired lease. Opening it
/// migrates it to format 2 in one transaction: the live lease keeps the
/// time it had left, the expired one stays expired, and the fences, the
/// data version and the history are kept.
#[tokio::test]
async fn a_format_1_file_is_migrated_at_open() {
    use upsilon::backend::{Acquire, Lock, Store};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let holder = upsilon::testing::holder(1);
    let old = Connection::open(&path).unwrap();
    old.execute_batch(FORMAT_1).unwrap();
    let now = wall_ms();
    old.execute(
        "INSERT INTO upsilon_state
           (service, data_version, store_fence, granted, lease_holder, lease_fence, lease_expires_ms)
         VALUES ('live', '1.0.0', 3, 3, ?1, 3, ?2), ('dead', NULL, 5, 5, ?1, 5, ?3)",
        upsilon_backends::sqlite::rusqlite::params![holder.encode(), now + 60_000, now - 1_000],
    )
    .unwrap();
    old.execute(
        "INSERT INTO upsilon_history (service, version, task_id, attempt, kind, state, fence,
           holder, description, started_ms, finished_ms, duration_ms)
         VALUES ('live', '1.0.0', 'create', 1, 'run', 'completed', 2, ?1, 'creates', ?2, ?3, 5)",
        upsilon_backends::sqlite::rusqlite::params![holder.encode(), now - 9_000, now - 8_995],
    )
    .unwrap();
    drop(old);

    let backend = SqliteBackend::open(&path).await.unwrap();
    let format: String = Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT value FROM upsilon_meta WHERE key = 'format'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(format, "2");

    let live = backend.current("live").await.unwrap().expect("still held");
    assert_eq!((&live.holder, live.fence), (&holder, 3));
    let left = live.expires_at_ms - live.now_ms;
    assert!((50_000..=60_000).contains(&left), "{left} ms left");
    let other = upsilon::testing::holder(2);
    let ttl = std::time::Duration::from_secs(10);
    assert!(matches!(
        backend.try_acquire("live", &other, ttl).await.unwrap(),
        Acquire::Held(ref i) if i.fence == 3
    ));

    assert_eq!(backend.current("dead").await.unwrap(), None);
    match backend.try_acquire("dead", &other, ttl).await.unwrap() {
        Acquire::Granted(lease) => assert_eq!(lease.fence, 6),
        held => panic!("an expired format-1 lease: {held:?}"),
    }

    let snap = backend.load("live").await.unwrap();
    assert_eq!(
        snap.data_version.map(|v| v.to_string()),
        Some("1.0.0".into())
    );
    assert_eq!(snap.fence, 3);
    let history = backend.history("live").await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(
        (history[0].started_at_ms, history[0].finished_at_ms),
        (now - 9_000, Some(now - 8_995))
    );

    // Opened again: already format 2, nothing to migrate.
    drop(backend);
    let again = SqliteBackend::open(&path).await.unwrap();
    assert_eq!(
        again.current("live").await.unwrap().map(|i| i.fence),
        Some(3)
    );
}

/// Format 2 as the release before checkpoints created it: the history has
/// no checkpoint columns.
const FORMAT_2_BEFORE_CHECKPOINTS: &str = "
CREATE TABLE upsilon_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE upsilon_fence (
    service     TEXT PRIMARY KEY,
    granted     INTEGER NOT NULL DEFAULT 0,
    store_fence INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE upsilon_state (
    service          TEXT PRIMARY KEY,
    data_version     TEXT,
    baseline         TEXT,
    lease_holder     TEXT,
    lease_fence      INTEGER,
    lease_expires_ms INTEGER,
    lease_boot       TEXT
);
CREATE TABLE upsilon_history (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    service      TEXT NOT NULL,
    version      TEXT NOT NULL,
    task_id      TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    state        TEXT NOT NULL,
    fence        INTEGER NOT NULL,
    holder       TEXT NOT NULL,
    description  TEXT NOT NULL,
    started_ms   INTEGER NOT NULL,
    finished_ms  INTEGER,
    duration_ms  INTEGER,
    error        TEXT,
    UNIQUE (service, version, task_id, attempt)
);
INSERT INTO upsilon_meta (key, value) VALUES ('format', '2');
INSERT INTO upsilon_fence (service, granted, store_fence) VALUES ('svc', 2, 2);
INSERT INTO upsilon_state (service) VALUES ('svc');
";

/// A file of the release before checkpoints, with a running attempt, gains
/// the checkpoint columns when it is opened: its rows read with no
/// checkpoint, the running attempt takes one, and the format stays 2 (a
/// node of that release still opens the file during the rollout).
#[tokio::test]
async fn a_file_from_before_checkpoints_gains_their_columns_at_open() {
    use upsilon::backend::{Change, Checkpoint, SaveCheckpoint, Store};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("before.db");
    let holder = upsilon::testing::holder(1);
    let old = Connection::open(&path).unwrap();
    old.execute_batch(FORMAT_2_BEFORE_CHECKPOINTS).unwrap();
    old.execute(
        "INSERT INTO upsilon_history (service, version, task_id, attempt, kind, state, fence,
           holder, description, started_ms)
         VALUES ('svc', '1.1.0', 'backfill', 1, 'run', 'running', 2, ?1, 'fills', ?2)",
        upsilon_backends::sqlite::rusqlite::params![holder.encode(), wall_ms()],
    )
    .unwrap();
    drop(old);

    let backend = SqliteBackend::open(&path).await.unwrap();
    let history = backend.history("svc").await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].checkpoint, None);
    let key = upsilon::TaskKey {
        version: "1.1.0".parse().unwrap(),
        id: "backfill".into(),
    };
    let saved = Checkpoint {
        position: "{\"last\":500}".into(),
        saved_at_ms: wall_ms(),
        done: Some(500),
        total: Some(2_000),
    };
    backend.claim("svc", 2).await.unwrap();
    backend
        .apply(
            "svc",
            2,
            &[Change::Checkpoint(SaveCheckpoint {
                key: key.clone(),
                attempt: 1,
                checkpoint: saved.clone(),
            })],
        )
        .await
        .unwrap();
    let snap = backend.load("svc").await.unwrap();
    assert_eq!(snap.tasks[&key].checkpoint.as_ref(), Some(&saved));
    let format: String = Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT value FROM upsilon_meta WHERE key = 'format'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(format, "2");
    // Opened again: the columns are there, nothing is added twice.
    drop(backend);
    let again = SqliteBackend::open(&path).await.unwrap();
    assert_eq!(
        again.history("svc").await.unwrap()[0].checkpoint.as_ref(),
        Some(&saved)
    );

    // A stored position that is no longer JSON (edited by hand, say) still
    // reads as the text it is; the task that resumes from it gets an error
    // naming it, not a panic and not a restart from nothing.
    Connection::open(&path)
        .unwrap()
        .execute("UPDATE upsilon_history SET checkpoint = '{\"last\":' ", [])
        .unwrap();
    let snap = again.load("svc").await.unwrap();
    let stored = snap.tasks[&key].checkpoint.clone().unwrap();
    assert_eq!(stored.position, "{\"last\":");
    let (ctx, _) = upsilon::testing::context("backfill", "1.1", upsilon::Resources::default());
    upsilon::testing::resume_from_json(&ctx, &stored.position);
    let err = ctx.checkpoint::<serde_json::Value>().unwrap_err();
    assert!(
        err.to_string()
            .starts_with("task backfill@1.1.0: the checkpoint that attempt 1 resumes from"),
        "{err}"
    );
}

/// The commits other connections have made to `path`, as `conn` sees them.
fn data_version(conn: &Connection) -> i64 {
    conn.query_row("PRAGMA data_version", [], |r| r.get(0))
        .unwrap()
}

/// A node starting on a file that is set up and holds its service's rows
/// only reads: opening it and reading the service commits nothing, and
/// neither waits for a node that holds the write lock (here for longer than
/// the backend's busy timeout) nor blocks it. A service the file has no rows
/// of yet gets them at its first read.
#[tokio::test]
async fn a_start_up_on_a_file_already_set_up_writes_nothing() {
    use upsilon::backend::Store;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.db");
    SqliteBackend::open(&path)
        .await
        .unwrap()
        .load("svc")
        .await
        .unwrap();
    let watcher = Connection::open(&path).unwrap();
    let before = data_version(&watcher);
    let wal = std::fs::metadata(path.with_extension("db-wal"))
        .unwrap()
        .len();

    watcher.execute_batch("BEGIN IMMEDIATE").unwrap();
    let start_up = async {
        let backend = SqliteBackend::open(&path).await.unwrap();
        assert!(backend.load("svc").await.unwrap().is_empty());
        backend
    };
    let backend = tokio::time::timeout(std::time::Duration::from_secs(5), start_up)
        .await
        .expect("a start-up beside a writer");
    watcher.execute_batch("COMMIT").unwrap();
    assert_eq!(data_version(&watcher), before, "a commit by the start-up");
    assert_eq!(
        std::fs::metadata(path.with_extension("db-wal"))
            .unwrap()
            .len(),
        wal,
        "WAL frames written by the start-up"
    );

    backend.load("other").await.unwrap();
    assert_ne!(data_version(&watcher), before, "the new service's rows");
    let rows: i64 = watcher
        .query_row(
            "SELECT COUNT(*) FROM upsilon_state s JOIN upsilon_fence f USING (service)
             WHERE service = 'other'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 1);
}
