//! Tasks defined in another crate are found when this binary names it.

use upsilon::Registry;
use upsilon_task_lib as _;

#[test]
fn tasks_from_a_named_crate_are_registered() {
    let registry = Registry::collect().expect("the tasks do not conflict");
    assert_eq!(registry.crates().get("upsilon_task_lib"), Some(&3));
    let tasks: Vec<(String, &str, u32, &str, bool)> = registry
        .tasks()
        .iter()
        .map(|t| {
            (
                t.version().to_string(),
                t.id(),
                t.order(),
                t.description(),
                t.has_rollback(),
            )
        })
        .collect();
    assert_eq!(
        tasks,
        [
            (
                "0.9.0".to_owned(),
                "create_audit_table",
                1,
                "Creates the audit table.",
                false
            ),
            (
                "1.0.0".to_owned(),
                "copy-audit-rows",
                1,
                "Copies the old audit rows into the new table.",
                true
            ),
            (
                "1.0.0".to_owned(),
                "check_audit_owners",
                2,
                "Checks that every audit row has an owner.",
                false
            ),
        ]
    );
    for task in registry.tasks() {
        assert_eq!(task.location().module_path, "upsilon_task_lib");
        assert!(
            task.location().file.ends_with("task-lib/src/lib.rs"),
            "{}",
            task.location()
        );
    }
}
