//! Running one task: its context, cancellation when the lease is lost, and
//! a panic turned into a failure.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info_span, Instrument};

use super::lease::{Halt, Held};
use super::Inner;
use crate::backend::Checkpoint;
use crate::checkpoint::{Checkpoints, Saver};
use crate::context::{TaskContext, TaskInfo};
use crate::registry::Task;

impl Inner {
    /// Runs `task` (or its rollback, as `info` says) once: until it returns,
    /// panics, or the lease is lost. It resumes from `resume`, and the
    /// answer has the newest checkpoint it saved (or `resume`).
    pub(super) async fn run_one(
        &self,
        held: &Arc<Held>,
        task: &Task,
        info: TaskInfo,
        resume: Option<Checkpoint>,
    ) -> (Ran, Duration, Option<Checkpoint>) {
        let rollback = info.rollback;
        let span = info_span!("upsilon.task", task = %task.id(), version = %task.version(),
            attempt = info.attempt, rollback);
        let service: Arc<str> = Arc::from(self.service.as_str());
        let current = Arc::new(Mutex::new(resume));
        let lose = {
            let held = held.clone();
            Arc::new(move |loss| held.lose(loss))
        };
        let checkpoints = Checkpoints {
            key: task.key().clone(),
            attempt: info.attempt,
            fence: held.fence(),
            service: service.clone(),
            saver: Some(Saver {
                store: self.store.clone(),
                attempts: self.config.backend_attempts,
                lose,
            }),
            current: current.clone(),
            status: Some(self.status.clone()),
        };
        let mut ctx = TaskContext {
            info,
            service,
            fence: held.fence(),
            holder: self.holder.clone(),
            cancel: held.lost.child_token(),
            resources: self.resources.clone(),
            status: self.status.clone(),
            checkpoints,
        };
        let started = Instant::now();
        let ran = async {
            let future = if rollback {
                match task.run_rollback(&mut ctx) {
                    Some(f) => f,
                    None => return Ran::Ok,
                }
            } else {
                task.run(&mut ctx)
            };
            tokio::select! {
                biased;
                halt = held.halted() => Ran::Cancelled(halt),
                r = CatchUnwind(future) => match r {
                    Ok(Ok(())) => Ran::Ok,
                    Ok(Err(e)) => Ran::Failed(error_chain(&*e)),
                    Err(panic) => Ran::Failed(format!("panicked: {}", panic_message(&panic))),
                },
            }
        }
        .instrument(span)
        .await;
        // A task that failed because the lease was lost under it (a
        // checkpoint the store refused) was cancelled by the loss.
        let ran = match (ran, held.halt()) {
            (Ran::Failed(_), Some(halt @ Halt::Lost(_))) => Ran::Cancelled(halt),
            (ran, _) => ran,
        };
        let took = started.elapsed();
        let outcome = match (&ran, rollback) {
            (Ran::Ok, false) => "completed",
            (Ran::Failed(_), false) => "failed",
            (Ran::Ok, true) => "rolled_back",
            (Ran::Failed(_), true) => "rollback_failed",
            (Ran::Cancelled(_), _) => "cancelled",
        };
        crate::metrics::task_ran(&self.service, task, outcome, took);
        drop(ctx);
        let newest = current.lock().unwrap_or_else(|p| p.into_inner()).take();
        (ran, took, newest)
    }
}

/// What a task's context reports about one run of it.
pub(super) fn task_info(
    task: &Task,
    attempt: u32,
    index: usize,
    total: usize,
    rollback: bool,
) -> TaskInfo {
    TaskInfo {
        id: task.id().to_owned(),
        version: task.version().clone(),
        description: task.description().to_owned(),
        attempt,
        index,
        total,
        rollback,
    }
}

/// How one run of a task ended.
pub(super) enum Ran {
    Ok,
    Failed(String),
    Cancelled(Halt),
}

/// Polls a future, turning a panic into an `Err` with its payload.
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}

/// An error and its sources, joined with ": ".
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
