//! etcd's bare client, floor and request counts, with `etcd-client`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use etcd_client::Client;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::convergence::signed_ms;

const FLOOR_KEY: &str = "bench/floor";

/// A single member, fsync off, as the PostgreSQL server runs.
pub fn start() -> upsilon_test_servers::Etcd {
    upsilon_test_servers::Etcd::start()
}

/// Connect, and one `get`.
pub async fn bare(endpoint: &str) -> anyhow::Result<()> {
    let mut client = Client::connect([endpoint], None).await?;
    client.get("bench/nothing", None).await?;
    Ok(())
}

/// One put reaching `n` watchers, each on a client (a connection) of
/// its own, `repeats` times: ms from the put's reply to the last event.
pub async fn floor(endpoint: &str, n: usize, repeats: usize) -> anyhow::Result<Vec<f64>> {
    let delivered: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let mut watchers = Vec::with_capacity(n);
    for _ in 0..n {
        let mut client = Client::connect([endpoint], None).await?;
        let mut stream = client.watch(FLOOR_KEY, None).await?;
        // The watch is in place once etcd says it was created.
        let created = stream.message().await?.context("the watch ended")?;
        ensure!(
            created.created(),
            "the first watch response was not its creation"
        );
        let delivered = delivered.clone();
        watchers.push(tokio::spawn(async move {
            let _client = client;
            while let Ok(Some(resp)) = stream.message().await {
                if !resp.events().is_empty() {
                    delivered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Instant::now());
                }
            }
        }));
    }
    let mut client = Client::connect([endpoint], None).await?;
    let mut out = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        delivered.lock().unwrap_or_else(|p| p.into_inner()).clear();
        client.put(FLOOR_KEY, "x", None).await?;
        let acked = Instant::now();
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
                "a put reached only some watchers"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        out.push(signed_ms(last, acked));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for w in watchers {
        w.abort();
    }
    Ok(out)
}

/// The gRPC messages the server has received, per method
/// (`grpc_server_msg_received_total` of its `/metrics`, on the client
/// port): each unary call is one, each message on a stream (a watch
/// created, a keep-alive) one more.
pub async fn requests(endpoint: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut conn = tokio::net::TcpStream::connect(endpoint).await?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut body = String::new();
    conn.read_to_string(&mut body).await?;
    let mut out = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("grpc_server_msg_received_total{") else {
            continue;
        };
        let (labels, value) = rest.split_once("} ").context("a metrics line")?;
        let method = labels
            .split(',')
            .find_map(|l| l.strip_prefix("grpc_method=\""))
            .and_then(|m| m.strip_suffix('"'))
            .context("a metrics line without grpc_method")?;
        let count: f64 = value.trim().parse().context("a metrics value")?;
        if count > 0.0 {
            out.insert(method.to_owned(), count as u64);
        }
    }
    Ok(out)
}
