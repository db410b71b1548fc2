//! A readiness-probe server: serves Kubernetes' checks, the upgrade's status
//! and its metrics while Upsilon upgrades the data.
//!
//! - `GET /livez` (also `/healthz`, its former name): 200 while the process
//!   is alive, also while it waits or upgrades: point the liveness probe here.
//! - `GET /readyz`: 200 once the data is at this node's version, 503 before,
//!   with the status as JSON in the body: point the readiness probe here.
//! - `GET /upsilon/status`: the status as JSON.
//! - `GET /metrics`: the `upsilon_` metrics in Prometheus' text format.
//!
//! The first three are `upsilon::http::router` (feature `http`); `/metrics`
//! is `metrics-exporter-prometheus`'s recorder, rendered by an axum route.
//!
//! ```text
//! cargo run -p upsilon-examples --bin probe -- [ADDR] [SQLITE_PATH]
//! ```
//! `ADDR` defaults to 127.0.0.1:8080; the first line printed is the bound
//! address. SIGTERM or Ctrl-C stops it: mid-upgrade, the running task is
//! cancelled and recorded, and the lease released.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
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

/// Histogram buckets for the `_seconds` metrics: tasks and waits last from
/// milliseconds to an hour.
const BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Installs the Prometheus recorder, and keeps its histograms drained.
fn prometheus() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), BUCKETS)?
        .install_recorder()?;
    upsilon::metrics::describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// The probe's routes and `/metrics`.
fn app(probe: Probe, metrics: PrometheusHandle) -> Router {
    let health = probe.clone();
    Router::new()
        .route("/metrics", get(move || async move { metrics.render() }))
        .route(
            "/healthz",
            get(move || async move {
                if health.up() {
                    (StatusCode::OK, "live\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "down\n")
                }
            }),
        )
        .merge(upsilon::http::router(probe))
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

    let metrics = prometheus()?;
    let upsilon = Upsilon::builder()
        .service("probe-demo")
        .app_version("2.0")
        .backend(Arc::new(SqliteBackend::open(&db).await?))
        .build()?;
    let listener = TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let app = app(upsilon.probe(), metrics);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the probe server stopped");
        }
    });
    match upsilon.run_until(upsilon::shutdown_signal()).await {
        Ok(outcome) => println!("ready: {outcome}"),
        Err(upsilon::Error::Stopped { .. }) => {
            println!("stopped before the upgrade completed");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    }
    // A real service would serve traffic from here on; the demo keeps the
    // probe endpoints up until it is stopped.
    upsilon::shutdown_signal().await;
    Ok(())
}
