//! The lease: [`Lock`] for [`EtcdBackend`].
//!
//! A grant reads the lease key and the fence key at one revision `H`, asks
//! [`decide_acquire`] for the smallest fence it may give (one above the
//! store's fence, the history's where the fence key is missing, and `H +
//! offset`, above every fence granted so far), grants an etcd lease and
//! creates the lease key attached to it in a transaction that requires the
//! key to be missing and the fence key unchanged since `H`. The key's create
//! revision `R` is that transaction's revision, above `H`, so the fence `R +
//! offset` is at least the smallest one when `offset` is raised to `fence -
//! (H + 1)` where needed; the offset only grows.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, KeyValue, PutOptions, Txn, TxnOp};
use tokio::sync::oneshot;
use tracing::debug;
use upsilon::backend::{
    decide_acquire, expiry, fence_from_column, fence_to_column, Acquire, BackendError, Lease,
    LeaseInfo, Lock, StoredLease,
};
use upsilon::Holder;

use super::error::{classify, contended, driver_in, timed_out, Class};
use super::holding::Streams;
use super::keys::{decode, encode, FenceValue, HistoryValue, LockValue};
use super::{now_ms, EtcdBackend, MIN_TTL};

/// How many times a transaction is tried again after losing its compare.
pub(super) const TRIES: u32 = 32;

/// The largest lease TTL etcd grants, in seconds.
const MAX_TTL_SECONDS: u64 = 9_000_000_000;

/// A lease key as read.
pub(super) struct StoredKey {
    pub(super) kv: KeyValue,
    pub(super) value: LockValue,
    pub(super) holder: Holder,
    pub(super) fence: u64,
}

impl StoredKey {
    pub(super) fn decode(kv: &KeyValue) -> Result<StoredKey, BackendError> {
        let value: LockValue = decode(kv.key(), kv.value())?;
        let holder = Holder::decode(&value.holder)?;
        let fence = u64::try_from(kv.create_revision())
            .ok()
            .and_then(|r| r.checked_add(value.offset))
            .filter(|f| i64::try_from(*f).is_ok())
            .ok_or_else(|| {
                BackendError::corrupt(format!(
                    "the lease key {:?} has offset {} and create revision {}, which make no fence",
                    String::from_utf8_lossy(kv.key()),
                    value.offset,
                    kv.create_revision()
                ))
            })?;
        Ok(StoredKey {
            kv: kv.clone(),
            value,
            holder,
            fence,
        })
    }

    fn holds(&self, lease: &Lease) -> bool {
        self.holder == lease.holder && self.fence == lease.fence
    }
}

/// The etcd lease TTL for `ttl`: whole seconds, rounded up (the etcd lease
/// then outlives the runner's deadline, never the other way round), and at
/// least etcd's smallest.
pub(super) fn ttl_seconds(ttl: Duration) -> Result<i64, BackendError> {
    if ttl < MIN_TTL {
        return Err(BackendError::other(format!(
            "a lease TTL of {ttl:?} is below etcd's smallest lease TTL of 2 s: \
             set the runner's `ttl` (`Builder::ttl`) to 2 s or more"
        )));
    }
    let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    if seconds > MAX_TTL_SECONDS {
        return Err(BackendError::other(format!(
            "a lease TTL of {ttl:?} is above etcd's largest lease TTL of {MAX_TTL_SECONDS} s"
        )));
    }
    Ok(seconds as i64)
}

impl EtcdBackend {
    /// The remaining TTL of etcd lease `id` in ms; 0 when it is gone (the
    /// key that names it is about to be deleted).
    async fn remaining_ms(&self, id: i64) -> Result<i64, BackendError> {
        let limit = self.inner.options.op_timeout;
        let mut leases = self.inner.client.lease_client();
        match tokio::time::timeout(limit, leases.time_to_live(id, None)).await {
            Ok(Ok(r)) => Ok(r.ttl().max(0).saturating_mul(1000)),
            Ok(Err(e)) if classify(&e) == Class::LeaseNotFound => Ok(0),
            Ok(Err(e)) => Err(driver_in(e, "reading the lease's TTL")),
            Err(_) => Err(timed_out("reading the lease's TTL", limit)),
        }
    }

    /// The lease `key` holds, as other nodes see it at `now`. Its expiry
    /// is the etcd lease's remaining TTL from now, which etcd gives in whole
    /// seconds rounded down; a key whose lease is already gone is reported
    /// held for one more millisecond (etcd is deleting it).
    async fn live(&self, key: &StoredKey, now: i64) -> Result<StoredLease, BackendError> {
        let remaining = match key.kv.lease() {
            // Put by hand without a lease: it stays until it is deleted.
            0 => i64::try_from(key.value.ttl_ms).unwrap_or(i64::MAX),
            id => self.remaining_ms(id).await?,
        };
        Ok(StoredLease {
            holder: key.holder.clone(),
            fence: key.fence,
            expires_at_ms: now.saturating_add(remaining.max(1)),
            granted_at_ms: None,
        }
        .granted_at(Some(key.value.granted_at_ms)))
    }

    fn info(lease: &StoredLease, now: i64) -> LeaseInfo {
        lease.live(now).unwrap_or(LeaseInfo {
            holder: lease.holder.clone(),
            fence: lease.fence,
            expires_at_ms: now + 1,
            now_ms: now,
            granted_at_ms: lease.granted_at_ms,
        })
    }

    /// The newest fence in the history of `service`, read at `revision`.
    async fn history_max(&self, service: &str, revision: i64) -> Result<u64, BackendError> {
        let mut kv = self.inner.client.kv_client();
        let opts = etcd_client::GetOptions::new()
            .with_prefix()
            .with_revision(revision);
        let rows = self
            .timed(
                "reading the history's fences",
                kv.get(self.inner.keys.history(service), Some(opts)),
            )
            .await?;
        let mut max = 0;
        for row in rows.kvs() {
            let v: HistoryValue = decode(row.key(), row.value())?;
            max = max.max(fence_from_column(v.fence, "a history row's fence")?);
        }
        Ok(max)
    }

    /// Revokes etcd lease `id` in the background: frees what is attached to
    /// it at once rather than at its expiry. A failure leaves it to expire.
    fn revoke_later(&self, id: i64) {
        let client = self.inner.client.clone();
        let limit = self.inner.options.op_timeout;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(limit, client.lease_client().revoke(id)).await;
        });
    }

    /// One grant attempt; `None` when its transaction lost its compare.
    async fn grant_once(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
        ttl_s: i64,
    ) -> Result<Option<Acquire>, BackendError> {
        let keys = &self.inner.keys;
        let (lock_key, fence_key) = (keys.lock(service), keys.fence(service));
        let read = self
            .read(
                "reading the lease",
                vec![
                    TxnOp::get(lock_key.as_str(), None),
                    TxnOp::get(fence_key.as_str(), None),
                ],
            )
            .await?;
        self.inner.wakeups.mark_seen(service, read.revision);
        let now = now_ms();
        if let Some(kv) = read.one(0) {
            let key = StoredKey::decode(kv)?;
            let stored = self.live(&key, now).await?;
            return Ok(Some(
                match decide_acquire(service, Some(&stored), now, [], holder, ttl)? {
                    // The key exists, so it is held however little is left.
                    Acquire::Granted(_) => Acquire::Held(Self::info(&stored, now)),
                    other => other,
                },
            ));
        }
        let fence_kv = read.one(1);
        let counters: FenceValue = match fence_kv {
            Some(kv) => decode(kv.key(), kv.value())?,
            None => FenceValue::default(),
        };
        // Without the fence key (a new service, or a key deleted by hand)
        // the history still carries the newest fences.
        let history = match fence_kv {
            Some(_) => 0,
            None => self.history_max(service, read.revision).await?,
        };
        let revision = u64::try_from(read.revision)
            .map_err(|_| BackendError::other("etcd answered a negative revision"))?;
        let granted_so_far = revision.checked_add(counters.offset).ok_or_else(|| {
            BackendError::corrupt(format!("the fence offset {} is too large", counters.offset))
        })?;
        let Acquire::Granted(mut lease) = decide_acquire(
            service,
            None,
            now,
            [granted_so_far, counters.store_fence, history],
            holder,
            ttl,
        )?
        else {
            unreachable!("a free lease is granted");
        };
        let offset = counters
            .offset
            .max(lease.fence.saturating_sub(revision + 1));
        let mut leases = self.inner.client.lease_client();
        let granted = self
            .timed("granting an etcd lease", leases.grant(ttl_s, None))
            .await?;
        let lease_id = granted.id();
        let value = LockValue {
            holder: holder.encode(),
            offset,
            granted_at_ms: now,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        };
        let fence_unchanged = match fence_kv {
            Some(kv) => {
                Compare::mod_revision(fence_key.as_str(), CompareOp::Equal, kv.mod_revision())
            }
            None => Compare::create_revision(fence_key.as_str(), CompareOp::Equal, 0),
        };
        let txn = Txn::new()
            .when([
                Compare::create_revision(lock_key.as_str(), CompareOp::Equal, 0),
                fence_unchanged,
                self.format_unchanged(),
            ])
            .and_then([
                TxnOp::put(
                    lock_key.as_str(),
                    encode(&value),
                    Some(PutOptions::new().with_lease(lease_id)),
                ),
                TxnOp::put(
                    fence_key.as_str(),
                    encode(&FenceValue { offset, ..counters }),
                    None,
                ),
            ]);
        let resp = match self.txn("granting the lease", txn).await {
            Ok(r) => r,
            Err(e) => {
                // Whether it committed is unknown: if it did, revoking the
                // etcd lease frees the key again.
                self.revoke_later(lease_id);
                return Err(e);
            }
        };
        if !resp.succeeded() {
            self.revoke_later(lease_id);
            return Ok(None);
        }
        let created = resp
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| BackendError::other("etcd answered a transaction without a header"))?;
        let fence = u64::try_from(created)
            .ok()
            .and_then(|r| r.checked_add(offset))
            .ok_or_else(|| BackendError::other("the granted fence does not fit 64 bits"))?;
        fence_to_column(fence)?;
        lease.fence = fence;
        self.inner.holding.tie(
            &self.inner.client,
            &lease,
            lease_id,
            lock_key,
            created,
            None,
        );
        debug!(%service, fence, lease_id, "granted the lease");
        Ok(Some(Acquire::Granted(lease)))
    }

    /// The lease key of `service` if it holds `lease`; otherwise `LeaseLost`
    /// for `what`.
    async fn own_key(&self, lease: &Lease, what: &str) -> Result<StoredKey, BackendError> {
        let read = self
            .read(
                "reading the lease",
                vec![TxnOp::get(self.inner.keys.lock(&lease.service), None)],
            )
            .await?;
        match read.one(0) {
            Some(kv) => {
                let key = StoredKey::decode(kv)?;
                if key.holds(lease) {
                    Ok(key)
                } else {
                    Err(BackendError::lease_lost(what, lease))
                }
            }
            None => Err(BackendError::lease_lost(what, lease)),
        }
    }

    /// A keep-alive of `lease`'s etcd lease; returns the etcd lease and its
    /// TTL (0: gone). Through the holder's open stream where there is one;
    /// otherwise (a lease granted to this holder through another backend,
    /// or whose stream broke) the lease key says which etcd lease it is, and
    /// the holder's streams are opened afresh.
    async fn keep_alive(&self, lease: &Lease) -> Result<(i64, i64), BackendError> {
        if let Some((id, renewals)) = self.inner.holding.renewer(lease) {
            let (reply, answer) = oneshot::channel();
            if renewals.send(reply).await.is_ok() {
                let limit = self.inner.options.op_timeout;
                match tokio::time::timeout(limit, answer).await {
                    Ok(Ok(Ok(ttl))) => return Ok((id, ttl)),
                    // The stream broke: open another below.
                    Ok(Ok(Err(_))) | Ok(Err(_)) => {}
                    Err(_) => return Err(timed_out("renewing the etcd lease", limit)),
                }
            }
        }
        let key = self.own_key(lease, "renew").await?;
        let id = key.kv.lease();
        let lock_key = self.inner.keys.lock(&lease.service);
        let opened = Streams::open(&self.inner.client, id, &lock_key, key.kv.create_revision());
        let limit = self.inner.options.op_timeout;
        let streams = match tokio::time::timeout(limit, opened).await {
            Ok(Ok(s)) => s,
            Ok(Err(BackendError::LeaseLost(_))) => {
                return Err(BackendError::lease_lost("renew", lease))
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(timed_out("renewing the etcd lease", limit)),
        };
        self.inner.holding.tie(
            &self.inner.client,
            lease,
            id,
            lock_key,
            key.kv.create_revision(),
            Some(streams),
        );
        Ok((id, 1))
    }
}

#[async_trait]
impl Lock for EtcdBackend {
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        let ttl_s = ttl_seconds(ttl)?;
        for _ in 0..TRIES {
            if let Some(answer) = self.grant_once(service, holder, ttl, ttl_s).await? {
                return Ok(answer);
            }
        }
        Err(contended("acquiring the lease", TRIES))
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, BackendError> {
        let sent = now_ms();
        let (id, ttl) = self.keep_alive(lease).await?;
        if ttl <= 0 {
            self.inner.holding.untie(lease);
            return Err(BackendError::lease_lost("renew", lease));
        }
        // The keep-alive restarted the etcd lease's TTL; the key must still
        // be this lease's, on that etcd lease.
        match self.own_key(lease, "renew").await {
            Ok(key) if key.kv.lease() == id => Ok(Lease {
                expires_at_ms: expiry(sent, lease.ttl)?,
                ..lease.clone()
            }),
            Ok(_) => {
                self.inner.holding.untie(lease);
                Err(BackendError::lease_lost("renew", lease))
            }
            Err(e) => {
                if matches!(e, BackendError::LeaseLost(_)) {
                    self.inner.holding.untie(lease);
                }
                Err(e)
            }
        }
    }

    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        let key = match self.own_key(lease, "release").await {
            Ok(key) => key,
            Err(e) => {
                if matches!(e, BackendError::LeaseLost(_)) {
                    self.inner.holding.untie(lease);
                }
                return Err(e);
            }
        };
        let lock_key = self.inner.keys.lock(&lease.service);
        let txn = Txn::new()
            .when([
                Compare::create_revision(
                    lock_key.as_str(),
                    CompareOp::Equal,
                    key.kv.create_revision(),
                ),
                Compare::mod_revision(lock_key.as_str(), CompareOp::Equal, key.kv.mod_revision()),
            ])
            .and_then([TxnOp::delete(lock_key.as_str(), None)]);
        let resp = self.txn("releasing the lease", txn).await?;
        self.inner.holding.untie(lease);
        if !resp.succeeded() {
            return Err(BackendError::lease_lost("release", lease));
        }
        if key.kv.lease() != 0 {
            self.revoke_later(key.kv.lease());
        }
        Ok(())
    }

    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        let read = self
            .read(
                "reading the lease",
                vec![TxnOp::get(self.inner.keys.lock(service), None)],
            )
            .await?;
        self.inner.wakeups.mark_seen(service, read.revision);
        let Some(kv) = read.one(0) else {
            return Ok(None);
        };
        let key = StoredKey::decode(kv)?;
        let now = now_ms();
        let stored = self.live(&key, now).await?;
        Ok(Some(Self::info(&stored, now)))
    }

    async fn force_release(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        let lock_key = self.inner.keys.lock(service);
        for _ in 0..TRIES {
            let read = self
                .read(
                    "reading the lease",
                    vec![TxnOp::get(lock_key.as_str(), None)],
                )
                .await?;
            let Some(kv) = read.one(0) else {
                return Ok(None);
            };
            let key = StoredKey::decode(kv)?;
            let now = now_ms();
            let stored = self.live(&key, now).await?;
            // The fence key stays: the next grant's fence is above this one.
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    lock_key.as_str(),
                    CompareOp::Equal,
                    key.kv.mod_revision(),
                )])
                .and_then([TxnOp::delete(lock_key.as_str(), None)]);
            if !self
                .txn("force-releasing the lease", txn)
                .await?
                .succeeded()
            {
                continue;
            }
            // The old holder's keep-alives now find its etcd lease gone.
            if key.kv.lease() != 0 {
                let mut leases = self.inner.client.lease_client();
                if let Err(e) = self
                    .timed(
                        "revoking the old holder's etcd lease",
                        leases.revoke(key.kv.lease()),
                    )
                    .await
                {
                    debug!(error = %e, "the old holder's etcd lease was not revoked; it expires by itself");
                }
            }
            return Ok(Some(Self::info(&stored, now)));
        }
        Err(contended("force-releasing the lease", TRIES))
    }

    async fn raise_fence(&self, service: &str, floor: u64) -> Result<(), BackendError> {
        // Every later grant's create revision is above the revision read
        // here, so an offset of at least `floor - revision` puts its fence
        // above `floor`. The offset only grows; a held lease keeps the
        // offset it was granted with, and so its fence.
        let fence_key = self.inner.keys.fence(service);
        for _ in 0..TRIES {
            let read = self
                .read(
                    "reading the fence offset",
                    vec![TxnOp::get(fence_key.as_str(), None)],
                )
                .await?;
            let fence_kv = read.one(0);
            let counters: FenceValue = match fence_kv {
                Some(kv) => decode(kv.key(), kv.value())?,
                None => FenceValue::default(),
            };
            let revision = u64::try_from(read.revision)
                .map_err(|_| BackendError::other("etcd answered a negative revision"))?;
            let offset = counters.offset.max(floor.saturating_sub(revision));
            if offset == counters.offset {
                return Ok(());
            }
            revision
                .checked_add(offset)
                .and_then(|f| f.checked_add(1))
                .filter(|f| i64::try_from(*f).is_ok())
                .ok_or_else(|| {
                    BackendError::Rejected(format!(
                        "a fence floor of {floor} leaves no higher fence to grant"
                    ))
                })?;
            let fence_unchanged = match fence_kv {
                Some(kv) => {
                    Compare::mod_revision(fence_key.as_str(), CompareOp::Equal, kv.mod_revision())
                }
                None => Compare::create_revision(fence_key.as_str(), CompareOp::Equal, 0),
            };
            let txn = Txn::new()
                .when([fence_unchanged, self.format_unchanged()])
                .and_then([TxnOp::put(
                    fence_key.as_str(),
                    encode(&FenceValue { offset, ..counters }),
                    None,
                )]);
            if self.txn("raising the fence offset", txn).await?.succeeded() {
                debug!(%service, floor, offset, "raised the fence offset");
                return Ok(());
            }
        }
        Err(contended("raising the fence offset", TRIES))
    }

    async fn wait(
        &self,
        service: &str,
        _seen: &LeaseInfo,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        self.inner.wakeups.wait(service, timeout).await;
        Ok(())
    }

    fn notifies(&self) -> bool {
        self.inner.wakeups.is_up()
    }

    async fn until_lost(&self, lease: &Lease) -> BackendError {
        self.inner.holding.until_lost(lease).await
    }
}
