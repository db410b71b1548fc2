//! A model of the Upsilon protocol (docs/DESIGN.md, steps 1-7) for the
//! stateright model checker: three nodes, three tasks, crashes, restarts,
//! lease expiry, a lease tied to its holder's session, and a lost reply to a
//! grant, with the invariants S1-S7, E1 and L2/L3 as properties.
//!
//! Every protocol step of every node is one atomic action, as the runner
//! (`upsilon/src/runner`) takes them: preflight read, try-acquire,
//! claim + re-read, one fenced write per step of the plan, the end of a task
//! body, release. A task body is an interval: it begins with the fenced
//! write that starts it and ends when it completes, is cancelled, or its node
//! crashes, so two nodes' task code can be seen to overlap (E1). The store
//! refuses writes by the rules of `Snapshot::check`
//! (`upsilon/src/state/snapshot.rs`). Faults are actions too: a node crashes
//! (and may come back as a fresh run), a holder is paused past its safety
//! margin and its lease expires meanwhile (it does not know and goes on
//! acting), a holder's session ends while it runs, a grant's reply is lost.
//!
//! Time is not a number in the model: what the timing rules guarantee is
//! kept as an order between events (docs/MODEL.md, "Time"). A live holder's
//! lease expires only while it is paused past its margin, because its local
//! deadline, counted from before the request, comes at least a margin
//! before the expiry; a waiting node takes over a lease whose session ended
//! only once the holder has learnt of it, because the grace exceeds the
//! detection time (by the margin too, so that a pause within the margin is
//! covered).
//!
//! Switches turn off a part of the protocol, for the negative controls: the
//! store's fence check, the re-read after the claim, the store's refusal of
//! a second run of a completed task, the holder's detection of its session's
//! end, the grace's length, and where the local deadline counts from.

use std::fmt;

use stateright::{Model, Path, Property};

/// Nodes in the cluster.
pub const NODES: usize = 3;
/// Registered tasks, in plan order.
pub const TASKS: usize = 3;
/// The version of each task: t1 and t2 belong to 1.1, t3 to 1.2
/// (version `n` stands for 1.n).
pub const TASK_VERSION: [u8; TASKS] = [1, 1, 2];
/// The app version of every node: 1.2, the target data version.
pub const APP: u8 = 2;
/// The data version the store starts at: 1.0.
pub const START: u8 = 0;
/// The lease's holder when the run it was granted to crashed: a restarted
/// node is another holder, and must not take its former run's grant for its
/// own.
pub const CRASHED_RUN: u8 = NODES as u8;

/// How the grace (how long a waiting node waits after it first saw the
/// holder's session gone, before it takes the lease over) compares with the
/// detection time (within which the holder learns that its session ended)
/// and the safety margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grace {
    /// Grace <= detection: a takeover may come before the holder knows.
    NotPastDetection,
    /// Detection < grace <= detection + margin: the holder knows first
    /// unless it is paused around its detection, for longer than
    /// grace - detection but possibly within its margin.
    PastDetection,
    /// Grace > detection + margin: a holder knows before any takeover
    /// unless it is paused past its margin.
    PastDetectionAndMargin,
}

/// Parts of the protocol that a negative control turns off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switches {
    /// The store refuses a write whose fence is below its newest (S2).
    pub fence_check: bool,
    /// After claiming the store, the node re-reads it and plans from that
    /// read; off, it plans from its last read before the lease.
    pub reread_after_acquire: bool,
    /// The store refuses to start a completed task again and an attempt
    /// number that does not follow the recorded rows (`Snapshot::check`'s
    /// defence in depth against a second completion).
    pub store_rejects_duplicates: bool,
    /// A holder learns within the detection time that its session ended,
    /// and then cancels its running task and fails (`Lock::until_lost`).
    pub loss_detection: bool,
    /// How long a waiting node waits before it takes over a lease whose
    /// session ended.
    pub grace: Grace,
    /// The holder's local deadline counts from before its grant or renewal
    /// request was sent; off, from its reply, which may come late.
    pub deadline_from_request: bool,
    /// A write that records a data version carries the holder's notice
    /// (`Store::apply_with_notice`) only when the holder's mirror after it
    /// leaves nothing to do; off, every such write carries one.
    pub notice_only_when_settled: bool,
}

impl Switches {
    /// The protocol as designed.
    pub const CORRECT: Switches = Switches {
        fence_check: true,
        reread_after_acquire: true,
        store_rejects_duplicates: true,
        loss_detection: true,
        grace: Grace::PastDetectionAndMargin,
        deadline_from_request: true,
        notice_only_when_settled: true,
    };
}

/// Fault budgets (in a [`Protocol`]) and the faults used so far (in a
/// [`State`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Faults {
    /// Crashes in all (each may restart the node as a fresh run).
    pub crashes: u8,
    /// Expiries of a lease whose holder is alive: the holder was paused past
    /// its margin (with the deadline counted from the reply: or its reply
    /// came late). A dead holder's lease always expires, uncounted.
    pub expiries: u8,
    /// Sessions of a live holder that end (the server terminates them, an
    /// idle timeout, a proxy cuts them).
    pub session_ends: u8,
    /// Grants whose reply is lost.
    pub lost_replies: u8,
}

impl Faults {
    /// No fault at all.
    pub const NONE: Faults = Faults {
        crashes: 0,
        expiries: 0,
        session_ends: 0,
        lost_replies: 0,
    };

    /// Any fault happened.
    pub fn any(&self) -> bool {
        *self != Faults::NONE
    }
}

/// The model: the switches and the fault budgets that keep it finite.
#[derive(Debug, Clone)]
pub struct Protocol {
    /// Which parts of the protocol are on.
    pub switches: Switches,
    /// How many faults of each kind may happen.
    pub budget: Faults,
    /// Identify states that differ only in the numbering of the nodes (all
    /// nodes run the same version): each successor is relabelled to one
    /// representative, which divides the state space by up to 3! = 6.
    pub symmetry: bool,
}

impl Protocol {
    /// The correct protocol with the given fault budgets.
    pub fn new(budget: Faults) -> Protocol {
        Protocol {
            switches: Switches::CORRECT,
            budget,
            symmetry: false,
        }
    }
}

/// The cluster-wide lease, on the backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lock {
    /// Who holds it: a node's current run, or [`CRASHED_RUN`] (a
    /// restarted node is another holder).
    pub holder: Option<u8>,
    /// The fence of the newest grant; never decreases.
    pub fence: u8,
    /// Another node may take it over: the holder's time is up on the
    /// backend's clock, or the grace after its session ended ran out.
    pub expired: bool,
    /// The holder's session ended (reset by the next grant).
    pub session_ended: bool,
}

/// How the newest history row of a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RowState {
    /// Started, not finished (or its node died).
    Running,
    /// Finished successfully.
    Completed,
    /// Stopped because the lease was lost.
    Cancelled,
}

/// The newest history row of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Row {
    /// The fence it was written with.
    pub fence: u8,
    /// Its state.
    pub state: RowState,
}

/// What the store knows of one task (`TaskSummary`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct TaskRecord {
    /// History rows (attempts).
    pub rows: u8,
    /// The newest row.
    pub last: Option<Row>,
    /// A run completed.
    pub completed: bool,
}

/// Data version and task records: what a read of the store returns, and what
/// a node keeps as its mirror of the store while it holds the lease.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Data {
    /// The data version.
    pub version: u8,
    /// One record per task.
    pub tasks: [TaskRecord; TASKS],
}

/// The store: its newest fence and the data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Store {
    /// The newest fence the store has seen (raised by claims).
    pub fence: u8,
    /// Data version and history.
    pub data: Data,
    /// The data version of the newest holder's notice that committed: once
    /// it committed, nothing was left to do (all nodes plan the same). The
    /// runner keeps the notice with the highest fence, and takes one only
    /// with a fence at least its last read's; here every notice is as new
    /// as a node's read (the data only moves forward), so the fences are
    /// left out.
    pub notice: Option<u8>,
}

/// Where a node is in its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pc {
    /// A fresh run: nothing read yet.
    Init,
    /// The plan was not empty: trying the lease, or waiting for it.
    Acquiring,
    /// The lease is granted; the store is not claimed yet.
    Claiming,
    /// Next: the fenced write that starts `task`, carrying the completion of
    /// `pending` (the plan's previous task, of the same version) with it.
    Start {
        /// The task to start.
        task: u8,
        /// A completion not yet written.
        pending: Option<u8>,
    },
    /// `task` is started and its body runs (task code: E1).
    Running {
        /// The task.
        task: u8,
    },
    /// `task` was its version's last: next, the fenced write of its
    /// completion with the data version it reaches.
    Finishing {
        /// The task.
        task: u8,
    },
    /// Releasing the lease; then READY, or failed.
    Releasing {
        /// The plan completed.
        ready: bool,
    },
    /// Reported READY, having read this data version.
    Ready {
        /// The data version the node read (or wrote) last.
        data_version: u8,
    },
    /// Stopped with an error.
    Failed,
    /// Crashed, not restarted.
    Down,
}

/// One node's local state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Node {
    /// Where it is.
    pub pc: Pc,
    /// The fence of its lease (0: none).
    pub fence: u8,
    /// The tasks it plans to run (bit `t` for task `t`).
    pub plan: u8,
    /// Its last read before the lease (kept only when it plans from it), then
    /// its mirror of the store while it holds the lease.
    pub view: Option<Data>,
    /// This run was paused past its safety margin while it held its lease,
    /// and its lease expired meanwhile (E1's exception).
    pub paused: bool,
}

impl Node {
    fn fresh() -> Node {
        Node {
            pc: Pc::Init,
            fence: 0,
            plan: 0,
            view: None,
            paused: false,
        }
    }

    fn stopped(pc: Pc) -> Node {
        Node {
            pc,
            ..Node::fresh()
        }
    }

    /// Holds (or held) a lease and acts on it.
    fn holding(&self) -> bool {
        matches!(
            self.pc,
            Pc::Claiming
                | Pc::Start { .. }
                | Pc::Running { .. }
                | Pc::Finishing { .. }
                | Pc::Releasing { .. }
        )
    }
}

/// What the properties look at besides the protocol's own state: records a
/// checker keeps, never read by the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Audit {
    /// Fences granted (bit `f`).
    pub granted: u8,
    /// Grants made.
    pub grants: u8,
    /// Every committed write as the pair (its fence, the store's newest
    /// fence at commit): bit `8 * fence + newest`.
    pub writes: u64,
    /// Per task, the fences that committed a completion (bit `f`).
    pub completions: [u8; TASKS],
    /// Task bodies that ran: bit `8 * task + fence`.
    pub effects: u32,
    /// A store change moved the data version, a task's state or the store's
    /// fence backwards (checked on every transition).
    pub regressed: bool,
}

/// The whole system.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct State {
    /// The lease.
    pub lock: Lock,
    /// The store.
    pub store: Store,
    /// The nodes.
    pub nodes: [Node; NODES],
    /// The faults so far.
    pub faults: Faults,
    /// What the properties check.
    pub audit: Audit,
}

/// One atomic step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Step 1: read the store without a lock and plan; READY if nothing to do.
    Preflight(u8),
    /// Step 2: compare-and-swap the lease (free or expired: fence + 1).
    Acquire(u8),
    /// Fault in step 2: the lease is granted, but its reply is lost. The
    /// node goes on trying, and finds the lease held by itself.
    AcquireReplyLost(u8),
    /// Step 2, after a wake-up (or before a request): the store has received
    /// a holder's notice, and the node is READY with its data version
    /// without a read.
    Noticed(u8),
    /// Step 2, trying again after a lost reply: the lease is held by this
    /// run, so the node renews it (compare-and-swap on holder and fence) and
    /// holds it, its local deadline counted from before the renewal.
    Adopt(u8),
    /// Step 2, while the lease is held elsewhere: read the store again;
    /// READY once the plan is empty.
    WaitRead(u8),
    /// Step 3: claim the store with the fence, re-read, plan.
    Claim(u8),
    /// Step 4: the fenced write that starts a task (with the previous
    /// completion of the same version); once it commits, the task body
    /// begins.
    StartTask(u8),
    /// Step 4: the task body ends, successfully: its effect outside the
    /// store is done.
    EndTask(u8),
    /// Steps 4 and 6: the fenced write of a version's last completion and
    /// the data version it reaches.
    FinishTask(u8),
    /// Step 7: compare-and-swap release on (holder, fence).
    Release(u8),
    /// Step 5: renewal refused, the local deadline passed, or the holder
    /// learnt that its session ended: cancel the running task at once
    /// (then a best-effort fenced write of the cancellation, or of a
    /// completion that was to ride with the next start), start nothing new,
    /// fail.
    Lose(u8),
    /// Fault: the node crashes; with `restart`, it starts a fresh run.
    Crash {
        /// The node.
        node: u8,
        /// Whether it comes back.
        restart: bool,
    },
    /// The lease expires on the backend (or, after its holder's session
    /// ended, the grace runs out). A fault when its holder is alive: the
    /// holder was paused past its margin (with the deadline counted from the
    /// reply: or the reply came late).
    Expire,
    /// Fault: the session of the live holder ends (the server terminates
    /// it, an idle timeout, a proxy); the holder's process goes on.
    EndSession,
    /// The grace after the session's end runs out while the holder still
    /// acts, not knowing (only without loss detection, or with a grace that
    /// does not exceed detection plus margin).
    GraceEnds,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Action::Preflight(n) => write!(f, "n{n} preflight"),
            Action::Acquire(n) => write!(f, "n{n} acquire"),
            Action::AcquireReplyLost(n) => write!(f, "n{n} acquire, reply lost"),
            Action::Adopt(n) => write!(f, "n{n} adopt its own grant"),
            Action::WaitRead(n) => write!(f, "n{n} wait-read"),
            Action::Noticed(n) => write!(f, "n{n} noticed"),
            Action::Claim(n) => write!(f, "n{n} claim"),
            Action::StartTask(n) => write!(f, "n{n} start-task"),
            Action::EndTask(n) => write!(f, "n{n} end-task"),
            Action::FinishTask(n) => write!(f, "n{n} finish-task"),
            Action::Release(n) => write!(f, "n{n} release"),
            Action::Lose(n) => write!(f, "n{n} lose-lease"),
            Action::Crash { node, restart } => {
                write!(f, "n{node} crash{}", if restart { "+restart" } else { "" })
            }
            Action::Expire => f.write_str("lease expires"),
            Action::EndSession => f.write_str("holder's session ends"),
            Action::GraceEnds => f.write_str("grace runs out"),
        }
    }
}

/// One change in a fenced write (`Change`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// A new row for `task`, numbered `attempt`.
    Start { task: u8, attempt: u8 },
    /// The end of the task's newest row.
    Finish { task: u8, state: RowState },
    /// The data version advances.
    Version(u8),
}

/// Why the store (or the node's own check on its mirror) refused a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The fence is below the store's newest.
    StaleFence,
    /// A rule of `Snapshot::check`.
    Rule(&'static str),
}

/// What a step did, for traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to report.
    Done,
    /// A fenced write committed.
    Committed,
    /// A fenced write was refused.
    Refused(Refusal),
    /// A release was refused (the lease was no longer this node's).
    ReleaseRefused,
    /// A live holder's lease expired: it was paused past its margin.
    HolderPaused,
    /// A live holder's lease expired before its local deadline, which it
    /// counted from a late reply.
    DeadlineAfterExpiry,
    /// A takeover became possible before the holder learnt that its session
    /// ended: it never learns (no loss detection), the grace is no longer
    /// than the detection time, or the holder was paused, within its
    /// margin, around its detection.
    HolderUnaware(Switches),
}

/// Data version 1.`v`.
fn version_name(v: u8) -> String {
    format!("1.{v}")
}

/// Bit `t` for every task the protocol would run after reading `data`: not
/// completed, at most the app version, above the data version or seen in the
/// history (`planner::plan`, out-of-order tasks left out).
pub fn plan_of(data: &Data) -> u8 {
    let mut plan = 0;
    for (t, record) in data.tasks.iter().enumerate() {
        let v = TASK_VERSION[t];
        if v <= APP && !record.completed && (v > data.version || record.rows > 0) {
            plan |= 1 << t;
        }
    }
    plan
}

/// The first task of `plan` after `after`.
fn next_task(plan: u8, after: Option<u8>) -> Option<u8> {
    let from = after.map_or(0, |t| t + 1);
    (from..TASKS as u8).find(|t| plan & (1 << t) != 0)
}

/// The highest version up to the app's whose tasks, and all before them,
/// are complete (`planner::reached_version`).
fn reached_version(data: &Data) -> u8 {
    let mut reached = data.version;
    for v in 1..=APP {
        let done = (0..TASKS)
            .filter(|&t| TASK_VERSION[t] == v)
            .all(|t| data.tasks[t].completed || v <= data.version);
        if !done {
            break;
        }
        reached = reached.max(v);
    }
    reached
}

/// Applies `changes` to `data` under the row rules of `Snapshot::check`, all
/// or nothing. `completed` collects the tasks that completed (bit `t`).
fn apply_rules(
    switches: Switches,
    data: &mut Data,
    fence: u8,
    changes: &[Change],
    completed: &mut u8,
) -> Result<(), Refusal> {
    let mut next = data.clone();
    for change in changes {
        match *change {
            Change::Start { task, attempt } => {
                let record = &mut next.tasks[task as usize];
                if switches.store_rejects_duplicates {
                    if record.completed {
                        return Err(Refusal::Rule("task is already completed"));
                    }
                    if attempt != record.rows + 1 {
                        return Err(Refusal::Rule("attempt does not follow the recorded rows"));
                    }
                }
                record.rows += 1;
                record.last = Some(Row {
                    fence,
                    state: RowState::Running,
                });
            }
            Change::Finish { task, state } => {
                let record = &mut next.tasks[task as usize];
                // The attempt number is left out: within one grant a node
                // starts a task at most once, so the fence names the row.
                let Some(last) = record.last.as_mut().filter(|l| l.fence == fence) else {
                    return Err(Refusal::Rule("not the task's newest row"));
                };
                if last.state == state {
                    continue;
                }
                if last.state != RowState::Running {
                    return Err(Refusal::Rule("the attempt is already finished"));
                }
                last.state = state;
                if state == RowState::Completed {
                    record.completed = true;
                    *completed |= 1 << task;
                }
            }
            Change::Version(v) => {
                if v < next.version {
                    return Err(Refusal::Rule("data version below the recorded one"));
                }
                next.version = v;
            }
        }
    }
    *data = next;
    Ok(())
}

/// Whether `new` moved anything of `old` backwards (S4).
fn regressed(old: &Store, new: &Store) -> bool {
    if new.fence < old.fence || new.data.version < old.data.version {
        return true;
    }
    old.data.tasks.iter().zip(&new.data.tasks).any(|(o, n)| {
        // Without a new row, the newest row stays, and once finished its
        // state stays.
        let row_back = n.rows == o.rows
            && match (o.last, n.last) {
                (Some(ol), Some(nl)) => {
                    nl.fence != ol.fence || (ol.state != RowState::Running && nl.state != ol.state)
                }
                (Some(_), None) => true,
                (None, _) => false,
            };
        n.rows < o.rows || (o.completed && !n.completed) || row_back
    })
}

impl Protocol {
    /// The lease of node `n` is still its own on the backend.
    fn lease_valid(&self, s: &State, n: usize) -> bool {
        let node = &s.nodes[n];
        s.lock.holder == Some(n as u8) && s.lock.fence == node.fence && !s.lock.expired
    }

    /// The holder of the lease is alive and acting on it. A node whose
    /// grant's reply was lost is too: it tries again within its retry
    /// backoff, far below the TTL, finds the lease its own and adopts it
    /// (a slower retry is a pause).
    fn holder_alive(&self, s: &State) -> bool {
        s.lock
            .holder
            .filter(|&h| h != CRASHED_RUN)
            .is_some_and(|h| {
                let node = &s.nodes[h as usize];
                node.pc == Pc::Acquiring || node.holding() && node.fence == s.lock.fence
            })
    }

    /// Node `n` holds the lease and has learnt that its session ended: it
    /// cancels its running task and fails (`Lose`).
    fn knows_session_ended(&self, s: &State, n: usize) -> bool {
        self.switches.loss_detection
            && s.lock.session_ended
            && s.lock.holder == Some(n as u8)
            && s.lock.fence == s.nodes[n].fence
    }

    /// The grace after the session's end may run out while the holder is
    /// alive and does not know: the holder never learns, or learns too late.
    fn takeover_before_detection(&self) -> bool {
        !self.switches.loss_detection || self.switches.grace != Grace::PastDetectionAndMargin
    }

    fn acquirable(&self, s: &State) -> bool {
        s.lock.holder.is_none() || s.lock.expired
    }

    /// One fenced write by node `n`: checked on the node's mirror first (as
    /// the runner does), then by the store. On success both are updated.
    fn write(&self, s: &mut State, n: usize, changes: &[Change]) -> Result<(), Refusal> {
        self.write_with_notice(s, n, changes, None)
    }

    /// [`Protocol::write`], and on commit the store keeps `notice`.
    fn write_with_notice(
        &self,
        s: &mut State,
        n: usize,
        changes: &[Change],
        notice: Option<u8>,
    ) -> Result<(), Refusal> {
        let fence = s.nodes[n].fence;
        let mut view = s.nodes[n].view.clone().expect("a holder keeps a mirror");
        apply_rules(self.switches, &mut view, fence, changes, &mut 0)?;
        if fence < s.store.fence && self.switches.fence_check {
            return Err(Refusal::StaleFence);
        }
        if fence > s.store.fence {
            return Err(Refusal::Rule("fence never claimed"));
        }
        let before = s.store.clone();
        let mut completed = 0;
        apply_rules(
            self.switches,
            &mut s.store.data,
            fence,
            changes,
            &mut completed,
        )?;
        s.audit.writes |= 1 << (8 * fence + s.store.fence);
        for t in 0..TASKS {
            if completed & (1 << t) != 0 {
                s.audit.completions[t] |= 1 << fence;
            }
        }
        s.audit.regressed |= regressed(&before, &s.store);
        s.nodes[n].view = Some(view);
        if notice.is_some() {
            s.store.notice = notice;
        }
        Ok(())
    }

    /// After a write by node `n`: a stale fence means the lease is lost (no
    /// release); any other refusal fails the run, which releases.
    fn after_write(
        &self,
        s: &mut State,
        n: usize,
        result: Result<(), Refusal>,
        next: Pc,
    ) -> Outcome {
        match result {
            Ok(()) => {
                s.nodes[n].pc = next;
                Outcome::Committed
            }
            Err(Refusal::StaleFence) => {
                s.nodes[n] = Node::stopped(Pc::Failed);
                Outcome::Refused(Refusal::StaleFence)
            }
            Err(r) => {
                s.nodes[n].pc = Pc::Releasing { ready: false };
                Outcome::Refused(r)
            }
        }
    }

    /// The successor of `s` by `action`, with what happened.
    pub fn step(&self, s: &State, action: Action) -> (State, Outcome) {
        let mut s = s.clone();
        let mut outcome = Outcome::Done;
        match action {
            Action::Preflight(n) => {
                let n = n as usize;
                let data = s.store.data.clone();
                if plan_of(&data) == 0 {
                    s.nodes[n] = Node::stopped(Pc::Ready {
                        data_version: data.version,
                    });
                } else {
                    s.nodes[n].pc = Pc::Acquiring;
                    if !self.switches.reread_after_acquire {
                        s.nodes[n].view = Some(data);
                    }
                }
            }
            Action::Acquire(n) | Action::AcquireReplyLost(n) => {
                let fence = s.lock.fence + 1;
                s.lock = Lock {
                    holder: Some(n),
                    fence,
                    expired: false,
                    session_ended: false,
                };
                s.audit.granted |= 1 << fence;
                s.audit.grants += 1;
                if action == Action::Acquire(n) {
                    let node = &mut s.nodes[n as usize];
                    node.fence = fence;
                    node.pc = Pc::Claiming;
                } else {
                    s.faults.lost_replies += 1;
                }
            }
            Action::Adopt(n) => {
                let node = &mut s.nodes[n as usize];
                node.fence = s.lock.fence;
                node.pc = Pc::Claiming;
            }
            Action::Noticed(n) => {
                let data_version = s.store.notice.expect("enabled by a notice");
                s.nodes[n as usize] = Node::stopped(Pc::Ready { data_version });
            }
            Action::WaitRead(n) => {
                let n = n as usize;
                let data = s.store.data.clone();
                if plan_of(&data) == 0 {
                    s.nodes[n] = Node::stopped(Pc::Ready {
                        data_version: data.version,
                    });
                } else {
                    s.nodes[n].view = Some(data);
                }
            }
            Action::Claim(n) => {
                let n = n as usize;
                let fence = s.nodes[n].fence;
                if fence < s.store.fence {
                    s.nodes[n] = Node::stopped(Pc::Failed);
                    outcome = Outcome::Refused(Refusal::StaleFence);
                } else {
                    s.store.fence = fence;
                    let node = &mut s.nodes[n];
                    if self.switches.reread_after_acquire {
                        node.view = Some(s.store.data.clone());
                    }
                    let view = node.view.as_ref().expect("a planned node keeps its read");
                    node.plan = plan_of(view);
                    node.pc = match next_task(node.plan, None) {
                        Some(task) => Pc::Start {
                            task,
                            pending: None,
                        },
                        None => Pc::Releasing { ready: true },
                    };
                }
            }
            Action::StartTask(n) => {
                let n = n as usize;
                let Pc::Start { task, pending } = s.nodes[n].pc else {
                    unreachable!()
                };
                let view = s.nodes[n].view.as_ref().expect("mirror");
                let attempt = view.tasks[task as usize].rows + 1;
                let mut changes = Vec::with_capacity(2);
                if let Some(p) = pending {
                    changes.push(Change::Finish {
                        task: p,
                        state: RowState::Completed,
                    });
                }
                changes.push(Change::Start { task, attempt });
                let result = self.write(&mut s, n, &changes);
                outcome = self.after_write(&mut s, n, result, Pc::Running { task });
            }
            Action::EndTask(n) => {
                let n = n as usize;
                let Pc::Running { task } = s.nodes[n].pc else {
                    unreachable!()
                };
                let node = &mut s.nodes[n];
                s.audit.effects |= 1 << (8 * task + node.fence);
                let next = next_task(node.plan, Some(task));
                node.pc = match next {
                    Some(next) if TASK_VERSION[next as usize] == TASK_VERSION[task as usize] => {
                        Pc::Start {
                            task: next,
                            pending: Some(task),
                        }
                    }
                    _ => Pc::Finishing { task },
                };
            }
            Action::FinishTask(n) => {
                let n = n as usize;
                let Pc::Finishing { task } = s.nodes[n].pc else {
                    unreachable!()
                };
                let node = &s.nodes[n];
                let finish = Change::Finish {
                    task,
                    state: RowState::Completed,
                };
                let mut after = node.view.clone().expect("mirror");
                let mut changes = vec![finish];
                let mut notice = None;
                if apply_rules(self.switches, &mut after, node.fence, &changes, &mut 0).is_ok() {
                    let v = reached_version(&after);
                    if v != node.view.as_ref().expect("mirror").version {
                        changes.push(Change::Version(v));
                        after.version = v;
                        if plan_of(&after) == 0 || !self.switches.notice_only_when_settled {
                            notice = Some(v);
                        }
                    }
                }
                let next = match next_task(node.plan, Some(task)) {
                    Some(next) => Pc::Start {
                        task: next,
                        pending: None,
                    },
                    None => Pc::Releasing { ready: true },
                };
                let result = self.write_with_notice(&mut s, n, &changes, notice);
                outcome = self.after_write(&mut s, n, result, next);
            }
            Action::Release(n) => {
                let n = n as usize;
                let Pc::Releasing { ready } = s.nodes[n].pc else {
                    unreachable!()
                };
                if self.lease_valid(&s, n) {
                    s.lock.holder = None;
                } else {
                    outcome = Outcome::ReleaseRefused;
                }
                let data_version = s.nodes[n].view.as_ref().expect("mirror").version;
                s.nodes[n] = Node::stopped(if ready {
                    Pc::Ready { data_version }
                } else {
                    Pc::Failed
                });
            }
            Action::Lose(n) => {
                let n = n as usize;
                // Best effort: the cancellation of the running task, or a
                // completion that was to ride with the next start; refused if
                // another node has claimed the store.
                let last = match s.nodes[n].pc {
                    Pc::Running { task } => Some(Change::Finish {
                        task,
                        state: RowState::Cancelled,
                    }),
                    Pc::Start {
                        pending: Some(task),
                        ..
                    } => Some(Change::Finish {
                        task,
                        state: RowState::Completed,
                    }),
                    _ => None,
                };
                if let Some(change) = last {
                    outcome = match self.write(&mut s, n, &[change]) {
                        Ok(()) => Outcome::Committed,
                        Err(r) => Outcome::Refused(r),
                    };
                }
                s.nodes[n] = Node::stopped(Pc::Failed);
            }
            Action::Crash { node, restart } => {
                s.faults.crashes += 1;
                if s.lock.holder == Some(node) {
                    s.lock.holder = Some(CRASHED_RUN);
                }
                s.nodes[node as usize] = if restart {
                    Node::fresh()
                } else {
                    Node::stopped(Pc::Down)
                };
            }
            Action::Expire => {
                if self.holder_alive(&s) {
                    s.faults.expiries += 1;
                    if self.switches.deadline_from_request {
                        // Its local deadline comes at least a margin before
                        // the expiry: only a pause past the margin lets the
                        // lease expire while it still acts. (A node that
                        // lost its grant's reply acts on nothing yet: it
                        // will try again for a new grant.)
                        let holder = &mut s.nodes[s.lock.holder.expect("a holder") as usize];
                        holder.paused = holder.holding();
                        outcome = Outcome::HolderPaused;
                    } else {
                        outcome = Outcome::DeadlineAfterExpiry;
                    }
                }
                s.lock.expired = true;
            }
            Action::EndSession => {
                s.faults.session_ends += 1;
                s.lock.session_ended = true;
            }
            Action::GraceEnds => {
                s.lock.expired = true;
                outcome = Outcome::HolderUnaware(self.switches);
            }
        }
        (s, outcome)
    }

    /// The actions of the protocol itself, faults left out.
    pub fn progress_actions(&self, s: &State, actions: &mut Vec<Action>) {
        for (i, node) in s.nodes.iter().enumerate() {
            let n = i as u8;
            match node.pc {
                Pc::Init => actions.push(Action::Preflight(n)),
                Pc::Acquiring => {
                    if self.acquirable(s) {
                        actions.push(Action::Acquire(n));
                    } else if s.lock.holder == Some(n) {
                        // Its grant's reply was lost, and the lease is still
                        // its own.
                        actions.push(Action::Adopt(n));
                    }
                    let data = &s.store.data;
                    if plan_of(data) == 0 || node.view.as_ref().is_some_and(|v| v != data) {
                        actions.push(Action::WaitRead(n));
                    }
                    if s.store.notice.is_some() {
                        actions.push(Action::Noticed(n));
                    }
                }
                Pc::Claiming => actions.push(Action::Claim(n)),
                Pc::Start { .. } => actions.push(Action::StartTask(n)),
                Pc::Running { .. } => actions.push(Action::EndTask(n)),
                Pc::Finishing { .. } => actions.push(Action::FinishTask(n)),
                Pc::Releasing { .. } => actions.push(Action::Release(n)),
                Pc::Ready { .. } | Pc::Failed | Pc::Down => {}
            }
            if matches!(
                node.pc,
                Pc::Claiming | Pc::Start { .. } | Pc::Running { .. } | Pc::Finishing { .. }
            ) && (!self.lease_valid(s, i) || self.knows_session_ended(s, i))
            {
                actions.push(Action::Lose(n));
            }
        }
        if s.lock.holder.is_some() && !s.lock.expired {
            if !self.holder_alive(s) {
                actions.push(Action::Expire);
            } else if s.lock.session_ended && self.takeover_before_detection() {
                actions.push(Action::GraceEnds);
            }
        }
    }

    /// Faults: crashes, the expiry of a live holder's lease, the end of a
    /// live holder's session, a lost reply to a grant.
    pub fn fault_actions(&self, s: &State, actions: &mut Vec<Action>) {
        if s.faults.crashes < self.budget.crashes {
            for (i, node) in s.nodes.iter().enumerate() {
                let restarts: &[bool] = match node.pc {
                    Pc::Ready { .. } | Pc::Down => &[],
                    // A run that failed exits; only its restart is news.
                    Pc::Failed => &[true],
                    _ => &[true, false],
                };
                for &restart in restarts {
                    actions.push(Action::Crash {
                        node: i as u8,
                        restart,
                    });
                }
            }
        }
        let live = !s.lock.expired && self.holder_alive(s);
        if live && s.faults.expiries < self.budget.expiries {
            actions.push(Action::Expire);
        }
        if live && !s.lock.session_ended && s.faults.session_ends < self.budget.session_ends {
            actions.push(Action::EndSession);
        }
        if self.acquirable(s) && s.faults.lost_replies < self.budget.lost_replies {
            for (i, node) in s.nodes.iter().enumerate() {
                if node.pc == Pc::Acquiring {
                    actions.push(Action::AcquireReplyLost(i as u8));
                }
            }
        }
    }

    /// Every action enabled in `s`.
    pub fn actions_of(&self, s: &State) -> Vec<Action> {
        let mut actions = Vec::new();
        self.actions(s, &mut actions);
        actions
    }

    /// No step of the protocol can be taken: only faults could change the
    /// state.
    pub fn quiescent(&self, s: &State) -> bool {
        let mut actions = Vec::new();
        self.progress_actions(s, &mut actions);
        actions.is_empty()
    }

    /// Every step of `path` with its outcome and the state after it, one line each.
    pub fn trace(&self, path: &Path<State, Action>) -> String {
        let mut out = String::new();
        let steps = path.clone().into_vec();
        for (i, window) in steps.windows(2).enumerate() {
            let (before, Some(action)) = &window[0] else {
                continue;
            };
            let (after, outcome) = self.step(before, *action);
            let after = if self.symmetry {
                after.representative()
            } else {
                after
            };
            debug_assert_eq!(&after, &window[1].0);
            let note = match outcome {
                Outcome::Done => String::new(),
                Outcome::Committed => " [write committed]".to_owned(),
                Outcome::Refused(Refusal::StaleFence) => " [refused: stale fence]".to_owned(),
                Outcome::Refused(Refusal::Rule(rule)) => format!(" [refused: {rule}]"),
                Outcome::ReleaseRefused => " [release refused]".to_owned(),
                Outcome::HolderPaused => " [its holder is paused past its margin]".to_owned(),
                Outcome::DeadlineAfterExpiry => {
                    " [before its holder's deadline, counted from a late reply]".to_owned()
                }
                Outcome::HolderUnaware(switches) => {
                    let why = if !switches.loss_detection {
                        "it never learns"
                    } else if switches.grace == Grace::NotPastDetection {
                        "the grace is not longer than detection"
                    } else {
                        "it was paused, within its margin, around its detection"
                    };
                    format!(" [its holder does not know the session ended: {why}]")
                }
            };
            out.push_str(&format!("{:>2}. {action}{note}\n    {after}\n", i + 1));
        }
        out
    }
}

/// A measure of the data that every store write increases: rows count
/// twice (a new row turns the previous one's end back into `Running`), each
/// finished newest row, completion and version step once.
fn data_measure(data: &Data) -> u32 {
    let tasks: u32 = data
        .tasks
        .iter()
        .map(|r| {
            let finished = r.last.is_some_and(|l| l.state != RowState::Running);
            2 * u32::from(r.rows) + u32::from(finished) + u32::from(r.completed)
        })
        .sum();
    tasks + u32::from(data.version)
}

/// How far a node is in its run.
fn pc_rank(pc: Pc) -> u32 {
    match pc {
        Pc::Init => 0,
        Pc::Acquiring => 1,
        Pc::Claiming => 2,
        Pc::Start { task, .. } => 3 + 3 * u32::from(task),
        Pc::Running { task } => 4 + 3 * u32::from(task),
        Pc::Finishing { task } => 5 + 3 * u32::from(task),
        Pc::Releasing { .. } => 3 + 3 * TASKS as u32,
        Pc::Ready { .. } | Pc::Failed | Pc::Down => 4 + 3 * TASKS as u32,
    }
}

impl State {
    /// A measure that every step increases, compared in order: crashes, the
    /// lease's fence, its expiry and its session's end, the nodes' progress
    /// in their runs, what they have read. Every component is bounded, so
    /// the model has no cycle
    /// and every path ends where no step is left: once the faults stop, a
    /// run reaches a state where no step of the protocol is left, which is
    /// where the L properties are checked. `next_state` asserts it on every
    /// transition the checker explores.
    pub fn measure(&self) -> (u8, u8, (bool, bool), u32, u32) {
        let progress = self.nodes.iter().map(|n| pc_rank(n.pc)).sum();
        let read = self
            .nodes
            .iter()
            .filter_map(|n| n.view.as_ref())
            .map(data_measure)
            .sum();
        (
            self.faults.crashes,
            self.lock.fence,
            (self.lock.expired, self.lock.session_ended),
            progress,
            read,
        )
    }

    /// The same state with the nodes renumbered in a canonical order (the
    /// lease's holder follows its node). Every property treats the nodes
    /// alike, so it holds in a state iff it holds in its representative.
    pub fn representative(&self) -> State {
        let key = |i: usize| (&self.nodes[i], self.lock.holder == Some(i as u8));
        let mut order: [usize; NODES] = std::array::from_fn(|i| i);
        order.sort_by(|&a, &b| key(a).cmp(&key(b)));
        let mut out = self.clone();
        for (new, &old) in order.iter().enumerate() {
            out.nodes[new] = self.nodes[old].clone();
        }
        out.lock.holder = self.lock.holder.map(|h| {
            if h == CRASHED_RUN {
                h
            } else {
                order.iter().position(|&o| o == h as usize).expect("a node") as u8
            }
        });
        out
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.lock.holder {
            Some(CRASHED_RUN) => write!(f, "lock (a crashed run) fence {}", self.lock.fence)?,
            Some(h) => write!(f, "lock n{h} fence {}", self.lock.fence)?,
            None => write!(f, "lock free fence {}", self.lock.fence)?,
        }
        if self.lock.holder.is_some() {
            if self.lock.session_ended {
                f.write_str(" session ended")?;
            }
            if self.lock.expired {
                f.write_str(" expired")?;
            }
        }
        write!(
            f,
            " | store fence {} data {} [",
            self.store.fence,
            version_name(self.store.data.version)
        )?;
        for (t, record) in self.store.data.tasks.iter().enumerate() {
            if t > 0 {
                f.write_str(" ")?;
            }
            write!(f, "t{}:", t + 1)?;
            match record.last {
                None => f.write_str("-")?,
                Some(row) => write!(
                    f,
                    "{}@{}",
                    match row.state {
                        RowState::Running => "running",
                        RowState::Completed => "completed",
                        RowState::Cancelled => "cancelled",
                    },
                    row.fence
                )?,
            }
            let done = self.audit.completions[t];
            if done.count_ones() > 1 {
                write!(f, "(completed {} times)", done.count_ones())?;
            }
        }
        f.write_str("] |")?;
        for (i, node) in self.nodes.iter().enumerate() {
            write!(f, " n{i} ")?;
            match node.pc {
                Pc::Init => f.write_str("init")?,
                Pc::Acquiring => f.write_str("acquiring")?,
                Pc::Claiming => write!(f, "claiming@{}", node.fence)?,
                Pc::Start { task, .. } => write!(f, "start t{}@{}", task + 1, node.fence)?,
                Pc::Running { task } => write!(f, "running t{}@{}", task + 1, node.fence)?,
                Pc::Finishing { task } => write!(f, "finishing t{}@{}", task + 1, node.fence)?,
                Pc::Releasing { .. } => write!(f, "releasing@{}", node.fence)?,
                Pc::Ready { data_version } => write!(f, "READY({})", version_name(data_version))?,
                Pc::Failed => f.write_str("failed")?,
                Pc::Down => f.write_str("down")?,
            }
            if node.paused {
                f.write_str(" (paused)")?;
            }
            if i + 1 < NODES {
                f.write_str(",")?;
            }
        }
        Ok(())
    }
}

/// The name of the property that checks E1.
pub const E1: &str = "E1 no two nodes run task code at once, unless one was paused past its margin";

/// The name of the reachability check for E1's exception.
pub const EXCUSED_OVERLAP: &str =
    "two nodes run task code at once, one of them paused past its margin";

/// The nodes running task code.
fn running(s: &State) -> impl Iterator<Item = &Node> {
    s.nodes
        .iter()
        .filter(|n| matches!(n.pc, Pc::Running { .. }))
}

/// Data version at least 1.`v` implies every task up to 1.`v` is complete,
/// and a completed task implies every earlier one is.
fn s5(data: &Data) -> bool {
    let in_order = (1..TASKS).all(|k| !data.tasks[k].completed || data.tasks[k - 1].completed);
    let version = (0..TASKS).all(|t| TASK_VERSION[t] > data.version || data.tasks[t].completed);
    in_order && version
}

/// Every task in (`d`, app] is complete in `data`.
fn complete_above(data: &Data, d: u8) -> bool {
    (0..TASKS).all(|t| {
        let v = TASK_VERSION[t];
        v <= d || v > APP || data.tasks[t].completed
    })
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            lock: Lock {
                holder: None,
                fence: 0,
                expired: false,
                session_ended: false,
            },
            store: Store {
                fence: 0,
                data: Data {
                    version: START,
                    tasks: [TaskRecord::default(); TASKS],
                },
                notice: None,
            },
            nodes: std::array::from_fn(|_| Node::fresh()),
            faults: Faults::NONE,
            audit: Audit {
                granted: 0,
                grants: 0,
                writes: 0,
                completions: [0; TASKS],
                effects: 0,
                regressed: false,
            },
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        self.progress_actions(s, actions);
        self.fault_actions(s, actions);
    }

    fn next_state(&self, s: &State, action: Action) -> Option<State> {
        let (next, _) = self.step(s, action);
        assert!(
            next.measure() > s.measure(),
            "{action} does not increase the measure: the model would have a cycle"
        );
        Some(if self.symmetry {
            next.representative()
        } else {
            next
        })
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut properties = vec![
            Property::always("S1 fences granted grow and are distinct", |_, s: &State| {
                let a = &s.audit;
                a.granted.count_ones() == u32::from(a.grants)
                    && (a.grants == 0 || a.granted.leading_zeros() == 7 - u32::from(s.lock.fence))
            }),
            Property::always(
                "S2 a write commits only under the store's newest fence",
                |_, s: &State| {
                    (0..64u32)
                        .filter(|b| s.audit.writes & (1 << b) != 0)
                        .all(|b| b / 8 == b % 8)
                },
            ),
            Property::always("S3 at most one committed completion per task", |_, s: &State| {
                s.audit.completions.iter().all(|c| c.count_ones() <= 1)
            }),
            Property::always(
                "S4 data version and task states never go backwards",
                |_, s: &State| !s.audit.regressed,
            ),
            Property::always("S5 completions in order, data version implies them", |_, s: &State| {
                s5(&s.store.data)
            }),
            Property::always(
                "S7 a READY node read a data version with every task above it complete",
                |_, s: &State| {
                    s.nodes.iter().all(|n| match n.pc {
                        Pc::Ready { data_version } => complete_above(&s.store.data, data_version),
                        _ => true,
                    })
                },
            ),
            Property::always(
                "a task body runs only after every earlier task completed",
                |_, s: &State| {
                    (0..TASKS).all(|t| {
                        let ran = (s.audit.effects >> (8 * t)) & 0xff != 0;
                        !ran || (0..t).all(|e| s.store.data.tasks[e].completed)
                    })
                },
            ),
            Property::always(
                "every completion was preceded by a body run under its fence",
                |_, s: &State| {
                    (0..TASKS).all(|t| {
                        let ran = ((s.audit.effects >> (8 * t)) & 0xff) as u8;
                        s.audit.completions[t] & !ran == 0
                    })
                },
            ),
            Property::always(
                "L2/L3 once no step is left, every node finished and the data is at the target or a node failed",
                |m: &Protocol, s: &State| {
                    if !m.quiescent(s) {
                        return true;
                    }
                    let finished = s
                        .nodes
                        .iter()
                        .all(|n| matches!(n.pc, Pc::Ready { .. } | Pc::Failed | Pc::Down));
                    let failed = s.nodes.iter().any(|n| n.pc == Pc::Failed);
                    finished && (s.store.data.version == APP || failed)
                },
            ),
            Property::always(
                "without faults, a task body runs at most once",
                |_, s: &State| {
                    s.faults.any()
                        || (0..TASKS).all(|t| ((s.audit.effects >> (8 * t)) & 0xff).count_ones() <= 1)
                },
            ),
            Property::always(
                "L2 without faults, once no step is left every node is READY",
                |m: &Protocol, s: &State| {
                    s.faults.any()
                        || !m.quiescent(s)
                        || s.nodes.iter().all(|n| matches!(n.pc, Pc::Ready { .. }))
                },
            ),
            Property::sometimes("the upgrade completes: every node READY", |_, s: &State| {
                s.nodes.iter().all(|n| matches!(n.pc, Pc::Ready { .. }))
            }),
            Property::sometimes(
                "the upgrade completes after a crash and an expiry",
                |_, s: &State| {
                    s.faults.crashes > 0
                        && s.faults.expiries > 0
                        && s.store.data.version == APP
                        && s.nodes.iter().any(|n| matches!(n.pc, Pc::Ready { .. }))
                },
            ),
            Property::sometimes(
                "a task body runs twice (attempts are at-least-once)",
                |_, s: &State| (0..TASKS).any(|t| ((s.audit.effects >> (8 * t)) & 0xff).count_ones() > 1),
            ),
            Property::always(E1, |_, s: &State| running(s).filter(|n| !n.paused).count() <= 1),
        ];
        // Reachability checks for the faults this model allows.
        if self.budget.expiries > 0 && self.switches.deadline_from_request {
            properties.push(Property::sometimes(EXCUSED_OVERLAP, |_, s: &State| {
                running(s).count() > 1
            }));
        }
        if self.budget.session_ends > 0 {
            properties.push(Property::sometimes(
                "the upgrade completes after the holder's session ended",
                |_, s: &State| {
                    s.faults.session_ends > 0
                        && s.store.data.version == APP
                        && s.nodes.iter().any(|n| matches!(n.pc, Pc::Ready { .. }))
                },
            ));
        }
        if self.budget.lost_replies > 0 {
            properties.push(Property::sometimes(
                "the upgrade completes after a grant's reply was lost",
                |_, s: &State| {
                    s.faults.lost_replies > 0
                        && s.store.data.version == APP
                        && s.nodes.iter().all(|n| matches!(n.pc, Pc::Ready { .. }))
                },
            ));
        }
        properties
    }
}
