//! What a running task sees: its identity, the fence, cancellation, progress
//! and the resources the app registered.

use std::any::{type_name, Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use semver::Version;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backend::Checkpoint;
use crate::batch::Batches;
use crate::checkpoint::{CheckpointError, Checkpoints};
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
    pub(crate) checkpoints: Checkpoints,
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

    /// The position this attempt resumes from: the newest checkpoint that an
    /// earlier attempt of this task (of the same kind: a rollback never reads
    /// a run's checkpoint) saved, or the one this attempt saved last; `None`
    /// when there is none, so the task starts from the beginning.
    ///
    /// A stored position that does not read as `T` is an error
    /// ([`CheckpointError::Incompatible`]) naming the task, never a silent
    /// restart from nothing.
    pub fn checkpoint<T: DeserializeOwned>(&self) -> Result<Option<T>, CheckpointError> {
        self.checkpoints.read()
    }

    /// The checkpoint as stored: its JSON, when it was saved, its counts.
    pub fn saved_checkpoint(&self) -> Option<Checkpoint> {
        self.checkpoints.current()
    }

    /// Saves `position` as this attempt's checkpoint, in one store write
    /// fenced like every other: a node that lost the lease is refused
    /// ([`CheckpointError::Refused`], which also cancels the task as a lost
    /// lease does). Transient store errors are retried as the runner's own
    /// writes are. Return the error from the task if it fails.
    pub async fn save_checkpoint<T: Serialize + ?Sized>(
        &self,
        position: &T,
    ) -> Result<(), CheckpointError> {
        self.checkpoints.save(position, None, None).await
    }

    /// [`TaskContext::save_checkpoint`] with the progress it implies: `done`
    /// units of `total` (if known), kept with the checkpoint and reported as
    /// [`TaskContext::progress`] does.
    pub async fn save_checkpoint_with_progress<T: Serialize + ?Sized>(
        &self,
        position: &T,
        done: u64,
        total: Option<u64>,
    ) -> Result<(), CheckpointError> {
        self.checkpoints.save(position, Some(done), total).await?;
        self.progress(done, total.unwrap_or(0), "checkpoint saved");
        Ok(())
    }

    /// A batched, paced, resumable loop over keys of type `K`, checkpointed
    /// after each batch: see [`Batches`].
    pub fn batches<K>(&self) -> Batches<'_, K>
    where
        K: Serialize + DeserializeOwned + Clone,
    {
        Batches::new(self)
    }
}
