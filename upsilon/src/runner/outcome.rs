//! What a run returns.

use std::fmt;
use std::time::Duration;

use semver::Version;

use crate::error::{OrNone, Report};
use crate::ids::Holder;

/// What [`Upsilon::run`](super::Upsilon::run) did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Nothing to do: the data was already at this version. No lease was taken.
    UpToDate {
        /// The data version read.
        data_version: Option<Version>,
    },
    /// This node took the lease and ran the plan.
    Upgraded {
        /// What it did.
        report: Report,
    },
    /// This node took the lease, with fence `fence`, and the read under it
    /// found the data already at this version: another node finished the
    /// upgrade between this node's read and its grant. Nothing ran; the lease
    /// was released. The runner reads the store again before it asks for the
    /// lease when anything slow came between, so this is rare; it is a grant
    /// the cluster did not need, told apart from [`Outcome::UpToDate`] and
    /// [`Outcome::WaitedForOther`], which took no lease.
    FoundUpToDate {
        /// The fence of the lease it took.
        fence: u64,
        /// The data version read under the lease.
        data_version: Option<Version>,
    },
    /// Another node did the work while this one waited; it never took the lease.
    WaitedForOther {
        /// Who held the lease.
        holder: Option<Holder>,
        /// The data version read at the end.
        data_version: Option<Version>,
        /// How long it waited.
        waited: Duration,
    },
}

impl Outcome {
    /// The data version the node became READY at.
    pub fn data_version(&self) -> Option<&Version> {
        match self {
            Outcome::UpToDate { data_version }
            | Outcome::FoundUpToDate { data_version, .. }
            | Outcome::WaitedForOther { data_version, .. } => data_version.as_ref(),
            Outcome::Upgraded { report } => report.to.as_ref(),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::UpToDate { data_version } => {
                write!(
                    f,
                    "already up to date at data version {}",
                    OrNone(data_version.as_ref())
                )
            }
            Outcome::Upgraded { report } => write!(f, "upgraded {report}"),
            Outcome::FoundUpToDate {
                fence,
                data_version,
            } => write!(
                f,
                "took the lease (fence {fence}) and found the data already at data version {}: \
                 another node finished first; ran nothing",
                OrNone(data_version.as_ref())
            ),
            Outcome::WaitedForOther {
                holder,
                data_version,
                waited,
            } => {
                write!(f, "waited {waited:?} while ")?;
                match holder {
                    Some(h) => write!(f, "{h}")?,
                    None => f.write_str("another node")?,
                }
                write!(f, " upgraded the data to {}", OrNone(data_version.as_ref()))
            }
        }
    }
}
