//! `upsilon::http` served on loopback and asked with a real HTTP client
//! while a node upgrades, waits, finishes and fails.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::Notify;
use upsilon::testing::{self, MemoryBackend};
use upsilon::{Builder, Error, Outcome, Status, Task, TaskContext, TaskFuture, Upsilon};

/// A task that reports progress, says it has started, and parks until the
/// gate opens.
fn parked(order: u32, id: &str, gate: &Arc<Notify>, entered: &Arc<Notify>) -> Task {
    let (gate, entered) = (gate.clone(), entered.clone());
    Task::new(
        "1.1",
        order,
        id,
        move |ctx: &mut TaskContext| -> TaskFuture<'_> {
            ctx.progress(3, 10, "rows");
            let (gate, entered) = (gate.clone(), entered.clone());
            Box::pin(async move {
                entered.notify_one();
                gate.notified().await;
                Ok(())
            })
        },
    )
    .unwrap()
}

fn quick(order: u32, id: &str) -> Task {
    Task::new("1.1", order, id, |_: &mut TaskContext| -> TaskFuture<'_> {
        Box::pin(async { Ok(()) })
    })
    .unwrap()
}

fn failing(order: u32, id: &str) -> Task {
    Task::new("1.1", order, id, |_: &mut TaskContext| -> TaskFuture<'_> {
        Box::pin(async { Err("disk full".into()) })
    })
    .unwrap()
}

fn node(backend: &Arc<MemoryBackend>, n: usize, tasks: Vec<Task>) -> Builder {
    Upsilon::builder()
        .service("web")
        .app_version("1.1")
        .backend(backend.clone())
        .holder(testing::holder(n))
        .ttl(Duration::from_secs(3))
        .poll_interval(Duration::from_millis(20))
        .tasks(tasks)
}

/// Serves `app` on a free loopback port; returns its base URL.
async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// GETs `url`: the status code and the body.
async fn get_text(client: &reqwest::Client, url: &str) -> (u16, String) {
    let response = client.get(url).send().await.unwrap();
    let code = response.status().as_u16();
    (code, response.text().await.unwrap())
}

/// GETs `url`, whose body is JSON.
async fn get_json(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = client.get(url).send().await.unwrap();
    let code = response.status().as_u16();
    let kind = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(kind, "application/json", "{url}");
    (code, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_follow_an_upgrade_from_a_parked_task_to_ready() {
    let backend = MemoryBackend::new();
    let (gate, entered) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let tasks = vec![parked(1, "backfill", &gate, &entered), quick(2, "check")];
    let canary = node(&backend, 1, tasks.clone()).build().unwrap();
    let base = serve(upsilon::http::router(canary.probe())).await;
    let client = reqwest::Client::new();

    let run = tokio::spawn({
        let canary = canary.clone();
        async move { canary.run().await }
    });
    entered.notified().await;

    assert_eq!(
        get_text(&client, &format!("{base}/livez")).await,
        (200, "live\n".to_owned()),
        "/livez is 200 in the middle of a task"
    );
    let upgrading = json!({
        "phase": "upgrading",
        "task": "backfill",
        "version": "1.1.0",
        "index": 1,
        "total": 2,
        "progress": {"done": 3, "total": 10, "message": "rows"},
        "checkpoint": null,
    });
    assert_eq!(
        get_json(&client, &format!("{base}/readyz")).await,
        (503, upgrading.clone())
    );
    assert_eq!(
        get_json(&client, &format!("{base}/upsilon/status")).await,
        (200, upgrading)
    );

    // A second node waits on the canary's lease, and says who holds it.
    let waiter = node(&backend, 2, tasks).build().unwrap();
    let waiter_base = serve(upsilon::http::router(waiter.probe())).await;
    let waiter_run = tokio::spawn({
        let waiter = waiter.clone();
        async move { waiter.run().await }
    });
    waiter
        .status()
        .wait_for(|s| matches!(s, Status::Waiting { .. }))
        .await
        .unwrap();
    let holder = testing::holder(1);
    let waiting = json!({
        "phase": "waiting",
        "holder": {"host": "node-1", "pod": null, "pid": holder.pid, "run_id": "test-run-1"},
    });
    assert_eq!(
        get_json(&client, &format!("{waiter_base}/readyz")).await,
        (503, waiting.clone())
    );
    assert_eq!(
        get_json(&client, &format!("{waiter_base}/upsilon/status")).await,
        (200, waiting)
    );
    assert_eq!(
        get_text(&client, &format!("{waiter_base}/livez")).await.0,
        200
    );

    gate.notify_one();
    assert!(matches!(
        run.await.unwrap().unwrap(),
        Outcome::Upgraded { .. }
    ));
    assert!(matches!(
        waiter_run.await.unwrap().unwrap(),
        Outcome::WaitedForOther { .. }
    ));
    let ready = json!({"phase": "ready", "data_version": "1.1.0"});
    for base in [&base, &waiter_base] {
        assert_eq!(
            get_json(&client, &format!("{base}/readyz")).await,
            (200, ready.clone())
        );
        assert_eq!(
            get_json(&client, &format!("{base}/upsilon/status")).await,
            (200, ready.clone())
        );
        assert_eq!(get_text(&client, &format!("{base}/livez")).await.0, 200);
    }
}

#[tokio::test]
async fn a_failed_upgrade_stays_unready_and_live() {
    let backend = MemoryBackend::new();
    let up = node(&backend, 1, vec![failing(1, "migrate")])
        .build()
        .unwrap();
    let base = serve(upsilon::http::router(up.probe())).await;
    let client = reqwest::Client::new();
    assert!(matches!(up.run().await, Err(Error::TaskFailed { .. })));

    let (code, body) = get_json(&client, &format!("{base}/readyz")).await;
    assert_eq!(code, 503);
    assert_eq!(body["phase"], "failed");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("migrate@1.1.0") && error.contains("disk full"),
        "{error}"
    );
    assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
    assert_eq!(get_text(&client, &format!("{base}/livez")).await.0, 200);
}

#[tokio::test]
async fn the_router_merges_and_nests_into_an_app_with_its_own_state() {
    #[derive(Clone)]
    struct AppState {
        greeting: &'static str,
    }
    let backend = MemoryBackend::new();
    let up = node(&backend, 1, vec![quick(1, "t")]).build().unwrap();
    let app = Router::new()
        .route(
            "/hello",
            get(|State(s): State<AppState>| async move { s.greeting }),
        )
        .merge(upsilon::http::router(up.probe()))
        .nest("/ops", upsilon::http::router(up.probe()))
        .with_state(AppState { greeting: "hi" });
    let base = serve(app).await;
    let client = reqwest::Client::new();

    assert_eq!(
        get_json(&client, &format!("{base}/upsilon/status")).await,
        (200, json!({"phase": "starting"}))
    );
    assert_eq!(get_text(&client, &format!("{base}/readyz")).await.0, 503);
    up.run().await.unwrap();
    assert_eq!(
        get_text(&client, &format!("{base}/hello")).await,
        (200, "hi".to_owned())
    );
    for prefix in ["", "/ops"] {
        assert_eq!(
            get_text(&client, &format!("{base}{prefix}/readyz")).await.0,
            200
        );
        assert_eq!(
            get_text(&client, &format!("{base}{prefix}/livez")).await.0,
            200
        );
    }
    assert_eq!(get_text(&client, &format!("{base}/nope")).await.0, 404);
}
