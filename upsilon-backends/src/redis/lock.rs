//! The lease: [`Lock`] for [`RedisBackend`].

use std::time::Duration;

use async_trait::async_trait;
use redis::Value;
use upsilon::backend::{
    decide_acquire, fence_to_column, jitter, ttl_ms, Acquire, BackendError, Lease, LeaseInfo, Lock,
    StoredLease,
};
use upsilon::Holder;

use super::error::unexpected;
use super::rows::{self, fence, int, items, now_ms, text, Row};
use super::scripts::{CURRENT, FORCE_RELEASE, GRANT, RAISE_FENCE, READ_LEASE, RELEASE, RENEW};
use super::{check_format, RedisBackend, FORMAT};

/// How many times a grant or a store write reads again after another
/// node's write came between its read and its write.
pub(super) const CONFLICT_RETRIES: usize = 20;

/// What `READ_LEASE` returns.
struct LeaseRead {
    now_ms: i64,
    lease: Option<StoredLease>,
    /// The grant counter, the store's fence, the newest history row's fence.
    fences: [u64; 3],
    format: String,
    rev: String,
}

impl LeaseRead {
    fn decode(reply: Value) -> Result<LeaseRead, BackendError> {
        let v = items(reply, 11, "reading the lease")?;
        let format = text(&v[6], "the stored format")?.unwrap_or_default();
        check_format(&format)?;
        int(&v[9], "the revision")?;
        let last = match text(&v[10], "the newest history row")? {
            Some(json) => Row::parse("(the newest)", &json)?.fence,
            None => 0,
        };
        Ok(LeaseRead {
            now_ms: now_ms(&v[0], &v[1])?,
            lease: rows::lease(&v[2..6])?,
            fences: [
                fence(&v[7], "the grant counter")?,
                fence(&v[8], "the store's fence")?,
                upsilon::backend::fence_from_column(last, "the newest history row's fence")?,
            ],
            format,
            rev: text(&v[9], "the revision")?.unwrap_or_else(|| "0".to_owned()),
        })
    }
}

/// The time and the lease, as `CURRENT` and `FORCE_RELEASE` return them.
fn current_lease(reply: Value, what: &str) -> Result<Option<LeaseInfo>, BackendError> {
    let v = items(reply, 6, what)?;
    let now = now_ms(&v[0], &v[1])?;
    Ok(rows::lease(&v[2..6])?.and_then(|l| l.live(now)))
}

#[async_trait]
impl Lock for RedisBackend {
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        self.inner.wakeups.mark_seen(service);
        let k = self.keys(service)?;
        for _ in 0..CONFLICT_RETRIES {
            let mut read = READ_LEASE.prepare_invoke();
            read.key(&k.meta)
                .key(&k.lease)
                .key(&k.history)
                .key(&k.order);
            let found = LeaseRead::decode(self.eval("reading the lease", &read).await?)?;
            let lease = match decide_acquire(
                service,
                found.lease.as_ref(),
                found.now_ms,
                found.fences,
                holder,
                ttl,
            )? {
                Acquire::Granted(lease) => lease,
                other => return Ok(other),
            };
            let mut grant = GRANT.prepare_invoke();
            grant
                .key(&k.meta)
                .key(&k.lease)
                .arg(&found.format)
                .arg(&found.rev)
                .arg(fence_to_column(lease.fence)?)
                .arg(holder.encode())
                .arg(lease.expires_at_ms)
                .arg(found.now_ms)
                .arg(FORMAT);
            match self.eval("granting the lease", &grant).await? {
                Value::Int(1) => return Ok(Acquire::Granted(lease)),
                Value::Int(0) => tokio::time::sleep(jitter(Duration::from_millis(2))).await,
                other => return Err(unexpected("granting the lease", &other)),
            }
        }
        Err(busy(service))
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, BackendError> {
        let k = self.keys(&lease.service)?;
        let mut renew = RENEW.prepare_invoke();
        renew
            .key(&k.lease)
            .arg(lease.holder.encode())
            .arg(fence_to_column(lease.fence)?)
            .arg(ttl_ms(lease.ttl)?);
        match self.eval("renewing the lease", &renew).await? {
            Value::Int(0) => Err(BackendError::lease_lost("renew", lease)),
            reply => match int(&reply, "the renewed expiry")? {
                Some(at) => Ok(Lease {
                    expires_at_ms: at,
                    ..lease.clone()
                }),
                None => Err(unexpected("renewing the lease", &reply)),
            },
        }
    }

    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        let k = self.keys(&lease.service)?;
        let mut release = RELEASE.prepare_invoke();
        release
            .key(&k.lease)
            .arg(lease.holder.encode())
            .arg(fence_to_column(lease.fence)?)
            .arg(&self.inner.channel)
            .arg(&lease.service);
        match self.eval("releasing the lease", &release).await? {
            Value::Int(1) => Ok(()),
            Value::Int(0) => Err(BackendError::lease_lost("release", lease)),
            other => Err(unexpected("releasing the lease", &other)),
        }
    }

    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        let k = self.keys(service)?;
        let mut current = CURRENT.prepare_invoke();
        current.key(&k.lease);
        current_lease(
            self.eval("reading the lease", &current).await?,
            "reading the lease",
        )
    }

    async fn force_release(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        let k = self.keys(service)?;
        let mut force = FORCE_RELEASE.prepare_invoke();
        force.key(&k.lease).arg(&self.inner.channel).arg(service);
        current_lease(
            self.eval("force-releasing the lease", &force).await?,
            "force-releasing the lease",
        )
    }

    async fn raise_fence(&self, service: &str, floor: u64) -> Result<(), BackendError> {
        let k = self.keys(service)?;
        let mut raise = RAISE_FENCE.prepare_invoke();
        raise
            .key(&k.meta)
            .arg(fence_to_column(floor)?.to_string())
            .arg(FORMAT);
        let v = items(
            self.eval("raising the fence", &raise).await?,
            0,
            "raising the fence",
        )?;
        let (format, counter) = match &v[..] {
            [] => (Value::Nil, Value::Nil),
            [f] => (f.clone(), Value::Nil),
            [f, c, ..] => (f.clone(), c.clone()),
        };
        check_format(&text(&format, "the stored format")?.unwrap_or_default())?;
        fence(&counter, "the grant counter")?;
        Ok(())
    }

    async fn wait(
        &self,
        service: &str,
        _seen: &LeaseInfo,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        // A message for the service, or the subscription going down or
        // coming back (messages may have been missed), ends the wait: the
        // runner reads again, and sees from `notifies` whether it polls.
        // While the subscription is down, only its return ends the wait
        // before `timeout`, the runner's poll interval.
        let wakeups = &self.inner.wakeups;
        let since = wakeups.take_seen(service);
        wakeups.wait_since(service, since, timeout).await;
        Ok(())
    }

    fn notifies(&self) -> bool {
        self.inner.wakeups.is_up()
    }
}

/// Other nodes' writes kept coming between this node's read and write.
pub(super) fn busy(service: &str) -> BackendError {
    BackendError::unavailable(format!(
        "the keys of `{service}` changed between every read and write of {CONFLICT_RETRIES} tries; try again"
    ))
}
