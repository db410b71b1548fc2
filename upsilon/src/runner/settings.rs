//! What the builder sets: the policies, the retry policy, and the
//! configuration the runner keeps.

use std::time::Duration;

use semver::Version;

use crate::planner::PlanOptions;
use crate::util::jitter;

/// What to do when the store's data version is above the app version (an
/// older binary starting after a newer one upgraded the data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataAheadPolicy {
    /// Become READY and log a warning: the app supports the N+1 data of its
    /// successor (the N-1 rule read from the other side). The default.
    #[default]
    Ready,
    /// Fail with [`Error::DataAhead`](crate::Error::DataAhead).
    Fail,
}

/// What to do with registered tasks whose version is above the app version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AboveAppPolicy {
    /// Leave them out of the plan and log a warning. The default.
    #[default]
    Warn,
    /// Fail when the runner is built, naming each task.
    Error,
    /// Leave them out silently: for a binary that plays several app versions
    /// (tests, demos) or ships tasks ahead of their release.
    Ignore,
}

/// How often a failing task is tried, and how long to wait between tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, at least 1.
    pub max_attempts: u32,
    /// Wait before the second attempt.
    pub initial_backoff: Duration,
    /// The wait doubles each time, up to this.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// One attempt: a failing task fails the upgrade at once.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// `max_attempts` tries, the first wait `initial_backoff`, doubling up to 30 s.
    pub fn attempts(max_attempts: u32, initial_backoff: Duration) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff,
            max_backoff: Duration::from_secs(30).max(initial_backoff),
        }
    }

    pub(super) fn backoff(&self, failed_attempts: u32) -> Duration {
        let factor = 2u32.saturating_pow(failed_attempts.saturating_sub(1));
        jitter(
            self.initial_backoff
                .saturating_mul(factor)
                .min(self.max_backoff),
        )
    }
}

/// The settings a runner works with, checked by [`Builder::build`](super::Builder::build).
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub(super) ttl: Duration,
    pub(super) renew_every: Duration,
    pub(super) margin: Duration,
    pub(super) max_wait: Duration,
    pub(super) poll: Duration,
    pub(super) retry: RetryPolicy,
    pub(super) rollback_on_failure: bool,
    pub(super) data_ahead: DataAheadPolicy,
    pub(super) above_app: AboveAppPolicy,
    pub(super) plan: PlanOptions,
    pub(super) backend_attempts: u32,
    pub(super) baseline: Option<Version>,
    /// Negative control: plan from the read made before the lease.
    pub(super) skip_reread: bool,
    /// Negative control: give a grant behind the store back at once instead
    /// of waiting out the TTL.
    pub(super) skip_wait_out: bool,
}

impl Default for Config {
    fn default() -> Self {
        let ttl = Duration::from_secs(15);
        Config {
            ttl,
            renew_every: ttl / 3,
            margin: ttl / 5,
            max_wait: Duration::from_secs(600),
            poll: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            rollback_on_failure: false,
            data_ahead: DataAheadPolicy::default(),
            above_app: AboveAppPolicy::default(),
            plan: PlanOptions::default(),
            backend_attempts: 5,
            baseline: None,
            skip_reread: false,
            skip_wait_out: false,
        }
    }
}
