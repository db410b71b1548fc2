//! Steps 1 and 2: read without a lock, become READY at once when there is
//! nothing to do, otherwise acquire the lease or wait (bounded) while another
//! node works.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, info_span, warn, Instrument};

use super::settings::DataAheadPolicy;
use super::task::error_chain;
use super::{Inner, Outcome};
use tokio_util::sync::CancellationToken;

use crate::backend::{Acquire, BackendError, Lease, LeaseInfo, Notice, Snapshot};
use crate::error::{Error, OrNone, Report};
use crate::metrics;
use crate::planner::Plan;
use crate::status::Status;
use crate::util::jitter;

/// How far above its own fence the store is claimed when the lock is seen
/// behind it. Above every fence the forgetful lock can grant before a node
/// raises it (it counts up from where it lost its state), and above any it
/// granted without a claim before it forgot (a holder paused between its
/// grant and its claim is then refused by the store when it resumes).
/// Fences are 63-bit: the gap costs nothing.
const CATCH_UP_GAP: u64 = 1 << 20;

/// How long may pass between the reply to the read a request for the lease
/// rests on and that request. When more did (the lock's preparation opened
/// a connection, the node stalled, a TTL was waited out), the store is read
/// again first, once: another node may have finished the upgrade in the
/// meantime, and a node that asked anyway would be granted the lease only to
/// find nothing left to do. A request sent as soon as the read's reply
/// arrives is well within it.
const FRESH: Duration = Duration::from_millis(2);

/// How start-up ended.
pub(super) enum Start {
    /// READY without the lease.
    Ready(Outcome),
    /// This node holds the lease, asked for at `sent`; `snapshot` is the
    /// last read before it.
    Granted {
        lease: Lease,
        sent: Instant,
        snapshot: Snapshot,
    },
}

impl Inner {
    /// Step 1: preflight without a lock, and READY at once when there is
    /// nothing to do; step 2: acquire, or wait while another node works.
    pub(super) async fn start(&self, stop: &CancellationToken) -> Result<Start, Error> {
        let known = self.store.notice(&self.service);
        let snapshot = self.load().await?;
        let read_at = Instant::now();
        let plan = self.plan(&snapshot);
        self.preflight(&snapshot, &plan)?;
        if self.nothing_to_do(&snapshot, &plan) {
            return Ok(Start::Ready(Outcome::UpToDate {
                data_version: snapshot.data_version,
            }));
        }
        info!(tasks = plan.steps.len(), data_version = %OrNone(snapshot.data_version.as_ref()),
            "upgrade needed; acquiring the lease");
        self.acquire(snapshot, read_at, known, stop).await
    }

    pub(super) fn nothing_to_do(&self, snapshot: &Snapshot, plan: &Plan) -> bool {
        plan.is_empty() && !self.needs_lease(snapshot)
    }

    /// Step 2: tries the lease until it is granted, the data reaches this
    /// version (another node did the work), or `max_wait` runs out.
    /// `known` is the holder's notice the store had received before
    /// `snapshot` was read: no notice to act on, since that read came after
    /// it and found work to do.
    async fn acquire(
        &self,
        mut snapshot: Snapshot,
        mut read_at: Instant,
        mut known: Option<Notice>,
        stop: &CancellationToken,
    ) -> Result<Start, Error> {
        let started = Instant::now();
        let deadline = started + self.config.max_wait;
        let mut last_holder = None;
        let mut last_seen: Option<LeaseInfo> = None;
        let mut wait = metrics::Wait::new(&self.service);
        let mut catch_ups = 0;
        // Whether `snapshot` may be read again before the next request: not
        // when it was read for that very reason (a slow store would
        // otherwise be read for ever), nor right after a wake-up.
        let mut may_reread = true;
        // The last answer was `StoreMoved`: the lock found the lease free but
        // the store moved since `snapshot` was read. It is read again before
        // the next request, whatever `may_reread` says (the lock answers so
        // once per read).
        let mut moved = false;
        if let Err(e) = self.lock.prepare_wait(&self.service).await {
            debug!(error = %error_chain(&e), "getting ready to wait failed; asking for the lease anyway");
        }
        loop {
            if stop.is_cancelled() {
                wait.end("stopped");
                return Err(self.stopped());
            }
            if moved || (may_reread && read_at.elapsed() > FRESH) {
                if let Some(ready) = self.noticed(&snapshot, &known, &last_holder, started) {
                    wait.end("ready");
                    return Ok(ready);
                }
                known = self.store.notice(&self.service);
                snapshot = self.load().await?;
                read_at = Instant::now();
                may_reread = false;
                if let Some(ready) = self.done_meanwhile(&snapshot, &last_holder, started)? {
                    info!(data_version = %OrNone(snapshot.data_version.as_ref()),
                        "another node brought the data to this version before this node asked for the lease");
                    wait.end("ready");
                    return Ok(ready);
                }
            }
            let (acquired, sent) = self.try_acquire().await?;
            let moved_before = std::mem::replace(&mut moved, acquired == Acquire::StoreMoved);
            let seen = match acquired {
                Acquire::StoreMoved => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(self.wait_timed_out(&mut wait, last_holder, started));
                    }
                    if moved_before {
                        // Twice in a row, with a read between: the store keeps
                        // moving under a free lease (or the lock keeps saying
                        // so). Poll rather than spin, within `max_wait`.
                        let nap = jitter(self.config.poll).min(deadline - now);
                        tokio::select! {
                            _ = tokio::time::sleep(nap) => {}
                            _ = stop.cancelled() => {
                                wait.end("stopped");
                                return Err(self.stopped());
                            }
                        }
                    }
                    debug!("the lease is free, but the store moved since it was read; reading it again before asking");
                    continue;
                }
                Acquire::Granted(lease) if self.behind(&lease, &mut snapshot).await? => {
                    self.catch_up_fence(lease, &snapshot, &mut catch_ups, stop)
                        .await?;
                    may_reread = true;
                    continue;
                }
                Acquire::Granted(lease) => {
                    info!(fence = lease.fence, "lease acquired");
                    metrics::lease_granted(&lease, last_seen.as_ref());
                    wait.end("granted");
                    return Ok(Start::Granted {
                        lease,
                        sent,
                        snapshot,
                    });
                }
                Acquire::Held(info) if info.holder == self.holder => {
                    // The reply to this node's own grant was lost, and a retry
                    // found the lease held by this very run: take it up with a
                    // renewal rather than wait on ourselves until it expires.
                    if let Some((lease, sent)) = self.adopt(&info).await? {
                        if self.behind(&lease, &mut snapshot).await? {
                            self.catch_up_fence(lease, &snapshot, &mut catch_ups, stop)
                                .await?;
                            may_reread = true;
                            continue;
                        }
                        info!(
                            fence = lease.fence,
                            "lease acquired (the reply to the grant was lost)"
                        );
                        metrics::lease_granted(&lease, None);
                        wait.end("granted");
                        return Ok(Start::Granted {
                            lease,
                            sent,
                            snapshot,
                        });
                    }
                    continue;
                }
                Acquire::Held(info) => info,
            };
            last_seen = Some(seen.clone());
            wait.begin();
            if last_holder.as_ref() != Some(&seen.holder) {
                info!(holder = %seen.holder, fence = seen.fence, "lease held by another node; waiting");
                self.status.send_replace(Status::Waiting {
                    holder: Some(seen.holder.clone()),
                });
                last_holder = Some(seen.holder.clone());
            }
            loop {
                let now = Instant::now();
                if now >= deadline {
                    return Err(self.wait_timed_out(&mut wait, last_holder, started));
                }
                tokio::select! {
                    _ = self.wait_for_change(&seen, deadline - now) => {}
                    _ = stop.cancelled() => {
                        wait.end("stopped");
                        return Err(self.stopped());
                    }
                }
                if let Some(ready) = self.noticed(&snapshot, &known, &last_holder, started) {
                    wait.end("ready");
                    return Ok(ready);
                }
                known = self.store.notice(&self.service);
                snapshot = self.load().await?;
                read_at = Instant::now();
                may_reread = false;
                if let Some(ready) = self.done_meanwhile(&snapshot, &last_holder, started)? {
                    wait.end("ready");
                    return Ok(ready);
                }
                if self.lock.notifies() || !self.still_held(&seen).await {
                    break;
                }
            }
        }
    }

    /// READY, if another node has done the work by the read `snapshot`:
    /// this node waited since `started` and never took the lease.
    fn done_meanwhile(
        &self,
        snapshot: &Snapshot,
        holder: &Option<crate::ids::Holder>,
        started: Instant,
    ) -> Result<Option<Start>, Error> {
        let plan = self.plan(snapshot);
        if !self.nothing_to_do(snapshot, &plan) {
            return Ok(None);
        }
        self.preflight(snapshot, &plan)?;
        Ok(Some(Start::Ready(Outcome::WaitedForOther {
            holder: holder.clone(),
            data_version: snapshot.data_version.clone(),
            waited: started.elapsed(),
        })))
    }

    /// READY without a read, if the store has received a holder's notice
    /// ([`Notice`]) with this runner's plan digest since `known`, the notice
    /// it held before `snapshot`, this node's last read, was read, and
    /// written under a fence at least that read's. That read found work to
    /// do, so the notice's write committed after it: the notice describes a
    /// newer state, in which this node has nothing to do. A notice held
    /// before the read is never taken (the store may have gone back since,
    /// restored from a backup).
    fn noticed(
        &self,
        snapshot: &Snapshot,
        known: &Option<Notice>,
        holder: &Option<crate::ids::Holder>,
        started: Instant,
    ) -> Option<Start> {
        let notice = self.store.notice(&self.service)?;
        if known.as_ref() == Some(&notice)
            || notice.fence < snapshot.fence
            || notice.plan != self.digest()
        {
            return None;
        }
        info!(fence = notice.fence, data_version = %OrNone(notice.data_version.as_ref()),
            "the lease holder's last write brought the data to this version; READY without reading the store");
        Some(Start::Ready(Outcome::WaitedForOther {
            holder: holder.clone(),
            data_version: notice.data_version,
            waited: started.elapsed(),
        }))
    }

    /// Whether `lease` carries a fence the store has already seen. With the
    /// lock apart from the store, `snapshot` is read again first: the read
    /// before the request may predate a claim that the lock has forgotten
    /// since (a grant of a lock that is its own store takes the store's fence
    /// into account in the same atomic operation).
    async fn behind(&self, lease: &Lease, snapshot: &mut Snapshot) -> Result<bool, Error> {
        if self.lock_apart && lease.fence > snapshot.fence {
            let now = match self.load().await {
                Ok(now) => now,
                Err(e) => {
                    // Nothing ran: give the lease back rather than let the
                    // others wait out its TTL.
                    let _ = self.lock.release(lease).await;
                    return Err(e);
                }
            };
            if now.fence > snapshot.fence {
                *snapshot = now;
            }
        }
        Ok(lease.fence <= snapshot.fence)
    }

    /// A grant whose fence the store has already seen: the lock is behind
    /// the store. No node can have been granted that fence legitimately
    /// after the store saw it, so the lock is new in front of a used store,
    /// or it lost its state (a Redis restarted without its data) and with
    /// it, perhaps, the live lease of a holder that is still running its
    /// task. So, before anything runs:
    /// 1. claim the store with a fence at least [`CATCH_UP_GAP`] above its own
    ///    (unless it is barred already): from
    ///    then on every fence the forgetful lock grants is behind the store,
    ///    however far its counter climbs, and a holder whose lease it forgot
    ///    is refused at its next write;
    /// 2. give the useless lease back and wait one TTL from its reply: such a
    ///    holder stops by then (its local deadline falls within a TTL of its
    ///    last renewal, which was sent before the lock forgot it);
    /// 3. raise the lock's counter to the store's fence and ask again,
    ///    unless another node has claimed the store above this node's bar
    ///    since (it caught the lock up already).
    ///
    /// Until some node has waited a whole TTL, nobody raises the counter, so
    /// every grant is behind the store and waits in the same way.
    async fn catch_up_fence(
        &self,
        lease: Lease,
        snapshot: &Snapshot,
        catch_ups: &mut u32,
        stop: &CancellationToken,
    ) -> Result<(), Error> {
        *catch_ups += 1;
        if *catch_ups > 10 {
            let _ = self.lock.release(&lease).await;
            return Err(Error::Backend {
                during: "catching the lock's fence up with the store",
                source: BackendError::Rejected(format!(
                    "the lock granted a fence the store had already seen {} times in a row \
                     (fence {} against the store's {}): it does not keep the floor \
                     `raise_fence` sets, or it keeps losing its state",
                    *catch_ups - 1,
                    lease.fence,
                    snapshot.fence
                )),
            });
        }
        let wait_out = if self.config.skip_wait_out {
            Duration::ZERO
        } else {
            self.config.ttl
        };
        // From the reply, not the request: the lock forgot before it
        // granted, which may be any time up to the reply.
        let until = Instant::now() + wait_out;
        // A multiple of the gap: nodes that see the same store (or one already
        // barred) bar it at the same fence, so that their bars do not pass
        // each other's, and a fence above a bar is a claim under a lock that
        // was caught up.
        let bar = if snapshot.fence > 0 && snapshot.fence.is_multiple_of(CATCH_UP_GAP) {
            snapshot.fence
        } else {
            (snapshot.fence / CATCH_UP_GAP + 2).saturating_mul(CATCH_UP_GAP)
        };
        warn!(granted = lease.fence, store_fence = snapshot.fence, ?wait_out,
            "the lock granted a fence the store has already seen: it is new in front of a used store, \
             or it lost its state and perhaps a live lease; raising the store's fence, waiting one TTL, \
             then raising the lock's fence and asking again");
        let barred = match self
            .retry("raising the store's fence above a lock behind it", || {
                self.store.claim(&self.service, bar)
            })
            .await
        {
            // A newer claim came first: it bars the lock as well.
            Ok(_)
            | Err(Error::Backend {
                source: BackendError::StaleFence { .. },
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        };
        match self
            .retry("releasing a lease behind the store's fence", || {
                self.lock.release(&lease)
            })
            .await
        {
            Ok(())
            | Err(Error::Backend {
                source: BackendError::LeaseLost(_),
                ..
            }) => {}
            Err(e) => return Err(e),
        }
        barred?;
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            _ = stop.cancelled() => return Ok(()),
        }
        let now = self.load().await?;
        if now.fence > bar {
            // Another node has caught the lock up and claimed the store
            // since: raising now could hide a loss of the lock's state that
            // came after its grant.
            return Ok(());
        }
        self.retry(
            "raising the lock's fence to the store's (the lock granted a fence the store has already seen)",
            || self.lock.raise_fence(&self.service, now.fence),
        )
        .await
    }

    /// Renews a lease this run was granted without hearing so. `None` if it
    /// expired meanwhile: the next try asks afresh.
    async fn adopt(&self, info: &LeaseInfo) -> Result<Option<(Lease, Instant)>, Error> {
        let lease = Lease {
            service: self.service.clone(),
            holder: self.holder.clone(),
            fence: info.fence,
            expires_at_ms: info.expires_at_ms,
            ttl: self.config.ttl,
        };
        // Counted from before the attempt that got the reply: an earlier
        // attempt that failed may have renewed too, but only to an earlier
        // expiry.
        let mut sent = Instant::now();
        match self
            .retry("renewing a lease granted without a reply", || {
                sent = Instant::now();
                self.lock.renew(&lease)
            })
            .await
        {
            Ok(lease) => Ok(Some((lease, sent))),
            Err(Error::Backend {
                source: BackendError::LeaseLost(_),
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The error of a wait since `started` that reached `max_wait`, the
    /// lease last seen held by `holder`.
    fn wait_timed_out(
        &self,
        wait: &mut metrics::Wait<'_>,
        holder: Option<crate::ids::Holder>,
        started: Instant,
    ) -> Error {
        wait.end("timeout");
        Error::WaitTimeout {
            service: self.service.clone(),
            holder,
            waited: started.elapsed(),
        }
    }

    /// The error of a run stopped before it held the lease.
    fn stopped(&self) -> Error {
        Error::Stopped {
            report: Box::new(Report {
                service: self.service.clone(),
                ..Report::default()
            }),
        }
    }

    /// Asks for the lease, and says when the request that got the reply was
    /// sent. The local deadline of a grant counts from then: the grant may
    /// have happened any time after. Not from the first of the retries,
    /// though: a try whose reply was lost and that granted the lease leaves
    /// it live, so a later try reports it held (by this run) rather than
    /// granting it; a `Granted` reply is always the grant of its own request.
    async fn try_acquire(&self) -> Result<(Acquire, Instant), Error> {
        let mut sent = Instant::now();
        let acquired = self
            .retry("acquiring the lease", || {
                sent = Instant::now();
                self.lock
                    .try_acquire(&self.service, &self.holder, self.config.ttl)
            })
            .instrument(info_span!("upsilon.acquire"))
            .await?;
        Ok((acquired, sent))
    }

    /// Whether a poll finds the lease `seen` still standing: the same holder
    /// and fence, unexpired, and not yet open to a takeover. A request for
    /// it would then be refused, so a polling node waits again after this
    /// one read instead of asking (a request costs a transaction of several
    /// statements on most stores). Any error answers no, and the node asks.
    async fn still_held(&self, seen: &LeaseInfo) -> bool {
        match self.lock.current(&self.service).await {
            Ok(Some(now)) => now.holder == seen.holder && now.fence == seen.fence,
            Ok(None) => false,
            Err(e) => {
                debug!(error = %error_chain(&e), "reading the lease failed; reading the store");
                false
            }
        }
    }

    /// Waits, at most `left`, for the lease `seen` to change: for the lock's
    /// notification, or a jittered poll where it has none.
    async fn wait_for_change(&self, seen: &LeaseInfo, left: Duration) {
        let nap = if self.lock.notifies() {
            // Nothing changes before a notification but the lease running
            // out: sleep until its expiry (a renewal moves it, and the next
            // try sees the new one).
            let expires_in = seen.expires_at_ms.saturating_sub(seen.now_ms).max(0) as u64;
            Duration::from_millis(expires_in).saturating_add(jitter(Duration::from_millis(50)))
        } else {
            jitter(self.config.poll)
        }
        .min(left);
        if let Err(e) = self.lock.wait(&self.service, seen, nap).await {
            debug!(error = %error_chain(&e), "waiting for a lease change failed; polling instead");
            tokio::time::sleep(nap).await;
        }
    }

    /// The checks made on every read the runner plans from: the data-ahead
    /// policy, and the tasks added out of order.
    pub(super) fn preflight(&self, snapshot: &Snapshot, plan: &Plan) -> Result<(), Error> {
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
}
