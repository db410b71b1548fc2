//! A backend wrapper for simulations in virtual time (tokio's paused
//! clock): every lock and store call is served by a modelled store server
//! and costs its service time there, a waiting node's wake-up is delivered
//! through the same server, and every call is recorded, by kind, in the
//! calling node's log.
//!
//! The model ([`CostModel`]): the server works on [`CostModel::cores`]
//! calls at once, first come first served; a call reaches it
//! [`CostModel::one_way`] after it is sent, waits for a free core, holds it
//! for its kind's service time, and its reply comes back `one_way` later.
//! A wake-up holds a core for [`CostModel::wake`] when the change that
//! causes it commits, and reaches the waiting node `one_way` later. The
//! cores' occupancy is kept to the nanosecond; tokio's timer fires on whole
//! milliseconds, so a call returns, and takes effect in the wrapped
//! backend, on the first millisecond at or after its modelled reply.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use upsilon::backend::{
    Acquire, Backend, BackendError, Change, HistoryEntry, Lease, LeaseInfo, Lock, Notice, Snapshot,
    Store,
};
use upsilon::{Holder, Version};

/// What each call costs at the modelled store server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostModel {
    /// Calls the server works on at once (its cores).
    pub cores: usize,
    /// Service time of a read: `load`, `current`, `history`, `services`.
    pub read: Duration,
    /// Service time of a lease call: `try_acquire`, `renew`, `release`,
    /// `force_release`, `raise_fence` (each a small transaction that writes).
    pub lease: Duration,
    /// Service time of a store write: `claim`, `apply`.
    pub write: Duration,
    /// Service time of delivering one wake-up to one waiting node.
    pub wake: Duration,
    /// Network latency, each way.
    pub one_way: Duration,
}

impl Default for CostModel {
    /// A small database server on the same network: 4 cores, 0.1 ms a
    /// read, 0.3 ms a lease call or a write, 0.02 ms a wake-up delivered,
    /// 0.1 ms each way.
    fn default() -> Self {
        CostModel {
            cores: 4,
            read: Duration::from_micros(100),
            lease: Duration::from_micros(300),
            write: Duration::from_micros(300),
            wake: Duration::from_micros(20),
            one_way: Duration::from_micros(100),
        }
    }
}

/// The modelled store server every node's [`Costed`] shares.
#[derive(Debug)]
pub struct Server {
    model: CostModel,
    /// When each core is next free (`None`: never used yet).
    cores: Mutex<Vec<Option<Instant>>>,
    /// Orders every recorded event: calls taking effect, wake-ups, and
    /// whatever else a simulation stamps with [`Server::next_seq`].
    seq: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Server {
    pub fn new(model: CostModel) -> Arc<Server> {
        assert!(model.cores > 0, "a server needs a core");
        Arc::new(Server {
            model,
            cores: Mutex::new(vec![None; model.cores]),
            seq: AtomicU64::new(0),
        })
    }

    pub fn model(&self) -> &CostModel {
        &self.model
    }

    /// The next number in the order in which events happened.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    /// Holds a core for `work`, from when the request arrives (`one_way`
    /// after now, or now for work the server starts itself), and returns
    /// when the reply has come back.
    async fn serve(&self, work: Duration, request_leg: bool) {
        let now = Instant::now();
        let arrives = if request_leg {
            now + self.model.one_way
        } else {
            now
        };
        let done = {
            let mut cores = lock(&self.cores);
            let core = cores
                .iter_mut()
                .min_by_key(|free| free.unwrap_or(arrives))
                .expect("at least one core");
            let start = core.map_or(arrives, |free| free.max(arrives));
            *core = Some(start + work);
            start + work
        };
        tokio::time::sleep_until(done + self.model.one_way).await;
    }
}

/// What a recorded event was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// A read, named.
    Read(&'static str),
    /// A lease call, named.
    Lease(&'static str),
    /// A store write, named.
    Write(&'static str),
    /// The node began to wait for a change.
    WaitBegins,
    /// A wait ended with a wake-up (a notification, or a change already
    /// there when the wait began).
    Woken,
    /// A wait ended at its timeout: nothing woke the node.
    TimedOut,
}

/// One recorded event of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its place in the order of every node's events ([`Server::next_seq`]).
    pub seq: u64,
    /// Virtual time.
    pub at: Instant,
    pub call: Call,
    /// Whether the call succeeded.
    pub ok: bool,
    /// For a write that committed a new data version: that version.
    pub data_version: Option<Version>,
}

/// A node's calls, counted by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub reads: u64,
    pub lease: u64,
    pub writes: u64,
    /// Waits begun.
    pub waits: u64,
    /// Waits ended by a wake-up.
    pub woken: u64,
    /// Waits ended at their timeout.
    pub timed_out: u64,
}

impl Counts {
    pub fn of<'a>(events: impl IntoIterator<Item = &'a Event>) -> Counts {
        let mut c = Counts::default();
        for e in events {
            match e.call {
                Call::Read(_) => c.reads += 1,
                Call::Lease(_) => c.lease += 1,
                Call::Write(_) => c.writes += 1,
                Call::WaitBegins => c.waits += 1,
                Call::Woken => c.woken += 1,
                Call::TimedOut => c.timed_out += 1,
            }
        }
        c
    }

    /// Calls the store server answered: reads, lease calls and writes.
    pub fn store_calls(&self) -> u64 {
        self.reads + self.lease + self.writes
    }

    pub fn add(&mut self, other: &Counts) {
        self.reads += other.reads;
        self.lease += other.lease;
        self.writes += other.writes;
        self.waits += other.waits;
        self.woken += other.woken;
        self.timed_out += other.timed_out;
    }
}

/// What becomes of the wrapped backend's wake-ups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeups {
    /// Passed on: a woken node hears of the change once its delivery has
    /// been served.
    Delivered,
    /// Dropped: the backend says it has no notifications and a wait only
    /// sleeps, so the runner polls, as it does while a backend's
    /// notification connection is down.
    Dropped,
    /// Passed on without what they carry: a woken node finds no holder's
    /// notice and reads the store, as it does with a backend whose
    /// notifications name only the service.
    WithoutNotices,
}

/// One node's view of a shared backend, through the modelled [`Server`],
/// recording every call in the node's log.
#[derive(Debug)]
pub struct Costed {
    inner: Arc<dyn Backend>,
    server: Arc<Server>,
    wakeups: Wakeups,
    log: Mutex<Vec<Event>>,
}

impl Costed {
    pub fn new(inner: Arc<dyn Backend>, server: Arc<Server>, wakeups: Wakeups) -> Arc<Costed> {
        Arc::new(Costed {
            inner,
            server,
            wakeups,
            log: Mutex::default(),
        })
    }

    /// Every event so far, oldest first.
    pub fn events(&self) -> Vec<Event> {
        lock(&self.log).clone()
    }

    fn record(&self, call: Call, ok: bool, data_version: Option<Version>) {
        let seq = self.server.next_seq();
        lock(&self.log).push(Event {
            seq,
            at: Instant::now(),
            call,
            ok,
            data_version,
        });
    }

    /// Serves `op` at the server as `call`, then runs it on the wrapped
    /// backend and records it.
    async fn call<T>(
        &self,
        call: Call,
        op: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        let m = self.server.model();
        let work = match call {
            Call::Read(_) => m.read,
            Call::Lease(_) => m.lease,
            Call::Write(_) => m.write,
            Call::WaitBegins | Call::Woken | Call::TimedOut => Duration::ZERO,
        };
        self.server.serve(work, true).await;
        let r = op.await;
        self.record(call, r.is_ok(), None);
        r
    }
}

#[async_trait]
impl Lock for Costed {
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        self.call(
            Call::Lease("acquire"),
            self.inner.try_acquire(service, holder, ttl),
        )
        .await
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, BackendError> {
        self.call(Call::Lease("renew"), self.inner.renew(lease))
            .await
    }

    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        self.call(Call::Lease("release"), self.inner.release(lease))
            .await
    }

    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        self.call(Call::Read("current"), self.inner.current(service))
            .await
    }

    async fn force_release(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        self.call(
            Call::Lease("force_release"),
            self.inner.force_release(service),
        )
        .await
    }

    async fn raise_fence(&self, service: &str, floor: u64) -> Result<(), BackendError> {
        self.call(
            Call::Lease("raise_fence"),
            self.inner.raise_fence(service, floor),
        )
        .await
    }

    /// Passed on at no cost: the wrapped backend's preparation is local.
    async fn prepare_wait(&self, service: &str) -> Result<(), BackendError> {
        self.inner.prepare_wait(service).await
    }

    async fn wait(
        &self,
        service: &str,
        seen: &LeaseInfo,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        self.record(Call::WaitBegins, true, None);
        match self.wakeups {
            Wakeups::Dropped => {
                tokio::time::sleep(timeout).await;
                self.record(Call::TimedOut, true, None);
                Ok(())
            }
            Wakeups::Delivered | Wakeups::WithoutNotices => {
                let began = Instant::now();
                let r = self.inner.wait(service, seen, timeout).await;
                if began.elapsed() >= timeout {
                    self.record(Call::TimedOut, r.is_ok(), None);
                } else {
                    self.server.serve(self.server.model().wake, false).await;
                    self.record(Call::Woken, r.is_ok(), None);
                }
                r
            }
        }
    }

    fn notifies(&self) -> bool {
        self.wakeups != Wakeups::Dropped && self.inner.notifies()
    }

    /// Passed on: the holder's watch on its own session, not a call.
    async fn until_lost(&self, lease: &Lease) -> BackendError {
        self.inner.until_lost(lease).await
    }
}

#[async_trait]
impl Store for Costed {
    async fn load(&self, service: &str) -> Result<Snapshot, BackendError> {
        self.call(Call::Read("load"), self.inner.load(service))
            .await
    }

    async fn claim(&self, service: &str, fence: u64) -> Result<Snapshot, BackendError> {
        self.call(Call::Write("claim"), self.inner.claim(service, fence))
            .await
    }

    async fn apply(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
    ) -> Result<(), BackendError> {
        self.write(service, fence, changes, None).await
    }

    async fn apply_with_notice(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
        notice: &Notice,
    ) -> Result<(), BackendError> {
        self.write(service, fence, changes, Some(notice)).await
    }

    /// What the notifications this node received carried: no call.
    fn notice(&self, service: &str) -> Option<Notice> {
        (self.wakeups == Wakeups::Delivered)
            .then(|| self.inner.notice(service))
            .flatten()
    }

    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>, BackendError> {
        self.call(Call::Read("history"), self.inner.history(service))
            .await
    }

    async fn services(&self) -> Result<Vec<String>, BackendError> {
        self.call(Call::Read("services"), self.inner.services())
            .await
    }
}

impl Costed {
    /// One fenced write, with the notice its notification carries, if any.
    async fn write(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
        notice: Option<&Notice>,
    ) -> Result<(), BackendError> {
        self.server.serve(self.server.model().write, true).await;
        let r = match notice {
            Some(n) => {
                self.inner
                    .apply_with_notice(service, fence, changes, n)
                    .await
            }
            None => self.inner.apply(service, fence, changes).await,
        };
        let version = changes.iter().find_map(|c| match c {
            Change::DataVersion(v) => Some(v.clone()),
            _ => None,
        });
        self.record(
            Call::Write("apply"),
            r.is_ok(),
            version.filter(|_| r.is_ok()),
        );
        r
    }
}
