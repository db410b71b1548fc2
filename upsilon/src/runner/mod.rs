//! The runner: steps 1-7 of the protocol, one file per stage.
//!
//! - [`builder`]: the settings and their checks, before anything is read;
//! - [`start`]: steps 1 and 2, the read without a lock, the fast path, the
//!   bounded wait and the acquire;
//! - [`hold`]: steps 3, 4 and 6 under the lease, and the rollbacks;
//! - [`lease`]: step 5, renewal and the local deadline, and step 7, the
//!   release on every path;
//! - [`task`]: one task's run, its cancellation and its panics.

mod builder;
mod hold;
mod lease;
mod notice;
mod outcome;
mod settings;
mod start;
mod task;

use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use semver::Version;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

use crate::backend::{BackendError, Lock, PlanDigest, Snapshot, Store};
use crate::context::Resources;
use crate::error::Error;
use crate::ids::Holder;
use crate::planner::{self, Plan};
use crate::registry::Registry;
use crate::status::{Probe, Status};
use crate::util::jitter;

pub use builder::Builder;
pub use outcome::Outcome;
pub use settings::{AboveAppPolicy, DataAheadPolicy, RetryPolicy};

use settings::Config;
use start::Start;
use task::error_chain;

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
    /// The lock and the store are different objects (`Builder::lock` and
    /// `Builder::store`), so a grant cannot have seen the store's fence.
    lock_apart: bool,
    registry: Registry,
    resources: Arc<Resources>,
    holder: Holder,
    status: watch::Sender<Status>,
    config: Config,
    /// The digest of what this runner's plans depend on besides the store,
    /// made when first needed (a waiting node's wake-up, a holder's last
    /// write), never on the start-up path.
    digest: OnceLock<PlanDigest>,
}

impl Upsilon {
    /// A builder with the defaults.
    pub fn builder() -> Builder {
        Builder::new()
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
        self.run_until(std::future::pending()).await
    }

    /// [`Upsilon::run`], stopping cleanly when `stop` completes (a pod being
    /// terminated: pass [`shutdown_signal`]). A node that holds the lease
    /// then cancels its running task, records the attempt as cancelled,
    /// releases the lease, so that the next node takes over at once rather
    /// than after the TTL, and returns [`Error::Stopped`]. A waiting node
    /// stops waiting.
    ///
    /// ```no_run
    /// # async fn demo(upsilon: upsilon::Upsilon) {
    /// match upsilon.run_until(upsilon::shutdown_signal()).await {
    ///     Ok(outcome) => println!("{outcome}"),
    ///     Err(upsilon::Error::Stopped { .. }) => std::process::exit(0),
    ///     Err(e) => eprintln!("{e}"),
    /// }
    /// # }
    /// ```
    pub async fn run_until(&self, stop: impl Future<Output = ()> + Send) -> Result<Outcome, Error> {
        let token = CancellationToken::new();
        let run = self.run_with(&token);
        tokio::pin!(run);
        tokio::pin!(stop);
        let mut stop_fired = false;
        loop {
            tokio::select! {
                result = &mut run => return result,
                _ = &mut stop, if !stop_fired => {
                    stop_fired = true;
                    token.cancel();
                    crate::metrics::stopped(&self.inner.service);
                }
            }
        }
    }

    async fn run_with(&self, stop: &CancellationToken) -> Result<Outcome, Error> {
        let inner = &self.inner;
        let span = info_span!("upsilon.run", service = %inner.service, app_version = %inner.app,
            holder = %inner.holder);
        async {
            inner.status.send_replace(Status::Starting);
            let result = inner.run(stop).await;
            crate::metrics::run_finished(&inner.service, &result);
            match &result {
                Ok(outcome) => {
                    info!(%outcome, "ready");
                    inner.status.send_replace(Status::Ready {
                        data_version: outcome.data_version().cloned(),
                    });
                }
                Err(e) => {
                    let error = error_chain(e);
                    error!(%error, "upgrade did not complete; the node is not ready");
                    inner.status.send_replace(Status::Failed { error });
                }
            }
            result
        }
        .instrument(span)
        .await
    }
}

/// Resolves when the process is asked to terminate: SIGTERM (Kubernetes
/// stopping a pod) or SIGINT (Ctrl-C). For [`Upsilon::run_until`].
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
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
    /// Steps 1-7: start up, and hold the lease if this node is granted it.
    async fn run(&self, stop: &CancellationToken) -> Result<Outcome, Error> {
        match self.start(stop).await? {
            Start::Ready(outcome) => Ok(outcome),
            Start::Granted {
                lease,
                sent,
                snapshot,
            } => {
                let granted = tokio::time::Instant::now();
                let result = self.hold(lease, sent, snapshot, stop).await;
                crate::metrics::upgrade_finished(&self.service, granted.elapsed(), &result);
                result
            }
        }
    }

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
                    warn!(error = %error_chain(&e), attempt, ?wait, "{during}: transient backend error, retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(source) => return Err(Error::Backend { during, source }),
            }
        }
    }
}
