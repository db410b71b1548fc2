//! Two tasks that clash fail the `cargo test` of the crate that defines
//! them, although its author wrote no test: `#[upsilon::task]` adds one.
//!
//! This builds a throwaway crate with a path dependency on this workspace's
//! `upsilon` and runs `cargo test` on it. Its target directory is kept under
//! this workspace's target directory, so only the first run builds
//! `upsilon`'s dependencies.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const LIB: &str = r#"use upsilon::TaskContext;

#[upsilon::task(version = "1.0", order = 1)]
pub async fn first(_: &mut TaskContext) -> Result<(), std::io::Error> {
    Ok(())
}

#[upsilon::task(version = "1.0.0", order = 1)]
pub async fn second(_: &mut TaskContext) -> Result<(), std::io::Error> {
    Ok(())
}

#[upsilon::task(version = "1.0", order = 2, id = "first")]
pub async fn third(_: &mut TaskContext) -> Result<(), std::io::Error> {
    Ok(())
}

#[upsilon::task(version = "1.1", order = 1)]
pub async fn unrelated(_: &mut TaskContext) -> Result<(), std::io::Error> {
    Ok(())
}
"#;

fn line_of(needle: &str) -> usize {
    LIB.lines().position(|l| l.contains(needle)).unwrap() + 1
}

fn write(path: &Path, text: &str) {
    // Rewriting an unchanged file would make cargo rebuild the crate.
    if fs::read_to_string(path).ok().as_deref() != Some(text) {
        fs::write(path, text).unwrap();
    }
}

#[test]
fn conflicting_tasks_fail_the_defining_crates_own_tests() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("conflicting-tasks");
    let krate = base.join("crate");
    fs::create_dir_all(krate.join("src")).unwrap();
    write(
        &krate.join("Cargo.toml"),
        &format!(
            r#"[package]
name = "conflicting-tasks"
version = "0.1.0"
edition = "2021"
publish = false

[dependencies]
upsilon = {{ path = {:?} }}

[workspace]

[profile.dev]
debug = "line-tables-only"

[profile.dev.package."*"]
debug = false
"#,
            workspace.join("upsilon")
        ),
    );
    write(&krate.join("src/lib.rs"), LIB);
    // The workspace's lock file: the same dependency versions, no network.
    if !krate.join("Cargo.lock").exists() {
        fs::copy(workspace.join("Cargo.lock"), krate.join("Cargo.lock")).unwrap();
    }

    let output = Command::new(env!("CARGO"))
        .args(["test", "--offline", "--lib", "--manifest-path"])
        .arg(krate.join("Cargo.toml"))
        .args(["--", "--color", "never"])
        .env("CARGO_TARGET_DIR", base.join("target"))
        .env("CARGO_TERM_COLOR", "never")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let all = format!("{stdout}\n{stderr}");

    assert!(!output.status.success(), "cargo test passed:\n{all}");
    let (first, second, third) = (
        line_of("fn first"),
        line_of("fn second"),
        line_of("fn third"),
    );
    for expected in [
        "test __upsilon_registry_check_first ... FAILED".to_owned(),
        "test __upsilon_registry_check_second ... FAILED".to_owned(),
        "test __upsilon_registry_check_third ... FAILED".to_owned(),
        "test __upsilon_registry_check_unrelated ... ok".to_owned(),
        format!(
            "tasks `first` (src/lib.rs:{first}) and `second` (src/lib.rs:{second}) both have version 1.0.0 and order 1"
        ),
        format!(
            "two tasks have id `first` in version 1.0.0 (src/lib.rs:{first} and src/lib.rs:{third})"
        ),
    ] {
        assert!(all.contains(&expected), "{expected:?} not in:\n{all}");
    }
}
