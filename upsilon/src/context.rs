//! What a running task sees: its identity, the fence, cancellation, progress
//! and the resources the app registered.

use std::any::{type_name, Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use semver::Version;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ids::Holder;
use crate::status::{Progress, Status};

/// Typed values the app hands to its tasks: pools, clients, configuration.
///
/// Registered with [`Builder::resource`](crate::Builder::resource) and read
/// with [`TaskContext::resource`].
#[derive(Default, Clone)]
pub struct Resources {
    map: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resources")
            .field("count", &self.map.len())
            .finish()
    }
}

impl Resources {
    /// Adds `value`, replacing any earlier value of the same type.
    pub fn insert<T: Send + Sync + 'static>(&mut self, value: T) {
        self.map.insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// The value of type `T`, if one was registered.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.map
            .get(&TypeId::of::<T>())
            .and_then(|v| v.downcast_ref::<T>())
    }
}

/// A task asked for a resource that the app did not register.
#[derive(Debug, Clone, thiserror::Error)]
#[error("task `{task}` asked for a resource of type `{type_name}` that was never registered; add `.resource(value)` to the Upsilon builder")]
pub struct MissingResource {
    task: String,
    type_name: &'static str,
}

/// Identity of the task being run, as the context reports it.
#[derive(Debug, Clone)]
pub struct TaskInfo {
    /// The task's id.
    pub id: String,
    /// The task's version.
    pub version: Version,
    /// The task's description (its doc comment).
    pub description: String,
    /// 1-based number of this history row for the task (earlier attempts and
    /// rollbacks count).
    pub attempt: u32,
    /// Position of the task in the plan, 1-based.
    pub index: usize,
    /// Number of tasks in the plan.
    pub total: usize,
    /// Whether this run is the task's rollback.
    pub rollback: bool,
}

/// The argument of every task: `async fn my_task(ctx: &mut TaskContext)`.
pub struct TaskContext {
    pub(crate) info: TaskInfo,
    pub(crate) service: Arc<str>,
    pub(crate) fence: u64,
    pub(crate) holder: Holder,
    pub(crate) cancel: CancellationToken,
    pub(crate) resources: Arc<Resources>,
    pub(crate) status: watch::Sender<Status>,
}

impl fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskContext")
            .field("task", &self.info.id)
            .field("version", &self.info.version.to_string())
            .field("service", &self.service)
            .field("fence", &self.fence)
            .field("holder", &self.holder.to_string())
            .finish_non_exhaustive()
    }
}

impl TaskContext {
    /// Which task this is.
    pub fn task(&self) -> &TaskInfo {
        &self.info
    }

    /// The service name the lease and store are scoped by.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The fence of the lease this task runs under. It grows with every grant;
    /// stamp writes to other systems with it and refuse older stamps there to
    /// keep a stale holder's late writes out.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// Who runs this task.
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// Cancelled when the lease is lost or its local deadline passes. The
    /// runner also stops polling the task at that point, so long loops that do
    /// not await should check [`TaskContext::is_cancelled`].
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Whether the lease was lost and the task must stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The resource of type `T` registered on the builder.
    ///
    /// ```no_run
    /// # struct PgPool;
    /// # async fn f(ctx: &mut upsilon::TaskContext) -> Result<(), upsilon::BoxError> {
    /// let pool = ctx.resource::<PgPool>()?;
    /// # Ok(()) }
    /// ```
    pub fn resource<T: Send + Sync + 'static>(&self) -> Result<&T, MissingResource> {
        self.resources.get::<T>().ok_or_else(|| MissingResource {
            task: self.info.id.clone(),
            type_name: type_name::<T>(),
        })
    }

    /// Reports progress: `done` of `total` units, shown in the status and logs.
    pub fn progress(&self, done: u64, total: u64, message: impl Into<String>) {
        let progress = Progress {
            done,
            total,
            message: message.into(),
        };
        tracing::info!(
            task = %self.info.id,
            version = %self.info.version,
            done,
            total,
            message = %progress.message,
            "task progress"
        );
        self.status.send_modify(|status| {
            if let Status::Upgrading { progress: p, .. } = status {
                *p = Some(progress);
            }
        });
    }
}
