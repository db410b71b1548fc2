//! Invariant E1 on PostgreSQL, against a real server: when the holder's
//! listening session ends while the holder lives, the holder learns of it
//! (`Lock::until_lost`) within `holder_ping_every + holder_ping_timeout`,
//! and no waiting node is granted the lease before `takeover_grace` has
//! passed since it first saw that session gone, so the old holder has
//! stopped its task before anyone else can start one.
#![cfg(feature = "postgres")]

mod common;

use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{granted, raw, until, via_port, Proxy};
use upsilon::backend::{Acquire, BackendError, Lease, LeaseInfo, Lock};
use upsilon::testing;
use upsilon_backends::postgres::tokio_postgres::Client;
use upsilon_backends::postgres::{PostgresBackend, PostgresOptions};
use upsilon_test_servers::Postgres;

// The default ping interval; a ping timeout (and so a grace) longer than
// the defaults (200 ms, 600 ms), so that a ping slowed down by a busy test
// machine is not taken for a lost session.
const EVERY: Duration = Duration::from_millis(100);
const TIMEOUT: Duration = Duration::from_millis(1000);
const GRACE: Duration = Duration::from_millis(1300);
/// Scheduling and loopback latency on a busy two-core machine.
const SLACK: Duration = Duration::from_millis(150);
const TTL: Duration = Duration::from_secs(30);

/// This file's server; its log names each line's process and application.
fn server() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(|| {
        Postgres::builder()
            .setting("log_line_prefix", "[%p %a] ")
            .start()
    })
}

fn options(url: &str, schema: &str, app: &str) -> PostgresOptions {
    PostgresOptions::from_url(url)
        .unwrap()
        .schema(schema)
        .application_name(app)
        .holder_ping_every(EVERY)
        .holder_ping_timeout(TIMEOUT)
        .takeover_grace(GRACE)
}

async fn node(url: &str, schema: &str, app: &str) -> PostgresBackend {
    PostgresBackend::connect(options(url, schema, app))
        .await
        .unwrap()
}

fn held(a: Acquire) -> LeaseInfo {
    match a {
        Acquire::Held(info) => info,
        other => panic!("expected the lease held, got {other:?}"),
    }
}

/// The server process of the session that the lease row of `service` names.
async fn lease_pid(client: &Client, schema: &str, service: &str) -> i32 {
    client
        .query_one(
            &format!("SELECT lease_pid FROM {schema}.upsilon_state WHERE service = $1"),
            &[&service],
        )
        .await
        .unwrap()
        .get::<_, Option<i32>>(0)
        .expect("the lease row names the holder's session")
}

async fn session_exists(client: &Client, pid: i32) -> bool {
    client
        .query_one(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0)
}

/// Awaits `until_lost` of `lease` on `b`; returns when it resolved.
fn watch_loss(
    b: &PostgresBackend,
    lease: &Lease,
) -> tokio::task::JoinHandle<(Instant, BackendError)> {
    let (b, lease) = (b.clone(), lease.clone());
    tokio::spawn(async move {
        let e = b.until_lost(&lease).await;
        (Instant::now(), e)
    })
}

/// Asks for the lease of `service` every 20 ms from `from` until granted;
/// returns when the grant came back.
async fn first_grant(b: &PostgresBackend, service: &str, from: Instant) -> (Instant, Lease) {
    loop {
        let answer = b
            .try_acquire(service, &testing::holder(2), TTL)
            .await
            .unwrap();
        let now = Instant::now();
        match answer {
            Acquire::Granted(lease) => return (now, lease),
            Acquire::Held(_) => assert!(
                now < from + GRACE + Duration::from_secs(3),
                "still not granted {:?} after the session ended",
                now - from
            ),
            Acquire::StoreMoved => panic!("the waiter read no store"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_holder_session_stops_the_holder_before_anyone_takes_over() {
    let schema = "e1_terminate";
    let url = server().url();
    let client = raw(&url).await;
    let holder = node(&url, schema, "e1 holder").await;
    // Two waiting nodes: one asks again and again, one waits as the runner
    // does (`wait`, then ask).
    let asker = node(&url, schema, "e1 asker").await;
    let waiter = node(&url, schema, "e1 waiter").await;
    let a = granted(
        holder
            .try_acquire("a", &testing::holder(1), TTL)
            .await
            .unwrap(),
    );
    let b = granted(
        holder
            .try_acquire("b", &testing::holder(1), TTL)
            .await
            .unwrap(),
    );
    held(
        asker
            .try_acquire("a", &testing::holder(2), TTL)
            .await
            .unwrap(),
    );
    let seen_b = held(
        waiter
            .try_acquire("b", &testing::holder(3), TTL)
            .await
            .unwrap(),
    );
    let mut lost_a = watch_loss(&holder, &a);
    let lost_b = watch_loss(&holder, &b);
    // A live session answers its pings: nothing is lost.
    assert!(
        tokio::time::timeout(EVERY * 3 + TIMEOUT, &mut lost_a)
            .await
            .is_err(),
        "until_lost resolved while the session lived"
    );

    let pid = lease_pid(&client, schema, "a").await;
    assert_eq!(pid, lease_pid(&client, schema, "b").await, "one session");
    let ended = Instant::now();
    let killed: bool = client
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    until(Duration::from_secs(5), || async {
        !session_exists(&client, pid).await
    })
    .await;
    // Every answer from here on shows the session gone: each waiter's grace
    // starts at one of them, so no grant may come back before `from + GRACE`.
    let from = Instant::now();
    let runner_like = {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            let seen = held(
                waiter
                    .try_acquire("b", &testing::holder(3), TTL)
                    .await
                    .unwrap(),
            );
            assert_eq!(seen.fence, seen_b.fence);
            waiter.wait("b", &seen, TTL).await.unwrap();
            let woke = Instant::now();
            let lease = granted(
                waiter
                    .try_acquire("b", &testing::holder(3), TTL)
                    .await
                    .unwrap(),
            );
            (woke, lease)
        })
    };
    let (granted_a, lease_a) = first_grant(&asker, "a", from).await;
    let (woke_b, lease_b) = runner_like.await.unwrap();
    let (lost_at_a, err_a) = lost_a.await.unwrap();
    let (lost_at_b, err_b) = lost_b.await.unwrap();

    eprintln!(
        "holder lost its leases {:?} / {:?} after the termination; \
         granted to others {:?} / {:?} after it was seen gone",
        lost_at_a - ended,
        lost_at_b - ended,
        granted_a - from,
        woke_b - from
    );
    for (err, lost_at) in [(&err_a, lost_at_a), (&err_b, lost_at_b)] {
        assert!(matches!(err, BackendError::LeaseLost(_)), "{err:?}");
        assert!(err.to_string().contains("session"), "{err}");
        assert!(
            lost_at - ended <= EVERY + TIMEOUT + SLACK,
            "the holder learnt of it {:?} after the termination",
            lost_at - ended
        );
    }
    // Not before the grace since the session was seen gone, and soon after.
    assert!(
        granted_a >= from + GRACE,
        "granted {:?} after",
        granted_a - from
    );
    assert!(
        woke_b >= from + GRACE,
        "wait returned {:?} after",
        woke_b - from
    );
    assert!(granted_a < from + GRACE + Duration::from_secs(1));
    assert!(woke_b < from + GRACE + Duration::from_secs(1));
    // E1: the old holder knew before the new one was granted.
    assert!(lost_at_a < granted_a && lost_at_b < woke_b);
    assert!(lease_a.fence > a.fence && lease_b.fence > b.fence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_idle_session_timeout_the_holder_pings_keep_its_session_and_waiters_poll() {
    let schema = "e1_idle";
    let client = raw(&server().url()).await;
    client
        .batch_execute(
            "CREATE ROLE e1_idle LOGIN SUPERUSER PASSWORD 'idle-pw';
             ALTER ROLE e1_idle SET idle_session_timeout = '500ms';",
        )
        .await
        .unwrap();
    let url = format!(
        "postgres://e1_idle:idle-pw@127.0.0.1:{}/postgres",
        server().port()
    );
    let holder = node(&url, schema, "idle holder").await;
    // A waiting node that blocks on the lease's lock is never idle while it
    // waits: this one listens and checks, so that its sessions are idle
    // between notifications and the server closes them.
    let waiter = PostgresBackend::connect(
        options(&url, schema, "idle waiter")
            .holder_check_every(Duration::from_secs(2))
            .lease_locks(false),
    )
    .await
    .unwrap();
    let lease = granted(
        holder
            .try_acquire("svc", &testing::holder(1), TTL)
            .await
            .unwrap(),
    );
    let since_grant = Instant::now();
    let pid = lease_pid(&client, schema, "svc").await;
    let mut lost = watch_loss(&holder, &lease);

    // The waiting node waits as the runner does; every call must succeed.
    // A wait ends when its session is closed (notifications may have been
    // missed), and the node asks again.
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move {
            let mut asked = 0;
            loop {
                asked += 1;
                let answer = waiter
                    .try_acquire("svc", &testing::holder(2), TTL)
                    .await
                    .expect("a waiting node's try_acquire");
                let now = Instant::now();
                let seen = match answer {
                    Acquire::Granted(lease) => return (now, lease, asked),
                    Acquire::Held(seen) => seen,
                    Acquire::StoreMoved => panic!("the waiter read no store"),
                };
                let nap = if waiter.notifies() {
                    TTL
                } else {
                    Duration::from_millis(200)
                };
                waiter
                    .wait("svc", &seen, nap)
                    .await
                    .expect("a waiting node's wait");
            }
        })
    };
    // The server closes the waiter's idle sessions, and never the holder's.
    let reaped = |log: &str, who: &str| {
        log.lines().any(|l| {
            l.contains(who) && l.contains("terminating connection due to idle-session timeout")
        })
    };
    until(Duration::from_secs(10), || async {
        reaped(&server().log(), "idle waiter]")
            && since_grant.elapsed() > Duration::from_millis(1600)
    })
    .await;
    assert!(
        !reaped(&server().log(), &format!("[{pid} ")),
        "the holder's session {pid} was closed"
    );
    assert!(
        session_exists(&client, pid).await,
        "the holder's session lives"
    );
    assert!(
        tokio::time::timeout(Duration::ZERO, &mut lost)
            .await
            .is_err(),
        "until_lost resolved while the session lived"
    );

    let ended = Instant::now();
    client
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let (lost_at, err) = lost.await.unwrap();
    let (granted_at, next, asked) = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiter was granted the lease")
        .unwrap();
    eprintln!(
        "idle_session_timeout 500ms: the holder lost its lease {:?} after the termination, \
         the waiter (which asked {asked} times) was granted it {:?} after",
        lost_at - ended,
        granted_at - ended
    );
    assert!(matches!(err, BackendError::LeaseLost(_)), "{err:?}");
    assert!(
        lost_at - ended <= EVERY + TIMEOUT + SLACK,
        "{:?}",
        lost_at - ended
    );
    assert!(next.fence > lease.fence, "the waiter was granted the lease");
    assert!(
        granted_at >= ended + GRACE,
        "granted {:?} after",
        granted_at - ended
    );
    assert!(lost_at < granted_at, "E1: the holder knew first");
    assert!(
        asked > 2,
        "the waiter asked again after its sessions were closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_session_stops_answering_learns_it_from_its_pings() {
    let schema = "e1_frozen";
    let (proxy, port) = Proxy::start(server().port()).await;
    let url = via_port(&server().url(), server().port(), port);
    let holder = node(&url, schema, "frozen holder").await;
    let lease = granted(
        holder
            .try_acquire("svc", &testing::holder(1), TTL)
            .await
            .unwrap(),
    );
    let mut lost = watch_loss(&holder, &lease);
    assert!(
        tokio::time::timeout(EVERY * 3 + TIMEOUT, &mut lost)
            .await
            .is_err(),
        "until_lost resolved while the session answered"
    );
    // The network stops delivering; the connection stays open.
    let frozen = Instant::now();
    proxy.frozen.store(true, Ordering::SeqCst);
    let (lost_at, err) = lost.await.unwrap();
    eprintln!("a frozen session was noticed after {:?}", lost_at - frozen);
    assert!(err.to_string().contains("no answer within"), "{err}");
    assert!(
        lost_at - frozen <= EVERY + TIMEOUT + SLACK,
        "{:?}",
        lost_at - frozen
    );
    proxy.frozen.store(false, Ordering::SeqCst);
}

#[tokio::test]
async fn a_lease_granted_without_a_session_is_never_reported_lost() {
    // Behind a transaction pooler there is no session: the row names none,
    // so nobody takes the lease over before it expires.
    let b = PostgresBackend::connect(
        options(&server().url(), "e1_pooled", "pooled").transaction_pooling(true),
    )
    .await
    .unwrap();
    let lease = granted(
        b.try_acquire("svc", &testing::holder(1), TTL)
            .await
            .unwrap(),
    );
    assert!(
        tokio::time::timeout(EVERY * 3 + TIMEOUT, b.until_lost(&lease))
            .await
            .is_err()
    );
    b.release(&lease).await.unwrap();
}
