//! The node binary's backend wrapper: every lease and store call passed
//! on, and recorded in the node's audit log ([`crate::audit`]) with when it
//! was sent, when it returned and its outcome; the loss signal passed on
//! unless a negative control switches it off.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use upsilon::backend::{
    Acquire, BackendError, Change, HistoryEntry, Lease, LeaseInfo, Lock, Notice, Snapshot, Store,
};
use upsilon::Holder;

use crate::audit::{AuditLog, Outcome as Seen, Record};
use crate::clock::now_us;

/// The backend as the runner sees it: every call passed on, the lease and
/// store calls recorded in the audit log (if there is one), and the loss
/// signal passed on unless it is switched off.
#[derive(Debug)]
pub struct Watched {
    pub lock: Arc<dyn Lock>,
    pub store: Arc<dyn Store>,
    pub log: Option<Arc<AuditLog>>,
    /// The node's holder: an acquire that finds it holding is a lost grant reply.
    pub holder: Holder,
    /// Off: the negative control's `--no-loss-signal`.
    pub loss_signal: bool,
}

fn seen(e: &BackendError) -> Seen {
    match e {
        BackendError::StaleFence { .. } => Seen::Stale,
        BackendError::LeaseLost(_) => Seen::Lost,
        BackendError::Rejected(_) => Seen::Rejected,
        e if e.is_transient() => Seen::Unavailable,
        _ => Seen::Other,
    }
}

fn what(changes: &[Change]) -> String {
    let names: Vec<String> = changes
        .iter()
        .map(|c| match c {
            Change::Start(s) => format!("start {} #{} {}", s.key.id, s.attempt, s.kind.as_str()),
            Change::Finish(f) => format!("finish {} #{} {}", f.key.id, f.attempt, f.state.as_str()),
            Change::DataVersion(v) => format!("data version {v}"),
            Change::Baseline(v) => format!("baseline {v}"),
            _ => "other".to_owned(),
        })
        .collect();
    names.join(", ")
}

/// One lease or store call in the audit log: written when it returns, or
/// as dropped if the caller stops waiting for it first.
struct Call<'a> {
    log: Option<&'a AuditLog>,
    record: Option<Record>,
}

impl Call<'_> {
    fn done(mut self, outcome: Seen, fence: Option<u64>) {
        if let Some(r) = self.record.as_mut() {
            match r {
                Record::Lock {
                    done,
                    outcome: o,
                    fence: f,
                    ..
                } => {
                    *done = now_us();
                    *o = outcome;
                    if let Some(fence) = fence {
                        *f = fence;
                    }
                }
                Record::Store {
                    done, outcome: o, ..
                } => {
                    *done = now_us();
                    *o = outcome;
                }
                _ => {}
            }
        }
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if let (Some(log), Some(mut record)) = (self.log, self.record.take()) {
            if let Record::Lock { done, .. } | Record::Store { done, .. } = &mut record {
                if *done == 0 {
                    *done = now_us();
                }
            }
            log.write(&record);
        }
    }
}

impl Watched {
    fn lock_call(&self, op: &str, fence: u64) -> Call<'_> {
        Call {
            log: self.log.as_deref(),
            record: Some(Record::Lock {
                op: op.to_owned(),
                fence,
                sent: now_us(),
                done: 0,
                outcome: Seen::Dropped,
            }),
        }
    }

    fn store_call(&self, op: &str, fence: u64, what: String) -> Call<'_> {
        Call {
            log: self.log.as_deref(),
            record: Some(Record::Store {
                op: op.to_owned(),
                fence,
                sent: now_us(),
                done: 0,
                outcome: Seen::Dropped,
                what,
            }),
        }
    }
}

#[async_trait]
impl Lock for Watched {
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        let call = self.lock_call("acquire", 0);
        let r = self.lock.try_acquire(service, holder, ttl).await;
        let (fence, outcome) = match &r {
            Ok(Acquire::Granted(l)) => (l.fence, Seen::Ok),
            Ok(Acquire::Held(i)) if i.holder == self.holder => (i.fence, Seen::HeldBySelf),
            Ok(Acquire::Held(i)) => (i.fence, Seen::Held),
            Ok(Acquire::StoreMoved) => (0, Seen::Moved),
            Err(e) => (0, seen(e)),
        };
        call.done(outcome, Some(fence));
        r
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, BackendError> {
        let call = self.lock_call("renew", lease.fence);
        let r = self.lock.renew(lease).await;
        call.done(r.as_ref().map_or_else(seen, |_| Seen::Ok), None);
        r
    }

    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        let call = self.lock_call("release", lease.fence);
        let r = self.lock.release(lease).await;
        call.done(r.as_ref().map_or_else(seen, |_| Seen::Ok), None);
        r
    }

    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        self.lock.current(service).await
    }

    async fn force_release(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        self.lock.force_release(service).await
    }

    async fn prepare_wait(&self, service: &str) -> Result<(), BackendError> {
        self.lock.prepare_wait(service).await
    }

    async fn raise_fence(&self, service: &str, floor: u64) -> Result<(), BackendError> {
        self.lock.raise_fence(service, floor).await
    }

    async fn wait(
        &self,
        service: &str,
        seen: &LeaseInfo,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        self.lock.wait(service, seen, timeout).await
    }

    fn notifies(&self) -> bool {
        self.lock.notifies()
    }

    async fn until_lost(&self, lease: &Lease) -> BackendError {
        if !self.loss_signal {
            // The negative control: the signal never comes.
            return std::future::pending().await;
        }
        let e = self.lock.until_lost(lease).await;
        if let Some(log) = &self.log {
            log.write(&Record::Lost {
                fence: lease.fence,
                at: now_us(),
                detail: e.to_string(),
            });
        }
        e
    }
}

#[async_trait]
impl Store for Watched {
    async fn load(&self, service: &str) -> Result<Snapshot, BackendError> {
        self.store.load(service).await
    }

    async fn claim(&self, service: &str, fence: u64) -> Result<Snapshot, BackendError> {
        let call = self.store_call("claim", fence, String::new());
        let r = self.store.claim(service, fence).await;
        call.done(r.as_ref().map_or_else(seen, |_| Seen::Ok), None);
        r
    }

    async fn apply(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
    ) -> Result<(), BackendError> {
        let call = self.store_call("apply", fence, what(changes));
        let r = self.store.apply(service, fence, changes).await;
        call.done(r.as_ref().map_or_else(seen, |_| Seen::Ok), None);
        r
    }

    async fn apply_with_notice(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
        notice: &Notice,
    ) -> Result<(), BackendError> {
        let call = self.store_call("apply", fence, what(changes));
        let r = self
            .store
            .apply_with_notice(service, fence, changes, notice)
            .await;
        call.done(r.as_ref().map_or_else(seen, |_| Seen::Ok), None);
        r
    }

    fn notice(&self, service: &str) -> Option<Notice> {
        self.store.notice(service)
    }

    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>, BackendError> {
        self.store.history(service).await
    }

    async fn services(&self) -> Result<Vec<String>, BackendError> {
        self.store.services().await
    }
}
