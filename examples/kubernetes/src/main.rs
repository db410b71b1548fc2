//! The example service's process: reads its settings, serves its probes
//! and metrics at once, runs the upgrade (stopping cleanly on SIGTERM, which
//! releases the lease), then serves until it is stopped.
//!
//! Exit code 0 after a clean stop; 1 when the upgrade failed (Kubernetes
//! then restarts the pod, which tries again) or the settings are wrong.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tracing::{error, info};
use upsilon_example_kubernetes::{app, Settings};

/// Buckets for the `_seconds` metrics: waits and tasks last from
/// milliseconds to an hour.
const BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let settings = Settings::from(|k| std::env::var(k).ok())?;
    info!(?settings, "starting");
    let metrics = prometheus()?;
    let backend = upsilon_backends::connect(&settings.url).await?;
    let upsilon = settings.upsilon(backend)?;

    let listener = TcpListener::bind(("0.0.0.0", settings.port)).await?;
    let routes = app(upsilon.probe(), Some(metrics), &settings);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, routes).await {
            error!(error = %e, "the HTTP server stopped");
        }
    });

    match upsilon.run_until(upsilon::shutdown_signal()).await {
        Ok(outcome) => info!(%outcome, "ready"),
        Err(upsilon::Error::Stopped { .. }) => {
            info!("stopped before the upgrade was done; the lease is released");
            return Ok(());
        }
        Err(e) => {
            error!(error = %e, "the upgrade failed");
            return Err(e.into());
        }
    }
    upsilon::shutdown_signal().await;
    info!("stopping");
    Ok(())
}
