//! Multi-process fault test: real node processes (`src/bin/node.rs`) against
//! a real backend (a SQLite file; a PostgreSQL server the harness starts), with random SIGKILL, SIGSTOP longer than the TTL then
//! SIGCONT, node restarts and (for server backends) a server restart. Every
//! task appends to an audit table with its fence and times; after each trial
//! a checker verifies:
//! - no two holders' effects overlap unless the older one's completion was refused;
//! - no completed task is committed twice (S3);
//! - the data version and the task states never regress (S4), sampled all along;
//! - every trial converges: all nodes READY at the target version (L2, L3).
//!
//! Sizes are parameters (small by default, for the README's test command):
//! ```text
//! UPSILON_CHAOS_TRIALS=40 UPSILON_CHAOS_NODES=6 cargo test --release -p upsilon-tests --test chaos -- --nocapture
//! ```
//! `UPSILON_CHAOS_SEED` fixes the seed of the first trial.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::process::{Child, Command};
use upsilon::backend::{AttemptKind, AttemptState, HistoryEntry};
use upsilon::backend::{Backend, Snapshot};

const NODE: &str = env!("CARGO_BIN_EXE_node");
const TASKS: &str = "1.0:2,1.1:3";
const TASK_COUNT: usize = 5;
const TARGET: &str = "1.1.0";
const TTL_MS: u64 = 1000;

/// One task run as the audit table recorded it.
#[derive(Debug, Clone)]
struct AuditRow {
    task: String,
    node: String,
    fence: i64,
    started_ms: i64,
    finished_ms: Option<i64>,
}

/// A backend the fault test can run nodes against. A new backend needs only
/// this: where the nodes connect, how to read the audit table, and (for a
/// server) how to restart it.
#[async_trait]
trait ClusterBackend: Send + Sync {
    /// What it is, for reports.
    fn name(&self) -> &'static str;
    /// The `--url` the node processes get; a fresh, empty store each trial.
    async fn fresh(&mut self, trial: usize) -> String;
    /// The lock and store of the current trial, read directly.
    fn backend(&self) -> Arc<dyn Backend>;
    /// The audit rows of the current trial, in insertion order.
    async fn audit(&self) -> Vec<AuditRow>;
    /// Restarts the server, if there is one; `false` if not applicable.
    async fn restart_server(&mut self) -> bool {
        false
    }
}

struct Sqlite {
    dir: tempfile::TempDir,
    path: PathBuf,
    backend: Option<Arc<dyn Backend>>,
}

#[async_trait]
impl ClusterBackend for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }
    async fn fresh(&mut self, trial: usize) -> String {
        self.path = self.dir.path().join(format!("trial-{trial}.db"));
        let backend = upsilon_backends::sqlite::SqliteBackend::open(&self.path)
            .await
            .unwrap();
        self.backend = Some(Arc::new(backend));
        format!("sqlite://{}", self.path.display())
    }
    fn backend(&self) -> Arc<dyn Backend> {
        self.backend.clone().expect("fresh() first")
    }
    async fn audit(&self) -> Vec<AuditRow> {
        let c = rusqlite::Connection::open(&self.path).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        let exists: bool = c
            .prepare("SELECT 1 FROM sqlite_master WHERE name = 'audit'")
            .unwrap()
            .exists([])
            .unwrap();
        if !exists {
            return Vec::new();
        }
        let mut stmt = c
            .prepare("SELECT task, node, fence, started_ms, finished_ms FROM audit ORDER BY id")
            .unwrap();
        let rows = stmt
            .query_map([], |r| {
                Ok(AuditRow {
                    task: r.get(0)?,
                    node: r.get(1)?,
                    fence: r.get(2)?,
                    started_ms: r.get(3)?,
                    finished_ms: r.get(4)?,
                })
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        rows
    }
}

/// A real PostgreSQL server started by the harness; a database per trial.
struct Pg {
    server: upsilon_test_servers::Postgres,
    url: String,
    backend: Option<Arc<dyn Backend>>,
}

#[async_trait]
impl ClusterBackend for Pg {
    fn name(&self) -> &'static str {
        "postgres"
    }
    async fn fresh(&mut self, trial: usize) -> String {
        self.url = self.server.create_database(&format!("trial_{trial}"));
        self.backend = Some(upsilon_backends::connect(&self.url).await.unwrap());
        self.url.clone()
    }
    fn backend(&self) -> Arc<dyn Backend> {
        self.backend.clone().expect("fresh() first")
    }
    async fn audit(&self) -> Vec<AuditRow> {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let rows = match client
            .query(
                "SELECT task, node, fence, started_ms, finished_ms FROM audit ORDER BY id",
                &[],
            )
            .await
        {
            Ok(rows) => rows,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                Vec::new()
            }
            Err(e) => panic!("reading the audit table: {e}"),
        };
        rows.iter()
            .map(|r| AuditRow {
                task: r.get(0),
                node: r.get(1),
                fence: r.get(2),
                started_ms: r.get(3),
                finished_ms: r.get(4),
            })
            .collect()
    }
    async fn restart_server(&mut self) -> bool {
        // Immediate shutdown, as a crash, then start on the same directory.
        self.server.crash();
        self.server.start_again();
        true
    }
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n.max(1)
    }
}

struct NodeProc {
    name: String,
    child: Child,
    stopped: bool,
    restarts: usize,
}

fn spawn(url: &str, name: &str) -> Child {
    Command::new(NODE)
        .args([
            "--url",
            url,
            "--name",
            name,
            "--app-version",
            "1.1",
            "--tasks",
            TASKS,
        ])
        .args(["--task-ms", "150", "--ttl-ms", &TTL_MS.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start a node process")
}

fn signal(child: &Child, sig: &str) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status();
    }
}

/// What one trial did, for the report.
#[derive(Debug, Default)]
struct Faults {
    kills: usize,
    stops: usize,
    restarts: usize,
    server_restarts: usize,
    failed_exits: usize,
}

/// Samples the store while the trial runs: data version and completed tasks
/// must never go back (S4).
fn sampler(
    store: Arc<dyn Backend>,
    done: Arc<Mutex<bool>>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut violations = Vec::new();
        let mut last: Option<Snapshot> = None;
        while !*done.lock().unwrap() {
            if let Ok(now) = store.load("cluster").await {
                if let Some(prev) = &last {
                    if now.data_version < prev.data_version {
                        violations.push(format!(
                            "S4: data version went from {:?} to {:?}",
                            prev.data_version, now.data_version
                        ));
                    }
                    for (k, t) in &prev.tasks {
                        if t.completed && !now.is_completed(k) {
                            violations.push(format!("S4: {k} went back from completed"));
                        }
                    }
                }
                last = Some(now);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        violations
    })
}

async fn trial(
    backend: &mut dyn ClusterBackend,
    index: usize,
    seed: u64,
    nodes: usize,
) -> (Faults, Vec<String>) {
    let url = backend.fresh(index).await;
    let mut rng = Rng(seed);
    let mut faults = Faults::default();
    let done = Arc::new(Mutex::new(false));
    let sampling = sampler(backend.backend(), done.clone());
    let mut procs: Vec<NodeProc> = (0..nodes)
        .map(|n| {
            let name = format!("n{n}");
            NodeProc {
                child: spawn(&url, &name),
                name,
                stopped: false,
                restarts: 0,
            }
        })
        .collect();
    // Chaos for a while, then heal.
    let chaos_until = Instant::now() + Duration::from_millis(2500 + rng.below(1500));
    while Instant::now() < chaos_until {
        tokio::time::sleep(Duration::from_millis(150 + rng.below(350))).await;
        let mut n = rng.below(nodes as u64) as usize;
        // Half the faults hit the lease holder: the node whose death or
        // pause matters.
        if rng.below(2) == 0 {
            if let Ok(Some(lease)) = backend.backend().current("cluster").await {
                if let Some(i) = procs
                    .iter()
                    .position(|p| Some(&p.name) == lease.holder.pod.as_ref())
                {
                    n = i;
                }
            }
        }
        match rng.below(6) {
            0 | 1 => {
                let p = &mut procs[n];
                p.child.start_kill().ok();
                let _ = p.child.wait().await;
                faults.kills += 1;
                p.child = spawn(&url, &p.name);
                p.stopped = false;
                p.restarts += 1;
            }
            2 | 3 if !procs[n].stopped => {
                signal(&procs[n].child, "-STOP");
                procs[n].stopped = true;
                faults.stops += 1;
                // Keep it stopped past its TTL, then let it go on.
                let p = procs[n].child.id();
                let hold = Duration::from_millis(TTL_MS + 300 + rng.below(700));
                tokio::spawn(async move {
                    tokio::time::sleep(hold).await;
                    if let Some(pid) = p {
                        let _ = std::process::Command::new("kill")
                            .args(["-CONT", &pid.to_string()])
                            .status();
                    }
                });
            }
            4 if backend.restart_server().await => faults.server_restarts += 1,
            _ => {}
        }
    }
    for p in &mut procs {
        signal(&p.child, "-CONT");
        p.stopped = false;
    }
    // Heal: every node runs until it is READY, restarted after a failure as
    // its orchestrator would.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut violations = Vec::new();
    for p in &mut procs {
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, p.child.wait()).await {
                Ok(Ok(status)) if status.success() => break,
                Ok(_) => {
                    faults.failed_exits += 1;
                    if p.restarts > 20 {
                        violations.push(format!("L3: {} kept failing", p.name));
                        break;
                    }
                    p.child = spawn(&url, &p.name);
                    p.restarts += 1;
                    faults.restarts += 1;
                }
                Err(_) => {
                    violations.push(format!(
                        "L2/L3: {} did not become READY within 60 s after healing",
                        p.name
                    ));
                    break;
                }
            }
        }
    }
    *done.lock().unwrap() = true;
    violations.extend(sampling.await.unwrap());
    let history = backend.backend().history("cluster").await.unwrap();
    let snapshot = backend.backend().load("cluster").await.unwrap();
    violations.extend(check(&backend.audit().await, &history, &snapshot));
    (faults, violations)
}

fn check(audit: &[AuditRow], history: &[HistoryEntry], snapshot: &Snapshot) -> Vec<String> {
    let mut v = Vec::new();
    let mut completions: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for row in history {
        if row.kind == AttemptKind::Run && row.state == AttemptState::Completed {
            completions.entry(&row.key.id).or_default().push(row.fence);
        }
    }
    for (task, fences) in &completions {
        if fences.len() > 1 {
            v.push(format!(
                "S3: {task} completed {} times (fences {fences:?})",
                fences.len()
            ));
        }
    }
    let now = i64::MAX;
    for (i, a) in audit.iter().enumerate() {
        for b in &audit[i + 1..] {
            let overlap = a.task == b.task
                && a.fence != b.fence
                && a.started_ms < b.finished_ms.unwrap_or(now)
                && b.started_ms < a.finished_ms.unwrap_or(now);
            let older = a.fence.min(b.fence) as u64;
            if overlap
                && completions
                    .get(a.task.as_str())
                    .is_some_and(|f| f.contains(&older))
            {
                v.push(format!(
                    "effects: {} ran on {} (fence {}) and {} (fence {}) at once, and the older completion committed",
                    a.task, a.node, a.fence, b.node, b.fence
                ));
            }
        }
    }
    let ran: BTreeSet<&str> = audit.iter().map(|r| r.task.as_str()).collect();
    if completions.len() != TASK_COUNT || ran.len() != TASK_COUNT {
        v.push(format!(
            "L2: {} of {TASK_COUNT} tasks completed ({} ran)",
            completions.len(),
            ran.len()
        ));
    }
    if snapshot
        .data_version
        .as_ref()
        .map(|d| d.to_string())
        .as_deref()
        != Some(TARGET)
    {
        v.push(format!(
            "L2: the data version ended at {:?}, not {TARGET}",
            snapshot.data_version
        ));
    }
    v
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("{name} must be a whole number"))
        })
        .unwrap_or(default)
}

/// Runs the trials against `backend` and fails with every violation found.
async fn run_trials(backend: &mut dyn ClusterBackend) {
    let trials = env_usize("UPSILON_CHAOS_TRIALS", 2);
    let nodes = env_usize("UPSILON_CHAOS_NODES", 4);
    let first_seed = std::env::var("UPSILON_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
        });
    let started = Instant::now();
    let mut total = Faults::default();
    for t in 0..trials {
        let seed = first_seed + t as u64;
        let (f, violations) = trial(backend, t, seed, nodes).await;
        assert!(
            violations.is_empty(),
            "{} trial {t} (UPSILON_CHAOS_SEED={seed}, {nodes} nodes) broke the invariants:\n  - {}\nfaults: {f:?}",
            backend.name(),
            violations.join("\n  - ")
        );
        total.kills += f.kills;
        total.stops += f.stops;
        total.restarts += f.restarts;
        total.server_restarts += f.server_restarts;
        total.failed_exits += f.failed_exits;
    }
    println!(
        "chaos on {}: {trials} trials x {nodes} nodes (seeds {first_seed}..), 0 violations, {:.1?}; \
         {} SIGKILLs, {} SIGSTOPs past the TTL, {} server restarts, {} failed exits restarted",
        backend.name(),
        started.elapsed(),
        total.kills,
        total.stops,
        total.server_restarts,
        total.failed_exits
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_cluster_survives_kills_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let mut backend = Sqlite {
        path: dir.path().join("unused.db"),
        dir,
        backend: None,
    };
    run_trials(&mut backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cluster_survives_kills_stops_and_server_restarts() {
    let server = tokio::task::spawn_blocking(upsilon_test_servers::Postgres::start)
        .await
        .unwrap();
    let mut backend = Pg {
        server,
        url: String::new(),
        backend: None,
    };
    run_trials(&mut backend).await;
}
