//! The waiting node's side of an early takeover: what it last saw of each
//! service's lease, and since when (on its own monotonic clock) it has seen
//! the holder's session gone.
//!
//! A waiting node takes a lease over before its expiry only once
//! `takeover_grace` has passed since it first saw the holder's session gone,
//! and only if the grant's own transaction still finds it gone. The instant
//! is taken after the answer that showed the session gone arrived, so it is
//! never earlier than the session's end; by then plus the grace the holder
//! has stopped (see `holding.rs` and docs/POSTGRES.md).
//!
//! What wakes a waiting node to look: while the holder's session lives, it
//! holds a session-level advisory lock named after the lease ([`lease_key`],
//! taken before the grant that names the session commits), and the waiting
//! node blocks on the shared form of that lock ([`BLOCK`]) instead of asking
//! about the session every `holder_check_every`. The lock is granted when
//! the holder releases it or its session ends; the node then checks the
//! session once, as before. The lock only makes the check come sooner: the
//! takeover rule above is unchanged, so safety does not rest on it. A lease
//! whose lock is not held (a holder of an older version, a failed try) is
//! checked periodically, as before, once the block was granted at once.
//!
//! A waiting node that holds no lease blocks on its listening session
//! itself, so that it waits on one connection. A session blocked in a
//! statement is sent no notification until the statement ends, so it blocks
//! on a lock that also ends with each write that wakes waiters: the holder
//! holds wake locks, named after the lease and the store's stage (its data
//! version and baseline, [`wake_keys`]). Before a write that moves the stage
//! it takes the new stage's locks, and after the write commits it lets the
//! old ones go: a node that read the old stage wakes, and finds the write's
//! notification on its session; one that read the new stage blocks on a
//! lock that is already held. The last write of a finished plan lets
//! the wake locks go before it is sent, so that its notification reaches
//! idle sessions the moment it commits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::listener::SessionId;

/// Per service: the lease last found held by another node.
#[derive(Debug)]
pub(super) struct Waiting {
    grace: Duration,
    seen: Mutex<HashMap<String, Seen>>,
    /// How many waits block on an advisory lock now, each on a pooled
    /// connection of its own.
    blocking: AtomicUsize,
    /// Held by the wait that blocks on the listening session, with the
    /// token that cancels its statement.
    pub(super) on_session: tokio::sync::Mutex<()>,
    pub(super) on_session_cancel: Mutex<Option<CancelOnSession>>,
}

/// The token that cancels the statement of the wait that blocks on the
/// listening session.
pub(super) struct CancelOnSession(pub(super) tokio_postgres::CancelToken);

impl std::fmt::Debug for CancelOnSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CancelOnSession")
    }
}

/// One wait blocking on an advisory lock; see [`Waiting::start_blocking`].
pub(super) struct Blocking<'w>(&'w AtomicUsize);

impl Drop for Blocking<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone)]
struct Seen {
    fence: u64,
    /// The holder's session, if the lease row names one.
    session: Option<SessionId>,
    /// When this node first saw that session gone.
    gone_since: Option<Instant>,
    /// The lease's advisory lock was found free while the session lived:
    /// its holder does not hold it, so waits check the session periodically.
    unlocked: bool,
    /// The store's stage as the read that found this lease showed it.
    stage: Option<Stage>,
}

/// The store's stage: its data version and baseline, as their columns hold
/// them. A write that changes it wakes the waiting nodes.
pub(super) type Stage = (Option<String>, Option<String>);

impl Waiting {
    pub(super) fn new(grace: Duration) -> Waiting {
        Waiting {
            grace,
            seen: Mutex::new(HashMap::new()),
            blocking: AtomicUsize::new(0),
            on_session: tokio::sync::Mutex::new(()),
            on_session_cancel: Mutex::new(None),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<String, Seen>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the live lease of `service` with `fence`, tied to `session`,
    /// as an answer that just arrived showed it: its session `gone` or not.
    /// Returns whether the lease may be taken over now: the session has
    /// been seen gone for at least the grace.
    pub(super) fn observe(
        &self,
        service: &str,
        fence: u64,
        session: Option<SessionId>,
        gone: bool,
    ) -> bool {
        let now = Instant::now();
        let mut seen = self.seen();
        let fresh = Seen {
            fence,
            session,
            gone_since: None,
            unlocked: false,
            stage: None,
        };
        let entry = seen
            .entry(service.to_owned())
            .or_insert_with(|| fresh.clone());
        if entry.fence != fence || entry.session != session {
            *entry = fresh;
        }
        if !gone {
            entry.gone_since = None;
            return false;
        }
        let since = *entry.gone_since.get_or_insert(now);
        now.duration_since(since) >= self.grace
    }

    /// The read that found the lease of `service` with `fence` held showed
    /// the store at `stage`.
    pub(super) fn saw_stage(&self, service: &str, fence: u64, stage: Stage) {
        if let Some(s) = self.seen().get_mut(service).filter(|s| s.fence == fence) {
            s.stage = Some(stage);
        }
    }

    /// The store's stage as the read that found the lease of `service` with
    /// `fence` held showed it.
    pub(super) fn stage(&self, service: &str, fence: u64) -> Option<Stage> {
        self.seen()
            .get(service)
            .filter(|s| s.fence == fence)
            .and_then(|s| s.stage.clone())
    }

    /// The lease of `service` is free, expired or ours: nothing to remember.
    pub(super) fn forget(&self, service: &str) {
        self.seen().remove(service);
    }

    /// The session of the holder of `service`'s lease with `fence`, as last
    /// seen, if its row names one and it was not yet seen gone.
    pub(super) fn live_session(&self, service: &str, fence: u64) -> Option<SessionId> {
        self.seen()
            .get(service)
            .filter(|s| s.fence == fence && s.gone_since.is_none())
            .and_then(|s| s.session)
    }

    /// Whether a wait for the lease of `service` with `fence` may block on
    /// its advisory lock: not once the lock was found free while the
    /// holder's session lived.
    pub(super) fn may_block(&self, service: &str, fence: u64) -> bool {
        self.seen()
            .get(service)
            .filter(|s| s.fence == fence)
            .is_some_and(|s| !s.unlocked)
    }

    /// The advisory lock of the lease of `service` with `fence` was found
    /// free while its holder's session lived (or blocking on it failed):
    /// from now on waits for it check the session periodically.
    pub(super) fn lock_not_held(&self, service: &str, fence: u64) {
        if let Some(s) = self.seen().get_mut(service).filter(|s| s.fence == fence) {
            s.unlocked = true;
        }
    }

    /// Counts a wait that blocks on an advisory lock, if fewer than `most`
    /// do now; the count goes down when the guard is dropped.
    pub(super) fn start_blocking(&self, most: usize) -> Option<Blocking<'_>> {
        self.blocking
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < most).then_some(n + 1)
            })
            .ok()
            .map(|_| Blocking(&self.blocking))
    }

    /// When the lease of `service` with `fence` may be taken over, if its
    /// holder's session was seen gone.
    pub(super) fn takeover_at(&self, service: &str, fence: u64) -> Option<Instant> {
        self.seen()
            .get(service)
            .filter(|s| s.fence == fence)
            .and_then(|s| s.gone_since)
            .map(|since| since + self.grace)
    }
}

/// The advisory lock a holder's session holds while the lease of `service`
/// with `fence` is tied to it: a stable 64-bit hash (FNV-1a) of the schema,
/// the state table, the service and the fence. Every grant has a fence of
/// its own, so a lock left behind by one lease (a release whose unlock was
/// lost) never stands in for another's, and session-level locks, which
/// stack per call, are taken once per key.
pub(super) fn lease_key(schema: &str, state_table: &str, service: &str, fence: u64) -> i64 {
    fnv(&format!(
        "upsilon lease\0{schema}\0{state_table}\0{service}\0{fence}"
    ))
}

/// The advisory locks a holder's session holds while the lease of `service`
/// with `fence` is tied to it and the store is at `stage`: the locks that
/// waiting nodes blocking on their listening sessions block on, each on the
/// one its session's process id picks. Spread over [`WAKE_LOCKS`] locks, so
/// that the waiting nodes a hand-off wakes do not all queue on one lock
/// partition of the server as they wake.
pub(super) fn wake_keys(
    schema: &str,
    state_table: &str,
    service: &str,
    fence: u64,
    stage: &Stage,
) -> Vec<i64> {
    let part = |p: &Option<String>| match p {
        Some(v) => format!("={v}"),
        None => "-".to_owned(),
    };
    let (data, baseline) = (part(&stage.0), part(&stage.1));
    (0..WAKE_LOCKS)
        .map(|i| {
            fnv(&format!(
                "upsilon wake\0{schema}\0{state_table}\0{service}\0{fence}\0{data}\0{baseline}\0{i}"
            ))
        })
        .collect()
}

/// How many wake locks a holder holds per stage.
pub(super) const WAKE_LOCKS: usize = 16;

/// A stable 64-bit hash (FNV-1a) of `text`, as an advisory lock's key.
fn fnv(text: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

/// The holder's session takes the locks `$1` (an array), without waiting:
/// a row for each, true if it got it.
pub(super) const TAKE: &str = "SELECT pg_try_advisory_lock(k) FROM unnest($1::int8[]) AS k";

/// The holder's session lets the locks `$1` (an array) go.
pub(super) const LET_GO: &str = "SELECT pg_advisory_unlock(k) FROM unnest($1::int8[]) AS k";

/// Cancels the statements of the sessions that wait for one of the advisory
/// locks `$1` (an array) in this database: the waiting nodes that block on
/// a lease's wake locks when an operator released the lease (its holder
/// still holds them until it learns of the release).
pub(super) const CANCEL_WAITERS: &str = "SELECT pg_cancel_backend(l.pid)
     FROM pg_locks AS l JOIN unnest($1::int8[]) AS k
       ON l.classid = ((k >> 32) & 4294967295)::oid AND l.objid = (k & 4294967295)::oid
     WHERE l.locktype = 'advisory' AND NOT l.granted AND l.objsubid = 1
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// A waiting node blocks until the lease's lock (`$1`) is free, at most
/// `$2` (`lock_timeout`, as text: `'1500ms'`; then SQLSTATE 55P03). One
/// statement in its own transaction, which releases the shared lock as
/// soon as it is granted; the subquery (kept apart by `OFFSET 0`) sets the
/// timeout for this transaction before the lock is asked for.
pub(super) const BLOCK: &str = "SELECT pg_advisory_xact_lock_shared($1) \
     FROM (SELECT set_config('lock_timeout', $2, true) OFFSET 0) AS t";
