//! Wake-ups for waiting nodes: one watch per backend on every service's
//! keys, which records the revision of the newest change to each service's
//! lease key and state key (release, expiry, grant, data version).
//!
//! A wait returns at once when a change newer than the revision the caller
//! read at has arrived, and otherwise on the next one. The watch resumes
//! from the revision after the last one it saw when its stream breaks, so
//! no change falls between two streams; while it is down, waiting nodes
//! poll ([`Wakeups::is_up`]), and every loss wakes them, since a change may
//! have been missed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, WatchOptions};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};
use upsilon::backend::jitter;

use super::keys::{Keys, Kind};

#[derive(Debug, Default)]
pub(super) struct Wakeups {
    /// The revision of the newest change seen, per service.
    latest: Mutex<HashMap<String, i64>>,
    /// The revision each service was last read at by this backend.
    seen: Mutex<HashMap<String, i64>>,
    /// Bumped whenever the watch stops: changes may have been missed.
    resets: AtomicU64,
    up: AtomicBool,
    notify: Notify,
}

impl Wakeups {
    pub(super) fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    fn changed(&self, service: String, revision: i64) {
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let at = latest.entry(service).or_default();
        *at = (*at).max(revision);
        drop(latest);
        self.notify.notify_waiters();
    }

    fn set_up(&self, up: bool) {
        let was = self.up.swap(up, Ordering::SeqCst);
        if was && !up {
            self.resets.fetch_add(1, Ordering::SeqCst);
            self.notify.notify_waiters();
        }
    }

    fn latest(&self, service: &str) -> i64 {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .copied()
            .unwrap_or(0)
    }

    /// Remembers that `service` was read at `revision`: a change after it
    /// ends the next wait at once.
    pub(super) fn mark_seen(&self, service: &str, revision: i64) {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(service.to_owned(), revision);
    }

    /// Until a change of `service` after the revision it was last read at
    /// (`true`), the watch going down (`true`), or `timeout` (`false`).
    /// Without a watch, sleeps for `timeout`.
    pub(super) async fn wait(&self, service: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let since = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(service)
            .unwrap_or_else(|| self.latest(service));
        if !self.is_up() {
            tokio::time::sleep_until(deadline).await;
            return false;
        }
        let resets = self.resets.load(Ordering::SeqCst);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.latest(service) > since || self.resets.load(Ordering::SeqCst) != resets {
                return true;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }
}

/// Starts the watch of every service's keys from `from` (the revision after
/// one this backend has read at), and returns once it is up, or has failed,
/// or `limit` has passed (it keeps trying in the background then). The task
/// ends when its handle is aborted.
pub(super) async fn start(
    client: Client,
    keys: Keys,
    wakeups: Arc<Wakeups>,
    from: i64,
    limit: Duration,
) -> JoinHandle<()> {
    let (ready, is_ready) = oneshot::channel();
    let task = tokio::spawn(run(client, keys, wakeups, from, ready));
    let _ = tokio::time::timeout(limit, is_ready).await;
    task
}

async fn run(
    client: Client,
    keys: Keys,
    wakeups: Arc<Wakeups>,
    mut from: i64,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    loop {
        let why = watch(&client, &keys, &wakeups, &mut from, &mut ready).await;
        wakeups.set_up(false);
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        debug!(error = %why, "the etcd watch stopped; waiting nodes poll until it is back");
        tokio::time::sleep(jitter(backoff)).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One watch stream, until it fails; says why. `from` follows the
/// revisions seen, so that the next stream resumes after them.
async fn watch(
    client: &Client,
    keys: &Keys,
    wakeups: &Wakeups,
    from: &mut i64,
    ready: &mut Option<oneshot::Sender<()>>,
) -> String {
    let options = WatchOptions::new().with_prefix().with_start_revision(*from);
    let mut stream = match client
        .watch_client()
        .watch(keys.services(), Some(options))
        .await
    {
        Ok(s) => s,
        Err(e) => return format!("opening it failed: {e}"),
    };
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return "the server ended the stream".into(),
            Err(e) => return e.to_string(),
        };
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                // The revisions after `from` were compacted away: start from
                // now, and wake everyone, since changes were missed.
                warn!(
                    compacted = resp.compact_revision(),
                    "the etcd watch fell behind a compaction; waking every waiting node"
                );
                *from = resp.compact_revision();
            }
            return format!("the server cancelled it: {}", resp.cancel_reason());
        }
        if resp.created() {
            wakeups.set_up(true);
            if let Some(r) = ready.take() {
                let _ = r.send(());
            }
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            *from = (*from).max(kv.mod_revision() + 1);
            if let Some((service, Kind::Lock | Kind::State)) = keys.parse(kv.key()) {
                wakeups.changed(service, kv.mod_revision());
            }
        }
    }
}
