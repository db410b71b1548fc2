use super::*;

async fn synchronous(backend: &SqliteBackend) -> i64 {
    backend
        .call(|session| {
            session
                .conn
                .pragma_query_value(None, "synchronous", |r| r.get(0))
                .map_err(driver)
        })
        .await
        .unwrap()
}

/// `synchronous = FULL` (2) syncs the WAL at every commit, so a commit
/// acknowledged before a power loss is still there after it. Checked on the
/// connection of a backend that created the file and of one that found it.
#[tokio::test]
async fn every_connection_syncs_each_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.db");
    let first = SqliteBackend::open(&path).await.unwrap();
    let second = SqliteBackend::open(&path).await.unwrap();
    for backend in [&first, &second, &first.clone()] {
        assert_eq!(synchronous(backend).await, 2, "PRAGMA synchronous");
    }
}
