//! Upsilon runs the upgrade work of a new service version (schema changes,
//! data migrations, backfills, post-upgrade checks) exactly once per cluster,
//! while the cluster rolls that version out.
//!
//! Tasks are plain async fns:
//!
//! ```no_run
//! /// Copies legacy rows into the new table.
//! #[upsilon::task(version = "1.1", order = 1)]
//! async fn backfill_accounts(ctx: &mut upsilon::TaskContext) -> Result<(), std::io::Error> {
//!     ctx.progress(0, 100, "copying");
//!     Ok(())
//! }
//! ```
//!
//! At start-up, [`Upsilon::run`] reads the data version from a shared
//! [`Store`](backend::Store). If it is behind the app version, the node takes a fenced lease
//! ([`Lock`](backend::Lock)), runs the pending tasks in order (semver, then `order`, then id),
//! records each completion, records the new data version, releases the lease,
//! and only then reports READY. Every other node waits and becomes READY
//! without doing the work.
//!
//! ```no_run
//! # async fn demo(backend: std::sync::Arc<upsilon::testing::MemoryBackend>) -> Result<(), upsilon::Error> {
//! let upsilon = upsilon::Upsilon::builder()
//!     .service("billing")
//!     .app_version(env!("CARGO_PKG_VERSION"))
//!     .backend(backend)
//!     .build()?;
//! let probe = upsilon.probe(); // serve probe.up() and probe.ready()
//! let outcome = upsilon.run().await?;
//! println!("{outcome}");
//! # Ok(()) }
//! ```
//!
//! The pieces:
//! - [`task`]: the attribute that registers a task at link time;
//!   [`Registry`] validates what was registered, [`plan`](planner::plan)
//!   orders it.
//! - [`Upsilon`] and its [`Builder`]: the runner.
//! - [`backend`]: what a backend implements, [`Lock`](backend::Lock) and
//!   [`Store`](backend::Store), and the kit that makes its protocol decisions
//!   (`upsilon-backends` has SQLite and PostgreSQL).
//! - [`Status`] and [`Probe`]: readiness; `http` (feature `http`): the
//!   `/livez`, `/readyz` and `/upsilon/status` endpoints as an axum router.
//! - [`metrics`]: what the runner records through the `metrics` facade.
//! - `testing` (feature `testing`, for tests only): in-memory backends with fault injection, a cluster helper
//!   and the conformance suite every backend passes.
//!
//! # Tasks in another crate
//!
//! The linker drops a library's registrations when the binary never refers to
//! that library. A binary that uses tasks from a crate `my_tasks` must name
//! it, for example `use my_tasks as _;`, and can make sure with
//! [`Builder::require_tasks_from`].
#![warn(missing_docs)]
#![deny(unreachable_pub)]

pub mod backend;
mod batch;
mod checkpoint;
mod context;
mod error;
#[cfg(feature = "http")]
pub mod http;
mod ids;
pub mod metrics;
pub mod planner;
mod registry;
mod runner;
mod state;
mod status;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod util;
mod version;

pub use batch::{Batch, BatchDone, BatchError, BatchPosition, Batched, Batches};
pub use checkpoint::CheckpointError;
pub use context::{MissingResource, Resources, TaskContext, TaskInfo};
pub use error::{Error, LeaseLoss, Report, TaskReport};
pub use ids::{BoxError, Holder, InvalidHolder, TaskKey};
pub use registry::{Location, Problem, Registry, RegistryError, Task, TaskFn, TaskFuture};
pub use runner::{
    baseline, shutdown_signal, AboveAppPolicy, Builder, DataAheadPolicy, Outcome, RetryPolicy,
    Upsilon,
};
pub use semver::Version;
pub use status::{Probe, Progress, Status};
pub use upsilon_macros::task;
pub use version::{parse_version, VersionError};

/// Not public API. Used by generated code.
#[doc(hidden)]
pub mod __private {
    pub use crate::registry::{TaskDef, TaskFn, TaskFuture};
    pub use crate::BoxError;
    pub use crate::TaskContext;
    pub use ::core;
    pub use ::inventory;

    /// Boxes a task's future, converting its error.
    pub fn box_task<'a, F, E>(future: F) -> TaskFuture<'a>
    where
        F: ::core::future::Future<Output = ::core::result::Result<(), E>> + Send + 'a,
        E: Into<BoxError>,
        // Always holds for a task fn: its error type can borrow nothing that
        // its context does not outlive.
        E: 'a,
    {
        // Boxed as it is, and converted by code generic over the error type
        // only: a task adds its own future's code and no state machine of
        // its own around it.
        crate::registry::err_into::<E>(Box::pin(future))
    }

    /// The check behind the test that `#[upsilon::task]` adds to the defining
    /// crate: panics with every registry problem that involves this task.
    #[track_caller]
    pub fn check_registry_for(version: &str, id: &str) {
        let Err(error) = crate::Registry::collect() else {
            return;
        };
        let mine: Vec<String> = error
            .problems()
            .iter()
            .filter(|p| crate::registry::problem_involves(p, version, id))
            .map(|p| p.to_string())
            .collect();
        assert!(
            mine.is_empty(),
            "upgrade task `{id}` (version {version}) conflicts with another task:\n  - {}",
            mine.join("\n  - ")
        );
    }
}
