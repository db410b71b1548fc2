//! The operator's side of [Upsilon](upsilon): a command line against any
//! backend URL, and the same commands for an application to embed with its
//! own tasks.
//!
//! The standalone binary, `upsilon`:
//!
//! ```text
//! upsilon --url sqlite:///var/lib/app/upsilon.db status
//! upsilon --url postgres://ops@db/app --service accounts status --watch
//! upsilon --service accounts history --state failed --json
//! upsilon --service accounts unlock          # asks first; --yes in scripts
//! upsilon --service accounts baseline 1.4    # an existing deployment adopts Upsilon
//! upsilon services
//! ```
//!
//! Inside an application, [`App`] adds `plan` (what this binary would run
//! now, and why, without the lease) and `check` (its registered tasks
//! validated, for CI), the way a migrator CLI ships inside the service it
//! migrates:
//!
//! ```no_run
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     upsilon_cli::App::new("accounts", env!("CARGO_PKG_VERSION"))
//!         .run()
//!         .await
//! }
//! ```
//!
//! An application with a command line of its own puts [`AppArgs`] under
//! one of its subcommands and hands it to [`App::run_args`]
//! (`examples/src/bin/accounts.rs` does).
//!
//! Every command takes `--json`; the shapes, and the exit codes ([`Code`]),
//! are in docs/CLI.md. Nothing printed ever carries the URL's password.
#![warn(missing_docs)]
#![deny(unreachable_pub)]

mod app;
mod args;
mod cmd;
mod exit;
mod json;
mod output;
mod run;
mod text;

pub use app::App;
pub use args::{
    AppArgs, AppCommand, BaselineArgs, Cli, Command, Global, HistoryArgs, State, StatusArgs,
    UnlockArgs,
};
pub use exit::{Code, Failure};
pub use run::run;
