//! `check`: the registered tasks and the runner's settings, validated
//! without a store, for CI.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use upsilon::backend::{
    Acquire, BackendError, Change, HistoryEntry, Lease, LeaseInfo, Lock, Snapshot, Store,
};
use upsilon::{Holder, Problem, Registry};

use super::plan::TaskJson;
use crate::app::App;
use crate::exit::Code;
use crate::output::Output;

#[derive(Debug, Serialize)]
struct CheckJson {
    ok: bool,
    service: String,
    app_version: String,
    tasks: Vec<TaskJson>,
    crates: BTreeMap<String, usize>,
    problems: Vec<ProblemJson>,
}

#[derive(Debug, Serialize)]
struct ProblemJson {
    kind: &'static str,
    message: String,
}

fn problem(kind: &'static str, message: impl Into<String>) -> ProblemJson {
    ProblemJson {
        kind,
        message: message.into(),
    }
}

fn kind(p: &Problem) -> &'static str {
    match p {
        Problem::DuplicateOrder { .. } => "duplicate_order",
        Problem::DuplicateId { .. } => "duplicate_id",
        Problem::AboveApp { .. } => "above_app",
        Problem::BadVersion { .. } => "bad_version",
        Problem::BadId { .. } => "bad_id",
        _ => "other",
    }
}

pub(crate) fn run(app: &App) -> Output {
    let mut problems = Vec::new();
    let version = upsilon::parse_version(app.version());
    if let Err(e) = &version {
        problems.push(problem("config", format!("app_version: {e}")));
    }
    let (registry, complete) = match app.registry() {
        Ok(r) => (r, true),
        Err(e) => {
            problems.extend(e.problems().iter().map(|p| problem(kind(p), p.to_string())));
            (Registry::default(), false)
        }
    };
    if let Ok(v) = &version {
        if let Err(e) = registry.check_not_above(v) {
            problems.extend(e.problems().iter().map(|p| problem(kind(p), p.to_string())));
        }
    }
    let crates = registry.crates();
    // Which crates registered tasks is known only of a valid registry.
    for asked in app.required_crates().iter().filter(|_| complete) {
        let name = asked.replace('-', "_");
        if !crates.contains_key(&name) {
            problems.push(problem(
                "missing_crate",
                format!(
                    "no task from crate `{name}` is registered in this binary; the linker drops a crate's tasks when nothing refers to it: add `use {name} as _;` to the binary"
                ),
            ));
        }
    }
    // Every other setting the runner would refuse at start-up.
    if let Err(upsilon::Error::Config {
        setting,
        problem: p,
        ..
    }) = app
        .builder()
        .lock(std::sync::Arc::new(NoStore))
        .store(std::sync::Arc::new(NoStore))
        .build()
    {
        if !matches!(setting, "require_tasks_from" | "app_version") {
            problems.push(problem("config", format!("{setting}: {p}")));
        }
    }

    let app_version = version
        .as_ref()
        .map_or_else(|_| app.version().to_owned(), |v| v.to_string());
    let mut text = String::new();
    let n = registry.tasks().len();
    let _ = writeln!(
        text,
        "{n} task{} registered for service {} at app version {}",
        if n == 1 { "" } else { "s" },
        app.service(),
        app_version
    );
    for t in registry.tasks() {
        let _ = writeln!(
            text,
            "  {} (order {}) at {}",
            t.key(),
            t.order(),
            t.location()
        );
    }
    if problems.is_empty() {
        text.push_str("ok: no problems\n");
    } else {
        let _ = writeln!(
            text,
            "{} problem{}:",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
        for p in &problems {
            let _ = writeln!(text, "  - {}", p.message);
        }
    }
    let ok = problems.is_empty();
    let json = CheckJson {
        ok,
        service: app.service().to_owned(),
        app_version,
        tasks: registry.tasks().iter().map(TaskJson::from).collect(),
        crates,
        problems,
    };
    Output::new(json, text).with_code(if ok { Code::Ok } else { Code::Failed })
}

/// The backend `check` builds the runner with: building reads nothing, and
/// nothing else is asked of it.
#[derive(Debug)]
struct NoStore;

fn no_store() -> BackendError {
    BackendError::other("`check` reads no store")
}

#[async_trait]
impl Lock for NoStore {
    async fn try_acquire(&self, _: &str, _: &Holder, _: Duration) -> Result<Acquire, BackendError> {
        Err(no_store())
    }
    async fn renew(&self, _: &Lease) -> Result<Lease, BackendError> {
        Err(no_store())
    }
    async fn release(&self, _: &Lease) -> Result<(), BackendError> {
        Err(no_store())
    }
    async fn current(&self, _: &str) -> Result<Option<LeaseInfo>, BackendError> {
        Err(no_store())
    }
    async fn force_release(&self, _: &str) -> Result<Option<LeaseInfo>, BackendError> {
        Err(no_store())
    }
}

#[async_trait]
impl Store for NoStore {
    async fn load(&self, _: &str) -> Result<Snapshot, BackendError> {
        Err(no_store())
    }
    async fn claim(&self, _: &str, _: u64) -> Result<Snapshot, BackendError> {
        Err(no_store())
    }
    async fn apply(&self, _: &str, _: u64, _: &[Change]) -> Result<(), BackendError> {
        Err(no_store())
    }
    async fn history(&self, _: &str) -> Result<Vec<HistoryEntry>, BackendError> {
        Err(no_store())
    }
    async fn services(&self) -> Result<Vec<String>, BackendError> {
        Err(no_store())
    }
}
