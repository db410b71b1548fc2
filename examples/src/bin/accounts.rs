//! A service that embeds Upsilon's commands in its own command line, the
//! way a migrator CLI ships inside the service it migrates:
//!
//! ```text
//! export UPSILON_URL=sqlite:///tmp/accounts.db
//! cargo run -p upsilon-examples --bin accounts -- upsilon check    # CI: the registered tasks are sound
//! cargo run -p upsilon-examples --bin accounts -- upsilon plan     # what a node of this build would run
//! cargo run -p upsilon-examples --bin accounts -- serve            # start-up: run the upgrade, then serve
//! cargo run -p upsilon-examples --bin accounts -- upsilon status
//! cargo run -p upsilon-examples --bin accounts -- upsilon history --json
//! ```
//!
//! `serve` and `upsilon ...` share one [`upsilon_cli::App`], so the commands
//! plan with the service's own tasks and settings. The tasks stand in for
//! real ones: they report progress and sleep.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use upsilon::{AboveAppPolicy, TaskContext};

/// The accounts table.
#[upsilon::task(version = "1.0", order = 1)]
async fn create_accounts(_ctx: &mut TaskContext) -> anyhow::Result<()> {
    Ok(())
}

/// Adds the normalised email column that 1.1 reads.
#[upsilon::task(version = "1.1", order = 1)]
async fn add_email_normalized(_ctx: &mut TaskContext) -> anyhow::Result<()> {
    Ok(())
}

/// Backfills the normalised emails, in batches.
#[upsilon::task(version = "1.1", order = 2, id = "backfill-email-normalized")]
async fn backfill(ctx: &mut TaskContext) -> anyhow::Result<()> {
    let pause = std::env::var("ACCOUNTS_BATCH_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(Duration::from_millis(20), Duration::from_millis);
    for batch in 1..=5 {
        tokio::time::sleep(pause).await;
        ctx.progress(batch * 500, 2500, "rows backfilled");
    }
    Ok(())
}

/// This build's version. A real service passes `env!("CARGO_PKG_VERSION")`;
/// `ACCOUNTS_APP_VERSION` lets one binary play an older build (1.0) beside
/// this one, as the tests do.
fn app_version() -> String {
    std::env::var("ACCOUNTS_APP_VERSION").unwrap_or_else(|_| "1.1.0".to_owned())
}

#[derive(Debug, Parser)]
#[command(
    name = "accounts",
    about = "The accounts service, with Upsilon's commands"
)]
enum Cli {
    /// Runs the upgrade as the service does at start-up, then exits (a real
    /// service would serve its traffic from here).
    Serve {
        /// The backend URL.
        #[arg(long, env = "UPSILON_URL", hide_env_values = true)]
        url: String,
    },
    /// Upsilon's commands for this service's upgrade tasks.
    Upsilon(upsilon_cli::AppArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let app = upsilon_cli::App::new("accounts", app_version())
        // An older build knows the newer tasks: leave them out without a word.
        .configure(|b| b.tasks_above_app(AboveAppPolicy::Ignore));
    match Cli::parse() {
        Cli::Upsilon(args) => Ok(app.run_args(args).await),
        Cli::Serve { url } => {
            let upsilon = app
                .builder()
                .backend(upsilon_backends::connect(&url).await?)
                .build()?;
            let outcome = upsilon.run_until(upsilon::shutdown_signal()).await?;
            println!("ready: {outcome}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
