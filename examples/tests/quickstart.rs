//! The README's first command works: the quickstart exits 0 and shows one
//! node doing each version's work while the others skip it, and a stopped
//! backfill resuming from its checkpoint.

use std::process::Command;

#[test]
fn quickstart_rolls_three_nodes_from_1_0_to_1_1() {
    let out = Command::new(env!("CARGO_BIN_EXE_quickstart"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the quickstart");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "quickstart failed:\n{stdout}\n{stderr}"
    );
    for version in ["1.0", "1.1"] {
        let ran: Vec<&str> = stdout
            .lines()
            .filter(|l| l.contains(&format!("@{version}: READY at {version} after upgrading")))
            .collect();
        assert_eq!(ran.len(), 1, "one canary for {version}:\n{stdout}");
        let ready = stdout
            .lines()
            .filter(|l| l.contains(&format!("@{version}: ")) && l.contains("READY at"))
            .count();
        assert_eq!(ready, 3, "three nodes ready at {version}:\n{stdout}");
    }
    assert!(stdout.contains("data version: 1.1.0"), "{stdout}");
    assert!(
        stdout.contains("accounts with a normalised email: 3000"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Each task completed exactly once"),
        "{stdout}"
    );
    // The first 1.1 node was stopped part-way; the canary resumed from the
    // backfill's checkpoint rather than from the first account.
    assert!(stdout.contains("stopped part-way"), "{stdout}");
    let resumed = stdout
        .lines()
        .find(|l| l.contains("backfill: resuming after account"))
        .unwrap_or_else(|| panic!("no resumed backfill:\n{stdout}"));
    assert!(!resumed.contains("after account 0 "), "{resumed}");
}
