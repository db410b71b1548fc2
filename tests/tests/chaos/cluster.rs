//! The backends the fault test runs nodes against, and the faults each can
//! take besides the process faults every backend takes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use upsilon::backend::{Backend, Lock, Store};
use upsilon_backends::sqlite::{SqliteBackend, SqliteOptions};
use upsilon_tests::clock::SteppedWallClock;
use upsilon_tests::fault_proxy::{FaultProxy, Upstream};

use crate::trial::Kind;

/// A backend the fault test can run nodes against. A new backend needs only
/// this: a fresh store per trial, the URL each node gets, a direct handle for
/// the checker, and the faults it can take (the defaults take none).
#[async_trait]
pub trait ClusterBackend: Send + Sync {
    /// What it is, for reports.
    fn name(&self) -> &'static str;
    /// A fresh, empty store for trial `trial`, whose nodes are `nodes`.
    async fn fresh(&mut self, trial: usize, nodes: &[String]);
    /// The `--url` node `node` gets.
    fn node_url(&self, node: &str) -> String;
    /// Further flags node `node` gets.
    fn node_args(&self, node: &str) -> Vec<String> {
        let _ = node;
        Vec::new()
    }
    /// The lock of the current trial, read directly (not through any fault).
    fn lock(&self) -> Arc<dyn Lock>;
    /// The store of the current trial, read directly.
    fn store(&self) -> Arc<dyn Store>;
    /// The faults of its own it can take, besides SIGKILL, SIGSTOP and
    /// SIGTERM.
    fn kinds(&self) -> &'static [Kind] {
        &[]
    }
    /// Restarts the server (an immediate shutdown, as a crash, then a start).
    async fn restart_server(&mut self) {}
    /// Terminates, on the server, the session the lease row names; how many.
    async fn terminate_lease_session(&self) -> u64 {
        0
    }
    /// Terminates, on the server, every session of node `node`; how many.
    async fn terminate_sessions_of(&self, node: &str) -> u64 {
        let _ = node;
        0
    }
    /// Steps the wall clock the backend reads by `ms`.
    async fn step_clock(&self, ms: i64) -> bool {
        let _ = ms;
        false
    }
    /// Sets (or with `None` resets) the server's idle-session timeout.
    async fn idle_session_timeout(&self, timeout: Option<Duration>) -> bool {
        let _ = timeout;
        false
    }
    /// The fault proxy between node `node` and the server, if there is one.
    fn proxy(&self, node: &str) -> Option<&FaultProxy> {
        let _ = node;
        None
    }
    /// What the server says its faults did, for the report.
    fn server_says(&self) -> Option<String> {
        None
    }
    /// The fence the store has seen before the trial's first grant (a store
    /// used with another lock): grants up to it are behind the store.
    fn used_store_fence(&self) -> u64 {
        0
    }
    /// The shortest lease TTL the backend takes, in ms (0: any).
    fn min_ttl_ms(&self) -> u64 {
        0
    }
    /// Starts fault `which` (0, 1 or 2) of the API server itself, and says
    /// what it is; `None` where the backend has none.
    async fn api_fault(&self, which: u64) -> Option<String> {
        let _ = which;
        None
    }
    /// Ends the API server's fault.
    async fn api_heal(&self) {}
}

/// A SQLite file per trial. Every process that opens it (the nodes and the
/// harness) reads the wall clock through a [`SteppedWallClock`] of the
/// trial, which the fault test steps: the backend's clock is injectable
/// (`SqliteOptions::clock`), and stepping the host's own would need
/// privileges a test must not use.
pub struct Sqlite {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub clock: SteppedWallClock,
    /// The negative control's `judge_expiry_by_wall_clock`.
    pub by_wall_clock: bool,
    pub backend: Option<Arc<dyn Backend>>,
}

impl Sqlite {
    pub fn new(by_wall_clock: bool) -> Sqlite {
        let dir = tempfile::tempdir().unwrap();
        Sqlite {
            path: dir.path().join("unused.db"),
            clock: SteppedWallClock {
                offset_file: dir.path().join("unused.offset"),
            },
            dir,
            by_wall_clock,
            backend: None,
        }
    }
}

#[async_trait]
impl ClusterBackend for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }
    async fn fresh(&mut self, trial: usize, _nodes: &[String]) {
        self.path = self.dir.path().join(format!("trial-{trial}.db"));
        self.clock = SteppedWallClock {
            offset_file: self.dir.path().join(format!("trial-{trial}.offset")),
        };
        let options = SqliteOptions {
            clock: Arc::new(self.clock.clone()),
            judge_expiry_by_wall_clock: self.by_wall_clock,
            ..SqliteOptions::default()
        };
        let backend = SqliteBackend::open_with(&self.path, options).await.unwrap();
        self.backend = Some(Arc::new(backend));
    }
    fn node_url(&self, _node: &str) -> String {
        format!("sqlite://{}", self.path.display())
    }
    fn node_args(&self, _node: &str) -> Vec<String> {
        let mut args = vec![
            "--wall-clock-offset".to_owned(),
            self.clock.offset_file.display().to_string(),
        ];
        if self.by_wall_clock {
            args.push("--judge-expiry-by-wall-clock".to_owned());
        }
        args
    }
    fn lock(&self) -> Arc<dyn Lock> {
        self.backend.clone().expect("fresh() first")
    }
    fn store(&self) -> Arc<dyn Store> {
        self.backend.clone().expect("fresh() first")
    }
    fn kinds(&self) -> &'static [Kind] {
        &[Kind::ClockStep]
    }
    async fn step_clock(&self, ms: i64) -> bool {
        self.clock.step(ms).is_ok()
    }
}

/// A real PostgreSQL server started by the harness, a database per trial,
/// and a fault proxy per node between the node and the server. The nodes'
/// sessions carry the node's name as `application_name`; the harness's
/// carry `harness`, so its faults never hit its own.
pub struct Pg {
    pub server: upsilon_test_servers::Postgres,
    pub url: String,
    pub backend: Option<Arc<dyn Backend>>,
    pub proxies: BTreeMap<String, FaultProxy>,
    admin: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl Pg {
    pub async fn start() -> Pg {
        let server = tokio::task::spawn_blocking(upsilon_test_servers::Postgres::start)
            .await
            .unwrap();
        Pg {
            server,
            url: String::new(),
            backend: None,
            proxies: BTreeMap::new(),
            admin: tokio::sync::Mutex::new(None),
        }
    }

    /// The harness's URL of the trial's database: over the server's Unix
    /// socket (see `fresh`), named `harness`.
    pub fn harness_url(&self) -> String {
        format!(
            "postgres://postgres@/{}?host={}&port={}&application_name=harness",
            self.url.rsplit('/').next().unwrap(),
            self.server.dir().display(),
            self.server.port()
        )
    }

    /// Runs `sql` as the harness in the trial's database (not through any
    /// proxy) on a connection kept open between faults (connecting costs
    /// more than the fault); `None` if the server does not answer.
    async fn admin(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Option<Vec<tokio_postgres::Row>> {
        let mut admin = self.admin.lock().await;
        for _ in 0..2 {
            if admin.as_ref().is_none_or(|c| c.is_closed()) {
                let url = format!("{}&connect_timeout=5", self.harness_url());
                let connected = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio_postgres::connect(&url, tokio_postgres::NoTls),
                )
                .await;
                let Ok(Ok((client, conn))) = connected else {
                    return None;
                };
                tokio::spawn(conn);
                *admin = Some(client);
            }
            let client = admin.as_ref()?;
            match tokio::time::timeout(Duration::from_secs(5), client.query(sql, params)).await {
                Ok(Ok(rows)) => return Some(rows),
                // Closed by the server (a restart, the idle timeout): once more.
                _ => *admin = None,
            }
        }
        None
    }

    /// [`Pg::admin`] for a statement that returns one bigint.
    async fn count(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Option<i64> {
        let rows = self.admin(sql, params).await?;
        rows.first()?.get::<_, Option<i64>>(0)
    }
}

#[async_trait]
impl ClusterBackend for Pg {
    fn name(&self) -> &'static str {
        "postgres"
    }
    async fn fresh(&mut self, trial: usize, nodes: &[String]) {
        self.url = self.server.create_database(&format!("trial_{trial}"));
        *self.admin.lock().await = None;
        self.backend = Some(
            upsilon_backends::connect(&self.harness_url())
                .await
                .unwrap(),
        );
        self.proxies.clear();
        // To the server's Unix socket: a local session needs no password
        // exchange (SCRAM), which would cost each new connection of a debug
        // build hundreds of milliseconds of CPU, on a loaded host more than
        // the TTL.
        let socket = self
            .server
            .dir()
            .join(format!(".s.PGSQL.{}", self.server.port()));
        for n in nodes {
            let proxy = FaultProxy::start(Upstream::Unix(socket.clone()))
                .await
                .unwrap();
            self.proxies.insert(n.clone(), proxy);
        }
    }
    fn node_url(&self, node: &str) -> String {
        let port = self.proxies[node].port();
        format!(
            "postgres://postgres:{}@127.0.0.1:{port}/{}?application_name={node}",
            self.server.password(),
            self.url.rsplit('/').next().unwrap()
        )
    }
    fn lock(&self) -> Arc<dyn Lock> {
        self.backend.clone().expect("fresh() first")
    }
    fn store(&self) -> Arc<dyn Store> {
        self.backend.clone().expect("fresh() first")
    }
    fn kinds(&self) -> &'static [Kind] {
        &[
            Kind::ServerRestart,
            Kind::LeaseSession,
            Kind::NodeSessions,
            Kind::IdleTimeout,
            Kind::Cut,
            Kind::Delay,
            Kind::Blackhole,
            Kind::Isolate,
        ]
    }
    async fn restart_server(&mut self) {
        // Immediate shutdown, as a crash, then start on the same directory.
        self.server.crash();
        self.server.start_again();
    }
    async fn terminate_lease_session(&self) -> u64 {
        self.count(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(lease_pid))
             FROM upsilon_state WHERE service = 'cluster' AND lease_pid IS NOT NULL",
            &[],
        )
        .await
        .unwrap_or(0) as u64
    }
    async fn terminate_sessions_of(&self, node: &str) -> u64 {
        self.count(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
             FROM pg_stat_activity WHERE application_name = $1",
            &[&node],
        )
        .await
        .unwrap_or(0) as u64
    }
    async fn idle_session_timeout(&self, timeout: Option<Duration>) -> bool {
        let set = match timeout {
            Some(t) => format!(
                "ALTER SYSTEM SET idle_session_timeout = '{}ms'",
                t.as_millis()
            ),
            None => "ALTER SYSTEM RESET idle_session_timeout".to_owned(),
        };
        // Two statements: ALTER SYSTEM cannot run in a transaction block.
        self.admin(&set, &[]).await.is_some()
            && self.admin("SELECT pg_reload_conf()", &[]).await.is_some()
    }
    fn proxy(&self, node: &str) -> Option<&FaultProxy> {
        self.proxies.get(node)
    }
    fn server_says(&self) -> Option<String> {
        let log = self.server.log();
        let count = |s: &str| log.matches(s).count();
        Some(format!(
            "the server's log: {} sessions ended by the idle-session timeout, {} terminated by pg_terminate_backend (harness or nodes' own), {} starts",
            count("terminating connection due to idle-session timeout"),
            count("terminating connection due to administrator command"),
            count("database system is ready to accept connections")
        ))
    }
}

/// The fence a mixed setup's store has seen before its trial starts: above
/// any fence a fresh lock grants first (etcd's fences are revisions of the
/// whole server, which every trial moves on).
pub const USED_STORE_FENCE: u64 = 1 << 40;

/// The service the nodes run.
const SERVICE: &str = "cluster";

/// The lease in one backend and the store in another: each node gets the
/// store's URL and the lock's as `--lock-url`. It takes the faults of both.
/// Proxy faults hit the lock's connections in even trials and the store's
/// in odd ones, so that a fault's start and end reach the same proxy; a
/// server restart restarts the lock's and the store's servers in turn.
pub struct Mixed {
    pub lock: Box<dyn ClusterBackend>,
    pub store: Box<dyn ClusterBackend>,
    name: &'static str,
    kinds: &'static [Kind],
    trial: usize,
    restarts: usize,
}

impl Mixed {
    pub fn new(lock: Box<dyn ClusterBackend>, store: Box<dyn ClusterBackend>) -> Mixed {
        let name = format!("{} lock, {} store", lock.name(), store.name());
        let mut kinds: Vec<Kind> = lock.kinds().to_vec();
        kinds.extend(store.kinds().iter().filter(|k| !lock.kinds().contains(k)));
        Mixed {
            lock,
            store,
            // One per setup, for the whole run: leaking them is harmless.
            name: Box::leak(name.into_boxed_str()),
            kinds: Box::leak(kinds.into_boxed_slice()),
            trial: 0,
            restarts: 0,
        }
    }
}

#[async_trait]
impl ClusterBackend for Mixed {
    fn name(&self) -> &'static str {
        self.name
    }
    async fn fresh(&mut self, trial: usize, nodes: &[String]) {
        self.trial = trial;
        self.lock.fresh(trial, nodes).await;
        self.store.fresh(trial, nodes).await;
        // A store used before with another lock: the fresh lock's first
        // grants are behind it, and the nodes must catch the lock up
        // (`Lock::raise_fence`) under the faults.
        self.store
            .store()
            .claim(SERVICE, USED_STORE_FENCE)
            .await
            .unwrap();
    }
    fn node_url(&self, node: &str) -> String {
        self.store.node_url(node)
    }
    fn node_args(&self, node: &str) -> Vec<String> {
        let mut args = vec!["--lock-url".to_owned(), self.lock.node_url(node)];
        args.extend(self.lock.node_args(node));
        args.extend(self.store.node_args(node));
        args
    }
    fn lock(&self) -> Arc<dyn Lock> {
        self.lock.lock()
    }
    fn store(&self) -> Arc<dyn Store> {
        self.store.store()
    }
    fn kinds(&self) -> &'static [Kind] {
        self.kinds
    }
    async fn restart_server(&mut self) {
        self.restarts += 1;
        if self.restarts % 2 == 1 {
            self.lock.restart_server().await;
        } else {
            self.store.restart_server().await;
        }
    }
    async fn terminate_lease_session(&self) -> u64 {
        self.lock.terminate_lease_session().await + self.store.terminate_lease_session().await
    }
    async fn terminate_sessions_of(&self, node: &str) -> u64 {
        self.lock.terminate_sessions_of(node).await + self.store.terminate_sessions_of(node).await
    }
    async fn step_clock(&self, ms: i64) -> bool {
        let lock = self.lock.step_clock(ms).await;
        self.store.step_clock(ms).await || lock
    }
    async fn idle_session_timeout(&self, timeout: Option<Duration>) -> bool {
        let lock = self.lock.idle_session_timeout(timeout).await;
        self.store.idle_session_timeout(timeout).await || lock
    }
    fn proxy(&self, node: &str) -> Option<&FaultProxy> {
        if self.trial.is_multiple_of(2) {
            self.lock.proxy(node).or_else(|| self.store.proxy(node))
        } else {
            self.store.proxy(node).or_else(|| self.lock.proxy(node))
        }
    }
    fn used_store_fence(&self) -> u64 {
        USED_STORE_FENCE
    }
    fn min_ttl_ms(&self) -> u64 {
        self.lock.min_ttl_ms().max(self.store.min_ttl_ms())
    }
    fn server_says(&self) -> Option<String> {
        match (self.lock.server_says(), self.store.server_says()) {
            (Some(a), Some(b)) => Some(format!("lock: {a}; store: {b}")),
            (a, b) => a.or(b),
        }
    }
    async fn api_fault(&self, which: u64) -> Option<String> {
        match self.lock.api_fault(which).await {
            Some(d) => Some(d),
            None => self.store.api_fault(which).await,
        }
    }
    async fn api_heal(&self) {
        self.lock.api_heal().await;
        self.store.api_heal().await;
    }
}

/// The Kubernetes backend on the in-process stand-in API server, a
/// namespace per trial, and a fault proxy per node between the node and the
/// stand-in (each node gets a kubeconfig naming its proxy). Besides the
/// proxy's faults it takes the API server's own: a restart (every
/// connection dropped, the objects kept), 500s, watches dropped and
/// refused, and a conflict storm.
pub struct Kube {
    pub api: upsilon_test_servers::kube_api::KubeApi,
    dir: tempfile::TempDir,
    namespace: String,
    backend: Option<Arc<dyn Backend>>,
    proxies: BTreeMap<String, FaultProxy>,
    kubeconfigs: BTreeMap<String, PathBuf>,
    faults: std::sync::atomic::AtomicUsize,
}

impl Kube {
    pub async fn start() -> Kube {
        Kube {
            api: upsilon_test_servers::kube_api::KubeApi::start().await,
            dir: tempfile::tempdir().unwrap(),
            namespace: String::new(),
            backend: None,
            proxies: BTreeMap::new(),
            kubeconfigs: BTreeMap::new(),
            faults: Default::default(),
        }
    }
}

#[async_trait]
impl ClusterBackend for Kube {
    fn name(&self) -> &'static str {
        "kubernetes"
    }
    async fn fresh(&mut self, trial: usize, nodes: &[String]) {
        self.namespace = format!("trial-{trial}");
        let direct = self.dir.path().join(format!("trial-{trial}.kubeconfig"));
        self.api.write_kubeconfig(&direct, &self.namespace);
        let url = format!(
            "kubernetes://{}?kubeconfig={}",
            self.namespace,
            direct.display()
        );
        self.backend = Some(upsilon_backends::connect(&url).await.unwrap());
        self.proxies.clear();
        self.kubeconfigs.clear();
        for n in nodes {
            let proxy = FaultProxy::start(Upstream::Tcp(self.api.port()))
                .await
                .unwrap();
            let path = self
                .dir
                .path()
                .join(format!("trial-{trial}-{n}.kubeconfig"));
            let via = self.api.kubeconfig(&self.namespace).replace(
                &self.api.url(),
                &format!("http://127.0.0.1:{}", proxy.port()),
            );
            std::fs::write(&path, via).unwrap();
            self.kubeconfigs.insert(n.clone(), path);
            self.proxies.insert(n.clone(), proxy);
        }
    }
    fn node_url(&self, node: &str) -> String {
        format!(
            "kubernetes://{}?kubeconfig={}",
            self.namespace,
            self.kubeconfigs[node].display()
        )
    }
    fn lock(&self) -> Arc<dyn Lock> {
        self.backend.clone().expect("fresh() first")
    }
    fn store(&self) -> Arc<dyn Store> {
        self.backend.clone().expect("fresh() first")
    }
    fn kinds(&self) -> &'static [Kind] {
        &[
            Kind::ServerRestart,
            Kind::Cut,
            Kind::Delay,
            Kind::Blackhole,
            Kind::Isolate,
            Kind::ApiFault,
        ]
    }
    async fn restart_server(&mut self) {
        self.api.restart().await;
    }
    fn proxy(&self, node: &str) -> Option<&FaultProxy> {
        self.proxies.get(node)
    }
    async fn api_fault(&self, which: u64) -> Option<String> {
        use std::sync::atomic::Ordering::SeqCst;
        self.faults.fetch_add(1, SeqCst);
        let f = self.api.faults();
        Some(match which {
            0 => {
                f.fail_per_mille.store(300, SeqCst);
                f.lose_reply_per_mille.store(100, SeqCst);
                "500s on 30% of requests, 10% of committed writes' replies lost".to_owned()
            }
            1 => {
                f.refuse_watches.store(true, SeqCst);
                self.api.drop_watches();
                "watches dropped and refused".to_owned()
            }
            _ => {
                f.conflict_per_mille.store(500, SeqCst);
                "conflict storm: another writer before half of the updates".to_owned()
            }
        })
    }
    async fn api_heal(&self) {
        self.api.heal();
    }
    fn server_says(&self) -> Option<String> {
        let r = self.api.requests();
        let total: u64 = r.values().sum();
        Some(format!(
            "the stand-in served {total} requests ({} updates, {} watches)",
            r.get("update configmaps").unwrap_or(&0) + r.get("update leases").unwrap_or(&0),
            r.get("watch configmaps").unwrap_or(&0) + r.get("watch leases").unwrap_or(&0),
        ))
    }
}

/// A server reached over TCP that keeps every service of a trial under a
/// key prefix of its own: Redis, etcd.
pub trait PrefixServer: Send + Sync {
    /// What it is, for reports.
    const NAME: &'static str;
    /// Its client port.
    fn port(&self) -> u16;
    /// The URL of the server through `port` (a proxy's), with `prefix`.
    fn url(&self, port: u16, prefix: &str) -> String;
    /// SIGKILL, as a crash, then a start on the same data.
    fn crash_and_restart(&mut self);
    /// The shortest lease TTL it takes, in ms.
    fn min_ttl_ms(&self) -> u64 {
        0
    }
    /// What its log says its faults did.
    fn says(&self) -> Option<String> {
        None
    }
}

/// A [`PrefixServer`] started by the harness, a key prefix per trial, and a
/// fault proxy per node between the node and the server.
pub struct Prefixed<S> {
    pub server: S,
    prefix: String,
    backend: Option<Arc<dyn Backend>>,
    proxies: BTreeMap<String, FaultProxy>,
}

impl<S> Prefixed<S> {
    fn new(server: S) -> Prefixed<S> {
        Prefixed {
            server,
            prefix: String::new(),
            backend: None,
            proxies: BTreeMap::new(),
        }
    }
}

#[async_trait]
impl<S: PrefixServer> ClusterBackend for Prefixed<S> {
    fn name(&self) -> &'static str {
        S::NAME
    }
    async fn fresh(&mut self, trial: usize, nodes: &[String]) {
        self.prefix = format!("trial{trial}");
        let url = self.server.url(self.server.port(), &self.prefix);
        self.backend = Some(upsilon_backends::connect(&url).await.unwrap());
        self.proxies.clear();
        for n in nodes {
            let proxy = FaultProxy::start(Upstream::Tcp(self.server.port()))
                .await
                .unwrap();
            self.proxies.insert(n.clone(), proxy);
        }
    }
    fn node_url(&self, node: &str) -> String {
        self.server.url(self.proxies[node].port(), &self.prefix)
    }
    fn lock(&self) -> Arc<dyn Lock> {
        self.backend.clone().expect("fresh() first")
    }
    fn store(&self) -> Arc<dyn Store> {
        self.backend.clone().expect("fresh() first")
    }
    fn kinds(&self) -> &'static [Kind] {
        &[
            Kind::ServerRestart,
            Kind::Cut,
            Kind::Delay,
            Kind::Blackhole,
            Kind::Isolate,
        ]
    }
    async fn restart_server(&mut self) {
        self.server.crash_and_restart();
    }
    fn proxy(&self, node: &str) -> Option<&FaultProxy> {
        self.proxies.get(node)
    }
    fn server_says(&self) -> Option<String> {
        self.server.says()
    }
    fn min_ttl_ms(&self) -> u64 {
        self.server.min_ttl_ms()
    }
}

/// A real Redis server, its append-only file synced before every write is
/// acknowledged (`appendfsync always`: the setting docs/REDIS.md asks of a
/// Redis that is the store).
pub type Redis = Prefixed<upsilon_test_servers::Redis>;

impl Redis {
    pub async fn start() -> Redis {
        Redis::with(true).await
    }

    /// For a negative control: a Redis that keeps nothing across a crash
    /// (no append-only file, no snapshots).
    pub async fn without_persistence() -> Redis {
        Redis::with(false).await
    }

    async fn with(persistent: bool) -> Redis {
        let server = tokio::task::spawn_blocking(move || {
            let builder = upsilon_test_servers::Redis::builder();
            match persistent {
                true => builder.appendonly(upsilon_test_servers::Fsync::Always),
                false => builder,
            }
            .start()
        })
        .await
        .unwrap();
        Prefixed::new(server)
    }
}

impl PrefixServer for upsilon_test_servers::Redis {
    const NAME: &'static str = "redis";
    fn port(&self) -> u16 {
        upsilon_test_servers::Redis::port(self)
    }
    fn url(&self, port: u16, prefix: &str) -> String {
        let auth = self
            .password()
            .map(|pw| format!(":{pw}@"))
            .unwrap_or_default();
        format!("redis://{auth}127.0.0.1:{port}/0?prefix={prefix}")
    }
    fn crash_and_restart(&mut self) {
        self.crash();
        self.start_again();
    }
    fn says(&self) -> Option<String> {
        let log = self.log();
        Some(format!(
            "the server's log: {} starts, {} loads of the append-only file",
            log.matches("Ready to accept connections").count(),
            log.matches("DB loaded from append only file").count()
        ))
    }
}

/// A real etcd (fsync on, as in production). Its smallest lease TTL is 2 s.
pub type Etcd = Prefixed<upsilon_test_servers::Etcd>;

impl Etcd {
    pub async fn start() -> Etcd {
        let server = tokio::task::spawn_blocking(|| {
            upsilon_test_servers::Etcd::builder().fsync(true).start()
        })
        .await
        .unwrap();
        Prefixed::new(server)
    }
}

impl PrefixServer for upsilon_test_servers::Etcd {
    const NAME: &'static str = "etcd";
    fn port(&self) -> u16 {
        upsilon_test_servers::Etcd::port(self)
    }
    fn url(&self, port: u16, prefix: &str) -> String {
        format!("etcd://127.0.0.1:{port}/{prefix}")
    }
    fn crash_and_restart(&mut self) {
        self.crash();
        self.start_again();
    }
    fn min_ttl_ms(&self) -> u64 {
        2000
    }
}
