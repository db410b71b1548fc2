//! The SQLite backend: conformance, and several nodes on one file, each with
//! its own connection as separate processes would have.
#![cfg(feature = "sqlite")]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::Connection;
use upsilon::backend::{BackendError, Lock, Store};
use upsilon::testing::conformance::{self, Harness, Notices, Wake};
use upsilon::testing::{self};
use upsilon::{Outcome, Task, TaskContext, TaskFuture, Upsilon};
use upsilon_backends::sqlite::SqliteBackend;

struct Sqlite {
    backend: Arc<SqliteBackend>,
    /// Another node's connection to the same file.
    peer: Arc<SqliteBackend>,
    path: PathBuf,
    saved: Mutex<Option<String>>,
    _dir: tempfile::TempDir,
}

impl Sqlite {
    async fn new() -> Sqlite {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upsilon.db");
        Sqlite {
            backend: Arc::new(SqliteBackend::open(&path).await.unwrap()),
            peer: Arc::new(SqliteBackend::open(&path).await.unwrap()),
            path,
            saved: Mutex::new(None),
            _dir: dir,
        }
    }

    fn raw(&self) -> Connection {
        let c = Connection::open(&self.path).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    }
}

#[async_trait]
impl Harness for Sqlite {
    fn lock(&self) -> Arc<dyn Lock> {
        self.backend.clone()
    }
    fn store(&self) -> Arc<dyn Store> {
        self.backend.clone()
    }
    fn peer_lock(&self) -> Arc<dyn Lock> {
        self.peer.clone()
    }
    fn peer_store(&self) -> Arc<dyn Store> {
        self.peer.clone()
    }
    async fn corrupt(&self, service: &str) {
        let c = self.raw();
        let old: Option<String> = c
            .query_row(
                "SELECT data_version FROM upsilon_state WHERE service = ?1",
                [service],
                |r| r.get(0),
            )
            .unwrap();
        *self.saved.lock().unwrap() = old;
        c.execute(
            "UPDATE upsilon_state SET data_version = 'one point oh' WHERE service = ?1",
            [service],
        )
        .unwrap();
    }
    async fn repair(&self, service: &str) {
        let old = self.saved.lock().unwrap().take();
        self.raw()
            .execute(
                "UPDATE upsilon_state SET data_version = ?2 WHERE service = ?1",
                rusqlite::params![service, old],
            )
            .unwrap();
    }
    async fn future_format(&self) -> bool {
        self.raw()
            .execute(
                "UPDATE upsilon_meta SET value = '99' WHERE key = 'format'",
                [],
            )
            .unwrap();
        true
    }
    async fn reset_format(&self) {
        self.raw()
            .execute(
                "UPDATE upsilon_meta SET value = ?1 WHERE key = 'format'",
                [upsilon_backends::sqlite::FORMAT.to_string()],
            )
            .unwrap();
    }
    async fn delete_state_row(&self, service: &str) -> bool {
        let deleted = self
            .raw()
            .execute("DELETE FROM upsilon_state WHERE service = ?1", [service])
            .unwrap();
        assert_eq!(deleted, 1, "the state row of {service}");
        true
    }
    async fn delete_history(&self, service: &str) -> bool {
        let deleted = self
            .raw()
            .execute("DELETE FROM upsilon_history WHERE service = ?1", [service])
            .unwrap();
        assert!(deleted > 0, "the history of {service}");
        true
    }
}

#[tokio::test]
async fn sqlite_backend_conforms() {
    let report = conformance::run_all(&Sqlite::new().await).await;
    assert_eq!(report.wake, Wake::Polls, "waiting nodes poll");
    assert_eq!(report.notices, Notices::Unsupported);
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);
}

#[tokio::test]
async fn a_newer_format_is_refused_at_open_and_nothing_is_written() {
    let h = Sqlite::new().await;
    h.future_format().await;
    let err = SqliteBackend::open(&h.path).await.unwrap_err();
    assert!(
        matches!(err, BackendError::UnsupportedFormat { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("format 99"), "{err}");
    let services: i64 = h
        .raw()
        .query_row("SELECT COUNT(*) FROM upsilon_state", [], |r| r.get(0))
        .unwrap();
    assert_eq!(services, 0);
}

fn counting(runs: &Arc<Mutex<Vec<String>>>, version: &str, order: u32, id: &str) -> Task {
    let runs = runs.clone();
    Task::new(
        version,
        order,
        id,
        move |ctx: &mut TaskContext| -> TaskFuture<'_> {
            runs.lock()
                .unwrap()
                .push(format!("{}:{}", ctx.holder().host, ctx.task().id));
            Box::pin(async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(())
            })
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_nodes_on_one_file_run_each_task_once() {
    let h = Sqlite::new().await;
    let runs = Arc::new(Mutex::new(Vec::new()));
    let tasks = vec![
        counting(&runs, "1.0", 1, "create"),
        counting(&runs, "1.1", 1, "backfill"),
        counting(&runs, "1.1", 2, "check"),
    ];
    let mut nodes = Vec::new();
    for n in 0..6 {
        // A connection of its own, as a separate process has.
        let backend = Arc::new(SqliteBackend::open(&h.path).await.unwrap());
        nodes.push(
            Upsilon::builder()
                .service("svc")
                .app_version("1.1")
                .backend(backend)
                .holder(testing::holder(n))
                .poll_interval(Duration::from_millis(20))
                .tasks(tasks.clone())
                .build()
                .unwrap(),
        );
    }
    let results = testing::run_nodes(nodes).await;
    let upgraded = results
        .iter()
        .filter(|r| matches!(r, Ok(Outcome::Upgraded { .. })))
        .count();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(upgraded, 1);
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 3, "{runs:?}");
    let node = runs[0].split(':').next().unwrap();
    assert!(
        runs.iter().all(|r| r.starts_with(&format!("{node}:"))),
        "{runs:?}"
    );
    let snap = h.backend.load("svc").await.unwrap();
    assert_eq!(
        snap.data_version,
        Some(upsilon::parse_version("1.1").unwrap())
    );
    assert_eq!(h.backend.history("svc").await.unwrap().len(), 3);
}

#[tokio::test]
async fn services_share_one_file() {
    let h = Sqlite::new().await;
    let runs = Arc::new(Mutex::new(Vec::new()));
    for service in ["billing", "search"] {
        Upsilon::builder()
            .service(service)
            .app_version("1.0")
            .backend(h.backend.clone())
            .tasks(vec![counting(&runs, "1.0", 1, service)])
            .build()
            .unwrap()
            .run()
            .await
            .unwrap();
    }
    assert_eq!(runs.lock().unwrap().len(), 2);
    for service in ["billing", "search"] {
        let snap = h.backend.load(service).await.unwrap();
        assert_eq!(snap.tasks.len(), 1, "{service}");
    }
}

#[tokio::test]
async fn connect_by_url() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    let backend = upsilon_backends::connect(&url).await.unwrap();
    assert!(backend.load("svc").await.unwrap().is_empty());
    let err = upsilon_backends::connect("sqlite:").await.err().unwrap();
    assert!(
        err.to_string().contains("the SQLite path is empty"),
        "{err}"
    );
    let err = SqliteBackend::open("/nonexistent-dir/x/y.db")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot open the SQLite database /nonexistent-dir/x/y.db: its directory"),
        "{err}"
    );
}

async fn grant(lock: &dyn Lock, n: usize) -> upsilon::backend::Lease {
    let ttl = Duration::from_secs(60);
    match lock.try_acquire("svc", &testing::holder(n), ttl).await {
        Ok(upsilon::backend::Acquire::Granted(lease)) => lease,
        other => panic!("grant {n}: {other:?}"),
    }
}

/// `DELETE FROM upsilon_state` after a grant that wrote no history, claimed
/// or not: the fences are kept apart from the state row, so the next grant
/// is still above every earlier one (S1), and the store still refuses the
/// fence it had seen before the newest (S2).
#[tokio::test]
async fn deleting_the_state_row_after_grants_without_history_keeps_the_fences() {
    let h = Sqlite::new().await;
    let lock = &*h.backend;
    let first = grant(lock, 1).await;
    h.backend.claim("svc", first.fence).await.unwrap();
    h.delete_state_row("svc").await;

    let second = grant(lock, 2).await;
    assert!(second.fence > first.fence, "{second:?} after {first:?}");
    h.delete_state_row("svc").await;

    let third = grant(lock, 3).await;
    assert!(third.fence > second.fence, "{third:?} after {second:?}");
    h.backend.claim("svc", third.fence).await.unwrap();
    h.delete_state_row("svc").await;
    match h.backend.claim("svc", second.fence).await {
        Err(BackendError::StaleFence { presented, current }) => {
            assert_eq!((presented, current), (second.fence, third.fence));
        }
        other => panic!("a claim with an older fence after the deletion: {other:?}"),
    }
    assert!(grant(lock, 4).await.fence > third.fence);
}

/// Deleting the fences as well (every row of the service but its history):
/// the history still carries the fence past the deletion.
#[tokio::test]
async fn deleting_the_fences_too_leaves_the_history_to_carry_the_fence() {
    let h = Sqlite::new().await;
    let lease = grant(&*h.backend, 1).await;
    h.backend.claim("svc", lease.fence).await.unwrap();
    h.backend
        .apply("svc", lease.fence, &[testing::start_attempt("t", "1.0", 1)])
        .await
        .unwrap();
    let c = h.raw();
    for table in ["upsilon_state", "upsilon_fence"] {
        let n = c
            .execute(&format!("DELETE FROM {table} WHERE service = 'svc'"), [])
            .unwrap();
        assert_eq!(n, 1, "{table}");
    }
    assert!(grant(&*h.backend, 2).await.fence > lease.fence);
}

/// A store of more tasks than a read on the caller's thread takes, beside
/// a small one in the same file: each read returns the whole history of its
/// service, the newest attempt of each task last, whichever thread read it.
#[tokio::test]
async fn large_and_small_stores_in_one_file_read_whole_on_every_read() {
    let h = Sqlite::new().await;
    let failed_once = Arc::new(Mutex::new(false));
    let mut tasks: Vec<Task> = (1..=40)
        .map(|order| {
            Task::new(
                "1.0",
                order,
                &format!("t{order:02}"),
                |_ctx: &mut TaskContext| -> TaskFuture<'_> { Box::pin(async { Ok(()) }) },
            )
            .unwrap()
        })
        .collect();
    let flag = failed_once.clone();
    tasks.push(
        Task::new(
            "1.0",
            41,
            "flaky",
            move |_ctx: &mut TaskContext| -> TaskFuture<'_> {
                let first = !std::mem::replace(&mut *flag.lock().unwrap(), true);
                Box::pin(async move {
                    if first {
                        Err("the first attempt fails".into())
                    } else {
                        Ok(())
                    }
                })
            },
        )
        .unwrap(),
    );
    let node = |service: &str, tasks: Vec<Task>| {
        Upsilon::builder()
            .service(service)
            .app_version("1.0")
            .backend(h.backend.clone())
            .tasks(tasks)
            .build()
            .unwrap()
    };
    assert!(
        node("big", tasks.clone()).run().await.is_err(),
        "the flaky task fails once"
    );
    let again = node("big", tasks.clone()).run().await.unwrap();
    assert!(matches!(again, Outcome::Upgraded { .. }), "{again}");
    let small = node("small", tasks[..2].to_vec()).run().await.unwrap();
    assert!(matches!(small, Outcome::Upgraded { .. }), "{small}");
    for _ in 0..3 {
        for (service, count) in [("big", 41), ("small", 2), ("big", 41)] {
            let snap = h.backend.load(service).await.unwrap();
            assert_eq!(snap.tasks.len(), count, "{service}");
            assert!(
                snap.tasks.values().all(|t| t.completed),
                "{service}: {snap:?}"
            );
            assert_eq!(
                snap.data_version.map(|v| v.to_string()).as_deref(),
                Some("1.0.0")
            );
        }
        let flaky = &h.backend.load("big").await.unwrap().tasks;
        let flaky = flaky.iter().find(|(k, _)| k.id == "flaky").unwrap().1;
        assert_eq!((flaky.rows, flaky.last.attempt), (2, 2), "{flaky:?}");
    }
    // A backend opened afresh has read nothing yet: its first read of the
    // large store still returns every task.
    for first in ["big", "small"] {
        let reopened = SqliteBackend::open(&h.path).await.unwrap();
        for (service, count) in [(first, if first == "big" { 41 } else { 2 }), ("big", 41)] {
            let snap = reopened.load(service).await.unwrap();
            assert_eq!(snap.tasks.len(), count, "{service} after a new open");
        }
    }
    let up = node("big", tasks).run().await.unwrap();
    assert!(matches!(up, Outcome::UpToDate { .. }), "{up}");
}
