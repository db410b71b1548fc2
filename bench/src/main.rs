//! `upsilon-bench`: what Upsilon costs a service and its cluster, measured
//! beside what users would otherwise run (sqlx's migrator; a bare connect
//! and query), in one run, against a PostgreSQL server it starts on a free
//! loopback port, and SQLite files in a temporary directory; scenario 6
//! measures every backend built in through the same generic code.
//!
//! ```text
//! cargo run --release -p upsilon-bench -- [--tiny] [--only 1,2,3,4,5,6,7] [--nodes 20,50,100,200]
//!     [--repeats N] [--backends postgres,sqlite,...] [--json PATH]
//! ```
//!
//! It prints a table (scenario | measure | upsilon | baseline | ratio |
//! target | met?) and writes every figure, with the samples behind it, as
//! JSON. `--help` lists every flag and its default. `docs/BENCHMARKS.md`
//! says what each figure measures and limits it.

mod backends;
mod checkpoint;
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
mod wrappers;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use clap::{ArgAction, Parser, Subcommand};
use serde_json::json;

use crate::report::Report;

/// What Upsilon costs a service and its cluster, beside what users would
/// otherwise run (sqlx's migrator; a bare connect and query). It prints a
/// table and writes every figure, with the samples behind it, as JSON;
/// docs/BENCHMARKS.md says what each figure measures.
///
/// A flag left out takes its default, or, with --tiny, the tiny run's.
#[derive(Debug, Parser)]
#[command(
    name = "upsilon-bench",
    args_override_self = true,
    args_conflicts_with_subcommands = true,
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    flags: Flags,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One node process of scenarios 4 and 6c (the benchmark starts these itself).
    #[command(subcommand)]
    Node(node::Kind),
    /// One run of scenario 5a under callgrind (the benchmark starts it itself).
    #[command(hide = true)]
    ScaleWorkload(scale::Workload),
}

/// The sizes and switches of a run.
#[derive(Debug, clap::Args)]
struct Flags {
    /// Small sizes and short sleeps: checks that every scenario works (seconds).
    #[arg(long)]
    tiny: bool,
    /// Scenarios to run, from 1 to 7 (default: all).
    #[arg(long, value_name = "LIST", value_delimiter = ',', action = ArgAction::Set,
        value_parser = scenario, allow_negative_numbers = true,
        default_value = "1,2,3,4,5,6,7", hide_default_value = true)]
    only: Vec<u8>,
    /// Node counts of scenarios 2 and 6b, each at least 1 [default: 20,50,100,200
    /// in 2, 20,100 in 6b; with --tiny: 3].
    #[arg(long, value_name = "LIST", value_delimiter = ',', action = ArgAction::Set,
        value_parser = at_least_one, allow_negative_numbers = true)]
    nodes: Option<Vec<usize>>,
    /// Backends measured in scenario 6 [default: every backend built in].
    #[arg(long, value_name = "LIST", value_delimiter = ',', action = ArgAction::Set,
        value_parser = backends::kind)]
    backends: Option<Vec<backends::Kind>>,
    /// Upgrades per node count in scenarios 2 and 6b (with --tiny: 1).
    #[arg(long, value_name = "N", value_parser = at_least_one, allow_negative_numbers = true,
        default_value = "10", default_value_if("tiny", "true", "1"))]
    repeats: usize,
    /// Where the JSON goes [default: the cargo target dir's upsilon-bench.json,
    /// or upsilon-bench-tiny.json with --tiny].
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Start-ups timed per way in scenarios 1a and 6a, twice as many checks
    /// in 1b (with --tiny: 5).
    #[arg(long, value_name = "N", value_parser = at_least_one, allow_negative_numbers = true,
        default_value = "300", default_value_if("tiny", "true", "5"))]
    startup_iters: usize,
    /// The canary's task in scenarios 2 and 6b, in milliseconds (with --tiny: 300).
    #[arg(long, value_name = "MS", value_parser = millis, allow_negative_numbers = true,
        default_value = "1000", default_value_if("tiny", "true", "300"))]
    task_ms: u64,
    /// Waiting nodes in scenarios 3 and 6d (with --tiny: 3).
    #[arg(long, value_name = "N", value_parser = at_least_one, allow_negative_numbers = true,
        default_value = "50", default_value_if("tiny", "true", "3"))]
    load_nodes: usize,
    /// The upgrade's length in scenarios 3 and 6d, in milliseconds (with --tiny: 500).
    #[arg(long, value_name = "MS", value_parser = millis, allow_negative_numbers = true,
        default_value = "10000", default_value_if("tiny", "true", "500"))]
    load_ms: u64,
    /// Kills per way in scenario 4, per backend in 6c (with --tiny: 1).
    #[arg(long, value_name = "N", value_parser = at_least_one, allow_negative_numbers = true,
        default_value = "5", default_value_if("tiny", "true", "1"))]
    failover_repeats: usize,
    /// Waiting node processes in scenarios 4 and 6c (with --tiny: 2).
    #[arg(long, value_name = "N", value_parser = at_least_one, allow_negative_numbers = true,
        default_value = "3", default_value_if("tiny", "true", "2"))]
    failover_waiters: usize,
    /// Lease TTL behind a transaction pooler in scenario 4, and of every
    /// backend in 6c, in milliseconds, at least 300 (with --tiny: 1000).
    #[arg(long, value_name = "MS", value_parser = ttl_millis, allow_negative_numbers = true,
        default_value = "5000", default_value_if("tiny", "true", "1000"))]
    ttl_ms: u64,
    /// The statement a sqlx node is killed in, default settings, in
    /// milliseconds (with --tiny: 1000).
    #[arg(long, value_name = "MS", value_parser = millis, allow_negative_numbers = true,
        default_value = "3000", default_value_if("tiny", "true", "1000"))]
    sqlx_statement_ms: u64,
    /// Tasks collected, validated and planned in 5a (with --tiny: 200).
    #[arg(long, value_name = "N", value_parser = at_least_one, allow_negative_numbers = true,
        default_value = "10000", default_value_if("tiny", "true", "200"))]
    plan_tasks: usize,
    /// No-op tasks run end to end in 5b (with --tiny: 20).
    #[arg(long, value_name = "N", value_parser = at_least_one, allow_negative_numbers = true,
        default_value = "1000", default_value_if("tiny", "true", "20"))]
    run_tasks: usize,
    /// Repeats of 5a and 5b (with --tiny: 1).
    #[arg(long, value_name = "N", value_parser = at_least_one, allow_negative_numbers = true,
        default_value = "5", default_value_if("tiny", "true", "1"))]
    scale_repeats: usize,
    /// Task fns of the generated crates in 5c; 0 skips it (with --tiny: 0).
    #[arg(long, value_name = "N", value_parser = whole_number, allow_negative_numbers = true,
        default_value = "1000", default_value_if("tiny", "true", "0"))]
    build_tasks: usize,
    /// Rebuilds of each generated crate.
    #[arg(long, value_name = "N", value_parser = at_least_one, allow_negative_numbers = true,
        default_value = "3")]
    build_repeats: usize,
}

fn whole_number(s: &str) -> Result<usize, String> {
    s.trim()
        .parse()
        .map_err(|_| "expected a whole number".to_owned())
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match whole_number(s) {
        Ok(0) | Err(_) => Err("expected a whole number, at least 1".to_owned()),
        Ok(n) => Ok(n),
    }
}

fn millis(s: &str) -> Result<u64, String> {
    s.trim()
        .parse()
        .map_err(|_| "expected a duration in whole milliseconds".to_owned())
}

fn ttl_millis(s: &str) -> Result<u64, String> {
    match millis(s) {
        Ok(ms) if ms >= 300 => Ok(ms),
        _ => Err("expected a duration in whole milliseconds, at least 300".to_owned()),
    }
}

fn scenario(s: &str) -> Result<u8, String> {
    match s.trim().parse::<u64>() {
        Ok(id @ 1..=7) => Ok(id as u8),
        Ok(id) => Err(format!("there is no scenario {id}; they are 1 to 7")),
        Err(_) => Err("expected scenario numbers, 1 to 7".to_owned()),
    }
}

/// Sizes and switches.
#[derive(Debug, Clone)]
pub struct Options {
    pub tiny: bool,
    pub only: BTreeSet<u8>,
    /// Node counts of scenario 2.
    pub nodes: Vec<usize>,
    /// Node counts of scenario 6b.
    pub backend_nodes: Vec<usize>,
    /// Backends of scenario 6, each once, in the table's order.
    pub backends: Vec<backends::Kind>,
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

impl From<Flags> for Options {
    fn from(f: Flags) -> Options {
        let target = target_dir();
        let json = if f.tiny {
            "upsilon-bench-tiny.json"
        } else {
            "upsilon-bench.json"
        };
        let (nodes, backend_nodes) = match (f.nodes, f.tiny) {
            (Some(given), _) => (given.clone(), given),
            (None, true) => (vec![3], vec![3]),
            (None, false) => (vec![20, 50, 100, 200], vec![20, 100]),
        };
        let mut kinds = f.backends.unwrap_or_else(|| backends::Kind::ALL.to_vec());
        kinds.sort();
        kinds.dedup();
        Options {
            tiny: f.tiny,
            only: f.only.into_iter().collect(),
            nodes,
            backend_nodes,
            backends: kinds,
            repeats: f.repeats,
            json: f.json.unwrap_or_else(|| target.join(json)),
            startup_iters: f.startup_iters,
            task_ms: f.task_ms,
            load_nodes: f.load_nodes,
            load_ms: f.load_ms,
            failover_repeats: f.failover_repeats,
            failover_waiters: f.failover_waiters,
            ttl_ms: f.ttl_ms,
            sqlx_statement_ms: f.sqlx_statement_ms,
            plan_tasks: f.plan_tasks,
            run_tasks: f.run_tasks,
            scale_repeats: f.scale_repeats,
            build_tasks: f.build_tasks,
            build_repeats: f.build_repeats,
            build_dir: target.join("upsilon-bench-build"),
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        // A node process says on stdout that it failed, bad flags included.
        if e.use_stderr() && args.first().map(String::as_str) == Some("node") {
            println!("failed");
        }
        e.exit()
    });
    let flags = match cli.command {
        Some(Command::Node(kind)) => return node::main(kind),
        Some(Command::ScaleWorkload(w)) => return scale::workload_main(w),
        None => cli.flags,
    };
    let options = Options::from(flags);
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
    let biggest = o
        .nodes
        .iter()
        .chain(&o.backend_nodes)
        .copied()
        .max()
        .unwrap_or(1)
        .max(o.load_nodes);
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
    let scenarios: [(u8, &str, Scenario); 7] = [
        (1, "start-up", |e, o, r| Box::pin(startup::run(e, o, r))),
        (2, "cluster convergence", |e, o, r| {
            Box::pin(convergence::run(e, o, r))
        }),
        (3, "store load", |e, o, r| Box::pin(load::run(e, o, r))),
        (4, "failover", |e, o, r| Box::pin(failover::run(e, o, r))),
        (5, "scale", |e, o, r| Box::pin(scale::run(e, o, r))),
        (6, "other backends", |e, o, r| {
            Box::pin(backends::run(e, o, r))
        }),
        (7, "checkpoint overhead", |e, o, r| {
            Box::pin(checkpoint::run(e, o, r))
        }),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Options {
        let argv = std::iter::once("upsilon-bench").chain(args.iter().copied());
        let cli = Cli::try_parse_from(argv).unwrap();
        assert!(cli.command.is_none());
        Options::from(cli.flags)
    }

    #[test]
    fn the_flags_are_well_formed() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let o = parse(&[]);
        assert!(!o.tiny);
        assert_eq!(o.only, (1..=7).collect());
        assert_eq!(o.nodes, [20, 50, 100, 200]);
        assert_eq!(o.backend_nodes, [20, 100]);
        assert_eq!(o.backends, backends::Kind::ALL);
        assert_eq!(o.json, target_dir().join("upsilon-bench.json"));
        let sizes = [
            o.repeats,
            o.startup_iters,
            o.load_nodes,
            o.failover_repeats,
            o.failover_waiters,
            o.plan_tasks,
            o.run_tasks,
            o.scale_repeats,
            o.build_tasks,
            o.build_repeats,
        ];
        assert_eq!(sizes, [10, 300, 50, 5, 3, 10_000, 1000, 5, 1000, 3]);
        let ms = [o.task_ms, o.load_ms, o.ttl_ms, o.sqlx_statement_ms];
        assert_eq!(ms, [1000, 10_000, 5000, 3000]);
    }

    #[test]
    fn tiny_defaults() {
        let o = parse(&["--tiny"]);
        assert!(o.tiny);
        assert_eq!(o.only, (1..=7).collect());
        assert_eq!(o.nodes, [3]);
        assert_eq!(o.backend_nodes, [3]);
        assert_eq!(o.json, target_dir().join("upsilon-bench-tiny.json"));
        let sizes = [
            o.repeats,
            o.startup_iters,
            o.load_nodes,
            o.failover_repeats,
            o.failover_waiters,
            o.plan_tasks,
            o.run_tasks,
            o.scale_repeats,
            o.build_tasks,
            o.build_repeats,
        ];
        assert_eq!(sizes, [1, 5, 3, 1, 2, 200, 20, 1, 0, 3]);
        let ms = [o.task_ms, o.load_ms, o.ttl_ms, o.sqlx_statement_ms];
        assert_eq!(ms, [300, 500, 1000, 1000]);
    }

    #[test]
    fn a_flag_beats_the_tiny_default_wherever_it_stands() {
        let o = parse(&[
            "--repeats",
            "4",
            "--tiny",
            "--nodes",
            "5, 6",
            "--json",
            "x.json",
        ]);
        assert_eq!(
            (o.repeats, o.nodes, o.backend_nodes, o.json),
            (4, vec![5, 6], vec![5, 6], "x.json".into())
        );
        assert_eq!(o.startup_iters, 5);
    }

    #[test]
    fn the_last_of_a_repeated_flag_counts() {
        let o = parse(&[
            "--repeats",
            "4",
            "--repeats",
            "6",
            "--only",
            "1,2",
            "--only",
            "3",
        ]);
        assert_eq!((o.repeats, o.only), (6, [3].into()));
    }

    #[test]
    fn backends_are_named_once_each_in_the_tables_order() {
        let o = parse(&["--backends", "sqlite,postgres,sqlite"]);
        assert_eq!(
            o.backends,
            [backends::Kind::Postgres, backends::Kind::Sqlite]
        );
        let argv = ["upsilon-bench", "--backends", "mysql"];
        let err = Cli::try_parse_from(argv).unwrap_err().to_string();
        assert!(err.contains("no backend \"mysql\""), "{err}");
    }

    #[test]
    fn node_processes_take_their_own_flags() {
        let up = [
            "node",
            "upsilon",
            "--url",
            "u",
            "--service",
            "s",
            "--name",
            "n",
        ];
        let cli = Cli::try_parse_from(["b"].iter().chain(&up).chain(&["--task-ms", "5"])).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Node(node::Kind::Upsilon {
                task_ms: 5,
                ttl_ms: None,
                ..
            }))
        ));
        let sqlx = [
            "b",
            "node",
            "sqlx",
            "--url",
            "u",
            "--schema",
            "s",
            "--task-ms",
            "5",
        ];
        let cli = Cli::try_parse_from(sqlx.iter().chain(&["--check-ms", "100"])).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Node(node::Kind::Sqlx {
                check_ms: Some(100),
                ..
            }))
        ));
        assert!(Cli::try_parse_from(sqlx.iter().chain(&["--ttl-ms", "100"])).is_err());
        assert!(Cli::try_parse_from(["b", "--tiny", "node", "sqlx"]).is_err());
    }
}
