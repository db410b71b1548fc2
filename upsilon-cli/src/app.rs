//! The commands inside an application, with its own tasks and settings.

use std::fmt;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use upsilon::{Builder, Registry, RegistryError, Task, Upsilon};

use crate::args::AppArgs;

type Configure = Arc<dyn Fn(Builder) -> Builder + Send + Sync>;

/// An application's Upsilon commands: the operator's commands against its
/// store, plus `plan` and `check`, which know its registered tasks.
///
/// Build one with the service name and app version the application runs
/// with, and the settings its runner uses; [`App::builder`] gives the
/// application that same runner builder for its start-up, so the commands
/// and the service never disagree.
///
/// ```no_run
/// # async fn demo() -> std::process::ExitCode {
/// let app = upsilon_cli::App::new("accounts", "1.1.0")
///     .require_tasks_from("accounts_tasks")
///     .configure(|b| b.run_out_of_order(true));
/// // `myapp upsilon plan`, `myapp upsilon status --watch`, ...
/// app.run().await
/// # }
/// ```
#[derive(Clone)]
pub struct App {
    service: String,
    app_version: String,
    tasks: Option<Vec<Task>>,
    required: Vec<String>,
    configure: Option<Configure>,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field("service", &self.service)
            .field("app_version", &self.app_version)
            .field("tasks", &self.tasks.as_ref().map(Vec::len))
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

impl App {
    /// The commands of `service` at `app_version` (usually
    /// `env!("CARGO_PKG_VERSION")`), with the tasks registered in this
    /// binary by `#[upsilon::task]`.
    pub fn new(service: impl Into<String>, app_version: impl Into<String>) -> App {
        App {
            service: service.into(),
            app_version: app_version.into(),
            tasks: None,
            required: Vec::new(),
            configure: None,
        }
    }

    /// These tasks instead of the registered ones (as
    /// [`Builder::tasks`]).
    pub fn tasks(mut self, tasks: impl IntoIterator<Item = Task>) -> App {
        self.tasks = Some(tasks.into_iter().collect());
        self
    }

    /// Fail `check` (and the runner's build) unless `crate_name` registered a
    /// task: the guard against the linker dropping a task crate (as
    /// [`Builder::require_tasks_from`]).
    pub fn require_tasks_from(mut self, crate_name: impl Into<String>) -> App {
        self.required.push(crate_name.into());
        self
    }

    /// Any other runner setting the application uses (`run_out_of_order`,
    /// `tasks_above_app`, `ttl`, ...): `plan` plans with them and `check`
    /// validates them.
    pub fn configure(mut self, f: impl Fn(Builder) -> Builder + Send + Sync + 'static) -> App {
        self.configure = Some(Arc::new(f));
        self
    }

    /// The runner builder with this application's service, version, tasks
    /// and settings: add the backend and resources, and build.
    pub fn builder(&self) -> Builder {
        let mut b = Upsilon::builder()
            .service(&self.service)
            .app_version(&self.app_version);
        if let Some(tasks) = &self.tasks {
            b = b.tasks(tasks.iter().cloned());
        }
        for c in &self.required {
            b = b.require_tasks_from(c);
        }
        match &self.configure {
            Some(f) => f(b),
            None => b,
        }
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The app version, as given.
    pub fn version(&self) -> &str {
        &self.app_version
    }

    pub(crate) fn required_crates(&self) -> &[String] {
        &self.required
    }

    pub(crate) fn registry(&self) -> Result<Registry, RegistryError> {
        match &self.tasks {
            Some(tasks) => Registry::new(tasks.clone()),
            None => Registry::collect(),
        }
    }

    /// Parses the process's arguments as [`AppArgs`] (exiting with 2 and the
    /// usage on a bad command line) and runs the command.
    pub async fn run(&self) -> ExitCode {
        self.run_args(AppArgs::parse()).await
    }

    /// Runs a command the application parsed itself, for example as a
    /// subcommand of its own command line.
    pub async fn run_args(&self, args: AppArgs) -> ExitCode {
        crate::run::dispatch(&args.global, &args.command, Some(self)).await
    }
}
