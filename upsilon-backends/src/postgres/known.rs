//! What one handle knows the store to hold: for each service it claimed,
//! the snapshot its own last write left, and the store revision that write
//! set. A write checks against that snapshot and sends its statements
//! without reading first: one round trip (see `Store::apply` in store.rs).
//! And for each service it read, the state row as that read found it: a
//! lease request that finds the lease free checks it first (see
//! `PostgresBackend::decide` in lock.rs).

use std::collections::HashMap;
use std::sync::Mutex;

use upsilon::backend::{Snapshot, StateColumns};

/// The store of one service as a write of this handle left it.
#[derive(Debug)]
pub(super) struct Known {
    /// The store revision that write set (`Sql::bump_revision`).
    pub(super) revision: String,
    /// The whole snapshot, as the store holds it since.
    pub(super) snapshot: Snapshot,
}

/// One service this handle claimed.
#[derive(Debug)]
struct Claimed {
    fence: u64,
    /// `None` while a write is in flight, or after one whose outcome is
    /// unknown.
    known: Option<Known>,
}

/// Per service, what this handle claimed and knows.
#[derive(Debug, Default)]
pub(super) struct KnownStores {
    by_service: Mutex<HashMap<String, Claimed>>,
}

impl KnownStores {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Claimed>> {
        self.by_service.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This handle claimed `service` with `fence`, and its claim left `known`.
    pub(super) fn claimed(&self, service: &str, fence: u64, known: Known) {
        self.map().insert(
            service.to_owned(),
            Claimed {
                fence,
                known: Some(known),
            },
        );
    }

    /// Whether the newest claim of `service` by this handle was with `fence`.
    pub(super) fn holds(&self, service: &str, fence: u64) -> bool {
        self.map().get(service).is_some_and(|c| c.fence == fence)
    }

    /// Takes what is known of `service` under `fence`, for a write: until it
    /// is put back, other writes of this handle read the store first.
    pub(super) fn take(&self, service: &str, fence: u64) -> Option<Known> {
        match self.map().get_mut(service) {
            Some(c) if c.fence == fence => c.known.take(),
            _ => None,
        }
    }

    /// A write with `fence` committed and left `known`; kept if `fence` is
    /// still the one this handle claimed `service` with.
    pub(super) fn put(&self, service: &str, fence: u64, known: Known) {
        if let Some(c) = self.map().get_mut(service) {
            if c.fence == fence {
                c.known = Some(known);
            }
        }
    }

    /// Some write of this handle changed `service` other than through
    /// [`KnownStores::put`]: what was known of it is no longer.
    pub(super) fn forget(&self, service: &str) {
        if let Some(c) = self.map().get_mut(service) {
            c.known = None;
        }
    }
}

/// Per service, the state row as this handle's last read of the store
/// (`Store::load`) found it, until the handle writes to that store.
#[derive(Debug, Default)]
pub(super) struct ReadStates {
    by_service: Mutex<HashMap<String, StateColumns>>,
}

impl ReadStates {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, StateColumns>> {
        self.by_service.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A read of the store of `service` found `state`.
    pub(super) fn read(&self, service: &str, state: StateColumns) {
        self.map().insert(service.to_owned(), state);
    }

    /// This handle writes to the store of `service`: what its last read
    /// found is no longer what a later request should be compared with.
    pub(super) fn forget(&self, service: &str) {
        self.map().remove(service);
    }

    /// Whether the state row of `service` moved from what this handle's last
    /// read of it found to `now`. Answered yes once: that read is then
    /// forgotten, so a caller that asks again without reading is not told
    /// so again (an operator's lease, which runs no task, needs no read).
    pub(super) fn moved(&self, service: &str, now: &StateColumns) -> bool {
        let mut map = self.map();
        if map.get(service).is_some_and(|read| read != now) {
            map.remove(service);
            return true;
        }
        false
    }
}
