//! The SQLite lease and the host's clocks: a step of the wall clock (NTP, an
//! operator, a VM restore) neither hands a live lease to a waiting process
//! nor keeps an expired one, because expiry is judged on `CLOCK_MONOTONIC`.
//! Each backend here has a connection of its own, as a separate process has,
//! and all of them read one clock, as the processes of one host do.
#![cfg(feature = "sqlite")]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use upsilon::backend::{Acquire, BackendError, Lease, Lock};
use upsilon::testing;
use upsilon::{Outcome, Status, Task, TaskContext, TaskFuture, Upsilon};
use upsilon_backends::sqlite::{Clock, HostTime, SqliteBackend, SqliteOptions, SystemClock};

const HOURS_3: i64 = 3 * 3600 * 1000;

/// The system's clocks, with the wall clock stepped by hand.
#[derive(Debug, Default)]
struct SteppedClock {
    wall_step_ms: AtomicI64,
}

impl SteppedClock {
    fn step_wall(&self, ms: i64) {
        self.wall_step_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for SteppedClock {
    fn now(&self) -> Result<HostTime, BackendError> {
        let mut t = SystemClock.now()?;
        t.wall_ms += self.wall_step_ms.load(Ordering::SeqCst);
        Ok(t)
    }
}

struct Host {
    clock: Arc<SteppedClock>,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        Host {
            clock: Arc::default(),
            path: dir.path().join("upsilon.db"),
            _dir: dir,
        }
    }

    /// Another process of this host.
    async fn process(&self) -> Arc<SqliteBackend> {
        open(&self.path, self.options()).await
    }

    fn options(&self) -> SqliteOptions {
        SqliteOptions {
            clock: self.clock.clone(),
            ..SqliteOptions::default()
        }
    }
}

async fn open(path: &Path, options: SqliteOptions) -> Arc<SqliteBackend> {
    Arc::new(SqliteBackend::open_with(path, options).await.unwrap())
}

async fn grant(lock: &dyn Lock, n: usize, ttl: Duration) -> Lease {
    match lock.try_acquire("svc", &testing::holder(n), ttl).await {
        Ok(Acquire::Granted(lease)) => lease,
        other => panic!("node {n}: {other:?}"),
    }
}

#[tokio::test]
async fn a_wall_clock_step_forward_leaves_a_live_lease_with_its_holder() {
    let host = Host::new();
    let (holder, waiter) = (host.process().await, host.process().await);
    let ttl = Duration::from_secs(60);
    let lease = grant(&*holder, 1, ttl).await;

    host.clock.step_wall(HOURS_3);

    match waiter.try_acquire("svc", &testing::holder(2), ttl).await {
        Ok(Acquire::Held(info)) => {
            assert_eq!((&info.holder, info.fence), (&lease.holder, lease.fence));
            let left = info.expires_at_ms - info.now_ms;
            assert!(0 < left && left <= 60_000, "{left} ms left");
        }
        other => panic!("a waiting process after the step: {other:?}"),
    }
    let seen = waiter.current("svc").await.unwrap();
    assert_eq!(seen.map(|i| i.fence), Some(lease.fence));
    let renewed = holder.renew(&lease).await.expect("the holder renews");
    holder.release(&renewed).await.expect("and releases");
}

/// The negative control: judged by the wall clock, as format 1 did, the same
/// step hands the live lease to the waiting process.
#[tokio::test]
async fn judged_by_the_wall_clock_the_step_hands_a_live_lease_over() {
    let host = Host::new();
    let options = SqliteOptions {
        judge_expiry_by_wall_clock: true,
        ..host.options()
    };
    let holder = open(&host.path, options.clone()).await;
    let waiter = open(&host.path, options).await;
    let ttl = Duration::from_secs(60);
    let lease = grant(&*holder, 1, ttl).await;

    host.clock.step_wall(HOURS_3);

    let taken = grant(&*waiter, 2, ttl).await;
    assert!(taken.fence > lease.fence);
}

#[tokio::test]
async fn a_wall_clock_step_back_does_not_keep_an_expired_lease() {
    let host = Host::new();
    let (holder, waiter) = (host.process().await, host.process().await);
    let ttl = Duration::from_millis(300);
    let lease = grant(&*holder, 1, ttl).await;

    host.clock.step_wall(-HOURS_3);
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;

    let next = grant(&*waiter, 2, ttl).await;
    assert!(next.fence > lease.fence);
    assert!(matches!(
        holder.renew(&lease).await,
        Err(BackendError::LeaseLost(_))
    ));
}

/// What the nodes' task saw: how many ran it at once, at most, and in all.
#[derive(Debug)]
struct Runs {
    running: AtomicUsize,
    most_at_once: AtomicUsize,
    started: AtomicUsize,
    first_started: tokio::sync::Notify,
    /// Set when the task may end.
    finish: tokio::sync::watch::Sender<bool>,
}

impl Default for Runs {
    fn default() -> Runs {
        Runs {
            running: AtomicUsize::new(0),
            most_at_once: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            first_started: tokio::sync::Notify::new(),
            finish: tokio::sync::watch::Sender::new(false),
        }
    }
}

/// A task that steps the host's wall clock by hours while it runs, as NTP
/// or an operator might, and then works until the test lets it end.
fn stepping_task(runs: &Arc<Runs>, clock: &Arc<SteppedClock>) -> Task {
    let (runs, clock) = (runs.clone(), clock.clone());
    Task::new(
        "1.0",
        1,
        "migrate",
        move |_: &mut TaskContext| -> TaskFuture<'_> {
            let (runs, clock) = (runs.clone(), clock.clone());
            Box::pin(async move {
                let now = runs.running.fetch_add(1, Ordering::SeqCst) + 1;
                runs.most_at_once.fetch_max(now, Ordering::SeqCst);
                if runs.started.fetch_add(1, Ordering::SeqCst) == 0 {
                    clock.step_wall(HOURS_3);
                    runs.first_started.notify_one();
                }
                let mut finish = runs.finish.subscribe();
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), finish.wait_for(|f| *f)).await;
                runs.running.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            })
        },
    )
    .unwrap()
}

fn node(backend: Arc<SqliteBackend>, n: usize, task: Task) -> Upsilon {
    Upsilon::builder()
        .service("svc")
        .app_version("1.0")
        .backend(backend)
        .holder(testing::holder(n))
        .ttl(Duration::from_secs(3))
        .poll_interval(Duration::from_millis(20))
        .tasks([task])
        .build()
        .unwrap()
}

/// Runs a node whose task steps the wall clock, and starts a second node
/// once the task runs. The task ends once the second node has waited for
/// the lease through several polls, or has taken it: what the task saw, and
/// the second node's outcome.
async fn upgrade_across_a_step(host: &Host, options: SqliteOptions) -> (Arc<Runs>, Outcome) {
    let runs = Arc::new(Runs::default());
    let task = stepping_task(&runs, &host.clock);
    let first = node(open(&host.path, options.clone()).await, 1, task.clone());
    let second = node(open(&host.path, options).await, 2, task);
    let first = tokio::spawn(async move { first.run().await });
    runs.first_started.notified().await;

    let mut status = second.status();
    let second = tokio::spawn(async move { second.run().await });
    let competed = status.wait_for(|s| {
        matches!(
            s,
            Status::Waiting { holder: Some(_) } | Status::Upgrading { .. }
        )
    });
    tokio::time::timeout(Duration::from_secs(10), competed)
        .await
        .expect("the second node waits for the lease or takes it")
        .unwrap();
    // Several more polls by a waiting node; a node that took the lease runs
    // its task meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    runs.finish.send_replace(true);

    let _ = first.await.unwrap();
    let second = second.await.unwrap();
    (runs, second.expect("the second node"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_step_while_a_task_runs_lets_no_other_node_run_it() {
    let host = Host::new();
    let (runs, second) = upgrade_across_a_step(&host, host.options()).await;
    assert_eq!(runs.most_at_once.load(Ordering::SeqCst), 1, "E1");
    assert_eq!(runs.started.load(Ordering::SeqCst), 1);
    // A second node whose read came just before the first's last commit
    // may be granted the lease after it, and find the work done.
    assert!(
        matches!(
            second,
            Outcome::WaitedForOther { .. } | Outcome::FoundUpToDate { .. }
        ),
        "{second:?}"
    );
}

/// The negative control of the test above: judged by the wall clock, the
/// second node takes the lease while the first still runs the task, and both
/// run it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn judged_by_the_wall_clock_the_step_lets_a_second_node_run_the_task() {
    let host = Host::new();
    let options = SqliteOptions {
        judge_expiry_by_wall_clock: true,
        ..host.options()
    };
    let (runs, _) = upgrade_across_a_step(&host, options).await;
    assert_eq!(runs.most_at_once.load(Ordering::SeqCst), 2);
}

/// The host as it is after a reboot: a new boot id, and `CLOCK_MONOTONIC`
/// counting from zero again.
#[derive(Debug)]
struct Rebooted {
    booted: std::time::Instant,
}

impl Clock for Rebooted {
    fn now(&self) -> Result<HostTime, BackendError> {
        Ok(HostTime {
            monotonic_ms: self.booted.elapsed().as_millis() as i64,
            boot_id: "a-later-boot".into(),
            ..SystemClock.now()?
        })
    }
}

/// A lease's expiry is a time on one boot's clock: after a reboot that
/// clock starts again from zero, and the holder died with the boot, so the
/// lease is expired whatever its expiry says.
#[tokio::test]
async fn a_lease_written_in_an_earlier_boot_is_expired() {
    let host = Host::new();
    let before = open(&host.path, SqliteOptions::default()).await;
    let lease = grant(&*before, 1, Duration::from_secs(3600)).await;

    let after = open(
        &host.path,
        SqliteOptions {
            clock: Arc::new(Rebooted {
                booted: std::time::Instant::now(),
            }),
            ..SqliteOptions::default()
        },
    )
    .await;
    assert_eq!(after.current("svc").await.unwrap(), None);
    let next = grant(&*after, 2, Duration::from_secs(60)).await;
    assert!(next.fence > lease.fence);
    assert!(matches!(
        before.renew(&lease).await,
        Err(BackendError::LeaseLost(_))
    ));
}
