//! The `accounts` example's embedded commands end to end, against SQLite
//! and a real PostgreSQL: `check` and `plan` know the binary's tasks, and
//! follow the store as builds of 1.0 and 1.1 roll it forward.

use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::Value;
use upsilon_test_servers::Postgres;

static PG: OnceLock<Postgres> = OnceLock::new();

fn server() -> &'static Postgres {
    PG.get_or_init(Postgres::start)
}

/// `accounts` at app version `version`, on the store `url`.
fn accounts(url: Option<&str>, version: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_accounts"));
    c.env_remove("UPSILON_URL")
        .env_remove("UPSILON_SERVICE")
        .env("ACCOUNTS_APP_VERSION", version)
        .env("ACCOUNTS_BATCH_MS", "1")
        .stdin(Stdio::null());
    if let Some(url) = url {
        c.env("UPSILON_URL", url);
    }
    c
}

#[track_caller]
fn run(cmd: &mut Command, code: i32) -> (String, String) {
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    );
    assert_eq!(out.status.code(), Some(code), "{stdout}\n{stderr}");
    // Once this binary's server runs, nothing may print its password.
    if let Some(pw) = PG.get().map(Postgres::password) {
        assert!(
            !stdout.contains(pw) && !stderr.contains(pw),
            "{stdout}\n{stderr}"
        );
    }
    (stdout, stderr)
}

fn json(cmd: &mut Command, code: i32) -> Value {
    let (stdout, _) = run(cmd, code);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn ids(steps: &Value) -> Vec<(String, String)> {
    steps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_owned(),
                s["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn pair(id: &str, reason: &str) -> (String, String) {
    (id.to_owned(), reason.to_owned())
}

#[test]
fn check_validates_the_registered_tasks_without_a_store() {
    let j = json(
        accounts(None, "1.1.0").args(["upsilon", "check", "--json"]),
        0,
    );
    assert_eq!(
        (&j["ok"], &j["service"], &j["app_version"]),
        (&true.into(), &"accounts".into(), &"1.1.0".into())
    );
    assert_eq!(j["tasks"].as_array().unwrap().len(), 3);
    assert_eq!(j["crates"], serde_json::json!({"accounts": 3}));
    assert_eq!(j["problems"], Value::Array(vec![]));
    let task = &j["tasks"][2];
    for field in [
        "version",
        "order",
        "id",
        "description",
        "location",
        "has_rollback",
    ] {
        assert!(task.get(field).is_some(), "{field} in {task}");
    }
    let (text, _) = run(accounts(None, "1.1.0").args(["upsilon", "check"]), 0);
    assert!(text.contains("ok: no problems"), "{text}");

    // A build of 1.0 holds tasks it cannot run: a problem for CI.
    let j = json(
        accounts(None, "1.0").args(["upsilon", "check", "--json"]),
        1,
    );
    assert_eq!(
        (&j["ok"], &j["app_version"]),
        (&false.into(), &"1.0.0".into())
    );
    let kinds: Vec<&str> = j["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["above_app", "above_app"]);
    let (text, _) = run(accounts(None, "1.0").args(["upsilon", "check"]), 1);
    assert!(
        text.contains("2 problems:") && text.contains("above the app version 1.0.0"),
        "{text}"
    );
}

fn plan_follows_the_store(url: &str) {
    // A fresh store: every task, because the store has no data version.
    let j = json(
        accounts(Some(url), "1.1.0").args(["upsilon", "plan", "--json"]),
        0,
    );
    for field in [
        "service",
        "app_version",
        "data_version",
        "baseline",
        "data_ahead",
        "steps",
        "out_of_order",
        "above_app",
        "lease",
    ] {
        assert!(j.get(field).is_some(), "{field} in {j}");
    }
    assert_eq!(j["data_version"], Value::Null);
    assert_eq!(
        ids(&j["steps"]),
        [
            pair("create_accounts", "fresh_store"),
            pair("add_email_normalized", "fresh_store"),
            pair("backfill-email-normalized", "fresh_store")
        ]
    );
    assert!(
        j["steps"][0]["why"]
            .as_str()
            .unwrap()
            .contains("no data version"),
        "{j}"
    );
    // A build of 1.0 plans its own task and leaves 1.1's out.
    let j = json(
        accounts(Some(url), "1.0.0").args(["upsilon", "plan", "--json"]),
        0,
    );
    assert_eq!(ids(&j["steps"]), [pair("create_accounts", "fresh_store")]);
    assert_eq!(ids(&j["above_app"]).len(), 2);

    // 1.0 rolls out; 1.1 is left to do.
    run(accounts(Some(url), "1.0.0").arg("serve"), 0);
    let j = json(
        accounts(Some(url), "1.1.0").args(["upsilon", "plan", "--json"]),
        0,
    );
    assert_eq!(j["data_version"], "1.0.0");
    assert_eq!(
        ids(&j["steps"]),
        [
            pair("add_email_normalized", "pending"),
            pair("backfill-email-normalized", "pending")
        ]
    );
    let (text, _) = run(accounts(Some(url), "1.1.0").args(["upsilon", "plan"]), 0);
    assert!(text.contains("2 tasks to run, in order:"), "{text}");
    assert!(
        text.contains("1. add_email_normalized@1.1.0 (order 1)"),
        "{text}"
    );

    // 1.1 rolls out: nothing left; the embedded status and history see it.
    run(accounts(Some(url), "1.1.0").arg("serve"), 0);
    let j = json(
        accounts(Some(url), "1.1.0").args(["upsilon", "plan", "--json"]),
        0,
    );
    assert_eq!(j["steps"], Value::Array(vec![]));
    let (text, _) = run(accounts(Some(url), "1.1.0").args(["upsilon", "plan"]), 0);
    assert!(text.contains("nothing to run"), "{text}");
    let status = json(
        accounts(Some(url), "1.1.0").args(["upsilon", "status", "--json"]),
        0,
    );
    assert_eq!(
        (&status["service"], &status["data_version"]),
        (&"accounts".into(), &"1.1.0".into())
    );
    let history = json(
        accounts(Some(url), "1.1.0").args(["upsilon", "history", "--json", "--version", "1.1"]),
        0,
    );
    assert_eq!(history["entries"].as_array().unwrap().len(), 2);
    // An old build of 1.0 now sees data ahead of it, and runs nothing.
    let j = json(
        accounts(Some(url), "1.0.0").args(["upsilon", "plan", "--json"]),
        0,
    );
    assert_eq!(
        (&j["data_ahead"], &j["steps"]),
        (&true.into(), &Value::Array(vec![]))
    );
}

#[test]
fn sqlite_plan_follows_the_store() {
    let dir = tempfile::tempdir().unwrap();
    plan_follows_the_store(&format!(
        "sqlite://{}",
        dir.path().join("upsilon.db").display()
    ));
}

#[test]
fn postgres_plan_follows_the_store() {
    plan_follows_the_store(&format!("{}?schema=accounts_plan", server().url()));
}

#[test]
fn plan_needs_a_reachable_store() {
    let (_, stderr) = run(accounts(None, "1.1.0").args(["upsilon", "plan"]), 2);
    assert!(
        stderr.contains("pass --url URL or set UPSILON_URL"),
        "{stderr}"
    );
    let closed = upsilon_test_servers::free_port();
    let url = format!("postgres://app:hunter2hunter2@127.0.0.1:{closed}/app");
    let j = json(
        accounts(Some(&url), "1.1.0").args(["upsilon", "plan", "--json"]),
        5,
    );
    assert_eq!(j["error"]["kind"], "unreachable");
    assert!(!j.to_string().contains("hunter2hunter2"), "{j}");
}
