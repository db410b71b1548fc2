//! Waiting checks: [`Lock::wait`] and [`Lock::notifies`].
//!
//! A second node (the [peer](Harness::peer_lock)) finds the lease held, as
//! the runner does before it waits, and then waits while the first node
//! releases the lease or moves the data version. No check sleeps to order
//! things: a waiter is spawned, the change is made, and the waiter must then
//! return within [`PROMPT`], far below its own timeout. Where the change may
//! come before the waiter has blocked, the check holds just the same: a
//! change since `seen` was read must end the wait at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::{Acquire, BackendError, Change, Lease, LeaseInfo, Lock, Notice, PlanDigest};

use super::{grant, holder, v, Harness, TTL};

/// A waiter's timeout in the checks that expect it to be woken.
const WAIT: Duration = Duration::from_secs(30);
/// How soon a woken waiter must return.
const PROMPT: Duration = Duration::from_secs(5);
/// A waiter's timeout where the lock does not notify.
const POLL: Duration = Duration::from_millis(250);
/// How long [`wait_blocks_until_a_change`] waits with nothing changing.
const QUIET: Duration = Duration::from_secs(1);

/// How a lock's waiting nodes learn that the lease or the data version
/// changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// [`Lock::notifies`] was true, and [`Lock::wait`] woke promptly on a
    /// release and on a data-version change.
    Notifies,
    /// [`Lock::notifies`] was false: [`Lock::wait`] returned by its timeout,
    /// and the runner polls.
    Polls,
}

/// The first node's lock holds the lease of `service` (with the store claimed
/// under its fence); the peer asked for it and saw it held.
struct Held {
    lock: Arc<dyn Lock>,
    lease: Lease,
    peer: Arc<dyn Lock>,
    seen: LeaseInfo,
}

async fn held(check: &str, h: &dyn Harness, service: &str) -> Held {
    let (lock, peer) = (h.lock(), h.peer_lock());
    let lease = grant(&*lock, service, &holder(1), TTL).await;
    h.store()
        .claim(service, lease.fence)
        .await
        .unwrap_or_else(|e| panic!("{check}: the holder claims the store: {e}"));
    let seen = match peer.try_acquire(service, &holder(2), TTL).await {
        Ok(Acquire::Held(info)) => info,
        other => panic!("{check}: a second node got {other:?} while node 1 held the lease"),
    };
    assert_eq!(
        (&seen.holder, seen.fence),
        (&holder(1), lease.fence),
        "{check}: the second node sees the holder"
    );
    Held {
        lock,
        lease,
        peer,
        seen,
    }
}

impl Held {
    async fn release(self, check: &str) {
        self.lock
            .release(&self.lease)
            .await
            .unwrap_or_else(|e| panic!("{check}: release: {e}"));
    }
}

/// For a lock that does not notify: `wait` returns by its timeout, without
/// an error.
async fn returns_by_its_timeout(
    check: &str,
    peer: &dyn Lock,
    service: &str,
    seen: &LeaseInfo,
) -> Wake {
    match tokio::time::timeout(POLL + PROMPT, peer.wait(service, seen, POLL)).await {
        Ok(Ok(())) => Wake::Polls,
        Ok(Err(e)) => panic!("{check}: wait({POLL:?}) failed: {e}"),
        Err(_) => panic!(
            "{check}: the lock does not notify, and wait({POLL:?}) had not returned {:?} later",
            POLL + PROMPT
        ),
    }
}

/// The peer waits for a change, up to [`WAIT`], on a task of its own.
fn spawn_waiter(
    peer: &Arc<dyn Lock>,
    service: &str,
    seen: &LeaseInfo,
) -> JoinHandle<Result<(), BackendError>> {
    let (peer, service, seen) = (peer.clone(), service.to_owned(), seen.clone());
    tokio::spawn(async move { peer.wait(&service, &seen, WAIT).await })
}

/// Lets a spawned waiter run up to its wait where the runtime allows it (on a
/// current-thread runtime, one turn is enough). Not needed for the checks to
/// hold, only for them to cover a waiter that was already blocked.
async fn let_the_waiter_block() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

/// The waiter must have returned, without an error, within [`PROMPT`] of
/// `what`.
async fn woken(check: &str, what: &str, mut waiter: JoinHandle<Result<(), BackendError>>) {
    match tokio::time::timeout(PROMPT, &mut waiter).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => panic!("{check}: wait failed: {e}"),
        Ok(Err(join)) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Ok(Err(join)) => panic!("{check}: the waiter did not finish: {join}"),
        Err(_) => {
            waiter.abort();
            panic!(
                "{check}: the lock notifies, yet a node waiting (timeout {WAIT:?}) was still \
                 waiting {PROMPT:?} after {what}"
            )
        }
    }
}

/// A node waiting for a held lease is woken when it is released: its
/// `wait(.., 30 s)` returns within 5 s. Where [`Lock::notifies`] is false,
/// `wait` returns by its timeout without an error instead.
pub async fn wait_wakes_on_release(h: &dyn Harness, service: &str) -> Wake {
    let check = "wait_wakes_on_release";
    let held = held(check, h, service).await;
    if !held.peer.notifies() {
        let wake = returns_by_its_timeout(check, &*held.peer, service, &held.seen).await;
        held.release(check).await;
        return wake;
    }
    let waiter = spawn_waiter(&held.peer, service, &held.seen);
    let_the_waiter_block().await;
    held.release(check).await;
    woken(check, "the lease was released", waiter).await;
    Wake::Notifies
}

/// A node waiting for a held lease is woken when the holder moves the data
/// version ([`Change::DataVersion`]), the lease still held: its
/// `wait(.., 30 s)` returns within 5 s. Where [`Lock::notifies`] is false,
/// `wait` returns by its timeout without an error instead.
pub async fn wait_wakes_on_data_version(h: &dyn Harness, service: &str) -> Wake {
    let check = "wait_wakes_on_data_version";
    let held = held(check, h, service).await;
    if !held.peer.notifies() {
        let wake = returns_by_its_timeout(check, &*held.peer, service, &held.seen).await;
        held.release(check).await;
        return wake;
    }
    let waiter = spawn_waiter(&held.peer, service, &held.seen);
    let_the_waiter_block().await;
    h.store()
        .apply(service, held.lease.fence, &[Change::DataVersion(v("1.0"))])
        .await
        .unwrap_or_else(|e| panic!("{check}: the holder records data version 1.0: {e}"));
    woken(check, "the data version changed", waiter).await;
    held.release(check).await;
    Wake::Notifies
}

/// A lease that changed after the waiter read it, here released and granted
/// to a third node before `wait` is called, ends the wait at once: `wait(..,
/// 30 s)` returns within 5 s. Where [`Lock::notifies`] is false, `wait`
/// returns by its timeout without an error instead.
pub async fn wait_returns_at_once_after_a_change(h: &dyn Harness, service: &str) -> Wake {
    let check = "wait_returns_at_once_after_a_change";
    let held = held(check, h, service).await;
    let notifies = held.peer.notifies();
    let Held {
        lock, peer, seen, ..
    } = &held;
    lock.release(&held.lease)
        .await
        .unwrap_or_else(|e| panic!("{check}: release: {e}"));
    let next = grant(&**lock, service, &holder(3), TTL).await;
    let wake = if notifies {
        match tokio::time::timeout(PROMPT, peer.wait(service, seen, WAIT)).await {
            Ok(Ok(())) => Wake::Notifies,
            Ok(Err(e)) => panic!("{check}: wait failed: {e}"),
            Err(_) => panic!(
                "{check}: the lock notifies, yet wait(.., {WAIT:?}) was still waiting {PROMPT:?} \
                 after it started, with the lease released and granted again since it was read"
            ),
        }
    } else {
        returns_by_its_timeout(check, &**peer, service, seen).await
    };
    lock.release(&next)
        .await
        .unwrap_or_else(|e| panic!("{check}: release: {e}"));
    wake
}

/// While nothing changes (the lease stays held, nothing is written), a
/// notifying lock's `wait(.., 1 s)` lasts until about its timeout rather
/// than returning at once: the runner waits on such a lock until the lease's
/// expiry, so a wait that returned early would have waiting nodes ask in a
/// tight loop. Where [`Lock::notifies`] is false, `wait` returns by its
/// timeout without an error instead.
pub async fn wait_blocks_until_a_change(h: &dyn Harness, service: &str) -> Wake {
    let check = "wait_blocks_until_a_change";
    let held = held(check, h, service).await;
    if !held.peer.notifies() {
        let wake = returns_by_its_timeout(check, &*held.peer, service, &held.seen).await;
        held.release(check).await;
        return wake;
    }
    let started = Instant::now();
    match tokio::time::timeout(QUIET + PROMPT, held.peer.wait(service, &held.seen, QUIET)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{check}: wait failed: {e}"),
        Err(_) => panic!(
            "{check}: wait({QUIET:?}) had not returned {:?} later",
            QUIET + PROMPT
        ),
    }
    let took = started.elapsed();
    assert!(
        took >= QUIET / 2,
        "{check}: wait({QUIET:?}) returned after {took:?} with nothing changed (the lease held, \
         nothing written)"
    );
    held.release(check).await;
    Wake::Notifies
}

/// What [`notice_comes_only_with_its_write`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notices {
    /// The store received the holder's notice with its committed write.
    Delivered,
    /// The store keeps no notices ([`Store::notice`](crate::backend::Store::notice) is `None`): waiting
    /// nodes read the store after each wake-up.
    Unsupported,
}

/// The holder's notice ([`Store::apply_with_notice`](crate::backend::Store::apply_with_notice)) reaches the store's
/// notifications only with a write that commits: a notice sent with a write
/// under a stale fence is refused with it and never seen, however high the
/// fence it names; the notice of a committed write that moves the data
/// version wakes a waiting node, whose store ([`Harness::peer_store`]) then
/// returns it from [`Store::notice`](crate::backend::Store::notice).
/// A store without notices returns `None` throughout.
pub async fn notice_comes_only_with_its_write(h: &dyn Harness, service: &str) -> Notices {
    let check = "notice_comes_only_with_its_write";
    let held = held(check, h, service).await;
    let store = h.store();
    let fence = held.lease.fence;
    let lie = Notice {
        fence: fence + 5,
        data_version: Some(v("9.9")),
        plan: PlanDigest(1),
    };
    let stale = store
        .apply_with_notice(service, fence - 1, &[Change::DataVersion(v("9.9"))], &lie)
        .await;
    assert!(
        matches!(stale, Err(BackendError::StaleFence { .. })),
        "{check}: a write under fence {} after the claim of {fence} gave {stale:?}",
        fence - 1
    );
    let notice = Notice {
        fence,
        data_version: Some(v("1.0")),
        plan: PlanDigest(2),
    };
    let notifies = held.peer.notifies();
    let waiter = notifies.then(|| spawn_waiter(&held.peer, service, &held.seen));
    let_the_waiter_block().await;
    store
        .apply_with_notice(service, fence, &[Change::DataVersion(v("1.0"))], &notice)
        .await
        .unwrap_or_else(|e| panic!("{check}: the holder records data version 1.0: {e}"));
    if let Some(waiter) = waiter {
        woken(check, "a write with the holder's notice", waiter).await;
    }
    // The waiter's own backend received the notification that woke it,
    // and keeps its notice before it wakes anyone.
    let found = h.peer_store().notice(service);
    held.release(check).await;
    match found {
        None => Notices::Unsupported,
        Some(n) => {
            assert_eq!(
                n, notice,
                "{check}: the store's notice is not the committed write's"
            );
            Notices::Delivered
        }
    }
}
