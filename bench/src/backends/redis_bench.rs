//! Redis's bare client, floor and command counts, with the `redis` crate.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use futures_util::StreamExt as _;

use crate::convergence::signed_ms;

const FLOOR_CHANNEL: &str = "bench:floor";

/// A server with an append-only file that is never synced, as the
/// PostgreSQL server runs with `fsync=off`.
pub fn start() -> upsilon_test_servers::Redis {
    upsilon_test_servers::Redis::builder()
        .appendonly(upsilon_test_servers::Fsync::No)
        .start()
}

/// Connect, and one GET.
pub async fn bare(url: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: Option<String> = redis::cmd("GET")
        .arg("bench:nothing")
        .query_async(&mut conn)
        .await?;
    Ok(())
}

/// One PUBLISH reaching `n` subscribed connections, `repeats` times:
/// ms from the PUBLISH's reply to the last delivery.
pub async fn floor(url: &str, n: usize, repeats: usize) -> anyhow::Result<Vec<f64>> {
    let client = redis::Client::open(url)?;
    let delivered: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let mut readers = Vec::with_capacity(n);
    for _ in 0..n {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(FLOOR_CHANNEL).await?;
        let mut messages = pubsub.into_on_message();
        let delivered = delivered.clone();
        readers.push(tokio::spawn(async move {
            while messages.next().await.is_some() {
                delivered
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Instant::now());
            }
        }));
    }
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut out = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        delivered.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let receivers: usize = redis::cmd("PUBLISH")
            .arg(FLOOR_CHANNEL)
            .arg("x")
            .query_async(&mut conn)
            .await?;
        let acked = Instant::now();
        ensure!(
            receivers == n,
            "a PUBLISH reached {receivers} of {n} subscribers"
        );
        let deadline = acked + Duration::from_secs(60);
        let last = loop {
            {
                let d = delivered.lock().unwrap_or_else(|p| p.into_inner());
                if d.len() >= n {
                    break d.iter().copied().max().unwrap_or(acked);
                }
            }
            ensure!(
                Instant::now() < deadline,
                "a PUBLISH reached only some subscribers"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        out.push(signed_ms(last, acked));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in readers {
        r.abort();
    }
    Ok(out)
}

/// `INFO commandstats`: the calls of each command since the server
/// started, commands run inside scripts included; `INFO` itself left out.
pub async fn commands(
    conn: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let mut out = BTreeMap::new();
    for line in info.lines() {
        let Some((name, fields)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        if name == "info" {
            continue;
        }
        let calls = fields
            .split(',')
            .find_map(|f| f.strip_prefix("calls="))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("INFO commandstats: {line}"))?;
        out.insert(name.to_owned(), calls);
    }
    Ok(out)
}
