//! The subscription that wakes waiting nodes: one pub/sub connection per
//! backend, subscribed to the prefix's channel, on which releases, forced
//! releases and data version changes are published with the service as
//! the message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{oneshot, Notify};
use tracing::{debug, info};
use upsilon::backend::jitter;

/// Wake-ups for waiting nodes: a counter per service, bumped by each
/// message, and by every loss or return of the subscription (messages may
/// have been missed then).
#[derive(Debug, Default)]
pub(super) struct Wakeups {
    per_service: Mutex<HashMap<String, u64>>,
    seen: Mutex<HashMap<String, u64>>,
    resets: AtomicU64,
    notify: Notify,
    /// Whether the subscription is up.
    up: AtomicBool,
}

impl Wakeups {
    fn bump(&self, service: &str) {
        *self
            .per_service
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(service.to_owned())
            .or_default() += 1;
        self.notify.notify_waiters();
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        self.resets.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub(super) fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    fn generation(&self, service: &str) -> u64 {
        let own = self
            .per_service
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .copied()
            .unwrap_or(0);
        own.wrapping_add(self.resets.load(Ordering::SeqCst) << 32)
    }

    /// Remembers what the caller has seen of `service`: a wake-up after this
    /// ends the next wait at once, so none falls between a read and the wait
    /// that follows it.
    pub(super) fn mark_seen(&self, service: &str) {
        let g = self.generation(service);
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(service.to_owned(), g);
    }

    /// The generation the caller last saw of `service` (the current one if it
    /// never marked any).
    pub(super) fn take_seen(&self, service: &str) -> u64 {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(service)
            .unwrap_or_else(|| self.generation(service))
    }

    /// Until a wake-up for `service` after generation `seen` (`true`), or
    /// `timeout` (`false`).
    pub(super) async fn wait_since(&self, service: &str, seen: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.generation(service) != seen {
                return true;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }
}

/// What the subscription needs to know.
pub(super) struct Subscription {
    pub(super) client: redis::Client,
    pub(super) channel: String,
    pub(super) wakeups: Arc<Wakeups>,
    pub(super) connect_timeout: Duration,
    pub(super) check_every: Duration,
    pub(super) check_timeout: Duration,
    pub(super) target: String,
}

impl Subscription {
    /// Keeps the subscription up until the task is aborted: subscribes,
    /// forwards messages, pings every `check_every`, and when the connection
    /// ends or a ping goes unanswered, marks it down and subscribes again
    /// with a growing, jittered delay. `first` is told once the first
    /// attempt succeeded or failed.
    pub(super) async fn run(self, first: oneshot::Sender<()>) {
        let mut first = Some(first);
        let mut delay = Duration::from_millis(50);
        loop {
            let opened = tokio::time::timeout(self.connect_timeout, async {
                let (mut sink, stream) = self.client.get_async_pubsub().await?.split();
                sink.subscribe(&self.channel).await?;
                Ok::<_, redis::RedisError>((sink, stream))
            })
            .await;
            match opened {
                Ok(Ok((mut sink, mut stream))) => {
                    self.wakeups.set_up(true);
                    if let Some(f) = first.take() {
                        let _ = f.send(());
                    }
                    delay = Duration::from_millis(50);
                    let mut check = tokio::time::interval(self.check_every);
                    check.tick().await;
                    let why = loop {
                        tokio::select! {
                            msg = stream.next() => match msg {
                                Some(m) if m.get_channel_name() == self.channel => {
                                    if let Ok(service) = m.get_payload::<String>() {
                                        self.wakeups.bump(&service);
                                    }
                                }
                                Some(_) => {}
                                None => break "the connection closed",
                            },
                            _ = check.tick() => {
                                let ping = sink.ping::<redis::Value>();
                                match tokio::time::timeout(self.check_timeout, ping).await {
                                    Ok(Ok(_)) => {}
                                    Ok(Err(_)) => break "a ping failed",
                                    Err(_) => break "a ping went unanswered",
                                }
                            }
                        }
                    };
                    self.wakeups.set_up(false);
                    info!(target = %self.target, "the Redis subscription that wakes waiting nodes is down ({why}); they poll until it is back");
                }
                Ok(Err(e)) => {
                    debug!(target = %self.target, error = %e, "cannot subscribe; waiting nodes poll");
                }
                Err(_) => {
                    debug!(target = %self.target, "subscribing timed out; waiting nodes poll");
                }
            }
            if let Some(f) = first.take() {
                let _ = f.send(());
            }
            tokio::time::sleep(jitter(delay)).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}
