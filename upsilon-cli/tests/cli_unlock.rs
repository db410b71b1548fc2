//! `services` and `unlock` end to end, against SQLite and a real
//! PostgreSQL (`Store::services` and `Lock::force_release`).

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;
use upsilon::backend::BackendError;

use common::*;

pub fn services_are_listed_and_covered(kind: Kind) {
    let f = Fixture::new(kind, "services");
    let rt = rt();
    let b = rt.block_on(f.backend());
    rt.block_on(upgrade(&b, "accounts", "1.0", false));
    f.run(&["--service", "billing", "baseline", "2.0"])
        .expect(0);
    // Reading a service does not make it one.
    f.run(&["--service", "ghost", "status"]).expect(3);

    let j = f.run(&["services", "--json"]).expect(0).json();
    assert_eq!(j, serde_json::json!({"services": ["accounts", "billing"]}));
    assert_eq!(f.run(&["services"]).expect(0).stdout, "accounts\nbilling\n");
    let all = f.run(&["status", "--json"]).expect(0).json();
    shape(&all, &["services"]);
    assert_eq!(
        tasks_of(&all["services"], "service"),
        ["accounts", "billing"]
    );
    all["services"]
        .as_array()
        .unwrap()
        .iter()
        .for_each(|s| shape(s, STATUS));
    let history = f.run(&["history", "--json"]).expect(0).json();
    assert_eq!(
        tasks_of(&history["entries"], "service"),
        ["accounts", "accounts"]
    );
    let text = f.run(&["status"]).expect(0).stdout;
    assert!(
        text.contains("service accounts") && text.contains("service billing"),
        "{text}"
    );
}

pub fn an_unlock_fences_out_a_live_holder(kind: Kind) {
    let f = Fixture::new(kind, "unlock");
    let rt = rt();
    let b = rt.block_on(f.backend());
    rt.block_on(upgrade(&b, "accounts", "1.0", false));
    let lease = rt.block_on(live_holder(&b, "accounts", Duration::from_secs(60)));

    let j = f
        .run(&[
            "--service",
            "accounts",
            "unlock",
            "--yes",
            "--no-wait",
            "--json",
        ])
        .expect(0)
        .json();
    shape(&j, UNLOCK);
    lease_shape(&j["cleared"]);
    assert_eq!(
        (&j["unlocked"], &j["recorded"], &j["released"]),
        (&true.into(), &true.into(), &true.into())
    );
    assert_eq!(j["cleared"]["fence"], lease.fence);
    assert_eq!(j["cleared"]["holder"]["host"], "node-a");
    assert_eq!(j["taken_by"], Value::Null);
    let fence = j["fence"].as_u64().unwrap();
    assert!(fence > lease.fence, "{j}");

    // The old holder is fenced out: its next write and its renewal fail.
    let err = rt
        .block_on(b.apply("accounts", lease.fence, &[finish_backfill()]))
        .unwrap_err();
    assert!(
        matches!(err, BackendError::StaleFence { presented, current } if presented == lease.fence && current == fence),
        "{err}"
    );
    assert!(matches!(
        rt.block_on(b.renew(&lease)),
        Err(BackendError::LeaseLost(_))
    ));

    // The history shows both: the old holder's attempt, and the unlock.
    let entries = f
        .run(&["--service", "accounts", "history", "--json"])
        .expect(0)
        .json()["entries"]
        .clone();
    let n = entries.as_array().unwrap().len();
    let (old, unlock) = (&entries[n - 2], &entries[n - 1]);
    assert_eq!(
        (&old["task"], &old["state"], &old["fence"]),
        (&"backfill".into(), &"running".into(), &lease.fence.into())
    );
    row_shape(unlock);
    assert_eq!(
        (
            &unlock["task"],
            &unlock["version"],
            &unlock["kind"],
            &unlock["state"]
        ),
        (
            &"(unlock)".into(),
            &"0.0.0".into(),
            &"unlock".into(),
            &"completed".into()
        )
    );
    assert_eq!(unlock["fence"], fence);
    assert!(
        unlock["description"].as_str().unwrap().contains("node-a"),
        "{unlock}"
    );
    let text = f
        .run(&["--service", "accounts", "history"])
        .expect(0)
        .stdout;
    assert!(text.contains("unlock #1 by"), "{text}");

    let status = f
        .run(&["--service", "accounts", "status", "--json"])
        .expect(0)
        .json();
    assert_eq!(status["lease"], Value::Null);
    assert_eq!(status["last_unlock"]["kind"], "unlock");
    assert_eq!(status["running"]["live"], false);
    // The next node takes over and runs the attempt again; a second unlock
    // finds nothing to free.
    rt.block_on(upgrade(&b, "accounts", "1.1", false));
    let again = f
        .run(&["--service", "accounts", "unlock", "--yes", "--json"])
        .expect(0)
        .json();
    assert_eq!(again["unlocked"], false);
}

pub fn an_unlock_holds_the_lease_until_the_freed_one_would_expire(kind: Kind) {
    let f = Fixture::new(kind, "unlock_wait");
    let rt = rt();
    let b = rt.block_on(f.backend());
    rt.block_on(live_holder(&b, "accounts", Duration::from_secs(3)));
    let begun = Instant::now();
    let j = f
        .run(&["--service", "accounts", "unlock", "-y", "--json"])
        .expect(0)
        .json();
    let held = j["held_ms"].as_u64().unwrap();
    assert!(held > 1_000 && held <= 3_000, "{j}");
    assert!(begun.elapsed() >= Duration::from_millis(held), "{j}");
    assert_eq!(rt.block_on(b.current("accounts")).unwrap(), None);
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
    services_are_listed_and_covered,
    an_unlock_fences_out_a_live_holder,
    an_unlock_holds_the_lease_until_the_freed_one_would_expire,
);
