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

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::listener::SessionId;

/// Per service: the lease last found held by another node.
#[derive(Debug)]
pub(super) struct Waiting {
    grace: Duration,
    seen: Mutex<HashMap<String, Seen>>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    fence: u64,
    /// The holder's session, if the lease row names one.
    session: Option<SessionId>,
    /// When this node first saw that session gone.
    gone_since: Option<Instant>,
}

impl Waiting {
    pub(super) fn new(grace: Duration) -> Waiting {
        Waiting {
            grace,
            seen: Mutex::new(HashMap::new()),
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
        let entry = seen.entry(service.to_owned()).or_insert(Seen {
            fence,
            session,
            gone_since: None,
        });
        if entry.fence != fence || entry.session != session {
            *entry = Seen {
                fence,
                session,
                gone_since: None,
            };
        }
        if !gone {
            entry.gone_since = None;
            return false;
        }
        let since = *entry.gone_since.get_or_insert(now);
        now.duration_since(since) >= self.grace
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
