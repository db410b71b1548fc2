//! The tasks known to this binary: collected at link time from every
//! `#[upsilon::task]`, or given explicitly to the builder.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use semver::Version;

use crate::context::TaskContext;
use crate::ids::{BoxError, TaskKey};
use crate::version::parse_version;

/// The future a task body returns once boxed.
pub type TaskFuture<'a> = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'a>>;

/// The shape every task body and rollback has once erased: what
/// `#[upsilon::task]` generates, and what [`Task::new`] takes.
pub type TaskFn = for<'a> fn(&'a mut TaskContext) -> TaskFuture<'a>;

/// A task's future before its error is converted.
pub(crate) type RawFuture<'a, E> = Pin<Box<dyn Future<Output = Result<(), E>> + Send + 'a>>;

/// Converts the error of a boxed task future into a [`BoxError`]. Generic
/// over the error type alone: compiled once per error type, not once per
/// task.
pub(crate) fn err_into<'a, E: Into<BoxError> + 'a>(future: RawFuture<'a, E>) -> TaskFuture<'a> {
    Box::pin(ErrInto { future })
}

struct ErrInto<'a, E> {
    future: RawFuture<'a, E>,
}

impl<E: Into<BoxError>> Future for ErrInto<'_, E> {
    type Output = Result<(), BoxError>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.future.as_mut().poll(cx).map_err(Into::into)
    }
}

type TaskBody = Arc<dyn for<'a> Fn(&'a mut TaskContext) -> TaskFuture<'a> + Send + Sync>;

/// A registration emitted by `#[upsilon::task]`. Not public API.
#[doc(hidden)]
#[derive(Debug)]
pub struct TaskDef {
    pub id: &'static str,
    pub version: &'static str,
    pub order: u32,
    pub description: &'static str,
    pub run: TaskFn,
    pub rollback: Option<TaskFn>,
    pub file: &'static str,
    pub line: u32,
    pub module_path: &'static str,
}

inventory::collect!(TaskDef);

/// Where a task was defined, for messages that name both sides of a conflict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// Source file as `file!()` gives it.
    pub file: String,
    /// 1-based line of the task fn's name.
    pub line: u32,
    /// `module_path!()` of the task fn; its first segment is the crate.
    pub module_path: String,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// One upgrade task: what to run, at which version, in which order.
#[derive(Clone)]
pub struct Task {
    // Shared, so that plans and registries copy tasks for the price of a
    // reference count.
    inner: Arc<TaskInner>,
}

#[derive(Clone)]
struct TaskInner {
    key: TaskKey,
    order: u32,
    description: String,
    location: Location,
    run: TaskBody,
    rollback: Option<TaskBody>,
}

impl fmt::Debug for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Task")
            .field("version", &self.inner.key.version.to_string())
            .field("order", &self.inner.order)
            .field("id", &self.inner.key.id)
            .field("location", &self.inner.location.to_string())
            .field("rollback", &self.inner.rollback.is_some())
            .finish()
    }
}

impl Task {
    /// A task built in code rather than by `#[upsilon::task]`, for tests and
    /// for generated task sets. `version` takes the same literals as the macro,
    /// and `id` follows the same rule: 1 to 128 bytes of ASCII letters,
    /// digits, `_`, `.` and `-`.
    #[track_caller]
    pub fn new<F>(version: &str, order: u32, id: &str, body: F) -> Result<Task, RegistryError>
    where
        F: for<'a> Fn(&'a mut TaskContext) -> TaskFuture<'a> + Send + Sync + 'static,
    {
        let caller = std::panic::Location::caller();
        let version = parse_version(version).map_err(|e| RegistryError {
            problems: vec![Problem::BadVersion {
                id: id.to_owned(),
                error: e.to_string(),
            }],
        })?;
        if let Err(why) = upsilon_rules::check_id(id) {
            return Err(RegistryError {
                problems: vec![Problem::BadId {
                    id: id.to_owned(),
                    why: why.to_string(),
                    location: caller.to_string(),
                }],
            });
        }
        Ok(Task::from_inner(TaskInner {
            key: TaskKey {
                version,
                id: id.to_owned(),
            },
            order,
            description: String::new(),
            location: Location {
                file: caller.file().to_owned(),
                line: caller.line(),
                module_path: String::new(),
            },
            run: Arc::new(body),
            rollback: None,
        }))
    }

    /// Sets the description shown in plans, status and history.
    pub fn with_description(mut self, description: impl Into<String>) -> Task {
        Arc::make_mut(&mut self.inner).description = description.into();
        self
    }

    /// Sets the rollback run when this task's version must be undone.
    pub fn with_rollback<F>(mut self, rollback: F) -> Task
    where
        F: for<'a> Fn(&'a mut TaskContext) -> TaskFuture<'a> + Send + Sync + 'static,
    {
        Arc::make_mut(&mut self.inner).rollback = Some(Arc::new(rollback));
        self
    }

    fn from_inner(inner: TaskInner) -> Task {
        Task {
            inner: Arc::new(inner),
        }
    }

    fn from_def(def: &'static TaskDef) -> Result<Task, Box<Problem>> {
        let version = parse_version(def.version).map_err(|e| {
            Box::new(Problem::BadVersion {
                id: def.id.to_owned(),
                error: e.to_string(),
            })
        })?;
        Ok(Task::from_inner(TaskInner {
            key: TaskKey {
                version,
                id: def.id.to_owned(),
            },
            order: def.order,
            description: def.description.to_owned(),
            location: Location {
                file: def.file.to_owned(),
                line: def.line,
                module_path: def.module_path.to_owned(),
            },
            run: Arc::new(def.run),
            rollback: def.rollback.map(|f| Arc::new(f) as TaskBody),
        }))
    }

    /// The task's identity in the store.
    pub fn key(&self) -> &TaskKey {
        &self.inner.key
    }
    /// The version the task belongs to.
    pub fn version(&self) -> &Version {
        &self.inner.key.version
    }
    /// The task's id.
    pub fn id(&self) -> &str {
        &self.inner.key.id
    }
    /// Its order within its version.
    pub fn order(&self) -> u32 {
        self.inner.order
    }
    /// The fn's doc comment, or what [`Task::with_description`] set.
    pub fn description(&self) -> &str {
        &self.inner.description
    }
    /// Where the task was defined.
    pub fn location(&self) -> &Location {
        &self.inner.location
    }
    /// Whether the task has a rollback.
    pub fn has_rollback(&self) -> bool {
        self.inner.rollback.is_some()
    }

    pub(crate) fn run<'a>(&self, ctx: &'a mut TaskContext) -> TaskFuture<'a> {
        (self.inner.run)(ctx)
    }

    pub(crate) fn run_rollback<'a>(&self, ctx: &'a mut TaskContext) -> Option<TaskFuture<'a>> {
        self.inner.rollback.as_ref().map(|f| f(ctx))
    }

    /// Plan order: semver, then `order`, then id.
    pub(crate) fn plan_cmp(&self, other: &Task) -> std::cmp::Ordering {
        self.inner
            .key
            .version
            .cmp(&other.inner.key.version)
            .then(self.inner.order.cmp(&other.inner.order))
            .then_with(|| self.inner.key.id.cmp(&other.inner.key.id))
    }
}

/// The validated, ordered set of tasks a runner works from.
#[derive(Clone, Default)]
pub struct Registry {
    tasks: Vec<Task>,
    /// Positions in `tasks`, in the order of their keys (version, then id):
    /// the order of a store's task summaries.
    by_key: Vec<usize>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("tasks", &self.tasks)
            .finish()
    }
}

impl Registry {
    /// Every task registered with `#[upsilon::task]` in this binary, validated.
    pub fn collect() -> Result<Registry, RegistryError> {
        let mut problems = Vec::new();
        let mut tasks = Vec::new();
        for def in inventory::iter::<TaskDef> {
            match Task::from_def(def) {
                Ok(task) => tasks.push(task),
                Err(problem) => problems.push(*problem),
            }
        }
        if !problems.is_empty() {
            return Err(RegistryError { problems });
        }
        Registry::new(tasks)
    }

    /// A registry of the given tasks, validated: no two tasks of a version
    /// share an `order` or an id.
    pub fn new(mut tasks: Vec<Task>) -> Result<Registry, RegistryError> {
        tasks.sort_by(|a, b| a.plan_cmp(b));
        let by_key = key_order(&tasks);
        // In plan order, tasks that share a version and an order are
        // neighbours; in key order, tasks that share a version and an id are.
        // Each duplicate is paired with the last task before it (in plan
        // order) that it clashes with.
        let mut same_id: Vec<(usize, usize)> = by_key
            .windows(2)
            .filter(|w| tasks[w[0]].key() == tasks[w[1]].key())
            .map(|w| (w[1], w[0]))
            .collect();
        same_id.sort_unstable();
        let mut same_id = same_id.into_iter().peekable();
        let mut problems = Vec::new();
        for (i, task) in tasks.iter().enumerate() {
            let before = i.checked_sub(1).map(|j| &tasks[j]);
            if let Some(first) = before.filter(|b| {
                b.inner.order == task.inner.order && b.inner.key.version == task.inner.key.version
            }) {
                problems.push(Problem::DuplicateOrder {
                    version: task.inner.key.version.clone(),
                    order: task.inner.order,
                    first: (first.inner.key.id.clone(), first.inner.location.clone()),
                    second: (task.inner.key.id.clone(), task.inner.location.clone()),
                });
            }
            if let Some((_, first)) = same_id.next_if(|(second, _)| *second == i) {
                problems.push(Problem::DuplicateId {
                    key: task.inner.key.clone(),
                    first: tasks[first].inner.location.clone(),
                    second: task.inner.location.clone(),
                });
            }
        }
        if problems.is_empty() {
            Ok(Registry { tasks, by_key })
        } else {
            Err(RegistryError { problems })
        }
    }

    /// Positions of the registry's tasks in key order (version, then id,
    /// then position). Where two tasks share a key, the earlier comes first.
    pub(crate) fn by_key(&self) -> &[usize] {
        &self.by_key
    }

    /// The tasks in plan order (semver, then order, then id).
    pub fn tasks(&self) -> &[Task] {
        &self.tasks
    }

    /// The tasks whose version is above `app`: they cannot run in this binary.
    pub fn above<'a>(&'a self, app: &'a Version) -> impl Iterator<Item = &'a Task> + 'a {
        self.tasks.iter().filter(move |t| t.version() > app)
    }

    /// Fails when a task's version is above `app`, naming each one.
    pub fn check_not_above(&self, app: &Version) -> Result<(), RegistryError> {
        let problems: Vec<Problem> = self
            .above(app)
            .map(|t| Problem::AboveApp {
                key: t.inner.key.clone(),
                location: t.inner.location.clone(),
                app: app.clone(),
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(RegistryError { problems })
        }
    }

    /// The crates (first segment of each task's module path) that registered tasks.
    pub fn crates(&self) -> BTreeMap<String, usize> {
        let mut crates = BTreeMap::new();
        for task in &self.tasks {
            let name = task
                .location()
                .module_path
                .split("::")
                .next()
                .unwrap_or_default()
                .to_owned();
            *crates.entry(name).or_insert(0) += 1;
        }
        crates
    }
}

/// Everything wrong with a set of tasks, all at once.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct RegistryError {
    problems: Vec<Problem>,
}

impl RegistryError {
    /// The problems found.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    fn render(&self) -> String {
        let mut out = format!(
            "{} problem{} in the registered upgrade tasks:",
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        );
        for p in &self.problems {
            out.push_str("\n  - ");
            out.push_str(&p.to_string());
        }
        out
    }
}

/// One problem in a set of tasks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// Two tasks of one version have the same `order`.
    #[error("tasks `{}` ({}) and `{}` ({}) both have version {version} and order {order}; give one of them another `order`", first.0, first.1, second.0, second.1)]
    DuplicateOrder {
        /// The version.
        version: Version,
        /// The shared order.
        order: u32,
        /// The first task's id and location.
        first: (String, Location),
        /// The second task's id and location.
        second: (String, Location),
    },
    /// Two tasks of one version have the same id.
    #[error("two tasks have id `{}` in version {} ({first} and {second}); ids are what stores record, so give one of them `id = \"...\"`", key.id, key.version)]
    DuplicateId {
        /// The shared identity.
        key: TaskKey,
        /// The first definition.
        first: Location,
        /// The second definition.
        second: Location,
    },
    /// A task's version is above the app version.
    #[error("task `{}` ({location}) has version {}, above the app version {app}; it cannot run in this binary: raise the app version or lower the task's", key.id, key.version)]
    AboveApp {
        /// The task.
        key: TaskKey,
        /// Where it was defined.
        location: Location,
        /// The app version.
        app: Version,
    },
    /// A task's version literal does not parse.
    #[error("task `{id}`: {error}")]
    BadVersion {
        /// The task id.
        id: String,
        /// What is wrong with the version.
        error: String,
    },
    /// A task was built with an id that is not 1 to 128 bytes of ASCII
    /// letters, digits, `_`, `.` and `-`.
    #[error("a task built at {location} has a bad id {id:?}: an id {why}")]
    BadId {
        /// The id as given.
        id: String,
        /// What is wrong with it.
        why: String,
        /// Where.
        location: String,
    },
}

/// Positions of `tasks`, sorted in plan order, in key order: each version's
/// tasks are contiguous, so only they are sorted, by id then position.
fn key_order(tasks: &[Task]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..tasks.len()).collect();
    let mut start = 0;
    while start < tasks.len() {
        let version = tasks[start].version();
        let len = tasks[start..]
            .iter()
            .position(|t| t.version() != version)
            .unwrap_or(tasks.len() - start);
        order[start..start + len]
            .sort_by(|&a, &b| tasks[a].id().cmp(tasks[b].id()).then(a.cmp(&b)));
        start += len;
    }
    order
}

pub(crate) fn problem_involves(problem: &Problem, version: &str, id: &str) -> bool {
    let Ok(version) = parse_version(version) else {
        return false;
    };
    match problem {
        Problem::DuplicateOrder {
            version: v,
            first,
            second,
            ..
        } => *v == version && (first.0 == id || second.0 == id),
        Problem::DuplicateId { key, .. } => key.version == version && key.id == id,
        Problem::BadVersion { id: i, .. } => i == id,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str) -> Result<Task, RegistryError> {
        Task::new("1.0", 1, id, |_: &mut TaskContext| -> TaskFuture<'_> {
            Box::pin(async { Ok(()) })
        })
    }

    #[tokio::test]
    async fn a_boxed_task_future_keeps_its_output_and_converts_its_error() {
        let ok = crate::__private::box_task(async { Ok::<(), std::io::Error>(()) });
        assert!(ok.await.is_ok());
        let err =
            crate::__private::box_task(async { Err::<(), _>(std::io::Error::other("disk full")) });
        assert_eq!(err.await.unwrap_err().to_string(), "disk full");
        let borrowed = String::from("borrowed");
        let err = crate::__private::box_task(async { Err::<(), &str>(borrowed.as_str()) });
        assert_eq!(err.await.unwrap_err().to_string(), "borrowed");
    }

    #[test]
    fn task_new_applies_the_id_rule_of_the_attribute() {
        assert_eq!(task("backfill.v2-x_1").unwrap().id(), "backfill.v2-x_1");
        assert_eq!(task(&"a".repeat(128)).unwrap().id().len(), 128);
        for (id, why) in [
            (
                "a b",
                "may only contain ASCII letters, digits, `_`, `.` and `-`; found ' '",
            ),
            (
                &"a".repeat(129),
                "must be at most 128 bytes long; this one has 129",
            ),
            ("", "must not be empty"),
        ] {
            let err = task(id).unwrap_err();
            let [Problem::BadId {
                id: got,
                why: got_why,
                location,
            }] = err.problems()
            else {
                panic!("{id:?}: {err:?}");
            };
            assert_eq!((got.as_str(), got_why.as_str()), (id, why));
            assert!(location.starts_with(file!()), "{location}");
            assert!(
                err.to_string()
                    .contains(&format!("has a bad id {id:?}: an id {why}")),
                "{err}"
            );
        }
    }
}
