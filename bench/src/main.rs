//! `upsilon-bench`: what Upsilon costs a service and its cluster, measured
//! beside what users would otherwise run (sqlx's migrator; a bare connect
//! and query), in one run, against a PostgreSQL server it starts on a free
//! loopback port, and SQLite files in a temporary directory.
//!
//! ```text
//! cargo run --release -p upsilon-bench -- [--tiny] [--only 1,2,3,4,5] [--nodes 20,50,100,200]
//!     [--repeats N] [--json PATH]
//! ```
//!
//! It prints a table (scenario | measure | upsilon | baseline | ratio |
//! target | met?) and writes every figure, with the samples behind it, as
//! JSON. `docs/BENCHMARKS.md` says what each figure measures and limits it.

mod common;
mod convergence;
mod failover;
mod instrument;
mod load;
mod node;
mod proxy;
mod report;
mod scale;
mod startup;
mod stats;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _};
use serde_json::json;

use crate::report::Report;

const USAGE: &str = "\
usage: upsilon-bench [--tiny] [--only 1,2,3,4,5] [--nodes 20,50,100,200] [--repeats N] [--json PATH]
                     [--startup-iters N] [--task-ms MS] [--load-nodes N] [--load-ms MS]
                     [--failover-repeats N] [--failover-waiters N] [--ttl-ms MS] [--sqlx-statement-ms MS]
                     [--plan-tasks N] [--run-tasks N] [--scale-repeats N] [--build-tasks N] [--build-repeats N]

  --tiny                small sizes and short sleeps: checks that every scenario works (seconds)
  --only LIST           scenarios to run (default: all)
  --nodes LIST          node counts of scenario 2 (default 20,50,100,200)
  --repeats N           upgrades per node count in scenario 2 (default 10)
  --json PATH           where the JSON goes (default: the cargo target dir's upsilon-bench.json)
  --startup-iters N     start-ups timed per way in scenario 1a, twice as many checks in 1b (default 300)
  --task-ms MS          the canary's task in scenario 2 (default 1000)
  --load-nodes N        waiting nodes in scenario 3 (default 50)
  --load-ms MS          the upgrade's length in scenario 3 (default 10000)
  --failover-repeats N  kills per way in scenario 4 (default 5)
  --failover-waiters N  waiting node processes in scenario 4 (default 3)
  --ttl-ms MS           lease TTL behind a transaction pooler in scenario 4 (default 5000)
  --sqlx-statement-ms MS  the statement a sqlx node is killed in, default settings (default 3000)
  --plan-tasks N        tasks collected, validated and planned in 5a (default 10000)
  --run-tasks N         no-op tasks run end to end in 5b (default 1000)
  --scale-repeats N     repeats of 5a and 5b (default 5)
  --build-tasks N       task fns of the generated crates in 5c; 0 skips it (default 1000)
  --build-repeats N     rebuilds of each generated crate (default 3)

`upsilon-bench node ...` is one node process of scenario 4.";

/// Sizes and switches.
#[derive(Debug, Clone)]
pub struct Options {
    pub tiny: bool,
    pub only: BTreeSet<u8>,
    pub nodes: Vec<usize>,
    pub repeats: usize,
    pub json: PathBuf,
    pub startup_iters: usize,
    pub task_ms: u64,
    pub load_nodes: usize,
    pub load_ms: u64,
    pub failover_repeats: usize,
    pub failover_waiters: usize,
    pub ttl_ms: u64,
    pub sqlx_statement_ms: u64,
    pub plan_tasks: usize,
    pub run_tasks: usize,
    pub scale_repeats: usize,
    pub build_tasks: usize,
    pub build_repeats: usize,
    pub build_dir: PathBuf,
}

/// The cargo target directory: `$CARGO_TARGET_DIR`, or the workspace's `target`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .map(|w| w.join("target"))
                .unwrap_or_else(|| PathBuf::from("target"))
        })
}

impl Options {
    fn defaults(tiny: bool) -> Options {
        let target = target_dir();
        let mut o = Options {
            tiny,
            only: (1..=5).collect(),
            nodes: vec![20, 50, 100, 200],
            repeats: 10,
            json: target.join("upsilon-bench.json"),
            startup_iters: 300,
            task_ms: 1000,
            load_nodes: 50,
            load_ms: 10_000,
            failover_repeats: 5,
            failover_waiters: 3,
            ttl_ms: 5000,
            sqlx_statement_ms: 3000,
            plan_tasks: 10_000,
            run_tasks: 1000,
            scale_repeats: 5,
            build_tasks: 1000,
            build_repeats: 3,
            build_dir: target.join("upsilon-bench-build"),
        };
        if tiny {
            o.nodes = vec![3];
            o.repeats = 1;
            o.json = target.join("upsilon-bench-tiny.json");
            o.startup_iters = 5;
            o.task_ms = 300;
            o.load_nodes = 3;
            o.load_ms = 500;
            o.failover_repeats = 1;
            o.failover_waiters = 2;
            o.ttl_ms = 1000;
            o.sqlx_statement_ms = 1000;
            o.plan_tasks = 200;
            o.run_tasks = 20;
            o.scale_repeats = 1;
            o.build_tasks = 0;
        }
        o
    }

    fn parse(args: &[String]) -> anyhow::Result<Option<Options>> {
        if args.iter().any(|a| a == "-h" || a == "--help") {
            return Ok(None);
        }
        let mut o = Options::defaults(args.iter().any(|a| a == "--tiny"));
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "--tiny" {
                continue;
            }
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            let num = || -> anyhow::Result<u64> {
                value
                    .parse()
                    .with_context(|| format!("{flag} takes a number, not {value:?}"))
            };
            let list = || -> anyhow::Result<Vec<u64>> {
                value
                    .split(',')
                    .map(|v| {
                        v.trim()
                            .parse()
                            .with_context(|| format!("{flag} takes numbers, not {v:?}"))
                    })
                    .collect()
            };
            match flag.as_str() {
                "--only" => {
                    o.only = list()?.into_iter().map(|v| v as u8).collect();
                    if let Some(bad) = o.only.iter().find(|s| !(1..=5).contains(*s)) {
                        bail!("--only: there is no scenario {bad}; they are 1 to 5");
                    }
                }
                "--nodes" => o.nodes = list()?.into_iter().map(|v| v as usize).collect(),
                "--repeats" => o.repeats = num()? as usize,
                "--json" => o.json = PathBuf::from(value),
                "--startup-iters" => o.startup_iters = num()? as usize,
                "--task-ms" => o.task_ms = num()?,
                "--load-nodes" => o.load_nodes = num()? as usize,
                "--load-ms" => o.load_ms = num()?,
                "--failover-repeats" => o.failover_repeats = num()? as usize,
                "--failover-waiters" => o.failover_waiters = num()? as usize,
                "--ttl-ms" => o.ttl_ms = num()?,
                "--sqlx-statement-ms" => o.sqlx_statement_ms = num()?,
                "--plan-tasks" => o.plan_tasks = num()? as usize,
                "--run-tasks" => o.run_tasks = num()? as usize,
                "--scale-repeats" => o.scale_repeats = num()? as usize,
                "--build-tasks" => o.build_tasks = num()? as usize,
                "--build-repeats" => o.build_repeats = num()? as usize,
                other => bail!("unknown flag {other:?}"),
            }
        }
        let positive = [
            ("--repeats", o.repeats),
            ("--startup-iters", o.startup_iters),
            ("--load-nodes", o.load_nodes),
            ("--failover-repeats", o.failover_repeats),
            ("--failover-waiters", o.failover_waiters),
            ("--plan-tasks", o.plan_tasks),
            ("--run-tasks", o.run_tasks),
            ("--scale-repeats", o.scale_repeats),
            ("--build-repeats", o.build_repeats),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
            bail!("{flag} must be at least 1");
        }
        if o.nodes.is_empty() || o.nodes.contains(&0) {
            bail!("--nodes takes node counts of at least 1");
        }
        if o.ttl_ms < 300 {
            bail!("--ttl-ms must be at least 300");
        }
        Ok(Some(o))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("node") {
        return node::main(&args[1..]);
    }
    let options = match Options::parse(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("upsilon-bench: {e:#}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Two workers: the machines this runs on have two cores.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match rt.block_on(run(&options, &args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("upsilon-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn machine() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu,
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
    })
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

async fn run(o: &Options, args: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let load_before = load_average();
    let biggest = o.nodes.iter().copied().max().unwrap_or(1).max(o.load_nodes);
    // Each Upsilon node holds two connections (pool, listening session).
    let max_connections = (2 * biggest + 100).max(300) as u32;
    eprintln!("upsilon-bench: starting PostgreSQL (max_connections {max_connections})");
    let env = common::Env::start(max_connections).await?;
    let server = env.server_version().await;
    let mut report = Report::default();
    type Scenario = for<'a> fn(
        &'a common::Env,
        &'a Options,
        &'a mut Report,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = anyhow::Result<()>> + 'a>,
    >;
    let scenarios: [(u8, &str, Scenario); 5] = [
        (1, "start-up", |e, o, r| Box::pin(startup::run(e, o, r))),
        (2, "cluster convergence", |e, o, r| {
            Box::pin(convergence::run(e, o, r))
        }),
        (3, "store load", |e, o, r| Box::pin(load::run(e, o, r))),
        (4, "failover", |e, o, r| Box::pin(failover::run(e, o, r))),
        (5, "scale", |e, o, r| Box::pin(scale::run(e, o, r))),
    ];
    let mut timings = serde_json::Map::new();
    for (id, name, f) in scenarios {
        if !o.only.contains(&id) {
            continue;
        }
        eprintln!("scenario {id}: {name}");
        let t = Instant::now();
        f(&env, o, &mut report)
            .await
            .with_context(|| format!("scenario {id} ({name})"))?;
        timings.insert(id.to_string(), json!(t.elapsed().as_secs_f64()));
    }
    let table = report.table();
    println!("{table}");
    let meta = json!({
        "command": format!("upsilon-bench {}", args.join(" ")),
        "tiny": o.tiny,
        "machine": machine(),
        "postgres": server,
        "seconds": started.elapsed().as_secs_f64(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "scenario_seconds": timings,
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    if let Some(dir) = o.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &o.json,
        serde_json::to_string_pretty(&report.json(meta))? + "\n",
    )
    .with_context(|| format!("writing {}", o.json.display()))?;
    eprintln!(
        "upsilon-bench: done in {:.0} s; JSON in {}",
        started.elapsed().as_secs_f64(),
        o.json.display()
    );
    Ok(())
}
