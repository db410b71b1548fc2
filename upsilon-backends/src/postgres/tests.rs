//! What the backend refuses to read, against a real server that the test
//! starts itself.

use std::time::Duration;

use upsilon::backend::{Acquire, BackendError, Lock, Store};
use upsilon::Holder;
use upsilon_test_servers::Postgres;

use super::{PostgresBackend, PostgresOptions};

fn is_corrupt<T: std::fmt::Debug>(r: Result<T, BackendError>) -> bool {
    matches!(r, Err(BackendError::Corrupt { .. }))
}

#[tokio::test]
async fn a_negative_fence_in_the_tables_is_corrupt_and_never_a_grant() {
    let pg = Postgres::start();
    let options = PostgresOptions::from_url(&pg.url()).unwrap();
    let backend = PostgresBackend::connect(options).await.unwrap();
    let holder = Holder::current();
    let ttl = Duration::from_secs(30);
    let lease = match backend.try_acquire("s", &holder, ttl).await.unwrap() {
        Acquire::Granted(lease) => lease,
        other => panic!("expected a grant, got {other:?}"),
    };
    backend.release(&lease).await.unwrap();

    pg.psql("UPDATE upsilon_state SET store_fence = -3 WHERE service = 's'");
    assert!(is_corrupt(backend.load("s").await));
    assert!(is_corrupt(backend.claim("s", 5).await));
    assert!(is_corrupt(backend.try_acquire("s", &holder, ttl).await));

    pg.psql("UPDATE upsilon_state SET store_fence = 0, granted = -1 WHERE service = 's'");
    assert!(is_corrupt(backend.try_acquire("s", &holder, ttl).await));
    assert!(backend.load("s").await.is_ok());

    pg.psql("UPDATE upsilon_state SET granted = 1 WHERE service = 's'");
    for floor in ["-2", "two"] {
        pg.psql(&format!(
            "UPDATE upsilon_meta SET value = '{floor}' WHERE key = 'fence:s'"
        ));
        assert!(
            is_corrupt(backend.try_acquire("s", &holder, ttl).await),
            "floor {floor}"
        );
    }
}
