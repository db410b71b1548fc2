//! Which endpoints the client sends requests to.
//!
//! The client spreads requests over the endpoints it is given and does not
//! skip one that refuses connections: a request sent there fails. So the
//! backend probes every endpoint (a TCP connect) before it connects, gives
//! the client only those that answer, and keeps probing in the background:
//! an endpoint that stops answering is taken out (never the last one), one
//! that answers again is put back. A request that fails on the connection
//! asks for a probe at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::Client;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{info, warn};
use upsilon::backend::jitter;

/// How often the endpoints are probed when nothing failed.
const PROBE_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub(super) struct Members {
    /// `HOST:PORT` and the URL the client knows it by.
    endpoints: Vec<(String, String)>,
    /// Whether the client has each endpoint.
    live: Mutex<Vec<bool>>,
    timeout: Duration,
    suspect: Notify,
}

/// Whether a TCP connection to `endpoint` opens within `timeout`; says why
/// not.
async fn probe(endpoint: String, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, TcpStream::connect(endpoint.as_str())).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no connection within {timeout:?}")),
    }
}

/// Probes every endpoint at once; the answers in the endpoints' order.
async fn probe_all(endpoints: &[(String, String)], timeout: Duration) -> Vec<Result<(), String>> {
    let mut probes = JoinSet::new();
    for (i, (endpoint, _)) in endpoints.iter().enumerate() {
        let endpoint = endpoint.clone();
        probes.spawn(async move { (i, probe(endpoint, timeout).await) });
    }
    let mut answers = vec![Err("not probed".to_owned()); endpoints.len()];
    while let Some(done) = probes.join_next().await {
        if let Ok((i, answer)) = done {
            answers[i] = answer;
        }
    }
    answers
}

impl Members {
    /// Probes `endpoints` (`HOST:PORT`, with their client URLs); the members
    /// and the URLs of those that answered, or why none did.
    pub(super) async fn probe(
        endpoints: Vec<(String, String)>,
        timeout: Duration,
    ) -> Result<(Members, Vec<String>), String> {
        let answers = probe_all(&endpoints, timeout).await;
        let live: Vec<bool> = answers.iter().map(Result::is_ok).collect();
        if !live.iter().any(|l| *l) {
            let why: Vec<String> = endpoints
                .iter()
                .zip(&answers)
                .map(|((e, _), a)| format!("{e}: {}", a.as_ref().err().map_or("", |s| s)))
                .collect();
            return Err(format!("no endpoint answered ({})", why.join("; ")));
        }
        let urls = endpoints
            .iter()
            .zip(&live)
            .filter(|(_, l)| **l)
            .map(|((_, url), _)| url.clone())
            .collect();
        Ok((
            Members {
                endpoints,
                live: Mutex::new(live),
                timeout,
                suspect: Notify::new(),
            },
            urls,
        ))
    }

    /// A request failed on its connection: probe now.
    pub(super) fn suspect(&self) {
        self.suspect.notify_one();
    }
}

/// Keeps the client's endpoints to those that answer, until aborted.
pub(super) async fn keep(client: Client, members: Arc<Members>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(jitter(PROBE_EVERY)) => {}
            _ = members.suspect.notified() => {}
        }
        let answers = probe_all(&members.endpoints, members.timeout).await;
        for (i, answer) in answers.into_iter().enumerate() {
            let (endpoint, url) = &members.endpoints[i];
            let (was, others) = {
                let live = members.live.lock().unwrap_or_else(|p| p.into_inner());
                (
                    live[i],
                    live.iter().filter(|l| **l).count() - usize::from(live[i]),
                )
            };
            let changed = match (was, answer) {
                (false, Ok(())) => {
                    info!(%endpoint, "an etcd endpoint answers again; sending to it");
                    client.add_endpoint(url.as_str()).await.is_ok()
                }
                (true, Err(why)) if others > 0 => {
                    warn!(%endpoint, error = %why, "an etcd endpoint does not answer; sending to the others");
                    client.remove_endpoint(url.as_str()).await.is_ok()
                }
                _ => false,
            };
            if changed {
                let mut live = members.live.lock().unwrap_or_else(|p| p.into_inner());
                live[i] = !was;
            }
        }
    }
}
