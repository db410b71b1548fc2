//! A node whose lock has no notifications polls while another node holds
//! the lease. Each poll reads the store (the data may reach this node's
//! version before the holder is done) and then the lease; it asks for the
//! lease only when that read shows it free or open to a takeover. Behind a
//! transaction pooler, that is two one-statement reads a poll instead of a
//! read and a transaction of four statements.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod common;

use async_trait::async_trait;
use tokio::sync::{mpsc, Notify};
use upsilon::backend::{
    Acquire, BackendError, Change, HistoryEntry, Lease, LeaseInfo, Lock, Snapshot, Store,
};
use upsilon::testing::{self, MemoryBackend, SessionModel};
use upsilon::{Holder, Outcome, Task, Upsilon};

const POLL: Duration = Duration::from_millis(100);
/// Polls watched while the canary's task is parked.
const POLLS: usize = 10;

/// The in-memory backend as one without notifications: `wait` only sleeps.
/// Counts this node's requests for the lease, and reports each of its reads
/// of the store on `reads`.
#[derive(Debug)]
struct Polling {
    inner: Arc<MemoryBackend>,
    requests: AtomicU64,
    reads: mpsc::UnboundedSender<()>,
}

#[async_trait]
impl Lock for Polling {
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.inner.try_acquire(service, holder, ttl).await
    }
    async fn renew(&self, lease: &Lease) -> Result<Lease, BackendError> {
        self.inner.renew(lease).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        self.inner.release(lease).await
    }
    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        self.inner.current(service).await
    }
    async fn force_release(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        self.inner.force_release(service).await
    }
    async fn raise_fence(&self, service: &str, floor: u64) -> Result<(), BackendError> {
        self.inner.raise_fence(service, floor).await
    }
    async fn until_lost(&self, lease: &Lease) -> BackendError {
        self.inner.until_lost(lease).await
    }
}

#[async_trait]
impl Store for Polling {
    async fn load(&self, service: &str) -> Result<Snapshot, BackendError> {
        let _ = self.reads.send(());
        self.inner.load(service).await
    }
    async fn claim(&self, service: &str, fence: u64) -> Result<Snapshot, BackendError> {
        self.inner.claim(service, fence).await
    }
    async fn apply(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
    ) -> Result<(), BackendError> {
        self.inner.apply(service, fence, changes).await
    }
    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>, BackendError> {
        self.inner.history(service).await
    }
    async fn services(&self) -> Result<Vec<String>, BackendError> {
        self.inner.services().await
    }
}

/// A task at 1.1 that parks until `gate`, after saying so on `entered`.
fn parked(gate: &Arc<Notify>, entered: &Arc<Notify>) -> Task {
    common::parked_at("1.1", "backfill", gate, entered)
}

fn runner(n: usize, builder: upsilon::Builder, task: &Task) -> Upsilon {
    builder
        .service("svc")
        .app_version("1.1")
        .holder(testing::holder(n))
        .ttl(Duration::from_secs(5))
        .poll_interval(POLL)
        .tasks([task.clone()])
        .build()
        .unwrap()
}

struct Cluster {
    backend: Arc<MemoryBackend>,
    gate: Arc<Notify>,
    canary: tokio::task::JoinHandle<Result<Outcome, upsilon::Error>>,
    lock: Arc<Polling>,
    _reads: mpsc::UnboundedReceiver<()>,
    node: tokio::task::JoinHandle<Result<Outcome, upsilon::Error>>,
}

/// A canary whose task is parked, and a polling node that has polled
/// `POLLS` times since.
async fn polling_behind_a_canary(model: Option<SessionModel>) -> Cluster {
    let backend = MemoryBackend::new();
    if let Some(m) = model {
        backend.set_session_model(m);
    }
    let (gate, entered) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let task = parked(&gate, &entered);
    let canary = runner(1, Upsilon::builder().backend(backend.clone()), &task);
    let canary = tokio::spawn(async move { canary.run().await });
    entered.notified().await;
    let (tx, mut reads) = mpsc::unbounded_channel();
    let lock = Arc::new(Polling {
        inner: backend.clone(),
        requests: AtomicU64::new(0),
        reads: tx,
    });
    let node = runner(2, Upsilon::builder().backend(lock.clone()), &task);
    let node = tokio::spawn(async move { node.run().await });
    for _ in 0..POLLS {
        reads.recv().await.unwrap();
    }
    Cluster {
        backend,
        gate,
        canary,
        lock,
        _reads: reads,
        node,
    }
}

#[tokio::test(start_paused = true)]
async fn a_polling_node_asks_for_the_lease_once_while_another_holds_it() {
    let c = polling_behind_a_canary(None).await;
    assert_eq!(
        c.lock.requests.load(Ordering::SeqCst),
        1,
        "{POLLS} polls of a lease that stayed held asked for it only at the start"
    );
    c.gate.notify_one();
    assert!(matches!(
        c.canary.await.unwrap().unwrap(),
        Outcome::Upgraded { .. }
    ));
    let outcome = c.node.await.unwrap().unwrap();
    assert!(
        matches!(&outcome, Outcome::WaitedForOther { data_version: Some(v), .. } if v.to_string() == "1.1.0"),
        "{outcome:?}"
    );
    assert_eq!(c.lock.requests.load(Ordering::SeqCst), 1);
    assert_eq!(c.backend.grants().len(), 1, "one grant for one upgrade");
}

/// The read of the lease must not hide a lease that a request would get:
/// once the holder's session has ended and the takeover grace has passed,
/// the polling node asks, is granted the lease and runs the task.
#[tokio::test(start_paused = true)]
async fn a_polling_node_takes_the_lease_over_once_the_holders_session_has_ended() {
    let model = SessionModel {
        detection: Some(Duration::from_millis(50)),
        grace: Duration::from_millis(300),
    };
    let c = polling_behind_a_canary(Some(model)).await;
    assert!(c.backend.end_session("svc"), "the canary holds the lease");
    // The canary learns that its session ended and gives up.
    let lost = c.canary.await.unwrap();
    assert!(
        matches!(lost, Err(upsilon::Error::LeaseLost { .. })),
        "{lost:?}"
    );
    // Its lease stands for seconds more (TTL 5 s): the node polls through
    // the grace, then asks.
    c.gate.notify_one();
    let outcome = c.node.await.unwrap().unwrap();
    assert!(matches!(&outcome, Outcome::Upgraded { .. }), "{outcome:?}");
    let grants = c.backend.grants();
    assert_eq!(grants.len(), 2, "{grants:?}");
    let gap = grants[1].at_ms - grants[0].at_ms;
    assert!(
        gap < 5_000,
        "a takeover before the lease's expiry (5 s) was due; it came {gap} ms after the grant"
    );
    assert!(c.lock.requests.load(Ordering::SeqCst) <= 3);
}

/// The data can reach a waiting node's version while the lease stays held
/// (a node of a later version holds it and has more to do): the poll's
/// read of the store makes the node READY then, before the lease changes.
#[tokio::test(start_paused = true)]
async fn a_polling_node_is_ready_when_the_data_reaches_its_version_under_a_held_lease() {
    let backend = MemoryBackend::new();
    let (gate_1, entered_1) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (gate_2, entered_2) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let first = parked(&gate_1, &entered_1);
    let later = common::parked_at("1.2", "later", &gate_2, &entered_2);
    let holder = Upsilon::builder()
        .backend(backend.clone())
        .service("svc")
        .app_version("1.2")
        .holder(testing::holder(1))
        .tasks([first.clone(), later])
        .build()
        .unwrap();
    let holder = tokio::spawn(async move { holder.run().await });
    entered_1.notified().await;
    let (tx, mut reads) = mpsc::unbounded_channel();
    let lock = Arc::new(Polling {
        inner: backend.clone(),
        requests: AtomicU64::new(0),
        reads: tx,
    });
    let node = runner(2, Upsilon::builder().backend(lock.clone()), &first);
    let node = tokio::spawn(async move { node.run().await });
    for _ in 0..POLLS {
        reads.recv().await.unwrap();
    }
    // The holder finishes 1.1 and moves on to 1.2, keeping the lease.
    gate_1.notify_one();
    entered_2.notified().await;
    let outcome = node.await.unwrap().unwrap();
    assert!(
        matches!(&outcome, Outcome::WaitedForOther { data_version: Some(v), .. } if v.to_string() == "1.1.0"),
        "{outcome:?}"
    );
    assert!(
        !holder.is_finished(),
        "READY while the holder still holds the lease"
    );
    assert_eq!(lock.requests.load(Ordering::SeqCst), 1);
    gate_2.notify_one();
    assert!(matches!(
        holder.await.unwrap().unwrap(),
        Outcome::Upgraded { .. }
    ));
}
