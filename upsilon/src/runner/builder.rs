//! The builder: every setting, and the checks that refuse settings that make
//! no sense before anything is read or written.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use semver::Version;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::warn;

use super::settings::{AboveAppPolicy, Config, DataAheadPolicy, RetryPolicy};
use super::{Inner, Upsilon};
use crate::backend::{expiry, Backend, Lock, Store};
use crate::context::Resources;
use crate::error::Error;
use crate::ids::Holder;
use crate::registry::{Registry, Task};
use crate::status::Status;
use crate::version::parse_version;

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
    /// A builder with the defaults.
    pub(super) fn new() -> Builder {
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

    /// The lock. It may come from another backend than the store (a lease in
    /// Redis or etcd, the data version in PostgreSQL): the store's own fence
    /// check keeps S1-S7. A lock that is new in front of a used store, or
    /// one that forgot its state, grants fences the store has seen; the
    /// runner then holds that grant unused for one TTL, raises the lock's
    /// fence above the store's (`Lock::raise_fence`) and asks again
    /// (docs/DESIGN.md, "Backends").
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

    /// A value tasks read with [`TaskContext::resource`](crate::TaskContext::resource).
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
    /// names (see the crate docs). The crate may be named as in Cargo.toml
    /// (`my-tasks`) or as in Rust (`my_tasks`).
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

    /// Negative control for fault tests: a grant whose fence the store has
    /// already seen is given back at once, without waiting out the TTL of a
    /// lease the lock may have forgotten. Breaks E1 on purpose; never use it
    /// outside a test of the test harness itself.
    #[cfg(feature = "_negative-controls")]
    pub fn skip_waiting_out_a_forgetful_lock(mut self) -> Self {
        self.config.skip_wait_out = true;
        self
    }

    /// Validates everything and builds the runner. Collects and validates the
    /// registry here, before any lock is taken.
    pub fn build(mut self) -> Result<Upsilon, Error> {
        let app = self.check_app_version()?;
        let (lock, store) = self.take_backend()?;
        check_service(&self.service)?;
        if !self.renew_set {
            self.config.renew_every = self.config.ttl / 3;
        }
        if !self.margin_set {
            self.config.margin = self.config.ttl / 5;
        }
        check_timing(&self.config)?;
        check_counts(&self.config)?;
        self.config.baseline = self.check_baseline(&app)?;
        let registry = match self.tasks.take() {
            Some(tasks) => Registry::new(tasks)?,
            None => Registry::collect()?,
        };
        if self.config.above_app == AboveAppPolicy::Error {
            registry.check_not_above(&app)?;
        }
        check_required_crates(&registry.crates(), &self.required_crates)?;
        // Only once every setting is known to be good.
        if self.config.above_app == AboveAppPolicy::Warn {
            warn_above_app(&registry, &app);
        }
        let (status, _) = watch::channel(Status::Starting);
        Ok(Upsilon {
            inner: Arc::new(Inner {
                service: self.service,
                app,
                lock_apart: !std::ptr::addr_eq(Arc::as_ptr(&lock), Arc::as_ptr(&store)),
                lock,
                store,
                registry,
                resources: Arc::new(self.resources),
                holder: self.holder.unwrap_or_else(Holder::current),
                status,
                config: self.config,
                digest: std::sync::OnceLock::new(),
            }),
        })
    }

    fn check_app_version(&self) -> Result<Version, Error> {
        let text = self.app_version.as_deref().ok_or_else(|| {
            Error::config(
                "app_version",
                "not set; call `.app_version(env!(\"CARGO_PKG_VERSION\"))`",
            )
        })?;
        parse_version(text).map_err(|e| Error::config("app_version", e.to_string()))
    }

    fn take_backend(&mut self) -> Result<LockAndStore, Error> {
        match (self.lock.take(), self.store.take()) {
            (Some(lock), Some(store)) => Ok((lock, store)),
            (None, None) => Err(Error::config(
                "backend",
                "not set; call `.backend(..)`, or `.lock(..)` and `.store(..)`",
            )),
            (None, Some(_)) => Err(Error::config(
                "lock",
                "not set; call `.backend(..)` or `.lock(..)`",
            )),
            (Some(_), None) => Err(Error::config(
                "store",
                "not set; call `.backend(..)` or `.store(..)`",
            )),
        }
    }

    fn check_baseline(&self, app: &Version) -> Result<Option<Version>, Error> {
        let Some(text) = &self.baseline else {
            return Ok(None);
        };
        let b = parse_version(text).map_err(|e| Error::config("baseline", e.to_string()))?;
        if &b > app {
            return Err(Error::config(
                "baseline",
                format!("{b} is above the app version {app}"),
            ));
        }
        Ok(Some(b))
    }
}

/// The lock and the store a runner works with.
type LockAndStore = (Arc<dyn Lock>, Arc<dyn Store>);

/// Service names, like table names, are allow-listed so that every backend
/// can use them as keys without quoting surprises.
fn check_service(service: &str) -> Result<(), Error> {
    let ok = !service.is_empty()
        && service.len() <= 63
        && service
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::config(
            "service",
            format!("{service:?} must be 1 to 63 characters of a-z, A-Z, 0-9, `_`, `-` and `.`"),
        ))
    }
}

/// The lease's timing: a TTL the clocks can hold, a margin inside it, and
/// renewals often enough that one can fail before the local deadline.
fn check_timing(c: &Config) -> Result<(), Error> {
    if c.ttl < Duration::from_millis(100) {
        return Err(Error::config(
            "ttl",
            format!(
                "{:?} is too short; use at least 100 ms (seconds in production)",
                c.ttl
            ),
        ));
    }
    let backend_clock = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .unwrap_or(i64::MAX);
    if !fits_clocks(c.ttl) || expiry(backend_clock, c.ttl.saturating_mul(2)).is_err() {
        return Err(Error::config(
            "ttl",
            format!(
                "{:?} is too long to add to a clock; a dead holder's lease is taken over only once it expires, so keep it to seconds",
                c.ttl
            ),
        ));
    }
    if c.margin >= c.ttl {
        return Err(Error::config(
            "safety_margin",
            format!("{:?} must be shorter than the ttl {:?}", c.margin, c.ttl),
        ));
    }
    let budget = c.ttl - c.margin;
    // A renewal that fails must leave time for another before the deadline.
    let longest = budget / 2;
    if c.renew_every.is_zero() {
        return Err(Error::config("renew_every", "must not be zero"));
    }
    if c.renew_every >= c.ttl {
        return Err(Error::config(
            "renew_every",
            format!(
                "{:?} is not shorter than the ttl {:?}, so the lease would lapse between renewals; renew at most every (ttl - safety margin) / 2, {longest:?} here",
                c.renew_every, c.ttl
            ),
        ));
    }
    if c.renew_every > longest {
        return Err(Error::config(
            "renew_every",
            format!(
                "{:?} leaves no room for a failed renewal before the local deadline (ttl {:?} minus safety margin {:?}); renew at most every (ttl - safety margin) / 2, {longest:?} here",
                c.renew_every, c.ttl, c.margin
            ),
        ));
    }
    if !fits_clocks(c.max_wait) {
        return Err(Error::config(
            "max_wait",
            format!(
                "{:?} is too long to add to a clock; to wait for as long as it takes, use a long but finite wait, such as a day",
                c.max_wait
            ),
        ));
    }
    if c.poll.is_zero() {
        return Err(Error::config("poll_interval", "must not be zero"));
    }
    if !fits_clocks(c.poll) {
        return Err(Error::config(
            "poll_interval",
            format!("{:?} is too long to add to a clock", c.poll),
        ));
    }
    if !fits_clocks(c.retry.max_backoff) {
        return Err(Error::config(
            "retry",
            format!(
                "max_backoff {:?} is too long to add to a clock",
                c.retry.max_backoff
            ),
        ));
    }
    Ok(())
}

/// Whether the runner can add `d` to its monotonic clock, with room to spare:
/// a run starts later than its build, and jitter stretches a wait by up to
/// half.
fn fits_clocks(d: Duration) -> bool {
    d.checked_mul(2)
        .and_then(|room| Instant::now().checked_add(room))
        .is_some()
}

fn check_counts(c: &Config) -> Result<(), Error> {
    if c.retry.max_attempts == 0 {
        return Err(Error::config("retry", "max_attempts must be at least 1"));
    }
    if c.backend_attempts == 0 {
        return Err(Error::config("backend_attempts", "must be at least 1"));
    }
    Ok(())
}

/// The guard against the linker dropping a task library the binary never
/// names. A crate may be named as Cargo does (`my-tasks`) or as Rust does
/// (`my_tasks`).
fn check_required_crates(
    crates: &BTreeMap<String, usize>,
    required: &[String],
) -> Result<(), Error> {
    for asked in required {
        // Module paths, and so the registry, use the Rust name.
        let name = asked.replace('-', "_");
        if !crates.contains_key(&name) {
            return Err(Error::config(
                "require_tasks_from",
                format!(
                    "no task from crate `{name}` is registered in this binary; the linker drops a crate's tasks when nothing refers to it: add `use {name} as _;` to the binary (tasks found from: {})",
                    if crates.is_empty() {
                        "no crate".to_owned()
                    } else {
                        crates.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                ),
            ));
        }
    }
    Ok(())
}

/// Warns that tasks above the app version are left out, once per process
/// for each app version and set of tasks: a binary that holds several
/// versions' tasks may build a runner more than once.
fn warn_above_app(registry: &Registry, app: &Version) {
    let above: Vec<String> = registry
        .above(app)
        .map(|t| format!("{} ({})", t.key(), t.location()))
        .collect();
    if above.is_empty() {
        return;
    }
    static WARNED: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());
    let mut key = DefaultHasher::new();
    (app, &above).hash(&mut key);
    let first = WARNED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key.finish());
    if first {
        warn!(app_version = %app, tasks = %above.join(", "),
            "{} task(s) have a version above the app version; they are left out of the plan \
             (`.tasks_above_app(AboveAppPolicy::Ignore)` leaves them out silently)",
            above.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_required_crate_is_found_by_its_cargo_or_rust_name() {
        let crates = BTreeMap::from([("my_tasks".to_owned(), 2)]);
        for name in ["my_tasks", "my-tasks"] {
            check_required_crates(&crates, &[name.to_owned()]).unwrap();
        }
        let err = check_required_crates(&crates, &["other-tasks".to_owned()]).unwrap_err();
        let Error::Config { setting, problem } = err else {
            panic!("{err}")
        };
        assert_eq!(setting, "require_tasks_from");
        assert!(
            problem.starts_with("no task from crate `other_tasks` is registered"),
            "{problem}"
        );
        assert!(problem.contains("add `use other_tasks as _;`"), "{problem}");
        assert!(problem.contains("tasks found from: my_tasks"), "{problem}");
    }
}
