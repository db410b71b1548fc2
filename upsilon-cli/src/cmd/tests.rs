//! The commands against the in-memory backend, which implements every
//! optional method: what SQLite and PostgreSQL show once they do too.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use upsilon::backend::{Acquire, Lock, Store};
use upsilon::testing::{holder, start_attempt, MemoryBackend};
use upsilon::{Task, TaskContext, TaskFuture};

use super::Ctx;
use crate::app::App;
use crate::args::UnlockArgs;
use crate::exit::Code;

fn ok(_: &mut TaskContext) -> TaskFuture<'_> {
    Box::pin(async { Ok(()) })
}

fn ctx(backend: &Arc<MemoryBackend>, service: Option<&str>) -> Ctx {
    Ctx {
        backend: backend.clone(),
        service: service.map(str::to_owned),
    }
}

fn json(out: &crate::output::Output) -> Value {
    serde_json::from_str(&out.json).unwrap()
}

#[test]
fn check_reports_every_problem_at_once() {
    let app = App::new("accounts", "1.1")
        .tasks([
            Task::new("1.0", 1, "a", ok).unwrap(),
            Task::new("1.0", 1, "b", ok).unwrap(),
            Task::new("1.0", 2, "b", ok).unwrap(),
            Task::new("2.0", 1, "later", ok).unwrap(),
        ])
        .require_tasks_from("billing-tasks")
        .configure(|b| b.ttl(Duration::from_millis(5)));
    let out = super::check::run(&app);
    assert_eq!(out.code, Code::Failed);
    let j = json(&out);
    assert_eq!(j["ok"], false);
    let kinds: Vec<&str> = j["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["duplicate_order", "duplicate_id", "config"], "{j}");

    // Without the duplicates, the rest shows.
    let app = App::new("accounts", "1.1")
        .tasks([
            Task::new("1.0", 1, "a", ok).unwrap(),
            Task::new("2.0", 1, "later", ok).unwrap(),
        ])
        .require_tasks_from("billing-tasks")
        .configure(|b| b.ttl(Duration::from_millis(5)));
    let j = json(&super::check::run(&app));
    let kinds: Vec<&str> = j["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["above_app", "missing_crate", "config"], "{j}");
    let text = super::check::run(&app).text;
    assert!(text.contains("add `use billing_tasks as _;`"), "{text}");
    assert!(text.contains("ttl: 5ms is too short"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn status_says_how_long_the_lease_has_been_held_where_the_store_knows() {
    let backend = MemoryBackend::new();
    let Acquire::Granted(lease) = backend
        .try_acquire("svc", &holder(1), Duration::from_secs(15))
        .await
        .unwrap()
    else {
        panic!("free")
    };
    backend.claim("svc", lease.fence).await.unwrap();
    backend
        .apply("svc", lease.fence, &[start_attempt("a", "1.1", 1)])
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(2)).await;
    let out = super::status::run(&ctx(&backend, Some("svc")))
        .await
        .unwrap();
    let j = json(&out);
    assert_eq!(j["lease"]["held_for_ms"], 2000);
    assert_eq!(j["running"]["elapsed_ms"], 2000);
    assert!(
        out.text
            .contains("with fence 1, for 2.0s; expires in 13.0s"),
        "{}",
        out.text
    );

    // Every service, when none is named.
    let all = super::services::run(&ctx(&backend, None)).await.unwrap();
    assert_eq!(json(&all), serde_json::json!({"services": ["svc"]}));
    let missing = super::status::run(&ctx(&backend, Some("nope")))
        .await
        .unwrap_err();
    assert_eq!(missing.code, Code::NotFound);
    assert!(
        missing.message.ends_with("; it holds: svc"),
        "{}",
        missing.message
    );
}

#[tokio::test(start_paused = true)]
async fn unlock_says_whom_it_freed_and_the_history_shows_it() {
    let backend = MemoryBackend::new();
    let Acquire::Granted(lease) = backend
        .try_acquire("svc", &holder(1), Duration::from_secs(15))
        .await
        .unwrap()
    else {
        panic!("free")
    };
    backend.claim("svc", lease.fence).await.unwrap();
    for _ in 0..13 {
        tokio::time::advance(Duration::from_secs(5)).await;
        backend.renew(&lease).await.unwrap();
    }
    let args = UnlockArgs {
        yes: true,
        no_wait: true,
    };
    let out = super::unlock::run(&ctx(&backend, Some("svc")), &args)
        .await
        .unwrap();
    assert!(
        out.text
            .starts_with("unlocked `svc`: freed the lease of node-1"),
        "{}",
        out.text
    );
    assert!(
        out.text.contains("with fence 1, held for 1m 5s"),
        "{}",
        out.text
    );
    assert!(
        out.text
            .contains("writes with fence 1 or older are refused"),
        "{}",
        out.text
    );
    let j = json(&out);
    assert_eq!(
        (&j["cleared"]["held_for_ms"], &j["fence"]),
        (&65_000.into(), &2.into())
    );
    let history = super::history::run(
        &ctx(&backend, Some("svc")),
        &crate::args::HistoryArgs {
            task_version: None,
            state: None,
        },
    )
    .await
    .unwrap();
    assert!(history.text.contains("unlock #1 by"), "{}", history.text);
    assert!(history.text.contains("held for 1m 5s"), "{}", history.text);
}
