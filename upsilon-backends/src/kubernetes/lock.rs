//! The lease: [`Lock`] for [`KubernetesBackend`] on a `coordination.k8s.io/v1`
//! Lease, every write conditional on the `resourceVersion` it was read at.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::Lease as K8sLease;
use kube::api::ObjectMeta;
use tokio::time::Instant;
use upsilon::backend::{
    decide_acquire, Acquire, BackendError, Lease, LeaseInfo, Lock, StoredLease,
};
use upsilon::Holder;

use super::api::Written;
use super::lease::{freed, granted, renewed, View};
use super::names::{Names, Part};
use super::state::{annotations, check_format, State};
use super::watch::{rv_number, Kind};
use super::{wall_ms, Inner, KubernetesBackend};

/// What a node last read of a service before it waits: the Lease's holder
/// and fence, the state's data version and baseline, and the
/// `resourceVersion`s they were read at.
#[derive(Debug, Clone, Default)]
pub(crate) struct Seen {
    lease_rv: u64,
    holder: Option<String>,
    fence: Option<String>,
    state_rv: u64,
    data: (Option<String>, Option<String>),
}

impl Inner {
    /// The lease `view` holds, as other nodes see it at `now_ms` (wall
    /// clock): its expiry is this node's first sight of its current
    /// `resourceVersion` plus its TTL, on the monotonic clock.
    fn stored(&self, service: &str, view: &View, now_ms: i64) -> Option<StoredLease> {
        let (holder, fence) = view.held.clone()?;
        let at = self.watches.observe(service, &view.rv);
        let left = (at + view.ttl).saturating_duration_since(Instant::now());
        Some(StoredLease {
            holder,
            fence,
            expires_at_ms: now_ms
                .saturating_add(i64::try_from(left.as_millis()).unwrap_or(i64::MAX)),
            granted_at_ms: view.granted_at_ms,
        })
    }

    async fn read_lease(&self, service: &str) -> Result<View, BackendError> {
        let name = self.names.object(service);
        let o = self.leases.get(&name).await?;
        if o.is_none() {
            self.watches.forget(service);
        }
        View::read(o, &name)
    }

    fn remember(&self, service: &str, o: &K8sLease) {
        let rv = o.metadata.resource_version.clone().unwrap_or_default();
        self.watches.observe(service, &rv);
        self.own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(service.to_owned(), o.clone());
    }

    fn own(&self, service: &str, lease: &Lease) -> Option<K8sLease> {
        let own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        own.get(service)
            .filter(|o| {
                View::read(Some((*o).clone()), "")
                    .ok()
                    .and_then(|v| v.held)
                    .is_some_and(|(h, f)| h == lease.holder && f == lease.fence)
            })
            .cloned()
    }

    fn forget_own(&self, service: &str) {
        self.own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(service);
    }

    fn set_seen(&self, service: &str, view: &View, state: Option<&State>, state_rv: u64) {
        let seen = Seen {
            lease_rv: rv_number(Some(&view.rv)),
            holder: view.held.as_ref().map(|(h, _)| h.encode()),
            fence: view.held.as_ref().map(|(_, f)| f.to_string()),
            state_rv,
            data: state
                .map(|s| (s.data_version.clone(), s.baseline.clone()))
                .unwrap_or_default(),
        };
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(service.to_owned(), seen);
    }

    /// Raises the fence floor of `service` in the meta ConfigMap to at least
    /// `floor`.
    async fn raise_floor(&self, service: &str, floor: u64) -> Result<(), BackendError> {
        let name = self.names.meta();
        let key = Names::floor_key(service);
        for _ in 0..self.options.conflict_retries {
            let cm = match self.configmaps.get(&name).await? {
                Some(cm) => {
                    check_format(&cm.metadata, &format!("the meta ConfigMap {name}"))?;
                    cm
                }
                None => k8s_openapi::api::core::v1::ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some(self.names.labels(Part::Meta, None)),
                        annotations: Some(annotations(None)),
                        ..ObjectMeta::default()
                    },
                    ..Default::default()
                },
            };
            let current = floor_in(&cm, &key)?;
            if current >= floor {
                return Ok(());
            }
            let mut cm = cm;
            cm.data
                .get_or_insert_with(BTreeMap::new)
                .insert(key.clone(), floor.to_string());
            if let Written::Stored(_) = self.configmaps.put(&cm).await? {
                return Ok(());
            }
        }
        Err(self.contended("raising the fence floor of", service))
    }

    async fn floor(&self, service: &str) -> Result<u64, BackendError> {
        let name = self.names.meta();
        match self.configmaps.get(&name).await? {
            Some(cm) => {
                check_format(&cm.metadata, &format!("the meta ConfigMap {name}"))?;
                floor_in(&cm, &Names::floor_key(service))
            }
            None => Ok(0),
        }
    }

    async fn read_state_for_lock(
        &self,
        service: &str,
    ) -> Result<(Option<State>, u64), BackendError> {
        let name = self.names.object(service);
        match self.configmaps.get(&name).await? {
            Some(cm) => {
                let rv = rv_number(cm.metadata.resource_version.as_deref());
                Ok((Some(State::decode(cm, &name)?), rv))
            }
            None => Ok((None, 0)),
        }
    }
}

fn floor_in(cm: &k8s_openapi::api::core::v1::ConfigMap, key: &str) -> Result<u64, BackendError> {
    match cm.data.as_ref().and_then(|d| d.get(key)) {
        None => Ok(0),
        Some(t) => t.parse().map_err(|_| {
            BackendError::corrupt(format!(
                "the fence floor {key} in the meta ConfigMap is {t:?}, not a whole number"
            ))
        }),
    }
}

#[async_trait]
impl Lock for KubernetesBackend {
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        let i = &self.inner;
        for _ in 0..i.options.conflict_retries {
            let (view, state, floor) = tokio::join!(
                i.read_lease(service),
                i.read_state_for_lock(service),
                i.floor(service)
            );
            let (view, (state, state_rv), floor) = (view?, state?, floor?);
            let now = wall_ms();
            let stored = i.stored(service, &view, now);
            i.set_seen(service, &view, state.as_ref(), state_rv);
            let store_fence = state.as_ref().map_or(0, State::newest_fence);
            let decision = decide_acquire(
                service,
                stored.as_ref(),
                now,
                [view.counter, floor, store_fence],
                holder,
                ttl,
            )?;
            let lease = match decision {
                Acquire::Granted(lease) => lease,
                other => return Ok(other),
            };
            // The floor first: should the Lease then be deleted, no later
            // grant reuses this fence.
            i.raise_floor(service, lease.fence).await?;
            let object = granted(&i.names, service, view.object, holder, lease.fence, ttl)?;
            let sent = wall_ms();
            match i.leases.put(&object).await? {
                Written::Stored(o) => {
                    i.remember(service, &o);
                    return Ok(Acquire::Granted(Lease {
                        expires_at_ms: upsilon::backend::expiry(sent, ttl)?,
                        ..lease
                    }));
                }
                // Another node wrote the Lease since it was read: read it
                // again and decide again.
                Written::Raced => continue,
            }
        }
        Err(i.contended("acquiring the lease of", service))
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, BackendError> {
        let i = &self.inner;
        let service = &lease.service;
        let mut base = i.own(service, lease);
        for _ in 0..i.options.conflict_retries {
            let current = match base.take() {
                Some(o) => o,
                None => match i.read_lease(service).await?.object {
                    Some(o) => o,
                    None => {
                        i.forget_own(service);
                        return Err(BackendError::lease_lost("renew", lease));
                    }
                },
            };
            let view = View::read(Some(current.clone()), &i.names.object(service))?;
            if view.held != Some((lease.holder.clone(), lease.fence)) {
                i.forget_own(service);
                return Err(BackendError::lease_lost("renew", lease));
            }
            let sent = wall_ms();
            match i.leases.put(&renewed(current, lease.ttl)?).await? {
                Written::Stored(o) => {
                    i.remember(service, &o);
                    return Ok(Lease {
                        expires_at_ms: upsilon::backend::expiry(sent, lease.ttl)?,
                        ..lease.clone()
                    });
                }
                Written::Raced => continue,
            }
        }
        Err(i.contended("renewing the lease of", service))
    }

    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        let i = &self.inner;
        let service = &lease.service;
        let mut base = i.own(service, lease);
        for _ in 0..i.options.conflict_retries {
            let current = match base.take() {
                Some(o) => o,
                None => match i.read_lease(service).await?.object {
                    Some(o) => o,
                    None => {
                        i.forget_own(service);
                        return Err(BackendError::lease_lost("release", lease));
                    }
                },
            };
            let view = View::read(Some(current.clone()), &i.names.object(service))?;
            if view.held != Some((lease.holder.clone(), lease.fence)) {
                i.forget_own(service);
                return Err(BackendError::lease_lost("release", lease));
            }
            match i.leases.put(&freed(current)).await? {
                Written::Stored(o) => {
                    i.forget_own(service);
                    i.watches.observe(
                        service,
                        o.metadata.resource_version.as_deref().unwrap_or_default(),
                    );
                    return Ok(());
                }
                Written::Raced => continue,
            }
        }
        Err(i.contended("releasing the lease of", service))
    }

    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        let i = &self.inner;
        let view = i.read_lease(service).await?;
        let now = wall_ms();
        Ok(i.stored(service, &view, now).and_then(|s| s.live(now)))
    }

    async fn force_release(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        let i = &self.inner;
        for _ in 0..i.options.conflict_retries {
            let view = i.read_lease(service).await?;
            let now = wall_ms();
            let live = i.stored(service, &view, now).and_then(|s| s.live(now));
            let (Some(object), Some(_)) = (view.object, &view.held) else {
                return Ok(None);
            };
            match i.leases.put(&freed(object)).await? {
                Written::Stored(_) => return Ok(live),
                Written::Raced => continue,
            }
        }
        Err(i.contended("freeing the lease of", service))
    }

    async fn raise_fence(&self, service: &str, floor: u64) -> Result<(), BackendError> {
        self.inner.raise_floor(service, floor).await
    }

    async fn wait(
        &self,
        service: &str,
        seen: &LeaseInfo,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        let i = &self.inner;
        let deadline = Instant::now() + timeout;
        if !i.options.watch {
            tokio::time::sleep_until(deadline).await;
            return Ok(());
        }
        let holder = Some(seen.holder.encode());
        let fence = Some(seen.fence.to_string());
        let read = i
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .cloned()
            .filter(|s| s.holder == holder && s.fence == fence);
        // Without a read of its own to compare with, a change since then
        // cannot be told apart: the watch's present view stands for it.
        let (lease_rv, state_rv, data) = match &read {
            Some(s) => (s.lease_rv, s.state_rv, Some(s.data.clone())),
            None => (0, 0, None),
        };
        let mut was_synced = i.watches.synced();
        loop {
            let notified = i.watches.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let synced = i.watches.synced();
            if !synced {
                if was_synced {
                    // The watch broke while waiting: the runner then polls.
                    return Ok(());
                }
                tokio::time::sleep_until(deadline).await;
                return Ok(());
            }
            was_synced = true;
            let lease_now = i.watches.view(Kind::Lease, service, lease_rv);
            let state_now = i.watches.view(Kind::State, service, state_rv);
            if let (Some(l), Some(s)) = (lease_now, state_now) {
                let l = l.map(|e| (e.a, e.b)).unwrap_or_default();
                if l != (holder.clone(), fence.clone()) {
                    return Ok(());
                }
                let s = s.map(|e| (e.a, e.b)).unwrap_or_default();
                if data.as_ref().is_some_and(|d| *d != s) {
                    return Ok(());
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(()),
            }
        }
    }

    fn notifies(&self) -> bool {
        self.inner.options.watch && self.inner.watches.synced()
    }

    async fn until_lost(&self, lease: &Lease) -> BackendError {
        let i = &self.inner;
        let ours = (Some(lease.holder.encode()), Some(lease.fence.to_string()));
        loop {
            let notified = i.watches.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            // Judged only once the watch has seen this node's own newest
            // write of the Lease, so that it never mistakes an older state
            // for a loss.
            if let Some(own) = i.own(&lease.service, lease) {
                let rv = rv_number(own.metadata.resource_version.as_deref());
                if let Some(now) = i.watches.view(Kind::Lease, &lease.service, rv) {
                    let now = now.map(|e| (e.a, e.b)).unwrap_or_default();
                    if now != ours {
                        return BackendError::LeaseLost(format!(
                            "the watch saw the Lease of `{}` {} while {} held it with fence {}",
                            lease.service,
                            match &now.0 {
                                Some(h) => format!("taken by {h}"),
                                None => "freed or deleted".to_owned(),
                            },
                            lease.holder,
                            lease.fence
                        ));
                    }
                }
            }
            notified.await;
        }
    }
}
