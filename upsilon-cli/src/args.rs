//! The command tree: [`Cli`] for the standalone `upsilon` binary,
//! [`AppArgs`] for an application that embeds the commands with its own
//! tasks (adding `plan` and `check`).

use clap::{Args, Parser, Subcommand, ValueEnum};
use upsilon::backend::AttemptState;
use upsilon::Version;

/// `upsilon`: the operator's view of a store, for any backend URL.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "upsilon",
    version,
    about = "Inspect and operate Upsilon's store: status, history, unlock, baseline, services",
    after_help = "Exit codes: 0 ok, 1 failed, 2 bad usage, 3 no such service, 4 refused, 5 backend unreachable."
)]
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub global: Global,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands inside an application (see [`App`](crate::App)): the
/// operator's commands, plus `plan` and `check`, which need the
/// application's tasks.
#[derive(Debug, Clone, Parser)]
#[command(
    about = "Upsilon's commands for this application's upgrade tasks",
    after_help = "Exit codes: 0 ok, 1 failed (or check found problems), 2 bad usage, 3 no such service, 4 refused, 5 backend unreachable."
)]
pub struct AppArgs {
    /// Options every command takes.
    #[command(flatten)]
    pub global: Global,
    /// The command.
    #[command(subcommand)]
    pub command: AppCommand,
}

/// Options every command takes, before or after the command's name.
#[derive(Debug, Clone, Default, Args)]
pub struct Global {
    /// The backend: `sqlite:///path/to/upsilon.db` or
    /// `postgres://user:password@host:5432/db?schema=...`. Never printed with its password.
    #[arg(long, env = "UPSILON_URL", global = true, hide_env_values = true)]
    pub url: Option<String>,
    /// The service. Without it, `status` and `history` cover every service
    /// the store holds; an application's commands default to its own.
    #[arg(long, env = "UPSILON_SERVICE", global = true, value_parser = service_name)]
    pub service: Option<String>,
    /// Print JSON on stdout instead of text (docs/CLI.md has the shapes).
    #[arg(long, global = true)]
    pub json: bool,
}

/// The operator's commands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Data version, baseline, the lease, the last attempt of each task and
    /// the running one.
    Status(StatusArgs),
    /// Every attempt: task, version, attempt, kind, state, fence, holder,
    /// start, duration, error.
    History(HistoryArgs),
    /// Forces the lease free, fencing its holder out of the store, and
    /// records it in the history.
    Unlock(UnlockArgs),
    /// Adopts an existing deployment: an empty store takes VERSION as its
    /// data version without running the tasks up to it.
    Baseline(BaselineArgs),
    /// The services the store holds.
    Services,
}

/// An application's commands.
#[derive(Debug, Clone, Subcommand)]
pub enum AppCommand {
    /// The operator's commands.
    #[command(flatten)]
    Operator(Command),
    /// What this binary would run against the store now, in order, and why;
    /// takes no lease.
    Plan,
    /// Validates the registered tasks (duplicates, versions above the app,
    /// task crates the linker dropped) without reading any store; exits 1
    /// with the problems.
    Check,
}

/// `status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Follow it: re-read and redraw every `--interval`, until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// How often `--watch` re-reads, in ms.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..))]
    pub interval: u64,
}

/// `history`.
#[derive(Debug, Clone, Args)]
pub struct HistoryArgs {
    /// Only the attempts of this task version (`1.1` means `1.1.0`).
    #[arg(long = "version", value_name = "VERSION", value_parser = version)]
    pub task_version: Option<Version>,
    /// Only the attempts in this state.
    #[arg(long)]
    pub state: Option<State>,
}

/// An attempt's state, as `history --state` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum State {
    /// Started and not finished (or its holder died).
    Running,
    /// Finished successfully.
    Completed,
    /// Returned an error or panicked.
    Failed,
    /// Stopped because the lease was lost or the node was stopped.
    Cancelled,
}

impl State {
    /// The attempt state it selects.
    pub fn attempt_state(self) -> AttemptState {
        match self {
            State::Running => AttemptState::Running,
            State::Completed => AttemptState::Completed,
            State::Failed => AttemptState::Failed,
            State::Cancelled => AttemptState::Cancelled,
        }
    }
}

/// `unlock`.
#[derive(Debug, Clone, Args)]
pub struct UnlockArgs {
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long, short)]
    pub yes: bool,
    /// Free the lease at once instead of holding it until the freed lease
    /// would have expired: a live holder may then still run task code (not
    /// write to the store) until its next renewal.
    #[arg(long)]
    pub no_wait: bool,
}

/// `baseline`.
#[derive(Debug, Clone, Args)]
pub struct BaselineArgs {
    /// The data version the existing deployment is at (`1.4` means `1.4.0`).
    #[arg(value_parser = version)]
    pub version: Version,
    /// How long to wait for a lease another node holds, in seconds.
    #[arg(long, default_value_t = 600)]
    pub max_wait: u64,
}

fn version(text: &str) -> Result<Version, String> {
    upsilon::parse_version(text).map_err(|e| e.to_string())
}

/// The rule the runner's builder applies to service names.
fn service_name(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(text.to_owned())
    } else {
        Err("a service name is 1 to 63 characters of a-z, A-Z, 0-9, `_`, `-` and `.`".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_trees_are_well_formed() {
        Cli::command().debug_assert();
        AppArgs::command().debug_assert();
    }

    #[test]
    fn options_go_before_or_after_the_command() {
        let cli = Cli::try_parse_from([
            "upsilon",
            "history",
            "--url",
            "sqlite:a.db",
            "--json",
            "--version",
            "1.1",
        ])
        .unwrap();
        assert!(cli.global.json);
        let Command::History(h) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(h.task_version, Some(Version::new(1, 1, 0)));
        assert!(Cli::try_parse_from(["upsilon", "--service", "a b", "services"]).is_err());
        let app = AppArgs::try_parse_from(["app", "plan", "--service", "billing"]).unwrap();
        assert!(matches!(app.command, AppCommand::Plan));
        assert_eq!(app.global.service.as_deref(), Some("billing"));
    }
}
