//! HTTP endpoints for Kubernetes' probes and for operators (feature `http`):
//! an [axum](https://docs.rs/axum) [`Router`] that an application merges into
//! its own.
//!
//! | route | answer |
//! |---|---|
//! | `GET /livez` | `200 live` while the process runs: also while it waits or upgrades, and after a failure. Point the liveness probe here: a long task must not get the node killed. |
//! | `GET /readyz` | `200` once the node is READY, `503` before and after a failure; the body is the [`Status`] as JSON. Point the readiness probe here. |
//! | `GET /upsilon/status` | `200` and the [`Status`] as JSON, for people and dashboards. |
//!
//! The JSON is one object whose `phase` is `starting`, `waiting`,
//! `upgrading`, `ready` or `failed`, with that phase's keys (the table is on
//! [`Status`]):
//!
//! ```json
//! {"phase":"upgrading","task":"backfill_accounts","version":"1.1.0","index":1,"total":3,
//!  "progress":{"done":40,"total":100,"message":"rows"}}
//! {"phase":"waiting","holder":{"host":"web-7f9c","pod":"web-7f9c-x2b","pid":1,"run_id":"4f2a9c0e1b3d5a77"}}
//! {"phase":"ready","data_version":"1.1.0"}
//! {"phase":"failed","error":"task backfill_accounts@1.1.0 failed on attempt 1: disk full"}
//! ```
//!
//! [`router`] returns a `Router<S>` for any state type `S`, so it merges
//! into an application's router whatever its state, before or after the
//! application's own `.with_state(...)`:
//!
//! ```no_run
//! use axum::{extract::State, routing::get, Router};
//!
//! #[derive(Clone)]
//! struct AppState { greeting: &'static str }
//!
//! # async fn demo(upsilon: upsilon::Upsilon) -> std::io::Result<()> {
//! let app = Router::new()
//!     .route("/hello", get(|State(s): State<AppState>| async move { s.greeting }))
//!     .merge(upsilon::http::router(upsilon.probe()))
//!     .with_state(AppState { greeting: "hello" });
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
//! tokio::spawn(async move { axum::serve(listener, app).await });
//! // Serve the probes while the upgrade runs.
//! let outcome = upsilon.run_until(upsilon::shutdown_signal()).await;
//! # drop(outcome); Ok(()) }
//! ```
//!
//! `Router::nest("/ops", upsilon::http::router(probe))` serves the same
//! routes under a prefix (`/ops/livez`, ...).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::status::{Probe, Status};

/// The router with `/livez`, `/readyz` and `/upsilon/status`, answering from
/// `probe` ([`Upsilon::probe`](crate::Upsilon::probe)).
///
/// It carries its own state, so it fits a router of any state type `S`
/// through `merge` or `nest`.
pub fn router<S>(probe: Probe) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/upsilon/status", get(status))
        .with_state(probe)
}

/// `200 live` as long as the process answers.
async fn livez(State(probe): State<Probe>) -> Response {
    if probe.up() {
        (StatusCode::OK, "live\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "down\n").into_response()
    }
}

/// `200` once READY, `503` otherwise; the status as JSON either way.
async fn readyz(State(probe): State<Probe>) -> Response {
    let status = probe.status();
    let code = if matches!(status, Status::Ready { .. }) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(status)).into_response()
}

/// The status as JSON.
async fn status(State(probe): State<Probe>) -> Json<Status> {
    Json(probe.status())
}
