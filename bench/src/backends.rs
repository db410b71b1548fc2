//! Scenario 6: every backend, opened from its URL with
//! `upsilon_backends::connect`, through the same code: the start-up of an
//! up-to-date node (6a), convergence of waiting nodes (6b), failover after
//! a SIGKILL (6c) and the calls a waiting node makes (6d). Each backend is
//! measured beside its own bare client, or its own notification floor,
//! in the same run.
//!
//! PostgreSQL is in the list too: its rows here come from the same generic
//! code as the others', and are a check of that code against scenarios 1
//! to 4, which measure it against sqlx.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use serde_json::{json, Value};
use upsilon::backend::Backend;
use upsilon::Outcome;

use crate::common::{at_released, released_tasks, runner, Env};
use crate::convergence::{grants_row, notify_floor, signed_ms, upsilon_round};
use crate::failover::{upsilon_once, Takeover};
use crate::instrument::Instrumented;
use crate::report::{Report, Row, Unit};
use crate::stats::{ms, summary, Summary};
use crate::Options;

const SERVICE: &str = "backends-startup";

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

/// A backend scenario 6 can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Postgres,
    Sqlite,
    #[cfg(feature = "redis")]
    Redis,
    #[cfg(feature = "etcd")]
    Etcd,
    #[cfg(feature = "kubernetes")]
    Kubernetes,
}

impl Kind {
    /// Every backend compiled in, in the table's order.
    pub const ALL: &'static [Kind] = &[
        Kind::Postgres,
        Kind::Sqlite,
        #[cfg(feature = "redis")]
        Kind::Redis,
        #[cfg(feature = "etcd")]
        Kind::Etcd,
        #[cfg(feature = "kubernetes")]
        Kind::Kubernetes,
    ];

    /// Its name in `--backends`.
    pub fn flag(self) -> &'static str {
        match self {
            Kind::Postgres => "postgres",
            Kind::Sqlite => "sqlite",
            #[cfg(feature = "redis")]
            Kind::Redis => "redis",
            #[cfg(feature = "etcd")]
            Kind::Etcd => "etcd",
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => "kubernetes",
        }
    }

    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Postgres => "PostgreSQL",
            Kind::Sqlite => "SQLite",
            #[cfg(feature = "redis")]
            Kind::Redis => "Redis",
            #[cfg(feature = "etcd")]
            Kind::Etcd => "etcd",
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => "Kubernetes (stand-in)",
        }
    }

    /// Whether a killed holder's lease is taken over before its TTL runs
    /// out, because the server sees the holder's session end.
    fn session_tie(self) -> bool {
        matches!(self, Kind::Postgres)
    }

    /// What the server's own count in 6d counts, and a note on it.
    fn count_name(self) -> (&'static str, &'static str) {
        match self {
            #[cfg(feature = "etcd")]
            Kind::Etcd => ("gRPC messages received by the server", ""),
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => ("API requests the stand-in served", ""),
            _ => ("server commands", " (scripts' own included)"),
        }
    }

    /// The lease TTL 6c gives it: `--ttl-ms`, or the backend's shortest.
    fn ttl_ms(self, asked: u64) -> u64 {
        match self {
            #[cfg(feature = "etcd")]
            Kind::Etcd => {
                let min = upsilon_backends::etcd::MIN_TTL.as_millis() as u64;
                // etcd grants whole seconds.
                asked.max(min).div_ceil(1000) * 1000
            }
            _ => asked,
        }
    }

    /// What the bare client does in 6a.
    fn bare_name(self) -> &'static str {
        match self {
            Kind::Postgres => "tokio-postgres connect + SELECT 1",
            Kind::Sqlite => "rusqlite open + SELECT 1",
            #[cfg(feature = "redis")]
            Kind::Redis => "redis crate connect + GET",
            #[cfg(feature = "etcd")]
            Kind::Etcd => "etcd-client connect + get",
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => "a new reqwest client + one GET of a ConfigMap",
        }
    }

    /// What 6b's floor is, for `n` receivers; `None`: the backend has no
    /// notifications (its nodes poll).
    fn floor_name(self, n: usize) -> Option<String> {
        match self {
            Kind::Postgres => Some(format!(
                "the floor: one NOTIFY to {n} LISTENing connections"
            )),
            Kind::Sqlite => None,
            #[cfg(feature = "redis")]
            Kind::Redis => Some(format!(
                "the floor: one PUBLISH to {n} subscribed connections"
            )),
            #[cfg(feature = "etcd")]
            Kind::Etcd => Some(format!("the floor: one put to {n} watchers")),
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => Some(format!("the floor: one ConfigMap update to {n} watchers")),
        }
    }
}

/// Parses one name of `--backends`.
pub fn kind(s: &str) -> Result<Kind, String> {
    let s = s.trim();
    Kind::ALL
        .iter()
        .copied()
        .find(|k| k.flag() == s)
        .ok_or_else(|| {
            let names: Vec<&str> = Kind::ALL.iter().map(|k| k.flag()).collect();
            format!(
                "no backend {s:?} in this build; it has {}",
                names.join(", ")
            )
        })
}

/// A backend under test: where it is, and the server kept running for it.
struct Subject<'e> {
    kind: Kind,
    url: String,
    env: &'e Env,
    /// What the bare client and the floor connect to: the server's URL,
    /// SQLite's file, etcd's endpoint, the kubeconfig of the Kubernetes
    /// stand-in (whose bare client takes the stand-in's URL).
    raw: String,
    /// The server the benchmark started for it, stopped when dropped.
    _server: Option<Box<dyn std::any::Any + Send>>,
    /// A connection of the benchmark's own to Redis, to read its counts.
    #[cfg(feature = "redis")]
    redis: Option<redis::aio::MultiplexedConnection>,
    /// The stand-in API server, to read its counts and when it committed a
    /// write, and a backend of the benchmark's own to name its objects.
    #[cfg(feature = "kubernetes")]
    kube: Option<(
        Arc<upsilon_test_servers::kube_api::KubeApi>,
        upsilon_backends::kubernetes::KubernetesBackend,
    )>,
}

impl<'e> Subject<'e> {
    async fn start(kind: Kind, env: &'e Env) -> anyhow::Result<Subject<'e>> {
        let mut subject = Subject {
            kind,
            url: env.url.clone(),
            env,
            raw: env.url.clone(),
            _server: None,
            #[cfg(feature = "redis")]
            redis: None,
            #[cfg(feature = "kubernetes")]
            kube: None,
        };
        match kind {
            Kind::Postgres => {}
            Kind::Sqlite => {
                let path = env.dir.path().join("backends.db");
                subject.url = format!("sqlite://{}", path.display());
                subject.raw = path.display().to_string();
            }
            #[cfg(feature = "redis")]
            Kind::Redis => {
                eprintln!("  6: starting Redis");
                let guard = tokio::task::spawn_blocking(redis_bench::start).await?;
                subject.url = guard.url();
                subject.raw = subject.url.clone();
                subject._server = Some(Box::new(guard));
                let client = redis::Client::open(subject.url.as_str())?;
                subject.redis = Some(client.get_multiplexed_async_connection().await?);
            }
            #[cfg(feature = "etcd")]
            Kind::Etcd => {
                eprintln!("  6: starting etcd");
                let guard = tokio::task::spawn_blocking(etcd_bench::start).await?;
                subject.url = guard.url();
                subject.raw = guard.endpoint();
                subject._server = Some(Box::new(guard));
            }
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => {
                eprintln!("  6: starting the Kubernetes API stand-in");
                let api = Arc::new(upsilon_test_servers::kube_api::KubeApi::start().await);
                let path = env.dir.path().join("bench.kubeconfig");
                api.write_kubeconfig(&path, kube_bench::NAMESPACE);
                subject.url = format!(
                    "kubernetes://{}?kubeconfig={}",
                    kube_bench::NAMESPACE,
                    path.display()
                );
                subject.raw = path.display().to_string();
                let names =
                    upsilon_backends::kubernetes::KubernetesBackend::connect_url(&subject.url)
                        .await?;
                subject.kube = Some((api, names));
            }
        }
        Ok(subject)
    }

    fn name(&self) -> &'static str {
        self.kind.name()
    }

    async fn open(&self) -> anyhow::Result<Arc<dyn Backend>> {
        upsilon_backends::connect(&self.url)
            .await
            .with_context(|| format!("opening {}", self.name()))
    }

    /// The bare client: connect, and one read.
    async fn bare(&self) -> anyhow::Result<()> {
        match self.kind {
            Kind::Postgres => {
                let (client, conn) =
                    tokio_postgres::connect(&self.raw, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                client.simple_query("SELECT 1").await?;
            }
            Kind::Sqlite => {
                let conn = rusqlite::Connection::open(&self.raw)?;
                conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?;
            }
            #[cfg(feature = "redis")]
            Kind::Redis => redis_bench::bare(&self.raw).await?,
            #[cfg(feature = "etcd")]
            Kind::Etcd => etcd_bench::bare(&self.raw).await?,
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => {
                let (api, _) = self.kube.as_ref().context("the Kubernetes stand-in")?;
                kube_bench::bare(&api.url()).await?
            }
        }
        Ok(())
    }

    /// One notification reaching `n` receivers, `repeats` times: ms from
    /// the sender's acknowledgement to the last delivery.
    async fn floor(&self, n: usize, repeats: usize) -> anyhow::Result<Option<Vec<f64>>> {
        Ok(match self.kind {
            Kind::Postgres => Some(notify_floor(self.env, n, repeats).await?.0),
            Kind::Sqlite => None,
            #[cfg(feature = "redis")]
            Kind::Redis => Some(redis_bench::floor(&self.raw, n, repeats).await?),
            #[cfg(feature = "etcd")]
            Kind::Etcd => Some(etcd_bench::floor(&self.raw, n, repeats).await?),
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => Some(kube_bench::floor(&self.raw, n, repeats).await?),
        })
    }

    /// When the server committed the write of `service`'s new data
    /// version, where the backend's final write returns only after another
    /// one (Kubernetes: the state ConfigMap, then the history's page).
    fn committed_at(&self, service: &str) -> Option<Instant> {
        match self.kind {
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => {
                let (api, names) = self.kube.as_ref()?;
                api.written_at(
                    upsilon_test_servers::kube_api::Resource::ConfigMaps,
                    kube_bench::NAMESPACE,
                    &names.object_name(service),
                )
            }
            _ => {
                let _ = service;
                None
            }
        }
    }

    /// The server's own count of each command so far, where it keeps one
    /// cheaply; `None` where it does not.
    async fn server_commands(&self) -> anyhow::Result<Option<BTreeMap<String, u64>>> {
        Ok(match self.kind {
            Kind::Postgres | Kind::Sqlite => None,
            #[cfg(feature = "redis")]
            Kind::Redis => {
                let mut conn = self.redis.clone().context("the Redis connection")?;
                Some(redis_bench::commands(&mut conn).await?)
            }
            #[cfg(feature = "etcd")]
            Kind::Etcd => Some(etcd_bench::requests(&self.raw).await?),
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => self.kube.as_ref().map(|(api, _)| api.requests()),
        })
    }
}

fn s(x: &Summary) -> Value {
    json!({"n": x.n, "p50": x.p50, "p99": x.p99, "min": x.min, "max": x.max})
}

/// 6a: the start-up of an up-to-date node, connect included, taking turns
/// with the bare client's connect and one read.
async fn startup(subject: &Subject<'_>, o: &Options, report: &mut Report) -> anyhow::Result<Value> {
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
async fn convergence(
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
async fn failover(
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
async fn load(
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

pub async fn run(env: &Env, o: &Options, report: &mut Report) -> anyhow::Result<()> {
    let mut subjects = Vec::with_capacity(o.backends.len());
    for &kind in &o.backends {
        subjects.push(Subject::start(kind, env).await?);
    }
    let mut details: BTreeMap<&str, serde_json::Map<String, Value>> = BTreeMap::new();
    for subject in &subjects {
        eprintln!("  6a: {}", subject.name());
        let d = startup(subject, o, report).await?;
        details
            .entry(subject.name())
            .or_default()
            .insert("a".into(), d);
    }
    let mut pg_here = BTreeMap::new();
    for subject in &subjects {
        let d = convergence(subject, o, report, &mut pg_here).await?;
        details
            .entry(subject.name())
            .or_default()
            .insert("b".into(), d);
    }
    for subject in &subjects {
        let d = failover(subject, o, report).await?;
        details
            .entry(subject.name())
            .or_default()
            .insert("c".into(), d);
    }
    let mut pg_calls = None;
    for subject in &subjects {
        let d = load(subject, o, report, &mut pg_calls).await?;
        details
            .entry(subject.name())
            .or_default()
            .insert("d".into(), d);
    }
    report.detail("6", json!(details));
    Ok(())
}

#[cfg(feature = "redis")]
mod redis_bench {
    //! Redis's bare client, floor and command counts, with the `redis` crate.

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use anyhow::{ensure, Context as _};
    use futures_util::StreamExt as _;

    use crate::convergence::signed_ms;

    const FLOOR_CHANNEL: &str = "bench:floor";

    /// A server with an append-only file that is never synced, as the
    /// PostgreSQL server runs with `fsync=off`.
    pub fn start() -> upsilon_test_servers::Redis {
        upsilon_test_servers::Redis::builder()
            .appendonly(upsilon_test_servers::Fsync::No)
            .start()
    }

    /// Connect, and one GET.
    pub async fn bare(url: &str) -> anyhow::Result<()> {
        let client = redis::Client::open(url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let _: Option<String> = redis::cmd("GET")
            .arg("bench:nothing")
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// One PUBLISH reaching `n` subscribed connections, `repeats` times:
    /// ms from the PUBLISH's reply to the last delivery.
    pub async fn floor(url: &str, n: usize, repeats: usize) -> anyhow::Result<Vec<f64>> {
        let client = redis::Client::open(url)?;
        let delivered: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let mut readers = Vec::with_capacity(n);
        for _ in 0..n {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(FLOOR_CHANNEL).await?;
            let mut messages = pubsub.into_on_message();
            let delivered = delivered.clone();
            readers.push(tokio::spawn(async move {
                while messages.next().await.is_some() {
                    delivered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Instant::now());
                }
            }));
        }
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut out = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            delivered.lock().unwrap_or_else(|p| p.into_inner()).clear();
            let receivers: usize = redis::cmd("PUBLISH")
                .arg(FLOOR_CHANNEL)
                .arg("x")
                .query_async(&mut conn)
                .await?;
            let acked = Instant::now();
            ensure!(
                receivers == n,
                "a PUBLISH reached {receivers} of {n} subscribers"
            );
            let deadline = acked + Duration::from_secs(60);
            let last = loop {
                {
                    let d = delivered.lock().unwrap_or_else(|p| p.into_inner());
                    if d.len() >= n {
                        break d.iter().copied().max().unwrap_or(acked);
                    }
                }
                ensure!(
                    Instant::now() < deadline,
                    "a PUBLISH reached only some subscribers"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            out.push(signed_ms(last, acked));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for r in readers {
            r.abort();
        }
        Ok(out)
    }

    /// `INFO commandstats`: the calls of each command since the server
    /// started, commands run inside scripts included; `INFO` itself left out.
    pub async fn commands(
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> anyhow::Result<BTreeMap<String, u64>> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(conn)
            .await?;
        let mut out = BTreeMap::new();
        for line in info.lines() {
            let Some((name, fields)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            if name == "info" {
                continue;
            }
            let calls = fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("INFO commandstats: {line}"))?;
            out.insert(name.to_owned(), calls);
        }
        Ok(out)
    }
}

#[cfg(feature = "etcd")]
mod etcd_bench {
    //! etcd's bare client, floor and request counts, with `etcd-client`.

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use anyhow::{ensure, Context as _};
    use etcd_client::Client;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use crate::convergence::signed_ms;

    const FLOOR_KEY: &str = "bench/floor";

    /// A single member, fsync off, as the PostgreSQL server runs.
    pub fn start() -> upsilon_test_servers::Etcd {
        upsilon_test_servers::Etcd::start()
    }

    /// Connect, and one `get`.
    pub async fn bare(endpoint: &str) -> anyhow::Result<()> {
        let mut client = Client::connect([endpoint], None).await?;
        client.get("bench/nothing", None).await?;
        Ok(())
    }

    /// One put reaching `n` watchers, each on a client (a connection) of
    /// its own, `repeats` times: ms from the put's reply to the last event.
    pub async fn floor(endpoint: &str, n: usize, repeats: usize) -> anyhow::Result<Vec<f64>> {
        let delivered: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let mut watchers = Vec::with_capacity(n);
        for _ in 0..n {
            let mut client = Client::connect([endpoint], None).await?;
            let mut stream = client.watch(FLOOR_KEY, None).await?;
            // The watch is in place once etcd says it was created.
            let created = stream.message().await?.context("the watch ended")?;
            ensure!(
                created.created(),
                "the first watch response was not its creation"
            );
            let delivered = delivered.clone();
            watchers.push(tokio::spawn(async move {
                let _client = client;
                while let Ok(Some(resp)) = stream.message().await {
                    if !resp.events().is_empty() {
                        delivered
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(Instant::now());
                    }
                }
            }));
        }
        let mut client = Client::connect([endpoint], None).await?;
        let mut out = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            delivered.lock().unwrap_or_else(|p| p.into_inner()).clear();
            client.put(FLOOR_KEY, "x", None).await?;
            let acked = Instant::now();
            let deadline = acked + Duration::from_secs(60);
            let last = loop {
                {
                    let d = delivered.lock().unwrap_or_else(|p| p.into_inner());
                    if d.len() >= n {
                        break d.iter().copied().max().unwrap_or(acked);
                    }
                }
                ensure!(
                    Instant::now() < deadline,
                    "a put reached only some watchers"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            out.push(signed_ms(last, acked));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for w in watchers {
            w.abort();
        }
        Ok(out)
    }

    /// The gRPC messages the server has received, per method
    /// (`grpc_server_msg_received_total` of its `/metrics`, on the client
    /// port): each unary call is one, each message on a stream (a watch
    /// created, a keep-alive) one more.
    pub async fn requests(endpoint: &str) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut conn = tokio::net::TcpStream::connect(endpoint).await?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut body = String::new();
        conn.read_to_string(&mut body).await?;
        let mut out = BTreeMap::new();
        for line in body.lines() {
            let Some(rest) = line.strip_prefix("grpc_server_msg_received_total{") else {
                continue;
            };
            let (labels, value) = rest.split_once("} ").context("a metrics line")?;
            let method = labels
                .split(',')
                .find_map(|l| l.strip_prefix("grpc_method=\""))
                .and_then(|m| m.strip_suffix('"'))
                .context("a metrics line without grpc_method")?;
            let count: f64 = value.trim().parse().context("a metrics value")?;
            if count > 0.0 {
                out.insert(method.to_owned(), count as u64);
            }
        }
        Ok(out)
    }
}

#[cfg(feature = "kubernetes")]
mod kube_bench {
    //! The Kubernetes stand-in's bare client and floor, with kube.

    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use anyhow::{ensure, Context as _};
    use upsilon_backends::kubernetes::k8s_openapi::api::core::v1::ConfigMap;
    use upsilon_backends::kubernetes::kube;
    use upsilon_backends::kubernetes::kube::api::{
        Api, ObjectMeta, PostParams, WatchEvent, WatchParams,
    };
    use upsilon_backends::kubernetes::kube::config::{KubeConfigOptions, Kubeconfig};

    /// The namespace the benchmark's objects go in.
    pub const NAMESPACE: &str = "bench";
    const FLOOR: &str = "bench-floor";

    async fn client(kubeconfig: &str) -> anyhow::Result<kube::Client> {
        let kc = Kubeconfig::read_from(kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A new plain HTTP client (its own connection) and one GET of the
    /// namespace's meta ConfigMap, which the backend made at its first
    /// connect.
    pub async fn bare(api: &str) -> anyhow::Result<()> {
        let resp = reqwest::Client::new()
            .get(format!(
                "{api}/api/v1/namespaces/{NAMESPACE}/configmaps/upsilon-meta"
            ))
            .bearer_auth(upsilon_test_servers::kube_api::TOKEN)
            .send()
            .await?;
        ensure!(
            resp.status().is_success(),
            "GET of the meta ConfigMap: {}",
            resp.status()
        );
        resp.bytes().await?;
        Ok(())
    }

    /// One ConfigMap update reaching `n` watchers (each its own client),
    /// `repeats` times: ms from the update's reply to the last delivery
    /// (negative when the last delivery came first).
    pub async fn floor(kubeconfig: &str, n: usize, repeats: usize) -> anyhow::Result<Vec<f64>> {
        use futures_util::StreamExt as _;
        let writer: Api<ConfigMap> = Api::namespaced(client(kubeconfig).await?, NAMESPACE);
        let mut cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(FLOOR.to_owned()),
                labels: Some([("bench".to_owned(), "floor".to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        };
        cm = match writer.get_opt(FLOOR).await? {
            Some(found) => found,
            None => writer.create(&PostParams::default(), &cm).await?,
        };
        let from = cm.metadata.resource_version.clone().unwrap_or_default();
        let delivered: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let mut readers = Vec::with_capacity(n);
        for _ in 0..n {
            let api: Api<ConfigMap> = Api::namespaced(client(kubeconfig).await?, NAMESPACE);
            let wp = WatchParams::default().labels("bench=floor");
            let stream = api.watch(&wp, &from).await?;
            let delivered = delivered.clone();
            readers.push(tokio::spawn(async move {
                let mut stream = std::pin::pin!(stream);
                while let Some(e) = stream.next().await {
                    if let Ok(WatchEvent::Modified(_)) = e {
                        delivered
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(Instant::now());
                    }
                }
            }));
        }
        let mut out = Vec::with_capacity(repeats);
        for r in 0..repeats {
            delivered.lock().unwrap_or_else(|p| p.into_inner()).clear();
            cm.data = Some([("n".to_owned(), r.to_string())].into());
            cm = writer.replace(FLOOR, &PostParams::default(), &cm).await?;
            let acked = Instant::now();
            let deadline = acked + Duration::from_secs(60);
            let last = loop {
                {
                    let d = delivered.lock().unwrap_or_else(|p| p.into_inner());
                    if d.len() >= n {
                        break d.iter().copied().max().context("a delivery")?;
                    }
                }
                ensure!(
                    Instant::now() < deadline,
                    "an update reached fewer than {n} watchers"
                );
                tokio::time::sleep(Duration::from_micros(200)).await;
            };
            // The stand-in sends the event before its reply: a delivery
            // may come before the writer hears back (negative).
            out.push(crate::convergence::signed_ms(last, acked));
        }
        for r in readers {
            r.abort();
        }
        Ok(out)
    }
}
