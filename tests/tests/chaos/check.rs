//! The checker: what a trial's audit logs, fault records and store say
//! about the invariants.
//!
//! - E1: no two node processes run task code (a task or a rollback) at
//!   overlapping times, unless the one that ran under the older fence was
//!   paused (SIGSTOP) for longer than its safety margin after it asked for
//!   the lease it ran under and before its run stopped; and a
//!   paused node's writes after it resumes commit only while its fence is
//!   still the newest (no other node has claimed the store since: S2 seen
//!   from outside).
//! - the lease: no node renews a lease after another was granted a newer one;
//! - effects: two holders ran the same task at once only if the older one's
//!   completion never committed;
//! - S3: at most one live completion per task (a completed rollback undoes one);
//! - L2: every task completed and the data version at the target.

use std::collections::BTreeMap;

use upsilon::backend::{AttemptKind, AttemptState};
use upsilon_tests::audit::{Ended, Outcome, Record};
use upsilon_tests::clock::ms;

use crate::trial::{Config, Event, Kind, Trial};

/// One run of task code.
#[derive(Debug, Clone)]
pub struct Run {
    pub node: String,
    pub pid: u32,
    pub task: String,
    pub rollback: bool,
    pub fence: u64,
    pub start: i64,
    /// When it stopped: its end record, or else its process's death.
    pub end: i64,
    pub ended: Option<Ended>,
}

impl Run {
    fn name(&self, t0: i64) -> String {
        format!(
            "{}{} on {} (pid {}, fence {}) {}..{}",
            self.task,
            if self.rollback { " (rollback)" } else { "" },
            self.node,
            self.pid,
            self.fence,
            ms(self.start - t0),
            if self.end == i64::MAX {
                "never stopped".to_owned()
            } else {
                ms(self.end - t0)
            }
        )
    }
}

/// Two runs of task code at once.
#[derive(Debug, Clone)]
pub struct Overlap {
    pub a: Run,
    pub b: Run,
    pub start: i64,
    pub end: i64,
    /// The pause that explains it, if one does.
    pub excuse: Option<String>,
    /// The newest fault before it that hit one of the two nodes or the
    /// server.
    pub cause: Option<Kind>,
}

impl Overlap {
    pub fn len(&self) -> i64 {
        self.end - self.start
    }
}

/// What the checker found in one trial.
#[derive(Debug, Default)]
pub struct Checked {
    pub violations: Vec<String>,
    pub overlaps: Vec<Overlap>,
    /// From a holder's SIGTERM to another node's grant, in µs.
    pub handovers: Vec<i64>,
    /// From a holder's SIGTERM to its release, in µs.
    pub releases: Vec<i64>,
    /// Writes that paused nodes sent after they resumed: committed, refused.
    pub writes_after_pause: (usize, usize),
    pub rollback_runs: usize,
    /// Runs the runner cancelled (dropped before they returned).
    pub cancelled_runs: usize,
    /// From the cancellation token firing to the run's end, worst, µs.
    pub worst_cancel_to_stop: i64,
    /// Details for `UPSILON_CHAOS_VERBOSE`.
    pub notes: Vec<String>,
}

fn runs(t: &Trial) -> (Vec<Run>, Vec<String>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let died: BTreeMap<u32, Option<i64>> = t.lives.iter().map(|l| (l.pid, l.died)).collect();
    for log in &t.logs {
        if log.unreadable > 1 {
            problems.push(format!(
                "audit: {} has {} unreadable lines",
                log.path.display(),
                log.unreadable
            ));
        }
        let mut ends = BTreeMap::new();
        for r in &log.records {
            if let Record::End { seq, at, how, .. } = r {
                ends.insert(*seq, (*at, *how));
            }
        }
        for r in &log.records {
            let Record::Run {
                seq,
                task,
                rollback,
                fence,
                at,
                ..
            } = r
            else {
                continue;
            };
            let (end, ended) = match ends.get(seq) {
                Some((end, how)) => (*end, Some(*how)),
                None => match died.get(&log.pid).copied().flatten() {
                    Some(d) => (d, None),
                    None => {
                        problems.push(format!(
                            "audit: run {seq} of {} (pid {}) never stopped, and its process is not known to have died",
                            log.node, log.pid
                        ));
                        (i64::MAX, None)
                    }
                },
            };
            out.push(Run {
                node: log.node.clone(),
                pid: log.pid,
                task: task.clone(),
                rollback: *rollback,
                fence: *fence,
                start: *at,
                end,
                ended,
            });
        }
    }
    (out, problems)
}

/// When process `pid` asked for the lease with `fence`: the send time of
/// the first lease call that gave it that fence (the grant, or the renewal
/// that took up a grant whose reply was lost). The runner's local deadline
/// counts from there.
fn asked(t: &Trial, pid: u32, fence: u64) -> Option<i64> {
    let log = t.logs.iter().find(|l| l.pid == pid)?;
    log.records
        .iter()
        .filter_map(|r| match r {
            Record::Lock {
                op,
                fence: f,
                sent,
                outcome: Outcome::Ok,
                ..
            } if *f == fence && (op == "acquire" || op == "renew") => Some(*sent),
            _ => None,
        })
        .min()
        .or_else(|| {
            log.records.iter().find_map(|r| match r {
                Record::Lock { op, sent, .. } if op == "acquire" => Some(*sent),
                _ => None,
            })
        })
}

/// The pause of `run`'s process that explains its part in an overlap: a
/// SIGSTOP longer than the margin that ended after the process asked for
/// the lease and began before the run stopped.
fn pause_of(t: &Trial, cfg: &Config, run: &Run) -> Option<(Kind, String)> {
    let margin = cfg.margin_ms as i64 * 1000;
    let from = asked(t, run.pid, run.fence).unwrap_or(i64::MIN);
    t.events
        .iter()
        .filter(|e| e.kind.pauses() && e.pid == Some(run.pid))
        .filter_map(|e| Some((e, e.until?)))
        .find(|(e, until)| until - e.at > margin && *until > from && e.at < run.end)
        .map(|(e, until)| {
            (
                e.kind,
                format!("{} paused for {}", run.node, ms(until - e.at)),
            )
        })
}

/// What an unexplained overlap is put down to: the newest fault, at most
/// 5 s before `at`, that hit the node running the older run (the one that
/// should have stopped: it ran under the older fence) or the whole server.
fn cause(events: &[Event], at: i64, a: &Run, b: &Run) -> Option<Kind> {
    let older = if a.fence <= b.fence { a } else { b };
    events
        .iter()
        .filter(|e| e.kind != Kind::FailingTask && e.at <= at)
        .filter(|e| e.until.unwrap_or(e.at) >= at - 5_000_000)
        .filter(|e| e.node.as_ref().is_none_or(|n| *n == older.node))
        .max_by_key(|e| e.at)
        .map(|e| e.kind)
}

pub fn check(cfg: &Config, t: &Trial) -> Checked {
    let mut c = Checked::default();
    let t0 = t.lives.iter().map(|l| l.spawned).min().unwrap_or(0);
    let (runs, problems) = runs(t);
    c.violations.extend(problems);
    c.rollback_runs = runs.iter().filter(|r| r.rollback).count();
    c.cancelled_runs = runs
        .iter()
        .filter(|r| r.ended == Some(Ended::Dropped))
        .count();
    for log in &t.logs {
        for r in &log.records {
            if let Record::End {
                at,
                cancelled_at: Some(cancel),
                ..
            } = r
            {
                c.worst_cancel_to_stop = c.worst_cancel_to_stop.max(at - cancel);
            }
        }
    }

    // E1: task code of two processes at once.
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            if a.pid == b.pid {
                continue;
            }
            let (start, end) = (a.start.max(b.start), a.end.min(b.end));
            if end <= start {
                continue;
            }
            // Only the older run's pause can explain it: the newer holder was
            // granted the lease after the older one's had to end.
            let older = if a.fence <= b.fence { a } else { b };
            let excuse = pause_of(t, cfg, older);
            let o = Overlap {
                a: a.clone(),
                b: b.clone(),
                start,
                end,
                cause: match &excuse {
                    Some((kind, _)) => Some(*kind),
                    None => cause(&t.events, start, a, b),
                },
                excuse: excuse.map(|e| e.1),
            };
            if o.excuse.is_none() {
                c.violations.push(format!(
                    "E1: {} and {} ran at once for {} from {}; no pause explains it; the newest fault before it at the older run's node or the server: {}",
                    a.name(t0),
                    b.name(t0),
                    ms(o.len()),
                    ms(start - t0),
                    o.cause.map_or("none", Kind::name)
                ));
            }
            c.overlaps.push(o);
        }
    }

    // Committed writes and granted leases, per process.
    struct Call<'a> {
        pid: u32,
        node: &'a str,
        op: &'a str,
        fence: u64,
        sent: i64,
        done: i64,
        outcome: Outcome,
        what: &'a str,
    }
    let mut store = Vec::new();
    let mut lock = Vec::new();
    for log in &t.logs {
        for r in &log.records {
            match r {
                Record::Store {
                    op,
                    fence,
                    sent,
                    done,
                    outcome,
                    what,
                } => store.push(Call {
                    pid: log.pid,
                    node: &log.node,
                    op,
                    fence: *fence,
                    sent: *sent,
                    done: *done,
                    outcome: *outcome,
                    what,
                }),
                Record::Lock {
                    op,
                    fence,
                    sent,
                    done,
                    outcome,
                } => lock.push(Call {
                    pid: log.pid,
                    node: &log.node,
                    op,
                    fence: *fence,
                    sent: *sent,
                    done: *done,
                    outcome: *outcome,
                    what: "",
                }),
                _ => {}
            }
        }
    }
    let claims: Vec<&Call<'_>> = store
        .iter()
        .filter(|w| w.op == "claim" && w.outcome == Outcome::Ok)
        .collect();
    for w in store.iter().filter(|w| w.outcome == Outcome::Ok) {
        if let Some(claim) = claims
            .iter()
            .find(|c| c.pid != w.pid && c.fence > w.fence && c.done < w.sent)
        {
            c.violations.push(format!(
                "S2: {} (pid {}) committed a {} with fence {} ({}) at {}, after {} claimed fence {} at {}",
                w.node,
                w.pid,
                w.op,
                w.fence,
                w.what,
                ms(w.sent - t0),
                claim.node,
                claim.fence,
                ms(claim.done - t0)
            ));
        }
    }
    let grants: Vec<&Call<'_>> = lock
        .iter()
        .filter(|l| l.op == "acquire" && l.outcome == Outcome::Ok)
        .collect();
    for r in lock
        .iter()
        .filter(|l| l.op == "renew" && l.outcome == Outcome::Ok)
    {
        if let Some(g) = grants
            .iter()
            .find(|g| g.pid != r.pid && g.fence > r.fence && g.done < r.sent)
        {
            c.violations.push(format!(
                "lease: {} (pid {}) renewed fence {} at {}, after {} was granted fence {} at {}",
                r.node,
                r.pid,
                r.fence,
                ms(r.sent - t0),
                g.node,
                g.fence,
                ms(g.done - t0)
            ));
        }
    }
    // A paused node's writes after it resumed.
    let margin = cfg.margin_ms as i64 * 1000;
    for e in t.events.iter().filter(|e| e.kind.pauses()) {
        let Some(until) = e.until else { continue };
        if until - e.at <= margin {
            continue;
        }
        for w in store
            .iter()
            .filter(|w| Some(w.pid) == e.pid && w.sent >= until)
        {
            match w.outcome {
                Outcome::Ok => c.writes_after_pause.0 += 1,
                Outcome::Stale | Outcome::Lost | Outcome::Rejected => c.writes_after_pause.1 += 1,
                _ => {}
            }
        }
    }
    // SIGTERM of a holder: how soon it released, and how soon another node
    // was granted the lease.
    for e in t.events.iter().filter(|e| e.kind == Kind::Term) {
        let Some(pid) = e.pid else { continue };
        let released = lock.iter().find(|l| {
            l.pid == pid && l.op == "release" && l.outcome == Outcome::Ok && l.sent >= e.at
        });
        let Some(released) = released else { continue };
        c.releases.push(released.done - e.at);
        let next = grants
            .iter()
            .filter(|g| g.pid != pid && g.done > e.at)
            .min_by_key(|g| g.done);
        if let Some(g) = next {
            c.handovers.push(g.done - e.at);
            c.notes.push(format!(
                "SIGTERM of {} (pid {pid}) at {}: released after {}, {} (pid {}) granted fence {} after {}",
                e.node.as_deref().unwrap_or("?"),
                ms(e.at - t0),
                ms(released.done - e.at),
                g.node,
                g.pid,
                g.fence,
                ms(g.done - e.at)
            ));
        }
    }

    // Effects: the same task by two holders at once, and the older one's
    // completion committed.
    let mut completed_fences: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for row in &t.history {
        if row.kind == AttemptKind::Run && row.state == AttemptState::Completed {
            completed_fences
                .entry(&row.key.id)
                .or_default()
                .push(row.fence);
        }
    }
    for o in &c.overlaps {
        let (a, b) = (&o.a, &o.b);
        if a.rollback || b.rollback || a.task != b.task || a.fence == b.fence {
            continue;
        }
        let older = a.fence.min(b.fence);
        if completed_fences
            .get(a.task.as_str())
            .is_some_and(|f| f.contains(&older))
        {
            c.violations.push(format!(
                "effects: {} and {} ran at once, and the older one's completion committed",
                a.name(t0),
                b.name(t0)
            ));
        }
    }

    // S3: a completion while the task is completed (no completed rollback
    // between them).
    let mut live: BTreeMap<&str, u64> = BTreeMap::new();
    for row in &t.history {
        match (row.kind, row.state) {
            (AttemptKind::Run, AttemptState::Completed) => {
                if let Some(first) = live.insert(&row.key.id, row.fence) {
                    c.violations.push(format!(
                        "S3: {} completed with fence {} while completed with fence {first}",
                        row.key.id, row.fence
                    ));
                }
            }
            (AttemptKind::Rollback, AttemptState::Completed) => {
                live.remove(row.key.id.as_str());
            }
            _ => {}
        }
    }

    // L2: converged.
    let done = t.snapshot.tasks.values().filter(|s| s.completed).count();
    let ran = runs
        .iter()
        .filter(|r| !r.rollback)
        .map(|r| r.task.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    if done != cfg.task_count || ran != cfg.task_count {
        c.violations.push(format!(
            "L2: {done} of {} tasks completed ({ran} ran)",
            cfg.task_count
        ));
    }
    let dv = t.snapshot.data_version.as_ref().map(|d| d.to_string());
    if dv.as_deref() != Some(cfg.target) {
        c.violations.push(format!(
            "L2: the data version ended at {dv:?}, not {}",
            cfg.target
        ));
    }
    c
}
