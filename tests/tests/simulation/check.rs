//! The checker: after every trial, S1-S5 and S7 on the backend's logs and
//! the READY reports, E1 and the local deadline on the record of when task
//! code ran, effects, and writes refused as protocol violations.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use upsilon::backend::{AttemptKind, AttemptState, Change};
use upsilon::TaskKey;

use crate::link::describe;
use crate::world::{lock, Code, Run, World};
use crate::{key, APP, TASKS};

/// What the checker found besides violations.
pub struct Tally {
    /// E1 overlaps whose older lease was cut short at the backend.
    pub excused: u64,
    /// Grants behind the store's fence, after the lock forgot its state.
    pub behind: u64,
    /// When the first E1 or deadline violation happened, for the report.
    pub focus: Option<Duration>,
}

/// The violations found, and the tally.
pub fn check(world: &World) -> (Vec<String>, Tally) {
    let mut v = Vec::new();
    let grants = world.backend.grants();
    // A lock that forgot its state grants low fences again. Those at or
    // below the store's fence when it forgot are behind the store: nothing
    // may run under them. Any fence it grants again is no S1 violation of
    // the runner's (the lock forgot it); the store's checks below (S2, E1)
    // judge what comes of it.
    let amnesias = lock(&world.amnesias).clone();
    let mut behind: BTreeSet<(String, u64)> = BTreeSet::new();
    let mut newest = 0;
    for (i, g) in grants.iter().enumerate() {
        if g.fence <= newest {
            match amnesias.iter().rev().find(|a| a.grants <= i) {
                Some(a) => {
                    if g.fence <= a.store_fence {
                        behind.insert((g.holder.run_id.clone(), g.fence));
                    }
                    continue;
                }
                None => v.push(format!("S1: fence {} granted after {newest}", g.fence)),
            }
        }
        newest = newest.max(g.fence);
    }
    for r in lock(&world.runs).iter() {
        if behind.contains(&(r.run_id.clone(), r.fence)) {
            v.push(format!(
                "S2: {} ran under a grant behind the store's fence",
                r.describe()
            ));
        }
    }
    let commits = world.backend.commits();
    // Per task, its committed run completions (by fence) and completed
    // rollbacks, in commit order: a task is completed again only after a
    // rollback undid it.
    let mut completions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut last_done: BTreeMap<String, bool> = BTreeMap::new();
    let mut kinds: BTreeMap<(TaskKey, u32), AttemptKind> = BTreeMap::new();
    let mut last_data: Option<upsilon::Version> = None;
    let mut done_before: BTreeSet<TaskKey> = BTreeSet::new();
    let order: Vec<TaskKey> = TASKS.iter().map(|(ver, _, id)| key(ver, id)).collect();
    for c in &commits {
        if c.fence != c.newest {
            v.push(format!(
                "S2: a write with fence {} committed while the store's newest fence was {}: {:?}",
                c.fence,
                c.newest,
                c.changes.iter().map(describe).collect::<Vec<_>>()
            ));
        }
        let mut undone: BTreeSet<&TaskKey> = BTreeSet::new();
        for change in &c.changes {
            match change {
                Change::Start(s) => {
                    kinds.insert((s.key.clone(), s.attempt), s.kind);
                }
                Change::Finish(f) if f.state == AttemptState::Completed => {
                    let kind = kinds.get(&(f.key.clone(), f.attempt)).copied();
                    let id = f.key.id.clone();
                    if kind == Some(AttemptKind::Rollback) {
                        undone.insert(&f.key);
                        last_done.insert(id, false);
                        continue;
                    }
                    if last_done.get(&id) == Some(&true) {
                        v.push(format!(
                            "S3: task {id} completed again under fence {} (completed before under {:?}) with no rollback between",
                            c.fence,
                            completions.get(&id)
                        ));
                    }
                    last_done.insert(id.clone(), true);
                    completions.entry(id).or_default().push(c.fence);
                }
                _ => {}
            }
        }
        if c.after.data_version < last_data {
            v.push(format!(
                "S4: data version went from {last_data:?} to {:?}",
                c.after.data_version
            ));
        }
        last_data = c.after.data_version.clone();
        let done: BTreeSet<TaskKey> = order
            .iter()
            .filter(|k| c.after.is_completed(k))
            .cloned()
            .collect();
        if let Some(lost) = done_before.difference(&done).find(|k| !undone.contains(k)) {
            v.push(format!(
                "S4: task {lost} went back from completed without a rollback"
            ));
        }
        if let Some(first_missing) = order.iter().position(|k| !done.contains(k)) {
            if let Some(later) = order[first_missing..].iter().find(|k| done.contains(k)) {
                v.push(format!(
                    "S5: {later} completed before {}",
                    order[first_missing]
                ));
            }
        }
        if let Some(d) = &c.after.data_version {
            if let Some(k) = order.iter().find(|k| &k.version <= d && !done.contains(k)) {
                v.push(format!(
                    "S5: data version {d} recorded while {k} was not complete"
                ));
            }
        }
        done_before = done;
    }
    let runs = lock(&world.runs).clone();
    let horizon = world.now();
    let end = |r: &Run| r.end.unwrap_or(horizon);
    // Effects: two holders ran a task at once only if the older one's
    // completion never committed.
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            let overlap = a.code == Code::Task
                && b.code == Code::Task
                && a.task == b.task
                && a.fence != b.fence
                && a.start < end(b)
                && b.start < end(a);
            if overlap {
                let older = a.fence.min(b.fence);
                if completions.get(&a.task).is_some_and(|f| f.contains(&older)) {
                    v.push(format!(
                        "effects: {} ran under fences {} and {} at once and the older one's completion committed",
                        a.task, a.fence, b.fence
                    ));
                }
            }
        }
    }
    let mut focus = None;
    let excused = e1(world, &runs, horizon, &mut v, &mut focus);
    // The mechanism under E1: task code ends by its holder's local deadline,
    // and none starts after it (a grant whose reply comes after the
    // deadline is given up before anything runs).
    let deadlines = lock(&world.deadlines).clone();
    for r in &runs {
        match deadlines.get(&(r.run_id.clone(), r.fence)) {
            Some(by) if r.start > *by || end(r) > *by => {
                focus.get_or_insert(*by);
                v.push(format!(
                    "deadline: {}, past its local deadline at {} ms at the latest",
                    r.describe(),
                    by.as_millis()
                ))
            }
            Some(_) => {}
            None => v.push(format!(
                "deadline: {}, under a fence it was never granted",
                r.describe()
            )),
        }
    }
    for r in lock(&world.rejected).iter() {
        v.push(format!("refused as a protocol violation: {r}"));
    }
    v.extend(lock(&world.ready_violations).iter().cloned());
    let app = upsilon::parse_version(APP).unwrap();
    if last_data.as_ref() != Some(&app) && !commits.is_empty() {
        v.push(format!(
            "L2: the data version ended at {last_data:?}, not {APP}"
        ));
    }
    (
        v,
        Tally {
            excused,
            behind: behind.len() as u64,
            focus,
        },
    )
}

/// E1: no two processes run task code (a task or a rollback) at overlapping
/// times, unless the older one's lease was cut short at the backend (a
/// forced expiry, or forward clock jumps above the safety margin while it
/// was live): to the backend, that holder was paused past its margin.
/// Returns the overlaps excused so.
fn e1(
    world: &World,
    runs: &[Run],
    horizon: Duration,
    v: &mut Vec<String>,
    focus: &mut Option<Duration>,
) -> u64 {
    let cut_short = lock(&world.cut_short).clone();
    let end = |r: &Run| r.end.unwrap_or(horizon);
    let mut excused = 0;
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            if a.run_id == b.run_id || !(a.start < end(b) && b.start < end(a)) {
                continue;
            }
            let older = if a.fence <= b.fence { a } else { b };
            if let Some(why) = cut_short.get(&older.fence).filter(|_| a.fence != b.fence) {
                excused += 1;
                world.log(format!(
                    "E1 overlap excused (fence {} was cut short: {why}): {} / {}",
                    older.fence,
                    a.describe(),
                    b.describe()
                ));
                continue;
            }
            focus.get_or_insert(a.start.max(b.start));
            v.push(format!("E1: {} while {}", a.describe(), b.describe()));
        }
    }
    excused
}
