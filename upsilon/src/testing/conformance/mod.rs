//! The conformance suite: what every [`Lock`] + [`Store`] must do.
//!
//! A backend's tests implement [`Harness`] for it and call [`run_all`], which
//! runs every check below in order and returns a [`Report`]; a failed check
//! panics with its name. Each check is also public, to run on its own.
//!
//! # What a harness provides
//!
//! Required:
//! - [`Harness::lock`] and [`Harness::store`]: the backend under test (one
//!   value may be both);
//! - [`Harness::corrupt`] and [`Harness::repair`]: make the stored data of a
//!   service unparsable behind the backend's back (for example a data version
//!   that is not a version), and undo it.
//!
//! Optional, each with a default:
//! - [`Harness::peer_lock`]: a second node's lock on the same backend, with a
//!   connection of its own, as a separate process has. The wait checks wait
//!   on it; by default it is [`Harness::lock`].
//! - [`Harness::min_ttl`]: the shortest TTL the backend honours.
//! - [`Harness::future_format`] and [`Harness::reset_format`]: mark the store
//!   as written by a newer format, for [`unknown_format_refused`].
//! - [`Harness::delete_state_row`] and [`Harness::delete_history`]: delete a
//!   service's rows by hand, as an operator might, for
//!   [`deleting_the_state_row_keeps_the_fence`] and
//!   [`deleting_the_history_keeps_the_fence`].
//!
//! A lock that keeps the default [`Lock::raise_fence`] (it refuses) skips
//! [`raise_fence_lifts_later_grants`]: it can only be used with its own store.
//!
//! A hook left at its default makes the checks that need it skip; the report
//! lists them. Waiting is checked either way: a lock whose
//! [`Lock::notifies`] is true must wake waiters promptly, one that does not
//! must return from [`Lock::wait`] by the timeout, and the report says which
//! ([`Wake`]).
//!
//! The suite needs a tokio runtime (either flavour; paused time works if the
//! backend's clock follows tokio's, as [`MemoryBackend`](super::MemoryBackend)'s
//! does). Each check works on services of its own (`conf<random>_<name>`),
//! so several runs can share one database, with one exception:
//! [`Harness::future_format`] marks the whole store, so nothing else may use
//! that store while [`unknown_format_refused`] runs.
//!
//! # Example
//!
//! A backend outside this crate depends on `upsilon` with the `testing`
//! feature (and on `async-trait`) in its dev-dependencies. Here the backend
//! under test is the in-memory one:
//!
//! ```
//! use std::sync::Arc;
//!
//! use upsilon::backend::{Lock, Store};
//! use upsilon::testing::conformance::{self, Harness, Wake};
//! use upsilon::testing::MemoryBackend;
//!
//! struct Mine(Arc<MemoryBackend>);
//!
//! #[async_trait::async_trait]
//! impl Harness for Mine {
//!     fn lock(&self) -> Arc<dyn Lock> {
//!         self.0.clone()
//!     }
//!     fn store(&self) -> Arc<dyn Store> {
//!         self.0.clone()
//!     }
//!     async fn corrupt(&self, service: &str) {
//!         self.0.set_corrupt(service, true);
//!     }
//!     async fn repair(&self, service: &str) {
//!         self.0.set_corrupt(service, false);
//!     }
//! }
//!
//! // In a backend's tests: `#[tokio::test] async fn conforms() { ... }`.
//! upsilon::testing::block_on(async {
//!     let report = conformance::run_all(&Mine(MemoryBackend::new())).await;
//!     assert_eq!(report.wake, Wake::Notifies);
//!     assert!(report.skipped.contains(&"unknown_format_refused"));
//! });
//! ```

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;

use crate::backend::{Acquire, AttemptState, Change, FinishAttempt, Lease, Lock, Store};
use crate::ids::{Holder, TaskKey};

use super::{holder, start_attempt, v};

mod checkpoint;
mod deletion;
mod lease;
mod operator;
mod store;
mod wait;

pub use checkpoint::{checkpoint_carried_by_a_start, checkpoint_refused, checkpoint_round_trip};
pub use deletion::{
    deleting_the_history_keeps_the_fence,
    deleting_the_state_row_after_a_bare_claim_keeps_the_fence,
    deleting_the_state_row_keeps_the_fence,
};

pub use lease::{
    exclusive, expiry_takeover, fence_grows, non_holder_refused, raise_fence_lifts_later_grants,
    renewal,
};
pub use operator::{force_release_keeps_the_fence, services_lists_what_the_store_holds};
pub use store::{
    corrupt_data_is_typed, history_round_trip, replay_is_idempotent, services_are_separate,
    stale_fence_refused, store_rules, unknown_format_refused,
};
pub use wait::{
    notice_comes_only_with_its_write, wait_blocks_until_a_change,
    wait_returns_at_once_after_a_change, wait_wakes_on_data_version, wait_wakes_on_release,
    Notices, Wake,
};

/// What the suite needs from a backend under test. See the
/// [module docs](self) for which methods are required.
#[async_trait]
pub trait Harness: Send + Sync {
    /// The lock under test.
    fn lock(&self) -> Arc<dyn Lock>;
    /// The store under test.
    fn store(&self) -> Arc<dyn Store>;
    /// Another node's lock on the same backend: its own connection (and
    /// notification session), as a separate process has. The wait checks
    /// wait on it while [`Harness::lock`] and [`Harness::store`] change the
    /// lease and the data version. Defaults to [`Harness::lock`].
    fn peer_lock(&self) -> Arc<dyn Lock> {
        self.lock()
    }
    /// The store of the same node as [`Harness::peer_lock`]: where the
    /// notification that woke it is received. Defaults to
    /// [`Harness::store`].
    fn peer_store(&self) -> Arc<dyn Store> {
        self.store()
    }
    /// The shortest TTL the backend honours (etcd: 2 s).
    fn min_ttl(&self) -> Duration {
        Duration::from_millis(300)
    }
    /// Makes the stored data of `service` unparsable (for example a data
    /// version that is not a version), behind the backend's back.
    async fn corrupt(&self, service: &str);
    /// Undoes [`Harness::corrupt`].
    async fn repair(&self, service: &str);
    /// Marks the store as written by a format newer than this build knows,
    /// and returns `true`; `false` where the backend has no format marker.
    /// [`Harness::reset_format`] undoes it.
    async fn future_format(&self) -> bool {
        false
    }
    /// Undoes [`Harness::future_format`].
    async fn reset_format(&self) {}
    /// Deletes what the backend keeps of `service` apart from its history
    /// (for SQL backends: its row in the state table, with the lease, the
    /// fence counters, the data version and the baseline), behind the
    /// backend's back, as an operator might by hand, and returns `true`.
    /// `false` (the default) where the harness cannot. For
    /// [`deleting_the_state_row_keeps_the_fence`] and
    /// [`deleting_the_state_row_after_a_bare_claim_keeps_the_fence`].
    async fn delete_state_row(&self, service: &str) -> bool {
        let _ = service;
        false
    }
    /// Deletes every history row of `service` and nothing else, behind the
    /// backend's back, and returns `true`. `false` (the default) where the
    /// harness cannot. For [`deleting_the_history_keeps_the_fence`].
    async fn delete_history(&self, service: &str) -> bool {
        let _ = service;
        false
    }
}

/// What [`run_all`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// The checks that ran and passed, in order.
    pub passed: Vec<&'static str>,
    /// The checks that did not run because the harness lacks the hook they
    /// need (see each check).
    pub skipped: Vec<&'static str>,
    /// How waiting nodes learn of changes: [`Wake::Polls`] if the lock did not
    /// notify in any of the wait checks.
    pub wake: Wake,
    /// Whether the store passes the holder's notice on to waiting nodes.
    pub notices: Notices,
}

/// Runs every check, in order, and says which ran and how waiting nodes wake.
/// Panics with the name of the first check that fails.
pub async fn run_all(h: &dyn Harness) -> Report {
    let prefix = format!("conf{:x}", crate::util::random_u64() & 0xffff_ffff);
    let svc = |name: &str| format!("{prefix}_{name}");
    let mut report = Report {
        passed: Vec::new(),
        skipped: Vec::new(),
        wake: Wake::Notifies,
        notices: Notices::Unsupported,
    };
    macro_rules! check {
        ($check:ident, $($service:expr),+) => {{
            let out = named(stringify!($check), $check(h, $(&$service),+)).await;
            report.record(stringify!($check), &out);
            out
        }};
    }
    check!(exclusive, svc("excl"));
    check!(fence_grows, svc("fence"));
    check!(renewal, svc("renew"));
    check!(expiry_takeover, svc("expiry"));
    check!(stale_fence_refused, svc("stale"));
    check!(non_holder_refused, svc("nonholder"));
    check!(store_rules, svc("rules"));
    check!(replay_is_idempotent, svc("replay"));
    check!(history_round_trip, svc("history"));
    check!(checkpoint_round_trip, svc("ckpt"));
    check!(checkpoint_refused, svc("ckpt_refused"));
    check!(checkpoint_carried_by_a_start, svc("ckpt_carried"));
    check!(services_are_separate, svc("a"), svc("b"));
    check!(corrupt_data_is_typed, svc("corrupt"));
    check!(force_release_keeps_the_fence, svc("force"));
    check!(raise_fence_lifts_later_grants, svc("raise"));
    check!(
        services_lists_what_the_store_holds,
        svc("listed"),
        svc("only_read")
    );
    check!(deleting_the_state_row_keeps_the_fence, svc("del_state"));
    check!(
        deleting_the_state_row_after_a_bare_claim_keeps_the_fence,
        svc("del_bare")
    );
    check!(deleting_the_history_keeps_the_fence, svc("del_history"));
    for wake in [
        check!(wait_wakes_on_release, svc("wake_release")),
        check!(wait_wakes_on_data_version, svc("wake_data")),
        check!(wait_returns_at_once_after_a_change, svc("wake_seen")),
        check!(wait_blocks_until_a_change, svc("wake_quiet")),
    ] {
        if wake == Wake::Polls {
            report.wake = Wake::Polls;
        }
    }
    report.notices = check!(notice_comes_only_with_its_write, svc("notice"));
    // Last: it marks the whole store.
    check!(unknown_format_refused, svc("format"));
    eprintln!(
        "conformance ({prefix}): {} checks passed; skipped for want of a harness hook: {}; {}; {}",
        report.passed.len(),
        if report.skipped.is_empty() {
            "none".to_owned()
        } else {
            report.skipped.join(", ")
        },
        match report.wake {
            Wake::Notifies =>
                "the lock notifies: waiters woke on release and on data-version changes",
            Wake::Polls =>
                "the lock does not notify: waiting nodes poll (wait returned by its timeout)",
        },
        match report.notices {
            Notices::Delivered => "the store passes the holder's notice on",
            Notices::Unsupported => "the store keeps no holder's notices",
        }
    );
    report
}

impl Report {
    fn record(&mut self, check: &'static str, out: &impl Ran) {
        if out.ran() {
            self.passed.push(check);
        } else {
            self.skipped.push(check);
        }
    }
}

/// What a check returns: whether it ran, or lacked its hook.
trait Ran {
    fn ran(&self) -> bool;
}

impl Ran for () {
    fn ran(&self) -> bool {
        true
    }
}

impl Ran for bool {
    fn ran(&self) -> bool {
        *self
    }
}

impl Ran for Notices {
    fn ran(&self) -> bool {
        true
    }
}

impl Ran for Wake {
    fn ran(&self) -> bool {
        true
    }
}

/// Runs `check`; if it panics, panics again with the check's name in front
/// of the message.
async fn named<T>(name: &'static str, check: impl Future<Output = T>) -> T {
    match CatchUnwind(Box::pin(check)).await {
        Ok(out) => out,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(a panic without a message)");
            panic!("conformance check `{name}` failed: {message}");
        }
    }
}

/// A future that turns a panic while polling `F` into an `Err`.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.get_mut().0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(payload)),
        }
    }
}

const TTL: Duration = Duration::from_secs(30);

/// Asks for the free lease and expects it. A lock that is its own store may
/// first answer that the store moved since its handle read it (a check
/// wrote to the store in between), but only once: asked again, without a
/// read, it grants.
async fn grant(lock: &dyn Lock, service: &str, who: &Holder, ttl: Duration) -> Lease {
    let mut answer = lock.try_acquire(service, who, ttl).await;
    if matches!(answer, Ok(Acquire::StoreMoved)) {
        answer = lock.try_acquire(service, who, ttl).await;
    }
    match answer {
        Ok(Acquire::Granted(lease)) => lease,
        other => panic!("conformance: {service}: {who} should get the free lease, got {other:?}"),
    }
}

fn finish(id: &str, version: &str, attempt: u32, state: AttemptState) -> Change {
    Change::Finish(FinishAttempt {
        key: key(id, version),
        attempt,
        state,
        error: (state == AttemptState::Failed).then(|| "boom; it said \"no\"".to_owned()),
        duration: Duration::from_millis(12),
    })
}

fn key(id: &str, version: &str) -> TaskKey {
    TaskKey {
        version: v(version),
        id: id.to_owned(),
    }
}
