//! Scenarios 6a to 6c for one backend: the start-up of an up-to-date node
//! beside the bare client (6a), convergence of waiting nodes beside the
//! notification floor (6b), and failover after the canary is SIGKILLed
//! (6c).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::ensure;
use serde_json::{json, Value};
use upsilon::Outcome;

use crate::common::{at_released, released_tasks, runner};
use crate::convergence::{grants_row, signed_ms, upsilon_round};
use crate::failover::{upsilon_once, Takeover};
use crate::report::{Report, Row, Unit};
use crate::stats::{ms, summary, Summary};
use crate::Options;

use super::{Kind, Subject};

const SERVICE: &str = "backends-startup";

fn s(x: &Summary) -> Value {
    json!({"n": x.n, "p50": x.p50, "p99": x.p99, "min": x.min, "max": x.max})
}

/// 6a: the start-up of an up-to-date node, connect included, taking turns
/// with the bare client's connect and one read.
pub(super) async fn startup(
    subject: &Subject<'_>,
    o: &Options,
    report: &mut Report,
) -> anyhow::Result<Value> {
    at_released(SERVICE, subject.open().await?).await?;
    let warm = (o.startup_iters / 10).max(1);
    let mut took: [Vec<f64>; 2] = Default::default();
    for i in 0..warm + o.startup_iters {
        for k in 0..2 {
            let which = (k + i) % 2;
            let t = Instant::now();
            if which == 0 {
                let up = runner(SERVICE, "1.0", subject.open().await?, released_tasks())?;
                let outcome = up.run().await?;
                ensure!(
                    matches!(outcome, Outcome::UpToDate { .. }),
                    "{}: expected an up-to-date node, got: {outcome}",
                    subject.name()
                );
            } else {
                subject.bare().await?;
            }
            if i >= warm {
                took[which].push(ms(t.elapsed()));
            }
        }
    }
    let [up, bare] = took.map(|v| summary(&v));
    let (name, base) = (subject.name(), subject.kind.bare_name());
    report.push(
        Row::new(
            "6a",
            format!("{name}: start-up to READY, connect included, p50"),
            Unit::Ms,
            up.p50,
        )
        .vs(base, bare.p50)
        .ratio_at_most(1.2, "<= 1.2x"),
    );
    report.push(
        Row::new(
            "6a",
            format!("{name}: start-up to READY, connect included, p99"),
            Unit::Ms,
            up.p99,
        )
        .vs(base, bare.p99),
    );
    Ok(json!({"iterations": o.startup_iters, "warm_up": warm, "upsilon": s(&up), "bare": s(&bare)}))
}

/// PostgreSQL's p50 at `n` nodes, from scenario 2 when it ran in this run.
fn scenario_2_p50(report: &Report, n: usize) -> Option<f64> {
    let measure = format!("{n} nodes: canary's final commit to last node READY, p50");
    report
        .rows
        .iter()
        .find(|r| r.scenario == "2" && r.measure == measure)
        .map(|r| r.upsilon)
}

/// 6b: `n` waiting nodes while a canary runs a gated task, each node a
/// backend of its own; the canary's final commit to the last node READY.
pub(super) async fn convergence(
    subject: &Subject<'_>,
    o: &Options,
    report: &mut Report,
    pg_here: &mut BTreeMap<usize, f64>,
) -> anyhow::Result<Value> {
    let task = Duration::from_millis(o.task_ms);
    let name = subject.name();
    let mut rounds = Vec::new();
    for &n in &o.backend_nodes {
        eprintln!("  6b: {name}, {n} nodes, {} repeats", o.repeats);
        let canary = subject.open().await?;
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            nodes.push(subject.open().await?);
        }
        let mut ups = Vec::new();
        let mut woken = Vec::new();
        let mut grants = Vec::new();
        for r in 0..o.repeats {
            let service = format!("backends-converge-{n}-{r}");
            let round =
                upsilon_round(&service, &canary, &nodes, task, |b| b, async { Ok(()) }).await?;
            grants.push(round.grants);
            // Counted from the commit where the server tells it apart from
            // the final write's return.
            let shift = subject
                .committed_at(&service)
                .map_or(0.0, |c| signed_ms(round.commit, c));
            ups.push(round.last + shift);
            woken.extend(round.last_woken.map(|w| w + shift));
        }
        drop(nodes);
        drop(canary);
        let floor = subject.floor(n, o.repeats).await?;
        let u = summary(&ups);
        let measure =
            |p: &str| format!("{name}, {n} nodes: canary's final commit to last node READY, {p}");
        let p99 = format!("p99 of {}", o.repeats);
        match (floor.as_deref(), subject.kind.floor_name(n)) {
            (Some(f), Some(floor_name)) => {
                let f = summary(f);
                report.push(
                    Row::new("6b", measure("p50"), Unit::Ms, u.p50)
                        .vs(&floor_name, f.p50)
                        .at_most(10.0, "<= 10 ms"),
                );
                report.push(
                    Row::new("6b", measure(&p99), Unit::Ms, u.p99)
                        .vs(&floor_name, f.p99)
                        .at_most(10.0, "<= 10 ms"),
                );
            }
            _ => {
                report.push(
                    Row::new("6b", measure("p50"), Unit::Ms, u.p50).at_most(10.0, "<= 10 ms"),
                );
                report
                    .push(Row::new("6b", measure(&p99), Unit::Ms, u.p99).at_most(10.0, "<= 10 ms"));
            }
        }
        report.push(grants_row("6b", &format!("{name}, {n} nodes: "), &grants));
        if subject.kind == Kind::Postgres {
            pg_here.insert(n, u.p50);
        } else if let Some(pg) = scenario_2_p50(report, n) {
            report.push(
                Row::new("6b", measure("p50"), Unit::Ms, u.p50).vs("PostgreSQL, scenario 2", pg),
            );
        } else if let Some(pg) = pg_here.get(&n) {
            report.push(Row::new("6b", measure("p50"), Unit::Ms, u.p50).vs("PostgreSQL, 6b", *pg));
        }
        rounds.push(json!({
            "nodes": n,
            "upsilon_ms": ups,
            "upsilon_last_woken_ms": woken,
            "upsilon_grants": grants,
            "floor_ms": floor,
        }));
    }
    Ok(json!({"task_ms": o.task_ms, "repeats": o.repeats, "rounds": rounds}))
}

/// 6c: the canary process SIGKILLed while node processes wait, the lease's
/// TTL `--ttl-ms`.
pub(super) async fn failover(
    subject: &Subject<'_>,
    o: &Options,
    report: &mut Report,
) -> anyhow::Result<Value> {
    let reps = o.failover_repeats;
    let ttl_ms = subject.kind.ttl_ms(o.ttl_ms);
    let name = subject.name();
    eprintln!(
        "  6c: {name}, {} waiters, {reps} kills, TTL {} ms",
        o.failover_waiters, ttl_ms
    );
    let mut kills: Vec<Takeover> = Vec::with_capacity(reps);
    for r in 0..reps {
        let service = format!("backends-failover-{r}");
        kills.push(upsilon_once(o, &service, &subject.url, ttl_ms).await?);
    }
    let holder = summary(&kills.iter().map(|t| t.holder / 1000.0).collect::<Vec<_>>());
    let ready = summary(&kills.iter().map(|t| t.ready / 1000.0).collect::<Vec<_>>());
    let ttl = ttl_ms as f64 / 1000.0;
    let how = if subject.kind.session_tie() {
        format!("{name}, session seen to die, TTL {ttl} s")
    } else {
        format!("{name}, TTL {ttl} s")
    };
    let base = "the TTL";
    report.push(
        Row::new(
            "6c",
            format!("{how}: kill to new lease holder, p50"),
            Unit::S,
            holder.p50,
        )
        .vs(base, ttl),
    );
    let (holder_target, ready_target) = if subject.kind.session_tie() {
        (
            (1.5, "<= 1.5 s (one jittered check)".to_owned()),
            (1.6, "<= 1.5 s + 0.1 s re-run".to_owned()),
        )
    } else {
        (
            (ttl + 0.5, format!("<= TTL + 0.5 s = {:.1} s", ttl + 0.5)),
            (
                ttl + 0.6,
                format!("<= TTL + 0.5 s + 0.1 s re-run = {:.1} s", ttl + 0.6),
            ),
        )
    };
    report.push(
        Row::new(
            "6c",
            format!("{how}: kill to new lease holder, max of {reps}"),
            Unit::S,
            holder.max,
        )
        .vs(base, ttl)
        .at_most(holder_target.0, holder_target.1),
    );
    report.push(
        Row::new(
            "6c",
            format!("{how}: kill to every node READY, max of {reps}"),
            Unit::S,
            ready.max,
        )
        .vs(base, ttl)
        .at_most(ready_target.0, ready_target.1),
    );
    Ok(json!({
        "ttl_ms": ttl_ms, "waiters": o.failover_waiters, "repeats": reps,
        "kills": kills.iter().map(|t| json!({"holder_ms": t.holder, "ready_ms": t.ready})).collect::<Vec<_>>(),
    }))
}
