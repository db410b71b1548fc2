//! Scenario 6d for one backend: the calls waiting nodes make through an
//! upgrade, and the commands the server counts for them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use upsilon::backend::Backend;

use crate::convergence::upsilon_round;
use crate::instrument::Instrumented;
use crate::report::{Report, Row, Unit};
use crate::Options;

use super::{Kind, Subject};

/// The Redis commands the backend sends itself (its error for a missing
/// permission lists them); every other command it runs is inside one of
/// its Lua scripts.
const REDIS_SENT: &[&str] = &[
    "evalsha",
    "eval",
    "script|load",
    "ping",
    "scan",
    "subscribe",
];

/// What one upgrade with `n` waiting nodes cost: each node's calls, the
/// server's commands, how long it took.
struct Load {
    calls: BTreeMap<&'static str, u64>,
    commands: Option<BTreeMap<String, u64>>,
    wait_s: f64,
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.saturating_sub(before.get(k).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, v)| *v > 0)
        .collect()
}

async fn load_round(
    subject: &Subject<'_>,
    o: &Options,
    service: &str,
    n: usize,
) -> anyhow::Result<Load> {
    let canary = subject.open().await?;
    let mut counted = Vec::with_capacity(n);
    let mut nodes: Vec<Arc<dyn Backend>> = Vec::with_capacity(n);
    for _ in 0..n {
        let node = Arc::new(Instrumented::new(subject.open().await?));
        counted.push(node.clone());
        nodes.push(node);
    }
    let before = subject.server_commands().await?;
    let started = Instant::now();
    upsilon_round(
        service,
        &canary,
        &nodes,
        Duration::from_millis(o.load_ms),
        |b| b,
        async { Ok(()) },
    )
    .await?;
    let wait_s = started.elapsed().as_secs_f64();
    let after = subject.server_commands().await?;
    let mut calls = BTreeMap::new();
    for node in &counted {
        for (op, c) in node.calls() {
            *calls.entry(op).or_default() += c;
        }
    }
    Ok(Load {
        calls,
        commands: before.zip(after).map(|(b, a)| delta(&b, &a)),
        wait_s,
    })
}

/// 6d: the calls `--load-nodes` waiting nodes make through an upgrade of
/// `--load-ms`, and the server's commands where it counts them.
pub(super) async fn load(
    subject: &Subject<'_>,
    o: &Options,
    report: &mut Report,
    pg_calls: &mut Option<f64>,
) -> anyhow::Result<Value> {
    let n = o.load_nodes;
    let name = subject.name();
    let secs = o.load_ms as f64 / 1000.0;
    eprintln!("  6d: {name}, {n} waiting nodes, {secs} s upgrade");
    let with = load_round(subject, o, "backends-load", n).await?;
    // The server's commands are counted for every client: an upgrade with
    // no waiting node tells the canary's share, which is subtracted.
    let alone = match with.commands {
        Some(_) => Some(load_round(subject, o, "backends-load-alone", 0).await?),
        None => None,
    };
    // A wait on a backend with notifications is no call to the server; on
    // one without, it is a sleep.
    let calls: u64 = with
        .calls
        .iter()
        .filter(|(op, _)| **op != "wait")
        .map(|(_, c)| c)
        .sum();
    let per_node = calls as f64 / n as f64;
    let measure = |what: &str| format!("{name}: {what}, {n} nodes, {secs} s upgrade");
    let mut row = Row::new(
        "6d",
        measure("backend calls per waiting node"),
        Unit::Count,
        per_node,
    );
    if subject.kind == Kind::Postgres {
        *pg_calls = Some(per_node);
    } else if let Some(pg) = *pg_calls {
        row = row.vs("PostgreSQL, 6d", pg);
    }
    report.push(row.at_most(3.0, "<= 3"));
    report.push(Row::new(
        "6d",
        measure("backend calls per waiting node per second"),
        Unit::PerS,
        per_node / with.wait_s,
    ));
    let mut commands_json = Value::Null;
    if let (Some(all), Some(alone)) = (
        &with.commands,
        alone.as_ref().and_then(|a| a.commands.as_ref()),
    ) {
        let (noun, note) = subject.kind.count_name();
        let total = |m: &BTreeMap<String, u64>| m.values().sum::<u64>() as f64;
        let waiters = (total(all) - total(alone)).max(0.0) / n as f64;
        report.push(Row::new(
            "6d",
            measure(&format!("{noun} per waiting node{note}")),
            Unit::Count,
            waiters,
        ));
        report.push(Row::new(
            "6d",
            measure(&format!("{noun} per waiting node per second")),
            Unit::PerS,
            waiters / with.wait_s,
        ));
        // Redis counts the commands a Lua script runs as well as the
        // script's call: the calls, pings and subscriptions alone are what
        // the nodes sent.
        if all.contains_key("evalsha") {
            let sent = |m: &BTreeMap<String, u64>| {
                m.iter()
                    .filter(|(c, _)| REDIS_SENT.contains(&c.as_str()))
                    .map(|(_, v)| *v)
                    .sum::<u64>() as f64
            };
            report.push(Row::new(
                "6d",
                measure("requests per waiting node (commands sent, not run by scripts)"),
                Unit::Count,
                (sent(all) - sent(alone)).max(0.0) / n as f64,
            ));
        }
        commands_json = json!({"with_waiters": all, "canary_alone": alone});
    }
    Ok(json!({
        "nodes": n, "upgrade_s": secs, "wait_s": with.wait_s,
        "calls_by_method": with.calls, "server_commands": commands_json,
    }))
}
