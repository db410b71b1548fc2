//! The conformance suite: what every [`Lock`] + [`Store`] must do.
//!
//! A backend's tests implement [`Harness`] and call [`run_all`]. Each check
//! works on its own service name, so checks do not disturb each other and can
//! share one database.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::backend::{Acquire, AttemptState, Change, FinishAttempt, Lease, Lock, Store};
use crate::ids::{Holder, TaskKey};

use super::{holder, start_attempt, v};

mod lease;
mod store;

pub use lease::{exclusive, expiry_takeover, fence_grows, non_holder_refused, renewal};
pub use store::{
    corrupt_data_is_typed, history_round_trip, replay_is_idempotent, services_are_separate,
    stale_fence_refused, store_rules, unknown_format_refused,
};

/// What the suite needs from a backend under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// The lock under test.
    fn lock(&self) -> Arc<dyn Lock>;
    /// The store under test.
    fn store(&self) -> Arc<dyn Store>;
    /// The shortest TTL the backend honours (etcd: 2 s).
    fn min_ttl(&self) -> Duration {
        Duration::from_millis(300)
    }
    /// Makes the stored data of `service` unparsable (for example a data
    /// version that is not a version), behind the backend's back.
    async fn corrupt(&self, service: &str);
    /// Undoes [`Harness::corrupt`].
    async fn repair(&self, service: &str);
    /// Marks the store as written by a format newer than this build knows,
    /// and returns `true`; `false` where the backend has no format marker.
    /// [`Harness::reset_format`] undoes it.
    async fn future_format(&self) -> bool {
        false
    }
    /// Undoes [`Harness::future_format`].
    async fn reset_format(&self) {}
}

/// Runs every check, in order, panicking with the name of the first that fails.
pub async fn run_all(h: &dyn Harness) {
    let prefix = format!("conf{:x}", crate::util::random_u64() & 0xffff_ffff);
    exclusive(h, &format!("{prefix}_excl")).await;
    fence_grows(h, &format!("{prefix}_fence")).await;
    renewal(h, &format!("{prefix}_renew")).await;
    expiry_takeover(h, &format!("{prefix}_expiry")).await;
    stale_fence_refused(h, &format!("{prefix}_stale")).await;
    non_holder_refused(h, &format!("{prefix}_nonholder")).await;
    store_rules(h, &format!("{prefix}_rules")).await;
    replay_is_idempotent(h, &format!("{prefix}_replay")).await;
    history_round_trip(h, &format!("{prefix}_history")).await;
    services_are_separate(h, &format!("{prefix}_a"), &format!("{prefix}_b")).await;
    corrupt_data_is_typed(h, &format!("{prefix}_corrupt")).await;
    unknown_format_refused(h, &format!("{prefix}_format")).await;
}

const TTL: Duration = Duration::from_secs(30);

async fn grant(lock: &dyn Lock, service: &str, who: &Holder, ttl: Duration) -> Lease {
    match lock.try_acquire(service, who, ttl).await {
        Ok(Acquire::Granted(lease)) => lease,
        other => panic!("conformance: {service}: {who} should get the free lease, got {other:?}"),
    }
}

fn finish(id: &str, version: &str, attempt: u32, state: AttemptState) -> Change {
    Change::Finish(FinishAttempt {
        key: key(id, version),
        attempt,
        state,
        error: (state == AttemptState::Failed).then(|| "boom; it said \"no\"".to_owned()),
        duration: Duration::from_millis(12),
    })
}

fn key(id: &str, version: &str) -> TaskKey {
    TaskKey {
        version: v(version),
        id: id.to_owned(),
    }
}
