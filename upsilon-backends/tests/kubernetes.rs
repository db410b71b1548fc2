//! The Kubernetes backend against the in-process stand-in for the API server
//! (`upsilon_test_servers::kube_api`): conformance, the faults a control
//! plane has (500s, dropped watches, a conflict storm), expiry measured on
//! the observer's clock, history for thousands of attempts; and the
//! conformance suite against a real cluster when `KUBECONFIG` names one.
#![cfg(feature = "kubernetes")]

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::Lease as K8sLease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use upsilon::backend::{Acquire, AttemptState, BackendError, Change, Lock, Store};
use upsilon::testing::conformance::{self, Harness, Notices, Wake};
use upsilon::testing::{self};
use upsilon::{Outcome, Task, TaskContext, TaskFuture, Upsilon};
use upsilon_backends::kubernetes::{k8s_openapi, kube, KubernetesBackend, KubernetesOptions};
use upsilon_test_servers::kube_api::{KubeApi, TOKEN};

/// A client configuration for the stand-in, as a kubeconfig would give.
fn config(api: &KubeApi, namespace: &str) -> kube::Config {
    let mut c = kube::Config::new(api.url().parse().unwrap());
    c.default_namespace = namespace.to_owned();
    c.auth_info.token = Some(TOKEN.to_owned().into());
    c
}

async fn backend_on(api: &KubeApi, namespace: &str, prefix: &str) -> KubernetesBackend {
    KubernetesBackend::connect(
        KubernetesOptions::new()
            .config(config(api, namespace))
            .prefix(prefix),
    )
    .await
    .unwrap()
}

/// The harness: a backend and a peer (another node, its own client and
/// watches) on one namespace and prefix, and a plain client for the edits an
/// operator makes by hand.
struct K8s {
    backend: Arc<KubernetesBackend>,
    peer: Arc<KubernetesBackend>,
    configmaps: Api<ConfigMap>,
    leases: Api<K8sLease>,
    prefix: String,
    saved: Mutex<Option<Option<String>>>,
}

impl K8s {
    async fn new(
        client: kube::Client,
        options: KubernetesOptions,
        namespace: &str,
        prefix: &str,
    ) -> K8s {
        let options = options.prefix(prefix);
        K8s {
            backend: Arc::new(KubernetesBackend::connect(options.clone()).await.unwrap()),
            peer: Arc::new(KubernetesBackend::connect(options).await.unwrap()),
            configmaps: Api::namespaced(client.clone(), namespace),
            leases: Api::namespaced(client, namespace),
            prefix: prefix.to_owned(),
            saved: Mutex::new(None),
        }
    }

    async fn on_stand_in(api: &KubeApi, namespace: &str) -> K8s {
        let client = kube::Client::try_from(config(api, namespace)).unwrap();
        K8s::new(
            client,
            KubernetesOptions::new().config(config(api, namespace)),
            namespace,
            "upsilon",
        )
        .await
    }

    fn selector(&self) -> String {
        format!("upsilon.dev/prefix={}", self.prefix)
    }

    async fn state(&self, service: &str) -> ConfigMap {
        self.configmaps
            .get(&self.backend.object_name(service))
            .await
            .unwrap()
    }

    async fn put_state(&self, cm: &ConfigMap) {
        let name = cm.metadata.name.clone().unwrap();
        self.configmaps
            .replace(&name, &PostParams::default(), cm)
            .await
            .unwrap();
    }

    /// Sets the format annotation of every object of the prefix.
    async fn mark_format(&self, format: &str) {
        let lp = ListParams::default().labels(&self.selector());
        for mut cm in self.configmaps.list(&lp).await.unwrap().items {
            cm.metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert("upsilon.dev/format".into(), format.into());
            self.put_state(&cm).await;
        }
        for mut l in self.leases.list(&lp).await.unwrap().items {
            l.metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert("upsilon.dev/format".into(), format.into());
            let name = l.metadata.name.clone().unwrap();
            self.leases
                .replace(&name, &PostParams::default(), &l)
                .await
                .unwrap();
        }
    }
}

#[async_trait]
impl Harness for K8s {
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
    /// The Lease keeps the TTL in ms (`upsilon.dev/ttl-ms`), so any TTL the
    /// runner accepts is honoured; the suite's shortest keeps it quick.
    fn min_ttl(&self) -> Duration {
        Duration::from_millis(300)
    }
    async fn corrupt(&self, service: &str) {
        let mut cm = self.state(service).await;
        let data = cm.data.get_or_insert_with(BTreeMap::new);
        *self.saved.lock().unwrap() = Some(data.get("dataVersion").cloned());
        data.insert("dataVersion".into(), "one point oh".into());
        self.put_state(&cm).await;
    }
    async fn repair(&self, service: &str) {
        let old = self.saved.lock().unwrap().take().expect("corrupted first");
        let mut cm = self.state(service).await;
        let data = cm.data.get_or_insert_with(BTreeMap::new);
        match old {
            Some(v) => data.insert("dataVersion".into(), v),
            None => data.remove("dataVersion"),
        };
        self.put_state(&cm).await;
    }
    async fn future_format(&self) -> bool {
        self.mark_format("99").await;
        true
    }
    async fn reset_format(&self) {
        self.mark_format(&upsilon_backends::kubernetes::FORMAT.to_string())
            .await;
    }
    /// `kubectl delete lease,configmap PREFIX-KEY`: the lease with its grant
    /// counter, and the state (data version, baseline, the store's fence,
    /// the task summaries).
    async fn delete_state_row(&self, service: &str) -> bool {
        let name = self.backend.object_name(service);
        let dp = DeleteParams::default();
        self.configmaps.delete(&name, &dp).await.unwrap();
        self.leases.delete(&name, &dp).await.unwrap();
        true
    }
    /// `kubectl delete configmap -l upsilon.dev/part=history,...` and the
    /// history kept in the state ConfigMap (`tasks`, `pending`).
    async fn delete_history(&self, service: &str) -> bool {
        let lp =
            ListParams::default().labels(&format!("{},upsilon.dev/part=history", self.selector()));
        let mut deleted = 0;
        for cm in self.configmaps.list(&lp).await.unwrap().items {
            let of = cm
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("upsilon.dev/service"))
                .cloned();
            if of.as_deref() == Some(service) {
                let name = cm.metadata.name.unwrap();
                self.configmaps
                    .delete(&name, &DeleteParams::default())
                    .await
                    .unwrap();
                deleted += 1;
            }
        }
        assert!(deleted > 0, "the history pages of {service}");
        let mut cm = self.state(service).await;
        let data = cm.data.get_or_insert_with(BTreeMap::new);
        data.remove("tasks");
        data.remove("pending");
        self.put_state(&cm).await;
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_backend_conforms() {
    let api = KubeApi::start().await;
    let h = K8s::on_stand_in(&api, "conformance").await;
    let report = conformance::run_all(&h).await;
    assert_eq!(report.wake, Wake::Notifies, "the watches wake waiters");
    assert_eq!(report.notices, Notices::Unsupported);
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);
}

/// The conformance suite against the cluster `KUBECONFIG` names, in its
/// context's namespace (or `UPSILON_TEST_NAMESPACE`), under a prefix of its
/// own that it deletes afterwards. Compiled in when `KUBECONFIG` is set at
/// build time (see build.rs); ignored, never passed, without it.
#[cfg_attr(
    not(upsilon_real_cluster),
    ignore = "needs a real cluster: set KUBECONFIG"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_backend_conforms_on_a_real_cluster() {
    let path = std::env::var("KUBECONFIG").expect("KUBECONFIG names the cluster's kubeconfig");
    let config = kube::Config::infer()
        .await
        .unwrap_or_else(|e| panic!("no client configuration from KUBECONFIG={path}: {e}"));
    let namespace = std::env::var("UPSILON_TEST_NAMESPACE")
        .unwrap_or_else(|_| config.default_namespace.clone());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let prefix = format!("upsilon-t{:08x}", nanos ^ std::process::id());
    let client = kube::Client::try_from(config.clone()).unwrap();
    let h = K8s::new(
        client,
        KubernetesOptions::new()
            .config(config)
            .namespace(&namespace),
        &namespace,
        &prefix,
    )
    .await;
    let report = conformance::run_all(&h).await;
    let lp = ListParams::default().labels(&h.selector());
    for cm in h.configmaps.list(&lp).await.unwrap().items {
        let _ = h
            .configmaps
            .delete(&cm.metadata.name.unwrap(), &DeleteParams::default())
            .await;
    }
    for l in h.leases.list(&lp).await.unwrap().items {
        let _ = h
            .leases
            .delete(&l.metadata.name.unwrap(), &DeleteParams::default())
            .await;
    }
    assert_eq!(report.wake, Wake::Notifies);
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);
}

// ---------------------------------------------------------------------------
// Nodes running the runner.

/// Task runs, with their node, fence and start and end times.
type Runs = Arc<Mutex<Vec<(String, String, u64, Instant, Option<Instant>)>>>;

fn task(runs: &Runs, version: &str, order: u32, id: &str, ms: u64) -> Task {
    let runs = runs.clone();
    Task::new(
        version,
        order,
        id,
        move |ctx: &mut TaskContext| -> TaskFuture<'_> {
            let runs = runs.clone();
            let entry = (
                ctx.holder().host.clone(),
                ctx.task().id.clone(),
                ctx.fence(),
                Instant::now(),
                None,
            );
            let n = {
                let mut r = runs.lock().unwrap();
                r.push(entry);
                r.len() - 1
            };
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                runs.lock().unwrap()[n].4 = Some(Instant::now());
                Ok(())
            })
        },
    )
    .unwrap()
}

fn node(backend: KubernetesBackend, n: usize, tasks: &[Task], poll: Duration) -> Upsilon {
    Upsilon::builder()
        .service("svc")
        .app_version("1.1")
        .backend(Arc::new(backend))
        .holder(testing::holder(n))
        .ttl(Duration::from_secs(3))
        .poll_interval(poll)
        .backend_attempts(12)
        .tasks(tasks.to_vec())
        .build()
        .unwrap()
}

/// One upgrade, each task run once, no two runs at once, one node
/// `Upgraded` and every other `WaitedForOther`.
fn check_once(results: &[Result<Outcome, upsilon::Error>], runs: &Runs, tasks: usize) {
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let upgraded = results
        .iter()
        .filter(|r| matches!(r, Ok(Outcome::Upgraded { .. })))
        .count();
    assert_eq!(upgraded, 1, "{results:?}");
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), tasks, "{runs:?}");
    let mut spans: Vec<(Instant, Instant)> = runs.iter().map(|r| (r.3, r.4.unwrap())).collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "two runs at once: {runs:?}");
    }
}

fn tasks(runs: &Runs, ms: u64) -> Vec<Task> {
    vec![
        task(runs, "1.0", 1, "create", ms),
        task(runs, "1.1", 1, "backfill", ms),
        task(runs, "1.1", 2, "check", ms),
    ]
}

/// Five nodes at once: one upgrades, and the others, whose poll is far
/// longer than the test, are woken by the watch when the data version moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_nodes_are_woken_by_the_watch_not_their_poll() {
    let api = KubeApi::start().await;
    let runs = Runs::default();
    let tasks = tasks(&runs, 200);
    let mut nodes = Vec::new();
    for n in 0..5 {
        nodes.push(node(
            backend_on(&api, "wake", "upsilon").await,
            n,
            &tasks,
            Duration::from_secs(60),
        ));
    }
    let started = Instant::now();
    let results = testing::run_nodes(nodes).await;
    let took = started.elapsed();
    check_once(&results, &runs, 3);
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

/// 500s on a twentieth of the requests, and a twentieth of the writes
/// committed with their reply lost: every such failure is transient, the
/// runner retries, and the upgrade still runs each task once. (A grant is
/// five requests, so about one try in three fails: the nodes get twelve.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_errors_are_retried_and_the_upgrade_runs_each_task_once() {
    let api = KubeApi::start().await;
    // No watches: the next request is the load's own.
    let b = KubernetesBackend::connect(
        KubernetesOptions::new()
            .config(config(&api, "errors"))
            .watch(false),
    )
    .await
    .unwrap();
    api.faults().fail_next.store(1, Ordering::SeqCst);
    let err = b.load("svc").await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("500 InternalError"), "{err}");
    b.load("svc").await.unwrap();

    let runs = Runs::default();
    let tasks = tasks(&runs, 50);
    let mut nodes = Vec::new();
    // Connected before the faults: a failed connect is not what this tests.
    for n in 0..3 {
        nodes.push(node(
            backend_on(&api, "errors", "upsilon").await,
            n,
            &tasks,
            Duration::from_millis(100),
        ));
    }
    api.faults().fail_per_mille.store(50, Ordering::SeqCst);
    api.faults()
        .lose_reply_per_mille
        .store(50, Ordering::SeqCst);
    let results = testing::run_nodes(nodes).await;
    api.heal();
    check_once(&results, &runs, 3);
    let snap = b.load("svc").await.unwrap();
    assert_eq!(
        snap.data_version,
        Some(upsilon::parse_version("1.1").unwrap())
    );
    let history = b.history("svc").await.unwrap();
    assert_eq!(history.len(), 3, "{history:?}");
    assert!(history.iter().all(|h| h.state == AttemptState::Completed));
}

/// With every watch dropped and new ones refused, the backend says it does
/// not notify, waiting nodes poll, and an upgrade that ends meanwhile is
/// seen by polling; once watches are served again it notifies again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_watch_falls_back_to_polling() {
    let api = KubeApi::start().await;
    let holder = backend_on(&api, "dropped", "upsilon").await;
    let waiter = backend_on(&api, "dropped", "upsilon").await;
    until(Duration::from_secs(5), || waiter.notifies()).await;

    let lease = match holder
        .try_acquire("svc", &testing::holder(9), Duration::from_secs(30))
        .await
        .unwrap()
    {
        Acquire::Granted(l) => l,
        other => panic!("{other:?}"),
    };
    holder.claim("svc", lease.fence).await.unwrap();

    api.faults().refuse_watches.store(true, Ordering::SeqCst);
    api.drop_watches();
    until(Duration::from_secs(5), || !waiter.notifies()).await;

    // The waiting node: its data is behind, the lease is held.
    let runs = Runs::default();
    let tasks = tasks(&runs, 10);
    let node = node(waiter.clone(), 1, &tasks, Duration::from_millis(100));
    let mut status = node.status();
    let waiting = tokio::spawn(async move { node.run().await });
    // Once it waits, the holder does the work and lets go, while no watch
    // runs.
    status
        .wait_for(|s| matches!(s, upsilon::Status::Waiting { .. }))
        .await
        .unwrap();
    holder
        .apply(
            "svc",
            lease.fence,
            &[
                testing::start_attempt("create", "1.0", 1),
                finish("create", "1.0"),
                testing::start_attempt("backfill", "1.1", 1),
                finish("backfill", "1.1"),
                testing::start_attempt("check", "1.1", 1),
                finish("check", "1.1"),
                Change::DataVersion(upsilon::parse_version("1.1").unwrap()),
            ],
        )
        .await
        .unwrap();
    let done_at = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting node polled its way to READY")
        .unwrap()
        .unwrap();
    assert!(
        matches!(outcome, Outcome::WaitedForOther { .. }),
        "{outcome}"
    );
    assert!(
        done_at.elapsed() < Duration::from_secs(2),
        "{:?}",
        done_at.elapsed()
    );
    assert!(runs.lock().unwrap().is_empty());
    assert!(!waiter.notifies(), "the watch is still refused");

    api.faults().refuse_watches.store(false, Ordering::SeqCst);
    until(Duration::from_secs(10), || waiter.notifies()).await;
    holder.release(&lease).await.unwrap();
}

fn finish(id: &str, version: &str) -> Change {
    Change::Finish(upsilon::backend::FinishAttempt {
        key: upsilon::TaskKey {
            version: upsilon::parse_version(version).unwrap(),
            id: id.to_owned(),
        },
        attempt: 1,
        state: AttemptState::Completed,
        error: None,
        duration: Duration::from_millis(5),
    })
}

async fn until(limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "still not so after {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Half of all updates meet another writer first (a real 409): five nodes
/// racing for the lease round after round never hold it together, every
/// fence is granted once, and a full upgrade still runs each task once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_storm_never_grants_the_lease_twice() {
    let api = KubeApi::start().await;
    api.faults().conflict_per_mille.store(500, Ordering::SeqCst);
    let mut nodes = Vec::new();
    for _ in 0..5 {
        nodes.push(Arc::new(backend_on(&api, "storm", "upsilon").await));
    }
    let ttl = Duration::from_secs(60);
    let mut fences = Vec::new();
    let mut unavailable = 0;
    for round in 0..20 {
        let tries = nodes.iter().enumerate().map(|(n, b)| {
            let b = b.clone();
            tokio::spawn(async move { b.try_acquire("race", &testing::holder(n), ttl).await })
        });
        let mut granted = Vec::new();
        for t in tries {
            match t.await.unwrap() {
                Ok(Acquire::Granted(l)) => granted.push(l),
                Ok(Acquire::Held(_)) => {}
                Ok(Acquire::StoreMoved) => panic!("round {round}: a Lease keeps no store"),
                Err(e) if e.is_transient() => unavailable += 1,
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert!(
            granted.len() <= 1,
            "round {round}: granted twice: {granted:?}"
        );
        if let Some(l) = granted.pop() {
            fences.push(l.fence);
            let owner = &nodes[testing_index(&l.holder)];
            let mut released = false;
            for _ in 0..20 {
                match owner.release(&l).await {
                    Ok(()) => {
                        released = true;
                        break;
                    }
                    Err(e) if e.is_transient() => {}
                    Err(e) => panic!("{e}"),
                }
            }
            assert!(released);
        }
    }
    assert!(!fences.is_empty());
    assert!(fences.windows(2).all(|w| w[0] < w[1]), "{fences:?}");
    eprintln!(
        "conflict storm: {} grants in 20 rounds, {unavailable} tries gave up as unavailable; requests {:?}",
        fences.len(),
        api.requests()
    );

    let runs = Runs::default();
    let tasks = tasks(&runs, 50);
    let mut upsilons = Vec::new();
    for n in 0..5 {
        upsilons.push(node(
            backend_on(&api, "storm", "upsilon").await,
            n,
            &tasks,
            Duration::from_millis(100),
        ));
    }
    let results = testing::run_nodes(upsilons).await;
    api.heal();
    check_once(&results, &runs, 3);
}

fn testing_index(h: &upsilon::Holder) -> usize {
    h.host.trim_start_matches("node-").parse().unwrap()
}

/// Expiry is the observer's own measure: a Lease whose `renewTime` is an
/// hour old (the holder's clock behind, or stopped) is still held for the
/// whole TTL from when this node first saw it, and then taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_measured_from_when_the_observer_saw_the_lease() {
    let api = KubeApi::start().await;
    let h = K8s::on_stand_in(&api, "skew").await;
    let ttl = Duration::from_millis(1500);
    let held = match h
        .backend
        .try_acquire("svc", &testing::holder(1), ttl)
        .await
        .unwrap()
    {
        Acquire::Granted(l) => l,
        other => panic!("{other:?}"),
    };
    // The holder's clock an hour behind: its renewTime and acquireTime.
    let name = h.backend.object_name("svc");
    let mut l = h.leases.get(&name).await.unwrap();
    let spec = l.spec.as_mut().unwrap();
    let hour_ago = k8s_openapi::chrono::Utc::now() - k8s_openapi::chrono::Duration::hours(1);
    spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        hour_ago,
    ));
    spec.acquire_time = spec.renew_time.clone();
    h.leases
        .replace(&name, &PostParams::default(), &l)
        .await
        .unwrap();

    let first_seen = Instant::now();
    match h
        .peer
        .try_acquire("svc", &testing::holder(2), ttl)
        .await
        .unwrap()
    {
        Acquire::Held(info) => {
            assert_eq!(info.holder, testing::holder(1));
            assert!(
                info.expires_in() > ttl - Duration::from_millis(300),
                "{info:?}"
            );
        }
        other => panic!("an hour-old renewTime was taken as expired: {other:?}"),
    }
    let taken = loop {
        match h
            .peer
            .try_acquire("svc", &testing::holder(2), ttl)
            .await
            .unwrap()
        {
            Acquire::Granted(l) => break l,
            Acquire::Held(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Acquire::StoreMoved => panic!("a Lease keeps no store"),
        }
    };
    let waited = first_seen.elapsed();
    assert!(
        waited >= ttl,
        "taken over after {waited:?}, before the TTL {ttl:?}"
    );
    assert!(
        waited < ttl + Duration::from_millis(800),
        "taken over only after {waited:?}"
    );
    assert!(taken.fence > held.fence);
    assert!(matches!(
        h.backend.renew(&held).await,
        Err(BackendError::LeaseLost(_))
    ));
    h.peer.release(&taken).await.unwrap();
}

/// A renewal restarts every observer's measure: a lease renewed every
/// third of its TTL is never taken over, however long it is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_lease_is_never_taken_over() {
    let api = KubeApi::start().await;
    let holder = backend_on(&api, "renewed", "upsilon").await;
    let other = backend_on(&api, "renewed", "upsilon").await;
    let ttl = Duration::from_millis(600);
    let mut lease = match holder
        .try_acquire("svc", &testing::holder(1), ttl)
        .await
        .unwrap()
    {
        Acquire::Granted(l) => l,
        other => panic!("{other:?}"),
    };
    let until = Instant::now() + ttl * 5;
    while Instant::now() < until {
        tokio::time::sleep(ttl / 3).await;
        lease = holder.renew(&lease).await.unwrap();
        match other
            .try_acquire("svc", &testing::holder(2), ttl)
            .await
            .unwrap()
        {
            Acquire::Held(info) => assert_eq!(info.fence, lease.fence),
            other => panic!("a renewed lease was not found held: {other:?}"),
        }
    }
    holder.release(&lease).await.unwrap();
}

/// 1,200 attempts of 400 tasks: the history comes back whole and in order,
/// from 12 pages; no object nears the 1 MiB limit; a long error is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_of_thousands_of_attempts_is_paged() {
    let api = KubeApi::start().await;
    let b = backend_on(&api, "paged", "upsilon").await;
    b.claim("svc", 1).await.unwrap();
    let started = Instant::now();
    for n in 0..400u32 {
        let id = format!("task{n:03}");
        // Three attempts in one write: two failures, then a completion.
        let mut changes = Vec::new();
        for attempt in 1..=3 {
            let state = if attempt == 3 {
                AttemptState::Completed
            } else {
                AttemptState::Failed
            };
            let error = (attempt < 3).then(|| "x".repeat(if n == 7 { 10_000 } else { 100 }));
            changes.push(testing::start_attempt(&id, "1.0", attempt));
            changes.push(Change::Finish(upsilon::backend::FinishAttempt {
                key: upsilon::TaskKey {
                    version: upsilon::parse_version("1.0").unwrap(),
                    id: id.clone(),
                },
                attempt,
                state,
                error,
                duration: Duration::from_millis(3),
            }));
        }
        b.apply("svc", 1, &changes).await.unwrap();
    }
    let wrote = started.elapsed();
    let history = b.history("svc").await.unwrap();
    assert_eq!(history.len(), 1200);
    assert!(history
        .windows(2)
        .all(|w| w[0].started_at_ms <= w[1].started_at_ms));
    assert_eq!(history[0].key.id, "task000");
    assert_eq!(history[1199].state, AttemptState::Completed);
    let cut = history
        .iter()
        .find(|h| h.key.id == "task007" && h.error.is_some())
        .unwrap();
    let error = cut.error.as_deref().unwrap();
    assert!(
        error.len() <= 4096 && error.contains("[cut: 10000 bytes in all]"),
        "{}",
        error.len()
    );
    let snap = b.load("svc").await.unwrap();
    assert_eq!(snap.tasks.len(), 400);
    assert!(snap.tasks.values().all(|t| t.rows == 3 && t.completed));

    let objects = api.objects(
        upsilon_test_servers::kube_api::Resource::ConfigMaps,
        "paged",
    );
    let pages = objects
        .iter()
        .filter(|o| o["metadata"]["labels"]["upsilon.dev/part"] == "history")
        .count();
    assert_eq!(pages, 12);
    let largest = objects.iter().map(|o| o.to_string().len()).max().unwrap();
    let state = objects
        .iter()
        .find(|o| o["metadata"]["labels"]["upsilon.dev/part"] == "state")
        .unwrap()
        .to_string()
        .len();
    eprintln!(
        "1200 attempts written in {wrote:?}; {pages} pages, the largest object {largest} bytes, the state {state} bytes; requests {:?}",
        api.requests()
    );
    assert!(largest < 512 * 1024, "{largest}");
}

/// `connect("kubernetes://NAMESPACE?kubeconfig=PATH")`, and what a bad one says.
#[tokio::test]
async fn connect_by_url() {
    let api = KubeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    api.write_kubeconfig(&path, "from-context");
    let url = format!("kubernetes://by-url?kubeconfig={}", path.display());
    let b = upsilon_backends::connect(&url).await.unwrap();
    assert!(b.load("svc").await.unwrap().is_empty());
    assert!(!api
        .objects(
            upsilon_test_servers::kube_api::Resource::ConfigMaps,
            "by-url"
        )
        .is_empty());
    // No namespace in the URL: the context's.
    let url = format!("kubernetes://?kubeconfig={}", path.display());
    let b = KubernetesBackend::connect_url(&url).await.unwrap();
    assert_eq!(b.namespace(), "from-context");

    let err = upsilon_backends::connect("kubernetes://Bad_Namespace")
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("not a Kubernetes namespace name"),
        "{err}"
    );
    let err = upsilon_backends::connect("mysql://x").await.err().unwrap();
    assert!(err.to_string().contains("`kubernetes://`"), "{err}");
    let missing = dir.path().join("missing");
    let err =
        upsilon_backends::connect(&format!("kubernetes://x?kubeconfig={}", missing.display()))
            .await
            .err()
            .unwrap();
    assert!(
        err.to_string().contains("cannot read the kubeconfig"),
        "{err}"
    );
}

/// Without RBAC for configmaps, connecting fails with the verbs it needs.
#[tokio::test]
async fn a_missing_permission_names_the_role() {
    let api = KubeApi::start().await;
    api.allow(&[("leases", "get")]);
    let err = KubernetesBackend::connect(KubernetesOptions::new().config(config(&api, "rbac")))
        .await
        .unwrap_err();
    let says = err.to_string();
    assert!(says.contains("403 Forbidden"), "{says}");
    assert!(
        says.contains("see the Role in docs/KUBERNETES.md"),
        "{says}"
    );
    assert!(!err.is_transient());
}

/// A restarted API server (every connection dropped, the objects kept):
/// the watch resumes from its resourceVersion and wakes waiters again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_resumes_after_an_api_server_restart() {
    let mut api = KubeApi::start().await;
    let b = backend_on(&api, "restart", "upsilon").await;
    until(Duration::from_secs(5), || b.notifies()).await;
    let count = |api: &KubeApi, what: &str| api.requests().get(what).copied().unwrap_or(0);
    api.restart().await;
    until(Duration::from_secs(10), || count(&api, "watch leases") >= 2).await;
    until(Duration::from_secs(10), || b.notifies()).await;
    assert_eq!(
        count(&api, "list leases"),
        1,
        "resumed from its resourceVersion"
    );
    // Writes while no watch runs, then a compaction past them: the watch's
    // resourceVersion is too old (410), and it lists again.
    api.faults().refuse_watches.store(true, Ordering::SeqCst);
    api.drop_watches();
    until(Duration::from_secs(10), || !b.notifies()).await;
    let other = KubernetesBackend::connect(
        KubernetesOptions::new()
            .config(config(&api, "restart"))
            .watch(false),
    )
    .await
    .unwrap();
    other.claim("elsewhere", 1).await.unwrap();
    api.compact();
    api.faults().refuse_watches.store(false, Ordering::SeqCst);
    until(Duration::from_secs(10), || count(&api, "list leases") >= 2).await;
    until(Duration::from_secs(10), || b.notifies()).await;
    let peer = backend_on(&api, "restart", "upsilon").await;
    let lease = match peer
        .try_acquire("svc", &testing::holder(1), Duration::from_secs(30))
        .await
        .unwrap()
    {
        Acquire::Granted(l) => l,
        other => panic!("{other:?}"),
    };
    let seen = match b
        .try_acquire("svc", &testing::holder(2), Duration::from_secs(30))
        .await
        .unwrap()
    {
        Acquire::Held(i) => i,
        other => panic!("{other:?}"),
    };
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { b.wait("svc", &seen, Duration::from_secs(30)).await })
    };
    peer.release(&lease).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken by the resumed watch")
        .unwrap()
        .unwrap();
}
