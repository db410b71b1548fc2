//! What all parts of one trial share: the seeded random source, the backend,
//! the trace, the fault counters, and the record of when task code ran.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use upsilon::testing::{Fault, MemoryBackend};
use upsilon::TaskContext;

use crate::link::Link;

/// splitmix64: small, seedable, good enough for choosing faults.
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn ms(&mut self, max: u64) -> Duration {
        Duration::from_millis(self.below(max + 1))
    }
}

/// Switches that break the protocol on purpose (negative controls).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "negative-controls"), allow(dead_code))]
pub struct Controls {
    /// The store stops checking fences (feature `negative-controls`).
    pub skip_fence_check: bool,
    /// The runner plans from its read before the lease (feature `negative-controls`).
    pub skip_reread: bool,
    /// The holder learns that its session ended
    /// (`SessionModel::detection`); off, it never does (E1's control).
    pub loss_detection: bool,
    /// A grant behind the store's fence is given back at once instead of
    /// being held unused for a TTL (feature `negative-controls`).
    pub skip_wait_out: bool,
}

impl Default for Controls {
    fn default() -> Self {
        Controls {
            skip_fence_check: false,
            skip_reread: false,
            loss_detection: true,
            skip_wait_out: false,
        }
    }
}

/// Which code of a task ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Task,
    Rollback,
}

/// One run of task code, from its first poll to the end of its future.
#[derive(Debug, Clone)]
pub struct Run {
    pub task: String,
    pub code: Code,
    pub fence: u64,
    pub node: String,
    /// The holder's run id: one per process incarnation.
    pub run_id: String,
    pub start: Duration,
    /// When its future ended (returned or was dropped); `None` while it runs.
    pub end: Option<Duration>,
    /// Whether it returned, rather than being cancelled.
    pub returned: bool,
}

impl Run {
    pub fn describe(&self) -> String {
        let code = match self.code {
            Code::Task => "",
            Code::Rollback => "the rollback of ",
        };
        let end = self
            .end
            .map_or("the end".to_owned(), |e| format!("{} ms", e.as_millis()));
        format!(
            "{} (run {}, fence {}) ran {code}{} from {} ms to {end}",
            self.node,
            self.run_id,
            self.fence,
            self.task,
            self.start.as_millis()
        )
    }
}

/// What a trial counts: the faults injected and what the cluster did about them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Count {
    Crashes,
    Expiries,
    ClockJumps,
    SessionEndsUnderTask,
    SessionEndsUnderRollback,
    SessionEndsIdle,
    LateAcquireReplies,
    LateGrantReplies,
    LostAcquireReplies,
    LostGrantReplies,
    RenewalOutages,
    LockAmnesias,
    InjectedErrors,
    Delays,
    LostReplies,
    TaskFailures,
    RollbackFailures,
    FailedForGood,
    RollbackRuns,
    CodeCancelled,
    StoppedSignalled,
    StoppedDeadline,
    RenewalsRefused,
    StaleRefused,
    BehindGrants,
    StoreMoved,
    Excused,
}

impl Count {
    pub const ALL: [Count; 27] = [
        Count::Crashes,
        Count::Expiries,
        Count::ClockJumps,
        Count::SessionEndsUnderTask,
        Count::SessionEndsUnderRollback,
        Count::SessionEndsIdle,
        Count::LateAcquireReplies,
        Count::LateGrantReplies,
        Count::LostAcquireReplies,
        Count::LostGrantReplies,
        Count::RenewalOutages,
        Count::LockAmnesias,
        Count::InjectedErrors,
        Count::Delays,
        Count::LostReplies,
        Count::TaskFailures,
        Count::RollbackFailures,
        Count::FailedForGood,
        Count::RollbackRuns,
        Count::CodeCancelled,
        Count::StoppedSignalled,
        Count::StoppedDeadline,
        Count::RenewalsRefused,
        Count::StaleRefused,
        Count::BehindGrants,
        Count::StoreMoved,
        Count::Excused,
    ];

    /// Whether this counts an injected fault (the rest count what followed).
    pub fn injected(self) -> bool {
        self <= Count::RollbackFailures
    }

    pub fn label(self) -> &'static str {
        match self {
            Count::Crashes => "crashes",
            Count::Expiries => "forced lease expiries",
            Count::ClockJumps => "backend clock jumps",
            Count::SessionEndsUnderTask => "session ends under a running task",
            Count::SessionEndsUnderRollback => "session ends under a running rollback",
            Count::SessionEndsIdle => "session ends with no task code running",
            Count::LateAcquireReplies => "late acquire replies (DelayReply)",
            Count::LateGrantReplies => "of which grants",
            Count::LostAcquireReplies => "lost acquire replies (LoseReply)",
            Count::LostGrantReplies => "of which grants",
            Count::RenewalOutages => "renewal outages past the local deadline",
            Count::LockAmnesias => "locks apart from the store that forgot their state",
            Count::InjectedErrors => "injected errors",
            Count::Delays => "delays",
            Count::LostReplies => "lost replies (any call)",
            Count::TaskFailures => "injected task failures",
            Count::RollbackFailures => "injected rollback failures",
            Count::FailedForGood => "tasks failed for good",
            Count::RollbackRuns => "rollback runs",
            Count::CodeCancelled => "task code cancelled",
            Count::StoppedSignalled => "holders stopped by the loss signal",
            Count::StoppedDeadline => "holders stopped at the local deadline",
            Count::RenewalsRefused => "renewals refused",
            Count::StaleRefused => "stale-fence writes refused",
            Count::BehindGrants => {
                "grants behind the store's fence (given back, the lock raised a TTL later)"
            }
            Count::StoreMoved => "lease requests answered that the store moved",
            Count::Excused => "E1 overlaps after a cut-short lease (excused)",
        }
    }
}

/// Per [`Count`], how many.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts(pub BTreeMap<Count, u64>);

impl Counts {
    pub fn add(&mut self, other: &Counts) {
        for (k, n) in &other.0 {
            *self.0.entry(*k).or_default() += n;
        }
    }
    pub fn get(&self, k: Count) -> u64 {
        self.0.get(&k).copied().unwrap_or(0)
    }
}

/// The lock forgot its state.
#[derive(Debug, Clone, Copy)]
pub struct Amnesia {
    /// How many grants the backend had logged by then.
    pub grants: usize,
    /// The store's fence then.
    pub store_fence: u64,
}

/// What all parts of one trial share.
pub struct World {
    pub start: Instant,
    pub rng: Mutex<Rng>,
    pub backend: Arc<MemoryBackend>,
    pub faults_on: AtomicBool,
    pub trace: Mutex<Vec<String>>,
    pub counts: Mutex<Counts>,
    /// Every run of task code.
    pub runs: Mutex<Vec<Run>>,
    /// The task that fails half its attempts in this trial, if any.
    pub flaky: Option<&'static str>,
    /// Writes refused as a protocol violation (`Rejected`), with who got it.
    pub rejected: Mutex<Vec<String>>,
    /// S7 violations seen at READY.
    pub ready_violations: Mutex<Vec<String>>,
    /// Per node: the link and abort handle of its current run.
    pub running: Mutex<BTreeMap<usize, (Link, tokio::task::AbortHandle)>>,
    /// A fault for the next grant request that reaches the backend.
    pub armed: Mutex<Option<Fault>>,
    /// Renewals fail until then (virtual time).
    pub renew_outage_until: Mutex<Option<Duration>>,
    /// Leases whose backend expiry came early (forced expiry, forward clock
    /// jumps above the margin), with why: their holders were, to the
    /// backend, paused past their safety margin.
    pub cut_short: Mutex<BTreeMap<u64, String>>,
    /// The fences whose holder's session was ended.
    pub sessions_ended: Mutex<BTreeSet<u64>>,
    /// Per fence, the forward clock jumps (ms) while it was live.
    pub jumped: Mutex<BTreeMap<u64, i64>>,
    /// The lock is kept apart from the store
    /// (`MemoryBackend::set_lock_apart`), and may forget its state.
    pub lock_apart: bool,
    /// Each time the lock forgot its state.
    pub amnesias: Mutex<Vec<Amnesia>>,
    /// Per (run id, fence): the latest instant that run's local deadline can
    /// be, from its successful grant and renewal calls.
    pub deadlines: Mutex<BTreeMap<(String, u64), Duration>>,
}

impl World {
    pub fn new(
        seed: u64,
        backend: Arc<MemoryBackend>,
        flaky: Option<&'static str>,
        lock_apart: bool,
    ) -> World {
        World {
            start: Instant::now(),
            rng: Mutex::new(Rng(seed)),
            backend,
            faults_on: AtomicBool::new(true),
            trace: Mutex::default(),
            counts: Mutex::default(),
            runs: Mutex::default(),
            flaky,
            rejected: Mutex::default(),
            ready_violations: Mutex::default(),
            running: Mutex::default(),
            armed: Mutex::default(),
            renew_outage_until: Mutex::default(),
            cut_short: Mutex::default(),
            sessions_ended: Mutex::default(),
            jumped: Mutex::default(),
            lock_apart,
            amnesias: Mutex::default(),
            deadlines: Mutex::default(),
        }
    }
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }
    pub fn log(&self, line: impl AsRef<str>) {
        let t = self.now().as_millis();
        lock(&self.trace).push(format!("{t:>7} ms  {}", line.as_ref()));
    }
    pub fn rng<T>(&self, f: impl FnOnce(&mut Rng) -> T) -> T {
        f(&mut lock(&self.rng))
    }
    pub fn count(&self, k: Count) {
        *lock(&self.counts).0.entry(k).or_default() += 1;
    }
    /// Records that task code starts now; the guard records its end.
    pub fn begin(self: &Arc<World>, ctx: &TaskContext) -> RunGuard {
        let code = if ctx.task().rollback {
            Code::Rollback
        } else {
            Code::Task
        };
        let mut runs = lock(&self.runs);
        runs.push(Run {
            task: ctx.task().id.clone(),
            code,
            fence: ctx.fence(),
            node: ctx.holder().host.clone(),
            run_id: ctx.holder().run_id.clone(),
            start: self.now(),
            end: None,
            returned: false,
        });
        RunGuard {
            world: self.clone(),
            index: runs.len() - 1,
        }
    }
    /// The runs of task code in progress now.
    pub fn in_progress(&self) -> Vec<Run> {
        lock(&self.runs)
            .iter()
            .filter(|r| r.end.is_none())
            .cloned()
            .collect()
    }
    /// Extends what `run_id`'s local deadline under `fence` can be: the
    /// runner counts it from before the call at `called`.
    pub fn deadline_from(&self, run_id: &str, fence: u64, called: Duration) {
        let by = called + crate::TTL - crate::MARGIN;
        let mut d = lock(&self.deadlines);
        let e = d.entry((run_id.to_owned(), fence)).or_insert(by);
        *e = (*e).max(by);
    }
}

/// Ends a [`Run`] when the task's future ends, however it ends.
pub struct RunGuard {
    world: Arc<World>,
    index: usize,
}

impl RunGuard {
    /// The task code returned (it was not cancelled).
    pub fn returned(&self) {
        lock(&self.world.runs)[self.index].returned = true;
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        let now = self.world.now();
        let mut runs = lock(&self.world.runs);
        let run = &mut runs[self.index];
        run.end = Some(now);
        let cancelled = !run.returned;
        drop(runs);
        if cancelled {
            self.world.count(Count::CodeCancelled);
        }
    }
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
