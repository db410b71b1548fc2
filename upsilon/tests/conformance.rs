//! The in-memory backend passes the conformance suite every backend runs.

use std::sync::Arc;

use async_trait::async_trait;
use upsilon::backend::{Lock, Store};
use upsilon::testing::conformance::{self, Harness, Wake};
use upsilon::testing::MemoryBackend;

struct Memory(Arc<MemoryBackend>);

#[async_trait]
impl Harness for Memory {
    fn lock(&self) -> Arc<dyn Lock> {
        self.0.clone()
    }
    fn store(&self) -> Arc<dyn Store> {
        self.0.clone()
    }
    async fn corrupt(&self, service: &str) {
        self.0.set_corrupt(service, true);
    }
    async fn repair(&self, service: &str) {
        self.0.set_corrupt(service, false);
    }
}

#[tokio::test(start_paused = true)]
async fn memory_backend_conforms() {
    let report = conformance::run_all(&Memory(MemoryBackend::new())).await;
    assert_eq!(report.wake, Wake::Notifies, "waiters are woken at once");
    // Nothing to delete behind its back, and no format marker: nothing else
    // is skipped.
    assert_eq!(
        report.skipped,
        [
            "deleting_the_state_row_keeps_the_fence",
            "deleting_the_history_keeps_the_fence",
            "unknown_format_refused"
        ]
    );
}
