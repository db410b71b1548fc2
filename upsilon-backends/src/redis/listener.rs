//! The subscription that wakes waiting nodes: one pub/sub connection per
//! backend, subscribed to the prefix's channel, on which releases, forced
//! releases and data version changes are published with the service as
//! the message.

use std::sync::Arc;
use std::time::Duration;

use crate::wakeups::Wakeups;
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tracing::{debug, info};
use upsilon::backend::jitter;

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
