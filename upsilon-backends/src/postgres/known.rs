//! What one handle knows the store to hold: for each service it claimed,
//! the snapshot its own last write left, and the store revision that write
//! set. A write checks against that snapshot and sends its statements
//! without reading first: one round trip (see `Store::apply` in store.rs).

use std::collections::HashMap;
use std::sync::Mutex;

use upsilon::backend::Snapshot;

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
