//! Test kit for Upsilon's users and backends.
//!
//! - [`MemoryBackend`]: an in-memory [`Lock`](crate::backend::Lock) +
//!   [`Store`](crate::backend::Store) whose clock follows tokio's (so paused-time tests
//!   work), with fault injection ([`Faults`]): fail the nth call, lose the
//!   lease, delay, apply a write but lose the reply.
//! - [`run_nodes`]: several nodes in one process, started together.
//! - [`conformance`]: the suite every backend passes.
//! - [`context`]: a [`TaskContext`] for unit-testing a
//!   task fn on its own.

pub mod conformance;
mod faults;
mod memory;

pub use faults::{Fault, Faults, Op};
pub use memory::{Commit, Grant, MemoryBackend, SessionModel};

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::context::{Resources, TaskContext, TaskInfo};
use crate::ids::Holder;
use crate::status::Status;
use crate::{Error, Outcome, Upsilon, Version};

/// Runs `nodes` in one process, all started at once on the current runtime,
/// and returns each node's result in the order given.
pub async fn run_nodes(nodes: Vec<Upsilon>) -> Vec<Result<Outcome, Error>> {
    let start = Arc::new(tokio::sync::Barrier::new(nodes.len()));
    let handles: Vec<_> = nodes
        .into_iter()
        .map(|node| {
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                node.run().await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(handles.len());
    for h in handles {
        results.push(match h.await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        });
    }
    results
}

/// A holder for test node `n`: host `node-{n}`, a fixed run id.
pub fn holder(n: usize) -> Holder {
    Holder {
        host: format!("node-{n}"),
        pod: None,
        pid: std::process::id(),
        run_id: format!("test-run-{n}"),
    }
}

/// A [`Change::Start`](crate::backend::Change::Start) of run attempt `attempt` of
/// task `id@version` by [`holder`]`(1)`, for tests that write to a store
/// directly.
pub fn start_attempt(id: &str, version: &str, attempt: u32) -> crate::backend::Change {
    crate::backend::Change::Start(crate::backend::StartAttempt {
        key: crate::TaskKey {
            version: v(version),
            id: id.to_owned(),
        },
        attempt,
        kind: crate::backend::AttemptKind::Run,
        description: format!("task {id}"),
        holder: holder(1),
        checkpoint: None,
    })
}

/// A context for calling a task fn directly in a unit test, with fence 1,
/// the given resources, and a cancellation token you control.
///
/// ```
/// # async fn demo() -> Result<(), upsilon::BoxError> {
/// let mut resources = upsilon::Resources::default();
/// resources.insert(42u32);
/// let (mut ctx, cancel) = upsilon::testing::context("my_task", "1.1", resources);
/// assert_eq!(*ctx.resource::<u32>()?, 42);
/// # drop(cancel); Ok(()) }
/// ```
pub fn context(
    task: &str,
    version: &str,
    resources: Resources,
) -> (TaskContext, CancellationToken) {
    let cancel = CancellationToken::new();
    let version = crate::parse_version(version).unwrap_or_else(|e| panic!("{e}"));
    let (status, _) = watch::channel(Status::Starting);
    let ctx = TaskContext {
        info: TaskInfo {
            id: task.to_owned(),
            version: version.clone(),
            description: String::new(),
            attempt: 1,
            index: 1,
            total: 1,
            rollback: false,
        },
        service: Arc::from("test"),
        fence: 1,
        holder: holder(0),
        cancel: cancel.clone(),
        resources: Arc::new(resources),
        status,
        checkpoints: crate::checkpoint::Checkpoints {
            key: crate::TaskKey {
                version,
                id: task.to_owned(),
            },
            attempt: 1,
            fence: 1,
            service: Arc::from("test"),
            saver: None,
            current: Default::default(),
            status: None,
        },
    };
    (ctx, cancel)
}

/// Makes a [`context`] resume from `position`, as if an earlier attempt had
/// saved it with [`TaskContext::save_checkpoint`]. The context keeps its
/// saves in memory only; read them with [`TaskContext::saved_checkpoint`].
pub fn resume_from<T: serde::Serialize + ?Sized>(ctx: &TaskContext, position: &T) {
    let position = serde_json::to_string(position).unwrap_or_else(|e| panic!("{e}"));
    resume_from_json(ctx, &position);
}

/// [`resume_from`] with the stored JSON as it is, for a position that an
/// older release of the task saved.
pub fn resume_from_json(ctx: &TaskContext, json: &str) {
    ctx.checkpoints.set_current(crate::backend::Checkpoint {
        position: json.to_owned(),
        saved_at_ms: 0,
        done: None,
        total: None,
    });
}

/// Runs `f` to completion on a fresh current-thread runtime.
pub fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(f)
}

/// Makes this thread's random choices (run ids, jitter of polls and
/// backoffs) follow `seed`, so that a simulation on a current-thread runtime
/// with paused time replays exactly; `None` goes back to real entropy.
pub fn seed_thread_rng(seed: Option<u64>) {
    crate::util::seed_thread(seed);
}

pub(crate) fn v(text: &str) -> Version {
    crate::parse_version(text).unwrap_or_else(|e| panic!("{e}"))
}
