//! The `upsilon` binary end to end, against SQLite and a real PostgreSQL:
//! what an operator sees, the `--json` shapes docs/CLI.md documents, the
//! exit codes, and that the URL's password is never printed.
//!
//! `cli_pending.rs` has the tests of `services` and `unlock`, which need
//! backend support.

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

pub fn status_shows_versions_the_lease_and_the_running_task(kind: Kind) {
    let f = Fixture::new(kind, "status");
    let rt = rt();
    let b = rt.block_on(f.backend());
    rt.block_on(upgrade(&b, "accounts", "1.0", false));
    let lease = rt.block_on(live_holder(&b, "accounts", Duration::from_secs(60)));

    let j = f
        .run(&["--service", "accounts", "status", "--json"])
        .expect(0)
        .json();
    shape(&j, STATUS);
    assert_eq!(
        (&j["service"], &j["data_version"], &j["baseline"]),
        (&"accounts".into(), &"1.0.0".into(), &Value::Null)
    );
    assert_eq!(j["fence"], lease.fence);
    lease_shape(&j["lease"]);
    assert_eq!(j["lease"]["holder"]["pod"], "accounts-7d9f");
    assert_eq!(j["lease"]["fence"], lease.fence);
    let left = j["lease"]["expires_in_ms"].as_u64().unwrap();
    assert!(left > 0 && left <= 60_000, "{j}");
    assert_eq!(
        tasks_of(&j["tasks"], "task"),
        ["create", "seed", "backfill"]
    );
    assert_eq!(
        tasks_of(&j["tasks"], "state"),
        ["completed", "completed", "running"]
    );
    j["tasks"].as_array().unwrap().iter().for_each(row_shape);
    let running = &j["running"];
    assert_eq!(
        (&running["task"], &running["live"]),
        (&"backfill".into(), &true.into())
    );
    assert!(running["elapsed_ms"].is_u64(), "{running}");
    // Where the running attempt got, as its last checkpoint says.
    let c = &running["checkpoint"];
    assert_eq!(
        (&c["position"]["last_id"], &c["done"], &c["total"]),
        (&1500.into(), &1500.into(), &6000.into())
    );
    assert!(c["saved_at"].as_str().unwrap().ends_with('Z'), "{c}");
    assert_eq!(j["last_unlock"], Value::Null);

    let text = f.run(&["--service", "accounts", "status"]).expect(0).stdout;
    for want in [
        "service accounts",
        "data version  1.0.0",
        "held by pod accounts-7d9f on node-a (pid 4242, run run-a) with fence",
        "running       backfill@1.1.0 attempt 1",
        "; at {\"last_id\":1500}, saved ",
        "1500/6000 done (25%)",
        "completed",
    ] {
        assert!(text.contains(want), "{want:?} in {text}");
    }

    // The holder goes away and leaves its attempt running: status says so.
    rt.block_on(b.release(&lease)).unwrap();
    let j = f
        .run(&["status", "--json", "--service", "accounts"])
        .expect(0)
        .json();
    assert_eq!(
        (&j["lease"], &j["running"]["live"]),
        (&Value::Null, &false.into())
    );
    let text = f.run(&["status", "--service", "accounts"]).expect(0).stdout;
    assert!(text.contains("lease         free"), "{text}");
    assert!(text.contains("no longer holds the lease"), "{text}");
}

pub fn history_lists_every_attempt_and_filters(kind: Kind) {
    let f = Fixture::new(kind, "history");
    let rt = rt();
    let b = rt.block_on(f.backend());
    rt.block_on(upgrade(&b, "accounts", "1.0", false));
    rt.block_on(upgrade(&b, "accounts", "1.1", true));

    let all = f
        .run(&["--service", "accounts", "history", "--json"])
        .expect(0)
        .json();
    shape(&all, &["entries"]);
    let entries = &all["entries"];
    entries.as_array().unwrap().iter().for_each(row_shape);
    assert_eq!(tasks_of(entries, "task"), ["create", "seed", "backfill"]);
    let failed = &entries[2];
    assert_eq!(
        (&failed["state"], &failed["kind"]),
        (&"failed".into(), &"run".into())
    );
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("the disk is full"),
        "{failed}"
    );
    assert!(failed["duration_ms"].is_u64() && failed["finished_at_ms"].is_i64());
    assert!(
        failed["started_at"].as_str().unwrap().ends_with('Z'),
        "{failed}"
    );
    assert_eq!(entries[0]["description"], "creates the table");
    // Each row shows the checkpoint its attempt reached.
    assert_eq!(entries[0]["checkpoint"], Value::Null);
    assert_eq!(
        (
            &failed["checkpoint"]["position"],
            &failed["checkpoint"]["done"]
        ),
        (&serde_json::json!({"last_id": 300}), &300.into())
    );

    let by_version = f
        .run(&[
            "--service",
            "accounts",
            "history",
            "--json",
            "--version",
            "1.0",
        ])
        .expect(0)
        .json();
    assert_eq!(tasks_of(&by_version["entries"], "task"), ["create", "seed"]);
    let by_state = f
        .run(&[
            "--service=accounts",
            "history",
            "--json",
            "--state",
            "failed",
        ])
        .expect(0)
        .json();
    assert_eq!(tasks_of(&by_state["entries"], "task"), ["backfill"]);
    let none = f
        .run(&[
            "--service",
            "accounts",
            "history",
            "--json",
            "--version",
            "1.1",
            "--state",
            "completed",
        ])
        .expect(0)
        .json();
    assert_eq!(none["entries"], Value::Array(vec![]));

    let text = f
        .run(&["--service", "accounts", "history"])
        .expect(0)
        .stdout;
    assert!(text.contains("service accounts: 3 attempts"), "{text}");
    assert!(text.contains("error: the disk is full"), "{text}");
    assert!(
        text.contains("checkpoint: {\"last_id\":300}, saved "),
        "{text}"
    );
    assert!(text.contains("300/1200 done (25%)"), "{text}");
}

pub fn baseline_adopts_an_empty_store_and_refuses_a_used_one(kind: Kind) {
    let f = Fixture::new(kind, "baseline");
    let j = f
        .run(&["--service", "legacy", "baseline", "1.4", "--json"])
        .expect(0)
        .json();
    shape(&j, &["service", "version", "baselined"]);
    assert_eq!(j["version"], "1.4.0");
    assert_eq!(j["baselined"], true);
    let status = f
        .run(&["--service", "legacy", "status", "--json"])
        .expect(0)
        .json();
    assert_eq!(
        (&status["data_version"], &status["baseline"]),
        (&"1.4.0".into(), &"1.4.0".into())
    );

    let refused = f
        .run(&["--service", "legacy", "baseline", "1.5", "--json"])
        .expect(4);
    error_shape(&refused, "refused");
    let text = f.run(&["--service", "legacy", "baseline", "1.5"]).expect(4);
    assert!(
        text.stderr
            .contains("not baselined: the store of `legacy` is not empty"),
        "{text:?}"
    );
    let status = f
        .run(&["--service", "legacy", "status", "--json"])
        .expect(0)
        .json();
    assert_eq!(status["data_version"], "1.4.0");
}

pub fn exit_codes_say_what_went_wrong(kind: Kind) {
    let f = Fixture::new(kind, "codes");
    let rt = rt();
    let b = rt.block_on(f.backend());
    rt.block_on(upgrade(&b, "accounts", "1.0", false));

    for cmd in ["status", "history", "unlock"] {
        let out = f.run(&["--service", "nope", cmd, "--json"]).expect(3);
        error_shape(&out, "not_found");
        let text = f.run(&["--service", "nope", cmd]).expect(3);
        assert!(text.stderr.contains("no service `nope`"), "{text:?}");
    }
    // Bad usage: clap's 2, and ours for what clap cannot see.
    f.run(&["frobnicate"]).expect(2);
    f.run(&["history", "--version", "v1"]).expect(2);
    f.run(&["history", "--state", "done"]).expect(2);
    f.run(&["--service", "a b", "status"]).expect(2);
    f.run(&["--service", "accounts", "baseline", "1.x"])
        .expect(2);
    f.run(&[
        "--service",
        "accounts",
        "status",
        "--watch",
        "--interval",
        "0",
    ])
    .expect(2);
    let out = f.run(&["unlock", "--json"]).expect(2);
    error_shape(&out, "usage");
    f.run(&["plan"]).expect(2);
    let out = run(bare().args(["--service", "accounts", "status", "--json"])).expect(2);
    error_shape(&out, "usage");
    assert!(
        out.stdout.contains("pass --url URL or set UPSILON_URL"),
        "{out:?}"
    );

    // The environment names the store and the service.
    let out = run(bare()
        .env("UPSILON_URL", &f.url)
        .env("UPSILON_SERVICE", "accounts")
        .args(["status", "--json"]))
    .expect(0);
    assert_eq!(out.json()["data_version"], "1.0.0");
}

pub fn an_unconfirmed_unlock_is_refused_and_changes_nothing(kind: Kind) {
    let f = Fixture::new(kind, "unconfirmed");
    let rt = rt();
    let b = rt.block_on(f.backend());
    let lease = rt.block_on(live_holder(&b, "accounts", Duration::from_secs(60)));
    // stdin is not a terminal: without --yes, it refuses.
    let out = f.run(&["--service", "accounts", "unlock"]).expect(4);
    assert!(out.stderr.contains("pass --yes"), "{out:?}");
    assert!(
        out.stderr.contains("held by pod accounts-7d9f on node-a"),
        "{out:?}"
    );
    error_shape(
        &f.run(&["--service", "accounts", "unlock", "--json"])
            .expect(4),
        "refused",
    );
    let still = rt.block_on(b.current("accounts")).unwrap().unwrap();
    assert_eq!((still.fence, &still.holder), (lease.fence, &node()));
    rt.block_on(b.renew(&lease)).unwrap();
    let history = rt.block_on(b.history("accounts")).unwrap();
    assert!(history.iter().all(|r| !r.key.is_unlock()), "{history:?}");
}

pub fn watch_follows_the_status_live(kind: Kind) {
    let f = Fixture::new(kind, "watch");
    let rt = rt();
    let b = rt.block_on(f.backend());
    rt.block_on(upgrade(&b, "accounts", "1.0", false));
    let lease = rt.block_on(live_holder(&b, "accounts", Duration::from_secs(60)));
    let watch = Spawned::new(f.cli().args([
        "--service",
        "accounts",
        "status",
        "--watch",
        "--interval",
        "100",
        "--json",
    ]));
    let first: Value = serde_json::from_str(&watch.line()).unwrap();
    shape(&first, STATUS);
    assert_eq!(first["running"]["task"], "backfill");

    // The running task completes; the next reads show it.
    rt.block_on(b.apply("accounts", lease.fence, &[finish_backfill()]))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let j: Value = serde_json::from_str(&watch.line()).unwrap();
        shape(&j, STATUS);
        if j["running"].is_null() {
            assert_eq!(j["tasks"][2]["state"], "completed");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the watch never showed the completion"
        );
    }

    // Without a terminal and without --json: each new status, as text.
    let text = Spawned::new(f.cli().args([
        "--service",
        "accounts",
        "status",
        "--watch",
        "--interval",
        "100",
    ]));
    assert_eq!(text.line(), "service accounts");
}

pub fn passwords_never_reach_the_output() {
    let pw = server().password();
    let port = server().port();
    let closed = upsilon_test_servers::free_port();
    let urls = [
        // Unreachable: a port nothing listens on.
        (
            format!("postgres://postgres:{pw}@127.0.0.1:{closed}/postgres"),
            5,
        ),
        // A wrong password: refused by the server.
        (
            format!("postgres://postgres:{pw}-wrong@127.0.0.1:{port}/postgres"),
            1,
        ),
        // The password as an option.
        (
            format!("postgres://postgres@127.0.0.1:{closed}/postgres?password={pw}"),
            5,
        ),
    ];
    for (url, code) in &urls {
        for json in [false, true] {
            let mut cmd = bare();
            cmd.args(["--url", url, "--service", "accounts", "status"]);
            if json {
                cmd.arg("--json");
            }
            let out = run(&mut cmd).expect(*code);
            assert!(!out.all().contains(pw), "{out:#?}");
            if json {
                error_shape(&out, if *code == 5 { "unreachable" } else { "failed" });
            } else {
                assert!(
                    out.stderr.contains("opening the backend postgres://"),
                    "{out:?}"
                );
            }
        }
    }
    // Nor does --help show it from the environment.
    let good = server().url();
    let out = run(bare().env("UPSILON_URL", &good).arg("--help")).expect(0);
    assert!(
        out.stdout.contains("UPSILON_URL") && !out.all().contains(pw),
        "{out:?}"
    );
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(super::Kind::Sqlite) } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::$name(super::Kind::Postgres) } )*
        }
    };
}

on_both_backends!(
    status_shows_versions_the_lease_and_the_running_task,
    history_lists_every_attempt_and_filters,
    baseline_adopts_an_empty_store_and_refuses_a_used_one,
    exit_codes_say_what_went_wrong,
    an_unconfirmed_unlock_is_refused_and_changes_nothing,
    watch_follows_the_status_live,
);

#[test]
fn postgres_passwords_never_reach_the_output() {
    passwords_never_reach_the_output();
}
