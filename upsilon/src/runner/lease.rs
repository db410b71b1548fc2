//! Steps 5 and 7: keeping the lease (renewal, the local deadline) and
//! releasing it on every path.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use super::settings::Config;
use super::task::error_chain;
use super::Inner;
use crate::backend::{Lease, Lock};
use crate::error::LeaseLoss;

/// The lease while this node holds it: renewed in the background, and
/// released when the run ends or is dropped.
pub(super) struct Keeper {
    held: Arc<Held>,
    renewer: AbortOnDrop,
    watcher: AbortOnDrop,
    guard: ReleaseGuard,
}

impl Keeper {
    /// Starts keeping `lease`, whose request was sent at `sent` (step 5):
    /// renewing it, and watching for the backend's loss signal and for a
    /// request to stop.
    pub(super) fn start(
        lock: Arc<dyn Lock>,
        lease: Lease,
        sent: Instant,
        config: &Config,
        stop: CancellationToken,
    ) -> Keeper {
        let fence = lease.fence;
        let held = Arc::new(Held {
            lease: Mutex::new(lease.clone()),
            lost: CancellationToken::new(),
            reason: Mutex::new(None),
        });
        if Instant::now() >= sent + (config.ttl - config.margin) {
            // The reply came after the local deadline: nothing may run.
            warn!("the grant's reply came after the lease's local deadline; giving it up");
            held.lose(LeaseLoss::Deadline {
                ttl: config.ttl,
                margin: config.margin,
            });
        }
        let renewer = AbortOnDrop(tokio::spawn(
            renew_loop(lock.clone(), held.clone(), sent, config.clone())
                .instrument(info_span!("upsilon.renew", fence)),
        ));
        let watcher = AbortOnDrop(tokio::spawn(
            watch(lock.clone(), held.clone(), lease, stop)
                .instrument(info_span!("upsilon.watch", fence)),
        ));
        let guard = ReleaseGuard {
            lock,
            held: held.clone(),
            armed: true,
        };
        Keeper {
            held,
            renewer,
            watcher,
            guard,
        }
    }

    pub(super) fn held(&self) -> &Arc<Held> {
        &self.held
    }
}

impl Inner {
    /// Step 7: stops renewing and releases the lease, unless it was lost (it
    /// is another node's then, or expires by itself).
    pub(super) async fn release(&self, keeper: Keeper) {
        let Keeper {
            held,
            renewer,
            watcher,
            mut guard,
        } = keeper;
        drop((renewer, watcher));
        guard.armed = false;
        if matches!(held.halt(), Some(Halt::Lost(_))) {
            return;
        }
        let current = held.lease.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let released = self
            .retry("releasing the lease", || self.lock.release(&current))
            .instrument(info_span!("upsilon.release", fence = current.fence))
            .await;
        match released {
            Ok(()) => info!(fence = current.fence, "lease released"),
            Err(e) => warn!(error = %error_chain(&e), "the lease stays until its TTL runs out"),
        }
    }
}

/// Why the work under the lease halts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Halt {
    /// The lease is, or may be, another node's.
    Lost(LeaseLoss),
    /// The run was asked to stop; the lease is still this node's, to release.
    Stopped,
}

/// The lease while this node holds it, shared with the renewal task.
pub(super) struct Held {
    lease: Mutex<Lease>,
    /// Cancelled when the work must halt; the running task's token is a child.
    pub(super) lost: CancellationToken,
    reason: Mutex<Option<Halt>>,
}

impl Held {
    pub(super) fn fence(&self) -> u64 {
        self.lease.lock().unwrap_or_else(|p| p.into_inner()).fence
    }

    /// Marks the lease lost, which cancels the running task. The first
    /// reason given stays.
    pub(super) fn lose(&self, reason: LeaseLoss) {
        self.halt_with(Halt::Lost(reason));
    }

    /// Halts the work to stop the run, which cancels the running task.
    pub(super) fn stop(&self) {
        self.halt_with(Halt::Stopped);
    }

    fn halt_with(&self, halt: Halt) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            if let Halt::Lost(reason) = &halt {
                let lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
                crate::metrics::lease_lost(&lease.service, reason);
            }
            *r = Some(halt);
        }
        drop(r);
        self.lost.cancel();
    }

    /// Why the work halts, once it does.
    pub(super) fn halt(&self) -> Option<Halt> {
        if !self.lost.is_cancelled() {
            return None;
        }
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until the work must halt, and says why.
    pub(super) async fn halted(&self) -> Halt {
        self.lost.cancelled().await;
        match self.halt() {
            Some(reason) => reason,
            // Cancelled without a reason only while the run itself is
            // dropped (see `ReleaseGuard`): nothing waits for this any more.
            None => std::future::pending().await,
        }
    }
}

/// Step 5: renew every `renew_every`; at the local deadline (last successful
/// renewal + TTL - margin, on the monotonic clock) or on refusal, mark the
/// lease lost, which cancels the running task.
///
/// The first deadline counts from `sent`, when the grant was asked for: the
/// lease may have been granted any time after that, so a late reply must not
/// buy a full TTL.
async fn renew_loop(lock: Arc<dyn Lock>, held: Arc<Held>, sent: Instant, config: Config) {
    let budget = config.ttl - config.margin;
    let mut deadline = sent + budget;
    let mut next = sent + config.renew_every;
    loop {
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(next.min(deadline)) => {}
            _ = held.lost.cancelled() => return,
        }
        if Instant::now() >= deadline {
            warn!("lease not renewed before its local deadline; cancelling the running task");
            held.lose(LeaseLoss::Deadline {
                ttl: config.ttl,
                margin: config.margin,
            });
            return;
        }
        let current = held.lease.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sent = Instant::now();
        match tokio::time::timeout_at(deadline, lock.renew(&current)).await {
            Ok(Ok(renewed)) => {
                debug!(fence = renewed.fence, "lease renewed");
                crate::metrics::lease_renewed(&renewed.service);
                *held.lease.lock().unwrap_or_else(|p| p.into_inner()) = renewed;
                deadline = sent + budget;
                next = sent + config.renew_every;
            }
            Ok(Err(e)) if e.is_transient() => {
                crate::metrics::renewal_failed(&current.service, "transient");
                warn!(error = %error_chain(&e), "renewing the lease failed; retrying before the deadline");
                next = Instant::now() + (config.renew_every / 4).max(Duration::from_millis(10));
            }
            Ok(Err(e)) => {
                crate::metrics::renewal_failed(&current.service, "refused");
                warn!(error = %error_chain(&e), "renewal refused; cancelling the running task");
                held.lose(LeaseLoss::RenewalRefused {
                    detail: error_chain(&e),
                });
                return;
            }
            Err(_) => {
                crate::metrics::renewal_failed(&current.service, "timeout");
                // The deadline passed while renewing: the top of the loop says so.
            }
        }
    }
}

/// Halts the work the moment the backend signals that the lease may be gone
/// (E1: the task stops before another node can be granted the lease), or
/// when the run is asked to stop.
async fn watch(lock: Arc<dyn Lock>, held: Arc<Held>, lease: Lease, stop: CancellationToken) {
    tokio::select! {
        biased;
        _ = held.lost.cancelled() => {}
        e = lock.until_lost(&lease) => {
            let detail = error_chain(&e);
            warn!(error = %detail, "the backend says the lease may be gone; cancelling the running task");
            held.lose(LeaseLoss::Signalled { detail });
        }
        _ = stop.cancelled() => {
            info!("asked to stop; cancelling the running task and releasing the lease");
            held.stop();
        }
    }
}

/// Aborts the renewal task when dropped, whichever way the run ends.
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
        // The caller dropped the run: the running task's token fires, and no
        // one is left to read a reason.
        self.held.lost.cancel();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let lock = self.lock.clone();
            handle.spawn(async move {
                if let Err(e) = lock.release(&lease).await {
                    warn!(error = %error_chain(&e), "releasing the lease of a cancelled run failed; it expires within its TTL");
                }
            });
        }
    }
}
