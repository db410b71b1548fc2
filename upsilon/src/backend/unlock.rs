//! The operator's forced release of a lease, fenced and recorded, on any
//! backend that implements [`Lock::force_release`]: [`unlock()`].

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use crate::error::Error;
use crate::ids::{Holder, TaskKey};
use crate::state::{
    Acquire, AttemptKind, AttemptState, BackendError, Change, FinishAttempt, Lease, LeaseInfo,
    StartAttempt,
};

use super::{Lock, Store};

/// The time to live of the operator's own lease while it claims the store
/// and records the unlock (plus any wait for the freed lease's expiry).
pub const UNLOCK_TTL: Duration = Duration::from_secs(30);

/// What [`unlock()`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Unlocked {
    /// The lease it freed, as it was just before.
    pub cleared: LeaseInfo,
    /// The fence the operator was granted and claimed the store with: from
    /// then on, every write stamped with the freed fence is refused
    /// ([`BackendError::StaleFence`]). `None` when another node was granted
    /// the lease first ([`Unlocked::taken_by`]).
    pub fence: Option<u64>,
    /// The node that was granted the lease between the forced release and the
    /// operator's request (a waiting node woken by the release). Its fence is
    /// above the freed one, so its claim fences the old holder out; the
    /// unlock is then not recorded.
    pub taken_by: Option<LeaseInfo>,
    /// Whether the unlock row ([`AttemptKind::Unlock`] under
    /// [`TaskKey::unlock`]) was written to the history.
    pub recorded: bool,
    /// How long the operator kept the lease after recording the unlock.
    pub held: Duration,
    /// Whether the operator's own lease was released at the end (if not, it
    /// expires within [`UNLOCK_TTL`]).
    pub released: bool,
}

/// Frees the lease of `service` whoever holds it, and fences its holder out
/// of the store: [`Lock::force_release`], then a lease for `operator` (whose
/// fence is above the freed one), [`Store::claim`] with it, so that every
/// write of the old holder is refused from here on, an unlock row in the
/// history, and the release of the operator's lease. `Ok(None)`: no lease
/// was held, nothing changed.
///
/// With `wait_for_expiry`, the operator keeps the lease until the freed one
/// would have expired. A holder that is alive but stuck learns of the
/// unlock at its next renewal, which is refused, and cancels its task before
/// then; so no other node starts a task while the old holder may still run
/// one (E1), and the store refuses the old holder's writes at once all the
/// same. Without it, the lease is free again at once, and a live old holder
/// may run task code (not write to the store) until its next renewal.
///
/// Transient backend errors are retried a few times; every step is
/// idempotent, so a retry after a lost reply does no harm.
pub async fn unlock(
    lock: &dyn Lock,
    store: &dyn Store,
    service: &str,
    operator: &Holder,
    wait_for_expiry: bool,
) -> Result<Option<Unlocked>, Error> {
    let begun = Instant::now();
    let Some(cleared) = lock
        .force_release(service)
        .await
        .map_err(failed("forcing the release of the lease"))?
    else {
        return Ok(None);
    };
    let hold = if wait_for_expiry {
        cleared.expires_in()
    } else {
        Duration::ZERO
    };
    let ttl = UNLOCK_TTL + hold;
    let mut asked = 0;
    let lease = loop {
        asked += 1;
        match retry(|| lock.try_acquire(service, operator, ttl))
            .await
            .map_err(failed("taking the lease after its forced release"))?
        {
            // The operator's lease runs no task, so a store that moved does
            // not matter; a lock answers so once per read of the store.
            Acquire::StoreMoved if asked < 3 => continue,
            Acquire::StoreMoved => return Err(
                failed("taking the lease after its forced release")(BackendError::Rejected(
                    "the lock kept answering that the store moved, without a read of it between"
                        .to_owned(),
                )),
            ),
            Acquire::Granted(lease) => break lease,
            // Our own grant, whose reply was lost and retried.
            Acquire::Held(info) if &info.holder == operator => {
                break Lease {
                    service: service.to_owned(),
                    holder: info.holder,
                    fence: info.fence,
                    expires_at_ms: info.expires_at_ms,
                    ttl,
                }
            }
            Acquire::Held(other) => {
                return Ok(Some(Unlocked {
                    cleared,
                    fence: None,
                    taken_by: Some(other),
                    recorded: false,
                    held: Duration::ZERO,
                    released: true,
                }))
            }
        }
    };
    let work = record(store, &lease, &cleared, begun, hold).await;
    // Released on every path; a failed release only leaves the lease to expire.
    let released = match lock.release(&lease).await {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e, service, "the operator's lease was not released; it expires within its TTL");
            false
        }
    };
    work?;
    Ok(Some(Unlocked {
        cleared,
        fence: Some(lease.fence),
        taken_by: None,
        recorded: true,
        held: hold,
        released,
    }))
}

/// Claims the store with the operator's fence, records the unlock, and keeps
/// the lease for `hold`.
async fn record(
    store: &dyn Store,
    lease: &Lease,
    cleared: &LeaseInfo,
    begun: Instant,
    hold: Duration,
) -> Result<(), Error> {
    let service = lease.service.as_str();
    let snapshot = retry(|| store.claim(service, lease.fence))
        .await
        .map_err(failed("claiming the store with the operator's fence"))?;
    let key = TaskKey::unlock();
    let attempt = snapshot.tasks.get(&key).map_or(0, |s| s.rows) + 1;
    let held_for = cleared
        .held_for()
        .map(|d| format!(", held for {}", human(d)))
        .unwrap_or_default();
    let start = Change::Start(StartAttempt {
        key: key.clone(),
        attempt,
        kind: AttemptKind::Unlock,
        description: format!(
            "forced release of the lease held by {} with fence {}{held_for}; writes with fence {} or older are refused",
            cleared.holder, cleared.fence, cleared.fence
        ),
        holder: lease.holder.clone(),
        checkpoint: None,
    });
    // Two writes: each is dropped when replayed after a lost reply, which a
    // start and its finish in one write would not be.
    retry(|| store.apply(service, lease.fence, std::slice::from_ref(&start)))
        .await
        .map_err(failed("recording the unlock in the history"))?;
    let finish = Change::Finish(FinishAttempt {
        key,
        attempt,
        state: AttemptState::Completed,
        error: None,
        duration: begun.elapsed(),
    });
    retry(|| store.apply(service, lease.fence, std::slice::from_ref(&finish)))
        .await
        .map_err(failed("recording the unlock in the history"))?;
    tokio::time::sleep(hold).await;
    Ok(())
}

fn failed(during: &'static str) -> impl FnOnce(BackendError) -> Error {
    move |source| Error::Backend { during, source }
}

async fn retry<T, F, Fut>(mut op: F) -> Result<T, BackendError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BackendError>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if e.is_transient() && attempt < 4 => {
                tokio::time::sleep(crate::util::jitter(Duration::from_millis(100) * attempt)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// `1h 2m 3s`, `2m 3s`, `3.2s`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{:.1}s", d.as_secs_f64()),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m {}s", s / 3600, s % 3600 / 60, s % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::testing::{holder, start_attempt, MemoryBackend};

    async fn held_by_node(backend: &MemoryBackend) -> Lease {
        let Acquire::Granted(lease) = backend
            .try_acquire("svc", &holder(1), Duration::from_secs(10))
            .await
            .unwrap()
        else {
            panic!("the lease is free");
        };
        backend.claim("svc", lease.fence).await.unwrap();
        backend
            .apply("svc", lease.fence, &[start_attempt("a", "1.1", 1)])
            .await
            .unwrap();
        lease
    }

    #[tokio::test(start_paused = true)]
    async fn an_unlock_fences_the_holder_out_and_is_recorded() {
        let backend = MemoryBackend::new();
        let old = held_by_node(&backend).await;
        tokio::time::advance(Duration::from_secs(2)).await;
        let operator = holder(7);
        let b: &dyn Backend = &*backend;
        let done = unlock(b, b, "svc", &operator, false)
            .await
            .unwrap()
            .expect("a lease was held");
        assert_eq!(done.cleared.fence, old.fence);
        assert_eq!(done.cleared.held_for(), Some(Duration::from_secs(2)));
        assert!(done.recorded && done.released && done.taken_by.is_none());
        let fence = done.fence.unwrap();
        assert!(fence > old.fence);

        // The old holder: its writes and its renewal are refused.
        let err = backend
            .apply("svc", old.fence, &[start_attempt("b", "1.1", 1)])
            .await
            .unwrap_err();
        assert!(
            matches!(err, BackendError::StaleFence { presented, current }
            if presented == old.fence && current == fence),
            "{err}"
        );
        assert!(matches!(
            backend.renew(&old).await,
            Err(BackendError::LeaseLost(_))
        ));

        let history = backend.history("svc").await.unwrap();
        assert_eq!(history.len(), 2, "{history:?}");
        assert_eq!(history[0].state, AttemptState::Running);
        let row = &history[1];
        assert_eq!(
            (row.kind, row.state),
            (AttemptKind::Unlock, AttemptState::Completed)
        );
        assert!(row.key.is_unlock());
        assert_eq!((row.fence, &row.holder), (fence, &operator));
        assert!(
            row.description.contains("held by node-1"),
            "{}",
            row.description
        );
        assert!(
            row.description.contains("held for 2.0s"),
            "{}",
            row.description
        );
        // It is no completion, and the lease is free for the next node.
        assert!(!backend
            .load("svc")
            .await
            .unwrap()
            .is_completed(&TaskKey::unlock()));
        let Acquire::Granted(next) = backend
            .try_acquire("svc", &holder(2), Duration::from_secs(10))
            .await
            .unwrap()
        else {
            panic!("the operator released its lease");
        };
        assert!(next.fence > fence);
    }

    #[tokio::test(start_paused = true)]
    async fn a_free_lease_is_left_alone_and_a_wait_lasts_until_the_old_expiry() {
        let backend = MemoryBackend::new();
        let b: &dyn Backend = &*backend;
        assert_eq!(unlock(b, b, "svc", &holder(7), false).await.unwrap(), None);
        assert!(backend.history("svc").await.unwrap().is_empty());

        held_by_node(&backend).await;
        tokio::time::advance(Duration::from_secs(4)).await;
        let begun = Instant::now();
        let done = unlock(b, b, "svc", &holder(7), true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done.held, Duration::from_secs(6));
        assert!(begun.elapsed() >= Duration::from_secs(6));
        // A second unlock is recorded as the next attempt of the pseudo task.
        held_by_node_again(&backend).await;
        unlock(b, b, "svc", &holder(7), false)
            .await
            .unwrap()
            .unwrap();
        let unlocks: Vec<u32> = backend
            .history("svc")
            .await
            .unwrap()
            .iter()
            .filter(|r| r.kind == AttemptKind::Unlock)
            .map(|r| r.attempt)
            .collect();
        assert_eq!(unlocks, [1, 2]);
    }

    async fn held_by_node_again(backend: &MemoryBackend) {
        let Acquire::Granted(lease) = backend
            .try_acquire("svc", &holder(2), Duration::from_secs(10))
            .await
            .unwrap()
        else {
            panic!("the lease is free");
        };
        backend.claim("svc", lease.fence).await.unwrap();
    }
}
