//! A backend wrapper that counts and times each call the runner makes, so
//! that a figure can be broken down into the backend operations behind it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};
use upsilon::backend::{Acquire, Change, HistoryEntry, LeaseInfo, Notice};
use upsilon::backend::{Backend, BackendError, Lease, Lock, Snapshot, Store};
use upsilon::Holder;

#[derive(Debug)]
pub struct Instrumented {
    inner: Arc<dyn Backend>,
    calls: Mutex<BTreeMap<&'static str, (u64, Duration)>>,
    /// Each `apply`, in order: how a write's cost grows with the history.
    applies: Mutex<Vec<Duration>>,
}

impl Instrumented {
    pub fn new(inner: Arc<dyn Backend>) -> Instrumented {
        Instrumented {
            inner,
            calls: Mutex::new(BTreeMap::new()),
            applies: Mutex::new(Vec::new()),
        }
    }

    async fn time<T>(&self, op: &'static str, f: impl std::future::Future<Output = T>) -> T {
        let t = Instant::now();
        let r = f.await;
        let took = t.elapsed();
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let e = calls.entry(op).or_default();
        e.0 += 1;
        e.1 += took;
        if op == "apply" {
            self.applies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(took);
        }
        r
    }

    /// Per operation: how many calls so far.
    pub fn calls(&self) -> BTreeMap<&'static str, u64> {
        let calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        calls.iter().map(|(op, (n, _))| (*op, *n)).collect()
    }

    /// Per operation: calls and total ms; the mean ms of the first and of
    /// the last tenth of the writes.
    pub fn breakdown(&self) -> Value {
        let calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: serde_json::Map<String, Value> = calls
            .iter()
            .map(|(op, (n, d))| {
                (
                    (*op).to_owned(),
                    json!({"calls": n, "ms": d.as_secs_f64() * 1000.0}),
                )
            })
            .collect();
        let applies = self.applies.lock().unwrap_or_else(|p| p.into_inner());
        let tenth = (applies.len() / 10).max(1);
        let mean = |v: &[Duration]| {
            v.iter().map(|d| d.as_secs_f64() * 1000.0).sum::<f64>() / v.len().max(1) as f64
        };
        if !applies.is_empty() {
            out.insert(
                "apply_mean_ms_first_tenth".into(),
                json!(mean(&applies[..tenth])),
            );
            out.insert(
                "apply_mean_ms_last_tenth".into(),
                json!(mean(&applies[applies.len() - tenth..])),
            );
        }
        Value::Object(out)
    }
}

#[async_trait]
impl Lock for Instrumented {
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        self.time("try_acquire", self.inner.try_acquire(service, holder, ttl))
            .await
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, BackendError> {
        self.time("renew", self.inner.renew(lease)).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        self.time("release", self.inner.release(lease)).await
    }

    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        self.time("current", self.inner.current(service)).await
    }

    async fn force_release(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        self.time("force_release", self.inner.force_release(service))
            .await
    }

    async fn prepare_wait(&self, service: &str) -> Result<(), BackendError> {
        self.inner.prepare_wait(service).await
    }

    async fn raise_fence(&self, service: &str, floor: u64) -> Result<(), BackendError> {
        self.inner.raise_fence(service, floor).await
    }

    async fn until_lost(&self, lease: &Lease) -> BackendError {
        self.inner.until_lost(lease).await
    }

    async fn wait(
        &self,
        service: &str,
        seen: &LeaseInfo,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        self.time("wait", self.inner.wait(service, seen, timeout))
            .await
    }

    fn notifies(&self) -> bool {
        self.inner.notifies()
    }
}

#[async_trait]
impl Store for Instrumented {
    async fn load(&self, service: &str) -> Result<Snapshot, BackendError> {
        self.time("load", self.inner.load(service)).await
    }

    async fn claim(&self, service: &str, fence: u64) -> Result<Snapshot, BackendError> {
        self.time("claim", self.inner.claim(service, fence)).await
    }

    async fn apply(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
    ) -> Result<(), BackendError> {
        self.time("apply", self.inner.apply(service, fence, changes))
            .await
    }

    async fn apply_with_notice(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
        notice: &Notice,
    ) -> Result<(), BackendError> {
        self.time(
            "apply",
            self.inner
                .apply_with_notice(service, fence, changes, notice),
        )
        .await
    }

    fn notice(&self, service: &str) -> Option<Notice> {
        self.inner.notice(service)
    }

    async fn history(&self, service: &str) -> Result<Vec<HistoryEntry>, BackendError> {
        self.time("history", self.inner.history(service)).await
    }

    async fn services(&self) -> Result<Vec<String>, BackendError> {
        self.time("services", self.inner.services()).await
    }
}
