//! The holder's side of a lease tied to its listening session: the session's
//! health, the pings that check it while a lease is tied to it, and
//! [`Lock::until_lost`](upsilon::backend::Lock::until_lost).
//!
//! A lease row names the listening session of the node it was granted to. A
//! waiting node that finds that session gone takes the lease over once
//! `takeover_grace` has passed since it first saw it gone. The holder must
//! have stopped its task by then: it learns that its session ended from the
//! connection's driver (the connection closed) or, at the latest, from a
//! ping that gets no answer within `holder_ping_timeout`, and pings every
//! `holder_ping_every` while it holds a lease. See docs/POSTGRES.md for the
//! bound and its assumptions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use upsilon::backend::{BackendError, Change, Lease};

use tokio_postgres::types::{ToSql, Type};
use tracing::debug;

use super::error::describe;
use super::listener::{Session, SessionId};
use super::takeover::{Stage, LET_GO, TAKE};

/// Whether a session can still vouch for the leases tied to it, and until
/// when one is tied to it (its pings run until then).
#[derive(Debug)]
pub(super) struct Health {
    /// Why the session can no longer vouch for a lease; `None` while it can.
    /// Once set it stays set: a lost session is replaced, never revived.
    lost: watch::Sender<Option<String>>,
    /// The latest local expiry of the leases tied to the session.
    tied_until: watch::Sender<Option<Instant>>,
}

impl Health {
    pub(super) fn new() -> Arc<Health> {
        Arc::new(Health {
            lost: watch::Sender::new(None),
            tied_until: watch::Sender::new(None),
        })
    }

    /// Records why the session is lost; the first reason stays.
    pub(super) fn lose(&self, why: impl Into<String>) {
        let why = why.into();
        self.lost.send_if_modified(|lost| {
            if lost.is_some() {
                return false;
            }
            *lost = Some(why);
            true
        });
    }

    pub(super) fn is_lost(&self) -> bool {
        self.lost.borrow().is_some()
    }
}

/// Pings `session` while a lease is tied to it: a ping every `every`, each
/// one answered within `timeout`, or the session is lost. Pings do not wait
/// for each other, so a session that stops answering is found out within
/// `every + timeout` of its last answer, however slow the answers were
/// before. Ends when the session is lost or dropped.
pub(super) async fn ping(
    session: Weak<Session>,
    health: Arc<Health>,
    every: Duration,
    timeout: Duration,
) {
    let mut tied = health.tied_until.subscribe();
    let mut lost = health.lost.subscribe();
    loop {
        if lost.borrow_and_update().is_some() {
            return;
        }
        let until = (*tied.borrow_and_update()).filter(|u| *u > Instant::now());
        let Some(until) = until else {
            // Nothing tied: no pings, until a lease is tied to the session.
            tokio::select! {
                changed = tied.changed() => if changed.is_err() { return },
                _ = lost.changed() => return,
            }
            continue;
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut pings = JoinSet::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if Instant::now() >= until {
                        break;
                    }
                    let Some(s) = session.upgrade() else { return };
                    pings.spawn(async move {
                        tokio::time::timeout(timeout, s.client.simple_query("SELECT 1")).await
                    });
                }
                Some(done) = pings.join_next() => {
                    let why = match done {
                        Ok(Ok(Ok(_))) => continue,
                        Ok(Ok(Err(e))) => format!("a ping on it failed: {}", describe(&e)),
                        Ok(Err(_)) => format!("a ping on it got no answer within {timeout:?}"),
                        Err(e) => format!("a ping on it did not finish: {e}"),
                    };
                    health.lose(why);
                    return;
                }
                changed = tied.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                _ = lost.changed() => return,
            }
        }
    }
}

/// The leases this backend holds that are tied to a session, by service
/// and fence.
#[derive(Debug, Default)]
pub(super) struct Holding {
    ties: Mutex<HashMap<(String, u64), Tie>>,
}

#[derive(Debug)]
struct Tie {
    session: SessionId,
    health: Arc<Health>,
    /// The lease's advisory locks, once this tie's session took them (or
    /// may have: a try whose answer did not come): let go when it is
    /// untied.
    locked: Option<LetGo>,
    /// The store's stage and the keys of its wake locks (see
    /// `takeover.rs`), while this tie's session holds them.
    wake: Option<(Stage, Vec<i64>)>,
    /// When the lease surely has expired, on this node's clock.
    until: Instant,
    /// Dropped when the lease is released or lost.
    held: watch::Sender<()>,
}

/// A lease being granted with a session: tied (and its session pinged)
/// before the grant is written, so that the session is watched from before
/// any other node can read the row that names it. Untied on drop unless
/// [`Pending::keep`] was called.
pub(super) struct Pending<'h> {
    holding: &'h Holding,
    key: Option<(String, u64)>,
}

impl Pending<'_> {
    pub(super) fn keep(mut self) {
        self.key = None;
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            if let Some(let_go) = self.holding.remove(&key) {
                // The grant did not commit: no waiting node blocks on the
                // lock, but it must not stay with the session.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(let_go.run());
                }
            }
        }
    }
}

impl Holding {
    fn ties(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u64), Tie>> {
        self.ties.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ties `lease` to `session` until its TTL from now has passed, and
    /// starts the session's pings.
    pub(super) fn tie(&self, lease: &Lease, session: &Session) -> Pending<'_> {
        let key = (lease.service.clone(), lease.fence);
        let mut ties = self.ties();
        ties.insert(
            key.clone(),
            Tie {
                session: session.id,
                health: session.health.clone(),
                until: Instant::now() + lease.ttl,
                held: watch::Sender::new(()),
                locked: None,
                wake: None,
            },
        );
        refresh(&ties, &session.health);
        Pending {
            holding: self,
            key: Some(key),
        }
    }

    /// Whether no lease is tied to a session.
    pub(super) fn is_empty(&self) -> bool {
        self.ties().is_empty()
    }

    /// The lease was renewed: its pings run for another TTL from now.
    pub(super) fn renewed(&self, lease: &Lease) {
        let mut ties = self.ties();
        if let Some(tie) = ties.get_mut(&(lease.service.clone(), lease.fence)) {
            tie.until = Instant::now() + lease.ttl;
            let health = tie.health.clone();
            refresh(&ties, &health);
        }
    }

    /// `session` took (or may have taken) the advisory locks `keys` for the
    /// lease of `service` with `fence`, which is tied to it; `wake`, some of
    /// them, are the wake locks of the store's stage.
    pub(super) fn locked(
        &self,
        service: &str,
        fence: u64,
        session: &Arc<Session>,
        keys: Vec<i64>,
        wake: Option<(Stage, Vec<i64>)>,
    ) {
        if let Some(tie) = self.ties().get_mut(&(service.to_owned(), fence)) {
            tie.locked = Some(LetGo {
                session: Arc::downgrade(session),
                keys,
            });
            tie.wake = wake;
        }
    }

    /// The hand-off of the wake locks that a write of `changes` to the store
    /// of `service` with `fence` needs, if this backend holds that lease
    /// with wake locks and the write moves the store's stage. `keys_of`
    /// names a stage's locks.
    pub(super) fn hand_off(
        &self,
        service: &str,
        fence: u64,
        changes: &[Change],
        keys_of: impl Fn(&Stage) -> Vec<i64>,
    ) -> Option<HandOff> {
        let ties = self.ties();
        let tie = ties.get(&(service.to_owned(), fence))?;
        let (stage, from) = tie.wake.clone()?;
        let session = tie.locked.as_ref()?.session.clone();
        let mut next = stage.clone();
        for change in changes {
            match change {
                Change::DataVersion(v) => next.0 = Some(v.to_string()),
                Change::Baseline(v) => next = (Some(v.to_string()), Some(v.to_string())),
                _ => {}
            }
        }
        if next == stage {
            return None;
        }
        let to = keys_of(&next);
        Some(HandOff {
            session,
            from,
            to: (next, to),
        })
    }

    /// The wake locks of the lease of `service` with `fence`, taken out of
    /// it to be let go now: the lease's last write is next, and its
    /// notification ends the waits of nodes that no statement holds up.
    pub(super) fn wake_off(&self, service: &str, fence: u64) -> Option<LetGo> {
        let mut ties = self.ties();
        let tie = ties.get_mut(&(service.to_owned(), fence))?;
        let (_, keys) = tie.wake.take()?;
        let locked = tie.locked.as_mut()?;
        locked.keys.retain(|k| !keys.contains(k));
        Some(LetGo {
            session: locked.session.clone(),
            keys,
        })
    }

    /// The wake locks `keys` were taken (or may have been) for the lease of
    /// `service` with `fence`: they are let go with the lease.
    fn took(&self, service: &str, fence: u64, keys: &[i64]) {
        let mut ties = self.ties();
        let locked = ties
            .get_mut(&(service.to_owned(), fence))
            .and_then(|t| t.locked.as_mut());
        if let Some(l) = locked {
            for key in keys {
                if !l.keys.contains(key) {
                    l.keys.push(*key);
                }
            }
        }
    }

    /// The write that `hand_off` was for committed: the lease's wake locks
    /// are the new stage's from now on. Returns whether the old ones are to
    /// be let go (they are no longer among the lease's locks).
    fn handed_off(&self, service: &str, fence: u64, hand_off: &HandOff) -> bool {
        let mut ties = self.ties();
        let Some(tie) = ties.get_mut(&(service.to_owned(), fence)) else {
            return false;
        };
        if tie.wake.as_ref().map(|w| &w.1) != Some(&hand_off.from) {
            return false;
        }
        tie.wake = Some(hand_off.to.clone());
        if let Some(l) = tie.locked.as_mut() {
            l.keys.retain(|k| !hand_off.from.contains(k));
        }
        true
    }

    /// The lease was released or lost: what is left to do is letting its
    /// advisory lock go, if its session took it.
    #[must_use]
    pub(super) fn untie(&self, lease: &Lease) -> Option<LetGo> {
        self.remove(&(lease.service.clone(), lease.fence))
    }

    fn remove(&self, key: &(String, u64)) -> Option<LetGo> {
        let mut ties = self.ties();
        let tie = ties.remove(key)?;
        refresh(&ties, &tie.health);
        tie.locked
    }

    /// Resolves when `lease`'s session can no longer vouch for it, or when
    /// the lease was released or lost; never for a lease tied to no session
    /// (the row names none, so no node takes it over before its expiry).
    /// `current` tells which session is open now.
    pub(super) async fn until_lost(
        &self,
        lease: &Lease,
        current: impl Fn() -> Option<SessionId>,
    ) -> BackendError {
        let found = self
            .ties()
            .get(&(lease.service.clone(), lease.fence))
            .map(|t| (t.session, t.health.lost.subscribe(), t.held.subscribe()));
        let Some((session, mut lost, mut held)) = found else {
            return std::future::pending().await;
        };
        let lost_because = |why: &str| {
            BackendError::LeaseLost(format!(
                "the lease of `{}` (fence {}) is tied to PostgreSQL session {} and {why}; \
                 another node may take it over",
                lease.service, lease.fence, session.pid
            ))
        };
        loop {
            if let Some(why) = lost.borrow_and_update().clone() {
                return lost_because(&why);
            }
            if current() != Some(session) {
                return lost_because("that session is no longer this node's open session");
            }
            tokio::select! {
                changed = lost.changed() => {
                    if changed.is_err() {
                        return lost_because("the session was dropped");
                    }
                }
                _ = held.changed() => {
                    return BackendError::LeaseLost(format!(
                        "the lease of `{}` (fence {}) was released or lost",
                        lease.service, lease.fence
                    ));
                }
            }
        }
    }
}

/// A write that moves the store's stage while this backend holds the lease
/// with wake locks: [`HandOff::take`] takes the new stage's locks before the
/// write, [`HandOff::finish`] lets the old ones go after it committed, so
/// that the waiting nodes that block on their sessions wake (see
/// `takeover.rs`).
#[derive(Debug)]
pub(super) struct HandOff {
    session: Weak<Session>,
    from: Vec<i64>,
    to: (Stage, Vec<i64>),
}

impl HandOff {
    /// Takes the new stage's locks, without waiting; a session that does
    /// not answer in time is taken as lost, as for [`LetGo::run`].
    pub(super) async fn take(&self, holding: &Holding, service: &str, fence: u64) {
        let Some(s) = self.session.upgrade() else {
            return;
        };
        let keys = &self.to.1;
        let params: [(&(dyn ToSql + Sync), Type); 1] = [(keys, Type::INT8_ARRAY)];
        let timeout = Duration::from_secs(2);
        let done = tokio::time::timeout(timeout, s.client.query_typed(TAKE, &params)).await;
        let taken: Vec<i64> = match &done {
            Ok(Ok(rows)) if rows.len() == keys.len() => keys
                .iter()
                .zip(rows)
                .filter(|(_, r)| r.try_get::<_, bool>(0).ok() != Some(false))
                .map(|(k, _)| *k)
                .collect(),
            _ => keys.clone(),
        };
        holding.took(service, fence, &taken);
        if let Err(why) = answered(done, timeout, "taking a lease's wake locks") {
            s.health.lose(why);
        }
    }

    /// The write committed: lets the old stage's locks go.
    pub(super) async fn finish(self, holding: &Holding, service: &str, fence: u64) {
        if holding.handed_off(service, fence, &self) {
            LetGo {
                session: self.session,
                keys: self.from,
            }
            .run()
            .await;
        }
    }
}

/// Whether `done`, a statement on the session bounded by `timeout`, was
/// answered; why not, if not.
fn answered<T>(
    done: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    timeout: Duration,
    what: &str,
) -> Result<(), String> {
    match done {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            debug!(error = %describe(&e), "{what} failed");
            Err(format!("{what} failed: {}", describe(&e)))
        }
        Err(_) => Err(format!("{what} got no answer within {timeout:?}")),
    }
}

/// The advisory locks of a lease that is no longer tied to its session, to
/// let go of on that session (see `takeover.rs`).
#[derive(Debug)]
pub(super) struct LetGo {
    session: Weak<Session>,
    keys: Vec<i64>,
}

impl LetGo {
    /// Lets the lock go. A session that is gone has let it go with it; one
    /// that does not answer in time is taken as lost (and so replaced, its
    /// connection closed and the lock with it), so that no lock outlives
    /// its lease for long.
    pub(super) async fn run(self) {
        let Some(s) = self.session.upgrade() else {
            return;
        };
        let timeout = Duration::from_secs(2);
        let params: [(&(dyn ToSql + Sync), Type); 1] = [(&self.keys, Type::INT8_ARRAY)];
        let done = tokio::time::timeout(timeout, s.client.query_typed(LET_GO, &params)).await;
        if let Err(why) = answered(done, timeout, "letting a lease's advisory locks go") {
            s.health.lose(why);
        }
    }
}

/// Sets how long `health`'s session is pinged: until the latest expiry of
/// the leases tied to it.
fn refresh(ties: &HashMap<(String, u64), Tie>, health: &Arc<Health>) {
    let until = ties
        .values()
        .filter(|t| Arc::ptr_eq(&t.health, health))
        .map(|t| t.until)
        .max();
    health.tied_until.send_replace(until);
}
