//! Nodes that arrive while the canary upgrades are granted no lease of their
//! own, however slow their way to the first request for it: one grant per
//! upgrade, and each node's outcome says what it did.

use std::sync::Arc;
use std::time::Duration;

mod common;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch, Notify};
use upsilon::backend::{Acquire, BackendError, Change, Lease, LeaseInfo, Lock, Store};
use upsilon::testing::{self, MemoryBackend, Op};
use upsilon::{Holder, Outcome, Task, Upsilon};

/// Longer than what is left of the canary's upgrade when the nodes start.
const SLOW: Duration = Duration::from_millis(300);
const NODES: usize = 3;

/// Where a node's slow step comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slow {
    /// In [`Lock::prepare_wait`], before the runner's read.
    Prepared,
    /// Inside the first [`Lock::try_acquire`], where the runner cannot see
    /// it (as PostgreSQL's backend did before it had `prepare_wait`).
    InRequest,
    /// No slow step, and no time passes: the canary finishes as the first
    /// request begins (the step waits for it), and the lock then answers
    /// [`Acquire::StoreMoved`] as PostgreSQL's does for a store that moved
    /// since its handle's read.
    Raced,
    /// No slow step: a faulty lock that answers [`Acquire::StoreMoved`] to
    /// every request.
    EveryRequestMoved,
}

/// A lock in front of the in-memory backend that, like PostgreSQL's, opens
/// something slow (a listening session) before its first answer.
#[derive(Debug)]
struct SlowToWait {
    inner: Arc<MemoryBackend>,
    /// How long opening takes.
    delay: Duration,
    slow: Slow,
    opened: tokio::sync::OnceCell<()>,
    opening: mpsc::UnboundedSender<()>,
    /// Whether the canary has finished.
    finished: watch::Receiver<bool>,
}

impl SlowToWait {
    async fn open(&self) {
        self.opened
            .get_or_init(|| async {
                let _ = self.opening.send(());
                match self.slow {
                    Slow::Raced => {
                        let mut finished = self.finished.clone();
                        finished.wait_for(|f| *f).await.unwrap();
                    }
                    _ => tokio::time::sleep(self.delay).await,
                }
            })
            .await;
    }
}

#[async_trait]
impl Lock for SlowToWait {
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        if self.slow == Slow::EveryRequestMoved {
            return Ok(Acquire::StoreMoved);
        }
        if self.slow == Slow::Raced && !self.opened.initialized() {
            let before = self.inner.commits().len();
            self.open().await;
            if self.inner.commits().len() != before {
                return Ok(Acquire::StoreMoved);
            }
        }
        self.open().await;
        self.inner.try_acquire(service, holder, ttl).await
    }
    async fn prepare_wait(&self, service: &str) -> Result<(), BackendError> {
        if self.slow == Slow::Prepared {
            self.open().await;
        }
        self.inner.prepare_wait(service).await
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
    async fn wait(
        &self,
        service: &str,
        seen: &LeaseInfo,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        self.inner.wait(service, seen, timeout).await
    }
    fn notifies(&self) -> bool {
        self.inner.notifies()
    }
}

/// The canary's task: parks until `gate`, after saying so on `entered`.
fn parked(gate: &Arc<Notify>, entered: &Arc<Notify>) -> Task {
    common::parked_at("1.1", "backfill", gate, entered)
}

fn runner(n: usize, builder: upsilon::Builder, task: &Task) -> Upsilon {
    builder
        .service("svc")
        .app_version("1.1")
        .holder(testing::holder(n))
        .tasks([task.clone()])
        .build()
        .unwrap()
}

/// Starts the canary and lets its task park; returns its run and the gate.
async fn canary(
    backend: &Arc<MemoryBackend>,
    task: &Task,
    entered: &Notify,
) -> tokio::task::JoinHandle<Result<Outcome, upsilon::Error>> {
    let canary = runner(1, Upsilon::builder().backend(backend.clone()), task);
    let run = tokio::spawn(async move { canary.run().await });
    entered.notified().await;
    run
}

fn waited(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::WaitedForOther { data_version, .. }
        if data_version.as_ref().map(ToString::to_string).as_deref() == Some("1.1.0"))
}

/// `NODES` nodes start while the canary's task runs; each is slow to get
/// ready to wait, and the canary finishes meanwhile. Returns the nodes'
/// outcomes and the fences granted.
async fn nodes_slow_to_wait(slow: Slow) -> (Vec<Outcome>, Vec<u64>) {
    let backend = MemoryBackend::new();
    let (gate, entered) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let task = parked(&gate, &entered);
    let canary_run = canary(&backend, &task, &entered).await;
    let (opening, mut opened) = mpsc::unbounded_channel();
    let (finish, finished) = watch::channel(false);
    let runs: Vec<_> = (2..2 + NODES)
        .map(|n| {
            let lock = Arc::new(SlowToWait {
                inner: backend.clone(),
                // One after the other, as connections open.
                delay: SLOW + Duration::from_millis(10) * n as u32,
                slow,
                opened: tokio::sync::OnceCell::new(),
                opening: opening.clone(),
                finished: finished.clone(),
            });
            let builder = Upsilon::builder().lock(lock).store(backend.clone());
            let node = runner(n, builder, &task);
            tokio::spawn(async move { node.run().await })
        })
        .collect();
    // Every node has read the store (the upgrade is under way) and is
    // opening its slow session; the canary finishes before any is open.
    for _ in 0..NODES {
        opened.recv().await.unwrap();
    }
    gate.notify_one();
    let done = canary_run.await.unwrap().unwrap();
    assert!(matches!(done, Outcome::Upgraded { .. }), "{done:?}");
    finish.send_replace(true);
    let mut outcomes = Vec::new();
    for r in runs {
        outcomes.push(r.await.unwrap().unwrap());
    }
    let fences = backend.grants().iter().map(|g| g.fence).collect();
    (outcomes, fences)
}

#[tokio::test(start_paused = true)]
async fn nodes_slow_to_get_ready_to_wait_take_no_lease_after_the_upgrade() {
    let (outcomes, fences) = nodes_slow_to_wait(Slow::Prepared).await;
    assert_eq!(fences, [1], "one grant for one upgrade: {outcomes:?}");
    assert!(outcomes.iter().all(waited), "{outcomes:?}");
}

/// Nodes whose request follows their read at once, told by the lock that
/// the store moved meanwhile (the canary finished in between), read it
/// again and take no lease either: no time passed, so only the lock's
/// answer tells them.
#[tokio::test(start_paused = true)]
async fn nodes_told_the_store_moved_right_after_their_read_read_it_again_and_take_no_lease() {
    let (outcomes, fences) = nodes_slow_to_wait(Slow::Raced).await;
    assert_eq!(fences, [1], "one grant for one upgrade: {outcomes:?}");
    assert!(outcomes.iter().all(waited), "{outcomes:?}");
    for o in &outcomes {
        let Outcome::WaitedForOther { waited, .. } = o else {
            unreachable!()
        };
        assert_eq!(*waited, Duration::ZERO, "{o:?}");
    }
}

/// The negative control: the same nodes with their slow session opened
/// inside the request for the lease, where the runner cannot read the store
/// after it, and a lock that does not say the store moved. Each is granted the lease in turn, finds nothing to do, and
/// says so.
#[tokio::test(start_paused = true)]
async fn a_slow_step_hidden_inside_the_lease_request_grants_once_per_node() {
    let (outcomes, fences) = nodes_slow_to_wait(Slow::InRequest).await;
    assert_eq!(fences.len(), 1 + NODES, "{fences:?}: {outcomes:?}");
    for outcome in &outcomes {
        assert!(
            matches!(outcome, Outcome::FoundUpToDate { fence, data_version }
                if *fence > 1 && data_version.as_ref().map(ToString::to_string).as_deref() == Some("1.1.0")),
            "{outcome:?}"
        );
        let said = outcome.to_string();
        assert!(said.starts_with("took the lease (fence "), "{said}");
        assert!(!said.contains("already up to date"), "{said}");
    }
}

/// A node whose way to the request is quick reads the store once before
/// asking: the re-read costs nothing on the common path.
#[tokio::test(start_paused = true)]
async fn a_prompt_node_reads_once_before_asking() {
    let backend = MemoryBackend::new();
    let (gate, entered) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let task = parked(&gate, &entered);
    let canary_run = canary(&backend, &task, &entered).await;
    let (loads, acquires) = (
        backend.faults().calls(Op::Load),
        backend.faults().calls(Op::Acquire),
    );
    let node = runner(2, Upsilon::builder().backend(backend.clone()), &task);
    let mut status = node.status();
    let run = tokio::spawn(async move { node.run().await });
    status
        .wait_for(|s| matches!(s, upsilon::Status::Waiting { .. }))
        .await
        .unwrap();
    assert_eq!(backend.faults().calls(Op::Load) - loads, 1);
    assert_eq!(backend.faults().calls(Op::Acquire) - acquires, 1);
    gate.notify_one();
    canary_run.await.unwrap().unwrap();
    assert!(waited(&run.await.unwrap().unwrap()));
}

/// A lock that says the store moved to every request does not make the
/// runner spin: after the second answer in a row it reads the store once a
/// poll, and at `max_wait` it gives up with the wait's error, having taken
/// no lease. (In real time: a runner that spun would read the store
/// thousands of times in the second.)
#[tokio::test]
async fn a_lock_that_always_says_the_store_moved_is_polled_and_waited_out() {
    let backend = MemoryBackend::new();
    let (gate, entered) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let task = parked(&gate, &entered);
    let (opening, _opened) = mpsc::unbounded_channel();
    let (_finish, finished) = watch::channel(false);
    let lock = Arc::new(SlowToWait {
        inner: backend.clone(),
        delay: Duration::ZERO,
        slow: Slow::EveryRequestMoved,
        opened: tokio::sync::OnceCell::new(),
        opening,
        finished,
    });
    let builder = Upsilon::builder()
        .lock(lock)
        .store(backend.clone())
        .max_wait(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(100));
    let node = runner(2, builder, &task);
    let err = node.run().await.unwrap_err();
    assert!(matches!(err, upsilon::Error::WaitTimeout { .. }), "{err}");
    // Polls are jittered by at most half: one read at start-up, one after
    // the first answer, then at most one per 50 ms.
    let loads = backend.faults().calls(Op::Load);
    assert!((3..=23).contains(&loads), "{loads} reads in 1 s");
    assert!(backend.grants().is_empty());
}

/// The in-memory backend with its store-moved answers on, as the simulation
/// runs it: a request for the free lease after another holder moved the
/// store since the last load is answered `StoreMoved`, once; off, it is
/// granted.
#[tokio::test]
async fn the_in_memory_backend_answers_store_moved_once_per_load_when_asked_to() {
    for on in [true, false] {
        let backend = MemoryBackend::new();
        backend.set_store_moved_answers(on);
        let ttl = Duration::from_secs(30);
        backend.load("svc").await.unwrap();
        let Acquire::Granted(lease) = backend
            .try_acquire("svc", &testing::holder(1), ttl)
            .await
            .unwrap()
        else {
            panic!("a fresh store's lease is free");
        };
        backend.claim("svc", lease.fence).await.unwrap();
        let version = upsilon::parse_version("1.1").unwrap();
        backend
            .apply("svc", lease.fence, &[Change::DataVersion(version)])
            .await
            .unwrap();
        backend.release(&lease).await.unwrap();
        let me = testing::holder(2);
        let first = backend.try_acquire("svc", &me, ttl).await.unwrap();
        assert_eq!(matches!(first, Acquire::StoreMoved), on, "{first:?}");
        if on {
            let again = backend.try_acquire("svc", &me, ttl).await.unwrap();
            assert!(matches!(again, Acquire::Granted(_)), "{again:?}");
        }
    }
}
