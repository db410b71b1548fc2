//! Scenario 5: scale. Many registered tasks collected, validated and
//! planned; many no-op tasks run end to end; the build time of a crate
//! with many `#[upsilon::task]` fns.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context as _};
use serde_json::json;
use upsilon::backend::{AttemptKind, AttemptState, LastRow};
use upsilon::backend::{Backend, Snapshot};
use upsilon::planner::{self, PlanOptions};
use upsilon::{Outcome, Registry, Task, TaskContext, TaskFuture, TaskKey};
use upsilon_backends::postgres::PostgresBackend;
use upsilon_backends::sqlite::SqliteBackend;

use crate::common::{runner, Env};
use crate::instrument::Instrumented;
use crate::report::{Report, Row, Unit};
use crate::stats::{ms, summary};
use crate::Options;

mod callgrind;

pub use callgrind::{workload_main, Workload};

fn version_of(i: usize, per_version: usize) -> String {
    format!("1.{}", i / per_version + 1)
}

/// The versions and ids of `n` tasks, 100 to a version, made before any
/// timing: a macro's registrations carry them as literals.
struct Names {
    versions: Vec<String>,
    ids: Vec<String>,
}

impl Names {
    fn new(n: usize) -> Names {
        Names {
            versions: (0..n).map(|i| version_of(i, 100)).collect(),
            ids: (0..n).map(|i| format!("t{i}")).collect(),
        }
    }

    /// No-op tasks, as the registry collects them: each version parsed, each
    /// id copied.
    fn tasks(&self) -> Vec<Task> {
        self.ids
            .iter()
            .zip(&self.versions)
            .enumerate()
            .map(|(i, (id, version))| {
                Task::new(
                    version,
                    (i % 100) as u32,
                    id,
                    |_ctx: &mut TaskContext| -> TaskFuture<'_> { Box::pin(async { Ok(()) }) },
                )
                .expect("a valid task")
            })
            .collect()
    }
}

/// Collect, validate, plan, once: what callgrind counts. The registry and
/// the plan are returned, so that dropping them is left out.
#[inline(never)]
fn collect_and_plan_once(
    names: &Names,
    snapshot: &Snapshot,
    app: &upsilon::Version,
) -> anyhow::Result<(Registry, planner::Plan)> {
    let registry = Registry::new(names.tasks())?;
    let plan = planner::plan(&registry, snapshot, app, PlanOptions::default());
    Ok((registry, plan))
}

/// A store in which every one of `names` is completed, at data version `app`.
fn completed_snapshot(names: &Names, app: &upsilon::Version) -> anyhow::Result<Snapshot> {
    let mut done = Snapshot {
        data_version: Some(app.clone()),
        fence: 1,
        ..Snapshot::default()
    };
    for (id, version) in names.ids.iter().zip(&names.versions) {
        done.fold_row(
            TaskKey {
                version: upsilon::parse_version(version)?,
                id: id.clone(),
            },
            LastRow {
                attempt: 1,
                kind: AttemptKind::Run,
                state: AttemptState::Completed,
                fence: 1,
            },
        );
    }
    Ok(done)
}

/// Collect, validate, plan; the time of each step in ms.
fn collect_and_plan(
    names: &Names,
    snapshot: &Snapshot,
    app: &upsilon::Version,
) -> anyhow::Result<(usize, [f64; 3])> {
    let t = Instant::now();
    let tasks = names.tasks();
    let collected = t.elapsed();
    let registry = Registry::new(tasks)?;
    let validated = t.elapsed();
    let planned = planner::plan(&registry, snapshot, app, PlanOptions::default())
        .steps
        .len();
    let all = t.elapsed();
    Ok((
        planned,
        [
            ms(collected),
            ms(validated - collected),
            ms(all - validated),
        ],
    ))
}

fn plan_rows(o: &Options, report: &mut Report) -> anyhow::Result<serde_json::Value> {
    let n = o.plan_tasks;
    let names = Names::new(n);
    let app = upsilon::parse_version(&version_of(n - 1, 100))?;
    let fresh = Snapshot::default();
    let done = completed_snapshot(&names, &app)?;
    let mut a = Vec::new();
    let mut b = Vec::new();
    let mut steps_a = [Vec::new(), Vec::new(), Vec::new()];
    let mut steps_b = [Vec::new(), Vec::new(), Vec::new()];
    for i in 0..o.scale_repeats + 2 {
        let (planned, sa) = collect_and_plan(&names, &fresh, &app)?;
        ensure!(planned == n, "planned {planned} of {n}");
        let (planned, sb) = collect_and_plan(&names, &done, &app)?;
        ensure!(planned == 0, "planned {planned} completed tasks");
        if i >= 2 {
            a.push(sa.iter().sum::<f64>());
            b.push(sb.iter().sum::<f64>());
            for k in 0..3 {
                steps_a[k].push(sa[k]);
                steps_b[k].push(sb[k]);
            }
        }
    }
    let (a, b) = (summary(&a), summary(&b));
    report.push(
        Row::new(
            "5a",
            format!("{n} tasks collected, validated, planned: fresh store, p50"),
            Unit::Ms,
            a.p50,
        )
        .at_most(5.0, "< 5 ms"),
    );
    report.push(
        Row::new(
            "5a",
            format!("{n} tasks collected, validated, planned: all completed, p50"),
            Unit::Ms,
            b.p50,
        )
        .at_most(5.0, "< 5 ms"),
    );
    let instructions = instruction_rows(o, report)?;
    let p50s = |v: &[Vec<f64>; 3]| {
        json!({
            "collect_ms": summary(&v[0]).p50,
            "validate_ms": summary(&v[1]).p50,
            "plan_ms": summary(&v[2]).p50,
        })
    };
    Ok(json!({
        "tasks": n, "repeats": a.n, "fresh_ms": a.p50, "completed_ms": b.p50,
        "fresh_steps": p50s(&steps_a), "completed_steps": p50s(&steps_b),
        "instructions": instructions,
    }))
}

/// 5a counted by callgrind: the instructions of one collect, validate and
/// plan, and the same 5 ms budget in instructions at this machine's rate
/// (the reference work's instructions over its fastest native run).
fn instruction_rows(o: &Options, report: &mut Report) -> anyhow::Result<serde_json::Value> {
    use callgrind::{instructions, reference_seconds, Measured};
    let n = o.plan_tasks;
    let dir = tempfile::tempdir()?;
    let reference = instructions(n, Measured::Reference, dir.path())?;
    let (reference, reference_s) = match reference {
        Ok(ir) => (ir, reference_seconds(7)),
        Err(why) => {
            report.push(Row::new(
                "5a",
                format!(
                    "{n} tasks collected, validated, planned: instructions not counted ({why})"
                ),
                Unit::Count,
                0.0,
            ));
            return Ok(json!({ "not_counted": why }));
        }
    };
    let rate = reference as f64 / reference_s;
    let budget = 0.005 * rate;
    let mut counts = serde_json::Map::new();
    for (what, store) in [
        (Measured::Fresh, "fresh store"),
        (Measured::Completed, "all completed"),
    ] {
        let ir = instructions(n, what, dir.path())?.map_err(anyhow::Error::msg)?;
        report.push(
            Row::new(
                "5a",
                format!(
                    "{n} tasks collected, validated, planned: {store}, instructions (callgrind; \
                     {:.0} a task, {:.2} ms at {:.2} G/s)",
                    ir as f64 / n as f64,
                    ir as f64 / rate * 1000.0,
                    rate / 1e9
                ),
                Unit::Count,
                ir as f64,
            )
            .at_most(
                budget,
                format!("< {:.1} M (5 ms at {:.2} G/s)", budget / 1e6, rate / 1e9),
            ),
        );
        counts.insert(format!("{what:?}").to_lowercase(), json!(ir));
    }
    Ok(json!({
        "counts": counts,
        "reference_instructions": reference,
        "reference_fastest_s": reference_s,
        "instructions_per_s": rate,
    }))
}

/// Runs `n` no-op tasks on `backend`; the time in ms, and the time spent in
/// each backend operation.
async fn run_all(
    service: &str,
    backend: Arc<dyn Backend>,
    n: usize,
) -> anyhow::Result<(f64, serde_json::Value)> {
    let app = version_of(n - 1, 100);
    let backend = Arc::new(Instrumented::new(backend));
    let up = runner(service, &app, backend.clone(), Names::new(n).tasks())?;
    let t = Instant::now();
    let outcome = up.run().await?;
    let took = ms(t.elapsed());
    match &outcome {
        Outcome::Upgraded { report } => ensure!(
            report.completed.len() == n,
            "ran {} of {n} tasks",
            report.completed.len()
        ),
        other => anyhow::bail!("expected an upgrade, got: {other}"),
    }
    Ok((took, backend.breakdown()))
}

async fn run_rows(
    env: &Env,
    o: &Options,
    report: &mut Report,
) -> anyhow::Result<serde_json::Value> {
    let n = o.run_tasks;
    let (client, conn) = tokio_postgres::connect(&env.url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let pg = Arc::new(PostgresBackend::connect_url(&env.url).await?);
    let mut up_pg = Vec::new();
    let mut select = Vec::new();
    let mut up_lite = Vec::new();
    let mut lite_tx = Vec::new();
    let mut ops = (serde_json::Value::Null, serde_json::Value::Null);
    for r in 0..o.scale_repeats {
        let (took, pg_ops) = run_all(&format!("noop-{r}"), pg.clone(), n).await?;
        up_pg.push(took);
        let t = Instant::now();
        for _ in 0..n {
            client.simple_query("SELECT 1").await?;
        }
        select.push(ms(t.elapsed()));

        let path = env.dir.path().join(format!("noop-{r}.db"));
        let (took, lite_ops) =
            run_all("noop", Arc::new(SqliteBackend::open(&path).await?), n).await?;
        up_lite.push(took);
        ops = (pg_ops, lite_ops);
        let path = env.dir.path().join(format!("plain-{r}.db"));
        let lite = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
            // As Upsilon's SQLite backend sets it up.
            let c = rusqlite::Connection::open(&path)?;
            c.pragma_update(None, "journal_mode", "WAL")?;
            c.pragma_update(None, "synchronous", "FULL")?;
            c.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, x INTEGER NOT NULL)")?;
            let t = Instant::now();
            for i in 0..n {
                c.execute("INSERT INTO t (x) VALUES (?1)", [i as i64])?;
            }
            Ok(ms(t.elapsed()))
        })
        .await??;
        lite_tx.push(lite);
    }
    let [u, s, ul, lt] = [up_pg, select, up_lite, lite_tx].map(|v| summary(&v));
    report.push(
        Row::new(
            "5b",
            format!("PG: {n} no-op tasks end to end, p50"),
            Unit::Ms,
            u.p50,
        )
        .vs(format!("{n} SELECT 1 round trips"), s.p50)
        .ratio_at_most(1.5, "<= 1.5x"),
    );
    report.push(
        Row::new(
            "5b",
            format!("SQLite: {n} no-op tasks end to end, p50"),
            Unit::Ms,
            ul.p50,
        )
        .vs(format!("{n} single-statement transactions"), lt.p50)
        .ratio_at_most(2.0, "<= 2x"),
    );
    Ok(json!({
        "tasks": n, "repeats": o.scale_repeats,
        "upsilon_pg_ms": u.p50, "select1_ms": s.p50,
        "upsilon_sqlite_ms": ul.p50, "sqlite_transactions_ms": lt.p50,
        "last_pg_run_by_operation": ops.0, "last_sqlite_run_by_operation": ops.1,
    }))
}

/// The workspace this binary was built from.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the bench crate sits in the workspace")
        .to_path_buf()
}

fn lib_source(n: usize, attribute: bool) -> String {
    let mut s = String::from("//! Generated by upsilon-bench: build-time scenario.\n\n");
    for i in 0..n {
        s.push_str(&format!("/// Task {i}.\n"));
        if attribute {
            s.push_str(&format!(
                "#[upsilon::task(version = \"{}\", order = {})]\n",
                version_of(i, 100),
                i % 100
            ));
        }
        s.push_str(&format!(
            "pub async fn task_{i}(ctx: &mut upsilon::TaskContext) -> Result<(), std::io::Error> {{\n    \
             ctx.progress({i}, {n}, \"rows\");\n    Ok(())\n}}\n\n"
        ));
    }
    s
}

/// Writes a workspace with two crates: `n` task fns with the attribute
/// (`tasks_attr`) and the same fns without it (`tasks_plain`).
fn generate(dir: &Path, n: usize) -> anyhow::Result<()> {
    let upsilon = workspace().join("upsilon");
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("Cargo.toml"),
        "[workspace]\nresolver = \"2\"\nmembers = [\"tasks_attr\", \"tasks_plain\"]\n",
    )?;
    let lock = dir.join("Cargo.lock");
    if !lock.exists() {
        std::fs::copy(workspace().join("Cargo.lock"), lock)?;
    }
    for (name, attribute) in [("tasks_attr", true), ("tasks_plain", false)] {
        let krate = dir.join(name);
        std::fs::create_dir_all(krate.join("src"))?;
        std::fs::write(
            krate.join("Cargo.toml"),
            format!(
                "[package]\nname = \"{name}\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n\
                 [dependencies]\nupsilon = {{ path = {:?} }}\n",
                upsilon.display().to_string()
            ),
        )?;
        std::fs::write(krate.join("src/lib.rs"), lib_source(n, attribute))?;
    }
    Ok(())
}

fn cargo_build(dir: &Path, package: &str) -> anyhow::Result<f64> {
    let run = |offline: bool| {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(dir)
            .args(["build", "-q", "-j2", "-p", package])
            .env("CARGO_TARGET_DIR", dir.join("target"))
            .env("CARGO_INCREMENTAL", "0");
        if offline {
            cmd.arg("--offline");
        }
        let t = Instant::now();
        let out = cmd.output()?;
        anyhow::Ok((out, ms(t.elapsed())))
    };
    let (out, took) = run(true)?;
    if out.status.success() {
        return Ok(took);
    }
    let (out, took) = run(false)?;
    ensure!(
        out.status.success(),
        "cargo build -p {package} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
}

fn build_rows(o: &Options, report: &mut Report) -> anyhow::Result<serde_json::Value> {
    let n = o.build_tasks;
    let dir = o.build_dir.clone();
    generate(&dir, n)?;
    eprintln!(
        "  5c: building the generated crates once in {}",
        dir.display()
    );
    for p in ["tasks_attr", "tasks_plain"] {
        cargo_build(&dir, p).with_context(|| format!("warming {p}"))?;
    }
    let mut attr = Vec::new();
    let mut plain = Vec::new();
    for _ in 0..o.build_repeats {
        for (p, attribute, out) in [
            ("tasks_attr", true, &mut attr),
            ("tasks_plain", false, &mut plain),
        ] {
            // A new write, so cargo sees the file as changed.
            std::fs::write(dir.join(p).join("src/lib.rs"), lib_source(n, attribute))?;
            out.push(cargo_build(&dir, p)?);
        }
    }
    let (a, p) = (summary(&attr), summary(&plain));
    report.push(
        Row::new(
            "5c",
            format!("rebuild of a crate with {n} task fns (dev, CARGO_INCREMENTAL=0), p50"),
            Unit::S,
            a.p50 / 1000.0,
        )
        .vs("the same fns without #[upsilon::task]", p.p50 / 1000.0)
        .ratio_at_most(2.0, "<= 2x"),
    );
    Ok(json!({"tasks": n, "repeats": o.build_repeats, "attr_ms": attr, "plain_ms": plain}))
}

pub async fn run(env: &Env, o: &Options, report: &mut Report) -> anyhow::Result<()> {
    let plan = plan_rows(o, report)?;
    let runs = run_rows(env, o, report).await?;
    let build = if o.build_tasks > 0 {
        build_rows(o, report)?
    } else {
        serde_json::Value::Null
    };
    report.detail("5", json!({"plan": plan, "run": runs, "build": build}));
    Ok(())
}
