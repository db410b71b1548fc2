//! A readiness-probe server: serves Kubernetes' two checks while Upsilon
//! upgrades the data.
//!
//! - `GET /healthz`: 200 while the process is alive (`probe.up()`), also while
//!   it waits or upgrades: point the liveness probe here.
//! - `GET /readyz`: 200 once the data is at this node's version
//!   (`probe.ready()`), 503 before, with the status in the body: point the
//!   readiness probe here.
//!
//! ```text
//! cargo run -p upsilon-examples --bin probe -- [ADDR] [SQLITE_PATH]
//! ```
//! `ADDR` defaults to 127.0.0.1:8080; the first line printed is the bound address.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use upsilon::{Probe, TaskContext, Upsilon};
use upsilon_backends::sqlite::SqliteBackend;

/// A slow backfill, so that `/readyz` is 503 for a moment.
#[upsilon::task(version = "2.0", order = 1)]
async fn slow_backfill(ctx: &mut TaskContext) -> anyhow::Result<()> {
    for done in 1..=10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ctx.progress(done, 10, "batches");
    }
    Ok(())
}

/// Answers one HTTP/1.1 request from the probe.
async fn answer(mut stream: tokio::net::TcpStream, probe: Probe) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // Read the request head; the probe sends no body.
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request = String::from_utf8_lossy(&buf);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (ok, body) = match path {
        "/healthz" => (probe.up(), "up".to_owned()),
        "/readyz" => (probe.ready(), probe.status().to_string()),
        _ => (false, "not found".to_owned()),
    };
    let status = match (path, ok) {
        ("/healthz" | "/readyz", true) => "200 OK",
        ("/healthz" | "/readyz", false) => "503 Service Unavailable",
        _ => "404 Not Found",
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    let dir = tempfile::tempdir()?;
    let db = args
        .next()
        .map(Into::into)
        .unwrap_or_else(|| dir.path().join("probe.db"));

    let upsilon = Upsilon::builder()
        .service("probe-demo")
        .app_version("2.0")
        .backend(Arc::new(SqliteBackend::open(&db).await?))
        .build()?;
    let listener = TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let probe = upsilon.probe();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, probe.clone()));
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            }
        }
    });
    let outcome = upsilon.run().await?;
    println!("ready: {outcome}");
    // A real service would serve traffic from here on; the demo keeps the
    // probe endpoints up until it is stopped.
    tokio::signal::ctrl_c().await?;
    Ok(())
}
