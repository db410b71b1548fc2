//! Wake-ups for waiting nodes of the backends whose notifications carry
//! text (PostgreSQL's `NOTIFY`, Redis's pub/sub): a counter per service,
//! bumped by each notification, and by every loss or return of the
//! connection that receives them (notifications may have been missed then);
//! and the newest holder's notice per service, from the notifications that
//! carry one ([`Notice::encode`]; the others name only the service).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use upsilon::backend::Notice;

/// The wake-ups of one backend value and its clones.
#[derive(Debug, Default)]
pub(crate) struct Wakeups {
    per_service: Mutex<HashMap<String, u64>>,
    /// Per service, the holders' notice with the highest fence.
    notices: Mutex<HashMap<String, Notice>>,
    seen: Mutex<HashMap<String, u64>>,
    resets: AtomicU64,
    notify: Notify,
    /// Whether the connection that receives notifications is up.
    up: AtomicBool,
}

impl Wakeups {
    /// A notification arrived with `payload`: a service's name, or a
    /// holder's notice for it, which is kept before the waiters wake.
    pub(crate) fn bump(&self, payload: &str) {
        let service = match Notice::decode(payload) {
            Some((service, notice)) => {
                let mut notices = self.notices.lock().unwrap_or_else(|p| p.into_inner());
                let newer = notices.get(service).is_none_or(|n| n.fence <= notice.fence);
                if newer {
                    notices.insert(service.to_owned(), notice);
                }
                service
            }
            None => payload,
        };
        *self
            .per_service
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(service.to_owned())
            .or_default() += 1;
        self.notify.notify_waiters();
    }

    /// The newest holder's notice received for `service`.
    pub(crate) fn notice(&self, service: &str) -> Option<Notice> {
        self.notices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .cloned()
    }

    pub(crate) fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        self.resets.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    // PostgreSQL asks its listening session instead.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    fn generation(&self, service: &str) -> u64 {
        let own = self
            .per_service
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .copied()
            .unwrap_or(0);
        own.wrapping_add(self.resets.load(Ordering::SeqCst) << 32)
    }

    /// Remembers what the caller has seen of `service`: a wake-up after this
    /// ends the next wait at once, so none falls between a read and the wait
    /// that follows it.
    pub(crate) fn mark_seen(&self, service: &str) {
        let g = self.generation(service);
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(service.to_owned(), g);
    }

    /// The generation the caller last saw of `service` (the current one if it
    /// never marked any).
    pub(crate) fn take_seen(&self, service: &str) -> u64 {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(service)
            .unwrap_or_else(|| self.generation(service))
    }

    /// Until a wake-up for `service` after generation `seen` (`true`), or
    /// `timeout` (`false`).
    pub(crate) async fn wait_since(&self, service: &str, seen: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.generation(service) != seen {
                return true;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }
}
