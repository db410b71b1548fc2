//! One simulated rollout: a canary upgrades while every other node starts
//! and waits, all of them the real runner on one in-memory backend reached
//! through one modelled store server ([`upsilon_tests::costed`]), in
//! virtual time; and the checks of what its nodes did.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use upsilon::backend::Backend;
use upsilon::testing::MemoryBackend;
use upsilon::{Error, Holder, Outcome, Status, Task, TaskContext, TaskFuture, Upsilon, Version};
use upsilon_tests::costed::{CostModel, Costed, Counts, Event, Server, Wakeups};

pub const SERVICE: &str = "accounts";
/// The data version before the rollout.
pub const FROM: &str = "1.0";
/// The version every node of the rollout runs.
pub const APP: &str = "1.1";
/// How long the canary's one task takes.
pub const TASK_TIME: Duration = Duration::from_secs(2);
/// The fewest store calls a waiting node can make: one read at start-up and
/// one request for the lease; the wake-up carries the canary's notice, so
/// no read follows it.
pub const CALLS_PER_WAITER: u64 = 2;
/// The most store calls the canary makes: the read, the request for the
/// lease, the claim, the task's start, its completion with the data
/// version, the release, and one more read if its request came late.
pub const CANARY_CALLS: u64 = 7;

/// One node of a rollout: what its run returned and what it called.
#[derive(Debug)]
pub struct Node {
    pub holder: Holder,
    pub result: Result<Outcome, Error>,
    /// When its run ended (virtual time).
    pub ready_at: Instant,
    pub events: Vec<Event>,
}

/// A finished rollout.
#[derive(Debug)]
pub struct Run {
    pub nodes: usize,
    pub model: CostModel,
    pub canary: Node,
    pub waiters: Vec<Node>,
    /// Times the task's code ran.
    pub task_runs: u64,
    /// Leases granted during the rollout.
    pub grants: usize,
    /// The canary's write of data version [`APP`]: its place in the order
    /// of events, and when it committed.
    pub commit: Option<(u64, Instant)>,
    /// The wall-clock time the simulation took.
    pub wall: std::time::Duration,
}

fn app() -> Version {
    upsilon::parse_version(APP).expect("a version")
}

fn holder(n: usize) -> Holder {
    Holder {
        host: format!("node-{n}"),
        pod: None,
        pid: n as u32,
        run_id: format!("run-{n}"),
    }
}

/// The rollout's one task: takes [`TASK_TIME`], counts its runs.
fn task(runs: &Arc<AtomicU64>) -> Task {
    Task::new(APP, 1, "backfill", body(runs.clone())).expect("a valid task")
}

fn body(
    runs: Arc<AtomicU64>,
) -> impl for<'a> Fn(&'a mut TaskContext) -> TaskFuture<'a> + Send + Sync {
    move |_: &mut TaskContext| -> TaskFuture<'_> {
        let runs = runs.clone();
        Box::pin(async move {
            tokio::time::sleep(TASK_TIME).await;
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }
}

/// Rolls `nodes` nodes out from [`FROM`] to [`APP`] on a current-thread
/// runtime in paused time, seeded so that it replays exactly.
pub fn simulate(nodes: usize, model: CostModel, wakeups: Wakeups) -> Run {
    assert!(nodes >= 2, "a rollout needs a canary and a waiting node");
    let wall = std::time::Instant::now();
    upsilon::testing::seed_thread_rng(Some(nodes as u64));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let mut run = runtime.block_on(rollout(nodes, model, wakeups));
    upsilon::testing::seed_thread_rng(None);
    run.wall = wall.elapsed();
    run
}

/// The canary starts first; once it runs its task, every other node
/// starts at once.
async fn rollout(nodes: usize, model: CostModel, wakeups: Wakeups) -> Run {
    let memory = MemoryBackend::new();
    let shared: Arc<dyn Backend> = memory.clone();
    upsilon::baseline(shared.clone(), shared.clone(), SERVICE, FROM)
        .await
        .expect("the store baselined");
    let grants_before = memory.grants().len();
    let server = Server::new(model);
    let runs = Arc::new(AtomicU64::new(0));
    let node = |n: usize| {
        let backend = Costed::new(shared.clone(), server.clone(), wakeups);
        let up = Upsilon::builder()
            .service(SERVICE)
            .app_version(APP)
            .backend(backend.clone())
            .holder(holder(n))
            .tasks([task(&runs)])
            .build()
            .expect("a valid runner");
        (up, backend)
    };
    let (canary, backend) = node(0);
    let mut status = canary.status();
    let canary = tokio::spawn(drive(canary, backend));
    // Past waiting: running its task, or done if it could not.
    let _ = status
        .wait_for(|s| !matches!(s, Status::Starting | Status::Waiting { .. }))
        .await;
    let waiters: Vec<_> = (1..nodes)
        .map(|n| {
            let (up, backend) = node(n);
            tokio::spawn(drive(up, backend))
        })
        .collect();
    let mut done = Vec::with_capacity(waiters.len());
    for w in waiters {
        done.push(w.await.expect("a node's run panicked"));
    }
    let canary = canary.await.expect("the canary's run panicked");
    let commit = canary
        .events
        .iter()
        .rfind(|e| e.data_version.as_ref() == Some(&app()))
        .map(|e| (e.seq, e.at));
    Run {
        nodes,
        model,
        canary,
        waiters: done,
        task_runs: runs.load(Ordering::SeqCst),
        grants: memory.grants().len() - grants_before,
        commit,
        wall: Duration::ZERO,
    }
}

async fn drive(up: Upsilon, backend: Arc<Costed>) -> Node {
    let result = up.run().await;
    Node {
        holder: up.holder().clone(),
        result,
        ready_at: Instant::now(),
        events: backend.events(),
    }
}

impl Run {
    /// The calls of each waiting node, counted.
    pub fn per_waiter(&self) -> impl Iterator<Item = Counts> + '_ {
        self.waiters.iter().map(|w| Counts::of(&w.events))
    }

    /// The waiting nodes' calls, summed.
    pub fn waiters_total(&self) -> Counts {
        let mut total = Counts::default();
        for c in self.per_waiter() {
            total.add(&c);
        }
        total
    }

    /// The most of each kind of call any one waiting node made.
    pub fn waiter_max(&self) -> Counts {
        self.per_waiter().fold(Counts::default(), |m, c| Counts {
            reads: m.reads.max(c.reads),
            lease: m.lease.max(c.lease),
            writes: m.writes.max(c.writes),
            waits: m.waits.max(c.waits),
            woken: m.woken.max(c.woken),
            timed_out: m.timed_out.max(c.timed_out),
        })
    }

    /// Every node's store calls, the canary's included.
    pub fn store_calls(&self) -> u64 {
        self.waiters_total().store_calls() + Counts::of(&self.canary.events).store_calls()
    }

    /// From the canary's commit to the last waiting node READY.
    pub fn last_ready_after_commit(&self) -> Option<Duration> {
        let (_, at) = self.commit?;
        let last = self.waiters.iter().map(|w| w.ready_at).max()?;
        Some(last.saturating_duration_since(at))
    }

    /// The latest the last waiting node may become READY after the commit
    /// if each is woken once and then calls nothing: the server delivers a
    /// wake-up to every waiting node (and serves the canary's release among
    /// them), and the last delivery takes its network leg and a timer tick
    /// on top.
    pub fn ready_bound(&self) -> Duration {
        let m = &self.model;
        let waiters = (self.nodes - 1) as u32;
        let busy = m.wake * waiters / m.cores as u32 + m.lease;
        busy + m.wake + m.one_way * 3 + Duration::from_millis(2)
    }
}

/// The rules each waiting node keeps, each with the nodes that broke it.
#[derive(Default)]
struct Breaches {
    rules: BTreeMap<&'static str, (usize, String)>,
}

impl Breaches {
    fn add(&mut self, rule: &'static str, node: &Holder, detail: String) {
        let entry = self
            .rules
            .entry(rule)
            .or_insert_with(|| (0, format!("{}: {detail}", node.host)));
        entry.0 += 1;
    }

    fn into_lines(self, of: usize) -> Vec<String> {
        self.rules
            .into_iter()
            .map(|(rule, (n, example))| {
                format!("{rule}: {n} of {of} waiting nodes, e.g. {example}")
            })
            .collect()
    }
}

/// What a user of the rollout would see go wrong, one line per rule
/// broken: a node not READY at [`APP`], the task run other than once, a
/// lease granted more than once, a waiting node that polled (waited more
/// than once before the commit, or was woken or timed out before it),
/// that was not woken exactly once by the commit, that called the store
/// after its wake-up, that made more than
/// [`CALLS_PER_WAITER`] store calls, or that became READY later than
/// [`Run::ready_bound`] after the commit.
pub fn check(run: &Run) -> Vec<String> {
    let mut out = Vec::new();
    let mut b = Breaches::default();
    let canary = &run.canary;
    match &canary.result {
        Ok(Outcome::Upgraded { report }) if report.to == Some(app()) => {}
        other => out.push(format!("the canary did not upgrade: {other:?}")),
    }
    let canary_calls = Counts::of(&canary.events).store_calls();
    if canary_calls > CANARY_CALLS {
        out.push(format!(
            "the canary made {canary_calls} store calls, above {CANARY_CALLS}"
        ));
    }
    if run.task_runs != 1 {
        out.push(format!("the task ran {} times, not once", run.task_runs));
    }
    if run.grants != 1 {
        out.push(format!("{} leases granted, not one", run.grants));
    }
    let Some((commit, committed_at)) = run.commit else {
        out.push(format!("the canary never committed data version {APP}"));
        return out;
    };
    let bound = run.ready_bound();
    for w in &run.waiters {
        match &w.result {
            Ok(Outcome::WaitedForOther {
                holder: Some(h),
                data_version: Some(v),
                ..
            }) if *h == canary.holder && *v == app() => {}
            other => b.add(
                "not READY after waiting for the canary",
                &w.holder,
                format!("{other:?}"),
            ),
        }
        let (before, after): (Vec<&Event>, Vec<&Event>) =
            w.events.iter().partition(|e| e.seq < commit);
        let (before, after) = (Counts::of(before), Counts::of(after));
        if before.waits == 0 {
            b.add(
                "not waiting at the commit",
                &w.holder,
                format!("{before:?}"),
            );
        }
        if before.waits > 1 || before.woken > 0 || before.timed_out > 0 {
            b.add(
                "waited more than once before the commit (polling, or woken early)",
                &w.holder,
                format!("{before:?}"),
            );
        }
        if after.woken != 1 || after.timed_out > 0 || after.waits > 0 {
            b.add(
                "not woken exactly once by the commit",
                &w.holder,
                format!("after the commit {after:?}"),
            );
        }
        if after.store_calls() > 0 {
            b.add(
                "a store call after the wake-up",
                &w.holder,
                format!("after the commit {after:?}"),
            );
        }
        let calls = before.store_calls() + after.store_calls();
        if calls > CALLS_PER_WAITER {
            b.add(
                "store calls per waiting node",
                &w.holder,
                format!("{calls}, above {CALLS_PER_WAITER}"),
            );
        }
        let took = w.ready_at.saturating_duration_since(committed_at);
        if took > bound {
            b.add(
                "late: READY past one wake-up per waiting node",
                &w.holder,
                format!("READY {took:?} after the commit, bound {bound:?}"),
            );
        }
    }
    let most = CALLS_PER_WAITER * run.waiters.len() as u64 + CANARY_CALLS;
    if run.store_calls() > most {
        out.push(format!(
            "{} store calls in all, above {most} ({CALLS_PER_WAITER} per waiting node and {CANARY_CALLS} for the canary)",
            run.store_calls()
        ));
    }
    out.extend(b.into_lines(run.waiters.len()));
    out
}

/// The table's header and one row per rollout.
pub fn table(runs: &[Run]) -> String {
    let mut t = String::from(
        "| N | calls per waiting node: reads, lease calls, waits (max) | store calls in all (per node) | canary's commit to last READY | bound | wall time |\n\
         | - | - | - | - | - | - |\n",
    );
    for r in runs {
        let n = r.waiters.len() as f64;
        let total = r.waiters_total();
        let max = r.waiter_max();
        let _ = writeln!(
            t,
            "| {} | {:.2}, {:.2}, {:.2} ({}, {}, {}) | {} ({:.2}) | {} | {:.1} ms | {:.1} s |",
            r.nodes,
            total.reads as f64 / n,
            total.lease as f64 / n,
            total.waits as f64 / n,
            max.reads,
            max.lease,
            max.waits,
            r.store_calls(),
            r.store_calls() as f64 / r.nodes as f64,
            r.last_ready_after_commit()
                .map_or("-".to_owned(), |d| format!("{} ms", d.as_millis())),
            r.ready_bound().as_secs_f64() * 1e3,
            r.wall.as_secs_f64(),
        );
    }
    t
}
