//! The etcd backend against a real etcd that these tests start themselves
//! (see `upsilon-test-servers`): conformance, the loss signal, a crash and a
//! restart, TTLs, credentials, several endpoints, TLS, and nodes running an
//! upgrade together.
//!
//! One server serves most tests, each under a key prefix of its own; the
//! tests that crash the server, turn authentication on or need TLS have one
//! of their own.
#![cfg(feature = "etcd")]

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use upsilon::backend::{Acquire, AttemptState, BackendError, Change, Lease, Lock, Store};
use upsilon::testing::conformance::{self, Harness, Notices, Wake};
use upsilon::testing::{self, start_attempt};
use upsilon::{Outcome, Task, TaskContext, TaskFuture, Upsilon};
use upsilon_backends::etcd::etcd_client::{Client, DeleteOptions};
use upsilon_backends::etcd::{EtcdBackend, EtcdOptions, FORMAT};
use upsilon_test_servers::Etcd;

/// The server shared by this file's tests. Never dropped: its watchdog stops
/// it when the test process exits.
fn server() -> &'static Etcd {
    static ETCD: OnceLock<Etcd> = OnceLock::new();
    ETCD.get_or_init(Etcd::start)
}

fn options(prefix: &str) -> EtcdOptions {
    EtcdOptions::new()
        .endpoint(server().endpoint())
        .prefix(prefix)
}

async fn backend(prefix: &str) -> EtcdBackend {
    EtcdBackend::connect(options(prefix)).await.unwrap()
}

/// A client of the shared server outside Upsilon.
async fn raw(endpoint: &str) -> Client {
    Client::connect([endpoint], None).await.unwrap()
}

fn granted(a: Acquire) -> Lease {
    match a {
        Acquire::Granted(l) => l,
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// Awaits `fut` for at most `limit`; panics naming `what` otherwise.
async fn within<T>(limit: Duration, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {limit:?}"))
}

struct EtcdHarness {
    backend: Arc<EtcdBackend>,
    /// Another node's backend on the same prefix: its own client and watch.
    peer: Arc<EtcdBackend>,
    raw: Client,
    prefix: String,
    saved: Mutex<Option<Vec<u8>>>,
}

impl EtcdHarness {
    async fn new(prefix: &str) -> EtcdHarness {
        EtcdHarness {
            backend: Arc::new(backend(prefix).await),
            peer: Arc::new(backend(prefix).await),
            raw: raw(&server().endpoint()).await,
            prefix: prefix.to_owned(),
            saved: Mutex::new(None),
        }
    }

    fn key(&self, service: &str, what: &str) -> String {
        format!("{}/s/{service}/{what}", self.prefix)
    }
}

#[async_trait]
impl Harness for EtcdHarness {
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
    fn min_ttl(&self) -> Duration {
        Duration::from_secs(2)
    }
    async fn corrupt(&self, service: &str) {
        let mut kv = self.raw.kv_client();
        let key = self.key(service, "state");
        let found = kv.get(key.as_str(), None).await.unwrap();
        let old = found.kvs().first().map(|kv| kv.value().to_vec());
        *self.saved.lock().unwrap() = old;
        kv.put(
            key,
            r#"{"data_version":"one point oh","baseline":null}"#,
            None,
        )
        .await
        .unwrap();
    }
    async fn repair(&self, service: &str) {
        let old = self.saved.lock().unwrap().take().expect("corrupted first");
        let mut kv = self.raw.kv_client();
        kv.put(self.key(service, "state"), old, None).await.unwrap();
    }
    async fn future_format(&self) -> bool {
        let mut kv = self.raw.kv_client();
        kv.put(format!("{}/format", self.prefix), "99", None)
            .await
            .unwrap();
        true
    }
    async fn reset_format(&self) {
        let mut kv = self.raw.kv_client();
        kv.put(format!("{}/format", self.prefix), FORMAT.to_string(), None)
            .await
            .unwrap();
    }
    async fn delete_state_row(&self, service: &str) -> bool {
        // Everything but the history: the lease, the fence counters (the
        // offset and the store's fence), the data version and the baseline.
        let mut kv = self.raw.kv_client();
        let mut deleted = 0;
        for what in ["lock", "fence", "state"] {
            deleted += kv
                .delete(self.key(service, what), None)
                .await
                .unwrap()
                .deleted();
        }
        assert!(deleted > 0, "the keys of {service}");
        true
    }
    async fn delete_history(&self, service: &str) -> bool {
        let mut kv = self.raw.kv_client();
        let deleted = kv
            .delete(
                self.key(service, "h/"),
                Some(DeleteOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        assert!(deleted.deleted() > 0, "the history of {service}");
        true
    }
}

#[tokio::test]
async fn etcd_backend_conforms() {
    let report = conformance::run_all(&EtcdHarness::new("/conformance").await).await;
    assert_eq!(report.wake, Wake::Notifies, "the watch wakes waiters");
    assert_eq!(report.notices, Notices::Unsupported);
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);
}

/// An error and its causes, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

fn version(text: &str) -> semver::Version {
    upsilon::parse_version(text).unwrap()
}

fn finish(id: &str, version: &str) -> Change {
    Change::Finish(upsilon::backend::FinishAttempt {
        key: upsilon::TaskKey {
            version: self::version(version),
            id: id.to_owned(),
        },
        attempt: 1,
        state: AttemptState::Completed,
        error: None,
        duration: Duration::from_millis(5),
    })
}

/// Retries `f` while it fails with a transient error (a server starting
/// up, electing itself leader), for at most `limit`.
async fn retrying<T, F, Fut>(limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BackendError>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if e.is_transient() && start.elapsed() < limit => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("still failing after {:?}: {e}", start.elapsed()),
        }
    }
}

/// Asks for the lease of `service` until it is granted, waiting on `lock`'s
/// wake-ups in between, for at most `limit`.
async fn acquire_when_free(lock: &dyn Lock, service: &str, n: usize, limit: Duration) -> Lease {
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < limit,
            "{service}: still held after {limit:?}"
        );
        match lock
            .try_acquire(service, &testing::holder(n), Duration::from_secs(30))
            .await
        {
            Ok(Acquire::Granted(lease)) => return lease,
            Ok(Acquire::Held(seen)) => {
                let left = (seen.expires_at_ms - seen.now_ms).max(0) as u64;
                let nap = Duration::from_millis(left + 100).min(limit);
                lock.wait(service, &seen, nap).await.unwrap();
            }
            Ok(Acquire::StoreMoved) => panic!("{service}: etcd keeps no store beside its lease"),
            Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("{service}: {e}"),
        }
    }
}

/// Every key under `prefix` (`PREFIX/...`).
async fn keys_under(client: &Client, prefix: &str) -> Vec<String> {
    let found = client
        .kv_client()
        .get(
            format!("{prefix}/"),
            Some(etcd_client_get_prefix().with_keys_only()),
        )
        .await
        .unwrap();
    found
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

fn etcd_client_get_prefix() -> upsilon_backends::etcd::etcd_client::GetOptions {
    upsilon_backends::etcd::etcd_client::GetOptions::new().with_prefix()
}

#[tokio::test]
async fn a_ttl_below_two_seconds_is_refused_naming_the_setting_and_longer_ones_round_up() {
    let b = backend("/ttl").await;
    let err = b
        .try_acquire("svc", &testing::holder(1), Duration::from_millis(1500))
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("a lease TTL of 1.5s is below etcd's smallest lease TTL of 2 s"),
        "{text}"
    );
    assert!(text.contains("`Builder::ttl`"), "{text}");
    let raw = raw(&server().endpoint()).await;
    assert_eq!(
        keys_under(&raw, "/ttl/s").await,
        Vec::<String>::new(),
        "a refused TTL writes nothing"
    );

    // 2.2 s is an etcd lease of 3 s: it outlives the runner's deadline.
    let lease = granted(
        b.try_acquire("svc", &testing::holder(1), Duration::from_millis(2200))
            .await
            .unwrap(),
    );
    let kv = raw
        .kv_client()
        .get("/ttl/s/svc/lock", None)
        .await
        .unwrap()
        .kvs()[0]
        .clone();
    let ttl = raw
        .lease_client()
        .time_to_live(kv.lease(), None)
        .await
        .unwrap();
    assert_eq!(ttl.granted_ttl(), 3, "2.2 s rounds up to 3 s");
    b.release(&lease).await.unwrap();

    // The runner says the same when it is built with a TTL etcd cannot keep.
    let task = Task::new("1.0", 1, "t", |_: &mut TaskContext| -> TaskFuture<'_> {
        Box::pin(async { Ok(()) })
    })
    .unwrap();
    let err = Upsilon::builder()
        .service("svc")
        .app_version("1.0")
        .backend(Arc::new(b))
        .ttl(Duration::from_secs(1))
        .tasks([task])
        .build()
        .unwrap()
        .run()
        .await
        .unwrap_err();
    let chain = chain(&err);
    assert!(
        chain.contains("below etcd's smallest lease TTL of 2 s"),
        "{chain}"
    );
}

#[tokio::test]
async fn deleting_the_lock_key_by_hand_resolves_until_lost_at_once() {
    let b = backend("/byhand").await;
    let raw = raw(&server().endpoint()).await;
    for how in ["delete the key", "revoke its etcd lease"] {
        let lease = granted(
            b.try_acquire("svc", &testing::holder(1), Duration::from_secs(30))
                .await
                .unwrap(),
        );
        let mut lost = Box::pin(b.until_lost(&lease));
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut lost)
                .await
                .is_err(),
            "{how}: until_lost resolved while the lease was held"
        );
        let started = Instant::now();
        match how {
            "delete the key" => {
                raw.kv_client()
                    .delete("/byhand/s/svc/lock", None)
                    .await
                    .unwrap();
            }
            _ => {
                let kv = raw
                    .kv_client()
                    .get("/byhand/s/svc/lock", None)
                    .await
                    .unwrap()
                    .kvs()[0]
                    .clone();
                raw.lease_client().revoke(kv.lease()).await.unwrap();
            }
        }
        let err = within(Duration::from_secs(2), how, lost).await;
        let took = started.elapsed();
        eprintln!("{how}: until_lost resolved {took:?} after");
        assert!(matches!(err, BackendError::LeaseLost(_)), "{how}: {err}");
        assert!(err.to_string().contains("deleted"), "{how}: {err}");
        assert!(
            matches!(b.renew(&lease).await, Err(BackendError::LeaseLost(_))),
            "{how}: the old holder renewed"
        );
        assert!(
            matches!(b.release(&lease).await, Err(BackendError::LeaseLost(_))),
            "{how}: the old holder released"
        );
        let next = granted(
            b.try_acquire("svc", &testing::holder(2), Duration::from_secs(30))
                .await
                .unwrap(),
        );
        assert!(next.fence > lease.fence);
        b.release(&next).await.unwrap();
    }
}

#[tokio::test]
async fn a_dead_holder_is_taken_over_once_its_etcd_lease_expires_and_not_before() {
    let ttl = Duration::from_secs(2);
    let holder = backend("/failover").await;
    let waiter = backend("/failover").await;
    let sent = Instant::now();
    let lease = granted(
        holder
            .try_acquire("svc", &testing::holder(1), ttl)
            .await
            .unwrap(),
    );
    // The holder dies: its client, streams and watch go, its lease stays.
    drop(holder);
    let taken = acquire_when_free(&waiter, "svc", 2, Duration::from_secs(10)).await;
    let after = sent.elapsed();
    eprintln!(
        "a dead holder with a {ttl:?} TTL was taken over {after:?} after its grant was asked for"
    );
    assert!(
        after >= ttl,
        "taken over {after:?} after the grant was asked for, before the TTL {ttl:?} ran out"
    );
    assert!(after < ttl + Duration::from_secs(3), "{after:?}");
    assert!(taken.fence > lease.fence);
    waiter.release(&taken).await.unwrap();
}

#[tokio::test]
async fn the_offset_lifts_grants_above_a_store_that_has_seen_higher_fences() {
    // A store used with another lock has seen fence 1_000_000.
    let b = backend("/offset").await;
    b.claim("svc", 1_000_000).await.unwrap();
    let first = granted(
        b.try_acquire("svc", &testing::holder(1), Duration::from_secs(30))
            .await
            .unwrap(),
    );
    assert!(first.fence > 1_000_000, "{first:?}");
    b.claim("svc", first.fence).await.unwrap();
    b.apply("svc", first.fence, &[start_attempt("t", "1.0", 1)])
        .await
        .unwrap();
    b.release(&first).await.unwrap();
    let second = granted(
        b.try_acquire("svc", &testing::holder(2), Duration::from_secs(30))
            .await
            .unwrap(),
    );
    assert!(second.fence > first.fence, "{second:?} after {first:?}");
    b.release(&second).await.unwrap();

    // The fence key deleted by hand takes the offset and the store's fence
    // with it; the history still carries the newest fence.
    let raw = raw(&server().endpoint()).await;
    let deleted = raw
        .kv_client()
        .delete("/offset/s/svc/fence", None)
        .await
        .unwrap();
    assert_eq!(deleted.deleted(), 1);
    let third = granted(
        b.try_acquire("svc", &testing::holder(3), Duration::from_secs(30))
            .await
            .unwrap(),
    );
    assert!(third.fence > first.fence, "{third:?} after {first:?}");
    b.release(&third).await.unwrap();
}

#[tokio::test]
async fn several_endpoints_where_one_is_dead_still_connect() {
    let live = server().endpoint();
    let dead = format!("127.0.0.1:{}", upsilon_test_servers::free_port());
    for endpoints in [[dead.clone(), live.clone()], [live.clone(), dead.clone()]] {
        let started = Instant::now();
        let b = EtcdBackend::connect(
            EtcdOptions::new()
                .endpoints(endpoints.clone())
                .prefix("/multi")
                .connect_timeout(Duration::from_secs(1)),
        )
        .await
        .unwrap_or_else(|e| panic!("{endpoints:?}: {e}"));
        for n in 0..3 {
            let lease = granted(
                b.try_acquire("svc", &testing::holder(n), Duration::from_secs(30))
                    .await
                    .unwrap_or_else(|e| panic!("{endpoints:?}: {e}")),
            );
            b.claim("svc", lease.fence).await.unwrap();
            b.release(&lease).await.unwrap();
        }
        eprintln!(
            "{endpoints:?}: connected and made 3 grants in {:?}",
            started.elapsed()
        );
    }
    let url = format!("etcd://{dead},{live}/multi");
    let b = upsilon_backends::connect(&url).await.unwrap();
    assert!(b.load("other").await.unwrap().is_empty());

    // Every endpoint dead: a transient error that names them, soon.
    let dead2 = format!("127.0.0.1:{}", upsilon_test_servers::free_port());
    let started = Instant::now();
    let err = EtcdBackend::connect(
        EtcdOptions::new()
            .endpoints([dead.clone(), dead2.clone()])
            .connect_timeout(Duration::from_millis(500))
            .op_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(err.is_transient(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!(
            "cannot connect to etcd at etcd://{dead},{dead2}/upsilon"
        )),
        "{text}"
    );
}

#[tokio::test]
async fn a_newer_format_and_corrupt_keys_are_refused_and_nothing_is_written() {
    let raw = raw(&server().endpoint()).await;
    raw.kv_client()
        .put("/newer/format", "99", None)
        .await
        .unwrap();
    let err = EtcdBackend::connect(options("/newer")).await.unwrap_err();
    assert!(
        matches!(err, BackendError::UnsupportedFormat { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("format 99"), "{err}");
    assert_eq!(keys_under(&raw, "/newer").await, ["/newer/format"]);

    let b = backend("/corrupt").await;
    let mut kv = raw.kv_client();
    kv.put("/corrupt/s/svc/lock", "not json", None)
        .await
        .unwrap();
    let err = b
        .try_acquire("svc", &testing::holder(1), Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("/corrupt/s/svc/lock"), "{err}");
    kv.delete("/corrupt/s/svc/lock", None).await.unwrap();
    kv.put("/corrupt/s/svc/fence", r#"{"offset":"x"}"#, None)
        .await
        .unwrap();
    for err in [
        b.try_acquire("svc", &testing::holder(1), Duration::from_secs(30))
            .await
            .map(|_| ())
            .unwrap_err(),
        b.claim("svc", 1).await.map(|_| ()).unwrap_err(),
        b.load("svc").await.map(|_| ()).unwrap_err(),
    ] {
        assert!(matches!(err, BackendError::Corrupt { .. }), "{err}");
    }
    assert_eq!(
        keys_under(&raw, "/corrupt/s").await,
        ["/corrupt/s/svc/fence"],
        "nothing was granted or claimed"
    );
}

/// Task code that counts its runs, by node.
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
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(())
            })
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_clients_of_their_own_run_each_task_once() {
    let runs = Arc::new(Mutex::new(Vec::new()));
    let tasks = vec![
        counting(&runs, "1.0", 1, "create"),
        counting(&runs, "1.1", 1, "backfill"),
        counting(&runs, "1.1", 2, "check"),
    ];
    let mut nodes = Vec::new();
    for n in 0..6 {
        nodes.push(
            Upsilon::builder()
                .service("svc")
                .app_version("1.1")
                .backend(Arc::new(backend("/nodes").await))
                .holder(testing::holder(n))
                .ttl(Duration::from_secs(3))
                .tasks(tasks.clone())
                .build()
                .unwrap(),
        );
    }
    let started = Instant::now();
    let results = testing::run_nodes(nodes).await;
    eprintln!(
        "6 nodes, 3 tasks of 200 ms: all READY after {:?}",
        started.elapsed()
    );
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let upgraded = results
        .iter()
        .filter(|r| matches!(r, Ok(Outcome::Upgraded { .. })))
        .count();
    assert_eq!(upgraded, 1, "{results:?}");
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 3, "{runs:?}");
    let node = runs[0].split(':').next().unwrap();
    assert!(
        runs.iter().all(|r| r.starts_with(&format!("{node}:"))),
        "{runs:?}"
    );
    let b = backend("/nodes").await;
    let snap = b.load("svc").await.unwrap();
    assert_eq!(snap.data_version, Some(version("1.1")));
    assert_eq!(b.history("svc").await.unwrap().len(), 3);
    assert_eq!(b.services().await.unwrap(), ["svc"]);
}

#[tokio::test]
async fn killing_etcd_resolves_until_lost_and_a_restart_keeps_fence_data_version_and_history() {
    let mut etcd = tokio::task::spawn_blocking(|| Etcd::builder().fsync(true).start())
        .await
        .unwrap();
    let opts = EtcdOptions::new()
        .endpoint(etcd.endpoint())
        .prefix("/crash")
        .op_timeout(Duration::from_secs(3));
    let b = EtcdBackend::connect(opts.clone()).await.unwrap();
    let ttl = Duration::from_secs(4);
    let lease = granted(
        b.try_acquire("svc", &testing::holder(1), ttl)
            .await
            .unwrap(),
    );
    b.claim("svc", lease.fence).await.unwrap();
    b.apply(
        "svc",
        lease.fence,
        &[
            start_attempt("t", "1.1", 1),
            finish("t", "1.1"),
            Change::DataVersion(version("1.1")),
        ],
    )
    .await
    .unwrap();
    let before = b.load("svc").await.unwrap();
    let history = b.history("svc").await.unwrap();
    let lost = b.until_lost(&lease);

    let killed = Instant::now();
    etcd.crash();
    let err = within(Duration::from_secs(2), "until_lost after SIGKILL", lost).await;
    eprintln!(
        "until_lost resolved {:?} after SIGKILL: {err}",
        killed.elapsed()
    );
    assert!(matches!(err, BackendError::LeaseLost(_)), "{err}");
    let renewed = b.renew(&lease).await;
    assert!(
        matches!(&renewed, Err(e) if e.is_transient()),
        "a renewal with the server down: {renewed:?}"
    );

    let mut etcd = tokio::task::spawn_blocking(move || {
        etcd.start_again();
        etcd
    })
    .await
    .unwrap();
    // etcd restores its leases with their whole TTL: the lease is still held.
    let held = retrying(Duration::from_secs(10), || b.current("svc")).await;
    assert_eq!(
        held.map(|h| (h.holder, h.fence)),
        Some((testing::holder(1), lease.fence)),
        "the lease is held after the restart until its TTL runs out"
    );
    let after = retrying(Duration::from_secs(10), || b.load("svc")).await;
    assert_eq!(after, before, "fence, data version and tasks survive");
    assert_eq!(after.fence, lease.fence);
    assert_eq!(after.data_version, Some(version("1.1")));
    assert_eq!(b.history("svc").await.unwrap(), history);

    // A fresh node after the restart: the old lease runs out, the next
    // grant's fence is above it.
    let other = EtcdBackend::connect(opts).await.unwrap();
    let next = acquire_when_free(&other, "svc", 2, Duration::from_secs(15)).await;
    assert!(next.fence > lease.fence, "{next:?} after {lease:?}");
    assert!(matches!(
        b.renew(&lease).await,
        Err(BackendError::LeaseLost(_))
    ));
    other.claim("svc", next.fence).await.unwrap();
    assert!(matches!(
        b.apply("svc", lease.fence, &[Change::DataVersion(version("1.2"))])
            .await,
        Err(BackendError::StaleFence { .. })
    ));
    other.release(&next).await.unwrap();
    etcd.crash();
}

#[tokio::test]
async fn user_password_auth_works_and_a_wrong_password_is_told_without_the_password() {
    let (etcd, root) = tokio::task::spawn_blocking(|| {
        let mut etcd = Etcd::start();
        let root = etcd.enable_auth();
        etcd.add_user("app", "app-pw", "/auth/");
        (etcd, root)
    })
    .await
    .unwrap();
    let at = |user: &str, password: &str, prefix: &str| {
        format!("etcd://{user}:{password}@{}{prefix}", etcd.endpoint())
    };

    let good = EtcdBackend::connect_url(&at("app", "app-pw", "/auth"))
        .await
        .unwrap();
    assert!(!format!("{good:?}").contains("app-pw"));
    let runs = Arc::new(Mutex::new(Vec::new()));
    let outcome = Upsilon::builder()
        .service("svc")
        .app_version("1.0")
        .backend(Arc::new(good))
        .tasks([counting(&runs, "1.0", 1, "t")])
        .build()
        .unwrap()
        .run()
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Upgraded { .. }), "{outcome}");
    assert_eq!(runs.lock().unwrap().len(), 1);

    let err = EtcdBackend::connect_url(&at("app", "not-the-password", "/auth"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        !err.is_transient(),
        "retrying a wrong password is pointless: {text}"
    );
    assert!(text.contains("authentication failed"), "{text}");
    assert!(text.contains("check the user name and password"), "{text}");
    assert!(
        text.contains(&format!("etcd://{}/auth as user `app`", etcd.endpoint())),
        "{text}"
    );
    assert!(!text.contains("not-the-password"), "{text}");
    assert!(!format!("{err:?}").contains("not-the-password"));
    let err = upsilon_backends::connect(&at("app", "not-the-password", "/auth"))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("authentication failed"), "{err}");
    assert!(!err.contains("not-the-password"), "{err}");

    // No credentials, and a prefix the user may not touch.
    let err = EtcdBackend::connect_url(&format!("etcd://{}/auth", etcd.endpoint()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("give a user and password"), "{err}");
    let err = EtcdBackend::connect_url(&at("app", "app-pw", "/elsewhere"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("permission denied"), "{err}");
    assert!(
        err.contains("read and write every key under its prefix"),
        "{err}"
    );
    assert!(!err.contains("app-pw"), "{err}");
    assert!(!root.is_empty());

    // Credentials for a cluster without authentication.
    let err = EtcdBackend::connect(options("/noauth").user("app").password("app-pw"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("give no user and password"), "{err}");
    assert!(!err.contains("app-pw"), "{err}");
}

#[tokio::test]
async fn tls_verifies_the_server_against_the_given_ca() {
    let etcd = tokio::task::spawn_blocking(|| Etcd::builder().tls(true).start())
        .await
        .unwrap();
    let ca = etcd.ca_file();
    let by_url = EtcdBackend::connect_url(&format!(
        "etcds://localhost:{}/tls?cacert={}",
        etcd.port(),
        ca.display()
    ))
    .await
    .unwrap();
    let lease = granted(
        by_url
            .try_acquire("svc", &testing::holder(1), Duration::from_secs(5))
            .await
            .unwrap(),
    );
    by_url.release(&lease).await.unwrap();
    let by_parts = EtcdBackend::connect(
        EtcdOptions::new()
            .endpoint(etcd.endpoint())
            .prefix("/tls")
            .tls(Some(&ca)),
    )
    .await
    .unwrap();
    assert!(by_parts.load("svc").await.unwrap().is_empty());

    // Without the CA the server is not trusted: a clear, permanent error.
    let err = EtcdBackend::connect_url(&format!("etcds://localhost:{}/tls", etcd.port()))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(!err.is_transient(), "{text}");
    assert!(text.contains("certificate"), "{text}");
    assert!(text.contains("cacert"), "{text}");
    // Plain TCP to a TLS server.
    let err = EtcdBackend::connect(
        EtcdOptions::new()
            .endpoint(etcd.endpoint())
            .op_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("use `etcds://`"), "{err}");
}

/// The lease moves to etcd in front of a store that another lock has taken
/// to fence 1 000 000: the first grant is behind the store, the runner raises
/// the lock's fence (`raise_fence`) and asks again, and runs the upgrade with
/// a fence above the store's.
#[tokio::test]
async fn a_new_etcd_lock_in_front_of_a_used_store_catches_up_with_its_fence() {
    let store = upsilon::testing::MemoryBackend::new();
    store.claim("svc", 1_000_000).await.unwrap();
    let lock = Arc::new(backend("/mixed").await);
    let runs = Arc::new(Mutex::new(Vec::new()));
    let outcome = Upsilon::builder()
        .service("svc")
        .app_version("1.0")
        .lock(lock.clone())
        .store(store.clone())
        .ttl(Duration::from_secs(3))
        .tasks([counting(&runs, "1.0", 1, "create")])
        .build()
        .unwrap()
        .run()
        .await
        .unwrap();
    let Outcome::Upgraded { report } = outcome else {
        panic!("expected an upgrade, got {outcome:?}");
    };
    assert!(
        report.fence > 1_000_000,
        "upgraded with fence {}",
        report.fence
    );
    assert_eq!(runs.lock().unwrap().len(), 1);
    let next = granted(
        lock.try_acquire("svc", &testing::holder(9), Duration::from_secs(30))
            .await
            .unwrap(),
    );
    assert!(next.fence > report.fence, "{next:?} after {}", report.fence);
    lock.release(&next).await.unwrap();
}
