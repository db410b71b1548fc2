//! What several test files share.

use std::sync::Arc;

use tokio::sync::Notify;
use upsilon::{Task, TaskContext, TaskFuture};

/// A task at `version`, order 1, that parks until `gate`, after saying so on
/// `entered`.
pub fn parked_at(version: &str, name: &str, gate: &Arc<Notify>, entered: &Arc<Notify>) -> Task {
    let (gate, entered) = (gate.clone(), entered.clone());
    Task::new(
        version,
        1,
        name,
        move |_: &mut TaskContext| -> TaskFuture<'_> {
            let (gate, entered) = (gate.clone(), entered.clone());
            Box::pin(async move {
                entered.notify_one();
                gate.notified().await;
                Ok(())
            })
        },
    )
    .unwrap()
}
