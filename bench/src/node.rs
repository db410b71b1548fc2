//! `upsilon-bench node`: one node of the failover scenario, as a process of
//! its own so that it can be SIGKILLed. It upgrades a service from 1.0 to
//! 1.1, whose one task sleeps `--task-ms`, and prints what it does, one word
//! a line: `waiting`, `upgrading`, `ready`, `failed` (Upsilon), or `pid N`,
//! `started`, `ready` (sqlx, N its server process id).
//!
//! ```text
//! upsilon-bench node upsilon --url URL --service S --name NAME --task-ms MS [--ttl-ms MS]
//! upsilon-bench node sqlx --url URL --schema S --task-ms MS [--check-ms MS]
//! ```

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use upsilon::{Holder, Status};
use upsilon_backends::postgres::PostgresBackend;

use crate::common::{migrator, released_tasks, sleeping_task, sqlx_connect_with};

pub fn main(args: &[String]) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("node: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("failed");
            eprintln!("node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &[String]) -> anyhow::Result<()> {
    let kind = args.first().context("node: upsilon or sqlx?")?.clone();
    let mut flags = HashMap::new();
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        flags.insert(flag.as_str(), value.clone());
    }
    let get = |k: &str| {
        flags
            .get(k)
            .cloned()
            .with_context(|| format!("missing {k}"))
    };
    let url = get("--url")?;
    let task = Duration::from_millis(get("--task-ms")?.parse()?);
    match kind.as_str() {
        "upsilon" => {
            let backend = Arc::new(PostgresBackend::connect_url(&url).await?);
            let mut tasks = released_tasks();
            tasks.push(sleeping_task(task));
            let mut builder = upsilon::Upsilon::builder()
                .service(get("--service")?)
                .app_version("1.1")
                .backend(backend)
                .tasks(tasks)
                .holder(Holder {
                    pod: Some(get("--name")?),
                    ..Holder::current()
                });
            if let Some(ttl) = flags.get("--ttl-ms") {
                builder = builder.ttl(Duration::from_millis(ttl.parse()?));
            }
            let up = builder.build()?;
            let mut status = up.status();
            tokio::spawn(async move {
                let mut last = "";
                loop {
                    let word = match &*status.borrow_and_update() {
                        Status::Waiting { .. } => "waiting",
                        Status::Upgrading { .. } => "upgrading",
                        _ => "",
                    };
                    if !word.is_empty() && word != last {
                        println!("{word}");
                        last = word;
                    }
                    if status.changed().await.is_err() {
                        return;
                    }
                }
            });
            let outcome = up.run().await?;
            println!("ready {outcome}");
        }
        "sqlx" => {
            // PostgreSQL notices a dead client in the middle of a statement
            // only with `client_connection_check_interval` set.
            let check = flags.get("--check-ms").map(|ms| format!("{ms}ms"));
            let settings: Vec<(&str, &str)> = check
                .iter()
                .map(|v| ("client_connection_check_interval", v.as_str()))
                .collect();
            let mut conn = sqlx_connect_with(&url, Some(&get("--schema")?), &settings).await?;
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut conn)
                .await?;
            println!("pid {pid}");
            println!("started");
            migrator(Some(task)).run(&mut conn).await?;
            println!("ready");
        }
        other => anyhow::bail!("node: unknown kind {other:?}; upsilon or sqlx"),
    }
    Ok(())
}
