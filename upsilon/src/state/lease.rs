//! A lease as the runner holds it and as other nodes see it.

use std::time::Duration;

use crate::ids::Holder;

/// A granted lease. Its expiry is on the backend's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The service the lease is scoped by.
    pub service: String,
    /// Who holds it.
    pub holder: Holder,
    /// Fence of this grant; every store write carries it.
    pub fence: u64,
    /// Expiry, in milliseconds since the Unix epoch on the backend's clock.
    pub expires_at_ms: i64,
    /// The time to live it was granted (and is renewed) with.
    pub ttl: Duration,
}

/// The current state of a lease, as another node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// Who holds it.
    pub holder: Holder,
    /// Its fence.
    pub fence: u64,
    /// Expiry on the backend's clock (ms since the epoch).
    pub expires_at_ms: i64,
    /// The backend's clock when this was read (ms since the epoch).
    pub now_ms: i64,
    /// When this grant was made, on the same clock, if the backend records
    /// it (`None`: it does not). A renewal does not change it.
    pub granted_at_ms: Option<i64>,
}

impl LeaseInfo {
    /// How long the lease has been held when it was read, if the backend
    /// knows when it was granted.
    pub fn held_for(&self) -> Option<Duration> {
        self.granted_at_ms
            .map(|at| Duration::from_millis(self.now_ms.saturating_sub(at).max(0) as u64))
    }

    /// How long it has left when it was read.
    pub fn expires_in(&self) -> Duration {
        Duration::from_millis(self.expires_at_ms.saturating_sub(self.now_ms).max(0) as u64)
    }
}

/// The answer to [`Lock::try_acquire`](crate::backend::Lock::try_acquire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// The lease is ours, with a fence above every earlier grant.
    Granted(Lease),
    /// Another holder has an unexpired lease.
    Held(LeaseInfo),
    /// Nothing was granted: the lease is free, but the store this lock keeps
    /// beside it has moved since this handle last read it (its data version,
    /// baseline or fence changed), so another node may have finished the
    /// upgrade in the meantime. The caller reads the store again before it
    /// asks again. Only a lock that is its own store answers this, and only
    /// for a service whose store this handle has read.
    StoreMoved,
}
