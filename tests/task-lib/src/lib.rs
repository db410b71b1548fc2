//! Tasks in a separate library crate. A binary finds them only if it names
//! this crate (`use upsilon_task_lib as _;`).

use upsilon::TaskContext;

/// Creates the audit table.
#[upsilon::task(version = "0.9", order = 1)]
pub async fn create_audit_table(ctx: &mut TaskContext) -> Result<(), std::io::Error> {
    let _ = ctx;
    Ok(())
}

/// Copies the old audit rows into the new table.
#[upsilon::task(version = "1.0", order = 1, id = "copy-audit-rows", rollback = clear_audit_rows)]
pub async fn copy_audit_rows(ctx: &mut TaskContext) -> Result<(), std::io::Error> {
    ctx.progress(0, 0, "nothing to copy");
    Ok(())
}

/// Checks that every audit row has an owner.
#[upsilon::task(version = "1.0", order = 2)]
pub async fn check_audit_owners(ctx: &mut TaskContext) -> Result<(), std::io::Error> {
    let _ = ctx;
    Ok(())
}

async fn clear_audit_rows(ctx: &mut TaskContext) -> Result<(), std::io::Error> {
    let _ = ctx;
    Ok(())
}
