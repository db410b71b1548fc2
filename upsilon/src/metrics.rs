//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! The runner records what an operator watches during a rollout: how long
//! the upgrade and each task took, what happened to the lease, how many nodes
//! wait and for how long. Every name starts with `upsilon_` and every metric
//! has a `service` label (the builder's [`service`](crate::Builder::service)).
//!
//! Nothing is exported unless the application installs a recorder: with
//! none, the facade hands every call to its no-op recorder, so recording
//! costs a few label strings at events that happen a few times per run and
//! once per lease renewal. To serve them to Prometheus, install
//! `metrics-exporter-prometheus` and serve its handle's `render()` (the
//! `probe` example does it on `/metrics`); an OpenTelemetry bridge plugs in
//! the same way. Call [`describe`] after installing it to give each metric
//! its unit and help text.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `upsilon_runs_total` | counter | `outcome` | runs of the start-up protocol, by how they ended: `up_to_date`, `upgraded`, `waited`, `task_failed`, `lease_lost`, `stopped`, `wait_timeout`, `error` |
//! | `upsilon_upgrade_duration_seconds` | histogram | `outcome` | time from the grant to the end of the work under the lease (same outcomes) |
//! | `upsilon_task_duration_seconds` | histogram | `task`, `version`, `outcome` | one run of a task: `completed`, `failed`, `cancelled`; a rollback: `rolled_back`, `rollback_failed` |
//! | `upsilon_task_failures_total` | counter | `task`, `version` | failed attempts of a task (errors and panics) |
//! | `upsilon_task_retries_total` | counter | `task`, `version` | failed attempts the retry policy tries again (counted when the backoff starts) |
//! | `upsilon_lease_grants_total` | counter | | leases granted to this node |
//! | `upsilon_lease_takeovers_total` | counter | | grants over another holder's lease that ran out (see below) |
//! | `upsilon_lease_renewals_total` | counter | | successful renewals |
//! | `upsilon_lease_renewal_failures_total` | counter | `reason` | failed renewals: `transient` (retried), `refused`, `timeout` (the deadline passed during the call) |
//! | `upsilon_lease_losses_total` | counter | `reason` | leases lost while held: `renewal_refused`, `deadline`, `signalled`, `stale_fence`, `not_held` |
//! | `upsilon_waiting_nodes` | gauge | | nodes of this process waiting for another node's lease (0 or 1 per runner) |
//! | `upsilon_wait_duration_seconds` | histogram | `outcome` | how long a node waited: `ready` (another node did the work), `granted`, `timeout`, `stopped`, `error` |
//! | `upsilon_stops_total` | counter | | runs asked to stop ([`Upsilon::run_until`](crate::Upsilon::run_until)) |
//!
//! A takeover is counted by the node that waited: its grant came at or after
//! the expiry, on the backend's clock, of the other holder's lease as it last
//! read it, so that lease ran out rather than being released. A node that
//! never saw the old lease (it first asked after the lease had run out) or a
//! backend's early takeover of a lease whose holder's session ended count as
//! plain grants.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use tokio::time::Instant;

use crate::backend::{Lease, LeaseInfo};
use crate::error::{Error, LeaseLoss};
use crate::registry::Task;
use crate::runner::Outcome;

/// `upsilon_runs_total`.
pub const RUNS: &str = "upsilon_runs_total";
/// `upsilon_upgrade_duration_seconds`.
pub const UPGRADE_DURATION: &str = "upsilon_upgrade_duration_seconds";
/// `upsilon_task_duration_seconds`.
pub const TASK_DURATION: &str = "upsilon_task_duration_seconds";
/// `upsilon_task_failures_total`.
pub const TASK_FAILURES: &str = "upsilon_task_failures_total";
/// `upsilon_task_retries_total`.
pub const TASK_RETRIES: &str = "upsilon_task_retries_total";
/// `upsilon_lease_grants_total`.
pub const LEASE_GRANTS: &str = "upsilon_lease_grants_total";
/// `upsilon_lease_takeovers_total`.
pub const LEASE_TAKEOVERS: &str = "upsilon_lease_takeovers_total";
/// `upsilon_lease_renewals_total`.
pub const LEASE_RENEWALS: &str = "upsilon_lease_renewals_total";
/// `upsilon_lease_renewal_failures_total`.
pub const LEASE_RENEWAL_FAILURES: &str = "upsilon_lease_renewal_failures_total";
/// `upsilon_lease_losses_total`.
pub const LEASE_LOSSES: &str = "upsilon_lease_losses_total";
/// `upsilon_waiting_nodes`.
pub const WAITING_NODES: &str = "upsilon_waiting_nodes";
/// `upsilon_wait_duration_seconds`.
pub const WAIT_DURATION: &str = "upsilon_wait_duration_seconds";
/// `upsilon_stops_total`.
pub const STOPS: &str = "upsilon_stops_total";

/// Gives every metric its unit and help text in the installed recorder.
/// Call it once after installing one; recording works without it.
pub fn describe() {
    use ::metrics::Unit::{Count, Seconds};
    describe_counter!(RUNS, Count, "Runs of the start-up protocol, by outcome.");
    describe_histogram!(
        UPGRADE_DURATION,
        Seconds,
        "Time from the lease grant to the end of the work under it, by outcome."
    );
    describe_histogram!(
        TASK_DURATION,
        Seconds,
        "One run of an upgrade task, by outcome."
    );
    describe_counter!(TASK_FAILURES, Count, "Failed attempts of an upgrade task.");
    describe_counter!(
        TASK_RETRIES,
        Count,
        "Failed attempts the retry policy tries again."
    );
    describe_counter!(LEASE_GRANTS, Count, "Upgrade leases granted to this node.");
    describe_counter!(
        LEASE_TAKEOVERS,
        Count,
        "Grants over another holder's lease that ran out while this node waited."
    );
    describe_counter!(LEASE_RENEWALS, Count, "Successful lease renewals.");
    describe_counter!(
        LEASE_RENEWAL_FAILURES,
        Count,
        "Failed lease renewals, by reason."
    );
    describe_counter!(LEASE_LOSSES, Count, "Leases lost while held, by reason.");
    describe_gauge!(
        WAITING_NODES,
        Count,
        "Nodes waiting for another node's upgrade lease."
    );
    describe_histogram!(
        WAIT_DURATION,
        Seconds,
        "Time spent waiting for another node's lease, by outcome."
    );
    describe_counter!(STOPS, Count, "Runs asked to stop before they completed.");
}

/// A run ended.
pub(crate) fn run_finished(service: &str, result: &Result<Outcome, Error>) {
    let outcome = match result {
        Ok(Outcome::UpToDate { .. }) => "up_to_date",
        Ok(Outcome::Upgraded { .. }) => "upgraded",
        Ok(Outcome::FoundUpToDate { .. }) => "found_up_to_date",
        Ok(Outcome::WaitedForOther { .. }) => "waited",
        Err(e) => error_outcome(e),
    };
    counter!(RUNS, "service" => service.to_owned(), "outcome" => outcome).increment(1);
}

/// The work under a lease ended, `held` after the grant.
pub(crate) fn upgrade_finished(service: &str, held: Duration, result: &Result<Outcome, Error>) {
    let outcome = match result {
        Ok(Outcome::UpToDate { .. } | Outcome::FoundUpToDate { .. }) => "up_to_date",
        Ok(_) => "upgraded",
        Err(e) => error_outcome(e),
    };
    histogram!(UPGRADE_DURATION, "service" => service.to_owned(), "outcome" => outcome)
        .record(held);
}

fn error_outcome(e: &Error) -> &'static str {
    match e {
        Error::TaskFailed { .. } => "task_failed",
        Error::LeaseLost { .. } => "lease_lost",
        Error::Stopped { .. } => "stopped",
        Error::WaitTimeout { .. } => "wait_timeout",
        _ => "error",
    }
}

/// One run of a task (or of its rollback) ended with `outcome`.
pub(crate) fn task_ran(service: &str, task: &Task, outcome: &'static str, took: Duration) {
    histogram!(TASK_DURATION, "service" => service.to_owned(), "task" => task.id().to_owned(),
        "version" => task.version().to_string(), "outcome" => outcome)
    .record(took);
}

/// An attempt of a task failed.
pub(crate) fn task_failed(service: &str, task: &Task) {
    counter!(TASK_FAILURES, "service" => service.to_owned(), "task" => task.id().to_owned(),
        "version" => task.version().to_string())
    .increment(1);
}

/// A failed task is tried again.
pub(crate) fn task_retried(service: &str, task: &Task) {
    counter!(TASK_RETRIES, "service" => service.to_owned(), "task" => task.id().to_owned(),
        "version" => task.version().to_string())
    .increment(1);
}

/// `lease` was granted; `seen` is another holder's lease as this node last
/// read it, if it waited on one.
pub(crate) fn lease_granted(lease: &Lease, seen: Option<&LeaseInfo>) {
    counter!(LEASE_GRANTS, "service" => lease.service.clone()).increment(1);
    let granted_at = lease
        .expires_at_ms
        .saturating_sub(i64::try_from(lease.ttl.as_millis()).unwrap_or(i64::MAX));
    if seen.is_some_and(|s| s.holder != lease.holder && granted_at >= s.expires_at_ms) {
        counter!(LEASE_TAKEOVERS, "service" => lease.service.clone()).increment(1);
    }
}

/// A renewal succeeded.
pub(crate) fn lease_renewed(service: &str) {
    counter!(LEASE_RENEWALS, "service" => service.to_owned()).increment(1);
}

/// A renewal failed: `transient`, `refused` or `timeout`.
pub(crate) fn renewal_failed(service: &str, reason: &'static str) {
    counter!(LEASE_RENEWAL_FAILURES, "service" => service.to_owned(), "reason" => reason)
        .increment(1);
}

/// The lease was lost while held.
pub(crate) fn lease_lost(service: &str, reason: &LeaseLoss) {
    let reason = match reason {
        LeaseLoss::RenewalRefused { .. } => "renewal_refused",
        LeaseLoss::Deadline { .. } => "deadline",
        LeaseLoss::Signalled { .. } => "signalled",
        LeaseLoss::StaleFence { .. } => "stale_fence",
        LeaseLoss::NotHeld { .. } => "not_held",
    };
    counter!(LEASE_LOSSES, "service" => service.to_owned(), "reason" => reason).increment(1);
}

/// A run was asked to stop.
pub(crate) fn stopped(service: &str) {
    counter!(STOPS, "service" => service.to_owned()).increment(1);
}

/// Moves the number of this process's runners of `service` that wait by
/// `by`, and sets the gauge to it: a set, not an increment, so that
/// recorders without gauge increments (some OpenTelemetry bridges) show it.
fn waiting_nodes(service: &str, by: i64) {
    static WAITING: Mutex<BTreeMap<String, i64>> = Mutex::new(BTreeMap::new());
    let mut waiting = WAITING.lock().unwrap_or_else(|p| p.into_inner());
    let n = waiting.entry(service.to_owned()).or_default();
    *n += by;
    // The gauge is set under the lock, so that two runners' sets land in order.
    gauge!(WAITING_NODES, "service" => service.to_owned()).set(*n as f64);
}

/// A node's wait for another node's lease: counted in
/// `upsilon_waiting_nodes` from [`Wait::begin`] until it is dropped, when
/// its duration is recorded with the outcome [`Wait::end`] gave (`error`
/// if none: a backend error, or the run dropped).
#[derive(Debug)]
pub(crate) struct Wait<'a> {
    service: &'a str,
    since: Option<Instant>,
    outcome: &'static str,
}

impl<'a> Wait<'a> {
    pub(crate) fn new(service: &'a str) -> Wait<'a> {
        Wait {
            service,
            since: None,
            outcome: "error",
        }
    }

    /// The node waits (again: only the first call counts).
    pub(crate) fn begin(&mut self) {
        if self.since.is_none() {
            self.since = Some(Instant::now());
            waiting_nodes(self.service, 1);
        }
    }

    /// How the wait ends, if it began.
    pub(crate) fn end(&mut self, outcome: &'static str) {
        self.outcome = outcome;
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        let Some(since) = self.since else {
            return;
        };
        waiting_nodes(self.service, -1);
        histogram!(WAIT_DURATION, "service" => self.service.to_owned(), "outcome" => self.outcome)
            .record(since.elapsed());
    }
}
