//! The holder's side of a lease: per held lease, a task that owns the etcd
//! lease's keep-alive stream (renewals go through it) and a watch on the
//! lease key, and that tells [`Lock::until_lost`](upsilon::backend::Lock::until_lost)
//! as soon as the lease may be gone:
//! - the keep-alive stream breaks (the server or the connection died);
//! - a keep-alive is answered with TTL 0 (the etcd lease expired or was
//!   revoked);
//! - the lease key is deleted (its lease expired, a forced release, an
//!   operator), or its watch breaks.
//!
//! etcd frees the key only when its lease expires on the server (or when
//! it is deleted by hand), and a renewal's keep-alive restarts that lease's
//! TTL on the server after the renewal was sent; so without a deletion by
//! hand, no other node can be granted the lease before the holder's local
//! deadline, signal or not.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{
    Client, EventType, LeaseKeepAliveStream, LeaseKeeper, WatchOptions, WatchStream,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use upsilon::backend::{BackendError, Lease};
use upsilon::Holder;

use super::error::{classify, driver_in, Class};

/// How many times a held lease's streams are tried to be opened.
const OPEN_TRIES: u32 = 4;

/// A keep-alive's answer: the etcd lease's TTL in seconds (0: it is gone).
type Renewal = Result<i64, BackendError>;

/// The leases this backend holds, by service and fence.
#[derive(Debug, Default)]
pub(super) struct Holding {
    ties: Mutex<HashMap<(String, u64), Tie>>,
}

#[derive(Debug)]
struct Tie {
    holder: Holder,
    lease_id: i64,
    /// Why the lease may be gone, once the task knows.
    lost: watch::Receiver<Option<String>>,
    renewals: mpsc::Sender<oneshot::Sender<Renewal>>,
    task: JoinHandle<()>,
}

impl Drop for Tie {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The open streams of a held lease, handed to its task.
pub(super) struct Streams {
    pub(super) keeper: LeaseKeeper,
    pub(super) answers: LeaseKeepAliveStream,
    pub(super) watch: WatchStream,
}

impl Streams {
    /// Opens the keep-alive stream of etcd lease `lease_id` (which also
    /// renews it once) and a watch on `key` from the revision after
    /// `create_revision`, so that a deletion after the grant is seen however
    /// late the watch starts.
    pub(super) async fn open(
        client: &Client,
        lease_id: i64,
        key: &str,
        create_revision: i64,
    ) -> Result<Streams, BackendError> {
        let (keeper, answers) = client
            .lease_client()
            .keep_alive(lease_id)
            .await
            .map_err(|e| match classify(&e) {
                Class::LeaseNotFound => {
                    BackendError::LeaseLost(format!("etcd lease {lease_id:x} is gone"))
                }
                _ => driver_in(e, "opening the lease's keep-alive stream"),
            })?;
        let watch = client
            .watch_client()
            .watch(
                key,
                Some(WatchOptions::new().with_start_revision(create_revision + 1)),
            )
            .await
            .map_err(|e| driver_in(e, "watching the lease key"))?;
        Ok(Streams {
            keeper,
            answers,
            watch,
        })
    }
}

impl Holding {
    fn ties(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u64), Tie>> {
        self.ties.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts holding `lease`, granted as etcd lease `lease_id` on a key
    /// created at `create_revision`: a task opens its streams and watches
    /// them. Replaces an earlier tie of the same lease.
    pub(super) fn tie(
        &self,
        client: &Client,
        lease: &Lease,
        lease_id: i64,
        key: String,
        create_revision: i64,
        streams: Option<Streams>,
    ) {
        let (lost_tx, lost) = watch::channel(None);
        let (renewals, requests) = mpsc::channel(4);
        let client = client.clone();
        let task = tokio::spawn(async move {
            let streams = match streams {
                Some(s) => s,
                None => {
                    // A connection error is tried again a few times: the
                    // endpoint probes take a dead member out meanwhile.
                    let mut tries = 0;
                    loop {
                        tries += 1;
                        match Streams::open(&client, lease_id, &key, create_revision).await {
                            Ok(s) => break s,
                            Err(e) if e.is_transient() && tries < OPEN_TRIES => {
                                tokio::time::sleep(Duration::from_millis(100) * tries).await;
                            }
                            Err(e) => {
                                lost_tx.send_replace(Some(format!(
                                    "its keep-alive stream and watch could not be opened: {e}"
                                )));
                                return;
                            }
                        }
                    }
                }
            };
            let why = hold(streams, create_revision, requests).await;
            lost_tx.send_replace(Some(why));
        });
        let mut ties = self.ties();
        // Leases lost without a release (expired, deleted) end their task;
        // whoever awaits their loss already has it.
        ties.retain(|_, t| !t.task.is_finished());
        ties.insert(
            (lease.service.clone(), lease.fence),
            Tie {
                holder: lease.holder.clone(),
                lease_id,
                lost,
                renewals,
                task,
            },
        );
    }

    /// The etcd lease and the renewal channel of `lease`, if it is held
    /// here and its streams are still sound.
    pub(super) fn renewer(
        &self,
        lease: &Lease,
    ) -> Option<(i64, mpsc::Sender<oneshot::Sender<Renewal>>)> {
        let ties = self.ties();
        let tie = ties.get(&(lease.service.clone(), lease.fence))?;
        (tie.holder == lease.holder && tie.lost.borrow().is_none())
            .then(|| (tie.lease_id, tie.renewals.clone()))
    }

    /// The lease was released or lost: its task stops.
    pub(super) fn untie(&self, lease: &Lease) {
        let mut ties = self.ties();
        let key = (lease.service.clone(), lease.fence);
        if ties.get(&key).is_some_and(|t| t.holder == lease.holder) {
            ties.remove(&key);
        }
    }

    /// Resolves when `lease` may no longer be held: see the module docs.
    /// Never for a lease not held here (no node takes it over before its
    /// expiry then, and the runner's deadline decides).
    pub(super) async fn until_lost(&self, lease: &Lease) -> BackendError {
        let found = self
            .ties()
            .get(&(lease.service.clone(), lease.fence))
            .filter(|t| t.holder == lease.holder)
            .map(|t| t.lost.clone());
        let Some(mut lost) = found else {
            return std::future::pending().await;
        };
        let gone = |why: &str| {
            BackendError::LeaseLost(format!(
                "the lease of `{}` (fence {}) {why}",
                lease.service, lease.fence
            ))
        };
        loop {
            if let Some(why) = lost.borrow_and_update().clone() {
                return gone(&why);
            }
            if lost.changed().await.is_err() {
                return gone("was released or lost");
            }
        }
    }
}

/// Serves renewals on `streams` and watches them; returns why the lease may
/// be gone. Ends (aborted) when the lease is untied.
async fn hold(
    streams: Streams,
    create_revision: i64,
    mut requests: mpsc::Receiver<oneshot::Sender<Renewal>>,
) -> String {
    let Streams {
        mut keeper,
        mut answers,
        mut watch,
    } = streams;
    // Keep-alive answers come in the order of the requests.
    let mut pending: VecDeque<oneshot::Sender<Renewal>> = VecDeque::new();
    let fail_all = |pending: &mut VecDeque<oneshot::Sender<Renewal>>, why: &str| {
        for reply in pending.drain(..) {
            let _ = reply.send(Err(BackendError::unavailable(why.to_owned())));
        }
    };
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some(reply) = request else {
                    return "was released".into();
                };
                if let Err(e) = keeper.keep_alive().await {
                    let why = format!("its keep-alive stream broke: {e}");
                    let _ = reply.send(Err(BackendError::unavailable(why.clone())));
                    fail_all(&mut pending, &why);
                    return why;
                }
                pending.push_back(reply);
            }
            answer = answers.message() => {
                let why = match answer {
                    Ok(Some(a)) => {
                        let ttl = a.ttl();
                        if let Some(reply) = pending.pop_front() {
                            let _ = reply.send(Ok(ttl));
                        }
                        if ttl > 0 {
                            continue;
                        }
                        "is gone in etcd: a keep-alive was answered with TTL 0 (the etcd lease expired or was revoked)".to_owned()
                    }
                    Ok(None) => "lost its keep-alive stream: the server closed it".to_owned(),
                    Err(e) => format!("lost its keep-alive stream: {}", driver_in(e, "")),
                };
                fail_all(&mut pending, &why);
                return why;
            }
            event = watch.message() => {
                let why = match event {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            format!("lost the watch on its key: the server cancelled it ({})", resp.cancel_reason())
                        } else if let Some(why) = resp.events().iter().find_map(|e| {
                            let kv = e.kv()?;
                            match e.event_type() {
                                EventType::Delete => Some("lost its key: it was deleted (the etcd lease expired, or it was released by force or by hand)".to_owned()),
                                EventType::Put if kv.create_revision() != create_revision => Some("lost its key: it was deleted and created again".to_owned()),
                                EventType::Put => None,
                            }
                        }) {
                            why
                        } else {
                            continue;
                        }
                    }
                    Ok(None) => "lost the watch on its key: the server closed it".to_owned(),
                    Err(e) => format!("lost the watch on its key: {}", driver_in(e, "")),
                };
                fail_all(&mut pending, &why);
                return why;
            }
        }
    }
}
