//! This test binary depends on `upsilon-task-lib` (it is a dependency of the
//! package) but never names it. rustc then does not load the crate at all, so
//! its tasks are not linked in, and `Builder::require_tasks_from` must say so.

use upsilon::{Registry, Upsilon};

/// A task in this crate, so that the registry is not simply empty.
#[upsilon::task(version = "1.0", order = 1)]
async fn local_task(ctx: &mut upsilon::TaskContext) -> anyhow::Result<()> {
    let _ = ctx;
    Ok(())
}

#[test]
fn tasks_of_an_unnamed_crate_are_not_linked_in() {
    let registry = Registry::collect().unwrap();
    let crates = registry.crates();
    assert_eq!(crates.get("unnamed_crate"), Some(&1));
    assert_eq!(
        crates.get("upsilon_task_lib"),
        None,
        "this toolchain keeps the tasks of a crate that is never named; \
         the advice in the upsilon docs can be relaxed"
    );
}

#[test]
fn require_tasks_from_reports_the_missing_crate() {
    let err = Upsilon::builder()
        .app_version("1.0")
        .backend(upsilon::testing::MemoryBackend::new())
        .require_tasks_from("unnamed_crate")
        .require_tasks_from("upsilon_task_lib")
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no task from crate `upsilon_task_lib` is registered in this binary"),
        "{err}"
    );
    assert!(err.contains("add `use upsilon_task_lib as _;`"), "{err}");
    assert!(err.contains("tasks found from: unnamed_crate"), "{err}");
}
