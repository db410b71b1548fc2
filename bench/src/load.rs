//! Scenario 3: the store's load while N nodes wait through a long upgrade.
//!
//! Counted two ways, for the waiting nodes only:
//! - statements: `pg_stat_statements`, by the role the waiting nodes connect
//!   as (the canary connects as another), `BEGIN`/`COMMIT`/`LISTEN` included;
//! - round trips and connections: the waiting nodes reach the server through
//!   a counting proxy ([`crate::proxy`]); a round trip is a burst of messages
//!   from the node after the server last sent it something, and those that
//!   open a connection (start-up, authentication) are counted apart.
//!
//! Counting starts once every node is connected (pool connection open) and
//! before the canary starts; it ends when every node is READY.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{pg_node, sqlx_connect, Env, Statement, WAITER_ROLE};
use crate::convergence::{grants_row, sqlx_round, upsilon_round};
use crate::proxy::{Proxy, Tally};
use crate::report::{Report, Row, Unit};
use crate::Options;

/// One of a [`Cost`]'s figures.
type Figure = fn(&Cost) -> f64;

/// One way of waiting, and what it cost per node.
struct Cost {
    name: &'static str,
    round_trips: f64,
    setup_round_trips: f64,
    statements: f64,
    held: f64,
    opened: f64,
    wait_s: f64,
    by_statement: Value,
    /// Leases granted in the upgrade, the canary's included (0 for sqlx).
    grants: u64,
    /// Waits each waiting node began (its polls, without notifications).
    polls: f64,
}

async fn reset(env: &Env, proxy: &Proxy) -> anyhow::Result<()> {
    env.reset_statements().await?;
    proxy.reset();
    Ok(())
}

/// Statements run by the waiting nodes' role since the last reset: the
/// total, and the count of each.
async fn statements(env: &Env) -> anyhow::Result<(f64, Value)> {
    let list = env.statements(WAITER_ROLE).await?;
    let total: i64 = list.iter().map(|s| s.calls).sum();
    Ok((total as f64, Statement::json(&list)))
}

fn cost(
    name: &'static str,
    n: usize,
    at_wait: Tally,
    end: Tally,
    stmts: (f64, Value),
    wait: Duration,
) -> Cost {
    let n = n as f64;
    Cost {
        name,
        round_trips: end.queries as f64 / n,
        setup_round_trips: end.setups as f64 / n,
        statements: stmts.0 / n,
        held: at_wait.open as f64 / n,
        opened: end.opened as f64 / n,
        wait_s: wait.as_secs_f64(),
        by_statement: stmts.1,
        grants: 0,
        polls: 0.0,
    }
}

async fn upsilon_cost(
    env: &Env,
    proxy: &Arc<Proxy>,
    o: &Options,
    name: &'static str,
    service: &str,
    // The URL's suffix, and the holder check the waiting nodes make.
    (url_suffix, holder_check): (&str, Option<Duration>),
    upgrade: Duration,
) -> anyhow::Result<Cost> {
    let n = o.load_nodes;
    let canary = pg_node(&env.url, 4, None).await?;
    let url = format!("{}{url_suffix}", env.waiter_url(proxy.port));
    let mut nodes = Vec::with_capacity(n);
    for _ in 0..n {
        nodes.push(pg_node(&url, 1, holder_check).await?);
    }
    reset(env, proxy).await?;
    let at_wait = std::sync::Mutex::new(Tally::default());
    let started = Instant::now();
    let round = upsilon_round(service, &canary, &nodes, upgrade, |b| b, async {
        *at_wait.lock().unwrap_or_else(|p| p.into_inner()) = proxy.tally();
        Ok(())
    })
    .await?;
    let wait = started.elapsed();
    let end = proxy.tally();
    let stmts = statements(env).await?;
    let at_wait = *at_wait.lock().unwrap_or_else(|p| p.into_inner());
    Ok(Cost {
        grants: round.grants,
        polls: round.waits as f64 / n as f64,
        ..cost(name, n, at_wait, end, stmts, wait)
    })
}

async fn sqlx_cost(env: &Env, proxy: &Arc<Proxy>, o: &Options) -> anyhow::Result<Cost> {
    let n = o.load_nodes;
    let schema = "sqlx_load";
    env.sqlx_schema(schema).await?;
    let url = env.waiter_url(proxy.port);
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(sqlx_connect(&url, Some(schema)).await?);
    }
    reset(env, proxy).await?;
    let at_wait = std::sync::Mutex::new(Tally::default());
    let started = Instant::now();
    sqlx_round(
        env,
        schema,
        &env.url,
        conns,
        Duration::from_millis(o.load_ms),
        async {
            *at_wait.lock().unwrap_or_else(|p| p.into_inner()) = proxy.tally();
            Ok(())
        },
    )
    .await?;
    let wait = started.elapsed();
    let end = proxy.tally();
    let stmts = statements(env).await?;
    let at_wait = *at_wait.lock().unwrap_or_else(|p| p.into_inner());
    Ok(cost("sqlx Migrator::run", n, at_wait, end, stmts, wait))
}

pub async fn run(env: &Env, o: &Options, report: &mut Report) -> anyhow::Result<()> {
    let proxy = Arc::new(Proxy::start(env.pg.port()).await?);
    let n = o.load_nodes;
    let secs = o.load_ms as f64 / 1000.0;
    let upgrade = Duration::from_millis(o.load_ms);
    eprintln!("  3: {n} waiting nodes, {secs} s upgrade");
    let default = upsilon_cost(
        env,
        &proxy,
        o,
        "default (blocks on the lease's advisory lock)",
        "load-default",
        ("", None),
        upgrade,
    )
    .await?;
    let off = upsilon_cost(
        env,
        &proxy,
        o,
        "periodic holder check off (every hour)",
        "load-off",
        ("", Some(Duration::from_secs(3600))),
        upgrade,
    )
    .await?;
    let pooled = upsilon_cost(
        env,
        &proxy,
        o,
        "pgbouncer=true (no LISTEN: polls every ~1 s)",
        "load-pooled",
        ("?pgbouncer=true", None),
        upgrade,
    )
    .await?;
    // The same wait twice as long: what one more poll costs, the start-up
    // read and the request for the lease taken out.
    let pooled_long = upsilon_cost(
        env,
        &proxy,
        o,
        "pgbouncer=true, upgrade twice as long",
        "load-pooled-long",
        ("?pgbouncer=true", None),
        upgrade * 2,
    )
    .await?;
    let sqlx = sqlx_cost(env, &proxy, o).await?;
    let base = "sqlx Migrator::run";
    let round_trips: Figure = |c| c.round_trips;
    let statements: Figure = |c| c.statements;
    for (what, of, most) in [
        ("round trips", round_trips, 3.0),
        ("statements", statements, 5.0),
    ] {
        // Behind a transaction pooler the wait is polling, judged per poll below.
        for (c, judged) in [(&default, true), (&off, true), (&pooled, false)] {
            let row = Row::new(
                "3",
                format!("{what} per waiting node, {}", c.name),
                Unit::Count,
                of(c),
            )
            .vs(base, of(&sqlx));
            report.push(if judged {
                row.at_most(most, format!("<= {most}"))
            } else {
                row
            });
        }
    }
    let polls = pooled_long.polls - pooled.polls;
    if polls > 0.0 {
        let per_poll = |long: f64, short: f64| (long - short) / polls;
        report.push(
            Row::new(
                "3",
                format!(
                    "statements per poll, {} (an upgrade twice as long: {:.1} more polls a node)",
                    pooled.name, polls
                ),
                Unit::Count,
                per_poll(pooled_long.statements, pooled.statements),
            )
            .at_most(2.0, "<= 2"),
        );
        report.push(Row::new(
            "3",
            format!("round trips per poll, {}", pooled.name),
            Unit::Count,
            per_poll(pooled_long.round_trips, pooled.round_trips),
        ));
    } else {
        // Polls are jittered around a second: an upgrade shorter than that
        // may add none when made twice as long.
        eprintln!(
            "  3: the upgrade twice as long added no polls ({:.1} a node), so the cost per poll is not measured; \
             a longer --load-ms measures it",
            polls
        );
    }
    report.push(Row::new(
        "3",
        format!(
            "statements per waiting node per second of waiting, {}",
            pooled.name
        ),
        Unit::Count,
        pooled.statements / pooled.wait_s.max(f64::MIN_POSITIVE),
    ));
    for c in [&default, &off, &pooled] {
        report.push(grants_row("3", &format!("{}: ", c.name), &[c.grants]));
    }
    report.push(
        Row::new(
            "3",
            "connections held per waiting node while waiting (default)",
            Unit::Count,
            default.held,
        )
        .vs(base, sqlx.held)
        .at_most(1.0, "1"),
    );
    report.push(
        Row::new(
            "3",
            "connections opened per waiting node while waiting (default)",
            Unit::Count,
            default.opened,
        )
        .vs(base, sqlx.opened),
    );
    let d = |c: &Cost| {
        json!({
            "name": c.name, "round_trips_per_node": c.round_trips,
            "connection_setup_round_trips_per_node": c.setup_round_trips,
            "statements_per_node": c.statements, "connections_held_per_node": c.held,
            "connections_opened_per_node": c.opened, "wait_s": c.wait_s,
            "polls_per_node": c.polls,
            "grants": c.grants,
            "statements_by_text": c.by_statement,
        })
    };
    report.detail(
        "3",
        json!({
            "nodes": n, "upgrade_s": secs,
            "runs": [d(&default), d(&off), d(&pooled), d(&pooled_long), d(&sqlx)],
        }),
    );
    Ok(())
}
