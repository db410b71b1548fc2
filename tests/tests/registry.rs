//! Tasks defined with `#[upsilon::task]` are registered with the right
//! version, order, id, description, location and rollback.

use upsilon::{Registry, TaskContext, Version};

#[derive(Debug)]
struct MyError;

impl std::fmt::Display for MyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("my error")
    }
}

impl std::error::Error for MyError {}

const BACKFILL_LINE: u32 = line!() + 5;
/// Copies legacy rows into the new table.
///
///   Runs in batches.
#[upsilon::task(version = "1.1", order = 1)]
async fn backfill_accounts(ctx: &mut upsilon::TaskContext) -> Result<(), MyError> {
    let _ = ctx;
    Ok(())
}

const CHECK_LINE: u32 = line!() + 2;
#[upsilon::task(version = "1.1", order = 2, id = "check-accounts", rollback = undo_check)]
async fn check(ctx: &mut TaskContext) -> anyhow::Result<()> {
    let _ = ctx;
    Ok(())
}

async fn undo_check(ctx: &mut TaskContext) -> Result<(), std::io::Error> {
    let _ = ctx;
    Ok(())
}

#[upsilon::task(version = "2.0.0-rc.1", order = 4_000_000_000u32)]
async fn r#type(_: &mut TaskContext) -> Result<(), upsilon::BoxError> {
    Ok(())
}

mod nested {
    #[upsilon::task(version = "1", order = 0)]
    pub(crate) async fn first(_ctx: &mut upsilon::TaskContext) -> anyhow::Result<()> {
        Ok(())
    }
}

fn registry() -> Registry {
    Registry::collect().expect("the tasks in this file do not conflict")
}

#[test]
fn tasks_are_registered_in_plan_order() {
    let registry = registry();
    let tasks: Vec<(String, &str, u32)> = registry
        .tasks()
        .iter()
        .filter(|t| t.location().module_path.starts_with("registry"))
        .map(|t| (t.version().to_string(), t.id(), t.order()))
        .collect();
    assert_eq!(
        tasks,
        [
            ("1.0.0".to_owned(), "first", 0),
            ("1.1.0".to_owned(), "backfill_accounts", 1),
            ("1.1.0".to_owned(), "check-accounts", 2),
            ("2.0.0-rc.1".to_owned(), "type", 4_000_000_000),
        ]
    );
}

#[test]
fn details_come_from_the_fn() {
    let registry = registry();
    let find = |id: &str| {
        registry
            .tasks()
            .iter()
            .find(|t| t.id() == id)
            .unwrap_or_else(|| panic!("task {id} is registered"))
    };

    let backfill = find("backfill_accounts");
    assert_eq!(backfill.version(), &Version::new(1, 1, 0));
    assert_eq!(
        backfill.description(),
        "Copies legacy rows into the new table.\n\nRuns in batches."
    );
    assert!(!backfill.has_rollback());
    assert_eq!(backfill.location().module_path, "registry");
    assert!(backfill.location().file.ends_with("registry.rs"));
    assert_eq!(backfill.location().line, BACKFILL_LINE);

    let check = find("check-accounts");
    assert_eq!(check.description(), "");
    assert!(check.has_rollback());
    assert_eq!(check.location().line, CHECK_LINE);

    let first = find("first");
    assert_eq!(first.location().module_path, "registry::nested");
    assert_eq!(first.version(), &Version::new(1, 0, 0));

    assert!(find("type").version().pre.as_str() == "rc.1");
}

#[test]
fn crates_counts_this_test_crate() {
    assert_eq!(registry().crates().get("registry"), Some(&4));
}
