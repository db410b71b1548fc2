//! One trial: start the nodes, inject faults, heal them, let the cluster
//! converge, and collect what happened for the checker.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use upsilon::backend::{AttemptKind, AttemptState, HistoryEntry, Snapshot, Store};
use upsilon_tests::audit::{self, ProcessLog, Record};
use upsilon_tests::clock::now_us;
use upsilon_tests::fault_proxy::{Direction, Flow};

use crate::cluster::ClusterBackend;

#[path = "backfill_faults.rs"]
mod backfill_faults;

const NODE: &str = env!("CARGO_BIN_EXE_node");

/// A kind of fault, as the report counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// SIGKILL of a node; it is started again at once.
    Kill,
    /// SIGSTOP for longer than the TTL, then SIGCONT.
    Stop,
    /// SIGSTOP for less than the runner's safety margin, then SIGCONT.
    ShortStop,
    /// SIGTERM: a clean stop; the node is started again once it exited.
    Term,
    /// The server's immediate shutdown and restart.
    ServerRestart,
    /// `pg_terminate_backend` of the session the lease row names.
    LeaseSession,
    /// `pg_terminate_backend` of every session of a node.
    NodeSessions,
    /// A short `idle_session_timeout` on the server for a while.
    IdleTimeout,
    /// The fault proxy closes a node's connections.
    Cut,
    /// The fault proxy delays a node's traffic in one direction for a while.
    Delay,
    /// The fault proxy holds a node's traffic back in one or both
    /// directions for a while, then lets it through or cuts.
    Blackhole,
    /// A node cut off: its traffic held both ways and its sessions
    /// terminated on the server, for a while.
    Isolate,
    /// The trial's t2 fails for good while the faults run, so its version
    /// (1.0: t2, then t1) is rolled back (every task has a rollback in such
    /// a trial).
    FailingTask,
    /// A step of the wall clock the backend reads (SQLite: the trial's
    /// `SteppedWallClock`), forward or back by more than the TTL.
    ClockStep,
    /// A fault of the API server itself for a while (Kubernetes: 500s,
    /// watches dropped and refused, or a conflict storm).
    ApiFault,
}

impl Kind {
    pub const ALL: [Kind; 15] = [
        Kind::Kill,
        Kind::Stop,
        Kind::ShortStop,
        Kind::Term,
        Kind::ServerRestart,
        Kind::LeaseSession,
        Kind::NodeSessions,
        Kind::IdleTimeout,
        Kind::Cut,
        Kind::Delay,
        Kind::Blackhole,
        Kind::Isolate,
        Kind::FailingTask,
        Kind::ClockStep,
        Kind::ApiFault,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Kill => "SIGKILL",
            Kind::Stop => "SIGSTOP past the TTL",
            Kind::ShortStop => "SIGSTOP under the margin",
            Kind::Term => "SIGTERM",
            Kind::ServerRestart => "server crash-restart",
            Kind::LeaseSession => "lease session terminated",
            Kind::NodeSessions => "node's sessions terminated",
            Kind::IdleTimeout => "idle-session timeout",
            Kind::Cut => "connections cut",
            Kind::Delay => "traffic delayed",
            Kind::Blackhole => "traffic blackholed",
            Kind::Isolate => "node isolated",
            Kind::FailingTask => "failing task rolled back",
            Kind::ClockStep => "wall-clock step",
            Kind::ApiFault => "API server fault",
        }
    }

    /// Whether it pauses a process (the E1 exception).
    pub fn pauses(self) -> bool {
        matches!(self, Kind::Stop | Kind::ShortStop)
    }
}

/// How the faults are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Random faults for 2.5-4 s, half of them at the lease holder.
    Random,
    /// One fault: the holder isolated ([`Kind::Isolate`]) for `ms` as soon
    /// as it runs a task.
    IsolateHolder { ms: u64 },
    /// One fault: the wall clock stepped by `ms` as soon as the holder runs
    /// a task.
    StepClock { ms: i64 },
    /// One fault: the server crash-restarted ([`Kind::ServerRestart`]) as
    /// soon as the holder runs a task.
    RestartServer,
    /// `faults` faults at the holder of the backfill (t1), each once its
    /// checkpoint has moved since the last one (`backfill_faults.rs`).
    Backfill { faults: usize },
}

/// What one trial runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub nodes: usize,
    /// The node's `--tasks`.
    pub tasks: &'static str,
    pub task_count: usize,
    pub target: &'static str,
    pub ttl_ms: u64,
    pub task_ms: u64,
    /// The runner's safety margin: TTL/5, its default.
    pub margin_ms: u64,
    /// Off: the negative control (`node --no-loss-signal`).
    pub loss_signal: bool,
    /// Whether a node that was granted a fence the store has already seen
    /// holds it unused for a TTL (off: the negative control's
    /// `--no-wait-out`).
    pub wait_out: bool,
    pub plan: Plan,
}

/// A fault as the harness injected it, on the nodes' clock.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: Kind,
    /// The node it hit, if it hit one.
    pub node: Option<String>,
    /// The process it hit, if it hit one.
    pub pid: Option<u32>,
    /// When it began.
    pub at: i64,
    /// When it ended, for faults that last (a pause: when SIGCONT was sent
    /// or the process died).
    pub until: Option<i64>,
    pub detail: String,
}

/// A node process's life, on the nodes' clock.
#[derive(Debug, Clone)]
pub struct Life {
    pub pid: u32,
    pub spawned: i64,
    /// When it could run nothing more: right after SIGKILL was sent, or
    /// when the harness reaped it.
    pub died: Option<i64>,
    /// Its exit code; `None` if a signal ended it.
    pub code: Option<i32>,
}

/// Everything a trial produced.
pub struct Trial {
    pub events: Vec<Event>,
    pub lives: Vec<Life>,
    pub logs: Vec<ProcessLog>,
    pub history: Vec<HistoryEntry>,
    pub snapshot: Snapshot,
    /// Convergence and sampled S4 violations, found while it ran.
    pub violations: Vec<String>,
    pub failing_task: bool,
    pub failed_exits: usize,
    /// The trial's directory (audit logs, the nodes' stderr), kept while
    /// the trial is checked.
    pub dir: tempfile::TempDir,
}

/// splitmix64.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n.max(1)
    }

    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo).max(1))
    }
}

fn signal(pid: u32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), sig);
}

struct NodeProc {
    name: String,
    child: Option<Child>,
    pid: u32,
    /// Index of its life in `Harness::lives`.
    life: usize,
    /// The pause event while it is stopped.
    stopped: Option<usize>,
    /// It became READY (exited 0); nothing to do unless a fault restarts it.
    done: bool,
    /// It exited; started again at this time (as an orchestrator would).
    restart_at: Option<i64>,
}

/// Something to do later in the trial.
enum Later {
    /// SIGCONT to the process whose pause is event `.1`.
    Cont(usize, usize),
    /// Let node `.0`'s traffic through again (and cut it if `.1`), ending event `.2`.
    Heal(String, bool, usize),
    /// Reset the idle-session timeout, ending event `.0`.
    IdleReset(usize),
    /// End the API server's fault, ending event `.0`.
    ApiHeal(usize),
}

struct Harness<'a> {
    env: &'a mut dyn ClusterBackend,
    cfg: &'a Config,
    dir: PathBuf,
    marker: Option<PathBuf>,
    procs: Vec<NodeProc>,
    lives: Vec<Life>,
    events: Vec<Event>,
    later: Vec<(i64, Later)>,
    /// Until when each node's proxy is busy with a fault.
    proxy_busy: BTreeMap<String, i64>,
    idle_busy: bool,
    api_busy: bool,
    failed_exits: usize,
}

const MS: i64 = 1000;

impl Harness<'_> {
    fn command(&self, name: &str) -> Command {
        let cfg = self.cfg;
        let mut c = Command::new(NODE);
        c.args(["--url", &self.env.node_url(name), "--name", name])
            .args(["--app-version", "1.1", "--tasks", cfg.tasks])
            .args(["--task-ms", &cfg.task_ms.to_string()])
            .args(["--ttl-ms", &cfg.ttl_ms.to_string()])
            .args(["--margin-ms", &cfg.margin_ms.to_string()])
            .arg("--audit-dir")
            .arg(&self.dir)
            .args(self.env.node_args(name));
        if !cfg.wait_out {
            c.arg("--no-wait-out");
        }
        if !cfg.loss_signal {
            c.arg("--no-loss-signal");
        }
        if let Some(marker) = &self.marker {
            c.args(["--rollbacks", "--fail-task", "t2", "--fail-while"])
                .arg(marker);
        }
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.stderr")))
            .expect("the node's stderr file");
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        c
    }

    fn spawn(&mut self, name: &str) -> NodeProc {
        let child = self.command(name).spawn().expect("start a node process");
        let pid = child.id().expect("a running child has a pid");
        self.lives.push(Life {
            pid,
            spawned: now_us(),
            died: None,
            code: None,
        });
        NodeProc {
            name: name.to_owned(),
            child: Some(child),
            pid,
            life: self.lives.len() - 1,
            stopped: None,
            done: false,
            restart_at: None,
        }
    }

    fn respawn(&mut self, i: usize) {
        let name = self.procs[i].name.clone();
        self.procs[i] = self.spawn(&name);
    }

    /// Records that process `i` ended with `status`.
    fn reaped(&mut self, i: usize, status: std::process::ExitStatus) {
        let p = &mut self.procs[i];
        p.child = None;
        let life = &mut self.lives[p.life];
        let died = *life.died.get_or_insert(now_us());
        life.code = status.code();
        if let Some(e) = p.stopped.take() {
            self.events[e].until.get_or_insert(died);
        }
    }

    /// SIGKILL process `i`, wait for it, start it again.
    async fn kill(&mut self, i: usize) {
        let (pid, life) = (self.procs[i].pid, self.procs[i].life);
        if let Some(child) = self.procs[i].child.as_mut() {
            signal(pid, Signal::SIGKILL);
            // The process runs nothing once kill(2) returned (the reaping
            // below may come much later on a loaded host).
            self.lives[life].died = Some(now_us());
            if let Ok(status) = child.wait().await {
                self.reaped(i, status);
            }
        }
        self.respawn(i);
    }

    fn alive(&self, i: usize) -> bool {
        self.procs[i].child.is_some()
    }

    /// Reaps the processes that exited, and restarts those that failed or
    /// were stopped once their restart time came.
    fn tend(&mut self, rng: &mut Rng) {
        let now = now_us();
        for i in 0..self.procs.len() {
            if let Some(at) = self.procs[i].restart_at {
                if now >= at {
                    self.respawn(i);
                }
                continue;
            }
            let Some(child) = self.procs[i].child.as_mut() else {
                continue;
            };
            if let Ok(Some(status)) = child.try_wait() {
                self.reaped(i, status);
                match status.code() {
                    Some(0) => self.procs[i].done = true,
                    code => {
                        if code != Some(3) {
                            self.failed_exits += 1;
                        }
                        self.procs[i].restart_at = Some(now + rng.range(50, 250) as i64 * MS);
                    }
                }
            }
        }
    }

    fn event(&mut self, kind: Kind, node: Option<usize>, detail: String) -> usize {
        let (name, pid) = match node {
            Some(i) => (Some(self.procs[i].name.clone()), Some(self.procs[i].pid)),
            None => (None, None),
        };
        self.events.push(Event {
            kind,
            node: name,
            pid,
            at: now_us(),
            until: None,
            detail,
        });
        self.events.len() - 1
    }

    fn end_event(&mut self, e: usize) {
        self.events[e].until.get_or_insert(now_us());
    }

    /// The index of the node that holds the lease, if the harness can tell.
    async fn holder(&self) -> Option<usize> {
        let lock = self.env.lock();
        let lease = tokio::time::timeout(Duration::from_millis(500), lock.current("cluster"))
            .await
            .ok()?
            .ok()??;
        self.procs
            .iter()
            .position(|p| Some(&p.name) == lease.holder.pod.as_ref())
    }

    async fn run_later(&mut self, due_before: i64) {
        let mut i = 0;
        while i < self.later.len() {
            if self.later[i].0 > due_before {
                i += 1;
                continue;
            }
            let (_, what) = self.later.remove(i);
            match what {
                Later::Cont(p, e) => {
                    if self.procs[p].stopped == Some(e) {
                        signal(self.procs[p].pid, Signal::SIGCONT);
                        self.procs[p].stopped = None;
                    }
                    self.end_event(e);
                }
                Later::Heal(node, cut, e) => {
                    if let Some(proxy) = self.env.proxy(&node) {
                        if cut {
                            proxy.cut();
                        }
                        proxy.heal();
                    }
                    self.proxy_busy.remove(&node);
                    self.end_event(e);
                }
                Later::IdleReset(e) => {
                    self.env.idle_session_timeout(None).await;
                    self.idle_busy = false;
                    self.end_event(e);
                }
                Later::ApiHeal(e) => {
                    self.env.api_heal().await;
                    self.api_busy = false;
                    self.end_event(e);
                }
            }
        }
    }

    fn proxy_free(&self, node: &str) -> bool {
        self.env.proxy(node).is_some() && !self.proxy_busy.contains_key(node)
    }

    /// Injects a fault of `kind` at node `n` (or the server).
    async fn inject(&mut self, kind: Kind, n: usize, rng: &mut Rng) {
        let now = now_us();
        let ttl = self.cfg.ttl_ms as i64 * MS;
        let name = self.procs[n].name.clone();
        match kind {
            Kind::Kill => {
                let e = self.event(Kind::Kill, Some(n), String::new());
                self.kill(n).await;
                self.end_event(e);
            }
            Kind::Stop | Kind::ShortStop if self.alive(n) && self.procs[n].stopped.is_none() => {
                let hold = if kind == Kind::Stop {
                    ttl + rng.range(300, 1000) as i64 * MS
                } else {
                    let margin = self.cfg.margin_ms;
                    rng.range(10, margin.saturating_sub(60).max(20)) as i64 * MS
                };
                let e = self.event(kind, Some(n), format!("for {} ms", hold / MS));
                signal(self.procs[n].pid, Signal::SIGSTOP);
                self.procs[n].stopped = Some(e);
                if kind == Kind::ShortStop {
                    tokio::time::sleep(Duration::from_micros(hold as u64)).await;
                    self.run_later_cont(n, e);
                } else {
                    self.later.push((now + hold, Later::Cont(n, e)));
                }
            }
            Kind::Term if self.alive(n) && self.procs[n].stopped.is_none() => {
                self.event(Kind::Term, Some(n), String::new());
                signal(self.procs[n].pid, Signal::SIGTERM);
            }
            Kind::ServerRestart => {
                let e = self.event(Kind::ServerRestart, None, String::new());
                self.env.restart_server().await;
                self.end_event(e);
            }
            Kind::LeaseSession => {
                let e = self.event(Kind::LeaseSession, Some(n), String::new());
                let killed = self.env.terminate_lease_session().await;
                self.settle(e, killed, "sessions");
            }
            Kind::NodeSessions => {
                let e = self.event(Kind::NodeSessions, Some(n), String::new());
                let killed = self.env.terminate_sessions_of(&name).await;
                self.settle(e, killed, "sessions");
            }
            Kind::IdleTimeout if !self.idle_busy => {
                let t = rng.range(100, 400);
                let e = self.event(Kind::IdleTimeout, None, format!("{t} ms"));
                if self
                    .env
                    .idle_session_timeout(Some(Duration::from_millis(t)))
                    .await
                {
                    self.idle_busy = true;
                    let until = now + rng.range(500, 2000) as i64 * MS;
                    self.later.push((until, Later::IdleReset(e)));
                } else {
                    self.settle(e, 0, "");
                }
            }
            Kind::ClockStep => {
                let by = rng.range(self.cfg.ttl_ms + 500, 5 * self.cfg.ttl_ms + 1000) as i64;
                let by = if rng.below(2) == 0 { by } else { -by };
                let e = self.event(Kind::ClockStep, None, format!("{by:+} ms"));
                if self.env.step_clock(by).await {
                    self.end_event(e);
                } else {
                    self.settle(e, 0, "");
                }
            }
            Kind::ApiFault if !self.api_busy => {
                let e = self.event(Kind::ApiFault, None, String::new());
                match self.env.api_fault(rng.below(3)).await {
                    Some(detail) => {
                        let window = rng.range(300, 1500);
                        self.events[e].detail = format!("{detail} for {window} ms");
                        self.api_busy = true;
                        self.later
                            .push((now + window as i64 * MS, Later::ApiHeal(e)));
                    }
                    None => self.settle(e, 0, ""),
                }
            }
            Kind::Cut if self.proxy_free(&name) => {
                let e = self.event(Kind::Cut, Some(n), String::new());
                let cut = self.env.proxy(&name).map_or(0, |p| p.cut());
                self.settle(e, cut, "connections");
            }
            Kind::Delay | Kind::Blackhole | Kind::Isolate if self.proxy_free(&name) => {
                let e = self.event(kind, Some(n), String::new());
                let (dirs, flow, window, mut detail) = match kind {
                    Kind::Delay => {
                        let d = if rng.below(2) == 0 {
                            Direction::Up
                        } else {
                            Direction::Down
                        };
                        let by = rng.range(20, 800);
                        let flow = Flow::Delay(Duration::from_millis(by));
                        (
                            vec![d],
                            flow,
                            rng.range(300, 1500),
                            format!("{d:?} by {by} ms"),
                        )
                    }
                    Kind::Blackhole => {
                        let dirs = match rng.below(3) {
                            0 => vec![Direction::Up],
                            1 => vec![Direction::Down],
                            _ => vec![Direction::Up, Direction::Down],
                        };
                        let detail = format!("{dirs:?}");
                        (dirs, Flow::Hold, rng.range(200, 1500), detail)
                    }
                    _ => {
                        let both = vec![Direction::Up, Direction::Down];
                        (
                            both,
                            Flow::Hold,
                            rng.range(600, 2000),
                            "both ways".to_owned(),
                        )
                    }
                };
                let proxy = self.env.proxy(&name).expect("checked");
                for d in dirs {
                    proxy.set(d, flow);
                }
                if kind == Kind::Isolate {
                    let killed = self.env.terminate_sessions_of(&name).await;
                    detail = format!("{killed} sessions terminated, held {detail}");
                }
                let cut = kind != Kind::Delay && rng.below(2) == 0;
                self.events[e].detail = format!(
                    "{detail} for {window} ms{}",
                    if cut { ", then cut" } else { "" }
                );
                let until = now + window as i64 * MS;
                self.proxy_busy.insert(name.clone(), until);
                self.later.push((until, Later::Heal(name, cut, e)));
            }
            _ => {}
        }
    }

    /// Ends event `e` that did `count` things, or drops it if it did none
    /// (nothing to terminate or cut: no fault happened). `e` is the newest
    /// event, so no other index moves.
    fn settle(&mut self, e: usize, count: u64, what: &str) {
        assert_eq!(e, self.events.len() - 1);
        if count == 0 {
            self.events.pop();
        } else {
            self.events[e].detail = format!("{count} {what}");
            self.end_event(e);
        }
    }

    fn run_later_cont(&mut self, n: usize, e: usize) {
        if self.procs[n].stopped == Some(e) {
            signal(self.procs[n].pid, Signal::SIGCONT);
            self.procs[n].stopped = None;
        }
        self.end_event(e);
    }

    /// The random faults, for 2.5-4 s.
    async fn random_faults(&mut self, rng: &mut Rng) {
        let mut kinds = vec![
            (Kind::Kill, 4),
            (Kind::Stop, 4),
            (Kind::ShortStop, 2),
            (Kind::Term, 3),
        ];
        for k in self.env.kinds() {
            kinds.push((*k, if *k == Kind::IdleTimeout { 1 } else { 2 }));
        }
        let total: u64 = kinds.iter().map(|k| k.1).sum();
        let until = now_us() + rng.range(2500, 4000) as i64 * MS;
        let mut next = now_us() + rng.range(150, 500) as i64 * MS;
        while now_us() < until {
            let wake = self
                .later
                .iter()
                .map(|l| l.0)
                .min()
                .unwrap_or(i64::MAX)
                .min(next)
                .min(now_us() + 50 * MS);
            let wait = (wake - now_us()).max(0) as u64;
            tokio::time::sleep(Duration::from_micros(wait)).await;
            self.run_later(now_us()).await;
            self.tend(rng);
            if now_us() < next {
                continue;
            }
            next = now_us() + rng.range(150, 500) as i64 * MS;
            let mut n = rng.below(self.procs.len() as u64) as usize;
            // Half the faults hit the lease holder: the node whose death,
            // pause or isolation matters.
            if rng.below(2) == 0 {
                if let Some(h) = self.holder().await {
                    n = h;
                }
            }
            let mut pick = rng.below(total);
            let kind = kinds
                .iter()
                .find(|(_, w)| {
                    if pick < *w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .expect("weights add up")
                .0;
            self.inject(kind, n, rng).await;
        }
    }

    /// The node running task code first, once one does (within 30 s).
    async fn first_runner(&mut self) -> Option<usize> {
        let deadline = now_us() + 30_000 * MS;
        loop {
            let logs = audit::read_dir(&self.dir).unwrap_or_default();
            let running = logs
                .iter()
                .find(|l| l.records.iter().any(|r| matches!(r, Record::Run { .. })));
            if let Some(log) = running {
                if let Some(i) = self.procs.iter().position(|p| p.pid == log.pid) {
                    return Some(i);
                }
            }
            if now_us() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The negative controls' faults, once the holder runs a task: isolate
    /// it for a while, or step the clock and let the cluster run for half a
    /// task.
    async fn at_first_task(&mut self, plan: Plan, rng: &mut Rng) {
        let Some(n) = self.first_runner().await else {
            return;
        };
        let name = self.procs[n].name.clone();
        let (e, wait) = match plan {
            Plan::IsolateHolder { ms } => {
                let e = self.event(Kind::Isolate, Some(n), String::new());
                if let Some(proxy) = self.env.proxy(&name) {
                    proxy.set(Direction::Up, Flow::Hold);
                    proxy.set(Direction::Down, Flow::Hold);
                }
                let killed = self.env.terminate_sessions_of(&name).await;
                self.events[e].detail =
                    format!("{killed} sessions terminated, held both ways for {ms} ms");
                (e, ms)
            }
            Plan::StepClock { ms } => {
                let e = self.event(Kind::ClockStep, None, format!("{ms:+} ms"));
                assert!(self.env.step_clock(ms).await, "stepping the clock");
                // The others take the lease at their next poll, within 100 ms.
                (e, self.cfg.task_ms / 2)
            }
            Plan::RestartServer => {
                let e = self.event(Kind::ServerRestart, None, String::new());
                self.env.restart_server().await;
                self.end_event(e);
                (e, self.cfg.task_ms / 2)
            }
            Plan::Random | Plan::Backfill { .. } => unreachable!("not a single fault"),
        };
        let until = now_us() + wait as i64 * MS;
        while now_us() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.tend(rng);
        }
        if let Some(proxy) = self.env.proxy(&name) {
            proxy.heal();
        }
        self.end_event(e);
    }

    /// Heals every fault and waits until every node is READY, restarting
    /// failed ones as an orchestrator would. Returns the L2/L3 violations.
    async fn converge(&mut self) -> Vec<String> {
        self.run_later(i64::MAX).await;
        for i in 0..self.procs.len() {
            if let Some(e) = self.procs[i].stopped.take() {
                signal(self.procs[i].pid, Signal::SIGCONT);
                self.end_event(e);
            }
        }
        for p in &self.procs {
            if let Some(proxy) = self.env.proxy(&p.name) {
                proxy.heal();
            }
        }
        self.env.idle_session_timeout(None).await;
        if let Some(marker) = &self.marker {
            let _ = std::fs::remove_file(marker);
        }
        let deadline = now_us() + 60_000 * MS;
        let mut violations = Vec::new();
        let mut restarts = 0;
        for i in 0..self.procs.len() {
            loop {
                if self.procs[i].done && self.procs[i].child.is_none() {
                    break;
                }
                if self.procs[i].child.is_none() {
                    if restarts > 20 * self.procs.len() {
                        violations.push(format!("L3: {} kept failing", self.procs[i].name));
                        break;
                    }
                    self.respawn(i);
                    restarts += 1;
                }
                let left = Duration::from_micros((deadline - now_us()).max(0) as u64);
                let name = self.procs[i].name.clone();
                let child = self.procs[i].child.as_mut().expect("running");
                let status = match tokio::time::timeout(left, child.wait()).await {
                    Ok(status) => status.expect("waiting for a node"),
                    Err(_) => {
                        violations.push(format!(
                            "L2/L3: {name} did not become READY within 60 s after healing"
                        ));
                        let _ = child.start_kill();
                        let status = child.wait().await.expect("waiting for a node");
                        self.reaped(i, status);
                        break;
                    }
                };
                self.reaped(i, status);
                match status.code() {
                    Some(0) => self.procs[i].done = true,
                    Some(3) => {}
                    _ => self.failed_exits += 1,
                }
            }
        }
        violations
    }
}

/// Samples the store while the trial runs: the data version and completed
/// tasks must never go back (S4), except a task whose version was rolled
/// back (a completed rollback row after its completion).
fn sampler(store: Arc<dyn Store>, done: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut violations = Vec::new();
        let mut last: Option<Snapshot> = None;
        while !done.load(Ordering::SeqCst) {
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
                            let history = store.history("cluster").await.unwrap_or_default();
                            let rows: Vec<&HistoryEntry> =
                                history.iter().filter(|h| &h.key == k).collect();
                            let last_done = rows.iter().rposition(|h| {
                                h.kind == AttemptKind::Run && h.state == AttemptState::Completed
                            });
                            let undone = rows.iter().rposition(|h| {
                                h.kind == AttemptKind::Rollback
                                    && h.state == AttemptState::Completed
                            });
                            if undone <= last_done || undone.is_none() {
                                violations.push(format!("S4: {k} went back from completed"));
                            }
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

/// Runs trial `index` with `seed` against `env`.
pub async fn run(env: &mut dyn ClusterBackend, cfg: &Config, index: usize, seed: u64) -> Trial {
    let names: Vec<String> = (0..cfg.nodes).map(|n| format!("n{n}")).collect();
    env.fresh(index, &names).await;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(seed);
    let failing_task = cfg.plan == Plan::Random && index % 3 == 1;
    let marker = dir.path().join("t2.fails");
    if failing_task {
        File::create(&marker).unwrap();
    }
    let done = Arc::new(AtomicBool::new(false));
    let sampling = sampler(env.store(), done.clone());
    let mut h = Harness {
        env,
        cfg,
        dir: dir.path().to_owned(),
        marker: failing_task.then_some(marker),
        procs: Vec::new(),
        lives: Vec::new(),
        events: Vec::new(),
        later: Vec::new(),
        proxy_busy: BTreeMap::new(),
        idle_busy: false,
        api_busy: false,
        failed_exits: 0,
    };
    if failing_task {
        h.event(Kind::FailingTask, None, "t2".to_owned());
    }
    for name in &names {
        let p = h.spawn(name);
        h.procs.push(p);
    }
    match cfg.plan {
        Plan::Random => h.random_faults(&mut rng).await,
        Plan::Backfill { faults } => h.backfill_faults(faults, &mut rng).await,
        plan => h.at_first_task(plan, &mut rng).await,
    }
    if failing_task {
        h.end_event(0);
    }
    let mut violations = h.converge().await;
    done.store(true, Ordering::SeqCst);
    violations.extend(sampling.await.unwrap());
    let store = h.env.store();
    let history = store.history("cluster").await.unwrap();
    let snapshot = store.load("cluster").await.unwrap();
    let logs = audit::read_dir(dir.path()).unwrap();
    Trial {
        events: h.events,
        lives: h.lives,
        logs,
        history,
        snapshot,
        violations,
        failing_task,
        failed_exits: h.failed_exits,
        dir,
    }
}

/// The stderr of every node of a trial, for a failure's message.
pub fn stderr_tail(dir: &Path) -> String {
    let mut out = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "stderr"))
        .collect();
    paths.sort();
    for p in paths {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(15)..];
        out.push_str(&format!(
            "--- {} (last {} lines)\n",
            p.display(),
            tail.len()
        ));
        for l in tail {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}
