//! Two watches per backend, one on the Leases and one on the state
//! ConfigMaps of its prefix: they keep what waiting nodes compare against
//! (each service's holder and fence, its data version and baseline) and
//! wake them when it changes. A watch that breaks is taken up again from
//! the last `resourceVersion` it saw (bookmarks keep that recent), and from
//! a fresh list when the API server has compacted past it (410 Gone);
//! while none runs, [`Watches::synced`] is false and waiting nodes poll.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::Resource;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;
use upsilon::backend::jitter;

/// What the watches follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Lease,
    State,
}

/// What a waiting node compares of one object: for a Lease, the holder and
/// its fence; for a state ConfigMap, the data version and the baseline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Its `resourceVersion`, as a number ([`rv_number`]) and as it came.
    pub(crate) rv: u64,
    pub(crate) version: String,
    pub(crate) a: Option<String>,
    pub(crate) b: Option<String>,
}

#[derive(Debug, Default)]
struct Cache {
    /// By service.
    objects: HashMap<String, Entry>,
    /// The newest `resourceVersion` the watch has seen: everything up to it
    /// is in `objects`.
    progress: u64,
    synced: bool,
}

/// When this node last saw a Lease change, on its own monotonic clock.
#[derive(Debug, Clone)]
pub(crate) struct Observed {
    pub(crate) rv: String,
    pub(crate) at: Instant,
}

/// The state the watches keep, shared with the backend.
#[derive(Debug, Default)]
pub(crate) struct Watches {
    caches: Mutex<HashMap<Kind, Cache>>,
    observed: Mutex<HashMap<String, Observed>>,
    pub(crate) notify: Notify,
}

/// A `resourceVersion` as a number. The API asks clients to treat them as
/// opaque; every API server backed by etcd hands out etcd revisions, which
/// grow. Only the wake-ups compare them (never a decision about the lease):
/// one that does not parse counts as 0, so a waiter does not wait for the
/// watch to catch up with it.
pub(crate) fn rv_number(rv: Option<&str>) -> u64 {
    rv.and_then(|r| r.parse().ok()).unwrap_or(0)
}

impl Watches {
    fn with<T>(&self, kind: Kind, f: impl FnOnce(&mut Cache) -> T) -> T {
        let mut caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        f(caches.entry(kind).or_default())
    }

    /// Whether both watches run.
    pub(crate) fn synced(&self) -> bool {
        let caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        [Kind::Lease, Kind::State]
            .iter()
            .all(|k| caches.get(k).is_some_and(|c| c.synced))
    }

    /// The watch's view of `service`, once it has seen everything up to
    /// `rv`: `Some(None)` when it holds no such object; `None` while it is
    /// behind or not running.
    pub(crate) fn view(&self, kind: Kind, service: &str, rv: u64) -> Option<Option<Entry>> {
        self.with(kind, |c| {
            (c.synced && c.progress >= rv).then(|| c.objects.get(service).cloned())
        })
    }

    fn set_synced(&self, kind: Kind, synced: bool) {
        let changed = self.with(kind, |c| std::mem::replace(&mut c.synced, synced) != synced);
        if changed {
            debug!(?kind, synced, "watch");
            self.notify.notify_waiters();
        }
    }

    fn replace_all(&self, kind: Kind, objects: HashMap<String, Entry>, progress: u64) {
        self.with(kind, |c| {
            c.objects = objects;
            c.progress = progress;
            c.synced = true;
        });
        if kind == Kind::Lease {
            let caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = caches.get(&Kind::Lease) {
                for (service, e) in &c.objects {
                    self.observe(service, &e.version);
                }
            }
        }
        self.notify.notify_waiters();
    }

    fn upsert(&self, kind: Kind, service: String, entry: Entry) {
        if kind == Kind::Lease {
            self.observe(&service, &entry.version);
        }
        self.with(kind, |c| {
            c.progress = c.progress.max(entry.rv);
            c.objects.insert(service, entry);
        });
        self.notify.notify_waiters();
    }

    fn remove(&self, kind: Kind, service: &str, rv: u64) {
        self.with(kind, |c| {
            c.progress = c.progress.max(rv);
            c.objects.remove(service);
        });
        self.notify.notify_waiters();
    }

    fn progress(&self, kind: Kind, rv: u64) {
        self.with(kind, |c| c.progress = c.progress.max(rv));
        self.notify.notify_waiters();
    }

    /// Records that this node sees the Lease of `service` at `rv` now, and
    /// returns when it first saw it at that `resourceVersion`.
    pub(crate) fn observe(&self, service: &str, rv: &str) -> Instant {
        let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        match observed.get(service) {
            Some(o) if o.rv == rv => o.at,
            _ => {
                let at = Instant::now();
                observed.insert(
                    service.to_owned(),
                    Observed {
                        rv: rv.to_owned(),
                        at,
                    },
                );
                at
            }
        }
    }

    /// Forgets what was seen of the Lease of `service` (it is gone).
    pub(crate) fn forget(&self, service: &str) {
        self.observed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(service);
    }
}

/// How a watch reads its objects: the service each belongs to, and what
/// waiting nodes compare of it.
pub(crate) type Project<K> = fn(&K) -> Option<(String, Entry)>;

/// Lists and watches the objects `selector` matches, forever, keeping
/// `shared` up to date. Runs until its task is aborted.
pub(crate) async fn follow<K>(
    api: Api<K>,
    selector: String,
    kind: Kind,
    shared: std::sync::Arc<Watches>,
    project: Project<K>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut backoff = Duration::from_millis(100);
    let pause = |backoff: &mut Duration| {
        let nap = jitter(*backoff);
        *backoff = (*backoff * 2).min(Duration::from_secs(5));
        tokio::time::sleep(nap)
    };
    'list: loop {
        let list = match api.list(&ListParams::default().labels(&selector)).await {
            Ok(l) => l,
            Err(e) => {
                debug!(?kind, error = %e, "listing for the watch failed; polling until it works");
                shared.set_synced(kind, false);
                pause(&mut backoff).await;
                continue;
            }
        };
        let mut rv = list.metadata.resource_version.clone().unwrap_or_default();
        let objects = list.items.iter().filter_map(project).collect();
        shared.replace_all(kind, objects, rv_number(Some(&rv)));
        loop {
            // Bookmarks are asked for by default (allowWatchBookmarks).
            let wp = WatchParams::default().labels(&selector).timeout(290);
            let stream = match api.watch(&wp, &rv).await {
                Ok(s) => s,
                Err(kube::Error::Api(e)) if e.code == 410 => continue 'list,
                Err(e) => {
                    debug!(?kind, error = %e, "the watch could not start; polling until it does");
                    shared.set_synced(kind, false);
                    pause(&mut backoff).await;
                    continue;
                }
            };
            shared.set_synced(kind, true);
            backoff = Duration::from_millis(100);
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => {
                        if let Some(r) = o.meta().resource_version.clone() {
                            rv = r;
                        }
                        if let Some((service, entry)) = project(&o) {
                            shared.upsert(kind, service, entry);
                        }
                    }
                    Ok(WatchEvent::Deleted(o)) => {
                        if let Some(r) = o.meta().resource_version.clone() {
                            rv = r;
                        }
                        if let Some((service, entry)) = project(&o) {
                            shared.remove(kind, &service, entry.rv);
                        }
                    }
                    Ok(WatchEvent::Bookmark(b)) => {
                        rv = b.metadata.resource_version;
                        shared.progress(kind, rv_number(Some(&rv)));
                    }
                    Ok(WatchEvent::Error(e)) if e.code == 410 => continue 'list,
                    Ok(WatchEvent::Error(e)) => {
                        debug!(?kind, error = %e.message, "the watch ended with an error");
                        break;
                    }
                    Err(e) => {
                        debug!(?kind, error = %e, "the watch broke");
                        break;
                    }
                }
            }
            // Ended: the server's timeout, or a broken connection. Until the
            // next watch is up, waiting nodes poll.
            shared.set_synced(kind, false);
            pause(&mut Duration::from_millis(50)).await;
        }
    }
}
