//! The killed-backfill trials: task t1 of the nodes is a batched backfill
//! (`upsilon_tests::backfill`) over a table the harness fills before each
//! trial; its holder is killed, paused past the TTL or (PostgreSQL) has its
//! sessions terminated in the middle of it, again and again
//! (`backfill_faults.rs`), then it finishes. The checker reads the
//! processed log and the store's history:
//!
//! - every row processed;
//! - PostgreSQL (`run_batches`): each row exactly once;
//! - SQLite (the plain batch loop): at most one batch done again per
//!   attempt, and no more such batches than takeovers (attempts after the
//!   first, from the history);
//! - each attempt's first row is the one after the checkpoint the previous
//!   attempt's history row shows (the first row if it has none), and the
//!   checkpoints of successive attempts never go back;
//! - E1 and the rest of `check.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use upsilon::backend::{AttemptKind, HistoryEntry, Lock, Store};
use upsilon::BatchPosition;
use upsilon_tests::backfill::{self, Processed};
use upsilon_tests::fault_proxy::FaultProxy;

use crate::cluster::{ClusterBackend, Pg, Sqlite};
use crate::trial::{self, Config, Kind, Plan};

/// The backfill's shape: rows, rows per batch, pause after each batch.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub rows: u64,
    pub batch: u64,
    pub pause_ms: u64,
    /// Negative control: each attempt starts from the first row.
    pub ignore_checkpoint: bool,
}

/// The backend under the backfill.
pub enum Under {
    Pg(Box<Pg>),
    Sqlite(Sqlite),
}

/// A backend whose nodes run the backfill, its tables made for each trial.
pub struct Backfilled {
    pub under: Under,
    pub shape: Shape,
    trial: usize,
}

impl Backfilled {
    pub fn new(under: Under, shape: Shape) -> Backfilled {
        Backfilled {
            under,
            shape,
            trial: 0,
        }
    }

    fn inner(&self) -> &dyn ClusterBackend {
        match &self.under {
            Under::Pg(b) => &**b,
            Under::Sqlite(b) => b,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn ClusterBackend {
        match &mut self.under {
            Under::Pg(b) => &mut **b,
            Under::Sqlite(b) => b,
        }
    }

    /// Exactly once (PostgreSQL's same-transaction batches) or at most one
    /// batch again per takeover.
    pub fn exactly_once(&self) -> bool {
        matches!(self.under, Under::Pg(_))
    }

    fn sqlite_db(&self, s: &Sqlite) -> PathBuf {
        s.dir
            .path()
            .join(format!("trial-{}.backfill.db", self.trial))
    }

    async fn pg_client(pg: &Pg) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&pg.harness_url(), tokio_postgres::NoTls)
            .await
            .expect("the harness connects");
        tokio::spawn(conn);
        client
    }

    /// The trial's processed log and, per row, how often its data was done
    /// (SQLite: 1 if filled).
    pub async fn processed(&self) -> (Vec<Processed>, Vec<i64>) {
        match &self.under {
            Under::Pg(pg) => backfill::pg_processed(&Self::pg_client(pg).await)
                .await
                .expect("reading the backfill's tables"),
            Under::Sqlite(s) => backfill::sqlite_processed(&self.sqlite_db(s))
                .expect("reading the backfill's tables"),
        }
    }
}

#[async_trait]
impl ClusterBackend for Backfilled {
    fn name(&self) -> &'static str {
        self.inner().name()
    }
    async fn fresh(&mut self, trial: usize, nodes: &[String]) {
        self.trial = trial;
        self.inner_mut().fresh(trial, nodes).await;
        match &self.under {
            Under::Pg(pg) => Self::pg_client(pg)
                .await
                .batch_execute(&backfill::pg_setup(self.shape.rows))
                .await
                .expect("the backfill's tables"),
            Under::Sqlite(s) => backfill::sqlite_setup(&self.sqlite_db(s), self.shape.rows)
                .expect("the backfill's tables"),
        }
    }
    fn node_url(&self, node: &str) -> String {
        self.inner().node_url(node)
    }
    fn node_args(&self, node: &str) -> Vec<String> {
        let s = self.shape;
        let mut args = self.inner().node_args(node);
        args.extend(
            [
                "--backfill",
                &s.rows.to_string(),
                "--batch-size",
                &s.batch.to_string(),
                "--batch-pause-ms",
                &s.pause_ms.to_string(),
            ]
            .map(str::to_owned),
        );
        if let Under::Sqlite(sq) = &self.under {
            args.push("--backfill-db".to_owned());
            args.push(self.sqlite_db(sq).display().to_string());
        }
        if s.ignore_checkpoint {
            args.push("--backfill-ignores-checkpoint".to_owned());
        }
        args
    }
    fn lock(&self) -> Arc<dyn Lock> {
        self.inner().lock()
    }
    fn store(&self) -> Arc<dyn Store> {
        self.inner().store()
    }
    fn kinds(&self) -> &'static [Kind] {
        self.inner().kinds()
    }
    async fn restart_server(&mut self) {
        self.inner_mut().restart_server().await
    }
    async fn terminate_lease_session(&self) -> u64 {
        self.inner().terminate_lease_session().await
    }
    async fn terminate_sessions_of(&self, node: &str) -> u64 {
        self.inner().terminate_sessions_of(node).await
    }
    async fn step_clock(&self, ms: i64) -> bool {
        self.inner().step_clock(ms).await
    }
    async fn idle_session_timeout(&self, timeout: Option<Duration>) -> bool {
        self.inner().idle_session_timeout(timeout).await
    }
    fn proxy(&self, node: &str) -> Option<&FaultProxy> {
        self.inner().proxy(node)
    }
    fn server_says(&self) -> Option<String> {
        self.inner().server_says()
    }
}

/// What the checker found in one backfill trial.
#[derive(Debug, Default)]
pub struct Found {
    pub violations: Vec<String>,
    /// Attempts of the backfill in the history.
    pub attempts: usize,
    /// Attempts that resumed from a checkpoint.
    pub resumed: usize,
    /// Batches that did rows some batch had done before.
    pub redone_batches: usize,
    /// Rows done more than once (log rows beyond each row's first).
    pub redone_rows: usize,
}

/// The last key of a history row's checkpoint.
fn last_key(row: &HistoryEntry) -> Result<Option<i64>, String> {
    let Some(c) = &row.checkpoint else {
        return Ok(None);
    };
    serde_json::from_str::<BatchPosition<i64>>(&c.position)
        .map(|p| Some(p.last))
        .map_err(|e| {
            format!(
                "history: attempt {}'s checkpoint {:?} does not read: {e}",
                row.attempt, c.position
            )
        })
}

/// Checks a trial's processed log `log` and per-row counts `done` against
/// the store's `history`.
pub fn check(
    shape: Shape,
    exactly_once: bool,
    history: &[HistoryEntry],
    log: &[Processed],
    done: &[i64],
) -> Found {
    let mut f = Found::default();
    // Every row processed, and (PostgreSQL) exactly once.
    let seen: BTreeSet<i64> = log.iter().map(|p| p.id).collect();
    let missing = (1..=shape.rows as i64)
        .filter(|id| !seen.contains(id))
        .count();
    let undone = done.iter().filter(|d| **d == 0).count();
    if missing > 0 || undone > 0 || done.len() as u64 != shape.rows {
        f.violations.push(format!(
            "backfill: {missing} of {} rows never in the processed log, {undone} rows not done",
            shape.rows
        ));
    }
    let mut times: BTreeMap<i64, usize> = BTreeMap::new();
    let mut redone: BTreeSet<(u64, u32, u64)> = BTreeSet::new();
    let mut redone_per_attempt: BTreeMap<(u64, u32), BTreeSet<u64>> = BTreeMap::new();
    for p in log {
        let n = times.entry(p.id).or_default();
        *n += 1;
        if *n > 1 {
            f.redone_rows += 1;
            redone.insert((p.fence, p.attempt, p.batch));
            redone_per_attempt
                .entry((p.fence, p.attempt))
                .or_default()
                .insert(p.batch);
        }
    }
    f.redone_batches = redone.len();
    if exactly_once {
        let twice: Vec<String> = times
            .iter()
            .filter(|(_, n)| **n > 1)
            .take(5)
            .map(|(id, n)| {
                let by: Vec<String> = log
                    .iter()
                    .filter(|p| p.id == *id)
                    .map(|p| {
                        format!(
                            "{} fence {} attempt {} batch {}",
                            p.node, p.fence, p.attempt, p.batch
                        )
                    })
                    .collect();
                format!("row {id} {n} times ({})", by.join("; "))
            })
            .collect();
        let twice_done = done.iter().filter(|d| **d > 1).count();
        if !twice.is_empty() || twice_done > 0 {
            f.violations.push(format!(
                "backfill exactly once: {} rows processed more than once, {twice_done} rows' data done more than once; {}",
                f.redone_rows,
                twice.join(", ")
            ));
        }
    }

    // The backfill's attempts, as the history shows them.
    let rows: Vec<&HistoryEntry> = history
        .iter()
        .filter(|h| h.key.id == "t1" && h.kind == AttemptKind::Run)
        .collect();
    f.attempts = rows.len();
    let takeovers = rows.len().saturating_sub(1);
    if !exactly_once {
        if f.redone_batches > takeovers {
            f.violations.push(format!(
                "backfill: {} batches done again ({} rows) after {takeovers} takeovers",
                f.redone_batches, f.redone_rows
            ));
        }
        for ((fence, attempt), batches) in &redone_per_attempt {
            if batches.len() > 1 {
                f.violations.push(format!(
                    "backfill: attempt {attempt} (fence {fence}) did {} batches that were done before: {batches:?}",
                    batches.len()
                ));
            }
        }
    }

    // Each attempt starts after the checkpoint the previous one reached.
    let mut previous: Option<i64> = None;
    for row in &rows {
        let reached = match last_key(row) {
            Ok(k) => k,
            Err(e) => {
                f.violations.push(e);
                None
            }
        };
        let first = log
            .iter()
            .filter(|p| p.attempt == row.attempt && p.fence == row.fence)
            .map(|p| p.id)
            .min();
        if let Some(first) = first {
            let expected = previous.map_or(1, |k| k + 1);
            if previous.is_some() {
                f.resumed += 1;
            }
            if first != expected {
                f.violations.push(format!(
                    "backfill resume: attempt {} (fence {}) started at row {first}, but the previous attempt's checkpoint is {previous:?}: it should have started at row {expected}",
                    row.attempt, row.fence
                ));
            }
        }
        if let (Some(p), Some(r)) = (previous, reached) {
            if r < p {
                f.violations.push(format!(
                    "backfill: attempt {}'s checkpoint went back from row {p} to {r}",
                    row.attempt
                ));
            }
        }
        previous = reached.or(previous);
    }
    // Rows logged by an attempt the history does not have.
    let known: BTreeSet<(u64, u32)> = rows.iter().map(|r| (r.fence, r.attempt)).collect();
    if let Some(p) = log.iter().find(|p| !known.contains(&(p.fence, p.attempt))) {
        f.violations.push(format!(
            "backfill: row {} was processed by {} under fence {} attempt {}, which the history does not have",
            p.id, p.node, p.fence, p.attempt
        ));
    }
    f
}

/// A backfill trial's run: 3 nodes, t1 the backfill, TTL 1 s.
pub fn config(faults: usize) -> Config {
    Config {
        nodes: 3,
        tasks: "1.1:1",
        task_count: 1,
        target: "1.1.0",
        ttl_ms: 1000,
        task_ms: 150,
        margin_ms: 200,
        loss_signal: true,
        wait_out: true,
        plan: Plan::Backfill { faults },
    }
}

/// What the backfill trials of one run add up to.
#[derive(Debug, Default)]
pub struct Totals {
    pub trials: usize,
    pub faults: BTreeMap<Kind, usize>,
    pub attempts: usize,
    pub resumed: usize,
    pub redone_batches: usize,
    pub redone_rows: usize,
    /// Violations of the backfill checks, and of `check.rs`'s.
    pub backfill_violations: usize,
    pub other_violations: usize,
    /// The failures' messages.
    pub failures: Vec<String>,
}

/// Runs `trials` backfill trials against `env` with `faults` faults each.
pub async fn run_trials(env: &mut Backfilled, faults: usize, trials: usize) -> Totals {
    let cfg = config(faults);
    let seed = crate::first_seed();
    let started = std::time::Instant::now();
    let mut totals = Totals::default();
    for i in 0..trials {
        let t = trial::run(env, &cfg, i, seed + i as u64).await;
        let c = crate::check::check(&cfg, &t);
        let (log, done) = env.processed().await;
        let f = check(env.shape, env.exactly_once(), &t.history, &log, &done);
        if std::env::var_os("UPSILON_CHAOS_VERBOSE").is_some() {
            for e in &t.events {
                println!(
                    "backfill trial {i}: {} {} {}",
                    e.kind.name(),
                    e.node.as_deref().unwrap_or("server"),
                    e.detail
                );
            }
            for h in t.history.iter().filter(|h| h.key.id == "t1") {
                println!(
                    "backfill trial {i}: attempt {} {} fence {} by {} {}, checkpoint {}",
                    h.attempt,
                    h.kind.as_str(),
                    h.fence,
                    h.holder.pod.as_deref().unwrap_or("?"),
                    h.state.as_str(),
                    h.checkpoint
                        .as_ref()
                        .map_or("none", |c| c.position.as_str())
                );
            }
        }
        totals.trials += 1;
        for e in &t.events {
            *totals.faults.entry(e.kind).or_default() += 1;
        }
        totals.attempts += f.attempts;
        totals.resumed += f.resumed;
        totals.redone_batches += f.redone_batches;
        totals.redone_rows += f.redone_rows;
        totals.backfill_violations += f.violations.len();
        let others: Vec<&String> = t.violations.iter().chain(&c.violations).collect();
        totals.other_violations += others.len();
        if !f.violations.is_empty() || !others.is_empty() {
            let faults: Vec<String> = t
                .events
                .iter()
                .map(|e| {
                    format!(
                        "{} {} {}",
                        e.kind.name(),
                        e.node.as_deref().unwrap_or("server"),
                        e.detail
                    )
                })
                .collect();
            let message = format!(
                "{} backfill trial {i} (UPSILON_CHAOS_SEED={}):\n  - {}\nfaults:\n  {}\n{}",
                env.name(),
                seed + i as u64,
                f.violations
                    .iter()
                    .chain(others)
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join("\n  - "),
                faults.join("\n  "),
                trial::stderr_tail(t.dir.path())
            );
            totals.failures.push(message);
        }
        if std::env::var_os("UPSILON_CHAOS_KEEP").is_some() {
            println!("backfill trial {i}: kept {}", t.dir.keep().display());
        }
    }
    let faults: Vec<String> = totals
        .faults
        .iter()
        .map(|(k, n)| format!("{n} {}", k.name()))
        .collect();
    println!(
        "backfill on {}{}: {} trials x {} nodes (seeds {seed}..), {} rows in batches of {}; faults: {}; {} attempts, {} resumed from a checkpoint; {} batches done again ({} rows); {} backfill violations, {} others; {:.1} s",
        env.name(),
        if env.shape.ignore_checkpoint { " (checkpoint ignored)" } else { "" },
        totals.trials,
        cfg.nodes,
        env.shape.rows,
        env.shape.batch,
        faults.join(", "),
        totals.attempts,
        totals.resumed,
        totals.redone_batches,
        totals.redone_rows,
        totals.backfill_violations,
        totals.other_violations,
        started.elapsed().as_secs_f64()
    );
    totals
}
