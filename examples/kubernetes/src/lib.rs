//! A small service that deploys on Kubernetes as it is (see
//! `examples/kubernetes/` and docs/KUBERNETES.md): its upgrade tasks, the
//! HTTP endpoints its probes and Prometheus read, and the settings it takes
//! from its environment. `main.rs` puts them together.
//!
//! | route | answer |
//! |---|---|
//! | `GET /livez` | 200 while the process runs, also through a long upgrade: the liveness probe |
//! | `GET /readyz` | 200 once the data is at this version, 503 before: the readiness probe |
//! | `GET /upsilon/status` | the upgrade's status as JSON |
//! | `GET /metrics` | the `upsilon_` metrics, Prometheus' text format |
//! | `GET /` | the service itself: its version and pod |

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use upsilon::{Probe, TaskContext};

/// The port it serves on unless `PORT` says otherwise; the manifests'
/// `containerPort`.
pub const PORT: u16 = 8080;
/// The liveness probe's path.
pub const LIVENESS_PATH: &str = "/livez";
/// The readiness probe's path.
pub const READINESS_PATH: &str = "/readyz";
/// Where Prometheus scrapes.
pub const METRICS_PATH: &str = "/metrics";
/// The environment variables it reads, with what each does.
pub const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "POD_NAME",
        "the pod's name (downward API): the lease holder's name",
    ),
    ("APP_VERSION", "the version this pod plays (default: 1.1.0)"),
    (
        "UPSILON_URL",
        "the backend (default kubernetes://, the pod's own namespace)",
    ),
    (
        "UPSILON_SERVICE",
        "the service name the lease and store are scoped by (default accounts)",
    ),
    ("PORT", "the HTTP port (default 8080)"),
    (
        "BACKFILL_SECONDS",
        "how long the 1.1 backfill runs (default 60)",
    ),
];

/// How long the 1.1 backfill runs: a resource the task reads.
#[derive(Debug, Clone, Copy)]
pub struct Backfill(pub Duration);

/// 1.0: the accounts table (here: a moment's work).
#[upsilon::task(version = "1.0", order = 1)]
async fn create_accounts(_ctx: &mut TaskContext) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// 1.1: fills the new balance column, batch by batch, reporting progress.
/// A long task: the liveness probe stays green throughout, the readiness
/// probe red until it is done.
#[upsilon::task(version = "1.1", order = 1)]
async fn backfill_balances(ctx: &mut TaskContext) -> anyhow::Result<()> {
    let Backfill(total) = *ctx.resource::<Backfill>()?;
    let batches = 20u64;
    for done in 1..=batches {
        tokio::time::sleep(total / batches as u32).await;
        ctx.progress(done, batches, "batches of accounts");
    }
    Ok(())
}

/// 1.1: checks the backfill (here: a moment's work).
#[upsilon::task(version = "1.1", order = 2)]
async fn check_balances(_ctx: &mut TaskContext) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Its settings, from the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    pub service: String,
    pub app_version: String,
    pub pod: Option<String>,
    pub port: u16,
    pub backfill: Duration,
}

impl Settings {
    /// Reads [`ENVIRONMENT`] through `var`.
    pub fn from(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Settings> {
        let port = match var("PORT") {
            Some(p) => p
                .parse()
                .map_err(|_| anyhow::anyhow!("PORT={p:?} is not a port number"))?,
            None => PORT,
        };
        let backfill = match var("BACKFILL_SECONDS") {
            Some(s) => Duration::from_secs(
                s.parse()
                    .map_err(|_| anyhow::anyhow!("BACKFILL_SECONDS={s:?} is not a number"))?,
            ),
            None => Duration::from_secs(60),
        };
        Ok(Settings {
            url: var("UPSILON_URL").unwrap_or_else(|| "kubernetes://".to_owned()),
            service: var("UPSILON_SERVICE").unwrap_or_else(|| "accounts".to_owned()),
            app_version: var("APP_VERSION").unwrap_or_else(|| "1.1.0".to_owned()),
            pod: var("POD_NAME").filter(|p| !p.is_empty()),
            port,
            backfill,
        })
    }

    /// The runner for these settings on `backend`.
    pub fn upsilon(
        &self,
        backend: std::sync::Arc<dyn upsilon::backend::Backend>,
    ) -> Result<upsilon::Upsilon, upsilon::Error> {
        upsilon::Upsilon::builder()
            .service(&self.service)
            .app_version(&self.app_version)
            .backend(backend)
            .resource(Backfill(self.backfill))
            .build()
    }
}

/// The service's routes: the probes, the status, the metrics, and `/`.
pub fn app(probe: Probe, metrics: Option<PrometheusHandle>, settings: &Settings) -> Router {
    let hello = format!(
        "accounts {} on {}\n",
        settings.app_version,
        settings.pod.as_deref().unwrap_or("this host")
    );
    let mut router = Router::new().route("/", get(move || async move { hello }));
    if let Some(m) = metrics {
        router = router.route(METRICS_PATH, get(move || async move { m.render() }));
    }
    router.merge(upsilon::http::router(probe))
}
