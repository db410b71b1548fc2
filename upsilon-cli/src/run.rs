//! From a parsed command line to a printed answer and an exit code.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use upsilon::backend::Backend;

use crate::app::App;
use crate::args::{AppCommand, Cli, Command, Global};
use crate::cmd::{self, Ctx};
use crate::exit::{Code, Failure};
use crate::output::{emit, Secrets};

/// Runs the standalone binary's command.
pub async fn run(cli: Cli) -> ExitCode {
    dispatch(&cli.global, &AppCommand::Operator(cli.command), None).await
}

pub(crate) async fn dispatch(global: &Global, command: &AppCommand, app: Option<&App>) -> ExitCode {
    let secrets = global
        .url
        .as_deref()
        .map(Secrets::from_url)
        .unwrap_or_default();
    let json = global.json;
    let app_only = |name: &str| {
        Failure::new(
            Code::Usage,
            format!("`{name}` needs the application's tasks: run it from the application's binary"),
        )
    };
    // `check` reads no store, so needs no URL.
    if let AppCommand::Check = command {
        let result = app.map(cmd::check::run).ok_or_else(|| app_only("check"));
        return emit(result, json, &secrets);
    }
    let backend = match connect(global).await {
        Ok(b) => b,
        Err(f) => return emit(Err(f), json, &secrets),
    };
    let ctx = Ctx {
        backend,
        service: global
            .service
            .clone()
            .or_else(|| app.map(|a| a.service().to_owned())),
    };
    let result = match command {
        AppCommand::Operator(Command::Status(s)) if s.watch => {
            return cmd::watch::run(&ctx, Duration::from_millis(s.interval), json, &secrets).await
        }
        AppCommand::Operator(Command::Status(_)) => cmd::status::run(&ctx).await,
        AppCommand::Operator(Command::History(h)) => cmd::history::run(&ctx, h).await,
        AppCommand::Operator(Command::Unlock(u)) => cmd::unlock::run(&ctx, u).await,
        AppCommand::Operator(Command::Baseline(b)) => cmd::baseline::run(&ctx, b).await,
        AppCommand::Operator(Command::Services) => cmd::services::run(&ctx).await,
        AppCommand::Plan => match app {
            Some(app) => cmd::plan::run(app, &ctx).await,
            None => Err(app_only("plan")),
        },
        AppCommand::Check => Err(app_only("check")),
    };
    emit(result, json, &secrets)
}

async fn connect(global: &Global) -> Result<Arc<dyn Backend>, Failure> {
    let Some(url) = global.url.as_deref() else {
        return Err(Failure::new(
            Code::Usage,
            "no backend: pass --url URL or set UPSILON_URL (`sqlite:///path/to/upsilon.db`, `postgres://user:password@host/db`)",
        ));
    };
    upsilon_backends::connect(url).await.map_err(|e| {
        Failure::backend(
            &format!("opening the backend {}", upsilon_backends::redact(url)),
            &e,
        )
    })
}
