//! The runner: steps 1-7 of the protocol.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use semver::Version;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::backend::{
    Acquire, AttemptKind, AttemptState, Backend, BackendError, Change, FinishAttempt, Lease, Lock,
    Snapshot, StartAttempt, Store,
};
use crate::context::{Resources, TaskContext, TaskInfo};
use crate::error::{Error, Report, TaskReport};
use crate::ids::Holder;
use crate::planner::{self, Plan, PlanOptions};
use crate::registry::{Registry, Task};
use crate::status::{Probe, Status};
use crate::util::jitter;
use crate::version::parse_version;

/// What to do when the store's data version is above the app version (an
/// older binary starting after a newer one upgraded the data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataAheadPolicy {
    /// Become READY and log a warning: the app supports the N+1 data of its
    /// successor (the N-1 rule read from the other side). The default.
    #[default]
    Ready,
    /// Fail with [`Error::DataAhead`].
    Fail,
}

/// What to do with registered tasks whose version is above the app version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AboveAppPolicy {
    /// Leave them out of the plan and log a warning. The default.
    #[default]
    Warn,
    /// Fail when the runner is built, naming each task.
    Error,
    /// Leave them out silently: for a binary that plays several app versions
    /// (tests, demos) or ships tasks ahead of their release.
    Ignore,
}

/// How often a failing task is tried, and how long to wait between tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, at least 1.
    pub max_attempts: u32,
    /// Wait before the second attempt.
    pub initial_backoff: Duration,
    /// The wait doubles each time, up to this.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// One attempt: a failing task fails the upgrade at once.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// `max_attempts` tries, the first wait `initial_backoff`, doubling up to 30 s.
    pub fn attempts(max_attempts: u32, initial_backoff: Duration) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff,
            max_backoff: Duration::from_secs(30).max(initial_backoff),
        }
    }

    fn backoff(&self, failed_attempts: u32) -> Duration {
        let factor = 2u32.saturating_pow(failed_attempts.saturating_sub(1));
        jitter(
            self.initial_backoff
                .saturating_mul(factor)
                .min(self.max_backoff),
        )
    }
}

/// What [`Upsilon::run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Nothing to do: the data was already at this version. No lease was taken.
    UpToDate {
        /// The data version read.
        data_version: Option<Version>,
    },
    /// This node took the lease and ran the plan.
    Upgraded {
        /// What it did.
        report: Report,
    },
    /// Another node did the work while this one waited; it never took the lease.
    WaitedForOther {
        /// Who held the lease.
        holder: Option<Holder>,
        /// The data version read at the end.
        data_version: Option<Version>,
        /// How long it waited.
        waited: Duration,
    },
}

impl Outcome {
    /// The data version the node became READY at.
    pub fn data_version(&self) -> Option<&Version> {
        match self {
            Outcome::UpToDate { data_version } | Outcome::WaitedForOther { data_version, .. } => {
                data_version.as_ref()
            }
            Outcome::Upgraded { report } => report.to.as_ref(),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = |v: Option<&Version>| v.map_or("none".to_owned(), |v| v.to_string());
        match self {
            Outcome::UpToDate { data_version } => {
                write!(
                    f,
                    "already up to date at data version {}",
                    v(data_version.as_ref())
                )
            }
            Outcome::Upgraded { report } => write!(f, "upgraded {report}"),
            Outcome::WaitedForOther {
                holder,
                data_version,
                waited,
            } => {
                write!(f, "waited {waited:?} while ")?;
                match holder {
                    Some(h) => write!(f, "{h}")?,
                    None => f.write_str("another node")?,
                }
                write!(f, " upgraded the data to {}", v(data_version.as_ref()))
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Config {
    ttl: Duration,
    renew_every: Duration,
    margin: Duration,
    max_wait: Duration,
    poll: Duration,
    retry: RetryPolicy,
    rollback_on_failure: bool,
    data_ahead: DataAheadPolicy,
    above_app: AboveAppPolicy,
    plan: PlanOptions,
    backend_attempts: u32,
    baseline: Option<Version>,
    /// Negative control: plan from the read made before the lease.
    skip_reread: bool,
}

impl Default for Config {
    fn default() -> Self {
        let ttl = Duration::from_secs(15);
        Config {
            ttl,
            renew_every: ttl / 3,
            margin: ttl / 5,
            max_wait: Duration::from_secs(600),
            poll: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            rollback_on_failure: false,
            data_ahead: DataAheadPolicy::default(),
            above_app: AboveAppPolicy::default(),
            plan: PlanOptions::default(),
            backend_attempts: 5,
            baseline: None,
            skip_reread: false,
        }
    }
}

/// Builds an [`Upsilon`] runner. Start with [`Upsilon::builder`].
pub struct Builder {
    service: String,
    app_version: Option<String>,
    lock: Option<Arc<dyn Lock>>,
    store: Option<Arc<dyn Store>>,
    tasks: Option<Vec<Task>>,
    resources: Resources,
    holder: Option<Holder>,
    required_crates: Vec<String>,
    baseline: Option<String>,
    config: Config,
    renew_set: bool,
    margin_set: bool,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("service", &self.service)
            .field("app_version", &self.app_version)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// The service name the lease and store are scoped by, so that several
    /// services can share one database or file. Default `"default"`.
    pub fn service(mut self, name: impl Into<String>) -> Self {
        self.service = name.into();
        self
    }

    /// The version of this binary, usually `env!("CARGO_PKG_VERSION")`.
    /// Required. `"1.1"` means `1.1.0`.
    pub fn app_version(mut self, version: impl Into<String>) -> Self {
        self.app_version = Some(version.into());
        self
    }

    /// One backend that is both the lock and the store.
    pub fn backend(mut self, backend: Arc<dyn Backend>) -> Self {
        self.lock = Some(backend.clone());
        self.store = Some(backend);
        self
    }

    /// The lock (may come from another backend than the store: the store's
    /// own fence check keeps that safe).
    pub fn lock(mut self, lock: Arc<dyn Lock>) -> Self {
        self.lock = Some(lock);
        self
    }

    /// The store.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Runs these tasks instead of those registered with `#[upsilon::task]`.
    pub fn tasks(mut self, tasks: impl IntoIterator<Item = Task>) -> Self {
        self.tasks = Some(tasks.into_iter().collect());
        self
    }

    /// A value tasks read with [`TaskContext::resource`].
    pub fn resource<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.resources.insert(value);
        self
    }

    /// Who this node is. Default [`Holder::current`].
    pub fn holder(mut self, holder: Holder) -> Self {
        self.holder = Some(holder);
        self
    }

    /// Lease time to live. Default 15 s. Renewal runs every TTL/3 unless
    /// [`Builder::renew_every`] says otherwise; a dead holder's lease is taken
    /// over within about this long.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// How often the holder renews its lease. Default TTL/3.
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.config.renew_every = every;
        self.renew_set = true;
        self
    }

    /// How long before the lease's expiry (counted from the last successful
    /// renewal on the local monotonic clock) the holder gives up and cancels
    /// its task, to stay clear of clock drift. Default TTL/5.
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.config.margin = margin;
        self.margin_set = true;
        self
    }

    /// The longest a node waits for another node's lease before failing.
    /// Default 10 minutes.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.config.max_wait = max_wait;
        self
    }

    /// How often a waiting node polls when its backend has no notifications
    /// (jittered ±50 %). Default 1 s.
    pub fn poll_interval(mut self, poll: Duration) -> Self {
        self.config.poll = poll;
        self
    }

    /// Retries of a failing task. Default: one attempt.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    /// When a task fails for good, run the `rollback` fns of the failed
    /// version's tasks (the failed one first, then the completed ones in
    /// reverse order). Default off.
    pub fn rollback_on_failure(mut self, on: bool) -> Self {
        self.config.rollback_on_failure = on;
        self
    }

    /// What to do when the data is ahead of the app. Default
    /// [`DataAheadPolicy::Ready`].
    pub fn data_ahead(mut self, policy: DataAheadPolicy) -> Self {
        self.config.data_ahead = policy;
        self
    }

    /// What to do with tasks above the app version. Default
    /// [`AboveAppPolicy::Warn`].
    pub fn tasks_above_app(mut self, policy: AboveAppPolicy) -> Self {
        self.config.above_app = policy;
        self
    }

    /// Run tasks at or below the data version that the store never saw
    /// (added out of order). Default off: they are reported and left out.
    pub fn run_out_of_order(mut self, on: bool) -> Self {
        self.config.plan.run_out_of_order = on;
        self
    }

    /// An empty store (no data version, no history) adopts `version` as its
    /// data version, without running the tasks up to it: an existing
    /// deployment adopting Upsilon. A store that is not empty is left as is.
    pub fn baseline(mut self, version: impl Into<String>) -> Self {
        self.baseline = Some(version.into());
        self
    }

    /// Fails the build unless `crate_name` registered at least one task: the
    /// guard against the linker dropping a task library the binary never
    /// names (see the crate docs).
    pub fn require_tasks_from(mut self, crate_name: impl Into<String>) -> Self {
        self.required_crates.push(crate_name.into());
        self
    }

    /// How often a transient backend error is retried (with jittered backoff)
    /// before the runner fails. Default 5.
    pub fn backend_attempts(mut self, attempts: u32) -> Self {
        self.config.backend_attempts = attempts;
        self
    }

    /// Negative control for simulations: plan from the state read before
    /// the lease instead of re-reading after the claim. Breaks the protocol on
    /// purpose; never use it outside a test of the test harness itself.
    #[cfg(feature = "_negative-controls")]
    pub fn skip_reread_after_acquire(mut self) -> Self {
        self.config.skip_reread = true;
        self
    }

    /// Validates everything and builds the runner. Collects and validates the
    /// registry here, before any lock is taken.
    pub fn build(mut self) -> Result<Upsilon, Error> {
        let app_text = self.app_version.as_deref().ok_or_else(|| {
            Error::Config(
                "no app version; call `.app_version(env!(\"CARGO_PKG_VERSION\"))`".to_owned(),
            )
        })?;
        let app =
            parse_version(app_text).map_err(|e| Error::Config(format!("app version: {e}")))?;
        let lock = self
            .lock
            .take()
            .ok_or_else(|| Error::Config("no lock; call `.backend(..)` or `.lock(..)`".into()))?;
        let store = self
            .store
            .take()
            .ok_or_else(|| Error::Config("no store; call `.backend(..)` or `.store(..)`".into()))?;
        check_name(&self.service)?;
        let c = &mut self.config;
        if !self.renew_set {
            c.renew_every = c.ttl / 3;
        }
        if !self.margin_set {
            c.margin = c.ttl / 5;
        }
        if c.ttl < Duration::from_millis(100) {
            return Err(Error::Config(format!(
                "ttl {:?} is too short; use at least 100 ms (seconds in production)",
                c.ttl
            )));
        }
        if c.margin >= c.ttl {
            return Err(Error::Config(format!(
                "safety margin {:?} must be shorter than the ttl {:?}",
                c.margin, c.ttl
            )));
        }
        if c.renew_every.is_zero() || c.renew_every * 2 > c.ttl - c.margin {
            return Err(Error::Config(format!(
                "renewing every {:?} leaves no room for a failed renewal before the local deadline (ttl {:?} - margin {:?}); renew at most every (ttl - margin) / 2",
                c.renew_every, c.ttl, c.margin
            )));
        }
        if c.poll.is_zero() {
            return Err(Error::Config("poll interval must not be zero".into()));
        }
        if c.retry.max_attempts == 0 {
            return Err(Error::Config(
                "retry policy: max_attempts must be at least 1".into(),
            ));
        }
        if c.backend_attempts == 0 {
            return Err(Error::Config("backend_attempts must be at least 1".into()));
        }
        if let Some(b) = &self.baseline {
            let b = parse_version(b).map_err(|e| Error::Config(format!("baseline: {e}")))?;
            if b > app {
                return Err(Error::Config(format!(
                    "baseline {b} is above the app version {app}"
                )));
            }
            c.baseline = Some(b);
        }
        let registry = match self.tasks.take() {
            Some(tasks) => Registry::new(tasks)?,
            None => Registry::collect()?,
        };
        match self.config.above_app {
            AboveAppPolicy::Error => registry.check_not_above(&app)?,
            AboveAppPolicy::Warn => {
                let above: Vec<String> = registry
                    .above(&app)
                    .map(|t| format!("{} ({})", t.key(), t.location()))
                    .collect();
                if !above.is_empty() {
                    warn!(app_version = %app, tasks = %above.join(", "),
                        "{} task(s) have a version above the app version; they are left out of the plan",
                        above.len());
                }
            }
            AboveAppPolicy::Ignore => {}
        }
        let crates = registry.crates();
        for name in &self.required_crates {
            if !crates.contains_key(name) {
                return Err(Error::Config(format!(
                    "no task from crate `{name}` is registered in this binary; the linker drops a crate's tasks when nothing refers to it: add `use {name} as _;` to the binary (tasks found from: {})",
                    if crates.is_empty() { "no crate".to_owned() } else {
                        crates.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                )));
            }
        }
        let (status, _) = watch::channel(Status::Starting);
        Ok(Upsilon {
            inner: Arc::new(Inner {
                service: self.service,
                app,
                lock,
                store,
                registry,
                resources: Arc::new(self.resources),
                holder: self.holder.unwrap_or_else(Holder::current),
                status,
                config: self.config,
            }),
        })
    }
}

/// Service names, like table names, are allow-listed so that every backend
/// can use them as keys without quoting surprises.
fn check_name(service: &str) -> Result<(), Error> {
    let ok = !service.is_empty()
        && service.len() <= 63
        && service
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "service name {service:?} must be 1 to 63 characters of a-z, A-Z, 0-9, `_`, `-` and `.`"
        )))
    }
}

/// The runner. Build with [`Upsilon::builder`], then [`Upsilon::run`] at start-up.
#[derive(Clone)]
pub struct Upsilon {
    inner: Arc<Inner>,
}

impl fmt::Debug for Upsilon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upsilon")
            .field("service", &self.inner.service)
            .field("app_version", &self.inner.app.to_string())
            .field("holder", &self.inner.holder.to_string())
            .field("tasks", &self.inner.registry.tasks().len())
            .finish()
    }
}

struct Inner {
    service: String,
    app: Version,
    lock: Arc<dyn Lock>,
    store: Arc<dyn Store>,
    registry: Registry,
    resources: Arc<Resources>,
    holder: Holder,
    status: watch::Sender<Status>,
    config: Config,
}

impl Upsilon {
    /// A builder with the defaults.
    pub fn builder() -> Builder {
        Builder {
            service: "default".to_owned(),
            app_version: None,
            lock: None,
            store: None,
            tasks: None,
            resources: Resources::default(),
            holder: None,
            required_crates: Vec::new(),
            baseline: None,
            config: Config::default(),
            renew_set: false,
            margin_set: false,
        }
    }

    /// The readiness probe: `up()` and `ready()`.
    pub fn probe(&self) -> Probe {
        Probe {
            rx: self.inner.status.subscribe(),
        }
    }

    /// The status as a watch channel.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.inner.status.subscribe()
    }

    /// The validated tasks this runner knows.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Who this node is.
    pub fn holder(&self) -> &Holder {
        &self.inner.holder
    }

    /// What this node would run now, read from the store without a lease.
    pub async fn plan(&self) -> Result<Plan, Error> {
        let snapshot = self.inner.load().await?;
        Ok(self.inner.plan(&snapshot))
    }

    /// Runs the start-up protocol: returns once the data is at this node's
    /// version (READY) or with the reason it is not.
    pub async fn run(&self) -> Result<Outcome, Error> {
        let inner = &self.inner;
        let span = info_span!("upsilon.run", service = %inner.service, app_version = %inner.app,
            holder = %inner.holder);
        async {
            inner.status.send_replace(Status::Starting);
            let result = inner.run().await;
            match &result {
                Ok(outcome) => {
                    info!(%outcome, "ready");
                    inner.status.send_replace(Status::Ready {
                        data_version: outcome.data_version().cloned(),
                    });
                }
                Err(e) => {
                    error!(error = %e, "upgrade did not complete; the node is not ready");
                    inner.status.send_replace(Status::Failed {
                        error: e.to_string(),
                    });
                }
            }
            result
        }
        .instrument(span)
        .await
    }
}

/// Baselines the empty store of `service` at `version`: an operator's call
/// for an existing deployment adopting Upsilon. Takes the lease (waiting up to
/// 10 minutes for it) so that no node runs tasks meanwhile. Returns `true` if
/// it baselined, `false` if the store was not empty (nothing is changed then).
pub async fn baseline(
    lock: Arc<dyn Lock>,
    store: Arc<dyn Store>,
    service: &str,
    version: &str,
) -> Result<bool, Error> {
    let upsilon = Upsilon::builder()
        .service(service)
        .app_version(version)
        .baseline(version)
        .lock(lock)
        .store(store)
        .tasks([])
        .build()?;
    let outcome = upsilon.run().await?;
    Ok(matches!(outcome, Outcome::Upgraded { report } if report.baselined.is_some()))
}

impl Inner {
    fn plan(&self, snapshot: &Snapshot) -> Plan {
        planner::plan(&self.registry, snapshot, &self.app, self.config.plan)
    }

    /// Whether there is work under the lease besides the plan's tasks: a
    /// baseline to record, or a data version that lags behind completed
    /// tasks (a task committed its completion itself, through a backend's
    /// same-transaction helper, and its node died before the runner recorded
    /// the version).
    fn needs_lease(&self, snapshot: &Snapshot) -> bool {
        (self.config.baseline.is_some() && snapshot.is_empty())
            || self.lagging_version(snapshot).is_some()
    }

    /// The data version the completed tasks reach, if it is above the
    /// recorded one.
    fn lagging_version(&self, snapshot: &Snapshot) -> Option<Version> {
        planner::reached_version(&self.registry, snapshot, &self.app, None)
            .filter(|v| snapshot.data_version.as_ref() < Some(v))
    }

    async fn load(&self) -> Result<Snapshot, Error> {
        self.retry("reading the store", || self.store.load(&self.service))
            .await
    }

    /// Retries transient backend errors with jittered exponential backoff.
    async fn retry<T, F, Fut>(&self, during: &'static str, mut op: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BackendError>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && attempt < self.config.backend_attempts => {
                    let wait = jitter(Duration::from_millis(50) * 2u32.pow(attempt.min(6)));
                    warn!(error = %e, attempt, ?wait, "{during}: transient backend error, retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(source) => return Err(Error::Backend { during, source }),
            }
        }
    }

    /// Step 1: preflight without a lock; step 2: acquire or wait.
    async fn run(&self) -> Result<Outcome, Error> {
        let mut snapshot = self.load().await?;
        let mut plan = self.plan(&snapshot);
        self.preflight(&snapshot, &plan)?;
        if plan.is_empty() && !self.needs_lease(&snapshot) {
            return Ok(Outcome::UpToDate {
                data_version: snapshot.data_version,
            });
        }
        info!(tasks = plan.steps.len(), data_version = ?snapshot.data_version.as_ref().map(|v| v.to_string()),
            "upgrade needed; acquiring the lease");
        let started = Instant::now();
        let deadline = started + self.config.max_wait;
        let mut last_holder = None;
        let mut seen;
        let lease = loop {
            let acquired = self
                .retry("acquiring the lease", || {
                    self.lock
                        .try_acquire(&self.service, &self.holder, self.config.ttl)
                })
                .instrument(info_span!("upsilon.acquire"))
                .await?;
            match acquired {
                Acquire::Granted(lease) => {
                    info!(fence = lease.fence, "lease acquired");
                    break lease;
                }
                Acquire::Held(info) => {
                    if last_holder.as_ref() != Some(&info.holder) {
                        info!(holder = %info.holder, fence = info.fence, "lease held by another node; waiting");
                        self.status.send_replace(Status::Waiting {
                            holder: Some(info.holder.clone()),
                        });
                    }
                    last_holder = Some(info.holder.clone());
                    seen = info;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::WaitTimeout {
                    service: self.service.clone(),
                    holder: last_holder,
                    waited: now - started,
                });
            }
            let nap = if self.lock.notifies() {
                // Nothing changes before a notification but the lease running
                // out: sleep until its expiry (a renewal moves it, and the
                // next try sees the new one).
                let left = (seen.expires_at_ms - seen.now_ms).max(0) as u64;
                Duration::from_millis(left) + jitter(Duration::from_millis(50))
            } else {
                jitter(self.config.poll)
            }
            .min(deadline - now);
            if let Err(e) = self.lock.wait(&self.service, &seen, nap).await {
                debug!(error = %e, "waiting for a lease change failed; polling instead");
                tokio::time::sleep(nap).await;
            }
            snapshot = self.load().await?;
            plan = self.plan(&snapshot);
            if plan.is_empty() && !self.needs_lease(&snapshot) {
                self.preflight(&snapshot, &plan)?;
                return Ok(Outcome::WaitedForOther {
                    holder: last_holder,
                    data_version: snapshot.data_version,
                    waited: started.elapsed(),
                });
            }
        };
        self.hold(lease, snapshot).await
    }

    fn preflight(&self, snapshot: &Snapshot, plan: &Plan) -> Result<(), Error> {
        if plan.data_ahead {
            let data = snapshot
                .data_version
                .clone()
                .unwrap_or_else(|| self.app.clone());
            match self.config.data_ahead {
                DataAheadPolicy::Fail => {
                    return Err(Error::DataAhead {
                        service: self.service.clone(),
                        data,
                        app: self.app.clone(),
                    })
                }
                DataAheadPolicy::Ready => warn!(data_version = %data, app_version = %self.app,
                    "the data is ahead of this app version; serving it under the N-1 compatibility rule"),
            }
        }
        for task in &plan.out_of_order {
            warn!(task = %task.key(), location = %task.location(),
                "task is at or below the data version but was never run (added out of order); \
                 it is skipped unless `run_out_of_order(true)` is set");
        }
        Ok(())
    }

    /// Steps 3-7 while holding `lease`. Releases on every path.
    async fn hold(&self, lease: Lease, before: Snapshot) -> Result<Outcome, Error> {
        let held = Arc::new(Held {
            lease: Mutex::new(lease.clone()),
            lost: CancellationToken::new(),
            reason: Mutex::new(None),
        });
        let renewer = AbortOnDrop(tokio::spawn(
            renew_loop(self.lock.clone(), held.clone(), self.config.clone())
                .instrument(info_span!("upsilon.renew", fence = lease.fence)),
        ));
        let mut guard = ReleaseGuard {
            lock: self.lock.clone(),
            held: held.clone(),
            armed: true,
        };
        let mut report = Report {
            service: self.service.clone(),
            fence: lease.fence,
            ..Report::default()
        };
        let result = self.upgrade(&held, &mut report, before).await;
        drop(renewer);
        guard.armed = false;
        let current = held.lease.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !held.lost.is_cancelled() {
            let released = self
                .retry("releasing the lease", || self.lock.release(&current))
                .instrument(info_span!("upsilon.release", fence = current.fence))
                .await;
            match released {
                Ok(()) => info!(fence = current.fence, "lease released"),
                Err(e) => {
                    warn!(error = %e, "releasing the lease failed; it expires within its TTL")
                }
            }
        }
        let result = result.map_err(|e| match e {
            Failure::Lost(reason) => Error::LeaseLost {
                reason,
                report: Box::new(report.clone()),
            },
            Failure::Task => Error::TaskFailed {
                report: Box::new(report.clone()),
            },
            Failure::Other(e) => e,
        });
        result?;
        if report.completed.is_empty() && report.baselined.is_none() && report.to == report.from {
            // Another node finished between our read and our grant: the
            // re-read under the lease found nothing to do.
            return Ok(Outcome::UpToDate {
                data_version: report.to,
            });
        }
        Ok(Outcome::Upgraded { report })
    }

    /// Steps 3, 4 and 6.
    async fn upgrade(
        &self,
        held: &Held,
        report: &mut Report,
        before: Snapshot,
    ) -> Result<(), Failure> {
        let fence = report.fence;
        let mut snapshot = self
            .retry("claiming the store", || {
                self.store.claim(&self.service, fence)
            })
            .await
            .map_err(|e| self.lost_or(held, e))?;
        if self.config.skip_reread {
            snapshot = Snapshot { fence, ..before };
        }
        report.from = snapshot.data_version.clone();
        report.to = snapshot.data_version.clone();
        if let Some(b) = self.config.baseline.clone().filter(|_| snapshot.is_empty()) {
            self.write(
                held,
                &mut snapshot,
                fence,
                vec![Change::Baseline(b.clone())],
            )
            .await?;
            info!(version = %b, "baselined the empty store");
            report.baselined = Some(b);
            report.to = snapshot.data_version.clone();
        }
        // Never plan from state read before the lease.
        let plan = self.plan(&snapshot);
        self.preflight(&snapshot, &plan).map_err(Failure::Other)?;
        let total = plan.steps.len();
        let mut pending: Vec<Change> = Vec::new();
        for (i, step) in plan.steps.iter().enumerate() {
            let task = &step.task;
            info!(task = %task.key(), reason = %step.reason, "task {} of {total}", i + 1);
            let mut failures = 0;
            let done = loop {
                if let Some(reason) = held.lost_reason() {
                    return Err(Failure::Lost(reason));
                }
                let attempt = snapshot.tasks.get(task.key()).map_or(0, |s| s.rows) + 1;
                pending.push(Change::Start(StartAttempt {
                    key: task.key().clone(),
                    attempt,
                    kind: AttemptKind::Run,
                    description: task.description().to_owned(),
                    holder: self.holder.clone(),
                }));
                self.write(held, &mut snapshot, fence, std::mem::take(&mut pending))
                    .await?;
                self.status.send_replace(Status::Upgrading {
                    task: task.id().to_owned(),
                    version: task.version().clone(),
                    index: i + 1,
                    total,
                    progress: None,
                });
                let info = TaskInfo {
                    id: task.id().to_owned(),
                    version: task.version().clone(),
                    description: task.description().to_owned(),
                    attempt,
                    index: i + 1,
                    total,
                    rollback: false,
                };
                let (ran, duration) = self.run_one(held, task, info, false).await;
                let mut task_report = TaskReport {
                    key: task.key().clone(),
                    description: task.description().to_owned(),
                    attempt,
                    duration,
                    error: None,
                };
                match ran {
                    Ran::Ok => {
                        info!(task = %task.key(), ?duration, "task completed");
                        pending.push(finish(
                            task,
                            attempt,
                            AttemptState::Completed,
                            None,
                            duration,
                        ));
                        break task_report;
                    }
                    Ran::Cancelled(reason) => {
                        warn!(task = %task.key(), %reason, "task cancelled: the lease was lost");
                        pending.push(finish(
                            task,
                            attempt,
                            AttemptState::Cancelled,
                            None,
                            duration,
                        ));
                        // Best effort: the store refuses it if another node took over.
                        let _ = self.write(held, &mut snapshot, fence, pending).await;
                        return Err(Failure::Lost(reason));
                    }
                    Ran::Failed(message) => {
                        failures += 1;
                        warn!(task = %task.key(), attempt, error = %message, ?duration, "task failed");
                        pending.push(finish(
                            task,
                            attempt,
                            AttemptState::Failed,
                            Some(message.clone()),
                            duration,
                        ));
                        self.write(held, &mut snapshot, fence, std::mem::take(&mut pending))
                            .await?;
                        if failures >= self.config.retry.max_attempts {
                            task_report.error = Some(message);
                            report.failed = Some(task_report);
                            if self.config.rollback_on_failure {
                                self.roll_back(held, &mut snapshot, &plan, i, report)
                                    .await?;
                            }
                            return Err(Failure::Task);
                        }
                        let wait = self.config.retry.backoff(failures);
                        info!(task = %task.key(), ?wait, "retrying the task");
                        tokio::select! {
                            biased;
                            _ = tokio::time::sleep(wait) => {}
                            _ = held.lost.cancelled() => {}
                        }
                    }
                }
            };
            report.completed.push(done);
            let version_done = plan
                .steps
                .get(i + 1)
                .is_none_or(|next| next.task.version() != task.version());
            if version_done {
                let reached = planner::reached_version(
                    &self.registry,
                    &snapshot,
                    &self.app,
                    Some(task.key()),
                );
                if let Some(v) = reached {
                    if snapshot.data_version.as_ref() != Some(&v) {
                        pending.push(Change::DataVersion(v));
                    }
                }
            }
            // A version's last completion is written at once, with the data
            // version it reaches; any other rides with the next task's start,
            // which follows without a pause.
            if version_done {
                self.write(held, &mut snapshot, fence, std::mem::take(&mut pending))
                    .await?;
                report.to = snapshot.data_version.clone();
                info!(data_version = ?report.to.as_ref().map(|v| v.to_string()), "version complete");
            }
        }
        if let Some(v) = self.lagging_version(&snapshot) {
            self.write(held, &mut snapshot, fence, vec![Change::DataVersion(v)])
                .await?;
        }
        report.to = snapshot.data_version.clone();
        Ok(())
    }

    /// Runs rollbacks after the task at `failed` failed for good: the failed
    /// task first, then the completed tasks of its version, newest first.
    async fn roll_back(
        &self,
        held: &Held,
        snapshot: &mut Snapshot,
        plan: &Plan,
        failed: usize,
        report: &mut Report,
    ) -> Result<(), Failure> {
        let version = plan.steps[failed].task.version().clone();
        let mut undo: Vec<&Task> = vec![&plan.steps[failed].task];
        undo.extend(
            self.registry
                .tasks()
                .iter()
                .rev()
                .filter(|t| t.version() == &version && snapshot.is_completed(t.key())),
        );
        let fence = report.fence;
        let total = undo.len();
        for (i, task) in undo.into_iter().enumerate() {
            if !task.has_rollback() {
                continue;
            }
            if let Some(reason) = held.lost_reason() {
                return Err(Failure::Lost(reason));
            }
            let attempt = snapshot.tasks.get(task.key()).map_or(0, |s| s.rows) + 1;
            self.write(
                held,
                snapshot,
                fence,
                vec![Change::Start(StartAttempt {
                    key: task.key().clone(),
                    attempt,
                    kind: AttemptKind::Rollback,
                    description: task.description().to_owned(),
                    holder: self.holder.clone(),
                })],
            )
            .await?;
            let info = TaskInfo {
                id: task.id().to_owned(),
                version: task.version().clone(),
                description: task.description().to_owned(),
                attempt,
                index: i + 1,
                total,
                rollback: true,
            };
            info!(task = %task.key(), "rolling back");
            let (ran, duration) = self.run_one(held, task, info, true).await;
            let (state, error) = match ran {
                Ran::Ok => (AttemptState::Completed, None),
                Ran::Failed(e) => (AttemptState::Failed, Some(e)),
                Ran::Cancelled(reason) => {
                    let change = finish(task, attempt, AttemptState::Cancelled, None, duration);
                    let _ = self.write(held, snapshot, fence, vec![change]).await;
                    return Err(Failure::Lost(reason));
                }
            };
            let change = finish(task, attempt, state, error.clone(), duration);
            self.write(held, snapshot, fence, vec![change]).await?;
            report.rolled_back.push(TaskReport {
                key: task.key().clone(),
                description: task.description().to_owned(),
                attempt,
                duration,
                error: error.clone(),
            });
            if let Some(e) = error {
                error!(task = %task.key(), error = %e, "rollback failed; stopping the rollback");
                break;
            }
        }
        Ok(())
    }

    async fn run_one(
        &self,
        held: &Held,
        task: &Task,
        info: TaskInfo,
        rollback: bool,
    ) -> (Ran, Duration) {
        let span = info_span!("upsilon.task", task = %task.id(), version = %task.version(),
            attempt = info.attempt, rollback);
        let mut ctx = TaskContext {
            info,
            service: Arc::from(self.service.as_str()),
            fence: held.fence(),
            holder: self.holder.clone(),
            cancel: held.lost.child_token(),
            resources: self.resources.clone(),
            status: self.status.clone(),
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
                _ = held.lost.cancelled() => {
                    Ran::Cancelled(held.lost_reason().unwrap_or_else(|| "the lease was lost".into()))
                }
                r = CatchUnwind(future) => match r {
                    Ok(Ok(())) => Ran::Ok,
                    Ok(Err(e)) => Ran::Failed(error_chain(&*e)),
                    Err(panic) => Ran::Failed(format!("panicked: {}", panic_message(&panic))),
                },
            }
        }
        .instrument(span)
        .await;
        (ran, started.elapsed())
    }

    /// One fenced write. Checked against the local mirror first, so that a
    /// refusal is found before the round trip, then applied to the mirror.
    async fn write(
        &self,
        held: &Held,
        snapshot: &mut Snapshot,
        fence: u64,
        changes: Vec<Change>,
    ) -> Result<(), Failure> {
        if changes.is_empty() {
            return Ok(());
        }
        // Only the touched tasks are copied, so a write's cost does not grow
        // with the plan.
        let mut after = snapshot.subset(Change::touched(&changes).as_ref());
        after.check(fence, &changes).map_err(|e| {
            Failure::Other(Error::Backend {
                during: "checking a store write",
                source: e,
            })
        })?;
        self.retry("writing to the store", || {
            self.store.apply(&self.service, fence, &changes)
        })
        .await
        .map_err(|e| self.lost_or(held, e))?;
        snapshot.absorb(after);
        Ok(())
    }

    fn lost_or(&self, held: &Held, e: Error) -> Failure {
        match e {
            Error::Backend {
                source: source @ (BackendError::StaleFence { .. } | BackendError::LeaseLost(_)),
                during,
            } => {
                let reason = format!("{during}: {source}");
                held.lose(reason.clone());
                Failure::Lost(reason)
            }
            other => Failure::Other(other),
        }
    }
}

fn finish(
    task: &Task,
    attempt: u32,
    state: AttemptState,
    error: Option<String>,
    duration: Duration,
) -> Change {
    Change::Finish(FinishAttempt {
        key: task.key().clone(),
        attempt,
        state,
        error,
        duration,
    })
}

enum Failure {
    Lost(String),
    Task,
    Other(Error),
}

enum Ran {
    Ok,
    Failed(String),
    Cancelled(String),
}

/// The lease while this node holds it, shared with the renewal task.
struct Held {
    lease: Mutex<Lease>,
    lost: CancellationToken,
    reason: Mutex<Option<String>>,
}

impl Held {
    fn fence(&self) -> u64 {
        self.lease.lock().unwrap_or_else(|p| p.into_inner()).fence
    }

    fn lose(&self, reason: String) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        drop(r);
        self.lost.cancel();
    }

    fn lost_reason(&self) -> Option<String> {
        if !self.lost.is_cancelled() {
            return None;
        }
        let r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        Some(r.clone().unwrap_or_else(|| "the lease was lost".into()))
    }
}

/// Step 5: renew every `renew_every`; at the local deadline (last successful
/// renewal + TTL - margin, on the monotonic clock) or on refusal, mark the
/// lease lost, which cancels the running task.
async fn renew_loop(lock: Arc<dyn Lock>, held: Arc<Held>, config: Config) {
    let budget = config.ttl - config.margin;
    let mut deadline = Instant::now() + budget;
    let mut next = Instant::now() + config.renew_every;
    loop {
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(next.min(deadline)) => {}
            _ = held.lost.cancelled() => return,
        }
        if Instant::now() >= deadline {
            warn!("lease not renewed before its local deadline; cancelling the running task");
            held.lose(format!(
                "the lease was not renewed within {budget:?} (ttl {:?} minus safety margin {:?})",
                config.ttl, config.margin
            ));
            return;
        }
        let current = held.lease.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sent = Instant::now();
        match tokio::time::timeout_at(deadline, lock.renew(&current)).await {
            Ok(Ok(renewed)) => {
                debug!(fence = renewed.fence, "lease renewed");
                *held.lease.lock().unwrap_or_else(|p| p.into_inner()) = renewed;
                deadline = sent + budget;
                next = sent + config.renew_every;
            }
            Ok(Err(e)) if e.is_transient() => {
                warn!(error = %e, "renewing the lease failed; retrying before the deadline");
                next = Instant::now() + (config.renew_every / 4).max(Duration::from_millis(10));
            }
            Ok(Err(e)) => {
                warn!(error = %e, "renewal refused; cancelling the running task");
                held.lose(format!("renewal refused: {e}"));
                return;
            }
            Err(_) => {
                // The deadline passed while renewing: the top of the loop says so.
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Releases the lease if the run is dropped while holding it (the caller
/// cancelled `run()`): the release is spawned, since drop cannot await.
struct ReleaseGuard {
    lock: Arc<dyn Lock>,
    held: Arc<Held>,
    armed: bool,
}

impl Drop for ReleaseGuard {
    fn drop(&mut self) {
        if !self.armed || self.held.lost.is_cancelled() {
            return;
        }
        let lease = self
            .held
            .lease
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.held.lose("the run was cancelled".into());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let lock = self.lock.clone();
            handle.spawn(async move {
                if let Err(e) = lock.release(&lease).await {
                    warn!(error = %e, "releasing the lease of a cancelled run failed; it expires within its TTL");
                }
            });
        }
    }
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
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
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
