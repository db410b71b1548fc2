//! `upsilon-bench node`: one node of the failover scenarios (4 and 6c), as
//! a process of its own so that it can be SIGKILLed. It upgrades a service
//! from 1.0 to 1.1, on the backend its URL names, whose one task sleeps
//! `--task-ms`, and prints what it does, one word a line: `waiting`,
//! `upgrading`, `wrote` (a store write returned), `ready`, `failed`
//! (Upsilon), or `pid N`, `started`, `ready`
//! (sqlx, N its server process id).
//!
//! ```text
//! upsilon-bench node upsilon --url URL --service S --name NAME --task-ms MS [--ttl-ms MS]
//! upsilon-bench node sqlx --url URL --schema S --task-ms MS [--check-ms MS]
//! ```

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;
use upsilon::{Holder, Status};

use crate::common::{migrator, released_tasks, sleeping_task, sqlx_connect_with};
use crate::wrappers::TimedStore;

/// Which way the node upgrades.
#[derive(Debug, Subcommand)]
pub enum Kind {
    /// An Upsilon node: upgrades its service from 1.0 to 1.1.
    Upsilon {
        /// The backend's URL, as `upsilon_backends::connect` takes it.
        #[arg(long)]
        url: String,
        /// The service upgraded.
        #[arg(long, value_name = "S")]
        service: String,
        /// The node's name (its holder's pod).
        #[arg(long)]
        name: String,
        /// How long the task at 1.1 sleeps, in milliseconds.
        #[arg(long, value_name = "MS", value_parser = crate::millis,
            allow_negative_numbers = true)]
        task_ms: u64,
        /// The lease TTL, in milliseconds [default: Upsilon's].
        #[arg(long, value_name = "MS", value_parser = crate::millis,
            allow_negative_numbers = true)]
        ttl_ms: Option<u64>,
    },
    /// A sqlx node: runs the migrator, whose migration at 1.1 sleeps.
    Sqlx {
        /// The PostgreSQL server's URL.
        #[arg(long)]
        url: String,
        /// The schema migrated (the connection's search_path).
        #[arg(long, value_name = "S")]
        schema: String,
        /// How long the migration at 1.1 sleeps, in milliseconds.
        #[arg(long, value_name = "MS", value_parser = crate::millis,
            allow_negative_numbers = true)]
        task_ms: u64,
        /// The session's client_connection_check_interval, in milliseconds
        /// [default: the server's, no check].
        #[arg(long, value_name = "MS", value_parser = crate::millis,
            allow_negative_numbers = true)]
        check_ms: Option<u64>,
    },
}

pub fn main(kind: Kind) -> ExitCode {
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
    match rt.block_on(run(kind)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("failed");
            eprintln!("node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(kind: Kind) -> anyhow::Result<()> {
    match kind {
        Kind::Upsilon {
            url,
            service,
            name,
            task_ms,
            ttl_ms,
        } => {
            let backend = upsilon_backends::connect(&url).await?;
            let mut tasks = released_tasks();
            tasks.push(sleeping_task(Duration::from_millis(task_ms)));
            let mut builder = upsilon::Upsilon::builder()
                .service(service)
                .app_version("1.1")
                .lock(backend.clone())
                .store(Arc::new(TimedStore::printing(backend)))
                .tasks(tasks)
                .holder(Holder {
                    pod: Some(name),
                    ..Holder::current()
                });
            if let Some(ttl) = ttl_ms {
                builder = builder.ttl(Duration::from_millis(ttl));
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
        Kind::Sqlx {
            url,
            schema,
            task_ms,
            check_ms,
        } => {
            // PostgreSQL notices a dead client in the middle of a statement
            // only with `client_connection_check_interval` set.
            let check = check_ms.map(|ms| format!("{ms}ms"));
            let settings: Vec<(&str, &str)> = check
                .iter()
                .map(|v| ("client_connection_check_interval", v.as_str()))
                .collect();
            let mut conn = sqlx_connect_with(&url, Some(&schema), &settings).await?;
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut conn)
                .await?;
            println!("pid {pid}");
            println!("started");
            migrator(Some(Duration::from_millis(task_ms)))
                .run(&mut conn)
                .await?;
            println!("ready");
        }
    }
    Ok(())
}
