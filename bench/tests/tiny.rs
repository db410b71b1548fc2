//! The benchmark works: a tiny run (small sizes, short sleeps, no build-time
//! scenario) exits 0, prints a table with every scenario, every backend built
//! in included, and writes JSON with a row per figure. It asserts nothing about the figures themselves.

use std::process::Command;

#[test]
fn a_tiny_run_prints_every_scenario_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_upsilon-bench"))
        .arg("--tiny")
        .arg("--json")
        .arg(&json)
        .output()
        .expect("running upsilon-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "upsilon-bench --tiny failed:\n{stdout}\n{stderr}"
    );
    let header = "| scenario | measure";
    assert!(stdout.contains(header), "no table:\n{stdout}");
    for scenario in [
        "1a", "1b", "2", "3", "4", "5a", "5b", "6a", "6b", "6c", "6d", "7a", "7b",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("| {scenario} "))),
            "no row for scenario {scenario}:\n{stdout}"
        );
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON file")).unwrap();
    let rows = report["rows"].as_array().expect("rows");
    assert!(rows.len() >= 20, "{} rows", rows.len());
    for row in rows {
        assert!(row["upsilon"].is_number(), "{row}");
        assert!(row["scenario"].is_string() && row["measure"].is_string());
    }
    assert_eq!(report["meta"]["tiny"], true);
    assert!(report["meta"]["machine"]["cpus"].as_u64().unwrap() >= 1);
}

#[test]
fn bad_flags_are_refused_naming_the_flag() {
    for (args, said) in [
        (&["--only", "8"][..], "no scenario 8"),
        (&["--backends", "mysql"], "no backend \"mysql\""),
        (&["--repeats", "0"], "--repeats <N>"),
        (&["--load-ms", "-1"], "--load-ms <MS>"),
        (&["--ttl-ms", "soon"], "--ttl-ms <MS>"),
        (&["--bogus"], "'--bogus'"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_upsilon-bench"))
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(said), "{args:?}: {stderr}");
        assert!(stderr.contains("--help"), "{args:?}: {stderr}");
    }
}
