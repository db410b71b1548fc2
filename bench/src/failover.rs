//! Scenario 4: failover. A canary process is SIGKILLed in the middle of the
//! new release's task while other node processes wait; how long until
//! another node holds the lease, and until every node is READY?
//!
//! Nodes are processes of this binary (`upsilon-bench node ...`), each
//! opening its backend from a URL; scenario 6c runs the same kill on the
//! other backends ([`upsilon_once`]). The new holder is seen by polling the
//! lease every 2 ms from this process (`Lock::current`; for sqlx,
//! `pg_locks`); READY is the instant a node's `ready` line arrives. The
//! task runs again on the new holder (tasks run at least once): the
//! waiters' copy of it takes 100 ms.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::common::{at_released, Env};
use crate::convergence::poll_until;
use crate::report::{Report, Row, Unit};
use crate::stats::{ms, summary};
use crate::Options;

/// The waiters' task (the re-run after the takeover).
const RERUN_MS: u64 = 100;
/// How long after every node waits the canary is killed.
const KILL_AFTER: Duration = Duration::from_millis(300);

type Event = (String, String, Instant);

/// The lines the nodes print, with the instant each arrived.
struct Events {
    rx: mpsc::UnboundedReceiver<Event>,
    tx: mpsc::UnboundedSender<Event>,
    seen: Vec<Event>,
}

impl Events {
    fn new() -> Events {
        let (tx, rx) = mpsc::unbounded_channel();
        Events {
            rx,
            tx,
            seen: Vec::new(),
        }
    }

    fn last(&self, name: &str, prefix: &str) -> Option<Instant> {
        self.seen
            .iter()
            .rev()
            .find(|(n, l, _)| n == name && l.starts_with(prefix))
            .map(|(_, _, t)| *t)
    }

    fn first(&self, name: &str, prefix: &str) -> Option<(Instant, &str)> {
        self.seen
            .iter()
            .find(|(n, l, _)| n == name && l.starts_with(prefix))
            .map(|(_, l, t)| (*t, l.as_str()))
    }

    async fn until(&mut self, what: &str, pred: impl Fn(&Events) -> bool) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while !pred(self) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(e)) => {
                    if e.1 == "failed" {
                        bail!("node {} failed while waiting for {what}", e.0);
                    }
                    self.seen.push(e);
                }
                _ => bail!("no {what} within 120 s"),
            }
        }
        Ok(())
    }

    /// Starts `upsilon-bench node ARGS` as `name`, its lines sent here.
    fn spawn(&self, name: &str, args: &[String]) -> anyhow::Result<Child> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("node")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a node process")?;
        let out = child.stdout.take().context("the node's stdout")?;
        let (tx, name) = (self.tx.clone(), name.to_owned());
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send((name.clone(), line, Instant::now()));
            }
        });
        Ok(child)
    }
}

fn waiter_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("w{i}")).collect()
}

/// Kill to new holder, kill to last node READY, in ms.
pub struct Takeover {
    pub holder: f64,
    pub ready: f64,
    /// From the new holder's last store write returning to the last of the
    /// other waiters READY (Upsilon nodes only: they print `wrote`).
    pub after_commit: Option<f64>,
}

async fn finish(
    mut ev: Events,
    waiters: Vec<Child>,
    names: &[String],
    killed: Instant,
    holder: Instant,
) -> anyhow::Result<Takeover> {
    ev.until("READY from every waiter", |ev| {
        names.iter().all(|n| ev.first(n, "ready").is_some())
    })
    .await?;
    let ready = names
        .iter()
        .filter_map(|n| ev.first(n, "ready").map(|(t, _)| t))
        .max()
        .context("no waiter")?;
    for mut w in waiters {
        let status = w.wait().await?;
        ensure!(status.success(), "a waiter exited with {status}");
    }
    let upgraded = names
        .iter()
        .find(|n| ev.first(n, "ready upgraded").is_some());
    let after_commit = upgraded.and_then(|u| {
        let wrote = ev.last(u, "wrote")?;
        let others = names
            .iter()
            .filter(|n| *n != u)
            .filter_map(|n| ev.first(n, "ready").map(|(t, _)| t))
            .max()?;
        Some(ms(others.saturating_duration_since(wrote)))
    });
    Ok(Takeover {
        holder: ms(holder - killed),
        ready: ms(ready - killed),
        after_commit,
    })
}

/// One kill of an Upsilon canary on the backend `url` names, its waiters
/// and the lease poll on the same backend.
pub async fn upsilon_once(
    o: &Options,
    service: &str,
    url: &str,
    ttl_ms: u64,
) -> anyhow::Result<Takeover> {
    let lock = upsilon_backends::connect(url).await?;
    at_released(service, lock.clone()).await?;
    let mut ev = Events::new();
    let args = |name: &str, task_ms: u64| -> Vec<String> {
        [
            "upsilon",
            "--url",
            url,
            "--service",
            service,
            "--name",
            name,
            "--task-ms",
            &task_ms.to_string(),
            "--ttl-ms",
            &ttl_ms.to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let mut canary = ev.spawn("canary", &args("canary", 600_000))?;
    ev.until("upgrade by the canary", |ev| {
        ev.first("canary", "upgrading").is_some()
    })
    .await?;
    let names = waiter_names(o.failover_waiters);
    let mut waiters = Vec::new();
    for n in &names {
        waiters.push(ev.spawn(n, &args(n, RERUN_MS))?);
    }
    ev.until("every waiter waiting", |ev| {
        names.iter().all(|n| ev.first(n, "waiting").is_some())
    })
    .await?;
    tokio::time::sleep(KILL_AFTER).await;
    let killed = Instant::now();
    canary.kill().await?;
    let deadline = killed + Duration::from_secs(120);
    let holder = loop {
        if let Some(info) = lock.current(service).await? {
            if info.holder.pod.as_deref() != Some("canary") {
                break Instant::now();
            }
        }
        ensure!(Instant::now() < deadline, "no new holder within 120 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    finish(ev, waiters, &names, killed, holder).await
}

async fn sqlx_once(
    env: &Env,
    o: &Options,
    schema: &str,
    canary_statement_ms: u64,
    check_ms: Option<u64>,
) -> anyhow::Result<Takeover> {
    env.sqlx_schema(schema).await?;
    let mut ev = Events::new();
    let args = |task_ms: u64| -> Vec<String> {
        let mut a = [
            "sqlx",
            "--url",
            &env.url,
            "--schema",
            schema,
            "--task-ms",
            &task_ms.to_string(),
        ]
        .map(str::to_owned)
        .to_vec();
        if let Some(c) = check_ms {
            a.extend(["--check-ms".to_owned(), c.to_string()]);
        }
        a
    };
    let mut canary = ev.spawn("canary", &args(canary_statement_ms))?;
    ev.until("the canary's process id", |ev| {
        ev.first("canary", "pid ").is_some()
    })
    .await?;
    let pid: i32 = ev
        .first("canary", "pid ")
        .and_then(|(_, l)| l.strip_prefix("pid ")?.parse().ok())
        .context("the canary's process id")?;
    poll_until(
        env,
        &format!(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = {pid}"
        ),
        "the canary's advisory lock",
        |v| v == 1,
    )
    .await?;
    let names = waiter_names(o.failover_waiters);
    let mut waiters = Vec::new();
    for n in &names {
        waiters.push(ev.spawn(n, &args(RERUN_MS))?);
    }
    poll_until(
        env,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        "waiters on the advisory lock",
        |v| v as usize == names.len(),
    )
    .await?;
    tokio::time::sleep(KILL_AFTER).await;
    let killed = Instant::now();
    canary.kill().await?;
    let sql = format!(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid <> {pid}"
    );
    let deadline = killed + Duration::from_secs(120);
    let holder = loop {
        let v: i64 = env.admin.query_one(&sql, &[]).await?.get(0);
        if v > 0 {
            break Instant::now();
        }
        ensure!(Instant::now() < deadline, "no new holder within 120 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    finish(ev, waiters, &names, killed, holder).await
}

pub async fn run(env: &Env, o: &Options, report: &mut Report) -> anyhow::Result<()> {
    let reps = o.failover_repeats;
    let stmt_ms = o.sqlx_statement_ms;
    eprintln!(
        "  4: {} waiters, {reps} repeats per way; TTL {} ms behind a transaction pooler",
        o.failover_waiters, o.ttl_ms
    );
    let mut session = Vec::new();
    let mut pooled = Vec::new();
    let mut sqlx_check = Vec::new();
    let mut sqlx_default = Vec::new();
    let pooled_url = format!("{}?pgbouncer=true", env.url);
    for r in 0..reps {
        session.push(upsilon_once(o, &format!("failover-session-{r}"), &env.url, 15_000).await?);
        pooled.push(upsilon_once(o, &format!("failover-pooled-{r}"), &pooled_url, o.ttl_ms).await?);
        sqlx_check.push(
            sqlx_once(
                env,
                o,
                &format!("sqlx_failover_check_{r}"),
                600_000,
                Some(1000),
            )
            .await?,
        );
        sqlx_default
            .push(sqlx_once(env, o, &format!("sqlx_failover_default_{r}"), stmt_ms, None).await?);
    }
    let holder = |v: &[Takeover]| summary(&v.iter().map(|t| t.holder / 1000.0).collect::<Vec<_>>());
    let ready = |v: &[Takeover]| summary(&v.iter().map(|t| t.ready / 1000.0).collect::<Vec<_>>());
    let (sh, sr) = (holder(&session), ready(&session));
    let (ph, pr) = (holder(&pooled), ready(&pooled));
    let (ch, cr) = (holder(&sqlx_check), ready(&sqlx_check));
    let (dh, _) = (holder(&sqlx_default), ready(&sqlx_default));
    let check = "sqlx, client_connection_check_interval=1s";
    report.push(
        Row::new(
            "4",
            "session seen to die: kill to new lease holder, p50",
            Unit::S,
            sh.p50,
        )
        .vs(check, ch.p50)
        .at_most(1.0, "<= 1 s"),
    );
    report.push(
        Row::new(
            "4",
            format!("session seen to die: kill to new lease holder, max of {reps}"),
            Unit::S,
            sh.max,
        )
        .vs(check, ch.max)
        .at_most(1.5, "<= 1.5 s (one jittered check)"),
    );
    report.push(
        Row::new(
            "4",
            "session seen to die: kill to new lease holder, p50",
            Unit::S,
            sh.p50,
        )
        .vs(
            format!(
                "sqlx, default settings, killed {:.1} s into a {:.1} s statement",
                KILL_AFTER.as_secs_f64(),
                stmt_ms as f64 / 1000.0
            ),
            dh.p50,
        ),
    );
    report.push(
        Row::new(
            "4",
            "session seen to die: kill to every node READY, p50",
            Unit::S,
            sr.p50,
        )
        .vs(check, cr.p50)
        .at_most(1.1, "<= 1 s + 0.1 s re-run"),
    );
    let after: Vec<f64> = session
        .iter()
        .filter_map(|t| t.after_commit.map(|a| a / 1000.0))
        .collect();
    if !after.is_empty() {
        report.push(
            Row::new(
                "4",
                format!(
                    "session seen to die: new holder's last commit to every other node READY, max of {}",
                    after.len()
                ),
                Unit::S,
                summary(&after).max,
            )
            .at_most(0.2, "<= 0.2 s"),
        );
    }
    let ttl = o.ttl_ms as f64 / 1000.0;
    report.push(
        Row::new(
            "4",
            format!("pgbouncer=true, TTL {ttl} s: kill to new lease holder, max of {reps}"),
            Unit::S,
            ph.max,
        )
        .at_most(ttl + 0.5, format!("<= TTL + 0.5 s = {:.1} s", ttl + 0.5)),
    );
    report.push(
        Row::new(
            "4",
            format!("pgbouncer=true, TTL {ttl} s: kill to every node READY, max of {reps}"),
            Unit::S,
            pr.max,
        )
        .at_most(
            ttl + 0.6,
            format!("<= TTL + 0.5 s + 0.1 s re-run = {:.1} s", ttl + 0.6),
        ),
    );
    let d = |v: &[Takeover]| {
        json!(v
            .iter()
            .map(|t| json!({"holder_ms": t.holder, "ready_ms": t.ready, "after_commit_ms": t.after_commit}))
            .collect::<Vec<_>>())
    };
    report.detail(
        "4",
        json!({
            "waiters": o.failover_waiters, "repeats": reps, "rerun_ms": RERUN_MS,
            "kill_after_waiting_ms": KILL_AFTER.as_millis() as u64,
            "session_ttl_ms": 15_000, "pooled_ttl_ms": o.ttl_ms,
            "sqlx_default_statement_ms": stmt_ms,
            "upsilon_session": d(&session), "upsilon_pgbouncer": d(&pooled),
            "sqlx_check_1s": d(&sqlx_check), "sqlx_default": d(&sqlx_default),
        }),
    );
    Ok(())
}
