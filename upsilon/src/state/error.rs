//! What a backend can fail with.

use crate::ids::{BoxError, InvalidHolder};
use crate::state::Lease;

/// What a backend can fail with. Driver errors are boxed behind `source`, so
/// `upsilon` names no driver type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The write carried a fence older than the newest the store has seen:
    /// another node has taken over.
    #[error("fence {presented} is stale: the store has seen fence {current}, so another node has taken over")]
    StaleFence {
        /// The fence the write carried.
        presented: u64,
        /// The store's newest fence.
        current: u64,
    },
    /// The lease is not (or no longer) held by the caller.
    #[error("the lease is no longer held by this node: {0}")]
    LeaseLost(String),
    /// The write breaks a rule of the store (see
    /// [`Snapshot::check`](crate::backend::Snapshot::check)).
    #[error("the store refused the write: {0}")]
    Rejected(String),
    /// Stored data does not parse. Nothing was written.
    #[error("stored data is corrupt: {detail}; nothing was written, repair or restore it")]
    Corrupt {
        /// What did not parse, and where.
        detail: String,
    },
    /// The store was written by a format this build does not know.
    #[error("the store has format {found}, and this build knows formats up to {supported}; upgrade Upsilon before using this store")]
    UnsupportedFormat {
        /// The format found.
        found: String,
        /// The newest this build knows.
        supported: String,
    },
    /// The backend could not be reached or timed out: worth retrying. Says
    /// what the driver says, and nothing more: the layer above names what
    /// was being done.
    #[error(transparent)]
    Unavailable {
        /// The driver's error.
        source: BoxError,
    },
    /// Any other backend failure: not retried. Says what the driver says.
    #[error(transparent)]
    Other {
        /// The driver's error.
        source: BoxError,
    },
}

impl BackendError {
    /// A [`BackendError::Corrupt`].
    pub fn corrupt(detail: impl Into<String>) -> BackendError {
        BackendError::Corrupt {
            detail: detail.into(),
        }
    }

    /// A [`BackendError::LeaseLost`] for `what` (renew, release) done with a
    /// lease that no longer holds.
    pub fn lease_lost(what: &str, lease: &Lease) -> BackendError {
        BackendError::LeaseLost(format!(
            "{what}: the lease of `{}` is no longer held by {} with fence {}",
            lease.service, lease.holder, lease.fence
        ))
    }

    /// Checks a stored format marker against the newest format a backend
    /// knows: [`BackendError::UnsupportedFormat`] for a newer one,
    /// [`BackendError::Corrupt`] for one that is not a number.
    pub fn check_format(found: &str, supported: u32, place: &str) -> Result<(), BackendError> {
        match found.parse::<u32>() {
            Ok(f) if f == supported => Ok(()),
            Ok(_) => Err(BackendError::UnsupportedFormat {
                found: found.to_owned(),
                supported: supported.to_string(),
            }),
            Err(_) => Err(BackendError::corrupt(format!(
                "{place} is {found:?}, not a number"
            ))),
        }
    }

    /// A transient [`BackendError::Unavailable`].
    pub fn unavailable(source: impl Into<BoxError>) -> BackendError {
        BackendError::Unavailable {
            source: source.into(),
        }
    }

    /// A permanent [`BackendError::Other`].
    pub fn other(source: impl Into<BoxError>) -> BackendError {
        BackendError::Other {
            source: source.into(),
        }
    }

    /// Whether retrying the same call may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, BackendError::Unavailable { .. })
    }
}

impl From<InvalidHolder> for BackendError {
    fn from(e: InvalidHolder) -> BackendError {
        BackendError::corrupt(e.to_string())
    }
}
