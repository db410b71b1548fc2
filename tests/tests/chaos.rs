//! Multi-process fault test: real node processes (`src/bin/node.rs`) against
//! a real backend (a SQLite file; a PostgreSQL server the harness starts,
//! reached through a fault proxy per node), with random faults:
//!
//! - every backend: SIGKILL (the node is started again), SIGSTOP longer than
//!   the TTL then SIGCONT, SIGSTOP shorter than the runner's safety margin,
//!   SIGTERM (a clean stop; the node is started again once it exited), and
//!   node processes that exit with an error started again after a moment;
//! - SQLite: a step of the wall clock the backend reads (its injectable
//!   clock, stepped for every process at once), forward or back by more than
//!   the TTL;
//! - PostgreSQL: a crash-restart of the server, `pg_terminate_backend` of the
//!   lease row's session or of every session of a node, a short
//!   `idle_session_timeout`, and from the node's proxy: connections cut,
//!   traffic delayed or held back (a blackhole) in one direction or both,
//!   and the node isolated (held both ways and its sessions terminated);
//! - Kubernetes (the in-process stand-in API server, a fault proxy per
//!   node): an API server restart, 500s with lost replies, watches dropped
//!   and refused, a conflict storm, and the proxy's faults;
//! - in every third trial, t2 fails for good while the faults run, so its
//!   version is rolled back (t2, then t1: every task has a rollback there),
//!   again and again as nodes restart; it succeeds once the faults heal.
//!
//! Every node writes an audit log of its own (`upsilon_tests::audit`): each
//! run of task code with its start and end on the host's `CLOCK_MONOTONIC`,
//! and each lease and store call with its outcome. The harness records each
//! fault on the same clock. After each trial the checker (`chaos/check.rs`)
//! verifies E1 (no two nodes run task code at once unless the one under the
//! older fence was paused past its safety margin; a paused node's late
//! writes commit only while its fence is still the newest), the
//! lease's exclusivity, effects vs refused completions, S3, S4 (sampled all
//! along), and convergence (L2, L3).
//!
//! Two negative controls must make the checker find task code of two nodes
//! at once: PostgreSQL nodes whose loss signal is switched off
//! (`node --no-loss-signal`), with the holder isolated while it runs a task;
//! and SQLite nodes that judge lease expiry by the wall clock, with the wall
//! clock stepped forward past the TTL while the holder runs a task.
//!
//! The backfill trials (`chaos/backfill.rs`): task t1 is a batched backfill,
//! its holder is hit (SIGKILL, SIGSTOP past the TTL, PostgreSQL sessions
//! terminated) each time its checkpoint has moved, and every row must be
//! done (on PostgreSQL exactly once), each attempt starting after the
//! checkpoint of the one before; the negative control ignores the
//! checkpoint and must be caught. `UPSILON_CHAOS_BACKFILL_TRIALS` (1) and
//! `UPSILON_CHAOS_BACKFILL_FAULTS` (4 per trial) size them.
//!
//! Sizes are parameters (small by default, for the README's test command):
//! ```text
//! UPSILON_CHAOS_TRIALS=500 UPSILON_CHAOS_NODES=5 cargo test --release -p upsilon-tests --test chaos -- --nocapture sqlite_cluster
//! UPSILON_CHAOS_TRIALS=500 UPSILON_CHAOS_NODES=5 cargo test --release -p upsilon-tests --test chaos -- --nocapture postgres_cluster
//! UPSILON_CHAOS_TRIALS=500 UPSILON_CHAOS_NODES=5 cargo test --release -p upsilon-tests --test chaos -- --nocapture kubernetes_cluster
//! ```
//! `UPSILON_CHAOS_SEED` fixes the seed of the first trial;
//! `UPSILON_CHAOS_CONTROL_TRIALS` the negative controls' trials (1);
//! `UPSILON_CHAOS_VERBOSE=1` prints every fault and hand-over;
//! `UPSILON_CHAOS_KEEP=1` keeps each trial's directory (audit logs, stderr).

#[path = "chaos/backfill.rs"]
mod backfill;
#[path = "chaos/check.rs"]
mod check;
#[path = "chaos/cluster.rs"]
mod cluster;
#[path = "chaos/trial.rs"]
mod trial;

use std::collections::BTreeMap;
use std::time::Instant;

use upsilon_tests::audit::{Outcome as Seen, Record};
use upsilon_tests::clock::ms;

use check::Checked;
use cluster::{ClusterBackend, Etcd, Kube, Mixed, Pg, Redis, Sqlite};
use trial::{Config, Kind, Plan};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("{name} must be a whole number"))
        })
        .unwrap_or(default)
}

fn first_seed() -> u64 {
    std::env::var("UPSILON_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
        })
}

/// The random faults' trials: 5 tasks of 150 ms over two versions, TTL 1 s.
fn random_config() -> Config {
    Config {
        nodes: env_usize("UPSILON_CHAOS_NODES", 4),
        tasks: "1.0:2,1.1:3",
        task_count: 5,
        target: "1.1.0",
        ttl_ms: 1000,
        task_ms: 150,
        margin_ms: 200,
        loss_signal: true,
        wait_out: true,
        plan: Plan::Random,
    }
}

/// Overlaps of task code attributed to one kind of fault.
#[derive(Debug, Default, Clone, Copy)]
struct Overlaps {
    explained: usize,
    worst_explained: i64,
    unexplained: usize,
    worst_unexplained: i64,
}

/// What the trials of one run add up to.
#[derive(Debug, Default)]
struct Totals {
    trials: usize,
    failing_trials: usize,
    violations: usize,
    faults: BTreeMap<Kind, usize>,
    failed_exits: usize,
    failing_task_trials: usize,
    rollback_runs: usize,
    cancelled_runs: usize,
    worst_cancel_to_stop: i64,
    handovers: Vec<i64>,
    releases: Vec<i64>,
    writes_after_pause: (usize, usize),
    overlaps: BTreeMap<Option<Kind>, Overlaps>,
    /// Grants at or below the store's fence before the trial (a lock
    /// behind its store), each released and the lock raised.
    behind_grants: usize,
}

impl Totals {
    fn add(&mut self, t: &trial::Trial, c: &Checked, used_store_fence: u64) {
        self.trials += 1;
        self.behind_grants += behind_grants(t, used_store_fence);
        for e in &t.events {
            *self.faults.entry(e.kind).or_default() += 1;
        }
        self.failed_exits += t.failed_exits;
        self.failing_task_trials += usize::from(t.failing_task);
        self.rollback_runs += c.rollback_runs;
        self.cancelled_runs += c.cancelled_runs;
        self.worst_cancel_to_stop = self.worst_cancel_to_stop.max(c.worst_cancel_to_stop);
        self.handovers.extend(&c.handovers);
        self.releases.extend(&c.releases);
        self.writes_after_pause.0 += c.writes_after_pause.0;
        self.writes_after_pause.1 += c.writes_after_pause.1;
        for o in &c.overlaps {
            let k = self.overlaps.entry(o.cause).or_default();
            if o.excuse.is_some() {
                k.explained += 1;
                k.worst_explained = k.worst_explained.max(o.len());
            } else {
                k.unexplained += 1;
                k.worst_unexplained = k.worst_unexplained.max(o.len());
            }
        }
        let v = t.violations.len() + c.violations.len();
        self.violations += v;
        self.failing_trials += usize::from(v > 0);
    }

    fn report(&self, backend: &str, kinds: &[Kind], nodes: usize, seed: u64, took: f64) -> String {
        let mut r = format!(
            "chaos on {backend}: {} trials x {nodes} nodes (seeds {seed}..{}), {} violations in {} trials, {took:.1} s\n",
            self.trials,
            seed + self.trials as u64 - 1,
            self.violations,
            self.failing_trials
        );
        let mut faults: Vec<String> = Vec::new();
        for k in Kind::ALL {
            let base = matches!(
                k,
                Kind::Kill | Kind::Stop | Kind::ShortStop | Kind::Term | Kind::FailingTask
            );
            if base || kinds.contains(&k) {
                faults.push(format!(
                    "{} {}",
                    self.faults.get(&k).copied().unwrap_or(0),
                    k.name()
                ));
            }
        }
        r += &format!("  faults: {}\n", faults.join(", "));
        r += &format!(
            "  {} failed exits restarted; {} runs of task code cancelled (token to stop at most {}); {} rollback runs in {} trials with a failing task\n",
            self.failed_exits,
            self.cancelled_runs,
            ms(self.worst_cancel_to_stop),
            self.rollback_runs,
            self.failing_task_trials
        );
        let stat = |v: &[i64]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            match v.len() {
                0 => "none".to_owned(),
                n => format!("median {}, max {}", ms(v[n / 2]), ms(v[n - 1])),
            }
        };
        r += &format!(
            "  SIGTERM of a holder: {} released (after {}), {} handed over to another node (lease granted after {})\n",
            self.releases.len(),
            stat(&self.releases),
            self.handovers.len(),
            stat(&self.handovers)
        );
        r += &format!(
            "  writes by paused nodes after they resumed: {} committed (their fence still the newest), {} refused\n",
            self.writes_after_pause.0, self.writes_after_pause.1
        );
        if self.behind_grants > 0 {
            r += &format!(
                "  grants behind the store's fence (given back, the lock raised a TTL later): {}\n",
                self.behind_grants
            );
        }
        if self.overlaps.is_empty() {
            r += "  overlapping task code: none\n";
        }
        for (cause, o) in &self.overlaps {
            r += &format!(
                "  overlapping task code after {}: {} explained by a pause (worst {}), {} unexplained (worst {})\n",
                cause.map_or("no fault", Kind::name),
                o.explained,
                ms(o.worst_explained),
                o.unexplained,
                ms(o.worst_unexplained)
            );
        }
        r
    }
}

/// Runs the trials against `env` and returns the totals and the failures'
/// messages.
async fn run_trials(
    env: &mut dyn ClusterBackend,
    cfg: &Config,
    trials: usize,
) -> (Totals, Vec<String>) {
    let seed = first_seed();
    let started = Instant::now();
    let mut totals = Totals::default();
    let mut failures = Vec::new();
    for i in 0..trials {
        let t = trial::run(env, cfg, i, seed + i as u64).await;
        let mut c = check::check(cfg, &t);
        c.violations.extend(ran_behind(&t, env.used_store_fence()));
        totals.add(&t, &c, env.used_store_fence());

        if std::env::var_os("UPSILON_CHAOS_VERBOSE").is_some() {
            for n in &c.notes {
                println!("trial {i}: {n}");
            }
            for e in &t.events {
                println!(
                    "trial {i}: {} {}{} at {}..{} {}",
                    e.kind.name(),
                    e.node.as_deref().unwrap_or("server"),
                    e.pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                    e.at,
                    e.until.map(|u| u.to_string()).unwrap_or_default(),
                    e.detail
                );
            }
        }
        let violations: Vec<&String> = t.violations.iter().chain(&c.violations).collect();
        if !violations.is_empty() {
            let faults: Vec<String> = t
                .events
                .iter()
                .map(|e| {
                    format!(
                        "{} {}{} {}",
                        e.kind.name(),
                        e.node.as_deref().unwrap_or("server"),
                        e.pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                        e.detail
                    )
                })
                .collect();
            let message = format!(
                "{} trial {i} (UPSILON_CHAOS_SEED={}, {} nodes) broke the invariants:\n  - {}\nfaults:\n  {}\n{}",
                env.name(),
                seed + i as u64,
                cfg.nodes,
                violations
                    .iter()
                    .map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join("\n  - "),
                faults.join("\n  "),
                trial::stderr_tail(t.dir.path())
            );
            eprintln!("{message}");
            failures.push(message);
        }
        if std::env::var_os("UPSILON_CHAOS_KEEP").is_some() {
            println!("trial {i}: kept {}", t.dir.keep().display());
        }
    }
    let report = totals.report(
        env.name(),
        env.kinds(),
        cfg.nodes,
        seed,
        started.elapsed().as_secs_f64(),
    );
    println!("{report}");
    if let Some(says) = env.server_says() {
        println!("  {says}");
    }
    (totals, failures)
}

/// The grants of a trial whose fence the store had already seen.
fn behind_grants(t: &trial::Trial, used_store_fence: u64) -> usize {
    t.logs
        .iter()
        .flat_map(|l| &l.records)
        .filter(|r| {
            matches!(r, Record::Lock { op, fence, outcome: Seen::Ok, .. }
                if op == "acquire" && (1..=used_store_fence).contains(fence))
        })
        .count()
}

/// Task code run under a fence the store had already seen: the runner must
/// give such a grant back before it runs anything.
fn ran_behind(t: &trial::Trial, used_store_fence: u64) -> Vec<String> {
    t.logs
        .iter()
        .flat_map(|l| l.records.iter().map(move |r| (l, r)))
        .filter_map(|(l, r)| match r {
            Record::Run { task, fence, .. } if *fence <= used_store_fence => Some(format!(
                "S2: {} ran {task} under fence {fence}, which the store had seen before the trial",
                l.node
            )),
            _ => None,
        })
        .collect()
}

async fn survives(env: &mut dyn ClusterBackend) {
    let mut cfg = random_config();
    if env.min_ttl_ms() > cfg.ttl_ms {
        // The same proportions: margin TTL/5, tasks TTL/6.7.
        let scale = env.min_ttl_ms() as f64 / cfg.ttl_ms as f64;
        cfg.ttl_ms = env.min_ttl_ms();
        cfg.margin_ms = (cfg.margin_ms as f64 * scale) as u64;
        cfg.task_ms = (cfg.task_ms as f64 * scale) as u64;
    }
    let trials = env_usize("UPSILON_CHAOS_TRIALS", 2);
    let (totals, failures) = run_trials(env, &cfg, trials).await;
    if env.used_store_fence() > 0 {
        assert!(
            totals.behind_grants >= totals.trials,
            "each trial of a fresh lock in front of a used store starts with a grant behind the store's fence; {} in {} trials",
            totals.behind_grants,
            totals.trials
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} trials broke the invariants; the first:\n{}",
        failures.len(),
        totals.trials,
        failures[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_cluster_survives_faults() {
    survives(&mut Sqlite::new(false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cluster_survives_faults() {
    survives(&mut Pg::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_survives_faults() {
    survives(&mut Redis::start().await).await;
}

/// The lease in Redis, the data version and history in PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lock_postgres_store_survives_faults() {
    let lock = Box::new(Redis::start().await);
    survives(&mut Mixed::new(lock, Box::new(Pg::start().await))).await;
}

/// The lease in PostgreSQL, the data version and history in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lock_redis_store_survives_faults() {
    let lock = Box::new(Pg::start().await);
    survives(&mut Mixed::new(lock, Box::new(Redis::start().await))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_cluster_survives_faults() {
    survives(&mut Etcd::start().await).await;
}

/// The lease in etcd, the data version and history in PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_lock_postgres_store_survives_faults() {
    let lock = Box::new(Etcd::start().await);
    survives(&mut Mixed::new(lock, Box::new(Pg::start().await))).await;
}

/// The lease in PostgreSQL, the data version and history in etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lock_etcd_store_survives_faults() {
    let lock = Box::new(Pg::start().await);
    survives(&mut Mixed::new(lock, Box::new(Etcd::start().await))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_cluster_survives_faults() {
    survives(&mut Kube::start().await).await;
}

/// A holder running one long task, TTL 6 s: its local deadline is far off,
/// so only what the backend does decides whether another node runs the
/// task beside it.
fn one_long_task(loss_signal: bool, plan: Plan) -> Config {
    Config {
        nodes: 3,
        tasks: "1.1:1",
        task_count: 1,
        target: "1.1.0",
        ttl_ms: 6000,
        task_ms: 3000,
        margin_ms: 1200,
        loss_signal,
        wait_out: true,
        plan,
    }
}

/// Runs a negative control's trials: each must show task code of two nodes
/// at once, and nothing else may break.
async fn control_is_caught(env: &mut dyn ClusterBackend, cfg: &Config) {
    let trials = env_usize("UPSILON_CHAOS_CONTROL_TRIALS", 1);
    let (totals, failures) = run_trials(env, cfg, trials).await;
    let unexplained: usize = totals.overlaps.values().map(|o| o.unexplained).sum();
    assert!(
        unexplained >= trials,
        "the negative control found {unexplained} overlaps in {trials} trials; the checker or the fault misses them"
    );
    assert!(
        failures.iter().all(|f| f
            .lines()
            .filter(|l| l.starts_with("  - "))
            .all(|l| l.starts_with("  - E1: "))),
        "the negative control broke more than E1:\n{}",
        failures.join("\n")
    );
}

/// Negative control: a SQLite backend that judges lease expiry by the wall
/// clock (its format 1) hands a live lease over when the wall clock steps
/// forward past the TTL, and the checker must find the two runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_judging_expiry_by_the_wall_clock_overlaps_after_a_step_and_is_caught() {
    let cfg = one_long_task(true, Plan::StepClock { ms: 20_000 });
    control_is_caught(&mut Sqlite::new(true), &cfg).await;
}

/// Negative control: the holder isolated while it runs a task (its traffic
/// held both ways and its sessions terminated on the server, so the others
/// take the lease over before it expires, its session being gone), with
/// the loss signal switched off: it goes on running its task after another
/// node took over, and the checker must find the overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_without_the_loss_signal_overlaps_and_is_caught() {
    let cfg = one_long_task(false, Plan::IsolateHolder { ms: 4000 });
    control_is_caught(&mut Pg::start().await, &cfg).await;
}

/// A Redis lock that keeps nothing across a crash forgets the lease when it
/// crash-restarts while the holder runs a task. The waiting nodes' next
/// grant is behind the PostgreSQL store's fence, which shows that the lock
/// forgot: the node that got it holds it unused for a TTL, by when the old
/// holder has stopped (its renewal was refused), and only then does any node
/// run the task. No overlap, and every invariant holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_lock_that_forgets_its_lease_in_a_crash_still_keeps_e1() {
    let cfg = one_long_task(true, Plan::RestartServer);
    let lock = Box::new(Redis::without_persistence().await);
    let mut env = Mixed::new(lock, Box::new(Pg::start().await));
    let trials = env_usize("UPSILON_CHAOS_CONTROL_TRIALS", 1);
    let (totals, failures) = run_trials(&mut env, &cfg, trials).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        totals.behind_grants >= 2 * trials,
        "each trial's lock starts behind the store and falls behind again in the crash: {} grants behind in {trials} trials",
        totals.behind_grants
    );
}

/// Negative control for the test above: with the grant behind the store
/// given back at once (`--no-wait-out`), a waiting node runs the task while
/// the old holder still runs it, until the old holder's next renewal is
/// refused. The checker must find the overlap; the store's fence keeps
/// everything else.
#[cfg(feature = "negative-controls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgetful_redis_lock_without_the_wait_out_overlaps_and_is_caught() {
    let cfg = Config {
        wait_out: false,
        ..one_long_task(true, Plan::RestartServer)
    };
    let lock = Box::new(Redis::without_persistence().await);
    control_is_caught(&mut Mixed::new(lock, Box::new(Pg::start().await)), &cfg).await;
}

/// A backfill of 10-row batches, 30 ms apart, with room for `faults`
/// faults (each lands after a batch that moved the checkpoint).
fn backfill_shape(faults: usize, ignore_checkpoint: bool) -> backfill::Shape {
    backfill::Shape {
        rows: 40 * (faults as u64 + 4),
        batch: 10,
        pause_ms: 30,
        ignore_checkpoint,
    }
}

async fn backfill_resumes(under: backfill::Under) {
    let faults = env_usize("UPSILON_CHAOS_BACKFILL_FAULTS", 4);
    let trials = env_usize("UPSILON_CHAOS_BACKFILL_TRIALS", 1);
    let mut env = backfill::Backfilled::new(under, backfill_shape(faults, false));
    let t = backfill::run_trials(&mut env, faults, trials).await;
    assert!(
        t.failures.is_empty(),
        "{} of {trials} trials failed; the first:\n{}",
        t.failures.len(),
        t.failures[0]
    );
    assert!(
        t.resumed >= trials,
        "{} attempts resumed from a checkpoint in {trials} trials: the faults missed the backfill",
        t.resumed
    );
}

/// Negative control: every attempt starts from the first row, whatever
/// its checkpoint says; each trial must be caught, and only by the
/// backfill's checks.
async fn backfill_ignoring_its_checkpoint_is_caught(under: backfill::Under) {
    let trials = env_usize("UPSILON_CHAOS_CONTROL_TRIALS", 1);
    let mut env = backfill::Backfilled::new(under, backfill_shape(2, true));
    let t = backfill::run_trials(&mut env, 2, trials).await;
    assert_eq!(
        (t.failures.len(), t.other_violations),
        (trials, 0),
        "each trial of the negative control must break the backfill's checks and nothing else:\n{}",
        t.failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backfill_resumes_from_its_checkpoint_on_postgres() {
    backfill_resumes(backfill::Under::Pg(Box::new(Pg::start().await))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backfill_resumes_from_its_checkpoint_on_sqlite() {
    backfill_resumes(backfill::Under::Sqlite(Sqlite::new(false))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_ignoring_its_checkpoint_is_caught_on_postgres() {
    backfill_ignoring_its_checkpoint_is_caught(backfill::Under::Pg(Box::new(Pg::start().await)))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_ignoring_its_checkpoint_is_caught_on_sqlite() {
    backfill_ignoring_its_checkpoint_is_caught(backfill::Under::Sqlite(Sqlite::new(false))).await;
}
