//! `upsilon`: the operator's command line. See the crate docs and
//! docs/CLI.md.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    upsilon_cli::run(upsilon_cli::Cli::parse()).await
}
