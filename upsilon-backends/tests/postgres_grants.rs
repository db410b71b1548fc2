//! Nodes that arrive while the canary upgrades, each of whose new
//! connections is slow to open (longer than what is left of the upgrade),
//! take no lease of their own: one grant per upgrade.
#![cfg(feature = "postgres")]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{granted, options, raw, server, until, via_port, Proxy};
use tokio::sync::Notify;
use upsilon::backend::{Acquire, BackendError, Change, Lease, LeaseInfo, Lock, Store};
use upsilon::{Holder, Outcome, Task, TaskContext, TaskFuture, Upsilon};
use upsilon_backends::postgres::{PostgresBackend, PostgresOptions};

const NODES: u64 = 3;
/// How long a new connection through the proxy takes to open: longer than
/// the canary's final write and release on a busy machine.
const SLOW: Duration = Duration::from_millis(1500);

/// PostgreSQL's lock, counting the requests that found the lease held. With
/// `slow`, it has no [`Lock::prepare_wait`], and its `try_acquire` opens a
/// new connection with those options (through the slow proxy) before it
/// asks: a slow step after the runner's read, as opening the listening
/// session was before the session was made of the pooled connection (and
/// prepared before the first request where none is idle).
#[derive(Debug)]
struct Counted {
    backend: PostgresBackend,
    slow: Option<PostgresOptions>,
    held: Arc<AtomicU64>,
}

#[async_trait]
impl Lock for Counted {
    async fn prepare_wait(&self, service: &str) -> Result<(), BackendError> {
        match self.slow {
            None => self.backend.prepare_wait(service).await,
            Some(_) => Ok(()),
        }
    }
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        if let Some(o) = &self.slow {
            drop(PostgresBackend::connect(o.clone()).await?);
        }
        let got = self.backend.try_acquire(service, holder, ttl).await?;
        if matches!(got, Acquire::Held(_)) {
            self.held.fetch_add(1, Ordering::SeqCst);
        }
        Ok(got)
    }
    async fn renew(&self, lease: &Lease) -> Result<Lease, BackendError> {
        self.backend.renew(lease).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        self.backend.release(lease).await
    }
    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        self.backend.current(service).await
    }
    async fn force_release(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        self.backend.force_release(service).await
    }
    async fn wait(
        &self,
        service: &str,
        seen: &LeaseInfo,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        self.backend.wait(service, seen, timeout).await
    }
    fn notifies(&self) -> bool {
        self.backend.notifies()
    }
    async fn until_lost(&self, lease: &Lease) -> BackendError {
        self.backend.until_lost(lease).await
    }
}

fn parked(gate: &Arc<Notify>, entered: &Arc<Notify>) -> Task {
    let (gate, entered) = (gate.clone(), entered.clone());
    Task::new(
        "1.1",
        1,
        "backfill",
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

fn runner(builder: upsilon::Builder, n: usize, task: &Task) -> Upsilon {
    builder
        .service("svc")
        .app_version("1.1")
        .holder(upsilon::testing::holder(n))
        .tasks([task.clone()])
        .build()
        .unwrap()
}

/// Where a node's slow new connection comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slow {
    /// Nowhere in its request for the lease: the node's session is made of
    /// its pooled connection, in the flight that finds the lease held.
    Nowhere,
    /// Inside the request, after the runner's read of the store; the lock is
    /// the store's own handle, which sees that the store moved since.
    InRequest,
    /// Inside the request, with the lock on a handle of its own, which never
    /// read the store: nothing tells it that the store moved.
    InRequestUnread,
}

/// The canary parks in its task; `NODES` nodes, connected through a proxy
/// whose new connections then take `SLOW` to open, start and read the
/// store; once each has found the lease held (`Slow::Nowhere`), or is in
/// the slow step of its lease request, the canary finishes. Returns the
/// nodes' outcomes and the grants the state row counts.
async fn nodes_with_slow_connections(schema: &str, slow: Slow) -> (Vec<Outcome>, i64) {
    let (proxy, port) = Proxy::start(server().port()).await;
    let slow_url = via_port(&server().url(), server().port(), port);
    let canary_backend = PostgresBackend::connect(options(schema)).await.unwrap();
    let (gate, entered) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let task = parked(&gate, &entered);
    let canary = runner(
        Upsilon::builder().backend(Arc::new(canary_backend)),
        0,
        &task,
    );
    let canary_run = tokio::spawn(async move { canary.run().await });
    entered.notified().await;

    let held = Arc::new(AtomicU64::new(0));
    let mut nodes = Vec::new();
    for n in 0..NODES {
        let o = PostgresOptions::from_url(&slow_url).unwrap().schema(schema);
        let backend = PostgresBackend::connect(o.clone()).await.unwrap();
        let lock = Counted {
            backend: match slow {
                Slow::InRequestUnread => PostgresBackend::connect(o.clone()).await.unwrap(),
                _ => backend.clone(),
            },
            slow: (slow != Slow::Nowhere).then_some(o),
            held: held.clone(),
        };
        let builder = Upsilon::builder()
            .lock(Arc::new(lock))
            .store(Arc::new(backend));
        nodes.push(runner(builder, n as usize + 1, &task));
    }
    // Each node's pool connections are open; from now on a connection takes
    // SLOW to open.
    let pooled = proxy.accepted.load(Ordering::SeqCst);
    proxy
        .connect_delay_ms
        .store(SLOW.as_millis() as u64, Ordering::SeqCst);
    let runs: Vec<_> = nodes
        .into_iter()
        .map(|n| tokio::spawn(async move { n.run().await }))
        .collect();
    until(Duration::from_secs(30), || async {
        match slow {
            Slow::Nowhere => held.load(Ordering::SeqCst) >= NODES,
            _ => proxy.accepted.load(Ordering::SeqCst) >= pooled + NODES,
        }
    })
    .await;
    gate.notify_one();
    let done = canary_run.await.unwrap().unwrap();
    assert!(matches!(done, Outcome::Upgraded { .. }), "{done:?}");
    let mut outcomes = Vec::new();
    for r in runs {
        outcomes.push(r.await.unwrap().unwrap());
    }
    let client = raw(&server().url()).await;
    let row = client
        .query_one(
            &format!("SELECT granted FROM \"{schema}\".upsilon_state WHERE service = 'svc'"),
            &[],
        )
        .await
        .unwrap();
    (outcomes, row.get(0))
}

/// Every node found the lease held or the store moved, and became READY
/// once the canary was done, without a lease of its own.
fn one_grant_each_waited(outcomes: &[Outcome], grants: i64) {
    assert_eq!(grants, 1, "one grant for one upgrade: {outcomes:?}");
    for o in outcomes {
        assert!(
            matches!(o, Outcome::WaitedForOther { data_version: Some(v), .. } if v.to_string() == "1.1.0"),
            "{o:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_whose_new_connections_are_slow_take_no_lease_after_the_upgrade() {
    let (outcomes, grants) = nodes_with_slow_connections("grants_prepared", Slow::Nowhere).await;
    one_grant_each_waited(&outcomes, grants);
}

/// A node slow inside its request for the lease, past the canary's last
/// write and release, finds the lease free but the store moved since its
/// read: it reads the store again instead of taking the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_slow_inside_its_lease_request_reads_the_moved_store_instead_of_taking_the_lease() {
    let (outcomes, grants) = nodes_with_slow_connections("grants_moved", Slow::InRequest).await;
    one_grant_each_waited(&outcomes, grants);
}

/// The negative control: the same nodes, with a lock that never read the
/// store, so that nothing tells it the store moved. At least one of them is
/// granted the lease for nothing, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_that_did_not_read_the_store_grants_the_lease_for_nothing() {
    let (outcomes, grants) =
        nodes_with_slow_connections("grants_unread", Slow::InRequestUnread).await;
    let found = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::FoundUpToDate { fence, .. } if *fence > 1))
        .count();
    assert!(grants > 1, "{grants} grants: {outcomes:?}");
    assert_eq!(found as i64, grants - 1, "{outcomes:?}");
    for o in &outcomes {
        assert!(
            matches!(
                o,
                Outcome::FoundUpToDate { .. } | Outcome::WaitedForOther { .. }
            ),
            "{o:?}"
        );
        assert!(!o.to_string().contains("already up to date"), "{o}");
    }
}

/// `node` upgrades the data of `svc` to `version`: takes the lease, claims
/// the store, writes the data version and releases.
async fn upgrade(node: &PostgresBackend, n: usize, version: &str) {
    let ttl = Duration::from_secs(30);
    let lease = granted(
        node.try_acquire("svc", &upsilon::testing::holder(n), ttl)
            .await
            .unwrap(),
    );
    node.claim("svc", lease.fence).await.unwrap();
    let version = upsilon::parse_version(version).unwrap();
    node.apply("svc", lease.fence, &[Change::DataVersion(version)])
        .await
        .unwrap();
    node.release(&lease).await.unwrap();
}

/// A request for the free lease from a handle whose last read of the store
/// came before another node's upgrade is answered `StoreMoved`: by the
/// flight that makes the handle's session of its pooled connection (the
/// first round), and by the locked read (the second, with the session
/// open). It is answered so once per read: asked again without a read, or
/// after one, the lease is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_resting_on_a_read_from_before_an_upgrade_is_told_the_store_moved() {
    let schema = "grants_moved_answer";
    let other = PostgresBackend::connect(options(schema)).await.unwrap();
    let node = PostgresBackend::connect(options(schema)).await.unwrap();
    let ttl = Duration::from_secs(30);
    let me = upsilon::testing::holder(9);
    for (round, version) in [(1, "1.1"), (2, "1.2")] {
        node.load("svc").await.unwrap();
        upgrade(&other, round, version).await;
        let answer = node.try_acquire("svc", &me, ttl).await.unwrap();
        assert_eq!(answer, Acquire::StoreMoved, "round {round}");
        if round == 2 {
            let now = node.load("svc").await.unwrap();
            assert_eq!(now.data_version.unwrap().to_string(), "1.2.0");
        }
        let lease = granted(node.try_acquire("svc", &me, ttl).await.unwrap());
        node.release(&lease).await.unwrap();
    }
    // Nothing moved since the last read: granted at once.
    node.load("svc").await.unwrap();
    let lease = granted(node.try_acquire("svc", &me, ttl).await.unwrap());
    node.release(&lease).await.unwrap();
}
