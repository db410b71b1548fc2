//! One node's connection to the backend: it injects the seeded faults, and
//! goes silent for good when its process is crashed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use upsilon::backend::{Acquire, BackendError, Change, Lease, Lock, Snapshot, Store};
use upsilon::backend::{HistoryEntry, LeaseInfo, Notice};
use upsilon::testing::{Fault, Op};
use upsilon::Holder;

use crate::world::{lock, Count, World};

#[derive(Clone)]
pub struct Link {
    pub world: Arc<World>,
    pub node: String,
    pub dead: Arc<AtomicBool>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Link({})", self.node)
    }
}

enum Gate {
    Pass,
    LoseReply,
}

impl Link {
    /// Before a call: a dead process sends nothing; otherwise maybe an
    /// error, a delay, or a reply to lose.
    async fn gate(&self, op: &str) -> Result<Gate, BackendError> {
        if self.dead.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if !self.world.faults_on.load(Ordering::SeqCst) {
            return Ok(Gate::Pass);
        }
        let (fail, delay, lose) = self.world.rng(|r| {
            let fail = r.chance(6);
            let delay = if r.chance(10) { Some(r.ms(2500)) } else { None };
            (fail, delay, r.chance(4))
        });
        if fail {
            self.world.count(Count::InjectedErrors);
            self.world
                .log(format!("{} {op}: injected error", self.node));
            return Err(BackendError::unavailable("injected: connection reset"));
        }
        if let Some(d) = delay {
            self.world.count(Count::Delays);
            self.world.log(format!("{} {op}: delayed {d:?}", self.node));
            tokio::time::sleep(d).await;
            if self.dead.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
        }
        Ok(if lose { Gate::LoseReply } else { Gate::Pass })
    }

    fn finish<T: std::fmt::Debug>(
        &self,
        op: &str,
        gate: Gate,
        r: Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        match &r {
            Err(BackendError::Rejected(why)) => {
                lock(&self.world.rejected).push(format!("{} {op}: {why}", self.node))
            }
            Err(BackendError::StaleFence { .. }) => self.world.count(Count::StaleRefused),
            Err(BackendError::LeaseLost(_)) if op == "renew" => {
                self.world.count(Count::RenewalsRefused)
            }
            _ => {}
        }
        match (gate, r) {
            (Gate::LoseReply, Ok(v)) => {
                self.world.count(Count::LostReplies);
                self.world
                    .log(format!("{} {op}: applied, reply lost ({v:?})", self.node));
                Err(BackendError::unavailable("injected: reply lost"))
            }
            (_, r) => {
                let brief = match &r {
                    Ok(_) => "ok".to_owned(),
                    Err(e) => format!("error: {e}"),
                };
                self.world.log(format!("{} {op}: {brief}", self.node));
                r
            }
        }
    }

    /// The backend's own fault for this grant request, if one is armed:
    /// a late reply (`Fault::DelayReply`) or a lost one (`Fault::LoseReply`).
    fn arm_acquire_fault(&self) -> Option<Fault> {
        let fault = lock(&self.world.armed).take()?;
        self.world
            .backend
            .faults()
            .nth(Op::Acquire, 1, fault.clone());
        Some(fault)
    }
}

#[async_trait]
impl Lock for Link {
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        let called = self.world.now();
        let gate = self.gate("acquire").await?;
        let fault = self.arm_acquire_fault();
        let grants = self.world.backend.grants().len();
        let r = self.world.backend.try_acquire(service, holder, ttl).await;
        // The grant, if this call made one (it is in the backend's log even
        // when the reply is lost).
        let granted = match &r {
            Ok(Acquire::Granted(l)) => Some(l.fence),
            Ok(Acquire::Held(_)) => None,
            Ok(Acquire::StoreMoved) => {
                self.world.count(Count::StoreMoved);
                None
            }
            Err(_) => self.world.backend.grants().get(grants).map(|g| g.fence),
        };
        if let Some(fence) = granted {
            self.world.deadline_from(&holder.run_id, fence, called);
            self.world
                .log(format!("{} granted fence {fence}", self.node));
        }
        match fault {
            Some(Fault::DelayReply(d)) => {
                self.world.count(Count::LateAcquireReplies);
                if granted.is_some() {
                    self.world.count(Count::LateGrantReplies);
                }
                self.world.log(format!(
                    "{} acquire: reply {d:?} late (injected)",
                    self.node
                ));
            }
            Some(Fault::LoseReply) => {
                self.world.count(Count::LostAcquireReplies);
                if granted.is_some() {
                    self.world.count(Count::LostGrantReplies);
                }
                self.world
                    .log(format!("{} acquire: reply lost (injected)", self.node));
            }
            _ => {}
        }
        self.finish("acquire", gate, r)
    }
    async fn renew(&self, lease: &Lease) -> Result<Lease, BackendError> {
        let called = self.world.now();
        let gate = self.gate("renew").await?;
        let outage = *lock(&self.world.renew_outage_until);
        if outage.is_some_and(|until| self.world.now() < until) {
            self.world
                .log(format!("{} renew: fails (renewal outage)", self.node));
            return Err(BackendError::unavailable("injected: renewal outage"));
        }
        let r = self.world.backend.renew(lease).await;
        let r = self.finish("renew", gate, r);
        if r.is_ok() {
            self.world
                .deadline_from(&lease.holder.run_id, lease.fence, called);
        }
        r
    }
    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        let gate = self.gate("release").await?;
        let r = self.world.backend.release(lease).await;
        self.finish("release", gate, r)
    }
    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        let gate = self.gate("current").await?;
        let r = self.world.backend.current(service).await;
        self.finish("current", gate, r)
    }
    async fn force_release(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        self.world.backend.force_release(service).await
    }
    async fn prepare_wait(&self, service: &str) -> Result<(), BackendError> {
        self.world.backend.prepare_wait(service).await
    }
    async fn raise_fence(&self, service: &str, floor: u64) -> Result<(), BackendError> {
        self.world.backend.raise_fence(service, floor).await
    }
    async fn wait(
        &self,
        service: &str,
        seen: &LeaseInfo,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        self.world.backend.wait(service, seen, timeout).await
    }
    fn notifies(&self) -> bool {
        true
    }
    async fn until_lost(&self, lease: &Lease) -> BackendError {
        let e = self.world.backend.until_lost(lease).await;
        self.world.log(format!("{} is told: {e}", self.node));
        e
    }
}

#[async_trait]
impl Store for Link {
    async fn load(&self, service: &str) -> Result<Snapshot, BackendError> {
        let gate = self.gate("load").await?;
        let r = self.world.backend.load(service).await;
        self.finish(
            "load",
            gate,
            r.map(|s| Brief(s.fence, s.data_version.clone(), s)),
        )
        .map(|b| b.2)
    }
    async fn claim(&self, service: &str, fence: u64) -> Result<Snapshot, BackendError> {
        let gate = self.gate("claim").await?;
        let r = self.world.backend.claim(service, fence).await;
        self.finish(
            &format!("claim {fence}"),
            gate,
            r.map(|s| Brief(s.fence, s.data_version.clone(), s)),
        )
        .map(|b| b.2)
    }
    async fn apply(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
    ) -> Result<(), BackendError> {
        let gate = self.gate("apply").await?;
        let r = self.world.backend.apply(service, fence, changes).await;
        let what: Vec<String> = changes.iter().map(describe).collect();
        self.finish(&format!("apply {fence} [{}]", what.join(", ")), gate, r)
    }
    async fn apply_with_notice(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
        notice: &Notice,
    ) -> Result<(), BackendError> {
        let gate = self.gate("apply").await?;
        let r = self
            .world
            .backend
            .apply_with_notice(service, fence, changes, notice)
            .await;
        let what: Vec<String> = changes.iter().map(describe).collect();
        self.finish(
            &format!("apply {fence} [{}] with its notice", what.join(", ")),
            gate,
            r,
        )
    }
    fn notice(&self, service: &str) -> Option<Notice> {
        self.world.backend.notice(service)
    }
    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>, BackendError> {
        self.world.backend.history(service).await
    }
    async fn services(&self) -> Result<Vec<String>, BackendError> {
        self.world.backend.services().await
    }
}

/// A snapshot that prints briefly in the trace.
struct Brief(u64, Option<upsilon::Version>, Snapshot);

impl std::fmt::Debug for Brief {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fence {} data {:?} tasks {}",
            self.0,
            self.1.as_ref().map(|v| v.to_string()),
            self.2.tasks.len()
        )
    }
}

pub fn describe(c: &Change) -> String {
    match c {
        Change::Start(s) => {
            let kind = match s.kind {
                upsilon::backend::AttemptKind::Run => "start",
                upsilon::backend::AttemptKind::Rollback => "start rollback",
                other => other.as_str(),
            };
            format!("{kind} {}#{}", s.key.id, s.attempt)
        }
        Change::Finish(f) => format!("{} {}#{}", f.state.as_str(), f.key.id, f.attempt),
        Change::DataVersion(v) => format!("data {v}"),
        Change::Baseline(v) => format!("baseline {v}"),
        other => format!("{other:?}"),
    }
}
