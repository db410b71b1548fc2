//! The Redis backend against real servers that these tests start themselves
//! (see `upsilon-test-servers`): conformance, a crash with and without an
//! append-only file, dropped connections and subscriptions, credentials,
//! TLS, and nodes that run each task once.
//!
//! One server serves most tests, each test with a key prefix of its own;
//! the tests that stop, crash or reconfigure a server start their own.
#![cfg(feature = "redis")]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use upsilon::backend::{Acquire, AttemptState, BackendError, Change, Lease, Lock, Store};
use upsilon::testing;
use upsilon::testing::conformance::{self, Harness, Notices, Wake};
use upsilon::{Outcome, Task, TaskContext, TaskFuture, Upsilon};
use upsilon_backends::redis::redis::{self as driver, aio::MultiplexedConnection};
use upsilon_backends::redis::{RedisBackend, RedisOptions, FORMAT};
use upsilon_test_servers::{Fsync, Redis};

/// The server shared by this file's tests. Never dropped: its watchdog stops
/// it when the test process exits.
fn server() -> &'static Redis {
    static REDIS: OnceLock<Redis> = OnceLock::new();
    REDIS.get_or_init(Redis::start)
}

fn options(redis: &Redis, prefix: &str) -> RedisOptions {
    RedisOptions::from_url(&redis.url()).unwrap().prefix(prefix)
}

async fn backend(redis: &Redis, prefix: &str) -> RedisBackend {
    RedisBackend::connect_with(options(redis, prefix))
        .await
        .unwrap()
}

/// A plain connection of the test's own, behind the backend's back.
async fn raw(redis: &Redis) -> MultiplexedConnection {
    driver::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn cmd<T: driver::FromRedisValue>(conn: &mut MultiplexedConnection, args: &[&str]) -> T {
    let mut c = driver::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn granted(a: Acquire) -> Lease {
    match a {
        Acquire::Granted(l) => l,
        other => panic!("expected a grant, got {other:?}"),
    }
}

const TTL: Duration = Duration::from_secs(30);

struct Rd {
    backend: Arc<RedisBackend>,
    /// Another node's backend on the same prefix: its own connection and
    /// subscription.
    peer: Arc<RedisBackend>,
    prefix: String,
    conn: tokio::sync::Mutex<MultiplexedConnection>,
    saved: Mutex<Option<String>>,
}

impl Rd {
    async fn new(redis: &Redis, prefix: &str) -> Rd {
        Rd {
            backend: Arc::new(backend(redis, prefix).await),
            peer: Arc::new(backend(redis, prefix).await),
            prefix: prefix.to_owned(),
            conn: tokio::sync::Mutex::new(raw(redis).await),
            saved: Mutex::new(None),
        }
    }

    fn key(&self, service: &str, kind: &str) -> String {
        self.backend.key(service, kind)
    }

    async fn cmd<T: driver::FromRedisValue>(&self, args: &[&str]) -> T {
        cmd(&mut *self.conn.lock().await, args).await
    }

    /// Every meta key under the prefix.
    async fn meta_keys(&self) -> Vec<String> {
        let pattern = format!("{}:{{*}}:meta", self.prefix);
        self.cmd(&["KEYS", &pattern]).await
    }
}

#[async_trait]
impl Harness for Rd {
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
        let state = self.key(service, "state");
        let old: Option<String> = self.cmd(&["HGET", &state, "data_version"]).await;
        *self.saved.lock().unwrap() = old;
        let _: i64 = self
            .cmd(&["HSET", &state, "data_version", "one point oh"])
            .await;
    }
    async fn repair(&self, service: &str) {
        let state = self.key(service, "state");
        let old = self.saved.lock().unwrap().take();
        match old {
            Some(v) => {
                let _: i64 = self.cmd(&["HSET", &state, "data_version", &v]).await;
            }
            None => {
                let _: i64 = self.cmd(&["HDEL", &state, "data_version"]).await;
            }
        }
    }
    async fn future_format(&self) -> bool {
        for meta in self.meta_keys().await {
            let _: i64 = self.cmd(&["HSET", &meta, "format", "99"]).await;
        }
        true
    }
    async fn reset_format(&self) {
        for meta in self.meta_keys().await {
            let _: i64 = self
                .cmd(&["HSET", &meta, "format", &FORMAT.to_string()])
                .await;
        }
    }
    async fn delete_state_row(&self, service: &str) -> bool {
        let (state, lease) = (self.key(service, "state"), self.key(service, "lease"));
        let _: i64 = self.cmd(&["DEL", &state, &lease]).await;
        true
    }
    async fn delete_history(&self, service: &str) -> bool {
        let (history, order) = (self.key(service, "history"), self.key(service, "order"));
        let deleted: i64 = self.cmd(&["DEL", &history, &order]).await;
        assert_eq!(deleted, 2, "the history of {service}");
        true
    }
}

#[tokio::test]
async fn redis_backend_conforms() {
    let h = Rd::new(server(), "conformance").await;
    let report = conformance::run_all(&h).await;
    assert_eq!(report.wake, Wake::Notifies, "pub/sub wakes waiters");
    assert_eq!(
        report.notices,
        Notices::Delivered,
        "the holder's notice is published"
    );
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);
}

/// Retries `op` while it fails with a transient error (a connection being
/// re-established), for at most `limit`; how many transient errors it met.
async fn riding_out<T, F, Fut>(limit: Duration, mut op: F) -> (T, usize)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BackendError>>,
{
    let deadline = Instant::now() + limit;
    let mut transient = 0;
    loop {
        match op().await {
            Ok(v) => return (v, transient),
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                transient += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("after {transient} transient errors: {e}"),
        }
    }
}

/// Until `cond` holds, checked every 10 ms, for at most `limit`; how long
/// it took.
async fn until<F: FnMut() -> bool>(limit: Duration, mut cond: F) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

fn v(s: &str) -> semver::Version {
    upsilon::parse_version(s).unwrap()
}

fn finish(id: &str, version: &str, attempt: u32) -> Change {
    Change::Finish(upsilon::backend::FinishAttempt {
        key: upsilon::TaskKey {
            version: v(version),
            id: id.to_owned(),
        },
        attempt,
        state: AttemptState::Completed,
        error: None,
        duration: Duration::from_millis(5),
    })
}

/// Grants, claims and writes a completed task and a data version; leaves the
/// second grant held. Returns (the held lease, the history written).
async fn write_some(b: &RedisBackend, svc: &str) -> (Lease, Vec<upsilon::backend::HistoryEntry>) {
    let first = granted(b.try_acquire(svc, &testing::holder(1), TTL).await.unwrap());
    b.claim(svc, first.fence).await.unwrap();
    b.apply(
        svc,
        first.fence,
        &[
            testing::start_attempt("t", "1.1", 1),
            finish("t", "1.1", 1),
            Change::DataVersion(v("1.1")),
        ],
    )
    .await
    .unwrap();
    b.release(&first).await.unwrap();
    let second = granted(b.try_acquire(svc, &testing::holder(2), TTL).await.unwrap());
    assert!(second.fence > first.fence);
    b.claim(svc, second.fence).await.unwrap();
    (second, b.history(svc).await.unwrap())
}

/// `appendonly yes` with `appendfsync always`: every write is on disk before
/// it is acknowledged, so a server killed with SIGKILL comes back with the
/// fences, the lease, the data version and the history, and the backend
/// reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_with_appendfsync_always_nothing_is_lost() {
    let mut redis =
        tokio::task::spawn_blocking(|| Redis::builder().appendonly(Fsync::Always).start())
            .await
            .unwrap();
    let b = backend(&redis, "aof").await;
    let (held, history) = write_some(&b, "svc").await;
    let redis_dir = redis.dir().to_owned();
    redis = tokio::task::spawn_blocking(move || {
        redis.crash();
        redis.start_again();
        redis
    })
    .await
    .unwrap();
    assert!(redis_dir.join("appendonlydir").exists());

    // The same backend, reconnected.
    let (snap, _) = riding_out(Duration::from_secs(10), || b.load("svc")).await;
    assert_eq!(snap.data_version, Some(v("1.1")));
    assert_eq!(snap.fence, held.fence, "the store's fence survived");
    assert_eq!(b.history("svc").await.unwrap(), history);
    let current = b.current("svc").await.unwrap().expect("the lease survived");
    assert_eq!(
        (current.holder, current.fence),
        (testing::holder(2), held.fence)
    );
    assert!(matches!(
        b.try_acquire("svc", &testing::holder(3), TTL)
            .await
            .unwrap(),
        Acquire::Held(_)
    ));
    let renewed = b.renew(&held).await.unwrap();
    b.release(&renewed).await.unwrap();
    let next = granted(
        b.try_acquire("svc", &testing::holder(3), TTL)
            .await
            .unwrap(),
    );
    assert!(
        next.fence > held.fence,
        "S1: {} after {}",
        next.fence,
        held.fence
    );
    match b
        .apply("svc", held.fence - 1, &[Change::DataVersion(v("1.2"))])
        .await
    {
        Err(BackendError::StaleFence { .. }) => {}
        other => panic!("an older fence after the crash: {other:?}"),
    }
    drop(redis);
}

/// The control: without an append-only file a crash loses everything, and
/// the next grant reuses a fence that was granted before (S1 broken). This
/// is why Redis as the store needs `appendonly yes` (docs/REDIS.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_append_only_file_a_crash_forgets_the_fences() {
    let mut redis = tokio::task::spawn_blocking(Redis::start).await.unwrap();
    let b = backend(&redis, "noaof").await;
    let (held, _) = write_some(&b, "svc").await;
    redis = tokio::task::spawn_blocking(move || {
        redis.crash();
        redis.start_again();
        redis
    })
    .await
    .unwrap();
    let (snap, _) = riding_out(Duration::from_secs(10), || b.load("svc")).await;
    assert!(snap.is_empty() && snap.fence == 0, "{snap:?}");
    let again = granted(
        b.try_acquire("svc", &testing::holder(3), TTL)
            .await
            .unwrap(),
    );
    assert!(
        again.fence <= held.fence,
        "fence {} granted after the crash, {} before it",
        again.fence,
        held.fence
    );
    drop(redis);
}

fn counting(runs: &Arc<Mutex<Vec<String>>>, version: &str, order: u32, id: &str, ms: u64) -> Task {
    let runs = runs.clone();
    Task::new(
        version,
        order,
        id,
        move |ctx: &mut TaskContext| -> TaskFuture<'_> {
            runs.lock()
                .unwrap()
                .push(format!("{}:{}", ctx.holder().host, ctx.task().id));
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(())
            })
        },
    )
    .unwrap()
}

fn node(b: RedisBackend, name: &str, tasks: Vec<Task>, poll: Duration) -> Upsilon {
    Upsilon::builder()
        .service("svc")
        .app_version("1.1")
        .backend(Arc::new(b))
        .holder(upsilon::Holder {
            host: name.to_owned(),
            ..upsilon::Holder::current()
        })
        .tasks(tasks)
        .ttl(Duration::from_secs(6))
        .poll_interval(poll)
        .backend_attempts(20)
        .max_wait(Duration::from_secs(60))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_nodes_run_each_task_once() {
    let runs = Arc::new(Mutex::new(Vec::new()));
    let tasks = vec![
        counting(&runs, "1.0", 1, "create", 20),
        counting(&runs, "1.1", 1, "backfill", 20),
        counting(&runs, "1.1", 2, "check", 20),
    ];
    let mut nodes = Vec::new();
    for n in 0..6 {
        let b = backend(server(), "once").await;
        nodes.push(node(
            b,
            &format!("n{n}"),
            tasks.clone(),
            Duration::from_millis(50),
        ));
    }
    let results = testing::run_nodes(nodes).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let upgraded = results
        .iter()
        .filter(|r| matches!(r, Ok(Outcome::Upgraded { .. })))
        .count();
    assert_eq!(upgraded, 1, "{results:?}");
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 3, "{runs:?}");
    let who = runs[0].split(':').next().unwrap();
    assert!(
        runs.iter().all(|r| r.starts_with(&format!("{who}:"))),
        "{runs:?}"
    );
    let b = backend(server(), "once").await;
    assert_eq!(b.load("svc").await.unwrap().data_version, Some(v("1.1")));
    let history = b.history("svc").await.unwrap();
    assert_eq!(history.len(), 3);
    assert!(history.iter().all(|h| h.state == AttemptState::Completed));
    // The keys are the documented ones, all with the service's hash tag.
    let mut conn = raw(server()).await;
    let mut keys: Vec<String> = cmd(&mut conn, &["KEYS", "once:*"]).await;
    keys.sort();
    assert_eq!(
        keys,
        [
            "once:{svc}:history",
            "once:{svc}:meta",
            "once:{svc}:order",
            "once:{svc}:state"
        ]
    );
}

/// A node waiting for the lease sleeps until a message on the channel: with
/// a poll of 30 s, it still ends within a moment of the holder's release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_nodes_are_woken_by_pubsub_not_by_their_poll() {
    let runs = Arc::new(Mutex::new(Vec::new()));
    let tasks = vec![counting(&runs, "1.1", 1, "slow", 400)];
    let first = node(
        backend(server(), "wake").await,
        "first",
        tasks.clone(),
        Duration::from_secs(30),
    );
    let mut waiters = Vec::new();
    for n in 0..3 {
        let b = backend(server(), "wake").await;
        assert!(b.notifies(), "subscribed once connected");
        waiters.push(node(
            b,
            &format!("w{n}"),
            tasks.clone(),
            Duration::from_secs(30),
        ));
    }
    let start = Instant::now();
    let first_run = tokio::spawn(async move { first.run().await });
    let b = backend(server(), "wake").await;
    until(Duration::from_secs(5), || runs.lock().unwrap().len() == 1).await;
    assert!(b.current("svc").await.unwrap().is_some());
    let results = testing::run_nodes(waiters).await;
    let first_outcome = first_run.await.unwrap().unwrap();
    let total = start.elapsed();
    assert!(
        matches!(first_outcome, Outcome::Upgraded { .. }),
        "{first_outcome}"
    );
    for r in &results {
        assert!(matches!(r, Ok(Outcome::WaitedForOther { .. })), "{r:?}");
    }
    assert!(
        total < Duration::from_secs(5),
        "waiters finished after {total:?}"
    );
    assert_eq!(runs.lock().unwrap().len(), 1);
}

/// The holder's connections are killed while its task runs (the command
/// connection and the subscription): the backend reconnects, the renewals
/// and the completion go through, and the subscription comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_are_reconnected_mid_run() {
    // A server of its own: the others' connections must not be killed.
    let redis = Arc::new(tokio::task::spawn_blocking(Redis::start).await.unwrap());
    let b = backend(&redis, "dropped").await;
    let probe = b.clone();
    let killed = Arc::new(Mutex::new(Vec::new()));
    let k = killed.clone();
    let r = redis.clone();
    let task = Task::new(
        "1.1",
        1,
        "long",
        move |_ctx: &mut TaskContext| -> TaskFuture<'_> {
            let (k, r) = (k.clone(), r.clone());
            Box::pin(async move {
                let mut conn = raw(&r).await;
                for _ in 0..2 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    // Every connection but this one: the holder's, the others'.
                    let n: i64 = cmd(&mut conn, &["CLIENT", "KILL", "TYPE", "normal"]).await;
                    let p: i64 = cmd(&mut conn, &["CLIENT", "KILL", "TYPE", "pubsub"]).await;
                    k.lock().unwrap().push((n, p));
                }
                tokio::time::sleep(Duration::from_millis(900)).await;
                Ok(())
            })
        },
    )
    .unwrap();
    let up = Upsilon::builder()
        .service("svc")
        .app_version("1.1")
        .backend(Arc::new(b.clone()))
        .tasks(vec![task])
        .ttl(Duration::from_millis(1500))
        .backend_attempts(20)
        .build()
        .unwrap();
    let outcome = up.run().await.unwrap();
    assert!(matches!(outcome, Outcome::Upgraded { .. }), "{outcome}");
    let killed = killed.lock().unwrap().clone();
    assert_eq!(
        killed[0],
        (1, 1),
        "the holder's connection and subscription were killed"
    );
    let history = probe.history("svc").await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].state, AttemptState::Completed);
    assert_eq!(
        probe.load("svc").await.unwrap().data_version,
        Some(v("1.1"))
    );
    until(Duration::from_secs(10), || probe.notifies()).await;
}

/// While the subscription is down (here: a user that may not SUBSCRIBE),
/// `notifies()` is false, `wait` sleeps its timeout, and waiting nodes
/// poll: they still finish, one of them upgrading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pubsub_waiting_nodes_poll() {
    let mut conn = raw(server()).await;
    let _: () = cmd(
        &mut conn,
        &[
            "ACL",
            "SETUSER",
            "nosub",
            "on",
            ">nosub-pw",
            "~*",
            "&*",
            "+@all",
            "-subscribe",
            "-psubscribe",
            "-ssubscribe",
        ],
    )
    .await;
    let opts = || {
        RedisOptions::from_url(&format!(
            "redis://nosub:nosub-pw@127.0.0.1:{}/0",
            server().port()
        ))
        .unwrap()
        .prefix("poll")
    };
    let runs = Arc::new(Mutex::new(Vec::new()));
    let tasks = vec![
        counting(&runs, "1.1", 1, "a", 200),
        counting(&runs, "1.1", 2, "b", 200),
    ];
    let mut nodes = Vec::new();
    for n in 0..3 {
        let b = RedisBackend::connect_with(opts()).await.unwrap();
        assert!(!b.notifies(), "SUBSCRIBE is refused to this user");
        nodes.push(node(
            b,
            &format!("p{n}"),
            tasks.clone(),
            Duration::from_millis(100),
        ));
    }
    let results = testing::run_nodes(nodes).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let upgraded = results
        .iter()
        .filter(|r| matches!(r, Ok(Outcome::Upgraded { .. })))
        .count();
    assert_eq!(upgraded, 1, "{results:?}");
    assert_eq!(runs.lock().unwrap().len(), 2);

    // `wait` without a subscription returns by its timeout.
    let b = RedisBackend::connect_with(opts()).await.unwrap();
    let lease = granted(
        b.try_acquire("quiet", &testing::holder(1), TTL)
            .await
            .unwrap(),
    );
    let seen = b.current("quiet").await.unwrap().unwrap();
    let start = Instant::now();
    b.wait("quiet", &seen, Duration::from_millis(300))
        .await
        .unwrap();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    b.release(&lease).await.unwrap();
}

/// A subscription that is killed: `notifies()` turns false, a waiter is
/// woken (a message may have been missed), and it comes back by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_subscription_wakes_waiters_and_comes_back() {
    // A server of its own: the others' subscriptions must not be killed.
    let redis = tokio::task::spawn_blocking(Redis::start).await.unwrap();
    let b = backend(&redis, "resub").await;
    let lease = granted(
        b.try_acquire("svc", &testing::holder(1), TTL)
            .await
            .unwrap(),
    );
    let peer = backend(&redis, "resub").await;
    let seen = match peer
        .try_acquire("svc", &testing::holder(2), TTL)
        .await
        .unwrap()
    {
        Acquire::Held(info) => info,
        other => panic!("{other:?}"),
    };
    assert!(peer.notifies());
    let waiter = {
        let peer = peer.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            peer.wait("svc", &seen, Duration::from_secs(30))
                .await
                .unwrap();
            start.elapsed()
        })
    };
    let mut conn = raw(&redis).await;
    // Kill the subscriptions of both backends.
    let killed: i64 = cmd(&mut conn, &["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert!(killed >= 2, "{killed}");
    let woke = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter was woken")
        .unwrap();
    assert!(woke < Duration::from_secs(5), "{woke:?}");
    until(Duration::from_secs(10), || peer.notifies()).await;
    // Back up: a release wakes a waiter again.
    let seen = match peer
        .try_acquire("svc", &testing::holder(2), TTL)
        .await
        .unwrap()
    {
        Acquire::Held(info) => info,
        other => panic!("{other:?}"),
    };
    let waiter = {
        let peer = peer.clone();
        tokio::spawn(async move { peer.wait("svc", &seen, Duration::from_secs(30)).await })
    };
    b.release(&lease).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken by the release")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_wrong_password_gives_a_clear_error_without_the_password() {
    let good = server().password().unwrap().to_owned();
    let bad_url = server().url().replace(&good, "not-the-password");
    let err = RedisBackend::connect(&bad_url).await.unwrap_err();
    let text = err.to_string();
    assert!(
        !err.is_transient(),
        "retrying a wrong password is pointless: {text}"
    );
    eprintln!("wrong password: {text}");
    assert!(text.contains("check the user name and password"), "{text}");
    assert!(
        text.contains(&format!(
            "127.0.0.1:{} db 0 as user `default`",
            server().port()
        )),
        "{text}"
    );
    assert!(!text.contains("not-the-password"), "{text}");
    assert!(!format!("{err:?}").contains("not-the-password"));

    // No password at all, where one is required.
    let err = RedisBackend::connect(&format!("redis://127.0.0.1:{}/0", server().port()))
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(
        err.to_string().contains("check the user name and password"),
        "{err}"
    );

    // Through connect(), the URL scheme picks the backend.
    let err = upsilon_backends::connect(&bad_url)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("check the user name and password"), "{err}");
    assert!(!err.contains("not-the-password"), "{err}");

    // Nobody listening: worth retrying, and says where it tried.
    let port = upsilon_test_servers::free_port();
    let start = Instant::now();
    let err = RedisBackend::connect_with(
        RedisOptions::new()
            .port(port)
            .password("sekrit")
            .connect_timeout(Duration::from_millis(500)),
    )
    .await
    .unwrap_err();
    assert!(err.is_transient(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("cannot connect to Redis at 127.0.0.1:{port}")),
        "{text}"
    );
    assert!(!text.contains("sekrit"), "{text}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    let ok = upsilon_backends::connect(&server().url()).await.unwrap();
    assert!(ok.load("svc").await.unwrap().is_empty());
    assert!(!format!("{ok:?}").contains(&good));
}

/// `redis+unix://` through `upsilon_backends::connect`, and a prefix from
/// the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_url_connects() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("redis.sock");
    let s = sock.display().to_string();
    let redis = tokio::task::spawn_blocking(move || {
        Redis::builder()
            .password(false)
            .setting("unixsocket", &s)
            .setting("unixsocketperm", "700")
            .start()
    })
    .await
    .unwrap();
    let url = format!("redis+unix://{}?db=1&prefix=sock", sock.display());
    let b = upsilon_backends::connect(&url).await.unwrap();
    let lease = granted(
        b.try_acquire("svc", &testing::holder(1), TTL)
            .await
            .unwrap(),
    );
    b.claim("svc", lease.fence).await.unwrap();
    b.apply("svc", lease.fence, &[Change::Baseline(v("2.0"))])
        .await
        .unwrap();
    assert!(b.notifies());
    assert_eq!(b.services().await.unwrap(), ["svc"]);
    let mut conn = driver::Client::open(format!("redis+unix://{}?db=1", sock.display()))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let baseline: String = cmd(&mut conn, &["HGET", "sock:{svc}:state", "baseline"]).await;
    assert_eq!(baseline, "2.0.0");
    drop(redis);
}

/// A node that dies holding the lease (it never renews nor releases): Redis
/// has no session, so the lease is taken over once its TTL has run out, by
/// a node that sleeps until the expiry (it is subscribed), and not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_lease_is_taken_over_at_its_expiry() {
    let ttl = Duration::from_millis(1500);
    let dead = backend(server(), "dead").await;
    let lease = granted(
        dead.try_acquire("svc", &testing::holder(7), ttl)
            .await
            .unwrap(),
    );
    let granted_at = Instant::now();
    drop(dead);
    let runs = Arc::new(Mutex::new(Vec::new()));
    let b = backend(server(), "dead").await;
    let up = node(
        b.clone(),
        "next",
        vec![counting(&runs, "1.1", 1, "t", 10)],
        Duration::from_secs(30),
    );
    let outcome = up.run().await.unwrap();
    let took = granted_at.elapsed();
    assert!(matches!(outcome, Outcome::Upgraded { .. }), "{outcome}");
    assert!(
        took >= ttl,
        "taken over after {took:?}, before the TTL of {ttl:?}"
    );
    assert!(
        took < ttl + Duration::from_secs(1),
        "taken over only after {took:?}"
    );
    eprintln!("a dead holder's lease (TTL {ttl:?}) was taken over after {took:?}");
    let history = b.history("svc").await.unwrap();
    assert!(history[0].fence > lease.fence);
}

/// A TLS-only server: `rediss://` with the CA that signed its certificate
/// works, subscription included; without that CA, or without TLS, the
/// connection is refused with an error that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verifies_the_server_against_the_given_ca() {
    let redis = tokio::task::spawn_blocking(|| Redis::builder().tls().start())
        .await
        .unwrap();
    let ca = redis.ca_file();
    let url = format!("{}?ca_file={}&prefix=tls", redis.url(), ca.display());
    let b = RedisBackend::connect(&url).await.unwrap();
    let lease = granted(
        b.try_acquire("svc", &testing::holder(1), TTL)
            .await
            .unwrap(),
    );
    b.claim("svc", lease.fence).await.unwrap();
    b.apply("svc", lease.fence, &[Change::DataVersion(v("1.0"))])
        .await
        .unwrap();
    assert!(b.notifies(), "subscribed over TLS");
    b.release(&lease).await.unwrap();

    let localhost = url.replace("127.0.0.1", "localhost");
    let b = RedisBackend::connect(&localhost).await.unwrap();
    assert_eq!(b.load("svc").await.unwrap().data_version, Some(v("1.0")));

    // The system's roots do not know the throwaway CA.
    let err = RedisBackend::connect_with(
        RedisOptions::from_url(&redis.url())
            .unwrap()
            .connect_timeout(Duration::from_secs(1)),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    eprintln!("without the CA: {text}");
    assert!(!err.is_transient(), "{text}");
    assert!(text.contains("invalid peer certificate"), "{text}");
    assert!(text.contains("ca_file=PATH"), "{text}");
    assert!(!text.contains(redis.password().unwrap()), "{text}");

    // Plain TCP to the TLS port.
    let plain = redis.url().replace("rediss://", "redis://");
    let err = RedisBackend::connect_with(
        RedisOptions::from_url(&plain)
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .op_timeout(Duration::from_secs(1)),
    )
    .await
    .unwrap_err();
    eprintln!("without TLS: {err}");
    assert!(err.to_string().contains("use rediss://"), "{err}");
    assert!(
        !err.to_string().contains(redis.password().unwrap()),
        "{err}"
    );
}

/// `raise_fence` compares fences exactly, also above 2^53 where Lua's
/// numbers (doubles) cannot tell 2^53 + 1 from 2^53.
#[tokio::test]
async fn raise_fence_is_exact_for_large_fences() {
    let b = backend(server(), "raise").await;
    let big: u64 = 1 << 53;
    b.raise_fence("svc", big).await.unwrap();
    b.raise_fence("svc", big + 1).await.unwrap();
    let lease = granted(
        b.try_acquire("svc", &testing::holder(1), TTL)
            .await
            .unwrap(),
    );
    assert_eq!(lease.fence, big + 2);
    b.release(&lease).await.unwrap();
    b.raise_fence("svc", 5).await.unwrap();
    let lease = granted(
        b.try_acquire("svc", &testing::holder(1), TTL)
            .await
            .unwrap(),
    );
    assert_eq!(lease.fence, big + 3, "a lower floor changes nothing");
    let err = b.raise_fence("svc", u64::MAX).await.unwrap_err();
    assert!(matches!(err, BackendError::Rejected(_)), "{err}");
}

/// Redis as the lock, PostgreSQL as the store: a Redis that forgets its
/// counter in a crash (no append-only file) grants a fence the store has
/// already seen; the runner bars it at the store, waits a TTL, raises
/// Redis's counter to the store's fence and goes on, each task run once (S1,
/// S2).
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_the_lock_before_a_postgres_store_a_forgetful_redis_catches_up() {
    use upsilon_backends::postgres::PostgresBackend;
    let (pg, mut redis) =
        tokio::task::spawn_blocking(|| (upsilon_test_servers::Postgres::start(), Redis::start()))
            .await
            .unwrap();
    let store = Arc::new(PostgresBackend::connect_url(&pg.url()).await.unwrap());
    let runs = Arc::new(Mutex::new(Vec::new()));
    let up = |lock: RedisBackend, app: &str, tasks: Vec<Task>| {
        Upsilon::builder()
            .service("svc")
            .app_version(app)
            .lock(Arc::new(lock))
            .store(store.clone())
            .tasks(tasks)
            .ttl(Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let lock = backend(&redis, "mixed").await;
    let tasks_10 = vec![counting(&runs, "1.0", 1, "create", 1)];
    for _ in 0..3 {
        up(lock.clone(), "1.0", tasks_10.clone())
            .run()
            .await
            .unwrap();
        // Each run's lease is released; the next one is granted a new fence.
        store
            .claim("svc", store.load("svc").await.unwrap().fence + 1)
            .await
            .unwrap();
    }
    let seen = store.load("svc").await.unwrap().fence;
    redis = tokio::task::spawn_blocking(move || {
        redis.crash();
        redis.start_again();
        redis
    })
    .await
    .unwrap();
    let lock = backend(&redis, "mixed").await;
    let mut tasks_11 = tasks_10.clone();
    tasks_11.push(counting(&runs, "1.1", 1, "backfill", 1));
    let outcome = up(lock.clone(), "1.1", tasks_11).run().await.unwrap();
    let Outcome::Upgraded { report } = outcome else {
        panic!("expected an upgrade, got {outcome:?}");
    };
    // Redis granted fence 1 again, behind the store: the runner barred
    // Redis's fences at the store (2^20 above its fence), waited a TTL,
    // raised Redis's counter to the store's fence and was granted the one
    // above.
    assert!(
        report.fence > seen + (1 << 20),
        "upgraded with fence {} after {seen}",
        report.fence
    );
    let ran: Vec<String> = runs
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.rsplit(':').next().unwrap().to_owned())
        .collect();
    assert_eq!(ran, ["create", "backfill"], "each task ran once");
    assert_eq!(
        store.load("svc").await.unwrap().data_version,
        Some(v("1.1"))
    );
    drop((pg, redis));
}

/// The ACL docs/REDIS.md gives is enough: a user limited to it runs an
/// upgrade, lists the services and is woken by pub/sub; a user without
/// the scripts is told what it lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_the_documented_acl_can_run_and_one_without_is_told_why() {
    let mut conn = raw(server()).await;
    let acl = "on >acl-pw resetkeys ~acl:* resetchannels &acl:wake -@all +ping +scan +evalsha \
               +eval +script|load +time +hget +hmget +hset +hincrby +del +pexpireat +lindex \
               +lrange +rpush +publish +subscribe";
    let mut args = vec!["ACL", "SETUSER", "upsilon-acl"];
    args.extend(acl.split_whitespace());
    let _: () = cmd(&mut conn, &args).await;
    let url = format!(
        "redis://upsilon-acl:acl-pw@127.0.0.1:{}/0?prefix=acl",
        server().port()
    );
    let b = RedisBackend::connect(&url).await.unwrap();
    assert!(b.notifies(), "subscribed on the allowed channel");
    let runs = Arc::new(Mutex::new(Vec::new()));
    let outcome = node(
        b.clone(),
        "acl",
        vec![counting(&runs, "1.1", 1, "t", 1)],
        Duration::from_millis(100),
    )
    .run()
    .await
    .unwrap();
    assert!(matches!(outcome, Outcome::Upgraded { .. }), "{outcome}");
    assert_eq!(b.services().await.unwrap(), ["svc"]);
    let _: () = cmd(
        &mut conn,
        &["ACL", "SETUSER", "upsilon-acl", "-evalsha", "-eval"],
    )
    .await;
    let err = b.load("svc").await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("Upsilon's user needs"), "{err}");
    eprintln!("without EVALSHA: {err}");
}

/// The driver's RESP3 (`protocol=resp3`), where scripts' missing values
/// come back as another type, conforms just the same.
#[tokio::test]
async fn over_resp3_it_conforms_too() {
    let url = format!("{}?protocol=resp3&prefix=resp3", server().url());
    let h = Rd {
        backend: Arc::new(RedisBackend::connect(&url).await.unwrap()),
        peer: Arc::new(RedisBackend::connect(&url).await.unwrap()),
        prefix: "resp3".into(),
        conn: tokio::sync::Mutex::new(raw(server()).await),
        saved: Mutex::new(None),
    };
    let report = conformance::run_all(&h).await;
    assert_eq!(report.wake, Wake::Notifies, "pub/sub wakes waiters");
    assert_eq!(
        report.notices,
        Notices::Delivered,
        "the holder's notice is published"
    );
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);
}

/// Values that do not parse, wherever they are, give `Corrupt` from every
/// operation that reads them, and neither a grant nor a write happens.
#[tokio::test]
async fn corrupt_keys_are_typed_errors_and_nothing_is_written() {
    let h = Rd::new(server(), "corrupt").await;
    let b = &h.backend;
    // (what, the commands that break it, whether the store's operations
    // read it, whether a grant reads it)
    type Case<'a> = (&'a str, &'a [&'a [&'a str]], bool, bool);
    let cases: [Case<'_>; 6] = [
        (
            "a grant counter that is not a number",
            &[&["HSET", "meta", "granted", "lots"]],
            false,
            true,
        ),
        (
            "a negative store fence",
            &[&["HSET", "meta", "store", "-3"]],
            true,
            true,
        ),
        (
            "a revision that is not a number",
            &[&["HSET", "meta", "rev", "x"]],
            true,
            true,
        ),
        (
            "a lease fence that is not a number",
            &[&[
                "HSET",
                "lease",
                "holder",
                "h;;1;r",
                "fence",
                "one",
                "expires_at_ms",
                "99999999999999",
            ]],
            false,
            true,
        ),
        (
            "a history row that is not JSON",
            &[&["HSET", "history", "1.1.0 t#1", "{not json"]],
            true,
            true,
        ),
        (
            "a state key of the wrong type",
            &[&["DEL", "state"], &["SET", "state", "a string"]],
            true,
            false,
        ),
    ];
    for (n, (what, commands, store_reads, grant_reads)) in cases.iter().enumerate() {
        let svc = format!("svc{n}");
        let (held, _) = write_some(b, &svc).await;
        b.release(&held).await.unwrap();
        for c in *commands {
            let mut args: Vec<String> = c.iter().map(|a| a.to_string()).collect();
            args[1] = h.key(&svc, c[1]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let _: driver::Value = h.cmd(&args).await;
        }
        let dump = || async {
            let mut all = Vec::new();
            for kind in ["meta", "lease", "state", "history", "order"] {
                let d: Option<Vec<u8>> = h.cmd(&["DUMP", &h.key(&svc, kind)]).await;
                all.push(d);
            }
            all
        };
        let before = dump().await;
        let corrupt = |r: Result<(), BackendError>| matches!(r, Err(BackendError::Corrupt { .. }));
        if *store_reads {
            let apply = b
                .apply(&svc, held.fence, &[testing::start_attempt("t", "1.1", 2)])
                .await;
            assert!(corrupt(apply), "{what}: apply");
            assert!(corrupt(b.load(&svc).await.map(|_| ())), "{what}: load");
            if what.contains("history row") {
                assert!(
                    corrupt(b.history(&svc).await.map(|_| ())),
                    "{what}: history"
                );
            }
            assert!(
                corrupt(b.claim(&svc, held.fence + 1).await.map(|_| ())),
                "{what}: claim"
            );
        }
        if *grant_reads {
            let grant = b.try_acquire(&svc, &testing::holder(5), TTL).await;
            assert!(corrupt(grant.map(|_| ())), "{what}: grant");
        }
        if what.contains("lease") {
            assert!(
                corrupt(b.current(&svc).await.map(|_| ())),
                "{what}: current"
            );
        }
        assert_eq!(dump().await, before, "{what}: nothing was written");
    }
}
